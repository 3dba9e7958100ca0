//! Bringing the VM up to the point where processes can run: pseudo-filesystems,
//! the root filesystem at /sysroot with its own /proc, /sys and /dev, the hostname
//! and the loopback interface.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cmdline::BootParams;

/// Where the root filesystem is mounted; every process is chrooted here.
pub const SYSROOT: &str = "/sysroot";

/// A step of bringing the VM up failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// mkdir of a mountpoint failed.
    #[error("cannot create mountpoint {path}: {source}")]
    Mkdir { path: String, source: io::Error },
    /// mount(2) failed.
    #[error("cannot mount {fstype} {source_dev} at {target}: {error}")]
    Mount {
        source_dev: String,
        target: String,
        fstype: String,
        error: io::Error,
    },
    /// A device node did not appear in time.
    #[error("device {path} did not appear within {waited:?}")]
    DeviceMissing { path: String, waited: Duration },
    /// /proc/cmdline could not be read.
    #[error("cannot read /proc/cmdline: {0}")]
    Cmdline(io::Error),
    /// sethostname(2) failed.
    #[error("cannot set hostname {name}: {source}")]
    Hostname { name: String, source: io::Error },
}

fn cstring(s: &str) -> CString {
    // why: every string passed here is a fixed path or comes from the kernel command
    // line, which cannot contain NUL; an empty string is a harmless fallback.
    CString::new(s).unwrap_or_default()
}

fn mkdir_p(path: &str) -> Result<(), BootError> {
    std::fs::create_dir_all(path).map_err(|source| BootError::Mkdir {
        path: path.to_string(),
        source,
    })
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), BootError> {
    mkdir_p(target)?;
    let (c_source, c_target, c_fstype, c_data) = (
        cstring(source),
        cstring(target),
        cstring(fstype),
        cstring(data),
    );
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_fstype.as_ptr(),
            flags,
            c_data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    // why: the kernel may already have mounted devtmpfs for us.
    if error.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(BootError::Mount {
        source_dev: source.to_string(),
        target: target.to_string(),
        fstype: fstype.to_string(),
        error,
    })
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Mounts /proc, /sys and /dev of the initramfs and reads the boot parameters.
pub fn early_mounts() -> Result<BootParams, BootError> {
    mount("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, "")?;
    mount("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(BootError::Cmdline)?;
    Ok(BootParams::parse(&cmdline))
}

/// Waits (polling) until `find` returns a device; devtmpfs creates nodes
/// asynchronously. `what` names the device in the error.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut find: impl FnMut() -> Option<T>,
) -> Result<T, BootError> {
    let start = Instant::now();
    loop {
        if let Some(found) = find() {
            return Ok(found);
        }
        if start.elapsed() > timeout {
            return Err(BootError::DeviceMissing {
                path: what.to_string(),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the device node `path` exists.
pub fn wait_for_device(path: &str, timeout: Duration) -> Result<(), BootError> {
    wait_for(path, timeout, || Path::new(path).exists().then_some(()))
}

/// Mounts the root filesystem read-write at /sysroot, with proc, sys, dev,
/// dev/pts and dev/shm under it (mountpoints are created when the image lacks them).
pub fn mount_sysroot(params: &BootParams) -> Result<(), BootError> {
    mount(&params.root, SYSROOT, &params.rootfstype, 0, "")?;
    mount("proc", "/sysroot/proc", "proc", NOSUID_NODEV_NOEXEC, "")?;
    mount("sysfs", "/sysroot/sys", "sysfs", NOSUID_NODEV_NOEXEC, "")?;
    mount(
        "devtmpfs",
        "/sysroot/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        "mode=0755",
    )?;
    mount(
        "devpts",
        "/sysroot/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
    )?;
    mount(
        "shm",
        "/sysroot/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    Ok(())
}

/// Sets the kernel hostname.
pub fn set_hostname(name: &str) -> Result<(), BootError> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(BootError::Hostname {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `struct ifreq` with the flags member of its union (40 bytes on x86_64).
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Brings up `lo` so programs can talk to 127.0.0.1.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that we exclusively own from here on.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut req = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: req is a properly sized, initialized ifreq that lives across the call.
    if unsafe { libc::ioctl(raw, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(raw, libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
