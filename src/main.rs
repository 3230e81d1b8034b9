//! The `cairn` binary: role dispatch (`master`, `agent`, `dev`) and client commands
//! (`cluster`, `agent list`, `kv`, `bench`). Thin: the work lives in the library crates.

mod bench;
mod bench_services;
mod client;
mod context;
mod install_cli;
mod lab_cli;
mod package_cli;
mod service_cli;
mod tls_cli;

use anyhow::Context;
use cairn_kernel::master::{Master, MasterConfig};
use cairn_kernel::resources::{parse_attributes, parse_resources};
use cairn_raft::node::NodeConfig;
use cairn_raft::MasterNode;
use cairn_runtime::agent::{Agent, AgentConfig};
use clap::{Args, Parser, Subcommand};
use client::Client;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "A datacenter operating system in one binary"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a master: a voter in the Raft group that holds cluster state, serving the API.
    Master(MasterArgs),
    /// Run an agent (`cairn agent --masters ...`), or list agents (`cairn agent list`).
    Agent(AgentCmdArgs),
    /// Run a one-node cluster (a master and an agent) in this process, for development.
    Dev(DevArgs),
    /// Inspect and change the master group.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Read and write cluster variables.
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// Print (and with -f follow) a task's stdout or stderr from its agent's sandbox.
    Logs {
        task: String,
        /// Read from this agent (HOST:PORT of its API) instead of through the masters.
        #[arg(long, env = "CAIRN_AGENT")]
        agent: Option<String>,
        /// Master API address (the masters read the task's sandbox from its agent).
        #[arg(long, env = "CAIRN_MASTER", default_value = "http://127.0.0.1:5050")]
        master: String,
        #[arg(short, long)]
        follow: bool,
        /// Show stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        #[arg(long, env = "CAIRN_TOKEN", default_value = "", hide_env_values = true)]
        token: String,
    },
    /// Run a workload: `cairn run app.toml`, `cairn run --wasm app.wasm [-- ARGS]`, or a quick
    /// native job `cairn run -- CMD ARGS`. Waits until its tasks run (jobs: finish) unless
    /// --detach.
    Run(RunArgs),
    /// List tasks (all, or of one workload).
    Ps {
        #[arg(long)]
        workload: Option<String>,
        /// Include tasks that ended.
        #[arg(short, long)]
        all: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow state changes (task states, workloads, agents) as they are committed.
    Events {
        /// Comma-separated topics: task, workload, agent, kv.
        #[arg(long)]
        topic: Option<String>,
        /// Replay from after this Raft index.
        #[arg(long)]
        index: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roll-outs of workload versions (rolling changes, restarts, rollbacks).
    Deployment {
        #[command(subcommand)]
        cmd: DeploymentCmd,
    },
    /// Stateful services: pods with stable identity and volumes, driven by plans.
    Service {
        #[command(subcommand)]
        cmd: service_cli::ServiceCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Which cluster the CLI talks to: `context list`, `use NAME`, `rm NAME` (written by
    /// `cairn dev` and `cairn lab up`, kept in ~/.config/cairn/config.toml).
    Context {
        #[command(subcommand)]
        cmd: ContextCmd,
    },
    /// Clusters on this machine: `lab up`, `status`, `list`, `down`, `chaos kill|restart`.
    Lab {
        #[command(subcommand)]
        cmd: lab_cli::LabCmd,
    },
    /// The package catalog: search, describe, render, install, list, update, uninstall,
    /// repo add.
    Package {
        #[command(subcommand)]
        cmd: package_cli::PackageCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inspect and change workloads.
    Workload {
        #[command(subcommand)]
        cmd: WorkloadCmd,
    },
    /// Manage the OCI images of an agent (imported offline from image-layout archives).
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// A real cluster over SSH from one file: `install apply --config cluster.toml
    /// [--dry-run]`, `install reset --config cluster.toml`.
    Install {
        #[command(subcommand)]
        cmd: install_cli::InstallCmd,
    },
    /// The cluster CA: `ca init`, `ca issue` (node and admin certificates), `ca hash`.
    Ca {
        #[command(subcommand)]
        cmd: tls_cli::CaCmd,
    },
    /// Join tokens for agents: `token create`, `list`, `revoke ID`.
    Token {
        #[command(subcommand)]
        cmd: tls_cli::TokenCmd,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Load generators for BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// Master API address.
    #[arg(
        long,
        env = "CAIRN_MASTER",
        default_value = "http://127.0.0.1:5050",
        global = true
    )]
    master: String,
    /// Cluster token.
    #[arg(
        long,
        env = "CAIRN_TOKEN",
        default_value = "",
        global = true,
        hide_env_values = true
    )]
    token: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Args)]
