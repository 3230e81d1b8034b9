//! Grows memory until the host's limit traps it.
fn main() {
    let mut hold: Vec<Vec<u8>> = Vec::new();
    loop {
        hold.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hold);
    }
}
