//! The stateful service spec users write, in TOML or JSON: one schema, unknown fields
//! refused, and every error naming the field path (`pod_types[0].volumes[1].path`) and the
//! fix. `ServiceSpec::validate` builds the replicated `StatefulService`.
//!
//! Task fields shared with workloads (runtime, resources, ports, env, health checks) are
//! checked by the workload validator (`crate::spec::WorkloadSpec::validate`), so both kinds
//! accept and refuse the same things; its field names are re-rooted under the task's path.

use super::model::{
    ConfigTemplate, PhaseDef, PhaseStrategy, PlanDef, PodTask, PodType, StatefulService, TaskGoal,
    VolumeSpec,
};
use crate::model::{PortAsk, RuntimeSpec, TaskResources, WorkloadKind};
use crate::scheduler::Constraint;
use crate::spec::{HealthCheckSpec, SpecError, WorkloadSpec};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A stateful service spec.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub pod_types: Vec<PodTypeSpec>,
    #[serde(default)]
    pub plans: Vec<PlanSpec>,
    /// Free-form options config templates see as `options` (a table / JSON object).
    #[serde(default)]
    pub options: Option<serde_json::Value>,
    /// Names that each point at one pod: `primary = "postgresql-0"` makes
    /// `primary.<service>.cairn.` resolve to that pod (a switchover is an update of this).
    #[serde(default)]
    pub endpoints: std::collections::BTreeMap<String, String>,
    /// Move an endpoint to a ready pod when its pod is down:
    /// `failover = { endpoint = "primary", after = "10s", tasks = ["server"] }`.
    pub failover: Option<FailoverSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSpec {
    pub endpoint: String,
    /// How long the endpoint's pod is down before it moves (default `"10s"`).
    pub after: Option<String>,
    /// The `running` tasks relaunched in the new pod, then in the others.
    pub tasks: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodTypeSpec {
    pub name: String,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub constraints: Vec<Vec<String>>,
    pub role: Option<String>,
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    pub tasks: Vec<TaskSpec>,
    /// Replace a pod whose agent is unreachable this long (`"10m"`; default: never).
    pub replace_after: Option<String>,
    /// `"serial"` (default), `"parallel"` or `{ canary = N }`.
    pub deploy: Option<PhaseStrategy>,
    /// How long a deploy step may take (default `"10m"`).
    pub deadline: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    #[serde(default = "running")]
    pub goal: TaskGoal,
    pub runtime: RuntimeSpec,
    #[serde(default)]
    pub resources: TaskResources,
    #[serde(default)]
    pub ports: Vec<PortAsk>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub health_checks: Vec<HealthCheckSpec>,
    pub readiness_check: Option<HealthCheckSpec>,
    #[serde(default)]
    pub templates: Vec<ConfigTemplate>,
    pub kill_grace: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    pub name: String,
    pub phases: Vec<PhaseSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    pub name: String,
    pub pod_type: String,
    #[serde(default = "serial")]
    pub strategy: PhaseStrategy,
    /// The pod type's tasks each step runs, in order.
    pub tasks: Vec<String>,
    pub deadline: Option<String>,
}

fn one() -> u32 {
    1
}
fn running() -> TaskGoal {
    TaskGoal::Running
}
fn serial() -> PhaseStrategy {
    PhaseStrategy::Serial
}

/// Most pod instances of one pod type.
pub const MAX_COUNT: u32 = 1_000;
/// Largest `options` object, as JSON.
pub const MAX_OPTIONS_BYTES: usize = 64 * 1024;
/// Names of the built-in plans (a declared plan may not take them).
pub const BUILT_IN_PLANS: [&str; 4] = ["deploy", "recovery", "decommission", "failover"];

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        field: field.into(),
        message: message.into(),
    })
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> SpecError {
    SpecError {
        field: e.path().to_string(),
        message: e.inner().to_string().trim().to_string(),
    }
}

