//! The master's HTTP API v1 (axum): cluster, agents, variables, workloads and tasks, with
//! bearer-token auth, body limits, JSON errors, blocking queries, linearizable reads by
//! default (`?stale=true` for local reads), and Prometheus metrics.

use crate::error::{ApiError, JsonBody};
use crate::liveness::Liveness;
use crate::model::{Agent, AgentRegistration, KvEntry, Task, Workload};
use crate::resources::validate_resources;
use crate::state::{Command, Machine, Outcome, State};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cairn_raft::node::{MembershipOp, RaftNode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything a handler needs.
pub struct Api {
    pub node: Arc<RaftNode<Machine>>,
    pub liveness: Arc<Liveness>,
    pub token: String,
    pub metrics: Metrics,
    pub admission: crate::admission::Admission,
    /// Per-agent wake-ups for assignment long-polls (shared with the state machine).
    pub wakers: crate::state::AgentWakers,
    pub client: reqwest::Client,
    pub max_body: usize,
}

type Ctx = Extension<Arc<Api>>;

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
    latency: HistogramVec,
    pub term_changes: IntCounter,
    pub leader_changes: IntCounter,
    prevotes: IntCounter,
    elections: IntCounter,
    appends_split: IntCounter,
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

/// Every API route, for the router and the OpenAPI test.
pub const ROUTES: &[&str] = &[
    "/api/v1/cluster",
    "/api/v1/cluster/members",
    "/api/v1/cluster/members/{id}",
    "/api/v1/agents",
    "/api/v1/agents/{id}",
    "/api/v1/agents/{id}/heartbeat",
    "/api/v1/kv",
    "/api/v1/kv/{key}",
    "/api/v1/workloads",
    "/api/v1/workloads/{id}",
    "/api/v1/workloads/{id}/scale",
    "/api/v1/workloads/{id}/stop",
    "/api/v1/workloads/{id}/start",
    "/api/v1/workloads/{id}/restart",
    "/api/v1/deployments",
    "/api/v1/deployments/{id}",
    "/api/v1/tasks",
    "/api/v1/tasks/{id}",
    "/api/v1/tasks/{id}/kill",
    "/api/v1/agents/{id}/assignments",
    "/api/v1/agents/{id}/status",
    "/api/v1/events",
    "/api/v1/openapi.json",
    "/metrics",
    "/healthz",
];

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Builds the whole master router: API, Raft RPCs, auth, limits, metrics.
pub fn router(api: Arc<Api>) -> Router {
    let v1 = Router::new()
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/cluster/members", post(add_member))
        .route(
            "/api/v1/cluster/members/{id}",
            axum::routing::delete(remove_member),
        )
        .route("/api/v1/agents", get(list_agents).post(register_agent))
        .route("/api/v1/agents/{id}", get(get_agent))
        .route("/api/v1/agents/{id}/heartbeat", post(heartbeat))
        .route("/api/v1/kv", get(list_kv))
        .route(
            "/api/v1/kv/{*key}",
            get(get_kv).put(put_kv).delete(delete_kv),
        )
        .route("/api/v1/workloads", get(list_workloads).post(put_workload))
        .route(
            "/api/v1/workloads/{id}",
            get(get_workload).delete(delete_workload),
        )
        .route("/api/v1/workloads/{id}/scale", post(scale_workload))
        .route("/api/v1/workloads/{id}/stop", post(stop_workload))
        .route("/api/v1/workloads/{id}/start", post(start_workload))
        .route("/api/v1/workloads/{id}/restart", post(restart_workload))
        .route("/api/v1/deployments", get(list_deployments))
        .route("/api/v1/deployments/{id}", get(get_deployment))
        .route("/api/v1/tasks", get(list_tasks))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/kill", post(kill_task))
        .route("/api/v1/agents/{id}/assignments", get(assignments))
        .route("/api/v1/agents/{id}/status", post(task_status))
        .route("/api/v1/events", get(events))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(api.max_body));
    // Raft RPCs are not here: they have their own listener and credential (raft::node).
    v1.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(auth))
        .layer(middleware::from_fn(admit))
        .layer(middleware::from_fn(observe))
        .route("/healthz", get(|| async { "ok" }))
        .layer(Extension(api))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}; see /api/v1/openapi.json",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; see /api/v1/openapi.json",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn auth(ctx: Ctx, req: Request, next: Next) -> Response {
    match crate::error::check_bearer(req.headers(), &ctx.token) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Sheds a request whose class is full, before its body is read (`admission`).
async fn admit(ctx: Ctx, req: Request, next: Next) -> Response {
    let class = crate::admission::classify(req.method(), req.uri().path(), req.uri().query());
    match ctx.admission.admit(class) {
        Ok(seat) => {
            let r = next.run(req).await;
            drop(seat);
            r
        }
        Err(refused) => refused,
    }
}

/// A metrics label for a method: the known ones by name, anything else as `other` (labels
/// from raw client input would let anyone grow the registry without bound).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn observe(ctx: Ctx, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    ctx.metrics
        .latency
        .with_label_values(&[method, route.as_str(), resp.status().as_str()])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Query parameters every read accepts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// Serve from this master's local state without a leader round trip.
    pub stale: Option<bool>,
    /// Blocking query: wait until the table's index exceeds this.
    pub index: Option<u64>,
    /// How long a blocking query may wait (e.g. `30s`, max `10m`, default `5m`).
    pub wait: Option<String>,
}

