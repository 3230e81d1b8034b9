//! The agent's own HTTP API: agent info, tasks (launch, list, show, kill) and sandbox files
//! (list, read by offset/length: opened in the kernel beneath the sandbox, regular files
//! only, so a task's symlinks and FIFOs neither lead out nor block a worker), all behind
//! the cluster token.

use crate::agent::AgentInfo;
use crate::images::{Image, ImageError};
use crate::sandbox::{self, SandboxError};
use crate::task::{reason, TaskSpec, TaskStatus};
use crate::tasks::{LaunchError, TaskManager};
use axum::extract::{DefaultBodyLimit, Path, Query, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cairn_kernel::error::{ApiError, JsonBody};
use futures::StreamExt;
use serde::Deserialize;
use std::io::Write;
use std::sync::{Arc, Mutex};

struct Ctx {
    info: Arc<Mutex<AgentInfo>>,
    tasks: Arc<TaskManager>,
    token: String,
}

type C = Extension<Arc<Ctx>>;

pub fn router(info: Arc<Mutex<AgentInfo>>, tasks: Arc<TaskManager>, token: String) -> Router {
    let ctx = Arc::new(Ctx { info, tasks, token });
    Router::new()
        .route("/api/v1/agent", get(agent_info))
        .route("/api/v1/tasks", get(list).post(launch))
        .route("/api/v1/tasks/{id}", get(show))
        .route("/api/v1/tasks/{id}/kill", post(kill))
        .route("/api/v1/tasks/{id}/files", get(files))
        .route("/api/v1/tasks/{id}/browse", get(browse))
        .route(
            "/api/v1/images",
            get(images_list)
                .post(images_import)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/images/{*name}", get(images_show).delete(images_rm))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move {
            ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
        })
        .layer(DefaultBodyLimit::max(256 * 1024))
        .layer(middleware::from_fn(auth))
        .route("/healthz", get(|| async { "ok" }))
        .layer(Extension(ctx))
}

/// Prometheus text exposition (see `metrics`).
async fn metrics(ctx: C) -> Response {
    let c = ctx.clone();
    let text = tokio::task::spawn_blocking(move || c.tasks.metrics.render(&c.tasks, &c.info))
        .await
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn auth(ctx: C, req: Request, next: Next) -> Response {
    // Under TLS the listener lets through only masters' and admins' certificates (see
    // `Agent::start`); they need no token. Plaintext (`--insecure`) needs the token.
    if cairn_raft::tls::peer_identity(&req).is_some() {
        return next.run(req).await;
    }
    match cairn_kernel::error::check_bearer(req.headers(), &ctx.token) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn agent_info(ctx: C) -> Json<AgentInfo> {
    Json(ctx.info.lock().expect("info").clone())
}

async fn list(ctx: C) -> Json<Vec<TaskStatus>> {
    Json(ctx.tasks.list())
}

async fn launch(ctx: C, JsonBody(spec): JsonBody<TaskSpec>) -> Result<Response, ApiError> {
    let tasks = ctx.tasks.clone();
    match tokio::task::spawn_blocking(move || tasks.launch(spec)).await {
        Ok(Ok(status)) => Ok((StatusCode::CREATED, Json(status)).into_response()),
        Ok(Err(LaunchError::Invalid { field, message })) => {
            Err(ApiError::bad_request(&field, message))
        }
        Ok(Err(e @ LaunchError::Exists(_))) => {
            Err(ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()).field("id"))
        }
        Ok(Err(e @ LaunchError::Unsupported(_))) => {
            Err(ApiError::bad_request("runtime", e.to_string()))
        }
        Ok(Err(e @ LaunchError::Start(_))) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "start_failed",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

async fn show(ctx: C, Path(id): Path<String>) -> Result<Json<TaskStatus>, ApiError> {
    ctx.tasks.get(&id).map(Json).ok_or_else(|| no_task(&id))
}

async fn kill(ctx: C, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    if ctx.tasks.kill(&id, reason::KILLED) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(no_task(&id))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    path: Option<String>,
    offset: Option<u64>,
    length: Option<u64>,
}

fn no_task(id: &str) -> ApiError {
    ApiError::not_found(format!("no task {id:?} on this agent"))
}

fn sandbox_err(e: SandboxError) -> ApiError {
    match e {
        SandboxError::Outside(_) => {
            ApiError::new(StatusCode::FORBIDDEN, "outside_sandbox", e.to_string()).field("path")
        }
        SandboxError::NotFound(_) => ApiError::not_found(e.to_string()).field("path"),
        SandboxError::NotRegular(_) => ApiError::bad_request(
            "path",
            format!("{e}: only regular files can be read; list directories with /browse"),
        ),
        SandboxError::Io(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string())
        }
    }
}

fn query(
    q: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<FileQuery, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()).field("query")
    })
}

