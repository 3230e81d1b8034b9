//! Where the pure plan engine meets the rest of the cluster, in both directions, still pure:
//!
//! - `commands(&State, now)`: the leader runs `reconcile_service` for every service on facts
//!   read from the replicated tasks and agents (`observe`), and turns its actions into
//!   `Command`s, placing pods with the pure scheduler (`place_pod`: the pod type's
//!   constraints and role, the sum of its tasks' resources, its volumes counted against the
//!   agent's disk).
//! - `sync_tasks(&mut State, service, index, at)`: called by `service::commands` after every
//!   service command, inside `apply`, it makes each launched pod task a real `model::Task`
//!   on the pod's agent (id `<service>.<pod>.<task>.<generation>`, workload
//!   `service:<service>/<pod type>`), so agents run it exactly like a workload task, and
//!   marks `killing` every live pod task that is no longer wanted (an older generation, a
//!   stopping or replaced pod, a removed service).
//!
//! A pod task carries its pod's volumes (the agent mounts them) and its config files,
//! rendered here (`service::render`) from the spec version it runs. A template that does not
//! render makes the task `failed` at once with reason `template_error: ...` naming the file
//! and line; the plan step stops in `error` with that message.

use super::model::{PodInstance, PodTask, ServiceState, StatefulService, TaskTarget};
use super::reconcile::{reconcile_service, Action, AgentFact, Observed, TaskFact};
use super::ServiceOp;
use crate::model::{AgentStatus, HealthCheck, PortAsk, Task, TaskState, TaskVolume};
use crate::scheduler::{Allocation, Ask, Snapshot, Strategy};
use crate::state::{Command, Event, State};
use std::collections::{BTreeMap, BTreeSet};

/// The reason of a pod task whose config templates did not render (no retry helps).
pub const TEMPLATE_ERROR: &str = "template_error";

/// The `Task::workload` of a pod task: `service:<service>/<pod type>` (workload ids never hold
/// ':' so the two never mix).
pub fn task_workload(service: &str, pod_type: &str) -> String {
    format!("service:{service}/{pod_type}")
}

/// The service a task belongs to, if it is a pod task.
pub fn service_of(t: &Task) -> Option<&str> {
    t.workload
        .strip_prefix("service:")
        .and_then(|r| r.split('/').next())
}

/// The id of a pod task's launch (no workload task id has more than one '.').
pub fn task_id(service: &str, pod: &str, task: &str, generation: u64) -> String {
    format!("{service}.{pod}.{task}.{generation}")
}

/// Facts for `reconcile_service`, from replicated state: agent status and each launched pod
/// task's state. A task with a readiness or health check is ready once its agent reports it
/// healthy; otherwise when it runs.
pub fn observe(state: &State, svc: &ServiceState) -> Observed {
    let mut obs = Observed::default();
    // Only the agents of the service's pods matter (a pass over 1,000 services must not copy
    // every agent 1,000 times).
    for agent in svc.pods.values().filter_map(|p| p.agent.as_ref()) {
        if let Some(a) = state.agents.get(agent) {
            obs.agents.insert(
                a.id.clone(),
                AgentFact {
                    active: a.status == AgentStatus::Active,
                    since: a.status_changed_at,
                },
            );
        }
    }
    for pod in svc.pods.values() {
        for (name, target) in &pod.tasks {
            let id = task_id(&svc.spec.name, &pod.id, name, target.generation);
            let Some(t) = state.tasks.get(&id) else {
                continue;
            };
            let checked = !t.health_checks.is_empty();
            let ready = t.state == TaskState::Running && (!checked || t.healthy == Some(true));
            let message = match (&t.reason, t.state, checked, ready) {
                (Some(r), _, _, _) => r.clone(),
                (None, TaskState::Running, true, false) => "not healthy yet".into(),
                _ => String::new(),
            };
            obs.tasks.entry(pod.id.clone()).or_default().insert(
                name.clone(),
                TaskFact {
                    agent: t.agent.clone(),
                    generation: target.generation,
                    state: t.state,
                    ready,
                    message,
                },
            );
        }
    }
    obs
}

