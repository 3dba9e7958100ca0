//! Warm pools: per template, N VMs already restored from it and paused, so a
//! request pays only resume + dispatch.
//!
//! One filler task per template keeps `ready` at the target size, restoring one
//! VM at a time (a restore storm would starve the VMs that serve requests). Each
//! VM is warmed up before it is parked: resumed, told `Restored` once, made to
//! run one process that prints, paused again. So the guest's exec path is already faulted in
//! (and, under TCG, translated) when a request takes it; the request still sends
//! a fresh `Restored` (new entropy, clock, hostname) before its workload. A
//! pooled VM is restored under the sandbox id it will get when taken, in
//! `sandboxes/<id>/vm`, with no `sandbox.json` until then; a daemon that
//! restarts kills such unclaimed VMs ([`Agent::reap_unclaimed_pool_vms`]) and
//! removes their networks as orphans.
//!
//! On a node with networking a pooled VM's network is prepared ahead of a
//! request under that id (lease, tap, programs with a deny-everything policy,
//! route, NAT; no tap attached to the VM): a networked request only writes its
//! rules into the maps and joins the tap. A VM discarded unused gives it back
//! ([`Agent::discard_pooled`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_proto::ExecRequest as GuestExec;
use hearth_vmm::Vm;
use tokio::sync::Notify;

use crate::guest_conn::{GuestConn, SessionEvent};
use crate::restore::{restored_message, REMOVING_PREFIX};
use crate::sandbox::{lock, new_id, Agent, HELLO_TIMEOUT};
use crate::template::TemplateMeta;
use crate::template::TEMPLATE_NEXT_SESSION;

/// Bound on the warm-up process of a pooled VM.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a filler waits after a failed restore before trying again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// A VM restored from a template, warmed up and paused, its guest connection live.
pub(crate) struct PooledVm {
    /// The sandbox id it was restored under.
    pub(crate) id: String,
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) conn: Arc<GuestConn>,
    /// The guest channel's socket (its `TIOCOUTQ` is read at a migration's
    /// switch-over).
    pub(crate) chan_fd: Option<std::os::fd::OwnedFd>,
    /// Restored with the template's network device (on hub 0, no tap yet).
    pub(crate) nic: bool,
    /// The network prepared for it ahead of a request (lease, tap, policy
    /// programs with a deny-everything policy, route, NAT): a request only
    /// writes its rules into the maps and joins the tap. `None` when the node
    /// has no networking or the preparation failed (the request sets it up).
    pub(crate) net: Option<hearth_net::SandboxNet>,
    /// The network the guest took at fill time (the warm-up's `Restored`
    /// carried `net`'s address and MAC, and the guest acknowledged them): a
    /// request that gives it the same one tells it to keep eth0 as it is.
    pub(crate) guest_net: Option<Box<hearth_proto::GuestNet>>,
    /// The taking sandbox's tap already joined its hub (set by the request).
    pub(crate) tap_attached: bool,
    /// The taking request resumed it already (after its tap joined).
    pub(crate) resumed: bool,
}

impl PooledVm {
    /// Ends the VM and removes its directory; its prepared network, if any,
    /// is left to the caller (see [`Agent::discard_pooled`]).
    pub(crate) async fn discard(self) {
        let _ = self.vm.kill().await;
        let _ = self.vm.wait().await;
        let vm_dir = self.vm.dir().to_path_buf();
        let _ = hearth_vmm::destroy(&vm_dir);
        if let Some(sandbox_dir) = vm_dir.parent() {
            let _ = std::fs::remove_dir(sandbox_dir);
        }
    }
}

#[derive(Default)]
struct Pool {
    target: AtomicU32,
    ready: Mutex<VecDeque<PooledVm>>,
    wake: Notify,
    closed: AtomicBool,
    /// The pool's fill task: [`Agent::close_pool`] waits for it, so a VM it
    /// took or was restoring is gone with its network when the close returns.
    filler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The warm pools of this node.
#[derive(Default)]
pub(crate) struct Pools {
    map: Mutex<HashMap<String, Arc<Pool>>>,
}

/// The policy of a pool VM's prepared network until a request gives it its
/// own: nothing in or out (its tap joins the VM only with the request's rules).
fn idle_pool_policy() -> hearth_net::Policy {
    let deny = hearth_net::RuleSet {
        default: hearth_net::Action::Deny,
        rules: Vec::new(),
    };
    hearth_net::Policy {
        egress: deny.clone(),
        ingress: deny,
    }
}

impl Agent {
    /// Ends a pool VM that no request took and gives its prepared network
    /// back (tap, programs, route, NAT entry, lease).
    pub(crate) async fn discard_pooled(&self, vm: PooledVm) {
        let net = vm.net.as_ref().map(|n| n.sandbox.clone());
        vm.discard().await;
        if let Some(id) = net {
            self.release_pool_network(&id).await;
        }
    }

