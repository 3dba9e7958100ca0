//! Which agent on this host uses which address pool: one file per agent under
//! [`REGISTRY_DIR`], named after its pool and holding its pid and state dir.
//! An agent refuses to start with a pool overlapping the pool of another live
//! agent (its sandboxes' routes and host map entries would collide); entries
//! of dead agents, or of an earlier run of the same state dir, are reclaimed.
//!
//! Liveness is a lock, not a pid: an agent holds an exclusive `flock` on its
//! file for as long as it runs (the descriptor lives in [`Registration`], is
//! close-on-exec so QEMU children do not inherit it, and the kernel drops the
//! lock when the agent dies, however it dies). Another agent tests it with a
//! shared non-blocking `flock`: refused means live. The pid and state dir in
//! the file only name the owner in error messages; a reused pid or a reused
//! namespace inode cannot make a dead registration look live, and an
//! unreadable `/proc` cannot make a live one look dead.

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::cidr::Cidr;

/// Where agents register their pools (tmpfs: gone at reboot, like the taps),
/// one directory per network namespace (`netns-<inode>`).
pub const REGISTRY_DIR: &str = "/run/hearth/pools";

/// The inode of this process's network namespace (0 if unknown): pools and
/// sandbox addresses only collide within one namespace.
pub fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A pool registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("address pool {pool} overlaps pool {other} of another Hearth agent on this host (pid {pid}, state dir {state_dir}); sandboxes of both would get the same addresses: give this agent another --net-pool")]
    Overlap {
        pool: Cidr,
        other: Cidr,
        pid: u32,
        state_dir: String,
    },
    #[error("pool registry {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A registration of another agent that was reclaimed (its agent was gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    pub pool: Cidr,
    /// The pid and state dir it named (for the log only).
    pub pid: u32,
    pub state_dir: String,
}

/// The agents registered in this namespace while this one registered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveAgents {
    /// Owner tags (see [`owner_tag`]) of the other live agents.
    pub others: HashSet<u32>,
    /// This agent's own tag.
    pub me: u32,
}

/// This agent's registration: its file stays locked while it exists and is
/// removed when dropped.
#[derive(Debug)]
pub struct Registration {
    dir: PathBuf,
    path: PathBuf,
    /// Holds `LOCK_EX` on the file at `path` for the agent's lifetime.
    file: std::fs::File,
    /// Registrations of dead agents this one removed.
    pub reclaimed: Vec<Reclaimed>,
}

