//! The migration stream between two agents: the source agent connects to the
//! target agent over TCP and presents a one-time ticket (issued by `prepare`,
//! which needed the target's API token); the target agent checks it. Then each
//! agent hands its end of that connection to its own VMM (QEMU `getfd` +
//! `fd:`), and the stream goes VMM to VMM with no relay in between (issue 7:
//! two user-space relays copied every byte twice more and woke two tasks per
//! chunk, inside the guest's pause too). The VMMs never listen on the network,
//! and a connection without the ticket reaches nothing. The bandwidth cap is
//! the VMM's own (`max-bandwidth`); the VMM counts the bytes.
//!
//! The bytes in flight are bounded (issue 7): the source VMM judges its
//! bandwidth, and so when the rest fits the downtime budget, by how fast its
//! socket drains, and every byte held between it and the target VMM when it
//! completes is read by the target inside the guest's pause. So the TCP
//! buffers are fixed and small (autotuning grows them to several MiB).

use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// Ticket length in hex characters (32 random bytes).
pub const TICKET_LEN: usize = 64;
/// How long a peer has to present the ticket.
const TICKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections presenting a ticket at once; more are closed at accept (a
/// flood of silent connections must not take the agent's descriptors).
const MAX_CHECKS: usize = 32;
/// Pause after a failed `accept` (out of descriptors, buffers) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long the source waits for the target's tunnel to accept it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `SO_SNDBUF` of the source's and `SO_RCVBUF` of the target's TCP socket
/// (the kernel doubles it for its bookkeeping). Set, they stop autotuning:
/// in flight between the VMMs stay under ~1 MiB (both TCP buffers), which a
/// target taking in 100 MB/s reads in ~10 ms, while a 0.5 ms round trip still
/// carries ~1 GB/s. (128 KiB paused the same and moved the bulk no faster;
/// docs/migration.md.)
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

/// Target side: accepts connections on `listener` until one presents
/// `ticket`, and answers that connection (read exactly up to the end of the
/// ticket: the next byte is the stream's first) for the incoming VMM.
pub async fn accept_target(
    listener: TcpListener,
    ticket: String,
) -> std::io::Result<std::net::TcpStream> {
    // why: tickets are read concurrently, so a connection that sends
    // nothing (anyone who reaches the port) cannot hold the source back for
    // the ticket timeout.
    let ticket = Arc::new(ticket);
    let mut checks = tokio::task::JoinSet::new();
    let mut failed_accepts = 0u64;
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
                if checks.len() >= MAX_CHECKS {
                    tracing::warn!(%peer, "migration tunnel: {MAX_CHECKS} connections are presenting tickets already; this one is closed");
                    continue;
                }
                let ticket = ticket.clone();
                checks.spawn(async move {
                    let mut got = [0u8; TICKET_LEN];
                    let ok = tokio::time::timeout(TICKET_TIMEOUT, tcp.read_exact(&mut got))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    if ok && same(&got, ticket.as_bytes()) {
                        Some(tcp)
                    } else {
                        tracing::warn!(%peer, "migration tunnel: connection without the right ticket refused");
                        None
                    }
                });
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
    let _ = tcp.set_nodelay(true);
    tcp.into_std()
}

/// A duplicate of the source's end of the stream, kept by the agent while its
/// VMM writes into the other.
pub struct Breaker(std::net::TcpStream);

impl Breaker {
    /// Breaks the stream (both directions, for every holder of the socket):
    /// the source VMM's next write fails, so a migration still sending fails
    /// and its VM runs again. Bytes already queued are still delivered (then
    /// FIN): a stream whose last pass was queued may complete at the target,
    /// which is why the commit, not the stream, decides (the source checks
    /// for a cancel before it sends the commit).
    pub fn break_stream(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Source side: connects to the target's tunnel at `addr` (at most
/// [`CONNECT_TIMEOUT`]) and presents `ticket`. Answers the connection for the
/// VMM, which writes the stream into it itself, and a [`Breaker`] of it.
pub async fn connect_source(
    addr: SocketAddr,
    ticket: &str,
) -> std::io::Result<(std::os::fd::OwnedFd, Breaker)> {
    let connect = async {
        let sock = bounded_socket(addr, TcpSocket::set_send_buffer_size, "send")?;
        let mut tcp = sock.connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(ticket.as_bytes()).await?;
        Ok::<_, std::io::Error>(tcp)
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
            )
        })??;
    let tcp = tcp.into_std()?;
    // why: the VMM's migration thread writes with blocking calls.
    tcp.set_nonblocking(false)?;
    let breaker = Breaker(tcp.try_clone()?);
    Ok((tcp.into(), breaker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_ticket_holder_gets_the_stream_and_nothing_of_it_is_read() {
        let tcp = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = new_ticket();
        let target = tokio::spawn(accept_target(tcp, ticket.clone()));

        // A stranger that sends nothing does not hold the source back (its
        // check waits beside the others'): kept open for the whole test.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A stranger with a wrong ticket is dropped.
        let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
        bad.write_all(&[b'0'; TICKET_LEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).await.unwrap_or(0), 0);

        let (for_vmm, breaker) = connect_source(addr, &ticket).await.unwrap();
        // why: what the VMM writes right behind the ticket (QEMU starts
        // writing as soon as it has the socket) must reach the target's VMM
        // whole: accepting reads the ticket and not one byte more.
        let mut qemu = std::net::TcpStream::from(for_vmm);
        std::io::Write::write_all(&mut qemu, b"state").unwrap();
        drop(qemu);
        // why: well under the ticket timeout (10 s) the silent stranger
        // would have cost, were tickets read one connection at a time.
        let mut got = tokio::time::timeout(Duration::from_secs(5), target)
            .await
            .expect("the source waited behind a silent connection")
            .unwrap()
            .unwrap();
        // The breaker's duplicate still holds the connection open: break it.
        breaker.0.shutdown(Shutdown::Write).unwrap();
        got.set_nonblocking(false).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut got, &mut s).unwrap();
        assert_eq!(s, "state");
    }

    /// review10 F1: a stranger's check that fails while the real source's is
    /// still pending must not leave the real one unread.
    #[tokio::test]
    async fn a_strangers_failed_check_does_not_hide_the_source_presenting_its_ticket_later() {
        let tcp = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = new_ticket();
        let target = tokio::spawn(accept_target(tcp, ticket.clone()));
        // The source connects first and is slow to present its ticket...
        let mut source = tokio::net::TcpStream::connect(addr).await.unwrap();
        // ...while a stranger's wrong ticket is checked and refused.
        let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
        bad.write_all(&[b'0'; TICKET_LEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).await.unwrap_or(0), 0);
        source.write_all(ticket.as_bytes()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), target)
            .await
            .expect("the source's connection was never taken after a stranger's failed check")
            .unwrap();
        assert!(got.is_ok());
    }

    #[tokio::test]
    async fn breaking_the_source_stream_ends_it_for_the_vmm_holding_it() {
        let tcp = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = new_ticket();
        let target = tokio::spawn(accept_target(tcp, ticket.clone()));
        let (for_vmm, breaker) = connect_source(addr, &ticket).await.unwrap();
        let mut got = target.await.unwrap().unwrap();
        // The VMM holds its end; the agent breaks the stream.
        let qemu = std::net::TcpStream::from(for_vmm);
        breaker.break_stream();
        got.set_nonblocking(false).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut got, &mut b).unwrap(),
            0,
            "EOF at the target"
        );
        let wrote = std::io::Write::write_all(&mut &qemu, &[0u8; 4096]);
        assert!(wrote.is_err(), "the VMM's writes fail once broken");
    }

    #[tokio::test]
    async fn an_unreachable_target_is_an_error_not_a_hang() {
        // why: a port nothing listens on (bound, then closed) refuses at once.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(connect_source(addr, &new_ticket()).await.is_err());
    }
}
