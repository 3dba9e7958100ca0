//! Sandbox networking on one node.
//!
//! A sandbox gets a tap (`hth<id>`), a /32 from the node's pool (IPAM, leases
//! persisted), a host route to that /32, proxy ARP for its link-local gateway,
//! egress masquerade (nftables) and the eBPF policy (egress and ingress rules,
//! flow tracking, anti-spoof) on the tap. The guest learns its address from
//! `kernel_params`. The node's own addresses, which the policy blocks as
//! egress destinations, are followed live (`NodeNet::open_watched`).
//!
//! `NodeNet` is the shell; `policy` (compilation) and `ipam` (allocation) are
//! pure cores with their I/O at the edges (`policy::maps`, `ipam::LeaseStore`).

pub mod cidr;
pub mod ipam;
mod nat;
pub mod policy;
pub mod registry;
mod tap;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

pub use cidr::{Cidr, CLUSTER_CIDR};
pub use ipam::{FileLeaseStore, Ipam, IpamError, LeaseStore};
pub use policy::maps::BpfError;
pub use policy::{Action, Direction, Policy, PolicyError, Rule, RuleSet};
pub use tap::host_addresses;

/// Taps are named this plus the sandbox id.
pub const TAP_PREFIX: &str = "hth";
/// The guest's default gateway: link-local, answered by the tap's proxy ARP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// How a node's sandbox network is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// This node's slice of the cluster CIDR.
    pub pool: Cidr,
    /// Where leases and per-sandbox network records live.
    pub state_dir: PathBuf,
    /// Nameservers written to the guest's /etc/resolv.conf.
    pub dns: Vec<Ipv4Addr>,
}

/// A networking step failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("tap {tap}: {source}")]
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nat(#[from] nat::NatError),
    #[error(
        "sandbox '{0}' has no network (it was started with --network none or has been removed)"
    )]
    NoNetwork(String),
    #[error(
        "sandbox '{sandbox}' already enforces a newer policy (version {have}) than this one (version {got}); it was left as it is"
    )]
    StalePolicy {
        sandbox: String,
        have: u64,
        got: u64,
    },
    #[error("network record {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl NetError {
    /// True when the caller's input was at fault (bad rules, pool exhausted).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, NetError::Policy(_))
    }
    pub fn is_exhausted(&self) -> bool {
        matches!(self, NetError::Ipam(IpamError::Exhausted { .. }))
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetError::NoNetwork(_))
    }
    /// A policy older than the one enforced ([`NodeNet::set_policy`]).
    pub fn is_stale(&self) -> bool {
        matches!(self, NetError::StalePolicy { .. })
    }
}

/// A sandbox's network, as recorded on disk (`<state_dir>/sandboxes/<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNet {
    pub version: u32,
    pub sandbox: String,
    pub tap: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub policy: Policy,
    /// The control plane's version of `policy` (its record's count of policy
    /// sets), when it set one; 0 for a policy given at the start or by a
    /// node-local `policy set`.
    #[serde(default)]
    pub policy_version: u64,
}

impl SandboxNet {
    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// `hearth.*` kernel parameters telling the guest its network.
    pub fn kernel_params(&self) -> Vec<String> {
        let mut v = vec![
            format!("hearth.ip={}", self.ip),
            format!("hearth.gw={}", self.gateway),
        ];
        if !self.dns.is_empty() {
            let d: Vec<String> = self.dns.iter().map(|a| a.to_string()).collect();
            v.push(format!("hearth.dns={}", d.join(",")));
        }
        v
    }
}

/// Where a sandbox's address comes from.
enum Address {
    /// Leased by the control plane (`Some`) or picked by this node (`None`).
    Leased(Option<Ipv4Addr>),
    /// Kept by a sandbox that migrated here, with its source tap's MAC.
    Moved(Ipv4Addr, [u8; 6]),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A MAC derived from the address: locally administered, unique per address.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x68, o[0], o[1], o[2], o[3]]
}

