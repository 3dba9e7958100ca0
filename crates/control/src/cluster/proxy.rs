//! Requests that belong to a node agent, passed through: a sandbox's streams
//! (output, exec, stdin) go to the agent that runs it; image operations go to
//! every ready node (each node keeps its own image cache).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hearth_api::{ApiError, ErrorCode, ImportImage};

use super::sandboxes::lookup;
use super::ControlPlane;
use crate::{HttpError, Json};

type ApiResult<T> = Result<T, HttpError>;

fn unavailable(msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(ErrorCode::Unavailable, msg))
}

/// Copies an agent's response (status, content type, exec id, streamed body).
fn relay(r: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = Vec::new();
    for h in ["content-type", "x-hearth-exec-id"] {
        if let Some(v) = r
            .headers()
            .get(h)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            headers.push((h, v));
        }
    }
    let body = Body::from_stream(r.bytes_stream().map(|c| c.map_err(std::io::Error::other)));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    for (h, v) in headers {
        resp.headers_mut().insert(h, v);
    }
    resp
}

/// `/v1/sandboxes/{id}/{rest}`: forwarded to the owning agent with the
/// agent's id for the sandbox.
pub(super) async fn sandbox(
    State(cp): State<ControlPlane>,
    Path((id, _rest)): Path<(String, String)>,
    req: Request,
) -> ApiResult<Response> {
    forward(&cp, &id, req).await
}

/// `GET /v1/sandboxes/{id}/policy`: what the running copy enforces, from its
/// agent (a `PUT` goes through the record first: [`super::policy::set`]).
pub(super) async fn policy(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    forward(&cp, &id, req).await
}

async fn forward(cp: &ControlPlane, id: &str, req: Request) -> ApiResult<Response> {
    // why: the decoded `{*rest}` would turn `..%2F..%2Fimages` into `../../images`,
    // which the outgoing URL then normalizes out of the sandbox's subtree.
    let rest = sandbox_subpath(req.uri().path()).ok_or_else(|| {
        HttpError(ApiError::new(
            ErrorCode::InvalidArgument,
            format!(
                "path {} is not a sandbox sub-resource; use /v1/sandboxes/SANDBOX/(output|exec|stdin|...)",
                req.uri().path()
            ),
        ))
    })?;
    let (rec, addr) = lookup(cp, id).await?;
    let agent_id = rec
        .observed
        .as_ref()
        .and_then(|o| o.agent_id.clone())
        .ok_or_else(|| {
            HttpError(ApiError::new(
                ErrorCode::Conflict,
                format!("sandbox {id} is not running on any node (record only, or not started)"),
            ))
        })?;
    let addr =
        addr.ok_or_else(|| unavailable(format!("node {} of sandbox {id} is not ready", rec.node)))?;
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("{addr}/v1/sandboxes/{agent_id}/{rest}{query}");
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|e| unavailable(e.to_string()))?;
    let ct = req.headers().get("content-type").cloned();
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let mut out = cp.stream_http.request(method, url).body(body);
    if let Some(ct) = ct {
        out = out.header("content-type", ct.as_bytes());
    }
    let r = out
        .send()
        .await
        .map_err(|e| unavailable(format!("node {} unreachable: {e}", rec.node)))?;
    Ok(relay(r))
}

/// The still percent-encoded part of `/v1/sandboxes/{id}/REST` after the id,
/// or `None` when a segment is empty, `.` or `..` (encoded or not), so a
/// forwarded request never leaves the sandbox's subtree on the agent.
fn sandbox_subpath(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let (_, rest) = rest.split_once('/')?;
    let ok = rest.split('/').all(|seg| {
        let lower = seg.to_ascii_lowercase();
        let dots = lower.replace("%2e", ".");
        !seg.is_empty()
            && dots != "."
            && dots != ".."
            && !lower.contains("%2f")
            && !lower.contains("%5c")
    });
    ok.then_some(rest)
}