    /// Removes the prepared network of pool VM `id` and releases its lease.
    pub(crate) async fn release_pool_network(&self, id: &str) {
        let Some(node) = self.net() else { return };
        let id2 = id.to_string();
        let n2 = node.clone();
        match tokio::task::spawn_blocking(move || n2.teardown(&id2)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = id, "removing the network of a pool VM: {e}"),
            Err(e) => tracing::warn!(vm = id, "removing the network of a pool VM panicked: {e}"),
        }
        // why: as [`Agent::drop_network`]: whenever the local lease is gone
        // (even after a partial teardown) the upstream one is released; one
        // still held locally is released with its orphan at the next start.
        if !node.leases().contains_key(id) {
            self.release_address(id).await;
        }
    }

    /// Stops every pool and ends its VMs, giving back their prepared networks
    /// and leases, and waits for the pool VM networks `--network none` starts
    /// are giving back (graceful daemon shutdown: a stopped agent must not
    /// keep its pool VMs' addresses taken). A VM still being restored when
    /// this runs is ended by its fill task or, if the daemon exits first,
    /// reaped at the next start ([`Agent::reap_unclaimed_pool_vms`]), as a
    /// release cut short is finished there.
    pub async fn close_pools(&self) {
        let names: Vec<String> = lock(&self.inner.warm.pools.map).keys().cloned().collect();
        for name in names {
            self.close_pool(&name).await;
        }
        let entries: Vec<Arc<crate::sandbox::Entry>> =
            lock(&self.inner.sandboxes).values().cloned().collect();
        for e in entries {
            e.released().await;
        }
    }

    /// Leases an address for pool VM `id` and builds its network with
    /// [`idle_pool_policy`], so a networked request taking the VM pays for
    /// neither. `None` (logged) when that fails: the request sets it up.
    async fn prepare_pool_network(&self, id: &str) -> Option<hearth_net::SandboxNet> {
        let node = self.net()?;
        let ip = match self.acquire_address(id).await {
            Ok(ip) => ip,
            Err(e) => {
                tracing::warn!(vm = id, "no address for a pool VM ahead of a request: {e}");
                // why: an acquire may commit upstream and then time out here;
                // a pool VM whose preparation failed must hold no lease.
                self.release_address(id).await;
                return None;
            }
        };
        let id2 = id.to_string();
        let built =
            tokio::task::spawn_blocking(move || node.setup_with(&id2, ip, idle_pool_policy()))
                .await;
        match built {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => {
                tracing::warn!(vm = id, "preparing the network of a pool VM: {e}");
                self.release_address(id).await;
                None
            }
            Err(e) => {
                tracing::warn!(vm = id, "preparing the network of a pool VM panicked: {e}");
                self.release_address(id).await;
                None
            }
        }
    }

    /// Starts the pools of every template on disk (at daemon start).
    pub(crate) fn start_pools(&self) {
        for t in self.template_metas() {
            if t.pool_size == 0 {
                // why: the first restore checksums every byte of the template once per
                // run; do it now rather than on a request (a filler does it anyway).
                let agent = self.clone();
                let dir = self.template_dir(&t.name);
                tokio::spawn(async move {
                    if let Err(e) = agent.checked_manifest(&dir).await {
                        tracing::warn!("template {}: {e}", dir.display());
                    }
                });
            }
            self.ensure_pool(&t);
        }
    }

    /// Creates or resizes the pool of `t`; its filler does the rest.
    pub(crate) fn ensure_pool(&self, t: &TemplateMeta) {
        let mut map = lock(&self.inner.warm.pools.map);
        if let Some(p) = map.get(&t.name) {
            p.target.store(t.pool_size, Ordering::Relaxed);
            p.wake.notify_one();
            return;
        }
        if t.pool_size == 0 {
            return;
        }
        let pool = Arc::new(Pool::default());
        pool.target.store(t.pool_size, Ordering::Relaxed);
        map.insert(t.name.clone(), pool.clone());
        let agent = self.clone();
        let name = t.name.clone();
        let filling = pool.clone();
        *lock(&pool.filler) = Some(tokio::spawn(async move { agent.fill(name, filling).await }));
    }

