//! Node registry (agents register and heartbeat), node operations (cordon,
//! drain) and the control-plane group's status and membership.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_api::cluster::{
    AddMember, Capacity, ClusterStatus, Desired, Fenced, Heartbeat, Member, Node, RegisterNode,
};
use hearth_api::{ApiError, ErrorCode, SandboxStatus};
use hearth_sched::{Accel, Resources};
use hearth_store::{Command, CopyReport, NodeRecord, Reply, State as St};

use super::{now_ms, ControlPlane};
use crate::{HttpError, Json};

type ApiResult<T> = Result<T, HttpError>;

fn cap(r: Resources) -> Capacity {
    Capacity {
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        disk_mib: r.disk_mib,
    }
}

pub(super) fn status_name(s: SandboxStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(super) fn node_view(st: &St, n: &NodeRecord) -> Node {
    let alloc = st.allocated();
    Node {
        id: n.id.clone(),
        address: n.address.clone(),
        status: if n.ready { "ready" } else { "not_ready" }.into(),
        cordoned: n.cordoned,
        accel: match n.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
        .into(),
        capacity: cap(n.capacity),
        allocated: cap(alloc.get(n.id.as_str()).copied().unwrap_or_default()),
        labels: n.labels.clone(),
        sandboxes: st
            .sandboxes
            .values()
            .filter(|s| s.node == n.id && s.reserves())
            .count() as u32,
        last_heartbeat_ms: n.last_heartbeat_ms,
    }
}

fn not_found(what: &str) -> HttpError {
    HttpError(ApiError::new(ErrorCode::NotFound, format!("no {what}")))
}

/// Turns a store reply about a node into the API's answer.
fn node_reply(cp: &ControlPlane, r: Reply) -> ApiResult<Json<Node>> {
    match r {
        Reply::Node { node } => Ok(Json(cp.store.read_local(|st| node_view(st, &node)))),
        Reply::NotFound { what } => Err(not_found(&what)),
        Reply::DuplicateNode { id } => Err(HttpError(ApiError::new(
            ErrorCode::NodeIdentityConflict,
            format!(
                "node id {id} is already registered by another agent instance; \
                 give this agent another --node"
            ),
        ))),
        other => Err(HttpError(ApiError::new(
            ErrorCode::Internal,
            format!("unexpected store reply {other:?}"),
        ))),
    }
}

pub(super) async fn list(State(cp): State<ControlPlane>) -> ApiResult<Json<Vec<Node>>> {
    Ok(Json(
        cp.store
            .read(|st| st.nodes.values().map(|n| node_view(st, n)).collect())
            .await?,
    ))
}

pub(super) async fn get(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    cp.store
        .read(|st| st.nodes.get(&id).map(|n| node_view(st, n)))
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&format!("node {id}")))
}

