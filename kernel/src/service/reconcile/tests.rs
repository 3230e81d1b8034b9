//! The plan engine as tables and traces: a simulated leader runs `reconcile_service`, applies
//! its actions with `ops::apply_op`, and fake agents report tasks; each trace line is one
//! action. Covers serial deploy with readiness, canary/interrupt/force-complete, failures and
//! deadlines, recovery (restart, replace after `replace_after`), decommission, an update of
//! one pod type, and leader failover (a completed step is never redone).

use super::*;
use crate::service::model::VolumeStatus;
use crate::service::ops::{apply_op, new_service, update_service};
use crate::service::plan::PlanOp;
use crate::service::spec::from_toml;
use std::fmt::Write;

const SPEC: &str = r#"
name = "db"
[[pod_types]]
name = "node"
count = 2
deadline = "10s"
volumes = [{ name = "data", path = "data", size_mb = 100 }]
[[pod_types.tasks]]
name = "init"
goal = "once"
runtime.native = { cmd = "/bin/init" }
[[pod_types.tasks]]
name = "server"
runtime.native = { cmd = "/bin/db" }
ports = [{ name = "db", number = 0 }]
readiness_check = { type = "tcp" }
"#;

struct Sim {
    svc: ServiceState,
    obs: Observed,
    now: u64,
    index: u64,
    log: String,
    /// Tasks (`pod/task`) whose launches fail, and running ones not ready.
    failing: BTreeSet<String>,
    unready: BTreeSet<String>,
    /// Launches per `pod/task`.
    launches: BTreeMap<String, u32>,
}

impl Sim {
    fn new(spec: &str, agents: &[&str]) -> Sim {
        let spec = from_toml(spec).unwrap().validate().unwrap();
        let mut sim = Sim {
            svc: new_service(spec, 1, 0),
            obs: Observed::default(),
            now: 0,
            index: 1,
            log: String::new(),
            failing: BTreeSet::new(),
            unready: BTreeSet::new(),
            launches: BTreeMap::new(),
        };
        for a in agents {
            sim.agent(a, true);
        }
        sim
    }

    fn agent(&mut self, id: &str, active: bool) {
        let since = self.now;
        self.obs
            .agents
            .insert(id.into(), AgentFact { active, since });
    }

    /// One leader pass: reconcile, log and apply every action; then the agents report.
    fn tick(&mut self) -> usize {
        self.now += 1_000;
        let actions = reconcile_service(&self.svc, &self.obs, self.now);
        for a in &actions {
            let op = match a {
                Action::PlacePod { pod, incarnation } => {
                    // Round-robin over active agents, never the pod's previous agent.
                    let old: BTreeSet<&String> = self
                        .svc
                        .volumes
                        .values()
                        .filter(|v| &v.pod == pod)
                        .map(|v| &v.agent)
                        .collect();
                    let agent = self
                        .obs
                        .agents
                        .iter()
                        .filter(|(id, f)| f.active && !old.contains(id))
                        .map(|(id, _)| id.clone())
                        .nth(self.svc.pods[pod].index as usize % 2)
                        .or_else(|| {
                            self.obs
                                .agents
                                .iter()
                                .find(|(_, f)| f.active)
                                .map(|(id, _)| id.clone())
                        })
                        .unwrap();
                    writeln!(self.log, "place {pod}#{incarnation} on {agent}").unwrap();
                    ServiceOp::PlacePod {
                        pod: pod.clone(),
                        incarnation: *incarnation,
                        agent,
                    }
                }
                Action::Op(op) => {
                    self.log.push_str(&show(&self.svc, op));
                    self.log.push('\n');
                    op.clone()
                }
            };
            self.index += 1;
            if let Err(e) = apply_op(&mut self.svc, op, self.now) {
                writeln!(self.log, "  refused {}: {}", e.code, e.message).unwrap();
            }
        }
        self.report();
        actions.len()
    }

