//! Parsers for the Mesos resource and attribute syntax:
//! `cpus:2;mem:2048;disk:10000;ports:[31000-32000]`, `cpus(prod):4`, `rack:r1;zone:a`.

use crate::model::{AgentResources, PortRange};
use std::collections::BTreeMap;

/// A parse error that names the offending piece and the fix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ParseError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> ParseError {
    ParseError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Parses `--resources`. Unknown resource names are rejected (only cpus, mem, disk, ports).
pub fn parse_resources(text: &str) -> Result<AgentResources, ParseError> {
    let mut out = AgentResources::default();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once(':').ok_or_else(|| {
            err(
                part,
                "expected NAME:VALUE, e.g. cpus:2 or ports:[31000-32000]",
            )
        })?;
        let (name, role) = match name.split_once('(') {
            Some((n, rest)) => {
                let role = rest.strip_suffix(')').ok_or_else(|| {
                    err(
                        part,
                        "a role must be written as NAME(ROLE), e.g. cpus(prod):4",
                    )
                })?;
                if !valid_name(role) {
                    return Err(err(part, "role names use letters, digits, '_', '-', '.'"));
                }
                (n.trim(), Some(role.to_string()))
            }
            None => (name.trim(), None),
        };
        let pool = match role {
            Some(r) => out.reserved.entry(r).or_default(),
            None => &mut out.unreserved,
        };
        let value = value.trim();
        match name {
            "cpus" => {
                let v: f64 = value
                    .parse()
                    .map_err(|_| err(part, "cpus must be a number, e.g. cpus:2.5"))?;
                if !(v.is_finite() && (0.0..=100_000.0).contains(&v)) {
                    return Err(err(part, "cpus must be between 0 and 100000"));
                }
                pool.cpus += v;
            }
            "mem" | "disk" => {
                let v: u64 = value.parse().map_err(|_| {
                    err(
                        part,
                        format!("{name} is a whole number of MiB, e.g. {name}:2048"),
                    )
                })?;
                if name == "mem" {
                    pool.mem += v;
                } else {
                    pool.disk += v;
                }
            }
            "ports" => pool.ports.extend(parse_port_ranges(part, value)?),
            other => {
                return Err(err(
                    part,
                    format!(
                        "unknown resource {other:?}; known resources are cpus, mem, disk, ports"
                    ),
                ))
            }
        }
    }
    Ok(out)
}

fn parse_port_ranges(part: &str, value: &str) -> Result<Vec<PortRange>, ParseError> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| {
            err(
                part,
                "ports are written as [BEGIN-END, ...], e.g. ports:[31000-32000]",
            )
        })?;
    let mut out = Vec::new();
    for r in inner.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (b, e) = r.split_once('-').unwrap_or((r, r));
        let b: u16 = b
            .trim()
            .parse()
            .map_err(|_| err(part, format!("bad port {b:?} (1-65535)")))?;
        let e: u16 = e
            .trim()
            .parse()
            .map_err(|_| err(part, format!("bad port {e:?} (1-65535)")))?;
        if b == 0 || b > e {
            return Err(err(
                part,
                format!("port range {r} must satisfy 1 <= BEGIN <= END"),
            ));
        }
        out.push(PortRange { begin: b, end: e });
    }
    Ok(out)
}

/// Parses `--attributes` (`rack:r1;zone:a`).
pub fn parse_attributes(text: &str) -> Result<BTreeMap<String, String>, ParseError> {
    let mut out = BTreeMap::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once(':')
            .ok_or_else(|| err(part, "expected NAME:VALUE, e.g. rack:r1"))?;
        let (k, v) = (k.trim(), v.trim());
        if !valid_name(k) {
            return Err(err(
                part,
                "attribute names use letters, digits, '_', '-', '.' (max 64)",
            ));
        }
        if v.is_empty() || v.len() > 256 {
            return Err(err(part, "attribute values must be 1 to 256 characters"));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(err(part, format!("attribute {k:?} is given twice")));
        }
    }
    Ok(out)
}

