//! `apply` and `reset`: the phases of `cairn install` over the pieces of `super`.

use super::*;

/// What one run did to one node.
#[derive(Debug, Clone)]
pub struct Done {
    pub host: String,
    pub role: &'static str,
    pub action: Action,
    pub manager: &'static str,
}

/// What `apply` reports.
#[derive(Debug, Clone)]
pub struct Applied {
    pub nodes: Vec<Done>,
    pub url: String,
    pub token: String,
    pub ca: PathBuf,
    /// The plan only (`--dry-run`): nothing was changed.
    pub dry_run: bool,
}

fn admin_http(cfg: &ClusterConfig) -> Result<reqwest::Client> {
    Ok(pki::admin_client(&cfg.state_dir().join("pki"))?
        .timeout(std::time::Duration::from_secs(10))
        .build()?)
}

/// A GET of the masters' API as JSON, `None` on any failure (the callers poll).
async fn get_json(http: &reqwest::Client, url: String, token: &str) -> Option<serde_json::Value> {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("{what}: not within {secs} s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn make_token(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    role: &str,
    uses: usize,
) -> Result<String> {
    let r = http
        .post(format!("{url}/api/v1/join-tokens"))
        .bearer_auth(token)
        .json(
            &serde_json::json!({"role": role, "ttl": "1h", "max_uses": uses,
                                  "description": "cairn install"}),
        )
        .send()
        .await?;
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("making a {role} join token: {status} {}", v["message"]);
    }
    Ok(v["token"].as_str().context("no token")?.to_string())
}

