//! Transport security of every node: rustls server and client configurations made from a
//! node's TLS directory (the cluster CA, the node's certificate and key), a TLS listener for
//! axum that finishes handshakes off the accept loop, and the node's identity as read from a
//! peer's certificate (`master:<id>`, `agent:<id>`, `admin:<name>`; see `cairn_installer::pki`).
//!
//! A process runs in one mode, set once at start (`init`): TLS with its node certificate, or
//! plaintext when started with `--insecure`. Every client and server of the process asks
//! here (`scheme`, `client_builder`, `serve`), so no call site chooses for itself.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// A node's TLS material, loaded from its TLS directory.
pub struct NodeTls {
    pub dir: PathBuf,
    pub ca_pem: String,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Built once at load: every client of the process starts from a copy.
    client: ClientConfig,
    /// This node's own identity, from its certificate.
    pub identity: Identity,
}

/// Who is at the other end of a connection, from its certificate's common name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `master`, `agent` or `admin`.
    pub role: String,
    pub name: String,
}

/// A connection's peer: its address and, over TLS with a client certificate, its identity.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
}

/// Which client certificates a listener takes.
#[derive(Clone, Copy, Debug)]
pub enum Clients {
    /// Any client; a certificate, if presented, must come from the cluster CA (the user API:
    /// users bring tokens, agents bring their certificates).
    Optional,
    /// Only clients with a cluster certificate of one of these roles (Raft peers, agents' APIs).
    Required(&'static [&'static str]),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeTls {
    /// Loads `ca.crt`, `node.crt` and `node.key` from `dir`, naming the file that is missing
    /// or wrong.
    pub fn load(dir: &Path) -> Result<NodeTls> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read(&p).with_context(|| {
                format!(
                    "reading {} (a node's TLS directory holds ca.crt, node.crt and node.key: \
                     made by `cairn dev`, `cairn lab up`, `cairn ca issue` or `cairn agent --join`)",
                    p.display()
                )
            })
        };
        let ca = read("ca.crt")?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| anyhow!("{}: {e}", dir.join("ca.crt").display()))?;
            roots
                .add(c)
                .map_err(|e| anyhow!("{}: {e}", dir.join("ca.crt").display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!("{}: no certificate in it", dir.join("ca.crt").display());
        }
        let chain = CertificateDer::pem_slice_iter(&read("node.crt")?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("{}: {e}", dir.join("node.crt").display()))?;
        let first = chain
            .first()
            .ok_or_else(|| anyhow!("{}: no certificate in it", dir.join("node.crt").display()))?;
        let identity = identity_of(first).with_context(|| {
            format!(
                "{}: not a cairn node certificate",
                dir.join("node.crt").display()
            )
        })?;
        let key = PrivateKeyDer::from_pem_slice(&read("node.key")?)
            .map_err(|e| anyhow!("{}: {e}", dir.join("node.key").display()))?;
        let roots = Arc::new(roots);
        // Fails at start, not at the first connection, if the key does not match.
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .with_context(|| format!("{}: key and certificate do not match", dir.display()))?;
        let tls = NodeTls {
            dir: dir.to_path_buf(),
            ca_pem: String::from_utf8_lossy(&ca).into_owned(),
            roots,
            chain,
            key,
            client,
            identity,
        };
        tls.server_config(Clients::Optional)?;
        Ok(tls)
    }

    /// A server configuration presenting this node's certificate.
    pub fn server_config(&self, clients: Clients) -> Result<Arc<ServerConfig>> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let verifier = match clients {
            Clients::Optional => verifier.allow_unauthenticated(),
            Clients::Required(_) => verifier,
        }
        .build()
        .map_err(|e| anyhow!("client verifier: {e}"))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .with_context(|| format!("{}: key and certificate do not match", self.dir.display()))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A client configuration trusting only the cluster CA and presenting this node's
    /// certificate.
    pub fn client_config(&self) -> ClientConfig {
        self.client.clone()
    }
}

/// The identity in a cluster certificate: its common name `role:name`.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow!("certificate does not parse: {e}"))?;
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| anyhow!("certificate has no common name"))?;
    let (role, name) = cn
        .split_once(':')
        .ok_or_else(|| anyhow!("common name {cn:?} is not role:name"))?;
    Ok(Identity {
        role: role.to_string(),
        name: name.to_string(),
    })
}

static MODE: OnceLock<Option<Arc<NodeTls>>> = OnceLock::new();

/// Sets this process's mode: TLS with `tls`, or plaintext with `None` (`--insecure`). Once.
pub fn init(tls: Option<NodeTls>) -> Result<()> {
    MODE.set(tls.map(Arc::new))
        .map_err(|_| anyhow!("the TLS mode is set once per process"))
}

/// This process's TLS material, if it runs with TLS.
pub fn current() -> Option<Arc<NodeTls>> {
    MODE.get().cloned().flatten()
}

/// `https` under TLS, else `http`: for URLs to other nodes.
pub fn scheme() -> &'static str {
    if current().is_some() {
        "https"
    } else {
        "http"
    }
}

/// A client builder for calls to other nodes: under TLS it trusts only the cluster CA and
/// presents this node's certificate.
pub fn client_builder() -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder();
    match current() {
        Some(t) => b.use_preconfigured_tls(t.client_config()),
        None => b,
    }
}

/// How long a TLS handshake may take, and how many may run at once, before the next waits.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HANDSHAKES: usize = 256;

/// A TCP listener whose connections come out after a finished TLS handshake and, where
/// `Clients::Required`, a client certificate of an allowed role. Handshakes run in their own
/// tasks, so a slow or silent client holds up nobody.
pub struct TlsListener {
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    pub fn new(tcp: TcpListener, cfg: Arc<ServerConfig>, clients: Clients) -> Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let seats = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok(seat) = seats.clone().acquire_owned().await else {
                    return;
                };
                let (sock, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await;
                    drop(seat);
                    let stream = match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!("tls handshake from {addr}: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("tls handshake from {addr}: timed out");
                            return;
                        }
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| identity_of(c).ok());
                    if let Clients::Required(roles) = clients {
                        let ok = identity
                            .as_ref()
                            .is_some_and(|i| roles.contains(&i.role.as_str()));
                        if !ok {
                            tracing::warn!(
                                "refused {addr}: its certificate ({identity:?}) is not one of {roles:?}"
                            );
                            return;
                        }
                    }
                    let _ = tx.send((stream, Peer { addr, identity })).await;
                });
            }
        });
        Ok(TlsListener {
            rx,
            local,
            accept_task,
        })
    }
}

impl Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task ended (the runtime is going down): wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            identity: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            identity: None,
        }
    }
}

/// The identity of a request's peer, when it came over TLS with a client certificate.
pub fn peer_identity<B>(req: &axum::http::Request<B>) -> Option<&Identity> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .and_then(|c| c.0.identity.as_ref())
}

/// Serves `app` on `tcp` in this process's mode until `shutdown` resolves. Every request
/// carries `ConnectInfo<Peer>`.
pub async fn serve(
    tcp: TcpListener,
    app: Router,
    clients: Clients,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match current() {
        Some(t) => {
            let cfg = t.server_config(clients).map_err(std::io::Error::other)?;
            let l = TlsListener::new(tcp, cfg, clients).map_err(std::io::Error::other)?;
            axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(tcp, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
