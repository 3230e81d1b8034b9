//! The agent's task manager: launches tasks with the executor for their runtime, watches
//! limits (timeout, sandbox disk), kills (SIGTERM, grace, SIGKILL of the cgroup), records
//! final states, and checkpoints everything in sled so that native tasks are re-attached
//! after the agent restarts.
//!
//! Nothing a task can write is trusted: the agent signals only the supervisor it started
//! (checked against its start time), reads sandbox files through `sandbox::open_beneath`
//! with a size cap, and reads Wasm files only from its allow-listed directories.

use crate::cgroups::{Hierarchy, Limits, TaskCgroup};
use crate::images::ImageStore;
use crate::init::{state_dir, ContainerFs, ExitInfo, InitSpec};
use crate::sandbox;
use crate::task::{reason, Network, TaskSpec, TaskStatus, TaskUsage};
use crate::volumes::VolumeStore;
use crate::wasm::{KillSwitch, WasmOutcome, WasmRuntime, WasmTask, WasmUsage};
use cairn_kernel::model::{RuntimeSpec, TaskState, TaskVolume};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An executor runs one kind of task (youki's `Executor::can_handle` shape).
pub trait Executor: Send + Sync {
    fn name(&self) -> &'static str;
    fn can_handle(&self, spec: &TaskSpec) -> bool;
}

pub struct NativeExecutor;
impl Executor for NativeExecutor {
    fn name(&self) -> &'static str {
        "native"
    }
    fn can_handle(&self, spec: &TaskSpec) -> bool {
        matches!(spec.runtime, RuntimeSpec::Native { .. })
    }
}

pub struct OciExecutor;
impl Executor for OciExecutor {
    fn name(&self) -> &'static str {
        "oci"
    }
    fn can_handle(&self, spec: &TaskSpec) -> bool {
        matches!(spec.runtime, RuntimeSpec::Oci { .. })
    }
}

pub struct WasmExecutor;
impl Executor for WasmExecutor {
    fn name(&self) -> &'static str {
        "wasm"
    }
    fn can_handle(&self, spec: &TaskSpec) -> bool {
        matches!(spec.runtime, RuntimeSpec::Wasm { .. })
    }
}

/// What the agent checkpoints per task.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Checkpoint {
    spec: TaskSpec,
    status: TaskStatus,
    /// Start time (clock ticks since boot, /proc/PID/stat field 22) of the supervisor, so a
    /// recycled pid is never mistaken for our task.
    start_ticks: Option<u64>,
}

enum Control {
    Native {
        supervisor: u32,
        cgroup: Option<TaskCgroup>,
    },
    Wasm {
        killed: Arc<KillSwitch>,
        usage: Arc<WasmUsage>,
    },
    Done,
}

struct Entry {
    spec: TaskSpec,
    status: TaskStatus,
    sandbox: PathBuf,
    control: Control,
    kill_reason: Option<String>,
    start_ticks: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("task {0:?} already exists on this agent")]
    Exists(String),
    #[error("no executor on this agent handles this runtime: {0}")]
    Unsupported(String),
    #[error("starting the task: {0}")]
    Start(String),
}

/// Every task on this agent.
pub struct TaskManager {
    sandboxes: PathBuf,
    cgroups: Option<Hierarchy>,
    wasm: Option<Arc<WasmRuntime>>,
    images: Arc<ImageStore>,
    /// Prefix of this agent's task cgroups (agents sharing a host never share a group).
    cgroup_prefix: String,
    host: String,
    /// Where HTTP components listen: the agent's advertised address, never all interfaces
    /// unless the agent itself listens on them.
    bind_ip: std::net::IpAddr,
    /// The only directories Wasm files are read from.
    wasm_dirs: Vec<PathBuf>,
    volumes: VolumeStore,
    /// The agent's Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::AgentMetrics,
    /// Where the agent serves the built-in DNS, once it does (`set_dns`): native and OCI
    /// tasks get `CAIRN_DNS` and, on port 53, a resolv.conf naming it.
    dns: std::sync::OnceLock<std::net::SocketAddr>,
    db: sled::Tree,
    tasks: Mutex<HashMap<String, Entry>>,
    changed: tokio::sync::watch::Sender<u64>,
    executors: Vec<Box<dyn Executor>>,
}

/// The address a task on this host reaches the agent's DNS at: an unspecified listen address
/// (all interfaces) is reached on loopback.
pub fn resolver_addr(dns: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match dns.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, dns.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, dns.port()).into(),
        _ => dns,
    }
}

/// The resolv.conf of a task whose agent serves DNS on `dns`: names in `cairn.` answered by
/// the agent, the rest forwarded by it. Only on port 53: resolv.conf cannot name another
/// port, so elsewhere tasks keep the host's and find the server in `CAIRN_DNS`.
pub fn resolv_conf(dns: std::net::SocketAddr) -> Option<String> {
    if dns.port() != 53 {
        return None;
    }
    Some(format!(
        "# written by cairn: this agent's DNS (zone cairn.; other names are forwarded)\n\
         nameserver {}\nsearch cairn\n",
        resolver_addr(dns).ip()
    ))
}

/// Largest Wasm file the agent reads.
pub const MAX_WASM_BYTES: u64 = 256 << 20;

/// Extra directories (colon-separated, absolute) the agent reads Wasm files from, besides
/// `DATA_DIR/wasm`.
pub const WASM_DIRS_ENV: &str = "CAIRN_WASM_DIRS";

/// The largest `.cairn/exit.json` the agent reads.
const MAX_EXIT_JSON: u64 = 64 << 10;

/// Reads a Wasm file for a task: an absolute path without `..` under one of `dirs`, opened
/// beneath that directory through no symlink, a regular file (no device, FIFO or /proc file)
/// of at most `MAX_WASM_BYTES`.
pub fn read_wasm_file(file: &str, dirs: &[PathBuf]) -> Result<Vec<u8>, String> {
    let p = Path::new(file);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "{file:?}: give an absolute path without '..' to a .wasm file"
        ));
    }
    let found = dirs.iter().find_map(|d| {
        p.strip_prefix(d)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
            .map(|r| (d, r))
    });
    let Some((dir, rel)) = found else {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(format!(
            "{file:?} is outside the agent's Wasm directories ({}): put the file there, or \
             add its directory to {WASM_DIRS_ENV} in the agent's environment",
            list.join(", ")
        ));
    };
    let d = sandbox::open_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    sandbox::read_capped(&d, rel, MAX_WASM_BYTES).map_err(|e| {
        format!(
            "{file:?}: {e} (only regular files of at most {MAX_WASM_BYTES} bytes, \
             reached through no symlink, are read)"
        )
    })
}

