//! Wiring the order pipeline onto the engine: the simulated ports, their breakers, the stages
//! and their bindings.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::domain::{Order, OrderEvent};
use super::ports::{
    Channel, FraudVerdict, SimulatedCarrier, SimulatedFraudCheck, SimulatedGateway, SimulatedInventory,
    SimulatedNotifier,
};
use super::stages::{
    names, CompensationStage, InventoryStage, NotifyStage, OrderDeadLetters, OrderStage, Outcomes, PaymentStage,
    ShippingStage,
};
use crate::choreography::{self, Choreography};
use crate::saga::{
    SagaCompensationStage, SagaFlow, SagaInventoryStage, SagaOrderStage, SagaPaymentStage, SagaShippingStage, Targets,
};
use crate::{keys, Flow, OrderRouting, SimConfig};
use conduit::breaker::{BreakerConfig, BreakerReport, CircuitBreaker};
use conduit::rpc::RpcServer;
use conduit::{BuildError, Engine, EngineConfig, StageId, Topology};

/// The simulated ports, shared by the stages and read by the report.
#[derive(Debug, Clone)]
pub(crate) struct Ports {
    pub(crate) gateway: Arc<SimulatedGateway>,
    /// The gateway is a provider that outlives this pipeline (its own books): nothing of it is
    /// rebuilt from the log.
    pub(crate) external_gateway: bool,
    pub(crate) inventory: Arc<SimulatedInventory>,
    pub(crate) notifier: Arc<SimulatedNotifier>,
    pub(crate) carrier: Arc<SimulatedCarrier>,
}

