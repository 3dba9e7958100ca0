//! `DIR/vm.json`: what a restarted daemon needs to find, check and adopt a
//! running VM, and what `destroy` removes. Written atomically (temp + rename).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Accel;
use crate::error::VmmError;
use crate::process::{liveness, Liveness};

/// File name of the record inside a VM directory.
pub const RECORD_FILE: &str = "vm.json";
/// Format version of [`VmRecord`]; bumped on incompatible changes.
pub const RECORD_VERSION: u32 = 1;

/// The persisted identity of one running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub version: u32,
    /// Backend that created it (`qemu`); adopt refuses a record of another backend.
    pub backend: String,
    pub id: String,
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot, /proc/PID/stat field 22).
    pub pid_start_time: u64,
    /// The VMM's control socket (QMP for QEMU).
    pub control_socket: PathBuf,
    /// The guest agent's channel.
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
    pub accel: Accel,
    pub argv: Vec<String>,
    /// Every file the backend created in the directory (vm.json aside); destroy removes them.
    pub files: Vec<PathBuf>,
}

impl VmRecord {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    pub fn load(dir: &Path) -> Result<VmRecord, VmmError> {
        let path = Self::path(dir);
        let bytes = std::fs::read(&path).map_err(|e| VmmError::BadRecord {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let rec: VmRecord = serde_json::from_slice(&bytes).map_err(|e| VmmError::BadRecord {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if rec.version != RECORD_VERSION {
            return Err(VmmError::BadRecord {
                path,
                detail: format!(
                    "version {} (this build reads {RECORD_VERSION})",
                    rec.version
                ),
            });
        }
        Ok(rec)
    }

    /// Writes the record to a temp file, fsyncs it and renames it over vm.json.
    pub fn store(&self, dir: &Path) -> Result<(), VmmError> {
        use std::io::Write;
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        let io = |op, p: &Path| {
            let p = p.to_path_buf();
            move |source| VmmError::Io {
                op,
                path: p,
                source,
            }
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| VmmError::BadRecord {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
        Ok(())
    }

    fn liveness(&self) -> Liveness {
        liveness(self.pid, self.pid_start_time)
    }
}

/// True when DIR/vm.json names a process that is alive and is the one recorded.
pub fn is_alive(dir: &Path) -> bool {
    VmRecord::load(dir)
        .map(|r| r.liveness() == Liveness::Alive)
        .unwrap_or(false)
}

/// Checks that the recorded process is alive and ours; else [`VmmError::VmGone`].
pub(crate) fn check_alive(dir: &Path, rec: &VmRecord) -> Result<(), VmmError> {
    let reason = match rec.liveness() {
        Liveness::Alive => return Ok(()),
        Liveness::Gone => "no such process".to_string(),
        Liveness::Recycled { start_time } => format!(
            "the pid now belongs to another process: start time {start_time}, recorded {}",
            rec.pid_start_time
        ),
    };
    Err(VmmError::VmGone {
        dir: dir.to_path_buf(),
        pid: rec.pid,
        reason,
    })
}

/// SIGKILLs the VMM recorded in DIR/vm.json if it still runs (pid and start
/// time must match, so a recycled pid is never hit) and waits up to `timeout`
/// for it to be gone. Used when a VM cannot be adopted (e.g. its control socket
/// is broken). Returns whether a process was killed.
pub fn kill_recorded(dir: &Path, timeout: std::time::Duration) -> Result<bool, VmmError> {
    let rec = match VmRecord::load(dir) {
        Ok(r) => r,
        Err(_) if !VmRecord::path(dir).exists() => return Ok(false),
        Err(e) => return Err(e),
    };
    if rec.liveness() != Liveness::Alive {
        return Ok(false);
    }
    let handle = crate::process::ProcessHandle::open(rec.pid, rec.pid_start_time).map_err(|e| {
        VmmError::VmGone {
            dir: dir.to_path_buf(),
            pid: rec.pid,
            reason: e.to_string(),
        }
    })?;
    let _ = handle.signal(libc::SIGKILL);
    let deadline = std::time::Instant::now() + timeout;
    while rec.liveness() == Liveness::Alive {
        if std::time::Instant::now() >= deadline {
            return Err(VmmError::StillRunning {
                id: rec.id.clone(),
                pid: rec.pid,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(true)
}

/// Removes a dead VM's sockets, overlay, logs and record, then its directory.
///
/// Refuses while the process lives. Files the VMM did not create are left, and
/// reported as [`VmmError::DirNotEmpty`]. A missing directory is already destroyed.
pub fn destroy(dir: &Path) -> Result<(), VmmError> {
    if !dir.exists() {
        return Ok(());
    }
    let record_path = VmRecord::path(dir);
    if record_path.exists() {
        let rec = VmRecord::load(dir)?;
        if rec.liveness() == Liveness::Alive {
            return Err(VmmError::StillRunning {
                id: rec.id,
                pid: rec.pid,
            });
        }
        for f in &rec.files {
            remove_file_if_exists(f)?;
        }
        remove_file_if_exists(&record_path)?;
    }
    remove_file_if_exists(&dir.join(format!(".{RECORD_FILE}.tmp")))?;
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            let leftover = std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            Err(VmmError::DirNotEmpty {
                dir: dir.to_path_buf(),
                leftover,
            })
        }
        Err(source) => Err(VmmError::Io {
            op: "remove directory",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path) -> VmRecord {
        VmRecord {
            version: RECORD_VERSION,
            backend: "qemu".into(),
            id: "t".into(),
            pid: std::process::id(),
            pid_start_time: crate::process::start_time(std::process::id()).unwrap(),
            control_socket: dir.join("qmp.sock"),
            agent_socket: dir.join("agent.sock"),
            console_log: dir.join("console.log"),
            accel: Accel::Tcg,
            argv: vec!["qemu".into()],
            files: vec![dir.join("console.log")],
        }
    }

    #[test]
    fn record_round_trips_and_names_a_live_process() {
        let d = tempfile::tempdir().unwrap();
        let r = record(d.path());
        r.store(d.path()).unwrap();
        assert_eq!(VmRecord::load(d.path()).unwrap(), r);
        assert!(is_alive(d.path()));
        assert!(!d.path().join(".vm.json.tmp").exists());
    }

    #[test]
    fn destroy_refuses_a_live_vm_and_keeps_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let mut r = record(d.path());
        r.store(d.path()).unwrap();
        assert!(matches!(
            destroy(d.path()),
            Err(VmmError::StillRunning { .. })
        ));

        r.pid_start_time += 1; // now "another process"
        r.store(d.path()).unwrap();
        std::fs::write(d.path().join("console.log"), b"x").unwrap();
        std::fs::write(d.path().join("mine.txt"), b"x").unwrap();
        let err = destroy(d.path()).unwrap_err();
        assert!(
            matches!(err, VmmError::DirNotEmpty { ref leftover, .. } if leftover.len() == 1),
            "{err}"
        );
        std::fs::remove_file(d.path().join("mine.txt")).unwrap();
        destroy(d.path()).unwrap();
        assert!(!d.path().exists());
    }
}