/// The agent's Wasm directories: `DATA_DIR/wasm` (created, private) and `extra`
/// (`CAIRN_WASM_DIRS`), each also in its canonical form.
fn wasm_dirs(data_dir: &Path, extra: Option<&str>) -> std::io::Result<Vec<PathBuf>> {
    let own = data_dir.join("wasm");
    private_dir(&own)?;
    let mut dirs = vec![own];
    for d in extra.unwrap_or("").split(':').filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if d.is_absolute() && !d.components().any(|c| c == Component::ParentDir) {
            dirs.push(d);
        } else {
            tracing::warn!("{WASM_DIRS_ENV}: ignoring {d:?} (not an absolute path)");
        }
    }
    for d in dirs.clone() {
        if let Ok(c) = d.canonicalize() {
            if !dirs.contains(&c) {
                dirs.push(c);
            }
        }
    }
    Ok(dirs)
}

/// Creates `dir` (and parents) and makes it 0700: agent data holds task environments.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The address HTTP components listen on: the agent's advertised host if it is (or
/// resolves to) an IP, else loopback.
pub fn bind_ip(host: &str) -> std::net::IpAddr {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = host.trim_matches(['[', ']']).parse() {
        return ip;
    }
    match (host, 0).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a.ip(),
        _ => {
            tracing::warn!(
                "cannot resolve the advertised host {host:?}: Wasm HTTP tasks listen on loopback"
            );
            std::net::Ipv4Addr::LOCALHOST.into()
        }
    }
}

