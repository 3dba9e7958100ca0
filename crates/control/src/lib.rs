//! The public HTTP API (`/v1/...`) over a node agent.
//!
//! Requests are JSON; errors are JSON [`ApiError`]s with a stable code. Output
//! streams use `hearth_api::stream` records. In the embedded default the API
//! server drives the agent in-process.

pub mod cluster;
pub mod credential;
mod migration;
pub use migration::MAX_LOG_BODY;
mod openapi;
mod policy;
mod pull;
mod warm;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use hearth_agent::{Agent, AgentError, SessionEvent, SessionInput};
use hearth_api::stream::{Record, CONTENT_TYPE};
use hearth_api::{ApiError, CreateSandbox, ErrorCode, ExecRequest, ExitInfo, ImportImage};
use serde::Deserialize;

/// Largest JSON request body.
const MAX_JSON_BODY: usize = 1024 * 1024;

/// An error response.
pub struct HttpError(ApiError);

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        HttpError(ApiError::new(e.code(), e.to_string()))
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

/// `axum::Json` whose rejections are JSON [`ApiError`]s (400), never plain text.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) => Err(HttpError(ApiError::new(
                ErrorCode::BadRequest,
                format!("invalid request body: {}", rej.body_text()),
            ))),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

type ApiResult<T> = Result<T, HttpError>;

/// The API router. Every route but `/openapi.json` and `/metrics` requires
/// `Authorization: Bearer TOKEN`.
pub fn router(agent: Agent, token: ApiToken) -> Router {
    build(agent, token, None)
}

/// `hearthd dev`'s router: the node-local API, whose sandbox creates and
/// removals also go through the embedded control plane's store.
pub fn dev_router(agent: Agent, cp: cluster::ControlPlane, token: ApiToken) -> Router {
    build(agent, token, Some(cp))
}

/// The embedded control plane of `hearthd dev`, if this router has one.
#[derive(Clone)]
struct DevStore(Option<cluster::ControlPlane>);

