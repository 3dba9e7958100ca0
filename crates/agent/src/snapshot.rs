//! Snapshots of running sandboxes, starting sandboxes from them, and fork.
//!
//! On disk: `snapshots/<name>/` = a snapshot directory (see `hearth_vmm::snapshot`)
//! plus `snapshot.json` ([`SnapshotMeta`]: which guest session is the workload, so
//! a restored sandbox continues it). Written in `snapshots/.tmp-*` and renamed into
//! place. A snapshot that running sandboxes were restored from cannot be removed.

use std::path::PathBuf;

use hearth_api::network::{NetworkMode, NetworkSpec};
use hearth_api::{CreateSandbox, Sandbox, SandboxStatus, Snapshot, StartPath};
use hearth_proto::ExecRequest as GuestExec;
use hearth_vmm::{AfterSave, SaveOptions, SnapshotManifest};
use serde::{Deserialize, Serialize};

use crate::durable::{self, DirSync};
use crate::restore::{snapshot_key, Launch, WarmSource};
use crate::sandbox::{io_err, lock, new_id, now_ms, plan_exec, valid_name, Agent, AgentError};

/// Format of `snapshot.json` of a VM whose network device is on the hub (or
/// that has none): what hearthd before direct taps wrote and reads.
const SNAPSHOT_META_VERSION: u32 = 1;
/// Format of `snapshot.json` with `nic_mode: tap`: a hearthd that knows only
/// version 1 would restore it onto a hub, which QEMU refuses (the guest's
/// offloads are in the saved state); the version makes it refuse it cleanly.
const SNAPSHOT_META_VERSION_TAP: u32 = 2;
/// Bound on the guest confirming it stopped its processes before a save.
const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most copies one fork makes.
pub const MAX_FORK: u32 = 16;

/// `snapshot.json`: the agent's half of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotMeta {
    pub version: u32,
    pub name: String,
    /// Sandbox id it was taken from.
    pub sandbox: String,
    pub image: String,
    pub image_digest: String,
    pub argv: Vec<String>,
    /// Guest session of the main workload, which a restore continues.
    pub main_session: Option<u32>,
    /// First session id not used by the snapshot's guest.
    pub next_session: u32,
    pub created_ms: u64,
    /// The VM had a network device (restores get one, with their own tap).
    #[serde(default)]
    pub nic: bool,
    /// How that device was connected (`"tap"`: directly, with offloads, so a
    /// restore needs a tap; `"hub"`: on hub 0). Absent in older snapshots: hub.
    #[serde(default)]
    pub nic_mode: crate::restore::NicMode,
    /// Made by `hearth fork`: removed with the last sandbox restored from it.
    #[serde(default)]
    pub fork: bool,
    /// The source sandbox had a network (not `--network none`); a start from
    /// the snapshot without network flags gets one only then. Absent in
    /// snapshots of older hearthd (which treated them as networked).
    #[serde(default)]
    pub networked: Option<bool>,
    /// The snapshot's guest guards restores (see `hearth_proto::RESTORE_GUARD`);
    /// false in snapshots of older hearthd or of older guests.
    #[serde(default)]
    pub restore_guard: bool,
}

impl Agent {
    fn snapshots_root(&self) -> PathBuf {
        self.inner.cfg.data_dir.join("snapshots")
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.snapshots_root().join(name)
    }

    fn snapshot_meta(&self, name: &str) -> Result<SnapshotMeta, AgentError> {
        let not_found = || {
            AgentError::NotFound(format!(
                "snapshot '{name}' not found; list snapshots with `hearth snapshot ls`"
            ))
        };
        if !valid_name(name) {
            return Err(not_found());
        }
        let bytes = std::fs::read(self.snapshot_dir(name).join("snapshot.json"))
            .map_err(|_| not_found())?;
        let meta: SnapshotMeta = serde_json::from_slice(&bytes).map_err(|e| {
            AgentError::InvalidArgument(format!(
                "snapshot '{name}': snapshot.json is unreadable: {e}"
            ))
        })?;
        if ![SNAPSHOT_META_VERSION, SNAPSHOT_META_VERSION_TAP].contains(&meta.version) {
            return Err(AgentError::InvalidArgument(format!(
                "snapshot '{name}' has metadata version {}, this hearthd reads {SNAPSHOT_META_VERSION} and {SNAPSHOT_META_VERSION_TAP}; use the hearthd that made it or remove it (`hearth snapshot rm {name}`)",
                meta.version
            )));
        }
        Ok(meta)
    }

