//! TLS on the command line: the `--tls-dir` / `--insecure` choice every node makes at start,
//! an agent joining with a token (`cairn agent --join`), `cairn ca init|issue|hash`,
//! `cairn token create|list|revoke`, and the PKI `cairn dev` makes for itself.

use anyhow::{bail, Context, Result};
use cairn_installer::pki::{self, Ca, JoinToken, Role};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

use crate::client::Client;

#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// The node's TLS directory: ca.crt, node.crt and node.key (and ca.key on masters that
    /// sign joining agents' certificates). Default: <data-dir>/tls.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Plaintext on every port (API, Raft, agents), with a warning: only for tests and
    /// loopback clusters you trust. Without it a node refuses to start with no certificate.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    pub fn dir(&self, data_dir: &Path) -> PathBuf {
        self.tls_dir.clone().unwrap_or_else(|| data_dir.join("tls"))
    }
}

/// Sets this process's transport mode (`cairn_raft::tls::init`) from the flags.
pub fn init_node(args: &TlsArgs, data_dir: &Path) -> Result<()> {
    if args.insecure {
        tracing::warn!(
            "--insecure: no TLS; the API, Raft and agents' traffic is plaintext and any client \
             that knows the token is trusted"
        );
        return cairn_raft::tls::init(None);
    }
    let dir = args.dir(data_dir);
    if !dir.join(pki::NODE_CERT).exists() {
        bail!(
            "no TLS certificate in {}: give this node one (`cairn ca issue`, or the installer), \
             join with `cairn agent --join TOKEN`, or run with --insecure for plaintext",
            dir.display()
        );
    }
    let tls = cairn_raft::tls::NodeTls::load(&dir)?;
    tracing::info!(identity = ?tls.identity, dir = %dir.display(), "TLS on");
    cairn_raft::tls::init(Some(tls))
}

/// Joins the cluster of `masters` with `token`: fetches the CA from a master without
/// trusting the connection, checks its SHA-256 against the token (a wrong hash means another
/// cluster or a man in the middle: nothing is sent), then sends a CSR with the token's
/// secret over a connection that trusts only that CA, and writes the node's TLS directory
/// (with a master token also the CA key). Returns the masters' answer.
pub async fn join(
    token: &str,
    masters: &[String],
    tls_dir: &Path,
    name: &str,
    addresses: &[String],
) -> Result<serde_json::Value> {
    let token = JoinToken::parse(token)?;
    let mut last = None;
    for m in masters {
        match join_one(&token, m, tls_dir, name, addresses).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                // A CA mismatch is final: other masters of a different cluster do not help.
                if e.is::<WrongCa>() {
                    return Err(e);
                }
                tracing::warn!("join via {m}: {e:#}");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--masters is empty")))
}

/// The masters' CA is not the one the token names.
#[derive(Debug)]
struct WrongCa(String);

impl std::fmt::Display for WrongCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongCa {}

async fn join_one(
    token: &JoinToken,
    master: &str,
    tls_dir: &Path,
    name: &str,
    addresses: &[String],
) -> Result<serde_json::Value> {
    let untrusted = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let ca_pem = untrusted
        .get(format!("https://{master}/api/v1/join/ca"))
        .send()
        .await
        .with_context(|| format!("fetching the CA from {master}"))?
        .error_for_status()?
        .text()
        .await?;
    let hash = pki::ca_hash(&ca_pem).context("the master's CA")?;
    if hash != token.ca_hash {
        return Err(WrongCa(format!(
            "the CA at {master} has CA hash {hash}, but the join token expects {}: another \
             cluster, or someone in between; refusing to join",
            token.ca_hash
        ))
        .into());
    }
    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let (csr, key) = pki::make_csr(name)?;
    let r = trusted
        .post(format!("https://{master}/api/v1/join"))
        .json(&serde_json::json!({
            "token": token.to_string(), "name": name, "csr": csr, "addresses": addresses,
        }))
        .send()
        .await
        .with_context(|| format!("joining via {master}"))?;
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{master} refused the join: {status} {}",
            v["message"].as_str().unwrap_or("")
        );
    }
    let cert = v["certificate"]
        .as_str()
        .context("the join answer has no certificate")?;
    pki::write_node(tls_dir, &ca_pem, cert, &key)?;
    if let Some(ca_key) = v["ca_key"].as_str() {
        Ca::from_pem(&ca_pem, ca_key)?.save(tls_dir)?;
    }
    Ok(v)
}

