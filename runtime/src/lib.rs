//! The agent: joins the masters, heartbeats, runs tasks (native cgroup containers and Wasm)
//! and serves their sandboxes. Only this crate touches the host: resources, cgroups,
//! namespaces, wasmtime.

pub mod agent;
pub mod agent_api;
pub mod cgroups;
pub mod converge;
pub mod detect;
pub mod images;
pub mod init;
pub mod isolation;
pub mod metrics;
pub mod sandbox;
pub mod sim;
pub mod task;
pub mod tasks;
pub mod volumes;
pub mod wasm;
pub mod wasm_http;
