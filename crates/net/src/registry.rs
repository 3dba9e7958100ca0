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
//!
//! A file reads `<pid> v2 <tag> <state dir>`: the tag is the agent's owner id
//! in the host sandbox map, persisted in its state dir ([`owner_id`]). Files
//! without the `v2` marker were written by an older build, which holds no
//! lock: such an agent is live while its pid runs in this namespace, and then
//! its pool and entries are respected like any live agent's.

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
    /// Owner tags (see [`Registration::tag`]) of the other live agents.
    pub others: HashSet<u32>,
    /// Pools of the other live agents: an address in one may be mid-setup
    /// (a tap and route before its host map entry), so it is never purged.
    pub pools: Vec<Cidr>,
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
    /// This agent's tag in the host sandbox map (its persisted owner id).
    tag: u32,
    /// Registrations of dead agents this one removed.
    pub reclaimed: Vec<Reclaimed>,
}

impl Registration {
    /// The registration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This agent's tag in the host sandbox map: the owner id persisted in
    /// its state dir (see [`owner_id`]), the same across its restarts.
    pub fn tag(&self) -> u32 {
        self.tag
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

/// The file in a state dir holding its agent's owner id.
pub const OWNER_ID_FILE: &str = "owner-id";

/// The owner id of the agent with this state dir: read from
/// [`OWNER_ID_FILE`], or created there (random; or, for a state dir an older
/// build used, the tag that build computed, so its host map entries stay
/// this agent's). Nobody recomputes it from a path.
pub fn owner_id(state_dir: &Path) -> Result<u32, RegistryError> {
    std::fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    let path = state_dir.join(OWNER_ID_FILE);
    let parse = |t: &str| t.trim().parse::<u32>().ok();
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            if let Some(id) = parse(&t) {
                return Ok(id);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let id = if state_dir.join("leases.json").exists() {
        owner_tag(state_dir)
    } else {
        let mut b = [0u8; 4];
        let mut f =
            std::fs::File::open("/dev/urandom").map_err(io_err(Path::new("/dev/urandom")))?;
        std::io::Read::read_exact(&mut f, &mut b).map_err(io_err(Path::new("/dev/urandom")))?;
        u32::from_ne_bytes(b)
    };
    let tmp = state_dir.join(format!(".{OWNER_ID_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, format!("{id}\n")).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(id)
}

/// The marker of registration files this build writes (`<pid> v2 <tag>
/// <state dir>`); files without it were written by an older build (`<pid>
/// <state dir>`) that holds no lock. why the pid first: older builds read
/// the first word as the pid and take a file whose pid is not a live process
/// of theirs for a dead agent's (and delete it), so they see this build's
/// agents as live.
const FORMAT: &str = "v2";

/// A registration file's content.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    pid: u32,
    tag: u32,
    state_dir: String,
    /// Written by an older build: liveness by pid and namespace, not a lock.
    legacy: bool,
}

fn parse_entry(text: &str) -> Entry {
    let line = text.lines().next().unwrap_or_default();
    let (pid, rest) = line
        .split_once(' ')
        .map(|(p, r)| (p.parse::<u32>().unwrap_or(0), r))
        .unwrap_or((0, ""));
    // (a state dir is absolute: it never starts with the marker)
    if let Some(rest) = rest.strip_prefix(FORMAT).and_then(|r| r.strip_prefix(' ')) {
        let (tag, state_dir) = rest
            .split_once(' ')
            .map(|(t, d)| (t.parse().unwrap_or(0), d.to_string()))
            .unwrap_or((0, String::new()));
        return Entry {
            pid,
            tag,
            state_dir,
            legacy: false,
        };
    }
    Entry {
        pid,
        tag: owner_tag(Path::new(rest)),
        state_dir: rest.to_string(),
        legacy: true,
    }
}

/// Whether `pid` is a live process of this network namespace: the liveness
/// test of registrations by older builds (they hold no lock).
fn legacy_live(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; no signal is sent.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == netns_id())
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
    // why: before registering, so the file names the id for good.
    let tag = owner_id(state_dir)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let _dir_lock = lock_dir(dir)?;
    let me = canonical(state_dir);
    let mut live = LiveAgents {
        others: HashSet::new(),
        pools: Vec::new(),
        me: tag,
    };
    let mut reclaimed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let Some(other) = e.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let entry = parse_entry(&text);
        let Some(held) = held(&e.path())? else {
            continue;
        };
        let mine = if entry.legacy {
            entry.state_dir == me
        } else {
            entry.tag == tag
        };
        let is_live = held || (entry.legacy && legacy_live(entry.pid));
        if is_live && !mine {
            if other.covers(&pool) || pool.covers(&other) {
                return Err(RegistryError::Overlap {
                    pool,
                    other,
                    pid: entry.pid,
                    state_dir: entry.state_dir,
                });
            }
            live.others.insert(entry.tag);
            live.pools.push(other);
            continue;
        }
        // A dead agent's, or an earlier run of this state dir: reclaimed.
        let _ = std::fs::remove_file(e.path());
        if !mine {
            reclaimed.push(Reclaimed {
                pool: other,
                pid: entry.pid,
                state_dir: entry.state_dir,
            });
        }
    }
    let path = dir.join(file_name(pool));
    let content = format!("{} {FORMAT} {tag} {me}\n", std::process::id());
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
        tag,
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

/// Inodes of the network namespaces that exist now, as far as this process
/// can see: those of every process and thread, those held open by a
/// descriptor, and those bind-mounted (`ip netns add`).
pub fn live_namespaces() -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    fn net_inode(link: &str) -> Option<u64> {
        link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
    }
    let mut live = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return live;
    };
    for p in procs.flatten() {
        let path = p.path();
        if !p
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        if let Ok(tasks) = std::fs::read_dir(path.join("task")) {
            for t in tasks.flatten() {
                if let Ok(m) = std::fs::metadata(t.path().join("ns/net")) {
                    live.insert(m.ino());
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(path.join("fd")) {
            for fd in fds.flatten() {
                if let Some(n) = std::fs::read_link(fd.path())
                    .ok()
                    .and_then(|l| l.to_str().and_then(net_inode))
                {
                    live.insert(n);
                }
            }
        }
    }
    // mountinfo: `id parent major:minor root mountpoint ...`; an nsfs bind
    // mount's root is `net:[N]`.
    for line in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        if let Some(n) = line.split(' ').nth(3).and_then(net_inode) {
            live.insert(n);
        }
    }
    live
}

/// Removes the registry directories (`<root>/netns-<inode>`) of network
/// namespaces that no longer exist (`live` holds those that do; see
/// [`live_namespaces`]): no agent can run in a namespace that is gone, so
/// its registrations are stale whatever they say. A directory whose lock is
/// held (an agent in the middle of registering), or with a registration an
/// agent holds (one this process cannot see), is left. Returns the inodes
/// whose directories were removed.
pub fn purge_gone_namespaces(root: &Path, live: &HashSet<u64>) -> Vec<u64> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return removed;
    };
    for e in rd.flatten() {
        let Some(ino) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("netns-"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if ino == 0 || live.contains(&ino) || ino == netns_id() {
            continue;
        }
        let dir = e.path();
        let lock = match std::fs::File::open(dir.join(".lock")) {
            Ok(f) => Some(f),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => continue,
        };
        if let Some(l) = &lock {
            if flock(l, libc::LOCK_EX | libc::LOCK_NB).is_err() {
                continue;
            }
        }
        // why: an agent this process cannot see (another PID namespace) may
        // still run there; it holds its registration's lock.
        let held_by_someone = std::fs::read_dir(&dir).map_or(true, |rd| {
            rd.flatten()
                .filter(|f| f.file_name() != ".lock")
                .any(|f| !matches!(held(&f.path()), Ok(None) | Ok(Some(false))))
        });
        if held_by_someone {
            continue;
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(ino);
        }
    }
    removed
}

/// The tag older builds computed for the agent with this state dir (FNV-1a
/// of its canonical path): only to read their registrations and to seed the
/// owner id of a state dir they used (see [`owner_id`]).
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

    /// Registry directories of namespaces that are gone are removed, unless
    /// an agent (one this process might not see) holds a registration there.
    #[test]
    fn registries_of_gone_namespaces_are_removed_unless_a_registration_is_held() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let (gone, held_ns, live_ns) = (
            root.path().join("netns-11"),
            root.path().join("netns-12"),
            root.path().join("netns-13"),
        );
        // A dead agent's registration (never locked) and the directory lock.
        std::fs::create_dir_all(&gone).unwrap();
        std::fs::write(gone.join(".lock"), "").unwrap();
        std::fs::write(gone.join("10.9.0.0_24"), "1 v2 7 /gone\n").unwrap();
        let held = reg(&held_ns, "10.9.1.0/24", state.path()).unwrap();
        std::fs::create_dir_all(&live_ns).unwrap();
        let live = HashSet::from([13]);
        let removed = purge_gone_namespaces(root.path(), &live);
        assert_eq!(removed, vec![11]);
        assert!(!gone.exists());
        assert!(held_ns.exists(), "a held registration keeps its directory");
        assert!(live_ns.exists(), "a live namespace keeps its directory");
        drop(held);
        assert_eq!(purge_gone_namespaces(root.path(), &live), vec![12]);
        assert!(!held_ns.exists());
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
            format!("{} v2 5 /gone/agent\n", std::process::id()),
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

    /// A registration file of this test's own, locked by `flock(1)` standing
    /// for an agent: `-o` closes the lock before exec, so the `tail` (standing
    /// for a QEMU the agent started) does not hold it. Returns the flock
    /// process and the tail's pid, once the lock is taken.
    fn holder(path: &Path, content: &str, close_before_exec: bool) -> (std::process::Child, i32) {
        std::fs::write(path, content).unwrap();
        let mut args = vec!["-x"];
        if close_before_exec {
            args.insert(0, "-o");
        }
        let mut child = std::process::Command::new("flock")
            .args(&args)
            .arg(path)
            // (tail's output not the pipe: GNU tail -f exits once the
            // reader of its output is gone)
            .args([
                "sh",
                "-c",
                "echo ready $$; exec tail -f /dev/null >/dev/null",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("util-linux flock(1)");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("flock printed {line:?}"));
        (child, pid)
    }

    /// Liveness is the registration's lock: held by a running agent, its pool
    /// is refused; once that agent is SIGKILLed it is reclaimed at once, even
    /// though a child it started (a QEMU) still runs, and whatever its pid
    /// says. Without `-o` the child inherits the lock and keeps the pool
    /// (why registrations are opened close-on-exec).
    #[test]
    fn registration_held_by_a_killed_process_is_reclaimed() {
        let reg_dir = tempfile::tempdir().unwrap();
        let r = reg_dir.path();
        let b = tempfile::tempdir().unwrap();
        let file = r.join("10.77.0.0_24");
        let (mut agent, vmm) = holder(&file, "4242 v2 17 /agent/a\n", true);
        let refused = reg(r, "10.77.0.0/16", b.path());
        agent.kill().unwrap();
        agent.wait().unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        let vmm_runs = unsafe { libc::kill(vmm, 0) } == 0;
        let taken = reg(r, "10.77.0.0/16", b.path());
        // SAFETY: kill(2) on the tail this test started.
        unsafe { libc::kill(vmm, libc::SIGKILL) };
        let e = refused.expect_err("a live agent's overlapping pool is refused");
        assert!(e.to_string().contains("pid 4242"), "{e}");
        assert!(e.to_string().contains("/agent/a"), "{e}");
        assert!(vmm_runs, "the agent's own child outlives it");
        let taken = taken.expect("a killed agent's registration is reclaimed");
        assert_eq!(taken.reclaimed.len(), 1, "{:?}", taken.reclaimed);
        assert_eq!(taken.reclaimed[0].pid, 4242);
        drop(taken);

        // Negative control: a child that inherited the lock keeps it.
        let (mut agent, vmm) = holder(&file, "4243 v2 18 /agent/c\n", false);
        agent.kill().unwrap();
        agent.wait().unwrap();
        let still = reg(r, "10.77.0.0/16", b.path());
        // SAFETY: as above.
        unsafe { libc::kill(vmm, libc::SIGKILL) };
        let e = still.expect_err("the inherited lock keeps the registration live");
        assert!(e.to_string().contains("pid 4243"), "{e}");
    }

    /// A process spawned after registering the way QEMU is (its own session)
    /// holds no descriptor of the registration file.
    #[test]
    fn a_vmm_spawned_after_registering_holds_no_descriptor_of_the_registration() {
        use std::os::unix::process::CommandExt;
        let reg_dir = tempfile::tempdir().unwrap();
        let a = tempfile::tempdir().unwrap();
        let r = reg(reg_dir.path(), "10.76.0.0/24", a.path()).unwrap();
        let mut cmd = std::process::Command::new("tail");
        cmd.args(["-f", "/dev/null"]);
        // SAFETY: setsid is async-signal-safe; nothing else runs after fork.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut vmm = cmd.spawn().unwrap();
        let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", vmm.id()))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect();
        let own: Vec<PathBuf> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect();
        let _ = vmm.kill();
        let _ = vmm.wait();
        assert!(
            own.iter().any(|p| p == r.path()),
            "the agent holds it: {own:?}"
        );
        assert!(
            !fds.iter().any(|p| p == r.path()),
            "the VMM holds the registration: {fds:?}"
        );
    }

    /// A registration of an older build (no `v2` marker, no lock) is live
    /// while its pid runs in this namespace: its pool is refused and its
    /// tag kept; once the pid is gone it is reclaimed.
    #[test]
    fn an_older_builds_registration_is_live_while_its_pid_runs_here() {
        let reg_dir = tempfile::tempdir().unwrap();
        let r = reg_dir.path();
        let (b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(
            r.join("10.75.0.0_24"),
            format!("{} /old/agent\n", std::process::id()),
        )
        .unwrap();
        let e = reg(r, "10.75.0.0/16", b.path()).unwrap_err();
        assert!(e.to_string().contains("/old/agent"), "{e}");
        let mut seen = None;
        let _c = register_in(r, "10.75.1.0/24".parse().unwrap(), c.path(), |l| {
            seen = Some(l.clone())
        })
        .unwrap();
        assert!(
            r.join("10.75.0.0_24").exists(),
            "a live agent's file is kept"
        );
        assert_eq!(
            seen.unwrap().others,
            HashSet::from([owner_tag(Path::new("/old/agent"))])
        );
        drop(_c);
        std::fs::write(r.join("10.75.0.0_24"), "999999999 /old/agent\n").unwrap();
        let taken = reg(r, "10.75.0.0/16", b.path()).unwrap();
        assert_eq!(taken.reclaimed.len(), 1);
    }

    /// The owner id is persisted in the state dir, the same however the dir
    /// is named, written into the registration file, and is the tag.
    #[test]
    fn the_owner_id_is_persisted_and_registered() {
        let reg_dir = tempfile::tempdir().unwrap();
        let a = tempfile::tempdir().unwrap();
        let first = reg(reg_dir.path(), "10.74.0.0/24", a.path()).unwrap();
        let tag = first.tag();
        let text = std::fs::read_to_string(first.path()).unwrap();
        drop(first);
        let id = std::fs::read_to_string(a.path().join(OWNER_ID_FILE)).unwrap();
        let dotted = a.path().join(".");
        let again = reg(reg_dir.path(), "10.74.0.0/24", &dotted).unwrap();
        assert_eq!(id.trim(), tag.to_string());
        assert!(
            text.starts_with(&format!("{} v2 {tag} ", std::process::id())),
            "{text}"
        );
        assert_eq!(again.tag(), tag, "the same id after a restart");
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
        std::fs::write(r.join("10.66.1.0_24"), "1 v2 9 /dead/agent\n").unwrap();
        let mut seen = None;
        let _b = register_in(r, "10.66.2.0/24".parse().unwrap(), b.path(), |l| {
            seen = Some(l.clone())
        })
        .unwrap();
        let seen = seen.expect("called");
        assert_eq!(seen.me, _b.tag());
        assert_eq!(seen.others, HashSet::from([_a.tag()]));
        let _ = c;
    }
}
