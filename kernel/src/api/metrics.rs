//! Prometheus metrics of a master and the `/metrics` route.

use super::cluster::cluster_status;
use super::Ctx;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Prometheus metrics of a master.
pub struct Metrics {
    pub registry: Registry,
    term: IntGauge,
    commit: IntGauge,
    applied: IntGauge,
    last_log: IntGauge,
    lag: IntGauge,
    leader: IntGauge,
    agents: IntGaugeVec,
    pub(super) latency: HistogramVec,
    pub term_changes: IntCounter,
    pub leader_changes: IntCounter,
    prevotes: IntCounter,
    elections: IntCounter,
    appends_split: IntCounter,
    append_probes: IntCounter,
    rpc_errors: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("cairn".into()), None).expect("registry");
        let g = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("gauge");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let term = g("raft_term", "Current Raft term");
        let commit = g("raft_commit_index", "Last committed log index");
        let applied = g("raft_applied_index", "Last applied log index");
        let last_log = g("raft_last_log_index", "Last log index in the local log");
        let lag = g("raft_apply_lag", "Committed but not yet applied entries");
        let leader = g("raft_is_leader", "1 if this master is the leader");
        let agents =
            IntGaugeVec::new(Opts::new("agents", "Agents by status"), &["status"]).expect("vec");
        registry
            .register(Box::new(agents.clone()))
            .expect("register");
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "API request latency").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                ],
            ),
            &["method", "route", "status"],
        )
        .expect("histogram");
        registry
            .register(Box::new(latency.clone()))
            .expect("register");
        let c = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        Self {
            term_changes: c("raft_term_changes_total", "Raft term changes seen"),
            leader_changes: c("raft_leader_changes_total", "Leader changes seen"),
            prevotes: c(
                "raft_prevote_rounds_total",
                "Pre-vote rounds this master started",
            ),
            elections: c(
                "raft_elections_total",
                "Elections this master started after winning a pre-vote",
            ),
            appends_split: c(
                "raft_appends_split_total",
                "Appends cut to the byte bound and sent as a prefix",
            ),
            append_probes: c(
                "raft_append_probes_total",
                "Empty appends sent first because the previous append outlived its timeout",
            ),
            rpc_errors: c("raft_rpc_errors_total", "Raft RPCs that failed"),
            registry,
            term,
            commit,
            applied,
            last_log,
            lag,
            leader,
            agents,
            latency,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub(super) async fn metrics(ctx: Ctx) -> Response {
    let s = cluster_status(&ctx);
    let m = &ctx.metrics;
    m.term.set(s.term as i64);
    m.commit.set(s.commit_index as i64);
    m.applied.set(s.applied_index as i64);
    m.last_log.set(s.last_log_index as i64);
    m.lag
        .set(s.commit_index.saturating_sub(s.applied_index) as i64);
    m.leader.set((s.leader_id == Some(s.node_id)) as i64);
    let sync = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    sync(&m.prevotes, ctx.node.contact.prevotes.load(relaxed));
    sync(&m.elections, ctx.node.contact.elections.load(relaxed));
    sync(&m.appends_split, ctx.node.net.appends_split.load(relaxed));
    sync(&m.append_probes, ctx.node.net.append_probes.load(relaxed));
    sync(&m.rpc_errors, ctx.node.net.rpc_errors.load(relaxed));
    let (active, unreachable) = ctx.read(|st| {
        let a = st
            .agents
            .values()
            .filter(|a| a.status == crate::model::AgentStatus::Active)
            .count();
        (a, st.agents.len() - a)
    });
    m.agents.with_label_values(&["active"]).set(active as i64);
    m.agents
        .with_label_values(&["unreachable"])
        .set(unreachable as i64);
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&m.registry.gather(), &mut buf);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response()
}
