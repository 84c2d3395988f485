//! The choreographed order flow: the order's saga with no orchestrator.
//!
//! ```text
//!                      order.placed                payment.*, inventory.*
//! order --+--> payment ----------+
//!         |                      +--> shipping --+--> email, sms    shipping.shipped
//!         +--> inventory --------+               `--> compensation  order.cancelled
//! ```
//!
//! Each service reacts to the events it is bound to through the topic exchange and announces
//! its own: payment and inventory both answer the placed order (in parallel); the carrier waits
//! for both answers (its own table of orders half answered, one entry per order in between) and
//! ships once both succeeded, or announces the cancellation, naming what to undo; the
//! compensations answer the cancellation. No stage knows the whole saga, and no stage is told
//! what to do by another: the flow is the bindings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

use super::domain::{kinds, Announced, CancelCause, Cancellation, Effect, OrderEvent, Step};
use super::history::OrderHistory;
use super::ports::{InventoryStore, PaymentGateway, ShipError};
use super::saga::{fact_payload, journaled, order_saga, shape};
use super::stages::names;
use super::stages::{accept, give_up_after, try_charge, try_reserve, undo_in_sink, unexpected, Outcomes};
use super::wiring::Ports;
use crate::report::SagasReport;
use conduit::breaker::CircuitBreaker;
use conduit::routing::RouteId;
use conduit::saga::{Command, Fact, Outcome as StepOutcome, Saga, StepId};
use conduit::{BuildError, Emitter, Envelope, Handler, Outcome, StageId, Topology};

/// The routing keys of the choreographed flow.
pub(crate) mod keys {
    /// An order was accepted (payment and inventory listen).
    pub(crate) const PLACED: &str = "order.placed";
    /// The payment service's answers: `payment.charged`, `payment.declined`.
    pub(crate) const PAYMENT_ANSWERS: &str = "payment.*";
    /// The inventory's answers: `inventory.reserved`, `inventory.out_of_stock`.
    pub(crate) const INVENTORY_ANSWERS: &str = "inventory.*";
    /// The order shipped (the notifiers listen).
    pub(crate) const SHIPPED: &str = "shipping.shipped";
    /// The order is cancelled (the compensations listen).
    pub(crate) const CANCELLED: &str = "order.cancelled";
}

/// Shards of the carrier's table of half-answered orders (a power of two).
const SHARDS: usize = 64;

/// How a service answered, as the carrier records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Succeeded,
    Failed,
    /// The service's event was dead-lettered: whether it acted is unknown, so it is undone.
    Unknown,
}

/// The carrier's record of an order it has heard about from one of the two services.
#[derive(Debug, Clone, Copy, Default)]
struct Half {
    payment: Option<Answer>,
    inventory: Option<Answer>,
}

/// What the carrier decides once both services have answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ship,
    Cancel(Cancellation),
}

/// What the choreographed flow's services share: the ports, the carrier's table, the counts.
pub(crate) struct Choreography {
    ports: Ports,
    outcomes: Arc<Outcomes>,
    /// The saga its services play out: the steps' timeouts and retry policy.
    saga: Saga,
    halves: Box<[Mutex<FxHashMap<u64, Half>>]>,
    /// Orders one of whose services' events was dead-lettered: counted as dead-lettered when
    /// their cancellation completes. At most the orders in between.
    dead_lettered: Mutex<FxHashSet<u64>>,
    started: AtomicU64,
    refunds: AtomicU64,
    releases: AtomicU64,
    cancelled_shipments: AtomicU64,
}

/// The order saga's steps as the choreography's services journal them.
#[derive(Debug, Clone, Copy)]
struct Steps {
    charge: StepId,
    reserve: StepId,
    ship: StepId,
}

fn steps() -> Steps {
    static STEPS: std::sync::OnceLock<Steps> = std::sync::OnceLock::new();
    *STEPS.get_or_init(|| {
        let step = |name| shape().step(name).expect("a step of the order saga");
        Steps { charge: step("charge"), reserve: step("reserve"), ship: step("ship") }
    })
}

impl Answer {
    /// The answer a service's step recorded as `outcome` stands for.
    fn of(outcome: StepOutcome) -> Self {
        match outcome {
            StepOutcome::Succeeded => Self::Succeeded,
            StepOutcome::Failed => Self::Failed,
            StepOutcome::TimedOut => Self::Unknown,
        }
    }
}

