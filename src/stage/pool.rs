//! Elastic worker pools: a stage declared `workers = { min, max }` runs between `min` and `max`
//! workers. One controller thread per engine (SEDA's thread-pool controller, KEDA's scaler on lag)
//! grows a pool while its stage's lag age stays above the stage's `scale_lag_ms`, and shrinks it
//! while the lag stays low and a worker sits idle, one worker at a time, with hysteresis and a
//! cool-down. [`crate::Engine::set_workers`] resizes a pool by hand.
//!
//! A stage ordered by key gets `max` partitions from the start, each held by one worker at a time.
//! A resize moves partitions between workers: the pool says which worker should hold each one;
//! the worker holding one stops taking from it, and lets go only once it has handed on everything
//! it took from it (its journal records and outboxes flushed) and holds no parked event of its
//! keys; only then may the new holder take it. So a key's events are never handled on two workers
//! at once and keep their order across a resize.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Workers;
use crate::error::ResizeError;
use crate::metrics::StageMetrics;
use crate::stage::worker::WorkerCtx;
use crate::stage::Message;
use crate::topology::Runner;

/// How often the controller looks at every elastic pool.
pub(crate) const CONTROL_TICK: Duration = Duration::from_millis(20);
/// Ticks in a row the lag must stay above target before the pool grows.
const GROW_AFTER_TICKS: u32 = 2;
/// Least time between two growths: a new worker gets a moment to show its effect.
const GROW_SPACING: Duration = Duration::from_millis(40);
/// Weight of the newest sample in the average of busy workers.
const BUSY_SMOOTHING: f64 = 0.1;
/// A partition no worker holds.
const NOBODY: usize = usize::MAX;

/// What the workers of one elastic stage read to follow its resizes.
#[derive(Debug)]
pub(crate) struct PoolControl {
    /// Per worker index: told to finish what it holds and stop.
    retire: Vec<AtomicBool>,
    /// Ordered stages, per partition: the worker that should hold it, and the one that does.
    assigned: Vec<AtomicUsize>,
    held: Vec<AtomicUsize>,
    /// Bumped on every change a worker must act on.
    generation: AtomicU64,
}