/// Applies `cfg`: see the module documentation for the phases. `progress` hears each one.
pub async fn apply(
    cfg: &ClusterConfig,
    binary: &Path,
    dry_run: bool,
    progress: &dyn Fn(&str),
) -> Result<Applied> {
    let (ca, mut state) = local_pki(cfg)?;
    let ssh = Ssh::for_cluster(cfg);
    progress("connecting and gathering facts");
    let mut facts = Vec::new();
    for h in &cfg.hosts {
        let f = gather_facts(&ssh, h).with_context(|| format!("connect: {}", h.address))?;
        facts.push((h.clone(), f));
    }
    progress("checking the hosts");
    let fails = check_hosts(&facts);
    if !fails.is_empty() {
        bail!(
            "host checks failed:\n{}",
            fails
                .iter()
                .map(|f| format!("  {}: {}: {}", f.host, f.check, f.message))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let bin = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let sha = sha256_hex(&bin);
    // Master ids: the first run numbers every master; later ones join with the next ids.
    let existing = !state.masters.is_empty();
    let mut next = state.masters.values().max().copied().unwrap_or(0) + 1;
    let mut joining = BTreeSet::new();
    for m in cfg.masters() {
        if !state.masters.contains_key(&m.address) {
            state.masters.insert(m.address.clone(), next);
            next += 1;
            if existing {
                joining.insert(m.address.clone());
            }
        }
    }
    let first = cfg
        .masters()
        .find(|m| !joining.contains(&m.address))
        .context("no master")?
        .address
        .clone();
    let url = format!("https://{first}:{API_PORT}");
    // The plan: each node's action.
    let mut plan: Vec<(usize, NodePlan, Action)> = Vec::new();
    for (i, (h, f)) in facts.iter().enumerate() {
        if h.is("master") {
            let via = format!("{first}:{API_PORT}");
            let join = (joining.contains(&h.address) || state.joined.contains(&h.address))
                .then_some(("", via.as_str()));
            let p = master_plan(cfg, h, &state, &sha, join);
            let a = action(f, "master", applied(&ssh, h, "master").as_deref(), &p);
            plan.push((i, p, a));
        }
        if h.is("agent") {
            let p = agent_plan(cfg, h, &sha, None);
            let a = action(f, "agent", applied(&ssh, h, "agent").as_deref(), &p);
            plan.push((i, p, a));
        }
    }
    let done = |plan: &[(usize, NodePlan, Action)]| -> Vec<Done> {
        plan.iter()
            .map(|(i, p, a)| Done {
                host: facts[*i].0.address.clone(),
                role: p.role,
                action: *a,
                manager: facts[*i].1.service_manager(),
            })
            .collect()
    };
    let ca_path = cfg.state_dir().join("pki").join(pki::CA_CERT);
    if dry_run {
        return Ok(Applied {
            nodes: done(&plan),
            url,
            token: state.token.clone(),
            ca: ca_path,
            dry_run: true,
        });
    }
    save_state(cfg, &state)?;
    progress("uploading the binary");
    for (i, _, a) in &plan {
        let (h, f) = &facts[*i];
        if *a != Action::Unchanged && f.installed_sha != sha {
            ssh.put(
                &h.address,
                &format!("{}/usr/local/bin/cairn", h.r()),
                &bin,
                0o755,
            )?;
            let got = ssh.run(
                &h.address,
                &format!("sha256sum {}/usr/local/bin/cairn | cut -d' ' -f1", h.r()),
            )?;
            if got.trim() != sha {
                bail!(
                    "{}: the uploaded binary's checksum is {}, not {sha}",
                    h.address,
                    got.trim()
                );
            }
        }
    }
    let http = admin_http(cfg)?;
    progress("starting the masters");
    for (i, p, a) in &plan {
        let (h, f) = &facts[*i];
        if p.role != "master" || *a == Action::Unchanged || joining.contains(&h.address) {
            continue;
        }
        // A master that joined by token keeps the certificate it got then.
        let ca = (!state.joined.contains(&h.address)).then_some(&ca);
        write_node(&ssh, h, p, ca)?;
        ssh.run(&h.address, &start_script(p, &h.r(), f.service_manager()))?;
    }
    progress("waiting for a leader");
    let token = state.token.clone();
    wait_for("a leader", 90, || async {
        let v = get_json(&http, format!("{url}/api/v1/cluster"), &token).await?;
        v["leader_id"].as_u64()
    })
    .await?;
    if !joining.is_empty() {
        progress("joining the new masters");
        let t = make_token(&http, &url, &token, "master", joining.len()).await?;
        for (i, p, _) in &plan {
            let (h, f) = &facts[*i];
            if p.role != "master" || !joining.contains(&h.address) {
                continue;
            }
            let p = master_plan(
                cfg,
                h,
                &state,
                &sha,
                Some((&t, &format!("{first}:{API_PORT}"))),
            );
            write_node(&ssh, h, &p, None)?;
            ssh.run(&h.address, &start_script(&p, &h.r(), f.service_manager()))?;
        }
    }
    let agents: Vec<&(usize, NodePlan, Action)> = plan
        .iter()
        .filter(|(_, p, a)| p.role == "agent" && *a != Action::Unchanged)
        .collect();
    if !agents.is_empty() {
        progress("starting the agents (joining with a token)");
        let t = make_token(&http, &url, &token, "agent", agents.len()).await?;
        for (i, _, _) in agents {
            let (h, f) = &facts[*i];
            let p = agent_plan(cfg, h, &sha, Some(&t));
            write_node(&ssh, h, &p, None)?;
            ssh.run(&h.address, &start_script(&p, &h.r(), f.service_manager()))?;
        }
    }
    progress("waiting until every node is in the cluster");
    let want_masters = cfg.masters().count();
    let want_agents: BTreeSet<String> = cfg
        .hosts
        .iter()
        .filter(|h| h.is("agent"))
        .map(|h| format!("{}:{AGENT_PORT}", h.address))
        .collect();
    wait_for("every master and agent", 120, || async {
        let c = get_json(&http, format!("{url}/api/v1/cluster"), &token).await?;
        if c["members"].as_array()?.len() != want_masters || c["leader_id"].as_u64().is_none() {
            return None;
        }
        let a = get_json(&http, format!("{url}/api/v1/agents"), &token).await?;
        let active: BTreeSet<String> = a
            .as_array()?
            .iter()
            .filter(|a| a["status"] == "active")
            .filter_map(|a| a["addr"].as_str().map(str::to_string))
            .collect();
        want_agents.is_subset(&active).then_some(())
    })
    .await?;
    state.joined.extend(joining);
    save_state(cfg, &state)?;
    Ok(Applied {
        nodes: done(&plan),
        url,
        token: state.token.clone(),
        ca: ca_path,
        dry_run: false,
    })
}

/// Removes Cairn from every host of `cfg` (and forgets the cluster's state, keeping the CA).
pub fn reset(cfg: &ClusterConfig, progress: &dyn Fn(&str)) -> Result<usize> {
    let ssh = Ssh::for_cluster(cfg);
    let mut n = 0;
    for h in &cfg.hosts {
        progress(&format!("resetting {}", h.address));
        let f = gather_facts(&ssh, h).with_context(|| format!("connect: {}", h.address))?;
        ssh.run(&h.address, &reset_script(&h.r(), f.service_manager()))?;
        n += 1;
    }
    let _ = std::fs::remove_file(cfg.state_dir().join("state.json"));
    Ok(n)
}

/// Replaces the binary of an installed cluster node by node without stopping tasks:
/// followers first, the leader last, each back in the cluster before the next; then agents
/// one by one, each active again before the next (an agent's stop leaves its tasks running
/// and the new agent re-attaches them).
pub async fn upgrade(
    cfg: &ClusterConfig,
    binary: &Path,
    progress: &dyn Fn(&str),
) -> Result<Applied> {
    let (_, state) = local_pki(cfg)?;
    if state.masters.is_empty() {
        bail!(
            "nothing is installed for cluster {}: run `cairn install apply` first",
            cfg.name
        );
    }
    let ssh = Ssh::for_cluster(cfg);
    progress("connecting and gathering facts");
    let mut facts = BTreeMap::new();
    for h in &cfg.hosts {
        let f = gather_facts(&ssh, h).with_context(|| format!("connect: {}", h.address))?;
        facts.insert(h.address.clone(), f);
    }
    let bin = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let sha = sha256_hex(&bin);
    progress("uploading the binary");
    for h in &cfg.hosts {
        if facts[&h.address].installed_sha != sha {
            // Renamed into place: running nodes keep the file they started from.
            ssh.put(
                &h.address,
                &format!("{}/usr/local/bin/cairn", h.r()),
                &bin,
                0o755,
            )?;
        }
    }
    let http = admin_http(cfg)?;
    let token = state.token.clone();
    let first = cfg.masters().next().context("no master")?.address.clone();
    let cluster = |addr: String| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            get_json(
                &http,
                format!("https://{addr}:{API_PORT}/api/v1/cluster"),
                &token,
            )
            .await
        }
    };
    let leader = wait_for("a leader", 60, || async {
        let v = cluster(first.clone()).await?;
        v["leader_addr"]
            .as_str()
            .map(|a| a.split(':').next().unwrap_or("").to_string())
    })
    .await?;
    let mut masters: Vec<&HostConfig> = cfg.masters().collect();
    // Followers first, the leader last: one leader change at most.
    masters.sort_by_key(|m| m.address == leader);
    let mut nodes = Vec::new();
    let via = format!("{first}:{API_PORT}");
    for m in masters {
        progress(&format!("upgrading master {}", m.address));
        let join = state
            .joined
            .contains(&m.address)
            .then_some(("", via.as_str()));
        let p = master_plan(cfg, m, &state, &sha, join);
        let f = &facts[&m.address];
        write_node(&ssh, m, &p, None)?;
        ssh.run(&m.address, &start_script(&p, &m.r(), f.service_manager()))?;
        let addr = m.address.clone();
        wait_for(&format!("master {addr} back with a leader"), 90, || async {
            let v = cluster(addr.clone()).await?;
            v["leader_id"].as_u64()
        })
        .await?;
        nodes.push(Done {
            host: m.address.clone(),
            role: "master",
            action: Action::Update,
            manager: f.service_manager(),
        });
    }
    for a in cfg.hosts.iter().filter(|h| h.is("agent")) {
        progress(&format!("upgrading agent {}", a.address));
        let p = agent_plan(cfg, a, &sha, None);
        let f = &facts[&a.address];
        write_node(&ssh, a, &p, None)?;
        // The script stops the old agent (waiting for it to exit) before starting the new
        // one, so an answer from the agent's own API is the new process.
        ssh.run(&a.address, &start_script(&p, &a.r(), f.service_manager()))?;
        let own = format!("https://{}:{AGENT_PORT}/api/v1/agent", a.address);
        let want = format!("{}:{AGENT_PORT}", a.address);
        wait_for(
            &format!("agent {} back and active", a.address),
            90,
            || async {
                http.get(&own)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())?;
                let v = get_json(
                    &http,
                    format!("https://{first}:{API_PORT}/api/v1/agents"),
                    &token,
                )
                .await?;
                v.as_array()?
                    .iter()
                    .any(|x| x["addr"] == want.as_str() && x["status"] == "active")
                    .then_some(())
            },
        )
        .await?;
        nodes.push(Done {
            host: a.address.clone(),
            role: "agent",
            action: Action::Update,
            manager: f.service_manager(),
        });
    }
    Ok(Applied {
        nodes,
        url: format!("https://{first}:{API_PORT}"),
        token,
        ca: cfg.state_dir().join("pki").join(pki::CA_CERT),
        dry_run: false,
    })
}
