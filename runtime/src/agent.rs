//! The agent process: a stable id in its data dir, registration with the masters, a heartbeat
//! loop that follows leader changes and master failures on its own, and the agent's own API.

use crate::tasks::TaskManager;
use cairn_kernel::model::{AgentRegistration, AgentResources};
use cairn_kernel::protocol::HeartbeatReply;
use cairn_raft::backoff::{retry_after, Backoff};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How an agent is started.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Master addresses (`host:port`) to try, in order.
    pub masters: Vec<String>,
    pub listen: SocketAddr,
    /// The address masters reach this agent on; defaults to the bound listen address.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    pub token: String,
    pub resources: AgentResources,
    pub attributes: BTreeMap<String, String>,
    pub heartbeat_interval: Duration,
    pub hostname: String,
    /// Where cgroups are mounted (normally `/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// Serve the built-in DNS here (`--dns-listen`), from a local copy of the masters' table.
    pub dns: Option<cairn_kernel::dns_server::DnsConfig>,
}

/// What the agent knows about its link to the masters; served at `GET /api/v1/agent`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AgentInfo {
    pub id: String,
    pub addr: String,
    pub masters: Vec<String>,
    pub registered: bool,
    pub leader_id: Option<u64>,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub registrations: u64,
    /// Retries (backoff waits) of the registration/heartbeat, assignment and status loops.
    pub retries: u64,
    /// The masters' `HeartbeatReply::status_epoch`: when it changes, every task is reported
    /// again.
    pub status_epoch: u64,
}

/// A running agent.
pub struct Agent {
    pub info: Arc<Mutex<AgentInfo>>,
    pub tasks: Arc<TaskManager>,
    pub addr: SocketAddr,
    /// Where the built-in DNS answers, if it was asked for.
    pub dns_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

/// Reads the agent id from `data_dir/agent-id`, creating it on first start.
pub fn load_or_create_id(data_dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("agent-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            let tmp = data_dir.join("agent-id.tmp");
            std::fs::write(&tmp, &id)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(id)
        }
    }
}

impl Agent {
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        if cfg.masters.is_empty() {
            anyhow::bail!(
                "--masters is empty: give at least one master address, e.g. 127.0.0.1:5050"
            );
        }
        let id = load_or_create_id(&cfg.data_dir)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
        let info = Arc::new(Mutex::new(AgentInfo {
            id: id.clone(),
            addr: advertise.clone(),
            masters: cfg.masters.clone(),
            ..Default::default()
        }));
        let host = advertise
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| advertise.clone());
        let tasks = TaskManager::open(&cfg.data_dir, &cfg.cgroup_root, &host)?;
        let (stop, stop_rx) = watch::channel(false);
        // The DNS server first: tasks launched from here on are pointed at it.
        let mut dns_handle = None;
        let mut dns_addr = None;
        if let Some(dns) = cfg.dns.clone() {
            let (tx, rx) = watch::channel(Arc::new(cairn_kernel::dns::DnsView::default()));
            let server =
                cairn_kernel::dns_server::DnsServer::start(dns, rx, stop_rx.clone()).await?;
            dns_addr = Some(server.addr);
            tasks.set_dns(server.addr);
            dns_handle = Some(tokio::spawn(crate::converge::dns_loop(
                cfg.clone(),
                info.clone(),
                tx,
                stop_rx.clone(),
            )));
        }
        let app = crate::agent_api::router(info.clone(), tasks.clone(), cfg.token.clone());
        let mut srv_stop = stop_rx.clone();
        let server = tokio::spawn(async move {
            // Masters (log and file proxies) and operators with an admin certificate only.
            let _ = cairn_raft::tls::serve(
                listener,
                app,
                cairn_raft::tls::Clients::Required(&["master", "admin"]),
                async move {
                    let _ = srv_stop.wait_for(|s| *s).await;
                },
            )
            .await;
        });
        let reg = AgentRegistration {
            id,
            hostname: cfg.hostname.clone(),
            addr: advertise,
            resources: cfg.resources.clone(),
            attributes: cfg.attributes.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let assign = tokio::spawn(crate::converge::assignment_loop(
            cfg.clone(),
            reg.id.clone(),
            info.clone(),
            tasks.clone(),
            stop_rx.clone(),
        ));
        let report = tokio::spawn(crate::converge::status_loop(
            cfg.clone(),
            reg.id.clone(),
            info.clone(),
            tasks.clone(),
            stop_rx.clone(),
        ));
        let volumes = tokio::spawn(crate::converge::volume_loop(
            cfg.clone(),
            reg.id.clone(),
            info.clone(),
            tasks.clone(),
            stop_rx.clone(),
        ));
        let mut handles = vec![server, assign, report, volumes];
        handles.extend(dns_handle);
        handles.push(tokio::spawn(heartbeat_loop(
            cfg,
            reg,
            info.clone(),
            stop_rx,
        )));
        Ok(Agent {
            info,
            tasks,
            addr,
            dns_addr,
            stop,
            handles,
        })
    }

    /// Kills every task this agent runs and waits (at most `wait`) until they have ended:
    /// for `cairn dev` and labs, whose tasks must not outlive them. A production agent that stops
    /// leaves its tasks running and recovers them when it starts again.
    pub async fn kill_all_tasks(&self, wait: Duration) {
        let live: Vec<String> = self
            .tasks
            .list()
            .into_iter()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.id)
            .collect();
        for id in &live {
            self.tasks.kill(id, "the agent stopped with its tasks");
        }
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline
            && self.tasks.list().iter().any(|t| !t.state.is_terminal())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.handles {
            let _ = t.await;
        }
    }
}

