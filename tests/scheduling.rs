//! End to end on 3 masters and 3 agents (real processes on loopback): the leader's scheduler
//! places workloads under constraints, roles and strategies, replaces tasks of a lost agent
//! without duplicates when it returns, follows new agents with system workloads, and
//! converges after the leader is killed in the middle of placing 50 tasks.
//! Needs root (native tasks run in namespaces and cgroups).

mod common;

use cairn_installer::lab::Lab;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

struct Cluster {
    _dir: tempfile::TempDir,
    lab: Lab,
    http: reqwest::Client,
    /// Agent id by lab index.
    ids: Vec<String>,
    /// First port of agent 0's range (agent n: base + 100 n).
    base: u16,
}

/// Agents: 0 and 1 on rack r1, 2 on rack r2; agent 2 also reserves resources for role `prod`.
async fn cluster() -> Cluster {
    let (dir, mut lab) = lab(
        3,
        &[
            "--agent-timeout",
            "1500ms",
            "--reschedule-after",
            "2s",
            "--request-timeout",
            "5s",
        ],
    );
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    // Each cluster of this test binary gets its own host port ranges (tests run in parallel
    // and tasks bind real ports): agent n offers [base+100n, base+100n+99].
    static CLUSTERS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 21_000 + 400 * CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let range = |n: u16| format!("ports:[{}-{}]", base + 100 * n, base + 100 * n + 99);
    let specs = [
        (
            format!("cpus:4;mem:4096;disk:10000;{}", range(0)),
            "rack:r1;zone:a",
        ),
        (
            format!("cpus:4;mem:4096;disk:10000;{}", range(1)),
            "rack:r1;zone:b",
        ),
        (
            format!(
                "cpus:4;mem:4096;disk:10000;{};cpus(prod):2;mem(prod):512",
                range(2)
            ),
            "rack:r2;zone:c",
        ),
    ];
    for (res, attrs) in &specs {
        lab.start_agent(&[
            "--resources",
            res,
            "--attributes",
            attrs,
            "--heartbeat-interval",
            "300ms",
        ])
        .unwrap();
    }
    let http = http();
    let mut ids = Vec::new();
    for n in 0..3 {
        let addr = lab.agents[n].addr.clone();
        let id = eventually(Duration::from_secs(30), "agent registered", || {
            let (http, addr) = (http.clone(), addr.clone());
            async move {
                let v: Value = http
                    .get(format!("http://{addr}/api/v1/agent"))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (v["registered"] == true).then(|| v["id"].as_str().unwrap().to_string())
            }
        })
        .await;
        ids.push(id);
    }
    Cluster {
        _dir: dir,
        lab,
        http,
        ids,
        base,
    }
}

