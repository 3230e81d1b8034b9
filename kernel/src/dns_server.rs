//! Serving the built-in DNS (`dns`) on UDP and TCP (two-byte length prefix), and relaying
//! names outside `cairn.` to upstream resolvers. The thin IO shell around `dns::handle`:
//! every answer comes from the `DnsView` in the watch channel it is given (a master's own
//! state, or an agent's copy), never from a request to a master.

use crate::dns::{error_reply, handle, is_reply_to, DnsView, Handled, Transport};
use hickory_proto::op::ResponseCode;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

/// How long a forwarded query may take, all upstreams together.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarded queries in flight at once (more are answered SERVFAIL).
const MAX_FORWARDS: usize = 512;
/// TCP connections at once (more are closed at accept).
const MAX_TCP: usize = 512;
/// An idle TCP connection is closed after this.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Where to serve and whom to ask for names outside the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    /// Upstream resolvers, tried in order; empty: names outside `cairn.` are REFUSED.
    pub upstream: Vec<SocketAddr>,
}

/// The upstream resolvers of `--dns-upstream`: `none`, or `IP[:PORT],...` (port 53 by
/// default); `None` reads the host's `/etc/resolv.conf`. Never `listen` itself (a query would
/// come back to us forever).
pub fn upstreams(flag: Option<&str>, listen: SocketAddr) -> Result<Vec<SocketAddr>, String> {
    let all = match flag.map(str::trim) {
        Some("none") => return Ok(Vec::new()),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                parse_server(s).ok_or_else(|| {
                    format!("--dns-upstream: {s:?} is not IP[:PORT]; give e.g. 10.0.0.2:53 or none")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            resolv_conf_servers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
        }
    };
    Ok(all.into_iter().filter(|u| !is_self(*u, listen)).collect())
}

fn parse_server(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

/// The `nameserver` lines of a resolv.conf (port 53; at most 3, as the C library reads).
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

/// Whether a query sent to `up` would reach a server listening on `listen`.
fn is_self(up: SocketAddr, listen: SocketAddr) -> bool {
    up.port() == listen.port()
        && (up.ip() == listen.ip()
            || listen.ip().is_unspecified()
            || (up.ip().is_loopback() && listen.ip().is_loopback()))
}

/// A running DNS server.
pub struct DnsServer {
    /// The UDP and TCP address it answers on.
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on `cfg.listen` (the same port for both) and serves until `stop`.
    pub async fn start(
        cfg: DnsConfig,
        view: watch::Receiver<Arc<DnsView>>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<DnsServer> {
        let udp = UdpSocket::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("--dns-listen {}: cannot bind UDP: {e}", cfg.listen))?;
        let addr = udp.local_addr()?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--dns-listen {addr}: cannot bind TCP: {e}"))?;
        let upstream: Arc<[SocketAddr]> = cfg
            .upstream
            .iter()
            .copied()
            .filter(|u| !is_self(*u, addr))
            .collect();
        let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
        let udp = Arc::new(udp);
        // One receive loop per core on the one socket: answering is CPU-bound and short.
        let loops = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let mut tasks: Vec<_> = (0..loops)
            .map(|_| {
                tokio::spawn(serve_udp(
                    udp.clone(),
                    view.clone(),
                    upstream.clone(),
                    forwards.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::spawn(serve_tcp(tcp, view, upstream, forwards, stop)));
        tracing::info!(%addr, upstream = ?cfg.upstream, "dns listening (udp, tcp)");
        Ok(DnsServer { addr, tasks })
    }

    /// Stops serving (the `stop` channel does the same).
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<[SocketAddr]>,
    forwards: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            r = sock.recv_from(&mut buf) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("dns udp receive: {e}");
                continue;
            }
        };
        let packet = &buf[..n];
        let v = view.borrow().clone();
        match handle(&v, packet, Transport::Udp, !upstream.is_empty()) {
            Handled::Reply(b) => {
                let _ = sock.send_to(&b, peer).await;
            }
            Handled::Drop => {}
            Handled::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    if let Some(b) = error_reply(packet, ResponseCode::ServFail) {
                        let _ = sock.send_to(&b, peer).await;
                    }
                    continue;
                };
                let (sock, upstream, query) = (sock.clone(), upstream.clone(), packet.to_vec());
                tokio::spawn(async move {
                    let reply = match forward_udp(&query, &upstream).await {
                        Some(r) => Some(r),
                        None => error_reply(&query, ResponseCode::ServFail),
                    };
                    if let Some(b) = reply {
                        let _ = sock.send_to(&b, peer).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Relays a query to each upstream in turn (sharing `FORWARD_TIMEOUT`) from a fresh socket
/// connected to it, so only that upstream's answer with the query's id is taken.
async fn forward_udp(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    let per = FORWARD_TIMEOUT / upstream.len().max(1) as u32;
    for up in upstream {
        let local: SocketAddr = if up.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let attempt = async {
            let s = UdpSocket::bind(local).await.ok()?;
            s.connect(up).await.ok()?;
            s.send(query).await.ok()?;
            let mut buf = vec![0u8; 65_536];
            loop {
                let n = s.recv(&mut buf).await.ok()?;
                if is_reply_to(query, &buf[..n]) {
                    return Some(buf[..n].to_vec());
                }
            }
        };
        if let Ok(Some(r)) = tokio::time::timeout(per, attempt).await {
            return Some(r);
        }
    }
    None
}

/// The same over TCP (one connection per forwarded query).
async fn forward_tcp(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    let per = FORWARD_TIMEOUT / upstream.len().max(1) as u32;
    for up in upstream {
        let attempt = async {
            let mut s = TcpStream::connect(up).await.ok()?;
            write_frame(&mut s, query).await.ok()?;
            let r = read_frame(&mut s, u16::MAX as usize).await.ok()??;
            is_reply_to(query, &r).then_some(r)
        };
        if let Ok(Some(r)) = tokio::time::timeout(per, attempt).await {
            return Some(r);
        }
    }
    None
}

async fn serve_tcp(
    listener: TcpListener,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<[SocketAddr]>,
    forwards: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let conns = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::debug!("dns tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let (view, upstream, forwards) = (view.clone(), upstream.clone(), forwards.clone());
        tokio::spawn(async move {
            tcp_conn(stream, view, upstream, forwards).await;
            drop(permit);
        });
    }
}

async fn tcp_conn(
    mut stream: TcpStream,
    view: watch::Receiver<Arc<DnsView>>,
    upstream: Arc<[SocketAddr]>,
    forwards: Arc<Semaphore>,
) {
    let _ = stream.set_nodelay(true);
    loop {
        // An oversize or malformed frame closes the connection.
        let query = match tokio::time::timeout(
            TCP_IDLE,
            read_frame(&mut stream, crate::dns::MAX_QUERY_BYTES),
        )
        .await
        {
            Ok(Ok(Some(q))) => q,
            _ => return,
        };
        let v = view.borrow().clone();
        let reply = match handle(&v, &query, Transport::Tcp, !upstream.is_empty()) {
            Handled::Reply(b) => b,
            Handled::Drop => return,
            Handled::Forward => {
                let r = match forwards.try_acquire() {
                    Ok(_permit) => forward_tcp(&query, &upstream).await,
                    Err(_) => None,
                };
                match r.or_else(|| error_reply(&query, ResponseCode::ServFail)) {
                    Some(b) => b,
                    None => return,
                }
            }
        };
        if write_frame(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// Reads one length-prefixed message; `None` if it is longer than `max` (or the peer closed).
async fn read_frame(s: &mut TcpStream, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    if s.read_exact(&mut len).await.is_err() {
        return Ok(None);
    }
    let n = u16::from_be_bytes(len) as usize;
    if n > max {
        return Ok(None);
    }
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

async fn write_frame(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_lists() {
        let listen: SocketAddr = "127.0.0.1:5053".parse().unwrap();
        assert_eq!(upstreams(Some("none"), listen), Ok(vec![]));
        assert_eq!(
            upstreams(Some("10.0.0.2, 10.0.0.3:5353,[::1]:53"), listen),
            Ok(vec![
                "10.0.0.2:53".parse().unwrap(),
                "10.0.0.3:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ])
        );
        // Never ourselves.
        assert_eq!(
            upstreams(Some("127.0.0.1:5053,127.0.0.2:5053"), listen),
            Ok(vec![])
        );
        assert!(upstreams(Some("dns.example"), listen)
            .unwrap_err()
            .contains("IP[:PORT]"));
        assert_eq!(
            resolv_conf_servers(
                "# comment\nsearch x\nnameserver 10.1.1.1\nnameserver fe80::1%eth0\nnameserver bad\n\
                 nameserver 10.1.1.2\nnameserver 10.1.1.3\n"
            ),
            vec![
                "10.1.1.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
                "10.1.1.2:53".parse().unwrap(),
            ]
        );
    }
}
