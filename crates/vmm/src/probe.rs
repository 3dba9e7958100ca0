//! Choosing the accelerator: KVM only if a guest really boots under it.
//!
//! `/dev/kvm` existing proves little (nested PVM KVM opens fine and never boots
//! a guest), so the probe boots the real kernel + initramfs with
//! `hearth.probe=1`; the guest agent prints [`PROBE_MARKER`] on the console and
//! reboots. No marker within the timeout → TCG, with a reason that says so.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::config::{Accel, AccelChoice};
use crate::error::VmmError;
use crate::qemu::argv::MACHINE;

/// Default bound on the probe guest printing its marker.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);
/// What the guest agent prints on the console when booted with `hearth.probe=1`.
pub const PROBE_MARKER: &str = "HEARTH-PROBE-OK";
const PROBE_CMDLINE: &str = "console=ttyS0 hearth.probe=1 reboot=t panic=-1";
const TCG_WARNING: &str = "using TCG — NOT hardware isolation";

/// The chosen accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelReport {
    pub accel: Accel,
    pub reason: String,
}

impl AccelReport {
    fn tcg(why: impl std::fmt::Display) -> AccelReport {
        AccelReport {
            accel: Accel::Tcg,
            reason: format!("{why}; {TCG_WARNING}"),
        }
    }
}

/// Applies a node's accelerator setting: `tcg` and `kvm` are taken as given
/// (`kvm` still needs a usable /dev/kvm), `auto` runs [`probe_accel`].
pub async fn choose_accel(
    choice: AccelChoice,
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
) -> Result<AccelReport, VmmError> {
    match choice {
        AccelChoice::Tcg => Ok(AccelReport::tcg("forced by configuration (accel=tcg)")),
        AccelChoice::Kvm => {
            open_kvm().map_err(|reason| VmmError::KvmUnavailable { reason })?;
            Ok(AccelReport {
                accel: Accel::Kvm,
                reason: "forced by configuration (accel=kvm); not probed".to_string(),
            })
        }
        AccelChoice::Auto => Ok(probe_accel(qemu, kernel, initrd, timeout).await),
    }
}

/// Boots `kernel` + `initrd` under KVM and waits up to `timeout` for the probe marker.
pub async fn probe_accel(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
) -> AccelReport {
    if let Err(reason) = open_kvm() {
        return AccelReport::tcg(reason);
    }
    for (what, p) in [("kernel", kernel), ("initrd", initrd)] {
        if !p.is_file() {
            return AccelReport::tcg(format_args!(
                "KVM present but cannot be probed: {what} {} is missing",
                p.display()
            ));
        }
    }
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M", MACHINE, "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", PROBE_CMDLINE, "-serial", "stdio"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return AccelReport::tcg(format_args!(
                "cannot run {} for the KVM probe: {e}",
                qemu.display()
            ))
        }
    };
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill().await;
        return AccelReport::tcg("KVM probe QEMU has no stdout pipe");
    };

    let scan = async {
        let mut console = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => console.extend_from_slice(&buf[..n]),
            }
            if console
                .windows(PROBE_MARKER.len())
                .any(|w| w == PROBE_MARKER.as_bytes())
            {
                return true;
            }
            // why: keep only what may still hold a marker split across reads.
            if console.len() > 64 * 1024 {
                console.drain(..console.len() - PROBE_MARKER.len());
            }
        }
    };
    let outcome = tokio::time::timeout(timeout, scan).await;
    let elapsed = started.elapsed();
    let _ = child.kill().await;
    let mut stderr = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), err.read_to_string(&mut stderr)).await;

    match outcome {
        Ok(true) => AccelReport {
            accel: Accel::Kvm,
            reason: format!("guest booted under KVM in {} ms", elapsed.as_millis()),
        },
        Ok(false) => AccelReport::tcg(format_args!(
            "KVM present but QEMU exited without the probe marker ({})",
            stderr.trim().lines().last().unwrap_or("no message")
        )),
        Err(_) => AccelReport::tcg(format_args!(
            "KVM present but guest did not boot within {timeout:?} (nested/PVM KVM?)"
        )),
    }
}

fn open_kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm cannot be opened read-write ({e})"))
}
