//! Lifecycle: a [`Topology`] of named stages becomes a running [`Engine`]: start (queues, worker
//! threads), submit through the ingress, snapshot, shutdown.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::alerts::{AlertRules, Alerting, AlertsSnapshot};
use crate::channel::{self, BatchReceiver, StageInput};
use crate::clock::{Clock, SystemClock};
use crate::completion::{token_of, OnComplete, Ticket, Tracker};
use crate::config::EngineConfig;
use crate::dead_letter::{DeadLetterSink, MemoryDeadLetters};
use crate::error::{BuildError, RecoverError, ResizeError, SubmitError, TrySubmitError};
use crate::ingress::{fill_window, send_window, Ingress, Receipt};
use crate::journal::Journal;
use crate::log::LogError;
use crate::metrics::{LatencyHistograms, LatencySummary, Snapshot, StageMetrics};
use crate::stage::pool::{self, Pool, Template};
use crate::stage::worker::{Shared, WorkerCtx};
use crate::stage::{Envelope, Message, StageId};
use crate::topology::{Compiled, Topology};

/// A running pipeline. Submit messages from any number of threads (`&Engine` is `Sync`), then
/// [`shutdown`](Self::shutdown) to drain it and get the final report.
pub struct Engine<M: Message> {
    ingress: Option<Ingress<M>>,
    entry: StageId,
    /// The input of every stage, for [`Engine::inject_many`]; dropped at shutdown.
    stage_senders: Vec<StageInput<M>>,
    /// Messages accepted by the time intake stopped.
    submitted_at_stop: u64,
    metrics: Vec<Arc<StageMetrics>>,
    /// Worker threads of fixed pools, stages in topological order so joining follows the drain.
    workers: Vec<JoinHandle<()>>,
    /// The elastic pools, and the thread that steers them (stopped by dropping its sender).
    pools: Vec<Arc<Pool<M>>>,
    controller: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
    shared: Arc<Shared>,
    journal: Option<Journal<M>>,
    /// Commit latency of ingress windows, kept when intake stops.
    ack_latency: Option<Histogram<u64>>,
    /// Which submitted messages' work has not finished.
    tracker: Arc<Tracker>,
    track_completion: bool,
    /// Tokens of injected events, from their own range.
    inject_tokens: AtomicU64,
    /// Breakers shown by [`Engine::watch_breaker`].
    breakers: Mutex<Vec<(String, Arc<crate::breaker::CircuitBreaker>)>>,
    /// Alert rules and state, evaluated by each snapshot.
    alerting: Mutex<Alerting>,
    started: Instant,
}

impl<M: Message> fmt::Debug for Engine<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("stages", &self.metrics.iter().map(|m| m.name.as_str()).collect::<Vec<_>>())
            .field("workers", &self.workers.len())
            .field("submitted", &self.submitted())
            .field("journal", &self.journal)
            .field("poisoned", &self.poisoned())
            .finish_non_exhaustive()
    }
}

/// What [`Engine::shutdown`] returns: the final figures of a fully drained engine.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// Figures after the last event was handled (and, with a journal, made durable).
    pub snapshot: Snapshot,
    /// With a journal: whether the final sync of the log succeeded.
    pub log_sync: Option<Result<(), LogError>>,
}

impl ShutdownReport {
    /// Whether every worker stopped normally and the log (if any) synced.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.snapshot.poisoned.is_none() && !matches!(self.log_sync, Some(Err(_)))
    }
}

/// Starts an [`Engine`] with options beyond the configuration.
pub struct EngineBuilder<M: Message> {
    topology: Topology<M>,
    config: EngineConfig,
    dead_letters: Arc<dyn DeadLetterSink<M>>,
    journal: Option<Journal<M>>,
    clock: Arc<dyn Clock>,
    track_completion: bool,
    on_complete: Option<OnComplete>,
    alerts: AlertRules,
}

impl<M: Message> fmt::Debug for EngineBuilder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("topology", &self.topology)
            .field("config", &self.config)
            .field("journal", &self.journal)
            .field("clock", &self.clock)
            .field("track_completion", &self.track_completion)
            .finish_non_exhaustive()
    }
}

