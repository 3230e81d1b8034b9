//! End-to-end regression tests for the task-escape holes of issue 14 that live in the agent
//! runtime: a task (native, OCI or Wasm) must not make the root agent write, read or signal
//! anything outside the task. Each test failed on the code before the fix.
//! Needs root (namespaces, cgroups); Wasm guests are built by scripts/test.sh.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Agent {
    dir: tempfile::TempDir,
    _lab: cairn_installer::lab::Lab,
    addr: String,
    data_dir: PathBuf,
    http: reqwest::Client,
    /// An agent started by the test itself (not by the lab), killed on drop.
    own: Option<std::process::Child>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.own.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_up(http: &reqwest::Client, addr: &str) {
    eventually(Duration::from_secs(20), "agent API up", || {
        let (http, addr) = (http.clone(), addr.to_string());
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
}

async fn agent() -> Agent {
    let (dir, mut lab) = lab(1, &[]);
    let n = lab.start_agent(&["--heartbeat-interval", "500ms"]).unwrap();
    let addr = lab.agents[n].addr.clone();
    let data_dir = lab.agents[n].data_dir.clone();
    let http = http();
    wait_up(&http, &addr).await;
    Agent {
        dir,
        _lab: lab,
        addr,
        data_dir,
        http,
        own: None,
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
    async fn wait_running(&self, id: &str) {
        eventually(
            Duration::from_secs(10),
            &format!("{id} running"),
            || async { (self.status(id).await["state"] == "running").then_some(()) },
        )
        .await;
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
    fn sandbox(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }
}

fn sh(id: &str, script: &str) -> Value {
    json!({"id": id, "workload": "test", "runtime": {"native": {"cmd": "/bin/sh", "args": ["-c", script]}},
           "resources": {"cpus": 1.0, "mem": 256, "disk": 0}, "kill_grace_ms": 1000})
}

fn guest(target: &str, name: &str) -> String {
    let p = guests_dir().join(format!("{target}/release/{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: build the test guests (scripts/test.sh)",
        p.display()
    );
    p.display().to_string()
}

fn wasm(id: &str, file: &str, args: &[&str]) -> Value {
    json!({"id": id, "runtime": {"wasm": {"file": file, "args": args}},
           "resources": {"cpus": 1.0, "mem": 64, "disk": 0}})
}

/// Hole 1: a Wasm guest replaces its `stdout`/`stderr` with symlinks leading out of the
/// sandbox and prints; the agent (root) used to open them by path and write through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_guest_cannot_write_host_files_through_its_logs() {
    let a = agent().await;
    // From DATA_DIR/sandboxes/<id>, "../../victim" is DATA_DIR/victim.
    let victim = a.data_dir.join("victim");
    for (id, target) in [("swap1", "wasm32-wasip1"), ("swap2", "wasm32-wasip2")] {
        let (code, v) = a
            .launch(wasm(id, &guest(target, "logswap"), &["../../victim"]))
            .await;
        assert_eq!(code, 201, "{v}");
        let st = a.wait_state(id, Duration::from_secs(20)).await;
        assert_eq!(st["state"], "finished", "{id}: {st}");
        // The guest did make its symlinks (so the attack was really tried).
        let link = std::fs::read_link(a.sandbox(id).join("stdout")).unwrap();
        assert_eq!(link, Path::new("../../victim"));
        assert!(
            !victim.exists(),
            "{id}: the agent wrote through the guest's symlink"
        );
    }
    // An HTTP component reopens its logs on every request.
    let port = cairn_installer::lab::free_port();
    let mut spec = wasm("swaphttp", &guest("wasm32-wasip2", "http_hello"), &[]);
    spec["ports"] = json!([{"name": "http", "number": port}]);
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let url = format!("http://127.0.0.1:{port}");
    let body = eventually(Duration::from_secs(10), "wasm HTTP answers", || async {
        let r = a
            .http
            .get(format!("{url}/logswap?../../victim"))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    })
    .await;
    assert!(body.starts_with("hello from wasm"), "{body}");
    let _ = a.http.get(format!("{url}/again")).send().await;
    assert!(
        !victim.exists(),
        "http: the agent wrote through the guest's symlink"
    );
    a.kill("swaphttp").await;
}

/// Hole 2: host-side writes inside the sandbox (the supervisor's `exit.tmp`/`exit.json`)
/// followed a `.cairn` symlink the task planted; the files API followed symlinks between
/// its check and its open, and blocked on a FIFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_side_opens_do_not_follow_task_symlinks() {
    let a = agent().await;
    let victim = a.dir.path().join("victim-dir");
    std::fs::create_dir_all(&victim).unwrap();
    let script = format!(
        "mv .cairn .cairn-moved && ln -s {v} .cairn && \
         ln -s /etc/shadow shadow && ln -s / root && mkfifo fifo && \
         echo ready && exec sleep 1",
        v = victim.display()
    );
    let (code, v) = a.launch(sh("swapper", &script)).await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("swapper", Duration::from_secs(20)).await;
    assert!(
        std::fs::read_dir(&victim).unwrap().next().is_none(),
        "the supervisor or PID 1 wrote into {} through .cairn: {st}",
        victim.display()
    );
    // The supervisor still recorded the exit, in the directory it opened at the start.
    assert!(a.sandbox("swapper").join(".cairn-moved/exit.json").exists());
    // The files API: symlinks out are refused, a FIFO is refused at once, logs still read.
    assert_eq!(a.file("swapper", "stdout").await, (200, "ready\n".into()));
    for p in ["shadow", "root/etc/passwd", ".cairn/x"] {
        let (code, body) = a.file("swapper", p).await;
        assert!(code == 403 || code == 404, "{p}: {code} {body}");
        assert!(!body.contains("root:"), "{p}: {body}");
    }
    let fifo = tokio::time::timeout(Duration::from_secs(5), a.file("swapper", "fifo"))
        .await
        .expect("reading a FIFO through the files API blocked");
    assert_eq!(fifo.0, 400, "{fifo:?}");
    assert!(fifo.1.contains("not a regular file"), "{fifo:?}");
    // The agent is fine afterwards.
    let (code, v) = a.launch(sh("after", "echo ok")).await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(
        a.wait_state("after", Duration::from_secs(20)).await["state"],
        "finished"
    );
}

/// Hole 3: the agent read the task-writable `.cairn/pid1` and signalled that pid as root.
/// A task writing another process's pid there must not get that process killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_written_by_the_task_is_never_signalled() {
    let a = agent().await;
    let mut decoy = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let script = format!(
        "echo {} > .cairn/pid1; trap 'exit 0' TERM; echo started; while :; do sleep 0.1; done",
        decoy.id()
    );
    let (code, v) = a.launch(sh("liar", &script)).await;
    assert_eq!(code, 201, "{v}");
    a.wait_running("liar").await;
    eventually(
        Duration::from_secs(10),
        "task wrote its pid file",
        || async { (a.file("liar", "stdout").await.1 == "started\n").then_some(()) },
    )
    .await;
    a.kill("liar").await;
    let st = a.wait_state("liar", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "killed", "{st}");
    // SIGTERM reached the task itself (through its supervisor): it exited 0 from its trap.
    assert_eq!(st["exit_code"], 0, "{st}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        decoy.try_wait().unwrap().is_none(),
        "the agent signalled the pid the task wrote"
    );
    let _ = decoy.kill();
    let _ = decoy.wait();
}

/// Hole 5: the supervisor and PID 1 inherited the agent's environment (the cluster token in
/// `CAIRN_TOKEN`); agent data (task env in init.json and the checkpoints) was world-readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_environment_and_data_stay_private() {
    let (dir, lab) = lab(1, &[]);
    let addr = format!("127.0.0.1:{}", cairn_installer::lab::free_port());
    let data_dir = dir.path().join("agent-env");
    // The token comes from the environment, as a packaged agent would get it.
    let child = std::process::Command::new(bin())
        .args([
            "agent",
            "--masters",
            &lab.masters[0].addr,
            "--listen",
            &addr,
            "--insecure",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("CAIRN_TOKEN", TOKEN)
        .env("CAIRN_TEST_AGENT_SECRET", "agent-only-value")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent-env.log")).unwrap())
        .spawn()
        .unwrap();
    let http = http();
    let a = Agent {
        dir,
        _lab: lab,
        addr,
        data_dir,
        http,
        own: Some(child),
    };
    wait_up(&a.http, &a.addr).await;
    let mut spec = sh(
        "env",
        "tr '\\0' '\\n' </proc/1/environ; echo ---; env; echo done; exec sleep 60",
    );
    spec["env"] = json!({"MINE": "task-value"});
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let out = eventually(Duration::from_secs(10), "task output", || async {
        let (_, o) = a.file("env", "stdout").await;
        o.contains("done").then_some(o)
    })
    .await;
    assert!(out.contains("MINE=task-value"), "{out}");
    for secret in [TOKEN, "agent-only-value", "CAIRN_TOKEN"] {
        assert!(!out.contains(secret), "{secret} reached the task:\n{out}");
    }
    let sup = a.status("env").await["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{sup}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(TOKEN) && !environ.contains("agent-only-value"),
        "the supervisor has the agent's environment: {environ}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a.data_dir), 0o700);
    assert_eq!(mode(&a.data_dir.join("agent.sled")), 0o700);
    assert_eq!(mode(&a.data_dir.join("sandboxes")), 0o700);
    assert_eq!(mode(&a.sandbox("env").join(".cairn")), 0o700);
    assert_eq!(mode(&a.sandbox("env").join(".cairn/init.json")), 0o600);
    a.kill("env").await;
    a.wait_state("env", Duration::from_secs(20)).await;
    // An OCI task's PID 1 (the report: CAIRN_TOKEN in /proc/1/environ).
    import_busybox(&a);
    let spec = json!({"id": "ocienv", "workload": "test",
        "runtime": {"oci": {"image": "busybox:latest", "cmd": ["/bin/sh", "-c",
            "tr '\\0' '\\n' </proc/1/environ; echo ---; env; echo done"]}},
        "resources": {"cpus": 1.0, "mem": 128, "disk": 0}});
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("ocienv", Duration::from_secs(30)).await;
    assert_eq!(st["state"], "finished", "{st}");
    let (_, out) = a.file("ocienv", "stdout").await;
    assert!(out.contains("done"), "{out}");
    for secret in [TOKEN, "agent-only-value", "CAIRN_TOKEN"] {
        assert!(
            !out.contains(secret),
            "{secret} reached the OCI task:\n{out}"
        );
    }
}

/// Task isolation (issue 14, "what it must do" 1): a native and an OCI task run with Docker's
/// capability set, no_new_privs and a seccomp filter; mounting, unsharing a namespace,
/// reading /proc/kcore and writing /proc/sys fail inside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_with_default_capabilities_no_new_privs_and_seccomp() {
    let a = agent().await;
    let script = "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
        mkdir -p m; mount -t tmpfs none m 2>/dev/null && echo MOUNTED; \
        echo kcore=$(head -c 16 /proc/kcore 2>/dev/null | wc -c); \
        (echo 1 > /proc/sys/kernel/ns_last_pid) 2>/dev/null && echo PROCSYS-WRITABLE; \
        unshare -n true 2>/dev/null && echo UNSHARED; \
        hostname evil 2>/dev/null && echo RENAMED; \
        echo done";
    let check = |name: &str, out: &str| {
        for want in [
            "CapEff:\t00000000a80425fb",
            "CapBnd:\t00000000a80425fb",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            "kcore=0",
            "done",
        ] {
            assert!(out.contains(want), "{name}: no {want:?} in\n{out}");
        }
        for bad in ["MOUNTED", "PROCSYS-WRITABLE", "UNSHARED", "RENAMED"] {
            assert!(!out.contains(bad), "{name}: {bad}\n{out}");
        }
    };
    let (code, v) = a.launch(sh("iso", script)).await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("iso", Duration::from_secs(30)).await;
    let (_, out) = a.file("iso", "stdout").await;
    assert_eq!(st["state"], "finished", "{st} {out}");
    check("native", &out);
    import_busybox(&a);
    let spec = json!({"id": "ociiso", "workload": "test",
        "runtime": {"oci": {"image": "busybox:latest", "cmd": ["/bin/sh", "-c", script]}},
        "resources": {"cpus": 1.0, "mem": 128, "disk": 0}});
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("ociiso", Duration::from_secs(30)).await;
    let (_, out) = a.file("ociiso", "stdout").await;
    assert_eq!(st["state"], "finished", "{st} {out}");
    check("oci", &out);
}

/// The busybox test image (tests/images/busybox.sh: umoci + skopeo), built once per run
/// (its own file: tests/runtime.rs builds one too, maybe at the same time).
fn busybox_tar() -> PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ONCE.lock().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/test-images/busybox-security.tar");
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

fn import_busybox(a: &Agent) {
    let tar = busybox_tar();
    let o = std::process::Command::new(bin())
        .args(["image", "import", tar.to_str().unwrap()])
        .env("CAIRN_AGENT", &a.addr)
        .env("CAIRN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("imported busybox:latest"),
        "image import failed: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Hole 8: `runtime.wasm.file` was any host path, read whole by root (`/dev/zero` exhausts
/// the agent's memory, `/proc/kmsg` blocks it). Only regular files under the agent's Wasm
/// directories are read, through no symlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_files_come_only_from_allowed_directories() {
    let a = agent().await;
    let own = a.data_dir.join("wasm");
    std::os::unix::fs::symlink("/dev/zero", own.join("zero.wasm")).unwrap();
    std::os::unix::fs::symlink("/etc", own.join("etc")).unwrap();
    nix_mkfifo(&own.join("fifo.wasm"));
    let zero = own.join("zero.wasm").display().to_string();
    let fifo = own.join("fifo.wasm").display().to_string();
    let via_dir = own.join("etc/passwd").display().to_string();
    let up = format!("{}/../../../etc/passwd", own.display());
    for (i, file) in [
        "/dev/zero",
        "/proc/kmsg",
        "/etc/shadow",
        "relative.wasm",
        zero.as_str(),
        fifo.as_str(),
        via_dir.as_str(),
        up.as_str(),
    ]
    .iter()
    .enumerate()
    {
        let (code, v) = tokio::time::timeout(
            Duration::from_secs(10),
            a.launch(wasm(&format!("bad{i}"), file, &[])),
        )
        .await
        .unwrap_or_else(|_| panic!("{file}: the launch hung"));
        assert_eq!(code, 400, "{file}: {v}");
        assert_eq!(v["field"], "runtime.wasm.file", "{file}: {v}");
    }
    // A file copied into the agent's own Wasm directory runs.
    std::fs::copy(guest("wasm32-wasip1", "hello"), own.join("hello.wasm")).unwrap();
    let (code, v) = a
        .launch(wasm(
            "good",
            &own.join("hello.wasm").display().to_string(),
            &[],
        ))
        .await;
    assert_eq!(code, 201, "{v}");
    let st = a.wait_state("good", Duration::from_secs(20)).await;
    assert_eq!(st["state"], "finished", "{st}");
}

fn nix_mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Hole 10: HTTP components listened on 0.0.0.0 and told clients the guest's internal
/// errors; `CAIRN_WASM_NETWORK=1` in the env granted sockets. They listen on the agent's
/// address only, answer a generic 500, and get the network only from the spec's field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_http_binds_the_agent_address_and_hides_errors() {
    let a = agent().await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let serve = |id: &str, port: u16, extra: Value| {
        let mut spec = wasm(id, &guest("wasm32-wasip2", "http_hello"), &[]);
        spec["ports"] = json!([{"name": "http", "number": port}]);
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        spec
    };
    let port = cairn_installer::lab::free_port();
    let (code, v) = a
        .launch(serve(
            "web",
            port,
            json!({"env": {"CAIRN_WASM_NETWORK": "1"}}),
        ))
        .await;
    assert_eq!(code, 201, "{v}");
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(10), "wasm HTTP answers", || async {
        let r = http.get(format!("{url}/hi")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // The agent listens on 127.0.0.1: another loopback address is not served.
    let other = std::net::TcpStream::connect_timeout(
        &format!("127.0.0.2:{port}").parse().unwrap(),
        Duration::from_secs(2),
    );
    assert!(other.is_err(), "the component listens on every address");
    // A trapping guest: a generic 500, no internal detail.
    let r = http.get(format!("{url}/panic")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    assert_eq!(body, "internal server error\n");
    // The env variable grants nothing.
    let r = http.get(format!("{url}/fetch")).send().await.unwrap();
    let body = r.text().await.unwrap();
    assert!(body.ends_with("fetch=denied"), "{body}");
    a.kill("web").await;
    // The spec's network field does.
    let port2 = cairn_installer::lab::free_port();
    let (code, v) = a
        .launch(serve("netweb", port2, json!({"network": "host"})))
        .await;
    assert_eq!(code, 201, "{v}");
    let body = eventually(Duration::from_secs(10), "wasm HTTP answers", || async {
        let r = http
            .get(format!("http://127.0.0.1:{port2}/fetch"))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    })
    .await;
    assert!(body.ends_with("fetch=allowed"), "{body}");
    a.kill("netweb").await;
}

/// Hole 4: command health checks ran on the host as root, outside the task's namespaces and
/// cgroup. They run inside the task: its PID 1, hostname and cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_health_checks_run_inside_the_task() {
    let a = agent().await;
    let mut spec = sh("hc", "exec sleep 60");
    spec["health_checks"] = json!([{
        "kind": "command", "port": "", "path": "",
        "command": ["/bin/sh", "-c",
            "{ tr '\\0' ' ' </proc/1/cmdline; echo; hostname; cat /proc/self/cgroup; } > hc.out"],
        "grace_ms": 0, "interval_ms": 500, "timeout_ms": 5000, "max_failures": 3
    }]);
    let (code, v) = a.launch(spec).await;
    assert_eq!(code, 201, "{v}");
    let st = eventually(Duration::from_secs(20), "task healthy", || async {
        let s = a.status("hc").await;
        (s["healthy"] == true || s["state"] != "running").then_some(s)
    })
    .await;
    assert_eq!(st["healthy"], true, "{st}");
    let (code, out) = a.file("hc", "hc.out").await;
    assert_eq!(code, 200, "{out}");
    let mut lines = out.lines();
    let pid1 = lines.next().unwrap_or_default();
    assert!(
        pid1.contains("__pid1"),
        "the check saw the host's PID 1: {out}"
    );
    assert_eq!(
        lines.next(),
        Some("hc"),
        "the check ran with the host's hostname: {out}"
    );
    assert!(
        lines.any(|l| l.ends_with("-hc")),
        "the check ran outside the task's cgroup: {out}"
    );
    a.kill("hc").await;
    a.wait_state("hc", Duration::from_secs(20)).await;
}
