//! `cairn lab` end to end, through the CLI: a TLS lab in network namespaces (agents joined
//! by token) beside a plaintext loopback one; on the first a workload, its leader cut off
//! and healed, delay, the leader killed and restarted, DNS from the agents and inside a
//! task; `lab down` leaving no process, mount, namespace, bridge or file behind.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn lab_cli(root: &Path, args: &[&str]) -> (bool, String) {
    let args = [&["lab"], args].concat();
    run_cairn(
        &args,
        &[
            ("CAIRN_LAB_DIR", root.as_os_str()),
            ("XDG_CONFIG_HOME", root.as_os_str()),
        ],
    )
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

/// A client trusting the lab's CA (`ca`), or plain for an `--insecure` lab.
fn client(ca: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).unwrap();
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

async fn get(c: &reqwest::Client, url: &str, token: &str, path: &str) -> Option<Value> {
    c.get(format!("{url}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labs_come_up_survive_a_killed_leader_and_leave_nothing_behind() {
    let root = tempfile::Builder::new()
        .prefix("cairn-labs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // Labs are taken down even when an assertion fails (their namespaces and bridge are
    // the host's, not the test's temporary directory's).
    struct Down<'a>(&'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            for name in ["one", "two"] {
                let _ = lab_cli(self.0, &["down", "--name", name]);
            }
        }
    }
    let _down = Down(root.path());
    let (ok, out) = lab_cli(root.path(), &["up", "--name", "one", "--agents", "2"]);
    assert!(ok, "{out}");
    let url = field(&out, "UI:").trim_end_matches("/ui/").to_string();
    let token = field(&out, "token:").to_string();
    let dns = field(&out, "DNS:").to_string();
    // TLS by default: its own CA, agents joined with a token the lab made.
    assert!(url.starts_with("https://"), "{out}");
    // As root, nodes are in namespaces on 10.<net>.0.0/24.
    assert!(url.starts_with("https://10."), "{out}");
    let lab_net: u8 = url["https://".len()..]
        .split('.')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let ca = field(&out, "CA:").to_string();
    let http = client(Some(&ca));
    let tokens = get(&http, &url, &token, "/api/v1/join-tokens")
        .await
        .unwrap();
    assert_eq!(tokens[0]["uses"], 2, "{tokens}");
    // Without the CA the lab's certificate is not trusted.
    assert!(get(&client(None), &url, &token, "/api/v1/cluster")
        .await
        .is_none());
    // A second lab side by side, on its own addresses, plaintext.
    let (ok, out2) = lab_cli(
        root.path(),
        &[
            "up",
            "--name",
            "two",
            "--masters",
            "1",
            "--agents",
            "1",
            "--insecure",
            "--loopback",
        ],
    );
    assert!(ok, "{out2}");
    let url2 = field(&out2, "UI:").trim_end_matches("/ui/").to_string();
    assert_ne!(url, url2);
    assert!(url2.starts_with("http://"), "{out2}");
    let token2 = field(&out2, "token:").to_string();
    let c2 = get(&client(None), &url2, &token2, "/api/v1/cluster").await;
    assert!(c2.is_some_and(|c| c["leader_id"] == 1));
    let (ok, list) = lab_cli(root.path(), &["list"]);
    assert!(ok && list.contains("one") && list.contains("two"), "{list}");
    let (ok, again) = lab_cli(root.path(), &["up", "--name", "one"]);
    assert!(!ok && again.contains("exists"), "{again}");

    // A workload on lab one.
    let spec = serde_json::json!({
        "id": "labtask", "kind": "service", "instances": 2,
        "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "exec sleep 3000"]}},
        "resources": {"cpus": 0.1, "mem": 32}
    });
    let r = http
        .post(format!("{url}/api/v1/workloads"))
        .bearer_auth(&token)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    eventually(Duration::from_secs(60), "2 tasks running", || async {
        let c = get(&http, &url, &token, "/api/v1/cluster").await?;
        (c["tasks"]["running"].as_u64() == Some(2)).then_some(())
    })
    .await;

    // As root each node has a network namespace: cut the leader off, a new one is elected
    // on the majority side; healed, the old one follows it.
    let (_, status) = lab_cli(root.path(), &["status", "--name", "one"]);
    let leader = status
        .lines()
        .find(|l| l.contains("leader") && !l.contains("no leader"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no leader in {status}"))
        .to_string();
    let (ok, out) = lab_cli(
        root.path(),
        &["chaos", "--name", "one", "partition", &leader],
    );
    assert!(ok, "{out}");
    let new_leader = eventually(
        Duration::from_secs(30),
        "a leader on the majority side",
        || async {
            let (_, s) = lab_cli(root.path(), &["status", "--name", "one"]);
            s.lines()
                .find(|l| {
                    l.contains("leader")
                        && !l.contains("no leader")
                        && !l.starts_with(&format!(" {leader} "))
                })
                .and_then(|l| l.split_whitespace().next().map(str::to_string))
        },
    )
    .await;
    assert_ne!(new_leader, leader);
    let (ok, out) = lab_cli(root.path(), &["chaos", "--name", "one", "heal", &leader]);
    assert!(ok, "{out}");
    eventually(
        Duration::from_secs(30),
        "the healed master follows",
        || async {
            let (_, s) = lab_cli(root.path(), &["status", "--name", "one"]);
            s.lines()
                .any(|l| {
                    l.split_whitespace().next() == Some(leader.as_str()) && l.contains("follower")
                })
                .then_some(())
        },
    )
    .await;
    // Latency on what a node sends, and heal removes it.
    let qdisc = || {
        let o = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                "cairn-one-a1",
                "tc",
                "qdisc",
                "show",
                "dev",
                "eth0",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (ok, out) = lab_cli(
        root.path(),
        &["chaos", "--name", "one", "--delay-ms", "50", "delay", "a1"],
    );
    // (Kernels without sch_netem, like this test machine's, get a refusal that says so.)
    if ok {
        assert!(qdisc().contains("netem"), "{}", qdisc());
    } else {
        assert!(out.contains("no netem queueing discipline"), "{out}");
    }
    let (ok, out) = lab_cli(root.path(), &["chaos", "--name", "one", "heal", "a1"]);
    assert!(ok, "{out}");
    assert!(!qdisc().contains("netem"), "{}", qdisc());

    // Kill the leader: another takes over; restarted, it rejoins.
    let (status, leader) = eventually(
        Duration::from_secs(30),
        "a leader after healing",
        || async {
            let (_, status) = lab_cli(root.path(), &["status", "--name", "one"]);
            let leader = status
                .lines()
                .find(|l| l.contains("leader") && !l.contains("no leader"))
                .and_then(|l| l.split_whitespace().next())?
                .to_string();
            Some((status, leader))
        },
    )
    .await;
    let (ok, out) = lab_cli(root.path(), &["chaos", "--name", "one", "kill", &leader]);
    assert!(ok, "{out}");
    let new_leader = eventually(Duration::from_secs(30), "a new leader", || async {
        let (_, s) = lab_cli(root.path(), &["status", "--name", "one"]);
        s.lines()
            .find(|l| {
                l.contains("leader")
                    && !l.contains("no leader")
                    && !l.starts_with(&format!(" {leader} "))
            })
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
    })
    .await;
    assert_ne!(new_leader, leader);
    let (ok, out) = lab_cli(root.path(), &["chaos", "--name", "one", "restart", &leader]);
    assert!(ok, "{out}");
    eventually(Duration::from_secs(30), "the old leader back", || async {
        let (_, s) = lab_cli(root.path(), &["status", "--name", "one"]);
        s.lines()
            .any(|l| {
                l.split_whitespace().next() == Some(leader.as_str())
                    && l.contains("running")
                    && (l.contains("follower") || l.contains("leader"))
            })
            .then_some(())
    })
    .await;
    // Every agent serves the lab's DNS: the workload's tasks are on the lab's agents.
    let dns: std::net::SocketAddr = dns.parse().unwrap();
    let agent_ips: Vec<String> = status
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("agent"))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .split(':')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(agent_ips.len(), 2, "{status}");
    let m = eventually(Duration::from_secs(10), "labtask in DNS", || async {
        let m =
            common::dns::ask_udp(dns, "labtask.cairn.", hickory_proto::rr::RecordType::A).await?;
        (!m.answers().is_empty()).then_some(m)
    })
    .await;
    for r in m.answers() {
        let ip = r.data().ip_addr().unwrap().to_string();
        assert!(agent_ips.contains(&ip), "{ip} is not an agent of the lab");
    }
    // Tasks resolve cluster names through their agent: in a namespace it serves DNS on its
    // own address, port 53, and its tasks' /etc/resolv.conf names it.
    let job = serde_json::json!({
        "id": "resolve", "kind": "job", "instances": 1,
        "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c",
            "getent hosts labtask.cairn; echo dns=$CAIRN_DNS; cat /etc/resolv.conf"]}},
        "resources": {"cpus": 0.1, "mem": 32}
    });
    let r = http
        .post(format!("{url}/api/v1/workloads"))
        .bearer_auth(&token)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let out = eventually(
        Duration::from_secs(60),
        "the resolve job's output",
        || async {
            let ts = get(&http, &url, &token, "/api/v1/tasks?workload=resolve").await?;
            let t = ts
                .as_array()?
                .iter()
                .find(|t| t["state"] == "finished")?
                .clone();
            let id = t["id"].as_str()?.to_string();
            let r = http
                .get(format!("{url}/api/v1/tasks/{id}/files?path=stdout"))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?;
            let body = r.text().await.ok()?;
            body.contains("dns=").then_some(body)
        },
    )
    .await;
    let first = out.lines().next().unwrap_or("");
    assert!(
        agent_ips
            .iter()
            .any(|ip| first.starts_with(&format!("{ip} "))),
        "labtask.cairn did not resolve to an agent inside a task: {out}"
    );
    assert!(out.contains("search cairn"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("dns=10.") && l.ends_with(":53")),
        "{out}"
    );

    let (ok, out) = lab_cli(root.path(), &["chaos", "--name", "two", "partition", "m1"]);
    assert!(!ok && out.contains("network namespace"), "{out}");

    // Down: nothing of either lab is left.
    let dir_one = root.path().join("one");
    assert!(!cairn_installer::lab::pids_mentioning(&dir_one).is_empty());
    for name in ["one", "two"] {
        let (ok, out) = lab_cli(root.path(), &["down", "--name", name]);
        assert!(ok, "{out}");
    }
    let left = cairn_installer::lab::pids_mentioning(root.path());
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(
        cairn_installer::lab::pids_mentioning("exec sleep 3000").is_empty(),
        "a task outlived its lab"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&root.path().display().to_string()));
    assert!(!dir_one.exists() && !root.path().join("two").exists());
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.contains(&format!("cairn{lab_net}-")),
        "namespaces left: {netns}"
    );
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links
            .lines()
            .any(|l| l.contains(&format!("cairnbr{lab_net}"))),
        "bridge left: {links}"
    );
    assert!(
        get(&http, &url, &token, "/api/v1/cluster").await.is_none(),
        "lab one still answers"
    );
    let (ok, out) = lab_cli(root.path(), &["down", "--name", "one"]);
    assert!(!ok && out.contains("no lab"), "{out}");
}
