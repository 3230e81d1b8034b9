//! `cairn lab`: named multi-node clusters on this machine, for trying Cairn and for chaos.
//! Each node is a real `cairn master` or `cairn agent` process with its own loopback address
//! (`127.<lab>.0.<n>` for masters, `127.<lab>.1.<n>` for agents, the standard ports), started
//! in its own process group so it outlives the `lab up` that started it. What a lab is lives
//! in `<state>/labs/<name>/lab.json` (`<state>`: /var/lib/cairn as root, else
//! $XDG_STATE_HOME/cairn or ~/.local/state/cairn), next to each node's data dir and log.
//! `down` stops agents first (they kill their tasks), then masters, then anything still
//! running from the lab's directory and the agents' task cgroups, unmounts what is left
//! under it and removes it.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const API_PORT: u16 = 5050;
pub const AGENT_PORT: u16 = 5051;
pub const PEER_PORT: u16 = 5052;
pub const DNS_PORT: u16 = 5053;

/// One node of a lab, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// `m1`, `m2`, ... for masters, `a1`, `a2`, ... for agents.
    pub name: String,
    pub role: String,
    /// API address (`ip:port`).
    pub addr: String,
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a reused pid is never signalled.
    pub start_ticks: u64,
    pub args: Vec<String>,
    /// The node's network namespace (labs started as root), entered with `nsenter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// A lab as recorded in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    /// The second byte of the lab's loopback addresses.
    pub net: u8,
    pub token: String,
    pub bin: PathBuf,
    pub nodes: Vec<Node>,
    pub created_at: u64,
    /// The lab's CA (`<lab>/pki`): TLS on every port; absent for an `--insecure` lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pki: Option<PathBuf>,
    /// Nodes in network namespaces on the bridge `cairnbr<net>` (`crate::netns`), else on
    /// loopback addresses.
    #[serde(default)]
    pub netns: bool,
}

impl LabState {
    /// The API URL of the first master.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            self.scheme(),
            self.masters().next().map_or("", |m| &m.addr)
        )
    }
    pub fn scheme(&self) -> &'static str {
        if self.pki.is_some() {
            "https"
        } else {
            "http"
        }
    }
    /// The CA certificate and the admin client certificate and key of a TLS lab.
    pub fn credentials(&self) -> Option<(PathBuf, PathBuf, PathBuf)> {
        let p = self.pki.as_ref()?;
        Some((
            p.join(crate::pki::CA_CERT),
            p.join(crate::pki::ADMIN_DIR).join(crate::pki::NODE_CERT),
            p.join(crate::pki::ADMIN_DIR).join(crate::pki::NODE_KEY),
        ))
    }
    /// An HTTP client for the lab's nodes: under TLS it trusts the lab's CA and presents the
    /// admin certificate (agents' APIs take only masters' and admins' certificates).
    pub fn http(&self, timeout: Duration) -> anyhow::Result<reqwest::Client> {
        let b = match &self.pki {
            Some(p) => crate::pki::admin_client(p)?,
            None => reqwest::Client::builder(),
        };
        Ok(b.timeout(timeout).build()?)
    }
    pub fn masters(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.role == "master")
    }
    pub fn agents(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.role == "agent")
    }
    /// The DNS server of the first agent (every agent serves one on its address).
    pub fn dns(&self) -> Option<String> {
        let a = self.agents().next()?;
        let ip = a.addr.split(':').next()?;
        Some(format!("{ip}:{}", self.dns_port()))
    }
    /// Agents in namespaces have their own address, so their DNS takes port 53 and their
    /// tasks' resolv.conf names it; on loopback addresses, `DNS_PORT`.
    pub fn dns_port(&self) -> u16 {
        if self.netns {
            53
        } else {
            DNS_PORT
        }
    }
}

/// Where labs are kept (`$CAIRN_LAB_DIR` overrides).
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("CAIRN_LAB_DIR") {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/cairn/labs");
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("cairn/labs")
}

/// A lab name: 1-32 lowercase letters, digits and '-'.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !ok {
        bail!("lab name {name:?}: use 1-32 lowercase letters, digits and '-' (e.g. --name demo)");
    }
    Ok(())
}

