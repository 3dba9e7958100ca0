//! Live migration through the control plane: `POST /v1/sandboxes/{id}/migrate`
//! with `target` = a node id or `auto`, and `GET /v1/sandboxes/{id}/migration`.
//!
//! The member that takes the request validates it, records the migration in
//! Raft (`StartMigration`: the state machine re-checks the sandbox runs, the
//! target is ready, uncordoned and has room, and reserves that room), then
//! drives the source agent's own migrate route with the target agent's
//! address, a migration credential scoped to this one move (not the cluster
//! token; see [`crate::credential`]) and
//! the owner tag of the target's copy (the record's next generation). Every
//! phase the source reports is written through Raft. The move completes in
//! one write that also moves the placement (`MigrationPhase completed`, or the
//! target's heartbeat reporting the copy of that generation running,
//! whichever comes first); a failure before the commit ends `aborted` with the
//! sandbox running on the source. The leader's watchdog finishes the record
//! from the source's answer if the driving member went away ([`resolve_orphans`]).

use std::time::Duration;

use axum::extract::{Path, State};
use hearth_api::migration::{MigrateSandbox, MigrationStatus};
use hearth_api::{ApiError, ErrorCode};
use hearth_sched::Strategy;
use hearth_store::{Command, Migration, Reply, SandboxRecord, MIGRATION_ENDED};

use super::sandboxes::lookup;
use super::{now_ms, ControlPlane};
use crate::{HttpError, Json};

type ApiResult<T> = Result<T, HttpError>;

fn err(code: ErrorCode, msg: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(code, msg))
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b.copy_from_slice(&now_ms().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) async fn migrate(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
    Json(req): Json<MigrateSandbox>,
) -> ApiResult<Json<MigrationStatus>> {
    Ok(Json(run(&cp, &id, &req).await?))
}

/// Records and drives one migration; returns when it ended.
pub(super) async fn run(
    cp: &ControlPlane,
    id: &str,
    req: &MigrateSandbox,
) -> ApiResult<MigrationStatus> {
    if req.target.is_empty() || req.target.contains("://") {
        return Err(err(
            ErrorCode::InvalidArgument,
            format!(
                "migration target '{}' is not a node: give a node id (`hearth node ls`) or `auto`",
                req.target
            ),
        ));
    }
    let (rec, _) = lookup(cp, id).await?;
    let to = if req.target == "auto" {
        let views: Vec<_> = cp
            .store
            .read(|st| st.node_views())
            .await?
            .into_iter()
            .filter(|v| v.id != rec.node)
            .collect();
        let mut request = rec.request.clone();
        // why: a moving sandbox leaves its co-location group behind (as a reschedule does).
        request.group = None;
        match hearth_sched::place(&views, &request, Strategy::BinPack) {
            Ok(n) => n.id.clone(),
            Err(e) => {
                return Err(err(
                    ErrorCode::Unschedulable,
                    format!(
                        "no other node can take sandbox {} (it runs on node {}): {e}",
                        rec.id, rec.node
                    ),
                ))
            }
        }
    } else {
        req.target.clone()
    };
    let now = now_ms();
    let mig = Migration {
        id: new_id(),
        from: rec.node.clone(),
        to,
        phase: "preparing".into(),
        generation: 0,
        started_ms: now,
        updated_ms: now,
        error: None,
        progress: None,
    };
    let rec = match cp
        .store
        .write(Command::StartMigration {
            id: rec.id.clone(),
            migration: mig,
        })
        .await?
    {
        Reply::Sandbox { sandbox } => sandbox,
        Reply::Conflict { message } => return Err(err(ErrorCode::Conflict, message)),
        Reply::Invalid { message } => return Err(err(ErrorCode::InvalidArgument, message)),
        Reply::NotFound { what } => {
            return Err(err(
                ErrorCode::NotFound,
                format!("no {what}; see `hearth node ls`"),
            ))
        }
        Reply::Rejected { reason, .. } => return Err(err(ErrorCode::Conflict, reason)),
        other => {
            return Err(err(
                ErrorCode::Internal,
                format!("unexpected store reply {other:?}"),
            ))
        }
    };
    drive(cp, rec, req).await
}

