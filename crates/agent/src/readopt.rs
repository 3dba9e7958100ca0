//! After a hearthd restart: take over the sandboxes whose VMs still run.
//!
//! A running sandbox's VM is adopted by its recorded pid and process start time
//! (`hearth_vmm::Vmm::adopt`); the guest channel is resumed (`GuestConn::resume`)
//! from the output offset the log on disk holds, so the guest replays exactly
//! what the log lacks, including an Exit that happened while hearthd was down.
//! Then the sandbox's lifecycle task runs again as if it had never stopped.
//! A VM that is gone is reported lost with the reason; one that cannot be
//! taken over is killed (by pid and start time) and reported lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_api::stream::{Decoder, Record};
use hearth_api::{ExitInfo, SandboxStatus, StartPath};
use hearth_proto::ResumeSession;
use hearth_vmm::{Vm, Vmm, VmmError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::guest_conn::GuestConn;
use crate::restore::NicMode;
use crate::sandbox::{lock, now_ms, Agent, Entry};

/// `workload.json` in a sandbox dir: how to find the main workload in the guest.
pub(crate) const WORKLOAD_FILE: &str = "workload.json";
const WORKLOAD_VERSION: u32 = 1;
/// Bound on connecting to a running VM's agent socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a running guest answering a resume (TCG guests are slow).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections tried before a running VM whose guest does not resume is killed.
const RESUME_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const RESUME_RETRY: Duration = Duration::from_secs(1);

/// `outcome.json` in a sandbox dir: how the workload ended, saved before its
/// VM is shut down, so a hearthd that dies during the teardown loses nothing.
const OUTCOME_FILE: &str = "outcome.json";
const OUTCOME_VERSION: u32 = 1;
/// Sandboxes recovered at once after a restart.
pub(crate) const RECOVER_CONCURRENCY: usize = 4;

/// Writes `dir/name` atomically (temp file, fsync, rename; the caller
/// fsyncs `dir` when the name must be durable too).
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use crate::durable::{self, DirSync};
    durable::write(
        &dir.join(name),
        data,
        durable::MODE_DEFAULT,
        DirSync::ByCaller,
    )
}

/// The main workload's guest session, saved when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkloadRecord {
    pub version: u32,
    /// Guest session id of the main workload.
    pub session: u32,
    /// It was started with stdin open.
    pub stdin: bool,
    /// Stream offset (in the guest's count of the session's output) of the
    /// output log's first byte: non-zero when the session was continued from
    /// a snapshot, whose earlier output is not in this sandbox's log.
    #[serde(default)]
    pub base: u64,
    /// The VM has a network device (with or without a network behind it), so
    /// its snapshots must be restored with one.
    #[serde(default)]
    pub nic: bool,
    /// How that device is connected. Absent in records of older hearthd, whose
    /// VMs may have had either layout: a re-adoption reads the mode off the
    /// QEMU command line in vm.json (`hearth_vmm::recorded_net_hub`) instead.
    #[serde(default)]
    pub nic_mode: NicMode,
    /// The VM came in by a live migration whose commit saved these records
    /// (fsynced) before it resumed the VM (`Agent::incoming_commit`): a
    /// hearthd that stopped between the two finds it still paused, so a
    /// re-adoption resumes it (`cont`, a no-op on a running VM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migrated_in: bool,
}

impl WorkloadRecord {
    pub(crate) fn new(session: u32, stdin: bool, base: u64) -> WorkloadRecord {
        WorkloadRecord {
            version: WORKLOAD_VERSION,
            session,
            stdin,
            base,
            nic: false,
            nic_mode: NicMode::Hub,
            migrated_in: false,
        }
    }

    /// Writes `dir/workload.json` atomically.
    pub(crate) fn store(&self, dir: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomic(dir, WORKLOAD_FILE, &data)
    }

    pub(crate) fn load(dir: &Path) -> Result<WorkloadRecord, String> {
        let path = dir.join(WORKLOAD_FILE);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let rec: WorkloadRecord = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is malformed: {e}", path.display()))?;
        if rec.version != WORKLOAD_VERSION {
            return Err(format!(
                "{} has version {} (this build reads {WORKLOAD_VERSION})",
                path.display(),
                rec.version
            ));
        }
        Ok(rec)
    }
}

/// How a sandbox's workload ended, saved before its teardown (`outcome.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedOutcome {
    pub version: u32,
    pub status: SandboxStatus,
    pub exit: Option<ExitInfo>,
    pub error: Option<String>,
}