pub fn tap_name(sandbox: &str) -> String {
    let mut n = format!("{TAP_PREFIX}{sandbox}");
    n.truncate(15);
    n
}

/// One counter of `policy stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterStat {
    pub label: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The node's sandbox networking.
pub struct NodeNet {
    cfg: NetConfig,
    ipam: Ipam,
    /// Serializes setup/teardown/policy changes per sandbox.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// This agent's tag in the host sandbox map.
    owner: u32,
    /// This agent's pool in the host's pool registry (released on drop).
    _registration: registry::Registration,
    /// A policy program instance loaded and verified ahead of the next setup.
    spare: Arc<SpareProgram>,
}

/// The next sandbox's policy program instance, loaded in the background
/// ([`policy::maps::preload`]): a setup takes it and starts loading the next,
/// so the ELF load and the verifier (most of a setup) are off the start's path.
#[derive(Default)]
struct SpareProgram {
    ready: Mutex<Option<policy::maps::Preloaded>>,
    loading: std::sync::atomic::AtomicBool,
    /// The reason the last load failed (logged once per distinct reason).
    last_error: Mutex<Option<String>>,
}

/// Clears [`SpareProgram::loading`] when the loading thread ends, also by a panic.
struct LoadingGuard(Arc<SpareProgram>);

