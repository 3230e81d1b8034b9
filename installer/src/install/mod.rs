//! `cairn install`: a real cluster over SSH from one TOML file, in phases like k0sctl —
//! connect, gather facts, check the hosts, upload the binary (checksummed), certificates and
//! configuration, write service units, start the masters, let the agents join with a token,
//! wait until the cluster is healthy. Re-running with the same file changes nothing; a host
//! added to the file is added; `reset` removes Cairn from the hosts.
//!
//! SSH is the system `ssh` client (BatchMode, the operator's key, the installer's own
//! known_hosts in its state directory). The service manager is systemd when a host's PID 1
//! is systemd (`systemctl enable --now`), else `direct` (the process started with `setsid`
//! and a pid file): hosts without systemd as PID 1, such as containers and the tests'
//! namespaces, are still installable, and which path ran is printed.
//!
//! What the installer keeps locally (`state_dir`, default `$XDG_STATE_HOME/cairn/install/<name>`):
//! the cluster CA (`pki/`), an admin certificate, the cluster and peer tokens, known_hosts and
//! `state.json` (which masters bootstrapped the cluster).

use crate::pki::{self, Ca, Role};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const API_PORT: u16 = 5050;
pub const AGENT_PORT: u16 = 5051;
pub const PEER_PORT: u16 = 5052;
/// Largest clock difference between this machine and a host.
pub const MAX_SKEW_SECS: i64 = 30;
/// Free disk a host needs under its root.
pub const MIN_DISK_KB: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    #[serde(default)]
    pub ssh: SshConfig,
    pub hosts: Vec<HostConfig>,
    /// Where the installer keeps the CA, tokens and what it did.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    #[serde(default = "default_user")]
    pub user: String,
    /// Private key (default: ssh's own choice).
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: default_user(),
            key: None,
            port: default_ssh_port(),
        }
    }
}

fn default_user() -> String {
    "root".into()
}
fn default_ssh_port() -> u16 {
    22
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The host's IP: SSH goes there, and its nodes serve on it.
    pub address: String,
    /// `master`, `agent`, or both.
    pub roles: Vec<String>,
    /// A directory everything is written under instead of `/` (tests; staged roots).
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// The agent's resources (Mesos syntax; default: detected).
    #[serde(default)]
    pub resources: Option<String>,
    #[serde(default)]
    pub attributes: Option<String>,
}

impl HostConfig {
    fn is(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
    /// The host's root prefix, "" for `/`.
    fn r(&self) -> String {
        self.root
            .as_ref()
            .map(|p| p.display().to_string().trim_end_matches('/').to_string())
            .unwrap_or_default()
    }
}

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<ClusterConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: ClusterConfig =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        c.validate()?;
        Ok(c)
    }

    /// Every mistake a config can have, each naming its field.
    pub fn validate(&self) -> Result<()> {
        crate::labs::check_name(&self.name).context("name")?;
        if self.hosts.is_empty() {
            bail!("hosts: give at least one [[hosts]] with roles = [\"master\"]");
        }
        let mut seen = BTreeSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if h.address.parse::<std::net::IpAddr>().is_err() {
                bail!("hosts[{i}].address: {:?} is not an IP address", h.address);
            }
            if !seen.insert(h.address.clone()) {
                bail!("hosts[{i}].address: {} is listed twice", h.address);
            }
            if h.roles.is_empty() || h.roles.iter().any(|r| r != "master" && r != "agent") {
                bail!("hosts[{i}].roles: give \"master\", \"agent\" or both");
            }
            if let Some(r) = &h.root {
                if !r.is_absolute() {
                    bail!("hosts[{i}].root: {} is not an absolute path", r.display());
                }
            }
        }
        let masters = self.hosts.iter().filter(|h| h.is("master")).count();
        if masters == 0 || masters % 2 == 0 || masters > 7 {
            bail!("hosts: {masters} masters; give 1, 3, 5 or 7 (an odd number keeps a majority)");
        }
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            let base = std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
                .unwrap_or_else(|| PathBuf::from("/var/lib"));
            base.join("cairn/install").join(&self.name)
        })
    }

    pub fn masters(&self) -> impl Iterator<Item = &HostConfig> {
        self.hosts.iter().filter(|h| h.is("master"))
    }
}

