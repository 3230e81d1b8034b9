//! `RaftNode`: one master's Raft member. Starts openraft on the sled store, on a Tokio runtime
//! and a listener of its own (the peer port), bootstraps a fresh cluster once, forwards writes
//! and read barriers to the leader, and changes membership.

use crate::backoff::Backoff;
use crate::election::{campaign_loop, Contact};
use crate::network::{rpc_router, HttpNetwork, NetStats, Peer};
use crate::store::{open_db, LogStore, StateMachineStore, StoreStats};
use crate::{App, MasterNode, NodeId, Proposal, Raft, Request};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How a master's Raft member is configured.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where clients reach this master's API and peers its Raft RPCs (advertised addresses;
    /// an empty `peer` means the bound peer address).
    pub node: MasterNode,
    /// The address the peer listener binds.
    pub peer_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The masters' own credential for Raft RPCs and forwarding (never a user's token).
    pub peer_token: String,
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
    Add { id: NodeId, node: MasterNode },
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
    pub node: MasterNode,
    /// The bound peer address (differs from the configured one when port 0 was asked).
    pub peer_addr: SocketAddr,
    pub raft: Raft,
    pub app: Arc<RwLock<A>>,
    pub applied: watch::Receiver<u64>,
    pub stats: Arc<StoreStats>,
    pub net: Arc<NetStats>,
    pub contact: Arc<Contact>,
    /// openraft's leader lease; a leader that has not heard a quorum for this long no longer
    /// calls itself leader (check-quorum).
    pub lease: Duration,
    client: reqwest::Client,
    token: String,
    request_timeout: Duration,
    db: sled::Db,
    batcher: tokio::sync::mpsc::UnboundedSender<Pending>,
    rt: RaftRuntime,
    peer_stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// The Tokio runtime Raft runs on: its own threads (at a higher scheduling priority where the
/// host allows), apart from the API's, so client and agent load never delays a heartbeat or a
/// vote. Shut down in the background on drop (a runtime may not block inside another).
struct RaftRuntime(Mutex<Option<tokio::runtime::Runtime>>);

