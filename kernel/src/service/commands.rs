//! `state::apply` for the stateful service commands: each arm of `apply_command` for a
//! service `Command` calls one function here, which checks the command against the state
//! (like `PlaceTasks` is re-checked) and changes it through `service::ops`. Pure.

use super::driver;
use super::model::{StatefulService, VolumeStatus};
use super::ops::{self, ServiceOp};
use crate::model::AgentStatus;
use crate::state::{Outcome, State};

fn rejected(code: &str, field: &str, message: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        code: code.into(),
        field: field.into(),
        message: message.into(),
    }
}

pub fn create(state: &mut State, index: u64, service: StatefulService, at: u64) -> Outcome {
    if state.services.contains_key(&service.name) {
        return rejected(
            "conflict",
            "name",
            format!("service {:?} exists; update it instead", service.name),
        );
    }
    let name = service.name.clone();
    state
        .services
        .insert(name, ops::new_service(service, index, at));
    state.indexes.services = index;
    Outcome::Done { index }
}

pub fn update(
    state: &mut State,
    index: u64,
    service: StatefulService,
    allow_decommission: bool,
    at: u64,
) -> Outcome {
    let Some(svc) = state.services.get_mut(&service.name) else {
        return rejected(
            "not_found",
            "name",
            format!("no service {:?}", service.name),
        );
    };
    let name = service.name.clone();
    match ops::update_service(svc, service, allow_decommission, index, at) {
        Err(e) => rejected("invalid", &e.field, e.message),
        // An unchanged spec keeps its version.
        Ok(false) => Outcome::Done { index: svc.version },
        Ok(true) => {
            state.indexes.services = index;
            driver::sync_tasks(state, &name, index, at);
            Outcome::Done { index }
        }
    }
}

/// Removes a service; its volumes stay listed in `State::detached_volumes` (orphaned with
/// `keep_volumes`, else being destroyed) until their agents delete them.
pub fn remove(state: &mut State, index: u64, name: &str, keep_volumes: bool) -> Outcome {
    let Some(svc) = state.services.remove(name) else {
        return rejected("not_found", "name", format!("no service {name:?}"));
    };
    // `state::apply` passes no time here: the tasks killed carry the service's last change.
    let at = svc.updated_at;
    for v in ops::remove_service(svc, keep_volumes) {
        state.detached_volumes.insert(v.id.clone(), v);
    }
    state.indexes.services = index;
    driver::sync_tasks(state, name, index, at);
    Outcome::Done { index }
}

pub fn op(state: &mut State, index: u64, service: &str, op: ServiceOp, at: u64) -> Outcome {
    if let ServiceOp::PlacePod { agent, .. } = &op {
        match state.agents.get(agent) {
            None => return rejected("not_found", "agent", format!("no agent {agent:?}")),
            Some(a) if a.status != AgentStatus::Active => {
                return rejected("stale", "agent", format!("agent {agent:?} is not active"))
            }
            Some(_) => {}
        }
    }
    let Some(svc) = state.services.get_mut(service) else {
        return rejected("not_found", "service", format!("no service {service:?}"));
    };
    match ops::apply_op(svc, op, at) {
        Err(e) => rejected(e.code, e.field, e.message),
        Ok(()) => {
            state.indexes.services = index;
            driver::sync_tasks(state, service, index, at);
            Outcome::Done { index }
        }
    }
}

/// An agent deleted volumes' data: their reservations go (of services and detached ones).
pub fn volumes_destroyed(state: &mut State, index: u64, agent: &str, ids: Vec<String>) -> Outcome {
    for svc in state.services.values_mut() {
        let op = ServiceOp::VolumesDestroyed {
            agent: agent.to_string(),
            ids: ids.clone(),
        };
        ops::apply_op(svc, op, 0).ok();
    }
    for id in &ids {
        if state
            .detached_volumes
            .get(id)
            .is_some_and(|v| v.agent == agent && v.status == VolumeStatus::Destroying)
        {
            state.detached_volumes.remove(id);
        }
    }
    state.indexes.services = index;
    Outcome::Done { index }
}

/// Marks an orphaned volume `destroying` (its agent deletes the data and reports it). A
/// volume a pod owns is refused: it goes with its pod (replace, decommission, remove).
pub fn destroy_orphan(state: &mut State, index: u64, id: &str) -> Outcome {
    if let Some(v) = state.detached_volumes.get_mut(id) {
        if v.status == VolumeStatus::Orphaned {
            v.status = VolumeStatus::Destroying;
        }
        state.indexes.services = index;
        return Outcome::Done { index };
    }
    if let Some(v) = state.services.values().find_map(|s| s.volumes.get(id)) {
        return rejected(
            "in_use",
            "id",
            format!(
                "volume {id:?} belongs to pod {} of service {}; it goes with its pod (replace, scale down or remove the service)",
                v.pod, v.service
            ),
        );
    }
    rejected("not_found", "id", format!("no volume {id:?}"))
}

#[cfg(test)]
mod tests {
    use crate::model::{AgentRegistration, AgentResources};
    use crate::service::plan::PlanOp;
    use crate::service::ServiceOp;
    use crate::state::{apply, Command, Outcome, State};

