//! The built-in DNS, pure part: a table of records (`DnsView`) built from the replicated
//! `State`, and the answer to one query (`answer`, `handle`). No IO, no clock: the server
//! (`dns_server`) and the agent feed it views and packets.
//!
//! Names, all under the zone `cairn.`, all TTL 1 s (`TTL`), case-insensitive:
//! - `<workload>.cairn.` — A/AAAA of the agents running the workload's *ready* tasks (running,
//!   and healthy if the task has health checks), on active agents;
//! - `_<port>._tcp.<workload>.cairn.` — SRV (priority 0, weight 1) per ready task: its port
//!   and its agent's name `<agent-id>.agents.cairn.`, whose A record rides in the additional
//!   section;
//! - `<pod>.<service>.cairn.` — A of a stateful service's pod instance's agent, whenever the
//!   pod is placed and not being decommissioned (stable: a pod keeps its agent for life);
//!   `<service>.cairn.` — A of the agents of its pods that have a ready `running` task;
//!   `_<port>._tcp.<pod>.<service>.cairn.` — SRV from the pod's running tasks, target the pod's
//!   name; `_<port>._tcp.<service>.cairn.` — the same over its ready pods;
//!   `<endpoint>.<service>.cairn.` (and its SRV names) — the records of the pod a service's
//!   named endpoint points at (`endpoints = { primary = "postgresql-0" }`);
//! - `leader.cairn.`, `masters.cairn.` — A of the leader's / every master's API host;
//!   `agents.cairn.` — A of every active agent; `<agent-id>.agents.cairn.` — one agent.
//!
//! A workload, service or pod gets a name only if its id, lowercased, is a DNS label (1-63 of
//! `a-z`, `0-9`, `-`, not starting or ending with `-`): an id with `_` has no name (mapping
//! `_` to `-` could make two ids collide). `leader`, `masters`, `agents` and `vip` are
//! reserved. A workload and a stateful service with the same name share it (the union of
//! their records). Hosts come from the agents' and masters' advertised addresses; one that is
//! not an IP address (or is unspecified, `0.0.0.0`) gives no record. A name that exists but
//! has no record of the asked type (a workload with no ready task) is NOERROR with no answer;
//! a name in the zone that does not exist is NXDOMAIN; both carry the zone's SOA (minimum 1 s)
//! so resolvers cache the negative answer for a second at most.

use crate::model::{AgentStatus, TaskState};
use crate::service::model::TaskGoal;
use crate::state::State;
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// The zone Cairn answers for.
pub const ZONE: &str = "cairn.";
/// Every record's TTL (and the SOA minimum): a moved task is found within a second or two.
pub const TTL: u32 = 1;
/// A query longer than this is dropped unanswered: a real query (one name, an OPT record)
/// is well under 300 bytes.
pub const MAX_QUERY_BYTES: usize = 512;
/// The largest UDP answer (whatever a client's EDNS offers); longer answers are truncated
/// (`TC`) and the client retries over TCP.
pub const MAX_UDP_ANSWER: u16 = 4096;
/// Names no workload or service can take.
pub const RESERVED: [&str; 4] = ["leader", "masters", "agents", "vip"];

/// The masters' API addresses (`host:port`) as one master sees the Raft membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterAddrs {
    pub leader: Option<String>,
    pub all: Vec<String>,
}

/// One record of the table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DnsRecord {
    /// A (IPv4) or AAAA (IPv6).
    Addr { ip: IpAddr },
    /// SRV: priority 0, weight 1.
    Srv { port: u16, target: String },
}

/// The records of every name, by lowercase FQDN (`web.cairn.`), as of one applied index.
/// Serialized (JSON) for `GET /api/v1/dns`, where agents fetch it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "ViewWire", into = "ViewWire")]
pub struct DnsView {
    /// The masters' table index the view was built at (`dns_index`).
    pub index: u64,
    names: HashMap<String, Vec<DnsRecord>>,
    /// Names with no records of their own but names below them (`_tcp.web.cairn.`,
    /// `cairn.`): NOERROR, not NXDOMAIN.
    interior: HashSet<String>,
}

/// `DnsView` on the wire: the names only (the interior names are derived).
#[derive(Clone, Serialize, Deserialize)]
struct ViewWire {
    index: u64,
    names: BTreeMap<String, Vec<DnsRecord>>,
}

impl From<ViewWire> for DnsView {
    fn from(w: ViewWire) -> Self {
        DnsView::from_names(w.index, w.names.into_iter().collect())
    }
}

impl From<DnsView> for ViewWire {
    fn from(v: DnsView) -> Self {
        ViewWire {
            index: v.index,
            names: v.names.into_iter().collect(),
        }
    }
}

