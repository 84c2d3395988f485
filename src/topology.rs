//! The shape of a pipeline: named stages, the links between them, bindings to the topic
//! exchange, and the checks that turn it into what the engine (or the simulation) runs.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crate::config::{EngineConfig, StageConfig};
use crate::error::{BuildError, ConfigError};
use crate::routing::{Exchange, ExchangeBuilder, RouteId, RoutingError};
use crate::stage::worker::{self, WorkerCtx};
use crate::stage::{Handler, Message, StageId};

pub(crate) type Runner<M> = Arc<dyn Fn(WorkerCtx<M>) + Send + Sync>;
/// Builds a stage's handler for worker `n`, boxed: the deterministic simulation's way in.
pub(crate) type MakeHandler<M> = Arc<dyn Fn(usize) -> Box<dyn Handler<M>> + Send + Sync>;

pub(crate) struct StageDecl<M> {
    pub(crate) name: String,
    pub(crate) runner: Option<Runner<M>>,
    pub(crate) make: Option<MakeHandler<M>>,
    /// Events of one key go to one worker, in order, never two at once.
    pub(crate) ordered: bool,
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
    /// Names must be unique and non-empty; [`Engine::start`](crate::Engine::start) checks.
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
