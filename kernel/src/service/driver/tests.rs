//! The driver end to end in memory: `controller::reconcile` (which calls `driver::commands`)
//! is applied with `state::apply`, fake agents report the pod tasks `sync_tasks` assigned, and
//! a 3-pod service deploys, rolls an update one pod at a time and scales down.

use crate::model::{AgentRegistration, AgentResources, Resources, TaskState};
use crate::state::{apply, Command, Outcome, State, TaskUpdate};

fn spec(count: u32, version: &str) -> crate::service::StatefulService {
    crate::service::spec::from_toml(&format!(
        "name = \"kv\"\n[[pod_types]]\nname = \"node\"\ncount = {count}\n\
         constraints = [[\"@hostname\", \"UNIQUE\"]]\n\
         [[pod_types.tasks]]\nname = \"server\"\nruntime.native = {{ cmd = \"/bin/sleep\", args = [\"1000\"] }}\n\
         resources = {{ cpus = 0.5, mem = 64 }}\nports = [{{ name = \"http\", number = 0 }}]\n\
         env = {{ V = \"{version}\" }}\n\
         readiness_check = {{ type = \"command\", command = [\"true\"] }}\n"
    ))
    .unwrap()
    .validate()
    .unwrap()
}

struct World {
    state: State,
    index: u64,
    now: u64,
}

impl World {
    fn new() -> World {
        let mut w = World {
            state: State::default(),
            index: 0,
            now: 1_000,
        };
        for i in 1..=3 {
            let resources = AgentResources {
                unreserved: Resources {
                    cpus: 1.0,
                    mem: 1024,
                    disk: 1024,
                    ports: vec![crate::model::PortRange {
                        begin: 31000,
                        end: 31010,
                    }],
                },
                reserved: Default::default(),
            };
            w.apply(Command::RegisterAgent {
                reg: AgentRegistration {
                    id: format!("a{i}"),
                    hostname: format!("h{i}"),
                    addr: format!("127.0.0.1:{}", 5050 + i),
                    resources,
                    attributes: Default::default(),
                    version: "0".into(),
                },
                at: 0,
            });
        }
        w
    }

    fn apply(&mut self, c: Command) -> Outcome {
        self.index += 1;
        apply(&mut self.state, self.index, c)
    }

    /// One leader pass, then every agent reports: staging → running and healthy, killing →
    /// killed.
    fn tick(&mut self) {
        self.now += 500;
        let cmds = crate::controller::reconcile(&self.state, self.now, &Default::default());
        for c in cmds {
            self.apply(c);
        }
        let mut by_agent: std::collections::BTreeMap<String, Vec<TaskUpdate>> = Default::default();
        for t in self.state.tasks.values() {
            let to = match t.state {
                TaskState::Staging => TaskState::Running,
                TaskState::Killing => TaskState::Killed,
                _ => continue,
            };
            by_agent
                .entry(t.agent.clone())
                .or_default()
                .push(TaskUpdate {
                    id: t.id.clone(),
                    state: to,
                    reason: None,
                    healthy: Some(true),
                });
        }
        for (agent, reports) in by_agent {
            self.apply(Command::UpdateTaskStates {
                agent,
                reports,
                at: self.now,
            });
        }
    }

    fn run_until(&mut self, what: &str, done: impl Fn(&State) -> bool) {
        for _ in 0..100 {
            if done(&self.state) {
                return;
            }
            self.tick();
        }
        panic!(
            "{what} never happened: {:#?}",
            self.state.services["kv"].plans
        );
    }

    fn live(&self) -> Vec<(String, String)> {
        self.state
            .tasks
            .values()
            .filter(|t| t.is_live())
            .map(|t| (t.id.clone(), t.agent.clone()))
            .collect()
    }
}

fn deploy_complete(s: &State) -> bool {
    s.services["kv"].plans["deploy"].status() == crate::service::plan::PlanStatus::Complete
}

