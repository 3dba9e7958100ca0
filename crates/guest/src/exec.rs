//! Starting the process of an `Exec` request: find the program, resolve the user,
//! spawn it chrooted into /sysroot in its own session, register it, send `Started`
//! and start its stream threads. Failures before the process exists are reported
//! the way a shell would: a message on stderr and exit 126 or 127.

use std::path::Path;
use std::sync::Arc;

use hearth_proto::{ErrorMsg, ExecRequest, ExitStatus, Frame, Kind, Started};

use crate::boot::SYSROOT;
use crate::channel::Writer;
use crate::lookup::{find_program, LookupError};
use crate::session::{Session, Sessions};
use crate::spawn::{self, Plan};
use crate::user::{self, UserError};
use crate::{output, stdin};

/// Why an exec request produced no process.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("{0}")]
    Lookup(#[from] LookupError),
    #[error("{0}")]
    User(#[from] UserError),
    /// clone/exec or the child's setup (chroot, chdir, credentials) failed.
    #[error("{program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

impl ExecError {
    fn exit_code(&self) -> i32 {
        match self {
            ExecError::Lookup(e) => e.exit_code(),
            ExecError::Spawn { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => 127,
            _ => 126,
        }
    }
}

/// Handles one `Exec` frame for session `id`.
pub fn start(id: u32, req: ExecRequest, sessions: &Arc<Sessions>, writer: &Arc<Writer>) {
    let in_use = {
        let mut table = sessions.lock();
        let in_use = table.contains(id);
        table.note_id(id);
        in_use
    };
    if in_use {
        let message = format!("session {id} is already in use");
        writer.send_or_log(&Frame::json(Kind::Error, id, &ErrorMsg { message }));
        return;
    }
    if req.argv.is_empty() {
        let message = "exec request with an empty argv".to_string();
        writer.send_or_log(&Frame::json(Kind::Error, id, &ErrorMsg { message }));
        return;
    }
    if let Err(e) = spawn(id, &req, sessions, writer) {
        let msg = format!("hearth-guest: {e}\n");
        writer.send_or_log(&Frame::data(Kind::Stderr, id, msg.into_bytes()));
        let status = ExitStatus {
            code: Some(e.exit_code()),
            signal: None,
        };
        writer.send_or_log(&Frame::json(Kind::Exit, id, &status));
    }
}

fn read_etc(name: &str) -> String {
    std::fs::read_to_string(Path::new(SYSROOT).join("etc").join(name)).unwrap_or_default()
}

fn spawn(
    id: u32,
    req: &ExecRequest,
    sessions: &Arc<Sessions>,
    writer: &Arc<Writer>,
) -> Result<(), ExecError> {
    let argv0 = &req.argv[0];
    let path_env = req.env.iter().find_map(|e| e.strip_prefix("PATH="));
    let workdir = if req.workdir.is_empty() {
        "/"
    } else {
        req.workdir.as_str()
    };
    let program = find_program(Path::new(SYSROOT), argv0, path_env, workdir)?;
    let ident = user::resolve(&req.user, &read_etc("passwd"), &read_etc("group"))?;

    let plan = Plan {
        program: &program,
        argv: &req.argv,
        env: &req.env,
        root: SYSROOT,
        workdir,
        ident: &ident,
        stdin: req.stdin,
    };

    // why: holding the table across spawn keeps the reaper from reaping (and
    // missing) the pid before it is registered; see Sessions.
    let mut table = sessions.lock();
    let mut child = spawn::spawn(&plan).map_err(|source| ExecError::Spawn {
        program: argv0.clone(),
        source,
    })?;
    let stdin_tx = match child.stdin.take() {
        Some(pipe) => match stdin::spawn_writer(id, pipe, Arc::clone(writer)) {
            Ok(tx) => Some(tx),
            Err(e) => {
                crate::log!("session {id}: no stdin writer: {e}");
                None
            }
        },
        None => None,
    };
    let session = match Session::new(id, child.pid, stdin_tx) {
        Ok(s) => Arc::new(s),
        Err(source) => {
            // SAFETY: kill(2) takes no pointers; the child is ours and not yet reaped.
            unsafe { libc::kill(child.pid as i32, libc::SIGKILL) };
            return Err(ExecError::Spawn {
                program: argv0.clone(),
                source,
            });
        }
    };
    table.insert(Arc::clone(&session));
    drop(table);
    sessions.notify_spawned();

    writer.send_or_log(&Frame::json(
        Kind::Started,
        id,
        &Started { pid: session.pid },
    ));
    // why: the child is never waited for here; the reaper owns reaping (PID 1).
    for (kind, fd) in [(Kind::Stdout, child.stdout), (Kind::Stderr, child.stderr)] {
        let started = output::spawn_pump(
            kind,
            fd,
            Arc::clone(&session),
            Arc::clone(sessions),
            Arc::clone(writer),
        );
        if let Err(e) = started {
            crate::log!("session {id}: no {kind:?} pump: {e}");
            if session.pump_done() {
                sessions.complete(&session, writer);
            }
        }
    }
    Ok(())
}
