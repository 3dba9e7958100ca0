//! Loading `bpf/policy.c` onto a tap and reading/writing its maps.
//!
//! Updates are atomic: RULES holds two slots of rules (the LPM key starts with a
//! slot/direction tag) and CONFIG names the active one. An update writes the
//! inactive slot (rules, defaults, zeroed counters) and then bumps
//! `CONFIG.epoch`, one aligned 32-bit word whose low bit selects the slot, so a
//! packet sees the old or the new policy whole.
//!
//! Each sandbox gets its own program instance and maps. Maps and the two TCX
//! links are pinned under `/sys/fs/bpf/hearth/<tap>/`, so the programs stay
//! attached when hearthd exits and a restarted agent can update the rules;
//! deleting the tap detaches the links, removing the pin directory frees the rest.
//! Kernels before 6.6 have no TCX: there the programs are cls_bpf filters on a
//! clsact qdisc, which need no pin and go away with the tap.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use aya::programs::links::FdLink;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;

use super::{
    Compiled, Direction, FIRST_RULE_COUNTER, MAX_COUNTERS, RULES_PER_PREFIX, RULE_COUNTERS_PER_SLOT,
};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));

/// Root of Hearth's pins on the BPF filesystem.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/hearth";
/// Root of the pins shared by every agent on the host; see [`host_pins`].
pub const HOST_PINS_ROOT: &str = "/sys/fs/bpf/hearth-host";

/// The pins shared by every agent in this process's network namespace: the
/// `SANDBOXES` map (every sandbox address to its pool's prefix length) and its
/// generation, pinned by name under `HOST_PINS_ROOT/netns-<inode>`.
///
/// why: sandbox addresses meet only within one network namespace; agents in
/// different namespaces (the dev shard's) may use the same pools, and must
/// neither refuse nor deny each other's addresses.
pub fn host_pins() -> String {
    format!("{HOST_PINS_ROOT}/netns-{}", crate::registry::netns_id())
}
/// Distinct host addresses the HOSTS map holds (bpf/policy.c).
const MAX_HOSTS: usize = 256;
/// Entries of each flow map (EFLOWS, IFLOWS in bpf/policy.c).
#[cfg(test)]
const MAX_FLOWS: usize = 8192;
/// The maps every sandbox's program instance has, pinned by these names.
const MAPS: [&str; 7] = [
    "CONFIG", "RULES", "COUNTERS", "HOSTS", "EFLOWS", "IFLOWS", "FRAGS",
];