impl SavedOutcome {
    pub(crate) fn new(
        status: SandboxStatus,
        exit: Option<ExitInfo>,
        error: Option<String>,
    ) -> SavedOutcome {
        SavedOutcome {
            version: OUTCOME_VERSION,
            status,
            exit,
            error,
        }
    }

    /// Writes `dir/outcome.json` atomically.
    pub(crate) fn store(&self, dir: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomic(dir, OUTCOME_FILE, &data)
    }

    /// The saved outcome, if the teardown had begun.
    pub(crate) fn load(dir: &Path) -> Result<Option<SavedOutcome>, String> {
        let path = dir.join(OUTCOME_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let o: SavedOutcome = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is malformed: {e}", path.display()))?;
        if o.version != OUTCOME_VERSION || !o.status.is_terminal() {
            return Err(format!(
                "{} has version {} and status {:?} (this build reads version {OUTCOME_VERSION}, terminal statuses)",
                path.display(),
                o.version,
                o.status
            ));
        }
        Ok(Some(o))
    }

    /// Forgets the saved outcome once the record holds it.
    pub(crate) fn clear(dir: &Path) {
        let path = dir.join(OUTCOME_FILE);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Where the output log leaves off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogEnd {
    /// Workload output bytes (stdout and stderr payloads) the log holds.
    pub stream_bytes: u64,
    /// The size limit was reached: later output is discarded anyway.
    pub truncated: bool,
}

/// Reads the output log, cuts off a record torn by a crash mid-write, and
/// says how much workload output it holds. A missing log holds nothing.
pub(crate) fn log_end(path: &Path) -> std::io::Result<LogEnd> {
    use std::io::Read;
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LogEnd {
                stream_bytes: 0,
                truncated: false,
            })
        }
        Err(e) => return Err(e),
    };
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 256 * 1024];
    let (mut total, mut stream_bytes) = (0u64, 0u64);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        dec.push(&buf[..n]);
        loop {
            match dec.next_record() {
                Ok(Some(Record::Stdout(b) | Record::Stderr(b))) => stream_bytes += b.len() as u64,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "{} is corrupt: {e}",
                        path.display()
                    )))
                }
            }
        }
    }
    // why: the marker, not the notice's text (a workload can print that).
    let truncated = crate::output_log::truncated_marker(path).exists();
    let whole = total - dec.pending() as u64;
    if whole < total {
        tracing::warn!(log = %path.display(), torn = total - whole, "cutting a torn record off the output log");
        f.set_len(whole)?;
    }
    Ok(LogEnd {
        stream_bytes,
        truncated,
    })
}

/// Why a sandbox that was running is not taken over.
enum NotAdopted {
    /// The VM ended while hearthd was down.
    Gone(String),
    /// The VM runs but cannot be taken over; it must be killed.
    Broken(String),
    /// A migration moved it to another node (its target runs it): the VM
    /// here is released and the sandbox ends `stopped`.
    Moved(String),
    /// A migration's outcome cannot be known (its target does not answer):
    /// the VM here is left paused, never killed blindly.
    Unresolved(String),
}

/// The migration recorded in `dir` (sandbox `id`) with the target's token;
/// else what its absence means ([`MigrationCheck::None`]), or an unreadable
/// record's ([`MigrationCheck::Unresolved`]).
fn recorded_migration(
    dir: &Path,
    id: &str,
) -> Result<(crate::migration::phase::MigrationRecord, String), MigrationCheck> {
    match crate::migration::load_record(dir) {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(MigrationCheck::None),
        // why: a record that was written is a migration that may have been
        // under way, even committed: resuming here could run a second copy,
        // releasing this one could lose the only one. Kept paused, reported.
        Err(why) => Err(MigrationCheck::Unresolved(format!(
            "hearthd stopped during a migration of sandbox {id} whose record cannot be read ({why}); the sandbox may run on the migration's target. Its VM here is kept paused: check the other nodes, then remove this copy (`hearth rm -f {id}`) or the other one"
        ))),
    }
}

/// What a migration that was in progress when hearthd died means now.
#[derive(Debug)]
enum MigrationCheck {
    /// No migration, or one that ended with the sandbox here.
    None,
    /// The VM here must run (the target never got, or refused, the commit).
    ResumeHere,
    /// The target runs the sandbox.
    Moved(String),
    /// The target did not answer whether it committed.
    Unresolved(String),
}

