//! After a hearthd restart: take over the sandboxes whose VMs still run.
//!
//! A running sandbox's VM is adopted by its recorded pid and process start time
//! (`hearth_vmm::Vmm::adopt`); the guest channel is resumed (`GuestConn::resume`)
//! from the output offset the log on disk holds, so the guest replays exactly
//! what the log lacks, including an Exit that happened while hearthd was down.
//! Then the sandbox's lifecycle task runs again as if it had never stopped.
//! A VM that is gone is reported lost with the reason; one that cannot be
//! taken over is killed (by pid and start time) and reported lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_api::stream::{Decoder, Record};
use hearth_api::SandboxStatus;
use hearth_proto::ResumeSession;
use hearth_vmm::{Vm, Vmm, VmmError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::guest_conn::GuestConn;
use crate::sandbox::{lock, now_ms, Agent, Entry};

/// `workload.json` in a sandbox dir: how to find the main workload in the guest.
const WORKLOAD_FILE: &str = "workload.json";
const WORKLOAD_VERSION: u32 = 1;
/// Bound on connecting to a running VM's agent socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a running guest answering a resume (TCG guests are slow).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// What the output log's size-limit notice starts with (see `OutputLog::append`).
const LIMIT_NOTICE: &[u8] = b"\nhearth: output log limit of ";

/// The main workload's guest session, saved when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkloadRecord {
    pub version: u32,
    /// Guest session id of the main workload.
    pub session: u32,
    /// It was started with stdin open.
    pub stdin: bool,
}

impl WorkloadRecord {
    pub(crate) fn new(session: u32, stdin: bool) -> WorkloadRecord {
        WorkloadRecord {
            version: WORKLOAD_VERSION,
            session,
            stdin,
        }
    }

    /// Writes `dir/workload.json` atomically.
    pub(crate) fn store(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = dir.join(format!(".{WORKLOAD_FILE}.tmp"));
        let data = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(WORKLOAD_FILE))
    }

    fn load(dir: &Path) -> Result<WorkloadRecord, String> {
        let path = dir.join(WORKLOAD_FILE);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let rec: WorkloadRecord = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is malformed: {e}", path.display()))?;
        if rec.version != WORKLOAD_VERSION {
            return Err(format!(
                "{} has version {} (this build reads {WORKLOAD_VERSION})",
                path.display(),
                rec.version
            ));
        }
        Ok(rec)
    }
}

/// Where the output log leaves off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogEnd {
    /// Workload output bytes (stdout and stderr payloads) the log holds.
    pub stream_bytes: u64,
    /// The size limit was reached: later output is discarded anyway.
    pub truncated: bool,
}

/// Reads the output log, cuts off a record torn by a crash mid-write, and
/// says how much workload output it holds. A missing log holds nothing.
pub(crate) fn log_end(path: &Path) -> std::io::Result<LogEnd> {
    use std::io::Read;
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LogEnd {
                stream_bytes: 0,
                truncated: false,
            })
        }
        Err(e) => return Err(e),
    };
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 256 * 1024];
    let (mut total, mut stream_bytes, mut truncated) = (0u64, 0u64, false);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        dec.push(&buf[..n]);
        loop {
            match dec.next_record() {
                Ok(Some(Record::Stdout(b))) => stream_bytes += b.len() as u64,
                Ok(Some(Record::Stderr(b))) => {
                    if b.starts_with(LIMIT_NOTICE) {
                        truncated = true;
                    } else {
                        stream_bytes += b.len() as u64;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "{} is corrupt: {e}",
                        path.display()
                    )))
                }
            }
        }
    }
    let whole = total - dec.pending() as u64;
    if whole < total {
        tracing::warn!(log = %path.display(), torn = total - whole, "cutting a torn record off the output log");
        f.set_len(whole)?;
    }
    Ok(LogEnd {
        stream_bytes,
        truncated,
    })
}

/// Why a sandbox that was running could not be taken over.
enum NotAdopted {
    /// The VM ended while hearthd was down.
    Gone(String),
    /// The VM runs but cannot be taken over; it must be killed.
    Broken(String),
}

impl Agent {
    /// Takes over, or settles, a sandbox a previous hearthd left non-terminal.
    /// True when it runs on under this hearthd.
    pub(crate) async fn recover_sandbox(&self, entry: &Arc<Entry>) -> bool {
        let rec = entry.snapshot();
        let vm_dir = entry.dir.join("vm");
        let reason = if rec.status == SandboxStatus::Running {
            match self.readopt(entry, &vm_dir).await {
                Ok(()) => {
                    tracing::info!(sandbox = %rec.id, "re-adopted the running VM after a restart");
                    return true;
                }
                Err(NotAdopted::Gone(why)) => {
                    format!("its VM ended while hearthd was down ({why}); the workload's exit status is unknown")
                }
                Err(NotAdopted::Broken(why)) => {
                    format!("hearthd restarted and could not take its VM over ({why}); the VM was killed")
                }
            }
        } else {
            "hearthd stopped while the sandbox was being created; its VM was stopped".to_string()
        };
        // Never leave a VM behind: kill it by its recorded pid and start time.
        match hearth_vmm::kill_recorded(&vm_dir, Duration::from_secs(10)) {
            Ok(true) => {
                tracing::warn!(sandbox = %rec.id, "killed a VM that could not be re-adopted")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(sandbox = %rec.id, "cannot stop the VM in {}: {e}", vm_dir.display())
            }
        }
        let tail = crate::sandbox::console_tail(&vm_dir.join("console.log"));
        let _ = hearth_vmm::destroy(&vm_dir);
        tracing::warn!(sandbox = %rec.id, "lost: {reason}");
        entry.update(|r| {
            r.status = SandboxStatus::Lost;
            r.finished_ms = Some(now_ms());
            r.error = Some(format!("{reason}{tail}"));
        });
        entry.finished.send_replace(true);
        false
    }

