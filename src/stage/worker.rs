//! The worker loop: take a batch, handle each event on its own, send on in batches.
//!
//! Natural batching: emitted events collect in one outbox per linked stage and leave when the
//! outbox is full or when this worker finds its own queue empty, so a lightly loaded pipeline adds
//! no latency and a loaded one moves full batches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use parking_lot::Mutex;

use crate::channel::{partition_of, BatchReceiver, Received, SendFailure, StageInput};
use crate::clock::Clock;
use crate::completion::{Acks, Tokens, Tracker};
use crate::config::{Overflow, StageConfig};
use crate::dead_letter::{DeadLetter, DeadLetterKind, DeadLetterSink, Failures};
use crate::journal::{Journal, JournalWriter};
use crate::metrics::{BatchTally, StageMetrics};
use crate::routing::Exchange;
use crate::stage::handling::{bury, dead_letter, Effects, StageCore};
use crate::stage::outbox::Outboxes;
use crate::stage::pool::PoolControl;
use crate::stage::{Deadline, Emitter, Envelope, Handler, Message, Reason, StageId};

/// Most message ids one completion record lists (8 bytes each).
const COMPLETIONS_PER_RECORD: usize = 4_096;

/// Longest a finished message waits for its completion to be journaled while the worker idles.
const COMPLETION_LINGER: Duration = Duration::from_millis(20);

/// Longest a worker of an elastic pool waits without looking at its pool's changes.
const POOL_LOOK: Duration = Duration::from_millis(5);

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
    pub(crate) clock: Arc<dyn Clock>,
    /// The engine's completion tracker, and whether it tracks.
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) track_completion: bool,
    /// Workers started in the stage before this one: its completion tokens' range.
    pub(crate) serial: u64,
    /// In an elastic pool: what the worker follows (then `inputs` holds every queue of the
    /// stage, and the worker reads those of the partitions it holds).
    pub(crate) pool: Option<Arc<PoolControl>>,
}

impl<M> WorkerCtx<M> {
    /// A copy of this context for worker `worker` of an elastic pool, the `serial`th started.
    pub(crate) fn for_worker(&self, worker: usize, serial: u64, pool: Arc<PoolControl>) -> Self {
        Self {
            name: format!("conduit:{}:{worker}", self.stage_name),
            stage_name: Arc::clone(&self.stage_name),
            worker,
            stage: self.stage,
            config: self.config,
            journal: self.journal.clone(),
            routes: self.routes.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            metrics: Arc::clone(&self.metrics),
            dead_letters: Arc::clone(&self.dead_letters),
            shared: Arc::clone(&self.shared),
            clock: Arc::clone(&self.clock),
            tracker: Arc::clone(&self.tracker),
            track_completion: self.track_completion,
            serial,
            pool: Some(pool),
        }
    }
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

/// Where a worker's results go: its outboxes, its journal and the dead-letter sink.
struct WorkerIo<M> {
    outboxes: Vec<Option<Outboxes<M>>>,
    journal: Option<JournalWriter<M>>,
    dead_letters: Arc<dyn DeadLetterSink<M>>,
    /// The wall clock read once per unit of work, for overflow dead letters.
    wall_us: u64,
    /// This unit's completion updates, the tracker they go to, and the roots they finished.
    acks: Acks,
    tracker: Arc<Tracker>,
    finished: Vec<u64>,
    /// When the oldest of `finished` was collected (with a journal).
    finished_since: Option<Instant>,
}

struct Worker<M, H> {
    /// The queues this worker reads now, level by level (lowest first), partitions in turn
    /// within a level.
    inputs: Vec<BatchReceiver<M>>,
    /// Which queue of a level to look at first: taking in turn keeps partitions fair.
    turn: usize,
    metrics: Arc<StageMetrics>,
    index: usize,
    core: StageCore<M, H>,
    io: WorkerIo<M>,
    membership: Option<Membership<M>>,
}

/// A worker's place in an elastic pool.
struct Membership<M> {
    control: Arc<PoolControl>,
    /// The pool's generation last acted on.
    seen: u64,
    /// Every queue of the stage: `partition * levels + level`.
    all: Vec<BatchReceiver<M>>,
    levels: usize,
    /// Partitions this worker holds, and whether it reads each (it stops reading one the pool
    /// gave to another worker, and lets go of it once it is clear of it).
    holding: Vec<(usize, bool)>,
    standing: Standing,
}

/// Where a worker of an elastic pool stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Reading what it holds, nothing to hand over or take.
    Settled,
    /// A partition waits to be let go or taken: the worker goes on, but may not stop.
    Moving,
    /// Told to retire: it takes nothing new and finishes its parked events.
    Leaving,
    /// Retired and clear: it stops.
    Gone,
}

