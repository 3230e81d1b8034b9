//! The control plane under load and after faults, on real master processes with the default
//! Raft timings: 2,000 simulated agents and 150,000 tasks with a leader throughout; two of
//! three masters frozen while the agents keep calling, then thawed; a follower cut off and
//! healed without deposing the leader (pre-vote); requests shed with 429 and retried without
//! loss.

mod common;

use common::{eventually, http, lab, lab_diagnostics, TOKEN};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// These tests load the whole machine: run them one at a time even under `--test-threads=2`.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One master's view, or `None` if it did not answer within the sample's time.
async fn status(c: &reqwest::Client, addr: &str) -> Option<serde_json::Value> {
    let r = c
        .get(format!("http://{addr}/api/v1/cluster"))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// A leader all answering masters agree on, and the highest commit index among them.
async fn sample(c: &reqwest::Client, masters: &[String]) -> (Option<u64>, u64) {
    let answers = futures::future::join_all(masters.iter().map(|m| status(c, m))).await;
    let mut leader = None;
    let mut agree = true;
    let mut commit = 0;
    for a in answers.iter().flatten() {
        commit = commit.max(a["commit_index"].as_u64().unwrap_or(0));
        match (leader, a["leader_id"].as_u64()) {
            (_, None) => agree = false,
            (None, Some(l)) => leader = Some(l),
            (Some(x), Some(l)) if x != l => agree = false,
            _ => {}
        }
    }
    (leader.filter(|_| agree), commit)
}

/// Sums a Prometheus counter family from a master's `/metrics`, over series whose labels
/// contain `filter`.
async fn metric_sum(c: &reqwest::Client, addr: &str, name: &str, filter: &str) -> f64 {
    let Ok(r) = c
        .get(format!("http://{addr}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
    else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn running_tasks(c: &reqwest::Client, masters: &[String]) -> u64 {
    for m in masters {
        if let Some(s) = status(c, m).await {
            return s["tasks"]["running"].as_u64().unwrap_or(0);
        }
    }
    0
}

async fn agents_registered(c: &reqwest::Client, addr: &str) -> usize {
    let Ok(r) = c
        .get(format!("http://{addr}/api/v1/agents?stale=true"))
        .bearer_auth(TOKEN)
        .send()
        .await
    else {
        return 0;
    };
    r.json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap_or(0)
}

async fn submit(c: &reqwest::Client, masters: &[String], id: &str, instances: usize) {
    let spec = serde_json::json!({
        "id": id, "instances": instances,
        "runtime": {"native": {"cmd": "/bin/true"}},
        "resources": {"cpus": 0.01, "mem": 1, "disk": 0},
    });
    // A write can outlast a client timeout under this load and still commit, so an attempt
    // that fails is checked by reading the workload back (submitting is then done).
    eventually(Duration::from_secs(180), &format!("submit {id}"), || {
        let spec = spec.clone();
        async move {
            for m in masters {
                let r = c
                    .post(format!("http://{m}/api/v1/workloads"))
                    .bearer_auth(TOKEN)
                    .timeout(Duration::from_secs(60))
                    .json(&spec)
                    .send()
                    .await;
                if matches!(&r, Ok(r) if r.status().is_success()) {
                    return Some(());
                }
                let exists = c
                    .get(format!("http://{m}/api/v1/workloads/{id}"))
                    .bearer_auth(TOKEN)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                if matches!(&exists, Ok(r) if r.status().is_success()) {
                    return Some(());
                }
            }
            None
        }
    })
    .await;
}

const SIM_RESOURCES: &str = "cpus:64;mem:262144;disk:1000000;ports:[20000-30000]";
const MASTER_ARGS: &[&str] = &[
    "--agent-timeout",
    "60s",
    "--reschedule-after",
    "120s",
    "--request-timeout",
    "30s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The size: 3 masters, 2,000 simulated agents, 150,000 tasks, default settings
// (passed 3 of 3 runs here on 2026-12-07 in 52-76 s, no term change; before the append probe
// of 346d9e8 it had failed 1 of 4, so CI ran 40,000 tasks on 1,000 agents). Smaller by
// hand: CAIRN_OVERLOAD_AGENTS=1000 CAIRN_OVERLOAD_WORKLOADS=40.
async fn a_leader_throughout_150k_tasks_on_2000_agents() {
    let _serial = SERIAL.lock().await;
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let agents = env("CAIRN_OVERLOAD_AGENTS", 2000);
    let workloads = env("CAIRN_OVERLOAD_WORKLOADS", 150);
    const PER: usize = 1000;
    let (_d, mut lab) = lab(3, MASTER_ARGS);
    lab.wait_leader(Duration::from_secs(30))
        .await
        .expect("a first leader");
    let masters = lab.running_addrs();
    lab.start_simulated_agents(agents, SIM_RESOURCES, &["--heartbeat-interval", "5s"])
        .unwrap();
    let c = http();
    eventually(
        Duration::from_secs(180),
        "all agents registered",
        || async { (agents_registered(&c, &masters[0]).await >= agents).then_some(()) },
    )
    .await;

    // Sample leader and commit index once a second while the tasks are placed.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let (c, masters) = (c.clone(), masters.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let start = Instant::now();
            while !*stop_rx.borrow() {
                let t = Instant::now();
                let (leader, commit) = sample(&c, &masters).await;
                samples.push((start.elapsed(), leader, commit));
                tokio::time::sleep(Duration::from_secs(1).saturating_sub(t.elapsed())).await;
            }
            samples
        })
    };
    let term_before = metric_sum(&c, &masters[0], "cairn_raft_term ", "").await;
    let started = Instant::now();
    for w in 0..workloads {
        submit(&c, &masters, &format!("load-{w}"), PER).await;
    }
    let want = (workloads * PER) as u64;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut running = 0;
    while Instant::now() < deadline {
        running = running_tasks(&c, &masters).await;
        if running >= want {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let took = started.elapsed();
    let _ = stop_tx.send(true);
    let samples = sampler.await.unwrap();
    let term_after = metric_sum(&c, &masters[0], "cairn_raft_term ", "").await;
    let with_leader = samples.iter().filter(|s| s.1.is_some()).count();
    eprintln!(
        "{want} tasks on {agents} agents: {running} running after {took:?}; leader in \
         {with_leader}/{} samples; term {term_before} -> {term_after}",
        samples.len()
    );
    assert_eq!(running, want, "every task running at the end");
    assert!(
        with_leader * 100 >= samples.len() * 95,
        "a leader in only {with_leader} of {} one-second samples",
        samples.len()
    );
    // The commit index advances in every 5-second window while work remains.
    let mut stalls = Vec::new();
    for w in samples.windows(6) {
        if w[5].0 <= took && w[5].2 <= w[0].2 {
            stalls.push((w[0].0, w[0].2));
        }
    }
    assert!(
        stalls.is_empty(),
        "commit index stalled in windows {stalls:?}"
    );

    // SIGTERM under load (the agents keep calling): the master stops promptly, and comes back
    // with everything it had.
    let t = Instant::now();
    lab.stop(1);
    let stopped_in = t.elapsed();
    eprintln!("master 1 stopped {stopped_in:?} after SIGTERM");
    assert!(
        stopped_in < Duration::from_secs(10),
        "SIGTERM took {stopped_in:?}"
    );
    lab.restart(1).unwrap();
    let m1 = vec![lab.master(1).addr.clone()];
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut back = 0;
    while Instant::now() < deadline {
        back = running_tasks(&c, &m1).await;
        if back >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if back < want {
        panic!(
            "master 1 not back with every task after 240s ({back} of {want} running)\n{}",
            lab_diagnostics(&lab, 60).await
        );
    }
    eprintln!(
        "master 1 back with every task {:?} after restart",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_frozen_for_10s_then_a_leader_within_3s_and_bounded_agent_retries() {
    let _serial = SERIAL.lock().await;
    const AGENTS: usize = 300;
    let (_d, mut lab) = lab(3, MASTER_ARGS);
    let leader = lab
        .wait_leader(Duration::from_secs(30))
        .await
        .expect("a first leader");
    let masters = lab.running_addrs();
    // Agents heartbeat every second (the default), so they keep calling during the outage.
    lab.start_simulated_agents(AGENTS, SIM_RESOURCES, &[])
        .unwrap();
    let c = http();
    eventually(Duration::from_secs(60), "agents registered", || async {
        (agents_registered(&c, &masters[0]).await >= AGENTS).then_some(())
    })
    .await;
    submit(&c, &masters, "before", 3000).await;
    eventually(Duration::from_secs(120), "3000 tasks running", || async {
        (running_tasks(&c, &masters).await >= 3000).then_some(())
    })
    .await;

    // Freeze the leader and one follower; the third master stays up alone (no quorum).
    let frozen: Vec<u64> = std::iter::once(leader)
        .chain((1..=3).filter(|id| *id != leader).take(1))
        .collect();
    let alive = (1..=3).find(|id| !frozen.contains(id)).unwrap();
    let alive_addr = lab.master(alive).addr.clone();
    let requests = |c: reqwest::Client, a: String| async move {
        metric_sum(
            &c,
            &a,
            "cairn_http_request_duration_seconds_count",
            "/api/v1/agents",
        )
        .await
    };
    for id in &frozen {
        let pid = lab.master_pid(*id).unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
    }
    let before = requests(c.clone(), alive_addr.clone()).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = requests(c.clone(), alive_addr.clone()).await;
    let rate = (after - before) / 10.0;
    for id in &frozen {
        let pid = lab.master_pid(*id).unwrap() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGCONT,
        )
        .unwrap();
    }
    let thawed = Instant::now();
    let new_leader = lab.wait_leader(Duration::from_secs(3)).await;
    let elected_in = thawed.elapsed();
    eprintln!(
        "agent requests on the surviving master during the outage: {rate:.0}/s for {AGENTS} \
         agents; leader {new_leader:?} {elected_in:?} after SIGCONT"
    );
    assert!(new_leader.is_some(), "no leader within 3 s of SIGCONT");
    // Healthy agents send one heartbeat a second, plus status and long-polls; retrying
    // with backoff they must not send more than that while the masters are away.
    assert!(
        rate <= 2.0 * AGENTS as f64,
        "agents sent {rate:.0} requests/s to the surviving master during the outage"
    );
    // The backlog drains: new work is placed and runs on the agents.
    submit(&c, &masters, "after", 3000).await;
    eventually(Duration::from_secs(120), "6000 tasks running", || async {
        (running_tasks(&c, &masters).await >= 6000).then_some(())
    })
    .await;
}

/// Runs `iptables` with `args`; panics with its error.
fn iptables(args: &[&str]) {
    let out = std::process::Command::new("iptables")
        .args(args)
        .output()
        .expect("iptables (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops every packet sent to a master's peer port while alive, so it hears no leader.
struct CutOff(String);

impl CutOff {
    fn new(peer: &str) -> Self {
        let port = peer.rsplit(':').next().unwrap().to_string();
        iptables(&[
            "-I", "INPUT", "-i", "lo", "-p", "tcp", "--dport", &port, "-j", "DROP",
        ]);
        CutOff(port)
    }
}

impl Drop for CutOff {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .args([
                "-D", "INPUT", "-i", "lo", "-p", "tcp", "--dport", &self.0, "-j", "DROP",
            ])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_and_healed_changes_neither_leader_nor_term() {
    let _serial = SERIAL.lock().await;
    let (_d, lab) = lab(3, &[]);
    let leader = lab
        .wait_leader(Duration::from_secs(30))
        .await
        .expect("a first leader");
    let c = http();
    let term = |addr: String| {
        let c = c.clone();
        async move { status(&c, &addr).await.and_then(|s| s["term"].as_u64()) }
    };
    let leader_addr = lab.master(leader).addr.clone();
    let t0 = term(leader_addr.clone()).await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let cut = CutOff::new(&lab.master(follower).peer);
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Cut off, the follower has campaigned in vain: no pre-vote, so no election and no term.
    let f_addr = lab.master(follower).addr.clone();
    let rounds = metric_sum(&c, &f_addr, "cairn_raft_prevote_rounds_total", "").await;
    let elections = metric_sum(&c, &f_addr, "cairn_raft_elections_total", "").await;
    drop(cut);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut terms = BTreeMap::new();
    for id in 1..=3 {
        terms.insert(id, term(lab.master(id).addr.clone()).await);
    }
    eprintln!("pre-vote rounds {rounds}, elections {elections}, terms {terms:?}");
    assert!(
        rounds >= 1.0,
        "the cut-off follower never asked for a pre-vote"
    );
    assert_eq!(elections, 0.0, "the cut-off follower started an election");
    assert_eq!(lab.leader().await, Some(leader), "the leader changed");
    for (id, t) in terms {
        assert_eq!(t, Some(t0), "master {id}'s term moved from {t0}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_requests_get_429_with_retry_after_and_are_retried_without_loss() {
    let _serial = SERIAL.lock().await;
    let (_d, lab) = lab(1, &["--max-in-flight-user", "2"]);
    lab.wait_leader(Duration::from_secs(30)).await.unwrap();
    let addr = lab.master(1).addr.clone();
    let c = http();
    let shed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writes = (0..100).map(|i| {
        let (c, addr, shed) = (c.clone(), addr.clone(), shed.clone());
        async move {
            loop {
                let r = c
                    .put(format!("http://{addr}/api/v1/kv/k{i}"))
                    .bearer_auth(TOKEN)
                    .json(&serde_json::json!({"value": format!("v{i}")}))
                    .send()
                    .await
                    .unwrap();
                if r.status().is_success() {
                    return;
                }
                assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
                let after: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=3).contains(&after), "Retry-After {after}");
                shed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(after)).await;
            }
        }
    });
    futures::future::join_all(writes).await;
    let n = shed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n > 0, "100 concurrent writes with 2 seats: none was shed");
    for i in 0..100 {
        let v: serde_json::Value = c
            .get(format!("http://{addr}/api/v1/kv/k{i}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["value"], format!("v{i}"), "k{i}");
    }
    let counted = metric_sum(&c, &addr, "cairn_api_shed_total", "user").await;
    assert_eq!(
        counted as usize, n,
        "shed requests counted by class: metric {counted}, client saw {n}"
    );
}
