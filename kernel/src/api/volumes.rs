//! Volume routes: every volume reservation in the cluster (`GET /api/v1/volumes`, each with
//! its service, pod, agent and status) and deleting an orphaned one
//! (`DELETE /api/v1/volumes/{id}`). Per agent: `GET /api/v1/agents/{id}/volumes`.

use super::{done_index, now_ms, query, with_index, Ctx, ReadParams};
use crate::error::ApiError;
use crate::service::VolumeReservation;
use crate::state::Command;
use axum::extract::{Path, Query};
use axum::response::{IntoResponse, Response};
use axum::Json;

pub(super) async fn list_volumes(
    ctx: Ctx,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let all: Vec<VolumeReservation> =
        ctx.read(|s| crate::service::driver::all_volumes(s).cloned().collect());
    Ok(with_index(index, all))
}

pub(super) async fn delete_volume(ctx: Ctx, Path(id): Path<String>) -> Result<Response, ApiError> {
    if id.is_empty() || id.len() > 256 {
        return Err(ApiError::bad_request(
            "id",
            "a volume id is 1-256 characters",
        ));
    }
    let index = done_index(
        ctx.propose(Command::DestroyVolume { id, at: now_ms() })
            .await?,
    )?;
    Ok(Json(serde_json::json!({ "index": index })).into_response())
}
