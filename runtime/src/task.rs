//! What an agent runs: the task spec it receives and the status it reports.

use cairn_kernel::model::{RuntimeSpec, TaskResources, TaskState};
use cairn_kernel::service::spec::check_sandbox_path;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A named port given to a task (`PORT0..N` and `PORT_<NAME>` in its environment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub number: u16,
}

/// The network a task sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// The host's network (native and OCI default); sockets and outgoing HTTP (Wasm).
    Host,
    /// An empty network namespace (native); no sockets at all (Wasm default).
    None,
}

fn default_grace() -> u64 {
    5_000
}
fn default_log_max() -> u64 {
    10 << 20
}

/// One task as the agent runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub id: String,
    #[serde(default)]
    pub workload: String,
    pub runtime: RuntimeSpec,
    #[serde(default)]
    pub resources: TaskResources,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Maximum number of processes (native).
    #[serde(default)]
    pub pids_max: Option<u64>,
    /// Time between SIGTERM and SIGKILL when the task is killed.
    #[serde(default = "default_grace")]
    pub kill_grace_ms: u64,
    /// Wall-clock limit (jobs); the task is killed with reason `timeout`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Unset: the host's network for native and OCI tasks, no sockets for Wasm tasks.
    #[serde(default)]
    pub network: Option<Network>,
    /// stdout/stderr are rotated to `*.1` past this size.
    #[serde(default = "default_log_max")]
    pub log_max_bytes: u64,
    /// Set on tasks the masters assigned: the agent kills them when they are unassigned and
    /// reports their states back. Tasks launched directly on the agent's API are left alone.
    #[serde(default)]
    pub assigned: bool,
    /// Run by the agent while the task runs; failures past `max_failures` kill it with
    /// reason `unhealthy`.
    #[serde(default)]
    pub health_checks: Vec<cairn_kernel::model::HealthCheck>,
    /// Persistent volumes (kept in `<data dir>/volumes/<id>`) mounted at their path.
    #[serde(default)]
    pub volumes: Vec<cairn_kernel::model::TaskVolume>,
    /// Files written into the sandbox (or a volume) just before start.
    #[serde(default)]
    pub files: Vec<cairn_kernel::model::TaskFile>,
}

/// Why a task ended, when the agent knows more than the exit code.
pub mod reason {
    pub const OOM: &str = "oom";
    pub const MEMORY_LIMIT: &str = "memory_limit";
    pub const DISK_LIMIT: &str = "disk_limit";
    pub const TIMEOUT: &str = "timeout";
    pub const KILLED: &str = "killed";
    pub const AGENT_RESTART: &str = "agent_restart";
    pub const EXITED: &str = "exited";
    pub const TRAP: &str = "trap";
    pub const START_FAILED: &str = "start_failed";
    pub const UNHEALTHY: &str = "unhealthy";
    pub const VOLUME_LIMIT: &str = "volume_limit";
}

/// Resource usage of a task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskUsage {
    pub cpu_usec: u64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub disk_bytes: u64,
}

/// A task's observed state, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub id: String,
    pub workload: String,
    pub runtime: String,
    pub state: TaskState,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Host pid of the task's supervisor (native).
    pub pid: Option<u32>,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub usage: TaskUsage,
    pub message: Option<String>,
    /// What the health checks say (`None`: no checks, or none has passed yet).
    #[serde(default)]
    pub healthy: Option<bool>,
}

