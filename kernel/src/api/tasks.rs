//! Task routes: list, get (with live usage from the agent), kill.

use super::{now_ms, query, with_index, Ctx, ReadParams};
use crate::error::ApiError;
use crate::model::Task;
use crate::state::Command;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::time::Duration;

/// `GET /api/v1/tasks` parameters: the read parameters and filters, so a page of a large
/// cluster never has to fetch every task.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskParams {
    stale: Option<bool>,
    index: Option<u64>,
    wait: Option<String>,
    /// Only tasks of this workload (a service's pod tasks: `service:<name>/<pod type>`).
    workload: Option<String>,
    /// Only tasks on this agent.
    agent: Option<String>,
    /// Only tasks in this state (e.g. `running`).
    state: Option<String>,
    /// At most this many (the newest first when given).
    limit: Option<usize>,
}

pub(super) async fn list_tasks(
    ctx: Ctx,
    q: Result<Query<TaskParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let state = match &p.state {
        None => None,
        Some(s) => Some(
            crate::model::TaskState::ALL
                .iter()
                .copied()
                .find(|st| format!("{st:?}").eq_ignore_ascii_case(s))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "state",
                        format!("unknown task state {s:?}: use e.g. running, failed, finished"),
                    )
                })?,
        ),
    };
    let read = ReadParams {
        stale: p.stale,
        index: p.index,
        wait: p.wait.clone(),
    };
    let index = ctx.prepare_read(&read, |s| s.indexes.tasks).await?;
    let mut all: Vec<Task> = ctx.read(|s| {
        s.tasks
            .values()
            .filter(|t| p.workload.as_ref().is_none_or(|w| &t.workload == w))
            .filter(|t| p.agent.as_ref().is_none_or(|a| &t.agent == a))
            .filter(|t| state.is_none_or(|st| t.state == st))
            .cloned()
            .collect()
    });
    if let Some(limit) = p.limit {
        all.sort_by_key(|t| std::cmp::Reverse(t.updated_at));
        all.truncate(limit);
    }
    Ok(with_index(index, all))
}

/// `files` and `browse` parameters, passed on to the agent.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileParams {
    path: Option<String>,
    offset: Option<u64>,
    length: Option<u64>,
}

/// Largest read of a sandbox file through the masters.
const MAX_FILE_READ: u64 = 1 << 20;

/// A range of a file in a task's sandbox (`stdout`, `stderr` or a path in it), read from
/// the agent that runs the task, so clients (the CLI, the UI) never need an agent address.
/// The size of the whole file is in `x-file-size`.
pub(super) async fn task_files(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<FileParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let mut p = query(q)?;
    if p.length.is_some_and(|l| l > MAX_FILE_READ) {
        return Err(ApiError::bad_request(
            "length",
            format!("length is at most {MAX_FILE_READ} bytes; read in ranges with offset"),
        ));
    }
    p.length.get_or_insert(MAX_FILE_READ);
    agent_proxy(&ctx, &id, "files", &p).await
}

/// A directory listing of a task's sandbox, from its agent.
pub(super) async fn task_browse(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<FileParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    agent_proxy(&ctx, &id, "browse", &p).await
}

async fn agent_proxy(
    ctx: &Ctx,
    id: &str,
    what: &str,
    p: &FileParams,
) -> Result<Response, ApiError> {
    let addr = ctx
        .read(|s| {
            let t = s.tasks.get(id)?;
            Some(s.agents.get(&t.agent).map(|a| a.addr.clone()))
        })
        .ok_or_else(|| {
            ApiError::not_found(format!("no task {id:?}; list them with GET /api/v1/tasks"))
                .field("id")
        })?
        .ok_or_else(|| ApiError::not_found(format!("the agent of task {id:?} is gone")))?;
    let r = ctx
        .client
        .get(format!(
            "{}://{addr}/api/v1/tasks/{id}/{what}",
            cairn_raft::tls::scheme()
        ))
        .query(p)
        .bearer_auth(agent_credential(&ctx.token))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "agent_unreachable",
                format!("the agent at {addr} that runs task {id} did not answer: {e}"),
            )
        })?;
    let status = r.status();
    let mut headers = axum::http::HeaderMap::new();
    for h in [
        axum::http::header::CONTENT_TYPE,
        "x-file-size".parse().expect("name"),
    ] {
        if let Some(v) = r.headers().get(&h) {
            headers.insert(h, v.clone());
        }
    }
    let body = r.bytes().await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_unreachable",
            format!("reading from the agent at {addr}: {e}"),
        )
    })?;
    Ok((status, headers, body).into_response())
}

/// One task, with its live usage fetched from the agent that runs it (usage is the agent's
/// observed state, not replicated; `usage` is null when the agent does not answer).
pub(super) async fn get_task(
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
            .get(format!(
                "{}://{addr}/api/v1/tasks/{id}",
                cairn_raft::tls::scheme()
            ))
            .bearer_auth(agent_credential(&ctx.token))
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
pub(super) async fn kill_task(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
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

/// What a master sends an agent's API as a bearer token: nothing under TLS (its certificate
/// speaks for it, and users' tokens never reach agents), the cluster token in plaintext mode.
fn agent_credential(token: &str) -> &str {
    if cairn_raft::tls::current().is_some() {
        ""
    } else {
        token
    }
}