/// What the next unit of work is.
enum Next<M> {
    /// A batch, and the level of the queue it came from.
    Batch(crate::channel::Batch<M>, usize),
    Retries,
    Stop,
}

impl<M: Message> Effects<M> for WorkerIo<M> {
    type Stop = Stop;

    // Called once per handled event, from one place: inlined, it costs no call (measured with
    // callgrind: about 20 instructions an event).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn forward(&mut self, event: &Envelope<M>, emitter: &mut Emitter<M>) -> Result<u64, Stop> {
        let cause = match &mut self.journal {
            Some(journal) => journal.commit(event, emitter),
            None => event.cause,
        };
        let mut staged = emitter.take_staged();
        let mut result = Ok(cause);
        for (to, mut envelope) in staged.drain(..) {
            envelope.cause = cause;
            let outboxes = self.outboxes[to.index()]
                .as_mut()
                .expect("the emitter stages only events for linked stages, which have outboxes");
            let partition = outboxes.input.queue_of(envelope.key, envelope.msg.priority());
            if outboxes.partitions[partition].push(envelope) && result.is_ok() {
                if let Err(stop) = self.flush_journal().and_then(|()| self.flush_outbox(to.index(), partition)) {
                    result = Err(stop);
                }
            }
        }
        emitter.restore_staged(staged);
        result
    }

    fn dead_letter(&mut self, letter: DeadLetter<M>) {
        match &mut self.journal {
            Some(journal) => {
                let (stream, correlation) = (letter.envelope.key, letter.envelope.seq);
                let cause = journal.dead_letter(&letter);
                let facts = self.dead_letters.dead_letter_journaled(letter);
                journal.facts(stream, correlation, cause, facts);
            }
            None => self.dead_letters.dead_letter(letter),
        }
    }

    fn acks(&mut self) -> &mut Acks {
        &mut self.acks
    }
}