/// The index a view depends on: the last change to agents, workloads, tasks or services.
pub fn dns_index(s: &State) -> u64 {
    let i = &s.indexes;
    i.agents.max(i.workloads).max(i.tasks).max(i.services)
}

/// `s` lowercased if it is a DNS label (see the module doc), else `None`.
pub fn label(s: &str) -> Option<String> {
    let l = s.to_ascii_lowercase();
    let ok = !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-');
    ok.then_some(l)
}

/// The label of a workload or service name: a label, and not reserved.
fn name_label(s: &str) -> Option<String> {
    label(s).filter(|l| !RESERVED.contains(&l.as_str()))
}

/// `_<port>` for a port name (spec-validated: letters, digits, `-`, `_`).
fn port_label(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 62
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| format!("_{}", s.to_ascii_lowercase()))
}

/// The IP of a `host:port` address, if the host is a (specified) IP address.
pub fn host_ip(addr: &str) -> Option<IpAddr> {
    let ip = match addr.parse::<SocketAddr>() {
        Ok(s) => s.ip(),
        Err(_) => addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?,
    };
    (!ip.is_unspecified()).then_some(ip)
}

fn in_zone(lower_fqdn: &str) -> bool {
    lower_fqdn == ZONE || lower_fqdn.ends_with(".cairn.")
}

#[derive(Default)]
struct Builder(BTreeMap<String, BTreeSet<DnsRecord>>);

impl Builder {
    fn touch(&mut self, name: &str) {
        if !self.0.contains_key(name) {
            self.0.insert(name.to_string(), BTreeSet::new());
        }
    }
    fn add(&mut self, name: &str, r: DnsRecord) {
        self.touch(name);
        if let Some(set) = self.0.get_mut(name) {
            set.insert(r);
        }
    }
}

impl DnsView {
    /// Builds the table from the replicated state and the masters' addresses.
    pub fn from_state(s: &State, masters: &MasterAddrs) -> DnsView {
        let mut b = Builder::default();
        for n in ["leader.cairn.", "masters.cairn.", "agents.cairn."] {
            b.touch(n);
        }
        if let Some(ip) = masters.leader.as_deref().and_then(host_ip) {
            b.add("leader.cairn.", DnsRecord::Addr { ip });
        }
        for ip in masters.all.iter().filter_map(|m| host_ip(m)) {
            b.add("masters.cairn.", DnsRecord::Addr { ip });
        }
        // Agents: every known one gets its own name (SRV targets), active ones `agents.cairn.`.
        let mut agent_ip: HashMap<&str, (IpAddr, bool)> = HashMap::new();
        let mut agent_name: HashMap<&str, String> = HashMap::new();
        for a in s.agents.values() {
            let Some(ip) = host_ip(&a.addr) else {
                continue;
            };
            let active = a.status == AgentStatus::Active;
            agent_ip.insert(a.id.as_str(), (ip, active));
            if active {
                b.add("agents.cairn.", DnsRecord::Addr { ip });
            }
            if let Some(l) = label(&a.id) {
                let name = format!("{l}.agents.cairn.");
                b.add(&name, DnsRecord::Addr { ip });
                agent_name.insert(a.id.as_str(), name);
            }
        }
        // Workloads: the name exists as soon as the workload does.
        for w in s.workloads.values() {
            let Some(l) = name_label(&w.id) else {
                continue;
            };
            b.touch(&format!("{l}.cairn."));
            for p in w.ports.iter().filter_map(|p| port_label(&p.name)) {
                b.touch(&format!("{p}._tcp.{l}.cairn."));
            }
        }
        for t in s.tasks.values() {
            if !t.is_ready() {
                continue;
            }
            let Some(l) = name_label(&t.workload) else {
                continue;
            };
            let Some(&(ip, true)) = agent_ip.get(t.agent.as_str()) else {
                continue;
            };
            b.add(&format!("{l}.cairn."), DnsRecord::Addr { ip });
            let Some(target) = agent_name.get(t.agent.as_str()) else {
                continue;
            };
            for p in &t.ports {
                if let Some(pl) = port_label(&p.name) {
                    let srv = DnsRecord::Srv {
                        port: p.number,
                        target: target.clone(),
                    };
                    b.add(&format!("{pl}._tcp.{l}.cairn."), srv);
                }
            }
        }
        // Stateful services and their pods.
        for svc in s.services.values() {
            let Some(sl) = name_label(&svc.spec.name) else {
                continue;
            };
            let svc_name = format!("{sl}.cairn.");
            b.touch(&svc_name);
            // Endpoint names follow their pod's records (name → the pod's label).
            let endpoints: Vec<(String, String)> = svc
                .spec
                .endpoints
                .iter()
                .filter_map(|(e, pod)| Some((label(e)?, pod.clone())))
                .collect();
            for (e, _) in &endpoints {
                b.touch(&format!("{e}.{svc_name}"));
            }
            for pod in svc.pods.values() {
                let aliases: Vec<String> = endpoints
                    .iter()
                    .filter(|(_, p)| *p == pod.id)
                    .map(|(e, _)| format!("{e}.{svc_name}"))
                    .collect();
                let Some(pl) = label(&pod.id) else {
                    continue;
                };
                let pod_name = format!("{pl}.{svc_name}");
                b.touch(&pod_name);
                if pod.stopping {
                    continue;
                }
                let Some(&(ip, active)) = pod.agent.as_deref().and_then(|a| agent_ip.get(a)) else {
                    continue;
                };
                b.add(&pod_name, DnsRecord::Addr { ip });
                for a in &aliases {
                    b.add(a, DnsRecord::Addr { ip });
                }
                let mut ready = false;
                for (tname, target) in &pod.tasks {
                    let id = crate::service::driver::task_id(
                        &svc.spec.name,
                        &pod.id,
                        tname,
                        target.generation,
                    );
                    let Some(t) = s.tasks.get(&id) else {
                        continue;
                    };
                    if t.state != TaskState::Running {
                        continue;
                    }
                    let task_ready = active && target.goal == TaskGoal::Running && t.is_ready();
                    ready |= task_ready;
                    for p in &t.ports {
                        let Some(port) = port_label(&p.name) else {
                            continue;
                        };
                        let srv = DnsRecord::Srv {
                            port: p.number,
                            target: pod_name.clone(),
                        };
                        b.add(&format!("{port}._tcp.{pod_name}"), srv.clone());
                        for a in &aliases {
                            b.add(&format!("{port}._tcp.{a}"), srv.clone());
                        }
                        if task_ready {
                            b.add(&format!("{port}._tcp.{svc_name}"), srv);
                        }
                    }
                }
                if ready {
                    b.add(&svc_name, DnsRecord::Addr { ip });
                }
            }
        }
        DnsView::from_names(
            dns_index(s),
            b.0.into_iter()
                .map(|(n, set)| (n, set.into_iter().collect()))
                .collect(),
        )
    }

