//! The migration stream between two agents: the source VMM writes into a unix
//! socket of the source agent, which connects to the target agent over TCP and
//! presents a one-time ticket (issued by `prepare`, which needed the target's
//! API token); the target agent then splices the connection into its incoming
//! VMM's unix socket. The VMMs never listen on the network, and a connection
//! without the ticket reaches nothing. The bandwidth cap is the VMM's own
//! (`max-bandwidth`); the tunnel counts bytes.
//!
//! The bytes in flight are bounded (issue 7): the source VMM judges its
//! bandwidth, and so when the rest fits the downtime budget, by how fast its
//! socket drains, and every byte held between it and the target VMM when it
//! completes is read by the target inside the guest's pause. So the relays
//! move big chunks (a target relay of 8 KiB chunks drained a few MiB of
//! autotuned TCP buffers for ~300 ms after the source completed) and the TCP
//! buffers are fixed and small (autotuning grows them to several MiB).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, UnixListener, UnixStream};

/// Ticket length in hex characters (32 random bytes).
pub const TICKET_LEN: usize = 64;
/// How long a peer has to present the ticket.
const TICKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections presenting a ticket at once. Past it one check is evicted:
/// the oldest of the address holding the most, never the source's (see
/// [`Source`]) while another is held (a flood of silent connections must not
/// take the agent's descriptors, nor lock the real source out, review15 F1).
const MAX_CHECKS: usize = 32;
/// Connections one address (an IPv6 /64) may present tickets on at once; a
/// newer one from it evicts its oldest that is not the source's (the source
/// sends its ticket right after connecting, so its check ends within a round
/// trip of the accept).
const PER_PEER_CHECKS: usize = 4;
const _: () = assert!(PER_PEER_CHECKS < MAX_CHECKS);
/// Pause after a failed `accept` (out of descriptors, buffers) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The relay's user-space buffer (the stream's direction): each wakeup moves
/// up to this much, so a busy host's scheduling delays cost little throughput.
const RELAY_BUF: usize = 128 * 1024;
/// `SO_SNDBUF` of the source's and `SO_RCVBUF` of the target's TCP socket
/// (the kernel doubles it for its bookkeeping). Set, they stop autotuning:
/// in flight between the VMMs stay under 2 MiB (both relays, both TCP
/// buffers, both unix sockets' ~200 KiB defaults), which a target taking in
/// 100 MB/s reads in ~17 ms, while a 0.5 ms round trip still carries ~1 GB/s.
/// (128 KiB paused the same and moved the bulk no faster; docs/migration.md.)
pub const TCP_BUF: u32 = 256 * 1024;

