//! Output pumps: one thread per stdout/stderr pipe turns bytes into
//! `Stdout`/`Stderr` frames, never sending more than the session's credit window.
//!
//! A pump ends at EOF. If the process has exited but a grandchild still holds the
//! pipe open, the pump sends what was already in the pipe, keeps reading for a
//! grace period, then gives up so `Exit` is not held back forever.
//!
//! Pump threads are kept: a finished pump waits for the next pipe, and two are
//! started with the agent. why: in a VM restored from a template under TCG, creating
//! a thread runs guest code for the first time (clone, stack mmap, the runtime's
//! thread set-up) on the path to the first output byte; waking a waiting one does not.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_proto::{Frame, Kind};

use crate::channel::Writer;
use crate::session::{Session, Sessions};

/// Largest read (and so largest frame) a pump makes.
const CHUNK: usize = 64 * 1024;
/// How long output is still collected after the process exits.
const GRACE: Duration = Duration::from_secs(2);
/// Pump threads started with the agent: one exec's stdout and stderr.
const PRESTARTED: usize = 2;
/// Most pump threads kept waiting; a pump finishing beyond that ends its thread.
const MAX_IDLE: usize = 8;

/// One pipe of one session, for a pump thread.
struct Job {
    kind: Kind,
    pipe: OwnedFd,
    session: Arc<Session>,
    sessions: Arc<Sessions>,
    writer: Arc<Writer>,
}

impl Job {
    fn run(self) {
        pump(self.kind, &self.pipe, &self.session, &self.writer);
        drop(self.pipe);
        if self.session.pump_done() {
            self.sessions.complete(&self.session, &self.writer);
        }
    }
}

/// The queues of the pump threads waiting for a pipe.
static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

fn idle() -> std::sync::MutexGuard<'static, Vec<Sender<Job>>> {
    IDLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts a pump thread that runs `first` (if any), then waits for more pipes.
fn start_thread(first: Option<Job>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pump".into())
        .spawn(move || {
            if let Some(job) = first {
                job.run();
            }
            loop {
                let (tx, rx) = channel();
                {
                    let mut idle = idle();
                    if idle.len() >= MAX_IDLE {
                        return;
                    }
                    idle.push(tx);
                }
                match rx.recv() {
                    Ok(job) => job.run(),
                    Err(_) => return,
                }
            }
        })
        .map(|_| ())
}

/// Starts the pump threads that wait for the first exec's pipes.
pub fn prestart() -> std::io::Result<()> {
    for _ in 0..PRESTARTED {
        start_thread(None)?;
    }
    Ok(())
}

/// Hands one pipe to a waiting pump thread, or to a new one.
pub fn spawn_pump(
    kind: Kind,
    pipe: OwnedFd,
    session: Arc<Session>,
    sessions: Arc<Sessions>,
    writer: Arc<Writer>,
) -> std::io::Result<()> {
    let mut job = Job {
        kind,
        pipe,
        session,
        sessions,
        writer,
    };
    loop {
        let Some(tx) = idle().pop() else { break };
        // why: each queue has one job at most; a send fails only if its thread is gone.
        match tx.send(job) {
            Ok(()) => return Ok(()),
            Err(returned) => job = returned.0,
        }
    }
    start_thread(Some(job))
}

fn bytes_buffered(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to `n`, which lives across the call.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n.max(0) as usize
}

fn pump(kind: Kind, pipe: &OwnedFd, session: &Session, writer: &Writer) {
    let fd = pipe.as_raw_fd();
    let mut buf = vec![0u8; CHUNK];
    // Bytes that were in the pipe when we learned the process exited.
    let mut owed: Option<usize> = None;
    loop {
        let exited_at = session.exited_at();
        if exited_at.is_some() && owed.is_none() {
            owed = Some(bytes_buffered(fd));
        }
        let timeout_ms = match (exited_at, owed) {
            (Some(at), Some(0)) => {
                let left = GRACE.saturating_sub(at.elapsed());
                if left.is_zero() {
                    return;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            _ => -1,
        };
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: session.exited_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let nfds = if exited_at.is_none() { 2 } else { 1 };
        // SAFETY: fds is a valid array of at least `nfds` pollfd entries for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout_ms) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }

        let budget = session.reserve(CHUNK);
        // SAFETY: reads at most `budget` <= buf.len() bytes into buf, which we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), budget) };
        if n <= 0 {
            session.release(budget);
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let n = n as usize;
        session.release(budget - n);
        owed = owed.map(|o| o.saturating_sub(n));
        if let Err(e) =
            session.send_output(writer, Frame::data(kind, session.id, buf[..n].to_vec()))
        {
            crate::log!("session {}: dropping {kind:?} output: {e}", session.id);
            return;
        }
    }
}
