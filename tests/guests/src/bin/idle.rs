//! Sleeps for an hour: an idle task for the density benchmark.
fn main() {
    std::thread::sleep(std::time::Duration::from_secs(3600));
}