/// The system `ssh` client, non-interactive.
pub struct Ssh {
    pub user: String,
    pub key: Option<PathBuf>,
    pub port: u16,
    pub known_hosts: PathBuf,
}

impl Ssh {
    /// The client `cfg` asks for, with the installer's own known_hosts.
    pub fn for_cluster(cfg: &ClusterConfig) -> Ssh {
        Ssh {
            user: cfg.ssh.user.clone(),
            key: cfg.ssh.key.clone(),
            port: cfg.ssh.port,
            known_hosts: cfg.state_dir().join("known_hosts"),
        }
    }

    fn command(&self, host: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
        .args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"])
        .arg("-p")
        .arg(self.port.to_string());
        if let Some(k) = &self.key {
            c.arg("-i").arg(k);
        }
        c.arg(format!("{}@{host}", self.user));
        c
    }

    /// Runs a shell script on `host` (fed on stdin to `sh -s`), returning its stdout; a
    /// failure names the host and carries the script's stderr.
    pub fn run(&self, host: &str, script: &str) -> Result<String> {
        self.run_with_input(host, &format!("sh -c {}", shell_quote(script)), &[])
    }

    /// Writes `data` to `path` on `host` atomically with `mode`.
    pub fn put(&self, host: &str, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/".into());
        let cmd = format!(
            "umask 077 && mkdir -p {d} && cat > {p}.tmp && chmod {mode:o} {p}.tmp && mv -f {p}.tmp {p}",
            d = shell_quote(&dir),
            p = shell_quote(path),
        );
        self.run_with_input(host, &cmd, data).map(|_| ())
    }

    fn run_with_input(&self, host: &str, remote: &str, input: &[u8]) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .command(host)
            .arg(remote)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh (install openssh-client)")?;
        let mut stdin = child.stdin.take().context("ssh stdin")?;
        let data = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let out = child.wait_with_output()?;
        let _ = writer.join();
        if !out.status.success() {
            bail!(
                "{host}: {} (exit {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status.code().unwrap_or(-1)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// `'...'` for sh, with embedded quotes escaped.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What a host reports about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub kernel: String,
    pub hostname: String,
    pub machine_id: String,
    /// The host's clock (Unix seconds) and ours when we asked.
    pub time: i64,
    pub local_time: i64,
    /// `cgroup2fs` (v2), `tmpfs` (v1) or something else.
    pub cgroup: String,
    pub pid1: String,
    /// Listening TCP addresses (`ip:port`).
    pub listening: Vec<String>,
    pub disk_kb: u64,
    /// sha256 of the installed binary, if any.
    pub installed_sha: String,
    /// Which of this host's nodes run now (`master`, `agent`).
    pub running: BTreeSet<String>,
}

impl Facts {
    pub fn service_manager(&self) -> &'static str {
        if self.pid1 == "systemd" {
            "systemd"
        } else {
            "direct"
        }
    }
}

fn facts_script(r: &str) -> String {
    format!(
        r#"R={r}
echo kernel=$(uname -r)
echo hostname=$(hostname)
if [ -s "$R/etc/machine-id" ]; then echo machine_id=$(cat "$R/etc/machine-id"); else echo machine_id=$(cat /etc/machine-id 2>/dev/null); fi
echo time=$(date +%s)
echo cgroup=$(stat -fc %T /sys/fs/cgroup 2>/dev/null)
echo pid1=$(cat /proc/1/comm)
echo listening=$(ss -Hltn 2>/dev/null | awk '{{print $4}}' | tr '\n' ' ')
mkdir -p "$R/var/lib" 2>/dev/null
echo disk_kb=$(df -Pk "$R/var/lib" 2>/dev/null | awk 'NR==2{{print $4}}')
echo installed_sha=$(sha256sum "$R/usr/local/bin/cairn" 2>/dev/null | cut -d' ' -f1)
for role in master agent; do
  if [ -d /run/systemd/system ] && systemctl is-active -q cairn-$role 2>/dev/null; then echo running=$role;
  elif [ -s "$R/var/lib/cairn/$role.pid" ] && kill -0 $(cat "$R/var/lib/cairn/$role.pid") 2>/dev/null; then echo running=$role; fi
done
"#,
        r = shell_quote(r)
    )
}

pub fn parse_facts(text: &str, local_time: i64) -> Facts {
    let mut f = Facts {
        local_time,
        ..Default::default()
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k {
            "kernel" => f.kernel = v.into(),
            "hostname" => f.hostname = v.into(),
            "machine_id" => f.machine_id = v.into(),
            "time" => f.time = v.parse().unwrap_or(0),
            "cgroup" => f.cgroup = v.into(),
            "pid1" => f.pid1 = v.into(),
            "listening" => f.listening = v.split_whitespace().map(str::to_string).collect(),
            "disk_kb" => f.disk_kb = v.parse().unwrap_or(0),
            "installed_sha" => f.installed_sha = v.into(),
            "running" => {
                f.running.insert(v.to_string());
            }
            _ => {}
        }
    }
    f
}

/// A failed host check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckFailure {
    pub host: String,
    pub check: &'static str,
    pub message: String,
}

