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

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh socket we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn set_flags(fd: &OwnedFd, up: bool) -> io::Result<()> {
    let mut f = IfreqFlags {
        name: name(),
        flags: 0,
        _pad: [0; 22],
    };
    ioctl(fd, libc::SIOCGIFFLAGS as _, &mut f, "get eth0 flags")?;
    let bits = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    if up {
        f.flags |= bits;
    } else {
        f.flags &= !bits;
    }
    let what = if up {
        "bring eth0 up"
    } else {
        "take eth0 down"
    };
    ioctl(fd, libc::SIOCSIFFLAGS as _, &mut f, what)
}

/// Address, netmask, link up, routes, resolv.conf.
fn bring_up(
    fd: &OwnedFd,
    ip: Ipv4Addr,
    mask: Ipv4Addr,
    gateway: Ipv4Addr,
    dns: &[Ipv4Addr],
    sysroot: &str,
) -> io::Result<()> {
    let mut a = IfreqAddr {
        name: name(),
        addr: sockaddr(ip),
        _pad: [0; 8],
    };
    ioctl(fd, libc::SIOCSIFADDR as _, &mut a, "set eth0 address")?;
    a.addr = sockaddr(mask);
    ioctl(fd, libc::SIOCSIFNETMASK as _, &mut a, "set eth0 netmask")?;
    set_flags(fd, true)?;
    route(fd, gateway, Ipv4Addr::BROADCAST, None)?;
    route(
        fd,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Some(gateway),
    )?;
    if !dns.is_empty() {
        let body: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
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

/// Configures eth0 and the routes, then writes resolv.conf under `sysroot`.
pub fn configure(p: &NetParams, sysroot: &str) -> io::Result<()> {
    let fd = inet_socket()?;
    bring_up(&fd, p.ip, Ipv4Addr::BROADCAST, p.gateway, &p.dns, sysroot)
}

/// The network identity a restore hands this guest, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub ip: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
    pub dns: Vec<Ipv4Addr>,
}

impl Identity {
    pub fn parse(n: &hearth_proto::GuestNet) -> Result<Identity, String> {
        let ip4 = |what: &str, s: &str| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| format!("{what} {s:?} is not an IPv4 address"))
        };
        if n.prefix > 32 {
            return Err(format!("prefix length {} is over 32", n.prefix));
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(n.prefix)).unwrap_or(0);
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = n.mac.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("MAC {:?} is not six hex bytes", n.mac));
        }
        for (b, p) in mac.iter_mut().zip(&parts) {
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("MAC {:?} is not hex", n.mac))?;
        }
        if mac[0] & 1 == 1 {
            return Err(format!("MAC {:?} is a multicast address", n.mac));
        }
        Ok(Identity {
            ip: ip4("address", &n.ip)?,
            mask: Ipv4Addr::from(mask),
            gateway: ip4("gateway", &n.gateway)?,
            mac,
            dns: n
                .dns
                .iter()
                .map(|d| ip4("nameserver", d))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// After a restore: eth0 drops the snapshot's identity (link down, which also
/// flushes its routes and neighbours; address removed) and, with `id`, takes
/// the sandbox's MAC, address and routes, rewrites resolv.conf and announces
/// itself with a gratuitous ARP. Without `id` eth0 stays down (no network).
/// A guest without eth0 and no `id` is fine.
pub fn reconfigure(id: Option<&Identity>, sysroot: &str) -> io::Result<()> {
    let fd = inet_socket()?;
    if let Err(e) = set_flags(&fd, false) {
        let no_device = e.raw_os_error() == Some(libc::ENODEV);
        return match (id, no_device) {
            (None, true) => Ok(()),
            _ => Err(e),
        };
    }
    // why: setting 0.0.0.0 deletes eth0's primary address and, with it, its secondaries.
    let mut a = IfreqAddr {
        name: name(),
        addr: sockaddr(Ipv4Addr::UNSPECIFIED),
        _pad: [0; 8],
    };
    ioctl(&fd, libc::SIOCSIFADDR as _, &mut a, "remove eth0 address")?;
    let Some(id) = id else {
        return Ok(());
    };
    set_mac(&fd, id.mac)?;
    bring_up(&fd, id.ip, id.mask, id.gateway, &id.dns, sysroot)?;
    if let Err(e) = announce(id) {
        crate::log!("gratuitous ARP not sent: {e}");
    }
    Ok(())
}

/// Whether the kernel's eth0 holds exactly `id` now: up, with its MAC, its
/// address and netmask (the primary one), a host route to its gateway and the
/// default route via it. Read from the kernel, not from what this guest
/// remembers setting, so a change behind its back (a workload with
/// CAP_NET_ADMIN, a failed step) is seen.
pub fn holds(id: &Identity) -> io::Result<bool> {
    let fd = inet_socket()?;
    let mut f = IfreqFlags {
        name: name(),
        flags: 0,
        _pad: [0; 22],
    };
    ioctl(&fd, libc::SIOCGIFFLAGS as _, &mut f, "get eth0 flags")?;
    if f.flags & libc::IFF_UP as libc::c_short == 0 {
        return Ok(false);
    }
    // SAFETY: sockaddr is plain data; all-zero is valid.
    let mut a = IfreqAddr {
        name: name(),
        addr: unsafe { std::mem::zeroed() },
        _pad: [0; 8],
    };
    ioctl(&fd, libc::SIOCGIFHWADDR as _, &mut a, "get eth0 MAC")?;
    let mac: Vec<u8> = a.addr.sa_data[..6].iter().map(|b| *b as u8).collect();
    if mac != id.mac {
        return Ok(false);
    }
    let addr = |req: libc::c_ulong, what: &str| -> io::Result<Option<Ipv4Addr>> {
        // SAFETY: sockaddr is plain data; all-zero is valid.
        let mut a = IfreqAddr {
            name: name(),
            addr: unsafe { std::mem::zeroed() },
            _pad: [0; 8],
        };
        // SAFETY: a is a valid ifreq for these requests and lives across the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut a) } < 0 {
            let e = io::Error::last_os_error();
            // why: eth0 without an address answers EADDRNOTAVAIL.
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                return Ok(None);
            }
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        // SAFETY: the kernel filled in an AF_INET sockaddr, the size of sockaddr.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(a.addr) };
        Ok(Some(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())))
    };
    if addr(libc::SIOCGIFADDR as _, "get eth0 address")? != Some(id.ip)
        || addr(libc::SIOCGIFNETMASK as _, "get eth0 netmask")? != Some(id.mask)
    {
        return Ok(false);
    }
    // why: thread-self, not self: /proc/self/net is the main thread's namespace.
    let routes = std::fs::read_to_string("/proc/thread-self/net/route")?;
    Ok(has_routes(&routes, id.gateway))
}

