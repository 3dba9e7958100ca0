//! QEMU native live migration over a unix-socket stream.
//!
//! Source: capabilities `events`, `auto-converge`, `block` + `zero-blocks` (the
//! disk moves in the same stream; with `overlay_only`, parameter
//! `block-incremental` sends only the qcow2 overlay) and `pause-before-switchover` (the caller quiesces
//! its guest channel while the VM is paused, before the final pass); then
//! `migrate unix:PATH`, polling `query-migrate` for progress and judging
//! convergence with [`crate::migration::judge`]. Any failure before completion
//! cancels, and the source VM runs again.
//!
//! Target: the same command line plus `-incoming defer`, then
//! `migrate-incoming unix:PATH`; [`QemuVm::wait_incoming`] waits for the stream
//! to complete. The VM stays paused (`-S`) until the caller starts it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use super::{QemuVm, QemuVmm};
use crate::config::{option_path, VmConfig};
use crate::error::VmmError;
use crate::migration::{judge, MigrationParams, MigrationProgress, MigrationState, Verdict};

/// How often progress is sampled during pre-copy.
const POLL: Duration = Duration::from_millis(100);
/// Bound on the caller's work at the switch-over gate.
const SWITCHOVER_GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on QEMU finishing a cancel.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a VM whose migration completed leaving `finish-migrate`.
const FINISH_MIGRATE_BOUND: Duration = Duration::from_secs(5);
/// The longest pause between two `query-status` polls in `finish-migrate`.
const FINISH_MIGRATE_POLL_MAX: Duration = Duration::from_millis(5);

/// The pause before `query-status` poll `n` (from 0) while the run state is
/// `finish-migrate`: 1, 2, 4 ms, then 5 ms (it usually ends within a few ms;
/// longer under load, when polling every 1 ms only adds to the load).
fn finish_migrate_backoff(n: u32) -> Duration {
    Duration::from_millis(1u64 << n.min(3)).min(FINISH_MIGRATE_POLL_MAX)
}

/// A point where the source VM is paused before the final pass: the caller is
/// told (`reached`) and answers whether to go on (`proceed`).
pub struct SwitchoverGate {
    pub reached: oneshot::Sender<()>,
    pub proceed: oneshot::Receiver<bool>,
}

impl QemuVmm {
    /// Starts a VM that waits on `incoming` (a unix socket it creates) for a
    /// migration stream instead of booting. Same config as the source VM.
    pub async fn create_incoming_qemu(
        &self,
        cfg: &VmConfig,
        incoming: &Path,
    ) -> Result<QemuVm, VmmError> {
        self.create_incoming_sized(cfg, incoming, None).await
    }

    /// [`QemuVmm::create_incoming_qemu`]; with `disk_bytes`, the disk is a
    /// standalone empty qcow2 of that size (no backing file) instead of an
    /// overlay over `cfg.rootfs`: the whole-disk block migration fills it, so
    /// the target needs neither the source's base nor a template's or
    /// snapshot's layer, only a disk of the same size.
    pub async fn create_incoming_sized(
        &self,
        cfg: &VmConfig,
        incoming: &Path,
        disk_bytes: Option<u64>,
    ) -> Result<QemuVm, VmmError> {
        let uri = format!("unix:{}", option_path(&cfg.id, incoming)?);
        let extra = vec!["-incoming".into(), "defer".into()];
        let vm = match disk_bytes {
            None => self.create_with_args(cfg, &extra).await?,
            Some(bytes) => {
                let ram = match cfg.memory {
                    crate::config::GuestMemory::Anonymous => super::RamBacking::Anonymous,
                    crate::config::GuestMemory::SharedFile => super::RamBacking::Shared(
                        super::Layout::new(&super::absolute(&cfg.id, &cfg.dir)?).ram,
                    ),
                };
                self.launch(cfg, super::Disk::Blank(bytes), ram, extra)
                    .await?
            }
        };
        let setup = async {
            set_capabilities(&vm, &[("events", true)]).await?;
            vm.qmp()
                .execute("migrate-incoming", json!({ "uri": uri }))
                .await
        };
        if let Err(e) = setup.await {
            let _ = crate::Vm::kill(&vm).await;
            let _ = vm.wait_timeout(Duration::from_secs(10)).await;
            return Err(e);
        }
        Ok(vm)
    }
}