enum Beat {
    Ok(HeartbeatReply),
    /// The masters do not know this agent (e.g. a fresh cluster): register again.
    Unknown,
    /// This master could not take it; try another (after its `Retry-After`, if it gave one).
    Failed(String, Option<Duration>),
}

pub(crate) async fn heartbeat_loop(
    cfg: AgentConfig,
    reg: AgentRegistration,
    info: Arc<Mutex<AgentInfo>>,
    mut stop: watch::Receiver<bool>,
) {
    let scheme = cairn_raft::tls::scheme();
    let client = cairn_raft::tls::client_builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("http client");
    let mut masters = cfg.masters.clone();
    let mut cur = 0usize;
    let mut registered = false;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        if *stop.borrow() {
            return;
        }
        let master = masters[cur % masters.len()].clone();
        // Set when this round failed: wait with backoff (and the server's Retry-After).
        let mut failed: Option<Option<Duration>> = None;
        if !registered {
            let r = client
                .post(format!("{scheme}://{master}/api/v1/agents"))
                .bearer_auth(&cfg.token)
                .json(&reg)
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => {
                    registered = true;
                    let mut i = info.lock().expect("info lock");
                    i.registered = true;
                    i.registrations += 1;
                    tracing::info!(%master, id = %reg.id, "registered with the masters");
                }
                Ok(resp) => {
                    let status = resp.status();
                    let ra = retry_after(resp.headers());
                    let body = resp.text().await.unwrap_or_default();
                    tracing::warn!(%master, %status, %body, "registration refused");
                    cur += 1;
                    failed = Some(ra);
                }
                Err(e) => {
                    tracing::debug!(%master, "registration failed: {e}");
                    cur += 1;
                    failed = Some(None);
                }
            }
        }
        if registered {
            let beat = match client
                .post(format!(
                    "{scheme}://{master}/api/v1/agents/{}/heartbeat",
                    reg.id
                ))
                .bearer_auth(&cfg.token)
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => match resp.json::<HeartbeatReply>().await
                {
                    Ok(r) => Beat::Ok(r),
                    Err(e) => Beat::Failed(e.to_string(), None),
                },
                Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => Beat::Unknown,
                Ok(resp) => Beat::Failed(
                    format!("HTTP {}", resp.status()),
                    retry_after(resp.headers()),
                ),
                Err(e) => Beat::Failed(e.to_string(), None),
            };
            let mut i = info.lock().expect("info lock");
            match beat {
                Beat::Ok(r) => {
                    i.heartbeats_ok += 1;
                    backoff.reset();
                    i.leader_id = Some(r.leader_id);
                    i.status_epoch = r.status_epoch;
                    if !r.masters.is_empty() {
                        // Learn the current membership, keeping the configured masters too.
                        let mut all = r.masters.clone();
                        for m in &cfg.masters {
                            if !all.contains(m) {
                                all.push(m.clone());
                            }
                        }
                        if let Some(pos) = all.iter().position(|m| *m == master) {
                            cur = pos;
                        }
                        masters = all;
                        i.masters = masters.clone();
                    }
                }
                Beat::Unknown => {
                    registered = false;
                    i.registered = false;
                    failed = Some(None);
                }
                Beat::Failed(e, ra) => {
                    i.heartbeats_failed += 1;
                    tracing::debug!(%master, "heartbeat failed: {e}");
                    cur += 1;
                    failed = Some(ra);
                }
            }
        }
        let wait = match failed {
            Some(ra) => {
                info.lock().expect("info lock").retries += 1;
                backoff.next(ra)
            }
            None => cfg.heartbeat_interval,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_stable() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_id(d.path()).unwrap();
        let b = load_or_create_id(d.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 36);
    }
}