/// A BPF operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot load the policy program: {0}")]
    Load(String),
    #[error("cannot attach the policy program to {tap}: {reason}")]
    Attach { tap: String, reason: String },
    #[error("policy maps of {tap}: {reason}")]
    Map { tap: String, reason: String },
    #[error("{tap}: the node has {given} IPv4 host and broadcast addresses, the policy map holds {max}; the sandbox's network is not started rather than leave some unblocked (remove addresses from the node)")]
    TooManyHosts {
        tap: String,
        given: usize,
        max: usize,
    },
    #[error("{path} is a shared map of another Hearth build ({got}; this build needs {want}); stop the agents of that build and remove the pin, or run one Hearth version per host")]
    Incompatible {
        path: String,
        want: String,
        got: String,
    },
    #[error("sandbox address {ip} is already a sandbox of another agent on this host (owner tag {owner:08x}): the two agents' address pools overlap; give one of them another --net-pool")]
    SandboxOfAnotherAgent { ip: Ipv4Addr, owner: u32 },
    #[error("bpffs at {path}: {source}")]
    Fs {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SandboxCfg {
    ip: u32,
    mac: [u8; 6],
    active: u8,
    _pad: u8,
    egress_default_allow: [u8; 2],
    ingress_default_allow: [u8; 2],
    /// Bumped by every update; its low bit is `active`. Flows remember the
    /// epoch that allowed them and are judged again when it changed.
    epoch: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RuleRaw {
    port_lo: u16,
    port_hi: u16,
    proto: u8,
    action: u8,
    counter: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RuleList {
    prefixlen: u32,
    _pad: u32,
    r: [RuleRaw; RULES_PER_PREFIX],
}

/// The LPM key's data: which slot and direction, then the address.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TagAddr {
    tag: u32,
    addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

// SAFETY: plain #[repr(C)] integer structs without padding holes the kernel
// could misread (explicit _pad), matching bpf/policy.c.
unsafe impl aya::Pod for SandboxCfg {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleList {}
// SAFETY: as above.
unsafe impl aya::Pod for Counter {}
// SAFETY: as above.
unsafe impl aya::Pod for TagAddr {}

/// The pin directory of a tap's programs and maps.
pub fn pin_dir(tap: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(tap)
}

fn ensure_bpffs() -> Result<(), BpfError> {
    let fs_err = |source| BpfError::Fs {
        path: "/sys/fs/bpf".into(),
        source,
    };
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map_err(fs_err)?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        std::fs::create_dir_all("/sys/fs/bpf").map_err(fs_err)?;
        let (src, dst, ty) = (c"bpffs", c"/sys/fs/bpf", c"bpf");
        // SAFETY: all pointers are valid NUL-terminated strings; data is null.
        let rc =
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(fs_err(std::io::Error::last_os_error()));
        }
    }
    for dir in [BPFFS_ROOT.to_string(), host_pins()] {
        std::fs::create_dir_all(&dir).map_err(|source| BpfError::Fs {
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Pin name of the host's sandbox map; the suffix is its layout version (a
/// new layout gets a new name, so agents of two versions never share one).
pub const SANDBOXES_PIN: &str = "SANDBOXES_v1";
/// Pin name of the generation counter of [`SANDBOXES_PIN`]: bumped after every
/// change, so flows judged before it are judged again.
pub const SBGEN_PIN: &str = "SBGEN_v1";

/// A value of the host's sandbox map (`struct host_sandbox` in bpf/policy.c).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct HostSandbox {
    pub pool_len: u8,
    _pad: [u8; 3],
    /// Tag of the agent that added it (see `NodeNet`): only that agent
    /// removes or reconciles it.
    pub owner: u32,
}

// SAFETY: #[repr(C)] integers with an explicit pad, as in bpf/policy.c.
unsafe impl aya::Pod for HostSandbox {}

/// (pin name, map type, key size, value size, max entries) of the shared maps,
/// as bpf/policy.c declares them.
const SHARED_MAPS: [(&str, aya::maps::MapType, u32, u32, u32); 2] = [
    (
        SANDBOXES_PIN,
        aya::maps::MapType::Hash,
        4,
        std::mem::size_of::<HostSandbox>() as u32,
        65536,
    ),
    (SBGEN_PIN, aya::maps::MapType::Array, 4, 4, 1),
];

fn host_err(reason: String) -> BpfError {
    BpfError::Map {
        tap: "(host)".into(),
        reason,
    }
}

/// The shared pins must be the maps this build declares: a map left by
/// another build under the same name is refused rather than misread.
fn check_shared_maps() -> Result<(), BpfError> {
    for (name, ty, key, value, max) in SHARED_MAPS {
        let p = Path::new(&host_pins()).join(name);
        let md = MapData::from_pin(&p).map_err(|e| host_err(format!("{}: {e}", p.display())))?;
        let info = md
            .info()
            .map_err(|e| host_err(format!("{}: map info: {e}", p.display())))?;
        let got_ty = info.map_type().ok();
        let got = (info.key_size(), info.value_size(), info.max_entries());
        if got_ty != Some(ty) || got != (key, value, max) {
            return Err(BpfError::Incompatible {
                path: p.display().to_string(),
                want: format!("{ty:?}, key {key} B, value {value} B, {max} entries"),
                got: format!(
                    "{got_ty:?}, key {} B, value {} B, {} entries",
                    got.0, got.1, got.2
                ),
            });
        }
    }
    Ok(())
}

/// Whether a load failed because another agent pinned a shared map between
/// this loader's look-up and its own pin (the loser of that race finds the
/// map pinned on a second try).
fn is_pin_race(e: &aya::EbpfError) -> bool {
    matches!(
        e,
        aya::EbpfError::MapError(aya::maps::MapError::PinError {
            error: aya::pin::PinError::SyscallError(s),
            ..
        }) if s.io_error.kind() == std::io::ErrorKind::AlreadyExists
    )
}

/// A fresh instance of the program; its shared maps are the host's (created
/// and pinned under [`host_pins`] by the first instance, checked against this
/// build's layout).
fn load_object() -> Result<Ebpf, BpfError> {
    let load = || {
        aya::EbpfLoader::new()
            .default_map_pin_directory(host_pins())
            .load(OBJECT)
    };
    let bpf = match load() {
        Ok(b) => Ok(b),
        Err(e) if is_pin_race(&e) => load(),
        Err(e) => Err(e),
    }
    .map_err(|e| BpfError::Load(e.to_string()))?;
    check_shared_maps()?;
    Ok(bpf)
}

fn shared_map(pins: &Path, name: &str) -> Result<Option<Map>, BpfError> {
    let p = pins.join(name);
    if !p.exists() {
        return Ok(None);
    }
    let err = |reason: String| host_err(format!("{}: {reason}", p.display()));
    let md = MapData::from_pin(&p).map_err(|e| err(e.to_string()))?;
    Map::from_map_data(md)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

fn sandboxes_map(pins: &Path) -> Result<Option<BpfHashMap<MapData, u32, HostSandbox>>, BpfError> {
    let Some(m) = shared_map(pins, SANDBOXES_PIN)? else {
        return Ok(None);
    };
    m.try_into()
        .map(Some)
        .map_err(|e: aya::maps::MapError| host_err(format!("{SANDBOXES_PIN}: {e}")))
}

/// Bumps the generation of the host's sandbox map, after a change of it:
/// every flow is judged again on its next packet. Concurrent bumps may merge
/// into one; each bump follows its agent's change, so a packet reading the
/// merged value sees both changes.
fn bump_generation(pins: &Path) -> Result<(), BpfError> {
    let m = shared_map(pins, SBGEN_PIN)?
        .ok_or_else(|| host_err(format!("{}/{SBGEN_PIN} is not pinned", pins.display())))?;
    let mut a: Array<MapData, u32> = m
        .try_into()
        .map_err(|e: aya::maps::MapError| host_err(format!("{SBGEN_PIN}: {e}")))?;
    let g = a.get(&0, 0).unwrap_or(0);
    a.set(0, g.wrapping_add(1), 0)
        .map_err(|e| host_err(format!("{SBGEN_PIN}: bump: {e}")))
}

/// The host sandbox map's generation (0 while no program was loaded).
pub fn host_generation() -> Result<u32, BpfError> {
    let Some(m) = shared_map(Path::new(&host_pins()), SBGEN_PIN)? else {
        return Ok(0);
    };
    let a: Array<MapData, u32> = m
        .try_into()
        .map_err(|e: aya::maps::MapError| host_err(format!("{SBGEN_PIN}: {e}")))?;
    a.get(&0, 0)
        .map_err(|e| host_err(format!("{SBGEN_PIN}: {e}")))
}

/// Records `ip` (of a pool with prefix `pool_len`) as a sandbox of this host,
/// added by the agent tagged `owner`: every sandbox's program denies egress
/// to it unless a rule of its pool (or a CIDR inside it) allows it. An entry
/// of another agent for the same address is refused (overlapping pools).
/// Needs a program loaded (see [`attach`]).
pub fn add_host_sandbox(ip: Ipv4Addr, pool_len: u8, owner: u32) -> Result<(), BpfError> {
    add_host_sandbox_in(Path::new(&host_pins()), ip, pool_len, owner)
}

/// [`add_host_sandbox`] to the shared maps pinned in `pins`.
pub fn add_host_sandbox_in(
    pins: &Path,
    ip: Ipv4Addr,
    pool_len: u8,
    owner: u32,
) -> Result<(), BpfError> {
    let mut m = sandboxes_map(pins)?
        .ok_or_else(|| host_err(format!("{}/{SANDBOXES_PIN} is not pinned", pins.display())))?;
    let v = HostSandbox {
        pool_len,
        owner,
        ..HostSandbox::default()
    };
    const BPF_NOEXIST: u64 = 1;
    match m.insert(nbo(ip), v, BPF_NOEXIST) {
        Ok(()) => {}
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() != std::io::ErrorKind::AlreadyExists =>
        {
            return Err(host_err(format!("{SANDBOXES_PIN}: add {ip}: {e}")))
        }
        Err(_) => match m.get(&nbo(ip), 0) {
            Ok(old) if old.owner != owner => {
                return Err(BpfError::SandboxOfAnotherAgent {
                    ip,
                    owner: old.owner,
                })
            }
            _ => m
                .insert(nbo(ip), v, 0)
                .map_err(|e| host_err(format!("{SANDBOXES_PIN}: add {ip}: {e}")))?,
        },
    }
    bump_generation(pins)
}

/// Forgets a sandbox address of this host if the agent tagged `owner` added it
/// (missing, or another agent's, is left alone).
pub fn remove_host_sandbox(ip: Ipv4Addr, owner: u32) -> Result<(), BpfError> {
    let pins = host_pins();
    let pins = Path::new(&pins);
    let Some(mut m) = sandboxes_map(pins)? else {
        return Ok(());
    };
    match m.get(&nbo(ip), 0) {
        Ok(v) if v.owner == owner => {}
        _ => return Ok(()),
    }
    match m.remove(&nbo(ip)) {
        Ok(()) => {}
        Err(aya::maps::MapError::KeyNotFound) => return Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(())
        }
        Err(e) => return Err(host_err(format!("{SANDBOXES_PIN}: remove {ip}: {e}"))),
    }
    bump_generation(pins)
}

/// The sandbox addresses of this host recorded in the shared map, with their
/// entries.
pub fn host_sandboxes() -> Result<Vec<(Ipv4Addr, HostSandbox)>, BpfError> {
    host_sandboxes_in(Path::new(&host_pins()))
}

/// [`host_sandboxes`] of the shared maps pinned in `pins`.
pub fn host_sandboxes_in(pins: &Path) -> Result<Vec<(Ipv4Addr, HostSandbox)>, BpfError> {
    let Some(m) = sandboxes_map(pins)? else {
        return Ok(Vec::new());
    };
    Ok(m.iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v))
        .collect())
}

/// The owners whose host map entries a registering agent must never purge:
/// the other live agents and itself (its own are reconciled with its leases
/// at start, see `NodeNet::remove_orphans`).
pub fn keep_set(live: &crate::registry::LiveAgents) -> std::collections::HashSet<u32> {
    let mut keep = live.others.clone();
    keep.insert(live.me);
    keep
}

/// Removes the entries of the host's sandbox map whose owner is not in `keep`
/// (no live agent) and whose address `released` frees: an agent that is not
/// live may still have running VMs (QEMU outlives its agent and is re-adopted
/// when it starts again), so staleness is decided by the resource, not by the
/// agent (see `NodeNet::open`). Returns how many were removed. Call it with
/// the registry locked (see `registry::register`), so no agent outside `keep`
/// can start adding entries meanwhile.
pub fn purge_host_sandboxes(
    keep: &std::collections::HashSet<u32>,
    released: impl FnMut(Ipv4Addr) -> bool,
) -> Result<usize, BpfError> {
    purge_host_sandboxes_in(Path::new(&host_pins()), keep, released)
}

/// [`purge_host_sandboxes`] of the shared maps pinned in `pins`.
pub fn purge_host_sandboxes_in(
    pins: &Path,
    keep: &std::collections::HashSet<u32>,
    mut released: impl FnMut(Ipv4Addr) -> bool,
) -> Result<usize, BpfError> {
    let Some(mut m) = sandboxes_map(pins)? else {
        return Ok(0);
    };
    // why: collect first; deleting while iterating a BPF hash map restarts
    // the walk.
    let candidates: Vec<u32> = m
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| !keep.contains(&v.owner))
        .map(|(k, _)| k)
        .collect();
    let mut n = 0;
    let mut failed = None;
    for k in &candidates {
        let ip = Ipv4Addr::from(k.to_ne_bytes());
        if !released(ip) {
            continue;
        }
        match m.remove(k) {
            Ok(()) => n += 1,
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                failed
                    .get_or_insert_with(|| host_err(format!("{SANDBOXES_PIN}: remove {ip}: {e}")));
            }
        }
    }
    // why: whatever failed, the entries removed change verdicts; flows must
    // be judged again.
    if n > 0 {
        bump_generation(pins)?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

fn nbo(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The programs of a sandbox whose policy needs them.
const PROGRAMS: [&str; 2] = ["guest_out", "guest_in"];

/// A program instance loaded and verified ahead of use: its maps created, both
/// programs through the verifier, nothing pinned, filled or attached (so it
/// holds no sandbox's state; dropped, it is freed). [`attach_preloaded`] gives
/// it to a tap, so a sandbox start does not wait for the ELF load and the
/// verifier, which are most of its host network setup.
pub struct Preloaded {
    bpf: Ebpf,
}

/// Loads and verifies a program instance for a later [`attach_preloaded`].
pub fn preload() -> Result<Preloaded, BpfError> {
    ensure_bpffs()?;
    let mut bpf = load_object()?;
    for prog in PROGRAMS {
        let p: &mut SchedClassifier = bpf
            .program_mut(prog)
            .ok_or_else(|| BpfError::Load(format!("program {prog} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| BpfError::Load(e.to_string()))?;
        p.load()
            .map_err(|e| BpfError::Load(format!("verifier rejected {prog}: {e:?}")))?;
    }
    Ok(Preloaded { bpf })
}

impl Preloaded {
    /// Whether its host-shared maps are still the ones pinned under
    /// [`host_pins`]. why: a pin removed and created again (another build's
    /// maps cleared by an operator) would leave this instance reading a map
    /// no agent writes any more.
    pub fn is_current(&self) -> bool {
        let pins = host_pins();
        [SANDBOXES_PIN, SBGEN_PIN].iter().all(|name| {
            let mine = match self.bpf.map(name) {
                Some(Map::HashMap(d)) | Some(Map::Array(d)) => d.info().ok().map(|i| i.id()),
                _ => None,
            };
            let pinned = MapData::from_pin(Path::new(&pins).join(name))
                .ok()
                .and_then(|d| d.info().ok().map(|i| i.id()));
            mine.is_some() && mine == pinned
        })
    }
}

/// Loads a fresh instance of the program, pins its maps, writes `policy` and the
/// node's addresses `hosts`, and attaches `guest_out`/`guest_in` to the tap's
/// ingress/egress (TCX links, pinned).
pub fn attach(
    tap: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    policy: &Compiled,
    hosts: &[Ipv4Addr],
) -> Result<(), BpfError> {
    attach_with(tap, ip, mac, policy, hosts, None)
}

/// [`attach`] with an instance loaded ahead ([`preload`]) instead of a fresh one.
pub fn attach_preloaded(
    tap: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    policy: &Compiled,
    hosts: &[Ipv4Addr],
    pre: Preloaded,
) -> Result<(), BpfError> {
    attach_with(tap, ip, mac, policy, hosts, Some(pre))
}

fn attach_with(
    tap: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    policy: &Compiled,
    hosts: &[Ipv4Addr],
    pre: Option<Preloaded>,
) -> Result<(), BpfError> {
    ensure_bpffs()?;
    let dir = pin_dir(tap);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| BpfError::Fs {
        path: dir.display().to_string(),
        source,
    })?;
    let result = attach_inner(tap, &dir, ip, mac, policy, hosts, pre);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Loads a fresh program instance, pins its maps under `dir` and fills them;
/// nothing is attached yet.
fn load_and_fill(
    tap: &str,
    dir: &Path,
    ip: Ipv4Addr,
    mac: [u8; 6],
    policy: &Compiled,
    hosts: &[Ipv4Addr],
    pre: Option<Preloaded>,
) -> Result<Ebpf, BpfError> {
    let bpf = match pre {
        Some(p) => p.bpf,
        None => load_object()?,
    };
    let map_err = |reason: String| BpfError::Map {
        tap: tap.into(),
        reason,
    };
    for name in MAPS {
        let m = bpf
            .map(name)
            .ok_or_else(|| map_err(format!("map {name} missing from the object")))?;
        m.pin(dir.join(name))
            .map_err(|e| map_err(format!("pin {name}: {e}")))?;
    }
    write_slot(tap, 0, policy)?;
    let mut cfg = SandboxCfg {
        ip: nbo(ip),
        mac,
        ..SandboxCfg::default()
    };
    set_defaults(&mut cfg, 0, policy);
    write_config(tap, cfg)?;
    set_host_addresses(tap, hosts)?;
    Ok(bpf)
}

fn attach_inner(
    tap: &str,
    dir: &Path,
    ip: Ipv4Addr,
    mac: [u8; 6],
    policy: &Compiled,
    hosts: &[Ipv4Addr],
    pre: Option<Preloaded>,
) -> Result<(), BpfError> {
    let mut bpf = load_and_fill(tap, dir, ip, mac, policy, hosts, pre)?;
    // why: TCX links (pinnable) need Linux 6.6; older kernels (Debian 12's 6.1)
    // get cls_bpf filters on a clsact qdisc, which live as long as the tap.
    // HEARTH_TC_ATTACH=netlink forces the old path (to test it on new kernels).
    let tcx = std::env::var("HEARTH_TC_ATTACH").as_deref() != Ok("netlink")
        && aya::util::KernelVersion::current()
            .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
            .unwrap_or(false);
    if !tcx {
        aya::programs::tc::qdisc_add_clsact(tap).map_err(|e| BpfError::Attach {
            tap: tap.into(),
            reason: format!("add clsact qdisc: {e}"),
        })?;
    }
    for (prog, hook, link) in [
        ("guest_out", TcAttachType::Ingress, "link_guest_out"),
        ("guest_in", TcAttachType::Egress, "link_guest_in"),
    ] {
        let attach_err = |reason: String| BpfError::Attach {
            tap: tap.into(),
            reason,
        };
        let p: &mut SchedClassifier = bpf
            .program_mut(prog)
            .ok_or_else(|| attach_err(format!("program {prog} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
        if p.fd().is_err() {
            p.load()
                .map_err(|e| attach_err(format!("verifier rejected {prog}: {e:?}")))?;
        }
        if tcx {
            let id = p
                .attach_with_options(tap, hook, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| attach_err(format!("{prog}: {e}")))?;
            let l = p
                .take_link(id)
                .map_err(|e| attach_err(format!("{prog}: {e}")))?;
            let fd: FdLink = l
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(e.to_string()))?;
            fd.pin(dir.join(link))
                .map_err(|e| attach_err(format!("pin {link}: {e}")))?;
        } else {
            let id = p
                .attach_with_options(tap, hook, TcAttachOptions::Netlink(NlOptions::default()))
                .map_err(|e| attach_err(format!("{prog}: {e}")))?;
            let l = p
                .take_link(id)
                .map_err(|e| attach_err(format!("{prog}: {e}")))?;
            // why: a cls_bpf filter lives as long as the tap; dropping the link
            // would remove it when this process exits.
            std::mem::forget(l);
        }
    }
    Ok(())
}

fn open_map(tap: &str, name: &str) -> Result<Map, BpfError> {
    let p = pin_dir(tap).join(name);
    let md = MapData::from_pin(&p).map_err(|e| BpfError::Map {
        tap: tap.into(),
        reason: format!("open {}: {e}", p.display()),
    })?;
    Map::from_map_data(md).map_err(|e| BpfError::Map {
        tap: tap.into(),
        reason: e.to_string(),
    })
}

fn config_map(tap: &str) -> Result<Array<MapData, SandboxCfg>, BpfError> {
    open_map(tap, "CONFIG")?
        .try_into()
        .map_err(|e: aya::maps::MapError| BpfError::Map {
            tap: tap.into(),
            reason: format!("CONFIG: {e}"),
        })
}

fn read_config(tap: &str) -> Result<SandboxCfg, BpfError> {
    config_map(tap)?.get(&0, 0).map_err(|e| BpfError::Map {
        tap: tap.into(),
        reason: format!("CONFIG: {e}"),
    })
}

fn write_config(tap: &str, cfg: SandboxCfg) -> Result<(), BpfError> {
    config_map(tap)?.set(0, cfg, 0).map_err(|e| BpfError::Map {
        tap: tap.into(),
        reason: format!("CONFIG: {e}"),
    })
}

fn set_defaults(cfg: &mut SandboxCfg, slot: u8, policy: &Compiled) {
    let s = usize::from(slot & 1);
    cfg.egress_default_allow[s] = u8::from(policy.egress_default_allow);
    cfg.ingress_default_allow[s] = u8::from(policy.ingress_default_allow);
}

/// Where counter `rel` (a slot of `Compiled::counters`) lives for policy `slot`.
fn counter_index(rel: u16, slot: u8) -> u16 {
    if rel < FIRST_RULE_COUNTER {
        rel
    } else {
        rel + u16::from(slot & 1) * RULE_COUNTERS_PER_SLOT
    }
}

fn tag(slot: u8, dir: Direction) -> u32 {
    let d = match dir {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    };
    (u32::from(slot & 1) * 2 + d).to_be()
}

/// Replaces the rules live and atomically: the inactive slot gets the new
/// rules, defaults and zeroed rule counters, then becomes the active one.
/// `ip` and `mac` are rewritten too (they never change for a sandbox).
pub fn update(tap: &str, ip: Ipv4Addr, mac: [u8; 6], policy: &Compiled) -> Result<(), BpfError> {
    let mut cfg = read_config(tap)?;
    let epoch = cfg.epoch.wrapping_add(1);
    let next = (epoch & 1) as u8;
    write_slot(tap, next, policy)?;
    cfg.ip = nbo(ip);
    cfg.mac = mac;
    set_defaults(&mut cfg, next, policy);
    // why: two writes; the array value is copied in place, so the defaults of
    // the new slot must be there before the epoch (whose low bit selects the
    // slot) changes. The program reads only the epoch; `active` mirrors it.
    write_config(tap, cfg)?;
    cfg.epoch = epoch;
    cfg.active = next;
    write_config(tap, cfg)
}

/// Writes policy `slot`'s rules (both directions) and zeroes its rule counters.
fn write_slot(tap: &str, slot: u8, policy: &Compiled) -> Result<(), BpfError> {
    let err = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("RULES: {e}"),
    };
    let mut trie: LpmTrie<MapData, TagAddr, RuleList> =
        open_map(tap, "RULES")?.try_into().map_err(err)?;
    let mut wanted = std::collections::HashSet::new();
    for dir in [Direction::Egress, Direction::Ingress] {
        let t = tag(slot, dir);
        for (cidr, entries) in policy.prefixes(dir) {
            let mut list = RuleList {
                prefixlen: u32::from(cidr.prefix_len()),
                ..RuleList::default()
            };
            for (raw, e) in list.r.iter_mut().zip(entries) {
                *raw = RuleRaw {
                    port_lo: e.port_lo,
                    port_hi: e.port_hi,
                    proto: e.proto,
                    action: if e.allow { 1 } else { 2 }
                        | if e.inherited { 4 } else { 0 }
                        | (e.origin.min(31) << 3),
                    counter: counter_index(e.counter, slot),
                };
            }
            let data = TagAddr {
                tag: t,
                addr: nbo(cidr.addr()),
            };
            let key = Key::new(32 + u32::from(cidr.prefix_len()), data);
            trie.insert(&key, list, 0).map_err(err)?;
            wanted.insert((key.prefix_len(), t, data.addr));
        }
    }
    // Stale prefixes of this slot (the other slot is the live policy).
    let ours = [tag(slot, Direction::Egress), tag(slot, Direction::Ingress)];
    let stale: Vec<Key<TagAddr>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let d = k.data();
            ours.contains(&d.tag) && !wanted.contains(&(k.prefix_len(), d.tag, d.addr))
        })
        .collect();
    for k in stale {
        trie.remove(&k).map_err(err)?;
    }
    let cerr = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("COUNTERS: {e}"),
    };
    let mut counters: Array<MapData, Counter> =
        open_map(tap, "COUNTERS")?.try_into().map_err(cerr)?;
    let first = counter_index(FIRST_RULE_COUNTER, slot);
    for i in first..first + RULE_COUNTERS_PER_SLOT {
        counters
            .set(u32::from(i), Counter::default(), 0)
            .map_err(cerr)?;
    }
    Ok(())
}

/// Makes the tap's HOSTS map hold exactly `hosts` (the node's own addresses).
pub fn set_host_addresses(tap: &str, hosts: &[Ipv4Addr]) -> Result<(), BpfError> {
    let err = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("HOSTS: {e}"),
    };
    let mut m: BpfHashMap<MapData, u32, u8> = open_map(tap, "HOSTS")?.try_into().map_err(err)?;
    let wanted: std::collections::HashSet<u32> = hosts.iter().map(|a| nbo(*a)).collect();
    // why: fail closed; a truncated list would leave host addresses reachable.
    if wanted.len() > MAX_HOSTS {
        return Err(BpfError::TooManyHosts {
            tap: tap.into(),
            given: wanted.len(),
            max: MAX_HOSTS,
        });
    }
    let stale: Vec<u32> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(k))
        .collect();
    for k in stale {
        m.remove(&k).map_err(err)?;
    }
    for k in wanted {
        m.insert(k, 1, 0).map_err(err)?;
    }
    Ok(())
}

/// Every counter, in the layout of `Compiled::counters` (fixed slots, then the
/// rule counters of the active policy slot).
pub fn counters(tap: &str) -> Result<Vec<Counter>, BpfError> {
    let err = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("COUNTERS: {e}"),
    };
    let slot = read_config(tap)?.active;
    let a: Array<MapData, Counter> = open_map(tap, "COUNTERS")?.try_into().map_err(err)?;
    let raw: Vec<Counter> = a.iter().map(|r| r.map_err(err)).collect::<Result<_, _>>()?;
    Ok((0..FIRST_RULE_COUNTER + RULE_COUNTERS_PER_SLOT)
        .map(|rel| {
            raw.get(usize::from(counter_index(rel, slot)))
                .copied()
                .unwrap_or_default()
        })
        .collect())
}

/// The active policy slot (0 or 1); it flips on every update.
pub fn active_slot(tap: &str) -> Result<u8, BpfError> {
    Ok(read_config(tap)?.active & 1)
}

const _: () = assert!(FIRST_RULE_COUNTER + 2 * RULE_COUNTERS_PER_SLOT <= MAX_COUNTERS);

/// Removes the pins (links detach once the tap is gone or here, when the pin
/// was the last reference).
pub fn detach(tap: &str) -> Result<(), BpfError> {
    let dir = pin_dir(tap);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Fs {
            path: dir.display().to_string(),
            source,
        }),
    }
}

