//! End to end: persistent volumes, config templates and `$VAR` expansion of stateful
//! services, on one master and three real agents (processes on loopback).
//!
//! A 3-pod service whose pods each have a volume written by a Wasm `once` task and by a
//! native task: the data survives a task kill (restarted in place, the `once` task not run
//! again) and an agent kill -9 + restart; config templates see every pod and the service's
//! options, land in the sandbox or in the volume, and follow an options update; a template
//! that does not render stops the deploy in `error` naming the file and line, and
//! `service rollback` returns to the previous spec with the data intact. A volume quota kills
//! its task with `volume_limit`; removing a service destroys exactly its volumes on the
//! agents (and `--keep-volumes` keeps them, orphaned).
//! Needs root (native tasks run in namespaces and cgroups).

mod common;

use common::services::*;
use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const SPEC: &str = r#"name = "vol"
options = { greeting = "GREETING" }
[[pod_types]]
name = "node"
count = 3
deadline = "150s"
constraints = [["@id", "UNIQUE"]]
volumes = [{ name = "data", path = "data", size_mb = 16 }]
[[pod_types.tasks]]
name = "init"
goal = "once"
runtime.wasm = { file = "WASM", args = ["wasm-once", "data/log"] }
[[pod_types.tasks]]
name = "server"
runtime.native = { cmd = "/bin/sh", args = ["-c", "echo start $$0 >> data/log; cp conf/peers.txt data/peers; exec sleep 600", "$CAIRN_POD"] }
resources = { cpus = 0.1, mem = 32 }
ports = [{ name = "http", number = 0 }]
readiness_check = { type = "command", command = ["/bin/sh", "-c", "true"], grace = "100ms", interval = "300ms" }
templates = [
  { path = "conf/peers.txt", template = "{% for p in pods %}{{ p.name }} {{ p.host or 'pending' }}\n{% endfor %}greeting={{ options.greeting }}EXTRA\n" },
  { path = "data/conf/server.conf", template = "pod={{ pod.name }} index={{ pod.index }} port={{ ports.http }}\n" },
]
[[pod_types.tasks]]
name = "backup"
goal = "finish"
runtime.native = { cmd = "/bin/sh", args = ["-c", "echo backup >> data/backups"] }
[[plans]]
name = "backup"
phases = [{ name = "all", pod_type = "node", strategy = "parallel", tasks = ["backup"] }]
"#;

fn spec(greeting: &str, extra: &str) -> String {
    let wasm = guests_dir().join("wasm32-wasip1/release/volwrite.wasm");
    SPEC.replace("WASM", &wasm.display().to_string())
        .replace("GREETING", greeting)
        .replace("EXTRA", extra)
}

