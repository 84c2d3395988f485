//! The handlers of the order pipeline's stages, and what happens to an order's dead letter.
//!
//! ```text
//! order --> payment --> inventory --+--> email
//!              |            |       +--> sms
//!              |            |       `--> shipping            (confirmed)
//!              `------------+----------> compensation        (cancelled: release, refund)
//! dead letter of an order-path stage --> compensate, count   (dead-lettered)
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use super::domain::{kinds, CancelReason, Effect, Order, OrderEvent, Step};
use super::ports::{
    Channel, FraudVerdict, InventoryError, InventoryStore, Notifier, PaymentError, PaymentGateway, SimulatedCarrier,
};
use conduit::breaker::CircuitBreaker;
use conduit::routing::RouteId;
use conduit::rpc::RpcServer;
use conduit::saga::{Saga, StepId};
use conduit::{DeadLetter, DeadLetterSink, Emitter, Envelope, Handler, Outcome};

/// Stage names, as they appear in configuration and reports.
pub mod names {
    /// Every stage, in declaration order: a stage's index here is its `stage` in journal records.
    pub const ALL: [&str; 7] = [ORDER, PAYMENT, INVENTORY, EMAIL, SMS, SHIPPING, COMPENSATION];

    /// The journal index of the stage named `name`.
    #[must_use]
    pub fn index_of(name: &str) -> Option<u16> {
        ALL.iter().position(|&n| n == name).and_then(|i| u16::try_from(i).ok())
    }

    /// The name of the stage with journal index `index`.
    #[must_use]
    pub fn of_index(index: u16) -> &'static str {
        ALL.get(usize::from(index)).copied().unwrap_or(if index == conduit::log::STAGE_INGRESS {
            "ingress"
        } else {
            "?"
        })
    }

    /// Validates new orders.
    pub const ORDER: &str = "order";
    /// Charges the customer.
    pub const PAYMENT: &str = "payment";
    /// Reserves stock.
    pub const INVENTORY: &str = "inventory";
    /// Sends the confirmation email.
    pub const EMAIL: &str = "email";
    /// Sends the confirmation SMS.
    pub const SMS: &str = "sms";
    /// Ships; the order is confirmed.
    pub const SHIPPING: &str = "shipping";
    /// Undoes side effects in reverse; the order is cancelled.
    pub const COMPENSATION: &str = "compensation";
}

/// Orders whose time from acceptance to their terminal state is measured: one in this many (by
/// id, which says nothing of how an order fares), so the chain pays for a clock reading and a
/// histogram update on an eighth of its orders only.
pub(crate) const TERMINAL_SAMPLE: u64 = 8;

/// Where every order ended, counted once each.
#[derive(Debug)]
pub struct Outcomes {
    pub(crate) confirmed: AtomicU64,
    pub(crate) confirmed_total_cents: AtomicU64,
    pub(crate) confirmed_units: AtomicU64,
    pub(crate) cancelled_out_of_stock: AtomicU64,
    pub(crate) cancelled_declined: AtomicU64,
    pub(crate) cancelled_unshipped: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    /// Accepted to confirmed or cancelled, in ns, of the sampled orders ([`TERMINAL_SAMPLE`]).
    terminal_ns: Mutex<hdrhistogram::Histogram<u64>>,
    /// Records the saga flows journaled beyond one per event handled: a compensation records
    /// each thing it undid (none when nothing was owed), the choreography's carrier only the
    /// shipment it tried, a dead letter also what its sink did. The run's check of the log
    /// counts them.
    records_beyond_events: std::sync::atomic::AtomicI64,
}

impl Default for Outcomes {
    fn default() -> Self {
        Self {
            confirmed: AtomicU64::new(0),
            confirmed_total_cents: AtomicU64::new(0),
            confirmed_units: AtomicU64::new(0),
            cancelled_out_of_stock: AtomicU64::new(0),
            cancelled_declined: AtomicU64::new(0),
            cancelled_unshipped: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            // Microsecond resolution to an hour: the histogram never needs to grow.
            terminal_ns: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1_000, 3_600_000_000_000, 3).expect("valid bounds"),
            ),
            records_beyond_events: std::sync::atomic::AtomicI64::new(0),
        }
    }
}

