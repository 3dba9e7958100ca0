//! The migration stream between two agents: the source VMM writes into a unix
//! socket of the source agent, which connects to the target agent over TCP and
//! presents a one-time ticket (issued by `prepare`, which needed the target's
//! API token); the target agent then splices the connection into its incoming
//! VMM's unix socket. The VMMs never listen on the network, and a connection
//! without the ticket reaches nothing. The bandwidth cap is the VMM's own
//! (`max-bandwidth`); the tunnel counts bytes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Ticket length in hex characters (32 random bytes).
pub const TICKET_LEN: usize = 64;
/// How long a peer has to present the ticket.
const TICKET_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Target side: accepts connections on `listener` until one presents `ticket`,
/// then splices it into the unix socket `vmm`. Returns the bytes received.
pub async fn serve_target(
    listener: TcpListener,
    ticket: String,
    vmm: &Path,
) -> std::io::Result<u64> {
    loop {
        let (mut tcp, peer) = listener.accept().await?;
        let mut got = [0u8; TICKET_LEN];
        let ok = tokio::time::timeout(TICKET_TIMEOUT, tcp.read_exact(&mut got))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if !ok || !same(&got, ticket.as_bytes()) {
            tracing::warn!(%peer, "migration tunnel: connection without the right ticket refused");
            continue;
        }
        drop(listener);
        let _ = tcp.set_nodelay(true);
        let mut unix = UnixStream::connect(vmm).await?;
        let (up, _down) = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await?;
        return Ok(up);
    }
}

/// Source side: accepts the VMM's one connection on `listener`, connects to
/// the target at `addr` with `ticket`, and splices. `sent` counts bytes.
pub async fn serve_source(
    listener: UnixListener,
    addr: SocketAddr,
    ticket: String,
    sent: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (mut unix, _) = listener.accept().await?;
    let mut tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(ticket.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut tr, mut tw) = tcp.into_split();
    let (mut ur, mut uw) = unix.split();
    let up = async {
        loop {
            let n = ur.read(&mut buf).await?;
            if n == 0 {
                tw.shutdown().await?;
                return Ok::<(), std::io::Error>(());
            }
            tw.write_all(&buf[..n]).await?;
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let down = async {
        tokio::io::copy(&mut tr, &mut uw).await?;
        Ok::<(), std::io::Error>(())
    };
    tokio::try_join!(up, down)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_ticket_holder_reaches_the_vmm_socket() {
        let dir = tempfile::tempdir().unwrap();
        let vmm_sock = dir.path().join("vmm.sock");
        let vmm = UnixListener::bind(&vmm_sock).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let ticket = new_ticket();
        let t2 = ticket.clone();
        let target = tokio::spawn(async move { serve_target(tcp, t2, &vmm_sock).await });

        // A stranger with a wrong ticket is dropped.
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(&[b'0'; TICKET_LEN]).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(bad.read(&mut b).await.unwrap_or(0), 0);

        let src_sock = dir.path().join("src.sock");
        let src = UnixListener::bind(&src_sock).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let s2 = sent.clone();
        let source = tokio::spawn(serve_source(src, addr, ticket, s2));
        let mut qemu = UnixStream::connect(&src_sock).await.unwrap();
        qemu.write_all(b"state").await.unwrap();
        qemu.shutdown().await.unwrap();
        let (mut got, _) = vmm.accept().await.unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "state");
        drop(got);
        source.await.unwrap().unwrap();
        assert_eq!(target.await.unwrap().unwrap(), 5);
        assert_eq!(sent.load(Ordering::Relaxed), 5);
    }
}
