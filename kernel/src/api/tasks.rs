//! Task routes: list, get (with live usage from the agent), kill.

use super::{now_ms, query, with_index, Ctx, ReadParams};
use crate::error::ApiError;
use crate::model::Task;
use crate::state::Command;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::Duration;

pub(super) async fn list_tasks(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.tasks).await?;
    let all: Vec<Task> = ctx.read(|s| s.tasks.values().cloned().collect());
    Ok(with_index(index, all))
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