/// Takes the migration id out of the set when the drive ends.
struct Driving(ControlPlane, String);

impl Drop for Driving {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.migrating.lock() {
            s.remove(&self.1);
        }
    }
}

async fn write_phase(
    cp: &ControlPlane,
    rec: &SandboxRecord,
    m: &Migration,
    phase: &str,
    error: Option<String>,
    progress: Option<&MigrationStatus>,
) -> Option<SandboxRecord> {
    let cmd = Command::MigrationPhase {
        id: rec.id.clone(),
        migration: m.id.clone(),
        phase: phase.to_string(),
        error,
        progress: progress.and_then(|p| serde_json::to_value(p).ok()),
        at_ms: now_ms(),
    };
    // why: an end that is not written leaves the record active until its
    // deadline; a write that failed (no leader during an election, a timeout)
    // is tried again for a while instead of being dropped.
    let tries = if MIGRATION_ENDED.contains(&phase) {
        20
    } else {
        1
    };
    for attempt in 1..=tries {
        match cp.store.write(cmd.clone()).await {
            Ok(Reply::Sandbox { sandbox }) => return Some(sandbox),
            Ok(other) => {
                tracing::warn!(sandbox = %rec.id, "recording migration phase {phase}: {other:?}");
                return None;
            }
            Err(e) if attempt < tries => {
                tracing::warn!(sandbox = %rec.id, attempt, "recording migration phase {phase}: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::warn!(sandbox = %rec.id, "recording migration phase {phase}: {e}");
            }
        }
    }
    None
}

/// The source agent's view of the sandbox's current or last migration.
async fn source_status(cp: &ControlPlane, addr: &str, agent_id: &str) -> Option<MigrationStatus> {
    let r = cp
        .http
        .get(format!("{addr}/v1/sandboxes/{agent_id}/migration"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Phases a source reports that the record takes over while it runs.
const RUNNING_PHASES: [&str; 4] = ["precopy", "switchover", "committing", "unresolved"];

async fn drive(
    cp: &ControlPlane,
    rec: SandboxRecord,
    req: &MigrateSandbox,
) -> ApiResult<MigrationStatus> {
    let Some(m) = rec.migration.clone() else {
        return Err(err(ErrorCode::Internal, "migration record vanished"));
    };
    if let Ok(mut s) = cp.migrating.lock() {
        s.insert(m.id.clone());
    }
    let _driving = Driving(cp.clone(), m.id.clone());
    let id = rec.id.clone();
    let (src, dst, owner) = cp.store.read_local(|st| {
        let addr = |n: &str| st.nodes.get(n).map(|n| n.address.clone());
        let mut next = rec.clone();
        next.reschedules = m.generation;
        (addr(&m.from), addr(&m.to), st.owner_of(&next))
    });
    let agent_id = rec.observed.as_ref().and_then(|o| o.agent_id.clone());
    let (Some(src), Some(dst), Some(agent_id)) = (src, dst, agent_id) else {
        let why = format!(
            "node {} or node {} is no longer registered, or sandbox {id} has no copy on its node",
            m.from, m.to
        );
        write_phase(cp, &rec, &m, "aborted", Some(why.clone()), None).await;
        return Err(err(ErrorCode::Conflict, why));
    };
    let credential = migration_credential(cp, &agent_id, &owner, &m, req);
    let body = MigrateSandbox {
        target: dst.clone(),
        target_token: credential,
        target_owner: Some(owner),
        ..req.clone()
    };
    let call = cp
        .http
        .post(format!("{src}/v1/sandboxes/{agent_id}/migrate"))
        .json(&body)
        .send();
    tokio::pin!(call);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut phase = "preparing".to_string();
    let res = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tick.tick() => {
                let Some(st) = source_status(cp, &src, &agent_id).await else { continue };
                if st.phase != phase && RUNNING_PHASES.contains(&st.phase.as_str()) {
                    phase = st.phase.clone();
                    write_phase(cp, &rec, &m, &phase, None, Some(&st)).await;
                }
            }
        }
    };
    let named = |mut st: MigrationStatus| {
        st.sandbox = id.clone();
        st.target = m.to.clone();
        st.from = Some(m.from.clone());
        st
    };
    match res {
        Ok(r) if r.status().is_success() => {
            let st: MigrationStatus = r.json().await.unwrap_or_default();
            let st = named(MigrationStatus {
                phase: "completed".into(),
                ..st
            });
            let done = write_phase(cp, &rec, &m, "completed", None, Some(&st)).await;
            // why: the record may have moved on meanwhile (rescheduled, its
            // target removed): then the migration ended superseded, and the
            // caller must hear what the record says, not the source.
            if let Some(ended) = done
                .and_then(|s| s.migration)
                .filter(|x| x.id == m.id && x.phase != "completed")
            {
                let why = format!(
                    "the source handed sandbox {id} to node {} but the control plane did not move it there: {}",
                    m.to,
                    ended.error.clone().unwrap_or_else(|| format!("the migration is {}", ended.phase))
                );
                return Err(err(ErrorCode::Conflict, why));
            }
            tracing::info!(sandbox = %id, from = %m.from, to = %m.to, "migrated");
            Ok(st)
        }
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let e = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| {
                ApiError::new(ErrorCode::Internal, format!("{status}: {text}"))
            });
            let last = source_status(cp, &src, &agent_id).await;
            let unresolved = last.as_ref().is_some_and(|s| s.phase == "unresolved")
                && phase != "preparing"
                || e.code == ErrorCode::MigrationUnresolved;
            if unresolved {
                let why = format!(
                    "the target node {} did not answer after the switch-over: sandbox {id} is paused on node {} and may run on node {}; the record completes when node {} reports it running ({})",
                    m.to, m.from, m.to, m.to, e.message
                );
                write_phase(cp, &rec, &m, "unresolved", Some(why.clone()), last.as_ref()).await;
                return Err(err(ErrorCode::Unavailable, why));
            }
            let why = format!(
                "migration of sandbox {id} from node {} to node {} failed; it keeps running on node {}: {}",
                m.from, m.to, m.from, e.message
            );
            let ended =
                write_phase(cp, &rec, &m, "aborted", Some(why.clone()), last.as_ref()).await;
            // why: the target's heartbeat may have completed the move first.
            if let Some(done) = ended
                .and_then(|s| s.migration)
                .filter(|x| x.phase == "completed")
            {
                let st = status_of(&id, &done);
                return Ok(st);
            }
            Err(err(e.code, why))
        }
        Err(e) => {
            // The source's answer is unknown: the leader's watchdog finishes
            // the record from what the source says once it answers.
            let why = format!(
                "lost contact with node {} (the source) while it migrated sandbox {id} to node {}: {e}; see `hearth migrate --status {id}`",
                m.from, m.to
            );
            Err(err(ErrorCode::Unavailable, why))
        }
    }
}

