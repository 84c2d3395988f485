//! The orchestrated order flow: the order's saga on `conduit::saga`.
//!
//! ```text
//!            +--> payment ---+                    (charge, in parallel with reserve)
//! order -----+               +--> shipping --+--> email, sms   (completed)
//!            +--> inventory -+       |       `--> ...
//!                  |                 |
//!                  `-----------------+--> compensation         (refund, release, cancel shipment)
//! ```
//!
//! The order stage starts the saga in the [`SagaBook`]; each step's stage runs its action and
//! reports the outcome to the book, which says what comes next: the stage that reports the
//! second of charge and reserve starts shipping; a failure has the steps that completed undone
//! by the compensation stage, one at a time, the last completed first. The links stay acyclic
//! (no step answers a stage before it), so backpressure can never deadlock the flow.
//!
//! Each report is also a fact in the journal (`kinds::SAGA`), so the saga's story is in the log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustc_hash::{FxHashMap, FxHashSet};

use super::domain::{kinds, Effect, OrderEvent, Step};
use super::ports::{InventoryStore, PaymentGateway, ShipError};
use super::stages::{accept, give_up_after, names, try_charge, try_reserve, undo_in_sink, unexpected, Outcomes};
use super::wiring::Ports;
use conduit::breaker::CircuitBreaker;
use conduit::saga::{Command, Fact, Outcome as StepOutcome, Saga, SagaBook, SagaEnd, StepId, Turn};
use conduit::{Emitter, Envelope, Handler, Outcome, StageId};

/// The order's saga: charge and reserve in parallel, then ship, each within `timeout` and
/// `attempts` if given. Notifications follow a completed saga; they undo nothing and are not
/// steps.
pub(crate) fn order_saga(timeout: Option<Duration>, attempts: Option<u32>) -> Saga {
    use conduit::saga::Step as SagaStep;
    let step = |name: &str, compensation: &str| {
        let step = SagaStep::new(name).compensated_by(compensation);
        let step = match timeout {
            Some(timeout) => step.timeout(timeout),
            None => step,
        };
        match attempts {
            Some(attempts) => step.attempts(attempts),
            None => step,
        }
    };
    Saga::builder("order")
        .group([step("charge", "refund"), step("reserve", "release")])
        .group([step("ship", "cancel_shipment")])
        .build()
        .expect("the order saga is well formed (a zero timeout or attempts is refused by the simulation's settings)")
}

/// The order saga's steps as the journal names them (timeouts are no part of a fact).
pub(crate) fn shape() -> &'static Saga {
    static SHAPE: std::sync::OnceLock<Saga> = std::sync::OnceLock::new();
    SHAPE.get_or_init(|| order_saga(None, None))
}

/// The stage that runs a step of the order saga, and the order event that asks for it.
pub(crate) fn step_stage(step: StepId) -> Option<(&'static str, Step)> {
    match shape().name_of(step) {
        "charge" => Some((names::PAYMENT, Step::Charge)),
        "reserve" => Some((names::INVENTORY, Step::Reserve)),
        "ship" => Some((names::SHIPPING, Step::Ship)),
        _ => None,
    }
}

/// Whether `facts` hold `step`'s action ending so.
pub(crate) fn finished(facts: &[Fact], step: &str, outcome: StepOutcome) -> bool {
    shape().step(step).is_some_and(|step| facts.contains(&Fact::Finished(step, outcome)))
}

/// The attempt of a fact the dead-letter sink brought about.
pub(crate) const BY_SINK: u32 = 0;
/// The attempt of a fact a recovery added from the payment provider's books.
pub(crate) const BY_RECOVERY: u32 = u32::MAX;

/// A saga record's payload: the fact's four bytes, then the attempt that answered (u32, LE;
/// from 1, or [`BY_SINK`], or [`BY_RECOVERY`]).
pub(crate) fn fact_payload(fact: Fact, attempt: u32) -> [u8; Fact::ENCODED_LEN + 4] {
    let mut payload = [0; Fact::ENCODED_LEN + 4];
    payload[..Fact::ENCODED_LEN].copy_from_slice(&fact.encode());
    payload[Fact::ENCODED_LEN..].copy_from_slice(&attempt.to_le_bytes());
    payload
}

