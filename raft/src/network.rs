//! The Raft transport: openraft RPCs as bincode bodies over HTTP (`POST /raft/...`), sent with
//! reqwest and served by axum on the master's API port, guarded by the cluster token.

use crate::election::{
    decide_prevote, Contact, PreVoteClient, PreVoteRequest, PreVoteResponse, VoterView,
};
use crate::{MasterNode, NodeId, Raft, TypeConfig};
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
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Largest append payload sent in one RPC. openraft 0.9 drops an append that takes longer than
/// one heartbeat interval, so a payload must cross the wire, be decoded and fsynced well within
/// it even on a loaded host: past this many bytes the transport sends a prefix of the entries
/// and reports `PartialSuccess`, and openraft sends the rest next (at least one entry always
/// goes, however large).
pub const MAX_APPEND_BYTES: usize = 512 * 1024;

/// Counters of the transport, for metrics.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Appends cut to `MAX_APPEND_BYTES` (sent as a prefix).
    pub appends_split: AtomicU64,
    /// Empty appends sent first because the previous append outlived its timeout.
    pub append_probes: AtomicU64,
    /// RPCs that failed (unreachable, timed out, refused).
    pub rpc_errors: AtomicU64,
}

/// Creates one HTTP connection handle per peer.
#[derive(Clone)]
pub struct HttpNetwork {
    client: reqwest::Client,
    token: String,
    pub stats: Arc<NetStats>,
}

impl HttpNetwork {
    pub fn new(token: String) -> Self {
        let client = crate::tls::client_builder()
            .pool_max_idle_per_host(8)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .build()
            .expect("reqwest client");
        Self {
            client,
            token,
            stats: Arc::default(),
        }
    }
}

impl PreVoteClient for HttpNetwork {
    async fn prevote(
        &self,
        peer: String,
        req: PreVoteRequest,
        timeout: Duration,
    ) -> Option<PreVoteResponse> {
        post_bincode(&self.client, &self.token, &peer, "prevote", &req, timeout).await
    }
}

/// POSTs a bincode body to `/raft/{path}` on a peer with the peer token and decodes the
/// bincode answer; `None` when it was not delivered or not answered with 2xx.
pub(crate) async fn post_bincode<Req: Serialize, Resp: DeserializeOwned>(
    client: &reqwest::Client,
    token: &str,
    peer: &str,
    path: &str,
    req: &Req,
    timeout: Duration,
) -> Option<Resp> {
    let body = bincode::serialize(req).ok()?;
    let resp = client
        .post(format!("{}://{peer}/raft/{path}", crate::tls::scheme()))
        .bearer_auth(token)
        .timeout(timeout)
        .body(body)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    bincode::deserialize(&resp.bytes().await.ok()?).ok()
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = HttpConn;

    async fn new_client(&mut self, target: NodeId, node: &MasterNode) -> Self::Network {
        HttpConn {
            target,
            node: node.clone(),
            client: self.client.clone(),
            token: self.token.clone(),
            stats: self.stats.clone(),
            unfinished: false,
        }
    }
}

/// A handle for RPCs to one peer.
pub struct HttpConn {
    target: NodeId,
    node: MasterNode,
    client: reqwest::Client,
    token: String,
    stats: Arc<NetStats>,
    /// An append was under way when openraft dropped it (its timeout is one heartbeat
    /// interval): the next one first probes with no entries.
    unfinished: bool,
}

