//! Stateful service routes (`/api/v1/services`): create, list, get, update, remove, history;
//! plans (read, start, interrupt, continue, force-complete and restart a step); pods (list
//! with agent, volumes and task states; restart in place, replace).

use super::{done_index, now_ms, query, with_index, Ctx, ReadParams};
use crate::error::ApiError;
use crate::service::driver::task_id;
use crate::service::plan::PlanOp;
use crate::service::{ServiceOp, ServiceState};
use crate::state::{Command, State};
use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A spec body: TOML when the content type says so (`application/toml`), else JSON.
fn parse_spec(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<crate::service::StatefulService, ApiError> {
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("toml"));
    let spec = if toml {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("", "the TOML body is not UTF-8"))?;
        crate::service::spec::from_toml(text)
    } else {
        crate::service::spec::from_json(body)
    };
    spec.and_then(|s| s.validate())
        .map_err(|e| ApiError::bad_request(&e.field, e.message))
}

pub(super) fn check_name(field: &str, v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            field,
            format!("{field} {v:?}: 1-128 letters, digits, '-' or '_'"),
        ))
    }
}

fn no_service(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "no service {name:?}; list them with GET /api/v1/services"
    ))
    .field("name")
}

pub(super) fn with_service<T>(
    ctx: &Ctx,
    name: &str,
    f: impl FnOnce(&State, &ServiceState) -> T,
) -> Result<T, ApiError> {
    ctx.read(|s| s.services.get(name).map(|svc| f(s, svc)))
        .ok_or_else(|| no_service(name))
}

