//! The leader's goal-oriented controller, as one pure function: from the replicated state and
//! the leader's clock, the commands that move the cluster toward what the workloads declare.
//! The leader proposes them; every master applies them; a new leader simply runs it again on
//! the same state (placements carry the workload's task sequence, so a replayed or stale plan
//! is rejected rather than duplicated).
//!
//! - services keep `instances` live tasks of the current version; failures are replaced after
//!   an exponential backoff; tasks of older versions are killed once the new ones run;
//! - jobs run to `instances` completions, retrying failures up to `max_retries`;
//! - cron workloads start a run at each tick of their schedule, never two at once;
//! - system workloads keep one task on every active agent that fits;
//! - tasks on an agent that stops heartbeating become `unreachable`, then `lost` after
//!   `lost_after_ms`, and are replaced elsewhere; stopped or removed workloads' tasks are killed;
//! - stateful services advance their plans (`service::driver::commands`).

use crate::model::{AgentStatus, Task, TaskState, Workload, WorkloadKind};
use crate::scheduler::{ask_for, Constraint, ConstraintOp};
use crate::state::{Command, State};

/// Controller settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long an unreachable agent's tasks wait before they are `lost` and replaced.
    pub lost_after_ms: u64,
    /// Ended tasks kept per workload beyond the retention (`gc`).
    pub gc_keep: usize,
    /// Ended tasks younger than this are always kept (`gc`).
    pub gc_retention_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            gc_keep: 10,
            gc_retention_ms: 3_600_000,
            lost_after_ms: 30_000,
        }
    }
}

fn set(t: &Task, state: TaskState, reason: &str, now: u64) -> Command {
    Command::UpdateTaskState {
        id: t.id.clone(),
        state,
        reason: Some(reason.into()),
        at: now,
    }
}

/// Consecutive failures of the workload's current version (newest first), and when the last
/// one happened. A service task has no business ending, so for services an exit 0 counts
/// too (else `/bin/true` as a service restarts as fast as the cluster can); a task that ran
/// longer than the backoff's cap was healthy and ends the streak.
fn failures(w: &Workload, tasks: &[&Task]) -> (u32, u64) {
    let mut ended: Vec<&&Task> = tasks
        .iter()
        .filter(|t| t.version == w.version && t.state.is_terminal())
        .collect();
    ended.sort_by_key(|t| std::cmp::Reverse((t.updated_at, t.created_at)));
    let mut n = 0;
    let mut last = 0;
    for t in ended {
        let failed = match t.state {
            TaskState::Failed | TaskState::Lost => true,
            TaskState::Finished => w.kind == WorkloadKind::Service,
            _ => false,
        };
        let ran = t.updated_at.saturating_sub(t.created_at);
        if !failed || (n > 0 && ran > w.restart.max_ms) {
            break;
        }
        n += 1;
        last = last.max(t.updated_at);
        if ran > w.restart.max_ms {
            break;
        }
    }
    (n, last)
}

/// When the next replacement may start after `n` consecutive failures.
pub fn backoff_until(w: &Workload, n: u32, last_failure: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let d = (w.restart.base_ms as f64 * w.restart.factor.powi(n as i32 - 1))
        .min(w.restart.max_ms as f64);
    last_failure + d as u64
}