/// A copy of [`Outcomes`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OutcomeFigures {
    /// Orders shipped.
    pub confirmed: u64,
    /// What the confirmed orders cost their customers.
    pub confirmed_total_cents: u64,
    /// Units in the confirmed orders.
    pub confirmed_units: u64,
    /// Orders cancelled because the SKU ran out.
    pub cancelled_out_of_stock: u64,
    /// Orders cancelled because the payment was declined.
    pub cancelled_declined: u64,
    /// Orders cancelled because the carrier failed the shipment (orchestrated flow).
    pub cancelled_unshipped: u64,
    /// Orders that ended in the dead letters (after compensation).
    pub dead_lettered: u64,
}

impl OutcomeFigures {
    /// Orders cancelled, for any reason.
    #[must_use]
    pub fn cancelled(&self) -> u64 {
        self.cancelled_out_of_stock + self.cancelled_declined + self.cancelled_unshipped
    }

    /// Orders in a terminal state.
    #[must_use]
    pub fn terminal(&self) -> u64 {
        self.confirmed + self.cancelled() + self.dead_lettered
    }
}

impl Outcomes {
    /// A handler (or the dead-letter sink) journaled `records` saga facts for `events` events.
    pub(crate) fn journaled(&self, records: usize, events: usize) {
        let signed = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.records_beyond_events.fetch_add(signed(records) - signed(events), Ordering::Relaxed);
    }

    /// Records journaled beyond one per event handled (see [`Outcomes::journaled`]).
    pub(crate) fn records_beyond_events(&self) -> i64 {
        self.records_beyond_events.load(Ordering::Relaxed)
    }

    /// Adds counts carried over from an earlier run (recovery).
    pub(crate) fn restore(&self, f: &OutcomeFigures) {
        self.confirmed.fetch_add(f.confirmed, Ordering::Relaxed);
        self.confirmed_total_cents.fetch_add(f.confirmed_total_cents, Ordering::Relaxed);
        self.confirmed_units.fetch_add(f.confirmed_units, Ordering::Relaxed);
        self.cancelled_out_of_stock.fetch_add(f.cancelled_out_of_stock, Ordering::Relaxed);
        self.cancelled_declined.fetch_add(f.cancelled_declined, Ordering::Relaxed);
        self.cancelled_unshipped.fetch_add(f.cancelled_unshipped, Ordering::Relaxed);
        self.dead_lettered.fetch_add(f.dead_lettered, Ordering::Relaxed);
    }

    /// Takes back one dead-lettered order: it was redriven and runs again.
    pub(crate) fn reopen_dead_lettered(&self) {
        self.dead_lettered.fetch_sub(1, Ordering::Relaxed);
    }

    /// Notes that `order` reached its terminal state (confirmed or cancelled) in the handler
    /// `out` belongs to, if it is a sampled order and the engine knows when it was accepted.
    pub(crate) fn reached_terminal(&self, order: u64, out: &Emitter<OrderEvent>) {
        if order % TERMINAL_SAMPLE != 0 {
            return;
        }
        if let Some(age) = out.since_accepted() {
            let ns = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
            self.terminal_ns.lock().saturating_record(ns.max(1_000));
        }
    }

    /// Accepted to confirmed or cancelled, of the sampled orders; `None` if none was measured.
    pub fn terminal_latency(&self) -> Option<conduit::LatencySummary> {
        let histogram = self.terminal_ns.lock();
        (!histogram.is_empty()).then(|| conduit::LatencySummary::from_histogram(&histogram))
    }

