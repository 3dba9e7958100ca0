//! Sandbox addresses: node agents join the cluster network (their slice of
//! the cluster CIDR) and lease every sandbox address through Raft before
//! using it; `GET /v1/leases` shows what is held.

use axum::extract::{Path, State};
use hearth_api::cluster::{JoinNetwork, Lease, LeaseRequest, NodeSlice, Released, RetainLeases};
use hearth_api::{ApiError, ErrorCode};
use hearth_store::{Cidr, Command, Reply, State as St};

use super::ControlPlane;
use crate::{HttpError, Json};

type ApiResult<T> = Result<T, HttpError>;

fn slice_view(s: &hearth_store::NodeSlice) -> NodeSlice {
    NodeSlice {
        node: s.node.clone(),
        cidr: s.cidr.to_string(),
        leased: s.leases.len() as u32,
    }
}

/// A store reply that is not the expected one, as the API's error.
fn refused(r: Reply) -> HttpError {
    let (code, msg) = match r {
        Reply::NotFound { what } => (ErrorCode::NotFound, format!("no {what}")),
        Reply::DuplicateNode { id } => (
            ErrorCode::Conflict,
            format!(
                "node id {id} is already registered by another agent instance; \
                 give this agent another --node"
            ),
        ),
        Reply::Invalid { message } => (ErrorCode::InvalidArgument, message),
        Reply::Conflict { message } => (ErrorCode::Conflict, message),
        Reply::Exhausted { message } => (ErrorCode::Exhausted, message),
        other => (
            ErrorCode::Internal,
            format!("unexpected store reply {other:?}"),
        ),
    };
    HttpError(ApiError::new(code, msg))
}

pub(super) async fn join(
    State(cp): State<ControlPlane>,
    Path(node): Path<String>,
    Json(req): Json<JoinNetwork>,
) -> ApiResult<Json<NodeSlice>> {
    // why: the node id is checked before any message repeats it.
    if let Some(msg) = hearth_store::leases::check_join(&node, &req.instance, None) {
        return Err(HttpError(ApiError::new(ErrorCode::InvalidArgument, msg)));
    }
    let want = req
        .want
        .as_deref()
        .map(str::parse::<Cidr>)
        .transpose()
        .map_err(|e| HttpError(ApiError::new(ErrorCode::InvalidArgument, e.to_string())))?;
    if let Some(msg) = want.and_then(|w| hearth_store::leases::check_want(&node, w)) {
        return Err(HttpError(ApiError::new(ErrorCode::InvalidArgument, msg)));
    }
    match cp
        .store
        .write(Command::AllocateSlice {
            node,
            instance: req.instance,
            want,
        })
        .await?
    {
        Reply::Slice { slice } => Ok(Json(slice_view(&slice))),
        other => Err(refused(other)),
    }
}

pub(super) async fn lease(
    State(cp): State<ControlPlane>,
    Path(node): Path<String>,
    Json(req): Json<LeaseRequest>,
) -> ApiResult<Json<Lease>> {
    let want = match req.want.as_deref() {
        Some(w) => Some(w.parse().map_err(|_| {
            HttpError(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("want: '{w}' is not an IPv4 address"),
            ))
        })?),
        None => None,
    };
    let r = cp
        .store
        .write(Command::Lease {
            node: node.clone(),
            instance: req.instance,
            sandbox: req.sandbox.clone(),
            want,
        })
        .await?;
    match r {
        Reply::Lease { ip, cidr } => Ok(Json(Lease {
            ip: ip.to_string(),
            node,
            cidr: cidr.to_string(),
            agent_sandbox: req.sandbox,
            sandbox: None,
        })),
        other => Err(refused(other)),
    }
}

/// `?instance=`: the agent instance that holds the node's slice.
#[derive(serde::Deserialize)]
pub(super) struct Holder {
    instance: String,
}

pub(super) async fn release(
    State(cp): State<ControlPlane>,
    Path((node, sandbox)): Path<(String, String)>,
    axum::extract::Query(req): axum::extract::Query<Holder>,
) -> ApiResult<Json<Released>> {
    let r = cp
        .store
        .write(Command::Release {
            node,
            instance: req.instance,
            sandbox,
        })
        .await?;
    match r {
        Reply::Released { released } => Ok(Json(Released { released })),
        other => Err(refused(other)),
    }
}

/// The lease `node`'s slice (held by agent `instance`) gives `sandbox`: a
/// migration target checks the address an offer names before it routes it.
pub(super) async fn held(
    State(cp): State<ControlPlane>,
    Path((node, sandbox)): Path<(String, String)>,
    axum::extract::Query(req): axum::extract::Query<Holder>,
) -> ApiResult<Json<Lease>> {
    let (n, sb) = (node.clone(), sandbox.clone());
    let found = cp
        .store
        .read(move |st| {
            st.slices
                .get(&n)
                .filter(|s| s.instance == req.instance)
                .and_then(|s| s.leases.get(&sb).map(|ip| (*ip, s.cidr)))
        })
        .await?;
    match found {
        Some((ip, cidr)) => Ok(Json(Lease {
            ip: ip.to_string(),
            node,
            cidr: cidr.to_string(),
            agent_sandbox: sandbox,
            sandbox: None,
        })),
        None => Err(HttpError(ApiError::new(
            ErrorCode::NotFound,
            format!("node {node}'s address slice (agent instance given) leases nothing to sandbox {sandbox}"),
        ))),
    }
}

pub(super) async fn retain(
    State(cp): State<ControlPlane>,
    Path(node): Path<String>,
    Json(req): Json<RetainLeases>,
) -> ApiResult<Json<Released>> {
    let r = cp
        .store
        .write(Command::RetainLeases {
            node,
            instance: req.instance,
            keep: req.keep.into_iter().collect(),
        })
        .await?;
    match r {
        Reply::Released { released } => Ok(Json(Released { released })),
        other => Err(refused(other)),
    }
}

/// Every lease, with the control plane's sandbox id where it knows one.
pub fn all_leases(st: &St) -> Vec<Lease> {
    let mut out = Vec::new();
    for s in st.slices.values() {
        for (agent_sandbox, ip) in &s.leases {
            let sandbox = st
                .sandboxes
                .values()
                .find(|r| {
                    r.node == s.node
                        && r.observed.as_ref().and_then(|o| o.agent_id.as_deref())
                            == Some(agent_sandbox.as_str())
                })
                .map(|r| r.id.clone());
            out.push(Lease {
                ip: ip.to_string(),
                node: s.node.clone(),
                cidr: s.cidr.to_string(),
                agent_sandbox: agent_sandbox.clone(),
                sandbox,
            });
        }
    }
    out
}

pub(super) async fn list(State(cp): State<ControlPlane>) -> ApiResult<Json<Vec<Lease>>> {
    Ok(Json(cp.store.read(all_leases).await?))
}

pub(super) async fn slices(State(cp): State<ControlPlane>) -> ApiResult<Json<Vec<NodeSlice>>> {
    Ok(Json(
        cp.store
            .read(|st| st.slices.values().map(slice_view).collect())
            .await?,
    ))
}
