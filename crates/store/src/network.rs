//! Raft RPCs between members over HTTP/JSON.
//!
//! The client side ([`Network`]) posts openraft's requests to a peer's
//! `/raft/*` routes; the server side ([`routes`]) hands them to the local
//! `Raft`. The same routes carry forwarded writes and read-index requests
//! from followers to the leader, and each member's status for
//! `hearth cluster status`.

use std::time::Duration;

use axum::extract::State as AxState;
use axum::routing::{get, post};
use axum::{Json, Router};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Forward, ForwardReply, MemberStatus, Node, NodeId, Store, TypeConfig};

/// Makes one [`Network`] per peer; all share one HTTP client.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) http: reqwest::Client,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Network {
        Network {
            http: self.http.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

pub struct Network {
    http: reqwest::Client,
    target: NodeId,
    addr: String,
}

impl Network {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        opt: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let url = format!("http://{}/raft/{path}", self.addr);
        let resp = self
            .http
            .post(&url)
            .timeout(opt.hard_ttl())
            .json(req)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() || e.is_timeout() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let res: Result<Resp, RaftError<NodeId, E>> = resp
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}

/// The `/raft/*` routes of a member.
pub fn routes(store: Store) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/forward", post(forward))
        .route("/raft/status", get(status))
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(store)
}

async fn append(
    AxState(s): AxState<Store>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Json(s.raft.append_entries(req).await)
}

async fn vote(
    AxState(s): AxState<Store>,
    Json(req): Json<VoteRequest<NodeId>>,
) -> Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Json(s.raft.vote(req).await)
}

async fn snapshot(
    AxState(s): AxState<Store>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Json(s.raft.install_snapshot(req).await)
}

/// A follower's request, served here only if this member leads.
async fn forward(AxState(s): AxState<Store>, Json(req): Json<Forward>) -> Json<ForwardReply> {
    Json(s.serve_forward(req).await)
}

async fn status(AxState(s): AxState<Store>) -> Json<MemberStatus> {
    Json(s.member_status())
}

/// Posts a forwarded request to `addr`.
pub(crate) async fn post_forward(
    http: &reqwest::Client,
    addr: &str,
    req: &Forward,
    timeout: Duration,
) -> Result<ForwardReply, reqwest::Error> {
    http.post(format!("http://{addr}/raft/forward"))
        .timeout(timeout)
        .json(req)
        .send()
        .await?
        .json()
        .await
}

/// Fetches a member's status.
pub(crate) async fn get_status(
    http: &reqwest::Client,
    addr: &str,
    timeout: Duration,
) -> Result<MemberStatus, reqwest::Error> {
    http.get(format!("http://{addr}/raft/status"))
        .timeout(timeout)
        .send()
        .await?
        .json()
        .await
}