impl Drop for LoadingGuard {
    fn drop(&mut self) {
        self.0
            .loading
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// The niceness of the loading thread: the refill follows the start that took
/// the spare and must not compete with it for the CPU.
const PRELOAD_NICE: libc::c_int = 10;

impl SpareProgram {
    /// The spare instance, if one is ready and still current; starts loading
    /// the next either way.
    fn take(self: &Arc<Self>) -> Option<policy::maps::Preloaded> {
        let got = lock(&self.ready).take().filter(|p| p.is_current());
        self.refill();
        got
    }

    /// Starts loading an instance unless one is ready or loading.
    fn refill(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if lock(&self.ready).is_some() || self.loading.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hearth-bpf-preload".into())
            .spawn(move || {
                let me = LoadingGuard(me);
                // SAFETY: setpriority with PRIO_PROCESS and who 0 changes only
                // the calling thread's niceness on Linux; no memory is passed.
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PRELOAD_NICE) };
                match policy::maps::preload() {
                    Ok(p) => {
                        *lock(&me.0.ready) = Some(p);
                        *lock(&me.0.last_error) = None;
                    }
                    Err(e) => {
                        // why: setups then load their own instance (and fail
                        // with the reason); said once per distinct reason.
                        let reason = e.to_string();
                        let mut last = lock(&me.0.last_error);
                        if last.as_deref() != Some(reason.as_str()) {
                            tracing::warn!(
                                "loading a policy program ahead of use: {reason}; sandbox starts load their own"
                            );
                            *last = Some(reason);
                        }
                    }
                }
            });
        if spawned.is_err() {
            self.loading.store(false, Ordering::Release);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeNet {
    /// Registers the pool (refused when it overlaps the pool of another live
    /// agent on this host), purges the host sandbox map of entries of agents
    /// that are gone, opens the leases, enables forwarding and installs the
    /// NAT table.
    pub fn open(cfg: NetConfig) -> Result<NodeNet, NetError> {
        let mut purged = None;
        let mut taps_removed = Vec::new();
        let mut leftovers = Leftovers::default();
        let registration = registry::register(cfg.pool, &cfg.state_dir, |live| {
            let keep = policy::maps::keep_set(live);
            purged = Some(purge_gone_agents(&live.pools, &keep, &mut taps_removed));
            leftovers = purge_leftovers();
        })?;
        for r in &registration.reclaimed {
            tracing::info!(
                pool = %r.pool,
                pid = r.pid,
                state_dir = %r.state_dir,
                "reclaimed the pool registration of an agent that is gone"
            );
        }
        for (tap, ip) in &taps_removed {
            tracing::info!(%tap, %ip, "removed the tap of an agent that is gone (no VM uses it)");
        }
        for ip in &leftovers.nat {
            tracing::info!(%ip, "removed a NAT set element no sandbox uses (no route to it)");
        }
        for tap in &leftovers.pins {
            tracing::info!(%tap, "removed the BPF pins of a tap that is gone");
        }
        for ns in &leftovers.namespaces {
            tracing::info!(
                netns = ns,
                "removed the pool registry and host map pins of a network namespace that is gone"
            );
        }
        match purged {
            Some(Ok(n)) => tracing::info!(
                purged = n,
                "purged host sandbox map entries of agents that are gone"
            ),
            Some(Err(e)) => tracing::warn!(
                "cannot purge the host sandbox map of agents that are gone: {e}; their addresses stay refused until they are removed"
            ),
            None => {}
        }
        let store = FileLeaseStore::new(cfg.state_dir.join("leases.json"));
        let ipam = Ipam::open(cfg.pool, Box::new(store))?;
        tap::enable_forwarding().map_err(|source| NetError::Tap {
            tap: "ip_forward".into(),
            source,
        })?;
        nat::ensure(TAP_PREFIX)?;
        std::fs::create_dir_all(cfg.state_dir.join("sandboxes")).map_err(|source| {
            NetError::Record {
                path: cfg.state_dir.display().to_string(),
                source,
            }
        })?;
        let spare = Arc::new(SpareProgram::default());
        spare.refill();
        Ok(NodeNet {
            owner: registration.tag(),
            cfg,
            ipam,
            locks: Mutex::new(HashMap::new()),
            _registration: registration,
            spare,
        })
    }

    /// This agent's tag in the host sandbox map (its persisted owner id).
    pub fn owner(&self) -> u32 {
        self.owner
    }

    pub fn pool(&self) -> Cidr {
        self.cfg.pool
    }

    fn sandbox_lock(&self, id: &str) -> Arc<Mutex<()>> {
        lock(&self.locks).entry(id.to_string()).or_default().clone()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("sandboxes")
            .join(format!("{id}.json"))
    }

    fn save(&self, rec: &SandboxNet) -> Result<(), NetError> {
        let path = self.record_path(&rec.sandbox);
        let err = |source| NetError::Record {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(rec).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, data).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// The sandbox's network record.
    pub fn get(&self, id: &str) -> Result<SandboxNet, NetError> {
        let path = self.record_path(id);
        let b = std::fs::read(&path).map_err(|_| NetError::NoNetwork(id.into()))?;
        serde_json::from_slice(&b).map_err(|e| NetError::Record {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })
    }

    /// Opens the node's networking (see [`NodeNet::open`]) and starts a thread
    /// that keeps every sandbox's list of host addresses current: it follows
    /// the kernel's address notifications (netlink) and also refreshes every
    /// 30 s in case a notification was lost. The thread ends with the `NodeNet`.
    pub fn open_watched(cfg: NetConfig) -> Result<Arc<NodeNet>, NetError> {
        let net = Arc::new(NodeNet::open(cfg)?);
        let weak = Arc::downgrade(&net);
        let spawned = std::thread::Builder::new()
            .name("hearth-host-addrs".into())
            .spawn(move || watch_host_addresses(weak));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the host address watcher: {e}; host addresses are read at sandbox start only");
        }
        Ok(net)
    }

    /// Address ranges of sandboxes, denied implicitly as egress destinations:
    /// the cluster CIDR and this node's pool (when it lies outside it, e.g. a
    /// `--net-pool`). Sandboxes of other agents on this host, whatever their
    /// pool, are denied by the program (`SANDBOXES` map).
    pub fn sandbox_ranges(&self) -> Vec<Cidr> {
        vec![CLUSTER_CIDR, self.cfg.pool]
    }

    /// Checks and compiles a policy (the sandbox ranges are denied implicitly).
    pub fn compile(&self, p: &Policy) -> Result<policy::Compiled, NetError> {
        Ok(policy::compile(p, &self.sandbox_ranges())?)
    }

    /// Rewrites the host address list of every sandbox on this node from the
    /// node's current addresses. Returns how many sandboxes were updated.
    pub fn refresh_host_addresses(&self) -> usize {
        let hosts = tap::host_addresses();
        let mut ids: Vec<String> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.cfg.state_dir.join("sandboxes")) {
            ids.extend(rd.flatten().filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            }));
        }
        let mut n = 0;
        for id in ids {
            let l = self.sandbox_lock(&id);
            let _g = lock(&l);
            let Ok(rec) = self.get(&id) else { continue };
            match policy::maps::set_host_addresses(&rec.tap, &hosts) {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(sandbox = %id, "host address refresh: {e}"),
            }
        }
        n
    }