/// Limit checks run every 200 ms; the sandbox disk walk every this many checks (1 s).
const DISK_EVERY: u64 = 5;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Start time of `pid` in clock ticks since boot, if it runs.
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl TaskManager {
    /// Opens the checkpoint store and the executors, and recovers checkpointed tasks.
    pub fn open(data_dir: &Path, cgroup_root: &Path, host: &str) -> anyhow::Result<Arc<Self>> {
        raise_fd_limit();
        // Task environments (secrets) live in the checkpoints and the sandboxes' init.json:
        // nothing under the data dir is readable by other users.
        private_dir(data_dir)?;
        let sandboxes = data_dir.join("sandboxes");
        private_dir(&sandboxes)?;
        private_dir(&data_dir.join("agent.sled"))?;
        let db = sled::Config::new()
            .path(data_dir.join("agent.sled"))
            .cache_capacity(8 << 20)
            .open()?;
        let tree = db.open_tree("tasks")?;
        let cgroups = match Hierarchy::detect(cgroup_root, "cairn") {
            Ok(h) => {
                tracing::info!(version = ?h.version, "cgroups detected");
                Some(h)
            }
            Err(e) => {
                tracing::warn!("no cgroups: native tasks run without limits ({e})");
                None
            }
        };
        let wasm = match WasmRuntime::new(&data_dir.join("wasm-cache")) {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::warn!("wasm runtime unavailable: {e}");
                None
            }
        };
        let images = Arc::new(ImageStore::open(&data_dir.join("images"))?);
        let cgroup_prefix: String = crate::agent::load_or_create_id(data_dir)?
            .chars()
            .take(8)
            .collect();
        let wasm_dirs = wasm_dirs(data_dir, std::env::var(WASM_DIRS_ENV).ok().as_deref())?;
        let volumes = VolumeStore::open(data_dir)?;
        let mgr = Arc::new(Self {
            volumes,
            metrics: crate::metrics::AgentMetrics::new(),
            bind_ip: bind_ip(host),
            wasm_dirs,
            cgroup_prefix,
            sandboxes,
            cgroups,
            wasm,
            images,
            host: host.to_string(),
            dns: std::sync::OnceLock::new(),
            db: tree,
            tasks: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::channel(0).0,
            executors: vec![
                Box::new(NativeExecutor),
                Box::new(OciExecutor),
                Box::new(WasmExecutor),
            ],
        });
        mgr.recover()?;
        Ok(mgr)
    }

    fn cgroup_name(&self, task: &str) -> String {
        format!("{}-{task}", self.cgroup_prefix)
    }

    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    pub fn volumes(&self) -> &VolumeStore {
        &self.volumes
    }

    /// Ids of the volumes a task here that has not ended mounts.
    pub fn volumes_in_use(&self) -> std::collections::HashSet<String> {
        self.tasks
            .lock()
            .expect("tasks")
            .values()
            .filter(|e| !e.status.state.is_terminal())
            .flat_map(|e| e.spec.volumes.iter().map(|v| v.id.clone()))
            .collect()
    }

    /// A running task that uses the image, if any.
    pub fn image_user(&self, image: &crate::images::Image) -> Option<String> {
        let tasks = self.tasks.lock().expect("tasks");
        tasks
            .values()
            .find(|e| {
                !e.status.state.is_terminal()
                    && matches!(&e.spec.runtime, RuntimeSpec::Oci { image: i, .. }
                        if self.images.get(i).is_some_and(|x| x.digest == image.digest))
            })
            .map(|e| e.spec.id.clone())
    }

    /// A receiver that changes whenever any task's status changes.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn checkpoint(&self, e: &Entry) {
        let cp = Checkpoint {
            spec: e.spec.clone(),
            status: e.status.clone(),
            start_ticks: e.start_ticks,
        };
        if let Ok(bytes) = serde_json::to_vec(&cp) {
            let _ = self.db.insert(e.spec.id.as_bytes(), bytes);
            let _ = self.db.flush();
        }
    }

    pub fn list(&self) -> Vec<TaskStatus> {
        let mut v: Vec<TaskStatus> = self
            .tasks
            .lock()
            .expect("tasks")
            .values()
            .map(|e| e.status.clone())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Every task's spec and status.
    pub fn specs(&self) -> Vec<(TaskSpec, TaskStatus)> {
        self.tasks
            .lock()
            .expect("tasks")
            .values()
            .map(|e| (e.spec.clone(), e.status.clone()))
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<TaskStatus> {
        self.tasks
            .lock()
            .expect("tasks")
            .get(id)
            .map(|e| e.status.clone())
    }

    pub fn sandbox(&self, id: &str) -> Option<PathBuf> {
        self.tasks
            .lock()
            .expect("tasks")
            .get(id)
            .map(|e| e.sandbox.clone())
    }

    fn status_for(spec: &TaskSpec, runtime: &str) -> TaskStatus {
        TaskStatus {
            id: spec.id.clone(),
            workload: spec.workload.clone(),
            runtime: runtime.to_string(),
            state: TaskState::Starting,
            reason: None,
            exit_code: None,
            signal: None,
            pid: None,
            started_at: now_ms(),
            finished_at: None,
            usage: TaskUsage::default(),
            message: None,
            healthy: None,
        }
    }

    /// Starts a task. Returns once the process or guest is running.
    pub fn launch(self: &Arc<Self>, spec: TaskSpec) -> Result<TaskStatus, LaunchError> {
        let runtime = match spec.runtime {
            RuntimeSpec::Native { .. } => "native",
            RuntimeSpec::Oci { .. } => "oci",
            RuntimeSpec::Wasm { .. } => "wasm",
        };
        let t0 = Instant::now();
        let r = self.launch_inner(spec);
        let result = if r.is_ok() { "started" } else { "failed" };
        self.metrics
            .starts
            .with_label_values(&[runtime, result])
            .inc();
        if r.is_ok() {
            self.metrics
                .start_seconds
                .with_label_values(&[runtime])
                .observe(t0.elapsed().as_secs_f64());
        }
        r
    }

    fn launch_inner(self: &Arc<Self>, spec: TaskSpec) -> Result<TaskStatus, LaunchError> {
        spec.validate()
            .map_err(|(field, message)| LaunchError::Invalid { field, message })?;
        let exec = self
            .executors
            .iter()
            .find(|e| e.can_handle(&spec))
            .ok_or_else(|| LaunchError::Unsupported(format!("{:?}", spec.runtime)))?;
        let runtime = exec.name();
        {
            let tasks = self.tasks.lock().expect("tasks");
            if tasks.contains_key(&spec.id) {
                return Err(LaunchError::Exists(spec.id.clone()));
            }
        }
        let sandbox = self.sandboxes.join(&spec.id);
        if sandbox.exists() {
            return Err(LaunchError::Exists(spec.id.clone()));
        }
        let mut status = Self::status_for(&spec, runtime);
        // A bad Wasm file is the caller's mistake (400 naming the field); an assigned task
        // is still recorded as failed so the masters hear of it.
        let wasm = match &spec.runtime {
            RuntimeSpec::Wasm { file, .. } => match read_wasm_file(file, &self.wasm_dirs) {
                Ok(b) => Some(b),
                Err(message) if !spec.assigned => {
                    return Err(LaunchError::Invalid {
                        field: "runtime.wasm.file".into(),
                        message,
                    })
                }
                Err(m) => {
                    return Err(self.start_failed(
                        spec,
                        status,
                        sandbox,
                        format!("runtime.wasm.file: {m}"),
                    ))
                }
            },
            _ => None,
        };
        std::fs::create_dir_all(&sandbox).map_err(|e| LaunchError::Start(e.to_string()))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(state_dir(&sandbox))
            .map_err(|e| LaunchError::Start(e.to_string()))?;
        let mounts = match self.prepare_volumes(&spec, &sandbox) {
            Ok(m) => m,
            Err(e) => return Err(self.start_failed(spec, status, sandbox, e)),
        };
        let result = match wasm {
            None => self.start_native(&spec, &sandbox, &mounts),
            Some(bytes) => self.start_wasm(&spec, &sandbox, bytes, &mounts),
        };
        let (control, child, start_ticks) = match result {
            Ok(x) => x,
            Err(e) => return Err(self.start_failed(spec, status, sandbox, e)),
        };
        status.state = TaskState::Running;
        if let Control::Native { supervisor, .. } = &control {
            status.pid = Some(*supervisor);
        }
        let id = spec.id.clone();
        let entry = Entry {
            spec,
            status: status.clone(),
            sandbox,
            control,
            kill_reason: None,
            start_ticks,
        };
        self.checkpoint(&entry);
        self.tasks.lock().expect("tasks").insert(id.clone(), entry);
        self.bump();
        let me = self.clone();
        if !checks_of(&self.tasks, &id).is_empty() {
            tokio::spawn(self.clone().health_loop(id.clone()));
        }
        match child {
            Child::Native(c) => {
                tokio::spawn(me.monitor_native(id, Some(c)));
            }
            Child::Wasm(h) => {
                tokio::spawn(me.monitor_wasm(id, h));
            }
        }
        Ok(status)
    }

    /// The task's volume directories (created on first use, kept after), its mount points in
    /// the fresh sandbox and its rendered config files.
    fn prepare_volumes(
        &self,
        spec: &TaskSpec,
        sandbox: &Path,
    ) -> Result<Vec<(TaskVolume, PathBuf)>, String> {
        let mut mounts = Vec::with_capacity(spec.volumes.len());
        for v in &spec.volumes {
            let dir = self
                .volumes
                .prepare(v)
                .map_err(|e| format!("volume {}: {e}", v.id))?;
            mounts.push((v.clone(), dir));
        }
        crate::volumes::prepare_sandbox(sandbox, &mounts, &spec.files)?;
        Ok(mounts)
    }

    /// Records a task that could not start as failed.
    fn start_failed(
        &self,
        spec: TaskSpec,
        mut status: TaskStatus,
        sandbox: PathBuf,
        e: String,
    ) -> LaunchError {
        status.state = TaskState::Failed;
        status.reason = Some(reason::START_FAILED.into());
        status.message = Some(e.clone());
        status.finished_at = Some(now_ms());
        let entry = Entry {
            spec,
            status,
            sandbox,
            control: Control::Done,
            kill_reason: None,
            start_ticks: None,
        };
        self.checkpoint(&entry);
        self.tasks
            .lock()
            .expect("tasks")
            .insert(entry.spec.id.clone(), entry);
        self.bump();
        LaunchError::Start(e)
    }

    /// Points tasks started from now on at the agent's DNS server on `addr`.
    pub fn set_dns(&self, addr: std::net::SocketAddr) {
        let _ = self.dns.set(addr);
    }

    fn start_native(
        &self,
        spec: &TaskSpec,
        sandbox: &Path,
        mounts: &[(TaskVolume, PathBuf)],
    ) -> Result<(Control, Child, Option<u64>), String> {
        let mut env = spec.task_env(&sandbox.display().to_string(), &self.host);
        let (cmd, args, container) = match &spec.runtime {
            RuntimeSpec::Native { cmd, args } => {
                let (cmd, args) = expand_command(cmd, args, &env);
                (cmd, args, None)
            }
            RuntimeSpec::Oci { image, cmd } => {
                let img = self.images.get(image).ok_or_else(|| {
                    format!("no image {image:?} on this agent; import it with `cairn image import`")
                })?;
                let c = &img.config;
                let mut argv = c.entrypoint.clone();
                argv.extend(if cmd.is_empty() {
                    c.cmd.clone()
                } else {
                    cmd.clone()
                });
                if argv.is_empty() {
                    return Err(format!(
                        "image {image:?} has no entrypoint or cmd; give runtime.oci.cmd"
                    ));
                }
                let (uid, gid) = parse_user(&c.user)?;
                // The image's environment first; the task's own variables win.
                let mut e: Vec<(String, String)> = c
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
                    .collect();
                e.extend(spec.task_env(crate::init::CONTAINER_SANDBOX, &self.host));
                env = e;
                let fs = ContainerFs {
                    image_rootfs: self.images.rootfs(&img),
                    workdir: if c.working_dir.is_empty() {
                        "/".into()
                    } else {
                        c.working_dir.clone()
                    },
                    uid,
                    gid,
                };
                (argv[0].clone(), argv[1..].to_vec(), Some(fs))
            }
            RuntimeSpec::Wasm { .. } => unreachable!("checked by can_handle"),
        };
        let dns = self.dns.get().copied();
        if let Some(d) = dns {
            env.push(("CAIRN_DNS".into(), resolver_addr(d).to_string()));
        }
        let cgroup = match &self.cgroups {
            Some(h) => {
                let limits = Limits {
                    memory_bytes: (spec.resources.mem > 0).then_some(spec.resources.mem << 20),
                    pids: Some(spec.pids_max.unwrap_or(4096)),
                    cpus: (spec.resources.cpus > 0.0).then_some(spec.resources.cpus),
                };
                Some(
                    h.create(&self.cgroup_name(&spec.id), &limits)
                        .map_err(|e| format!("cgroup: {e}"))?,
                )
            }
            None => None,
        };
        let init = InitSpec {
            cmd,
            args,
            env,
            sandbox: sandbox.to_path_buf(),
            hostname: spec.id.chars().take(63).collect(),
            cgroup_procs: cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default(),
            network_none: spec.network() == Network::None,
            log_max_bytes: spec.log_max_bytes,
            container,
            binds: mounts
                .iter()
                .map(|(v, dir)| (dir.clone(), sandbox.join(&v.path)))
                .collect(),
            resolv_conf: dns
                .filter(|_| spec.network() != Network::None)
                .and_then(resolv_conf),
        };
        let spec_path = state_dir(sandbox).join("init.json");
        {
            use std::io::Write;
            // The task's environment (secrets) is in it: readable by root only.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&spec_path)
                .and_then(|mut f| {
                    f.write_all(&serde_json::to_vec(&init).map_err(std::io::Error::other)?)
                })
                .map_err(|e| format!("writing {}: {e}", spec_path.display()))?;
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // The supervisor (and so PID 1) gets none of the agent's environment: the cluster
        // token or any other agent secret never reaches a task.
        let child = tokio::process::Command::new(exe)
            .arg("__init")
            .arg(&spec_path)
            .env_clear()
            .env("PATH", crate::init::DEFAULT_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::create(state_dir(sandbox).join("init.log"))
                    .map(std::process::Stdio::from)
                    .unwrap_or(std::process::Stdio::null()),
            )
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("spawning the task supervisor: {e}"))?;
        let pid = child.id().unwrap_or(0);
        Ok((
            Control::Native {
                supervisor: pid,
                cgroup,
            },
            Child::Native(child),
            proc_start_ticks(pid),
        ))
    }

    fn start_wasm(
        &self,
        spec: &TaskSpec,
        sandbox: &Path,
        bytes: Vec<u8>,
        mounts: &[(TaskVolume, PathBuf)],
    ) -> Result<(Control, Child, Option<u64>), String> {
        let RuntimeSpec::Wasm { file, args } = &spec.runtime else {
            unreachable!("checked by can_handle")
        };
        let rt = self
            .wasm
            .as_ref()
            .ok_or("the wasm runtime is not available on this agent")?;
        let mut argv = vec![Path::new(file)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()];
        argv.extend(args.iter().cloned());
        let mem = if spec.resources.mem > 0 {
            (spec.resources.mem as usize) << 20
        } else {
            256 << 20
        };
        let task = WasmTask {
            id: spec.id.clone(),
            args: argv,
            env: spec.task_env(".", &self.host),
            sandbox,
            volumes: mounts
                .iter()
                .map(|(v, dir)| (dir.clone(), v.path.clone()))
                .collect(),
            memory_bytes: mem,
            // Sockets only with the spec's `network = "host"` (Wasm tasks default to none).
            allow_network: spec.network() == Network::Host,
            bind_ip: self.bind_ip,
            port: spec.ports.first().map(|p| p.number),
            cpus: spec.resources.cpus,
        };
        let (killed, usage, handle) = rt.start(bytes, task).map_err(|e| format!("{e:#}"))?;
        Ok((Control::Wasm { killed, usage }, Child::Wasm(handle), None))
    }

    /// Asks a task to stop: SIGTERM (native) or interrupt (Wasm), then SIGKILL after the grace.
    pub fn kill(self: &Arc<Self>, id: &str, why: &str) -> bool {
        let mut tasks = self.tasks.lock().expect("tasks");
        let Some(e) = tasks.get_mut(id) else {
            return false;
        };
        if e.status.state.is_terminal() {
            return true;
        }
        if e.kill_reason.is_none() {
            e.kill_reason = Some(why.to_string());
        }
        if e.status.state != TaskState::Killing {
            e.status.state = TaskState::Killing;
        }
        match &e.control {
            Control::Native { supervisor, cgroup } => {
                // The supervisor (started by this agent, identified by its start time)
                // forwards SIGTERM to PID 1; no pid is ever read from the sandbox.
                let (sup, sup_ticks) = (*supervisor, e.start_ticks);
                signal_supervisor(sup, sup_ticks, nix::sys::signal::Signal::SIGTERM);
                let grace = Duration::from_millis(e.spec.kill_grace_ms);
                let cgroup = cgroup.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    // Only while our supervisor still runs: after it exits, its pid may
                    // belong to some other process.
                    if !supervisor_alive(sup, sup_ticks) {
                        return;
                    }
                    match cgroup {
                        Some(cg) => cg.kill_all(),
                        // Without a cgroup: PID 1 dies with its supervisor
                        // (PR_SET_PDEATHSIG), and the PID namespace with PID 1.
                        None => {
                            signal_supervisor(sup, sup_ticks, nix::sys::signal::Signal::SIGKILL)
                        }
                    }
                });
            }
            Control::Wasm { killed, .. } => killed.kill(),
            Control::Done => {}
        }
        let snapshot = Entry {
            spec: e.spec.clone(),
            status: e.status.clone(),
            sandbox: e.sandbox.clone(),
            control: Control::Done,
            kill_reason: e.kill_reason.clone(),
            start_ticks: e.start_ticks,
        };
        drop(tasks);
        self.checkpoint(&snapshot);
        self.bump();
        true
    }

    /// Periodic limit checks shared by both runtimes. Returns a kill reason if one applies.
    /// The cgroup files and the sandbox walk are read without holding the task table's lock,
    /// and the walk (Mesos' `disk/du`) runs only every `DISK_EVERY` ticks.
    fn check_limits(&self, id: &str, started: Instant, tick: u64) -> Option<&'static str> {
        let (cgroup, sandbox_dir, timeout_ms, disk_mib, volumes) = {
            let mut tasks = self.tasks.lock().expect("tasks");
            let e = tasks.get(id)?;
            if e.kill_reason.is_some() {
                return None;
            }
            let cg = match &e.control {
                Control::Native {
                    cgroup: Some(cg), ..
                } => Some(cg.clone()),
                _ => None,
            };
            if let Control::Wasm { usage, .. } = &e.control {
                let (cpu, mem) = (
                    usage.cpu_usec.load(Ordering::Relaxed),
                    usage.memory_bytes.load(Ordering::Relaxed),
                );
                let e = tasks.get_mut(id)?;
                e.status.usage.cpu_usec = cpu;
                e.status.usage.memory_bytes = mem;
            }
            let e = tasks.get(id)?;
            (
                cg,
                e.sandbox.clone(),
                e.spec.timeout_ms,
                e.spec.resources.disk,
                e.spec.volumes.clone(),
            )
        };
        let usage = cgroup.map(|cg| cg.usage());
        let disk = tick
            .is_multiple_of(DISK_EVERY)
            .then(|| sandbox::disk_usage(&sandbox_dir));
        {
            let mut tasks = self.tasks.lock().expect("tasks");
            let e = tasks.get_mut(id)?;
            if let Some(u) = usage {
                e.status.usage.cpu_usec = u.cpu_usec;
                e.status.usage.memory_bytes = u.memory_bytes;
                e.status.usage.pids = u.pids;
            }
            if let Some(d) = disk {
                e.status.usage.disk_bytes = d;
            }
        }
        if timeout_ms.is_some_and(|t| started.elapsed() > Duration::from_millis(t)) {
            return Some(reason::TIMEOUT);
        }
        if disk_mib > 0 && disk.is_some_and(|d| d > disk_mib << 20) {
            return Some(reason::DISK_LIMIT);
        }
        if disk.is_some()
            && volumes
                .iter()
                .any(|v| self.volumes.usage(&v.id) > v.size_mb << 20)
        {
            return Some(reason::VOLUME_LIMIT);
        }
        None
    }

    async fn monitor_native(self: Arc<Self>, id: String, mut child: Option<tokio::process::Child>) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut ticks = 0u64;
        loop {
            if let Some(c) = child.as_mut() {
                tokio::select! {
                    _ = c.wait() => break,
                    _ = tick.tick() => {}
                }
            } else {
                tick.tick().await;
                let (pid, ticks) = {
                    let t = self.tasks.lock().expect("tasks");
                    match t.get(&id) {
                        Some(e) => (e.status.pid, e.start_ticks),
                        None => return,
                    }
                };
                let alive = pid
                    .and_then(proc_start_ticks)
                    .is_some_and(|t| Some(t) == ticks);
                if !alive {
                    break;
                }
            }
            ticks += 1;
            if let Some(why) = self.check_limits(&id, started, ticks) {
                self.kill(&id, why);
            }
        }
        self.finish_native(&id);
    }

    fn finish_native(&self, id: &str) {
        let mut tasks = self.tasks.lock().expect("tasks");
        let Some(e) = tasks.get_mut(id) else { return };
        // Written by PID 1 inside the task: read through no symlink, capped.
        let exit: ExitInfo = sandbox::open_subdir(&e.sandbox, ".cairn")
            .and_then(|d| sandbox::read_capped(&d, Path::new("exit.json"), MAX_EXIT_JSON))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let oom = match &e.control {
            Control::Native {
                cgroup: Some(cg), ..
            } => {
                let o = cg.oom_killed();
                cg.kill_all();
                o
            }
            _ => false,
        };
        let (state, why) = match (&e.kill_reason, oom, exit.code) {
            (Some(r), _, _) if r == reason::KILLED => (TaskState::Killed, Some(r.clone())),
            (Some(r), _, _) => (TaskState::Failed, Some(r.clone())),
            (None, true, _) => (TaskState::Failed, Some(reason::OOM.to_string())),
            (None, false, Some(0)) => (TaskState::Finished, None),
            (None, false, _) => (TaskState::Failed, Some(reason::EXITED.to_string())),
        };
        e.status.state = state;
        e.status.reason = why;
        e.status.exit_code = exit.code;
        e.status.signal = exit.signal;
        e.status.finished_at = Some(now_ms());
        e.status.usage.disk_bytes = sandbox::disk_usage(&e.sandbox);
        if let Control::Native {
            cgroup: Some(cg), ..
        } = &e.control
        {
            let cg = cg.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    if cg.pids().is_empty() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                cg.remove();
            });
        }
        e.control = Control::Done;
        let snapshot = Checkpoint {
            spec: e.spec.clone(),
            status: e.status.clone(),
            start_ticks: e.start_ticks,
        };
        drop(tasks);
        if let Ok(b) = serde_json::to_vec(&snapshot) {
            let _ = self.db.insert(id.as_bytes(), b);
            let _ = self.db.flush();
        }
        self.bump();
    }

    async fn monitor_wasm(
        self: Arc<Self>,
        id: String,
        outcome_rx: tokio::sync::oneshot::Receiver<WasmOutcome>,
    ) {
        let started = Instant::now();
        let mut join = outcome_rx;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut ticks = 0u64;
        let outcome = loop {
            tokio::select! {
                r = &mut join => break r.unwrap_or(WasmOutcome::Trap("wasm thread panicked".into())),
                _ = tick.tick() => {
                    ticks += 1;
            if let Some(why) = self.check_limits(&id, started, ticks) {
                        self.kill(&id, why);
                    }
                }
            }
        };
        let mut tasks = self.tasks.lock().expect("tasks");
        let Some(e) = tasks.get_mut(&id) else { return };
        let (state, why, code) = match (&outcome, &e.kill_reason) {
            (_, Some(r)) if r == reason::KILLED => (TaskState::Killed, Some(r.clone()), None),
            (WasmOutcome::Killed, Some(r)) => (TaskState::Failed, Some(r.clone()), None),
            (WasmOutcome::Exited(0), None) => (TaskState::Finished, None, Some(0)),
            (WasmOutcome::Exited(c), _) => (
                TaskState::Failed,
                Some(reason::EXITED.to_string()),
                Some(*c),
            ),
            (WasmOutcome::MemoryLimit, _) => (
                TaskState::Failed,
                Some(reason::MEMORY_LIMIT.to_string()),
                None,
            ),
            (WasmOutcome::Trap(m), _) => {
                e.status.message = Some(m.clone());
                (TaskState::Failed, Some(reason::TRAP.to_string()), None)
            }
            (WasmOutcome::Killed, None) => {
                (TaskState::Killed, Some(reason::KILLED.to_string()), None)
            }
        };
        e.status.state = state;
        e.status.reason = why;
        e.status.exit_code = code;
        e.status.finished_at = Some(now_ms());
        e.status.usage.disk_bytes = sandbox::disk_usage(&e.sandbox);
        e.control = Control::Done;
        let snapshot = Checkpoint {
            spec: e.spec.clone(),
            status: e.status.clone(),
            start_ticks: None,
        };
        drop(tasks);
        if let Ok(b) = serde_json::to_vec(&snapshot) {
            let _ = self.db.insert(id.as_bytes(), b);
            let _ = self.db.flush();
        }
        self.bump();
    }

    /// After a restart: re-attach running native tasks, record those that ended meanwhile,
    /// and fail Wasm tasks (they lived in the old agent process).
    fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut reattach = Vec::new();
        for kv in self.db.iter() {
            let (_, v) = kv?;
            let Ok(cp) = serde_json::from_slice::<Checkpoint>(&v) else {
                continue;
            };
            let sandbox = self.sandboxes.join(&cp.spec.id);
            let mut status = cp.status.clone();
            let mut control = Control::Done;
            if !status.state.is_terminal() {
                match status.runtime.as_str() {
                    "native" | "oci" => {
                        let cgroup = self
                            .cgroups
                            .as_ref()
                            .map(|h| h.open(&self.cgroup_name(&cp.spec.id)));
                        control = Control::Native {
                            supervisor: status.pid.unwrap_or(0),
                            cgroup,
                        };
                        reattach.push(cp.spec.id.clone());
                    }
                    _ => {
                        status.state = TaskState::Failed;
                        status.reason = Some(reason::AGENT_RESTART.into());
                        status.finished_at = Some(now_ms());
                    }
                }
            }
            let entry = Entry {
                spec: cp.spec.clone(),
                status,
                sandbox,
                control,
                kill_reason: None,
                start_ticks: cp.start_ticks,
            };
            self.checkpoint(&entry);
            self.tasks
                .lock()
                .expect("tasks")
                .insert(cp.spec.id.clone(), entry);
        }
        for id in reattach {
            // A supervisor that died while the agent was down (a host crash, a kill) ends
            // its task now: listing it `running` until the first monitor tick would tell the
            // masters, and anyone asking this agent, that a dead task runs.
            let (pid, ticks) = {
                let t = self.tasks.lock().expect("tasks");
                t.get(&id)
                    .map(|e| (e.status.pid, e.start_ticks))
                    .unwrap_or((None, None))
            };
            if !pid.is_some_and(|p| supervisor_alive(p, ticks)) {
                tracing::info!(task = %id, "its supervisor is gone: the task ended");
                self.finish_native(&id);
                continue;
            }
            tracing::info!(task = %id, "re-attaching to a running task");
            if !checks_of(&self.tasks, &id).is_empty() {
                tokio::spawn(self.clone().health_loop(id.clone()));
            }
            tokio::spawn(self.clone().monitor_native(id, None));
        }
        Ok(())
    }
}

