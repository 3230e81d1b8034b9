//! `cairn install` against real `sshd` servers: one per host, each in its own network
//! namespace (its own address on a bridge) and UTS namespace (its own host name), with a
//! root directory of its own for what the installer writes (the hosts share this machine's
//! filesystem; each has its own `etc/machine-id` there). Apply 3 masters + 2 agents, check
//! the cluster, re-apply (no change), dry-run and apply an added agent, refuse a host whose
//! machine id is another's, upgrade the binary node by node with tasks running, reset.
//! This machine's PID 1 is not systemd, so the `direct`
//! service manager is what runs; the generated systemd units are checked with
//! `systemd-analyze verify`.

mod common;

use cairn_installer::netns;
use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Hosts {
    net: u8,
    nodes: Vec<String>,
    sshd: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.sshd {
            let _ = c.kill();
            let _ = c.wait();
        }
        cairn_installer::lab::kill_processes_mentioning(&self.dir);
        netns::teardown(self.net, &self.nodes);
    }
}

fn run(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Starts an sshd for host `n` (h1, h2, ...) at 10.<net>.0.(10+n).
fn start_host(h: &mut Hosts, n: u64) -> String {
    let node = format!("h{n}");
    let ip = format!("10.{}.0.{}", h.net, 10 + n);
    netns::add_node(h.net, &netns::ns_name(h.net, &node), &node, &ip).unwrap();
    h.nodes.push(node.clone());
    let root = h.dir.join(&node);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/machine-id"),
        format!("{:032x}\n", 0xcafe_0000u64 + n),
    )
    .unwrap();
    let cfg = h.dir.join(format!("sshd-{node}.conf"));
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress {ip}\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/userkey.pub\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile {d}/sshd-{node}.pid\n",
            d = h.dir.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", netns::ns_name(h.net, &node)))
        .args(["unshare", "--uts", "sh", "-c"])
        .arg(format!(
            "hostname {node} && exec /usr/sbin/sshd -D -f {} -E {}/sshd-{node}.log",
            cfg.display(),
            h.dir.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    h.sshd.push(child);
    ip
}

fn config(h: &Hosts, masters: &[String], agents: &[String]) -> String {
    let mut t = format!(
        "name = \"itest\"\nstate_dir = \"{d}/state\"\n[ssh]\nuser = \"root\"\nkey = \"{d}/userkey\"\n",
        d = h.dir.display()
    );
    for (i, ip) in masters.iter().chain(agents).enumerate() {
        let role = if i < masters.len() { "master" } else { "agent" };
        let n = ip.rsplit('.').next().unwrap().parse::<u64>().unwrap() - 10;
        t.push_str(&format!(
            "[[hosts]]\naddress = \"{ip}\"\nroles = [\"{role}\"]\nroot = \"{}/h{n}\"\n\
             resources = \"cpus:1;mem:512;disk:1000;ports:[33000-33100]\"\n",
            h.dir.display()
        ));
    }
    t
}

fn install(args: &[&str]) -> (bool, String) {
    let args = [&["install"], args].concat();
    run_cairn(&args, &[("XDG_CONFIG_HOME", "/nonexistent".as_ref())])
}

async fn get(http: &reqwest::Client, url: &str, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_apply_reapply_add_refuse_and_reset_over_ssh() {
    let dir = tempfile::Builder::new()
        .prefix("cairn-install-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let net = (200..=250u8)
        .rev()
        .find(|n| netns::net_free(*n))
        .expect("a free 10.x.0.0/24");
    netns::setup_bridge(net).unwrap();
    let mut h = Hosts {
        net,
        nodes: vec![],
        sshd: vec![],
        dir: dir.path().to_path_buf(),
    };
    let d = dir.path();
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            &d.join("hostkey").display().to_string(),
        ],
    );
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            &d.join("userkey").display().to_string(),
        ],
    );
    let masters: Vec<String> = (1..=3).map(|n| start_host(&mut h, n)).collect();
    let mut agents: Vec<String> = (4..=5).map(|n| start_host(&mut h, n)).collect();
    let cfg_path = d.join("cluster.toml");
    std::fs::write(&cfg_path, config(&h, &masters, &agents)).unwrap();
    let cfg = cfg_path.display().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Apply: 3 masters and 2 agents, healthy.
    let (ok, out) = install(&["apply", "--config", &cfg]);
    assert!(ok, "{out}");
    eprintln!("first apply:\n{out}");
    assert!(
        out.contains("healthy") && out.contains("direct service manager"),
        "{out}"
    );
    assert_eq!(out.matches(" installed").count(), 5, "{out}");
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap().to_string())
            .unwrap()
    };
    let (token, ca) = (field("token:"), field("CA:"));
    let url = format!("https://{}:5050", masters[0]);
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let c = get(&http, &format!("{url}/api/v1/cluster"), &token).await;
    assert_eq!(c["members"].as_array().unwrap().len(), 3, "{c}");
    let a = get(&http, &format!("{url}/api/v1/agents"), &token).await;
    assert_eq!(
        a.as_array()
            .unwrap()
            .iter()
            .filter(|a| a["status"] == "active")
            .count(),
        2,
        "{a}"
    );
    // The units written for systemd hosts pass systemd's own check.
    for (n, role) in [(1, "master"), (4, "agent")] {
        let unit = d.join(format!("h{n}/etc/systemd/system/cairn-{role}.service"));
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(text.contains("Restart=always"), "{text}");
        if role == "agent" {
            assert!(text.contains("Delegate=yes") && text.contains("KillMode=process"));
        }
        let o = Command::new("systemd-analyze")
            .args(["verify", &unit.display().to_string()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "systemd-analyze verify {}: {}",
            unit.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // Re-apply: nothing changes.
    let (ok, out) = install(&["apply", "--config", &cfg]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("unchanged").count(), 5, "{out}");

    // A host added to the file: the dry run names it alone, the apply adds it.
    agents.push(start_host(&mut h, 6));
    std::fs::write(&cfg_path, config(&h, &masters, &agents)).unwrap();
    let (ok, out) = install(&["apply", "--config", &cfg, "--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("would install") && out.matches("unchanged").count() == 5,
        "{out}"
    );
    assert!(
        !d.join("h6/usr/local/bin/cairn").exists(),
        "the dry run changed h6"
    );
    let (ok, out) = install(&["apply", "--config", &cfg]);
    assert!(ok, "{out}");
    let a = get(&http, &format!("{url}/api/v1/agents"), &token).await;
    assert_eq!(
        a.as_array()
            .unwrap()
            .iter()
            .filter(|a| a["status"] == "active")
            .count(),
        3,
        "{a}"
    );

    // Upgrade to another binary: followers, leader, then agents; tasks keep running.
    let spec = serde_json::json!({"id": "keep", "kind": "service", "instances": 2,
        "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "exec sleep 600"]}},
        "resources": {"cpus": 0.1, "mem": 16}});
    let r = http
        .post(format!("{url}/api/v1/workloads"))
        .bearer_auth(&token)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let running = |http: reqwest::Client, url: String, token: String| async move {
        let v = get(&http, &format!("{url}/api/v1/tasks?workload=keep"), &token).await;
        let mut ids: Vec<String> = v
            .as_array()?
            .iter()
            .filter(|t| t["state"] == "running")
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        (ids.len() == 2).then_some(ids)
    };
    let before = eventually(Duration::from_secs(60), "2 tasks running", || {
        running(http.clone(), url.clone(), token.clone())
    })
    .await;
    let pid = |n: u64, role: &str| {
        std::fs::read_to_string(d.join(format!("h{n}/var/lib/cairn/{role}.pid"))).unwrap()
    };
    let (m1_pid, a4_pid) = (pid(1, "master"), pid(4, "agent"));
    let c = get(&http, &format!("{url}/api/v1/cluster"), &token).await;
    let leader_ip = c["leader_addr"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let new_bin = d.join("cairn-new");
    let mut bytes = std::fs::read(bin()).unwrap();
    bytes.extend_from_slice(b"\0a different build\0");
    std::fs::write(&new_bin, &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&new_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, out) = install(&[
        "upgrade",
        "--config",
        &cfg,
        "--binary",
        &new_bin.display().to_string(),
    ]);
    assert!(ok, "{out}");
    eprintln!("upgrade:\n{out}");
    assert_eq!(out.matches("upgraded (").count(), 6, "{out}");
    // The leader goes last among the masters.
    let order: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" master "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order.len(), 3, "{out}");
    assert_eq!(
        order[2], leader_ip,
        "the leader was not upgraded last: {out}"
    );
    for n in 1..=6 {
        assert_eq!(
            std::fs::read(d.join(format!("h{n}/usr/local/bin/cairn"))).unwrap(),
            bytes,
            "h{n} runs the old binary"
        );
    }
    assert_ne!(pid(1, "master"), m1_pid, "master 1 was not restarted");
    assert_ne!(pid(4, "agent"), a4_pid, "agent 4 was not restarted");
    let after = eventually(Duration::from_secs(30), "the same 2 tasks running", || {
        running(http.clone(), url.clone(), token.clone())
    })
    .await;
    assert_eq!(before, after, "the upgrade replaced tasks");

    // A host whose machine id is another's is refused, naming it.
    std::fs::copy(d.join("h1/etc/machine-id"), d.join("h6/etc/machine-id")).unwrap();
    let (ok, out) = install(&["apply", "--config", &cfg, "--dry-run"]);
    assert!(
        !ok && out.contains("machine-id") && out.contains(&agents[2]),
        "{out}"
    );

    // Reset: nothing of Cairn is left on the hosts.
    let (ok, out) = install(&["reset", "--config", &cfg]);
    assert!(ok, "{out}");
    for n in 1..=6 {
        let r = d.join(format!("h{n}"));
        assert!(!r.join("usr/local/bin/cairn").exists(), "h{n} binary");
        assert!(!r.join("var/lib/cairn").exists(), "h{n} data");
        assert!(!r.join("etc/cairn").exists(), "h{n} config");
    }
    let left: Vec<u32> = cairn_installer::lab::pids_mentioning(d.join("h1"))
        .into_iter()
        .chain(cairn_installer::lab::pids_mentioning(d.join("h4")))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}
