//! Network namespaces for `cairn lab` as root: each node in a namespace of its own with one
//! address on a bridge, so partitions and delays are real. Lab `net` gets the bridge
//! `cairnbr<net>` with 10.<net>.0.1/24 on the host; master `i` is 10.<net>.0.(10+i) and agent
//! `i` 10.<net>.0.(100+i), each in the namespace `cairn<net>-<node>` behind a veth pair
//! (`cv<net><node>` on the host, `eth0` inside). Faults are rules inside a node's namespace:
//! `partition` drops everything between it and the other nodes (the host still reaches it,
//! so `lab status` can show it), `delay` adds `tc netem` latency, `heal` removes both.
//! Everything goes through `ip`, `iptables` and `tc` (iproute2 and iptables), so what a lab
//! did can be read and undone by hand.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// The host's bridge for lab network `net`.
pub fn bridge(net: u8) -> String {
    format!("cairnbr{net}")
}

/// The namespace of node `node` (`m1`, `a2`) of the lab on network `net` (unique on this
/// host while the lab's bridge exists: `labs::pick_net` skips networks in use).
pub fn ns_name(net: u8, node: &str) -> String {
    format!("cairn{net}-{node}")
}

/// The host side of a node's veth pair (at most 15 bytes: `cv` + 3 + `m`/`a` + 2).
pub fn host_veth(net: u8, node: &str) -> String {
    format!("cv{net}{node}")
}

/// The address of a node: masters 10.<net>.0.(10+i), agents 10.<net>.0.(100+i).
pub fn node_ip(net: u8, master: bool, i: u64) -> String {
    format!("10.{net}.0.{}", if master { 10 + i } else { 100 + i })
}

pub fn host_ip(net: u8) -> String {
    format!("10.{net}.0.1")
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (install iproute2 and iptables)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["netns", "exec", ns, program];
    a.extend_from_slice(args);
    run("ip", &a)
}

/// Whether this machine can give a lab namespaces: root, and `ip` and `nsenter` present.
pub fn available() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("network namespaces need root");
    }
    for p in ["ip", "nsenter", "iptables", "tc"] {
        if Command::new(p).arg("-V").output().is_err() {
            bail!("{p} is missing (install iproute2, util-linux and iptables)");
        }
    }
    Ok(())
}

/// Whether 10.<net>.0.0/24 is free on this host (no route or address in it yet).
pub fn net_free(net: u8) -> bool {
    let out = Command::new("ip").args(["-4", "route", "show"]).output();
    let routes = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let prefix = format!("10.{net}.0.");
    !routes.lines().any(|l| l.contains(&prefix))
}

/// Creates the lab's bridge with the host's address on it, and lets bridged traffic pass a
/// host whose FORWARD policy drops.
pub fn setup_bridge(net: u8) -> Result<()> {
    let br = bridge(net);
    run("ip", &["link", "add", "name", &br, "type", "bridge"])?;
    run(
        "ip",
        &["addr", "add", &format!("{}/24", host_ip(net)), "dev", &br],
    )?;
    run("ip", &["link", "set", &br, "up"])?;
    let _ = run(
        "iptables",
        &["-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"],
    );
    Ok(())
}

/// A namespace for one node, wired to the bridge with address `ip`.
pub fn add_node(net: u8, ns: &str, node: &str, ip: &str) -> Result<()> {
    let hv = host_veth(net, node);
    // A namespace of this name left by a lab that was never taken down (its bridge, hence
    // its network, is gone, or `pick_net` would not have chosen `net`): replace it.
    if std::path::Path::new("/run/netns").join(ns).exists() {
        eprintln!("warning: removing the stale network namespace {ns}");
        let _ = run("ip", &["netns", "del", ns]);
    }
    let _ = run("ip", &["link", "del", &hv]);
    run("ip", &["netns", "add", ns])?;
    run(
        "ip",
        &[
            "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ],
    )?;
    run("ip", &["link", "set", &hv, "master", &bridge(net), "up"])?;
    run(
        "ip",
        &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
    )?;
    run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
    run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &["-n", ns, "route", "add", "default", "via", &host_ip(net)],
    )?;
    Ok(())
}

/// Removes the nodes' veth pairs (explicitly: a deleted namespace lets go of its end only
/// when the kernel gets round to it), their namespaces and the bridge; what is already gone
/// is skipped. Returns how many it removed.
pub fn teardown(net: u8, nodes: &[String]) -> usize {
    let mut n = 0;
    for node in nodes {
        let _ = run("ip", &["link", "del", &host_veth(net, node)]);
        if run("ip", &["netns", "del", &ns_name(net, node)]).is_ok() {
            n += 1;
        }
    }
    let br = bridge(net);
    let _ = run(
        "iptables",
        &["-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"],
    );
    if run("ip", &["link", "del", &br]).is_ok() {
        n += 1;
    }
    n
}

/// Cuts a node off from every other node of the lab (both directions); the host still
/// reaches it.
pub fn partition(net: u8, ns: &str) -> Result<()> {
    let subnet = format!("10.{net}.0.0/24");
    let host = host_ip(net);
    in_ns(
        ns,
        "iptables",
        &["-A", "INPUT", "-s", &host, "-j", "ACCEPT"],
    )?;
    in_ns(
        ns,
        "iptables",
        &["-A", "INPUT", "-s", &subnet, "-j", "DROP"],
    )?;
    in_ns(
        ns,
        "iptables",
        &["-A", "OUTPUT", "-d", &host, "-j", "ACCEPT"],
    )?;
    in_ns(
        ns,
        "iptables",
        &["-A", "OUTPUT", "-d", &subnet, "-j", "DROP"],
    )
}

/// Adds `ms` of latency to everything a node sends (`tc netem`).
pub fn delay(ns: &str, ms: u64) -> Result<()> {
    let r = in_ns(
        ns,
        "tc",
        &[
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "netem",
            "delay",
            &format!("{ms}ms"),
        ],
    );
    match r {
        Err(e) if format!("{e}").contains("qdisc kind is unknown") => bail!(
            "this kernel has no netem queueing discipline (module sch_netem), so latency \
             cannot be injected here; partition and kill still work"
        ),
        r => r,
    }
}

/// Undoes `partition` and `delay`.
pub fn heal(ns: &str) -> Result<()> {
    in_ns(ns, "iptables", &["-F", "INPUT"])?;
    in_ns(ns, "iptables", &["-F", "OUTPUT"])?;
    let _ = in_ns(ns, "tc", &["qdisc", "del", "dev", "eth0", "root"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limits() {
        // Interface names are at most 15 bytes.
        assert!(bridge(250).len() <= 15);
        assert!(host_veth(250, "a50").len() <= 15);
        assert_eq!(node_ip(12, true, 3), "10.12.0.13");
        assert_eq!(node_ip(12, false, 3), "10.12.0.103");
        assert_eq!(ns_name(12, "m1"), "cairn12-m1");
    }
}
