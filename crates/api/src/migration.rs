//! Live migration: the public request and status (`/v1/sandboxes/{id}/migrate`,
//! `/v1/sandboxes/{id}/migration`) and the agent-to-agent messages of the
//! target side (`/v1/migrations/incoming...`), which carry the target's token.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Sandbox;

/// `POST /v1/sandboxes/{id}/migration/cancel` (a node's API): cancel the
/// sandbox's outgoing migration `attempt` if it has not committed. The answer
/// is the migration's status once it ended: `aborted` (it did not commit and
/// runs here; also for an attempt that never started here, which now never
/// will), `completed` (the target runs it), anything else: not known yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelMigration {
    /// The control plane's id of the migration attempt to cancel.
    pub attempt: String,
}

/// `POST /v1/sandboxes/{id}/migrate`: move a running sandbox to another node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateSandbox {
    /// Base URL of the target node's API, e.g. `http://10.88.0.2:7070`.
    pub target: String,
    /// The target's API token (sent only to the target). A control plane
    /// sends the cluster's migration credential instead.
    #[serde(default)]
    pub target_token: String,
    /// The owner tag the target's copy carries (set by a control plane that
    /// drives the migration, so its reconcile recognises the copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_owner: Option<String>,
    /// Largest switch-over pause in milliseconds (default 100).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap of the migration stream in MiB/s (default: uncapped, 1024).
    #[serde(default)]
    pub max_bandwidth_mib: Option<u64>,
    /// Give up after this many dirty-memory passes (default 60).
    #[serde(default)]
    pub max_iterations: Option<u64>,
    /// Give up after this many seconds of pre-copy (default 120).
    #[serde(default)]
    pub give_up_after_secs: Option<u64>,
    /// The id of this migration attempt (set by a control plane that drives
    /// it); the source echoes it in its status, so a status of an earlier
    /// attempt is told apart from this one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    /// The policy the target enforces (set by a control plane: the policy in
    /// the sandbox's record, which a `policy set` the source had not applied
    /// yet may have changed). Absent: the source's current policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::network::NetworkPolicy>,
    /// The record's version of `policy` (its count of policy sets), kept by
    /// the target's copy so a set that reaches it late is refused there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
}

/// Where a migration stands. Phases: `preparing`, `precopy`, `switchover`,
/// `committing`, `completed` (runs on the target), `aborted` (runs here),
/// `unresolved` (target unreachable after the switch-over; source paused).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct MigrationStatus {
    pub sandbox: String,
    /// The target: its API URL, or its node id when a control plane drives it.
    pub target: String,
    /// The source node, when a control plane drives the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub phase: String,
    /// The attempt id the migrate request carried (control-plane driven
    /// migrations), so a status of an earlier attempt is not taken for this one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    /// Milliseconds since the request.
    pub elapsed_ms: u64,
    /// Memory + disk bytes sent through the tunnel.
    pub bytes_sent: u64,
    pub ram_total: u64,
    pub ram_remaining: u64,
    /// Guest pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Dirty-memory passes.
    pub iterations: u64,
    pub throughput_bps: u64,
    pub cpu_throttle_percent: u64,
    /// The VM's switch-over pause as the VMM measured it.
    pub downtime_ms: Option<u64>,
    /// From the source pausing to the target confirming it runs the guest.
    pub handover_ms: Option<u64>,
    /// The guest's pause: the source VM stopped (QEMU's `STOP`) to the target
    /// VM resumed (its `RESUME`), each by its host's clock. Exact on one host;
    /// across hosts it includes their clock offset, and `pause_steps`'
    /// `commit_answered_ms` (the source's own clock) bounds it from above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
    /// Where the pause went, step by step (source side, ms after the stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_steps: Option<PauseSteps>,
    pub disk_transferred: u64,
    pub error: Option<String>,
}

/// Response header of the target's commit: when it resumed the VM (QEMU's
/// `RESUME`), microseconds since the Unix epoch by the target's clock.
pub const VM_RESUMED_HEADER: &str = "x-hearth-vm-resumed-us";

/// Response header of the target's 409 to an output log upload that does not
/// continue its log where it ends: the length of the log it has (always a
/// prefix of the source's), so the source continues from there instead of
/// sending the whole log again.
pub const LOG_LEN_HEADER: &str = "x-hearth-log-len";

/// A migration's pause, step by step: milliseconds from the source VM's stop
/// (QEMU's `STOP` event) to the end of each step, by the source's clock
/// (`target_resumed_ms` by the target's). A step not reached is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PauseSteps {
    /// The source saw its VM's stop for the switch-over (QEMU's `STOP`; its
    /// last pass runs from there, there is no gate to wait at). The name is
    /// kept from when the source waited at QEMU's switch-over gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_ms: Option<u64>,
    /// The guest channel's writer frozen (nothing more is written to the
    /// stopped guest); whether QEMU took everything is checked once it
    /// completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_frozen_ms: Option<u64>,
    /// QEMU reported the migration completed (final pass on the target). The
    /// source's steps at the stop and the log's tail run beside QEMU's last
    /// pass: each may end before or after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_completed_ms: Option<u64>,
    /// The output taken in before the stop flushed to the log; the source
    /// takes no more (the target resumes the guest's output where that log
    /// ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_drained_ms: Option<u64>,
    /// The output log (its tail after the pre-copy) on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_sent_ms: Option<u64>,
    /// The `committing` record saved (fsynced), after QEMU completed and the
    /// tail reached the target (a networked sandbox's lease-moved marker is
    /// written from the gate on, beside the last pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committing_saved_ms: Option<u64>,
    /// The target resumed the VM (its `RESUME`, the target's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_resumed_ms: Option<u64>,
    /// The target's answer to the commit arrived (after its ping of the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_answered_ms: Option<u64>,
}

