//! Per-stage counters and latency histograms, read as one serializable [`Snapshot`].
//!
//! Workers count locally and publish once per batch (a handful of atomic adds per batch, not per
//! event). Latency is recorded once per batch with the batch's event count as weight, so a batch
//! of 256 costs one histogram update instead of 256 (a full sample costs ~60 ns).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Largest latency a histogram tracks exactly; longer ones are clamped to it (one hour, in ns).
pub(crate) const LATENCY_NS_MAX: u64 = 3_600_000_000_000;
/// Significant decimal digits kept by the latency histograms.
const LATENCY_SIGFIG: u8 = 3;

/// Nanoseconds from `epoch` to `at` (0 for an earlier instant).
pub(crate) fn ns_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGFIG)
        .expect("constant histogram bounds are valid: 1 <= low, high >= 2 * low, sigfig <= 5")
}

/// A latency histogram that starts small and grows with the longest latency recorded (at most
/// [`LATENCY_NS_MAX`], about 260 KiB): for one an engine makes whenever it starts, where a
/// short-lived engine (a simulation's incarnation) would otherwise zero that much each time.
pub(crate) fn new_growing_histogram() -> Histogram<u64> {
    Histogram::new(LATENCY_SIGFIG).expect("a constant sigfig of at most 5 is valid")
}

/// Records `ns` in a histogram from [`new_growing_histogram`], growing it to `ns`
/// (`saturating_record` would clamp to its current size instead); only a failed allocation
/// leaves it to saturate.
pub(crate) fn record_growing(histogram: &mut Histogram<u64>, ns: u64) {
    record_growing_n(histogram, ns, 1);
}

/// [`record_growing`] of `count` equal values at once.
pub(crate) fn record_growing_n(histogram: &mut Histogram<u64>, ns: u64, count: u64) {
    if histogram.record_n(ns, count).is_err() {
        histogram.saturating_record_n(ns, count);
    }
}

/// Live counters of one stage, shared by its workers and the engine.
#[derive(Debug)]
pub(crate) struct StageMetrics {
    pub(crate) name: String,
    /// Workers in the pool now (an elastic pool's workers not told to retire).
    pub(crate) workers: CachePadded<AtomicUsize>,
    /// The pool's bounds (equal for a fixed pool).
    pub(crate) bounds: crate::config::Workers,
    /// Resizes of an elastic pool: workers added, and workers told to retire.
    pub(crate) grown: AtomicU64,
    pub(crate) shrunk: AtomicU64,
    /// The most events a batch sent to the stage may carry now: its `batch_events_max`, or what
    /// the controller chose for adaptive batching. Read by senders once per batch.
    pub(crate) batch_limit: CachePadded<AtomicUsize>,
    pub(crate) queue_capacity_events: usize,
    pub(crate) processed: CachePadded<AtomicU64>,
    pub(crate) emitted: CachePadded<AtomicU64>,
    pub(crate) retried: CachePadded<AtomicU64>,
    pub(crate) rejected: CachePadded<AtomicU64>,
    pub(crate) dead_lettered: CachePadded<AtomicU64>,
    pub(crate) panics: CachePadded<AtomicU64>,
    /// Events this stage published with a key no queue is bound to.
    pub(crate) unroutable: CachePadded<AtomicU64>,
    /// Events the handler deferred (`Outcome::Defer`).
    pub(crate) deferred: CachePadded<AtomicU64>,
    /// Events dead-lettered because they outlived their TTL.
    pub(crate) expired: CachePadded<AtomicU64>,
    /// Events dead-lettered because this stage's queue was full (overflow policy).
    pub(crate) overflowed: CachePadded<AtomicU64>,
    /// Events handed to the stage's queue (by upstream workers or ingress).
    pub(crate) enqueued: CachePadded<AtomicU64>,
    /// Events taken off the stage's queue by its workers.
    pub(crate) dequeued: CachePadded<AtomicU64>,
    /// When the batch at the head of the queue was sent, in ns since `epoch`, give or take a
    /// batch: set by a sender that finds the queue empty, and by each take to the taken batch's
    /// time (the next batch was sent no earlier).
    pub(crate) head_sent_ns: CachePadded<AtomicU64>,
    pub(crate) epoch: Instant,
    pub(crate) busy_workers: CachePadded<AtomicUsize>,
    /// Events each worker holds for a retry (parked for their backoff, or behind a parked event
    /// of the same key): its own line, stored once per unit.
    pub(crate) parked: Vec<CachePadded<AtomicU64>>,
    /// One histogram per worker, with the sum of what it recorded (seconds): locked once per
    /// batch by its worker, rarely by a reader.
    pub(crate) latency: Vec<Mutex<(Histogram<u64>, f64)>>,
}

