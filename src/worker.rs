//! The worker loop: take a batch, handle each event on its own, send on in batches.
//!
//! Natural batching: emitted events collect in one outbox per linked stage and leave when the
//! outbox is full or when this worker finds its own queue empty, so a lightly loaded pipeline adds
//! no latency and a loaded one moves full batches.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::TryRecvError;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::channel::{BatchReceiver, BatchSender, Received, SendFailure, StageInput};
use crate::config::Jitter;
use crate::config::{Overflow, StageConfig};
use crate::dead_letter::{DeadLetter, DeadLetterKind, DeadLetterSink, Failures};
use crate::journal::{unix_micros, Journal, JournalWriter};
use crate::metrics::{BatchTally, StageMetrics};
use crate::routing::Exchange;
use crate::stage::StageId;
use crate::stage::{clock_us, Deadline, Emitter, Envelope, Handler, Message, Outcome, Reason};
use crate::wheel::{Insert, Wheel};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// State every thread of one engine shares: the poison flag and why it was raised.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) poisoned: Arc<AtomicBool>,
    pub(crate) poison_reason: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn poison(&self, reason: String) {
        tracing::error!(%reason, "engine poisoned");
        self.poison_reason.lock().get_or_insert(reason);
        self.poisoned.store(true, Ordering::Release);
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

/// Poisons the engine if its worker thread unwinds: callers must never wait on a dead worker.
struct PoisonGuard<'a> {
    shared: &'a Shared,
    name: &'a str,
}

impl Drop for PoisonGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.poison(format!("worker {} panicked outside its handler", self.name));
        }
    }
}

/// Everything a worker thread needs, built by the engine.
pub(crate) struct WorkerCtx<M> {
    pub(crate) name: String,
    pub(crate) stage_name: Arc<str>,
    pub(crate) worker: usize,
    /// The stage's index in its topology.
    pub(crate) stage: u16,
    pub(crate) config: StageConfig,
    pub(crate) journal: Option<Journal<M>>,
    /// The topology's exchange and which of its routes this stage publishes.
    pub(crate) routes: Option<(Arc<Exchange<StageId>>, Vec<bool>, bool)>,
    /// This worker's queues, one per priority level, lowest first.
    pub(crate) inputs: Vec<BatchReceiver<M>>,
    /// Indexed by [`StageId`](crate::StageId): the input of every stage linked from this one.
    pub(crate) outputs: Vec<Option<StageInput<M>>>,
    pub(crate) metrics: Arc<StageMetrics>,
    pub(crate) dead_letters: Arc<dyn DeadLetterSink<M>>,
    pub(crate) shared: Arc<Shared>,
}

/// Why a worker stops early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// A downstream stage is gone (its workers died) or the engine is poisoned.
    DownstreamGone,
    /// The log refused an append: nothing more can be made durable.
    Log(crate::log::LogError),
}

/// Runs one worker until its queue is closed and drained and its retries are spent.
pub(crate) fn run<M: Message, H: Handler<M>>(ctx: WorkerCtx<M>, handler: H) {
    let shared = Arc::clone(&ctx.shared);
    let name = ctx.name.clone();
    let _guard = PoisonGuard { shared: &shared, name: &name };
    let mut worker = Worker::new(ctx, handler);
    match worker.run_loop() {
        Ok(()) => {}
        Err(Stop::DownstreamGone) => shared.poison(format!("worker {name} stopped: a downstream stage is gone")),
        Err(Stop::Log(error)) => shared.poison(format!("worker {name} stopped: {error}")),
    }
}

/// An outbox: emitted events bound for one stage, sent when full or when the worker goes idle.
struct Outbox<M> {
    sender: BatchSender<M>,
    buffer: Vec<Envelope<M>>,
}

impl<M> Outbox<M> {
    /// Adds an event; true when the outbox is full and must be flushed.
    fn push(&mut self, envelope: Envelope<M>) -> bool {
        self.buffer.push(envelope);
        self.buffer.len() >= self.sender.batch_events_max()
    }
}

/// The outboxes of one linked stage: one per partition of its input.
struct Outboxes<M> {
    input: StageInput<M>,
    partitions: Vec<Outbox<M>>,
}

