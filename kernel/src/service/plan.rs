//! Plans → phases → steps: the pure data of a stateful service's progress, the one step
//! lifecycle (`StepStatus::can_transition`), phase strategies, operator operations
//! (interrupt, continue, force-complete, restart) and the built-in plans (`deploy`,
//! `recovery`, `decommission`) plus declared ones. A plan is plain replicated data: a new
//! leader given the persisted plan continues it (see `service::reconcile`).
//!
//! Nothing here reads a clock: every change takes `at` (the proposer's Unix ms).

use super::model::{PhaseStrategy, PlanDef, ServiceState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A step's lifecycle: pending → prepared → starting → started → complete, or waiting (held
/// for an operator's `continue`) or error (needs `restart` or `force-complete`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Prepared,
    Starting,
    Started,
    Complete,
    Waiting,
    Error,
}

impl StepStatus {
    pub const ALL: [StepStatus; 7] = [
        StepStatus::Pending,
        StepStatus::Prepared,
        StepStatus::Starting,
        StepStatus::Started,
        StepStatus::Complete,
        StepStatus::Waiting,
        StepStatus::Error,
    ];

    /// The one transition function of the step lifecycle. `Complete` is reachable from every
    /// other status (force-complete, or nothing to do); every status returns to `Pending` by
    /// `restart` (and `continue` of a waiting step).
    pub fn can_transition(self, to: StepStatus) -> bool {
        use StepStatus::*;
        if self == to {
            return false;
        }
        match (self, to) {
            (_, Pending) => self != Pending,
            (Complete, _) => false,
            (_, Complete) => true,
            (Pending, Prepared | Waiting | Error) => true,
            (Prepared, Starting | Error) => true,
            (Starting, Started | Error) => true,
            // A task of a started step ended: it is launched again.
            (Started, Starting | Error) => true,
            _ => false,
        }
    }

    /// The step holds its pod (no other plan may work on it meanwhile).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            StepStatus::Prepared | StepStatus::Starting | StepStatus::Started
        )
    }
}

/// What a step does to its pod instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepWork {
    /// Place the pod if needed, launch `tasks` (restart in place), wait until the `running`
    /// ones are ready and the `finish`/`once` ones finished.
    Launch,
    /// Give the pod a new incarnation (fresh agent and volumes; old volumes destroyed), then
    /// launch like `Launch`.
    Replace,
    /// Stop the pod's tasks, destroy its volumes, remove it.
    Decommission,
}

/// One recorded status change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepChange {
    pub status: StepStatus,
    pub at: u64,
    pub message: String,
}

/// How many status changes a step keeps.
pub const STEP_HISTORY_KEPT: usize = 32;

/// One step: one pod instance, some of its tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The pod instance's id (unique within the phase).
    pub name: String,
    pub pod: String,
    pub work: StepWork,
    /// Tasks to launch, in order (a `finish`/`once` task finishes before later ones launch).
    pub tasks: Vec<String>,
    /// Version the tasks are launched at (`None`: each keeps the version it runs).
    pub version: Option<u64>,
    pub status: StepStatus,
    /// What the step does or waits on, for people.
    pub message: String,
    /// When the status (or message) last changed.
    pub updated_at: u64,
    /// When the step last entered `starting` from `prepared` (its deadline counts from here).
    pub started_at: Option<u64>,
    /// Tasks launched in this attempt, with the generation they were launched at.
    pub launched: BTreeMap<String, u64>,
    /// Launches of each task in this attempt: a failed task is relaunched after a backoff
    /// growing with them (`relaunch_delay_ms`), never in a tight loop.
    pub attempts: BTreeMap<String, u32>,
    pub history: Vec<StepChange>,
}

/// How long after its last launch a task that failed `attempts` launches in a row is
/// launched again: 0.5 s, doubling, at most 30 s.
pub fn relaunch_delay_ms(attempts: u32) -> u64 {
    (500u64 << attempts.saturating_sub(1).min(6)).min(30_000)
}

impl Step {
    pub fn new(pod: &str, work: StepWork, tasks: Vec<String>, version: Option<u64>) -> Step {
        Step {
            name: pod.to_string(),
            pod: pod.to_string(),
            work,
            tasks,
            version,
            status: StepStatus::Pending,
            message: String::new(),
            updated_at: 0,
            started_at: None,
            launched: BTreeMap::new(),
            attempts: BTreeMap::new(),
            history: Vec::new(),
        }
    }