/// The scheduler's view with what services hold besides their live tasks: placed pods whose
/// tasks are not running yet (their whole ask) and every volume reservation (disk).
pub fn snapshot(state: &State) -> Snapshot {
    let mut allocs: Vec<(String, Allocation)> = state
        .tasks
        .values()
        .filter(|t| t.is_live())
        .map(|t| {
            (
                t.agent.clone(),
                Allocation {
                    pool: t.pool.clone(),
                    cpus: t.resources.cpus,
                    mem: t.resources.mem,
                    disk: t.resources.disk,
                    ports: t.ports.iter().map(|p| p.number).collect(),
                    workload: t.workload.clone(),
                },
            )
        })
        .collect();
    let live_pods: BTreeSet<(String, String)> = state
        .tasks
        .values()
        .filter(|t| t.is_live())
        .filter_map(|t| {
            let svc = service_of(t)?;
            let pod =
                t.id.strip_prefix(svc)?
                    .strip_prefix('.')?
                    .split('.')
                    .next()?;
            Some((svc.to_string(), pod.to_string()))
        })
        .collect();
    for svc in state.services.values() {
        for pod in svc.pods.values() {
            let (Some(agent), Some(pt)) = (&pod.agent, svc.spec.pod_type(&pod.pod_type)) else {
                continue;
            };
            if pod.stopping || live_pods.contains(&(svc.spec.name.clone(), pod.id.clone())) {
                continue;
            }
            let ask = pod_ask(&svc.spec.name, pt);
            allocs.push((
                agent.clone(),
                Allocation {
                    pool: None,
                    cpus: ask.cpus,
                    mem: ask.mem,
                    disk: ask.disk - volumes_mb(pt),
                    ports: ask.ports.iter().copied().filter(|&p| p != 0).collect(),
                    workload: ask.workload,
                },
            ));
        }
    }
    for v in all_volumes(state) {
        allocs.push((
            v.agent.clone(),
            Allocation {
                disk: v.size_mb,
                workload: format!("volume:{}", v.id),
                ..Allocation::default()
            },
        ));
    }
    Snapshot::new(
        state.agents.values(),
        allocs.iter().map(|(a, al)| (a.as_str(), al.clone())),
    )
}

/// Every volume reservation: of services' pods and detached ones (orphaned or being
/// destroyed after their service went).
pub fn all_volumes(state: &State) -> impl Iterator<Item = &super::VolumeReservation> {
    state
        .services
        .values()
        .flat_map(|s| s.volumes.values())
        .chain(state.detached_volumes.values())
}

fn volumes_mb(pt: &super::PodType) -> u64 {
    pt.volumes.iter().map(|v| v.size_mb).sum()
}

/// What one instance of a pod type asks of the scheduler: all its tasks at once, plus its
/// volumes' sizes as disk.
pub fn pod_ask(service: &str, pt: &super::PodType) -> Ask {
    let sum = |f: fn(&PodTask) -> f64| pt.tasks.iter().map(f).sum::<f64>();
    Ask {
        workload: task_workload(service, &pt.name),
        role: pt.role.clone(),
        cpus: sum(|t| t.resources.cpus),
        mem: sum(|t| t.resources.mem as f64) as u64,
        disk: sum(|t| t.resources.disk as f64) as u64 + volumes_mb(pt),
        ports: pt
            .tasks
            .iter()
            .flat_map(|t| t.ports.iter().map(|p| p.number))
            .collect(),
        constraints: pt.constraints.clone(),
        strategy: Strategy::Spread,
    }
}

