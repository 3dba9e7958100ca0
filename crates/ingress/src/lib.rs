//! The ingress role: an HTTP reverse proxy from `<port>-<sandbox>.<domain>` or
//! `/sandboxes/<sandbox>/ports/<port>/...` to the sandbox's address and port.
//!
//! Flow: route the request (`route`), ask the `Resolver` where the sandbox is.
//! When its address is reachable from here ([`Target::Sandbox`]), check the
//! token, open a TCP connection to the sandbox and forward the request over
//! HTTP/1.1. When another host runs it ([`Target::Node`], a cluster), relay
//! the request untouched to that node agent's node ingress
//! ([`node_router`], `/v1/ingress/...`, cluster bearer token), which checks the
//! sandbox's token and forwards it. Bodies stream both ways; an `Upgrade`
//! (WebSocket) is completed end to end and then spliced. Failures are 4xx/502
//! responses whose body says why.

pub mod route;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;

/// Header, query parameter and cookie that carry the access token.
pub const TOKEN_HEADER: &str = "x-hearth-token";
pub const TOKEN_PARAM: &str = "hearth_token";
/// How long connecting to a sandbox port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a sandbox can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub token: String,
}

/// The node agent that runs a sandbox on another host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRelay {
    /// The agent's node-local API.
    pub addr: SocketAddr,
    /// The agent's id of the sandbox.
    pub sandbox: String,
    /// The relay credential ([`relay_credential`]) the node ingress requires.
    pub credential: String,
}

/// Where a request for a sandbox goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The sandbox's own address, reachable from here.
    Sandbox(Backend),
    /// Relayed to the node agent that runs it.
    Node(NodeRelay),
}

/// Path prefix of the node ingress on an agent's node-local API.
pub const NODE_PREFIX: &str = "/v1/ingress";
/// Header that carries the relay credential from a cluster ingress to a node
/// ingress; never reaches a sandbox.
pub const RELAY_HEADER: &str = "x-hearth-relay-credential";
/// Header that carries the client's `Host` across the relay hop; the node
/// ingress puts it back into `Host`.
pub const ORIGINAL_HOST: &str = "x-hearth-original-host";
/// Header an earlier version used for the client's `Authorization`; removed
/// from every request so a client cannot inject it.
const LEGACY_CLIENT_AUTH: &str = "x-hearth-client-authorization";
/// Headers only ingresses set; a client's copies are dropped.
const PRIVATE_HEADERS: [&str; 3] = [RELAY_HEADER, ORIGINAL_HOST, LEGACY_CLIENT_AUTH];

/// The credential a cluster ingress relays with: HMAC-SHA256 of the label
/// `ingress-relay` keyed with the cluster token, hex. Only a node ingress
/// accepts it (no other API route does), and the cluster token itself never
/// travels with a client's request.
pub fn relay_credential(cluster_token: &str) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(cluster_token.as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(b"ingress-relay");
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a sandbox cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("sandbox '{0}' not found")]
    NotFound(String),
    #[error("sandbox '{sandbox}' is {status}, not running")]
    NotRunning { sandbox: String, status: String },
    #[error("sandbox '{0}' has no network (--network none)")]
    NoNetwork(String),
    /// The cluster has no such sandbox (any more): removed, or never created.
    #[error("sandbox '{0}' does not exist: it was removed or never created")]
    Gone(String),
    /// It is placed on a node that cannot be reached or has not started it.
    #[error("sandbox '{sandbox}': {why}")]
    NodeUnavailable { sandbox: String, why: String },
}

/// Looks sandboxes up (the agent, or the control plane in a cluster).
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable>;
    /// True while the sandbox is being live-migrated between nodes: a relay
    /// that failed (the old node stopped serving it) is retried once its
    /// record names the new node.
    fn moving(&self, sandbox: &str) -> bool {
        let _ = sandbox;
        false
    }
}

/// How long a relayed request that failed during a live migration waits for
/// the sandbox's record to name its new node.
const MOVE_WAIT: Duration = Duration::from_secs(20);
/// How often the record is looked at meanwhile.
const MOVE_POLL: Duration = Duration::from_millis(50);

/// What is needed to send a request without a body again.
struct Replay {
    method: axum::http::Method,
    uri: axum::http::Uri,
    version: axum::http::Version,
    headers: axum::http::HeaderMap,
}

