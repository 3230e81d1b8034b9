//! Agents and workloads: lists, details and actions.

use super::{agent_rows, back, failure_page, AgentRow};
use crate::backend::{enc, ApiFailure};
use crate::view::{self, ago, render, text, Layout};
use crate::{Posted, Sess, St, Ui};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route("/ui/agents", get(agents))
        .route("/ui/agents/{id}", get(agent))
        .route("/ui/workloads", get(workloads).post(submit))
        .route("/ui/workloads/{id}", get(workload))
        .route("/ui/workloads/{id}/{action}", post(workload_action))
        .route(
            "/ui/workloads/{id}/remove",
            get(confirm_remove).post(remove_workload),
        )
}

// ---- agents ----

#[derive(Deserialize)]
struct PageParam {
    page: Option<usize>,
}

const PER_PAGE: usize = 100;

/// The most tasks a workload page lists (live first, then the newest).
const WORKLOAD_TASKS: usize = 100;

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage {
    l: Layout,
    agents: Vec<AgentRow>,
    total: usize,
    page: usize,
    pages: usize,
}

async fn agents(State(ui): St, Sess(s): Sess, Query(q): Query<PageParam>) -> Response {
    let l = Layout::new("Agents", "agents", &s).live();
    let c = match ui.backend.get(&s.token, "/api/v1/cluster").await {
        Ok(c) => c,
        Err(e) => return failure_page(l, &e),
    };
    let total = view::count(&c["agents"], None);
    let pages = total.div_ceil(PER_PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let path = format!(
        "/api/v1/agents?offset={}&limit={PER_PAGE}",
        (page - 1) * PER_PAGE
    );
    let usage = path.replace("/api/v1/agents?", "/api/v1/agents/usage?");
    let (a, u) = tokio::join!(
        ui.backend.get(&s.token, &path),
        ui.backend.get(&s.token, &usage)
    );
    let a = match a {
        Ok(a) => a,
        Err(e) => return failure_page(l, &e),
    };
    let rows = agent_rows(&a, &u.unwrap_or_default());
    render(&AgentsPage {
        l,
        agents: rows,
        total,
        page,
        pages,
    })
}

pub(crate) struct TaskRow {
    pub id: String,
    pub workload: String,
    pub state: String,
    pub health: String,
    pub reason: String,
    pub agent: String,
    pub updated: String,
}

fn task_rows(v: &Value) -> Vec<TaskRow> {
    let now = view::now_ms();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|t| TaskRow {
                    id: text(&t["id"]),
                    workload: text(&t["workload"]),
                    state: text(&t["state"]),
                    health: match t["healthy"].as_bool() {
                        Some(true) => "healthy".into(),
                        Some(false) => "unhealthy".into(),
                        None => String::new(),
                    },
                    reason: text(&t["reason"]),
                    agent: text(&t["agent"]),
                    updated: ago(t["updated_at"].as_u64().unwrap_or(0), now),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Template)]
#[template(path = "agent.html")]
struct AgentPage {
    l: Layout,
    id: String,
    hostname: String,
    addr: String,
    status: String,
    version: String,
    registered: String,
    attributes: Vec<(String, String)>,
    resources: String,
    volumes: Vec<(String, String, String, String)>,
    tasks: Vec<TaskRow>,
}

async fn agent(State(ui): St, Sess(s): Sess, Path(id): Path<String>) -> Response {
    let l = Layout::new(format!("Agent {id}"), "agents", &s).live();
    let (ap, tp) = (
        format!("/api/v1/agents/{}", enc(&id)),
        format!("/api/v1/tasks?agent={}&limit=500", enc(&id)),
    );
    let (a, t) = tokio::join!(ui.backend.get(&s.token, &ap), ui.backend.get(&s.token, &tp));
    let a = match a {
        Ok(a) => a,
        Err(e) => return failure_page(l, &e),
    };
    render(&AgentPage {
        id: text(&a["id"]),
        hostname: text(&a["hostname"]),
        addr: text(&a["addr"]),
        status: text(&a["status"]),
        version: text(&a["version"]),
        registered: view::when(a["registered_at"].as_u64().unwrap_or(0)),
        attributes: a["attributes"]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default(),
        resources: serde_json::to_string_pretty(&a["resources"]).unwrap_or_default(),
        volumes: a["volumes"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|v| {
                        (
                            text(&v["id"]),
                            text(&v["service"]),
                            format!("{} MiB", text(&v["size_mb"])),
                            text(&v["status"]),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        tasks: task_rows(&t.unwrap_or_default()),
        l,
    })
}

// ---- workloads ----

struct WorkloadRow {
    id: String,
    kind: String,
    instances: String,
    version: String,
    state: String,
    runtime: String,
}

#[derive(Template)]
#[template(path = "workloads.html")]
struct WorkloadsPage {
    l: Layout,
    workloads: Vec<WorkloadRow>,
    spec: String,
    format: String,
    error: String,
}

fn runtime_kind(r: &Value) -> String {
    r.as_object()
        .and_then(|o| o.keys().next().cloned())
        .unwrap_or_default()
}

async fn workloads_page(
    ui: &Ui,
    s: &crate::session::Session,
    spec: String,
    format: String,
    error: String,
) -> Response {
    let l = Layout::new("Workloads", "workloads", s);
    let l = if spec.is_empty() { l.live() } else { l };
    let w = match ui.backend.get(&s.token, "/api/v1/workloads").await {
        Ok(w) => w,
        Err(e) => return failure_page(l, &e),
    };
    let rows = w
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| WorkloadRow {
                    id: text(&w["id"]),
                    kind: text(&w["kind"]),
                    instances: text(&w["instances"]),
                    version: text(&w["version"]),
                    state: if w["stopped"].as_bool().unwrap_or(false) {
                        "stopped".into()
                    } else {
                        "active".into()
                    },
                    runtime: runtime_kind(&w["runtime"]),
                })
                .collect()
        })
        .unwrap_or_default();
    let status = if error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (
        status,
        render(&WorkloadsPage {
            l,
            workloads: rows,
            spec,
            format,
            error,
        }),
    )
        .into_response()
}

async fn workloads(State(ui): St, Sess(s): Sess) -> Response {
    workloads_page(&ui, &s, String::new(), "toml".into(), String::new()).await
}

/// Submits a workload pasted as TOML or JSON (the `cairn run` schema).
async fn submit(State(ui): St, p: Posted) -> Response {
    let spec = p.get("spec").unwrap_or("").to_string();
    let format = p.get("format").unwrap_or("toml").to_string();
    let parsed: Result<Value, String> = if format == "json" {
        serde_json::from_str(&spec).map_err(|e| format!("not JSON: {e}"))
    } else {
        toml::from_str::<toml::Value>(&spec)
            .map_err(|e| format!("not TOML: {e}"))
            .and_then(|t| serde_json::to_value(t).map_err(|e| e.to_string()))
    };
    let body = match parsed {
        Ok(b) => b,
        Err(e) => return workloads_page(&ui, &p.sess, spec, format, e).await,
    };
    match ui
        .backend
        .json(&p.sess.token, Method::POST, "/api/v1/workloads", Some(body))
        .await
    {
        Ok(v) => back(&format!("/ui/workloads/{}", enc(&text(&v["id"])))),
        Err(e) => {
            let msg = match &e.field {
                Some(f) => format!("{f}: {}", e.message),
                None => e.message.clone(),
            };
            workloads_page(&ui, &p.sess, spec, format, msg).await
        }
    }
}

struct DeploymentRow {
    id: String,
    state: String,
    started: String,
    message: String,
}

#[derive(Template)]
#[template(path = "workload.html")]
struct WorkloadPage {
    l: Layout,
    id: String,
    kind: String,
    version: String,
    instances: String,
    stopped: bool,
    running: usize,
    total_tasks: usize,
    spec: String,
    tasks: Vec<TaskRow>,
    deployments: Vec<DeploymentRow>,
}

async fn workload(State(ui): St, Sess(s): Sess, Path(id): Path<String>) -> Response {
    let l = Layout::new(format!("Workload {id}"), "workloads", &s).live();
    let wp = format!("/api/v1/workloads/{}?limit={WORKLOAD_TASKS}", enc(&id));
    let (w, d) = tokio::join!(
        ui.backend.get(&s.token, &wp),
        ui.backend.get(&s.token, "/api/v1/deployments")
    );
    let v = match w {
        Ok(v) => v,
        Err(e) => return failure_page(l, &e),
    };
    let w = &v["workload"];
    let mut spec = w.clone();
    if let Some(o) = spec.as_object_mut() {
        for k in ["previous", "next_seq", "last_tick", "updated_at", "version"] {
            o.remove(k);
        }
    }
    let tasks = task_rows(&v["tasks"]);
    let counts = &v["task_counts"];
    let (running, total_tasks) = (
        view::count(counts, Some("running")),
        view::count(counts, None),
    );
    let now = view::now_ms();
    let mut deployments: Vec<DeploymentRow> = d
        .unwrap_or_default()
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|d| d["workload"].as_str() == Some(id.as_str()))
                .map(|d| DeploymentRow {
                    id: text(&d["id"]),
                    state: text(&d["state"]),
                    started: ago(d["started_at"].as_u64().unwrap_or(0), now),
                    message: text(&d["message"]),
                })
                .collect()
        })
        .unwrap_or_default();
    deployments.reverse();
    render(&WorkloadPage {
        id: text(&w["id"]),
        kind: text(&w["kind"]),
        version: text(&w["version"]),
        instances: text(&w["instances"]),
        stopped: w["stopped"].as_bool().unwrap_or(false),
        running,
        total_tasks,
        spec: serde_json::to_string_pretty(&spec).unwrap_or_default(),
        tasks,
        deployments,
        l,
    })
}

