//! Stateful services: the list, a service's plans as a live tree of phases and steps (status,
//! timestamps, what each step waits on), its pods with agents, volumes and readiness, and
//! the operator's actions (plans, pods, rollback, uninstall with what it destroys).

use super::{back, failure_page};
use crate::backend::{enc, ApiFailure};
use crate::pages::cluster::Confirm;
use crate::view::{self, ago, render, text, Layout};
use crate::{Posted, Sess, St, Ui};
use askama::Template;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route("/ui/services", get(services))
        .route("/ui/services/{name}", get(service))
        .route(
            "/ui/services/{name}/uninstall",
            get(confirm_uninstall).post(uninstall),
        )
        .route("/ui/services/{name}/rollback", post(rollback))
        .route("/ui/services/{name}/plans/{plan}/{op}", post(plan_op))
        .route("/ui/services/{name}/pods/{pod}/{op}", post(pod_op))
}

struct ServiceRow {
    name: String,
    package: String,
    version: String,
    pods: String,
    deploy: String,
    updated: String,
}

#[derive(Template)]
#[template(path = "services.html")]
struct ServicesPage {
    l: Layout,
    services: Vec<ServiceRow>,
}

async fn services(State(ui): St, Sess(s): Sess) -> Response {
    let l = Layout::new("Services", "services", &s).live();
    let v = match ui.backend.get(&s.token, "/api/v1/services").await {
        Ok(v) => v,
        Err(e) => return failure_page(l, &e),
    };
    let now = view::now_ms();
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| ServiceRow {
                    name: text(&s["name"]),
                    package: text(&s["package"]),
                    version: text(&s["version"]),
                    pods: text(&s["pods"]),
                    deploy: text(&s["plans"]["deploy"]),
                    updated: ago(s["updated_at"].as_u64().unwrap_or(0), now),
                })
                .collect()
        })
        .unwrap_or_default();
    render(&ServicesPage { l, services: rows })
}

struct StepView {
    name: String,
    status: String,
    message: String,
    started: String,
    updated: String,
    history: Vec<(String, String, String)>,
    can_restart: bool,
    can_force: bool,
}

struct PhaseView {
    name: String,
    strategy: String,
    steps: Vec<StepView>,
}

struct PlanView {
    name: String,
    status: String,
    interrupted: bool,
    phases: Vec<PhaseView>,
    can_start: bool,
}

struct PodView {
    id: String,
    /// `host:port` of each port of the pod's tasks.
    addresses: String,
    /// The named endpoints that point at this pod, as DNS names.
    endpoints: Vec<String>,
    agent: String,
    agent_status: String,
    incarnation: String,
    tasks: Vec<(String, String, String, String, String)>,
    volumes: Vec<String>,
    ready: bool,
}

#[derive(Template)]
#[template(path = "service.html")]
struct ServicePage {
    l: Layout,
    name: String,
    version: String,
    package: String,
    is_package: bool,
    plans: Vec<PlanView>,
    pods: Vec<PodView>,
    history: Vec<(String, String)>,
    /// The endpoint under `[failover]` (empty: none): pods it does not name get a
    /// switchover button.
    failover: String,
}

