//! `cairn lab`: named multi-node clusters on this machine (`cairn_installer::labs`).

use cairn_installer::labs;
use clap::Subcommand;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum LabCmd {
    /// Start a lab: masters and agents as separate processes, each on its own loopback
    /// address; returns once it has a leader and every agent is registered.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        masters: u64,
        #[arg(long, default_value_t = 3)]
        agents: u64,
        /// Plaintext instead of TLS (by default the lab has its own CA; agents join with a
        /// token).
        #[arg(long)]
        insecure: bool,
        /// Nodes on loopback addresses even as root (by default root gets each node in its
        /// own network namespace, so `chaos partition|delay|heal` work).
        #[arg(long)]
        loopback: bool,
    },
    /// A lab's nodes: role, address, process, leader, agent status.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Every lab on this machine.
    List,
    /// Stop a lab and remove everything it created (processes, tasks, mounts, files).
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Inject a fault: `kill NODE` (SIGKILL), `restart NODE`, and in labs of namespaces
    /// `partition NODE` (cut off from the other nodes), `delay NODE` (latency on what it
    /// sends), `heal NODE`; NODE is e.g. m1, a2.
    Chaos {
        #[arg(long, default_value = "lab")]
        name: String,
        /// The latency `delay` adds.
        #[arg(long, default_value_t = 200)]
        delay_ms: u64,
        /// kill, restart, partition, delay or heal.
        action: String,
        /// Nodes, e.g. m1 a2.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

pub async fn run(cmd: LabCmd) -> anyhow::Result<()> {
    let root = labs::state_root();
    match cmd {
        LabCmd::Up {
            name,
            masters,
            agents,
            insecure,
            loopback,
        } => {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(100));
            let t = Instant::now();
            let spec = labs::UpSpec {
                name: name.clone(),
                masters,
                agents,
                bin: std::env::current_exe()?,
                root,
                insecure,
                netns: !loopback && nix::unistd::geteuid().is_root(),
            };
            let r = labs::up(&spec, &|phase: &str| bar.set_message(phase.to_string())).await;
            bar.finish_and_clear();
            let lab = r?;
            let ctx = format!("lab-{name}");
            let saved = crate::context::set_current(
                &ctx,
                crate::context::Ctx {
                    master: lab.url(),
                    token: lab.token.clone(),
                    ca: lab.credentials().map(|c| c.0),
                    cert: lab.credentials().map(|c| c.1),
                    key: lab.credentials().map(|c| c.2),
                },
            );
            println!(
                "lab {name} is up in {:.1} s: {masters} masters, {agents} agents",
                t.elapsed().as_secs_f64()
            );
            println!("  UI:     {}/ui/  (sign in with the token)", lab.url());
            println!("  token:  {}", lab.token);
            if let Some((ca, _, _)) = lab.credentials() {
                println!("  CA:     {}", ca.display());
            }
            if let Some(dns) = lab.dns() {
                let (ip, port) = dns.split_once(':').unwrap_or((&dns, "53"));
                println!("  DNS:    {dns} on every agent's address (try: dig @{ip} -p {port} leader.cairn)");
            }
            match saved {
                Ok(()) => println!("  context: {ctx} (try: cairn agent list)"),
                Err(e) => println!("  context: not saved ({e:#})"),
            }
            println!("  stop:   cairn lab down --name {name}");
            Ok(())
        }
        LabCmd::List => {
            let all = labs::list(&root);
            if all.is_empty() {
                println!("no labs (start one with `cairn lab up`)");
            }
            for l in all {
                let up = l.nodes.iter().filter(|n| labs::alive(n)).count();
                println!(
                    "{}  {}  {up}/{} nodes running",
                    l.name,
                    l.url(),
                    l.nodes.len()
                );
            }
            Ok(())
        }
        LabCmd::Status { name } => {
            labs::check_name(&name)?;
            let lab = labs::load(&labs::lab_dir(&root, &name))?;
            let http = lab.http(Duration::from_secs(2))?;
            let get = |addr: String, path: &str| {
                let (http, url, token) = (
                    http.clone(),
                    format!("{}://{addr}{path}", lab.scheme()),
                    lab.token.clone(),
                );
                async move {
                    http.get(url)
                        .bearer_auth(token)
                        .send()
                        .await
                        .ok()?
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                }
            };
            // Each master's own view (a partitioned one may name no leader, or an old one);
            // the leader is the one most masters name.
            let mut views: Vec<(String, Option<String>)> = Vec::new();
            for m in lab.masters().filter(|m| labs::alive(m)) {
                if let Some(c) = get(m.addr.clone(), "/api/v1/cluster?stale=true").await {
                    views.push((
                        m.addr.clone(),
                        c["leader_addr"].as_str().map(str::to_string),
                    ));
                }
            }
            let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
            for l in views.iter().filter_map(|(_, l)| l.as_deref()) {
                *counts.entry(l).or_default() += 1;
            }
            let leader = counts
                .iter()
                .max_by_key(|(_, n)| **n)
                .filter(|(_, n)| **n * 2 > lab.masters().count())
                .map(|(l, _)| l.to_string());
            let mut agents = serde_json::Value::Null;
            if let Some(l) = &leader {
                agents = get(l.clone(), "/api/v1/agents?stale=true")
                    .await
                    .unwrap_or_default();
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header(["NODE", "ROLE", "ADDRESS", "PID", "PROCESS", "STATE"]);
            for n in &lab.nodes {
                let state = if n.role == "master" {
                    let own = views.iter().find(|(a, _)| *a == n.addr).map(|(_, l)| l);
                    if leader.as_deref() == Some(n.addr.as_str()) {
                        "leader".to_string()
                    } else if own.is_some_and(|l| l.is_some() && *l == leader) {
                        "follower".to_string()
                    } else {
                        "no leader in sight".to_string()
                    }
                } else {
                    agents
                        .as_array()
                        .and_then(|a| a.iter().find(|a| a["addr"] == n.addr.as_str()))
                        .and_then(|a| a["status"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "unregistered".into())
                };
                let alive = labs::alive(n);
                t.add_row([
                    n.name.clone(),
                    n.role.clone(),
                    n.addr.clone(),
                    n.pid.to_string(),
                    if alive { "running" } else { "stopped" }.to_string(),
                    if alive { state } else { "-".into() },
                ]);
            }
            println!("lab {} at {}", lab.name, lab.url());
            println!("{t}");
            Ok(())
        }
        LabCmd::Down { name } => {
            let t = Instant::now();
            let r = labs::down(&root, &name).await?;
            let _ = crate::context::remove(&format!("lab-{name}"));
            println!(
                "lab {name} removed in {:.1} s ({} nodes stopped, {} leftover processes killed, \
                 {} mounts removed, {} namespaces and bridges removed)",
                t.elapsed().as_secs_f64(),
                r.stopped,
                r.killed_leftovers,
                r.unmounted,
                r.links
            );
            Ok(())
        }
        LabCmd::Chaos {
            name,
            delay_ms,
            action,
            nodes,
        } => {
            labs::check_name(&name)?;
            for n in nodes {
                println!("{}", labs::chaos(&root, &name, &action, &n, delay_ms)?);
            }
            Ok(())
        }
    }
}