/// Parses query parameters into `T`, naming the bad one.
fn query<T: for<'a> Deserialize<'a>>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()).field("query")
    })
}

impl Api {
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let m = self.node.app.read().expect("state lock");
        f(&m.state)
    }

    /// Commits a command and returns its outcome; `Rejected` becomes an API error.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ApiError> {
        let bytes = bincode::serialize(&cmd).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string())
        })?;
        let out = self.node.write(bytes).await?;
        let outcome: Outcome = bincode::deserialize(&out).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "decode", e.to_string())
        })?;
        match outcome {
            Outcome::Rejected {
                code,
                field,
                message,
            } => {
                let status = match code.as_str() {
                    "not_found" => StatusCode::NOT_FOUND,
                    "cas_failed" | "conflict" | "invalid_transition" => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                };
                let mut e = ApiError::new(status, &code, message);
                if !field.is_empty() {
                    e = e.field(field);
                }
                Err(e)
            }
            o => Ok(o),
        }
    }

    /// Applies `ReadParams`: waits for a blocking query, then (unless stale) a read barrier.
    /// Returns the table index to report.
    async fn prepare_read(
        &self,
        p: &ReadParams,
        table: impl Fn(&State) -> u64,
    ) -> Result<u64, ApiError> {
        if let Some(min) = p.index {
            let wait = blocking_wait(p)?;
            let deadline = tokio::time::Instant::now() + wait;
            let mut rx = self.node.applied.clone();
            while self.read(&table) <= min {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        } else if p.wait.is_some() {
            return Err(ApiError::bad_request(
                "wait",
                "wait needs index (a blocking query): ?index=N&wait=30s",
            ));
        }
        if !p.stale.unwrap_or(false) {
            self.node.read_barrier().await?;
        }
        Ok(self.read(&table))
    }
}

/// How long a blocking query may wait (`wait`, default 5m, at most 10m).
fn blocking_wait(p: &ReadParams) -> Result<Duration, ApiError> {
    let wait = match &p.wait {
        None => Duration::from_secs(300),
        Some(w) => humantime::parse_duration(w).map_err(|e| {
            ApiError::bad_request("wait", format!("wait {w:?}: {e}; use e.g. 30s or 5m"))
        })?,
    };
    if wait > Duration::from_secs(600) {
        return Err(ApiError::bad_request("wait", "wait is at most 10m"));
    }
    Ok(wait)
}

fn with_index<T: Serialize>(index: u64, body: T) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-cairn-index", HeaderValue::from(index));
    (headers, Json(body)).into_response()
}

/// A master as `GET /api/v1/cluster` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// The master's API address.
    pub addr: String,
    /// The master's Raft peer address.
    #[serde(default)]
    pub peer: String,
    pub voter: bool,
    pub leader: bool,
}

