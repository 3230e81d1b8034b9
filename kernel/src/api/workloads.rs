//! Workload and deployment routes: declare, read, scale, stop, start, restart, roll-outs.

use super::{done_index, now_ms, query, with_index, Ctx, PageParams, ReadParams};
use crate::error::{ApiError, JsonBody};
use crate::model::{Task, Workload};
use crate::state::Command;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

pub(super) async fn list_workloads(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.workloads).await?;
    let all: Vec<Workload> = ctx.read(|s| s.workloads.values().cloned().collect());
    Ok(with_index(index, all))
}

/// Declares or changes a workload from its spec (`spec::WorkloadSpec`, the same schema as
/// `cairn run app.toml`). An unchanged spec keeps its version.
pub(super) async fn put_workload(
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

/// A workload, its tasks and their counts by state.
pub(super) async fn get_workload(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx
        .prepare_read(&p.read(), |s| s.indexes.workloads.max(s.indexes.tasks))
        .await?;
    let v = ctx
        .read(|s| {
            s.workloads.get(&id).map(|w| {
                let mut tasks: Vec<&Task> = s.tasks.values().filter(|t| t.workload == id).collect();
                let counts = crate::model::count_states(tasks.iter().copied());
                if p.limit.is_some() || p.offset.is_some() {
                    tasks.sort_by_key(|t| (t.state.is_terminal(), std::cmp::Reverse(t.updated_at)));
                    tasks = tasks.into_iter().skip(p.offset()).take(p.limit()).collect();
                }
                serde_json::json!({ "workload": w, "tasks": tasks, "task_counts": counts })
            })
        })
        .ok_or_else(|| ApiError::not_found(format!("no workload {id:?}")).field("id"))?;
    Ok(with_index(index, v))
}

pub(super) async fn delete_workload(
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let index = done_index(ctx.propose(Command::RemoveWorkload { id }).await?)?;
    Ok(with_index(index, serde_json::json!({ "index": index })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScaleBody {
    instances: u32,
}

pub(super) async fn scale_workload(
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

pub(super) async fn stop_workload(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_stopped(ctx, id, true).await
}

pub(super) async fn start_workload(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    set_stopped(ctx, id, false).await
}

/// Replaces every task through a rolling deployment of the same spec.
pub(super) async fn restart_workload(
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
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
pub(super) struct DeploymentParams {
    workload: Option<String>,
    index: Option<u64>,
    wait: Option<String>,
    stale: Option<bool>,
}

/// Roll-outs, newest first (optionally of one workload): the workload's history.
pub(super) async fn list_deployments(
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

pub(super) async fn get_deployment(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
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