/// What a cancellation undoes, as the saga's facts: the shipment, the reservation, the charge.
fn undone_facts(cancellation: Cancellation) -> Vec<Fact> {
    let Steps { charge, reserve, ship } = steps();
    [(cancellation.cancel_shipment, ship), (cancellation.release, reserve), (cancellation.refund, charge)]
        .into_iter()
        .filter_map(|(undone, step)| undone.then_some(Fact::Compensated(step)))
        .collect()
}

impl std::fmt::Debug for Choreography {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Choreography").field("half_answered", &self.half_answered()).finish_non_exhaustive()
    }
}

impl Choreography {
    pub(crate) fn new(ports: Ports, outcomes: Arc<Outcomes>, timeout: Option<Duration>, attempts: Option<u32>) -> Self {
        Self {
            ports,
            outcomes,
            saga: order_saga(timeout, attempts),
            halves: (0..SHARDS).map(|_| Mutex::new(FxHashMap::default())).collect(),
            dead_lettered: Mutex::new(FxHashSet::default()),
            started: AtomicU64::new(0),
            refunds: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            cancelled_shipments: AtomicU64::new(0),
        }
    }

    /// Takes order `id`'s saga up again after a restart from its history's facts, and returns
    /// the events that carry it on: the carrier's table gets back the answers recorded while the
    /// other is awaited (so the missing answer completes it); the services whose answer is
    /// missing run again (idempotently); a saga being undone gets its cancellation, naming what
    /// is left to undo. A saga that one of its services' dead letters led to ends counted as
    /// dead-lettered.
    pub(crate) fn take_up(&self, id: u64, history: &OrderHistory) -> Vec<(&'static str, OrderEvent)> {
        let (Some(order), Some(run), Some(facts)) = (history.order, history.saga_run(), history.saga.as_deref()) else {
            return Vec::new();
        };
        if run.end().is_some() {
            return Vec::new();
        }
        if history.dead_letter_stage.is_some() {
            self.dead_lettered.lock().insert(id);
        }
        let event = |step| OrderEvent { order, step, generation: history.generation };
        let owed = run.owed();
        let Steps { charge, reserve, ship } = steps();
        if owed.iter().any(|command| matches!(command, Command::Compensate(_))) {
            let undone = run.undone();
            let left = |step: StepId| run.completed().contains(&step) && !undone.contains(&step);
            let failed = run.failed();
            let failed_as = |step, outcome| facts.contains(&Fact::Finished(step, outcome));
            let cause = if failed_as(charge, StepOutcome::TimedOut) || failed_as(reserve, StepOutcome::TimedOut) {
                CancelCause::DeadLettered
            } else if failed.contains(&charge) {
                CancelCause::Declined
            } else if failed.contains(&reserve) {
                CancelCause::OutOfStock
            } else {
                CancelCause::Unshipped
            };
            let cancellation =
                Cancellation { refund: left(charge), release: left(reserve), cancel_shipment: left(ship), cause };
            return vec![(names::COMPENSATION, event(Step::Cancel(cancellation)))];
        }
        let answer = |step| {
            facts.iter().find_map(|fact| match *fact {
                Fact::Finished(finished, outcome) if finished == step => Some(Answer::of(outcome)),
                _ => None,
            })
        };
        let (paid, reserved) = (answer(charge), answer(reserve));
        let mut events = Vec::new();
        match (paid, reserved) {
            // Both answered well and the shipment is owed: the carrier hears the payment again
            // from its table and the reservation from an event, and ships.
            (Some(paid), Some(_)) => {
                self.hear(id, true, paid);
                events.push((names::SHIPPING, event(Step::Announce(Announced::Reserved))));
            }
            (Some(paid), None) => {
                self.hear(id, true, paid);
                events.push((names::INVENTORY, event(Step::Place)));
            }
            (None, Some(reserved)) => {
                self.hear(id, false, reserved);
                events.push((names::PAYMENT, event(Step::Place)));
            }
            (None, None) => {
                events.push((names::PAYMENT, event(Step::Place)));
                events.push((names::INVENTORY, event(Step::Place)));
            }
        }
        events
    }

    fn shard(&self, order: u64) -> &Mutex<FxHashMap<u64, Half>> {
        // Mixed: the shard's map hashes the same ids, and ids alike in their low bits would crowd it.
        let z = super::ports::mix64(order);
        &self.halves[usize::try_from(z % SHARDS as u64).unwrap_or(0)]
    }