/// The ifindex a pinned TCX link is attached to; 0 once its device is gone
/// (the kernel detaches a TCX link when its device is unregistered, in
/// whatever network namespace that was).
fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd.
    let mut get = [0u64; 3];
    get[0] = c.as_ptr() as u64;
    // SAFETY: `get` is a valid BPF_OBJ_GET attribute whose pathname points to
    // `c`, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7, // BPF_OBJ_GET
            get.as_mut_ptr(),
            std::mem::size_of_val(&get),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose
    // `tcx` member starts with the ifindex (offset 16).
    let mut info = [0u8; 48];
    // union bpf_attr for BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | (u64::from(info.len() as u32) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `attr` names `fd` (open) and `info`, a buffer of info_len bytes
    // alive for the call; the kernel writes at most that many.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            15, // BPF_OBJ_GET_INFO_BY_FD
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let typ = u32::from_ne_bytes(info[0..4].try_into().unwrap_or_default());
    if typ != BPF_LINK_TYPE_TCX {
        return Err(std::io::Error::other(format!(
            "{} is a BPF link of type {typ}, not TCX",
            path.display()
        )));
    }
    Ok(u32::from_ne_bytes(
        info[16..20].try_into().unwrap_or_default(),
    ))
}

/// Whether the pins of `tap` are used by a program that runs somewhere:
/// a pinned TCX link still attached to a device (of any namespace), or,
/// without link pins (cls_bpf filters on kernels before 6.6, or an instance
/// loaded but not attached yet), a loaded program that uses its `CONFIG`.
/// Unknown (a pin that cannot be read) counts as in use.
pub fn pins_in_use(tap: &str) -> bool {
    let dir = pin_dir(tap);
    let mut links = 0;
    for link in ["link_guest_out", "link_guest_in"] {
        let p = dir.join(link);
        if !p.exists() {
            continue;
        }
        links += 1;
        match pinned_link_ifindex(&p) {
            Ok(0) => {}
            Ok(_) | Err(_) => return true,
        }
    }
    if links > 0 {
        return false;
    }
    let config = dir.join("CONFIG");
    if !config.exists() {
        return false;
    }
    pinned_map_used(&config)
}

