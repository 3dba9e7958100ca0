//! Long-lived connections (a streaming answer, a WebSocket) to a sandbox that
//! leaves its node (migrated away, removed): the node ingress cuts them, the
//! client sees a close through the cluster ingress, and its reconnect reaches
//! the node the sandbox moved to.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hearth_ingress::{Backend, NodeRelay, Resolver, Target, Unavailable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER_TOKEN: &str = "cluster-admin-token-0123";

/// A node's view: `sb` listens on loopback while `here` is set; then it left.
struct Node(Arc<AtomicBool>);
impl Resolver for Node {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        if sandbox == "sb" && self.0.load(Ordering::SeqCst) {
            return Ok(Target::Sandbox(Backend {
                ip: Ipv4Addr::LOCALHOST,
                token: "sbtok".into(),
            }));
        }
        Err(Unavailable::NotFound(sandbox.into()))
    }
}

/// The cluster's view: `web` runs on node A until `moved`, then on node B.
struct Cluster {
    a: SocketAddr,
    b: SocketAddr,
    moved: Arc<AtomicBool>,
}
impl Resolver for Cluster {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        if sandbox != "web" {
            return Err(Unavailable::Gone(sandbox.into()));
        }
        let addr = if self.moved.load(Ordering::SeqCst) {
            self.b
        } else {
            self.a
        };
        Ok(Target::Node(NodeRelay {
            addr,
            sandbox: "sb".into(),
            credential: hearth_ingress::relay_credential(CLUSTER_TOKEN),
        }))
    }
}

/// A sandbox's server: `/stream` answers with a chunk `NAME\n` every 50 ms
/// forever; `/ws` upgrades and then echoes. Returns its port.
async fn long_lived_backend(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let Some(head) = common::read_head(&mut s).await else {
                    return;
                };
                let mut chunk = [0u8; 1024];
                if head.contains("/ws") {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                        .await;
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&chunk[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                if s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    let line = format!("{name}\n");
                    let c = format!("{:x}\r\n{line}\r\n", line.len());
                    if s.write_all(c.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    });
    port
}

async fn serve(app: axum::Router) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .unwrap()
    });
    addr
}

/// Reads from `s` until `needle` was seen (10 s at most).
async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&out).contains(needle) {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in: {}", String::from_utf8_lossy(&out)));
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until the connection closes (EOF or an error); panics if it is
/// still open after `within`.
async fn closes_within(s: &mut TcpStream, within: Duration, what: &str) {
    let mut chunk = [0u8; 4096];
    let r = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "{what}: still open {within:?} after the sandbox left its node"
    );
}

struct Setup {
    ingress: SocketAddr,
    on_a: Arc<AtomicBool>,
    moved: Arc<AtomicBool>,
    port_a: u16,
}

/// A cluster ingress relaying to node A's node ingress (the sandbox and its
/// server `A`) or, once moved, to node B's (server `B`, same port).
async fn setup() -> Setup {
    let port_a = long_lived_backend("A").await;
    let on_a = Arc::new(AtomicBool::new(true));
    let node_a = serve(hearth_ingress::node_router(
        Node(on_a.clone()),
        CLUSTER_TOKEN,
    ))
    .await;
    // Node B's sandbox listens on another loopback port; its node ingress
    // forwards to it via a resolver that maps the same sandbox there.
    let port_b = long_lived_backend("B").await;
    forwarder(port_a, port_b).await;
    let node_b = serve(hearth_ingress::node_router(NodeB, CLUSTER_TOKEN)).await;
    let moved = Arc::new(AtomicBool::new(false));
    let ingress = serve(hearth_ingress::router(
        "hearth.localhost",
        Cluster {
            a: node_a,
            b: node_b,
            moved: moved.clone(),
        },
    ))
    .await;
    Setup {
        ingress,
        on_a,
        moved,
        port_a,
    }
}

/// Node B: the sandbox runs here, at 127.0.0.2 (a [`forwarder`] gives it the
/// same port as on node A: both servers live on one host in this test).
struct NodeB;
impl Resolver for NodeB {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        if sandbox != "sb" {
            return Err(Unavailable::NotFound(sandbox.into()));
        }
        Ok(Target::Sandbox(Backend {
            ip: Ipv4Addr::new(127, 0, 0, 2),
            token: "sbtok".into(),
        }))
    }
}

/// Forwards 127.0.0.2:`from` to 127.0.0.1:`to`, so node B's sandbox has the
/// same port as node A's.
async fn forwarder(from: u16, to: u16) {
    let l = TcpListener::bind(("127.0.0.2", from)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                if let Ok(mut b) = TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                }
            });
        }
    });
}

fn request(port: u16, path: &str, upgrade: bool) -> String {
    let up = if upgrade {
        "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    } else {
        ""
    };
    format!("GET /sandboxes/web/ports/{port}{path} HTTP/1.1\r\nHost: x\r\nx-hearth-token: sbtok\r\n{up}\r\n")
}

#[tokio::test]
async fn a_stream_and_a_websocket_to_a_sandbox_that_left_are_closed_and_a_reconnect_reaches_its_new_node(
) {
    let s = setup().await;

    // A streaming answer and a WebSocket, both to node A.
    let mut stream = TcpStream::connect(s.ingress).await.unwrap();
    stream
        .write_all(request(s.port_a, "/stream", false).as_bytes())
        .await
        .unwrap();
    read_until(&mut stream, "A\n").await;
    let mut ws = TcpStream::connect(s.ingress).await.unwrap();
    ws.write_all(request(s.port_a, "/ws", true).as_bytes())
        .await
        .unwrap();
    read_until(&mut ws, "\r\n\r\n").await;
    ws.write_all(b"ping").await.unwrap();
    read_until(&mut ws, "ping").await;

    // The sandbox moves: node A no longer runs it, the record names node B.
    s.moved.store(true, Ordering::SeqCst);
    s.on_a.store(false, Ordering::SeqCst);
    closes_within(&mut stream, Duration::from_secs(3), "the streaming answer").await;
    closes_within(&mut ws, Duration::from_secs(3), "the WebSocket").await;

    // Reconnecting reaches node B.
    let mut again = TcpStream::connect(s.ingress).await.unwrap();
    again
        .write_all(request(s.port_a, "/stream", false).as_bytes())
        .await
        .unwrap();
    read_until(&mut again, "B\n").await;
    let mut ws = TcpStream::connect(s.ingress).await.unwrap();
    ws.write_all(request(s.port_a, "/ws", true).as_bytes())
        .await
        .unwrap();
    read_until(&mut ws, "101").await;
    ws.write_all(b"pong").await.unwrap();
    read_until(&mut ws, "pong").await;
}

#[tokio::test]
async fn a_stream_to_a_sandbox_that_stays_is_not_cut() {
    let s = setup().await;
    let mut stream = TcpStream::connect(s.ingress).await.unwrap();
    stream
        .write_all(request(s.port_a, "/stream", false).as_bytes())
        .await
        .unwrap();
    read_until(&mut stream, "A\n").await;
    // Read on for two seconds (eight checks): it never ends, and the chunks
    // (one per 50 ms) keep coming (review m8).
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut chunks = 0;
    let mut chunk = [0u8; 4096];
    loop {
        let read = tokio::time::timeout_at(until, stream.read(&mut chunk)).await;
        let Ok(n) = read else { break };
        let n = n.expect("the stream reads");
        assert!(n > 0, "the stream ended after {chunks} chunks");
        chunks += chunk[..n].windows(2).filter(|w| w == b"A\n").count();
    }
    assert!(chunks >= 30, "only {chunks} chunks in 2 s");
}