/// What one worker counted while handling one batch; published with one add per field.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BatchTally {
    pub(crate) processed: u64,
    pub(crate) emitted: u64,
    pub(crate) retried: u64,
    pub(crate) rejected: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) panics: u64,
    pub(crate) unroutable: u64,
    pub(crate) deferred: u64,
    pub(crate) expired: u64,
}

impl StageMetrics {
    /// Figures for a stage whose pool has `bounds` (per-worker figures for up to `bounds.max`).
    pub(crate) fn new(name: String, bounds: crate::config::Workers, queue_capacity_events: usize) -> Self {
        let workers = bounds.max;
        Self {
            name,
            workers: CachePadded::new(AtomicUsize::new(bounds.min)),
            bounds,
            grown: AtomicU64::new(0),
            shrunk: AtomicU64::new(0),
            batch_limit: CachePadded::new(AtomicUsize::new(usize::MAX)),
            queue_capacity_events,
            processed: CachePadded::default(),
            emitted: CachePadded::default(),
            retried: CachePadded::default(),
            rejected: CachePadded::default(),
            dead_lettered: CachePadded::default(),
            panics: CachePadded::default(),
            unroutable: CachePadded::default(),
            deferred: CachePadded::default(),
            expired: CachePadded::default(),
            overflowed: CachePadded::default(),
            enqueued: CachePadded::default(),
            dequeued: CachePadded::default(),
            head_sent_ns: CachePadded::default(),
            epoch: Instant::now(),
            busy_workers: CachePadded::default(),
            parked: (0..workers).map(|_| CachePadded::default()).collect(),
            latency: (0..workers).map(|_| Mutex::new((new_histogram(), 0.0))).collect(),
        }
    }

    pub(crate) fn publish(&self, tally: &BatchTally) {
        let add = |counter: &AtomicU64, value: u64| {
            if value != 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        };
        add(&self.processed, tally.processed);
        add(&self.emitted, tally.emitted);
        add(&self.retried, tally.retried);
        add(&self.rejected, tally.rejected);
        add(&self.dead_lettered, tally.dead_lettered);
        add(&self.panics, tally.panics);
        add(&self.unroutable, tally.unroutable);
        add(&self.deferred, tally.deferred);
        add(&self.expired, tally.expired);
    }

