//! The Wasm executor: one wasmtime `Engine` per agent (epoch interruption, pooling allocator,
//! on-disk compilation cache keyed by content hash), one `Store` per task. Runs WASI preview1
//! modules (`_start`) and preview2 components (`wasi:cli/run`) with the sandbox as the only
//! preopened directory, no sockets unless granted, stdout/stderr into sandbox files (opened
//! beneath the sandbox through no symlink: the guest owns the sandbox and may replace them),
//! and a memory limit that traps.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Config, Engine, Linker, Module, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Concurrent Wasm instances the pooling allocator reserves room for.
const POOL_SLOTS: u32 = 10_000;

/// Host stack of a guest's thread: wasmtime's default max Wasm stack (512 KiB) plus room for
/// host calls.
const TASK_STACK: usize = 2 << 20;

/// Epoch tick: the longest a killed guest keeps running in a tight loop.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How a Wasm task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WasmOutcome {
    Exited(i32),
    MemoryLimit,
    Killed,
    Trap(String),
}

/// Caps linear memory; records that the cap was hit so the task reports `memory_limit`.
pub(crate) struct MemLimiter {
    max_bytes: usize,
    exceeded: bool,
    usage: Option<Arc<WasmUsage>>,
}

impl MemLimiter {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            exceeded: false,
            usage: None,
        }
    }
    fn with_usage(mut self, usage: Arc<WasmUsage>) -> Self {
        self.usage = Some(usage);
        self
    }
}

impl ResourceLimiter for MemLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            wasmtime::bail!("memory limit of {} bytes exceeded", self.max_bytes);
        }
        if let Some(u) = &self.usage {
            u.memory_bytes.fetch_max(desired as u64, Ordering::Relaxed);
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A Wasm task's kill switch: interrupts its guest at the next epoch tick and cancels a guest
/// waiting in a host call (its future is dropped).
pub struct KillSwitch {
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for KillSwitch {
    fn default() -> Self {
        Self {
            tx: tokio::sync::watch::channel(false).0,
        }
    }
}

impl KillSwitch {
    pub fn kill(&self) {
        self.tx.send_replace(true);
    }
    pub fn is_killed(&self) -> bool {
        *self.tx.borrow()
    }
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }
}

/// What a Wasm task has used: guest run time (measured at epoch ticks) and linear memory.
#[derive(Default)]
pub struct WasmUsage {
    pub cpu_usec: AtomicU64,
    pub memory_bytes: AtomicU64,
}

/// What every guest store carries besides WASI.
struct Guest {
    limiter: MemLimiter,
    kill: Arc<KillSwitch>,
    usage: Arc<WasmUsage>,
    /// CPU share (0 = unlimited; 1 or more cannot be exceeded by one guest anyway).
    cpus: f64,
    /// When the guest last resumed after an epoch callback.
    resumed: Instant,
}

struct P1State {
    wasi: WasiP1Ctx,
    guest: Guest,
}

struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    guest: Guest,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// What a Wasm task needs besides its bytes.
pub struct WasmTask<'a> {
    /// The task id (for the agent's logs).
    pub id: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sandbox: &'a Path,
    /// Volume directories preopened at their sandbox-relative paths.
    pub volumes: Vec<(std::path::PathBuf, String)>,
    pub memory_bytes: usize,
    pub allow_network: bool,
    /// Where an HTTP component listens: the agent's own address, not every interface.
    pub bind_ip: std::net::IpAddr,
    /// The task's first port: where an HTTP component is served.
    pub port: Option<u16>,
    /// CPU share of one core (0: unlimited).
    pub cpus: f64,
}

/// The agent's wasmtime engine and linkers.
pub struct WasmRuntime {
    engine: Engine,
    /// Compiled code shared by every task running the same bytes (keyed by SHA-256), so N
    /// tasks of one module cost one copy of its code and its executable mappings.
    compiled: std::sync::Mutex<std::collections::HashMap<[u8; 32], Compiled>>,
    p1: Linker<P1State>,
    p2: wasmtime::component::Linker<P2State>,
    http: wasmtime::component::Linker<crate::wasm_http::HttpState>,
    /// The threads every guest runs on, apart from the agent's own runtime (an agent API
    /// call never waits behind a busy guest).
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping a runtime blocks; from inside another runtime that would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Clone)]
enum Compiled {
    Module(Module),
    Component(Component),
}