    /// VMs ready in the pool of `template`.
    pub(crate) fn pool_ready(&self, template: &str) -> u32 {
        lock(&self.inner.warm.pools.map)
            .get(template)
            .map(|p| lock(&p.ready).len() as u32)
            .unwrap_or(0)
    }

    /// Takes a ready VM from the pool of `template`, if there is one.
    pub(crate) fn take_pooled(&self, template: &str) -> Option<PooledVm> {
        let pool = lock(&self.inner.warm.pools.map).get(template).cloned()?;
        let vm = lock(&pool.ready).pop_front();
        pool.wake.notify_one();
        vm
    }

    /// Stops the pool of `template` and ends its VMs.
    pub(crate) async fn close_pool(&self, template: &str) {
        let Some(pool) = lock(&self.inner.warm.pools.map).remove(template) else {
            return;
        };
        pool.closed.store(true, Ordering::Relaxed);
        pool.wake.notify_one();
        let vms: Vec<PooledVm> = lock(&pool.ready).drain(..).collect();
        for vm in vms {
            self.discard_pooled(vm).await;
        }
        // why: the fill task may have drained the ready VMs first (it also
        // ends them when it sees the pool closed), or be restoring one; a
        // daemon that exits before it is done leaves that VM's tap behind.
        let filler = lock(&pool.filler).take();
        if let Some(task) = filler {
            let _ = task.await;
        }
    }

