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
    check_params(&req)?;
    Ok(Json(run(&cp, &id, &req).await?))
}

/// Longest pre-copy a migration may be given (`give_up_after_secs`), in the
/// API, the drain and the CLI: it also bounds the migration credential's
/// lifetime.
pub const MAX_GIVE_UP_AFTER_SECS: u64 = 3600;

/// The migration parameters a request may carry, checked by the same rules
/// as the source agent's (every one positive) plus the pre-copy cap, so a
/// bad value is refused before anything is recorded (or a node cordoned).
pub(super) fn check_params(req: &MigrateSandbox) -> ApiResult<()> {
    let bad = |what: &str, v: u64| {
        Err(err(
            ErrorCode::InvalidArgument,
            format!("{what} must be positive, not {v}"),
        ))
    };
    if let Some(v @ 0) = req.max_bandwidth_mib {
        return bad("the bandwidth cap (--bandwidth-mib, max_bandwidth_mib)", v);
    }
    if let Some(v @ 0) = req.downtime_limit_ms {
        return bad("the downtime limit (--downtime-ms, downtime_limit_ms)", v);
    }
    if let Some(v @ 0) = req.max_iterations {
        return bad("max_iterations", v);
    }
    match req.give_up_after_secs {
        Some(v @ 0) => bad("the pre-copy bound (--give-up-secs, give_up_after_secs)", v),
        Some(v) if v > MAX_GIVE_UP_AFTER_SECS => Err(err(
            ErrorCode::InvalidArgument,
            format!(
                "the pre-copy bound (--give-up-secs, give_up_after_secs) is at most {MAX_GIVE_UP_AFTER_SECS} s, not {v}"
            ),
        )),
        _ => Ok(()),
    }
}

/// Records and drives one migration; returns when it ended.
pub(super) async fn run(
    cp: &ControlPlane,
    id: &str,
    req: &MigrateSandbox,
) -> ApiResult<MigrationStatus> {
    match run_from(cp, id, req, None, None).await {
        Ok(st) => Ok(st),
        Err(Ended::Failed { error, .. }) => Err(error),
        Err(Ended::Left { now_on }) => Err(err(
            ErrorCode::Conflict,
            format!("sandbox {id} {now_on}; ask again"),
        )),
    }
}

/// How a migration of [`run_from`] ended without moving the sandbox.
pub(super) enum Ended {
    /// The sandbox is no longer on the expected source node (it moved or
    /// was removed by other means): nothing was recorded. `now_on` says
    /// where it is ("runs on node X" / "was removed").
    Left { now_on: String },
    /// Refused or failed. `started`: the migration was recorded (so it ran
    /// and failed at run time, not on a parameter or a refusal).
    Failed { error: HttpError, started: bool },
}

fn refused(error: HttpError) -> Ended {
    Ended::Failed {
        error,
        started: false,
    }
}

/// How many nodes an `auto` migration tries when the state machine refuses
/// the chosen one (another migration took its room meanwhile).
pub(super) const AUTO_PLACE_TRIES: usize = 4;

/// [`run`] with an expected source: with `from`, only a sandbox that is
/// still on node `from` moves (checked again by the state machine in
/// `StartMigration`), so a drain never moves one that already left. With
/// `stop` (a drain's stop flag), a stop that came while the migration was
/// being recorded ends it `aborted` before anything is sent to a node.
pub(super) async fn run_from(
    cp: &ControlPlane,
    id: &str,
    req: &MigrateSandbox,
    from: Option<&str>,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<MigrationStatus, Ended> {
    if req.target.is_empty() || req.target.contains("://") {
        return Err(refused(err(
            ErrorCode::InvalidArgument,
            format!(
                "migration target '{}' is not a node: give a node id (`hearth node ls`) or `auto`",
                req.target
            ),
        )));
    }
    let rec = match lookup(cp, id).await {
        Ok((rec, _)) => rec,
        Err(e) if from.is_some() && e.0.code == ErrorCode::NotFound => {
            return Err(Ended::Left {
                now_on: "was removed".into(),
            })
        }
        Err(e) => return Err(refused(e)),
    };
    if let Some(f) = from.filter(|f| *f != rec.node) {
        return Err(left(&rec, f));
    }
    if from.is_some() && rec.migrating().is_some() {
        return Err(moving(&rec));
    }
    let views = cp
        .store
        .read(|st| st.node_views())
        .await
        .map_err(|e| refused(e.into()))?;
    let rec = start(cp, rec, req, from, views).await?;
    // why: the drain's stop aborts this attempt by its id, never whatever
    // migration the sandbox has when the abort runs (review10 F2); recorded
    // before the flag is read below, under the drain table's lock the stop
    // sets the flag under, so the stop sees the attempt or this sees the flag.
    if let (Some(node), Some(_), Some(m)) = (from, stop, rec.migration.as_ref()) {
        super::nodes::set_outcome(cp, node, &rec.id, |o| o.attempt = Some(m.id.clone()));
    }
    // why: a drain's stop sets its flag, then aborts the migrations the
    // drain shows running; one whose record was written after that abort
    // looked (it found "no migration in progress") is caught here, since the
    // flag was set before the abort looked (review6 F1).
    if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
        if let Some(m) = rec.migration.clone() {
            let why = format!(
                "the drain of node {} was stopped as this migration was recorded; nothing was sent to node {} or node {}, and sandbox {} keeps running on node {}",
                m.from, m.from, m.to, rec.id, m.from
            );
            tracing::info!(sandbox = %rec.id, from = %m.from, to = %m.to, "migration aborted before it began: the drain was stopped");
            let ended = write_phase(cp, &rec, &m, "aborted", Some(why.clone()), None).await;
            let error = if ended.is_some() {
                err(ErrorCode::Conflict, why)
            } else {
                err(
                    ErrorCode::Unavailable,
                    format!("the drain of node {} was stopped as the migration of sandbox {} was recorded, but its end could not be recorded; see `hearth migrate --status {}`", m.from, rec.id, rec.id),
                )
            };
            return Err(Ended::Failed {
                error,
                started: true,
            });
        }
    }
    drive(cp, rec, req, stop)
        .await
        .map_err(|error| Ended::Failed {
            error,
            started: true,
        })
}