    async fn readopt(&self, entry: &Arc<Entry>, vm_dir: &Path) -> Result<(), NotAdopted> {
        let vm: Arc<dyn Vm> = match self.inner.vmm.adopt(vm_dir).await {
            Ok(vm) => Arc::from(vm),
            Err(VmmError::VmGone { pid, reason, .. }) => {
                return Err(NotAdopted::Gone(format!("QEMU pid {pid}: {reason}")))
            }
            Err(e) if !hearth_vmm::is_alive(vm_dir) => return Err(NotAdopted::Gone(e.to_string())),
            Err(e) => return Err(NotAdopted::Broken(e.to_string())),
        };
        let broken = |m: String| NotAdopted::Broken(m);
        let workload = WorkloadRecord::load(&entry.dir).map_err(broken)?;
        let log_path: PathBuf = entry.dir.join("output.log");
        let end = log_end(&log_path)
            .map_err(|e| broken(format!("cannot read {}: {e}", log_path.display())))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, vm.connect_agent())
            .await
            .map_err(|_| {
                broken(format!(
                    "its agent socket did not accept within {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| broken(e.to_string()))?;
        let chan_fd = crate::sandbox::stream_fd(&stream);
        let persisted = if end.truncated {
            u64::MAX
        } else {
            end.stream_bytes
        };
        let want = [ResumeSession {
            id: workload.session,
            persisted,
        }];
        let (conn, resumed, mut sessions) = GuestConn::resume(stream, &want, RESUME_TIMEOUT)
            .await
            .map_err(|e| broken(format!("resuming the guest channel: {e}")))?;
        let Some(info) = resumed.sessions.iter().find(|s| s.id == workload.session) else {
            return Err(broken(format!(
                "the guest no longer knows the main workload (session {})",
                workload.session
            )));
        };
        if !end.truncated && info.replay_from != end.stream_bytes {
            // Cannot happen with a guest that keeps the protocol: credit is only
            // given for output already in the log.
            tracing::error!(
                sandbox = %entry.snapshot().id,
                log = end.stream_bytes,
                guest = info.replay_from,
                "the guest resumed the output at another offset than the log ends"
            );
        }
        tracing::info!(
            sandbox = %entry.snapshot().id,
            from = info.replay_from,
            replay = info.sent - info.replay_from,
            exited = info.exited,
            "resuming the main workload's output"
        );
        let session = sessions
            .pop()
            .ok_or_else(|| broken("no session to resume".into()))?;
        // why: set before the lifecycle task runs, so an exec that arrives first finds them.
        *lock(&entry.conn) = Some(conn.clone());
        *lock(&entry.main_input) = Some(session.input());
        *lock(&entry.main_session) = Some(session.id());
        *lock(&entry.chan_fd) = chan_fd;
        *lock(&entry.vm) = Some(vm.clone());
        entry
            .stdin_open
            .store(workload.stdin, std::sync::atomic::Ordering::Relaxed);
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        *lock(&entry.control) = Some(ctl_tx);
        let agent = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            agent
                .lifecycle_adopted(entry, vm, conn, session, ctl_rx)
                .await
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_end_counts_output_and_cuts_a_torn_record() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("output.log");
        let mut data = Record::Stdout(b"0\n1\n".to_vec()).encode();
        data.extend(Record::Stderr(b"err".to_vec()).encode());
        let whole = data.len() as u64;
        data.extend(&Record::Stdout(b"2\n3\n".to_vec()).encode()[..6]);
        std::fs::write(&p, &data).unwrap();
        let end = log_end(&p).unwrap();
        assert_eq!(
            end,
            LogEnd {
                stream_bytes: 7,
                truncated: false
            }
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), whole);
    }

    #[test]
    fn log_end_sees_the_size_limit_notice() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("output.log");
        let mut data = Record::Stdout(b"abc".to_vec()).encode();
        let mut notice = LIMIT_NOTICE.to_vec();
        notice.extend_from_slice(b"10 bytes reached");
        data.extend(Record::Stderr(notice).encode());
        std::fs::write(&p, &data).unwrap();
        assert!(log_end(&p).unwrap().truncated);
        assert_eq!(
            log_end(&d.path().join("none")).unwrap(),
            LogEnd {
                stream_bytes: 0,
                truncated: false
            }
        );
    }

    #[test]
    fn workload_record_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let w = WorkloadRecord::new(3, true);
        w.store(d.path()).unwrap();
        assert_eq!(WorkloadRecord::load(d.path()).unwrap(), w);
    }
}