/// A saga record's fact and attempt (`None` for a record without one); `None` for bytes that
/// hold no fact of the order saga.
pub(crate) fn read_fact(payload: &[u8]) -> Option<(Fact, Option<u32>)> {
    let fact = Fact::decode(shape(), payload.get(..Fact::ENCODED_LEN)?)?;
    let attempt = match payload.get(Fact::ENCODED_LEN..)? {
        [] => None,
        &[a, b, c, d] => Some(u32::from_le_bytes([a, b, c, d])),
        _ => return None,
    };
    Some((fact, attempt))
}

/// An outcome for people.
pub(crate) fn outcome_name(outcome: StepOutcome) -> &'static str {
    match outcome {
        StepOutcome::Succeeded => "succeeded",
        StepOutcome::Failed => "failed",
        StepOutcome::TimedOut => "timed out",
    }
}

/// A saga record's fact for people: `charge succeeded (attempt 2)`, `ship timed out`, `refund
/// ran`; `None` for bytes that hold no fact of the order saga.
#[must_use]
pub fn describe_fact(payload: &[u8]) -> Option<String> {
    let saga = shape();
    let (fact, attempt) = read_fact(payload)?;
    let what = match fact {
        Fact::Finished(step, outcome) => format!("{} {}", saga.name_of(step), outcome_name(outcome)),
        Fact::Compensated(step) => format!("{} ran", saga.compensation_of(step).unwrap_or("compensation")),
    };
    Some(match attempt {
        Some(BY_SINK) => format!("{what} (in the dead-letter sink)"),
        Some(BY_RECOVERY) => format!("{what} (by recovery, from the provider's books)"),
        Some(n) if n > 1 => format!("{what} (attempt {n})"),
        _ => what,
    })
}

/// A fact the dead-letter sink brought about, as a journal record: `(kind, payload)`.
pub(crate) fn journaled(fact: Fact) -> (u16, Vec<u8>) {
    (kinds::SAGA, fact_payload(fact, BY_SINK).to_vec())
}

/// Where the flow's commands go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Targets {
    pub(crate) payment: StageId,
    pub(crate) inventory: StageId,
    pub(crate) shipping: StageId,
    pub(crate) compensation: StageId,
    pub(crate) email: StageId,
    pub(crate) sms: StageId,
}

/// What every stage of the orchestrated flow shares: the book of sagas in progress, the steps
/// by name, the ports, the outcome counts.
pub(crate) struct SagaFlow {
    pub(crate) book: SagaBook,
    charge: StepId,
    reserve: StepId,
    ship: StepId,
    /// Each step of the saga, the order event that asks for it, and the stage that runs it.
    steps: [(StepId, Step, StageId); 3],
    targets: Targets,
    ports: Ports,
    outcomes: Arc<Outcomes>,
    /// Orders one of whose steps was dead-lettered, until their saga ends (then counted as
    /// dead-lettered, not cancelled): at most the sagas in progress.
    dead_lettered: Mutex<FxHashSet<u64>>,
    /// Compensations run by a handler call that then failed on the next one: a retried call
    /// journals nothing, so their facts wait here for the order's next call (or its dead
    /// letter). At most the sagas being compensated.
    unjournaled: Mutex<FxHashMap<u64, Vec<Fact>>>,
}

impl std::fmt::Debug for SagaFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaFlow").field("book", &self.book).finish_non_exhaustive()
    }
}