impl<M: Message> EngineBuilder<M> {
    /// The alert rules its snapshots evaluate (default: [`AlertRules::default`]); checked by
    /// [`start`](Self::start).
    #[must_use]
    pub fn alerts(mut self, rules: AlertRules) -> Self {
        self.alerts = rules;
        self
    }

    /// The clock that backoff, expiry and failure times read (default: [`SystemClock`]).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Stage settings (default: [`EngineConfig::default`]).
    #[must_use]
    pub fn config(mut self, config: &EngineConfig) -> Self {
        self.config = config.clone();
        self
    }

    /// Where dead letters go (default: kept in memory).
    #[must_use]
    pub fn dead_letters(mut self, sink: Arc<dyn DeadLetterSink<M>>) -> Self {
        self.dead_letters = sink;
        self
    }

    /// Journals submitted messages, recorded facts and dead letters to a durable log; `submit`
    /// then returns only once its messages are committed.
    #[must_use]
    pub fn journal(mut self, journal: Journal<M>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Whether the engine tracks when each submitted message's work has finished (default: it
    /// does; see [`crate::completion`]). Without it there are no tickets, no completion callback,
    /// and a journal cannot tell what was in flight; it saves the tracking's cost (see
    /// BENCHMARKS.md).
    #[must_use]
    pub fn track_completion(mut self, track: bool) -> Self {
        self.track_completion = track;
        self
    }

    /// Calls `callback` with the `seq` of every submitted message once all its work has finished
    /// (handled, forwarded or dead-lettered, to the last descendant), on the worker thread that saw
    /// it finish.
    #[must_use]
    pub fn on_complete(mut self, callback: OnComplete) -> Self {
        self.on_complete = Some(callback);
        self
    }

    /// Validates and starts every worker thread.
    pub fn start(self) -> Result<Engine<M>, BuildError> {
        Engine::launch(self)
    }
}

impl<M: Message> Engine<M> {
    /// A builder for an engine running `topology`.
    pub fn builder(topology: Topology<M>) -> EngineBuilder<M> {
        EngineBuilder {
            topology,
            config: EngineConfig::default(),
            dead_letters: Arc::new(MemoryDeadLetters::<M>::default()),
            journal: None,
            clock: Arc::new(SystemClock),
            track_completion: true,
            on_complete: None,
            alerts: AlertRules::default(),
        }
    }

    /// Starts the engine with dead letters kept in memory and no journal.
    pub fn start(topology: Topology<M>, config: &EngineConfig) -> Result<Self, BuildError> {
        Self::builder(topology).config(config).start()
    }

    /// Starts the engine with dead letters going to `dead_letters` and no journal.
    pub fn start_with(
        topology: Topology<M>,
        config: &EngineConfig,
        dead_letters: Arc<dyn DeadLetterSink<M>>,
    ) -> Result<Self, BuildError> {
        Self::builder(topology).config(config).dead_letters(dead_letters).start()
    }