impl<M: Message> WorkerIo<M> {
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
        outbox.limit = outbox.sender.batch_limit();
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
                    let kind = DeadLetterKind::Overflow;
                    let letter = dead_letter(&stage, event, kind, Failures::default(), reason.clone(), self.wall_us);
                    bury(letter, self);
                }
                Ok(())
            }
            Err(SendFailure::Gone(_)) => Err(Stop::DownstreamGone),
        }
    }

    /// Applies this unit's completion updates. With a journal, the unit's records go to the log
    /// first, so the completion record that later lists the roots finished here follows every
    /// record of their work. Those lists leave in records of up to [`COMPLETIONS_PER_RECORD`]
    /// ids, or when the worker runs out of work: a completion journaled late only means that
    /// recovery would resume, idempotently, work that had finished.
    fn settle(&mut self) -> Result<(), Stop> {
        if self.acks.is_empty() {
            return Ok(());
        }
        self.flush_journal()?;
        self.tracker.apply(&mut self.acks, &mut self.finished);
        match &mut self.journal {
            Some(journal) if self.finished.len() >= COMPLETIONS_PER_RECORD => {
                journal.completed(&self.finished);
                self.finished.clear();
                self.finished_since = None;
            }
            Some(_) => {}
            None => self.finished.clear(),
        }
        Ok(())
    }

    /// Journals the completions collected so far (they leave with the next flush): all of them
    /// when `now`, otherwise only once the oldest has waited [`COMPLETION_LINGER`], so that a
    /// worker that idles between tiny batches does not send the log a tiny record each time.
    fn journal_completions(&mut self, now: bool) {
        if self.finished.is_empty() {
            return;
        }
        let since = *self.finished_since.get_or_insert_with(Instant::now);
        if now || since.elapsed() >= COMPLETION_LINGER {
            if let Some(journal) = &mut self.journal {
                journal.completed(&self.finished);
            }
            self.finished.clear();
            self.finished_since = None;
        }
    }

    /// How long the worker may wait before its collected completions are due.
    fn completions_due_in(&self) -> Option<Duration> {
        self.finished_since.map(|since| COMPLETION_LINGER.saturating_sub(since.elapsed()))
    }

    fn flush_journal(&mut self) -> Result<(), Stop> {
        match &mut self.journal {
            Some(journal) => journal.flush().map_err(Stop::Log),
            None => Ok(()),
        }
    }
}

impl<M: Message, H: Handler<M>> Worker<M, H> {
    fn new(mut ctx: WorkerCtx<M>, handler: H) -> Self {
        let outputs = std::mem::take(&mut ctx.outputs);
        let links = outputs.iter().map(Option::is_some).collect();
        let outboxes = outputs.into_iter().map(|input| input.map(Outboxes::new)).collect();
        let journal = ctx.journal.take().map(|journal| JournalWriter::new(journal, ctx.stage));
        let mut emitter = Emitter::new(links, journal.is_some());
        if ctx.track_completion {
            emitter.tracker = Some(Arc::clone(&ctx.tracker));
            // Each worker draws tokens from its own range of the counter, so no two events share
            // one but by a 2^-64 coincidence (a pool's workers by the order they were started in,
            // 4,096 before a range comes back).
            emitter.tokens = Tokens::new((u64::from(ctx.stage) + 1) << 48 | (ctx.serial & 0xFFF) << 36);
        }
        if let Some((exchange, may_publish, dead_letter_unroutable)) = ctx.routes.take() {
            emitter.set_routes(exchange, may_publish, dead_letter_unroutable);
        }
        let seed = (u64::from(ctx.stage) << 32) ^ ctx.worker as u64;
        let core = StageCore::new(ctx.stage_name, ctx.config, handler, emitter, ctx.clock, seed);
        let io = WorkerIo {
            outboxes,
            journal,
            dead_letters: ctx.dead_letters,
            wall_us: 0,
            acks: Acks::default(),
            tracker: ctx.tracker,
            finished: Vec::new(),
            finished_since: None,
        };
        let levels = usize::from(ctx.config.priority_levels);
        let (inputs, membership) = match ctx.pool {
            Some(control) if control.partitions() > 0 => {
                let membership = Membership {
                    control,
                    seen: u64::MAX,
                    all: ctx.inputs,
                    levels,
                    holding: Vec::new(),
                    standing: Standing::Moving,
                };
                (Vec::new(), Some(membership))
            }
            Some(control) => {
                let membership = Membership {
                    control,
                    seen: u64::MAX,
                    all: Vec::new(),
                    levels,
                    holding: Vec::new(),
                    standing: Standing::Settled,
                };
                (ctx.inputs, Some(membership))
            }
            None => (ctx.inputs, None),
        };
        Self { inputs, turn: 0, metrics: ctx.metrics, index: ctx.worker, core, io, membership }
    }

    /// Whether the pool changed since this worker last followed it.
    fn pool_changed(&self) -> bool {
        self.membership.as_ref().is_some_and(|m| m.control.generation() != m.seen)
    }