    /// Leases an address and builds the sandbox's link, NAT and policy. On any
    /// failure everything done so far is undone.
    pub fn setup(&self, id: &str, policy: Policy) -> Result<SandboxNet, NetError> {
        self.setup_with(id, None, policy)
    }

    /// [`NodeNet::setup`] with the address the control plane leased (`Some`),
    /// or one this node picks (`None`).
    pub fn setup_with(
        &self,
        id: &str,
        leased: Option<Ipv4Addr>,
        policy: Policy,
    ) -> Result<SandboxNet, NetError> {
        self.build(id, Address::Leased(leased), policy, 0)
    }

    /// The network of a sandbox migrating here: the same address (leased from
    /// the slice of the node it was started on, so possibly outside this
    /// node's pool) and policy, and a tap whose MAC is `tap_mac`, the source
    /// tap's, so the guest's neighbour entry for its gateway stays valid.
    pub fn setup_moved(
        &self,
        id: &str,
        ip: Ipv4Addr,
        policy: Policy,
        policy_version: u64,
        tap_mac: [u8; 6],
    ) -> Result<SandboxNet, NetError> {
        self.build(id, Address::Moved(ip, tap_mac), policy, policy_version)
    }

    /// Removes the network of a sandbox that migrated away: like
    /// [`NodeNet::teardown`] (the local record of its address goes too), but
    /// the caller keeps the control plane's lease, which moved with it.
    pub fn hand_off(&self, id: &str) -> Result<(), NetError> {
        self.teardown(id)
    }

    /// MAC of the sandbox's tap (what the guest knows as its gateway's).
    pub fn tap_mac(&self, id: &str) -> Result<[u8; 6], NetError> {
        let name = tap_name(id);
        tap::mac(&name).map_err(|source| NetError::Tap { tap: name, source })
    }