pub fn lab_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// Every lab recorded under `root`.
pub fn list(root: &Path) -> Vec<LabState> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut v: Vec<LabState> = rd.flatten().filter_map(|e| load(&e.path()).ok()).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

pub fn load(dir: &Path) -> anyhow::Result<LabState> {
    let text = std::fs::read_to_string(dir.join("lab.json"))
        .with_context(|| format!("no lab at {}", dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}/lab.json", dir.display()))
}

fn save(dir: &Path, lab: &LabState) -> anyhow::Result<()> {
    let tmp = dir.join("lab.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(lab)?)?;
    std::fs::rename(&tmp, dir.join("lab.json"))?;
    Ok(())
}

/// The first free network byte (10..=250) not used by another lab under `root` (nor, for
/// a lab in namespaces, by a route of this host in 10.<net>.0.0/24).
pub fn pick_net(root: &Path, netns: bool) -> anyhow::Result<u8> {
    let used: Vec<u8> = list(root).iter().map(|l| l.net).collect();
    (10..=250u8)
        .find(|n| !used.contains(n) && (!netns || crate::netns::net_free(*n)))
        .context("no free lab network: remove a lab with `cairn lab down --name NAME`")
}

/// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the recorded node process still runs (same pid, same start time).
pub fn alive(n: &Node) -> bool {
    start_ticks(n.pid) == Some(n.start_ticks)
}

fn spawn(
    bin: &Path,
    args: &[String],
    log: &Path,
    netns: Option<&str>,
) -> anyhow::Result<(u32, u64)> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    // `nsenter --net` enters only the network namespace and execs (same pid); `ip netns
    // exec` would also remount /sys and hide the cgroup hierarchy from agents.
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        // Its own process group: a Ctrl-C in the terminal of `lab up` does not stop the lab.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    // Not waited on here: the node outlives this process (init reaps it).
    std::mem::forget(child);
    let ticks = start_ticks(pid).unwrap_or(0);
    Ok((pid, ticks))
}

/// What `up` builds.
pub struct UpSpec {
    pub name: String,
    pub masters: u64,
    pub agents: u64,
    pub bin: PathBuf,
    pub root: PathBuf,
    /// Plaintext instead of TLS.
    pub insecure: bool,
    /// Each node in its own network namespace (needs root), else on loopback addresses.
    pub netns: bool,
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts a lab and waits until it has a leader and every agent is registered.
/// `progress` is told each phase.
pub async fn up(spec: &UpSpec, progress: &dyn Fn(&str)) -> anyhow::Result<LabState> {
    check_name(&spec.name)?;
    if !(1..=7).contains(&spec.masters) || spec.masters.is_multiple_of(2) {
        bail!("--masters: give 1, 3, 5 or 7 (an odd number keeps a majority)");
    }
    if spec.agents > 50 {
        bail!("--agents: at most 50 on one machine");
    }
    let dir = lab_dir(&spec.root, &spec.name);
    if dir.join("lab.json").exists() {
        bail!(
            "a lab {:?} exists: `cairn lab status --name {0}`, or remove it with `cairn lab down \
             --name {0}`",
            spec.name
        );
    }
    if spec.netns {
        crate::netns::available().context(
            "a lab in network namespaces needs root, iproute2, util-linux and iptables (or use \
             --loopback)",
        )?;
    }
    std::fs::create_dir_all(&spec.root)?;
    let net = pick_net(&spec.root, spec.netns)?;
    std::fs::create_dir_all(&dir)?;
    let token = random_token();
    let peer_token = random_token();
    let mip = |i: u64| {
        if spec.netns {
            crate::netns::node_ip(net, true, i)
        } else {
            format!("127.{net}.0.{i}")
        }
    };
    let aip = |i: u64| {
        if spec.netns {
            crate::netns::node_ip(net, false, i)
        } else {
            format!("127.{net}.1.{i}")
        }
    };
    let ns = |node: &str| spec.netns.then(|| crate::netns::ns_name(net, node));
    let peers: Vec<String> = (1..=spec.masters)
        .map(|i| format!("{i}@{}:{API_PORT}/{}:{PEER_PORT}", mip(i), mip(i)))
        .collect();
    let mut lab = LabState {
        name: spec.name.clone(),
        net,
        token: token.clone(),
        bin: spec.bin.clone(),
        nodes: vec![],
        created_at: now_ms(),
        pki: (!spec.insecure).then(|| dir.join("pki")),
        netns: spec.netns,
    };
    // Recorded first, so `down` removes what a failed `up` made.
    save(&dir, &lab)?;
    if spec.netns {
        progress("making the lab's network (a bridge, a namespace per node)");
        crate::netns::setup_bridge(net)?;
        let nodes = (1..=spec.masters)
            .map(|i| (format!("m{i}"), mip(i)))
            .chain((1..=spec.agents).map(|i| (format!("a{i}"), aip(i))));
        for (node, ip) in nodes {
            crate::netns::add_node(net, &crate::netns::ns_name(net, &node), &node, &ip)?;
        }
    }
    // TLS: a CA for the lab, a certificate per master (with the CA key, so any master signs
    // joining agents), an admin certificate for the CLI; agents join with a token below.
    let ca = match &lab.pki {
        Some(p) => {
            progress("making the lab's CA and certificates");
            let ca = crate::pki::Ca::generate(&spec.name)?;
            ca.save(p)?;
            crate::pki::ensure_admin(&ca, p, "lab")?;
            Some(ca)
        }
        None => None,
    };
    progress("starting masters");
    for i in 1..=spec.masters {
        let tls_dir = dir.join(format!("m{i}")).join("tls");
        let tls_arg = match &ca {
            Some(ca) => {
                crate::pki::ensure_node(
                    ca,
                    &tls_dir,
                    crate::pki::Role::Master,
                    &i.to_string(),
                    &[mip(i), "localhost".into()],
                )?;
                ca.save(&tls_dir)?;
                vec!["--tls-dir".to_string(), tls_dir.display().to_string()]
            }
            None => vec!["--insecure".to_string()],
        };
        let mut args: Vec<String> = [
            "master",
            "--node-id",
            &i.to_string(),
            "--listen",
            &format!("{}:{API_PORT}", mip(i)),
            "--peer-listen",
            &format!("{}:{PEER_PORT}", mip(i)),
            "--data-dir",
            &dir.join(format!("m{i}")).display().to_string(),
            "--token",
            &token,
            "--peer-token",
            &peer_token,
            "--peers",
            &peers.join(","),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(tls_arg);
        let netns = ns(&format!("m{i}"));
        let (pid, ticks) = spawn(
            &spec.bin,
            &args,
            &dir.join(format!("m{i}.log")),
            netns.as_deref(),
        )?;
        lab.nodes.push(Node {
            name: format!("m{i}"),
            role: "master".into(),
            addr: format!("{}:{API_PORT}", mip(i)),
            pid,
            start_ticks: ticks,
            args,
            netns,
        });
        save(&dir, &lab)?;
    }
    let http = lab.http(Duration::from_secs(2))?;
    // Agents of a TLS lab join with a token, which needs a leader to make it.
    let agent_cred = if lab.pki.is_some() {
        progress("waiting for a leader to make the agents' join token");
        // Wait with reads (safe to repeat), then make the token once: a retried POST whose
        // first attempt timed out after committing would leave a second, unused token.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            check_alive(&dir, &lab)?;
            let leader = http
                .get(format!("{}/api/v1/cluster", lab.url()))
                .bearer_auth(&token)
                .send()
                .await;
            if let Ok(r) = leader {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                if v["leader_id"].as_u64().is_some() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "lab {:?}: no leader after 60 s; logs in {}",
                    spec.name,
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = http
            .post(format!("{}/api/v1/join-tokens", lab.url()))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(30))
            .json(&serde_json::json!({"ttl": "1h", "max_uses": spec.agents,
                                      "description": format!("lab {}", spec.name)}))
            .send()
            .await
            .context("making the agents' join token")?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!("making the agents' join token: {status} {}", v["message"]);
        }
        let t = v["token"].as_str().context("no token in the answer")?;
        vec!["--join".to_string(), t.to_string()]
    } else {
        vec![
            "--token".to_string(),
            token.clone(),
            "--insecure".to_string(),
        ]
    };
    progress("starting agents");
    let masters: Vec<String> = lab.masters().map(|m| m.addr.clone()).collect();
    for i in 1..=spec.agents {
        let ip = aip(i);
        let first = 31000 + 1000 * (i - 1);
        let args: Vec<String> = [
            "agent",
            "--masters",
            &masters.join(","),
            "--listen",
            &format!("{ip}:{AGENT_PORT}"),
            "--data-dir",
            &dir.join(format!("a{i}")).display().to_string(),
            "--attributes",
            &format!("lab:{},node:a{i}", spec.name),
            "--resources",
            &format!("cpus:2;mem:2048;disk:10000;ports:[{first}-{}]", first + 999),
            "--heartbeat-interval",
            "500ms",
            "--dns-listen",
            &format!("{ip}:{}", lab.dns_port()),
            "--kill-tasks-on-exit",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(agent_cred.iter().cloned())
        .collect();
        let netns = ns(&format!("a{i}"));
        let (pid, ticks) = spawn(
            &spec.bin,
            &args,
            &dir.join(format!("a{i}.log")),
            netns.as_deref(),
        )?;
        lab.nodes.push(Node {
            name: format!("a{i}"),
            role: "agent".into(),
            addr: format!("{ip}:{AGENT_PORT}"),
            pid,
            start_ticks: ticks,
            args,
            netns,
        });
        save(&dir, &lab)?;
    }
    progress("waiting for a leader and every agent");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        check_alive(&dir, &lab)?;
        let ready = async {
            let c: serde_json::Value = http
                .get(format!("{}/api/v1/cluster", lab.url()))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            c["leader_id"].as_u64()?;
            let a: serde_json::Value = http
                .get(format!("{}/api/v1/agents?stale=true", lab.url()))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let active = a
                .as_array()?
                .iter()
                .filter(|a| a["status"] == "active")
                .count();
            (active as u64 >= spec.agents).then_some(())
        }
        .await;
        if ready.is_some() {
            return Ok(lab);
        }
        if Instant::now() > deadline {
            bail!(
                "lab {:?} not ready after 60 s (no leader or agents missing); logs in {}",
                spec.name,
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails with the end of its log if a node of a starting lab exited.
fn check_alive(dir: &Path, lab: &LabState) -> anyhow::Result<()> {
    if let Some(dead) = lab.nodes.iter().find(|n| !alive(n)) {
        let log =
            std::fs::read_to_string(dir.join(format!("{}.log", dead.name))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "node {} exited while starting; its log ends:\n{}",
            dead.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

fn signal(n: &Node, sig: nix::sys::signal::Signal) {
    if alive(n) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(n.pid as i32), sig);
    }
}

async fn wait_gone(nodes: &[&Node], wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && nodes.iter().any(|n| alive(n)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// What `down` found and removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub stopped: usize,
    pub killed_leftovers: usize,
    pub unmounted: usize,
    /// Network namespaces and the bridge removed.
    pub links: usize,
}

/// Stops every node of a lab (agents first, so they kill their tasks), then anything left
/// running from its directory, unmounts what is left under it and removes it.
pub async fn down(root: &Path, name: &str) -> anyhow::Result<DownReport> {
    use nix::sys::signal::Signal;
    check_name(name)?;
    let dir = lab_dir(root, name);
    let lab = load(&dir)?;
    let mut report = DownReport::default();
    let agents: Vec<&Node> = lab.agents().collect();
    for a in &agents {
        signal(a, Signal::SIGTERM);
    }
    wait_gone(&agents, Duration::from_secs(20)).await;
    let masters: Vec<&Node> = lab.masters().collect();
    for m in &masters {
        signal(m, Signal::SIGTERM);
    }
    wait_gone(&masters, Duration::from_secs(6)).await;
    for n in &lab.nodes {
        if alive(n) {
            signal(n, Signal::SIGKILL);
        }
        report.stopped += 1;
    }
    // Task supervisors and anything else started from the lab's directory, then the
    // agents' task cgroups (as `lab::Lab` does for the test labs).
    report.killed_leftovers = crate::lab::kill_processes_mentioning(&dir);
    for a in lab.agents() {
        crate::lab::remove_agent_cgroups(&dir.join(&a.name));
    }
    for m in mounts_under(&dir) {
        if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
            report.unmounted += 1;
        }
    }
    if lab.netns {
        let names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
        report.links = crate::netns::teardown(lab.net, &names);
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(report)
}

/// Kills (SIGKILL) or restarts one node of a lab; in a lab of namespaces also cuts it off
/// from the other nodes (`partition`), slows what it sends (`delay`, `delay_ms`) or undoes
/// both (`heal`).
pub fn chaos(
    root: &Path,
    name: &str,
    action: &str,
    node: &str,
    delay_ms: u64,
) -> anyhow::Result<String> {
    let dir = lab_dir(root, name);
    let mut lab = load(&dir)?;
    let Some(i) = lab.nodes.iter().position(|n| n.name == node) else {
        bail!(
            "no node {node:?} in lab {name:?}: its nodes are {}",
            lab.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    match action {
        "kill" => {
            let n = &lab.nodes[i];
            if !alive(n) {
                return Ok(format!("{node} is not running"));
            }
            signal(n, nix::sys::signal::Signal::SIGKILL);
            Ok(format!("killed {node} (pid {})", n.pid))
        }
        "restart" => {
            let n = lab.nodes[i].clone();
            if alive(&n) {
                signal(&n, nix::sys::signal::Signal::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(5);
                while alive(&n) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let (pid, ticks) = spawn(
                &lab.bin,
                &n.args,
                &dir.join(format!("{node}.log")),
                n.netns.as_deref(),
            )?;
            lab.nodes[i].pid = pid;
            lab.nodes[i].start_ticks = ticks;
            save(&dir, &lab)?;
            Ok(format!("restarted {node} (pid {pid})"))
        }
        "partition" | "heal" | "delay" => {
            let Some(ns) = lab.nodes[i].netns.clone() else {
                bail!(
                    "{action} needs each node in its own network namespace: this lab runs on \
                     loopback addresses (started without root, or with --loopback); use kill \
                     and restart"
                );
            };
            match action {
                "partition" => {
                    crate::netns::partition(lab.net, &ns)?;
                    Ok(format!(
                        "{node} is cut off from the other nodes (heal undoes it)"
                    ))
                }
                "delay" => {
                    crate::netns::delay(&ns, delay_ms)?;
                    Ok(format!(
                        "{node} sends with {delay_ms} ms of delay (heal undoes it)"
                    ))
                }
                _ => {
                    crate::netns::heal(&ns)?;
                    Ok(format!("{node} healed"))
                }
            }
        }
        other => {
            bail!("unknown chaos action {other:?}: use kill, restart, partition, delay or heal")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_networks() {
        assert!(check_name("demo-1").is_ok());
        for bad in ["", "-x", "Demo", "a/b", "x".repeat(33).as_str()] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let root = tempfile_dir();
        assert_eq!(pick_net(&root, false).unwrap(), 10);
        let lab = LabState {
            name: "a".into(),
            net: 10,
            token: "t".into(),
            bin: "/bin/true".into(),
            nodes: vec![],
            created_at: 0,
            pki: None,
            netns: false,
        };
        std::fs::create_dir_all(root.join("a")).unwrap();
        save(&root.join("a"), &lab).unwrap();
        assert_eq!(pick_net(&root, false).unwrap(), 11);
        assert_eq!(list(&root).len(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("cairn-labs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn this_process_has_a_start_time() {
        let me = std::process::id();
        assert!(start_ticks(me).is_some());
        let n = Node {
            name: "m1".into(),
            role: "master".into(),
            addr: String::new(),
            pid: me,
            start_ticks: start_ticks(me).unwrap(),
            args: vec![],
            netns: None,
        };
        assert!(alive(&n));
        assert!(!alive(&Node {
            start_ticks: 1,
            ..n
        }));
    }
}
