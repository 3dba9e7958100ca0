//! PID 1 reaps every zombie: one thread waits for any child; the process of a
//! session completes that session, orphans reparented to us are reaped silently.

use std::sync::Arc;
use std::time::Duration;

use hearth_proto::ExitStatus;

use crate::channel::Writer;
use crate::session::Sessions;

/// Starts the reaper thread.
pub fn spawn_reaper(sessions: Arc<Sessions>, writer: Arc<Writer>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            reap_once(&sessions, &writer);
        })
        .map(|_| ())
}

fn exit_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    }
}

fn reap_once(sessions: &Sessions, writer: &Writer) {
    // why: wait *without reaping* first (WNOWAIT), then reap under the table lock,
    // so a process being spawned (table locked) is registered before it can be
    // reaped, and std's own wait() after a failed exec still finds its child.
    let seen = sessions.spawn_count();
    // SAFETY: siginfo_t is plain data; zeroed is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid siginfo_t that lives across the call.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc < 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            sessions.wait_for_children(seen, Duration::from_secs(1));
        }
        return;
    }

    let mut complete = Vec::new();
    {
        let mut table = sessions.lock();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: `status` is a valid c_int that lives across the call.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(session) = table.take_pid(pid as u32) {
                if session.set_exited(exit_status(status)) {
                    complete.push(session);
                }
            }
        }
    }
    for session in complete {
        sessions.complete(&session, writer);
    }
}