    /// Moves the step (checked by `can_transition`), recording the time and message. Moving
    /// to the same status only replaces the message.
    pub fn transition(&mut self, to: StepStatus, at: u64, message: &str) -> Result<(), String> {
        if to == self.status {
            self.message = message.to_string();
            self.updated_at = at;
            return Ok(());
        }
        if !self.status.can_transition(to) {
            return Err(format!(
                "step {:?} cannot go from {:?} to {:?}",
                self.name, self.status, to
            ));
        }
        if self.status == StepStatus::Prepared && to == StepStatus::Starting {
            self.started_at = Some(at);
        }
        if to == StepStatus::Pending {
            self.started_at = None;
            self.launched.clear();
            self.attempts.clear();
        }
        self.status = to;
        self.message = message.to_string();
        self.updated_at = at;
        self.history.push(StepChange {
            status: to,
            at,
            message: message.to_string(),
        });
        if self.history.len() > STEP_HISTORY_KEPT {
            self.history.remove(0);
        }
        Ok(())
    }
}

/// A phase: steps run by a strategy; phases of a plan run one after the other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub pod_type: String,
    pub strategy: PhaseStrategy,
    /// A step not complete this long after it started ends in `error` (0: no deadline).
    pub deadline_ms: u64,
    /// A canary phase got its `continue`.
    pub released: bool,
    pub steps: Vec<Step>,
}

impl Phase {
    pub fn is_complete(&self) -> bool {
        self.steps.iter().all(|s| s.status == StepStatus::Complete)
    }

    /// The steps the engine may work on now, by the phase's strategy. A serial phase works on
    /// its first unfinished step only (an errored one blocks it).
    pub fn runnable(&self) -> Vec<usize> {
        let open = |i: &usize| self.steps[*i].status != StepStatus::Complete;
        match self.strategy {
            PhaseStrategy::Parallel => (0..self.steps.len()).filter(open).collect(),
            PhaseStrategy::Serial | PhaseStrategy::Canary(_) => {
                (0..self.steps.len()).find(open).into_iter().collect()
            }
        }
    }

    /// Whether step `i` must wait for an operator's `continue` before it starts.
    pub fn gated(&self, i: usize) -> bool {
        matches!(self.strategy, PhaseStrategy::Canary(n) if i >= n as usize && !self.released)
    }
}

/// Which kind of plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    Deploy,
    Recovery,
    Decommission,
    /// An endpoint moved to another pod (`failover`): its pod takes the role, then the
    /// others follow.
    Failover,
    /// Declared in the service spec.
    Custom,
}

/// A plan's overall status, derived from its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Pending,
    InProgress,
    /// A canary gate waits for `continue`.
    Waiting,
    /// Interrupted by an operator: no new step starts until `continue`.
    Interrupted,
    Complete,
    Error,
}

/// A plan: phases of steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub kind: PlanKind,
    /// The service version the plan was made for.
    pub version: u64,
    pub phases: Vec<Phase>,
    pub interrupted: bool,
    pub created_at: u64,
    pub updated_at: u64,
    /// What the run was started with (`cairn service restore --from ID`: `from`); the tasks
    /// it launches see them as `CAIRN_PARAM_<KEY>`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// An operator's operation on a plan (steps named by phase and step name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanOp {
    /// No new step starts; steps under way finish.
    Interrupt,
    /// Undo `interrupt` and release the current phase's canary gate.
    Continue,
    ForceComplete {
        phase: String,
        step: String,
    },
    /// Run the step again from `pending` (its tasks are launched afresh).
    Restart {
        phase: String,
        step: String,
    },
}

impl Plan {
    /// The first phase not complete (`None`: the plan is complete).
    pub fn current_phase(&self) -> Option<usize> {
        self.phases.iter().position(|p| !p.is_complete())
    }

    pub fn status(&self) -> PlanStatus {
        let Some(i) = self.current_phase() else {
            return PlanStatus::Complete;
        };
        let phase = &self.phases[i];
        let any = |s: StepStatus| phase.steps.iter().any(|x| x.status == s);
        if any(StepStatus::Error) {
            PlanStatus::Error
        } else if self.interrupted {
            PlanStatus::Interrupted
        } else if any(StepStatus::Waiting) {
            PlanStatus::Waiting
        } else if self
            .phases
            .iter()
            .all(|p| p.steps.iter().all(|s| s.status == StepStatus::Pending))
        {
            PlanStatus::Pending
        } else {
            PlanStatus::InProgress
        }
    }

