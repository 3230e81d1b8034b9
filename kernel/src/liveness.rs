//! Agent liveness: heartbeats are leader-local soft state (never Raft writes); only the
//! transitions `active → unreachable → active` are committed. `decide` is the pure core.

use crate::model::AgentStatus;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Given each agent's committed status and when this leader last heard it, returns the
/// status changes to commit.
pub fn decide(
    agents: &[(String, AgentStatus)],
    last_seen: &HashMap<String, Instant>,
    now: Instant,
    timeout: Duration,
) -> Vec<(String, AgentStatus)> {
    let mut out = Vec::new();
    for (id, status) in agents {
        let fresh = last_seen
            .get(id)
            .is_some_and(|t| now.saturating_duration_since(*t) <= timeout);
        match (status, fresh) {
            (AgentStatus::Active, false) => out.push((id.clone(), AgentStatus::Unreachable)),
            (AgentStatus::Unreachable, true) => out.push((id.clone(), AgentStatus::Active)),
            _ => {}
        }
    }
    out
}

/// The leader's heartbeat table.
#[derive(Default)]
pub struct Liveness {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    last_seen: HashMap<String, Instant>,
    /// The term in which this node last became leader; the table is reset on a new term.
    term: Option<u64>,
}

impl Liveness {
    /// Records a heartbeat from `agent`.
    pub fn beat(&self, agent: &str, now: Instant) {
        self.inner
            .lock()
            .expect("liveness lock")
            .last_seen
            .insert(agent.to_string(), now);
    }

    /// Called on every monitor tick while leading. On a new term every known agent gets a
    /// full timeout of grace, so a leader change never marks healthy agents unreachable; so
    /// does an agent this leader sees for the first time (one that registered through a
    /// follower has not sent the leader a heartbeat yet).
    pub fn tick(
        &self,
        term: u64,
        agents: &[(String, AgentStatus)],
        now: Instant,
        timeout: Duration,
    ) -> Vec<(String, AgentStatus)> {
        let mut g = self.inner.lock().expect("liveness lock");
        if g.term != Some(term) {
            g.term = Some(term);
            for (id, status) in agents {
                if *status == AgentStatus::Active {
                    g.last_seen.entry(id.clone()).or_insert(now);
                    if let Some(t) = g.last_seen.get_mut(id) {
                        *t = (*t).max(now);
                    }
                }
            }
        }
        for (id, status) in agents {
            if *status == AgentStatus::Active {
                g.last_seen.entry(id.clone()).or_insert(now);
            }
        }
        decide(agents, &g.last_seen, now, timeout)
    }

    /// Forgets everything (on losing leadership).
    pub fn reset(&self) {
        let mut g = self.inner.lock().expect("liveness lock");
        g.last_seen.clear();
        g.term = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        let agents = vec![
            ("fresh".to_string(), AgentStatus::Active),
            ("stale".to_string(), AgentStatus::Active),
            ("never".to_string(), AgentStatus::Active),
            ("back".to_string(), AgentStatus::Unreachable),
            ("gone".to_string(), AgentStatus::Unreachable),
        ];
        let seen = HashMap::from([
            ("fresh".to_string(), t0 + Duration::from_secs(9)),
            ("stale".to_string(), t0 + Duration::from_secs(5)),
            ("back".to_string(), t0 + Duration::from_secs(8)),
            ("gone".to_string(), t0),
        ]);
        let now = t0 + Duration::from_secs(10);
        assert_eq!(
            decide(&agents, &seen, now, timeout),
            vec![
                ("stale".to_string(), AgentStatus::Unreachable),
                ("never".to_string(), AgentStatus::Unreachable),
                ("back".to_string(), AgentStatus::Active),
            ]
        );
    }

    #[test]
    fn new_term_gives_grace() {
        let l = Liveness::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        let agents = vec![("a".to_string(), AgentStatus::Active)];
        // A new leader that never heard "a" does not mark it unreachable at once...
        assert!(l.tick(5, &agents, t0, timeout).is_empty());
        assert!(l
            .tick(5, &agents, t0 + Duration::from_secs(2), timeout)
            .is_empty());
        // ...but does once a full timeout passes without a heartbeat.
        assert_eq!(
            l.tick(5, &agents, t0 + Duration::from_secs(4), timeout),
            vec![("a".to_string(), AgentStatus::Unreachable)]
        );
        l.beat("a", t0 + Duration::from_secs(5));
        let back = vec![("a".to_string(), AgentStatus::Unreachable)];
        assert_eq!(
            l.tick(5, &back, t0 + Duration::from_secs(6), timeout),
            vec![("a".to_string(), AgentStatus::Active)]
        );
    }

    #[test]
    fn a_new_agent_gets_grace_until_its_first_heartbeat() {
        // "b" registered through a follower at t0+7: the leader has heard nothing from it.
        let l = Liveness::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(3);
        l.beat("a", t0);
        let one = vec![("a".to_string(), AgentStatus::Active)];
        assert!(l.tick(5, &one, t0, timeout).is_empty());
        let two = vec![
            ("a".to_string(), AgentStatus::Active),
            ("b".to_string(), AgentStatus::Active),
        ];
        l.beat("a", t0 + Duration::from_secs(7));
        assert!(l
            .tick(5, &two, t0 + Duration::from_secs(7), timeout)
            .is_empty());
        assert!(l
            .tick(5, &two, t0 + Duration::from_secs(9), timeout)
            .is_empty());
        assert_eq!(
            l.tick(5, &two, t0 + Duration::from_secs(11), timeout),
            vec![
                ("a".to_string(), AgentStatus::Unreachable),
                ("b".to_string(), AgentStatus::Unreachable)
            ]
        );
    }
}
