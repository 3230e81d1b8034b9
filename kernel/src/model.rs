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
#[serde(rename_all = "snake_case")]
pub enum RuntimeSpec {
    Native { cmd: String, args: Vec<String> },
    Oci { image: String, cmd: Vec<String> },
    Wasm { file: String, args: Vec<String> },
}

/// Resources one task asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskResources {
    pub cpus: f64,
    pub mem: u64,
    pub disk: u64,
}

/// A declared workload (desired state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub id: String,
    pub kind: WorkloadKind,
    pub runtime: RuntimeSpec,
    pub resources: TaskResources,
    pub instances: u32,
    pub env: BTreeMap<String, String>,
    /// Raft index of the last change.
    pub version: u64,
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

/// One running instance of a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub workload: String,
    pub agent: String,
    pub state: TaskState,
    pub reason: Option<String>,
    pub updated_at: u64,
}

/// A cluster variable (a small replicated key/value, like Nomad variables).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    pub create_index: u64,
    pub modify_index: u64,
}
