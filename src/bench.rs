//! `cairn bench`: the load generators behind BENCHMARKS.md. Each runs the same load shape
//! against Cairn and, side by side, against a 3-member etcd cluster (Debian's etcd-server).

use anyhow::Context;
use base64::Engine;
use cairn_installer::lab::{free_port, Lab};
use clap::{Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Target {
    Cairn,
    Etcd,
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Commits/s and latency of replicated writes on a fresh local 3-node cluster.
    Kv {
        #[arg(long, value_enum)]
        target: Target,
        /// Concurrent clients (comma-separated list runs each in turn).
        #[arg(long, default_value = "1,64")]
        clients: String,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 128)]
        value_size: usize,
        /// Cluster size (Cairn only; etcd always runs 3 members).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Send every request to the first endpoint only (no follower forwarding).
        #[arg(long)]
        one_endpoint: bool,
        /// Cairn with mutual TLS on every port (a CA made for the run); plaintext otherwise.
        #[arg(long)]
        tls: bool,
        /// Where the cluster keeps its data (default: a temporary dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Start-to-exit latency of trivial tasks on an in-process agent (or of `crun run`).
    Tasks {
        #[arg(long, value_enum)]
        kind: TaskKind,
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long)]
        wasm_file: Option<PathBuf>,
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// OCI image-layout archive for --kind oci (tests/images/busybox.sh builds one).
        #[arg(long)]
        image_tar: Option<PathBuf>,
        /// The OCI runtime binary for --kind crun (crun refuses hybrid cgroup hosts; runc works).
        #[arg(long, default_value = "crun")]
        oci_runtime: String,
    },
    /// Density: launch this many idle Wasm tasks (e.g. tests/guests idle.wasm) on one
    /// in-process agent and report how many run and the memory each costs.
    Density {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long)]
        wasm_file: PathBuf,
    },
    /// HTTP requests/s of a Wasm HTTP component (served by an agent's runtime) and of a native
    /// hyper hello server, each in its own process, side by side; reports the servers' CPU.
    Http {
        /// The wasi:http component (tests/guests http_hello.wasm).
        #[arg(long)]
        wasm_file: PathBuf,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// End to end scheduling at scale: 3 masters, N simulated agents (`cairn agent
    /// --simulate`), W workloads totalling T tasks; time until every task runs.
    Scale {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 100_000)]
        tasks: usize,
        #[arg(long, default_value_t = 100)]
        workloads: usize,
        /// Heartbeat interval of the simulated agents.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        heartbeat: Duration,
        /// Masters with `--fast-failover` timings instead of the defaults.
        #[arg(long)]
        fast_failover: bool,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Then measure the web UI's pages on that cluster (render time and weight).
        #[arg(long)]
        ui: bool,
    },
    /// (used by `bench http`) Serve a Wasm HTTP component on PORT through a TaskManager.
    #[command(hide = true)]
    ServeWasm {
        #[arg(long)]
        wasm_file: PathBuf,
        #[arg(long)]
        port: u16,
    },
    /// (used by `bench http`) A native hyper hello server on PORT.
    #[command(hide = true)]
    ServeNative {
        #[arg(long)]
        port: u16,
    },
    /// The stateful-service plan engine: SERVICES × PODS deployed in memory by the leader's
    /// code; time of one `driver::commands` pass while deploying and once complete.
    Plans {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 5)]
        pods: u32,
    },
    /// Create → deploy complete of a 3-pod service (volume, template, readiness) on a local
    /// master and agent, RUNS times.
    ServiceDeploy {
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Leader failover: kill -9 the leader, time until the next write is committed.
    Failover {
        #[arg(long, value_enum)]
        target: Target,
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// Cairn masters with `--fast-failover` timings instead of the defaults.
        #[arg(long)]
        fast_failover: bool,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// One etcd member: client port, arguments, and the process while it runs.
struct EtcdMember {
    client_port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

/// A 3-member etcd cluster of `etcd` processes on loopback.
struct EtcdLab {
    members: Vec<EtcdMember>,
    dir: PathBuf,
}

impl EtcdLab {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let name = format!("e{i}");
            // Cairn's election timeout (100 ms); etcd needs a shorter heartbeat (20 ms) for it.
            let args = vec![
                "--name".to_string(),
                name.clone(),
                "--data-dir".into(),
                dir.join(&name).display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{c}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{c}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{p}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{p}"),
                "--initial-cluster".into(),
                initial.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                // etcd requires election >= 5 x heartbeat.
                "--heartbeat-interval".into(),
                "20".into(),
                "--election-timeout".into(),
                "100".into(),
            ];
            members.push(EtcdMember {
                client_port: *c,
                args,
                child: None,
            });
        }
        let mut lab = EtcdLab {
            members,
            dir: dir.to_path_buf(),
        };
        for i in 0..3 {
            lab.restart(i)?;
        }
        Ok(lab)
    }

    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("e{i}.log")))?;
        let m = &mut self.members[i];
        let child = Command::new("etcd")
            .args(&m.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    async fn leader(&self, http: &reqwest::Client) -> Option<usize> {
        for i in 0..3 {
            if self.members[i].child.is_none() {
                continue;
            }
            let Ok(r) = http
                .post(format!("{}/v3/maintenance/status", self.endpoint(i)))
                .body("{}")
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = r.json::<serde_json::Value>().await else {
                continue;
            };
            let me = v["header"]["member_id"].as_str().map(str::to_string);
            let leader = v["leader"].as_str().map(str::to_string);
            if me.is_some() && me == leader {
                return Some(i);
            }
        }
        None
    }
}