/// The host checks, pure: unique host names and machine ids, clock skew, kernel, cgroups,
/// free ports (unless Cairn already runs there), disk.
pub fn check_hosts(hosts: &[(HostConfig, Facts)]) -> Vec<CheckFailure> {
    let mut out = Vec::new();
    let mut fail = |h: &HostConfig, check: &'static str, message: String| {
        out.push(CheckFailure {
            host: h.address.clone(),
            check,
            message,
        })
    };
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut ids: BTreeMap<&str, &str> = BTreeMap::new();
    for (h, f) in hosts {
        if let Some(other) = names.insert(f.hostname.as_str(), h.address.as_str()) {
            fail(
                h,
                "hostname",
                format!(
                    "host name {:?} is also {other}'s: give each host its own",
                    f.hostname
                ),
            );
        }
        if f.machine_id.is_empty() {
            fail(h, "machine-id", "no /etc/machine-id".into());
        } else if let Some(other) = ids.insert(f.machine_id.as_str(), h.address.as_str()) {
            fail(
                h,
                "machine-id",
                format!(
                    "machine id is also {other}'s (a cloned image?): run systemd-machine-id-setup"
                ),
            );
        }
        let skew = (f.time - f.local_time).abs();
        if skew > MAX_SKEW_SECS {
            fail(
                h,
                "clock",
                format!("clock is {skew} s off this machine's (at most {MAX_SKEW_SECS} s): sync it with NTP"),
            );
        }
        let major: u32 = f
            .kernel
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 4 {
            fail(
                h,
                "kernel",
                format!("kernel {:?}: Cairn needs Linux 4.x or later", f.kernel),
            );
        }
        if f.cgroup != "cgroup2fs" && f.cgroup != "tmpfs" {
            fail(
                h,
                "cgroups",
                format!(
                    "/sys/fs/cgroup is {:?}, neither cgroup v2 (cgroup2fs) nor v1 (tmpfs): mount cgroups",
                    f.cgroup
                ),
            );
        }
        let mut ports = Vec::new();
        if h.is("master") && !f.running.contains("master") {
            ports.extend([API_PORT, PEER_PORT]);
        }
        if h.is("agent") && !f.running.contains("agent") {
            ports.push(AGENT_PORT);
        }
        for p in ports {
            let busy = f.listening.iter().any(|l| {
                l.rsplit_once(':').is_some_and(|(ip, port)| {
                    port == p.to_string()
                        && (ip == h.address || ip == "0.0.0.0" || ip == "*" || ip == "[::]")
                })
            });
            if busy {
                fail(h, "ports", format!("port {p} is in use on {}", h.address));
            }
        }
        if f.disk_kb < MIN_DISK_KB {
            fail(
                h,
                "disk",
                format!(
                    "{} MiB free under /var/lib, at least 1024 needed",
                    f.disk_kb / 1024
                ),
            );
        }
    }
    out
}