/// Parses a TOML spec (unknown fields and wrong types are errors that name the key).
pub fn from_toml(text: &str) -> Result<ServiceSpec, SpecError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| SpecError {
        field: e.path().to_string(),
        message: e.inner().message().trim().to_string(),
    })
}

/// Parses a JSON spec (the API's body).
pub fn from_json(bytes: &[u8]) -> Result<ServiceSpec, SpecError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(path_error)
}

/// Names of services, pod types, tasks, volumes, plans: they become DNS labels, pod ids
/// (`<type>-<index>`) and volume ids, so lowercase letters, digits and '-' only.
fn check_name(field: &str, name: &str, max: usize) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        err(
            field,
            format!(
                "{name:?}: use 1-{max} lowercase letters, digits or '-', starting with a letter"
            ),
        )
    }
}

fn ms(field: &str, d: &Option<String>, default: u64) -> Result<u64, SpecError> {
    match d {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map(|d| d.as_millis() as u64)
            .or_else(|e| {
                err(
                    field,
                    format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"10m\""),
                )
            }),
    }
}

/// A path inside the sandbox: relative, with no `.`, `..` or empty components. An absolute
/// path or one with `..` would lead outside the sandbox.
pub fn check_sandbox_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.is_empty() || path.len() > 256 || path.contains('\0') {
        return err(field, "give a path of 1-256 characters inside the sandbox");
    }
    if path.starts_with('/') {
        return err(
            field,
            format!(
                "{path:?} is outside the sandbox: write it relative to the sandbox, e.g. \"data\""
            ),
        );
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return err(
            field,
            format!(
                "{path:?}: no '..', '.' or empty components; the path must stay inside the sandbox"
            ),
        );
    }
    Ok(())
}

fn strategy(field: &str, s: PhaseStrategy) -> Result<PhaseStrategy, SpecError> {
    match s {
        PhaseStrategy::Canary(0) => err(field, "a canary phase runs at least 1 step first"),
        s => Ok(s),
    }
}

/// Compiles a template, reporting the line of a syntax error.
fn check_template(field: &str, path: &str, source: &str) -> Result<(), SpecError> {
    if source.len() > 64 * 1024 {
        return err(field, "a template is at most 64 KiB");
    }
    let env = minijinja::Environment::new();
    if let Err(e) = env.template_from_str(source) {
        let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
        let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
        return err(
            field,
            format!("template of {path:?}{line}: {}{detail}", e.kind()),
        );
    }
    Ok(())
}

impl TaskSpec {
    fn validate(self, at: &str) -> Result<PodTask, SpecError> {
        check_name(&format!("{at}.name"), &self.name, 32)?;
        let mut checks = self.health_checks.clone();
        let n_health = checks.len();
        if n_health > 8 {
            return err(format!("{at}.health_checks"), "at most 8 health checks");
        }
        checks.extend(self.readiness_check.clone());
        // The workload validator checks the shared fields; its field names are re-rooted.
        let w = WorkloadSpec {
            id: self.name.clone(),
            kind: WorkloadKind::Service,
            runtime: self.runtime,
            resources: self.resources,
            instances: None,
            ports: self.ports,
            env: self.env,
            constraints: Vec::new(),
            role: None,
            strategy: Default::default(),
            restart: None,
            max_retries: 0,
            kill_grace: self.kill_grace,
            timeout: None,
            network: None,
            schedule: None,
            labels: BTreeMap::new(),
            health_checks: checks,
            upgrade: None,
        }
        .validate()
        .map_err(|e| {
            let readiness = format!("health_checks[{n_health}]");
            let field = match e.field.strip_prefix(&readiness) {
                Some(rest) => format!("{at}.readiness_check{rest}"),
                None => format!("{at}.{}", e.field),
            };
            SpecError {
                field,
                message: e.message,
            }
        })?;
        let mut health_checks = w.health_checks;
        let readiness_check = if self.readiness_check.is_some() {
            health_checks.pop()
        } else {
            None
        };
        if self.templates.len() > 64 {
            return err(format!("{at}.templates"), "at most 64 templates");
        }
        for (i, t) in self.templates.iter().enumerate() {
            let f = format!("{at}.templates[{i}]");
            check_sandbox_path(&format!("{f}.path"), &t.path)?;
            if self.templates[..i].iter().any(|u| u.path == t.path) {
                return err(
                    format!("{f}.path"),
                    format!("{:?} is rendered twice", t.path),
                );
            }
            check_template(&format!("{f}.template"), &t.path, &t.template)?;
        }
        Ok(PodTask {
            name: self.name,
            goal: self.goal,
            runtime: w.runtime,
            resources: w.resources,
            ports: w.ports,
            env: w.env,
            health_checks,
            readiness_check,
            templates: self.templates,
            kill_grace_ms: w.kill_grace_ms,
        })
    }
}

