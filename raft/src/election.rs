//! Pre-vote elections. openraft 0.9 campaigns on its own timer and raises its term every time,
//! so a follower cut off from the others comes back with a higher term and deposes a healthy
//! leader. Cairn turns openraft's own election off (`enable_elect = false`) and campaigns here
//! instead: a follower that has not heard a leader for a randomised timeout first asks the
//! other voters whether they would vote for it (pre-vote, Raft thesis §9.6, etcd's `PreVote`);
//! only when a majority says yes does it call `trigger().elect()`, which runs the real Raft
//! election. Pre-vote only decides *when* to campaign, never who wins, so Raft's safety is
//! untouched: the vote itself is still openraft's.
//!
//! A voter grants a pre-vote only if it has not heard a leader for the leader lease (openraft's
//! `election_timeout_max`, during which openraft refuses real votes anyway) and the
//! candidate's log is at least as up to date as its own.

use crate::{NodeId, Raft};
use openraft::LogId;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When this node last heard a live leader (or granted a real vote), shared by the RPC
/// handlers that see leader traffic and the campaign loop.
#[derive(Debug)]
pub struct Contact {
    base: Instant,
    last_ms: AtomicU64,
    /// Pre-vote rounds this node started, and real elections it triggered (metrics).
    pub prevotes: AtomicU64,
    pub elections: AtomicU64,
}

impl Default for Contact {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            prevotes: AtomicU64::new(0),
            elections: AtomicU64::new(0),
        }
    }
}

impl Contact {
    /// Records leader traffic now.
    pub fn touch(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// How long since the last leader traffic.
    pub fn silence(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A pre-vote request: "would you vote for me if I campaigned now?"
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId<NodeId>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    pub term: u64,
}

/// What a voter knows when a pre-vote arrives.
#[derive(Clone, Debug)]
pub struct VoterView {
    pub is_leader: bool,
    pub silence: Duration,
    pub last_log_id: Option<LogId<NodeId>>,
    pub term: u64,
}

/// The pure pre-vote rule.
pub fn decide_prevote(me: &VoterView, req: &PreVoteRequest, lease: Duration) -> PreVoteResponse {
    let granted = !me.is_leader && me.silence >= lease && req.last_log_id >= me.last_log_id;
    PreVoteResponse {
        granted,
        term: me.term,
    }
}

/// Whether a pre-vote round won: `granted` counts the other voters that said yes; the
/// candidate votes for itself.
pub fn won(granted: usize, voters: usize) -> bool {
    granted + 1 > voters / 2
}

/// Sends pre-votes to peers; implemented by the HTTP transport.
pub trait PreVoteClient: Send + Sync + 'static {
    fn prevote(
        &self,
        peer: String,
        req: PreVoteRequest,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Option<PreVoteResponse>> + Send;
}

/// The campaign loop: runs on the Raft runtime until the node shuts down.
pub async fn campaign_loop<C: PreVoteClient>(
    raft: Raft,
    contact: Arc<Contact>,
    client: C,
    min: Duration,
    lease: Duration,
) {
    use rand::Rng;
    let mut timeout = lease + min.mul_f64(rand::thread_rng().gen::<f64>());
    // When this node last campaigned: kept apart from `contact`, which means "heard a
    // leader" and decides whether this node grants others' pre-votes. Counting our own
    // rounds as leader contact made two candidates refuse each other for a lease each.
    let mut last_round: Option<Instant> = None;
    let tick = (min / 10).max(Duration::from_millis(5));
    loop {
        tokio::time::sleep(tick).await;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        if m.current_leader == Some(m.id) {
            contact.touch();
            continue;
        }
        let membership = m.membership_config.membership().clone();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let waited = last_round.map_or(Duration::MAX, |t| t.elapsed());
        if !voters.contains(&m.id) || contact.silence() < timeout || waited < timeout {
            continue;
        }
        contact.prevotes.fetch_add(1, Ordering::Relaxed);
        let last_log_id = raft.data_metrics().borrow().last_log;
        let req = PreVoteRequest {
            candidate: m.id,
            last_log_id,
        };
        let asks = voters
            .iter()
            .filter(|v| **v != m.id)
            .filter_map(|v| membership.get_node(v).map(|n| n.peer.clone()))
            .map(|peer| client.prevote(peer, req.clone(), min));
        let answers = futures::future::join_all(asks).await;
        let granted = answers.iter().flatten().filter(|a| a.granted).count();
        if won(granted, voters.len()) {
            tracing::info!(
                term = m.current_term,
                granted,
                voters = voters.len(),
                "pre-vote won; campaigning"
            );
            contact.elections.fetch_add(1, Ordering::Relaxed);
            if raft.trigger().elect().await.is_err() {
                return;
            }
        }
        // Wait a fresh random timeout before the next round (split votes, lost pre-votes).
        last_round = Some(Instant::now());
        timeout = min + min.mul_f64(rand::thread_rng().gen::<f64>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    #[test]
    fn prevote_table() {
        let lease = Duration::from_millis(1000);
        let view = |is_leader, silence_ms, last| VoterView {
            is_leader,
            silence: Duration::from_millis(silence_ms),
            last_log_id: last,
            term: 7,
        };
        let req = |last| PreVoteRequest {
            candidate: 2,
            last_log_id: last,
        };
        // (voter, request, granted)
        let cases = [
            // A voter that hears its leader refuses: a cut-off follower cannot disrupt.
            (view(false, 10, log(7, 100)), req(log(7, 100)), false),
            (view(false, 999, log(7, 100)), req(log(7, 100)), false),
            // The leader itself refuses.
            (view(true, 5000, log(7, 100)), req(log(7, 200)), false),
            // Leader silent past the lease, candidate's log as new: yes.
            (view(false, 1000, log(7, 100)), req(log(7, 100)), true),
            (view(false, 5000, log(7, 100)), req(log(7, 101)), true),
            (view(false, 5000, log(6, 100)), req(log(7, 1)), true),
            // Candidate's log behind (lower index, or lower term): it could not win.
            (view(false, 5000, log(7, 100)), req(log(7, 99)), false),
            (view(false, 5000, log(7, 100)), req(log(6, 500)), false),
            (view(false, 5000, log(7, 100)), req(None), false),
            // Empty logs everywhere (a new cluster): yes.
            (view(false, 5000, None), req(None), true),
        ];
        for (i, (v, r, want)) in cases.iter().enumerate() {
            assert_eq!(decide_prevote(v, r, lease).granted, *want, "case {i}");
        }
    }

    #[test]
    fn majority_table() {
        // (granted by others, voters, won)
        for (g, n, want) in [
            (0, 1, true),
            (0, 3, false),
            (1, 3, true),
            (2, 3, true),
            (1, 5, false),
            (2, 5, true),
            (0, 2, false),
            (1, 2, true),
        ] {
            assert_eq!(won(g, n), want, "{g} of {n}");
        }
    }
}
