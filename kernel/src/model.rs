//! The domain model the masters replicate: agents, workloads, tasks and cluster variables.
//! Plain data, serializable both as JSON (API) and bincode (Raft log and snapshots), so no
//! serde attribute here may skip or flatten fields.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An inclusive range of TCP ports, `[begin-end]` in the Mesos syntax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub begin: u16,
    pub end: u16,
}

/// Scalar and range resources of one pool (unreserved, or reserved for one role).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: f64,
    /// MiB.
    pub mem: u64,
    /// MiB.
    pub disk: u64,
    pub ports: Vec<PortRange>,
}

/// What an agent offers: an unreserved pool plus pools reserved for roles (`cpus(prod):4`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentResources {
    pub unreserved: Resources,
    pub reserved: BTreeMap<String, Resources>,
}

/// Whether the leader currently hears an agent's heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Active,
    Unreachable,
}

/// A host that runs tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    /// Stable id, kept in the agent's data dir.
    pub id: String,
    pub hostname: String,
    /// `host:port` of the agent's own API.
    pub addr: String,
    pub resources: AgentResources,
    pub attributes: BTreeMap<String, String>,
    pub status: AgentStatus,
    /// Unix milliseconds (leader's clock) of registration and of the last status change.
    pub registered_at: u64,
    pub status_changed_at: u64,
    pub version: String,
}

/// What an agent sends to register (or re-register).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRegistration {
    pub id: String,
    pub hostname: String,
    pub addr: String,
    pub resources: AgentResources,
    pub attributes: BTreeMap<String, String>,
    pub version: String,
}

/// The kinds of workload, after Marathon / Chronos / Nomad.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    Service,
    Job,
    Cron,
    System,
}

/// How a task's code runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RuntimeSpec {
    Native {
        cmd: String,
        #[serde(default)]
        args: Vec<String>,
    },
    Oci {
        image: String,
        #[serde(default)]
        cmd: Vec<String>,
    },
    Wasm {
        file: String,
        #[serde(default)]
        args: Vec<String>,
    },
}

/// Resources one task asks for (cpus, and MiB of memory and sandbox disk).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskResources {
    pub cpus: f64,
    pub mem: u64,
    pub disk: u64,
}

/// A port a workload asks for: `number` 0 takes any free port of the agent's ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortAsk {
    pub name: String,
    pub number: u16,
}

/// Exponential restart backoff: `base_ms * factor^(failures-1)`, at most `max_ms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub base_ms: u64,
    pub factor: f64,
    pub max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            base_ms: 1_000,
            factor: 2.0,
            max_ms: 60_000,
        }
    }
}

/// How a task's health is checked (by its agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// `GET http://HOST:PORT{path}` answers 2xx or 3xx.
    Http,
    /// A TCP connection to PORT opens.
    Tcp,
    /// The command exits 0 (run inside the task: its namespaces, sandbox and environment).
    Command,
}

/// One health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// The task port (by name) for http and tcp checks.
    pub port: String,
    pub path: String,
    pub command: Vec<String>,
    /// No check counts before this much time after the task starts.
    pub grace_ms: u64,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that make the task unhealthy (it is then killed and replaced).
    pub max_failures: u32,
}

/// How a rolling change replaces tasks: at least `min_healthy` × instances stay healthy,
/// at most `max_over` × instances extra run; new tasks not healthy within `deadline_ms` (or
/// failing) roll the workload back to its previous version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpgradePolicy {
    pub min_healthy: f64,
    pub max_over: f64,
    pub deadline_ms: u64,
}

impl Default for UpgradePolicy {
    fn default() -> Self {
        Self {
            min_healthy: 1.0,
            max_over: 1.0,
            deadline_ms: 300_000,
        }
    }
}

/// Where a deployment (the roll-out of one workload version) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    Running,
    Succeeded,
    /// New tasks failed or missed the deadline; the previous version was restored.
    RolledBack,
    /// Failed with no previous version to return to.
    Failed,
    /// A newer change replaced it before it finished.
    Superseded,
}

/// The roll-out of one version of a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// `<workload>@<version>`.
    pub id: String,
    pub workload: String,
    pub version: u64,
    pub from_version: Option<u64>,
    pub state: DeploymentState,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub message: String,
}

/// When a cron workload runs: a 5-field cron expression in a time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub cron: String,
    pub timezone: String,
}

/// A declared workload (desired state), as validated from a spec (`spec::WorkloadSpec`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub id: String,
    pub kind: WorkloadKind,
    pub runtime: RuntimeSpec,
    pub resources: TaskResources,
    pub instances: u32,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<PortAsk>,
    pub constraints: Vec<crate::scheduler::Constraint>,
    /// Resources reserved for this role are used first (`None`: unreserved only).
    pub role: Option<String>,
    pub strategy: crate::scheduler::Strategy,
    pub restart: RestartPolicy,
    /// Jobs: failed runs retried at most this many times.
    pub max_retries: u32,
    pub kill_grace_ms: u64,
    /// Jobs: wall-clock limit of one run.
    pub timeout_ms: Option<u64>,
    /// `host` (default) or `none` (an empty network namespace).
    pub network: String,
    pub schedule: Option<Schedule>,
    pub labels: BTreeMap<String, String>,
    pub health_checks: Vec<HealthCheck>,
    pub upgrade: UpgradePolicy,
    /// Stopped workloads keep their spec but run no tasks.
    pub stopped: bool,
    /// Raft index of the last change (tasks carry the version they were placed with).
    pub version: u64,
    /// Leader clock when the spec last changed.
    pub updated_at: u64,
    /// Sequence number of the next task id (`<workload>.<seq>`).
    pub next_seq: u64,
    /// Cron: the last schedule tick handled (run or skipped).
    pub last_tick: u64,
    /// The spec before the last change, for an automatic rollback.
    pub previous: Option<Box<Workload>>,
}