impl Drop for EtcdLab {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

/// Sends one write to `endpoint`; Ok(()) only when the write is acknowledged as committed.
async fn put(
    http: &reqwest::Client,
    target: Target,
    endpoint: &str,
    token: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let resp = match target {
        Target::Cairn => {
            http.put(format!("{endpoint}/api/v1/kv/{key}"))
                .bearer_auth(token)
                .json(&serde_json::json!({ "value": value }))
                .send()
                .await?
        }
        Target::Etcd => {
            let b64 = base64::engine::general_purpose::STANDARD;
            http.post(format!("{endpoint}/v3/kv/put"))
                .json(&serde_json::json!({ "key": b64.encode(key), "value": b64.encode(value) }))
                .send()
                .await?
        }
    };
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() || (target == Target::Etcd && body.contains("\"error\"")) {
        anyhow::bail!("{status}: {body}");
    }
    Ok(())
}

/// Either cluster, started fresh in `dir`; returns the client endpoints.
enum Cluster {
    Cairn(Lab),
    Etcd(EtcdLab),
}

const TOKEN: &str = "bench-token-0123456789";

async fn start_cluster(
    target: Target,
    dir: &Path,
    nodes: u64,
    extra: &[&str],
    tls: bool,
) -> anyhow::Result<(Cluster, Vec<String>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    match target {
        Target::Cairn => {
            let bin = std::env::current_exe()?;
            let lab = if tls {
                Lab::start_tls(&bin, dir, nodes, TOKEN, extra)?
            } else {
                Lab::start(&bin, dir, nodes, TOKEN, extra)?
            };
            let http = lab.client_builder().build()?;
            let eps: Vec<String> = lab
                .masters
                .iter()
                .map(|m| format!("{}://{}", lab.scheme(), m.addr))
                .collect();
            while put(&http, target, &eps[0], TOKEN, "warmup", "x")
                .await
                .is_err()
            {
                anyhow::ensure!(Instant::now() < deadline, "cairn cluster did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok((Cluster::Cairn(lab), eps))
        }
        Target::Etcd => {
            anyhow::ensure!(!tls, "--tls is for Cairn only");
            let http = reqwest::Client::new();
            let lab = EtcdLab::start(dir)?;
            let eps: Vec<String> = (0..3).map(|i| lab.endpoint(i)).collect();
            while put(&http, target, &eps[0], "", "warmup", "x")
                .await
                .is_err()
            {
                anyhow::ensure!(Instant::now() < deadline, "etcd cluster did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok((Cluster::Etcd(lab), eps))
        }
    }
}

fn workdir(dir: Option<PathBuf>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("cairn-bench-")
                .tempdir_in("/var/tmp")?;
            (t.path().to_path_buf(), Some(t))
        }
    })
}

struct KvLoad {
    target: Target,
    clients: String,
    duration: Duration,
    value_size: usize,
    nodes: u64,
    one_endpoint: bool,
    tls: bool,
}

async fn kv(load: KvLoad, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let KvLoad {
        target,
        clients,
        duration,
        value_size,
        nodes,
        one_endpoint,
        tls,
    } = load;
    let (dir, _tmp) = workdir(dir)?;
    let (cluster, mut eps) = start_cluster(target, &dir, nodes, &[], tls).await?;
    if one_endpoint {
        eps.truncate(1);
    }
    let value = "v".repeat(value_size);
    for n in clients.split(',').map(|c| c.trim().parse::<usize>()) {
        let n = n.context("--clients is a comma-separated list of numbers")?;
        let deadline = Instant::now() + duration;
        let mut handles = Vec::new();
        for c in 0..n {
            let ep = eps[c % eps.len()].clone();
            let value = value.clone();
            // One client (and connection pool) per simulated client, as before.
            let http = match &cluster {
                Cluster::Cairn(lab) => lab.client_builder(),
                Cluster::Etcd(_) => reqwest::Client::builder(),
            }
            .tcp_nodelay(true)
            .build()?;
            handles.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut errors = 0u64;
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let key = format!("bench-{c}-{}", i % 1000);
                    let t = Instant::now();
                    match put(&http, target, &ep, TOKEN, &key, &value).await {
                        Ok(()) => h.record(t.elapsed().as_micros() as u64).expect("record"),
                        Err(_) => errors += 1,
                    }
                    i += 1;
                }
                (h, errors)
            }));
        }
        let mut all = Histogram::<u64>::new(3)?;
        let mut errors = 0;
        for h in handles {
            let (h, e) = h.await?;
            all.add(h)?;
            errors += e;
        }
        let secs = duration.as_secs_f64();
        println!(
            "| {:?}{} | {} | {:.0} | {:.2} | {:.2} | {} |",
            target,
            if tls { " mTLS" } else { "" },
            n,
            all.len() as f64 / secs,
            all.value_at_quantile(0.5) as f64 / 1000.0,
            all.value_at_quantile(0.99) as f64 / 1000.0,
            errors
        );
    }
    Ok(())
}