async fn ready_nodes(cp: &ControlPlane) -> ApiResult<Vec<(String, String)>> {
    let v: Vec<(String, String)> = cp
        .store
        .read(|st| {
            st.nodes
                .values()
                .filter(|n| n.ready)
                .map(|n| (n.id.clone(), n.address.clone()))
                .collect()
        })
        .await?;
    if v.is_empty() {
        return Err(unavailable("no ready nodes"));
    }
    Ok(v)
}

pub(super) async fn list_images(State(cp): State<ControlPlane>) -> ApiResult<Response> {
    let (node, addr) = ready_nodes(&cp).await?.remove(0);
    let r = cp
        .http
        .get(format!("{addr}/v1/images"))
        .send()
        .await
        .map_err(|e| unavailable(format!("node {node} unreachable: {e}")))?;
    Ok(relay(r))
}

/// Imports on every ready node; the first failure is the answer.
pub(super) async fn import_image(
    State(cp): State<ControlPlane>,
    Json(req): Json<ImportImage>,
) -> ApiResult<Response> {
    let mut last = None;
    for (node, addr) in ready_nodes(&cp).await? {
        let r = cp
            .http
            .post(format!("{addr}/v1/images/import"))
            .json(&req)
            .send()
            .await
            .map_err(|e| unavailable(format!("node {node} unreachable: {e}")))?;
        if !r.status().is_success() {
            return Ok(relay(r));
        }
        last = Some(r);
    }
    last.map(relay).ok_or_else(|| unavailable("no ready nodes"))
}

pub(super) async fn delete_image(
    State(cp): State<ControlPlane>,
    Path(reference): Path<String>,
) -> ApiResult<Response> {
    let mut last = None;
    for (node, addr) in ready_nodes(&cp).await? {
        let r = cp
            .http
            .delete(format!("{addr}/v1/images/{reference}"))
            .send()
            .await
            .map_err(|e| unavailable(format!("node {node} unreachable: {e}")))?;
        if !r.status().is_success() && r.status() != reqwest::StatusCode::NOT_FOUND {
            return Ok(relay(r));
        }
        last = Some(r);
    }
    Ok(last
        .map(relay)
        .unwrap_or_else(|| StatusCode::NO_CONTENT.into_response()))
}

/// The first ready node's info (the control plane has no VMM of its own).
pub(super) async fn info(State(cp): State<ControlPlane>) -> ApiResult<Response> {
    let (node, addr) = ready_nodes(&cp).await?.remove(0);
    let r = cp
        .http
        .get(format!("{addr}/v1/info"))
        .send()
        .await
        .map_err(|e| unavailable(format!("node {node} unreachable: {e}")))?;
    if !r.status().is_success() {
        return Ok(relay(r));
    }
    let mut info: hearth_api::Info = r
        .json()
        .await
        .map_err(|e| unavailable(format!("node {node}'s info is unreadable: {e}")))?;
    // why: clients reach sandboxes through this member's cluster ingress, not
    // the node's.
    info.ingress = cp.cfg.ingress.clone();
    Ok(Json(info).into_response())
}

#[cfg(test)]
mod tests {
    use super::sandbox_subpath;

    #[test]
    fn sandbox_subpaths_stay_inside_the_sandbox() {
        assert_eq!(sandbox_subpath("/v1/sandboxes/a1/output"), Some("output"));
        assert_eq!(
            sandbox_subpath("/v1/sandboxes/a1/execs/e2/stdin"),
            Some("execs/e2/stdin")
        );
        for bad in [
            "/v1/sandboxes/a1/../../images/prune",
            "/v1/sandboxes/a1/..%2F..%2Fimages%2Fprune",
            "/v1/sandboxes/a1/%2e%2E/images",
            "/v1/sandboxes/a1/execs//stdin",
            "/v1/sandboxes/a1/./output",
            "/v1/sandboxes/a1/x%5C..%5Cimages",
            "/v1/images/prune",
            "/v1/sandboxes/a1",
        ] {
            assert_eq!(sandbox_subpath(bad), None, "{bad}");
        }
    }
}
