//! The built-in DNS end to end: one master and three real agents on their own loopback
//! addresses (127.0.0.2-4), each serving DNS from its local copy of the masters' table; a
//! 3-instance native workload with a named port is found by A and SRV queries over UDP and
//! TCP, a killed task leaves the answers within 2 s, garbage does not stop the server, names
//! outside the zone are forwarded to an upstream (a fake resolver here) or refused.

mod common;

use common::dns::{ask_udp, query};
use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// One query over TCP (two-byte length prefix).
async fn ask_tcp(server: SocketAddr, name: &str, qt: RecordType) -> Option<Message> {
    let mut s = TcpStream::connect(server).await.ok()?;
    let q = query(name, qt).to_vec().unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    Message::from_vec(&buf).ok()
}

fn addrs(m: &Message) -> BTreeSet<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| r.data().ip_addr())
        .collect()
}

/// (port, target) of each SRV answer.
fn srvs(m: &Message) -> BTreeSet<(u16, String)> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(s) => Some((s.port(), s.target().to_ascii())),
            _ => None,
        })
        .collect()
}

/// A stand-in upstream resolver: answers every question with A 192.0.2.7.
async fn fake_upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_recursion_desired(q.recursion_desired())
                .set_recursion_available(true);
            r.add_queries(q.queries().iter().cloned());
            if let Some(question) = q.queries().first() {
                r.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, 7)),
                ));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

