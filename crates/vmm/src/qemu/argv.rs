//! The QEMU command line of docs/boot-and-run.md, built from a config and the
//! VM directory's layout. Pure: the contract is checked by unit tests here.

use std::path::{Path, PathBuf};

use crate::config::{option_path, Accel, GuestMemory, NetDevice, VmConfig};
use crate::error::VmmError;

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a QEMU VM's files live inside its directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub overlay: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// Guest RAM when it is file-backed ([`GuestMemory::SharedFile`]).
    pub ram: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            overlay: dir.join("root.qcow2"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            qmp_socket: dir.join("qmp.sock"),
            agent_socket: dir.join("agent.sock"),
            ram: dir.join("ram"),
        }
    }

    /// Every file this backend creates in the directory (vm.json aside).
    pub fn files(&self) -> Vec<PathBuf> {
        vec![
            self.overlay.clone(),
            self.console_log.clone(),
            self.qemu_log.clone(),
            self.qmp_socket.clone(),
            self.agent_socket.clone(),
            self.ram.clone(),
        ]
    }

    /// Rejects directories whose socket paths would not fit in `sun_path`.
    pub fn check_socket_paths(&self, id: &str) -> Result<(), VmmError> {
        for p in [&self.qmp_socket, &self.agent_socket] {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(VmmError::InvalidPath {
                    id: id.to_string(),
                    path: p.clone(),
                    reason: "longer than the 107 bytes a unix socket path may have; use a shorter VM directory",
                });
            }
        }
        Ok(())
    }
}

/// The kernel command line: the contract's part, then `extra`.
pub fn kernel_cmdline(hostname: &str, probe: bool, extra: &[String]) -> String {
    let mut c = format!("console=ttyS0 quiet reboot=t panic=-1 hearth.hostname={hostname}");
    if probe {
        c.push_str(" hearth.probe=1");
    }
    for e in extra {
        c.push(' ');
        c.push_str(e);
    }
    c
}

/// The `-M` value shared by VMs and the accelerator probe.
pub const MACHINE: &str = "microvm,x-option-roms=off,rtc=off,acpi=off";

pub fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// Guest RAM added on top of the requested size under TCG, in KiB.
///
/// why: QEMU 7.2's dirty-page sync for migration takes a fast path when a RAM
/// block's length is a multiple of 64 pages (256 KiB), and that path clears the
/// migration dirty bits without resetting the TCG TLB entries that write to those
/// pages directly. A vCPU then keeps writing through a stale entry, the write is
/// never marked dirty, and the target gets the page as it was (lost updates:
/// a corrupted guest after `cont`, docs/migration.md "Lost guest writes"). Fixed
/// upstream in QEMU 9.0 ("system/physmem: Fix migration dirty bitmap coherency
/// with TCG memory access"). A length that is not such a multiple takes the
/// per-page path, which resets the TLB for every page it cleans. 8 KiB: the
/// smallest step QEMU accepts for `-m` (it rounds to 8 KiB).
pub const TCG_RAM_PAD_KIB: u64 = 8;

/// KiB of guest RAM a VM gets: the requested MiB, plus [`TCG_RAM_PAD_KIB`] under TCG.
pub fn ram_kib(memory_mib: u32, accel: Accel) -> u64 {
    let pad = match accel {
        Accel::Tcg => TCG_RAM_PAD_KIB,
        Accel::Kvm => 0,
    };
    u64::from(memory_mib) * 1024 + pad
}

/// KiB of guest RAM `cfg` asks for: its exact size, else [`ram_kib`].
pub fn config_ram_kib(cfg: &VmConfig) -> u64 {
    cfg.ram_kib
        .unwrap_or_else(|| ram_kib(cfg.memory_mib, cfg.accel))
}

/// Arguments after the binary name, exactly as in the contract.
pub fn qemu_args(cfg: &VmConfig, layout: &Layout) -> Result<Vec<String>, VmmError> {
    let id = cfg.id.as_str();
    let p = |path| option_path(id, path);
    let args = [
        "-M",
        MACHINE,
        "-accel",
        match cfg.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        },
        "-cpu",
        cpu_model(cfg.accel),
        "-m",
        &format!("{}K", config_ram_kib(cfg)),
        "-smp",
        &cfg.cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-S",
        "-kernel",
        p(&cfg.kernel)?,
        "-initrd",
        p(&cfg.initrd)?,
        "-append",
        &kernel_cmdline(&cfg.hostname, false, &cfg.extra_cmdline),
        "-serial",
        &format!("file:{}", p(&layout.console_log)?),
        "-drive",
        &format!("id=root,file={},format=qcow2,if=none", p(&layout.overlay)?),
        "-device",
        "virtio-blk-device,drive=root",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            p(&layout.agent_socket)?
        ),
        "-device",
        "virtserialport,chardev=agent,name=hearth.agent",
        "-qmp",
        &format!("unix:{},server=on,wait=off", p(&layout.qmp_socket)?),
    ];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if let Some(net) = &cfg.net {
        args.extend(net_args(&cfg.id, net)?);
    }
    if cfg.memory == GuestMemory::SharedFile {
        args.extend(memory_backend_args(&format!(
            "memory-backend-file,id=ram,size={}K,mem-path={},share=on",
            config_ram_kib(cfg),
            p(&layout.ram)?
        )));
    }
    Ok(args)
}

