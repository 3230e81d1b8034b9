//! Helpers of the package tests (`tests/packages.rs`, `tests/package_failover.rs`): each
//! data service's own client (redis-cli, psql, libmemcached's tools), a service's primary
//! and ready ports, installing a package and waiting for its pods.

use super::*;
use std::time::Duration;

pub const MIN: Duration = Duration::from_secs(60);

/// Runs a client; its trimmed stdout, or None when it fails.
async fn run(cmd: &mut tokio::process::Command) -> Option<String> {
    let out = cmd.output().await.ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs redis-cli against `port`; its stdout, or None when it fails.
pub async fn redis_cli(port: u64, args: &[&str]) -> Option<String> {
    run(tokio::process::Command::new("/usr/bin/redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args))
    .await
}

/// The port of the running redis task of service `svc`.
pub async fn redis_port(lab: &cairn_installer::lab::Lab, addr: &str, svc: &str) -> u64 {
    eventually(MIN, "redis task running with a port", || async {
        let pods = lab
            .get(addr, &format!("/api/v1/services/{svc}/pods"))
            .await?;
        let task = pods[0]["tasks"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == "server" && t["state"] == "running")?
            .clone();
        task["ports"][0]["number"].as_u64()
    })
    .await
}

/// Runs one SQL statement with the real `psql` against database `shop`; its output, or None.
pub async fn psql(port: u64, sql: &str) -> Option<String> {
    run(tokio::process::Command::new("/usr/bin/psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", "shop", "-tAc", sql]))
    .await
}

/// The port of the running, ready postgres task.
pub async fn pg_port(lab: &cairn_installer::lab::Lab, addr: &str) -> u64 {
    eventually(Duration::from_secs(90), "postgres task ready", || async {
        let pods = lab.get(addr, "/api/v1/services/postgresql/pods").await?;
        let t = pods[0]["tasks"]
            .as_array()?
            .iter()
            .find(|t| t["state"] == "running" && t["ready"] == true)?
            .clone();
        t["ports"][0]["number"].as_u64()
    })
    .await
}

/// Runs one SQL statement against the server on `port`; its output, or the error.
pub async fn psql_res(port: u64, sql: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("/usr/bin/psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", "shop", "-v", "ON_ERROR_STOP=1", "-tAc", sql])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The pod the `primary` endpoint of service `svc` names, and the port of every pod's ready
/// server.
pub async fn topology(
    lab: &cairn_installer::lab::Lab,
    addr: &str,
    svc: &str,
) -> Option<(String, std::collections::BTreeMap<String, u64>)> {
    let spec = lab.get(addr, &format!("/api/v1/services/{svc}")).await?;
    // (Empty for a service without a `primary` endpoint.)
    let primary = spec["spec"]["endpoints"]["primary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pods = lab
        .get(addr, &format!("/api/v1/services/{svc}/pods"))
        .await?;
    let mut ports = std::collections::BTreeMap::new();
    for p in pods.as_array()? {
        let Some(t) = p["tasks"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == "server")
        else {
            continue;
        };
        if t["state"] == "running" && t["ready"] == true {
            ports.insert(
                p["id"].as_str()?.to_string(),
                t["ports"][0]["number"].as_u64()?,
            );
        }
    }
    Some((primary, ports))
}

/// Installs a package (`cairn package install ARGS --wait`) and waits until `n` pods of
/// service `svc` are ready: the primary endpoint's pod (empty without one) and every ready
/// pod's port.
pub async fn install_ready(
    lab: &cairn_installer::lab::Lab,
    addr: &str,
    args: &[&str],
    svc: &str,
    n: usize,
) -> (String, std::collections::BTreeMap<String, u64>) {
    let args: Vec<&str> = ["package", "install"]
        .into_iter()
        .chain(args.iter().copied())
        .chain(["--wait"])
        .collect();
    let (ok, out, err) = cairn_cli(addr, &args, Duration::from_secs(240)).await;
    assert!(
        ok,
        "{out}{err}\nplan: {:?}",
        lab.get(addr, &format!("/api/v1/services/{svc}/plans/deploy"))
            .await
    );
    eventually(MIN, &format!("{n} pods of {svc} ready"), || async {
        topology(lab, addr, svc).await.filter(|(_, p)| p.len() == n)
    })
    .await
}

/// The lab index of the agent running pod `pod` of service `svc`.
pub async fn agent_of_pod(
    lab: &cairn_installer::lab::Lab,
    addr: &str,
    svc: &str,
    pod: &str,
) -> usize {
    let pods = lab
        .get(addr, &format!("/api/v1/services/{svc}/pods"))
        .await
        .expect("pods");
    let agent = pods
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == pod)
        .and_then(|p| p["agent"].as_str())
        .expect("placed pod")
        .to_string();
    let a = lab
        .get(addr, &format!("/api/v1/agents/{agent}"))
        .await
        .expect("agent");
    (0..3)
        .find(|&n| Some(lab.agent_addr(n)) == a["addr"].as_str())
        .expect("a lab agent")
}

/// Runs a libmemcached tool against `port`; its stdout, or None when it fails.
pub async fn memc(tool: &str, port: u64, args: &[&str]) -> Option<String> {
    run(tokio::process::Command::new(tool)
        .arg(format!("--servers=127.0.0.1:{port}"))
        .args(args))
    .await
}

/// Fails the test unless the cluster has no services (a refused install created nothing).
pub async fn assert_no_services(lab: &cairn_installer::lab::Lab, addr: &str) {
    let services = lab.get(addr, "/api/v1/services").await.unwrap();
    assert_eq!(services.as_array().map(Vec::len), Some(0), "{services}");
}
