//! Wire types of the cluster API: nodes, the control-plane group, and the
//! agent ↔ control-plane protocol (registration and heartbeats).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::SandboxStatus;

/// Resource amounts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// A node agent as the control plane knows it (`GET /v1/nodes`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub id: String,
    /// Base URL of the agent's node-local API.
    pub address: String,
    /// `ready` or `not_ready` (missed heartbeats).
    pub status: String,
    pub cordoned: bool,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub capacity: Capacity,
    /// Reserved by the sandboxes placed on it.
    pub allocated: Capacity,
    pub labels: BTreeMap<String, String>,
    /// Live sandboxes placed on it.
    pub sandboxes: u32,
    /// Milliseconds since the Unix epoch.
    pub last_heartbeat_ms: u64,
}

/// `POST /v1/agents/register`: an agent announces itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    pub id: String,
    /// Random identity kept in the agent's data dir; a different agent
    /// claiming the same id is refused.
    pub instance: String,
    pub address: String,
    pub capacity: Capacity,
    pub accel: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A sandbox as an agent reports it in a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ObservedSandbox {
    /// The agent's id for it.
    pub agent_id: String,
    pub status: SandboxStatus,
    #[serde(default)]
    pub error: Option<String>,
    /// The control-plane record it runs for (`ID@GENERATION`), when the
    /// control plane started it.
    #[serde(default)]
    pub owner: Option<String>,
    /// Its VM is paused by a live migration (the source after the
    /// switch-over, until it resumes or is released): the guest does not
    /// run in it, and may run on the target.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// An outgoing live migration of it is in progress (pre-copy up to the
    /// commit): it runs here but may still switch over to the target.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migrating: bool,
}

/// `POST /v1/agents/{node}/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub instance: String,
    #[serde(default)]
    pub sandboxes: Vec<ObservedSandbox>,
}

/// What the control plane wants of a node, returned to its heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Desired {
    /// Agent ids of the sandboxes the control plane still wants on this node;
    /// an agent re-adopts these after a restart.
    pub keep: Vec<String>,
    /// Running copies the control plane no longer assigns to this node (moved
    /// elsewhere, deleted, superseded or given up): stop them.
    #[serde(default)]
    pub stop: Vec<Fenced>,
    /// Ended copies the control plane no longer assigns to this node: remove them.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A sandbox an agent must stop, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Fenced {
    pub agent_id: String,
    pub reason: String,
}

/// One control-plane member in `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub id: u64,
    pub address: String,
    /// True when it answered its status request.
    pub healthy: bool,
    /// `leader`, `follower`, `candidate`, `learner`, or `unreachable`.
    pub state: String,
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// Why it is unhealthy.
    pub error: Option<String>,
}

/// `GET /v1/cluster`: the control-plane group.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// The member that answered.
    pub member: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// Highest log index known committed (applied) by the answering member.
    pub commit_index: Option<u64>,
    pub members: Vec<Member>,
}

/// `POST /v1/cluster/members`: add a control-plane member (it must be running
/// with no peers, so it joins instead of bootstrapping).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub id: u64,
    /// `host:port` of its control API.
    pub address: String,
}

/// `POST /v1/agents/{node}/slice`: an agent joins the cluster network and
/// learns its slice of the cluster CIDR (the same one on every restart).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinNetwork {
    pub instance: String,
    /// A specific slice (`a.b.c.d/n`); default: the next free /24 of the cluster range.
    #[serde(default)]
    pub want: Option<String>,
}

/// A node's address slice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeSlice {
    pub node: String,
    pub cidr: String,
    /// Addresses leased from it.
    pub leased: u32,
}

/// `POST /v1/agents/{node}/leases`: lease an address for one of the node's sandboxes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub instance: String,
    /// The agent's id of the sandbox.
    pub sandbox: String,
    /// The address the node already uses for it (an agent re-claiming its
    /// leases at start); refused when another sandbox holds it.
    #[serde(default)]
    pub want: Option<String>,
}

/// `POST /v1/agents/{node}/leases/retain`: free every lease of the node but these.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetainLeases {
    pub instance: String,
    pub keep: Vec<String>,
}

/// Leases freed by a release or retain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Released {
    pub released: Vec<String>,
}

/// One sandbox address as recorded in the control-plane state (`GET /v1/leases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub ip: String,
    pub node: String,
    /// The node's slice it comes from.
    pub cidr: String,
    /// The agent's id of the sandbox.
    pub agent_sandbox: String,
    /// The control plane's id of the sandbox, when it was created through it.
    #[serde(default)]
    pub sandbox: Option<String>,
}
