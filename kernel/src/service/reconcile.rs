//! The plan engine's decision function: `reconcile_service(&ServiceState, &Observed, now)`
//! says what to do next for one stateful service — place a pod, move a step, launch tasks,
//! start a recovery — as `Action`s the leader turns into commands (`ServiceOp`s). Pure: the
//! plan is replicated data and the observations come in, so a new leader running it on the
//! same state continues where the old one stopped and never redoes a completed step.
//!
//! Messages hold no clock readings ("readiness check failing: ..."): the step's `updated_at`
//! says since when, so an unchanged situation proposes nothing.

use super::model::{PodInstance, PodType, ServiceState, TaskGoal};
use super::ops::{holder, Launch, ServiceOp};
use super::plan::{Phase, Plan, PlanKind, Step, StepStatus, StepWork};
use crate::model::TaskState;
use std::collections::{BTreeMap, BTreeSet};

/// What the leader hears about an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentFact {
    pub active: bool,
    /// Since when (leader's clock) it has been in that status.
    pub since: u64,
}

/// An agent's latest report of one pod task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFact {
    pub agent: String,
    /// The launch generation the report is about.
    pub generation: u64,
    pub state: TaskState,
    /// The readiness check passes (tasks without one: running).
    pub ready: bool,
    /// Why it ended, or what the readiness check says.
    pub message: String,
}

/// Observed facts: agents by id (an agent missing here is gone), task reports by pod id then
/// task name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub agents: BTreeMap<String, AgentFact>,
    pub tasks: BTreeMap<String, BTreeMap<String, TaskFact>>,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Ask the scheduler for an agent for this incarnation of the pod (its pod type's
    /// constraints, role, the sum of its tasks' resources plus its volumes' disk), then
    /// commit `ServiceOp::PlacePod`.
    PlacePod { pod: String, incarnation: u32 },
    /// Commit as is.
    Op(ServiceOp),
}

/// Where one task of a running step stands.
enum Progress {
    /// Finished (`finish`/`once`) or ready (`running`).
    Done,
    /// Running, not yet done; the reason.
    Up(String),
    /// Not running yet; the reason.
    Waiting(String),
    Failed(String),
}

fn plan_order(kind: PlanKind) -> u8 {
    match kind {
        PlanKind::Decommission => 0,
        PlanKind::Failover => 1,
        PlanKind::Recovery => 2,
        PlanKind::Deploy => 3,
        PlanKind::Custom => 4,
    }
}

/// Decides the next actions for one service.
pub fn reconcile_service(svc: &ServiceState, obs: &Observed, now: u64) -> Vec<Action> {
    let mut cx = Cx {
        svc,
        obs,
        now,
        out: Vec::new(),
        claimed: svc
            .pods
            .keys()
            .filter(|p| holder(svc, p).is_some())
            .cloned()
            .collect(),
    };
    let mut plans: Vec<&Plan> = svc.plans.values().collect();
    plans.sort_by_key(|p| plan_order(p.kind));
    for plan in plans {
        let Some(pi) = plan.current_phase() else {
            continue;
        };
        let phase = &plan.phases[pi];
        for si in phase.runnable() {
            cx.step(plan, pi, phase, si);
        }
    }
    cx.recover();
    cx.failover();
    cx.out
}

struct Cx<'a> {
    svc: &'a ServiceState,
    obs: &'a Observed,
    now: u64,
    out: Vec<Action>,
    /// Pods held by an active step (or claimed by one starting in this pass).
    claimed: BTreeSet<String>,
}