    /// The counts now.
    pub fn figures(&self) -> OutcomeFigures {
        OutcomeFigures {
            confirmed: self.confirmed.load(Ordering::Relaxed),
            confirmed_total_cents: self.confirmed_total_cents.load(Ordering::Relaxed),
            confirmed_units: self.confirmed_units.load(Ordering::Relaxed),
            cancelled_out_of_stock: self.cancelled_out_of_stock.load(Ordering::Relaxed),
            cancelled_declined: self.cancelled_declined.load(Ordering::Relaxed),
            cancelled_unshipped: self.cancelled_unshipped.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

/// Order stage: checks a new order and asks for payment.
#[derive(Debug)]
pub(crate) struct OrderStage {
    /// `order.payment.process`.
    pub(crate) accepted: RouteId,
}

impl Handler<OrderEvent> for OrderStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if let Err(refused) = accept(event, out, kinds::ACCEPTED) {
            return refused;
        }
        out.publish(self.accepted, event.msg.then(Step::Charge));
        Outcome::Done
    }
}

/// Checks a new order and records it accepted as `kind` (the order stage's work in every flow);
/// `Err` holds the outcome for an event that is not a sound new order.
pub(crate) fn accept(event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>, kind: u16) -> Result<(), Outcome> {
    let order = &event.msg.order;
    if event.msg.step != Step::Place {
        return Err(unexpected(event));
    }
    if order.quantity == 0 || order.amount_cents == 0 {
        return Err(Outcome::Malformed("malformed payload: zero quantity or amount".into()));
    }
    out.record(kind, &[]);
    Ok(())
}

/// A transient failure of `saga`'s `step` (`now`, the handler's outcome for it) on `event`'s
/// try: retried while the step's retry policy has tries left ([`Saga::may_retry`]), else given
/// up: the event is rejected (dead-lettered), and the step counts as timed out, its failed
/// tries maybe done.
pub(crate) fn give_up_after(saga: &Saga, step: StepId, event: &Envelope<OrderEvent>, now: Outcome) -> Outcome {
    match now {
        Outcome::Retry(reason) if !saga.may_retry(step, event.attempt) => Outcome::Reject(
            format!("gave up after {} attempts (the step's retry policy): {reason}", event.attempt + 1).into(),
        ),
        other => other,
    }
}

/// The saga flows' charge, behind the port's breaker: `Ok(true)` charged, `Ok(false)` declined
/// for good (or refunded already: over); `Err` holds the outcome to return now (a retry, or a
/// wait behind an open breaker).
pub(crate) fn try_charge(
    gateway: &dyn PaymentGateway,
    breaker: Option<&CircuitBreaker>,
    event: &Envelope<OrderEvent>,
) -> Result<bool, Outcome> {
    if let Some(wait) = breaker_says_wait(breaker) {
        return Err(wait);
    }
    let charged = gateway.charge(event.msg.key(Effect::Charge), &event.msg.order, event.attempt);
    breaker_record(breaker, matches!(charged, Err(PaymentError::Transient(_) | PaymentError::Timeout(_))));
    match charged {
        Ok(()) => Ok(true),
        Err(error @ (PaymentError::Transient(_) | PaymentError::Timeout(_))) => {
            Err(Outcome::Retry(error.to_string().into()))
        }
        Err(PaymentError::Declined(_) | PaymentError::Refunded(_)) => Ok(false),
    }
}

/// The saga flows' reservation, behind the port's breaker: `Ok(true)` reserved, `Ok(false)` out
/// of stock; `Err` holds the outcome to return now.
pub(crate) fn try_reserve(
    inventory: &dyn InventoryStore,
    breaker: Option<&CircuitBreaker>,
    event: &Envelope<OrderEvent>,
) -> Result<bool, Outcome> {
    if let Some(wait) = breaker_says_wait(breaker) {
        return Err(wait);
    }
    let reserved = inventory.reserve(event.msg.key(Effect::Reserve), &event.msg.order, event.attempt);
    breaker_record(breaker, matches!(reserved, Err(InventoryError::Transient(_))));
    match reserved {
        Ok(()) => Ok(true),
        Err(InventoryError::Transient(reason)) => Err(Outcome::Retry(reason)),
        Err(InventoryError::OutOfStock { .. }) => Ok(false),
    }
}

/// Attempts the dead-letter sink gives a compensation of its own, after the stage's: the ports
/// are idempotent, so a few more tries are safe.
const SINK_ATTEMPTS: u32 = 3;

/// Runs `undo` (given the attempt) until it succeeds, [`SINK_ATTEMPTS`] times at most; the last
/// error if none did.
pub(crate) fn undo_in_sink<E>(mut undo: impl FnMut(u32) -> Result<(), E>) -> Result<(), E> {
    let mut undone = undo(0);
    for attempt in 1..SINK_ATTEMPTS {
        if undone.is_ok() {
            break;
        }
        undone = undo(attempt);
    }
    undone
}

/// Payment stage: charges once per order; a decline cancels it.
pub(crate) struct PaymentStage {
    pub(crate) gateway: Arc<dyn PaymentGateway>,
    /// The fraud service, asked over request/reply before charging, and how long to wait.
    pub(crate) fraud: Option<(Arc<RpcServer<Order, FraudVerdict>>, Duration)>,
    /// `order.inventory.reserve`.
    pub(crate) charged: RouteId,
    /// `order.compensation.declined`.
    pub(crate) declined: RouteId,
    pub(crate) breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for PaymentStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Charge {
            return unexpected(event);
        }
        let order = &event.msg.order;
        if let Some((fraud, timeout)) = &self.fraud {
            match fraud.call(*order, *timeout) {
                Ok(FraudVerdict::Approve) => {}
                Ok(FraudVerdict::Deny) => {
                    out.record(kinds::DECLINED, &[]);
                    out.publish(self.declined, event.msg.then(Step::Compensate(CancelReason::PaymentDeclined)));
                    return Outcome::Done;
                }
                Err(error) => return Outcome::Retry(format!("fraud check: {error}").into()),
            }
        }
        if let Some(wait) = breaker_says_wait(self.breaker.as_deref()) {
            return wait;
        }
        let charged = self.gateway.charge(event.msg.key(Effect::Charge), order, event.attempt);
        breaker_record(
            self.breaker.as_deref(),
            matches!(charged, Err(PaymentError::Transient(_) | PaymentError::Timeout(_))),
        );
        match charged {
            Ok(()) => {
                conduit::crashpoint::hit("saga.after_charge");
                out.record(kinds::CHARGED, &[]);
                out.publish(self.charged, event.msg.then(Step::Reserve));
            }
            Err(error @ (PaymentError::Transient(_) | PaymentError::Timeout(_))) => {
                return Outcome::Retry(error.to_string().into())
            }
            // A run that crashed dead-lettered the order and compensated it, and its record of
            // the dead letter never became durable: the provider's books say the order is over.
            // It is dead-lettered again (its compensations replay as no-ops).
            Err(error @ PaymentError::Refunded(_)) => return Outcome::Reject(error.to_string().into()),
            Err(PaymentError::Declined(_)) => {
                out.record(kinds::DECLINED, &[]);
                out.publish(self.declined, event.msg.then(Step::Compensate(CancelReason::PaymentDeclined)));
            }
        }
        Outcome::Done
    }
}