async fn failover(
    target: Target,
    kills: usize,
    fast: bool,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (dir, _tmp) = workdir(dir)?;
    let extra: &[&str] = if fast { &["--fast-failover"] } else { &[] };
    let (mut cluster, eps) = start_cluster(target, &dir, 3, extra, false).await?;
    // Short attempts: a write sent while there is no leader may be held (etcd) or wait for the
    // election (Cairn); a fresh attempt every 100 ms finds the new leader as soon as it commits.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .tcp_nodelay(true)
        .build()?;
    let status_http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut times = Vec::new();
    let bar = indicatif::ProgressBar::new(kills as u64);
    for k in 0..kills {
        // Find a settled leader.
        let leader = loop {
            let l = match &cluster {
                Cluster::Cairn(lab) => lab.leader().await.map(|id| (id - 1) as usize),
                Cluster::Etcd(lab) => lab.leader(&status_http).await,
            };
            if let Some(l) = l {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let t0 = Instant::now();
        if std::env::var_os("CAIRN_BENCH_TRACE").is_some() {
            eprintln!("kill leader {leader} at {:?}", std::time::SystemTime::now());
        }
        match &mut cluster {
            Cluster::Cairn(lab) => lab.kill(leader as u64 + 1),
            Cluster::Etcd(lab) => lab.kill(leader),
        }
        let survivors: Vec<&String> = eps
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, e)| e)
            .collect();
        let mut n = 0usize;
        loop {
            let ep = survivors[n % survivors.len()];
            n += 1;
            if put(&http, target, ep, TOKEN, &format!("failover-{k}"), "x")
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t0.elapsed());
        match &mut cluster {
            Cluster::Cairn(lab) => lab.restart(leader as u64 + 1)?,
            Cluster::Etcd(lab) => lab.restart(leader)?,
        }
        // Let the restarted member catch up before the next kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
    times.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| {:?} | {} | {:.0} | {:.0} | {:.0} | {} |",
        target,
        kills,
        ms(&times[times.len() / 2]),
        ms(&times[0]),
        ms(times.last().expect("one kill")),
        times
            .iter()
            .map(|t| format!("{:.0}", ms(t)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Plans { services, pods } => crate::bench_services::plans(services, pods),
        BenchCmd::ServiceDeploy { runs, dir } => {
            crate::bench_services::service_deploy(runs, dir).await
        }
        BenchCmd::Kv {
            target,
            clients,
            duration,
            value_size,
            nodes,
            one_endpoint,
            tls,
            dir,
        } => {
            println!("| target | clients | commits/s | p50 ms | p99 ms | errors |");
            println!("|---|---|---|---|---|---|");
            kv(
                KvLoad {
                    target,
                    clients,
                    duration,
                    value_size,
                    nodes,
                    one_endpoint,
                    tls,
                },
                dir,
            )
            .await
        }
        BenchCmd::Tasks {
            kind,
            count,
            wasm_file,
            bundle,
            image_tar,
            oci_runtime,
        } => {
            println!("| kind | tasks | p50 ms | p99 ms | mean ms |");
            println!("|---|---|---|---|---|");
            tasks(kind, count, wasm_file, bundle, image_tar, &oci_runtime).await
        }
        BenchCmd::Http {
            wasm_file,
            connections,
            duration,
        } => {
            println!("| server | connections | req/s | p50 ms | p99 ms | server cores | req/s per core |");
            println!("|---|---|---|---|---|---|---|");
            http_bench(&wasm_file, connections, duration).await
        }
        BenchCmd::Scale {
            agents,
            tasks,
            workloads,
            heartbeat,
            fast_failover,
            dir,
            ui,
        } => {
            println!(
                "| masters | agents | workloads | tasks | placed in | all running in | tasks/s \
                 | term changes | leader in samples | max master RSS | user GET p99 |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|---|");
            scale(agents, tasks, workloads, heartbeat, fast_failover, dir, ui).await
        }
        BenchCmd::ServeWasm { wasm_file, port } => serve_wasm(&wasm_file, port).await,
        BenchCmd::ServeNative { port } => serve_native(port).await,
        BenchCmd::Density { count, wasm_file } => {
            println!("| launched | running | launch time | RSS growth | per task |");
            println!("|---|---|---|---|---|");
            density(count, wasm_file).await
        }
        BenchCmd::Failover {
            target,
            kills,
            fast_failover,
            dir,
        } => {
            println!("| target | kills | median ms | min ms | max ms | all (ms) |");
            println!("|---|---|---|---|---|---|");
            failover(target, kills, fast_failover, dir).await
        }
    }
}

/// Which kind of task `cairn bench tasks` starts.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TaskKind {
    /// `/bin/true` as a native task (namespaces + cgroup).
    Native,
    /// A Wasm module or component given with --wasm-file.
    Wasm,
    /// `/bin/true` in the busybox image given with --image-tar (overlay + pivot_root).
    Oci,
    /// `crun run` (or `--oci-runtime runc`) of an OCI bundle given with --bundle (its process
    /// should exit at once).
    Crun,
}

/// Start-to-exit latency of trivial tasks, launched one after another on an in-process agent.
pub async fn tasks(
    kind: TaskKind,
    count: usize,
    wasm_file: Option<PathBuf>,
    bundle: Option<PathBuf>,
    image_tar: Option<PathBuf>,
    oci_runtime: &str,
) -> anyhow::Result<()> {
    use cairn_kernel::model::{RuntimeSpec, TaskState};
    let (dir, _tmp) = workdir(None)?;
    let mut h = Histogram::<u64>::new(3)?;
    let mgr =
        cairn_runtime::tasks::TaskManager::open(&dir, Path::new("/sys/fs/cgroup"), "127.0.0.1")?;
    let mut image = String::new();
    if kind == TaskKind::Oci {
        let tar = image_tar.context("--image-tar FILE is required for --kind oci")?;
        let f = std::fs::File::open(&tar).with_context(|| format!("opening {}", tar.display()))?;
        image = mgr.images().import(std::io::BufReader::new(f), None)?[0]
            .name
            .clone();
    }
    let bar = indicatif::ProgressBar::new(count as u64);
    for i in 0..count {
        let t = Instant::now();
        match kind {
            TaskKind::Crun => {
                let bundle = bundle
                    .clone()
                    .context("--bundle DIR is required for crun")?;
                let st = tokio::process::Command::new(oci_runtime)
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(format!("bench-{i}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()
                    .await
                    .with_context(|| {
                        format!("running {oci_runtime} (apt-get install {oci_runtime})")
                    })?;
                anyhow::ensure!(st.success(), "{oci_runtime} run failed: {st}");
            }
            TaskKind::Native | TaskKind::Wasm | TaskKind::Oci => {
                let runtime = match kind {
                    TaskKind::Native => RuntimeSpec::Native {
                        cmd: "/bin/true".into(),
                        args: vec![],
                    },
                    TaskKind::Oci => RuntimeSpec::Oci {
                        image: image.clone(),
                        cmd: vec!["/bin/true".into()],
                    },
                    _ => RuntimeSpec::Wasm {
                        file: wasm_file
                            .clone()
                            .context("--wasm-file is required")?
                            .display()
                            .to_string(),
                        args: vec![],
                    },
                };
                let spec: cairn_runtime::task::TaskSpec =
                    serde_json::from_value(serde_json::json!({
                        "id": format!("bench-{i}"),
                        "runtime": runtime,
                        "resources": {"cpus": 1.0, "mem": 64, "disk": 0}
                    }))?;
                let mut rx = mgr.watch();
                let m = mgr.clone();
                tokio::task::spawn_blocking(move || m.launch(spec)).await??;
                let id = format!("bench-{i}");
                loop {
                    let s = mgr.get(&id).context("task vanished")?;
                    if s.state.is_terminal() {
                        anyhow::ensure!(
                            s.state == TaskState::Finished,
                            "task {id} ended {:?}: {:?}",
                            s.state,
                            s.message
                        );
                        break;
                    }
                    rx.changed().await?;
                }
            }
        }
        h.record(t.elapsed().as_micros() as u64)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "| {:?} | {} | {:.2} | {:.2} | {:.2} |",
        kind,
        count,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.mean() / 1000.0
    );
    Ok(())
}

/// Resident memory of a process, in KiB (0 if unknown).
fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    proc_rss_kib(std::process::id())
}

/// Density: how many idle Wasm tasks one in-process agent holds, and what each costs.
pub async fn density(count: usize, wasm_file: PathBuf) -> anyhow::Result<()> {
    use cairn_kernel::model::TaskState;
    let (dir, _tmp) = workdir(None)?;
    let mgr =
        cairn_runtime::tasks::TaskManager::open(&dir, Path::new("/sys/fs/cgroup"), "127.0.0.1")?;
    let before = rss_kib();
    let bar = indicatif::ProgressBar::new(count as u64);
    let started = Instant::now();
    let mut running = 0usize;
    for i in 0..count {
        let spec: cairn_runtime::task::TaskSpec = serde_json::from_value(serde_json::json!({
            "id": format!("idle-{i}"),
            "runtime": {"wasm": {"file": wasm_file.display().to_string(), "args": []}},
            "resources": {"cpus": 0.0, "mem": 16, "disk": 0}
        }))?;
        let m = mgr.clone();
        match tokio::task::spawn_blocking(move || m.launch(spec)).await? {
            Ok(_) => running += 1,
            Err(e) => {
                eprintln!("stopped at {i} tasks: {e}");
                break;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alive = mgr
        .list()
        .iter()
        .filter(|s| s.state == TaskState::Running)
        .count();
    let after = rss_kib();
    eprintln!("RSS before {before} KiB, after {after} KiB");
    println!(
        "| {} | {} | {:.1} s | {} MiB | {:.1} KiB |",
        running,
        alive,
        elapsed.as_secs_f64(),
        (after.saturating_sub(before)) / 1024,
        after.saturating_sub(before) as f64 / alive.max(1) as f64
    );
    // Idle guests sleep inside a host call, which epoch interruption cannot cut short; exit
    // rather than wait for them.
    std::process::exit(0)
}

/// CPU time (user + system) of a process, in seconds.
fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(i) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[i + 2..].split(' ').collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Serves a Wasm HTTP component through a real TaskManager until killed.
async fn serve_wasm(wasm_file: &Path, port: u16) -> anyhow::Result<()> {
    let (dir, _tmp) = workdir(None)?;
    let mgr =
        cairn_runtime::tasks::TaskManager::open(&dir, Path::new("/sys/fs/cgroup"), "127.0.0.1")?;
    let spec: cairn_runtime::task::TaskSpec = serde_json::from_value(serde_json::json!({
        "id": "http",
        "runtime": {"wasm": {"file": wasm_file.display().to_string(), "args": []}},
        "resources": {"cpus": 0.0, "mem": 64, "disk": 0},
        "ports": [{"name": "http", "number": port}]
    }))?;
    let m = mgr.clone();
    tokio::task::spawn_blocking(move || m.launch(spec)).await??;
    std::future::pending::<()>().await;
    Ok(())
}

/// The native peer: a hyper hello server, as small as the Wasm guest.
async fn serve_native(port: u16) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = format!("hello from native {} {}", req.method(), req.uri());
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from(body),
                )))
            });
            let _ = http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await;
        });
    }
}

