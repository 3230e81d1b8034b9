//! mTLS end to end with real processes: a CA and master certificates made with `cairn ca`,
//! three masters whose Raft traffic is mutual TLS, an agent that joins with a token (checking
//! the CA by its hash) and runs a task whose log the masters read from it over mTLS; and every
//! refusal the design promises: plaintext, no certificate, another CA's certificate, an
//! agent's certificate on the Raft port or speaking for another agent, and revoked, expired,
//! used-up or other-cluster tokens.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn cairn(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env_remove("CAIRN_TOKEN")
        .env_remove("CAIRN_MASTER")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .expect("run cairn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (ok, out, err) = cairn(args);
    assert!(ok, "cairn {args:?}: {out}{err}");
    out
}

fn spawn(args: &[String], log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    Command::new(bin())
        .args(args)
        .env_remove("CAIRN_TOKEN")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap()
}

/// A client trusting `ca_dir`'s CA, presenting the certificate of `cert_dir` if given.
fn client(ca_dir: &Path, cert_dir: Option<&Path>) -> reqwest::Client {
    let pem = std::fs::read(ca_dir.join("ca.crt")).unwrap();
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some(d) = cert_dir {
        let mut id = std::fs::read(d.join("node.crt")).unwrap();
        id.extend(std::fs::read(d.join("node.key")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&id).unwrap());
    }
    b.build().unwrap()
}