    fn build(
        &self,
        id: &str,
        addr: Address,
        policy: Policy,
        policy_version: u64,
    ) -> Result<SandboxNet, NetError> {
        let l = self.sandbox_lock(id);
        let _g = lock(&l);
        let t0 = std::time::Instant::now();
        let compiled = self.compile(&policy)?;
        if matches!(addr, Address::Moved(..)) && tap::exists(&tap_name(id)) {
            // why: creating it would take over (delete) the tap of the running
            // source when both agents share this network namespace.
            return Err(NetError::Tap {
                tap: tap_name(id),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "it already exists on this host: the source node shares this host's network namespace (a networked sandbox migrates only between nodes with their own network namespaces, i.e. other hosts)",
                ),
            });
        }
        let (ip, tap_mac) = match addr {
            Address::Leased(Some(ip)) => (self.ipam.adopt(id, ip)?, None),
            Address::Leased(None) => {
                // why: an address routed to another device (a running VM of
                // an agent that is not live, a manual route) would fail this
                // setup; another free one does not.
                let tap = tap_name(id);
                let routed: HashSet<Ipv4Addr> = tap::host_routes()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(dev, _)| *dev != tap)
                    .map(|(_, ip)| ip)
                    .collect();
                (self.ipam.lease_avoiding(id, &routed)?, None)
            }
            Address::Moved(ip, mac) => (self.ipam.adopt_moved(id, ip)?, Some(mac)),
        };
        let rec = SandboxNet {
            version: 1,
            sandbox: id.into(),
            tap: tap_name(id),
            ip,
            mac: mac_for(ip),
            gateway: GATEWAY,
            dns: self.cfg.dns.clone(),
            policy,
            policy_version,
        };
        let built = (|| {
            // why: each step's cost is logged (debug) so a slow start can be
            // attributed: policy compile + local lease file (the control-plane
            // commit, if any, came before: the agent's `leased` mark), record,
            // tap + route, programs, host map, NAT.
            let mut steps = StepTimer::new(t0);
            steps.mark("compile+local-lease");
            self.save(&rec)?;
            steps.mark("record");
            tap::create(&rec.tap, ip, tap_mac).map_err(|source| NetError::Tap {
                tap: rec.tap.clone(),
                source,
            })?;
            steps.mark("tap");
            let hosts = tap::host_addresses();
            match self.spare.take() {
                Some(pre) => {
                    policy::maps::attach_preloaded(&rec.tap, ip, rec.mac, &compiled, &hosts, pre)?;
                    steps.mark("bpf(preloaded)");
                }
                None => {
                    policy::maps::attach(&rec.tap, ip, rec.mac, &compiled, &hosts)?;
                    steps.mark("bpf");
                }
            }
            policy::maps::add_host_sandbox(ip, self.cfg.pool.prefix_len(), self.owner)?;
            steps.mark("host-map");
            nat::add(ip)?;
            steps.mark("nat");
            tracing::debug!(sandbox = id, steps = %steps, "network set up");
            Ok(())
        })();
        if let Err(e) = built {
            self.teardown_locked(id);
            return Err(e);
        }
        Ok(rec)
    }

    /// Replaces the sandbox's policy live. With `version` (the control
    /// plane's), a version older than the one enforced is refused
    /// ([`NetError::StalePolicy`]) and the same or a newer one is applied and
    /// kept; without, it is applied and the kept version stays.
    pub fn set_policy(
        &self,
        id: &str,
        policy: Policy,
        version: Option<u64>,
    ) -> Result<SandboxNet, NetError> {
        let l = self.sandbox_lock(id);
        let _g = lock(&l);
        let mut rec = self.get(id)?;
        // why: two sets of the control plane can reach the node in the other
        // order than it recorded them; the older one must not win.
        if let Some(got) = version.filter(|v| *v < rec.policy_version) {
            return Err(NetError::StalePolicy {
                sandbox: id.to_string(),
                have: rec.policy_version,
                got,
            });
        }
        let compiled = self.compile(&policy)?;
        policy::maps::update(&rec.tap, rec.ip, rec.mac, &compiled)?;
        rec.policy = policy;
        if let Some(v) = version {
            rec.policy_version = v;
        }
        self.save(&rec)?;
        Ok(rec)
    }

    /// Addresses held on this node, by sandbox.
    pub fn leases(&self) -> std::collections::BTreeMap<String, Ipv4Addr> {
        self.ipam.all()
    }

    /// Per-rule and fixed counters, labelled.
    pub fn stats(&self, id: &str) -> Result<Vec<CounterStat>, NetError> {
        let l = self.sandbox_lock(id);
        let _g = lock(&l);
        let rec = self.get(id)?;
        let compiled = self.compile(&rec.policy)?;
        let raw = policy::maps::counters(&rec.tap)?;
        Ok(compiled
            .counters
            .iter()
            .map(|c| {
                let v = raw.get(usize::from(c.slot)).copied().unwrap_or_default();
                CounterStat {
                    label: c.label.clone(),
                    packets: v.packets,
                    bytes: v.bytes,
                }
            })
            .collect())
    }

    /// Removes the sandbox's tap, programs, route, NAT entry, record and lease.
    pub fn teardown(&self, id: &str) -> Result<(), NetError> {
        let l = self.sandbox_lock(id);
        let _g = lock(&l);
        self.teardown_locked(id)
            .into_iter()
            .next()
            .map_or(Ok(()), Err)
            .inspect(|_| {
                lock(&self.locks).remove(id);
            })
    }

    /// Best-effort removal of everything; returns what failed.
    fn teardown_locked(&self, id: &str) -> Vec<NetError> {
        let mut errs = Vec::new();
        let tap_name = tap_name(id);
        if let Err(source) = tap::delete(&tap_name) {
            // why: while the tap (and its route) exist, the address is in use;
            // keep the lease and record so a retry can finish the job.
            let e = NetError::Tap {
                tap: tap_name.clone(),
                source,
            };
            tracing::warn!(sandbox = id, "network teardown: {e}");
            return vec![e];
        }
        if let Err(e) = policy::maps::detach(&tap_name) {
            errs.push(e.into());
        }
        if let Some(ip) = self.ipam.get(id) {
            if let Err(e) = nat::remove(ip) {
                errs.push(e.into());
            }
            if let Err(e) = policy::maps::remove_host_sandbox(ip, self.owner) {
                errs.push(e.into());
            }
        }
        let _ = std::fs::remove_file(self.record_path(id));
        if let Err(e) = self.ipam.release(id) {
            errs.push(e.into());
        }
        for e in &errs {
            tracing::warn!(sandbox = id, "network teardown: {e}");
        }
        errs
    }

    /// Removes the network of every sandbox this node's state knows (leases,
    /// records) that is not in `keep`: taps, pins, NAT entries, records and leases
    /// left by a previous run. Taps of other agents on the same host (other
    /// state dirs) are never touched here (see [`purge_gone_agents`]).
    pub fn remove_orphans(&self, keep: &HashSet<String>) {
        let mut ids: HashSet<String> = self.ipam.all().into_keys().collect();
        if let Ok(rd) = std::fs::read_dir(self.cfg.state_dir.join("sandboxes")) {
            ids.extend(rd.flatten().filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            }));
        }
        for id in ids.difference(keep) {
            tracing::info!(sandbox = %id, "removing orphaned sandbox network");
            let l = self.sandbox_lock(id);
            let _g = lock(&l);
            self.teardown_locked(id);
        }
        self.sync_host_sandboxes();
        self.sync_nat();
    }

    /// Makes the NAT set hold exactly this node's sandbox addresses within its
    /// pool: drops elements no sandbox of this node holds (a crash between
    /// teardown steps, or state lost) and adds missing ones. Elements outside
    /// the pool belong to other agents and are left alone.
    pub fn sync_nat(&self) {
        // why: read the set before the leases (see `sync_host_sandboxes`).
        let members: HashSet<Ipv4Addr> = match nat::members() {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                tracing::warn!("NAT set: {e}");
                return;
            }
        };
        let held: HashSet<Ipv4Addr> = self.ipam.all().into_values().collect();
        for ip in &members {
            if self.cfg.pool.contains(*ip) && !held.contains(ip) {
                tracing::info!(%ip, "removing a stale NAT set element");
                if let Err(e) = nat::remove(*ip) {
                    tracing::warn!("NAT set: {e}");
                }
            }
        }
        for ip in held.difference(&members) {
            if let Err(e) = nat::add(*ip) {
                tracing::warn!("NAT set: {e}");
            }
        }
    }

    /// Makes the entries of this agent (its owner tag) in the host's shared
    /// sandbox map be exactly this node's sandbox addresses: adds missing
    /// ones (sandboxes set up before the map existed) and drops those no
    /// sandbox of this node holds (left by a crash between teardown steps).
    /// Entries tagged by other agents are left alone.
    pub fn sync_host_sandboxes(&self) {
        // why: read the map before the leases; a sandbox set up in between is
        // then missing from `recorded` and never mistaken for a stale entry.
        let recorded: HashSet<Ipv4Addr> = match policy::maps::host_sandboxes() {
            Ok(v) => v
                .into_iter()
                .filter(|(_, e)| e.owner == self.owner)
                .map(|(ip, _)| ip)
                .collect(),
            Err(e) => {
                tracing::warn!("host sandbox map: {e}");
                return;
            }
        };
        let held: HashSet<Ipv4Addr> = self.ipam.all().into_values().collect();
        for ip in &recorded {
            if !held.contains(ip) {
                tracing::info!(%ip, "removing a stale address from the host sandbox map");
                if let Err(e) = policy::maps::remove_host_sandbox(*ip, self.owner) {
                    tracing::warn!("host sandbox map: {e}");
                }
            }
        }
        for ip in held.difference(&recorded) {
            if let Err(e) =
                policy::maps::add_host_sandbox(*ip, self.cfg.pool.prefix_len(), self.owner)
            {
                tracing::warn!("host sandbox map: {e}");
            }
        }
    }
}

