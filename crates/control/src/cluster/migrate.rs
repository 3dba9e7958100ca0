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
        stall_ms: Some(cp.cfg.migration_stall.as_millis() as u64),
        source_gone_ms: None,
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

/// The source's status is of migration attempt `m` (the id the migrate call
/// carried); a status of an earlier attempt, or of a source that does not
/// echo the id, says nothing about this one.
fn of_attempt(st: &MigrationStatus, m: &Migration) -> bool {
    st.attempt.as_deref() == Some(m.id.as_str())
}

/// How often, at most, unchanged-phase progress is written through Raft: a
/// quarter of the migration's deadline, capped at 5 s.
fn progress_every_ms(m: &Migration) -> u64 {
    (m.stall_ms.unwrap_or(hearth_store::MIGRATION_STALL_MS) / 4).clamp(1, 5_000)
}

/// What the record last got from a polled source status.
#[derive(Debug, Clone, Default, PartialEq)]
struct Written {
    phase: String,
    bytes_sent: u64,
    iterations: u64,
    at_ms: u64,
}

impl Written {
    /// The record's migration as written.
    fn of(m: &Migration) -> Written {
        let st: MigrationStatus = m
            .progress
            .clone()
            .and_then(|p| serde_json::from_value(p).ok())
            .unwrap_or_default();
        Written {
            phase: m.phase.clone(),
            bytes_sent: st.bytes_sent,
            iterations: st.iterations,
            at_ms: m.updated_ms,
        }
    }

    /// `st` (a polled status of attempt `m`) is news to write: a new running
    /// phase, or the same phase with progress (bytes, iterations) that
    /// advanced, at most every [`progress_every_ms`], so a long healthy
    /// pre-copy keeps the record alive and a stuck one meets its deadline.
    fn news(&self, m: &Migration, st: &MigrationStatus, now_ms: u64) -> bool {
        if !of_attempt(st, m) || !RUNNING_PHASES.contains(&st.phase.as_str()) {
            return false;
        }
        st.phase != self.phase
            || ((st.bytes_sent > self.bytes_sent || st.iterations > self.iterations)
                && now_ms.saturating_sub(self.at_ms) >= progress_every_ms(m))
    }

    fn wrote(st: &MigrationStatus, now_ms: u64) -> Written {
        Written {
            phase: st.phase.clone(),
            bytes_sent: st.bytes_sent,
            iterations: st.iterations,
            at_ms: now_ms,
        }
    }
}

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
    let ip = cp.store.read_local(|st| {
        st.slices
            .values()
            .find_map(|s| s.leases.get(&agent_id))
            .map(|ip| ip.to_string())
    });
    let credential = migration_credential(cp, &agent_id, &owner, &rec, ip, &m, req);
    let body = MigrateSandbox {
        target: dst.clone(),
        target_token: credential,
        target_owner: Some(owner),
        attempt: Some(m.id.clone()),
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
    let mut written = Written::of(&m);
    let res = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tick.tick() => {
                let Some(st) = source_status(cp, &src, &agent_id).await else { continue };
                let now = now_ms();
                if written.news(&m, &st, now) {
                    written = Written::wrote(&st, now);
                    write_phase(cp, &rec, &m, &st.phase, None, Some(&st)).await;
                }
            }
        }
    };
    let phase = written.phase;
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
            let last = source_status(cp, &src, &agent_id)
                .await
                .filter(|st| of_attempt(st, &m));
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
/// this sandbox, the owner tag of its next generation, these two nodes, this
/// attempt, the recorded vCPUs, memory and leased address, and an expiry
/// after the pre-copy bound ([`crate::credential`]).
fn migration_credential(
    cp: &ControlPlane,
    agent_id: &str,
    owner: &str,
    rec: &SandboxRecord,
    ip: Option<String>,
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
            attempt: m.id.clone(),
            cpus: rec.request.resources.cpus,
            memory_mib: rec.request.resources.memory_mib,
            ip,
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
            if let Some(live) = source_status(&cp, &src, &agent_id)
                .await
                .filter(|live| of_attempt(live, &m))
            {
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
/// finished from the source's own status of this attempt ([`orphan_write`]);
/// while it runs, its phases and advancing progress are recorded, so a long
/// pre-copy meets no deadline. Whatever this misses, the record's deadline
/// ends on the nodes' evidence (`Migration::stalled`).
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
        if let Some((phase, why)) = orphan_write(&rec.id, &m, &st, now_ms()) {
            write_phase(cp, &rec, &m, phase, why, Some(&st)).await;
        }
    }
}

