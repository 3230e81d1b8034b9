//! The replicated state machine: one `Command` enum, one pure `apply` function, and the
//! `Machine` adapter that lets `cairn-raft` drive it with opaque bytes.
//!
//! `apply` does no IO and reads no clock: times arrive inside commands (the proposer's clock).

use crate::model::{Agent, AgentRegistration, AgentStatus, KvEntry, Task, TaskState, Workload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Raft index of the last change to each table, for blocking queries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Indexes {
    pub agents: u64,
    pub workloads: u64,
    pub tasks: u64,
    pub kv: u64,
    /// Stateful services (`/api/v1/services`), their pods, plans and volumes.
    pub services: u64,
}

/// The whole replicated cluster state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub agents: BTreeMap<String, Agent>,
    pub workloads: BTreeMap<String, Workload>,
    pub tasks: BTreeMap<String, Task>,
    pub kv: BTreeMap<String, KvEntry>,
    pub indexes: Indexes,
    /// Index of the last applied command.
    pub applied: u64,
    /// Tasks by the agent they are placed on.
    pub tasks_by_agent: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The last index that changed each agent's assignments (its long-poll waits on this).
    pub assignment_index: BTreeMap<String, u64>,
    /// Roll-outs by id (`<workload>@<version>`); the newest `DEPLOYMENTS_KEPT` are kept.
    pub deployments: BTreeMap<String, crate::model::Deployment>,
    /// The most recent changes, oldest first (at most `EVENTS_KEPT`), for `/api/v1/events`.
    pub events: std::collections::VecDeque<Event>,
    /// Stateful services by name (not `kind = "service"` workloads: see `crate::service`).
    pub services: BTreeMap<String, crate::service::ServiceState>,
    /// Volumes of removed services: orphaned (kept) or being destroyed by their agents.
    pub detached_volumes: BTreeMap<String, crate::service::VolumeReservation>,
    /// Join tokens by id (`crate::join`).
    pub join_tokens: BTreeMap<String, crate::join::JoinTokenRecord>,
    /// Agents whose assignments the last `apply` changed (scratch, not replicated state:
    /// `Machine` drains it to wake exactly those agents' long-polls).
    #[serde(skip)]
    pub touched_agents: Touched,
}

/// Scratch list of agents an `apply` changed; never part of state equality or snapshots.
#[derive(Clone, Debug, Default)]
pub struct Touched(pub Vec<String>);

impl PartialEq for Touched {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// One task's report in `Command::UpdateTaskStates`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskUpdate {
    pub id: String,
    pub state: TaskState,
    pub reason: Option<String>,
    pub healthy: Option<bool>,
}

/// How many deployments the state keeps.
pub const DEPLOYMENTS_KEPT: usize = 1_000;

/// How many events the state keeps for subscribers that reconnect.
pub const EVENTS_KEPT: usize = 10_000;

/// One change to cluster state, as `/api/v1/events` streams it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    /// `task`, `workload`, `agent` or `kv`.
    pub topic: String,
    pub id: String,
    /// What happened: a task state, `registered`, `updated`, `scaled`, ...
    pub kind: String,
    pub detail: String,
    /// Proposer's clock (Unix ms), when the command carries one.
    pub at: u64,
}