/// Inventory stage: reserves stock; the confirmed order fans out to email, SMS and shipping.
pub(crate) struct InventoryStage {
    pub(crate) inventory: Arc<dyn InventoryStore>,
    /// `order.notify.confirmed` (email and SMS subscribe).
    pub(crate) confirmed: RouteId,
    /// `order.shipping.ship`.
    pub(crate) ship: RouteId,
    /// `order.compensation.out_of_stock`.
    pub(crate) out_of_stock: RouteId,
    pub(crate) breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for InventoryStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Reserve {
            return unexpected(event);
        }
        let order = &event.msg.order;
        if let Some(wait) = breaker_says_wait(self.breaker.as_deref()) {
            return wait;
        }
        let reserved = self.inventory.reserve(event.msg.key(Effect::Reserve), order, event.attempt);
        breaker_record(self.breaker.as_deref(), matches!(reserved, Err(InventoryError::Transient(_))));
        match reserved {
            Ok(()) => {
                out.record(kinds::RESERVED, &[]);
                out.publish(self.confirmed, event.msg.then(Step::Notify));
                out.publish(self.ship, event.msg.then(Step::Ship));
            }
            Err(InventoryError::Transient(reason)) => return Outcome::Retry(reason),
            Err(InventoryError::OutOfStock { .. }) => {
                out.record(kinds::OUT_OF_STOCK, &[]);
                out.publish(self.out_of_stock, event.msg.then(Step::Compensate(CancelReason::OutOfStock)));
            }
        }
        Outcome::Done
    }
}

