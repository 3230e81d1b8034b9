//! End-to-end: agents register, heartbeat to the leader, are committed unreachable when they
//! go silent and active when they return, and ride through leader changes on their own.

mod common;

use common::*;
use std::time::Duration;

async fn agent_info(addr: &str) -> Option<serde_json::Value> {
    let r = http()
        .get(format!("http://{addr}/api/v1/agent"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    r.status().is_success().then_some(())?;
    r.json().await.ok()
}

async fn agent_status(lab: &cairn_installer::lab::Lab, id: &str) -> Option<String> {
    let addr = lab.running_addrs().into_iter().next()?;
    let v = lab.get(&addr, &format!("/api/v1/agents/{id}")).await?;
    Some(v["status"].as_str()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_goes_unreachable_and_back_and_survives_leader_change() {
    let (_d, mut lab) = lab(3, &["--agent-timeout", "2s", "--request-timeout", "3s"]);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    let n = lab
        .start_agent(&[
            "--heartbeat-interval",
            "200ms",
            "--resources",
            "cpus:2;mem:2048;disk:10000;ports:[31000-32000];cpus(prod):1",
            "--attributes",
            "rack:r1;zone:a",
        ])
        .unwrap();
    let agent_addr = lab.agents[n].addr.clone();
    let info = eventually(Duration::from_secs(20), "agent registers", || async {
        let i = agent_info(&agent_addr).await?;
        (i["registered"].as_bool() == Some(true)).then_some(i)
    })
    .await;
    let id = info["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(10), "agent listed active", || async {
        (agent_status(&lab, &id).await.as_deref() == Some("active")).then_some(())
    })
    .await;
    // Registration carried the Mesos-syntax resources and attributes.
    let a = lab
        .get(&lab.running_addrs()[0], &format!("/api/v1/agents/{id}"))
        .await
        .unwrap();
    assert_eq!(a["resources"]["unreserved"]["cpus"], 2.0);
    assert_eq!(a["resources"]["reserved"]["prod"]["cpus"], 1.0);
    assert_eq!(a["attributes"]["zone"], "a");

    // Kill the leader: the agent follows the new leader without restarting and stays active.
    let pid_before = lab.agents[n].child.as_ref().unwrap().id();
    let leader = lab.wait_leader(Duration::from_secs(10)).await.unwrap();
    lab.kill(leader);
    let new_leader = lab
        .wait_leader(Duration::from_secs(20))
        .await
        .expect("new leader");
    assert_ne!(new_leader, leader);
    eventually(
        Duration::from_secs(20),
        "agent heartbeats reach the new leader",
        || async {
            let i = agent_info(&agent_addr).await?;
            (i["leader_id"].as_u64() == Some(new_leader)).then_some(())
        },
    )
    .await;
    // Past the agent timeout on the new leader, it is still active: heartbeats flow.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent_status(&lab, &id).await.as_deref(), Some("active"));
    assert_eq!(
        lab.agents[n].child.as_ref().unwrap().id(),
        pid_before,
        "agent process was not restarted"
    );
    lab.restart(leader).unwrap();

    // Silence the agent: committed unreachable after the timeout.
    lab.kill_agent(n);
    eventually(
        Duration::from_secs(20),
        "agent marked unreachable",
        || async {
            (agent_status(&lab, &id).await.as_deref() == Some("unreachable")).then_some(())
        },
    )
    .await;
    // Bring it back: same id, active again.
    lab.restart_agent(n).unwrap();
    eventually(Duration::from_secs(20), "agent active again", || async {
        (agent_status(&lab, &id).await.as_deref() == Some("active")).then_some(())
    })
    .await;
    let info = agent_info(&agent_addr).await.unwrap();
    assert_eq!(
        info["id"].as_str(),
        Some(id.as_str()),
        "agent id is stable across restarts"
    );

    // A blocking query on agents wakes on the next agent change.
    let addr = lab.running_addrs()[0].clone();
    let r = http()
        .get(format!("http://{addr}/api/v1/agents"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let index: u64 = r.headers()["x-cairn-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let waiter = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = http()
                .get(format!(
                    "http://{addr}/api/v1/agents?index={index}&wait=60s"
                ))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let new_index: u64 = r.headers()["x-cairn-index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            (new_index, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.kill_agent(n);
    let (new_index, waited) = waiter.await.unwrap();
    assert!(
        new_index > index,
        "blocking query returned without a change"
    );
    assert!(
        waited < Duration::from_secs(60),
        "blocking query returned at the change, not the wait limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_mode_runs_a_master_and_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let port = cairn_installer::lab::free_port();
    let aport = cairn_installer::lab::free_port();
    let dport = cairn_installer::lab::free_port();
    let mut child = std::process::Command::new(bin())
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--agent-listen",
            &format!("127.0.0.1:{aport}"),
            "--dns-listen",
            &format!("127.0.0.1:{dport}"),
            "--dns-upstream",
            "none",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("CAIRN_TOKEN")
        .env("XDG_CONFIG_HOME", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `cairn dev` prints the URL, a generated token and the CLI context it saved. Its stdout
    // is drained to the end on a thread, so it never writes into a closed pipe.
    use std::io::BufRead;
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut token = None;
    let mut url = None;
    let mut context = false;
    let mut dns = None;
    let mut ca = None;
    let mut printed = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        printed.push_str(&line);
        printed.push('\n');
        if let Some(d) = line.trim().strip_prefix("DNS:") {
            dns = d.split_whitespace().next().map(str::to_string);
        }
        if let Some(t) = line.trim().strip_prefix("token:") {
            token = Some(t.trim().to_string());
        }
        if let Some(c) = line.trim().strip_prefix("CA:") {
            ca = c.split_whitespace().next().map(str::to_string);
        }
        if let Some(u) = line.trim().strip_prefix("API:") {
            url = Some(u.trim().to_string());
        }
        context |= line.trim().starts_with("context:");
        if token.is_some() && url.is_some() && context {
            break;
        }
    }
    let (token, url) = (token.expect("token printed"), url.expect("url printed"));
    // TLS by default: the API is https, with the CA it made printed and put in the context.
    assert_eq!(url, format!("https://127.0.0.1:{port}/api/v1/cluster"));
    let ca = ca.expect("CA printed");
    let pem = std::fs::read(&ca).unwrap();
    let http = || {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    // Plaintext to the TLS port gets no API answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/v1/cluster"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "{plain:?}"
    );
    assert_eq!(
        dns,
        Some(format!("127.0.0.1:{dport}")),
        "cairn dev prints its DNS"
    );
    let agents = eventually(Duration::from_secs(20), "dev agent registered", || {
        let token = token.clone();
        async move {
            let r = http()
                .get(format!("https://127.0.0.1:{port}/api/v1/agents"))
                .bearer_auth(token)
                .send()
                .await
                .ok()?;
            let v: Vec<serde_json::Value> = r.json().await.ok()?;
            (v.len() == 1 && v[0]["status"] == "active").then_some(v)
        }
    })
    .await;
    assert!(
        agents[0]["resources"]["unreserved"]["mem"]
            .as_u64()
            .unwrap()
            > 0,
        "resources detected from the host"
    );
    // `cairn dev` made itself the CLI's context: no address or token needed.
    let out = std::process::Command::new(bin())
        .args(["agent", "list"])
        .env_remove("CAIRN_TOKEN")
        .env_remove("CAIRN_MASTER")
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("active"),
        "{}{}\ncairn dev printed:\n{printed}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI reads the same cluster.
    let out = std::process::Command::new(bin())
        .args(["agent", "list", "--master", &format!("127.0.0.1:{port}")])
        .env("CAIRN_TOKEN", &token)
        .env("CAIRN_CA", &ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("active") && table.contains(agents[0]["id"].as_str().unwrap()),
        "{table}"
    );
    let out = std::process::Command::new(bin())
        .args([
            "cluster",
            "status",
            "--json",
            "--master",
            &format!("127.0.0.1:{port}"),
        ])
        .env("CAIRN_TOKEN", &token)
        .env("CAIRN_CA", &ca)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["leader_id"], 1);
    let _ = child.kill();
    let _ = child.wait();
}

/// An agent the masters marked unreachable without it noticing (stopped with SIGSTOP past
/// the agent timeout, then continued): its tasks, marked unreachable with it, are reported
/// running again once it is back (the heartbeat's status epoch), not left unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_an_agent_marked_unreachable_come_back_running() {
    use common::services::*;
    let c = service_cluster_on(29_700).await;
    let spec = r#"name = "held"
[[pod_types]]
name = "node"
[[pod_types.tasks]]
name = "server"
runtime.native = { cmd = "/bin/sleep", args = ["600"] }
resources = { cpus = 0.1, mem = 32 }
"#;
    c.create_service(spec).await;
    c.wait_plan("held", "deploy", "complete").await;
    let pods = c.pods("held").await;
    let agent = pods["node-0"].0.trim_matches('"').to_string();
    let n = c.agent_index(&agent).await;
    let pid = c.lab.agent_pid(n).expect("agent runs").to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
    };
    assert!(signal("-STOP").success());
    eventually(Duration::from_secs(30), "task unreachable", || async {
        let p = c.pods("held").await;
        p["node-0"]
            .1
            .iter()
            .any(|s| s.contains("unreachable"))
            .then_some(())
    })
    .await;
    assert!(signal("-CONT").success());
    eventually(Duration::from_secs(30), "task running again", || async {
        let p = c.pods("held").await;
        (p["node-0"].1 == ["\"running\""] && p["node-0"].2).then_some(())
    })
    .await;
}
