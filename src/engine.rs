//! Wiring and lifecycle: a [`Topology`] of named stages becomes a running [`Engine`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::channel::{self, BatchReceiver, StageInput};
use crate::clock::{Clock, SystemClock};
use crate::config::{EngineConfig, StageConfig};
use crate::dead_letter::{DeadLetterSink, MemoryDeadLetters};
use crate::error::{BuildError, ConfigError, SubmitError, TrySubmitError};
use crate::ingress::{fill_window, messages, send_window, Ingress, Receipt, INGRESS_WINDOW_EVENTS};
use crate::journal::Journal;
use crate::log::LogError;
use crate::metrics::{LatencySummary, Snapshot, StageMetrics};
use crate::routing::{Exchange, ExchangeBuilder, RouteId, RoutingError};
use crate::stage::worker::{self, Shared, WorkerCtx};
use crate::stage::{Envelope, Handler, Message, StageId};

type Runner<M> = Arc<dyn Fn(WorkerCtx<M>) + Send + Sync>;
/// Builds a stage's handler for worker `n`, boxed: the deterministic simulation's way in.
pub(crate) type MakeHandler<M> = Arc<dyn Fn(usize) -> Box<dyn Handler<M>> + Send + Sync>;

pub(crate) struct StageDecl<M> {
    pub(crate) name: String,
    runner: Option<Runner<M>>,
    pub(crate) make: Option<MakeHandler<M>>,
    /// Events of one key go to one worker, in order, never two at once.
    ordered: bool,
}

/// A topology checked against a configuration, its routing compiled.
pub(crate) struct Compiled<M> {
    pub(crate) stages: Vec<StageDecl<M>>,
    pub(crate) links: Vec<(StageId, StageId)>,
    pub(crate) entry: StageId,
    /// Stages in an order where every link points forward.
    pub(crate) order: Vec<StageId>,
    pub(crate) exchange: Arc<Exchange<StageId>>,
    /// Per stage: the routes it may publish.
    pub(crate) may_publish: Vec<Vec<bool>>,
    pub(crate) dead_letter_unroutable: bool,
    pub(crate) stage_configs: Vec<StageConfig>,
}

/// The shape of a pipeline: named stages, the links between them, and the entry stage.
///
/// Links form a directed acyclic graph (a cycle of bounded queues can deadlock, and shutdown
/// drains front to back). A handler may emit only to stages linked from its own.
///
/// ```
/// use conduit::{Topology, Outcome, Envelope, Emitter, Message};
///
/// #[derive(Debug, Clone, Copy)]
/// struct Ping(u64);
/// impl Message for Ping { fn key(&self) -> u64 { self.0 } }
///
/// let mut topology = Topology::<Ping>::new();
/// let first = topology.stage("first");
/// let second = topology.stage("second");
/// topology.link(first, second).entry(first);
/// topology.handler(first, move |_worker| {
///     move |event: &Envelope<Ping>, out: &mut Emitter<Ping>| {
///         out.emit(second, event.msg);
///         Outcome::Done
///     }
/// });
/// topology.handler(second, |_worker| |_: &Envelope<Ping>, _: &mut Emitter<Ping>| Outcome::Done);
/// ```
pub struct Topology<M> {
    stages: Vec<StageDecl<M>>,
    links: Vec<(StageId, StageId)>,
    entry: Option<StageId>,
    exchange: ExchangeBuilder<StageId>,
    publishes: Vec<(StageId, RouteId)>,
    dead_letter_unroutable: bool,
}

impl<M> fmt::Debug for Topology<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("stages", &self.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>())
            .field("links", &self.links)
            .field("entry", &self.entry)
            .field("exchange", &self.exchange)
            .field("publishes", &self.publishes)
            .field("dead_letter_unroutable", &self.dead_letter_unroutable)
            .finish()
    }
}

