//! Wiring the order pipeline onto the engine, running a workload, and the run report.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::domain::{Order, OrderCodec, OrderEvent, Workload};
use super::history::{Histories, OrderHistory, OrderStatus, VerifyReport};
use super::ports::{
    Channel, Faults, FraudVerdict, LedgerFigures, NotifyFigures, SimulatedCarrier, SimulatedFraudCheck,
    SimulatedGateway, SimulatedInventory, SimulatedNotifier, StockFigures,
};
use super::stages::{
    names, CompensationStage, InventoryStage, NotifyStage, OrderDeadLetters, OrderStage, OutcomeFigures, Outcomes,
    PaymentStage, ShippingStage,
};
use conduit::breaker::{BreakerConfig, BreakerReport, CircuitBreaker};
use conduit::log::{Durability, Log, LogError, LogStats};
use conduit::rpc::{RpcServer, RpcStats};
use conduit::{
    BuildError, ConfigError, Engine, EngineConfig, EngineSettings, Envelope, Journal, LatencySummary, Receipt, StageId,
    SubmitError, Topology, TrySubmitError,
};

/// The simulated world: workload shape and how the ports misbehave. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Seeds the workload and every simulated fault.
    pub seed: u64,
    /// Distinct SKUs ordered (1..=1,000,000).
    pub skus: u32,
    /// Distinct customers (at least 1).
    pub customers: u64,
    /// Units each SKU starts with (SKUs made empty by `out_of_stock_rate` start with none).
    pub stock_per_sku: u32,
    /// Fraction of SKUs that start out of stock, so about this fraction of orders is cancelled.
    pub out_of_stock_rate: f64,
    /// Probability that a charge attempt fails transiently (half before, half after charging).
    pub payment_failure_rate: f64,
    /// Probability that a charge is declined for good.
    pub payment_decline_rate: f64,
    /// Probability that a reservation attempt fails transiently.
    pub inventory_failure_rate: f64,
    /// Probability that a notification attempt fails transiently.
    pub notify_failure_rate: f64,
    /// Time each payment call takes, in microseconds.
    pub payment_latency_us: u64,
    /// Time each inventory call takes, in microseconds.
    pub inventory_latency_us: u64,
    /// Time each notification call takes, in microseconds.
    pub notify_latency_us: u64,
    /// Ask a fraud service over request/reply before every charge (a blocking call per order:
    /// off by default, as it costs a thread hand-off each way).
    pub fraud_check: bool,
    /// Fraction of orders the fraud service denies (they are cancelled).
    pub fraud_deny_rate: f64,
    /// Time each fraud check takes, in microseconds.
    pub fraud_latency_us: u64,
    /// How long the payment stage waits for a verdict before retrying, in microseconds.
    pub fraud_timeout_us: u64,
    /// Consecutive transient failures that open a port's circuit breaker (0, the default: no
    /// breakers; with one, work meant for an open port waits on the wheel, attempts unspent).
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before a trial, in milliseconds.
    pub breaker_open_ms: u64,
    /// Fraction of orders whose payload arrives malformed (zeroed past the id): the order stage
    /// dead-letters each as `malformed`, and the run checks their count against the poisoned.
    pub poison_rate: f64,
    /// Probability that a charge attempt times out (the charge made or not, as the retry finds).
    pub payment_timeout_rate: f64,
    /// How long a timed-out charge attempt hangs before it fails, in microseconds.
    pub payment_timeout_us: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            skus: 1_000,
            customers: 100_000,
            stock_per_sku: 1_000_000_000,
            out_of_stock_rate: 0.0,
            payment_failure_rate: 0.0,
            payment_decline_rate: 0.0,
            inventory_failure_rate: 0.0,
            notify_failure_rate: 0.0,
            payment_latency_us: 0,
            inventory_latency_us: 0,
            notify_latency_us: 0,
            fraud_check: false,
            fraud_deny_rate: 0.0,
            fraud_latency_us: 0,
            fraud_timeout_us: 50_000,
            breaker_failures: 0,
            breaker_open_ms: 50,
            poison_rate: 0.0,
            payment_timeout_rate: 0.0,
            payment_timeout_us: 0,
        }
    }
}

/// Most latency a simulated port may be given: one second.
const LATENCY_US_MAX: u64 = 1_000_000;