    /// Agents report every launched task of their pods: running (ready unless `unready`), a
    /// `finish`/`once` task finished, a `failing` one failed; stopping pods' tasks killed;
    /// volumes being destroyed are destroyed.
    fn report(&mut self) {
        let active = |a: &Option<String>, obs: &Observed| {
            a.as_ref()
                .is_some_and(|a| obs.agents.get(a).is_some_and(|f| f.active))
        };
        for pod in self.svc.pods.values() {
            if !active(&pod.agent, &self.obs) {
                continue;
            }
            let agent = pod.agent.clone().unwrap();
            let facts = self.obs.tasks.entry(pod.id.clone()).or_default();
            for (t, target) in &pod.tasks {
                let key = format!("{}/{t}", pod.id);
                let fresh = facts
                    .get(t)
                    .is_none_or(|f| f.generation != target.generation);
                if fresh {
                    *self.launches.entry(key.clone()).or_default() += 1;
                }
                let state = if pod.stopping {
                    TaskState::Killed
                } else if self.failing.contains(&key) {
                    TaskState::Failed
                } else if target.goal == TaskGoal::Running {
                    TaskState::Running
                } else {
                    TaskState::Finished
                };
                let message = match state {
                    TaskState::Failed => "exit status 1".to_string(),
                    TaskState::Running if self.unready.contains(&key) => {
                        "connection refused".into()
                    }
                    _ => String::new(),
                };
                facts.insert(
                    t.clone(),
                    TaskFact {
                        agent: agent.clone(),
                        generation: target.generation,
                        state,
                        ready: state == TaskState::Running && !self.unready.contains(&key),
                        message,
                    },
                );
            }
        }
        let destroyed: Vec<(String, String)> = self
            .svc
            .volumes
            .values()
            .filter(|v| v.status == VolumeStatus::Destroying)
            .filter(|v| self.obs.agents.get(&v.agent).is_some_and(|f| f.active))
            .map(|v| (v.agent.clone(), v.id.clone()))
            .collect();
        for (agent, id) in destroyed {
            writeln!(self.log, "agent {agent} destroyed {id}").unwrap();
            let op = ServiceOp::VolumesDestroyed {
                agent,
                ids: vec![id],
            };
            apply_op(&mut self.svc, op, self.now).unwrap();
        }
    }

    /// Runs passes until one proposes nothing (at most `max`).
    fn settle(&mut self, max: usize) {
        for _ in 0..max {
            if self.tick() == 0 {
                return;
            }
        }
    }

    fn operate(&mut self, plan: &str, op: PlanOp) {
        writeln!(self.log, "operator: {plan} {op:?}").unwrap();
        let op = ServiceOp::Plan {
            plan: plan.into(),
            op,
        };
        apply_op(&mut self.svc, op, self.now).unwrap();
    }

    fn take(&mut self) -> String {
        std::mem::take(&mut self.log)
    }

    fn status(&self, plan: &str) -> String {
        let p = &self.svc.plans[plan];
        let steps: Vec<String> = p
            .phases
            .iter()
            .flat_map(|ph| ph.steps.iter())
            .map(|s| format!("{}={:?}", s.name, s.status))
            .collect();
        format!("{:?} {}", p.status(), steps.join(" "))
    }
}

