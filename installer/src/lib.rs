//! Bootstrapping clusters. Today: `lab`, local multi-master clusters of `cairn` processes on
//! loopback (used by `cairn bench`, the end-to-end tests, and later `cairn lab up`).

pub mod lab;