/// A task's stdout or stderr file, opened on the first write: an idle guest holds no file
/// descriptor for its logs (10,000 idle tasks would otherwise need 20,000). The guest can
/// write its whole sandbox, so the file is opened beneath the sandbox directory through no
/// symlink, and only if it is a regular file: a guest that swaps `stdout` for a symlink to
/// a host file (or a FIFO) gets a write error, not a root-owned write elsewhere.
#[derive(Clone)]
pub(crate) struct LazyLog {
    sandbox: Arc<std::path::PathBuf>,
    name: &'static str,
    file: Arc<std::sync::Mutex<Option<std::fs::File>>>,
}

impl LazyLog {
    /// Creates the (empty) file now, so it exists for the sandbox API.
    pub(crate) fn new(
        sandbox: Arc<std::path::PathBuf>,
        name: &'static str,
    ) -> std::io::Result<Self> {
        let log = Self::existing(sandbox, name);
        log.open()?;
        Ok(log)
    }

    /// For a file already created (HTTP requests share their task's logs).
    pub(crate) fn existing(sandbox: Arc<std::path::PathBuf>, name: &'static str) -> Self {
        Self {
            sandbox,
            name,
            file: Default::default(),
        }
    }

    fn open(&self) -> std::io::Result<std::fs::File> {
        let dir = crate::sandbox::open_dir(&self.sandbox)?;
        crate::sandbox::open_append(&dir, Path::new(self.name))
    }
}

