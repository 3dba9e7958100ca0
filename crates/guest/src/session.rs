//! One exec session: its process, its flow-control window and the bookkeeping
//! that decides when `Exit` may be sent (the process has ended *and* both output
//! pumps are done). [`Sessions`] is the table of live sessions, by id and by pid.
//!
//! Every output frame and the Exit stay in the session's replay buffer until the
//! host credits (persists) them, so a host that restarts can resume the stream
//! without a gap or a duplicate (see `hearth_proto`, "Resumable output").

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hearth_proto::{
    write_frame, ExitStatus, Frame, Kind, ProtoError, ResumedSession, INITIAL_WINDOW,
};

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
    /// Frames sent and not yet credited (stream data, then maybe the Exit).
    outbox: VecDeque<Frame>,
    /// Stream offset of the first byte kept in `outbox`.
    kept_from: u64,
    /// Stream bytes the host has credited (persisted).
    acked: u64,
    /// Stream bytes sent.
    sent: u64,
    /// The host gave the session up: output and Exit are dropped.
    forgotten: bool,
}

impl State {
    /// Drops kept frames the host has credited in full.
    fn trim(&mut self) {
        while let Some(f) = self.outbox.front() {
            let len = f.payload.len() as u64;
            let stream = matches!(f.kind, Kind::Stdout | Kind::Stderr);
            if !stream || self.kept_from + len > self.acked {
                break;
            }
            self.kept_from += len;
            self.outbox.pop_front();
        }
    }
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
                outbox: VecDeque::new(),
                kept_from: 0,
                acked: 0,
                sent: 0,
                forgotten: false,
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

    /// Returns reserved bytes that were not used (window only: nothing was acknowledged).
    pub fn release(&self, n: usize) {
        if n > 0 {
            let mut st = lock(&self.state);
            st.window = st.window.saturating_add(n as u64);
            self.credit.notify_all();
        }
    }

    /// The host consumed `n` bytes (a Credit frame).
    pub fn add_credit(&self, n: u64) {
        let mut st = lock(&self.state);
        st.window = st.window.saturating_add(n);
        st.acked = st.acked.saturating_add(n).min(st.sent);
        st.trim();
        self.credit.notify_all();
    }

    /// Records an output frame in the replay buffer and sends it, under the
    /// port lock so a resume replays it exactly once. Dropped once forgotten.
    pub fn send_output(&self, writer: &Writer, frame: Frame) -> Result<(), ProtoError> {
        let mut port = writer.lock();
        // why: counted and kept before it is written, both under the port
        // lock: a resume (which takes the port lock) sees the frame kept
        // exactly when it was written; and the host's credit for it, which
        // the reader thread applies without the port lock, can come back
        // before this thread would get the state again: counted after the
        // write, that credit was cut at `sent` (so `acked` fell behind for
        // good) while the window took all of it, and the next resume gave
        // the difference again (a window one frame too large per such race;
        // the host then refused the guest's output for breaking flow control).
        let bytes = {
            let mut st = lock(&self.state);
            if st.forgotten {
                return Ok(());
            }
            let bytes = frame.encode();
            st.sent += frame.payload.len() as u64;
            st.outbox.push_back(frame);
            bytes
        };
        std::io::Write::write_all(&mut *port, &bytes)?;
        Ok(())
    }

    /// A host resumes this session holding `persisted` bytes: what it already
    /// has is dropped (and credited), the rest (and the Exit) is returned for replay.
    pub fn resume(&self, persisted: u64) -> (ResumedSession, Vec<Frame>) {
        let mut st = lock(&self.state);
        let acked = persisted.max(st.acked).min(st.sent);
        let gained = acked - st.acked;
        st.window = st.window.saturating_add(gained);
        st.acked = acked;
        st.trim();
        let mut offset = st.kept_from;
        let mut replay = Vec::with_capacity(st.outbox.len());
        for f in &st.outbox {
            if !matches!(f.kind, Kind::Stdout | Kind::Stderr) {
                replay.push(f.clone());
                continue;
            }
            let len = f.payload.len() as u64;
            let skip = acked.saturating_sub(offset).min(len) as usize;
            if skip < f.payload.len() {
                replay.push(Frame::data(f.kind, f.id, f.payload[skip..].to_vec()));
            }
            offset += len;
        }
        self.credit.notify_all();
        let info = ResumedSession {
            id: self.id,
            replay_from: acked,
            sent: st.sent,
            exited: st.status.is_some(),
        };
        (info, replay)
    }

    /// The host gave the session up (a restarted host does not serve it): its
    /// process group is killed, its output and Exit are dropped from now on.
    pub fn forget(&self) {
        let mut st = lock(&self.state);
        st.forgotten = true;
        st.outbox.clear();
        // why: pumps blocked on credit must wake up to drain and drop the pipes.
        st.window = u64::MAX / 2;
        if st.status.is_none() {
            // SAFETY: kill(2) takes no pointers; the process leads its own process
            // group and is not reaped yet (status is None), so the pgid is ours.
            unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
        }
        self.credit.notify_all();
    }

    /// Stream bytes sent so far.
    pub fn sent(&self) -> u64 {
        lock(&self.state).sent
    }

