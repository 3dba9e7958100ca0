//! The replicated control-plane state and the pure function that changes it.
//!
//! [`State::apply`] is the whole of the state machine's logic: a command in,
//! a reply out, no clock and no I/O (times travel inside commands, stamped by
//! the member that proposed them), so every member applying the same log ends
//! in the same state. Placement capacity is checked here, at apply time, which
//! is what makes two concurrent placements unable to overcommit a node: the
//! second one to commit sees the first one's reservation.

use std::collections::{BTreeMap, BTreeSet};

use hearth_sched::{Accel, NodeView, Request, Resources, Strategy};
use serde::{Deserialize, Serialize};

use crate::leases::{Cidr, NodeSlice};

/// A node agent as registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// Random identity the agent keeps in its data dir: the same agent
    /// restarting keeps it; another agent claiming the same id does not.
    pub instance: String,
    /// Base URL of the agent's node-local API.
    pub address: String,
    pub capacity: Resources,
    pub accel: Accel,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cordoned: bool,
    pub ready: bool,
    pub registered_ms: u64,
    pub last_heartbeat_ms: u64,
    #[serde(default)]
    pub warm_templates: BTreeSet<String>,
    #[serde(default)]
    pub volumes: BTreeSet<String>,
}

/// What to do when a sandbox's node is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Mark it lost.
    #[default]
    Never,
    /// Place it again on another node.
    Always,
}

/// What an agent last reported about a sandbox (or the control plane
/// concluded, e.g. `lost`). Statuses are the API's snake_case names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub status: String,
    /// The id the agent knows the sandbox by.
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub updated_ms: u64,
}

impl Observed {
    /// Terminal sandboxes reserve nothing.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "exited" | "stopped" | "failed" | "lost"
        )
    }
}

/// A sandbox's desired state, its placement and what was observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The create request as the API received it (opaque to the store).
    pub spec: serde_json::Value,
    pub request: Request,
    /// Node it is placed on.
    pub node: String,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Recorded and placed, but never started on an agent.
    #[serde(default)]
    pub record_only: bool,
    /// A client-chosen key: retrying a create with the same key returns the
    /// first creation instead of making a second sandbox.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Not set any more: addresses are leases of the node's slice
    /// ([`State::slices`]); kept so older records still decode.
    #[serde(default)]
    pub ip: Option<String>,
    pub created_ms: u64,
    /// How many times it was placed or started again (its node was lost, its
    /// copy vanished): the generation. The copy an agent runs is tagged with
    /// it ([`SandboxRecord::owner`]), so a copy of an older generation is stale.
    #[serde(default)]
    pub reschedules: u32,
    /// How many times its policy was set (`SetPolicy`): the version a node
    /// is told with the policy, so a set that reaches it late (after a newer
    /// one) is refused there.
    #[serde(default)]
    pub policy_version: u64,
    /// Placed by the node itself (`hearthd dev`, whose one node is the
    /// process): committed without the capacity check and never moved.
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub observed: Option<Observed>,
    /// The current or last live migration the control plane drove (boxed:
    /// most records never migrate).
    #[serde(default)]
    pub migration: Option<Box<Migration>>,
}

/// A live migration of a sandbox between two nodes, driven by a control-plane
/// member and recorded phase by phase (see docs/migration.md). While it is
/// active the target holds a reservation of the sandbox's resources, and the
/// source's copy may vanish without the record being marked lost: the move
/// completes when a copy of `generation` runs on `to` (reported by the target's
/// heartbeat or by the driver, whichever is first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    /// Random id of this attempt: phase writes of another attempt are refused.
    pub id: String,
    pub from: String,
    pub to: String,
    /// `preparing`, `precopy`, `switchover`, `committing`, `unresolved`
    /// (the source is paused and the target's answer is unknown),
    /// `completed` (runs on `to`) or `aborted` (runs on `from`).
    pub phase: String,
    /// The generation the target's copy is tagged with (the record's
    /// `reschedules` + 1 when the migration started).
    pub generation: u32,
    pub started_ms: u64,
    pub updated_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
    /// The last progress the source reported (the API's migration status;
    /// opaque to the store but for `bytes_sent` and `iterations`, whose
    /// advance keeps the migration alive: see [`Migration::stalled`]).
    #[serde(default)]
    pub progress: Option<serde_json::Value>,
    /// Its deadline: how long it may go without a new phase or advancing
    /// progress (none: [`MIGRATION_STALL_MS`]). Set by the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
    /// When the source's heartbeat first lacked its copy while the record
    /// had not seen the switch-over (the control plane may have missed it):
    /// the copy counts as lost only if the target has not reported the
    /// migrated copy within the heartbeat's grace after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_gone_ms: Option<u64>,
    /// Ended `aborted` by the state machine itself (the source's copy died,
    /// went missing past the deadline, or its node was lost; or the target's
    /// node was), not on the source's word that it did not commit. The record
    /// lags the source (the control plane polls its phases), so the target
    /// may hold a committed copy of `generation` all the same: if it reports
    /// that copy running, it takes the record over (and a copy started again
    /// meanwhile is fenced) instead of being fenced itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    /// An unconfirmed abort whose target was NotReady or removed when the
    /// leader would have asked it: a restart may start without its answer,
    /// but the abort stays unconfirmed, so a copy the target committed and
    /// reports before any other copy was reported still takes the record
    /// over (never zero copies when the source released to it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_lost: bool,
    /// The id the migrating copy has on its node (the source's agent id,
    /// which the target's copy keeps): what the leader names when it asks
    /// the target about an unconfirmed abort. Set by the state machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// Phases after which a migration holds nothing.
pub const MIGRATION_ENDED: [&str; 2] = ["completed", "aborted"];

/// Phases after the source paused the guest: its copy may vanish because the
/// target took over, so a missing source copy is not evidence of a loss.
pub const MIGRATION_SWITCHED: [&str; 3] = ["switchover", "committing", "unresolved"];

/// Every phase a migration record can be in, in the order it moves through
/// them (an end, `completed` or `aborted`, may follow any active phase).
pub const MIGRATION_PHASES: [&str; 7] = [
    "preparing",
    "precopy",
    "switchover",
    "committing",
    "unresolved",
    "completed",
    "aborted",
];

/// How long a migration may go without a phase or progress write before the
/// leader resolves it on the evidence the nodes report (the deadline).
pub const MIGRATION_STALL_MS: u64 = 120_000;

impl Migration {
    /// Still in progress (holds a reservation on the target, blocks a second one).
    pub fn active(&self) -> bool {
        !MIGRATION_ENDED.contains(&self.phase.as_str())
    }

    /// The source paused the guest (the target may run it now).
    pub fn switched(&self) -> bool {
        MIGRATION_SWITCHED.contains(&self.phase.as_str())
    }

    /// Ended `aborted` without the source's word and not settled yet by
    /// the target's answer ([`Command::SettleAbort`]): the target may hold
    /// a committed copy, so the leader starts no copy of the record before
    /// it asked the target, and a running copy the target reports takes the
    /// record over.
    pub fn awaits_target(&self) -> bool {
        self.phase == "aborted" && self.unconfirmed && !self.target_lost
    }

    /// Active with neither a new phase nor advancing progress (bytes sent,
    /// iterations) for its deadline (`stall_ms`, else [`MIGRATION_STALL_MS`])
    /// at `at_ms`: past its deadline, resolved on the nodes' evidence.
    pub fn stalled(&self, at_ms: u64) -> bool {
        let limit = self.stall_ms.unwrap_or(MIGRATION_STALL_MS);
        self.active() && at_ms.saturating_sub(self.updated_ms) > limit
    }
}

/// `bytes_sent` and `iterations` of a progress report (the API's migration
/// status), zero when absent.
fn progress_mark(p: Option<&serde_json::Value>) -> (u64, u64) {
    let field = |k: &str| {
        p.and_then(|p| p.get(k))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    (field("bytes_sent"), field("iterations"))
}

impl SandboxRecord {
    /// The migration in progress, if any.
    pub fn migrating(&self) -> Option<&Migration> {
        self.migration.as_deref().filter(|m| m.active())
    }

    /// Its migration is open at or after the switch-over (the source paused
    /// the guest): the target may have committed, so the restart policy
    /// holds off until it settles. Before the switch-over (preparing,
    /// pre-copy) the target cannot have committed.
    pub fn may_have_switched(&self) -> bool {
        self.migrating().is_some_and(Migration::switched)
    }

    /// True while it holds resources on its node.
    pub fn reserves(&self) -> bool {
        !self.observed.as_ref().is_some_and(Observed::is_terminal)
    }

    /// The egress and ingress policy recorded in its spec (the API's
    /// `NetworkPolicy` form; an absent direction is `{}`: the defaults).
    pub fn policy(&self) -> serde_json::Value {
        let net = self.spec.get("network");
        let dir = |d: &str| {
            net.and_then(|n| n.get(d))
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}))
        };
        serde_json::json!({"egress": dir("egress"), "ingress": dir("ingress")})
    }

    /// The tag of the copy an agent runs for this record and generation
    /// (`ID@GENERATION`).
    pub fn owner(&self) -> String {
        format!("{}@{}", self.id, self.reschedules)
    }

    /// Its migration awaits the target's answer ([`Migration::awaits_target`])
    /// and no copy of the record was started since the abort (it is still at
    /// the source's generation, or its new placement has no copy yet): the
    /// target's committed copy, if any, is the sandbox. The leader starts no
    /// copy of such a record before it settled the abort.
    pub fn held_for_target(&self) -> Option<&Migration> {
        self.takeover_open().filter(|m| m.awaits_target())
    }

    /// The migration whose target's running copy takes this record over if
    /// it reports one: aborted without the source's word (unconfirmed, also
    /// when its target was lost) and no copy was started since, i.e. none
    /// was reported (the leader starts none before it asked the target, or
    /// knew it lost).
    pub fn takeover_open(&self) -> Option<&Migration> {
        let m = self
            .migration
            .as_deref()
            .filter(|m| m.phase == "aborted" && m.unconfirmed)?;
        // why: the restart after the abort takes the migration's generation;
        // once its copy was reported, or the record was started again past
        // it (a move, a retried start), the window is closed for good (a
        // later generation's copy must never be outranked by the target's).
        let unstarted = self.reschedules < m.generation
            || self.observed.as_ref().is_none_or(|o| o.agent_id.is_none());
        unstarted.then_some(m)
    }

    /// A running copy of generation `generation` of the record was reported
    /// (its agent id recorded): if that is the restart after an unconfirmed
    /// abort (at least the migration's generation; the source's own copy is
    /// older), the abort is closed for good, so no later generation (a move,
    /// a retried start, whose id is not reported yet) reopens the window in
    /// which the target's copy would take the record over. True if it closed.
    pub(crate) fn close_takeover(&mut self, generation: u32) -> bool {
        match self
            .migration
            .as_mut()
            .filter(|m| m.phase == "aborted" && m.unconfirmed && generation >= m.generation)
        {
            Some(m) => {
                m.unconfirmed = false;
                m.target_lost = false;
                true
            }
            None => false,
        }
    }

    /// The control plane gave up on it without an agent copy (its start
    /// failed or never finished): any copy that turns up later is stale.
    pub fn abandoned(&self) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|o| o.is_terminal() && o.agent_id.is_none())
    }
}

