//! The scheduler: a pure function from a snapshot of agents and their allocations to task
//! placements. No I/O, no clock, no randomness: the leader runs it, then re-checks the plan
//! against the latest state before committing (see `check_plan`).
//!
//! Placement follows Nomad's approach: candidates are visited from a rotating offset, the
//! first `limit` feasible agents (all of them on small clusters) are scored, and the best
//! wins — `binpack` prefers the fullest, `spread` the emptiest. Constraints follow Marathon:
//! `UNIQUE`, `CLUSTER`, `GROUP_BY[:n]`, `LIKE`, `UNLIKE`, `MAX_PER`, `IS`, on `@hostname`,
//! `@zone`, `@id` or any agent attribute. Resources come from the agent's unreserved pool or,
//! for a workload with a role, from the pool reserved for that role first.

use crate::model::{Agent, AgentStatus, PortRange, Resources};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A placement constraint, `[field, OP, value]` in specs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub field: String,
    pub op: ConstraintOp,
    /// The operand (regex for LIKE/UNLIKE, number for MAX_PER and GROUP_BY).
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConstraintOp {
    Unique,
    Cluster,
    GroupBy,
    Like,
    Unlike,
    MaxPer,
    Is,
}

impl Constraint {
    /// Parses `[field, OP]` or `[field, OP, value]`, naming what is wrong.
    pub fn parse(parts: &[String]) -> Result<Self, String> {
        let (field, op, value) = match parts {
            [f, o] => (f, o, None),
            [f, o, v] => (f, o, Some(v.clone())),
            _ => return Err("a constraint is [field, OP] or [field, OP, value]".into()),
        };
        if field.is_empty() || field.len() > 128 {
            return Err(
                "the field is 1-128 characters (@hostname, @zone, @id or an attribute)".into(),
            );
        }
        let op = match op.as_str() {
            "UNIQUE" => ConstraintOp::Unique,
            "CLUSTER" => ConstraintOp::Cluster,
            "GROUP_BY" => ConstraintOp::GroupBy,
            "LIKE" => ConstraintOp::Like,
            "UNLIKE" => ConstraintOp::Unlike,
            "MAX_PER" => ConstraintOp::MaxPer,
            "IS" => ConstraintOp::Is,
            other => {
                return Err(format!(
                    "unknown operator {other:?}: use UNIQUE, CLUSTER, GROUP_BY, LIKE, UNLIKE, MAX_PER or IS"
                ))
            }
        };
        let c = Constraint {
            field: field.clone(),
            op,
            value,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        let v = self.value.as_deref();
        match self.op {
            ConstraintOp::Unique if v.is_some() => Err("UNIQUE takes no value".into()),
            ConstraintOp::Like | ConstraintOp::Unlike => {
                let v = v.ok_or("LIKE and UNLIKE need a regular expression")?;
                if v.len() > 1024 {
                    return Err("the regular expression is longer than 1024 bytes".into());
                }
                // On its own first: `zzz)|(.*` would otherwise close the anchoring group and
                // match every value.
                regex::RegexBuilder::new(v)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("bad regular expression {v:?}: {e}"))?;
                regex::RegexBuilder::new(&format!("^(?:{v})$"))
                    .size_limit(1 << 20)
                    .build()
                    .map(|_| ())
                    .map_err(|e| format!("bad regular expression {v:?}: {e}"))
            }
            ConstraintOp::MaxPer => match v.map(str::parse::<u32>) {
                Some(Ok(n)) if n > 0 => Ok(()),
                _ => Err("MAX_PER needs a positive number".into()),
            },
            ConstraintOp::GroupBy => match v.map(str::parse::<u32>) {
                None | Some(Ok(1..)) => Ok(()),
                _ => Err("GROUP_BY takes an optional positive number of groups".into()),
            },
            ConstraintOp::Is if v.is_none() => Err("IS needs a value".into()),
            _ => Ok(()),
        }
    }
}

/// How to choose among feasible agents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fill the fullest agent that fits (fewer, busier agents).
    #[default]
    Binpack,
    /// Use the emptiest agent (even load).
    Spread,
}

/// What one workload asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    pub workload: String,
    /// `None` or `*`: unreserved resources only.
    pub role: Option<String>,
    pub cpus: f64,
    pub mem: u64,
    pub disk: u64,
    /// Port numbers; 0 asks for any free port of the agent's ranges.
    pub ports: Vec<u16>,
    pub constraints: Vec<Constraint>,
    pub strategy: Strategy,
}