/// Whether the supervisor `pid` is still the process this agent started (same start time).
/// Expands `$VAR` and `${VAR}` (also `${VAR:-default}`) in a native command and its
/// arguments from the task's environment, as a shell would but without one: no word
/// splitting, no globbing, no command substitution. A variable the task does not have is
/// left as written; `$$` is a literal `$`.
pub fn expand_command(
    cmd: &str,
    args: &[String],
    env: &[(String, String)],
) -> (String, Vec<String>) {
    let lookup = |name: &str| -> Option<String> {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let expand = |s: &str| shellexpand::env_with_context_no_errors(s, lookup).into_owned();
    (expand(cmd), args.iter().map(|a| expand(a)).collect())
}

fn supervisor_alive(pid: u32, start_ticks: Option<u64>) -> bool {
    pid > 1 && start_ticks.is_some() && proc_start_ticks(pid) == start_ticks
}

/// Signals a task's supervisor, and only if it is still the process this agent started.
fn signal_supervisor(pid: u32, start_ticks: Option<u64>, sig: nix::sys::signal::Signal) {
    if supervisor_alive(pid, start_ticks) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

enum Child {
    Native(tokio::process::Child),
    Wasm(tokio::sync::oneshot::Receiver<WasmOutcome>),
}

/// An image's `User` as numeric uid[:gid] (empty: root).
fn parse_user(user: &str) -> Result<(Option<u32>, Option<u32>), String> {
    if user.is_empty() {
        return Ok((None, None));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("image user {user:?}: only numeric uid[:gid] is supported"))
    };
    Ok((Some(num(u)?), g.map(num).transpose()?))
}

/// Every Wasm task holds its stdout, stderr and sandbox open, and a leader holds a connection
/// per agent: lift the soft open-files limit to the hard one (and, as root, the hard one to
/// 1,048,576) so 10,000 tasks or agents fit. Called by agents and masters at start.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = hard.max(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() && soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn checks_of(
    tasks: &Mutex<HashMap<String, Entry>>,
    id: &str,
) -> Vec<cairn_kernel::model::HealthCheck> {
    tasks
        .lock()
        .expect("tasks")
        .get(id)
        .map(|e| e.spec.health_checks.clone())
        .unwrap_or_default()
}