/// Splits an owner tag (`[CLUSTER/]ID@GENERATION`) into its record id and
/// generation.
pub fn parse_owner(tag: &str) -> Option<(&str, u32)> {
    let tag = tag.rsplit_once('/').map_or(tag, |(_, t)| t);
    let (id, generation) = tag.rsplit_once('@')?;
    Some((id, generation.parse().ok()?))
}

/// A deleted record's trace: the evidence that lets a copy of it, turning up
/// later on a node that was cut off, be stopped. Without one, a copy whose
/// record is unknown is left alone (a wiped or restored control plane, or
/// another cluster, must never make agents kill what they run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// The record's generation when it was deleted.
    pub generation: u32,
    /// Order of deletion, for the bound ([`TOMBSTONES_MAX`]).
    pub seq: u64,
}

/// How many tombstones the state keeps (the oldest go first).
pub const TOMBSTONES_MAX: usize = 4096;

/// One copy an agent reports in a heartbeat (the state machine's own shape
/// of the API's `ObservedSandbox`; statuses are the API's snake_case names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    pub agent_id: String,
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
    /// The owner tag the copy carries (`ID@GENERATION`), if any.
    #[serde(default)]
    pub owner: Option<String>,
    /// Its VM is paused by a migration (the source after the switch-over,
    /// before it resumes or is released): it does not run the guest, so it
    /// is no evidence that the guest stayed on this node.
    #[serde(default)]
    pub paused: bool,
    /// An outgoing live migration of this copy is in progress (it runs, but
    /// may still switch over and commit on the target): no evidence either
    /// that the guest stays on this node.
    #[serde(default)]
    pub migrating: bool,
}

impl CopyReport {
    pub(crate) fn is_terminal(&self) -> bool {
        !matches!(self.status.as_str(), "creating" | "running" | "recovering")
    }
}

/// A copy the node must stop, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub agent_id: String,
    pub reason: String,
}

/// What a `NotRunning` command expects of the record, checked at apply time
/// (the proposer may have looked at a state that is behind the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Expect {
    /// No start result was ever recorded (a give-up of a stuck start).
    Unstarted,
    /// The record still names this agent copy (a copy that vanished).
    Copy { agent_id: String },
    /// The control plane still holds the record given up without an agent
    /// copy (a `restart: always` start that failed, started again).
    Abandoned,
}

/// The cluster an owner tag names (`CLUSTER/ID@GENERATION`), if it names one
/// (tags made before the cluster had an id do not).
pub fn owner_cluster(tag: &str) -> Option<&str> {
    tag.rsplit_once('/').map(|(c, _)| c)
}

/// An image known to the cluster and where it is cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub digest: String,
    #[serde(default)]
    pub nodes: BTreeSet<String>,
}

/// Every change to the state is one of these, committed through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    RegisterNode {
        node: NodeRecord,
    },
    RemoveNode {
        id: String,
        at_ms: u64,
    },
    Heartbeat {
        node: String,
        instance: String,
        at_ms: u64,
        /// Observed state of sandboxes on this node, by sandbox id (entries
        /// of older logs; new heartbeats send `report`).
        #[serde(default)]
        observed: BTreeMap<String, Observed>,
        /// Every copy the node runs, as the agent reported it. The fencing
        /// plan is computed from it at apply time (so it is consistent with
        /// this log position, whichever member the agent talked to) and
        /// returned as [`Reply::Desired`].
        #[serde(default)]
        report: Option<Vec<CopyReport>>,
        /// A record's copy missing from the report for longer than this
        /// (since its observed state was last written) is not running.
        #[serde(default)]
        grace_ms: u64,
    },
    /// The leader's watchdog: the node missed heartbeats.
    MarkNotReady {
        node: String,
        at_ms: u64,
    },
    SetCordon {
        node: String,
        cordoned: bool,
    },
    /// Cordon, and move every sandbox that asked for `restart: always`
    /// (only those of `only` when given: the control plane's drain passes
    /// the ones whose live migration failed for a runtime reason).
    Drain {
        node: String,
        at_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        only: Option<Vec<String>>,
    },
    CreateSandbox {
        sandbox: SandboxRecord,
    },
    /// A start's result. Ignored when the record moved off `node` or was
    /// started again since `generation` (a late result of an old start).
    SetObserved {
        id: String,
        observed: Observed,
        #[serde(default)]
        node: Option<String>,
        #[serde(default)]
        generation: Option<u32>,
    },
    DeleteSandbox {
        id: String,
    },
    /// `hearth policy set` through the control plane: replaces the egress
    /// and ingress policy in the record's spec (`network.egress` /
    /// `network.ingress`, the API's `NetworkPolicy` form), so every later
    /// start, restart, reschedule and migration offer uses it. Refused for
    /// an unknown sandbox, one without a network, and one being migrated
    /// (the offer already carries its policy).
    SetPolicy {
        id: String,
        policy: serde_json::Value,
        /// Set only if the record's `policy_version` is this one now (else
        /// `Superseded`): a revert of a refused policy must not overwrite a
        /// newer one set meanwhile (by version, not content: a later set of
        /// the same policy is newer too). Absent: unconditional.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect_version: Option<u64>,
    },
    /// The sandbox is not running where its record says (its node no longer
    /// has it, or its start never finished): `restart: always` starts it
    /// again (a new generation, on the same node); the others end as
    /// `status` (`lost` / `failed`) with `why`. Ignored when the record moved
    /// off `node`, was started again since `generation`, or no longer is as
    /// `expect` says.
    NotRunning {
        id: String,
        node: String,
        generation: u32,
        status: String,
        why: String,
        at_ms: u64,
        #[serde(default)]
        expect: Option<Expect>,
    },
    PutImage {
        image: ImageRecord,
    },
    /// Gives the node agent its slice of the cluster CIDR (`want`, or the
    /// next free one); the same agent instance asking again gets the same slice.
    AllocateSlice {
        node: String,
        instance: String,
        #[serde(default)]
        want: Option<Cidr>,
    },
    /// Leases a sandbox address from the node's slice (`want`, when the node
    /// already uses that address for it, else the lowest free one); the same
    /// sandbox asking again gets the same address.
    Lease {
        node: String,
        instance: String,
        sandbox: String,
        #[serde(default)]
        want: Option<std::net::Ipv4Addr>,
    },
    /// Frees a sandbox's address (no-op when it holds none).
    Release {
        node: String,
        instance: String,
        sandbox: String,
    },
    /// Frees every lease of the node except those of `keep` (an agent's
    /// start: the sandboxes it no longer knows hold no address).
    RetainLeases {
        node: String,
        instance: String,
        keep: BTreeSet<String>,
    },
    /// Names the cluster (once: later ones are ignored). Its id goes into
    /// every owner tag, so agents' copies of another cluster (or of a
    /// control plane rebuilt from scratch) are never fenced by this one.
    InitCluster {
        id: String,
    },
    /// Records a live migration of a running sandbox to `migration.to` and
    /// reserves its resources there; refused when the sandbox is not running
    /// on `migration.from`, already migrating, or the target cannot take it.
    StartMigration {
        id: String,
        migration: Migration,
    },
    /// A phase of migration `migration` of sandbox `id` (ignored once that
    /// migration ended; refused for another attempt). `completed` moves the
    /// placement to the target in this same write.
    MigrationPhase {
        id: String,
        migration: String,
        phase: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        progress: Option<serde_json::Value>,
        at_ms: u64,
    },
    /// The leader's answer to an abort of migration `migration` of sandbox
    /// `id` that the state machine decided without the source's word
    /// ([`Migration::awaits_target`]): what the target said, or that it is
    /// lost. Applied only while the record still holds that attempt,
    /// aborted and unconfirmed, with no copy started since
    /// ([`SandboxRecord::held_for_target`]); otherwise a no-op.
    SettleAbort {
        id: String,
        migration: String,
        answer: TargetAnswer,
        at_ms: u64,
    },
}