    /// A view of these names (lowercase FQDNs in the zone; others are ignored).
    pub fn from_names(index: u64, names: HashMap<String, Vec<DnsRecord>>) -> DnsView {
        let names: HashMap<String, Vec<DnsRecord>> = names
            .into_iter()
            .filter(|(n, _)| in_zone(n) && n.to_ascii_lowercase() == *n)
            .collect();
        let mut interior = HashSet::new();
        for n in names.keys() {
            let mut rest = n.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if parent.is_empty() {
                    break;
                }
                if !names.contains_key(parent) {
                    interior.insert(parent.to_string());
                }
                if parent == ZONE {
                    break;
                }
                rest = parent;
            }
        }
        interior.insert(ZONE.to_string());
        DnsView {
            index,
            names,
            interior,
        }
    }

    /// The records of a lowercase FQDN: `None` if the name does not exist.
    pub fn lookup(&self, lower_fqdn: &str) -> Option<&[DnsRecord]> {
        match self.names.get(lower_fqdn) {
            Some(r) => Some(r),
            None => self.interior.contains(lower_fqdn).then_some(&[]),
        }
    }

    /// Every name with its records, sorted (for tests and debugging).
    pub fn names(&self) -> BTreeMap<&str, &[DnsRecord]> {
        self.names
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_slice()))
            .collect()
    }
}

fn zone_name() -> Name {
    Name::from_ascii(ZONE).expect("zone name")
}

fn soa(serial: u64) -> Record {
    let zone = zone_name();
    let mname = Name::from_ascii("ns.cairn.").expect("ns name");
    let rname = Name::from_ascii("hostmaster.cairn.").expect("rname");
    let soa = SOA::new(mname, rname, serial as u32, 60, 60, 3600, TTL);
    Record::from_rdata(zone, TTL, RData::SOA(soa))
}

/// Rotates a record list by the query id, so clients spread over the answers.
fn rotated<T: Clone>(v: Vec<T>, id: u16) -> Vec<T> {
    let mut v = v;
    if !v.is_empty() {
        let k = id as usize % v.len();
        v.rotate_left(k);
    }
    v
}

fn addr_record(owner: &Name, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner.clone(), TTL, rdata)
}

