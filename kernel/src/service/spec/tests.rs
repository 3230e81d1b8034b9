//! Table tests of the stateful service spec: a good spec, and bad input naming the field.

use super::*;

pub(crate) const GOOD: &str = r#"
name = "zk"

[[pod_types]]
name = "node"
count = 3
constraints = [["@hostname", "UNIQUE"]]
volumes = [{ name = "data", path = "data", size_mb = 512 }]
replace_after = "5m"

[[pod_types.tasks]]
name = "init"
goal = "once"
runtime.native = { cmd = "/bin/sh", args = ["-c", "mkdir -p data/db"] }

[[pod_types.tasks]]
name = "server"
runtime.native = { cmd = "/usr/bin/zk", args = ["conf/zoo.cfg"] }
resources = { cpus = 0.5, mem = 256, disk = 64 }
ports = [{ name = "client", number = 0 }]
readiness_check = { type = "tcp", port = "client", interval = "1s" }
templates = [{ path = "conf/zoo.cfg", template = """
dataDir=data/db
{% for p in pods %}server.{{ p.index }}={{ p.host }}:{{ p.ports.client }}
{% endfor %}""" }]

[[plans]]
name = "backup"
[[plans.phases]]
name = "dump"
pod_type = "node"
strategy = { canary = 1 }
tasks = ["init"]
"#;

#[test]
fn a_good_spec_validates_from_toml_and_json() {
    let s = from_toml(GOOD).unwrap().validate().unwrap();
    let node = &s.pod_types[0];
    assert_eq!((node.count, node.replace_after_ms), (3, Some(300_000)));
    assert_eq!(node.deploy, PhaseStrategy::Serial);
    assert_eq!(node.deadline_ms, 600_000);
    assert_eq!(node.tasks[0].goal, TaskGoal::Once);
    let server = &node.tasks[1];
    assert_eq!(server.goal, TaskGoal::Running);
    assert_eq!(server.readiness_check.as_ref().unwrap().port, "client");
    assert!(server.health_checks.is_empty());
    assert_eq!(s.plans[0].phases[0].strategy, PhaseStrategy::Canary(1));

    let json = serde_json::json!({
        "name": "kv",
        "pod_types": [{
            "name": "db", "count": 2,
            "volumes": [{"name": "data", "path": "var/data", "size_mb": 10}],
            "tasks": [{"name": "server", "runtime": {"wasm": {"file": "/var/lib/cairn/wasm/kv.wasm"}}}]
        }]
    });
    let s = from_json(json.to_string().as_bytes())
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(s.pod_types[0].volumes[0].path, "var/data");
}

#[test]
fn endpoints_name_existing_pods() {
    let s = from_toml(&GOOD.replacen(
        "name = \"zk\"",
        "name = \"zk\"\nendpoints = { leader = \"node-2\" }",
        1,
    ))
    .unwrap()
    .validate()
    .unwrap();
    assert_eq!(s.endpoints["leader"], "node-2");
}

/// Replaces `from` by `to` in the good spec and returns the error's field and message.
fn bad(from: &str, to: &str) -> SpecError {
    assert!(GOOD.contains(from), "{from:?} is not in the spec");
    let text = GOOD.replacen(from, to, 1);
    match from_toml(&text) {
        Err(e) => e,
        Ok(s) => s.validate().expect_err(to),
    }
}