impl TaskSpec {
    /// Checks the spec, naming the bad field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        if self.id.is_empty()
            || self.id.len() > 128
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || self.id.starts_with('.')
        {
            return bad(
                "id",
                "task ids are 1-128 letters, digits, '-', '_', '.', not starting with '.'",
            );
        }
        match &self.runtime {
            RuntimeSpec::Native { cmd, args } => {
                if cmd.is_empty() {
                    return bad(
                        "runtime.native.cmd",
                        "give the command to run, e.g. /bin/sh",
                    );
                }
                if args.len() > 1024 {
                    return bad("runtime.native.args", "at most 1024 arguments");
                }
            }
            RuntimeSpec::Wasm { file, .. } => {
                if file.is_empty() {
                    return bad(
                        "runtime.wasm.file",
                        "give the path of a .wasm module or component",
                    );
                }
                if let Err(m) = cairn_kernel::spec::check_wasm_file(file) {
                    return bad("runtime.wasm.file", &m);
                }
            }
            RuntimeSpec::Oci { image, cmd } => {
                if image.is_empty() || image.len() > 255 {
                    return bad(
                        "runtime.oci.image",
                        "give the name or digest of an image imported with `cairn image import`",
                    );
                }
                if cmd.len() > 1024 || cmd.iter().any(|a| a.contains('\0')) {
                    return bad(
                        "runtime.oci.cmd",
                        "at most 1024 arguments, none containing NUL",
                    );
                }
            }
        }
        let r = &self.resources;
        if !(r.cpus.is_finite() && (0.0..=1024.0).contains(&r.cpus)) {
            return bad("resources.cpus", "cpus must be between 0 and 1024");
        }
        if r.mem > (1 << 30) {
            return bad("resources.mem", "mem is in MiB and at most 2^30");
        }
        if self.env.len() > 1024
            || self
                .env
                .keys()
                .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return bad(
                "env",
                "at most 1024 variables; names are non-empty without '=' or NUL",
            );
        }
        if self.env.values().any(|v| v.contains('\0')) {
            return bad("env", "values cannot contain NUL");
        }
        if self.ports.len() > 64 {
            return bad("ports", "at most 64 ports");
        }
        if self.log_max_bytes < 1024 {
            return bad("log_max_bytes", "at least 1024");
        }
        if self.volumes.len() > 16 {
            return bad("volumes", "at most 16 volumes");
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !crate::volumes::valid_id(&v.id) {
                return bad(
                    &format!("volumes[{i}].id"),
                    "volume ids are 1-200 letters, digits, '-', '_', '.', not starting with '.'",
                );
            }
            if let Err(e) = check_sandbox_path("", &v.path) {
                return bad(&format!("volumes[{i}].path"), &e.message);
            }
            if v.size_mb == 0 {
                return bad(&format!("volumes[{i}].size_mb"), "at least 1 (MiB)");
            }
        }
        if self.files.len() > 64 {
            return bad("files", "at most 64 files");
        }
        for (i, f) in self.files.iter().enumerate() {
            if let Err(e) = check_sandbox_path("", &f.path) {
                return bad(&format!("files[{i}].path"), &e.message);
            }
            if f.content.len() > 1 << 20 {
                return bad(&format!("files[{i}].content"), "at most 1 MiB");
            }
        }
        Ok(())
    }

    /// The network the task gets: as given, else the host's for native and OCI tasks and
    /// none for Wasm (sockets are granted only by the spec, never by an env variable).
    pub fn network(&self) -> Network {
        match (self.network, &self.runtime) {
            (Some(n), _) => n,
            (None, RuntimeSpec::Wasm { .. }) => Network::None,
            (None, _) => Network::Host,
        }
    }

    /// The environment every runtime gives a task.
    pub fn task_env(&self, sandbox: &str, host: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("CAIRN_TASK_ID".into(), self.id.clone()),
            ("CAIRN_WORKLOAD".into(), self.workload.clone()),
            ("CAIRN_SANDBOX".into(), sandbox.to_string()),
            ("HOST".into(), host.to_string()),
        ];
        for (i, p) in self.ports.iter().enumerate() {
            env.push((format!("PORT{i}"), p.number.to_string()));
            if !p.name.is_empty() {
                let name: String = p
                    .name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                env.push((format!("PORT_{name}"), p.number.to_string()));
            }
        }
        if let Some(p) = self.ports.first() {
            env.push(("PORT".into(), p.number.to_string()));
        }
        for (k, v) in &self.env {
            env.push((k.clone(), v.clone()));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<TaskSpec, String> {
        serde_json::from_str::<TaskSpec>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn env_has_ports_and_ids() {
        let s = spec(r#"{"id":"t1","workload":"web","runtime":{"native":{"cmd":"/bin/true","args":[]}},
            "ports":[{"name":"http","number":31000},{"name":"admin-ui","number":31001}],"env":{"A":"b"}}"#)
        .unwrap();
        let env = s.task_env("/sb", "127.0.0.1");
        let get = |k: &str| env.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CAIRN_TASK_ID"), Some("t1"));
        assert_eq!(get("CAIRN_WORKLOAD"), Some("web"));
        assert_eq!(get("PORT0"), Some("31000"));
        assert_eq!(get("PORT1"), Some("31001"));
        assert_eq!(get("PORT_HTTP"), Some("31000"));
        assert_eq!(get("PORT_ADMIN_UI"), Some("31001"));
        assert_eq!(get("A"), Some("b"));
        assert_eq!(s.kill_grace_ms, 5000);
    }

    #[test]
    fn validation_names_the_field() {
        let v = |j: &str| spec(j).unwrap().validate().map_err(|(f, _)| f);
        assert_eq!(
            v(r#"{"id":"../x","runtime":{"native":{"cmd":"/bin/true","args":[]}}}"#),
            Err("id".into())
        );
        assert_eq!(
            v(r#"{"id":"a","runtime":{"native":{"cmd":"","args":[]}}}"#),
            Err("runtime.native.cmd".into())
        );
        assert_eq!(
            v(r#"{"id":"a","runtime":{"oci":{"image":"","cmd":[]}}}"#),
            Err("runtime.oci.image".into())
        );
        assert_eq!(
            v(
                r#"{"id":"a","runtime":{"wasm":{"file":"/w/x.wasm","args":[]}},"resources":{"cpus":-1,"mem":1,"disk":1}}"#
            ),
            Err("resources.cpus".into())
        );
        // Wasm files: absolute, without '..' (hole 8 of issue 14).
        for file in ["x", "/w/../../dev/zero"] {
            let j = format!(r#"{{"id":"a","runtime":{{"wasm":{{"file":"{file}","args":[]}}}}}}"#);
            assert_eq!(v(&j), Err("runtime.wasm.file".into()), "{file}");
        }
        // Wasm tasks get sockets only from the spec's network field.
        let w = spec(r#"{"id":"a","runtime":{"wasm":{"file":"/w/x.wasm"}},"env":{"CAIRN_WASM_NETWORK":"1"}}"#)
            .unwrap();
        assert_eq!(w.network(), Network::None);
        let w =
            spec(r#"{"id":"a","runtime":{"wasm":{"file":"/w/x.wasm"}},"network":"host"}"#).unwrap();
        assert_eq!(w.network(), Network::Host);
        let n = spec(r#"{"id":"a","runtime":{"native":{"cmd":"/bin/true"}}}"#).unwrap();
        assert_eq!(n.network(), Network::Host);
        assert!(spec(r#"{"id":"a","runtime":{"wasm":{"file":"x","args":[]}},"bogus":1}"#).is_err());
    }
}