/// The answer of `GET /api/v1/cluster`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub state: String,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub members: Vec<Member>,
    /// Tasks by state, from this master's applied state.
    pub tasks: std::collections::BTreeMap<String, usize>,
}

/// Members and the leader as this master knows them: O(members), cheap enough for every
/// heartbeat (unlike `cluster_status`, which also counts tasks).
fn membership(api: &Api) -> (Vec<Member>, Option<(u64, String)>) {
    let m = api.node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| Member {
            id: *id,
            addr: n.api.clone(),
            peer: n.peer.clone(),
            voter: voters.contains(id),
            leader: m.current_leader == Some(*id),
        })
        .collect();
    // A leader without a quorum's recent acknowledgement does not name itself (check-quorum).
    let leader = api.node.leader().map(|(id, n)| (id, n.api));
    (members, leader)
}

fn cluster_status(api: &Api) -> ClusterStatus {
    let m = api.node.raft.metrics().borrow().clone();
    let (members, leader) = membership(api);
    ClusterStatus {
        node_id: m.id,
        state: format!("{:?}", m.state).to_lowercase(),
        leader_id: leader.as_ref().map(|(id, _)| *id),
        leader_addr: leader.map(|(_, a)| a),
        term: m.current_term,
        commit_index: api
            .node
            .stats
            .committed
            .load(std::sync::atomic::Ordering::Relaxed),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        last_log_index: m.last_log_index.unwrap_or(0),
        snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        members,
        tasks: api.read(|s| {
            // One pass, no allocation per task: this answers while 10^5 tasks churn.
            let mut counts = [0usize; crate::model::TaskState::ALL.len()];
            for t in s.tasks.values() {
                counts[t.state as usize] += 1;
            }
            crate::model::TaskState::ALL
                .iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .map(|(st, n)| (format!("{st:?}").to_lowercase(), n))
                .collect()
        }),
    }
}

async fn cluster(ctx: Ctx) -> Json<ClusterStatus> {
    Json(cluster_status(&ctx))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    id: u64,
    /// The new master's API address.
    addr: String,
    /// The new master's Raft peer address.
    peer: String,
}

async fn add_member(
    ctx: Ctx,
    JsonBody(b): JsonBody<AddMember>,
) -> Result<Json<ClusterStatus>, ApiError> {
    if b.id == 0 {
        return Err(ApiError::bad_request("id", "master ids start at 1"));
    }
    if b.addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::bad_request(
            "addr",
            format!("addr {:?} is not HOST:PORT, e.g. 127.0.0.1:5080", b.addr),
        ));
    }
    if b.peer.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::bad_request(
            "peer",
            format!(
                "peer {:?} is not HOST:PORT: give the new master's --peer-listen address",
                b.peer
            ),
        ));
    }
    ctx.node
        .change_membership(MembershipOp::Add {
            id: b.id,
            node: cairn_raft::MasterNode {
                api: b.addr,
                peer: b.peer,
            },
        })
        .await?;
    Ok(Json(cluster_status(&ctx)))
}

async fn remove_member(ctx: Ctx, Path(id): Path<String>) -> Result<Json<ClusterStatus>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("id", format!("master id {id:?} is not a number")))?;
    let known = membership(&ctx).0.iter().any(|m| m.id == id);
    if !known {
        return Err(ApiError::not_found(format!(
            "no master {id} in the cluster"
        )));
    }
    ctx.node
        .change_membership(MembershipOp::Remove { id })
        .await?;
    Ok(Json(cluster_status(&ctx)))
}

async fn list_agents(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.agents).await?;
    let agents: Vec<Agent> = ctx.read(|s| s.agents.values().cloned().collect());
    Ok(with_index(index, agents))
}