impl RaftRuntime {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .thread_name("raft")
            .on_thread_start(raise_priority)
            .enable_all()
            .build()?;
        Ok(Self(Mutex::new(Some(rt))))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .lock()
            .expect("raft runtime")
            .as_ref()
            .expect("raft runtime running")
            .handle()
            .clone()
    }

    fn stop(&self) {
        if let Some(rt) = self.0.lock().expect("raft runtime").take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Gives the calling thread a nice value of -5 when allowed (root or CAP_SYS_NICE), so the
/// kernel runs Raft before API workers on a saturated host. Without the privilege it stays at
/// the default; the separate threads still keep Raft off the API's queues.
fn raise_priority() {
    let tid = rustix::thread::gettid();
    let _ = rustix::process::setpriority_process(Some(tid), -5);
}

/// What starting on the Raft runtime hands back to `RaftNode::start`.
struct Started<A> {
    raft: Raft,
    app: Arc<RwLock<A>>,
    applied: watch::Receiver<u64>,
    stats: Arc<StoreStats>,
    db: sled::Db,
    batcher: tokio::sync::mpsc::UnboundedSender<Pending>,
    net: Arc<NetStats>,
    contact: Arc<Contact>,
    peer_addr: SocketAddr,
    peer_stop: tokio::sync::oneshot::Sender<()>,
    lease: Duration,
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
    // Bounded in bytes too, so one entry fits an append RPC (`network::MAX_APPEND_BYTES`).
    const MAX_BATCH_BYTES: usize = 256 * 1024;
    while let Some(first) = rx.recv().await {
        let mut bytes = first.proposal.data.len();
        let mut items = vec![first];
        while items.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.proposal.data.len();
                    items.push(p);
                }
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
    /// The masters' own credential for Raft RPCs (handed to a master that joins with a
    /// master join token, over a connection it verified by the CA's hash).
    pub fn peer_token(&self) -> &str {
        &self.token
    }

    /// Opens the store in `cfg.data_dir` and starts Raft and its peer listener on a runtime
    /// of their own. Does not bootstrap.
    pub async fn start(cfg: NodeConfig, app: A) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let rt = RaftRuntime::new()?;
        let handle = rt.handle();
        let c = cfg.clone();
        let started = handle
            .spawn(async move { Self::start_on_raft_runtime(c, app).await })
            .await??;
        let Started {
            raft,
            app,
            applied,
            stats,
            db,
            batcher,
            net,
            contact,
            peer_addr,
            peer_stop,
            lease,
        } = started;
        let mut node = cfg.node;
        if node.peer.is_empty() {
            node.peer = peer_addr.to_string();
        }
        let client = crate::tls::client_builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .build()?;
        Ok(Arc::new(Self {
            batcher,
            id: cfg.id,
            node,
            peer_addr,
            raft,
            app,
            applied,
            stats,
            net,
            contact,
            lease,
            client,
            token: cfg.peer_token,
            request_timeout: cfg.request_timeout,
            db,
            rt,
            peer_stop: Mutex::new(Some(peer_stop)),
        }))
    }

    async fn start_on_raft_runtime(cfg: NodeConfig, app: A) -> anyhow::Result<Started<A>> {
        let listener = tokio::net::TcpListener::bind(cfg.peer_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {} (peer port): {e}", cfg.peer_listen)
            })?;
        let peer_addr = listener.local_addr()?;
        let db = open_db(&cfg.data_dir)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", cfg.data_dir.display()))?;
        let stats = Arc::new(StoreStats::default());
        let log = LogStore::open(&db, Some(&cfg.data_dir), stats.clone())?;
        let app = Arc::new(RwLock::new(app));
        let sm = StateMachineStore::open(&db, Some(&cfg.data_dir), app.clone())
            .map_err(anyhow::Error::msg)?;
        let applied = sm.applied_watch();
        let max = cfg.election_timeout_ms + cfg.election_timeout_ms / 3;
        let config = Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms,
            election_timeout_max: max,
            // Elections are started by `election::campaign_loop` after a won pre-vote.
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            max_payload_entries: 256,
            ..Default::default()
        }
        .validate()?;
        let network = HttpNetwork::new(cfg.peer_token.clone());
        let net = network.stats.clone();
        let raft = Raft::new(cfg.id, Arc::new(config), network.clone(), log, sm).await?;
        let contact = Arc::new(Contact::default());
        let lease = Duration::from_millis(max);
        tokio::spawn(campaign_loop(
            raft.clone(),
            contact.clone(),
            network,
            Duration::from_millis(cfg.election_timeout_ms),
            lease,
        ));
        let (batcher_tx, batcher_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(batcher(raft.clone(), batcher_rx));
        let (peer_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let peer = Peer {
            raft: raft.clone(),
            contact: contact.clone(),
            lease,
        };
        let token = cfg.peer_token.clone();
        let routes = rpc_router(peer)
            .merge(
                Router::new()
                    .route("/raft/propose", post(propose))
                    .route("/raft/read_index", post(read_index))
                    .route("/raft/membership", post(membership))
                    .with_state(Forwarding {
                        raft: raft.clone(),
                        batcher: batcher_tx.clone(),
                    }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    let ok = bearer_ok(req.headers(), &token);
                    async move {
                        if ok {
                            next.run(req).await
                        } else {
                            (StatusCode::UNAUTHORIZED, "peer credential required").into_response()
                        }
                    }
                },
            ));
        tokio::spawn(async move {
            // Masters only: a peer without a master certificate of this cluster's CA is
            // refused in the handshake, before any request is read.
            let r = crate::tls::serve(
                listener,
                routes,
                crate::tls::Clients::Required(&["master"]),
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await;
            if let Err(e) = r {
                tracing::error!("raft peer server: {e}");
            }
        });
        Ok(Started {
            raft,
            app,
            applied,
            stats,
            db,
            batcher: batcher_tx,
            net,
            contact,
            peer_addr,
            peer_stop,
            lease,
        })
    }

    /// Initializes a brand-new cluster with `peers` if this node's store is empty. Every
    /// initial master may call this with the same peers; openraft makes that safe.
    pub async fn bootstrap(&self, peers: &BTreeMap<NodeId, MasterNode>) -> anyhow::Result<bool> {
        if self.raft.is_initialized().await? {
            return Ok(false);
        }
        let members: BTreeMap<NodeId, MasterNode> =
            peers.iter().map(|(id, n)| (*id, n.clone())).collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The current leader's id and addresses, as this node knows it. A leader that has not
    /// heard from a quorum for the lease does not name itself (check-quorum: clients and
    /// agents go elsewhere instead of waiting on a leader that cannot commit).
    pub fn leader(&self) -> Option<(NodeId, MasterNode)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        if id == self.id && !self.has_quorum_lease(&m) {
            return None;
        }
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    fn has_quorum_lease(&self, m: &openraft::RaftMetrics<NodeId, MasterNode>) -> bool {
        let voters = m.membership_config.membership().voter_ids().count();
        voters <= 1
            || m.millis_since_quorum_ack
                .is_some_and(|ms| Duration::from_millis(ms) <= self.lease)
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.leader(), Some((id, _)) if id == self.id)
    }

    /// Stops serving peers, shuts Raft down and flushes sled, each bounded in time so a
    /// stop under any load ends within a few seconds (everything acknowledged is already
    /// fsynced: an append is durable before openraft is told so).
    pub async fn shutdown(&self) {
        if let Some(s) = self.peer_stop.lock().expect("peer stop").take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.raft.shutdown()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.db.flush_async()).await;
        self.rt.stop();
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
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
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
                Some((_, node)) => {
                    saw_leader = true;
                    if let Some(Forwarded::Ok(r)) = self
                        .forward::<_, Vec<u8>>(&node.peer, "propose", &req, left)
                        .await
                    {
                        return Ok(r);
                    }
                }
                None => {}
            }
            tokio::time::sleep(backoff.next(None).min(left)).await;
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
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
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
                Some((_, node)) => {
                    match self
                        .forward::<_, u64>(&node.peer, "read_index", &(), left)
                        .await
                    {
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
            tokio::time::sleep(backoff.next(None).min(left)).await;
        }
    }

    /// Adds a master (as a learner, then a voter through joint consensus) or removes one.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.request_timeout * 6;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NodeError::Timeout(self.request_timeout * 6));
            }
            match self.leader() {
                Some((id, _)) if id == self.id => return self.change_membership_local(&op).await,
                Some((_, node)) => {
                    match self
                        .forward::<_, ()>(&node.peer, "membership", &op, left)
                        .await
                    {
                        Some(Forwarded::Ok(())) => return Ok(()),
                        Some(Forwarded::Err(e)) => return Err(NodeError::Membership(e)),
                        _ => {}
                    }
                }
                None => {}
            }
            tokio::time::sleep(backoff.next(None).min(left)).await;
        }
    }

    async fn change_membership_local(&self, op: &MembershipOp) -> Result<(), NodeError> {
        change_membership_on(&self.raft, op).await
    }

    /// Sends an internal request to the leader. `None` means "not delivered or not answered".
    async fn forward<Req: Serialize, Resp: for<'a> Deserialize<'a>>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Option<Forwarded<Resp>> {
        crate::network::post_bincode(&self.client, &self.token, addr, path, req, timeout).await
    }
}

