//! Time as the engine reads it: a [`Clock`] is injected wherever a decision depends on time
//! (backoff, expiry, failure times), so the deterministic simulation can run the worker's own
//! code on a [`ManualClock`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Microseconds on a monotonic clock: deadlines and backoff are measured on it.
    fn now_us(&self) -> u64;

    /// Microseconds since the Unix epoch: the times dead letters and records carry.
    fn wall_us(&self) -> u64;
}

/// The process's clocks: a monotonic one (its epoch is its first reading in the process) and the
/// system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        monotonic_us()
    }

    fn wall_us(&self) -> u64 {
        unix_micros()
    }
}

/// A clock that moves only when told: both readings are the same count of microseconds.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_us: AtomicU64,
}

impl ManualClock {
    /// A clock at `now_us`.
    #[must_use]
    pub fn at(now_us: u64) -> Self {
        Self { now_us: AtomicU64::new(now_us) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now_us.fetch_add(u64::try_from(by.as_micros()).unwrap_or(u64::MAX), Ordering::AcqRel);
    }

    /// Moves the clock to `now_us` if that is later than where it is.
    pub fn advance_to(&self, now_us: u64) {
        self.now_us.fetch_max(now_us, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> u64 {
        self.now_us.load(Ordering::Acquire)
    }

    fn wall_us(&self) -> u64 {
        self.now_us()
    }
}

/// Microseconds on the process's monotonic clock (its epoch: the first reading in the process).
pub(crate) fn monotonic_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_forward_and_only_when_told() {
        let clock = ManualClock::at(5);
        assert_eq!(clock.now_us(), 5);
        clock.advance(Duration::from_millis(2));
        assert_eq!(clock.now_us(), 2_005);
        clock.advance_to(1_000);
        assert_eq!(clock.now_us(), 2_005, "never backwards");
        clock.advance_to(9_000);
        assert_eq!((clock.now_us(), clock.wall_us()), (9_000, 9_000));
    }
}
