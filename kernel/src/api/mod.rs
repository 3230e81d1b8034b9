//! The master's HTTP API v1 (axum), one module per resource: the router, bearer-token auth,
//! load shedding, latency metrics, body limits, JSON errors, blocking queries and
//! linearizable reads by default (`?stale=true` for local reads), shared by every handler.

mod agents;
mod cluster;
mod dns;
mod events;
mod join;
mod kv;
mod metrics;
mod packages;
mod services;
mod tasks;
mod volumes;
mod workloads;

pub use crate::protocol::{Assignment, HeartbeatReply, TaskReport};
pub use cluster::{ClusterStatus, Member};
pub use dns::{master_addrs, DnsCache};
pub use metrics::Metrics;

use crate::error::ApiError;
use crate::liveness::Liveness;
use crate::state::{Command, Machine, Outcome, State};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cairn_raft::node::RaftNode;
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
    /// The DNS table last built (`GET /api/v1/dns`, the master's DNS server).
    pub dns: DnsCache,
}

type Ctx = Extension<Arc<Api>>;

/// Every API route, for the router and the OpenAPI test.
pub const ROUTES: &[&str] = &[
    "/api/v1/cluster",
    "/api/v1/cluster/members",
    "/api/v1/cluster/members/{id}",
    "/api/v1/agents",
    "/api/v1/agents/usage",
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
    "/api/v1/tasks/{id}/files",
    "/api/v1/tasks/{id}/browse",
    "/api/v1/agents/{id}/assignments",
    "/api/v1/agents/{id}/status",
    "/api/v1/agents/{id}/volumes",
    "/api/v1/agents/{id}/volumes/destroyed",
    "/api/v1/volumes",
    "/api/v1/volumes/{id}",
    "/api/v1/services",
    "/api/v1/services/{name}",
    "/api/v1/services/{name}/history",
    "/api/v1/services/{name}/rollback",
    "/api/v1/services/{name}/switchover",
    "/api/v1/services/{name}/plans",
    "/api/v1/services/{name}/plans/{plan}",
    "/api/v1/services/{name}/plans/{plan}/start",
    "/api/v1/services/{name}/plans/{plan}/interrupt",
    "/api/v1/services/{name}/plans/{plan}/continue",
    "/api/v1/services/{name}/plans/{plan}/force-complete",
    "/api/v1/services/{name}/plans/{plan}/restart",
    "/api/v1/services/{name}/pods",
    "/api/v1/services/{name}/pods/{pod}/restart",
    "/api/v1/services/{name}/pods/{pod}/replace",
    "/api/v1/packages",
    "/api/v1/packages/installed",
    "/api/v1/packages/installed/{service}",
    "/api/v1/packages/installed/{service}/rollback",
    "/api/v1/packages/repos",
    "/api/v1/packages/repos/{repo}",
    "/api/v1/packages/{name}",
    "/api/v1/packages/{name}/render",
    "/api/v1/packages/{name}/install",
    "/api/v1/events",
    "/api/v1/events/recent",
    "/api/v1/dns",
    "/api/v1/join-tokens",
    "/api/v1/join-tokens/{id}",
    "/api/v1/join/ca",
    "/api/v1/join",
    "/api/v1/openapi.json",
    "/metrics",
    "/healthz",
];

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Builds the whole master router: API, Raft RPCs, auth, limits, metrics.
pub fn router(api: Arc<Api>) -> Router {
    let v1 = Router::new()
        .route("/api/v1/cluster", get(cluster::cluster))
        .route("/api/v1/cluster/members", post(cluster::add_member))
        .route(
            "/api/v1/cluster/members/{id}",
            axum::routing::delete(cluster::remove_member),
        )
        .route(
            "/api/v1/agents",
            get(agents::list_agents).post(agents::register_agent),
        )
        .route("/api/v1/agents/usage", get(agents::agents_usage))
        .route("/api/v1/agents/{id}", get(agents::get_agent))
        .route("/api/v1/agents/{id}/heartbeat", post(agents::heartbeat))
        .route("/api/v1/kv", get(kv::list_kv))
        .route(
            "/api/v1/kv/{*key}",
            get(kv::get_kv).put(kv::put_kv).delete(kv::delete_kv),
        )
        .route(
            "/api/v1/workloads",
            get(workloads::list_workloads).post(workloads::put_workload),
        )
        .route(
            "/api/v1/workloads/{id}",
            get(workloads::get_workload).delete(workloads::delete_workload),
        )
        .route(
            "/api/v1/workloads/{id}/scale",
            post(workloads::scale_workload),
        )
        .route(
            "/api/v1/workloads/{id}/stop",
            post(workloads::stop_workload),
        )
        .route(
            "/api/v1/workloads/{id}/start",
            post(workloads::start_workload),
        )
        .route(
            "/api/v1/workloads/{id}/restart",
            post(workloads::restart_workload),
        )
        .route("/api/v1/deployments", get(workloads::list_deployments))
        .route("/api/v1/deployments/{id}", get(workloads::get_deployment))
        .route("/api/v1/tasks", get(tasks::list_tasks))
        .route("/api/v1/tasks/{id}", get(tasks::get_task))
        .route("/api/v1/tasks/{id}/kill", post(tasks::kill_task))
        .route("/api/v1/tasks/{id}/files", get(tasks::task_files))
        .route("/api/v1/tasks/{id}/browse", get(tasks::task_browse))
        .route("/api/v1/agents/{id}/assignments", get(agents::assignments))
        .route("/api/v1/agents/{id}/status", post(agents::task_status))
        .route("/api/v1/agents/{id}/volumes", get(agents::agent_volumes))
        .route(
            "/api/v1/agents/{id}/volumes/destroyed",
            post(agents::volumes_destroyed),
        )
        .route("/api/v1/volumes", get(volumes::list_volumes))
        .route(
            "/api/v1/volumes/{id}",
            axum::routing::delete(volumes::delete_volume),
        )
        .route(
            "/api/v1/services",
            get(services::list_services).post(services::create_service),
        )
        .route(
            "/api/v1/services/{name}",
            get(services::get_service)
                .put(services::update_service)
                .delete(services::remove_service),
        )
        .route(
            "/api/v1/services/{name}/history",
            get(services::service_history),
        )
        .route(
            "/api/v1/services/{name}/rollback",
            post(services::rollback_service),
        )
        .route(
            "/api/v1/services/{name}/switchover",
            post(services::switchover),
        )
        .route("/api/v1/services/{name}/plans", get(services::list_plans))
        .route(
            "/api/v1/services/{name}/plans/{plan}",
            get(services::get_plan),
        )
        .route(
            "/api/v1/services/{name}/plans/{plan}/start",
            post(services::start_plan),
        )
        .route(
            "/api/v1/services/{name}/plans/{plan}/interrupt",
            post(services::interrupt_plan),
        )
        .route(
            "/api/v1/services/{name}/plans/{plan}/continue",
            post(services::continue_plan),
        )
        .route(
            "/api/v1/services/{name}/plans/{plan}/force-complete",
            post(services::force_complete_step),
        )
        .route(
            "/api/v1/services/{name}/plans/{plan}/restart",
            post(services::restart_step),
        )
        .route("/api/v1/services/{name}/pods", get(services::list_pods))
        .route(
            "/api/v1/services/{name}/pods/{pod}/restart",
            post(services::restart_pod),
        )
        .route(
            "/api/v1/services/{name}/pods/{pod}/replace",
            post(services::replace_pod),
        )
        .route("/api/v1/packages", get(packages::search))
        .route("/api/v1/packages/installed", get(packages::list_installed))
        .route(
            "/api/v1/packages/installed/{service}",
            axum::routing::put(packages::update).delete(packages::uninstall),
        )
        .route(
            "/api/v1/packages/installed/{service}/rollback",
            post(packages::rollback),
        )
        .route("/api/v1/packages/repos", get(packages::list_repos))
        .route(
            "/api/v1/packages/repos/{repo}",
            axum::routing::put(packages::put_repo).delete(packages::delete_repo),
        )
        .route("/api/v1/packages/{name}", get(packages::describe))
        .route(
            "/api/v1/packages/{name}/render",
            post(packages::render_package),
        )
        .route("/api/v1/packages/{name}/install", post(packages::install))
        .route("/api/v1/events", get(events::events))
        .route("/api/v1/events/recent", get(events::recent_events))
        .route("/api/v1/dns", get(dns::dns_table))
        .route(
            "/api/v1/join-tokens",
            get(join::list_tokens).post(join::create_token),
        )
        .route(
            "/api/v1/join-tokens/{id}",
            axum::routing::delete(join::revoke_token),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics::metrics))
        .layer(DefaultBodyLimit::max(api.max_body));
    // Raft RPCs are not here: they have their own listener and credential (raft::node).
    v1.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(auth))
        // A joining node has no token and no certificate yet: its join token is its credential.
        .route("/api/v1/join/ca", get(join::join_ca))
        .route(
            "/api/v1/join",
            post(join::join).layer(DefaultBodyLimit::max(64 * 1024)),
        )
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

