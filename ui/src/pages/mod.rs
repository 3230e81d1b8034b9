//! The pages: routes, login and logout, the overview, the events page and the live stream.
//! Each resource's pages are in their own module; all read through `Ui::backend`.

mod catalog;
mod cluster;
mod services;
mod tasks;

use crate::backend::{enc, ApiFailure};
use crate::view::{self, ago, render, text, Layout};
use crate::{session, Posted, Sess, St, Ui};
use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub(crate) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(overview))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/events", get(events_page))
        .route("/ui/live", get(live))
        .merge(cluster::routes())
        .merge(catalog::routes())
        .merge(services::routes())
        .merge(tasks::routes())
}

/// A page for an API failure: its message in plain words, with the status it came with.
pub(crate) fn failure_page(l: Layout, e: &ApiFailure) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let t = ErrorPage {
        l,
        status: status.as_u16(),
        message: e.message.clone(),
    };
    (status, render(&t)).into_response()
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    l: Layout,
    status: u16,
    message: String,
}

/// Where to go after a post: back to `to`, which must be a page of the UI.
pub(crate) fn back(to: &str) -> Response {
    let to = if to.starts_with("/ui/") && !to.starts_with("//") {
        to
    } else {
        "/ui/"
    };
    Redirect::to(to).into_response()
}

// ---- login ----

#[derive(Deserialize)]
struct NextParam {
    next: Option<String>,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    l: Layout,
    next: String,
    error: String,
}

fn safe_next(n: Option<&str>) -> String {
    match n {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_string()
        }
        _ => "/ui/".into(),
    }
}

async fn login_page(Query(q): Query<NextParam>) -> Response {
    let next = safe_next(q.next.as_deref());
    render(&LoginPage {
        l: Layout::anonymous("Sign in"),
        next,
        error: String::new(),
    })
}

async fn login(
    State(ui): St,
    headers: axum::http::HeaderMap,
    axum::Form(f): axum::Form<Vec<(String, String)>>,
) -> Response {
    let get = |k: &str| {
        f.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim().to_string())
    };
    let token = get("token").unwrap_or_default();
    let next = safe_next(get("next").as_deref());
    let refuse = |msg: &str| {
        (
            StatusCode::UNAUTHORIZED,
            render(&LoginPage {
                l: Layout::anonymous("Sign in"),
                next: next.clone(),
                error: msg.to_string(),
            }),
        )
            .into_response()
    };
    if token.is_empty() || token.len() > 1024 {
        return refuse("Enter the cluster token (cairn dev prints it).");
    }
    // The token is checked by the API itself, as any client's would be.
    // `/api/v1/cluster` needs no leader, so any failure is the token's.
    if ui.backend.get(&token, "/api/v1/cluster").await.is_err() {
        return refuse("That token is not valid for this cluster.");
    }
    let secure = ui.tls
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes() == b"https");
    let s = ui.keys.issue(&token, crate::now_secs());
    (
        [(
            header::SET_COOKIE,
            session::set_cookie(&ui.keys.seal(&s), secure),
        )],
        Redirect::to(&next),
    )
        .into_response()
}

async fn logout(_p: Posted) -> Response {
    (
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/ui/login"),
    )
        .into_response()
}

// ---- overview ----

pub(crate) struct AgentRow {
    pub id: String,
    pub hostname: String,
    pub addr: String,
    pub status: String,
    pub cpus: String,
    pub cpu_pct: u32,
    pub mem: String,
    pub mem_pct: u32,
    pub disk: String,
    pub disk_pct: u32,
    pub tasks: u64,
}

/// Agent rows with what their live tasks hold (`/api/v1/agents/usage`).
pub(crate) fn agent_rows(agents: &Value, usage: &Value) -> Vec<AgentRow> {
    let empty = vec![];
    agents
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|a| {
            let id = text(&a["id"]);
            let u = &usage[&id];
            let tot = &a["resources"]["unreserved"];
            let f = |v: &Value| v.as_f64().unwrap_or(0.0);
            AgentRow {
                hostname: text(&a["hostname"]),
                addr: text(&a["addr"]),
                status: text(&a["status"]),
                cpus: format!("{:.1} / {:.1}", f(&u["cpus"]), f(&tot["cpus"])),
                cpu_pct: view::pct(f(&u["cpus"]), f(&tot["cpus"])),
                mem: format!("{} / {} MiB", f(&u["mem"]), f(&tot["mem"])),
                mem_pct: view::pct(f(&u["mem"]), f(&tot["mem"])),
                disk: format!("{} / {} MiB", f(&u["disk"]), f(&tot["disk"])),
                disk_pct: view::pct(f(&u["disk"]), f(&tot["disk"])),
                tasks: u["tasks"].as_u64().unwrap_or(0),
                id,
            }
        })
        .collect()
}

pub(crate) struct EventRow {
    pub topic: String,
    pub id: String,
    pub kind: String,
    pub detail: String,
    pub when: String,
    pub ago: String,
    pub href: String,
}