    /// Records one service's answer; once both have answered, the order leaves the table and
    /// the verdict is returned. A repeated answer changes nothing.
    fn hear(&self, order: u64, from_payment: bool, answer: Answer) -> Option<Verdict> {
        let mut shard = self.shard(order).lock();
        let half = shard.entry(order).or_default();
        let slot = if from_payment { &mut half.payment } else { &mut half.inventory };
        slot.get_or_insert(answer);
        let (Some(payment), Some(inventory)) = (half.payment, half.inventory) else { return None };
        shard.remove(&order);
        drop(shard);
        if payment == Answer::Succeeded && inventory == Answer::Succeeded {
            return Some(Verdict::Ship);
        }
        let cause = if payment == Answer::Unknown || inventory == Answer::Unknown {
            CancelCause::DeadLettered
        } else if payment == Answer::Failed {
            CancelCause::Declined
        } else {
            CancelCause::OutOfStock
        };
        Some(Verdict::Cancel(Cancellation {
            refund: payment != Answer::Failed,
            release: inventory != Answer::Failed,
            cancel_shipment: false,
            cause,
        }))
    }

    /// Orders one service has answered and the other not yet.
    pub(crate) fn half_answered(&self) -> u64 {
        self.halves.iter().map(|shard| shard.lock().len() as u64).sum()
    }