/// What the leader commits next for every stateful service at `now`. A pod no agent fits
/// stays unplaced and its step's message says why.
pub fn commands(state: &State, now: u64) -> Vec<Command> {
    let mut out = Vec::new();
    let mut snap: Option<Snapshot> = None;
    for svc in state.services.values() {
        let obs = observe(state, svc);
        let mut unplaced: Option<String> = None;
        for action in reconcile_service(svc, &obs, now) {
            let op = match action {
                Action::Op(ServiceOp::Step {
                    plan,
                    phase,
                    step,
                    from,
                    to,
                    message,
                }) => {
                    let message = match unplaced.take() {
                        Some(why) => format!("{message}: {why}"),
                        None => message,
                    };
                    let current = svc
                        .plans
                        .get(&plan)
                        .and_then(|p| p.phases.get(phase))
                        .and_then(|p| p.steps.get(step));
                    if current.is_some_and(|s| s.status == to && s.message == message) {
                        continue;
                    }
                    ServiceOp::Step {
                        plan,
                        phase,
                        step,
                        from,
                        to,
                        message,
                    }
                }
                Action::Op(op) => op,
                Action::PlacePod { pod, incarnation } => {
                    let snap = snap.get_or_insert_with(|| snapshot(state));
                    match place_pod(snap, svc, &pod) {
                        Ok(agent) => ServiceOp::PlacePod {
                            pod,
                            incarnation,
                            agent,
                        },
                        Err(why) => {
                            unplaced = Some(why);
                            continue;
                        }
                    }
                }
            };
            out.push(Command::ServiceOp {
                service: svc.spec.name.clone(),
                op,
                at: now,
            });
        }
    }
    out
}

/// Whether every pod of a new service `spec` fits on today's active agents, beside what
/// already runs there (a dry run of the scheduler): the first pod type that does not, and
/// why. A package install checks this first, so a cluster that cannot run the package says
/// so instead of leaving a deploy plan waiting for an agent.
pub fn check_fits(state: &State, spec: &StatefulService) -> Result<(), String> {
    let mut snap = snapshot(state);
    let active = state
        .agents
        .values()
        .filter(|a| a.status == crate::model::AgentStatus::Active)
        .count();
    for pt in &spec.pod_types {
        let want = pt.count as usize;
        let (placed, why) = snap.place(&pod_ask(&spec.name, pt), want);
        if placed.len() < want {
            let why = why.map_or_else(|| "no agent fits".into(), |u| u.reason);
            return Err(format!(
                "{} of the {want} {:?} pod(s) fit on the {active} active agent(s) ({why})",
                placed.len(),
                pt.name
            ));
        }
    }
    Ok(())
}

/// An agent for a pod instance, or why none fits.
fn place_pod(snap: &mut Snapshot, svc: &ServiceState, pod: &str) -> Result<String, String> {
    let p = svc.pods.get(pod).ok_or("no such pod")?;
    let pt = svc.spec.pod_type(&p.pod_type).ok_or("no such pod type")?;
    let (placed, why) = snap.place(&pod_ask(&svc.spec.name, pt), 1);
    match placed.into_iter().next() {
        Some(pl) => Ok(pl.agent),
        None => Err(why.map_or_else(|| "no agent fits".into(), |u| u.reason)),
    }
}

/// The spec a task launched at `version` runs: the newest kept spec not newer than it.
fn spec_at(svc: &ServiceState, version: u64) -> &StatefulService {
    svc.history
        .iter()
        .rev()
        .find(|h| h.version <= version)
        .map_or(&svc.spec, |h| &h.spec)
}