/// Whether the address `ip` of an agent that is not live is free, freeing it
/// if no VM uses it: free when no /32 route to it exists (the tap is gone:
/// setup adds the route before the host map entry and teardown deletes the
/// tap before the entry, so a routeless entry is stale or mid-teardown of a
/// dead agent); freed when the route is a Hearth tap's and that tap can be
/// deleted (tap, route and pins go together). A tap QEMU still holds refuses
/// deletion (EBUSY): a VM that outlived its agent runs there, and keeps its
/// address, entry and isolation until its agent re-adopts it. A route on any
/// other device is kept. `removed` collects the taps deleted.
pub(crate) fn release_if_unused(
    ip: Ipv4Addr,
    routes: &[(String, Ipv4Addr)],
    removed: &mut Vec<(String, Ipv4Addr)>,
) -> bool {
    let Some((dev, _)) = routes.iter().find(|(_, a)| *a == ip) else {
        return true;
    };
    if !dev.starts_with(TAP_PREFIX) {
        return false;
    }
    match tap::delete(dev) {
        Ok(()) => {
            if let Err(e) = policy::maps::detach(dev) {
                tracing::warn!(tap = %dev, "{e}");
            }
            removed.push((dev.clone(), ip));
            true
        }
        Err(e) => {
            tracing::info!(tap = %dev, %ip, "keeping the address of an agent that is not running: its tap is in use ({e}), a VM still runs there");
            false
        }
    }
}