/// What settles an unconfirmed abort ([`Command::SettleAbort`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetAnswer {
    /// The target removed the attempt's incoming VM, or never had one, and
    /// will never commit that attempt: the abort is confirmed and the
    /// restart policy proceeds.
    Uncommitted,
    /// The target committed the attempt (its copy runs there): the
    /// migration completes onto the target at its generation, and the
    /// placement a restart had reserved is dropped.
    Committed,
    /// The target node is NotReady or removed (checked at apply): the restart
    /// proceeds without its answer; the abort stays unconfirmed, so a copy
    /// it committed still takes the record over if it reports before any
    /// other copy of the record was reported (never zero copies when the
    /// source had released to it), and is fenced after that.
    TargetLost,
}

/// The outcome of applying one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Reply {
    Ok,
    Node {
        node: NodeRecord,
    },
    Sandbox {
        sandbox: SandboxRecord,
    },
    /// Sandboxes moved to other nodes, and those that could not be moved.
    Moved {
        moved: Vec<String>,
        lost: Vec<String>,
    },
    NotFound {
        what: String,
    },
    /// The node id is held by another agent instance (which one is never
    /// told: its instance id is the node's fencing token).
    DuplicateNode {
        id: String,
    },
    /// The command's arguments are malformed (bad node id, empty instance...).
    Invalid {
        message: String,
    },
    /// The name or key is taken.
    Conflict {
        message: String,
    },
    /// The node's slice of the cluster CIDR.
    Slice {
        slice: NodeSlice,
    },
    /// A sandbox's address, leased from `cidr`.
    Lease {
        ip: std::net::Ipv4Addr,
        cidr: Cidr,
    },
    /// Leases freed.
    Released {
        released: Vec<String>,
    },
    /// No address (or slice) is left.
    Exhausted {
        message: String,
    },
    /// A heartbeat's answer: agent ids of the copies the records want on the
    /// node, copies to stop, ended copies to remove, and the records found
    /// not running there (lost, or started again).
    Desired {
        keep: Vec<String>,
        stop: Vec<Fence>,
        remove: Vec<String>,
        not_running: Vec<String>,
    },
    /// The chosen node cannot take the sandbox any more (a concurrent
    /// placement got there first, or it went away): schedule again.
    Rejected {
        node: String,
        reason: String,
    },
    /// A conditional change found the object changed since (a newer
    /// version); nothing was changed.
    Superseded {
        message: String,
    },
}

/// Tables a change touched, so the state machine can persist only those rows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Row {
    Node(String),
    Sandbox(String),
    Image(String),
    Slice(String),
    Tombstone(String),
    /// Cluster-wide values (the cluster id).
    Meta,
}

/// All replicated control-plane state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub sandboxes: BTreeMap<String, SandboxRecord>,
    pub images: BTreeMap<String, ImageRecord>,
    /// Address slices and leases, by node id.
    #[serde(default)]
    pub slices: BTreeMap<String, NodeSlice>,
    /// Random id of this cluster, set once by its first leader.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Deleted records, by id (bounded to [`TOMBSTONES_MAX`]).
    #[serde(default)]
    pub tombstones: BTreeMap<String, Tombstone>,
    /// Derived indexes, rebuilt by [`State::reindex`]; not persisted.
    #[serde(skip)]
    index: Index,
    /// Rows changed since the last [`State::take_dirty`].
    #[serde(skip)]
    dirty: BTreeSet<Row>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Index {
    by_name: BTreeMap<String, String>,
    by_key: BTreeMap<String, String>,
}

impl State {
    /// Rebuilds the derived indexes after loading rows or a snapshot.
    pub fn reindex(&mut self) {
        let mut ix = Index::default();
        for sb in self.sandboxes.values() {
            if let Some(n) = &sb.name {
                ix.by_name.insert(n.clone(), sb.id.clone());
            }
            if let Some(k) = &sb.idempotency_key {
                ix.by_key.insert(k.clone(), sb.id.clone());
            }
        }
        self.index = ix;
    }

