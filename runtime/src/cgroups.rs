//! cgroups v1 and v2 for task limits and usage. Every path is under a `root` given by the
//! caller (normally `/sys/fs/cgroup`), so the tests run against a temp dir, as youki's do.

use std::path::{Path, PathBuf};

/// Which cgroup interface the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Version {
    V1,
    V2,
}

/// Limits applied to one task's cgroup. `None` leaves a limit unset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU quota in cores (e.g. 0.5): a CFS quota, plus shares/weight in proportion.
    pub cpus: Option<f64>,
}

/// Usage read from a task's cgroup.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_usec: u64,
    pub pids: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy under {0}: need cgroup2 (cgroup.controllers) or v1 memory/pids/cpu mounts")]
    NotFound(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// The host's cgroup hierarchy, and where Cairn keeps its task groups (`<root>/.../cairn`).
#[derive(Clone, Debug)]
pub struct Hierarchy {
    pub version: Version,
    pub root: PathBuf,
    pub parent: String,
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

impl Hierarchy {
    /// Detects v2 (unified, `cgroup.controllers` at the root) or v1 (per-controller mounts).
    pub fn detect(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        let version = if root.join("cgroup.controllers").exists() {
            Version::V2
        } else if root.join("memory").is_dir() && root.join("pids").is_dir() {
            Version::V1
        } else {
            return Err(CgroupError::NotFound(root.to_path_buf()));
        };
        Ok(Self {
            version,
            root: root.to_path_buf(),
            parent: parent.to_string(),
        })
    }

    fn v1_dir(&self, controller: &str, task: &str) -> Option<PathBuf> {
        let base = self.root.join(controller);
        base.is_dir().then(|| base.join(&self.parent).join(task))
    }

    /// The directories of a task's cgroup (one on v2, one per controller on v1).
    pub fn dirs(&self, task: &str) -> Vec<PathBuf> {
        match self.version {
            Version::V2 => vec![self.root.join(&self.parent).join(task)],
            Version::V1 => V1_CONTROLLERS
                .iter()
                .filter_map(|c| self.v1_dir(c, task))
                .collect(),
        }
    }

    /// Creates the task's cgroup and applies `limits`.
    pub fn create(&self, task: &str, limits: &Limits) -> Result<TaskCgroup, CgroupError> {
        if self.version == Version::V2 {
            // Controllers must be enabled in every ancestor's subtree_control.
            let parent = self.root.join(&self.parent);
            std::fs::create_dir_all(&parent).map_err(io(&parent))?;
            for dir in [self.root.clone(), parent] {
                let f = dir.join("cgroup.subtree_control");
                let _ = write(&f, "+memory +pids +cpu");
            }
        }
        let dirs = self.dirs(task);
        for d in &dirs {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let cg = TaskCgroup {
            version: self.version,
            dirs,
        };
        cg.apply(limits)?;
        Ok(cg)
    }

    /// Re-opens an existing task cgroup (after an agent restart).
    pub fn open(&self, task: &str) -> TaskCgroup {
        TaskCgroup {
            version: self.version,
            dirs: self.dirs(task),
        }
    }
}

/// One task's cgroup.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskCgroup {
    pub version: Version,
    pub dirs: Vec<PathBuf>,
}

impl TaskCgroup {
    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        match self.version {
            Version::V2 => self.dirs.first().map(|d| d.join(name)),
            Version::V1 => self
                .dirs
                .iter()
                .find(|d| {
                    d.parent()
                        .and_then(|p| p.parent())
                        .is_some_and(|c| c.ends_with(controller))
                })
                .map(|d| d.join(name)),
        }
    }

    fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        match self.version {
            Version::V2 => {
                if let Some(m) = l.memory_bytes {
                    self.set("memory", "memory.max", &m.to_string())?;
                    // No swap: the limit is a hard memory limit.
                    let _ = self.set("memory", "memory.swap.max", "0");
                }
                if let Some(p) = l.pids {
                    self.set("pids", "pids.max", &p.to_string())?;
                }
                if let Some(c) = l.cpus {
                    let quota = (c * 100_000.0).round().max(1000.0) as u64;
                    self.set("cpu", "cpu.max", &format!("{quota} 100000"))?;
                    let weight = ((c * 100.0).round() as u64).clamp(1, 10_000);
                    self.set("cpu", "cpu.weight", &weight.to_string())?;
                }
            }
            Version::V1 => {
                if let Some(m) = l.memory_bytes {
                    // memory.limit_in_bytes may not exceed memsw (EINVAL): lift memsw first,
                    // then set both (a reused group may have a lower memsw limit).
                    let _ = self.set("memory", "memory.memsw.limit_in_bytes", "-1");
                    self.set("memory", "memory.limit_in_bytes", &m.to_string())?;
                    let _ = self.set("memory", "memory.memsw.limit_in_bytes", &m.to_string());
                }
                if let Some(p) = l.pids {
                    self.set("pids", "pids.max", &p.to_string())?;
                }
                if let Some(c) = l.cpus {
                    let quota = (c * 100_000.0).round().max(1000.0) as u64;
                    self.set("cpu", "cpu.cfs_period_us", "100000")?;
                    self.set("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
                    let shares = ((c * 1024.0).round() as u64).max(2);
                    self.set("cpu", "cpu.shares", &shares.to_string())?;
                }
            }
        }
        Ok(())
    }

    fn set(&self, controller: &str, name: &str, value: &str) -> Result<(), CgroupError> {
        match self.file(controller, name) {
            Some(f) => write(&f, value),
            None => Ok(()),
        }
    }

    /// Every `cgroup.procs` file a process must join to be inside this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for f in self.procs_files() {
            write(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// Process ids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let f = match self.version {
            Version::V2 => self.dirs.first().map(|d| d.join("cgroup.procs")),
            Version::V1 => self
                .file("pids", "cgroup.procs")
                .or_else(|| self.dirs.first().map(|d| d.join("cgroup.procs"))),
        };
        f.and_then(|f| read(&f).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether the kernel OOM-killed something in this cgroup.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = match self.version {
            Version::V2 => ("memory.events", "oom_kill"),
            Version::V1 => ("memory.oom_control", "oom_kill"),
        };
        self.file("memory", file)
            .and_then(|f| read(&f).ok())
            .and_then(|s| parse_key(&s, key))
            .is_some_and(|n| n > 0)
    }

    /// Memory, CPU time and process count.
    pub fn usage(&self) -> Usage {
        let num = |c: &str, f: &str| {
            self.file(c, f)
                .and_then(|f| read(&f).ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        match self.version {
            Version::V2 => Usage {
                memory_bytes: num("memory", "memory.current").unwrap_or(0),
                cpu_usec: self
                    .file("cpu", "cpu.stat")
                    .and_then(|f| read(&f).ok())
                    .and_then(|s| parse_key(&s, "usage_usec"))
                    .unwrap_or(0),
                pids: num("pids", "pids.current").unwrap_or(0),
            },
            Version::V1 => Usage {
                memory_bytes: num("memory", "memory.usage_in_bytes").unwrap_or(0),
                cpu_usec: num("cpuacct", "cpuacct.usage").unwrap_or(0) / 1000,
                pids: num("pids", "pids.current").unwrap_or(0),
            },
        }
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill` on v2 when present).
    pub fn kill_all(&self) {
        if self.version == Version::V2 {
            if let Some(f) = self.file("", "cgroup.kill") {
                if f.exists() && write(&f, "1").is_ok() {
                    return;
                }
            }
        }
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup directories (they must be empty of processes).
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Reads `key N` from a flat-keyed cgroup file.
fn parse_key(s: &str, key: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next().and_then(|v| v.parse().ok()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> String {
        let mut out = Vec::new();
        for e in walk(dir) {
            let rel = e.strip_prefix(dir).unwrap().display().to_string();
            let content = std::fs::read_to_string(&e).unwrap_or_default();
            out.push(format!("{rel}={}", content.trim()));
        }
        out.sort();
        out.join("\n")
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
        v
    }

    #[test]
    fn v2_against_a_temp_dir() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let h = Hierarchy::detect(root.path(), "cairn").unwrap();
        assert_eq!(h.version, Version::V2);
        let cg = h
            .create(
                "t1",
                &Limits {
                    memory_bytes: Some(64 << 20),
                    pids: Some(100),
                    cpus: Some(0.5),
                },
            )
            .unwrap();
        assert_eq!(
            files(root.path()),
            "cairn/cgroup.subtree_control=+memory +pids +cpu\n\
             cairn/t1/cpu.max=50000 100000\n\
             cairn/t1/cpu.weight=50\n\
             cairn/t1/memory.max=67108864\n\
             cairn/t1/memory.swap.max=0\n\
             cairn/t1/pids.max=100\n\
             cgroup.controllers=cpu memory pids\n\
             cgroup.subtree_control=+memory +pids +cpu"
        );
        let d = root.path().join("cairn/t1");
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(d.join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(d.join("cgroup.procs"), "10\n11\n").unwrap();
        assert!(cg.oom_killed());
        assert_eq!(
            cg.usage(),
            Usage {
                memory_bytes: 4096,
                cpu_usec: 1500,
                pids: 3
            }
        );
        assert_eq!(cg.pids(), vec![10, 11]);
        assert_eq!(cg.procs_files(), vec![d.join("cgroup.procs")]);
    }

    #[test]
    fn v1_against_a_temp_dir() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "cpu", "cpuacct"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        let h = Hierarchy::detect(root.path(), "cairn").unwrap();
        assert_eq!(h.version, Version::V1);
        let cg = h
            .create(
                "t1",
                &Limits {
                    memory_bytes: Some(1 << 20),
                    pids: Some(7),
                    cpus: Some(2.0),
                },
            )
            .unwrap();
        assert_eq!(
            files(root.path()),
            "cpu/cairn/t1/cpu.cfs_period_us=100000\n\
             cpu/cairn/t1/cpu.cfs_quota_us=200000\n\
             cpu/cairn/t1/cpu.shares=2048\n\
             memory/cairn/t1/memory.limit_in_bytes=1048576\n\
             memory/cairn/t1/memory.memsw.limit_in_bytes=1048576\n\
             pids/cairn/t1/pids.max=7"
        );
        std::fs::write(
            root.path().join("memory/cairn/t1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("cpuacct/cairn/t1/cpuacct.usage"),
            "2000000\n",
        )
        .unwrap();
        assert!(!cg.oom_killed());
        assert_eq!(cg.usage().cpu_usec, 2000);
        assert_eq!(cg.procs_files().len(), 4);
    }

    #[test]
    fn detect_refuses_an_empty_root() {
        let root = tempfile::tempdir().unwrap();
        assert!(Hierarchy::detect(root.path(), "cairn").is_err());
    }
}