/// Ports for a launch of a pod task on `agent`: fixed ones as asked; 0 → the port the
/// previous launch of the same pod task had (a pod keeps its address across restarts in
/// place, as it keeps its volumes; peers rendered into configs stay right), else the lowest
/// port of the agent's ranges (its role's first) no other live task there holds. `own` is
/// the id prefix of this pod task's launches (`<service>.<pod>.<task>.`), whose ports are
/// the task's own, not taken.
fn ports_on(
    state: &State,
    agent: &str,
    role: Option<&str>,
    asks: &[PortAsk],
    own: &str,
) -> Vec<PortAsk> {
    let Some(a) = state.agents.get(agent) else {
        return asks.to_vec();
    };
    let on_agent = || {
        state
            .tasks_by_agent
            .get(agent)
            .into_iter()
            .flatten()
            .filter_map(|id| state.tasks.get(id))
    };
    let previous: Vec<PortAsk> = on_agent()
        .filter(|t| t.id.starts_with(own))
        .max_by_key(|t| {
            (
                t.created_at,
                t.id.rsplit('.').next().and_then(|g| g.parse::<u64>().ok()),
            )
        })
        .map(|t| t.ports.clone())
        .unwrap_or_default();
    let mut used: BTreeSet<u16> = on_agent()
        .filter(|t| t.is_live() && !t.id.starts_with(own))
        .flat_map(|t| t.ports.iter().map(|p| p.number))
        .collect();
    used.extend(asks.iter().map(|p| p.number).filter(|&n| n != 0));
    let ranges: Vec<_> = role
        .and_then(|r| a.resources.reserved.get(r))
        .into_iter()
        .chain(std::iter::once(&a.resources.unreserved))
        .flat_map(|r| r.ports.iter().cloned())
        .collect();
    let in_ranges = |n: u16| ranges.iter().any(|r| (r.begin..=r.end).contains(&n));
    asks.iter()
        .map(|p| {
            let kept = previous
                .iter()
                .find(|q| q.name == p.name && q.number != 0)
                .map(|q| q.number)
                .filter(|&n| in_ranges(n) && !used.contains(&n));
            let number = if p.number != 0 {
                p.number
            } else if let Some(n) = kept {
                used.insert(n);
                n
            } else {
                let n = ranges
                    .iter()
                    .flat_map(|r| r.begin..=r.end)
                    .find(|n| !used.contains(n))
                    .unwrap_or(0);
                used.insert(n);
                n
            };
            PortAsk {
                name: p.name.clone(),
                number,
            }
        })
        .collect()
}

/// The task an agent runs for one launch of a pod task.
fn pod_task(
    state: &State,
    svc: &ServiceState,
    pod: &PodInstance,
    agent: &str,
    name: &str,
    target: &TaskTarget,
    at: u64,
) -> Option<Task> {
    let (generation, version) = (target.generation, target.version);
    let spec = spec_at(svc, version);
    let pt = spec
        .pod_type(&pod.pod_type)
        .or_else(|| svc.spec.pod_type(&pod.pod_type))?;
    let k = pt.task(name)?;
    let role = pt.role.as_deref();
    let mut env = k.env.clone();
    env.insert("CAIRN_SERVICE".into(), svc.spec.name.clone());
    env.insert("CAIRN_POD".into(), pod.id.clone());
    env.insert("CAIRN_POD_INDEX".into(), pod.index.to_string());
    for (k, v) in &target.params {
        env.insert(format!("CAIRN_PARAM_{}", k.to_uppercase()), v.clone());
    }
    let own = format!("{}.{}.{}.", svc.spec.name, pod.id, name);
    let ports = ports_on(state, agent, role, &k.ports, &own);
    for p in &ports {
        env.insert(
            format!("PORT_{}", p.name.to_uppercase().replace('-', "_")),
            p.number.to_string(),
        );
    }
    // The readiness check runs as a health check that never kills (it gates plans only).
    let mut checks = k.health_checks.clone();
    if let Some(r) = &k.readiness_check {
        checks.push(HealthCheck {
            max_failures: u32::MAX,
            ..r.clone()
        });
    }
    let volumes: Vec<TaskVolume> = pod
        .volumes
        .iter()
        .filter_map(|id| svc.volumes.get(id))
        .map(|v| TaskVolume {
            id: v.id.clone(),
            path: v.path.clone(),
            size_mb: v.size_mb,
        })
        .collect();
    let ctx = super::render::context(
        state,
        svc,
        spec.options_value(),
        &pod.id,
        name,
        &ports,
        &env,
    );
    let (task_state, reason, files) = match super::render::render(&k.templates, &ctx) {
        Ok(files) => (TaskState::Staging, None, files),
        Err(e) => (
            TaskState::Failed,
            Some(format!("{TEMPLATE_ERROR}: {e}")),
            Vec::new(),
        ),
    };
    let pool = role
        .filter(|r| {
            state
                .agents
                .get(agent)
                .is_some_and(|a| a.resources.reserved.contains_key(*r))
        })
        .map(str::to_string);
    Some(Task {
        id: task_id(&svc.spec.name, &pod.id, name, generation),
        workload: task_workload(&svc.spec.name, &pod.pod_type),
        agent: agent.to_string(),
        state: task_state,
        reason,
        updated_at: at,
        created_at: at,
        version,
        runtime: k.runtime.clone(),
        resources: k.resources.clone(),
        env,
        ports,
        pool,
        kill_grace_ms: k.kill_grace_ms,
        timeout_ms: None,
        network: "host".into(),
        health_checks: checks,
        healthy: None,
        volumes,
        files,
    })
}

