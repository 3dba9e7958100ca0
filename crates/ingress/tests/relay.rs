//! A cluster ingress relaying to a real node ingress: what the sandbox sees.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use hearth_ingress::{Backend, NodeRelay, Resolver, Target, Unavailable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER_TOKEN: &str = "cluster-admin-token-0123";

/// The node's view: the sandbox `sb` listens on loopback.
struct OnNode;
impl Resolver for OnNode {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        match sandbox {
            "sb" => Ok(Target::Sandbox(Backend {
                ip: Ipv4Addr::LOCALHOST,
                token: "sbtok".into(),
            })),
            other => Err(Unavailable::NotFound(other.into())),
        }
    }
}

/// The cluster's view: `web` runs as `sb` on the node at `.0`.
struct InCluster(SocketAddr);
impl Resolver for InCluster {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        match sandbox {
            "web" => Ok(Target::Node(NodeRelay {
                addr: self.0,
                sandbox: "sb".into(),
                credential: hearth_ingress::relay_credential(CLUSTER_TOKEN),
            })),
            other => Err(Unavailable::Gone(other.into())),
        }
    }
}

/// Answers every request with the raw request head it received.
async fn echo_backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let Some(head) = common::read_head(&mut s).await else {
                    return;
                };
                let head = head.to_lowercase();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
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

async fn raw(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_sandbox_never_sees_cluster_credentials_and_keeps_the_clients_host_and_auth() {
    let port = echo_backend().await;
    let node = serve(hearth_ingress::node_router(OnNode, CLUSTER_TOKEN)).await;
    let cluster = serve(hearth_ingress::router("hearth.test", InCluster(node))).await;
    let cred = hearth_ingress::relay_credential(CLUSTER_TOKEN);
    let host = format!("{port}-web.hearth.test");
    let got = raw(
        cluster,
        &format!(
            "GET /hello HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer client-own\r\n\
             X-Hearth-Token: sbtok\r\nX-Hearth-Relay-Credential: forged\r\n\
             X-Hearth-Original-Host: evil.example\r\nX-Forwarded-For: 6.6.6.6\r\n\
             Connection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let seen = got.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    assert!(seen.starts_with("get /hello http/1.1"), "{seen}");
    assert!(!seen.contains(&CLUSTER_TOKEN.to_lowercase()), "{seen}");
    assert!(!seen.contains(&cred), "{seen}");
    assert!(!seen.contains("x-hearth-relay-credential"), "{seen}");
    assert!(!seen.contains("x-hearth-original-host"), "{seen}");
    assert!(
        !seen.contains("evil.example") && !seen.contains("6.6.6.6"),
        "{seen}"
    );
    assert!(
        !seen.contains("sbtok"),
        "the sandbox token is stripped: {seen}"
    );
    assert!(seen.contains(&format!("\r\nhost: {host}\r\n")), "{seen}");
    assert!(
        seen.contains(&format!("\r\nx-forwarded-host: {host}\r\n")),
        "{seen}"
    );
    assert!(
        seen.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{seen}"
    );
    assert!(seen.contains("\r\nx-forwarded-proto: http\r\n"), "{seen}");
    assert!(
        seen.contains("\r\nauthorization: bearer client-own\r\n"),
        "{seen}"
    );

    // The node ingress takes the relay credential only, not the cluster token.
    let path = format!("/v1/ingress/sandboxes/sb/ports/{port}/x");
    let with_token = raw(
        node,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: n\r\nAuthorization: Bearer {CLUSTER_TOKEN}\r\n\
             X-Hearth-Token: sbtok\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(with_token.starts_with("HTTP/1.1 401"), "{with_token}");
    let with_cred = raw(
        node,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: n\r\nX-Hearth-Relay-Credential: {cred}\r\n\
             X-Hearth-Token: sbtok\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(with_cred.starts_with("HTTP/1.1 200"), "{with_cred}");
    assert_ne!(cred, CLUSTER_TOKEN);
}

/// A node that no longer runs the sandbox (it migrated away).
struct Emptied;
impl Resolver for Emptied {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        Err(Unavailable::NotFound(sandbox.into()))
    }
}

/// The cluster's view during a live migration of `web`: on `from` while
/// `moved` is false (and moving), then on `to`.
struct Migrating {
    from: SocketAddr,
    to: SocketAddr,
    moved: std::sync::Arc<std::sync::atomic::AtomicBool>,
}
impl Resolver for Migrating {
    fn resolve(&self, _sandbox: &str) -> Result<Target, Unavailable> {
        let moved = self.moved.load(std::sync::atomic::Ordering::SeqCst);
        Ok(Target::Node(NodeRelay {
            addr: if moved { self.to } else { self.from },
            sandbox: "sb".into(),
            credential: hearth_ingress::relay_credential(CLUSTER_TOKEN),
        }))
    }
    fn moving(&self, _sandbox: &str) -> bool {
        !self.moved.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_get_during_a_live_migration_waits_for_the_new_node_and_a_post_is_not_replayed() {
    let port = echo_backend().await;
    let old = serve(hearth_ingress::node_router(Emptied, CLUSTER_TOKEN)).await;
    let new = serve(hearth_ingress::node_router(OnNode, CLUSTER_TOKEN)).await;
    let moved = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cluster = serve(hearth_ingress::router(
        "hearth.test",
        Migrating {
            from: old,
            to: new,
            moved: moved.clone(),
        },
    ))
    .await;
    let get = format!(
        "GET /page HTTP/1.1\r\nHost: {port}-web.hearth.test\r\nX-Hearth-Token: sbtok\r\nConnection: close\r\n\r\n"
    );
    let post = format!(
        "POST /page HTTP/1.1\r\nHost: {port}-web.hearth.test\r\nX-Hearth-Token: sbtok\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\nhi"
    );
    let got = raw(cluster, &post).await;
    let m2 = moved.clone();
    let flip = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        m2.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert!(
        got.starts_with("HTTP/1.1 404"),
        "a POST is not replayed: {got}"
    );
    let t = std::time::Instant::now();
    let got = raw(cluster, &get).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("get /page http/1.1"), "{got}");
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    flip.await.unwrap();

    // Not moving: the old node's answer is passed on at once.
    let settled = serve(hearth_ingress::router("hearth.test", InCluster(old))).await;
    let got = raw(settled, &get).await;
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
}
