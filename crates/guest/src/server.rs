//! The agent loop: send `Hello`, then read frames from the host and dispatch them.
//! The host may disconnect and reconnect (agent restart, snapshot restore); the
//! loop keeps reading, it never ends.

use std::fs::{File, OpenOptions};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::{
    read_frame, Credit, Empty, ErrorMsg, ExecRequest, Frame, Frozen, Hello, Kind, ProtoError,
    Restored, SignalRequest, PROTOCOL_VERSION,
};

use crate::channel::Writer;
use crate::session::Sessions;
use crate::{exec, log, power, reaper, restore};

/// How long to wait before reading again when the host is not connected.
const RECONNECT_POLL: Duration = Duration::from_millis(50);

/// The agent could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The port could not be opened.
    #[error("cannot open channel {path}: {source}")]
    Open { path: String, source: io::Error },
    /// A helper thread could not be started.
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, io::Error),
    /// Hello could not be sent.
    #[error("cannot send Hello: {0}")]
    Hello(ProtoError),
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; zeroed is a valid value for uname to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid utsname that lives across the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Serves the host on `port` forever.
pub fn serve(port: &str) -> Result<std::convert::Infallible, ServeError> {
    let open_err = |source| ServeError::Open {
        path: port.to_string(),
        source,
    };
    let mut reader: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
        .map_err(open_err)?;
    let writer = Arc::new(Writer::new(reader.try_clone().map_err(open_err)?));
    let sessions = Arc::new(Sessions::new());
    reaper::spawn_reaper(Arc::clone(&sessions), Arc::clone(&writer))
        .map_err(|e| ServeError::Thread("reaper", e))?;

    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: kernel_release(),
    };
    writer
        .send(&Frame::json(Kind::Hello, 0, &hello))
        .map_err(ServeError::Hello)?;

    loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => dispatch(frame, &sessions, &writer),
            // why: virtio-serial reads return EOF at once while the host side is
            // closed and there is no event for "reopened", so poll gently.
            Ok(None) | Err(ProtoError::Io(_)) => std::thread::sleep(RECONNECT_POLL),
            Err(e) => log!("bad frame from host: {e}"),
        }
    }
}

fn error(writer: &Writer, id: u32, message: String) {
    writer.send_or_log(&Frame::json(Kind::Error, id, &ErrorMsg { message }));
}

fn dispatch(frame: Frame, sessions: &Arc<Sessions>, writer: &Arc<Writer>) {
    let id = frame.id;
    match frame.kind {
        Kind::Exec => match frame.parse::<ExecRequest>() {
            Ok(req) => exec::start(id, req, sessions, writer),
            Err(e) => error(writer, id, e.to_string()),
        },
        Kind::Stdin => {
            if let Some(session) = sessions.get(id) {
                session.send_stdin(frame.payload);
            }
        }
        Kind::Credit => match frame.parse::<Credit>() {
            Ok(c) => {
                if let Some(session) = sessions.get(id) {
                    session.add_credit(u64::from(c.bytes));
                }
            }
            Err(e) => error(writer, id, e.to_string()),
        },
        Kind::Signal => match frame.parse::<SignalRequest>() {
            Ok(req) => {
                if let Some(session) = sessions.get(id) {
                    // SAFETY: kill(2) takes no pointers. The process leads its own
                    // process group (setsid), so -pid reaches its children too.
                    unsafe { libc::kill(-(session.pid as i32), req.signal) };
                }
            }
            Err(e) => error(writer, id, e.to_string()),
        },
        Kind::Ping => writer.send_or_log(&Frame::json(Kind::Pong, id, &Empty {})),
        // why: applied on this (the only reading) thread, so nothing the host sends
        // after it can run with the snapshot's stale RNG, clock or hostname.
        Kind::Restored => match frame.parse::<Restored>() {
            Ok(msg) => {
                let ack = restore::apply(&msg);
                writer.send_or_log(&Frame::json(Kind::RestoredAck, id, &ack));
            }
            Err(e) => error(writer, id, e.to_string()),
        },
        Kind::Freeze => {
            let n = restore::freeze(sessions);
            writer.send_or_log(&Frame::json(Kind::Frozen, id, &Frozen { sessions: n }));
        }
        Kind::Thaw => restore::thaw(),
        Kind::Shutdown => power::shutdown(),
        other => error(writer, id, format!("unexpected {other:?} frame from host")),
    }
}