    pub(crate) fn record_latency(&self, worker: usize, latency: Duration, events: u64) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).clamp(1, LATENCY_NS_MAX);
        let mut held = self.latency[worker].lock();
        held.0.saturating_record_n(ns, events);
        held.1 += latency.as_secs_f64() * events as f64;
    }

    /// `count` events sent at `sent_at` went into the queue; if it held none counted in, they
    /// are its head.
    pub(crate) fn count_in(&self, count: u64, sent_at: Instant) {
        let before = self.enqueued.fetch_add(count, Ordering::Relaxed);
        if before <= self.dequeued.load(Ordering::Relaxed) {
            self.head_sent_ns.store(ns_since(self.epoch, sent_at), Ordering::Relaxed);
        }
    }

    /// A worker took a batch sent at `sent_at` off the queue.
    pub(crate) fn count_out(&self, count: u64, sent_at: Instant) {
        self.dequeued.fetch_add(count, Ordering::Relaxed);
        self.head_sent_ns.store(ns_since(self.epoch, sent_at), Ordering::Relaxed);
    }

    /// Every worker's latencies merged (ns), and their sum in seconds.
    pub(crate) fn latency(&self) -> (Histogram<u64>, f64) {
        let mut merged = new_histogram();
        let mut latency_total_s = 0.0;
        for held in &self.latency {
            let held = held.lock();
            // Both histograms share bounds, so adding cannot fail.
            let _ = merged.add(&held.0);
            latency_total_s += held.1;
        }
        (merged, latency_total_s)
    }

    /// Events counted into the stage's queues and not yet out.
    pub(crate) fn depth_counted(&self) -> u64 {
        let enqueued = self.enqueued.load(Ordering::Relaxed);
        enqueued.saturating_sub(self.dequeued.load(Ordering::Relaxed))
    }

    /// The lag age now (see [`StageSnapshot::lag_us`]).
    pub(crate) fn lag_now(&self) -> Duration {
        if self.depth_counted() == 0 {
            return Duration::ZERO;
        }
        let head = self.head_sent_ns.load(Ordering::Relaxed);
        Duration::from_nanos(ns_since(self.epoch, Instant::now()).saturating_sub(head))
    }

    pub(crate) fn snapshot(&self) -> StageSnapshot {
        let (merged, latency_total_s) = self.latency();
        let queue_depth_counted = self.depth_counted();
        let lag_us = self.lag_now().as_nanos() as f64 / 1_000.0;
        StageSnapshot {
            name: self.name.clone(),
            workers: self.workers.load(Ordering::Relaxed),
            workers_min: self.bounds.min,
            workers_max: self.bounds.max,
            pool_grown: self.grown.load(Ordering::Relaxed),
            pool_shrunk: self.shrunk.load(Ordering::Relaxed),
            batch_limit: self.batch_limit.load(Ordering::Relaxed),
            busy_workers: self.busy_workers.load(Ordering::Relaxed),
            processed: self.processed.load(Ordering::Relaxed),
            emitted: self.emitted.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            panics: self.panics.load(Ordering::Relaxed),
            unroutable: self.unroutable.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
            // A batch is counted in when it is in the queue and out once a worker has it; a sender
            // woken by that take may put its batch in before the worker counts it out, so the
            // difference can pass, for an instant, the capacity the queue itself never exceeds.
            queue_depth: queue_depth_counted.min(self.queue_capacity_events as u64),
            queue_depth_counted,
            lag_us,
            queue_capacity: self.queue_capacity_events,
            retry_parked: self.parked.iter().map(|p| p.load(Ordering::Relaxed)).sum(),
            rates: StageRates::default(),
            latency_us: LatencySummary::from_histogram(&merged),
            latency_total_s,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Events recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest recorded.
    pub max: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds.
    #[must_use]
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Self {
            count: histogram.len(),
            p50: us(histogram.value_at_quantile(0.5)),
            p90: us(histogram.value_at_quantile(0.9)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
        }
    }
}

/// A stage's counts as rates, events a second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRates {
    /// Events finished.
    pub processed: f64,
    /// Events sent on.
    pub emitted: f64,
    /// Attempts that ended in a retry.
    pub retried: f64,
    /// Events dead-lettered.
    pub dead_lettered: f64,
}

