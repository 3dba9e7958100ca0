//! How a sandbox's VM comes to be: a cold boot, a restore from a template or a
//! snapshot, or a restored-and-paused VM from a warm pool ([`Launch`]).
//!
//! Every restore goes through [`Agent::checked_manifest`] (version, VMM, kernel
//! and checksums; the full RAM checksum once per daemon run) and then the
//! backend's `restore`. A restored guest gets [`Restored`] before anything else:
//! fresh RNG seed, clock, hostname and sandbox id. Templates and snapshots that
//! running sandboxes depend on are reference-counted here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hearth_api::{CreateSandbox, StartPath};
use hearth_proto::{GuestNet, Restored};
use hearth_vmm::snapshot::file_sha256;
use hearth_vmm::{
    Accel, HostIdentity, QemuVmm, SnapshotManifest, Verify, Vm, VmConfig, Vmm, VmmError,
};
use tokio::net::UnixStream;

use crate::guest_conn::{GuestConn, Session};
use crate::sandbox::{lock, now_ms, Agent, AgentConfig, AgentError, Entry, HELLO_TIMEOUT};
use crate::warm_pool::{PooledVm, Pools};

/// Node-wide state of warm starts.
pub(crate) struct WarmState {
    /// What a snapshot must have been made with to load here.
    pub(crate) host: HostIdentity,
    /// Running sandboxes per `template:NAME` / `snapshot:NAME`.
    refs: Mutex<HashMap<String, u32>>,
    /// Snapshot directories whose every file was checksummed in this run, keyed
    /// by directory, manifest and each file's size and mtime: a file changed since
    /// is checksummed again.
    verified: Mutex<HashSet<VerifiedKey>>,
    pub(crate) pools: Pools,
}

impl WarmState {
    pub(crate) async fn new(
        cfg: &AgentConfig,
        vmm: &QemuVmm,
        accel: Accel,
    ) -> Result<WarmState, AgentError> {
        let kernel = cfg.kernel.clone();
        let kernel_sha256 = tokio::task::spawn_blocking(move || file_sha256(&kernel))
            .await
            .map_err(|e| AgentError::Config(format!("kernel hash panicked: {e}")))?
            .map_err(|e| {
                AgentError::Config(format!(
                    "cannot read the guest kernel {}: {e}",
                    cfg.kernel.display()
                ))
            })?;
        Ok(WarmState {
            host: HostIdentity {
                backend: vmm.name().to_string(),
                vmm_version: vmm.version(),
                kernel_sha256,
                accel,
            },
            refs: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashSet::new()),
            pools: Pools::default(),
        })
    }

    /// Sandboxes currently holding `key`.
    pub(crate) fn refs(&self, key: &str) -> u32 {
        lock(&self.refs).get(key).copied().unwrap_or(0)
    }

    /// Takes a reference on `key` if `present()` still holds, both under the lock
    /// a removal checks the references under ([`Agent::detach_unused`]); so a
    /// removal either sees this reference or this sees the files gone.
    pub(crate) fn try_acquire(&self, key: &str, present: impl FnOnce() -> bool) -> bool {
        let mut refs = lock(&self.refs);
        if !present() {
            return false;
        }
        *refs.entry(key.to_string()).or_default() += 1;
        true
    }

    /// Takes a reference on `key` unconditionally (a re-adopted sandbox that
    /// already runs from it).
    pub(crate) fn acquire(&self, key: &str) {
        *lock(&self.refs).entry(key.to_string()).or_default() += 1;
    }

    fn release(&self, key: &str) {
        let mut refs = lock(&self.refs);
        if let Some(n) = refs.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                refs.remove(key);
            }
        }
    }

    /// Remembers that `dir` was fully checksummed (it was just written).
    pub(crate) fn mark_verified(&self, dir: &Path, m: &SnapshotManifest) {
        lock(&self.verified).insert(verified_key(dir, m));
    }
}

type VerifiedKey = (PathBuf, u64, Vec<(u64, i64, i64)>);

fn verified_key(dir: &Path, m: &SnapshotManifest) -> VerifiedKey {
    use std::os::unix::fs::MetadataExt;
    let stamps = m
        .files
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(&f.name))
                .map(|md| (md.len(), md.mtime(), md.mtime_nsec()))
                .unwrap_or((u64::MAX, 0, 0))
        })
        .collect();
    (dir.to_path_buf(), m.created_unix_ms, stamps)
}

/// Reference key of a template.
pub(crate) fn template_key(name: &str) -> String {
    format!("template:{name}")
}