    /// Rows changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<Row> {
        std::mem::take(&mut self.dirty)
    }

    /// The tag of the copy an agent runs for `rec`: `CLUSTER/ID@GENERATION`
    /// (`ID@GENERATION` before the cluster has an id).
    pub fn owner_of(&self, rec: &SandboxRecord) -> String {
        match &self.cluster_id {
            Some(c) => format!("{c}/{}", rec.owner()),
            None => rec.owner(),
        }
    }

    /// A sandbox by id or name.
    pub fn sandbox(&self, id_or_name: &str) -> Option<&SandboxRecord> {
        self.sandboxes.get(id_or_name).or_else(|| {
            self.index
                .by_name
                .get(id_or_name)
                .and_then(|id| self.sandboxes.get(id))
        })
    }

    /// What each node has reserved by the sandboxes placed on it.
    pub fn allocated(&self) -> BTreeMap<&str, Resources> {
        let mut m: BTreeMap<&str, Resources> = BTreeMap::new();
        for sb in self.sandboxes.values().filter(|s| s.reserves()) {
            let e = m.entry(sb.node.as_str()).or_default();
            *e = e.plus(sb.request.resources);
            // why: the target of a migration in progress holds the room it will need.
            if let Some(mig) = sb.migrating() {
                let e = m.entry(mig.to.as_str()).or_default();
                *e = e.plus(sb.request.resources);
            }
        }
        m
    }

    /// The scheduler's view of every node, in id order.
    pub fn node_views(&self) -> Vec<NodeView> {
        let alloc = self.allocated();
        let mut groups: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for sb in self.sandboxes.values().filter(|s| s.reserves()) {
            if let Some(g) = &sb.request.group {
                groups
                    .entry(sb.node.as_str())
                    .or_default()
                    .insert(g.clone());
            }
        }
        self.nodes
            .values()
            .map(|n| NodeView {
                id: n.id.clone(),
                capacity: n.capacity,
                allocated: alloc.get(n.id.as_str()).copied().unwrap_or_default(),
                accel: n.accel,
                labels: n.labels.clone(),
                cordoned: n.cordoned,
                ready: n.ready,
                warm_templates: n.warm_templates.clone(),
                volumes: n.volumes.clone(),
                groups: groups.remove(n.id.as_str()).unwrap_or_default(),
            })
            .collect()
    }

    pub(crate) fn touch_sandbox(&mut self, id: &str) {
        self.dirty.insert(Row::Sandbox(id.to_string()));
    }

    fn touch_node(&mut self, id: &str) {
        self.dirty.insert(Row::Node(id.to_string()));
    }

    /// Applies one committed command. Deterministic: depends only on `self`
    /// and `cmd`.
    pub fn apply(&mut self, cmd: &Command) -> Reply {
        match cmd {
            Command::RegisterNode { node } => self.register(node),
            Command::RemoveNode { id, at_ms } => self.remove_node(id, *at_ms),
            Command::Heartbeat {
                node,
                instance,
                at_ms,
                observed,
                report,
                grace_ms,
            } => {
                let Some(n) = self.nodes.get_mut(node) else {
                    return Reply::NotFound {
                        what: format!("node {node}"),
                    };
                };
                if &n.instance != instance {
                    return Reply::DuplicateNode { id: node.clone() };
                }
                n.last_heartbeat_ms = n.last_heartbeat_ms.max(*at_ms);
                n.ready = true;
                self.touch_node(node);
                for (id, obs) in observed {
                    let Some(sb) = self.sandboxes.get_mut(id) else {
                        continue;
                    };
                    // why: a rescheduled sandbox's old node may still report it.
                    if &sb.node != node || sb.observed.as_ref() == Some(obs) {
                        continue;
                    }
                    sb.observed = Some(obs.clone());
                    self.touch_sandbox(id);
                }
                match report {
                    Some(report) => self.reconcile(node, report, *at_ms, *grace_ms),
                    None => Reply::Ok,
                }
            }
            Command::MarkNotReady { node, at_ms } => {
                let Some(n) = self.nodes.get_mut(node) else {
                    return Reply::NotFound {
                        what: format!("node {node}"),
                    };
                };
                if !n.ready {
                    return Reply::Ok;
                }
                n.ready = false;
                self.touch_node(node);
                self.end_migrations_to(
                    node,
                    *at_ms,
                    "its target node stopped sending heartbeats",
                    true,
                );
                self.evacuate(node, *at_ms, "its node stopped sending heartbeats")
            }
            Command::SetCordon { node, cordoned } => match self.nodes.get_mut(node) {
                Some(n) => {
                    n.cordoned = *cordoned;
                    let n = n.clone();
                    self.touch_node(node);
                    Reply::Node { node: n }
                }
                None => Reply::NotFound {
                    what: format!("node {node}"),
                },
            },
            Command::Drain { node, at_ms, only } => {
                let Some(n) = self.nodes.get_mut(node) else {
                    return Reply::NotFound {
                        what: format!("node {node}"),
                    };
                };
                n.cordoned = true;
                self.touch_node(node);
                self.move_always(node, *at_ms, true, only.as_deref())
            }
            Command::CreateSandbox { sandbox } => self.create(sandbox),
            Command::SetObserved {
                id,
                observed,
                node,
                generation,
            } => match self.sandboxes.get_mut(id) {
                // why: a late result of a start for another node or an older
                // generation must not overwrite the record's current copy.
                // why: and a failed start (no copy) must not overwrite a copy
                // of the same start a heartbeat reported meanwhile (the node
                // answered too late for the caller, but the copy runs).
                Some(sb)
                    if node.as_ref().is_some_and(|n| n != &sb.node)
                        || generation.is_some_and(|g| g != sb.reschedules)
                        || (observed.agent_id.is_none()
                            && sb.observed.as_ref().is_some_and(|o| o.agent_id.is_some())) =>
                {
                    Reply::Sandbox {
                        sandbox: sb.clone(),
                    }
                }
                Some(sb) => {
                    sb.observed = Some(observed.clone());
                    if observed.agent_id.is_some() && !observed.is_terminal() {
                        let generation = sb.reschedules;
                        sb.close_takeover(generation);
                    }
                    let sb = sb.clone();
                    self.touch_sandbox(id);
                    Reply::Sandbox { sandbox: sb }
                }
                None => Reply::NotFound {
                    what: format!("sandbox {id}"),
                },
            },
            Command::DeleteSandbox { id } => match self.sandboxes.remove(id) {
                Some(sb) => {
                    if let Some(n) = &sb.name {
                        self.index.by_name.remove(n);
                    }
                    if let Some(k) = &sb.idempotency_key {
                        self.index.by_key.remove(k);
                    }
                    self.touch_sandbox(id);
                    // why: a migration's target copy is tagged one generation
                    // up; the tombstone must cover it so it is stopped too.
                    let generation = sb
                        .migration
                        .as_ref()
                        .map_or(sb.reschedules, |m| m.generation.max(sb.reschedules));
                    self.bury(id, generation);
                    Reply::Ok
                }
                None => Reply::NotFound {
                    what: format!("sandbox {id}"),
                },
            },
            Command::SetPolicy {
                id,
                policy,
                expect_version,
            } => self.set_policy(id, policy, *expect_version),
            Command::NotRunning {
                id,
                node,
                generation,
                status,
                why,
                at_ms,
                expect,
            } => {
                let holds = match (expect, self.sandboxes.get(id)) {
                    (Some(Expect::Unstarted), Some(sb)) => sb.observed.is_none(),
                    (Some(Expect::Copy { agent_id }), Some(sb)) => {
                        sb.observed.as_ref().and_then(|o| o.agent_id.as_ref()) == Some(agent_id)
                    }
                    (Some(Expect::Abandoned), Some(sb)) => sb.abandoned(),
                    _ => true,
                };
                match self.sandboxes.get(id) {
                    Some(sb) if !holds => Reply::Sandbox {
                        sandbox: sb.clone(),
                    },
                    Some(_) if matches!(expect, Some(Expect::Abandoned)) => {
                        self.restart_abandoned(id, node, *generation, why, *at_ms)
                    }
                    _ => self.not_running(id, node, *generation, status, why, *at_ms),
                }
            }
            Command::StartMigration { id, migration } => self.start_migration(id, migration),
            Command::MigrationPhase {
                id,
                migration,
                phase,
                error,
                progress,
                at_ms,
            } => self.migration_phase(id, migration, phase, error, progress, *at_ms),
            Command::SettleAbort {
                id,
                migration,
                answer,
                at_ms,
            } => self.settle_abort(id, migration, *answer, *at_ms),
            Command::InitCluster { id } => {
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(id.clone());
                    self.dirty.insert(Row::Meta);
                }
                Reply::Ok
            }
            Command::PutImage { image } => {
                self.images.insert(image.name.clone(), image.clone());
                self.dirty.insert(Row::Image(image.name.clone()));
                Reply::Ok
            }
            Command::AllocateSlice {
                node,
                instance,
                want,
            } => self.allocate_slice(node, instance, *want),
            Command::Lease {
                node,
                instance,
                sandbox,
                want,
            } => self.lease(node, instance, sandbox, *want),
            Command::Release {
                node,
                instance,
                sandbox,
            } => self.release(node, instance, |id| id == sandbox),
            Command::RetainLeases {
                node,
                instance,
                keep,
            } => self.release(node, instance, |id| !keep.contains(id)),
        }
    }

    fn set_policy(
        &mut self,
        id: &str,
        policy: &serde_json::Value,
        expect_version: Option<u64>,
    ) -> Reply {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        if let Some(want) = expect_version.filter(|v| *v != sb.policy_version) {
            return Reply::Superseded {
                message: format!(
                    "the policy of sandbox {id} was set again meanwhile (version {}, not {want}); it was left as that set made it",
                    sb.policy_version
                ),
            };
        }
        if let Some(m) = sb.migrating() {
            return Reply::Conflict {
                message: format!(
                    "sandbox {id} is being migrated (node {} to node {}, phase {}); set the policy after it finished (see `hearth migrate --status {id}`)",
                    m.from, m.to, m.phase
                ),
            };
        }
        let Some(spec) = sb.spec.as_object_mut() else {
            return Reply::Invalid {
                message: format!("sandbox {id}: its recorded spec is not an object"),
            };
        };
        let network = spec
            .entry("network")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !network.is_object() {
            *network = serde_json::Value::Object(Default::default());
        }
        let Some(network) = network.as_object_mut() else {
            return Reply::Invalid {
                message: format!("sandbox {id}: its recorded network is not an object"),
            };
        };
        if network.get("mode").and_then(|m| m.as_str()) == Some("none") {
            return Reply::Invalid {
                message: format!(
                    "sandbox {id} has no network (--network none): it has no policy to set"
                ),
            };
        }
        for dir in ["egress", "ingress"] {
            let v = policy
                .get(dir)
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            network.insert(dir.to_string(), v);
        }
        sb.policy_version += 1;
        let sb = sb.clone();
        self.touch_sandbox(id);
        Reply::Sandbox { sandbox: sb }
    }

    pub(crate) fn not_running(
        &mut self,
        id: &str,
        node: &str,
        generation: u32,
        status: &str,
        why: &str,
        at_ms: u64,
    ) -> Reply {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        // why: a `restart: always` record whose migration is past the
        // switch-over is not started again (as the generation the target's
        // copy carries) before the migration settles: the target may have
        // committed (migsafe 2). Before the switch-over it cannot have.
        if sb.node != node
            || sb.reschedules != generation
            || (sb.restart == RestartPolicy::Always && sb.may_have_switched())
        {
            return Reply::Sandbox {
                sandbox: sb.clone(),
            };
        }
        end_migration(
            sb,
            &format!("sandbox {id} stopped running on node {node}: {why}"),
            at_ms,
        );
        sb.observed = Some(if sb.restart == RestartPolicy::Always {
            sb.reschedules += 1;
            Observed {
                status: "creating".into(),
                agent_id: None,
                error: Some(format!("starting again: {why}")),
                updated_ms: at_ms,
            }
        } else {
            Observed {
                status: status.to_string(),
                agent_id: sb.observed.as_ref().and_then(|o| o.agent_id.clone()),
                error: Some(format!("{status}: {why}")),
                updated_ms: at_ms,
            }
        });
        let sb = sb.clone();
        self.touch_sandbox(id);
        Reply::Sandbox { sandbox: sb }
    }

    /// Starts a given-up `restart: always` record again as its next
    /// generation (its start failed): on its node while that node is Ready,
    /// not cordoned and has room for it (a given-up record holds none, so
    /// the room may be gone), else wherever it fits, else not at all (it
    /// stays `failed`; the leader tries again later).
    fn restart_abandoned(
        &mut self,
        id: &str,
        node: &str,
        generation: u32,
        why: &str,
        at_ms: u64,
    ) -> Reply {
        let Some(sb) = self.sandboxes.get(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        if sb.node != node
            || sb.reschedules != generation
            || sb.restart != RestartPolicy::Always
            || sb.pinned
            || sb.record_only
            || sb.migrating().is_some()
        {
            return Reply::Sandbox {
                sandbox: sb.clone(),
            };
        }
        let req = sb.request.clone();
        let views = self.node_views();
        let own: Vec<NodeView> = views.iter().filter(|v| v.id == node).cloned().collect();
        let target = match hearth_sched::place(&own, &req, Strategy::BinPack) {
            Ok(v) => Some(v.id.clone()),
            Err(_) => {
                let others: Vec<NodeView> = views.into_iter().filter(|v| v.id != node).collect();
                hearth_sched::place(&others, &req_without_group(&req), Strategy::BinPack)
                    .ok()
                    .map(|v| v.id.clone())
            }
        };
        let Some(target) = target else {
            return Reply::Rejected {
                node: node.to_string(),
                reason: format!(
                    "no Ready node has room for sandbox {id}; it stays failed and is tried again"
                ),
            };
        };
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return Reply::Ok;
        };
        sb.node = target;
        sb.reschedules += 1;
        sb.observed = Some(Observed {
            status: "creating".into(),
            agent_id: None,
            error: Some(format!("starting again: {why}")),
            updated_ms: at_ms,
        });
        let sb = sb.clone();
        self.touch_sandbox(id);
        Reply::Sandbox { sandbox: sb }
    }

    fn start_migration(&mut self, id: &str, m: &Migration) -> Reply {
        let Some(sb) = self.sandboxes.get(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        if let Some(cur) = sb.migrating() {
            return Reply::Conflict {
                message: format!(
                    "sandbox {id} is already migrating (node {} to node {}, phase {}); see `hearth migrate --status {id}`",
                    cur.from, cur.to, cur.phase
                ),
            };
        }
        if sb.pinned || sb.record_only {
            return Reply::Invalid {
                message: format!(
                    "sandbox {id} is not run by a cluster node agent (a hearthd dev or record-only sandbox); only cluster sandboxes migrate between nodes"
                ),
            };
        }
        let status = sb
            .observed
            .as_ref()
            .map_or("creating", |o| o.status.as_str());
        if status != "running" {
            return Reply::Conflict {
                message: format!(
                    "sandbox {id} is {status}, not running; only a running sandbox can migrate"
                ),
            };
        }
        if sb.node != m.from {
            return Reply::Conflict {
                message: format!(
                    "sandbox {id} runs on node {}, not {}; ask again",
                    sb.node, m.from
                ),
            };
        }
        if m.to == sb.node {
            return Reply::Invalid {
                message: format!(
                    "sandbox {id} already runs on node {}; migrate it to another node",
                    m.to
                ),
            };
        }
        let Some(target) = self.nodes.get(&m.to) else {
            return Reply::NotFound {
                what: format!("node {}", m.to),
            };
        };
        if !target.ready {
            return Reply::Rejected {
                node: m.to.clone(),
                reason: format!(
                    "node {} is NotReady (no heartbeat); pick another node or wait until it is ready",
                    m.to
                ),
            };
        }
        if target.cordoned {
            return Reply::Rejected {
                node: m.to.clone(),
                reason: format!(
                    "node {} is cordoned; uncordon it (`hearth node uncordon {}`) or pick another node",
                    m.to, m.to
                ),
            };
        }
        let req = req_without_group(&sb.request);
        let views = self.node_views();
        let ctx = hearth_sched::Context::of(&views);
        if let Some(view) = views.iter().find(|v| v.id == m.to) {
            if let Err(why) = hearth_sched::filter(view, &req, &ctx) {
                return Reply::Rejected {
                    node: m.to.clone(),
                    reason: format!("node {} cannot take sandbox {id}: {why}", m.to),
                };
            }
        }
        let mut mig = m.clone();
        mig.generation = sb.reschedules + 1;
        mig.phase = "preparing".into();
        mig.error = None;
        mig.progress = None;
        mig.source_gone_ms = None;
        mig.unconfirmed = false;
        mig.target_lost = false;
        mig.agent_id = sb.observed.as_ref().and_then(|o| o.agent_id.clone());
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        sb.migration = Some(Box::new(mig));
        let sb = sb.clone();
        self.touch_sandbox(id);
        Reply::Sandbox { sandbox: sb }
    }

    fn migration_phase(
        &mut self,
        id: &str,
        migration: &str,
        phase: &str,
        error: &Option<String>,
        progress: &Option<serde_json::Value>,
        at_ms: u64,
    ) -> Reply {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        let Some(rank) = MIGRATION_PHASES.iter().position(|p| *p == phase) else {
            return Reply::Invalid {
                message: format!(
                    "unknown migration phase {phase:?} for sandbox {id}; one of {}",
                    MIGRATION_PHASES.join(", ")
                ),
            };
        };
        let Some(m) = sb.migration.as_mut().filter(|m| m.id == migration) else {
            return Reply::Conflict {
                message: format!("migration {migration} of sandbox {id} is not its current one"),
            };
        };
        // why: the end is decided once (by the driver or the target's heartbeat).
        // why: a late write (a poll racing the next one) never moves a
        // migration back to an earlier phase.
        let current = MIGRATION_PHASES.iter().position(|p| *p == m.phase);
        if !m.active() || current.is_some_and(|c| rank < c) {
            return Reply::Sandbox {
                sandbox: sb.clone(),
            };
        }
        // why: only news keeps a migration alive: a later phase, an end, or
        // progress that advanced (a long healthy pre-copy writes the same
        // phase with more bytes); a repeat of the same report does not, so
        // a source that stopped making progress still meets its deadline.
        let (bytes, iters) = progress_mark(m.progress.as_ref());
        let (nbytes, niters) = progress_mark(progress.as_ref());
        let news = current.is_none_or(|c| rank > c)
            || MIGRATION_ENDED.contains(&phase)
            || nbytes > bytes
            || niters > iters;
        // why: a late, lower report (a follower's driver and the leader's
        // watchdog both write) must not lower the mark, or the next repeat
        // of the higher one would count as news without any progress.
        if progress.is_some()
            && (nbytes >= bytes && niters >= iters || MIGRATION_ENDED.contains(&phase))
        {
            m.progress = progress.clone();
        }
        if error.is_some() {
            m.error = error.clone();
        }
        if news {
            m.updated_ms = at_ms;
        }
        if phase == "completed" {
            self.complete_migration(id, None, at_ms);
        } else {
            m.phase = phase.to_string();
            self.touch_sandbox(id);
        }
        match self.sandboxes.get(id) {
            Some(sb) => Reply::Sandbox {
                sandbox: sb.clone(),
            },
            None => Reply::Ok,
        }
    }

    /// The target runs the sandbox: move the placement there (a new
    /// generation, the one its copy is tagged with). `agent_id` is the id the
    /// target reported (unchanged by a migration, so the record's by default).
    pub(crate) fn complete_migration(&mut self, id: &str, agent_id: Option<&str>, at_ms: u64) {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return;
        };
        let Some(m) = sb.migration.as_mut().filter(|m| m.active()) else {
            return;
        };
        // why: the record moved on (rescheduled, started again) or the target
        // is gone: moving it there would leave no copy the record names.
        if sb.node != m.from
            || sb.reschedules + 1 != m.generation
            || !self.nodes.contains_key(&m.to)
        {
            let why = format!(
                "superseded: sandbox {id} is now generation {} on node {} (the migration was from node {} at generation {}{})",
                sb.reschedules,
                sb.node,
                m.from,
                m.generation.saturating_sub(1),
                if self.nodes.contains_key(&m.to) { "" } else { "; its target node was removed" }
            );
            end_migration(sb, &why, at_ms);
            self.touch_sandbox(id);
            return;
        }
        m.phase = "completed".into();
        m.error = None;
        m.updated_ms = at_ms;
        sb.node = m.to.clone();
        sb.reschedules = m.generation;
        let agent_id = agent_id
            .map(str::to_string)
            .or_else(|| sb.observed.as_ref().and_then(|o| o.agent_id.clone()));
        sb.observed = Some(Observed {
            status: "running".into(),
            agent_id,
            error: None,
            updated_ms: at_ms,
        });
        self.touch_sandbox(id);
    }

    /// A migration ended (aborted) while the record became `lost` with no
    /// copy left on the source, and the target reports it runs the copy of
    /// the migration's generation: the move completes after all.
    pub(crate) fn complete_late_migration(&mut self, id: &str, agent_id: &str, at_ms: u64) {
        if let Some(m) = self
            .sandboxes
            .get_mut(id)
            .and_then(|s| s.migration.as_mut())
        {
            // why: reopened for the one write that moves the placement.
            m.phase = "committing".into();
        }
        self.complete_migration(id, Some(agent_id), at_ms);
    }

    /// The target reports a running copy of the generation of a migration
    /// that the state machine ended `aborted` without the source's word
    /// ([`Migration::unconfirmed`]): the target committed after all (the
    /// record lagged the source). Its copy is the sandbox, with its live
    /// state: the record moves there, and a copy started again meanwhile (a
    /// cold restart, on another node) is fenced as stale.
    pub(crate) fn take_over_unconfirmed(&mut self, id: &str, agent_id: Option<&str>, at_ms: u64) {
        let Some(sb) = self.sandboxes.get_mut(id) else {
            return;
        };
        let Some(m) = sb.migration.as_mut() else {
            return;
        };
        m.phase = "completed".into();
        m.error = None;
        m.unconfirmed = false;
        m.updated_ms = at_ms;
        sb.node = m.to.clone();
        sb.reschedules = m.generation;
        sb.observed = Some(Observed {
            status: "running".into(),
            agent_id: agent_id.map(str::to_string).or_else(|| m.agent_id.clone()),
            error: None,
            updated_ms: at_ms,
        });
        self.touch_sandbox(id);
    }

    /// [`Command::SettleAbort`]: a no-op unless the record still waits for
    /// the target's answer about attempt `migration`
    /// ([`SandboxRecord::held_for_target`]). `Committed` moves the record
    /// to the target (only while that node is Ready: a takeover onto a node
    /// that stopped heartbeating would strand the record; the leader then
    /// settles it `TargetLost`); `TargetLost` holds only while the target is
    /// NotReady or removed; `Uncommitted` confirms the abort.
    fn settle_abort(
        &mut self,
        id: &str,
        migration: &str,
        answer: TargetAnswer,
        at_ms: u64,
    ) -> Reply {
        let Some(sb) = self.sandboxes.get(id) else {
            return Reply::NotFound {
                what: format!("sandbox {id}"),
            };
        };
        let Some(m) = sb.held_for_target().filter(|m| m.id == migration) else {
            return Reply::Sandbox {
                sandbox: sb.clone(),
            };
        };
        let to = m.to.clone();
        let target_ready = self.nodes.get(&to).map(|n| n.ready);
        let note =
            match answer {
                TargetAnswer::Committed if target_ready == Some(true) => {
                    self.take_over_unconfirmed(id, None, at_ms);
                    None
                }
                TargetAnswer::Uncommitted => Some(format!(
                "node {to} (the target) confirmed that attempt {migration} never committed there"
            )),
                TargetAnswer::TargetLost if target_ready != Some(true) => {
                    Some(format!(
                "node {to} (the target) is {}: a copy it may have committed is lost with it",
                if target_ready.is_none() { "removed" } else { "NotReady" }
            ))
                }
                TargetAnswer::Committed | TargetAnswer::TargetLost => None,
            };
        let lost = matches!(answer, TargetAnswer::TargetLost);
        if let Some(note) = note {
            if let Some(m) = self
                .sandboxes
                .get_mut(id)
                .and_then(|s| s.migration.as_mut())
            {
                // why: a lost target may still have committed (its source
                // released to it): its copy may still take the record over
                // until another copy is reported; only its answer closes that.
                if lost {
                    m.target_lost = true;
                } else {
                    m.unconfirmed = false;
                }
                m.updated_ms = at_ms;
                m.error = Some(match m.error.take() {
                    Some(e) => format!("{e}; {note}"),
                    None => note,
                });
            }
            self.touch_sandbox(id);
        }
        match self.sandboxes.get(id) {
            Some(sb) => Reply::Sandbox {
                sandbox: sb.clone(),
            },
            None => Reply::Ok,
        }
    }

    /// The node's slice, when `instance` holds it.
    fn held_slice(&mut self, node: &str, instance: &str) -> Result<&mut NodeSlice, Reply> {
        match self.slices.get_mut(node) {
            None => Err(Reply::NotFound {
                what: format!("address slice of node {node} (the agent must join first)"),
            }),
            Some(s) if s.instance != instance => Err(Reply::DuplicateNode {
                id: node.to_string(),
            }),
            Some(s) => Ok(s),
        }
    }

    /// Removes the node (its sandboxes are moved or lost) and its slice. A
    /// slice whose agent instance still holds leases is kept, retired, until
    /// that instance releases them or joins again: the agent may still run
    /// and use the addresses, so no other node may get them.
    fn remove_node(&mut self, id: &str, at_ms: u64) -> Reply {
        let slice = self
            .slices
            .get(id)
            .map(|s| (s.retired, s.leases.len(), s.cidr));
        let reply = match (self.nodes.contains_key(id), slice) {
            (false, None) => {
                return Reply::NotFound {
                    what: format!("node {id}"),
                }
            }
            (false, Some((true, n, cidr))) => {
                return Reply::Conflict {
                    message: format!(
                        "node {id} is already removed; its address slice {cidr} stays taken while its \
                         agent still holds {n} leases: stop that agent's sandboxes (`hearth rm`) or \
                         start it again so it releases them"
                    ),
                }
            }
            (false, Some(_)) => Reply::Moved {
                moved: Vec::new(),
                lost: Vec::new(),
            },
            (true, _) => {
                self.end_migrations_to(id, at_ms, "its target node was removed", false);
                let moved = self.evacuate(id, at_ms, "its node was removed");
                self.nodes.remove(id);
                self.touch_node(id);
                moved
            }
        };
        if let Some(s) = self.slices.get_mut(id) {
            if s.leases.is_empty() {
                self.slices.remove(id);
            } else {
                s.retired = true;
            }
            self.dirty.insert(Row::Slice(id.to_string()));
        }
        reply
    }

    fn allocate_slice(&mut self, node: &str, instance: &str, want: Option<Cidr>) -> Reply {
        if let Some(message) = crate::leases::check_join(node, instance, want) {
            return Reply::Invalid { message };
        }
        if self.nodes.get(node).is_some_and(|n| n.instance != instance) {
            return Reply::DuplicateNode {
                id: node.to_string(),
            };
        }
        if let Some(held) = self.slices.get_mut(node) {
            if held.instance != instance {
                return Reply::DuplicateNode {
                    id: node.to_string(),
                };
            }
            if want.is_none_or(|w| w == held.cidr) {
                // why: the instance that holds a retired slice joins again.
                if held.retired {
                    held.retired = false;
                    self.dirty.insert(Row::Slice(node.to_string()));
                }
                return Reply::Slice {
                    slice: held.clone(),
                };
            }
            if !held.leases.is_empty() {
                return Reply::Conflict {
                    message: format!(
                        "node {node} holds the address slice {} with {} leases; \
                         remove its sandboxes before moving it to another slice",
                        held.cidr,
                        held.leases.len()
                    ),
                };
            }
        }
        let others = self
            .slices
            .values()
            .filter(|s| s.node != node)
            .map(|s| s.cidr);
        let cidr = match want {
            Some(w) => {
                if let Some(o) = self
                    .slices
                    .values()
                    .find(|s| s.node != node && s.cidr.overlaps(w))
                {
                    return Reply::Conflict {
                        message: format!(
                            "address slice {w} overlaps {} of node {}; give this node another --net-pool",
                            o.cidr, o.node
                        ),
                    };
                }
                w
            }
            None => {
                let taken: Vec<Cidr> = others.collect();
                match crate::leases::free_slice(taken.iter()) {
                    Some(c) => c,
                    None => {
                        return Reply::Exhausted {
                            message: format!(
                                "every /{} of the cluster range {} is held by a node; \
                                 remove nodes (`hearth node rm`) to free slices",
                                crate::leases::SLICE_PREFIX,
                                crate::leases::CLUSTER_CIDR
                            ),
                        }
                    }
                }
            }
        };
        let slice = NodeSlice {
            node: node.to_string(),
            instance: instance.to_string(),
            cidr,
            leases: BTreeMap::new(),
            retired: false,
        };
        self.slices.insert(node.to_string(), slice.clone());
        self.dirty.insert(Row::Slice(node.to_string()));
        Reply::Slice { slice }
    }

    fn lease(
        &mut self,
        node: &str,
        instance: &str,
        sandbox: &str,
        want: Option<std::net::Ipv4Addr>,
    ) -> Reply {
        let s = match self.held_slice(node, instance) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let cidr = s.cidr;
        if s.retired {
            return Reply::NotFound {
                what: format!(
                    "address slice of node {node} (the node was removed; the agent must join again)"
                ),
            };
        }
        if let Some(ip) = s.leases.get(sandbox) {
            return Reply::Lease { ip: *ip, cidr };
        }
        if let Some(w) = want {
            if !s.usable(w) {
                return Reply::Conflict {
                    message: format!(
                        "address {w} for sandbox {sandbox} is not a host address of node {node}'s slice {cidr}"
                    ),
                };
            }
            if let Some((other, _)) = s.leases.iter().find(|(_, ip)| **ip == w) {
                return Reply::Conflict {
                    message: format!(
                        "address {w} for sandbox {sandbox} is leased to sandbox {other} of node {node}"
                    ),
                };
            }
            s.leases.insert(sandbox.to_string(), w);
            self.dirty.insert(Row::Slice(node.to_string()));
            return Reply::Lease { ip: w, cidr };
        }
        let Some(ip) = s.free_address() else {
            return Reply::Exhausted {
                message: format!(
                    "address pool {cidr} of node {node} is exhausted ({} addresses leased); \
                     remove sandboxes or give the node a larger slice",
                    s.leases.len()
                ),
            };
        };
        s.leases.insert(sandbox.to_string(), ip);
        self.dirty.insert(Row::Slice(node.to_string()));
        Reply::Lease { ip, cidr }
    }

    fn release(&mut self, node: &str, instance: &str, drop: impl Fn(&str) -> bool) -> Reply {
        let s = match self.held_slice(node, instance) {
            Ok(s) => s,
            Err(r) => return r,
        };
        let released: Vec<String> = s.leases.keys().filter(|k| drop(k)).cloned().collect();
        for k in &released {
            s.leases.remove(k);
        }
        // why: a removed node's slice is freed once its last lease is.
        if s.retired && s.leases.is_empty() {
            self.slices.remove(node);
            self.dirty.insert(Row::Slice(node.to_string()));
        } else if !released.is_empty() {
            self.dirty.insert(Row::Slice(node.to_string()));
        }
        Reply::Released { released }
    }

    /// Keeps a trace of a deleted record (bounded: the oldest goes first).
    fn bury(&mut self, id: &str, generation: u32) {
        let seq = self
            .tombstones
            .values()
            .map(|t| t.seq + 1)
            .max()
            .unwrap_or(0);
        self.tombstones
            .insert(id.to_string(), Tombstone { generation, seq });
        self.dirty.insert(Row::Tombstone(id.to_string()));
        while self.tombstones.len() > TOMBSTONES_MAX {
            let Some(oldest) = self
                .tombstones
                .iter()
                .min_by_key(|(_, t)| t.seq)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.tombstones.remove(&oldest);
            self.dirty.insert(Row::Tombstone(oldest));
        }
    }

    fn register(&mut self, node: &NodeRecord) -> Reply {
        let mut rec = node.clone();
        if let Some(old) = self.nodes.get(&node.id) {
            if old.instance != node.instance {
                return Reply::DuplicateNode {
                    id: node.id.clone(),
                };
            }
            // The same agent restarting keeps what the operator set.
            rec.cordoned = old.cordoned;
            rec.registered_ms = old.registered_ms;
        }
        rec.ready = true;
        rec.last_heartbeat_ms = rec.last_heartbeat_ms.max(node.registered_ms);
        self.nodes.insert(rec.id.clone(), rec.clone());
        self.touch_node(&rec.id);
        Reply::Node { node: rec }
    }

    fn create(&mut self, sandbox: &SandboxRecord) -> Reply {
        if let Some(k) = &sandbox.idempotency_key {
            if let Some(existing) = self
                .index
                .by_key
                .get(k)
                .and_then(|id| self.sandboxes.get(id))
            {
                return Reply::Sandbox {
                    sandbox: existing.clone(),
                };
            }
        }
        if self.sandboxes.contains_key(&sandbox.id) {
            return Reply::Conflict {
                message: format!("sandbox id {} exists", sandbox.id),
            };
        }
        if let Some(n) = &sandbox.name {
            if self.index.by_name.contains_key(n) {
                return Reply::Conflict {
                    message: format!("the name {n} is taken"),
                };
            }
        }
        let views = self.node_views();
        let Some(view) = views.iter().find(|v| v.id == sandbox.node) else {
            return Reply::Rejected {
                node: sandbox.node.clone(),
                reason: "node is not registered".into(),
            };
        };
        let ctx = hearth_sched::Context::of(&views);
        let checked = if sandbox.pinned {
            Ok(())
        } else {
            hearth_sched::filter(view, &sandbox.request, &ctx)
        };
        if let Err(why) = checked {
            return Reply::Rejected {
                node: sandbox.node.clone(),
                reason: why.to_string(),
            };
        }
        let rec = sandbox.clone();
        self.insert_sandbox(rec.clone());
        Reply::Sandbox { sandbox: rec }
    }

    fn insert_sandbox(&mut self, rec: SandboxRecord) {
        if self.tombstones.remove(&rec.id).is_some() {
            self.dirty.insert(Row::Tombstone(rec.id.clone()));
        }
        if let Some(n) = &rec.name {
            self.index.by_name.insert(n.clone(), rec.id.clone());
        }
        if let Some(k) = &rec.idempotency_key {
            self.index.by_key.insert(k.clone(), rec.id.clone());
        }
        self.touch_sandbox(&rec.id);
        self.sandboxes.insert(rec.id.clone(), rec);
    }

    /// Ends the active migrations whose target is `node` (with
    /// `before_switchover`, only those whose source still runs the guest: a
    /// target that merely missed heartbeats may have taken over).
    fn end_migrations_to(&mut self, node: &str, at_ms: u64, why: &str, before_switchover: bool) {
        let ids: Vec<String> = self
            .sandboxes
            .values()
            .filter(|s| {
                s.migrating()
                    .is_some_and(|m| m.to == node && !(before_switchover && m.switched()))
            })
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            if let Some(sb) = self.sandboxes.get_mut(&id) {
                end_migration(
                    sb,
                    &format!("the migration of sandbox {id} ended: {why}"),
                    at_ms,
                );
            }
            self.touch_sandbox(&id);
        }
    }

    /// The node is gone: sandboxes with `restart: always` move, the rest are lost.
    fn evacuate(&mut self, node: &str, at_ms: u64, why: &str) -> Reply {
        let Reply::Moved { moved, mut lost } = self.move_always(node, at_ms, false, None) else {
            return Reply::Ok;
        };
        // why: a `restart: always` record whose migration is past the
        // switch-over is neither moved (above) nor given up: the target may
        // have committed; the target's report completes it, the source's
        // return settles it. Before the switch-over the node's loss ends the
        // migration (aborted) and the record moves like any other.
        let stay: Vec<String> = self
            .sandboxes
            .values()
            .filter(|s| s.node == node && s.reserves())
            .filter(|s| !(s.restart == RestartPolicy::Always && s.may_have_switched()))
            .map(|s| s.id.clone())
            .collect();
        for id in stay {
            if let Some(sb) = self.sandboxes.get_mut(&id) {
                end_migration(sb, &format!("sandbox {id} was lost: {why}"), at_ms);
                sb.observed = Some(Observed {
                    status: "lost".into(),
                    agent_id: sb.observed.as_ref().and_then(|o| o.agent_id.clone()),
                    error: Some(format!("lost: {why}")),
                    updated_ms: at_ms,
                });
                self.touch_sandbox(&id);
                if !lost.contains(&id) {
                    lost.push(id);
                }
            }
        }
        Reply::Moved { moved, lost }
    }

    /// Places every live `restart: always` sandbox of `node` elsewhere
    /// (bin-pack, excluding `node`); those with nowhere to go stay and are
    /// listed as lost. The scheduler is pure, so this stays deterministic.
    /// With `drain` (the node stays up) a sandbox still being created stays:
    /// its first copy may still come up there, and a fresh start elsewhere
    /// would be a second copy (migsafe 3); the drain reports it not moved.
    /// On a drain a sandbox whose migration is active stays (the migration
    /// may still complete). When its node is gone one past the switch-over
    /// stays (its copy may already run on the target, so a fresh start
    /// elsewhere could fence it: migsafe 2); one before it *as the record
    /// shows it* moves and the move ends the migration aborted, unconfirmed:
    /// the record lags the source, so the target may have committed after all
    /// and its copy, if it reports it, takes the record over. So the fresh
    /// start avoids the migration's target node, unless no other node fits
    /// (then it starts there one generation above the target's copy, which
    /// is then fenced: the live state is lost, one copy stays).
    fn move_always(
        &mut self,
        node: &str,
        at_ms: u64,
        drain: bool,
        only: Option<&[String]>,
    ) -> Reply {
        let ids: Vec<String> = self
            .sandboxes
            .values()
            .filter(|s| {
                s.node == node
                    && s.reserves()
                    && s.restart == RestartPolicy::Always
                    && !s.pinned
                    && if drain {
                        s.migrating().is_none()
                    } else {
                        !s.may_have_switched()
                    }
                    && !(drain && s.observed.as_ref().is_none_or(|o| o.status == "creating"))
                    && only.is_none_or(|o| o.contains(&s.id))
            })
            .map(|s| s.id.clone())
            .collect();
        let (mut moved, mut lost) = (Vec::new(), Vec::new());
        for id in ids {
            let req = req_without_group(&self.sandboxes[&id].request);
            let avoid = open_target(&self.sandboxes[&id]).map(str::to_string);
            let views: Vec<NodeView> = self
                .node_views()
                .into_iter()
                .filter(|v| v.id != node)
                .collect();
            let preferred: Vec<NodeView> = views
                .iter()
                .filter(|v| avoid.as_deref() != Some(v.id.as_str()))
                .cloned()
                .collect();
            let placed = hearth_sched::place(&preferred, &req, Strategy::BinPack)
                .or_else(|_| hearth_sched::place(&views, &req, Strategy::BinPack))
                .map(|t| t.id.clone());
            match placed {
                Ok(target) => {
                    if let Some(sb) = self.sandboxes.get_mut(&id) {
                        // why: on the migration's own target the fresh copy
                        // must not carry the generation its migrated copy has.
                        let next = match sb.migrating() {
                            Some(m) if m.to == target => m.generation + 1,
                            _ => sb.reschedules + 1,
                        };
                        end_migration(
                            sb,
                            &format!("sandbox {id} was started again on node {target}"),
                            at_ms,
                        );
                        sb.node = target;
                        sb.reschedules = next;
                        sb.observed = Some(Observed {
                            status: "creating".into(),
                            agent_id: None,
                            error: None,
                            updated_ms: at_ms,
                        });
                    }
                    self.touch_sandbox(&id);
                    moved.push(id);
                }
                Err(_) => lost.push(id),
            }
        }
        Reply::Moved { moved, lost }
    }
}

