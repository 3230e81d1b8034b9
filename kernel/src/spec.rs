//! The workload spec as users write it, in TOML (`cairn run app.toml`) or JSON (the API): one
//! schema, unknown fields refused, and every error naming the field and the fix.

use crate::model::{
    PortAsk, RestartPolicy, RuntimeSpec, Schedule, TaskResources, Workload, WorkloadKind,
};
use crate::scheduler::{Constraint, Strategy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A workload spec. Durations are strings (`"500ms"`, `"10s"`, `"1m"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub id: String,
    #[serde(default = "service")]
    pub kind: WorkloadKind,
    pub runtime: RuntimeSpec,
    #[serde(default)]
    pub resources: TaskResources,
    pub instances: Option<u32>,
    #[serde(default)]
    pub ports: Vec<PortAsk>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub constraints: Vec<Vec<String>>,
    pub role: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
    pub restart: Option<RestartSpec>,
    #[serde(default)]
    pub max_retries: u32,
    pub kill_grace: Option<String>,
    pub timeout: Option<String>,
    pub network: Option<String>,
    pub schedule: Option<ScheduleSpec>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub health_checks: Vec<HealthCheckSpec>,
    pub upgrade: Option<UpgradeSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(rename = "type")]
    pub kind: crate::model::HealthKind,
    pub port: Option<String>,
    pub path: Option<String>,
    pub command: Option<Vec<String>>,
    pub grace: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub max_failures: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeSpec {
    pub min_healthy: Option<f64>,
    pub max_over: Option<f64>,
    pub deadline: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    pub backoff: Option<String>,
    pub factor: Option<f64>,
    pub max: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub cron: String,
    #[serde(default = "utc")]
    pub timezone: String,
}

fn service() -> WorkloadKind {
    WorkloadKind::Service
}
fn utc() -> String {
    "UTC".into()
}

/// A spec error: the field (dotted path) and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        field: field.into(),
        message: message.into(),
    })
}

/// Checks a `runtime.wasm.file` path: absolute, without `..`, NUL or control characters,
/// at most 4096 bytes. (Agents further read it only from their allow-listed directories.)
pub fn check_wasm_file(file: &str) -> Result<(), String> {
    let p = std::path::Path::new(file);
    if file.len() > 4096 || file.chars().any(char::is_control) {
        return Err("at most 4096 bytes, without control characters".into());
    }
    if !p.is_absolute() {
        return Err(format!(
            "{file:?} is relative: give the absolute path of a .wasm file in one of the \
             agents' Wasm directories"
        ));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("{file:?} contains '..': give a path without it"));
    }
    Ok(())
}

/// An OCI image reference as `cairn image import` names images: `name[:tag]` or
/// `name@sha256:...`, path components of lowercase letters, digits, `.`, `_`, `-`, never `.`
/// or `..` (the name becomes a path in the agent's image store).
pub fn check_image_name(image: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{image:?} is not an image name: use e.g. \"busybox:latest\" or \"library/redis@sha256:...\""
        ))
    };
    if image.len() > 255 || image.starts_with('/') || image.ends_with('/') {
        return bad();
    }
    let name = image.split(['@', ':']).next().unwrap_or("");
    let ok_chars = image
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'));
    let ok_parts = name
        .split('/')
        .all(|p| !p.is_empty() && p != "." && p != ".." && !p.starts_with('.'));
    if ok_chars && ok_parts && !image.contains("..") {
        Ok(())
    } else {
        bad()
    }
}

/// Parses a TOML spec (unknown fields and wrong types are errors that name the key).
pub fn from_toml(text: &str) -> Result<WorkloadSpec, SpecError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| SpecError {
        field: e.path().to_string(),
        message: e.inner().message().trim().to_string(),
    })
}

fn duration(field: &str, s: &str) -> Result<Duration, SpecError> {
    humantime::parse_duration(s).or_else(|e| {
        err(
            field,
            format!("{s:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"1m\""),
        )
    })
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        && !id.starts_with('-')
}

/// The next time a schedule fires strictly after `after_ms` (Unix ms), in its time zone.
pub fn next_fire(s: &Schedule, after_ms: u64) -> Option<u64> {
    use chrono::TimeZone;
    let tz: chrono_tz::Tz = s.timezone.parse().ok()?;
    let cron = croner::Cron::new(&s.cron).parse().ok()?;
    let t = tz.timestamp_millis_opt(after_ms as i64).single()?;
    let next = cron.find_next_occurrence(&t, false).ok()?;
    u64::try_from(next.timestamp_millis()).ok()
}

impl WorkloadSpec {
    /// Checks the spec and builds the workload (version and sequence are set by the masters).
    pub fn validate(self) -> Result<Workload, SpecError> {
        if !valid_id(&self.id) {
            return err(
                "id",
                "use 1-64 letters, digits, '-' or '_' (not starting with '-'); task ids are <id>.<n>",
            );
        }
        match &self.runtime {
            RuntimeSpec::Native { cmd, args } => {
                if cmd.is_empty() {
                    return err(
                        "runtime.native.cmd",
                        "give the command to run, e.g. \"/bin/sh\"",
                    );
                }
                if args.len() > 1024 {
                    return err("runtime.native.args", "at most 1024 arguments");
                }
            }
            RuntimeSpec::Oci { image, cmd } => {
                if image.is_empty() {
                    return err(
                        "runtime.oci.image",
                        "name an image imported with `cairn image import`",
                    );
                }
                if let Err(m) = check_image_name(image) {
                    return err("runtime.oci.image", m);
                }
                if cmd.len() > 1024 {
                    return err("runtime.oci.cmd", "at most 1024 arguments");
                }
            }
            RuntimeSpec::Wasm { file, args } => {
                if file.is_empty() {
                    return err(
                        "runtime.wasm.file",
                        "give the path of a .wasm module or component",
                    );
                }
                if let Err(m) = check_wasm_file(file) {
                    return err("runtime.wasm.file", m);
                }
                if args.len() > 1024 {
                    return err("runtime.wasm.args", "at most 1024 arguments");
                }
            }
        }
        let r = &self.resources;
        if !(r.cpus.is_finite() && (0.0..=1024.0).contains(&r.cpus)) {
            return err("resources.cpus", "cpus is between 0 and 1024");
        }
        if r.mem > 1 << 24 {
            return err("resources.mem", "mem is in MiB, at most 16 TiB");
        }
        if r.disk > 1 << 30 {
            return err("resources.disk", "disk is in MiB, at most 1 PiB");
        }
        let instances = match (self.kind, self.instances) {
            (WorkloadKind::System, Some(_)) => {
                return err(
                    "instances",
                    "system workloads run one task per agent; remove instances",
                )
            }
            (WorkloadKind::System, None) => 0,
            (_, None) => 1,
            (_, Some(n)) if n > 10_000 => return err("instances", "at most 10000 instances"),
            (_, Some(n)) => n,
        };
        if self.ports.len() > 64 {
            return err("ports", "at most 64 ports");
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.name.is_empty()
                || p.name.len() > 32
                || !p
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return err(
                    format!("ports[{i}].name"),
                    "use 1-32 letters, digits, '_' or '-'",
                );
            }
            if self.ports[..i].iter().any(|q| q.name == p.name) {
                return err(format!("ports[{i}].name"), "port names are unique");
            }
            if p.number != 0 && self.ports[..i].iter().any(|q| q.number == p.number) {
                return err(format!("ports[{i}].number"), "the same port twice");
            }
        }
        if self.env.len() > 1024
            || self.env.iter().any(|(k, v)| {
                k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0')
            })
        {
            return err(
                "env",
                "at most 1024 variables; names non-empty without '=' or NUL",
            );
        }
        if self.constraints.len() > 32 {
            return err("constraints", "at most 32 constraints");
        }
        let mut constraints = Vec::new();
        for (i, c) in self.constraints.iter().enumerate() {
            constraints
                .push(Constraint::parse(c).or_else(|m| err(format!("constraints[{i}]"), m))?);
        }
        if let Some(role) = &self.role {
            if role.is_empty() || role.len() > 64 || role.contains(['(', ')', ':', ';']) {
                return err("role", "a role is 1-64 characters without ( ) : ;");
            }
        }
        let mut restart = RestartPolicy::default();
        if let Some(rs) = &self.restart {
            if let Some(b) = &rs.backoff {
                restart.base_ms = duration("restart.backoff", b)?.as_millis() as u64;
            }
            if let Some(f) = rs.factor {
                if !(1.0..=10.0).contains(&f) {
                    return err("restart.factor", "factor is between 1 and 10");
                }
                restart.factor = f;
            }
            if let Some(m) = &rs.max {
                restart.max_ms = duration("restart.max", m)?.as_millis() as u64;
            }
            if restart.max_ms < restart.base_ms {
                return err("restart.max", "max must be at least the backoff");
            }
        }
        if self.max_retries > 1000 {
            return err("max_retries", "at most 1000");
        }
        let kill_grace_ms = match &self.kill_grace {
            Some(g) => duration("kill_grace", g)?.as_millis() as u64,
            None => 5_000,
        };
        if kill_grace_ms > 3_600_000 {
            return err("kill_grace", "at most 1h");
        }
        let timeout_ms = match &self.timeout {
            Some(t) => Some(duration("timeout", t)?.as_millis() as u64),
            None => None,
        };
        // Wasm tasks get no sockets unless the spec grants them with network = "host".
        let wasm = matches!(self.runtime, RuntimeSpec::Wasm { .. });
        let network = self
            .network
            .clone()
            .unwrap_or_else(|| if wasm { "none" } else { "host" }.into());
        if network != "host" && network != "none" {
            return err(
                "network",
                "use \"host\" or \"none\" (default: host, and none for Wasm)",
            );
        }
        if wasm && self.env.contains_key("CAIRN_WASM_NETWORK") {
            return err(
                "env.CAIRN_WASM_NETWORK",
                "no longer grants sockets: set network = \"host\" on the workload instead",
            );
        }
        let schedule = match (self.kind, &self.schedule) {
            (WorkloadKind::Cron, None) => {
                return err(
                    "schedule",
                    "cron workloads need schedule = { cron = \"*/5 * * * *\" }",
                )
            }
            (WorkloadKind::Cron, Some(s)) => {
                if s.timezone.parse::<chrono_tz::Tz>().is_err() {
                    return err(
                        "schedule.timezone",
                        format!(
                            "unknown time zone {:?}; use an IANA name like \"Europe/Paris\"",
                            s.timezone
                        ),
                    );
                }
                if let Err(e) = croner::Cron::new(&s.cron).parse() {
                    return err(
                        "schedule.cron",
                        format!("bad cron expression {:?}: {e}; use 5 fields: minute hour day month weekday", s.cron),
                    );
                }
                let schedule = Schedule {
                    cron: s.cron.clone(),
                    timezone: s.timezone.clone(),
                };
                // `0 0 31 2 *` parses but never fires: refuse what has no run in 5 years.
                let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
                if next_fire(&schedule, now).is_none_or(|t| t > now + 5 * 366 * 86_400_000) {
                    return err(
                        "schedule.cron",
                        format!("{:?} never fires (no run in the next 5 years); check the day and month", s.cron),
                    );
                }
                Some(schedule)
            }
            (_, Some(_)) => return err("schedule", "only cron workloads have a schedule"),
            (_, None) => None,
        };
        if self.labels.len() > 64 {
            return err("labels", "at most 64 labels");
        }
        if self.health_checks.len() > 8 {
            return err("health_checks", "at most 8 health checks");
        }
        let mut health_checks = Vec::new();
        for (i, h) in self.health_checks.iter().enumerate() {
            let f = |name: &str| format!("health_checks[{i}].{name}");
            let ms = |name: &str, v: &Option<String>, default: u64| -> Result<u64, SpecError> {
                match v {
                    Some(d) => Ok(duration(&f(name), d)?.as_millis() as u64),
                    None => Ok(default),
                }
            };
            use crate::model::HealthKind;
            let port = match (h.kind, &h.port) {
                (HealthKind::Command, Some(_)) => {
                    return err(f("port"), "command checks take no port")
                }
                (HealthKind::Command, None) => String::new(),
                (_, Some(p)) => p.clone(),
                (_, None) => match self.ports.first() {
                    Some(p) => p.name.clone(),
                    None => {
                        return err(
                            f("port"),
                            "http and tcp checks need a port: add one to ports",
                        )
                    }
                },
            };
            if h.kind != HealthKind::Command && !self.ports.iter().any(|p| p.name == port) {
                return err(f("port"), format!("no port named {port:?} in ports"));
            }
            let command = h.command.clone().unwrap_or_default();
            if (h.kind == HealthKind::Command) == command.is_empty() {
                return err(
                    f("command"),
                    "command checks (and only they) need a command",
                );
            }
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            if h.kind == HealthKind::Http && !path.starts_with('/') {
                return err(f("path"), "the path starts with /");
            }
            if path.len() > 1024 || path.chars().any(|c| c.is_control() || c == ' ') {
                return err(
                    f("path"),
                    "a URL path of at most 1024 characters, without spaces or control characters (CR/LF)",
                );
            }
            let check = crate::model::HealthCheck {
                kind: h.kind,
                port,
                path,
                command,
                grace_ms: ms("grace", &h.grace, 10_000)?,
                interval_ms: ms("interval", &h.interval, 5_000)?.max(100),
                timeout_ms: ms("timeout", &h.timeout, 2_000)?.max(10),
                max_failures: h.max_failures.unwrap_or(3).max(1),
            };
            health_checks.push(check);
        }
        let mut upgrade = crate::model::UpgradePolicy::default();
        if let Some(u) = &self.upgrade {
            if let Some(m) = u.min_healthy {
                if !(0.0..=1.0).contains(&m) {
                    return err("upgrade.min_healthy", "a fraction between 0 and 1");
                }
                upgrade.min_healthy = m;
            }
            if let Some(m) = u.max_over {
                if !(0.0..=1.0).contains(&m) {
                    return err("upgrade.max_over", "a fraction between 0 and 1");
                }
                upgrade.max_over = m;
            }
            if let Some(d) = &u.deadline {
                upgrade.deadline_ms = duration("upgrade.deadline", d)?.as_millis() as u64;
            }
        }
        Ok(Workload {
            id: self.id,
            kind: self.kind,
            runtime: self.runtime,
            resources: self.resources,
            instances,
            env: self.env,
            ports: self.ports,
            constraints,
            role: self.role,
            strategy: self.strategy,
            restart,
            max_retries: self.max_retries,
            kill_grace_ms,
            timeout_ms,
            network,
            schedule,
            labels: self.labels,
            health_checks,
            upgrade,
            stopped: false,
            version: 0,
            updated_at: 0,
            next_seq: 0,
            last_tick: 0,
            previous: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "web"
kind = "service"
instances = 3
constraints = [["@zone", "GROUP_BY"], ["rack", "MAX_PER", "2"]]
kill_grace = "2s"
[runtime.native]
cmd = "/bin/sh"
args = ["-c", "sleep 100"]
[resources]
cpus = 0.5
mem = 128
disk = 10
[[ports]]
name = "http"
number = 0
[restart]
backoff = "500ms"
factor = 2.0
max = "30s"
"#;

    #[test]
    fn a_good_spec_validates() {
        let w = from_toml(GOOD).unwrap().validate().unwrap();
        assert_eq!(w.instances, 3);
        assert_eq!(w.constraints.len(), 2);
        assert_eq!(w.restart.base_ms, 500);
        assert_eq!(w.kill_grace_ms, 2000);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("unknown field", "colour = \"red\"", "colour"),
            ("wrong type", "instances = \"three\"", "instances"),
            (
                "bad regex",
                "constraints = [[\"@hostname\", \"LIKE\", \"(\"]]",
                "constraints[0]",
            ),
            (
                "unknown operator",
                "constraints = [[\"@hostname\", \"NEAR\"]]",
                "constraints[0]",
            ),
            (
                "impossible resources",
                "[resources]\ncpus = -1.0",
                "resources.cpus",
            ),
            ("bad duration", "kill_grace = \"soon\"", "kill_grace"),
        ];
        for (what, extra, field) in cases {
            let text =
                format!("id = \"w\"\n{extra}\n[runtime.native]\ncmd = \"/bin/true\"\nargs = []\n");
            // TOML tables must come last: put `extra` first unless it is a table.
            let text = if extra.starts_with('[') {
                format!("id = \"w\"\n[runtime.native]\ncmd = \"/bin/true\"\nargs = []\n{extra}\n")
            } else {
                text
            };
            let e = match from_toml(&text) {
                Err(e) => e,
                Ok(s) => s.validate().unwrap_err(),
            };
            assert!(e.field.starts_with(field), "{what}: {e}");
        }
        let cron = |c: &str, tz: &str| {
            from_toml(&format!(
                "id = \"c\"\nkind = \"cron\"\nschedule = {{ cron = \"{c}\", timezone = \"{tz}\" }}\n[runtime.native]\ncmd = \"/bin/true\"\nargs = []\n"
            ))
            .unwrap()
            .validate()
        };
        assert_eq!(
            cron("61 * * * *", "UTC").unwrap_err().field,
            "schedule.cron"
        );
        assert_eq!(
            cron("* * * * *", "Mars/Olympus").unwrap_err().field,
            "schedule.timezone"
        );
        assert!(cron("*/5 * * * *", "Europe/Paris").is_ok());
        // Issue 13 #18: parses, but never fires.
        assert_eq!(
            cron("0 0 31 2 *", "UTC").unwrap_err().field,
            "schedule.cron"
        );
    }

    /// Issue 13 #18: accepted before, refused now, each naming the field.
    #[test]
    fn break_outs_and_impossible_values_are_refused() {
        let spec = |extra: &str, runtime: &str| {
            let text = format!("id = \"w\"\n{extra}\n{runtime}\n");
            match from_toml(&text) {
                Err(e) => e,
                Ok(s) => s.validate().unwrap_err(),
            }
        };
        let native = "[runtime.native]\ncmd = \"/bin/true\"\nargs = []";
        let e = spec(
            "constraints = [[\"@hostname\", \"LIKE\", \"zzz)|(.*\"]]",
            native,
        );
        assert_eq!(e.field, "constraints[0]", "{e}");
        let e = spec(
            "ports = [{ name = \"http\", number = 0 }]\nhealth_checks = [{ type = \"http\", port = \"http\", path = \"/x\\r\\nHost: evil\" }]",
            native,
        );
        assert_eq!(e.field, "health_checks[0].path", "{e}");
        for image in ["../../etc", "/etc", "a/../b", ".hidden", "x y"] {
            let e = spec("", &format!("[runtime.oci]\nimage = \"{image}\""));
            assert_eq!(e.field, "runtime.oci.image", "{image}: {e}");
        }
        for image in [
            "busybox:latest",
            "library/redis@sha256:abc",
            "r.io/a/b-c_d:1.2",
        ] {
            assert!(check_image_name(image).is_ok(), "{image}");
        }
    }

    /// Issue 14 holes 8 and 10: a Wasm file must be an absolute path without `..` (agents
    /// then read only their allow-listed directories), and sockets are a spec field that
    /// defaults to none for Wasm, never an env variable.
    #[test]
    fn wasm_file_and_network_are_validated() {
        let wasm = |file: &str, extra: &str| {
            from_toml(&format!(
                "id = \"w\"\n{extra}\n[runtime.wasm]\nfile = \"{file}\"\n"
            ))
            .unwrap()
            .validate()
        };
        for bad in [
            "app.wasm",
            "../../dev/zero",
            "/srv/wasm/../../dev/zero",
            "/a\\u0007b",
        ] {
            let e = wasm(bad, "").unwrap_err();
            assert_eq!(e.field, "runtime.wasm.file", "{bad}: {e}");
        }
        let ok = wasm("/srv/wasm/app.wasm", "").unwrap();
        assert_eq!(ok.network, "none");
        assert_eq!(
            wasm("/srv/wasm/app.wasm", "network = \"host\"")
                .unwrap()
                .network,
            "host"
        );
        assert_eq!(
            wasm("/srv/wasm/app.wasm", "env = { CAIRN_WASM_NETWORK = \"1\" }")
                .unwrap_err()
                .field,
            "env.CAIRN_WASM_NETWORK"
        );
        let native = from_toml("id = \"n\"\n[runtime.native]\ncmd = \"/bin/true\"\n")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(native.network, "host");
    }

    #[test]
    fn cron_fires_in_its_time_zone() {
        let s = Schedule {
            cron: "0 9 * * *".into(),
            timezone: "Europe/Paris".into(),
        };
        // 2026-01-01T00:00:00Z; 09:00 in Paris (UTC+1 in winter) is 08:00Z.
        let jan1 = 1_767_225_600_000u64;
        assert_eq!(next_fire(&s, jan1), Some(jan1 + 8 * 3_600_000));
        let every_minute = Schedule {
            cron: "* * * * *".into(),
            timezone: "UTC".into(),
        };
        assert_eq!(next_fire(&every_minute, jan1 + 1), Some(jan1 + 60_000));
    }
}