/// Reference key of a snapshot.
pub(crate) fn snapshot_key(name: &str) -> String {
    format!("snapshot:{name}")
}

/// Prefix of a template or snapshot directory being removed (renamed away under
/// the reference lock, deleted after; a restarted daemon deletes leftovers).
pub(crate) const REMOVING_PREFIX: &str = ".rm-";

/// What a template or snapshot is to [`Agent::detach_unused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WarmSource {
    Template,
    Snapshot,
}

impl WarmSource {
    fn noun(self) -> &'static str {
        match self {
            WarmSource::Template => "template",
            WarmSource::Snapshot => "snapshot",
        }
    }

    fn key(self, name: &str) -> String {
        match self {
            WarmSource::Template => template_key(name),
            WarmSource::Snapshot => snapshot_key(name),
        }
    }

    /// Whether a sandbox started along `path` depends on a source of this kind.
    fn started_by(self, path: StartPath) -> bool {
        match self {
            WarmSource::Template => matches!(path, StartPath::Template | StartPath::Pool),
            WarmSource::Snapshot => path == StartPath::Snapshot,
        }
    }
}

/// MAC of a template's network device; a restored guest takes its sandbox's
/// (or, without a network, keeps the link down).
pub(crate) const TEMPLATE_MAC: &str = "02:68:00:00:00:00";

/// What a restored guest is told about its network.
pub(crate) fn guest_net(n: &hearth_net::SandboxNet) -> GuestNet {
    GuestNet {
        ip: n.ip.to_string(),
        prefix: 32,
        gateway: n.gateway.to_string(),
        mac: n.mac_string(),
        dns: n.dns.iter().map(|d| d.to_string()).collect(),
    }
}

/// How a VM's network device is connected (see `hearth_api::network::NicMode`
/// and `hearth_vmm::NetDevice`): a restore must rebuild the same topology.
/// Only VMs whose QEMU starts before their tap exists use the hub: templates
/// (and so their warm pools), and restores of snapshots taken on the hub.
/// Records of hearthd before the hub existed have no mode and their VMs ran a
/// direct tap; records of hearthd that put every device on the hub have no
/// mode either: a re-adoption reads the mode off the QEMU command line
/// (`hearth_vmm::recorded_nic`), a snapshot without a mode was taken on the hub.
pub(crate) use hearth_api::network::NicMode;

/// Where a new sandbox's VM comes from.
pub(crate) enum Launch {
    /// Boot the kernel; `note` says why when a warm start was possible.
    Cold { note: Option<String> },
    /// Restore from a template or snapshot directory (its reference is held).
    Restore {
        path: StartPath,
        name: String,
        dir: PathBuf,
        /// Main session of the snapshot's guest to continue as the workload.
        attach: Option<u32>,
        next_session: u32,
        note: Option<String>,
        /// The snapshot's VM has a network device (so the restore needs one).
        nic: bool,
        /// How that device was connected (the restore connects it the same way).
        nic_mode: NicMode,
        /// The snapshot's guest guards restores (recorded from its Hello or
        /// RestoredAck when it was saved): the new workload's exec may be queued
        /// right behind `Restored`.
        guarded: bool,
    },
    /// A restored-and-paused VM from the template's pool (its reference is held).
    Pooled { template: String, vm: PooledVm },
    /// A template restore already under way (started while the host network
    /// was being set up, on hub 0 without a tap; the tap joins once restored).
    /// `launch` is the [`Launch::Restore`] it was started from.
    Restoring {
        launch: Box<Launch>,
        restore: tokio::task::JoinHandle<Result<hearth_vmm::RestoredVm, VmmError>>,
    },
}

impl Launch {
    /// The network device the launch's saved state needs, and how it must be
    /// connected; `None`: none is needed (a cold boot gets one, on its tap
    /// directly, only with a network).
    pub(crate) fn nic(&self) -> Option<NicMode> {
        match self {
            Launch::Cold { .. } => None,
            Launch::Restore { nic, nic_mode, .. } => nic.then_some(*nic_mode),
            Launch::Pooled { vm, .. } => vm.nic.then_some(NicMode::Hub),
            Launch::Restoring { launch, .. } => launch.nic(),
        }
    }

    /// The template of a warm start whose VM has no network device.
    pub(crate) fn nicless_template(&self) -> Option<&str> {
        match self {
            Launch::Restore {
                path: StartPath::Template,
                name,
                nic: false,
                ..
            } => Some(name),
            Launch::Pooled { template, vm } if !vm.nic => Some(template),
            Launch::Restoring { launch, .. } => launch.nicless_template(),
            _ => None,
        }
    }

