//! `RaftNode`: one master's Raft member. Starts openraft on the sled store, bootstraps a fresh
//! cluster once, forwards writes and read barriers to the leader, and changes membership.

use crate::network::{rpc_router, HttpNetwork};
use crate::store::{open_db, LogStore, StateMachineStore, StoreStats};
use crate::{App, NodeId, Proposal, Raft, Request};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How a master's Raft member is configured.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// The address peers and clients reach this master on (`host:port`).
    pub addr: String,
    pub data_dir: PathBuf,
    pub token: String,
    pub heartbeat_ms: u64,
    /// Minimum election timeout; the maximum is 4/3 of it. A follower that stops hearing the
    /// leader starts an election after max + random [min, max).
    pub election_timeout_ms: u64,
    /// Take a snapshot after this many applied entries.
    pub snapshot_logs: u64,
    /// Keep this many entries in the log behind a snapshot (for slow followers).
    pub keep_logs: u64,
    /// How long a write or read barrier may wait for a leader and a quorum.
    pub request_timeout: Duration,
}

/// Errors from writes, read barriers and membership changes.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no leader was elected within {0:?}; a quorum of masters may be down")]
    NoLeader(Duration),
    #[error(
        "the write was not confirmed within {0:?} (no quorum?); it may still be applied later"
    )]
    Timeout(Duration),
    #[error("membership change failed: {0}")]
    Membership(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// A membership change request, forwarded to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub enum MembershipOp {
    Add { id: NodeId, addr: String },
    Remove { id: NodeId },
}

/// Responses of the internal forwarding routes.
#[derive(Debug, Serialize, Deserialize)]
enum Forwarded<T> {
    Ok(T),
    /// This node is not the leader; retry elsewhere (nothing was proposed).
    NotLeader,
    Err(String),
}

/// One master's Raft member and the application state it drives.
pub struct RaftNode<A: App> {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub app: Arc<RwLock<A>>,
    pub applied: watch::Receiver<u64>,
    pub stats: Arc<StoreStats>,
    client: reqwest::Client,
    token: String,
    request_timeout: Duration,
    db: sled::Db,
    batcher: tokio::sync::mpsc::UnboundedSender<Pending>,
}

/// A proposal waiting for the batcher, and where its result goes.
struct Pending {
    proposal: Proposal,
    tx: tokio::sync::oneshot::Sender<Result<Vec<u8>, LocalWriteError>>,
}

enum LocalWriteError {
    /// Not (or no longer) the leader; nothing of this batch was committed by us.
    NotLeader,
    Fatal(String),
}

/// Group commit at the leader: gathers every proposal that arrived while the previous entry
/// was being committed into one Raft entry.
async fn batcher(raft: Raft, mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
    const MAX_BATCH: usize = 4096;
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => items.push(p),
                Err(_) => break,
            }
        }
        let batch = items.iter().map(|p| p.proposal.clone()).collect();
        match raft.client_write(Request { batch }).await {
            Ok(resp) => {
                for (p, out) in items.into_iter().zip(resp.data.0) {
                    let _ = p.tx.send(Ok(out));
                }
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                for p in items {
                    let _ = p.tx.send(Err(LocalWriteError::NotLeader));
                }
            }
            Err(e) => {
                for p in items {
                    let _ = p.tx.send(Err(LocalWriteError::Fatal(e.to_string())));
                }
            }
        }
    }
}