    /// Validates the topology against the configuration and starts every worker thread
    /// (named `conduit:<stage>:<worker>`).
    fn launch(builder: EngineBuilder<M>) -> Result<Self, BuildError> {
        let EngineBuilder { topology, config, dead_letters, journal, clock, track_completion, on_complete, alerts } =
            builder;
        alerts.validate()?;
        let Compiled { stages, links, entry, order, exchange, may_publish, dead_letter_unroutable, stage_configs } =
            topology.compile(&config)?;
        let shared = Arc::new(Shared::default());
        let metrics: Vec<Arc<StageMetrics>> =
            (stages.iter().zip(&stage_configs)).map(|(s, c)| stage_metrics(&s.name, s.ordered, c)).collect();
        let queues: Vec<(StageInput<M>, Vec<BatchReceiver<M>>)> = stages
            .iter()
            .zip(&stage_configs)
            .zip(&metrics)
            .map(|((decl, c), m)| stage_queues(decl.name.as_str(), decl.ordered, c, m, &shared))
            .collect();

        let tracker = Arc::new(Tracker::new(on_complete));
        let tracking = track_completion.then(|| Arc::clone(&tracker));
        let ingress = Ingress::new(queues[entry.index()].0.clone(), journal.clone(), Arc::clone(&shared), tracking)?;
        let mut engine = Self {
            ingress: Some(ingress),
            entry,
            stage_senders: queues.iter().map(|(input, _)| input.clone()).collect(),
            submitted_at_stop: 0,
            metrics,
            workers: Vec::new(),
            pools: Vec::new(),
            controller: None,
            shared,
            journal,
            ack_latency: None,
            tracker,
            track_completion,
            // Above the workers' ranges (each `(stage + 1) << 48`) and the ingress's.
            inject_tokens: AtomicU64::new(u64::MAX / 4 * 3),
            breakers: Mutex::new(Vec::new()),
            alerting: Mutex::new(Alerting::new(alerts)),
            started: Instant::now(),
        };
        for stage in order {
            let index = stage.index();
            let decl = &stages[index];
            let runner = decl.runner.as_ref().expect("validate checked every stage has a handler");
            let stage_config = stage_configs[index];
            let elastic = stage_config.workers.is_elastic();
            let make_ctx = |worker: usize| {
                let outputs = (0..stages.len())
                    .map(|to| links.iter().any(|&(f, t)| f == stage && t.index() == to).then(|| queues[to].0.clone()))
                    .collect();
                WorkerCtx {
                    name: format!("conduit:{}:{worker}", decl.name),
                    stage_name: decl.name.as_str().into(),
                    worker,
                    stage: stage.0,
                    config: stage_config,
                    journal: engine.journal.clone(),
                    routes: Some((Arc::clone(&exchange), may_publish[index].clone(), dead_letter_unroutable)),
                    // An elastic pool's workers get every queue and read those they hold.
                    inputs: if elastic {
                        queues[index].1.clone()
                    } else {
                        let levels = usize::from(stage_config.priority_levels);
                        let partitions = queues[index].1.len() / levels;
                        let first = (worker % partitions) * levels;
                        queues[index].1[first..first + levels].to_vec()
                    },
                    outputs,
                    metrics: Arc::clone(&engine.metrics[index]),
                    dead_letters: Arc::clone(&dead_letters),
                    shared: Arc::clone(&engine.shared),
                    clock: Arc::clone(&clock),
                    tracker: Arc::clone(&engine.tracker),
                    track_completion,
                    serial: worker as u64,
                    pool: None,
                }
            };
            if elastic {
                let template = Template { ctx: make_ctx(0), runner: Arc::clone(runner) };
                engine.pools.push(Pool::start(index, template, decl.ordered)?);
                continue;
            }
            for worker in 0..stage_config.workers.min {
                let ctx = make_ctx(worker);
                let (runner, name) = (Arc::clone(runner), ctx.name.clone());
                let handle = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || runner(ctx))
                    .map_err(|source| BuildError::Spawn { name, source })?;
                engine.workers.push(handle);
            }
        }
        engine.start_controller(&stage_configs)?;
        // The queues' own ends are dropped here: from now on only the engine's senders and the
        // workers hold them, so once the engine lets go, a stage's queue closes exactly when
        // everything upstream of it has stopped.
        drop(queues);
        let (fixed, elastic) = (engine.workers.len(), engine.pools.len());
        tracing::info!(stages = engine.metrics.len(), workers = fixed, elastic_pools = elastic, "engine started");
        Ok(engine)
    }

