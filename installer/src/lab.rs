//! A local cluster of real `cairn master` / `cairn agent` processes on loopback: start, kill -9,
//! restart, find the leader. Ports are picked free by the OS.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Returns a TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One master process.
pub struct MasterProc {
    pub id: u64,
    /// API address.
    pub addr: String,
    /// Raft peer address.
    pub peer: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    args: Vec<String>,
}

/// A set of masters started from one binary.
pub struct Lab {
    pub bin: PathBuf,
    pub token: String,
    /// The masters' own credential for Raft RPCs (never the users' token).
    pub peer_token: String,
    pub masters: Vec<MasterProc>,
    pub agents: Vec<AgentProc>,
    pub dir: PathBuf,
    pub extra: Vec<String>,
    /// The lab's CA (`<dir>/pki`, with an admin certificate in `admin/`) when it runs TLS
    /// (`start_tls`); plaintext (`--insecure`) otherwise.
    pub pki: Option<PathBuf>,
    http: reqwest::Client,
}

/// One agent process.
pub struct AgentProc {
    pub addr: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    args: Vec<String>,
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
}

impl Lab {
    /// Starts `n` masters (ids 1..=n) that bootstrap one cluster, plaintext (`--insecure`).
    /// `extra` goes to every master.
    pub fn start(
        bin: &Path,
        dir: &Path,
        n: u64,
        token: &str,
        extra: &[&str],
    ) -> std::io::Result<Lab> {
        Self::start_with(bin, dir, n, token, extra, false)
    }

    /// As `start`, with mutual TLS: a CA in `<dir>/pki`, a certificate per node.
    pub fn start_tls(
        bin: &Path,
        dir: &Path,
        n: u64,
        token: &str,
        extra: &[&str],
    ) -> std::io::Result<Lab> {
        Self::start_with(bin, dir, n, token, extra, true)
    }