/// How long a migration credential outlives the pre-copy bound: the
/// switch-over, the log, the commit and an abort after it.
const CREDENTIAL_SLACK_SECS: u64 = 600;

/// The credential the source presents to the target for this migration only:
/// this sandbox, the owner tag of its next generation, these two nodes, and
/// an expiry after the pre-copy bound ([`crate::credential`]).
fn migration_credential(
    cp: &ControlPlane,
    agent_id: &str,
    owner: &str,
    m: &Migration,
    req: &MigrateSandbox,
) -> String {
    let precopy = req.give_up_after_secs.unwrap_or(120);
    crate::credential::issue(
        &cp.credential_key,
        &crate::credential::MigrationScope {
            sandbox: agent_id.to_string(),
            owner: owner.to_string(),
            from: m.from.clone(),
            to: m.to.clone(),
            expires: crate::credential::unix_now() + precopy + CREDENTIAL_SLACK_SECS,
            purpose: crate::credential::PURPOSE.into(),
        },
    )
}

/// The API's status of a recorded migration.
fn status_of(id: &str, m: &Migration) -> MigrationStatus {
    let mut st: MigrationStatus = m
        .progress
        .clone()
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or_default();
    st.sandbox = id.to_string();
    st.target = m.to.clone();
    st.from = Some(m.from.clone());
    st.phase = m.phase.clone();
    st.error = m.error.clone();
    if m.active() {
        st.elapsed_ms = now_ms().saturating_sub(m.started_ms);
    }
    st
}