impl Cluster {
    /// Any running master (writes are forwarded to the leader).
    fn master(&self) -> String {
        self.lab.running_addrs()[0].clone()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        for _ in 0..50 {
            let r = self
                .http
                .post(format!("http://{}{path}", self.master()))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await;
            if let Ok(r) = r {
                let s = r.status().as_u16();
                if s != 503 {
                    return (s, r.json().await.unwrap_or(Value::Null));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("POST {path} never answered");
    }

    async fn run(&self, spec: Value) {
        let (s, v) = self.post("/api/v1/workloads", spec).await;
        assert_eq!(s, 201, "{v}");
    }

    async fn tasks(&self) -> Vec<Value> {
        for m in self.lab.running_addrs() {
            if let Some(v) = self.lab.get(&m, "/api/v1/tasks").await {
                return v.as_array().cloned().unwrap_or_default();
            }
        }
        vec![]
    }

    /// Live (not ended, not being killed) tasks of a workload.
    async fn live(&self, w: &str) -> Vec<Value> {
        self.tasks()
            .await
            .into_iter()
            .filter(|t| {
                t["workload"] == w
                    && !matches!(
                        t["state"].as_str(),
                        Some("finished" | "failed" | "killed" | "lost" | "killing")
                    )
            })
            .collect()
    }

    /// Waits until `n` tasks of `w` run; returns them.
    async fn running(&self, w: &str, n: usize) -> Vec<Value> {
        eventually(
            Duration::from_secs(40),
            &format!("{n} running tasks of {w}"),
            || async {
                let live = self.live(w).await;
                (live.len() == n && live.iter().all(|t| t["state"] == "running")).then_some(live)
            },
        )
        .await
    }

    /// What `/api/v1/events` replays from the start for `topic`, read for one second.
    async fn events(&self, topic: &str) -> Vec<Value> {
        use futures::StreamExt;
        let r = self
            .http
            .get(format!("http://{}/api/v1/events", self.master()))
            .query(&[("topic", topic), ("index", "0")])
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut body = r.bytes_stream();
        let mut text = String::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(end, body.next()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| serde_json::from_str(d.trim()).unwrap())
            .collect()
    }

    fn agent_index(&self, id: &Value) -> usize {
        self.ids.iter().position(|x| id == x).expect("known agent")
    }

    /// Tasks of a workload the agent itself runs (its own view).
    async fn on_agent(&self, n: usize, w: &str) -> Vec<Value> {
        let r = self
            .http
            .get(format!("http://{}/api/v1/tasks", self.lab.agents[n].addr))
            .bearer_auth(TOKEN)
            .send()
            .await;
        let Ok(r) = r else { return vec![] };
        let v: Vec<Value> = r.json().await.unwrap_or_default();
        v.into_iter()
            .filter(|t| t["workload"] == w && t["state"] == "running")
            .collect()
    }
}

fn sleeper(id: &str, instances: u32, extra: Value) -> Value {
    let mut spec = json!({
        "id": id, "instances": instances,
        "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "exec sleep 600"]}},
        "resources": {"cpus": 0.1, "mem": 16, "disk": 0},
        "kill_grace": "200ms", "restart": {"backoff": "200ms"}
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

fn agents_of(c: &Cluster, tasks: &[Value]) -> Vec<usize> {
    let mut v: Vec<usize> = tasks.iter().map(|t| c.agent_index(&t["agent"])).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn constraints_roles_and_strategies() {
    let c = cluster().await;
    // UNIQUE on the agent id: one per agent.
    c.run(sleeper(
        "uniq",
        3,
        json!({"constraints": [["@id", "UNIQUE"]]}),
    ))
    .await;
    assert_eq!(agents_of(&c, &c.running("uniq", 3).await), [0, 1, 2]);
    // The event stream has each task's way from staging to running, and only tasks.
    let ev = c.events("task").await;
    assert!(ev.iter().all(|e| e["topic"] == "task"), "{ev:?}");
    for kind in ["staging", "running"] {
        assert!(
            ev.iter().any(|e| e["id"] == "uniq.0" && e["kind"] == kind),
            "no {kind} event for uniq.0: {ev:?}"
        );
    }
    // CLUSTER on an attribute, IS on the zone, LIKE and UNLIKE on attributes.
    c.run(sleeper(
        "r2",
        2,
        json!({"constraints": [["rack", "CLUSTER", "r2"]]}),
    ))
    .await;
    assert_eq!(agents_of(&c, &c.running("r2", 2).await), [2, 2]);
    c.run(sleeper(
        "zb",
        2,
        json!({"constraints": [["@zone", "IS", "b"]]}),
    ))
    .await;
    assert_eq!(agents_of(&c, &c.running("zb", 2).await), [1, 1]);
    c.run(sleeper(
        "like",
        2,
        json!({"constraints": [["@zone", "LIKE", "[ac]"], ["rack", "UNLIKE", "r2"]]}),
    ))
    .await;
    assert_eq!(agents_of(&c, &c.running("like", 2).await), [0, 0]);
    // MAX_PER and GROUP_BY on racks.
    c.run(sleeper(
        "maxper",
        3,
        json!({"constraints": [["rack", "MAX_PER", "2"]], "strategy": "spread"}),
    ))
    .await;
    let racks: Vec<usize> = agents_of(&c, &c.running("maxper", 3).await);
    assert_eq!(racks.iter().filter(|&&a| a == 2).count(), 1, "{racks:?}");
    c.run(sleeper(
        "grouped",
        4,
        json!({"constraints": [["rack", "GROUP_BY"]]}),
    ))
    .await;
    let g = agents_of(&c, &c.running("grouped", 4).await);
    assert_eq!(g.iter().filter(|&&a| a == 2).count(), 2, "{g:?}");
    // binpack (default) fills one agent; spread uses all three.
    c.run(sleeper("packed", 3, json!({}))).await;
    let p = agents_of(&c, &c.running("packed", 3).await);
    assert!(p.iter().all(|&a| a == p[0]), "binpack: {p:?}");
    c.run(sleeper("spread", 3, json!({"strategy": "spread"})))
        .await;
    assert_eq!(agents_of(&c, &c.running("spread", 3).await), [0, 1, 2]);
    // A role uses its reservation (only agent 2 has one); ports are given from the agent's range.
    c.run(sleeper(
        "prod",
        2,
        json!({"role": "prod", "resources": {"cpus": 0.5, "mem": 128, "disk": 0},
               "ports": [{"name": "http", "number": 0}]}),
    ))
    .await;
    let prod = c.running("prod", 2).await;
    assert!(prod.iter().all(|t| t["pool"] == "prod"), "{prod:?}");
    assert_eq!(agents_of(&c, &prod), [2, 2]);
    for t in &prod {
        let port = t["ports"][0]["number"].as_u64().unwrap();
        let r2 = c.base as u64 + 200;
        assert!((r2..r2 + 100).contains(&port), "{t}");
    }
    // Workloads without the role never use its reservation (1 of its 2 cpus is still free):
    // pinned to agent 2, whole-cpu tasks fill only its unreserved cpus.
    let used: f64 = c
        .tasks()
        .await
        .iter()
        .filter(|t| {
            t["agent"] == c.ids[2].as_str()
                && t["pool"].is_null()
                && !matches!(
                    t["state"].as_str(),
                    Some("finished" | "failed" | "killed" | "lost")
                )
        })
        .map(|t| t["resources"]["cpus"].as_f64().unwrap())
        .sum();
    let fit = ((4.0 - used) / 1.0 + 1e-9).floor() as usize;
    c.run(sleeper(
        "hog",
        6,
        json!({"resources": {"cpus": 1.0, "mem": 16, "disk": 0}, "constraints": [["@id", "IS", c.ids[2]]]}),
    ))
    .await;
    let hog = c.running("hog", fit).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.live("hog").await.len(), fit, "borrowed a reservation");
    assert!(hog.iter().all(|t| t["pool"].is_null()), "{hog:?}");
    // Invalid specs: a 400 that names the field.
    let bad = |spec: Value, field: &'static str| {
        let c = &c;
        async move {
            let (s, v) = c.post("/api/v1/workloads", spec).await;
            assert_eq!(s, 400, "{v}");
            assert!(
                v["field"].as_str().unwrap_or("").starts_with(field),
                "expected field {field}: {v}"
            );
        }
    };
    bad(sleeper("x", 1, json!({"colour": "red"})), "colour").await;
    bad(sleeper("x", 1, json!({"instances": "three"})), "instances").await;
    bad(
        sleeper("x", 1, json!({"resources": {"cpus": -1.0}})),
        "resources.cpus",
    )
    .await;
    bad(
        sleeper("x", 1, json!({"resources": {"cpus": 1e9}})),
        "resources.cpus",
    )
    .await;
    bad(
        sleeper("x", 1, json!({"constraints": [["rack", "LIKE", "("]]})),
        "constraints[0]",
    )
    .await;
    bad(
        sleeper("x", 1, json!({"constraints": [["rack", "NEAR", "r1"]]})),
        "constraints[0]",
    )
    .await;
    let mut cron = sleeper(
        "x",
        1,
        json!({"kind": "cron", "schedule": {"cron": "every tuesday"}}),
    );
    cron["kind"] = json!("cron");
    bad(cron, "schedule.cron").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_agent_tasks_run_elsewhere_without_duplicates() {
    let mut c = cluster().await;
    // On rack r1: agents 0 and 1.
    c.run(sleeper(
        "svc",
        2,
        json!({"strategy": "spread", "constraints": [["rack", "CLUSTER", "r1"]]}),
    ))
    .await;
    let before = c.running("svc", 2).await;
    // A job that runs long enough to be caught by the agent loss.
    c.run(json!({"id": "job", "kind": "job", "max_retries": 3,
                 "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "sleep 4"]}},
                 "constraints": [["@id", "IS", c.ids[0]]], "restart": {"backoff": "100ms"}}))
        .await;
    c.running("job", 1).await;
    // Kill -9 agent 0 (its processes live on; the agent is gone).
    let victim = 0;
    let victim_id = c.ids[victim].clone();
    let on_victim: Vec<String> = before
        .iter()
        .filter(|t| t["agent"] == victim_id)
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    c.lab.kill_agent(victim);
    // Unreachable after 1.5 s, lost after 2 s more: the service runs elsewhere.
    let after = eventually(Duration::from_secs(30), "service replaced", || async {
        let live = c.live("svc").await;
        (live.len() == 2
            && live
                .iter()
                .all(|t| t["state"] == "running" && t["agent"] != victim_id))
        .then_some(live)
    })
    .await;
    for id in &on_victim {
        let t = c
            .tasks()
            .await
            .into_iter()
            .find(|t| t["id"] == *id)
            .unwrap();
        assert_eq!(t["state"], "lost", "{t}");
    }
    assert_eq!(agents_of(&c, &after), [1, 1], "CLUSTER still holds");
    assert!(!on_victim.is_empty(), "spread put one task on the victim");
    // The job was lost too: it is retried, and pinned to the lost agent it waits for it.
    c.lab.restart_agent(victim).unwrap();
    // Back: the agent kills what it ran before (no longer assigned); no duplicates.
    eventually(
        Duration::from_secs(30),
        "old service task killed",
        || async { c.on_agent(victim, "svc").await.is_empty().then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = c.live("svc").await;
    assert_eq!(live.len(), 2, "{live:?}");
    let mut running_on_agents = 0;
    for n in 0..3 {
        running_on_agents += c.on_agent(n, "svc").await.len();
    }
    assert_eq!(running_on_agents, 2, "agents run exactly the desired tasks");
    // The job: its first run was lost with the agent, a retry ran to completion.
    eventually(
        Duration::from_secs(40),
        "job finished after a retry",
        || async {
            let t = c.tasks().await;
            let job: Vec<&Value> = t.iter().filter(|t| t["workload"] == "job").collect();
            (job.iter().any(|t| t["state"] == "lost")
                && job.iter().any(|t| t["state"] == "finished"))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn system_workloads_follow_new_agents_and_leader_loss_leaves_no_duplicates() {
    let mut c = cluster().await;
    c.run(json!({"id": "node-agent", "kind": "system",
                 "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "exec sleep 600"]}},
                 "resources": {"cpus": 0.1, "mem": 16}, "kill_grace": "200ms"}))
        .await;
    assert_eq!(agents_of(&c, &c.running("node-agent", 3).await), [0, 1, 2]);
    // A fourth agent joins: the system workload follows.
    c.lab
        .start_agent(&[
            "--resources",
            &format!(
                "cpus:2;mem:2048;disk:1000;ports:[{}-{}]",
                c.base + 300,
                c.base + 399
            ),
            "--heartbeat-interval",
            "300ms",
        ])
        .unwrap();
    let tasks = c.running("node-agent", 4).await;
    let agents: BTreeSet<String> = tasks
        .iter()
        .map(|t| t["agent"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(agents.len(), 4);

    // Place 50 tasks and kill the leader in the middle of it.
    c.run(sleeper(
        "fifty",
        50,
        json!({"strategy": "spread", "resources": {"cpus": 0.05, "mem": 8, "disk": 0}}),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let leader = c.lab.leader().await.expect("leader");
    c.lab.kill(leader);
    let live = c.running("fifty", 50).await;
    let ids: BTreeSet<&str> = live.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 50, "duplicate ids");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.live("fifty").await.len(), 50, "still exactly 50");
    // And the agents run exactly those 50.
    let mut per_agent: BTreeMap<usize, usize> = BTreeMap::new();
    for n in 0..4 {
        per_agent.insert(n, c.on_agent(n, "fifty").await.len());
    }
    assert_eq!(per_agent.values().sum::<usize>(), 50, "{per_agent:?}");
}

/// The newest deployment of a workload: (id, state).
async fn deployment(c: &Cluster, w: &str) -> Option<(String, String)> {
    let v = c
        .lab
        .get(&c.master(), &format!("/api/v1/deployments?workload={w}"))
        .await?;
    let d = v.as_array()?.first()?.clone();
    Some((d["id"].as_str()?.into(), d["state"].as_str()?.into()))
}

async fn wait_deployment(c: &Cluster, w: &str, version_after: u64, state: &str) -> String {
    eventually(
        Duration::from_secs(60),
        &format!("deployment of {w} {state}"),
        || async {
            let (id, st) = deployment(c, w).await?;
            let v: u64 = id.rsplit('@').next()?.parse().ok()?;
            (v > version_after && st == state).then_some(id)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_deploys_keep_min_healthy_and_a_failing_version_rolls_back() {
    let c = cluster().await;
    let web = |v: &str, cmd: &str| {
        json!({"id": "web", "instances": 3, "strategy": "spread",
               "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", cmd]}},
               "resources": {"cpus": 0.1, "mem": 32},
               "ports": [{"name": "http", "number": 0}],
               "env": {"V": v},
               "health_checks": [{"type": "http", "port": "http", "path": "/", "grace": "2s",
                                  "interval": "300ms", "timeout": "500ms", "max_failures": 3}],
               "upgrade": {"min_healthy": 0.66, "max_over": 0.33, "deadline": "30s"},
               "kill_grace": "200ms", "restart": {"backoff": "200ms"}})
    };
    let serve = "mkdir -p www && echo v$V > www/index.html && exec /bin/busybox httpd -f -p $PORT_HTTP -h www";
    c.run(web("1", serve)).await;
    let v1 = wait_deployment(&c, "web", 0, "succeeded").await;
    let v1: u64 = v1.rsplit('@').next().unwrap().parse().unwrap();

    // A good version: never fewer than 2 of 3 ready, never more than 4 tasks.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (lab_addrs, http, watching) = (c.lab.running_addrs(), c.http.clone(), watching.clone());
        tokio::spawn(async move {
            let (mut min_ready, mut max_live) = (usize::MAX, 0);
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .get(format!("http://{}/api/v1/tasks", lab_addrs[0]))
                    .bearer_auth(TOKEN)
                    .send()
                    .await;
                if let Ok(r) = r {
                    let v: Vec<Value> = r.json().await.unwrap_or_default();
                    let web: Vec<&Value> = v.iter().filter(|t| t["workload"] == "web").collect();
                    let ready = web
                        .iter()
                        .filter(|t| t["state"] == "running" && t["healthy"] == true)
                        .count();
                    let live = web
                        .iter()
                        .filter(|t| {
                            !matches!(
                                t["state"].as_str(),
                                Some("finished" | "failed" | "killed" | "lost")
                            )
                        })
                        .count();
                    min_ready = min_ready.min(ready);
                    max_live = max_live.max(live);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (min_ready, max_live)
        })
    };
    c.run(web("2", serve)).await;
    wait_deployment(&c, "web", v1, "succeeded").await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (min_ready, max_live) = watcher.await.unwrap();
    assert!(
        min_ready >= 2,
        "dropped to {min_ready} ready during the roll-out"
    );
    assert!(
        max_live <= 4 + 1,
        "{max_live} tasks at once (max_over 1, plus one being killed)"
    );
    let live = c.running("web", 3).await;
    for t in &live {
        let port = t["ports"][0]["number"].as_u64().unwrap();
        let body = c
            .http
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body.trim(), "v2");
    }
    let v2 = c
        .lab
        .get(&c.master(), "/api/v1/workloads/web")
        .await
        .unwrap()["workload"]["version"]
        .as_u64()
        .unwrap();

    // A version that never becomes healthy: its new task is killed as unhealthy and the
    // workload goes back to version 2's spec.
    c.run(web("3", "exec sleep 600")).await;
    eventually(Duration::from_secs(60), "version 3 rolled back", || async {
        let v = c
            .lab
            .get(&c.master(), "/api/v1/deployments?workload=web")
            .await?;
        v.as_array()?
            .iter()
            .any(|d| d["state"] == "rolled_back" && d["version"].as_u64().unwrap_or(0) > v2)
            .then_some(())
    })
    .await;
    let w = c
        .lab
        .get(&c.master(), "/api/v1/workloads/web")
        .await
        .unwrap();
    assert_eq!(w["workload"]["env"]["V"], "2", "{w}");
    let failed = c
        .tasks()
        .await
        .into_iter()
        .any(|t| t["workload"] == "web" && t["env"]["V"] == "3" && t["reason"] == "unhealthy");
    assert!(failed, "the bad version's task was killed as unhealthy");
    // Service continues: three ready tasks of version 2's spec.
    eventually(
        Duration::from_secs(60),
        "3 ready after rollback",
        || async {
            let live = c.live("web").await;
            (live.len() == 3
                && live.iter().all(|t| {
                    t["state"] == "running" && t["healthy"] == true && t["env"]["V"] == "2"
                }))
            .then_some(())
        },
    )
    .await;
}
