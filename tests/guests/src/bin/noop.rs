//! Does nothing and exits 0: the start-latency probe.
fn main() {}