/// The commands that move `state` toward its goal at `now` (Unix ms, the leader's clock).
pub fn reconcile(state: &State, now: u64, cfg: &Config) -> Vec<Command> {
    let mut out = Vec::new();
    // Agent loss first: it changes which tasks count as live.
    for t in state.tasks.values().filter(|t| t.is_live()) {
        let Some(a) = state.agents.get(&t.agent) else {
            out.push(set(t, TaskState::Lost, "agent_removed", now));
            continue;
        };
        if a.status == AgentStatus::Unreachable {
            if now.saturating_sub(a.status_changed_at) >= cfg.lost_after_ms {
                out.push(set(t, TaskState::Lost, "agent_lost", now));
            } else if t.state != TaskState::Unreachable {
                out.push(set(t, TaskState::Unreachable, "agent_unreachable", now));
            }
        }
    }
    let lost: std::collections::HashSet<String> = out
        .iter()
        .filter_map(|c| match c {
            Command::UpdateTaskState {
                id,
                state: TaskState::Lost,
                ..
            } => Some(id.clone()),
            _ => None,
        })
        .collect();
    let mut by_workload: std::collections::HashMap<&str, Vec<&Task>> = Default::default();
    for t in state.tasks.values() {
        by_workload.entry(t.workload.as_str()).or_default().push(t);
    }
    // Tasks of removed or stopped workloads are killed.
    for t in state
        .tasks
        .values()
        .filter(|t| t.is_live() && t.state != TaskState::Killing)
    {
        // Pod tasks of stateful services are killed by `service::driver::sync_tasks`.
        if crate::service::driver::service_of(t).is_some() {
            continue;
        }
        let gone = state.workloads.get(&t.workload).is_none_or(|w| w.stopped);
        if gone && !lost.contains(&t.id) {
            out.push(set(t, TaskState::Killing, "workload_stopped", now));
        }
    }
    // Counts what stateful services hold too (placed pods, volumes).
    let mut snap = crate::service::driver::snapshot(state);
    for w in state.workloads.values().filter(|w| !w.stopped) {
        let tasks: Vec<&Task> = by_workload.get(w.id.as_str()).cloned().unwrap_or_default();
        // Live: holds resources and may still run (unreachable ones may come back).
        let live = |t: &&&Task| t.is_live() && !lost.contains(&t.id);
        let current: Vec<&Task> = tasks
            .iter()
            .filter(|t| live(t) && t.version == w.version && t.state != TaskState::Killing)
            .copied()
            .collect();
        let old: Vec<&Task> = tasks
            .iter()
            .filter(|t| live(t) && t.version != w.version && t.state != TaskState::Killing)
            .copied()
            .collect();
        let (fails, last_fail) = failures(w, &tasks);
        let backoff_ok = now >= backoff_until(w, fails, last_fail);
        let want: usize = match w.kind {
            WorkloadKind::Service => w.instances as usize,
            WorkloadKind::Job => {
                let done = tasks
                    .iter()
                    .filter(|t| t.version == w.version && t.state == TaskState::Finished)
                    .count();
                let failed_total = tasks
                    .iter()
                    .filter(|t| {
                        t.version == w.version
                            && matches!(t.state, TaskState::Failed | TaskState::Lost)
                    })
                    .count();
                if failed_total > w.max_retries as usize {
                    0 // given up: the job failed
                } else {
                    (w.instances as usize).saturating_sub(done)
                }
            }
            WorkloadKind::Cron => {
                let last_run = tasks.iter().map(|t| t.created_at).max().unwrap_or(0);
                let since = last_run.max(w.updated_at).max(w.last_tick);
                let due = w
                    .schedule
                    .as_ref()
                    .and_then(|s| crate::spec::next_fire(s, since))
                    .filter(|&next| next <= now);
                match due {
                    // Due, and the previous run has ended: start a run.
                    Some(_) if current.is_empty() => w.instances as usize,
                    // Due while a run is still going: this tick is skipped (no overlap).
                    Some(tick) => {
                        out.push(Command::SkipCronTick {
                            id: w.id.clone(),
                            tick,
                        });
                        current.len()
                    }
                    None => current.len(),
                }
            }
            WorkloadKind::System => 0,
        };
        // A rolling change: old versions go as new tasks become ready, keeping at least
        // `min_healthy` of the instances ready and at most `max_over` extra.
        let ready_new = current.iter().filter(|t| t.is_ready()).count();
        let mut room = usize::MAX;
        if w.kind == WorkloadKind::Service && !old.is_empty() {
            let n = want;
            let min_ready = (w.upgrade.min_healthy * n as f64).ceil() as usize;
            let mut max_over = (w.upgrade.max_over * n as f64).ceil() as usize;
            if max_over == 0 && min_ready >= n {
                max_over = 1; // otherwise nothing could ever move
            }
            let ready_old: Vec<&&Task> = old.iter().filter(|t| t.is_ready()).collect();
            let mut killable = (ready_new + ready_old.len()).saturating_sub(min_ready);
            if ready_new >= n {
                killable = ready_old.len();
            }
            let mut kept_old = 0;
            // Old tasks that are not ready hold no capacity worth keeping.
            for t in old.iter().filter(|t| !t.is_ready()) {
                out.push(set(t, TaskState::Killing, "replaced", now));
            }
            for t in ready_old {
                if killable > 0 {
                    killable -= 1;
                    out.push(set(t, TaskState::Killing, "replaced", now));
                } else {
                    kept_old += 1;
                }
            }
            room = (n + max_over).saturating_sub(current.len() + kept_old);
        } else if w.kind != WorkloadKind::System && !old.is_empty() {
            for t in &old {
                out.push(set(t, TaskState::Killing, "replaced", now));
            }
        }
        // The roll-out of the current version: done, or failed (rolled back).
        if let Some(d) = state
            .deployments
            .get(&format!("{}@{}", w.id, w.version))
            .filter(|d| d.state == crate::model::DeploymentState::Running)
        {
            let failed_new = tasks
                .iter()
                .filter(|t| {
                    t.version == w.version && matches!(t.state, TaskState::Failed | TaskState::Lost)
                })
                .count();
            let overdue = now > d.started_at + w.upgrade.deadline_ms;
            let done = match w.kind {
                WorkloadKind::System => {
                    !current.is_empty() && old.is_empty() && current.iter().all(|t| t.is_ready())
                }
                _ => old.is_empty() && ready_new >= want,
            };
            if done {
                out.push(Command::FinishDeployment {
                    id: d.id.clone(),
                    state: crate::model::DeploymentState::Succeeded,
                    message: String::new(),
                    at: now,
                });
            } else if failed_new > 0 || overdue {
                let reason = if overdue {
                    format!("not ready within {} ms", w.upgrade.deadline_ms)
                } else {
                    format!("{failed_new} new task(s) failed")
                };
                out.push(match (&w.previous, d.from_version) {
                    (Some(_), Some(_)) => Command::RollbackWorkload {
                        id: w.id.clone(),
                        version: w.version,
                        reason,
                        at: now,
                    },
                    _ => Command::FinishDeployment {
                        id: d.id.clone(),
                        state: crate::model::DeploymentState::Failed,
                        message: reason,
                        at: now,
                    },
                });
            }
        }
        if w.kind == WorkloadKind::System {
            let have: std::collections::HashSet<&str> =
                current.iter().map(|t| t.agent.as_str()).collect();
            let mut placements = Vec::new();
            for a in state.agents.values() {
                if a.status != AgentStatus::Active || have.contains(a.id.as_str()) || !backoff_ok {
                    continue;
                }
                let mut ask = ask_for(w);
                ask.constraints.push(Constraint {
                    field: "@id".into(),
                    op: ConstraintOp::Is,
                    value: Some(a.id.clone()),
                });
                let (p, _) = snap.place(&ask, 1);
                placements.extend(p);
            }
            if !placements.is_empty() {
                out.push(Command::PlaceTasks {
                    workload: w.id.clone(),
                    version: w.version,
                    seq: w.next_seq,
                    placements,
                    at: now,
                });
            }
            for t in &old {
                out.push(set(t, TaskState::Killing, "replaced", now));
            }
            continue;
        }
        if current.len() > want && w.kind == WorkloadKind::Service {
            // Scale down: the newest go first.
            let mut extra = current.clone();
            extra.sort_by_key(|t| std::cmp::Reverse(task_seq(&t.id)));
            for t in extra.iter().take(current.len() - want) {
                out.push(set(t, TaskState::Killing, "scaled_down", now));
            }
        }
        let need = want.saturating_sub(current.len()).min(room);
        if need > 0 && backoff_ok {
            let (placements, _) = snap.place(&ask_for(w), need);
            if !placements.is_empty() {
                out.push(Command::PlaceTasks {
                    workload: w.id.clone(),
                    version: w.version,
                    seq: w.next_seq,
                    placements,
                    at: now,
                });
            }
        }
    }
    // Stateful services: the plan engine's next steps.
    out.extend(crate::service::driver::commands(state, now));
    out.extend(crate::gc::commands(
        state,
        now,
        cfg.gc_keep,
        cfg.gc_retention_ms,
    ));
    out
}

