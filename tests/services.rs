//! End to end: stateful services on one master and three real agents (processes on
//! loopback). `cairn service create --wait` deploys a 3-pod service of native `sleep` tasks
//! with a readiness check (volumes and templates: tests/service_volumes.rs); the pods keep
//! their agents through a canary update steered with interrupt/continue and a rolling update
//! that never has two pods down; a scale-down decommissions the highest index; bad input is
//! a 400 naming the field and changes nothing.
//! Needs root (native tasks run in namespaces and cgroups).

mod common;

use common::services::*;
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

fn spec(count: u32, version: &str, deploy: &str) -> String {
    format!(
        r#"name = "kv"
[[pod_types]]
name = "node"
count = {count}
deploy = {deploy}
deadline = "60s"
constraints = [["@id", "UNIQUE"]]
[[pod_types.tasks]]
name = "server"
runtime.native = {{ cmd = "/bin/sh", args = ["-c", "exec sleep 600"] }}
resources = {{ cpus = 0.1, mem = 32 }}
ports = [{{ name = "http", number = 0 }}]
env = {{ V = "{version}" }}
readiness_check = {{ type = "command", command = ["/bin/sh", "-c", "true"], grace = "100ms", interval = "300ms" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_deploys_is_steered_updated_and_scaled_down() {
    let c = service_cluster().await;
    let toml = "application/toml";

    // Bad input: 400s naming the field, nothing created.
    let bad = [
        (
            r#"{"name":"kv","pod_types":[],"bogus":1}"#.to_string(),
            "application/json",
            "bogus",
        ),
        (
            spec(3, "1", "\"serial\"").replace("count = 3", "count = -1"),
            toml,
            "pod_types[0].count",
        ),
        (spec(3, "1", "\"sideways\""), toml, "pod_types[0].deploy"),
    ];
    for (body, ct, field) in bad {
        let (status, v) = c
            .send(reqwest::Method::POST, "/api/v1/services", ct, body)
            .await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["field"].as_str().is_some_and(|f| f.contains(field)),
            "expected field {field}: {v}"
        );
    }
    assert_eq!(c.get("/api/v1/services").await, serde_json::json!([]));

    // Create with the CLI and --wait: it returns when the deploy plan is complete.
    let file = c.dir.path().join("kv.toml");
    std::fs::write(&file, spec(3, "1", "\"serial\"")).unwrap();
    let out = tokio::process::Command::new(bin())
        .args(["service", "create", "--wait", "--master", &c.master()])
        .args(["--token", TOKEN])
        .arg(&file)
        .output();
    let Ok(out) = tokio::time::timeout(Duration::from_secs(90), out).await else {
        panic!(
            "create --wait did not return: plan {:#} tasks {:#}",
            c.plan("kv", "deploy").await,
            c.get("/api/v1/tasks").await
        );
    };
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deploy = c.plan("kv", "deploy").await;
    assert_eq!(deploy["status"], "complete", "{deploy}");
    // Every step has timestamps, in order, ending complete.
    for st in deploy["phases"][0]["steps"].as_array().unwrap() {
        let hist = st["history"].as_array().unwrap();
        assert_eq!(hist.last().unwrap()["status"], "complete", "{st}");
        let ts: Vec<u64> = hist.iter().map(|h| h["at"].as_u64().unwrap()).collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]) && ts[0] > 0, "{st}");
    }
    let pods = c.pods("kv").await;
    assert_eq!(pods.len(), 3, "{pods:?}");
    assert!(pods
        .values()
        .all(|(_, st, ready)| *ready && st == &["\"running\""]));
    let agents: BTreeMap<String, String> = pods
        .iter()
        .map(|(p, (a, _, _))| (p.clone(), a.clone()))
        .collect();
    assert_eq!(
        agents
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "UNIQUE @id"
    );

    // A canary update: node-0 first, then the plan waits; interrupt, then continue.
    let (status, v) = c
        .send(
            reqwest::Method::PUT,
            "/api/v1/services/kv",
            toml,
            spec(3, "2", "{ canary = 1 }"),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let p = c.wait_plan("kv", "deploy", "waiting").await;
    let steps = &p["phases"][0]["steps"];
    assert_eq!(steps[0]["status"], "complete", "{p}");
    assert_eq!(steps[1]["status"], "waiting", "{p}");
    assert!(steps[1]["message"].as_str().unwrap().contains("continue"));
    assert_eq!(
        c.post("/api/v1/services/kv/plans/deploy/interrupt").await.0,
        200
    );
    c.wait_plan("kv", "deploy", "interrupted").await;
    assert_eq!(
        c.post("/api/v1/services/kv/plans/deploy/continue").await.0,
        200
    );
    c.wait_plan("kv", "deploy", "complete").await;

    // A rolling update: never more than one pod not ready; every pod stays on its agent.
    let (status, v) = c
        .send(
            reqwest::Method::PUT,
            "/api/v1/services/kv",
            toml,
            spec(3, "3", "\"serial\""),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let pods = c.pods("kv").await;
        let down = pods.values().filter(|(_, _, ready)| !ready).count();
        assert!(down <= 1, "two pods down at once: {pods:?}");
        if c.plan("kv", "deploy").await["status"] == "complete" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rolling update stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods = c.pods("kv").await;
    let now: BTreeMap<String, String> = pods
        .iter()
        .map(|(p, (a, _, _))| (p.clone(), a.clone()))
        .collect();
    assert_eq!(now, agents, "pods moved");
    let history = c.get("/api/v1/services/kv/history").await;
    assert_eq!(history.as_array().unwrap().len(), 3, "{history}");

    // Scale down needs allow_decommission; then node-2 goes.
    let (status, v) = c
        .send(
            reqwest::Method::PUT,
            "/api/v1/services/kv",
            toml,
            spec(2, "3", "\"serial\""),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["field"].as_str().unwrap_or("").contains("count"), "{v}");
    let (status, v) = c
        .send(
            reqwest::Method::PUT,
            "/api/v1/services/kv?allow_decommission=true",
            toml,
            spec(2, "3", "\"serial\""),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    c.wait_plan("kv", "decommission", "complete").await;
    let pods = c.pods("kv").await;
    assert_eq!(
        pods.keys().cloned().collect::<Vec<_>>(),
        ["node-0", "node-1"],
        "{pods:?}"
    );
    // The decommissioned pod's task ends on its agent.
    eventually(Duration::from_secs(30), "node-2's task killed", || async {
        let tasks = c.get("/api/v1/tasks").await;
        let live = tasks
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["id"].as_str().is_some_and(|id| id.contains(".node-2.")))
            .all(|t| t["state"] == "killed");
        live.then_some(())
    })
    .await;

    // Bad operations name the field.
    let (status, v) = c
        .post("/api/v1/services/kv/plans/deploy/restart?phase=node")
        .await;
    assert_eq!((status, v["field"].as_str()), (400, Some("step")), "{v}");
    let (status, _) = c.post("/api/v1/services/nope/pods/node-0/restart").await;
    assert_eq!(status, 404);

    // Removing it kills its tasks.
    let (status, v) = c
        .send(
            reqwest::Method::DELETE,
            "/api/v1/services/kv",
            "application/json",
            String::new(),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    eventually(Duration::from_secs(30), "all tasks ended", || async {
        let tasks = c.get("/api/v1/tasks").await;
        tasks
            .as_array()
            .into_iter()
            .flatten()
            .all(|t| ["killed", "finished", "failed"].contains(&t["state"].as_str().unwrap_or("")))
            .then_some(())
    })
    .await;
}