/// virtio-net on a tap the host created (no helper scripts, no vhost here),
/// directly or through hub 0 (see [`NetDevice`]).
fn net_args(id: &str, net: &NetDevice) -> Result<Vec<String>, VmmError> {
    let device = format!("virtio-net-device,netdev=net0,mac={}", net.mac);
    Ok(match (&net.tap, net.hub) {
        (None, false) => return Err(VmmError::NetDeviceWithoutTap { id: id.to_string() }),
        (Some(tap), false) => vec![
            "-netdev".into(),
            // why: required, not just tried: without virtio-net headers the
            // guest gets no checksum/segmentation offloads (~2x slower bulk TCP).
            format!("tap,id=net0,ifname={tap},script=no,downscript=no,vnet_hdr=on"),
            "-device".into(),
            device,
        ],
        (tap, _) => {
            let mut v = vec![
                "-netdev".into(),
                "hubport,id=net0,hubid=0".into(),
                "-device".into(),
                device,
            ];
            if let Some(tap) = tap {
                v.extend(hub_tap_args(tap));
            }
            v
        }
    })
}

/// Netdev ids of a tap joined to hub 0, as on the command line and in `netdev_add`.
pub const HUB_TAP_ID: &str = "tap0";
pub const HUB_TAP_PORT_ID: &str = "net1";

/// A tap joined to hub 0, where a hub-attached virtio-net device sits.
fn hub_tap_args(tap: &str) -> [String; 4] {
    [
        "-netdev".into(),
        format!("tap,id={HUB_TAP_ID},ifname={tap},script=no,downscript=no"),
        "-netdev".into(),
        format!("hubport,id={HUB_TAP_PORT_ID},hubid=0,netdev={HUB_TAP_ID}"),
    ]
}