impl SimConfig {
    /// Checks every rate is a probability and every size within bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rates = [
            ("out_of_stock_rate", self.out_of_stock_rate),
            ("payment_failure_rate", self.payment_failure_rate),
            ("payment_decline_rate", self.payment_decline_rate),
            ("inventory_failure_rate", self.inventory_failure_rate),
            ("notify_failure_rate", self.notify_failure_rate),
            ("fraud_deny_rate", self.fraud_deny_rate),
            ("poison_rate", self.poison_rate),
            ("payment_timeout_rate", self.payment_timeout_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::OutOfRange {
                    field: format!("simulation.{name}"),
                    value: rate.to_string(),
                    min: "0".into(),
                    max: "1".into(),
                });
            }
        }
        if !(1..=1_000_000).contains(&self.skus) {
            return Err(out_of_range("skus", self.skus, 1, 1_000_000));
        }
        if self.customers == 0 {
            return Err(out_of_range("customers", self.customers, 1, u64::MAX));
        }
        let latencies = [
            ("payment_latency_us", self.payment_latency_us),
            ("inventory_latency_us", self.inventory_latency_us),
            ("notify_latency_us", self.notify_latency_us),
            ("fraud_latency_us", self.fraud_latency_us),
            ("payment_timeout_us", self.payment_timeout_us),
        ];
        for (name, latency) in latencies {
            if latency > LATENCY_US_MAX {
                return Err(out_of_range(name, latency, 0, LATENCY_US_MAX));
            }
        }
        if !(1..=60_000).contains(&self.breaker_open_ms) {
            return Err(out_of_range("breaker_open_ms", self.breaker_open_ms, 1, 60_000));
        }
        if !(1..=60_000_000).contains(&self.fraud_timeout_us) {
            return Err(out_of_range("fraud_timeout_us", self.fraud_timeout_us, 1, 60_000_000));
        }
        Ok(())
    }

    fn faults(&self, failure_rate: f64, latency_us: u64) -> Faults {
        Faults { seed: self.seed, failure_rate, latency: Duration::from_micros(latency_us) }
    }

    /// SKUs that start with no stock.
    #[must_use]
    pub fn empty_skus(&self) -> u32 {
        // A rate within [0, 1] times a u32 fits a u32; rounding keeps the fraction exact-ish.
        let empty = (self.out_of_stock_rate * f64::from(self.skus)).round();
        if empty >= f64::from(self.skus) {
            self.skus
        } else {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let empty = empty as u32;
            empty
        }
    }
}

fn out_of_range(name: &str, value: impl Into<u64>, min: u64, max: u64) -> ConfigError {
    ConfigError::OutOfRange {
        field: format!("simulation.{name}"),
        value: value.into().to_string(),
        min: min.to_string(),
        max: max.to_string(),
    }
}

/// The routing keys the order pipeline's stages publish with.
pub mod keys {
    /// An accepted order, to charge.
    pub const PAYMENT: &str = "order.payment.process";
    /// A charged order, to reserve stock for.
    pub const INVENTORY: &str = "order.inventory.reserve";
    /// A declined charge, to compensate.
    pub const DECLINED: &str = "order.compensation.declined";
    /// A confirmed order, to notify the customer of.
    pub const NOTIFY: &str = "order.notify.confirmed";
    /// A confirmed order, to ship.
    pub const SHIPPING: &str = "order.shipping.ship";
    /// An order whose SKU ran out, to compensate.
    pub const OUT_OF_STOCK: &str = "order.compensation.out_of_stock";
}

/// How the order pipeline's stages are bound to its routing keys, and which are ordered by key.
/// Loaded from a topology file (`conduit run --topology FILE`) to experiment without
/// recompiling; every field is optional.
///
/// ```toml
/// ordered_by_key = ["payment"]
/// [bindings]                          # stage -> patterns; a stage listed here gets only these
/// email = ["order.notify.*"]
/// sms = ["order.notify.#"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderRouting {
    /// Patterns each stage's queue is bound with, by stage name.
    pub bindings: BTreeMap<String, Vec<String>>,
    /// Stages whose events are partitioned over their workers by order id.
    pub ordered_by_key: Vec<String>,
}

impl Default for OrderRouting {
    fn default() -> Self {
        let bind =
            |stage: &str, patterns: &[&str]| (stage.to_owned(), patterns.iter().map(|&p| p.to_owned()).collect());
        Self {
            bindings: [
                bind(names::PAYMENT, &[keys::PAYMENT]),
                bind(names::INVENTORY, &[keys::INVENTORY]),
                bind(names::EMAIL, &["order.notify.*"]),
                bind(names::SMS, &["order.notify.*"]),
                bind(names::SHIPPING, &[keys::SHIPPING]),
                bind(names::COMPENSATION, &["order.compensation.*"]),
            ]
            .into_iter()
            .collect(),
            ordered_by_key: Vec::new(),
        }
    }
}

impl OrderRouting {
    /// Binds and orders the stages of `topology` (stage names as in [`names`]).
    fn apply(&self, topology: &mut Topology<OrderEvent>, stages: &[(&str, StageId)]) -> Result<(), BuildError> {
        let stage = |name: &str| {
            stages.iter().find(|(n, _)| *n == name).map(|(_, id)| *id).ok_or_else(|| {
                BuildError::Topology(format!(
                    "the topology names stage {name:?}; the order pipeline has {}",
                    names::ALL.join(", ")
                ))
            })
        };
        for (name, patterns) in &self.bindings {
            let id = stage(name)?;
            for pattern in patterns {
                topology.bind(id, pattern).map_err(|e| BuildError::Topology(e.to_string()))?;
            }
        }
        for name in &self.ordered_by_key {
            topology.ordered_by_key(stage(name)?);
        }
        Ok(())
    }
}

/// A topology file: an optional `[engine]` table (as in a configuration file, overriding it) and
/// the routing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyFile {
    /// Engine settings: pool sizes, batch sizes, queue capacities.
    pub engine: Option<EngineSettings>,
    /// Bindings given here replace the default ones of the same stage.
    pub bindings: BTreeMap<String, Vec<String>>,
    /// Stages ordered by key.
    pub ordered_by_key: Vec<String>,
}

