//! Host side of a sandbox's link: a persistent tap (created with the
//! /dev/net/tun ioctls, so QEMU can open it by name), brought up with proxy ARP
//! and a /32 route to the sandbox's address. Deleting the tap takes the route
//! and any TC hooks with it.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` with the flags member of its union (40 bytes on x86_64).
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> io::Result<IfreqFlags> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name '{name}' must be 1..=15 bytes"),
        ));
    }
    let mut r = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

fn open_tun() -> io::Result<OwnedFd> {
    // SAFETY: the path is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_persist(name: &str, persist: bool) -> io::Result<()> {
    let tun = open_tun()?;
    let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    // SAFETY: req is a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            TUNSETPERSIST as _,
            libc::c_ulong::from(persist),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the tap's queue the way QEMU's `ifname=` does (the tap is busy while
/// the descriptor is open).
#[cfg(test)]
pub(crate) fn open_queue(name: &str) -> io::Result<OwnedFd> {
    let tun = open_tun()?;
    let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    // SAFETY: req is a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

pub fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn link_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name, 0)?;
    // SAFETY: req is a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The device of another host route `ip/32` in the main table, if any.
fn routed_elsewhere(routes: &str, tap: &str, ip: Ipv4Addr) -> Option<String> {
    parse_host_routes(routes)
        .into_iter()
        .find_map(|(dev, a)| (a == ip && dev != tap).then_some(dev))
}

/// The host routes (`/32`) of a `/proc/net/route` text, as (device, address).
fn parse_host_routes(routes: &str) -> Vec<(String, Ipv4Addr)> {
    // /proc/net/route prints the address as the hex of its network-order u32.
    routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() <= 7 || f[7] != "FFFFFFFF" {
                return None;
            }
            let dst = u32::from_str_radix(f[1], 16).ok()?;
            Some((f[0].to_string(), Ipv4Addr::from(dst.to_ne_bytes())))
        })
        .collect()
}

/// The host routes (`/32`) of the main table, as (device, address).
pub fn host_routes() -> io::Result<Vec<(String, Ipv4Addr)>> {
    Ok(parse_host_routes(&std::fs::read_to_string(
        "/proc/net/route",
    )?))
}

fn already_routed(ip: Ipv4Addr, dev: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{ip}/32 is already routed to {dev} on this host: another agent's address pool (or a manual route) overlaps this one; give this agent another --net-pool or remove that route"),
    )
}

/// Adds the host route `ip/32 dev tap`; refused when another device already
/// has a host route to `ip`. The check reads the table first (a route with
/// another metric would otherwise be added beside it) and the add itself is
/// exclusive (`NLM_F_EXCL`), so of two agents racing for one address only one
/// gets the route.
fn add_route(tap: &str, ip: Ipv4Addr) -> io::Result<()> {
    let routes = std::fs::read_to_string("/proc/net/route")?;
    if let Some(dev) = routed_elsewhere(&routes, tap, ip) {
        return Err(already_routed(ip, &dev));
    }
    match add_route_exclusive(tap, ip) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // why: our own tap was just (re)created, so an existing route
            // belongs to someone else: name its device if it is still there.
            let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
            let dev = routed_elsewhere(&routes, tap, ip).unwrap_or_else(|| "another device".into());
            Err(already_routed(ip, &dev))
        }
        r => r,
    }
}

/// `ip route add ip/32 dev tap` over rtnetlink with `NLM_F_CREATE |
/// NLM_F_EXCL`: fails with EEXIST when the main table has a route to
/// `ip/32` already (whatever its device).
fn add_route_exclusive(tap: &str, ip: Ipv4Addr) -> io::Result<()> {
    let dev = CString::new(tap).map_err(io::Error::other)?;
    // SAFETY: dev is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // nlmsghdr (16) + rtmsg (12) + RTA_DST (8) + RTA_OIF (8).
    let mut msg = Vec::with_capacity(44);
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    msg.extend_from_slice(&44u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
    msg.extend_from_slice(&(flags as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
    msg.extend_from_slice(&[
        libc::AF_INET as u8,
        32, // dst_len
        0,  // src_len
        0,  // tos
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_LINK,
        libc::RTN_UNICAST,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&libc::RTA_DST.to_ne_bytes());
    msg.extend_from_slice(&ip.octets());
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&libc::RTA_OIF.to_ne_bytes());
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    debug_assert_eq!(msg.len(), 44);

    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we exclusively own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is a plain C struct; all-zero is valid.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: msg and kernel are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let b = &buf[..n as usize];
        // The answer is an NLMSG_ERROR carrying the request's errno (0: done).
        if b.len() >= 20 && u16::from_ne_bytes([b[4], b[5]]) == libc::NLMSG_ERROR as u16 {
            let errno = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
            return match errno {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
        if b.len() < 16 {
            return Err(io::Error::other("short rtnetlink answer to RTM_NEWROUTE"));
        }
    }
}

fn sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("write {value} to {path}: {e}")))
}

/// Turns on IPv4 forwarding (a node running sandboxes routes for them).
pub fn enable_forwarding() -> io::Result<()> {
    sysctl("/proc/sys/net/ipv4/ip_forward", "1")
}

/// `struct ifreq` with the hardware address member of its union.
#[repr(C)]
struct IfreqHwaddr {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr,
    _pad: [u8; 8],
}

fn ifreq_hw(name: &str) -> io::Result<IfreqHwaddr> {
    let base = ifreq(name, 0)?;
    Ok(IfreqHwaddr {
        name: base.name,
        addr: libc::sockaddr {
            sa_family: 1, // ARPHRD_ETHER
            sa_data: [0; 14],
        },
        _pad: [0; 8],
    })
}

/// The interface's MAC address.
pub fn mac(name: &str) -> io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("address"))?;
    crate::parse_mac(text.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} has no Ethernet address ({})", text.trim()),
        )
    })
}

