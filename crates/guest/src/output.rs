//! Output pumps: one thread per stdout/stderr pipe turns bytes into
//! `Stdout`/`Stderr` frames, never sending more than the session's credit window.
//!
//! A pump ends at EOF. If the process has exited but a grandchild still holds the
//! pipe open, the pump sends what was already in the pipe, keeps reading for a
//! grace period, then gives up so `Exit` is not held back forever.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::{Frame, Kind};

use crate::channel::Writer;
use crate::session::{Session, Sessions};

/// Largest read a pump makes: its frame, encoded, is one `write()` the
/// console driver takes whole ([`hearth_proto::MAX_GUEST_WRITE`]).
pub(crate) const CHUNK: usize = hearth_proto::MAX_GUEST_WRITE - hearth_proto::FRAME_OVERHEAD;
/// How long output is still collected after the process exits.
const GRACE: Duration = Duration::from_secs(2);

/// Starts the pump thread for one pipe.
pub fn spawn_pump(
    kind: Kind,
    pipe: OwnedFd,
    session: Arc<Session>,
    sessions: Arc<Sessions>,
    writer: Arc<Writer>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("pump-{}-{:?}", session.id, kind))
        .spawn(move || {
            pump(kind, &pipe, &session, &writer);
            drop(pipe);
            if session.pump_done() {
                sessions.complete(&session, &writer);
            }
        })
        .map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_chunk_is_one_console_write() {
        let frame = Frame::data(Kind::Stdout, u32::MAX, vec![0; CHUNK]).encode();
        assert_eq!(frame.len(), hearth_proto::MAX_GUEST_WRITE);
    }
}