impl TopologyFile {
    /// Parses a topology file's text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// The routing: the defaults, with this file's bindings replacing those of the stages it names.
    #[must_use]
    pub fn routing(&self) -> OrderRouting {
        let mut routing = OrderRouting::default();
        for (stage, patterns) in &self.bindings {
            routing.bindings.insert(stage.clone(), patterns.clone());
        }
        routing.ordered_by_key.clone_from(&self.ordered_by_key);
        routing
    }
}

/// A whole configuration file: `[engine]` and `[simulation]` tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineFile {
    /// Engine settings (see [`EngineSettings`]).
    pub engine: EngineSettings,
    /// The simulated world.
    pub simulation: SimConfig,
}

impl PipelineFile {
    /// Parses a TOML file's text; validation comes with [`PipelineFile::validate`].
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Validates both tables.
    pub fn validate(&self) -> Result<(EngineConfig, SimConfig), ConfigError> {
        let engine = EngineConfig::from_settings(&self.engine)?;
        self.simulation.validate()?;
        Ok((engine, self.simulation.clone()))
    }
}

/// The simulated ports, shared by the stages and read by the report.
#[derive(Debug, Clone)]
pub(crate) struct Ports {
    pub(crate) gateway: Arc<SimulatedGateway>,
    pub(crate) inventory: Arc<SimulatedInventory>,
    pub(crate) notifier: Arc<SimulatedNotifier>,
    pub(crate) carrier: Arc<SimulatedCarrier>,
}

impl Ports {
    fn new(sim: &SimConfig) -> Self {
        Self {
            gateway: Arc::new(
                SimulatedGateway::new(
                    sim.faults(sim.payment_failure_rate, sim.payment_latency_us),
                    sim.payment_decline_rate,
                )
                .with_timeouts(sim.payment_timeout_rate, Duration::from_micros(sim.payment_timeout_us)),
            ),
            inventory: Arc::new(SimulatedInventory::new(
                sim.faults(sim.inventory_failure_rate, sim.inventory_latency_us),
                sim.skus,
                sim.stock_per_sku,
                sim.empty_skus(),
            )),
            notifier: Arc::new(SimulatedNotifier::new(sim.faults(sim.notify_failure_rate, sim.notify_latency_us))),
            carrier: Arc::new(SimulatedCarrier::default()),
        }
    }

    /// The fraud service the payment stage calls, if the simulation asks for one.
    fn fraud(sim: &SimConfig, workers: usize) -> Result<Option<FraudService>, BuildError> {
        if !sim.fraud_check {
            return Ok(None);
        }
        let service = SimulatedFraudCheck {
            seed: sim.seed,
            deny_rate: sim.fraud_deny_rate,
            latency: Duration::from_micros(sim.fraud_latency_us),
        };
        let server = RpcServer::spawn("fraud", workers, 1_024, move |order: Order| service.check(&order))
            .map_err(|source| BuildError::Spawn { name: "conduit:rpc:fraud".into(), source })?;
        Ok(Some((Arc::new(server), Duration::from_micros(sim.fraud_timeout_us))))
    }
}

/// One circuit breaker per port (email and SMS share the notifier but not a breaker: one
/// provider per channel).
#[derive(Debug, Clone, Default)]
struct Breakers {
    payment: Option<Arc<CircuitBreaker>>,
    inventory: Option<Arc<CircuitBreaker>>,
    email: Option<Arc<CircuitBreaker>>,
    sms: Option<Arc<CircuitBreaker>>,
}

impl Breakers {
    fn new(sim: &SimConfig) -> Self {
        if sim.breaker_failures == 0 {
            return Self::default();
        }
        let config = BreakerConfig {
            failures_to_open: sim.breaker_failures,
            open_for: Duration::from_millis(sim.breaker_open_ms),
        };
        let one = || Some(Arc::new(CircuitBreaker::new(config)));
        Self { payment: one(), inventory: one(), email: one(), sms: one() }
    }

    /// Shows every breaker to the engine, so its snapshots report them.
    fn watch(&self, engine: &Engine<OrderEvent>) {
        for (port, breaker) in
            [("payment", &self.payment), ("inventory", &self.inventory), ("email", &self.email), ("sms", &self.sms)]
        {
            if let Some(breaker) = breaker {
                engine.watch_breaker(port, Arc::clone(breaker));
            }
        }
    }

    fn report(&self) -> BTreeMap<String, BreakerReport> {
        [("payment", &self.payment), ("inventory", &self.inventory), ("email", &self.email), ("sms", &self.sms)]
            .into_iter()
            .filter_map(|(port, breaker)| breaker.as_ref().map(|b| (port.to_owned(), b.report())))
            .collect()
    }
}

/// A fraud service and how long to wait for its verdict.
type FraudService = (Arc<RpcServer<Order, FraudVerdict>>, Duration);

