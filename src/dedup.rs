//! Bounded deduplication windows: remember what was done under a key for a while, not forever.
//!
//! A [`DedupWindow`] keeps each key for at most [`WindowLimits::max_age`] after it was last
//! written and keeps at most [`WindowLimits::max_keys`] keys, dropping the oldest first. The
//! guarantee, like Kafka's idempotent-producer window or the RabbitMQ message deduplication
//! plugin's TTL: **a repeat that arrives within the window is recognised; one that arrives after
//! its key left the window is treated as new.** Size the window to outlast every path by which a
//! repeat can arrive (retries with their backoff, redelivery after a restart) at the peak rate.
//! Memory is bounded by `max_keys` whatever the history.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustc_hash::{FxBuildHasher, FxHashMap};
use serde::Serialize;

use crate::clock::{Clock, SystemClock};

/// Shards of a window (a power of two).
const SHARDS: usize = 64;

/// How much a [`DedupWindow`] remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowLimits {
    /// Most keys held; beyond it the oldest go first.
    pub max_keys: usize,
    /// Longest a key is held after it was last written.
    pub max_age: Duration,
}

impl Default for WindowLimits {
    /// One million keys, ten minutes.
    fn default() -> Self {
        Self { max_keys: 1 << 20, max_age: Duration::from_secs(600) }
    }
}

impl WindowLimits {
    /// Refuses a window that could hold nothing: `what` names the setting in the error.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if self.max_keys == 0 {
            return Err(format!("{what}: the window must hold at least one key"));
        }
        if self.max_age.is_zero() {
            return Err(format!("{what}: the window must last longer than zero"));
        }
        Ok(())
    }
}

struct Shard<K, V> {
    entries: FxHashMap<K, (V, u64)>,
    /// Keys in the order they were written, with the write's stamp and time.
    order: VecDeque<(K, u64, u64)>,
    next_stamp: u64,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Self {
        Self { entries: FxHashMap::default(), order: VecDeque::new(), next_stamp: 0 }
    }
}

/// A bounded map from keys to what was done under them. See the [module](self) docs.
pub struct DedupWindow<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    keys_per_shard: usize,
    max_age_us: u64,
    clock: Arc<dyn Clock>,
    expired: AtomicU64,
}

impl<K, V> std::fmt::Debug for DedupWindow<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupWindow")
            .field("keys_per_shard", &self.keys_per_shard)
            .field("max_age_us", &self.max_age_us)
            .field("expired", &self.expired.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Copy, V> DedupWindow<K, V> {
    /// A window within `limits`, aged by the system clock.
    #[must_use]
    pub fn new(limits: WindowLimits) -> Self {
        Self::with_clock(limits, Arc::new(SystemClock))
    }

    /// A window within `limits`, aged by `clock`.
    #[must_use]
    pub fn with_clock(limits: WindowLimits, clock: Arc<dyn Clock>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            keys_per_shard: limits.max_keys.div_ceil(SHARDS).max(1),
            max_age_us: u64::try_from(limits.max_age.as_micros()).unwrap_or(u64::MAX),
            clock,
            expired: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<Shard<K, V>> {
        let hash = FxBuildHasher.hash_one(key);
        // The high bits: FxHash mixes upward.
        &self.shards[(hash >> 58) as usize % SHARDS]
    }

    /// Runs `f` on what `key` holds (if it is in the window): `f` may change it in place, and
    /// what it returns second, if anything, is stored under `key` as a new write (its age
    /// starts again). Returns what `f` returned first.
    pub fn update<R>(&self, key: K, f: impl FnOnce(Option<&mut V>) -> (R, Option<V>)) -> R {
        let now_us = self.clock.now_us();
        let mut shard = self.shard(&key).lock();
        // What has aged leaves before anyone looks: a key past its age is not in the window.
        self.evict(&mut shard, now_us);
        let (result, write) = f(shard.entries.get_mut(&key).map(|(value, _)| value));
        if let Some(value) = write {
            let stamp = shard.next_stamp;
            shard.next_stamp += 1;
            shard.entries.insert(key, (value, stamp));
            shard.order.push_back((key, stamp, now_us));
            self.evict(&mut shard, now_us);
        }
        result
    }

    /// Stores `value` under `key` unless the window holds the key already; true if it was new.
    pub fn insert(&self, key: K, value: V) -> bool {
        self.update(key, |held| match held {
            Some(_) => (false, None),
            None => (true, Some(value)),
        })
    }

    /// Whether the window holds `key`.
    pub fn contains(&self, key: &K) -> bool {
        let now_us = self.clock.now_us();
        let mut shard = self.shard(key).lock();
        self.evict(&mut shard, now_us);
        shard.entries.contains_key(key)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().entries.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys that left the window (by age or by count) so far.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// Drops keys past their age, and the oldest while the shard holds too many.
    fn evict(&self, shard: &mut Shard<K, V>, now_us: u64) {
        let mut expired = 0;
        while let Some(&(key, stamp, at_us)) = shard.order.front() {
            let aged = now_us.saturating_sub(at_us) > self.max_age_us;
            let crowded = shard.entries.len() > self.keys_per_shard || shard.order.len() > 2 * self.keys_per_shard;
            if !aged && !crowded {
                break;
            }
            shard.order.pop_front();
            // A key written again since has a newer stamp: this entry of the order is stale.
            if shard.entries.get(&key).is_some_and(|&(_, held)| held == stamp) {
                shard.entries.remove(&key);
                expired += 1;
            }
        }
        if expired > 0 {
            self.expired.fetch_add(expired, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_repeat_within_the_window_is_recognised_and_one_after_it_is_new() {
        let clock = Arc::new(ManualClock::default());
        let limits = WindowLimits { max_keys: 1_000, max_age: Duration::from_secs(10) };
        let window: DedupWindow<u64, ()> = DedupWindow::with_clock(limits, Arc::clone(&clock) as Arc<dyn Clock>);
        assert!(window.insert(1, ()));
        clock.advance(Duration::from_secs(9));
        assert!(!window.insert(1, ()), "nine seconds later: a repeat");
        clock.advance(Duration::from_secs(2));
        assert!(!window.contains(&1), "eleven seconds after it was written, key 1 has left");
        assert!(window.insert(1, ()), "and counts as new");
        assert_eq!(window.expired(), 1);
    }

    #[test]
    fn the_window_holds_at_most_its_keys() {
        let limits = WindowLimits { max_keys: 6_400, max_age: Duration::from_secs(3_600) };
        let window: DedupWindow<u64, u64> = DedupWindow::new(limits);
        for key in 0..100_000 {
            window.insert(key, key);
        }
        assert!(window.len() <= 6_400, "{} keys held", window.len());
        assert!(window.len() >= 6_000, "{} keys held", window.len());
        assert!(window.contains(&99_999) && !window.contains(&0), "the oldest go first");
    }

    #[test]
    fn a_rewritten_key_stays_for_its_new_age() {
        let clock = Arc::new(ManualClock::default());
        let limits = WindowLimits { max_keys: 100, max_age: Duration::from_secs(10) };
        let window: DedupWindow<u64, u32> = DedupWindow::with_clock(limits, Arc::clone(&clock) as Arc<dyn Clock>);
        window.insert(7, 1);
        clock.advance(Duration::from_secs(8));
        window.update(7, |held| ((), held.map(|v| *v + 1)));
        clock.advance(Duration::from_secs(8));
        window.insert(8, 0);
        assert!(window.contains(&7), "written again eight seconds ago");
        assert_eq!(window.update(7, |held| (held.copied(), None)), Some(2));
    }
}
