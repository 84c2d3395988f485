//! A circuit breaker for a port: closed, open, half-open.
//!
//! Closed, every call goes through and consecutive failures are counted; at
//! `failures_to_open` it opens (a trip). Open, calls are refused until `open_ms` has passed; then
//! it is half-open and lets exactly one trial call through: success closes it, failure opens it
//! again (another trip). A refused caller returns `Outcome::Defer`, so its event waits on the
//! worker's timing wheel instead of hammering the port, without spending an attempt.
//!
//! Time is passed in (`*_at` methods take an `Instant`), so tests drive it; the plain methods
//! read the clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// When a breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open it (at least 1).
    pub failures_to_open: u32,
    /// How long it stays open before a trial call.
    pub open_for: Duration,
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down passes.
    Open,
    /// One trial call is (or may be) in flight.
    HalfOpen,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_out: bool },
}

/// A breaker shared by every worker calling one port.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    trips: AtomicU64,
    trials: AtomicU64,
    recoveries: AtomicU64,
}

/// A breaker's state and how often it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerReport {
    /// Where it stands now.
    pub state: BreakerState,
    /// Times it opened (closed or half-open to open).
    pub trips: u64,
    /// Times an open period ended in a trial call (open to half-open).
    pub trials: u64,
    /// Times a trial succeeded (half-open to closed).
    pub recoveries: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    #[must_use]
    pub fn new(config: BreakerConfig) -> Self {
        let config = BreakerConfig { failures_to_open: config.failures_to_open.max(1), ..config };
        Self {
            config,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            trips: AtomicU64::new(0),
            trials: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
        }
    }

    /// Whether a call may go through now.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// Whether a call may go through at `now`.
    pub fn allow_at(&self, now: Instant) -> bool {
        let mut inner = self.inner.lock();
        match *inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen { trial_out: true };
                self.trials.fetch_add(1, Ordering::Relaxed);
                true
            }
            Inner::Open { .. } | Inner::HalfOpen { trial_out: true } => false,
            Inner::HalfOpen { trial_out: false } => {
                *inner = Inner::HalfOpen { trial_out: true };
                true
            }
        }
    }

    /// A call that was allowed succeeded.
    pub fn record_success(&self) {
        let mut inner = self.inner.lock();
        if matches!(*inner, Inner::HalfOpen { .. }) {
            self.recoveries.fetch_add(1, Ordering::Relaxed);
        }
        *inner = Inner::Closed { failures: 0 };
    }

    /// A call that was allowed failed.
    pub fn record_failure(&self) {
        self.record_failure_at(Instant::now());
    }

    /// A call that was allowed failed, at `now`.
    pub fn record_failure_at(&self, now: Instant) {
        let mut inner = self.inner.lock();
        let open = match *inner {
            Inner::Closed { failures } if failures + 1 >= self.config.failures_to_open => true,
            Inner::Closed { failures } => {
                *inner = Inner::Closed { failures: failures + 1 };
                false
            }
            Inner::HalfOpen { .. } => true,
            Inner::Open { .. } => false,
        };
        if open {
            *inner = Inner::Open { until: now + self.config.open_for };
            self.trips.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How long a refused caller should wait before asking again.
    #[must_use]
    pub fn retry_after(&self) -> Duration {
        match *self.inner.lock() {
            Inner::Open { until } => until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            Inner::Closed { .. } | Inner::HalfOpen { .. } => Duration::from_millis(1),
        }
    }

    /// State and trips now.
    pub fn report(&self) -> BreakerReport {
        let state = match *self.inner.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        BreakerReport {
            state,
            trips: self.trips.load(Ordering::Relaxed),
            trials: self.trials.load(Ordering::Relaxed),
            recoveries: self.recoveries.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
        let breaker = CircuitBreaker::new(BreakerConfig { failures_to_open: 3, open_for: Duration::from_millis(100) });
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(breaker.allow_at(t0));
            breaker.record_failure_at(t0);
        }
        breaker.record_success(); // a success resets the count
        for _ in 0..3 {
            assert!(breaker.allow_at(t0));
            breaker.record_failure_at(t0);
        }
        assert_eq!(breaker.report(), BreakerReport { state: BreakerState::Open, trips: 1, trials: 0, recoveries: 0 });
        assert!(!breaker.allow_at(t0 + Duration::from_millis(99)), "open: refused");
        assert!(breaker.allow_at(t0 + Duration::from_millis(100)), "cool-down over: one trial");
        assert_eq!(breaker.report().state, BreakerState::HalfOpen);
        assert!(!breaker.allow_at(t0 + Duration::from_millis(101)), "only one trial at a time");
        breaker.record_success();
        assert_eq!(breaker.report(), BreakerReport { state: BreakerState::Closed, trips: 1, trials: 1, recoveries: 1 });
    }

    #[test]
    fn a_failed_trial_opens_it_again() {
        let breaker = CircuitBreaker::new(BreakerConfig { failures_to_open: 1, open_for: Duration::from_millis(10) });
        let t0 = Instant::now();
        breaker.record_failure_at(t0);
        let t1 = t0 + Duration::from_millis(10);
        assert!(breaker.allow_at(t1));
        breaker.record_failure_at(t1);
        assert_eq!(breaker.report(), BreakerReport { state: BreakerState::Open, trips: 2, trials: 1, recoveries: 0 });
        assert!(!breaker.allow_at(t1 + Duration::from_millis(9)));
    }
}