/// A request made with a node certificate and no token: who made it (`tls::Identity`).
#[derive(Clone, Debug)]
pub struct NodeCaller(pub cairn_raft::tls::Identity);

/// A token is checked when one is sent. Without one, a cluster certificate presented in the
/// TLS handshake speaks for its node: masters and admins may do anything, an agent only its
/// own reporting (registration, `/api/v1/agents/<its id>/...`) and the DNS table, so a
/// joined agent never holds the user token and cannot speak for another agent.
async fn auth(ctx: Ctx, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.strip_prefix("Bearer ").is_some_and(|t| !t.is_empty()));
    if !bearer {
        if let Some(id) = cairn_raft::tls::peer_identity(&req).cloned() {
            if let Err(e) = node_may(&id, req.method(), req.uri().path()) {
                return e.into_response();
            }
            req.extensions_mut().insert(NodeCaller(id));
            return next.run(req).await;
        }
    }
    match crate::error::check_bearer(req.headers(), &ctx.token) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// What a node certificate allows without a token (see `auth`).
pub fn node_may(
    id: &cairn_raft::tls::Identity,
    method: &axum::http::Method,
    path: &str,
) -> Result<(), ApiError> {
    let ok = match id.role.as_str() {
        "master" | "admin" => true,
        "agent" => {
            let own = format!("/api/v1/agents/{}/", id.name);
            (path == "/api/v1/agents" && method == axum::http::Method::POST)
                || path.starts_with(&own)
                || path == "/api/v1/dns"
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the certificate of {}:{} may not {method} {path}: an agent reports only as \
                 itself; send a user token for anything else",
                id.role, id.name
            ),
        ))
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

/// The read parameters and a page (`offset`, `limit`) for lists of large tables, so a page
/// of a big cluster never reads every row.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    pub stale: Option<bool>,
    pub index: Option<u64>,
    pub wait: Option<String>,
    pub offset: Option<usize>,
    pub limit: Option<usize>,
}

impl PageParams {
    fn read(&self) -> ReadParams {
        ReadParams {
            stale: self.stale,
            index: self.index,
            wait: self.wait.clone(),
        }
    }
    fn offset(&self) -> usize {
        self.offset.unwrap_or(0)
    }
    fn limit(&self) -> usize {
        self.limit.unwrap_or(usize::MAX)
    }
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
                    "unauthorized" => StatusCode::UNAUTHORIZED,
                    "cas_failed" | "conflict" | "invalid_transition" | "too_many" => {
                        StatusCode::CONFLICT
                    }
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

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_states_are_listed_in_declaration_order() {
        // `model::count_states` counts tasks into an array indexed by `state as usize`.
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