/// Builds the order pipeline's topology and everything its handlers share, without starting it.
pub(crate) fn build(config: &EngineConfig, sim: &SimConfig, routing: &OrderRouting) -> Result<Built, BuildError> {
    sim.validate()?;
    let ports = Ports::new(sim);
    let outcomes = Arc::new(Outcomes::default());
    let dead_letters = Arc::new(OrderDeadLetters {
        inventory: ports.inventory.clone(),
        gateway: ports.gateway.clone(),
        outcomes: Arc::clone(&outcomes),
        letters: Mutex::new(Vec::new()),
        compensation_failures: AtomicU64::new(0),
    });

    let mut topology = Topology::new();
    let order = topology.stage(names::ORDER);
    let payment = topology.stage(names::PAYMENT);
    let inventory = topology.stage(names::INVENTORY);
    let email = topology.stage(names::EMAIL);
    let sms = topology.stage(names::SMS);
    let shipping = topology.stage(names::SHIPPING);
    let compensation = topology.stage(names::COMPENSATION);
    let stages = vec![
        (names::ORDER, order),
        (names::PAYMENT, payment),
        (names::INVENTORY, inventory),
        (names::EMAIL, email),
        (names::SMS, sms),
        (names::SHIPPING, shipping),
        (names::COMPENSATION, compensation),
    ];
    debug_assert!(stages.iter().zip(names::ALL).all(|((name, id), all)| *name == all && id.index() < 7));
    // An order event nobody is bound to must not vanish: it is dead-lettered (and the order
    // compensated), which the report shows.
    topology.entry(order).dead_letter_unroutable(true);
    routing.apply(&mut topology, &stages)?;
    let route = |topology: &mut Topology<OrderEvent>, from, key| {
        topology.publishes(from, key).map_err(|e| BuildError::Topology(e.to_string()))
    };
    let accepted = route(&mut topology, order, keys::PAYMENT)?;
    let (charged, declined) =
        (route(&mut topology, payment, keys::INVENTORY)?, route(&mut topology, payment, keys::DECLINED)?);
    let confirmed = route(&mut topology, inventory, keys::NOTIFY)?;
    let ship = route(&mut topology, inventory, keys::SHIPPING)?;
    let out_of_stock = route(&mut topology, inventory, keys::OUT_OF_STOCK)?;

    topology.handler(order, move |_| OrderStage { accepted });
    let gateway = ports.gateway.clone();
    let fraud = Ports::fraud(sim, config.stage(names::PAYMENT).workers)?;
    let breakers = Breakers::new(sim);
    let fraud_server = fraud.as_ref().map(|(server, _)| Arc::clone(server));
    let breaker = breakers.payment.clone();
    topology.handler(payment, move |_| PaymentStage {
        gateway: gateway.clone(),
        fraud: fraud.clone(),
        charged,
        declined,
        breaker: breaker.clone(),
    });
    let (store, breaker) = (ports.inventory.clone(), breakers.inventory.clone());
    topology.handler(inventory, move |_| InventoryStage {
        inventory: store.clone(),
        confirmed,
        ship,
        out_of_stock,
        breaker: breaker.clone(),
    });
    for (stage, channel, breaker) in
        [(email, Channel::Email, breakers.email.clone()), (sms, Channel::Sms, breakers.sms.clone())]
    {
        let notifier = ports.notifier.clone();
        topology.handler(stage, move |_| NotifyStage { channel, notifier: notifier.clone(), breaker: breaker.clone() });
    }
    let (carrier, shipped) = (Arc::clone(&ports.carrier), Arc::clone(&outcomes));
    topology.handler(shipping, move |_| ShippingStage { carrier: carrier.clone(), outcomes: shipped.clone() });
    let (store, gateway, cancelled) = (ports.inventory.clone(), ports.gateway.clone(), Arc::clone(&outcomes));
    topology.handler(compensation, move |_| CompensationStage {
        inventory: store.clone(),
        gateway: gateway.clone(),
        outcomes: Arc::clone(&cancelled),
    });
    Ok(Built { topology, stages, ports, outcomes, dead_letters, breakers, fraud: fraud_server })
}

/// The order pipeline, built and not started.
pub(crate) struct Built {
    pub(crate) topology: Topology<OrderEvent>,
    pub(crate) stages: Vec<(&'static str, StageId)>,
    pub(crate) ports: Ports,
    pub(crate) outcomes: Arc<Outcomes>,
    pub(crate) dead_letters: Arc<OrderDeadLetters>,
    breakers: Breakers,
    fraud: Option<Arc<RpcServer<Order, FraudVerdict>>>,
}

/// The reference order pipeline, running.
pub struct OrderPipeline {
    engine: Engine<OrderEvent>,
    breakers: Breakers,
    /// The fraud service the payment stage calls, when the simulation asks for one.
    fraud: Option<Arc<RpcServer<Order, FraudVerdict>>>,
    stages: Vec<(&'static str, StageId)>,
    log: Option<Arc<Log>>,
    /// Orders placed by earlier runs of this log (recovery).
    submitted_before: u64,
    ports: Ports,
    outcomes: Arc<Outcomes>,
    dead_letters: Arc<OrderDeadLetters>,
    sim: SimConfig,
    started: Instant,
}

impl std::fmt::Debug for OrderPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderPipeline").field("engine", &self.engine).field("sim", &self.sim).finish_non_exhaustive()
    }
}

impl OrderPipeline {
    /// Builds the topology and starts the engine, in memory only, with the default routing.
    pub fn start(config: &EngineConfig, sim: &SimConfig) -> Result<Self, BuildError> {
        Self::start_with(config, sim, None, None)
    }

