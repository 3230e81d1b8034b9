//! Cluster routes: status, membership changes.

use super::{Api, Ctx};
use crate::error::{ApiError, JsonBody};
use axum::extract::Path;
use axum::Json;
use cairn_raft::node::MembershipOp;
use serde::{Deserialize, Serialize};

/// A master as `GET /api/v1/cluster` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// The master's API address.
    pub addr: String,
    /// The master's Raft peer address.
    #[serde(default)]
    pub peer: String,
    pub voter: bool,
    pub leader: bool,
}

/// The answer of `GET /api/v1/cluster`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub state: String,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub members: Vec<Member>,
    /// Tasks by state, from this master's applied state.
    pub tasks: std::collections::BTreeMap<String, usize>,
    /// Agents by status.
    #[serde(default)]
    pub agents: std::collections::BTreeMap<String, usize>,
    #[serde(default)]
    pub workloads: usize,
    #[serde(default)]
    pub services: usize,
}

/// Members and the leader as this master knows them: O(members), cheap enough for every
/// heartbeat (unlike `cluster_status`, which also counts tasks).
pub(super) fn membership(api: &Api) -> (Vec<Member>, Option<(u64, String)>) {
    let m = api.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| Member {
            id: *id,
            addr: n.api.clone(),
            peer: n.peer.clone(),
            voter: voters.contains(id),
            leader: m.current_leader == Some(*id),
        })
        .collect();
    // A leader without a quorum's recent acknowledgement does not name itself (check-quorum).
    let leader = api.node.leader().map(|(id, n)| (id, n.api));
    (members, leader)
}

pub(super) fn cluster_status(api: &Api) -> ClusterStatus {
    let m = api.node.raft.metrics().borrow().clone();
    let (members, leader) = membership(api);
    // One read of the state for every count, so they agree with each other.
    let (tasks, agents, workloads, services) = api.read(|s| {
        let mut agents = std::collections::BTreeMap::new();
        for a in s.agents.values() {
            *agents
                .entry(format!("{:?}", a.status).to_lowercase())
                .or_insert(0) += 1;
        }
        (
            crate::model::count_states(s.tasks.values()),
            agents,
            s.workloads.len(),
            s.services.len(),
        )
    });
    ClusterStatus {
        node_id: m.id,
        state: format!("{:?}", m.state).to_lowercase(),
        leader_id: leader.as_ref().map(|(id, _)| *id),
        leader_addr: leader.map(|(_, a)| a),
        term: m.current_term,
        commit_index: api
            .node
            .stats
            .committed
            .load(std::sync::atomic::Ordering::Relaxed),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        last_log_index: m.last_log_index.unwrap_or(0),
        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        members,
        tasks,
        agents,
        workloads,
        services,
    }
}

pub(super) async fn cluster(ctx: Ctx) -> Json<ClusterStatus> {
    Json(cluster_status(&ctx))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddMember {
    id: u64,
    /// The new master's API address.
    addr: String,
    /// The new master's Raft peer address (default: the API port + 2).
    #[serde(default)]
    peer: Option<String>,
}

pub(super) async fn add_member(
    ctx: Ctx,
    JsonBody(b): JsonBody<AddMember>,
) -> Result<Json<ClusterStatus>, ApiError> {
    if b.id == 0 {
        return Err(ApiError::bad_request("id", "master ids start at 1"));
    }
    if b.addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::bad_request(
            "addr",
            format!("addr {:?} is not HOST:PORT, e.g. 127.0.0.1:5080", b.addr),
        ));
    }
    let peer = match b.peer {
        Some(p) => p,
        None => cairn_raft::MasterNode::default_peer(&b.addr)
            .map_err(|e| ApiError::bad_request("peer", e))?,
    };
    if peer.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::bad_request(
            "peer",
            format!("peer {peer:?} is not HOST:PORT: give the new master's --peer-listen address"),
        ));
    }
    ctx.node
        .change_membership(MembershipOp::Add {
            id: b.id,
            node: cairn_raft::MasterNode { api: b.addr, peer },
        })
        .await?;
    Ok(Json(cluster_status(&ctx)))
}

pub(super) async fn remove_member(
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("id", format!("master id {id:?} is not a number")))?;
    let known = membership(&ctx).0.iter().any(|m| m.id == id);
    if !known {
        return Err(ApiError::not_found(format!(
            "no master {id} in the cluster"
        )));
    }
    ctx.node
        .change_membership(MembershipOp::Remove { id })
        .await?;
    Ok(Json(cluster_status(&ctx)))
}