/// Whether a loaded program uses the map pinned at `pin` (true when that
/// cannot be told: the pins stay).
fn pinned_map_used(pin: &Path) -> bool {
    let Some(id) = MapData::from_pin(pin)
        .ok()
        .and_then(|m| m.info().ok())
        .map(|i| i.id())
    else {
        return true;
    };
    // why: a program freed while the list is walked is no user (Err); a
    // kernel that does not report map ids (None) leaves the pins in place.
    aya::programs::loaded_programs().any(|p| match p.map(|p| p.map_ids()) {
        Ok(Ok(Some(ids))) => ids.contains(&id),
        Ok(Ok(None)) => true,
        Ok(Err(_)) | Err(_) => false,
    })
}

/// Removes the host map pins (`HOST_PINS_ROOT/netns-<inode>`) of network
/// namespaces not in `live` (see `registry::live_namespaces`): their taps
/// went with them, so no program uses them. Call it after
/// `registry::purge_gone_namespaces`: a namespace whose registry directory
/// is still there has an agent this process cannot see (another PID
/// namespace), and keeps its pins. Returns the inodes removed.
pub fn purge_gone_namespace_pins(live: &std::collections::HashSet<u64>) -> Vec<u64> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(HOST_PINS_ROOT) else {
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
        if ino == 0 || live.contains(&ino) || ino == crate::registry::netns_id() {
            continue;
        }
        let registry = Path::new(crate::registry::REGISTRY_DIR).join(format!("netns-{ino}"));
        if registry.exists() {
            continue;
        }
        // why: a namespace that looks gone from here (another PID
        // namespace's /proc, a restarting agent) may still have VMs whose
        // programs use these maps: removing the pins would split the host
        // map (new sandboxes missing from the old programs' copy).
        let in_use = std::fs::read_dir(e.path())
            .map(|rd| rd.flatten().any(|m| pinned_map_used(&m.path())))
            .unwrap_or(true);
        if in_use {
            continue;
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(ino);
        }
    }
    removed
}

