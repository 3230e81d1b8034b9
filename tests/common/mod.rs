//! Shared helpers for the end-to-end tests: a local lab of real `cairn` processes, a KV
//! client that classifies outcomes, and polling with deadlines.
#![allow(dead_code)]

pub mod browser;
pub mod dns;
pub mod linearizability;
pub mod packages;
pub mod services;

use cairn_installer::lab::Lab;
use std::future::Future;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-0123456789";

pub fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_cairn"))
}

/// The Wasm test guests built by scripts/test.sh.
pub fn guests_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guests")
}

/// Agents read Wasm files only from their allow-listed directories: the agents the tests
/// start (which inherit this process's environment) may read the test guests.
pub fn allow_test_guests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CAIRN_WASM_DIRS", guests_dir()));
}

/// Starts `n` masters in a fresh temp dir. Keep the TempDir alive for the test.
pub fn lab(n: u64, extra: &[&str]) -> (tempfile::TempDir, Lab) {
    allow_test_guests();
    let dir = tempfile::Builder::new()
        .prefix("cairn-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let lab = Lab::start(bin(), dir.path(), n, TOKEN, extra).expect("start lab");
    (dir, lab)
}

/// What each master of `lab` says about itself (a local read) and the last `lines` lines of
/// its log: printed when a test times out, so a CI failure shows why.
pub async fn lab_diagnostics(lab: &Lab, lines: usize) -> String {
    let mut out = String::new();
    for m in &lab.masters {
        let st = lab
            .get(&m.addr, "/api/v1/cluster?stale=true")
            .await
            .map(|v| v.to_string())
            .unwrap_or_else(|| "no answer".into());
        out.push_str(&format!("== master {} ({}): {st}\n", m.id, m.addr));
        let log = std::fs::read_to_string(lab.dir.join(format!("master-{}.log", m.id)))
            .unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

/// What became of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteResult {
    /// Acknowledged as committed.
    Ok,
    /// Certainly not applied (never delivered, or rejected with a 4xx).
    NotApplied,
    /// May or may not be applied (timeout, 5xx, connection lost after sending).
    Unknown,
}

pub async fn put(http: &reqwest::Client, addr: &str, key: &str, value: &str) -> WriteResult {
    let r = http
        .put(format!("http://{addr}/api/v1/kv/{key}"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "value": value }))
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => WriteResult::Ok,
        Ok(resp) if resp.status().is_client_error() => WriteResult::NotApplied,
        Ok(_) => WriteResult::Unknown,
        Err(e) if e.is_connect() => WriteResult::NotApplied,
        Err(_) => WriteResult::Unknown,
    }
}

/// A read: `Some(Some(v))` value, `Some(None)` absent, `None` failed.
pub async fn get(
    http: &reqwest::Client,
    addr: &str,
    key: &str,
    stale: bool,
) -> Option<Option<String>> {
    let q = if stale { "?stale=true" } else { "" };
    let resp = http
        .get(format!("http://{addr}/api/v1/kv/{key}{q}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    match resp.status().as_u16() {
        200 => {
            let v: serde_json::Value = resp.json().await.ok()?;
            Some(Some(v["value"].as_str()?.to_string()))
        }
        404 => Some(None),
        _ => None,
    }
}

/// `GET /api/v1/cluster` of one master.
pub async fn cluster(lab: &Lab, addr: &str) -> Option<serde_json::Value> {
    lab.get(addr, "/api/v1/cluster").await
}

/// Writes `key=value` through any running master until acknowledged.
pub async fn put_until_ok(lab: &Lab, key: &str, value: &str) {
    let http = http();
    eventually(Duration::from_secs(30), &format!("write {key}"), || {
        let addrs = lab.running_addrs();
        let http = http.clone();
        async move {
            for a in addrs {
                if put(&http, &a, key, value).await == WriteResult::Ok {
                    return Some(());
                }
            }
            None
        }
    })
    .await
}

/// One master and `agents` real agents, each with its own port range from `port_base`
/// (`port_base + 100 * n ..+99`), waiting until every agent is registered. For stateful
/// service and package tests.
pub async fn master_and_agents(agents: u16, port_base: u16) -> (tempfile::TempDir, Lab) {
    let (dir, mut lab) = lab(1, &["--agent-timeout", "1500ms", "--request-timeout", "5s"]);
    lab.wait_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    for n in 0..agents {
        let first = port_base + 100 * n;
        let res = format!("cpus:2;mem:1024;disk:4000;ports:[{first}-{}]", first + 99);
        lab.start_agent(&["--resources", &res, "--heartbeat-interval", "300ms"])
            .unwrap();
    }
    let addr = lab.running_addrs()[0].clone();
    eventually(Duration::from_secs(30), "agents registered", || async {
        let v = lab.get(&addr, "/api/v1/agents").await?;
        (v.as_array().map_or(0, |a| a.len()) == agents as usize).then_some(())
    })
    .await;
    (dir, lab)
}

/// Copies the bundled redis package into `repo/redis` as version `version`, for the tests
/// of local repos; returns the package's folder.
pub fn copy_redis_package(repo: &std::path::Path, version: &str) -> std::path::PathBuf {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packages-universe/packages/redis");
    let dst = repo.join("redis");
    std::fs::create_dir_all(dst.join("config")).unwrap();
    // Every file of the package: its top level and `config/`.
    let files = |dir: std::path::PathBuf| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    for from in files(src.clone())
        .into_iter()
        .chain(files(src.join("config")))
    {
        let rel = from.strip_prefix(&src).unwrap();
        let mut text = std::fs::read_to_string(&from).unwrap();
        if rel == std::path::Path::new("package.toml") {
            text = text.replace("7.0.15-2", version);
        }
        std::fs::write(dst.join(rel), text).unwrap();
    }
    dst
}

/// Runs `cairn ARGS` like `cairn_cli` and fails the test unless it succeeds; its stdout.
pub async fn cli_ok(addr: &str, args: &[&str], timeout: Duration) -> String {
    let (ok, out, err) = cairn_cli(addr, args, timeout).await;
    assert!(ok, "cairn {}: {out}{err}", args.join(" "));
    out
}

/// Runs `cairn ARGS --master ADDR --token TOKEN`, at most `timeout`; (success, stdout, stderr).
pub async fn cairn_cli(addr: &str, args: &[&str], timeout: Duration) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin())
        .args(args)
        .args(["--master", addr, "--token", TOKEN])
        .output();
    let out = tokio::time::timeout(timeout, out)
        .await
        .unwrap_or_else(|_| panic!("cairn {args:?} did not return within {timeout:?}"))
        .expect("run cairn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the cairn binary with `args` and these environment variables set (no stdin);
/// (success, stdout followed by stderr).
pub fn run_cairn(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (bool, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cairn");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