/// Every change to cluster state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add an agent, or refresh a known one (re-registration after restart); marks it active.
    RegisterAgent {
        reg: AgentRegistration,
        at: u64,
    },
    /// The leader's liveness monitor saw heartbeats stop or resume.
    SetAgentStatus {
        id: String,
        status: AgentStatus,
        at: u64,
    },
    /// Declare or change a workload. An unchanged spec changes nothing (no new version).
    PutWorkload {
        workload: Workload,
        at: u64,
    },
    RemoveWorkload {
        id: String,
    },
    /// Change the instance count (no new version: running tasks stay).
    ScaleWorkload {
        id: String,
        instances: u32,
        at: u64,
    },
    /// Stop (its tasks are killed) or start a workload again.
    SetWorkloadStopped {
        id: String,
        stopped: bool,
        at: u64,
    },
    /// Replace every task with a new version of the same spec (a rolling restart).
    RestartWorkload {
        id: String,
        at: u64,
    },
    /// The current version's roll-out failed: return to the previous spec.
    RollbackWorkload {
        id: String,
        version: u64,
        reason: String,
        at: u64,
    },
    /// A roll-out ended (succeeded, or failed without a previous version).
    FinishDeployment {
        id: String,
        state: crate::model::DeploymentState,
        message: String,
        at: u64,
    },
    /// An agent's batch of task reports: states (when the transition is allowed) and health.
    /// Tasks of other agents are ignored.
    UpdateTaskStates {
        agent: String,
        reports: Vec<TaskUpdate>,
        at: u64,
    },
    /// A cron tick passed while the previous run was still going: it is skipped.
    SkipCronTick {
        id: String,
        tick: u64,
    },
    /// A plan from the scheduler: new tasks `<workload>.<seq>`, `<workload>.<seq+1>`, ... in
    /// `staging`. Re-checked here against the current state (the plan may have been computed
    /// on an older one): a stale plan is rejected whole and the controller plans again.
    PlaceTasks {
        workload: String,
        version: u64,
        seq: u64,
        placements: Vec<crate::scheduler::Placement>,
        at: u64,
    },
    /// A placement: a new task in `staging`.
    AddTask {
        task: Task,
    },
    UpdateTaskState {
        id: String,
        state: TaskState,
        reason: Option<String>,
        at: u64,
    },
    /// Set a cluster variable; with `cas`, only if its modify index equals `cas` (0: absent).
    KvPut {
        key: String,
        value: String,
        cas: Option<u64>,
    },
    KvDelete {
        key: String,
    },
    /// Declare a stateful service (validated by `service::spec`): its pods and `deploy` plan.
    CreateService {
        service: crate::service::StatefulService,
        at: u64,
    },
    /// Change a stateful service's spec; refused if it would lose data
    /// (`service::update::check_update`). An unchanged spec changes nothing.
    UpdateService {
        service: crate::service::StatefulService,
        allow_decommission: bool,
        at: u64,
    },
    /// Remove a stateful service; its volumes are destroyed, or kept as orphaned.
    RemoveService {
        name: String,
        keep_volumes: bool,
        at: u64,
    },
    /// A step of the plan engine or an operator's operation on a stateful service (place a
    /// pod, move a step, launch tasks, recover a pod, interrupt/continue/force-complete/restart).
    ServiceOp {
        service: String,
        op: crate::service::ServiceOp,
        at: u64,
    },
    /// An agent deleted the data of these volumes.
    VolumesDestroyed {
        agent: String,
        ids: Vec<String>,
        at: u64,
    },
    /// Delete an orphaned volume (kept by `remove --keep-volumes`): its agent deletes the data.
    DestroyVolume {
        id: String,
        at: u64,
    },
    /// Forget ended tasks (`gc`); a task that is live again is kept.
    RemoveTasks {
        ids: Vec<String>,
        at: u64,
    },
    /// A join token was made (`crate::join`).
    PutJoinToken {
        token: crate::join::JoinTokenRecord,
    },
    RevokeJoinToken {
        id: String,
        at: u64,
    },
    /// A node joined with a token; refused if the token is revoked, expired or used up.
    SpendJoinToken {
        id: String,
        node: String,
        at: u64,
    },
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Done {
        index: u64,
    },
    Agent(Agent),
    Kv(KvEntry),
    /// The command was valid to log but not applicable to the current state.
    Rejected {
        code: String,
        field: String,
        message: String,
    },
}

