//! Tries to read files outside its preopened sandbox; exits 0 only if every attempt fails.
fn main() {
    let mut escaped = false;
    for path in ["/etc/shadow", "/etc/passwd", "../escape-target", "../../etc/passwd"] {
        match std::fs::read(path) {
            Ok(_) => {
                println!("{path}: READ");
                escaped = true;
            }
            Err(e) => println!("{path}: denied ({e})"),
        }
    }
    match std::net::TcpStream::connect("127.0.0.1:1") {
        Ok(_) => {
            println!("socket: CONNECTED");
            escaped = true;
        }
        Err(e) => println!("socket: denied ({e})"),
    }
    std::process::exit(if escaped { 1 } else { 0 });
}
