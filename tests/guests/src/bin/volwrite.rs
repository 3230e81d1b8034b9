//! Appends its first argument as a line to the file at its second (e.g. `data/log`, a path in
//! a preopened volume) and prints the file: a Wasm task writing persistent data.
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (line, path) = (&args[1], &args[2]);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the file in the volume");
    writeln!(f, "{line}").expect("write");
    print!("{}", std::fs::read_to_string(path).expect("read back"));
}
