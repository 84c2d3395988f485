//! A running order pipeline: start (fresh, or restored from a log), submit, resume, finish.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::domain::{Order, OrderCodec, OrderEvent};
use super::history::{Histories, OrderHistory, OrderStatus};
use super::ports::{Channel, FraudVerdict, LedgerFigures, SimulatedGateway};
use super::report::RetryReport;
use super::stages::{names, OrderDeadLetters, OutcomeFigures, Outcomes};
use super::wiring::{build, Breakers, Built, Ports};
use crate::{
    DeadLetterReport, EventCounts, LedgerReport, LogReport, OrderCounts, OrderRouting, RunReport, SimConfig,
    StockReport,
};
use conduit::log::Log;
use conduit::rpc::RpcServer;
use conduit::{BuildError, Engine, EngineConfig, Envelope, Journal, Receipt, StageId, SubmitError, TrySubmitError};

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
    /// The provider's figures when the pipeline started (zero for a gateway of its own): the
    /// report shows what this run added to them.
    ledger_before: LedgerFigures,
    /// The orchestrated flow's sagas, when the flow is orchestrated.
    saga: Option<Arc<crate::saga::SagaFlow>>,
    /// The choreographed flow's services' shared state, when the flow is choreographed.
    choreography: Option<Arc<crate::choreography::Choreography>>,
    /// Saga facts a recovery journaled from the provider's books (beside the events' records).
    reconciled_records: std::sync::atomic::AtomicU64,
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
    /// log into the simulated ports and the counts (see [`recover`](crate::recover)).
    pub fn start_routed(
        config: &EngineConfig,
        sim: &SimConfig,
        routing: &OrderRouting,
        log: Option<Arc<Log>>,
        restore: Option<&Histories>,
    ) -> Result<Self, BuildError> {
        Self::launch(config, sim, routing, log, restore, None, true)
    }

    /// [`OrderPipeline::start_routed`] calling `provider` for payments: a provider that outlives
    /// this pipeline, whose books are its own (see [`SimulatedGateway::with_books`]), so nothing
    /// of it is rebuilt from the log. The report's ledger shows what this run added to its books.
    pub fn start_with_provider(
        config: &EngineConfig,
        sim: &SimConfig,
        routing: &OrderRouting,
        log: Option<Arc<Log>>,
        restore: Option<&Histories>,
        provider: Arc<SimulatedGateway>,
    ) -> Result<Self, BuildError> {
        Self::launch(config, sim, routing, log, restore, Some(provider), true)
    }

    /// In memory, without the engine's completion tracking: for measuring what tracking costs.
    pub fn start_untracked(config: &EngineConfig, sim: &SimConfig) -> Result<Self, BuildError> {
        Self::launch(config, sim, &OrderRouting::default(), None, None, None, false)
    }

    pub(crate) fn launch(
        config: &EngineConfig,
        sim: &SimConfig,
        routing: &OrderRouting,
        log: Option<Arc<Log>>,
        restore: Option<&Histories>,
        provider: Option<Arc<SimulatedGateway>>,
        track_completion: bool,
    ) -> Result<Self, BuildError> {
        conduit::crashpoint::register(&crate::CRASH_POINTS);
        let ledger_before = provider.as_ref().map(|p| p.ledger()).unwrap_or_default();
        if let Some(histories) = restore {
            same_flow(histories, sim.flow)?;
        }
        let Built {
            topology,
            stages,
            ports,
            outcomes,
            dead_letters,
            breakers,
            fraud: fraud_server,
            saga,
            choreography,
        } = build(config, sim, routing, provider)?;
        let submitted_before = restore.map_or(0, |histories| restore_ports(histories, &ports, &outcomes));
        let mut builder = Engine::builder(topology)
            .config(config)
            .dead_letters(dead_letters.clone())
            .track_completion(track_completion);
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
            ledger_before,
            saga,
            choreography,
            reconciled_records: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Counts payments the provider's books hold from before this pipeline (for orders it
    /// resumes) in its report's ledger, beside what it adds.
    pub(crate) fn count_earlier_payments(&mut self, charged_cents: u64, refunded_cents: u64) {
        self.ledger_before.charged_cents = self.ledger_before.charged_cents.saturating_sub(charged_cents);
        self.ledger_before.refunded_cents = self.ledger_before.refunded_cents.saturating_sub(refunded_cents);
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
        let mut reconciled = Vec::new();
        let flows = SagaFlows { orchestrated: self.saga.as_deref(), choreography: self.choreography.as_deref() };
        for (id, history) in histories {
            for (stage, envelope) in take_up(flows, id, history, &self.ports.gateway, &mut reconciled) {
                by_stage.entry(stage).or_default().push(envelope);
            }
        }
        if let Err(error) = self.journal_reconciled(&reconciled) {
            tracing::error!(%error, "the facts the provider's books add could not be journaled");
            return Err(SubmitError::LogFailed(
                by_stage.into_values().flatten().map(|envelope| envelope.msg).collect(),
            ));
        }
        // Front to back, so nothing resumed downstream waits behind a full upstream queue; in
        // one injection, so that an order resumed in several stages finishes once, after all.
        let (names, groups): (Vec<_>, Vec<_>) = self
            .stages
            .iter()
            .filter_map(|(name, stage)| by_stage.remove(name).map(|events| (*name, (*stage, events))))
            .unzip();
        let counts = self.engine.inject_all(groups)?;
        Ok(names.into_iter().map(str::to_owned).zip(counts).collect())
    }

    /// Journals the saga facts that the provider's books added on recovery
    /// ([`OrderHistory::saga_reconciliation`]), before anything resumed can record a later one.
    fn journal_reconciled(&self, facts: &[Reconciled]) -> Result<(), conduit::log::LogError> {
        let Some(log) = self.log.as_ref().filter(|_| !facts.is_empty()) else { return Ok(()) };
        let first = log.reserve_ids(facts.len() as u64);
        let stage = names::index_of(names::COMPENSATION).unwrap_or(0);
        let timestamp_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
        let records = facts
            .iter()
            .zip(first..)
            .map(|(&fact, id)| conduit::log::Record { id, stage, timestamp_us, ..reconciled_record(fact) })
            .collect();
        log.append(records)?.wait()?;
        self.reconciled_records.fetch_add(facts.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
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

    /// [`submit_many`](Self::submit_many) for orders a load generator scheduled at `scheduled`:
    /// their end-to-end latency counts from then ([`conduit::Engine::submit_many_at`]).
    pub fn submit_many_at(
        &self,
        orders: impl IntoIterator<Item = Order>,
        scheduled: std::time::Instant,
    ) -> Result<u64, SubmitError<Vec<OrderEvent>>> {
        self.engine.submit_many_at(orders.into_iter().map(place), scheduled)
    }

    /// Places up to [`conduit::INGRESS_WINDOW_EVENTS`] orders as one window without waiting for
    /// their commit ([`conduit::Engine::submit_window_at`]): the receipt settles once they are
    /// durable and in the pipeline; their end-to-end latency counts from `scheduled`.
    pub fn submit_window_at(
        &self,
        orders: impl IntoIterator<Item = Order>,
        scheduled: std::time::Instant,
    ) -> Result<Receipt<OrderEvent>, SubmitError<Vec<OrderEvent>>> {
        self.engine.submit_window_at(orders.into_iter().map(place).collect(), scheduled)
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
            commit_latency_us: log.commit_latency(),
            sync_error: report.log_sync.clone().and_then(Result::err).map(|e| e.to_string()),
            other_records: self.reconciled_records.load(std::sync::atomic::Ordering::Relaxed),
            saga_records_beyond_events: self.outcomes.records_beyond_events(),
        });
        let per_sec = |n: u64| if elapsed_s > 0.0 { n as f64 / elapsed_s } else { 0.0 };
        let ledger = self.ports.gateway.ledger().since(&self.ledger_before);
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
                cancelled_unshipped: outcomes.cancelled_unshipped,
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
            stock: stock_report(&self.ports, &self.sim, outcomes.confirmed_units),
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
            load: super::report::LoadReport::Saturated,
            end_to_end_us: snapshot.end_to_end_us,
            alerts: snapshot.alerts,
            monitor: None,
            terminal_us: self.outcomes.terminal_latency(),
            flow: self.sim.flow,
            sagas: match (&self.saga, &self.choreography) {
                (Some(flow), _) => Some(flow.book.report_now().into()),
                (None, Some(flow)) => Some(flow.report()),
                (None, None) => None,
            },
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

/// The inventory's books against the carrier's: in total and SKU by SKU.
fn stock_report(ports: &Ports, sim: &SimConfig, confirmed_units: u64) -> StockReport {
    let (inventory, carrier) = (&ports.inventory, &ports.carrier);
    let empty = sim.empty_skus();
    let mut shipped_units = 0;
    let mut skus_unbalanced = 0;
    for sku in 0..sim.skus {
        let initial = if sku < empty { 0 } else { sim.stock_per_sku };
        let taken = initial.saturating_sub(inventory.stock(sku).unwrap_or(initial));
        let shipped = carrier.net_units(sku);
        shipped_units += shipped;
        if u64::from(taken) != shipped {
            skus_unbalanced += 1;
        }
    }
    StockReport::new(inventory.figures(), confirmed_units, shipped_units, skus_unbalanced)
}

fn place(order: Order) -> OrderEvent {
    OrderEvent::place(order)
}

/// A saga fact a recovery adds from the provider's books: `(order, correlation, cause, fact)`.
pub(crate) type Reconciled = (u64, u64, u64, conduit::saga::Fact);

/// The record of a [`Reconciled`] fact, without its id, stage and timestamp.
pub(crate) fn reconciled_record((stream, correlation, causation, fact): Reconciled) -> conduit::log::Record {
    conduit::log::Record {
        stream,
        kind: super::domain::kinds::SAGA,
        correlation,
        causation,
        payload: crate::saga::fact_payload(fact, crate::saga::BY_RECOVERY).to_vec(),
        ..conduit::log::Record::default()
    }
}

/// The saga flows a pipeline runs, if any.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SagaFlows<'f> {
    pub(crate) orchestrated: Option<&'f crate::saga::SagaFlow>,
    pub(crate) choreography: Option<&'f crate::choreography::Choreography>,
}

/// The events that take order `id` to its end after a restart, by stage name. A saga in flight
/// is first reconciled with the provider's books (the facts they add go to `reconciled`, to
/// journal before anything resumed records a later one), then taken up by the flow that runs
/// it: the orchestrated flow's book runs it from its facts; the choreography's carrier gets back
/// the answers it had heard.
pub(crate) fn take_up(
    flows: SagaFlows<'_>,
    id: u64,
    history: &OrderHistory,
    provider: &SimulatedGateway,
    reconciled: &mut Vec<Reconciled>,
) -> Vec<(&'static str, Envelope<OrderEvent>)> {
    let saga_in_flight = history.saga.is_some() && history.status() == OrderStatus::InFlight;
    if !saga_in_flight || (flows.orchestrated.is_none() && flows.choreography.is_none()) {
        return history.resume_envelopes(id, provider);
    }
    let mut history = std::borrow::Cow::Borrowed(history);
    let missing = history.saga_reconciliation(id, provider);
    if !missing.is_empty() {
        reconciled.extend(missing.iter().map(|fact| (id, history.correlation, history.last_id, *fact)));
        history.to_mut().saga.get_or_insert_with(Vec::new).extend(missing);
    }
    if let Some(choreography) = flows.choreography {
        return choreography
            .take_up(id, &history)
            .into_iter()
            .map(|(stage, msg)| (stage, history.envelope(id, msg)))
            .collect();
    }
    if let Some(flow) = flows.orchestrated {
        flow.resume(id, history.saga.as_deref().unwrap_or_default(), history.dead_letter_stage.is_some());
    }
    history.resume_envelopes(id, provider)
}

/// Refuses to resume a log's orders in flight with a flow that cannot take them up: the chain's
/// stages cannot take up a saga, nor the saga flows' a chain's order. Both saga flows journal
/// the same facts of the same saga, so either takes up the other's.
fn same_flow(histories: &Histories, flow: crate::Flow) -> Result<(), BuildError> {
    let in_flight = histories.orders.values().filter(|history| history.status() == OrderStatus::InFlight);
    // An order only placed belongs to no flow yet: whichever resumes it, places it.
    let accepted = |history: &&OrderHistory| {
        history.saga.is_some() || history.counts[usize::from(super::domain::kinds::ACCEPTED)] > 0
    };
    let sagas = flow != crate::Flow::Chain;
    let mismatch = in_flight.filter(accepted).map(|history| history.saga.is_some()).find(|&saga| saga != sagas);
    match mismatch {
        None => Ok(()),
        Some(saga) => Err(BuildError::Config(conduit::ConfigError::Invalid(format!(
            "the log holds orders {} in flight, which the {} flow cannot resume: recover it with {}",
            if saga { "of a saga flow" } else { "of the chain flow" },
            flow.name(),
            if saga {
                "flow = \"orchestrated\" or \"choreography\" (--saga orchestrated or choreography: each takes up \
                 the other's sagas)"
            } else {
                "flow = \"chain\" (--saga chain)"
            },
        )))),
    }
}

/// Counts carried over from the log into the ports and outcomes; returns the orders placed.
pub(crate) fn restore_ports(histories: &Histories, ports: &Ports, outcomes: &Outcomes) -> u64 {
    let mut figures = OutcomeFigures::default();
    let mut placed = 0;
    for history in histories.orders.values() {
        let Some(order) = history.order else { continue };
        placed += 1;
        let generation = history.generation;
        if !ports.external_gateway {
            ports.gateway.restore_refunded_charges(&order, history.past_charges);
            if history.charged() {
                ports.gateway.restore_charge(&order, generation, history.compensated());
            }
        }
        ports.inventory.restore_released_reservations(&order, history.past_reservations);
        if history.reserved() {
            ports.inventory.restore_reservation(&order, generation, history.compensated());
        }
        if history.counts[usize::from(super::domain::kinds::EMAILED)] > 0 {
            ports.notifier.restore_sent(Channel::Email, order.id, generation);
        }
        if history.counts[usize::from(super::domain::kinds::TEXTED)] > 0 {
            ports.notifier.restore_sent(Channel::Sms, order.id, generation);
        }
        if history.shipped() {
            ports.carrier.restore_shipped(&order, generation);
        }
        match history.status() {
            OrderStatus::Confirmed => {
                figures.confirmed += 1;
                figures.confirmed_total_cents += order.amount_cents;
                figures.confirmed_units += u64::from(order.quantity);
            }
            OrderStatus::Cancelled => match history.cancel_cause() {
                Some(super::domain::CancelReason::PaymentDeclined) => figures.cancelled_declined += 1,
                Some(super::domain::CancelReason::OutOfStock) => figures.cancelled_out_of_stock += 1,
                None => figures.cancelled_unshipped += 1,
            },
            OrderStatus::DeadLettered => figures.dead_lettered += 1,
            OrderStatus::InFlight => {}
        }
    }
    outcomes.restore(&figures);
    placed
}
