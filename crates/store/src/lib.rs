//! Hearth's control-plane state, replicated with Raft (openraft 0.9) and kept
//! on disk in one redb file per member.
//!
//! The openraft shape, one file each: [`state`] (the domain and its pure
//! apply), [`state_machine`] (apply + snapshots on redb), [`log_store`] (the
//! Raft log on redb), [`network`] (RPCs over HTTP). [`Store`] is the handle the
//! control plane uses: writes go through Raft (a follower forwards them to the
//! leader), reads are linearizable (the leader confirms its leadership with a
//! quorum; a follower asks the leader for a read index and waits to apply it).

// why: openraft's StorageError (the storage traits' error type) and redb's
// errors are large; they travel on cold paths only.
#![allow(clippy::result_large_err)]

pub mod leases;
pub mod log_store;
pub mod network;
mod reconcile;
pub mod state;
pub mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

pub use crate::leases::{Cidr, NodeSlice};
pub use crate::state::{
    owner_cluster, parse_owner, Command, CopyReport, Expect, Fence, ImageRecord, Migration,
    NodeRecord, Observed, Reply, RestartPolicy, SandboxRecord, State, TargetAnswer, Tombstone,
    MIGRATION_ENDED, MIGRATION_STALL_MS, MIGRATION_SWITCHED, TOMBSTONES_MAX,
};
use crate::state_machine::SharedState;

pub type NodeId = u64;
pub type Node = BasicNode;

openraft::declare_raft_types!(
    /// Raft types of the control plane.
    pub TypeConfig:
        D = Command,
        R = Reply,
);

pub type Entry = openraft::Entry<TypeConfig>;

/// Name of the database file in a member's data dir.
pub const DB_FILE: &str = "control.redb";

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "refusing to start: {path} is not a readable redb database ({source}). \
         It was left untouched: move it aside to rejoin this member from a peer's \
         snapshot, or restore it from a backup"
    )]
    Corrupt { path: PathBuf, source: redb::Error },
    #[error("opening {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control-plane storage failed: {0}")]
    Storage(String),
    #[error("starting Raft: {0}")]
    Raft(String),
    #[error("no control-plane leader within {0:?}; is a quorum of members up?")]
    NoLeader(Duration),
    #[error("membership change failed: {0}")]
    Membership(String),
}

/// How to start a member.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub id: NodeId,
    /// Where the member's `control.redb` lives.
    pub dir: PathBuf,
    /// Initial members (including this one): id → `host:port` of their
    /// control API. The member with the lowest id bootstraps the group when
    /// its log is empty.
    pub peers: BTreeMap<NodeId, String>,
    /// Take a snapshot (and compact the log) every this many entries.
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Bearer token presented to peers (the cluster's API token), if any.
    pub token: Option<String>,
}

impl StoreConfig {
    pub fn new(id: NodeId, dir: PathBuf, peers: BTreeMap<NodeId, String>) -> StoreConfig {
        StoreConfig {
            id,
            dir,
            peers,
            snapshot_every: 1000,
            heartbeat_ms: 100,
            election_timeout_ms: (400, 800),
            token: None,
        }
    }
}

/// A request a follower sends to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forward {
    Write(Box<Command>),
    ReadIndex,
    AddMember { id: NodeId, addr: String },
    RemoveMember { id: NodeId },
}

/// The leader's answer to a [`Forward`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardReply {
    Written(Box<Reply>),
    ReadIndex(Option<u64>),
    Done,
    NotLeader,
    Failed(String),
}

/// One member's view of the group, as `/raft/status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub state: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    /// Last entry applied to the state machine (every applied entry is committed).
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    /// Every member: id → address.
    pub members: BTreeMap<NodeId, String>,
    /// Milliseconds since a quorum acknowledged this leader (leaders only).
    pub millis_since_quorum_ack: Option<u64>,
}

/// Handle to this member's Raft group and state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub raft: Raft<TypeConfig>,
    id: NodeId,
    state: SharedState,
    http: reqwest::Client,
}

/// Opens `path` as a redb database, or creates it if it does not exist.
/// An existing file that redb cannot read is an error: never replaced.
pub fn open_db(path: &Path) -> Result<redb::Database, StoreError> {
    let exists = match std::fs::metadata(path) {
        Ok(m) => m.len() > 0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(StoreError::Io {
                path: path.into(),
                source: e,
            })
        }
    };
    let res = if exists {
        redb::Database::open(path)
    } else {
        redb::Database::create(path)
    };
    res.map_err(|e| StoreError::Corrupt {
        path: path.into(),
        source: e.into(),
    })
}