impl PodTypeSpec {
    fn validate(self, at: &str) -> Result<PodType, SpecError> {
        check_name(&format!("{at}.name"), &self.name, 32)?;
        if self.count > MAX_COUNT {
            return err(
                format!("{at}.count"),
                format!("at most {MAX_COUNT} pods of one type"),
            );
        }
        if self.constraints.len() > 32 {
            return err(format!("{at}.constraints"), "at most 32 constraints");
        }
        let mut constraints = Vec::new();
        for (i, c) in self.constraints.iter().enumerate() {
            constraints
                .push(Constraint::parse(c).or_else(|m| err(format!("{at}.constraints[{i}]"), m))?);
        }
        if let Some(role) = &self.role {
            if role.is_empty() || role.len() > 64 || role.contains(['(', ')', ':', ';']) {
                return err(
                    format!("{at}.role"),
                    "a role is 1-64 characters without ( ) : ;",
                );
            }
        }
        if self.volumes.len() > 16 {
            return err(format!("{at}.volumes"), "at most 16 volumes");
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let f = format!("{at}.volumes[{i}]");
            check_name(&format!("{f}.name"), &v.name, 32)?;
            if self.volumes[..i].iter().any(|u| u.name == v.name) {
                return err(
                    format!("{f}.name"),
                    format!("two volumes named {:?}", v.name),
                );
            }
            check_sandbox_path(&format!("{f}.path"), &v.path)?;
            let nested = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
            if let Some(u) = self.volumes[..i]
                .iter()
                .find(|u| nested(&v.path, &u.path) || nested(&u.path, &v.path))
            {
                return err(
                    format!("{f}.path"),
                    format!("{:?} overlaps volume {:?} at {:?}", v.path, u.name, u.path),
                );
            }
            if v.size_mb == 0 || v.size_mb > 1 << 30 {
                return err(
                    format!("{f}.size_mb"),
                    "size_mb is the volume's size in MiB: at least 1, at most 1 PiB",
                );
            }
        }
        if self.tasks.is_empty() || self.tasks.len() > 16 {
            return err(format!("{at}.tasks"), "a pod type has 1-16 tasks");
        }
        let mut tasks: Vec<PodTask> = Vec::new();
        for (i, t) in self.tasks.into_iter().enumerate() {
            let f = format!("{at}.tasks[{i}]");
            let t = t.validate(&f)?;
            if tasks.iter().any(|u| u.name == t.name) {
                return err(format!("{f}.name"), format!("two tasks named {:?}", t.name));
            }
            // Tasks of a pod share its agent: port names and fixed numbers are per pod.
            for (j, p) in t.ports.iter().enumerate() {
                let other = tasks.iter().flat_map(|u| u.ports.iter());
                for q in other {
                    if q.name == p.name || (p.number != 0 && q.number == p.number) {
                        return err(
                            format!("{f}.ports[{j}]"),
                            format!(
                                "port {:?} ({}) is taken by another task of the pod",
                                p.name, p.number
                            ),
                        );
                    }
                }
            }
            if let Some(v) = t
                .templates
                .iter()
                .position(|tpl| self.volumes.iter().any(|v| v.path == tpl.path))
            {
                return err(
                    format!("{f}.templates[{v}].path"),
                    "a template is a file; it cannot replace a volume's directory",
                );
            }
            tasks.push(t);
        }
        let replace_after_ms = match &self.replace_after {
            None => None,
            Some(_) => {
                let v = ms(&format!("{at}.replace_after"), &self.replace_after, 0)?;
                if v < 1_000 {
                    return err(format!("{at}.replace_after"), "at least \"1s\"");
                }
                Some(v)
            }
        };
        let deploy = strategy(
            &format!("{at}.deploy"),
            self.deploy.unwrap_or(PhaseStrategy::Serial),
        )?;
        Ok(PodType {
            name: self.name,
            count: self.count,
            constraints,
            role: self.role,
            volumes: self.volumes,
            tasks,
            replace_after_ms,
            deploy,
            deadline_ms: ms(&format!("{at}.deadline"), &self.deadline, 600_000)?,
        })
    }
}

