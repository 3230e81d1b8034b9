//! A small HTTP client for the master API, and the table printers of the CLI.

use anyhow::Context;
use comfy_table::Table;
use serde_json::Value;

/// Talks to one master with the cluster token.
pub struct Client {
    what: &'static str,
    pub(crate) base: String,
    pub token: String,
    http: reqwest::Client,
}

/// `URL` as given, or `HOST:PORT` with `https://` when the CLI trusts a cluster CA
/// (`CAIRN_CA`), else `http://`.
pub fn base_url(addr: &str) -> String {
    let addr = addr.trim_end_matches('/');
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else if std::env::var_os("CAIRN_CA").is_some_and(|v| !v.is_empty()) {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// The CLI's HTTP client: trusts the cluster CA of `CAIRN_CA` (a PEM file) and presents the
/// client certificate of `CAIRN_CERT` / `CAIRN_KEY` when set (an admin certificate, for
/// agents' APIs). The current context sets all three.
pub fn user_http() -> anyhow::Result<reqwest::ClientBuilder> {
    let mut b = reqwest::Client::builder();
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(ca) = var("CAIRN_CA") {
        let pem = std::fs::read(&ca).with_context(|| format!("reading CAIRN_CA={ca}"))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("CAIRN_CA={ca} is not a PEM certificate"))?;
        b = b.add_root_certificate(cert);
    }
    if let (Some(cert), Some(key)) = (var("CAIRN_CERT"), var("CAIRN_KEY")) {
        let mut pem = std::fs::read(&cert).with_context(|| format!("reading CAIRN_CERT={cert}"))?;
        pem.extend(std::fs::read(&key).with_context(|| format!("reading CAIRN_KEY={key}"))?);
        b = b.identity(
            reqwest::Identity::from_pem(&pem)
                .with_context(|| format!("CAIRN_CERT={cert} and CAIRN_KEY={key}"))?,
        );
    }
    Ok(b)
}

impl Client {
    pub fn new(master: &str, token: &str) -> anyhow::Result<Self> {
        let base = base_url(master);
        let http = user_http()?
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(Self {
            what: "the master at",
            base,
            token: token.to_string(),
            http,
        })
    }

    /// Sends a request; a `429` (shed before the body was read, so nothing happened) is
    /// retried with capped, jittered backoff honouring `Retry-After`, and so is a `503` of a
    /// read (a write's 503 may still commit, so it is reported instead).
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let mut backoff = cairn_raft::backoff::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(5),
        );
        let idempotent = req
            .try_clone()
            .and_then(|r| r.build().ok())
            .is_some_and(|r| r.method() == reqwest::Method::GET);
        let mut req = req;
        let mut tries = 0;
        let resp = loop {
            let retry = req.try_clone();
            let resp = self.send_once(req).await?;
            let status = resp.status();
            let again = status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || (idempotent && status == reqwest::StatusCode::SERVICE_UNAVAILABLE);
            match retry {
                Some(r) if again && tries < 8 => {
                    tries += 1;
                    let ra = cairn_raft::backoff::retry_after(resp.headers());
                    tokio::time::sleep(backoff.next(ra)).await;
                    req = r;
                }
                _ => break resp,
            }
        };
        self.decode(resp).await
    }

    async fn send_once(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.bearer_auth(&self.token).send().await.map_err(|e| {
            let why = format!("{:#}", anyhow::Error::new(e));
            let hint = if why.contains("certificate") || why.contains("Certificate") {
                "the cluster's CA is not trusted: set CAIRN_CA to its ca.crt (contexts written \
                 by `cairn dev` and `cairn lab up` do this)"
            } else if self.what.contains("agent") {
                "set --agent or CAIRN_AGENT"
            } else {
                "set --master or CAIRN_MASTER"
            };
            anyhow::anyhow!("cannot reach {} {}: {why} ({hint})", self.what, self.base)
        })
    }

    async fn decode(&self, resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let body = resp.bytes().await?;
        if status.is_success() {
            if body.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&body).context("the master answered with invalid JSON");
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let code = v["code"].as_str().unwrap_or("error");
        let msg = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        match v["field"].as_str() {
            Some(f) => anyhow::bail!("{status} {code} (field {f}): {msg}"),
            None => anyhow::bail!("{status} {code}: {msg}"),
        }
    }

    /// A client for an agent's own API.
    pub fn agent(agent: &str, token: &str) -> anyhow::Result<Self> {
        let mut c = Self::new(agent, token)?;
        c.what = "the agent at";
        Ok(c)
    }

    /// The same client without the request timeout (uploads, event streams).
    pub(crate) fn http_untimed(&self) -> anyhow::Result<reqwest::Client> {
        Ok(user_http()?.build()?)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }
    /// A request with a raw body (e.g. a TOML spec) and its content type.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.send(req).await
    }
    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn cluster_status(c: &Client, json: bool) -> anyhow::Result<()> {
    let v = c.get("/api/v1/cluster").await?;
    if json {
        println!("{v:#}");
        return Ok(());
    }
    println!(
        "leader {}  term {}  commit {}  applied {}  (answered by master {}, {})",
        s(&v["leader_id"]),
        s(&v["term"]),
        s(&v["commit_index"]),
        s(&v["applied_index"]),
        s(&v["node_id"]),
        s(&v["state"])
    );
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(["ID", "ADDRESS", "ROLE", "LEADER"]);
    for m in v["members"].as_array().into_iter().flatten() {
        let role = if m["voter"].as_bool() == Some(true) {
            "voter"
        } else {
            "learner"
        };
        let leader = if m["leader"].as_bool() == Some(true) {
            "*"
        } else {
            ""
        };
        t.add_row([
            s(&m["id"]),
            s(&m["addr"]),
            role.to_string(),
            leader.to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn agent_list(c: &Client, json: bool) -> anyhow::Result<()> {
    let v = c.get("/api/v1/agents").await?;
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header([
        "ID",
        "HOSTNAME",
        "ADDRESS",
        "STATUS",
        "CPUS",
        "MEM",
        "ATTRIBUTES",
    ]);
    for a in v.as_array().into_iter().flatten() {
        let attrs = a["attributes"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| format!("{k}:{}", s(v)))
                    .collect::<Vec<_>>()
                    .join(";")
            })
            .unwrap_or_default();
        t.add_row([
            s(&a["id"]),
            s(&a["hostname"]),
            s(&a["addr"]),
            s(&a["status"]),
            s(&a["resources"]["unreserved"]["cpus"]),
            s(&a["resources"]["unreserved"]["mem"]),
            attrs,
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Streams a sandbox file of a task from its agent, following it while the task runs.
pub async fn logs(
    agent: &str,
    token: &str,
    task: &str,
    file: &str,
    follow: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let base = base_url(agent);
    let http = user_http()?
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut offset = 0u64;
    loop {
        let r = http
            .get(format!("{base}/api/v1/tasks/{task}/files"))
            .query(&[
                ("path", file),
                ("offset", &offset.to_string()),
                ("length", "1048576"),
            ])
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| {
                format!("cannot reach {base} (set --master / CAIRN_MASTER, or --agent)")
            })?;
        if !r.status().is_success() {
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            anyhow::bail!("{status}: {}", v["message"].as_str().unwrap_or("error"));
        }
        let bytes = r.bytes().await?;
        offset += bytes.len() as u64;
        std::io::stdout().write_all(&bytes)?;
        std::io::stdout().flush()?;
        if !follow {
            return Ok(());
        }
        if bytes.is_empty() {
            let st: Value = http
                .get(format!("{base}/api/v1/tasks/{task}"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            let state = st["state"].as_str().unwrap_or("");
            if matches!(state, "finished" | "failed" | "killed" | "lost") {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
}

/// Uploads an OCI image-layout archive to an agent, with a progress bar.
pub async fn image_import(
    c: &Client,
    file: &std::path::Path,
    name: Option<&str>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata().await?.len();
    let bar = indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("progress template")
        .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let b = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).inspect(move |c| {
        if let Ok(c) = c {
            b.inc(c.len() as u64);
        }
    });
    let mut req = c
        .http_untimed()?
        .post(format!("{}/api/v1/images", c.base))
        .header("content-length", len)
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(n) = name {
        req = req.query(&[("name", n)]);
    }
    bar.set_message("uploading");
    let v = c.send(req).await;
    bar.finish_and_clear();
    let v = v?;
    for img in v.as_array().into_iter().flatten() {
        println!(
            "imported {} {} ({} layers, {} bytes)",
            s(&img["name"]),
            s(&img["digest"]),
            img["layers"].as_array().map_or(0, |l| l.len()),
            img["size"]
        );
    }
    Ok(())
}

pub async fn image_list(c: &Client, json: bool) -> anyhow::Result<()> {
    let v = c.get("/api/v1/images").await?;
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["NAME", "DIGEST", "LAYERS", "SIZE", "CMD"]);
    for i in v.as_array().into_iter().flatten() {
        let cmd: Vec<String> = i["config"]["entrypoint"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(i["config"]["cmd"].as_array().into_iter().flatten())
            .map(s)
            .collect();
        t.add_row([
            s(&i["name"]),
            s(&i["digest"]).chars().take(19).collect(),
            i["layers"].as_array().map_or(0, |l| l.len()).to_string(),
            s(&i["size"]),
            cmd.join(" "),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Builds the JSON spec of `cairn run` from a spec file, a Wasm file, or a command.
pub fn run_spec(
    file: Option<&std::path::Path>,
    wasm: Option<&str>,
    id: Option<&str>,
    command: &[String],
) -> anyhow::Result<Value> {
    let id = id
        .map(str::to_string)
        .unwrap_or_else(|| format!("run-{}", &uuid_like()[..8]));
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        if f.extension().is_some_and(|e| e == "json") {
            return serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", f.display()));
        }
        // Check locally first: errors name the key in the file.
        cairn_kernel::spec::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let v: toml::Value = toml::from_str(&text)?;
        return Ok(serde_json::to_value(v)?);
    }
    if let Some(w) = wasm {
        let path = std::fs::canonicalize(w).with_context(|| format!("no Wasm file {w}"))?;
        return Ok(serde_json::json!({
            "id": id, "kind": "job",
            "runtime": {"wasm": {"file": path.display().to_string(), "args": command}},
            "resources": {"cpus": 0.1, "mem": 128, "disk": 0}
        }));
    }
    let Some((cmd, args)) = command.split_first() else {
        anyhow::bail!(
            "give a spec file, --wasm FILE, or a command after `--` (cairn run -- echo hi)"
        );
    };
    Ok(serde_json::json!({
        "id": id, "kind": "job",
        "runtime": {"native": {"cmd": cmd, "args": args}},
        "resources": {"cpus": 0.1, "mem": 128, "disk": 0}
    }))
}

fn uuid_like() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..16)
        .map(|_| format!("{:x}", r.gen_range(0..16)))
        .collect()
}

/// Submits a workload and (unless `detach`) waits with a live status line until its tasks run
/// (services, system) or end (jobs); a quick job's output is printed.
pub async fn run(
    c: &Client,
    spec: Value,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let v = c.post("/api/v1/workloads", &spec).await?;
    let id = v["id"].as_str().unwrap_or_default().to_string();
    println!("workload {id} version {}", v["version"]);
    if detach {
        return Ok(());
    }
    let kind = spec["kind"].as_str().unwrap_or("service").to_string();
    let want = spec["instances"].as_u64().unwrap_or(1) as usize;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let w = c.get(&format!("/api/v1/workloads/{id}")).await?;
        let version = w["workload"]["version"].as_u64().unwrap_or(0);
        let tasks: Vec<&Value> = w["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["version"].as_u64() == Some(version))
            .collect();
        let count = |st: &str| tasks.iter().filter(|t| t["state"] == st).count();
        let (running, finished, failed) = (count("running"), count("finished"), count("failed"));
        bar.set_message(format!(
            "{id}: {} placed, {running} running, {finished} finished, {failed} failed",
            tasks.len()
        ));
        let deployment = if matches!(kind.as_str(), "service" | "system") {
            c.get(&format!("/api/v1/deployments/{id}@{version}"))
                .await
                .ok()
        } else {
            None
        };
        if let Some(d) = &deployment {
            bar.set_message(format!(
                "{id}@{version}: {} of {} ready, {}",
                d["ready"],
                if kind == "system" {
                    "all".to_string()
                } else {
                    want.to_string()
                },
                s(&d["deployment"]["state"])
            ));
            match d["deployment"]["state"].as_str() {
                Some("running") | None => {}
                Some("succeeded") => {
                    bar.finish_and_clear();
                    println!("{id}@{version}: deployed, {} ready", d["ready"]);
                    return Ok(());
                }
                Some(other) => {
                    bar.finish_and_clear();
                    anyhow::bail!(
                        "{id}@{version}: {other}: {}",
                        s(&d["deployment"]["message"])
                    );
                }
            }
        }
        let done = match kind.as_str() {
            "job" => finished >= want || (failed > 0 && tasks.iter().all(|t| is_terminal(t))),
            "cron" => true,
            "system" => deployment.is_none() && !tasks.is_empty() && running == tasks.len(),
            _ => deployment.is_none() && running >= want,
        };
        if done {
            bar.finish_and_clear();
            println!("{id}: {running} running, {finished} finished, {failed} failed");
            if kind == "job" {
                print_job_output(c, &tasks).await;
            }
            return if failed > 0 && finished < want {
                Err(anyhow::anyhow!("{id}: the job failed"))
            } else {
                Ok(())
            };
        }
        if std::time::Instant::now() > deadline {
            bar.finish_and_clear();
            anyhow::bail!(
                "{id}: not {} after {timeout:?}; see `cairn ps --workload {id}`",
                if kind == "job" { "done" } else { "running" }
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn is_terminal(t: &Value) -> bool {
    matches!(
        t["state"].as_str(),
        Some("finished" | "failed" | "killed" | "lost")
    )
}

/// Prints the stdout of a job's last task, read from its agent's sandbox.
async fn print_job_output(c: &Client, tasks: &[&Value]) {
    let Some(t) = tasks.iter().max_by_key(|t| t["created_at"].as_u64()) else {
        return;
    };
    let agents = c.get("/api/v1/agents").await.unwrap_or(Value::Null);
    let addr = agents
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"] == t["agent"])
        .and_then(|a| a["addr"].as_str());
    if let (Some(addr), Some(id)) = (addr, t["id"].as_str()) {
        let _ = logs(addr, &c.token, id, "stdout", false).await;
    }
}

pub async fn ps(c: &Client, workload: Option<&str>, all: bool, json: bool) -> anyhow::Result<()> {
    let v = c.get("/api/v1/tasks").await?;
    let of_workload: Vec<&Value> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| workload.is_none_or(|w| t["workload"] == w))
        .collect();
    let tasks: Vec<&Value> = of_workload
        .iter()
        .copied()
        .filter(|t| all || !is_terminal(t))
        .collect();
    let hidden = of_workload.len() - tasks.len();
    if json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "TASK", "WORKLOAD", "VERSION", "AGENT", "STATE", "REASON", "PORTS",
    ]);
    for x in tasks {
        let ports: Vec<String> = x["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}={}", s(&p["name"]), p["number"]))
            .collect();
        t.add_row([
            s(&x["id"]),
            s(&x["workload"]),
            s(&x["version"]),
            s(&x["agent"]).chars().take(12).collect(),
            s(&x["state"]),
            s(&x["reason"]),
            ports.join(","),
        ]);
    }
    println!("{t}");
    if hidden > 0 {
        // On stderr, so scripts reading the table are not confused.
        eprintln!("({hidden} ended tasks hidden; `cairn ps --all` shows them with their reasons)");
    }
    Ok(())
}

pub async fn workload_list(c: &Client, json: bool) -> anyhow::Result<()> {
    let w = c.get("/api/v1/workloads").await?;
    if json {
        println!("{w:#}");
        return Ok(());
    }
    let tasks = c.get("/api/v1/tasks").await?;
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "WORKLOAD",
        "KIND",
        "INSTANCES",
        "RUNNING",
        "VERSION",
        "STATUS",
    ]);
    for x in w.as_array().into_iter().flatten() {
        let running = tasks
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["workload"] == x["id"] && t["state"] == "running")
            .count();
        t.add_row([
            s(&x["id"]),
            s(&x["kind"]),
            if x["kind"] == "system" {
                "per agent".to_string()
            } else {
                s(&x["instances"])
            },
            running.to_string(),
            s(&x["version"]),
            if x["stopped"] == true {
                "stopped"
            } else {
                "active"
            }
            .to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Streams `/api/v1/events` and prints one line per event (or its JSON).
pub async fn events(
    c: &Client,
    topic: Option<&str>,
    index: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut req = c
        .http_untimed()?
        .get(format!("{}/api/v1/events", c.base))
        .bearer_auth(&c.token);
    if let Some(t) = topic {
        req = req.query(&[("topic", t)]);
    }
    if let Some(i) = index {
        req = req.query(&[("index", i)]);
    }
    let r = req
        .send()
        .await
        .with_context(|| format!("cannot reach the master at {}", c.base))?;
    if !r.status().is_success() {
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        anyhow::bail!("{status}: {}", v["message"].as_str().unwrap_or("error"));
    }
    let mut body = r.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            if json {
                println!("{}", data.trim());
                continue;
            }
            let e: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
            println!(
                "{:>8} {:<9} {:<24} {:<12} {}",
                e["index"],
                s(&e["topic"]),
                s(&e["id"]),
                s(&e["kind"]),
                s(&e["detail"])
            );
        }
    }
    Ok(())
}

pub async fn deployments(c: &Client, workload: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = match workload {
        Some(w) => format!("/api/v1/deployments?workload={w}"),
        None => "/api/v1/deployments".to_string(),
    };
    let v = c.get(&path).await?;
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["DEPLOYMENT", "FROM", "STATE", "MESSAGE"]);
    for d in v.as_array().into_iter().flatten() {
        t.add_row([
            s(&d["id"]),
            s(&d["from_version"]),
            s(&d["state"]),
            s(&d["message"]),
        ]);
    }
    println!("{t}");
    Ok(())
}
