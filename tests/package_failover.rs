//! End to end: PostgreSQL and Redis with replicas on three agents lose their primary's agent
//! (kill -9 of the agent and its tasks) and a replica takes over, checked with their own
//! clients: no acknowledged PostgreSQL row lost with synchronous replication, every Redis key
//! acknowledged by `WAIT`; the old primaries come back as replicas, and a switchover moves
//! PostgreSQL's primary back. Needs root and Debian's postgresql-15 and redis-server.

mod common;

use common::packages::*;
use common::*;
use std::time::Duration;

/// PostgreSQL with two streaming replicas (the first synchronous) on three masters and three
/// agents: the primary's agent crashes (kill -9 of the agent and its tasks) in the middle of a
/// stream of inserts; the synchronous replica is promoted, the other follows it, writes go
/// on, and no acknowledged row is lost. The crashed agent returns: its old primary is rewound
/// into a replica of the new one; a switchover makes it the primary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_replica_takes_over_without_losing_acknowledged_rows() {
    let (_dir, mut lab) = lab(3, &["--agent-timeout", "4s", "--request-timeout", "5s"]);
    lab.wait_leader(Duration::from_secs(30))
        .await
        .expect("leader");
    for n in 0..3u16 {
        let first = 26_600 + 100 * n;
        let res = format!("cpus:2;mem:1024;disk:4000;ports:[{first}-{}]", first + 99);
        lab.start_agent(&["--resources", &res, "--heartbeat-interval", "300ms"])
            .unwrap();
    }
    let addr = lab.running_addrs()[0].clone();
    eventually(MIN, "3 agents", || async {
        let v = lab.get(&addr, "/api/v1/agents").await?;
        (v.as_array()?.len() == 3).then_some(())
    })
    .await;
    let args = [
        "postgresql",
        "--set",
        "database=shop",
        "--set",
        "replicas=2",
        "--set",
        "synchronous=true",
        "--set",
        "spread=true",
        "--set",
        "failover_after_s=2",
    ];
    let started = std::time::Instant::now();
    let (primary, ports) = install_ready(&lab, &addr, &args, "postgresql", 3).await;
    println!("install → deploy complete: {:?}", started.elapsed());
    assert_eq!(primary, "postgresql-0");
    let (p0, p1) = (ports["postgresql-0"], ports["postgresql-1"]);
    psql_res(p0, "CREATE TABLE acks (id int PRIMARY KEY)")
        .await
        .unwrap();
    // Both replicas stream; commits wait for the first one (postgresql-1).
    eventually(MIN, "a synchronous replica", || async {
        let r = psql_res(
            p0,
            "SELECT application_name || ' ' || sync_state FROM pg_stat_replication ORDER BY 1",
        )
        .await
        .ok()?;
        (r == "postgresql-1 sync\npostgresql-2 potential").then_some(())
    })
    .await;
    assert_eq!(
        psql_res(p1, "SELECT pg_is_in_recovery()").await.as_deref(),
        Ok("t")
    );

    // A stream of inserts, one acknowledged commit at a time, to whichever pod the endpoint
    // names; the primary's agent crashes after 30 of them.
    let n0 = agent_of_pod(&lab, &addr, "postgresql", "postgresql-0").await;
    let mut acked = Vec::new();
    let mut crashed_at = None;
    let mut first_after = None;
    let mut id = 0;
    let mut last_err = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while acked.len() < 60 {
        assert!(
            std::time::Instant::now() < deadline,
            "no new primary took writes ({last_err}): {:?}",
            lab.get(&addr, "/api/v1/services/postgresql/plans/failover")
                .await
        );
        if acked.len() == 30 && crashed_at.is_none() {
            lab.crash_agent(n0);
            crashed_at = Some(std::time::Instant::now());
        }
        let Some((primary, ports)) = topology(&lab, &addr, "postgresql").await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Some(&port) = ports.get(&primary) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        id += 1;
        let r = psql_res(port, &format!("INSERT INTO acks VALUES ({id})")).await;
        if let Err(e) = &r {
            last_err = e.clone();
        }
        if r.is_ok() {
            acked.push(id);
            if crashed_at.is_some() && first_after.is_none() && primary != "postgresql-0" {
                first_after = crashed_at.map(|t| t.elapsed());
            }
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("agent crash → new primary took a write: {first_after:?}");
    let (primary, ports) = topology(&lab, &addr, "postgresql").await.expect("topology");
    assert_eq!(primary, "postgresql-1");
    let rows = psql_res(ports["postgresql-1"], "SELECT id FROM acks ORDER BY id")
        .await
        .unwrap();
    let have: std::collections::BTreeSet<i64> =
        rows.lines().filter_map(|l| l.parse().ok()).collect();
    let lost: Vec<&i64> = acked.iter().filter(|i| !have.contains(i)).collect();
    assert!(lost.is_empty(), "acknowledged rows lost: {lost:?}");

    // The crashed agent comes back: its old primary is rewound and follows the new one.
    lab.restart_agent(n0).unwrap();
    cli_ok(
        &addr,
        &["service", "plan", "show", "postgresql", "failover"],
        MIN,
    )
    .await;
    let p0 = eventually(
        Duration::from_secs(180),
        "postgresql-0 a replica",
        || async {
            let (_, ports) = topology(&lab, &addr, "postgresql").await?;
            let p0 = *ports.get("postgresql-0")?;
            let r = psql_res(p0, "SELECT pg_is_in_recovery()").await.ok()?;
            (r == "t").then_some(p0)
        },
    )
    .await;
    let last = acked.last().unwrap();
    eventually(MIN, "postgresql-0 has every row", || async {
        let r = psql_res(p0, &format!("SELECT count(*) FROM acks WHERE id = {last}"))
            .await
            .ok()?;
        (r == "1").then_some(())
    })
    .await;

    // A switchover on purpose: postgresql-0 is the primary again and takes writes.
    let (ok, out, err) = cairn_cli(
        &addr,
        &[
            "service",
            "switchover",
            "postgresql",
            "--to",
            "postgresql-0",
            "--wait",
        ],
        Duration::from_secs(180),
    )
    .await;
    assert!(
        ok,
        "{out}{err}\n{:?}",
        lab.get(&addr, "/api/v1/services/postgresql/plans/failover")
            .await
    );
    let port = eventually(MIN, "postgresql-0 takes writes", || async {
        let (primary, ports) = topology(&lab, &addr, "postgresql").await?;
        let port = *ports.get(&primary)?;
        (primary == "postgresql-0"
            && psql_res(port, "INSERT INTO acks VALUES (100000)")
                .await
                .is_ok())
        .then_some(port)
    })
    .await;
    assert_eq!(
        psql_res(port, "SELECT count(*) FROM acks").await.unwrap(),
        (acked.len() + 1).to_string()
    );
}

/// Redis with two replicas on three agents: keys written on the primary (and acknowledged by
/// both replicas with `WAIT`) are read on a replica; the primary's agent crashes; a replica is
/// promoted, the other follows it, every key is there and writes go on; the crashed agent
/// returns and its old primary becomes a replica of the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replica_takes_over_when_the_primary_agent_crashes() {
    let (_dir, mut lab) = master_and_agents(3, 27_700).await;
    let addr = lab.running_addrs()[0].clone();
    let args = [
        "redis",
        "--set",
        "name=kv",
        "--set",
        "replicas=2",
        "--set",
        "spread=true",
        "--set",
        "failover_after_s=1",
    ];
    let (primary, ports) = install_ready(&lab, &addr, &args, "kv", 3).await;
    assert_eq!(primary, "redis-0");
    let p0 = ports["redis-0"];
    for i in 0..50 {
        assert_eq!(
            redis_cli(p0, &["SET", &format!("k{i}"), &format!("v{i}")])
                .await
                .as_deref(),
            Some("OK")
        );
    }
    // Both replicas have every write before the crash.
    eventually(MIN, "both replicas acknowledge", || async {
        (redis_cli(p0, &["WAIT", "2", "1000"]).await.as_deref() == Some("2")).then_some(())
    })
    .await;
    assert_eq!(
        redis_cli(ports["redis-1"], &["GET", "k49"])
            .await
            .as_deref(),
        Some("v49")
    );

    let n0 = agent_of_pod(&lab, &addr, "kv", "redis-0").await;
    lab.crash_agent(n0);
    let (primary, port) = eventually(
        Duration::from_secs(60),
        "a new primary takes writes",
        || async {
            let (primary, ports) = topology(&lab, &addr, "kv").await?;
            let port = *ports.get(&primary)?;
            (primary != "redis-0"
                && redis_cli(port, &["SET", "after", "yes"]).await.as_deref() == Some("OK"))
            .then_some((primary, port))
        },
    )
    .await;
    assert_eq!(primary, "redis-1");
    for i in 0..50 {
        assert_eq!(
            redis_cli(port, &["GET", &format!("k{i}")]).await,
            Some(format!("v{i}")),
            "k{i} on the new primary"
        );
    }
    // redis-2 follows the new primary.
    eventually(MIN, "redis-2 replicates redis-1", || async {
        let (_, ports) = topology(&lab, &addr, "kv").await?;
        let v = redis_cli(*ports.get("redis-2")?, &["GET", "after"]).await?;
        (v == "yes").then_some(())
    })
    .await;

    // The crashed agent returns: redis-0 is now a replica of redis-1.
    lab.restart_agent(n0).unwrap();
    eventually(Duration::from_secs(90), "redis-0 a replica", || async {
        let (_, ports) = topology(&lab, &addr, "kv").await?;
        let p = *ports.get("redis-0")?;
        let info = redis_cli(p, &["INFO", "replication"]).await?;
        let get = redis_cli(p, &["GET", "after"]).await?;
        (info.contains("role:slave")
            && info.contains(&format!("master_port:{port}"))
            && get == "yes")
            .then_some(())
    })
    .await;
}