fn show(svc: &ServiceState, op: &ServiceOp) -> String {
    match op {
        ServiceOp::Step {
            plan,
            phase,
            step,
            from,
            to,
            message,
        } => {
            let s = &svc.plans[plan].phases[*phase].steps[*step];
            if from == to {
                format!("{plan}/{}: ({from:?}) {message}", s.name)
            } else {
                format!("{plan}/{}: {from:?} → {to:?}: {message}", s.name)
            }
        }
        ServiceOp::Launch {
            plan,
            phase,
            step,
            tasks,
        } => {
            let s = &svc.plans[plan].phases[*phase].steps[*step];
            let t: Vec<String> = tasks
                .iter()
                .map(|l| format!("{}@v{}", l.task, l.version))
                .collect();
            format!("{plan}/{}: launch {}", s.name, t.join(" "))
        }
        ServiceOp::Recover {
            pod,
            tasks,
            replace,
            message,
        } => {
            format!("recover {pod} {tasks:?} replace={replace}: {message}")
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn deploy_runs_one_pod_at_a_time_stages_once_tasks_and_waits_for_readiness() {
    let mut sim = Sim::new(SPEC, &["a1", "a2"]);
    sim.unready.insert("node-1/server".into());
    sim.settle(20);
    assert_eq!(
        sim.take(),
        "\
deploy/node-0: Pending → Prepared: preparing node-0
place node-0#0 on a1
deploy/node-0: (Prepared) waiting for an agent for node-0
deploy/node-0: Prepared → Starting: launching init, server of node-0 on agent a1
deploy/node-0: launch init@v1
deploy/node-0: launch server@v1
deploy/node-0: Starting → Started: node-0 running; checking readiness
deploy/node-0: Started → Complete: node-0 done
deploy/node-1: Pending → Prepared: preparing node-1
place node-1#0 on a2
deploy/node-1: (Prepared) waiting for an agent for node-1
deploy/node-1: Prepared → Starting: launching init, server of node-1 on agent a2
deploy/node-1: launch init@v1
deploy/node-1: launch server@v1
deploy/node-1: Starting → Started: node-1 running; waiting for readiness
deploy/node-1: (Started) server of node-1 running; readiness check failing: connection refused
"
    );
    assert_eq!(
        sim.status("deploy"),
        "InProgress node-0=Complete node-1=Started"
    );
    let vols: Vec<String> = sim
        .svc
        .volumes
        .values()
        .map(|v| format!("{} {} {}MiB {:?}", v.id, v.agent, v.size_mb, v.status))
        .collect();
    assert_eq!(
        vols,
        [
            "db.node-0.data.0 a1 100MiB Reserved",
            "db.node-1.data.0 a2 100MiB Reserved"
        ]
    );
    // Still not ready at the deadline (10 s after starting): the step errors and stays so.
    for _ in 0..12 {
        sim.tick();
    }
    assert_eq!(
        sim.take(),
        "deploy/node-1: Started → Error: not done within 10s: server of node-1 running; readiness check failing: connection refused\n"
    );
    assert_eq!(sim.status("deploy"), "Error node-0=Complete node-1=Error");
    // Restart the step once it can become ready: `once` init is not run again.
    sim.unready.clear();
    sim.operate(
        "deploy",
        PlanOp::Restart {
            phase: "node".into(),
            step: "node-1".into(),
        },
    );
    sim.settle(20);
    assert_eq!(
        sim.take(),
        "\
operator: deploy Restart { phase: \"node\", step: \"node-1\" }
deploy/node-1: Pending → Prepared: preparing node-1
deploy/node-1: Prepared → Starting: launching init, server of node-1 on agent a2
deploy/node-1: launch server@v1
deploy/node-1: Starting → Started: node-1 running; checking readiness
deploy/node-1: Started → Complete: node-1 done
"
    );
    assert_eq!(sim.launches["node-1/init"], 1);
    assert_eq!(sim.launches["node-1/server"], 2);
}

#[test]
fn leader_failover_resumes_and_never_redoes_a_completed_step() {
    let spec = SPEC.replace("count = 2", "count = 3");
    let mut sim = Sim::new(&spec, &["a1", "a2"]);
    // Run until node-0 is complete and node-1 is under way.
    while sim.svc.plans["deploy"].phases[0].steps[1].status != StepStatus::Starting {
        sim.tick();
    }
    sim.take();
    assert_eq!(
        sim.status("deploy"),
        "InProgress node-0=Complete node-1=Starting node-2=Pending"
    );
    // The leader dies: a new one rebuilds the state from the replicated bytes.
    let bytes = bincode::serialize(&sim.svc).unwrap();
    sim.svc = bincode::deserialize(&bytes).unwrap();
    let first = reconcile_service(&sim.svc, &sim.obs, sim.now + 1_000);
    let touches_node0 = first.iter().any(|a| match a {
        Action::Op(ServiceOp::Step { step, .. } | ServiceOp::Launch { step, .. }) => *step == 0,
        Action::PlacePod { pod, .. } => pod == "node-0",
        _ => false,
    });
    assert!(!touches_node0, "{first:?}");
    // A deposed leader's stale proposal (node-0 back to pending... or a replayed launch) is refused.
    let replay = ServiceOp::Step {
        plan: "deploy".into(),
        phase: 0,
        step: 0,
        from: StepStatus::Started,
        to: StepStatus::Complete,
        message: "replayed".into(),
    };
    let e = apply_op(&mut sim.svc, replay, sim.now).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        ("stale", "step \"node-0\" is Complete, not Started")
    );
    let gen = sim.svc.pods["node-0"].tasks["server"].generation;
    let relaunch = ServiceOp::Launch {
        plan: "deploy".into(),
        phase: 0,
        step: 0,
        tasks: vec![crate::service::ops::Launch {
            task: "server".into(),
            version: 1,
            seen: Some(gen),
        }],
    };
    assert_eq!(
        apply_op(&mut sim.svc, relaunch, sim.now).unwrap_err().code,
        "stale"
    );
    assert_eq!(sim.svc.pods["node-0"].tasks["server"].generation, gen);
    sim.settle(30);
    assert_eq!(
        sim.status("deploy"),
        "Complete node-0=Complete node-1=Complete node-2=Complete"
    );
    let once: Vec<u32> = sim.launches.values().copied().collect();
    assert_eq!(once, [1, 1, 1, 1, 1, 1], "{:?}", sim.launches);
    // A reconcile of a finished, healthy service proposes nothing.
    assert_eq!(reconcile_service(&sim.svc, &sim.obs, sim.now + 1_000), []);
}

#[test]
fn canary_waits_for_continue_interrupt_holds_and_force_complete_skips() {
    let spec = SPEC
        .replace("count = 2", "count = 3\ndeploy = { canary = 1 }")
        .replace("deadline = \"10s\"", "deadline = \"1h\"");
    let mut sim = Sim::new(&spec, &["a1", "a2"]);
    sim.settle(20);
    assert_eq!(
        sim.status("deploy"),
        "Waiting node-0=Complete node-1=Waiting node-2=Pending"
    );
    assert!(sim.take().ends_with(
        "deploy/node-1: Pending → Waiting: canary: 1 step(s) done; waiting for `continue`\n"
    ));
    // Interrupt, then continue: the gate opens, but nothing starts while interrupted.
    sim.operate("deploy", PlanOp::Interrupt);
    sim.operate("deploy", PlanOp::Continue);
    sim.operate("deploy", PlanOp::Interrupt);
    sim.settle(5);
    assert_eq!(
        sim.status("deploy"),
        "Interrupted node-0=Complete node-1=Pending node-2=Pending"
    );
    // node-1 never becomes ready; once it is under way an interrupt lets it go on, then
    // force-complete skips it.
    sim.unready.insert("node-1/server".into());
    sim.operate("deploy", PlanOp::Continue);
    for _ in 0..8 {
        sim.tick();
    }
    sim.operate("deploy", PlanOp::Interrupt);
    sim.settle(5);
    assert_eq!(
        sim.status("deploy"),
        "Interrupted node-0=Complete node-1=Started node-2=Pending"
    );
    sim.operate(
        "deploy",
        PlanOp::ForceComplete {
            phase: "node".into(),
            step: "node-1".into(),
        },
    );
    sim.settle(5);
    assert_eq!(
        sim.status("deploy"),
        "Interrupted node-0=Complete node-1=Complete node-2=Pending"
    );
    sim.operate("deploy", PlanOp::Continue);
    sim.settle(20);
    assert_eq!(
        sim.status("deploy"),
        "Complete node-0=Complete node-1=Complete node-2=Complete"
    );
    let h: Vec<String> = sim.svc.plans["deploy"].phases[0].steps[1]
        .history
        .iter()
        .map(|c| format!("{:?}@{}", c.status, c.at))
        .collect();
    assert_eq!(h.first().map(String::as_str), Some("Waiting@8000"), "{h:?}");
    assert_eq!(
        h.last().map(|s| s.starts_with("Complete@")),
        Some(true),
        "{h:?}"
    );
}

#[test]
fn a_failing_task_is_relaunched_until_the_deadline_then_the_step_errors() {
    let mut sim = Sim::new(SPEC, &["a1", "a2"]);
    sim.failing.insert("node-0/server".into());
    for _ in 0..16 {
        sim.tick();
    }
    let log = sim.take();
    let relaunches = log.matches("deploy/node-0: launch server@v1").count();
    assert!(relaunches >= 3, "{log}");
    assert!(
        log.ends_with("deploy/node-0: Starting → Error: server of node-0 failed: exit status 1; not done within 10s\n"),
        "{log}"
    );
    assert_eq!(sim.status("deploy"), "Error node-0=Error node-1=Pending");
}

/// A task failing at once is relaunched after a growing backoff (0.5 s, 1 s, 2 s, ... at most
/// 30 s from its last launch), not once per pass: the package tests saw ~1,000 launches in
/// two minutes before.
#[test]
fn a_failing_task_is_relaunched_after_a_growing_backoff() {
    let spec = SPEC.replace("deadline = \"10s\"", "deadline = \"120s\"");
    let mut sim = Sim::new(&spec, &["a1", "a2"]);
    sim.failing.insert("node-0/server".into());
    let mut at = Vec::new();
    let mut waited = false;
    let mut all = String::new();
    for _ in 0..110 {
        sim.tick();
        let log = sim.take();
        if log.contains("deploy/node-0: launch server@v1") {
            at.push(sim.now / 1000);
        }
        waited |= log.contains("launching it again 8 s after the last launch (attempt 6)");
        all.push_str(&log);
    }
    assert!(waited, "the step says how long it waits: {at:?}\n{all}");
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(at.len() <= 10, "{at:?}");
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "gaps grow: {gaps:?}");
    assert!(
        gaps.last().is_some_and(|&g| (30..=32).contains(&g)),
        "capped: {gaps:?}"
    );
}

#[test]
fn recovery_restarts_in_place_and_replaces_only_after_replace_after() {
    let spec = SPEC.replace(
        "deadline = \"10s\"",
        "deadline = \"10s\"\nreplace_after = \"30s\"",
    );
    let mut sim = Sim::new(&spec, &["a1", "a2", "a3"]);
    sim.settle(30);
    assert_eq!(
        sim.status("deploy"),
        "Complete node-0=Complete node-1=Complete"
    );
    sim.take();
    // server of node-0 crashes: restarted in place (same agent, same volume), init not rerun.
    let f = sim
        .obs
        .tasks
        .get_mut("node-0")
        .unwrap()
        .get_mut("server")
        .unwrap();
    f.state = TaskState::Failed;
    f.message = "exit status 2".into();
    sim.settle(10);
    assert_eq!(
        sim.take(),
        "\
recover node-0 [\"server\"] replace=false: server of node-0 failed: exit status 2: restarting in place
recovery/node-0: Pending → Prepared: preparing node-0
recovery/node-0: Prepared → Starting: launching server of node-0 on agent a1
recovery/node-0: launch server@v1
recovery/node-0: Starting → Started: node-0 running; checking readiness
recovery/node-0: Started → Complete: node-0 done
"
    );
    assert_eq!(sim.svc.pods["node-0"].agent.as_deref(), Some("a1"));
    assert_eq!(sim.svc.pods["node-0"].volumes, ["db.node-0.data.0"]);
    // a2 (node-1's agent) becomes unreachable: nothing moves before replace_after.
    sim.agent("a2", false);
    for _ in 0..29 {
        assert_eq!(sim.tick(), 0);
    }
    sim.settle(20);
    assert_eq!(
        sim.take(),
        "\
recover node-1 [] replace=true: agent a2 of node-1 unreachable for 30s (replace_after): replacing the pod
recovery/node-1: Pending → Prepared: replacing node-1: a new agent, fresh volumes
place node-1#1 on a3
recovery/node-1: (Prepared) waiting for an agent for node-1
recovery/node-1: Prepared → Starting: launching init, server of node-1 on agent a3
recovery/node-1: launch init@v1
recovery/node-1: launch server@v1
recovery/node-1: Starting → Started: node-1 running; checking readiness
recovery/node-1: Started → Complete: node-1 done
"
    );
    let vols: Vec<String> = sim
        .svc
        .volumes
        .values()
        .map(|v| format!("{} {} {:?}", v.id, v.agent, v.status))
        .collect();
    assert_eq!(
        vols,
        [
            "db.node-0.data.0 a1 Reserved",
            "db.node-1.data.0 a2 Destroying",
            "db.node-1.data.1 a3 Reserved"
        ]
    );
    // a2 returns: its old volume is destroyed; nothing else happens to node-1.
    sim.agent("a2", true);
    sim.settle(5);
    assert_eq!(sim.take(), "agent a2 destroyed db.node-1.data.0\n");
    assert_eq!(sim.svc.pods["node-1"].agent.as_deref(), Some("a3"));
}

#[test]
fn scale_down_decommissions_from_the_highest_index_and_destroys_exactly_their_volumes() {
    let spec = SPEC.replace("count = 2", "count = 4");
    let mut sim = Sim::new(&spec, &["a1", "a2"]);
    sim.settle(40);
    sim.take();
    let smaller = from_toml(SPEC).unwrap().validate().unwrap();
    let e = update_service(&mut sim.svc, smaller.clone(), false, 50, sim.now).unwrap_err();
    assert_eq!(e.field, "pod_types[0].count");
    assert!(update_service(&mut sim.svc, smaller, true, 50, sim.now).unwrap());
    sim.settle(30);
    let log = sim.take();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("→") || l.starts_with("agent"))
        .collect();
    assert_eq!(
        lines,
        [
            "decommission/node-3: Pending → Prepared: decommissioning node-3",
            "deploy/node-0: Pending → Complete: node-0 already runs version 1",
            "decommission/node-3: Prepared → Starting: stopping the tasks of node-3",
            "deploy/node-1: Pending → Complete: node-1 already runs version 1",
            "decommission/node-3: Starting → Started: destroying the volumes of node-3",
            "agent a2 destroyed db.node-3.data.0",
            "decommission/node-3: Started → Complete: node-3 removed",
            "decommission/node-2: Pending → Prepared: decommissioning node-2",
            "decommission/node-2: Prepared → Starting: stopping the tasks of node-2",
            "decommission/node-2: Starting → Started: destroying the volumes of node-2",
            "agent a1 destroyed db.node-2.data.0",
            "decommission/node-2: Started → Complete: node-2 removed",
        ]
    );
    let pods: Vec<&String> = sim.svc.pods.keys().collect();
    assert_eq!(pods, ["node-0", "node-1"]);
    let vols: Vec<&String> = sim.svc.volumes.keys().collect();
    assert_eq!(vols, ["db.node-0.data.0", "db.node-1.data.0"]);
}