struct RaftTuning {
    /// Leader heartbeat interval (ms). Default 100 (etcd's); `--fast-failover` sets 30.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Minimum election timeout (ms); the maximum (openraft's leader lease) is 4/3 of it. A
    /// follower that hears no leader for max + random [0, min) asks for pre-votes, then
    /// campaigns. Default 1000 (etcd's); `--fast-failover` sets 150.
    #[arg(long)]
    election_timeout_ms: Option<u64>,
    /// Aggressive timings (heartbeat 30 ms, election 150 ms) for quiet, fast networks: quicker
    /// failover, but spurious elections when a master is starved of CPU.
    #[arg(long)]
    fast_failover: bool,
    /// Take a snapshot every this many log entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_logs: u64,
    /// Entries kept in the log behind a snapshot, for slow followers.
    #[arg(long, default_value_t = 1_000)]
    keep_logs: u64,
    /// How long a write may wait for a leader and a quorum before failing with 503.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Agents silent this long are marked unreachable.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    agent_timeout: Duration,
    /// Tasks of an agent unreachable this long are lost and rescheduled elsewhere.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    reschedule_after: Duration,
    /// Ended tasks kept per workload (and per stateful-service pod type) past the retention.
    #[arg(long, default_value_t = 10)]
    task_gc_keep: usize,
    /// Ended tasks younger than this are always kept; older ones beyond --task-gc-keep are
    /// forgotten (a job's current completions always stay).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    task_gc_retention: Duration,
    /// Largest accepted API request body.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// In-flight bound for agents' heartbeats (a class of their own: a refused heartbeat
    /// makes an agent unreachable); past it they get 429 with Retry-After.
    #[arg(long, default_value_t = 2048)]
    max_in_flight_heartbeat: usize,
    /// In-flight bound for agents' registration and status reports.
    #[arg(long, default_value_t = 512)]
    max_in_flight_agent: usize,
    /// In-flight bound for long-polls, blocking queries and event streams.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight_longpoll: usize,
    /// In-flight bound for everything else (users, tools).
    #[arg(long, default_value_t = 256)]
    max_in_flight_user: usize,
}

impl RaftTuning {
    fn limits(&self) -> anyhow::Result<cairn_kernel::admission::Limits> {
        for (name, v) in [
            ("--max-in-flight-heartbeat", self.max_in_flight_heartbeat),
            ("--max-in-flight-agent", self.max_in_flight_agent),
            ("--max-in-flight-longpoll", self.max_in_flight_longpoll),
            ("--max-in-flight-user", self.max_in_flight_user),
        ] {
            anyhow::ensure!(v > 0, "{name} must be at least 1");
        }
        Ok(cairn_kernel::admission::Limits {
            heartbeat: self.max_in_flight_heartbeat,
            agent: self.max_in_flight_agent,
            longpoll: self.max_in_flight_longpoll,
            user: self.max_in_flight_user,
        })
    }
}

impl RaftTuning {
    /// (heartbeat, minimum election timeout) in ms: explicit flags, else the profile's.
    /// The defaults follow *broadcast time << election timeout* on a loaded host: under the
    /// overload test (BENCHMARKS.md) a 30/100 ms cluster elected forever, 100/1000 held.
    fn timings(&self) -> (u64, u64) {
        let (hb, el) = if self.fast_failover {
            (30, 150)
        } else {
            (100, 1000)
        };
        (
            self.heartbeat_ms.unwrap_or(hb),
            self.election_timeout_ms.unwrap_or(el),
        )
    }
}

