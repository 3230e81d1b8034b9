//! `cairn package ...`: the catalog from the command line — search, describe (options with
//! defaults, README), render (a dry run printing the spec), install (`--options FILE.json`,
//! `--set key=value`, `--wait` following the deploy plan), list, update, history, rollback,
//! uninstall, and `repo add|list|remove` for local folders of packages (uploaded to the
//! cluster).

use crate::client::Client;
use clap::Subcommand;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Where a service's pods listen: `redis-0 server redis=10.0.0.5:31000`, one line per task
/// port (the host is the agent's API host; tasks share the agent's network).
pub async fn endpoints(c: &Client, service: &str) -> anyhow::Result<Vec<String>> {
    let pods = c.get(&format!("/api/v1/services/{service}/pods")).await?;
    let agents = c.get("/api/v1/agents").await?;
    let host = |id: &Value| {
        agents
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| &a["id"] == id)
            .and_then(|a| a["addr"].as_str())
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mut out = Vec::new();
    for p in pods.as_array().into_iter().flatten() {
        for t in p["tasks"].as_array().into_iter().flatten() {
            for port in t["ports"].as_array().into_iter().flatten() {
                out.push(format!(
                    "{} {} {}={}:{}",
                    s(&p["id"]),
                    s(&t["name"]),
                    s(&port["name"]),
                    host(&p["agent"]),
                    s(&port["number"])
                ));
            }
        }
    }
    Ok(out)
}

/// Options given on the command line.
#[derive(clap::Args, Clone, Default)]
pub struct OptionArgs {
    /// A JSON file of options (`{"persistence": {"disk_mb": 512}}`).
    #[arg(long, value_name = "FILE.json")]
    options: Option<PathBuf>,
    /// One option, after --options: `--set replicas=2 --set persistence.aof=false`. The
    /// value is read by the option's type (text for string options, else JSON).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A version of the package (default: the newest; for update: the one installed).
    #[arg(long)]
    version: Option<String>,
}