/// Requests/s and the server's CPU for the Wasm component and the native server in turn.
async fn http_bench(
    wasm_file: &Path,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    for server in ["wasm", "native"] {
        let port = free_port();
        let mut cmd = Command::new(&exe);
        cmd.arg("bench");
        if server == "wasm" {
            cmd.args(["serve-wasm", "--wasm-file"]).arg(wasm_file);
        } else {
            cmd.arg("serve-native");
        }
        let mut child = cmd
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .context("starting the server")?;
        let url = format!("http://127.0.0.1:{port}/hello");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .timeout(Duration::from_secs(10))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(&url).send().await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "{server} server did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = child.id();
        let (c0, t0) = (proc_cpu_secs(pid), Instant::now());
        let end = t0 + duration;
        let mut workers = Vec::new();
        for _ in 0..connections {
            let (http, url) = (http.clone(), url.clone());
            workers.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut errors = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    match http.get(&url).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            let _ = h.record(t.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
                (h, errors)
            }));
        }
        let mut h = Histogram::<u64>::new(3)?;
        let mut errors = 0;
        for w in workers {
            let (wh, e) = w.await?;
            h.add(wh)?;
            errors += e;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cores = (proc_cpu_secs(pid) - c0) / secs;
        let _ = child.kill();
        let _ = child.wait();
        anyhow::ensure!(errors == 0, "{server}: {errors} failed requests");
        let rps = h.len() as f64 / secs;
        println!(
            "| {server} | {connections} | {rps:.0} | {:.2} | {:.2} | {cores:.2} | {:.0} |",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            rps / cores.max(0.01)
        );
    }
    Ok(())
}