/// One line per service.
fn summary(svc: &ServiceState) -> serde_json::Value {
    serde_json::json!({
        "name": svc.spec.name,
        "version": svc.version,
        "created_at": svc.created_at,
        "updated_at": svc.updated_at,
        "pods": svc.pods.len(),
        "package": svc.spec.package.as_ref().map(|p| format!("{}@{}", p.name, p.version)),
        "plans": svc.plans.iter().map(|(n, p)| (n.clone(), p.status())).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

pub(super) async fn list_services(ctx: Ctx, q: Q<ReadParams>) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let all: Vec<serde_json::Value> = ctx.read(|s| s.services.values().map(summary).collect());
    Ok(with_index(index, all))
}

pub(super) async fn create_service(
    ctx: Ctx,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let service = parse_spec(&headers, &body)?;
    create(&ctx, service).await
}

/// Creates a validated service (a spec posted here, or a package rendered by
/// `api::packages`): one `CreateService` command.
pub(super) async fn create(
    ctx: &Ctx,
    service: crate::service::StatefulService,
) -> Result<Response, ApiError> {
    let name = service.name.clone();
    let index = done_index(
        ctx.propose(Command::CreateService {
            service,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok((
        StatusCode::CREATED,
        with_index(index, serde_json::json!({ "name": name, "version": index })),
    )
        .into_response())
}

/// The service's spec, state, pods, volumes and plans.
pub(super) async fn get_service(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let v = with_service(&ctx, &name, |_, svc| {
        let mut v = serde_json::to_value(svc).unwrap_or_default();
        v["history"] = serde_json::json!(svc.history.len());
        v
    })?;
    Ok(with_index(index, v))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateParams {
    allow_decommission: Option<bool>,
}

pub(super) async fn update_service(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<UpdateParams>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    let service = parse_spec(&headers, &body)?;
    if service.name != name {
        return Err(ApiError::bad_request(
            "name",
            format!(
                "the spec names service {:?} but the path {name:?}",
                service.name
            ),
        ));
    }
    update(&ctx, service, p.allow_decommission.unwrap_or(false)).await
}

/// Changes a service's spec (a spec put here, or a package rendered anew): one
/// `UpdateService` command; the deploy plan rolls it out.
pub(super) async fn update(
    ctx: &Ctx,
    service: crate::service::StatefulService,
    allow_decommission: bool,
) -> Result<Response, ApiError> {
    let name = service.name.clone();
    let index = done_index(
        ctx.propose(Command::UpdateService {
            service,
            allow_decommission,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok(with_index(
        index,
        serde_json::json!({ "name": name, "version": index }),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackParams {
    /// The kept version to return to (default: the one before the current).
    version: Option<u64>,
    allow_decommission: Option<bool>,
}

/// Returns to an earlier kept spec through the same careful `deploy` as any update (one pod
/// at a time, readiness between); the rollback is itself a new version in the history.
pub(super) async fn rollback_service(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<RollbackParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    ctx.prepare_read(&ReadParams::default(), |s| s.indexes.services)
        .await?;
    let target = with_service(&ctx, &name, |_, svc| {
        let kept: Vec<u64> = svc.history.iter().map(|h| h.version).collect();
        let found = match p.version {
            Some(v) => svc.history.iter().find(|h| h.version == v),
            None => svc.history.iter().rev().nth(1),
        };
        found
            .map(|h| (h.version, h.spec.clone()))
            .ok_or_else(|| match p.version {
                Some(v) => ApiError::bad_request(
                    "version",
                    format!("no kept version {v}; the service keeps {kept:?}"),
                ),
                None => ApiError::bad_request(
                    "version",
                    "the service has no earlier version to roll back to",
                ),
            })
    })??;
    let (from, service) = target;
    let index = done_index(
        ctx.propose(Command::UpdateService {
            service,
            allow_decommission: p.allow_decommission.unwrap_or(false),
            at: now_ms(),
        })
        .await?,
    )?;
    Ok(with_index(
        index,
        serde_json::json!({ "name": name, "version": index, "rolled_back_to": from }),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoveParams {
    keep_volumes: Option<bool>,
}

pub(super) async fn remove_service(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<RemoveParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    remove(&ctx, name, p.keep_volumes.unwrap_or(false)).await
}

/// Removes a service (here, or a package's by `api::packages`): one `RemoveService`.
pub(super) async fn remove(
    ctx: &Ctx,
    name: String,
    keep_volumes: bool,
) -> Result<Response, ApiError> {
    let index = done_index(
        ctx.propose(Command::RemoveService {
            name,
            keep_volumes,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok(with_index(index, serde_json::json!({ "index": index })))
}

/// Every kept version of the spec, oldest first.
pub(super) async fn service_history(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let v = with_service(&ctx, &name, |_, svc| {
        serde_json::to_value(&svc.history).unwrap_or_default()
    })?;
    Ok(with_index(index, v))
}

fn plan_json(p: &crate::service::plan::Plan) -> serde_json::Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    v["status"] = serde_json::to_value(p.status()).unwrap_or_default();
    v
}

pub(super) async fn list_plans(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let v = with_service(&ctx, &name, |_, svc| {
        svc.plans.values().map(plan_json).collect::<Vec<_>>()
    })?;
    Ok(with_index(index, v))
}

pub(super) async fn get_plan(
    ctx: Ctx,
    Path((name, plan)): Path<(String, String)>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    check_name("plan", &plan)?;
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let v = with_service(&ctx, &name, |_, svc| svc.plans.get(&plan).map(plan_json))?.ok_or_else(
        || ApiError::not_found(format!("service {name:?} has no plan {plan:?}")).field("plan"),
    )?;
    Ok(with_index(index, v))
}

async fn service_op(ctx: Ctx, name: String, op: ServiceOp) -> Result<Response, ApiError> {
    let index = done_index(
        ctx.propose(Command::ServiceOp {
            service: name,
            op,
            at: now_ms(),
        })
        .await?,
    )?;
    Ok(with_index(index, serde_json::json!({ "index": index })))
}

/// `?endpoint=&to=`: which endpoint moves to which pod (`endpoint` defaults to the one
/// under `[failover]`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SwitchoverParams {
    endpoint: Option<String>,
    to: Option<String>,
}

/// A switchover: the endpoint under `[failover]` moves to pod `to` on purpose, through the
/// same `failover` plan as an automatic failover (the pod takes the role, the others follow).
pub(super) async fn switchover(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<SwitchoverParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    let to = p.to.ok_or_else(|| {
        ApiError::bad_request("to", "name the pod to switch to: ?to=<pod type>-<index>")
    })?;
    check_name("to", &to)?;
    let endpoint = match p.endpoint {
        Some(e) => {
            check_name("endpoint", &e)?;
            e
        }
        None => with_service(&ctx, &name, |_, svc| {
            svc.spec
                .failover
                .as_ref()
                .map(|f| f.endpoint.clone())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "endpoint",
                        format!("service {name:?} declares no [failover]; nothing to switch over"),
                    )
                })
        })??,
    };
    service_op(
        ctx,
        name,
        ServiceOp::Failover {
            endpoint,
            to,
            message: "switchover asked for by an operator".into(),
        },
    )
    .await
}

/// Starts a plan; every query parameter is a parameter of the run (`?from=ID`), seen by the
/// tasks it launches as `CAIRN_PARAM_<KEY>`: at most 8, keys `[a-z0-9_]` up to 32, values
/// up to 256 printable characters.
pub(super) async fn start_plan(
    ctx: Ctx,
    Path((name, plan)): Path<(String, String)>,
    q: Q<std::collections::BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    check_name("plan", &plan)?;
    let params = query(q)?;
    if params.len() > 8 {
        return Err(ApiError::bad_request(
            "params",
            format!("{} parameters; a plan run takes at most 8", params.len()),
        ));
    }
    for (k, v) in &params {
        let key_ok = !k.is_empty()
            && k.len() <= 32
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !key_ok {
            return Err(ApiError::bad_request(
                k,
                "a parameter name is 1-32 of a-z, 0-9 and _",
            ));
        }
        if v.len() > 256 || v.chars().any(|c| c.is_control()) {
            return Err(ApiError::bad_request(
                k,
                "a parameter value is at most 256 printable characters",
            ));
        }
    }
    service_op(ctx, name, ServiceOp::StartPlan { plan, params }).await
}

async fn plan_op(ctx: Ctx, name: String, plan: String, op: PlanOp) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    check_name("plan", &plan)?;
    service_op(ctx, name, ServiceOp::Plan { plan, op }).await
}

pub(super) async fn interrupt_plan(
    ctx: Ctx,
    Path((name, plan)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    plan_op(ctx, name, plan, PlanOp::Interrupt).await
}

pub(super) async fn continue_plan(
    ctx: Ctx,
    Path((name, plan)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    plan_op(ctx, name, plan, PlanOp::Continue).await
}

/// `?phase=&step=`: which step.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StepParams {
    phase: Option<String>,
    step: Option<String>,
}

fn step_of(q: Q<StepParams>) -> Result<(String, String), ApiError> {
    let p = query(q)?;
    let need = |f: &str, v: Option<String>| {
        let v = v.ok_or_else(|| {
            ApiError::bad_request(f, format!("{f} is required: ?phase=PHASE&step=STEP"))
        })?;
        check_name(f, &v)?;
        Ok::<_, ApiError>(v)
    };
    Ok((need("phase", p.phase)?, need("step", p.step)?))
}

pub(super) async fn force_complete_step(
    ctx: Ctx,
    Path((name, plan)): Path<(String, String)>,
    q: Q<StepParams>,
) -> Result<Response, ApiError> {
    let (phase, step) = step_of(q)?;
    plan_op(ctx, name, plan, PlanOp::ForceComplete { phase, step }).await
}

pub(super) async fn restart_step(
    ctx: Ctx,
    Path((name, plan)): Path<(String, String)>,
    q: Q<StepParams>,
) -> Result<Response, ApiError> {
    let (phase, step) = step_of(q)?;
    plan_op(ctx, name, plan, PlanOp::Restart { phase, step }).await
}

/// Pods with their agent (and its status), volumes and the state of each launched task.
pub(super) async fn list_pods(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<ReadParams>,
) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    let p = query(q)?;
    let index = ctx
        .prepare_read(&p, |s| s.indexes.services.max(s.indexes.tasks))
        .await?;
    let v = with_service(&ctx, &name, |s, svc| {
        svc.pods
            .values()
            .map(|pod| {
                let agent_status = pod
                    .agent
                    .as_ref()
                    .and_then(|a| s.agents.get(a))
                    .map(|a| a.status);
                let tasks: Vec<serde_json::Value> = pod
                    .tasks
                    .iter()
                    .map(|(tname, target)| {
                        let id = task_id(&svc.spec.name, &pod.id, tname, target.generation);
                        let t = s.tasks.get(&id);
                        serde_json::json!({
                            "name": tname,
                            "id": id,
                            "goal": target.goal,
                            "version": target.version,
                            "generation": target.generation,
                            "launched_at": target.launched_at,
                            "state": t.map(|t| t.state),
                            "healthy": t.and_then(|t| t.healthy),
                            "ready": t.is_some_and(|t| match target.goal {
                                crate::service::model::TaskGoal::Running => t.is_ready(),
                                // A `finish`/`once` task is done when it has finished.
                                _ => t.state == crate::model::TaskState::Finished,
                            }),
                            "reason": t.and_then(|t| t.reason.clone()),
                            "ports": t.map(|t| t.ports.clone()).unwrap_or_default(),
                        })
                    })
                    .collect();
                let volumes: Vec<_> = pod
                    .volumes
                    .iter()
                    .filter_map(|v| svc.volumes.get(v))
                    .collect();
                serde_json::json!({
                    "id": pod.id,
                    "pod_type": pod.pod_type,
                    "index": pod.index,
                    "incarnation": pod.incarnation,
                    "agent": pod.agent,
                    "agent_status": agent_status,
                    // The address its tasks listen on (their ports are in `tasks`).
                    "host": pod.agent.as_deref().and_then(|a| crate::service::render::agent_host(s, a)),
                    "endpoints": svc.spec.endpoints.iter().filter(|(_, p)| **p == pod.id).map(|(e, _)| e.clone()).collect::<Vec<_>>(),
                    "stopping": pod.stopping,
                    "created_at": pod.created_at,
                    "placed_at": pod.placed_at,
                    "volumes": volumes,
                    "tasks": tasks,
                })
            })
            .collect::<Vec<_>>()
    })?;
    Ok(with_index(index, v))
}

async fn recover(ctx: Ctx, name: String, pod: String, replace: bool) -> Result<Response, ApiError> {
    check_name("name", &name)?;
    check_name("pod", &pod)?;
    let message = if replace {
        format!("{pod} replaced by an operator: a new agent, fresh volumes")
    } else {
        format!("{pod} restarted by an operator")
    };
    let op = ServiceOp::Recover {
        pod,
        tasks: Vec::new(),
        replace,
        message,
    };
    service_op(ctx, name, op).await
}

pub(super) async fn restart_pod(
    ctx: Ctx,
    Path((name, pod)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    recover(ctx, name, pod, false).await
}

pub(super) async fn replace_pod(
    ctx: Ctx,
    Path((name, pod)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    recover(ctx, name, pod, true).await
}