/// PID 1 of a native task: the only child of its supervisor, as the kernel lists it (never
/// a pid read from the sandbox).
fn task_pid1(sup: u32, sup_ticks: Option<u64>) -> Option<u32> {
    if !supervisor_alive(sup, sup_ticks) {
        return None;
    }
    let kids = std::fs::read_to_string(format!("/proc/{sup}/task/{sup}/children")).ok()?;
    let pid1: u32 = kids.split_whitespace().next()?.parse().ok()?;
    // Still the supervisor's child (not a recycled pid).
    let status = std::fs::read_to_string(format!("/proc/{pid1}/status")).ok()?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse::<u32>()
        .ok()?;
    (ppid == sup).then_some(pid1)
}

/// Where a command health check runs: inside the task (its PID 1's namespaces, root and
/// working directory, and its cgroup).
struct CheckTarget {
    pid1: u32,
    cgroup_procs: Vec<PathBuf>,
}

/// Starts a command check inside the task: a fixed host shell waits on stdin until the
/// agent has moved it into the task's cgroup, then becomes `nsenter` into PID 1's
/// namespaces (mount, UTS, IPC, net, PID; root and cwd), which runs the command there. The
/// command's words are arguments, never shell text.
async fn command_in_task(
    argv: &[String],
    env: Vec<(String, String)>,
    target: &CheckTarget,
) -> Result<tokio::process::Child, String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"read _ && exec nsenter -t "$0" -m -u -i -n -p -r -w -- "$@""#)
        .arg(target.pid1.to_string())
        .args(argv)
        .env_clear()
        .envs(env)
        .env("PATH", crate::init::DEFAULT_PATH)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting the check: {e}"))?;
    let pid = child.id().ok_or("the check exited at once")?;
    for f in &target.cgroup_procs {
        std::fs::write(f, pid.to_string())
            .map_err(|e| format!("moving the check into the task's cgroup: {e}"))?;
    }
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin
        .write_all(b"\n")
        .await
        .map_err(|e| format!("starting the check: {e}"))?;
    drop(stdin);
    Ok(child)
}

