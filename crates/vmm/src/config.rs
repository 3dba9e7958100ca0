//! What a caller asks for ([`VmConfig`]) and the checks every backend applies
//! to it before touching the host ([`VmConfig::validate`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::VmmError;

/// Smallest guest memory the guest kernel + agent boot in.
pub const MIN_MEMORY_MIB: u32 = 64;
/// vCPUs allowed per host CPU (overcommit bound).
pub const CPUS_PER_HOST_CPU: u32 = 4;

/// One microVM to create.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Sandbox id; used in errors and logs.
    pub id: String,
    /// Per-VM directory (created if missing); holds sockets, overlay, logs, vm.json.
    pub dir: PathBuf,
    /// Uncompressed guest kernel (`vmlinux`, PVH entry).
    pub kernel: PathBuf,
    /// Initramfs carrying `hearth-guest` as `/init`.
    pub initrd: PathBuf,
    /// Read-only base root filesystem (raw ext4); never written.
    pub rootfs: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub hostname: String,
    /// Appended to the kernel command line after the contract's arguments.
    pub extra_cmdline: Vec<String>,
    pub accel: Accel,
    /// A virtio-net device on an existing tap; `None`: no network device.
    pub net: Option<NetDevice>,
    /// How guest RAM is backed; [`GuestMemory::SharedFile`] makes snapshots cheap.
    pub memory: GuestMemory,
    /// Exact guest RAM in KiB, when it must match another VM's (a migration
    /// target matching its source, whose RAM may carry another TCG pad);
    /// `None`: `memory_mib` plus this build's pad (`qemu::argv::ram_kib`).
    pub ram_kib: Option<u64>,
}

/// How a created VM's RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestMemory {
    /// Anonymous memory: a snapshot carries the RAM inside its state stream.
    #[default]
    Anonymous,
    /// A file in the VM directory (`DIR/ram`), mapped shared: a snapshot takes
    /// (or copies) the file and the state stream holds only device state.
    SharedFile,
}

/// The guest's network device: a tap the host prepared, and the guest's MAC.
///
/// `hub: false`: the virtio-net device's backend is the tap itself, with
/// virtio-net headers (`vnet_hdr=on`), so the guest negotiates checksum and
/// segmentation offloads; a snapshot of it must be restored onto a tap again.
/// `hub: true` (what the node agent uses when QEMU starts before the tap exists:
/// templates, their warm pools and every restore of a template, and restores
/// (and migrations) of VMs saved on the hub): the device sits on QEMU's
/// emulated hub 0 and the tap, if any, joins that hub. The device set a snapshot
/// was saved with is then the same whether or not a tap is attached, and a tap
/// can join a paused VM later ([`crate::Vm::attach_tap`]): backends are not
/// part of the migration state, only the device is (a hub gives no offloads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// Host tap interface name (created and owned by the caller); `None` only
    /// with `hub` (a device with nothing behind it yet): a direct device
    /// without a tap is refused (`VmmError::NetDeviceWithoutTap`).
    pub tap: Option<String>,
    /// `aa:bb:cc:dd:ee:ff`. After a restore the device has the snapshot's MAC
    /// until the guest sets its own (see `hearth_proto::Restored::net`).
    pub mac: String,
    pub hub: bool,
}

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization: real isolation.
    Kvm,
    /// QEMU's binary translator: works everywhere, NOT hardware isolation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator setting of a node: probe, or force one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe KVM by booting the guest; fall back to TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, VmmError> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(VmmError::UnknownAccel(other.to_string())),
        }
    }
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        })
    }
}

/// The host resources a config is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl HostLimits {
    /// Reads the CPU count and `MemTotal` of this host.
    pub fn detect() -> HostLimits {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_mem_total_kib(&s))
            .map(|kib| kib / 1024)
            .unwrap_or(u64::from(MIN_MEMORY_MIB));
        HostLimits { cpus, memory_mib }
    }
}

fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl VmConfig {
    /// Checks id, hostname, vCPUs and memory against `host`; touches no files.
    pub fn validate(&self, host: &HostLimits) -> Result<(), VmmError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !id_ok {
            return Err(VmmError::InvalidId {
                id: self.id.clone(),
            });
        }
        let max_cpus = host.cpus.max(1) * CPUS_PER_HOST_CPU;
        if self.cpus == 0 || self.cpus > max_cpus {
            return Err(VmmError::InvalidCpus {
                id: self.id.clone(),
                cpus: self.cpus,
                max: max_cpus,
            });
        }
        if self.memory_mib < MIN_MEMORY_MIB || u64::from(self.memory_mib) > host.memory_mib {
            return Err(VmmError::InvalidMemory {
                id: self.id.clone(),
                mib: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max: host.memory_mib,
            });
        }
        let host_ok = !self.hostname.is_empty()
            && self.hostname.len() <= 253
            && !self.hostname.starts_with(['-', '.'])
            && self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
        if !host_ok {
            return Err(VmmError::InvalidHostname {
                id: self.id.clone(),
                hostname: self.hostname.clone(),
            });
        }
        if let Some(kib) = self.ram_kib {
            // why: the exact size is `memory_mib` plus a pad, never another
            // amount of memory. Under TCG only the pad this build gives: a RAM
            // block whose length is a multiple of 256 KiB loses guest writes
            // while it migrates (QEMU 7.2, docs/migration.md "Lost guest
            // writes"); under KVM also none.
            let base = u64::from(self.memory_mib) * 1024;
            let pad = kib.checked_sub(base);
            let pad_ok = match self.accel {
                Accel::Tcg => pad == Some(crate::qemu::argv::TCG_RAM_PAD_KIB),
                Accel::Kvm => {
                    matches!(pad, Some(p) if p == 0 || p == crate::qemu::argv::TCG_RAM_PAD_KIB)
                }
            };
            if !pad_ok {
                return Err(VmmError::InvalidRamSize {
                    id: self.id.clone(),
                    kib,
                    mib: self.memory_mib,
                });
            }
        }
        Ok(())
    }

    /// Checks that kernel, initrd and rootfs exist.
    pub fn check_artifacts(&self) -> Result<(), VmmError> {
        for (what, path) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("root filesystem", &self.rootfs),
        ] {
            if !path.is_file() {
                return Err(VmmError::MissingArtifact {
                    id: self.id.clone(),
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

/// `path` as UTF-8 without commas, so it can sit inside a QEMU option string.
pub(crate) fn option_path<'a>(id: &str, path: &'a Path) -> Result<&'a str, VmmError> {
    let invalid = |reason| VmmError::InvalidPath {
        id: id.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let s = path.to_str().ok_or_else(|| invalid("not UTF-8"))?;
    if s.contains(',') {
        return Err(invalid("contains ',' which QEMU's option syntax splits on"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            id: "sb-1".into(),
            dir: "/tmp/x".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/r".into(),
            cpus: 1,
            memory_mib: 128,
            hostname: "sb-1".into(),
            extra_cmdline: vec![],
            accel: Accel::Tcg,
            net: None,
            memory: GuestMemory::Anonymous,
            ram_kib: None,
        }
    }

    const HOST: HostLimits = HostLimits {
        cpus: 2,
        memory_mib: 1024,
    };

    #[test]
    fn zero_or_too_many_cpus_are_rejected_with_the_range() {
        for cpus in [0, 9] {
            let err = VmConfig { cpus, ..cfg() }.validate(&HOST).unwrap_err();
            assert!(matches!(err, VmmError::InvalidCpus { max: 8, .. }), "{err}");
            assert!(err.to_string().contains("1..=8"), "{err}");
        }
        VmConfig { cpus: 8, ..cfg() }.validate(&HOST).unwrap();
    }

    #[test]
    fn memory_below_64_mib_or_above_host_total_is_rejected() {
        for memory_mib in [0, 63, 1025] {
            let err = VmConfig {
                memory_mib,
                ..cfg()
            }
            .validate(&HOST)
            .unwrap_err();
            assert!(matches!(err, VmmError::InvalidMemory { .. }), "{err}");
            assert!(err.to_string().contains("64..=1024 MiB"), "{err}");
        }
        VmConfig {
            memory_mib: 64,
            ..cfg()
        }
        .validate(&HOST)
        .unwrap();
    }

    #[test]
    fn hostname_that_would_split_the_cmdline_is_rejected() {
        for hostname in ["", "a b", "x hearth.probe=1", "-a", "a_b"] {
            let c = VmConfig {
                hostname: hostname.into(),
                ..cfg()
            };
            assert!(matches!(
                c.validate(&HOST),
                Err(VmmError::InvalidHostname { .. })
            ));
        }
    }

    #[test]
    fn exact_ram_size_under_tcg_must_have_the_tcg_pad() {
        // why: 128 MiB flat and pads of 256/512/768 KiB are multiples of
        // 256 KiB, which lose guest writes while migrating under TCG.
        for kib in [
            128 * 1024,
            128 * 1024 + 256,
            128 * 1024 + 512,
            128 * 1024 + 768,
        ] {
            let err = VmConfig {
                ram_kib: Some(kib),
                ..cfg()
            }
            .validate(&HOST)
            .unwrap_err();
            assert!(
                matches!(err, VmmError::InvalidRamSize { .. }),
                "{kib}: {err}"
            );
        }
        // Under KVM the unpadded size is fine.
        VmConfig {
            ram_kib: Some(128 * 1024),
            accel: Accel::Kvm,
            ..cfg()
        }
        .validate(&HOST)
        .unwrap();
    }

    #[test]
    fn exact_ram_size_must_be_a_pad_on_top_of_the_memory() {
        for kib in [128 * 1024 - 8, 129 * 1024, 128 * 1024 + 4, 128 * 1024 + 16] {
            let err = VmConfig {
                ram_kib: Some(kib),
                ..cfg()
            }
            .validate(&HOST)
            .unwrap_err();
            assert!(matches!(err, VmmError::InvalidRamSize { .. }), "{err}");
        }
        VmConfig {
            ram_kib: Some(128 * 1024 + 8),
            ..cfg()
        }
        .validate(&HOST)
        .unwrap();
    }

    #[test]
    fn id_with_a_slash_is_rejected() {
        let c = VmConfig {
            id: "../x".into(),
            ..cfg()
        };
        assert!(matches!(c.validate(&HOST), Err(VmmError::InvalidId { .. })));
    }

    #[test]
    fn accel_choice_parses_and_rejects_unknown() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("hvf".parse::<AccelChoice>().is_err());
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }

    #[test]
    fn mem_total_is_read_from_meminfo() {
        let s = "MemFree: 5 kB\nMemTotal:       24576000 kB\n";
        assert_eq!(parse_mem_total_kib(s), Some(24576000));
    }

    #[test]
    fn option_path_rejects_commas() {
        assert!(option_path("x", Path::new("/a,b")).is_err());
        assert_eq!(option_path("x", Path::new("/a/b")).unwrap(), "/a/b");
    }
}