struct Worker<M, H> {
    ctx: WorkerCtx<M>,
    handler: H,
    outboxes: Vec<Option<Outboxes<M>>>,
    emitter: Emitter<M>,
    journal: Option<JournalWriter<M>>,
    /// Events waiting for another attempt, parked by key: while a key waits, its later events
    /// wait behind it, so a retry never reorders a key's events within this worker. Each with
    /// its expiry in this stage (its own deadline or the stage's TTL, whichever comes first).
    parked: FxHashMap<u64, VecDeque<(Envelope<M>, Deadline)>>,
    /// The failures of each key's event in retry (the parked head), for its dead letter.
    failures: FxHashMap<u64, Failures>,
    /// The tick at which each parked key's head may be tried again (absent: at once).
    retry_due: FxHashMap<u64, u64>,
    /// Parked keys whose heads are due, in the order they are to be tried again.
    retry_keys: VecDeque<u64>,
    /// Events parked in all; at the stage's queue bound the worker stops taking new events, so
    /// parking never grows memory past what the queue itself may hold.
    parked_events: usize,
    /// Parked keys waiting out their backoff, by due tick (milliseconds since `started`).
    backoff: Wheel<u64>,
    started: Instant,
    /// The engine clock ([`clock_us`]) read once per unit of work, for expiry.
    now_us: u64,
    /// The wall clock (Unix microseconds) read once per unit of work, for failure times.
    wall_us: u64,
    rng: SmallRng,
}

/// What became of one event.
enum Handled<M> {
    /// Finished: done, rejected or dead-lettered.
    Finished,
    /// To be tried again: after its backoff, or at once (a conflict).
    Retry(Envelope<M>, Backoff),
}

/// When a retried event is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backoff {
    /// After the stage's exponential backoff with jitter.
    Delayed,
    /// At once.
    Immediate,
    /// After this many milliseconds.
    Fixed(u64),
}

/// What the next unit of work is.
enum Next<M> {
    /// A batch, and the level of the queue it came from.
    Batch(crate::channel::Batch<M>, usize),
    Retries,
    Stop,
}