/// Adds a master (as a learner, then a voter through joint consensus) or removes one, on the
/// leader.
async fn change_membership_on(raft: &Raft, op: &MembershipOp) -> Result<(), NodeError> {
    let err = |e: RaftError<NodeId, ClientWriteError<NodeId, MasterNode>>| {
        NodeError::Membership(e.to_string())
    };
    match op {
        MembershipOp::Add { id, node } => {
            raft.add_learner(*id, node.clone(), true)
                .await
                .map_err(err)?;
            let ids: BTreeSet<NodeId> = [*id].into();
            raft.change_membership(ChangeMembers::AddVoterIds(ids), false)
                .await
                .map_err(err)?;
        }
        MembershipOp::Remove { id } => {
            let ids: BTreeSet<NodeId> = [*id].into();
            raft.change_membership(ChangeMembers::RemoveVoters(ids), false)
                .await
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Checks `Authorization: Bearer <peer token>` in constant time.
fn bearer_ok(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    use subtle::ConstantTimeEq;
    !given.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

/// State of the forwarding routes (they run on the Raft runtime).
#[derive(Clone)]
struct Forwarding {
    raft: Raft,
    batcher: tokio::sync::mpsc::UnboundedSender<Pending>,
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

async fn propose(State(f): State<Forwarding>, body: Bytes) -> axum::response::Response {
    let Ok(proposal) = bincode::deserialize::<Proposal>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad propose body").into_response();
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if f.batcher.send(Pending { proposal, tx }).is_err() {
        return reply(Forwarded::<Vec<u8>>::Err("batcher stopped".into()));
    }
    let r = rx.await.unwrap_or_else(|_| {
        Err(LocalWriteError::Fatal(
            "batcher dropped the proposal".into(),
        ))
    });
    match r {
        Ok(r) => reply(Forwarded::Ok(r)),
        Err(LocalWriteError::NotLeader) => reply(Forwarded::<Vec<u8>>::NotLeader),
        Err(LocalWriteError::Fatal(e)) => reply(Forwarded::<Vec<u8>>::Err(e)),
    }
}

async fn read_index(State(f): State<Forwarding>) -> axum::response::Response {
    match f.raft.get_read_log_id().await {
        Ok((read, _)) => reply(Forwarded::Ok(read.map(|l| l.index).unwrap_or(0))),
        Err(_) => reply(Forwarded::<u64>::NotLeader),
    }
}

async fn membership(State(f): State<Forwarding>, body: Bytes) -> axum::response::Response {
    let Ok(op) = bincode::deserialize::<MembershipOp>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad membership body").into_response();
    };
    let m = f.raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return reply(Forwarded::<()>::NotLeader);
    }
    match change_membership_on(&f.raft, &op).await {
        Ok(()) => reply(Forwarded::Ok(())),
        Err(e) => reply(Forwarded::<()>::Err(e.to_string())),
    }
}
