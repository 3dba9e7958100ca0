//! The sandbox's network inside the guest: eth0 gets the host-assigned /32,
//! a host route to the on-link gateway and a default route via it (ioctls; no
//! tools needed in the image), and the root filesystem gets /etc/resolv.conf.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cmdline::NetParams;

/// The guest's only network interface.
const IFACE: &str = "eth0";

/// `struct ifreq` with a sockaddr in its union (40 bytes on x86_64).
#[repr(C)]
struct IfreqAddr {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr,
    _pad: [u8; 8],
}

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn name() -> [u8; libc::IFNAMSIZ] {
    let mut n = [0u8; libc::IFNAMSIZ];
    n[..IFACE.len()].copy_from_slice(IFACE.as_bytes());
    n
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the ioctls take this.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: arg is a properly sized, initialized request struct for `req`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn route(fd: &OwnedFd, dst: Ipv4Addr, mask: Ipv4Addr, gw: Option<Ipv4Addr>) -> io::Result<()> {
    let dev = c"eth0";
    // SAFETY: rtentry is a plain C struct; all-zero is a valid starting value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(dst);
    rt.rt_genmask = sockaddr(mask);
    rt.rt_flags = libc::RTF_UP;
    match gw {
        Some(g) => {
            rt.rt_gateway = sockaddr(g);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        None => rt.rt_flags |= libc::RTF_HOST,
    }
    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    ioctl(
        fd,
        libc::SIOCADDRT as _,
        &mut rt,
        &format!("route to {dst}"),
    )
}

/// Configures eth0 and the routes, then writes resolv.conf under `sysroot`.
pub fn configure(p: &NetParams, sysroot: &str) -> io::Result<()> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh socket we exclusively own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut a = IfreqAddr {
        name: name(),
        addr: sockaddr(p.ip),
        _pad: [0; 8],
    };
    ioctl(&fd, libc::SIOCSIFADDR as _, &mut a, "set eth0 address")?;
    a.addr = sockaddr(Ipv4Addr::BROADCAST);
    ioctl(&fd, libc::SIOCSIFNETMASK as _, &mut a, "set eth0 netmask")?;
    let mut f = IfreqFlags {
        name: name(),
        flags: 0,
        _pad: [0; 22],
    };
    ioctl(&fd, libc::SIOCGIFFLAGS as _, &mut f, "get eth0 flags")?;
    f.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(&fd, libc::SIOCSIFFLAGS as _, &mut f, "bring eth0 up")?;
    route(&fd, p.gateway, Ipv4Addr::BROADCAST, None)?;
    route(
        &fd,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Some(p.gateway),
    )?;
    if !p.dns.is_empty() {
        let body: String = p.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        let etc = format!("{sysroot}/etc");
        // why: a read-only or odd image must not stop the sandbox from booting.
        if std::fs::create_dir_all(&etc).is_ok() {
            let path = format!("{etc}/resolv.conf");
            let _ = std::fs::remove_file(&path);
            if let Err(e) = std::fs::write(&path, body) {
                crate::log!("cannot write {path}: {e}");
            }
        }
    }
    Ok(())
}