impl Registration {
    /// The registration file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        // why: under the directory lock, so no other agent is between reading
        // this file and testing its lock; and only if the path is still this
        // registration's file (a restart of the same state dir may have
        // replaced it).
        let Ok(_dir_lock) = lock_dir(&self.dir) else {
            return;
        };
        let same = match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RegistryError {
    let path = path.display().to_string();
    move |source| RegistryError::Io {
        path: path.clone(),
        source,
    }
}

/// `flock(fd, op)`, retried on EINTR.
fn flock(f: &std::fs::File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `f` owns; no pointers.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes the registry directory's lock (released when the file is closed).
fn lock_dir(dir: &Path) -> Result<std::fs::File, RegistryError> {
    let lock_path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    flock(&lock, libc::LOCK_EX).map_err(io_err(&lock_path))?;
    Ok(lock)
}

/// Whether the agent that wrote the registration file at `path` still runs:
/// it holds the file's exclusive lock for as long as it does. `None` when the
/// file is gone.
fn held(path: &Path) -> Result<Option<bool>, RegistryError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    match flock(&f, libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => Ok(Some(false)),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(Some(true)),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn file_name(pool: Cidr) -> String {
    format!("{}_{}", pool.addr(), pool.prefix_len())
}

fn parse_name(name: &str) -> Option<Cidr> {
    let (a, l) = name.split_once('_')?;
    format!("{a}/{l}").parse().ok()
}

/// The canonical form of a state dir, as the registry records it.
fn canonical(state_dir: &Path) -> String {
    std::fs::canonicalize(state_dir)
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .display()
        .to_string()
}

/// Registers `pool` for the agent with state dir `state_dir` in `dir`, or
/// refuses it when it overlaps the pool of another live agent. Registrations
/// of dead agents are reclaimed. While the registry is still locked (no agent
/// can register or go in between), `under_lock` is called with the live
/// agents, e.g. to purge host-wide state of agents that are gone.
pub fn register_in(
    dir: &Path,
    pool: Cidr,
    state_dir: &Path,
    under_lock: impl FnOnce(&LiveAgents),
) -> Result<Registration, RegistryError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let _dir_lock = lock_dir(dir)?;
    let me = canonical(state_dir);
    let mut live = LiveAgents {
        others: HashSet::new(),
        me: owner_tag(state_dir),
    };
    let mut reclaimed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let Some(other) = e.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let (pid, owner_dir) = text
            .trim_end()
            .split_once(' ')
            .map(|(p, d)| (p.parse::<u32>().unwrap_or(0), d.to_string()))
            .unwrap_or((0, String::new()));
        let Some(is_live) = held(&e.path())? else {
            continue;
        };
        if is_live && owner_dir != me {
            if other.covers(&pool) || pool.covers(&other) {
                return Err(RegistryError::Overlap {
                    pool,
                    other,
                    pid,
                    state_dir: owner_dir,
                });
            }
            live.others.insert(owner_tag(Path::new(&owner_dir)));
            continue;
        }
        // A dead agent's, or an earlier run of this state dir: reclaimed.
        let _ = std::fs::remove_file(e.path());
        if owner_dir != me {
            reclaimed.push(Reclaimed {
                pool: other,
                pid,
                state_dir: owner_dir,
            });
        }
    }
    let path = dir.join(file_name(pool));
    let content = format!("{} {me}\n", std::process::id());
    // why: a fresh file (never one an earlier run may still hold); std opens
    // it close-on-exec, so a QEMU child does not keep the lock after its agent
    // died.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path))?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err(&path))?;
    file.write_all(content.as_bytes()).map_err(io_err(&path))?;
    under_lock(&live);
    Ok(Registration {
        dir: dir.to_path_buf(),
        path,
        file,
        reclaimed,
    })
}

/// [`register_in`] the host's registry (this network namespace's).
pub fn register(
    pool: Cidr,
    state_dir: &Path,
    under_lock: impl FnOnce(&LiveAgents),
) -> Result<Registration, RegistryError> {
    let dir = Path::new(REGISTRY_DIR).join(format!("netns-{}", netns_id()));
    register_in(&dir, pool, state_dir, under_lock)
}

/// The tag of the agent with this state dir in the host sandbox map
/// (FNV-1a of its canonical path): stable across restarts of that agent.
pub fn owner_tag(state_dir: &Path) -> u32 {
    let p = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let mut h: u32 = 0x811c_9dc5;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn reg(dir: &Path, pool: &str, state: &Path) -> Result<Registration, RegistryError> {
        register_in(dir, pool.parse().unwrap(), state, |_| {})
    }

    #[test]
    fn an_overlapping_pool_of_a_live_agent_is_refused_a_dead_ones_reclaimed() {
        let reg_dir = tempfile::tempdir().unwrap();
        let r = reg_dir.path();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = reg(r, "10.88.0.0/24", a.path()).unwrap();
        let e = reg(r, "10.88.0.0/16", b.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("overlaps pool 10.88.0.0/24"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("--net-pool"), "{msg}");
        // A disjoint pool is fine; the same state dir again (a restart) too.
        let other = reg(r, "10.88.1.0/24", b.path()).unwrap();
        let again = reg(r, "10.88.0.0/24", a.path()).unwrap();
        // The earlier registration of that state dir, dropped, does not
        // remove the file of the later one.
        drop(first);
        assert!(again.path().exists());
        drop(again);
        assert!(!r.join("10.88.0.0_24").exists(), "removed on drop");
        drop(other);
        // A file nobody holds locked (a dead agent's) is reclaimed, even when
        // its pid is a live process of this namespace (a reused pid).
        std::fs::write(
            r.join("10.88.0.0_24"),
            format!("{} /gone/agent\n", std::process::id()),
        )
        .unwrap();
        let taken = reg(r, "10.88.0.0/16", b.path()).unwrap();
        assert_eq!(
            taken.reclaimed,
            vec![Reclaimed {
                pool: "10.88.0.0/24".parse().unwrap(),
                pid: std::process::id(),
                state_dir: "/gone/agent".into(),
            }]
        );
    }

    /// Not a test: the child process of the test below. It registers the
    /// pool in `HEARTH_TEST_REGISTRY`, starts a `tail -f /dev/null` (standing for a
    /// QEMU that outlives its agent), prints `ready <its pid>` and waits.
    #[test]
    #[ignore = "child process of registration_held_by_a_killed_process_is_reclaimed"]
    fn registry_child_holding_a_registration() {
        let Ok(dir) = std::env::var("HEARTH_TEST_REGISTRY") else {
            return;
        };
        let state = std::env::var("HEARTH_TEST_STATE").unwrap();
        let _r = reg(Path::new(&dir), "10.77.0.0/24", Path::new(&state)).unwrap();
        let mut vmm = std::process::Command::new("tail")
            .args(["-f", "/dev/null"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        println!("ready {}", vmm.id());
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        // (reached only when the parent closes stdin instead of killing this)
        let _ = vmm.kill();
        let _ = vmm.wait();
    }

    /// Liveness is the registration's lock: held by a running agent, its pool
    /// is refused; once that agent is SIGKILLed it is reclaimed at once, even
    /// though a child it started (a QEMU) still runs, and whatever a pid says.
    #[test]
    fn registration_held_by_a_killed_process_is_reclaimed() {
        let reg_dir = tempfile::tempdir().unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "registry::tests::registry_child_holding_a_registration",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HEARTH_TEST_REGISTRY", reg_dir.path())
            .env("HEARTH_TEST_STATE", a.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let vmm_pid = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
            // (libtest prints it after the test's name, on the same line)
            if let Some((_, p)) = line.trim().split_once("ready ") {
                break p.parse::<libc::pid_t>().unwrap();
            }
        };
        let refused = reg(reg_dir.path(), "10.77.0.0/16", b.path());
        child.kill().unwrap();
        child.wait().unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        let vmm_runs = unsafe { libc::kill(vmm_pid, 0) } == 0;
        let taken = reg(reg_dir.path(), "10.77.0.0/16", b.path());
        // SAFETY: kill(2) on the process this test's child started.
        unsafe { libc::kill(vmm_pid, libc::SIGKILL) };
        let e = refused.expect_err("a live agent's overlapping pool is refused");
        assert!(
            e.to_string().contains(&format!("pid {}", child.id())),
            "{e}"
        );
        assert!(vmm_runs, "the child's own child outlives it");
        let taken = taken.expect("a killed agent's registration is reclaimed");
        assert_eq!(taken.reclaimed.len(), 1, "{:?}", taken.reclaimed);
        assert_eq!(taken.reclaimed[0].pid, child.id());
    }

    /// The live agents passed to `under_lock` are the other registrations
    /// still held, and this agent's own tag.
    #[test]
    fn under_lock_sees_the_live_agents() {
        let reg_dir = tempfile::tempdir().unwrap();
        let r = reg_dir.path();
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let _a = reg(r, "10.66.0.0/24", a.path()).unwrap();
        std::fs::write(r.join("10.66.1.0_24"), "1 /dead/agent\n").unwrap();
        let mut seen = None;
        let _b = register_in(r, "10.66.2.0/24".parse().unwrap(), b.path(), |l| {
            seen = Some(l.clone())
        })
        .unwrap();
        let seen = seen.expect("called");
        assert_eq!(seen.me, owner_tag(b.path()));
        assert_eq!(seen.others, HashSet::from([owner_tag(a.path())]));
        let _ = c;
    }
}
