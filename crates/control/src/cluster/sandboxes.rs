//! Sandboxes in cluster mode: schedule, commit the placement, start on the
//! node's agent; read back from the store.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use hearth_api::{ApiError, CreateSandbox, ErrorCode, SandboxStatus};
use hearth_sched::{Request, Resources, Strategy};
use hearth_store::{Command, Observed, Reply, RestartPolicy, SandboxRecord};
use serde::Deserialize;

use super::{now_ms, ControlPlane};
use crate::{HttpError, Json};

type ApiResult<T> = Result<T, HttpError>;

/// Placement options of `POST /v1/sandboxes` (query parameters, so the
/// request body stays the same in every role).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateParams {
    /// Record and place the sandbox, but start nothing (load tests, dry runs).
    #[serde(default)]
    record_only: bool,
    /// `never` (default) or `always`: move it to another node if its node is lost.
    #[serde(default)]
    restart: Option<RestartPolicy>,
    /// `bin_pack` (default) or `spread`.
    #[serde(default)]
    strategy: Option<Strategy>,
    /// `key=value[,key=value]`: node labels required.
    #[serde(default)]
    selector: Option<String>,
    /// Run beside the other members of this co-location group.
    #[serde(default)]
    group: Option<String>,
    /// Only on nodes with KVM.
    #[serde(default)]
    require_kvm: bool,
    /// Disk to reserve, MiB.
    #[serde(default)]
    disk_mib: Option<u64>,
    /// Volumes it mounts (comma-separated names).
    #[serde(default)]
    volumes: Option<String>,
}

fn bad(msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(ErrorCode::InvalidArgument, msg))
}

fn internal(msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(ErrorCode::Internal, msg))
}

fn new_id() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        b.copy_from_slice(&now_ms().to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The API's view of a stored sandbox.
pub(super) fn to_api(rec: &SandboxRecord, accel: &str) -> hearth_api::Sandbox {
    let spec: CreateSandbox = serde_json::from_value(rec.spec.clone()).unwrap_or_default();
    let status = rec
        .observed
        .as_ref()
        .and_then(|o| serde_json::from_value(serde_json::Value::String(o.status.clone())).ok())
        .unwrap_or(SandboxStatus::Creating);
    hearth_api::Sandbox {
        id: rec.id.clone(),
        name: rec.name.clone(),
        image: spec.image.clone(),
        image_digest: String::new(),
        status,
        exit: None,
        error: rec.observed.as_ref().and_then(|o| o.error.clone()),
        cpus: rec.request.resources.cpus,
        memory_mib: rec.request.resources.memory_mib as u32,
        argv: spec.cmd.unwrap_or_default(),
        node: rec.node.clone(),
        accel: accel.to_string(),
        created_ms: rec.created_ms,
        started_ms: None,
        finished_ms: None,
        boot_ms: None,
        network: None,
        start_path: None,
        start_note: None,
        started_from: None,
        owner: None,
    }
}

pub(super) async fn create(
    State(cp): State<ControlPlane>,
    Query(p): Query<CreateParams>,
    headers: HeaderMap,
    Json(req): Json<CreateSandbox>,
) -> ApiResult<(StatusCode, Json<hearth_api::Sandbox>)> {
    let cpus = req.cpus.unwrap_or(hearth_api::DEFAULT_CPUS);
    let memory = req.memory_mib.unwrap_or(hearth_api::DEFAULT_MEMORY_MIB);
    if cpus == 0 {
        return Err(bad("cpus must be at least 1"));
    }
    if memory < hearth_api::MIN_MEMORY_MIB {
        return Err(bad(format!(
            "memory_mib must be at least {}",
            hearth_api::MIN_MEMORY_MIB
        )));
    }
    let mut selector = BTreeMap::new();
    for kv in p
        .selector
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("selector entry {kv} is not key=value")))?;
        selector.insert(k.to_string(), v.to_string());
    }
    let request = Request {
        resources: Resources::new(
            cpus,
            memory as u64,
            p.disk_mib.unwrap_or(cp.cfg.default_disk_mib),
        ),
        require_kvm: p.require_kvm,
        selector,
        volumes: p
            .volumes
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        group: p.group.clone(),
        image_digest: None,
    };
    let id = new_id();
    // why: a retried create (client or internal) with the same key must not make a second sandbox.
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("client:{k}"))
        .unwrap_or_else(|| format!("auto:{id}"));
    let strategy = p.strategy.unwrap_or_default();
    let spec = serde_json::to_value(&req).map_err(|e| internal(e.to_string()))?;

    let mut last_reject = String::new();
    for _ in 0..5 {
        let views = cp.store.read(|st| st.node_views()).await?;
        let node = match hearth_sched::place(&views, &request, strategy) {
            Ok(n) => n.id.clone(),
            Err(e) => {
                return Err(HttpError(ApiError::new(
                    ErrorCode::Unschedulable,
                    e.to_string(),
                )))
            }
        };
        let rec = SandboxRecord {
            id: id.clone(),
            name: req.name.clone(),
            spec: spec.clone(),
            request: request.clone(),
            node,
            restart: p.restart.unwrap_or_default(),
            record_only: p.record_only,
            idempotency_key: Some(key.clone()),
            ip: None,
            created_ms: now_ms(),
            reschedules: 0,
            policy_version: 0,
            pinned: false,
            observed: None,
            migration: None,
        };
        match cp
            .store
            .write(Command::CreateSandbox { sandbox: rec })
            .await?
        {
            Reply::Sandbox { sandbox } => {
                let accel = node_accel(&cp, &sandbox.node);
                if sandbox.id != id || sandbox.record_only || sandbox.observed.is_some() {
                    // A retry of an earlier create, or nothing to start.
                    return Ok((StatusCode::CREATED, Json(to_api(&sandbox, &accel))));
                }
                let started = start_on_agent(&cp, &sandbox).await?;
                let started = crate::with_ingress(started, cp.cfg.ingress.as_ref());
                return Ok((StatusCode::CREATED, Json(started)));
            }
            Reply::Rejected { node, reason } => {
                // Another placement got there first: schedule again on fresh state.
                last_reject = format!("{node}: {reason}");
                continue;
            }
            Reply::Conflict { message } => {
                return Err(HttpError(ApiError::new(ErrorCode::Conflict, message)))
            }
            other => return Err(internal(format!("unexpected store reply {other:?}"))),
        }
    }
    Err(HttpError(ApiError::new(
        ErrorCode::Unschedulable,
        format!("placement kept losing races; last rejection {last_reject}"),
    )))
}