    /// Takes the network prepared for a pooled VM (the sandbox owns it from now on).
    pub(crate) fn take_pool_network(&mut self) -> Option<hearth_net::SandboxNet> {
        match self {
            Launch::Pooled { vm, .. } => vm.net.take(),
            _ => None,
        }
    }

    /// Joins `tap` to a pooled VM's hub, then resumes the VM (one QMP
    /// exchange after the other, off the start's path: the caller runs this
    /// while the request's rules are written); marks both done so
    /// [`Agent::launch_vm`] does not attach it again and the `Restored` that
    /// follows is not resumed again. A resumed pool guest only waits for that
    /// `Restored`: it runs nothing else (its warm-up ended), and the frames it
    /// reads are in order, so the workload still comes after its reseed,
    /// clock, hostname and network.
    pub(crate) async fn wake_pool_vm(&mut self, tap: &str) -> Result<(), AgentError> {
        let Launch::Pooled { vm, .. } = self else {
            return Ok(());
        };
        vm.vm.attach_tap(tap).await.map_err(|e| {
            AgentError::Config(format!(
                "cannot attach tap {tap} to warm pool VM {}: {e}; create the sandbox again",
                vm.id
            ))
        })?;
        vm.tap_attached = true;
        // why: parked by this daemon (its warm-up ended with a pause).
        vm.vm.start_paused().await.map_err(|e| {
            AgentError::Config(format!(
                "cannot resume warm pool VM {}: {e}; create the sandbox again",
                vm.id
            ))
        })?;
        vm.resumed = true;
        Ok(())
    }

    /// The sandbox id a pooled VM was restored under.
    pub(crate) fn preset_id(&self) -> Option<String> {
        match self {
            Launch::Pooled { vm, .. } => Some(vm.id.clone()),
            _ => None,
        }
    }

    /// The start path a warm launch records when it succeeds (path, source,
    /// note), known before the sandbox is registered: the registration saves
    /// it, so no record save stands between the restore and the resume. A
    /// template restore that falls back to a cold boot records that instead.
    pub(crate) fn preset_path(&self) -> Option<(StartPath, String, Option<String>)> {
        match self {
            Launch::Cold { .. } => None,
            Launch::Pooled { template, .. } => Some((StartPath::Pool, template.clone(), None)),
            Launch::Restore {
                path, name, note, ..
            } => Some((*path, name.clone(), note.clone())),
            Launch::Restoring { launch, .. } => launch.preset_path(),
        }
    }

    fn ref_key(&self) -> Option<String> {
        match self {
            Launch::Cold { .. } => None,
            Launch::Restore {
                path: StartPath::Snapshot,
                name,
                ..
            } => Some(snapshot_key(name)),
            Launch::Restore { name, .. } => Some(template_key(name)),
            Launch::Pooled { template, .. } => Some(template_key(template)),
            Launch::Restoring { launch, .. } => launch.ref_key(),
        }
    }
}

/// The guest channel of a restored VM, connected before its state was loaded.
pub(crate) struct RestoredChannel {
    pub(crate) link: GuestLink,
    pub(crate) attach: Option<u32>,
    pub(crate) next_session: u32,
    pub(crate) hostname: String,
    pub(crate) sandbox_id: String,
    /// The VM has a network device: the guest is told its network (or none).
    pub(crate) nic: bool,
    pub(crate) net: Option<GuestNet>,
    /// The guest is known to guard restores (see [`Launch::Restore`]'s `guarded`).
    pub(crate) guarded: bool,
    /// The guest already holds `net` (a pool VM that took it at fill time):
    /// `Restored` tells it to keep eth0 as it is.
    pub(crate) net_kept: bool,
    /// Whether and how the VM still needs its resume after `Restored` is queued.
    pub(crate) resume: Resume,
}

/// How [`Agent::wake_restored`] resumes a restored VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Paused by its restore: `Vm::start`.
    Restored,
    /// A pool VM this daemon parked (known paused): `Vm::start_paused`.
    Parked,
    /// Already running (a pool VM resumed while the request's rules were
    /// written, [`Launch::wake_pool_vm`]): `Restored` is sent without a resume.
    Running,
}

/// How the host reaches a restored guest.
pub(crate) enum GuestLink {
    /// The raw channel; the guest has not heard from this host yet.
    Stream(UnixStream),
    /// A connection already serving (a pooled VM that was warmed up), and
    /// its socket.
    Conn(Arc<GuestConn>, Option<std::os::fd::OwnedFd>),
}