fn plan_view(p: &Value) -> PlanView {
    let name = text(&p["name"]);
    let status = text(&p["status"]);
    let phases = p["phases"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|ph| PhaseView {
                    name: text(&ph["name"]),
                    strategy: text(&ph["strategy"]),
                    steps: ph["steps"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|st| {
                                    let status = text(&st["status"]);
                                    StepView {
                                        name: text(&st["name"]),
                                        message: text(&st["message"]),
                                        started: view::when(st["started_at"].as_u64().unwrap_or(0)),
                                        updated: view::when(st["updated_at"].as_u64().unwrap_or(0)),
                                        history: st["history"]
                                            .as_array()
                                            .map(|h| {
                                                h.iter()
                                                    .map(|e| {
                                                        (
                                                            view::when(
                                                                e["at"].as_u64().unwrap_or(0),
                                                            ),
                                                            text(&e["status"]),
                                                            text(&e["message"]),
                                                        )
                                                    })
                                                    .collect()
                                            })
                                            .unwrap_or_default(),
                                        can_restart: status != "pending",
                                        can_force: status != "complete",
                                        status,
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    PlanView {
        can_start: !matches!(
            name.as_str(),
            "deploy" | "recovery" | "decommission" | "failover"
        ),
        interrupted: p["interrupted"].as_bool().unwrap_or(false),
        name,
        status,
        phases,
    }
}

async fn service(State(ui): St, Sess(s): Sess, Path(name): Path<String>) -> Response {
    let l = Layout::new(format!("Service {name}"), "services", &s).live();
    let base = format!("/api/v1/services/{}", enc(&name));
    let (pl, po, hi) = (
        format!("{base}/plans"),
        format!("{base}/pods"),
        format!("{base}/history"),
    );
    let (svc, plans, pods, hist) = tokio::join!(
        ui.backend.get(&s.token, &base),
        ui.backend.get(&s.token, &pl),
        ui.backend.get(&s.token, &po),
        ui.backend.get(&s.token, &hi),
    );
    let svc = match svc {
        Ok(v) => v,
        Err(e) => return failure_page(l, &e),
    };
    let mut plans: Vec<PlanView> = match plans.unwrap_or_default() {
        Value::Array(a) => a.iter().map(plan_view).collect(),
        Value::Object(o) => o.values().map(plan_view).collect(),
        _ => vec![],
    };
    // Declared plans never run yet (a backup) can be started too.
    for d in svc["spec"]["plans"].as_array().into_iter().flatten() {
        let name = text(&d["name"]);
        if !name.is_empty() && !plans.iter().any(|p| p.name == name) {
            plans.push(PlanView {
                name,
                status: "not run yet".into(),
                interrupted: false,
                phases: Vec::new(),
                can_start: true,
            });
        }
    }
    let pods = pods
        .unwrap_or_default()
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let tasks: Vec<(String, String, String, String, String)> = p["tasks"]
                        .as_array()
                        .map(|t| {
                            t.iter()
                                .map(|t| {
                                    (
                                        text(&t["id"]),
                                        text(&t["name"]),
                                        text(&t["state"]),
                                        if t["ready"].as_bool().unwrap_or(false) {
                                            "ready".into()
                                        } else {
                                            "not ready".into()
                                        },
                                        t["ports"]
                                            .as_array()
                                            .map(|ps| {
                                                ps.iter()
                                                    .map(|p| {
                                                        format!(
                                                            "{} {}",
                                                            text(&p["name"]),
                                                            text(&p["number"])
                                                        )
                                                    })
                                                    .collect::<Vec<_>>()
                                                    .join(", ")
                                            })
                                            .unwrap_or_default(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let host = text(&p["host"]);
                    let addresses = p["tasks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|t| t["ports"].as_array().cloned().unwrap_or_default())
                        .map(|port| format!("{host}:{}", text(&port["number"])))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let endpoints = p["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| format!("{}.{}.cairn", text(e), name))
                        .collect();
                    PodView {
                        addresses: if host.is_empty() {
                            String::new()
                        } else {
                            addresses
                        },
                        endpoints,
                        id: text(&p["id"]),
                        agent: text(&p["agent"]),
                        agent_status: text(&p["agent_status"]),
                        incarnation: text(&p["incarnation"]),
                        ready: !tasks.is_empty() && tasks.iter().all(|t| t.3 == "ready"),
                        tasks,
                        volumes: p["volumes"]
                            .as_array()
                            .map(|v| {
                                v.iter()
                                    .map(|v| {
                                        format!(
                                            "{} at {} ({} MiB, {})",
                                            text(&v["name"]),
                                            text(&v["path"]),
                                            text(&v["size_mb"]),
                                            text(&v["status"])
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let package = &svc["spec"]["package"];
    let history = hist
        .unwrap_or_default()
        .as_array()
        .map(|a| {
            a.iter()
                .rev()
                .map(|h| {
                    (
                        view::when(h["at"].as_u64().unwrap_or(0)),
                        h["spec"]["package"]["version"]
                            .as_str()
                            .map(|v| format!("package {v}"))
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    render(&ServicePage {
        name: name.clone(),
        version: text(&svc["version"]),
        is_package: package.is_object(),
        package: if package.is_object() {
            format!("{} {}", text(&package["name"]), text(&package["version"]))
        } else {
            String::new()
        },
        plans,
        pods,
        history,
        failover: text(&svc["spec"]["failover"]["endpoint"]),
        l,
    })
}

async fn act(ui: &Ui, p: &Posted, name: &str, method: Method, path: String) -> Response {
    let l = Layout::new(format!("Service {name}"), "services", &p.sess);
    match ui.backend.json(&p.sess.token, method, &path, None).await {
        Ok(_) => back(&format!("/ui/services/{}", enc(name))),
        Err(e) => failure_page(l, &e),
    }
}

fn unknown(p: &Posted, what: &str) -> Response {
    failure_page(
        Layout::new("Not found", "services", &p.sess),
        &ApiFailure {
            status: 404,
            message: format!("no action {what:?}"),
            ..Default::default()
        },
    )
}

/// Start, interrupt or continue a plan; restart or force-complete one of its steps.
async fn plan_op(
    State(ui): St,
    Path((name, plan, op)): Path<(String, String, String)>,
    p: Posted,
) -> Response {
    let base = format!("/api/v1/services/{}/plans/{}", enc(&name), enc(&plan));
    let path = match op.as_str() {
        // Form fields `param_<key>` are the run's parameters (the restore plan's `from`).
        "start" => {
            let params: Vec<String> = p
                .form
                .iter()
                .filter_map(|(k, v)| {
                    let k = k.strip_prefix("param_")?;
                    Some(format!("{}={}", enc(k), enc(v.trim())))
                })
                .collect();
            if params.is_empty() {
                format!("{base}/start")
            } else {
                format!("{base}/start?{}", params.join("&"))
            }
        }
        "interrupt" | "continue" => format!("{base}/{op}"),
        "restart" | "force-complete" => format!(
            "{base}/{op}?phase={}&step={}",
            enc(p.get("phase").unwrap_or("")),
            enc(p.get("step").unwrap_or(""))
        ),
        _ => return unknown(&p, &op),
    };
    act(&ui, &p, &name, Method::POST, path).await
}

/// Restart or replace a pod.
async fn pod_op(
    State(ui): St,
    Path((name, pod, op)): Path<(String, String, String)>,
    p: Posted,
) -> Response {
    let path = match op.as_str() {
        "restart" | "replace" => format!("/api/v1/services/{}/pods/{}/{op}", enc(&name), enc(&pod)),
        // The failover endpoint (e.g. `primary`) moves to this pod on purpose.
        "switchover" => format!(
            "/api/v1/services/{}/switchover?to={}",
            enc(&name),
            enc(&pod)
        ),
        _ => return unknown(&p, &op),
    };
    act(&ui, &p, &name, Method::POST, path).await
}

async fn rollback(State(ui): St, Path(name): Path<String>, p: Posted) -> Response {
    let path = format!("/api/v1/services/{}/rollback", enc(&name));
    act(&ui, &p, &name, Method::POST, path).await
}

/// Names what an uninstall destroys: every pod's volumes, by id, before the button.
async fn confirm_uninstall(State(ui): St, Sess(s): Sess, Path(name): Path<String>) -> Response {
    let l = Layout::new(format!("Uninstall {name}"), "services", &s);
    let pods = match ui
        .backend
        .get(&s.token, &format!("/api/v1/services/{}/pods", enc(&name)))
        .await
    {
        Ok(v) => v,
        Err(e) => return failure_page(l, &e),
    };
    let mut consequences = vec![format!("Every task of service {name} is killed.")];
    for p in pods.as_array().into_iter().flatten() {
        for v in p["volumes"].as_array().into_iter().flatten() {
            consequences.push(format!(
                "Volume {} of pod {} ({} MiB on agent {}) is destroyed with its data.",
                text(&v["id"]),
                text(&p["id"]),
                text(&v["size_mb"]),
                text(&v["agent"])
            ));
        }
    }
    render(&Confirm {
        l,
        heading: format!("Uninstall {name}?"),
        consequences,
        action: format!("/ui/services/{}/uninstall", enc(&name)),
        button: format!("Uninstall {name} and destroy its data"),
        cancel: format!("/ui/services/{}", enc(&name)),
    })
}

async fn uninstall(State(ui): St, Path(name): Path<String>, p: Posted) -> Response {
    let l = Layout::new(format!("Uninstall {name}"), "services", &p.sess);
    match ui
        .backend
        .json(
            &p.sess.token,
            Method::DELETE,
            &format!("/api/v1/services/{}", enc(&name)),
            None,
        )
        .await
    {
        Ok(_) => back("/ui/services"),
        Err(e) => failure_page(l, &e),
    }
}
