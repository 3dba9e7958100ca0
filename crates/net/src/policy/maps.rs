//! Loading `bpf/policy.c` onto a tap and reading/writing its maps.
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
use aya::maps::{Array, Map, MapData};
use aya::programs::links::FdLink;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;

use super::{Compiled, RULES_PER_PREFIX};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));

/// Root of Hearth's pins on the BPF filesystem.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/hearth";
const MAX_COUNTERS: u32 = 512;

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
    default_allow: u8,
    _pad: u8,
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
    r: [RuleRaw; RULES_PER_PREFIX],
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

/// Loads a fresh instance of the program, pins its maps, writes `policy` and
/// attaches `guest_out`/`guest_in` to the tap's ingress/egress (TCX links, pinned).
pub fn attach(tap: &str, ip: Ipv4Addr, mac: [u8; 6], policy: &Compiled) -> Result<(), BpfError> {
    ensure_bpffs()?;
    let dir = pin_dir(tap);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| BpfError::Fs {
        path: dir.display().to_string(),
        source,
    })?;
    let result = attach_inner(tap, &dir, ip, mac, policy);
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
) -> Result<(), BpfError> {
    let mut bpf = Ebpf::load(OBJECT).map_err(|e| BpfError::Load(e.to_string()))?;
    let map_err = |reason: String| BpfError::Map {
        tap: tap.into(),
        reason,
    };
    for name in ["CONFIG", "EGRESS", "COUNTERS"] {
        let m = bpf
            .map(name)
            .ok_or_else(|| map_err(format!("map {name} missing from the object")))?;
        m.pin(dir.join(name))
            .map_err(|e| map_err(format!("pin {name}: {e}")))?;
    }
    write_config(tap, ip, mac, policy.default_allow)?;
    write_rules(tap, policy)?;
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

fn write_config(
    tap: &str,
    ip: Ipv4Addr,
    mac: [u8; 6],
    default_allow: bool,
) -> Result<(), BpfError> {
    let err = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("CONFIG: {e}"),
    };
    let mut a: Array<MapData, SandboxCfg> = open_map(tap, "CONFIG")?.try_into().map_err(err)?;
    let cfg = SandboxCfg {
        ip: nbo(ip),
        mac,
        default_allow: u8::from(default_allow),
        _pad: 0,
    };
    a.set(0, cfg, 0).map_err(err)
}

/// Replaces the rules live: new prefixes are written first, stale ones removed
/// after, and the rule counters start again from zero.
pub fn update(tap: &str, ip: Ipv4Addr, mac: [u8; 6], policy: &Compiled) -> Result<(), BpfError> {
    write_rules(tap, policy)?;
    write_config(tap, ip, mac, policy.default_allow)
}

fn write_rules(tap: &str, policy: &Compiled) -> Result<(), BpfError> {
    let err = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("EGRESS: {e}"),
    };
    let mut trie: LpmTrie<MapData, u32, RuleList> =
        open_map(tap, "EGRESS")?.try_into().map_err(err)?;
    let mut wanted = std::collections::HashSet::new();
    for (cidr, entries) in &policy.prefixes {
        let mut list = RuleList::default();
        for (slot, e) in list.r.iter_mut().zip(entries) {
            *slot = RuleRaw {
                port_lo: e.port_lo,
                port_hi: e.port_hi,
                proto: e.proto,
                action: if e.allow { 1 } else { 2 },
                counter: e.counter,
            };
        }
        let key = Key::new(u32::from(cidr.prefix_len()), nbo(cidr.addr()));
        trie.insert(&key, list, 0).map_err(err)?;
        wanted.insert((cidr.prefix_len() as u32, nbo(cidr.addr())));
    }
    let stale: Vec<Key<u32>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
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
    for slot in u32::from(super::FIRST_RULE_COUNTER)..MAX_COUNTERS {
        counters.set(slot, Counter::default(), 0).map_err(cerr)?;
    }
    Ok(())
}

/// Reads every counter slot.
pub fn counters(tap: &str) -> Result<Vec<Counter>, BpfError> {
    let err = |e: aya::maps::MapError| BpfError::Map {
        tap: tap.into(),
        reason: format!("COUNTERS: {e}"),
    };
    let a: Array<MapData, Counter> = open_map(tap, "COUNTERS")?.try_into().map_err(err)?;
    a.iter().map(|r| r.map_err(err)).collect()
}

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