impl<M: Message> Default for Topology<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Message> Topology<M> {
    /// Refuses a topology that would drop events without a trace: a declared routing key no
    /// queue is bound to, with unroutable events dropped rather than dead-lettered.
    fn refuse_silent_loss(&self, exchange: &Exchange<StageId>) -> Result<(), BuildError> {
        if self.dead_letter_unroutable {
            return Ok(());
        }
        match self.publishes.iter().find(|(_, route)| exchange.destinations(*route).is_empty()) {
            None => Ok(()),
            Some(&(from, route)) => Err(BuildError::SilentLoss(format!(
                "stage {:?} publishes {:?}, which no stage is bound to, and unroutable events are dropped: \
                 bind a stage to it, or dead-letter unroutable events (Topology::dead_letter_unroutable)",
                self.stages[from.index()].name,
                exchange.key(route).unwrap_or("?")
            ))),
        }
    }
}

impl<M: Message> Topology<M> {
    /// An empty topology.
    #[must_use]
    pub fn new() -> Self {
        Self {
            stages: Vec::new(),
            links: Vec::new(),
            entry: None,
            exchange: ExchangeBuilder::new(),
            publishes: Vec::new(),
            dead_letter_unroutable: false,
        }
    }

    /// Declares a stage; its settings come from the [`EngineConfig`] entry of the same name.
    ///
    /// Names must be unique and non-empty; [`Engine::start`] checks.
    pub fn stage(&mut self, name: &str) -> StageId {
        let id = u16::try_from(self.stages.len()).unwrap_or(u16::MAX);
        self.stages.push(StageDecl { name: name.to_owned(), runner: None, make: None, ordered: false });
        StageId(id)
    }

    /// Lets handlers of `from` emit to `to`.
    pub fn link(&mut self, from: StageId, to: StageId) -> &mut Self {
        self.links.push((from, to));
        self
    }

    /// Binds `stage`'s queue to the topology's topic exchange with `pattern` (`*` one word, `#`
    /// zero or more; RabbitMQ's semantics, see [`crate::routing`]).
    pub fn bind(&mut self, stage: StageId, pattern: &str) -> Result<&mut Self, RoutingError> {
        self.exchange.bind(pattern, stage)?;
        Ok(self)
    }

    /// Declares that handlers of `from` publish with routing key `key`; returns the route to
    /// pass to [`Emitter::publish`](crate::Emitter::publish). Links from `from` to every stage
    /// bound to the key are added when the engine starts, and routing is then a table look-up.
    pub fn publishes(&mut self, from: StageId, key: &str) -> Result<RouteId, RoutingError> {
        let route = self.exchange.key(key)?;
        self.publishes.push((from, route));
        Ok(route)
    }

    /// Dead-letters events published with a key no stage is bound to (they are always counted).
    pub fn dead_letter_unroutable(&mut self, yes: bool) -> &mut Self {
        self.dead_letter_unroutable = yes;
        self
    }

    /// Orders `stage` by key, as Kafka partitions do: each worker gets its own queue, every event
    /// of one key goes to the same worker (by key hash), so a key's events are handled in order
    /// and never concurrently; a key waiting for a retry holds its later events back.
    pub fn ordered_by_key(&mut self, stage: StageId) -> &mut Self {
        if let Some(decl) = self.stages.get_mut(stage.index()) {
            decl.ordered = true;
        }
        self
    }

    /// Makes `stage` the one submitted messages enter.
    pub fn entry(&mut self, stage: StageId) -> &mut Self {
        self.entry = Some(stage);
        self
    }

    /// Sets the handler of `stage`: `factory` builds one handler per worker, on its thread, with
    /// the worker's index in the pool.
    pub fn handler<H, F>(&mut self, stage: StageId, factory: F) -> &mut Self
    where
        H: Handler<M> + 'static,
        F: Fn(usize) -> H + Send + Sync + 'static,
    {
        if let Some(decl) = self.stages.get_mut(stage.index()) {
            let factory = Arc::new(factory);
            let make = Arc::clone(&factory);
            decl.make = Some(Arc::new(move |worker| Box::new(make(worker)) as Box<dyn Handler<M>>));
            decl.runner = Some(Arc::new(move |ctx: WorkerCtx<M>| {
                let handler = factory(ctx.worker);
                worker::run(ctx, handler);
            }));
        }
        self
    }

