//! Garbage collection of ended tasks, pure like the controller: ended tasks are kept in
//! replicated state only as long as someone needs them, so state and snapshots stay bounded
//! under any spec (a service whose command exits at once used to add a task a second,
//! forever). Like Nomad's `job_gc_threshold`:
//!
//! - per workload (and per stateful-service pod type), the `keep` newest ended tasks stay,
//!   and so does every ended task younger than `retention_ms`;
//! - a job's ended tasks of its current version all stay while the job exists (they are its
//!   completions and its retry count);
//! - ended tasks of a removed workload or service go once older than `retention_ms`.

use crate::model::{Task, WorkloadKind};
use crate::state::{Command, State};
use std::collections::BTreeMap;

/// Most ids one `RemoveTasks` command carries (a big backlog goes over several passes).
pub const MAX_PER_PASS: usize = 2_000;

/// The ended tasks to forget at `now`, as one command (`None`: nothing to do).
pub fn commands(state: &State, now: u64, keep: usize, retention_ms: u64) -> Option<Command> {
    let mut by_group: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in state.tasks.values().filter(|t| !t.is_live()) {
        by_group.entry(t.workload.as_str()).or_default().push(t);
    }
    let mut ids = Vec::new();
    for (group, mut ended) in by_group {
        let workload = state.workloads.get(group);
        let exists = workload.is_some()
            || crate::service::driver::service_of(ended[0])
                .is_some_and(|s| state.services.contains_key(s));
        ended.sort_by_key(|t| std::cmp::Reverse((t.updated_at, t.created_at)));
        for (i, t) in ended.iter().enumerate() {
            let young = now.saturating_sub(t.updated_at) < retention_ms;
            let needed = match workload {
                Some(w) => w.kind == WorkloadKind::Job && t.version == w.version,
                None => false,
            };
            let kept = young || needed || (exists && i < keep);
            if !kept {
                ids.push(t.id.clone());
                if ids.len() == MAX_PER_PASS {
                    return Some(Command::RemoveTasks { ids, at: now });
                }
            }
        }
    }
    (!ids.is_empty()).then_some(Command::RemoveTasks { ids, at: now })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{TaskState, Workload};

    fn workload(id: &str, kind: WorkloadKind, version: u64) -> Workload {
        let mut spec = crate::spec::from_toml(&format!(
            "id = \"{id}\"\n[runtime.native]\ncmd = \"/bin/true\"\n"
        ))
        .unwrap();
        spec.kind = kind;
        let mut w = spec.validate().unwrap();
        w.version = version;
        w
    }

    fn task(id: &str, workload_id: &str, version: u64, state: TaskState, at: u64) -> Task {
        let w = workload(workload_id, WorkloadKind::Service, version);
        let mut t = Task::of(&w, id.into(), "a1".into(), &[], None, at);
        t.state = state;
        t.updated_at = at;
        t
    }

    fn state(tasks: Vec<Task>, workloads: &[(&str, WorkloadKind, u64)]) -> State {
        let mut s = State::default();
        for (id, kind, version) in workloads {
            s.workloads
                .insert(id.to_string(), workload(id, *kind, *version));
        }
        for t in tasks {
            s.tasks.insert(t.id.clone(), t);
        }
        s
    }

    fn removed(s: &State, now: u64) -> Vec<String> {
        match commands(s, now, 3, 1_000) {
            Some(Command::RemoveTasks { mut ids, .. }) => {
                ids.sort();
                ids
            }
            None => vec![],
            Some(c) => panic!("{c:?}"),
        }
    }

    #[test]
    fn keeps_the_newest_the_young_and_what_jobs_need() {
        use TaskState::*;
        // A service restarting in a loop: 6 ended (t0..t5, newest t5) and one running.
        let mut tasks: Vec<Task> = (0..6)
            .map(|i| task(&format!("web.{i}"), "web", 1, Finished, 100 + i))
            .collect();
        tasks.push(task("web.9", "web", 1, Running, 100));
        // A job: current-version completions stay; an older version's go.
        tasks.push(task("job.0", "job", 2, Finished, 100));
        tasks.push(task("job.1", "job", 2, Failed, 101));
        tasks.extend((2..7).map(|i| task(&format!("job.{i}"), "job", 1, Finished, 100 + i)));
        // A removed workload: everything old goes, the young stays.
        tasks.push(task("gone.0", "gone", 1, Killed, 100));
        tasks.push(task("gone.1", "gone", 1, Killed, 5_500));
        let s = state(
            tasks,
            &[
                ("web", WorkloadKind::Service, 1),
                ("job", WorkloadKind::Job, 2),
            ],
        );
        // At 5_000 (keep 3, retention 1_000): web keeps its 3 newest ended (web.3..5) and the
        // running one; job keeps its current version's job.0/job.1 and, of the rest, the 3
        // newest of the group (job.4..6); the removed workload keeps only its young task.
        let got = removed(&s, 5_000);
        assert_eq!(
            got,
            ["gone.0", "job.2", "job.3", "web.0", "web.1", "web.2"],
            "{got:?}"
        );
        // Everything younger than the retention stays.
        assert_eq!(removed(&s, 150), Vec::<String>::new());
    }
}