#[test]
fn an_update_restarts_only_the_changed_pod_type_one_pod_at_a_time() {
    let two = format!(
        "{SPEC}\n[[pod_types]]\nname = \"proxy\"\ncount = 2\ntasks = [{{ name = \"proxy\", runtime.native = {{ cmd = \"/bin/proxy\" }} }}]\n"
    );
    let mut sim = Sim::new(&two, &["a1", "a2"]);
    sim.settle(40);
    assert_eq!(
        sim.status("deploy"),
        "Complete node-0=Complete node-1=Complete proxy-0=Complete proxy-1=Complete"
    );
    sim.take();
    let changed = from_toml(&two.replace("/bin/proxy", "/bin/proxy2"))
        .unwrap()
        .validate()
        .unwrap();
    assert!(update_service(&mut sim.svc, changed, false, 9, sim.now).unwrap());
    sim.settle(40);
    let log = sim.take();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("→ Complete") || l.contains("launch "))
        .collect();
    assert_eq!(
        lines,
        [
            "deploy/node-0: Pending → Complete: node-0 already runs version 1",
            "deploy/node-1: Pending → Complete: node-1 already runs version 1",
            "deploy/proxy-0: launch proxy@v9",
            "deploy/proxy-0: Started → Complete: proxy-0 done",
            "deploy/proxy-1: launch proxy@v9",
            "deploy/proxy-1: Started → Complete: proxy-1 done",
        ]
    );
    assert_eq!(
        sim.svc
            .history
            .iter()
            .map(|h| h.version)
            .collect::<Vec<_>>(),
        [1, 9]
    );
}