async fn get_agent(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.agents).await?;
    let agent = ctx.read(|s| s.agents.get(&id).cloned()).ok_or_else(|| {
        ApiError::not_found(format!(
            "no agent {id:?}; list them with GET /api/v1/agents"
        ))
    })?;
    Ok(with_index(index, agent))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn register_agent(
    ctx: Ctx,
    JsonBody(reg): JsonBody<AgentRegistration>,
) -> Result<Response, ApiError> {
    if !valid_id(&reg.id) {
        return Err(ApiError::bad_request(
            "id",
            "agent ids are 1-128 letters, digits, '-', '_', '.'",
        ));
    }
    if reg.addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::bad_request(
            "addr",
            format!("addr {:?} is not HOST:PORT", reg.addr),
        ));
    }
    if reg.hostname.is_empty() || reg.hostname.len() > 255 {
        return Err(ApiError::bad_request(
            "hostname",
            "hostname must be 1-255 characters",
        ));
    }
    if reg.attributes.len() > 64
        || reg
            .attributes
            .iter()
            .any(|(k, v)| k.len() > 64 || v.len() > 256)
    {
        return Err(ApiError::bad_request(
            "attributes",
            "at most 64 attributes, names <= 64 and values <= 256 bytes",
        ));
    }
    if reg.version.len() > 64 {
        return Err(ApiError::bad_request("version", "at most 64 bytes"));
    }
    validate_resources(&reg.resources).map_err(|e| ApiError::bad_request(&e.field, e.message))?;
    let id = reg.id.clone();
    let out = ctx
        .propose(Command::RegisterAgent { reg, at: now_ms() })
        .await?;
    if ctx.node.is_leader() {
        ctx.liveness.beat(&id, Instant::now());
    }
    match out {
        Outcome::Agent(a) => Ok((StatusCode::OK, Json(a)).into_response()),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected",
            format!("{other:?}"),
        )),
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub leader_id: u64,
    pub masters: Vec<String>,
}