/// The host directory of a volume, on whichever agent holds it.
fn volume_dir(c: &Cluster, id: &str) -> Option<PathBuf> {
    std::fs::read_dir(c.dir.path())
        .ok()?
        .flatten()
        .map(|e| e.path().join("volumes").join(id))
        .find(|p| p.is_dir())
}

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// Pod id → its volume's id.
async fn volume_ids(c: &Cluster, svc: &str) -> Vec<(String, String)> {
    let v = c.get(&format!("/api/v1/services/{svc}/pods")).await;
    v.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or("").to_string(),
                p["volumes"][0]["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn put(c: &Cluster, body: String) -> (u16, Value) {
    c.send(
        reqwest::Method::PUT,
        "/api/v1/services/vol",
        "application/toml",
        body,
    )
    .await
}

async fn task_of(c: &Cluster, svc: &str, pod: &str, task: &str) -> Value {
    let tasks = c.get("/api/v1/tasks").await;
    let prefix = format!("{svc}.{pod}.{task}.");
    tasks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["id"].as_str().is_some_and(|id| id.starts_with(&prefix)))
        .max_by_key(|t| t["created_at"].as_u64())
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_keep_data_templates_render_and_quotas_hold() {
    let c = service_cluster().await;

    // A template that does not compile is a 400 naming it; nothing is created.
    let (status, v) = c
        .send(
            reqwest::Method::POST,
            "/api/v1/services",
            "application/toml",
            spec("hello", "{% for %}"),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["field"], "pod_types[0].tasks[1].templates[0].template",
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("line 2"), "{v}");
    let good = spec("hello", "");
    let bad = [
        (
            good.replace("path = \"data\", size_mb", "path = \"../data\", size_mb"),
            "pod_types[0].volumes[0].path",
        ),
        (
            good.replace("path = \"data\", size_mb", "path = \"/etc\", size_mb"),
            "pod_types[0].volumes[0].path",
        ),
        (
            good.replace("size_mb = 16", "size_mb = -1"),
            "pod_types[0].volumes[0].size_mb",
        ),
        (
            good.replace("name = \"node\"\ncount", "name = \"node\"\nbogus = 1\ncount"),
            "pod_types[0].bogus",
        ),
        (
            format!("{good}[[plans]]\nname = \"restore\"\nphases = [{{ name = \"b\", pod_type = \"nope\", tasks = [\"server\"] }}]\n"),
            "plans[1].phases[0].pod_type",
        ),
    ];
    for (body, field) in bad {
        let (status, v) = c
            .send(
                reqwest::Method::POST,
                "/api/v1/services",
                "application/toml",
                body,
            )
            .await;
        assert_eq!((status, v["field"].as_str()), (400, Some(field)), "{v}");
    }
    assert_eq!(c.get("/api/v1/services").await, serde_json::json!([]));

    // Create and wait for the deploy.
    let file = c.dir.path().join("vol.toml");
    std::fs::write(&file, spec("hello", "")).unwrap();
    let out = c
        .cli(&["service", "create", "--wait", file.to_str().unwrap()])
        .await;
    assert!(
        out.status.success(),
        "{}\nplan: {:#}",
        String::from_utf8_lossy(&out.stderr),
        c.plan("vol", "deploy").await
    );
    let vols = volume_ids(&c, "vol").await;
    assert_eq!(vols.len(), 3, "{vols:?}");
    let mut dirs = Vec::new();
    for (pod, id) in &vols {
        let dir = eventually(Duration::from_secs(30), "the volume's data", || async {
            let d = volume_dir(&c, id)?;
            read(&d, "peers").contains("greeting=hello").then_some(d)
        })
        .await;
        let log = read(&dir, "log");
        // The Wasm `once` task wrote through its preopened volume, then the native task, whose
        // `$CAIRN_POD` argument the agent expanded (sh would print it literally as $0).
        assert_eq!(log, format!("wasm-once\nstart {pod}\n"), "{pod}");
        let peers = read(&dir, "peers");
        assert!(peers.contains(&format!("{pod} 127.0.0.1\n")), "{peers}");
        assert_eq!(peers.lines().count(), 4, "{peers}");
        let port = task_of(&c, "vol", pod, "server").await["ports"][0]["number"].clone();
        let index = pod.trim_start_matches("node-");
        assert_eq!(
            read(&dir, "conf/server.conf"),
            format!("pod={pod} index={index} port={port}\n")
        );
        dirs.push(dir);
    }
    // Reserved volumes are visible on their agents.
    let agent = task_of(&c, "vol", "node-0", "server").await["agent"]
        .as_str()
        .unwrap()
        .to_string();
    let a = c.get(&format!("/api/v1/agents/{agent}")).await;
    assert_eq!(a["volumes"][0]["id"], vols[0].1.as_str(), "{a}");
    assert_eq!(a["volumes"][0]["status"], "reserved", "{a}");

    // A killed task restarts in place with its data; the `once` task does not run again.
    let t = task_of(&c, "vol", "node-1", "server").await;
    let (status, v) = c
        .post(&format!("/api/v1/tasks/{}/kill", t["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 202, "{v}");
    eventually(
        Duration::from_secs(60),
        "node-1 restarted in place",
        || async {
            let log = read(&dirs[1], "log");
            (log == "wasm-once\nstart node-1\nstart node-1\n").then_some(())
        },
    )
    .await;

    // kill -9 of node-2's agent and a restart: the pod stays there with its data.
    let pods_before = c.pods("vol").await;
    let agent2 = task_of(&c, "vol", "node-2", "server").await["agent"].clone();
    let n = (0..3)
        .find(|n| {
            std::fs::read_dir(c.dir.path().join(format!("agent-{n}/volumes")))
                .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name() == vols[2].1.as_str())))
        })
        .expect("node-2's agent");
    let mut c = c;
    c.lab.kill_agent(n);
    c.lab.restart_agent(n).unwrap();
    eventually(Duration::from_secs(60), "node-2 ready again", || async {
        let pods = c.pods("vol").await;
        pods.get("node-2").is_some_and(|p| p.2).then_some(())
    })
    .await;
    assert_eq!(
        task_of(&c, "vol", "node-2", "server").await["agent"],
        agent2
    );
    assert_eq!(c.pods("vol").await["node-2"].0, pods_before["node-2"].0);
    assert!(read(&dirs[2], "log").starts_with("wasm-once\nstart node-2\n"));

    // New options re-render every pod's templates (now every pod's host is known).
    let (status, v) = put(&c, spec("bye", "")).await;
    assert_eq!(status, 200, "{v}");
    c.wait_plan("vol", "deploy", "complete").await;
    eventually(Duration::from_secs(30), "templates re-rendered", || async {
        dirs.iter()
            .all(|d| {
                let p = read(d, "peers");
                p.contains("greeting=bye") && !p.contains("pending")
            })
            .then_some(())
    })
    .await;

    // A template that fails to render (an undefined variable) stops the deploy in `error`
    // naming the file and line; rollback returns to the previous spec, data intact.
    let (status, v) = put(&c, spec("bye", "{{ nope }}")).await;
    assert_eq!(status, 200, "{v}");
    let p = c.wait_plan("vol", "deploy", "error").await;
    let msg = p["phases"][0]["steps"][0]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("template \"conf/peers.txt\" line 2") && msg.contains("undefined"),
        "{p}"
    );
    let out = c.cli(&["service", "rollback", "vol", "--wait"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history = c.get("/api/v1/services/vol/history").await;
    let specs: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["spec"])
        .collect();
    assert_eq!(specs.len(), 4, "{history}");
    assert_eq!(
        specs[3], specs[1],
        "the rollback is the options update's spec again"
    );
    for (i, d) in dirs.iter().enumerate() {
        let log = read(d, "log");
        assert!(
            log.starts_with(&format!("wasm-once\nstart node-{i}\n")),
            "{log}"
        );
        assert!(read(d, "peers").contains("greeting=bye"));
    }

    // A declared plan: `backup` runs its `finish` task once in every pod (it also runs once
    // per deploy, as `finish` tasks do).
    let before: Vec<usize> = dirs
        .iter()
        .map(|d| read(d, "backups").lines().count())
        .collect();
    assert!(before.iter().all(|&n| n >= 1), "{before:?}");
    let out = c.cli(&["service", "plan", "start", "vol", "backup"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_plan("vol", "backup", "complete").await;
    let after: Vec<usize> = dirs
        .iter()
        .map(|d| read(d, "backups").lines().count())
        .collect();
    assert_eq!(after, before.iter().map(|n| n + 1).collect::<Vec<_>>());

    // Scale down: `decommission` takes node-2 (the highest index) and destroys exactly its
    // volume on its agent.
    let (status, v) = c
        .send(
            reqwest::Method::PUT,
            "/api/v1/services/vol?allow_decommission=true",
            "application/toml",
            spec("bye", "").replace("count = 3", "count = 2"),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    c.wait_plan("vol", "decommission", "complete").await;
    eventually(
        Duration::from_secs(30),
        "node-2's volume destroyed",
        || async { volume_dir(&c, &vols[2].1).is_none().then_some(()) },
    )
    .await;
    assert!(dirs[0].is_dir() && dirs[1].is_dir(), "other volumes kept");
    assert_eq!(volume_ids(&c, "vol").await.len(), 2);

    // A volume quota: writing 3 MiB into a 1 MiB volume kills the task with volume_limit.
    let fill = r#"name = "fill"
[[pod_types]]
name = "node"
volumes = [{ name = "data", path = "data", size_mb = 1 }]
tasks = [{ name = "writer", runtime.native = { cmd = "/bin/sh", args = ["-c", "head -c 3000000 /dev/zero > data/blob; exec sleep 600"] } }]
"#;
    c.create_service(fill).await;
    eventually(
        Duration::from_secs(60),
        "writer killed for its quota",
        || async {
            let tasks = c.get("/api/v1/tasks").await;
            tasks
                .as_array()?
                .iter()
                .find(|t| {
                    t["id"].as_str().is_some_and(|i| i.starts_with("fill."))
                        && t["reason"] == "volume_limit"
                })
                .map(|_| ())
        },
    )
    .await;

    // `cairn ps` says how many ended tasks it hides; `--all` shows them with their reasons.
    let out = c.cli(&["ps"]).await;
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ended tasks hidden") && err.contains("--all"),
        "{err}"
    );
    let out = c.cli(&["ps", "--all"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("volume_limit"));

    // Removing a service destroys exactly its volumes; --keep-volumes keeps them orphaned.
    let fill_vol = volume_ids(&c, "fill").await[0].1.clone();
    let out = c.cli(&["service", "rm", "fill", "--keep-volumes"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&["service", "rm", "vol"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        Duration::from_secs(60),
        "vol's volumes destroyed",
        || async {
            let gone = vols.iter().all(|(_, id)| volume_dir(&c, id).is_none());
            let agents = c.get("/api/v1/agents").await;
            let mut listed = Vec::new();
            for a in agents.as_array()? {
                let d = c
                    .get(&format!("/api/v1/agents/{}", a["id"].as_str()?))
                    .await;
                listed.extend(d["volumes"].as_array()?.iter().cloned());
            }
            (gone && listed.len() == 1).then_some(listed)
        },
    )
    .await;
    let a = c.get("/api/v1/agents").await;
    let mut orphan = Value::Null;
    for a in a.as_array().unwrap() {
        let d = c
            .get(&format!("/api/v1/agents/{}", a["id"].as_str().unwrap()))
            .await;
        if let Some(v) = d["volumes"].as_array().and_then(|v| v.first()) {
            orphan = v.clone();
        }
    }
    assert_eq!(orphan["id"], fill_vol.as_str(), "{orphan}");
    assert_eq!(orphan["status"], "orphaned", "{orphan}");
    assert!(volume_dir(&c, &fill_vol).is_some(), "kept on disk");
    // A volume a pod owns cannot be deleted alone; the orphan can, and its data goes.
    let out = c.cli(&["service", "volume-rm", "nope"]).await;
    assert!(!out.status.success());
    let out = c.cli(&["service", "volume-rm", &fill_vol]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(30), "the orphan destroyed", || async {
        let all = c.get("/api/v1/volumes").await;
        (volume_dir(&c, &fill_vol).is_none() && all == serde_json::json!([])).then_some(())
    })
    .await;
}

const REPLACED: &str = r#"name = "rep"
[[pod_types]]
name = "node"
count = 2
deadline = "60s"
replace_after = "2s"
constraints = [["@id", "UNIQUE"]]
volumes = [{ name = "data", path = "data", size_mb = 8 }]
[[pod_types.tasks]]
name = "server"
runtime.native = { cmd = "/bin/sh", args = ["-c", "echo $CAIRN_POD >> data/log; exec sleep 600"] }
resources = { cpus = 0.1, mem = 32 }
readiness_check = { type = "command", command = ["/bin/sh", "-c", "true"], grace = "100ms", interval = "300ms" }
"#;

/// Running `rep.node-1.*` tasks on each reachable agent, asked of the agents themselves.
async fn running_node1(c: &Cluster, http: &reqwest::Client) -> usize {
    let mut n = 0;
    let mut seen = Vec::new();
    for i in 0..3 {
        let url = format!("http://{}/api/v1/tasks", c.lab.agent_addr(i));
        let Ok(r) = http.get(url).bearer_auth(TOKEN).send().await else {
            continue;
        };
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let here: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                t["id"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("rep.node-1."))
                    && t["state"] == "running"
            })
            .map(|t| format!("{} on agent {i}", t["id"]))
            .collect();
        n += here.len();
        seen.extend(here);
    }
    if n > 1 {
        eprintln!("two node-1 tasks running: {seen:?}");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_on_a_lost_agent_is_replaced_and_its_old_volume_destroyed_when_it_returns() {
    let mut c = service_cluster_on(25_000).await;
    c.create_service(REPLACED).await;
    c.wait_plan("rep", "deploy", "complete").await;
    let old_agent = task_of(&c, "rep", "node-1", "server").await["agent"]
        .as_str()
        .unwrap()
        .to_string();
    let n = c.agent_index(&old_agent).await;
    let old_vol = volume_ids(&c, "rep").await[1].1.clone();
    let old_dir = eventually(Duration::from_secs(30), "node-1's data", || async {
        let d = volume_dir(&c, &old_vol)?;
        (read(&d, "log") == "node-1\n").then_some(d)
    })
    .await;

    // The host of node-1 crashes (agent and tasks); after replace_after the pod moves to the
    // free agent with a fresh volume. Never two node-1 tasks run, as the agents say.
    let http = http();
    let mut most = running_node1(&c, &http).await;
    assert_eq!(most, 1);
    c.lab.crash_agent(n);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let new_vol = loop {
        most = most.max(running_node1(&c, &http).await);
        let pods = c.pods("rep").await;
        let vols = volume_ids(&c, "rep").await;
        if let (Some(p), Some((_, vol))) = (pods.get("node-1"), vols.get(1)) {
            if p.2 && !p.0.contains(&old_agent) && *vol != old_vol {
                break vol.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 not replaced: {pods:?} {:#}",
            c.plan("rep", "recovery").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new_dir = eventually(Duration::from_secs(30), "the fresh volume", || async {
        let d = volume_dir(&c, &new_vol)?;
        (read(&d, "log") == "node-1\n").then_some(d)
    })
    .await;
    assert_ne!(new_dir, old_dir);

    // The host comes back: its stale node-1 stays dead and its old volume is destroyed.
    c.lab.restart_agent(n).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while old_dir.exists() {
        most = most.max(running_node1(&c, &http).await);
        assert!(
            std::time::Instant::now() < deadline,
            "old volume kept: {:#}",
            c.get(&format!("/api/v1/agents/{old_agent}")).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(Duration::from_secs(30), "old reservation gone", || async {
        let a = c.get(&format!("/api/v1/agents/{old_agent}")).await;
        (a["volumes"] == serde_json::json!([])).then_some(())
    })
    .await;
    assert_eq!(running_node1(&c, &http).await, 1);
    assert_eq!(most, 1, "two node-1 tasks ran at once");
    assert_eq!(read(&new_dir, "log"), "node-1\n");
}

/// `examples/web-cluster.toml` deploys as documented: each pod serves the page its template
/// rendered, from its volume, on the port `${PORT_HTTP}` expanded to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_service_deploys_with_the_cli() {
    let c = service_cluster_on(26_000).await;
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/web-cluster.toml");
    let out = c
        .cli(&["service", "create", "--wait", file.to_str().unwrap()])
        .await;
    assert!(
        out.status.success(),
        "{}\n{:#}",
        String::from_utf8_lossy(&out.stderr),
        c.plan("web", "deploy").await
    );
    let http = http();
    for i in 0..3 {
        let pod = format!("web-{i}");
        let t = task_of(&c, "web", &pod, "httpd").await;
        let port = t["ports"][0]["number"].as_u64().unwrap();
        let page = http
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("<h1>Hello from Cairn</h1>"), "{page}");
        assert!(
            page.contains(&format!("This is {pod} (index {i})")),
            "{page}"
        );
        let created = http
            .get(format!("http://127.0.0.1:{port}/created"))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 200);
    }
}