    /// [`OrderPipeline::start_routed`] with the default routing.
    pub fn start_with(
        config: &EngineConfig,
        sim: &SimConfig,
        log: Option<Arc<Log>>,
        restore: Option<&Histories>,
    ) -> Result<Self, BuildError> {
        Self::start_routed(config, sim, &OrderRouting::default(), log, restore)
    }

    /// Builds the topology with `routing`'s bindings and starts the engine; with a log, every
    /// order's facts are journaled to it. `restore` carries the state of earlier runs of the same
    /// log into the simulated ports and the counts (see [`recover`]).
    pub fn start_routed(
        config: &EngineConfig,
        sim: &SimConfig,
        routing: &OrderRouting,
        log: Option<Arc<Log>>,
        restore: Option<&Histories>,
    ) -> Result<Self, BuildError> {
        conduit::crashpoint::register(&crate::CRASH_POINTS);
        let Built { topology, stages, ports, outcomes, dead_letters, breakers, fraud: fraud_server } =
            build(config, sim, routing)?;
        let submitted_before = restore.map_or(0, |histories| restore_ports(histories, &ports, &outcomes));
        let mut builder = Engine::builder(topology).config(config).dead_letters(dead_letters.clone());
        if let Some(log) = &log {
            builder = builder.journal(Journal::new(Arc::clone(log), Arc::new(OrderCodec)));
        }
        let engine = builder.start()?;
        breakers.watch(&engine);
        Ok(Self {
            engine,
            breakers,
            fraud: fraud_server,
            stages,
            log,
            submitted_before,
            ports,
            outcomes,
            dead_letters,
            sim: sim.clone(),
            started: Instant::now(),
        })
    }

    /// Injects the next step of every in-flight order of `histories`; returns how many events
    /// went to each stage.
    pub fn resume(&self, histories: &Histories) -> Result<BTreeMap<String, u64>, SubmitError<Vec<OrderEvent>>> {
        let mut ids: Vec<&u64> = histories.orders.keys().collect();
        ids.sort_unstable();
        let resumed = self.resume_each(ids.into_iter().map(|id| (*id, &histories.orders[id])));
        conduit::crashpoint::hit("recover.resumed");
        resumed
    }

    /// Injects the next steps of each `(order id, history)`, front stages first.
    pub(crate) fn resume_each<'h>(
        &self,
        histories: impl IntoIterator<Item = (u64, &'h OrderHistory)>,
    ) -> Result<BTreeMap<String, u64>, SubmitError<Vec<OrderEvent>>> {
        let mut by_stage: BTreeMap<&'static str, Vec<Envelope<OrderEvent>>> = BTreeMap::new();
        for (id, history) in histories {
            for (stage, envelope) in history.resume_envelopes(id) {
                by_stage.entry(stage).or_default().push(envelope);
            }
        }
        let mut counts = BTreeMap::new();
        // Front to back, so nothing resumed downstream waits behind a full upstream queue.
        for (name, stage) in &self.stages {
            if let Some(events) = by_stage.remove(name) {
                counts.insert((*name).to_owned(), self.engine.inject_many(*stage, events)?);
            }
        }
        Ok(counts)
    }

    /// Counts a dead-lettered order as open again (it was redriven).
    pub(crate) fn reopen_dead_lettered(&self) {
        self.outcomes.reopen_dead_lettered();
    }

    /// Places one order, blocking while the entry queue is full.
    pub fn submit(&self, order: Order) -> Result<(), SubmitError<Order>> {
        self.engine.submit(place(order)).map_err(|e| e.map(|event| event.order))
    }

    /// Places one order if there is room now, never blocking; hands it back otherwise. With a
    /// log, the receipt settles once the order is durable and in the pipeline.
    pub fn try_submit(&self, order: Order) -> Result<Receipt<OrderEvent>, TrySubmitError<Order>> {
        self.engine.try_submit(place(order)).map_err(|e| e.map(|event| event.order))
    }

    /// Places many orders in batches, blocking while the entry queue is full.
    pub fn submit_many(&self, orders: impl IntoIterator<Item = Order>) -> Result<u64, SubmitError<Vec<OrderEvent>>> {
        self.engine.submit_many(orders.into_iter().map(place))
    }

    /// The engine underneath, for snapshots.
    pub fn engine(&self) -> &Engine<OrderEvent> {
        &self.engine
    }

    /// Orders that reached a terminal state so far.
    pub fn terminal(&self) -> u64 {
        self.outcomes.figures().terminal()
    }