/// Task states, after Mesos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Staging,
    Starting,
    Running,
    Finished,
    Failed,
    Killing,
    Killed,
    Lost,
    Unreachable,
}

/// Tasks by state (`running`, `failed`, ...), states with none left out: one pass, no
/// allocation per task (it answers while 10^5 tasks churn).
pub fn count_states<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> BTreeMap<String, usize> {
    let mut counts = [0usize; TaskState::ALL.len()];
    for t in tasks {
        counts[t.state as usize] += 1;
    }
    TaskState::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(st, n)| (format!("{st:?}").to_lowercase(), n))
        .collect()
}

impl TaskState {
    pub const ALL: [TaskState; 9] = [
        TaskState::Staging,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Killing,
        TaskState::Killed,
        TaskState::Lost,
        TaskState::Unreachable,
    ];

    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished | TaskState::Failed | TaskState::Killed | TaskState::Lost
        )
    }

    /// The one transition function of the task lifecycle.
    pub fn can_transition(self, to: TaskState) -> bool {
        use TaskState::*;
        if self.is_terminal() || self == to {
            return false;
        }
        match (self, to) {
            (Staging, Starting | Running | Failed | Killing | Killed | Lost | Unreachable) => true,
            (Starting, Running | Finished | Failed | Killing | Killed | Lost | Unreachable) => true,
            (Running, Finished | Failed | Killing | Killed | Lost | Unreachable) => true,
            (Killing, Killed | Finished | Failed | Lost | Unreachable) => true,
            // An unreachable agent came back and reported the task, or it was given up on.
            (Unreachable, Running | Finished | Failed | Killing | Killed | Lost) => true,
            _ => false,
        }
    }
}

/// One running instance of a workload. It carries what its agent needs to run it, as of the
/// workload version it was placed with (a rolling change runs old and new side by side).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub workload: String,
    pub agent: String,
    pub state: TaskState,
    pub reason: Option<String>,
    pub updated_at: u64,
    pub created_at: u64,
    /// The workload version this task runs.
    pub version: u64,
    pub runtime: RuntimeSpec,
    pub resources: TaskResources,
    pub env: BTreeMap<String, String>,
    /// Ports given on the agent, in the order of the workload's `ports`.
    pub ports: Vec<PortAsk>,
    /// The role pool the resources come from (`None`: unreserved).
    pub pool: Option<String>,
    pub kill_grace_ms: u64,
    pub timeout_ms: Option<u64>,
    pub network: String,
    pub health_checks: Vec<HealthCheck>,
    /// What the agent's checks say (`None`: no checks, or none has passed yet).
    pub healthy: Option<bool>,
    /// Persistent volumes mounted into the task (pod tasks of stateful services).
    pub volumes: Vec<TaskVolume>,
    /// Config files rendered by the masters, written by the agent just before start.
    pub files: Vec<TaskFile>,
}

/// A persistent volume as a task mounts it: the agent keeps its data in
/// `<data dir>/volumes/<id>` and bind-mounts (native, OCI) or preopens (Wasm) it at `path`
/// inside the sandbox, killing the task with reason `volume_limit` past `size_mb`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskVolume {
    pub id: String,
    /// Relative to the sandbox, validated (no `..`, not absolute).
    pub path: String,
    pub size_mb: u64,
}

/// A rendered config file; `path` is relative to the sandbox (inside a volume's path, the
/// file lands in that volume).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    pub path: String,
    pub content: String,
}

impl Task {
    /// Counts as ready: running, and healthy if it has health checks.
    pub fn is_ready(&self) -> bool {
        self.state == TaskState::Running
            && (self.health_checks.is_empty() || self.healthy == Some(true))
    }

    /// A new task of `w` (in `staging`) on `agent`, with the given port numbers.
    pub fn of(
        w: &Workload,
        id: String,
        agent: String,
        ports: &[u16],
        pool: Option<String>,
        at: u64,
    ) -> Task {
        Task {
            id,
            workload: w.id.clone(),
            agent,
            state: TaskState::Staging,
            reason: None,
            updated_at: at,
            created_at: at,
            version: w.version,
            runtime: w.runtime.clone(),
            resources: w.resources.clone(),
            env: w.env.clone(),
            ports: w
                .ports
                .iter()
                .zip(ports)
                .map(|(p, &n)| PortAsk {
                    name: p.name.clone(),
                    number: n,
                })
                .collect(),
            pool,
            kill_grace_ms: w.kill_grace_ms,
            timeout_ms: w.timeout_ms,
            network: w.network.clone(),
            health_checks: w.health_checks.clone(),
            healthy: None,
            volumes: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Whether the task holds resources and counts toward its workload's instances.
    pub fn is_live(&self) -> bool {
        !self.state.is_terminal()
    }
}

/// A cluster variable (a small replicated key/value, like Nomad variables).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    pub create_index: u64,
    pub modify_index: u64,
}