/// GET with the cluster token, as JSON; `None` on any failure.
async fn get_json(c: &reqwest::Client, url: String) -> Option<Value> {
    c.get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_join_tokens_and_every_refusal() {
    let dir = tempfile::Builder::new()
        .prefix("cairn-tls-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = |s: &str| -> PathBuf { dir.path().join(s) };
    let s = |p: &PathBuf| p.display().to_string();
    ok(&["ca", "init", "--dir", &s(&d("ca")), "--name", "test"]);
    // A second `ca init` into the same place refuses to overwrite the CA.
    let (again, _, err) = cairn(&["ca", "init", "--dir", &s(&d("ca"))]);
    assert!(!again && err.contains("already holds a CA"), "{err}");
    ok(&["ca", "init", "--dir", &s(&d("other-ca"))]);
    ok(&[
        "ca",
        "issue",
        "--ca-dir",
        &s(&d("ca")),
        "--role",
        "admin",
        "--name",
        "ops",
        "--out",
        &s(&d("admin")),
    ]);
    ok(&[
        "ca",
        "issue",
        "--ca-dir",
        &s(&d("other-ca")),
        "--role",
        "master",
        "--name",
        "1",
        "--address",
        "127.0.0.1",
        "--out",
        &s(&d("stranger")),
    ]);
    let hash = ok(&["ca", "hash", "--dir", &s(&d("ca"))])
        .trim()
        .to_string();
    assert_eq!(hash.len(), 64);

    // Three masters, each with its certificate (and the CA key, to sign joins).
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| {
            (
                cairn_installer::lab::free_port(),
                cairn_installer::lab::free_port(),
            )
        })
        .collect();
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, (a, p))| format!("{}@127.0.0.1:{a}/127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Kill(vec![]);
    for (i, (api, peer)) in ports.iter().enumerate() {
        let m = d(&format!("m{}", i + 1));
        ok(&[
            "ca",
            "issue",
            "--ca-dir",
            &s(&d("ca")),
            "--role",
            "master",
            "--name",
            &(i + 1).to_string(),
            "--address",
            "127.0.0.1",
            "--out",
            &s(&m.join("tls")),
        ]);
        let args: Vec<String> = [
            "master",
            "--node-id",
            &(i + 1).to_string(),
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--peer-listen",
            &format!("127.0.0.1:{peer}"),
            "--peers",
            &peers,
            "--data-dir",
            &s(&m),
            "--token",
            TOKEN,
            "--peer-token",
            "peer-secret-0123456789",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        procs.0.push(spawn(&args, &d(&format!("m{}.log", i + 1))));
    }
    let api = |i: usize| format!("https://127.0.0.1:{}", ports[i].0);
    let peer = |i: usize| format!("https://127.0.0.1:{}", ports[i].1);
    let user = client(&d("ca"), None);
    let leader = eventually(
        Duration::from_secs(60),
        "a leader over mTLS Raft",
        || async {
            let v = get_json(&user, format!("{}/api/v1/cluster", api(0))).await?;
            v["leader_id"].as_u64()
        },
    )
    .await;
    assert!((1..=3).contains(&leader));

    // A token from the CLI (trusting the CA through CAIRN_CA), then an agent that joins with
    // it and no cluster token.
    let cli = |args: &[&str]| -> (bool, String, String) {
        let out = Command::new(bin())
            .args(args)
            .args(["--master", &format!("127.0.0.1:{}", ports[0].0)])
            .env("CAIRN_TOKEN", TOKEN)
            .env("CAIRN_CA", d("ca").join("ca.crt"))
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (good, out, err) = cli(&["token", "create", "--ttl", "1h", "--max-uses", "1"]);
    assert!(good, "{out}{err}");
    let token = out.trim().to_string();
    assert!(token.starts_with(&format!("K10{hash}::")), "{token}");
    let masters = ports
        .iter()
        .map(|(a, _)| format!("127.0.0.1:{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let aport = cairn_installer::lab::free_port();
    let agent_args = |data: &str, port: u16, token: &str| -> Vec<String> {
        [
            "agent",
            "--masters",
            &masters,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data,
            "--join",
            token,
            "--resources",
            "cpus:2;mem:1024;disk:1000;ports:[42000-42100]",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    procs.0.push(spawn(
        &agent_args(&s(&d("a1")), aport, &token),
        &d("a1.log"),
    ));
    let agent_id = eventually(
        Duration::from_secs(30),
        "the joined agent active",
        || async {
            let v = get_json(&user, format!("{}/api/v1/agents", api(0))).await?;
            let a = v.as_array()?.first()?;
            (a["status"] == "active").then(|| a["id"].as_str().unwrap().to_string())
        },
    )
    .await;
    let a1_tls = d("a1").join("tls");
    assert!(a1_tls.join("node.crt").exists() && !a1_tls.join("ca.key").exists());
    let list = get_json(&user, format!("{}/api/v1/join-tokens", api(1)))
        .await
        .unwrap();
    assert_eq!(list[0]["uses"], 1, "{list}");
    assert_eq!(list[0]["nodes"][0], json!(agent_id));
    assert!(!list
        .to_string()
        .contains(token.split('.').next_back().unwrap()));

    // A task on the joined agent; its log read through a master (master -> agent mTLS).
    let spec = json!({"id": "hello", "kind": "service", "instances": 1,
        "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "echo over-mtls; exec sleep 600"]}},
        "resources": {"cpus": 0.1, "mem": 32}});
    let r = user
        .post(format!("{}/api/v1/workloads", api(0)))
        .bearer_auth(TOKEN)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let task = eventually(Duration::from_secs(60), "the task running", || async {
        let v = get_json(&user, format!("{}/api/v1/tasks?workload=hello", api(0))).await?;
        let t = v.as_array()?.first()?.clone();
        (t["state"] == "running").then(|| t["id"].as_str().unwrap().to_string())
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the log through a master",
        || async {
            let r = user
                .get(format!("{}/api/v1/tasks/{task}/files?path=stdout", api(2)))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?;
            let body = r.text().await.ok()?;
            body.contains("over-mtls").then_some(())
        },
    )
    .await;

    // Refusals. Plaintext to TLS ports gets no answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for url in [
        format!("http://127.0.0.1:{}/api/v1/cluster", ports[0].0),
        format!("http://127.0.0.1:{}/raft/vote", ports[0].1),
        format!("http://127.0.0.1:{aport}/api/v1/agent"),
    ] {
        let r = plain.get(&url).bearer_auth(TOKEN).send().await;
        assert!(r.is_err() || !r.unwrap().status().is_success(), "{url}");
    }
    // No client certificate: refused on the Raft port and the agent, fine on the API.
    // (Refused in the handshake, before any request is read: an error, not a 401.)
    assert!(user
        .get(format!("{}/raft/vote", peer(0)))
        .send()
        .await
        .is_err());
    let agent_url = format!("https://127.0.0.1:{aport}/api/v1/agent");
    assert!(user
        .get(&agent_url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .is_err());
    // Another CA's certificate (and server) is refused both ways.
    let stranger = client(&d("other-ca"), Some(&d("stranger")));
    assert!(stranger
        .get(format!("{}/api/v1/cluster", api(0)))
        .send()
        .await
        .is_err());
    let stranger_trusting_us = {
        let pem = std::fs::read(d("ca").join("ca.crt")).unwrap();
        let mut id = std::fs::read(d("stranger").join("node.crt")).unwrap();
        id.extend(std::fs::read(d("stranger").join("node.key")).unwrap());
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .identity(reqwest::Identity::from_pem(&id).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    for url in [
        format!("{}/api/v1/cluster", api(0)),
        format!("{}/raft/vote", peer(0)),
        agent_url.clone(),
    ] {
        assert!(
            stranger_trusting_us
                .get(&url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .is_err(),
            "a foreign CA's certificate was let in at {url}"
        );
    }
    // The admin certificate reads the agent's API; an agent's certificate is no Raft peer.
    let admin = client(&d("ca"), Some(&d("admin")));
    let r = admin.get(&agent_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let as_agent = client(&d("ca"), Some(&a1_tls));
    assert!(as_agent
        .post(format!("{}/raft/vote", peer(0)))
        .send()
        .await
        .is_err());
    assert!(as_agent.get(&agent_url).send().await.is_err());
    // An agent's certificate speaks only for that agent, and only its reporting routes.
    let r = as_agent
        .get(format!("{}/api/v1/workloads", api(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = as_agent
        .get(format!("{}/api/v1/agents/someone-else/assignments", api(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = as_agent
        .post(format!("{}/api/v1/agents", api(0)))
        .json(&cairn_kernel::model::AgentRegistration {
            id: "someone-else".into(),
            hostname: "x".into(),
            addr: "127.0.0.1:1".into(),
            resources: Default::default(),
            attributes: Default::default(),
            version: "test".into(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "{}", r.text().await.unwrap());
    let r = as_agent
        .get(format!(
            "{}/api/v1/agents/{agent_id}/volumes?stale=true",
            api(0)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Tokens: used up, revoked, expired, another cluster's, garbage.
    let join = |token: String| {
        let user = user.clone();
        let url = format!("{}/api/v1/join", api(1));
        async move {
            let (csr, _key) = cairn_installer::pki::make_csr("n").unwrap();
            let r = user
                .post(url)
                .json(&json!({"token": token, "name": "n2", "csr": csr}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, body) = join(token.clone()).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("limit"), "{body}");
    let (_, t2, _) = cli(&["token", "create"]);
    let t2 = t2.trim().to_string();
    let id2 = t2.split("::").nth(1).unwrap().split('.').next().unwrap();
    let (good, _, err) = cli(&["token", "revoke", id2]);
    assert!(good, "{err}");
    let (code, body) = join(t2).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let (_, t3, _) = cli(&["token", "create", "--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, body) = join(t3.trim().to_string()).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("expired"), "{body}");
    let (code, body) = join("K10abc::x.y".into()).await;
    assert_eq!(code, 401, "{body}");
    let (_, listed, _) = cli(&["token", "list"]);
    assert!(listed.contains("revoked"), "{listed}");
    // A token whose CA hash is another cluster's: the agent refuses to join, sends nothing.
    let other_hash = ok(&["ca", "hash", "--dir", &s(&d("other-ca"))])
        .trim()
        .to_string();
    let (_, t4, _) = cli(&["token", "create"]);
    let forged = t4.trim().replace(&hash, &other_hash);
    let out = Command::new(bin())
        .args(agent_args(
            &s(&d("a2")),
            cairn_installer::lab::free_port(),
            &forged,
        ))
        .env_remove("CAIRN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("CA hash"), "{err}");
    assert!(!d("a2").join("tls").join("node.crt").exists());
    let list = get_json(&user, format!("{}/api/v1/join-tokens", api(0)))
        .await
        .unwrap();
    let id4 = t4
        .trim()
        .split("::")
        .nth(1)
        .unwrap()
        .split('.')
        .next()
        .unwrap();
    let t4rec = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id4)
        .unwrap();
    assert_eq!(t4rec["uses"], 0, "a refused join spent the token: {t4rec}");
    // A fourth master joins with a master token: no certificate, CA key or peer credential
    // beforehand; it gets them, asks to be added, and the cluster has four voters.
    let (good, mt, err) = cli(&["token", "create", "--role", "master", "--max-uses", "1"]);
    assert!(good, "{err}");
    let (a4, p4) = (
        cairn_installer::lab::free_port(),
        cairn_installer::lab::free_port(),
    );
    let m4 = d("m4");
    let args: Vec<String> = [
        "master",
        "--node-id",
        "4",
        "--listen",
        &format!("127.0.0.1:{a4}"),
        "--peer-listen",
        &format!("127.0.0.1:{p4}"),
        "--data-dir",
        &s(&m4),
        "--token",
        TOKEN,
        "--join-token",
        mt.trim(),
        "--join-via",
        &format!("127.0.0.1:{}", ports[0].0),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    procs.0.push(spawn(&args, &d("m4.log")));
    let v = eventually(Duration::from_secs(60), "master 4 a voter", || async {
        let v = get_json(&user, format!("https://127.0.0.1:{a4}/api/v1/cluster")).await?;
        (v["members"].as_array()?.len() == 4 && v["leader_id"].as_u64().is_some()).then_some(v)
    })
    .await;
    assert!(
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == 4),
        "{v}"
    );
    assert!(m4.join("tls/ca.key").exists() && m4.join("peer-token").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(m4.join("peer-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // An agent token does not make a master.
    let (_, at, _) = cli(&["token", "create"]);
    let (started, _, err) = cairn(&[
        "master",
        "--node-id",
        "5",
        "--data-dir",
        &s(&d("m5")),
        "--token",
        TOKEN,
        "--join-token",
        at.trim(),
        "--join-via",
        &format!("127.0.0.1:{}", ports[0].0),
    ]);
    assert!(!started && err.contains("agent token"), "{err}");

    // A master without certificate and without --insecure does not start; with it, it warns.
    let (started, _, err) = cairn(&[
        "master",
        "--node-id",
        "1",
        "--data-dir",
        &s(&d("bare")),
        "--token",
        TOKEN,
        "--peer-token",
        "peer-secret-0123456789",
        "--peers",
        "1@127.0.0.1:1",
    ]);
    assert!(!started && err.contains("--insecure"), "{err}");
}
