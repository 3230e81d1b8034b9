//! A task: its state, live logs (followed over server-sent events, read through the
//! masters) and the sandbox file browser with downloads.

use super::{back, failure_page};
use crate::backend::{enc, ApiFailure};
use crate::view::{self, render, text, Layout};
use crate::{Posted, Sess, St, Ui};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, Method};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route("/ui/tasks/{id}", get(task))
        .route("/ui/tasks/{id}/kill", post(kill_task))
        .route("/ui/tasks/{id}/log", get(log_stream))
        .route("/ui/tasks/{id}/files", get(files))
        .route("/ui/tasks/{id}/download", get(download))
}

// ---- tasks ----

#[derive(Template)]
#[template(path = "task.html")]
struct TaskPage {
    l: Layout,
    id: String,
    workload: String,
    workload_href: String,
    agent: String,
    state: String,
    reason: String,
    health: String,
    created: String,
    updated: String,
    ports: String,
    resources: String,
    usage: String,
    live: bool,
    stdout: String,
    stdout_offset: u64,
    stderr: String,
    stderr_offset: u64,
    /// The task's state changes the masters still keep, oldest first.
    history: Vec<super::EventRow>,
}

/// How much of a log a task page shows before following it.
const LOG_TAIL: u64 = 64 * 1024;

/// The last `LOG_TAIL` bytes of a sandbox file and the offset after them.
async fn tail(ui: &Ui, token: &str, id: &str, file: &str) -> (String, u64) {
    let base = format!("/api/v1/tasks/{}/files?path={file}", enc(id));
    let size = match ui
        .backend
        .bytes(token, Method::GET, &format!("{base}&length=0"), None)
        .await
    {
        Ok((_, _, Some(n))) => n,
        _ => return (String::new(), 0),
    };
    let from = size.saturating_sub(LOG_TAIL);
    match ui
        .backend
        .bytes(
            token,
            Method::GET,
            &format!("{base}&offset={from}&length={LOG_TAIL}"),
            None,
        )
        .await
    {
        Ok((_, b, _)) => (
            String::from_utf8_lossy(&b).into_owned(),
            from + b.len() as u64,
        ),
        Err(_) => (String::new(), 0),
    }
}

async fn task(State(ui): St, Sess(s): Sess, Path(id): Path<String>) -> Response {
    let l = Layout::new(format!("Task {id}"), "workloads", &s);
    let t = match ui
        .backend
        .get(&s.token, &format!("/api/v1/tasks/{}", enc(&id)))
        .await
    {
        Ok(t) => t,
        Err(e) => return failure_page(l, &e),
    };
    let hist_path = format!("/api/v1/events/recent?topic=task&limit=100&id={}", enc(&id));
    let ((stdout, so), (stderr, se), hist) = tokio::join!(
        tail(&ui, &s.token, &id, "stdout"),
        tail(&ui, &s.token, &id, "stderr"),
        ui.backend.get(&s.token, &hist_path)
    );
    let mut history = super::event_rows(&hist.unwrap_or_default());
    history.reverse();
    let state = text(&t["state"]);
    let workload = text(&t["workload"]);
    let workload_href = match workload.strip_prefix("service:") {
        Some(rest) => format!(
            "/ui/services/{}",
            enc(rest.split('/').next().unwrap_or(rest))
        ),
        None => format!("/ui/workloads/{}", enc(&workload)),
    };
    render(&TaskPage {
        id: text(&t["id"]),
        agent: text(&t["agent"]),
        reason: text(&t["reason"]),
        health: match t["healthy"].as_bool() {
            Some(true) => "healthy".into(),
            Some(false) => "unhealthy".into(),
            None => "no checks passed yet, or none declared".into(),
        },
        created: view::when(t["created_at"].as_u64().unwrap_or(0)),
        updated: view::when(t["updated_at"].as_u64().unwrap_or(0)),
        ports: t["ports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| format!("{} {}", text(&p["name"]), text(&p["number"])))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        resources: format!(
            "{} cpus, {} MiB memory, {} MiB disk",
            text(&t["resources"]["cpus"]),
            text(&t["resources"]["mem"]),
            text(&t["resources"]["disk"])
        ),
        usage: if t["usage"].is_null() {
            "not reported (the agent did not answer, or the task has ended)".into()
        } else {
            t["usage"].to_string()
        },
        live: !matches!(
            state.as_str(),
            "finished" | "failed" | "killed" | "lost" | "gone"
        ),
        state,
        workload,
        workload_href,
        stdout,
        stdout_offset: so,
        stderr,
        stderr_offset: se,
        history,
        l,
    })
}

async fn kill_task(State(ui): St, Path(id): Path<String>, p: Posted) -> Response {
    let l = Layout::new(format!("Task {id}"), "workloads", &p.sess);
    match ui
        .backend
        .json(
            &p.sess.token,
            Method::POST,
            &format!("/api/v1/tasks/{}/kill", enc(&id)),
            None,
        )
        .await
    {
        Ok(_) => back(&format!("/ui/tasks/{}", enc(&id))),
        Err(e) => failure_page(l, &e),
    }
}

#[derive(Deserialize)]
struct LogParams {
    file: Option<String>,
    offset: Option<u64>,
}

