use super::*;

fn host(a: &str, roles: &[&str]) -> HostConfig {
    HostConfig {
        address: a.into(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        root: None,
        resources: None,
        attributes: None,
    }
}

fn facts(name: &str, id: &str) -> Facts {
    Facts {
        kernel: "6.1.0".into(),
        hostname: name.into(),
        machine_id: id.into(),
        time: 1000,
        local_time: 1000,
        cgroup: "cgroup2fs".into(),
        pid1: "systemd".into(),
        listening: vec![],
        disk_kb: 10 << 20,
        installed_sha: String::new(),
        running: BTreeSet::new(),
    }
}

#[test]
fn host_checks_name_the_host_and_the_check() {
    let ok = vec![
        (host("10.0.0.1", &["master"]), facts("a", "1")),
        (host("10.0.0.2", &["agent"]), facts("b", "2")),
    ];
    assert!(check_hosts(&ok).is_empty());
    // (change to the second host's facts, expected check)
    type Change = Box<dyn Fn(&mut Facts)>;
    let table: Vec<(Change, &str)> = vec![
        (Box::new(|f| f.hostname = "a".into()), "hostname"),
        (Box::new(|f| f.machine_id = "1".into()), "machine-id"),
        (Box::new(|f| f.time = 1031), "clock"),
        (Box::new(|f| f.time = 969), "clock"),
        (Box::new(|f| f.kernel = "3.10.0".into()), "kernel"),
        (Box::new(|f| f.cgroup = "ext4".into()), "cgroups"),
        (
            Box::new(|f| f.listening = vec!["10.0.0.2:5051".into()]),
            "ports",
        ),
        (
            Box::new(|f| f.listening = vec!["0.0.0.0:5051".into()]),
            "ports",
        ),
        (Box::new(|f| f.disk_kb = 1000), "disk"),
    ];
    for (change, check) in table {
        let mut hosts = ok.clone();
        change(&mut hosts[1].1);
        let fails = check_hosts(&hosts);
        assert_eq!(fails.len(), 1, "{check}: {fails:?}");
        assert_eq!(fails[0].check, check);
        assert_eq!(fails[0].host, "10.0.0.2");
    }
    // A port Cairn itself holds on a re-run is fine; another address's is too.
    let mut hosts = ok.clone();
    hosts[1].1.listening = vec!["10.0.0.2:5051".into(), "127.0.0.1:5050".into()];
    hosts[1].1.running.insert("agent".into());
    assert!(check_hosts(&hosts).is_empty());
}

#[test]
fn configs_are_validated_field_by_field() {
    let parse = |t: &str| -> Result<ClusterConfig> {
        let c: ClusterConfig = toml::from_str(t)?;
        c.validate()?;
        Ok(c)
    };
    let good = "name = \"c\"\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"master\", \"agent\"]\n";
    assert!(parse(good).is_ok());
    for (bad, field) in [
        ("name = \"C!\"\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"master\"]\n", "name"),
        ("name = \"c\"\nhosts = []\n", "hosts"),
        ("name = \"c\"\n[[hosts]]\naddress = \"h1\"\nroles = [\"master\"]\n", "hosts[0].address"),
        ("name = \"c\"\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"boss\"]\n", "hosts[0].roles"),
        ("name = \"c\"\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"agent\"]\n", "masters"),
        ("name = \"c\"\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"master\"]\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"agent\"]\n", "twice"),
        ("name = \"c\"\nsurprise = 1\n", "surprise"),
    ] {
        let e = format!("{:#}", parse(bad).unwrap_err());
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn a_node_is_unchanged_only_when_running_with_the_same_fingerprint() {
    let c: ClusterConfig = toml::from_str(
        "name = \"c\"\n[[hosts]]\naddress = \"10.0.0.1\"\nroles = [\"agent\", \"master\"]\n",
    )
    .unwrap();
    let a1 = agent_plan(&c, &c.hosts[0], "sha1", Some("K10x::a.b"));
    let a2 = agent_plan(&c, &c.hosts[0], "sha1", Some("K10y::c.d"));
    assert_eq!(
        a1.fingerprint, a2.fingerprint,
        "a fresh join token is no change"
    );
    let a3 = agent_plan(&c, &c.hosts[0], "sha2", None);
    assert_ne!(a1.fingerprint, a3.fingerprint, "a new binary is");
    let mut f = facts("a", "1");
    assert_eq!(action(&f, "agent", None, &a1), Action::Install);
    assert_eq!(
        action(&f, "agent", Some(&a1.fingerprint), &a1),
        Action::Update
    );
    f.running.insert("agent".into());
    assert_eq!(
        action(&f, "agent", Some(&a1.fingerprint), &a1),
        Action::Unchanged
    );
    assert_eq!(
        action(&f, "agent", Some(&a3.fingerprint), &a1),
        Action::Update
    );
    let unit = unit_text(&a1, "");
    assert!(
        unit.contains("Delegate=yes") && unit.contains("KillMode=process"),
        "{unit}"
    );
    assert!(unit.contains("Restart=always"));
}