/// Makes `state.tasks` match what service `name` has launched (see the module docs). Pure;
/// records a task event for each task it adds or kills.
pub fn sync_tasks(state: &mut State, name: &str, index: u64, at: u64) {
    let mut wanted: BTreeMap<String, Task> = BTreeMap::new();
    let mut keep: BTreeSet<String> = BTreeSet::new();
    if let Some(svc) = state.services.get(name) {
        for pod in svc.pods.values().filter(|p| !p.stopping) {
            let Some(agent) = &pod.agent else {
                continue;
            };
            for (task, target) in &pod.tasks {
                let id = task_id(name, &pod.id, task, target.generation);
                keep.insert(id.clone());
                if state.tasks.contains_key(&id) {
                    continue;
                }
                if let Some(t) = pod_task(state, svc, pod, agent, task, target, at) {
                    wanted.insert(id, t);
                }
            }
        }
    }
    let stale: Vec<String> = state
        .tasks
        .values()
        .filter(|t| service_of(t) == Some(name) && t.is_live() && t.state != TaskState::Killing)
        .filter(|t| !keep.contains(&t.id))
        .map(|t| t.id.clone())
        .collect();
    let mut events = Vec::new();
    for id in stale {
        let Some(t) = state.tasks.get_mut(&id) else {
            continue;
        };
        if !t.state.can_transition(TaskState::Killing) {
            continue;
        }
        t.state = TaskState::Killing;
        t.reason = Some("pod_task_replaced".into());
        t.updated_at = at;
        let agent = t.agent.clone();
        state.touched_agents.0.push(agent.clone());
        state.assignment_index.insert(agent, index);
        state.indexes.tasks = index;
        events.push((id, "killing".to_string(), "pod_task_replaced".to_string()));
    }
    for (id, t) in wanted {
        let agent = t.agent.clone();
        if let (TaskState::Failed, Some(why)) = (t.state, &t.reason) {
            events.push((id.clone(), "failed".to_string(), why.clone()));
            state
                .tasks_by_agent
                .entry(agent)
                .or_default()
                .insert(id.clone());
            state.indexes.tasks = index;
            state.tasks.insert(id, t);
            continue;
        }
        state
            .tasks_by_agent
            .entry(agent.clone())
            .or_default()
            .insert(id.clone());
        state.touched_agents.0.push(agent.clone());
        state.assignment_index.insert(agent.clone(), index);
        state.indexes.tasks = index;
        state.tasks.insert(id.clone(), t);
        events.push((id, "staging".to_string(), format!("on agent {agent}")));
    }
    for (id, kind, detail) in events {
        state.events.push_back(Event {
            index,
            topic: "task".into(),
            id,
            kind,
            detail,
            at,
        });
    }
}

#[cfg(test)]
mod tests;