/// Follows a task's stdout or stderr from `offset`, read through the masters (the browser
/// never talks to agents): each new chunk is one server-sent event; the stream ends when the
/// task has ended and everything is sent.
async fn log_stream(
    State(ui): St,
    Sess(s): Sess,
    Path(id): Path<String>,
    Query(q): Query<LogParams>,
) -> Response {
    let file = match q.file.as_deref() {
        Some("stderr") => "stderr",
        _ => "stdout",
    };
    let start = q.offset.unwrap_or(0);
    let stream = futures::stream::unfold(
        (ui.clone(), s.token.clone(), id.clone(), start, false),
        move |(ui, token, id, offset, done)| async move {
            if done {
                return None;
            }
            let mut idle = 0u32;
            loop {
                let path = format!(
                    "/api/v1/tasks/{}/files?path={file}&offset={offset}&length=65536",
                    enc(&id)
                );
                match ui.backend.bytes(&token, Method::GET, &path, None).await {
                    Ok((_, b, _)) if !b.is_empty() => {
                        let next = offset + b.len() as u64;
                        // JSON text, so a chunk that ends mid-line arrives exactly as written.
                        let chunk =
                            serde_json::to_string(&String::from_utf8_lossy(&b)).unwrap_or_default();
                        let ev = Event::default().id(next.to_string()).data(chunk);
                        return Some((
                            Ok::<_, std::convert::Infallible>(ev),
                            (ui, token, id, next, false),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let ev = Event::default().event("end").data(e.message);
                        return Some((Ok(ev), (ui, token, id, offset, true)));
                    }
                }
                // Nothing new: has the task ended?
                idle += 1;
                if idle.is_multiple_of(8) {
                    let st = ui
                        .backend
                        .get(&token, &format!("/api/v1/tasks/{}?stale=true", enc(&id)))
                        .await
                        .map(|t| text(&t["state"]))
                        .unwrap_or_default();
                    if matches!(st.as_str(), "finished" | "failed" | "killed" | "lost" | "") {
                        let ev = Event::default().event("end").data(format!("task {st}"));
                        return Some((Ok(ev), (ui, token, id, offset, true)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct PathParam {
    path: Option<String>,
}

struct FileRow {
    name: String,
    href: String,
    size: String,
    dir: bool,
}

#[derive(Template)]
#[template(path = "files.html")]
struct FilesPage {
    l: Layout,
    id: String,
    path: String,
    parent: String,
    entries: Vec<FileRow>,
}

/// A directory of a task's sandbox.
async fn files(
    State(ui): St,
    Sess(s): Sess,
    Path(id): Path<String>,
    Query(q): Query<PathParam>,
) -> Response {
    let path = q.path.unwrap_or_else(|| ".".into());
    let l = Layout::new(format!("Files of {id}"), "workloads", &s);
    let v = match ui
        .backend
        .get(
            &s.token,
            &format!("/api/v1/tasks/{}/browse?path={}", enc(&id), enc(&path)),
        )
        .await
    {
        Ok(v) => v,
        Err(e) => return failure_page(l, &e),
    };
    let entries = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let p = text(&e["path"]);
                    let dir = e["dir"].as_bool().unwrap_or(false);
                    let href = if dir {
                        format!("/ui/tasks/{}/files?path={}", enc(&id), enc(&p))
                    } else {
                        format!("/ui/tasks/{}/download?path={}", enc(&id), enc(&p))
                    };
                    FileRow {
                        name: p.rsplit('/').next().unwrap_or(&p).to_string(),
                        href,
                        size: if dir { String::new() } else { text(&e["size"]) },
                        dir,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let parent = match path.rsplit_once('/') {
        Some((p, _)) => Some(p.to_string()),
        None if path != "." => Some(".".into()),
        None => None,
    }
    .map(|p| format!("/ui/tasks/{}/files?path={}", enc(&id), enc(&p)))
    .unwrap_or_default();
    render(&FilesPage {
        l,
        id,
        path,
        parent,
        entries,
    })
}

/// Largest file the browser downloads through the masters.
const MAX_DOWNLOAD: u64 = 256 << 20;

/// Downloads a sandbox file, read through the masters in 1 MiB ranges.
async fn download(
    State(ui): St,
    Sess(s): Sess,
    Path(id): Path<String>,
    Query(q): Query<PathParam>,
) -> Response {
    let path = q.path.unwrap_or_else(|| "stdout".into());
    let l = Layout::new(format!("Files of {id}"), "workloads", &s);
    let mut out = Vec::new();
    loop {
        let r = ui
            .backend
            .bytes(
                &s.token,
                Method::GET,
                &format!(
                    "/api/v1/tasks/{}/files?path={}&offset={}",
                    enc(&id),
                    enc(&path),
                    out.len()
                ),
                None,
            )
            .await;
        match r {
            Ok((_, b, size)) => {
                let end =
                    b.is_empty() || size.is_some_and(|n| out.len() as u64 + b.len() as u64 >= n);
                out.extend_from_slice(&b);
                if out.len() as u64 > MAX_DOWNLOAD {
                    return failure_page(
                        l,
                        &ApiFailure {
                            status: 413,
                            message: format!(
                                "{path} is larger than {} MiB: read it in ranges with \
                                 GET /api/v1/tasks/{id}/files",
                                MAX_DOWNLOAD >> 20
                            ),
                            ..Default::default()
                        },
                    );
                }
                if end {
                    break;
                }
            }
            Err(e) => return failure_page(l, &e),
        }
    }
    let name: String = path
        .rsplit('/')
        .next()
        .unwrap_or("file")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect();
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        out,
    )
        .into_response()
}