fn task_seq(id: &str) -> u64 {
    id.rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::state::{apply, Outcome};
    use std::collections::BTreeMap;

    fn agent(id: &str) -> AgentRegistration {
        AgentRegistration {
            id: id.into(),
            hostname: "h".into(),
            addr: "127.0.0.1:1".into(),
            resources: AgentResources {
                unreserved: Resources {
                    cpus: 4.0,
                    mem: 4096,
                    disk: 1000,
                    ports: vec![PortRange {
                        begin: 31000,
                        end: 31100,
                    }],
                },
                reserved: BTreeMap::new(),
            },
            attributes: BTreeMap::new(),
            version: "t".into(),
        }
    }

    fn workload(id: &str, kind: WorkloadKind, instances: u32) -> Workload {
        let mut spec = crate::spec::from_toml(&format!(
            "id = \"{id}\"\n[runtime.native]\ncmd = \"/bin/true\"\nargs = []\n[resources]\ncpus = 1.0\nmem = 64\n"
        ))
        .unwrap();
        spec.kind = kind;
        spec.instances = (kind != WorkloadKind::System).then_some(instances);
        if kind == WorkloadKind::Cron {
            spec.schedule = Some(crate::spec::ScheduleSpec {
                cron: "* * * * *".into(),
                timezone: "UTC".into(),
            });
        }
        spec.validate().unwrap()
    }

    struct World {
        s: State,
        index: u64,
        cfg: Config,
    }

    impl World {
        fn new(agents: &[&str]) -> Self {
            let mut w = World {
                s: State::default(),
                index: 0,
                cfg: Config {
                    lost_after_ms: 10_000,
                    ..Config::default()
                },
            };
            for a in agents {
                w.apply(Command::RegisterAgent {
                    reg: agent(a),
                    at: 0,
                });
            }
            w
        }
        fn apply(&mut self, c: Command) -> Outcome {
            self.index += 1;
            apply(&mut self.s, self.index, c)
        }
        /// Runs the controller and applies what it proposes; returns how many commands.
        fn tick(&mut self, now: u64) -> usize {
            let cmds = reconcile(&self.s, now, &self.cfg);
            let n = cmds.len();
            for c in cmds {
                self.apply(c);
            }
            n
        }
        fn live(&self, w: &str) -> Vec<Task> {
            self.s
                .tasks
                .values()
                .filter(|t| t.workload == w && t.is_live() && t.state != TaskState::Killing)
                .cloned()
                .collect()
        }
        /// The agent reports every staging task of a workload running (or ended).
        fn report(&mut self, w: &str, to: TaskState, now: u64) {
            let ids: Vec<String> = self
                .s
                .tasks
                .values()
                .filter(|t| t.workload == w && t.is_live() && t.state != to)
                .map(|t| t.id.clone())
                .collect();
            for id in ids {
                // Agents report `running` before a task can finish.
                if to == TaskState::Finished && self.s.tasks[&id].state == TaskState::Staging {
                    self.apply(Command::UpdateTaskState {
                        id: id.clone(),
                        state: TaskState::Running,
                        reason: None,
                        at: now,
                    });
                }
                self.apply(Command::UpdateTaskState {
                    id,
                    state: to,
                    reason: None,
                    at: now,
                });
            }
        }
    }

    #[test]
    fn a_service_is_placed_kept_and_not_duplicated() {
        let mut w = World::new(&["a1", "a2"]);
        w.apply(Command::PutWorkload {
            workload: workload("web", WorkloadKind::Service, 3),
            at: 0,
        });
        w.tick(1);
        assert_eq!(w.live("web").len(), 3);
        // Running the controller again changes nothing.
        assert_eq!(w.tick(2), 0);
        w.report("web", TaskState::Running, 3);
        // The roll-out is recorded as done, then nothing more happens.
        assert_eq!(w.tick(4), 1);
        assert_eq!(
            w.s.deployments[&format!("web@{}", w.s.workloads["web"].version)].state,
            DeploymentState::Succeeded
        );
        assert_eq!(w.tick(4), 0);
        // A plan computed on an old state (here: replayed after it applied) is rejected whole.
        w.apply(Command::ScaleWorkload {
            id: "web".into(),
            instances: 4,
            at: 5,
        });
        let plan = reconcile(&w.s, 6, &w.cfg);
        assert_eq!(plan.len(), 1);
        assert!(matches!(w.apply(plan[0].clone()), Outcome::Done { .. }));
        assert!(matches!(
            w.apply(plan[0].clone()),
            Outcome::Rejected { code, .. } if code == "stale_plan"
        ));
        assert_eq!(w.live("web").len(), 4);
    }

    #[test]
    fn failures_are_replaced_after_a_growing_backoff() {
        let mut w = World::new(&["a1"]);
        w.apply(Command::PutWorkload {
            workload: workload("web", WorkloadKind::Service, 1),
            at: 0,
        });
        w.tick(0);
        w.report("web", TaskState::Failed, 1_000);
        // Backoff 1 s after the first failure.
        w.tick(1_500);
        assert!(w.live("web").is_empty());
        w.tick(2_000);
        assert_eq!(w.live("web").len(), 1);
        w.report("web", TaskState::Failed, 2_100);
        // Second consecutive failure: 2 s.
        w.tick(3_100);
        assert!(w.live("web").is_empty());
        w.tick(4_100);
        assert_eq!(w.live("web").len(), 1);
    }

    /// Issue 13: a service task exiting 0 was restarted at once, forever (13 tasks a second
    /// for `/bin/true`); now every exit of a service task counts for the backoff, and the
    /// ended tasks are collected.
    #[test]
    fn a_service_exiting_zero_backs_off_and_its_ended_tasks_are_collected() {
        let mut w = World::new(&["a1"]);
        w.cfg.gc_keep = 2;
        w.cfg.gc_retention_ms = 5_000;
        w.apply(Command::PutWorkload {
            workload: workload("web", WorkloadKind::Service, 1),
            at: 0,
        });
        w.tick(0);
        w.report("web", TaskState::Finished, 1_000);
        w.tick(1_500);
        assert!(w.live("web").is_empty(), "restarted before the backoff");
        w.tick(2_000);
        assert_eq!(w.live("web").len(), 1);
        w.report("web", TaskState::Finished, 2_100);
        w.tick(3_100);
        assert!(w.live("web").is_empty(), "the second exit waits 2 s");
        w.tick(4_100);
        assert_eq!(w.live("web").len(), 1);
        // Many exits later, only the newest ended tasks (and the young ones) stay.
        let mut at = 4_200;
        for _ in 0..6 {
            w.report("web", TaskState::Finished, at);
            at += 61_000;
            w.tick(at);
        }
        let ended = w.s.tasks.values().filter(|t| !t.is_live()).count();
        assert_eq!(ended, 2, "{:?}", w.s.tasks.keys().collect::<Vec<_>>());
    }

    #[test]
    fn unreachable_then_lost_then_replaced_and_the_old_task_is_not_assigned() {
        let mut w = World::new(&["a1", "a2"]);
        let mut spec = workload("web", WorkloadKind::Service, 1);
        spec.constraints = vec![];
        w.apply(Command::PutWorkload {
            workload: spec,
            at: 0,
        });
        w.tick(0);
        w.report("web", TaskState::Running, 1);
        let first = w.live("web")[0].clone();
        w.apply(Command::SetAgentStatus {
            id: first.agent.clone(),
            status: AgentStatus::Unreachable,
            at: 100,
        });
        w.tick(200);
        assert_eq!(w.s.tasks[&first.id].state, TaskState::Unreachable);
        assert_eq!(w.live("web").len(), 1, "no replacement before the timeout");
        w.tick(10_100);
        assert_eq!(w.s.tasks[&first.id].state, TaskState::Lost);
        w.tick(10_200);
        let live = w.live("web");
        assert_eq!(live.len(), 1);
        assert_ne!(live[0].agent, first.agent);
        // The agent comes back: its lost task stays lost (it is no longer assigned).
        w.apply(Command::SetAgentStatus {
            id: first.agent.clone(),
            status: AgentStatus::Active,
            at: 20_000,
        });
        w.tick(20_001);
        assert_eq!(w.live("web").len(), 1);
    }

    #[test]
    fn jobs_retry_up_to_max_retries() {
        let mut w = World::new(&["a1"]);
        let mut job = workload("batch", WorkloadKind::Job, 1);
        job.max_retries = 2;
        job.restart.base_ms = 0;
        w.apply(Command::PutWorkload {
            workload: job,
            at: 0,
        });
        for i in 0..3 {
            w.tick(i * 10);
            assert_eq!(w.live("batch").len(), 1, "attempt {i}");
            w.report("batch", TaskState::Failed, i * 10 + 1);
        }
        w.tick(100);
        assert!(w.live("batch").is_empty(), "gave up after 2 retries");
        // A job that finishes is done.
        let mut ok = workload("ok", WorkloadKind::Job, 1);
        ok.restart.base_ms = 0;
        w.apply(Command::PutWorkload {
            workload: ok,
            at: 0,
        });
        w.tick(200);
        w.report("ok", TaskState::Finished, 201);
        w.tick(300);
        assert!(w.live("ok").is_empty());
    }

    #[test]
    fn cron_fires_on_schedule_without_overlap() {
        let mut w = World::new(&["a1"]);
        let t0 = 1_767_225_600_000u64; // a minute boundary
        w.apply(Command::PutWorkload {
            workload: workload("tick", WorkloadKind::Cron, 1),
            at: t0 + 1,
        });
        w.tick(t0 + 30_000);
        assert!(w.live("tick").is_empty(), "not before the minute");
        w.tick(t0 + 60_000);
        assert_eq!(w.live("tick").len(), 1);
        // Still running at the next minute: no second run.
        w.tick(t0 + 120_000);
        assert_eq!(w.live("tick").len(), 1);
        w.report("tick", TaskState::Finished, t0 + 121_000);
        w.tick(t0 + 150_000);
        assert!(w.live("tick").is_empty());
        w.tick(t0 + 180_000);
        assert_eq!(w.live("tick").len(), 1);
    }

    #[test]
    fn rolling_change_keeps_min_healthy_and_a_failing_version_rolls_back() {
        let mut w = World::new(&["a1", "a2"]);
        let spec = |v: &str| {
            let mut s = crate::spec::from_toml(&format!(
                "id = \"web\"\ninstances = 2\nports = [{{ name = \"http\", number = 0 }}]\n\
                 health_checks = [{{ type = \"tcp\", grace = \"0s\" }}]\n\
                 upgrade = {{ min_healthy = 1.0, max_over = 0.5 }}\nenv = {{ V = \"{v}\" }}\n\
                 [runtime.native]\ncmd = \"/bin/true\"\n"
            ))
            .unwrap()
            .validate()
            .unwrap();
            s.restart.base_ms = 0;
            s
        };
        let ready = |w: &World| {
            w.live("web")
                .iter()
                .filter(|t| t.is_ready() && t.state != TaskState::Killing)
                .count()
        };
        let healthy = |w: &mut World, now: u64| {
            w.report("web", TaskState::Running, now);
            let live: Vec<(String, String)> = w
                .live("web")
                .iter()
                .map(|t| (t.id.clone(), t.agent.clone()))
                .collect();
            for (id, agent) in live {
                w.apply(Command::UpdateTaskStates {
                    agent,
                    reports: vec![crate::state::TaskUpdate {
                        id,
                        state: TaskState::Running,
                        reason: None,
                        healthy: Some(true),
                    }],
                    at: now,
                });
            }
        };
        w.apply(Command::PutWorkload {
            workload: spec("1"),
            at: 0,
        });
        w.tick(1);
        healthy(&mut w, 2);
        w.tick(3);
        let v1 = w.s.workloads["web"].version;
        assert_eq!(
            w.s.deployments[&format!("web@{v1}")].state,
            DeploymentState::Succeeded
        );
        // Version 2 rolls one task at a time (max_over 0.5 of 2 = 1 extra).
        w.apply(Command::PutWorkload {
            workload: spec("2"),
            at: 10,
        });
        let v2 = w.s.workloads["web"].version;
        for step in 0..6 {
            w.tick(11 + step);
            assert!(w.live("web").len() <= 3, "more than max_over extra");
            assert!(ready(&w) >= 2, "below min_healthy at step {step}");
            healthy(&mut w, 11 + step);
        }
        let live = w.live("web");
        assert_eq!(live.len(), 2);
        assert!(live.iter().all(|t| t.version == v2 && t.env["V"] == "2"));
        w.tick(20);
        assert_eq!(
            w.s.deployments[&format!("web@{v2}")].state,
            DeploymentState::Succeeded
        );
        // Version 3 fails its first new task: back to version 2's spec.
        w.apply(Command::PutWorkload {
            workload: spec("3"),
            at: 30,
        });
        let v3 = w.s.workloads["web"].version;
        w.tick(31);
        let new: Vec<Task> = w
            .live("web")
            .into_iter()
            .filter(|t| t.version == v3)
            .collect();
        assert_eq!(new.len(), 1);
        w.apply(Command::UpdateTaskState {
            id: new[0].id.clone(),
            state: TaskState::Failed,
            reason: Some("unhealthy".into()),
            at: 32,
        });
        w.tick(33);
        let wl = &w.s.workloads["web"];
        assert_eq!(wl.env["V"], "2", "rolled back");
        assert!(wl.version > v3);
        assert_eq!(
            w.s.deployments[&format!("web@{v3}")].state,
            DeploymentState::RolledBack
        );
        assert!(ready(&w) >= 2, "the old tasks kept serving");
    }

    #[test]
    fn system_workloads_follow_agents() {
        let mut w = World::new(&["a1", "a2"]);
        w.apply(Command::PutWorkload {
            workload: workload("logs", WorkloadKind::System, 0),
            at: 0,
        });
        w.tick(1);
        assert_eq!(w.live("logs").len(), 2);
        w.apply(Command::RegisterAgent {
            reg: agent("a3"),
            at: 2,
        });
        w.tick(3);
        let mut on: Vec<String> = w.live("logs").iter().map(|t| t.agent.clone()).collect();
        on.sort();
        assert_eq!(on, ["a1", "a2", "a3"]);
    }

    #[test]
    fn a_new_version_replaces_the_old_once_running_and_scale_keeps_tasks() {
        let mut w = World::new(&["a1", "a2"]);
        w.apply(Command::PutWorkload {
            workload: workload("web", WorkloadKind::Service, 2),
            at: 0,
        });
        w.tick(1);
        w.report("web", TaskState::Running, 2);
        let v1: Vec<String> = w.live("web").iter().map(|t| t.id.clone()).collect();
        // Same spec again: nothing changes (but the first roll-out is done).
        w.apply(Command::PutWorkload {
            workload: workload("web", WorkloadKind::Service, 2),
            at: 3,
        });
        assert_eq!(w.tick(4), 1);
        assert_eq!(w.tick(4), 0);
        let mut v2 = workload("web", WorkloadKind::Service, 2);
        v2.env.insert("V".into(), "2".into());
        w.apply(Command::PutWorkload {
            workload: v2,
            at: 5,
        });
        w.tick(6);
        // New tasks placed, old ones still running until the new ones run.
        assert_eq!(w.live("web").len(), 4);
        w.report("web", TaskState::Running, 7);
        w.tick(8);
        let live: Vec<String> = w.live("web").iter().map(|t| t.id.clone()).collect();
        assert_eq!(live.len(), 2);
        assert!(live.iter().all(|id| !v1.contains(id)));
        w.apply(Command::ScaleWorkload {
            id: "web".into(),
            instances: 1,
            at: 9,
        });
        w.tick(10);
        assert_eq!(w.live("web").len(), 1);
        w.apply(Command::SetWorkloadStopped {
            id: "web".into(),
            stopped: true,
            at: 11,
        });
        w.tick(12);
        assert!(w.live("web").is_empty());
    }
}