#[test]
fn a_service_deploys_updates_and_scales_down_through_real_tasks() {
    let mut w = World::new();
    let out = w.apply(Command::CreateService {
        service: spec(3, "1"),
        at: w.now,
    });
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    w.run_until("deploy", deploy_complete);
    let live = w.live();
    assert_eq!(live.len(), 3, "{live:?}");
    let agents: std::collections::BTreeSet<_> = live.iter().map(|(_, a)| a.clone()).collect();
    assert_eq!(agents.len(), 3, "UNIQUE hostname: {live:?}");
    let t = &w.state.tasks[&live[0].0];
    assert_eq!(t.workload, "service:kv/node");
    assert_eq!(t.env["CAIRN_SERVICE"], "kv");
    assert_eq!(t.env["CAIRN_POD"], "node-0");
    assert_eq!(t.env["PORT_HTTP"], "31000");
    assert_eq!(
        t.health_checks[0].max_failures,
        u32::MAX,
        "readiness never kills"
    );

    // A rolling update: one pod at a time, never two pods down at once.
    let out = w.apply(Command::UpdateService {
        service: spec(3, "2"),
        allow_decommission: false,
        at: w.now,
    });
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    for _ in 0..100 {
        if deploy_complete(&w.state) {
            break;
        }
        w.tick();
        let running = w
            .state
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
            .count();
        assert!(running >= 2, "more than one pod down");
    }
    assert!(deploy_complete(&w.state));
    let live = w.live();
    assert_eq!(live.len(), 3, "{live:?}");

    assert!(live.iter().all(|(id, _)| w.state.tasks[id].env["V"] == "2"));
    // Each pod stayed on its agent.
    assert_eq!(
        live.iter()
            .map(|(_, a)| a.clone())
            .collect::<std::collections::BTreeSet<_>>(),
        agents
    );

    // Scale down: node-2 is decommissioned, its task killed, the pod removed.
    let out = w.apply(Command::UpdateService {
        service: spec(2, "2"),
        allow_decommission: true,
        at: w.now,
    });
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    w.run_until("decommission", |s| {
        !s.services["kv"].pods.contains_key("node-2")
    });
    let live = w.live();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.iter().all(|(id, _)| !id.contains("node-2")));

    // Removing the service kills its tasks.
    w.apply(Command::RemoveService {
        name: "kv".into(),
        keep_volumes: false,
        at: w.now,
    });
    assert!(w
        .state
        .tasks
        .values()
        .all(|t| !t.is_live() || t.state == TaskState::Killing));
}

#[test]
fn a_pod_no_agent_fits_waits_and_its_step_says_why() {
    let mut w = World::new();
    w.apply(Command::CreateService {
        service: spec(4, "1"),
        at: w.now,
    });
    w.run_until("three pods placed", |s| {
        s.services["kv"]
            .pods
            .values()
            .filter(|p| p.agent.is_some())
            .count()
            == 3
    });
    for _ in 0..10 {
        w.tick();
    }
    let svc = &w.state.services["kv"];
    assert!(svc.pods["node-3"].agent.is_none());
    let step = &svc.plans["deploy"].phases[0].steps[3];
    assert!(
        step.message
            .starts_with("waiting for an agent for node-3: ")
            && step.message.len() > 34,
        "{}",
        step.message
    );
    // An unchanged situation proposes nothing more.
    let again = crate::controller::reconcile(&w.state, w.now + 500, &Default::default());
    assert!(again.is_empty(), "{again:?}");
}

/// A pod restarted in place keeps its ports (peers rendered into configs stay right), even
/// when a lower port has come free on its agent meanwhile.
#[test]
fn a_pod_keeps_its_ports_across_restarts_in_place() {
    let mut w = World::new();
    w.apply(Command::CreateService {
        service: spec(3, "1"),
        at: w.now,
    });
    w.run_until("kv deployed", deploy_complete);
    let mut other = spec(3, "1");
    other.name = "kv2".into();
    w.apply(Command::CreateService {
        service: other.clone(),
        at: w.now,
    });
    let kv2_done = |s: &State| {
        s.services["kv2"].plans["deploy"].status() == crate::service::plan::PlanStatus::Complete
    };
    w.run_until("kv2 deployed", kv2_done);
    let ports = |w: &World| -> Vec<String> {
        w.state
            .tasks
            .values()
            .filter(|t| t.is_live() && t.id.starts_with("kv2."))
            .map(|t| t.env["PORT_HTTP"].clone())
            .collect()
    };
    assert_eq!(ports(&w), ["31001", "31001", "31001"]);
    // 31000 comes free on every agent; kv2 is updated (restarted in place, pod by pod).
    w.apply(Command::RemoveService {
        name: "kv".into(),
        keep_volumes: false,
        at: w.now,
    });
    w.tick();
    other.pod_types[0].tasks[0]
        .env
        .insert("V".into(), "2".into());
    let out = w.apply(Command::UpdateService {
        service: other,
        allow_decommission: false,
        at: w.now,
    });
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    w.run_until("kv2 updated", kv2_done);
    let live: Vec<_> = w
        .state
        .tasks
        .values()
        .filter(|t| t.is_live() && t.id.starts_with("kv2."))
        .map(|t| (t.id.clone(), t.env["V"].clone()))
        .collect();
    assert!(live.iter().all(|(_, v)| v == "2"), "{live:?}");
    assert_eq!(ports(&w), ["31001", "31001", "31001"]);
}
