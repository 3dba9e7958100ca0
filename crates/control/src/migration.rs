//! Live-migration routes: the public `migrate` / `migration` of a sandbox, and
//! the target-side steps another agent calls with this node's token.

use std::net::IpAddr;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use hearth_agent::Agent;
use hearth_api::migration::{
    IncomingAccepted, IncomingCommit, IncomingOffer, MigrateSandbox, MigrationStatus,
};

use crate::{ApiResult, Json};

/// Largest log cap a node may have (hearthd refuses more); a migration's
/// target takes a log up to its own cap (plus its limit notice).
pub const MAX_LOG_BODY: usize = 512 << 20;

pub async fn migrate(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(req): Json<MigrateSandbox>,
) -> ApiResult<Json<MigrationStatus>> {
    if !req.target.starts_with("http://") && !req.target.starts_with("https://") {
        return Err(crate::HttpError(hearth_api::ApiError::new(
            hearth_api::ErrorCode::InvalidArgument,
            format!(
                "migration target '{}' is not a node API URL (http://HOST:PORT): this is a node's own API; node names and `auto` need the control plane (`hearthd control`)",
                req.target
            ),
        )));
    }
    Ok(Json(agent.migrate(&id, req).await?))
}

pub async fn status(
    State(agent): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(agent.migration_status(&id)?))
}

/// `POST /v1/sandboxes/{id}/migration/cancel`: the control plane gives a
/// migration attempt up (its deadline); see [`Agent::cancel_migration`].
pub async fn cancel(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(req): Json<hearth_api::migration::CancelMigration>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(agent.cancel_migration(&id, &req.attempt).await?))
}

/// The address the caller reached us on (Host header), so the tunnel listens
/// on the same interface; any interface when it is a name.
fn bind_ip(headers: &HeaderMap) -> Option<IpAddr> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let h = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    h.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

pub async fn prepare(
    State(agent): State<Agent>,
    axum::Extension(auth): axum::Extension<crate::Auth>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Json(offer): Json<IncomingOffer>,
) -> ApiResult<(StatusCode, Json<IncomingAccepted>)> {
    authorize_offer(&auth, &offer, &agent.info().node)?;
    // why: the source's tunnel connection comes from the address its offer
    // came from (unless a proxy stands between), from the port the offer
    // names: that check is the last a flood of connections may evict.
    let from = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| hearth_agent::migration::tunnel::Source {
            ip: c.0.ip(),
            port: headers
                .get(hearth_agent::migration::tunnel::TUNNEL_PORT_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
        });
    let attempt = match &auth {
        crate::Auth::Migration(scope) => Some(scope.attempt.clone()),
        crate::Auth::Admin => None,
    };
    let a = agent
        .incoming_prepare(offer, bind_ip(&headers), from, attempt)
        .await?;
    Ok((StatusCode::CREATED, Json(a)))
}

/// An offer let in by a scoped credential must match its scope: one sandbox,
/// one owner tag, one source node, the recorded resources and address (the
/// offer is only known here, after the body). The node's token allows any.
pub(crate) fn authorize_offer(
    auth: &crate::Auth,
    offer: &IncomingOffer,
    node: &str,
) -> Result<(), crate::HttpError> {
    match auth {
        crate::Auth::Admin => Ok(()),
        crate::Auth::Migration(scope) => scope
            .check_offer(&crate::credential::OfferFields::of(offer))
            .map_err(|e| {
                crate::HttpError(hearth_api::ApiError::new(
                    hearth_api::ErrorCode::Forbidden,
                    format!("node {node} refuses the migration credential: {e}"),
                ))
            }),
    }
}

/// `PUT /v1/migrations/incoming/{id}/log?truncated=true`: the source's log
/// reached its size limit.
/// `?offset=N`: the body continues the N bytes sent before (during the
/// pre-copy); without it the body is the whole log.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    offset: u64,
}

