//! The replicated model of stateful services: the validated spec (`StatefulService`), pod
//! instances with stable identity, volume reservations, and each service's state (versions,
//! pods, plans). Plain data like `crate::model`: JSON for the API, bincode for Raft, so no
//! serde attribute here skips or flattens a field.

use super::plan::{Plan, PlanKind};
use crate::model::{HealthCheck, PortAsk, RuntimeSpec, TaskResources};
use crate::scheduler::Constraint;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A stateful service as validated from a `service::spec::ServiceSpec`: pod types whose
/// instances keep their index, agent and volumes for life, and the service's own plans.
/// (Not a `kind = "service"` workload: those are interchangeable long-running tasks.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatefulService {
    pub name: String,
    pub pod_types: Vec<PodType>,
    /// Plans the service declares besides the built-in `deploy`, `recovery`, `decommission`.
    pub plans: Vec<PlanDef>,
    /// The service's options (a JSON object, as text so bincode can carry it): what config
    /// templates see as `options`, and what a package was installed with.
    pub options: String,
    /// The package this spec was rendered from (`None` for a spec written by hand); the
    /// package's options (defaults filled) are `options`.
    pub package: Option<PackageRef>,
    /// Named endpoints: name → pod id (`primary.<service>.cairn.`).
    #[serde(default)]
    pub endpoints: std::collections::BTreeMap<String, String>,
    /// Moves an endpoint to another pod when its pod is down (`[failover]`).
    #[serde(default)]
    pub failover: Option<Failover>,
}

/// Automatic failover of a named endpoint: when the pod it names has its agent unreachable,
/// or has been failing in a recovery step, for `after_ms`, the endpoint moves to the
/// lowest-index ready pod of the same type and a `failover` plan relaunches `tasks` there
/// first (the pod takes the role: its start script reads `endpoints`), then in every other
/// pod of the type (they follow the new one). A switchover is the same, asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub endpoint: String,
    pub after_ms: u64,
    pub tasks: Vec<String>,
}

impl StatefulService {
    /// The options as JSON (an empty object if none were given).
    pub fn options_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.options).unwrap_or_else(|_| serde_json::json!({}))
    }
}

/// Which package rendered a service's spec (`/api/v1/packages/installed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub version: String,
    /// `builtin` or the repo it came from.
    pub source: String,
}

impl StatefulService {
    pub fn pod_type(&self, name: &str) -> Option<&PodType> {
        self.pod_types.iter().find(|p| p.name == name)
    }
}

/// One kind of pod: `count` instances `<name>-0`, `<name>-1`, ...
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodType {
    pub name: String,
    pub count: u32,
    /// Checked per pod instance when it is placed (or replaced).
    pub constraints: Vec<Constraint>,
    pub role: Option<String>,
    pub volumes: Vec<VolumeSpec>,
    pub tasks: Vec<PodTask>,
    /// Replace a pod whose agent has been unreachable this long (`None`: never by itself).
    pub replace_after_ms: Option<u64>,
    /// How the `deploy` plan rolls this pod type (default: one pod at a time).
    pub deploy: PhaseStrategy,
    /// A deploy step not complete this long after it started ends in `error`.
    pub deadline_ms: u64,
}

impl PodType {
    pub fn task(&self, name: &str) -> Option<&PodTask> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// A persistent volume of each pod instance, mounted at `path` (relative to the task's
/// sandbox) and kept outside the sandbox by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub name: String,
    pub path: String,
    pub size_mb: u64,
}

/// When a pod task should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskGoal {
    /// Keep running (restarted in place by `recovery` when it ends).
    Running,
    /// Run to success once per deploy or update of its pod.
    Finish,
    /// Run to success once in the pod instance's life (e.g. initialise the data directory).
    Once,
    /// Run to success when a declared plan names it (a backup), never by `deploy`.
    OnDemand,
}

/// A config file rendered (minijinja) into the sandbox or a volume just before the task starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigTemplate {
    /// Relative to the sandbox.
    pub path: String,
    pub template: String,
}

/// One task of a pod type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodTask {
    pub name: String,
    pub goal: TaskGoal,
    pub runtime: RuntimeSpec,
    pub resources: TaskResources,
    pub ports: Vec<PortAsk>,
    pub env: BTreeMap<String, String>,
    /// Failing health checks get the task killed (and `recovery` restarts it in place).
    pub health_checks: Vec<HealthCheck>,
    /// Gates plan progress; never kills.
    pub readiness_check: Option<HealthCheck>,
    pub templates: Vec<ConfigTemplate>,
    pub kill_grace_ms: u64,
}