/// One stage's figures at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSnapshot {
    /// The stage's name.
    pub name: String,
    /// Workers in its pool now.
    pub workers: usize,
    /// The pool's bounds: equal for a fixed pool, `{ min, max }` of an elastic one.
    #[serde(default)]
    pub workers_min: usize,
    /// See `workers_min`.
    #[serde(default)]
    pub workers_max: usize,
    /// Times an elastic pool grew by a worker, and shrank by one.
    #[serde(default)]
    pub pool_grown: u64,
    /// See `pool_grown`.
    #[serde(default)]
    pub pool_shrunk: u64,
    /// The most events a batch sent to the stage carries now: its `batch_events_max`, or, with
    /// adaptive batching, what the controller chose.
    #[serde(default)]
    pub batch_limit: usize,
    /// Workers handling a batch right now.
    pub busy_workers: usize,
    /// Events finished by the stage (done, rejected or dead-lettered; retries count once).
    pub processed: u64,
    /// Events the stage sent on.
    pub emitted: u64,
    /// Attempts that ended in a retry (a panic counts as one).
    pub retried: u64,
    /// Events the handler rejected.
    pub rejected: u64,
    /// Events dead-lettered by the stage (rejected, or retries spent).
    pub dead_lettered: u64,
    /// Handler panics caught.
    pub panics: u64,
    /// Events this stage published with a routing key no queue is bound to.
    pub unroutable: u64,
    /// Times the handler deferred an event (`Outcome::Defer`), attempts not counted.
    pub deferred: u64,
    /// Events dead-lettered as `expired` (past their message's TTL or the stage's `ttl_ms`).
    pub expired: u64,
    /// Events dead-lettered because this stage's queue was full (overflow `dead_letter`).
    pub overflowed: u64,
    /// Events in the stage's input queues: counted when a batch goes in and when it comes out (a
    /// batch a sender still waits to put in does not count), at most `queue_capacity`.
    pub queue_depth: u64,
    /// The same count not capped: in minus out. It may pass `queue_capacity`, for an instant, by
    /// the batches that workers have taken but not yet counted out (at most one batch per
    /// worker); more would mean events counted in before they were in the queue.
    pub queue_depth_counted: u64,
    /// Most events the stage's input queues hold, every partition and priority level together.
    pub queue_capacity: usize,
    /// Events held for a retry by the stage's workers (their retry wheels): parked for a
    /// backoff, or waiting behind a parked event of the same key.
    pub retry_parked: u64,
    /// Events a second over the engine's last [`AlertRules::window_s`](crate::AlertRules::window_s)
    /// of snapshots (zero in the first snapshot).
    pub rates: StageRates,
    /// Lag in time: how long the oldest event in the stage's queues has waited, in microseconds
    /// (0 when they are empty). Read from the send time of the batch a worker took last, so it
    /// may overstate the wait by the gap between two batches, never understate it; it keeps
    /// growing while the stage's workers are stuck.
    pub lag_us: f64,
    /// Time from a batch's hand-off to the stage until the stage has handled it, per event.
    pub latency_us: LatencySummary,
    /// The sum of the latencies `latency_us` counts, in seconds: the mean over any span is the
    /// change in this over the change in `latency_us.count`.
    pub latency_total_s: f64,
}

/// The latency histograms behind a snapshot's summaries, in nanoseconds (hdrhistogram, three
/// significant digits), for exports that need more than percentiles.
#[derive(Debug, Clone)]
pub struct LatencyHistograms {
    /// Each stage's (hand-off to handled), by name, in declaration order, with the sum of its
    /// latencies in seconds.
    pub stages: Vec<(String, Histogram<u64>, f64)>,
    /// Accepted to finished, when the engine tracks completion.
    pub end_to_end: Option<Histogram<u64>>,
}

/// The whole engine at one moment: the type every report, view and export reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the engine started.
    pub uptime_s: f64,
    /// Messages accepted by `submit` and its siblings.
    pub submitted: u64,
    /// Submitted messages (and resumed ones) whose work has not finished.
    pub in_flight: u64,
    /// Submitted messages whose work has finished, every descendant event handled or
    /// dead-lettered.
    pub completed: u64,
    /// Every stage, in declaration order.
    pub stages: Vec<StageSnapshot>,
    /// Set when a worker died: which one and why.
    pub poisoned: Option<String>,
    /// With a journal: what its log has written.
    pub log: Option<crate::log::LogStats>,
    /// With a journal: time from journaling a submitted batch to its commit.
    pub ack_latency_us: Option<LatencySummary>,
    /// When the engine tracks completion: each finished message's time from acceptance (or
    /// from when it was scheduled, [`Engine::submit_many_at`](crate::Engine::submit_many_at))
    /// until its last descendant event finished.
    pub end_to_end_us: Option<LatencySummary>,
    /// The circuit breakers the application showed the engine
    /// ([`Engine::watch_breaker`](crate::Engine::watch_breaker)), by name: state and transitions.
    pub breakers: std::collections::BTreeMap<String, crate::breaker::BreakerReport>,
    /// Alerts firing and recent transitions ([`crate::alerts`]): evaluated as this snapshot was
    /// taken.
    pub alerts: crate::alerts::AlertsSnapshot,
}

impl Snapshot {
    /// Events finished over all stages.
    #[must_use]
    pub fn events_processed(&self) -> u64 {
        self.stages.iter().map(|s| s.processed).sum()
    }

    /// The stage named `name`.
    #[must_use]
    pub fn stage(&self, name: &str) -> Option<&StageSnapshot> {
        self.stages.iter().find(|s| s.name == name)
    }
}
