//! One exec session: its process, its flow-control window and the bookkeeping
//! that decides when `Exit` may be sent (the process has ended *and* both output
//! pumps are done). [`Sessions`] is the table of live sessions, by id and by pid.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hearth_proto::{ExitStatus, Frame, Kind, INITIAL_WINDOW};

use crate::channel::Writer;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // why: state stays consistent across a panic (each update is a single field
    // write), and the panic hook reboots the VM anyway.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct State {
    /// Output bytes the host still accepts.
    window: u64,
    /// Output pumps still reading (stdout, stderr).
    pumps_open: u8,
    status: Option<ExitStatus>,
    exited_at: Option<Instant>,
    exit_sent: bool,
}

/// A running (or just ended) process and its streams.
pub struct Session {
    pub id: u32,
    pub pid: u32,
    state: Mutex<State>,
    credit: Condvar,
    /// Readable once the process has exited; wakes output pumps blocked in poll.
    exited: OwnedFd,
    stdin: Mutex<Option<Sender<Vec<u8>>>>,
}

impl Session {
    pub fn new(id: u32, pid: u32, stdin: Option<Sender<Vec<u8>>>) -> std::io::Result<Session> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Session {
            id,
            pid,
            state: Mutex::new(State {
                window: u64::from(INITIAL_WINDOW),
                pumps_open: 2,
                status: None,
                exited_at: None,
                exit_sent: false,
            }),
            credit: Condvar::new(),
            // SAFETY: fd is a fresh eventfd owned by nobody else.
            exited: unsafe { OwnedFd::from_raw_fd(fd) },
            stdin: Mutex::new(stdin),
        })
    }

    /// Takes up to `max` bytes of the window, blocking until at least one is free.
    pub fn reserve(&self, max: usize) -> usize {
        let mut st = lock(&self.state);
        while st.window == 0 {
            st = self
                .credit
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let n = st.window.min(max as u64);
        st.window -= n;
        n as usize
    }

    /// Returns reserved bytes that were not used.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.add_credit(n as u64);
        }
    }

    /// The host consumed `n` bytes (a Credit frame).
    pub fn add_credit(&self, n: u64) {
        let mut st = lock(&self.state);
        st.window = st.window.saturating_add(n);
        self.credit.notify_all();
    }

    pub fn exited_at(&self) -> Option<Instant> {
        lock(&self.state).exited_at
    }

    pub fn exited_fd(&self) -> RawFd {
        self.exited.as_raw_fd()
    }

    /// Records the process's end; true when the session is now complete.
    pub fn set_exited(&self, status: ExitStatus) -> bool {
        let complete = {
            let mut st = lock(&self.state);
            st.status = Some(status);
            st.exited_at = Some(Instant::now());
            Self::take_complete(&mut st)
        };
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, which lives across the call, to our eventfd.
        unsafe { libc::write(self.exited.as_raw_fd(), (&one as *const u64).cast(), 8) };
        complete
    }

    /// An output pump finished; true when the session is now complete.
    pub fn pump_done(&self) -> bool {
        let mut st = lock(&self.state);
        st.pumps_open = st.pumps_open.saturating_sub(1);
        Self::take_complete(&mut st)
    }

    fn take_complete(st: &mut State) -> bool {
        if st.pumps_open == 0 && st.status.is_some() && !st.exit_sent {
            st.exit_sent = true;
            return true;
        }
        false
    }

    fn status(&self) -> ExitStatus {
        lock(&self.state).status.unwrap_or(ExitStatus {
            code: None,
            signal: None,
        })
    }

    /// Queues stdin bytes (empty = close) for the session's stdin writer.
    pub fn send_stdin(&self, data: Vec<u8>) {
        let mut stdin = lock(&self.stdin);
        let close = data.is_empty();
        if let Some(tx) = stdin.as_ref() {
            let _ = tx.send(data);
        }
        if close {
            *stdin = None;
        }
    }
}

/// Live sessions. The table lock is held across spawning a process, and the
/// reaper takes it before reaping, so a pid is always registered before its
/// exit can be seen.
pub struct Sessions {
    table: Mutex<Table>,
    children: Condvar,
}

#[derive(Default)]
pub struct Table {
    by_id: HashMap<u32, Arc<Session>>,
    by_pid: HashMap<u32, Arc<Session>>,
    /// Processes spawned so far; lets the reaper wait for "a new child" without
    /// missing one spawned just before it started waiting.
    spawned: u64,
}

impl Table {
    pub fn contains(&self, id: u32) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn insert(&mut self, session: Arc<Session>) {
        self.spawned += 1;
        self.by_pid.insert(session.pid, Arc::clone(&session));
        self.by_id.insert(session.id, session);
    }

    /// The session whose process is `pid`, forgetting the pid (it was reaped).
    pub fn take_pid(&mut self, pid: u32) -> Option<Arc<Session>> {
        self.by_pid.remove(&pid)
    }
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions {
            table: Mutex::new(Table::default()),
            children: Condvar::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    pub fn get(&self, id: u32) -> Option<Arc<Session>> {
        self.lock().by_id.get(&id).cloned()
    }

    /// Pids of the sessions whose process has not been reaped.
    pub fn running_pids(&self) -> Vec<u32> {
        self.lock().by_pid.keys().copied().collect()
    }

    /// Wakes the reaper after a process was spawned.
    pub fn notify_spawned(&self) {
        self.children.notify_all();
    }

    /// How many processes were spawned so far.
    pub fn spawn_count(&self) -> u64 {
        self.lock().spawned
    }

    /// Blocks the reaper until a process is spawned after `seen` was read (or
    /// until `timeout`, which covers children we did not spawn ourselves).
    pub fn wait_for_children(&self, seen: u64, timeout: Duration) {
        let table = self.lock();
        let _ = self
            .children
            .wait_timeout_while(table, timeout, |t| t.spawned == seen);
    }

    /// Sends `Exit` for a complete session and forgets it.
    pub fn complete(&self, session: &Session, writer: &Writer) {
        // why: remove before sending so the host may reuse the id as soon as it sees Exit.
        self.lock().by_id.remove(&session.id);
        writer.send_or_log(&Frame::json(Kind::Exit, session.id, &session.status()));
    }
}
