//! Starting a master: open the Raft member, bootstrap a new cluster once, serve the API,
//! and run the leader's agent-liveness monitor.

use crate::api::{router, Api, Metrics};
use crate::liveness::Liveness;
use crate::model::AgentStatus;
use crate::state::{Command, Machine};
use cairn_raft::node::{NodeConfig, RaftNode};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How a master is started.
#[derive(Clone, Debug)]
pub struct MasterConfig {
    pub node: NodeConfig,
    /// The token users and agents present on the API (never valid on the peer port).
    pub token: String,
    pub listen: SocketAddr,
    /// The initial masters, identical on each; empty with `join`.
    pub peers: BTreeMap<u64, cairn_raft::MasterNode>,
    /// Start without bootstrapping: wait to be added with `cairn cluster add-master`.
    pub join: bool,
    /// An agent silent this long is committed as unreachable.
    pub agent_timeout: Duration,
    /// Tasks of an agent unreachable this long are `lost` and run elsewhere.
    pub reschedule_after: Duration,
    /// Ended tasks kept per workload past the retention, and the retention (`gc`).
    pub task_gc_keep: usize,
    pub task_gc_retention: Duration,
    pub max_body: usize,
    /// In-flight bounds per request class (load shedding).
    pub limits: crate::admission::Limits,
    /// Routes served beside the API (the web UI): given the API router and the cluster
    /// token, returns the router to serve. The UI crate depends on this one, so the binary
    /// passes it in.
    pub ui: Option<UiRoutes>,
    /// Serve the built-in DNS here (`--dns-listen`), from this master's own state.
    pub dns: Option<crate::dns_server::DnsConfig>,
}

/// Adds routes to the API router (see `MasterConfig::ui`).
pub type UiRoutes = fn(axum::Router, &str, bool) -> axum::Router;

/// A running master.
pub struct Master {
    pub api: Arc<Api>,
    pub addr: SocketAddr,
    /// Where the built-in DNS answers, if it was asked for.
    pub dns_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Master {
    pub async fn start(cfg: MasterConfig) -> anyhow::Result<Master> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let node = RaftNode::start(cfg.node.clone(), Machine::default()).await?;
        let client = cairn_raft::tls::client_builder()
            .tcp_nodelay(true)
            .build()?;
        let metrics = Metrics::new();
        let admission = crate::admission::Admission::new(cfg.limits, &metrics.registry);
        let wakers = node.app.read().expect("state lock").wakers.clone();
        let api = Arc::new(Api {
            node: node.clone(),
            liveness: Arc::new(Liveness::default()),
            token: cfg.token.clone(),
            metrics,
            admission,
            wakers,
            client,
            max_body: cfg.max_body,
            dns: Default::default(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let app = match cfg.ui {
            Some(ui) => ui(
                router(api.clone()),
                &cfg.token,
                cairn_raft::tls::current().is_some(),
            ),
            None => router(api.clone()),
        };
        let mut srv_stop = stop_rx.clone();
        let server = tokio::spawn(async move {
            // Users bring tokens; agents bring their certificates (or the token).
            let r = cairn_raft::tls::serve(
                listener,
                app,
                cairn_raft::tls::Clients::Optional,
                async move {
                    let _ = srv_stop.wait_for(|s| *s).await;
                },
            )
            .await;
            if let Err(e) = r {
                tracing::error!("api server: {e}");
            }
        });
        if !cfg.join {
            // No peers: a cluster of this one master (`cairn dev`).
            let peers = if cfg.peers.is_empty() {
                BTreeMap::from([(cfg.node.id, node.node.clone())])
            } else {
                cfg.peers.clone()
            };
            match peers.get(&cfg.node.id) {
                None => anyhow::bail!(
                    "--peers must include this master's own --node-id {}",
                    cfg.node.id
                ),
                Some(me) if me.peer != node.node.peer => anyhow::bail!(
                    "--peers gives master {} the peer address {}, but it serves Raft on {}: \
                     make --peer-advertise (or --peer-listen) match",
                    cfg.node.id,
                    me.peer,
                    node.node.peer
                ),
                Some(_) => {}
            }
            if node.bootstrap(&peers).await? {
                tracing::info!(?peers, "bootstrapped a new cluster");
            }
        }
        let dns_addr = match cfg.dns.clone() {
            Some(dns) => {
                let (tx, rx) = watch::channel(api.dns_view().await.0);
                tokio::spawn(dns_refresh_loop(api.clone(), tx, stop_rx.clone()));
                let server = crate::dns_server::DnsServer::start(dns, rx, stop_rx.clone()).await?;
                Some(server.addr)
            }
            None => None,
        };
        tokio::spawn(watch_raft(api.clone(), stop_rx.clone()));
        tokio::spawn(liveness_loop(
            api.clone(),
            cfg.agent_timeout,
            stop_rx.clone(),
        ));
        tokio::spawn(controller_loop(
            api.clone(),
            crate::controller::Config {
                lost_after_ms: cfg.reschedule_after.as_millis() as u64,
                gc_keep: cfg.task_gc_keep,
                gc_retention_ms: cfg.task_gc_retention.as_millis() as u64,
            },
            stop_rx,
        ));
        Ok(Master {
            api,
            addr,
            dns_addr,
            stop,
            server,
        })
    }

    /// Stops within a few seconds under any load: in-flight requests (long-polls included)
    /// get one second to finish, then the server is dropped; Raft and sled stop bounded too.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(1), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        self.api.node.shutdown().await;
    }
}

/// Keeps the master's DNS view current: every 150 ms, rebuilt if the applied index or the
/// masters changed (`Api::dns_view` caches, and builds at most every 100 ms), so answers
/// trail the state by at most about 250 ms.
async fn dns_refresh_loop(
    api: Arc<Api>,
    tx: watch::Sender<Arc<crate::dns::DnsView>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(150));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (view, _) = api.dns_view().await;
        if !Arc::ptr_eq(&view, &tx.borrow()) {
            tx.send_replace(view);
        }
    }
}