    /// Finds a step by phase and step name.
    pub fn find(&self, phase: &str, step: &str) -> Result<(usize, usize), String> {
        let p = self
            .phases
            .iter()
            .position(|p| p.name == phase)
            .ok_or_else(|| format!("plan {:?} has no phase {phase:?}", self.name))?;
        let s = self.phases[p]
            .steps
            .iter()
            .position(|s| s.name == step)
            .ok_or_else(|| format!("phase {phase:?} has no step {step:?}"))?;
        Ok((p, s))
    }

    /// Applies an operator's operation. Errors name what is wrong.
    pub fn operate(&mut self, op: &PlanOp, at: u64) -> Result<(), String> {
        match op {
            PlanOp::Interrupt => self.interrupted = true,
            PlanOp::Continue => {
                self.interrupted = false;
                if let Some(i) = self.current_phase() {
                    let phase = &mut self.phases[i];
                    phase.released = true;
                    for s in &mut phase.steps {
                        if s.status == StepStatus::Waiting {
                            s.transition(StepStatus::Pending, at, "continued by an operator")?;
                        }
                    }
                }
            }
            PlanOp::ForceComplete { phase, step } => {
                let (p, s) = self.find(phase, step)?;
                self.phases[p].steps[s].transition(
                    StepStatus::Complete,
                    at,
                    "force-completed by an operator",
                )?;
            }
            PlanOp::Restart { phase, step } => {
                let (p, s) = self.find(phase, step)?;
                self.phases[p].steps[s].transition(
                    StepStatus::Pending,
                    at,
                    "restarted by an operator",
                )?;
            }
        }
        self.updated_at = at;
        Ok(())
    }
}

fn plan(name: &str, kind: PlanKind, version: u64, phases: Vec<Phase>, at: u64) -> Plan {
    Plan {
        name: name.into(),
        kind,
        version,
        phases,
        interrupted: false,
        created_at: at,
        updated_at: at,
        params: BTreeMap::new(),
    }
}

/// The `deploy` plan for the service's current spec: a phase per pod type (in spec order)
/// with a step per pod instance, by the pod type's strategy (serial by default), every task
/// launched at the current version. Steps of pods already at their type's version complete
/// at once (a change to one pod type restarts no other).
pub fn deploy_plan(svc: &ServiceState, at: u64) -> Plan {
    let phases = svc
        .spec
        .pod_types
        .iter()
        .map(|t| Phase {
            name: t.name.clone(),
            pod_type: t.name.clone(),
            strategy: t.deploy,
            deadline_ms: t.deadline_ms,
            released: false,
            steps: (0..t.count)
                .map(|i| {
                    let tasks = t
                        .tasks
                        .iter()
                        .filter(|k| k.goal != super::model::TaskGoal::OnDemand)
                        .map(|k| k.name.clone())
                        .collect();
                    let pod = super::model::PodInstance::id_of(&t.name, i);
                    Step::new(&pod, StepWork::Launch, tasks, Some(svc.version))
                })
                .collect(),
        })
        .collect();
    plan("deploy", PlanKind::Deploy, svc.version, phases, at)
}

/// The `decommission` plan: every pod instance beyond its type's count, highest index first,
/// one at a time (`None`: nothing to decommission).
pub fn decommission_plan(svc: &ServiceState, at: u64) -> Option<Plan> {
    let mut phases = Vec::new();
    for t in &svc.spec.pod_types {
        let mut extra: Vec<&super::model::PodInstance> = svc
            .pods
            .values()
            .filter(|p| p.pod_type == t.name && p.index >= t.count)
            .collect();
        if extra.is_empty() {
            continue;
        }
        extra.sort_by_key(|p| std::cmp::Reverse(p.index));
        phases.push(Phase {
            name: t.name.clone(),
            pod_type: t.name.clone(),
            strategy: PhaseStrategy::Serial,
            deadline_ms: 0,
            released: false,
            steps: extra
                .iter()
                .map(|p| Step::new(&p.id, StepWork::Decommission, Vec::new(), None))
                .collect(),
        });
    }
    (!phases.is_empty()).then(|| {
        plan(
            "decommission",
            PlanKind::Decommission,
            svc.version,
            phases,
            at,
        )
    })
}

/// An empty `recovery` plan (one parallel phase; steps are added per pod as pods fail).
pub fn recovery_plan(svc: &ServiceState, at: u64) -> Plan {
    let phase = Phase {
        name: "recovery".into(),
        pod_type: String::new(),
        strategy: PhaseStrategy::Parallel,
        deadline_ms: 0,
        released: false,
        steps: Vec::new(),
    };
    plan("recovery", PlanKind::Recovery, svc.version, vec![phase], at)
}