/// Email and SMS stages: two subscribers of the same confirmation.
pub(crate) struct NotifyStage {
    pub(crate) channel: Channel,
    pub(crate) notifier: Arc<dyn Notifier>,
    pub(crate) breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for NotifyStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Notify {
            return unexpected(event);
        }
        let order = &event.msg.order;
        let key = event.msg.key(self.channel.effect());
        if let Some(wait) = breaker_says_wait(self.breaker.as_deref()) {
            return wait;
        }
        let sent = self.notifier.send(self.channel, key, order, event.attempt);
        breaker_record(self.breaker.as_deref(), sent.is_err());
        match sent {
            Ok(()) => {
                out.record(
                    match self.channel {
                        Channel::Email => kinds::EMAILED,
                        Channel::Sms => kinds::TEXTED,
                    },
                    &[],
                );
                Outcome::Done
            }
            Err(error) => Outcome::Retry(error.0),
        }
    }
}

/// Shipping stage: ships once per order (and generation); the order is then confirmed.
pub(crate) struct ShippingStage {
    pub(crate) carrier: Arc<SimulatedCarrier>,
    pub(crate) outcomes: Arc<Outcomes>,
}

impl Handler<OrderEvent> for ShippingStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Ship {
            return unexpected(event);
        }
        let order = &event.msg.order;
        if !self.carrier.ship(event.msg.key(Effect::Ship), order) {
            // A duplicate delivery: shipped, recorded and counted the first time.
            return Outcome::Done;
        }
        out.record(kinds::SHIPPED, &[]);
        self.outcomes.reached_terminal(order.id, out);
        self.outcomes.confirmed.fetch_add(1, Ordering::Relaxed);
        self.outcomes.confirmed_total_cents.fetch_add(order.amount_cents, Ordering::Relaxed);
        self.outcomes.confirmed_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
        Outcome::Done
    }
}

/// Undoes an order's side effects (of the event's generation) in reverse order: release the
/// stock, refund the charge.
fn compensate(
    inventory: &dyn InventoryStore,
    gateway: &dyn PaymentGateway,
    event: &OrderEvent,
    attempt: u32,
) -> Result<(), conduit::Reason> {
    let order = &event.order;
    inventory.release(event.key(Effect::Release), order, attempt).map_err(|e| conduit::Reason::from(e.to_string()))?;
    gateway.refund(event.key(Effect::Refund), order, attempt).map_err(|e| conduit::Reason::from(e.to_string()))
}

/// Compensation stage: release, refund, then the order is cancelled.
pub(crate) struct CompensationStage {
    pub(crate) inventory: Arc<dyn InventoryStore>,
    pub(crate) gateway: Arc<dyn PaymentGateway>,
    pub(crate) outcomes: Arc<Outcomes>,
}

impl Handler<OrderEvent> for CompensationStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        let Step::Compensate(reason) = event.msg.step else {
            return unexpected(event);
        };
        if let Err(reason) = compensate(&*self.inventory, &*self.gateway, &event.msg, event.attempt) {
            return Outcome::Retry(reason);
        }
        let counter = match reason {
            CancelReason::OutOfStock => &self.outcomes.cancelled_out_of_stock,
            CancelReason::PaymentDeclined => &self.outcomes.cancelled_declined,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.outcomes.reached_terminal(event.msg.order.id, out);
        out.record(kinds::CANCELLED, &[reason.code()]);
        Outcome::Done
    }
}

/// Asks the port's breaker (if any) whether to call: `Some(defer)` when it is open.
fn breaker_says_wait(breaker: Option<&CircuitBreaker>) -> Option<Outcome> {
    let breaker = breaker?;
    (!breaker.allow()).then(|| Outcome::Defer(breaker.retry_after()))
}

/// Tells the port's breaker (if any) how the call went.
fn breaker_record(breaker: Option<&CircuitBreaker>, failed: bool) {
    if let Some(breaker) = breaker {
        if failed {
            breaker.record_failure();
        } else {
            breaker.record_success();
        }
    }
}

pub(crate) fn unexpected(event: &Envelope<OrderEvent>) -> Outcome {
    Outcome::Reject(format!("unexpected step {:?} for order {}", event.msg.step, event.key).into())
}