/// A launched VM, its restored channel (None after a cold boot) and the reference to release.
type Launched = (Box<dyn Vm>, Option<RestoredChannel>, Option<String>);

impl Agent {
    /// Sandboxes (id, or name when it has one) whose record says they run from
    /// `name`: the sandboxes this daemon started and any a previous daemon left
    /// running and this one took over, since records survive a restart.
    fn sandboxes_started_from(&self, source: WarmSource, name: &str) -> Vec<String> {
        let map = lock(&self.inner.sandboxes);
        let mut v: Vec<String> = map
            .values()
            .filter_map(|e| {
                let r = lock(&e.record);
                let from_it = !r.status.is_terminal()
                    && r.started_from.as_deref() == Some(name)
                    && r.start_path.is_some_and(|p| source.started_by(p));
                from_it.then(|| r.name.clone().unwrap_or_else(|| r.id.clone()))
            })
            .collect();
        v.sort();
        v
    }

    /// How many sandboxes depend on `name`: running from it, or starting from it.
    pub(crate) fn in_use(&self, source: WarmSource, name: &str) -> u32 {
        let starting = self.inner.warm.refs(&source.key(name));
        let running = self.sandboxes_started_from(source, name).len() as u32;
        // why: sandboxes of this run are in both; ones taken over after a restart only in records.
        starting.max(running)
    }

    /// Renames the directory `dir` of template or snapshot `name` out of the way
    /// (to `.rm-*` beside it) unless a sandbox depends on it, and returns the new
    /// path for the caller to delete. The check and the rename happen under the
    /// reference lock, so no restore can take a reference in between.
    pub(crate) fn detach_unused(
        &self,
        source: WarmSource,
        name: &str,
        dir: &Path,
    ) -> Result<PathBuf, AgentError> {
        let noun = source.noun();
        let refs = lock(&self.inner.warm.refs);
        let starting = refs.get(&source.key(name)).copied().unwrap_or(0);
        let users = self.sandboxes_started_from(source, name);
        if starting > 0 || !users.is_empty() {
            // why: a reference is taken before the sandbox's record names its source.
            let pending = (starting as usize).saturating_sub(users.len());
            let mut what = Vec::new();
            if !users.is_empty() {
                what.push(format!("sandbox(es) {} started from it", users.join(", ")));
            }
            if pending > 0 {
                what.push(format!("{pending} sandbox(es) starting from it"));
            }
            let stop = if users.is_empty() {
                "wait for them to start and stop them".to_string()
            } else {
                format!("stop them first (`hearth stop {}`)", users.join(" "))
            };
            return Err(AgentError::Conflict(format!(
                "{noun} '{name}' is in use by {}; {stop}",
                what.join(" and ")
            )));
        }
        let parent = dir.parent().unwrap_or(dir);
        let away = parent.join(format!("{REMOVING_PREFIX}{}", crate::sandbox::new_id()));
        std::fs::rename(dir, &away).map_err(crate::sandbox::io_err(format!(
            "remove {noun} '{name}' (rename {} to {})",
            dir.display(),
            away.display()
        )))?;
        drop(refs);
        Ok(away)
    }

    /// Picks the start path of an image sandbox: the template's pool, else the
    /// template, else a cold boot. A template fits when the request leaves cpus
    /// and memory unset or asks for the template's. Returns the final cpus/memory.
    pub(crate) fn choose_launch(
        &self,
        req: &CreateSandbox,
        image_digest: &str,
        cpus: u32,
        memory_mib: u32,
    ) -> (Launch, u32, u32) {
        if req.cold {
            let note = Some("cold boot requested".to_string());
            return (Launch::Cold { note }, cpus, memory_mib);
        }
        let Some(t) = self.find_template(image_digest, req.cpus, req.memory_mib) else {
            return (Launch::Cold { note: None }, cpus, memory_mib);
        };
        let meta_file = self.template_dir(&t.name).join("template.json");
        if !self
            .inner
            .warm
            .try_acquire(&template_key(&t.name), || meta_file.exists())
        {
            let note = Some(format!(
                "template '{}' was removed while this sandbox started; booted cold",
                t.name
            ));
            return (Launch::Cold { note }, cpus, memory_mib);
        }
        if let Some(vm) = self.take_pooled(&t.name) {
            let launch = Launch::Pooled {
                template: t.name.clone(),
                vm,
            };
            return (launch, t.cpus, t.memory_mib);
        }
        let note = (t.pool_size > 0).then(|| {
            format!(
                "warm pool of template '{}' is empty; restored from the template",
                t.name
            )
        });
        let launch = Launch::Restore {
            path: StartPath::Template,
            name: t.name.clone(),
            dir: self.template_dir(&t.name),
            attach: None,
            next_session: crate::template::TEMPLATE_NEXT_SESSION,
            note,
            nic: t.nic,
            nic_mode: NicMode::Hub,
            guarded: t.restore_guard,
        };
        (launch, t.cpus, t.memory_mib)
    }

