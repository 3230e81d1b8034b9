//! Cluster variable routes (`/api/v1/kv`): get, put with compare-and-set, delete.

use super::{query, with_index, Ctx, ReadParams};
use crate::error::{ApiError, JsonBody};
use crate::model::KvEntry;
use crate::state::{Command, Outcome};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

pub(super) async fn list_kv(
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

pub(super) async fn get_kv(
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
pub(super) struct PutKv {
    value: String,
    /// Compare-and-set: the modify index the key must have (0: must not exist).
    cas: Option<u64>,
}

pub(super) async fn put_kv(
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

pub(super) async fn delete_kv(ctx: Ctx, Path(key): Path<String>) -> Result<Response, ApiError> {
    check_key(&key)?;
    ctx.propose(Command::KvDelete { key }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
