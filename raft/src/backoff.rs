//! Capped exponential backoff with full jitter (sleep a uniform random time in
//! `[0, min(cap, base * 2^attempt)]`), used by every retry loop in Cairn: agents, simulated
//! agents, the CLI's waits and forwarding between masters. Full jitter spreads the retries of
//! many clients that failed together, so a recovering master is not hit by them at once; a
//! server's `Retry-After` raises the wait to at least what it asked.

use rand::Rng;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    /// Retries taken since creation (for metrics).
    pub retries: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            retries: 0,
        }
    }

    /// The ceiling of the next wait: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next wait: full jitter under the ceiling, at least `retry_after` when the server
    /// gave one (plus jitter of up to a second, so refused clients do not return together).
    pub fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let mut rng = rand::thread_rng();
        let ceiling = self.ceiling();
        let jittered = ceiling.mul_f64(rng.gen::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        self.retries += 1;
        match retry_after {
            Some(ra) => ra.max(jittered) + Duration::from_millis(rng.gen_range(0..1000)),
            None => jittered,
        }
    }

    /// After a success: start again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Parses a `Retry-After` header given in seconds (the HTTP-date form is not used by Cairn).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceilings = Vec::new();
        for _ in 0..7 {
            ceilings.push(b.ceiling().as_millis());
            let w = b.next(None);
            assert!(w <= Duration::from_secs(2));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.retries, 7);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Many attempts never overflow.
        for _ in 0..100 {
            b.next(None);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
    }

    #[test]
    fn full_jitter_spreads_waits() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let waits: Vec<Duration> = (0..200).map(|_| b.next(None)).collect();
        let min = waits.iter().min().unwrap();
        let max = waits.iter().max().unwrap();
        assert!(*min < Duration::from_millis(200), "{min:?}");
        assert!(*max > Duration::from_millis(800), "{max:?}");
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(10));
        let w = b.next(Some(Duration::from_secs(2)));
        assert!(
            w >= Duration::from_secs(2) && w < Duration::from_secs(3),
            "{w:?}"
        );
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