    /// Follows the pool's changes: for a stage ordered by key, lets go of the partitions given
    /// to another worker once nothing of theirs is left here (flushed, none parked), takes the
    /// ones given to this worker once let go of, and reads exactly those it holds and keeps.
    fn follow_pool(&mut self) -> Result<Standing, Stop> {
        let Some(membership) = &mut self.membership else { return Ok(Standing::Settled) };
        let control = Arc::clone(&membership.control);
        let me = self.index;
        let parking = &self.core.parking;
        let clear = parking.parked_events() == 0 && parking.is_empty();
        if control.partitions() == 0 {
            membership.seen = control.generation();
            membership.standing = match (control.retiring(me), clear) {
                (false, _) => Standing::Settled,
                (true, false) => Standing::Leaving,
                (true, true) => Standing::Gone,
            };
            return Ok(membership.standing);
        }
        let generation = control.generation();
        if generation == membership.seen && membership.standing == Standing::Settled {
            return Ok(membership.standing);
        }
        membership.seen = generation;
        let partitions = control.partitions();
        // Let go: stop reading what is no longer ours; hand it back once clear of it.
        let mut flushed = false;
        let mut moving = false;
        let mut kept = Vec::with_capacity(membership.holding.len());
        for &(partition, _) in &membership.holding {
            if control.is_assigned(partition, me) {
                kept.push((partition, true));
            } else if self.core.parking.holds_any(|key| partition_of(key, partitions) == partition) {
                kept.push((partition, false));
                moving = true;
            } else {
                if !flushed {
                    self.io.flush_all()?;
                    flushed = true;
                }
                control.release(partition, me);
            }
        }
        // Take what the pool gave this worker once its last holder has let go.
        for partition in 0..partitions {
            if control.is_assigned(partition, me) && !kept.iter().any(|&(p, _)| p == partition) {
                if control.try_take(partition, me) {
                    kept.push((partition, true));
                } else {
                    moving = true;
                }
            }
        }
        kept.sort_unstable();
        if kept != membership.holding {
            membership.holding = kept;
            let reading: Vec<usize> = membership.holding.iter().filter(|&&(_, read)| read).map(|&(p, _)| p).collect();
            self.inputs = (0..membership.levels)
                .flat_map(|level| reading.iter().map(move |&p| (p, level)))
                .map(|(p, level)| membership.all[p * membership.levels + level].clone())
                .collect();
        }
        membership.standing = if moving {
            Standing::Moving
        } else if control.retiring(me) {
            if membership.holding.is_empty() && clear {
                Standing::Gone
            } else {
                Standing::Leaving
            }
        } else {
            Standing::Settled
        };
        Ok(membership.standing)
    }

    fn config(&self) -> &StageConfig {
        &self.core.config
    }

    /// Reads the clocks once for a unit of work.
    fn begin_unit(&mut self) -> u64 {
        let now_us = self.core.begin_unit();
        self.io.wall_us = self.core.wall_us();
        now_us
    }