/// A sandbox another request (a user's `hearth migrate`) moves right now.
fn moving(rec: &SandboxRecord) -> Ended {
    let to = rec.migrating().map(|m| m.to.clone()).unwrap_or_default();
    Ended::Left {
        now_on: format!(
            "is being migrated to node {to} by another request; see `hearth migrate --status {}`",
            rec.id
        ),
    }
}

fn left(rec: &SandboxRecord, from: &str) -> Ended {
    Ended::Left {
        now_on: format!("runs on node {}, not on node {from} any more", rec.node),
    }
}

/// Chooses the target (`auto`: bin-packing over `views`, the other nodes)
/// and records the migration (`StartMigration`, which checks the source and
/// reserves the target's room). An `auto` target the state machine refuses
/// (its room was taken since `views`) is left out and another one chosen
/// from fresh views, at most [`AUTO_PLACE_TRIES`] nodes in all.
async fn start(
    cp: &ControlPlane,
    rec: SandboxRecord,
    req: &MigrateSandbox,
    from: Option<&str>,
    mut views: Vec<hearth_sched::NodeView>,
) -> Result<SandboxRecord, Ended> {
    let auto = req.target == "auto";
    let source = from.unwrap_or(&rec.node).to_string();
    let (mut refusals, mut refused_nodes) = (Vec::new(), Vec::new());
    for _ in 0..AUTO_PLACE_TRIES {
        let to = if auto {
            views.retain(|v| v.id != source && !refused_nodes.contains(&v.id));
            let mut request = rec.request.clone();
            // why: a moving sandbox leaves its co-location group behind (as a reschedule does).
            request.group = None;
            match hearth_sched::place(&views, &request, Strategy::BinPack) {
                Ok(n) => n.id.clone(),
                Err(e) => {
                    let also = if refusals.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", refusals.join("; "))
                    };
                    return Err(refused(err(
                        ErrorCode::Unschedulable,
                        format!(
                            "no other node can take sandbox {} (it runs on node {source}): {e}{also}",
                            rec.id
                        ),
                    )));
                }
            }
        } else {
            req.target.clone()
        };
        let now = now_ms();
        let mig = Migration {
            id: new_id(),
            from: source.clone(),
            to: to.clone(),
            phase: "preparing".into(),
            generation: 0,
            started_ms: now,
            updated_ms: now,
            error: None,
            progress: None,
            stall_ms: Some(stall_ms(cp.cfg.migration_stall, req.give_up_after_secs)),
            source_gone_ms: None,
            unconfirmed: false,
            target_lost: false,
            agent_id: None,
        };
        let reply = cp
            .store
            .write(Command::StartMigration {
                id: rec.id.clone(),
                migration: mig,
            })
            .await
            .map_err(|e| refused(e.into()))?;
        match reply {
            Reply::Sandbox { sandbox } => return Ok(sandbox),
            Reply::Rejected { node, reason } if auto && node == to => {
                tracing::info!(sandbox = %rec.id, %node, "migration target refused, choosing another: {reason}");
                refusals.push(reason);
                refused_nodes.push(node);
                views = cp
                    .store
                    .read(|st| st.node_views())
                    .await
                    .map_err(|e| refused(e.into()))?;
                continue;
            }
            Reply::Rejected { reason, .. } => {
                return Err(refused(err(ErrorCode::Conflict, reason)))
            }
            Reply::Conflict { message } => {
                // why: the state machine refuses a source that is not the
                // sandbox's node; the caller expecting `from` hears "left".
                if let Some(f) = from {
                    match cp.store.read(|st| st.sandboxes.get(&rec.id).cloned()).await {
                        Ok(Some(now)) if now.node != f => return Err(left(&now, f)),
                        Ok(Some(now)) if now.migrating().is_some() => return Err(moving(&now)),
                        Ok(None) => {
                            return Err(Ended::Left {
                                now_on: "was removed".into(),
                            })
                        }
                        _ => {}
                    }
                }
                return Err(refused(err(ErrorCode::Conflict, message)));
            }
            Reply::Invalid { message } => {
                return Err(refused(err(ErrorCode::InvalidArgument, message)))
            }
            Reply::NotFound { what } => {
                if from.is_some() && what == format!("sandbox {}", rec.id) {
                    return Err(Ended::Left {
                        now_on: "was removed".into(),
                    });
                }
                return Err(refused(err(
                    ErrorCode::NotFound,
                    format!("no {what}; see `hearth node ls`"),
                )));
            }
            other => {
                return Err(refused(err(
                    ErrorCode::Internal,
                    format!("unexpected store reply {other:?}"),
                )))
            }
        }
    }
    Err(refused(err(
        ErrorCode::Unschedulable,
        format!(
            "no other node took sandbox {} (it runs on node {source}) after {AUTO_PLACE_TRIES} tries: {}",
            rec.id,
            refusals.join("; ")
        ),
    )))
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