/// A fresh random ticket.
pub fn new_ticket() -> String {
    let mut b = [0u8; 32];
    // why: a failing OS RNG must not yield a guessable ticket.
    getrandom::fill(&mut b).expect("the OS random number generator works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Target side: the tunnel's listening socket, with its receive buffer (which
/// the connection inherits) bounded to [`TCP_BUF`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // why: set before listen, so the window scale offered in the handshake fits it.
    let sock = bounded_socket(addr, TcpSocket::set_recv_buffer_size, "receive")?;
    sock.bind(addr)?;
    sock.listen(16)
}

/// Source side: the socket the stream will leave from (towards `target`'s
/// address family), its send buffer bounded to [`TCP_BUF`] and bound to an
/// ephemeral port now, so the offer can name that port ([`TUNNEL_PORT_HEADER`])
/// and the target tell the source's connection from any other.
pub fn source_socket(target: SocketAddr) -> std::io::Result<TcpSocket> {
    let sock = bounded_socket(target, TcpSocket::set_send_buffer_size, "send")?;
    let any: IpAddr = match target {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    sock.bind(SocketAddr::new(any, 0))?;
    Ok(sock)
}

/// The offer's header naming the port the source's tunnel socket is bound to
/// ([`source_socket`]); a header, not a field, so an older target ignores it.
pub const TUNNEL_PORT_HEADER: &str = "x-hearth-tunnel-port";

/// Where the target expects the source's tunnel connection from: the address
/// the offer came from (the source node's, unless a proxy stood between)
/// and, when the offer named it, the source socket's port. That connection's
/// check is never evicted while another is held; with the port known, other
/// connections from the source node's address (its sandboxes' egress is
/// masqueraded through it) are strangers like any other (review16 F2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl Source {
    fn is(&self, peer: SocketAddr) -> bool {
        peer.ip().to_canonical() == self.ip.to_canonical()
            && self.port.is_none_or(|p| p == peer.port())
    }
}

/// The share an address counts against: IPv4 addresses one by one, IPv6
/// ones by /64 (a host gets a /64 for free; review16 F3).
fn share(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// A TCP socket for `addr`'s family with one of its buffers (`set`) bounded
/// to [`TCP_BUF`]; a refusal of the option is logged, not fatal (a slower
/// stream beats no migration).
fn bounded_socket(
    addr: SocketAddr,
    set: fn(&TcpSocket, u32) -> std::io::Result<()>,
    which: &str,
) -> std::io::Result<TcpSocket> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Err(e) = set(&sock, TCP_BUF) {
        tracing::warn!(
            "migration tunnel: cannot bound the {which} buffer ({e}); the pause may be longer"
        );
    }
    Ok(sock)
}

/// The checks of tickets in progress, oldest first, with the peer each
/// came from.
struct Checks {
    pending: std::collections::VecDeque<(SocketAddr, tokio::task::AbortHandle)>,
    source: Option<Source>,
}

impl Checks {
    fn favoured(&self, peer: SocketAddr) -> bool {
        self.source.is_some_and(|s| s.is(peer))
    }

    /// Makes room for a check of a connection from `peer`: answers the peer
    /// whose check was evicted, if one was.
    fn make_room(&mut self, peer: SocketAddr) -> Option<SocketAddr> {
        self.pending.retain(|(_, h)| !h.is_finished());
        let mine = share(peer.ip());
        let of = |k: IpAddr| move |(p, _): &&(SocketAddr, _)| share(p.ip()) == k;
        let victim = if self.pending.iter().filter(of(mine)).count() >= PER_PEER_CHECKS {
            // why: the address's oldest that is not the source's; only when
            // the whole address is favoured (no port known) its oldest.
            self.pending
                .iter()
                .position(|(p, _)| share(p.ip()) == mine && !self.favoured(*p))
                .or_else(|| self.pending.iter().position(|(p, _)| share(p.ip()) == mine))
        } else if self.pending.len() >= MAX_CHECKS {
            // why: the address holding the most unfavoured checks pays, of
            // equals the one holding the oldest (`max_by_key` would take the
            // newest: an unfavoured source's, review16 F1); strangers,
            // however many addresses they use, cannot evict the source's.
            let mut counts: Vec<(IpAddr, usize)> = Vec::new();
            for (p, _) in self.pending.iter().filter(|(p, _)| !self.favoured(*p)) {
                let k = share(p.ip());
                match counts.iter_mut().find(|(c, _)| *c == k) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((k, 1)),
                }
            }
            let worst = counts
                .iter()
                .fold(None, |best: Option<&(IpAddr, usize)>, c| match best {
                    Some(b) if b.1 >= c.1 => Some(b),
                    _ => Some(c),
                })
                .map(|(k, _)| *k);
            match worst {
                Some(k) => self
                    .pending
                    .iter()
                    .position(|(p, _)| share(p.ip()) == k && !self.favoured(*p)),
                None => Some(0),
            }
        } else {
            None
        };
        let (evicted, h) = self.pending.remove(victim?)?;
        h.abort();
        Some(evicted)
    }
}