/// The body is written to the log as it arrives (review17 F7: not buffered
/// whole in memory); the node's log cap is checked as the bytes come. A 409
/// carries the length of the log here
/// ([`hearth_api::migration::LOG_LEN_HEADER`], review21 F3): the source
/// continues from it rather than sending the whole log again.
pub async fn log(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    body: axum::body::Body,
) -> Result<Json<serde_json::Value>, axum::response::Response> {
    use axum::response::IntoResponse;
    use futures::TryStreamExt;
    let body =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    match agent.incoming_log(&id, body, q.truncated, q.offset).await {
        Ok(n) => Ok(Json(serde_json::json!({ "bytes": n }))),
        Err(e) => {
            let conflict = matches!(e, hearth_agent::AgentError::Conflict(_));
            let mut r = crate::HttpError::from(e).into_response();
            if let Some(len) = agent.incoming_log_len(&id).filter(|_| conflict) {
                r.headers_mut()
                    .insert(hearth_api::migration::LOG_LEN_HEADER, len.into());
            }
            Err(r)
        }
    }
}

/// The answer carries when the VM here was resumed
/// ([`hearth_api::migration::VM_RESUMED_HEADER`]), for the source's
/// measure of the guest's pause.
pub async fn commit(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(c): Json<IncomingCommit>,
) -> ApiResult<(HeaderMap, Json<hearth_api::Sandbox>)> {
    let sb = agent.incoming_commit(&id, c).await?;
    let mut h = HeaderMap::new();
    if let Some(t) = agent.vm_resumed_us(&id) {
        h.insert(hearth_api::migration::VM_RESUMED_HEADER, t.into());
    }
    Ok((h, Json(sb)))
}

/// `DELETE /v1/migrations/incoming/{id}?attempt=ID&owner=TAG`: the control
/// plane's question about one attempt after it ended that migration without
/// the source's word (both or neither).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortQuery {
    attempt: Option<String>,
    owner: Option<String>,
}

/// The source's abort (no query), or the control plane's question about an
/// attempt ([`Agent::incoming_give_up`]).
pub async fn abort(
    State(agent): State<Agent>,
    axum::Extension(auth): axum::Extension<crate::Auth>,
    Path(id): Path<String>,
    Query(q): Query<AbortQuery>,
) -> ApiResult<Json<hearth_api::migration::IncomingAborted>> {
    let vm_ended = match (q.attempt, q.owner) {
        (None, None) => agent.incoming_abort(&id).await?,
        // why: a source's migration credential may abort its incoming VM,
        // but not give an attempt up for the control plane.
        (Some(_), Some(_)) if !matches!(auth, crate::Auth::Admin) => {
            return Err(crate::HttpError(hearth_api::ApiError::new(
                hearth_api::ErrorCode::Forbidden,
                format!(
                    "giving up a migration attempt of sandbox '{id}' needs the cluster token, not a migration credential"
                ),
            )))
        }
        // why: run to its end even if the leader's request goes away (its
        // timeout while a commit holds the slot): a removal cut midway
        // would leave the incoming VM half removed.
        (Some(attempt), Some(owner)) => {
            let (agent, id2) = (agent.clone(), id.clone());
            tokio::spawn(async move { agent.incoming_give_up(&id2, &attempt, &owner).await })
                .await
                .map_err(|e| {
                    crate::HttpError(hearth_api::ApiError::new(
                        hearth_api::ErrorCode::Internal,
                        format!("the question about sandbox '{id}' did not finish ({e}); ask again"),
                    ))
                })??
        }
        _ => {
            return Err(crate::HttpError(hearth_api::ApiError::new(
                hearth_api::ErrorCode::InvalidArgument,
                format!(
                    "the question about a migration attempt of sandbox '{id}' needs both `attempt` and `owner`"
                ),
            )))
        }
    };
    Ok(Json(hearth_api::migration::IncomingAborted {
        removed: hearth_api::migration::IncomingRemoved::Uncommitted,
        vm_ended,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_binds_to_the_address_the_caller_used() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "10.88.1.2:7070".parse().unwrap());
        assert_eq!(bind_ip(&h), Some("10.88.1.2".parse().unwrap()));
        h.insert(header::HOST, "[::1]:7070".parse().unwrap());
        assert_eq!(bind_ip(&h), Some("::1".parse().unwrap()));
        h.insert(header::HOST, "node-a:7070".parse().unwrap());
        assert_eq!(bind_ip(&h), None);
    }
}