    fn run_loop(&mut self) -> Result<(), Stop> {
        loop {
            match self.next()? {
                Next::Batch(batch, level) => {
                    self.metrics.busy_workers.fetch_add(1, Ordering::Relaxed);
                    let count = batch.events.len() as u64;
                    let _batch = tracing::debug_span!(
                        "batch",
                        stage = self.metrics.name.as_str(),
                        worker = self.index,
                        events = count
                    )
                    .entered();
                    let mut events = batch.events;
                    let mut tally = BatchTally::default();
                    if let Some(journal) = &mut self.io.journal {
                        journal.stamp();
                    }
                    let now_us = self.begin_unit();
                    // The stage's TTL counts from when the batch was sent to it.
                    let stage_deadline = match self.config().ttl_ms {
                        0 => Deadline::NEVER,
                        ttl_ms => {
                            let age_us = u64::try_from(batch.sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                            Deadline(now_us.saturating_sub(age_us).saturating_add(ttl_ms * 1_000))
                        }
                    };
                    let (core, io) = (&mut self.core, &mut self.io);
                    let result = events.drain(..).try_for_each(|event| {
                        let expires = event.deadline.min(stage_deadline);
                        core.take(event, expires, &mut tally, io)
                    });
                    self.inputs[level].recycle(events);
                    self.metrics.publish(&tally);
                    self.metrics.record_latency(self.index, batch.sent_at.elapsed(), count);
                    self.metrics.busy_workers.fetch_sub(1, Ordering::Relaxed);
                    result?;
                    self.io.settle()?;
                }
                Next::Retries => {
                    let mut tally = BatchTally::default();
                    self.begin_unit();
                    let due = self.core.parking.due_keys().min(self.config().batch_events_max);
                    let result = self.core.retry_due(due, &mut tally, &mut self.io);
                    self.metrics.publish(&tally);
                    result?;
                    self.io.settle()?;
                }
                Next::Stop => break,
            }
        }
        self.io.flush_all()?;
        self.io.settle()?;
        self.io.journal_completions(true);
        self.io.flush_all()
    }

    fn next(&mut self) -> Result<Next<M>, Stop> {
        loop {
            self.core.release_due();
            let standing = self.follow_pool()?;
            if standing == Standing::Gone {
                return Ok(Next::Stop);
            }
            let parked = self.core.parking.parked_events();
            self.metrics.parked[self.index].store(parked as u64, Ordering::Relaxed);
            // Highest priority first, partitions in turn; none at all while parked events fill
            // the stage's bound, or once the worker is leaving its pool.
            let taking = parked < self.config().queue_events_max() && standing != Standing::Leaving;
            let mut all_gone = true;
            let levels = usize::from(self.config().priority_levels);
            let per_level = self.inputs.len() / levels;
            for level in (0..levels).rev().filter(|_| taking && per_level > 0) {
                for i in 0..per_level {
                    let queue = level * per_level + (self.turn + i) % per_level;
                    match self.inputs[queue].try_recv() {
                        Ok(batch) => {
                            self.turn = self.turn.wrapping_add(1);
                            return Ok(Next::Batch(batch, queue));
                        }
                        Err(TryRecvError::Empty) => all_gone = false,
                        Err(TryRecvError::Disconnected) => {}
                    }
                }
            }
            if self.core.parking.has_due() {
                return Ok(Next::Retries);
            }
            if taking && all_gone && standing == Standing::Settled && !self.core.parking.is_waiting() {
                // A resize that landed after this worker looked at its pool, and before its queues
                // closed, is seen now: it may have given this worker's partitions to another.
                if self.pool_changed() {
                    continue;
                }
                return Ok(Next::Stop);
            }
            // Nothing to do now: send what is collected before waiting, so nothing lingers.
            self.io.settle()?;
            self.io.journal_completions(false);
            self.io.flush_all()?;
            let now_us = self.core.now_us();
            let retry = self.core.parking.next_due_us().map(|due| Duration::from_micros(due.saturating_sub(now_us)));
            let mut wait = match (retry, self.io.completions_due_in()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if self.membership.is_some() {
                wait = Some(wait.map_or(POOL_LOOK, |wait| wait.min(POOL_LOOK)));
            }
            if all_gone || !taking {
                // Intake is closed or paused: only backoffs remain to be waited out.
                std::thread::sleep(wait.unwrap_or(Duration::from_millis(1)));
                continue;
            }
            let mut gone = vec![false; self.inputs.len()];
            match BatchReceiver::recv_any(&self.inputs, &mut gone, wait) {
                Received::Batch(level, batch) => return Ok(Next::Batch(batch, level)),
                // Time to look at the backoffs again (or only they remain); closed queues are
                // seen by the next look, after the pool's changes.
                Received::TimedOut | Received::Closed => {}
            }
        }
    }
}