fn node_accel(cp: &ControlPlane, node: &str) -> String {
    cp.store.read_local(|st| {
        st.nodes
            .get(node)
            .map(|n| match n.accel {
                hearth_sched::Accel::Kvm => "kvm",
                hearth_sched::Accel::Tcg => "tcg",
            })
            .unwrap_or("")
            .to_string()
    })
}

/// Starts a placed sandbox on its node's agent and records what happened.
pub(super) async fn start_on_agent(
    cp: &ControlPlane,
    rec: &SandboxRecord,
) -> ApiResult<hearth_api::Sandbox> {
    let addr = cp
        .store
        .read_local(|st| st.nodes.get(&rec.node).map(|n| n.address.clone()))
        .ok_or_else(|| internal(format!("node {} vanished", rec.node)))?;
    let mut spec: CreateSandbox =
        serde_json::from_value(rec.spec.clone()).map_err(|e| internal(e.to_string()))?;
    // why: names are the control plane's; the agent's namespace is per node.
    spec.name = None;
    // why: the tag lets the agent's heartbeats match this copy to the record
    // (even before this call returns) and fence it once it is stale.
    spec.owner = Some(cp.store.read_local(|st| st.owner_of(rec)));
    let res = cp
        .http
        .post(format!("{addr}/v1/sandboxes"))
        .json(&spec)
        .timeout(cp.cfg.start_timeout)
        .send()
        .await;
    let outcome: Result<hearth_api::Sandbox, ApiError> = match res {
        Ok(r) if r.status().is_success() => r
            .json()
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string())),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            Err(serde_json::from_str::<ApiError>(&body).unwrap_or_else(|_| {
                ApiError::new(ErrorCode::Internal, format!("{status}: {body}"))
            }))
        }
        Err(e) if e.is_timeout() => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "node {} at {addr} did not answer within {}s",
                rec.node,
                cp.cfg.start_timeout.as_secs()
            ),
        )),
        Err(e) => Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("node {} at {addr} unreachable: {e}", rec.node),
        )),
    };
    // why: the policy starts it again (the leader's watchdog, after a
    // backoff); the caller and the record say so.
    let outcome = outcome.map_err(|mut e| {
        if rec.restart == RestartPolicy::Always && !rec.pinned {
            e.message
                .push_str("; it is started again after a backoff (restart: always)");
        }
        e
    });
    let observed = match &outcome {
        Ok(sb) => Observed {
            status: super::nodes::status_name(sb.status),
            agent_id: Some(sb.id.clone()),
            error: sb.error.clone(),
            updated_ms: now_ms(),
        },
        Err(e) => Observed {
            status: "failed".into(),
            agent_id: None,
            error: Some(format!("starting on node {}: {}", rec.node, e.message)),
            updated_ms: now_ms(),
        },
    };
    cp.store
        .write(Command::SetObserved {
            id: rec.id.clone(),
            observed,
            node: Some(rec.node.clone()),
            generation: Some(rec.reschedules),
        })
        .await?;
    match outcome {
        Ok(mut sb) => {
            super::policy::catch_up(cp, rec, &addr, &sb.id).await;
            sb.id = rec.id.clone();
            sb.name = rec.name.clone();
            sb.node = rec.node.clone();
            Ok(sb)
        }
        Err(e) => Err(HttpError(e)),
    }
}