/// Validates resources received over the API (same limits as the parser).
pub fn validate_resources(r: &AgentResources) -> Result<(), ParseError> {
    let pools = std::iter::once(("resources.unreserved".to_string(), &r.unreserved)).chain(
        r.reserved
            .iter()
            .map(|(k, v)| (format!("resources.reserved.{k}"), v)),
    );
    for (field, p) in pools {
        if !(p.cpus.is_finite() && p.cpus >= 0.0 && p.cpus <= 100_000.0) {
            return Err(err(
                &format!("{field}.cpus"),
                "must be between 0 and 100000",
            ));
        }
        if p.ports.iter().any(|pr| pr.begin == 0 || pr.begin > pr.end) {
            return Err(err(
                &format!("{field}.ports"),
                "each range must satisfy 1 <= begin <= end",
            ));
        }
        if p.ports.len() > 1024 {
            return Err(err(&format!("{field}.ports"), "at most 1024 ranges"));
        }
    }
    for role in r.reserved.keys() {
        if !valid_name(role) {
            return Err(err("resources.reserved", format!("bad role name {role:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: &str) {
        let got = match parse_resources(input) {
            Ok(r) => serde_json::to_string(&r).unwrap(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "input {input:?}");
    }

    #[test]
    fn resources_table() {
        check(
            "cpus:2;mem:2048;disk:10000;ports:[31000-32000]",
            r#"{"unreserved":{"cpus":2.0,"mem":2048,"disk":10000,"ports":[{"begin":31000,"end":32000}]},"reserved":{}}"#,
        );
        check(
            "cpus:1;cpus(prod):4;mem(prod):512;ports:[80-80, 31000-31010]",
            r#"{"unreserved":{"cpus":1.0,"mem":0,"disk":0,"ports":[{"begin":80,"end":80},{"begin":31000,"end":31010}]},"reserved":{"prod":{"cpus":4.0,"mem":512,"disk":0,"ports":[]}}}"#,
        );
        check(
            "",
            r#"{"unreserved":{"cpus":0.0,"mem":0,"disk":0,"ports":[]},"reserved":{}}"#,
        );
        check(
            "gpus:1",
            r#"error: gpus:1: unknown resource "gpus"; known resources are cpus, mem, disk, ports"#,
        );
        check(
            "cpus:lots",
            "error: cpus:lots: cpus must be a number, e.g. cpus:2.5",
        );
        check(
            "mem:-1",
            "error: mem:-1: mem is a whole number of MiB, e.g. mem:2048",
        );
        check("ports:31000-32000", "error: ports:31000-32000: ports are written as [BEGIN-END, ...], e.g. ports:[31000-32000]");
        check(
            "ports:[5-4]",
            "error: ports:[5-4]: port range 5-4 must satisfy 1 <= BEGIN <= END",
        );
        check(
            "cpus(prod:4",
            "error: cpus(prod:4: a role must be written as NAME(ROLE), e.g. cpus(prod):4",
        );
        check(
            "cpus",
            "error: cpus: expected NAME:VALUE, e.g. cpus:2 or ports:[31000-32000]",
        );
        check(
            "cpus:inf",
            "error: cpus:inf: cpus must be between 0 and 100000",
        );
    }

    #[test]
    fn attributes_table() {
        assert_eq!(
            parse_attributes("rack:r1;zone:a").unwrap(),
            BTreeMap::from([("rack".into(), "r1".into()), ("zone".into(), "a".into())])
        );
        assert_eq!(
            parse_attributes("rack").unwrap_err().to_string(),
            "rack: expected NAME:VALUE, e.g. rack:r1"
        );
        assert_eq!(
            parse_attributes("rack:a;rack:b").unwrap_err().to_string(),
            "rack:b: attribute \"rack\" is given twice"
        );
        assert!(parse_attributes("r ck:a").is_err());
    }
}