impl wasmtime_wasi::cli::IsTerminal for LazyLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LazyLog {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for LazyLog {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        let mut f = self.file.lock().expect("log file");
        if f.is_none() {
            *f = Some(self.open()?);
        }
        std::task::Poll::Ready(f.as_mut().expect("opened").write(buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Whether `bytes` are a component (layer 1) rather than a core module.
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[6..8] == [1, 0]
}

impl WasmRuntime {
    /// Builds the engine. `cache_dir` holds compiled code keyed by content hash.
    pub fn new(cache_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(cache_dir)?;
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        cfg.wasm_component_model(true);
        let mut cache = wasmtime::CacheConfig::new();
        cache.with_directory(cache_dir);
        cfg.cache(Some(
            wasmtime::Cache::new(cache).map_err(|e| anyhow::anyhow!("wasm cache: {e}"))?,
        ));
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        // Room for 10,000 concurrent guests; slots are address-space reservations, so an idle
        // pool costs no memory.
        pool.total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .total_core_instances(POOL_SLOTS)
            .total_component_instances(POOL_SLOTS)
            .total_stacks(POOL_SLOTS)
            .max_memory_size(1 << 30)
            // Reset reused slots with memset instead of fresh page faults for the first MiB
            // (HTTP components instantiate per request).
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10);
        let mut pooled = cfg.clone();
        pooled.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        // Fall back to on-demand allocation where the host cannot reserve the pool.
        let engine = match Engine::new(&pooled) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(
                    "wasm pooling allocator unavailable ({e}); using on-demand allocation"
                );
                Engine::new(&cfg).map_err(|e| anyhow::anyhow!("wasm engine: {e}"))?
            }
        };
        let mut p1 = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| anyhow::anyhow!("wasi p1 linker: {e}"))?;
        let mut p2 = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2)
            .map_err(|e| anyhow::anyhow!("wasi p2 linker: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        let http = crate::wasm_http::linker(&engine)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            )
            .thread_name("wasm")
            .thread_stack_size(TASK_STACK)
            .enable_all()
            .build()?;
        Ok(Self {
            handle: rt.handle().clone(),
            rt: Some(rt),
            engine,
            compiled: Default::default(),
            p1,
            p2,
            http,
            stop,
        })
    }

    fn wasi_builder(t: &WasmTask) -> anyhow::Result<WasiCtxBuilder> {
        let mut b = WasiCtxBuilder::new();
        b.args(&t.args).envs(&t.env);
        let sandbox = Arc::new(t.sandbox.to_path_buf());
        b.stdout(LazyLog::new(sandbox.clone(), "stdout")?);
        b.stderr(LazyLog::new(sandbox, "stderr")?);
        b.preopened_dir(t.sandbox, ".", FsPerms::ReadWrite)
            .map_err(|e| anyhow::anyhow!("preopening the sandbox: {e}"))?;
        for (dir, path) in &t.volumes {
            b.preopened_dir(dir, path, FsPerms::ReadWrite)
                .map_err(|e| anyhow::anyhow!("preopening volume {path:?}: {e}"))?;
        }
        if t.allow_network {
            b.inherit_network();
        } else {
            b.allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false);
        }
        Ok(b)
    }

    /// Compiles (or loads from the cache) and starts a module or component as a future on
    /// the Wasm runtime's threads (no thread per task). Returns the kill switch, the usage
    /// counters, and a channel that yields the outcome.
    pub fn start(
        self: &Arc<Self>,
        bytes: Vec<u8>,
        task: WasmTask,
    ) -> anyhow::Result<(
        Arc<KillSwitch>,
        Arc<WasmUsage>,
        tokio::sync::oneshot::Receiver<WasmOutcome>,
    )> {
        let kill = Arc::new(KillSwitch::default());
        let usage = Arc::new(WasmUsage::default());
        let guest = Guest {
            limiter: MemLimiter::new(task.memory_bytes).with_usage(usage.clone()),
            kill: kill.clone(),
            usage: usage.clone(),
            cpus: task.cpus,
            resumed: Instant::now(),
        };
        let compiled = self.compile(&bytes)?;
        if let Compiled::Component(component) = &compiled {
            if crate::wasm_http::is_http_component(component) {
                let port = task.port.ok_or_else(|| {
                    anyhow::anyhow!(
                        "ports: this component exports wasi:http/incoming-handler and is served \
                         on the task's first port; give one in ports"
                    )
                })?;
                let listener = std::net::TcpListener::bind((task.bind_ip, port)).map_err(|e| {
                    anyhow::anyhow!("ports: cannot listen on {}:{port}: {e}", task.bind_ip)
                })?;
                let rx = crate::wasm_http::serve(
                    &self.handle,
                    &self.http,
                    component,
                    listener,
                    crate::wasm_http::HttpTask {
                        id: task.id,
                        max_connections: crate::wasm_http::MAX_CONNECTIONS,
                        args: task.args,
                        env: task.env,
                        sandbox: Arc::new(task.sandbox.to_path_buf()),
                        volumes: Arc::new(task.volumes.clone()),
                        memory_bytes: task.memory_bytes,
                        allow_network: task.allow_network,
                    },
                    kill.clone(),
                )?;
                return Ok((kill, usage, rx));
            }
        }
        let mut builder = Self::wasi_builder(&task)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let k = kill.clone();
        match compiled {
            Compiled::Component(component) => {
                let state = P2State {
                    ctx: builder.build(),
                    table: ResourceTable::new(),
                    guest,
                };
                self.handle.spawn(async move {
                    let run = this.run_component(component, state);
                    let _ = tx.send(tokio::select! {
                        o = run => o,
                        _ = k.wait() => WasmOutcome::Killed,
                    });
                });
            }
            Compiled::Module(module) => {
                let state = P1State {
                    wasi: builder.build_p1(),
                    guest,
                };
                self.handle.spawn(async move {
                    let run = this.run_module(module, state);
                    let _ = tx.send(tokio::select! {
                        o = run => o,
                        _ = k.wait() => WasmOutcome::Killed,
                    });
                });
            }
        }
        Ok((kill, usage, rx))
    }

    /// Compiles `bytes` once per process (and once per machine through the on-disk cache).
    fn compile(&self, bytes: &[u8]) -> anyhow::Result<Compiled> {
        use sha2::Digest;
        let key: [u8; 32] = sha2::Sha256::digest(bytes).into();
        if let Some(c) = self.compiled.lock().expect("compiled").get(&key) {
            return Ok(c.clone());
        }
        let c = if is_component(bytes) {
            Compiled::Component(
                Component::new(&self.engine, bytes)
                    .map_err(|e| anyhow::anyhow!("compiling component: {e}"))?,
            )
        } else {
            Compiled::Module(
                Module::new(&self.engine, bytes)
                    .map_err(|e| anyhow::anyhow!("compiling module: {e}"))?,
            )
        };
        self.compiled
            .lock()
            .expect("compiled")
            .insert(key, c.clone());
        Ok(c)
    }

    async fn run_module(&self, module: Module, state: P1State) -> WasmOutcome {
        let mut store = new_store(&self.engine, state);
        let r = async {
            let instance = self.p1.instantiate_async(&mut store, &module).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await?;
            Ok(0)
        }
        .await;
        finish(&store, r)
    }

    async fn run_component(&self, component: Component, state: P2State) -> WasmOutcome {
        let mut store = new_store(&self.engine, state);
        let r = async {
            let cmd = wasmtime_wasi::p2::bindings::Command::instantiate_async(
                &mut store, &component, &self.p2,
            )
            .await?;
            Ok(match cmd.wasi_cli_run().call_run(&mut store).await? {
                Ok(()) => 0,
                Err(()) => 1,
            })
        }
        .await;
        finish(&store, r)
    }
}