/// `GET /v1/sandboxes/{id}/migration`: the phase as recorded in Raft, with
/// the source's live progress while it runs.
pub(super) async fn status(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    let (rec, _) = lookup(&cp, &id).await?;
    let Some(m) = rec.migration.clone() else {
        return Err(err(
            ErrorCode::NotFound,
            format!(
                "sandbox {} has no migration recorded; start one with `hearth migrate {} --to NODE|auto`",
                rec.id, rec.id
            ),
        ));
    };
    let mut st = status_of(&rec.id, &m);
    if m.active() {
        let src = cp
            .store
            .read_local(|st| st.nodes.get(&m.from).map(|n| n.address.clone()));
        let agent_id = rec.observed.as_ref().and_then(|o| o.agent_id.clone());
        if let (Some(src), Some(agent_id)) = (src, agent_id) {
            if let Some(live) = source_status(&cp, &src, &agent_id).await {
                st = MigrationStatus {
                    sandbox: st.sandbox,
                    target: st.target,
                    from: st.from,
                    phase: st.phase,
                    error: st.error,
                    elapsed_ms: st.elapsed_ms,
                    ..live
                };
            }
        }
    }
    Ok(Json(st))
}

/// Leader: a migration still active in the record that no driver of this
/// member runs (the driving member died, or lost the source's answer) is
/// finished from the source's own status: `completed` moves the placement,
/// `aborted` records that the source kept it. In-progress and `unresolved`
/// ones are left to the target's heartbeat. A record still `preparing` was
/// possibly never sent to the source (whose status may be of an earlier
/// attempt): it is ended only after [`ORPHAN_PREPARING`] and only as aborted,
/// and never on a source status of `completed`. Whatever this misses, the
/// record's deadline ends on the nodes' evidence (`MIGRATION_STALL_MS`).
pub(super) async fn resolve_orphans(cp: &ControlPlane) {
    let driving: std::collections::HashSet<String> =
        cp.migrating.lock().map(|s| s.clone()).unwrap_or_default();
    let orphans: Vec<(SandboxRecord, Option<String>)> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter(|s| s.migrating().is_some_and(|m| !driving.contains(&m.id)))
            .map(|s| {
                let from = s.migrating().map(|m| m.from.clone()).unwrap_or_default();
                (s.clone(), st.nodes.get(&from).map(|n| n.address.clone()))
            })
            .collect()
    });
    for (rec, src) in orphans {
        let (Some(m), Some(src), Some(agent_id)) = (
            rec.migration.clone(),
            src,
            rec.observed.as_ref().and_then(|o| o.agent_id.clone()),
        ) else {
            continue;
        };
        let Some(st) = source_status(cp, &src, &agent_id).await else {
            continue;
        };
        let preparing = m.phase == "preparing";
        let stale = now_ms().saturating_sub(m.updated_ms) > ORPHAN_PREPARING.as_millis() as u64;
        match st.phase.as_str() {
            "completed" if !preparing => {
                write_phase(cp, &rec, &m, "completed", None, Some(&st)).await;
            }
            // why: a source that says `completed` handed the guest over (or
            // speaks of an earlier attempt): never end the record as aborted on
            // it; the target's heartbeat or the record's deadline decides.
            "aborted" if !preparing || stale => {
                let why = if preparing {
                    format!(
                        "the control-plane member driving the migration of sandbox {} went away before node {} started it; it keeps running on node {}",
                        rec.id, m.from, m.from
                    )
                } else {
                    format!(
                        "migration of sandbox {} from node {} to node {} failed; it keeps running on node {}: {}",
                        rec.id,
                        m.from,
                        m.to,
                        m.from,
                        st.error.clone().unwrap_or_default()
                    )
                };
                write_phase(cp, &rec, &m, "aborted", Some(why), Some(&st)).await;
            }
            _ => {}
        }
    }
}

/// How long a `preparing` record may go without news before the leader ends it.
const ORPHAN_PREPARING: Duration = Duration::from_secs(120);
