//! Routes of templates, warm pools, snapshots and fork.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use hearth_agent::Agent;
use hearth_api::{
    CreateSnapshot, CreateTemplate, ForkSandbox, Sandbox, SetPool, Snapshot, Template,
};

use crate::{ApiResult, Json};

pub(crate) fn routes() -> Router<Agent> {
    Router::new()
        .route("/v1/templates", get(list_templates).post(create_template))
        .route("/v1/templates/{name}", delete(delete_template))
        .route("/v1/templates/{name}/pool", post(set_pool))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{name}", delete(delete_snapshot))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot_sandbox))
        .route("/v1/sandboxes/{id}/fork", post(fork_sandbox))
}

/// OpenAPI paths of these routes.
pub(crate) fn paths(
    json: &dyn Fn(&str) -> serde_json::Value,
    err: &serde_json::Value,
) -> serde_json::Value {
    let list = |s: &str| serde_json::json!({"content": {"application/json": {"schema": {"type": "array", "items": {"$ref": format!("#/components/schemas/{s}")}}}}});
    let name = serde_json::json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let id = serde_json::json!([{"name": "id", "in": "path", "required": true, "description": "sandbox id or name", "schema": {"type": "string"}}]);
    serde_json::json!({
        "/v1/templates": {
            "get": {"summary": "List templates with their warm pools", "responses": {"200": list("Template")}},
            "post": {"summary": "Boot an image once and snapshot it as a template", "requestBody": json("CreateTemplate"), "responses": {"201": json("Template"), "400": err, "404": err, "409": err}}
        },
        "/v1/templates/{name}": {"delete": {"parameters": name, "summary": "Remove a template (refused while sandboxes run from it)", "responses": {"204": {"description": "removed"}, "404": err, "409": err}}},
        "/v1/templates/{name}/pool": {"post": {"parameters": name, "summary": "Set the warm pool size", "requestBody": json("SetPool"), "responses": {"200": json("Template"), "404": err}}},
        "/v1/snapshots": {"get": {"summary": "List snapshots", "responses": {"200": list("Snapshot")}}},
        "/v1/snapshots/{name}": {"delete": {"parameters": name, "summary": "Remove a snapshot (refused while in use)", "responses": {"204": {"description": "removed"}, "404": err, "409": err}}},
        "/v1/sandboxes/{id}/snapshot": {"post": {"parameters": id, "summary": "Snapshot a running sandbox (pause, save, resume)", "requestBody": json("CreateSnapshot"), "responses": {"201": json("Snapshot"), "409": err}}},
        "/v1/sandboxes/{id}/fork": {"post": {"parameters": id, "summary": "Start `count` copies of a running sandbox", "requestBody": json("ForkSandbox"), "responses": {"201": list("Sandbox"), "409": err}}}
    })
}

async fn list_templates(State(agent): State<Agent>) -> Json<Vec<Template>> {
    Json(agent.list_templates().await)
}

async fn create_template(
    State(agent): State<Agent>,
    Json(req): Json<CreateTemplate>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    Ok((StatusCode::CREATED, Json(agent.create_template(req).await?)))
}

async fn delete_template(
    State(agent): State<Agent>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    agent.remove_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_pool(
    State(agent): State<Agent>,
    Path(name): Path<String>,
    Json(req): Json<SetPool>,
) -> ApiResult<Json<Template>> {
    Ok(Json(agent.set_pool_size(&name, req.size).await?))
}

async fn list_snapshots(State(agent): State<Agent>) -> Json<Vec<Snapshot>> {
    Json(agent.list_snapshots().await)
}

async fn delete_snapshot(
    State(agent): State<Agent>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    agent.remove_snapshot(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn snapshot_sandbox(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(req): Json<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    Ok((
        StatusCode::CREATED,
        Json(agent.snapshot_sandbox(&id, &req.name).await?),
    ))
}

async fn fork_sandbox(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(req): Json<ForkSandbox>,
) -> ApiResult<(StatusCode, Json<Vec<Sandbox>>)> {
    Ok((StatusCode::CREATED, Json(agent.fork(&id, req.count).await?)))
}