    /// Starts the thread that steers the elastic pools and adaptive batch sizes, if there are any.
    fn start_controller(&mut self, stage_configs: &[crate::StageConfig]) -> Result<(), BuildError> {
        let batches = (self.metrics.iter().zip(stage_configs))
            .filter(|(_, c)| c.batch_events_min > 0 && c.batch_events_min < c.batch_events_max)
            .map(|(m, c)| pool::BatchControl::new(Arc::clone(m), c.batch_events_min, c.batch_events_max))
            .collect();
        let steered = pool::Steered { pools: self.pools.clone(), batches };
        if steered.is_empty() {
            return Ok(());
        }
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let name = "conduit:control".to_owned();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut steered = steered;
                pool::run_controller(&mut steered, &stopped);
            })
            .map_err(|source| BuildError::Spawn { name, source })?;
        self.controller = Some((stop, handle));
        Ok(())
    }

    /// Submits one message, blocking while the entry queue is full (and, with a journal, until
    /// it is committed and in the entry queue).
    pub fn submit(&self, msg: M) -> Result<(), SubmitError<M>> {
        self.submit_many(std::iter::once(msg))
            .map(drop)
            .map_err(|e| e.map(|mut v| v.pop().expect("the failed batch held the one message")))
    }

    /// Submits one message if there is room now, never blocking; otherwise hands it back in
    /// [`TrySubmitError::Full`]. Without a journal the message is in the entry queue when this
    /// returns; with one, its ingress record is queued for the log and the returned [`Receipt`]
    /// settles once it is committed and the message is in the entry queue (drop the receipt to
    /// not wait).
    pub fn try_submit(&self, msg: M) -> Result<Receipt<M>, TrySubmitError<M>> {
        match self.ingress.as_ref() {
            Some(ingress) => ingress.try_submit(msg),
            None => Err(TrySubmitError::Closed(msg)),
        }
    }

    /// Submits messages in batches of the entry stage's `batch_events_max`, blocking while the
    /// entry queue is full. Returns how many were submitted.
    ///
    /// With a journal, messages are journaled in windows of up to
    /// [`INGRESS_WINDOW_EVENTS`](crate::INGRESS_WINDOW_EVENTS) (one append, one commit each)
    /// that enter the pipeline only once committed; up to
    /// [`WINDOWS_IN_FLIGHT`](crate::WINDOWS_IN_FLIGHT) windows commit at once, and the call returns
    /// when all of its windows are in.
    ///
    /// On failure the error holds every message not submitted: the windows that failed and the
    /// rest of `msgs`, collected (so `msgs` must be finite).
    pub fn submit_many(&self, msgs: impl IntoIterator<Item = M>) -> Result<u64, SubmitError<Vec<M>>> {
        self.submit_scheduled(msgs, None)
    }

    /// [`submit_many`](Self::submit_many) for messages an open-loop load generator meant to
    /// send at `scheduled`: their end-to-end latency ([`Snapshot::end_to_end_us`]) counts from
    /// then, not from when the call got through, so time spent waiting behind a slow engine is
    /// counted (no coordinated omission).
    pub fn submit_many_at(
        &self,
        msgs: impl IntoIterator<Item = M>,
        scheduled: Instant,
    ) -> Result<u64, SubmitError<Vec<M>>> {
        self.submit_scheduled(msgs, Some(scheduled))
    }

    /// Submits up to [`INGRESS_WINDOW_EVENTS`](crate::INGRESS_WINDOW_EVENTS) messages as one
    /// window and returns at once with its [`Receipt`], which settles once the window is durable
    /// (with a journal) and in the entry queue: one caller keeps several windows committing at a
    /// time, as an open-loop load generator must (a caller that waited for each commit would fall
    /// behind its schedule by a commit per window). Blocks only while
    /// [`WINDOWS_IN_FLIGHT`](crate::WINDOWS_IN_FLIGHT) windows are out (across all callers), or,
    /// without a journal, while the entry queue is full.
    /// End-to-end latency counts from `scheduled`, as for [`submit_many_at`](Self::submit_many_at).
    ///
    /// # Panics
    /// If `msgs` holds more than [`INGRESS_WINDOW_EVENTS`](crate::INGRESS_WINDOW_EVENTS) messages.
    pub fn submit_window_at(&self, msgs: Vec<M>, scheduled: Instant) -> Result<Receipt<M>, SubmitError<Vec<M>>> {
        match self.ingress.as_ref() {
            Some(ingress) => ingress.submit_window(msgs, Some(scheduled)),
            None => Err(SubmitError::Closed(msgs)),
        }
    }

    fn submit_scheduled(
        &self,
        msgs: impl IntoIterator<Item = M>,
        scheduled: Option<Instant>,
    ) -> Result<u64, SubmitError<Vec<M>>> {
        match self.ingress.as_ref() {
            Some(ingress) => ingress.submit_many(msgs, scheduled),
            None => Err(SubmitError::Closed(msgs.into_iter().collect())),
        }
    }

    /// Puts events straight into `stage`'s queue, blocking while it is full; they are not
    /// journaled again. For resuming work after a restart and for redriving dead letters: the
    /// caller gives each envelope its key, correlation `seq` and `cause`. Events of one `seq`
    /// are one message's work, finished when all of them are (see [`Self::inject_all`]).
    pub fn inject_many(
        &self,
        stage: StageId,
        events: impl IntoIterator<Item = Envelope<M>>,
    ) -> Result<u64, SubmitError<Vec<M>>> {
        let counts = self.inject_all(vec![(stage, events.into_iter().collect())])?;
        Ok(counts.iter().sum())
    }

    /// Puts each group's events straight into its stage's queue, groups in order (front stages
    /// first, so that nothing resumed downstream waits behind a full upstream queue; with more
    /// messages than one part takes, part by part), blocking while a queue is full; returns how
    /// many went to each group's stage. Events of one `seq` are one message's work, in one slot
    /// of the completion tracker, whichever groups they are in: every event of a message is
    /// counted before any of them is sent, so a message finishes once, after all of them
    /// (counted group by group, a message's events in one stage could all end before those in
    /// the next were counted, and the message be reported finished, and journaled so, with work
    /// still to resume). Messages are taken [`INJECTED_MESSAGES_AT_ONCE`] at a time, each with
    /// all its events. A refusal hands back every message not sent; a message some of whose
    /// events went stays in flight, never reported finished (recovery resumes it).
    pub fn inject_all(&self, groups: Vec<(StageId, Vec<Envelope<M>>)>) -> Result<Vec<u64>, SubmitError<Vec<M>>> {
        let mut counts = vec![0; groups.len()];
        let Some(inputs) =
            groups.iter().map(|(stage, _)| self.stage_senders.get(stage.index())).collect::<Option<Vec<_>>>()
        else {
            return Err(SubmitError::Closed(
                groups.into_iter().flat_map(|(_, events)| events).map(|e| e.msg).collect(),
            ));
        };
        let mut parts = injected_parts(groups.into_iter().map(|(_, events)| events).collect()).into_iter();
        while let Some(mut part) = parts.next() {
            let injected = if self.track_completion {
                let Some(injected) = self.track_injected(&mut part) else {
                    // Nothing of this part counted, nothing sent.
                    let unsent = part.into_iter().flatten().chain(parts.flatten().flatten());
                    return Err(SubmitError::Poisoned(unsent.map(|event| event.msg).collect()));
                };
                injected
            } else {
                // Untracked events carry token zero, whatever the caller left in them: their
                // children's tokens and their ends then touch no slot.
                part.iter_mut().flatten().for_each(|event| event.token = 0);
                Injected::default()
            };
            let mut part = part.into_iter().enumerate();
            while let Some((group, events)) = part.next() {
                let mut window = fill_window(inputs[group], events.into_iter());
                let Ok(count) = send_window(inputs[group], &mut window) else {
                    let taken: Vec<_> =
                        window.into_iter().flat_map(|(_, batch)| batch).chain(part.flat_map(|(_, e)| e)).collect();
                    return Err(self.refuse_part(taken, &injected, parts.flatten().flatten()));
                };
                counts[group] += count;
            }
        }
        Ok(counts)
    }

    /// Gives every event of `part` a token and its `seq`'s slot (one acquired per message) and
    /// counts it as that message's work; `None`, with nothing counted, if the engine stopped
    /// before enough slots were free. Slots are taken a few at a time as they come free, so a
    /// busy engine's submitters, which take theirs a window at a time, do not starve it.
    fn track_injected(&self, part: &mut [Vec<Envelope<M>>]) -> Option<Injected> {
        let mut injected = Injected::default();
        for event in part.iter().flatten() {
            injected.entry(event.seq).or_default().1 += 1;
        }
        let mut slots = Vec::with_capacity(injected.len());
        while slots.len() < injected.len() {
            let some = (injected.len() - slots.len()).min(INJECTED_SLOTS_AT_ONCE);
            if !self.tracker.acquire(some, &mut slots, &|| self.shared.is_poisoned()) {
                self.tracker.give_back(&slots);
                return None;
            }
        }
        for ((slot, _), free) in injected.values_mut().zip(slots) {
            *slot = free;
        }
        for event in part.iter_mut().flatten() {
            event.slot = injected[&event.seq].0;
            event.token = token_of(self.inject_tokens.fetch_add(1, Ordering::Relaxed));
            self.tracker.register(event.slot, event.seq, event.token);
        }
        Some(injected)
    }

    /// The refusal of a part half sent: its events not sent (`taken`) come back, with every
    /// message of the parts after it (`rest`); the work of a message none of whose events went
    /// is taken back, but a message partly sent stays in flight for good (its events not sent
    /// keep their count), so that it is never reported finished, nor journaled so, with those
    /// events left out: recovery resumes it. `injected` holds the part's messages (none when
    /// the engine does not track).
    fn refuse_part(
        &self,
        taken: Vec<Envelope<M>>,
        injected: &Injected,
        rest: impl Iterator<Item = Envelope<M>>,
    ) -> SubmitError<Vec<M>> {
        let mut not_sent: rustc_hash::FxHashMap<u64, usize> = rustc_hash::FxHashMap::default();
        for event in &taken {
            *not_sent.entry(event.seq).or_default() += 1;
        }
        let mut unsent = Vec::with_capacity(taken.len());
        for event in taken {
            if injected.get(&event.seq).is_some_and(|&(_, events)| events == not_sent[&event.seq]) {
                self.tracker.unregister(event.slot, event.token);
            }
            unsent.push(event.msg);
        }
        unsent.extend(rest.map(|event| event.msg));
        SubmitError::Poisoned(unsent)
    }

    /// A ticket that settles once all the work of the message a [`Receipt`] of
    /// [`try_submit`](Self::try_submit) accepted has finished (at once if it has); `None` for
    /// a receipt of several messages, or when the engine does not track completion.
    pub fn ticket(&self, receipt: &Receipt<M>) -> Option<Ticket> {
        let (seq, slot) = receipt.tracked()?;
        Some(self.tracker.ticket(slot, seq))
    }

    /// Resumes, from the start, every message the journal's log had in flight when it was opened
    /// (its last checkpoint and the frames after it say which: ingress records with no completion
    /// record), and returns how many. Each goes to the entry stage again with its original `seq`,
    /// so that its completion is journaled against its ingress record; handlers see it again and
    /// must be idempotent (at-least-once delivery). Every record is decoded before anything is
    /// resumed. Call it once, right after starting.
    pub fn resume_in_flight(&self) -> Result<u64, RecoverError> {
        let journal = self.journal.as_ref().ok_or(RecoverError::NoJournal)?;
        let records = journal.log.ingress_records(journal.log.in_flight_at_open())?;
        let mut envelopes = Vec::with_capacity(records.len());
        for record in &records {
            let msg = journal
                .codec
                .decode(record.kind, &record.payload)
                .ok_or(RecoverError::Undecodable { id: record.id, kind: record.kind })?;
            let mut envelope = Envelope::submitted(record.id, msg);
            envelope.cause = record.id;
            envelopes.push(envelope);
        }
        self.inject_many(self.entry, envelopes).map_err(|refused| {
            let unsent = refused.into_inner().len() as u64;
            RecoverError::Stopped {
                resumed: records.len() as u64 - unsent,
                reason: self.poisoned().unwrap_or_else(|| "the engine is closed".into()),
            }
        })
    }

    /// Resizes the elastic pool of `stage` to `workers` now, within its `{ min, max }` bounds:
    /// new workers start at once, retired ones finish what they hold first (for a stage ordered
    /// by key, its keys move between workers without breaking their order). The pool's
    /// controller goes on steering from the new size.
    pub fn set_workers(&self, stage: StageId, workers: usize) -> Result<(), ResizeError> {
        match self.pools.iter().find(|pool| pool.stage == stage.index()) {
            Some(pool) => pool.resize(workers, "set by hand"),
            None => match self.metrics.get(stage.index()) {
                Some(metrics) => Err(ResizeError::Fixed { stage: metrics.name.clone() }),
                None => Err(ResizeError::NoStage(stage.index())),
            },
        }
    }

    /// Submitted messages whose work has not finished (0 when completion is not tracked).
    pub fn in_flight(&self) -> u64 {
        self.tracker.in_flight()
    }

    /// The stage named `name`, if the topology declared one.
    #[must_use]
    pub fn stage_id(&self, name: &str) -> Option<StageId> {
        let index = self.metrics.iter().position(|m| m.name == name)?;
        u16::try_from(index).ok().map(StageId)
    }

    /// The entry stage.
    pub fn entry(&self) -> StageId {
        self.entry
    }

    /// Messages accepted so far.
    pub fn submitted(&self) -> u64 {
        self.ingress.as_ref().map_or(self.submitted_at_stop, Ingress::submitted)
    }

    /// Why the engine is poisoned, if a worker died.
    pub fn poisoned(&self) -> Option<String> {
        if self.shared.is_poisoned() {
            self.shared.poison_reason.lock().clone()
        } else {
            None
        }
    }

    /// The figures of every stage now, with the alert rules evaluated over them ([`crate::alerts`]:
    /// take snapshots regularly for alerts to fire and resolve in time).
    pub fn snapshot(&self) -> Snapshot {
        let journal = self.journal.as_ref();
        let mut snapshot = Snapshot {
            uptime_s: self.started.elapsed().as_secs_f64(),
            submitted: self.submitted(),
            in_flight: self.tracker.in_flight(),
            completed: self.tracker.completed(),
            stages: self.metrics.iter().map(|m| m.snapshot()).collect(),
            poisoned: self.poisoned(),
            log: journal.map(|j| j.log.stats()),
            ack_latency_us: journal.and_then(|_| match (&self.ingress, &self.ack_latency) {
                (Some(ingress), _) => ingress.ack_latency().map(|h| LatencySummary::from_histogram(&h.lock())),
                (None, kept) => kept.as_ref().map(LatencySummary::from_histogram),
            }),
            breakers: self.breakers.lock().iter().map(|(name, breaker)| (name.clone(), breaker.report())).collect(),
            end_to_end_us: self.track_completion.then(|| LatencySummary::from_histogram(&self.tracker.end_to_end())),
            alerts: AlertsSnapshot::default(),
        };
        snapshot.alerts = self.alerting.lock().observe(&mut snapshot);
        snapshot
    }

    /// The histograms behind the latency figures of [`snapshot`](Self::snapshot).
    pub fn latency_histograms(&self) -> LatencyHistograms {
        LatencyHistograms {
            stages: self
                .metrics
                .iter()
                .map(|m| {
                    let (histogram, total_s) = m.latency();
                    (m.name.clone(), histogram, total_s)
                })
                .collect(),
            end_to_end: self.track_completion.then(|| self.tracker.end_to_end()),
        }
    }

    /// Replaces the alert rules (checked first): snapshots from now on evaluate these.
    pub fn set_alert_rules(&self, rules: AlertRules) -> Result<(), crate::ConfigError> {
        rules.validate()?;
        self.alerting.lock().set_rules(rules);
        Ok(())
    }

    /// Shows the engine a circuit breaker its handlers use, so that snapshots report its state
    /// and transitions under `name`.
    pub fn watch_breaker(&self, name: &str, breaker: Arc<crate::breaker::CircuitBreaker>) {
        self.breakers.lock().push((name.to_owned(), breaker));
    }

    /// Stops intake, lets every stage drain front to back (retries included), joins every
    /// worker, makes the journal durable, and returns the final figures. Nothing accepted is
    /// dropped.
    pub fn shutdown(mut self) -> ShutdownReport {
        let log_sync = self.stop();
        ShutdownReport { snapshot: self.snapshot(), log_sync }
    }

    fn stop(&mut self) -> Option<Result<(), LogError>> {
        // Dropping the engine's senders closes the entry queue once it is drained; each stage's
        // workers then stop and drop their senders, closing the next stage's queue, and so on.
        // The ingress forwarder first settles every journaled window handed to it.
        if let Some(mut ingress) = self.ingress.take() {
            ingress.close();
            self.submitted_at_stop = ingress.submitted();
            self.ack_latency = ingress.ack_latency().map(|h| h.lock().clone());
        }
        // Pools stop changing before the queues start to close: a worker started later would
        // hold its downstream queues open.
        if let Some((stop, controller)) = self.controller.take() {
            drop(stop);
            controller.join().ok();
        }
        let pooled: Vec<JoinHandle<()>> = self.pools.iter().flat_map(|pool| pool.close()).collect();
        self.stage_senders.clear();
        for handle in self.workers.drain(..).chain(pooled) {
            let name = handle.thread().name().unwrap_or("conduit worker").to_owned();
            if handle.join().is_err() {
                self.shared.poison(format!("worker {name} panicked"));
            }
        }
        self.journal.as_ref().map(|journal| journal.log.sync())
    }
}