async fn heartbeat(
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !ctx.read(|s| s.agents.contains_key(&id)) {
        return Err(ApiError::not_found(format!(
            "unknown agent {id:?}: register first (POST /api/v1/agents)"
        )));
    }
    // Membership only: counting tasks here made every heartbeat O(tasks).
    let (members, leader) = membership(&ctx);
    let masters: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    let (leader_id, leader_addr) = match leader {
        Some((id, addr)) => (Some(id), Some(addr)),
        None => (None, None),
    };
    match (leader_id, leader_addr) {
        (Some(l), _) if l == ctx.node.id => {
            ctx.liveness.beat(&id, Instant::now());
            Ok(Json(HeartbeatReply {
                leader_id: l,
                masters,
            })
            .into_response())
        }
        (Some(_), Some(addr)) if !headers.contains_key("x-cairn-forwarded") => {
            // Heartbeats are leader-local: hand it to the leader.
            let r = ctx
                .client
                .post(format!("http://{addr}/api/v1/agents/{id}/heartbeat"))
                .bearer_auth(&ctx.token)
                .header("x-cairn-forwarded", "1")
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map_err(|e| {
                    ApiError::unavailable(
                        "leader_unreachable",
                        format!("forwarding to leader {addr}: {e}"),
                    )
                })?;
            let code = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = r.bytes().await.unwrap_or_default();
            Ok((code, [(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        _ => Err(ApiError::unavailable(
            "no_leader",
            "no leader is known; retry shortly",
        )),
    }
}

async fn list_kv(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.kv).await?;
    let all: Vec<KvEntry> = ctx.read(|s| s.kv.values().cloned().collect());
    Ok(with_index(index, all))
}

const MAX_KEY: usize = 256;
const MAX_VALUE: usize = 64 * 1024;

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(ApiError::bad_request(
            "key",
            format!("keys are 1-{MAX_KEY} bytes"),
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
    {
        return Err(ApiError::bad_request(
            "key",
            "keys use letters, digits, '/', '-', '_', '.'",
        ));
    }
    Ok(())
}

async fn get_kv(
    ctx: Ctx,
    Path(key): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_key(&key)?;
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.kv).await?;
    let e = ctx
        .read(|s| s.kv.get(&key).cloned())
        .ok_or_else(|| ApiError::not_found(format!("no variable {key:?}")))?;
    Ok(with_index(index, e))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutKv {
    value: String,
    /// Compare-and-set: the modify index the key must have (0: must not exist).
    cas: Option<u64>,
}

async fn put_kv(
    ctx: Ctx,
    Path(key): Path<String>,
    JsonBody(b): JsonBody<PutKv>,
) -> Result<Response, ApiError> {
    check_key(&key)?;
    if b.value.len() > MAX_VALUE {
        return Err(ApiError::bad_request(
            "value",
            format!("values are at most {MAX_VALUE} bytes"),
        ));
    }
    match ctx
        .propose(Command::KvPut {
            key,
            value: b.value,
            cas: b.cas,
        })
        .await?
    {
        Outcome::Kv(e) => Ok(with_index(e.modify_index, e)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected",
            format!("{other:?}"),
        )),
    }
}

async fn delete_kv(ctx: Ctx, Path(key): Path<String>) -> Result<Response, ApiError> {
    check_key(&key)?;
    ctx.propose(Command::KvDelete { key }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_workloads(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.workloads).await?;
    let all: Vec<Workload> = ctx.read(|s| s.workloads.values().cloned().collect());
    Ok(with_index(index, all))
}

async fn list_tasks(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.tasks).await?;
    let all: Vec<Task> = ctx.read(|s| s.tasks.values().cloned().collect());
    Ok(with_index(index, all))
}

fn done_index(out: Outcome) -> Result<u64, ApiError> {
    match out {
        Outcome::Done { index } => Ok(index),
        Outcome::Rejected {
            code,
            field,
            message,
        } => Err(ApiError::new(
            if code == "not_found" {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::CONFLICT
            },
            &code,
            message,
        )
        .field(&field)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected",
            format!("{other:?}"),
        )),
    }
}

/// Declares or changes a workload from its spec (`spec::WorkloadSpec`, the same schema as
/// `cairn run app.toml`). An unchanged spec keeps its version.
async fn put_workload(
    ctx: Ctx,
    JsonBody(spec): JsonBody<crate::spec::WorkloadSpec>,
) -> Result<Response, ApiError> {
    let w = spec
        .validate()
        .map_err(|e| ApiError::bad_request(&e.field, e.message))?;
    let id = w.id.clone();
    let index = done_index(
        ctx.propose(Command::PutWorkload {
            workload: w,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok((
        StatusCode::CREATED,
        with_index(index, serde_json::json!({ "id": id, "version": index })),
    )
        .into_response())
}

/// A workload and its tasks.
async fn get_workload(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx
        .prepare_read(&p, |s| s.indexes.workloads.max(s.indexes.tasks))
        .await?;
    let v = ctx
        .read(|s| {
            s.workloads.get(&id).map(|w| {
                let tasks: Vec<&Task> = s.tasks.values().filter(|t| t.workload == id).collect();
                serde_json::json!({ "workload": w, "tasks": tasks })
            })
        })
        .ok_or_else(|| ApiError::not_found(format!("no workload {id:?}")).field("id"))?;
    Ok(with_index(index, v))
}

async fn delete_workload(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    let index = done_index(ctx.propose(Command::RemoveWorkload { id }).await?)?;
    Ok(with_index(index, serde_json::json!({ "index": index })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    instances: u32,
}

async fn scale_workload(
    ctx: Ctx,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ScaleBody>,
) -> Result<Response, ApiError> {
    if b.instances > 10_000 {
        return Err(ApiError::bad_request(
            "instances",
            "at most 10000 instances",
        ));
    }
    let index = done_index(
        ctx.propose(Command::ScaleWorkload {
            id,
            instances: b.instances,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok(with_index(index, serde_json::json!({ "index": index })))
}

async fn set_stopped(ctx: Ctx, id: String, stopped: bool) -> Result<Response, ApiError> {
    let index = done_index(
        ctx.propose(Command::SetWorkloadStopped {
            id,
            stopped,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok(with_index(index, serde_json::json!({ "index": index })))
}

async fn stop_workload(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_stopped(ctx, id, true).await
}

async fn start_workload(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_stopped(ctx, id, false).await
}

/// Replaces every task through a rolling deployment of the same spec.
async fn restart_workload(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    let index = done_index(
        ctx.propose(Command::RestartWorkload { id, at: now_ms() })
            .await?,
    )?;
    Ok(with_index(
        index,
        serde_json::json!({ "index": index, "version": index }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentParams {
    workload: Option<String>,
    index: Option<u64>,
    wait: Option<String>,
    stale: Option<bool>,
}

/// Roll-outs, newest first (optionally of one workload): the workload's history.
async fn list_deployments(
    ctx: Ctx,
    q: Result<Query<DeploymentParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let rp = ReadParams {
        index: p.index,
        wait: p.wait,
        stale: p.stale,
    };
    let index = ctx.prepare_read(&rp, |s| s.indexes.workloads).await?;
    let mut list: Vec<crate::model::Deployment> = ctx.read(|s| {
        s.deployments
            .values()
            .filter(|d| p.workload.as_ref().is_none_or(|w| &d.workload == w))
            .cloned()
            .collect()
    });
    list.sort_by_key(|d| std::cmp::Reverse(d.version));
    Ok(with_index(index, list))
}

async fn get_deployment(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    let v = ctx
        .read(|s| {
            s.deployments.get(&id).map(|d| {
                let tasks: Vec<&Task> = s
                    .tasks
                    .values()
                    .filter(|t| t.workload == d.workload && t.version == d.version)
                    .collect();
                let ready = tasks.iter().filter(|t| t.is_ready()).count();
                serde_json::json!({ "deployment": d, "ready": ready, "tasks": tasks })
            })
        })
        .ok_or_else(|| ApiError::not_found(format!("no deployment {id:?}")).field("id"))?;
    Ok(Json(v).into_response())
}

/// One task, with its live usage fetched from the agent that runs it (usage is the agent's
/// observed state, not replicated; `usage` is null when the agent does not answer).
async fn get_task(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.tasks).await?;
    let (task, agent_addr) = ctx
        .read(|s| {
            s.tasks
                .get(&id)
                .map(|t| (t.clone(), s.agents.get(&t.agent).map(|a| a.addr.clone())))
        })
        .ok_or_else(|| {
            ApiError::not_found(format!("no task {id:?}; list them with GET /api/v1/tasks"))
        })?;
    let mut usage = serde_json::Value::Null;
    if let Some(addr) = agent_addr {
        let r = ctx
            .client
            .get(format!("http://{addr}/api/v1/tasks/{id}"))
            .bearer_auth(&ctx.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(r) = r {
            if r.status().is_success() {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    usage = v["usage"].clone();
                }
            }
        }
    }
    let mut body = serde_json::to_value(&task).unwrap_or_default();
    body["usage"] = usage;
    Ok(with_index(index, body))
}

/// Marks a task `killing`: it leaves its agent's assignments and the agent kills it.
async fn kill_task(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    let state = ctx.read(|s| s.tasks.get(&id).map(|t| t.state));
    match state {
        None => Err(ApiError::not_found(format!("no task {id:?}"))),
        Some(st) if st.is_terminal() || st == crate::model::TaskState::Killing => {
            Ok((StatusCode::ACCEPTED, Json(serde_json::json!({"state": st}))).into_response())
        }
        Some(_) => {
            let cmd = Command::UpdateTaskState {
                id,
                state: crate::model::TaskState::Killing,
                reason: Some("killed".into()),
                at: now_ms(),
            };
            ctx.propose(cmd).await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"state": "killing"})),
            )
                .into_response())
        }
    }
}

/// One task an agent should run, with the workload it belongs to.
#[derive(Debug, Serialize, Deserialize)]
pub struct Assignment {
    pub task: Task,
}

/// Long-poll of an agent's assignments (blocking query on the tasks table).
async fn assignments(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    // Waits on this agent's own assignment index: a change elsewhere does not wake it, and
    // the wake-up itself comes from the state machine for this agent only.
    let index = match p.index {
        Some(min) if p.stale.unwrap_or(false) => {
            let wait = blocking_wait(&p)?;
            let deadline = tokio::time::Instant::now() + wait;
            let mut rx = ctx.wakers.subscribe(&id);
            let current =
                |ctx: &Api| ctx.read(|s| s.assignment_index.get(&id).copied().unwrap_or(0));
            let mut index = current(&ctx);
            while index <= min {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    break;
                }
                index = current(&ctx);
            }
            index
        }
        _ => {
            let agent = id.clone();
            ctx.prepare_read(&p, move |s| {
                s.assignment_index.get(&agent).copied().unwrap_or(0)
            })
            .await?
        }
    };
    let list: Vec<Assignment> = ctx.read(|s| {
        s.tasks_by_agent
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|tid| s.tasks.get(tid))
            .filter(|t| !t.state.is_terminal() && t.state != crate::model::TaskState::Killing)
            .map(|t| Assignment { task: t.clone() })
            .collect()
    });
    Ok(with_index(index, list))
}

/// A task state an agent reports.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    pub id: String,
    pub state: crate::model::TaskState,
    pub reason: Option<String>,
    /// What the task's health checks say (absent: no checks or no result yet).
    #[serde(default)]
    pub healthy: Option<bool>,
}

/// Agents push task state changes here, in idempotent batches, until acknowledged.
async fn task_status(
    ctx: Ctx,
    Path(agent): Path<String>,
    JsonBody(reports): JsonBody<Vec<TaskReport>>,
) -> Result<Response, ApiError> {
    if reports.len() > 10_000 {
        return Err(ApiError::bad_request("", "at most 10000 reports per batch"));
    }
    let updates: Vec<crate::state::TaskUpdate> = reports
        .into_iter()
        .map(|r| crate::state::TaskUpdate {
            id: r.id,
            state: r.state,
            reason: r.reason,
            healthy: r.healthy,
        })
        .collect();
    let applied = updates.len();
    ctx.propose(Command::UpdateTaskStates {
        agent,
        reports: updates,
        at: now_ms(),
    })
    .await?;
    Ok(Json(serde_json::json!({ "applied": applied })).into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(ctx: Ctx) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_states_are_listed_in_declaration_order() {
        // `cluster_status` counts tasks into an array indexed by `state as usize`.
        for (i, st) in crate::model::TaskState::ALL.iter().enumerate() {
            assert_eq!(*st as usize, i, "{st:?}");
        }
    }

    #[test]
    fn openapi_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().expect("paths");
        for r in ROUTES {
            assert!(paths.contains_key(*r), "openapi.json lacks {r}");
        }
        for p in paths.keys() {
            assert!(
                ROUTES.contains(&p.as_str()),
                "openapi.json lists unknown route {p}"
            );
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    /// Comma-separated topics (task, workload, agent, kv); all when absent.
    topic: Option<String>,
    /// Start after this Raft index (replays what the masters still keep); default: now.
    index: Option<u64>,
}

/// Server-sent events of state changes, filterable by topic. Each event's SSE id is its Raft
/// index, so a client can resume with `?index=` after a reconnect.
async fn events(
    ctx: Ctx,
    q: Result<Query<EventParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use futures::StreamExt;
    let p = query(q)?;
    let topics: Option<Vec<String>> = p
        .topic
        .map(|t| t.split(',').map(|s| s.trim().to_string()).collect());
    if let Some(ts) = &topics {
        if let Some(bad) = ts.iter().find(|t| {
            !matches!(
                t.as_str(),
                "task" | "workload" | "agent" | "kv" | "deployment"
            )
        }) {
            return Err(ApiError::bad_request(
                "topic",
                format!("unknown topic {bad:?}: use task, workload, agent, deployment or kv"),
            ));
        }
    }
    let start = match p.index {
        Some(i) => i,
        None => ctx.read(|s| s.applied),
    };
    let rx = ctx.node.applied.clone();
    let api = ctx.0.clone();
    let stream = futures::stream::unfold((start, rx), move |(last, mut rx)| {
        let api = api.clone();
        let topics = topics.clone();
        async move {
            loop {
                let batch: Vec<crate::state::Event> = api.read(|s| {
                    s.events
                        .iter()
                        .filter(|e| e.index > last)
                        .filter(|e| topics.as_ref().is_none_or(|t| t.contains(&e.topic)))
                        .cloned()
                        .collect()
                });
                if let Some(newest) = batch.last().map(|e| e.index) {
                    return Some((batch, (newest, rx)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        }
    })
    .flat_map(|batch| {
        futures::stream::iter(batch.into_iter().map(|e| {
            Ok::<_, std::convert::Infallible>(
                SseEvent::default()
                    .id(e.index.to_string())
                    .event(e.topic.clone())
                    .json_data(&e)
                    .unwrap_or_default(),
            )
        }))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