    /// Undoes a launch that will not run (the sandbox could not be registered).
    pub(crate) async fn abandon(&self, launch: Launch) {
        let key = launch.ref_key();
        match launch {
            Launch::Pooled { vm, .. } => self.discard_pooled(vm).await,
            Launch::Restoring { restore, .. } => {
                if let Ok(Ok(r)) = restore.await {
                    let _ = r.vm.kill().await;
                    let _ = r.vm.wait().await;
                    let _ = hearth_vmm::destroy(r.vm.dir());
                }
            }
            _ => {}
        }
        self.release(key);
    }

    /// Starts restoring the VM of sandbox `id` from its template now, on hub 0
    /// without a tap, when the start is a networked template restore: the
    /// restore then runs while the host network is set up, and the sandbox's
    /// tap joins the restored (still paused) VM once its policy programs are
    /// attached ([`Agent::launch_vm`]). Other launches are returned unchanged.
    pub(crate) fn start_restore_early(
        &self,
        launch: Launch,
        id: &str,
        name: Option<&str>,
        (cpus, memory_mib): (u32, u32),
    ) -> Launch {
        let dir = match &launch {
            Launch::Restore {
                path: StartPath::Template,
                nic: true,
                nic_mode: NicMode::Hub,
                dir,
                ..
            } => dir.clone(),
            _ => return launch,
        };
        // why: a config the normal path cannot build either fails there, with its error.
        let Ok(cfg) = self.vm_config(
            id,
            name,
            PathBuf::new(),
            (cpus, memory_mib),
            None,
            Some(NicMode::Hub),
        ) else {
            return launch;
        };
        let agent = self.clone();
        let restore = tokio::spawn(async move { agent.restore_from(&dir, &cfg).await });
        Launch::Restoring {
            launch: Box::new(launch),
            restore,
        }
    }

    pub(crate) fn release(&self, key: Option<String>) {
        if let Some(k) = key {
            self.inner.warm.release(&k);
        }
    }