impl ServiceSpec {
    /// Checks the spec and builds the stateful service.
    pub fn validate(self) -> Result<StatefulService, SpecError> {
        check_name("name", &self.name, 48)?;
        if self.pod_types.is_empty() || self.pod_types.len() > 32 {
            return err("pod_types", "a service has 1-32 pod types");
        }
        let mut pod_types: Vec<PodType> = Vec::new();
        for (i, p) in self.pod_types.into_iter().enumerate() {
            let f = format!("pod_types[{i}]");
            let p = p.validate(&f)?;
            if pod_types.iter().any(|q| q.name == p.name) {
                return err(
                    format!("{f}.name"),
                    format!("two pod types named {:?}", p.name),
                );
            }
            pod_types.push(p);
        }
        if self.plans.len() > 32 {
            return err("plans", "at most 32 plans");
        }
        let mut plans: Vec<PlanDef> = Vec::new();
        for (i, p) in self.plans.into_iter().enumerate() {
            let f = format!("plans[{i}]");
            check_name(&format!("{f}.name"), &p.name, 32)?;
            if BUILT_IN_PLANS.contains(&p.name.as_str()) {
                return err(
                    format!("{f}.name"),
                    format!("{:?} is a built-in plan; choose another name", p.name),
                );
            }
            if plans.iter().any(|q| q.name == p.name) {
                return err(format!("{f}.name"), format!("two plans named {:?}", p.name));
            }
            if p.phases.is_empty() || p.phases.len() > 32 {
                return err(format!("{f}.phases"), "a plan has 1-32 phases");
            }
            let mut phases: Vec<PhaseDef> = Vec::new();
            for (j, ph) in p.phases.into_iter().enumerate() {
                let g = format!("{f}.phases[{j}]");
                check_name(&format!("{g}.name"), &ph.name, 32)?;
                if phases.iter().any(|q| q.name == ph.name) {
                    return err(
                        format!("{g}.name"),
                        format!("two phases named {:?}", ph.name),
                    );
                }
                let Some(t) = pod_types.iter().find(|t| t.name == ph.pod_type) else {
                    let known: Vec<&str> = pod_types.iter().map(|t| t.name.as_str()).collect();
                    return err(
                        format!("{g}.pod_type"),
                        format!("no pod type {:?}; the service has {known:?}", ph.pod_type),
                    );
                };
                if ph.tasks.is_empty() {
                    return err(
                        format!("{g}.tasks"),
                        "name the pod type's tasks each step runs",
                    );
                }
                for (k, name) in ph.tasks.iter().enumerate() {
                    if t.task(name).is_none() {
                        return err(
                            format!("{g}.tasks[{k}]"),
                            format!("pod type {:?} has no task {name:?}", t.name),
                        );
                    }
                }
                phases.push(PhaseDef {
                    strategy: strategy(&format!("{g}.strategy"), ph.strategy)?,
                    deadline_ms: ms(&format!("{g}.deadline"), &ph.deadline, 600_000)?,
                    name: ph.name,
                    pod_type: ph.pod_type,
                    tasks: ph.tasks,
                });
            }
            plans.push(PlanDef {
                name: p.name,
                phases,
            });
        }
        let options = match self.options {
            None => "{}".to_string(),
            Some(v @ serde_json::Value::Object(_)) => v.to_string(),
            Some(_) => return err("options", "options is a table (a JSON object)"),
        };
        if options.len() > MAX_OPTIONS_BYTES {
            return err(
                "options",
                format!(
                    "options take at most {} KiB as JSON",
                    MAX_OPTIONS_BYTES >> 10
                ),
            );
        }
        if self.endpoints.len() > 16 {
            return err("endpoints", "a service declares at most 16 endpoints");
        }
        for (name, pod) in &self.endpoints {
            let f = format!("endpoints.{name}");
            check_name(&f, name, 63)?;
            let is_pod = |id: &str| {
                pod_types.iter().any(|t| {
                    id.strip_prefix(&format!("{}-", t.name))
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|n| n < t.count)
                })
            };
            if is_pod(name) {
                return err(
                    &f,
                    format!("{name:?} is a pod's name; name the endpoint otherwise"),
                );
            }
            if !is_pod(pod) {
                return err(
                    &f,
                    format!(
                        "no pod {pod:?}: pods are <pod type>-<index>, e.g. {}-0",
                        pod_types[0].name
                    ),
                );
            }
        }
        let failover = match self.failover {
            None => None,
            Some(f) => Some(failover(f, &self.endpoints, &pod_types)?),
        };
        Ok(StatefulService {
            name: self.name,
            pod_types,
            plans,
            options,
            package: None,
            endpoints: self.endpoints,
            failover,
        })
    }
}