/// Whether a `/proc/net/route` table holds eth0's host route to `gateway`
/// and the default route via it.
fn has_routes(table: &str, gateway: Ipv4Addr) -> bool {
    let ip = |h: &str| u32::from_str_radix(h, 16).map(|v| Ipv4Addr::from(v.to_ne_bytes()));
    let (mut host, mut default) = (false, false);
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != IFACE {
            continue;
        }
        let (Ok(dst), Ok(gw), Ok(mask)) = (ip(f[1]), ip(f[2]), ip(f[7])) else {
            continue;
        };
        host |= dst == gateway && mask == Ipv4Addr::BROADCAST;
        default |= dst == Ipv4Addr::UNSPECIFIED && mask == Ipv4Addr::UNSPECIFIED && gw == gateway;
    }
    host && default
}

fn set_mac(fd: &OwnedFd, mac: [u8; 6]) -> io::Result<()> {
    // SAFETY: sockaddr is plain data; all-zero is valid.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in addr.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    let mut a = IfreqAddr {
        name: name(),
        addr,
        _pad: [0; 8],
    };
    ioctl(fd, libc::SIOCSIFHWADDR as _, &mut a, "set eth0 MAC")
}

/// Broadcasts an ARP request for our own address (a gratuitous ARP), so
/// neighbours that cached another MAC for it learn ours.
pub fn announce(id: &Identity) -> io::Result<()> {
    let ifindex = {
        let n = c"eth0";
        // SAFETY: n is a valid NUL-terminated string.
        unsafe { libc::if_nametoindex(n.as_ptr()) }
    };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    ARP_SOCKET.with(|cached| {
        let mut cached = cached.borrow_mut();
        let fd = match cached.as_ref() {
            Some(fd) => fd,
            None => &*cached.insert(arp_socket()?),
        };
        send_arp(fd, ifindex, id)
    })
}

thread_local! {
    /// The packet socket [`announce`] sends with, kept open for the guest's
    /// life (per thread: a socket belongs to the network namespace it was
    /// made in, and the guest applies every `Restored` on its one reading
    /// thread).
    ///
    /// why: closing a packet socket waits for an RCU grace period
    /// (`packet_release` calls `synchronize_net`), ~8 ms of a 1-vCPU guest
    /// under TCG, and a warm-pool start's `Restored` announces once.
    static ARP_SOCKET: std::cell::RefCell<Option<OwnedFd>> = const { std::cell::RefCell::new(None) };
}

