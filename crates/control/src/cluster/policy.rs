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
    let value = serde_json::to_value(&policy)
        .map_err(|e| error(ErrorCode::Internal, format!("encoding the policy: {e}")))?;
    let (rec, previous) = record_policy(&cp, &rec.id, value).await?;
    let applied = apply_on_agent(&cp, &rec, &policy).await;
    if let Err(HttpError(e)) = &applied {
        if e.code == ErrorCode::InvalidArgument {
            // why: back to what the copy enforces, when it says: the policy
            // read before this set may itself be one the node refuses (a
            // retried request recorded it too).
            let back_to = enforced_policy(&cp, &rec).await.unwrap_or(previous);
            let back = revert_policy(&cp, &rec, back_to).await;
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "node {} refused the policy of sandbox {id}: {}; the recorded policy {back}",
                    rec.node, e.message,
                ),
            ));
        }
    }
    applied
}

/// Records `policy` in sandbox `id`'s record over the version read just
/// before (a set racing in between makes it read and try again), so the
/// policy it replaced is known exactly. Returns the new record and that
/// policy.
pub(crate) async fn record_policy(
    cp: &ControlPlane,
    id: &str,
    policy: serde_json::Value,
) -> Result<(SandboxRecord, serde_json::Value), HttpError> {
    let mut last = String::new();
    for _ in 0..5 {
        let Some((previous, version)) = cp
            .store
            .read(|st| st.sandboxes.get(id).map(|r| (r.policy(), r.policy_version)))
            .await?
        else {
            return Err(error(ErrorCode::NotFound, format!("no sandbox {id}")));
        };
        match cp
            .store
            .write(Command::SetPolicy {
                id: id.to_string(),
                policy: policy.clone(),
                expect_version: Some(version),
            })
            .await?
        {
            Reply::Sandbox { sandbox } => return Ok((sandbox, previous)),
            Reply::Superseded { message } => last = message,
            Reply::NotFound { what } => {
                return Err(error(ErrorCode::NotFound, format!("no {what}")));
            }
            Reply::Conflict { message } => return Err(error(ErrorCode::Conflict, message)),
            Reply::Invalid { message } => return Err(error(ErrorCode::InvalidArgument, message)),
            other => {
                return Err(error(
                    ErrorCode::Internal,
                    format!(
                        "recording the policy of sandbox {id}: unexpected store reply {other:?}"
                    ),
                ))
            }
        }
    }
    Err(error(
        ErrorCode::Conflict,
        format!("the policy of sandbox {id} is being set by other requests at the same time ({last}); try again"),
    ))
}

/// The API address of `node` while it is Ready.
fn ready_address(cp: &ControlPlane, node: &str) -> Option<String> {
    cp.store.read_local(|st| {
        st.nodes
            .get(node)
            .filter(|n| n.ready)
            .map(|n| n.address.clone())
    })
}

/// The policy the record's running copy enforces, as its node answers it
/// (None: no running copy, node not ready or no answer).
async fn enforced_policy(cp: &ControlPlane, rec: &SandboxRecord) -> Option<serde_json::Value> {
    let agent_id = rec
        .observed
        .as_ref()
        .filter(|o| !o.is_terminal())?
        .agent_id
        .clone()?;
    let addr = ready_address(cp, &rec.node)?;
    let r = cp
        .http
        .get(format!("{addr}/v1/sandboxes/{agent_id}/policy"))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let p: NetworkPolicy = r.json().await.ok()?;
    serde_json::to_value(&p).ok()
}

/// Sets the record back to `previous` after a node refused the policy `rec`
/// holds (a limit only the compiled form shows, e.g. too many port ranges
/// of one prefix: no start could use it either) — only while the record
/// still holds that version: a newer set made meanwhile stays. Says how it
/// ended, for the error message.
pub(crate) async fn revert_policy(
    cp: &ControlPlane,
    rec: &SandboxRecord,
    previous: serde_json::Value,
) -> String {
    let back = cp
        .store
        .write(Command::SetPolicy {
            id: rec.id.clone(),
            policy: previous,
            expect_version: Some(rec.policy_version),
        })
        .await;
    match back {
        Ok(Reply::Sandbox { .. }) => "is the previous one again".into(),
        Ok(Reply::Superseded { .. }) => {
            "was set again by another request meanwhile and stays as that one set it".into()
        }
        Ok(other) => format!(
            "could not be set back ({other:?}): run `hearth policy set` with a valid policy"
        ),
        Err(e) => {
            format!("could not be set back ({e}): run `hearth policy set` with a valid policy")
        }
    }
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
    let addr = ready_address(cp, &rec.node);
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
    if e.code == ErrorCode::PolicySuperseded {
        // why: a newer set reached the copy first; it is recorded and
        // enforced, so there is nothing to do (running this one again would
        // undo it).
        return Err(error(
            ErrorCode::PolicySuperseded,
            format!(
                "the policy of sandbox {id} was set again by another request meanwhile; that newer policy is recorded and enforced, this one (version {}) is not: see `hearth policy show {id}` ({})",
                rec.policy_version, e.message
            ),
        ));
    }
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
            if serde_json::from_str::<ApiError>(&body)
                .is_ok_and(|e| e.code == ErrorCode::PolicySuperseded)
            {
                tracing::info!(sandbox = %rec.id, node = %rec.node, "the policy recorded while it was being started was already superseded there: {body}");
            } else {
                tracing::warn!(sandbox = %rec.id, node = %rec.node, "applying the policy recorded while it was being started: {status}: {body}");
            }
        }
        Err(e) => {
            tracing::warn!(sandbox = %rec.id, node = %rec.node, "applying the policy recorded while it was being started: {e}");
        }
    }
}