/// A stage's partitions: one, or one per worker for a stage ordered by key (one per worker it may
/// have, for an elastic pool).
fn partitions(ordered: bool, config: &crate::StageConfig) -> usize {
    if ordered {
        config.workers.max
    } else {
        1
    }
}

/// A stage's figures, sized for every queue it has (one per partition and level).
fn stage_metrics(name: &str, ordered: bool, config: &crate::StageConfig) -> Arc<StageMetrics> {
    let queues = usize::from(config.priority_levels) * partitions(ordered, config);
    Arc::new(StageMetrics::new(name.to_owned(), config.workers, config.queue_events_max() * queues))
}

/// A stage's queues: one per [`partitions`], each with a level per priority.
fn stage_queues<M>(
    name: &str,
    ordered: bool,
    config: &crate::StageConfig,
    metrics: &Arc<StageMetrics>,
    shared: &Shared,
) -> (StageInput<M>, Vec<BatchReceiver<M>>) {
    let levels = usize::from(config.priority_levels);
    let (senders, receivers) = (0..partitions(ordered, config) * levels)
        .map(|_| {
            let poisoned = Arc::clone(&shared.poisoned);
            channel::queue(config.queue_batches, config.batch_events_max, Arc::clone(metrics), poisoned)
        })
        .unzip();
    (StageInput::new(senders, levels, name.into(), config.overflow), receivers)
}

