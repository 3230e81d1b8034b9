//! Replaces its sandbox's `stdout` and `stderr` with symlinks to `args[1]` (a relative path
//! leading out of the sandbox), then prints to both: the agent must not write through them.
//! Exits 0 whether or not the writes fail.
use std::io::Write as _;

fn main() {
    let target = std::env::args().nth(1).expect("usage: logswap TARGET");
    for log in ["stdout", "stderr"] {
        let _ = std::fs::remove_file(log);
        #[allow(deprecated)]
        let made = std::fs::soft_link(&target, log);
        eprintln!("{log} -> {target}: {made:?}");
    }
    let _ = writeln!(std::io::stdout(), "pwned by stdout");
    let _ = std::io::stdout().flush();
    let _ = writeln!(std::io::stderr(), "pwned by stderr");
}
