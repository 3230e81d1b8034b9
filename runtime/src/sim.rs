//! Simulated agents (`cairn agent --simulate N`): one process registers N agents that
//! heartbeat and long-poll their assignments like real ones, and report every assigned task
//! `running` (and a task that leaves their assignments `killed`) without running anything.
//! For scale tests and benchmarks of the control plane: the masters cannot tell them apart
//! from real agents.

use crate::agent::{heartbeat_loop, AgentConfig, AgentInfo};
use crate::converge::{next_index, response_index};
use cairn_kernel::model::AgentRegistration;
use cairn_kernel::protocol::Assignment;
use cairn_raft::backoff::{retry_after, Backoff};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Runs `n` simulated agents until `stop`. Agent `i` has id `<prefix>-<i>`, hostname
/// `sim-<i>`, the given resources, and attributes `rack:r<i%20>;zone:z<i%3>` plus `attributes`.
pub async fn run(cfg: AgentConfig, n: usize, prefix: String, stop: watch::Receiver<bool>) {
    let http = cairn_raft::tls::client_builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(40))
        .pool_max_idle_per_host(n.max(1))
        .build()
        .expect("http client");
    let addr = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| cfg.listen.to_string());
    let mut joins = Vec::new();
    for i in 0..n {
        let mut attributes = cfg.attributes.clone();
        attributes.insert("rack".into(), format!("r{}", i % 20));
        attributes.insert("zone".into(), format!("z{}", i % 3));
        let reg = AgentRegistration {
            id: format!("{prefix}-{i:05}"),
            hostname: format!("sim-{i:05}"),
            addr: addr.clone(),
            resources: cfg.resources.clone(),
            attributes,
            version: format!("{}-simulated", env!("CARGO_PKG_VERSION")),
        };
        let info = Arc::new(Mutex::new(AgentInfo {
            id: reg.id.clone(),
            ..Default::default()
        }));
        joins.push(tokio::spawn(heartbeat_loop(
            cfg.clone(),
            reg.clone(),
            info.clone(),
            stop.clone(),
        )));
        joins.push(tokio::spawn(assignments(
            cfg.clone(),
            reg.id.clone(),
            info,
            http.clone(),
            stop.clone(),
        )));
    }
    for j in joins {
        let _ = j.await;
    }
}

/// Long-polls one simulated agent's assignments and reports what changed.
async fn assignments(
    cfg: AgentConfig,
    id: String,
    info: Arc<Mutex<AgentInfo>>,
    http: reqwest::Client,
    mut stop: watch::Receiver<bool>,
) {
    let scheme = cairn_raft::tls::scheme();
    let mut index = 0u64;
    let mut cur = 0usize;
    let mut running: HashSet<String> = HashSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        if *stop.borrow() {
            return;
        }
        let masters = {
            let learned = info.lock().expect("info").masters.clone();
            if learned.is_empty() {
                cfg.masters.clone()
            } else {
                learned
            }
        };
        let master = masters[cur % masters.len()].clone();
        let r = tokio::select! {
            r = http
                .get(format!("{scheme}://{master}/api/v1/agents/{id}/assignments"))
                .query(&[("index", index.to_string()), ("wait", "30s".into()), ("stale", "true".into())])
                .bearer_auth(&cfg.token)
                .send() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let list = match r {
            Ok(r) if r.status().is_success() => {
                let new_index = response_index(&r).unwrap_or(index);
                match r.json::<Vec<Assignment>>().await {
                    Ok(l) => {
                        index = next_index(index, new_index);
                        backoff.reset();
                        l
                    }
                    Err(_) => {
                        info.lock().expect("info").retries += 1;
                        tokio::time::sleep(backoff.next(None)).await;
                        continue;
                    }
                }
            }
            other => {
                let ra = other.as_ref().ok().and_then(|r| retry_after(r.headers()));
                cur += 1;
                info.lock().expect("info").retries += 1;
                tokio::time::sleep(backoff.next(ra)).await;
                continue;
            }
        };
        let now: HashSet<String> = list.iter().map(|a| a.task.id.clone()).collect();
        let mut reports = Vec::new();
        for a in &list {
            if a.task.state != cairn_kernel::model::TaskState::Running {
                reports.push(serde_json::json!({"id": a.task.id, "state": "running",
                                                "healthy": if a.task.health_checks.is_empty() { None } else { Some(true) }}));
            }
        }
        for gone in running.difference(&now) {
            reports.push(serde_json::json!({"id": gone, "state": "killed", "reason": "killed"}));
        }
        running = now;
        while !reports.is_empty() {
            let r = http
                .post(format!("{scheme}://{master}/api/v1/agents/{id}/status"))
                .bearer_auth(&cfg.token)
                .json(&reports)
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    reports.clear();
                    backoff.reset();
                }
                other => {
                    if *stop.borrow() {
                        return;
                    }
                    let ra = other.as_ref().ok().and_then(|r| retry_after(r.headers()));
                    info.lock().expect("info").retries += 1;
                    tokio::time::sleep(backoff.next(ra)).await;
                }
            }
        }
    }
}