    fn start_with(
        bin: &Path,
        dir: &Path,
        n: u64,
        token: &str,
        extra: &[&str],
        tls: bool,
    ) -> std::io::Result<Lab> {
        let pki = if tls {
            let p = dir.join("pki");
            let ca = crate::pki::Ca::generate("lab").map_err(std::io::Error::other)?;
            ca.save(&p).map_err(std::io::Error::other)?;
            crate::pki::ensure_admin(&ca, &p, "lab").map_err(std::io::Error::other)?;
            Some(p)
        } else {
            None
        };
        let addrs: Vec<(String, String)> = (0..n)
            .map(|_| {
                (
                    format!("127.0.0.1:{}", free_port()),
                    format!("127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, (a, p))| format!("{}@{a}/{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut lab = Lab {
            bin: bin.to_path_buf(),
            token: token.to_string(),
            peer_token: format!("lab-peer-secret-{}-{}", std::process::id(), free_port()),
            masters: Vec::new(),
            agents: Vec::new(),
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            http: Self::client_for(pki.as_deref())
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client"),
            pki,
        };
        for (i, (addr, peer)) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let mut args = vec!["--peers".to_string(), peers.clone()];
            args.extend(lab.extra.clone());
            lab.add_master_proc(id, addr, peer, args)?;
        }
        Ok(lab)
    }

    fn add_master_proc(
        &mut self,
        id: u64,
        addr: &str,
        peer: &str,
        more: Vec<String>,
    ) -> std::io::Result<()> {
        let data_dir = self.dir.join(format!("master-{id}"));
        let mut args = vec![
            "master".to_string(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--peer-listen".into(),
            peer.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--token".into(),
            self.token.clone(),
            "--peer-token".into(),
            self.peer_token.clone(),
        ];
        args.extend(self.tls_args(
            &data_dir,
            crate::pki::Role::Master,
            &id.to_string(),
            "127.0.0.1",
        )?);
        args.extend(more);
        let child = spawn(&self.bin, &args, &self.dir.join(format!("master-{id}.log")))?;
        self.masters.push(MasterProc {
            id,
            addr: addr.to_string(),
            peer: peer.to_string(),
            data_dir,
            child: Some(child),
            args,
        });
        Ok(())
    }

    /// Starts a new master with `--join` (not yet a member); returns its API and peer
    /// addresses.
    pub fn start_joining_master(&mut self, id: u64) -> std::io::Result<(String, String)> {
        let addr = format!("127.0.0.1:{}", free_port());
        let peer = format!("127.0.0.1:{}", free_port());
        let mut more = vec!["--join".to_string()];
        more.extend(self.extra.clone());
        self.add_master_proc(id, &addr, &peer, more)?;
        Ok((addr, peer))
    }

    /// Starts an agent process pointed at every master.
    pub fn start_agent(&mut self, extra: &[&str]) -> std::io::Result<usize> {
        self.start_agent_on("127.0.0.1", extra)
    }

    /// Starts an agent listening on `ip` (a loopback address such as 127.0.0.2, so agents on
    /// one machine have hosts of their own); returns its index among the lab's agents.
    pub fn start_agent_on(&mut self, ip: &str, extra: &[&str]) -> std::io::Result<usize> {
        let n = self.agents.len();
        let addr = format!("{ip}:{}", free_port());
        let data_dir = self.dir.join(format!("agent-{n}"));
        let masters = self
            .masters
            .iter()
            .map(|m| m.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "agent".to_string(),
            "--masters".into(),
            masters,
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--token".into(),
            self.token.clone(),
        ];
        if self.pki.is_some() {
            // The agent's id is chosen here so its certificate can name it (random: its
            // first 8 characters name its task cgroups).
            std::fs::create_dir_all(&data_dir)?;
            if !data_dir.join("agent-id").exists() {
                let id = format!("{:016x}", rand::random::<u64>());
                std::fs::write(data_dir.join("agent-id"), id)?;
            }
            let id = std::fs::read_to_string(data_dir.join("agent-id"))?;
            args.extend(self.tls_args(&data_dir, crate::pki::Role::Agent, id.trim(), ip)?);
        } else {
            args.push("--insecure".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = spawn(&self.bin, &args, &self.dir.join(format!("agent-{n}.log")))?;
        self.agents.push(AgentProc {
            addr,
            data_dir,
            child: Some(child),
            args,
        });
        Ok(n)
    }

    /// Starts one process of `n` simulated agents (`cairn agent --simulate N`) pointed at every
    /// master, each with `resources`; returns its index among the lab's agents.
    pub fn start_simulated_agents(
        &mut self,
        n: usize,
        resources: &str,
        extra: &[&str],
    ) -> std::io::Result<usize> {
        let mut args = vec![
            "--simulate".to_string(),
            n.to_string(),
            "--resources".into(),
            resources.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent(&args)
    }

    /// The process id of a running master.
    pub fn master_pid(&self, id: u64) -> Option<u32> {
        self.master(id).child.as_ref().map(|c| c.id())
    }

    pub fn master(&self, id: u64) -> &MasterProc {
        self.masters
            .iter()
            .find(|m| m.id == id)
            .expect("no such master")
    }

    fn master_mut(&mut self, id: u64) -> &mut MasterProc {
        self.masters
            .iter_mut()
            .find(|m| m.id == id)
            .expect("no such master")
    }

    /// kill -9 of a master.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.master_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop (SIGTERM) of a master.
    pub fn stop(&mut self, id: u64) {
        if let Some(mut c) = self.master_mut(id).child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// Restarts a killed or stopped master with its data dir and arguments.
    pub fn restart(&mut self, id: u64) -> std::io::Result<()> {
        let bin = self.bin.clone();
        let log = self.dir.join(format!("master-{id}.log"));
        let m = self.master_mut(id);
        if m.child.is_none() {
            m.child = Some(spawn(&bin, &m.args, &log)?);
        }
        Ok(())
    }

    pub fn kill_agent(&mut self, n: usize) {
        if let Some(mut c) = self.agents[n].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A host crash of agent `n`: kill -9 of the agent and of every process of its tasks
    /// (supervisors outlive an agent on purpose; a dead machine takes them along).
    pub fn crash_agent(&mut self, n: usize) {
        self.kill_agent(n);
        // The supervisor's PID 1 dies with it (PR_SET_PDEATHSIG), and the task's PID
        // namespace with PID 1.
        kill_processes_mentioning(&self.agents[n].data_dir.join(""));
    }

    /// The process id of agent `n`, if it runs.
    pub fn agent_pid(&self, n: usize) -> Option<u32> {
        self.agents[n].child.as_ref().map(|c| c.id())
    }

    /// The agent's API address (`host:port`).
    pub fn agent_addr(&self, n: usize) -> &str {
        &self.agents[n].addr
    }

    pub fn restart_agent(&mut self, n: usize) -> std::io::Result<()> {
        let log = self.dir.join(format!("agent-{n}.log"));
        let a = &mut self.agents[n];
        if a.child.is_none() {
            a.child = Some(spawn(&self.bin, &a.args, &log)?);
        }
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.master(id).child.is_some()
    }

    /// `--insecure` for a plaintext lab; for a TLS lab, the node's certificate (issued into
    /// `<data_dir>/tls`, with the CA key for masters) and `--tls-dir`.
    fn tls_args(
        &self,
        data_dir: &Path,
        role: crate::pki::Role,
        name: &str,
        ip: &str,
    ) -> std::io::Result<Vec<String>> {
        let Some(p) = &self.pki else {
            return Ok(vec!["--insecure".into()]);
        };
        let tls = data_dir.join("tls");
        let ca = crate::pki::Ca::load(p).map_err(std::io::Error::other)?;
        crate::pki::ensure_node(&ca, &tls, role, name, &[ip.to_string()])
            .map_err(std::io::Error::other)?;
        if role == crate::pki::Role::Master {
            ca.save(&tls).map_err(std::io::Error::other)?;
        }
        Ok(vec!["--tls-dir".into(), tls.display().to_string()])
    }

    /// A client builder for this lab: for a TLS lab it trusts the lab's CA and presents the
    /// admin certificate.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        Self::client_for(self.pki.as_deref())
    }

    fn client_for(pki: Option<&Path>) -> reqwest::ClientBuilder {
        match pki {
            // The harness made these files itself: their absence is a broken test setup.
            Some(p) => crate::pki::admin_client(p).expect("the lab's CA and admin certificate"),
            None => reqwest::Client::builder(),
        }
    }

    /// `https` for a TLS lab, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.pki.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// GET a path on one master with the token; `None` if it does not answer 2xx.
    pub async fn get(&self, addr: &str, path: &str) -> Option<serde_json::Value> {
        let r = self
            .http
            .get(format!("{}://{addr}{path}", self.scheme()))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// The leader id as the running masters report it, if they agree on one.
    pub async fn leader(&self) -> Option<u64> {
        let mut seen = None;
        for m in self.masters.iter().filter(|m| m.child.is_some()) {
            let v = self.get(&m.addr, "/api/v1/cluster").await?;
            let l = v["leader_id"].as_u64()?;
            if seen.is_some() && seen != Some(l) {
                return None;
            }
            seen = Some(l);
        }
        seen.filter(|l| self.masters.iter().any(|m| m.id == *l && m.child.is_some()))
    }

    /// Waits until the running masters agree on a running leader.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Addresses of running masters.
    pub fn running_addrs(&self) -> Vec<String> {
        self.masters
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.addr.clone())
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for m in &mut self.masters {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Tasks outlive their agent by design; the lab's must not outlive the lab. Every
        // task supervisor and PID 1 names its spec under the lab dir on its command line
        // (killing a PID 1 ends its whole PID namespace).
        kill_processes_mentioning(&self.dir);
        // Their (now empty) cgroups: `<controller>/cairn/<agent id prefix>-<task>`.
        for a in &self.agents {
            remove_agent_cgroups(&a.data_dir);
        }
    }
}

/// Removes the (empty) task cgroups of the agent whose data dir is `data_dir`:
/// `<controller>/cairn/<agent id prefix>-<task>`.
pub fn remove_agent_cgroups(data_dir: &Path) {
    let Ok(id) = std::fs::read_to_string(data_dir.join("agent-id")) else {
        return;
    };
    let prefix: String = id.trim().chars().take(8).collect();
    remove_task_cgroups(Path::new("/sys/fs/cgroup"), &prefix);
}

/// Every process (but this one) whose command line contains `needle`.
pub fn pids_mentioning(needle: impl AsRef<std::ffi::OsStr>) -> Vec<u32> {
    let needle = needle.as_ref().as_encoded_bytes().to_vec();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (pid != me && cmd.windows(needle.len()).any(|w| w == needle.as_slice())).then_some(pid)
        })
        .collect()
}

/// SIGKILLs every process whose command line contains `dir`, repeating until none is left
/// (a supervisor may still be starting children); how many it killed.
pub fn kill_processes_mentioning(dir: &Path) -> usize {
    let mut killed = 0;
    for _ in 0..20 {
        let pids = pids_mentioning(dir);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        killed += pids.len();
        std::thread::sleep(Duration::from_millis(50));
    }
    killed
}

/// Removes the task cgroups of one agent (v1: under each controller; v2: under the root).
fn remove_task_cgroups(root: &Path, prefix: &str) {
    let mut parents = vec![root.join("cairn")];
    for c in ["memory", "pids", "cpu", "cpuacct", "cpu,cpuacct"] {
        parents.push(root.join(c).join("cairn"));
    }
    for p in parents {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
            {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}