#[test]
fn bad_specs_name_the_field() {
    let vol = r#"volumes = [{ name = "data", path = "data", size_mb = 512 }]"#;
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "name = \"zk\"",
            "name = \"zk\"\nendpoints = { leader = \"node-7\" }",
            "endpoints.leader",
            "no pod \"node-7\"",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\nfailover = { endpoint = \"leader\", tasks = [\"server\"] }",
            "failover.endpoint",
            "no endpoint \"leader\"; declare it in endpoints",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\nendpoints = { leader = \"node-0\" }\nfailover = { endpoint = \"leader\", after = \"10ms\", tasks = [\"server\"] }",
            "failover.after",
            "at least \"1s\"",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\nendpoints = { leader = \"node-0\" }\nfailover = { endpoint = \"leader\", tasks = [\"init\"] }",
            "failover.tasks[0]",
            "task \"init\" is not a `running` task",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\nendpoints = { leader = \"node-0\" }\nfailover = { endpoint = \"leader\", tasks = [\"srv\"] }",
            "failover.tasks[0]",
            "pod type \"node\" has no task \"srv\"",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\nendpoints = { node-1 = \"node-0\" }",
            "endpoints.node-1",
            "a pod's name",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\nendpoints = { Leader = \"node-0\" }",
            "endpoints.Leader",
            "lowercase",
        ),
        (
            "name = \"zk\"",
            "name = \"zk\"\ncolour = \"red\"",
            "colour",
            "unknown field",
        ),
        (
            "count = 3",
            "count = -3",
            "pod_types[0].count",
            "invalid value",
        ),
        (
            "count = 3",
            "count = 5000",
            "pod_types[0].count",
            "at most 1000",
        ),
        ("name = \"zk\"", "name = \"Zk!\"", "name", "lowercase"),
        (
            "name = \"node\"\ncount",
            "name = \"node\"\ncolour = 1\ncount",
            "pod_types[0].colour",
            "unknown field",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "../etc", size_mb = 512 }]"#,
            "pod_types[0].volumes[0].path",
            "inside the sandbox",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "/var/lib/data", size_mb = 512 }]"#,
            "pod_types[0].volumes[0].path",
            "outside the sandbox",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "a/./b", size_mb = 512 }]"#,
            "pod_types[0].volumes[0].path",
            "no '..'",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "data", size_mb = 0 }]"#,
            "pod_types[0].volumes[0].size_mb",
            "at least 1",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "data", size_mb = -5 }]"#,
            "pod_types[0].volumes[0].size_mb",
            "invalid value",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "data", size_mb = 1 }, { name = "data", path = "logs", size_mb = 1 }]"#,
            "pod_types[0].volumes[1].name",
            "two volumes named",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "data", size_mb = 1 }, { name = "wal", path = "data/wal", size_mb = 1 }]"#,
            "pod_types[0].volumes[1].path",
            "overlaps volume",
        ),
        (
            vol,
            r#"volumes = [{ name = "data", path = "data", size = 1 }]"#,
            "pod_types[0].volumes[0]",
            "unknown field `size`",
        ),
        (
            "replace_after = \"5m\"",
            "replace_after = \"soon\"",
            "pod_types[0].replace_after",
            "not a duration",
        ),
        (
            "goal = \"once\"",
            "goal = \"forever\"",
            "pod_types[0].tasks[0].goal",
            "unknown variant",
        ),
        (
            "name = \"init\"",
            "name = \"server\"",
            "pod_types[0].tasks[1].name",
            "two tasks named",
        ),
        (
            "cmd = \"/usr/bin/zk\"",
            "cmd = \"\"",
            "pod_types[0].tasks[1].runtime.native.cmd",
            "give the command",
        ),
        (
            "cpus = 0.5",
            "cpus = -0.5",
            "pod_types[0].tasks[1].resources.cpus",
            "between 0 and 1024",
        ),
        (
            "port = \"client\", interval",
            "port = \"admin\", interval",
            "pod_types[0].tasks[1].readiness_check.port",
            "no port named \"admin\"",
        ),
        (
            "{% endfor %}",
            "{% endif %}",
            "pod_types[0].tasks[1].templates[0].template",
            "template of \"conf/zoo.cfg\" line 3: syntax error",
        ),
        (
            "path = \"conf/zoo.cfg\"",
            "path = \"../zoo.cfg\"",
            "pod_types[0].tasks[1].templates[0].path",
            "inside the sandbox",
        ),
        (
            "pod_type = \"node\"",
            "pod_type = \"nodes\"",
            "plans[0].phases[0].pod_type",
            "no pod type \"nodes\"; the service has [\"node\"]",
        ),
        (
            "tasks = [\"init\"]",
            "tasks = [\"init\", \"backup\"]",
            "plans[0].phases[0].tasks[1]",
            "no task \"backup\"",
        ),
        (
            "strategy = { canary = 1 }",
            "strategy = { canary = 0 }",
            "plans[0].phases[0].strategy",
            "at least 1 step",
        ),
        (
            "name = \"backup\"",
            "name = \"deploy\"",
            "plans[0].name",
            "built-in plan",
        ),
    ];
    for (from, to, field, message) in cases {
        let e = bad(from, to);
        assert!(
            e.field.starts_with(field) && e.message.contains(message),
            "{to:?}: got {e}, want {field}: ...{message}..."
        );
    }
}

#[test]
fn duplicate_pod_types_and_shared_ports_are_refused() {
    let pod = "[[pod_types]]\nname = \"node\"\ntasks = [{ name = \"a\", runtime.native = { cmd = \"/bin/a\" } }]\n";
    let text = format!("name = \"zk\"\n{pod}{pod}");
    let e = from_toml(&text).unwrap().validate().unwrap_err();
    assert_eq!(e.field, "pod_types[1].name");
    assert_eq!(e.message, "two pod types named \"node\"");

    let e = bad(
        "[[pod_types.tasks]]\nname = \"init\"",
        "[[pod_types.tasks]]\nname = \"init\"\nports = [{ name = \"client\", number = 0 }]",
    );
    assert_eq!(e.field, "pod_types[0].tasks[1].ports[0]");
    assert!(e.message.contains("taken by another task"), "{e}");
}