async fn set_capabilities(vm: &QemuVm, caps: &[(&str, bool)]) -> Result<(), VmmError> {
    let list: Vec<Value> = caps
        .iter()
        .map(|(c, on)| json!({ "capability": c, "state": on }))
        .collect();
    vm.qmp()
        .execute("migrate-set-capabilities", json!({ "capabilities": list }))
        .await
        .map(|_| ())
}

/// `query-migrate`'s answer as a [`MigrationProgress`].
pub fn progress_from_query(q: &Value) -> MigrationProgress {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let ram = &q["ram"];
    let disk = &q["disk"];
    let state = match q["status"].as_str().unwrap_or("") {
        "active" => MigrationState::Active,
        "pre-switchover" | "device" => MigrationState::Switchover,
        "completed" => MigrationState::Completed,
        "failed" | "cancelling" | "cancelled" => MigrationState::Failed,
        _ => MigrationState::Setup,
    };
    MigrationProgress {
        state,
        elapsed_ms: n(&q["total-time"]),
        ram_total: n(&ram["total"]),
        bytes_sent: n(&ram["transferred"]) + n(&disk["transferred"]),
        ram_remaining: n(&ram["remaining"]),
        dirty_pages_rate: n(&ram["dirty-pages-rate"]),
        iterations: n(&ram["dirty-sync-count"]),
        throughput_bps: (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64,
        cpu_throttle_percent: n(&q["cpu-throttle-percentage"]),
        downtime_ms: q["downtime"].as_u64(),
        disk_transferred: n(&disk["transferred"]),
        disk_remaining: n(&disk["remaining"]),
        error: q["error-desc"].as_str().map(str::to_string),
    }
}

impl QemuVm {
    /// Migrates this VM into the stream at `dest`. On `Ok` the VM is paused for
    /// good and its state is on the other end; on `Err` it runs again.
    pub async fn migrate_out_qemu(
        &self,
        dest: &Path,
        params: &MigrationParams,
        progress: &watch::Sender<MigrationProgress>,
        gate: Option<SwitchoverGate>,
    ) -> Result<MigrationProgress, VmmError> {
        let uri = format!("unix:{}", option_path(&self.id, dest)?);
        set_capabilities(
            self,
            &[
                ("events", true),
                ("auto-converge", params.auto_converge),
                ("block", true),
                ("zero-blocks", true),
                ("pause-before-switchover", gate.is_some()),
                // why: capabilities live as long as the QEMU process; a snapshot
                // saved (or restored) earlier left this on, which would keep the
                // RAM out of the stream.
                ("x-ignore-shared", false),
            ],
        )
        .await?;
        self.qmp()
            .execute(
                "migrate-set-parameters",
                json!({
                    "downtime-limit": params.downtime_limit.as_millis() as u64,
                    "max-bandwidth": params.max_bandwidth,
                    "block-incremental": params.overlay_only,
                    "cpu-throttle-initial": 30,
                    "cpu-throttle-increment": 15,
                }),
            )
            .await?;
        let mut events = self.qmp().subscribe();
        self.qmp().execute("migrate", json!({ "uri": uri })).await?;
        let started = Instant::now();
        let mut gate = gate;
        let mut continued = false;
        let mut tick = tokio::time::interval(POLL);
        loop {
            let mut at_gate = false;
            let mut completed = false;
            tokio::select! {
                ev = events.recv() => match ev {
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(VmmError::QmpClosed { id: self.id.clone(), awaited: "migration to finish".into() });
                    }
                    // why: the event says where it stands; at the gate the
                    // guest is paused, so no `query-migrate` round trip
                    // before the caller is told (issue 7).
                    Ok(ev) if ev.name == "MIGRATION" => {
                        let status = ev.data["status"].as_str();
                        at_gate = status == Some("pre-switchover");
                        completed = status == Some("completed");
                    }
                    _ => {}
                },
                _ = tick.tick() => {}
            }
            if at_gate && !continued {
                continued = true;
                self.pass_gate(gate.take(), progress).await?;
                continue;
            }
            // why: from the stop on the guest is paused until the caller's
            // commit; its `query-migrate` round trip (0.3–5 ms here) is not
            // spent in the pause: the caller reads the final statistics with
            // `migration_stats` once the guest runs again (issue 7). With a
            // gate or without one: `completed` is final either way.
            if completed {
                let mut p = progress.borrow().clone();
                p.state = MigrationState::Completed;
                p.elapsed_ms = started.elapsed().as_millis() as u64;
                progress.send_replace(p.clone());
                tracing::debug!(vm = %self.id, "pause: source completed seen");
                return Ok(p);
            }
            let q = self.qmp().execute("query-migrate", Value::Null).await?;
            let mut p = progress_from_query(&q);
            if p.elapsed_ms == 0 {
                p.elapsed_ms = started.elapsed().as_millis() as u64;
            }
            progress.send_replace(p.clone());
            match q["status"].as_str().unwrap_or("") {
                "completed" => {
                    // why: not settled out of `finish-migrate` here (2–13 ms
                    // of the guest's pause, issue 7): only a resume of this
                    // VM cares, and it waits for that itself.
                    tracing::debug!(vm = %self.id, "pause: source completed seen");
                    return Ok(p);
                }
                "failed" | "cancelled" => {
                    let why = p.error.clone().unwrap_or_else(|| "cancelled".into());
                    return Err(self.after_failure(why, &p, progress).await);
                }
                // why: query-migrate may still say pre-switchover just after migrate-continue.
                "pre-switchover" if !continued => {
                    continued = true;
                    self.pass_gate(gate.take(), progress).await?;
                }
                _ => {
                    if let Verdict::GiveUp(why) = judge(&p, params) {
                        return Err(self.cancel(why, progress).await);
                    }
                }
            }
        }
    }

    /// At `pre-switchover` (the VM paused before the final pass): tells the
    /// caller's `gate`, if any, and continues when it says go; else cancels
    /// (the VM runs again) and answers why.
    async fn pass_gate(
        &self,
        gate: Option<SwitchoverGate>,
        progress: &watch::Sender<MigrationProgress>,
    ) -> Result<(), VmmError> {
        tracing::debug!(vm = %self.id, "pause: pre-switchover seen");
        let go = match gate {
            Some(g) => {
                let _ = g.reached.send(());
                matches!(
                    tokio::time::timeout(SWITCHOVER_GATE_TIMEOUT, g.proceed).await,
                    Ok(Ok(true))
                )
            }
            None => true,
        };
        if !go {
            return Err(self
                .cancel("the switch-over was refused by the caller".into(), progress)
                .await);
        }
        tracing::debug!(vm = %self.id, "pause: continue sent");
        self.qmp()
            .execute("migrate-continue", json!({ "state": "pre-switchover" }))
            .await?;
        tracing::debug!(vm = %self.id, "pause: continue answered");
        Ok(())
    }

    /// why: QEMU reports `completed` a moment before the run state leaves
    /// `finish-migrate`; a snapshot's callers want it settled.
    pub(crate) async fn settle_after_completion(&self) {
        if let Ok(status) = self.qmp().execute("query-status", Value::Null).await {
            let _ = self.wait_out_finish_migrate(status).await;
        }
    }

    /// While `status` (a `query-status` answer) says `finish-migrate`, polls
    /// `query-status` again (one QMP call a poll, every 1, 2, 4, then 5 ms:
    /// [`finish_migrate_backoff`]) for up to [`FINISH_MIGRATE_BOUND`];
    /// answers the last status. QEMU 7.2 sends no event when it moves the run
    /// state on to `postmigrate` (a bare run-state change, no STOP/RESUME), so
    /// there is nothing to wait on instead. A VM still there at the bound is
    /// logged (a warning naming it) and its status answered as it is.
    pub(crate) async fn wait_out_finish_migrate(
        &self,
        mut status: Value,
    ) -> Result<Value, VmmError> {
        let started = Instant::now();
        let mut polls = 0;
        while status["status"].as_str() == Some("finish-migrate") {
            if started.elapsed() >= FINISH_MIGRATE_BOUND {
                tracing::warn!(
                    vm = %self.id,
                    polls,
                    "the run state is still finish-migrate {FINISH_MIGRATE_BOUND:?} after the migration completed; going on without waiting longer"
                );
                break;
            }
            tokio::time::sleep(finish_migrate_backoff(polls)).await;
            polls += 1;
            status = self.qmp().execute("query-status", Value::Null).await?;
        }
        Ok(status)
    }

    /// Cancels a running migration and makes sure the VM runs again.
    pub async fn cancel_migration_qemu(&self) -> Result<(), VmmError> {
        let mut events = self.qmp().subscribe();
        self.qmp().execute("migrate_cancel", Value::Null).await?;
        let deadline = Instant::now() + CANCEL_TIMEOUT;
        loop {
            let q = self.qmp().execute("query-migrate", Value::Null).await?;
            match q["status"].as_str().unwrap_or("") {
                "cancelling" | "active" | "pre-switchover" | "device" | "setup" => {}
                _ => break,
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    id: self.id.clone(),
                    awaited: "the migration to be cancelled".into(),
                    after: CANCEL_TIMEOUT,
                    log_tail: String::new(),
                });
            }
            let _ = tokio::time::timeout(POLL, events.recv()).await;
        }
        crate::Vm::resume(self).await
    }

    async fn cancel(&self, why: String, progress: &watch::Sender<MigrationProgress>) -> VmmError {
        tracing::warn!(vm = %self.id, "cancelling migration: {why}");
        if let Err(e) = self.cancel_migration_qemu().await {
            return e;
        }
        let p = progress.borrow().clone();
        self.after_failure(why, &p, progress).await
    }

    async fn after_failure(
        &self,
        why: String,
        p: &MigrationProgress,
        progress: &watch::Sender<MigrationProgress>,
    ) -> VmmError {
        // why: QEMU restarts a source that was running, but make it certain.
        let resumed = crate::Vm::resume(self).await;
        let mut p = p.clone();
        p.state = MigrationState::Failed;
        p.error = Some(why.clone());
        progress.send_replace(p);
        match resumed {
            Ok(()) => VmmError::MigrationFailed {
                id: self.id.clone(),
                reason: why,
            },
            Err(e) => e,
        }
    }

    /// On a VM made by [`QemuVmm::create_incoming_qemu`]: waits until the whole
    /// stream has arrived (the VM is then paused, ready to start).
    pub async fn wait_incoming(&self, timeout: Duration) -> Result<(), VmmError> {
        // why: its `completed` event came already (the usual case at the
        // commit): no `query-migrate` round trip in the guest's pause (issue 7).
        if self
            .qmp()
            .run_state_times()
            .migration_completed_us
            .is_some()
        {
            return Ok(());
        }
        let mut events = self.qmp().subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.qmp().execute("query-migrate", Value::Null).await?;
            match q["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmmError::MigrationFailed {
                        id: self.id.clone(),
                        reason: format!(
                            "incoming stream failed: {}",
                            q["error-desc"].as_str().unwrap_or("see qemu.log")
                        ),
                    })
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmmError::Timeout {
                    id: self.id.clone(),
                    awaited: "the incoming migration stream to complete".into(),
                    after: timeout,
                    log_tail: crate::log_tail(&self.layout.qemu_log, 2000),
                });
            }
            let _ = tokio::time::timeout(POLL.min(deadline - now), events.recv()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_maps_to_progress() {
        let q = json!({
            "status": "completed", "total-time": 250, "downtime": 3,
            "ram": {"total": 268435456u64, "transferred": 1000, "remaining": 0,
                    "dirty-pages-rate": 12, "dirty-sync-count": 4, "mbps": 800.0},
            "disk": {"transferred": 24, "remaining": 0, "total": 100},
            "cpu-throttle-percentage": 30
        });
        let p = progress_from_query(&q);
        assert_eq!(p.state, MigrationState::Completed);
        assert_eq!(p.bytes_sent, 1024);
        assert_eq!(p.iterations, 4);
        assert_eq!(p.downtime_ms, Some(3));
        assert_eq!(p.throughput_bps, 100_000_000);
        assert_eq!(p.cpu_throttle_percent, 30);
        let p = progress_from_query(&json!({"status": "pre-switchover"}));
        assert_eq!(p.state, MigrationState::Switchover);
        let p = progress_from_query(&json!({"status": "failed", "error-desc": "boom"}));
        assert_eq!(
            (p.state, p.error.as_deref()),
            (MigrationState::Failed, Some("boom"))
        );
    }

    /// review9 F4: the finish-migrate wait backs off from 1 ms to 5 ms
    /// (it polled every 1 ms, with two QMP calls a poll, for up to 5 s).
    #[test]
    fn the_finish_migrate_wait_backs_off_from_1_to_5_ms() {
        let ms = |n| finish_migrate_backoff(n).as_millis();
        assert_eq!((0..6).map(ms).collect::<Vec<_>>(), [1, 2, 4, 5, 5, 5]);
        assert_eq!(ms(u32::MAX), 5);
        // The bound is reached after about a thousand polls, not five thousand.
        let mut spent = Duration::ZERO;
        let mut polls = 0u32;
        while spent < FINISH_MIGRATE_BOUND {
            spent += finish_migrate_backoff(polls);
            polls += 1;
        }
        assert_eq!(polls, 1002);
    }
}
