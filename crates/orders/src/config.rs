//! The order application's configuration: the simulated world (`SimConfig`), routing keys and
//! bindings (`OrderRouting`), and the two files the CLI reads (`PipelineFile`, `TopologyFile`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::domain::OrderEvent;
use super::ports::Faults;
use super::stages::names;
use conduit::{BuildError, ConfigError, EngineConfig, EngineSettings, StageId, Topology};

/// How the order flow is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Each stage hands the order to the next through the topic exchange: payment, then
    /// inventory, then shipping and notifications; a compensation stage undoes a failure.
    #[default]
    Chain,
    /// The order's saga (`conduit::saga`): payment and inventory in parallel, then shipping,
    /// then notifications; a failed step has the completed ones compensated in reverse.
    Orchestrated,
    /// The same saga with no orchestrator: each service reacts to the others' events through the
    /// topic exchange (payment and inventory to the placed order, the carrier to both of their
    /// answers, the compensations to a cancellation).
    Choreography,
}

impl Flow {
    /// The flow's name, as `conduit run --saga` takes it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Chain => "chain",
            Self::Orchestrated => "orchestrated",
            Self::Choreography => "choreography",
        }
    }
}

impl std::str::FromStr for Flow {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "chain" => Ok(Self::Chain),
            "orchestrated" => Ok(Self::Orchestrated),
            "choreography" | "choreographed" => Ok(Self::Choreography),
            other => Err(format!("unknown flow {other:?}: expected chain, orchestrated or choreography")),
        }
    }
}