/// Reads a sandbox file: `?path=stdout&offset=0&length=65536`; the size is in `X-File-Size`.
async fn files(
    ctx: C,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let sb = ctx.tasks.sandbox(&id).ok_or_else(|| no_task(&id))?;
    let path = q.path.unwrap_or_else(|| "stdout".into());
    let (bytes, size) = sandbox::read_range(
        &sb,
        &path,
        q.offset.unwrap_or(0),
        q.length.unwrap_or(1 << 20),
    )
    .map_err(sandbox_err)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-file-size"),
                size.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn browse(
    ctx: C,
    Path(id): Path<String>,
    q: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let sb = ctx.tasks.sandbox(&id).ok_or_else(|| no_task(&id))?;
    let entries = sandbox::list(&sb, q.path.as_deref().unwrap_or(".")).map_err(sandbox_err)?;
    Ok(Json(entries).into_response())
}

/// Largest image archive an agent accepts.
pub const MAX_IMAGE_BYTES: u64 = 4 << 30;

fn image_err(e: ImageError) -> ApiError {
    match e {
        ImageError::Layout(_) | ImageError::Digest(_) => {
            ApiError::bad_request("body", format!("{e}"))
        }
        ImageError::NotFound(_) => ApiError::not_found(e.to_string()).field("name"),
        ImageError::InUse(..) => {
            ApiError::new(StatusCode::CONFLICT, "image_in_use", e.to_string()).field("name")
        }
        ImageError::Io(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()),
    }
}

async fn images_list(ctx: C) -> Json<Vec<Image>> {
    Json(ctx.tasks.images().list())
}

async fn images_show(ctx: C, Path(name): Path<String>) -> Result<Json<Image>, ApiError> {
    ctx.tasks
        .images()
        .get(&name)
        .map(Json)
        .ok_or_else(|| image_err(ImageError::NotFound(name)))
}

async fn images_rm(ctx: C, Path(name): Path<String>) -> Result<Json<Image>, ApiError> {
    let tasks = ctx.tasks.clone();
    tokio::task::spawn_blocking(move || {
        tasks
            .images()
            .remove(&name, |img| tasks.image_user(img))
            .map(Json)
            .map_err(image_err)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    name: Option<String>,
}

/// `POST /api/v1/images?name=NAME` with an OCI image-layout tar as the body. The body is
/// spooled to a file (never held in memory), then imported.
async fn images_import(
    ctx: C,
    q: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let name = q
        .map(|Query(q)| q.name)
        .map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let spool = tempfile::NamedTempFile::new_in(ctx.tasks.images().tmp_dir())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    let mut file = spool
        .reopen()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("body", e.to_string()))?;
        total += chunk.len() as u64;
        if total > MAX_IMAGE_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("image archives are limited to {MAX_IMAGE_BYTES} bytes"),
            )
            .field("body"));
        }
        file.write_all(&chunk)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    }
    let tasks = ctx.tasks.clone();
    let imported = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(spool.path())?;
        tasks
            .images()
            .import(std::io::BufReader::new(f), name.as_deref())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(image_err)?;
    Ok((StatusCode::CREATED, Json(imported)).into_response())
}
