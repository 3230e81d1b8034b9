//! Stateful service plan engine: one reconcile pass over 1,000 services × 5 pods, settled (the
//! steady state a leader re-checks every pass) and mid-deploy (every service rolling).
//! `cargo bench -p cairn-kernel --bench services`

use cairn_kernel::model::TaskState;
use cairn_kernel::service::ops::{apply_op, new_service, update_service, ServiceOp};
use cairn_kernel::service::reconcile::{AgentFact, Observed, TaskFact};
use cairn_kernel::service::{reconcile_service, spec, Action, ServiceState};
use criterion::{criterion_group, criterion_main, Criterion};

const SPEC: &str = r#"
name = "NAME"
[[pod_types]]
name = "node"
count = 5
volumes = [{ name = "data", path = "data", size_mb = 100 }]
tasks = [{ name = "server", runtime.native = { cmd = "/bin/db" }, ports = [{ name = "db", number = 0 }], readiness_check = { type = "tcp" } }]
"#;

/// Drives one service until reconcile proposes nothing, with agents reporting every launch
/// running and ready.
fn settle(svc: &mut ServiceState, obs: &mut Observed, now: &mut u64) {
    for _ in 0..100 {
        *now += 1;
        let actions = reconcile_service(svc, obs, *now);
        if actions.is_empty() {
            return;
        }
        for a in actions {
            let op = match a {
                Action::PlacePod { pod, incarnation } => ServiceOp::PlacePod {
                    agent: format!("a{}", pod.len() % 10),
                    pod,
                    incarnation,
                },
                Action::Op(op) => op,
            };
            apply_op(svc, op, *now).unwrap();
        }
        for p in svc.pods.values() {
            let facts = obs.tasks.entry(p.id.clone()).or_default();
            for (t, target) in &p.tasks {
                facts.insert(
                    t.clone(),
                    TaskFact {
                        agent: p.agent.clone().unwrap(),
                        generation: target.generation,
                        state: TaskState::Running,
                        ready: true,
                        message: String::new(),
                    },
                );
            }
        }
    }
}

fn services(n: usize) -> (Vec<ServiceState>, Observed) {
    let mut obs = Observed::default();
    for i in 0..10 {
        let fact = AgentFact {
            active: true,
            since: 0,
        };
        obs.agents.insert(format!("a{i}"), fact);
    }
    let mut now = 0;
    let all = (0..n)
        .map(|i| {
            let text = SPEC.replace("NAME", &format!("db{i}"));
            let spec = spec::from_toml(&text).unwrap().validate().unwrap();
            let mut svc = new_service(spec, 1, 0);
            settle(&mut svc, &mut obs, &mut now);
            svc
        })
        .collect();
    (all, obs)
}

fn bench(c: &mut Criterion) {
    let (mut all, obs) = services(1_000);
    c.bench_function("reconcile 1000 services x 5 pods, settled", |b| {
        b.iter(|| {
            all.iter()
                .map(|s| reconcile_service(s, &obs, 1_000_000).len())
                .sum::<usize>()
        })
    });
    for s in &mut all {
        let text = SPEC
            .replace("NAME", &s.spec.name)
            .replace("/bin/db", "/bin/db2");
        let spec = spec::from_toml(&text).unwrap().validate().unwrap();
        update_service(s, spec, false, 2, 10).unwrap();
    }
    c.bench_function("reconcile 1000 services x 5 pods, deploying", |b| {
        b.iter(|| {
            all.iter()
                .map(|s| reconcile_service(s, &obs, 1_000_000).len())
                .sum::<usize>()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