/// Target side: accepts connections on `listener` until one presents `ticket`,
/// then splices it into the unix socket `vmm`. Returns the bytes received;
/// `received` counts them as they reach the VMM's socket. `source`: where the
/// offer says the source's connection comes from ([`Source`]).
pub async fn serve_target(
    listener: TcpListener,
    ticket: String,
    source: Option<Source>,
    vmm: &Path,
    received: Arc<AtomicU64>,
) -> std::io::Result<u64> {
    // why: tickets are read concurrently, so a connection that sends
    // nothing (anyone who reaches the port) cannot hold the source back for
    // the ticket timeout.
    let ticket = Arc::new(ticket);
    let mut checks = tokio::task::JoinSet::new();
    let mut pending = Checks {
        pending: Default::default(),
        source,
    };
    let (mut failed_accepts, mut evicted) = (0u64, 0u64);
    let refused = Arc::new(AtomicU64::new(0));
    let tcp = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // why: EMFILE, ENFILE, ENOBUFS, ECONNABORTED pass;
                        // ending here would drop the listener and with it
                        // the migration (review10 F3).
                        failed_accepts += 1;
                        if failed_accepts.is_power_of_two() {
                            tracing::warn!("migration tunnel: accept failed {failed_accepts} time(s) ({e}); trying again");
                        }
                        tokio::time::sleep(ACCEPT_RETRY).await;
                        continue;
                    }
                };
                if let Some(from) = pending.make_room(peer) {
                    evicted += 1;
                    if evicted.is_power_of_two() {
                        tracing::warn!(%peer, "migration tunnel: too many connections presenting tickets; the oldest from {from} closed ({evicted} so far)");
                    }
                }
                let ticket = ticket.clone();
                let refused = refused.clone();
                let check = checks.spawn(async move {
                    let mut got = [0u8; TICKET_LEN];
                    let ok = tokio::time::timeout(TICKET_TIMEOUT, tcp.read_exact(&mut got))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    if ok && same(&got, ticket.as_bytes()) {
                        Some(tcp)
                    } else {
                        // why: one line per stranger would let a flood fill the log.
                        let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::warn!(%peer, "migration tunnel: connection without the right ticket refused ({n} so far)");
                        }
                        None
                    }
                });
                pending.pending.push_back((peer, check));
            }
            // why: a pattern that does not match would switch this branch
            // off for good: a stranger's failed check would leave the real
            // source's, finishing later, unread (review10 F1).
            Some(joined) = checks.join_next(), if !checks.is_empty() => {
                if let Ok(Some(tcp)) = joined {
                    break tcp;
                }
            }
        }
    };
    drop(listener);
    // why: the other connections' checks end with it (dropped, aborted).
    drop(checks);
    // why: one line per migration says whether the favour protected the
    // source's check (a proxy or NAT between the nodes defeats it).
    match (pending.source, tcp.peer_addr()) {
        (Some(offer), Ok(peer)) if offer.is(peer) => {
            tracing::info!(%peer, "migration tunnel: the stream came from the source the offer named")
        }
        (offer, peer) => tracing::info!(
            ?peer,
            "migration tunnel: the stream came from another address than the offer named ({offer:?}); its ticket check was not favoured"
        ),
    }
    let _ = tcp.set_nodelay(true);
    let unix = UnixStream::connect(vmm).await?;
    splice(unix, tcp, received.clone()).await?;
    Ok(received.load(Ordering::Relaxed))
}

/// Source side: accepts the VMM's one connection on `listener`, connects
/// `sock` ([`source_socket`]) to the target at `addr` with `ticket`, and
/// splices. `sent` counts bytes.
pub async fn serve_source(
    listener: UnixListener,
    sock: TcpSocket,
    addr: SocketAddr,
    ticket: String,
    sent: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (unix, _) = listener.accept().await?;
    let mut tcp = sock.connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(ticket.as_bytes()).await?;
    splice(tcp, unix, sent).await
}

