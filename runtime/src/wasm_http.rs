//! Wasm HTTP services: a component that exports `wasi:http/incoming-handler` is served on the
//! task's first port. hyper accepts connections; every request gets a fresh `Store` (instances
//! come from the pooling allocator, pre-linked once per task with `ProxyPre`), the task's env,
//! its sandbox as the only preopened directory, its memory limit, and a deadline enforced by
//! epoch interruption that also stops a killed task's guests mid-loop. Outgoing HTTP from the
//! guest is denied unless the task is granted the network. The listener is bound to the
//! agent's address (not every interface), at most `MAX_CONNECTIONS` connections are served
//! at once (more wait in the listen backlog), a client has `HEADER_TIMEOUT` to send its
//! request head, and a failing request gets a generic 500: details go to the agent's log.

use crate::wasm::{KillSwitch, LazyLog, MemLimiter, WasmOutcome};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// The longest one request may run in the guest.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Connections one HTTP task serves at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of every 500 (what went wrong is logged by the agent, not told to clients).
pub const INTERNAL_ERROR: &str = "internal server error\n";

/// The export that makes a component an HTTP service (any 0.2.x, matched by semver).
const INCOMING_HANDLER: &str = "wasi:http/incoming-handler@0.2.0";

/// Whether a component exports `wasi:http/incoming-handler`.
pub fn is_http_component(c: &Component) -> bool {
    c.get_export_index(None, INCOMING_HANDLER).is_some()
}

/// Outgoing requests: denied unless the task may use the network.
struct Hooks {
    allow_network: bool,
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<
                            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                                + Send,
                        >,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        if !self.allow_network {
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io)
                    as Box<
                        dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                            + Send,
                    >,
            ))
        })
    }
}

pub struct HttpState {
    ctx: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Hooks,
    limiter: MemLimiter,
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Adds WASI (all of it: Rust's std imports `wasi:cli/*`) and `wasi:http` to a linker.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<HttpState>> {
    let mut l = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut l)
        .map_err(|e| anyhow::anyhow!("wasi linker: {e}"))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut l)
        .map_err(|e| anyhow::anyhow!("wasi-http linker: {e}"))?;
    Ok(l)
}

/// One HTTP service task.
pub struct HttpTask {
    pub id: String,
    pub max_connections: usize,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub sandbox: Arc<PathBuf>,
    /// Volume directories preopened at their sandbox-relative paths.
    pub volumes: Arc<Vec<(PathBuf, String)>>,
    pub memory_bytes: usize,
    pub allow_network: bool,
}

/// Serves `component` on `listener` until `killed`; the outcome is `Killed` then.
pub fn serve(
    handle: &tokio::runtime::Handle,
    linker: &Linker<HttpState>,
    component: &Component,
    listener: std::net::TcpListener,
    task: HttpTask,
    killed: Arc<KillSwitch>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<WasmOutcome>> {
    let pre = ProxyPre::new(
        linker
            .instantiate_pre(component)
            .map_err(|e| anyhow::anyhow!("linking the component: {e:#}"))?,
    )
    .map_err(|e| anyhow::anyhow!("the component is not a wasi:http proxy: {e:#}"))?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _g = handle.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    for f in ["stdout", "stderr"] {
        LazyLog::new(task.sandbox.clone(), f)?;
    }
    let task = Arc::new(task);
    let limit = task.max_connections;
    handle.spawn(async move {
        accept_loop(listener, limit, killed.clone(), move |sock| {
            let (pre, task, killed) = (pre.clone(), task.clone(), killed.clone());
            async move {
                let svc = service_fn(move |req| {
                    let (pre, task, killed) = (pre.clone(), task.clone(), killed.clone());
                    async move {
                        // A killed task's kept-alive connections serve nothing more: the
                        // error makes hyper close them.
                        if killed.is_killed() {
                            return Err(std::io::Error::other("task killed"));
                        }
                        Ok(match handle_request(pre, &task, killed, req).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::warn!(task = %task.id, "wasm HTTP request failed: {e:#}");
                                text(500, INTERNAL_ERROR.to_string())
                            }
                        })
                    }
                });
                let _ = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            }
        })
        .await;
        let _ = tx.send(WasmOutcome::Killed);
    });
    Ok(rx)
}

