//! Policy endpoints: `GET|PUT /v1/sandboxes/{id}/policy` and
//! `GET /v1/sandboxes/{id}/policy/stats`. A PUT takes effect at once.

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::Router;
use hearth_agent::Agent;
use hearth_api::network::{NetworkPolicy, PolicyStats};

use crate::{ApiResult, Json};

pub fn routes() -> Router<Agent> {
    Router::new()
        .route("/v1/sandboxes/{id}/policy", get(show).put(set))
        .route("/v1/sandboxes/{id}/policy/stats", get(stats))
}

async fn show(
    State(agent): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<Json<NetworkPolicy>> {
    Ok(Json(agent.policy(&id)?))
}

/// `?version=N`: the control plane's version of the policy (a cluster
/// member sets it; see [`Agent::set_policy`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQuery {
    version: Option<u64>,
}

/// `hearthd dev` records the policy in the sandbox's record of its embedded
/// control plane first (as a cluster member does), then applies it with the
/// record's version; a policy the agent refuses is set back in the record.
async fn set(
    State(agent): State<Agent>,
    axum::Extension(crate::DevStore(dev)): axum::Extension<crate::DevStore>,
    Path(id): Path<String>,
    Query(q): Query<SetQuery>,
    Json(p): Json<NetworkPolicy>,
) -> ApiResult<Json<NetworkPolicy>> {
    let Some(cp) = dev else {
        return Ok(Json(agent.set_policy(&id, &p, q.version).await?));
    };
    // why: in `hearthd dev` the embedded control plane's record orders the
    // sets (its version goes to the node); a client's own version counts
    // only for a copy without a record.
    let recorded = cp.dev_record_policy(&agent, &id, &p).await?;
    let version = recorded
        .as_ref()
        .map(|(rec, _)| rec.policy_version)
        .or(q.version);
    match agent.set_policy(&id, &p, version).await {
        Ok(applied) => Ok(Json(applied)),
        Err(e) => {
            let e = hearth_api::ApiError::new(e.code(), e.to_string());
            match recorded {
                Some((rec, previous)) if e.code == hearth_api::ErrorCode::InvalidArgument => {
                    // why: back to what the copy enforces (the policy read
                    // before this set may be one the node refuses too).
                    let back_to = agent
                        .policy(&id)
                        .ok()
                        .and_then(|p| serde_json::to_value(p).ok())
                        .unwrap_or(previous);
                    let back = cp.dev_revert_policy(&rec, back_to).await;
                    Err(crate::HttpError(hearth_api::ApiError::new(
                        e.code,
                        format!("{}; the recorded policy {back}", e.message),
                    )))
                }
                _ => Err(crate::HttpError(e)),
            }
        }
    }
}

async fn stats(State(agent): State<Agent>, Path(id): Path<String>) -> ApiResult<Json<PolicyStats>> {
    Ok(Json(agent.policy_stats(&id)?))
}

/// OpenAPI paths of these routes.
pub fn openapi_paths(
    json: impl Fn(&str) -> serde_json::Value,
    err: &serde_json::Value,
) -> serde_json::Value {
    let id = serde_json::json!([{"name": "id", "in": "path", "required": true, "description": "sandbox id or name", "schema": {"type": "string"}}]);
    serde_json::json!({
        "/v1/sandboxes/{id}/policy": {
            "get": {"parameters": id, "summary": "The sandbox's egress and ingress policy", "responses": {"200": json("NetworkPolicy"), "404": err}},
            "put": {"parameters": id, "summary": "Replace the whole policy, both directions (live, atomic, no restart)", "requestBody": json("NetworkPolicy"), "responses": {"200": json("NetworkPolicy"), "400": err, "404": err}}
        },
        "/v1/sandboxes/{id}/policy/stats": {"get": {"parameters": id, "summary": "Per-rule packet and byte counters from the BPF maps", "responses": {"200": json("PolicyStats"), "404": err}}}
    })
}
