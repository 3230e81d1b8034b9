//! Cairn's consensus layer: openraft type config, sled-backed log and state-machine storage,
//! the HTTP transport, and a `RaftNode` that forwards writes and read barriers to the leader.
//!
//! This crate is generic: commands are opaque bytes handed to an [`App`]; it knows nothing of
//! agents, workloads or tasks.

pub mod backoff;
pub mod election;
pub mod network;
pub mod node;
pub mod store;
pub mod tls;

use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// An opaque, already-serialized application command, with a random id that makes retries
/// idempotent: the state machine remembers recent ids and answers a repeat from memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: [u64; 2],
    pub data: Vec<u8>,
}

/// One Raft log entry: the proposals the leader gathered while the previous entry was being
/// committed (group commit: one fsync and one replication round for many writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub batch: Vec<Proposal>,
}

/// The serialized results of applying each proposal of a [`Request`], in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Vec<Vec<u8>>);

openraft::declare_raft_types!(
    /// Cairn's openraft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = MasterNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;

/// A master as the Raft membership records it: where clients reach its API, and where its
/// peers reach its Raft RPCs (a port of its own, as etcd's 2380 beside 2379, so no amount of
/// client traffic queues in front of a vote or a heartbeat).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterNode {
    /// `host:port` of the master's HTTP API.
    pub api: String,
    /// `host:port` of the master's Raft peer listener.
    pub peer: String,
}

impl MasterNode {
    /// The peer address a master has when none is given: its API host, port + 2
    /// (5050 -> 5052).
    pub fn default_peer(api: &str) -> Result<String, String> {
        let a: std::net::SocketAddr = api
            .parse()
            .map_err(|_| format!("{api:?} is not HOST:PORT"))?;
        let port = a
            .port()
            .checked_add(2)
            .ok_or_else(|| format!("{api}: no port + 2 for the peer address; give it"))?;
        Ok(std::net::SocketAddr::new(a.ip(), port).to_string())
    }
}

impl std::fmt::Display for MasterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "api={} peer={}", self.api, self.peer)
    }
}
pub type Raft = openraft::Raft<TypeConfig>;

/// The replicated application: a deterministic state machine over opaque commands.
///
/// `apply` must be pure with respect to its inputs (no clock, no randomness, no IO) so that
/// every replica reaches the same state.
pub trait App: Send + Sync + 'static {
    /// Apply one committed command at `index` and return the serialized outcome.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// Serialize the whole state for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replace the whole state with a snapshot produced by [`App::snapshot`].
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
}