impl SagaFlow {
    pub(crate) fn new(
        targets: Targets,
        ports: Ports,
        outcomes: Arc<Outcomes>,
        timeout: Option<Duration>,
        attempts: Option<u32>,
    ) -> Self {
        let saga = order_saga(timeout, attempts);
        let step = |name| saga.step(name).expect("a step of the order saga");
        let (charge, reserve, ship) = (step("charge"), step("reserve"), step("ship"));
        let steps = [
            (charge, Step::Charge, targets.payment),
            (reserve, Step::Reserve, targets.inventory),
            (ship, Step::Ship, targets.shipping),
        ];
        Self {
            book: SagaBook::new(saga),
            charge,
            reserve,
            ship,
            steps,
            targets,
            ports,
            outcomes,
            dead_lettered: Mutex::new(FxHashSet::default()),
            unjournaled: Mutex::new(FxHashMap::default()),
        }
    }

    /// Where the flow's commands go.
    pub(crate) fn targets(&self) -> &Targets {
        &self.targets
    }

    /// The step an event asks for, if it is one of the saga's.
    fn step_of(&self, asked: Step) -> Option<StepId> {
        self.steps.iter().find(|(_, step, _)| *step == asked).map(|&(id, _, _)| id)
    }

    /// Reports `step`'s outcome for `event`'s order, records it, and does what the book says.
    fn report(&self, event: &Envelope<OrderEvent>, step: StepId, outcome: StepOutcome, out: &mut Emitter<OrderEvent>) {
        out.record(kinds::SAGA, &fact_payload(Fact::Finished(step, outcome), event.attempt + 1));
        let turn = self.book.finished(event.msg.order.id, step, outcome);
        self.follow(&event.msg, &turn, out);
    }

    /// Sends each started step to its stage, due within the step's timeout (the engine's timing
    /// wheel expires it then), and any compensation to the compensation stage, with no deadline;
    /// counts the order once its saga ends.
    fn follow(&self, event: &OrderEvent, turn: &Turn, out: &mut Emitter<OrderEvent>) {
        // What follows a step never inherits its deadline: each step has its own, and the
        // compensations and notifications none.
        let untimed = Duration::MAX;
        for command in &turn.commands {
            match command {
                Command::Start(started) => {
                    if let Some(&(_, asked, stage)) = self.steps.iter().find(|(id, _, _)| id == started) {
                        let within = self.book.saga().timeout_of(*started).unwrap_or(untimed);
                        out.emit_within(stage, event.then(asked), within);
                    }
                }
                Command::Compensate(_) => out.emit_within(self.targets.compensation, event.then(Step::Undo), untimed),
                Command::Finish(end) => {
                    if *end == SagaEnd::Completed {
                        out.emit_within(self.targets.email, event.then(Step::Notify), untimed);
                        out.emit_within(self.targets.sms, event.then(Step::Notify), untimed);
                    }
                    self.count_end(event, end, &turn.failed, Some(out));
                }
            }
        }
    }