/// Counts term and leader changes (metrics) as openraft reports them.
async fn watch_raft(api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    let mut rx = api.node.raft.metrics();
    let (mut term, mut leader) = {
        let m = rx.borrow();
        (m.current_term, m.current_leader)
    };
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let m = rx.borrow().clone();
        if m.current_term != term {
            api.metrics.term_changes.inc();
            tracing::info!(from = term, to = m.current_term, "raft term changed");
            term = m.current_term;
        }
        if m.current_leader != leader {
            api.metrics.leader_changes.inc();
            leader = m.current_leader;
        }
    }
}

/// While this master leads, commits agent status transitions decided by `Liveness`.
async fn liveness_loop(api: Arc<Api>, timeout: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let m = api.node.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            api.liveness.reset();
            continue;
        }
        let agents: Vec<(String, AgentStatus)> = {
            let g = api.node.app.read().expect("state lock");
            g.state
                .agents
                .values()
                .map(|a| (a.id.clone(), a.status))
                .collect()
        };
        let changes = api
            .liveness
            .tick(m.current_term, &agents, Instant::now(), timeout);
        for (id, status) in changes {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            tracing::info!(agent = %id, ?status, "agent status change");
            if let Err(e) = api
                .propose(Command::SetAgentStatus { id, status, at })
                .await
            {
                tracing::warn!("committing agent status: {}", e.message);
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// While this master leads, runs the pure controller (`controller::reconcile`) whenever state
/// changes (and at least every 500 ms, for timers: backoff, cron, lost agents) and commits
/// what it decides. After a read barrier, so a new leader decides on everything committed.
async fn controller_loop(
    api: Arc<Api>,
    cfg: crate::controller::Config,
    mut stop: watch::Receiver<bool>,
) {
    let mut applied = api.node.applied.clone();
    loop {
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Coalesce bursts of applied entries.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !api.node.is_leader() {
            continue;
        }
        if api.node.read_barrier().await.is_err() {
            continue;
        }
        let cmds = {
            let g = api.node.app.read().expect("state lock");
            crate::controller::reconcile(&g.state, now_ms(), &cfg)
        };
        for c in cmds {
            let what = format!("{c:?}").chars().take(120).collect::<String>();
            match api.propose(c).await {
                Ok(_) => tracing::debug!("controller: {what}"),
                Err(e) => tracing::debug!("controller: {what}: {}", e.message),
            }
        }
    }
}