/// Guest RAM from the memory backend object `object` (whose id must be `ram`:
/// the RAM block's name, which a snapshot's state stream refers to).
pub fn memory_backend_args(object: &str) -> Vec<String> {
    ["-object", object, "-machine", "memory-backend=ram"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_matches_the_boot_contract() {
        let cfg = VmConfig {
            id: "sb".into(),
            dir: "/v/sb".into(),
            kernel: "/c/vmlinux".into(),
            initrd: "/c/initramfs.cpio.gz".into(),
            rootfs: "/img/base.ext4".into(),
            cpus: 2,
            memory_mib: 256,
            hostname: "web".into(),
            extra_cmdline: vec!["foo=bar".into()],
            accel: Accel::Tcg,
            net: None,
            memory: GuestMemory::Anonymous,
            ram_kib: None,
        };
        let got = qemu_args(&cfg, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        let want = "-M microvm,x-option-roms=off,rtc=off,acpi=off -accel tcg -cpu max \
            -m 262152K -smp 2 -nodefaults -no-user-config -nographic -no-reboot -S \
            -kernel /c/vmlinux -initrd /c/initramfs.cpio.gz \
            -append console=ttyS0 quiet reboot=t panic=-1 hearth.hostname=web foo=bar \
            -serial file:/v/sb/console.log \
            -drive id=root,file=/v/sb/root.qcow2,format=qcow2,if=none -device virtio-blk-device,drive=root \
            -device virtio-serial-device,max_ports=2 \
            -chardev socket,id=agent,path=/v/sb/agent.sock,server=on,wait=off \
            -device virtserialport,chardev=agent,name=hearth.agent \
            -qmp unix:/v/sb/qmp.sock,server=on,wait=off";
        assert_eq!(got, want);

        let kvm = VmConfig {
            accel: Accel::Kvm,
            ..cfg
        };
        let got = qemu_args(&kvm, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        assert!(got.contains("-accel kvm -cpu host -m 262144K"), "{got}");
    }

    #[test]
    fn network_device_goes_on_the_given_tap() {
        let cfg = VmConfig {
            id: "sb".into(),
            dir: "/v/sb".into(),
            kernel: "/c/vmlinux".into(),
            initrd: "/c/i".into(),
            rootfs: "/img/base.ext4".into(),
            cpus: 1,
            memory_mib: 128,
            hostname: "web".into(),
            extra_cmdline: vec![],
            accel: Accel::Tcg,
            net: Some(NetDevice {
                tap: Some("hthabc".into()),
                mac: "02:68:0a:58:00:02".into(),
                hub: false,
            }),
            memory: GuestMemory::Anonymous,
            ram_kib: None,
        };
        let got = qemu_args(&cfg, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        assert!(
            got.ends_with(
                "-netdev tap,id=net0,ifname=hthabc,script=no,downscript=no,vnet_hdr=on \
             -device virtio-net-device,netdev=net0,mac=02:68:0a:58:00:02"
            ),
            "{got}"
        );
        // Templates, their pools and their restores: the device on hub 0, the tap (if any) joined to it.
        let mut hub = cfg.clone();
        hub.net = Some(NetDevice {
            tap: Some("hthabc".into()),
            mac: "02:68:0a:58:00:02".into(),
            hub: true,
        });
        let got = qemu_args(&hub, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        assert!(
            got.ends_with(
                "-netdev hubport,id=net0,hubid=0 \
             -device virtio-net-device,netdev=net0,mac=02:68:0a:58:00:02 \
             -netdev tap,id=tap0,ifname=hthabc,script=no,downscript=no \
             -netdev hubport,id=net1,hubid=0,netdev=tap0"
            ),
            "{got}"
        );
        hub.net.as_mut().unwrap().tap = None;
        let got = qemu_args(&hub, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        assert!(
            got.ends_with(
                "-netdev hubport,id=net0,hubid=0 \
             -device virtio-net-device,netdev=net0,mac=02:68:0a:58:00:02"
            ),
            "{got}"
        );
        // A device directly on a tap needs one: refused, not put on the hub.
        hub.net.as_mut().unwrap().hub = false;
        let err = qemu_args(&hub, &Layout::new(Path::new("/v/sb"))).unwrap_err();
        assert!(matches!(err, VmmError::NetDeviceWithoutTap { .. }), "{err}");
    }

    #[test]
    fn shared_file_memory_lives_in_the_vm_directory() {
        let cfg = VmConfig {
            id: "sb".into(),
            dir: "/v/sb".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/r".into(),
            cpus: 1,
            memory_mib: 128,
            hostname: "h".into(),
            extra_cmdline: vec![],
            accel: Accel::Tcg,
            memory: GuestMemory::SharedFile,
            ram_kib: None,
            net: None,
        };
        let got = qemu_args(&cfg, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        assert!(
            got.ends_with(
                "-object memory-backend-file,id=ram,size=131080K,mem-path=/v/sb/ram,share=on \
                 -machine memory-backend=ram"
            ),
            "{got}"
        );
        // A migration target matches its source's RAM exactly (here: no pad).
        let exact = VmConfig {
            ram_kib: Some(131072),
            ..cfg
        };
        let got = qemu_args(&exact, &Layout::new(Path::new("/v/sb")))
            .unwrap()
            .join(" ");
        assert!(got.contains("-m 131072K "), "{got}");
        assert!(
            got.contains("memory-backend-file,id=ram,size=131072K,"),
            "{got}"
        );
    }

    #[test]
    fn tcg_ram_is_padded_off_the_256_kib_grid_and_kvm_ram_is_not() {
        for mib in [64, 128, 256, 1024, 4096] {
            let tcg = ram_kib(mib, Accel::Tcg);
            assert_eq!(tcg, u64::from(mib) * 1024 + 8);
            // QEMU 7.2 takes its lossy dirty-sync fast path on multiples of 256 KiB.
            assert_ne!(tcg % 256, 0, "{mib} MiB");
            // ...and rounds `-m` to 8 KiB, so the size must be one of those.
            assert_eq!(tcg % 8, 0);
            assert_eq!(ram_kib(mib, Accel::Kvm), u64::from(mib) * 1024);
        }
    }

    #[test]
    fn probe_cmdline_carries_the_probe_flag() {
        assert_eq!(
            kernel_cmdline("h", true, &[]),
            "console=ttyS0 quiet reboot=t panic=-1 hearth.hostname=h hearth.probe=1"
        );
    }

    #[test]
    fn directory_too_long_for_a_socket_path_is_rejected() {
        let long = format!("/tmp/{}", "d".repeat(100));
        let err = Layout::new(Path::new(&long))
            .check_socket_paths("x")
            .unwrap_err();
        assert!(matches!(err, VmmError::InvalidPath { .. }), "{err}");
        Layout::new(Path::new("/tmp/ok"))
            .check_socket_paths("x")
            .unwrap();
    }
}