    /// Counts an order whose saga ended: confirmed, cancelled (by the first step that failed),
    /// or dead-lettered (a step's event was). `out`, the handler's emitter if a handler ended
    /// it, times a confirmed or cancelled order from its acceptance.
    fn count_end(&self, event: &OrderEvent, end: &SagaEnd, failed: &[StepId], out: Option<&Emitter<OrderEvent>>) {
        let order = &event.order;
        let outcomes = &*self.outcomes;
        if self.dead_lettered.lock().remove(&order.id) {
            outcomes.dead_lettered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(out) = out {
            outcomes.reached_terminal(order.id, out);
        }
        let counter = match end {
            SagaEnd::Completed => {
                outcomes.confirmed_total_cents.fetch_add(order.amount_cents, Ordering::Relaxed);
                outcomes.confirmed_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
                &outcomes.confirmed
            }
            SagaEnd::Compensated if failed.contains(&self.charge) => &outcomes.cancelled_declined,
            SagaEnd::Compensated if failed.contains(&self.reserve) => &outcomes.cancelled_out_of_stock,
            SagaEnd::Compensated => &outcomes.cancelled_unshipped,
            SagaEnd::Incomplete { .. } => {
                // Every step of the order saga has a compensation, so no failure is past the
                // point of no return; were one, the order would still end exactly once.
                tracing::error!(order = order.id, "order saga ended incomplete");
                &outcomes.dead_lettered
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs the compensation of `step` for `event`'s order.
    fn undo(&self, event: &OrderEvent, step: StepId, attempt: u32) -> Result<(), conduit::Reason> {
        let order = &event.order;
        if step == self.charge {
            self.ports.gateway.refund(event.key(Effect::Refund), order, attempt).map_err(|e| e.to_string().into())
        } else if step == self.reserve {
            self.ports.inventory.release(event.key(Effect::Release), order, attempt).map_err(|e| e.to_string().into())
        } else {
            self.ports.carrier.cancel(event.key(Effect::Ship), order);
            Ok(())
        }
    }

    /// Runs the compensations `event`'s saga owes, one at a time, the last completed step first,
    /// each tried by `undo` (given the step), each fact appended to `facts` (for the journal);
    /// stops at the first that fails, which the book still owes. With the handler's emitter, the
    /// order's end is timed.
    fn compensate(
        &self,
        event: &OrderEvent,
        undo: impl Fn(StepId) -> Result<(), conduit::Reason>,
        out: Option<&Emitter<OrderEvent>>,
        facts: &mut Vec<Fact>,
    ) -> Result<(), (StepId, conduit::Reason)> {
        let id = event.order.id;
        let mut owed = self.book.owed(id);
        while let Some(Command::Compensate(step)) = owed.first().cloned() {
            undo(step).map_err(|error| (step, error))?;
            if step == self.charge {
                conduit::crashpoint::hit("orchestrated.after_refund");
            }
            facts.push(Fact::Compensated(step));
            let turn = self.book.compensated(id, step);
            if let Some(end) = turn.end() {
                self.count_end(event, end, &turn.failed, out);
            }
            // The next compensation runs here, not in an event sent to this same stage (the
            // links stay acyclic).
            owed = turn.commands;
        }
        Ok(())
    }

    /// A step's event was dead-lettered (its retries spent, its timeout passed, or rejected).
    /// Whether its action took effect is unknown (a charge that failed after charging, then ran
    /// out of retries), so the step counts as timed out: it is compensated too, and compensating
    /// what never happened is a no-op on the other side's books. The compensations it leads to
    /// run here, a few attempts each, as no stage will run them; one that still fails is left
    /// owed in the book (the saga is stuck, and says so) and `Err` holds the saga's story, for
    /// the dead letter. Each fact (the step timed out, each compensation run) is appended to
    /// `facts`, for the journal, so that the log tells what the dead letter led to.
    pub(crate) fn dead_lettered(&self, event: &OrderEvent, facts: &mut Vec<(u16, Vec<u8>)>) -> Result<(), String> {
        let id = event.order.id;
        if event.step != Step::Undo {
            let Some(step) = self.step_of(event.step) else {
                return Err(format!("{:?} is not a step of the order saga", event.step));
            };
            self.dead_lettered.lock().insert(id);
            facts.push(journaled(Fact::Finished(step, StepOutcome::TimedOut)));
            let turn = self.book.finished(id, step, StepOutcome::TimedOut);
            if let Some(end) = turn.end() {
                // Nothing had completed: nothing to undo.
                self.count_end(event, end, &turn.failed, None);
                return Ok(());
            }
        }
        let undo = |step| undo_in_sink(|attempt| self.undo(event, step, attempt));
        let mut done = self.unjournaled.lock().remove(&id).unwrap_or_default();
        let compensated = self.compensate(event, undo, None, &mut done);
        facts.extend(done.into_iter().map(journaled));
        compensated.map_err(|(step, error)| {
            let story = self.book.story(id).unwrap_or_default();
            tracing::error!(order = id, %story, "a compensation of a dead-lettered order failed");
            format!("compensating {} failed ({error}); {story}", self.book.saga().name_of(step))
        })
    }

    /// Takes up `id`'s saga again after a restart, from the `facts` its history records, and
    /// says what it still owes. A saga that one of its steps' dead letters led to ends counted
    /// as dead-lettered.
    pub(crate) fn resume(&self, id: u64, facts: &[Fact], dead_lettered: bool) -> Vec<Command> {
        if dead_lettered {
            self.dead_lettered.lock().insert(id);
        }
        self.book.resume(id, facts).commands
    }
}

/// Order stage of the orchestrated flow: checks a new order and starts its saga.
pub(crate) struct SagaOrderStage {
    pub(crate) flow: Arc<SagaFlow>,
}

impl Handler<OrderEvent> for SagaOrderStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if let Err(refused) = accept(event, out, kinds::SAGA_STARTED) {
            return refused;
        }
        let turn = self.flow.book.start(event.msg.order.id);
        self.flow.follow(&event.msg, &turn, out);
        Outcome::Done
    }
}

/// Payment step: charges once per order; a decline fails the step.
pub(crate) struct SagaPaymentStage {
    pub(crate) flow: Arc<SagaFlow>,
    pub(crate) breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for SagaPaymentStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Charge {
            return unexpected(event);
        }
        let flow = &*self.flow;
        let outcome = match try_charge(&*flow.ports.gateway, self.breaker.as_deref(), event) {
            Ok(true) => StepOutcome::Succeeded,
            Ok(false) => StepOutcome::Failed,
            Err(now) => return give_up_after(flow.book.saga(), flow.charge, event, now),
        };
        flow.report(event, flow.charge, outcome, out);
        Outcome::Done
    }
}

/// Inventory step: reserves stock; none left fails the step.
pub(crate) struct SagaInventoryStage {
    pub(crate) flow: Arc<SagaFlow>,
    pub(crate) breaker: Option<Arc<CircuitBreaker>>,
}

impl Handler<OrderEvent> for SagaInventoryStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Reserve {
            return unexpected(event);
        }
        let flow = &*self.flow;
        let outcome = match try_reserve(&*flow.ports.inventory, self.breaker.as_deref(), event) {
            Ok(true) => StepOutcome::Succeeded,
            Ok(false) => StepOutcome::Failed,
            Err(now) => return give_up_after(flow.book.saga(), flow.reserve, event, now),
        };
        flow.report(event, flow.reserve, outcome, out);
        Outcome::Done
    }
}

