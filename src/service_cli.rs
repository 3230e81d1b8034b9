//! `cairn service ...`: stateful services from the command line — create (with `--wait`
//! showing plan progress), list, show, update, rm, history, rollback, plans (a tree with
//! statuses and timestamps, `--watch`; continue, interrupt, force-complete, restart) and pods.
//! `wait_plan` is shared with `cairn package install --wait`.

use crate::client::Client;
use clap::Subcommand;
use serde_json::Value;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a stateful service from a spec file (TOML, or JSON if it ends in .json).
    Create {
        file: std::path::PathBuf,
        /// Show the deploy plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// All stateful services with their plans' statuses.
    List,
    /// A service's spec, pods, volumes and plans (JSON).
    Show { name: String },
    /// Change a service's spec; the deploy plan rolls it out.
    Update {
        file: std::path::PathBuf,
        /// Allow a smaller pod count (its pods and volumes are destroyed, highest index first).
        #[arg(long)]
        allow_decommission: bool,
        /// Show the deploy plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a service and kill its tasks.
    Rm {
        name: String,
        /// Keep its volumes (listed as orphaned).
        #[arg(long)]
        keep_volumes: bool,
    },
    /// Every kept version of the spec.
    History { name: String },
    /// Return to an earlier kept spec (default: the previous) through the deploy plan.
    Rollback {
        name: String,
        /// The kept version to return to (see `history`).
        #[arg(long)]
        version: Option<u64>,
        /// Allow a smaller pod count (its pods and volumes are destroyed, highest index first).
        #[arg(long)]
        allow_decommission: bool,
        /// Show the deploy plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// Move the service's failover endpoint (e.g. PostgreSQL's `primary`) to another pod on
    /// purpose: it takes the role, then the other pods follow it (the `failover` plan).
    Switchover {
        name: String,
        /// The pod that takes over, e.g. `postgresql-1`.
        #[arg(long)]
        to: String,
        /// The endpoint (default: the one under the service's `[failover]`).
        #[arg(long)]
        endpoint: Option<String>,
        /// Show the failover plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// Run the service's `backup` plan (packages with data declare one).
    Backup {
        name: String,
        /// Show the plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// Run the service's `restore` plan from a backup (its id, as `backup` printed it).
    Restore {
        name: String,
        #[arg(long)]
        from: String,
        /// Show the plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
    /// Every volume reservation (service, pod, agent, size, status).
    Volumes,
    /// Delete an orphaned volume (kept by `rm --keep-volumes`).
    VolumeRm { id: String },
    /// Plans: show, continue, interrupt, force-complete or restart a step.
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// Pods: list, restart in place, replace.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
}

#[derive(Subcommand)]
pub enum PlanCmd {
    /// A plan tree (every plan without PLAN) with statuses, timestamps and messages.
    Show {
        name: String,
        plan: Option<String>,
        /// Redraw every second.
        #[arg(long)]
        watch: bool,
    },
    /// Undo an interrupt; release a canary gate.
    Continue { name: String, plan: String },
    /// Start no new step until `continue`.
    Interrupt { name: String, plan: String },
    /// Mark a step complete.
    ForceComplete {
        name: String,
        plan: String,
        phase: String,
        step: String,
    },
    /// Run a step again from pending.
    Restart {
        name: String,
        plan: String,
        phase: String,
        step: String,
    },
    /// Start a declared plan (or deploy again).
    Start {
        name: String,
        plan: String,
        /// A parameter of the run, `KEY=VALUE` (its tasks see `CAIRN_PARAM_<KEY>`).
        #[arg(long = "param")]
        params: Vec<String>,
        /// Show the plan's progress; exit non-zero if it errors.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
pub enum PodCmd {
    /// Pods with agent, volumes and task states.
    List { name: String },
    /// Restart a pod's tasks in place (same agent, same volumes).
    Restart { name: String, pod: String },
    /// Replace a pod: a new agent, fresh volumes.
    Replace { name: String, pod: String },
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A Unix ms time as local `HH:MM:SS`.
fn time(v: &Value) -> String {
    v.as_u64()
        .filter(|&ms| ms > 0)
        .map(|ms| {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
            humantime::format_rfc3339_seconds(t).to_string()
        })
        .unwrap_or_else(|| "-".into())
}

async fn send_spec(
    c: &Client,
    method: reqwest::Method,
    path: &str,
    file: &std::path::Path,
) -> anyhow::Result<Value> {
    let body = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let ct = if file.extension().is_some_and(|e| e == "json") {
        "application/json"
    } else {
        "application/toml"
    };
    c.send_raw(method, path, ct, body).await
}

/// The service name a spec file declares (to follow its plan).
fn spec_name(file: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)?;
    let spec = if file.extension().is_some_and(|e| e == "json") {
        cairn_kernel::service::spec::from_json(text.as_bytes())
    } else {
        cairn_kernel::service::spec::from_toml(&text)
    };
    spec.map(|s| s.name)
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", file.display(), e.field, e.message))
}

pub async fn run(c: &Client, json: bool, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create { file, wait } => {
            let v = send_spec(c, reqwest::Method::POST, "/api/v1/services", &file).await?;
            let name = s(&v["name"]);
            println!("service {name} created (version {})", v["version"]);
            if wait {
                wait_plan(c, &name, "deploy").await?;
            }
            Ok(())
        }
        ServiceCmd::Update {
            file,
            allow_decommission,
            wait,
        } => {
            let name = spec_name(&file)?;
            let path = format!("/api/v1/services/{name}?allow_decommission={allow_decommission}");
            let v = send_spec(c, reqwest::Method::PUT, &path, &file).await?;
            println!("service {name} at version {}", v["version"]);
            if wait {
                wait_plan(c, &name, "deploy").await?;
            }
            Ok(())
        }
        ServiceCmd::List => {
            let v = c.get("/api/v1/services").await?;
            if json {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["NAME", "VERSION", "PODS", "PLANS", "UPDATED"]);
            for svc in v.as_array().into_iter().flatten() {
                let plans = svc["plans"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}: {}", s(v)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                t.add_row([
                    s(&svc["name"]),
                    s(&svc["version"]),
                    s(&svc["pods"]),
                    plans,
                    time(&svc["updated_at"]),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        ServiceCmd::Show { name } => {
            println!("{:#}", c.get(&format!("/api/v1/services/{name}")).await?);
            Ok(())
        }
        ServiceCmd::Rm { name, keep_volumes } => {
            c.delete(&format!(
                "/api/v1/services/{name}?keep_volumes={keep_volumes}"
            ))
            .await?;
            println!("service {name} removed");
            Ok(())
        }
        ServiceCmd::History { name } => {
            let v = c.get(&format!("/api/v1/services/{name}/history")).await?;
            if json {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["VERSION", "AT", "POD TYPES"]);
            for h in v.as_array().into_iter().flatten() {
                let types = h["spec"]["pod_types"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{} × {}", s(&p["name"]), p["count"]))
                    .collect::<Vec<_>>()
                    .join(", ");
                t.add_row([s(&h["version"]), time(&h["at"]), types]);
            }
            println!("{t}");
            Ok(())
        }
        ServiceCmd::Rollback {
            name,
            version,
            allow_decommission,
            wait,
        } => {
            let mut path =
                format!("/api/v1/services/{name}/rollback?allow_decommission={allow_decommission}");
            if let Some(v) = version {
                path.push_str(&format!("&version={v}"));
            }
            let v = post(c, &path).await?;
            println!(
                "service {name} rolling back to the spec of version {} (now version {})",
                v["rolled_back_to"], v["version"]
            );
            if wait {
                wait_plan(c, &name, "deploy").await?;
            }
            Ok(())
        }
        ServiceCmd::Switchover {
            name,
            to,
            endpoint,
            wait,
        } => {
            let mut path = format!("/api/v1/services/{name}/switchover?to={to}");
            if let Some(e) = &endpoint {
                path.push_str(&format!("&endpoint={e}"));
            }
            post(c, &path).await?;
            println!(
                "service {name}: {} moves to {to}",
                endpoint.as_deref().unwrap_or("the failover endpoint")
            );
            if wait {
                wait_plan(c, &name, "failover").await?;
            }
            Ok(())
        }
        ServiceCmd::Backup { name, wait } => start_plan(c, &name, "backup", &[], wait).await,
        ServiceCmd::Restore { name, from, wait } => {
            start_plan(c, &name, "restore", &[format!("from={from}")], wait).await
        }
        ServiceCmd::Volumes => {
            let v = c.get("/api/v1/volumes").await?;
            if json {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["ID", "SERVICE", "POD", "AGENT", "SIZE MB", "PATH", "STATUS"]);
            for vol in v.as_array().into_iter().flatten() {
                t.add_row([
                    s(&vol["id"]),
                    s(&vol["service"]),
                    s(&vol["pod"]),
                    s(&vol["agent"]),
                    s(&vol["size_mb"]),
                    s(&vol["path"]),
                    s(&vol["status"]),
                ]);
            }
            println!("{t}");
            Ok(())
        }
        ServiceCmd::VolumeRm { id } => {
            c.delete(&format!("/api/v1/volumes/{id}")).await?;
            println!("volume {id} is being destroyed on its agent");
            Ok(())
        }
        ServiceCmd::Plan { cmd } => plan(c, json, cmd).await,
        ServiceCmd::Pod { cmd } => pod(c, json, cmd).await,
    }
}

async fn post(c: &Client, path: &str) -> anyhow::Result<Value> {
    c.post(path, &Value::Null).await
}

async fn plan(c: &Client, json: bool, cmd: PlanCmd) -> anyhow::Result<()> {
    let base = |name: &str, plan: &str| format!("/api/v1/services/{name}/plans/{plan}");
    match cmd {
        PlanCmd::Show { name, plan, watch } => loop {
            let v = match &plan {
                Some(p) => Value::Array(vec![c.get(&base(&name, p)).await?]),
                None => c.get(&format!("/api/v1/services/{name}/plans")).await?,
            };
            let text = if json {
                format!("{v:#}")
            } else {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(tree)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            println!("{text}");
            if !watch {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
        PlanCmd::Continue { name, plan } => {
            post(c, &format!("{}/continue", base(&name, &plan))).await?;
            println!("{name}/{plan}: continued");
            Ok(())
        }
        PlanCmd::Interrupt { name, plan } => {
            post(c, &format!("{}/interrupt", base(&name, &plan))).await?;
            println!("{name}/{plan}: interrupted");
            Ok(())
        }
        PlanCmd::Start {
            name,
            plan,
            params,
            wait,
        } => start_plan(c, &name, &plan, &params, wait).await,
        PlanCmd::ForceComplete {
            name,
            plan,
            phase,
            step,
        } => {
            let path = format!(
                "{}/force-complete?phase={phase}&step={step}",
                base(&name, &plan)
            );
            post(c, &path).await?;
            println!("{name}/{plan}/{phase}/{step}: force-completed");
            Ok(())
        }
        PlanCmd::Restart {
            name,
            plan,
            phase,
            step,
        } => {
            let path = format!("{}/restart?phase={phase}&step={step}", base(&name, &plan));
            post(c, &path).await?;
            println!("{name}/{plan}/{phase}/{step}: restarted");
            Ok(())
        }
    }
}

/// A plan as a tree: plan, phases, steps, each with status, time and message.
pub fn tree(p: &Value) -> String {
    let mut out = format!(
        "{} ({}) updated {}\n",
        s(&p["name"]),
        s(&p["status"]),
        time(&p["updated_at"])
    );
    let phases = p["phases"].as_array().cloned().unwrap_or_default();
    for (i, ph) in phases.iter().enumerate() {
        let last = i + 1 == phases.len();
        out += &format!(
            "{} {} [{}]\n",
            if last { "└─" } else { "├─" },
            s(&ph["name"]),
            s(&ph["strategy"])
        );
        let steps = ph["steps"].as_array().cloned().unwrap_or_default();
        for (j, st) in steps.iter().enumerate() {
            out += &format!(
                "{}  {} {:<10} {:<9} {}  {}\n",
                if last { " " } else { "│" },
                if j + 1 == steps.len() {
                    "└─"
                } else {
                    "├─"
                },
                s(&st["name"]),
                s(&st["status"]),
                time(&st["updated_at"]),
                s(&st["message"])
            );
        }
    }
    out
}

/// Starts plan `plan` of `name` with `KEY=VALUE` parameters, and with `wait` follows it.
async fn start_plan(
    c: &Client,
    name: &str,
    plan: &str,
    params: &[String],
    wait: bool,
) -> anyhow::Result<()> {
    let mut query = Vec::new();
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--param {p:?}: write KEY=VALUE"))?;
        query.push(format!(
            "{}={}",
            cairn_ui::backend::enc(k),
            cairn_ui::backend::enc(v)
        ));
    }
    let mut path = format!("/api/v1/services/{name}/plans/{plan}/start");
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query.join("&"));
    }
    post(c, &path).await?;
    println!("{name}/{plan}: started");
    if wait {
        wait_plan(c, name, plan).await?;
    }
    Ok(())
}

/// Follows a plan with a progress bar until it completes (Ok) or errors (Err).
pub async fn wait_plan(c: &Client, name: &str, plan: &str) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let p = c
            .get(&format!("/api/v1/services/{name}/plans/{plan}"))
            .await?;
        let steps: Vec<&Value> = p["phases"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|ph| ph["steps"].as_array().into_iter().flatten())
            .collect();
        let done = steps.iter().filter(|s| s["status"] == "complete").count();
        bar.set_length(steps.len() as u64);
        bar.set_position(done as u64);
        let current = steps
            .iter()
            .find(|s| s["status"] != "complete")
            .map(|st| format!("{}: {}", s(&st["name"]), s(&st["message"])))
            .unwrap_or_default();
        bar.set_message(current);
        bar.tick();
        match p["status"].as_str() {
            Some("complete") => {
                bar.finish_with_message(format!("{plan} complete"));
                return Ok(());
            }
            Some("error") => {
                bar.abandon();
                eprint!("{}", tree(&p));
                anyhow::bail!("plan {plan} of {name} is in error");
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

async fn pod(c: &Client, json: bool, cmd: PodCmd) -> anyhow::Result<()> {
    match cmd {
        PodCmd::List { name } => {
            let v = c.get(&format!("/api/v1/services/{name}/pods")).await?;
            if json {
                println!("{v:#}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["POD", "AGENT", "STATUS", "VOLUMES", "TASKS"]);
            for p in v.as_array().into_iter().flatten() {
                let vols = p["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| format!("{} {}MB", s(&v["name"]), v["size_mb"]))
                    .collect::<Vec<_>>()
                    .join(", ");
                let tasks = p["tasks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| {
                        let ready = if k["ready"] == true { " ready" } else { "" };
                        format!("{}: {}{ready}", s(&k["name"]), s(&k["state"]))
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                t.add_row([
                    s(&p["id"]),
                    s(&p["agent"]),
                    s(&p["agent_status"]),
                    vols,
                    tasks,
                ]);
            }
            println!("{t}");
            Ok(())
        }
        PodCmd::Restart { name, pod } => {
            post(c, &format!("/api/v1/services/{name}/pods/{pod}/restart")).await?;
            println!("{name}/{pod}: restarting in place");
            Ok(())
        }
        PodCmd::Replace { name, pod } => {
            post(c, &format!("/api/v1/services/{name}/pods/{pod}/replace")).await?;
            println!("{name}/{pod}: replacing");
            Ok(())
        }
    }
}
