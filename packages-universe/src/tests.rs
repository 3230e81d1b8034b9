//! Tests of the package format, options and rendering, and of every bundled package.

use super::*;
use crate::options::{set, Options};
use serde_json::json;

/// Every bundled package: the format loads, the schema is valid, the defaults render, and
/// the rendered spec passes the stateful service validation the API applies.
#[test]
fn every_bundled_package_is_valid() {
    let all = bundled().expect("bundled packages load");
    assert!(
        all.iter().any(|p| p.meta.name == "redis"),
        "redis is bundled"
    );
    for p in &all {
        let name = &p.meta.name;
        let o = Options::resolve(&p.schema, &json!({}))
            .unwrap_or_else(|e| panic!("{name}: defaults: {e:?}"));
        let text = render::render(p, &o).unwrap_or_else(|e| panic!("{name}: render: {e}"));
        let spec = cairn_kernel::service::spec::from_toml(&text)
            .and_then(|s| s.validate())
            .unwrap_or_else(|e| panic!("{name}: rendered spec: {e}\n{text}"));
        assert_eq!(spec.name, o.0["name"].as_str().unwrap(), "{name}");
        assert!(!p.readme.is_empty(), "{name}: README.md");
        for b in &p.meta.requirements.binaries {
            assert!(b.starts_with('/'), "{name}: {b}");
        }
    }
}

fn redis() -> Package {
    bundled()
        .unwrap()
        .into_iter()
        .find(|p| p.meta.name == "redis")
        .unwrap()
}

/// Resolves options; errors as `pointer: message` lines.
fn resolve(user: serde_json::Value) -> Result<serde_json::Value, Vec<String>> {
    Options::resolve(&redis().schema, &user)
        .map(|o| o.0)
        .map_err(|es| es.iter().map(|e| e.to_string()).collect())
}

#[test]
fn defaults_fill_nested_options_under_user_ones() {
    let o = resolve(json!({"persistence": {"aof": false}, "cpus": 1})).unwrap();
    assert_eq!(o["persistence"]["aof"], false);
    assert_eq!(o["persistence"]["appendfsync"], "everysec");
    assert_eq!(o["persistence"]["disk_mb"], 1024);
    assert_eq!(o["cpus"], 1);
    assert_eq!(o["name"], "redis");
}

#[test]
fn bad_options_name_their_pointer_and_the_fix() {
    let cases = [
        (
            json!({"cpus": 100}),
            "/cpus: 100 is greater than the maximum of 64",
        ),
        (
            json!({"mem_mb": "lots"}),
            "/mem_mb: \"lots\" is not of type \"integer\"",
        ),
        (
            json!({"persistence": {"appendfsync": "sometimes"}}),
            "/persistence/appendfsync: \"sometimes\" is not one of",
        ),
        (
            json!({"name": "Bad_Name"}),
            "/name: \"Bad_Name\" does not match",
        ),
        (
            json!({"colour": 1}),
            "/colour: unknown option; the options here are",
        ),
        (
            json!({"replicsa": 1}),
            "/replicsa: unknown option; did you mean \"replicas\"?",
        ),
        (
            json!({"persistence": {"aofx": true}}),
            "/persistence/aofx: unknown option; did you mean \"aof\"?",
        ),
        (json!([1]), "/: options are a JSON object, not an array"),
    ];
    for (user, want) in cases {
        let errs = resolve(user.clone()).expect_err(&user.to_string());
        assert!(
            errs.iter().any(|e| e.starts_with(want)),
            "{user}: want {want:?}, got {errs:?}"
        );
    }
    // The option's description is part of the message.
    let errs = resolve(json!({"cpus": 0})).unwrap_err();
    assert!(
        errs[0].contains("(CPU shares of the redis server)"),
        "{errs:?}"
    );
}

