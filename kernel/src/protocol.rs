//! The agent↔master wire types: what an agent long-polls (`Assignment`), what a heartbeat
//! answers (`HeartbeatReply`) and what an agent reports (`TaskReport`). Both sides share them.

use crate::model::Task;
use serde::{Deserialize, Serialize};

/// One task an agent should run, with the workload it belongs to.
#[derive(Debug, Serialize, Deserialize)]
pub struct Assignment {
    pub task: Task,
}

/// The answer to a heartbeat.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub leader_id: u64,
    pub masters: Vec<String>,
    /// When the masters last changed this agent's status (leader's Unix ms). A new value
    /// tells the agent to report every task again: while it was marked unreachable its tasks
    /// were too, and an agent that never noticed would otherwise leave them so.
    #[serde(default)]
    pub status_epoch: u64,
}

/// A task state an agent reports.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    pub id: String,
    pub state: crate::model::TaskState,
    pub reason: Option<String>,
    /// What the task's health checks say (absent: no checks or no result yet).
    #[serde(default)]
    pub healthy: Option<bool>,
}