impl<A: App> RaftNode<A> {
    /// Opens the store in `cfg.data_dir` and starts Raft. Does not bootstrap.
    pub async fn start(cfg: NodeConfig, app: A) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let db = open_db(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", cfg.data_dir.display()))?;
        let stats = Arc::new(StoreStats::default());
        let log = LogStore::open(&db, Some(&cfg.data_dir), stats.clone())?;
        let app = Arc::new(RwLock::new(app));
        let sm = StateMachineStore::open(&db, Some(&cfg.data_dir), app.clone())
            .map_err(anyhow::Error::msg)?;
        let applied = sm.applied_watch();
        let config = Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms,
            // openraft waits lease (= max) + a random timeout in [min, max) before electing,
            // so keep the window narrow: failover takes about max + [min, max).
            election_timeout_max: cfg.election_timeout_ms + cfg.election_timeout_ms / 3,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            max_payload_entries: 1024,
            ..Default::default()
        }
        .validate()?;
        let network = HttpNetwork::new(cfg.token.clone());
        let raft = Raft::new(cfg.id, Arc::new(config), network, log, sm).await?;
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .build()?;
        let (batcher_tx, batcher_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(batcher(raft.clone(), batcher_rx));
        Ok(Arc::new(Self {
            batcher: batcher_tx,
            id: cfg.id,
            addr: cfg.addr,
            raft,
            app,
            applied,
            stats,
            client,
            token: cfg.token,
            request_timeout: cfg.request_timeout,
            db,
        }))
    }

    /// Initializes a brand-new cluster with `peers` if this node's store is empty. Every
    /// initial master may call this with the same peers; openraft makes that safe.
    pub async fn bootstrap(&self, peers: &BTreeMap<NodeId, String>) -> anyhow::Result<bool> {
        if self.raft.is_initialized().await? {
            return Ok(false);
        }
        let members: BTreeMap<NodeId, BasicNode> = peers
            .iter()
            .map(|(id, a)| (*id, BasicNode::new(a)))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The current leader's id and address, as this node knows it.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Flushes sled and shuts Raft down.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
        let _ = self.db.flush_async().await;
    }

    /// Commits `command` through Raft, on this node if it leads, else on the leader.
    /// Retries (with the same request id, so at most once) until `request_timeout`.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        let req = Proposal {
            id: [rand_u64(), rand_u64()],
            data: command,
        };
        let deadline = Instant::now() + self.request_timeout;
        let mut saw_leader = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if saw_leader {
                    NodeError::Timeout(self.request_timeout)
                } else {
                    NodeError::NoLeader(self.request_timeout)
                });
            }
            match self.leader() {
                Some((id, _)) if id == self.id => {
                    saw_leader = true;
                    match tokio::time::timeout(left, self.submit_local(req.clone())).await {
                        Ok(Ok(out)) => return Ok(out),
                        Ok(Err(LocalWriteError::NotLeader)) => {}
                        Ok(Err(LocalWriteError::Fatal(e))) => return Err(NodeError::Fatal(e)),
                        Err(_) => return Err(NodeError::Timeout(self.request_timeout)),
                    }
                }
                Some((_, addr)) => {
                    saw_leader = true;
                    if let Some(Forwarded::Ok(r)) = self
                        .forward::<_, Vec<u8>>(&addr, "propose", &req, left)
                        .await
                    {
                        return Ok(r);
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hands a proposal to this node's batcher (only useful while it leads).
    async fn submit_local(&self, proposal: Proposal) -> Result<Vec<u8>, LocalWriteError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.batcher
            .send(Pending { proposal, tx })
            .map_err(|_| LocalWriteError::Fatal("batcher stopped".into()))?;
        rx.await
            .map_err(|_| LocalWriteError::Fatal("batcher dropped the proposal".into()))?
    }

    /// Waits until this node's state reflects every write committed before the call
    /// (ReadIndex: the leader confirms its leadership with a quorum).
    pub async fn read_barrier(&self) -> Result<u64, NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NodeError::Timeout(self.request_timeout));
            }
            let index = match self.leader() {
                Some((id, _)) if id == self.id => {
                    match tokio::time::timeout(left, self.raft.get_read_log_id()).await {
                        Ok(Ok((read, _))) => Some(read.map(|l| l.index).unwrap_or(0)),
                        Ok(Err(_)) => None,
                        Err(_) => return Err(NodeError::Timeout(self.request_timeout)),
                    }
                }
                Some((_, addr)) => {
                    match self.forward::<_, u64>(&addr, "read_index", &(), left).await {
                        Some(Forwarded::Ok(i)) => Some(i),
                        _ => None,
                    }
                }
                None => None,
            };
            if let Some(index) = index {
                let mut rx = self.applied.clone();
                let waited = tokio::time::timeout(left, rx.wait_for(|a| *a >= index)).await;
                return match waited {
                    Ok(Ok(_)) => Ok(index),
                    _ => Err(NodeError::Timeout(self.request_timeout)),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Adds a master (as a learner, then a voter through joint consensus) or removes one.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.request_timeout * 6;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NodeError::Timeout(self.request_timeout * 6));
            }
            match self.leader() {
                Some((id, _)) if id == self.id => return self.change_membership_local(&op).await,
                Some((_, addr)) => {
                    match self.forward::<_, ()>(&addr, "membership", &op, left).await {
                        Some(Forwarded::Ok(())) => return Ok(()),
                        Some(Forwarded::Err(e)) => return Err(NodeError::Membership(e)),
                        _ => {}
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn change_membership_local(&self, op: &MembershipOp) -> Result<(), NodeError> {
        let err = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| {
            NodeError::Membership(e.to_string())
        };
        match op {
            MembershipOp::Add { id, addr } => {
                self.raft
                    .add_learner(*id, BasicNode::new(addr), true)
                    .await
                    .map_err(err)?;
                let ids: BTreeSet<NodeId> = [*id].into();
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(ids), false)
                    .await
                    .map_err(err)?;
            }
            MembershipOp::Remove { id } => {
                let ids: BTreeSet<NodeId> = [*id].into();
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(ids), false)
                    .await
                    .map_err(err)?;
            }
        }
        Ok(())
    }

    /// Sends an internal request to the leader. `None` means "not delivered or not answered".
    async fn forward<Req: Serialize, Resp: for<'a> Deserialize<'a>>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Option<Forwarded<Resp>> {
        let body = bincode::serialize(req).ok()?;
        let resp = self
            .client
            .post(format!("http://{addr}/raft/{path}"))
            .bearer_auth(&self.token)
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

    /// Peer RPCs plus the internal forwarding routes (`propose`, `read_index`, `membership`).
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/raft/propose", post(propose::<A>))
            .route("/raft/read_index", post(read_index::<A>))
            .route("/raft/membership", post(membership::<A>))
            .with_state(self.clone())
            .merge(rpc_router(self.raft.clone()))
    }
}

fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn reply<T: Serialize>(v: Forwarded<T>) -> axum::response::Response {
    match bincode::serialize(&v) {
        Ok(b) => b.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn propose<A: App>(
    State(node): State<Arc<RaftNode<A>>>,
    body: Bytes,
) -> axum::response::Response {
    let Ok(req) = bincode::deserialize::<Proposal>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad propose body").into_response();
    };
    match node.submit_local(req).await {
        Ok(r) => reply(Forwarded::Ok(r)),
        Err(LocalWriteError::NotLeader) => reply(Forwarded::<Vec<u8>>::NotLeader),
        Err(LocalWriteError::Fatal(e)) => reply(Forwarded::<Vec<u8>>::Err(e)),
    }
}

async fn read_index<A: App>(State(node): State<Arc<RaftNode<A>>>) -> axum::response::Response {
    match node.raft.get_read_log_id().await {
        Ok((read, _)) => reply(Forwarded::Ok(read.map(|l| l.index).unwrap_or(0))),
        Err(_) => reply(Forwarded::<u64>::NotLeader),
    }
}

async fn membership<A: App>(
    State(node): State<Arc<RaftNode<A>>>,
    body: Bytes,
) -> axum::response::Response {
    let Ok(op) = bincode::deserialize::<MembershipOp>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad membership body").into_response();
    };
    if !node.is_leader() {
        return reply(Forwarded::<()>::NotLeader);
    }
    match node.change_membership_local(&op).await {
        Ok(()) => reply(Forwarded::Ok(())),
        Err(e) => reply(Forwarded::<()>::Err(e.to_string())),
    }
}