/// The simulated world: workload shape and how the ports misbehave. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// How the order flow is driven (the chain of stages, or the orchestrated saga).
    pub flow: Flow,
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
    /// Probability that a refund attempt fails transiently (1.0: no refund ever goes through, so
    /// a charge can never be undone: the failure path of compensation).
    pub refund_failure_rate: f64,
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
    /// Probability that the carrier fails a shipment (orchestrated flow only): half are refused
    /// (nothing shipped), half are shipped with the answer lost, so the step times out and the
    /// saga cancels the shipment it cannot see.
    pub shipping_failure_rate: f64,
    /// Time each carrier call takes, in microseconds.
    pub shipping_latency_us: u64,
    /// Longest a step of the order saga may take, retries included, in milliseconds (the saga
    /// flows; 0, the default: no limit). A step still unfinished then is dead-lettered as
    /// `expired` and counts as timed out: what it may have done is undone.
    pub saga_step_timeout_ms: u64,
    /// Most tries of a step of the order saga (the saga flows; 0, the default: the stage's own
    /// `attempts_max` alone): a transient failure after the last gives the step up, its event
    /// dead-lettered and the step counted as timed out, so what it may have done is undone.
    pub saga_step_attempts: u32,
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
    /// Most idempotency keys each simulated service remembers (its deduplication window by
    /// count): a repeated request is recognised while its key is among the latest this many.
    pub idempotency_window_keys: usize,
    /// Longest each simulated service remembers an idempotency key, in seconds (its window by
    /// time). A repeat arriving later is treated as a new request.
    pub idempotency_window_s: u64,
    /// Where the simulated payment provider keeps its own books (a file it writes before each
    /// answer, read back when a later run, recovery or redrive starts), so its charges outlive
    /// any crash of the pipeline. None: its books live in the pipeline's memory, and a
    /// recovery rebuilds them from the log. `conduit run --log L` uses `L.payments`.
    pub payment_books: Option<std::path::PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            flow: Flow::Chain,
            seed: 42,
            skus: 1_000,
            customers: 100_000,
            stock_per_sku: 1_000_000_000,
            out_of_stock_rate: 0.0,
            payment_failure_rate: 0.0,
            payment_decline_rate: 0.0,
            refund_failure_rate: 0.0,
            inventory_failure_rate: 0.0,
            notify_failure_rate: 0.0,
            payment_latency_us: 0,
            inventory_latency_us: 0,
            notify_latency_us: 0,
            shipping_failure_rate: 0.0,
            shipping_latency_us: 0,
            saga_step_timeout_ms: 0,
            saga_step_attempts: 0,
            fraud_check: false,
            fraud_deny_rate: 0.0,
            fraud_latency_us: 0,
            fraud_timeout_us: 50_000,
            breaker_failures: 0,
            breaker_open_ms: 50,
            poison_rate: 0.0,
            payment_timeout_rate: 0.0,
            payment_timeout_us: 0,
            idempotency_window_keys: 1 << 20,
            idempotency_window_s: 600,
            payment_books: None,
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
            ("shipping_failure_rate", self.shipping_failure_rate),
            ("refund_failure_rate", self.refund_failure_rate),
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
            ("shipping_latency_us", self.shipping_latency_us),
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
        if !(1..=1 << 28).contains(&self.idempotency_window_keys) {
            return Err(out_of_range("idempotency_window_keys", self.idempotency_window_keys as u64, 1, 1 << 28));
        }
        if self.saga_step_timeout_ms > 3_600_000 {
            return Err(out_of_range("saga_step_timeout_ms", self.saga_step_timeout_ms, 0, 3_600_000));
        }
        let most = u64::from(conduit::config::limits::ATTEMPTS_MAX);
        if u64::from(self.saga_step_attempts) > most {
            return Err(out_of_range("saga_step_attempts", u64::from(self.saga_step_attempts), 0, most));
        }
        if !(1..=7 * 86_400).contains(&self.idempotency_window_s) {
            return Err(out_of_range("idempotency_window_s", self.idempotency_window_s, 1, 7 * 86_400));
        }
        match self.flow {
            Flow::Chain if self.shipping_failure_rate > 0.0 => Err(ConfigError::Invalid(
                "simulation.shipping_failure_rate needs flow = \"orchestrated\" or \"choreography\": the chain ships \
                 every confirmed order and has no way to undo a failed shipment"
                    .into(),
            )),
            Flow::Orchestrated | Flow::Choreography if self.fraud_check => Err(ConfigError::Invalid(
                "simulation.fraud_check runs in the chain's payment stage: it needs flow = \"chain\"".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The payment gateway this world describes, its books in memory (see
    /// [`SimulatedGateway::with_books`](crate::ports::SimulatedGateway::with_books) for books
    /// of its own).
    #[must_use]
    pub fn payment_gateway(&self) -> crate::ports::SimulatedGateway {
        crate::ports::SimulatedGateway::new(
            self.faults(self.payment_failure_rate, self.payment_latency_us),
            self.payment_decline_rate,
        )
        .with_timeouts(self.payment_timeout_rate, Duration::from_micros(self.payment_timeout_us))
        .with_refund_failures(self.refund_failure_rate)
        .with_window(self.idempotency_window())
    }

    /// The stock this world describes: its SKUs, their units, those that start empty.
    #[must_use]
    pub fn inventory(&self) -> crate::ports::SimulatedInventory {
        crate::ports::SimulatedInventory::new(
            self.faults(self.inventory_failure_rate, self.inventory_latency_us),
            self.skus,
            self.stock_per_sku,
            self.empty_skus(),
        )
        .with_window(self.idempotency_window())
    }

    /// The email and SMS service this world describes.
    #[must_use]
    pub fn notifier(&self) -> crate::ports::SimulatedNotifier {
        crate::ports::SimulatedNotifier::new(self.faults(self.notify_failure_rate, self.notify_latency_us))
            .with_window(self.idempotency_window())
    }

    /// The carrier this world describes.
    #[must_use]
    pub fn carrier(&self) -> crate::ports::SimulatedCarrier {
        crate::ports::SimulatedCarrier::with_faults(
            self.idempotency_window(),
            self.faults(self.shipping_failure_rate, self.shipping_latency_us),
            self.skus,
        )
    }

    /// The simulated services' deduplication window.
    #[must_use]
    pub fn idempotency_window(&self) -> conduit::dedup::WindowLimits {
        conduit::dedup::WindowLimits {
            max_keys: self.idempotency_window_keys,
            max_age: Duration::from_secs(self.idempotency_window_s),
        }
    }

    /// The saga steps' most tries, if they are limited.
    pub(crate) fn saga_step_attempts(&self) -> Option<u32> {
        (self.saga_step_attempts > 0).then_some(self.saga_step_attempts)
    }

    /// The saga steps' time limit, if there is one.
    pub(crate) fn saga_step_timeout(&self) -> Option<Duration> {
        (self.saga_step_timeout_ms > 0).then(|| Duration::from_millis(self.saga_step_timeout_ms))
    }

    pub(crate) fn faults(&self, failure_rate: f64, latency_us: u64) -> Faults {
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
    pub(crate) fn apply(
        &self,
        topology: &mut Topology<OrderEvent>,
        stages: &[(&str, StageId)],
    ) -> Result<(), BuildError> {
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

    /// The file's text, as [`from_toml_str`](Self::from_toml_str) reads it.
    ///
    /// # Errors
    /// When a value has no TOML form (none of this file's values lacks one).
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse(e.to_string()))
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
    /// Alert thresholds (see [`conduit::AlertRules`]).
    pub alerts: conduit::AlertRules,
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
        self.alerts.validate()?;
        Ok((engine, self.simulation.clone()))
    }
}