/// What the installer remembers between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub token: String,
    pub peer_token: String,
    /// Every master's node id by address.
    pub masters: BTreeMap<String, u64>,
    /// Masters added after the cluster was bootstrapped (they joined by token).
    #[serde(default)]
    pub joined: BTreeSet<String>,
}

/// The unit (or `direct` start line) of one node: its command line and environment.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    pub role: &'static str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Changes only with what the node should run (not with a fresh join token).
    pub fingerprint: String,
}

pub fn unit_text(p: &NodePlan, r: &str) -> String {
    let agent = p.role == "agent";
    format!(
        "[Unit]\nDescription=Cairn {role}\nAfter=network-online.target\nWants=network-online.target\n\n\
         [Service]\nEnvironmentFile={r}/etc/cairn/{role}.env\nExecStart={r}/usr/local/bin/cairn {args}\n\
         Restart=always\nRestartSec=2\nLimitNOFILE=1048576\n{extra}\n[Install]\nWantedBy=multi-user.target\n",
        role = p.role,
        args = p.args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
        // An agent's restart leaves its tasks running (they are recovered); it manages its
        // tasks' cgroups itself.
        extra = if agent { "Delegate=yes\nKillMode=process\n" } else { "" },
    )
}

fn env_text(p: &NodePlan) -> String {
    p.env
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect::<String>()
}

fn fingerprint(role: &str, args: &[String], binary_sha: &str) -> String {
    let mut h = Sha256::new();
    h.update(role.as_bytes());
    for a in args {
        h.update(a.as_bytes());
        h.update([0]);
    }
    h.update(binary_sha.as_bytes());
    hex::encode(&h.finalize()[..12])
}

/// The master node of `host`: bootstrapping with every first master in `--peers`, or, when
/// the cluster exists and this master is new, joining by token through the others.
pub fn master_plan(
    cfg: &ClusterConfig,
    host: &HostConfig,
    state: &State,
    binary_sha: &str,
    join: Option<(&str, &str)>,
) -> NodePlan {
    let r = host.r();
    let id = state.masters.get(&host.address).copied().unwrap_or(0);
    let mut args = vec![
        "master".to_string(),
        "--node-id".into(),
        id.to_string(),
        "--listen".into(),
        format!("{}:{API_PORT}", host.address),
        "--peer-listen".into(),
        format!("{}:{PEER_PORT}", host.address),
        "--data-dir".into(),
        format!("{r}/var/lib/cairn/master"),
    ];
    let mut env = vec![("CAIRN_TOKEN".to_string(), state.token.clone())];
    match join {
        Some((token, via)) => {
            args.extend(["--join".into(), "--join-via".into(), via.to_string()]);
            if !token.is_empty() {
                env.push(("CAIRN_JOIN_TOKEN".into(), token.to_string()));
            }
        }
        None => {
            let peers = cfg
                .masters()
                .filter_map(|m| {
                    let id = state.masters.get(&m.address)?;
                    Some(format!(
                        "{id}@{}:{API_PORT}/{}:{PEER_PORT}",
                        m.address, m.address
                    ))
                })
                .collect::<Vec<_>>()
                .join(",");
            args.extend(["--peers".into(), peers]);
            env.push(("CAIRN_PEER_TOKEN".into(), state.peer_token.clone()));
        }
    }
    let fingerprint = fingerprint("master", &args, binary_sha);
    NodePlan {
        role: "master",
        args,
        env,
        fingerprint,
    }
}