/// How the steps of a phase run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseStrategy {
    /// One step at a time, in order.
    Serial,
    /// Every step at once.
    Parallel,
    /// The first `n` steps one at a time, then wait for an explicit `continue`, then serial.
    Canary(u32),
}

/// A plan a service declares (`backup`, `restore`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanDef {
    pub name: String,
    pub phases: Vec<PhaseDef>,
}

/// A phase of a declared plan: one step per instance of `pod_type`, each running `tasks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseDef {
    pub name: String,
    pub pod_type: String,
    pub strategy: PhaseStrategy,
    pub tasks: Vec<String>,
    pub deadline_ms: u64,
}

/// Where a pod task should be: the spec version it runs and its launch generation. A change
/// of either means "launch it afresh" (restart in place, on the same agent, same volumes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTarget {
    pub goal: TaskGoal,
    /// The service version (`ServiceState::version` when it was launched).
    pub version: u64,
    /// Bumped at each launch of this task in this pod instance.
    pub generation: u64,
    pub launched_at: u64,
    /// The parameters of the plan run that launched it (`CAIRN_PARAM_<KEY>` in its env).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// One instance of a pod type, `<type>-<index>`. It keeps its index, agent and volumes for
/// life; only a replace (a new `incarnation`) gives it a new agent and fresh volumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodInstance {
    /// `<type>-<index>`.
    pub id: String,
    pub pod_type: String,
    pub index: u32,
    /// Counts replacements; part of the volume ids so fresh volumes never reuse old ids.
    pub incarnation: u32,
    /// `None` until placed (or again after a replace, until placed anew).
    pub agent: Option<String>,
    /// Ids of its volume reservations (in `ServiceState::volumes`), in the spec's order.
    pub volumes: Vec<String>,
    /// Launched tasks by name. A task not here has never been launched in this incarnation.
    pub tasks: BTreeMap<String, TaskTarget>,
    /// Next launch generation.
    pub next_generation: u64,
    /// Set by `decommission`: its tasks are stopped and must not be relaunched.
    pub stopping: bool,
    pub created_at: u64,
    pub placed_at: Option<u64>,
}

impl PodInstance {
    pub fn id_of(pod_type: &str, index: u32) -> String {
        format!("{pod_type}-{index}")
    }
}

/// Where a reserved volume stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeStatus {
    /// Reserved on its agent for its pod instance.
    Reserved,
    /// Its pod was decommissioned, replaced or removed: the agent deletes the data and
    /// reports it (an unreachable agent does so when it returns).
    Destroying,
    /// Kept by `remove --keep-volumes`: no pod owns it; deletable later.
    Orphaned,
}

/// A persistent volume reserved on an agent (counted against its disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReservation {
    /// `<service>.<pod>.<volume>.<incarnation>`.
    pub id: String,
    pub service: String,
    pub pod: String,
    /// The volume's name in the spec.
    pub name: String,
    pub agent: String,
    pub size_mb: u64,
    pub path: String,
    pub status: VolumeStatus,
    pub created_at: u64,
}

impl VolumeReservation {
    pub fn id_of(service: &str, pod: &str, volume: &str, incarnation: u32) -> String {
        format!("{service}.{pod}.{volume}.{incarnation}")
    }
}

/// A version of a service's spec (the history `cairn service history` shows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceVersion {
    pub version: u64,
    pub at: u64,
    pub spec: StatefulService,
}

/// How many spec versions a service keeps.
pub const HISTORY_KEPT: usize = 20;

/// The replicated state of one stateful service: its spec, pods, volumes and plans.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub spec: StatefulService,
    /// Raft index of the last spec change.
    pub version: u64,
    /// Per pod type, the version at which its definition last changed (so a change to one
    /// pod type does not restart the others).
    pub type_versions: BTreeMap<String, u64>,
    pub created_at: u64,
    pub updated_at: u64,
    /// Pod instances by id.
    pub pods: BTreeMap<String, PodInstance>,
    /// Volume reservations by id.
    pub volumes: BTreeMap<String, VolumeReservation>,
    /// The newest plan of each name (`deploy`, `recovery`, `decommission`, declared ones).
    pub plans: BTreeMap<String, Plan>,
    /// Previous specs, oldest first (at most `HISTORY_KEPT`, the current one last).
    pub history: Vec<ServiceVersion>,
}

impl ServiceState {
    /// The plan of `kind` running now, if any.
    pub fn plan_of(&self, kind: PlanKind) -> Option<&Plan> {
        self.plans.values().find(|p| p.kind == kind)
    }
}
