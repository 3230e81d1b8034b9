//! CLI contexts: where a cluster is and its token, kept in `~/.config/cairn/config.toml`
//! (`$XDG_CONFIG_HOME/cairn/config.toml`, mode 0600), written by `cairn dev` and
//! `cairn lab up`, chosen with `cairn context use NAME`. A client command without `--master`
//! / `--token` (or `CAIRN_MASTER` / `CAIRN_TOKEN`) uses the current context, and its CA and
//! admin certificate (`CAIRN_CA`, `CAIRN_CERT`, `CAIRN_KEY`).

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Ctx>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ctx {
    /// The API URL of a master (`https://127.0.0.1:5050`).
    pub master: String,
    pub token: String,
    /// The cluster CA (PEM file) to trust, for `https` masters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// An admin client certificate and key (PEM files), for reading agents' APIs directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

pub fn path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("cairn/config.toml"))
}

pub fn load() -> anyhow::Result<Config> {
    let Some(p) = path() else {
        return Ok(Config::default());
    };
    match std::fs::read_to_string(&p) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn save(c: &Config) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path().context("no $HOME or $XDG_CONFIG_HOME for the CLI's config")?;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = p.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(toml::to_string(c)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// Records `name` and makes it current.
pub fn set_current(name: &str, ctx: Ctx) -> anyhow::Result<()> {
    let mut c = load().unwrap_or_default();
    c.contexts.insert(name.to_string(), ctx);
    c.current = Some(name.to_string());
    save(&c)
}

/// Forgets `name` (and, if it was current, leaves no current context).
pub fn remove(name: &str) -> anyhow::Result<()> {
    let mut c = load().unwrap_or_default();
    if c.contexts.remove(name).is_none() {
        return Ok(());
    }
    if c.current.as_deref() == Some(name) {
        c.current = None;
    }
    save(&c)
}

/// Commands that are clients of a cluster (the rest start one, or are local).
fn is_client_command(args: &[std::ffi::OsString]) -> bool {
    let a1 = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let a2 = args.get(2).and_then(|a| a.to_str()).unwrap_or("");
    match a1 {
        "master" | "dev" | "lab" | "bench" | "context" | "ca" | "install" | "help" | "" => false,
        "agent" => a2 == "list",
        _ => !a1.starts_with('-'),
    }
}

/// Before arguments are parsed: for a client command, the current context supplies
/// `CAIRN_MASTER` and `CAIRN_TOKEN` unless they are set (flags still win over both).
pub fn apply_current(args: &[std::ffi::OsString]) {
    if !is_client_command(args) {
        return;
    }
    let Ok(c) = load() else {
        return;
    };
    let Some(ctx) = c.current.as_ref().and_then(|n| c.contexts.get(n)) else {
        return;
    };
    // Runs first thing in main, before any thread exists.
    if std::env::var_os("CAIRN_MASTER").is_none() {
        std::env::set_var("CAIRN_MASTER", &ctx.master);
    }
    if std::env::var_os("CAIRN_TOKEN").is_none() {
        std::env::set_var("CAIRN_TOKEN", &ctx.token);
    }
    for (var, val) in [
        ("CAIRN_CA", &ctx.ca),
        ("CAIRN_CERT", &ctx.cert),
        ("CAIRN_KEY", &ctx.key),
    ] {
        if let (None, Some(v)) = (std::env::var_os(var), val) {
            std::env::set_var(var, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_commands_take_a_context() {
        let a = |v: &[&str]| -> Vec<std::ffi::OsString> { v.iter().map(|s| (*s).into()).collect() };
        assert!(is_client_command(&a(&["cairn", "ps"])));
        assert!(is_client_command(&a(&["cairn", "service", "list"])));
        assert!(is_client_command(&a(&["cairn", "agent", "list"])));
        assert!(!is_client_command(&a(&[
            "cairn",
            "agent",
            "--masters",
            "x"
        ])));
        assert!(!is_client_command(&a(&["cairn", "master"])));
        assert!(!is_client_command(&a(&["cairn", "dev"])));
        assert!(!is_client_command(&a(&["cairn", "lab", "up"])));
        assert!(!is_client_command(&a(&["cairn", "--help"])));
    }

    #[test]
    fn config_round_trips_and_refuses_unknown_fields() {
        let mut c = Config::default();
        c.contexts.insert(
            "dev".into(),
            Ctx {
                master: "https://127.0.0.1:5050".into(),
                token: "t".into(),
                ca: Some("/x/ca.crt".into()),
                cert: None,
                key: None,
            },
        );
        c.current = Some("dev".into());
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
        assert!(toml::from_str::<Config>("curent = \"x\"").is_err());
    }
}