/// A master joining with a master token: its certificate, the CA key and the masters' peer
/// credential (kept in `<data-dir>/peer-token`, 0600, for restarts). Returns the peer
/// credential.
pub async fn join_master(
    token: &str,
    via: &[String],
    tls_dir: &Path,
    data_dir: &Path,
    id: u64,
    addresses: &[String],
) -> Result<String> {
    let saved = data_dir.join("peer-token");
    if !tls_dir.join(pki::NODE_CERT).exists() {
        let v = join(token, via, tls_dir, &id.to_string(), addresses).await?;
        if v["role"] != "master" {
            // Signed as an agent: not something a master can use.
            let _ = std::fs::remove_dir_all(tls_dir);
            bail!(
                "--join-token: that is an agent token; make one with `cairn token create --role \
                 master`"
            );
        }
        let peer = v["peer_token"]
            .as_str()
            .context("the join answer has no peer credential")?;
        std::fs::create_dir_all(data_dir)?;
        pki::write_file(&saved, peer.as_bytes(), 0o600)?;
    }
    std::fs::read_to_string(&saved)
        .map(|s| s.trim().to_string())
        .with_context(|| {
            format!(
                "reading {} (written when this master joined)",
                saved.display()
            )
        })
}

/// After a master that joined by token is serving: asks the masters to add it as a voter
/// (with its master certificate), retrying with backoff until they have.
pub async fn add_self(via: Vec<String>, id: u64, api: String, peer: String) {
    let http = match cairn_raft::tls::client_builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot add this master to the cluster: {e}");
            return;
        }
    };
    let mut backoff = cairn_raft::backoff::Backoff::new(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(5),
    );
    for n in 0.. {
        let m = &via[n % via.len()];
        let r = http
            .post(format!("https://{m}/api/v1/cluster/members"))
            .json(&serde_json::json!({"id": id, "addr": api, "peer": peer}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                tracing::info!("this master ({id}) is now a voter");
                return;
            }
            Ok(r) if r.status().is_client_error() && r.status() != 429 => {
                tracing::error!(
                    "the masters refused to add this master: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
                return;
            }
            Ok(r) => tracing::warn!("adding this master via {m}: {}", r.status()),
            Err(e) => tracing::warn!("adding this master via {m}: {e}"),
        }
        tokio::time::sleep(backoff.next(None)).await;
    }
}

/// The addresses an agent's certificate names: its advertised or listening host, loopback,
/// and the host name.
pub fn node_addresses(host: &str, hostname: &str) -> Vec<String> {
    let mut v = vec![host.to_string()];
    for x in ["127.0.0.1", "localhost", hostname] {
        if !x.is_empty() && !v.iter().any(|y| y == x) {
            v.push(x.to_string());
        }
    }
    v
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Make a cluster CA in DIR (ca.crt, ca.key 0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cluster, shown in the CA's subject.
        #[arg(long, default_value = "cluster")]
        name: String,
    },
    /// Issue a node certificate from the CA in --ca-dir into --out (ca.crt, node.crt,
    /// node.key); with --role master the CA key is copied too, so the master can sign joins.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, value_parser = ["master", "agent", "admin"])]
        role: String,
        /// The node's id (a master's --node-id, an agent's id) or an admin's name.
        #[arg(long)]
        name: String,
        /// An IP or DNS name the node serves on (repeat).
        #[arg(long = "address")]
        addresses: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the SHA-256 of the CA certificate in DIR (what join tokens carry).
    Hash {
        #[arg(long)]
        dir: PathBuf,
    },
}