/// A packet socket that sends link-layer datagrams and receives nothing
/// (protocol 0: no packet handler is registered, so no ARP is queued to it).
fn arp_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh socket we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn send_arp(fd: &OwnedFd, ifindex: libc::c_uint, id: &Identity) -> io::Result<()> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let mut pkt = Vec::with_capacity(28);
    pkt.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    pkt.extend_from_slice(&id.mac);
    pkt.extend_from_slice(&id.ip.octets());
    pkt.extend_from_slice(&[0; 6]);
    pkt.extend_from_slice(&id.ip.octets());
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: pkt and sll are valid for the lengths given and live across the call.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    fn ip(args: &str) {
        let st = Command::new("sh")
            .args(["-c", &format!("ip {args}")])
            .status()
            .expect("ip (iproute2)");
        assert!(st.success(), "ip {args}");
    }

    /// Runs `f` on a thread inside a network namespace of its own that holds
    /// a veth named eth0 (its peer up), as a restored guest's eth0; `f` gets
    /// the namespace's name for `ip -n`. Needs root, as the e2e tests do.
    fn in_netns_with_eth0<T: Send + 'static>(f: impl FnOnce(&str) -> T + Send + 'static) -> T {
        // why: one namespace per call, so tests using it may run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("hgt{}-{n}", std::process::id());
        ip(&format!("netns add {ns}"));
        ip(&format!("-n {ns} link add eth0 type veth peer name p1"));
        ip(&format!("-n {ns} link set p1 up"));
        let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
        let name = ns.clone();
        let r = std::thread::spawn(move || {
            // SAFETY: setns(2) on an open namespace fd; it moves this thread only.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns: {}",
                io::Error::last_os_error()
            );
            f(&name)
        })
        .join();
        ip(&format!("netns del {ns}"));
        r.expect("the test thread panicked")
    }

    /// Root and iproute2, for [`in_netns_with_eth0`].
    fn can_run() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        root && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn eth0_is_held_only_while_the_kernel_shows_exactly_that_identity() {
        if !can_run() {
            // why: CI (scripts/test) sets HEARTH_TEST_STRICT: a missing capability fails there.
            assert!(
                std::env::var_os("HEARTH_TEST_STRICT").is_none(),
                "this test cannot run here and HEARTH_TEST_STRICT forbids skipping it"
            );
            eprintln!("skipped: needs root and iproute2 for a network namespace");
            return;
        }
        in_netns_with_eth0(|ns| {
            let net = |ip: &str| hearth_proto::GuestNet {
                ip: ip.into(),
                prefix: 32,
                gateway: "169.254.1.1".into(),
                mac: "02:68:0a:58:00:07".into(),
                dns: Vec::new(),
            };
            let id = Identity::parse(&net("10.88.0.7")).unwrap();
            let other = Identity::parse(&net("10.88.0.8")).unwrap();
            // why: no nameservers, so nothing is written under it.
            let sysroot = "/nonexistent";
            assert!(
                !holds(&id).unwrap(),
                "a fresh eth0 is down, without address"
            );
            reconfigure(Some(&id), sysroot).unwrap();
            assert!(holds(&id).unwrap(), "configured");
            assert!(!holds(&other).unwrap(), "another address");
            // Changed behind the guest's back: each is seen.
            for change in [
                "link set eth0 address 02:68:0a:58:00:09",
                "route del default",
                "addr flush dev eth0",
                "link set eth0 down",
            ] {
                ip(&format!("-n {ns} {change}"));
                assert!(!holds(&id).unwrap(), "after `ip {change}`");
                reconfigure(Some(&id), sysroot).unwrap();
                assert!(holds(&id).unwrap(), "reconfigured after `ip {change}`");
            }
            reconfigure(None, sysroot).unwrap();
            assert!(!holds(&id).unwrap(), "taken down");

            // A take-down that fails is reported, not ignored (the guest then
            // refuses execs and the host fails the start).
            reconfigure(Some(&id), sysroot).unwrap();
            drop_net_admin();
            let e = reconfigure(None, sysroot).unwrap_err();
            assert!(e.to_string().contains("take eth0 down"), "{e}");
            assert!(holds(&id).unwrap(), "eth0 still holds the network");
        });
    }

    /// The gratuitous ARPs `p1` (eth0's peer) receives within `wait`: (sender MAC, sender IP).
    fn arps_on_p1(rx: &OwnedFd, wait: Duration) -> Vec<([u8; 6], [u8; 4])> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the call.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
                return got;
            }
            let mut buf = [0u8; 64];
            // SAFETY: reads at most buf.len() bytes into buf, which we own.
            let n = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            // An ARP request (opcode 1) whose sender and target IP are the same.
            if n >= 28 && buf[6..8] == [0, 1] && buf[14..18] == buf[24..28] {
                got.push((
                    buf[8..14].try_into().unwrap(),
                    buf[14..18].try_into().unwrap(),
                ));
            }
        }
    }

    #[test]
    fn announcing_keeps_one_packet_socket_and_each_arp_reaches_the_peer() {
        if !can_run() {
            // why: CI (scripts/test) sets HEARTH_TEST_STRICT: a missing capability fails there.
            assert!(
                std::env::var_os("HEARTH_TEST_STRICT").is_none(),
                "this test cannot run here and HEARTH_TEST_STRICT forbids skipping it"
            );
            eprintln!("skipped: needs root and iproute2 for a network namespace");
            return;
        }
        in_netns_with_eth0(|_| {
            let n = hearth_proto::GuestNet {
                ip: "10.88.0.7".into(),
                prefix: 32,
                gateway: "169.254.1.1".into(),
                mac: "02:68:0a:58:00:07".into(),
                dns: Vec::new(),
            };
            let id = Identity::parse(&n).unwrap();
            // SAFETY: socket(2) takes no pointers; the result is checked.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    i32::from((libc::ETH_P_ARP as u16).to_be()),
                )
            };
            assert!(raw >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: raw is a fresh socket we exclusively own.
            let rx = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
            // SAFETY: a valid NUL-terminated name.
            sll.sll_ifindex = unsafe { libc::if_nametoindex(c"p1".as_ptr()) } as i32;
            // SAFETY: sll is a valid sockaddr_ll for the call.
            let rc = unsafe {
                libc::bind(
                    rx.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "bind to p1: {}", io::Error::last_os_error());
            let kept = || ARP_SOCKET.with(|c| c.borrow().as_ref().map(|f| f.as_raw_fd()));

            reconfigure(Some(&id), "/nonexistent").unwrap();
            let first = kept().expect("the socket is kept after the first announce");
            announce(&id).unwrap();
            announce(&id).unwrap();
            assert_eq!(kept(), Some(first), "the same socket is used again");
            let got = arps_on_p1(&rx, Duration::from_millis(500));
            let want = (id.mac, id.ip.octets());
            assert_eq!(got, vec![want; 3], "one gratuitous ARP per announce");
        });
    }

    /// Drops CAP_NET_ADMIN from the calling thread (capabilities are per thread).
    fn drop_net_admin() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const CAP_NET_ADMIN: u32 = 12;
        let mut h = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: capget(2) with a v3 header and room for its two data structs.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
        d[0].effective &= !(1 << CAP_NET_ADMIN);
        d[0].permitted &= !(1 << CAP_NET_ADMIN);
        // SAFETY: as above; pid 0 is the calling thread.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
    }

    #[test]
    fn restore_identity_is_parsed_and_bad_input_named() {
        let mut n = hearth_proto::GuestNet {
            ip: "10.88.0.7".into(),
            prefix: 32,
            gateway: "169.254.1.1".into(),
            mac: "02:68:0a:58:00:07".into(),
            dns: vec!["10.0.0.53".into()],
        };
        let id = Identity::parse(&n).unwrap();
        assert_eq!(id.mac, [2, 0x68, 10, 0x58, 0, 7]);
        assert_eq!(id.mask, Ipv4Addr::BROADCAST);
        n.prefix = 24;
        assert_eq!(
            Identity::parse(&n).unwrap().mask,
            Ipv4Addr::new(255, 255, 255, 0)
        );
        n.prefix = 0;
        assert_eq!(Identity::parse(&n).unwrap().mask, Ipv4Addr::UNSPECIFIED);
        n.mac = "03:00:00:00:00:01".into();
        assert!(Identity::parse(&n).unwrap_err().contains("multicast"));
        n.mac = "02:68".into();
        assert!(Identity::parse(&n).unwrap_err().contains("six"));
        n.mac = "02:68:0a:58:00:07".into();
        n.ip = "nope".into();
        assert!(Identity::parse(&n).unwrap_err().contains("address"));
    }
}
