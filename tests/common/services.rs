//! A cluster for the stateful-service tests: one master and three real agents on loopback,
//! each with its own port range, and the API calls those tests make.

use super::*;
use cairn_installer::lab::Lab;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub lab: Lab,
    pub http: reqwest::Client,
}

/// One master, three agents (cpus 2, mem 1024, disk 1000 each).
pub async fn service_cluster() -> Cluster {
    service_cluster_on(24_000).await
}

/// One master, three agents whose port ranges start at `port_base` (100 ports each), so
/// clusters of tests running side by side never hand out the same port.
pub async fn service_cluster_on(port_base: u16) -> Cluster {
    service_cluster_with(1, port_base).await
}

/// `masters` masters and three agents whose port ranges start at `port_base`.
pub async fn service_cluster_with(masters: u64, port_base: u16) -> Cluster {
    // One master: agents lost fast (replace tests). Several: room for an election, so a
    // leader change does not make healthy agents unreachable.
    let timeout = if masters == 1 { "1500ms" } else { "6s" };
    let (dir, mut lab) = lab(
        masters,
        &["--agent-timeout", timeout, "--request-timeout", "5s"],
    );
    lab.wait_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    for n in 0..3u16 {
        let res = format!(
            "cpus:2;mem:1024;disk:1000;ports:[{}-{}]",
            port_base + 100 * n,
            port_base + 100 * n + 99
        );
        lab.start_agent(&["--resources", &res, "--heartbeat-interval", "300ms"])
            .unwrap();
    }
    let c = Cluster {
        dir,
        lab,
        http: http(),
    };
    eventually(Duration::from_secs(30), "3 agents", || async {
        let v = c.get("/api/v1/agents").await;
        (v.as_array().map_or(0, |a| a.len()) == 3).then_some(())
    })
    .await;
    c
}

impl Cluster {
    pub fn master(&self) -> String {
        self.lab.running_addrs()[0].clone()
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        ct: &str,
        body: String,
    ) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("http://{}{path}", self.master()))
            .bearer_auth(TOKEN)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates a stateful service from a TOML spec; fails the test unless it is a 201.
    pub async fn create_service(&self, toml: &str) {
        let (status, v) = self
            .send(
                reqwest::Method::POST,
                "/api/v1/services",
                "application/toml",
                toml.to_string(),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            path,
            "application/json",
            String::new(),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Value {
        self.lab
            .get(&self.master(), path)
            .await
            .unwrap_or(Value::Null)
    }

    pub async fn plan(&self, svc: &str, plan: &str) -> Value {
        self.get(&format!("/api/v1/services/{svc}/plans/{plan}"))
            .await
    }

    pub async fn wait_plan(&self, svc: &str, plan: &str, status: &str) -> Value {
        eventually(
            Duration::from_secs(180),
            &format!("plan {plan} of {svc} {status}"),
            || async {
                let p = self.plan(svc, plan).await;
                (p["status"] == status).then_some(p)
            },
        )
        .await
    }

    /// Waits until every pod of `svc` has all its tasks ready; on timeout the panic shows the
    /// pods, the agents and the service's plans.
    pub async fn wait_all_ready(&self, svc: &str, timeout: Duration, what: &str) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pods = self.pods(svc).await;
            if !pods.is_empty() && pods.values().all(|p| p.2) {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\npods: {:#}\nagents: {:#}\nplans: {:#}",
                    self.get(&format!("/api/v1/services/{svc}/pods")).await,
                    self.get("/api/v1/agents").await,
                    self.get(&format!("/api/v1/services/{svc}/plans")).await,
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pod id → (agent, states of its tasks, ready).
    pub async fn pods(&self, svc: &str) -> BTreeMap<String, (String, Vec<String>, bool)> {
        let v = self.get(&format!("/api/v1/services/{svc}/pods")).await;
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let tasks = p["tasks"].as_array().cloned().unwrap_or_default();
                let states = tasks.iter().map(|t| t["state"].to_string()).collect();
                let ready = !tasks.is_empty() && tasks.iter().all(|t| t["ready"] == true);
                (
                    p["id"].as_str().unwrap_or("").to_string(),
                    (p["agent"].to_string(), states, ready),
                )
            })
            .collect()
    }

    /// The lab index of the agent with id `id`.
    pub async fn agent_index(&self, id: &str) -> usize {
        let a = self.get(&format!("/api/v1/agents/{id}")).await;
        let addr = a["addr"].as_str().unwrap_or_default().to_string();
        (0..3)
            .find(|&n| self.lab.agent_addr(n) == addr)
            .unwrap_or_else(|| panic!("no lab agent at {addr}: {a}"))
    }

    /// Runs the `cairn` CLI against the master; fails the test if it does not return in time.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        let out = tokio::process::Command::new(bin())
            .args(args)
            .args(["--master", &self.master(), "--token", TOKEN])
            .output();
        match tokio::time::timeout(Duration::from_secs(200), out).await {
            Ok(o) => o.expect("run cairn"),
            Err(_) => panic!("cairn {args:?} did not return"),
        }
    }
}
