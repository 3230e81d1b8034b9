//! A small HTTP client for the master API, and the table printers of the CLI.

use anyhow::Context;
use comfy_table::Table;
use serde_json::Value;

/// Talks to one master with the cluster token.
pub struct Client {
    what: &'static str,
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(master: &str, token: &str) -> anyhow::Result<Self> {
        let base = if master.starts_with("http://") || master.starts_with("https://") {
            master.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", master.trim_end_matches('/'))
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(Self {
            what: "the master at",
            base,
            token: token.to_string(),
            http,
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req.bearer_auth(&self.token).send().await.with_context(|| {
            format!(
                "cannot reach {} {} (set {})",
                self.what,
                self.base,
                if self.what.contains("agent") {
                    "--agent or CAIRN_AGENT"
                } else {
                    "--master or CAIRN_MASTER"
                }
            )
        })?;
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

    /// The same client without the request timeout (uploads of large archives).
    fn http_untimed(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder().build()?)
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
    let base = if agent.starts_with("http") {
        agent.to_string()
    } else {
        format!("http://{agent}")
    };
    let http = reqwest::Client::builder()
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
                format!("cannot reach the agent at {base} (set --agent or CAIRN_AGENT)")
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