impl Ports {
    fn new(sim: &SimConfig, provider: Option<Arc<SimulatedGateway>>) -> Self {
        let external_gateway = provider.is_some();
        Self {
            gateway: provider.unwrap_or_else(|| Arc::new(sim.payment_gateway())),
            external_gateway,
            inventory: Arc::new(sim.inventory()),
            notifier: Arc::new(sim.notifier()),
            carrier: Arc::new(sim.carrier()),
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
pub(crate) struct Breakers {
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
    pub(crate) fn watch(&self, engine: &Engine<OrderEvent>) {
        for (port, breaker) in
            [("payment", &self.payment), ("inventory", &self.inventory), ("email", &self.email), ("sms", &self.sms)]
        {
            if let Some(breaker) = breaker {
                engine.watch_breaker(port, Arc::clone(breaker));
            }
        }
    }

    pub(crate) fn report(&self) -> BTreeMap<String, BreakerReport> {
        [("payment", &self.payment), ("inventory", &self.inventory), ("email", &self.email), ("sms", &self.sms)]
            .into_iter()
            .filter_map(|(port, breaker)| breaker.as_ref().map(|b| (port.to_owned(), b.report())))
            .collect()
    }
}

/// A fraud service and how long to wait for its verdict.
type FraudService = (Arc<RpcServer<Order, FraudVerdict>>, Duration);

/// Builds the order pipeline's topology and everything its handlers share, without starting it.
/// With a `provider`, the payment stage and compensation call it instead of a gateway of their own.
pub(crate) fn build(
    config: &EngineConfig,
    sim: &SimConfig,
    routing: &OrderRouting,
    provider: Option<Arc<SimulatedGateway>>,
) -> Result<Built, BuildError> {
    sim.validate()?;
    let ports = Ports::new(sim, provider);
    let outcomes = Arc::new(Outcomes::default());
    let mut topology = Topology::new();
    // Declared in `names::ALL`'s order: a stage's index there is its index in journal records.
    let stages: Vec<(&'static str, StageId)> = names::ALL.iter().map(|&name| (name, topology.stage(name))).collect();
    let [order, payment, inventory, email, sms, shipping, compensation]: [StageId; 7] =
        std::array::from_fn(|i| stages[i].1);
    let breakers = Breakers::new(sim);
    let saga = (sim.flow == Flow::Orchestrated).then(|| {
        let targets = Targets { payment, inventory, shipping, compensation, email, sms };
        Arc::new(SagaFlow::new(
            targets,
            ports.clone(),
            Arc::clone(&outcomes),
            sim.saga_step_timeout(),
            sim.saga_step_attempts(),
        ))
    });
    let choreography = (sim.flow == Flow::Choreography).then(|| {
        Arc::new(Choreography::new(
            ports.clone(),
            Arc::clone(&outcomes),
            sim.saga_step_timeout(),
            sim.saga_step_attempts(),
        ))
    });
    let dead_letters = Arc::new(OrderDeadLetters {
        inventory: ports.inventory.clone(),
        gateway: ports.gateway.clone(),
        outcomes: Arc::clone(&outcomes),
        letters: Mutex::new(Vec::new()),
        compensation_failures: AtomicU64::new(0),
        saga: saga.clone(),
        choreography: choreography.clone(),
    });
    let fraud = if sim.flow == Flow::Chain {
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
        let fraud = Ports::fraud(sim, config.stage(names::PAYMENT).workers.max)?;
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
        wire_notifiers(&mut topology, &ports, &breakers, email, sms);
        let (carrier, shipped) = (Arc::clone(&ports.carrier), Arc::clone(&outcomes));
        topology.handler(shipping, move |_| ShippingStage { carrier: carrier.clone(), outcomes: shipped.clone() });
        let (store, gateway, cancelled) = (ports.inventory.clone(), ports.gateway.clone(), Arc::clone(&outcomes));
        topology.handler(compensation, move |_| CompensationStage {
            inventory: store.clone(),
            gateway: gateway.clone(),
            outcomes: Arc::clone(&cancelled),
        });
        fraud_server
    } else {
        if *routing != OrderRouting::default() {
            return Err(BuildError::Config(conduit::ConfigError::Invalid(format!(
                "a topology file's bindings route the chain: the {} flow lays out its own",
                sim.flow.name()
            ))));
        }
        let ids = [order, payment, inventory, shipping, compensation, email, sms];
        wire_saga_flow(&mut topology, saga.as_ref(), choreography.as_ref(), &ports, &breakers, ids)?;
        None
    };
    Ok(Built { topology, stages, ports, outcomes, dead_letters, breakers, fraud, saga, choreography })
}

/// Wires the orchestrated or the choreographed flow; `stages` are the order, payment, inventory,
/// shipping, compensation, email and SMS stages.
fn wire_saga_flow(
    topology: &mut Topology<OrderEvent>,
    saga: Option<&Arc<SagaFlow>>,
    choreography: Option<&Arc<Choreography>>,
    ports: &Ports,
    breakers: &Breakers,
    stages: [StageId; 7],
) -> Result<(), BuildError> {
    let [order, payment, inventory, shipping, compensation, email, sms] = stages;
    if let Some(flow) = saga {
        wire_orchestrated(topology, flow, breakers, order);
    }
    if let Some(flow) = choreography {
        let services = [order, payment, inventory, shipping, compensation];
        choreography::wire(topology, flow, (breakers.payment.clone(), breakers.inventory.clone()), services)?;
        for stage in [email, sms] {
            topology.bind(stage, choreography::keys::SHIPPED).map_err(|e| BuildError::Topology(e.to_string()))?;
        }
    }
    wire_notifiers(topology, ports, breakers, email, sms);
    Ok(())
}

/// Lays the orchestrated flow's stages out in the saga's order (see [`crate::saga`]).
fn wire_orchestrated(topology: &mut Topology<OrderEvent>, flow: &Arc<SagaFlow>, breakers: &Breakers, order: StageId) {
    let Targets { payment, inventory, shipping, compensation, email, sms } = *flow.targets();
    topology.entry(order);
    for (from, to) in [
        (order, payment),
        (order, inventory),
        (payment, shipping),
        (payment, compensation),
        (inventory, shipping),
        (inventory, compensation),
        (shipping, compensation),
        (shipping, email),
        (shipping, sms),
    ] {
        topology.link(from, to);
    }
    let handler = |flow: &Arc<SagaFlow>| Arc::clone(flow);
    let f = handler(flow);
    topology.handler(order, move |_| SagaOrderStage { flow: Arc::clone(&f) });
    let (f, breaker) = (handler(flow), breakers.payment.clone());
    topology.handler(payment, move |_| SagaPaymentStage { flow: Arc::clone(&f), breaker: breaker.clone() });
    let (f, breaker) = (handler(flow), breakers.inventory.clone());
    topology.handler(inventory, move |_| SagaInventoryStage { flow: Arc::clone(&f), breaker: breaker.clone() });
    let f = handler(flow);
    topology.handler(shipping, move |_| SagaShippingStage { flow: Arc::clone(&f) });
    let f = handler(flow);
    topology.handler(compensation, move |_| SagaCompensationStage { flow: Arc::clone(&f) });
}

/// The email and SMS stages, in every flow.
fn wire_notifiers(
    topology: &mut Topology<OrderEvent>,
    ports: &Ports,
    breakers: &Breakers,
    email: StageId,
    sms: StageId,
) {
    for (stage, channel, breaker) in
        [(email, Channel::Email, breakers.email.clone()), (sms, Channel::Sms, breakers.sms.clone())]
    {
        let notifier = ports.notifier.clone();
        topology.handler(stage, move |_| NotifyStage { channel, notifier: notifier.clone(), breaker: breaker.clone() });
    }
}

/// The order pipeline, built and not started.
pub(crate) struct Built {
    pub(crate) topology: Topology<OrderEvent>,
    pub(crate) stages: Vec<(&'static str, StageId)>,
    pub(crate) ports: Ports,
    pub(crate) outcomes: Arc<Outcomes>,
    pub(crate) dead_letters: Arc<OrderDeadLetters>,
    pub(crate) breakers: Breakers,
    pub(crate) fraud: Option<Arc<RpcServer<Order, FraudVerdict>>>,
    /// The orchestrated flow's shared state, when the flow is orchestrated.
    pub(crate) saga: Option<Arc<SagaFlow>>,
    /// The choreographed flow's shared state, when the flow is choreographed.
    pub(crate) choreography: Option<Arc<Choreography>>,
}
