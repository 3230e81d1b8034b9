//! End-to-end tests of the replicated control plane: real `cairn master` processes on
//! loopback, killed with SIGKILL, restarted, partitioned by stopping a majority, resized.

mod common;

use common::linearizability::{self, Kind, Op};
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FAST: &[&str] = &["--request-timeout", "3s", "--fast-failover"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_elects_new_leader_and_old_leader_catches_up_from_snapshot() {
    let (_d, mut lab) = lab(
        3,
        &[
            "--snapshot-logs",
            "40",
            "--keep-logs",
            "5",
            "--request-timeout",
            "3s",
        ],
    );
    let old = lab
        .wait_leader(Duration::from_secs(20))
        .await
        .expect("first leader");
    for i in 0..10 {
        put_until_ok(&lab, &format!("k{i}"), "before").await;
    }
    let old_last = cluster(&lab, &lab.master(old).addr.clone()).await.unwrap()["last_log_index"]
        .as_u64()
        .unwrap();
    lab.kill(old);
    let new = lab
        .wait_leader(Duration::from_secs(10))
        .await
        .expect("a new leader after kill -9");
    assert_ne!(new, old);
    // Enough writes that the leader snapshots and purges past everything the old leader has.
    for i in 0..120 {
        put_until_ok(&lab, &format!("k{}", i % 20), &format!("after-{i}")).await;
    }
    // Followers purge freely (a leader keeps log a down follower still needs), so the third
    // master's log no longer reaches back to where the old leader stopped.
    let third = (1..=3).find(|i| *i != old && *i != new).unwrap();
    let third_addr = lab.master(third).addr.clone();
    let purged = eventually(
        Duration::from_secs(10),
        "third master purges its log",
        || {
            let lab = &lab;
            let a = third_addr.clone();
            async move {
                let p = cluster(lab, &a).await?["purged_index"].as_u64()?;
                (p > old_last).then_some(p)
            }
        },
    )
    .await;
    // Kill the new leader and bring the old one back: the third master must lead (its log is
    // newer) and can only bring the old leader up to date with a snapshot.
    lab.kill(new);
    lab.restart(old).unwrap();
    let http = http();
    let old_addr = lab.master(old).addr.clone();
    eventually(Duration::from_secs(30), "old leader catches up", || {
        let http = http.clone();
        let a = old_addr.clone();
        async move {
            (get(&http, &a, "k19", true).await == Some(Some("after-119".into()))).then_some(())
        }
    })
    .await;
    assert_eq!(
        lab.leader().await,
        Some(third),
        "the master with the newest log leads"
    );
    assert!(purged > old_last);
    let st = cluster(&lab, &old_addr).await.unwrap();
    assert!(
        st["snapshot_index"].as_u64().unwrap() > old_last,
        "old leader holds a snapshot past its own log: {st}"
    );
    lab.restart(new).unwrap();
    // And every key reads the same linearizably through it.
    for i in 0..20 {
        let want = format!("after-{}", 100 + i);
        assert_eq!(
            get(&http, &old_addr, &format!("k{i}"), false).await,
            Some(Some(want))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_accepts_no_write_and_majority_resumes_without_loss() {
    let (_d, mut lab) = lab(3, FAST);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    let http = http();
    for i in 0..10 {
        put_until_ok(&lab, &format!("m{i}"), "acked").await;
    }
    // Cut the node off from the majority by stopping the two others.
    let lone = 3;
    lab.kill(1);
    lab.kill(2);
    let lone_addr = lab.master(lone).addr.clone();
    for i in 0..5 {
        let r = put(&http, &lone_addr, &format!("minority{i}"), "x").await;
        assert_ne!(r, WriteResult::Ok, "a lone master acknowledged a write");
    }
    // A linearizable read on the minority cannot be served either.
    assert_eq!(
        get(&http, &lone_addr, "m0", false).await,
        None,
        "minority served a linearizable read"
    );
    lab.restart(1).unwrap();
    lab.restart(2).unwrap();
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader after heal");
    put_until_ok(&lab, "after-heal", "yes").await;
    for i in 0..10 {
        let addr = lab.running_addrs()[0].clone();
        let v = eventually(Duration::from_secs(10), "read acked key", || {
            let http = http.clone();
            let addr = addr.clone();
            let k = format!("m{i}");
            async move { get(&http, &addr, &k, false).await }
        })
        .await;
        assert_eq!(v, Some("acked".to_string()), "acknowledged write m{i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_is_linearizable_while_leaders_are_killed() {
    let (_d, lab) = lab(3, FAST);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    let lab = Arc::new(tokio::sync::Mutex::new(lab));
    let addrs: Vec<String> = lab.lock().await.running_addrs();
    let start = Instant::now();
    let history: Arc<Mutex<Vec<(String, Op)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let keys = ["x", "y", "z"];
    let mut clients = Vec::new();
    for c in 0..6 {
        let (history, stop, addrs) = (history.clone(), stop.clone(), addrs.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(8))
                .build()
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = keys[((c as u64 + n) % 3) as usize];
                let addr = &addrs[((c as u64 * 7 + n) % 3) as usize];
                let call = start.elapsed().as_nanos() as u64;
                if n.is_multiple_of(2) {
                    let v = format!("c{c}-{n}");
                    let r = put(&http, addr, key, &v).await;
                    let ret = start.elapsed().as_nanos() as u64;
                    let op = match r {
                        WriteResult::Ok => Some(Op {
                            call,
                            ret: Some(ret),
                            kind: Kind::Write(v),
                        }),
                        WriteResult::Unknown => Some(Op {
                            call,
                            ret: None,
                            kind: Kind::Write(v),
                        }),
                        WriteResult::NotApplied => None,
                    };
                    if let Some(op) = op {
                        history.lock().unwrap().push((key.to_string(), op));
                    }
                } else if let Some(r) = get(&http, addr, key, false).await {
                    let ret = start.elapsed().as_nanos() as u64;
                    history.lock().unwrap().push((
                        key.to_string(),
                        Op {
                            call,
                            ret: Some(ret),
                            kind: Kind::Read(r),
                        },
                    ));
                }
            }
        }));
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut l = lab.lock().await;
        let leader = l
            .wait_leader(Duration::from_secs(20))
            .await
            .expect("leader");
        l.kill(leader);
        drop(l);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        lab.lock().await.restart(leader).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let mut total_ok = 0;
    for key in keys {
        let ops: Vec<Op> = history
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, o)| o.clone())
            .collect();
        total_ok += ops.iter().filter(|o| o.ret.is_some()).count();
        linearizability::check(&ops)
            .unwrap_or_else(|e| panic!("key {key}: {e}\nhistory: {ops:#?}"));
    }
    assert!(
        total_ok > 100,
        "too few completed operations ({total_ok}) for a meaningful check"
    );
}

#[test]
fn checker_rejects_a_stale_read() {
    // w(a) completes, then w(b) completes, then a read returns a: not linearizable.
    let w = |c, r, v: &str| Op {
        call: c,
        ret: Some(r),
        kind: Kind::Write(v.into()),
    };
    let rd = |c, r, v: Option<&str>| Op {
        call: c,
        ret: Some(r),
        kind: Kind::Read(v.map(Into::into)),
    };
    assert!(linearizability::check(&[w(0, 1, "a"), w(2, 3, "b"), rd(4, 5, Some("a"))]).is_err());
    assert!(linearizability::check(&[w(0, 1, "a"), w(2, 3, "b"), rd(4, 5, Some("b"))]).is_ok());
    // A concurrent read may see either.
    assert!(linearizability::check(&[w(0, 1, "a"), w(2, 6, "b"), rd(3, 5, Some("a"))]).is_ok());
    // A write with unknown outcome may or may not have happened...
    let pending = Op {
        call: 2,
        ret: None,
        kind: Kind::Write("b".into()),
    };
    assert!(linearizability::check(&[
        w(0, 1, "a"),
        pending.clone(),
        rd(4, 5, Some("b")),
        rd(6, 7, Some("b"))
    ])
    .is_ok());
    // ...but once seen it cannot be un-seen.
    assert!(linearizability::check(&[
        w(0, 1, "a"),
        pending,
        rd(4, 5, Some("b")),
        rd(6, 7, Some("a"))
    ])
    .is_err());
    // Reading a value nobody wrote.
    assert!(linearizability::check(&[rd(0, 1, Some("ghost"))]).is_err());
    // A long history is searched without recursion (a recursive search overflowed the stack).
    let long: Vec<Op> = (0..10_000u64)
        .map(|i| w(2 * i, 2 * i + 1, &i.to_string()))
        .chain([rd(20_000, 20_001, Some("9999"))])
        .collect();
    assert!(linearizability::check(&long).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_loop_fifty_kills_loses_no_acknowledged_write() {
    let (_d, mut lab) = lab(3, FAST);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let others: Vec<String> = vec![lab.master(2).addr.clone(), lab.master(3).addr.clone()];
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(8))
                .build()
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("crash{i}");
                if put(&http, &others[(i % 2) as usize], &k, "v").await == WriteResult::Ok {
                    acked.lock().unwrap().push(k);
                }
                i += 1;
            }
        })
    };
    let http = http();
    let victim_addr = lab.master(1).addr.clone();
    for round in 0..50 {
        let before = acked.lock().unwrap().len();
        lab.kill(1);
        lab.restart(1).unwrap();
        // It reopens its store every time and serves again.
        eventually(
            Duration::from_secs(20),
            &format!("master 1 back after kill {round}"),
            || {
                let http = http.clone();
                let a = victim_addr.clone();
                async move {
                    let r = http.get(format!("http://{a}/healthz")).send().await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await;
        // Writes keep being acknowledged between kills.
        eventually(Duration::from_secs(20), "progress between kills", || {
            let n = acked.lock().unwrap().len();
            async move { (n > before).then_some(()) }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 50);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader at the end");
    // Every acknowledged write is present, read linearizably through the crashed master.
    let all = eventually(Duration::from_secs(20), "list through master 1", || {
        let http = http.clone();
        let a = victim_addr.clone();
        async move {
            let r = http
                .get(format!("http://{a}/api/v1/kv"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.json::<Vec<serde_json::Value>>().await.ok()
        }
    })
    .await;
    let present: std::collections::HashSet<String> = all
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|k| !present.contains(*k)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_grows_to_five_and_shrinks_back_while_writing() {
    let (_d, mut lab) = lab(3, FAST);
    lab.wait_leader(Duration::from_secs(20))
        .await
        .expect("leader");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let first = lab.master(1).addr.clone();
    let writer = {
        let (acked, stop, first) = (acked.clone(), stop.clone(), first.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(8))
                .build()
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = format!("mem{i}");
                if put(&http, &first, &k, "v").await == WriteResult::Ok {
                    acked.lock().unwrap().push(k);
                }
                i += 1;
            }
        })
    };
    let http = http();
    let voters = |v: &serde_json::Value| -> Vec<u64> {
        let mut ids: Vec<u64> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["voter"].as_bool() == Some(true))
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        ids.sort();
        ids
    };
    for id in [4, 5] {
        let (addr, peer) = lab.start_joining_master(id).unwrap();
        let r = http
            .post(format!("http://{first}/api/v1/cluster/members"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"id": id, "addr": addr, "peer": peer}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "add master {id}: {}",
            r.text().await.unwrap()
        );
    }
    eventually(Duration::from_secs(10), "voters 1 to 5", || async {
        let st = cluster(&lab, &first).await?;
        (voters(&st) == vec![1, 2, 3, 4, 5]).then_some(())
    })
    .await;
    // The new masters replicate: their local state sees a write made after they joined.
    put_until_ok(&lab, "grown", "5").await;
    for id in [4, 5] {
        let a = lab.master(id).addr.clone();
        eventually(Duration::from_secs(10), "new master has the data", || {
            let http = http.clone();
            let a = a.clone();
            async move { (get(&http, &a, "grown", true).await == Some(Some("5".into()))).then_some(()) }
        })
        .await;
    }
    for id in [4, 5] {
        let r = http
            .delete(format!("http://{first}/api/v1/cluster/members/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "remove master {id}: {}",
            r.text().await.unwrap()
        );
    }
    // The change is committed when the call returns; `first` (maybe a follower) shows it
    // once it has applied the final configuration.
    eventually(
        Duration::from_secs(10),
        "voters back to 1, 2, 3",
        || async {
            let st = cluster(&lab, &first).await?;
            (voters(&st) == vec![1, 2, 3]).then_some(())
        },
    )
    .await;
    lab.kill(4);
    lab.kill(5);
    put_until_ok(&lab, "shrunk", "3").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "writes continued during the changes ({} acked)",
        acked.len()
    );
    for k in &acked {
        assert_eq!(
            get(&http, &first, k, false).await,
            Some(Some("v".into())),
            "acked {k} lost"
        );
    }
}