#[derive(Args)]
struct MasterArgs {
    /// This master's id in the Raft group (1, 2, 3, ...).
    #[arg(long)]
    node_id: u64,
    /// Address to serve the API on.
    #[arg(long, default_value = "127.0.0.1:5050")]
    listen: SocketAddr,
    /// Address clients and agents use to reach this master's API (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Address to serve Raft RPCs on, apart from the API (default: --listen's port + 2).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Address other masters use to reach this one's Raft RPCs (default: --peer-listen).
    #[arg(long)]
    peer_advertise: Option<String>,
    /// The initial masters, `ID@API_HOST:PORT[/PEER_HOST:PORT],...`, the same on every master
    /// (the peer address defaults to the API port + 2).
    #[arg(long, default_value = "")]
    peers: String,
    /// The masters' own secret for Raft RPCs and forwarding between masters; users' and
    /// agents' tokens are not accepted there.
    /// (Not needed with --join-token, which brings it.)
    #[arg(
        long,
        env = "CAIRN_PEER_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    peer_token: String,
    /// Join an existing cluster instead of bootstrapping (then run `cairn cluster add-master`).
    #[arg(long)]
    join: bool,
    /// Join with a master token (`cairn token create --role master`): this master gets its
    /// certificate, the CA key and the masters' Raft credential from --join-via, and asks to be
    /// added as a voter itself.
    #[arg(long, env = "CAIRN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Masters to join through (HOST:PORT of their API, comma-separated), with --join-token.
    #[arg(long)]
    join_via: Option<String>,
    #[arg(long)]
    data_dir: PathBuf,
    /// Cluster secret shared by masters, agents and clients.
    #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
    token: String,
    /// Serve the built-in DNS (zone `cairn.`) on this UDP and TCP address, e.g.
    /// 127.0.0.1:5053 or 0.0.0.0:53 (default: no DNS server).
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Resolvers for names outside `cairn.`: `IP[:PORT],...`, or `none` to refuse them
    /// (air-gapped); default: the nameservers of /etc/resolv.conf.
    #[arg(long)]
    dns_upstream: Option<String>,
    #[command(flatten)]
    tls: tls_cli::TlsArgs,
    #[command(flatten)]
    tuning: RaftTuning,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentCmdArgs {
    #[command(subcommand)]
    cmd: Option<AgentSub>,
    #[command(flatten)]
    run: AgentArgs,
}

#[derive(Subcommand)]
enum AgentSub {
    /// List the agents the masters know.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Master addresses, `HOST:PORT,...`.
    #[arg(long, default_value = "127.0.0.1:5050")]
    masters: String,
    #[arg(long, default_value = "127.0.0.1:5051")]
    listen: SocketAddr,
    /// Address masters use to reach this agent (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "CAIRN_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
    /// Resources in the Mesos syntax, e.g. "cpus:2;mem:2048;disk:10000;ports:[31000-32000]"
    /// (detected from the host when not given).
    #[arg(long)]
    resources: Option<String>,
    /// Attributes, e.g. "rack:r1;zone:a".
    #[arg(long, default_value = "")]
    attributes: String,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Where cgroups are mounted (v1 or v2 is detected at start).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Serve the built-in DNS (zone `cairn.`) on this UDP and TCP address, e.g.
    /// 127.0.0.1:5053 or 0.0.0.0:53 (default: no DNS server).
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Resolvers for names outside `cairn.`: `IP[:PORT],...`, or `none` to refuse them
    /// (air-gapped); default: the nameservers of /etc/resolv.conf.
    #[arg(long)]
    dns_upstream: Option<String>,
    /// Lightweight mode for scale tests: register this many simulated agents that report
    /// their assigned tasks running without running them (no tasks, no API).
    #[arg(long)]
    simulate: Option<usize>,
    /// On SIGTERM, kill every task first (labs and tests); by default a stopping agent
    /// leaves its tasks running and recovers them when it starts again.
    #[arg(long)]
    kill_tasks_on_exit: bool,
    /// Join the cluster with this token (`cairn token create`) when the TLS directory has no
    /// certificate yet: the agent checks the masters' CA against the token, then gets its
    /// certificate. No cluster token is needed.
    #[arg(long, env = "CAIRN_JOIN_TOKEN", hide_env_values = true)]
    join: Option<String>,
    #[command(flatten)]
    tls: tls_cli::TlsArgs,
}

#[derive(Args)]
struct DevArgs {
    /// Where to keep state (default: a new directory under /var/lib/cairn for root, else
    /// $XDG_STATE_HOME/cairn, removed when `cairn dev` exits).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:5050")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:5051")]
    agent_listen: SocketAddr,
    /// Where the agent serves the built-in DNS (zone `cairn.`), UDP and TCP.
    #[arg(long, default_value = "127.0.0.1:5053")]
    dns_listen: SocketAddr,
    /// Resolvers for names outside `cairn.`: `IP[:PORT],...`, or `none` to refuse them;
    /// default: the nameservers of /etc/resolv.conf.
    #[arg(long)]
    dns_upstream: Option<String>,
    /// Plaintext instead of TLS (by default `cairn dev` makes a CA in its data dir, serves
    /// the API, UI and agent over TLS and writes the CA into the CLI context).
    #[arg(long)]
    insecure: bool,
    /// Cluster token (default: generated and printed).
    #[arg(long, env = "CAIRN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term and indexes.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a master (started with `cairn master --join`): learner first, then voter.
    AddMaster {
        #[arg(long)]
        id: u64,
        /// The new master's API address.
        #[arg(long)]
        addr: String,
        /// The new master's Raft peer address (default: the API port + 2).
        #[arg(long)]
        peer: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a master from the voters.
    RemoveMaster {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct RunArgs {
    /// A workload spec (TOML; JSON if it ends in .json).
    spec: Option<PathBuf>,
    /// Run this Wasm module or component as a job.
    #[arg(long, conflicts_with = "spec")]
    wasm: Option<String>,
    /// Workload id for --wasm and quick commands (default: run-<random>).
    #[arg(long)]
    id: Option<String>,
    /// Return once the workload is accepted.
    #[arg(short, long)]
    detach: bool,
    /// How long to wait for the tasks.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    client: ClientArgs,
    /// The command of a quick native job (after `--`), or the Wasm guest's arguments.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum WorkloadCmd {
    /// All workloads with their live task counts.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A workload's spec and tasks (JSON).
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change the number of instances (running tasks stay).
    Scale {
        id: String,
        instances: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop a workload: its tasks are killed, the spec stays.
    Stop {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start a stopped workload.
    Start {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a workload and kill its tasks.
    Rm {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace every task with a rolling deployment of the same spec.
    Restart {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The workload's roll-outs, newest first.
    History {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum DeploymentCmd {
    /// Roll-outs, newest first.
    List {
        #[arg(long)]
        workload: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One roll-out (`WORKLOAD@VERSION`) with its tasks.
    Show {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args, Clone)]
struct AgentClientArgs {
    /// The agent's API (HOST:PORT or URL).
    #[arg(long, env = "CAIRN_AGENT", default_value = "127.0.0.1:5051")]
    agent: String,
    #[arg(long, env = "CAIRN_TOKEN", default_value = "", hide_env_values = true)]
    token: String,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import an OCI image-layout archive (`skopeo copy ... oci-archive:FILE`, `umoci`).
    Import {
        file: std::path::PathBuf,
        /// Name to give the image (default: the name recorded in the archive).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        agent: AgentClientArgs,
    },
    /// List the images on an agent.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentClientArgs,
    },
    /// Remove an image (refused while a task uses it).
    Rm {
        name: String,
        #[command(flatten)]
        agent: AgentClientArgs,
    },
}

#[derive(Subcommand)]
enum KvCmd {
    Get {
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// The peer address a master has when none is given: its API port + 2 (5050 -> 5052).
fn default_peer(api: &str) -> anyhow::Result<String> {
    MasterNode::default_peer(api).map_err(anyhow::Error::msg)
}

fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, MasterNode>> {
    let mut out = BTreeMap::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addrs) = p.split_once('@').with_context(|| {
            format!("--peers: {p:?} is not ID@HOST:PORT, e.g. 1@127.0.0.1:5050")
        })?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("--peers: {id:?} is not a number"))?;
        if id == 0 {
            anyhow::bail!("--peers: master ids start at 1");
        }
        let (api, peer) = match addrs.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (addrs, None),
        };
        api.parse::<SocketAddr>()
            .with_context(|| format!("--peers: {api:?} is not HOST:PORT"))?;
        let peer = match peer {
            Some(p) => {
                p.parse::<SocketAddr>()
                    .with_context(|| format!("--peers: peer address {p:?} is not HOST:PORT"))?;
                p.to_string()
            }
            None => default_peer(api).map_err(|e| anyhow::anyhow!("--peers: {e}"))?,
        };
        let node = MasterNode {
            api: api.to_string(),
            peer,
        };
        if out.insert(id, node).is_some() {
            anyhow::bail!("--peers: id {id} appears twice");
        }
    }
    Ok(out)
}

fn node_config(
    id: u64,
    node: MasterNode,
    peer_listen: SocketAddr,
    data_dir: PathBuf,
    peer_token: String,
    t: &RaftTuning,
) -> NodeConfig {
    NodeConfig {
        id,
        node,
        peer_listen,
        data_dir,
        peer_token,
        heartbeat_ms: t.timings().0,
        election_timeout_ms: t.timings().1,
        snapshot_logs: t.snapshot_logs,
        keep_logs: t.keep_logs,
        request_timeout: t.request_timeout,
    }
}

async fn wait_for_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_master(a: MasterArgs) -> anyhow::Result<()> {
    cairn_runtime::tasks::raise_fd_limit();
    if a.token.len() < 8 {
        anyhow::bail!("--token must be at least 8 characters (the cluster secret)");
    }
    let (hb, el) = a.tuning.timings();
    if hb == 0 || el <= hb {
        anyhow::bail!("--election-timeout-ms must be larger than --heartbeat-ms (> 0)");
    }
    let peers = parse_peers(&a.peers)?;
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.to_string());
    let peer_listen = match a.peer_listen {
        Some(p) => p,
        None => default_peer(&a.listen.to_string())?.parse()?,
    };
    let peer_advertise = a
        .peer_advertise
        .clone()
        .unwrap_or_else(|| peer_listen.to_string());
    let mut join = a.join;
    let mut peer_token = a.peer_token.clone();
    let mut join_via = Vec::new();
    if let Some(jt) = &a.join_token {
        anyhow::ensure!(!a.tls.insecure, "--join-token needs TLS: drop --insecure");
        join_via = a
            .join_via
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        anyhow::ensure!(
            !join_via.is_empty(),
            "--join-token needs --join-via HOST:PORT of a master's API"
        );
        let host = advertise
            .rsplit_once(':')
            .map_or(advertise.as_str(), |(h, _)| h);
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pt = tls_cli::join_master(
            jt,
            &join_via,
            &a.tls.dir(&a.data_dir),
            &a.data_dir,
            a.node_id,
            &tls_cli::node_addresses(host, &hostname),
        )
        .await?;
        if peer_token.is_empty() {
            peer_token = pt;
        }
        join = true;
    } else if peer_token.is_empty() {
        // A master that joined by token earlier kept the masters' credential.
        if let Ok(s) = std::fs::read_to_string(a.data_dir.join("peer-token")) {
            peer_token = s.trim().to_string();
        }
    }
    if peers.is_empty() && !join {
        anyhow::bail!(
            "give --peers ID@HOST:PORT,... (this master included), or --join to be added later"
        );
    }
    if peer_token.len() < 16 {
        anyhow::bail!("--peer-token (CAIRN_PEER_TOKEN) must be at least 16 characters");
    }
    if peer_token == a.token {
        anyhow::bail!("--peer-token must differ from --token: users' tokens may not drive Raft");
    }
    tls_cli::init_node(&a.tls, &a.data_dir)?;
    let node = node_config(
        a.node_id,
        MasterNode {
            api: advertise.clone(),
            peer: peer_advertise.clone(),
        },
        peer_listen,
        a.data_dir.clone(),
        peer_token,
        &a.tuning,
    );
    let master = Master::start(MasterConfig {
        node,
        token: a.token.clone(),
        listen: a.listen,
        peers,
        join,
        agent_timeout: a.tuning.agent_timeout,
        reschedule_after: a.tuning.reschedule_after,
        task_gc_keep: a.tuning.task_gc_keep,
        task_gc_retention: a.tuning.task_gc_retention,
        max_body: a.tuning.max_body_bytes,
        limits: a.tuning.limits()?,
        ui: Some(cairn_ui::router),
        dns: dns_config(a.dns_listen, a.dns_upstream.as_deref())?,
    })
    .await?;
    tracing::info!(addr = %master.addr, id = a.node_id, "master listening");
    if a.join_token.is_some() {
        tokio::spawn(tls_cli::add_self(
            join_via,
            a.node_id,
            advertise,
            peer_advertise,
        ));
    }
    wait_for_signal().await;
    // Bounded: whatever is acknowledged is already fsynced, so a stop that overruns is cut.
    if tokio::time::timeout(Duration::from_millis(4500), master.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown took over 4.5 s; exiting anyway");
    }
    std::process::exit(0)
}

async fn run_agent(a: AgentArgs) -> anyhow::Result<()> {
    let data_dir = a
        .data_dir
        .context("--data-dir is required to run an agent")?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let resources = match &a.resources {
        Some(r) => parse_resources(r).map_err(|e| anyhow::anyhow!("--resources: {e}"))?,
        None => cairn_runtime::detect::detect(&data_dir),
    };
    let mut attributes =
        parse_attributes(&a.attributes).map_err(|e| anyhow::anyhow!("--attributes: {e}"))?;
    advertise_packages(&mut attributes);
    let masters: Vec<String> = a
        .masters
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let hostname = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    if a.simulate.is_none() {
        if let Some(token) = &a.join {
            anyhow::ensure!(!a.tls.insecure, "--join needs TLS: drop --insecure");
            let dir = a.tls.dir(&data_dir);
            if !dir.join(cairn_installer::pki::NODE_CERT).exists() {
                let id = cairn_runtime::agent::load_or_create_id(&data_dir)?;
                let adv = a.advertise.clone().unwrap_or_else(|| a.listen.to_string());
                let host = adv.rsplit_once(':').map_or(adv.as_str(), |(h, _)| h);
                tls_cli::join(
                    token,
                    &masters,
                    &dir,
                    &id,
                    &tls_cli::node_addresses(host, &hostname),
                )
                .await?;
                tracing::info!(%id, "joined: certificate written to {}", dir.display());
            }
        }
    }
    tls_cli::init_node(&a.tls, &data_dir)?;
    if a.token.is_empty() && cairn_raft::tls::current().is_none() {
        anyhow::bail!("--token (CAIRN_TOKEN) is required without TLS");
    }
    let cfg = AgentConfig {
        masters,
        listen: a.listen,
        advertise: a.advertise,
        data_dir,
        token: a.token,
        resources,
        attributes,
        heartbeat_interval: a.heartbeat_interval,
        cgroup_root: a.cgroup_root,
        dns: dns_config(a.dns_listen, a.dns_upstream.as_deref())?,
        hostname,
    };
    if let Some(n) = a.simulate {
        anyhow::ensure!(
            (1..=100_000).contains(&n),
            "--simulate: give 1 to 100000 agents"
        );
        let prefix = format!(
            "sim-{}",
            cairn_runtime::agent::load_or_create_id(&cfg.data_dir)?
                .chars()
                .take(8)
                .collect::<String>()
        );
        tracing::info!(agents = n, %prefix, "running simulated agents");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let sims = tokio::spawn(cairn_runtime::sim::run(cfg, n, prefix, stop_rx));
        wait_for_signal().await;
        let _ = stop.send(true);
        let _ = sims.await;
        return Ok(());
    }
    let agent = Agent::start(cfg).await?;
    tracing::info!(addr = %agent.addr, "agent listening");
    wait_for_signal().await;
    if a.kill_tasks_on_exit {
        agent.kill_all_tasks(Duration::from_secs(15)).await;
    }
    agent.shutdown().await;
    Ok(())
}

/// The DNS server of `--dns-listen` / `--dns-upstream` (none without `--dns-listen`).
fn dns_config(
    listen: Option<SocketAddr>,
    upstream: Option<&str>,
) -> anyhow::Result<Option<cairn_kernel::dns_server::DnsConfig>> {
    let Some(listen) = listen else {
        anyhow::ensure!(
            upstream.is_none(),
            "--dns-upstream needs --dns-listen (the address to serve DNS on)"
        );
        return Ok(None);
    };
    let upstream =
        cairn_kernel::dns_server::upstreams(upstream, listen).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some(cairn_kernel::dns_server::DnsConfig {
        listen,
        upstream,
    }))
}

/// Where a user's Cairn state lives: `/var/lib/cairn` for root, else `$XDG_STATE_HOME/cairn`
/// (default `~/.local/state/cairn`). Not /tmp: tasks get a private /tmp of their own.
fn state_home() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/cairn");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("cairn"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/state/cairn"),
    }
}

/// Adds the `cairn.packages` attribute (the bundled packages whose host binaries this agent
/// has) unless the operator gave one with `--attributes`. Probed at start: an agent started
/// before the binaries were installed says so until it restarts.
fn advertise_packages(attributes: &mut BTreeMap<String, String>) {
    let key = cairn_universe::PACKAGES_ATTRIBUTE;
    if attributes.contains_key(key) {
        return;
    }
    let Ok(all) = cairn_universe::bundled() else {
        return;
    };
    let names = cairn_universe::runnable(&all, |b| std::path::Path::new(b).exists());
    // An attribute value is not empty: "none" when nothing can run.
    let v = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(",")
    };
    attributes.insert(key.to_string(), v);
}

async fn run_dev(a: DevArgs) -> anyhow::Result<()> {
    let (data_dir, _tmp) = match a.data_dir {
        Some(d) => (d, None),
        None => {
            let base = state_home();
            std::fs::create_dir_all(&base)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", base.display()))?;
            let t = tempfile::Builder::new()
                .prefix("cairn-dev-")
                .tempdir_in(&base)?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let token = a.token.unwrap_or_else(|| random_hex(16));
    let pki = if a.insecure {
        tls_cli::init_node(
            &tls_cli::TlsArgs {
                tls_dir: None,
                insecure: true,
            },
            &data_dir,
        )?;
        None
    } else {
        let p = tls_cli::dev_pki(&data_dir, &a.listen.ip().to_string())?;
        cairn_raft::tls::init(Some(cairn_raft::tls::NodeTls::load(&p.tls_dir)?))?;
        Some(p)
    };
    let scheme = cairn_raft::tls::scheme();
    let tuning = RaftTuning {
        heartbeat_ms: None,
        election_timeout_ms: None,
        fast_failover: false,
        snapshot_logs: 10_000,
        keep_logs: 1_000,
        request_timeout: Duration::from_secs(10),
        agent_timeout: Duration::from_secs(10),
        reschedule_after: Duration::from_secs(30),
        task_gc_keep: 10,
        task_gc_retention: Duration::from_secs(3600),
        max_body_bytes: 1024 * 1024,
        max_in_flight_heartbeat: 2048,
        max_in_flight_agent: 512,
        max_in_flight_longpoll: 20_000,
        max_in_flight_user: 256,
    };
    let peer_token = random_hex(24);
    let node = node_config(
        1,
        MasterNode {
            api: a.listen.to_string(),
            peer: String::new(),
        },
        SocketAddr::new(a.listen.ip(), 0),
        data_dir.join("master"),
        peer_token,
        &tuning,
    );
    let master = Master::start(MasterConfig {
        node,
        token: token.clone(),
        listen: a.listen,
        peers: BTreeMap::new(),
        join: false,
        agent_timeout: tuning.agent_timeout,
        reschedule_after: tuning.reschedule_after,
        task_gc_keep: tuning.task_gc_keep,
        task_gc_retention: tuning.task_gc_retention,
        max_body: tuning.max_body_bytes,
        limits: tuning.limits()?,
        ui: Some(cairn_ui::router),
        dns: None,
    })
    .await?;
    let agent_dir = data_dir.join("agent");
    let agent = Agent::start(AgentConfig {
        masters: vec![master.addr.to_string()],
        listen: a.agent_listen,
        advertise: None,
        data_dir: agent_dir.clone(),
        token: token.clone(),
        resources: cairn_runtime::detect::detect(&data_dir),
        attributes: {
            let mut a = BTreeMap::new();
            advertise_packages(&mut a);
            a
        },
        heartbeat_interval: Duration::from_secs(1),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        dns: dns_config(Some(a.dns_listen), a.dns_upstream.as_deref())?,
        hostname: hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into()),
    })
    .await?;
    // A daemon: a closed stdout (e.g. `cairn dev | head -3`) must not stop it.
    macro_rules! say {
        ($($t:tt)*) => {{
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), $($t)*);
        }};
    }
    say!("cairn dev is running (one master, one agent)");
    say!(
        "  UI:         {scheme}://{}/ui/  (sign in with the token)",
        master.addr
    );
    say!("  API:        {scheme}://{}/api/v1/cluster", master.addr);
    if let Some(p) = &pki {
        say!(
            "  CA:         {}  (trust it in your browser, or curl --cacert it)",
            p.ca_cert.display()
        );
    }
    if let Some(dns) = agent.dns_addr {
        say!(
            "  DNS:        {dns} (udp, tcp; zone cairn.)  try: dig @{} -p {} leader.cairn",
            dns.ip(),
            dns.port()
        );
    }
    say!("  token:      {token}");
    say!("  data dir:   {}", data_dir.display());
    match context::set_current(
        "dev",
        context::Ctx {
            master: format!("{scheme}://{}", master.addr),
            token: token.clone(),
            ca: pki.as_ref().map(|p| p.ca_cert.clone()),
            cert: pki.as_ref().map(|p| p.admin_cert.clone()),
            key: pki.as_ref().map(|p| p.admin_key.clone()),
        },
    ) {
        Ok(()) => say!("  context:    dev (the CLI now talks to this cluster)"),
        Err(e) => say!("  context:    not saved: {e:#}"),
    }
    say!("  try:        cairn cluster status");
    say!("Press Ctrl-C to stop.");
    wait_for_signal().await;
    let _ = context::remove("dev");
    say!("stopping: killing the tasks of this dev cluster");
    agent.kill_all_tasks(Duration::from_secs(15)).await;
    agent.shutdown().await;
    master.shutdown().await;
    Ok(())
}

#[derive(Subcommand)]
enum ContextCmd {
    /// Every context; `*` marks the current one.
    List,
    /// Make NAME the current context.
    Use { name: String },
    /// Forget NAME.
    Rm { name: String },
}

fn context_cmd(cmd: ContextCmd) -> anyhow::Result<()> {
    let mut c = context::load()?;
    match cmd {
        ContextCmd::List => {
            if c.contexts.is_empty() {
                println!("no contexts (`cairn dev` and `cairn lab up` create them)");
            }
            for (name, ctx) in &c.contexts {
                let mark = if c.current.as_deref() == Some(name) {
                    "*"
                } else {
                    " "
                };
                println!("{mark} {name}  {}", ctx.master);
            }
            Ok(())
        }
        ContextCmd::Use { name } => {
            if !c.contexts.contains_key(&name) {
                anyhow::bail!(
                    "no context {name:?}; `cairn context list` shows them: {}",
                    c.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            c.current = Some(name.clone());
            context::save(&c)?;
            println!("now using {name}");
            Ok(())
        }
        ContextCmd::Rm { name } => {
            context::remove(&name)?;
            println!("removed {name}");
            Ok(())
        }
    }
}

/// Restores the default SIGPIPE action (terminate) that Rust's runtime sets to ignore.
#[allow(unsafe_code)]
fn default_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called once at start, before any other thread exists; SIG_DFL installs no
    // handler code, so no async-signal-safety rule applies.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> anyhow::Result<()> {
    // A native task's supervisor and PID 1 are this binary re-executed; they must run before
    // any thread exists (unshare of the mount namespace), so they skip clap and tokio.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() == 3 && (argv[1] == "__init" || argv[1] == "__pid1") {
        let spec = std::path::Path::new(&argv[2]);
        let code = if argv[1] == "__init" {
            cairn_runtime::init::supervise(spec)
        } else {
            cairn_runtime::init::pid1(spec)
        };
        std::process::exit(code);
    }
    context::apply_current(&argv);
    let cli = Cli::parse();
    // A command-line client piped into `head` ends quietly on a closed pipe, as Unix tools
    // do, instead of panicking in `println!`; daemons keep SIGPIPE ignored (a closed socket
    // is an error to handle, not a reason to die).
    let daemon = matches!(
        cli.cmd,
        Cmd::Master(_) | Cmd::Dev(_) | Cmd::Agent(AgentCmdArgs { cmd: None, .. })
    );
    if !daemon {
        default_sigpipe();
    }
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Master(a) => {
                init_tracing("info,openraft=warn,sled=warn");
                run_master(a).await
            }
            Cmd::Agent(AgentCmdArgs {
                cmd: Some(AgentSub::List { client }),
                ..
            }) => {
                init_tracing("warn");
                client::agent_list(&Client::new(&client.master, &client.token)?, client.json).await
            }
            Cmd::Agent(AgentCmdArgs { cmd: None, run }) => {
                init_tracing("info,openraft=warn,sled=warn");
                run_agent(run).await
            }
            Cmd::Dev(a) => {
                init_tracing("warn");
                run_dev(a).await
            }
            Cmd::Cluster { cmd } => {
                init_tracing("warn");
                match cmd {
                    ClusterCmd::Status { client } => {
                        client::cluster_status(
                            &Client::new(&client.master, &client.token)?,
                            client.json,
                        )
                        .await
                    }
                    ClusterCmd::AddMaster {
                        id,
                        addr,
                        peer,
                        client,
                    } => {
                        let c = Client::new(&client.master, &client.token)?;
                        let peer = match peer {
                            Some(p) => p,
                            None => default_peer(&addr)?,
                        };
                        c.post(
                            "/api/v1/cluster/members",
                            &serde_json::json!({"id": id, "addr": addr, "peer": peer}),
                        )
                        .await?;
                        client::cluster_status(&c, client.json).await
                    }
                    ClusterCmd::RemoveMaster { id, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        c.delete(&format!("/api/v1/cluster/members/{id}")).await?;
                        client::cluster_status(&c, client.json).await
                    }
                }
            }
            Cmd::Kv { cmd } => {
                init_tracing("warn");
                match cmd {
                    KvCmd::Get { key, client } => {
                        let v = Client::new(&client.master, &client.token)?
                            .get(&format!("/api/v1/kv/{key}"))
                            .await?;
                        if client.json {
                            println!("{v:#}");
                        } else {
                            println!("{}", v["value"].as_str().unwrap_or_default());
                        }
                        Ok(())
                    }
                    KvCmd::Put { key, value, client } => {
                        let v = Client::new(&client.master, &client.token)?
                            .put(
                                &format!("/api/v1/kv/{key}"),
                                &serde_json::json!({"value": value}),
                            )
                            .await?;
                        println!(
                            "{}",
                            if client.json {
                                format!("{v:#}")
                            } else {
                                format!("ok (index {})", v["modify_index"])
                            }
                        );
                        Ok(())
                    }
                    KvCmd::List { client } => {
                        let v = Client::new(&client.master, &client.token)?
                            .get("/api/v1/kv")
                            .await?;
                        println!("{v:#}");
                        Ok(())
                    }
                }
            }
            Cmd::Logs {
                task,
                agent,
                master,
                follow,
                stderr,
                token,
            } => {
                init_tracing("warn");
                client::logs(
                    agent.as_deref().unwrap_or(&master),
                    &token,
                    &task,
                    if stderr { "stderr" } else { "stdout" },
                    follow,
                )
                .await
            }
            Cmd::Run(r) => {
                init_tracing("warn");
                let c = Client::new(&r.client.master, &r.client.token)?;
                let spec = client::run_spec(
                    r.spec.as_deref(),
                    r.wasm.as_deref(),
                    r.id.as_deref(),
                    &r.command,
                )?;
                client::run(&c, spec, r.detach, r.timeout).await
            }
            Cmd::Ps {
                workload,
                all,
                client,
            } => {
                init_tracing("warn");
                let c = Client::new(&client.master, &client.token)?;
                client::ps(&c, workload.as_deref(), all, client.json).await
            }
            Cmd::Events {
                topic,
                index,
                client,
            } => {
                init_tracing("warn");
                let c = Client::new(&client.master, &client.token)?;
                client::events(&c, topic.as_deref(), index, client.json).await
            }
            Cmd::Deployment { cmd } => {
                init_tracing("warn");
                match cmd {
                    DeploymentCmd::List { workload, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        client::deployments(&c, workload.as_deref(), client.json).await
                    }
                    DeploymentCmd::Show { id, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        let v = c.get(&format!("/api/v1/deployments/{id}")).await?;
                        println!("{v:#}");
                        Ok(())
                    }
                }
            }
            Cmd::Service { cmd, client } => {
                init_tracing("warn");
                let c = Client::new(&client.master, &client.token)?;
                service_cli::run(&c, client.json, cmd).await
            }
            Cmd::Context { cmd } => context_cmd(cmd),
            Cmd::Ca { cmd } => tls_cli::ca_cmd(cmd),
            Cmd::Install { cmd } => {
                init_tracing("warn");
                install_cli::run(cmd).await
            }
            Cmd::Token { cmd, client } => {
                init_tracing("warn");
                let c = Client::new(&client.master, &client.token)?;
                tls_cli::token_cmd(&c, client.json, cmd).await
            }
            Cmd::Lab { cmd } => {
                init_tracing("warn");
                lab_cli::run(cmd).await
            }
            Cmd::Package { cmd, client } => {
                init_tracing("warn");
                let c = Client::new(&client.master, &client.token)?;
                package_cli::run(&c, client.json, cmd).await
            }
            Cmd::Workload { cmd } => {
                init_tracing("warn");
                match cmd {
                    WorkloadCmd::List { client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        client::workload_list(&c, client.json).await
                    }
                    WorkloadCmd::Show { id, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        let v = c.get(&format!("/api/v1/workloads/{id}")).await?;
                        println!("{v:#}");
                        Ok(())
                    }
                    WorkloadCmd::Scale {
                        id,
                        instances,
                        client,
                    } => {
                        let c = Client::new(&client.master, &client.token)?;
                        c.post(
                            &format!("/api/v1/workloads/{id}/scale"),
                            &serde_json::json!({ "instances": instances }),
                        )
                        .await?;
                        println!("{id}: {instances} instances");
                        Ok(())
                    }
                    WorkloadCmd::Stop { id, client } => {
                        workload_action(&client, &id, "stop", "stopped").await
                    }
                    WorkloadCmd::Start { id, client } => {
                        workload_action(&client, &id, "start", "started").await
                    }
                    WorkloadCmd::Restart { id, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        let v = c
                            .post(
                                &format!("/api/v1/workloads/{id}/restart"),
                                &serde_json::Value::Null,
                            )
                            .await?;
                        println!("{id}: restarting as version {}", v["version"]);
                        Ok(())
                    }
                    WorkloadCmd::History { id, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        client::deployments(&c, Some(&id), client.json).await
                    }
                    WorkloadCmd::Rm { id, client } => {
                        let c = Client::new(&client.master, &client.token)?;
                        c.delete(&format!("/api/v1/workloads/{id}")).await?;
                        println!("{id}: removed");
                        Ok(())
                    }
                }
            }
            Cmd::Image { cmd } => {
                init_tracing("warn");
                match cmd {
                    ImageCmd::Import { file, name, agent } => {
                        let c = Client::agent(&agent.agent, &agent.token)?;
                        client::image_import(&c, &file, name.as_deref()).await
                    }
                    ImageCmd::List { json, agent } => {
                        let c = Client::agent(&agent.agent, &agent.token)?;
                        client::image_list(&c, json).await
                    }
                    ImageCmd::Rm { name, agent } => {
                        let c = Client::agent(&agent.agent, &agent.token)?;
                        let v = c.delete(&format!("/api/v1/images/{name}")).await?;
                        println!("removed {} {}", v["name"], v["digest"]);
                        Ok(())
                    }
                }
            }
            Cmd::Bench { cmd } => {
                init_tracing("warn");
                bench::run(cmd).await
            }
        }
    });
    // Errors as one line of causes, without a backtrace (RUST_BACKTRACE may be set).
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// `POST /api/v1/workloads/{id}/{action}` and a one-line confirmation.
async fn workload_action(
    client: &ClientArgs,
    id: &str,
    action: &str,
    done: &str,
) -> anyhow::Result<()> {
    Client::new(&client.master, &client.token)?
        .post(
            &format!("/api/v1/workloads/{id}/{action}"),
            &serde_json::Value::Null,
        )
        .await?;
    println!("{id}: {done}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers() {
        let p = parse_peers("1@127.0.0.1:5050, 2@127.0.0.1:5060/127.0.0.1:7000").unwrap();
        // The peer address defaults to the API port + 2.
        assert_eq!(p[&1].api, "127.0.0.1:5050");
        assert_eq!(p[&1].peer, "127.0.0.1:5052");
        assert_eq!(p[&2].api, "127.0.0.1:5060");
        assert_eq!(p[&2].peer, "127.0.0.1:7000");
        assert_eq!(
            parse_peers("1@127.0.0.1:1/nowhere")
                .unwrap_err()
                .to_string(),
            "--peers: peer address \"nowhere\" is not HOST:PORT"
        );
        assert_eq!(
            parse_peers("1@x").unwrap_err().to_string(),
            "--peers: \"x\" is not HOST:PORT"
        );
        assert!(parse_peers("0@127.0.0.1:1").is_err());
        assert!(parse_peers("1@127.0.0.1:1,1@127.0.0.1:2").is_err());
        assert!(parse_peers("127.0.0.1:1").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
