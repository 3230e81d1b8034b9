//! `cairn install apply|reset --config cluster.toml` (`cairn_installer::install`), with
//! progress on the terminal and a non-zero exit when a phase fails.

use cairn_installer::install::{self, Action, ClusterConfig};
use clap::Subcommand;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum InstallCmd {
    /// Install or update the cluster the file describes (re-running changes nothing; hosts
    /// added to the file are added).
    Apply {
        #[arg(long)]
        config: PathBuf,
        /// Print what would change on each host, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The binary to install (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Replace the binary node by node without stopping tasks: followers, the leader, then
    /// agents, each back before the next.
    Upgrade {
        #[arg(long)]
        config: PathBuf,
        /// The new binary (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Remove Cairn from every host of the file: nodes, tasks, units, binary and data.
    Reset {
        #[arg(long)]
        config: PathBuf,
    },
}

pub async fn run(cmd: InstallCmd) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(100));
    let t = Instant::now();
    match cmd {
        InstallCmd::Apply {
            config,
            dry_run,
            binary,
        } => {
            let cfg = ClusterConfig::load(&config)?;
            let bin = match binary {
                Some(b) => b,
                None => std::env::current_exe()?,
            };
            let r = install::apply(&cfg, &bin, dry_run, &|phase: &str| {
                bar.set_message(phase.to_string())
            })
            .await;
            bar.finish_and_clear();
            let a = r?;
            for n in &a.nodes {
                let what = match (n.action, a.dry_run) {
                    (Action::Unchanged, _) => "unchanged",
                    (Action::Install, true) => "would install",
                    (Action::Install, false) => "installed",
                    (Action::Update, true) => "would update",
                    (Action::Update, false) => "updated",
                };
                println!(
                    "  {:<16} {:<7} {what} ({} service manager)",
                    n.host, n.role, n.manager
                );
            }
            if a.dry_run {
                println!("dry run: nothing was changed");
                return Ok(());
            }
            println!(
                "cluster {} is healthy after {:.1} s",
                cfg.name,
                t.elapsed().as_secs_f64()
            );
            println!("  UI:     {}/ui/  (sign in with the token)", a.url);
            println!("  CA:     {}", a.ca.display());
            println!("  token:  {}", a.token);
            Ok(())
        }
        InstallCmd::Upgrade { config, binary } => {
            let cfg = ClusterConfig::load(&config)?;
            let bin = match binary {
                Some(b) => b,
                None => std::env::current_exe()?,
            };
            let r = install::upgrade(&cfg, &bin, &|phase: &str| {
                bar.set_message(phase.to_string())
            })
            .await;
            bar.finish_and_clear();
            let a = r?;
            for n in &a.nodes {
                println!(
                    "  {:<16} {:<7} upgraded ({} service manager)",
                    n.host, n.role, n.manager
                );
            }
            println!(
                "cluster {} upgraded in {:.1} s",
                cfg.name,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        InstallCmd::Reset { config } => {
            let cfg = ClusterConfig::load(&config)?;
            let r = install::reset(&cfg, &|phase: &str| bar.set_message(phase.to_string()));
            bar.finish_and_clear();
            let n = r?;
            println!(
                "removed Cairn from {n} hosts in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}
