//! Agent routes: registration, heartbeats, the assignment long-poll and task reports.

use super::cluster::membership;
use super::{blocking_wait, now_ms, query, valid_id, with_index, Api, Ctx, PageParams, ReadParams};
use crate::error::{ApiError, JsonBody};
use crate::model::{Agent, AgentRegistration};
use crate::protocol::{Assignment, HeartbeatReply, TaskReport};
use crate::resources::validate_resources;
use crate::service::VolumeReservation;
use crate::state::{Command, Outcome};
use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::{Duration, Instant};

pub(super) async fn list_agents(
    ctx: Ctx,
    q: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p.read(), |s| s.indexes.agents).await?;
    let agents: Vec<Agent> = ctx.read(|s| {
        s.agents
            .values()
            .skip(p.offset())
            .take(p.limit())
            .cloned()
            .collect()
    });
    Ok(with_index(index, agents))
}

/// What the live tasks on each agent use: `{agent: {cpus, mem, disk, tasks}}` (the agent
/// list gives the totals), for the same page of agents as `GET /api/v1/agents` (`offset`,
/// `limit`), from the per-agent task index: the cost is the tasks of those agents only.
pub(super) async fn agents_usage(
    ctx: Ctx,
    q: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx
        .prepare_read(&p.read(), |s| s.indexes.tasks.max(s.indexes.agents))
        .await?;
    let usage = ctx.read(|s| {
        let mut m = std::collections::BTreeMap::new();
        for id in s.agents.keys().skip(p.offset()).take(p.limit()) {
            let mut u = AgentUsage::default();
            let live = s
                .tasks_by_agent
                .get(id)
                .into_iter()
                .flatten()
                .filter_map(|t| s.tasks.get(t))
                .filter(|t| !t.state.is_terminal());
            for t in live {
                u.cpus += t.resources.cpus;
                u.mem += t.resources.mem;
                u.disk += t.resources.disk;
                u.tasks += 1;
            }
            m.insert(id.as_str(), u);
        }
        serde_json::to_value(m).unwrap_or_default()
    });
    Ok(with_index(index, usage))
}

/// Resources held by an agent's live tasks.
#[derive(Debug, Default, serde::Serialize)]
struct AgentUsage {
    cpus: f64,
    mem: u64,
    disk: u64,
    tasks: usize,
}

pub(super) async fn get_agent(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.agents).await?;
    let (agent, volumes) = ctx
        .read(|s| Some((s.agents.get(&id).cloned()?, volumes_on(s, &id))))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no agent {id:?}; list them with GET /api/v1/agents"
            ))
        })?;
    let mut v = serde_json::to_value(agent)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "encode", e.to_string()))?;
    v["volumes"] = serde_json::json!(volumes);
    Ok(with_index(index, v))
}

/// Every volume reservation on `agent` (of services and detached ones), by id.
fn volumes_on(s: &crate::state::State, agent: &str) -> Vec<VolumeReservation> {
    crate::service::driver::all_volumes(s)
        .filter(|v| v.agent == agent)
        .cloned()
        .collect()
}

/// The volumes reserved on an agent with their status: the agent deletes the data of those
/// `destroying` and reports them (`volumes_destroyed`).
pub(super) async fn agent_volumes(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let volumes = ctx.read(|s| volumes_on(s, &id));
    Ok(with_index(index, volumes))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DestroyedVolumes {
    ids: Vec<String>,
}

/// An agent deleted volumes' data: their reservations go.
pub(super) async fn volumes_destroyed(
    ctx: Ctx,
    Path(agent): Path<String>,
    JsonBody(body): JsonBody<DestroyedVolumes>,
) -> Result<Response, ApiError> {
    if body.ids.len() > 10_000 || body.ids.iter().any(|i| i.is_empty() || i.len() > 256) {
        return Err(ApiError::bad_request(
            "ids",
            "at most 10000 volume ids of 1-256 characters",
        ));
    }
    ctx.propose(Command::VolumesDestroyed {
        agent,
        ids: body.ids,
        at: now_ms(),
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn register_agent(
    ctx: Ctx,
    caller: Option<axum::Extension<super::NodeCaller>>,
    JsonBody(reg): JsonBody<AgentRegistration>,
) -> Result<Response, ApiError> {
    if let Some(axum::Extension(super::NodeCaller(id))) = &caller {
        if id.role == "agent" && id.name != reg.id {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "the certificate of agent {} cannot register agent {}",
                    id.name, reg.id
                ),
            ));
        }
    }
    if !valid_id(&reg.id) {
        return Err(ApiError::bad_request(
            "id",
            "agent ids are 1-128 letters, digits, '-', '_', '.'",
        ));
    }
    if reg.addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::bad_request(
            "addr",
            format!("addr {:?} is not HOST:PORT", reg.addr),
        ));
    }
    if reg.hostname.is_empty() || reg.hostname.len() > 255 {
        return Err(ApiError::bad_request(
            "hostname",
            "hostname must be 1-255 characters",
        ));
    }
    if reg.attributes.len() > 64
        || reg
            .attributes
            .iter()
            .any(|(k, v)| k.len() > 64 || v.len() > 256)
    {
        return Err(ApiError::bad_request(
            "attributes",
            "at most 64 attributes, names <= 64 and values <= 256 bytes",
        ));
    }
    if reg.version.len() > 64 {
        return Err(ApiError::bad_request("version", "at most 64 bytes"));
    }
    validate_resources(&reg.resources).map_err(|e| ApiError::bad_request(&e.field, e.message))?;
    let id = reg.id.clone();
    let out = ctx
        .propose(Command::RegisterAgent { reg, at: now_ms() })
        .await?;
    if ctx.node.is_leader() {
        ctx.liveness.beat(&id, Instant::now());
    }
    match out {
        Outcome::Agent(a) => Ok((StatusCode::OK, Json(a)).into_response()),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected",
            format!("{other:?}"),
        )),
    }
}

