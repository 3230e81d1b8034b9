//! Config templates of pod tasks, rendered by the masters (inside `apply`, so every master
//! renders the same bytes) with minijinja into files the agent writes just before the task
//! starts.
//!
//! A template sees:
//! - `service`: `{ name, version }`;
//! - `options`: the service's options (a package's options after defaults);
//! - `pod`: this pod instance, `{ name, type, index, agent, host, ports }`;
//! - `task`: `{ name }`, and `ports`: this task's ports by name;
//! - `env`: this task's environment (`CAIRN_*` and `PORT_*` included);
//! - `endpoints`: the service's named endpoints, name → pod name (`endpoints.primary`);
//! - `pods`: every pod instance of the service, in index order per pod type, each
//!   `{ name, type, index, agent, host, ports }`; `host` is `none` until the pod is placed and
//!   `ports` (by port name, all tasks of the pod) is empty until its tasks have launched.
//!
//! Undefined variables are errors (a typo never renders an empty string into a config), and
//! every error names the file and the line.

use super::model::{ConfigTemplate, ServiceState};
use crate::model::{PortAsk, TaskFile};
use crate::state::State;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Instructions one template may take (minijinja's fuel) before rendering fails.
pub const MAX_FUEL: u64 = 5_000_000;
/// Largest rendered file.
pub const MAX_RENDERED_BYTES: usize = 1 << 20;

/// The host part of an agent's `host:port` API address (the address its tasks listen on).
pub fn agent_host(state: &State, agent: &str) -> Option<String> {
    let a = state.agents.get(agent)?;
    let host = match a.addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => a.addr.as_str(),
    };
    Some(host.to_string())
}

/// The ports of the newest launch of each task of `pod`, by port name.
fn pod_ports(state: &State, svc: &ServiceState, pod: &str) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(p) = svc.pods.get(pod) else {
        return out;
    };
    for (task, target) in &p.tasks {
        let id = super::driver::task_id(&svc.spec.name, pod, task, target.generation);
        if let Some(t) = state.tasks.get(&id) {
            for port in &t.ports {
                out.insert(port.name.clone(), json!(port.number));
            }
        }
    }
    out
}

/// Everything a template of task `task` of `pod` sees (see the module docs).
pub fn context(
    state: &State,
    svc: &ServiceState,
    options: Value,
    pod: &str,
    task: &str,
    ports: &[PortAsk],
    env: &BTreeMap<String, String>,
) -> Value {
    let describe = |p: &super::PodInstance, own_ports: Option<&[PortAsk]>| {
        let host = p.agent.as_deref().and_then(|a| agent_host(state, a));
        let mut ports_map = pod_ports(state, svc, &p.id);
        for port in own_ports.unwrap_or_default() {
            ports_map.insert(port.name.clone(), json!(port.number));
        }
        json!({
            "name": p.id,
            "type": p.pod_type,
            "index": p.index,
            "agent": p.agent,
            "host": host,
            "ports": ports_map,
        })
    };
    let mut pods: Vec<&super::PodInstance> = svc.pods.values().collect();
    pods.sort_by(|a, b| (&a.pod_type, a.index).cmp(&(&b.pod_type, b.index)));
    let this = svc.pods.get(pod);
    json!({
        "service": { "name": svc.spec.name, "version": svc.version },
        "options": options,
        "pod": this.map(|p| describe(p, Some(ports))),
        "task": { "name": task },
        "ports": ports.iter().map(|p| (p.name.clone(), json!(p.number))).collect::<Map<_, _>>(),
        "env": env,
        "endpoints": svc.spec.endpoints,
        "pods": pods
            .iter()
            .map(|p| describe(p, (p.id == pod).then_some(ports)))
            .collect::<Vec<_>>(),
    })
}

/// Renders every template; the first error names the file and line.
pub fn render(templates: &[ConfigTemplate], ctx: &Value) -> Result<Vec<TaskFile>, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // A config file keeps its last newline (Jinja drops it by default).
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    // Rendering runs inside `apply` on every master: a runaway loop must end, not stall Raft.
    env.set_fuel(Some(MAX_FUEL));
    let mut out = Vec::with_capacity(templates.len());
    for t in templates {
        let content = env
            .render_str(&t.template, minijinja::value::Serde(ctx))
            .map_err(|e| {
                let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
                let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
                format!("template {:?}{line}: {}{detail}", t.path, e.kind())
            })?;
        if content.len() > MAX_RENDERED_BYTES {
            return Err(format!(
                "template {:?} renders to {} bytes; at most {MAX_RENDERED_BYTES}",
                t.path,
                content.len()
            ));
        }
        out.push(TaskFile {
            path: t.path.clone(),
            content,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpl(path: &str, template: &str) -> ConfigTemplate {
        ConfigTemplate {
            path: path.into(),
            template: template.into(),
        }
    }

    #[test]
    fn renders_and_names_file_and_line_of_errors() {
        let ctx = json!({
            "options": { "port": 7 },
            "pods": [{ "name": "node-0", "host": "10.0.0.1", "ports": { "peer": 2380 } },
                     { "name": "node-1", "host": null, "ports": {} }],
        });
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("port={{ options.port }}", Ok("port=7")),
            ("line\n", Ok("line\n")),
            (
                "{% for p in pods %}{{ p.name }}={{ p.host or 'pending' }};{% endfor %}",
                Ok("node-0=10.0.0.1;node-1=pending;"),
            ),
            ("{{ pods[0].ports.peer }}", Ok("2380")),
            (
                "a\n{{ options.missing }}",
                Err("template \"c.conf\" line 2: undefined"),
            ),
            ("{{ nope }}", Err("template \"c.conf\" line 1: undefined")),
        ];
        for (source, want) in cases {
            let got = render(&[tpl("c.conf", source)], &ctx);
            match (want, got) {
                (Ok(w), Ok(files)) => assert_eq!(files[0].content, *w, "{source}"),
                (Err(w), Err(e)) => assert!(e.starts_with(w), "{source}: {e}"),
                (w, g) => panic!("{source}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn refuses_huge_output() {
        let ctx = json!({});
        let big = "x".repeat(MAX_RENDERED_BYTES + 1);
        let e = render(&[tpl("big", &big)], &ctx).unwrap_err();
        assert!(e.contains("at most"), "{e}");
        let e = render(
            &[tpl(
                "loop",
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            )],
            &ctx,
        )
        .unwrap_err();
        assert!(e.starts_with("template \"loop\" line 1"), "{e}");
    }
}