#[test]
fn failover_moves_the_endpoint_promotes_then_the_others_follow() {
    let spec = SPEC.replace("count = 2", "count = 3").replacen(
        "[[pod_types]]",
        "endpoints = { primary = \"node-0\" }\nfailover = { endpoint = \"primary\", after = \"5s\", tasks = [\"server\"] }\n[[pod_types]]",
        1,
    );
    let mut sim = Sim::new(&spec, &["a1", "a2", "a3"]);
    sim.settle(40);
    assert_eq!(
        sim.status("deploy"),
        "Complete node-0=Complete node-1=Complete node-2=Complete"
    );
    sim.take();
    let agent0 = sim.svc.pods["node-0"].agent.clone().unwrap();
    // node-0 and node-2 share an agent (the simulated placement alternates over two):
    // node-1 is the only ready pod left, and takes over once that agent has been unreachable
    // for 5 s (not before).
    assert_eq!(sim.svc.pods["node-2"].agent, Some(agent0.clone()));
    sim.agent(&agent0, false);
    for _ in 0..4 {
        assert_eq!(sim.tick(), 0, "{}", sim.take());
    }
    sim.settle(20);
    let log = sim.take();
    assert!(
        log.starts_with(
            "Failover { endpoint: \"primary\", to: \"node-1\", message: \"node-0 on an unreachable agent for 5s: node-1 takes over\" }\n\
failover/node-1: Pending → Prepared: preparing node-1\n"
        ),
        "{log}"
    );
    assert_eq!(sim.svc.spec.endpoints["primary"], "node-1");
    // node-1 relaunched first (promoted); node-0 and node-2 wait for their agent.
    let p = &sim.svc.plans["failover"];
    assert_eq!(p.phases[0].name, "promote");
    assert_eq!(
        p.phases[1].strategy,
        crate::service::model::PhaseStrategy::Parallel
    );
    assert!(log.contains("failover/node-1: launch server@v1"), "{log}");
    assert_eq!(
        sim.status("failover"),
        "InProgress node-1=Complete node-0=Starting node-2=Starting"
    );
    // No second failover while they wait (node-1 is up). The agent returns: node-0 and
    // node-2 are relaunched and follow.
    sim.agent(&agent0, true);
    sim.report();
    sim.settle(20);
    assert_eq!(
        sim.status("failover"),
        "Complete node-1=Complete node-0=Complete node-2=Complete"
    );
    assert!(!sim.take().contains("Failover {"));

    // An update (a package update, a rollback) keeps the endpoint where failover put it.
    let new = from_toml(&spec.replace("/bin/db", "/bin/db2"))
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(new.endpoints["primary"], "node-0");
    update_service(&mut sim.svc, new, false, 50, sim.now).unwrap();
    assert_eq!(sim.svc.spec.endpoints["primary"], "node-1");
    sim.settle(40);

    // A switchover: refused to the pod already named, or to no pod; else the same plan.
    let op = |to: &str| ServiceOp::Failover {
        endpoint: "primary".into(),
        to: to.into(),
        message: "switchover".into(),
    };
    let e = apply_op(&mut sim.svc, op("node-1"), sim.now).unwrap_err();
    assert_eq!((e.code, e.field), ("conflict", "to"));
    let e = apply_op(&mut sim.svc, op("node-7"), sim.now).unwrap_err();
    assert_eq!((e.code, e.field), ("invalid", "to"));
    apply_op(&mut sim.svc, op("node-0"), sim.now).unwrap();
    // While node-0 is promoting, a second move is refused.
    let e = apply_op(&mut sim.svc, op("node-2"), sim.now).unwrap_err();
    assert_eq!(e.code, "conflict");
    assert!(e.message.contains("promoting"), "{}", e.message);
    sim.settle(40);
    assert_eq!(sim.svc.spec.endpoints["primary"], "node-0");
    assert!(sim
        .status("failover")
        .starts_with("Complete node-0=Complete"));
}

