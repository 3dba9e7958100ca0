//! The OpenAPI document served at `/openapi.json`.

use axum::response::IntoResponse;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Hearth API", description = "Run OCI images in microVMs."),
    components(schemas(
        hearth_api::CreateSandbox,
        hearth_api::Sandbox,
        hearth_api::SandboxStatus,
        hearth_api::ExitInfo,
        hearth_api::ExecRequest,
        hearth_api::ImportImage,
        hearth_api::Image,
        hearth_api::ImageConfig,
        hearth_api::PullImage,
        hearth_api::PullEvent,
        hearth_api::RegistryLogin,
        hearth_api::PruneReport,
        hearth_api::Info,
        hearth_api::ApiError,
        hearth_api::ErrorCode,
        hearth_api::migration::MigrateSandbox,
        hearth_api::migration::CancelMigration,
        hearth_api::migration::MigrationStatus,
        hearth_api::migration::PauseSteps,
        hearth_api::migration::IncomingOffer,
        hearth_api::migration::IncomingAccepted,
        hearth_api::migration::IncomingNet,
        hearth_api::migration::LeaseHolder,
        hearth_api::migration::MachineLayout,
        hearth_api::migration::MachineNic,
        hearth_api::migration::IncomingCommit,
        hearth_api::migration::IncomingAborted,
        hearth_api::migration::IncomingRemoved,
        hearth_api::network::NetworkSpec,
        hearth_api::network::NetworkMode,
        hearth_api::network::NicMode,
        hearth_api::network::EgressPolicy,
        hearth_api::network::IngressPolicy,
        hearth_api::network::NetworkPolicy,
        hearth_api::network::SandboxNetwork,
        hearth_api::network::SandboxIngress,
        hearth_api::network::IngressInfo,
        hearth_api::network::PolicyStats,
        hearth_api::network::PolicyCounter,
        hearth_api::StartPath,
        hearth_api::CreateTemplate,
        hearth_api::Template,
        hearth_api::SetPool,
        hearth_api::CreateSnapshot,
        hearth_api::Snapshot,
        hearth_api::ForkSandbox,
    ))
)]
struct ApiDoc;