fn build(agent: Agent, token: ApiToken, dev: Option<cluster::ControlPlane>) -> Router {
    let open = Router::new()
        .route("/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics))
        .with_state(agent.clone());
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/v1/sandboxes/{id}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/v1/sandboxes/{id}/stop", post(stop_sandbox))
        .route("/v1/sandboxes/{id}/kill", post(kill_sandbox))
        .route("/v1/sandboxes/{id}/wait", post(wait_sandbox))
        .route("/v1/sandboxes/{id}/output", get(output))
        .route("/v1/sandboxes/{id}/stdin", post(main_stdin))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/execs/{exec_id}/stdin", post(exec_stdin))
        .route("/v1/sandboxes/{id}/migrate", post(migration::migrate))
        .route("/v1/sandboxes/{id}/migration", get(migration::status))
        .route(
            "/v1/sandboxes/{id}/migration/cancel",
            post(migration::cancel),
        )
        .route("/v1/migrations/incoming", post(migration::prepare))
        .route(
            "/v1/migrations/incoming/{id}",
            axum::routing::delete(migration::abort),
        )
        .route(
            "/v1/migrations/incoming/{id}/log",
            // why: streamed to the file (no body limit applies to it); the
            // node's log cap bounds it, checked as the bytes arrive.
            axum::routing::put(migration::log),
        )
        .route(
            "/v1/migrations/incoming/{id}/commit",
            post(migration::commit),
        )
        .route("/v1/images", get(list_images))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/pull", post(pull::pull_image))
        .route("/v1/images/prune", post(pull::prune_images))
        .route("/v1/registries/login", post(pull::registry_login))
        .route(
            "/v1/images/{reference}",
            axum::routing::delete(delete_image),
        )
        .merge(policy::routes())
        .merge(warm::routes())
        .fallback(not_found)
        .layer(axum::Extension(DevStore(dev)))
        .layer(axum::middleware::from_fn_with_state(
            NodeAuth {
                token,
                node: agent.info().node,
            },
            require_token_or_migration_peer,
        ))
        .with_state(agent)
        .merge(open)
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
}

/// The API's bearer token.
#[derive(Clone)]
pub struct ApiToken(std::sync::Arc<String>);

/// Routes a migration source calls on its target.
fn migration_peer_route(path: &str) -> bool {
    path == "/v1/info"
        || path == "/v1/migrations/incoming"
        || path.starts_with("/v1/migrations/incoming/")
}

impl ApiToken {
    /// Wraps a token; it must be at least 16 characters.
    pub fn new(token: String) -> Result<ApiToken, String> {
        if token.len() < 16 {
            return Err("the API token must be at least 16 characters".into());
        }
        Ok(ApiToken(std::sync::Arc::new(token)))
    }

    /// The token itself, for a client that must present it (a control-plane
    /// member calling an agent, an agent registering).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Compares in constant time (the length is not secret).
    fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        want.len() == presented.len()
            && want
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// What a node's API checks a caller against: its token, and its node id
/// (the target a scoped migration credential must name).
#[derive(Clone)]
struct NodeAuth {
    token: ApiToken,
    node: String,
}

/// How a request on a node's API was let in: with the node's token, or with
/// a scoped migration credential (whose scope the prepare route checks its
/// offer against). The auth layer inserts one into every request it passes.
#[derive(Clone)]
pub(crate) enum Auth {
    Admin,
    Migration(credential::MigrationScope),
}

/// The sandbox id in `/v1/migrations/incoming/{id}[/...]`.
fn incoming_path_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/migrations/incoming/")?;
    rest.split('/').next().filter(|s| !s.is_empty())
}

fn credential_refused(node: &str, e: &credential::CredentialError) -> Response {
    let code = if e.is_forbidden() {
        ErrorCode::Forbidden
    } else {
        ErrorCode::Unauthorized
    };
    // why: a caller whose credential did not verify learns nothing of this
    // node (review m5).
    let msg = match e {
        credential::CredentialError::BadSignature | credential::CredentialError::Malformed => {
            format!("migration credential refused: {e}")
        }
        _ => format!("node {node} refuses the migration credential: {e}"),
    };
    HttpError(ApiError::new(code, msg)).into_response()
}

/// A node's API: the token, or on the migration target routes a scoped
/// migration credential ([`credential`]) issued for this node (and, on the
/// routes that name one, for that sandbox).
async fn require_token_or_migration_peer(
    State(auth): State<NodeAuth>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .and_then(|t| std::str::from_utf8(t).ok())
        .map(str::to_string);
    let path = req.uri().path().to_string();
    if let Some(t) = presented.filter(|_| migration_peer_route(&path)) {
        if !auth.token.matches(t.as_bytes()) {
            // why: an abort only removes a VM that was never committed (or
            // says it was), so the source can recover after expiry (m2).
            let abort = req.method() == axum::http::Method::DELETE
                && incoming_path_id(&path)
                    .is_some_and(|id| path == format!("/v1/migrations/incoming/{id}"));
            let verified = if abort {
                credential::verify_ignoring_expiry(auth.token.secret(), &t, &auth.node)
            } else {
                credential::verify(auth.token.secret(), &t, &auth.node, credential::unix_now())
            };
            match verified {
                Err(credential::CredentialError::NotACredential) => {}
                Err(e) => return credential_refused(&auth.node, &e),
                Ok(scope) => {
                    // why: every peer route but the offer names a sandbox;
                    // one whose id cannot be read is refused, not let in.
                    if path != "/v1/migrations/incoming" && path != "/v1/info" {
                        let Some(id) = incoming_path_id(&path) else {
                            return credential_refused(
                                &auth.node,
                                &credential::CredentialError::WrongSandbox {
                                    allowed: scope.sandbox,
                                    asked: "(none)".into(),
                                },
                            );
                        };
                        if let Err(e) = scope.check_sandbox(id) {
                            return credential_refused(&auth.node, &e);
                        }
                    }
                    req.extensions_mut().insert(Auth::Migration(scope));
                    return next.run(req).await;
                }
            }
        }
    }
    require_token(State(auth.token), req, next).await
}

async fn require_token(
    State(token): State<ApiToken>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|t| token.matches(t));
    if !ok {
        return HttpError(ApiError::new(
            ErrorCode::Unauthorized,
            "missing or wrong API token: send `Authorization: Bearer TOKEN`; hearthd keeps it in DATA_DIR/api-token (the CLI reads it from there, or from HEARTH_TOKEN)",
        ))
        .into_response();
    }
    req.extensions_mut().insert(Auth::Admin);
    next.run(req).await
}