    /// Brings up the VM of `entry` along `launch`, recording the path taken. A
    /// failed template restore falls back to a cold boot (and says so).
    pub(crate) async fn launch_vm(
        &self,
        entry: &Entry,
        cfg: &VmConfig,
        launch: Launch,
        net: Option<GuestNet>,
    ) -> Result<Launched, (String, Option<String>)> {
        let mut key = launch.ref_key();
        let nic = launch.nic().is_some();
        let channel = |link, attach, next_session, guarded| RestoredChannel {
            link,
            attach,
            next_session,
            hostname: cfg.hostname.clone(),
            sandbox_id: cfg.id.clone(),
            nic,
            net: net.clone(),
            guarded,
            net_kept: false,
            resume: Resume::Restored,
        };
        // why: a warm start's path is usually saved with its registration
        // (`Launch::preset_path`); saved here only when it differs. A path
        // that cannot be saved fails the start: the record naming its
        // template or snapshot is what keeps that in use after a restart.
        let record = |path: StartPath, from: Option<&str>, note: Option<String>| {
            let r = entry.snapshot();
            if r.start_path == Some(path)
                && r.started_from.as_deref() == from
                && r.start_note == note
            {
                return Ok(());
            }
            entry
                .update(|r| {
                    r.start_path = Some(path);
                    r.started_from = from.map(str::to_string);
                    r.start_note = note;
                })
                .map_err(|e| {
                    format!(
                        "cannot save the start path of sandbox {} in {} ({e}); free space there and create it again",
                        cfg.id,
                        entry.dir.display()
                    )
                })
        };
        let drop_restored = |r: hearth_vmm::RestoredVm| async move {
            let _ = r.vm.kill().await;
            let _ = r.vm.wait().await;
            let _ = hearth_vmm::destroy(r.vm.dir());
        };
        let cold_note = match launch {
            Launch::Cold { note } => note,
            Launch::Restoring { launch, restore } => {
                let Launch::Restore {
                    path,
                    name,
                    attach,
                    next_session,
                    note,
                    guarded,
                    ..
                } = *launch
                else {
                    unreachable!("only template restores are started early");
                };
                let restored = match restore.await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("restore task panicked: {e}")),
                };
                match restored {
                    Ok(r) => {
                        entry.trace.mark("restored");
                        // why: the tap joins only now, after its policy programs
                        // were attached (setup_network ran before the lifecycle).
                        if let Some(tap) = cfg.net.as_ref().and_then(|n| n.tap.as_deref()) {
                            if let Err(e) = r.vm.attach_tap(tap).await {
                                drop_restored(r).await;
                                return Err((
                                    format!("cannot attach tap {tap} to the VM restored from template '{name}': {e}"),
                                    key,
                                ));
                            }
                            entry.trace.mark("tap-attached");
                        }
                        if let Err(m) = record(path, Some(&name), note) {
                            drop_restored(r).await;
                            return Err((m, key));
                        }
                        entry.trace.mark("start-path-saved");
                        let link = GuestLink::Stream(r.agent);
                        return Ok((
                            r.vm,
                            Some(channel(link, attach, next_session, guarded)),
                            key,
                        ));
                    }
                    Err(e) => {
                        self.release(key.take());
                        tracing::warn!(sandbox = %cfg.id, "template restore failed, booting: {e}");
                        Some(format!(
                            "restore from template '{name}' failed ({e}); booted cold"
                        ))
                    }
                }
            }
            Launch::Pooled { template, vm } => {
                if let Err(m) = record(StartPath::Pool, Some(&template), None) {
                    vm.discard().await;
                    return Err((m, key));
                }
                // why: pooled VMs wait with their device on hub 0 and no tap; the
                // sandbox's own tap (lease and policy already set up) joins now,
                // unless it joined while the request's rules were written.
                let tap = cfg.net.as_ref().and_then(|n| n.tap.as_deref());
                if let (Some(tap), false) = (tap, vm.tap_attached) {
                    if let Err(e) = vm.vm.attach_tap(tap).await {
                        vm.discard().await;
                        return Err((
                            format!("cannot attach tap {tap} to the warm pool VM: {e}"),
                            key,
                        ));
                    }
                }
                let PooledVm {
                    vm,
                    conn,
                    chan_fd,
                    guest_net,
                    resumed,
                    ..
                } = vm;
                let next = conn.next_session_id();
                // why: the warm-up's RestoredAck told this connection.
                let guarded = conn.guards_restores();
                let mut ch = channel(GuestLink::Conn(conn, chan_fd), None, next, guarded);
                ch.net_kept = guest_net.is_some() && guest_net.as_deref() == net.as_ref();
                ch.resume = match resumed {
                    true => Resume::Running,
                    false => Resume::Parked,
                };
                return Ok((vm, Some(ch), key));
            }
            Launch::Restore {
                path,
                name,
                dir,
                attach,
                next_session,
                note,
                guarded,
                ..
            } => match self.restore_from(&dir, cfg).await {
                Ok(r) => {
                    entry.trace.mark("restored");
                    if let Err(m) = record(path, Some(&name), note) {
                        drop_restored(r).await;
                        return Err((m, key));
                    }
                    entry.trace.mark("start-path-saved");
                    let link = GuestLink::Stream(r.agent);
                    let ch = channel(link, attach, next_session, guarded);
                    return Ok((r.vm, Some(ch), key));
                }
                Err(e) if path == StartPath::Template => {
                    self.release(key.take());
                    tracing::warn!(sandbox = %cfg.id, "template restore failed, booting: {e}");
                    Some(format!(
                        "restore from template '{name}' failed ({e}); booted cold"
                    ))
                }
                Err(e) => return Err((format!("cannot restore snapshot '{name}': {e}"), key)),
            },
        };
        if let Err(m) = record(StartPath::Cold, None, cold_note) {
            return Err((m, key));
        }
        match self.inner.vmm.create(cfg).await {
            Ok(vm) => Ok((vm, None, key)),
            Err(e) => Err((format!("cannot start VM: {e}"), key)),
        }
    }

    /// Checks the snapshot in `dir` and restores a paused VM from it.
    pub(crate) async fn restore_from(
        &self,
        dir: &Path,
        cfg: &VmConfig,
    ) -> Result<hearth_vmm::RestoredVm, VmmError> {
        let manifest = self.checked_manifest(dir).await?;
        tracing::debug!(vm = %cfg.id, "snapshot {} checked", dir.display());
        self.restore_checked(dir, cfg, manifest).await
    }

    /// Restores a paused VM from the snapshot in `dir` whose `manifest` was
    /// just checked ([`Agent::checked_manifest`]).
    pub(crate) async fn restore_checked(
        &self,
        dir: &Path,
        cfg: &VmConfig,
        manifest: SnapshotManifest,
    ) -> Result<hearth_vmm::RestoredVm, VmmError> {
        let cfg = VmConfig {
            rootfs: manifest.base_rootfs.clone(),
            ..cfg.clone()
        };
        self.inner.vmm.restore(&cfg, dir, &manifest).await
    }

    /// The manifest of `dir` after the checks: quick every time, every byte once per run.
    pub(crate) async fn checked_manifest(&self, dir: &Path) -> Result<SnapshotManifest, VmmError> {
        let warm = &self.inner.warm;
        let m = SnapshotManifest::load(dir)?;
        let key = verified_key(dir, &m);
        let depth = if lock(&warm.verified).contains(&key) {
            Verify::Quick
        } else {
            Verify::Full
        };
        let (d, host, m2) = (dir.to_path_buf(), warm.host.clone(), m.clone());
        tokio::task::spawn_blocking(move || m2.check(&d, &host, depth))
            .await
            .map_err(|e| VmmError::SnapshotInvalid {
                dir: dir.to_path_buf(),
                reason: format!("check panicked: {e}"),
            })??;
        if depth == Verify::Full {
            lock(&warm.verified).insert(key);
        }
        Ok(m)
    }

    /// Tells a restored guest who it is now, resumes it and waits for its ack.
    /// The session to continue (`ch.attach`) is taken over before the guest runs,
    /// so none of its output is dropped. Otherwise, for a guest known to guard
    /// restores (`ch.guarded`), `exec` (the new workload) is queued right behind
    /// `Restored`, before the resume: the guest applies `Restored` before it
    /// reads the exec, and refuses it when it could not reseed or take its
    /// network; the host then fails the start on the ack. Any other guest (a
    /// template or snapshot saved by an older build) would run it regardless,
    /// so there the exec is left to the caller, after the ack (no session is
    /// returned). `while_acking` runs while the resumed guest applies
    /// `Restored`, given the id of the workload's session when one was queued
    /// (host work that needs it, e.g. saving the takeover record); its result
    /// is returned after the ack's checks passed.
    pub(crate) async fn wake_restored<T, F>(
        &self,
        vm: &dyn Vm,
        ch: RestoredChannel,
        exec: Option<&hearth_proto::ExecRequest>,
        trace: &crate::start_trace::StartTrace,
        while_acking: impl FnOnce(Option<u32>) -> F,
    ) -> Result<(Arc<GuestConn>, Option<Session>, u64, T), String>
    where
        F: std::future::Future<Output = T>,
    {
        let mut msg = restored_message(ch.hostname, ch.sandbox_id, ch.nic, ch.net)?;
        msg.net_kept = ch.net_kept && msg.net.is_some();
        let (conn, ack) = match ch.link {
            GuestLink::Stream(stream) => GuestConn::after_restore(stream, &msg, ch.next_session)
                .await
                .map_err(|e| e.to_string())?,
            GuestLink::Conn(conn, _) => {
                let ack = conn.restored_again(&msg).await.map_err(|e| e.to_string())?;
                (conn, ack)
            }
        };
        let mut attached = ch.attach.map(|id| conn.attach(id));
        let mut queued = None;
        if let (None, Some(req), true) = (&attached, exec, ch.guarded) {
            let s = conn
                .exec(req)
                .await
                .map_err(|e| format!("cannot start the workload: {e}"))?;
            queued = Some(s.id());
            attached = Some(s);
        }
        let t0 = std::time::Instant::now();
        match ch.resume {
            Resume::Restored => vm.start().await.map_err(|e| e.to_string())?,
            Resume::Parked => vm.start_paused().await.map_err(|e| e.to_string())?,
            Resume::Running => {}
        }
        let resumed = t0.elapsed();
        trace.mark("resumed");
        let (ack, extra) = tokio::join!(ack.wait(HELLO_TIMEOUT), while_acking(queued));
        let ack = ack.map_err(|e| e.to_string())?;
        trace.mark("restored-ack");
        tracing::info!(vm = %vm.id(), ?resumed, acked = ?t0.elapsed(), "restored guest took its identity");
        // why: guest-supplied text; bounded and quoted so it cannot flood or forge logs.
        for w in ack.warnings.iter().take(8) {
            let w: String = w.chars().take(200).collect();
            tracing::warn!(vm = %vm.id(), "restored guest: {w:?}");
        }
        if let Some(why) = ack_refusal(&msg, &ack) {
            return Err(why);
        }
        // why: the continued session's new output log starts at this offset of
        // its stream (see `PendingAck`); a guest without offsets counts from 0.
        let base = ch
            .attach
            .and_then(|id| ack.sessions.iter().find(|s| s.id == id))
            .map_or(0, |s| s.sent);
        Ok((conn, attached, base, extra))
    }
}

