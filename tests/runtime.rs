//! End-to-end tests of the agent runtime with real kernel features (namespaces, cgroups) and
//! real wasmtime: tasks are launched through a real `cairn agent` process's API.
//! Needs root (namespaces, cgroups); Wasm guests are built by scripts/test.sh.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

struct Agent {
    _dir: tempfile::TempDir,
    lab: cairn_installer::lab::Lab,
    addr: String,
    http: reqwest::Client,
}

async fn agent() -> Agent {
    let (dir, lab) = lab(1, &[]);
    agent_in(dir, lab).await
}

async fn agent_in(dir: tempfile::TempDir, mut lab: cairn_installer::lab::Lab) -> Agent {
    let n = lab.start_agent(&["--heartbeat-interval", "500ms"]).unwrap();
    let addr = lab.agents[n].addr.clone();
    let http = http();
    eventually(Duration::from_secs(20), "agent API up", || {
        let (http, addr) = (http.clone(), addr.clone());
        async move {
            let r = http
                .get(format!("http://{addr}/api/v1/tasks"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    Agent {
        _dir: dir,
        lab,
        addr,
        http,
    }
}

impl Agent {
    async fn launch(&self, spec: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("http://{}/api/v1/tasks", self.addr))
            .bearer_auth(TOKEN)
            .json(&spec)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
    async fn status(&self, id: &str) -> Value {
        self.http
            .get(format!("http://{}/api/v1/tasks/{id}", self.addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    async fn wait_state(&self, id: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("task {id} ends"), || async {
            let s = self.status(id).await;
            matches!(
                s["state"].as_str(),
                Some("finished" | "failed" | "killed" | "lost")
            )
            .then_some(s)
        })
        .await
    }
    async fn file(&self, id: &str, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("http://{}/api/v1/tasks/{id}/files", self.addr))
            .query(&[("path", path)])
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.text().await.unwrap())
    }
    async fn kill(&self, id: &str) {
        let r = self
            .http
            .post(format!("http://{}/api/v1/tasks/{id}/kill", self.addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
}

fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "workload": "test", "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", script]}},
           "resources": {"cpus": 1.0, "mem": 256, "disk": 0}})
}

fn oci(id: &str, script: &str) -> Value {
    json!({"id": id, "workload": "test",
           "runtime": {"oci": {"image": "busybox:latest", "cmd": ["/bin/sh", "-c", script]}},
           "resources": {"cpus": 1.0, "mem": 128, "disk": 0}})
}

/// The busybox test image (tests/images/busybox.sh: umoci + skopeo), built once per run.
fn busybox_tar() -> std::path::PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ONCE.lock().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/test-images/busybox.tar");
    if !out.exists() {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let st = std::process::Command::new(root.join("tests/images/busybox.sh"))
            .arg(&out)
            .status()
            .expect("tests/images/busybox.sh (needs umoci, skopeo, busybox-static: scripts/test.sh installs them)");
        assert!(st.success(), "building the busybox image failed");
    }
    out
}

/// Runs the `cairn` CLI against the agent; returns (success, stdout, stderr).
fn cli(a: &Agent, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(bin())
        .args(args)
        .env("CAIRN_AGENT", &a.addr)
        .env("CAIRN_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn import_busybox(a: &Agent) {
    let tar = busybox_tar();
    let (ok, out, err) = cli(a, &["image", "import", tar.to_str().unwrap()]);
    assert!(ok, "image import failed: {out} {err}");
    assert!(out.contains("imported busybox:latest"), "{out}");
}

fn guest(target: &str, name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/guests/{target}/release/{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh (it builds tests/guests)",
        p.display()
    );
    p.display().to_string()
}

fn wasm(id: &str, target: &str, name: &str, mem: u64) -> Value {
    json!({"id": id, "runtime": {"wasm": {"file": guest(target, name), "args": ["a1", "a2"]}},
           "resources": {"cpus": 1.0, "mem": mem, "disk": 0}, "ports": [{"name": "http", "number": 31005}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_task_is_isolated_logged_and_limited() {
    let a = agent().await;
    // Own PID namespace (the shell is PID 2 under our PID 1), own hostname, private /tmp,
    // environment, stdout and stderr in the sandbox.
    let mut spec = sh(
        "iso",
        // `$$$$`: the agent expands `$VAR` in native args, `$$` being a literal `$`.
        "echo pid=$$$$; hostname; echo env=$CAIRN_TASK_ID/$CAIRN_WORKLOAD/$PORT0/$PORT_WEB; \
         echo procs=$(ls /proc | grep -c '^[0-9]'); touch /tmp/private; echo oops >&2",
    );
    spec["ports"] = json!([{"name": "web", "number": 31001}]);
    let (code, body) = a.launch(spec).await;
    assert_eq!(code, 201, "{body}");
    let st = a.wait_state("iso", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "finished", "{st}");
    let (_, out) = a.file("iso", "stdout").await;
    assert!(
        out.contains("pid=2\n"),
        "not in its own PID namespace: {out}"
    );
    assert!(out.contains("iso\n"), "hostname is not the task id: {out}");
    assert!(out.contains("env=iso/test/31001/31001"), "{out}");
    // The agent's Prometheus metrics count it, and promtool finds them well-formed.
    let m = a
        .http
        .get(format!("http://{}/metrics", a.addr))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(r#"cairn_agent_tasks{runtime="native",state="finished"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"cairn_agent_task_starts_total{result="started",runtime="native"} 1"#),
        "{m}"
    );
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(m.as_bytes());
    assert!(
        check.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let anonymous = a
        .http
        .get(format!("http://{}/metrics", a.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let procs: u32 = out
        .split("procs=")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // PID 1, the shell, the command substitution, ls and grep: nothing of the host.
    assert!(
        procs <= 6,
        "task sees {procs} processes: host processes are visible"
    );
    assert_eq!(a.file("iso", "stderr").await.1, "oops\n");
    assert_eq!(
        a.file("iso", "tmp/private").await.0,
        200,
        "/tmp is the sandbox's tmp"
    );
    assert!(!std::path::Path::new("/tmp/private").exists());

    // Exit codes.
    a.launch(sh("exit7", "exit 7")).await;
    let st = a.wait_state("exit7", Duration::from_secs(20)).await;
    assert_eq!(
        (
            st["state"].as_str(),
            st["exit_code"].as_i64(),
            st["reason"].as_str()
        ),
        (Some("failed"), Some(7), Some("exited"))
    );

    // Zombies are reaped by our PID 1.
    a.launch(sh("zombies", "for i in 1 2 3 4; do (sleep 0.1 &); done; sleep 1; grep -l '^State:.Z' /proc/[0-9]*/status | wc -l")).await;
    a.wait_state("zombies", Duration::from_secs(20)).await;
    assert_eq!(a.file("zombies", "stdout").await.1.trim(), "0");

    // network = "none": only loopback.
    let mut spec = sh(
        "nonet",
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
    );
    spec["network"] = json!("none");
    a.launch(spec).await;
    a.wait_state("nonet", Duration::from_secs(20)).await;
    assert_eq!(a.file("nonet", "stdout").await.1.trim(), "lo");

    // Sandbox file API refuses traversal, absolute paths and symlinks out.
    a.launch(sh(
        "links",
        "ln -s /etc/passwd out; ln -s stdout in; echo hi",
    ))
    .await;
    a.wait_state("links", Duration::from_secs(20)).await;
    for p in ["../../etc/passwd", "/etc/passwd", "out", "tmp/../../x"] {
        assert_eq!(a.file("links", p).await.0, 403, "path {p}");
    }
    assert_eq!(a.file("links", "in").await, (200, "hi\n".into()));
    let _ = &a.lab;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_limits_trigger_and_are_reported() {
    let a = agent().await;
    // Memory: the cgroup limit OOM-kills the task.
    let mut oom = sh("oom", "x=a; while :; do x=$x$x; done");
    oom["resources"]["mem"] = json!(32);
    a.launch(oom).await;
    let st = a.wait_state("oom", Duration::from_secs(60)).await;
    assert_eq!(
        (st["state"].as_str(), st["reason"].as_str()),
        (Some("failed"), Some("oom")),
        "{st}"
    );

    // pids: a fork bomb stays inside its limit. (The shell then execs, so it needs no fork to
    // keep running until it is killed.)
    let mut bomb = sh("bomb", "b() { b | b & }; b; exec sleep 30");
    bomb["pids_max"] = json!(24);
    bomb["kill_grace_ms"] = json!(100);
    a.launch(bomb).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = a.status("bomb").await;
    assert!(
        st["usage"]["pids"].as_u64().unwrap() <= 24,
        "fork bomb escaped its pids limit: {st}"
    );
    a.kill("bomb").await;
    let st = a.wait_state("bomb", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "killed");
    // The host still forks fine.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());

    // CPU: a hog limited to 0.2 cpus gets about 0.2 s of CPU per second.
    let mut hog = sh("hog", "while :; do :; done");
    hog["resources"]["cpus"] = json!(0.2);
    hog["kill_grace_ms"] = json!(100);
    a.launch(hog).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = a.status("hog").await["usage"]["cpu_usec"].as_u64().unwrap();
    a.kill("hog").await;
    assert!(
        used > 100_000 && used < 1_200_000,
        "CPU hog used {used} us in 3 s with cpus=0.2"
    );

    // Sandbox disk: killed with reason disk_limit.
    let mut disk = sh(
        "disk",
        "dd if=/dev/zero of=big bs=1M count=40 2>/dev/null; sleep 30",
    );
    disk["resources"]["disk"] = json!(10);
    disk["kill_grace_ms"] = json!(100);
    a.launch(disk).await;
    let st = a.wait_state("disk", Duration::from_secs(30)).await;
    assert_eq!(
        (st["state"].as_str(), st["reason"].as_str()),
        (Some("failed"), Some("disk_limit")),
        "{st}"
    );

    // Wall-clock timeout for jobs.
    let mut slow = sh("slow", "sleep 30");
    slow["timeout_ms"] = json!(500);
    slow["kill_grace_ms"] = json!(100);
    a.launch(slow).await;
    let st = a.wait_state("slow", Duration::from_secs(20)).await;
    assert_eq!(
        (st["state"].as_str(), st["reason"].as_str()),
        (Some("failed"), Some("timeout")),
        "{st}"
    );

    // Kill: SIGTERM first (the task sees it), SIGKILL after the grace period.
    a.launch(sh(
        "polite",
        "trap 'echo got-term; exit 0' TERM; while :; do sleep 0.1; done",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill("polite").await;
    let st = a.wait_state("polite", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "killed");
    assert!(a.file("polite", "stdout").await.1.contains("got-term"));
    let mut stubborn = sh("stubborn", "trap '' TERM; while :; do sleep 0.1; done");
    stubborn["kill_grace_ms"] = json!(300);
    a.launch(stubborn).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill("stubborn").await;
    let st = a.wait_state("stubborn", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_tasks_survive_an_agent_kill() {
    let mut a = agent().await;
    a.launch(sh(
        "ticker",
        "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done",
    ))
    .await;
    a.launch(sh("quick", "sleep 1; exit 5")).await;
    a.launch(wasm("wasm-spin", "wasm32-wasip1", "spin", 64))
        .await;
    import_busybox(&a);
    let (code, v) = a
        .launch(oci(
            "oci-ticker",
            "i=0; while :; do echo tock $i; i=$((i+1)); sleep 0.1; done",
        ))
        .await;
    assert_eq!(code, 201, "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = a.status("ticker").await["pid"].as_u64().unwrap();
    let oci_pid = a.status("oci-ticker").await["pid"].as_u64().unwrap();
    a.lab.kill_agent(0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.lab.restart_agent(0).unwrap();
    let before = eventually(Duration::from_secs(20), "agent back", || async {
        let r = a
            .http
            .get(format!("http://{}/api/v1/tasks/ticker", a.addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        Some(v)
    })
    .await;
    assert_eq!(before["state"], "running", "{before}");
    assert_eq!(
        before["pid"].as_u64(),
        Some(pid),
        "re-attached to the same process"
    );
    // Its logs keep flowing.
    let n1 = a.file("ticker", "stdout").await.1.len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let n2 = a.file("ticker", "stdout").await.1.len();
    assert!(n2 > n1, "logs stopped after the agent restart");
    // The task that ended while the agent was down is reported with its real status.
    let q = a.wait_state("quick", Duration::from_secs(20)).await;
    assert_eq!(
        (q["state"].as_str(), q["exit_code"].as_i64()),
        (Some("failed"), Some(5)),
        "{q}"
    );
    // Wasm tasks lived in the old agent process.
    let w = a.status("wasm-spin").await;
    assert_eq!(
        (w["state"].as_str(), w["reason"].as_str()),
        (Some("failed"), Some("agent_restart"))
    );
    // So is the container.
    let o = a.status("oci-ticker").await;
    assert_eq!(
        (o["state"].as_str(), o["pid"].as_u64()),
        (Some("running"), Some(oci_pid)),
        "{o}"
    );
    let n1 = a.file("oci-ticker", "stdout").await.1.len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let n2 = a.file("oci-ticker", "stdout").await.1.len();
    assert!(n2 > n1, "container logs stopped after the agent restart");
    a.kill("oci-ticker").await;
    let st = a.wait_state("oci-ticker", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "killed");
    // The re-attached task's exit is still observed.
    a.kill("ticker").await;
    let st = a.wait_state("ticker", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_tasks_run_contained_and_killable() {
    let a = agent().await;
    for (id, target) in [("p1-hello", "wasm32-wasip1"), ("p2-hello", "wasm32-wasip2")] {
        let (code, body) = a.launch(wasm(id, target, "hello", 64)).await;
        assert_eq!(code, 201, "{body}");
        let st = a.wait_state(id, Duration::from_secs(60)).await;
        assert_eq!(st["state"], "finished", "{id}: {st}");
        let out = a.file(id, "stdout").await.1;
        assert!(
            out.contains(r#"hello from wasm args=["a1", "a2"]"#),
            "{id}: {out}"
        );
        assert!(
            out.contains(&format!("task={id}")) && out.contains("port0=31005"),
            "{id}: {out}"
        );
        assert_eq!(a.file(id, "stderr").await.1, "to stderr\n");
        assert_eq!(a.file(id, "written-by-guest.txt").await.1, "guest was here");
    }
    // A tight loop is interrupted promptly.
    a.launch(wasm("spin", "wasm32-wasip1", "spin", 64)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.status("spin").await["state"], "running");
    a.kill("spin").await;
    let st = a.wait_state("spin", Duration::from_secs(5)).await;
    assert_eq!(st["state"], "killed");
    // So is a guest waiting in a host call (an hour-long sleep).
    for (id, target) in [("idle1", "wasm32-wasip1"), ("idle2", "wasm32-wasip2")] {
        a.launch(wasm(id, target, "idle", 64)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.kill(id).await;
        let st = a.wait_state(id, Duration::from_secs(5)).await;
        assert_eq!(st["state"], "killed", "{id}: {st}");
    }
    // CPU: a spinning guest limited to 0.2 cpus costs the agent about 0.2 cores, and its
    // run time is reported.
    let agent_pid = a.lab.agents[0].child.as_ref().unwrap().id();
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{agent_pid}/stat")).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let mut slow = wasm("slow-spin", "wasm32-wasip1", "spin", 64);
    slow["resources"]["cpus"] = json!(0.2);
    a.launch(slow).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (t0, c0) = (std::time::Instant::now(), cpu_ticks());
    tokio::time::sleep(Duration::from_secs(3)).await;
    // clock ticks are 1/100 s on Linux.
    let cores = (cpu_ticks() - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64();
    let st = a.status("slow-spin").await;
    a.kill("slow-spin").await;
    assert!(
        cores < 0.45,
        "a guest limited to 0.2 cpus used {cores:.2} cores"
    );
    let ran = st["usage"]["cpu_usec"].as_u64().unwrap();
    assert!(
        (300_000..1_500_000).contains(&ran),
        "reported {ran} us of run time in 3.5 s at 0.2 cpus: {st}"
    );
    assert!(st["usage"]["memory_bytes"].as_u64().unwrap() > 0, "{st}");
    // A memory bomb traps at its limit.
    for (id, target) in [("bomb1", "wasm32-wasip1"), ("bomb2", "wasm32-wasip2")] {
        a.launch(wasm(id, target, "membomb", 32)).await;
        let st = a.wait_state(id, Duration::from_secs(30)).await;
        assert_eq!(
            (st["state"].as_str(), st["reason"].as_str()),
            (Some("failed"), Some("memory_limit")),
            "{id}: {st}"
        );
    }
    // No files outside the preopened sandbox, no sockets.
    for (id, target) in [("esc1", "wasm32-wasip1"), ("esc2", "wasm32-wasip2")] {
        a.launch(wasm(id, target, "escape", 64)).await;
        let st = a.wait_state(id, Duration::from_secs(30)).await;
        let out = a.file(id, "stdout").await.1;
        assert_eq!(st["state"], "finished", "{id} escaped its sandbox: {out}");
        assert!(out.contains("/etc/shadow: denied"), "{out}");
    }
    // Exit codes.
    a.launch(wasm("exit3", "wasm32-wasip1", "exit3", 64)).await;
    let st = a.wait_state("exit3", Duration::from_secs(30)).await;
    assert_eq!(
        (st["state"].as_str(), st["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    // Bad specs name the field.
    let (code, body) = a
        .launch(json!({"id": "x", "runtime": {"wasm": {"file": "", "args": []}}}))
        .await;
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("runtime.wasm.file"))
    );
    let (code, _) = a
        .launch(wasm("p1-hello", "wasm32-wasip1", "hello", 64))
        .await;
    assert_eq!(code, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_what_the_masters_assign_and_reports_back() {
    let a = agent().await;
    let master = a.lab.masters[0].addr.clone();
    let agent_id = eventually(Duration::from_secs(20), "agent registered", || async {
        let v: Value = a
            .http
            .get(format!("http://{}/api/v1/agent", a.addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (v["registered"] == true).then(|| v["id"].as_str().unwrap().to_string())
    })
    .await;
    let post = |path: &str, body: Value| {
        let (http, url) = (a.http.clone(), format!("http://{master}{path}"));
        async move {
            let r = http
                .post(url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.text().await.unwrap())
        }
    };
    let (s, b) = post(
        "/api/v1/workloads",
        json!({"id": "svc", "kind": "service", "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "while :; do sleep 0.2; done"]}},
               "resources": {"cpus": 0.5, "mem": 64, "disk": 0}, "restart": {"backoff": "200ms"}}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = post(
        "/api/v1/workloads",
        json!({"id": "job", "kind": "job", "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", "echo done"]}}}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let master_state = |id: &'static str| {
        let (http, url) = (a.http.clone(), format!("http://{master}/api/v1/tasks"));
        async move {
            let v: Vec<Value> = http
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v.into_iter()
                .find(|t| t["id"] == id)
                .and_then(|t| t["state"].as_str().map(str::to_string))
        }
    };
    // The leader's scheduler places both on the only agent; the agent long-polls its
    // assignments, starts them, and the masters learn their states.
    eventually(
        Duration::from_secs(20),
        "service running on the masters' view",
        || async { (master_state("svc.0").await.as_deref() == Some("running")).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "job finished on the masters' view",
        || async { (master_state("job.0").await.as_deref() == Some("finished")).then_some(()) },
    )
    .await;
    assert_eq!(a.file("job.0", "stdout").await.1, "done\n");
    // The masters show the running task's usage, read live from its agent.
    eventually(
        Duration::from_secs(10),
        "usage through the masters",
        || async {
            let v: Value = a
                .http
                .get(format!("http://{master}/api/v1/tasks/svc.0"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["usage"]["pids"].as_u64()? >= 1 && v["usage"]["memory_bytes"].as_u64()? > 0)
                .then_some(())
        },
    )
    .await;
    // Killing through the masters: the task leaves the assignments, the agent kills it, and
    // the service is restarted (after its backoff) as a new task.
    assert_eq!(post("/api/v1/tasks/svc.0/kill", json!(null)).await.0, 202);
    eventually(Duration::from_secs(20), "service killed", || async {
        (master_state("svc.0").await.as_deref() == Some("killed")).then_some(())
    })
    .await;
    assert_eq!(a.status("svc.0").await["state"], "killed");
    let all_tasks = || {
        let (http, url) = (a.http.clone(), format!("http://{master}/api/v1/tasks"));
        async move {
            let v: Vec<Value> = http
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(v)
        }
    };
    let restarted = eventually(Duration::from_secs(20), "service restarted", || async {
        all_tasks()
            .await?
            .into_iter()
            .find(|t| t["workload"] == "svc" && t["id"] != "svc.0" && t["state"] == "running")
            .map(|t| t["id"].as_str().unwrap().to_string())
    })
    .await;
    // Stopping the workload kills its tasks; the finished job is not run again.
    assert_eq!(post("/api/v1/workloads/svc/stop", json!(null)).await.0, 200);
    eventually(Duration::from_secs(20), "service stopped", || async {
        let t = all_tasks().await?;
        let st = t.iter().find(|t| t["id"] == restarted.as_str())?;
        (st["state"] == "killed").then_some(())
    })
    .await;
    assert_eq!(master_state("job.1").await, None);
    // The tasks ran on the agent that registered.
    let v: Value = a
        .http
        .get(format!("http://{master}/api/v1/workloads/job"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tasks"][0]["agent"], json!(agent_id), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_busybox_container_is_isolated() {
    let a = agent().await;
    import_busybox(&a);
    let (ok, out, _) = cli(&a, &["image", "list", "--json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "busybox:latest", "{list}");
    assert_eq!(list[0]["layers"].as_array().unwrap().len(), 2, "{list}");

    // The image's own command.
    let (code, v) = a
        .launch(json!({"id": "default-cmd", "runtime": {"oci": {"image": "busybox:latest", "cmd": []}}}))
        .await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("default-cmd", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "finished", "{st}");
    assert_eq!(
        a.file("default-cmd", "stdout").await.1,
        "hello from busybox\n"
    );

    let script = r#"
        echo "pid1=$(tr '\0' ' ' </proc/1/cmdline)"
        echo "me=$$ host=$(hostname)"
        echo "procs=$(ls /proc | grep -cE '^[0-9]+$')"
        echo "motd=$(cat /etc/motd)"
        test -e /etc/doomed && echo doomed-still-there
        test -e /usr/bin/apt && echo host-root-visible
        echo written >/written
        echo "sandbox=$CAIRN_SANDBOX"
        echo data >"$CAIRN_SANDBOX/out"
        (sleep 0.2 &)
        sleep 1
        echo "zombies=$(cat /proc/[0-9]*/stat | grep -c ') Z ')"
    "#;
    let (code, v) = a.launch(oci("box", script)).await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("box", Duration::from_secs(30)).await;
    let out = a.file("box", "stdout").await.1;
    assert_eq!(
        st["state"],
        "finished",
        "{st}\n{out}\n{}",
        a.file("box", "stderr").await.1
    );
    // PID 1 is Cairn's init; the command is its child; no host process is visible.
    assert!(out.contains("pid1=") && out.contains("__pid1"), "{out}");
    assert!(out.contains("me=2 host=box"), "{out}");
    let procs: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs <= 5, "the container sees {procs} processes:\n{out}");
    // Layers applied in order, the whiteout removed the first layer's file, the root is the
    // image's.
    assert!(out.contains("motd=from layer two"), "{out}");
    assert!(!out.contains("doomed-still-there"), "{out}");
    assert!(!out.contains("host-root-visible"), "{out}");
    assert!(out.contains("sandbox=/mnt/sandbox"), "{out}");
    assert_eq!(a.file("box", "out").await, (200, "data\n".into()));
    // The orphaned sleep was reaped by PID 1.
    assert!(out.contains("zombies=0"), "{out}");

    // Each container writes to its own layer: the next one does not see /written.
    a.launch(oci("box2", "test -e /written && echo leaked; echo done"))
        .await;
    a.wait_state("box2", Duration::from_secs(20)).await;
    assert_eq!(a.file("box2", "stdout").await.1, "done\n");

    // An image in use cannot be removed; a missing one is a clear start error.
    a.launch(oci("holder", "sleep 30")).await;
    let (ok, _, err) = cli(&a, &["image", "rm", "busybox:latest"]);
    assert!(!ok && err.contains("image_in_use"), "{err}");
    let mut missing = oci("missing", "true");
    missing["runtime"]["oci"]["image"] = json!("nope:1");
    let (code, v) = a.launch(missing).await;
    assert_eq!(code, 422, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cairn image import"),
        "{v}"
    );
    a.kill("holder").await;
    a.wait_state("holder", Duration::from_secs(20)).await;
    let (ok, out, err) = cli(&a, &["image", "rm", "busybox:latest"]);
    assert!(ok, "{out} {err}");
    let (_, out, _) = cli(&a, &["image", "list", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
    // A broken archive is refused with a clear error.
    let bad = a._dir.path().join("bad.tar");
    std::fs::write(&bad, b"not a tar").unwrap();
    let (ok, _, err) = cli(&a, &["image", "import", bad.to_str().unwrap()]);
    assert!(
        !ok && err.contains("not an OCI image layout archive"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_http_component_serves_its_port() {
    let a = agent().await;
    let port = cairn_installer::lab::free_port();
    let spec = json!({"id": "web", "runtime": {"wasm": {"file": guest("wasm32-wasip2", "http_hello"), "args": []}},
                      "resources": {"cpus": 1.0, "mem": 64, "disk": 0},
                      "ports": [{"name": "http", "number": port}]});
    let (code, v) = a.launch(spec.clone()).await;
    assert_eq!(code, 201, "{v}");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let body = eventually(Duration::from_secs(10), "wasm HTTP answers", || async {
        let r = http.get(format!("{url}/hi?x=1")).send().await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    })
    .await;
    assert_eq!(body, "hello from wasm GET /hi?x=1 task=web");
    // A body goes through; many requests each get a fresh instance.
    for i in 0..50 {
        let r = http
            .post(format!("{url}/echo"))
            .body(format!("n{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.text().await.unwrap(),
            format!("hello from wasm POST /echo task=web body=n{i}")
        );
    }
    // No outgoing HTTP without the network grant.
    let r = http.get(format!("{url}/fetch")).send().await.unwrap();
    assert!(r.text().await.unwrap().ends_with("fetch=denied"));
    // A request spinning in the guest is stopped when the task is killed.
    let spinning = tokio::spawn({
        let http = http.clone();
        let url = url.clone();
        async move { http.get(format!("{url}/spin")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.status("web").await["state"], "running");
    a.kill("web").await;
    let st = a.wait_state("web", Duration::from_secs(10)).await;
    assert_eq!(st["state"], "killed", "{st}");
    let r = spinning.await.unwrap();
    assert!(
        r.is_err() || r.unwrap().status() == 500,
        "a spinning request outlived its task"
    );
    eventually(Duration::from_secs(10), "port closed", || async {
        http.get(&url).send().await.is_err().then_some(())
    })
    .await;
    // An HTTP component needs a port.
    let mut noport = spec.clone();
    noport["id"] = json!("noport");
    noport["ports"] = json!([]);
    let (code, v) = a.launch(noport).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("ports"), "{v}");
}

/// Issue 13 (first run): with the data dir under /tmp (as `cairn dev` used to default to), a
/// native task's private /tmp hid its own sandbox path, so `cd $CAIRN_SANDBOX` failed. The
/// sandbox is mounted back at its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_reaches_its_sandbox_by_path_when_the_data_dir_is_under_tmp() {
    allow_test_guests();
    let dir = tempfile::Builder::new()
        .prefix("cairn-tmp-")
        .tempdir_in("/tmp")
        .unwrap();
    let lab = cairn_installer::lab::Lab::start(bin(), dir.path(), 1, TOKEN, &[]).unwrap();
    let a = agent_in(dir, lab).await;
    let script = r#"cd "$CAIRN_SANDBOX" && test -e stdout && echo here > by-path && echo private > /tmp/t && test ! -e "$CAIRN_SANDBOX/t""#;
    let (code, v) = a.launch(sh("tmpdir", script)).await;
    assert!(code < 300, "{v}");
    let s = a.wait_state("tmpdir", Duration::from_secs(30)).await;
    assert_eq!(
        s["state"],
        "finished",
        "{s} {:?}",
        a.file("tmpdir", "stderr").await
    );
    assert_eq!(
        a.file("tmpdir", "by-path").await,
        (200, "here\n".to_string())
    );
}

/// Runs a command with `input` on its stdin and collects its output.
trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// A persistent volume is mounted at its path in OCI tasks (under `/mnt/sandbox`) and native
/// ones, its rendered files are written into it, and its data outlives the tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_is_shared_by_oci_and_native_tasks_and_outlives_them() {
    let a = agent().await;
    import_busybox(&a);
    let vol = json!([{"id": "t.p-0.data.0", "path": "data", "size_mb": 8}]);
    let mut spec = oci(
        "oci-vol",
        "cat /mnt/sandbox/data/conf > /mnt/sandbox/data/seen && echo oci >> /mnt/sandbox/data/log",
    );
    spec["volumes"] = vol.clone();
    spec["files"] = json!([{"path": "data/conf", "content": "rendered\n"}]);
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let s = a.wait_state("oci-vol", Duration::from_secs(30)).await;
    assert_eq!(
        s["state"],
        "finished",
        "{s} {:?}",
        a.file("oci-vol", "stderr").await
    );
    let mut spec = sh("native-vol", "echo native >> data/log; cat data/log");
    spec["volumes"] = vol;
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let s = a.wait_state("native-vol", Duration::from_secs(30)).await;
    assert_eq!(s["state"], "finished", "{s}");
    assert_eq!(a.file("native-vol", "stdout").await.1, "oci\nnative\n");
    let dir = a.lab.agents[0].data_dir.join("volumes/t.p-0.data.0");
    assert_eq!(
        std::fs::read_to_string(dir.join("seen")).unwrap(),
        "rendered\n"
    );
    // The volume is not in the sandbox on the host: nothing to lose with it.
    let (_, listing) = a.file("native-vol", "data/log").await;
    assert!(!listing.contains("native"), "{listing}");
}