    /// Whether the process has ended (its pid may be reused since).
    pub fn has_exited(&self) -> bool {
        lock(&self.state).status.is_some()
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
    /// Highest session id the host has used.
    max_id: u32,
}

impl Table {
    pub fn contains(&self, id: u32) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn get(&self, id: u32) -> Option<&Arc<Session>> {
        self.by_id.get(&id)
    }

    /// Notes that the host used session `id`.
    pub fn note_id(&mut self, id: u32) {
        self.max_id = self.max_id.max(id);
    }

    /// The id a new session must have at least.
    pub fn next_id(&self) -> u32 {
        self.max_id.saturating_add(1)
    }

    /// Every session still known (running, or ended with its Exit not acknowledged).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.by_id.values().cloned().collect()
    }

    /// Forgets session `id` (its Exit was acknowledged, or the host gave it up).
    pub fn remove(&mut self, id: u32) -> Option<Arc<Session>> {
        self.by_id.remove(&id)
    }

    pub fn insert(&mut self, session: Arc<Session>) {
        self.note_id(session.id);
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

    /// Sends `Exit` for a complete session; it stays in the replay buffer (and
    /// the session in the table) until the host acknowledges it.
    pub fn complete(&self, session: &Session, writer: &Writer) {
        let frame = Frame::json(Kind::Exit, session.id, &session.status());
        let mut port = writer.lock();
        if lock(&session.state).forgotten {
            return;
        }
        if let Err(e) = write_frame(&mut *port, &frame) {
            crate::log!("sending Exit for session {}: {e}", session.id);
        }
        lock(&session.state).outbox.push_back(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(frames: &[Frame]) -> Vec<(Kind, Vec<u8>)> {
        frames.iter().map(|f| (f.kind, f.payload.clone())).collect()
    }

    /// The host's credit for a frame can come back (on the reader thread)
    /// before the sending thread is done with it: the frame must be counted
    /// as sent by then, else the credit is cut at `sent`, `acked` falls
    /// behind for good and the next resume hands the difference out again
    /// as window (a guest one frame over its window per such race, refused
    /// by the host after a migration's takeover).
    #[test]
    fn a_credit_that_overtakes_its_frame_is_counted_whole() {
        use std::io::Read;
        let (mut host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = Writer::new(std::fs::File::from(std::os::fd::OwnedFd::from(guest)));
        let s = std::sync::Arc::new(Session::new(1, u32::MAX, None).unwrap());
        // why: frames larger than the socket's buffer, so the host reads the
        // last bytes while the sender is still in its write: its credit then
        // races the sender's return.
        const FRAMES: usize = 300;
        const LEN: usize = 256 * 1024;
        let credit = {
            let s = s.clone();
            std::thread::spawn(move || {
                // The host credits every frame the moment it has read it.
                for _ in 0..FRAMES {
                    let mut head = [0u8; 4];
                    host.read_exact(&mut head).unwrap();
                    let mut body = vec![0u8; u32::from_le_bytes(head) as usize];
                    host.read_exact(&mut body).unwrap();
                    s.add_credit(body.len() as u64 - 5);
                }
            })
        };
        for _ in 0..FRAMES {
            s.send_output(&writer, Frame::data(Kind::Stdout, 1, vec![b'x'; LEN]))
                .unwrap();
        }
        credit.join().unwrap();
        let st = lock(&s.state);
        assert_eq!(st.acked, st.sent, "credit for frames sent was cut");
        assert_eq!(st.window, u64::from(INITIAL_WINDOW) + st.sent);
    }

    #[test]
    fn resume_replays_exactly_what_the_host_lacks_then_the_exit() {
        let writer = Writer::new(std::fs::File::create("/dev/null").unwrap());
        let sessions = Sessions::new();
        let s = Session::new(1, u32::MAX, None).unwrap();
        for chunk in [&b"ab"[..], b"cde", b"f"] {
            // Reserving more than is read and releasing the rest acknowledges nothing.
            let got = s.reserve(100);
            s.release(got - chunk.len());
            s.send_output(&writer, Frame::data(Kind::Stdout, 1, chunk.to_vec()))
                .unwrap();
        }
        s.add_credit(2);
        // The host persisted 4 bytes but credited only 2 before it died.
        let (info, replay) = s.resume(4);
        assert_eq!((info.replay_from, info.sent, info.exited), (4, 6, false));
        assert_eq!(
            payloads(&replay),
            vec![(Kind::Stdout, b"e".to_vec()), (Kind::Stdout, b"f".to_vec())]
        );
        assert_eq!(lock(&s.state).window, u64::from(INITIAL_WINDOW) - 2);

        assert!(!s.pump_done() && !s.pump_done());
        assert!(s.set_exited(ExitStatus {
            code: Some(7),
            signal: None
        }));
        sessions.complete(&s, &writer);
        let (info, replay) = s.resume(6);
        assert!(info.exited);
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].kind, Kind::Exit);
        // A host that claims more than was sent gets nothing twice, and no gap.
        assert_eq!(s.resume(100).0.replay_from, 6);
    }
}