/// One task placed on an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub agent: String,
    /// The role pool the resources come from (`None`: unreserved).
    pub pool: Option<String>,
    pub ports: Vec<u16>,
}

/// Resources already allocated on an agent (running or assigned tasks).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocation {
    pub pool: Option<String>,
    pub cpus: f64,
    pub mem: u64,
    pub disk: u64,
    pub ports: Vec<u16>,
    /// The workload the task belongs to (for constraints).
    pub workload: String,
}

/// Free capacity of one pool.
#[derive(Clone, Debug, Default)]
struct Pool {
    cpus: f64,
    mem: u64,
    disk: u64,
    total_cpus: f64,
    total_mem: u64,
    ranges: Vec<PortRange>,
}

impl Pool {
    fn new(r: &Resources) -> Self {
        Pool {
            cpus: r.cpus,
            mem: r.mem,
            disk: r.disk,
            total_cpus: r.cpus,
            total_mem: r.mem,
            ranges: r.ports.clone(),
        }
    }

    fn fits(&self, a: &Ask) -> bool {
        self.cpus + 1e-9 >= a.cpus && self.mem >= a.mem && self.disk >= a.disk
    }

    fn take(&mut self, cpus: f64, mem: u64, disk: u64) {
        self.cpus -= cpus;
        self.mem = self.mem.saturating_sub(mem);
        self.disk = self.disk.saturating_sub(disk);
    }

    /// Used fraction after placing `a` (0..=2, cpu + mem).
    fn load_after(&self, a: &Ask) -> f64 {
        let c = if self.total_cpus > 0.0 {
            1.0 - (self.cpus - a.cpus) / self.total_cpus
        } else {
            0.0
        };
        let m = if self.total_mem > 0 {
            1.0 - (self.mem.saturating_sub(a.mem)) as f64 / self.total_mem as f64
        } else {
            0.0
        };
        c + m
    }
}

/// One agent as the scheduler sees it.
#[derive(Clone, Debug)]
struct Node {
    id: String,
    hostname: String,
    attributes: BTreeMap<String, String>,
    unreserved: Pool,
    reserved: BTreeMap<String, Pool>,
    /// Tasks per workload on this agent.
    tasks: HashMap<String, u32>,
    /// Ports in use on the host, whichever pool they came from.
    used_ports: Vec<u16>,
}

impl Node {
    /// The port ranges `role` may use: its reservation's first, then the unreserved ones.
    fn ranges_for<'a>(&'a self, role: Option<&str>) -> impl Iterator<Item = &'a PortRange> + 'a {
        role.and_then(|r| self.reserved.get(r))
            .into_iter()
            .flat_map(|p| p.ranges.iter())
            .chain(self.unreserved.ranges.iter())
    }

    fn has_port(&self, role: Option<&str>, p: u16) -> bool {
        self.ranges_for(role).any(|r| r.begin <= p && p <= r.end) && !self.used_ports.contains(&p)
    }

    /// The ports `want` resolves to (0 = the lowest free port), if all are free.
    fn ports_for(&self, role: Option<&str>, want: &[u16]) -> Option<Vec<u16>> {
        if want.is_empty() {
            return Some(Vec::new());
        }
        let fixed: Vec<u16> = want.iter().copied().filter(|&w| w != 0).collect();
        for (i, &w) in fixed.iter().enumerate() {
            if !self.has_port(role, w) || fixed[..i].contains(&w) {
                return None;
            }
        }
        let mut free = self
            .ranges_for(role)
            .flat_map(|r| r.begin..=r.end)
            .filter(|p| !self.used_ports.contains(p) && !fixed.contains(p));
        want.iter()
            .map(|&w| if w == 0 { free.next() } else { Some(w) })
            .collect()
    }
}

impl Node {
    fn field(&self, f: &str) -> Option<&str> {
        match f {
            "@hostname" => Some(&self.hostname),
            "@id" => Some(&self.id),
            "@zone" => self.attributes.get("zone").map(String::as_str),
            other => self.attributes.get(other).map(String::as_str),
        }
    }
}

/// The cluster as the scheduler sees it: active agents with what is free on each.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    /// Agents running tasks of each workload.
    by_workload: HashMap<String, Vec<usize>>,
}

/// Why an ask could not be (fully) placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub placed: usize,
    pub wanted: usize,
    pub reason: String,
}

