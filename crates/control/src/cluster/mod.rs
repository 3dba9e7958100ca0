//! The control plane: the public API over the Raft store, the scheduler and
//! the node agents.
//!
//! A create is scheduled here (`hearth_sched::place` over the store's node
//! views), committed through Raft (the state machine re-checks capacity, so a
//! racing placement is rejected and scheduled again), then started on the
//! chosen node by calling that agent's node-local API. Reads come from the
//! store (linearizable); per-sandbox streams are proxied to the owning agent.
//! Agents register and heartbeat through [`nodes`]; the leader's
//! [`watchdog`] marks silent nodes NotReady, which loses or reschedules their
//! sandboxes.

mod dev;
mod leases;
mod migrate;
mod nodes;
mod policy;
mod proxy;
mod sandboxes;
mod unconfirmed;
mod watchdog;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use hearth_api::{ApiError, ErrorCode};
use hearth_store::{Store, StoreError};

use crate::{ApiToken, HttpError};

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// A node that has not heartbeated for this long is NotReady.
    pub node_timeout: Duration,
    /// Disk reserved per sandbox when the request does not say.
    pub default_disk_mib: u64,
    /// How long a node may take to accept a start; a record still not
    /// started after twice this is given up (`failed`) or, with
    /// `restart: always`, started again. Also the grace before a copy a
    /// node stops reporting counts as gone.
    pub start_timeout: Duration,
    /// A live migration with neither a new phase nor advancing progress for
    /// this long is past its deadline (recorded in each migration).
    pub migration_stall: Duration,
    /// The cluster ingress this member serves (`--ingress-listen`), reported
    /// in `/v1/info` and in each sandbox's `network.ingress`.
    pub ingress: Option<hearth_api::network::IngressInfo>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            node_timeout: Duration::from_secs(5),
            default_disk_mib: 512,
            start_timeout: Duration::from_secs(30),
            migration_stall: Duration::from_millis(hearth_store::MIGRATION_STALL_MS),
            ingress: None,
        }
    }
}

/// Shared handle of the control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    store: Store,
    cfg: Arc<ControlConfig>,
    /// For short calls to agents.
    http: reqwest::Client,
    /// For streams proxied to agents (no overall timeout).
    stream_http: reqwest::Client,
    /// Sandboxes this member is starting on an agent right now.
    starting: Arc<Mutex<HashSet<String>>>,
    /// Drains this member runs or ran (by node id), with their progress.
    drains: Arc<Mutex<std::collections::HashMap<String, nodes::Drained>>>,
    /// Migrations (by migration id) this member drives right now.
    migrating: Arc<Mutex<HashSet<String>>>,
    /// The cluster token, the key of the scoped migration credentials
    /// ([`crate::credential`]) a migration source presents to its target.
    credential_key: Arc<String>,
}

/// Default headers that carry the cluster token to agents.
fn auth_headers(token: &ApiToken) -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.secret())) {
        h.insert(reqwest::header::AUTHORIZATION, v);
    }
    h
}

impl ControlPlane {
    /// `token` is the cluster's: agents and members present it to each other.
    pub fn new(store: Store, cfg: ControlConfig, token: &ApiToken) -> ControlPlane {
        ControlPlane {
            store,
            cfg: Arc::new(cfg),
            http: reqwest::Client::builder()
                .default_headers(auth_headers(token))
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap_or_default(),
            stream_http: reqwest::Client::builder()
                .default_headers(auth_headers(token))
                .connect_timeout(Duration::from_secs(3))
                .build()
                .unwrap_or_default(),
            starting: Arc::new(Mutex::new(HashSet::new())),
            migrating: Arc::new(Mutex::new(HashSet::new())),
            drains: Arc::new(Mutex::new(std::collections::HashMap::new())),
            credential_key: Arc::new(token.secret().to_string()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Starts the leader-only background work (NotReady detection,
    /// restarting rescheduled sandboxes).
    pub fn spawn_background(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(watchdog::run(self.clone()))
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::NoLeader(_) => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        };
        HttpError(ApiError::new(code, e.to_string()))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub use leases::all_leases;

/// Routes every member serves, in every role that has a store: nodes, the
/// control-plane group, the agent protocol and Raft's own RPCs. All of them
/// require the cluster's bearer token.
pub fn cluster_routes(cp: ControlPlane, token: ApiToken) -> Router {
    let raft = hearth_store::network::routes(cp.store.clone());
    Router::new()
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/nodes/{id}", get(nodes::get).delete(nodes::remove))
        .route("/v1/nodes/{id}/cordon", post(nodes::cordon))
        .route("/v1/nodes/{id}/uncordon", post(nodes::uncordon))
        .route(
            "/v1/nodes/{id}/drain",
            post(nodes::drain)
                .get(nodes::drain_status)
                .delete(nodes::stop_drain),
        )
        .route("/v1/cluster", get(nodes::cluster_status))
        .route("/v1/cluster/members", post(nodes::add_member))
        .route(
            "/v1/cluster/members/{id}",
            axum::routing::delete(nodes::remove_member),
        )
        .route("/v1/agents/register", post(nodes::register))
        .route("/v1/agents/{node}/heartbeat", post(nodes::heartbeat))
        .route("/v1/agents/{node}/slice", post(leases::join))
        .route("/v1/agents/{node}/leases", post(leases::lease))
        .route("/v1/agents/{node}/leases/retain", post(leases::retain))
        .route(
            "/v1/agents/{node}/leases/{sandbox}",
            axum::routing::delete(leases::release).get(leases::held),
        )
        .route("/v1/leases", get(leases::list))
        .route("/v1/slices", get(leases::slices))
        .with_state(cp)
        .merge(raft)
        .layer(axum::middleware::from_fn_with_state(
            token,
            crate::require_token,
        ))
}

/// The public API of a control-plane member (`hearthd control`): sandboxes
/// are scheduled and recorded through Raft, then run by node agents.
pub fn router(cp: ControlPlane, token: ApiToken) -> Router {
    let sandboxes = Router::new()
        .route(
            "/v1/sandboxes",
            get(sandboxes::list).post(sandboxes::create),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/migrate", post(migrate::migrate))
        .route("/v1/sandboxes/{id}/migration", get(migrate::status))
        .route("/v1/sandboxes/{id}/migration/abort", post(migrate::abort))
        .route(
            "/v1/sandboxes/{id}/policy",
            get(proxy::policy).put(policy::set),
        )
        .route(
            "/v1/sandboxes/{id}/{*rest}",
            axum::routing::any(proxy::sandbox),
        )
        .route("/v1/images", get(proxy::list_images))
        .route("/v1/images/import", post(proxy::import_image))
        .route(
            "/v1/images/{reference}",
            axum::routing::delete(proxy::delete_image),
        )
        .route("/v1/info", get(proxy::info))
        .with_state(cp.clone())
        .layer(axum::middleware::from_fn_with_state(
            token.clone(),
            crate::require_token,
        ));
    cluster_routes(cp, token)
        .merge(sandboxes)
        .fallback(crate::not_found)
        .layer(axum::middleware::from_fn(crate::json_errors))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
}
