//! Table tests of `answer` on a state driven by the real controller (three agents, a
//! workload, a stateful service), and random packets into `handle`.

use super::*;
use crate::model::{AgentRegistration, AgentResources, PortRange, Resources};
use crate::state::{apply, Command, Outcome, TaskUpdate};
use hickory_proto::op::Query;

struct World {
    state: State,
    index: u64,
    now: u64,
    /// What agents report for tasks with health checks.
    healthy: bool,
}

impl World {
    fn new() -> World {
        let mut w = World {
            state: State::default(),
            index: 0,
            now: 1_000,
            healthy: true,
        };
        for i in 1..=3 {
            let resources = AgentResources {
                unreserved: Resources {
                    cpus: 4.0,
                    mem: 4096,
                    disk: 4096,
                    ports: vec![PortRange {
                        begin: 31000 + 100 * i,
                        end: 31010 + 100 * i,
                    }],
                },
                reserved: Default::default(),
            };
            w.apply(Command::RegisterAgent {
                reg: AgentRegistration {
                    id: format!("a{i}"),
                    hostname: format!("h{i}"),
                    addr: format!("10.0.0.{i}:5051"),
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

    /// One leader pass, then every agent reports: staging → running, killing → killed.
    fn tick(&mut self) {
        self.now += 500;
        let cmds = crate::controller::reconcile(&self.state, self.now, &Default::default());
        for c in cmds {
            self.apply(c);
        }
        let mut by_agent: BTreeMap<String, Vec<TaskUpdate>> = BTreeMap::new();
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
                    healthy: (!t.health_checks.is_empty()).then_some(self.healthy),
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

    fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            self.tick();
        }
    }

    fn workload(&mut self, toml: &str) {
        let workload = crate::spec::from_toml(toml).unwrap().validate().unwrap();
        let out = self.apply(Command::PutWorkload {
            workload,
            at: self.now,
        });
        assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    }

    fn view(&self) -> DnsView {
        DnsView::from_state(
            &self.state,
            &MasterAddrs {
                leader: Some("10.0.1.1:5050".into()),
                all: vec![
                    "10.0.1.1:5050".into(),
                    "10.0.1.2:5050".into(),
                    "master-3.example:5050".into(),
                ],
            },
        )
    }
}

const WEB: &str = "id = \"web\"\ninstances = 3\nstrategy = \"spread\"\n\
    runtime.native = { cmd = \"/bin/sleep\", args = [\"600\"] }\n\
    resources = { cpus = 0.1, mem = 32 }\nports = [{ name = \"http\", number = 0 }]\n";

fn kv_service() -> crate::service::StatefulService {
    crate::service::spec::from_toml(
        "name = \"kv\"\n[[pod_types]]\nname = \"node\"\ncount = 2\n\
         constraints = [[\"@hostname\", \"UNIQUE\"]]\n\
         [[pod_types.tasks]]\nname = \"server\"\nruntime.native = { cmd = \"/bin/sleep\", args = [\"1000\"] }\n\
         resources = { cpus = 0.5, mem = 64 }\nports = [{ name = \"client\", number = 0 }]\n",
    )
    .unwrap()
    .validate()
    .unwrap()
}

fn query(name: &str, qt: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(0);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qt));
    m
}

/// The answer to one question, one line per record: rcode, then answers, then
/// `+ additional` lines, answers sorted (they are rotated by query id).
fn ask(view: &DnsView, name: &str, qt: RecordType) -> String {
    let resp = answer(view, &query(name, qt));
    let line = |r: &Record| format!("{} {} {} {}", r.name(), r.ttl(), r.record_type(), r.data());
    let mut answers: Vec<String> = resp.answers().iter().map(line).collect();
    answers.sort();
    let mut extra: Vec<String> = resp
        .additionals()
        .iter()
        .map(|r| format!("+ {}", line(r)))
        .collect();
    extra.sort();
    let mut out = vec![format!("{}", resp.response_code())];
    out.extend(answers);
    out.extend(extra);
    if !resp.name_servers().is_empty() {
        out.push("(soa)".into());
    }
    out.join("\n")
}

#[test]
fn workload_names_list_ready_tasks_by_host_and_port() {
    let mut w = World::new();
    w.workload(WEB);
    w.ticks(3);
    let v = w.view();
    assert_eq!(
        ask(&v, "web.cairn.", RecordType::A),
        "No Error\n\
         web.cairn. 1 A 10.0.0.1\n\
         web.cairn. 1 A 10.0.0.2\n\
         web.cairn. 1 A 10.0.0.3"
    );
    assert_eq!(
        ask(&v, "_http._tcp.web.cairn.", RecordType::SRV),
        "No Error\n\
         _http._tcp.web.cairn. 1 SRV 0 1 31100 a1.agents.cairn.\n\
         _http._tcp.web.cairn. 1 SRV 0 1 31200 a2.agents.cairn.\n\
         _http._tcp.web.cairn. 1 SRV 0 1 31300 a3.agents.cairn.\n\
         + a1.agents.cairn. 1 A 10.0.0.1\n\
         + a2.agents.cairn. 1 A 10.0.0.2\n\
         + a3.agents.cairn. 1 A 10.0.0.3"
    );
    // Names are case-insensitive; the answer keeps the question's spelling.
    assert_eq!(
        ask(&v, "_HTTP._Tcp.WEB.Cairn.", RecordType::SRV)
            .lines()
            .count(),
        7
    );
    assert_eq!(
        ask(&v, "WeB.CAIRN.", RecordType::A).lines().nth(1),
        Some("WeB.CAIRN. 1 A 10.0.0.1")
    );
    // A name with no record of the type, and an interior name: no error, no answer.
    assert_eq!(ask(&v, "web.cairn.", RecordType::AAAA), "No Error\n(soa)");
    assert_eq!(ask(&v, "_tcp.web.cairn.", RecordType::A), "No Error\n(soa)");
    assert_eq!(ask(&v, "cairn.", RecordType::A), "No Error\n(soa)");
    assert_eq!(
        ask(&v, "cairn.", RecordType::SOA),
        "No Error\ncairn. 1 SOA ns.cairn. hostmaster.cairn. ".to_string()
            + &format!("{} 60 60 3600 1", v.index)
    );
    // Names that do not exist.
    for n in [
        "nope.cairn.",
        "_ftp._tcp.web.cairn.",
        "x.web.cairn.",
        "a9.agents.cairn.",
    ] {
        assert_eq!(
            ask(&v, n, RecordType::A),
            "Non-Existent Domain\n(soa)",
            "{n}"
        );
    }
    // Outside the zone: refused here (the server forwards before asking).
    assert_eq!(ask(&v, "example.com.", RecordType::A), "Query Refused");

    // A killed task leaves the answers at once.
    let id = w
        .state
        .tasks
        .values()
        .find(|t| t.agent == "a2")
        .unwrap()
        .id
        .clone();
    w.apply(Command::UpdateTaskState {
        id,
        state: TaskState::Killing,
        reason: None,
        at: w.now,
    });
    let v = w.view();
    assert_eq!(
        ask(&v, "web.cairn.", RecordType::A),
        "No Error\nweb.cairn. 1 A 10.0.0.1\nweb.cairn. 1 A 10.0.0.3"
    );
    assert_eq!(
        ask(&v, "_http._tcp.web.cairn.", RecordType::SRV)
            .lines()
            .filter(|l| l.contains("SRV"))
            .count(),
        2
    );
}

#[test]
fn unhealthy_tasks_and_unreachable_agents_are_left_out() {
    let mut w = World::new();
    w.healthy = false;
    w.workload(
        &(WEB.to_string()
            + "health_checks = [{ type = \"tcp\", port = \"http\", max_failures = 1000 }]\n"),
    );
    w.ticks(3);
    assert_eq!(
        ask(&w.view(), "web.cairn.", RecordType::A),
        "No Error\n(soa)"
    );
    w.healthy = true;
    let reports: Vec<(String, String)> = w
        .state
        .tasks
        .values()
        .map(|t| (t.agent.clone(), t.id.clone()))
        .collect();
    for (agent, id) in reports {
        w.apply(Command::UpdateTaskStates {
            agent,
            reports: vec![TaskUpdate {
                id,
                state: TaskState::Running,
                reason: None,
                healthy: Some(true),
            }],
            at: w.now,
        });
    }
    assert_eq!(
        ask(&w.view(), "web.cairn.", RecordType::A).lines().count(),
        4
    );
    w.apply(Command::SetAgentStatus {
        id: "a1".into(),
        status: AgentStatus::Unreachable,
        at: w.now,
    });
    let v = w.view();
    let a = ask(&v, "web.cairn.", RecordType::A);
    assert!(!a.contains("10.0.0.1"), "{a}");
    let a = ask(&v, "agents.cairn.", RecordType::A);
    assert_eq!(
        a,
        "No Error\nagents.cairn. 1 A 10.0.0.2\nagents.cairn. 1 A 10.0.0.3"
    );
}

#[test]
fn masters_leader_and_agents() {
    let v = World::new().view();
    assert_eq!(
        ask(&v, "leader.cairn.", RecordType::A),
        "No Error\nleader.cairn. 1 A 10.0.1.1"
    );
    // A master advertised by host name has no address record.
    assert_eq!(
        ask(&v, "masters.cairn.", RecordType::A),
        "No Error\nmasters.cairn. 1 A 10.0.1.1\nmasters.cairn. 1 A 10.0.1.2"
    );
    assert_eq!(ask(&v, "agents.cairn.", RecordType::A).lines().count(), 4);
    assert_eq!(
        ask(&v, "a3.agents.cairn.", RecordType::A),
        "No Error\na3.agents.cairn. 1 A 10.0.0.3"
    );
    let none = DnsView::from_state(&State::default(), &MasterAddrs::default());
    assert_eq!(
        ask(&none, "leader.cairn.", RecordType::A),
        "No Error\n(soa)"
    );
}

#[test]
fn stateful_pods_have_stable_names() {
    let mut w = World::new();
    let out = w.apply(Command::CreateService {
        service: kv_service(),
        at: w.now,
    });
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    w.ticks(12);
    let v = w.view();
    let pods = &w.state.services["kv"].pods;
    let host = |pod: &str| {
        let a = pods[pod].agent.clone().unwrap();
        host_ip(&w.state.agents[&a].addr).unwrap()
    };
    let (h0, h1) = (host("node-0"), host("node-1"));
    assert_eq!(
        ask(&v, "node-0.kv.cairn.", RecordType::A),
        format!("No Error\nnode-0.kv.cairn. 1 A {h0}")
    );
    let mut both = [h0.to_string(), h1.to_string()];
    both.sort();
    assert_eq!(
        ask(&v, "kv.cairn.", RecordType::A),
        format!(
            "No Error\nkv.cairn. 1 A {}\nkv.cairn. 1 A {}",
            both[0], both[1]
        )
    );
    let srv = ask(&v, "_client._tcp.node-1.kv.cairn.", RecordType::SRV);
    assert!(
        srv.starts_with("No Error\n_client._tcp.node-1.kv.cairn. 1 SRV 0 1 31")
            && srv.contains(" node-1.kv.cairn.\n+ node-1.kv.cairn. 1 A "),
        "{srv}"
    );
    assert_eq!(
        ask(&v, "_client._tcp.kv.cairn.", RecordType::SRV)
            .lines()
            .filter(|l| l.contains("SRV"))
            .count(),
        2
    );
    // The pod's task ends: its name still points at its agent, the service's drops it.
    let id = w
        .state
        .tasks
        .values()
        .find(|t| t.id.starts_with("kv.node-0.") && t.is_live())
        .unwrap()
        .id
        .clone();
    w.apply(Command::UpdateTaskStates {
        agent: pods_agent(&w, "node-0"),
        reports: vec![TaskUpdate {
            id,
            state: TaskState::Failed,
            reason: None,
            healthy: None,
        }],
        at: w.now,
    });
    let v = w.view();
    assert_eq!(
        ask(&v, "node-0.kv.cairn.", RecordType::A),
        format!("No Error\nnode-0.kv.cairn. 1 A {h0}")
    );
    assert_eq!(
        ask(&v, "kv.cairn.", RecordType::A),
        format!("No Error\nkv.cairn. 1 A {h1}")
    );
    // Restarted in place (recovery): the same agent, the same name.
    w.ticks(12);
    let v = w.view();
    assert_eq!(pods_agent(&w, "node-0"), pods_agent_before(&h0, &w));
    assert_eq!(ask(&v, "kv.cairn.", RecordType::A).lines().count(), 3);
}

fn pods_agent(w: &World, pod: &str) -> String {
    w.state.services["kv"].pods[pod].agent.clone().unwrap()
}

fn pods_agent_before(ip: &IpAddr, w: &World) -> String {
    w.state
        .agents
        .values()
        .find(|a| host_ip(&a.addr) == Some(*ip))
        .unwrap()
        .id
        .clone()
}

#[test]
fn endpoints_follow_the_pod_they_name() {
    let mut w = World::new();
    let mut svc = kv_service();
    svc.endpoints.insert("primary".into(), "node-1".into());
    svc.endpoints.insert("standby".into(), "node-9".into());
    w.apply(Command::CreateService {
        service: svc,
        at: w.now,
    });
    w.ticks(12);
    let v = w.view();
    let a = pods_agent(&w, "node-1");
    let h1 = host_ip(&w.state.agents[&a].addr).unwrap();
    assert_eq!(
        ask(&v, "primary.kv.cairn.", RecordType::A),
        format!("No Error\nprimary.kv.cairn. 1 A {h1}")
    );
    let srv = ask(&v, "_client._tcp.primary.kv.cairn.", RecordType::SRV);
    assert!(srv.contains(" node-1.kv.cairn.\n"), "{srv}");
    // An endpoint whose pod does not exist (validation refuses it; state may still carry
    // one) has no address, and is no error either.
    assert_eq!(
        ask(&v, "standby.kv.cairn.", RecordType::A),
        "No Error\n(soa)"
    );
    assert_eq!(
        ask(&v, "nothing.kv.cairn.", RecordType::A),
        "Non-Existent Domain\n(soa)"
    );
}

#[test]
fn labels() {
    let cases = [
        ("web", Some("web")),
        ("Web-2", Some("web-2")),
        ("my_app", None),
        ("-x", None),
        ("x-", None),
        ("", None),
        (&"a".repeat(63) as &str, Some(&"a".repeat(63) as &str)),
        (&"a".repeat(64), None),
    ];
    for (id, want) in cases {
        assert_eq!(label(id).as_deref(), want, "{id:?}");
    }
    assert_eq!(name_label("leader"), None);
    assert_eq!(host_ip("10.1.2.3:80"), Some("10.1.2.3".parse().unwrap()));
    assert_eq!(host_ip("[::1]:80"), Some("::1".parse().unwrap()));
    assert_eq!(host_ip("0.0.0.0:80"), None);
    assert_eq!(host_ip("host.example:80"), None);
}

#[test]
fn a_workload_with_an_underscore_or_a_reserved_id_has_no_name() {
    let mut w = World::new();
    w.workload(&WEB.replace("\"web\"", "\"my_web\""));
    w.workload(
        &WEB.replace("\"web\"", "\"agents\"")
            .replace("instances = 3", "instances = 1"),
    );
    w.ticks(3);
    let v = w.view();
    assert!(
        v.names().keys().all(|n| !n.contains("my")),
        "{:?}",
        v.names()
    );
    assert_eq!(ask(&v, "agents.cairn.", RecordType::A).lines().count(), 4);
    assert_eq!(
        ask(&v, "_http._tcp.agents.cairn.", RecordType::SRV),
        "Non-Existent Domain\n(soa)"
    );
}

#[test]
fn the_view_survives_json() {
    let mut w = World::new();
    w.workload(WEB);
    w.ticks(3);
    let v = w.view();
    let json = serde_json::to_string(&v).unwrap();
    let back: DnsView = serde_json::from_str(&json).unwrap();
    assert_eq!(back, v);
    assert_eq!(
        ask(&back, "_tcp.web.cairn.", RecordType::A),
        "No Error\n(soa)"
    );
}

#[test]
fn handle_packets() {
    let v = World::new().view();
    let bytes = |m: Message| m.to_vec().unwrap();
    let decode = |h: Handled| match h {
        Handled::Reply(b) => Message::from_vec(&b).unwrap(),
        other => panic!("{other:?}"),
    };
    // A plain query.
    let r = decode(handle(
        &v,
        &bytes(query("leader.cairn.", RecordType::A)),
        Transport::Udp,
        false,
    ));
    assert_eq!(r.answers().len(), 1);
    assert!(r.authoritative() && !r.recursion_available());
    // Outside the zone: forwarded, or refused without upstreams.
    let q = bytes(query("example.com.", RecordType::A));
    assert_eq!(handle(&v, &q, Transport::Udp, true), Handled::Forward);
    let r = decode(handle(&v, &q, Transport::Udp, false));
    assert_eq!(r.response_code(), ResponseCode::Refused);
    // Garbage after a query header: FORMERR with its id.
    let mut junk = bytes(query("leader.cairn.", RecordType::A));
    junk.truncate(16);
    junk[0] = 0x12;
    junk[1] = 0x34;
    let r = decode(handle(&v, &junk, Transport::Udp, false));
    assert_eq!((r.id(), r.response_code()), (0x1234, ResponseCode::FormErr));
    // Too short, oversize, or an answer: silence.
    assert_eq!(handle(&v, &[1, 2, 3], Transport::Udp, false), Handled::Drop);
    let mut big = query("leader.cairn.", RecordType::A);
    for i in 0..20 {
        big.add_query(Query::query(
            Name::from_ascii(format!("{}.x{i}.cairn.", "a".repeat(60))).unwrap(),
            RecordType::A,
        ));
    }
    assert_eq!(
        handle(&v, &bytes(big), Transport::Tcp, false),
        Handled::Drop
    );
    let mut resp = query("leader.cairn.", RecordType::A);
    resp.set_message_type(MessageType::Response);
    assert_eq!(
        handle(&v, &bytes(resp), Transport::Udp, false),
        Handled::Drop
    );
    // Two questions: FORMERR.
    let mut two = query("leader.cairn.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("agents.cairn.").unwrap(),
        RecordType::A,
    ));
    let r = decode(handle(&v, &bytes(two), Transport::Udp, false));
    assert_eq!(r.response_code(), ResponseCode::FormErr);
}

#[test]
fn long_udp_answers_are_truncated() {
    let names = HashMap::from([(
        "big.cairn.".to_string(),
        (1..=200u8)
            .map(|i| DnsRecord::Addr {
                ip: IpAddr::from([10, 9, 0, i]),
            })
            .collect(),
    )]);
    let v = DnsView::from_names(1, names);
    let q = query("big.cairn.", RecordType::A).to_vec().unwrap();
    let Handled::Reply(udp) = handle(&v, &q, Transport::Udp, false) else {
        panic!()
    };
    let m = Message::from_vec(&udp).unwrap();
    assert!(m.truncated() && m.answers().is_empty() && udp.len() <= 512);
    let Handled::Reply(tcp) = handle(&v, &q, Transport::Tcp, false) else {
        panic!()
    };
    assert_eq!(Message::from_vec(&tcp).unwrap().answers().len(), 200);
}

mod random {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes: no panic; a reply decodes and carries the packet's id.
        #[test]
        fn random_packets_never_panic(packet in proptest::collection::vec(any::<u8>(), 0..600)) {
            let v = World::new().view();
            for t in [Transport::Udp, Transport::Tcp] {
                for fwd in [false, true] {
                    if let Handled::Reply(b) = handle(&v, &packet, t, fwd) {
                        let m = Message::from_vec(&b).expect("our reply decodes");
                        prop_assert_eq!(&b[..2], &packet[..2]);
                        prop_assert_eq!(m.message_type(), MessageType::Response);
                    }
                }
            }
        }

        /// A valid query with a random name and type, flipped bytes after the header.
        #[test]
        fn mutated_queries_never_panic(
            labels in proptest::collection::vec("[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,18}[a-zA-Z0-9_])?", 1..5),
            qt in any::<u16>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        ) {
            let v = World::new().view();
            let name = format!("{}.cairn.", labels.join("."));
            let mut q = query(&name, RecordType::from(qt)).to_vec().unwrap();
            let n = q.len();
            for (i, b) in flips {
                q[12 + i % (n - 12)] ^= b;
            }
            let _ = handle(&v, &q, Transport::Udp, false);
        }
    }
}