/// The record's deadline for a migration: the configured one, but never
/// less than the source's own pre-copy bound plus a minute.
///
/// why: a pre-copy that stops advancing must be ended by the source (its
/// give-up cancels QEMU's migration, so it can no longer commit) before the
/// record's deadline aborts it: a deadline abort of a source that then
/// commits after all could leave no running copy (docs/migration.md).
fn stall_ms(configured: Duration, give_up_after_secs: Option<u64>) -> u64 {
    let give_up =
        give_up_after_secs.unwrap_or(hearth_vmm::migration::DEFAULT_GIVE_UP_AFTER.as_secs());
    (configured.as_millis() as u64).max(give_up.saturating_mul(1000).saturating_add(60_000))
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

/// How long after it sees a drain's stop [`drive`] lets the stop's own
/// abort of the migration answer before it asks the source to cancel again,
/// and how long between two more asks while they fail on something
/// transient.
pub(super) const STOP_CANCEL_AGAIN: Duration = Duration::from_secs(5);

/// Runs a recorded migration: the source's migrate call, its progress
/// written while it runs, and the record ended on its answer. With `stop` (a
/// drain's stop flag): once it is set, a migration still running after
/// [`STOP_CANCEL_AGAIN`] is aborted from here, again while the abort fails
/// on something transient (review7 F4: the stop's one abort was only
/// logged, and the migration then ran to its end).
async fn drive(
    cp: &ControlPlane,
    rec: SandboxRecord,
    req: &MigrateSandbox,
    stop: Option<&std::sync::atomic::AtomicBool>,
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
    // why: the record's policy, as of the migration's start (a `policy set`
    // committed before it may not have reached the source's copy yet, and
    // one after it is refused), is what the target enforces.
    let policy = match serde_json::from_value(rec.policy()) {
        Ok(p) => p,
        Err(e) => {
            let why = format!("sandbox {id}: its recorded network policy is unreadable: {e}");
            write_phase(cp, &rec, &m, "aborted", Some(why.clone()), None).await;
            return Err(err(ErrorCode::Internal, why));
        }
    };
    let body = MigrateSandbox {
        target: dst.clone(),
        target_token: credential,
        target_owner: Some(owner),
        attempt: Some(m.id.clone()),
        policy: Some(policy),
        // why: absent while 0, so an agent that predates the field still
        // takes the request of a sandbox whose policy was never set.
        policy_version: Some(rec.policy_version).filter(|v| *v > 0),
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
    // `None` until the stop is seen, then when to ask for the abort; `done`
    // once an abort got an answer other than "unavailable".
    let (mut cancel_at, mut cancel_done) = (None::<tokio::time::Instant>, false);
    let res = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tick.tick() => {
                if !cancel_done && stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                    let now = tokio::time::Instant::now();
                    match cancel_at {
                        None => cancel_at = Some(now + STOP_CANCEL_AGAIN),
                        // why: the stop's own abort (or anything else) ended
                        // this attempt in the record: nothing to ask again
                        // (review10 F2).
                        Some(_) if attempt_ended(cp, &id, &m.id) => cancel_done = true,
                        Some(at) if now >= at => {
                            match abort_attempt(cp, &id, Some(&m.id)).await {
                                Err(e) if e.0.code == ErrorCode::Unavailable => {
                                    tracing::info!(sandbox = %id, "drain stop: migration not aborted yet, asking again: {}", e.0.message);
                                    cancel_at = Some(tokio::time::Instant::now() + STOP_CANCEL_AGAIN);
                                }
                                Err(e) => {
                                    tracing::info!(sandbox = %id, "drain stop: migration not aborted: {}", e.0.message);
                                    cancel_done = true;
                                }
                                Ok(_) => cancel_done = true,
                            }
                            continue;
                        }
                        Some(_) => {}
                    }
                }
                let Some(st) = source_status(cp, &src, &agent_id).await else { continue };
                let now = now_ms();
                // why: a write lost (an election, a timeout) is tried again
                // at the next tick, not a quarter of the deadline later.
                if written.news(&m, &st, now)
                    && write_phase(cp, &rec, &m, &st.phase, None, Some(&st)).await.is_some()
                {
                    written = Written::wrote(&st, now);
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
    let precopy = req
        .give_up_after_secs
        .unwrap_or(hearth_vmm::migration::DEFAULT_GIVE_UP_AFTER.as_secs());
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
            expires: credential_expiry(crate::credential::unix_now(), precopy),
            purpose: crate::credential::PURPOSE.into(),
        },
    )
}

/// When a credential issued at `now` for a pre-copy bound of `precopy`
/// seconds expires; saturating, so no value is born expired or panics.
fn credential_expiry(now: u64, precopy: u64) -> u64 {
    now.saturating_add(precopy.min(MAX_GIVE_UP_AFTER_SECS))
        .saturating_add(CREDENTIAL_SLACK_SECS)
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

/// `POST /v1/sandboxes/{id}/migration/abort` (`hearth migrate --abort`):
/// cancels the sandbox's migration in progress **at its source** (the node
/// API's cancel of the recorded attempt, as the deadline's
/// [`cancel_stalled`] does) and records the source's answer: `aborted` (it
/// did not commit and runs on the source) or `completed` (it had committed:
/// it runs on the target). Any other answer changes nothing in the record
/// (the migration goes on and ends as it would have): 409 when the source
/// is past the point a cancel can stop (its commit was sent), 503 when it
/// did not answer. 409 when no migration is in progress.
pub(super) async fn abort(
    State(cp): State<ControlPlane>,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationStatus>> {
    abort_attempt(&cp, &id, None).await.map(Json)
}

/// Whether this member's copy of the record shows attempt `attempt` of
/// sandbox `id` ended: the record's migration is that attempt, no longer in
/// progress. Only that positive evidence counts (review11 F2): a copy that
/// has not applied the attempt yet (a follower behind) shows no migration or
/// an older one, which says nothing; the driver then asks `abort_attempt`,
/// whose read is linearizable and answers "not this attempt" when it ended.
fn attempt_ended(cp: &ControlPlane, id: &str, attempt: &str) -> bool {
    cp.store.read_local(|st| {
        st.sandboxes.get(id).is_some_and(|s| {
            s.migration.as_deref().is_some_and(|m| m.id == attempt) && s.migrating().is_none()
        })
    })
}

/// [`abort`] of the sandbox's migration in progress; with `attempt`, only
/// if that migration is this attempt: 409 "not this attempt", changing
/// nothing, when it ended or another one runs now. A drain's stop and its
/// drivers name their attempt, so a repeated abort never cancels a later
/// migration of the sandbox (review10 F2: a user's `hearth migrate` right
/// after the stop was cancelled by the old driver's next ask).
pub(super) async fn abort_attempt(
    cp: &ControlPlane,
    id: &str,
    attempt: Option<&str>,
) -> ApiResult<MigrationStatus> {
    let (rec, _) = lookup(cp, id).await?;
    if let Some(a) = attempt.filter(|a| rec.migrating().is_none_or(|m| m.id != *a)) {
        let now = match (rec.migration.as_deref(), rec.migrating()) {
            (_, Some(m)) => format!("another migration (to node {}) runs now", m.to),
            (Some(m), None) if m.id == a => format!("it ended {}", m.phase),
            _ => "it is no longer recorded".into(),
        };
        return Err(err(
            ErrorCode::Conflict,
            format!(
                "sandbox {}: migration {a} is not in progress ({now}); not this attempt: nothing aborted",
                rec.id
            ),
        ));
    }
    let Some(m) = rec.migrating().cloned() else {
        let last = rec
            .migration
            .as_ref()
            .map(|m| format!(" (its last one, to node {}, ended {})", m.to, m.phase))
            .unwrap_or_default();
        return Err(err(
            ErrorCode::Conflict,
            format!(
                "sandbox {} has no migration in progress{last}; nothing to abort",
                rec.id
            ),
        ));
    };
    let sid = rec.id.clone();
    let src = cp
        .store
        .read_local(|st| st.nodes.get(&m.from).map(|n| n.address.clone()));
    let agent_id = rec.observed.as_ref().and_then(|o| o.agent_id.clone());
    let answer = match (src, agent_id) {
        (Some(src), Some(agent_id)) => source_cancel(cp, &src, &agent_id, &m).await,
        _ => Err(format!(
            "node {} is not registered or sandbox {sid} has no copy id",
            m.from
        )),
    };
    let st = match answer {
        Ok(st) if st.phase == "aborted" => {
            let why = format!(
                "aborted on request: node {} cancelled its migration of sandbox {sid} to node {} and keeps running it{}",
                m.from,
                m.to,
                st.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            );
            tracing::info!(sandbox = %sid, from = %m.from, to = %m.to, "migration aborted on request");
            write_phase(cp, &rec, &m, "aborted", Some(why), None).await
        }
        Ok(st) if st.phase == "completed" => {
            write_phase(cp, &rec, &m, "completed", None, None).await
        }
        Ok(st) => {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "node {} could not cancel the migration of sandbox {sid} to node {}: it is {} (its commit was sent; the migration ends as the target answers); see `hearth migrate --status {sid}`",
                    m.from, m.to, st.phase
                ),
            ))
        }
        Err(e) => {
            return Err(err(
                ErrorCode::Unavailable,
                format!(
                    "node {} (the source) did not confirm the cancel of its migration of sandbox {sid} to node {} ({e}); nothing was changed: try again, or see `hearth migrate --status {sid}`",
                    m.from, m.to
                ),
            ))
        }
    };
    let after = st
        .as_ref()
        .and_then(|r| r.migration.as_deref())
        .filter(|a| a.id == m.id)
        .map_or_else(|| status_of(&sid, &m), |a| status_of(&sid, a));
    Ok(after)
}