/// Run at registration, under the registry lock (all live agents known):
/// removes the host map entries of agents that are not live whose address no
/// VM uses (see [`release_if_unused`]), and then the Hearth taps that route
/// an address with no entry at all outside the pools of the other live
/// agents (`live_pools`; left by an agent that died between creating the tap
/// and adding its entry, or by one whose entry was purged before) and that
/// no VM holds. A live agent's sandbox has an entry of its tag, or is
/// mid-setup in its pool (tap and route come before the entry); the
/// registering agent has set up nothing yet.
fn purge_gone_agents(
    live_pools: &[Cidr],
    keep: &HashSet<u32>,
    removed: &mut Vec<(String, Ipv4Addr)>,
) -> Result<usize, BpfError> {
    let routes = match tap::host_routes() {
        Ok(r) => r,
        Err(e) => {
            // why: unreadable routes must not make every entry look routeless.
            tracing::warn!("cannot read the host routes (/proc/net/route): {e}; nothing purged");
            return Ok(0);
        }
    };
    let n = policy::maps::purge_host_sandboxes(keep, |ip| release_if_unused(ip, &routes, removed))?;
    // (entries left of agents that are not live have a busy tap)
    let owned: HashSet<Ipv4Addr> = policy::maps::host_sandboxes()?
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    for (dev, ip) in &routes {
        if dev.starts_with(TAP_PREFIX)
            && !live_pools.iter().any(|p| p.contains(*ip))
            && !owned.contains(ip)
            && !removed.iter().any(|(d, _)| d == dev)
        {
            let _ = release_if_unused(*ip, std::slice::from_ref(&(dev.clone(), *ip)), removed);
        }
    }
    Ok(n)
}

/// What [`purge_leftovers`] removed.
#[derive(Debug, Default)]
struct Leftovers {
    nat: Vec<Ipv4Addr>,
    pins: Vec<String>,
    namespaces: Vec<u64>,
}

