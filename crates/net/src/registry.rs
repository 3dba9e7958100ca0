//! Which agent on this host uses which address pool: one file per agent under
//! [`REGISTRY_DIR`], named after its pool and holding its pid and state dir.
//! An agent refuses to start with a pool overlapping the pool of another live
//! agent (its sandboxes' routes and host map entries would collide); entries
//! of dead agents, or of an earlier run of the same state dir, are reclaimed.

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

/// This agent's registration; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
    content: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.path).ok().as_deref() == Some(self.content.as_str()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// True when `pid` runs in this process's network namespace. why: a registry
/// file can outlive its agent (kill -9), its pid can be reused by an unrelated
/// process (pid_max is often 32768), and a namespace's inode number is reused
/// once it is gone: such an entry is stale, not a live agent's pool.
fn in_this_netns(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == netns_id())
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; no signal is sent.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn file_name(pool: Cidr) -> String {
    format!("{}_{}", pool.addr(), pool.prefix_len())
}

fn parse_name(name: &str) -> Option<Cidr> {
    let (a, l) = name.split_once('_')?;
    format!("{a}/{l}").parse().ok()
}

/// Registers `pool` for the agent with state dir `state_dir` in `dir`, or
/// refuses it when it overlaps the pool of another live agent.
pub fn register_in(
    dir: &Path,
    pool: Cidr,
    state_dir: &Path,
) -> Result<Registration, RegistryError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| RegistryError::Io {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lock_path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    // SAFETY: flock on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(&lock_path)(std::io::Error::last_os_error()));
    }
    let me = state_dir.display().to_string();
    for e in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let Some(other) = e.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        if !(other.covers(&pool) || pool.covers(&other)) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let (pid, owner_dir) = text
            .trim_end()
            .split_once(' ')
            .map(|(p, d)| (p.parse::<u32>().unwrap_or(0), d.to_string()))
            .unwrap_or((0, String::new()));
        if owner_dir != me && pid != 0 && alive(pid) && in_this_netns(pid) {
            return Err(RegistryError::Overlap {
                pool,
                other,
                pid,
                state_dir: owner_dir,
            });
        }
        // A dead agent's, or an earlier run of this state dir: reclaimed.
        let _ = std::fs::remove_file(e.path());
    }
    let path = dir.join(file_name(pool));
    let content = format!("{} {me}\n", std::process::id());
    let mut f = std::fs::File::create(&path).map_err(io(&path))?;
    f.write_all(content.as_bytes()).map_err(io(&path))?;
    Ok(Registration { path, content })
}

/// [`register_in`] the host's registry.
pub fn register(pool: Cidr, state_dir: &Path) -> Result<Registration, RegistryError> {
    let dir = Path::new(REGISTRY_DIR).join(format!("netns-{}", netns_id()));
    register_in(&dir, pool, state_dir)
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

    #[test]
    fn an_overlapping_pool_of_a_live_agent_is_refused_a_dead_ones_reclaimed() {
        let reg = tempfile::tempdir().unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pool: Cidr = "10.88.0.0/24".parse().unwrap();
        let first = register_in(reg.path(), pool, a.path()).unwrap();
        let e = register_in(reg.path(), "10.88.0.0/16".parse().unwrap(), b.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("overlaps pool 10.88.0.0/24"), "{msg}");
        assert!(msg.contains("--net-pool"), "{msg}");
        // A disjoint pool is fine; the same state dir again (a restart) too.
        let _other = register_in(reg.path(), "10.88.1.0/24".parse().unwrap(), b.path()).unwrap();
        drop(first);
        let again = register_in(reg.path(), pool, a.path()).unwrap();
        // A dead owner's entry is reclaimed.
        std::fs::write(&again.path, "999999999 /nowhere\n").unwrap();
        register_in(reg.path(), pool, b.path()).unwrap();
    }
}