/// Ends `sb`'s active migration as aborted (superseded by `why`), if any,
/// without the source's word that it did not commit (`unconfirmed`): a
/// running copy of its generation that the target reports later takes the
/// record over (see `reconcile`); any other copy of it is stopped.
pub(crate) fn end_migration(sb: &mut SandboxRecord, why: &str, at_ms: u64) {
    let copy = sb.observed.as_ref().and_then(|o| o.agent_id.clone());
    if let Some(m) = sb.migration.as_mut().filter(|m| m.active()) {
        m.phase = "aborted".into();
        m.error = Some(why.to_string());
        m.updated_ms = at_ms;
        m.unconfirmed = true;
        m.target_lost = false;
        // why: the restart that follows clears the record's copy id; the
        // leader names it when it asks the target (records of older logs).
        if m.agent_id.is_none() {
            m.agent_id = copy;
        }
    }
}

/// The node an unconfirmed abort's target copy may run on: a record whose
/// open migration `end_migration` is about to end is not started again
/// there (two copies of one generation on one node could not be told apart).
fn open_target(sb: &SandboxRecord) -> Option<&str> {
    sb.migrating().map(|m| m.to.as_str())
}

/// A moving sandbox leaves its group behind, so the group constraint (which
/// would pin it to the lost node) does not apply to it.
fn req_without_group(r: &Request) -> Request {
    Request {
        group: None,
        ..r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(st: &mut State, node: &str, instance: &str, want: Option<&str>) -> Reply {
        st.apply(&Command::AllocateSlice {
            node: node.into(),
            instance: instance.into(),
            want: want.map(|w| w.parse().unwrap()),
        })
    }

    fn lease(st: &mut State, node: &str, sandbox: &str) -> Reply {
        st.apply(&Command::Lease {
            node: node.into(),
            instance: "i1".into(),
            sandbox: sandbox.into(),
            want: None,
        })
    }

    fn ip(r: Reply) -> String {
        match r {
            Reply::Lease { ip, .. } => ip.to_string(),
            other => panic!("no lease: {other:?}"),
        }
    }

    fn record(id: &str, network: serde_json::Value) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            name: None,
            spec: serde_json::json!({"image": "busybox", "network": network}),
            request: Request::default(),
            node: "n1".into(),
            restart: RestartPolicy::Always,
            record_only: false,
            idempotency_key: None,
            ip: None,
            created_ms: 1,
            reschedules: 0,
            policy_version: 0,
            pinned: true,
            observed: None,
            migration: None,
        }
    }

    #[test]
    fn a_policy_set_replaces_the_recorded_policy_and_is_refused_when_it_cannot_apply() {
        let mut st = State::default();
        st.insert_sandbox(record(
            "a",
            serde_json::json!({"egress": {"default": "allow", "deny": ["10.0.0.0/8"]}}),
        ));
        st.insert_sandbox(record("none", serde_json::json!({"mode": "none"})));
        let new = serde_json::json!({
            "egress": {"default": "deny", "allow": ["192.168.1.2/32:80"], "deny": []},
            "ingress": {"default": "allow", "allow": [], "deny": []},
        });
        let set = |st: &mut State, id: &str| {
            st.apply(&Command::SetPolicy {
                id: id.into(),
                policy: new.clone(),
                expect_version: None,
            })
        };
        let Reply::Sandbox { sandbox } = set(&mut st, "a") else {
            panic!("not applied")
        };
        assert_eq!(sandbox.policy(), new);
        assert_eq!(st.sandboxes["a"].policy(), new);
        assert_eq!(sandbox.policy_version, 1, "each set is a new version");
        // The rest of the spec is kept.
        assert_eq!(st.sandboxes["a"].spec["image"], "busybox");
        assert!(st.dirty.contains(&Row::Sandbox("a".into())));
        // A conditional set (a revert) applies only over the version it
        // expects: not over a newer set, even one of the same policy (ABA).
        let Reply::Sandbox { .. } = set(&mut st, "a") else {
            panic!("not applied")
        };
        assert_eq!(st.sandboxes["a"].policy_version, 2);
        let r = st.apply(&Command::SetPolicy {
            id: "a".into(),
            policy: serde_json::json!({}),
            expect_version: Some(1),
        });
        assert!(matches!(r, Reply::Superseded { .. }), "{r:?}");
        assert_eq!(
            st.sandboxes["a"].policy(),
            new,
            "a newer set was overwritten"
        );
        assert_eq!(st.sandboxes["a"].policy_version, 2);
        let r = st.apply(&Command::SetPolicy {
            id: "a".into(),
            policy: serde_json::json!({}),
            expect_version: Some(2),
        });
        assert!(matches!(r, Reply::Sandbox { .. }), "{r:?}");
        assert_eq!(
            st.sandboxes["a"].policy(),
            serde_json::json!({"egress": {}, "ingress": {}})
        );
        assert_eq!(st.sandboxes["a"].policy_version, 3);
        let Reply::Sandbox { .. } = set(&mut st, "a") else {
            panic!("not applied")
        };

        assert!(matches!(set(&mut st, "nope"), Reply::NotFound { .. }));
        let Reply::Invalid { message } = set(&mut st, "none") else {
            panic!("a sandbox without a network took a policy")
        };
        assert!(message.contains("no network"), "{message}");

        // While a migration is active its offer carries the policy: refused.
        let mut moving = record("m", serde_json::json!({}));
        moving.migration = Some(Box::new(Migration {
            id: "mig1".into(),
            from: "n1".into(),
            to: "n2".into(),
            phase: "precopy".into(),
            generation: 1,
            started_ms: 1,
            updated_ms: 1,
            error: None,
            progress: None,
            stall_ms: None,
            source_gone_ms: None,
            unconfirmed: false,
            target_lost: false,
            agent_id: None,
        }));
        st.insert_sandbox(moving);
        let before = st.sandboxes["m"].policy();
        let Reply::Conflict { message } = set(&mut st, "m") else {
            panic!("a migrating sandbox took a policy")
        };
        assert!(message.contains("being migrated"), "{message}");
        assert_eq!(st.sandboxes["m"].policy(), before);
        // A record without a policy reads as the defaults.
        assert_eq!(before, serde_json::json!({"egress": {}, "ingress": {}}));
    }

    #[test]
    fn nodes_get_distinct_slices_that_survive_a_restart_of_the_same_agent() {
        let mut st = State::default();
        let Reply::Slice { slice: a } = slice(&mut st, "a", "i1", None) else {
            panic!()
        };
        let Reply::Slice { slice: b } = slice(&mut st, "b", "i1", None) else {
            panic!()
        };
        assert_eq!(a.cidr.to_string(), "10.88.0.0/24");
        assert_eq!(b.cidr.to_string(), "10.88.1.0/24");
        assert_eq!(slice(&mut st, "a", "i1", None), Reply::Slice { slice: a });
        assert!(matches!(
            slice(&mut st, "a", "other", None),
            Reply::DuplicateNode { .. }
        ));
        assert!(matches!(
            slice(&mut st, "c", "i1", Some("10.88.1.0/25")),
            Reply::Conflict { .. }
        ));
    }

    #[test]
    fn leases_are_stable_freed_on_release_and_exhaustion_is_an_error() {
        let mut st = State::default();
        slice(&mut st, "a", "i1", Some("10.9.0.0/30"));
        let x = ip(lease(&mut st, "a", "x"));
        let y = ip(lease(&mut st, "a", "y"));
        assert_eq!((x.as_str(), y.as_str()), ("10.9.0.1", "10.9.0.2"));
        assert_eq!(
            ip(lease(&mut st, "a", "x")),
            x,
            "asking again is idempotent"
        );
        match lease(&mut st, "a", "z") {
            Reply::Exhausted { message } => {
                assert!(message.contains("10.9.0.0/30") && message.contains("exhausted"))
            }
            other => panic!("{other:?}"),
        }
        st.apply(&Command::Release {
            node: "a".into(),
            instance: "i1".into(),
            sandbox: "x".into(),
        });
        assert_eq!(ip(lease(&mut st, "a", "z")), x, "a freed address is reused");
        let r = st.apply(&Command::RetainLeases {
            node: "a".into(),
            instance: "i1".into(),
            keep: ["z".to_string()].into(),
        });
        assert_eq!(
            r,
            Reply::Released {
                released: vec!["y".into()]
            }
        );
        assert!(matches!(
            lease(&mut st, "nobody", "s"),
            Reply::NotFound { .. }
        ));
        let claim = |st: &mut State, sb: &str, ip: &str| {
            st.apply(&Command::Lease {
                node: "a".into(),
                instance: "i1".into(),
                sandbox: sb.into(),
                want: Some(ip.parse().unwrap()),
            })
        };
        assert!(
            matches!(claim(&mut st, "w", "10.9.0.1"), Reply::Conflict { .. }),
            "held by z"
        );
        assert!(
            matches!(claim(&mut st, "w", "10.9.0.3"), Reply::Conflict { .. }),
            "broadcast"
        );
        assert_eq!(ip(claim(&mut st, "w", "10.9.0.2")), "10.9.0.2");
        let dirty = st.take_dirty();
        assert!(dirty.contains(&Row::Slice("a".into())), "{dirty:?}");
    }

    fn register(st: &mut State, id: &str, instance: &str) -> Reply {
        st.apply(&Command::RegisterNode {
            node: NodeRecord {
                id: id.into(),
                instance: instance.into(),
                address: "http://127.0.0.1:1".into(),
                capacity: Resources::default(),
                accel: Accel::Tcg,
                labels: BTreeMap::new(),
                cordoned: false,
                ready: true,
                registered_ms: 1,
                last_heartbeat_ms: 1,
                warm_templates: BTreeSet::new(),
                volumes: BTreeSet::new(),
            },
        })
    }

    fn rm(st: &mut State, id: &str) -> Reply {
        st.apply(&Command::RemoveNode {
            id: id.into(),
            at_ms: 2,
        })
    }

    #[test]
    fn a_removed_node_keeps_its_slice_taken_while_its_agent_holds_leases() {
        let mut st = State::default();
        register(&mut st, "a", "i1");
        slice(&mut st, "a", "i1", None);
        let x = ip(lease(&mut st, "a", "x"));
        assert!(matches!(rm(&mut st, "a"), Reply::Moved { .. }));
        assert!(st.slices["a"].retired, "{:?}", st.slices);
        // Another node never gets the removed node's addresses.
        let Reply::Slice { slice: b } = slice(&mut st, "b", "i2", None) else {
            panic!()
        };
        assert_eq!(b.cidr.to_string(), "10.88.1.0/24");
        assert!(matches!(
            slice(&mut st, "c", "i3", Some("10.88.0.0/24")),
            Reply::Conflict { .. }
        ));
        // The retired slice leases nothing new until its agent joins again.
        assert!(matches!(lease(&mut st, "a", "y"), Reply::NotFound { .. }));
        assert!(matches!(
            slice(&mut st, "a", "intruder", None),
            Reply::DuplicateNode { .. }
        ));
        assert!(
            matches!(rm(&mut st, "a"), Reply::Conflict { .. }),
            "a second rm does not free addresses still in use"
        );
        let Reply::Slice { slice: back } = slice(&mut st, "a", "i1", None) else {
            panic!()
        };
        assert!(!back.retired);
        assert_eq!(ip(lease(&mut st, "a", "x")), x, "the lease survived");
        // Removed again, its agent releasing every lease frees the slice.
        rm(&mut st, "a");
        let r = st.apply(&Command::RetainLeases {
            node: "a".into(),
            instance: "i1".into(),
            keep: BTreeSet::new(),
        });
        assert_eq!(
            r,
            Reply::Released {
                released: vec!["x".into()]
            }
        );
        assert!(!st.slices.contains_key("a"));
        assert!(st.take_dirty().contains(&Row::Slice("a".into())));
        let Reply::Slice { slice: c } = slice(&mut st, "c", "i3", None) else {
            panic!()
        };
        assert_eq!(c.cidr.to_string(), "10.88.0.0/24", "freed for reuse");
    }

    #[test]
    fn node_rm_frees_the_slice_of_a_node_that_never_registered() {
        let mut st = State::default();
        slice(&mut st, "ghost", "i1", None);
        assert!(matches!(rm(&mut st, "ghost"), Reply::Moved { .. }));
        assert!(st.slices.is_empty());
        assert!(matches!(rm(&mut st, "ghost"), Reply::NotFound { .. }));
    }

    #[test]
    fn a_slice_needs_the_node_records_instance_and_never_tells_the_holder() {
        let mut st = State::default();
        register(&mut st, "a", "secret-instance");
        let r = slice(&mut st, "a", "other", None);
        assert_eq!(r, Reply::DuplicateNode { id: "a".into() });
        assert!(!format!("{r:?}").contains("secret-instance"));
        assert!(st.slices.is_empty(), "no slice for a non-holder");
        assert!(matches!(
            slice(&mut st, "b", "", None),
            Reply::Invalid { .. }
        ));
        assert!(matches!(
            slice(&mut st, "Bad/Id", "i1", None),
            Reply::Invalid { .. }
        ));
        assert!(matches!(
            slice(&mut st, "b", "i1", Some("10.9.0.0/31")),
            Reply::Invalid { .. }
        ));
        assert!(matches!(
            slice(&mut st, "b", "i1", Some("192.168.0.0/24")),
            Reply::Invalid { .. }
        ));
        assert!(matches!(
            slice(&mut st, "a", "secret-instance", None),
            Reply::Slice { .. }
        ));
    }
}