/// Target side, step 1: `POST /v1/migrations/incoming`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingOffer {
    /// The sandbox as the source knows it; the target keeps id and name.
    pub sandbox: Sandbox,
    /// So a node can refuse a migration to itself.
    pub source_node_id: String,
    /// The source's node name (its cluster node id); a target checks it
    /// against a control plane's scoped migration credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    pub hostname: String,
    pub stdin_open: bool,
    /// The owner tag the target's copy carries after the commit (none: untagged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The sandbox's network, when it has one (its address, MAC and ingress
    /// token are in `sandbox.network`): the target builds the same link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<IncomingNet>,
    /// The source VM's machine as it really runs, which the target's VM must
    /// match for the state to load: a sandbox restored from a template,
    /// snapshot or warm pool has its snapshot's RAM size and device set, not
    /// what a cold boot of its record would get. Absent (an older source):
    /// the target builds the VM a cold boot of the record gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineLayout>,
    /// Stream offset of the output log's first byte (the guest's count of the
    /// main session's output): non-zero for a sandbox started from a snapshot
    /// or forked, whose earlier output is not in its log. The target keeps it,
    /// so a re-adoption there tells the guest the right offsets. Absent: 0 (a
    /// target that does not know it refuses only such sandboxes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub output_base: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A VM's machine layout as a migration target rebuilds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineLayout {
    pub cpus: u32,
    /// Guest RAM in KiB: the sandbox's MiB plus the pad the VM was made (or its
    /// snapshot saved) with (QEMU's TCG RAM pad, docs/migration.md).
    pub ram_kib: u64,
    /// The VM's network device, if it has one. A sandbox without a network
    /// restored from a template made on a node with networking has one, on
    /// QEMU's hub with nothing behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<MachineNic>,
    /// Virtual size of the disk in bytes: the target's disk is an empty
    /// standalone one of this size that the whole-disk block migration fills
    /// (it needs no template or snapshot files, only the image).
    pub disk_bytes: u64,
}

/// A VM's network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineNic {
    /// The device's MAC as QEMU was given it (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// `tap`: the tap is its direct backend; `hub`: it sits on QEMU's hub 0.
    pub mode: crate::network::NicMode,
}

/// What the target needs to give a migrating sandbox the same network: the
/// same address, guest MAC and policy, a tap whose MAC is the source tap's
/// (the guest's neighbour entry for its gateway stays valid) and the same
/// network device layout as the source's VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingNet {
    pub policy: crate::network::NetworkPolicy,
    /// The control plane's version of `policy` the copy enforces (0: none);
    /// the target's copy keeps it (a late, older set is refused there).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub policy_version: u64,
    /// MAC of the source's tap (`aa:bb:cc:dd:ee:ff`), what the guest's
    /// neighbour entry for its gateway points at.
    pub tap_mac: String,
    /// How the source VM's network device is connected (`tap`: the tap is
    /// its direct backend; `hub`: it sits on QEMU's hub 0 with the tap joined
    /// to it); the incoming VM's device is built the same way.
    pub nic_mode: crate::network::NicMode,
    /// The node slice that leases the address (its node and agent instance):
    /// the address stays leased there, held by the sandbox id, and whichever
    /// node finally removes the sandbox releases it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<LeaseHolder>,
    /// The source node's address pool (CIDR). Without a lease holder (no
    /// control plane) the target accepts only an address inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pool: Option<String>,
}

/// A node slice of the control plane, as the lease release names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseHolder {
    pub node: String,
    pub instance: String,
}

/// The target's answer: where to send the stream, and the one-time ticket
/// that authenticates it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IncomingAccepted {
    pub port: u16,
    pub ticket: String,
    pub node: String,
    pub node_id: String,
}

/// What the target removed on `DELETE /v1/migrations/incoming/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncomingRemoved {
    /// An incoming VM that was never committed (now or earlier): the
    /// sandbox does not run on the target, the source may resume its VM.
    Uncommitted,
}

/// The target's answer to an abort. Only this 2xx answer says the sandbox
/// does not run there; 409 says it was committed (runs there); 404 says the
/// target knows nothing of it (which does not rule out a commit).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IncomingAborted {
    pub removed: IncomingRemoved,
    /// Set when the incoming VM had ended by itself before the abort (its
    /// QEMU ran out of memory or crashed): what happened, for the source's
    /// error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_ended: Option<String>,
}

/// Target side, step 3 (after the stream and the output log):
/// `POST /v1/migrations/incoming/{id}/commit`. Start the VM and take over.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingCommit {
    /// Guest session of the main workload.
    pub main_session: u32,
    /// Output bytes of the main session the guest still counts as unacknowledged.
    pub unacked_bytes: u64,
    /// First session id free for new sessions.
    pub next_session: u32,
    /// Other sessions still running in the guest (their clients were on the source).
    pub orphan_sessions: Vec<u32>,
    pub guest_agent_version: String,
    pub guest_kernel_release: String,
    pub started_ms: Option<u64>,
    pub boot_ms: Option<u64>,
    /// The source switched over without QEMU's gate and logged the guest's
    /// output only up to its VM's stop: the target takes the guest channel
    /// over with `Resume` from where the log it got ends (the guest replays
    /// the rest). Always true from sources that send it; a target that does
    /// not know the field refuses the commit (unknown fields are refused), so
    /// such a source never hands over to a target that would drop output.
    /// `unacked_bytes` and `orphan_sessions` are then not read: the guest
    /// settles credit at the `Resume` and kills the sessions it does not name.
    #[serde(default)]
    pub output_resumed: bool,
}