    /// Drains the pipeline and reports.
    pub fn finish(self) -> RunReport {
        let report = self.engine.shutdown();
        let fraud_check = self.fraud.as_ref().map(|server| server.stats());
        let breakers = self.breakers.report();
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let outcomes = self.outcomes.figures();
        let snapshot = report.snapshot;
        let submitted = self.submitted_before + snapshot.submitted;
        // Every submitted message is an event, and so is every event a stage finished.
        let events_total = snapshot.submitted + snapshot.events_processed();
        let log = self.log.as_ref().map(|log| LogReport {
            path: log.path().display().to_string(),
            durability: log.options().durability,
            stats: log.stats(),
            sync_error: report.log_sync.clone().and_then(Result::err).map(|e| e.to_string()),
            other_records: 0,
        });
        let per_sec = |n: u64| if elapsed_s > 0.0 { n as f64 / elapsed_s } else { 0.0 };
        let ledger = self.ports.gateway.ledger();
        let dead_letter_count = self.dead_letters.letters.lock().len() as u64;
        let notifications = self.ports.notifier.figures();
        RunReport {
            seed: self.sim.seed,
            orders: OrderCounts {
                submitted,
                confirmed: outcomes.confirmed,
                cancelled: outcomes.cancelled(),
                cancelled_out_of_stock: outcomes.cancelled_out_of_stock,
                cancelled_declined: outcomes.cancelled_declined,
                dead_lettered: outcomes.dead_lettered,
                in_flight: submitted.saturating_sub(outcomes.terminal()),
                poisoned: None,
            },
            events: EventCounts { total: events_total, per_sec: per_sec(events_total) },
            retries: RetryReport {
                total: snapshot.stages.iter().map(|s| s.retried).sum(),
                deferred: snapshot.stages.iter().map(|s| s.deferred).sum(),
                by_stage: snapshot.stages.iter().map(|s| (s.name.clone(), s.retried)).collect(),
            },
            orders_per_sec: per_sec(snapshot.submitted),
            elapsed_s,
            stages: snapshot.stages,
            ledger: LedgerReport::new(ledger, outcomes.confirmed_total_cents),
            stock: StockReport::new(self.ports.inventory.figures(), outcomes.confirmed_units),
            notifications,
            dead_letters: DeadLetterReport {
                total: dead_letter_count,
                by_stage: self.dead_letters.count_by(|letter| &letter.stage),
                by_reason: self.dead_letters.count_by(|letter| &letter.kind),
                compensation_failures: self
                    .dead_letters
                    .compensation_failures
                    .load(std::sync::atomic::Ordering::Relaxed),
            },
            poisoned: snapshot.poisoned,
            log,
            ack_latency_us: snapshot.ack_latency_us,
            fraud_check,
            breakers,
        }
    }

    /// The dead letters so far.
    pub fn dead_letters(&self) -> Vec<super::stages::OrderDeadLetter> {
        self.dead_letters.letters.lock().clone()
    }

    /// Drains the pipeline and reports, with every dead letter of the run.
    pub fn finish_with_dead_letters(self) -> (RunReport, Vec<super::stages::OrderDeadLetter>) {
        let letters = Arc::clone(&self.dead_letters);
        let report = self.finish();
        let letters = std::mem::take(&mut *letters.letters.lock());
        (report, letters)
    }
}

fn place(order: Order) -> OrderEvent {
    OrderEvent::place(order)
}

/// Counts carried over from the log into the ports and outcomes; returns the orders placed.
pub(crate) fn restore_ports(histories: &Histories, ports: &Ports, outcomes: &Outcomes) -> u64 {
    let mut figures = OutcomeFigures::default();
    let mut placed = 0;
    for history in histories.orders.values() {
        let Some(order) = history.order else { continue };
        placed += 1;
        let generation = history.generation;
        ports.gateway.restore_refunded_charges(&order, history.past_charges);
        ports.inventory.restore_released_reservations(&order, history.past_reservations);
        if history.charged() {
            ports.gateway.restore_charge(&order, generation, history.compensated());
        }
        if history.reserved() {
            ports.inventory.restore_reservation(&order, generation, history.compensated());
        }
        if history.counts[usize::from(super::domain::kinds::EMAILED)] > 0 {
            ports.notifier.restore_sent(Channel::Email, order.id, generation);
        }
        if history.counts[usize::from(super::domain::kinds::TEXTED)] > 0 {
            ports.notifier.restore_sent(Channel::Sms, order.id, generation);
        }
        if history.counts[usize::from(super::domain::kinds::SHIPPED)] > 0 {
            ports.carrier.restore_shipped(order.id, generation);
        }
        match history.status() {
            OrderStatus::Confirmed => {
                figures.confirmed += 1;
                figures.confirmed_total_cents += order.amount_cents;
                figures.confirmed_units += u64::from(order.quantity);
            }
            OrderStatus::Cancelled => match history.cancel_reason {
                Some(super::domain::CancelReason::PaymentDeclined) => figures.cancelled_declined += 1,
                _ => figures.cancelled_out_of_stock += 1,
            },
            OrderStatus::DeadLettered => figures.dead_lettered += 1,
            OrderStatus::InFlight => {}
        }
    }
    outcomes.restore(&figures);
    placed
}

/// Orders submitted in one go by [`run`]; bounds the memory of the generator's buffer.
const SUBMIT_CHUNK: usize = 4_096;

/// Generates `orders` seeded orders, pushes them through a new pipeline (journaled to `log` if
/// given), drains it and reports. `progress` is called after each chunk with the orders
/// submitted and finished so far.
pub fn run(
    config: &EngineConfig,
    sim: &SimConfig,
    orders: u64,
    log: Option<Arc<Log>>,
    progress: impl FnMut(u64, u64),
) -> Result<RunReport, RunError> {
    run_routed(config, sim, &OrderRouting::default(), orders, log, progress)
}