    fn to_api_snapshot(&self, m: &SnapshotMeta) -> Snapshot {
        let manifest = SnapshotManifest::load(&self.snapshot_dir(&m.name)).ok();
        Snapshot {
            name: m.name.clone(),
            sandbox: m.sandbox.clone(),
            image: m.image.clone(),
            image_digest: m.image_digest.clone(),
            cpus: manifest.as_ref().map(|x| x.cpus).unwrap_or(0),
            memory_mib: manifest.as_ref().map(|x| x.memory_mib).unwrap_or(0),
            in_use: self.in_use(WarmSource::Snapshot, &m.name),
            size_bytes: manifest.map(|x| x.size_bytes()).unwrap_or(0),
            created_ms: m.created_ms,
        }
    }

    /// Pauses a running sandbox, saves memory, devices and writable layer as
    /// snapshot `name`, and resumes it.
    pub async fn snapshot_sandbox(
        &self,
        id_or_name: &str,
        name: &str,
    ) -> Result<Snapshot, AgentError> {
        let (me, id, name) = (self.clone(), id_or_name.to_string(), name.to_string());
        detached("snapshot", async move {
            me.save_sandbox(&id, &name, false).await
        })
        .await
    }

    async fn save_sandbox(
        &self,
        id_or_name: &str,
        name: &str,
        fork: bool,
    ) -> Result<Snapshot, AgentError> {
        if !valid_name(name) {
            return Err(AgentError::InvalidArgument(format!(
                "snapshot name '{name}' is invalid: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )));
        }
        let e = self.running_entry(id_or_name).await?;
        let _saving = e.saving.lock().await;
        // why: released once the guest is thawed (below), so execs do not wait
        // for the rest of the save; `_saving` still keeps snapshots one at a time.
        let exec_gate = e.exec_gate.lock().await;
        let rec = e.snapshot();
        let vm = lock(&e.vm).clone();
        let conn = lock(&e.conn).clone();
        let (Some(vm), Some(conn)) = (vm.filter(|_| rec.status == SandboxStatus::Running), conn)
        else {
            return Err(AgentError::Conflict(format!(
                "sandbox '{}' is {:?}, not running; only a running sandbox can be snapshotted",
                rec.id, rec.status
            )));
        };
        let dir = self.snapshot_dir(name);
        if dir.exists() {
            return Err(AgentError::Conflict(format!(
                "snapshot '{name}' already exists; remove it with `hearth snapshot rm {name}` or choose another name"
            )));
        }
        let images = self.inner.images.clone();
        let digest = rec.image_digest.clone();
        let image = tokio::task::spawn_blocking(move || images.resolve(&digest))
            .await
            .map_err(|e| AgentError::Config(format!("image lookup panicked: {e}")))??;
        let nic_mode = e.nic_mode();
        let meta = SnapshotMeta {
            version: match nic_mode {
                crate::restore::NicMode::Tap => SNAPSHOT_META_VERSION_TAP,
                crate::restore::NicMode::Hub => SNAPSHOT_META_VERSION,
            },
            name: name.to_string(),
            sandbox: rec.id.clone(),
            image: rec.image.clone(),
            image_digest: rec.image_digest.clone(),
            argv: rec.argv.clone(),
            main_session: *lock(&e.main_session),
            next_session: conn.next_session_id(),
            created_ms: now_ms(),
            nic: e.nic.load(std::sync::atomic::Ordering::Relaxed) || rec.network.is_some(),
            nic_mode,
            fork,
            networked: Some(rec.network.is_some()),
            restore_guard: conn.guards_restores(),
        };
        let tmp = self
            .snapshots_root()
            .join(format!(".tmp-{name}-{}", new_id()));
        let opts = SaveOptions {
            kernel_sha256: self.inner.warm.host.kernel_sha256.clone(),
            cpus: rec.cpus,
            memory_mib: rec.memory_mib,
            base_rootfs: image.rootfs.clone(),
            after: AfterSave::Resume,
        };
        // why: the snapshot's processes must not run in a restored copy before it
        // is reseeded; stopped now, they continue there only after `Restored`.
        if let Err(err) = conn.freeze_for_snapshot(FREEZE_TIMEOUT).await {
            return Err(AgentError::VmFailed {
                id: rec.id,
                message: format!(
                    "snapshot '{name}' not taken: the guest did not stop its processes for it ({err}); they keep running; retry, and if it persists the guest agent is busy or too old (a template or snapshot made before freezing existed: recreate it)"
                ),
            });
        }
        // why: the guest's processes continue as soon as the VM's state is
        // written and it runs again, not after the rest of the save (a restored
        // VM's RAM conversion, the flush and checksums of the files).
        let (resumed, resumed_rx) = tokio::sync::oneshot::channel();
        let thaw = async {
            let _ = resumed_rx.await;
            if let Err(err) = conn.thaw_processes().await {
                tracing::warn!(sandbox = %rec.id, "the Thaw after snapshot '{name}' could not be sent ({err}): the guest's processes stay stopped until a retry in the background gets it through or the guest's own bound (60 s) ends the stop");
            }
            drop(exec_gate);
        };
        let (saved, ()) = tokio::join!(vm.save_snapshot_notify(&tmp, &opts, resumed), thaw);
        let manifest = match saved {
            Ok(m) => m,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(AgentError::VmFailed {
                    id: rec.id,
                    message: format!("snapshot failed: {err}"),
                });
            }
        };
        let installed = serde_json::to_vec_pretty(&meta)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                durable::write(
                    &tmp.join("snapshot.json"),
                    &b,
                    durable::MODE_DEFAULT,
                    DirSync::Now,
                )
            })
            .and_then(|_| std::fs::rename(&tmp, &dir))
            .and_then(|_| durable::sync_dir(&self.snapshots_root()));
        if let Err(err) = installed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err(format!("install snapshot {}", dir.display()))(err));
        }
        self.inner.warm.mark_verified(&dir, &manifest);
        Ok(self.to_api_snapshot(&meta))
    }

    pub async fn list_snapshots(&self) -> Vec<Snapshot> {
        let Ok(rd) = std::fs::read_dir(self.snapshots_root()) else {
            return Vec::new();
        };
        let mut v: Vec<Snapshot> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    return None;
                }
                self.snapshot_meta(&name)
                    .ok()
                    .map(|m| self.to_api_snapshot(&m))
            })
            .collect();
        v.sort_by_key(|s| s.created_ms);
        v
    }

    /// Removes a snapshot; refused while a running sandbox was restored from it.
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), AgentError> {
        self.snapshot_meta(name)?;
        let away = self.detach_unused(WarmSource::Snapshot, name, &self.snapshot_dir(name))?;
        std::fs::remove_dir_all(&away).map_err(io_err(format!("remove {}", away.display())))
    }

    /// Creates a sandbox from a snapshot. The snapshot is checked first, so a
    /// truncated, corrupted or foreign one is refused here with a clear error.
    pub(crate) async fn create_from_snapshot(
        &self,
        req: CreateSandbox,
    ) -> Result<Sandbox, AgentError> {
        self.create_from_snapshot_with(req, None).await
    }

    /// [`Agent::create_from_snapshot`]; `inherit` is the policy of a fork's
    /// source, used instead of the request's.
    async fn create_from_snapshot_with(
        &self,
        req: CreateSandbox,
        inherit: Option<hearth_net::Policy>,
    ) -> Result<Sandbox, AgentError> {
        // why: a start timeline counts from here (for a fork's copy: from its
        // start, after the fork's snapshot was saved).
        let t0 = std::time::Instant::now();
        let name = req.from_snapshot.clone().unwrap_or_default();
        let meta = self.snapshot_meta(&name)?;
        let dir = self.snapshot_dir(&name);
        // why: referenced before its files are checked or used, so a concurrent
        // `snapshot rm` is refused from here on (or went first and this fails).
        let key = snapshot_key(&name);
        let meta_file = dir.join("snapshot.json");
        if !self.inner.warm.try_acquire(&key, || meta_file.exists()) {
            return Err(AgentError::NotFound(format!(
                "snapshot '{name}' was removed; list snapshots with `hearth snapshot ls`"
            )));
        }
        let prepared = self.prepare_snapshot_start(&req, &name, &meta, &dir).await;
        let (manifest, cpus, memory_mib, exec, attach) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.release(Some(key));
                return Err(e);
            }
        };
        // The network follows the request (a fork: its source's policy), when the
        // snapshot's VM has a network device to carry it. A request without
        // network flags starts as the snapshot's source did: a snapshot of a
        // `--network none` sandbox gives no network unless rules ask for one.
        let mode = if req.network == NetworkSpec::default() && meta.networked == Some(false) {
            NetworkMode::None
        } else {
            req.network.mode
        };
        let wanted = match mode {
            NetworkMode::None => None,
            NetworkMode::Default if self.net().is_none() => None,
            NetworkMode::Default => match inherit {
                Some(p) => Some(p),
                None => match crate::network::spec_policy(&req.network) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.release(Some(key));
                        return Err(e);
                    }
                },
            },
        };
        let (policy, note) = match wanted {
            Some(_) if !meta.nic => (
                None,
                Some(format!(
                    "snapshot '{name}' has no network device (its sandbox booted cold with --network none); started without a network"
                )),
            ),
            None if meta.nic && meta.nic_mode == crate::restore::NicMode::Tap => {
                self.release(Some(key));
                let why = if mode == NetworkMode::None {
                    "drop --network none"
                } else {
                    "start it on a node with networking"
                };
                return Err(AgentError::InvalidArgument(format!(
                    "snapshot '{name}' was saved with its network device directly on a tap (the guest uses its checksum and segmentation offloads), so it can only be restored with a network: {why}"
                )));
            }
            p => (p, None),
        };
        let launch = Launch::Restore {
            path: StartPath::Snapshot,
            name: name.clone(),
            dir,
            attach,
            next_session: meta.next_session,
            note,
            nic: meta.nic,
            nic_mode: meta.nic_mode,
            guarded: meta.restore_guard,
        };
        let req = CreateSandbox {
            image: meta.image.clone(),
            ..req
        };
        let entry = match self.register(
            &req,
            &meta.image_digest,
            &exec.argv,
            (cpus, memory_mib),
            crate::sandbox::Preset::default(),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.abandon(launch).await;
                return Err(e);
            }
        };
        entry.trace.began_at(t0);
        entry.trace.mark("registered");
        let net = match self.setup_network(&entry, policy).await {
            Ok(n) => n,
            Err(e) => {
                self.abandon(launch).await;
                return Err(e);
            }
        };
        entry.trace.mark("network");
        Ok(self.spawn_lifecycle(
            entry,
            &req,
            manifest.base_rootfs.clone(),
            exec,
            launch,
            net.as_ref(),
        ))
    }

    /// Checks snapshot `name` and plans the start of a sandbox from it: its
    /// manifest, shape, what to run, and the guest session to continue.
    async fn prepare_snapshot_start(
        &self,
        req: &CreateSandbox,
        name: &str,
        meta: &SnapshotMeta,
        dir: &std::path::Path,
    ) -> Result<(SnapshotManifest, u32, u32, GuestExec, Option<u32>), AgentError> {
        let manifest = self.checked_manifest(dir).await.map_err(|e| {
            AgentError::InvalidArgument(format!("cannot restore snapshot '{name}': {e}"))
        })?;
        let shape = CreateSandbox {
            cpus: Some(manifest.cpus),
            memory_mib: Some(manifest.memory_mib),
            ..req.clone()
        };
        let (cpus, memory_mib) = self.validate(&shape)?;
        let continue_main = req.cmd.is_none() && req.entrypoint.is_none();
        let attach = if continue_main {
            meta.main_session
        } else {
            None
        };
        let exec = if attach.is_some() {
            GuestExec {
                argv: meta.argv.clone(),
                ..Default::default()
            }
        } else {
            let images = self.inner.images.clone();
            let digest = meta.image_digest.clone();
            let image = tokio::task::spawn_blocking(move || images.resolve(&digest))
                .await
                .map_err(|e| AgentError::Config(format!("image lookup panicked: {e}")))??;
            let r = CreateSandbox {
                image: meta.image.clone(),
                ..req.clone()
            };
            plan_exec(&r, &image)?
        };
        Ok((manifest, cpus, memory_mib, exec, attach))
    }

    /// Snapshots a running sandbox and starts `count` sandboxes from that instant,
    /// each with its own id, hostname, RNG state, writable layer and (for a
    /// networked source) its own address, MAC, lease and tap under the source's
    /// policy. The snapshot (`<sandbox>-fork-<random>`) is removed with the last
    /// fork. A fork that fails removes the forks made before it and the snapshot.
    pub async fn fork(&self, id_or_name: &str, count: u32) -> Result<Vec<Sandbox>, AgentError> {
        let (me, id) = (self.clone(), id_or_name.to_string());
        detached("fork", async move { me.fork_inner(&id, count).await }).await
    }

    async fn fork_inner(&self, id_or_name: &str, count: u32) -> Result<Vec<Sandbox>, AgentError> {
        if count == 0 || count > MAX_FORK {
            return Err(AgentError::InvalidArgument(format!(
                "fork count {count} is out of range: give 1..={MAX_FORK}"
            )));
        }
        let src = self.entry(id_or_name)?.snapshot();
        let id = src.id.clone();
        let inherit = match (&src.network, self.net()) {
            (Some(_), Some(net)) => Some(net.get(&id)?.policy),
            _ => None,
        };
        // why: a default request means a network; forks of a `--network none`
        // sandbox must not get one (lease, tap, NAT) its source never had.
        let mode = if src.network.is_some() {
            NetworkMode::Default
        } else {
            NetworkMode::None
        };
        let name = format!("{id}-fork-{}", &new_id()[..6]);
        self.save_sandbox(&id, &name, true).await?;
        // why: held for the whole loop, so the snapshot cannot go away between
        // forks (e.g. with the removal of a fork that already ended).
        let key = snapshot_key(&name);
        let dir = self.snapshot_dir(&name);
        let held = self
            .inner
            .warm
            .try_acquire(&key, || dir.join("snapshot.json").exists());
        let mut out: Vec<Sandbox> = Vec::new();
        for i in 0..count {
            let req = CreateSandbox {
                from_snapshot: Some(name.clone()),
                network: NetworkSpec {
                    mode,
                    ..Default::default()
                },
                ..Default::default()
            };
            // A fork counts once it runs: one that fails while starting (after
            // the request was accepted) is undone like one refused up front.
            let made = match self.create_from_snapshot_with(req, inherit.clone()).await {
                Ok(s) => {
                    let started = self.wait_started(&s.id).await;
                    out.push(s);
                    match started {
                        Ok(s) if s.status == SandboxStatus::Failed => Err(AgentError::VmFailed {
                            message: format!(
                                "fork did not start: {}",
                                s.error.as_deref().unwrap_or("unknown error")
                            ),
                            id: s.id,
                        }),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match made {
                Ok(()) => {}
                Err(e) => {
                    if held {
                        self.release(Some(key.clone()));
                    }
                    let undone = self.undo_forks(&name, &out).await;
                    return Err(AgentError::ForkFailed {
                        failed: i + 1,
                        count,
                        undone,
                        source: Box::new(e),
                    });
                }
            }
        }
        if held {
            self.release(Some(key));
        }
        // why: covers forks that all ended and were removed while the reference was held.
        self.remove_fork_snapshot_if_unused(&name).await;
        Ok(out)
    }

    /// Removes the forks `made` of a fork that failed, then its snapshot; says what it did.
    async fn undo_forks(&self, snapshot: &str, made: &[Sandbox]) -> String {
        let mut left = Vec::new();
        for s in made {
            if let Err(e) = self.remove(&s.id, true).await {
                tracing::warn!(sandbox = %s.id, "removing a fork of a failed fork: {e}");
                left.push(format!("{} ({e})", s.id));
            }
        }
        // why: remove() of the last fork already removes the snapshot; this covers none made.
        self.remove_fork_snapshot_if_unused(snapshot).await;
        let ids: Vec<&str> = made.iter().map(|s| s.id.as_str()).collect();
        match (made.is_empty(), left.is_empty()) {
            (true, _) => "no fork was made; the fork snapshot was removed".to_string(),
            (false, true) => format!(
                "the {} fork(s) already made ({}) were removed, and the fork snapshot",
                made.len(),
                ids.join(", ")
            ),
            (false, false) => format!(
                "forks made before it: {}; these could NOT be removed and still exist: {} (remove them with `hearth rm -f`)",
                ids.join(", "),
                left.join(", ")
            ),
        }
    }

    /// Removes snapshot `name` if `hearth fork` made it and no sandbox uses it any more.
    pub(crate) async fn remove_fork_snapshot_if_unused(&self, name: &str) {
        let Ok(meta) = self.snapshot_meta(name) else {
            return;
        };
        if !meta.fork || self.in_use(WarmSource::Snapshot, name) > 0 {
            return;
        }
        if let Err(e) = self.remove_snapshot(name).await {
            tracing::warn!(snapshot = name, "removing the fork snapshot: {e}");
        }
    }
}

/// Runs `work` as its own task and waits for it: a caller that goes away (a
/// client disconnecting drops the request's future) cannot stop it between
/// freezing the guest's processes and thawing them, or leave a `.tmp-*` dir.
async fn detached<T: Send + 'static>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::spawn(work)
        .await
        .map_err(|e| AgentError::Config(format!("{what} task failed: {e}")))?
}
