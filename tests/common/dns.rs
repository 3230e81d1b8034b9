//! DNS queries for the tests (hickory-proto encodes and decodes).

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;

static ID: AtomicU16 = AtomicU16::new(1);

pub fn query(name: &str, qt: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(ID.fetch_add(1, Ordering::Relaxed));
    m.set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qt));
    m
}

/// One query over UDP; `None` if nothing (matching) came back within a second.
pub async fn ask_udp(server: SocketAddr, name: &str, qt: RecordType) -> Option<Message> {
    // From the address family's any-address, so the kernel picks a source that reaches the
    // server (loopback, or a lab's bridge).
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(any).await.ok()?;
    let q = query(name, qt);
    sock.send_to(&q.to_vec().unwrap(), server).await.ok()?;
    let mut buf = vec![0u8; 65_536];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let m = Message::from_vec(&buf[..n]).ok()?;
    (m.id() == q.id()).then_some(m)
}