/// Leader: a migration still active in the record that no driver of this
/// member runs (the driving member died, or lost the source's answer) is
/// finished from the source's own status of this attempt ([`orphan_write`]);
/// while it runs, its phases and advancing progress are recorded, so a long
/// pre-copy meets no deadline. Whatever this misses, the record's deadline
/// ends on the nodes' evidence (`Migration::stalled`).
pub(super) async fn resolve_orphans(cp: &ControlPlane) {
    cancel_stalled(cp).await;
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

/// How long the leader waits for a source's answer to a cancel (the source
/// itself waits up to 30 s for its migration to end).
const CANCEL_ANSWER_WAIT: Duration = Duration::from_secs(40);

/// Leader: a migration past its deadline (`Migration::stalled`) whose source
/// has not ended it is given up by cancelling it **at the source**, and the
/// record settles on the source's answer: `aborted` (it did not commit and
/// runs there), `completed` (the target runs it), anything else or no answer
/// `unresolved` (never a guess; asked again at the next tick).
///
/// why: the deadline alone cannot know that a source still in pre-copy will
/// not switch over and commit later; recording it aborted then fenced the
/// target's copy while the source released its own (issue 7, migsafe 1).
pub(super) async fn cancel_stalled(cp: &ControlPlane) {
    let now = now_ms();
    let stalled: Vec<(SandboxRecord, Option<String>)> = cp.store.read_local(|st| {
        st.sandboxes
            .values()
            .filter(|s| s.migrating().is_some_and(|m| m.stalled(now)))
            .map(|s| {
                let from = s.migrating().map(|m| m.from.clone()).unwrap_or_default();
                (s.clone(), st.nodes.get(&from).map(|n| n.address.clone()))
            })
            .collect()
    });
    for (rec, src) in stalled {
        let Some(m) = rec.migration.clone() else {
            continue;
        };
        let id = rec.id.clone();
        let agent_id = rec.observed.as_ref().and_then(|o| o.agent_id.clone());
        let answer = match (src, agent_id) {
            (Some(src), Some(agent_id)) => source_cancel(cp, &src, &agent_id, &m).await,
            _ => Err(format!(
                "node {} is not registered or sandbox {id} has no copy id",
                m.from
            )),
        };
        let (phase, why) = match answer {
            Ok(st) if st.phase == "aborted" => (
                "aborted",
                Some(format!(
                    "past its deadline with no progress: node {} cancelled its migration of sandbox {id} to node {} and keeps running it: {}",
                    m.from,
                    m.to,
                    st.error.clone().unwrap_or_default()
                )),
            ),
            Ok(st) if st.phase == "completed" => ("completed", None),
            Ok(st) => (
                "unresolved",
                Some(format!(
                    "past its deadline with no progress; node {} (the source) could not cancel its migration of sandbox {id} (it is {}): sandbox {id} may run on node {}; the record completes when node {} reports it, or is aborted once node {} confirms a cancel",
                    m.from, st.phase, m.to, m.to, m.from
                )),
            ),
            Err(e) => (
                "unresolved",
                Some(format!(
                    "past its deadline with no progress; node {} (the source) did not answer the cancel of its migration of sandbox {id} ({e}): it may still switch over to node {}; the record completes when node {} reports it, or is aborted once node {} confirms a cancel",
                    m.from, m.to, m.to, m.from
                )),
            ),
        };
        // why: an unresolved record asked again writes only a change.
        if phase == "unresolved" && m.phase == "unresolved" {
            continue;
        }
        tracing::warn!(sandbox = %id, from = %m.from, to = %m.to, "migration past its deadline: {phase}");
        write_phase(cp, &rec, &m, phase, why, None).await;
    }
}

/// Asks the source to cancel migration attempt `m` of copy `agent_id`; its
/// answer is the attempt's status once ended (see the node API's
/// `POST /v1/sandboxes/{id}/migration/cancel`).
async fn source_cancel(
    cp: &ControlPlane,
    addr: &str,
    agent_id: &str,
    m: &Migration,
) -> Result<MigrationStatus, String> {
    let r = cp
        .http
        .post(format!("{addr}/v1/sandboxes/{agent_id}/migration/cancel"))
        .json(&hearth_api::migration::CancelMigration {
            attempt: m.id.clone(),
        })
        .timeout(CANCEL_ANSWER_WAIT)
        .send()
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let status = r.status();
    if !status.is_success() {
        let text = r.text().await.unwrap_or_default();
        return Err(match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => e.message,
            Err(_) => format!("{status}: {}", text.chars().take(200).collect::<String>()),
        });
    }
    let st: MigrationStatus = r
        .json()
        .await
        .map_err(|e| format!("an unreadable answer: {e}"))?;
    if !of_attempt(&st, m) {
        return Err(format!(
            "the answer is about attempt {:?}, not {}",
            st.attempt, m.id
        ));
    }
    Ok(st)
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
pub(super) mod tests {
    use super::*;

    #[test]
    fn the_deadline_outlasts_the_sources_own_pre_copy_bound() {
        let two_min = Duration::from_secs(120);
        assert_eq!(stall_ms(two_min, None), 180_000);
        assert_eq!(stall_ms(two_min, Some(10)), 120_000);
        assert_eq!(stall_ms(two_min, Some(600)), 660_000);
        assert_eq!(stall_ms(Duration::from_secs(900), Some(600)), 900_000);
        assert_eq!(stall_ms(two_min, Some(u64::MAX)), u64::MAX);
    }

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
            unconfirmed: false,
            target_lost: false,
            agent_id: None,
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

    /// Issue 7 review m1: the credential's expiry saturates and the pre-copy
    /// bound in it is capped, so no credential is born expired or panics.
    #[test]
    fn a_credential_expiry_saturates_and_caps_the_precopy() {
        assert_eq!(credential_expiry(u64::MAX - 5, 10), u64::MAX);
        assert_eq!(
            credential_expiry(1_000, u64::MAX),
            1_000 + MAX_GIVE_UP_AFTER_SECS + CREDENTIAL_SLACK_SECS
        );
        assert_eq!(
            credential_expiry(1_000, 120),
            1_000 + 120 + CREDENTIAL_SLACK_SECS
        );
    }

    /// Issue 7 review M3/m1: zero parameters and a pre-copy bound above the
    /// cap are refused, naming the parameter; the cap itself is accepted.
    #[test]
    fn migration_parameters_are_checked_up_front() {
        let ok = MigrateSandbox {
            target: "auto".into(),
            give_up_after_secs: Some(MAX_GIVE_UP_AFTER_SECS),
            ..Default::default()
        };
        assert!(check_params(&ok).is_ok());
        assert!(check_params(&MigrateSandbox::default()).is_ok());
        for (bad, what) in [
            (
                MigrateSandbox {
                    max_bandwidth_mib: Some(0),
                    ..Default::default()
                },
                "bandwidth",
            ),
            (
                MigrateSandbox {
                    downtime_limit_ms: Some(0),
                    ..Default::default()
                },
                "downtime",
            ),
            (
                MigrateSandbox {
                    give_up_after_secs: Some(0),
                    ..Default::default()
                },
                "pre-copy",
            ),
            (
                MigrateSandbox {
                    give_up_after_secs: Some(MAX_GIVE_UP_AFTER_SECS + 1),
                    ..Default::default()
                },
                "at most 3600",
            ),
        ] {
            let e = check_params(&bad).expect_err(what).0;
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{what}");
            assert!(e.message.contains(what), "{what}: {}", e.message);
        }
    }

    pub(crate) mod cluster {
        //! A real single-member control plane (Raft store in a temp dir)
        //! with registered nodes whose agents are unreachable.
        use super::super::super::{ControlConfig, ControlPlane};
        use hearth_sched::{Accel, Request, Resources};
        use hearth_store::{
            Command, NodeRecord, Observed, RestartPolicy, SandboxRecord, Store, StoreConfig,
        };

        pub async fn plane(dir: &std::path::Path) -> ControlPlane {
            let peers = [(1, "127.0.0.1:1".to_string())].into_iter().collect();
            let store = Store::open(StoreConfig::new(1, dir.join("m1"), peers))
                .await
                .expect("open store");
            let token = crate::ApiToken::new("t".repeat(32)).expect("token");
            ControlPlane::new(store, ControlConfig::default(), &token)
        }

        pub async fn node(cp: &ControlPlane, id: &str, cpus: u32, memory_mib: u64) {
            cp.store
                .write(Command::RegisterNode {
                    node: NodeRecord {
                        id: id.into(),
                        instance: format!("inst-{id}"),
                        address: "http://127.0.0.1:1".into(),
                        capacity: Resources::new(cpus, memory_mib, 1_000_000),
                        accel: Accel::Tcg,
                        labels: Default::default(),
                        cordoned: false,
                        ready: true,
                        registered_ms: 1,
                        last_heartbeat_ms: super::super::now_ms(),
                        warm_templates: Default::default(),
                        volumes: Default::default(),
                    },
                })
                .await
                .expect("register node");
        }

        /// A running `restart: always` sandbox (1 cpu, 64 MiB) on `node`.
        pub async fn sandbox(cp: &ControlPlane, id: &str, node: &str) {
            cp.store
                .write(Command::CreateSandbox {
                    sandbox: SandboxRecord {
                        id: id.into(),
                        name: None,
                        spec: serde_json::json!({"image": "busybox"}),
                        request: Request {
                            resources: Resources::new(1, 64, 10),
                            ..Default::default()
                        },
                        node: node.into(),
                        restart: RestartPolicy::Always,
                        record_only: false,
                        idempotency_key: None,
                        ip: None,
                        created_ms: 1,
                        reschedules: 0,
                        policy_version: 0,
                        pinned: false,
                        observed: None,
                        migration: None,
                    },
                })
                .await
                .expect("create");
            cp.store
                .write(Command::SetObserved {
                    id: id.into(),
                    observed: Observed {
                        status: "running".into(),
                        agent_id: Some(format!("a-{id}")),
                        error: None,
                        updated_ms: 2,
                    },
                    node: Some(node.into()),
                    generation: Some(0),
                })
                .await
                .expect("observed");
        }
    }

    fn auto() -> MigrateSandbox {
        MigrateSandbox {
            target: "auto".into(),
            ..Default::default()
        }
    }

    /// Issue 7 review M1: a migration that expects the sandbox on node `from`
    /// does nothing and says "left" when it is elsewhere or removed, whether
    /// it is found so before recording or by the state machine's check.
    #[tokio::test]
    async fn a_sandbox_that_left_the_expected_node_is_not_moved_again() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        for n in ["n1", "n2", "n3"] {
            cluster::node(&cp, n, 64, 65536).await;
        }
        cluster::sandbox(&cp, "s1", "n1").await;
        match run_from(&cp, "s1", &auto(), Some("n3"), None).await {
            Err(Ended::Left { now_on }) => assert!(now_on.contains("runs on node n1"), "{now_on}"),
            Err(Ended::Failed { error, .. }) => panic!("failed: {}", error.0.message),
            Ok(_) => panic!("migrated"),
        }
        let rec = cp.store.read_local(|st| st.sandboxes["s1"].clone());
        assert!(rec.migration.is_none(), "a migration was recorded");
        match run_from(&cp, "nosuch", &auto(), Some("n1"), None).await {
            Err(Ended::Left { now_on }) => assert_eq!(now_on, "was removed"),
            _ => panic!("a removed sandbox is not reported as left"),
        }

        // A user's migration of it runs: the drain leaves it to that one.
        let to_n2 = MigrateSandbox {
            target: "n2".into(),
            ..Default::default()
        };
        let views = cp.store.read_local(|st| st.node_views());
        assert!(start(&cp, rec.clone(), &to_n2, None, views).await.is_ok());
        match run_from(&cp, "s1", &auto(), Some("n1"), None).await {
            Err(Ended::Left { now_on }) => {
                assert!(now_on.contains("being migrated to node n2"), "{now_on}")
            }
            _ => panic!("a sandbox another migration moves is not reported as left"),
        }
        let m = cp
            .store
            .read_local(|st| st.sandboxes["s1"].migration.clone().unwrap());
        cp.store
            .write(Command::MigrationPhase {
                id: "s1".into(),
                migration: m.id,
                phase: "aborted".into(),
                error: Some("test".into()),
                progress: None,
                at_ms: now_ms(),
            })
            .await
            .unwrap();

        // It moves after the drain looked it up: StartMigration refuses.
        let stale = rec.clone();
        cp.store
            .write(Command::Drain {
                node: "n1".into(),
                at_ms: now_ms(),
                only: Some(vec!["s1".into()]),
            })
            .await
            .unwrap();
        let now = cp.store.read_local(|st| st.sandboxes["s1"].node.clone());
        assert_ne!(now, "n1");
        let views = cp.store.read_local(|st| st.node_views());
        match start(&cp, stale, &auto(), Some("n1"), views).await {
            Err(Ended::Left { now_on }) => {
                assert!(now_on.contains(&format!("runs on node {now}")), "{now_on}")
            }
            Err(Ended::Failed { error, .. }) => panic!("failed: {}", error.0.message),
            Ok(_) => panic!("recorded a migration of a sandbox that left"),
        }
    }

    /// A source copy still running as (possibly) mid-pre-copy, the record's
    /// migration past its deadline.
    async fn stalled_migration(cp: &ControlPlane) -> Migration {
        for n in ["n1", "n2"] {
            cluster::node(cp, n, 64, 65536).await;
        }
        cluster::sandbox(cp, "s1", "n1").await;
        let now = now_ms();
        let r = cp
            .store
            .write(Command::StartMigration {
                id: "s1".into(),
                migration: Migration {
                    id: "att1".into(),
                    from: "n1".into(),
                    to: "n2".into(),
                    phase: "preparing".into(),
                    generation: 0,
                    started_ms: now - 10_000,
                    updated_ms: now - 10_000,
                    error: None,
                    progress: None,
                    stall_ms: Some(1_000),
                    source_gone_ms: None,
                    unconfirmed: false,
                    target_lost: false,
                    agent_id: None,
                },
            })
            .await
            .unwrap();
        assert!(matches!(r, Reply::Sandbox { .. }), "{r:?}");
        cp.store
            .write(Command::MigrationPhase {
                id: "s1".into(),
                migration: "att1".into(),
                phase: "precopy".into(),
                error: None,
                progress: None,
                at_ms: now - 5_000,
            })
            .await
            .unwrap();
        // The source's heartbeat: its copy runs and its outgoing migration
        // is still in progress (it may still switch over and commit).
        cp.store
            .write(Command::Heartbeat {
                node: "n1".into(),
                instance: "inst-n1".into(),
                at_ms: now,
                observed: Default::default(),
                report: Some(vec![hearth_store::CopyReport {
                    agent_id: "a-s1".into(),
                    status: "running".into(),
                    error: None,
                    owner: Some("s1@0".into()),
                    paused: false,
                    migrating: true,
                }]),
                grace_ms: 60_000,
            })
            .await
            .unwrap();
        cp.store
            .read_local(|st| st.sandboxes["s1"].migration.clone().unwrap())
            .as_ref()
            .clone()
    }

    /// Hole 1 (migsafe): a migration past its deadline whose source still
    /// migrates is not recorded aborted on the deadline alone; the leader
    /// asks the source to cancel, and a source that does not answer leaves
    /// the record `unresolved` (the source may still commit), never aborted.
    #[tokio::test]
    async fn a_deadline_with_an_unreachable_source_leaves_the_migration_unresolved() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        let m = stalled_migration(&cp).await;
        assert_ne!(
            m.phase, "aborted",
            "the deadline aborted it without asking the source: {m:?}"
        );
        resolve_orphans(&cp).await;
        let m = cp
            .store
            .read_local(|st| st.sandboxes["s1"].migration.clone().unwrap());
        assert_eq!(m.phase, "unresolved", "{m:?}");
        let why = m.error.clone().unwrap_or_default();
        assert!(why.contains("node n1") && why.contains("cancel"), "{why}");
        let rec = cp.store.read_local(|st| st.sandboxes["s1"].clone());
        assert_eq!(rec.node, "n1");
    }

    /// `hearth migrate --abort` (mig3): the record changes only on the
    /// source's answer to the cancel. A source that does not answer leaves
    /// the migration as it was (503, naming the source): it may still commit,
    /// so it is never recorded aborted on the request alone. A sandbox with
    /// no migration in progress is refused (409).
    #[tokio::test]
    async fn an_abort_is_recorded_only_on_the_sources_answer() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        let before = stalled_migration(&cp).await;
        let Err(HttpError(e)) = abort(State(cp.clone()), Path("s1".into())).await else {
            panic!("an abort the source never confirmed succeeded");
        };
        assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
        assert!(
            e.message.contains("node n1") && e.message.contains("nothing was changed"),
            "{}",
            e.message
        );
        let m = cp
            .store
            .read_local(|st| st.sandboxes["s1"].migration.clone().unwrap());
        assert_eq!(
            (m.phase.as_str(), m.id.as_str()),
            (before.phase.as_str(), "att1")
        );
        cluster::sandbox(&cp, "s2", "n1").await;
        let Err(HttpError(e)) = abort(State(cp.clone()), Path("s2".into())).await else {
            panic!("an abort without a migration succeeded");
        };
        assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
        assert!(
            e.message.contains("no migration in progress"),
            "{}",
            e.message
        );
    }

    /// Issue 7 review M2: an `auto` target chosen on views taken before
    /// another migration reserved its room is refused by the state machine;
    /// the migration chooses again without that node instead of failing.
    #[tokio::test]
    async fn an_auto_target_whose_room_was_taken_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let cp = cluster::plane(dir.path()).await;
        cluster::node(&cp, "n1", 64, 65536).await;
        // n2 has room for exactly one sandbox, so bin-packing prefers it.
        cluster::node(&cp, "n2", 1, 64).await;
        cluster::node(&cp, "n3", 64, 65536).await;
        cluster::sandbox(&cp, "s1", "n1").await;
        cluster::sandbox(&cp, "s2", "n1").await;
        let views = cp.store.read_local(|st| st.node_views());
        let rec2 = cp.store.read_local(|st| st.sandboxes["s2"].clone());
        let others: Vec<_> = views.iter().filter(|v| v.id != "n1").cloned().collect();
        assert_eq!(
            hearth_sched::place(&others, &rec2.request, Strategy::BinPack)
                .unwrap()
                .id,
            "n2"
        );
        // Another migration takes n2's room meanwhile.
        let rec1 = cp.store.read_local(|st| st.sandboxes["s1"].clone());
        let to_n2 = MigrateSandbox {
            target: "n2".into(),
            ..Default::default()
        };
        let r = start(&cp, rec1, &to_n2, Some("n1"), views.clone()).await;
        assert!(r.is_ok(), "s1 to n2 not recorded");
        match start(&cp, rec2, &auto(), Some("n1"), views).await {
            Ok(rec) => assert_eq!(rec.migration.unwrap().to, "n3"),
            Err(Ended::Failed { error, .. }) => panic!("failed: {}", error.0.message),
            Err(Ended::Left { now_on }) => panic!("left: {now_on}"),
        }
    }
}