/// Why a restored guest that answered `ack` to `msg` must not be handed out
/// (the guest refuses execs on the same conditions, see `hearth-guest`'s
/// `restore::refusal`): two restores of one snapshot must never share random
/// state, and a guest must have exactly the network it was given, or none
/// when it was given none.
fn ack_refusal(msg: &Restored, ack: &hearth_proto::RestoredAck) -> Option<String> {
    // why: guest-supplied text; bounded and quoted so it cannot flood or forge logs.
    let quoted = |w: &String| w.chars().take(200).collect::<String>();
    if let Some(w) = ack
        .warnings
        .iter()
        .find(|w| w.starts_with("reseeding the RNG"))
    {
        return Some(format!(
            "restored guest could not reseed its RNG ({:?}); not handing it out",
            quoted(w)
        ));
    }
    if msg.net.is_some() && !ack.net_applied {
        let w: Vec<String> = ack.warnings.iter().take(4).map(quoted).collect();
        return Some(format!(
            "restored guest did not take its network address and MAC ({w:?}; a guest built before network restores ignores them); recreate the template or snapshot with this hearthd"
        ));
    }
    // why: by the warning, not by `net_applied`: a guest built before network
    // restores says false and has eth0 down from its template all the same.
    if let Some(w) = ack
        .warnings
        .iter()
        .find(|w| msg.net_given && msg.net.is_none() && w.starts_with("configuring the network"))
    {
        return Some(format!(
            "restored guest could not take eth0 down ({:?}), and the sandbox must have no network (--network none); not running the workload in it; retry, or start it without --network none",
            quoted(w)
        ));
    }
    None
}