pub fn agent_plan(
    cfg: &ClusterConfig,
    host: &HostConfig,
    binary_sha: &str,
    join_token: Option<&str>,
) -> NodePlan {
    let r = host.r();
    let masters = cfg
        .masters()
        .map(|m| format!("{}:{API_PORT}", m.address))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "agent".to_string(),
        "--masters".into(),
        masters,
        "--listen".into(),
        format!("{}:{AGENT_PORT}", host.address),
        "--data-dir".into(),
        format!("{r}/var/lib/cairn/agent"),
        "--dns-listen".into(),
        format!("{}:53", host.address),
    ];
    if let Some(res) = &host.resources {
        args.extend(["--resources".into(), res.clone()]);
    }
    if let Some(a) = &host.attributes {
        args.extend(["--attributes".into(), a.clone()]);
    }
    let fingerprint = fingerprint("agent", &args, binary_sha);
    let env = join_token
        .map(|t| vec![("CAIRN_JOIN_TOKEN".to_string(), t.to_string())])
        .unwrap_or_default();
    NodePlan {
        role: "agent",
        args,
        env,
        fingerprint,
    }
}

/// What a host needs this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Running with the same binary and configuration.
    Unchanged,
    Install,
    /// Installed but with another binary or configuration (or stopped): replace and restart.
    Update,
}

pub fn action(
    facts: &Facts,
    role: &str,
    applied_fingerprint: Option<&str>,
    plan: &NodePlan,
) -> Action {
    match applied_fingerprint {
        None => Action::Install,
        Some(f) if f == plan.fingerprint && facts.running.contains(role) => Action::Unchanged,
        Some(_) => Action::Update,
    }
}

/// Starts (or restarts) a node on a host with its service manager.
pub fn start_script(p: &NodePlan, r: &str, manager: &str) -> String {
    let role = p.role;
    let stop = stop_script(role, r, manager);
    if manager == "systemd" {
        format!("{stop}\nsystemctl daemon-reload && systemctl enable --now cairn-{role}.service")
    } else {
        let args = p
            .args
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "{stop}\nmkdir -p {r}/var/log {r}/var/lib/cairn\n\
             set -a; . {r}/etc/cairn/{role}.env; set +a\n\
             nohup setsid {r}/usr/local/bin/cairn {args} >> {r}/var/log/cairn-{role}.log 2>&1 < /dev/null &\n\
             echo $! > {r}/var/lib/cairn/{role}.pid"
        )
    }
}

/// Stops a node (its tasks stay, as on a restart) if it runs.
pub fn stop_script(role: &str, r: &str, manager: &str) -> String {
    if manager == "systemd" {
        format!("systemctl stop cairn-{role}.service 2>/dev/null || true")
    } else {
        format!(
            "P={r}/var/lib/cairn/{role}.pid; if [ -s $P ] && kill -0 $(cat $P) 2>/dev/null; then \
             kill $(cat $P); for i in $(seq 1 100); do kill -0 $(cat $P) 2>/dev/null || break; sleep 0.1; done; \
             kill -9 $(cat $P) 2>/dev/null; fi; rm -f $P; true"
        )
    }
}