impl Snapshot {
    /// Active agents and their allocations.
    pub fn new<'a>(
        agents: impl IntoIterator<Item = &'a Agent>,
        allocations: impl IntoIterator<Item = (&'a str, Allocation)>,
    ) -> Self {
        let mut s = Snapshot::default();
        let mut list: Vec<&Agent> = agents
            .into_iter()
            .filter(|a| a.status == AgentStatus::Active)
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        for a in list {
            s.index.insert(a.id.clone(), s.nodes.len());
            s.nodes.push(Node {
                id: a.id.clone(),
                hostname: a.hostname.clone(),
                attributes: a.attributes.clone(),
                unreserved: Pool::new(&a.resources.unreserved),
                reserved: a
                    .resources
                    .reserved
                    .iter()
                    .map(|(r, res)| (r.clone(), Pool::new(res)))
                    .collect(),
                tasks: HashMap::new(),
                used_ports: Vec::new(),
            });
        }
        for (agent, al) in allocations {
            if let Some(&i) = s.index.get(agent) {
                let n = &mut s.nodes[i];
                let pool = match &al.pool {
                    Some(r) => n.reserved.get_mut(r),
                    None => Some(&mut n.unreserved),
                };
                if let Some(p) = pool {
                    p.take(al.cpus, al.mem, al.disk);
                }
                n.used_ports.extend_from_slice(&al.ports);
                let c = n.tasks.entry(al.workload.clone()).or_default();
                *c += 1;
                if *c == 1 {
                    s.by_workload.entry(al.workload).or_default().push(i);
                }
            }
        }
        s
    }

    /// Tasks of `ask.workload` per value of each constraint's field. Only agents that run the
    /// workload are visited, except for GROUP_BY, which balances over every value.
    fn counts_per_value(&self, ask: &Ask) -> Vec<HashMap<String, u32>> {
        let running = self.by_workload.get(&ask.workload);
        ask.constraints
            .iter()
            .map(|c| {
                let mut m: HashMap<String, u32> = HashMap::new();
                if c.op == ConstraintOp::GroupBy {
                    for node in &self.nodes {
                        if let Some(v) = node.field(&c.field) {
                            if !m.contains_key(v) {
                                m.insert(v.to_string(), 0);
                            }
                        }
                    }
                }
                for &i in running.into_iter().flatten() {
                    let node = &self.nodes[i];
                    if let Some(v) = node.field(&c.field) {
                        *m.entry(v.to_string()).or_default() +=
                            node.tasks.get(&ask.workload).copied().unwrap_or(0);
                    }
                }
                m
            })
            .collect()
    }

    pub fn agents(&self) -> usize {
        self.nodes.len()
    }