impl<M: Message, H: Handler<M>> Worker<M, H> {
    fn new(mut ctx: WorkerCtx<M>, handler: H) -> Self {
        let outputs = std::mem::take(&mut ctx.outputs);
        let links = outputs.iter().map(Option::is_some).collect();
        let outboxes = outputs
            .into_iter()
            .map(|input| {
                input.map(|input| {
                    let partitions = (0..input.partitions())
                        .map(|p| {
                            let sender = input.sender(p).clone();
                            Outbox { buffer: sender.buffer(), sender }
                        })
                        .collect();
                    Outboxes { input, partitions }
                })
            })
            .collect();
        let journal = ctx.journal.take().map(|journal| JournalWriter::new(journal, ctx.stage));
        let mut emitter = Emitter::new(links, journal.is_some());
        if let Some((exchange, may_publish, dead_letter_unroutable)) = ctx.routes.take() {
            emitter.set_routes(exchange, may_publish, dead_letter_unroutable);
        }
        let seed = (u64::from(ctx.stage) << 32) ^ ctx.worker as u64;
        Self {
            ctx,
            handler,
            outboxes,
            emitter,
            journal,
            parked: FxHashMap::default(),
            failures: FxHashMap::default(),
            retry_due: FxHashMap::default(),
            retry_keys: VecDeque::new(),
            parked_events: 0,
            backoff: Wheel::new(0),
            started: Instant::now(),
            now_us: clock_us(),
            wall_us: unix_micros(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Handles an event from the queue, unless it has expired (then it is dead-lettered at
    /// once) or its key is parked (then it waits behind). `expires` is its deadline in this
    /// stage: its own, or the stage's TTL if that comes first.
    fn take(&mut self, event: Envelope<M>, expires: Deadline, tally: &mut BatchTally) -> Result<(), Stop> {
        // A fresh clock reading for events that can expire: a batch's later events may have
        // waited behind a slow handler since the batch started.
        if expires != Deadline::NEVER && expires.passed(clock_us()) {
            self.expire(event, Failures::default(), tally);
            return Ok(());
        }
        if !self.parked.is_empty() {
            if let Some(queue) = self.parked.get_mut(&event.key) {
                queue.push_back((event, expires));
                self.parked_events += 1;
                return Ok(());
            }
        }
        if let Handled::Retry(event, backoff) = self.handle(event, tally)? {
            let key = event.key;
            let attempt = event.attempt;
            self.parked.entry(key).or_default().push_back((event, expires));
            self.parked_events += 1;
            self.schedule(key, attempt, backoff);
        }
        Ok(())
    }

    /// Dead-letters an event that outlived its deadline, with the failures it met before.
    fn expire(&mut self, event: Envelope<M>, failures: Failures, tally: &mut BatchTally) {
        tally.processed += 1;
        tally.expired += 1;
        tally.dead_lettered += 1;
        self.dead_letter(event, DeadLetterKind::Expired, failures, "its time to live ran out".into());
    }

    /// Milliseconds since this worker started: the backoff wheel's clock.
    fn now_tick(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The delay before attempt `attempt + 1` of `key`'s event: exponential from the base,
    /// capped, jittered.
    fn backoff_ms(&mut self, key: u64, attempt: u32) -> u64 {
        let config = &self.ctx.config;
        let (base, cap) = (config.retry_backoff_ms_base, config.retry_backoff_ms_max);
        if base == 0 {
            return 0;
        }
        let doublings = attempt.saturating_sub(1).min(32);
        let delay = base.saturating_mul(1 << doublings).min(cap);
        match config.retry_jitter {
            Jitter::None => delay,
            Jitter::Full => self.rng.random_range(0..=delay),
            Jitter::Decorrelated => {
                let failures = self.failures.entry(key).or_default();
                let previous = failures.last_delay_ms.max(base);
                let delay = self.rng.random_range(base..=previous.saturating_mul(3)).min(cap);
                failures.last_delay_ms = delay;
                delay
            }
        }
    }

    /// Puts a parked key's head back in line: now, once its backoff has passed, or when the
    /// first of the key's parked events expires if that comes sooner (expired events leave at
    /// once, instead of waiting out the head's backoff).
    fn schedule(&mut self, key: u64, attempt: u32, backoff: Backoff) {
        let delay = match backoff {
            Backoff::Immediate => 0,
            Backoff::Delayed => self.backoff_ms(key, attempt),
            Backoff::Fixed(ms) => ms,
        };
        // A delay of d ms is due at the first tick at least d ms away: never early.
        let due = self.now_tick() + delay + u64::from(delay > 0);
        if delay > 0 {
            self.retry_due.insert(key, due);
        }
        self.wake(key, due);
    }

    /// Puts `key` on the wheel for tick `due`, or sooner if one of its parked events expires
    /// before: expired events leave on time instead of waiting out the head's backoff.
    fn wake(&mut self, key: u64, due: u64) {
        let first_expiry = self
            .parked
            .get(&key)
            .and_then(|queue| queue.iter().map(|&(_, expires)| expires).min())
            .unwrap_or(Deadline::NEVER);
        let due = match first_expiry.left(clock_us()) {
            Some(left) => due.min(self.now_tick() + u64::try_from(left.as_millis()).unwrap_or(u64::MAX) + 1),
            None => due,
        };
        match self.backoff.insert(due, key) {
            Insert::Scheduled => {}
            Insert::AlreadyDue(key) | Insert::TooFar(key) => self.retry_keys.push_back(key),
        }
    }

    /// Moves keys whose backoff has passed into line.
    fn release_due(&mut self) {
        if self.backoff.is_empty() {
            return;
        }
        let now = self.now_tick();
        let mut due = Vec::new();
        self.backoff.advance(now, &mut due);
        self.retry_keys.extend(due);
    }

    /// Tries the head of the next parked key again.
    fn retry_next(&mut self, tally: &mut BatchTally) -> Result<(), Stop> {
        let Some(key) = self.retry_keys.pop_front() else { return Ok(()) };
        let Some((event, expires)) = self.parked.get_mut(&key).and_then(VecDeque::pop_front) else {
            self.parked.remove(&key);
            return Ok(());
        };
        self.parked_events -= 1;
        self.expire_parked(key, tally);
        let handled = if expires.passed(self.now_us) {
            self.retry_due.remove(&key);
            let failures = self.failures_of(key);
            self.expire(event, failures, tally);
            Handled::Finished
        } else {
            match self.retry_due.get(&key) {
                // Woken for a parked event's expiry: the head's backoff still runs.
                Some(&due) if self.now_tick() < due => {
                    let queue = self.parked.get_mut(&key).expect("a key stays parked until its queue is empty");
                    queue.push_front((event, expires));
                    self.parked_events += 1;
                    self.wake(key, due);
                    return Ok(());
                }
                Some(_) => {
                    self.retry_due.remove(&key);
                }
                None => {}
            }
            self.handle(event, tally)?
        };
        let queue = self.parked.get_mut(&key).expect("a key stays parked until its queue is empty");
        match handled {
            Handled::Retry(event, backoff) => {
                let attempt = event.attempt;
                queue.push_front((event, expires));
                self.parked_events += 1;
                self.schedule(key, attempt, backoff);
            }
            // The head is done; the key's next event never failed: it goes on at once.
            Handled::Finished if queue.is_empty() => {
                self.parked.remove(&key);
            }
            Handled::Finished => self.retry_keys.push_back(key),
        }
        Ok(())
    }

    /// Dead-letters the expired events waiting behind `key`'s head; the others keep their order.
    fn expire_parked(&mut self, key: u64, tally: &mut BatchTally) {
        let now = self.now_us;
        let Some(queue) = self.parked.get_mut(&key) else { return };
        if queue.iter().all(|&(_, expires)| !expires.passed(now)) {
            return;
        }
        let (expired, kept): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(queue).into_iter().partition(|&(_, expires)| expires.passed(now));
        *queue = kept;
        self.parked_events -= expired.len();
        for (event, _) in expired {
            self.expire(event, Failures::default(), tally);
        }
    }

    fn run_loop(&mut self) -> Result<(), Stop> {
        loop {
            match self.next()? {
                Next::Batch(batch, level) => {
                    self.ctx.metrics.busy_workers.fetch_add(1, Ordering::Relaxed);
                    let count = batch.events.len() as u64;
                    let mut events = batch.events;
                    let mut tally = BatchTally::default();
                    if let Some(journal) = &mut self.journal {
                        journal.stamp();
                    }
                    self.now_us = clock_us();
                    self.wall_us = unix_micros();
                    // The stage's TTL counts from when the batch was sent to it.
                    let stage_deadline = match self.ctx.config.ttl_ms {
                        0 => Deadline::NEVER,
                        ttl_ms => {
                            let age_us = u64::try_from(batch.sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                            Deadline(self.now_us.saturating_sub(age_us).saturating_add(ttl_ms * 1_000))
                        }
                    };
                    let result = events.drain(..).try_for_each(|event| {
                        let expires = event.deadline.min(stage_deadline);
                        self.take(event, expires, &mut tally)
                    });
                    self.ctx.inputs[level].recycle(events);
                    self.ctx.metrics.publish(&tally);
                    self.ctx.metrics.record_latency(self.ctx.worker, batch.sent_at.elapsed(), count);
                    self.ctx.metrics.busy_workers.fetch_sub(1, Ordering::Relaxed);
                    result?;
                }
                Next::Retries => {
                    let mut tally = BatchTally::default();
                    self.now_us = clock_us();
                    self.wall_us = unix_micros();
                    let due = self.retry_keys.len().min(self.ctx.config.batch_events_max);
                    for _ in 0..due {
                        self.retry_next(&mut tally)?;
                    }
                    self.ctx.metrics.publish(&tally);
                }
                Next::Stop => break,
            }
        }
        self.flush_all()
    }

    fn next(&mut self) -> Result<Next<M>, Stop> {
        loop {
            self.release_due();
            // Highest priority first; none at all while parked events fill the stage's bound.
            let taking = self.parked_events < self.ctx.config.queue_events_max();
            let mut all_gone = true;
            for level in (0..self.ctx.inputs.len()).rev().filter(|_| taking) {
                match self.ctx.inputs[level].try_recv() {
                    Ok(batch) => return Ok(Next::Batch(batch, level)),
                    Err(TryRecvError::Empty) => all_gone = false,
                    Err(TryRecvError::Disconnected) => {}
                }
            }
            if !self.retry_keys.is_empty() {
                return Ok(Next::Retries);
            }
            if taking && all_gone && self.backoff.is_empty() {
                return Ok(Next::Stop);
            }
            // Nothing to do now: send what is collected before waiting, so nothing lingers.
            self.flush_all()?;
            let wait = self.backoff.next_due().map(|due| Duration::from_millis(due.saturating_sub(self.now_tick())));
            if all_gone || !taking {
                // Intake is closed or paused: only backoffs remain to be waited out.
                std::thread::sleep(wait.unwrap_or(Duration::from_millis(1)));
                continue;
            }
            let mut gone = vec![false; self.ctx.inputs.len()];
            match BatchReceiver::recv_any(&self.ctx.inputs, &mut gone, wait) {
                Received::Batch(level, batch) => return Ok(Next::Batch(batch, level)),
                Received::Closed if self.backoff.is_empty() => return Ok(Next::Stop),
                // Time to look at the backoffs again (or only they remain).
                Received::TimedOut | Received::Closed => {}
            }
        }
    }

    /// Sends the journal's records, then every outbox: a stream's records must reach the log
    /// before anything downstream can record a later fact about it.
    fn flush_all(&mut self) -> Result<(), Stop> {
        self.flush_journal()?;
        for to in 0..self.outboxes.len() {
            let partitions = self.outboxes[to].as_ref().map_or(0, |o| o.partitions.len());
            for partition in 0..partitions {
                self.flush_outbox(to, partition)?;
            }
        }
        Ok(())
    }

    /// Sends one outbox. A destination whose overflow policy is `dead_letter` and whose queue is
    /// full gets the batch dead-lettered instead of holding this worker back.
    fn flush_outbox(&mut self, to: usize, partition: usize) -> Result<(), Stop> {
        let Some(outboxes) = self.outboxes[to].as_mut() else { return Ok(()) };
        let outbox = &mut outboxes.partitions[partition];
        if outbox.buffer.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut outbox.buffer, outbox.sender.buffer());
        let sent = match outboxes.input.overflow {
            Overflow::Block => outbox.sender.send(full),
            Overflow::DeadLetter => outbox.sender.try_send(full),
        };
        match sent {
            Ok(()) => Ok(()),
            Err(SendFailure::Full(batch)) => {
                outboxes.input.count_overflow(batch.events.len() as u64);
                let stage = outboxes.input.stage.clone();
                let reason: Reason = "its queue was full".into();
                for event in batch.events {
                    self.dead_letter_in(&stage, event, DeadLetterKind::Overflow, Failures::default(), reason.clone());
                }
                Ok(())
            }
            Err(SendFailure::Gone(_)) => Err(Stop::DownstreamGone),
        }
    }

    fn flush_journal(&mut self) -> Result<(), Stop> {
        match &mut self.journal {
            Some(journal) => journal.flush().map_err(Stop::Log),
            None => Ok(()),
        }
    }

    /// The failures `key`'s event met so far in this stage (none if it never failed).
    fn failures_of(&mut self, key: u64) -> Failures {
        if self.failures.is_empty() {
            return Failures::default();
        }
        self.failures.remove(&key).unwrap_or_default()
    }

    fn handle(&mut self, mut event: Envelope<M>, tally: &mut BatchTally) -> Result<Handled<M>, Stop> {
        self.emitter.begin(&event);
        let handler = &mut self.handler;
        let emitter = &mut self.emitter;
        let mut panicked = false;
        let outcome = match catch_unwind(AssertUnwindSafe(|| handler.handle(&event, emitter))) {
            Ok(outcome) => outcome,
            Err(payload) => {
                tally.panics += 1;
                panicked = true;
                Outcome::Retry(panic_reason(payload.as_ref()))
            }
        };
        if let Some(reason) = self.emitter.misuse.take() {
            self.emitter.clear();
            tally.processed += 1;
            tally.dead_lettered += 1;
            let failures = self.failures_of(event.key);
            self.dead_letter(event, DeadLetterKind::HandlerMisuse, failures, reason);
            return Ok(Handled::Finished);
        }
        let backoff = if matches!(outcome, Outcome::Conflict(_)) { Backoff::Immediate } else { Backoff::Delayed };
        match outcome {
            Outcome::Done => {
                if !self.failures.is_empty() {
                    self.failures.remove(&event.key);
                }
                tally.processed += 1;
                tally.emitted += self.emitter.staged.len() as u64;
                let cause = match &mut self.journal {
                    Some(journal) => journal.commit(&event, &self.emitter),
                    None => event.cause,
                };
                let mut staged = std::mem::take(&mut self.emitter.staged);
                for (to, mut envelope) in staged.drain(..) {
                    envelope.cause = cause;
                    let outboxes = self.outboxes[to.index()]
                        .as_mut()
                        .expect("the emitter stages only events for linked stages, which have outboxes");
                    let partition = outboxes.input.queue_of(envelope.key, envelope.msg.priority());
                    if outboxes.partitions[partition].push(envelope) {
                        self.flush_journal()?;
                        self.flush_outbox(to.index(), partition)?;
                    }
                }
                self.emitter.staged = staged;
                tally.unroutable += self.emitter.unroutable_count;
                let unroutable = std::mem::take(&mut self.emitter.unroutable);
                for msg in unroutable {
                    let deadline = event.deadline;
                    let envelope = Envelope { key: event.key, seq: event.seq, cause, attempt: 0, deadline, msg };
                    tally.dead_lettered += 1;
                    let stage = self.ctx.stage_name.clone();
                    self.dead_letter_in(
                        &stage,
                        envelope,
                        DeadLetterKind::Unroutable,
                        Failures::default(),
                        "no queue is bound to its routing key".into(),
                    );
                }
                self.emitter.clear();
            }
            Outcome::Retry(reason) | Outcome::Conflict(reason) => {
                self.emitter.clear();
                tally.retried += 1;
                event.attempt += 1;
                if event.attempt >= self.ctx.config.attempts_max {
                    tally.processed += 1;
                    tally.dead_lettered += 1;
                    let kind = if panicked { DeadLetterKind::Panicked } else { DeadLetterKind::RetriesExhausted };
                    let failures = self.failures_of(event.key);
                    self.dead_letter(event, kind, failures, reason);
                } else {
                    let now = self.wall_us;
                    self.failures.entry(event.key).or_default().push(reason, now);
                    return Ok(Handled::Retry(event, backoff));
                }
            }
            Outcome::Defer(wait) => {
                self.emitter.clear();
                tally.deferred += 1;
                let ms = u64::try_from(wait.as_millis())
                    .unwrap_or(u64::MAX)
                    .min(crate::config::limits::RETRY_BACKOFF_MS_MAX);
                return Ok(Handled::Retry(event, Backoff::Fixed(ms)));
            }
            Outcome::Reject(reason) => self.refuse(event, DeadLetterKind::Rejected, reason, tally),
            Outcome::Malformed(reason) => self.refuse(event, DeadLetterKind::Malformed, reason, tally),
        }
        Ok(Handled::Finished)
    }

    /// Dead-letters an event its handler failed for good (rejected or malformed).
    fn refuse(&mut self, mut event: Envelope<M>, kind: DeadLetterKind, reason: Reason, tally: &mut BatchTally) {
        self.emitter.clear();
        tally.processed += 1;
        tally.rejected += 1;
        tally.dead_lettered += 1;
        event.attempt += 1;
        let failures = self.failures_of(event.key);
        self.dead_letter(event, kind, failures, reason);
    }

    fn dead_letter(&mut self, envelope: Envelope<M>, kind: DeadLetterKind, failures: Failures, reason: Reason) {
        let stage = self.ctx.stage_name.clone();
        self.dead_letter_in(&stage, envelope, kind, failures, reason);
    }

    /// Dead-letters an event on behalf of `stage` (this one, or a destination that refused it):
    /// `failures` are those it met before, `reason` the last one.
    fn dead_letter_in(
        &mut self,
        stage: &Arc<str>,
        envelope: Envelope<M>,
        kind: DeadLetterKind,
        failures: Failures,
        reason: Reason,
    ) {
        tracing::debug!(%stage, key = envelope.key, %kind, %reason, "dead letter");
        let first_failure_us = if failures.errors.is_empty() { self.wall_us } else { failures.first_us };
        let letter = DeadLetter {
            stage: stage.to_owned(),
            kind,
            reason,
            errors: failures.errors,
            errors_dropped: failures.errors_dropped,
            first_failure_us,
            last_failure_us: self.wall_us,
            attempts: envelope.attempt,
            envelope,
        };
        if let Some(journal) = &mut self.journal {
            journal.dead_letter(&letter);
        }
        self.ctx.dead_letters.dead_letter(letter);
    }
}

fn panic_reason(payload: &(dyn Any + Send)) -> Reason {
    let text = payload
        .downcast_ref::<&'static str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text payload".to_owned());
    format!("handler panicked: {text}").into()
}