/// Accepts connections until `killed`, serving each with `serve`, at most `limit` at once:
/// past the limit nothing more is accepted (clients wait in the listen backlog) until a
/// connection ends.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    limit: usize,
    killed: Arc<KillSwitch>,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = killed.wait() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = killed.wait() => break,
        };
        let Ok((sock, _)) = accepted else {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = sock.set_nodelay(true);
        let conn = serve(sock);
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
}

fn text(status: u16, s: String) -> hyper::Response<HyperOutgoingBody> {
    let mut r = hyper::Response::new(
        Full::new(Bytes::from(s))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r
}

fn state(task: &HttpTask) -> anyhow::Result<HttpState> {
    let mut b = WasiCtx::builder();
    b.args(&task.args).envs(&task.env);
    b.stdout(LazyLog::existing(task.sandbox.clone(), "stdout"));
    b.stderr(LazyLog::existing(task.sandbox.clone(), "stderr"));
    b.preopened_dir(&*task.sandbox, ".", FsPerms::ReadWrite)
        .map_err(|e| anyhow::anyhow!("preopening the sandbox: {e}"))?;
    for (dir, path) in task.volumes.iter() {
        b.preopened_dir(dir, path, FsPerms::ReadWrite)
            .map_err(|e| anyhow::anyhow!("preopening volume {path:?}: {e}"))?;
    }
    if task.allow_network {
        b.inherit_network();
    } else {
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
    }
    Ok(HttpState {
        ctx: b.build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        hooks: Hooks {
            allow_network: task.allow_network,
        },
        limiter: MemLimiter::new(task.memory_bytes),
    })
}

async fn handle_request(
    pre: ProxyPre<HttpState>,
    task: &HttpTask,
    killed: Arc<KillSwitch>,
    req: hyper::Request<hyper::body::Incoming>,
) -> anyhow::Result<hyper::Response<HyperOutgoingBody>> {
    let mut store = Store::new(pre.engine(), state(task)?);
    store.limiter(|s| -> &mut dyn ResourceLimiter { &mut s.limiter });
    store.set_epoch_deadline(1);
    let deadline = Instant::now() + REQUEST_DEADLINE;
    store.epoch_deadline_callback(move |_| {
        if killed.is_killed() {
            return Ok(UpdateDeadline::Interrupt);
        }
        if Instant::now() >= deadline {
            wasmtime::bail!("the request ran past its {REQUEST_DEADLINE:?} deadline");
        }
        // Yield to tokio at every tick so one busy guest cannot hold a worker thread.
        Ok(UpdateDeadline::Yield(1))
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let wreq = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, req)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let out = store
        .data_mut()
        .http()
        .new_response_outparam(tx)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    // The guest may keep streaming the body after it hands over the response head.
    let guest = tokio::spawn(async move {
        let proxy = pre.instantiate_async(&mut store).await?;
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, wreq, out)
            .await
    });
    match rx.await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(code)) => Err(anyhow::anyhow!(
            "the guest answered with an error: {code:?}"
        )),
        Err(_) => match guest.await {
            Ok(Ok(())) => anyhow::bail!("the guest returned without a response"),
            Ok(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
            Err(e) => Err(e.into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Issue 14 hole 10: connections were accepted without limit. Past the limit nothing is
    /// served until a connection ends.
    #[tokio::test]
    async fn connections_past_the_limit_wait() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let killed = Arc::new(KillSwitch::default());
        let served = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (s, r) = (served.clone(), release.clone());
        let lp = tokio::spawn(accept_loop(l, 2, killed.clone(), move |sock| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                r.notified().await;
                drop(sock);
            }
        }));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(served.load(Ordering::SeqCst), 2);
        release.notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(served.load(Ordering::SeqCst), 3);
        killed.kill();
        tokio::time::timeout(Duration::from_secs(5), lp)
            .await
            .expect("the accept loop ends when killed")
            .unwrap();
    }
}
