//! The agent's side of the control loop: long-poll the masters for this agent's assignments
//! (a blocking query keyed by the Raft index) and converge — start what is assigned and not
//! running, kill what runs and is no longer assigned — and push task state changes back in
//! idempotent batches, retried until a master acknowledges them.

use crate::agent::{AgentConfig, AgentInfo};
use crate::task::{reason, TaskSpec};
use crate::tasks::TaskManager;
use cairn_kernel::model::TaskState;
use cairn_kernel::protocol::Assignment;
use cairn_kernel::service::model::VolumeStatus;
use cairn_kernel::service::VolumeReservation;
use cairn_raft::backoff::{retry_after, Backoff};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The HTTP client of an agent loop: a short connect timeout (a dead master is skipped fast)
/// and the loop's own request timeout.
fn client(timeout: Duration) -> reqwest::Client {
    cairn_raft::tls::client_builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .build()
        .expect("http client")
}

fn masters(cfg: &AgentConfig, info: &Arc<Mutex<AgentInfo>>) -> Vec<String> {
    let learned = info.lock().expect("info").masters.clone();
    if learned.is_empty() {
        cfg.masters.clone()
    } else {
        learned
    }
}

/// Builds the task spec for an assignment from its workload.
pub fn spec_for(a: &Assignment) -> Result<TaskSpec, serde_json::Error> {
    let t = &a.task;
    serde_json::from_value(serde_json::json!({
        "id": t.id,
        "workload": t.workload,
        "runtime": t.runtime,
        "resources": t.resources,
        "env": t.env,
        "ports": t.ports,
        "kill_grace_ms": t.kill_grace_ms,
        "timeout_ms": t.timeout_ms,
        "network": t.network,
        "health_checks": t.health_checks,
        "volumes": t.volumes,
        "files": t.files,
        "assigned": true,
    }))
}

