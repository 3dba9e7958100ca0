//! Loading `bpf/policy.c` onto a tap and reading/writing its maps.
//!
//! Updates are atomic: RULES holds two slots of rules (the LPM key starts with a
//! slot/direction tag) and CONFIG names the active one. An update writes the
//! inactive slot (rules, defaults, zeroed counters) and then flips
//! `CONFIG.active`, one byte, so a packet sees the old or the new policy whole.
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
/// Distinct host addresses the HOSTS map holds (bpf/policy.c).
const MAX_HOSTS: usize = 256;
/// The maps every sandbox's program instance has, pinned by these names.
const MAPS: [&str; 5] = ["CONFIG", "RULES", "COUNTERS", "HOSTS", "FLOWS"];

/// A BPF operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot load the policy program: {0}")]
    Load(String),
    #[error("cannot attach the policy program to {tap}: {reason}")]
    Attach { tap: String, reason: String },
    #[error("policy maps of {tap}: {reason}")]
    Map { tap: String, reason: String },
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
    std::fs::create_dir_all(BPFFS_ROOT).map_err(|source| BpfError::Fs {
        path: BPFFS_ROOT.into(),
        source,
    })
}

fn nbo(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
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
    ensure_bpffs()?;
    let dir = pin_dir(tap);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| BpfError::Fs {
        path: dir.display().to_string(),
        source,
    })?;
    let result = attach_inner(tap, &dir, ip, mac, policy, hosts);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn attach_inner(
    tap: &str,
    dir: &Path,
    ip: Ipv4Addr,
    mac: [u8; 6],
    policy: &Compiled,
    hosts: &[Ipv4Addr],
) -> Result<(), BpfError> {
    let mut bpf = Ebpf::load(OBJECT).map_err(|e| BpfError::Load(e.to_string()))?;
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
        p.load()
            .map_err(|e| attach_err(format!("verifier rejected {prog}: {e:?}")))?;
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
    let next = (cfg.active & 1) ^ 1;
    write_slot(tap, next, policy)?;
    cfg.ip = nbo(ip);
    cfg.mac = mac;
    set_defaults(&mut cfg, next, policy);
    // why: two writes; the array value is copied in place, so the defaults of
    // the new slot must be there before the one byte that selects it changes.
    write_config(tap, cfg)?;
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
                    action: if e.allow { 1 } else { 2 } | if e.inherited { 4 } else { 0 },
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
    let wanted: std::collections::HashSet<u32> =
        hosts.iter().take(MAX_HOSTS).map(|a| nbo(*a)).collect();
    if hosts.len() > MAX_HOSTS {
        tracing::warn!(
            tap,
            "the node has {} IPv4 addresses; only the first {MAX_HOSTS} are blocked as host addresses",
            hosts.len()
        );
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