pub(super) async fn remove(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    match cp
        .store
        .write(Command::RemoveNode {
            id: id.clone(),
            at_ms: now_ms(),
        })
        .await?
    {
        Reply::NotFound { what } => Err(not_found(&what)),
        // why: a removed node's slice whose agent still holds leases stays taken.
        Reply::Conflict { message } => Err(HttpError(ApiError::new(ErrorCode::Conflict, message))),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

pub(super) async fn cordon(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    let r = cp
        .store
        .write(Command::SetCordon {
            node: id,
            cordoned: true,
        })
        .await?;
    node_reply(&cp, r)
}

pub(super) async fn uncordon(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    let r = cp
        .store
        .write(Command::SetCordon {
            node: id,
            cordoned: false,
        })
        .await?;
    node_reply(&cp, r)
}

/// What happened to one sandbox of a drained node.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DrainOutcome {
    pub sandbox: String,
    #[serde(default)]
    pub name: Option<String>,
    /// `migrated` (live, to `node`), `restarted` (`restart: always`, started
    /// again on `node` after its migration failed) or `failed` (left running
    /// on the drained node; `error` says why).
    pub outcome: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Drain result: sandboxes moved elsewhere and those left on the node.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Drained {
    pub node: Node,
    /// Sandboxes that left the node (live-migrated or restarted elsewhere).
    pub moved: Vec<String>,
    /// Live sandboxes still on the node (their migration failed and they did
    /// not ask for `restart: always`, or had nowhere to go); stop them, or they
    /// end with the node.
    pub remaining: Vec<String>,
    /// One entry per sandbox the drain tried to move.
    #[serde(default)]
    pub sandboxes: Vec<DrainOutcome>,
}

/// Cordons the node, live-migrates each live sandbox off it (`auto`
/// targets, one at a time), then moves the `restart: always` ones whose
/// migration failed by starting them again elsewhere (the `Drain` command).
/// Sandboxes that could not migrate otherwise stay running where they are.
pub(super) async fn drain(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<Drained>> {
    match cp
        .store
        .write(Command::SetCordon {
            node: id.clone(),
            cordoned: true,
        })
        .await?
    {
        Reply::Node { .. } => {}
        Reply::NotFound { what } => return Err(not_found(&what)),
        other => {
            return Err(HttpError(ApiError::new(
                ErrorCode::Internal,
                format!("unexpected store reply {other:?}"),
            )))
        }
    }
    let live: Vec<(String, Option<String>)> = cp
        .store
        .read(|st| {
            st.sandboxes
                .values()
                .filter(|s| {
                    // why: every live one is tried, so one that is not running
                    // (yet) is reported with the reason instead of skipped.
                    s.node == id && !s.pinned && !s.record_only && s.reserves()
                })
                .map(|s| (s.id.clone(), s.name.clone()))
                .collect()
        })
        .await?;
    let mut outcomes = Vec::new();
    for (sb, name) in live {
        let req = hearth_api::migration::MigrateSandbox {
            target: "auto".into(),
            ..Default::default()
        };
        let o = match super::migrate::run(&cp, &sb, &req).await {
            Ok(st) => DrainOutcome {
                sandbox: sb,
                name,
                outcome: "migrated".into(),
                node: Some(st.target),
                error: None,
            },
            Err(e) => DrainOutcome {
                sandbox: sb,
                name,
                outcome: "failed".into(),
                node: None,
                error: Some(e.0.message),
            },
        };
        outcomes.push(o);
    }
    let r = cp
        .store
        .write(Command::Drain {
            node: id.clone(),
            at_ms: now_ms(),
        })
        .await?;
    let restarted = match r {
        Reply::Moved { moved, .. } => moved,
        Reply::NotFound { what } => return Err(not_found(&what)),
        other => {
            return Err(HttpError(ApiError::new(
                ErrorCode::Internal,
                format!("unexpected store reply {other:?}"),
            )))
        }
    };
    let (node, remaining, placed) = cp.store.read_local(|st| {
        let n = st.nodes.get(&id).map(|n| node_view(st, n));
        let rem = st
            .sandboxes
            .values()
            .filter(|s| s.node == id && s.reserves())
            .map(|s| s.id.clone())
            .collect::<Vec<_>>();
        let placed: std::collections::BTreeMap<String, String> = restarted
            .iter()
            .filter_map(|r| st.sandboxes.get(r).map(|s| (r.clone(), s.node.clone())))
            .collect();
        (n, rem, placed)
    });
    let node = node.ok_or_else(|| not_found(&format!("node {id}")))?;
    for r in &restarted {
        match outcomes.iter_mut().find(|o| &o.sandbox == r) {
            Some(o) => {
                o.outcome = "restarted".into();
                o.node = placed.get(r).cloned();
            }
            None => outcomes.push(DrainOutcome {
                sandbox: r.clone(),
                name: None,
                outcome: "restarted".into(),
                node: placed.get(r).cloned(),
                error: None,
            }),
        }
    }
    let moved = outcomes
        .iter()
        .filter(|o| o.outcome != "failed")
        .map(|o| o.sandbox.clone())
        .collect();
    Ok(Json(Drained {
        node,
        moved,
        remaining,
        sandboxes: outcomes,
    }))
}

pub(super) async fn register(
    State(cp): State<ControlPlane>,
    Json(req): Json<RegisterNode>,
) -> ApiResult<Json<Node>> {
    let accel = match req.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => {
            return Err(HttpError(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("accel must be kvm or tcg, not {other}"),
            )))
        }
    };
    if req.id.is_empty() || req.instance.is_empty() {
        return Err(HttpError(ApiError::new(
            ErrorCode::InvalidArgument,
            "node id and instance must not be empty",
        )));
    }
    let now = now_ms();
    let r = cp
        .store
        .write(Command::RegisterNode {
            node: NodeRecord {
                id: req.id,
                instance: req.instance,
                address: req.address,
                capacity: Resources::new(
                    req.capacity.cpus,
                    req.capacity.memory_mib,
                    req.capacity.disk_mib,
                ),
                accel,
                labels: req.labels,
                cordoned: false,
                ready: true,
                registered_ms: now,
                last_heartbeat_ms: now,
                warm_templates: Default::default(),
                volumes: Default::default(),
            },
        })
        .await?;
    node_reply(&cp, r)
}

pub(super) async fn heartbeat(
    State(cp): State<ControlPlane>,
    Path(node): Path<String>,
    Json(hb): Json<Heartbeat>,
) -> ApiResult<Json<Desired>> {
    let now = now_ms();
    let grace = cp.cfg.start_timeout.as_millis() as u64;
    let report = hb
        .sandboxes
        .iter()
        .map(|r| CopyReport {
            agent_id: r.agent_id.clone(),
            status: status_name(r.status),
            error: r.error.clone(),
            owner: r.owner.clone(),
            paused: r.paused,
        })
        .collect();
    // why: the plan is computed by the state machine at the heartbeat's log
    // position, never from this member's possibly lagging local state.
    let r = cp
        .store
        .write(Command::Heartbeat {
            node: node.clone(),
            instance: hb.instance,
            at_ms: now,
            observed: Default::default(),
            report: Some(report),
            grace_ms: grace,
        })
        .await?;
    let (keep, stop, remove, not_running) = match r {
        Reply::Desired {
            keep,
            stop,
            remove,
            not_running,
        } => (keep, stop, remove, not_running),
        Reply::NotFound { what } => return Err(not_found(&what)),
        other => {
            node_reply(&cp, other)?;
            return Err(HttpError(ApiError::new(
                ErrorCode::Internal,
                format!("heartbeat of node {node}: unexpected store reply"),
            )));
        }
    };
    for id in &not_running {
        tracing::warn!(sandbox = %id, %node, "node no longer runs the sandbox");
    }
    for f in &stop {
        tracing::warn!(%node, agent_id = %f.agent_id, "fencing a stale copy: {}", f.reason);
    }
    Ok(Json(Desired {
        keep,
        stop: stop
            .into_iter()
            .map(|f| Fenced {
                agent_id: f.agent_id,
                reason: f.reason,
            })
            .collect(),
        remove,
    }))
}

pub(super) async fn cluster_status(State(cp): State<ControlPlane>) -> Json<ClusterStatus> {
    let me = cp.store.member_status();
    let all = cp.store.cluster_status().await;
    let members = all
        .into_iter()
        .map(|(id, st)| match st {
            Ok(s) => Member {
                id,
                address: me.members.get(&id).cloned().unwrap_or_default(),
                healthy: true,
                state: s.state,
                term: Some(s.term),
                last_log_index: s.last_log_index,
                applied_index: s.applied_index,
                snapshot_index: s.snapshot_index,
                error: None,
            },
            Err(e) => Member {
                id,
                address: me.members.get(&id).cloned().unwrap_or_default(),
                healthy: false,
                state: "unreachable".into(),
                term: None,
                last_log_index: None,
                applied_index: None,
                snapshot_index: None,
                error: Some(e),
            },
        })
        .collect();
    Json(ClusterStatus {
        member: me.id,
        leader: me.leader,
        term: me.term,
        commit_index: me.applied_index,
        members,
    })
}

pub(super) async fn add_member(
    State(cp): State<ControlPlane>,
    Json(req): Json<AddMember>,
) -> ApiResult<Json<ClusterStatus>> {
    cp.store.add_member(req.id, req.address).await?;
    Ok(cluster_status(State(cp)).await)
}

pub(super) async fn remove_member(
    State(cp): State<ControlPlane>,
    Path(id): Path<u64>,
) -> ApiResult<Json<ClusterStatus>> {
    cp.store.remove_member(id).await?;
    Ok(cluster_status(State(cp)).await)
}