async fn tasks_of(lab: &cairn_installer::lab::Lab, workload: &str) -> Vec<Value> {
    let addr = lab.running_addrs()[0].clone();
    lab.get(&addr, &format!("/api/v1/tasks?workload={workload}"))
        .await
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Starts three agents on 127.0.0.{first}..+2, each serving DNS on its own address (with
/// the given `--dns-upstream`), ports from `port_base` (100 each); returns their DNS
/// addresses.
fn start_dns_agents(
    lab: &mut cairn_installer::lab::Lab,
    first: u8,
    port_base: u16,
    upstream: [String; 3],
) -> Vec<SocketAddr> {
    let mut dns = Vec::new();
    for (n, up) in upstream.iter().enumerate() {
        let ip = format!("127.0.0.{}", first + n as u8);
        let listen = format!("{ip}:{}", cairn_installer::lab::free_port());
        let lo = port_base + 100 * n as u16;
        let res = format!("cpus:2;mem:1024;disk:4000;ports:[{lo}-{}]", lo + 99);
        lab.start_agent_on(
            &ip,
            &[
                "--resources",
                &res,
                "--heartbeat-interval",
                "300ms",
                "--dns-listen",
                &listen,
                "--dns-upstream",
                up,
            ],
        )
        .unwrap();
        dns.push(listen.parse().unwrap());
    }
    dns
}

/// Polls the SRV answer of `_http._tcp.web.cairn.` until it is exactly the (port, agent) of
/// the workload's running tasks (`n` of them, if given), and fails if that takes more than 2 s from `since`.
async fn follows_running_tasks(
    lab: &cairn_installer::lab::Lab,
    master: &str,
    server: SocketAddr,
    n: Option<usize>,
    since: Instant,
) -> BTreeSet<(u16, String)> {
    loop {
        let running: BTreeSet<(u16, String)> = tasks_of(lab, "web")
            .await
            .iter()
            .filter(|t| t["state"] == "running")
            .map(|t| {
                (
                    t["ports"][0]["number"].as_u64().unwrap() as u16,
                    format!("{}.agents.cairn.", t["agent"].as_str().unwrap()),
                )
            })
            .collect();
        if let Some(m) = ask_udp(server, "_http._tcp.web.cairn.", RecordType::SRV).await {
            if n.is_none_or(|n| running.len() == n) && srvs(&m) == running {
                println!("the answer followed the tasks after {:?}", since.elapsed());
                return running;
            }
        }
        if since.elapsed() > Duration::from_secs(2) {
            let table = lab.get(master, "/api/v1/dns?stale=true").await;
            panic!(
                "after 2 s the SRV answer is not the running tasks {running:?}; the \
                 master's table: {table:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_answer_dns_for_workloads_and_follow_a_killed_task() {
    let master_dns: SocketAddr = format!("127.0.0.1:{}", cairn_installer::lab::free_port())
        .parse()
        .unwrap();
    let md = master_dns.to_string();
    let (_dir, mut lab) = lab(
        1,
        &[
            "--agent-timeout",
            "1500ms",
            "--request-timeout",
            "5s",
            "--dns-listen",
            &md,
            "--dns-upstream",
            "none",
        ],
    );
    if lab.wait_leader(Duration::from_secs(30)).await.is_none() {
        // (Seen once in a full run, not reproduced: the master's log says why.)
        panic!("no leader: {}", lab_diagnostics(&lab, 40).await);
    }
    let upstream = fake_upstream().await;
    let dns = start_dns_agents(
        &mut lab,
        2,
        29_000,
        ["none".into(), upstream.to_string(), "none".into()],
    );
    let master = lab.running_addrs()[0].clone();
    let agents: Vec<Value> = eventually(Duration::from_secs(30), "3 agents", || async {
        let v = lab.get(&master, "/api/v1/agents").await?;
        let a = v.as_array()?.clone();
        (a.len() == 3).then_some(a)
    })
    .await;
    let hosts: BTreeSet<IpAddr> = (2..=4).map(|i| IpAddr::from([127, 0, 0, i])).collect();

    // The masters, the leader and the agents, from an agent and from the master.
    let loopback = BTreeSet::from([IpAddr::from([127, 0, 0, 1])]);
    for server in [dns[0], master_dns] {
        let m = eventually(Duration::from_secs(10), "agents.cairn", || async {
            let m = ask_udp(server, "agents.cairn.", RecordType::A).await?;
            (addrs(&m) == hosts).then_some(m)
        })
        .await;
        assert!(m.authoritative());
        let m = ask_udp(server, "leader.cairn.", RecordType::A)
            .await
            .unwrap();
        assert_eq!(addrs(&m), loopback, "{m}");
    }

    // A 3-instance workload with a named port, one task per agent.
    let spec = json!({
        "id": "web", "instances": 3,
        "runtime": {"native": {"cmd": "/bin/sleep", "args": ["600"]}},
        "resources": {"cpus": 0.1, "mem": 16, "disk": 0},
        "ports": [{"name": "http", "number": 0}],
        "constraints": [["@id", "UNIQUE"]],
        "kill_grace": "200ms"
    });
    let r = http()
        .post(format!("http://{master}/api/v1/workloads"))
        .bearer_auth(TOKEN)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let tasks = eventually(Duration::from_secs(30), "3 tasks running", || async {
        let t = tasks_of(&lab, "web").await;
        (t.iter().filter(|t| t["state"] == "running").count() == 3).then_some(t)
    })
    .await;
    let ip_of = |agent: &str| -> IpAddr {
        let a = agents.iter().find(|a| a["id"] == agent).unwrap();
        let addr: SocketAddr = a["addr"].as_str().unwrap().parse().unwrap();
        addr.ip()
    };
    let pair = |t: &Value| -> (u16, String) {
        (
            t["ports"][0]["number"].as_u64().unwrap() as u16,
            format!("{}.agents.cairn.", t["agent"].as_str().unwrap()),
        )
    };
    let want_srv: BTreeSet<(u16, String)> = tasks.iter().map(pair).collect();

    // A: the three hosts; SRV: three ports, each target's A in the additional section.
    let m = eventually(Duration::from_secs(5), "A web.cairn", || async {
        let m = ask_udp(dns[0], "web.cairn.", RecordType::A).await?;
        (addrs(&m) == hosts).then_some(m)
    })
    .await;
    assert!(m.answers().iter().all(|r| r.ttl() == 1), "{m}");
    let m = eventually(
        Duration::from_secs(5),
        "SRV _http._tcp.web.cairn",
        || async {
            let m = ask_udp(dns[2], "_http._tcp.web.cairn.", RecordType::SRV).await?;
            (srvs(&m) == want_srv).then_some(m)
        },
    )
    .await;
    for t in &tasks {
        let target = pair(t).1;
        let extra: Vec<IpAddr> = m
            .additionals()
            .iter()
            .filter(|r| r.name().to_ascii() == target)
            .filter_map(|r| r.data().ip_addr())
            .collect();
        assert_eq!(extra, vec![ip_of(t["agent"].as_str().unwrap())], "{m}");
    }
    // Case does not matter (each agent has its own copy of the table: wait for this one's).
    eventually(
        Duration::from_secs(5),
        "SRV _HTTP._tcp.Web.CAIRN",
        || async {
            let m = ask_udp(dns[1], "_HTTP._tcp.Web.CAIRN.", RecordType::SRV).await?;
            (srvs(&m) == want_srv).then_some(())
        },
    )
    .await;

    // Over TCP.
    let m = ask_tcp(dns[0], "_http._tcp.web.cairn.", RecordType::SRV)
        .await
        .expect("tcp answer");
    assert_eq!(srvs(&m), want_srv);

    // Kill one task: within 2 s the SRV answer is exactly the running tasks again. (Its
    // replacement may start at once on the same agent and port, so the answer may go
    // straight back to the same three records: see the scale-down below for a task that
    // leaves for good.)
    let victim = tasks[1].clone();
    let r = http()
        .post(format!(
            "http://{master}/api/v1/tasks/{}/kill",
            victim["id"].as_str().unwrap()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let killed = Instant::now();
    follows_running_tasks(&lab, &master, dns[2], None, killed).await;

    // Scale down to 2: the task the controller kills leaves the answer within 2 s, for good.
    let r = http()
        .post(format!("http://{master}/api/v1/workloads/web/scale"))
        .bearer_auth(TOKEN)
        .json(&json!({"instances": 2}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let scaled = Instant::now();
    follows_running_tasks(&lab, &master, dns[0], Some(2), scaled).await;

    // Garbage is dropped or answered FORMERR; the server answers the next query.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        vec![0xde, 0xad, 0xbe, 0xef],
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0xff, 0xff, 0, 0, 0, 0, 0x3f, b'x',
        ],
        vec![0u8; 3000],
    ] {
        sock.send_to(&junk, dns[0]).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    if let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await
    {
        let m = Message::from_vec(&buf[..n]).expect("a reply to garbage decodes");
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        assert_eq!(m.id(), 0x1234);
    }
    let m = ask_udp(dns[0], "web.cairn.", RecordType::A)
        .await
        .expect("answers after garbage");
    assert_eq!(m.response_code(), ResponseCode::NoError);

    // Names that do not exist, and names outside the zone: forwarded or refused.
    let m = ask_udp(dns[0], "nope.cairn.", RecordType::A).await.unwrap();
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    let m = ask_udp(dns[0], "example.org.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.response_code(), ResponseCode::Refused);
    let m = ask_udp(dns[1], "example.org.", RecordType::A)
        .await
        .expect("forwarded");
    assert_eq!(addrs(&m), BTreeSet::from([IpAddr::from([192, 0, 2, 7])]));
    assert_eq!(m.response_code(), ResponseCode::NoError);
}

const KV: &str = r#"
name = "kv"
endpoints = { primary = "node-1" }
[[pod_types]]
name = "node"
count = 2
constraints = [["@id", "UNIQUE"]]
[[pod_types.tasks]]
name = "server"
runtime.native = { cmd = "/bin/sleep", args = ["600"] }
resources = { cpus = 0.1, mem = 16 }
ports = [{ name = "client", number = 0 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stateful_pods_keep_their_names_across_restarts() {
    let (_dir, mut lab) = lab(1, &["--agent-timeout", "1500ms", "--request-timeout", "5s"]);
    lab.wait_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    let dns = start_dns_agents(
        &mut lab,
        5,
        29_400,
        ["none".into(), "none".into(), "none".into()],
    );
    let master = lab.running_addrs()[0].clone();
    eventually(Duration::from_secs(30), "3 agents", || async {
        let v = lab.get(&master, "/api/v1/agents").await?;
        (v.as_array()?.len() == 3).then_some(())
    })
    .await;
    let r = http()
        .post(format!("http://{master}/api/v1/services"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/toml")
        .body(KV)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let deployed = || async {
        let p = lab.get(&master, "/api/v1/services/kv/plans/deploy").await?;
        (p["status"] == "complete").then_some(())
    };
    eventually(Duration::from_secs(60), "kv deployed", deployed).await;
    let pods = lab.get(&master, "/api/v1/services/kv/pods").await.unwrap();
    let host_of = |pod: &str| -> IpAddr {
        let p = pods
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == pod)
            .unwrap();
        let agent = p["agent"].as_str().unwrap().to_string();
        IpAddr::from([127, 0, 0, 5 + agent_n(&lab, &agent)])
    };
    let (h0, h1) = (host_of("node-0"), host_of("node-1"));
    assert_ne!(h0, h1);

    // Each pod by name, the service by its ready pods, SRV per pod and per service.
    let m = eventually(Duration::from_secs(5), "node-0.kv.cairn", || async {
        let m = ask_udp(dns[2], "node-0.kv.cairn.", RecordType::A).await?;
        (!m.answers().is_empty()).then_some(m)
    })
    .await;
    assert_eq!(addrs(&m), BTreeSet::from([h0]));
    let m = eventually(Duration::from_secs(5), "kv.cairn", || async {
        let m = ask_udp(dns[0], "kv.cairn.", RecordType::A).await?;
        (addrs(&m).len() == 2).then_some(m)
    })
    .await;
    assert_eq!(addrs(&m), BTreeSet::from([h0, h1]));
    let m = ask_udp(dns[1], "_client._tcp.kv.cairn.", RecordType::SRV)
        .await
        .unwrap();
    let targets: BTreeSet<String> = srvs(&m).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        targets,
        BTreeSet::from([
            "node-0.kv.cairn.".to_string(),
            "node-1.kv.cairn.".to_string()
        ])
    );
    let m = ask_udp(dns[1], "_client._tcp.node-1.kv.cairn.", RecordType::SRV)
        .await
        .unwrap();
    assert_eq!(srvs(&m).len(), 1, "{m}");

    // Restart node-0 in place: its name keeps pointing at the same host throughout.
    let generation = |pods: &Value| -> Option<u64> {
        let p = pods.as_array()?.iter().find(|p| p["id"] == "node-0")?;
        p["tasks"][0]["generation"].as_u64()
    };
    let before = generation(&pods).expect("node-0's task generation");
    let r = http()
        .post(format!(
            "http://{master}/api/v1/services/kv/pods/node-0/restart"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let restarted = || async {
        let pods = lab.get(&master, "/api/v1/services/kv/pods").await?;
        let p = pods
            .as_array()?
            .iter()
            .find(|p| p["id"] == "node-0")?
            .clone();
        (generation(&pods)? > before && p["tasks"][0]["ready"] == true).then_some(())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = ask_udp(dns[2], "node-0.kv.cairn.", RecordType::A)
            .await
            .expect("answer");
        assert_eq!(addrs(&m), BTreeSet::from([h0]), "during the restart: {m}");
        if restarted().await.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "node-0 was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(
        Duration::from_secs(5),
        "kv.cairn with both pods again",
        || async {
            let m = ask_udp(dns[0], "kv.cairn.", RecordType::A).await?;
            (addrs(&m) == BTreeSet::from([h0, h1])).then_some(())
        },
    )
    .await;

    // A named endpoint follows the pod it names; a switchover is an update of the spec,
    // and moves the name without restarting a pod.
    eventually(
        Duration::from_secs(5),
        "primary.kv.cairn on node-1",
        || async {
            let m = ask_udp(dns[0], "primary.kv.cairn.", RecordType::A).await?;
            (addrs(&m) == BTreeSet::from([h1])).then_some(())
        },
    )
    .await;
    let pods = lab.get(&master, "/api/v1/services/kv/pods").await.unwrap();
    let gens = |pods: &serde_json::Value| -> Vec<String> {
        pods.as_array()
            .unwrap()
            .iter()
            .map(|p| p["tasks"].to_string())
            .collect()
    };
    let before = gens(&pods);
    let r = http()
        .put(format!("http://{master}/api/v1/services/kv"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/toml")
        .body(KV.replace("primary = \"node-1\"", "primary = \"node-0\""))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    eventually(
        Duration::from_secs(5),
        "primary.kv.cairn on node-0",
        || async {
            let m = ask_udp(dns[1], "primary.kv.cairn.", RecordType::A).await?;
            (addrs(&m) == BTreeSet::from([h0])).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods = lab.get(&master, "/api/v1/services/kv/pods").await.unwrap();
    assert_eq!(gens(&pods), before, "the switchover restarted a pod");
}

/// The lab index of the agent with id `id` (agents were started in order on 127.0.0.5-7).
fn agent_n(lab: &cairn_installer::lab::Lab, id: &str) -> u8 {
    (0..lab.agents.len())
        .find(|&n| {
            std::fs::read_to_string(lab.agents[n].data_dir.join("agent-id"))
                .is_ok_and(|s| s.trim() == id)
        })
        .expect("agent of the pod") as u8
}
