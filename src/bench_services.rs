//! Stateful-service benchmarks (`cairn bench plans`, `cairn bench service-deploy`): the pure
//! plan engine's reconcile pass over many services, and the wall time of a real 3-pod
//! deploy with volumes and readiness checks on a local master and agent.

use cairn_installer::lab::Lab;
use cairn_kernel::model::{AgentRegistration, AgentResources, PortRange, Resources, TaskState};
use cairn_kernel::service::plan::PlanStatus;
use cairn_kernel::state::{apply, Command, State, TaskUpdate};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token-0123456789";

fn service_spec(name: &str, pods: u32, cmd: &str) -> String {
    format!(
        r#"name = "{name}"
[[pod_types]]
name = "node"
count = {pods}
volumes = [{{ name = "data", path = "data", size_mb = 16 }}]
[[pod_types.tasks]]
name = "server"
runtime.native = {{ cmd = "/bin/sh", args = ["-c", "{cmd}"] }}
resources = {{ cpus = 0.01, mem = 16 }}
ports = [{{ name = "http", number = 0 }}]
readiness_check = {{ type = "command", command = ["/bin/sh", "-c", "test -e data/ready"], grace = "0s", interval = "50ms" }}
templates = [{{ path = "data/conf", template = "{{{{ pod.name }}}} of {{{{ pods | length }}}}" }}]
"#
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `services` services of `pods` pods each on 100 agents, deployed in memory by the real
/// leader code (`controller::reconcile` → `apply`, fake agents reporting), timing
/// `service::driver::commands` (the plan engine's pass over every service) on the way and
/// once everything is complete.
pub fn plans(services: usize, pods: u32) -> anyhow::Result<()> {
    let mut state = State::default();
    let mut index = 0u64;
    let mut step = |state: &mut State, c: Command| {
        index += 1;
        apply(state, index, c)
    };
    for i in 0..100 {
        let resources = AgentResources {
            unreserved: Resources {
                cpus: 1024.0,
                mem: 1 << 30,
                disk: 1 << 30,
                ports: vec![PortRange {
                    begin: 10_000,
                    end: 60_000,
                }],
            },
            reserved: Default::default(),
        };
        step(
            &mut state,
            Command::RegisterAgent {
                reg: AgentRegistration {
                    id: format!("agent-{i}"),
                    hostname: format!("host-{i}"),
                    addr: format!("10.0.{}.{}:5051", i / 250, i % 250 + 1),
                    resources,
                    attributes: Default::default(),
                    version: "0".into(),
                },
                at: 0,
            },
        );
    }
    for s in 0..services {
        let spec = cairn_kernel::service::spec::from_toml(&service_spec(
            &format!("svc-{s}"),
            pods,
            "exec sleep 1000",
        ))
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
        step(
            &mut state,
            Command::CreateService {
                service: spec,
                at: 1,
            },
        );
    }
    let mut deploying = Vec::new();
    let mut now = 1_000u64;
    let started = Instant::now();
    let mut rounds = 0;
    loop {
        let complete = state.services.values().all(|s| {
            s.plans
                .get("deploy")
                .is_some_and(|p| p.status() == PlanStatus::Complete)
        });
        if complete {
            break;
        }
        anyhow::ensure!(rounds < 200, "the deploys did not complete in 200 rounds");
        rounds += 1;
        now += 500;
        let t = Instant::now();
        let cmds = cairn_kernel::service::driver::commands(&state, now);
        deploying.push(t.elapsed().as_secs_f64() * 1e3);
        for c in cmds {
            step(&mut state, c);
        }
        let mut by_agent: std::collections::BTreeMap<String, Vec<TaskUpdate>> = Default::default();
        for t in state.tasks.values() {
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
            step(
                &mut state,
                Command::UpdateTaskStates {
                    agent,
                    reports,
                    at: now,
                },
            );
        }
    }
    let setup = started.elapsed();
    let mut steady: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            let cmds = cairn_kernel::service::driver::commands(&state, now);
            assert!(cmds.is_empty(), "a complete cluster needs no commands");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let max_deploying = deploying.iter().cloned().fold(0.0, f64::max);
    println!(
        "| services | pods | tasks | steady pass median ms | deploying pass median ms | deploying pass max ms | rounds to complete | in-memory deploy s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {services} | {} | {} | {:.2} | {:.2} | {:.2} | {rounds} | {:.1} |",
        services * pods as usize,
        state.tasks.values().filter(|t| t.is_live()).count(),
        median(&mut steady),
        median(&mut deploying),
        max_deploying,
        setup.as_secs_f64()
    );
    Ok(())
}

/// Wall time from `POST /api/v1/services` to the deploy plan `complete` for a 3-pod service
/// with a volume, a config template and a readiness check per pod, on one local master and
/// one agent; `runs` times, the service removed in between.
pub async fn service_deploy(runs: usize, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let bin = std::env::current_exe()?;
    let mut lab = Lab::start(&bin, &dir, 1, TOKEN, &[])?;
    lab.wait_leader(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    lab.start_agent(&[
        "--resources",
        "cpus:4;mem:4096;disk:10000;ports:[33000-33999]",
        "--heartbeat-interval",
        "500ms",
    ])?;
    let master = lab.running_addrs()[0].clone();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab
        .get(&master, "/api/v1/agents")
        .await
        .and_then(|v| v.as_array().map(|a| a.len()))
        != Some(1)
    {
        anyhow::ensure!(Instant::now() < deadline, "the agent did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times = Vec::new();
    for run in 0..runs {
        let name = format!("bench-{run}");
        let spec = service_spec(&name, 3, "touch data/ready; exec sleep 1000");
        let t = Instant::now();
        let r = http
            .post(format!("http://{master}/api/v1/services"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/toml")
            .body(spec)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "create: {}", r.text().await?);
        loop {
            let p = lab
                .get(&master, &format!("/api/v1/services/{name}/plans/deploy"))
                .await
                .unwrap_or_default();
            match p["status"].as_str() {
                Some("complete") => break,
                Some("error") => anyhow::bail!("deploy failed: {p:#}"),
                _ => {}
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "deploy stuck: {p:#}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(t.elapsed().as_secs_f64());
        http.delete(format!("http://{master}/api/v1/services/{name}"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
    }
    let mut sorted = times.clone();
    println!("| runs | median s | min s | max s |");
    println!("|---|---|---|---|");
    println!(
        "| {runs} | {:.2} | {:.2} | {:.2} |",
        median(&mut sorted),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    Ok(())
}