/// Removes Cairn from a host: nodes stopped, every process of the installed binary (task
/// supervisors and PID 1s included: they are re-executions of it) killed, units, binary,
/// configuration and data removed. (The pattern is anchored at the command's start: this
/// script's own shell and the ssh session carry the paths in their command lines too.)
pub fn reset_script(r: &str, manager: &str) -> String {
    let mut s = String::new();
    for role in ["agent", "master"] {
        s.push_str(&stop_script(role, r, manager));
        s.push('\n');
        if manager == "systemd" {
            s.push_str(&format!(
                "systemctl disable cairn-{role}.service 2>/dev/null || true\n"
            ));
        }
    }
    s.push_str(&format!(
        "pkill -9 -f '^{r}/usr/local/bin/cairn( |$)' 2>/dev/null || true\n\
         rm -rf {r}/etc/systemd/system/cairn-master.service {r}/etc/systemd/system/cairn-agent.service \
         {r}/etc/cairn {r}/usr/local/bin/cairn {r}/var/lib/cairn {r}/var/log/cairn-master.log {r}/var/log/cairn-agent.log\n\
         [ -d /run/systemd/system ] && systemctl daemon-reload 2>/dev/null; true\n"
    ));
    s
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The PKI and tokens of the installer's state dir, made on first use.
pub fn local_pki(cfg: &ClusterConfig) -> Result<(Ca, State)> {
    let dir = cfg.state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pki_dir = dir.join("pki");
    let ca = if pki_dir.join(pki::CA_KEY).exists() {
        Ca::load(&pki_dir)?
    } else {
        let ca = Ca::generate(&cfg.name)?;
        ca.save(&pki_dir)?;
        ca
    };
    pki::ensure_admin(&ca, &pki_dir, "installer")?;
    let state_file = dir.join("state.json");
    let mut state: State = match std::fs::read(&state_file) {
        Ok(b) => serde_json::from_slice(&b).context("state.json")?,
        Err(_) => State::default(),
    };
    if state.token.is_empty() {
        state.token = random_hex(16);
        state.peer_token = random_hex(24);
    }
    Ok((ca, state))
}

pub fn save_state(cfg: &ClusterConfig, state: &State) -> Result<()> {
    pki::write_file(
        &cfg.state_dir().join("state.json"),
        &serde_json::to_vec_pretty(state)?,
        0o600,
    )
}

fn random_hex(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Writes a node's files on its host: configuration (0600), unit, and for masters their TLS
/// directory (with the CA key: masters sign joining agents).
pub fn write_node(ssh: &Ssh, host: &HostConfig, p: &NodePlan, ca: Option<&Ca>) -> Result<()> {
    let r = host.r();
    let a = &host.address;
    ssh.put(
        a,
        &format!("{r}/etc/cairn/{}.env", p.role),
        env_text(p).as_bytes(),
        0o600,
    )?;
    ssh.put(
        a,
        &format!("{r}/etc/systemd/system/cairn-{}.service", p.role),
        unit_text(p, &r).as_bytes(),
        0o644,
    )?;
    if let Some(ca) = ca {
        let id = p.args.get(2).cloned().unwrap_or_default();
        let (cert, key) = ca.issue(Role::Master, &id, std::slice::from_ref(&host.address))?;
        let dir = format!("{r}/var/lib/cairn/master/tls");
        ssh.put(a, &format!("{dir}/ca.crt"), ca.cert_pem.as_bytes(), 0o644)?;
        ssh.put(a, &format!("{dir}/ca.key"), ca.key_pem().as_bytes(), 0o600)?;
        ssh.put(a, &format!("{dir}/node.crt"), cert.as_bytes(), 0o644)?;
        ssh.put(a, &format!("{dir}/node.key"), key.as_bytes(), 0o600)?;
    }
    ssh.put(
        a,
        &format!("{r}/etc/cairn/{}.applied", p.role),
        p.fingerprint.as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// The fingerprint a host's node was last applied with.
pub fn applied(ssh: &Ssh, host: &HostConfig, role: &str) -> Option<String> {
    ssh.run(
        &host.address,
        &format!(
            "cat {}/etc/cairn/{role}.applied 2>/dev/null || true",
            host.r()
        ),
    )
    .ok()
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
}

pub fn gather_facts(ssh: &Ssh, host: &HostConfig) -> Result<Facts> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let out = ssh.run(&host.address, &facts_script(&host.r()))?;
    Ok(parse_facts(&out, now))
}

mod apply;
pub use apply::{apply, reset, upgrade, Applied, Done};

#[cfg(test)]
mod tests;
