//! Starting the process of an `Exec` request: find the program, resolve the user,
//! spawn it chrooted into /sysroot in its own session, register it, send `Started`
//! and start its stream threads. Failures before the process exists are reported
//! the way a shell would: a message on stderr and exit 126 or 127.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use hearth_proto::{ErrorMsg, ExecRequest, ExitStatus, Frame, Kind, Started};

use crate::boot::SYSROOT;
use crate::channel::Writer;
use crate::lookup::{find_program, LookupError};
use crate::session::{Session, Sessions};
use crate::user::{self, Identity, UserError};
use crate::{output, stdin};

/// Why an exec request produced no process.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("{0}")]
    Lookup(#[from] LookupError),
    #[error("{0}")]
    User(#[from] UserError),
    /// fork/exec or the child's setup (chroot, chdir, credentials) failed.
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
        let msg = failure_line(&e.to_string());
        writer.send_or_log(&Frame::data(Kind::Stderr, id, msg));
        let status = ExitStatus {
            code: Some(e.exit_code()),
            signal: None,
        };
        writer.send_or_log(&Frame::json(Kind::Exit, id, &status));
    }
}

/// The stderr line reporting why nothing ran, bounded to one output frame
/// that is one console write (a huge `argv[0]` is cut, with `...`): a frame
/// split across two writes can be cut by a migration's switch-over between
/// them (docs/migration.md, "Beside QEMU's last pass").
fn failure_line(error: &str) -> Vec<u8> {
    let mut msg = format!("hearth-guest: {error}\n");
    if msg.len() > output::CHUNK {
        let mut end = output::CHUNK - "...\n".len();
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str("...\n");
    }
    msg.into_bytes()
}

fn read_etc(name: &str) -> String {
    std::fs::read_to_string(Path::new(SYSROOT).join("etc").join(name)).unwrap_or_default()
}

fn cstring(s: &str) -> Result<CString, ExecError> {
    CString::new(s).map_err(|_| ExecError::Spawn {
        program: s.to_string(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
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

    let mut cmd = Command::new(&program);
    cmd.arg0(argv0).args(&req.argv[1..]).env_clear();
    for entry in &req.env {
        if let Some((key, value)) = entry.split_once('=') {
            cmd.env(key, value);
        }
    }
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let setup = ChildSetup {
        root: cstring(SYSROOT)?,
        workdir: cstring(workdir)?,
        ident,
    };
    // SAFETY: the closure runs between fork and exec; it only makes async-signal-safe
    // syscalls on data prepared before the fork, and allocates nothing.
    unsafe { cmd.pre_exec(move || setup.apply()) };

    // why: holding the table across spawn keeps the reaper from reaping (and
    // missing) the pid before it is registered; see Sessions.
    let mut table = sessions.lock();
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
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
    let session = match Session::new(id, child.id(), stdin_tx) {
        Ok(s) => Arc::new(s),
        Err(source) => {
            // SAFETY: kill(2) takes no pointers; the child is ours and not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
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
    // why: std's Child is dropped without wait(); the reaper owns reaping (PID 1).
    let pipes = [
        (Kind::Stdout, child.stdout.take().map(OwnedFd::from)),
        (Kind::Stderr, child.stderr.take().map(OwnedFd::from)),
    ];
    for (kind, pipe) in pipes {
        let started = match pipe {
            Some(fd) => output::spawn_pump(
                kind,
                fd,
                Arc::clone(&session),
                Arc::clone(sessions),
                Arc::clone(writer),
            ),
            None => Err(std::io::ErrorKind::NotFound.into()),
        };
        if let Err(e) = started {
            crate::log!("session {id}: no {kind:?} pump: {e}");
            if session.pump_done() {
                sessions.complete(&session, writer);
            }
        }
    }
    Ok(())
}

/// What the child does between fork and exec, prepared in the parent.
struct ChildSetup {
    root: CString,
    workdir: CString,
    ident: Identity,
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl ChildSetup {
    fn apply(&self) -> std::io::Result<()> {
        // SAFETY: each call below is a plain syscall on pointers to data owned by
        // `self` (valid NUL-terminated strings, a live gid slice) for the call's duration.
        unsafe {
            check(libc::setsid())?;
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(self.workdir.as_ptr()))?;
            check(libc::setgroups(
                self.ident.groups.len(),
                self.ident.groups.as_ptr(),
            ))?;
            check(libc::setgid(self.ident.gid))?;
            check(libc::setuid(self.ident.uid))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// review14 F4: the line for a command not found with a huge `argv[0]`
    /// is one output frame of at most one console write.
    #[test]
    fn a_failure_line_is_at_most_one_console_write() {
        let short = failure_line("nope: command not found");
        assert_eq!(short, b"hearth-guest: nope: command not found\n");
        let huge = format!("{}: command not found", "é".repeat(100_000));
        let line = failure_line(&huge);
        let frame = Frame::data(Kind::Stderr, 1, line.clone()).encode();
        assert!(
            frame.len() <= hearth_proto::MAX_GUEST_WRITE,
            "{}",
            frame.len()
        );
        let text = String::from_utf8(line).expect("cut at a character boundary");
        assert!(text.starts_with("hearth-guest: éé") && text.ends_with("é...\n"));
    }
}
