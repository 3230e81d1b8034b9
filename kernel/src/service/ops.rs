//! Pure changes to one stateful service's replicated state: create, update, remove, and the
//! `ServiceOp`s the plan engine (`service::reconcile`) and operators propose. `state::apply`
//! calls these; they do no IO and read no clock (`at` is the proposer's time). Each op
//! carries what its proposer saw (a step's status, a task's generation, a pod's incarnation),
//! so a stale or replayed proposal is refused instead of applied twice.

use super::model::{
    PodInstance, ServiceState, ServiceVersion, StatefulService, TaskTarget, VolumeReservation,
    VolumeStatus, HISTORY_KEPT,
};
use super::plan::{
    custom_plan, decommission_plan, deploy_plan, recovery_plan, PlanKind, PlanOp, Step, StepStatus,
    StepWork,
};
use crate::spec::SpecError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One task launch in `ServiceOp::Launch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub task: String,
    /// The service version to run.
    pub version: u64,
    /// The task's generation the proposer saw (`None`: never launched in this incarnation).
    pub seen: Option<u64>,
}

/// An operation on one service (the payload of `Command::ServiceOp`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServiceOp {
    /// The scheduler chose `agent` for the pod's `incarnation`: reserve its volumes there.
    PlacePod {
        pod: String,
        incarnation: u32,
        agent: String,
    },
    /// Move a step from `from` to `to` (same status: a new message only). Entering some
    /// statuses has effects: a `Replace` step entering `prepared` replaces the pod; a
    /// `Decommission` step entering `starting` stops the pod's tasks, `started` destroys its
    /// volumes, `complete` removes the pod.
    Step {
        plan: String,
        phase: usize,
        step: usize,
        from: StepStatus,
        to: StepStatus,
        message: String,
    },
    /// (Re)launch tasks of a step's pod, on its agent with its volumes.
    Launch {
        plan: String,
        phase: usize,
        step: usize,
        tasks: Vec<Launch>,
    },
    /// Add a `recovery` step for the pod: restart `tasks` in place (all when empty) or, with
    /// `replace`, move the pod to a new agent with fresh volumes.
    Recover {
        pod: String,
        tasks: Vec<String>,
        replace: bool,
        message: String,
    },
    /// An operator's operation on a plan.
    Plan { plan: String, op: PlanOp },
    /// Start a declared plan (or `deploy` again), with parameters for its tasks.
    StartPlan {
        plan: String,
        #[serde(default)]
        params: BTreeMap<String, String>,
    },
    /// The agent deleted these volumes' data.
    VolumesDestroyed { agent: String, ids: Vec<String> },
    /// Move endpoint `endpoint` (under `[failover]`) to pod `to` and start the `failover`
    /// plan; `message` says why (the engine's failover, or an operator's switchover).
    Failover {
        endpoint: String,
        to: String,
        message: String,
    },
}

/// Why an op was refused: a stable code, the field, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError {
    pub code: &'static str,
    pub field: &'static str,
    pub message: String,
}

fn fail<T>(
    code: &'static str,
    field: &'static str,
    message: impl Into<String>,
) -> Result<T, OpError> {
    Err(OpError {
        code,
        field,
        message: message.into(),
    })
}

fn add_pods(svc: &mut ServiceState, at: u64) {
    for t in &svc.spec.pod_types {
        for i in 0..t.count {
            let id = PodInstance::id_of(&t.name, i);
            svc.pods.entry(id.clone()).or_insert_with(|| PodInstance {
                id,
                pod_type: t.name.clone(),
                index: i,
                incarnation: 0,
                agent: None,
                volumes: Vec::new(),
                tasks: BTreeMap::new(),
                next_generation: 1,
                stopping: false,
                created_at: at,
                placed_at: None,
            });
        }
    }
}

/// The pod gets a new incarnation: no agent, no tasks; its volumes are destroyed (by their
/// agent, when it can).
fn replace_pod(svc: &mut ServiceState, pod: &str) {
    let Some(p) = svc.pods.get_mut(pod) else {
        return;
    };
    for v in p.volumes.drain(..) {
        if let Some(r) = svc.volumes.get_mut(&v) {
            r.status = VolumeStatus::Destroying;
        }
    }
    p.incarnation += 1;
    p.agent = None;
    p.placed_at = None;
    p.tasks.clear();
    p.stopping = false;
}

/// A new service at `index`: its pods (unplaced), a `deploy` plan and an empty `recovery`.
pub fn new_service(spec: StatefulService, index: u64, at: u64) -> ServiceState {
    let mut svc = ServiceState {
        type_versions: spec
            .pod_types
            .iter()
            .map(|t| (t.name.clone(), index))
            .collect(),
        history: vec![ServiceVersion {
            version: index,
            at,
            spec: spec.clone(),
        }],
        spec,
        version: index,
        created_at: at,
        updated_at: at,
        pods: BTreeMap::new(),
        volumes: BTreeMap::new(),
        plans: BTreeMap::new(),
    };
    add_pods(&mut svc, at);
    let deploy = deploy_plan(&svc, at);
    let recovery = recovery_plan(&svc, at);
    svc.plans.insert(deploy.name.clone(), deploy);
    svc.plans.insert(recovery.name.clone(), recovery);
    svc
}

/// Changes the spec (checked by `update::check_update`). Returns false for an unchanged
/// spec. A new `deploy` plan replaces the running one; pods beyond their type's count get a
/// `decommission` plan; pods of unchanged pod types keep their version (not restarted).
pub fn update_service(
    svc: &mut ServiceState,
    mut spec: StatefulService,
    allow_decommission: bool,
    index: u64,
    at: u64,
) -> Result<bool, SpecError> {
    super::update::check_update(&svc.spec, &spec, allow_decommission)?;
    // An endpoint under failover stays where failover (or a switchover) put it: an update
    // (a package update, a rollback) re-renders the first pod there, which is no longer the
    // one holding the role.
    if let Some(f) = &spec.failover {
        if let Some(cur) = svc.spec.endpoints.get(&f.endpoint) {
            if svc.pods.get(cur).is_some_and(|p| !p.stopping)
                && spec.endpoints.contains_key(&f.endpoint)
            {
                spec.endpoints.insert(f.endpoint.clone(), cur.clone());
            }
        }
    }
    if spec == svc.spec {
        return Ok(false);
    }
    // Only a change to what runs restarts a pod type (not its count, deploy strategy,
    // deadline or replace_after); new options restart the pod types that render templates.
    let options_changed = spec.options != svc.spec.options;
    for t in &spec.pod_types {
        let templated = t.tasks.iter().any(|k| !k.templates.is_empty());
        let same = svc.spec.pod_type(&t.name).is_some_and(|o| {
            let mut o = o.clone();
            o.count = t.count;
            o.deploy = t.deploy;
            o.deadline_ms = t.deadline_ms;
            o.replace_after_ms = t.replace_after_ms;
            o == *t
        });
        if !same || (options_changed && templated) {
            svc.type_versions.insert(t.name.clone(), index);
        }
    }
    svc.spec = spec;
    svc.version = index;
    svc.updated_at = at;
    svc.history.push(ServiceVersion {
        version: index,
        at,
        spec: svc.spec.clone(),
    });
    if svc.history.len() > HISTORY_KEPT {
        svc.history.remove(0);
    }
    // A pod being decommissioned that is wanted again starts afresh.
    let revived: Vec<String> = svc
        .pods
        .values()
        .filter(|p| p.stopping)
        .filter(|p| {
            svc.spec
                .pod_type(&p.pod_type)
                .is_some_and(|t| p.index < t.count)
        })
        .map(|p| p.id.clone())
        .collect();
    for id in revived {
        replace_pod(svc, &id);
    }
    add_pods(svc, at);
    let deploy = deploy_plan(svc, at);
    svc.plans.insert(deploy.name.clone(), deploy);
    match decommission_plan(svc, at) {
        Some(p) => {
            svc.plans.insert(p.name.clone(), p);
        }
        None => {
            svc.plans.remove("decommission");
        }
    }
    Ok(true)
}

/// Moves a failover endpoint to pod `to` and starts the `failover` plan. Refused while a
/// failover's `promote` phase is under way (a second one waits for it), for an endpoint
/// without `[failover]`, and for a pod of another type or the endpoint's own.
fn failover(svc: &mut ServiceState, endpoint: &str, to: &str, at: u64) -> Result<(), OpError> {
    let Some(f) = svc.spec.failover.clone().filter(|f| f.endpoint == endpoint) else {
        return fail(
            "invalid",
            "endpoint",
            format!(
                "service {:?} has no failover for endpoint {endpoint:?} (declare [failover] in its spec)",
                svc.spec.name
            ),
        );
    };
    let Some(cur) = svc.spec.endpoints.get(endpoint).cloned() else {
        return fail("invalid", "endpoint", format!("no endpoint {endpoint:?}"));
    };
    if cur == to {
        return fail(
            "conflict",
            "to",
            format!("endpoint {endpoint:?} already names {to}"),
        );
    }
    let cur_type = svc.pods.get(&cur).map(|p| p.pod_type.clone());
    match svc.pods.get(to) {
        Some(p) if !p.stopping && Some(&p.pod_type) == cur_type.as_ref() => {}
        _ => {
            return fail(
                "invalid",
                "to",
                format!(
                    "no pod {to:?} of type {:?} in service {:?}",
                    cur_type.unwrap_or_default(),
                    svc.spec.name
                ),
            )
        }
    }
    if let Some(p) = svc.plans.get("failover") {
        if !p.phases.first().is_some_and(|ph| ph.is_complete())
            && p.status() != super::plan::PlanStatus::Error
        {
            return fail(
                "conflict",
                "endpoint",
                format!(
                    "a failover to {} is promoting it; wait for its plan",
                    p.phases[0].steps.first().map_or("?", |s| s.pod.as_str())
                ),
            );
        }
    }
    svc.spec
        .endpoints
        .insert(endpoint.to_string(), to.to_string());
    let plan = super::plan::failover_plan(svc, to, &f.tasks, at);
    svc.plans.insert(plan.name.clone(), plan);
    svc.updated_at = at;
    Ok(())
}

/// Removes a service: returns its volumes, `Orphaned` with `keep_volumes`, else `Destroying`
/// (the agents delete them and report it).
pub fn remove_service(svc: ServiceState, keep_volumes: bool) -> Vec<VolumeReservation> {
    svc.volumes
        .into_values()
        .map(|mut v| {
            if v.status == VolumeStatus::Reserved {
                v.status = if keep_volumes {
                    VolumeStatus::Orphaned
                } else {
                    VolumeStatus::Destroying
                };
            }
            v
        })
        .collect()
}

/// Applies one op. Refused ops change nothing.
pub fn apply_op(svc: &mut ServiceState, op: ServiceOp, at: u64) -> Result<(), OpError> {
    match op {
        ServiceOp::PlacePod {
            pod,
            incarnation,
            agent,
        } => {
            let name = svc.spec.name.clone();
            let Some(p) = svc.pods.get_mut(&pod) else {
                return fail("not_found", "pod", format!("no pod {pod:?}"));
            };
            if p.incarnation != incarnation || p.agent.is_some() || p.stopping {
                return fail(
                    "stale",
                    "pod",
                    format!("pod {pod:?} is already placed or changed"),
                );
            }
            let Some(t) = svc.spec.pod_type(&p.pod_type) else {
                return fail("not_found", "pod", format!("no pod type for {pod:?}"));
            };
            p.agent = Some(agent.clone());
            p.placed_at = Some(at);
            for v in &t.volumes {
                let id = VolumeReservation::id_of(&name, &pod, &v.name, incarnation);
                p.volumes.push(id.clone());
                svc.volumes.insert(
                    id.clone(),
                    VolumeReservation {
                        id,
                        service: name.clone(),
                        pod: pod.clone(),
                        name: v.name.clone(),
                        agent: agent.clone(),
                        size_mb: v.size_mb,
                        path: v.path.clone(),
                        status: VolumeStatus::Reserved,
                        created_at: at,
                    },
                );
            }
        }
        ServiceOp::Step {
            plan,
            phase,
            step,
            from,
            to,
            message,
        } => {
            let Some(s) = svc
                .plans
                .get_mut(&plan)
                .and_then(|p| p.phases.get_mut(phase))
                .and_then(|p| p.steps.get_mut(step))
            else {
                return fail(
                    "not_found",
                    "step",
                    format!("no step {plan}/{phase}/{step}"),
                );
            };
            if s.status != from {
                return fail(
                    "stale",
                    "from",
                    format!("step {:?} is {:?}, not {from:?}", s.name, s.status),
                );
            }
            s.transition(to, at, &message)
                .or_else(|m| fail("invalid_transition", "to", m))?;
            let (work, pod) = (s.work, s.pod.clone());
            if from != to {
                step_effects(svc, work, &pod, to);
            }
            if let Some(p) = svc.plans.get_mut(&plan) {
                p.updated_at = at;
            }
        }
        ServiceOp::Launch {
            plan,
            phase,
            step,
            tasks,
        } => {
            let params = svc
                .plans
                .get(&plan)
                .map(|p| p.params.clone())
                .unwrap_or_default();
            let Some(s) = svc
                .plans
                .get_mut(&plan)
                .and_then(|p| p.phases.get_mut(phase))
                .and_then(|p| p.steps.get_mut(step))
            else {
                return fail(
                    "not_found",
                    "step",
                    format!("no step {plan}/{phase}/{step}"),
                );
            };
            if !matches!(s.status, StepStatus::Starting | StepStatus::Started) {
                return fail(
                    "stale",
                    "step",
                    format!("step {:?} is {:?}", s.name, s.status),
                );
            }
            let Some(p) = svc.pods.get_mut(&s.pod) else {
                return fail("not_found", "pod", format!("no pod {:?}", s.pod));
            };
            let Some(t) = svc.spec.pod_type(&p.pod_type) else {
                return fail("not_found", "pod", format!("no pod type {:?}", p.pod_type));
            };
            if p.agent.is_none() || p.stopping {
                return fail("stale", "pod", format!("pod {:?} is not placed", p.id));
            }
            for l in &tasks {
                if t.task(&l.task).is_none() {
                    return fail("not_found", "tasks", format!("no task {:?}", l.task));
                }
                if p.tasks.get(&l.task).map(|t| t.generation) != l.seen {
                    return fail(
                        "stale",
                        "tasks",
                        format!("task {:?} was launched since", l.task),
                    );
                }
            }
            for l in tasks {
                let generation = p.next_generation;
                p.next_generation += 1;
                let goal = t.task(&l.task).map(|k| k.goal).expect("checked");
                s.launched.insert(l.task.clone(), generation);
                *s.attempts.entry(l.task.clone()).or_default() += 1;
                p.tasks.insert(
                    l.task,
                    TaskTarget {
                        goal,
                        version: l.version,
                        generation,
                        launched_at: at,
                        params: params.clone(),
                    },
                );
            }
        }
        ServiceOp::Recover {
            pod,
            tasks,
            replace,
            message,
        } => {
            let Some(p) = svc.pods.get(&pod) else {
                return fail("not_found", "pod", format!("no pod {pod:?}"));
            };
            if p.stopping {
                return fail(
                    "conflict",
                    "pod",
                    format!("pod {pod:?} is being decommissioned"),
                );
            }
            let all: Vec<String> = svc
                .spec
                .pod_type(&p.pod_type)
                .map(|t| {
                    t.tasks
                        .iter()
                        // A plan's own tasks (a backup) run only when the plan does.
                        .filter(|k| k.goal != super::model::TaskGoal::OnDemand)
                        .map(|k| k.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            let tasks = if tasks.is_empty() || replace {
                all
            } else {
                tasks
            };
            if !svc.plans.contains_key("recovery") {
                let r = recovery_plan(svc, at);
                svc.plans.insert(r.name.clone(), r);
            }
            let plan = svc.plans.get_mut("recovery").expect("inserted");
            let phase = &mut plan.phases[0];
            let work = if replace {
                StepWork::Replace
            } else {
                StepWork::Launch
            };
            let mut step = Step::new(&pod, work, tasks, None);
            step.message = message.clone();
            step.updated_at = at;
            let existing = phase.steps.iter().position(|s| s.name == pod);
            if let Some(i) = existing {
                let s = &mut phase.steps[i];
                if s.status != StepStatus::Complete {
                    return fail(
                        "conflict",
                        "pod",
                        format!("recovery of {pod:?} is under way ({:?})", s.status),
                    );
                }
                step.history = std::mem::take(&mut s.history);
            }
            step.history.push(super::plan::StepChange {
                status: StepStatus::Pending,
                at,
                message,
            });
            if step.history.len() > super::plan::STEP_HISTORY_KEPT {
                step.history.remove(0);
            }
            match existing {
                Some(i) => phase.steps[i] = step,
                None => phase.steps.push(step),
            }
            plan.updated_at = at;
        }
        ServiceOp::Plan { plan, op } => {
            let Some(p) = svc.plans.get_mut(&plan) else {
                return fail("not_found", "plan", format!("no plan {plan:?}"));
            };
            p.operate(&op, at).or_else(|m| fail("invalid", "op", m))?;
        }
        ServiceOp::StartPlan { plan, params } => {
            if let Some(p) = svc.plans.get(&plan) {
                use super::plan::PlanStatus;
                if !matches!(p.status(), PlanStatus::Complete | PlanStatus::Error) {
                    return fail(
                        "conflict",
                        "plan",
                        format!("plan {plan:?} is {:?}; interrupt it or wait", p.status()),
                    );
                }
            }
            let new = if plan == "deploy" {
                deploy_plan(svc, at)
            } else if let Some(def) = svc.spec.plans.iter().find(|d| d.name == plan) {
                custom_plan(svc, def, params, at)
            } else {
                return fail(
                    "not_found",
                    "plan",
                    format!(
                        "no declared plan {plan:?} (recovery and decommission start by themselves)"
                    ),
                );
            };
            svc.plans.insert(plan, new);
        }
        ServiceOp::Failover { endpoint, to, .. } => failover(svc, &endpoint, &to, at)?,
        ServiceOp::VolumesDestroyed { agent, ids } => {
            for id in ids {
                if svc
                    .volumes
                    .get(&id)
                    .is_some_and(|v| v.agent == agent && v.status == VolumeStatus::Destroying)
                {
                    svc.volumes.remove(&id);
                }
            }
        }
    }
    svc.updated_at = svc.updated_at.max(at);
    Ok(())
}

/// What entering `to` does to the step's pod.
fn step_effects(svc: &mut ServiceState, work: StepWork, pod: &str, to: StepStatus) {
    match (work, to) {
        (StepWork::Replace, StepStatus::Prepared) => replace_pod(svc, pod),
        (StepWork::Decommission, StepStatus::Starting) => {
            if let Some(p) = svc.pods.get_mut(pod) {
                p.stopping = true;
            }
        }
        (StepWork::Decommission, StepStatus::Started | StepStatus::Complete) => {
            let ids = svc
                .pods
                .get(pod)
                .map(|p| p.volumes.clone())
                .unwrap_or_default();
            for id in ids {
                if let Some(v) = svc.volumes.get_mut(&id) {
                    v.status = VolumeStatus::Destroying;
                }
            }
            if to == StepStatus::Complete {
                svc.pods.remove(pod);
            }
        }
        _ => {}
    }
}

/// The plan whose active step holds `pod` (no other plan may start a step on it).
pub fn holder(svc: &ServiceState, pod: &str) -> Option<(String, PlanKind)> {
    svc.plans.values().find_map(|p| {
        p.phases
            .iter()
            .flat_map(|ph| ph.steps.iter())
            .any(|s| s.pod == pod && s.status.is_active())
            .then(|| (p.name.clone(), p.kind))
    })
}

/// One line about a spec, for events: pod types and counts.
pub fn summary(s: &StatefulService) -> String {
    s.pod_types
        .iter()
        .map(|t| format!("{} × {}", t.count, t.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An op's event kind and detail.
pub fn describe(op: &ServiceOp) -> (&'static str, String) {
    match op {
        ServiceOp::PlacePod { pod, agent, .. } => ("pod_placed", format!("{pod} on agent {agent}")),
        ServiceOp::Step {
            plan, to, message, ..
        } => (
            "step",
            format!("{plan}: {}: {message}", format!("{to:?}").to_lowercase()),
        ),
        ServiceOp::Launch { plan, tasks, .. } => {
            let t: Vec<&str> = tasks.iter().map(|l| l.task.as_str()).collect();
            ("launch", format!("{plan}: {}", t.join(", ")))
        }
        ServiceOp::Recover {
            pod,
            replace,
            message,
            ..
        } => (
            if *replace {
                "pod_replace"
            } else {
                "pod_restart"
            },
            format!("{pod}: {message}"),
        ),
        ServiceOp::Plan { plan, op } => ("plan_operation", format!("{plan}: {op:?}")),
        ServiceOp::StartPlan { plan, params } if params.is_empty() => {
            ("plan_started", plan.clone())
        }
        ServiceOp::StartPlan { plan, params } => ("plan_started", format!("{plan} {params:?}")),
        ServiceOp::VolumesDestroyed { agent, ids } => (
            "volumes_destroyed",
            format!("agent {agent}: {}", ids.join(", ")),
        ),
        ServiceOp::Failover {
            endpoint,
            to,
            message,
        } => ("failover", format!("{endpoint} → {to}: {message}")),
    }
}
