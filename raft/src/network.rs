//! The Raft transport: openraft RPCs as bincode bodies over HTTP (`POST /raft/...`), sent with
//! reqwest and served by axum on the master's API port, guarded by the cluster token.

use crate::{NodeId, Raft, TypeConfig};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Creates one HTTP connection handle per peer.
#[derive(Clone)]
pub struct HttpNetwork {
    client: reqwest::Client,
    token: String,
}

impl HttpNetwork {
    pub fn new(token: String) -> Self {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(8)
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_millis(500))
            .build()
            .expect("reqwest client");
        Self { client, token }
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = HttpConn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        HttpConn {
            target,
            node: node.clone(),
            client: self.client.clone(),
            token: self.token.clone(),
        }
    }
}

/// A handle for RPCs to one peer.
pub struct HttpConn {
    target: NodeId,
    node: BasicNode,
    client: reqwest::Client,
    token: String,
}

impl HttpConn {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let url = format!("http://{}/raft/{}", self.node.addr, path);
        let resp = self
            .client
            .post(url)
            .bearer_auth(&self.token)
            .timeout(option.hard_ttl())
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        if !resp.status().is_success() {
            let err = std::io::Error::other(format!("peer answered HTTP {}", resp.status()));
            return Err(RPCError::Network(NetworkError::new(&err)));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let res: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for HttpConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, (StatusCode, String)> {
    bincode::deserialize(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad raft rpc body: {e}")))
}

fn encode<T: Serialize>(v: &T) -> axum::response::Response {
    match bincode::serialize(v) {
        Ok(b) => b.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn append(State(raft): State<Raft>, body: Bytes) -> axum::response::Response {
    match decode::<AppendEntriesRequest<TypeConfig>>(&body) {
        Ok(req) => encode(&raft.append_entries(req).await),
        Err(e) => e.into_response(),
    }
}

async fn vote(State(raft): State<Raft>, body: Bytes) -> axum::response::Response {
    match decode::<VoteRequest<NodeId>>(&body) {
        Ok(req) => encode(&raft.vote(req).await),
        Err(e) => e.into_response(),
    }
}

async fn snapshot(State(raft): State<Raft>, body: Bytes) -> axum::response::Response {
    match decode::<InstallSnapshotRequest<TypeConfig>>(&body) {
        Ok(req) => encode(&raft.install_snapshot(req).await),
        Err(e) => e.into_response(),
    }
}

/// The peer-to-peer RPC routes. The caller adds authentication and a body limit.
pub fn rpc_router(raft: Raft) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .with_state(raft)
}