pub(super) async fn heartbeat(
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !ctx.read(|s| s.agents.contains_key(&id)) {
        return Err(ApiError::not_found(format!(
            "unknown agent {id:?}: register first (POST /api/v1/agents)"
        )));
    }
    // Membership only: counting tasks here made every heartbeat O(tasks).
    let (members, leader) = membership(&ctx);
    let masters: Vec<String> = members.iter().map(|m| m.addr.clone()).collect();
    let (leader_id, leader_addr) = match leader {
        Some((id, addr)) => (Some(id), Some(addr)),
        None => (None, None),
    };
    match (leader_id, leader_addr) {
        (Some(l), _) if l == ctx.node.id => {
            ctx.liveness.beat(&id, Instant::now());
            let status_epoch = ctx.read(|s| s.agents.get(&id).map_or(0, |a| a.status_changed_at));
            Ok(Json(HeartbeatReply {
                leader_id: l,
                masters,
                status_epoch,
            })
            .into_response())
        }
        (Some(_), Some(addr)) if !headers.contains_key("x-cairn-forwarded") => {
            // Heartbeats are leader-local: hand it to the leader.
            let r = ctx
                .client
                .post(format!(
                    "{}://{addr}/api/v1/agents/{id}/heartbeat",
                    cairn_raft::tls::scheme()
                ))
                .bearer_auth(&ctx.token)
                .header("x-cairn-forwarded", "1")
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map_err(|e| {
                    ApiError::unavailable(
                        "leader_unreachable",
                        format!("forwarding to leader {addr}: {e}"),
                    )
                })?;
            let code = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = r.bytes().await.unwrap_or_default();
            Ok((code, [(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        _ => Err(ApiError::unavailable(
            "no_leader",
            "no leader is known; retry shortly",
        )),
    }
}

/// Long-poll of an agent's assignments (blocking query on the tasks table).
pub(super) async fn assignments(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    // Only registered agents get a waker: ids from a client must not grow the wakers map.
    if !ctx.read(|s| s.agents.contains_key(&id)) {
        return Err(ApiError::not_found(format!(
            "unknown agent {id:?}: register first (POST /api/v1/agents)"
        )));
    }
    // Waits on this agent's own assignment index: a change elsewhere does not wake it, and
    // the wake-up itself comes from the state machine for this agent only.
    let index = match p.index {
        Some(min) if p.stale.unwrap_or(false) => {
            let wait = blocking_wait(&p)?;
            let deadline = tokio::time::Instant::now() + wait;
            let mut rx = ctx.wakers.subscribe(&id);
            let current =
                |ctx: &Api| ctx.read(|s| s.assignment_index.get(&id).copied().unwrap_or(0));
            let mut index = current(&ctx);
            while index <= min {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    break;
                }
                index = current(&ctx);
            }
            index
        }
        _ => {
            let agent = id.clone();
            ctx.prepare_read(&p, move |s| {
                s.assignment_index.get(&agent).copied().unwrap_or(0)
            })
            .await?
        }
    };
    let list: Vec<Assignment> = ctx.read(|s| {
        s.tasks_by_agent
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|tid| s.tasks.get(tid))
            .filter(|t| !t.state.is_terminal() && t.state != crate::model::TaskState::Killing)
            .map(|t| Assignment { task: t.clone() })
            .collect()
    });
    Ok(with_index(index, list))
}

/// Agents push task state changes here, in idempotent batches, until acknowledged.
pub(super) async fn task_status(
    ctx: Ctx,
    Path(agent): Path<String>,
    JsonBody(reports): JsonBody<Vec<TaskReport>>,
) -> Result<Response, ApiError> {
    if reports.len() > 10_000 {
        return Err(ApiError::bad_request("", "at most 10000 reports per batch"));
    }
    let updates: Vec<crate::state::TaskUpdate> = reports
        .into_iter()
        .map(|r| crate::state::TaskUpdate {
            id: r.id,
            state: r.state,
            reason: r.reason,
            healthy: r.healthy,
        })
        .collect();
    let applied = updates.len();
    ctx.propose(Command::UpdateTaskStates {
        agent,
        reports: updates,
        at: now_ms(),
    })
    .await?;
    Ok(Json(serde_json::json!({ "applied": applied })).into_response())
}