/// Taps that have pins (for orphan cleanup).
pub fn pinned_taps() -> Vec<String> {
    std::fs::read_dir(BPFFS_ROOT)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The real program on the real kernel (needs root): packets are fed to
/// `guest_out`/`guest_in` with BPF_PROG_TEST_RUN, maps written as in
/// production, but nothing is attached to a device.
#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, AsRawFd};

    use super::*;
    use crate::policy::{compile, Action, Policy, Rule, RuleSet};

    const OK: u32 = 0; // TC_ACT_OK
    const SHOT: u32 = 2; // TC_ACT_SHOT
    const MAC: [u8; 6] = [0x02, 0x48, 0, 0, 0, 5];
    const G: [u8; 4] = [10, 250, 0, 5];

    struct Prog {
        tap: String,
        bpf: Ebpf,
    }

    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }

    fn policy(egress: RuleSet, ingress: RuleSet) -> Compiled {
        compile(&Policy { egress, ingress }, &[]).unwrap()
    }

    fn set(default: Action, allow: &[&str], deny: &[&str]) -> RuleSet {
        let mut rules: Vec<Rule> = allow
            .iter()
            .map(|s| Rule::parse(Action::Allow, s).unwrap())
            .collect();
        rules.extend(deny.iter().map(|s| Rule::parse(Action::Deny, s).unwrap()));
        RuleSet { default, rules }
    }

    impl Prog {
        fn load(name: &str, c: &Compiled, hosts: &[Ipv4Addr]) -> Prog {
            ensure_bpffs().unwrap();
            let tap = format!("hthut{name}{}", std::process::id() % 100000);
            let dir = pin_dir(&tap);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut bpf =
                load_and_fill(&tap, &dir, Ipv4Addr::from(G), MAC, c, hosts, None).unwrap();
            for name in ["guest_out", "guest_in"] {
                let p: &mut SchedClassifier = bpf.program_mut(name).unwrap().try_into().unwrap();
                p.load().unwrap();
            }
            Prog { tap, bpf }
        }

        /// [`Prog::load`] with an instance loaded and verified ahead ([`preload`]).
        fn load_preloaded(name: &str, c: &Compiled, hosts: &[Ipv4Addr]) -> Prog {
            let pre = preload().unwrap();
            assert!(
                pre.is_current(),
                "a fresh instance uses the pinned host maps"
            );
            let tap = format!("hthup{name}{}", std::process::id() % 100000);
            let dir = pin_dir(&tap);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let bpf =
                load_and_fill(&tap, &dir, Ipv4Addr::from(G), MAC, c, hosts, Some(pre)).unwrap();
            Prog { tap, bpf }
        }

        fn run(&self, prog: &str, pkt: &[u8]) -> u32 {
            let p: &SchedClassifier = self.bpf.program(prog).unwrap().try_into().unwrap();
            let fd = p.fd().unwrap().as_fd().as_raw_fd();
            let mut attr = TestRun {
                prog_fd: fd as u32,
                data_size_in: pkt.len() as u32,
                data_in: pkt.as_ptr() as u64,
                repeat: 1,
                ..TestRun::default()
            };
            // SAFETY: attr is a valid BPF_PROG_TEST_RUN attribute whose data_in
            // points to `pkt`, alive for the call; no output buffers.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    10, // BPF_PROG_TEST_RUN
                    &mut attr as *mut TestRun,
                    std::mem::size_of::<TestRun>(),
                )
            };
            assert_eq!(rc, 0, "test run: {}", std::io::Error::last_os_error());
            attr.retval
        }

        fn out(&self, pkt: &[u8]) -> u32 {
            self.run("guest_out", pkt)
        }

        fn inn(&self, pkt: &[u8]) -> u32 {
            self.run("guest_in", pkt)
        }

        fn counter(&self, slot: u16) -> u64 {
            counters(&self.tap).unwrap()[usize::from(slot)].packets
        }
    }

    impl Drop for Prog {
        fn drop(&mut self) {
            let _ = detach(&self.tap);
        }
    }

    fn ip(s: &str) -> [u8; 4] {
        s.parse::<Ipv4Addr>().unwrap().octets()
    }

    /// Ethernet + IPv4 header (+ `l4`); `len` pads the IP packet to that size.
    fn packet(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8], len: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        b.extend_from_slice(&MAC);
        b.extend_from_slice(&[0x08, 0x00]);
        b.extend_from_slice(&ipv4(src, dst, proto, l4, len));
        b
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8], len: usize) -> Vec<u8> {
        let total = (20 + l4.len()).max(len);
        let mut b = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            proto,
            0,
            0,
        ];
        b.extend_from_slice(&src);
        b.extend_from_slice(&dst);
        b.extend_from_slice(l4);
        b.resize(total, 0);
        b
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        packet(src, dst, 6, &t, 0)
    }

    fn udp_l4(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[5] = 8;
        u
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        packet(src, dst, 17, &udp_l4(sport, dport), 0)
    }

    /// An ICMP port unreachable from `src` to `dst` quoting a UDP datagram
    /// `qsrc:qsport -> qdst:qdport`; `len` pads the whole IP packet.
    #[allow(clippy::too_many_arguments)]
    fn icmp_err(
        src: [u8; 4],
        dst: [u8; 4],
        qsrc: [u8; 4],
        qdst: [u8; 4],
        qsport: u16,
        qdport: u16,
        len: usize,
    ) -> Vec<u8> {
        let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&ipv4(qsrc, qdst, 17, &udp_l4(qsport, qdport), 0));
        packet(src, dst, 1, &m, len)
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const RST: u8 = 0x04;
    const PSH_ACK: u8 = 0x18;

    #[test]
    fn icmp_errors_pass_only_along_the_quoted_flow() {
        let d = ip("192.0.2.10");
        let meta = ip("169.254.169.254");
        let other = ip("10.250.0.9");
        let c = policy(
            set(Action::Deny, &["192.0.2.10/32:53:udp"], &[]),
            set(Action::Allow, &[], &[]),
        );
        let p = Prog::load("c1", &c, &[]);
        assert_eq!(p.out(&udp(G, d, 40000, 53)), OK, "the allowed flow opens");
        // The guest's error about a datagram it received from d, sent to d.
        assert_eq!(p.out(&icmp_err(G, d, d, G, 53, 40000, 0)), OK);
        // The same quote, sent to denied addresses: dropped.
        for to in [meta, other, ip("192.0.2.11")] {
            assert_eq!(p.out(&icmp_err(G, to, d, G, 53, 40000, 0)), SHOT, "{to:?}");
        }
        // A quote of a packet the guest sent (not received) is no reply either.
        assert_eq!(p.out(&icmp_err(G, d, G, d, 40000, 53, 0)), SHOT);
        // Oversized errors are dropped.
        assert_eq!(p.out(&icmp_err(G, d, d, G, 53, 40000, 1000)), SHOT);
        // To the guest: only from the quoted destination, quoting the guest's packet.
        assert_eq!(p.inn(&icmp_err(d, G, G, d, 40000, 53, 0)), OK);
        assert_eq!(p.inn(&icmp_err(meta, G, G, d, 40000, 53, 0)), SHOT);
        assert_eq!(p.inn(&icmp_err(d, G, other, d, 40000, 53, 0)), SHOT);
    }

    #[test]
    fn flows_opened_from_outside_allow_only_replies_on_their_tuple() {
        let d = ip("198.51.100.7");
        // Egress denies d; ingress allows everything.
        let c = policy(
            set(Action::Deny, &["203.0.113.1/32:443:tcp"], &[]),
            set(Action::Allow, &[], &[]),
        );
        let p = Prog::load("m3", &c, &[]);
        assert_eq!(p.inn(&tcp(d, G, 5555, 8080, SYN)), OK, "inbound SYN opens");
        assert_eq!(
            p.out(&tcp(G, d, 8080, 5555, PSH_ACK)),
            SHOT,
            "no data before the handshake"
        );
        assert_eq!(p.out(&tcp(G, d, 8080, 5555, SYN | ACK)), OK, "the SYN-ACK");
        assert_eq!(p.inn(&tcp(d, G, 5555, 8080, SYN)), OK, "retransmitted SYN");
        assert_eq!(p.out(&tcp(G, d, 8080, 5555, PSH_ACK)), SHOT);
        assert_eq!(p.inn(&tcp(d, G, 5555, 8080, ACK)), OK, "handshake done");
        assert_eq!(p.out(&tcp(G, d, 8080, 5555, PSH_ACK)), OK);
        assert_eq!(p.inn(&tcp(d, G, 5555, 8080, SYN)), OK, "a stray SYN");
        assert_eq!(
            p.out(&tcp(G, d, 8080, 5555, PSH_ACK)),
            OK,
            "does not reset it"
        );
        assert_eq!(p.out(&tcp(G, d, 8080, 5556, PSH_ACK)), SHOT, "other tuple");
        assert_eq!(p.out(&tcp(G, d, 8081, 5555, PSH_ACK)), SHOT, "other tuple");
        assert_eq!(p.out(&tcp(G, d, 8080, 5555, SYN)), SHOT, "a new flow to d");
        assert_eq!(p.out(&tcp(G, d, 8080, 5555, RST | ACK)), OK);
        assert_eq!(p.out(&tcp(G, d, 8080, 5555, PSH_ACK)), SHOT, "RST ended it");
        // A closed port answers the SYN with RST at once.
        assert_eq!(p.inn(&tcp(d, G, 5557, 22, SYN)), OK);
        assert_eq!(p.out(&tcp(G, d, 22, 5557, RST | ACK)), OK);

        // UDP: only from the port it came to, to the exact source.
        assert_eq!(p.inn(&udp(d, G, 7000, 9000)), OK);
        assert_eq!(p.out(&udp(G, d, 9000, 7000)), OK, "the reply");
        assert_eq!(p.out(&udp(G, d, 9001, 7000)), SHOT);
        assert_eq!(p.out(&udp(G, d, 9000, 7001)), SHOT);

        // The guest's own flows live in their own map: an inbound spray larger
        // than the flow table does not evict them.
        let a = ip("203.0.113.1");
        assert_eq!(p.out(&tcp(G, a, 41000, 443, SYN)), OK);
        for i in 0..(MAX_FLOWS + 1000) {
            let src = [100, 64, (i >> 8) as u8, i as u8];
            assert_eq!(p.inn(&udp(src, G, 1000, 2000)), OK);
        }
        assert_eq!(
            p.inn(&tcp(a, G, 443, 41000, SYN | ACK)),
            OK,
            "still tracked"
        );
    }

    #[test]
    fn established_flows_are_judged_again_after_a_policy_change_and_expire() {
        let a = ip("203.0.113.1");
        let allow_a = policy(
            set(Action::Deny, &["203.0.113.1/32:443:tcp"], &[]),
            set(Action::Deny, &[], &[]),
        );
        let p = Prog::load("m2", &allow_a, &[]);
        let g = Ipv4Addr::from(G);
        assert_eq!(p.out(&tcp(G, a, 41000, 443, SYN)), OK);
        assert_eq!(p.inn(&tcp(a, G, 443, 41000, SYN | ACK)), OK);
        assert_eq!(p.out(&tcp(G, a, 41000, 443, PSH_ACK)), OK);
        // Another policy that still allows a: the connection goes on.
        let still = policy(
            set(Action::Allow, &[], &["10.0.0.0/8"]),
            set(Action::Deny, &[], &[]),
        );
        update(&p.tap, g, MAC, &still).unwrap();
        assert_eq!(p.out(&tcp(G, a, 41000, 443, PSH_ACK)), OK);
        assert_eq!(p.inn(&tcp(a, G, 443, 41000, PSH_ACK)), OK);
        // Now denied: the next packet either way is dropped, the flow deleted.
        let denied = policy(set(Action::Deny, &[], &[]), set(Action::Deny, &[], &[]));
        update(&p.tap, g, MAC, &denied).unwrap();
        assert_eq!(p.inn(&tcp(a, G, 443, 41000, PSH_ACK)), SHOT);
        assert_eq!(p.counter(13), 1, "counted as denied after a change");
        update(&p.tap, g, MAC, &allow_a).unwrap();
        assert_eq!(
            p.out(&tcp(G, a, 41000, 443, PSH_ACK)),
            SHOT,
            "the flow is gone, not just paused"
        );
        // RST ends a flow.
        assert_eq!(p.out(&tcp(G, a, 41001, 443, SYN)), OK);
        assert_eq!(p.out(&tcp(G, a, 41001, 443, RST)), OK);
        assert_eq!(p.inn(&tcp(a, G, 443, 41001, PSH_ACK)), SHOT);
        // An idle flow expires: age a UDP flow by rewriting its last-seen time.
        let c = policy(
            set(Action::Deny, &["203.0.113.1/32:53:udp"], &[]),
            set(Action::Deny, &[], &[]),
        );
        update(&p.tap, g, MAC, &c).unwrap();
        assert_eq!(p.out(&udp(G, a, 42000, 53)), OK);
        assert_eq!(p.inn(&udp(a, G, 53, 42000)), OK);
        let mut flows: BpfHashMap<MapData, [u8; 12], [u8; 24]> =
            open_map(&p.tap, "EFLOWS").unwrap().try_into().unwrap();
        let keys: Vec<[u8; 12]> = flows.keys().map(Result::unwrap).collect();
        for k in keys {
            let mut v = flows.get(&k, 0).unwrap();
            v[..8].copy_from_slice(&1u64.to_ne_bytes());
            flows.insert(k, v, 0).unwrap();
        }
        assert_eq!(p.inn(&udp(a, G, 53, 42000)), SHOT, "expired");
        assert!(p.counter(14) >= 1);
    }

    /// `packet` with the IPv4 fragment field set (offset in 8-byte units).
    fn fragment(mut pkt: Vec<u8>, id: u16, more: bool, offset: u16) -> Vec<u8> {
        pkt[18..20].copy_from_slice(&id.to_be_bytes());
        let f = offset | if more { 0x2000 } else { 0 };
        pkt[20..22].copy_from_slice(&f.to_be_bytes());
        pkt
    }

    #[test]
    fn later_fragments_pass_only_after_an_allowed_first_fragment() {
        let ok = ip("192.0.2.10");
        let denied = ip("192.0.2.11");
        let c = policy(
            set(Action::Deny, &["192.0.2.10/32:53:udp"], &[]),
            set(Action::Deny, &[], &[]),
        );
        let p = Prog::load("frag", &c, &[]);
        assert_eq!(p.out(&fragment(udp(G, ok, 40000, 53), 7, true, 0)), OK);
        assert_eq!(
            p.out(&fragment(packet(G, ok, 17, &[0; 16], 0), 7, true, 2)),
            OK
        );
        assert_eq!(
            p.out(&fragment(packet(G, ok, 17, &[0; 16], 0), 7, false, 4)),
            OK
        );
        // No first fragment, or a denied one: the rest is dropped.
        assert_eq!(
            p.out(&fragment(packet(G, ok, 17, &[0; 16], 0), 8, false, 4)),
            SHOT
        );
        assert_eq!(
            p.out(&fragment(udp(G, denied, 40000, 53), 9, true, 0)),
            SHOT
        );
        assert_eq!(
            p.out(&fragment(packet(G, denied, 17, &[0; 16], 0), 9, false, 2)),
            SHOT
        );
        // Inbound likewise.
        assert_eq!(
            p.inn(&fragment(packet(ok, G, 17, &[0; 16], 0), 7, false, 2)),
            SHOT
        );
        assert_eq!(p.inn(&fragment(udp(ok, G, 53, 40000), 10, true, 0)), OK);
        assert_eq!(
            p.inn(&fragment(packet(ok, G, 17, &[0; 16], 0), 10, false, 2)),
            OK
        );
    }

    #[test]
    fn an_explicit_ingress_deny_of_a_host_address_wins() {
        let h1 = ip("192.0.2.2");
        let h2 = ip("192.0.2.3");
        let c = policy(
            set(Action::Allow, &[], &[]),
            set(Action::Deny, &[], &["192.0.2.2/32"]),
        );
        let hosts = [Ipv4Addr::from(h1), Ipv4Addr::from(h2)];
        let p = Prog::load("m4", &c, &hosts);
        assert_eq!(p.inn(&tcp(h1, G, 5000, 8080, SYN)), SHOT, "explicit deny");
        assert_eq!(p.inn(&tcp(h2, G, 5000, 8080, SYN)), OK, "the proxy");
        assert_eq!(
            p.inn(&tcp(ip("198.51.100.1"), G, 5000, 8080, SYN)),
            SHOT,
            "default deny"
        );
    }

    /// TCP `src:sport -> dst:dport` with `flags`, the IP packet padded to `len`.
    fn tcp_len(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        flags: u8,
        len: usize,
    ) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        packet(src, dst, 6, &t, len)
    }

    /// The counter slot labelled exactly `label` in `c`.
    fn slot_of(c: &Compiled, label: &str) -> u16 {
        c.counters
            .iter()
            .find(|l| l.label == label)
            .unwrap_or_else(|| panic!("no counter {label}: {:?}", c.counters))
            .slot
    }

    fn counter_full(p: &Prog, slot: u16) -> Counter {
        counters(&p.tap).unwrap()[usize::from(slot)]
    }

    #[test]
    fn a_rules_counters_count_every_packet_and_byte_of_its_flows() {
        let a = ip("203.0.113.1");
        let d = ip("198.51.100.9");
        let c = policy(
            set(
                Action::Deny,
                &["203.0.113.1/32:443:tcp"],
                &["198.51.100.0/24:22"],
            ),
            set(Action::Deny, &[], &[]),
        );
        let allow = slot_of(&c, "egress allow 203.0.113.1/32:443:tcp");
        let deny = slot_of(&c, "egress deny 198.51.100.0/24:22");
        let p = Prog::load("rc", &c, &[]);
        let mut want = Counter::default();
        let sent = |pkt: Vec<u8>, out: bool, want: &mut Counter| {
            let r = if out { p.out(&pkt) } else { p.inn(&pkt) };
            assert_eq!(r, OK, "a packet of the allowed flow");
            want.packets += 1;
            want.bytes += pkt.len() as u64;
        };
        sent(tcp_len(G, a, 41000, 443, SYN, 60), true, &mut want);
        sent(tcp_len(a, G, 443, 41000, SYN | ACK, 60), false, &mut want);
        for i in 0..10 {
            sent(tcp_len(G, a, 41000, 443, PSH_ACK, 1500), true, &mut want);
            sent(
                tcp_len(a, G, 443, 41000, PSH_ACK, 100 + i * 10),
                false,
                &mut want,
            );
        }
        let got = counter_full(&p, allow);
        assert_eq!(
            (got.packets, got.bytes),
            (want.packets, want.bytes),
            "every packet and byte of the flow, both ways, counts to its rule"
        );
        // A denied rule counts the dropped attempts.
        for _ in 0..3 {
            assert_eq!(p.out(&tcp_len(G, d, 41001, 22, SYN, 60)), SHOT);
        }
        let got = counter_full(&p, deny);
        assert_eq!((got.packets, got.bytes), (3, 3 * 74), "3 SYNs of 74 bytes");

        // After a change that still allows it, the flow is judged again once and
        // its packets count to the new policy's rule (counters start at zero).
        let g = Ipv4Addr::from(G);
        let c2 = policy(
            set(Action::Deny, &["203.0.113.0/24:443:tcp"], &[]),
            set(Action::Deny, &[], &[]),
        );
        let allow2 = slot_of(&c2, "egress allow 203.0.113.0/24:443:tcp");
        update(&p.tap, g, MAC, &c2).unwrap();
        let mut want = Counter::default();
        sent(tcp_len(a, G, 443, 41000, PSH_ACK, 400), false, &mut want);
        sent(tcp_len(G, a, 41000, 443, PSH_ACK, 500), true, &mut want);
        let got = counter_full(&p, allow2);
        assert_eq!(
            (got.packets, got.bytes),
            (want.packets, want.bytes),
            "the re-judged packet counted once, then the flow's"
        );
        // A flow allowed by the default counts to the default only on its
        // opening packet; its later packets are replies.
        let c3 = policy(set(Action::Allow, &[], &[]), set(Action::Deny, &[], &[]));
        update(&p.tap, g, MAC, &c3).unwrap();
        assert_eq!(p.out(&tcp_len(G, d, 41002, 80, SYN, 60)), OK);
        assert_eq!(p.inn(&tcp_len(d, G, 80, 41002, SYN | ACK, 60)), OK);
        let all = counters(&p.tap).unwrap();
        assert_eq!(all[1].packets, 1, "egress default allow: the SYN");
        assert_eq!(
            all[usize::from(FIRST_RULE_COUNTER)..]
                .iter()
                .map(|c| c.packets)
                .sum::<u64>(),
            0,
            "no rule counted a flow no rule allowed"
        );
    }

    /// Frames from the guest with another source MAC, another IPv4 source, or
    /// an ARP naming another sender are dropped and counted; its own pass.
    #[test]
    fn spoofed_frames_from_the_guest_are_dropped_and_its_own_pass() {
        let d = ip("198.51.100.9");
        let c = policy(set(Action::Allow, &[], &[]), set(Action::Allow, &[], &[]));
        let p = Prog::load("sp", &c, &[]);
        let own = udp(G, d, 40000, 53);
        assert_eq!(p.out(&own), OK, "its own MAC and address");
        let mut mac = own.clone();
        mac[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        assert_eq!(p.out(&mac), SHOT, "another source MAC");
        let other_ip = udp(ip("10.250.0.6"), d, 40000, 53);
        assert_eq!(p.out(&other_ip), SHOT, "another source address");
        let arp = |sha: [u8; 6], sip: [u8; 4]| {
            let mut b = vec![0xff; 6];
            b.extend_from_slice(&MAC);
            b.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            b.extend_from_slice(&sha);
            b.extend_from_slice(&sip);
            b.extend_from_slice(&[0; 6]);
            b.extend_from_slice(&[169, 254, 1, 1]);
            b
        };
        assert_eq!(p.out(&arp(MAC, G)), OK, "its own ARP");
        assert_eq!(
            p.out(&arp(MAC, ip("10.250.0.6"))),
            SHOT,
            "ARP with another sender address"
        );
        assert_eq!(
            p.out(&arp([0x02, 0, 0, 0, 0, 0x99], G)),
            SHOT,
            "ARP with another sender MAC"
        );
        let mut truncated = arp(MAC, G);
        truncated.truncate(30);
        assert_eq!(p.out(&truncated), SHOT, "a truncated ARP");
        assert_eq!(p.counter(0), 4, "the spoofed frames counted");
        assert_eq!(p.out(&own), OK, "its own still pass");
    }

    #[test]
    fn an_instance_loaded_ahead_enforces_the_policy_written_later() {
        let h1 = ip("192.0.2.2");
        let c = policy(
            set(Action::Allow, &[], &["203.0.113.0/24:80"]),
            set(Action::Deny, &[], &[]),
        );
        let p = Prog::load_preloaded("pre", &c, &[Ipv4Addr::from(h1)]);
        let dst = ip("203.0.113.9");
        assert_eq!(p.out(&tcp(G, dst, 5000, 80, SYN)), SHOT, "denied port");
        assert_eq!(p.out(&tcp(G, dst, 5000, 81, SYN)), OK, "default allow");
        assert_eq!(p.out(&tcp(G, h1, 5000, 81, SYN)), SHOT, "host address");
        assert_eq!(
            p.inn(&tcp(ip("198.51.100.1"), G, 5000, 8080, SYN)),
            SHOT,
            "ingress default deny"
        );
    }

    #[test]
    fn too_many_host_addresses_fail_closed() {
        let c = policy(set(Action::Allow, &[], &[]), set(Action::Allow, &[], &[]));
        let p = Prog::load("hosts", &c, &[Ipv4Addr::new(192, 0, 2, 2)]);
        let many: Vec<Ipv4Addr> = (0..=MAX_HOSTS as u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        let e = set_host_addresses(&p.tap, &many).unwrap_err();
        assert!(e.to_string().contains("holds 256"), "{e}");
        // The old list is untouched.
        assert_eq!(p.out(&tcp(G, ip("192.0.2.2"), 1000, 80, SYN)), SHOT);
        assert_eq!(p.out(&tcp(G, ip("10.0.0.1"), 1000, 80, SYN)), OK);
        let _ = &p.bpf;
    }

    /// The tag of a live agent (registered for this test process's lifetime)
    /// for entries this test process adds to the host map. why: entries of an
    /// unregistered tag without a route are purged by any agent registering
    /// meanwhile.
    fn test_owner() -> u32 {
        static OWNER: std::sync::OnceLock<(crate::registry::Registration, tempfile::TempDir)> =
            std::sync::OnceLock::new();
        let (r, _) = OWNER.get_or_init(|| {
            let state = tempfile::tempdir().unwrap();
            let n = std::process::id();
            let pool = format!("10.249.{}.0/24", n % 250).parse().unwrap();
            let r = crate::registry::register(pool, state.path(), |_| {}).unwrap();
            (r, state)
        });
        r.tag()
    }

    /// An address in 10.250.`base`+0..63.1..250 derived from the pid, so
    /// concurrent runs on one host do not share host-wide map entries.
    fn pid_addr(base: u8) -> Ipv4Addr {
        let n = std::process::id();
        Ipv4Addr::new(10, 250, base + (n % 64) as u8, 1 + ((n / 64) % 250) as u8)
    }

    #[test]
    fn sandboxes_of_another_pool_on_the_host_open_only_through_rules_of_their_pool() {
        // A sandbox of another agent (a /24 pool) in the shared map.
        let other = pid_addr(64);
        let o = other.octets();
        ensure_bpffs().unwrap();
        let open_all = policy(set(Action::Allow, &["0.0.0.0/0"], &[]), RuleSet::default());
        let p = Prog::load("sb", &open_all, &[]);
        add_host_sandbox(other, 24, test_owner()).unwrap();
        // Another agent cannot claim it, nor remove it.
        let claimed = add_host_sandbox(other, 24, test_owner() ^ 1);
        remove_host_sandbox(other, test_owner() ^ 1).unwrap();
        let kept = host_sandboxes().unwrap().iter().any(|(a, _)| *a == other);
        let before = p.counter(crate::policy::C_OUT_SANDBOX_DENY);
        let verdict = p.out(&tcp(G, o, 41000, 8080, SYN));
        let after = p.counter(crate::policy::C_OUT_SANDBOX_DENY);
        // An allow of the pool (or inside it) opens it, a wider one does not.
        let pool_rule = format!("{}.{}.{}.0/24:8080", o[0], o[1], o[2]);
        let pool = policy(
            set(Action::Deny, &[pool_rule.as_str(), "10.0.0.0/8"], &[]),
            RuleSet::default(),
        );
        let q = Prog::load("sb2", &pool, &[]);
        let (to_pool, wider) = (
            q.out(&tcp(G, o, 41001, 8080, SYN)),
            q.out(&tcp(G, o, 41002, 22, SYN)),
        );
        let not_a_sandbox = p.out(&tcp(G, [o[0], o[1], o[2], o[3] + 1], 41003, 8080, SYN));
        remove_host_sandbox(other, test_owner()).unwrap();
        let gone = p.out(&tcp(G, o, 41004, 8080, SYN));
        let e = claimed.expect_err("another agent's address is refused");
        assert!(e.to_string().contains("pools overlap"), "{e}");
        assert!(kept, "another agent's remove leaves the entry");
        assert_eq!(
            verdict, SHOT,
            "0.0.0.0/0 allow does not open another sandbox"
        );
        assert_eq!(after, before + 1, "counted as egress to another sandbox");
        assert_eq!(to_pool, OK, "an allow of its pool opens it");
        assert_eq!(wider, SHOT, "10.0.0.0/8 is wider than the pool");
        assert_eq!(
            not_a_sandbox, OK,
            "an address no sandbox holds is not affected"
        );
        assert_eq!(gone, OK, "removed from the map: ordinary rules again");
        assert!(!host_sandboxes().unwrap().iter().any(|(a, _)| *a == other));
    }

    /// A flow opened while its remote was no sandbox is judged again once the
    /// remote becomes one (the map's generation changed): pre-opened UDP and
    /// TCP flows to a guessable address of another pool die with the next
    /// packet instead of carrying traffic between sandboxes.
    #[test]
    fn flows_opened_before_their_remote_became_a_sandbox_are_judged_again() {
        let x = pid_addr(128);
        let o = x.octets();
        ensure_bpffs().unwrap();
        let c = policy(
            set(Action::Allow, &["0.0.0.0/0"], &[]),
            set(Action::Deny, &[], &[]),
        );
        let p = Prog::load("gen", &c, &[]);
        let opened = [
            p.out(&udp(G, o, 40000, 53)),
            p.inn(&udp(o, G, 53, 40000)),
            p.out(&tcp(G, o, 41000, 80, SYN)),
            p.inn(&tcp(o, G, 80, 41000, SYN | ACK)),
            p.out(&tcp(G, o, 41000, 80, ACK)),
        ];
        let gen = host_generation().unwrap();
        add_host_sandbox(x, 24, test_owner()).unwrap();
        let bumped = host_generation().unwrap() != gen;
        let before = p.counter(13);
        let udp_out = p.out(&udp(G, o, 40000, 53));
        let udp_in = p.inn(&udp(o, G, 53, 40000));
        let tcp_out = p.out(&tcp(G, o, 41000, 80, PSH_ACK));
        let tcp_in = p.inn(&tcp(o, G, 80, 41000, PSH_ACK));
        let rejudged = p.counter(13) - before;
        remove_host_sandbox(x, test_owner()).unwrap();
        assert_eq!(opened, [OK; 5], "flows open while x is no sandbox");
        assert!(bumped, "adding a sandbox bumps the generation");
        assert_eq!(udp_out, SHOT, "UDP to the new sandbox on an old flow");
        assert_eq!(udp_in, SHOT, "its flow is gone: no reply either");
        assert_eq!(tcp_out, SHOT, "TCP PSH/ACK on a pre-opened flow");
        assert_eq!(tcp_in, SHOT);
        assert_eq!(rejudged, 2, "both flows judged again and denied");
    }

    /// Shared maps pinned in a directory of this test's own (not the host's),
    /// removed on drop.
    struct PrivatePins(PathBuf);

    impl PrivatePins {
        fn new(name: &str) -> PrivatePins {
            ensure_bpffs().unwrap();
            let dir = PathBuf::from(format!(
                "/sys/fs/bpf/hearth-test-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            // Loading the object creates and pins its shared maps there.
            aya::EbpfLoader::new()
                .default_map_pin_directory(&dir)
                .load(OBJECT)
                .unwrap();
            PrivatePins(dir)
        }
    }

    impl Drop for PrivatePins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Host map entries of an agent that is gone (killed and never started
    /// again with its state dir) are purged when another agent registers; a
    /// live agent's and the registering agent's own are kept. With no other
    /// agent live, everything but the registering agent's own goes.
    #[test]
    fn host_map_entries_of_agents_that_are_gone_are_purged_at_registration() {
        use crate::registry::{owner_id, register_in};
        use std::collections::HashSet;
        let pins = PrivatePins::new("purge");
        let reg = tempfile::tempdir().unwrap();
        let (live, gone, me) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let ip = |last: u8| Ipv4Addr::new(10, 99, 0, last);
        let (t_live, t_gone, t_me) = (
            owner_id(live.path()).unwrap(),
            0x6006_0001,
            owner_id(me.path()).unwrap(),
        );
        let add = |a: Ipv4Addr, owner: u32| add_host_sandbox_in(&pins.0, a, 24, owner).unwrap();
        add(ip(1), t_live);
        add(ip(2), t_gone);
        add(ip(3), t_gone);
        add(ip(4), t_me);
        // The gone agent's registration: a file nobody holds.
        std::fs::write(
            reg.path().join("10.99.0.0_24"),
            format!("1 v2 {t_gone} {}\n", gone.path().display()),
        )
        .unwrap();
        let live_reg = register_in(
            reg.path(),
            "10.98.0.0/24".parse().unwrap(),
            live.path(),
            |_| {},
        )
        .unwrap();
        let gen = |p: &Path| -> u32 {
            let a: Array<MapData, u32> = shared_map(p, SBGEN_PIN)
                .unwrap()
                .unwrap()
                .try_into()
                .unwrap();
            a.get(&0, 0).unwrap()
        };
        let before = gen(&pins.0);
        // (none of these test addresses has a route: no VM uses them)
        let routes = crate::tap::host_routes().unwrap();
        let purge = |keep: &crate::registry::LiveAgents| {
            purge_host_sandboxes_in(&pins.0, &keep_set(keep), |a| {
                crate::release_if_unused(a, &routes, &mut Vec::new())
            })
            .unwrap()
        };
        let mut purged = 0;
        let mine = register_in(
            reg.path(),
            "10.99.0.0/24".parse().unwrap(),
            me.path(),
            |l| purged = purge(l),
        )
        .unwrap();
        let owners = |p: &Path| -> HashSet<(Ipv4Addr, u32)> {
            host_sandboxes_in(p)
                .unwrap()
                .into_iter()
                .map(|(a, e)| (a, e.owner))
                .collect()
        };
        let after_first = owners(&pins.0);
        let bumped = gen(&pins.0) != before;
        // The live agent stops: its entry is stale now, and the next
        // registration (no other agent live) keeps only its own.
        drop(live_reg);
        drop(mine);
        let mut purged_again = 0;
        let _again = register_in(
            reg.path(),
            "10.99.0.0/24".parse().unwrap(),
            me.path(),
            |l| purged_again = purge(l),
        )
        .unwrap();
        let after_second = owners(&pins.0);
        assert_eq!(purged, 2, "the gone agent's two entries");
        assert_eq!(
            after_first,
            HashSet::from([(ip(1), t_live), (ip(4), t_me)]),
            "a live agent's and its own entries are kept"
        );
        assert!(bumped, "flows are judged again after a purge");
        assert_eq!(purged_again, 1);
        assert_eq!(after_second, HashSet::from([(ip(4), t_me)]));
    }

    /// An entry of an agent that is not live is kept while a VM uses its
    /// address (its tap is held open, as by a QEMU that outlived its agent):
    /// the tap, its route and the entry stay. Once the tap is free, the next
    /// purge removes tap, route and entry together. A routeless entry goes
    /// at once.
    #[test]
    fn entries_of_agents_that_are_not_live_are_kept_while_their_vm_runs() {
        use std::collections::HashSet;
        let pins = PrivatePins::new("inuse");
        let n = std::process::id();
        let ip = |last: u8| Ipv4Addr::new(10, 252, (n % 250) as u8, last);
        let (busy, free) = (
            format!("hthpb{}", n % 100_000),
            format!("hthpf{}", n % 100_000),
        );
        let gone = 0xdead_0001;
        crate::tap::create(&busy, ip(1), None).unwrap();
        crate::tap::create(&free, ip(2), None).unwrap();
        let qemu = crate::tap::open_queue(&busy).unwrap();
        for last in [1, 2, 3] {
            add_host_sandbox_in(&pins.0, ip(last), 24, gone).unwrap();
        }
        let keep = HashSet::from([0xbeef_0002]);
        let purge = || {
            let routes = crate::tap::host_routes().unwrap();
            let mut removed = Vec::new();
            let n = purge_host_sandboxes_in(&pins.0, &keep, |a| {
                crate::release_if_unused(a, &routes, &mut removed)
            })
            .unwrap();
            (n, removed)
        };
        let entries = || -> HashSet<Ipv4Addr> {
            host_sandboxes_in(&pins.0)
                .unwrap()
                .into_iter()
                .map(|(a, _)| a)
                .collect()
        };
        let (purged, removed) = purge();
        let left = entries();
        let busy_kept = crate::tap::exists(&busy);
        drop(qemu);
        let (purged_later, removed_later) = purge();
        let left_later = entries();
        let busy_gone = !crate::tap::exists(&busy);
        let _ = crate::tap::delete(&busy);
        let _ = crate::tap::delete(&free);
        assert_eq!(purged, 2, "the free tap's entry and the routeless one");
        assert_eq!(removed, vec![(free.clone(), ip(2))]);
        assert_eq!(left, HashSet::from([ip(1)]), "the running VM's entry stays");
        assert!(busy_kept, "the running VM's tap stays");
        assert_eq!(purged_later, 1);
        assert_eq!(removed_later, vec![(busy.clone(), ip(1))]);
        assert!(left_later.is_empty(), "{left_later:?}");
        assert!(busy_gone, "tap and route removed with the entry");
    }

    /// The production keep set: the other live agents and the registering
    /// agent itself.
    #[test]
    fn the_keep_set_is_the_live_agents_and_the_registering_one() {
        let live = crate::registry::LiveAgents {
            others: std::collections::HashSet::from([1, 2]),
            pools: Vec::new(),
            me: 3,
        };
        assert_eq!(keep_set(&live), std::collections::HashSet::from([1, 2, 3]));
    }
}