/// The answer to one query message, from the view alone. Names outside `cairn.` are
/// REFUSED here (the server forwards them before asking, when it has upstreams).
pub fn answer(view: &DnsView, req: &Message) -> Message {
    let mut resp = Message::new();
    resp.set_header(Header::response_from_request(req.header()));
    resp.add_queries(req.queries().iter().cloned());
    if req.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_ANSWER);
        resp.set_edns(edns);
    }
    if req.op_code() != OpCode::Query {
        resp.set_response_code(ResponseCode::NotImp);
        return resp;
    }
    let [q] = req.queries() else {
        resp.set_response_code(ResponseCode::FormErr);
        return resp;
    };
    let lower = q.name().to_lowercase().to_ascii();
    if !in_zone(&lower) || !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
        resp.set_response_code(ResponseCode::Refused);
        return resp;
    }
    resp.set_authoritative(true);
    let Some(records) = view.lookup(&lower) else {
        resp.set_response_code(ResponseCode::NXDomain);
        resp.add_name_server(soa(view.index));
        return resp;
    };
    let owner = q.name();
    let qt = q.query_type();
    let want = |r: &&DnsRecord| match (qt, r) {
        (RecordType::ANY, _) => true,
        (RecordType::A, DnsRecord::Addr { ip }) => ip.is_ipv4(),
        (RecordType::AAAA, DnsRecord::Addr { ip }) => ip.is_ipv6(),
        (RecordType::SRV, DnsRecord::Srv { .. }) => true,
        _ => false,
    };
    let chosen: Vec<&DnsRecord> = rotated(records.iter().filter(want).collect(), req.id());
    let mut extra: BTreeSet<&str> = BTreeSet::new();
    for r in chosen {
        match r {
            DnsRecord::Addr { ip } => {
                resp.add_answer(addr_record(owner, *ip));
            }
            DnsRecord::Srv { port, target } => {
                let Ok(t) = Name::from_ascii(target) else {
                    continue;
                };
                resp.add_answer(Record::from_rdata(
                    owner.clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 1, *port, t)),
                ));
                extra.insert(target);
            }
        }
    }
    for target in extra {
        let Ok(name) = Name::from_ascii(target) else {
            continue;
        };
        for r in view.lookup(target).unwrap_or(&[]) {
            if let DnsRecord::Addr { ip } = r {
                resp.add_additional(addr_record(&name, *ip));
            }
        }
    }
    if lower == ZONE && matches!(qt, RecordType::SOA | RecordType::ANY) {
        resp.add_answer(soa(view.index));
    }
    if resp.answers().is_empty() {
        resp.add_name_server(soa(view.index));
    }
    resp
}

/// Where a query came in: UDP answers are cut to the client's EDNS size (or 512).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// A name outside the zone: relay the packet to an upstream resolver.
    Forward,
    /// Say nothing: oversize, too short to answer, or not a query (never answer an answer).
    Drop,
}

/// Handles one packet: drops what cannot be answered, answers FORMERR to a query that does
/// not decode, forwards names outside the zone if `forward`, else answers from `view`.
pub fn handle(view: &DnsView, packet: &[u8], transport: Transport, forward: bool) -> Handled {
    if packet.len() > MAX_QUERY_BYTES {
        return Handled::Drop;
    }
    let Ok(header) = Header::from_bytes(packet) else {
        return Handled::Drop;
    };
    if header.message_type() != MessageType::Query {
        return Handled::Drop;
    }
    let req = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            let resp = Message::error_msg(header.id(), header.op_code(), ResponseCode::FormErr);
            return resp.to_vec().map_or(Handled::Drop, Handled::Reply);
        }
    };
    if forward && req.op_code() == OpCode::Query {
        if let [q] = req.queries() {
            if !in_zone(&q.name().to_lowercase().to_ascii()) {
                return Handled::Forward;
            }
        }
    }
    let mut resp = answer(view, &req);
    resp.set_recursion_available(forward);
    let limit = match transport {
        Transport::Udp => req.max_payload().min(MAX_UDP_ANSWER) as usize,
        Transport::Tcp => u16::MAX as usize,
    };
    match resp.to_vec() {
        Ok(b) if b.len() <= limit => Handled::Reply(b),
        Ok(_) => resp
            .truncate()
            .to_vec()
            .map_or(Handled::Drop, Handled::Reply),
        Err(_) => Message::error_msg(req.id(), req.op_code(), ResponseCode::ServFail)
            .to_vec()
            .map_or(Handled::Drop, Handled::Reply),
    }
}

/// An error answer (e.g. SERVFAIL when no upstream answered) to a query packet.
pub fn error_reply(packet: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let req = Message::from_vec(packet).ok()?;
    let mut resp = Message::error_msg(req.id(), req.op_code(), code);
    resp.set_recursion_desired(req.recursion_desired());
    resp.add_queries(req.queries().iter().cloned());
    resp.to_vec().ok()
}

/// Whether `reply` answers `query` (same id): what an upstream sends back is checked.
pub fn is_reply_to(query: &[u8], reply: &[u8]) -> bool {
    match (Header::from_bytes(query), Header::from_bytes(reply)) {
        (Ok(q), Ok(r)) => q.id() == r.id() && r.message_type() == MessageType::Response,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