    /// Undoes what `cancellation` names for `event`'s order, the last step first: the shipment,
    /// then the reservation and the charge (made side by side). Each undo is idempotent, so a
    /// retry after a failure repeats the ones done as no-ops.
    fn undo(&self, event: &OrderEvent, cancellation: Cancellation, attempt: u32) -> Result<(), conduit::Reason> {
        let order = &event.order;
        if cancellation.cancel_shipment && self.ports.carrier.cancel(event.key(Effect::Ship), order) {
            self.cancelled_shipments.fetch_add(1, Ordering::Relaxed);
        }
        if cancellation.release {
            self.ports.inventory.release(event.key(Effect::Release), order, attempt).map_err(|e| e.to_string())?;
        }
        if cancellation.refund {
            self.ports.gateway.refund(event.key(Effect::Refund), order, attempt).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Counts a cancelled order, once its undoing is done.
    fn count_cancelled(&self, order: u64, cancellation: Cancellation, out: Option<&Emitter<OrderEvent>>) {
        let o = &*self.outcomes;
        if cancellation.refund {
            self.refunds.fetch_add(1, Ordering::Relaxed);
        }
        if cancellation.release {
            self.releases.fetch_add(1, Ordering::Relaxed);
        }
        if self.dead_lettered.lock().remove(&order) || cancellation.cause == CancelCause::DeadLettered {
            o.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let counter = match cancellation.cause {
            CancelCause::Declined => &o.cancelled_declined,
            CancelCause::OutOfStock => &o.cancelled_out_of_stock,
            CancelCause::Unshipped | CancelCause::DeadLettered => &o.cancelled_unshipped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(out) = out {
            o.reached_terminal(order, out);
        }
    }

    /// A service's event was dead-lettered in the stage `from_payment` names (payment, or
    /// inventory; `None` for another stage). An answer that will never come is heard as unknown
    /// (undone: the service may have acted before it gave up); a cancellation whose compensations
    /// kept failing is tried a few more times here. Compensations owed here run here, as no stage
    /// will run them. `Err` says what could not be undone, if a compensation still fails.
    /// Each fact of what the dead letter led to (the service's step timed out, the things
    /// undone) is appended to `facts`, for the journal.
    pub(crate) fn dead_lettered(
        &self,
        event: &OrderEvent,
        from_payment: Option<bool>,
        facts: &mut Vec<(u16, Vec<u8>)>,
    ) -> Result<(), String> {
        let id = event.order.id;
        let cancellation = match (event.step, from_payment) {
            (Step::Place, Some(from_payment)) => {
                self.dead_lettered.lock().insert(id);
                let step = if from_payment { steps().charge } else { steps().reserve };
                facts.push(journaled(Fact::Finished(step, StepOutcome::TimedOut)));
                match self.hear(id, from_payment, Answer::Unknown) {
                    Some(Verdict::Cancel(cancellation)) => cancellation,
                    // The other answer is still to come: the carrier cancels the order then.
                    Some(Verdict::Ship) | None => return Ok(()),
                }
            }
            (Step::Cancel(cancellation), _) => cancellation,
            _ => return Ok(()),
        };
        if let Err(error) = undo_in_sink(|attempt| self.undo(event, cancellation, attempt)) {
            tracing::error!(order = id, "a compensation of a dead-lettered order failed");
            return Err(format!("undoing {cancellation:?} failed ({error})"));
        }
        facts.extend(undone_facts(cancellation).into_iter().map(journaled));
        self.count_cancelled(id, cancellation, None);
        Ok(())
    }

    /// The flow's figures in the shape of the orchestrated saga's.
    pub(crate) fn report(&self) -> SagasReport {
        let o = self.outcomes.figures();
        SagasReport {
            started: self.started.load(Ordering::Relaxed),
            completed: o.confirmed,
            compensated: o.cancelled() + o.dead_lettered,
            incomplete: 0,
            stuck: self.half_answered(),
            compensations: [
                ("charge".to_owned(), self.refunds.load(Ordering::Relaxed)),
                ("reserve".to_owned(), self.releases.load(Ordering::Relaxed)),
                ("ship".to_owned(), self.cancelled_shipments.load(Ordering::Relaxed)),
            ]
            .into_iter()
            .collect(),
            end_to_end_us: self.outcomes.terminal_latency().unwrap_or_default(),
        }
    }
}

/// The routes each service publishes.
#[derive(Debug, Clone, Copy)]
struct Routes {
    placed: RouteId,
    charged: RouteId,
    declined: RouteId,
    reserved: RouteId,
    out_of_stock: RouteId,
    shipped: RouteId,
    cancelled: RouteId,
}

/// Binds the services to each other's events and gives each its handler.
pub(crate) fn wire(
    topology: &mut Topology<OrderEvent>,
    flow: &Arc<Choreography>,
    breakers: (Option<Arc<CircuitBreaker>>, Option<Arc<CircuitBreaker>>),
    stages: [StageId; 5],
) -> Result<(), BuildError> {
    let [order, payment, inventory, shipping, compensation] = stages;
    let bind = |topology: &mut Topology<OrderEvent>, stage, pattern| {
        topology.bind(stage, pattern).map_err(|e| BuildError::Topology(e.to_string())).map(|_| ())
    };
    bind(topology, payment, keys::PLACED)?;
    bind(topology, inventory, keys::PLACED)?;
    bind(topology, shipping, keys::PAYMENT_ANSWERS)?;
    bind(topology, shipping, keys::INVENTORY_ANSWERS)?;
    bind(topology, compensation, keys::CANCELLED)?;
    let route = |topology: &mut Topology<OrderEvent>, from, key| {
        topology.publishes(from, key).map_err(|e| BuildError::Topology(e.to_string()))
    };
    let routes = Routes {
        placed: route(topology, order, keys::PLACED)?,
        charged: route(topology, payment, "payment.charged")?,
        declined: route(topology, payment, "payment.declined")?,
        reserved: route(topology, inventory, "inventory.reserved")?,
        out_of_stock: route(topology, inventory, "inventory.out_of_stock")?,
        shipped: route(topology, shipping, keys::SHIPPED)?,
        cancelled: route(topology, shipping, keys::CANCELLED)?,
    };
    topology.entry(order);
    let f = Arc::clone(flow);
    topology.handler(order, move |_| OrderService { flow: Arc::clone(&f), routes });
    let (f, breaker) = (Arc::clone(flow), breakers.0);
    topology.handler(payment, move |_| PaymentService { flow: Arc::clone(&f), routes, breaker: breaker.clone() });
    let (f, breaker) = (Arc::clone(flow), breakers.1);
    topology.handler(inventory, move |_| InventoryService { flow: Arc::clone(&f), routes, breaker: breaker.clone() });
    let f = Arc::clone(flow);
    topology.handler(shipping, move |_| CarrierService { flow: Arc::clone(&f), routes });
    let f = Arc::clone(flow);
    topology.handler(compensation, move |_| Compensations { flow: Arc::clone(&f) });
    Ok(())
}

/// Accepts an order and announces it placed.
struct OrderService {
    flow: Arc<Choreography>,
    routes: Routes,
}

impl Handler<OrderEvent> for OrderService {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if let Err(refused) = accept(event, out, kinds::SAGA_STARTED) {
            return refused;
        }
        self.flow.started.fetch_add(1, Ordering::Relaxed);
        // Payment and inventory answer within the steps' timeout, or are heard as unknown.
        let timeout = self.flow.saga.timeout_of(steps().charge);
        out.publish_within(self.routes.placed, event.msg, timeout.unwrap_or(Duration::MAX));
        Outcome::Done
    }
}

/// Charges a placed order and announces how it went.
struct PaymentService {
    flow: Arc<Choreography>,
    routes: Routes,
    breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for PaymentService {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Place {
            return unexpected(event);
        }
        let (route, announced, outcome) = match try_charge(&*self.flow.ports.gateway, self.breaker.as_deref(), event) {
            Ok(true) => (self.routes.charged, Announced::Charged, StepOutcome::Succeeded),
            Ok(false) => (self.routes.declined, Announced::Declined, StepOutcome::Failed),
            Err(now) => return give_up_after(&self.flow.saga, steps().charge, event, now),
        };
        out.record(kinds::SAGA, &fact_payload(Fact::Finished(steps().charge, outcome), event.attempt + 1));
        // An answer must reach the carrier, however late: it does not inherit the step's deadline.
        out.publish_within(route, event.msg.then(Step::Announce(announced)), Duration::MAX);
        Outcome::Done
    }
}

/// Reserves a placed order's units and announces how it went.
struct InventoryService {
    flow: Arc<Choreography>,
    routes: Routes,
    breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for InventoryService {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Place {
            return unexpected(event);
        }
        let (route, announced, outcome) = match try_reserve(&*self.flow.ports.inventory, self.breaker.as_deref(), event)
        {
            Ok(true) => (self.routes.reserved, Announced::Reserved, StepOutcome::Succeeded),
            Ok(false) => (self.routes.out_of_stock, Announced::OutOfStock, StepOutcome::Failed),
            Err(now) => return give_up_after(&self.flow.saga, steps().reserve, event, now),
        };
        out.record(kinds::SAGA, &fact_payload(Fact::Finished(steps().reserve, outcome), event.attempt + 1));
        // An answer must reach the carrier, however late: it does not inherit the step's deadline.
        out.publish_within(route, event.msg.then(Step::Announce(announced)), Duration::MAX);
        Outcome::Done
    }
}

/// The carrier: waits for both answers, then ships, or announces the cancellation.
struct CarrierService {
    flow: Arc<Choreography>,
    routes: Routes,
}

impl Handler<OrderEvent> for CarrierService {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        let Step::Announce(announced) = event.msg.step else { return unexpected(event) };
        let (from_payment, answer) = match announced {
            Announced::Charged => (true, Answer::Succeeded),
            Announced::Declined => (true, Answer::Failed),
            Announced::Reserved => (false, Answer::Succeeded),
            Announced::OutOfStock => (false, Answer::Failed),
        };
        let flow = &*self.flow;
        let order = &event.msg.order;
        let verdict = flow.hear(order.id, from_payment, answer);
        let ship = |outcome| fact_payload(Fact::Finished(steps().ship, outcome), event.attempt + 1);
        if verdict != Some(Verdict::Ship) {
            // The carrier records only the shipment it tries.
            flow.outcomes.journaled(0, 1);
        }
        let cancellation = match verdict {
            None => return Outcome::Done,
            Some(Verdict::Cancel(cancellation)) => cancellation,
            Some(Verdict::Ship) => match flow.ports.carrier.book(event.msg.key(Effect::Ship), order, event.attempt) {
                Ok(_) => {
                    out.record(kinds::SAGA, &ship(StepOutcome::Succeeded));
                    let o = &*flow.outcomes;
                    o.confirmed.fetch_add(1, Ordering::Relaxed);
                    o.confirmed_total_cents.fetch_add(order.amount_cents, Ordering::Relaxed);
                    o.confirmed_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
                    o.reached_terminal(order.id, out);
                    out.publish_within(self.routes.shipped, event.msg.then(Step::Notify), Duration::MAX);
                    return Outcome::Done;
                }
                Err(error) => {
                    let lost = error == ShipError::Lost;
                    out.record(kinds::SAGA, &ship(if lost { StepOutcome::TimedOut } else { StepOutcome::Failed }));
                    Cancellation { refund: true, release: true, cancel_shipment: lost, cause: CancelCause::Unshipped }
                }
            },
        };
        out.publish_within(self.routes.cancelled, event.msg.then(Step::Cancel(cancellation)), Duration::MAX);
        Outcome::Done
    }
}

/// The compensations: undo what a cancellation names; a failure is retried with backoff.
struct Compensations {
    flow: Arc<Choreography>,
}

impl Handler<OrderEvent> for Compensations {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        let Step::Cancel(cancellation) = event.msg.step else { return unexpected(event) };
        if let Err(reason) = self.flow.undo(&event.msg, cancellation, event.attempt) {
            return Outcome::Retry(reason);
        }
        let undone = undone_facts(cancellation);
        self.flow.outcomes.journaled(undone.len(), 1);
        for fact in undone {
            out.record(kinds::SAGA, &fact_payload(fact, event.attempt + 1));
        }
        self.flow.count_cancelled(event.msg.order.id, cancellation, Some(out));
        Outcome::Done
    }
}