/// [`run`] with the stages bound as `routing` says.
pub fn run_routed(
    config: &EngineConfig,
    sim: &SimConfig,
    routing: &OrderRouting,
    orders: u64,
    log: Option<Arc<Log>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<RunReport, RunError> {
    if let Some(log) = &log {
        let held = log.opened_with().records;
        if held > 0 {
            return Err(RunError::LogNotEmpty { path: log.path().display().to_string(), records: held });
        }
    }
    let pipeline = OrderPipeline::start_routed(config, sim, routing, log, None)?;
    let mut workload = Workload::new(sim.seed, sim.skus, sim.customers).poisoned(sim.poison_rate);
    let mut chunk = Vec::with_capacity(SUBMIT_CHUNK);
    let mut submitted = 0u64;
    while submitted < orders {
        let take = usize::try_from(orders - submitted).unwrap_or(usize::MAX).min(SUBMIT_CHUNK);
        chunk.extend(workload.by_ref().take(take));
        match pipeline.submit_many(chunk.drain(..)) {
            Ok(count) => submitted += count,
            Err(error) => {
                let unsent = error.into_inner().len();
                let report = pipeline.finish();
                return Err(RunError::Poisoned { unsent, report: Box::new(report) });
            }
        }
        progress(submitted, pipeline.terminal());
    }
    let mut report = pipeline.finish();
    report.orders.poisoned = Some(workload.poisoned_count());
    Ok(report)
}

/// What [`recover`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    /// Orders found in the log.
    pub orders_found: u64,
    /// Events injected to resume in-flight orders, by stage.
    pub resumed: BTreeMap<String, u64>,
    /// The recovery run; its counts and ledger cover every order in the log.
    pub run: RunReport,
    /// The log verified after recovery.
    pub verify: VerifyReport,
}

/// Reopens a log's orders: rebuilds each from its records (frames decoded in parallel), carries
/// the ports' books over, resumes every in-flight order at its next step, drains, and verifies
/// the log again. Idempotency keys make a resumed step that already happened a no-op, so no
/// order is charged twice.
pub fn recover(config: &EngineConfig, sim: &SimConfig, log: &Arc<Log>) -> Result<RecoverReport, RunError> {
    let histories = Histories::read(log)?;
    let pipeline = OrderPipeline::start_with(config, sim, Some(Arc::clone(log)), Some(&histories))?;
    let resumed = match pipeline.resume(&histories) {
        Ok(resumed) => resumed,
        Err(error) => {
            let unsent = error.into_inner().len();
            return Err(RunError::Poisoned { unsent, report: Box::new(pipeline.finish()) });
        }
    };
    let run = pipeline.finish();
    let verify = Histories::read(log)?.verify();
    Ok(RecoverReport { orders_found: histories.orders.len() as u64, resumed, run, verify })
}

/// Reads and checks a log: frame checksums and archives, contiguous versions, every order's
/// history, every order terminal or resumable, the ledger.
pub fn verify(log: &Log) -> Result<VerifyReport, LogError> {
    Ok(Histories::read(log)?.verify())
}

/// A run that could not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The pipeline could not start.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// `run` refuses a log that already holds orders: their ids would collide.
    #[error("{path} already holds {records} events; use `conduit recover` on it, or a new path")]
    LogNotEmpty {
        /// The log.
        path: String,
        /// Records in it.
        records: u64,
    },
    /// A worker died mid-run; the report shows what was done.
    #[error("the engine was poisoned with {unsent} orders not submitted: {}", report.poisoned.as_deref().unwrap_or("unknown cause"))]
    Poisoned {
        /// Orders not submitted.
        unsent: usize,
        /// What the pipeline did before it stopped.
        report: Box<RunReport>,
    },
}

/// Orders by where they ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OrderCounts {
    /// Accepted by the pipeline.
    pub submitted: u64,
    /// Charged, reserved and shipped.
    pub confirmed: u64,
    /// Cancelled, with compensation applied.
    pub cancelled: u64,
    /// Of the cancelled: for lack of stock.
    pub cancelled_out_of_stock: u64,
    /// Of the cancelled: payment declined.
    pub cancelled_declined: u64,
    /// Given up on, with compensation applied.
    pub dead_lettered: u64,
    /// Not yet terminal (0 after a drained run).
    pub in_flight: u64,
    /// Orders generated with a malformed payload (`simulation.poison_rate`), when this run
    /// generated the orders; each must end in the dead letters as `malformed`.
    pub poisoned: Option<u64>,
}

/// Retries over all stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryReport {
    /// Attempts that ended in a retry (transient failures, conflicts, panics).
    pub total: u64,
    /// Times work waited for an open circuit breaker (attempts not spent).
    pub deferred: u64,
    /// Retries per stage.
    pub by_stage: BTreeMap<String, u64>,
}

/// Events handled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EventCounts {
    /// Events finished by all stages together.
    pub total: u64,
    /// `total / elapsed_s`.
    pub per_sec: f64,
}

/// The payment ledger against the confirmed orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LedgerReport {
    /// Sum of every charge.
    pub charged_cents: u64,
    /// Sum of every refund.
    pub refunded_cents: u64,
    /// What the confirmed orders cost.
    pub confirmed_total_cents: u64,
    /// Orders charged more than once.
    pub double_charges: u64,
    /// Repeated requests answered without a second effect.
    pub idempotent_replays: u64,
    /// Charge attempts that timed out.
    pub timeouts: u64,
    /// `charged - refunded == confirmed_total` and no double charge.
    pub balanced: bool,
}