/// The `X-Cairn-Index` of a blocking-query answer.
pub(crate) fn response_index(r: &reqwest::Response) -> Option<u64> {
    r.headers()
        .get("x-cairn-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The index to poll from next: an index that went backwards means a new cluster or a
/// restore, so start over.
pub(crate) fn next_index(prev: u64, answered: u64) -> u64 {
    if answered < prev {
        0
    } else {
        answered
    }
}

/// Long-polls with `stale=true` (any master answers from its applied state, as Nomad clients
/// do): the blocking query on this agent's own assignment index keeps answers monotonic, and
/// no read barrier per poll keeps a thousand agents from costing the leader a heartbeat round
/// each.
pub async fn assignment_loop(
    cfg: AgentConfig,
    agent_id: String,
    info: Arc<Mutex<AgentInfo>>,
    tasks: Arc<TaskManager>,
    mut stop: watch::Receiver<bool>,
) {
    let scheme = cairn_raft::tls::scheme();
    let http = client(Duration::from_secs(40));
    let mut index = 0u64;
    let mut cur = 0usize;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        if *stop.borrow() {
            return;
        }
        let ms = masters(&cfg, &info);
        let master = ms[cur % ms.len()].clone();
        let url =
            format!("{scheme}://{master}/api/v1/agents/{agent_id}/assignments?index={index}&wait=30s&stale=true");
        let req = http.get(url).bearer_auth(&cfg.token).send();
        let resp = tokio::select! {
            r = req => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let failed_wait = |backoff: &mut Backoff, ra| {
            info.lock().expect("info").retries += 1;
            backoff.next(ra)
        };
        let list = match resp {
            Ok(r) if r.status().is_success() => {
                let new_index = response_index(&r).unwrap_or(0);
                match r.json::<Vec<Assignment>>().await {
                    Ok(l) => {
                        index = next_index(index, new_index);
                        backoff.reset();
                        l
                    }
                    Err(e) => {
                        tracing::warn!(%master, "bad assignments answer: {e}");
                        tokio::time::sleep(failed_wait(&mut backoff, None)).await;
                        continue;
                    }
                }
            }
            other => {
                let ra = other.as_ref().ok().and_then(|r| retry_after(r.headers()));
                tracing::debug!(%master, "assignments poll failed: {other:?}");
                cur += 1;
                tokio::time::sleep(failed_wait(&mut backoff, ra)).await;
                continue;
            }
        };
        let t = tasks.clone();
        let _ = tokio::task::spawn_blocking(move || converge(&t, &list)).await;
    }
}

/// Starts assigned tasks that are not here; kills assigned tasks that are no longer assigned.
pub fn converge(tasks: &Arc<TaskManager>, assignments: &[Assignment]) {
    let here: HashMap<String, (TaskSpec, TaskState)> = tasks
        .specs()
        .into_iter()
        .map(|(s, st)| (s.id.clone(), (s, st.state)))
        .collect();
    let wanted: HashSet<&str> = assignments.iter().map(|a| a.task.id.as_str()).collect();
    // Kills first: a pod task restarted in place gets its old ports back, which the old
    // launch frees as it stops.
    let mut stopping = HashSet::new();
    for (id, (spec, state)) in &here {
        if spec.assigned && !state.is_terminal() && !wanted.contains(id.as_str()) {
            tasks.kill(id, reason::KILLED);
            if let Some(slot) = pod_task_slot(id) {
                stopping.insert(slot);
            }
        }
    }
    for a in assignments {
        if here.contains_key(&a.task.id) {
            continue;
        }
        // A new launch of a pod task waits until the old one has stopped: both would use
        // the same volume and port (the old one's exit is reported, which brings the next
        // assignments poll, and this launch then).
        if a.task.workload.starts_with("service:")
            && pod_task_slot(&a.task.id).is_some_and(|s| stopping.contains(s))
        {
            continue;
        }
        match spec_for(a) {
            Ok(spec) => {
                if let Err(e) = tasks.launch(spec) {
                    tracing::warn!(task = %a.task.id, "launch failed: {e}");
                }
            }
            Err(e) => tracing::warn!(task = %a.task.id, "bad assignment: {e}"),
        }
    }
}

/// A pod task's launch id without its generation (`svc.pod.task.7` → `svc.pod.task`).
fn pod_task_slot(id: &str) -> Option<&str> {
    let (slot, generation) = id.rsplit_once('.')?;
    generation.parse::<u64>().is_ok().then_some(slot)
}

pub async fn status_loop(
    cfg: AgentConfig,
    agent_id: String,
    info: Arc<Mutex<AgentInfo>>,
    tasks: Arc<TaskManager>,
    mut stop: watch::Receiver<bool>,
) {
    let scheme = cairn_raft::tls::scheme();
    let http = client(Duration::from_secs(15));
    // Reports are built from each task's current state when sent, so while the masters are
    // away only the latest state per task waits (coalescing): the backlog never grows.
    let mut acked: HashMap<String, (TaskState, Option<bool>)> = HashMap::new();
    let mut changed = tasks.watch();
    let mut cur = 0usize;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut epoch = 0;
    loop {
        let mut wait = Duration::from_secs(1);
        // The masters changed this agent's status (unreachable, back): they may have marked
        // its tasks unreachable meanwhile, so everything is reported again.
        let now_epoch = info.lock().expect("info").status_epoch;
        if now_epoch != epoch {
            acked.clear();
            epoch = now_epoch;
        }
        let batch: Vec<serde_json::Value> = tasks
            .specs()
            .into_iter()
            .filter(|(s, st)| s.assigned && acked.get(&s.id) != Some(&(st.state, st.healthy)))
            .map(|(_, st)| {
                serde_json::json!({"id": st.id, "state": st.state, "reason": st.reason,
                                   "healthy": st.healthy})
            })
            .collect();
        if !batch.is_empty() {
            let ms = masters(&cfg, &info);
            let master = ms[cur % ms.len()].clone();
            let r = http
                .post(format!(
                    "{scheme}://{master}/api/v1/agents/{agent_id}/status"
                ))
                .bearer_auth(&cfg.token)
                .json(&batch)
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    backoff.reset();
                    for b in &batch {
                        if let (Some(id), Ok(state)) = (
                            b["id"].as_str(),
                            serde_json::from_value::<TaskState>(b["state"].clone()),
                        ) {
                            acked.insert(id.to_string(), (state, b["healthy"].as_bool()));
                        }
                    }
                }
                other => {
                    cur += 1;
                    let ra = other.as_ref().ok().and_then(|r| retry_after(r.headers()));
                    info.lock().expect("info").retries += 1;
                    wait = backoff.next(ra);
                    // Do not let task changes cut a backoff short: wait it out.
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// How often the agent asks which of its volumes to destroy.
const VOLUME_POLL: Duration = Duration::from_secs(3);

/// Deletes the data of this agent's volumes the masters mark `destroying` once no task here
/// mounts them, and reports them (so the reservation and its disk go). Volumes the masters
/// do not list are never touched: only the replicated state decides what data goes.
pub async fn volume_loop(
    cfg: AgentConfig,
    agent_id: String,
    info: Arc<Mutex<AgentInfo>>,
    tasks: Arc<TaskManager>,
    mut stop: watch::Receiver<bool>,
) {
    let scheme = cairn_raft::tls::scheme();
    let http = client(Duration::from_secs(10));
    let mut cur = 0usize;
    loop {
        let jitter = Duration::from_millis((uuid::Uuid::new_v4().as_u128() % 1000) as u64);
        tokio::select! {
            _ = tokio::time::sleep(VOLUME_POLL + jitter) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let ms = masters(&cfg, &info);
        let master = ms[cur % ms.len()].clone();
        let url = format!("{scheme}://{master}/api/v1/agents/{agent_id}/volumes?stale=true");
        let list = match http.get(url).bearer_auth(&cfg.token).send().await {
            Ok(r) if r.status().is_success() => r.json::<Vec<VolumeReservation>>().await,
            other => {
                tracing::debug!(%master, "volume poll failed: {other:?}");
                cur += 1;
                continue;
            }
        };
        let Ok(list) = list else {
            cur += 1;
            continue;
        };
        let in_use = tasks.volumes_in_use();
        let mut done = Vec::new();
        for v in list
            .iter()
            .filter(|v| v.status == VolumeStatus::Destroying && !in_use.contains(&v.id))
        {
            match tasks.volumes().destroy(&v.id) {
                Ok(()) => {
                    tracing::info!(volume = %v.id, "volume destroyed");
                    done.push(v.id.clone());
                }
                Err(e) => tracing::warn!(volume = %v.id, "cannot destroy volume: {e}"),
            }
        }
        if done.is_empty() {
            continue;
        }
        let url = format!("{scheme}://{master}/api/v1/agents/{agent_id}/volumes/destroyed");
        let r = http
            .post(url)
            .bearer_auth(&cfg.token)
            .json(&serde_json::json!({ "ids": done }))
            .send()
            .await;
        if !r.as_ref().is_ok_and(|r| r.status().is_success()) {
            // Reported again next round (the data is already gone; destroy is idempotent).
            tracing::debug!(%master, "volume report failed: {r:?}");
            cur += 1;
        }
    }
}

/// Keeps this agent's copy of the DNS table current (`GET /api/v1/dns`, a blocking query
/// keyed by the table index, `stale=true` like the assignment poll): the agent's DNS server
/// answers from it, so a lookup never waits on a master and still answers while the masters
/// are away (with the last table it had).
pub async fn dns_loop(
    cfg: AgentConfig,
    info: Arc<Mutex<AgentInfo>>,
    view: watch::Sender<Arc<cairn_kernel::dns::DnsView>>,
    mut stop: watch::Receiver<bool>,
) {
    let scheme = cairn_raft::tls::scheme();
    let http = client(Duration::from_secs(40));
    let mut index = 0u64;
    let mut cur = 0usize;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        let ms = masters(&cfg, &info);
        let master = ms[cur % ms.len()].clone();
        let url = format!("{scheme}://{master}/api/v1/dns?index={index}&wait=30s&stale=true");
        let req = http.get(url).bearer_auth(&cfg.token).send();
        let resp = tokio::select! {
            r = req => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let fetched = match resp {
            Ok(r) if r.status().is_success() => {
                let new_index = response_index(&r).unwrap_or(0);
                r.json::<cairn_kernel::dns::DnsView>()
                    .await
                    .map(|v| (new_index, v))
                    .map_err(|e| (e.to_string(), None))
            }
            Ok(r) => Err((format!("HTTP {}", r.status()), retry_after(r.headers()))),
            Err(e) => Err((e.to_string(), None)),
        };
        match fetched {
            Ok((new_index, v)) => {
                index = next_index(index, new_index);
                backoff.reset();
                if **view.borrow() != v {
                    view.send_replace(Arc::new(v));
                }
            }
            Err((e, ra)) => {
                tracing::debug!(%master, "dns table poll failed: {e}");
                info.lock().expect("info").retries += 1;
                cur += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next(ra)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}