async fn workload_action(
    State(ui): St,
    Path((id, action)): Path<(String, String)>,
    p: Posted,
) -> Response {
    act(&ui, id, action, p).await
}

async fn remove_workload(State(ui): St, Path(id): Path<String>, p: Posted) -> Response {
    act(&ui, id, "remove".into(), p).await
}

/// Scale, stop, start, restart or remove a workload.
async fn act(ui: &Ui, id: String, action: String, p: Posted) -> Response {
    let l = Layout::new(format!("Workload {id}"), "workloads", &p.sess);
    let base = format!("/api/v1/workloads/{}", enc(&id));
    let (method, path, body) = match action.as_str() {
        "scale" => {
            let n: u32 = match p.get("instances").unwrap_or("").trim().parse() {
                Ok(n) => n,
                Err(_) => {
                    return failure_page(
                        l,
                        &ApiFailure {
                            status: 400,
                            message: "instances: enter a whole number of instances, e.g. 3".into(),
                            ..Default::default()
                        },
                    )
                }
            };
            (
                Method::POST,
                format!("{base}/scale"),
                Some(json!({ "instances": n })),
            )
        }
        "stop" | "start" | "restart" => (Method::POST, format!("{base}/{action}"), None),
        "remove" => (Method::DELETE, base.clone(), None),
        _ => {
            return failure_page(
                l,
                &ApiFailure {
                    status: 404,
                    message: format!("no action {action:?} on workloads"),
                    ..Default::default()
                },
            )
        }
    };
    match ui.backend.json(&p.sess.token, method, &path, body).await {
        Ok(_) if action == "remove" => back("/ui/workloads"),
        Ok(_) => back(&format!("/ui/workloads/{}", enc(&id))),
        Err(e) => failure_page(l, &e),
    }
}

#[derive(Template)]
#[template(path = "confirm.html")]
pub(crate) struct Confirm {
    pub l: Layout,
    pub heading: String,
    pub consequences: Vec<String>,
    pub action: String,
    pub button: String,
    pub cancel: String,
}

async fn confirm_remove(Sess(s): Sess, Path(id): Path<String>) -> Response {
    render(&Confirm {
        l: Layout::new(format!("Remove {id}"), "workloads", &s),
        heading: format!("Remove workload {id}?"),
        consequences: vec![
            format!("Every task of {id} is killed."),
            "Its sandboxes are kept on the agents until garbage collection.".into(),
        ],
        action: format!("/ui/workloads/{}/remove", enc(&id)),
        button: "Remove workload".into(),
        cancel: format!("/ui/workloads/{}", enc(&id)),
    })
}