fn rejected(code: &str, field: &str, message: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        code: code.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// Applies one committed command at `index` and records what changed as events. The only
/// writer of `State`.
pub fn apply(state: &mut State, index: u64, cmd: Command) -> Outcome {
    let before = match &cmd {
        Command::UpdateTaskState { id, .. } => state.tasks.get(id).map(|t| t.state),
        _ => None,
    };
    if let Command::UpdateTaskStates { agent, reports, at } = &cmd {
        let before: Vec<Option<(TaskState, Option<bool>)>> = reports
            .iter()
            .map(|r| state.tasks.get(&r.id).map(|t| (t.state, t.healthy)))
            .collect();
        let (agent, reports, at) = (agent.clone(), reports.clone(), *at);
        let outcome = apply_command(state, index, cmd);
        for (r, b) in reports.iter().zip(before) {
            let Some((was, was_healthy)) = b else {
                continue;
            };
            let Some(t) = state.tasks.get(&r.id) else {
                continue;
            };
            if t.agent != agent {
                continue;
            }
            let mut push = |kind: String, detail: String| {
                state.events.push_back(Event {
                    index,
                    topic: "task".into(),
                    id: r.id.clone(),
                    kind,
                    detail,
                    at,
                })
            };
            if t.state != was {
                push(
                    format!("{:?}", t.state).to_lowercase(),
                    t.reason.clone().unwrap_or_default(),
                );
            }
            if t.healthy != was_healthy {
                push(
                    match t.healthy {
                        Some(true) => "healthy",
                        Some(false) => "unhealthy",
                        None => "health_unknown",
                    }
                    .into(),
                    String::new(),
                );
            }
        }
        while state.events.len() > EVENTS_KEPT {
            state.events.pop_front();
        }
        return outcome;
    }
    let described = describe(&cmd);
    let outcome = apply_command(state, index, cmd);
    if matches!(outcome, Outcome::Rejected { .. }) {
        return outcome;
    }
    let mut push = |topic: &str, id: String, kind: String, detail: String, at: u64| {
        state.events.push_back(Event {
            index,
            topic: topic.into(),
            id,
            kind,
            detail,
            at,
        });
    };
    match described {
        Described::Task {
            id,
            state: to,
            detail,
            at,
        } => {
            if before != Some(to) {
                push("task", id, format!("{to:?}").to_lowercase(), detail, at);
            }
        }
        Described::Placed {
            workload,
            seq,
            agents,
            at,
        } => {
            for (i, a) in agents.into_iter().enumerate() {
                push(
                    "task",
                    format!("{workload}.{}", seq + i as u64),
                    "staging".into(),
                    format!("on agent {a}"),
                    at,
                );
            }
        }
        Described::Other {
            topic,
            id,
            kind,
            detail,
            at,
        } => {
            // An unchanged spec keeps its version and is no event.
            let unchanged =
                kind == "updated" && !matches!(outcome, Outcome::Done { index: i } if i == index);
            if !unchanged {
                push(topic, id, kind, detail, at);
            }
        }
    }
    while state.events.len() > EVENTS_KEPT {
        state.events.pop_front();
    }
    outcome
}

enum Described {
    Task {
        id: String,
        state: TaskState,
        detail: String,
        at: u64,
    },
    Placed {
        workload: String,
        seq: u64,
        agents: Vec<String>,
        at: u64,
    },
    Other {
        topic: &'static str,
        id: String,
        kind: String,
        detail: String,
        at: u64,
    },
}

fn describe(cmd: &Command) -> Described {
    let other = |topic, id: &str, kind: &str, detail: String, at| Described::Other {
        topic,
        id: id.to_string(),
        kind: kind.to_string(),
        detail,
        at,
    };
    match cmd {
        Command::RegisterAgent { reg, at } => {
            other("agent", &reg.id, "registered", reg.addr.clone(), *at)
        }
        Command::SetAgentStatus { id, status, at } => other(
            "agent",
            id,
            &format!("{status:?}").to_lowercase(),
            String::new(),
            *at,
        ),
        Command::PutWorkload { workload, at } => other(
            "workload",
            &workload.id,
            "updated",
            format!("{:?}, {} instances", workload.kind, workload.instances).to_lowercase(),
            *at,
        ),
        Command::RemoveWorkload { id } => other("workload", id, "removed", String::new(), 0),
        Command::ScaleWorkload { id, instances, at } => other(
            "workload",
            id,
            "scaled",
            format!("{instances} instances"),
            *at,
        ),
        Command::SetWorkloadStopped { id, stopped, at } => other(
            "workload",
            id,
            if *stopped { "stopped" } else { "started" },
            String::new(),
            *at,
        ),
        Command::RestartWorkload { id, at } => {
            other("workload", id, "restarted", String::new(), *at)
        }
        Command::RollbackWorkload {
            id,
            version,
            reason,
            at,
        } => other(
            "workload",
            id,
            "rolled_back",
            format!("version {version}: {reason}"),
            *at,
        ),
        Command::FinishDeployment {
            id,
            state,
            message,
            at,
        } => other(
            "deployment",
            id,
            &format!("{state:?}").to_lowercase(),
            message.clone(),
            *at,
        ),
        // Never reached: `apply` records a batch's per-task events itself, before `describe`.
        Command::UpdateTaskStates { agent, .. } => {
            other("agent", agent, "reported", String::new(), 0)
        }
        Command::SkipCronTick { id, tick } => other(
            "workload",
            id,
            "cron_tick_skipped",
            "the previous run is still going".into(),
            *tick,
        ),
        Command::PlaceTasks {
            workload,
            seq,
            placements,
            at,
            ..
        } => Described::Placed {
            workload: workload.clone(),
            seq: *seq,
            agents: placements.iter().map(|p| p.agent.clone()).collect(),
            at: *at,
        },
        Command::AddTask { task } => other(
            "task",
            &task.id,
            "staging",
            format!("on agent {}", task.agent),
            task.created_at,
        ),
        Command::UpdateTaskState {
            id,
            state,
            reason,
            at,
        } => Described::Task {
            id: id.clone(),
            state: *state,
            detail: reason.clone().unwrap_or_default(),
            at: *at,
        },
        Command::KvPut { key, .. } => other("kv", key, "put", String::new(), 0),
        Command::KvDelete { key } => other("kv", key, "deleted", String::new(), 0),
        Command::CreateService { service, at } => other(
            "service",
            &service.name,
            "created",
            crate::service::ops::summary(service),
            *at,
        ),
        Command::UpdateService { service, at, .. } => other(
            "service",
            &service.name,
            "updated",
            crate::service::ops::summary(service),
            *at,
        ),
        Command::RemoveService {
            name,
            keep_volumes,
            at,
        } => other(
            "service",
            name,
            "removed",
            if *keep_volumes {
                "volumes kept".into()
            } else {
                String::new()
            },
            *at,
        ),
        Command::ServiceOp { service, op, at } => {
            let (kind, detail) = crate::service::ops::describe(op);
            other("service", service, kind, detail, *at)
        }
        Command::VolumesDestroyed { agent, ids, at } => {
            other("agent", agent, "volumes_destroyed", ids.join(", "), *at)
        }
        Command::DestroyVolume { id, at } => other("volume", id, "destroy", String::new(), *at),
        Command::PutJoinToken { token } => other(
            "join-token",
            &token.id,
            "created",
            token.description.clone(),
            token.created,
        ),
        Command::RevokeJoinToken { id, at } => {
            other("join-token", id, "revoked", String::new(), *at)
        }
        Command::SpendJoinToken { id, node, at } => {
            other("join-token", id, "joined", node.clone(), *at)
        }
        Command::RemoveTasks { ids, at } => other(
            "task",
            "",
            "collected",
            format!("{} ended tasks forgotten", ids.len()),
            *at,
        ),
    }
}

fn apply_command(state: &mut State, index: u64, cmd: Command) -> Outcome {
    state.applied = index;
    match cmd {
        Command::RegisterAgent { reg, at } => {
            let agent = match state.agents.get(&reg.id) {
                Some(old) => Agent {
                    hostname: reg.hostname,
                    addr: reg.addr,
                    resources: reg.resources,
                    attributes: reg.attributes,
                    version: reg.version,
                    status: AgentStatus::Active,
                    status_changed_at: if old.status == AgentStatus::Active {
                        old.status_changed_at
                    } else {
                        at
                    },
                    ..old.clone()
                },
                None => Agent {
                    id: reg.id,
                    hostname: reg.hostname,
                    addr: reg.addr,
                    resources: reg.resources,
                    attributes: reg.attributes,
                    status: AgentStatus::Active,
                    registered_at: at,
                    status_changed_at: at,
                    version: reg.version,
                },
            };
            state.agents.insert(agent.id.clone(), agent.clone());
            state.indexes.agents = index;
            Outcome::Agent(agent)
        }
        Command::SetAgentStatus { id, status, at } => match state.agents.get_mut(&id) {
            None => rejected("not_found", "id", format!("no agent {id:?}")),
            Some(a) => {
                if a.status != status {
                    a.status = status;
                    a.status_changed_at = at;
                    state.indexes.agents = index;
                }
                Outcome::Agent(a.clone())
            }
        },
        Command::PutWorkload { mut workload, at } => {
            let mut from = None;
            if let Some(old) = state.workloads.get(&workload.id) {
                let mut same = workload.clone();
                same.version = old.version;
                same.updated_at = old.updated_at;
                same.next_seq = old.next_seq;
                same.stopped = old.stopped;
                same.last_tick = old.last_tick;
                same.previous = old.previous.clone();
                if same == *old && !old.stopped {
                    return Outcome::Done { index: old.version };
                }
                workload.next_seq = old.next_seq;
                workload.last_tick = old.last_tick;
                let mut prev = old.clone();
                prev.previous = None;
                from = Some(old.version);
                workload.previous = Some(Box::new(prev));
            }
            workload.version = index;
            workload.updated_at = at;
            workload.stopped = false;
            start_deployment(state, &workload, from, at, String::new());
            state.workloads.insert(workload.id.clone(), workload);
            state.indexes.workloads = index;
            Outcome::Done { index }
        }
        Command::RestartWorkload { id, at } => match state.workloads.get(&id).cloned() {
            None => rejected("not_found", "id", format!("no workload {id:?}")),
            Some(mut w) => {
                let from = w.version;
                let mut prev = w.clone();
                prev.previous = None;
                w.previous = Some(Box::new(prev));
                w.version = index;
                w.updated_at = at;
                w.stopped = false;
                start_deployment(state, &w, Some(from), at, "restart".into());
                state.workloads.insert(id, w);
                state.indexes.workloads = index;
                Outcome::Done { index }
            }
        },
        Command::RollbackWorkload {
            id,
            version,
            reason,
            at,
        } => match state.workloads.get(&id).cloned() {
            None => rejected("not_found", "id", format!("no workload {id:?}")),
            Some(w) if w.version != version || w.previous.is_none() => rejected(
                "stale",
                "version",
                format!("workload {id:?} is not at version {version} with a previous one"),
            ),
            Some(w) => {
                let mut back = *w.previous.clone().expect("checked");
                back.version = index;
                back.updated_at = at;
                back.next_seq = w.next_seq;
                back.last_tick = w.last_tick;
                back.stopped = false;
                back.previous = None;
                finish_deployment(
                    state,
                    &format!("{id}@{version}"),
                    crate::model::DeploymentState::RolledBack,
                    reason.clone(),
                    at,
                );
                start_deployment(
                    state,
                    &back,
                    Some(version),
                    at,
                    format!("rollback of version {version}: {reason}"),
                );
                state.workloads.insert(id, back);
                state.indexes.workloads = index;
                Outcome::Done { index }
            }
        },
        Command::FinishDeployment {
            id,
            state: to,
            message,
            at,
        } => match state.deployments.get(&id) {
            Some(d) if d.state == crate::model::DeploymentState::Running => {
                finish_deployment(state, &id, to, message, at);
                state.indexes.workloads = index;
                Outcome::Done { index }
            }
            Some(_) => rejected("stale", "id", format!("deployment {id:?} already ended")),
            None => rejected("not_found", "id", format!("no deployment {id:?}")),
        },
        Command::ScaleWorkload { id, instances, at } => match state.workloads.get_mut(&id) {
            None => rejected("not_found", "id", format!("no workload {id:?}")),
            Some(w) if w.kind == crate::model::WorkloadKind::System => rejected(
                "invalid",
                "instances",
                "system workloads run one task per agent and cannot be scaled",
            ),
            Some(w) => {
                w.instances = instances;
                w.updated_at = at;
                state.indexes.workloads = index;
                Outcome::Done { index }
            }
        },
        Command::SetWorkloadStopped { id, stopped, at } => match state.workloads.get_mut(&id) {
            None => rejected("not_found", "id", format!("no workload {id:?}")),
            Some(w) => {
                w.stopped = stopped;
                w.updated_at = at;
                state.indexes.workloads = index;
                Outcome::Done { index }
            }
        },
        Command::UpdateTaskStates { agent, reports, at } => {
            let mut changed = false;
            for r in reports {
                let Some(t) = state.tasks.get_mut(&r.id) else {
                    continue;
                };
                if t.agent != agent {
                    continue;
                }
                if t.healthy != r.healthy && !t.state.is_terminal() {
                    t.healthy = r.healthy;
                    t.updated_at = at;
                    changed = true;
                }
                if t.state != r.state && t.state.can_transition(r.state) {
                    t.state = r.state;
                    t.reason = r.reason.map(|s| s.chars().take(256).collect());
                    t.updated_at = at;
                    changed = true;
                }
            }
            if changed {
                state.indexes.tasks = index;
                state.touched_agents.0.push(agent.clone());
                state.assignment_index.insert(agent, index);
            }
            Outcome::Done { index }
        }
        Command::SkipCronTick { id, tick } => match state.workloads.get_mut(&id) {
            None => rejected("not_found", "id", format!("no workload {id:?}")),
            Some(w) => {
                w.last_tick = w.last_tick.max(tick);
                Outcome::Done { index }
            }
        },
        Command::PlaceTasks {
            workload,
            version,
            seq,
            placements,
            at,
        } => {
            let Some(w) = state.workloads.get(&workload) else {
                return rejected("not_found", "workload", format!("no workload {workload:?}"));
            };
            if w.version != version || w.next_seq != seq || w.stopped {
                return rejected(
                    "stale_plan",
                    "version",
                    format!("workload {workload:?} changed since the plan was made"),
                );
            }
            let snap = crate::scheduler::Snapshot::from_state(state);
            let ask = crate::scheduler::ask_for(w);
            if let Err(k) = crate::scheduler::check_plan(&snap, &ask, &placements) {
                return rejected(
                    "stale_plan",
                    "placements",
                    format!("placement {k} no longer fits"),
                );
            }
            let w = w.clone();
            let n = placements.len() as u64;
            for (i, p) in placements.into_iter().enumerate() {
                let id = format!("{}.{}", w.id, seq + i as u64);
                state
                    .tasks_by_agent
                    .entry(p.agent.clone())
                    .or_default()
                    .insert(id.clone());
                state.touched_agents.0.push(p.agent.clone());
                state.assignment_index.insert(p.agent.clone(), index);
                let t = Task::of(&w, id.clone(), p.agent, &p.ports, p.pool, at);
                state.tasks.insert(id, t);
            }
            if let Some(w) = state.workloads.get_mut(&workload) {
                w.next_seq = seq + n;
            }
            state.indexes.tasks = index;
            state.indexes.workloads = index;
            Outcome::Done { index }
        }
        Command::RemoveWorkload { id } => {
            if state.workloads.remove(&id).is_none() {
                return rejected("not_found", "id", format!("no workload {id:?}"));
            }
            state.indexes.workloads = index;
            Outcome::Done { index }
        }
        Command::AddTask { task } => {
            if state.tasks.contains_key(&task.id) {
                return rejected("conflict", "task.id", format!("task {:?} exists", task.id));
            }
            if !state.workloads.contains_key(&task.workload) {
                return rejected(
                    "not_found",
                    "task.workload",
                    format!("no workload {:?}", task.workload),
                );
            }
            if !state.agents.contains_key(&task.agent) {
                return rejected(
                    "not_found",
                    "task.agent",
                    format!("no agent {:?}", task.agent),
                );
            }
            state
                .tasks_by_agent
                .entry(task.agent.clone())
                .or_default()
                .insert(task.id.clone());
            state.touched_agents.0.push(task.agent.clone());
            state.assignment_index.insert(task.agent.clone(), index);
            state.tasks.insert(task.id.clone(), task);
            state.indexes.tasks = index;
            Outcome::Done { index }
        }
        Command::UpdateTaskState {
            id,
            state: to,
            reason,
            at,
        } => match state.tasks.get_mut(&id) {
            None => rejected("not_found", "id", format!("no task {id:?}")),
            Some(t) if t.state == to => Outcome::Done { index },
            Some(t) if !t.state.can_transition(to) => rejected(
                "invalid_transition",
                "state",
                format!("task {id:?} cannot go from {:?} to {:?}", t.state, to),
            ),
            Some(t) => {
                t.state = to;
                t.reason = reason;
                t.updated_at = at;
                state.indexes.tasks = index;
                state.touched_agents.0.push(t.agent.clone());
                state.assignment_index.insert(t.agent.clone(), index);
                Outcome::Done { index }
            }
        },
        Command::KvPut { key, value, cas } => {
            let current = state.kv.get(&key).map(|e| e.modify_index).unwrap_or(0);
            if let Some(expected) = cas {
                if expected != current {
                    return rejected(
                        "cas_failed",
                        "cas",
                        format!("key {key:?} is at modify index {current}, not {expected}"),
                    );
                }
            }
            let create_index = state.kv.get(&key).map(|e| e.create_index).unwrap_or(index);
            let e = KvEntry {
                key: key.clone(),
                value,
                create_index,
                modify_index: index,
            };
            state.kv.insert(key, e.clone());
            state.indexes.kv = index;
            Outcome::Kv(e)
        }
        Command::KvDelete { key } => {
            if state.kv.remove(&key).is_some() {
                state.indexes.kv = index;
            }
            Outcome::Done { index }
        }
        Command::CreateService { service, at } => {
            crate::service::commands::create(state, index, service, at)
        }
        Command::UpdateService {
            service,
            allow_decommission,
            at,
        } => crate::service::commands::update(state, index, service, allow_decommission, at),
        Command::RemoveService {
            name, keep_volumes, ..
        } => crate::service::commands::remove(state, index, &name, keep_volumes),
        Command::ServiceOp { service, op, at } => {
            crate::service::commands::op(state, index, &service, op, at)
        }
        Command::VolumesDestroyed { agent, ids, .. } => {
            crate::service::commands::volumes_destroyed(state, index, &agent, ids)
        }
        Command::DestroyVolume { id, .. } => {
            crate::service::commands::destroy_orphan(state, index, &id)
        }
        Command::PutJoinToken { token } => crate::join::put(state, index, token),
        Command::RevokeJoinToken { id, .. } => crate::join::revoke(state, index, &id),
        Command::SpendJoinToken { id, node, at } => {
            crate::join::spend(state, index, &id, &node, at)
        }
        Command::RemoveTasks { ids, .. } => {
            for id in ids {
                if state.tasks.get(&id).is_some_and(|t| !t.is_live()) {
                    if let Some(t) = state.tasks.remove(&id) {
                        if let Some(set) = state.tasks_by_agent.get_mut(&t.agent) {
                            set.remove(&id);
                        }
                    }
                }
            }
            state.indexes.tasks = index;
            Outcome::Done { index }
        }
    }
}

/// Adapts `State` + `apply` to `cairn_raft::App` (bincode in, bincode out).
#[derive(Default)]
pub struct Machine {
    pub state: State,
    /// Wakes the long-polls of agents whose assignments changed.
    pub wakers: AgentWakers,
}

/// One watch per agent that has long-polled, carrying the index of its last assignment
/// change: a long-poll wakes only for its own agent, so a change costs O(agents it touched),
/// never O(all long-polls).
#[derive(Clone, Default)]
pub struct AgentWakers(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
    >,
);

impl AgentWakers {
    /// A receiver that changes when `agent`'s assignments do (subscribe before reading state).
    pub fn subscribe(&self, agent: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut m = self.0.lock().expect("wakers");
        match m.get(agent) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = tokio::sync::watch::channel(0);
                m.insert(agent.to_string(), tx);
                rx
            }
        }
    }

    fn wake(&self, agents: &[String], index: u64) {
        let m = self.0.lock().expect("wakers");
        for a in agents {
            if let Some(tx) = m.get(a) {
                tx.send_replace(index);
            }
        }
    }

    /// Wakes every waiter (after a snapshot restore replaced the whole state).
    fn wake_all(&self, index: u64) {
        for tx in self.0.lock().expect("wakers").values() {
            tx.send_replace(index);
        }
    }
}