/// Relays `from` into `to` (the stream's direction, counted in `moved`) and
/// `to` back into `from` (QEMU's return path) until both ends close.
async fn splice<A, B>(to: A, from: B, moved: Arc<AtomicU64>) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUF];
    let (mut tr, mut tw) = tokio::io::split(to);
    let (mut fr, mut fw) = tokio::io::split(from);
    let up = async {
        loop {
            let n = fr.read(&mut buf).await?;
            if n == 0 {
                tw.shutdown().await?;
                return Ok::<(), std::io::Error>(());
            }
            tw.write_all(&buf[..n]).await?;
            moved.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let down = async {
        tokio::io::copy(&mut tr, &mut fw).await?;
        Ok::<(), std::io::Error>(())
    };
    tokio::try_join!(up, down)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target's tunnel serving in the background: its VMM socket's
    /// listener, the tunnel's address and its ticket (the dir holds the socket).
    fn target_tunnel(
        source: Option<Source>,
    ) -> (tempfile::TempDir, UnixListener, SocketAddr, String) {
        let dir = tempfile::tempdir().unwrap();
        let vmm_sock = dir.path().join("vmm.sock");
        let vmm = UnixListener::bind(&vmm_sock).unwrap();
        let tcp = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = new_ticket();
        let t2 = ticket.clone();
        let received = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move { serve_target(tcp, t2, source, &vmm_sock, received).await });
        (dir, vmm, addr, ticket)
    }

    /// review10 F1: a stranger's check that fails while the real source's is
    /// still pending must not leave the real one unread.
    #[tokio::test]
    async fn a_strangers_failed_check_does_not_hide_the_source_presenting_its_ticket_later() {
        let (_dir, vmm, addr, ticket) = target_tunnel(None);
        // The source connects first and is slow to present its ticket...
        let mut source = tokio::net::TcpStream::connect(addr).await.unwrap();
        // ...while a stranger's wrong ticket is checked and refused.
        let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
        bad.write_all(&[b'0'; TICKET_LEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).await.unwrap_or(0), 0);
        source.write_all(ticket.as_bytes()).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), vmm.accept()).await;
        assert!(
            accepted.is_ok_and(|a| a.is_ok()),
            "the source's connection was never taken after a stranger's failed check"
        );
    }

    /// review11 F1: silent connections filling every check slot do not lock
    /// the real source out (the oldest check is evicted, not the newest).
    #[tokio::test]
    async fn silent_connections_filling_every_slot_do_not_lock_the_source_out() {
        let (_dir, vmm, addr, ticket) = target_tunnel(None);
        let mut silent = Vec::new();
        for _ in 0..MAX_CHECKS + 4 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut source = tokio::net::TcpStream::connect(addr).await.unwrap();
        source.write_all(ticket.as_bytes()).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), vmm.accept()).await;
        assert!(
            accepted.is_ok_and(|a| a.is_ok()),
            "{} silent connections kept the source's ticket from being read",
            MAX_CHECKS + 4
        );
    }

    /// Connects to `addr` from the loopback address `from`.
    async fn connect_from(from: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
        sock.connect(addr).await
    }

    /// review15 F1: a steady flood of connections from another address
    /// (each evicting the oldest check once all slots were full) evicted the
    /// source's check in the round trip between its connect and its ticket.
    /// Now an address evicts only its own checks while under its share, and
    /// the source node's checks go last: with the source's address known
    /// (the offer's) and without it.
    #[tokio::test]
    async fn a_steady_flood_from_elsewhere_does_not_evict_the_sources_check() {
        for source in [Some(ip_only("127.0.0.1")), None] {
            let (_dir, vmm, addr, ticket) = target_tunnel(source);
            let flood = tokio::spawn(async move {
                let mut v = Vec::new();
                loop {
                    if let Ok(s) = connect_from("127.0.0.2", addr).await {
                        v.push(s);
                    }
                    if v.len() > 300 {
                        v.drain(..200);
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut source_conn = connect_from("127.0.0.1", addr).await.unwrap();
            // a WAN-ish round trip between the connect and the ticket
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = source_conn.write_all(ticket.as_bytes()).await;
            let accepted = tokio::time::timeout(Duration::from_secs(5), vmm.accept()).await;
            flood.abort();
            assert!(
                accepted.is_ok_and(|a| a.is_ok()),
                "a steady connect flood from another address evicted the source's ticket check (source known: {})",
                source.is_some()
            );
        }
    }

    fn ip_only(ip: &str) -> Source {
        Source {
            ip: ip.parse().unwrap(),
            port: None,
        }
    }

    /// A table of checks that never end by themselves, and a way to add one
    /// from a peer (answers what `make_room` evicted for it).
    struct Table {
        checks: Checks,
        idle: tokio::task::JoinSet<()>,
        hold: Arc<tokio::sync::Notify>,
    }

    impl Table {
        fn new(source: Option<Source>) -> Table {
            Table {
                checks: Checks {
                    pending: Default::default(),
                    source,
                },
                idle: tokio::task::JoinSet::new(),
                hold: Arc::new(tokio::sync::Notify::new()),
            }
        }

        fn add(&mut self, peer: &str) -> Option<SocketAddr> {
            let peer: SocketAddr = peer.parse().unwrap();
            let evicted = self.checks.make_room(peer);
            let h = self.hold.clone();
            let handle = self.idle.spawn(async move { h.notified().await });
            self.checks.pending.push_back((peer, handle));
            evicted
        }

        fn holds(&self, peer: &str) -> bool {
            let peer: SocketAddr = peer.parse().unwrap();
            self.checks.pending.iter().any(|(p, _)| *p == peer)
        }
    }

    /// Strangers on many addresses filling every slot: the check evicted is
    /// one of the address holding the most, never the known source's; a
    /// source known by address and port is safe from its own address's other
    /// connections too (review16 F2: a sandbox on the source node reaches the
    /// tunnel from the node's address), and one known by address only is
    /// capped like any other address. IPv6 peers share per /64 (F3).
    #[tokio::test]
    async fn the_source_nodes_check_is_evicted_last() {
        for port in [Some(5000), None] {
            let mut t = Table::new(Some(Source {
                ip: "10.0.0.1".parse().unwrap(),
                port,
            }));
            assert_eq!(t.add("10.0.0.1:5000"), None);
            for i in 0..MAX_CHECKS - 1 {
                assert_eq!(t.add(&format!("10.0.1.{}:1", i % 8)), None, "check {i}");
            }
            for i in 0..100 {
                let evicted = t
                    .add(&format!("10.0.2.{i}:1"))
                    .expect("a full table evicts");
                assert_ne!(evicted, "10.0.0.1:5000".parse().unwrap(), "for 10.0.2.{i}");
                assert_eq!(t.checks.pending.len(), MAX_CHECKS);
            }
            assert!(t.holds("10.0.0.1:5000"));
            // more connections from the source node's address
            for i in 0..PER_PEER_CHECKS + 2 {
                t.add(&format!("10.0.0.1:{}", 6000 + i));
            }
            assert_eq!(
                t.holds("10.0.0.1:5000"),
                port.is_some(),
                "the source's own address evicted its check (port known: {port:?})"
            );
        }
        // Without a source, of addresses holding equally many the oldest
        // check's pays (review16 F1/F4: the newest paid, an unfavoured source).
        let mut t = Table::new(None);
        for i in 0..MAX_CHECKS {
            t.add(&format!("10.0.3.{i}:1"));
        }
        assert_eq!(t.add("10.0.4.1:1"), Some("10.0.3.0:1".parse().unwrap()));
        // IPv6: one /64 is one share.
        let mut t = Table::new(None);
        for i in 0..PER_PEER_CHECKS {
            assert_eq!(t.add(&format!("[2001:db8:0:1::{i}]:1")), None);
        }
        assert_eq!(
            t.add("[2001:db8:0:1:ffff::9]:1"),
            Some("[2001:db8:0:1::0]:1".parse().unwrap())
        );
        assert_eq!(t.add("[2001:db8:0:2::1]:1"), None);
    }

    /// review16 R1: with the source unknown (no ConnectInfo, or its tunnel
    /// connection from another address than its offer), strangers on 31
    /// addresses holding one silent check each made the source's check, the
    /// newest, the one evicted by the very next connection (ties went to the
    /// last address in `counts`); the oldest of equals goes now.
    #[tokio::test]
    async fn an_unfavoured_source_is_not_the_first_evicted_of_equals() {
        for source in [Some(ip_only("10.9.9.9")), None] {
            let (_dir, vmm, addr, ticket) = target_tunnel(source);
            let mut silent = Vec::new();
            for i in 0..MAX_CHECKS - 1 {
                silent.push(
                    connect_from(&format!("127.0.1.{}", i + 1), addr)
                        .await
                        .unwrap(),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut source_conn = connect_from("127.0.0.1", addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            // one more stranger, from yet another address, in the round trip
            silent.push(connect_from("127.0.2.1", addr).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = source_conn.write_all(ticket.as_bytes()).await;
            let accepted = tokio::time::timeout(Duration::from_secs(3), vmm.accept()).await;
            assert!(
                accepted.is_ok_and(|a| a.is_ok()),
                "one connection after 31 single-address strangers evicted the source's check (source given: {source:?})"
            );
        }
    }

    /// review16 F2: a sandbox on the source node reaches the target's tunnel
    /// from the source node's own address (egress masquerade); 4 connections
    /// from it in the source's round trip evicted the real source's check
    /// (the per-address cap). The offer names the source socket's port: only
    /// that connection is favoured.
    #[tokio::test]
    async fn connections_from_the_source_nodes_address_do_not_evict_its_check() {
        let sock = source_socket("127.0.0.1:9".parse().unwrap()).unwrap();
        let port = sock.local_addr().unwrap().port();
        let (_dir, vmm, addr, ticket) = target_tunnel(Some(Source {
            ip: "127.0.0.1".parse().unwrap(),
            port: Some(port),
        }));
        let mut source_conn = sock.connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut guest = Vec::new();
        for _ in 0..3 * PER_PEER_CHECKS {
            guest.push(connect_from("127.0.0.1", addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = source_conn.write_all(ticket.as_bytes()).await;
        let accepted = tokio::time::timeout(Duration::from_secs(3), vmm.accept()).await;
        assert!(
            accepted.is_ok_and(|a| a.is_ok()),
            "{} connections from the source node's address evicted the source's check",
            3 * PER_PEER_CHECKS
        );
    }

    #[tokio::test]
    async fn only_the_ticket_holder_reaches_the_vmm_socket() {
        let dir = tempfile::tempdir().unwrap();
        let vmm_sock = dir.path().join("vmm.sock");
        let vmm = UnixListener::bind(&vmm_sock).unwrap();
        let tcp = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = new_ticket();
        let t2 = ticket.clone();
        let received = Arc::new(AtomicU64::new(0));
        let r2 = received.clone();
        let target = tokio::spawn(async move { serve_target(tcp, t2, None, &vmm_sock, r2).await });

        // A stranger that sends nothing does not hold the source back (its
        // check waits beside the others'): kept open for the whole test.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A stranger with a wrong ticket is dropped.
        let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
        bad.write_all(&[b'0'; TICKET_LEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).await.unwrap_or(0), 0);

        let src_sock = dir.path().join("src.sock");
        let src = UnixListener::bind(&src_sock).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let s2 = sent.clone();
        let sock = source_socket(addr).unwrap();
        let source = tokio::spawn(serve_source(src, sock, addr, ticket, s2));
        let mut qemu = UnixStream::connect(&src_sock).await.unwrap();
        qemu.write_all(b"state").await.unwrap();
        qemu.shutdown().await.unwrap();
        // why: well under the ticket timeout (10 s) the silent stranger
        // would have cost, were tickets read one connection at a time.
        let (mut got, _) = tokio::time::timeout(Duration::from_secs(5), vmm.accept())
            .await
            .expect("the source waited behind a silent connection")
            .unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "state");
        drop(got);
        source.await.unwrap().unwrap();
        assert_eq!(target.await.unwrap().unwrap(), 5);
        assert_eq!(sent.load(Ordering::Relaxed), 5);
        assert_eq!(received.load(Ordering::Relaxed), 5);
    }
}
