//! Load shedding and fairness on a master's API: every request belongs to a class (agents'
//! control traffic, long-polls and event streams, users), each class has a bound on the
//! requests it may have in flight, and a request past its class's bound is answered at once
//! with `429 Too Many Requests` and a jittered `Retry-After`, before its body is read. One
//! class filling up never takes a seat from another, as in Kubernetes' API Priority and
//! Fairness; Raft is not here at all (it has its own listener and runtime, `raft::node`).

use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Request classes, each with its own bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Agents' heartbeats: cheap and leader-local, and an agent whose heartbeats are refused
    /// for `--agent-timeout` is declared unreachable, so they never wait behind status
    /// reports (which hold their seat until a Raft commit).
    Heartbeat,
    /// Agents' registration and status reports.
    Agent,
    /// Blocking queries (`?index=`), agents' assignment long-polls and event streams: cheap
    /// while they wait, but each holds a connection.
    LongPoll,
    /// Everything else people and tools send.
    User,
    /// `/healthz` and `/metrics`: never shed, so an overloaded master stays observable.
    Exempt,
}

impl Class {
    pub fn label(self) -> &'static str {
        match self {
            Class::Heartbeat => "heartbeat",
            Class::Agent => "agent",
            Class::LongPoll => "longpoll",
            Class::User => "user",
            Class::Exempt => "exempt",
        }
    }
}

/// The pure classification of a request by method, path and query.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> Class {
    if path == "/healthz" || path == "/metrics" {
        return Class::Exempt;
    }
    let has_index = query
        .unwrap_or("")
        .split('&')
        .any(|kv| kv.starts_with("index="));
    if path == "/api/v1/events" || has_index {
        return Class::LongPoll;
    }
    if let Some(rest) = path.strip_prefix("/api/v1/agents/") {
        if rest.ends_with("/heartbeat") {
            return Class::Heartbeat;
        }
        if rest.ends_with("/status") {
            return Class::Agent;
        }
        if rest.ends_with("/assignments") {
            return Class::LongPoll;
        }
    }
    if path == "/api/v1/agents" && method == Method::POST {
        return Class::Agent;
    }
    Class::User
}

/// In-flight bounds per class.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub heartbeat: usize,
    pub agent: usize,
    pub longpoll: usize,
    pub user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            heartbeat: 2048,
            agent: 512,
            longpoll: 20_000,
            user: 256,
        }
    }
}

/// The semaphores and their metrics.
pub struct Admission {
    heartbeat: Arc<Semaphore>,
    agent: Arc<Semaphore>,
    longpoll: Arc<Semaphore>,
    user: Arc<Semaphore>,
    pub shed: IntCounterVec,
    pub in_flight: IntGaugeVec,
}

/// A seat held for the life of one request (released on drop).
pub struct Seat {
    _permit: Option<OwnedSemaphorePermit>,
    gauge: prometheus::IntGauge,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Admission {
    pub fn new(limits: Limits, registry: &Registry) -> Self {
        let shed = IntCounterVec::new(
            Opts::new(
                "api_shed_total",
                "Requests refused with 429 because their class was full",
            ),
            &["class"],
        )
        .expect("counter");
        let in_flight = IntGaugeVec::new(
            Opts::new("api_in_flight", "Requests in flight by class"),
            &["class"],
        )
        .expect("gauge");
        registry.register(Box::new(shed.clone())).expect("register");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("register");
        Self {
            heartbeat: Arc::new(Semaphore::new(limits.heartbeat)),
            agent: Arc::new(Semaphore::new(limits.agent)),
            longpoll: Arc::new(Semaphore::new(limits.longpoll)),
            user: Arc::new(Semaphore::new(limits.user)),
            shed,
            in_flight,
        }
    }

    /// Takes a seat in the request's class, or says how long to wait before retrying.
    pub fn admit(&self, class: Class) -> Result<Seat, Response> {
        let sem = match class {
            Class::Heartbeat => Some(&self.heartbeat),
            Class::Agent => Some(&self.agent),
            Class::LongPoll => Some(&self.longpoll),
            Class::User => Some(&self.user),
            Class::Exempt => None,
        };
        let permit = match sem.map(|s| s.clone().try_acquire_owned()) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                self.shed.with_label_values(&[class.label()]).inc();
                return Err(overloaded(class));
            }
        };
        let gauge = self.in_flight.with_label_values(&[class.label()]);
        gauge.inc();
        Ok(Seat {
            _permit: permit,
            gauge,
        })
    }
}

/// `429` with a `Retry-After` of 1 to 3 seconds (jittered, so refused clients do not return
/// together) and a JSON error naming the class.
pub fn overloaded(class: Class) -> Response {
    use rand::Rng;
    let secs: u64 = rand::thread_rng().gen_range(1..=3);
    let body = crate::error::ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "overloaded",
        format!(
            "this master has too many {} requests in flight; retry after {secs} s",
            class.label()
        ),
    );
    let mut r = body.into_response();
    r.headers_mut()
        .insert("retry-after", HeaderValue::from(secs));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let cases = [
            (Method::GET, "/healthz", None, Class::Exempt),
            (Method::GET, "/metrics", None, Class::Exempt),
            (Method::GET, "/api/v1/events", None, Class::LongPoll),
            (
                Method::GET,
                "/api/v1/tasks",
                Some("index=5&wait=30s"),
                Class::LongPoll,
            ),
            (
                Method::GET,
                "/api/v1/tasks",
                Some("stale=true"),
                Class::User,
            ),
            (
                Method::GET,
                "/api/v1/agents/a1/assignments",
                Some("stale=true"),
                Class::LongPoll,
            ),
            (
                Method::POST,
                "/api/v1/agents/a1/heartbeat",
                None,
                Class::Heartbeat,
            ),
            (Method::POST, "/api/v1/agents/a1/status", None, Class::Agent),
            (Method::POST, "/api/v1/agents", None, Class::Agent),
            (Method::GET, "/api/v1/agents", None, Class::User),
            (Method::POST, "/api/v1/workloads", None, Class::User),
            (
                Method::GET,
                "/api/v1/cluster",
                Some("xindex=1"),
                Class::User,
            ),
        ];
        for (m, p, q, want) in cases {
            assert_eq!(classify(&m, p, q), want, "{m} {p} {q:?}");
        }
    }

    #[test]
    fn a_full_class_sheds_with_retry_after_and_others_still_admit() {
        let reg = Registry::new();
        let a = Admission::new(
            Limits {
                heartbeat: 1,
                agent: 2,
                longpoll: 1,
                user: 1,
            },
            &reg,
        );
        let s1 = a.admit(Class::Agent).unwrap();
        let _s2 = a.admit(Class::Agent).unwrap();
        let refused = a
            .admit(Class::Agent)
            .err()
            .expect("third agent request refused");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let after: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&after));
        // Other classes keep their own seats.
        let _u = a.admit(Class::User).unwrap();
        let _l = a.admit(Class::LongPoll).unwrap();
        let _e = a.admit(Class::Exempt).unwrap();
        assert_eq!(a.shed.with_label_values(&["agent"]).get(), 1);
        assert_eq!(a.in_flight.with_label_values(&["agent"]).get(), 2);
        drop(s1);
        assert_eq!(a.in_flight.with_label_values(&["agent"]).get(), 1);
        assert!(a.admit(Class::Agent).is_ok());
    }
}