#[test]
fn a_failover_waits_for_a_ready_pod() {
    let spec = SPEC.replacen(
        "[[pod_types]]",
        "endpoints = { primary = \"node-0\" }\nfailover = { endpoint = \"primary\", after = \"2s\", tasks = [\"server\"] }\n[[pod_types]]",
        1,
    );
    let mut sim = Sim::new(&spec, &["a1", "a2"]);
    sim.settle(30);
    sim.take();
    let agent0 = sim.svc.pods["node-0"].agent.clone().unwrap();
    sim.unready.insert("node-1/server".into());
    sim.report();
    sim.agent(&agent0, false);
    for _ in 0..10 {
        assert_eq!(sim.tick(), 0, "{}", sim.take());
    }
    assert_eq!(sim.svc.spec.endpoints["primary"], "node-0");
    // node-1 becomes ready: it takes over.
    sim.unready.clear();
    sim.report();
    sim.settle(20);
    assert_eq!(sim.svc.spec.endpoints["primary"], "node-1");
}

#[test]
fn on_demand_tasks_run_only_in_their_plan_with_its_parameters() {
    let spec = SPEC.to_string()
        + r#"
[[pod_types.tasks]]
name = "backup"
goal = "on_demand"
runtime.native = { cmd = "/bin/backup" }

[[plans]]
name = "backup"
[[plans.phases]]
name = "backup"
pod_type = "node"
tasks = ["backup"]
"#;
    let mut sim = Sim::new(&spec, &["a1", "a2"]);
    sim.settle(30);
    assert_eq!(
        sim.status("deploy"),
        "Complete node-0=Complete node-1=Complete"
    );
    // Deploy and a pod restart leave it alone.
    assert!(!sim.svc.pods["node-0"].tasks.contains_key("backup"));
    let op = ServiceOp::Recover {
        pod: "node-0".into(),
        tasks: vec![],
        replace: false,
        message: "restarted by an operator".into(),
    };
    apply_op(&mut sim.svc, op, sim.now).unwrap();
    sim.settle(20);
    assert!(!sim.svc.pods["node-0"].tasks.contains_key("backup"));
    // The plan runs it in every pod, with the run's parameters.
    let op = ServiceOp::StartPlan {
        plan: "backup".into(),
        params: [("to".to_string(), "nightly".to_string())].into(),
    };
    apply_op(&mut sim.svc, op, sim.now).unwrap();
    sim.settle(20);
    assert_eq!(
        sim.status("backup"),
        "Complete node-0=Complete node-1=Complete"
    );
    let t = &sim.svc.pods["node-1"].tasks["backup"];
    assert_eq!(t.goal, TaskGoal::OnDemand);
    assert_eq!(t.params["to"], "nightly");
}