pub(super) async fn list(
    State(cp): State<ControlPlane>,
) -> ApiResult<Json<Vec<hearth_api::Sandbox>>> {
    let mut v: Vec<hearth_api::Sandbox> = cp
        .store
        .read(|st| {
            st.sandboxes
                .values()
                .map(|s| {
                    let accel = st
                        .nodes
                        .get(&s.node)
                        .map(|n| format!("{:?}", n.accel).to_lowercase())
                        .unwrap_or_default();
                    to_api(s, &accel)
                })
                .collect()
        })
        .await?;
    v.sort_by_key(|s| s.created_ms);
    Ok(Json(v))
}

/// The record, and the agent's fuller view when the agent can be asked.
pub(super) async fn get(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<hearth_api::Sandbox>> {
    let (rec, addr) = lookup(&cp, &id).await?;
    let accel = node_accel(&cp, &rec.node);
    let mut out = to_api(&rec, &accel);
    if let (Some(agent_id), Some(addr)) =
        (rec.observed.as_ref().and_then(|o| o.agent_id.clone()), addr)
    {
        let fresh = cp
            .http
            .get(format!("{addr}/v1/sandboxes/{agent_id}"))
            .timeout(std::time::Duration::from_secs(3))
            .send()
            .await;
        if let Ok(r) = fresh {
            if r.status().is_success() {
                if let Ok(mut sb) = r.json::<hearth_api::Sandbox>().await {
                    sb.id = rec.id.clone();
                    sb.name = rec.name.clone();
                    sb.node = rec.node.clone();
                    // The control plane's conclusion (e.g. lost) outranks a stale agent.
                    if out.status == SandboxStatus::Lost {
                        sb.status = SandboxStatus::Lost;
                        sb.error = out.error.clone();
                    }
                    out = sb;
                }
            }
        }
    }
    Ok(Json(crate::with_ingress(out, cp.cfg.ingress.as_ref())))
}

/// Finds a sandbox by id or name; returns it and its ready node's address.
pub(super) async fn lookup(
    cp: &ControlPlane,
    id: &str,
) -> ApiResult<(SandboxRecord, Option<String>)> {
    let found = cp
        .store
        .read(|st| {
            st.sandbox(id).map(|s| {
                let addr = st
                    .nodes
                    .get(&s.node)
                    .filter(|n| n.ready)
                    .map(|n| n.address.clone());
                (s.clone(), addr)
            })
        })
        .await?;
    found.ok_or_else(|| {
        HttpError(ApiError::new(
            ErrorCode::NotFound,
            format!("no sandbox {id}"),
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteParams {
    #[serde(default)]
    force: bool,
}

pub(super) async fn delete(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
    Query(p): Query<DeleteParams>,
) -> ApiResult<StatusCode> {
    let (rec, addr) = lookup(&cp, &id).await?;
    let agent_id = rec.observed.as_ref().and_then(|o| o.agent_id.clone());
    if let (Some(agent_id), Some(addr)) = (agent_id, addr) {
        let r = cp
            .http
            .delete(format!("{addr}/v1/sandboxes/{agent_id}?force={}", p.force))
            .send()
            .await
            .map_err(|e| {
                HttpError(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("node {} unreachable: {e}", rec.node),
                ))
            })?;
        if !r.status().is_success() && r.status() != StatusCode::NOT_FOUND {
            let body = r.text().await.unwrap_or_default();
            return Err(HttpError(
                serde_json::from_str::<ApiError>(&body)
                    .unwrap_or_else(|_| ApiError::new(ErrorCode::Internal, body)),
            ));
        }
    }
    cp.store
        .write(Command::DeleteSandbox { id: rec.id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