/// Runs one health check once; Err says why it failed.
async fn check_once(
    http: &reqwest::Client,
    c: &cairn_kernel::model::HealthCheck,
    spec: &TaskSpec,
    target: Option<&CheckTarget>,
    host: &str,
) -> Result<(), String> {
    use cairn_kernel::model::HealthKind;
    let timeout = Duration::from_millis(c.timeout_ms);
    let port = || {
        spec.ports
            .iter()
            .find(|p| p.name == c.port)
            .map(|p| p.number)
            .ok_or_else(|| format!("the task has no port {:?}", c.port))
    };
    match c.kind {
        HealthKind::Tcp => {
            let addr = format!("127.0.0.1:{}", port()?);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("tcp {addr}: {e}")),
                Err(_) => Err(format!("tcp {addr}: timed out")),
            }
        }
        HealthKind::Http => {
            let url = format!("http://127.0.0.1:{}{}", port()?, c.path);
            match http.get(&url).timeout(timeout).send().await {
                Ok(r) if r.status().as_u16() < 400 => Ok(()),
                Ok(r) => Err(format!("GET {url}: {}", r.status())),
                Err(e) => Err(format!("GET {url}: {e}")),
            }
        }
        HealthKind::Command => {
            // Never on the host: only inside a running native or OCI task.
            let cmd = c.command.first().ok_or("empty command")?;
            let target = target
                .ok_or("command checks run inside the task: only native and OCI tasks have them")?;
            let sandbox = match spec.runtime {
                RuntimeSpec::Oci { .. } => crate::init::CONTAINER_SANDBOX.to_string(),
                _ => ".".to_string(),
            };
            let run = async {
                let mut child =
                    command_in_task(&c.command, spec.task_env(&sandbox, host), target).await?;
                child.wait().await.map_err(|e| e.to_string())
            };
            match tokio::time::timeout(timeout, run).await {
                Ok(Ok(st)) if st.success() => Ok(()),
                Ok(Ok(st)) => Err(format!("{cmd}: {st}")),
                Ok(Err(e)) => Err(format!("{cmd}: {e}")),
                Err(_) => Err(format!("{cmd}: timed out")),
            }
        }
    }
}

