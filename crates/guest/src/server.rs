//! The agent loop: send `Hello`, then read frames from the host and dispatch them.
//! The host may disconnect and reconnect (agent restart, snapshot restore); the
//! loop keeps reading, it never ends.

use std::fs::{File, OpenOptions};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::{
    read_frame, write_frame, Credit, Empty, ErrorMsg, ExecRequest, Frame, Frozen, Hello, Kind,
    ProtoError, Restored, Resume, Resumed, SessionSent, SignalRequest, PROTOCOL_VERSION,
    RESTORE_GUARD, SENT_FIRST,
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
        agent_version: format!("{}{RESTORE_GUARD}{SENT_FIRST}", env!("CARGO_PKG_VERSION")),
        kernel_release: kernel_release(),
    };
    writer
        .send(&Frame::json(Kind::Hello, 0, &hello))
        .map_err(ServeError::Hello)?;

    loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => dispatch(frame, &sessions, &writer, &hello),
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

/// A host (re)connected: answer with its nonce and [`Resumed`], replay what it
/// has not persisted of the sessions it names, kill the others. Holding the port
/// lock throughout keeps every newer frame behind the replay.
fn resume(msg: &Resume, sessions: &Sessions, writer: &Writer, hello: &Hello) {
    let mut port = writer.lock();
    let mut answer = Resumed {
        hello: hello.clone(),
        next_session: 0,
        sessions: Vec::new(),
    };
    let mut replay = Vec::new();
    {
        let mut table = sessions.lock();
        for session in table.all() {
            match msg.sessions.iter().find(|s| s.id == session.id) {
                Some(wanted) => {
                    let (info, frames) = session.resume(wanted.persisted);
                    answer.sessions.push(info);
                    replay.extend(frames);
                }
                None => {
                    log!("host gave up session {}; killing it", session.id);
                    session.forget();
                    table.remove(session.id);
                }
            }
        }
        answer.next_session = table.next_id();
    }
    let mut out = msg.nonce.clone();
    out.extend_from_slice(&Frame::json(Kind::Resumed, 0, &answer).encode());
    let sent = std::io::Write::write_all(&mut *port, &out)
        .map_err(ProtoError::from)
        .and_then(|()| replay.iter().try_for_each(|f| write_frame(&mut *port, f)));
    match sent {
        Ok(()) => log!(
            "host resumed {} session(s), replayed {} frame(s)",
            answer.sessions.len(),
            replay.len()
        ),
        Err(e) => log!("answering the host's resume: {e}"),
    }
}

fn dispatch(frame: Frame, sessions: &Arc<Sessions>, writer: &Arc<Writer>, hello: &Hello) {
    let id = frame.id;
    match frame.kind {
        Kind::Exec => match frame.parse::<ExecRequest>() {
            // why: the host may queue an exec right behind `Restored`; it must not
            // run on the snapshot's RNG state or network when those were not renewed.
            Ok(_) if restore::exec_refusal().is_some() => {
                let why = restore::exec_refusal().unwrap_or_default();
                error(writer, id, format!("{why}; not starting processes"))
            }
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
                // why: an ended session waits for its ExitAck; its pid may be reused.
                if let Some(session) = sessions.get(id).filter(|s| !s.has_exited()) {
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
        // An unreadable one is a refusal, acknowledged at once (the host may
        // have queued an exec behind it and waits for this ack).
        Kind::Restored => {
            let mut ack = match frame.parse::<Restored>() {
                Ok(msg) => restore::apply(&msg),
                Err(e) => restore::unreadable(&e.to_string()),
            };
            // why: the offsets are read and the ack written under the port
            // lock, so no output frame falls between them (see SessionSent).
            let mut port = writer.lock();
            ack.sessions = sessions
                .lock()
                .all()
                .iter()
                .map(|s| SessionSent {
                    id: s.id,
                    sent: s.sent(),
                })
                .collect();
            if let Err(e) = write_frame(&mut *port, &Frame::json(Kind::RestoredAck, id, &ack)) {
                log!("sending RestoredAck: {e}");
            }
        }
        Kind::Resume => match frame.parse::<Resume>() {
            Ok(msg) => {
                resume(&msg, sessions, writer, hello);
                // why: a host that took over never sends the Thaw of a freeze
                // its predecessor began.
                restore::thaw_unless_refused();
            }
            Err(e) => error(writer, id, e.to_string()),
        },
        Kind::ExitAck => {
            let mut table = sessions.lock();
            if table.get(id).is_some_and(|s| s.has_exited()) {
                table.remove(id);
            }
        }
        Kind::Freeze => {
            let n = restore::freeze(sessions);
            writer.send_or_log(&Frame::json(Kind::Frozen, id, &Frozen { sessions: n }));
        }
        Kind::Thaw => restore::thaw(),
        Kind::Shutdown => power::shutdown(),
        other => error(writer, id, format!("unexpected {other:?} frame from host")),
    }
}