    /// Checks the topology against `config` and compiles its routing: what both the threaded
    /// engine and the deterministic simulation run.
    pub(crate) fn compile(mut self, config: &EngineConfig) -> Result<Compiled<M>, BuildError> {
        let exchange = Arc::new(std::mem::take(&mut self.exchange).build());
        let mut may_publish = vec![Vec::new(); self.stages.len()];
        for &(from, route) in &self.publishes {
            for &to in exchange.destinations(route) {
                self.links.push((from, to));
            }
            if let Some(routes) = may_publish.get_mut(from.index()) {
                if routes.len() <= route.index() {
                    routes.resize(route.index() + 1, false);
                }
                routes[route.index()] = true;
            }
        }
        let order = self.validate(config)?;
        self.refuse_silent_loss(&exchange)?;
        let stage_configs: Vec<StageConfig> = self.stages.iter().map(|s| config.stage(&s.name)).collect();
        for (decl, stage) in self.stages.iter().zip(&stage_configs) {
            stage.validate(&format!("engine.stages.{}", decl.name))?;
        }
        let Topology { stages, links, entry, dead_letter_unroutable, .. } = self;
        Ok(Compiled {
            stages,
            links,
            entry: entry.expect("validate checked the entry stage is set"),
            order,
            exchange,
            may_publish,
            dead_letter_unroutable,
            stage_configs,
        })
    }

