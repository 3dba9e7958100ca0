//! `PUT /v1/sandboxes/{id}/policy` through the control plane. The policy is
//! part of the sandbox's record: it is committed first (`Command::SetPolicy`),
//! then applied live on the agent that runs the sandbox, so the record is
//! never older than what a copy enforces, and every later start, restart,
//! reschedule and migration offer uses it. `GET .../policy` and
//! `.../policy/stats` are the agent's (what the running copy enforces and
//! counts) and go through the proxy.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use hearth_api::network::NetworkPolicy;
use hearth_api::{ApiError, ErrorCode};
use hearth_store::{Command, Reply, SandboxRecord};

use super::sandboxes::lookup;
use super::ControlPlane;
use crate::{HttpError, Json};

type ApiResult<T> = Result<T, HttpError>;

fn error(code: ErrorCode, msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(code, msg))
}

pub(super) async fn set(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
    Json(p): Json<NetworkPolicy>,
) -> ApiResult<Response> {
    // why: a policy the agent would refuse must not reach the record (the
    // next start would fail on it).
    let policy = hearth_agent::canonical_policy(&p)?;
    let (rec, _) = lookup(&cp, &id).await?;
    let previous = rec.policy();
    let value = serde_json::to_value(&policy)
        .map_err(|e| error(ErrorCode::Internal, format!("encoding the policy: {e}")))?;
    let rec = match cp
        .store
        .write(Command::SetPolicy {
            id: rec.id.clone(),
            policy: value,
            expect: None,
        })
        .await?
    {
        Reply::Sandbox { sandbox } => sandbox,
        Reply::NotFound { what } => {
            return Err(error(ErrorCode::NotFound, format!("no {what}")));
        }
        Reply::Conflict { message } => return Err(error(ErrorCode::Conflict, message)),
        Reply::Invalid { message } => return Err(error(ErrorCode::InvalidArgument, message)),
        other => {
            return Err(error(
                ErrorCode::Internal,
                format!("recording the policy of sandbox {id}: unexpected store reply {other:?}"),
            ))
        }
    };
    let applied = apply_on_agent(&cp, &rec, &policy).await;
    if let Err(HttpError(e)) = &applied {
        if e.code == ErrorCode::InvalidArgument {
            // why: the node refused the policy itself (a limit only the
            // compiled form shows, e.g. too many port ranges of one prefix):
            // no start could use it either, so the record goes back to the
            // previous policy.
            // why: only while the record still holds the refused policy; a
            // newer one set meanwhile stays (and was applied by its own request).
            let back = cp
                .store
                .write(Command::SetPolicy {
                    id: rec.id.clone(),
                    policy: previous,
                    expect: Some(rec.policy()),
                })
                .await;
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "node {} refused the policy of sandbox {id}: {}; the recorded policy {}",
                    rec.node,
                    e.message,
                    match back {
                        Ok(Reply::Sandbox { .. }) => "is the previous one again",
                        Ok(Reply::Conflict { .. }) =>
                            "was changed by another request meanwhile and stays as that one set it",
                        _ => "could not be set back: run `hearth policy set` with a valid policy",
                    }
                ),
            ));
        }
    }
    applied
}

/// Applies the just-recorded `policy` to the record's running copy.
async fn apply_on_agent(
    cp: &ControlPlane,
    rec: &SandboxRecord,
    policy: &NetworkPolicy,
) -> ApiResult<Response> {
    let id = &rec.id;
    let Some(obs) = rec.observed.as_ref().filter(|o| !o.is_terminal()) else {
        // Not running (ended, lost, failed, or not started yet): there is
        // nothing to change live; its next start reads the record. (A start
        // in flight checks the record again once the copy runs.)
        return Ok(Json(policy.clone()).into_response());
    };
    let Some(agent_id) = obs.agent_id.clone() else {
        return Ok(Json(policy.clone()).into_response());
    };
    let recorded = |what: String| {
        format!(
            "the policy of sandbox {id} is recorded in the control plane (every later start and migration of it uses it), but {what}; run `hearth policy set {id} ...` again"
        )
    };
    let addr = cp.store.read_local(|st| {
        st.nodes
            .get(&rec.node)
            .filter(|n| n.ready)
            .map(|n| n.address.clone())
    });
    let Some(addr) = addr else {
        return Err(error(
            ErrorCode::Unavailable,
            recorded(format!(
                "its node {} is not ready, so its running copy still enforces the previous policy",
                rec.node
            )),
        ));
    };
    // why: the version orders this set against others on the node (a set
    // recorded later but delivered earlier must stay).
    let r = cp
        .http
        .put(format!(
            "{addr}/v1/sandboxes/{agent_id}/policy?version={}",
            rec.policy_version
        ))
        .json(policy)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| {
            error(
                ErrorCode::Unavailable,
                recorded(format!(
                    "node {} at {addr} did not apply it to the running copy: {e}",
                    rec.node
                )),
            )
        })?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if status.is_success() {
        let applied: NetworkPolicy = serde_json::from_str(&body).map_err(|e| {
            error(
                ErrorCode::Internal,
                recorded(format!("node {}'s answer is unreadable ({e})", rec.node)),
            )
        })?;
        return Ok(Json(applied).into_response());
    }
    let e = serde_json::from_str::<ApiError>(&body)
        .unwrap_or_else(|_| ApiError::new(ErrorCode::Internal, format!("{status}: {body}")));
    Err(error(
        e.code,
        recorded(format!(
            "node {} did not apply it to the running copy: {}",
            rec.node, e.message
        )),
    ))
}

/// After a start of `rec` ran copy `agent_id` on `addr`: if the record's
/// policy changed while the start was in flight (a `policy set` committed
/// after `rec` was read), the copy was started with the older one; apply the
/// record's now.
pub(super) async fn catch_up(cp: &ControlPlane, rec: &SandboxRecord, addr: &str, agent_id: &str) {
    let started = rec.policy();
    let now = cp
        .store
        .read(|st| {
            st.sandboxes
                .get(&rec.id)
                .map(|r| (r.policy(), r.policy_version))
        })
        .await;
    let (now, version) = match now {
        Ok(Some((p, v))) if p != started => (p, v),
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(sandbox = %rec.id, "checking its recorded policy after a start: {e}");
            return;
        }
    };
    let res = cp
        .http
        .put(format!(
            "{addr}/v1/sandboxes/{agent_id}/policy?version={version}"
        ))
        .json(&now)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => {
            tracing::info!(sandbox = %rec.id, node = %rec.node, "applied the policy recorded while it was being started");
        }
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            tracing::warn!(sandbox = %rec.id, node = %rec.node, "applying the policy recorded while it was being started: {status}: {body}");
        }
        Err(e) => {
            tracing::warn!(sandbox = %rec.id, node = %rec.node, "applying the policy recorded while it was being started: {e}");
        }
    }
}