#[derive(Subcommand)]
pub enum PackageCmd {
    /// Packages whose name, description or tags match QUERY (all without one).
    Search {
        query: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// A package's description, versions, options (with defaults) and README.
    Describe {
        name: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Print the service spec the package renders with these options; changes nothing.
    Render {
        name: String,
        #[command(flatten)]
        opts: OptionArgs,
    },
    /// Install a package as a stateful service.
    Install {
        name: String,
        #[command(flatten)]
        opts: OptionArgs,
        /// Show the deploy plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// Installed packages with their version, options and plans.
    List,
    /// Change an installed package's options (merged over those in use) or version; the
    /// service's deploy plan rolls it out.
    Update {
        /// The service's name.
        service: String,
        #[command(flatten)]
        opts: OptionArgs,
        /// Start from the package's defaults instead of the options in use.
        #[arg(long)]
        reset: bool,
        /// Allow a smaller pod count (its pods and volumes are destroyed).
        #[arg(long)]
        allow_decommission: bool,
        #[arg(long)]
        wait: bool,
    },
    /// The service's versions with the package version and options of each.
    History { service: String },
    /// Go back to the package version and options of an earlier service version (default:
    /// the one before the current), rolled out by the deploy plan.
    Rollback {
        service: String,
        /// The service version (see `cairn package history`).
        #[arg(long)]
        to: Option<u64>,
        #[arg(long)]
        allow_decommission: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Remove an installed package's service and its tasks (and volumes).
    Uninstall {
        service: String,
        #[arg(long)]
        keep_volumes: bool,
    },
    /// Package repos: local folders of packages (DIR/<name>/package.toml) added to the
    /// cluster's catalog.
    Repo {
        #[command(subcommand)]
        cmd: RepoCmd,
    },
}

#[derive(Subcommand)]
pub enum RepoCmd {
    /// Check every package of DIR and upload them; adding a repo again replaces it.
    Add {
        dir: PathBuf,
        /// The repo's name (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Repos and their packages.
    List,
    /// Remove an added repo.
    Remove { name: String },
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The user's options: the file, then each `--set` read by the schema's types.
fn user_options(schema: &Value, o: &OptionArgs) -> anyhow::Result<Value> {
    let mut v = match &o.options {
        None => json!({}),
        Some(f) => {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", f.display()))?
        }
    };
    for a in &o.set {
        cairn_universe::options::set(&mut v, schema, a)
            .map_err(|e| anyhow::anyhow!("--set {a}: {e}"))?;
    }
    Ok(v)
}

async fn describe(c: &Client, name: &str, version: Option<&str>) -> anyhow::Result<Value> {
    let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
    c.get(&format!("/api/v1/packages/{name}{q}")).await
}

/// Options as rows: JSON pointer, type, default, description.
fn option_rows(schema: &Value, at: &str, rows: &mut Vec<[String; 4]>) {
    for (k, sub) in schema["properties"].as_object().into_iter().flatten() {
        let p = format!("{at}/{k}");
        if sub["properties"].is_object() {
            option_rows(sub, &p, rows);
            continue;
        }
        let mut ty = s(&sub["type"]);
        if let Some(e) = sub["enum"].as_array() {
            ty = e.iter().map(s).collect::<Vec<_>>().join("|");
        }
        if sub["minimum"].is_number() || sub["maximum"].is_number() {
            ty += &format!(" {}..{}", s(&sub["minimum"]), s(&sub["maximum"]));
        }
        rows.push([
            p.trim_start_matches('/').replace('/', "."),
            ty,
            s(&sub["default"]),
            s(&sub["description"]),
        ]);
    }
}

pub async fn run(c: &Client, json_out: bool, cmd: PackageCmd) -> anyhow::Result<()> {
    match cmd {
        PackageCmd::Search { query, tag } => {
            let mut q = vec![];
            if let Some(x) = &query {
                q.push(format!("q={x}"));
            }
            if let Some(t) = &tag {
                q.push(format!("tag={t}"));
            }
            let v = c.get(&format!("/api/v1/packages?{}", q.join("&"))).await?;
            if json_out {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["NAME", "VERSION", "SOURCE", "TAGS", "DESCRIPTION"]);
            for p in v.as_array().into_iter().flatten() {
                let tags = p["tags"].as_array().into_iter().flatten().map(s);
                t.add_row([
                    s(&p["name"]),
                    s(&p["version"]),
                    s(&p["source"]),
                    tags.collect::<Vec<_>>().join(", "),
                    s(&p["description"]),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        PackageCmd::Describe { name, version } => {
            let v = describe(c, &name, version.as_deref()).await?;
            if json_out {
                println!("{v:#}");
                return Ok(());
            }
            let versions: Vec<String> = v["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{} ({})", s(&x["version"]), s(&x["source"])))
                .collect();
            println!(
                "{} {} — {}",
                s(&v["name"]),
                s(&v["version"]),
                s(&v["description"])
            );
            println!("versions: {}", versions.join(", "));
            println!(
                "licence: {}  maintainer: {}",
                s(&v["licence"]),
                s(&v["maintainer"])
            );
            println!("requirements: {}\n", v["requirements"]);
            let mut rows = Vec::new();
            option_rows(&v["schema"], "", &mut rows);
            let mut t = comfy_table::Table::new();
            t.set_header(["OPTION", "TYPE", "DEFAULT", "DESCRIPTION"]);
            for r in rows {
                t.add_row(r);
            }
            println!("{t}\n\n{}", s(&v["readme"]));
            Ok(())
        }
        PackageCmd::Render { name, opts } => {
            let d = describe(c, &name, opts.version.as_deref()).await?;
            let body =
                json!({ "options": user_options(&d["schema"], &opts)?, "version": opts.version });
            let v = c
                .post(&format!("/api/v1/packages/{name}/render"), &body)
                .await?;
            if json_out {
                println!("{v:#}");
            } else {
                print!("{}", s(&v["spec"]));
            }
            Ok(())
        }
        PackageCmd::Install { name, opts, wait } => {
            let d = describe(c, &name, opts.version.as_deref()).await?;
            let body =
                json!({ "options": user_options(&d["schema"], &opts)?, "version": opts.version });
            let v = c
                .post(&format!("/api/v1/packages/{name}/install"), &body)
                .await?;
            let svc = s(&v["name"]);
            println!(
                "package {name} {} installed as service {svc} (version {})",
                s(&d["version"]),
                v["version"]
            );
            if wait {
                crate::service_cli::wait_plan(c, &svc, "deploy").await?;
                for e in endpoints(c, &svc).await? {
                    println!("{e}");
                }
            }
            Ok(())
        }
        PackageCmd::List => {
            let v = c.get("/api/v1/packages/installed").await?;
            if json_out {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header([
                "SERVICE", "PACKAGE", "VERSION", "SOURCE", "PLANS", "OPTIONS",
            ]);
            for p in v.as_array().into_iter().flatten() {
                let plans = p["plans"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}: {}", s(v)))
                    .collect::<Vec<_>>()
                    .join(", ");
                t.add_row([
                    s(&p["service"]),
                    s(&p["package"]),
                    s(&p["version"]),
                    s(&p["source"]),
                    plans,
                    p["options"].to_string(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        PackageCmd::Update {
            service,
            opts,
            reset,
            allow_decommission,
            wait,
        } => {
            let installed = c.get("/api/v1/packages/installed").await?;
            let Some(cur) = installed
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["service"] == service.as_str())
            else {
                anyhow::bail!(
                    "no installed package has service {service:?}; see cairn package list"
                );
            };
            let version = opts.version.clone().unwrap_or_else(|| s(&cur["version"]));
            let d = describe(c, &s(&cur["package"]), Some(&version)).await?;
            let body = json!({
                "options": user_options(&d["schema"], &opts)?,
                "version": opts.version,
                "reset": reset,
                "allow_decommission": allow_decommission,
            });
            let v = c
                .put(&format!("/api/v1/packages/installed/{service}"), &body)
                .await?;
            println!(
                "service {service}: package {} {version}, service version {}",
                s(&cur["package"]),
                v["version"]
            );
            if wait {
                crate::service_cli::wait_plan(c, &service, "deploy").await?;
                for e in endpoints(c, &service).await? {
                    println!("{e}");
                }
            }
            Ok(())
        }
        PackageCmd::Uninstall {
            service,
            keep_volumes,
        } => {
            c.delete(&format!(
                "/api/v1/packages/installed/{service}?keep_volumes={keep_volumes}"
            ))
            .await?;
            println!("service {service} uninstalled");
            Ok(())
        }
        PackageCmd::History { service } => {
            let v = c
                .get(&format!("/api/v1/services/{service}/history"))
                .await?;
            if json_out {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["VERSION", "PACKAGE", "OPTIONS"]);
            for h in v.as_array().into_iter().flatten() {
                let p = &h["spec"]["package"];
                let (pkg, opts) = if p.is_object() {
                    (
                        format!("{}@{}", s(&p["name"]), s(&p["version"])),
                        s(&h["spec"]["options"]),
                    )
                } else {
                    ("(hand-written spec)".into(), "-".into())
                };
                t.add_row([s(&h["version"]), pkg, opts]);
            }
            println!("{t}");
            Ok(())
        }
        PackageCmd::Rollback {
            service,
            to,
            allow_decommission,
            wait,
        } => {
            let body = json!({ "to": to, "allow_decommission": allow_decommission });
            let v = c
                .post(
                    &format!("/api/v1/packages/installed/{service}/rollback"),
                    &body,
                )
                .await?;
            println!("service {service} rolled back (version {})", v["version"]);
            if wait {
                crate::service_cli::wait_plan(c, &service, "deploy").await?;
            }
            Ok(())
        }
        PackageCmd::Repo { cmd } => repo(c, json_out, cmd).await,
    }
}

async fn repo(c: &Client, json_out: bool, cmd: RepoCmd) -> anyhow::Result<()> {
    match cmd {
        RepoCmd::Add { dir, name } => {
            let name = match name {
                Some(n) => n,
                None => dir
                    .canonicalize()?
                    .file_name()
                    .map(|f| f.to_string_lossy().to_lowercase())
                    .unwrap_or_default(),
            };
            // Checked here first, so a mistake names the local file.
            let packages = cairn_universe::read_repo(&name, &dir)?;
            let mut body = serde_json::Map::new();
            for p in &packages {
                let folder = dir.join(&p.meta.name);
                let files = cairn_universe::read_files(&folder)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", folder.display()))?;
                let files: serde_json::Map<String, Value> = files
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(String::from_utf8_lossy(&v).into())))
                    .collect();
                body.insert(p.meta.name.clone(), Value::Object(files));
            }
            let v = c
                .put(
                    &format!("/api/v1/packages/repos/{name}"),
                    &json!({ "packages": body }),
                )
                .await?;
            println!("repo {name} added: {}", v["packages"]);
            Ok(())
        }
        RepoCmd::List => {
            let v = c.get("/api/v1/packages/repos").await?;
            if json_out {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["REPO", "PACKAGES"]);
            for r in v.as_array().into_iter().flatten() {
                let ps = r["packages"].as_array().into_iter().flatten().map(s);
                t.add_row([s(&r["name"]), ps.collect::<Vec<_>>().join(", ")]);
            }
            println!("{t}");
            Ok(())
        }
        RepoCmd::Remove { name } => {
            c.delete(&format!("/api/v1/packages/repos/{name}")).await?;
            println!("repo {name} removed");
            Ok(())
        }
    }
}