impl Agent {
    /// Takes over, or settles, a sandbox a previous hearthd left non-terminal.
    /// True when it runs on under this hearthd.
    pub(crate) async fn recover_sandbox(&self, entry: &Arc<Entry>) -> bool {
        let rec = entry.snapshot();
        let vm_dir = entry.dir.join("vm");
        // why: the outcome is saved before the teardown starts, so a hearthd that
        // died while shutting the VM down still reports how the workload ended.
        match SavedOutcome::load(&entry.dir) {
            Ok(Some(o)) => {
                self.kill_leftover(&rec.id, &vm_dir);
                let _ = hearth_vmm::destroy(&vm_dir);
                self.settle_migration(entry);
                self.drop_network(&rec.id).await;
                tracing::info!(sandbox = %rec.id, status = ?o.status, "hearthd had stopped during the teardown; recorded the saved outcome");
                self.finish(entry, o.status, o.exit, o.error);
                return false;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(sandbox = %rec.id, "ignoring the saved outcome: {e}"),
        }
        let reason = if matches!(
            rec.status,
            SandboxStatus::Running | SandboxStatus::Recovering
        ) {
            match self.readopt(entry, &vm_dir).await {
                Ok(()) => {
                    tracing::info!(sandbox = %rec.id, "re-adopted the running VM after a restart");
                    return true;
                }
                Err(NotAdopted::Gone(why)) => {
                    format!("its VM ended while hearthd was down ({why}); the workload's exit status is unknown")
                }
                Err(NotAdopted::Broken(why)) => {
                    format!("hearthd restarted and could not take its VM over ({why}); the VM was killed")
                }
                Err(NotAdopted::Moved(node)) => {
                    self.kill_leftover(&rec.id, &vm_dir);
                    let _ = hearth_vmm::destroy(&vm_dir);
                    // why: its address moved with it (the lease is kept).
                    self.hand_off_net(entry).await;
                    self.settle_migration(entry);
                    self.finish(
                        entry,
                        SandboxStatus::Stopped,
                        None,
                        Some(format!("migrated to {node}")),
                    );
                    // why: as after a migration this hearthd finished: a fork's
                    // snapshot nothing here uses any more goes (the target holds
                    // no reference to it).
                    if let (Some(hearth_api::StartPath::Snapshot), Some(from)) =
                        (rec.start_path, &rec.started_from)
                    {
                        self.remove_fork_snapshot_if_unused(from).await;
                    }
                    return false;
                }
                Err(NotAdopted::Unresolved(why)) => {
                    tracing::error!(sandbox = %rec.id, "{why}");
                    // why: an end is shown even when it cannot be saved (see `Entry::update`, which logs it).
                    let _ = entry.update(|r| {
                        r.status = SandboxStatus::Lost;
                        r.finished_ms = Some(now_ms());
                        r.error = Some(why);
                    });
                    entry.finished.send_replace(true);
                    return false;
                }
            }
        } else {
            "hearthd stopped while the sandbox was being created; its VM was stopped".to_string()
        };
        // Never leave a VM behind: kill it by its recorded pid and start time.
        self.kill_leftover(&rec.id, &vm_dir);
        let tail = crate::sandbox::console_tail(&vm_dir.join("console.log"));
        let _ = hearth_vmm::destroy(&vm_dir);
        self.settle_migration(entry);
        self.drop_network(&rec.id).await;
        tracing::warn!(sandbox = %rec.id, "lost: {reason}");
        // why: an end is shown even when it cannot be saved (see `Entry::update`, which logs it).
        let _ = entry.update(|r| {
            r.status = SandboxStatus::Lost;
            r.finished_ms = Some(now_ms());
            r.error = Some(format!("{reason}{tail}"));
        });
        entry.finished.send_replace(true);
        false
    }

    /// A sandbox the control plane fenced while hearthd was down (moved
    /// elsewhere, deleted): its VM is not resumed here but stopped, and its
    /// network removed; it ends `stopped` with the control plane's reason.
    /// Its address is released unless a migration may have moved it (see
    /// [`Agent::settle_migration`]): whatever the control plane's reason, a
    /// record before `committing` says the commit was never sent (it is sent
    /// only once that record is on disk), so no target runs with it.
    pub(crate) async fn recover_fenced(&self, entry: &Arc<Entry>, reason: &str) {
        // why: a copy whose workload had already ended keeps its exit code;
        // recover_sandbox settles it from outcome.json without resuming anything.
        if matches!(SavedOutcome::load(&entry.dir), Ok(Some(_))) {
            self.recover_sandbox(entry).await;
            return;
        }
        let rec = entry.snapshot();
        let vm_dir = entry.dir.join("vm");
        tracing::warn!(sandbox = %rec.id, "not taking over a copy the control plane no longer assigns here: {reason}");
        self.kill_leftover(&rec.id, &vm_dir);
        let _ = hearth_vmm::destroy(&vm_dir);
        self.settle_migration(entry);
        self.drop_network(&rec.id).await;
        self.finish(
            entry,
            SandboxStatus::Stopped,
            None,
            Some(format!("stopped by the control plane: {reason}")),
        );
    }

    /// Kills the VM recorded in `vm_dir` if it still runs (pid and start time).
    fn kill_leftover(&self, id: &str, vm_dir: &Path) {
        match hearth_vmm::kill_recorded(vm_dir, Duration::from_secs(10)) {
            Ok(true) => tracing::warn!(sandbox = %id, "killed a VM that is not re-adopted"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(sandbox = %id, "cannot stop the VM in {}: {e}", vm_dir.display())
            }
        }
    }

    /// A copy settled during recovery (it ends here, or its VM is released
    /// to the migration's target): nothing of its migration is left to do,
    /// so its record (and the target's token) is forgotten. Called before
    /// its network is dropped: a migration whose record says it had not
    /// committed never moved the address, so the lease marker written from
    /// the switch-over gate on is cleared and the release gives the address
    /// back (review13 F4, review14 F6: else it stayed leased for good). One
    /// that may have committed keeps it (the target may run with it), and so
    /// does a marker without a record (a completed migration's, its record
    /// forgotten) or beside an unreadable one. The marker goes first, the
    /// record last (review15 F3): a crash between leaves the record, and the
    /// next start settles it again.
    fn settle_migration(&self, entry: &Entry) {
        if let Ok(Some((m, _))) = crate::migration::load_record(&entry.dir) {
            if !m.phase.may_have_committed() {
                crate::migration::net::clear_lease_moved(
                    &self.inner.cfg.data_dir,
                    &entry.dir,
                    &entry.snapshot().id,
                );
            }
        }
        crate::migration::forget_record(&entry.dir);
    }

    /// Removes the network of a sandbox that does not run any more (tap,
    /// programs, route, NAT entry) and gives its address back.
    pub(crate) async fn drop_network(&self, id: &str) {
        let Some(net) = self.net() else { return };
        let leased = net.leases().contains_key(id);
        let id2 = id.to_string();
        match tokio::task::spawn_blocking(move || net.teardown(&id2)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(sandbox = %id, "removing its network: {e}"),
            Err(e) => tracing::warn!(sandbox = %id, "removing its network panicked: {e}"),
        }
        if leased {
            self.release_lease(&self.sandbox_dir(id), id).await;
        }
    }

    /// The reference a sandbox started from a template or snapshot holds on it.
    fn source_key(rec: &hearth_api::Sandbox) -> Option<String> {
        let name = rec.started_from.as_deref()?;
        match rec.start_path? {
            StartPath::Template | StartPath::Pool => Some(crate::restore::template_key(name)),
            StartPath::Snapshot => Some(crate::restore::snapshot_key(name)),
            StartPath::Cold => None,
        }
    }

    /// Settles a migration recorded in `migration.json` that had not ended
    /// when hearthd died, by the phase machine's recovery actions: before the
    /// commit the VM here runs on (the target's incoming VM is removed); after
    /// it, the target is asked whether it runs the sandbox.
    async fn check_migration(&self, entry: &Entry) -> MigrationCheck {
        use crate::migration::phase::{recover, Action, Phase};
        let (m, token) = match recorded_migration(&entry.dir, &entry.snapshot().id) {
            Ok(found) => found,
            Err(check) => return check,
        };
        if m.phase == Phase::Aborted {
            // why: it ended with the sandbox here; the VM may still be paused
            // if hearthd died before it resumed it, so resume (idempotent).
            return MigrationCheck::ResumeHere;
        }
        let peer = crate::migration::peer::Peer::new(&m.target, &token);
        let mut resume = false;
        for action in recover(m.phase) {
            match action {
                Action::DestroyTarget => {
                    let (peer, id) = (peer.clone(), m.sandbox.clone());
                    // why: best effort; the target's incoming VM also expires on its own.
                    tokio::spawn(async move { peer.abort(&id).await });
                }
                Action::ResumeSource => resume = true,
                Action::ReleaseSource => return MigrationCheck::Moved(m.target.clone()),
                Action::AskTarget => {
                    use crate::migration::peer::{classify_abort, AbortVerdict};
                    match classify_abort(&peer.abort(&m.sandbox).await) {
                        AbortVerdict::RemovedUncommitted => resume = true,
                        AbortVerdict::Committed => return MigrationCheck::Moved(m.target.clone()),
                        AbortVerdict::Unknown(why) => {
                            return MigrationCheck::Unresolved(format!(
                                "hearthd stopped during the commit of a migration to {} and the target gave no clear answer whether it runs the sandbox ({why}); the sandbox may run there. Its VM here is kept paused: check the target, then remove this copy (`hearth rm -f {}`) or the target's",
                                m.target, m.sandbox
                            ))
                        }
                    }
                }
            }
        }
        if resume {
            MigrationCheck::ResumeHere
        } else {
            MigrationCheck::None
        }
    }

    async fn readopt(&self, entry: &Arc<Entry>, vm_dir: &Path) -> Result<(), NotAdopted> {
        let vm: Arc<dyn Vm> = match self.inner.vmm.adopt(vm_dir).await {
            Ok(vm) => Arc::from(vm),
            Err(VmmError::VmGone { pid, reason, .. }) => {
                return Err(NotAdopted::Gone(format!("QEMU pid {pid}: {reason}")))
            }
            Err(e) if !hearth_vmm::is_alive(vm_dir) => return Err(NotAdopted::Gone(e.to_string())),
            Err(e) => return Err(NotAdopted::Broken(e.to_string())),
        };
        let broken = |m: String| NotAdopted::Broken(m);
        match self.check_migration(entry).await {
            MigrationCheck::None => {}
            MigrationCheck::Moved(node) => return Err(NotAdopted::Moved(node)),
            MigrationCheck::Unresolved(why) => return Err(NotAdopted::Unresolved(why)),
            MigrationCheck::ResumeHere => {
                vm.resume().await.map_err(|e| {
                    broken(format!(
                        "resuming the VM a migration had paused failed: {e}"
                    ))
                })?;
                // why: the marker first, the record last: a crash in between
                // leaves the record, and the next start clears it again
                // (review15 F3: the other order left a marker with no record).
                crate::migration::net::clear_lease_moved(
                    &self.inner.cfg.data_dir,
                    &entry.dir,
                    &entry.snapshot().id,
                );
                crate::migration::forget_record(&entry.dir);
                tracing::info!(sandbox = %entry.snapshot().id, "a migration had not committed: the VM runs on here");
            }
        }
        let mut workload = WorkloadRecord::load(&entry.dir).map_err(broken)?;
        if workload.migrated_in {
            // why: the commit of the migration that brought it here saved
            // the records before `cont`; if hearthd stopped in between, the
            // VM is still paused, and it is this node's sandbox now.
            vm.resume().await.map_err(|e| {
                broken(format!(
                    "resuming the VM a migration here had committed failed: {e}"
                ))
            })?;
            // why: it runs; left set, the flag would resume it again at a
            // later re-adoption even if this node had paused it as the
            // source of another migration (and it keeps migrations away).
            // why: and the record healed below keeps what was stored.
            workload.migrated_in =
                !crate::migration::clear_migrated_in(&entry.snapshot().id, &entry.dir, workload)
                    .await;
        }
        let log_path: PathBuf = entry.dir.join("output.log");
        let end = log_end(&log_path)
            .map_err(|e| broken(format!("cannot read {}: {e}", log_path.display())))?;
        // why: the log starts at the session's offset `base` (non-zero after a
        // snapshot restore), so the guest's offsets are base + log bytes.
        let held = workload.base + end.stream_bytes;
        let persisted = if end.truncated { u64::MAX } else { held };
        let want = [ResumeSession {
            id: workload.session,
            persisted,
        }];
        // why: the guest answers a resume at guest speed; a slow or lost answer
        // is retried on a new connection before the VM is given up (killed).
        let mut attempt = 0;
        let (chan_fd, conn, resumed, mut sessions) = loop {
            attempt += 1;
            let tried = async {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, vm.connect_agent())
                    .await
                    .map_err(|_| {
                        format!("its agent socket did not accept within {CONNECT_TIMEOUT:?}")
                    })?
                    .map_err(|e| e.to_string())?;
                let chan_fd = crate::sandbox::stream_fd(&stream);
                GuestConn::resume(stream, &want, RESUME_TIMEOUT)
                    .await
                    .map(|(c, r, s)| (chan_fd, c, r, s))
                    .map_err(|e| format!("resuming the guest channel: {e}"))
            };
            match tried.await {
                Ok(done) => break done,
                Err(e) if attempt < RESUME_ATTEMPTS && hearth_vmm::is_alive(vm_dir) => {
                    tracing::warn!(sandbox = %entry.snapshot().id, attempt, "{e}; reconnecting");
                    tokio::time::sleep(RESUME_RETRY).await;
                }
                Err(e) => return Err(broken(format!("{e} (after {attempt} attempts)"))),
            }
        };
        let Some(info) = resumed.sessions.iter().find(|s| s.id == workload.session) else {
            return Err(broken(format!(
                "the guest no longer knows the main workload (session {})",
                workload.session
            )));
        };
        if !end.truncated && info.replay_from != held {
            // Cannot happen with a guest that keeps the protocol: credit is only
            // given for output already in the log.
            tracing::error!(
                sandbox = %entry.snapshot().id,
                log = held,
                guest = info.replay_from,
                "the guest resumed the output at another offset than the log ends"
            );
        }
        tracing::info!(
            sandbox = %entry.snapshot().id,
            from = info.replay_from,
            replay = info.sent - info.replay_from,
            exited = info.exited,
            "resuming the main workload's output"
        );
        // why: the guest may list other sessions (execs); only the main one is
        // taken over, the others are dropped (their processes are killed).
        let session = sessions
            .iter()
            .position(|s| s.id() == workload.session)
            .map(|i| sessions.swap_remove(i))
            .ok_or_else(|| broken("no session to resume".into()))?;
        drop(sessions);
        // why: a re-adopted sandbox holds its template or snapshot as one started
        // by this daemon does, so neither can be removed under it; released at
        // its teardown.
        let rec = entry.snapshot();
        let key = Self::source_key(&rec);
        if let Some(k) = &key {
            self.inner.warm.acquire(k);
        }
        // why: set before the lifecycle task runs, so an exec that arrives first finds them.
        *lock(&entry.conn) = Some(conn.clone());
        *lock(&entry.main_input) = Some(session.input());
        *lock(&entry.main_session) = Some(session.id());
        *lock(&entry.chan_fd) = chan_fd;
        *lock(&entry.vm) = Some(vm.clone());
        entry
            .stdin_open
            .store(workload.stdin, std::sync::atomic::Ordering::Relaxed);
        // why: the QEMU command line says what the VM really has; records of
        // hearthd before the hub existed have neither `nic` nor `nic_mode` though
        // their VMs ran a direct tap (and the record's default reads "hub").
        let (nic, nic_mode) = match hearth_vmm::recorded_net_hub(vm_dir) {
            Ok(Some(hub)) => (true, if hub { NicMode::Hub } else { NicMode::Tap }),
            Ok(None) => (false, NicMode::Hub),
            Err(e) => {
                tracing::warn!(sandbox = %rec.id, "cannot read the network device off vm.json, using workload.json: {e}");
                (workload.nic, workload.nic_mode)
            }
        };
        if (nic, nic_mode) != (workload.nic, workload.nic_mode) {
            // why: the record then says what the VM has (older records lack it).
            let healed = WorkloadRecord {
                nic,
                nic_mode,
                ..workload
            };
            if let Err(e) = healed.store(&entry.dir) {
                tracing::warn!(sandbox = %rec.id, "cannot update workload.json with the VM's network device: {e}");
            }
        }
        entry.nic.store(nic, std::sync::atomic::Ordering::Relaxed);
        entry.nic_tap.store(
            nic && nic_mode == NicMode::Tap,
            std::sync::atomic::Ordering::Relaxed,
        );
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        *lock(&entry.control) = Some(ctl_tx);
        let agent = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            agent
                .lifecycle_adopted(entry, vm, conn, session, ctl_rx, key)
                .await
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// review8 leftover: a `migration.json` that does not parse (a torn
    /// write, a disk error) read as "no migration", so start-up resumed the
    /// VM here though the migration may have committed. It is unresolved:
    /// the VM is kept paused and the reason names the file.
    #[test]
    fn an_unreadable_migration_record_is_unresolved_not_none() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            recorded_migration(d.path(), "sb1"),
            Err(MigrationCheck::None)
        ));
        std::fs::write(
            d.path().join("migration.json"),
            b"{\"version\":1,\"sandbox\":\"sb1\",\"pha",
        )
        .unwrap();
        match recorded_migration(d.path(), "sb1") {
            Err(MigrationCheck::Unresolved(why)) => {
                assert!(
                    why.contains("migration.json") && why.contains("sb1"),
                    "{why}"
                )
            }
            other => panic!("a garbage record reads as {other:?}"),
        }
    }

    #[test]
    fn log_end_counts_output_and_cuts_a_torn_record() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("output.log");
        let mut data = Record::Stdout(b"0\n1\n".to_vec()).encode();
        data.extend(Record::Stderr(b"err".to_vec()).encode());
        let whole = data.len() as u64;
        data.extend(&Record::Stdout(b"2\n3\n".to_vec()).encode()[..6]);
        std::fs::write(&p, &data).unwrap();
        let end = log_end(&p).unwrap();
        assert_eq!(
            end,
            LogEnd {
                stream_bytes: 7,
                truncated: false
            }
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), whole);
    }

    #[test]
    fn log_end_trusts_the_marker_not_a_notice_the_workload_printed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("output.log");
        let mut data = Record::Stdout(b"abc".to_vec()).encode();
        let forged = b"\nhearth: output log limit of 10 bytes reached\n".to_vec();
        let forged_len = forged.len() as u64;
        data.extend(Record::Stderr(forged).encode());
        std::fs::write(&p, &data).unwrap();
        assert_eq!(
            log_end(&p).unwrap(),
            LogEnd {
                stream_bytes: 3 + forged_len,
                truncated: false
            },
            "the workload's own stderr is output like any other"
        );
        std::fs::write(crate::output_log::truncated_marker(&p), b"").unwrap();
        assert!(log_end(&p).unwrap().truncated);
        assert_eq!(
            log_end(&d.path().join("none")).unwrap(),
            LogEnd {
                stream_bytes: 0,
                truncated: false
            }
        );
    }

    #[test]
    fn saved_outcome_round_trips_is_cleared_and_must_be_terminal() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(SavedOutcome::load(d.path()).unwrap(), None);
        let o = SavedOutcome::new(
            SandboxStatus::Exited,
            Some(ExitInfo {
                code: 7,
                signal: None,
            }),
            None,
        );
        o.store(d.path()).unwrap();
        assert_eq!(SavedOutcome::load(d.path()).unwrap(), Some(o));
        SavedOutcome::clear(d.path());
        assert_eq!(SavedOutcome::load(d.path()).unwrap(), None);
        SavedOutcome::new(SandboxStatus::Running, None, None)
            .store(d.path())
            .unwrap();
        assert!(SavedOutcome::load(d.path()).is_err());
    }

    #[test]
    fn workload_record_without_a_base_reads_as_zero() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(WORKLOAD_FILE),
            br#"{"version":1,"session":2,"stdin":false}"#,
        )
        .unwrap();
        assert_eq!(
            WorkloadRecord::load(d.path()).unwrap(),
            WorkloadRecord::new(2, false, 0)
        );
    }

    #[test]
    fn workload_record_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let w = WorkloadRecord::new(3, true, 0);
        w.store(d.path()).unwrap();
        assert_eq!(WorkloadRecord::load(d.path()).unwrap(), w);
    }

    #[test]
    fn nic_mode_of_an_older_record_is_hub_and_tap_round_trips() {
        use crate::restore::NicMode;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(WORKLOAD_FILE),
            br#"{"version":1,"session":2,"stdin":false,"nic":true}"#,
        )
        .unwrap();
        let old = WorkloadRecord::load(d.path()).unwrap();
        assert!(old.nic);
        assert_eq!(old.nic_mode, NicMode::Hub);
        let w = WorkloadRecord {
            nic: true,
            nic_mode: NicMode::Tap,
            ..WorkloadRecord::new(3, false, 0)
        };
        w.store(d.path()).unwrap();
        let raw = std::fs::read_to_string(d.path().join(WORKLOAD_FILE)).unwrap();
        assert!(raw.contains(r#""nic_mode":"tap""#), "{raw}");
        assert_eq!(WorkloadRecord::load(d.path()).unwrap(), w);
        assert!(!raw.contains("migrated_in"), "{raw}");
        let m = WorkloadRecord {
            migrated_in: true,
            ..w
        };
        m.store(d.path()).unwrap();
        assert_eq!(WorkloadRecord::load(d.path()).unwrap(), m);
    }

    /// How a restart settles a copy: fenced by the control plane, ended
    /// with its outcome saved, or lost (its VM gone).
    #[derive(Debug, Clone, Copy)]
    enum Settled {
        Fenced,
        Outcome,
        Lost,
    }

    /// A networked copy `id` on `a` with the lease marker its migration wrote
    /// at the switch-over gate and, if given, that migration's record in
    /// `phase` (a name that is no phase: an unreadable record).
    fn marked_copy(a: &Agent, id: &str, phase: Option<&str>) -> Arc<Entry> {
        let data = a.inner.cfg.data_dir.clone();
        let dir = data.join("sandboxes").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let rec: hearth_api::Sandbox = serde_json::from_value(serde_json::json!({
            "id": id, "name": null, "image": "busybox", "image_digest": "sha256:x",
            "status": "running", "exit": null, "error": null, "cpus": 1,
            "memory_mib": 128, "argv": ["sh"], "node": "n2", "accel": "tcg",
            "created_ms": 1, "started_ms": 1, "finished_ms": null, "boot_ms": null,
            "start_path": "cold", "started_from": null
        }))
        .unwrap();
        crate::sandbox::persist(&dir, &rec).unwrap();
        crate::migration::net::mark_lease_moved(&data, &dir, id, true).unwrap();
        if let Some(p) = phase {
            let r = format!(
                r#"{{"version":1,"sandbox":"{id}","target":"http://127.0.0.1:9","phase":"{p}","token":"t"}}"#
            );
            std::fs::write(dir.join("migration.json"), r).unwrap();
        }
        Arc::new(Entry::new(dir, rec))
    }

    /// review14 F6: every start-up path that settles a copy gives its
    /// address back when its migration had not committed (the record is
    /// before `committing`: the lease never moved, the marker written at
    /// the gate is cleared before the network is dropped) and keeps it when
    /// the target may run with it (`committing`, `unresolved`, `completed`;
    /// a marker without a record, a completed migration's; an unreadable
    /// record). Before, the fenced and the saved-outcome paths kept it in
    /// every case: the address leaked.
    #[tokio::test]
    async fn a_settled_copy_gives_its_address_back_unless_its_migration_may_have_committed() {
        use crate::migration::net::{moved_leases, release_decision, AddressRelease};
        let d = tempfile::tempdir().unwrap();
        let a = crate::sandbox::agent_for_test(d.path()).await;
        let data = a.inner.cfg.data_dir.clone();
        let cases = [
            (Some("preparing"), AddressRelease::Own),
            (Some("precopy"), AddressRelease::Own),
            (Some("switchover"), AddressRelease::Own),
            (Some("aborted"), AddressRelease::Own),
            (Some("committing"), AddressRelease::Keep),
            (Some("unresolved"), AddressRelease::Keep),
            (Some("completed"), AddressRelease::Keep),
            (Some("no-such-phase"), AddressRelease::Keep),
            (None, AddressRelease::Keep),
        ];
        for how in [Settled::Fenced, Settled::Outcome, Settled::Lost] {
            for (phase, want) in &cases {
                let id = format!("{how:?}-{}", phase.unwrap_or("none")).to_lowercase();
                let entry = marked_copy(&a, &id, *phase);
                match how {
                    Settled::Fenced => a.recover_fenced(&entry, "moved elsewhere").await,
                    Settled::Outcome => {
                        SavedOutcome::new(SandboxStatus::Exited, None, None)
                            .store(&entry.dir)
                            .unwrap();
                        // why: the saved outcome wins over the fence too.
                        a.recover_fenced(&entry, "deleted").await
                    }
                    Settled::Lost => assert!(!a.recover_sandbox(&entry).await),
                }
                let what = format!("{how:?} with a {phase:?} record");
                let status = entry.snapshot().status;
                assert!(status.is_terminal(), "{what}: {status:?}");
                assert_eq!(&release_decision(&entry.dir), want, "{what}");
                assert_eq!(
                    moved_leases(&data).contains(&id),
                    *want == AddressRelease::Keep,
                    "{what}: moved-leases.json (the start-up lease sync keeps what it names)"
                );
                assert!(
                    matches!(crate::migration::load_record(&entry.dir), Ok(None)),
                    "{what}: the record is settled"
                );
            }
        }
    }
}