impl<M: Message> Drop for Engine<M> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Messages [`Engine::inject_all`] counts at once (each takes a slot of the completion tracker
/// until its work has finished): half of what the tracker holds, so that an injection never
/// waits for more slots than the tracker has.
pub const INJECTED_MESSAGES_AT_ONCE: usize = crate::completion::ROOTS_MAX / 2;

/// Slots an injection asks the tracker for at a time.
const INJECTED_SLOTS_AT_ONCE: usize = 1_024;

/// The messages of a part being injected, by `seq`: each one's tracker slot and how many of the
/// part's events it has.
type Injected = rustc_hash::FxHashMap<u64, (u32, usize)>;

/// `groups` cut into parts of at most [`INJECTED_MESSAGES_AT_ONCE`] messages (`seq`s), each
/// message's events all in one part, in the order its first event came; within a part the events
/// keep their groups and their order.
fn injected_parts<M>(groups: Vec<Vec<Envelope<M>>>) -> Vec<Vec<Vec<Envelope<M>>>> {
    let mut part_of: rustc_hash::FxHashMap<u64, usize> = rustc_hash::FxHashMap::default();
    let mut parts: Vec<Vec<Vec<Envelope<M>>>> = Vec::new();
    let width = groups.len();
    for (group, events) in groups.into_iter().enumerate() {
        for event in events {
            let next = part_of.len() / INJECTED_MESSAGES_AT_ONCE;
            let part = *part_of.entry(event.seq).or_insert(next);
            if parts.len() <= part {
                parts.resize_with(part + 1, || (0..width).map(|_| Vec::new()).collect());
            }
            parts[part][group].push(event);
        }
    }
    parts
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct Job;

    impl Message for Job {
        fn key(&self) -> u64 {
            0
        }
    }

    /// More messages than one part takes: each message's events stay in one part, whichever
    /// groups they are in, and a part holds at most `INJECTED_MESSAGES_AT_ONCE` messages.
    #[test]
    fn an_injected_message_keeps_all_its_events_in_one_part() {
        let count = INJECTED_MESSAGES_AT_ONCE as u64 + 2;
        // Group 0: every message once; group 1: the first message again, and the last.
        let first: Vec<_> = (0..count).map(|seq| Envelope::submitted(seq, Job)).collect();
        let second = vec![Envelope::submitted(0, Job), Envelope::submitted(count - 1, Job)];
        let parts = injected_parts(vec![first, second]);
        assert_eq!(parts.len(), 2);
        let seqs = |part: &Vec<Vec<Envelope<Job>>>, group: usize| part[group].iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&parts[0], 0), (0..INJECTED_MESSAGES_AT_ONCE as u64).collect::<Vec<_>>());
        assert_eq!(seqs(&parts[0], 1), [0], "the first message's second event joins its part");
        assert_eq!(seqs(&parts[1], 0), [count - 2, count - 1]);
        assert_eq!(seqs(&parts[1], 1), [count - 1], "the last message's second event joins its part");
    }
}
