//! Rebuilds the crate when a bundled package changes (`include_dir!` embeds `packages/`).

fn main() {
    println!("cargo:rerun-if-changed=packages");
}