impl Replay {
    /// A copy of `req` when it can be sent again: a GET, HEAD or OPTIONS
    /// without a body or an upgrade.
    fn of(req: &Request) -> Option<Replay> {
        use axum::http::Method;
        let h = req.headers();
        let bodiless = !h.contains_key(header::TRANSFER_ENCODING)
            && h.get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        (safe && bodiless && !is_upgrade(req)).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(&self) -> Request {
        let mut req = Request::new(Body::empty());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Relays to the node that runs the sandbox. When that fails (502, 404)
/// while the sandbox is live-migrating, a GET, HEAD or OPTIONS without a body waits (at
/// most [`MOVE_WAIT`]) for the record to name another node and is sent there:
/// a client sees a stall, not an error.
async fn relay_following(
    ing: &Ingress,
    req: Request,
    r: &route::Route,
    node: NodeRelay,
) -> Response {
    let replay = Replay::of(&req);
    let resp = relay(req, r, node.clone()).await;
    let Some(replay) = replay else { return resp };
    if !matches!(
        resp.status(),
        StatusCode::BAD_GATEWAY | StatusCode::NOT_FOUND
    ) {
        return resp;
    }
    let deadline = tokio::time::Instant::now() + MOVE_WAIT;
    loop {
        if let Ok(Target::Node(now)) = ing.resolver.resolve(&r.sandbox) {
            if now != node {
                tracing::debug!(sandbox = %r.sandbox, "relaying again to the node it migrated to");
                return relay(replay.request(), r, now).await;
            }
        }
        if !ing.resolver.moving(&r.sandbox) || tokio::time::Instant::now() >= deadline {
            return resp;
        }
        tokio::time::sleep(MOVE_POLL).await;
    }
}

struct Ingress {
    domain: String,
    resolver: Box<dyn Resolver>,
}

/// The proxy as an axum router (every path).
pub fn router(domain: &str, resolver: impl Resolver) -> Router {
    Router::new().fallback(proxy).with_state(Arc::new(Ingress {
        domain: domain.to_ascii_lowercase(),
        resolver: Box::new(resolver),
    }))
}

struct NodeIngress {
    resolver: Box<dyn Resolver>,
    credential: String,
}

/// The node ingress of an agent: `/v1/ingress/sandboxes/<id>/ports/<port>/...`
/// for requests relayed by a cluster ingress. Requires the relay credential
/// derived from the cluster token ([`relay_credential`]) in [`RELAY_HEADER`],
/// not the token itself; the sandbox's own access token is checked as at any
/// ingress.
pub fn node_router(resolver: impl Resolver, cluster_token: &str) -> Router {
    Router::new()
        .route(
            &format!("{NODE_PREFIX}/sandboxes/{{*rest}}"),
            axum::routing::any(node_proxy),
        )
        .with_state(Arc::new(NodeIngress {
            resolver: Box::new(resolver),
            credential: relay_credential(cluster_token),
        }))
}

fn reply(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("hearth ingress: {msg}\n")).into_response()
}

fn presented_token(req: &Request) -> Option<String> {
    if let Some(v) = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return Some(v.to_string());
    }
    if let Some(q) = req.uri().query() {
        for kv in q.split('&') {
            if let Some(v) = kv
                .strip_prefix(TOKEN_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                return Some(v.to_string());
            }
        }
    }
    for c in req.headers().get_all(header::COOKIE) {
        for kv in c.to_str().unwrap_or("").split(';') {
            if let Some(v) = kv
                .trim()
                .strip_prefix(TOKEN_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Removes the `hearth_token` cookie, keeping the others: the sandbox never
/// sees its access token.
fn strip_token_cookie(headers: &mut hyper::HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{TOKEN_PARAM}=")))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = kept.join("; ").parse() {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// The path with the `hearth_token` query parameter removed (the sandbox never
/// sees its own access token).
fn without_token_param(path: &str) -> String {
    let Some((p, q)) = path.split_once('?') else {
        return path.to_string();
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| kv.split('=').next() != Some(TOKEN_PARAM))
        .collect();
    if kept.is_empty() {
        p.to_string()
    } else {
        format!("{p}?{}", kept.join("&"))
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn is_upgrade(req: &Request) -> bool {
    req.headers().contains_key(header::UPGRADE)
}

fn unavailable(e: Unavailable) -> Response {
    match e {
        e @ Unavailable::NotFound(_) => reply(StatusCode::NOT_FOUND, e),
        e => reply(StatusCode::BAD_GATEWAY, e),
    }
}

async fn proxy(State(ing): State<Arc<Ingress>>, mut req: Request) -> Response {
    forwarded_from_client(&mut req);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(str::to_string);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let r = match route::route(host.as_deref(), &pq, &ing.domain) {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::NOT_FOUND, e),
    };
    match ing.resolver.resolve(&r.sandbox) {
        Ok(Target::Sandbox(b)) => {
            let here = Target::Sandbox(b.clone());
            let ing2 = ing.clone();
            let watch = Watch::new(&r.sandbox, here, move |sb| ing2.resolver.resolve(sb));
            to_sandbox(req, &r, b, Some(watch)).await
        }
        Ok(Target::Node(n)) => relay_following(&ing, req, &r, n).await,
        Err(e) => unavailable(e),
    }
}

/// How often a long-lived connection (a streaming answer, an upgraded
/// connection) to a sandbox on this node checks that the sandbox still runs
/// here (each check is a lookup in the agent's table: not every 100 ms).
const HERE_POLL: Duration = Duration::from_millis(250);

/// Whether a sandbox still resolves to the target a connection was made to.
/// A connection to a sandbox that left (migrated away, removed, stopped)
/// leads to a VM that is gone: it is cut, so the client sees a close and can
/// reconnect (and reach the node it moved to) instead of hanging.
#[derive(Clone)]
struct Watch {
    sandbox: String,
    here: Target,
    resolve: Arc<ResolveFn>,
}

/// A resolver's lookup, shareable with the tasks that outlive a request.
type ResolveFn = dyn Fn(&str) -> Result<Target, Unavailable> + Send + Sync;

impl Watch {
    fn new(
        sandbox: &str,
        here: Target,
        resolve: impl Fn(&str) -> Result<Target, Unavailable> + Send + Sync + 'static,
    ) -> Watch {
        Watch {
            sandbox: sandbox.to_string(),
            here,
            resolve: Arc::new(resolve),
        }
    }

    /// Resolves once the sandbox no longer runs here.
    async fn gone(self) {
        let mut tick = tokio::time::interval(HERE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // why: a resolver error may be passing (a lookup that failed once):
        // it cuts only when the next check fails too; another target cuts at
        // once (review m7).
        let mut failed = false;
        loop {
            tick.tick().await;
            match (self.resolve)(&self.sandbox) {
                Ok(t) if t == self.here => failed = false,
                Err(e) if !failed => {
                    tracing::debug!(sandbox = %self.sandbox, "resolving a watched sandbox failed ({e:?}); checking again");
                    failed = true;
                }
                _ => {
                    tracing::debug!(sandbox = %self.sandbox, "cutting a connection to a sandbox that left this node");
                    return;
                }
            }
        }
    }
}

/// A response body that ends with an error (the client's connection is
/// closed without a complete answer) once `watch` says the sandbox left.
fn cut_when_gone(body: hyper::body::Incoming, watch: Watch) -> Body {
    use http_body_util::BodyExt;
    let gone: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(watch.clone().gone());
    let sandbox = watch.sandbox;
    let stream =
        futures_util::stream::unfold((body, gone, false), move |(mut body, mut gone, done)| {
            let sandbox = sandbox.clone();
            async move {
                if done {
                    return None;
                }
                tokio::select! {
                    f = body.frame() => match f {
                        Some(Ok(f)) => Some((Ok(f), (body, gone, false))),
                        Some(Err(e)) => Some((Err(axum::Error::new(e)), (body, gone, true))),
                        None => None,
                    },
                    _ = &mut gone => Some((
                        Err(axum::Error::new(std::io::Error::other(format!(
                            "sandbox '{sandbox}' left this node (migrated away, removed or stopped)"
                        )))),
                        (body, gone, true),
                    )),
                }
            }
        });
    Body::new(http_body_util::StreamBody::new(stream))
}

/// Drops the client's copies of the ingress-private headers and sets
/// `X-Forwarded-Host/For/Proto` from what this ingress saw (a client's own
/// values are not trusted).
fn forwarded_from_client(req: &mut Request) {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let h = req.headers_mut();
    for p in PRIVATE_HEADERS {
        h.remove(p);
    }
    match h.get(header::HOST).cloned() {
        Some(v) => {
            h.insert("x-forwarded-host", v);
        }
        None => {
            h.remove("x-forwarded-host");
        }
    }
    match peer.and_then(|p| p.parse().ok()) {
        Some(v) => {
            h.insert("x-forwarded-for", v);
        }
        None => {
            h.remove("x-forwarded-for");
        }
    }
    h.insert(
        "x-forwarded-proto",
        header::HeaderValue::from_static("http"),
    );
}

/// A request relayed by a cluster ingress to this node.
async fn node_proxy(State(node): State<Arc<NodeIngress>>, mut req: Request) -> Response {
    let presented = req
        .headers()
        .get(RELAY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !same(presented, &node.credential) {
        return reply(
            StatusCode::UNAUTHORIZED,
            format!("the node ingress takes only requests relayed by a cluster ingress ({RELAY_HEADER})"),
        );
    }
    // why: the sandbox must never see the relay credential; it gets the client's Host back.
    let h = req.headers_mut();
    h.remove(RELAY_HEADER);
    h.remove(LEGACY_CLIENT_AUTH);
    match h.remove(ORIGINAL_HOST) {
        Some(v) => {
            h.insert(header::HOST, v);
        }
        None => {
            h.remove(header::HOST);
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let r = match route::route(None, pq.strip_prefix(NODE_PREFIX).unwrap_or(&pq), "") {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::NOT_FOUND, e),
    };
    match node.resolver.resolve(&r.sandbox) {
        Ok(Target::Sandbox(b)) => {
            let here = Target::Sandbox(b.clone());
            let node2 = node.clone();
            let watch = Watch::new(&r.sandbox, here.clone(), move |sb| {
                node2.resolver.resolve(sb)
            });
            while_here(
                node.resolver.as_ref(),
                &r.sandbox,
                &here,
                to_sandbox(req, &r, b, Some(watch)),
            )
            .await
        }
        Ok(Target::Node(_)) => reply(
            StatusCode::BAD_GATEWAY,
            format!("sandbox '{}' does not run on this node", r.sandbox),
        ),
        Err(e) => unavailable(e),
    }
}

/// Checks the sandbox's access token, then forwards to its address.
/// Runs `fut` (a request to a sandbox on this node) until its answer starts,
/// or until the sandbox no longer resolves to `here` (it stopped or migrated
/// away: its VM, and any connection to it, are gone): then a 502, at once
/// rather than after the connect timeout, so a cluster ingress can follow the
/// sandbox to its new node.
async fn while_here(
    resolver: &dyn Resolver,
    sandbox: &str,
    here: &Target,
    fut: impl std::future::Future<Output = Response>,
) -> Response {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(MOVE_POLL);
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tick.tick() => {
                if resolver.resolve(sandbox).as_ref() != Ok(here) {
                    return reply(
                        StatusCode::BAD_GATEWAY,
                        format!("sandbox '{sandbox}' stopped running on this node (removed, stopped or migrated away) during the request"),
                    );
                }
            }
        }
    }
}

async fn to_sandbox(
    mut req: Request,
    r: &route::Route,
    backend: Backend,
    watch: Option<Watch>,
) -> Response {
    match presented_token(&req) {
        Some(t) if same(&t, &backend.token) => {}
        Some(_) => return reply(StatusCode::FORBIDDEN, "wrong access token"),
        None => {
            return reply(
                StatusCode::UNAUTHORIZED,
                format!("access token required ({TOKEN_HEADER} header, {TOKEN_PARAM} query parameter or cookie)"),
            )
        }
    }
    let path = without_token_param(&r.path);
    req.headers_mut().remove(TOKEN_HEADER);
    strip_token_cookie(req.headers_mut());
    let what = format!("sandbox '{}' port {}", r.sandbox, r.port);
    forward(
        req,
        SocketAddr::from((backend.ip, r.port)),
        &path,
        &what,
        watch,
    )
    .await
}

/// Sends the request, the sandbox's token and the client's `Authorization`
/// untouched, to the node ingress of the node that runs the sandbox (which
/// checks the token), with the relay credential and the client's `Host` in
/// private headers. The cluster token is never sent.
async fn relay(mut req: Request, r: &route::Route, node: NodeRelay) -> Response {
    let path = format!(
        "{NODE_PREFIX}/sandboxes/{}/ports/{}{}",
        node.sandbox, r.port, r.path
    );
    let h = req.headers_mut();
    let Ok(cred) = header::HeaderValue::from_str(&node.credential) else {
        return reply(
            StatusCode::BAD_GATEWAY,
            "the relay credential is not a valid header value",
        );
    };
    h.insert(RELAY_HEADER, cred);
    if let Some(host) = h.remove(header::HOST) {
        h.insert(ORIGINAL_HOST, host);
    }
    if let Ok(v) = node.addr.to_string().parse() {
        h.insert(header::HOST, v);
    }
    let what = format!("node {} running sandbox '{}'", node.addr, r.sandbox);
    // why: no watch; the node ingress cuts what leads to a sandbox that left
    // that node, and the close travels back through this hop.
    forward(req, node.addr, &path, &what, None).await
}

/// Forwards `req` to `addr` with `path`: HTTP/1.1, bodies streamed, upgrades
/// spliced. With a `watch`, the answer's body and an upgraded connection are
/// cut once the sandbox no longer runs here.
async fn forward(
    mut req: Request,
    addr: SocketAddr,
    path: &str,
    what: &str,
    watch: Option<Watch>,
) -> Response {
    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return reply(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot connect to {what}: {e}"),
                )
            }
            Err(_) => {
                return reply(
                    StatusCode::BAD_GATEWAY,
                    format!("{what} did not accept within {CONNECT_TIMEOUT:?}"),
                )
            }
        };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return reply(StatusCode::BAD_GATEWAY, format!("{what}: {e}")),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("ingress backend connection: {e}");
        }
    });

    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    *req.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("bad path: {e}")),
    };
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return reply(StatusCode::BAD_GATEWAY, format!("{what}: {e}")),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let watch = watch.clone();
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, backend_upgrade) {
                    Ok((c, b)) => {
                        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                        let splice = tokio::io::copy_bidirectional(&mut c, &mut b);
                        match watch {
                            // Dropping both ends closes the client's connection.
                            Some(w) => {
                                tokio::select! {
                                    _ = splice => {}
                                    _ = w.gone() => {}
                                }
                            }
                            None => {
                                let _ = splice.await;
                            }
                        }
                    }
                    Err(e) => tracing::debug!("ingress upgrade failed: {e}"),
                }
            });
        }
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let (parts, body) = resp.into_parts();
    match watch {
        Some(w) => Response::from_parts(parts, cut_when_gone(body, w)),
        None => Response::from_parts(parts, Body::new(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review m7: one failed lookup does not cut a watched connection; two
    /// in a row, or another target, do.
    #[tokio::test]
    async fn a_watch_cuts_on_a_second_failed_lookup_not_the_first() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let here = Target::Sandbox(Backend {
            ip: Ipv4Addr::LOCALHOST,
            token: "t".into(),
        });
        // Fails on the second check only, then resolves here again.
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, h) = (calls.clone(), here.clone());
        let once = Watch::new("sb", here.clone(), move |sb| {
            match c.fetch_add(1, Ordering::SeqCst) {
                1 => Err(Unavailable::NotFound(sb.to_string())),
                _ => Ok(h.clone()),
            }
        });
        let r = tokio::time::timeout(HERE_POLL * 6, once.gone()).await;
        assert!(r.is_err(), "cut on one failed lookup");
        assert!(calls.load(Ordering::SeqCst) >= 4);
        // Fails from the second check on: cut on the third.
        let (c, h) = (Arc::new(AtomicUsize::new(0)), here.clone());
        let twice = Watch::new("sb", here, move |sb| {
            match c.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(h.clone()),
                _ => Err(Unavailable::NotFound(sb.to_string())),
            }
        });
        tokio::time::timeout(HERE_POLL * 6, twice.gone())
            .await
            .expect("cut after two failed lookups");
    }

    #[test]
    fn tokens_are_found_in_header_query_or_cookie() {
        let mk = |f: fn(axum::http::request::Builder) -> axum::http::request::Builder,
                  uri: &str| {
            f(Request::builder().uri(uri)).body(Body::empty()).unwrap()
        };
        assert_eq!(
            presented_token(&mk(|b| b.header(TOKEN_HEADER, "t1"), "/")).as_deref(),
            Some("t1")
        );
        assert_eq!(
            presented_token(&mk(|b| b, "/x?a=1&hearth_token=t2")).as_deref(),
            Some("t2")
        );
        assert_eq!(
            presented_token(&mk(|b| b.header("cookie", "a=b; hearth_token=t3"), "/")).as_deref(),
            Some("t3")
        );
        assert_eq!(presented_token(&mk(|b| b, "/")), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
        assert_eq!(without_token_param("/a?hearth_token=x&b=1"), "/a?b=1");
        let mut h = hyper::HeaderMap::new();
        h.insert(header::COOKIE, "a=b; hearth_token=t3; c=d".parse().unwrap());
        strip_token_cookie(&mut h);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=b; c=d");
        let mut h = hyper::HeaderMap::new();
        h.insert(header::COOKIE, "hearth_token=t3".parse().unwrap());
        strip_token_cookie(&mut h);
        assert!(h.get(header::COOKIE).is_none());
        assert_eq!(without_token_param("/a?hearth_token=x"), "/a");
        assert_eq!(without_token_param("/a?b=1"), "/a?b=1");
    }
}
