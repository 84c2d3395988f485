//! Keyed parking: an event waiting for another attempt holds its key's later events back, on the
//! worker that parked it, while every other key flows. Backoffs and expiries wait on one timing
//! wheel owned here, in millisecond ticks of an injected clock's readings.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::dead_letter::Failures;
use crate::stage::{Deadline, Envelope};
use crate::wheel::{Insert, Wheel};

/// The next parked event to try again, from [`Parking::next_retry`].
pub(crate) enum Due<M> {
    /// Try it again; its key stays parked until [`Parking::settle`] says how it went.
    Retry(Envelope<M>, Deadline),
    /// It expired while parked: dead-letter it with the failures it met.
    Expired(Envelope<M>, Failures),
    /// Nothing to do for this key now (it was woken early for an expiry behind its head).
    Nothing,
}

/// One worker's parked keys, their failures and their wheel.
pub(crate) struct Parking<M> {
    /// Events waiting by key: the head is the one in retry, the rest wait behind it; each with
    /// its expiry in this stage.
    parked: FxHashMap<u64, VecDeque<(Envelope<M>, Deadline)>>,
    /// The failures of each key's event in retry (the parked head), for its dead letter.
    failures: FxHashMap<u64, Failures>,
    /// The tick at which each parked key's head may be tried again (absent: at once).
    retry_due: FxHashMap<u64, u64>,
    /// Parked keys whose heads are due, in the order they are to be tried again.
    retry_keys: VecDeque<u64>,
    /// Events parked in all.
    parked_events: usize,
    /// Parked keys waiting out their backoff (or an expiry), by due tick.
    wheel: Wheel<u64>,
    /// The clock reading of tick 0.
    epoch_us: u64,
}

impl<M> Parking<M> {
    /// Empty, with tick 0 at `now_us`.
    pub(crate) fn new(now_us: u64) -> Self {
        Self {
            parked: FxHashMap::default(),
            failures: FxHashMap::default(),
            retry_due: FxHashMap::default(),
            retry_keys: VecDeque::new(),
            parked_events: 0,
            wheel: Wheel::new(0),
            epoch_us: now_us,
        }
    }

