//! The ingress role: an HTTP reverse proxy from `<port>-<sandbox>.<domain>` or
//! `/sandboxes/<sandbox>/ports/<port>/...` to the sandbox's address and port.
//!
//! Flow: route the request (`route`), ask the `Resolver` where the sandbox is
//! and what token it wants, check the token, open a TCP connection to the
//! sandbox and forward the request over HTTP/1.1. Bodies stream both ways; an
//! `Upgrade` (WebSocket) is completed end to end and then spliced. Failures are
//! 4xx/502 responses whose body says why.

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

/// Why a sandbox cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("sandbox '{0}' not found")]
    NotFound(String),
    #[error("sandbox '{sandbox}' is {status}, not running")]
    NotRunning { sandbox: String, status: String },
    #[error("sandbox '{0}' has no network (--network none)")]
    NoNetwork(String),
}

/// Looks sandboxes up (the agent, or the control plane in a cluster).
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, sandbox: &str) -> Result<Backend, Unavailable>;
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

async fn proxy(State(ing): State<Arc<Ingress>>, mut req: Request) -> Response {
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
    let backend = match ing.resolver.resolve(&r.sandbox) {
        Ok(b) => b,
        Err(e @ Unavailable::NotFound(_)) => return reply(StatusCode::NOT_FOUND, e),
        Err(e) => return reply(StatusCode::BAD_GATEWAY, e),
    };
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
    let addr = SocketAddr::from((backend.ip, r.port));
    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return reply(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "cannot connect to sandbox '{}' port {}: {e}",
                        r.sandbox, r.port
                    ),
                )
            }
            Err(_) => {
                return reply(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "sandbox '{}' port {} did not accept within {CONNECT_TIMEOUT:?}",
                        r.sandbox, r.port
                    ),
                )
            }
        };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => {
            return reply(
                StatusCode::BAD_GATEWAY,
                format!("sandbox '{}': {e}", r.sandbox),
            )
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("ingress backend connection: {e}");
        }
    });

    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    *req.uri_mut() = match without_token_param(&r.path).parse() {
        Ok(u) => u,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("bad path: {e}")),
    };
    req.headers_mut().remove(TOKEN_HEADER);
    strip_token_cookie(req.headers_mut());
    if let Some(h) = req.headers().get(header::HOST).cloned() {
        req.headers_mut().insert("x-forwarded-host", h);
    }
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            return reply(
                StatusCode::BAD_GATEWAY,
                format!("sandbox '{}' port {}: {e}", r.sandbox, r.port),
            )
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, backend_upgrade) {
                    Ok((c, b)) => {
                        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                    }
                    Err(e) => tracing::debug!("ingress upgrade failed: {e}"),
                }
            });
        }
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

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
