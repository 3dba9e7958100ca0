//! `hearth-guest`: PID 1 inside every Hearth microVM.
//!
//! Boot: mount /proc, /sys, /dev; read `hearth.*` from the kernel command line;
//! answer the accelerator probe or mount the root filesystem at /sysroot; then
//! serve the host over the virtio-serial port (see `docs/boot-and-run.md` and the
//! `hearth-proto` crate). Every way out of PID 1 is a reboot, which ends QEMU.

mod boot;
mod channel;
mod cmdline;
mod console;
mod exec;
mod lookup;
mod net;
mod output;
mod power;
mod reaper;
mod restore;
mod server;
mod session;
mod stdin;
mod user;

use std::time::{Duration, Instant};

/// Printed on the console for `hearth.probe=1`.
const PROBE_MARKER: &str = "HEARTH-PROBE-OK\n";
/// How long devices may take to show up in /dev (TCG is slow).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the guest could not come up.
#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

fn main() {
    power::install_panic_hook();
    if std::process::id() != 1 {
        log!("must run as PID 1 inside a Hearth VM");
        std::process::exit(2);
    }
    match run() {
        Ok(never) => match never {},
        Err(e) => {
            log!("fatal: {e}");
            power::reboot();
        }
    }
}

fn run() -> Result<std::convert::Infallible, InitError> {
    let start = Instant::now();
    let params = boot::early_mounts()?;
    if params.probe {
        console::write_raw(PROBE_MARKER);
        power::reboot();
    }
    boot::wait_for_device(&params.root, DEVICE_TIMEOUT)?;
    let port = boot::wait_for(
        &format!("virtio-serial port {}", channel::PORT_NAME),
        DEVICE_TIMEOUT,
        channel::find_port,
    )?;
    boot::mount_sysroot(&params)?;
    if let Some(name) = &params.hostname {
        boot::set_hostname(name)?;
    }
    if let Err(e) = boot::loopback_up() {
        log!("loopback not up: {e}");
    }
    if let Some(n) = &params.net {
        match net::configure(n, boot::SYSROOT) {
            Ok(()) => log!("eth0 {}/32 via {}", n.ip, n.gateway),
            Err(e) => log!("network not configured: {e}"),
        }
    }
    log!("ready in {} ms", start.elapsed().as_millis());
    Ok(server::serve(&port)?)
}