/// The `failover` plan after an endpoint moved to pod `to`: phase `promote` relaunches
/// `tasks` in `to` (it reads the endpoint at launch and takes the role), then phase `follow`
/// relaunches them in every other pod of its type at once (each follows the new pod; one on
/// an unreachable agent waits for it without holding up the others). Tasks keep their
/// versions.
pub fn failover_plan(svc: &ServiceState, to: &str, tasks: &[String], at: u64) -> Plan {
    let pod_type = svc
        .pods
        .get(to)
        .map(|p| p.pod_type.clone())
        .unwrap_or_default();
    let deadline_ms = svc.spec.pod_type(&pod_type).map_or(0, |t| t.deadline_ms);
    let mut others: Vec<&super::model::PodInstance> = svc
        .pods
        .values()
        .filter(|p| p.pod_type == pod_type && p.id != to && !p.stopping)
        .collect();
    others.sort_by_key(|p| p.index);
    let phase = |name: &str, strategy, steps: Vec<Step>| Phase {
        name: name.into(),
        pod_type: pod_type.clone(),
        strategy,
        deadline_ms: 0,
        released: false,
        steps,
    };
    let step = |pod: &str| Step::new(pod, StepWork::Launch, tasks.to_vec(), None);
    let mut promote = phase("promote", PhaseStrategy::Serial, vec![step(to)]);
    promote.deadline_ms = deadline_ms;
    let follow = phase(
        "follow",
        PhaseStrategy::Parallel,
        others.iter().map(|p| step(&p.id)).collect(),
    );
    plan(
        "failover",
        PlanKind::Failover,
        svc.version,
        vec![promote, follow],
        at,
    )
}