pub fn ca_cmd(cmd: CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Init { dir, name } => {
            if dir.join(pki::CA_KEY).exists() {
                bail!(
                    "{} already holds a CA; remove it first to make a new one",
                    dir.display()
                );
            }
            let ca = Ca::generate(&name)?;
            ca.save(&dir)?;
            println!("CA written to {} (hash {})", dir.display(), ca.hash()?);
            Ok(())
        }
        CaCmd::Issue {
            ca_dir,
            role,
            name,
            addresses,
            out,
        } => {
            let ca = Ca::load(&ca_dir)?;
            let role = Role::parse(&role)?;
            let (cert, key) = ca.issue(role, &name, &addresses)?;
            pki::write_node(&out, &ca.cert_pem, &cert, &key)?;
            if role == Role::Master {
                ca.save(&out)?;
            }
            println!("{role}:{name} written to {}", out.display());
            Ok(())
        }
        CaCmd::Hash { dir } => {
            let pem = std::fs::read_to_string(dir.join(pki::CA_CERT))
                .with_context(|| format!("reading {}", dir.join(pki::CA_CERT).display()))?;
            println!("{}", pki::ca_hash(&pem)?);
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a join token (for agents, or with --role master for masters); it is shown once.
    Create {
        /// agent, or master (a master token also hands out the CA key and the masters'
        /// Raft credential: keep it like the CA key).
        #[arg(long, default_value = "agent", value_parser = ["agent", "master"])]
        role: String,
        /// How long it is good for (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
        /// How many agents may join with it (0: any number until it expires).
        #[arg(long, default_value_t = 0)]
        max_uses: u32,
    },
    /// Join tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

pub async fn token_cmd(c: &Client, json: bool, cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            role,
            ttl,
            description,
            max_uses,
        } => {
            let v = c
                .post(
                    "/api/v1/join-tokens",
                    &serde_json::json!({"ttl": ttl, "description": description,
                                        "max_uses": max_uses, "role": role}),
                )
                .await?;
            if json {
                println!("{v}");
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
                if role == "master" {
                    eprintln!(
                        "join a master with: cairn master --node-id N --join-token <token> \
                         --join-via HOST:PORT --token <cluster token> --data-dir DIR ..."
                    );
                } else {
                    eprintln!(
                        "join an agent with: cairn agent --join <token> --masters HOST:PORT --data-dir DIR"
                    );
                }
            }
        }
        TokenCmd::List => {
            let v = c.get("/api/v1/join-tokens").await?;
            if json {
                println!("{v}");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.set_header(["ID", "DESCRIPTION", "USES", "EXPIRES", "STATE"]);
            for x in v.as_array().into_iter().flatten() {
                let state = if x["revoked"] == true {
                    "revoked"
                } else if x["usable"] == true {
                    "usable"
                } else {
                    "expired or used up"
                };
                let max = x["max_uses"].as_u64().unwrap_or(0);
                t.add_row([
                    x["id"].as_str().unwrap_or("").to_string(),
                    x["description"].as_str().unwrap_or("").to_string(),
                    if max == 0 {
                        format!("{}", x["uses"])
                    } else {
                        format!("{}/{max}", x["uses"])
                    },
                    until(x["expires"].as_u64().unwrap_or(0)),
                    state.to_string(),
                ]);
            }
            println!("{t}");
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/api/v1/join-tokens/{id}")).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// What `cairn dev` makes in its data dir: a CA, the node's TLS directory (one process runs
/// the master and the agent, so one master certificate serves both), and an admin client
/// certificate for the CLI context.
pub struct DevPki {
    pub tls_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
}

pub fn dev_pki(data_dir: &Path, host: &str) -> Result<DevPki> {
    let pki_dir = data_dir.join("pki");
    let ca = if pki_dir.join(pki::CA_KEY).exists() {
        Ca::load(&pki_dir)?
    } else {
        let ca = Ca::generate("dev")?;
        ca.save(&pki_dir)?;
        ca
    };
    let hostname = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tls_dir = data_dir.join("tls");
    pki::ensure_node(
        &ca,
        &tls_dir,
        Role::Master,
        "1",
        &node_addresses(host, &hostname),
    )?;
    ca.save(&tls_dir)?;
    pki::ensure_admin(&ca, &pki_dir, "dev")?;
    let admin = pki_dir.join(pki::ADMIN_DIR);
    Ok(DevPki {
        tls_dir,
        ca_cert: pki_dir.join(pki::CA_CERT),
        admin_cert: admin.join(pki::NODE_CERT),
        admin_key: admin.join(pki::NODE_KEY),
    })
}

/// "in 23h 59m" or "2h 1m ago" for a Unix-milliseconds time, to the minute.
fn until(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let fmt = |d: u64| {
        let minutes = std::time::Duration::from_secs(d / 60_000 * 60);
        humantime::format_duration(minutes).to_string()
    };
    if ms >= now {
        format!("in {}", fmt(ms - now))
    } else {
        format!("{} ago", fmt(now - ms))
    }
}