    /// Checks the topology and returns the stages in an order where every link points forward.
    fn validate(&self, config: &EngineConfig) -> Result<Vec<StageId>, BuildError> {
        let invalid = |text: String| Err(BuildError::Topology(text));
        if self.stages.is_empty() {
            return invalid("no stages declared".into());
        }
        if self.stages.len() > usize::from(u16::MAX) {
            return invalid(format!("{} stages declared; at most {} allowed", self.stages.len(), u16::MAX));
        }
        for (index, stage) in self.stages.iter().enumerate() {
            if stage.name.is_empty() || stage.name.contains(char::is_whitespace) {
                return invalid(format!("stage #{index} has an empty name or one with whitespace: {:?}", stage.name));
            }
            if self.stages[..index].iter().any(|other| other.name == stage.name) {
                return invalid(format!("stage name {:?} is declared twice", stage.name));
            }
        }
        for stage in &self.stages {
            if stage.runner.is_none() {
                return invalid(format!("stage {:?} has no handler", stage.name));
            }
        }
        for name in config.overridden_stages() {
            if !self.stages.iter().any(|s| s.name == name) {
                return Err(ConfigError::Invalid(format!(
                    "engine.stages.{name} configures a stage the topology does not have (stages: {})",
                    self.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
                .into());
            }
        }
        let Some(entry) = self.entry else {
            return invalid("no entry stage set".into());
        };
        let count = self.stages.len();
        let mut indegree = vec![0usize; count];
        let mut successors = vec![Vec::new(); count];
        for &(from, to) in &self.links {
            if from.index() >= count || to.index() >= count {
                return invalid(format!("link {from:?} -> {to:?} names a stage of another topology"));
            }
            if from == to {
                return invalid(format!("stage {:?} is linked to itself", self.stages[from.index()].name));
            }
            if !successors[from.index()].contains(&to) {
                successors[from.index()].push(to);
                indegree[to.index()] += 1;
            }
        }
        // Kahn's algorithm: a full order exists exactly when the links have no cycle.
        let mut ready: VecDeque<StageId> =
            (0..count).filter(|&i| indegree[i] == 0).map(|i| StageId(u16::try_from(i).unwrap_or(u16::MAX))).collect();
        let mut order = Vec::with_capacity(count);
        while let Some(stage) = ready.pop_front() {
            order.push(stage);
            for &next in &successors[stage.index()] {
                indegree[next.index()] -= 1;
                if indegree[next.index()] == 0 {
                    ready.push_back(next);
                }
            }
        }
        if order.len() != count {
            return invalid("the links form a cycle; stages must form a directed acyclic graph".into());
        }
        let mut reachable = vec![false; count];
        let mut stack = vec![entry];
        while let Some(stage) = stack.pop() {
            if !std::mem::replace(&mut reachable[stage.index()], true) {
                stack.extend(successors[stage.index()].iter().copied());
            }
        }
        if let Some(lost) = reachable.iter().position(|r| !r) {
            return invalid(format!("stage {:?} cannot be reached from the entry stage", self.stages[lost].name));
        }
        Ok(order)
    }
}

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
    /// Worker threads, stages in topological order so joining follows the drain.
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    journal: Option<Journal<M>>,
    /// Commit latency of ingress windows, kept when intake stops.
    ack_latency: Option<Histogram<u64>>,
    /// Breakers shown by [`Engine::watch_breaker`].
    breakers: Mutex<Vec<(String, Arc<crate::breaker::CircuitBreaker>)>>,
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
}

impl<M: Message> fmt::Debug for EngineBuilder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("topology", &self.topology)
            .field("config", &self.config)
            .field("journal", &self.journal)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl<M: Message> EngineBuilder<M> {
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
        let EngineBuilder { topology, config, dead_letters, journal, clock } = builder;
        let Compiled { stages, links, entry, order, exchange, may_publish, dead_letter_unroutable, stage_configs } =
            topology.compile(&config)?;
        let shared = Arc::new(Shared::default());
        let metrics: Vec<Arc<StageMetrics>> = stages
            .iter()
            .zip(&stage_configs)
            .map(|(decl, c)| {
                // Every queue of the stage: one per partition (worker, if ordered) and level.
                let queues = if decl.ordered { c.workers } else { 1 } * usize::from(c.priority_levels);
                Arc::new(StageMetrics::new(decl.name.clone(), c.workers, c.queue_events_max() * queues))
            })
            .collect();
        // One queue per stage, or one per worker for a stage ordered by key.
        let queues: Vec<(StageInput<M>, Vec<BatchReceiver<M>>)> = stages
            .iter()
            .zip(&stage_configs)
            .zip(&metrics)
            .map(|((decl, c), m)| {
                let levels = usize::from(c.priority_levels);
                let partitions = if decl.ordered { c.workers } else { 1 };
                let (senders, receivers) = (0..partitions * levels)
                    .map(|_| {
                        channel::queue(c.queue_batches, c.batch_events_max, Arc::clone(m), Arc::clone(&shared.poisoned))
                    })
                    .unzip();
                (StageInput::new(senders, levels, decl.name.as_str().into(), c.overflow), receivers)
            })
            .collect();

        let ingress = Ingress::new(queues[entry.index()].0.clone(), journal.clone(), Arc::clone(&shared))?;
        let mut engine = Self {
            ingress: Some(ingress),
            entry,
            stage_senders: queues.iter().map(|(input, _)| input.clone()).collect(),
            submitted_at_stop: 0,
            metrics,
            workers: Vec::new(),
            shared,
            journal,
            ack_latency: None,
            breakers: Mutex::new(Vec::new()),
            started: Instant::now(),
        };
        for stage in order {
            let index = stage.index();
            let decl = &stages[index];
            let runner = decl.runner.as_ref().expect("validate checked every stage has a handler");
            let stage_config = stage_configs[index];
            for worker in 0..stage_config.workers {
                let outputs = (0..stages.len())
                    .map(|to| links.iter().any(|&(f, t)| f == stage && t.index() == to).then(|| queues[to].0.clone()))
                    .collect();
                let name = format!("conduit:{}:{worker}", decl.name);
                let ctx = WorkerCtx {
                    name: name.clone(),
                    stage_name: decl.name.as_str().into(),
                    worker,
                    stage: stage.0,
                    config: stage_config,
                    journal: engine.journal.clone(),
                    routes: Some((Arc::clone(&exchange), may_publish[index].clone(), dead_letter_unroutable)),
                    inputs: {
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
                };
                let runner = Arc::clone(runner);
                let handle = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || runner(ctx))
                    .map_err(|source| BuildError::Spawn { name, source })?;
                engine.workers.push(handle);
            }
        }
        // The queues' own ends are dropped here: from now on only the engine's senders and the
        // workers hold them, so once the engine lets go, a stage's queue closes exactly when
        // everything upstream of it has stopped.
        drop(queues);
        tracing::info!(stages = engine.metrics.len(), workers = engine.workers.len(), "engine started");
        Ok(engine)
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
    /// With a journal, messages are journaled in windows of up to [`INGRESS_WINDOW_EVENTS`]
    /// (one append, one commit each) that enter the pipeline only once committed; up to
    /// [`WINDOWS_IN_FLIGHT`](crate::WINDOWS_IN_FLIGHT) windows commit at once, and the call returns
    /// when all of its windows are in.
    ///
    /// On failure the error holds every message not submitted: the windows that failed and the
    /// rest of `msgs`, collected (so `msgs` must be finite).
    pub fn submit_many(&self, msgs: impl IntoIterator<Item = M>) -> Result<u64, SubmitError<Vec<M>>> {
        match self.ingress.as_ref() {
            Some(ingress) => ingress.submit_many(msgs),
            None => Err(SubmitError::Closed(msgs.into_iter().collect())),
        }
    }

    /// Puts events straight into `stage`'s queue, blocking while it is full; they are not
    /// journaled again. For resuming work after a restart and for redriving dead letters: the
    /// caller gives each envelope its key, correlation `seq` and `cause`.
    pub fn inject_many(
        &self,
        stage: StageId,
        events: impl IntoIterator<Item = Envelope<M>>,
    ) -> Result<u64, SubmitError<Vec<M>>> {
        let mut events = events.into_iter().peekable();
        let Some(input) = self.stage_senders.get(stage.index()) else {
            return Err(SubmitError::Closed(events.map(|e| e.msg).collect()));
        };
        let mut sent = 0;
        while events.peek().is_some() {
            let mut window = fill_window(input, events.by_ref().take(INGRESS_WINDOW_EVENTS));
            if let Ok(count) = send_window(input, &mut window) {
                sent += count;
            } else {
                let mut unsent = messages(window);
                unsent.extend(events.map(|e| e.msg));
                return Err(SubmitError::Poisoned(unsent));
            }
        }
        Ok(sent)
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

    /// The figures of every stage now.
    pub fn snapshot(&self) -> Snapshot {
        let journal = self.journal.as_ref();
        Snapshot {
            uptime_s: self.started.elapsed().as_secs_f64(),
            submitted: self.submitted(),
            stages: self.metrics.iter().map(|m| m.snapshot()).collect(),
            poisoned: self.poisoned(),
            log: journal.map(|j| j.log.stats()),
            ack_latency_us: journal.and_then(|_| match (&self.ingress, &self.ack_latency) {
                (Some(ingress), _) => ingress.ack_latency().map(|h| LatencySummary::from_histogram(&h.lock())),
                (None, kept) => kept.as_ref().map(LatencySummary::from_histogram),
            }),
            breakers: self.breakers.lock().iter().map(|(name, breaker)| (name.clone(), breaker.report())).collect(),
        }
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
        self.stage_senders.clear();
        for handle in self.workers.drain(..) {
            let name = handle.thread().name().unwrap_or("conduit worker").to_owned();
            if handle.join().is_err() {
                self.shared.poison(format!("worker {name} panicked"));
            }
        }
        self.journal.as_ref().map(|journal| journal.log.sync())
    }
}

impl<M: Message> Drop for Engine<M> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