/// Places `tasks` tasks over `agents` simulated agents on a fresh 3-master cluster.
async fn scale(
    agents: usize,
    tasks: usize,
    workloads: usize,
    heartbeat: Duration,
    fast: bool,
    dir: Option<PathBuf>,
    ui: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        workloads > 0 && tasks >= workloads,
        "--tasks must be at least --workloads"
    );
    let (dir, _tmp) = workdir(dir)?;
    let bin = std::env::current_exe()?;
    let mut master_args = vec![
        "--agent-timeout",
        "60s",
        "--reschedule-after",
        "120s",
        "--request-timeout",
        "30s",
    ];
    if fast {
        master_args.push("--fast-failover");
    }
    let lab = Lab::start(&bin, &dir, 3, TOKEN, &master_args)?;
    let leader = lab
        .wait_leader(Duration::from_secs(30))
        .await
        .context("no leader")?;
    let masters: Vec<String> = lab.masters.iter().map(|m| m.addr.clone()).collect();
    let sim_dir = dir.join("sim");
    std::fs::create_dir_all(&sim_dir)?;
    let mut sim = Command::new(&bin)
        .args(["agent", "--simulate", &agents.to_string(), "--masters"])
        .arg(masters.join(","))
        .args(["--listen", "127.0.0.1:1", "--data-dir"])
        .arg(&sim_dir)
        .args(["--token", TOKEN, "--insecure", "--heartbeat-interval"])
        .arg(humantime::format_duration(heartbeat).to_string())
        .args([
            "--resources",
            "cpus:64;mem:262144;disk:1000000;ports:[20000-30000]",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sim.log"))?)
        .spawn()
        .context("starting the simulated agents")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let leader_addr = lab.master(leader).addr.clone();
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("http://{leader_addr}{path}"));
        async move {
            let r = http.get(url).bearer_auth(TOKEN).send().await.ok()?;
            r.json::<serde_json::Value>().await.ok()
        }
    };
    let bar = indicatif::ProgressBar::new(agents as u64);
    bar.set_message("agents registered");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = get("/api/v1/agents?stale=true")
            .await
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0);
        bar.set_position(n as u64);
        if n >= agents {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {n} of {agents} agents registered"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish_and_clear();
    // A concurrent user: GET /api/v1/cluster on every master in turn, 5 times a second; and
    // a leader sample once a second.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let user = {
        let (http, masters, stop) = (http.clone(), masters.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let (mut samples, mut with_leader, mut terms) = (0u64, 0u64, Vec::new());
            let mut i = 0usize;
            while !*stop.borrow() {
                let t = Instant::now();
                let r = http
                    .get(format!(
                        "http://{}/api/v1/cluster",
                        masters[i % masters.len()]
                    ))
                    .bearer_auth(TOKEN)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let v = match r {
                    Ok(r) => r.json::<serde_json::Value>().await.ok(),
                    Err(_) => None,
                };
                let _ = h.record(t.elapsed().as_micros() as u64);
                if i.is_multiple_of(5) {
                    samples += 1;
                    if let Some(v) = &v {
                        with_leader += v["leader_id"].is_u64() as u64;
                        terms.push(v["term"].as_u64().unwrap_or(0));
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(200).saturating_sub(t.elapsed())).await;
            }
            (h, samples, with_leader, terms)
        })
    };
    let term_at_start = get("/api/v1/cluster").await.unwrap_or_default()["term"]
        .as_u64()
        .unwrap_or(0);
    let per = tasks / workloads;
    let started = Instant::now();
    for w in 0..workloads {
        let instances = if w == workloads - 1 {
            tasks - per * (workloads - 1)
        } else {
            per
        };
        let spec = serde_json::json!({
            "id": format!("scale-{w}"), "instances": instances,
            "runtime": {"native": {"cmd": "/bin/true"}},
            "resources": {"cpus": 0.01, "mem": 1, "disk": 0},
            "constraints": [["rack", "MAX_PER", (instances / 10).max(1).to_string()]]
        });
        let r = http
            .post(format!("http://{leader_addr}/api/v1/workloads"))
            .bearer_auth(TOKEN)
            .json(&spec)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "submitting: {}", r.text().await?);
    }
    let bar = indicatif::ProgressBar::new(tasks as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec}")
            .expect("template"),
    );
    bar.set_message("running");
    let mut placed_at = None;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let running = loop {
        let c = get("/api/v1/cluster").await.unwrap_or_default();
        let running = c["tasks"]["running"].as_u64().unwrap_or(0) as usize;
        let total: usize = c["tasks"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum::<u64>() as usize)
            .unwrap_or(0);
        if placed_at.is_none() && total >= tasks {
            placed_at = Some(started.elapsed());
        }
        bar.set_position(running as u64);
        if running >= tasks {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            let _ = sim.kill();
            anyhow::bail!("only {running} of {tasks} tasks running after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    let (h, samples, with_leader, terms) = user.await?;
    let term_at_end = terms.iter().copied().max().unwrap_or(term_at_start);
    let rss_mib = lab
        .masters
        .iter()
        .filter_map(|m| m.child.as_ref().map(|c| proc_rss_kib(c.id())))
        .max()
        .unwrap_or(0)
        / 1024;
    let _ = sim.kill();
    let _ = sim.wait();
    println!(
        "| 3 | {agents} | {workloads} | {tasks} | {:.1} s | {:.1} s | {:.0} | {} | {with_leader}/{samples} | {rss_mib} MiB | {:.1} ms |",
        placed_at.unwrap_or(running).as_secs_f64(),
        running.as_secs_f64(),
        tasks as f64 / running.as_secs_f64(),
        term_at_end.saturating_sub(term_at_start),
        h.value_at_quantile(0.99) as f64 / 1000.0,
    );
    if ui {
        ui_pages(&leader_addr).await?;
    }
    drop(lab);
    Ok(())
}

/// Render time (p50/p99 of 50 sequential GETs, after 3 to warm up) and weight of the UI's
/// pages on a loaded cluster, signed in as a browser would be.
async fn ui_pages(master: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;
    let base = format!("http://{master}");
    // A stateful service to show (simulated agents report its task running).
    let r = http
        .post(format!("{base}/api/v1/packages/redis/install"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"options": {}}))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "installing redis: {}",
        r.text().await?
    );
    let r = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", TOKEN), ("next", "/ui/")])
        .send()
        .await?;
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie from /ui/login")?
        .to_string();
    println!();
    println!("| page | p50 ms | p99 ms | HTML KB | with CSS+JS KB |");
    println!("|---|---|---|---|---|");
    let mut assets = 0usize;
    for page in [
        "/ui/",
        "/ui/agents",
        "/ui/workloads",
        "/ui/workloads/scale-0",
        "/ui/services/redis",
        "/ui/events",
        "/ui/catalog/redis/install",
    ] {
        let mut h = Histogram::<u64>::new(3)?;
        let mut size = 0;
        for i in 0..53 {
            let t = Instant::now();
            let r = http
                .get(format!("{base}{page}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "{page}: {}", r.status());
            let body = r.text().await?;
            if i >= 3 {
                h.record(t.elapsed().as_micros() as u64)?;
            }
            size = body.len();
            if assets == 0 {
                for link in body.split("/ui/assets/").skip(1) {
                    let name = link.split('"').next().unwrap_or("");
                    let a = http
                        .get(format!("{base}/ui/assets/{name}"))
                        .send()
                        .await?
                        .bytes()
                        .await?;
                    assets += a.len();
                }
            }
        }
        println!(
            "| `{page}` | {:.1} | {:.1} | {:.1} | {:.1} |",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            size as f64 / 1024.0,
            (size + assets) as f64 / 1024.0
        );
    }
    Ok(())
}