    async fn fill(self, template: String, pool: Arc<Pool>) {
        let dir = self.template_dir(&template);
        loop {
            if pool.closed.load(Ordering::Relaxed) {
                let vms: Vec<PooledVm> = lock(&pool.ready).drain(..).collect();
                for vm in vms {
                    self.discard_pooled(vm).await;
                }
                return;
            }
            let have = lock(&pool.ready).len() as u32;
            let target = pool.target.load(Ordering::Relaxed);
            if have > target {
                let extra = lock(&pool.ready).pop_back();
                if let Some(vm) = extra {
                    self.discard_pooled(vm).await;
                }
                continue;
            }
            if have == target {
                pool.wake.notified().await;
                continue;
            }
            let Some(meta) = self.template_meta(&template) else {
                tracing::warn!(template, "template gone; its pool stops");
                return;
            };
            // why: checked before a lease is taken: a template that cannot be
            // restored (corrupted, truncated, from another kernel) must not
            // take and give back an address and tap every few seconds.
            let manifest = match self.checked_manifest(&dir).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        template,
                        "warm pool restore failed: {e}; no VM is pooled until the template is fixed or recreated"
                    );
                    let _ = tokio::time::timeout(RETRY_AFTER_FAILURE, pool.wake.notified()).await;
                    continue;
                }
            };
            let mut id = new_id();
            while self.sandbox_dir(&id).exists() {
                id = new_id();
            }
            let cfg = match self.vm_config(
                &id,
                None,
                Default::default(),
                (meta.cpus, meta.memory_mib),
                None,
                meta.nic.then_some(crate::restore::NicMode::Hub),
            ) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(template, "cannot configure a pool VM, its pool stops: {e}");
                    return;
                }
            };
            // why: the network is prepared while the VM is restored, so the
            // warm-up's `Restored` can give the guest its address and MAC: a
            // request then finds eth0 configured (the slowest part of a pool
            // start under TCG was the guest reconfiguring it). A restore that
            // fails after the checks gives it back below.
            let prepare = async {
                match meta.nic {
                    true => self.prepare_pool_network(&id).await,
                    false => None,
                }
            };
            let (restored, net) = tokio::join!(self.restore_checked(&dir, &cfg, manifest), prepare);
            let guest_net = net.as_ref().map(crate::restore::guest_net);
            let made = match restored {
                Ok(r) => match warm_up(r.vm.as_ref(), r.agent, &id, meta.nic, guest_net).await {
                    Ok((conn, chan_fd, guest_net)) => Ok(PooledVm {
                        id: id.clone(),
                        vm: r.vm,
                        conn,
                        chan_fd,
                        nic: meta.nic,
                        net,
                        guest_net: guest_net.map(Box::new),
                        tap_attached: false,
                        resumed: false,
                    }),
                    Err(e) => {
                        let _ = r.vm.kill().await;
                        let _ = r.vm.wait().await;
                        let _ = hearth_vmm::destroy(&cfg.dir);
                        if let Some(n) = &net {
                            self.release_pool_network(&n.sandbox).await;
                        }
                        Err(e)
                    }
                },
                Err(e) => {
                    if let Some(n) = &net {
                        self.release_pool_network(&n.sandbox).await;
                    }
                    Err(e.to_string())
                }
            };
            match made {
                Ok(vm) => {
                    if pool.closed.load(Ordering::Relaxed) {
                        self.discard_pooled(vm).await;
                    } else {
                        lock(&pool.ready).push_back(vm);
                    }
                }
                Err(e) => {
                    tracing::warn!(template, "warm pool restore failed: {e}");
                    let _ = std::fs::remove_dir_all(self.sandbox_dir(&id));
                    let _ = tokio::time::timeout(RETRY_AFTER_FAILURE, pool.wake.notified()).await;
                }
            }
        }
    }

    /// Kills VMs a previous daemon left in its pools (sandbox dirs without sandbox.json).
    pub(crate) async fn reap_unclaimed_pool_vms(&self) {
        let Ok(rd) = std::fs::read_dir(self.inner.cfg.data_dir.join("sandboxes")) else {
            return;
        };
        for ent in rd.flatten() {
            let dir = ent.path();
            if dir.join("sandbox.json").exists() || !dir.join("vm").exists() {
                continue;
            }
            self.remove_leftover_dir(&dir).await;
        }
        // Template builds, snapshot saves and removals a previous daemon did not finish.
        let (templates, snapshots) = (
            self.inner.cfg.data_dir.join("templates"),
            self.inner.cfg.data_dir.join("snapshots"),
        );
        for (root, prefix) in [
            (&templates, ".build-"),
            (&snapshots, ".tmp-"),
            (&templates, REMOVING_PREFIX),
            (&snapshots, REMOVING_PREFIX),
        ] {
            let Ok(rd) = std::fs::read_dir(root) else {
                continue;
            };
            for ent in rd.flatten() {
                if ent.file_name().to_string_lossy().starts_with(prefix) {
                    self.reap_dir(&ent.path()).await;
                    tracing::info!("removed unfinished {}", ent.path().display());
                }
            }
        }
    }

    /// The start-up clean-up of a sandbox dir a previous hearthd left without
    /// `sandbox.json` (both start-up paths use it: the pool reaper and
    /// `load_records`). A dir with `sandbox.json` is a sandbox and is kept
    /// (re-adopted; an incoming migration's commit saves it, fsynced, before
    /// it resumes the VM). One without is a pool VM, a create cut short or an
    /// incoming migration never committed: its VM is stopped, the dir removed
    /// and the id recorded as removed uncommitted (issue 7), so a source
    /// asking after this restart hears so and resumes its copy; pool VM dirs
    /// are recorded as well (nothing on disk tells them from an incoming
    /// migration's in every window; a needless entry only takes one of the
    /// bounded slots). Except a dir with [`RESUMED_MARKER`]: a hearthd of
    /// commit c7504fa resumed that incoming VM before saving its records, so
    /// its guest ran here: the source must not resume, and its question stays
    /// unanswered (paused, an operator resolves it).
    ///
    /// [`RESUMED_MARKER`]: crate::migration::RESUMED_MARKER
    pub(crate) async fn remove_leftover_dir(&self, dir: &std::path::Path) {
        if dir.join("sandbox.json").exists() {
            return;
        }
        let resumed = dir.join(crate::migration::RESUMED_MARKER).exists();
        if !self.stop_recorded_vm(&dir.join("vm")).await {
            return;
        }
        let _ = hearth_vmm::destroy(&dir.join("vm"));
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
        if resumed {
            tracing::warn!(
                "removed {}: an incoming migration whose VM an older hearthd had resumed before saving its records; its source stays paused until resolved",
                dir.display()
            );
        } else if !dir.exists() {
            tracing::warn!(
                "removed {} (no sandbox.json: a pool VM or an incoming migration that was never committed)",
                dir.display()
            );
            if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
                self.inner.migrations.note_removed_uncommitted(id);
            }
        }
    }

    /// Stops the VM recorded in `vm_dir` (adopting it, or by its recorded
    /// pid). False if it may still run (its record must then be kept).
    async fn stop_recorded_vm(&self, vm_dir: &std::path::Path) -> bool {
        match hearth_vmm::Vmm::adopt(&self.inner.vmm, vm_dir).await {
            Ok(vm) => {
                let _ = vm.kill().await;
                let _ = vm.wait().await;
                true
            }
            Err(_) => match hearth_vmm::kill_recorded(vm_dir, std::time::Duration::from_secs(10)) {
                Ok(_) => true,
                Err(e) => {
                    // why: never delete the record of a VM that may still run.
                    tracing::error!(
                        "cannot stop the VM in {}: {e}; left in place",
                        vm_dir.display()
                    );
                    false
                }
            },
        }
    }

    /// Stops the VM recorded in `dir/vm` (adopting it, or by its recorded pid)
    /// and removes `dir`.
    async fn reap_dir(&self, dir: &std::path::Path) {
        let vm_dir = dir.join("vm");
        if !self.stop_recorded_vm(&vm_dir).await {
            return;
        }
        let _ = hearth_vmm::destroy(&vm_dir);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The longest hold [`release_hold`] makes, whatever the variable says.
const MAX_RELEASE_HOLD_MS: u64 = 30_000;

/// Fault injection for tests: with `HEARTH_POOL_RELEASE_HOLD=<ms>` the
/// background release of the pool VM network a `--network none` start gives
/// back waits `ms` first (at most 30 s), so a test can stop hearthd before it
/// ran. Unset (always, outside tests) it costs one environment lookup.
pub(crate) async fn release_hold() {
    let Some(ms) = std::env::var("HEARTH_POOL_RELEASE_HOLD")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| ms.min(MAX_RELEASE_HOLD_MS))
    else {
        return;
    };
    tracing::warn!(
        ms,
        "HEARTH_POOL_RELEASE_HOLD: holding a pool VM network release (fault injection for tests)"
    );
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Wakes a freshly restored VM, gives it `net` (its prepared network; `None`:
/// eth0 down), runs one short process in it, and pauses it again. Returns the
/// connection, its socket and the network the guest took (`None` when it did
/// not).
type WarmedUp = (
    Arc<GuestConn>,
    Option<std::os::fd::OwnedFd>,
    Option<hearth_proto::GuestNet>,
);

async fn warm_up(
    vm: &dyn Vm,
    agent: tokio::net::UnixStream,
    id: &str,
    nic: bool,
    net: Option<hearth_proto::GuestNet>,
) -> Result<WarmedUp, String> {
    let msg = restored_message(id.to_string(), id.to_string(), nic, net)?;
    let chan_fd = crate::sandbox::stream_fd(&agent);
    let (conn, ack) = GuestConn::after_restore(agent, &msg, TEMPLATE_NEXT_SESSION)
        .await
        .map_err(|e| e.to_string())?;
    vm.start().await.map_err(|e| e.to_string())?;
    let ack = ack.wait(HELLO_TIMEOUT).await.map_err(|e| e.to_string())?;
    // why: a guest that did not take it (an older guest, or a failure it
    // reported) is reconfigured in full by the request's `Restored`.
    let mut taken = msg.net.filter(|_| ack.net_applied);
    if let Some(net) = taken.clone() {
        // why: a request's `Restored` keeps this network (`net_kept`): the
        // guest then checks that eth0 still holds it and announces it, kernel
        // paths (interface ioctls, the route table in /proc, a packet socket)
        // its first `Restored` did not run. Under TCG their first run is
        // translated, which made a networked pool start's ack ~16 ms slower
        // than a `--network none` one; run once here, the same QEMU process
        // keeps them translated for the request.
        let mut again = restored_message(id.to_string(), id.to_string(), nic, Some(net))?;
        again.net_kept = true;
        let ack = conn
            .restored_again(&again)
            .await
            .map_err(|e| e.to_string())?
            .wait(HELLO_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        if !ack.net_applied {
            taken = None;
        }
    }
    run_warm_up(&conn).await?;
    vm.pause().await.map_err(|e| e.to_string())?;
    Ok((conn, chan_fd, taken))
}

/// Runs `echo` in the guest and waits for it to end (its output is dropped).
pub(crate) async fn run_warm_up(conn: &Arc<GuestConn>) -> Result<(), String> {
    // why: a process that prints, so the output path (pipe, the guest's pump,
    // the channel) is faulted in and, under TCG, translated too, not only fork
    // and exec; a pool VM is the same QEMU process at request time, so what
    // ran here stays translated. Any image will do: a missing `echo` still
    // exercises fork and exec (127) and prints the guest's error.
    let req = GuestExec {
        argv: vec!["echo".into(), "hearth warm-up".into()],
        ..Default::default()
    };
    let mut session = conn.exec(&req).await.map_err(|e| e.to_string())?;
    let done = async {
        loop {
            match session.next().await {
                Some(SessionEvent::Exit(_)) => return Ok(()),
                Some(SessionEvent::Failed(m)) => return Err(m),
                None => return Err("guest channel closed".to_string()),
                Some(_) => {}
            }
        }
    };
    tokio::time::timeout(WARM_UP_TIMEOUT, done)
        .await
        .map_err(|_| format!("warm-up process did not end within {WARM_UP_TIMEOUT:?}"))?
}