impl cairn_raft::App for Machine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let outcome = match bincode::deserialize::<Command>(command) {
            Ok(cmd) => apply(&mut self.state, index, cmd),
            Err(e) => {
                self.state.applied = index;
                rejected("bad_command", "", format!("undecodable command: {e}"))
            }
        };
        let touched = std::mem::take(&mut self.state.touched_agents.0);
        if !touched.is_empty() {
            self.wakers.wake(&touched, index);
        }
        bincode::serialize(&outcome).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        bincode::serialize(&self.state).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.state = bincode::deserialize(data).map_err(|e| format!("bad state snapshot: {e}"))?;
        self.wakers.wake_all(self.state.applied);
        Ok(())
    }
}

fn finish_deployment(
    state: &mut State,
    id: &str,
    to: crate::model::DeploymentState,
    message: String,
    at: u64,
) {
    if let Some(d) = state.deployments.get_mut(id) {
        if d.state == crate::model::DeploymentState::Running {
            d.state = to;
            d.finished_at = Some(at);
            d.message = message;
        }
    }
}

/// Records the roll-out of `w` (at its new version); a running one of the workload is
/// superseded. Only services and system workloads roll out.
fn start_deployment(state: &mut State, w: &Workload, from: Option<u64>, at: u64, message: String) {
    use crate::model::{Deployment, DeploymentState, WorkloadKind};
    if !matches!(w.kind, WorkloadKind::Service | WorkloadKind::System) {
        return;
    }
    let running: Vec<String> = state
        .deployments
        .values()
        .filter(|d| d.workload == w.id && d.state == DeploymentState::Running)
        .map(|d| d.id.clone())
        .collect();
    for id in running {
        finish_deployment(state, &id, DeploymentState::Superseded, String::new(), at);
    }
    let id = format!("{}@{}", w.id, w.version);
    state.deployments.insert(
        id.clone(),
        Deployment {
            id,
            workload: w.id.clone(),
            version: w.version,
            from_version: from,
            state: DeploymentState::Running,
            started_at: at,
            finished_at: None,
            message,
        },
    );
    while state.deployments.len() > DEPLOYMENTS_KEPT {
        let oldest = state
            .deployments
            .values()
            .min_by_key(|d| d.version)
            .map(|d| d.id.clone());
        match oldest {
            Some(id) => state.deployments.remove(&id),
            None => break,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn reg(id: &str) -> AgentRegistration {
        AgentRegistration {
            id: id.into(),
            hostname: "h".into(),
            addr: "127.0.0.1:5051".into(),
            resources: AgentResources::default(),
            attributes: BTreeMap::new(),
            version: "0".into(),
        }
    }

    fn workload(id: &str) -> Workload {
        crate::spec::from_toml(&format!(
            "id = \"{id}\"\n[runtime.native]\ncmd = \"/bin/true\"\nargs = []\n[resources]\ncpus = 0.1\nmem = 32\n"
        ))
        .unwrap()
        .validate()
        .unwrap()
    }

    /// Applies commands in order from index 1 and renders each outcome on one line.
    fn run(cmds: Vec<Command>) -> (State, String) {
        let mut s = State::default();
        let mut out = String::new();
        for (i, c) in cmds.into_iter().enumerate() {
            let o = apply(&mut s, i as u64 + 1, c);
            let line = match o {
                Outcome::Done { index } => format!("done {index}"),
                Outcome::Agent(a) => format!(
                    "agent {} {:?} changed_at={}",
                    a.id, a.status, a.status_changed_at
                ),
                Outcome::Kv(e) => format!(
                    "kv {}={} c={} m={}",
                    e.key, e.value, e.create_index, e.modify_index
                ),
                Outcome::Rejected {
                    code,
                    field,
                    message,
                } => format!("rejected {code} [{field}] {message}"),
            };
            out.push_str(&line);
            out.push('\n');
        }
        (s, out)
    }

    #[test]
    fn agent_lifecycle() {
        let (s, out) = run(vec![
            Command::RegisterAgent {
                reg: reg("a1"),
                at: 10,
            },
            Command::SetAgentStatus {
                id: "a1".into(),
                status: AgentStatus::Unreachable,
                at: 20,
            },
            Command::SetAgentStatus {
                id: "a1".into(),
                status: AgentStatus::Unreachable,
                at: 25,
            },
            Command::RegisterAgent {
                reg: reg("a1"),
                at: 30,
            },
            Command::SetAgentStatus {
                id: "nope".into(),
                status: AgentStatus::Active,
                at: 40,
            },
        ]);
        assert_eq!(
            out,
            "agent a1 Active changed_at=10\n\
             agent a1 Unreachable changed_at=20\n\
             agent a1 Unreachable changed_at=20\n\
             agent a1 Active changed_at=30\n\
             rejected not_found [id] no agent \"nope\"\n"
        );
        assert_eq!(s.agents["a1"].registered_at, 10);
        // The no-op status change did not bump the table index.
        assert_eq!(s.indexes.agents, 4);
        assert_eq!(s.applied, 5);
    }

    #[test]
    fn kv_and_cas() {
        let put = |k: &str, v: &str, cas| Command::KvPut {
            key: k.into(),
            value: v.into(),
            cas,
        };
        let (s, out) = run(vec![
            put("x", "1", None),
            put("x", "2", Some(1)),
            put("x", "3", Some(1)),
            put("y", "1", Some(0)),
            put("y", "2", Some(0)),
            Command::KvDelete { key: "x".into() },
        ]);
        assert_eq!(
            out,
            "kv x=1 c=1 m=1\n\
             kv x=2 c=1 m=2\n\
             rejected cas_failed [cas] key \"x\" is at modify index 2, not 1\n\
             kv y=1 c=4 m=4\n\
             rejected cas_failed [cas] key \"y\" is at modify index 4, not 0\n\
             done 6\n"
        );
        assert!(!s.kv.contains_key("x"));
        assert_eq!(s.indexes.kv, 6);
    }

    #[test]
    fn workloads_and_tasks() {
        let task = |id: &str, w: &str, a: &str| {
            let mut wl = workload(w);
            wl.id = w.into();
            Task::of(&wl, id.into(), a.into(), &[], None, 0)
        };
        let upd = |id: &str, st| Command::UpdateTaskState {
            id: id.into(),
            state: st,
            reason: None,
            at: 9,
        };
        let (s, out) = run(vec![
            Command::RegisterAgent {
                reg: reg("a1"),
                at: 1,
            },
            Command::PutWorkload {
                workload: workload("web"),
                at: 1,
            },
            Command::AddTask {
                task: task("t1", "web", "a1"),
            },
            Command::AddTask {
                task: task("t1", "web", "a1"),
            },
            Command::AddTask {
                task: task("t2", "nope", "a1"),
            },
            Command::AddTask {
                task: task("t3", "web", "nope"),
            },
            upd("t1", TaskState::Running),
            upd("t1", TaskState::Finished),
            upd("t1", TaskState::Running),
            Command::RemoveWorkload { id: "web".into() },
            Command::RemoveWorkload { id: "web".into() },
        ]);
        assert_eq!(
            out,
            "agent a1 Active changed_at=1\n\
             done 2\n\
             done 3\n\
             rejected conflict [task.id] task \"t1\" exists\n\
             rejected not_found [task.workload] no workload \"nope\"\n\
             rejected not_found [task.agent] no agent \"nope\"\n\
             done 7\n\
             done 8\n\
             rejected invalid_transition [state] task \"t1\" cannot go from Finished to Running\n\
             done 10\n\
             rejected not_found [id] no workload \"web\"\n"
        );
        assert_eq!(s.tasks["t1"].state, TaskState::Finished);
    }

    #[test]
    fn task_transition_table() {
        use TaskState::*;
        // Row: from-state; columns in TaskState::ALL order; 1 = allowed.
        let table: [(TaskState, &str); 9] = [
            (Staging, "011011111"),
            (Starting, "001111111"),
            (Running, "000111111"),
            (Finished, "000000000"),
            (Failed, "000000000"),
            (Killing, "000110111"),
            (Killed, "000000000"),
            (Lost, "000000000"),
            (Unreachable, "001111110"),
        ];
        for (from, row) in table {
            let got: String = TaskState::ALL
                .iter()
                .map(|to| if from.can_transition(*to) { '1' } else { '0' })
                .collect();
            assert_eq!(got, row, "transitions from {from:?}");
        }
    }

    #[test]
    fn machine_snapshot_roundtrip_and_bad_bytes() {
        use cairn_raft::App;
        let mut m = Machine::default();
        let cmd = bincode::serialize(&Command::KvPut {
            key: "k".into(),
            value: "v".into(),
            cas: None,
        })
        .unwrap();
        m.apply(1, &cmd);
        let bad: Outcome = bincode::deserialize(&m.apply(2, b"\xff\xff")).unwrap();
        assert!(matches!(bad, Outcome::Rejected { ref code, .. } if code == "bad_command"));
        let snap = m.snapshot();
        let mut m2 = Machine::default();
        m2.restore(&snap).unwrap();
        assert_eq!(m2.state, m.state);
        assert!(m2.restore(b"junk").is_err());
    }
}