/// The document, with the routes described by hand (they are few and stable).
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let ct = hearth_api::stream::CONTENT_TYPE;
    let json = |schema: &str| serde_json::json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let err = json("ApiError");
    let id = serde_json::json!([{"name": "id", "in": "path", "required": true, "description": "sandbox id or name", "schema": {"type": "string"}}]);
    let stream = serde_json::json!({"description": format!("records: u8 tag (1 stdout, 2 stderr, 3 exit JSON ExitInfo, 4 error JSON ApiError) | u32 LE length | payload"), "content": {ct: {"schema": {"type": "string", "format": "binary"}}}});
    doc["paths"] = serde_json::json!({
        "/v1/info": {"get": {"summary": "Node, backend and accelerator", "responses": {"200": json("Info")}}},
        "/v1/sandboxes": {
            "get": {"summary": "List sandboxes", "responses": {"200": {"content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Sandbox"}}}}}}},
            "post": {"summary": "Create and start a sandbox", "requestBody": json("CreateSandbox"), "responses": {"201": json("Sandbox"), "400": err, "404": err, "409": err}}
        },
        "/v1/sandboxes/{id}": {
            "get": {"parameters": id, "responses": {"200": json("Sandbox"), "404": err}},
            "delete": {"parameters": id, "summary": "Remove (force=true kills a running one)", "responses": {"204": {"description": "removed"}, "404": err, "409": err}}
        },
        "/v1/sandboxes/{id}/stop": {"post": {"parameters": id, "summary": "SIGTERM, then power off after `timeout` seconds", "responses": {"200": json("Sandbox"), "404": err}}},
        "/v1/sandboxes/{id}/kill": {"post": {"parameters": id, "summary": "Send `signal` (default 9) to the main workload's process group", "responses": {"204": {"description": "delivered"}, "400": err, "409": err}}},
        "/v1/sandboxes/{id}/wait": {"post": {"parameters": id, "summary": "Wait until the sandbox ends", "responses": {"200": json("Sandbox"), "404": err}}},
        "/v1/sandboxes/{id}/output": {"get": {"parameters": id, "summary": "Main workload output (follow=true streams until the end)", "responses": {"200": stream, "404": err}}},
        "/v1/sandboxes/{id}/stdin": {"post": {"parameters": id, "summary": "Stream the request body into the workload's stdin", "responses": {"204": {"description": "stdin closed"}, "409": err}}},
        "/v1/sandboxes/{id}/exec": {"post": {"parameters": id, "summary": "Run a process in a running sandbox; the response streams its output; header x-hearth-exec-id names it", "requestBody": json("ExecRequest"), "responses": {"200": stream, "409": err}}},
        "/v1/sandboxes/{id}/execs/{exec_id}/stdin": {"post": {"summary": "Stream into an exec session's stdin", "responses": {"204": {"description": "stdin closed"}, "404": err}}},
        "/v1/images": {"get": {"summary": "List images", "responses": {"200": {"content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}}}}}}}},
        "/v1/images/import": {"post": {"summary": "Import an image from a path on the daemon's host", "requestBody": json("ImportImage"), "responses": {"201": json("Image"), "400": err, "404": err}}},
        "/v1/images/{reference}": {"delete": {"summary": "Remove an image", "responses": {"204": {"description": "removed"}, "404": err}}},
        "/v1/sandboxes/{id}/migrate": {"post": {"parameters": id, "summary": "Live-migrate a running sandbox to another node; returns when the target runs it", "requestBody": json("MigrateSandbox"), "responses": {"200": json("MigrationStatus"), "404": err, "409": err, "500": err}}},
        "/v1/sandboxes/{id}/migration": {"get": {"parameters": id, "summary": "Progress of the sandbox's current or last migration from this node", "responses": {"200": json("MigrationStatus"), "404": err}}},
        "/v1/sandboxes/{id}/migration/cancel": {"post": {"parameters": id, "summary": "Cancel the sandbox's outgoing migration attempt unless it committed; answers its status once ended (aborted: runs here; completed: runs on the target)", "requestBody": json("CancelMigration"), "responses": {"200": json("MigrationStatus"), "404": err, "409": err}}},
        "/v1/migrations/incoming": {"post": {"summary": "Agent to agent: prepare an incoming VM (the image must be here)", "requestBody": json("IncomingOffer"), "responses": {"201": json("IncomingAccepted"), "404": err, "409": err}}},
        "/v1/migrations/incoming/{id}": {"delete": {"summary": "Agent to agent: remove an uncommitted incoming VM (409 if committed). With `?attempt=ID&owner=TAG` (the control plane, cluster token only): the question about one migration attempt after an abort nobody confirmed; the attempt is given up for good first (a later prepare or commit of it is refused), then 200 `removed: uncommitted` unless the copy tagged TAG runs here (409 migration_committed)", "parameters": [{"name": "attempt", "in": "query", "required": false, "schema": {"type": "string"}}, {"name": "owner", "in": "query", "required": false, "schema": {"type": "string"}}], "responses": {"200": json("IncomingAborted"), "403": err, "409": err}}},
        "/v1/migrations/incoming/{id}/log": {"put": {"summary": "Agent to agent: the sandbox's output log so far", "responses": {"200": {"description": "stored"}, "409": {"description": "the body does not continue the log here (or the migration was committed or removed); header x-hearth-log-len: the log's length here"}}}},
        "/v1/migrations/incoming/{id}/commit": {"post": {"summary": "Agent to agent: start the migrated VM and take the sandbox over", "requestBody": json("IncomingCommit"), "responses": {"200": json("Sandbox"), "500": err}}},
        "/v1/images/pull": {"post": {"summary": "Pull an image from a registry (linux/amd64). The response streams one JSON PullEvent per line (application/x-ndjson): progress, then `done` with the Image or `error` with an ApiError. Concurrent pulls of one reference share the work.", "requestBody": json("PullImage"), "responses": {"200": {"content": {hearth_api::NDJSON: {"schema": {"$ref": "#/components/schemas/PullEvent"}}}}, "400": err}}},
        "/v1/images/prune": {"post": {"summary": "Delete root filesystems and cached registry blobs that no image uses", "responses": {"200": json("PruneReport")}}},
        "/v1/registries/login": {"post": {"summary": "Store credentials for a registry on the daemon's host (0600 file in the data dir); used by later pulls", "requestBody": json("RegistryLogin"), "responses": {"204": {"description": "stored"}, "400": err}}}
    });
    if let (Some(paths), serde_json::Value::Object(more)) = (
        doc["paths"].as_object_mut(),
        crate::policy::openapi_paths(json, &err),
    ) {
        paths.extend(more);
    }
    if let (Some(paths), Some(more)) = (
        doc["paths"].as_object_mut(),
        crate::warm::paths(&json, &err).as_object().cloned(),
    ) {
        paths.extend(more);
    }
    doc
}

pub async fn serve() -> impl IntoResponse {
    axum::Json(document())
}