impl HttpConn {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, MasterNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let r = self.send(path, body, option).await;
        if r.is_err() {
            self.stats.rpc_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn send<Resp, E>(
        &self,
        path: &str,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, MasterNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let url = format!(
            "{}://{}/raft/{}",
            crate::tls::scheme(),
            self.node.peer,
            path
        );
        // openraft bounds each RPC itself (an append by the heartbeat interval, a snapshot
        // chunk by its own timeout); ours only grows with the payload, for the slow cases.
        let ttl = option.hard_ttl() + Duration::from_millis(body.len() as u64 / (4 * 1024));
        let resp = self
            .client
            .post(url)
            .bearer_auth(&self.token)
            .timeout(ttl)
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
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MasterNode, RaftError<NodeId>>>
    {
        // After an append that outlived openraft's timeout, ask first with no entries (a
        // heartbeat): a leader deposed while it was away (e.g. restarted with its old vote)
        // learns the newer vote in milliseconds instead of re-sending entries the peer has
        // no time to decode before each timeout, which also starves the peer's Raft threads;
        // a log mismatch is answered the same way.
        if std::mem::replace(&mut self.unfinished, true) && !rpc.entries.is_empty() {
            let probe: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
                vote: rpc.vote,
                prev_log_id: rpc.prev_log_id,
                leader_commit: rpc.leader_commit,
                entries: Vec::new(),
            };
            self.stats.append_probes.fetch_add(1, Ordering::Relaxed);
            let resp: AppendEntriesResponse<NodeId> = self.call("append", &probe, &option).await?;
            if matches!(
                resp,
                AppendEntriesResponse::HigherVote(_) | AppendEntriesResponse::Conflict
            ) {
                self.unfinished = false;
                return Ok(resp);
            }
        }
        let (rpc, cut) = bound_append(rpc, MAX_APPEND_BYTES);
        if cut.is_some() {
            self.stats.appends_split.fetch_add(1, Ordering::Relaxed);
        }
        let resp: AppendEntriesResponse<NodeId> = self.call("append", &rpc, &option).await?;
        self.unfinished = false;
        Ok(match (resp, cut) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (r, _) => r,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MasterNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MasterNode, RaftError<NodeId>>> {
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

/// Cuts an append to the entries that fit in `max_bytes` (at least one). Returns the request
/// to send and, when it was cut, the log id of the last entry sent.
pub fn bound_append(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    max_bytes: usize,
) -> (
    AppendEntriesRequest<TypeConfig>,
    Option<openraft::LogId<NodeId>>,
) {
    let mut total = 0usize;
    let mut keep = rpc.entries.len();
    for (i, e) in rpc.entries.iter().enumerate() {
        total += bincode::serialized_size(e).unwrap_or(0) as usize;
        if total > max_bytes && i > 0 {
            keep = i;
            break;
        }
    }
    if keep == rpc.entries.len() {
        return (rpc, None);
    }
    rpc.entries.truncate(keep);
    let last = rpc.entries.last().map(|e| e.log_id);
    (rpc, last)
}

/// What the peer routes share: the Raft handle and when a leader was last heard.
#[derive(Clone)]
pub struct Peer {
    pub raft: Raft,
    pub contact: Arc<Contact>,
    /// openraft's leader lease (`election_timeout_max`): no pre-vote is granted within it.
    pub lease: Duration,
}

async fn append(State(p): State<Peer>, body: Bytes) -> axum::response::Response {
    match decode::<AppendEntriesRequest<TypeConfig>>(&body) {
        Ok(req) => {
            let r = p.raft.append_entries(req).await;
            // Any answer but a higher vote means a live leader of our term or newer.
            if matches!(&r, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                p.contact.touch();
            }
            encode(&r)
        }
        Err(e) => e.into_response(),
    }
}

async fn vote(State(p): State<Peer>, body: Bytes) -> axum::response::Response {
    match decode::<VoteRequest<NodeId>>(&body) {
        Ok(req) => {
            let r = p.raft.vote(req).await;
            if matches!(&r, Ok(v) if v.vote_granted) {
                p.contact.touch();
            }
            encode(&r)
        }
        Err(e) => e.into_response(),
    }
}

async fn snapshot(State(p): State<Peer>, body: Bytes) -> axum::response::Response {
    match decode::<InstallSnapshotRequest<TypeConfig>>(&body) {
        Ok(req) => {
            let r = p.raft.install_snapshot(req).await;
            if r.is_ok() {
                p.contact.touch();
            }
            encode(&r)
        }
        Err(e) => e.into_response(),
    }
}

async fn prevote(State(p): State<Peer>, body: Bytes) -> axum::response::Response {
    match decode::<PreVoteRequest>(&body) {
        Ok(req) => {
            let m = p.raft.metrics().borrow().clone();
            let view = VoterView {
                is_leader: m.current_leader == Some(m.id),
                silence: p.contact.silence(),
                last_log_id: p.raft.data_metrics().borrow().last_log,
                term: m.current_term,
            };
            let r = decide_prevote(&view, &req, p.lease);
            tracing::debug!(candidate = req.candidate, granted = r.granted, "pre-vote");
            encode(&r)
        }
        Err(e) => e.into_response(),
    }
}

/// The peer-to-peer RPC routes. The caller adds authentication and a body limit.
pub fn rpc_router(peer: Peer) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/prevote", post(prevote))
        .with_state(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    fn entry(index: u64, bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::Request {
                batch: vec![crate::Proposal {
                    id: [index, 0],
                    data: vec![0; bytes],
                }],
            }),
        }
    }

    fn req(sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: sizes
                .iter()
                .enumerate()
                .map(|(i, b)| entry(i as u64 + 1, *b))
                .collect(),
        }
    }

    #[test]
    fn appends_are_bounded_in_bytes() {
        // (entry sizes, max bytes, entries sent, cut)
        let cases: &[(&[usize], usize, usize, bool)] = &[
            (&[], 1000, 0, false),
            (&[100, 100, 100], 10_000, 3, false),
            (&[400, 400, 400], 1000, 2, true),
            // One entry larger than the bound still goes, alone.
            (&[5000, 10], 1000, 1, true),
            (&[5000], 1000, 1, false),
        ];
        for (sizes, max, sent, cut) in cases {
            let (r, last) = bound_append(req(sizes), *max);
            assert_eq!(r.entries.len(), *sent, "{sizes:?}");
            assert_eq!(last.is_some(), *cut, "{sizes:?}");
            if let Some(l) = last {
                assert_eq!(l.index, *sent as u64);
            }
        }
    }
}
