//! Prints its arguments and Cairn environment, writes a file into its preopened sandbox.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("hello from wasm args={:?}", &args[1..]);
    println!("task={}", std::env::var("CAIRN_TASK_ID").unwrap_or_default());
    println!("port0={}", std::env::var("PORT0").unwrap_or_default());
    std::fs::write("written-by-guest.txt", "guest was here").expect("write into the sandbox");
    eprintln!("to stderr");
}
