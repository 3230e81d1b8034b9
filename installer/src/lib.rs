//! Bootstrapping clusters: `lab`, local multi-master clusters of `cairn` processes on
//! loopback for tests and benchmarks, and `labs`, the named clusters of `cairn lab up`.

pub mod install;
pub mod lab;
pub mod labs;
pub mod netns;
pub mod pki;
