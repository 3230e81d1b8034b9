//! The DNS table route (`GET /api/v1/dns`): the `dns::DnsView` this master builds from its
//! applied state and the Raft membership, as JSON, with blocking queries, for agents to
//! answer DNS from a local copy. Also the master's cache of that view, which its own DNS
//! server reads.

use super::{blocking_wait, query, Api, Ctx, ReadParams};
use crate::dns::{dns_index, DnsView, MasterAddrs};
use crate::error::ApiError;
use axum::extract::Query;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// The last view built, keyed by the applied index and the masters it named: every poll and
/// every DNS server refresh between two changes shares one build and one JSON encoding, and
/// the view is built at most once per `MIN_REBUILD` however many agents poll.
#[derive(Default)]
pub struct DnsCache(Mutex<Option<Cached>>);

/// The least time between two builds of the view (a build is O(tasks), under the state lock).
pub const MIN_REBUILD: Duration = Duration::from_millis(100);

struct Cached {
    applied: u64,
    masters: MasterAddrs,
    built: std::time::Instant,
    view: Arc<DnsView>,
    json: bytes::Bytes,
}

/// The masters' API addresses and the leader's, as this master sees the membership.
pub fn master_addrs(api: &Api) -> MasterAddrs {
    let (members, leader) = super::cluster::membership(api);
    MasterAddrs {
        leader: leader.map(|(_, a)| a),
        all: members.into_iter().map(|m| m.addr).collect(),
    }
}

impl Api {
    /// The current view and its JSON: built again if state or the masters changed, but not
    /// within `MIN_REBUILD` of the last build (then it waits out the rest of it).
    pub async fn dns_view(&self) -> (Arc<DnsView>, bytes::Bytes) {
        loop {
            let masters = master_addrs(self);
            let applied = self.read(|s| s.applied);
            let wait = {
                let mut c = self.dns.0.lock().expect("dns cache lock");
                let wait = match c.as_ref() {
                    Some(c) if c.applied == applied && c.masters == masters => {
                        return (c.view.clone(), c.json.clone());
                    }
                    Some(c) => MIN_REBUILD.saturating_sub(c.built.elapsed()),
                    None => Duration::ZERO,
                };
                if wait.is_zero() {
                    let (applied, view) =
                        self.read(|s| (s.applied, DnsView::from_state(s, &masters)));
                    let view = Arc::new(view);
                    let json = bytes::Bytes::from(serde_json::to_vec(&*view).unwrap_or_default());
                    *c = Some(Cached {
                        applied,
                        masters,
                        built: std::time::Instant::now(),
                        view: view.clone(),
                        json: json.clone(),
                    });
                    return (view, json);
                }
                wait
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// `GET /api/v1/dns[?index=N&wait=30s][&stale=true]`: the DNS table. A blocking query waits
/// until agents, workloads, tasks or services change past `index`, or the leader or the
/// membership changes while it waits (seen within a second).
pub(super) async fn dns_table(ctx: Ctx, q: Q<ReadParams>) -> Result<Response, ApiError> {
    let p = query(q)?;
    if let Some(min) = p.index {
        let deadline = tokio::time::Instant::now() + blocking_wait(&p)?;
        let masters = master_addrs(&ctx);
        let mut applied = ctx.node.applied.clone();
        // A leader change commits an entry (so `applied` moves); the membership is looked at
        // again at least every second besides.
        while ctx.read(dns_index) <= min && master_addrs(&ctx) == masters {
            let recheck = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = applied.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(recheck) => {
                    if recheck == deadline { break }
                }
            }
        }
    } else if p.wait.is_some() {
        return Err(ApiError::bad_request(
            "wait",
            "wait needs index (a blocking query): ?index=N&wait=30s",
        ));
    }
    if !p.stale.unwrap_or(false) {
        ctx.node.read_barrier().await?;
    }
    let (view, json) = ctx.dns_view().await;
    let mut resp = json.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("x-cairn-index", HeaderValue::from(view.index));
    Ok(resp)
}