impl Store {
    /// Opens (or creates) the member's database and starts its Raft node.
    pub async fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| StoreError::Io {
            path: cfg.dir.clone(),
            source: e,
        })?;
        let path = cfg.dir.join(DB_FILE);
        let db = Arc::new(open_db(&path)?);
        let corrupt = |e: redb::Error| StoreError::Corrupt {
            path: path.clone(),
            source: e,
        };
        let log = log_store::LogStore::new(db.clone()).map_err(corrupt)?;
        let sm = state_machine::StateMachine::load(db.clone())
            .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        let state = sm.shared();
        let config = Config {
            cluster_name: "hearth".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms.0,
            election_timeout_max: cfg.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.snapshot_every / 2,
            install_snapshot_timeout: 2000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::Raft(e.to_string()))?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(v) = cfg
            .token
            .as_ref()
            .and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| StoreError::Raft(e.to_string()))?;
        let net = network::NetworkFactory { http: http.clone() };
        let raft = Raft::new(cfg.id, Arc::new(config), net, log, sm)
            .await
            .map_err(|e| StoreError::Raft(e.to_string()))?;
        let first = cfg.peers.keys().next().copied();
        if first == Some(cfg.id)
            && !raft
                .is_initialized()
                .await
                .map_err(|e| StoreError::Raft(e.to_string()))?
        {
            let members: BTreeMap<NodeId, Node> = cfg
                .peers
                .iter()
                .map(|(id, a)| (*id, BasicNode::new(a)))
                .collect();
            if let Err(e) = raft.initialize(members).await {
                tracing::warn!("Raft group already initialized: {e}");
            }
        }
        Ok(Store {
            raft,
            id: cfg.id,
            state,
            http,
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Reads this member's applied state without checking it is current.
    pub fn read_local<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.read().expect("state lock"))
    }

    /// Waits until `f` holds on this member's applied state (woken by each
    /// apply, no polling); false if it still does not after `timeout`.
    pub async fn wait_local(&self, timeout: Duration, f: impl Fn(&State) -> bool) -> bool {
        let mut rx = self.raft.metrics();
        let until = async {
            while !self.read_local(&f) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, until).await;
        self.read_local(&f)
    }

    /// Reads state that reflects every write acknowledged before the call.
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, StoreError> {
        let index = self.read_index().await?;
        if let Some(i) = index {
            self.raft
                .wait(Some(Duration::from_secs(10)))
                .applied_index_at_least(Some(i), "read index applied")
                .await
                .map_err(|e| StoreError::Raft(e.to_string()))?;
        }
        Ok(self.read_local(f))
    }

    async fn read_index(&self) -> Result<Option<u64>, StoreError> {
        self.with_leader(Forward::ReadIndex, |r| match r {
            ForwardReply::ReadIndex(i) => Some(i),
            _ => None,
        })
        .await
    }

    /// Commits `cmd` through Raft and returns the state machine's reply.
    pub async fn write(&self, cmd: Command) -> Result<Reply, StoreError> {
        self.with_leader(Forward::Write(Box::new(cmd)), |r| match r {
            ForwardReply::Written(r) => Some(*r),
            _ => None,
        })
        .await
    }

    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<(), StoreError> {
        self.with_leader(Forward::AddMember { id, addr }, |r| {
            matches!(r, ForwardReply::Done).then_some(())
        })
        .await
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<(), StoreError> {
        self.with_leader(Forward::RemoveMember { id }, |r| {
            matches!(r, ForwardReply::Done).then_some(())
        })
        .await
    }

    /// Serves `req` here if this member leads, else sends it to the leader;
    /// retries through elections for up to 10 s.
    async fn with_leader<T>(
        &self,
        req: Forward,
        want: impl Fn(ForwardReply) -> Option<T>,
    ) -> Result<T, StoreError> {
        let budget = Duration::from_secs(10);
        let start = Instant::now();
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            let reply = match leader {
                Some(l) if l == self.id => Some(self.serve_forward(req.clone()).await),
                Some(l) => match self.member_addr(l) {
                    Some(addr) => {
                        network::post_forward(&self.http, &addr, &req, Duration::from_secs(5))
                            .await
                            .map_err(|e| tracing::debug!("forward to leader {l} at {addr}: {e}"))
                            .ok()
                    }
                    None => None,
                },
                None => None,
            };
            match reply {
                Some(ForwardReply::Failed(m)) => {
                    return Err(match req {
                        Forward::AddMember { .. } | Forward::RemoveMember { .. } => {
                            StoreError::Membership(m)
                        }
                        _ => StoreError::Storage(m),
                    })
                }
                Some(ForwardReply::NotLeader) | None => {}
                Some(r) => {
                    if let Some(v) = want(r) {
                        return Ok(v);
                    }
                }
            }
            if start.elapsed() > budget {
                return Err(StoreError::NoLeader(budget));
            }
            let _ = self
                .raft
                .wait(Some(Duration::from_millis(100)))
                .metrics(
                    |m| m.current_leader.is_some() && m.current_leader != leader,
                    "new leader",
                )
                .await;
        }
    }

    fn member_addr(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Runs a forwarded request on this member, if it leads.
    pub(crate) async fn serve_forward(&self, req: Forward) -> ForwardReply {
        fn not_leader<E>(e: &RaftError<NodeId, E>) -> bool
        where
            E: std::error::Error,
            E: IsForward,
        {
            matches!(e, RaftError::APIError(api) if api.is_forward())
        }
        match req {
            Forward::Write(cmd) => match self.raft.client_write(*cmd).await {
                Ok(r) => ForwardReply::Written(Box::new(r.data)),
                Err(e) if not_leader(&e) => ForwardReply::NotLeader,
                Err(e) => ForwardReply::Failed(e.to_string()),
            },
            Forward::ReadIndex => match self.raft.ensure_linearizable().await {
                Ok(l) => ForwardReply::ReadIndex(l.map(|l| l.index)),
                Err(e) if not_leader(&e) => ForwardReply::NotLeader,
                Err(e) => ForwardReply::Failed(e.to_string()),
            },
            Forward::AddMember { id, addr } => {
                match self.raft.add_learner(id, BasicNode::new(addr), true).await {
                    Err(e) if not_leader(&e) => return ForwardReply::NotLeader,
                    Err(e) => return ForwardReply::Failed(e.to_string()),
                    Ok(_) => {}
                }
                let ids: BTreeSet<NodeId> = [id].into();
                match self
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(ids), false)
                    .await
                {
                    Ok(_) => ForwardReply::Done,
                    Err(e) if not_leader(&e) => ForwardReply::NotLeader,
                    Err(e) => ForwardReply::Failed(e.to_string()),
                }
            }
            Forward::RemoveMember { id } => {
                let ids: BTreeSet<NodeId> = [id].into();
                match self
                    .raft
                    .change_membership(ChangeMembers::RemoveVoters(ids), false)
                    .await
                {
                    Ok(_) => ForwardReply::Done,
                    Err(e) if not_leader(&e) => ForwardReply::NotLeader,
                    Err(e) => ForwardReply::Failed(e.to_string()),
                }
            }
        }
    }

    /// This member's view of the group.
    pub fn member_status(&self) -> MemberStatus {
        let m = self.raft.metrics().borrow().clone();
        let mc = m.membership_config.membership();
        MemberStatus {
            id: m.id,
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: mc.voter_ids().collect(),
            members: mc.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
        }
    }

    /// Every member's status as it reports it, or why it could not be reached.
    pub async fn cluster_status(&self) -> BTreeMap<NodeId, Result<MemberStatus, String>> {
        let me = self.member_status();
        let mut out = BTreeMap::new();
        for (id, addr) in me.members.clone() {
            if id == self.id {
                out.insert(id, Ok(me.clone()));
                continue;
            }
            let st = network::get_status(&self.http, &addr, Duration::from_secs(1))
                .await
                .map_err(|e| format!("unreachable at {addr}: {e}"));
            out.insert(id, st);
        }
        out
    }

    /// Stops this member's Raft node.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Errors that mean "ask the leader instead".
pub trait IsForward {
    fn is_forward(&self) -> bool;
}

impl IsForward for ClientWriteError<NodeId, Node> {
    fn is_forward(&self) -> bool {
        matches!(self, ClientWriteError::ForwardToLeader(_))
    }
}

impl IsForward for CheckIsLeaderError<NodeId, Node> {
    fn is_forward(&self) -> bool {
        matches!(self, CheckIsLeaderError::ForwardToLeader(_))
    }
}