/// Both kinds of guest state give the store their `Guest`.
trait GuestState: Send + 'static {
    fn guest(&self) -> &Guest;
    fn guest_mut(&mut self) -> &mut Guest;
}

impl GuestState for P1State {
    fn guest(&self) -> &Guest {
        &self.guest
    }
    fn guest_mut(&mut self) -> &mut Guest {
        &mut self.guest
    }
}

impl GuestState for P2State {
    fn guest(&self) -> &Guest {
        &self.guest
    }
    fn guest_mut(&mut self) -> &mut Guest {
        &mut self.guest
    }
}

/// How long a guest that ran for `ran` must pause to stay within `cpus` of one core.
pub(crate) fn cpu_pause(ran: Duration, cpus: f64) -> Duration {
    if cpus <= 0.0 || cpus >= 1.0 {
        return Duration::ZERO;
    }
    ran.mul_f64((1.0 - cpus) / cpus)
}

/// A store with the memory limiter and an epoch callback that, every tick the guest runs,
/// counts its run time, pauses it to hold its CPU share, yields to the other guests, and
/// interrupts it once killed.
fn new_store<T: GuestState>(engine: &Engine, state: T) -> Store<T> {
    let mut store = Store::new(engine, state);
    store.limiter(|s: &mut T| -> &mut dyn ResourceLimiter { &mut s.guest_mut().limiter });
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| {
        let g = ctx.data_mut().guest_mut();
        if g.kill.is_killed() {
            return Ok(UpdateDeadline::Interrupt);
        }
        let now = Instant::now();
        // Time spent waiting in host calls is not run time: count at most two ticks.
        let ran = now.saturating_duration_since(g.resumed).min(EPOCH_TICK * 2);
        g.usage
            .cpu_usec
            .fetch_add(ran.as_micros() as u64, Ordering::Relaxed);
        let pause = cpu_pause(ran, g.cpus);
        g.resumed = now + pause;
        if pause.is_zero() {
            Ok(UpdateDeadline::Yield(1))
        } else {
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::time::sleep(pause)),
            ))
        }
    });
    store
}

fn finish<T: GuestState>(store: &Store<T>, r: wasmtime::Result<i32>) -> WasmOutcome {
    let g = store.data().guest();
    outcome(r, g.limiter.exceeded, g.kill.is_killed())
}

fn outcome(r: wasmtime::Result<i32>, mem_exceeded: bool, killed: bool) -> WasmOutcome {
    match r {
        Ok(code) => WasmOutcome::Exited(code),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                WasmOutcome::Exited(exit.0)
            } else if killed {
                WasmOutcome::Killed
            } else if mem_exceeded {
                WasmOutcome::MemoryLimit
            } else {
                WasmOutcome::Trap(format!("{e:#}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14 hole 1: a guest replaced `stdout` with a symlink out of its sandbox and the
    /// agent (root) wrote through it on the next print.
    #[tokio::test]
    async fn logs_are_never_written_through_a_guest_symlink() {
        use tokio::io::AsyncWriteExt;
        let outer = tempfile::tempdir().unwrap();
        let sb = outer.path().join("sb");
        std::fs::create_dir_all(&sb).unwrap();
        let victim = outer.path().join("victim");
        let log = LazyLog::new(Arc::new(sb.clone()), "stdout").unwrap();
        std::fs::remove_file(sb.join("stdout")).unwrap();
        std::os::unix::fs::symlink("../victim", sb.join("stdout")).unwrap();
        let mut w = log.clone();
        assert!(w.write_all(b"pwned\n").await.is_err());
        assert!(!victim.exists());
        // A FIFO in its place is refused without blocking; a regular file is written.
        std::fs::remove_file(sb.join("stdout")).unwrap();
        nix::unistd::mkfifo(&sb.join("stdout"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut w = LazyLog::existing(Arc::new(sb.clone()), "stdout");
        assert!(w.write_all(b"x").await.is_err());
        std::fs::remove_file(sb.join("stdout")).unwrap();
        let mut w = LazyLog::existing(Arc::new(sb.clone()), "stdout");
        w.write_all(b"fine\n").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(sb.join("stdout")).unwrap(),
            "fine\n"
        );
    }

    #[test]
    fn component_detection() {
        assert!(is_component(b"\0asm\x0d\x00\x01\x00"));
        assert!(!is_component(b"\0asm\x01\x00\x00\x00"));
        assert!(!is_component(b"junk"));
    }
}