/// Checks `[failover]`: a declared endpoint, at least a second, `running` tasks of the
/// endpoint's pod type.
fn failover(
    f: FailoverSpec,
    endpoints: &BTreeMap<String, String>,
    pod_types: &[PodType],
) -> Result<super::model::Failover, SpecError> {
    let Some(pod) = endpoints.get(&f.endpoint) else {
        return err(
            "failover.endpoint",
            format!(
                "no endpoint {:?}; declare it in endpoints (e.g. endpoints = {{ {} = \"{}-0\" }})",
                f.endpoint, f.endpoint, pod_types[0].name
            ),
        );
    };
    // `validate` checked the endpoint names a pod: `<pod type>-<index>`.
    let ptype = pod_types
        .iter()
        .find(|t| {
            pod.strip_prefix(&format!("{}-", t.name))
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .ok_or_else(|| SpecError {
            field: "failover.endpoint".into(),
            message: format!("endpoint {:?} names no pod", f.endpoint),
        })?;
    let after_ms = ms("failover.after", &f.after, 10_000)?;
    if after_ms < 1_000 {
        return err("failover.after", "at least \"1s\"");
    }
    if f.tasks.is_empty() {
        return err(
            "failover.tasks",
            "name the tasks to relaunch, e.g. [\"server\"]",
        );
    }
    for (i, t) in f.tasks.iter().enumerate() {
        match ptype.task(t) {
            Some(task) if task.goal == TaskGoal::Running => {}
            Some(_) => {
                return err(
                    format!("failover.tasks[{i}]"),
                    format!("task {t:?} is not a `running` task"),
                )
            }
            None => {
                return err(
                    format!("failover.tasks[{i}]"),
                    format!("pod type {:?} has no task {t:?}", ptype.name),
                )
            }
        }
    }
    Ok(super::model::Failover {
        endpoint: f.endpoint,
        after_ms,
        tasks: f.tasks,
    })
}

#[cfg(test)]
mod tests;