    fn spec(count: u32, size: u64) -> crate::service::StatefulService {
        crate::service::spec::from_toml(&format!(
            "name = \"db\"\n[[pod_types]]\nname = \"node\"\ncount = {count}\n\
             volumes = [{{ name = \"data\", path = \"data\", size_mb = {size} }}]\n\
             tasks = [{{ name = \"server\", runtime.native = {{ cmd = \"/bin/db\" }} }}]\n"
        ))
        .unwrap()
        .validate()
        .unwrap()
    }

    fn op(op: ServiceOp) -> Command {
        Command::ServiceOp {
            service: "db".into(),
            op,
            at: 5,
        }
    }

    #[test]
    fn service_commands_apply_and_are_refused_naming_the_field() {
        let place = |pod: &str, agent: &str| {
            op(ServiceOp::PlacePod {
                pod: pod.into(),
                incarnation: 0,
                agent: agent.into(),
            })
        };
        let cmds = vec![
            Command::RegisterAgent {
                reg: AgentRegistration {
                    id: "a1".into(),
                    hostname: "h".into(),
                    addr: "127.0.0.1:5051".into(),
                    resources: AgentResources::default(),
                    attributes: Default::default(),
                    version: "0".into(),
                },
                at: 1,
            },
            Command::CreateService {
                service: spec(2, 10),
                at: 2,
            },
            Command::CreateService {
                service: spec(2, 10),
                at: 3,
            },
            place("node-0", "nope"),
            place("node-0", "a1"),
            place("node-0", "a1"),
            Command::UpdateService {
                service: spec(2, 20),
                allow_decommission: false,
                at: 7,
            },
            Command::UpdateService {
                service: spec(1, 10),
                allow_decommission: false,
                at: 8,
            },
            Command::UpdateService {
                service: spec(2, 10),
                allow_decommission: false,
                at: 9,
            },
            op(ServiceOp::Plan {
                plan: "deploy".into(),
                op: PlanOp::Restart {
                    phase: "node".into(),
                    step: "node-7".into(),
                },
            }),
            op(ServiceOp::Plan {
                plan: "deploy".into(),
                op: PlanOp::Interrupt,
            }),
            op(ServiceOp::StartPlan {
                plan: "backup".into(),
                params: Default::default(),
            }),
            Command::RemoveService {
                name: "db".into(),
                keep_volumes: true,
                at: 12,
            },
            Command::RemoveService {
                name: "db".into(),
                keep_volumes: true,
                at: 13,
            },
        ];
        let mut s = State::default();
        let mut out = Vec::new();
        for (i, c) in cmds.into_iter().enumerate() {
            out.push(match apply(&mut s, i as u64 + 1, c) {
                Outcome::Done { index } => format!("done {index}"),
                Outcome::Rejected {
                    code,
                    field,
                    message,
                } => format!("rejected {code} [{field}] {message}"),
                other => format!("{other:?}").chars().take(20).collect(),
            });
            if i == 5 {
                let svc = &s.services["db"];
                assert_eq!(svc.pods["node-0"].agent.as_deref(), Some("a1"));
                assert_eq!(svc.volumes["db.node-0.data.0"].size_mb, 10);
                assert!(svc.pods["node-1"].agent.is_none());
            }
        }
        assert_eq!(
            out,
            [
                "Agent(Agent { id: \"a",
                "done 2",
                "rejected conflict [name] service \"db\" exists; update it instead",
                "rejected not_found [agent] no agent \"nope\"",
                "done 5",
                "rejected stale [pod] pod \"node-0\" is already placed or changed",
                "rejected invalid [pod_types[0].volumes[0].size_mb] volume \"data\" has 10 MiB reserved on its agent; resizing is not supported",
                "rejected invalid [pod_types[0].count] 2 → 1 would decommission 1 pod(s) and destroy their volumes; pass allow_decommission (--allow-decommission) to do it",
                "done 2",
                "rejected invalid [op] phase \"node\" has no step \"node-7\"",
                "done 11",
                "rejected not_found [plan] no declared plan \"backup\" (recovery and decommission start by themselves)",
                "done 13",
                "rejected not_found [name] no service \"db\"",
            ]
        );
        assert!(s.services.is_empty());
        let v = &s.detached_volumes["db.node-0.data.0"];
        assert_eq!(
            (v.agent.as_str(), v.status),
            ("a1", crate::service::model::VolumeStatus::Orphaned)
        );
        assert_eq!(s.indexes.services, 13);
        let kinds: Vec<String> = s
            .events
            .iter()
            .filter(|e| e.topic == "service")
            .map(|e| format!("{} {}", e.kind, e.detail))
            .collect();
        assert_eq!(
            kinds,
            [
                "created 2 × node",
                "pod_placed node-0 on agent a1",
                "plan_operation deploy: Interrupt",
                "removed volumes kept"
            ]
        );
    }

    #[test]
    fn services_survive_a_snapshot_roundtrip() {
        use cairn_raft::App;
        let mut m = crate::state::Machine::default();
        let cmd = bincode::serialize(&Command::CreateService {
            service: spec(3, 10),
            at: 1,
        })
        .unwrap();
        m.apply(1, &cmd);
        let mut m2 = crate::state::Machine::default();
        m2.restore(&m.snapshot()).unwrap();
        assert_eq!(m2.state, m.state);
        assert_eq!(m2.state.services["db"].pods.len(), 3);
    }
}
