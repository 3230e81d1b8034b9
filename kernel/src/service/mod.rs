//! Stateful services (`/api/v1/services`): pod types whose instances keep their index, agent
//! and volumes for life, persistent volume reservations, and plans → phases → steps that
//! deploy, recover, decommission and run declared operations, all as pure functions over
//! replicated state.
//!
//! Not to be confused with `kind = "service"` workloads (`crate::model::Workload`), whose
//! tasks are interchangeable and keep nothing when they move. Rust names here say
//! `StatefulService`, `PodType`, `PodInstance` so the two never mix.
//!
//! - `spec`: the TOML/JSON schema users write and its validation into `model::StatefulService`;
//! - `update`: validators refusing spec changes that would lose data;
//! - `model`: replicated types (`ServiceState`, `PodInstance`, `VolumeReservation`);
//! - `plan`: steps, phases, plans, strategies, operator operations, built-in plans;
//! - `ops`: the pure state changes `state::apply` makes for service commands;
//! - `reconcile`: `reconcile_service`, the engine deciding the next actions;
//! - `render`: config templates rendered (minijinja) into the files a pod task gets;
//! - `driver`: the leader's commands from those actions (pods placed by the scheduler), and
//!   the pod tasks `apply` hands to agents as ordinary `model::Task`s.

pub mod commands;
pub mod driver;
pub mod model;
pub mod ops;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod spec;
pub mod update;

pub use model::{
    PackageRef, PodInstance, PodType, ServiceState, StatefulService, VolumeReservation,
};
pub use ops::ServiceOp;
pub use reconcile::{reconcile_service, Action, Observed};
