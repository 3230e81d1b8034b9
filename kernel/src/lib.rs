//! The master's brain: the domain model, the replicated state machine (`Command` + `apply`),
//! agent liveness, and the master's HTTP API. Knows nothing of HTML, cgroups or wasmtime.

pub mod admission;
pub mod api;
pub mod controller;
pub mod dns;
pub mod dns_server;
pub mod error;
pub mod gc;
pub mod join;
pub mod liveness;
pub mod master;
pub mod model;
pub mod protocol;
pub mod resources;
pub mod scheduler;
pub mod service;
pub mod spec;
pub mod state;