/// Shipping step: books the shipment; a refusal fails the step, a lost answer times it out.
pub(crate) struct SagaShippingStage {
    pub(crate) flow: Arc<SagaFlow>,
}

impl Handler<OrderEvent> for SagaShippingStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Ship {
            return unexpected(event);
        }
        let flow = &*self.flow;
        let outcome = match flow.ports.carrier.book(event.msg.key(Effect::Ship), &event.msg.order, event.attempt) {
            Ok(_) => StepOutcome::Succeeded,
            Err(ShipError::Refused) => StepOutcome::Failed,
            Err(ShipError::Lost) => StepOutcome::TimedOut,
        };
        flow.report(event, flow.ship, outcome, out);
        Outcome::Done
    }
}

/// Compensation stage of the orchestrated flow: runs what the order's saga owes, in the order
/// the book gives (the last completed step first); a compensation that fails is retried with
/// backoff, and the book still owes it.
pub(crate) struct SagaCompensationStage {
    pub(crate) flow: Arc<SagaFlow>,
}

impl Handler<OrderEvent> for SagaCompensationStage {
    fn handle(&mut self, event: &Envelope<OrderEvent>, out: &mut Emitter<OrderEvent>) -> Outcome {
        if event.msg.step != Step::Undo {
            return unexpected(event);
        }
        let flow = &*self.flow;
        let id = event.msg.order.id;
        let undo = |step| flow.undo(&event.msg, step, event.attempt);
        let mut done = flow.unjournaled.lock().remove(&id).unwrap_or_default();
        match flow.compensate(&event.msg, undo, Some(out), &mut done) {
            Ok(()) => {
                flow.outcomes.journaled(done.len(), 1);
                for fact in done {
                    out.record(kinds::SAGA, &fact_payload(fact, event.attempt + 1));
                }
                Outcome::Done
            }
            Err((_, reason)) => {
                if !done.is_empty() {
                    flow.unjournaled.lock().insert(id, done);
                }
                Outcome::Retry(reason)
            }
        }
    }
}