/// Sets the interface's MAC address (while it is down).
fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq_hw(name)?;
    for (d, b) in req.addr.sa_data.iter_mut().zip(mac) {
        *d = b as libc::c_char;
    }
    // SAFETY: req is a valid ifreq (name + sockaddr) that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the tap (or takes over a leftover one), with the MAC `mac` when
/// given (else the kernel's random one), brings it up, answers ARP for the
/// guest's gateway (proxy ARP) and routes `ip/32` to it.
pub fn create(tap: &str, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> io::Result<()> {
    // why: a leftover tap of the same sandbox may still carry an old route.
    delete(tap)?;
    set_persist(tap, true)?;
    if let Some(mac) = mac {
        set_mac(tap, mac)?;
    }
    let conf = format!("/proc/sys/net/ipv4/conf/{tap}");
    sysctl(&format!("{conf}/proxy_arp"), "1")?;
    // why: the guest's default gateway is a link-local address nobody owns; the
    // tap answers for it and the host routes on.
    sysctl(&format!("{conf}/rp_filter"), "0")?;
    // why: proxy ARP answers broadcast requests after a random delay of up to
    // proxy_delay (0.8 s by default); the guest's first packet waits for it,
    // and a slow (TCG, loaded) guest can run out of ARP retries meanwhile.
    sysctl(&format!("/proc/sys/net/ipv4/neigh/{tap}/proxy_delay"), "0")?;
    link_up(tap)?;
    add_route(tap, ip)
}

/// Deletes the tap (and with it its route and TC hooks). Missing is fine.
pub fn delete(tap: &str) -> io::Result<()> {
    if !exists(tap) {
        return Ok(());
    }
    set_persist(tap, false)
}

/// The host's own IPv4 addresses (all interfaces) and the directed-broadcast
/// address of each interface that has one.
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr.
            let fam = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(fam) == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                let bcast = (ifa.ifa_flags & libc::IFF_BROADCAST as libc::c_uint) != 0;
                if bcast && !ifa.ifa_ifu.is_null() {
                    // SAFETY: with IFF_BROADCAST, ifa_ifu is the interface's
                    // broadcast address, of the same family (AF_INET).
                    let b = unsafe { &*(ifa.ifa_ifu as *const libc::sockaddr_in) };
                    out.push(Ipv4Addr::from(b.sin_addr.s_addr.to_ne_bytes()));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out.dedup();
    out
}

/// A netlink socket subscribed to the kernel's IPv4 address notifications.
pub struct AddrEvents {
    fd: OwnedFd,
}

impl AddrEvents {
    /// Subscribes; [`AddrEvents::wait`] returns at the latest after `timeout`.
    pub fn subscribe(timeout: std::time::Duration) -> io::Result<AddrEvents> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket we exclusively own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is a plain C struct; all-zero is valid.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa.nl_groups = libc::RTMGRP_IPV4_IFADDR as u32;
        // SAFETY: sa is a valid sockaddr_nl of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: tv is a valid timeval of the given length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AddrEvents { fd })
    }

    /// Blocks until an address changed (or the timeout passed, or the socket
    /// overflowed: all mean "look again"), then drains what is queued.
    pub fn wait(&self) {
        let mut buf = [0u8; 8192];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ENOBUFS)
            ) {
                // why: a broken socket would otherwise make this a busy loop.
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            return;
        }
        // SAFETY: as above; MSG_DONTWAIT only drains what is already queued.
        while unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routes_on_other_devices_are_found() {
        let routes =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            hthb\t0100580A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            eth0\t0000580A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let ip = Ipv4Addr::new(10, 88, 0, 1);
        if u32::from_ne_bytes(ip.octets()) == 0x0100_580a {
            assert_eq!(
                routed_elsewhere(routes, "htha", ip).as_deref(),
                Some("hthb")
            );
            assert_eq!(routed_elsewhere(routes, "hthb", ip), None, "its own");
        }
        assert_eq!(
            routed_elsewhere(routes, "htha", Ipv4Addr::new(10, 88, 0, 0)),
            None,
            "not a /32"
        );
    }

    /// Two agents racing for one address both pass the table check; the add
    /// itself must then refuse the second route (a plain add puts a route on
    /// another device beside the first, and traffic goes to either).
    #[test]
    fn a_second_host_route_to_an_address_is_refused_by_the_add_itself() {
        let n = std::process::id();
        let ip = Ipv4Addr::new(10, 253, (n % 250) as u8, 1 + ((n / 250) % 250) as u8);
        let (a, b) = (
            format!("hthxa{}", n % 100_000),
            format!("hthxb{}", n % 100_000),
        );
        create(&a, ip, None).unwrap();
        set_persist(&b, true).unwrap();
        link_up(&b).unwrap();
        let raced = add_route_exclusive(&b, ip);
        let checked = add_route(&b, ip);
        let routes = std::fs::read_to_string("/proc/net/route").unwrap();
        delete(&a).unwrap();
        delete(&b).unwrap();
        assert_eq!(
            raced.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EEXIST)),
            "the exclusive add refuses a route another device has"
        );
        let e = checked.unwrap_err().to_string();
        assert!(e.contains(&format!("already routed to {a}")), "{e}");
        assert!(e.contains("--net-pool"), "{e}");
        assert_eq!(
            parse_host_routes(&routes)
                .iter()
                .filter(|(_, r)| *r == ip)
                .count(),
            1,
            "one route to {ip}: {routes}"
        );
    }
}