/// Run at registration after [`purge_gone_agents`], under the registry lock:
/// removes host state no sandbox can be using, decided by the resource
/// (never by which agent made it, since QEMU outlives its agent):
/// - NAT set elements with no /32 route to their address (every setup adds
///   the route before the element, every teardown deletes the tap first);
/// - pin directories of taps that do not exist here whose programs run
///   nowhere ([`policy::maps::pins_in_use`]: a TCX link still attached to a
///   device of any namespace, or a loaded program using the maps, keeps them);
/// - the pool registry directories and host map pins of network namespaces
///   that no longer exist.
fn purge_leftovers() -> Leftovers {
    let mut out = Leftovers::default();
    // why: the elements first, then the routes: a setup adds the route
    // before the element, so an element read here whose route is missing
    // from the later read is not one being set up (the reverse order could
    // read "no route" just before a setup added both).
    let members = nat::members();
    match (tap::host_routes(), members) {
        (Ok(routes), Ok(members)) => {
            let routed: HashSet<Ipv4Addr> = routes.into_iter().map(|(_, ip)| ip).collect();
            for ip in members {
                // why: read again right before the removal: a teardown and a
                // new setup of the same address may have run since.
                let routed_now = || {
                    tap::host_routes()
                        .map(|r| r.into_iter().any(|(_, a)| a == ip))
                        .unwrap_or(true)
                };
                if !routed.contains(&ip) && !routed_now() {
                    match nat::remove(ip) {
                        Ok(()) => out.nat.push(ip),
                        Err(e) => tracing::warn!("NAT set: {e}"),
                    }
                }
            }
        }
        (Err(e), _) => {
            tracing::warn!("cannot read the host routes (/proc/net/route): {e}; NAT set not purged")
        }
        // (no table yet: nothing to purge)
        (_, Err(_)) => {}
    }
    for tap in policy::maps::pinned_taps() {
        if tap::exists(&tap) || policy::maps::pins_in_use(&tap) {
            continue;
        }
        match policy::maps::detach(&tap) {
            Ok(()) => out.pins.push(tap),
            Err(e) => tracing::warn!(%tap, "{e}"),
        }
    }
    let live = registry::live_namespaces();
    out.namespaces =
        registry::purge_gone_namespaces(std::path::Path::new(registry::REGISTRY_DIR), &live);
    for ns in policy::maps::purge_gone_namespace_pins(&live) {
        if !out.namespaces.contains(&ns) {
            out.namespaces.push(ns);
        }
    }
    out
}

/// Durations of consecutive steps, for a debug log line (`lease=1.2ms tap=…`).
struct StepTimer {
    last: std::time::Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl StepTimer {
    fn new(start: std::time::Instant) -> StepTimer {
        StepTimer {
            last: start,
            steps: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for StepTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={:.1}ms", d.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// Body of the host address watcher thread (see [`NodeNet::open_watched`]).
fn watch_host_addresses(net: Weak<NodeNet>) {
    let sock = match tap::AddrEvents::subscribe(std::time::Duration::from_secs(30)) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "cannot follow host address changes (netlink): {e}; refreshing every 30 s instead"
            );
            None
        }
    };
    loop {
        // why: refresh first, so sandboxes adopted at start see today's addresses.
        let Some(strong) = net.upgrade() else { return };
        strong.refresh_host_addresses();
        drop(strong);
        match &sock {
            Some(s) => s.wait(),
            None => std::thread::sleep(std::time::Duration::from_secs(30)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_only_in_their_colon_form() {
        assert_eq!(
            parse_mac("02:68:0a:58:00:05"),
            Some([0x02, 0x68, 0x0a, 0x58, 0x00, 0x05])
        );
        assert_eq!(parse_mac("02:68:0a:58:00"), None);
        assert_eq!(parse_mac("02:68:0a:58:00:05:01"), None);
        assert_eq!(parse_mac("02:68:0a:58:00:zz"), None);
        assert_eq!(parse_mac(""), None);
    }
}