pub(crate) fn event_rows(v: &Value) -> Vec<EventRow> {
    let now = view::now_ms();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let topic = text(&e["topic"]);
                    let id = text(&e["id"]);
                    let href = match topic.as_str() {
                        "task" => format!("/ui/tasks/{}", enc(&id)),
                        "workload" => format!("/ui/workloads/{}", enc(&id)),
                        "agent" => format!("/ui/agents/{}", enc(&id)),
                        "service" => format!("/ui/services/{}", enc(&id)),
                        _ => String::new(),
                    };
                    let at = e["at"].as_u64().unwrap_or(0);
                    EventRow {
                        kind: text(&e["kind"]),
                        detail: text(&e["detail"]),
                        when: view::when(at),
                        ago: ago(at, now),
                        topic,
                        id,
                        href,
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) struct Master {
    pub id: u64,
    pub addr: String,
    pub leader: bool,
    pub voter: bool,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct Overview {
    l: Layout,
    masters: Vec<Master>,
    leader: String,
    term: u64,
    commit: u64,
    applied: u64,
    task_counts: Vec<(String, u64)>,
    agents: Vec<AgentRow>,
    agents_total: usize,
    agents_active: usize,
    workloads: usize,
    services: usize,
    events: Vec<EventRow>,
}

/// The agents the overview lists in full; beyond this it links to the agents page.
const OVERVIEW_AGENTS: usize = 20;

async fn overview(State(ui): St, Sess(s): Sess) -> Response {
    let l = Layout::new("Overview", "overview", &s).live();
    let b = &ui.backend;
    let t = &s.token;
    let agents_path = format!("/api/v1/agents?limit={OVERVIEW_AGENTS}");
    let usage_path = format!("/api/v1/agents/usage?limit={OVERVIEW_AGENTS}");
    let (cluster, agents, usage, events) = tokio::join!(
        b.get(t, "/api/v1/cluster"),
        b.get(t, &agents_path),
        b.get(t, &usage_path),
        b.get(t, "/api/v1/events/recent?limit=15"),
    );
    let cluster = match cluster {
        Ok(c) => c,
        Err(e) => return failure_page(l, &e),
    };
    let agents = agents.unwrap_or_default();
    let usage = usage.unwrap_or_default();
    let rows = agent_rows(&agents, &usage);
    let agents_total = view::count(&cluster["agents"], None);
    let agents_active = view::count(&cluster["agents"], Some("active"));
    let masters = cluster["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| Master {
                    id: m["id"].as_u64().unwrap_or(0),
                    addr: text(&m["addr"]),
                    leader: m["leader"].as_bool().unwrap_or(false),
                    voter: m["voter"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    let task_counts = cluster["tasks"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    render(&Overview {
        leader: cluster["leader_addr"]
            .as_str()
            .map(|a| format!("master {} ({a})", text(&cluster["leader_id"])))
            .unwrap_or_else(|| "none: the masters are electing one".into()),
        term: cluster["term"].as_u64().unwrap_or(0),
        commit: cluster["commit_index"].as_u64().unwrap_or(0),
        applied: cluster["applied_index"].as_u64().unwrap_or(0),
        masters,
        task_counts,
        agents: rows,
        agents_total,
        agents_active,
        workloads: cluster["workloads"].as_u64().unwrap_or(0) as usize,
        services: cluster["services"].as_u64().unwrap_or(0) as usize,
        events: event_rows(&events.unwrap_or_default()),
        l,
    })
}

// ---- events ----

#[derive(Deserialize)]
struct TopicParam {
    topic: Option<String>,
}

const TOPICS: &[&str] = &["task", "workload", "agent", "deployment", "service", "kv"];

#[derive(Template)]
#[template(path = "events.html")]
struct EventsPage {
    l: Layout,
    topic: String,
    topics: Vec<(&'static str, bool)>,
    events: Vec<EventRow>,
}

async fn events_page(State(ui): St, Sess(s): Sess, Query(q): Query<TopicParam>) -> Response {
    let topic = q.topic.unwrap_or_default();
    let l = Layout::new("Events", "events", &s).live();
    let topic = if TOPICS.contains(&topic.as_str()) {
        topic
    } else {
        String::new()
    };
    let path = if topic.is_empty() {
        "/api/v1/events/recent?limit=200".to_string()
    } else {
        format!("/api/v1/events/recent?limit=200&topic={topic}")
    };
    match ui.backend.get(&s.token, &path).await {
        Ok(v) => render(&EventsPage {
            topics: TOPICS.iter().map(|t| (*t, *t == topic)).collect(),
            topic,
            events: event_rows(&v),
            l,
        }),
        Err(e) => failure_page(l, &e),
    }
}

/// The API's event stream for the page script (`cairn.js` re-renders live pages on events).
async fn live(State(ui): St, Sess(s): Sess) -> Response {
    ui.backend
        .raw(&s.token, Method::GET, "/api/v1/events", None)
        .await
}