impl TaskManager {
    /// Where a command check of task `id` runs, if it is a running native or OCI task.
    fn check_target(&self, id: &str) -> Option<CheckTarget> {
        let (sup, ticks, procs) = {
            let tasks = self.tasks.lock().expect("tasks");
            let e = tasks.get(id)?;
            match &e.control {
                Control::Native { supervisor, cgroup } => (
                    *supervisor,
                    e.start_ticks,
                    cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default(),
                ),
                _ => return None,
            }
        };
        Some(CheckTarget {
            pid1: task_pid1(sup, ticks)?,
            cgroup_procs: procs,
        })
    }

    fn set_healthy(&self, id: &str, healthy: Option<bool>, message: Option<String>) {
        let mut tasks = self.tasks.lock().expect("tasks");
        if let Some(e) = tasks.get_mut(id) {
            if e.status.healthy != healthy {
                e.status.healthy = healthy;
                if message.is_some() {
                    e.status.message = message;
                }
                drop(tasks);
                self.bump();
            }
        }
    }

    /// While the task runs: after the grace period, runs every check each interval; a check
    /// failing `max_failures` times in a row makes the task unhealthy and kills it.
    async fn health_loop(self: Arc<Self>, id: String) {
        let Some(spec) = ({
            let tasks = self.tasks.lock().expect("tasks");
            tasks.get(&id).map(|e| e.spec.clone())
        }) else {
            return;
        };
        let checks = spec.health_checks.clone();
        let grace = checks.iter().map(|c| c.grace_ms).min().unwrap_or(0);
        let interval = checks.iter().map(|c| c.interval_ms).min().unwrap_or(5_000);
        tokio::time::sleep(Duration::from_millis(grace)).await;
        let mut failures = vec![0u32; checks.len()];
        // One client (and connection pool) for the task's whole life, not one per check.
        let http = reqwest::Client::new();
        loop {
            if self.get(&id).is_none_or(|s| s.state.is_terminal()) {
                return;
            }
            let target = self.check_target(&id);
            let mut all_ok = true;
            for (i, c) in checks.iter().enumerate() {
                match check_once(&http, c, &spec, target.as_ref(), &self.host).await {
                    Ok(()) => failures[i] = 0,
                    Err(why) => {
                        all_ok = false;
                        failures[i] += 1;
                        tracing::debug!(task = %id, "health check failed: {why}");
                        if failures[i] >= c.max_failures {
                            self.set_healthy(&id, Some(false), Some(why));
                            self.kill(&id, reason::UNHEALTHY);
                            return;
                        }
                    }
                }
            }
            if all_ok {
                self.set_healthy(&id, Some(true), None);
            }
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_resolve_through_the_agent_only_on_port_53() {
        let conf = resolv_conf("10.1.0.101:53".parse().unwrap()).unwrap();
        assert!(conf.contains("nameserver 10.1.0.101\n"), "{conf}");
        assert!(conf.contains("search cairn\n"), "{conf}");
        // resolv.conf cannot name a port: elsewhere tasks keep the host's.
        assert_eq!(resolv_conf("127.0.0.1:5053".parse().unwrap()), None);
        let any = resolv_conf("0.0.0.0:53".parse().unwrap()).unwrap();
        assert!(any.contains("nameserver 127.0.0.1\n"), "{any}");
        assert_eq!(
            resolver_addr("[::]:5053".parse().unwrap()),
            "[::1]:5053".parse().unwrap()
        );
    }

    #[test]
    fn commands_expand_the_tasks_variables_only() {
        let env: Vec<(String, String)> = [("PORT_HTTP", "8080"), ("POD", "node-1"), ("POD", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cases: &[(&str, &str)] = &[
            ("--port=$PORT_HTTP", "--port=8080"),
            ("${POD}.log", "x.log"),
            ("$NOPE stays", "$NOPE stays"),
            ("${NOPE:-dflt}", "dflt"),
            ("$0 and $$", "$0 and $"),
            ("no vars; `date` $(id)", "no vars; `date` $(id)"),
        ];
        for (arg, want) in cases {
            let (cmd, args) = expand_command("$POD", &[arg.to_string()], &env);
            assert_eq!(cmd, "x");
            assert_eq!(args, [want.to_string()], "{arg}");
        }
    }

    /// Issue 14 hole 8: `runtime.wasm.file` was read whole by root from any host path.
    #[test]
    fn wasm_files_are_read_only_from_allowed_dirs() {
        let outer = tempfile::tempdir().unwrap();
        let allowed = outer.path().join("wasm");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::write(allowed.join("sub/app.wasm"), b"\0asm").unwrap();
        std::fs::write(outer.path().join("outside.wasm"), b"\0asm").unwrap();
        std::os::unix::fs::symlink("/dev/zero", allowed.join("zero.wasm")).unwrap();
        std::os::unix::fs::symlink(outer.path(), allowed.join("up")).unwrap();
        nix::unistd::mkfifo(&allowed.join("fifo.wasm"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::File::create(allowed.join("huge.wasm"))
            .unwrap()
            .set_len(MAX_WASM_BYTES + 1)
            .unwrap();
        let dirs = vec![allowed.clone()];
        let read = |f: &Path| read_wasm_file(&f.display().to_string(), &dirs);
        assert_eq!(read(&allowed.join("sub/app.wasm")).unwrap(), b"\0asm");
        assert_eq!(read(&allowed.join("./sub/app.wasm")).unwrap(), b"\0asm");
        for bad in [
            PathBuf::from("/dev/zero"),
            PathBuf::from("/proc/kmsg"),
            outer.path().join("outside.wasm"),
            allowed.join("zero.wasm"),
            allowed.join("up/outside.wasm"),
            allowed.join("sub/../../outside.wasm"),
            allowed.join("fifo.wasm"),
            allowed.join("huge.wasm"),
            allowed.clone(),
            PathBuf::from("relative.wasm"),
        ] {
            assert!(read(&bad).is_err(), "{} was read", bad.display());
        }
        let e = read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains(WASM_DIRS_ENV), "{e}");
        let dirs = wasm_dirs(outer.path(), Some("/srv/a:relative:/srv/../etc")).unwrap();
        assert_eq!(
            dirs[..2],
            [outer.path().join("wasm"), PathBuf::from("/srv/a")]
        );
        assert!(!dirs.contains(&PathBuf::from("/srv/../etc")));
    }

    /// Issue 14 hole 10: HTTP components listened on 0.0.0.0 whatever the agent's address.
    #[test]
    fn http_components_bind_the_agent_address() {
        let ip = |s: &str| bind_ip(s).to_string();
        assert_eq!(ip("127.0.0.1"), "127.0.0.1");
        assert_eq!(ip("10.1.2.3"), "10.1.2.3");
        assert_eq!(ip("[::1]"), "::1");
        assert_eq!(ip("no-such-host.invalid"), "127.0.0.1");
    }
}