async fn not_found(uri: axum::http::Uri) -> HttpError {
    HttpError(ApiError::new(
        ErrorCode::NotFound,
        format!("no API route {uri}; see /openapi.json"),
    ))
}

async fn info(State(agent): State<Agent>) -> Json<hearth_api::Info> {
    Json(agent.info())
}

async fn metrics(State(agent): State<Agent>) -> impl IntoResponse {
    let mut out = String::from(
        "# HELP hearth_sandboxes Sandboxes known to this node by status.\n# TYPE hearth_sandboxes gauge\n",
    );
    for (status, n) in agent.status_counts() {
        let s = serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!("hearth_sandboxes{{status=\"{s}\"}} {n}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

async fn list_sandboxes(State(agent): State<Agent>) -> Json<Vec<hearth_api::Sandbox>> {
    let ingress = agent.info().ingress;
    Json(
        agent
            .list()
            .into_iter()
            .map(|sb| with_ingress(sb, ingress.as_ref()))
            .collect(),
    )
}

/// `sb` with `network.ingress` filled in: where its ports are reached through
/// `ingress`, the ingress the answering server runs (none: left out).
pub(crate) fn with_ingress(
    mut sb: hearth_api::Sandbox,
    ingress: Option<&hearth_api::network::IngressInfo>,
) -> hearth_api::Sandbox {
    if let (Some(net), Some(info)) = (sb.network.as_mut(), ingress) {
        net.ingress = Some(hearth_api::network::SandboxIngress::new(&sb.id, info));
    }
    sb
}

async fn create_sandbox(
    State(agent): State<Agent>,
    axum::Extension(DevStore(dev)): axum::Extension<DevStore>,
    Json(req): Json<CreateSandbox>,
) -> ApiResult<(StatusCode, Json<hearth_api::Sandbox>)> {
    let sb = match dev {
        Some(cp) => cp.dev_create(&agent, req).await?,
        None => agent.create(req).await?,
    };
    let sb = with_ingress(sb, agent.info().ingress.as_ref());
    Ok((StatusCode::CREATED, Json(sb)))
}

async fn get_sandbox(
    State(agent): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<Json<hearth_api::Sandbox>> {
    let ingress = agent.info().ingress;
    Ok(Json(with_ingress(agent.get(&id)?, ingress.as_ref())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    #[serde(default)]
    force: bool,
}

async fn delete_sandbox(
    State(agent): State<Agent>,
    axum::Extension(DevStore(dev)): axum::Extension<DevStore>,
    Path(id): Path<String>,
    Query(p): Query<DeleteParams>,
) -> ApiResult<StatusCode> {
    match dev {
        Some(cp) => cp.dev_remove(&agent, &id, p.force).await?,
        None => agent.remove(&id, p.force).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StopParams {
    /// Seconds between SIGTERM and power-off (default 10; 0 = at once).
    timeout: Option<u64>,
}

async fn stop_sandbox(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Query(p): Query<StopParams>,
) -> ApiResult<Json<hearth_api::Sandbox>> {
    let grace = Duration::from_secs(p.timeout.unwrap_or(10).min(3600));
    Ok(Json(agent.stop(&id, grace).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillParams {
    /// Signal number (default 9).
    signal: Option<i32>,
}

async fn kill_sandbox(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Query(p): Query<KillParams>,
) -> ApiResult<StatusCode> {
    agent.signal(&id, p.signal.unwrap_or(libc::SIGKILL)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn wait_sandbox(
    State(agent): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<Json<hearth_api::Sandbox>> {
    Ok(Json(agent.wait(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputParams {
    #[serde(default)]
    follow: bool,
}

fn stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// The final record of a sandbox's stream: how it ended.
fn final_record(sb: &hearth_api::Sandbox) -> Option<Record> {
    use hearth_api::SandboxStatus::*;
    match (sb.status, sb.exit) {
        (_, Some(exit)) => Some(Record::Exit(exit)),
        (Failed | Lost, None) => Some(Record::Error(
            sb.error
                .clone()
                .unwrap_or_else(|| format!("sandbox {} failed", sb.id)),
        )),
        (Stopped, None) => Some(Record::Exit(ExitInfo {
            code: 128 + libc::SIGKILL,
            signal: Some(libc::SIGKILL),
        })),
        _ => None,
    }
}

async fn output(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Query(p): Query<OutputParams>,
) -> ApiResult<Response> {
    let (sb, follower) = agent.follow_output(&id)?;
    let follow = p.follow;
    let id = sb.id.clone();
    let stream = futures::stream::unfold(
        (Some(follower), agent, id),
        move |(follower, agent, id)| async move {
            let mut f = follower?;
            match f.next_chunk(follow).await {
                Ok(Some(chunk)) => Some((
                    Ok::<_, std::io::Error>(Bytes::from(chunk)),
                    (Some(f), agent, id),
                )),
                Ok(None) => {
                    let sb = agent.get(&id).ok()?;
                    let last = final_record(&sb)?;
                    Some((Ok(Bytes::from(last.encode())), (None, agent, id)))
                }
                Err(e) => Some((Err(e), (None, agent, id))),
            }
        },
    );
    Ok(stream_response(Body::from_stream(stream)))
}

/// Copies a streaming request body into a session's stdin; closes it at the end.
async fn pump_stdin(input: SessionInput, body: Body) -> ApiResult<StatusCode> {
    let mut s = body.into_data_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| {
            HttpError(ApiError::new(
                ErrorCode::BadRequest,
                format!("reading stdin body: {e}"),
            ))
        })?;
        if input.write(&chunk).await.is_err() {
            // The process ended or closed stdin; what it did not read is dropped, like a pipe.
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    let _ = input.close().await;
    Ok(StatusCode::NO_CONTENT)
}

async fn main_stdin(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    let input = agent.main_stdin(&id).await?;
    pump_stdin(input, body).await
}

async fn exec_stdin(
    State(agent): State<Agent>,
    Path((id, exec_id)): Path<(String, u32)>,
    body: Body,
) -> ApiResult<StatusCode> {
    let input = agent.exec_stdin(&id, exec_id)?;
    pump_stdin(input, body).await
}

async fn exec(
    State(agent): State<Agent>,
    Path(id): Path<String>,
    Json(req): Json<ExecRequest>,
) -> ApiResult<Response> {
    let (exec_id, session) = agent.exec(&id, req).await?;
    let stream = futures::stream::unfold(
        (Some(session), agent, id, exec_id),
        |(session, agent, id, exec_id)| async move {
            let mut s = session?;
            let rec = loop {
                match s.next().await {
                    Some(SessionEvent::Started(_)) => continue,
                    Some(SessionEvent::Stdout(b)) => break Some(Record::Stdout(b)),
                    Some(SessionEvent::Stderr(b)) => break Some(Record::Stderr(b)),
                    Some(SessionEvent::Exit(st)) => {
                        break Some(Record::Exit(ExitInfo {
                            code: st.shell_code(),
                            signal: st.signal,
                        }))
                    }
                    Some(SessionEvent::Failed(m)) => break Some(Record::Error(m)),
                    None => break None,
                }
            };
            match rec {
                Some(r @ (Record::Exit(_) | Record::Error(_))) => {
                    agent.exec_done(&id, exec_id);
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(r.encode())),
                        (None, agent, id, exec_id),
                    ))
                }
                Some(r) => Some((Ok(Bytes::from(r.encode())), (Some(s), agent, id, exec_id))),
                None => {
                    agent.exec_done(&id, exec_id);
                    None
                }
            }
        },
    );
    let mut resp = stream_response(Body::from_stream(stream));
    resp.headers_mut().insert(
        "x-hearth-exec-id",
        HeaderValue::from_str(&exec_id.to_string()).unwrap_or(HeaderValue::from_static("0")),
    );
    Ok(resp)
}

async fn list_images(State(agent): State<Agent>) -> ApiResult<Json<Vec<hearth_api::Image>>> {
    Ok(Json(agent.list_images().await?))
}

async fn import_image(
    State(agent): State<Agent>,
    Json(req): Json<ImportImage>,
) -> ApiResult<(StatusCode, Json<hearth_api::Image>)> {
    let img = agent
        .import_image(&req.name, std::path::Path::new(&req.path))
        .await?;
    Ok((StatusCode::CREATED, Json(img)))
}

async fn delete_image(
    State(agent): State<Agent>,
    Path(reference): Path<String>,
) -> ApiResult<StatusCode> {
    agent.remove_image(&reference).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query-string rejections are JSON too.
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let ct_is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let status = resp.status();
    if (status.is_client_error() || status.is_server_error()) && !ct_is_json {
        let (_, body) = resp.into_parts();
        let text = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let code = if status.is_client_error() {
            ErrorCode::BadRequest
        } else {
            ErrorCode::Internal
        };
        let mut r = (status, axum::Json(ApiError::new(code, text))).into_response();
        *r.status_mut() = status;
        return r;
    }
    resp
}

#[cfg(test)]
mod auth_tests {
    use super::*;
    use credential::{issue, MigrationScope, PURPOSE};

    const TOKEN: &str = "cluster-token-0123456789";

    /// The node API's auth layer over stub routes, served on loopback.
    async fn serve(node: &str) -> String {
        let ok = || async { "ok" };
        // The prepare route's own check, behind the real auth layer.
        let offer = |axum::Extension(auth): axum::Extension<Auth>,
                     Json(o): Json<hearth_api::migration::IncomingOffer>| async move {
            migration::authorize_offer(&auth, &o, "agent2").map(|()| "ok")
        };
        let app = Router::new()
            .route("/v1/info", get(ok))
            .route("/v1/sandboxes", get(ok))
            .route("/v1/migrations/incoming", post(offer))
            .route("/v1/migrations/incoming/{id}", axum::routing::delete(ok))
            .route("/v1/migrations/incoming/{id}/commit", post(ok))
            .layer(axum::middleware::from_fn_with_state(
                NodeAuth {
                    token: ApiToken::new(TOKEN.into()).unwrap(),
                    node: node.into(),
                },
                require_token_or_migration_peer,
            ))
            .layer(axum::middleware::from_fn(json_errors));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}")
    }

    fn cred(sandbox: &str, to: &str, expires: u64) -> String {
        issue(
            TOKEN,
            &MigrationScope {
                sandbox: sandbox.into(),
                owner: "c/sb1@2".into(),
                from: "agent1".into(),
                to: to.into(),
                attempt: "m-1".into(),
                cpus: 1,
                memory_mib: 128,
                ip: None,
                expires,
                purpose: PURPOSE.into(),
            },
        )
    }

    async fn call(base: &str, method: &str, path: &str, bearer: &str) -> (u16, String) {
        let c = reqwest::Client::new();
        let r = match method {
            "GET" => c.get(format!("{base}{path}")),
            "DELETE" => c.delete(format!("{base}{path}")),
            _ => c.post(format!("{base}{path}")),
        }
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn a_target_accepts_only_a_migration_credential_for_itself_and_that_sandbox() {
        let base = serve("agent2").await;
        let later = credential::unix_now() + 600;
        let good = cred("sb1", "agent2", later);
        assert_eq!(call(&base, "GET", "/v1/info", &good).await.0, 200);
        let commit = "/v1/migrations/incoming/sb1/commit";
        assert_eq!(call(&base, "POST", commit, &good).await.0, 200);
        // The cluster token itself still passes everywhere.
        assert_eq!(call(&base, "GET", "/v1/sandboxes", TOKEN).await.0, 200);

        // Never beyond the migration routes.
        let (s, body) = call(&base, "GET", "/v1/sandboxes", &good).await;
        assert_eq!(s, 401, "{body}");

        // Another sandbox: 403 naming both.
        let (s, body) = call(&base, "POST", "/v1/migrations/incoming/sb2/commit", &good).await;
        assert_eq!(s, 403, "{body}");
        assert!(
            body.contains("for sandbox sb1, not for sandbox sb2"),
            "{body}"
        );

        // Another target: 403 naming both nodes.
        let other = cred("sb1", "agent3", later);
        let (s, body) = call(&base, "POST", commit, &other).await;
        assert_eq!(s, 403, "{body}");
        assert!(
            body.contains("target node agent3, this is node agent2"),
            "{body}"
        );

        // Expired: 401 saying so.
        let old = cred("sb1", "agent2", credential::unix_now() - 1);
        let (s, body) = call(&base, "GET", "/v1/info", &old).await;
        assert_eq!(s, 401, "{body}");
        assert!(body.contains("expired"), "{body}");

        // Tampered: the scope of another sandbox with this one's signature.
        let sig = good.rsplit_once('.').unwrap().1;
        let body_of_other = cred("sb2", "agent2", later);
        let fields = body_of_other.split('.').nth(1).unwrap();
        let forged = format!("hmig2.{fields}.{sig}");
        let (s, body) = call(&base, "POST", "/v1/migrations/incoming/sb2/commit", &forged).await;
        assert_eq!(s, 401, "{body}");
        assert!(body.contains("does not verify"), "{body}");

        // The old cluster-wide credential (HMAC of a fixed label) is refused.
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(TOKEN.as_bytes()).unwrap();
        m.update(b"agent-migration");
        let unscoped = hex::encode(m.finalize().into_bytes());
        assert_eq!(call(&base, "POST", commit, &unscoped).await.0, 401);
    }

    fn offer_json(id: &str, cpus: u32, memory_mib: u32) -> serde_json::Value {
        serde_json::json!({
            "sandbox": {
                "id": id, "name": null, "image": "busybox", "image_digest": "sha256:x",
                "status": "running", "exit": null, "error": null, "cpus": cpus,
                "memory_mib": memory_mib, "argv": ["sh"], "node": "agent1", "accel": "tcg",
                "created_ms": 1, "started_ms": 1, "finished_ms": null, "boot_ms": null
            },
            "source_node_id": "a", "source_node": "agent1", "hostname": id,
            "stdin_open": false, "owner": "c/sb1@2"
        })
    }

    async fn post_offer(base: &str, bearer: &str, offer: serde_json::Value) -> (u16, String) {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/migrations/incoming"))
            .bearer_auth(bearer)
            .json(&offer)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Review m4, M5: the offer route takes only an offer its credential's
    /// scope allows; the node's token any.
    #[tokio::test]
    async fn the_offer_route_refuses_an_offer_outside_the_credential() {
        let base = serve("agent2").await;
        let good = cred("sb1", "agent2", credential::unix_now() + 600);
        let (s, body) = post_offer(&base, &good, offer_json("sb1", 1, 128)).await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = post_offer(&base, &good, offer_json("sb2", 1, 128)).await;
        assert_eq!(s, 403, "{body}");
        assert!(
            body.contains("for sandbox sb1, not for sandbox sb2"),
            "{body}"
        );
        let (s, body) = post_offer(&base, &good, offer_json("sb1", 1, 4096)).await;
        assert_eq!(s, 403, "{body}");
        assert!(body.contains("memory MiB '128'"), "{body}");
        let (s, body) = post_offer(&base, TOKEN, offer_json("sb2", 1, 4096)).await;
        assert_eq!(s, 200, "{body}");
    }

    /// Review m2, m4: an expired credential still aborts (only), a peer
    /// route without a sandbox id is refused, a forged one learns nothing.
    #[tokio::test]
    async fn an_expired_credential_still_aborts_and_nothing_unscoped_passes() {
        let base = serve("agent2").await;
        let old = cred("sb1", "agent2", credential::unix_now() - 1);
        let (s, body) = call(&base, "DELETE", "/v1/migrations/incoming/sb1", &old).await;
        assert_eq!(s, 200, "{body}");
        let (s, body) = call(&base, "POST", "/v1/migrations/incoming/sb1/commit", &old).await;
        assert_eq!(s, 401, "{body}");
        assert!(body.contains("clocks"), "{body}");
        let (s, _) = call(&base, "DELETE", "/v1/migrations/incoming/sb2", &old).await;
        assert_eq!(s, 403);
        let good = cred("sb1", "agent2", credential::unix_now() + 600);
        let (s, body) = call(&base, "POST", "/v1/migrations/incoming//commit", &good).await;
        assert_eq!(s, 403, "{body}");
        let forged = format!("{}00", &good[..good.len() - 2]);
        let (s, body) = call(&base, "GET", "/v1/info", &forged).await;
        assert_eq!(s, 401, "{body}");
        assert!(!body.contains("agent2") && !body.contains("sb1"), "{body}");
    }
}
