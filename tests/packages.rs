//! End to end: the package catalog on one master and one real agent (processes on loopback).
//! `cairn package search|describe|render` show the bundled `redis`; bad options are refused
//! naming the option before anything starts; `cairn package install redis --set ... --wait`
//! deploys Debian's redis-server as a native task, checked with the real `redis-cli`
//! (SET/GET, the options in `CONFIG GET`); `cairn package update` rolls new options out
//! through the deploy plan; `uninstall` removes the service and stops the server; a repo
//! added from a local folder shows up in search and describe. PostgreSQL installs with
//! `initdb` and is checked with the real `psql` (replicas and failover: `package_failover.rs`); etcd forms a 3-member cluster on three agents,
//! checked with `etcdctl`.
//! Needs root (native tasks run in namespaces and cgroups) and Debian's redis-server,
//! redis-tools, postgresql-15, etcd-server and etcd-client (scripts/test.sh installs them).

mod common;

use common::packages::*;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_installs_serves_updates_and_uninstalls() {
    let (dir, lab) = master_and_agents(1, 25_000).await;
    let addr = lab.running_addrs()[0].clone();
    let http = http();
    let api = |path: &str| format!("http://{addr}{path}");

    // The catalog.
    let (ok, out, err) = cairn_cli(&addr, &["package", "search", "key-value"], MIN).await;
    assert!(
        ok && out.contains("redis") && out.contains("builtin"),
        "{out}{err}"
    );
    let (ok, out, err) = cairn_cli(&addr, &["package", "describe", "redis"], MIN).await;
    assert!(ok, "{err}");
    assert!(out.contains("persistence.appendfsync"), "{out}");
    assert!(out.contains("# redis"), "README: {out}");

    // Bad options: refused before anything starts, naming the option and the fix.
    let bad = [
        (
            json!({"cpus": 100}),
            "/cpus",
            "greater than the maximum of 64",
        ),
        (
            json!({"persistence": {"aof": "yes"}}),
            "/persistence/aof",
            "not of type",
        ),
        (json!({"mem": 64}), "/mem", "did you mean \"mem_mb\"?"),
    ];
    for (options, field, msg) in bad {
        let r = http
            .post(api("/api/v1/packages/redis/install"))
            .bearer_auth(TOKEN)
            .json(&json!({ "options": options }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["field"], field, "{v}");
        assert!(v["message"].as_str().unwrap().contains(msg), "{v}");
    }
    let (ok, _, err) = cairn_cli(
        &addr,
        &["package", "install", "redis", "--set", "cpu=1"],
        MIN,
    )
    .await;
    assert!(!ok && err.contains("did you mean \"cpus\"?"), "{err}");
    let (ok, _, err) = cairn_cli(&addr, &["package", "install", "nope"], MIN).await;
    assert!(!ok && err.contains("no package \"nope\""), "{err}");
    let r = http
        .post(api("/api/v1/packages/redis/install"))
        .bearer_auth(TOKEN)
        .json(&json!({ "options": {}, "version": "0.1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Every input is checked and size-limited.
    let big = "x".repeat(70 * 1024);
    let inputs = [
        (
            "POST",
            "/api/v1/packages/Bad_Name/render",
            json!({}),
            "name",
        ),
        (
            "POST",
            "/api/v1/packages/redis/install",
            json!({ "options": { "name": big } }),
            "options",
        ),
        (
            "POST",
            "/api/v1/packages/redis/render",
            json!({ "options": {}, "bogus": 1 }),
            "bogus",
        ),
        (
            "POST",
            "/api/v1/packages/redis/render",
            json!({ "version": "../x" }),
            "version",
        ),
        (
            "PUT",
            "/api/v1/packages/repos/builtin",
            json!({ "packages": {} }),
            "repo",
        ),
        (
            "PUT",
            "/api/v1/packages/repos/mine",
            json!({ "packages": {} }),
            "packages",
        ),
        (
            "PUT",
            "/api/v1/packages/repos/mine",
            json!({ "packages": { "x": { "run.sh": "rm -rf /" } } }),
            "packages.x",
        ),
        ("PUT", "/api/v1/packages/installed/nope", json!({}), "name"),
    ];
    for (method, path, body, field) in inputs {
        let r = http
            .request(method.parse().unwrap(), api(path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(matches!(status, 400 | 404), "{method} {path}: {status} {v}");
        assert!(
            v["field"].as_str().is_some_and(|f| f.contains(field)),
            "{method} {path}: want field {field}: {v}"
        );
    }
    for q in ["?q=".to_string() + &"a".repeat(200), "?sort=name".into()] {
        let r = http
            .get(api(&format!("/api/v1/packages{q}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
    assert_eq!(lab.get(&addr, "/api/v1/services").await, Some(json!([])));

    // A dry run.
    let set = ["--set", "name=cache", "--set", "mem_mb=128"];
    let mut args = vec!["package", "render", "redis"];
    args.extend(set);
    let (ok, out, err) = cairn_cli(&addr, &args, MIN).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("name = \"cache\"") && out.contains("maxmemory 102mb"),
        "{out}"
    );
    assert_eq!(lab.get(&addr, "/api/v1/services").await, Some(json!([])));

    // Install and wait for the deploy plan.
    let mut args = vec!["package", "install", "redis", "--wait"];
    args.extend(set);
    args.extend(["--set", "persistence.disk_mb=64"]);
    let (ok, out, err) = cairn_cli(&addr, &args, Duration::from_secs(120)).await;
    assert!(
        ok,
        "{out}{err}\nplan: {:?}\ntasks: {:?}",
        lab.get(&addr, "/api/v1/services/cache/plans/deploy").await,
        lab.get(&addr, "/api/v1/tasks").await
    );
    // It prints where the server listens.
    let port = redis_port(&lab, &addr, "cache").await;
    assert!(
        out.contains(&format!("redis-0 server redis=127.0.0.1:{port}")),
        "{out}"
    );
    let installed = lab.get(&addr, "/api/v1/packages/installed").await.unwrap();
    assert_eq!(installed[0]["service"], "cache", "{installed}");
    assert_eq!(installed[0]["package"], "redis");
    assert_eq!(installed[0]["options"]["persistence"]["disk_mb"], 64);
    assert_eq!(
        installed[0]["options"]["persistence"]["appendfsync"],
        "everysec"
    );
    let (ok, out, _) = cairn_cli(&addr, &["package", "list"], MIN).await;
    assert!(
        ok && out.contains("cache") && out.contains("7.0.15-2"),
        "{out}"
    );
    let services = lab.get(&addr, "/api/v1/services").await.unwrap();
    assert_eq!(services[0]["package"], "redis@7.0.15-2", "{services}");

    // The real client.
    assert_eq!(
        redis_cli(port, &["SET", "greeting", "hello"])
            .await
            .as_deref(),
        Some("OK")
    );
    assert_eq!(
        redis_cli(port, &["GET", "greeting"]).await.as_deref(),
        Some("hello")
    );
    assert_eq!(
        redis_cli(port, &["CONFIG", "GET", "appendonly"])
            .await
            .as_deref(),
        Some("appendonly\nyes")
    );
    assert_eq!(
        redis_cli(port, &["CONFIG", "GET", "maxmemory"])
            .await
            .as_deref(),
        Some(format!("maxmemory\n{}", 102 * 1024 * 1024).as_str())
    );

    // Installing the same name again is a conflict naming the fix.
    let (ok, _, err) = cairn_cli(
        &addr,
        &["package", "install", "redis", "--set", "name=cache"],
        MIN,
    )
    .await;
    assert!(!ok && err.contains("--set name="), "{err}");

    // Update: new options, rolled out by the deploy plan; the other options are kept.
    let args = [
        "package",
        "update",
        "cache",
        "--set",
        "maxmemory_policy=allkeys-lru",
        "--wait",
    ];
    let (ok, out, err) = cairn_cli(&addr, &args, Duration::from_secs(120)).await;
    assert!(ok, "{out}{err}");
    let installed = lab.get(&addr, "/api/v1/packages/installed").await.unwrap();
    assert_eq!(installed[0]["options"]["maxmemory_policy"], "allkeys-lru");
    assert_eq!(installed[0]["options"]["mem_mb"], 128, "{installed}");
    let policy = eventually(MIN, "the new redis-server", || async {
        let port = redis_port(&lab, &addr, "cache").await;
        let v = redis_cli(port, &["CONFIG", "GET", "maxmemory-policy"]).await?;
        v.ends_with("allkeys-lru").then_some(v)
    })
    .await;
    assert_eq!(policy, "maxmemory-policy\nallkeys-lru");
    // The data survived the restart: the append-only file is on the pod's volume.
    let port = redis_port(&lab, &addr, "cache").await;
    assert_eq!(
        redis_cli(port, &["GET", "greeting"]).await.as_deref(),
        Some("hello")
    );
    // Rollback: the previous options come back, as a new version.
    cli_ok(
        &addr,
        &["package", "rollback", "cache", "--wait"],
        Duration::from_secs(120),
    )
    .await;
    let installed = lab.get(&addr, "/api/v1/packages/installed").await.unwrap();
    assert_eq!(
        installed[0]["options"]["maxmemory_policy"], "noeviction",
        "{installed}"
    );
    eventually(MIN, "redis-server with the old options", || async {
        let port = redis_port(&lab, &addr, "cache").await;
        let v = redis_cli(port, &["CONFIG", "GET", "maxmemory-policy"]).await?;
        v.ends_with("noeviction").then_some(())
    })
    .await;
    let (ok, out, err) = cairn_cli(&addr, &["package", "history", "cache"], MIN).await;
    assert!(
        ok && out.matches("redis@7.0.15-2").count() == 3,
        "{out}{err}"
    );
    let r = http
        .put(api("/api/v1/packages/installed/cache"))
        .bearer_auth(TOKEN)
        .json(&json!({ "options": { "persistence": { "disk_mb": 32 } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["field"].as_str().unwrap_or("").ends_with("size_mb"),
        "{v}"
    );

    // Backup, more writes, restore of the latest backup: the data of the backup is back, and
    // the append-only file is on again.
    let port = redis_port(&lab, &addr, "cache").await;
    assert_eq!(
        redis_cli(port, &["SET", "k1", "before"]).await.as_deref(),
        Some("OK")
    );
    let (ok, out, err) = cairn_cli(&addr, &["service", "backup", "cache", "--wait"], MIN).await;
    assert!(ok, "{out}{err}");
    assert_eq!(
        redis_cli(port, &["SET", "k1", "after"]).await.as_deref(),
        Some("OK")
    );
    assert_eq!(
        redis_cli(port, &["SET", "k2", "new"]).await.as_deref(),
        Some("OK")
    );
    cli_ok(
        &addr,
        &["service", "restore", "cache", "--from", "latest", "--wait"],
        MIN,
    )
    .await;
    eventually(MIN, "the backup's data, with AOF on", || async {
        let port = redis_port(&lab, &addr, "cache").await;
        let k1 = redis_cli(port, &["GET", "k1"]).await?;
        let k2 = redis_cli(port, &["GET", "k2"]).await?;
        let aof = redis_cli(port, &["CONFIG", "GET", "appendonly"]).await?;
        (k1 == "before" && k2.is_empty() && aof.ends_with("yes")).then_some(())
    })
    .await;

    // Uninstall: the service goes and the server stops.
    let port = redis_port(&lab, &addr, "cache").await;
    let (ok, _, err) = cairn_cli(&addr, &["package", "uninstall", "cache"], MIN).await;
    assert!(ok, "{err}");
    assert_eq!(
        lab.get(&addr, "/api/v1/packages/installed").await,
        Some(json!([]))
    );
    eventually(MIN, "redis-server stopped", || async {
        redis_cli(port, &["PING"]).await.is_none().then_some(())
    })
    .await;
    let (ok, _, err) = cairn_cli(&addr, &["package", "uninstall", "cache"], MIN).await;
    assert!(!ok && err.contains("no service"), "{err}");

    // A repo from a local folder: a newer redis shows up in search and describe.
    let repo = dir.path().join("myrepo");
    let dst = copy_redis_package(&repo, "7.0.15-3");
    cli_ok(
        &addr,
        &["package", "repo", "add", repo.to_str().unwrap()],
        MIN,
    )
    .await;
    let found = lab.get(&addr, "/api/v1/packages?q=redis").await.unwrap();
    assert_eq!(found[0]["version"], "7.0.15-3", "{found}");
    assert_eq!(found[0]["source"], "myrepo");
    let d = lab.get(&addr, "/api/v1/packages/redis").await.unwrap();
    assert_eq!(d["versions"].as_array().map(Vec::len), Some(2), "{d}");
    // A broken package is refused naming its file.
    std::fs::write(dst.join("service.toml.j2"), "name = {{ options.name \n").unwrap();
    let (ok, _, err) = cairn_cli(
        &addr,
        &["package", "repo", "add", repo.to_str().unwrap()],
        MIN,
    )
    .await;
    assert!(!ok && err.contains("service.toml.j2: line 1"), "{err}");
    let (ok, _, err) = cairn_cli(&addr, &["package", "repo", "remove", "myrepo"], MIN).await;
    assert!(ok, "{err}");
    let found = lab.get(&addr, "/api/v1/packages?q=redis").await.unwrap();
    assert_eq!(found[0]["version"], "7.0.15-2", "{found}");
}

/// PostgreSQL alone (`replicas=0`): `initdb` on first start, the database of the `database`
/// option, rows written and read back with the real `psql`, still there after the pod is
/// restarted in place (the data directory is on the pod's volume); `cairn service backup`,
/// more rows, a restore of a missing backup refused by its check with the server untouched,
/// then `cairn service restore --from latest` bringing back the rows of the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_installs_and_serves_psql() {
    let (_dir, lab) = master_and_agents(1, 25_500).await;
    let addr = lab.running_addrs()[0].clone();
    // Two pods, one per agent, on one agent: refused before anything starts, saying why.
    let (ok, out, err) = cairn_cli(
        &addr,
        &[
            "package",
            "install",
            "postgresql",
            "--set",
            "replicas=1",
            "--set",
            "spread=true",
        ],
        MIN,
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("1 of the 2 \"postgresql\" pod(s) fit on the 1 active agent(s)")
            && err.contains("add agents"),
        "{err}"
    );
    assert_no_services(&lab, &addr).await;
    let args = [
        "package",
        "install",
        "postgresql",
        "--set",
        "database=shop",
        "--set",
        "replicas=0",
        "--wait",
    ];
    let (ok, out, err) = cairn_cli(&addr, &args, Duration::from_secs(180)).await;
    assert!(
        ok,
        "{out}{err}\nplan: {:?}",
        lab.get(&addr, "/api/v1/services/postgresql/plans/deploy")
            .await
    );
    let port = pg_port(&lab, &addr).await;
    let sql = [
        "CREATE TABLE orders (id serial PRIMARY KEY, item text)",
        "INSERT INTO orders (item) SELECT 'item-' || g FROM generate_series(1, 100) g",
    ];
    for q in sql {
        assert!(psql(port, q).await.is_some(), "{q}");
    }
    assert_eq!(
        psql(port, "SELECT count(*) FROM orders").await.as_deref(),
        Some("100")
    );
    assert_eq!(
        psql(port, "SHOW shared_buffers").await.as_deref(),
        Some("128MB")
    );

    let (ok, _, err) = cairn_cli(
        &addr,
        &["service", "pod", "restart", "postgresql", "postgresql-0"],
        MIN,
    )
    .await;
    assert!(ok, "{err}");
    let count = eventually(
        Duration::from_secs(90),
        "rows after the restart",
        || async {
            let pods = lab.get(&addr, "/api/v1/services/postgresql/pods").await?;
            let t = pods[0]["tasks"]
                .as_array()?
                .iter()
                .find(|t| t["name"] == "server")?
                .clone();
            if t["generation"].as_u64()? < 2 || t["ready"] != true {
                return None;
            }
            psql(
                t["ports"][0]["number"].as_u64()?,
                "SELECT count(*) FROM orders",
            )
            .await
        },
    )
    .await;
    assert_eq!(count, "100");

    // A backup; 50 more rows; a restore of the latest backup brings back the 100.
    cli_ok(
        &addr,
        &["service", "backup", "postgresql", "--wait"],
        Duration::from_secs(120),
    )
    .await;
    let port = pg_port(&lab, &addr).await;
    let q = "INSERT INTO orders (item) SELECT 'late-' || g FROM generate_series(1, 50) g";
    assert!(psql(port, q).await.is_some());
    assert_eq!(
        psql(port, "SELECT count(*) FROM orders").await.as_deref(),
        Some("150")
    );
    // A backup that is not there stops the plan at its check: the server is not touched.
    cli_ok(
        &addr,
        &[
            "service",
            "restore",
            "postgresql",
            "--from",
            "20000101T000000Z",
        ],
        MIN,
    )
    .await;
    eventually(MIN, "the restore check fails", || async {
        let p = lab
            .get(&addr, "/api/v1/services/postgresql/plans/restore")
            .await?;
        let m = p["phases"][0]["steps"][0]["message"].as_str()?.to_string();
        m.contains("restore-check of postgresql-0 failed")
            .then_some(())
    })
    .await;
    assert_eq!(
        psql(port, "SELECT count(*) FROM orders").await.as_deref(),
        Some("150")
    );
    let (ok, _, err) = cairn_cli(
        &addr,
        &[
            "service",
            "plan",
            "force-complete",
            "postgresql",
            "restore",
            "restore",
            "postgresql-0",
        ],
        MIN,
    )
    .await;
    assert!(ok, "{err}");
    cli_ok(
        &addr,
        &[
            "service",
            "restore",
            "postgresql",
            "--from",
            "latest",
            "--wait",
        ],
        Duration::from_secs(180),
    )
    .await;
    let port = pg_port(&lab, &addr).await;
    assert_eq!(
        psql(port, "SELECT count(*) FROM orders").await.as_deref(),
        Some("100")
    );

    let port = pg_port(&lab, &addr).await;
    let (ok, _, err) = cairn_cli(&addr, &["package", "uninstall", "postgresql"], MIN).await;
    assert!(ok, "{err}");
    eventually(MIN, "postgres stopped", || async {
        let st = tokio::process::Command::new("/usr/lib/postgresql/15/bin/pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .await
            .ok()?;
        (!st.success()).then_some(())
    })
    .await;
}

/// etcd with its defaults on three agents: one member per agent, each later member added to
/// the running ones; a key written through one member is read through another, and
/// `etcdctl member list` shows three started members; `package update --set members=5` on
/// two more agents adds two members (five started, the key still there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_three_members_form_one_cluster() {
    let (_dir, lab) = master_and_agents(3, 26_000).await;
    let addr = lab.running_addrs()[0].clone();
    let (ok, out, err) = cairn_cli(
        &addr,
        &["package", "install", "etcd", "--wait"],
        Duration::from_secs(180),
    )
    .await;
    assert!(
        ok,
        "{out}{err}\nplan: {:?}",
        lab.get(&addr, "/api/v1/services/etcd/plans/deploy").await
    );
    // `--wait` printed every member's client address.
    let clients: Vec<String> = out
        .lines()
        .filter_map(|l| {
            l.split_once(" member client=")
                .map(|(_, a)| format!("http://{a}"))
        })
        .collect();
    assert_eq!(clients.len(), 3, "{out}");
    let pods = lab.get(&addr, "/api/v1/services/etcd/pods").await.unwrap();
    let agents: std::collections::BTreeSet<String> = pods
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["agent"].to_string())
        .collect();
    assert_eq!(agents.len(), 3, "one member per agent: {pods}");
    let etcdctl = |endpoint: String, args: Vec<&'static str>| async move {
        let out = tokio::process::Command::new("/usr/bin/etcdctl")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        etcdctl(clients[0].clone(), vec!["put", "greeting", "hello"]).await,
        "OK"
    );
    assert_eq!(
        etcdctl(
            clients[2].clone(),
            vec!["get", "greeting", "--print-value-only"]
        )
        .await,
        "hello"
    );
    let members = etcdctl(clients[1].clone(), vec!["member", "list"]).await;
    assert_eq!(members.matches(", started, etcd-").count(), 3, "{members}");

    // Scale 3 → 5 on two more agents: each new member is added to the running cluster.
    let mut lab = lab;
    for n in 3..5u16 {
        let first = 26_000 + 100 * n;
        let res = format!("cpus:2;mem:1024;disk:4000;ports:[{first}-{}]", first + 99);
        lab.start_agent(&["--resources", &res, "--heartbeat-interval", "300ms"])
            .unwrap();
    }
    eventually(MIN, "5 agents", || async {
        let v = lab.get(&addr, "/api/v1/agents").await?;
        (v.as_array()?.len() == 5).then_some(())
    })
    .await;
    let (ok, out, err) = cairn_cli(
        &addr,
        &["package", "update", "etcd", "--set", "members=5", "--wait"],
        Duration::from_secs(240),
    )
    .await;
    assert!(
        ok,
        "{out}{err}\nplan: {:?}",
        lab.get(&addr, "/api/v1/services/etcd/plans/deploy").await
    );
    let members = etcdctl(clients[0].clone(), vec!["member", "list"]).await;
    assert_eq!(members.matches(", started, etcd-").count(), 5, "{members}");
    assert_eq!(
        etcdctl(
            clients[1].clone(),
            vec!["get", "greeting", "--print-value-only"]
        )
        .await,
        "hello"
    );
    let (ok, _, err) = cairn_cli(&addr, &["package", "uninstall", "etcd"], MIN).await;
    assert!(ok, "{err}");
    let first = clients[0].clone();
    eventually(MIN, "etcd stopped", || async {
        let st = tokio::process::Command::new("/usr/bin/etcdctl")
            .args([
                &format!("--endpoints={first}"),
                "--dial-timeout=300ms",
                "endpoint",
                "health",
            ])
            .output()
            .await
            .ok()?;
        (!st.status.success()).then_some(())
    })
    .await;
}

/// memcached with two nodes on two agents, checked with libmemcached's own tools: a value
/// stored (`memccp`) is read back (`memccat`); kill -9 of a node's server: it is restarted
/// in place on the same port, empty, as a cache is; uninstall stops both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_nodes_cache_and_restart_empty() {
    let (dir, lab) = master_and_agents(2, 28_200).await;
    let addr = lab.running_addrs()[0].clone();
    let args = ["memcached", "--set", "nodes=2"];
    let (_, ports) = install_ready(&lab, &addr, &args, "memcached", 2).await;
    let (p0, p1) = (ports["memcached-0"], ports["memcached-1"]);
    // Agents list the bundled packages whose binaries they have.
    let agents = lab.get(&addr, "/api/v1/agents").await.unwrap();
    let listed = agents[0]["attributes"]["cairn.packages"]
        .as_str()
        .unwrap_or("");
    assert!(listed.split(',').any(|p| p == "memcached"), "{agents}");
    assert!(memc("/usr/bin/memcping", p0, &[]).await.is_some());
    let file = dir.path().join("greeting");
    std::fs::write(&file, "hello from cairn").unwrap();
    let f = file.to_str().unwrap();
    assert!(memc("/usr/bin/memccp", p1, &[f]).await.is_some());
    assert_eq!(
        memc("/usr/bin/memccat", p1, &["greeting"]).await.as_deref(),
        Some("hello from cairn")
    );

    // kill -9 of node 1's server: restarted in place, same port, empty.
    let pids = cairn_installer::lab::pids_mentioning(format!("-p\0{p1}\0"));
    let pid = pids
        .iter()
        .copied()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "memcached")
        })
        .expect("the memcached process");
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    eventually(MIN, "node 1 restarted", || async {
        let pods = lab.get(&addr, "/api/v1/services/memcached/pods").await?;
        let t = pods[1]["tasks"][0].clone();
        (t["generation"].as_u64()? >= 2 && t["ready"] == true).then_some(())
    })
    .await;
    let (_, ports) = topology(&lab, &addr, "memcached").await.unwrap();
    assert_eq!(ports["memcached-1"], p1, "the same port after a restart");
    assert!(memc("/usr/bin/memcping", p1, &[]).await.is_some());
    assert_eq!(memc("/usr/bin/memccat", p1, &["greeting"]).await, None);

    let (ok, _, err) = cairn_cli(&addr, &["package", "uninstall", "memcached"], MIN).await;
    assert!(ok, "{err}");
    eventually(MIN, "both nodes stopped", || async {
        (memc("/usr/bin/memcping", p0, &[]).await.is_none()
            && memc("/usr/bin/memcping", p1, &[]).await.is_none())
        .then_some(())
    })
    .await;
}

/// An agent that lacks a package's binaries (here it says it has only redis's) does not get
/// its pods: installing postgresql is refused before anything starts, naming the binaries and
/// the Debian packages to install; redis installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_no_agent_can_run_is_refused_naming_what_to_install() {
    let (_dir, mut lab) = master_and_agents(0, 28_800).await;
    let addr = lab.running_addrs()[0].clone();
    lab.start_agent(&[
        "--resources",
        "cpus:2;mem:1024;disk:4000;ports:[28800-28899]",
        "--attributes",
        "cairn.packages:redis",
    ])
    .unwrap();
    eventually(MIN, "the agent", || async {
        let v = lab.get(&addr, "/api/v1/agents").await?;
        (v.as_array()?.len() == 1).then_some(())
    })
    .await;
    let (ok, out, err) = cairn_cli(&addr, &["package", "install", "postgresql"], MIN).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("no agent can run package postgresql: none of the 1 active agent(s) has /usr/lib/postgresql/15/bin/postgres")
            && err.contains("apt-get install postgresql-15"),
        "{err}"
    );
    assert_no_services(&lab, &addr).await;
    cli_ok(
        &addr,
        &["package", "install", "redis", "--wait"],
        Duration::from_secs(120),
    )
    .await;
}
