//! Pure scheduler throughput: 100,000 tasks over 10,000 agents, with constraints.
//! `cargo bench -p cairn-kernel --bench scheduler`

use cairn_kernel::model::{Agent, AgentResources, AgentStatus, PortRange, Resources};
use cairn_kernel::scheduler::{Ask, Constraint, Snapshot, Strategy};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::BTreeMap;

fn agents(n: usize) -> Vec<Agent> {
    (0..n)
        .map(|i| Agent {
            id: format!("agent-{i:05}"),
            hostname: format!("host-{i:05}"),
            addr: String::new(),
            resources: AgentResources {
                unreserved: Resources {
                    cpus: 16.0,
                    mem: 65536,
                    disk: 100_000,
                    ports: vec![PortRange {
                        begin: 31000,
                        end: 32000,
                    }],
                },
                reserved: BTreeMap::new(),
            },
            attributes: [
                ("zone".to_string(), format!("z{}", i % 3)),
                ("rack".to_string(), format!("r{}", i % 200)),
            ]
            .into_iter()
            .collect(),
            status: AgentStatus::Active,
            registered_at: 0,
            status_changed_at: 0,
            version: String::new(),
        })
        .collect()
}

fn constraint(c: &[&str]) -> Constraint {
    Constraint::parse(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

/// 1,000 workloads × 100 instances; every workload has two constraints.
fn place_all(agents: &[Agent], strategy: Strategy) -> usize {
    let mut s = Snapshot::new(agents, []);
    let mut placed = 0;
    for w in 0..1000 {
        let ask = Ask {
            workload: format!("w{w}"),
            role: None,
            cpus: 0.1,
            mem: 128,
            disk: 0,
            ports: vec![0],
            constraints: vec![
                constraint(&["rack", "MAX_PER", "10"]),
                constraint(&["@zone", "LIKE", "z[0-2]"]),
            ],
            strategy,
        };
        let (p, _) = s.place(&ask, 100);
        placed += p.len();
    }
    placed
}

fn bench(c: &mut Criterion) {
    let agents = agents(10_000);
    assert_eq!(place_all(&agents, Strategy::Binpack), 100_000);
    let mut g = c.benchmark_group("schedule_100k_tasks_10k_agents");
    g.sample_size(10);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("binpack", |b| {
        b.iter(|| place_all(&agents, Strategy::Binpack))
    });
    g.bench_function("spread", |b| {
        b.iter(|| place_all(&agents, Strategy::Spread))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