/// A dead letter as the order pipeline keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct OrderDeadLetter {
    /// The stage that gave up.
    pub stage: String,
    /// The class of failure (`rejected`, `retries_exhausted`, `malformed`, ...).
    pub kind: String,
    /// The last failure's reason.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// The order.
    pub order: Order,
}

/// Dead letters of the order pipeline: an order-path dead letter is compensated (release, refund)
/// and ends the order; a notification's dead letter is only recorded (the order goes on).
pub(crate) struct OrderDeadLetters {
    pub(crate) inventory: Arc<dyn InventoryStore>,
    pub(crate) gateway: Arc<dyn PaymentGateway>,
    pub(crate) outcomes: Arc<Outcomes>,
    pub(crate) letters: Mutex<Vec<OrderDeadLetter>>,
    pub(crate) compensation_failures: AtomicU64,
    /// The orchestrated flow, whose sagas learn of their steps' dead letters here.
    pub(crate) saga: Option<Arc<crate::saga::SagaFlow>>,
    /// The choreographed flow, whose carrier learns of the answers that will never come.
    pub(crate) choreography: Option<Arc<crate::choreography::Choreography>>,
}

impl OrderDeadLetters {
    /// Dead letters counted by `field` (their stage, their kind).
    pub(crate) fn count_by(&self, field: impl Fn(&OrderDeadLetter) -> &String) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for letter in self.letters.lock().iter() {
            *counts.entry(field(letter).clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Compensates what the dead letter leaves undone, counts it and keeps it; the saga facts
    /// of what it did go to `facts`, for the journal.
    fn take(&self, letter: DeadLetter<OrderEvent>, facts: &mut Vec<(u16, Vec<u8>)>) {
        let event = letter.envelope.msg;
        let order = event.order;
        // A notification's dead letter (in its own stage, or unroutable) leaves the order alone.
        let ends_order = letter.envelope.msg.step != Step::Notify;
        let saga_step = !matches!(event.step, Step::Notify | Step::Place);
        let service = match &*letter.stage {
            names::PAYMENT => Some(true),
            names::INVENTORY => Some(false),
            _ => None,
        };
        let choreographed = service.is_some() || matches!(event.step, Step::Cancel(_));
        // What could not be undone, and the saga's story: the dead letter carries it.
        let mut stuck = None;
        if let (Some(saga), true) = (&self.saga, saga_step) {
            // The saga's book decides what is undone, and counts the order when it ends.
            stuck = saga.dead_lettered(&event, facts).err();
        } else if let (Some(flow), true) = (&self.choreography, choreographed) {
            // The carrier hears the missing answer as unknown and has the order cancelled.
            stuck = flow.dead_lettered(&event, service, facts).err();
        } else if ends_order {
            // If every attempt fails, the failure is counted and the ledger shows it.
            if undo_in_sink(|attempt| compensate(&*self.inventory, &*self.gateway, &event, attempt)).is_err() {
                tracing::error!(order = order.id, "dead-lettered order could not be compensated");
                self.compensation_failures.fetch_add(1, Ordering::Relaxed);
            }
            self.outcomes.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        let reason = match &stuck {
            Some(story) => {
                self.compensation_failures.fetch_add(1, Ordering::Relaxed);
                format!("{}; then {story}", letter.reason)
            }
            None => letter.reason.into_owned(),
        };
        self.letters.lock().push(OrderDeadLetter {
            stage: letter.stage.to_string(),
            kind: letter.kind.to_string(),
            reason,
            attempts: letter.attempts,
            order,
        });
    }
}

impl DeadLetterSink<OrderEvent> for OrderDeadLetters {
    fn dead_letter(&self, letter: DeadLetter<OrderEvent>) {
        self.take(letter, &mut Vec::new());
    }

    fn dead_letter_journaled(&self, letter: DeadLetter<OrderEvent>) -> Vec<(u16, Vec<u8>)> {
        let mut facts = Vec::new();
        self.take(letter, &mut facts);
        // The dead letter's own record counts as its event's.
        self.outcomes.journaled(facts.len(), 0);
        facts
    }
}