impl PoolControl {
    fn new(max: usize, partitions: usize) -> Self {
        Self {
            retire: (0..max).map(|_| AtomicBool::new(false)).collect(),
            assigned: (0..partitions).map(|_| AtomicUsize::new(NOBODY)).collect(),
            held: (0..partitions).map(|_| AtomicUsize::new(NOBODY)).collect(),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes so far: a worker that saw this number has nothing new to act on.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether `worker` was told to stop.
    pub(crate) fn retiring(&self, worker: usize) -> bool {
        self.retire[worker].load(Ordering::Acquire)
    }

    /// The stage's partitions (0 unless it is ordered by key).
    pub(crate) fn partitions(&self) -> usize {
        self.assigned.len()
    }

    /// Whether `worker` should hold `partition`.
    pub(crate) fn is_assigned(&self, partition: usize, worker: usize) -> bool {
        self.assigned[partition].load(Ordering::Acquire) == worker
    }

    /// Takes `partition` for `worker` if nobody holds it.
    pub(crate) fn try_take(&self, partition: usize, worker: usize) -> bool {
        self.held[partition].compare_exchange(NOBODY, worker, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// `worker` lets go of `partition`: everything it took from it has been handed on.
    pub(crate) fn release(&self, partition: usize, worker: usize) {
        let was = self.held[partition].swap(NOBODY, Ordering::AcqRel);
        debug_assert_eq!(was, worker, "only the holder releases a partition");
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn assign(&self, partition: usize, worker: usize) {
        self.assigned[partition].store(worker, Ordering::Release);
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// What a new worker is made from: a worker context to copy and the stage's runner.
pub(crate) struct Template<M> {
    pub(crate) ctx: WorkerCtx<M>,
    pub(crate) runner: Runner<M>,
}

/// One worker slot of a pool.
#[derive(Default)]
struct Seat {
    thread: Option<JoinHandle<()>>,
    /// Told to retire (its thread may still be finishing).
    retiring: bool,
}

/// The controller's memory of one pool between ticks.
#[derive(Debug, Default)]
struct Steering {
    over_ticks: u32,
    calm_since: Option<Instant>,
    busy_average: f64,
    last_grow: Option<Instant>,
    last_resize: Option<Instant>,
}

/// One elastic stage's pool: its workers, the template new ones are made from, and the
/// controller's state.
pub(crate) struct Pool<M> {
    pub(crate) stage: usize,
    lag_target: Duration,
    cooldown: Duration,
    metrics: Arc<StageMetrics>,
    control: Arc<PoolControl>,
    inner: Mutex<PoolInner<M>>,
}

struct PoolInner<M> {
    /// Dropped when the engine stops: it holds the queues of the stages downstream.
    template: Option<Template<M>>,
    seats: Vec<Seat>,
    /// Workers started so far: each draws its completion tokens from its own range.
    spawned: u64,
    steering: Steering,
}

impl<M: Message> Pool<M> {
    /// A pool for stage `stage`, with its first `bounds.min` workers started. `ordered` stages
    /// get `bounds.max` partitions, shared out among the workers.
    pub(crate) fn start(
        stage: usize,
        template: Template<M>,
        ordered: bool,
    ) -> Result<Arc<Self>, crate::error::BuildError> {
        let config = template.ctx.config;
        let bounds = config.workers;
        let partitions = if ordered { bounds.max } else { 0 };
        let control = Arc::new(PoolControl::new(bounds.max, partitions));
        for partition in 0..partitions {
            control.assign(partition, partition % bounds.min);
        }
        let pool = Arc::new(Self {
            stage,
            lag_target: Duration::from_millis(config.scale_lag_ms),
            cooldown: Duration::from_millis(config.scale_cooldown_ms),
            metrics: Arc::clone(&template.ctx.metrics),
            control,
            inner: Mutex::new(PoolInner {
                template: Some(template),
                seats: (0..bounds.max).map(|_| Seat::default()).collect(),
                spawned: 0,
                steering: Steering::default(),
            }),
        });
        {
            let mut inner = pool.inner.lock();
            for worker in 0..bounds.min {
                pool.spawn(&mut inner, worker)
                    .map_err(|(name, source)| crate::error::BuildError::Spawn { name, source })?;
            }
            pool.metrics.workers.store(bounds.min, Ordering::Relaxed);
        }
        Ok(pool)
    }

    fn spawn(&self, inner: &mut PoolInner<M>, worker: usize) -> Result<(), (String, std::io::Error)> {
        let template = inner.template.as_ref().expect("spawned only while the pool is open");
        let serial = inner.spawned;
        let ctx = template.ctx.for_worker(worker, serial, Arc::clone(&self.control));
        let runner = Arc::clone(&template.runner);
        let name = ctx.name.clone();
        // The seat may have been a retired worker's.
        self.control.retire[worker].store(false, Ordering::Release);
        let thread =
            std::thread::Builder::new().name(name.clone()).spawn(move || runner(ctx)).map_err(|e| (name, e))?;
        inner.spawned += 1;
        inner.seats[worker] = Seat { thread: Some(thread), retiring: false };
        Ok(())
    }

    /// Workers not told to retire.
    fn active(inner: &PoolInner<M>) -> Vec<usize> {
        (0..inner.seats.len()).filter(|&w| inner.seats[w].thread.is_some() && !inner.seats[w].retiring).collect()
    }

    /// Joins the threads of retired workers that have stopped, freeing their seats.
    fn reap(inner: &mut PoolInner<M>) {
        for seat in &mut inner.seats {
            if seat.retiring && seat.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                if let Some(thread) = seat.thread.take() {
                    thread.join().ok();
                }
                seat.retiring = false;
            }
        }
    }

    /// Resizes the pool to `target` workers now: new workers start at once; retired ones finish
    /// what they hold first.
    pub(crate) fn resize(&self, target: usize, why: &str) -> Result<(), ResizeError> {
        let Workers { min, max } = self.metrics.bounds;
        if !(min..=max).contains(&target) {
            return Err(ResizeError::OutOfBounds { stage: self.metrics.name.clone(), workers: target, min, max });
        }
        let mut inner = self.inner.lock();
        if inner.template.is_none() {
            return Err(ResizeError::Stopped);
        }
        Self::reap(&mut inner);
        let mut active = Self::active(&inner);
        let from = active.len();
        if target == from {
            return Ok(());
        }
        while active.len() < target {
            let Some(seat) = (0..inner.seats.len()).find(|&w| inner.seats[w].thread.is_none()) else {
                // Every seat is taken by a worker still finishing its retirement: later.
                break;
            };
            active.push(seat);
            self.share_partitions(&active);
            if let Err((name, source)) = self.spawn(&mut inner, seat) {
                active.pop();
                self.share_partitions(&active);
                self.control.bump();
                self.metrics.workers.store(active.len(), Ordering::Relaxed);
                return Err(ResizeError::Spawn { name, source });
            }
            self.metrics.grown.fetch_add(1, Ordering::Relaxed);
        }
        while active.len() > target {
            let leaving = active.pop().expect("more active workers than the target, which is at least 1");
            inner.seats[leaving].retiring = true;
            self.share_partitions(&active);
            self.control.retire[leaving].store(true, Ordering::Release);
            self.metrics.shrunk.fetch_add(1, Ordering::Relaxed);
        }
        self.control.bump();
        self.metrics.workers.store(active.len(), Ordering::Relaxed);
        let now = Instant::now();
        inner.steering.last_resize = Some(now);
        if active.len() > from {
            inner.steering.last_grow = Some(now);
        }
        tracing::info!(stage = self.metrics.name.as_str(), from, to = active.len(), why, "pool resized");
        Ok(())
    }

    /// Shares the partitions of an ordered stage out among `active` workers, evenly, moving as
    /// few as it can: a partition stays with its worker unless that worker is leaving or holds
    /// more than its share.
    fn share_partitions(&self, active: &[usize]) {
        let partitions = self.control.partitions();
        if partitions == 0 || active.is_empty() {
            return;
        }
        let share = partitions.div_ceil(active.len());
        let mut load = vec![0_usize; self.control.retire.len()];
        let mut homeless = Vec::new();
        for partition in 0..partitions {
            let owner = self.control.assigned[partition].load(Ordering::Acquire);
            if active.contains(&owner) && load[owner] < share {
                load[owner] += 1;
            } else {
                homeless.push(partition);
            }
        }
        // Fill the least loaded first, so that a new worker gets a full share.
        for partition in homeless {
            let to = *active.iter().min_by_key(|&&w| load[w]).expect("at least one active worker");
            load[to] += 1;
            self.control.assign(partition, to);
        }
        // Even out: nobody more than one partition above anybody.
        loop {
            let most = *active.iter().max_by_key(|&&w| load[w]).expect("active");
            let least = *active.iter().min_by_key(|&&w| load[w]).expect("active");
            if load[most] <= load[least] + 1 {
                break;
            }
            let moved = (0..partitions)
                .find(|&p| self.control.assigned[p].load(Ordering::Acquire) == most)
                .expect("a worker with load holds a partition");
            self.control.assign(moved, least);
            load[most] -= 1;
            load[least] += 1;
        }
    }

    /// One controller tick: grow while the lag stays above target, shrink while it stays low
    /// and a worker sits idle.
    pub(crate) fn steer(&self, now: Instant) {
        let lag = self.metrics.lag_now();
        let busy = self.metrics.busy_workers.load(Ordering::Relaxed) as f64;
        let (grow, shrink, workers) = {
            let mut inner = self.inner.lock();
            Self::reap(&mut inner);
            let workers = Self::active(&inner).len();
            let cooldown = self.cooldown;
            let steering = &mut inner.steering;
            steering.busy_average += BUSY_SMOOTHING * (busy - steering.busy_average);
            steering.over_ticks = if lag > self.lag_target { steering.over_ticks + 1 } else { 0 };
            let calm = lag < self.lag_target / 2 && steering.busy_average < workers as f64 - 1.0;
            steering.calm_since = if calm { steering.calm_since.or(Some(now)) } else { None };
            let grow = steering.over_ticks >= GROW_AFTER_TICKS
                && workers < self.metrics.bounds.max
                && steering.last_grow.is_none_or(|at| now.duration_since(at) >= GROW_SPACING);
            let shrink = !grow
                && workers > self.metrics.bounds.min
                && steering.calm_since.is_some_and(|since| now.duration_since(since) >= cooldown)
                && steering.last_resize.is_none_or(|at| now.duration_since(at) >= cooldown);
            if shrink {
                steering.calm_since = None;
            }
            (grow, shrink, workers)
        };
        let result = if grow {
            self.resize(workers + 1, "lag above target")
        } else if shrink {
            self.resize(workers - 1, "idle workers")
        } else {
            Ok(())
        };
        if let Err(error) = result {
            tracing::warn!(stage = self.metrics.name.as_str(), %error, "pool resize failed");
        }
    }

    /// Stops resizing and drops the template (and with it its hold on the queues downstream);
    /// returns the threads still running, to join.
    pub(crate) fn close(&self) -> Vec<JoinHandle<()>> {
        let mut inner = self.inner.lock();
        inner.template = None;
        inner.seats.iter_mut().filter_map(|seat| seat.thread.take()).collect()
    }
}

/// Adaptive batching for one stage (after SEDA's batching controller): the batch size senders
/// fill to doubles while the stage is busy (its workers at work on average more than half the
/// time, or its queue holding more than two batches: big batches keep the throughput) and halves
/// while it is light (at work under a fifth of the time, its queue under half a batch: small
/// batches leave sooner), between the stage's `batch_events_min` and `batch_events_max`.
pub(crate) struct BatchControl {
    metrics: Arc<StageMetrics>,
    min: usize,
    max: usize,
    /// The share of its pool at work, averaged over the controller's looks.
    busy_share: f64,
}

impl BatchControl {
    pub(crate) fn new(metrics: Arc<StageMetrics>, min: usize, max: usize) -> Self {
        Self { metrics, min, max, busy_share: 1.0 }
    }

    /// One controller tick.
    pub(crate) fn steer(&mut self) {
        let limit = self.metrics.batch_limit.load(Ordering::Relaxed);
        let depth = usize::try_from(self.metrics.depth_counted()).unwrap_or(usize::MAX);
        let workers = self.metrics.workers.load(Ordering::Relaxed).max(1);
        let busy = self.metrics.busy_workers.load(Ordering::Relaxed) as f64 / workers as f64;
        self.busy_share += BUSY_SMOOTHING * (busy - self.busy_share);
        let next = if depth > 2 * limit || self.busy_share > 0.5 {
            (limit * 2).min(self.max)
        } else if depth < limit / 2 && self.busy_share < 0.2 {
            (limit / 2).max(self.min)
        } else {
            limit
        };
        if next != limit {
            self.metrics.batch_limit.store(next, Ordering::Relaxed);
            tracing::debug!(stage = self.metrics.name.as_str(), from = limit, to = next, depth, "batch size changed");
        }
    }
}

/// What the engine's controller thread steers.
pub(crate) struct Steered<M> {
    pub(crate) pools: Vec<Arc<Pool<M>>>,
    pub(crate) batches: Vec<BatchControl>,
}

impl<M> Steered<M> {
    pub(crate) fn is_empty(&self) -> bool {
        self.pools.is_empty() && self.batches.is_empty()
    }
}

/// The engine's controller thread: steers every elastic pool and adaptive batch size each
/// [`CONTROL_TICK`] until `stop` is dropped.
pub(crate) fn run_controller<M: Message>(steered: &mut Steered<M>, stop: &crossbeam_channel::Receiver<()>) {
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(CONTROL_TICK) {
        let now = Instant::now();
        for pool in &steered.pools {
            pool.steer(now);
        }
        for batch in &mut steered.batches {
            batch.steer();
        }
    }
}
