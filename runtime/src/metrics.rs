//! Prometheus metrics of an agent (`GET /metrics` on the agent API, bearer token as on every
//! agent route; Prometheus sends it with `authorization.credentials`). Labels are bounded:
//! task states and runtimes are fixed sets, volumes are counted, not labelled per id.
//!
//! - `cairn_agent_tasks{runtime,state}`: tasks known to the agent;
//! - `cairn_agent_task_starts_total{runtime,result}` and
//!   `cairn_agent_task_start_seconds{runtime}`: launches and how long they took;
//! - `cairn_agent_task_{cpu_seconds,memory_bytes,disk_bytes}_total{runtime}`: the summed usage
//!   of running tasks (per task would grow without bound);
//! - `cairn_agent_volumes`, `cairn_agent_volume_bytes`: persistent volumes and their data;
//! - `cairn_agent_heartbeats_total{result}`, `cairn_agent_retries_total`,
//!   `cairn_agent_registered`.

use crate::agent::AgentInfo;
use crate::tasks::TaskManager;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use std::sync::{Arc, Mutex};

pub struct AgentMetrics {
    registry: Registry,
    tasks: IntGaugeVec,
    pub starts: IntCounterVec,
    pub start_seconds: HistogramVec,
    usage: GaugeVec,
    volumes: IntGauge,
    volume_bytes: Gauge,
    heartbeats: IntGaugeVec,
    retries: IntGauge,
    registered: IntGauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("cairn_agent".into()), None).expect("registry");
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("register");
        let tasks = IntGaugeVec::new(
            Opts::new("tasks", "Tasks known to the agent by runtime and state"),
            &["runtime", "state"],
        )
        .expect("tasks");
        reg(Box::new(tasks.clone()));
        let starts = IntCounterVec::new(
            Opts::new("task_starts_total", "Task launches by runtime and result"),
            &["runtime", "result"],
        )
        .expect("starts");
        reg(Box::new(starts.clone()));
        let start_seconds = HistogramVec::new(
            HistogramOpts::new("task_start_seconds", "Time to start a task").buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
            &["runtime"],
        )
        .expect("histogram");
        reg(Box::new(start_seconds.clone()));
        let usage = GaugeVec::new(
            Opts::new(
                "task_usage",
                "Summed usage of running tasks: cpu_seconds, memory_bytes, disk_bytes",
            ),
            &["runtime", "resource"],
        )
        .expect("usage");
        reg(Box::new(usage.clone()));
        let volumes = IntGauge::new("volumes", "Persistent volumes on this agent").expect("g");
        reg(Box::new(volumes.clone()));
        let volume_bytes =
            Gauge::new("volume_bytes", "Bytes held by persistent volumes").expect("g");
        reg(Box::new(volume_bytes.clone()));
        let heartbeats = IntGaugeVec::new(
            Opts::new("heartbeats", "Heartbeats since start by result"),
            &["result"],
        )
        .expect("hb");
        reg(Box::new(heartbeats.clone()));
        let retries = IntGauge::new(
            "retries",
            "Backoff waits of the heartbeat, assignment and status loops since start",
        )
        .expect("g");
        reg(Box::new(retries.clone()));
        let registered =
            IntGauge::new("registered", "1 once the masters know this agent").expect("g");
        reg(Box::new(registered.clone()));
        Self {
            registry,
            tasks,
            starts,
            start_seconds,
            usage,
            volumes,
            volume_bytes,
            heartbeats,
            retries,
            registered,
        }
    }

    /// The text exposition, with the gauges refreshed from the task table and agent info.
    pub fn render(&self, tasks: &TaskManager, info: &Arc<Mutex<AgentInfo>>) -> String {
        self.tasks.reset();
        self.usage.reset();
        for st in tasks.list() {
            let state = format!("{:?}", st.state).to_lowercase();
            self.tasks
                .with_label_values(&[st.runtime.as_str(), state.as_str()])
                .inc();
            if !st.state.is_terminal() {
                let u = &st.usage;
                for (res, v) in [
                    ("cpu_seconds", u.cpu_usec as f64 / 1e6),
                    ("memory_bytes", u.memory_bytes as f64),
                    ("disk_bytes", u.disk_bytes as f64),
                ] {
                    self.usage
                        .with_label_values(&[st.runtime.as_str(), res])
                        .add(v);
                }
            }
        }
        let vols = tasks.volumes().list();
        self.volumes.set(vols.len() as i64);
        self.volume_bytes
            .set(vols.iter().map(|v| tasks.volumes().usage(v)).sum::<u64>() as f64);
        {
            let i = info.lock().expect("info");
            self.heartbeats
                .with_label_values(&["ok"])
                .set(i.heartbeats_ok as i64);
            self.heartbeats
                .with_label_values(&["failed"])
                .set(i.heartbeats_failed as i64);
            self.retries.set(i.retries as i64);
            self.registered.set(i.registered as i64);
        }
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