impl LedgerReport {
    fn new(ledger: LedgerFigures, confirmed_total_cents: u64) -> Self {
        let balanced = ledger.double_charges == 0
            && ledger.charged_cents.checked_sub(ledger.refunded_cents) == Some(confirmed_total_cents);
        Self {
            charged_cents: ledger.charged_cents,
            refunded_cents: ledger.refunded_cents,
            confirmed_total_cents,
            double_charges: ledger.double_charges,
            idempotent_replays: ledger.idempotent_replays,
            timeouts: ledger.timeouts,
            balanced,
        }
    }
}

/// Stock movements against the confirmed orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StockReport {
    /// Units reserved.
    pub reserved_units: u64,
    /// Units released by compensation.
    pub released_units: u64,
    /// Units in confirmed orders.
    pub confirmed_units: u64,
    /// `reserved - released == confirmed`.
    pub balanced: bool,
}

impl StockReport {
    fn new(stock: StockFigures, confirmed_units: u64) -> Self {
        Self {
            reserved_units: stock.reserved_units,
            released_units: stock.released_units,
            confirmed_units,
            balanced: stock.reserved_units.checked_sub(stock.released_units) == Some(confirmed_units),
        }
    }
}

/// Dead letters by stage and by reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterReport {
    /// All dead letters, notifications included.
    pub total: u64,
    /// Count per stage.
    pub by_stage: BTreeMap<String, u64>,
    /// Count per reason (`retries_exhausted`, `malformed`, `expired`, ...).
    pub by_reason: BTreeMap<String, u64>,
    /// Dead-lettered orders whose compensation failed.
    pub compensation_failures: u64,
}

/// Everything `conduit run` reports; `--format json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The seed of the workload and faults.
    pub seed: u64,
    /// Orders by where they ended.
    pub orders: OrderCounts,
    /// Events handled.
    pub events: EventCounts,
    /// Retries.
    pub retries: RetryReport,
    /// Orders submitted per second of the whole run.
    pub orders_per_sec: f64,
    /// Seconds from start to fully drained.
    pub elapsed_s: f64,
    /// Per-stage figures.
    pub stages: Vec<conduit::StageSnapshot>,
    /// The payment ledger.
    pub ledger: LedgerReport,
    /// Stock movements.
    pub stock: StockReport,
    /// Notifications sent.
    pub notifications: NotifyFigures,
    /// Dead letters.
    pub dead_letters: DeadLetterReport,
    /// Set if a worker died.
    pub poisoned: Option<String>,
    /// The log, when the run was journaled.
    pub log: Option<LogReport>,
    /// With a log: time from journaling a submitted batch to its commit.
    pub ack_latency_us: Option<LatencySummary>,
    /// With `simulation.fraud_check`: the request/reply traffic to the fraud service.
    pub fraud_check: Option<RpcStats>,
    /// Each port's circuit breaker: state at the end and times it opened.
    pub breakers: BTreeMap<String, BreakerReport>,
}

/// The log's part of a run report.
#[derive(Debug, Clone, Serialize)]
pub struct LogReport {
    /// The file.
    pub path: String,
    /// When commits were durable.
    pub durability: Durability,
    /// What the log wrote.
    #[serde(flatten)]
    pub stats: LogStats,
    /// Set when the final sync failed.
    pub sync_error: Option<String>,
    /// Records this run appended besides its events' (a redrive's records).
    pub other_records: u64,
}

impl RunReport {
    /// Every invariant the run must keep; empty when all hold.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        let mut violations = Vec::new();
        let o = &self.orders;
        if o.submitted != o.confirmed + o.cancelled + o.dead_lettered {
            violations.push(format!(
                "submitted {} != confirmed {} + cancelled {} + dead_lettered {}",
                o.submitted, o.confirmed, o.cancelled, o.dead_lettered
            ));
        }
        if o.in_flight != 0 {
            violations.push(format!("{} orders still in flight", o.in_flight));
        }
        if !self.ledger.balanced {
            violations.push(format!(
                "ledger unbalanced: charged {} - refunded {} != confirmed {} (double charges: {})",
                self.ledger.charged_cents,
                self.ledger.refunded_cents,
                self.ledger.confirmed_total_cents,
                self.ledger.double_charges
            ));
        }
        if !self.stock.balanced {
            violations.push(format!(
                "stock unbalanced: reserved {} - released {} != confirmed {}",
                self.stock.reserved_units, self.stock.released_units, self.stock.confirmed_units
            ));
        }
        if let Some(reason) = &self.poisoned {
            violations.push(format!("engine poisoned: {reason}"));
        }
        let malformed = self.dead_letters.by_reason.get("malformed").copied().unwrap_or(0);
        if let Some(poisoned) = self.orders.poisoned {
            if malformed != poisoned {
                violations.push(format!("{malformed} orders dead-lettered as malformed, but {poisoned} were poisoned"));
            }
        }
        if let Some(log) = &self.log {
            if log.stats.events_appended != self.events.total + log.other_records {
                violations.push(format!(
                    "log appended {} events but the pipeline handled {} (and {} other records were written)",
                    log.stats.events_appended, self.events.total, log.other_records
                ));
            }
            if let Some(error) = &log.sync_error {
                violations.push(format!("final log sync failed: {error}"));
            }
        }
        violations
    }
}
