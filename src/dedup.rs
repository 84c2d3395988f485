//! Bounded deduplication windows: remember what was done under a key for a while, not forever.
//!
//! A [`DedupWindow`] remembers a key for at least [`WindowLimits::max_age`] after it was last
//! written, or until at least [`WindowLimits::max_keys`] newer keys were written, whichever comes
//! first, and for at most twice either. The guarantee, like Kafka's idempotent-producer window or
//! the RabbitMQ message deduplication plugin's TTL: **a repeat that arrives within the window is
//! recognised; one that arrives after its key left the window is treated as new.** Size the
//! window to outlast every path by which a repeat can arrive (retries with their backoff,
//! redelivery after a restart) at the peak rate. Memory is bounded by `2 x max_keys` keys,
//! whatever the history.
//!
//! Keys live in two generations per shard (of 64): writes go to the current one; when it holds
//! `max_keys / 64` keys or is `max_age` old it becomes the previous one and the previous one is
//! dropped whole, so there is no per-key bookkeeping and no deletion.

use std::collections::hash_map::Entry;
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

/// Two generations of keys: writes go to `current`; when it is full (by count) or old (by age)
/// it becomes `previous` and the old `previous` is dropped whole. No per-key bookkeeping, no
/// deletions (which would leave the hash table's probe sequences long).
struct Shard<K, V> {
    current: FxHashMap<K, V>,
    previous: FxHashMap<K, V>,
    /// When `current` started.
    started_us: u64,
    /// Updates since the clock was last read.
    unclocked: u32,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Self {
        Self { current: FxHashMap::default(), previous: FxHashMap::default(), started_us: 0, unclocked: 0 }
    }
}

/// Updates between clock readings in a shard: ageing is checked this often (a late check only
/// keeps keys a little longer).
const CLOCK_EVERY: u32 = 64;

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
        let now_us = clock.now_us();
        let shard = || Mutex::new(Shard { started_us: now_us, ..Shard::default() });
        Self {
            shards: (0..SHARDS).map(|_| shard()).collect(),
            keys_per_shard: limits.max_keys.div_ceil(SHARDS).max(1),
            max_age_us: u64::try_from(limits.max_age.as_micros()).unwrap_or(u64::MAX),
            clock,
            expired: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<Shard<K, V>> {
        // Through a full avalanche (splitmix64's finaliser): the shard's maps hash with the same
        // FxHash, and keys that agreed on any bits the maps use would crowd their probe groups.
        let z = crate::completion::avalanche(FxBuildHasher.hash_one(key));
        &self.shards[usize::try_from(z % SHARDS as u64).unwrap_or(0)]
    }

    /// Starts a new generation if the current one is full or old; `now_us` when known.
    fn age(&self, shard: &mut Shard<K, V>, now_us: Option<u64>) {
        let full = shard.current.len() >= self.keys_per_shard;
        let old = now_us.is_some_and(|now| now.saturating_sub(shard.started_us) >= self.max_age_us);
        if full || old {
            let dropped = std::mem::replace(&mut shard.previous, std::mem::take(&mut shard.current));
            self.expired.fetch_add(dropped.len() as u64, Ordering::Relaxed);
            // Old enough that the previous generation is past its age too: it goes as well.
            if old && now_us.is_some_and(|now| now.saturating_sub(shard.started_us) >= 2 * self.max_age_us) {
                self.expired.fetch_add(shard.previous.len() as u64, Ordering::Relaxed);
                shard.previous = FxHashMap::default();
            }
            shard.current.reserve(dropped.len().min(self.keys_per_shard));
            shard.started_us = now_us.unwrap_or_else(|| self.clock.now_us());
        }
    }

    fn lock(&self, key: &K, every_time: bool) -> parking_lot::MutexGuard<'_, Shard<K, V>> {
        let mut shard = self.shard(key).lock();
        shard.unclocked += 1;
        let now_us = (every_time || shard.unclocked >= CLOCK_EVERY).then(|| {
            shard.unclocked = 0;
            self.clock.now_us()
        });
        self.age(&mut shard, now_us);
        shard
    }

    /// Runs `f` on what `key` holds (if it is in the window): `f` may change it in place, and
    /// what it returns second, if anything, is stored under `key` as a new write (it stays in
    /// the window from now). Returns what `f` returned first.
    pub fn update<R>(&self, key: K, f: impl FnOnce(Option<&mut V>) -> (R, Option<V>)) -> R {
        let mut shard = self.lock(&key, false);
        let Shard { current, previous, .. } = &mut *shard;
        // One probe of each generation for a new key (the common case: the tables are far larger
        // than the caches, so every probe is a miss), the write landing in the slot the first
        // probe found.
        match current.entry(key) {
            Entry::Occupied(mut held) => {
                let (result, write) = f(Some(held.get_mut()));
                if let Some(value) = write {
                    held.insert(value);
                }
                result
            }
            Entry::Vacant(slot) => {
                let older = previous.get_mut(&key);
                let was_older = older.is_some();
                let (result, write) = f(older);
                if let Some(value) = write {
                    if was_older {
                        previous.remove(&key);
                    }
                    slot.insert(value);
                }
                result
            }
        }
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
        let shard = self.lock(key, true);
        shard.current.contains_key(key) || shard.previous.contains_key(key)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock()).map(|s| s.current.len() + s.previous.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys that left the window (by age or by count) so far.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
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
        clock.advance(Duration::from_secs(12));
        assert!(!window.contains(&1), "twenty-one seconds after it was written (over twice the age), key 1 has left");
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
        assert!(window.len() <= 2 * 6_400, "{} keys held", window.len());
        assert!(window.len() >= 6_400, "{} keys held", window.len());
        assert!(!window.contains(&0), "the oldest go first");
        // Shards fill unevenly: the last 5,000 keys are in every shard's current generation or
        // the one before.
        assert!((95_000..100_000).all(|key| window.contains(&key)), "a recent key was forgotten");
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

    #[test]
    fn a_key_rewritten_from_the_previous_generation_is_held_once() {
        let clock = Arc::new(ManualClock::default());
        let limits = WindowLimits { max_keys: 100, max_age: Duration::from_secs(10) };
        let window: DedupWindow<u64, u32> = DedupWindow::with_clock(limits, Arc::clone(&clock) as Arc<dyn Clock>);
        window.insert(7, 1);
        clock.advance(Duration::from_secs(11));
        assert!(window.contains(&7), "in the previous generation now");
        window.update(7, |held| ((), held.map(|v| *v + 1)));
        assert_eq!(window.len(), 1, "moved to the current generation, not copied");
        assert_eq!(window.update(7, |held| (held.copied(), None)), Some(2));
    }
}
