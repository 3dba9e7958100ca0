//! The proxy against a real backend on loopback: tokens, streaming, WebSocket
//! style upgrades and the 502 of a stopped sandbox.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hearth_ingress::{Backend, Resolver, Target, Unavailable};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Fixed;

impl Resolver for Fixed {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        match sandbox {
            "web" => Ok(Target::Sandbox(Backend {
                ip: Ipv4Addr::LOCALHOST,
                token: "tok".into(),
            })),
            "gone" => Err(Unavailable::NotRunning {
                sandbox: "gone".into(),
                status: "stopped".into(),
            }),
            other => Err(Unavailable::NotFound(other.into())),
        }
    }
}

type Gate = Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>;

/// `/stream`: "first\n", then waits for the gate, then "second\n".
/// `/ws`: 101, then echoes raw bytes. Anything else: the path back.
async fn backend(gate: Gate) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let gate = gate.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let gate = gate.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            if path == "/ws" {
                                let up = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    let mut io = TokioIo::new(up.await.unwrap());
                                    let mut buf = [0u8; 64];
                                    while let Ok(n) = io.read(&mut buf).await {
                                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                });
                                let r = Response::builder()
                                    .status(101)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .body(http_body_util::Full::new(Bytes::new()).boxed())
                                    .unwrap();
                                return Ok::<_, Infallible>(r);
                            }
                            if path == "/stream" {
                                let rx = gate.lock().unwrap().take().unwrap();
                                let s = futures_stream(rx);
                                return Ok(Response::new(StreamBody::new(s).boxed()));
                            }
                            Ok(Response::new(
                                http_body_util::Full::new(Bytes::from(format!(
                                    "path={}",
                                    req.uri()
                                )))
                                .boxed(),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

fn futures_stream(
    rx: tokio::sync::oneshot::Receiver<()>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let (tx, out) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from("first\n")))).await;
        let _ = rx.await;
        let _ = tx.send(Ok(Frame::data(Bytes::from("second\n")))).await;
    });
    tokio_stream_from(out)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn ingress() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(l, hearth_ingress::router("hearth.test", Fixed))
            .await
            .unwrap()
    });
    addr
}

async fn raw(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn tokens_routes_and_stopped_sandboxes() {
    let (_tx, rx) = tokio::sync::oneshot::channel();
    let port = backend(Arc::new(Mutex::new(Some(rx)))).await;
    let ing = ingress().await;
    let get = |host: String, path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    };
    let r = raw(ing, &get(format!("{port}-web.hearth.test"), "/x?y=1", "")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = raw(
        ing,
        &get(
            format!("{port}-web.hearth.test"),
            "/x",
            "x-hearth-token: nope\r\n",
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = raw(
        ing,
        &get(
            format!("{port}-web.hearth.test"),
            "/x?y=1",
            "x-hearth-token: tok\r\n",
        ),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("path=/x?y=1"),
        "{r}"
    );
    let path = format!("/sandboxes/web/ports/{port}/a/b?hearth_token=tok");
    let r = raw(ing, &get("localhost".into(), &path, "")).await;
    assert!(r.ends_with("path=/a/b"), "the token is not forwarded: {r}");
    let r = raw(
        ing,
        &get(
            "localhost".into(),
            &format!("/sandboxes/gone/ports/{port}/"),
            "",
        ),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 502") && r.contains("stopped, not running"),
        "{r}"
    );
    let r = raw(
        ing,
        &get("localhost".into(), "/sandboxes/nope/ports/80/", ""),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    // Nothing listens on port 1 of the sandbox.
    let r = raw(
        ing,
        &get("1-web.hearth.test".into(), "/", "x-hearth-token: tok\r\n"),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 502") && r.contains("cannot connect"),
        "{r}"
    );
}

#[tokio::test]
async fn responses_stream_before_the_backend_finishes() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let port = backend(Arc::new(Mutex::new(Some(rx)))).await;
    let ing = ingress().await;
    let mut s = TcpStream::connect(ing).await.unwrap();
    s.write_all(format!("GET /stream HTTP/1.1\r\nHost: {port}-web.hearth.test\r\nx-hearth-token: tok\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("first chunk arrives while the backend is still waiting")
            .unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("second"));
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&got).contains("second"));
}

#[tokio::test]
async fn upgrades_are_spliced_end_to_end() {
    let (_tx, rx) = tokio::sync::oneshot::channel();
    let port = backend(Arc::new(Mutex::new(Some(rx)))).await;
    let ing = ingress().await;
    let mut s = TcpStream::connect(ing).await.unwrap();
    s.write_all(format!("GET /sandboxes/web/ports/{port}/ws HTTP/1.1\r\nHost: x\r\nx-hearth-token: tok\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ping over the upgraded stream").await.unwrap();
    let mut echo = [0u8; 29];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping over the upgraded stream");
}
