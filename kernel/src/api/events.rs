//! The event stream (`/api/v1/events`): server-sent events of state changes.

use super::{query, Ctx};
use crate::error::ApiError;
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventParams {
    /// Comma-separated topics (task, workload, agent, deployment, service, kv); all when absent.
    topic: Option<String>,
    /// Start after this Raft index (replays what the masters still keep); default: now.
    index: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RecentParams {
    /// Comma-separated topics; all when absent.
    topic: Option<String>,
    /// How many of the newest events (default 50, at most 1,000).
    limit: Option<usize>,
    /// Only events about this id (a task, workload, agent, deployment, service or key).
    id: Option<String>,
}

fn parse_topics(topic: Option<String>) -> Result<Option<Vec<String>>, ApiError> {
    let topics: Option<Vec<String>> =
        topic.map(|t| t.split(',').map(|s| s.trim().to_string()).collect());
    if let Some(ts) = &topics {
        if let Some(bad) = ts.iter().find(|t| {
            !matches!(
                t.as_str(),
                "task" | "workload" | "agent" | "kv" | "deployment" | "service"
            )
        }) {
            return Err(ApiError::bad_request(
                "topic",
                format!(
                    "unknown topic {bad:?}: use task, workload, agent, deployment, service or kv"
                ),
            ));
        }
    }
    Ok(topics)
}

/// The newest events as a JSON list, newest first (what a page shows before it follows the
/// stream).
pub(super) async fn recent_events(
    ctx: Ctx,
    q: Result<Query<RecentParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let topics = parse_topics(p.topic)?;
    let limit = p.limit.unwrap_or(50);
    if limit > 1000 {
        return Err(ApiError::bad_request("limit", "limit is at most 1000"));
    }
    let events: Vec<crate::state::Event> = ctx.read(|s| {
        s.events
            .iter()
            .rev()
            .filter(|e| topics.as_ref().is_none_or(|t| t.contains(&e.topic)))
            .filter(|e| p.id.as_ref().is_none_or(|id| &e.id == id))
            .take(limit)
            .cloned()
            .collect()
    });
    Ok(axum::Json(events).into_response())
}

/// Server-sent events of state changes, filterable by topic. Each event's SSE id is its Raft
/// index, so a client can resume with `?index=` after a reconnect.
pub(super) async fn events(
    ctx: Ctx,
    q: Result<Query<EventParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use futures::StreamExt;
    let p = query(q)?;
    let topics = parse_topics(p.topic)?;
    let start = match p.index {
        Some(i) => i,
        None => ctx.read(|s| s.applied),
    };
    let rx = ctx.node.applied.clone();
    let api = ctx.0.clone();
    let stream = futures::stream::unfold((start, rx), move |(last, mut rx)| {
        let api = api.clone();
        let topics = topics.clone();
        async move {
            loop {
                let batch: Vec<crate::state::Event> = api.read(|s| {
                    s.events
                        .iter()
                        .filter(|e| e.index > last)
                        .filter(|e| topics.as_ref().is_none_or(|t| t.contains(&e.topic)))
                        .cloned()
                        .collect()
                });
                if let Some(newest) = batch.last().map(|e| e.index) {
                    return Some((batch, (newest, rx)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        }
    })
    .flat_map(|batch| {
        futures::stream::iter(batch.into_iter().map(|e| {
            Ok::<_, std::convert::Infallible>(
                SseEvent::default()
                    .id(e.index.to_string())
                    .event(e.topic.clone())
                    .json_data(&e)
                    .unwrap_or_default(),
            )
        }))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