/// A run of a declared plan: per phase, a step per instance of its pod type running its
/// tasks at the current version.
/// The pod the failover endpoint names comes first (a backup or restore starts with the
/// primary, wherever failover moved it).
pub fn custom_plan(
    svc: &ServiceState,
    def: &PlanDef,
    params: BTreeMap<String, String>,
    at: u64,
) -> Plan {
    let first = svc
        .spec
        .failover
        .as_ref()
        .and_then(|f| svc.spec.endpoints.get(&f.endpoint));
    let phases = def
        .phases
        .iter()
        .map(|ph| {
            let count = svc.spec.pod_type(&ph.pod_type).map_or(0, |t| t.count);
            let mut pods: Vec<String> = (0..count)
                .map(|i| super::model::PodInstance::id_of(&ph.pod_type, i))
                .collect();
            if let Some(i) = first.and_then(|f| pods.iter().position(|p| p == f)) {
                let p = pods.remove(i);
                pods.insert(0, p);
            }
            Phase {
                name: ph.name.clone(),
                pod_type: ph.pod_type.clone(),
                strategy: ph.strategy,
                deadline_ms: ph.deadline_ms,
                released: false,
                steps: pods
                    .iter()
                    .map(|pod| {
                        Step::new(pod, StepWork::Launch, ph.tasks.clone(), Some(svc.version))
                    })
                    .collect(),
            }
        })
        .collect();
    let mut p = plan(&def.name, PlanKind::Custom, svc.version, phases, at);
    p.params = params;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_transition_table() {
        use StepStatus::*;
        // Row: from-status; columns in StepStatus::ALL order
        // (pending prepared starting started complete waiting error); 1 = allowed.
        let table: [(StepStatus, &str); 7] = [
            (Pending, "0100111"),
            (Prepared, "1010101"),
            (Starting, "1001101"),
            (Started, "1010101"),
            (Complete, "1000000"),
            (Waiting, "1000100"),
            (Error, "1000100"),
        ];
        for (from, row) in table {
            let got: String = StepStatus::ALL
                .iter()
                .map(|to| if from.can_transition(*to) { '1' } else { '0' })
                .collect();
            assert_eq!(got, row, "transitions from {from:?}");
        }
    }

    #[test]
    fn transitions_are_timestamped_and_checked() {
        let mut s = Step::new("node-0", StepWork::Launch, vec!["server".into()], Some(3));
        s.transition(StepStatus::Prepared, 10, "preparing").unwrap();
        s.transition(StepStatus::Starting, 20, "launching").unwrap();
        s.transition(StepStatus::Starting, 25, "still launching")
            .unwrap();
        assert_eq!(s.started_at, Some(20));
        let e = s.transition(StepStatus::Waiting, 30, "x").unwrap_err();
        assert_eq!(e, "step \"node-0\" cannot go from Starting to Waiting");
        s.transition(StepStatus::Pending, 40, "restarted").unwrap();
        assert_eq!(s.started_at, None);
        let h: Vec<String> = s
            .history
            .iter()
            .map(|c| format!("{:?}@{} {}", c.status, c.at, c.message))
            .collect();
        assert_eq!(
            h,
            [
                "Prepared@10 preparing",
                "Starting@20 launching",
                "Pending@40 restarted"
            ]
        );
        assert_eq!((s.message.as_str(), s.updated_at), ("restarted", 40));
    }

    fn phase(strategy: PhaseStrategy, statuses: &[StepStatus]) -> Phase {
        Phase {
            name: "p".into(),
            pod_type: "node".into(),
            strategy,
            deadline_ms: 0,
            released: false,
            steps: statuses
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    let mut s = Step::new(&format!("node-{i}"), StepWork::Launch, vec![], None);
                    s.status = *st;
                    s
                })
                .collect(),
        }
    }

    #[test]
    fn strategies_choose_runnable_steps() {
        use PhaseStrategy::*;
        use StepStatus::*;
        // (strategy, step statuses, runnable steps, gated steps)
        type Case<'a> = (PhaseStrategy, &'a [StepStatus], &'a [usize], &'a [bool]);
        let cases: &[Case] = &[
            (
                Serial,
                &[Pending, Pending, Pending],
                &[0],
                &[false, false, false],
            ),
            (
                Serial,
                &[Complete, Started, Pending],
                &[1],
                &[false, false, false],
            ),
            (
                Serial,
                &[Complete, Error, Pending],
                &[1],
                &[false, false, false],
            ),
            (Serial, &[Complete, Complete], &[], &[false, false]),
            (
                Parallel,
                &[Complete, Started, Pending],
                &[1, 2],
                &[false, false, false],
            ),
            (
                Canary(1),
                &[Pending, Pending, Pending],
                &[0],
                &[false, true, true],
            ),
            (
                Canary(2),
                &[Complete, Complete, Pending],
                &[2],
                &[false, false, true],
            ),
        ];
        for (strategy, statuses, runnable, gated) in cases {
            let p = phase(*strategy, statuses);
            assert_eq!(p.runnable(), *runnable, "{strategy:?} {statuses:?}");
            let g: Vec<bool> = (0..statuses.len()).map(|i| p.gated(i)).collect();
            assert_eq!(g, *gated, "{strategy:?} {statuses:?}");
        }
    }

    #[test]
    fn operations_and_plan_status() {
        use StepStatus::*;
        let mut p = plan(
            "deploy",
            PlanKind::Deploy,
            1,
            vec![phase(
                PhaseStrategy::Canary(1),
                &[Complete, Waiting, Pending],
            )],
            0,
        );
        assert_eq!(p.status(), PlanStatus::Waiting);
        p.operate(&PlanOp::Interrupt, 5).unwrap();
        assert_eq!(p.status(), PlanStatus::Interrupted);
        p.operate(&PlanOp::Continue, 6).unwrap();
        assert!(p.phases[0].released && !p.interrupted);
        assert_eq!(p.phases[0].steps[1].status, Pending);
        assert_eq!(p.status(), PlanStatus::InProgress);
        let bad = PlanOp::ForceComplete {
            phase: "p".into(),
            step: "node-9".into(),
        };
        assert_eq!(
            p.operate(&bad, 7).unwrap_err(),
            "phase \"p\" has no step \"node-9\""
        );
        p.phases[0].steps[1].status = Error;
        assert_eq!(p.status(), PlanStatus::Error);
        let fc = |s: &str| PlanOp::ForceComplete {
            phase: "p".into(),
            step: s.into(),
        };
        p.operate(&fc("node-1"), 8).unwrap();
        p.operate(&fc("node-2"), 9).unwrap();
        assert_eq!(p.status(), PlanStatus::Complete);
        let restart = PlanOp::Restart {
            phase: "p".into(),
            step: "node-0".into(),
        };
        p.operate(&restart, 10).unwrap();
        assert_eq!(p.phases[0].steps[0].status, Pending);
        assert_eq!(p.phases[0].steps[0].message, "restarted by an operator");
        assert_eq!(p.status(), PlanStatus::InProgress);
        let nophase = PlanOp::Restart {
            phase: "x".into(),
            step: "node-0".into(),
        };
        assert_eq!(
            p.operate(&nophase, 11).unwrap_err(),
            "plan \"deploy\" has no phase \"x\""
        );
    }
}
