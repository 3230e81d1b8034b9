//! Exits with status 3.
fn main() {
    std::process::exit(3);
}