    /// Milliseconds since tick 0 at `now_us`.
    fn tick(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.epoch_us) / 1_000
    }

    /// Events parked in all (heads in retry and those behind them).
    pub(crate) fn parked_events(&self) -> usize {
        self.parked_events
    }

    /// Whether no key is parked and no wake-up is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.parked.is_empty() && self.wheel.is_empty() && self.retry_keys.is_empty()
    }

    /// Whether a parked key passes `test` (an elastic pool's worker asks this of a partition's
    /// keys before it lets go of the partition).
    pub(crate) fn holds_any(&self, test: impl Fn(u64) -> bool) -> bool {
        self.parked.keys().any(|&key| test(key))
    }

    /// Whether a key is due to be tried again now (after [`release_due`](Self::release_due)).
    pub(crate) fn has_due(&self) -> bool {
        !self.retry_keys.is_empty()
    }

    /// Keys due now.
    pub(crate) fn due_keys(&self) -> usize {
        self.retry_keys.len()
    }

    /// Whether anything waits on the wheel.
    pub(crate) fn is_waiting(&self) -> bool {
        !self.wheel.is_empty()
    }

    /// The clock reading at which the wheel's next key is due, if any waits.
    pub(crate) fn next_due_us(&self) -> Option<u64> {
        self.wheel.next_due().map(|tick| self.epoch_us.saturating_add(tick.saturating_mul(1_000)))
    }

    /// Whether `key` is parked: then its next event must wait behind (see
    /// [`wait_behind`](Self::wait_behind)).
    #[inline]
    pub(crate) fn holds(&self, key: u64) -> bool {
        !self.parked.is_empty() && self.parked.contains_key(&key)
    }

    /// Queues `event` behind its parked key's events, keeping their order.
    pub(crate) fn wait_behind(&mut self, event: Envelope<M>, expires: Deadline) {
        let queue = self.parked.get_mut(&event.key).expect("only events of a parked key wait behind it");
        queue.push_back((event, expires));
        self.parked_events += 1;
    }

    /// Forgets the failures `key`'s event met (it succeeded).
    #[inline]
    pub(crate) fn forget_failures(&mut self, key: u64) {
        if !self.failures.is_empty() {
            self.failures.remove(&key);
        }
    }

    /// Keeps the failures `key`'s event met so far, for its next attempt.
    pub(crate) fn keep_failures(&mut self, key: u64, failures: Failures) {
        self.failures.insert(key, failures);
    }

    /// Takes the failures `key`'s event met so far (none if it never failed).
    #[inline]
    pub(crate) fn take_failures(&mut self, key: u64) -> Failures {
        if self.failures.is_empty() {
            return Failures::default();
        }
        self.failures.remove(&key).unwrap_or_default()
    }

    /// Parks `event` (a key not parked before) to be tried again after `delay_ms`.
    pub(crate) fn park(&mut self, event: Envelope<M>, expires: Deadline, delay_ms: u64, now_us: u64) {
        let key = event.key;
        self.parked.entry(key).or_default().push_back((event, expires));
        self.parked_events += 1;
        self.schedule(key, delay_ms, now_us);
    }

    /// Puts `key`'s head back in line after `delay_ms`. A delay of d ms is due at the first
    /// tick at least d ms away: never early.
    fn schedule(&mut self, key: u64, delay_ms: u64, now_us: u64) {
        let due = self.tick(now_us) + delay_ms + u64::from(delay_ms > 0);
        if delay_ms > 0 {
            self.retry_due.insert(key, due);
        }
        self.wake(key, due, now_us);
    }

    /// Puts `key` on the wheel for tick `due`, or sooner if one of its parked events expires
    /// before: expired events leave on time instead of waiting out the head's backoff.
    fn wake(&mut self, key: u64, due: u64, now_us: u64) {
        let first_expiry = self
            .parked
            .get(&key)
            .and_then(|queue| queue.iter().map(|&(_, expires)| expires).min())
            .unwrap_or(Deadline::NEVER);
        let due = match first_expiry.left(now_us) {
            Some(left) => due.min(self.tick(now_us) + u64::try_from(left.as_millis()).unwrap_or(u64::MAX) + 1),
            None => due,
        };
        match self.wheel.insert(due, key) {
            Insert::Scheduled => {}
            Insert::AlreadyDue(key) | Insert::TooFar(key) => self.retry_keys.push_back(key),
        }
    }

    /// Moves keys whose time has come into line.
    pub(crate) fn release_due(&mut self, now_us: u64) {
        if self.wheel.is_empty() {
            return;
        }
        let now = self.tick(now_us);
        let mut due = Vec::new();
        self.wheel.advance(now, &mut due);
        self.retry_keys.extend(due);
    }

    /// The next due key's head; the events that expired behind it (the others
    /// keep their order) go to `behind`. After a [`Due::Retry`], call [`settle`](Self::settle).
    pub(crate) fn next_retry(&mut self, now_us: u64, behind: &mut Vec<Envelope<M>>) -> Option<(u64, Due<M>)> {
        let key = self.retry_keys.pop_front()?;
        let Some((event, expires)) = self.parked.get_mut(&key).and_then(VecDeque::pop_front) else {
            self.parked.remove(&key);
            return Some((key, Due::Nothing));
        };
        self.parked_events -= 1;
        self.expire_behind(key, now_us, behind);
        if expires.passed(now_us) {
            self.retry_due.remove(&key);
            let failures = self.take_failures(key);
            self.settle(key, None, now_us);
            return Some((key, Due::Expired(event, failures)));
        }
        match self.retry_due.get(&key) {
            // Woken for a parked event's expiry: the head's backoff still runs.
            Some(&due) if self.tick(now_us) < due => {
                let queue = self.parked.get_mut(&key).expect("a key stays parked until its queue is empty");
                queue.push_front((event, expires));
                self.parked_events += 1;
                self.wake(key, due, now_us);
                return Some((key, Due::Nothing));
            }
            Some(_) => {
                self.retry_due.remove(&key);
            }
            None => {}
        }
        Some((key, Due::Retry(event, expires)))
    }

    /// How `key`'s head fared: `Some` to be tried again after a delay, `None` when it is
    /// finished (then the key's next event goes on at once, or the key is unparked).
    pub(crate) fn settle(&mut self, key: u64, again: Option<(Envelope<M>, Deadline, u64)>, now_us: u64) {
        let Some(queue) = self.parked.get_mut(&key) else { return };
        match again {
            Some((event, expires, delay_ms)) => {
                queue.push_front((event, expires));
                self.parked_events += 1;
                self.schedule(key, delay_ms, now_us);
            }
            None if queue.is_empty() => {
                self.parked.remove(&key);
            }
            None => self.retry_keys.push_back(key),
        }
    }

    /// Moves the expired events waiting behind `key`'s head to `expired`.
    fn expire_behind(&mut self, key: u64, now_us: u64, expired: &mut Vec<Envelope<M>>) {
        let Some(queue) = self.parked.get_mut(&key) else { return };
        if queue.iter().all(|&(_, expires)| !expires.passed(now_us)) {
            return;
        }
        let before = queue.len();
        let (gone, kept): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(queue).into_iter().partition(|&(_, expires)| expires.passed(now_us));
        *queue = kept;
        self.parked_events -= before - queue.len();
        expired.extend(gone.into_iter().map(|(event, _)| event));
    }
}
