//! The agent: joins the masters, heartbeats, and (as the runtime grows) runs tasks.
//! Only this crate touches the host: resources, cgroups, namespaces, wasmtime.

pub mod agent;
pub mod detect;