#[test]
fn set_reads_values_by_the_options_type() {
    let schema = redis().schema;
    let mut o = json!({});
    for a in [
        "cpus=2",
        "persistence.aof=false",
        "name=007",
        "maxmemory_policy=allkeys-lru",
    ] {
        set(&mut o, &schema, a).unwrap();
    }
    assert_eq!(
        o,
        json!({"cpus": 2, "persistence": {"aof": false}, "name": "007",
               "maxmemory_policy": "allkeys-lru"})
    );
    let errs: Vec<String> = ["cpu=2", "persistence.disk=3", "novalue", "=1", "a..b=1"]
        .iter()
        .map(|a| set(&mut o, &schema, a).unwrap_err().to_string())
        .collect();
    assert_eq!(
        errs[0],
        "/cpu: unknown option; did you mean \"cpus\"? the options here are [\"backup_disk_mb\", \"backups_kept\", \"cpus\", \"failover_after_s\", \"maxmemory_policy\", \"mem_mb\", \"min_replicas_to_write\", \"name\", \"persistence\", \"replicas\", \"spread\"]"
    );
    assert!(errs[1].starts_with("/persistence/disk: unknown option; did you mean \"disk_mb\"?"));
    assert!(errs[2].contains("write KEY=VALUE"), "{}", errs[2]);
    assert!(errs[3].contains("the key is empty"), "{}", errs[3]);
    assert!(errs[4].contains("the key is empty"), "{}", errs[4]);
}

