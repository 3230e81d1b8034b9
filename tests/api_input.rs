//! End-to-end: bad input gets the right 4xx and a JSON error naming the field, and changes
//! nothing. Also bad command-line flags fail with a clear message.

mod common;

use common::*;
use std::time::Duration;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    token: Option<&'static str>,
    body: Vec<u8>,
    content_type: Option<&'static str>,
}

fn case(name: &'static str, method: &'static str, path: &'static str, body: &str) -> Case {
    Case {
        name,
        method,
        path,
        token: Some(TOKEN),
        body: body.as_bytes().to_vec(),
        content_type: Some("application/json"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_json_errors_and_changes_nothing() {
    let (_d, lab) = lab(1, &[]);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    let addr = lab.running_addrs()[0].clone();
    let http = http();
    put_until_ok(&lab, "keep", "original").await;
    // The index of that write (the applied index in /cluster lags behind a little).
    let before = lab.get(&addr, "/api/v1/kv/keep").await.unwrap()["modify_index"]
        .as_u64()
        .unwrap();

    let mut cases = vec![
        case("malformed json", "PUT", "/api/v1/kv/keep", r#"{"value": "#),
        case("wrong type", "PUT", "/api/v1/kv/keep", r#"{"value": 5}"#),
        case(
            "unknown field",
            "PUT",
            "/api/v1/kv/keep",
            r#"{"value": "x", "ttl": 3}"#,
        ),
        case("missing field", "PUT", "/api/v1/kv/keep", r#"{}"#),
        case(
            "negative cas",
            "PUT",
            "/api/v1/kv/keep",
            r#"{"value": "x", "cas": -1}"#,
        ),
        case(
            "bad key",
            "PUT",
            "/api/v1/kv/bad%20key",
            r#"{"value": "x"}"#,
        ),
        case(
            "cas mismatch",
            "PUT",
            "/api/v1/kv/keep",
            r#"{"value": "x", "cas": 999999}"#,
        ),
        case("agent wrong type", "POST", "/api/v1/agents", r#"{"id": 1}"#),
        case(
            "agent bad addr",
            "POST",
            "/api/v1/agents",
            r#"{"id":"a","hostname":"h","addr":"nowhere","resources":{"unreserved":{"cpus":1,"mem":1,"disk":1,"ports":[]},"reserved":{}},"attributes":{},"version":"x"}"#,
        ),
        case(
            "agent bad ports",
            "POST",
            "/api/v1/agents",
            r#"{"id":"a","hostname":"h","addr":"127.0.0.1:1","resources":{"unreserved":{"cpus":1,"mem":1,"disk":1,"ports":[{"begin":9,"end":3}]},"reserved":{}},"attributes":{},"version":"x"}"#,
        ),
        case(
            "member bad addr",
            "POST",
            "/api/v1/cluster/members",
            r#"{"id": 9, "addr": "x"}"#,
        ),
        case(
            "remove unknown member",
            "DELETE",
            "/api/v1/cluster/members/42",
            "",
        ),
        case(
            "heartbeat unknown agent",
            "POST",
            "/api/v1/agents/ghost/heartbeat",
            "",
        ),
        case("unknown route", "GET", "/api/v1/nothing-here", ""),
        case("wrong method", "PATCH", "/api/v1/kv/keep", "{}"),
        case("bad query", "GET", "/api/v1/kv/keep?index=abc", ""),
        case("unknown query", "GET", "/api/v1/kv/keep?bogus=1", ""),
        case("wait without index", "GET", "/api/v1/kv/keep?wait=5s", ""),
        case(
            "bad wait",
            "GET",
            "/api/v1/kv/keep?index=1&wait=forever",
            "",
        ),
        Case {
            token: None,
            ..case("no token", "PUT", "/api/v1/kv/keep", r#"{"value":"x"}"#)
        },
        Case {
            token: Some("wrong-token"),
            ..case("wrong token", "PUT", "/api/v1/kv/keep", r#"{"value":"x"}"#)
        },
        Case {
            token: None,
            ..case("no token raft", "POST", "/raft/append", "junk")
        },
        Case {
            body: vec![b'a'; 2 * 1024 * 1024],
            ..case("huge body", "PUT", "/api/v1/kv/keep", "")
        },
        case(
            "huge value",
            "PUT",
            "/api/v1/kv/keep",
            &format!(r#"{{"value":"{}"}}"#, "v".repeat(70 * 1024)),
        ),
        case(
            "bad plan parameter",
            "POST",
            "/api/v1/services/db/plans/restore/start?From=x",
            "",
        ),
        case(
            "switchover without to",
            "POST",
            "/api/v1/services/db/switchover",
            "",
        ),
    ];
    cases[0].content_type = Some("application/json");
    let mut got = String::new();
    for c in &cases {
        if c.body.len() > 1024 * 1024 {
            // The server answers 413 before reading the body and closes the connection, which
            // reqwest may report as an error while still sending; read the answer off a socket.
            let (status, text) = raw_request(&addr, c.method, c.path, &c.body).await;
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{}: not JSON: {text}", c.name));
            got.push_str(&format!(
                "{}: {} {} -\n",
                c.name,
                status,
                v["code"].as_str().unwrap_or("?")
            ));
            continue;
        }
        let mut req = http
            .request(
                c.method.parse().unwrap(),
                format!("http://{addr}{}", c.path),
            )
            .body(c.body.clone());
        if let Some(t) = c.token {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{}: not JSON: {text}", c.name));
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: no message: {text}",
            c.name
        );
        got.push_str(&format!(
            "{}: {} {} {}\n",
            c.name,
            status,
            v["code"].as_str().unwrap_or("?"),
            v["field"].as_str().unwrap_or("-")
        ));
    }
    let expected = "\
malformed json: 400 malformed_json value
wrong type: 400 invalid_field value
unknown field: 400 invalid_field ttl
missing field: 400 invalid_field value
negative cas: 400 invalid_field cas
bad key: 400 invalid_field key
cas mismatch: 409 cas_failed cas
agent wrong type: 400 invalid_field id
agent bad addr: 400 invalid_field addr
agent bad ports: 400 invalid_field resources.unreserved.ports
member bad addr: 400 invalid_field addr
remove unknown member: 404 not_found -
heartbeat unknown agent: 404 not_found -
unknown route: 404 not_found -
wrong method: 405 method_not_allowed -
bad query: 400 invalid_query query
unknown query: 400 invalid_query query
wait without index: 400 invalid_field wait
bad wait: 400 invalid_field wait
no token: 401 unauthorized -
wrong token: 401 unauthorized -
no token raft: 401 unauthorized -
huge body: 413 body_too_large -
huge value: 400 invalid_field value
bad plan parameter: 400 invalid_field From
switchover without to: 400 invalid_field to
";
    assert_eq!(got, expected);

    // Nothing changed: the value is intact; only the rejected CAS write went through the log.
    assert_eq!(
        get(&http, &addr, "keep", false).await,
        Some(Some("original".into()))
    );
    let agents = lab.get(&addr, "/api/v1/agents").await.unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 0);
    let after = lab.get(&addr, "/api/v1/cluster").await.unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    assert!(
        after <= before + 1,
        "applied index moved from {before} to {after}"
    );
    // The server is still healthy.
    put_until_ok(&lab, "still", "fine").await;
}

/// Sends one request over a raw socket and returns the status and body of the answer,
/// tolerating the server closing the connection before the whole body was sent.
async fn raw_request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .env_remove("CAIRN_TOKEN")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e = run(&[
        "agent",
        "--data-dir",
        d,
        "--token",
        "x",
        "--resources",
        "gpus:1",
    ]);
    assert!(
        e.contains("--resources: gpus:1: unknown resource \"gpus\""),
        "{e}"
    );
    let e = run(&["agent", "--data-dir", d, "--attributes", "rack"]);
    assert!(e.contains("--attributes: rack: expected NAME:VALUE"), "{e}");
    let e = run(&[
        "master",
        "--node-id",
        "1",
        "--data-dir",
        d,
        "--token",
        "0123456789",
        "--peer-token",
        "peer-0123456789abcdef",
        "--peers",
        "1@nowhere",
    ]);
    assert!(e.contains("--peers: \"nowhere\" is not HOST:PORT"), "{e}");
    let e = run(&[
        "master",
        "--node-id",
        "1",
        "--data-dir",
        d,
        "--token",
        "short",
        "--peer-token",
        "peer-0123456789abcdef",
        "--peers",
        "1@127.0.0.1:1",
    ]);
    assert!(e.contains("--token must be at least 8 characters"), "{e}");
    let e = run(&[
        "master",
        "--node-id",
        "1",
        "--data-dir",
        d,
        "--token",
        "0123456789",
        "--peer-token",
        "peer-0123456789abcdef",
    ]);
    assert!(e.contains("give --peers"), "{e}");
    let e = run(&[
        "master",
        "--node-id",
        "1",
        "--data-dir",
        d,
        "--token",
        "0123456789abcdefgh",
        "--peer-token",
        "0123456789abcdefgh",
        "--peers",
        "1@127.0.0.1:1",
    ]);
    assert!(e.contains("--peer-token must differ from --token"), "{e}");
}

/// A CLI command whose reader goes away (`cairn ... | head`) ends by SIGPIPE, quietly, not
/// with a panic about a broken pipe.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (read, write) = std::io::pipe().unwrap();
    drop(read);
    let out = std::process::Command::new(bin())
        .args(["bench", "plans", "--services", "2", "--pods", "1"])
        .stdout(write)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "{:?} {stderr}", out.status);
}
