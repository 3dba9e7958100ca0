//! The VMM process as the host sees it: identity (pid + start time, so a
//! recycled pid is never mistaken for our VM), signals through a pidfd (no
//! pid-reuse race), and an exit watcher that works both for a child we spawned
//! (real exit status) and for a process adopted after a daemon restart.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// How a VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// It exited with this code (QEMU: 0 after `quit` or a guest reboot).
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// It is gone, but it was not our child (adopted), so its status is unknowable.
    Gone,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Exited(c) => write!(f, "exit code {c}"),
            VmExit::Signaled(s) => write!(f, "killed by signal {s}"),
            VmExit::Gone => f.write_str("gone, status unknown (adopted process)"),
        }
    }
}

impl From<std::process::ExitStatus> for VmExit {
    fn from(st: std::process::ExitStatus) -> VmExit {
        match (st.code(), st.signal()) {
            (Some(c), _) => VmExit::Exited(c),
            (None, Some(s)) => VmExit::Signaled(s),
            (None, None) => VmExit::Gone,
        }
    }
}

/// What /proc says about a recorded (pid, start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Alive,
    /// No such process, or a zombie waiting to be reaped.
    Gone,
    /// The pid exists but belongs to a process started at another time.
    Recycled {
        start_time: u64,
    },
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot) and the state letter.
fn stat(pid: u32) -> io::Result<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // why: the command name (field 2) may contain spaces and ')'; fields after the last ')' are plain.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short /proc stat");
    let state = fields
        .first()
        .and_then(|f| f.chars().next())
        .ok_or_else(bad)?;
    // fields[0] is field 3 (state), so field 22 is fields[19].
    let start = fields.get(19).ok_or_else(bad)?;
    let start = start
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad start time"))?;
    Ok((state, start))
}

/// The start time of `pid`, as recorded in vm.json.
pub(crate) fn start_time(pid: u32) -> io::Result<u64> {
    stat(pid).map(|(_, t)| t)
}

pub(crate) fn liveness(pid: u32, recorded_start: u64) -> Liveness {
    match stat(pid) {
        Err(_) => Liveness::Gone,
        Ok(('Z' | 'X', _)) => Liveness::Gone,
        Ok((_, t)) if t != recorded_start => Liveness::Recycled { start_time: t },
        Ok(_) => Liveness::Alive,
    }
}

/// A handle on one process that cannot be confused with a later process of the same pid.
#[derive(Debug)]
pub(crate) struct ProcessHandle {
    pid: u32,
    start_time: u64,
    /// None where the kernel lacks pidfd_open (< 5.3); then signals re-check the start time.
    pidfd: Option<OwnedFd>,
}

impl ProcessHandle {
    /// Opens a handle on `pid` and verifies it is the process started at `start_time`.
    pub(crate) fn open(pid: u32, start_time: u64) -> io::Result<ProcessHandle> {
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) => return Err(e),
        };
        // why: check after opening, so the pidfd provably refers to the recorded process.
        match liveness(pid, start_time) {
            Liveness::Alive => Ok(ProcessHandle {
                pid,
                start_time,
                pidfd,
            }),
            _ => Err(io::Error::from_raw_os_error(libc::ESRCH)),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `sig`; a process that is already gone is not an error.
    pub(crate) fn signal(&self, sig: i32) -> io::Result<()> {
        let rc = match &self.pidfd {
            // SAFETY: pidfd_send_signal with a valid pidfd we own, no siginfo, flags 0.
            Some(fd) => unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            },
            None => {
                if liveness(self.pid, self.start_time) != Liveness::Alive {
                    return Ok(());
                }
                // SAFETY: plain kill(2); the start time was re-checked just above.
                i64::from(unsafe { libc::kill(self.pid as libc::pid_t, sig) })
            }
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(err)
    }

    /// Watches an adopted (non-child) process: resolves to [`VmExit::Gone`] when it ends.
    pub(crate) fn watch_adopted(&self) -> io::Result<ExitWatch> {
        let (tx, rx) = watch::channel(None);
        let task = match &self.pidfd {
            Some(fd) => {
                let fd = fd.try_clone()?;
                // SAFETY: the AsyncFd owns this OwnedFd, so the fd stays open and refers
                // to the same pidfd for as long as it is registered.
                let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
                tokio::spawn(async move {
                    // why: a pidfd polls readable once the process has exited.
                    let _ = fd.readable().await;
                    let _ = tx.send(Some(VmExit::Gone));
                })
            }
            None => {
                let (pid, start) = (self.pid, self.start_time);
                tokio::spawn(async move {
                    // why: no pidfd on this kernel; /proc polling is the only non-child signal.
                    while liveness(pid, start) == Liveness::Alive {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = tx.send(Some(VmExit::Gone));
                })
            }
        };
        Ok(ExitWatch {
            rx,
            task: task.abort_handle(),
        })
    }
}

/// Watches a child we spawned: resolves to its real exit status.
pub(crate) fn watch_child(mut child: tokio::process::Child) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let exit = match child.wait().await {
            Ok(st) => VmExit::from(st),
            Err(_) => VmExit::Gone,
        };
        let _ = tx.send(Some(exit));
    });
    ExitWatch {
        rx,
        task: task.abort_handle(),
    }
}

/// The exit of one VMM process, observable by any number of waiters.
#[derive(Debug)]
pub(crate) struct ExitWatch {
    rx: watch::Receiver<Option<VmExit>>,
    task: AbortHandle,
}

impl ExitWatch {
    /// The exit, if it already happened.
    pub(crate) fn exited(&self) -> Option<VmExit> {
        *self.rx.borrow()
    }

    /// Resolves when the process is gone.
    pub(crate) async fn wait(&self) -> VmExit {
        let mut rx = self.rx.clone();
        let exit = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.unwrap_or(VmExit::Gone),
            // why: the watcher task only ends after sending, or when this ExitWatch is dropped.
            Err(_) => VmExit::Gone,
        };
        exit
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        // why: a dropped VM handle must not keep tasks alive; a child's tokio::process::Child
        // is then reaped by tokio's orphan queue, and the VM itself keeps running.
        self.task.abort();
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_recycled() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert_eq!(liveness(me, t), Liveness::Alive);
        assert_eq!(liveness(me, t + 1), Liveness::Recycled { start_time: t });
        assert_eq!(liveness(u32::MAX - 1, t), Liveness::Gone);
    }
}