    /// Places `count` tasks of `ask`, updating the snapshot. Returns the placements made; if
    /// fewer than `count` fit, also why.
    pub fn place(&mut self, ask: &Ask, count: usize) -> (Vec<Placement>, Option<Unplaced>) {
        let mut out = Vec::with_capacity(count);
        let n = self.nodes.len();
        if n == 0 {
            return (out, Some(unplaced(0, count, "no active agents")));
        }
        let regexes = compile_regexes(ask);
        // Tasks of this workload per value of each constrained field.
        let mut per_value = self.counts_per_value(ask);
        for (ci, c) in ask.constraints.iter().enumerate() {
            if c.op == ConstraintOp::GroupBy {
                if let Some(Ok(want)) = c.value.as_deref().map(str::parse::<usize>) {
                    if per_value[ci].len() < want {
                        return (
                            out,
                            Some(unplaced(
                                0,
                                count,
                                &format!(
                                    "GROUP_BY {} expects {want} values, the cluster has {}",
                                    c.field,
                                    per_value[ci].len()
                                ),
                            )),
                        );
                    }
                }
            }
        }
        // Nomad's limit: score at most this many feasible agents per placement.
        let limit = ((n as f64).log2().ceil() as usize).max(8);
        let mut cursor = stable_hash(&ask.workload) as usize % n;
        let mut last_reason = String::new();
        for placed in 0..count {
            let mut best: Option<(usize, Option<String>, Vec<u16>, f64)> = None;
            let mut feasible = 0;
            let mut rejected: BTreeMap<&'static str, usize> = BTreeMap::new();
            for step in 0..n {
                let i = (cursor + step) % n;
                let node = &self.nodes[i];
                if let Err(why) = self.constraints_hold(node, ask, &regexes, &per_value) {
                    *rejected.entry(why).or_default() += 1;
                    continue;
                }
                let Some((pool, ports, load)) = fit(node, ask) else {
                    *rejected.entry("resources").or_default() += 1;
                    continue;
                };
                let score = match ask.strategy {
                    Strategy::Binpack => load,
                    // Fewest tasks of this workload first, then the least loaded.
                    Strategy::Spread => {
                        -(node.tasks.get(&ask.workload).copied().unwrap_or(0) as f64) * 4.0 - load
                    }
                };
                if best.as_ref().is_none_or(|b| score > b.3 + 1e-12) {
                    best = Some((i, pool, ports, score));
                }
                feasible += 1;
                if feasible >= limit {
                    break;
                }
            }
            let Some((i, pool, ports, _)) = best else {
                last_reason = format!(
                    "no agent fits: {}",
                    rejected
                        .iter()
                        .map(|(k, v)| format!("{v} rejected by {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return (out, Some(unplaced(placed, count, &last_reason)));
            };
            // Commit the placement to the snapshot.
            let node = &mut self.nodes[i];
            let p = match &pool {
                Some(r) => node.reserved.get_mut(r).expect("pool exists"),
                None => &mut node.unreserved,
            };
            p.take(ask.cpus, ask.mem, ask.disk);
            node.used_ports.extend_from_slice(&ports);
            let count = node.tasks.entry(ask.workload.clone()).or_default();
            *count += 1;
            if *count == 1 {
                self.by_workload
                    .entry(ask.workload.clone())
                    .or_default()
                    .push(i);
            }
            for (ci, c) in ask.constraints.iter().enumerate() {
                if let Some(v) = node.field(&c.field) {
                    *per_value[ci].entry(v.to_string()).or_default() += 1;
                }
            }
            out.push(Placement {
                agent: node.id.clone(),
                pool,
                ports,
            });
            // Binpack keeps filling from the same agent; spread moves on.
            cursor = match ask.strategy {
                Strategy::Binpack => i,
                Strategy::Spread => (i + 1) % n,
            };
        }
        let _ = last_reason;
        (out, None)
    }

    fn constraints_hold(
        &self,
        node: &Node,
        ask: &Ask,
        regexes: &[Option<regex::Regex>],
        per_value: &[HashMap<String, u32>],
    ) -> Result<(), &'static str> {
        for (ci, c) in ask.constraints.iter().enumerate() {
            let v = node.field(&c.field);
            let count = |v: &str| per_value[ci].get(v).copied().unwrap_or(0);
            let ok = match c.op {
                ConstraintOp::Unique => v.is_some_and(|v| count(v) == 0),
                ConstraintOp::Cluster => match (&c.value, v) {
                    (Some(want), Some(v)) => v == want,
                    // Without a value: the value the workload's tasks already have, if any.
                    (None, Some(v)) => {
                        let used: Vec<&String> = per_value[ci]
                            .iter()
                            .filter(|(_, &n)| n > 0)
                            .map(|(k, _)| k)
                            .collect();
                        used.is_empty() || used.iter().all(|u| *u == v)
                    }
                    (_, None) => false,
                },
                ConstraintOp::Is => v.is_some_and(|v| Some(v) == c.value.as_deref()),
                ConstraintOp::Like => {
                    v.is_some_and(|v| regexes[ci].as_ref().is_some_and(|r| r.is_match(v)))
                }
                ConstraintOp::Unlike => {
                    !v.is_some_and(|v| regexes[ci].as_ref().is_none_or(|r| r.is_match(v)))
                }
                ConstraintOp::MaxPer => {
                    let max: u32 = c.value.as_deref().and_then(|x| x.parse().ok()).unwrap_or(0);
                    v.is_some_and(|v| count(v) < max)
                }
                ConstraintOp::GroupBy => v.is_some_and(|v| {
                    let min = per_value[ci].values().copied().min().unwrap_or(0);
                    count(v) <= min
                }),
            };
            if !ok {
                return Err(match c.op {
                    ConstraintOp::Unique => "UNIQUE",
                    ConstraintOp::Cluster => "CLUSTER",
                    ConstraintOp::GroupBy => "GROUP_BY",
                    ConstraintOp::Like => "LIKE",
                    ConstraintOp::Unlike => "UNLIKE",
                    ConstraintOp::MaxPer => "MAX_PER",
                    ConstraintOp::Is => "IS",
                });
            }
        }
        Ok(())
    }
}

/// The pool a task of `ask` fits in on `node` (role pool first), its ports (from the role's
/// ranges, then the unreserved ones), and the load after.
fn fit(node: &Node, ask: &Ask) -> Option<(Option<String>, Vec<u16>, f64)> {
    let role = ask.role.as_deref().filter(|r| *r != "*");
    let ports = node.ports_for(role, &ask.ports)?;
    if let Some(role) = role {
        if let Some(p) = node.reserved.get(role) {
            if p.fits(ask) {
                return Some((Some(role.to_string()), ports, p.load_after(ask)));
            }
        }
    }
    let p = &node.unreserved;
    p.fits(ask).then(|| (None, ports, p.load_after(ask)))
}

/// The anchored regular expressions of an ask's LIKE and UNLIKE constraints (by position).
fn compile_regexes(ask: &Ask) -> Vec<Option<regex::Regex>> {
    ask.constraints
        .iter()
        .map(|c| match c.op {
            ConstraintOp::Like | ConstraintOp::Unlike => c
                .value
                .as_deref()
                .and_then(|v| regex::Regex::new(&format!("^(?:{v})$")).ok()),
            _ => None,
        })
        .collect()
}

fn unplaced(placed: usize, wanted: usize, reason: &str) -> Unplaced {
    Unplaced {
        placed,
        wanted,
        reason: reason.to_string(),
    }
}

/// FNV-1a: a stable starting point per workload (no randomness in a pure function).
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl Snapshot {
    /// Active agents of the cluster state, with what its live tasks hold.
    pub fn from_state(state: &crate::state::State) -> Snapshot {
        Snapshot::new(
            state.agents.values(),
            state.tasks.values().filter(|t| t.is_live()).map(|t| {
                (
                    t.agent.as_str(),
                    Allocation {
                        pool: t.pool.clone(),
                        cpus: t.resources.cpus,
                        mem: t.resources.mem,
                        disk: t.resources.disk,
                        ports: t.ports.iter().map(|p| p.number).collect(),
                        workload: t.workload.clone(),
                    },
                )
            }),
        )
    }
}

/// What one task of a workload asks of the scheduler.
pub fn ask_for(w: &crate::model::Workload) -> Ask {
    Ask {
        workload: w.id.clone(),
        role: w.role.clone(),
        cpus: w.resources.cpus,
        mem: w.resources.mem,
        disk: w.resources.disk,
        ports: w.ports.iter().map(|p| p.number).collect(),
        constraints: w.constraints.clone(),
        strategy: w.strategy,
    }
}

/// Re-checks a plan computed on an older snapshot against the current one (the leader does
/// this before committing): every placement must still fit and satisfy the constraints.
/// Returns the index of the first placement that no longer holds.
pub fn check_plan(current: &Snapshot, ask: &Ask, plan: &[Placement]) -> Result<(), usize> {
    let mut s = current.clone();
    let regexes = compile_regexes(ask);
    // Counted once, then kept up to date placement by placement (as `place` does).
    let mut per_value = s.counts_per_value(ask);
    for (k, p) in plan.iter().enumerate() {
        let Some(&i) = s.index.get(&p.agent) else {
            return Err(k);
        };
        let node = &s.nodes[i];
        if s.constraints_hold(node, ask, &regexes, &per_value).is_err() {
            return Err(k);
        }
        let pool = match &p.pool {
            Some(r) => match node.reserved.get(r) {
                Some(pool) => pool,
                None => return Err(k),
            },
            None => &node.unreserved,
        };
        let role = ask.role.as_deref().filter(|r| *r != "*");
        if !pool.fits(ask) || p.ports.iter().any(|&port| !node.has_port(role, port)) {
            return Err(k);
        }
        let node = &mut s.nodes[i];
        let pool = match &p.pool {
            Some(r) => node.reserved.get_mut(r).expect("checked"),
            None => &mut node.unreserved,
        };
        pool.take(ask.cpus, ask.mem, ask.disk);
        node.used_ports.extend_from_slice(&p.ports);
        let count = node.tasks.entry(ask.workload.clone()).or_default();
        *count += 1;
        if *count == 1 {
            s.by_workload
                .entry(ask.workload.clone())
                .or_default()
                .push(i);
        }
        for (ci, c) in ask.constraints.iter().enumerate() {
            if let Some(v) = s.nodes[i].field(&c.field) {
                *per_value[ci].entry(v.to_string()).or_default() += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AgentResources;
    use proptest::prelude::{
        prop_assert, prop_assert_eq, prop_oneof, proptest, Just, Strategy as Gen,
    };

    fn agent(id: &str, cpus: f64, mem: u64, attrs: &[(&str, &str)]) -> Agent {
        Agent {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: String::new(),
            resources: AgentResources {
                unreserved: Resources {
                    cpus,
                    mem,
                    disk: 10_000,
                    ports: vec![PortRange {
                        begin: 31000,
                        end: 31009,
                    }],
                },
                reserved: BTreeMap::new(),
            },
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: AgentStatus::Active,
            registered_at: 0,
            status_changed_at: 0,
            version: String::new(),
        }
    }

    fn ask(w: &str, cpus: f64, constraints: &[&[&str]]) -> Ask {
        Ask {
            workload: w.into(),
            role: None,
            cpus,
            mem: 64,
            disk: 0,
            ports: vec![],
            constraints: constraints
                .iter()
                .map(|c| {
                    Constraint::parse(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
                })
                .collect(),
            strategy: Strategy::Binpack,
        }
    }

    fn three() -> Vec<Agent> {
        vec![
            agent("a", 4.0, 4096, &[("zone", "z1"), ("rack", "r1")]),
            agent("b", 4.0, 4096, &[("zone", "z2"), ("rack", "r1")]),
            agent("c", 4.0, 4096, &[("zone", "z3"), ("rack", "r2")]),
        ]
    }

    fn agents_of(p: &[Placement]) -> Vec<&str> {
        p.iter().map(|p| p.agent.as_str()).collect()
    }

    #[test]
    fn binpack_fills_one_agent_spread_uses_all() {
        let agents = three();
        let mut s = Snapshot::new(&agents, []);
        let (p, none) = s.place(&ask("w", 1.0, &[]), 3);
        assert!(none.is_none());
        let first = p[0].agent.clone();
        assert!(p.iter().all(|x| x.agent == first), "{p:?}");
        let mut s = Snapshot::new(&agents, []);
        let mut a = ask("w", 1.0, &[]);
        a.strategy = Strategy::Spread;
        let (p, _) = s.place(&a, 3);
        let mut used = agents_of(&p);
        used.sort();
        assert_eq!(used, ["a", "b", "c"]);
    }

    #[test]
    fn each_operator() {
        let agents = three();
        let place = |a: Ask, n| Snapshot::new(&agents, []).place(&a, n);
        // UNIQUE: one per zone, a fourth does not fit.
        let (p, why) = place(ask("w", 0.1, &[&["@zone", "UNIQUE"]]), 4);
        assert_eq!(p.len(), 3);
        assert!(why.unwrap().reason.contains("UNIQUE"));
        // CLUSTER with a value, and without (all on the first one's value).
        let (p, _) = place(ask("w", 0.1, &[&["rack", "CLUSTER", "r2"]]), 2);
        assert_eq!(agents_of(&p), ["c", "c"]);
        let mut a = ask("w", 0.1, &[&["rack", "CLUSTER"]]);
        a.strategy = Strategy::Spread;
        let (p, _) = place(a, 4);
        let racks: std::collections::HashSet<_> = p
            .iter()
            .map(|x| agents.iter().find(|a| a.id == x.agent).unwrap().attributes["rack"].clone())
            .collect();
        assert_eq!(racks.len(), 1, "{p:?}");
        // GROUP_BY: even across zones.
        let (p, _) = place(ask("w", 0.1, &[&["@zone", "GROUP_BY"]]), 6);
        for id in ["a", "b", "c"] {
            assert_eq!(p.iter().filter(|x| x.agent == id).count(), 2, "{p:?}");
        }
        let (_, why) = place(ask("w", 0.1, &[&["@zone", "GROUP_BY", "4"]]), 1);
        assert!(why.unwrap().reason.contains("expects 4"));
        // LIKE / UNLIKE with regexes on the hostname.
        let (p, _) = place(ask("w", 0.1, &[&["@hostname", "LIKE", "host-[ab]"]]), 4);
        assert!(p.iter().all(|x| x.agent != "c"));
        let (p, _) = place(ask("w", 0.1, &[&["@hostname", "UNLIKE", "host-[ab]"]]), 2);
        assert_eq!(agents_of(&p), ["c", "c"]);
        // MAX_PER.
        let (p, why) = place(ask("w", 0.1, &[&["rack", "MAX_PER", "2"]]), 5);
        assert_eq!(p.len(), 4);
        assert!(why.unwrap().reason.contains("MAX_PER"));
        // IS on @id.
        let (p, _) = place(ask("w", 0.1, &[&["@id", "IS", "b"]]), 2);
        assert_eq!(agents_of(&p), ["b", "b"]);
    }

    #[test]
    fn roles_use_their_reservations_and_others_cannot() {
        let mut a = agent("r", 1.0, 1024, &[]);
        a.resources.reserved.insert(
            "prod".into(),
            Resources {
                cpus: 4.0,
                mem: 4096,
                disk: 100,
                ports: vec![],
            },
        );
        let agents = vec![a];
        let mut s = Snapshot::new(&agents, []);
        // An unroled workload sees only 1 cpu.
        let (p, why) = s.place(&ask("dev", 0.5, &[]), 4);
        assert_eq!(p.len(), 2);
        assert!(why.unwrap().reason.contains("resources"));
        let mut prod = ask("prod", 1.0, &[]);
        prod.role = Some("prod".into());
        let (p, why) = s.place(&prod, 4);
        assert!(why.is_none());
        assert!(p.iter().all(|x| x.pool.as_deref() == Some("prod")));
    }

    #[test]
    fn ports_fixed_and_dynamic() {
        let agents = vec![agent("a", 8.0, 8192, &[])];
        let mut s = Snapshot::new(&agents, []);
        let mut a = ask("w", 0.1, &[]);
        a.ports = vec![31005, 0];
        let (p, _) = s.place(&a, 1);
        assert_eq!(p[0].ports, vec![31005, 31000]);
        // The same fixed port is taken now.
        let (p, why) = s.place(&a, 1);
        assert!(p.is_empty() && why.is_some());
        a.ports = vec![0, 0, 0];
        let (p, _) = s.place(&a, 1);
        assert_eq!(p[0].ports, vec![31001, 31002, 31003]);
    }

    #[test]
    fn bad_constraints_are_named() {
        let parse = |c: &[&str]| {
            Constraint::parse(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
        };
        assert!(parse(&["x", "NEAR"]).contains("unknown operator"));
        assert!(parse(&["x", "LIKE", "("]).contains("bad regular expression"));
        assert!(parse(&["x", "MAX_PER", "0"]).contains("positive"));
        assert!(parse(&["x"]).contains("[field, OP"));
    }

    #[test]
    fn a_stale_plan_is_rejected() {
        let agents = vec![agent("a", 2.0, 4096, &[])];
        let a = ask("w", 1.0, &[]);
        let (plan, _) = Snapshot::new(&agents, []).place(&a, 2);
        assert_eq!(plan.len(), 2);
        // Meanwhile another task took a cpu on the agent.
        let now = Snapshot::new(
            &agents,
            [(
                "a",
                Allocation {
                    cpus: 1.0,
                    workload: "other".into(),
                    ..Default::default()
                },
            )],
        );
        assert_eq!(check_plan(&now, &a, &plan), Err(1));
        assert_eq!(check_plan(&Snapshot::new(&agents, []), &a, &plan), Ok(()));
    }

    fn arb_agents() -> impl Gen<Value = Vec<Agent>> {
        proptest::collection::vec(
            (
                1u32..16,
                256u64..8192,
                0usize..3,
                0usize..4,
                proptest::bool::ANY,
            ),
            1..24,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (c, m, zone, rack, prod))| {
                    let mut a = agent(
                        &format!("n{i:02}"),
                        c as f64,
                        m,
                        &[
                            ("zone", ["z1", "z2", "z3"][zone]),
                            ("rack", ["r1", "r2", "r3", "r4"][rack]),
                        ],
                    );
                    if prod {
                        a.resources.reserved.insert(
                            "prod".into(),
                            Resources {
                                cpus: 2.0,
                                mem: 1024,
                                disk: 1000,
                                ports: vec![],
                            },
                        );
                    }
                    a
                })
                .collect()
        })
    }

    fn arb_ask() -> impl Gen<Value = (Ask, usize)> {
        let constraint = prop_oneof![
            Just(vec!["@zone", "UNIQUE"]),
            Just(vec!["@hostname", "UNIQUE"]),
            Just(vec!["rack", "CLUSTER", "r2"]),
            Just(vec!["rack", "CLUSTER"]),
            Just(vec!["@zone", "GROUP_BY"]),
            Just(vec!["@hostname", "LIKE", "host-n0[0-9]"]),
            Just(vec!["rack", "UNLIKE", "r[12]"]),
            Just(vec!["rack", "MAX_PER", "2"]),
            Just(vec!["@zone", "IS", "z1"]),
        ];
        (
            proptest::collection::vec(constraint, 0..3),
            1u32..40,
            16u64..2048,
            proptest::collection::vec(prop_oneof![Just(0u16), 31000u16..31010], 0..3),
            proptest::bool::ANY,
            proptest::bool::ANY,
            1usize..30,
        )
            .prop_map(|(cs, tenths, mem, ports, spread, role, count)| {
                (
                    Ask {
                        workload: "w".into(),
                        role: role.then(|| "prod".to_string()),
                        cpus: tenths as f64 / 10.0,
                        mem,
                        disk: 0,
                        ports,
                        constraints: cs
                            .iter()
                            .map(|c| {
                                Constraint::parse(
                                    &c.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                                )
                                .unwrap()
                            })
                            .collect(),
                        strategy: if spread {
                            Strategy::Spread
                        } else {
                            Strategy::Binpack
                        },
                    },
                    count,
                )
            })
    }

    proptest! {
        /// No agent is ever over-committed, and every constraint holds over the whole plan.
        #[test]
        fn plans_never_overcommit_and_keep_constraints(agents in arb_agents(), asks in proptest::collection::vec(arb_ask(), 1..4)) {
            let mut s = Snapshot::new(&agents, []);
            let mut all: Vec<(Ask, Placement)> = Vec::new();
            for (i, (mut a, count)) in asks.into_iter().enumerate() {
                a.workload = format!("w{i}");
                let before = s.clone();
                let (plan, _) = s.place(&a, count);
                prop_assert!(check_plan(&before, &a, &plan).is_ok());
                all.extend(plan.into_iter().map(|p| (a.clone(), p)));
            }
            // Resources per agent and pool.
            for ag in &agents {
                let mut pools: BTreeMap<Option<String>, (f64, u64, Vec<u16>)> = BTreeMap::new();
                for (a, p) in all.iter().filter(|(_, p)| p.agent == ag.id) {
                    let e = pools.entry(p.pool.clone()).or_default();
                    e.0 += a.cpus;
                    e.1 += a.mem;
                    for port in &p.ports {
                        prop_assert!(!e.2.contains(port), "port {} twice on {}", port, ag.id);
                        e.2.push(*port);
                        prop_assert!((31000..=31009).contains(port));
                    }
                    if p.pool.is_some() {
                        prop_assert_eq!(p.pool.as_deref(), a.role.as_deref());
                    }
                }
                for (pool, (c, m, _)) in pools {
                    let r = match &pool {
                        Some(role) => &ag.resources.reserved[role],
                        None => &ag.resources.unreserved,
                    };
                    prop_assert!(c <= r.cpus + 1e-6, "{} cpus on {} ({:?}) of {}", c, ag.id, pool, r.cpus);
                    prop_assert!(m <= r.mem);
                }
            }
            // Constraints, per workload.
            let mut workloads: BTreeMap<String, (Ask, Vec<&Agent>)> = BTreeMap::new();
            for (a, p) in &all {
                let ag = agents.iter().find(|x| x.id == p.agent).unwrap();
                workloads.entry(a.workload.clone()).or_insert_with(|| (a.clone(), vec![])).1.push(ag);
            }
            for (_, (a, placed)) in workloads {
                for c in &a.constraints {
                    let val = |ag: &Agent| match c.field.as_str() {
                        "@hostname" => Some(ag.hostname.clone()),
                        "@zone" => ag.attributes.get("zone").cloned(),
                        f => ag.attributes.get(f).cloned(),
                    };
                    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
                    for ag in &placed {
                        let v = val(ag);
                        prop_assert!(v.is_some() || c.op == ConstraintOp::Unlike);
                        *counts.entry(v.clone().unwrap_or_default()).or_default() += 1;
                        let v = v.unwrap_or_default();
                        let re = c.value.as_ref().map(|x| regex::Regex::new(&format!("^(?:{x})$")).unwrap());
                        match c.op {
                            ConstraintOp::Like => prop_assert!(re.unwrap().is_match(&v)),
                            ConstraintOp::Unlike => prop_assert!(!re.unwrap().is_match(&v)),
                            ConstraintOp::Is | ConstraintOp::Cluster if c.value.is_some() => {
                                prop_assert_eq!(Some(&v), c.value.as_ref())
                            }
                            _ => {}
                        }
                    }
                    match c.op {
                        ConstraintOp::Unique => prop_assert!(counts.values().all(|&n| n == 1)),
                        ConstraintOp::Cluster => prop_assert!(counts.len() <= 1),
                        ConstraintOp::MaxPer => prop_assert!(counts.values().all(|&n| n <= 2)),
                        ConstraintOp::GroupBy => {
                            // Balanced over every value the cluster has.
                            let mut all_vals: BTreeMap<String, u32> = agents.iter().filter_map(val).map(|v| (v, 0)).collect();
                            for (k, n) in counts { all_vals.insert(k, n); }
                            let (mn, mx) = (all_vals.values().min().unwrap(), all_vals.values().max().unwrap());
                            prop_assert!(mx - mn <= 1, "GROUP_BY unbalanced: {:?}", all_vals);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