/// What the leader writes for an orphaned migration `m` of sandbox `id`
/// given the source's status `st`: nothing for a status of another attempt
/// (an earlier one's `completed` or `aborted` says nothing of this one);
/// `completed` or `aborted` as the source ended this attempt; a running
/// phase when it is news ([`Written::news`]).
fn orphan_write(
    id: &str,
    m: &Migration,
    st: &MigrationStatus,
    now_ms: u64,
) -> Option<(&'static str, Option<String>)> {
    if !of_attempt(st, m) {
        return None;
    }
    match st.phase.as_str() {
        "completed" => Some(("completed", None)),
        "aborted" => Some((
            "aborted",
            Some(format!(
                "migration of sandbox {id} from node {} to node {} failed; it keeps running on node {}: {}",
                m.from,
                m.to,
                m.from,
                st.error.clone().unwrap_or_default()
            )),
        )),
        p => {
            let phase = RUNNING_PHASES.iter().find(|r| **r == p)?;
            Written::of(m).news(m, st, now_ms).then_some((*phase, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(phase: &str) -> Migration {
        Migration {
            id: "attempt2".into(),
            from: "n1".into(),
            to: "n2".into(),
            phase: phase.into(),
            generation: 1,
            started_ms: 1000,
            updated_ms: 1000,
            error: None,
            progress: None,
            stall_ms: Some(60_000),
            source_gone_ms: None,
        }
    }

    fn status(attempt: Option<&str>, phase: &str, bytes: u64) -> MigrationStatus {
        MigrationStatus {
            attempt: attempt.map(str::to_string),
            phase: phase.into(),
            bytes_sent: bytes,
            ..Default::default()
        }
    }

    /// Issue 7, finding 5: the source's status of an earlier attempt (or of
    /// a source that does not echo the attempt id) never ends or advances
    /// this attempt's record; this attempt's own status does.
    #[test]
    fn a_status_of_another_attempt_is_ignored() {
        let m = migration("precopy");
        for other in [Some("attempt1"), None] {
            for phase in ["completed", "aborted", "switchover", "unresolved"] {
                let st = status(other, phase, 1 << 20);
                assert_eq!(orphan_write("s1", &m, &st, 2000), None, "{other:?} {phase}");
                assert!(!Written::of(&m).news(&m, &st, 2000), "{other:?} {phase}");
            }
        }
        let ours = |phase| status(Some("attempt2"), phase, 1 << 20);
        assert_eq!(
            orphan_write("s1", &m, &ours("completed"), 2000),
            Some(("completed", None))
        );
        let (phase, why) = orphan_write("s1", &m, &ours("aborted"), 2000).unwrap();
        assert_eq!(phase, "aborted");
        assert!(why.unwrap().contains("keeps running on node n1"));
        assert_eq!(
            orphan_write("s1", &m, &ours("switchover"), 2000),
            Some(("switchover", None))
        );
        // A record still `preparing` ends on this attempt's own answer.
        let p = migration("preparing");
        assert_eq!(
            orphan_write("s1", &p, &ours("aborted"), 2000).map(|w| w.0),
            Some("aborted")
        );
    }

    /// Issue 7, finding 1 (coordinator side): progress in the same phase is
    /// written while it advances, at most every quarter of the deadline
    /// (capped at 5 s); a repeat of the same progress is not.
    #[test]
    fn advancing_progress_is_written_rate_limited() {
        let m = migration("precopy");
        let w = Written::wrote(&status(Some("attempt2"), "precopy", 100), 10_000);
        let st = |bytes| status(Some("attempt2"), "precopy", bytes);
        assert!(!w.news(&m, &st(200), 12_000), "written again within 5 s");
        assert!(
            w.news(&m, &st(200), 15_000),
            "advancing progress not written"
        );
        assert!(!w.news(&m, &st(100), 60_000), "unchanged progress written");
        assert!(w.news(&m, &status(Some("attempt2"), "switchover", 100), 10_001));
        let short = Migration {
            stall_ms: Some(2_000),
            ..m
        };
        assert_eq!(progress_every_ms(&short), 500);
        assert!(w.news(&short, &st(200), 10_500));
    }
}
