//! Update validators: a new spec for a running stateful service is refused when it would lose
//! data — a pod type removed, a volume's path or size changed or a volume removed, or pods
//! decommissioned without `allow_decommission` — each error naming the field of the new spec.

use super::model::StatefulService;
use crate::spec::SpecError;

fn err(field: String, message: String) -> Result<(), SpecError> {
    Err(SpecError { field, message })
}

/// Checks that going from `old` to `new` loses no data. With `allow_decommission`, pod
/// counts may go down (the `decommission` plan then destroys the highest-index pods' volumes).
pub fn check_update(
    old: &StatefulService,
    new: &StatefulService,
    allow_decommission: bool,
) -> Result<(), SpecError> {
    if old.name != new.name {
        return err(
            "name".into(),
            format!("the service is {:?}; a new name is a new service", old.name),
        );
    }
    for o in &old.pod_types {
        let Some((i, n)) = new
            .pod_types
            .iter()
            .enumerate()
            .find(|(_, n)| n.name == o.name)
        else {
            return err(
                "pod_types".into(),
                format!(
                    "pod type {:?} is missing: removing it would destroy its pods' volumes; scale it to 0 with allow_decommission first",
                    o.name
                ),
            );
        };
        let at = format!("pod_types[{i}]");
        if n.count < o.count && !allow_decommission {
            return err(
                format!("{at}.count"),
                format!(
                    "{} → {} would decommission {} pod(s) and destroy their volumes; pass allow_decommission (--allow-decommission) to do it",
                    o.count,
                    n.count,
                    o.count - n.count
                ),
            );
        }
        for ov in &o.volumes {
            let Some((j, nv)) = n
                .volumes
                .iter()
                .enumerate()
                .find(|(_, v)| v.name == ov.name)
            else {
                return err(
                    format!("{at}.volumes"),
                    format!(
                        "volume {:?} is missing: removing a volume destroys its data",
                        ov.name
                    ),
                );
            };
            if nv.path != ov.path {
                return err(
                    format!("{at}.volumes[{j}].path"),
                    format!(
                        "volume {:?} is mounted at {:?}; moving it is not supported (its data would not follow)",
                        ov.name, ov.path
                    ),
                );
            }
            if nv.size_mb != ov.size_mb {
                return err(
                    format!("{at}.volumes[{j}].size_mb"),
                    format!(
                        "volume {:?} has {} MiB reserved on its agent; resizing is not supported",
                        ov.name, ov.size_mb
                    ),
                );
            }
        }
        if let Some((j, nv)) = n
            .volumes
            .iter()
            .enumerate()
            .find(|(_, v)| !o.volumes.iter().any(|ov| ov.name == v.name))
        {
            return err(
                format!("{at}.volumes[{j}]"),
                format!(
                    "new volume {:?}: existing pods cannot gain a volume in place; add a new pod type instead",
                    nv.name
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::spec::from_toml;

    fn svc(text: &str) -> StatefulService {
        from_toml(text).unwrap().validate().unwrap()
    }

    const OLD: &str = r#"
name = "db"
[[pod_types]]
name = "node"
count = 3
volumes = [{ name = "data", path = "data", size_mb = 100 }]
tasks = [{ name = "server", runtime.native = { cmd = "/bin/db" } }]
[[pod_types]]
name = "proxy"
tasks = [{ name = "proxy", runtime.native = { cmd = "/bin/proxy" } }]
"#;

    #[test]
    fn updates_that_lose_data_are_refused() {
        let old = svc(OLD);
        let vol = r#"volumes = [{ name = "data", path = "data", size_mb = 100 }]"#;
        // (change to OLD, allow_decommission, expected "field: message" prefix or "ok")
        let cases: &[(&str, &str, bool, &str)] = &[
            ("count = 3", "count = 5", false, "ok"),
            ("/bin/db", "/bin/db2", false, "ok"),
            (
                "count = 3",
                "count = 2",
                false,
                "pod_types[0].count: 3 → 2 would decommission 1 pod(s)",
            ),
            ("count = 3", "count = 2", true, "ok"),
            (
                vol,
                r#"volumes = [{ name = "data", path = "db", size_mb = 100 }]"#,
                false,
                "pod_types[0].volumes[0].path: volume \"data\" is mounted at \"data\"",
            ),
            (
                vol,
                r#"volumes = [{ name = "data", path = "data", size_mb = 200 }]"#,
                true,
                "pod_types[0].volumes[0].size_mb: volume \"data\" has 100 MiB",
            ),
            (
                vol,
                "",
                true,
                "pod_types[0].volumes: volume \"data\" is missing",
            ),
            (
                vol,
                r#"volumes = [{ name = "data", path = "data", size_mb = 100 }, { name = "wal", path = "wal", size_mb = 1 }]"#,
                false,
                "pod_types[0].volumes[1]: new volume \"wal\"",
            ),
            (
                "name = \"db\"",
                "name = \"db2\"",
                true,
                "name: the service is \"db\"",
            ),
        ];
        for (from, to, allow, want) in cases {
            assert!(OLD.contains(from));
            let new = svc(&OLD.replacen(from, to, 1));
            let got = match check_update(&old, &new, *allow) {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            };
            assert!(got.starts_with(want), "{to:?} allow={allow}: {got}");
        }
        let without_proxy = svc(OLD.split("[[pod_types]]\nname = \"proxy\"").next().unwrap());
        let e = check_update(&old, &without_proxy, true).unwrap_err();
        assert_eq!(e.field, "pod_types");
        assert!(
            e.message.starts_with("pod type \"proxy\" is missing"),
            "{e}"
        );
    }
}