/// A [`Restored`] message with fresh entropy and the host's clock; with `nic`,
/// the guest's network (`None`: take eth0 down).
pub(crate) fn restored_message(
    hostname: String,
    sandbox_id: String,
    nic: bool,
    net: Option<GuestNet>,
) -> Result<Restored, String> {
    let mut seed = vec![0u8; 64];
    getrandom::fill(&mut seed).map_err(|e| format!("no host randomness for the guest: {e}"))?;
    Ok(Restored {
        seed,
        unix_ms: now_ms(),
        hostname,
        sandbox_id,
        net: net.filter(|_| nic),
        net_given: nic,
        net_kept: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::RestoredAck;

    fn ack(net_applied: bool, warnings: &[&str]) -> RestoredAck {
        RestoredAck {
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
            sessions: Vec::new(),
            net_applied,
            restore_guard: true,
            sent_first: true,
        }
    }

    #[test]
    fn a_guest_that_kept_a_network_it_must_not_have_is_not_handed_out() {
        let none = restored_message("h".into(), "s".into(), true, None).unwrap();
        assert_eq!(ack_refusal(&none, &ack(true, &[])), None);
        let why = ack_refusal(
            &none,
            &ack(false, &["configuring the network: take eth0 down: EPERM"]),
        )
        .expect("refused");
        assert!(
            why.contains("could not take eth0 down") && why.contains("--network none"),
            "{why}"
        );
        // A guest built before network restores says nothing and keeps eth0
        // down as its template had it.
        assert_eq!(ack_refusal(&none, &ack(false, &[])), None);
        // Without a network device there is nothing to take down.
        let nicless = restored_message("h".into(), "s".into(), false, None).unwrap();
        assert_eq!(
            ack_refusal(&nicless, &ack(false, &["configuring the network: x"])),
            None
        );
    }

    #[test]
    fn a_guest_without_a_fresh_rng_or_its_given_network_is_not_handed_out() {
        let net = GuestNet {
            ip: "10.88.0.7".into(),
            prefix: 32,
            gateway: "169.254.1.1".into(),
            mac: "02:68:0a:58:00:07".into(),
            dns: Vec::new(),
        };
        let given = restored_message("h".into(), "s".into(), true, Some(net)).unwrap();
        assert_eq!(ack_refusal(&given, &ack(true, &[])), None);
        let why = ack_refusal(&given, &ack(false, &[])).expect("refused");
        assert!(why.contains("network address and MAC"), "{why}");
        let why = ack_refusal(&given, &ack(true, &["reseeding the RNG: EPERM"])).expect("refused");
        assert!(why.contains("reseed its RNG"), "{why}");
    }
}
