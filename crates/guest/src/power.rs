//! Ending the VM. PID 1 never exits on its own: it reboots, and with `reboot=t`
//! on the kernel command line and QEMU's `-no-reboot` a reboot ends QEMU, which is
//! how the host learns the guest is gone.

use std::ffi::CString;
use std::time::{Duration, Instant};

use crate::log;

/// Mounts under the root filesystem, innermost first.
const SYSROOT_MOUNTS: [&str; 5] = [
    "/sysroot/dev/shm",
    "/sysroot/dev/pts",
    "/sysroot/dev",
    "/sysroot/sys",
    "/sysroot/proc",
];

/// Kills every process, syncs and unmounts the root filesystem, then reboots.
pub fn shutdown() -> ! {
    // SAFETY: kill(2) with pid -1 signals every process but PID 1 (us); no memory is involved.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    for target in SYSROOT_MOUNTS {
        umount(target, libc::MNT_DETACH);
    }
    // why: killed processes release their files asynchronously; retry briefly while busy.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !umount("/sysroot", 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    reboot()
}

fn umount(target: &str, flags: libc::c_int) -> bool {
    let Ok(c_target) = CString::new(target) else {
        return false;
    };
    // SAFETY: c_target is a valid NUL-terminated path that outlives the call.
    unsafe { libc::umount2(c_target.as_ptr(), flags) == 0 }
}

/// Syncs and reboots at once (no killing, no unmounting). Never returns.
pub fn reboot() -> ! {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    if std::process::id() == 1 {
        // SAFETY: reboot(2) with RB_AUTOBOOT takes no pointers; as PID 1 we own the machine.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        log!("reboot failed: {}", std::io::Error::last_os_error());
    } else {
        // why: never reboot a developer's machine when run outside a VM.
        log!("not PID 1: exiting instead of rebooting");
    }
    // why: if PID 1 exits the kernel panics, and `panic=-1` reboots it anyway.
    std::process::exit(1)
}

/// Panic hook: report on the console, then reboot so the host sees QEMU exit.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        crate::console::write_raw(&format!("hearth-guest: PANIC: {info}\n"));
        reboot();
    }));
}