impl Cx<'_> {
    fn to(&mut self, plan: &Plan, pi: usize, si: usize, to: StepStatus, message: String) {
        let s = &plan.phases[pi].steps[si];
        if s.status == to && s.message == message {
            return;
        }
        self.out.push(Action::Op(ServiceOp::Step {
            plan: plan.name.clone(),
            phase: pi,
            step: si,
            from: s.status,
            to,
            message,
        }));
    }

    fn step(&mut self, plan: &Plan, pi: usize, phase: &Phase, si: usize) {
        let s = &phase.steps[si];
        let Some(pod) = self.svc.pods.get(&s.pod) else {
            if s.status != StepStatus::Error {
                let m = format!("pod {} does not exist", s.pod);
                self.to(plan, pi, si, StepStatus::Error, m);
            }
            return;
        };
        let Some(ptype) = self.svc.spec.pod_type(&pod.pod_type) else {
            return;
        };
        match s.status {
            StepStatus::Pending => {
                if plan.interrupted || self.claimed.contains(&pod.id) {
                    return;
                }
                if phase.gated(si) {
                    let done = phase.steps[..si]
                        .iter()
                        .filter(|s| s.status == StepStatus::Complete)
                        .count();
                    let m = format!("canary: {done} step(s) done; waiting for `continue`");
                    return self.to(plan, pi, si, StepStatus::Waiting, m);
                }
                // A step run before (restarted) always launches again.
                if plan.kind == PlanKind::Deploy && s.history.is_empty() && self.up_to_date(pod, s)
                {
                    let v = self
                        .svc
                        .type_versions
                        .get(&pod.pod_type)
                        .copied()
                        .unwrap_or(0);
                    let m = format!("{} already runs version {v}", pod.id);
                    return self.to(plan, pi, si, StepStatus::Complete, m);
                }
                self.claimed.insert(pod.id.clone());
                let m = match s.work {
                    StepWork::Launch => format!("preparing {}", pod.id),
                    StepWork::Replace => {
                        format!("replacing {}: a new agent, fresh volumes", pod.id)
                    }
                    StepWork::Decommission => format!("decommissioning {}", pod.id),
                };
                self.to(plan, pi, si, StepStatus::Prepared, m);
            }
            StepStatus::Prepared if s.work == StepWork::Decommission => {
                let m = format!("stopping the tasks of {}", pod.id);
                self.to(plan, pi, si, StepStatus::Starting, m);
            }
            StepStatus::Prepared => match &pod.agent {
                None => {
                    self.out.push(Action::PlacePod {
                        pod: pod.id.clone(),
                        incarnation: pod.incarnation,
                    });
                    let m = format!("waiting for an agent for {}", pod.id);
                    self.to(plan, pi, si, StepStatus::Prepared, m);
                }
                Some(a) => {
                    let m = format!(
                        "launching {} of {} on agent {a}",
                        s.tasks.join(", "),
                        pod.id
                    );
                    self.to(plan, pi, si, StepStatus::Starting, m);
                }
            },
            StepStatus::Starting | StepStatus::Started if s.work == StepWork::Decommission => {
                self.decommission(plan, pi, si, pod)
            }
            StepStatus::Starting | StepStatus::Started => {
                self.running(plan, pi, phase, si, pod, ptype)
            }
            StepStatus::Waiting | StepStatus::Error | StepStatus::Complete => {}
        }
    }

    /// A deploy step has nothing to do: every task it would launch already runs its pod
    /// type's current version (`once` tasks: launched at all in this incarnation).
    fn up_to_date(&self, pod: &PodInstance, s: &Step) -> bool {
        let v = self
            .svc
            .type_versions
            .get(&pod.pod_type)
            .copied()
            .unwrap_or(0);
        pod.agent.is_some()
            && s.tasks.iter().all(|t| match pod.tasks.get(t) {
                Some(target) => target.goal == TaskGoal::Once || target.version >= v,
                None => false,
            })
    }

    fn fact(&self, pod: &PodInstance, task: &str, generation: u64) -> Option<&TaskFact> {
        self.obs
            .tasks
            .get(&pod.id)?
            .get(task)
            .filter(|f| f.generation == generation && Some(&f.agent) == pod.agent.as_ref())
    }

    fn progress(&self, pod: &PodInstance, goal: TaskGoal, task: &str, gen: u64) -> Progress {
        let name = format!("{task} of {}", pod.id);
        let Some(f) = self.fact(pod, task, gen) else {
            return Progress::Waiting(format!("{name} not reported by its agent yet"));
        };
        let why = |what: &str| {
            if f.message.is_empty() {
                format!("{name} {what}")
            } else {
                format!("{name} {what}: {}", f.message)
            }
        };
        match (goal, f.state) {
            (_, TaskState::Staging | TaskState::Starting) => Progress::Waiting(why("starting")),
            (_, TaskState::Unreachable) => Progress::Waiting(why("is on an unreachable agent")),
            (_, TaskState::Killing) => Progress::Waiting(why("is being killed")),
            (TaskGoal::Running, TaskState::Running) if f.ready => Progress::Done,
            (TaskGoal::Running, TaskState::Running) => {
                Progress::Up(why("running; readiness check failing"))
            }
            (_, TaskState::Running) => Progress::Up(why("running")),
            (TaskGoal::Finish | TaskGoal::Once | TaskGoal::OnDemand, TaskState::Finished) => {
                Progress::Done
            }
            (_, st) => Progress::Failed(why(&format!("{st:?}").to_lowercase())),
        }
    }

    /// A launch step in `starting` or `started`: launch the next stage, relaunch failures,
    /// move on when everything runs, complete when everything is done.
    fn running(
        &mut self,
        plan: &Plan,
        pi: usize,
        phase: &Phase,
        si: usize,
        pod: &PodInstance,
        ptype: &PodType,
    ) {
        let s = &phase.steps[si];
        let mut failed = Vec::new();
        let mut pending_finish = false;
        let mut not_done: Option<String> = None;
        let mut all_up = true;
        let mut unlaunched = Vec::new();
        for name in &s.tasks {
            let Some(task) = ptype.task(name) else {
                continue;
            };
            let Some(&gen) = s.launched.get(name) else {
                // A `once` task launched before in this incarnation is not run again.
                if !(task.goal == TaskGoal::Once && pod.tasks.contains_key(name)) {
                    unlaunched.push(task);
                }
                continue;
            };
            match self.progress(pod, task.goal, name, gen) {
                Progress::Done => {}
                Progress::Up(m) => {
                    pending_finish |= task.goal != TaskGoal::Running;
                    not_done.get_or_insert(m);
                }
                Progress::Waiting(m) => {
                    pending_finish |= task.goal != TaskGoal::Running;
                    all_up = false;
                    not_done.get_or_insert(m);
                }
                Progress::Failed(m) => failed.push((name.clone(), m)),
            }
        }
        // Recovery steps (one phase for every pod type) take their pod type's deadline.
        let deadline_ms = match (phase.deadline_ms, plan.kind) {
            (0, PlanKind::Recovery) => ptype.deadline_ms,
            (d, _) => d,
        };
        let started_at = s.started_at.unwrap_or(s.updated_at);
        let late = deadline_ms > 0 && self.now >= started_at + deadline_ms;
        let deadline = humantime::format_duration(std::time::Duration::from_millis(deadline_ms));
        if let Some((_, why)) = failed.first() {
            if why.contains(super::driver::TEMPLATE_ERROR) {
                return self.to(plan, pi, si, StepStatus::Error, why.clone());
            }
            if late {
                let m = format!("{why}; not done within {deadline}");
                return self.to(plan, pi, si, StepStatus::Error, m);
            }
            // Relaunch after a backoff from the last launch, growing with the attempts.
            let wait = failed
                .iter()
                .filter_map(|(t, _)| {
                    let n = s.attempts.get(t).copied().unwrap_or(1);
                    let at = pod.tasks.get(t)?.launched_at + super::plan::relaunch_delay_ms(n);
                    (at > self.now).then_some(n)
                })
                .max();
            if let Some(n) = wait {
                // A message that stays the same while it waits (no write per pass).
                let m = format!(
                    "{why}; launching it again {} s after the last launch (attempt {})",
                    super::plan::relaunch_delay_ms(n) as f64 / 1000.0,
                    n + 1
                );
                return self.to(plan, pi, si, s.status, m);
            }
            let tasks = failed.iter().map(|(t, _)| self.launch(pod, s, t)).collect();
            self.out.push(Action::Op(ServiceOp::Launch {
                plan: plan.name.clone(),
                phase: pi,
                step: si,
                tasks,
            }));
            let m = format!("{why}; launching it again");
            return self.to(plan, pi, si, StepStatus::Starting, m);
        }
        if late && (not_done.is_some() || !unlaunched.is_empty()) {
            let why = not_done.unwrap_or_else(|| format!("{} not launched", unlaunched[0].name));
            let m = format!("not done within {deadline}: {why}");
            return self.to(plan, pi, si, StepStatus::Error, m);
        }
        if !unlaunched.is_empty() {
            if pending_finish {
                let m = not_done.unwrap_or_default();
                return self.to(plan, pi, si, s.status, m);
            }
            // The next stage: up to and including the first `finish`/`once` task.
            let end = unlaunched
                .iter()
                .position(|t| t.goal != TaskGoal::Running)
                .map_or(unlaunched.len(), |i| i + 1);
            let tasks = unlaunched[..end]
                .iter()
                .map(|t| self.launch(pod, s, &t.name))
                .collect();
            self.out.push(Action::Op(ServiceOp::Launch {
                plan: plan.name.clone(),
                phase: pi,
                step: si,
                tasks,
            }));
            return;
        }
        match (s.status, not_done) {
            (StepStatus::Started, None) => {
                let m = format!("{} done", pod.id);
                self.to(plan, pi, si, StepStatus::Complete, m);
            }
            (StepStatus::Starting, None) => {
                let m = format!("{} running; checking readiness", pod.id);
                self.to(plan, pi, si, StepStatus::Started, m);
            }
            (StepStatus::Starting, Some(_)) if all_up => {
                let m = format!("{} running; waiting for readiness", pod.id);
                self.to(plan, pi, si, StepStatus::Started, m);
            }
            (st, Some(m)) => self.to(plan, pi, si, st, m),
            _ => {}
        }
    }

    fn launch(&self, pod: &PodInstance, s: &Step, task: &str) -> Launch {
        let current = pod.tasks.get(task);
        let type_version = self.svc.type_versions.get(&pod.pod_type).copied();
        Launch {
            task: task.to_string(),
            version: s
                .version
                .or(current.map(|t| t.version))
                .or(type_version)
                .unwrap_or(self.svc.version),
            seen: current.map(|t| t.generation),
        }
    }

    fn decommission(&mut self, plan: &Plan, pi: usize, si: usize, pod: &PodInstance) {
        let s = &plan.phases[pi].steps[si];
        if s.status == StepStatus::Starting {
            let live = self.obs.tasks.get(&pod.id).and_then(|ts| {
                ts.iter()
                    .find(|(_, f)| Some(&f.agent) == pod.agent.as_ref() && !f.state.is_terminal())
            });
            let m = match live {
                Some((t, f)) => format!("waiting for {t} of {} to stop ({:?})", pod.id, f.state),
                None => {
                    let m = format!("destroying the volumes of {}", pod.id);
                    return self.to(plan, pi, si, StepStatus::Started, m);
                }
            };
            return self.to(plan, pi, si, StepStatus::Starting, m);
        }
        let left: Vec<&str> = pod
            .volumes
            .iter()
            .filter(|v| self.svc.volumes.contains_key(*v))
            .map(String::as_str)
            .collect();
        if left.is_empty() {
            let m = format!("{} removed", pod.id);
            self.to(plan, pi, si, StepStatus::Complete, m);
        } else {
            let agent = pod.agent.as_deref().unwrap_or("?");
            let m = format!("waiting for agent {agent} to destroy {}", left.join(", "));
            self.to(plan, pi, si, StepStatus::Started, m);
        }
    }

    /// `[failover]`: the endpoint's pod has had its agent unreachable, or has been failing in
    /// an unfinished recovery step, for `after`: move the endpoint to the lowest-index pod of
    /// the same type whose failover tasks are all ready on an active agent. Not while the
    /// previous failover is still promoting, and not to nowhere (no ready pod: it waits).
    fn failover(&mut self) {
        let Some(f) = &self.svc.spec.failover else {
            return;
        };
        let Some(cur) = self.svc.spec.endpoints.get(&f.endpoint) else {
            return;
        };
        let Some(pod) = self.svc.pods.get(cur) else {
            return;
        };
        if let Some(p) = self.svc.plans.get("failover") {
            let promoting = !p.phases.first().is_some_and(|ph| ph.is_complete());
            if promoting && p.status() != super::plan::PlanStatus::Error {
                return;
            }
        }
        let Some(agent) = &pod.agent else {
            return;
        };
        let down = match self.obs.agents.get(agent) {
            Some(a) if a.active => self.failing_since(&pod.id).map(|t| (t, "failing")),
            Some(a) => Some((a.since, "on an unreachable agent")),
            None => Some((0, "on a removed agent")),
        };
        let Some((since, why)) = down else {
            return;
        };
        if self.now < since.saturating_add(f.after_ms) {
            return;
        }
        let ready = |p: &&PodInstance| {
            p.pod_type == pod.pod_type
                && p.id != pod.id
                && !p.stopping
                && p.agent
                    .as_ref()
                    .is_some_and(|a| self.obs.agents.get(a).is_some_and(|f| f.active))
                && f.tasks.iter().all(|t| {
                    p.tasks.get(t).is_some_and(|target| {
                        matches!(
                            self.progress(p, TaskGoal::Running, t, target.generation),
                            Progress::Done
                        )
                    })
                })
        };
        let Some(to) = self.svc.pods.values().filter(ready).min_by_key(|p| p.index) else {
            return;
        };
        let d = humantime::format_duration(std::time::Duration::from_millis(f.after_ms));
        self.out.push(Action::Op(ServiceOp::Failover {
            endpoint: f.endpoint.clone(),
            to: to.id.clone(),
            message: format!("{} {why} for {d}: {} takes over", pod.id, to.id),
        }));
    }

    /// Since when a pod has been in an unfinished `recovery` step (its tasks failing).
    fn failing_since(&self, pod: &str) -> Option<u64> {
        let plan = self.svc.plans.get("recovery")?;
        plan.phases
            .iter()
            .flat_map(|ph| ph.steps.iter())
            .find(|s| s.pod == pod && s.status != StepStatus::Complete)
            .map(|s| s.history.first().map_or(s.updated_at, |h| h.at))
    }

    /// Pods no step holds: restart failed `running` tasks in place; replace a pod whose agent
    /// has been unreachable for its type's `replace_after` (never otherwise: no duplicates).
    /// A pod with an unfinished recovery step, or a step in `error` in any plan, is left to
    /// that step (an operator restarts or force-completes it).
    fn recover(&mut self) {
        let recovering: BTreeSet<&str> = self
            .svc
            .plans
            .values()
            .flat_map(|p| {
                let recovery = p.kind == PlanKind::Recovery;
                p.phases
                    .iter()
                    .flat_map(|ph| ph.steps.iter())
                    .filter(move |s| match s.status {
                        StepStatus::Error => true,
                        StepStatus::Complete => false,
                        _ => recovery,
                    })
            })
            .map(|s| s.pod.as_str())
            .collect();
        for pod in self.svc.pods.values() {
            let Some(agent) = &pod.agent else {
                continue;
            };
            if pod.stopping || self.claimed.contains(&pod.id) || recovering.contains(&*pod.id) {
                continue;
            }
            let Some(ptype) = self.svc.spec.pod_type(&pod.pod_type) else {
                continue;
            };
            let fact = self.obs.agents.get(agent);
            if !fact.is_some_and(|a| a.active) {
                let Some(after) = ptype.replace_after_ms else {
                    continue;
                };
                let since = fact.map_or(0, |a| a.since);
                if self.now >= since + after {
                    let d = humantime::format_duration(std::time::Duration::from_millis(after));
                    self.out.push(Action::Op(ServiceOp::Recover {
                        pod: pod.id.clone(),
                        tasks: Vec::new(),
                        replace: true,
                        message: format!(
                            "agent {agent} of {} unreachable for {d} (replace_after): replacing the pod",
                            pod.id
                        ),
                    }));
                }
                continue;
            }
            let mut failed = Vec::new();
            let mut why = String::new();
            for (name, target) in &pod.tasks {
                if target.goal != TaskGoal::Running {
                    continue;
                }
                if let Progress::Failed(m) =
                    self.progress(pod, target.goal, name, target.generation)
                {
                    failed.push(name.clone());
                    if why.is_empty() {
                        why = m;
                    }
                }
            }
            if !failed.is_empty() {
                self.out.push(Action::Op(ServiceOp::Recover {
                    pod: pod.id.clone(),
                    tasks: failed,
                    replace: false,
                    message: format!("{why}: restarting in place"),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests;