#[test]
fn redis_renders_options_into_its_spec() {
    let p = redis();
    let o = Options::resolve(
        &p.schema,
        &json!({"name": "cache", "persistence": {"aof": false, "disk_mb": 64}, "mem_mb": 100}),
    )
    .unwrap();
    let text = render::render(&p, &o).unwrap();
    let spec = cairn_kernel::service::spec::from_toml(&text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(spec.name, "cache");
    let pt = &spec.pod_types[0];
    assert_eq!(pt.volumes[0].size_mb, 64);
    let task = &pt.tasks[0];
    assert_eq!(task.resources.mem, 100);
    let cairn_kernel::model::RuntimeSpec::Native { cmd, args } = &task.runtime else {
        panic!("native");
    };
    // start.sh runs redis-server on redis.conf (and restores a backup in a restore run).
    assert_eq!(
        (cmd.as_str(), args.as_slice()),
        ("/bin/sh", &["start.sh".to_string()][..])
    );
    assert!(task.templates[1]
        .template
        .contains("exec /usr/bin/redis-server redis.conf\n"));
    let conf = &task.templates[0];
    assert_eq!(conf.path, "redis.conf");
    // Options rendered now; the pod's address and port left for the launch-time rendering.
    assert!(
        conf.template.contains("appendonly no\n"),
        "{}",
        conf.template
    );
    assert!(
        conf.template.contains("maxmemory 80mb\n"),
        "{}",
        conf.template
    );
    assert!(
        conf.template.contains("port {{ ports.redis }}\n"),
        "{}",
        conf.template
    );
}

fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

const META: &str = "name = \"demo\"\nversion = \"1.0-1\"\ndescription = \"d\"\n\
                    licence = \"MIT\"\nmaintainer = \"me\"\n";
const SCHEMA: &str =
    r#"{"type":"object","properties":{"name":{"type":"string","default":"demo"}}}"#;

fn demo(overrides: &[(&str, &str)]) -> Result<Package, FormatError> {
    let mut f = files(&[
        ("package.toml", META),
        ("options.schema.json", SCHEMA),
        ("service.toml.j2", "name = {{ options.name | toml }}\n"),
        ("README.md", "# demo"),
    ]);
    for (k, v) in overrides {
        if v.is_empty() {
            f.remove(*k);
        } else {
            f.insert(k.to_string(), v.as_bytes().to_vec());
        }
    }
    Package::from_files("test", &f)
}

#[test]
fn format_errors_name_the_file_and_the_fix() {
    assert!(demo(&[]).is_ok());
    let cases = [
        (("README.md", ""), "README.md: missing"),
        (
            ("package.toml", "name = \"demo\""),
            "package.toml: missing field `version`",
        ),
        (
            ("package.toml", &META.replace("demo", "Demo")),
            "package.toml: name \"Demo\": 1-48 lowercase",
        ),
        (("options.schema.json", "{"), "options.schema.json: EOF"),
        (
            (
                "options.schema.json",
                r#"{"type":"object","properties":{}}"#,
            ),
            "options.schema.json: declare option \"name\"",
        ),
        (
            (
                "options.schema.json",
                r#"{"type":"object","properties":{"name":{"type":"string","default":"x"},"n":{"type":"integer","default":9,"maximum":3}}}"#,
            ),
            "options.schema.json: the defaults fail the schema at /n",
        ),
        (
            (
                "options.schema.json",
                r#"{"type":"object","properties":{"name":{"type":7}}}"#,
            ),
            "options.schema.json: not a valid JSON Schema",
        ),
        (
            ("service.toml.j2", "name = {{ options.name \n"),
            "service.toml.j2: line 1: syntax error",
        ),
        (
            ("config/a.conf", "{% if %}"),
            "config/a.conf: line 1: syntax error",
        ),
        (("run.sh", "x"), "run.sh: unknown file"),
    ];
    for ((file, text), want) in cases {
        let e = demo(&[(file, text)]).expect_err(want).to_string();
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}

#[test]
fn rendering_is_strict_and_reaches_config_files() {
    let p = demo(&[
        (
            "service.toml.j2",
            "name = {{ options.name | toml }}\nx = {{ config(\"a.conf\") | toml }}\n",
        ),
        (
            "config/a.conf",
            "svc={{ options.name }} {% raw %}{{ port }}{% endraw %}\n",
        ),
    ])
    .unwrap();
    let o = Options::resolve(&p.schema, &json!({})).unwrap();
    assert_eq!(
        render::render(&p, &o).unwrap(),
        "name = \"demo\"\nx = \"svc=demo {{ port }}\\n\"\n"
    );
    let p = demo(&[("service.toml.j2", "name = {{ options.nmae }}\n")]).unwrap();
    let e = render::render(&p, &o).unwrap_err().to_string();
    assert!(
        e.starts_with("service.toml.j2: line 1: undefined value"),
        "{e}"
    );
    let p = demo(&[("service.toml.j2", "{{ config(\"b.conf\") }}")]).unwrap();
    let e = render::render(&p, &o).unwrap_err().to_string();
    assert!(e.contains("the package has no config/b.conf"), "{e}");
}

#[test]
fn read_repo_refuses_symlinks_and_names_the_bad_package() {
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("demo");
    std::fs::create_dir_all(pkg.join("config")).unwrap();
    for (f, t) in [
        ("package.toml", META),
        ("options.schema.json", SCHEMA),
        ("service.toml.j2", "name = {{ options.name | toml }}\n"),
        ("README.md", "# demo"),
        ("config/a.conf", "x"),
    ] {
        std::fs::write(pkg.join(f), t).unwrap();
    }
    let got = read_repo("mine", dir.path()).unwrap();
    assert_eq!(got[0].meta.name, "demo");
    assert_eq!(got[0].source, "mine");
    assert_eq!(got[0].config["a.conf"], "x");
    std::os::unix::fs::symlink("/etc/passwd", pkg.join("config/b.conf")).unwrap();
    let e = read_repo("mine", dir.path()).unwrap_err().to_string();
    assert!(
        e.ends_with("demo/config/b.conf: not a regular file (symlinks and folders are refused)"),
        "{e}"
    );
}

#[test]
fn catalog_picks_the_newest_version_and_searches() {
    let one = demo(&[]).unwrap();
    let mut two = one.clone();
    two.meta.version = "1.10-1".into();
    two.source = "mine".into();
    let mut c = Catalog::new(vec![one, redis()]);
    c.extend([two]);
    assert_eq!(c.get("demo", None).unwrap().meta.version, "1.10-1");
    assert_eq!(c.get("demo", Some("1.0-1")).unwrap().source, "test");
    assert!(c.get("demo", Some("2")).is_none());
    let names = |q: &str, t: Option<&str>| -> Vec<String> {
        c.search(q, t).iter().map(|p| p.meta.name.clone()).collect()
    };
    assert_eq!(names("", None), ["demo", "redis"]);
    assert_eq!(names("KEY-VALUE", None), ["redis"]);
    assert_eq!(names("", Some("cache")), ["redis"]);
    assert!(names("nothing", None).is_empty());
    use std::cmp::Ordering::*;
    for (a, b, o) in [
        ("1.2", "1.10", Less),
        ("7.0.15-1", "7.0.15-2", Less),
        ("2", "2.0", Less),
        ("1.0", "1.0", Equal),
    ] {
        assert_eq!(catalog::compare_versions(a, b), o, "{a} vs {b}");
    }
}

#[test]
fn agents_list_the_packages_whose_binaries_they_have() {
    let all = crate::bundled().unwrap();
    let have = [
        "/usr/bin/redis-server",
        "/usr/bin/redis-cli",
        "/usr/bin/memcached",
    ];
    assert_eq!(
        crate::runnable(&all, |b| have.contains(&b)),
        ["memcached", "redis"]
    );
    assert!(crate::runnable(&all, |_| false).is_empty());
}
