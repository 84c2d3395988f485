//! An order's history as the journal tells it: folding records into per-order state, checking
//! the invariants (`conduit log verify`), and planning what to resume after a restart.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::domain::{kinds, CancelReason, Order, OrderEvent, Step};
use super::ports::{Account, SimulatedGateway};
use super::saga;
use super::stages::names;
use conduit::log::{Aggregate, Log, LogError, Record, KIND_DEAD_LETTER, KIND_PURGED, KIND_REDRIVEN, STAGE_INGRESS};
use conduit::saga::{Command, Fact, Outcome as StepOutcome, SagaEnd, SagaRun};

/// Facts tracked per order, by kind (index = kind, 1..=10).
const FACTS: usize = 11;

/// One order's state, rebuilt from its records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderHistory {
    /// The order, from its `placed` record.
    pub order: Option<Order>,
    /// Last version applied.
    pub version: u32,
    /// Times each fact was recorded, by kind.
    pub counts: [u8; FACTS],
    /// Stage index of the order-path dead letter that ended it, if one did.
    pub dead_letter_stage: Option<u16>,
    /// Times the order was redriven from the dead letters: the generation its events carry.
    pub generation: u32,
    /// Charges of earlier generations (each refunded by its dead letter's compensation).
    pub past_charges: u32,
    /// Reservations of earlier generations (each released likewise).
    pub past_reservations: u32,
    /// Whether the email / SMS was dead-lettered.
    pub notify_dead: [bool; 2],
    /// Why it was cancelled.
    pub cancel_reason: Option<CancelReason>,
    /// Id of the last record: the cause of whatever is resumed.
    pub last_id: u64,
    /// The correlation id of its records.
    pub correlation: u64,
    /// Timestamp of the last record.
    pub last_timestamp_us: u64,
    /// The first inconsistency met while folding.
    pub problem: Option<String>,
    /// The facts of the order's saga in the order they were recorded, once the orchestrated
    /// flow started it (`kinds::SAGA_STARTED`); `None` for the other flows.
    pub saga: Option<Vec<Fact>>,
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Shipped.
    Confirmed,
    /// Compensated and cancelled.
    Cancelled,
    /// Given up on (and compensated).
    DeadLettered,
    /// Not terminal: it can be resumed.
    InFlight,
}

impl OrderHistory {
    fn has(&self, kind: u16) -> bool {
        self.counts.get(usize::from(kind)).is_some_and(|&n| n > 0)
    }

    fn note(&mut self, problem: String) {
        self.problem.get_or_insert(problem);
    }

    /// Where the order stands.
    #[must_use]
    pub fn status(&self) -> OrderStatus {
        if let Some(run) = self.saga_run() {
            // A step's dead letter records the compensations its sink ran: the facts tell all.
            return match run.end() {
                Some(SagaEnd::Completed) => OrderStatus::Confirmed,
                Some(SagaEnd::Compensated) if self.dead_letter_stage.is_none() => OrderStatus::Cancelled,
                Some(_) => OrderStatus::DeadLettered,
                None => OrderStatus::InFlight,
            };
        }
        if self.dead_letter_stage.is_some() {
            OrderStatus::DeadLettered
        } else if self.has(kinds::CANCELLED) {
            OrderStatus::Cancelled
        } else if self.has(kinds::SHIPPED) {
            OrderStatus::Confirmed
        } else {
            OrderStatus::InFlight
        }
    }

    /// The order's saga as its recorded facts rebuild it, if the orchestrated flow started one.
    #[must_use]
    pub fn saga_run(&self) -> Option<SagaRun> {
        self.saga.as_ref().map(|facts| SagaRun::resume(saga::shape(), facts).0)
    }

    /// Whether the chain recorded `kind`, or the saga's facts hold `step` succeeding.
    fn did(&self, kind: u16, step: &str) -> bool {
        match &self.saga {
            Some(facts) => saga::finished(facts, step, StepOutcome::Succeeded),
            None => self.has(kind),
        }
    }

    /// Whether the customer was charged.
    #[must_use]
    pub fn charged(&self) -> bool {
        self.did(kinds::CHARGED, "charge")
    }

    /// Whether the order holds a reservation.
    #[must_use]
    pub fn reserved(&self) -> bool {
        self.did(kinds::RESERVED, "reserve")
    }

    /// Whether the order shipped.
    #[must_use]
    pub fn shipped(&self) -> bool {
        self.did(kinds::SHIPPED, "ship")
    }

    /// Why a cancelled order was cancelled: the chain records it; a saga's first failed step
    /// tells it (`None`: the shipment failed).
    #[must_use]
    pub fn cancel_cause(&self) -> Option<CancelReason> {
        let Some(run) = self.saga_run() else { return self.cancel_reason };
        let failed = run.failed();
        let shape = saga::shape();
        if shape.step("charge").is_some_and(|step| failed.contains(&step)) {
            Some(CancelReason::PaymentDeclined)
        } else if shape.step("reserve").is_some_and(|step| failed.contains(&step)) {
            Some(CancelReason::OutOfStock)
        } else {
            None
        }
    }

    /// Whether its side effects were (or are to be) undone.
    #[must_use]
    pub fn compensated(&self) -> bool {
        matches!(self.status(), OrderStatus::Cancelled | OrderStatus::DeadLettered)
    }

    /// Whether the notification on `channel` (0 email, 1 SMS) is settled: sent or dead-lettered.
    fn notified(&self, kind: u16, channel: usize) -> bool {
        self.has(kind) || self.notify_dead[channel]
    }

    /// The events to inject, by stage name, to take the order to its end from here.
    #[must_use]
    pub fn resume(&self) -> Vec<(&'static str, OrderEvent)> {
        let Some(order) = self.order else { return Vec::new() };
        let generation = self.generation;
        let event = |stage, step| (stage, OrderEvent { order, step, generation });
        if let Some(run) = self.saga_run() {
            return self.resume_saga(&run, event);
        }
        if matches!(self.status(), OrderStatus::Cancelled | OrderStatus::DeadLettered) {
            return Vec::new();
        }
        if self.has(kinds::RESERVED) {
            let mut steps = Vec::new();
            if !self.has(kinds::SHIPPED) {
                steps.push(event(names::SHIPPING, Step::Ship));
            }
            steps.extend(self.unsent_notifications(event));
            return steps;
        }
        let step = if self.has(kinds::DECLINED) {
            event(names::COMPENSATION, Step::Compensate(CancelReason::PaymentDeclined))
        } else if self.has(kinds::OUT_OF_STOCK) {
            event(names::COMPENSATION, Step::Compensate(CancelReason::OutOfStock))
        } else if self.has(kinds::CHARGED) {
            event(names::INVENTORY, Step::Reserve)
        } else if self.has(kinds::ACCEPTED) {
            event(names::PAYMENT, Step::Charge)
        } else {
            event(names::ORDER, Step::Place)
        };
        vec![step]
    }

    /// The facts a saga's history lacks, by the payment provider's books: a saga the facts show
    /// charged, running still, whose charge the provider has refunded was being compensated by
    /// a run that crashed before its record of that was durable (the answers of its steps were
    /// lost with it). The steps it still runs count as timed out, so that everything completed
    /// is compensated, as it was being. Nothing when the books agree with the facts.
    #[must_use]
    pub fn saga_reconciliation(&self, id: u64, provider: &SimulatedGateway) -> Vec<Fact> {
        let Some(run) = self.saga_run() else { return Vec::new() };
        let refunded = |account: Account| account.generation == self.generation && account.refunded_cents > 0;
        if run.end().is_some() || !self.charged() || !provider.account(id).is_some_and(refunded) {
            return Vec::new();
        }
        let timed_out = |command| match command {
            Command::Start(step) => Some(Fact::Finished(step, StepOutcome::TimedOut)),
            _ => None,
        };
        run.owed().into_iter().filter_map(timed_out).collect()
    }

    /// The notifications of a confirmed order that are neither sent nor dead-lettered.
    fn unsent_notifications(
        &self,
        event: impl Fn(&'static str, Step) -> (&'static str, OrderEvent),
    ) -> Vec<(&'static str, OrderEvent)> {
        let mut steps = Vec::new();
        if !self.notified(kinds::EMAILED, 0) {
            steps.push(event(names::EMAIL, Step::Notify));
        }
        if !self.notified(kinds::TEXTED, 1) {
            steps.push(event(names::SMS, Step::Notify));
        }
        steps
    }

    /// What a saga still owes, as events: each step started and not finished goes to its stage
    /// again (actions are idempotent), a compensation under way to the compensation stage (which
    /// asks the book for the rest); a completed saga's unsent notifications.
    fn resume_saga(
        &self,
        run: &SagaRun,
        event: impl Fn(&'static str, Step) -> (&'static str, OrderEvent),
    ) -> Vec<(&'static str, OrderEvent)> {
        match run.end() {
            Some(SagaEnd::Completed) => self.unsent_notifications(event),
            Some(_) => Vec::new(),
            None => {
                let mut steps = Vec::new();
                for command in run.owed() {
                    match command {
                        Command::Start(step) => {
                            if let Some((stage, asked)) = saga::step_stage(step) {
                                steps.push(event(stage, asked));
                            }
                        }
                        Command::Compensate(_) if !steps.iter().any(|(stage, _)| *stage == names::COMPENSATION) => {
                            steps.push(event(names::COMPENSATION, Step::Undo));
                        }
                        Command::Compensate(_) | Command::Finish(_) => {}
                    }
                }
                steps
            }
        }
    }

    /// [`OrderHistory::resume`], reconciled with the payment provider's books: an order the
    /// history shows charged and not compensated, whose charge the provider has refunded, was
    /// dead-lettered and compensated by a run that crashed before its record of that was durable.
    /// It goes back to payment, where the provider's answer dead-letters it again.
    #[must_use]
    pub fn resume_reconciled(&self, id: u64, provider: &SimulatedGateway) -> Vec<(&'static str, OrderEvent)> {
        let refunded = |account: Account| account.generation == self.generation && account.refunded_cents > 0;
        match self.order {
            Some(order)
                if self.saga.is_none()
                    && self.charged()
                    && !self.compensated()
                    && self.status() == OrderStatus::InFlight
                    && provider.account(id).is_some_and(refunded) =>
            {
                vec![(names::PAYMENT, OrderEvent { order, step: Step::Charge, generation: self.generation })]
            }
            _ => self.resume(),
        }
    }

    /// The envelopes that take order `id` to its end from here, by stage name: its resumed steps,
    /// descending from its last record, with its correlation id, reconciled with `provider`'s
    /// books (see [`OrderHistory::resume_reconciled`]).
    #[must_use]
    pub fn resume_envelopes(
        &self,
        id: u64,
        provider: &SimulatedGateway,
    ) -> Vec<(&'static str, conduit::Envelope<OrderEvent>)> {
        self.resume_reconciled(id, provider).into_iter().map(|(stage, msg)| (stage, self.envelope(id, msg))).collect()
    }

    /// `msg` for order `id` as a resumed event: descending from the order's last record, with
    /// its correlation id.
    #[must_use]
    pub fn envelope(&self, id: u64, msg: OrderEvent) -> conduit::Envelope<OrderEvent> {
        conduit::Envelope {
            key: id,
            seq: self.correlation,
            cause: self.last_id,
            attempt: 0,
            slot: 0,
            token: 0,
            deadline: conduit::Deadline::NEVER,
            msg,
        }
    }

    /// The facts this history must never hold together, or in this order.
    pub(crate) fn check(&mut self) {
        if self.saga.is_some() {
            self.check_saga();
        } else {
            self.check_chain();
        }
        // A saga's step whose fact reached the log before the fact that started it, the latter
        // lost in a crash, runs again on recovery (idempotently: the other side's books hold one
        // effect) and records its fact and the notifications again; the chain never runs a
        // recorded step again.
        let saga = self.saga.is_some();
        let replayed = |kind: usize| saga && [kinds::EMAILED, kinds::TEXTED].iter().any(|&k| usize::from(k) == kind);
        for kind in 1..FACTS {
            if self.counts[kind] > 1 && !replayed(kind) {
                let kind = u16::try_from(kind).unwrap_or(0);
                self.note(format!("{} recorded {} times", kinds::name(kind), self.counts[usize::from(kind)]));
            }
        }
    }

    /// The chain's rules.
    fn check_chain(&mut self) {
        let rules: [(bool, &str); 10] = [
            (self.order.is_none(), "records without a placed order"),
            (self.has(kinds::ACCEPTED) && self.counts[usize::from(kinds::PLACED)] == 0, "accepted but never placed"),
            (self.has(kinds::CHARGED) && !self.has(kinds::ACCEPTED), "charged but never accepted"),
            (self.has(kinds::CHARGED) && self.has(kinds::DECLINED), "both charged and declined"),
            (self.has(kinds::RESERVED) && !self.has(kinds::CHARGED), "reserved but never charged"),
            (self.has(kinds::RESERVED) && self.has(kinds::OUT_OF_STOCK), "both reserved and out of stock"),
            (self.has(kinds::SHIPPED) && !self.has(kinds::RESERVED), "shipped but never reserved"),
            (
                (self.has(kinds::EMAILED) || self.has(kinds::TEXTED)) && !self.has(kinds::RESERVED),
                "notified but never reserved",
            ),
            (
                self.has(kinds::CANCELLED) && !(self.has(kinds::DECLINED) || self.has(kinds::OUT_OF_STOCK)),
                "cancelled without a reason",
            ),
            (self.has(kinds::SHIPPED) && self.has(kinds::CANCELLED), "both shipped and cancelled"),
        ];
        if let Some((_, problem)) = rules.iter().find(|(broken, _)| *broken) {
            self.note((*problem).to_owned());
        }
    }
}

impl OrderHistory {
    /// A saga's rules: only saga facts beside the order's placement and notifications, each
    /// step finished once and compensated at most once, never notified of a saga that ended
    /// otherwise than completed. (A saga in flight may show a notification before the facts that
    /// complete it: parallel steps are recorded by different threads, and a crash may cut the
    /// log between them; resuming completes it.)
    fn check_saga(&mut self) {
        let chain = [
            kinds::ACCEPTED,
            kinds::CHARGED,
            kinds::DECLINED,
            kinds::RESERVED,
            kinds::OUT_OF_STOCK,
            kinds::SHIPPED,
            kinds::CANCELLED,
        ];
        let chain = chain.iter().find(|&&kind| self.has(kind));
        let notified = self.has(kinds::EMAILED) || self.has(kinds::TEXTED);
        let undone = self.saga_run().is_some_and(|run| run.end().is_some_and(|end| *end != SagaEnd::Completed));
        let facts = self.saga.as_deref().unwrap_or_default();
        // The same fact twice is a step run again after a crash (see `check`); one step with two
        // outcomes is not.
        let twice = facts.iter().enumerate().find_map(|(i, fact)| {
            let other_outcome = |other: &Fact| match (fact, other) {
                (Fact::Finished(a, first), Fact::Finished(b, then)) => a == b && first != then,
                _ => false,
            };
            facts[i + 1..].iter().any(other_outcome).then_some(*fact)
        });
        if self.order.is_none() {
            self.note("records without a placed order".into());
        } else if let Some(&kind) = chain {
            self.note(format!("the chain's {} in a saga's history", kinds::name(kind)));
        } else if notified && undone {
            self.note("notified, but its saga was undone".into());
        } else if let Some(fact) = twice {
            self.note(format!("saga fact {fact:?} recorded with another outcome for its step"));
        }
    }
}

impl Aggregate for OrderHistory {
    fn apply(&mut self, record: &Record) {
        if record.version != self.version + 1 {
            self.note(format!("version {} follows version {}", record.version, self.version));
        }
        self.version = record.version;
        self.last_id = record.id;
        self.correlation = record.correlation;
        self.last_timestamp_us = record.timestamp_us;
        match record.kind {
            KIND_REDRIVEN => self.redriven(record),
            KIND_PURGED => {} // The dead letter leaves the list; the order stays as it was.
            KIND_DEAD_LETTER => {
                let stage = names::of_index(record.stage);
                let notification = OrderEvent::decode(&record.payload).is_some_and(|e| e.step == Step::Notify);
                if stage == names::EMAIL {
                    self.notify_dead[0] = true;
                } else if stage == names::SMS {
                    self.notify_dead[1] = true;
                } else if notification {
                    // Published with no notifier bound: neither channel will ever send it.
                    self.notify_dead = [true, true];
                } else {
                    self.dead_letter_stage.get_or_insert(record.stage);
                }
                if self.order.is_none() {
                    self.order = OrderEvent::decode(&record.payload).map(|e| e.order);
                }
            }
            kinds::SAGA_STARTED => {
                if self.saga.replace(Vec::new()).is_some() {
                    self.note("saga started twice".into());
                }
            }
            kinds::SAGA => {
                let fact = saga::read_fact(&record.payload).map(|(fact, _)| fact);
                match (&mut self.saga, fact) {
                    (Some(facts), Some(fact)) => facts.push(fact),
                    (None, _) => self.note("a saga fact before the saga started".into()),
                    (Some(_), None) => self.note("a saga record holds no fact".into()),
                }
            }
            kind if usize::from(kind) < FACTS && kind > 0 => {
                let count = &mut self.counts[usize::from(kind)];
                *count = count.saturating_add(1);
                if kind == kinds::PLACED {
                    if record.stage != STAGE_INGRESS {
                        self.note(format!("placed by stage {}", names::of_index(record.stage)));
                    }
                    match OrderEvent::decode(&record.payload) {
                        Some(event) if event.order.id == record.stream => self.order = Some(event.order),
                        _ => self.note("placed record holds no valid order".into()),
                    }
                }
                if kind == kinds::CANCELLED {
                    self.cancel_reason = record.payload.first().and_then(|&c| CancelReason::from_code(c));
                }
            }
            other => self.note(format!("unknown record kind {other}")),
        }
    }
}

impl OrderHistory {
    /// A redrive reopens the order: a notification's only clears that channel's dead letter; an
    /// order-path one starts a new generation from the redriven step, its earlier effects
    /// (compensated by the dead letter) kept as past charges and reservations.
    /// Applies a redrive record written in this process (its version is not known yet): the
    /// order reopens and what it resumes descends from the record.
    pub(crate) fn apply_redrive(&mut self, record: &Record) {
        self.redriven(record);
        self.last_id = record.id;
    }

    fn redriven(&mut self, record: &Record) {
        let Some(event) = OrderEvent::decode(&record.payload) else {
            self.note("redrive record holds no valid event".into());
            return;
        };
        if event.step == Step::Notify {
            // Into one notifier, or (published with none bound) into both.
            let (email, sms) = match names::of_index(record.stage) {
                names::EMAIL => (true, false),
                names::SMS => (false, true),
                _ => (true, true),
            };
            self.notify_dead[0] &= !email;
            self.notify_dead[1] &= !sms;
            return;
        }
        if event.generation != self.generation + 1 {
            self.note(format!("redrive to generation {} follows generation {}", event.generation, self.generation));
        }
        self.past_charges += u32::from(self.charged());
        self.past_reservations += u32::from(self.reserved());
        self.generation = event.generation;
        // The redriven step's own fact and every later one belong to the new generation.
        for count in self.counts.iter_mut().skip(usize::from(event.kind()) + 1) {
            *count = 0;
        }
        self.dead_letter_stage = None;
        self.notify_dead = [false; 2];
        self.cancel_reason = None;
    }
}

/// Every order's history in a log.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    /// By order id.
    pub orders: FxHashMap<u64, OrderHistory>,
    /// Frames read.
    pub frames: u64,
    /// Records read.
    pub records: u64,
    /// Orders whose early history retention removed: not judged.
    pub truncated: rustc_hash::FxHashSet<u64>,
}

impl Histories {
    /// Folds records already in memory (a simulation's journal), in order.
    pub fn from_records<'r>(records: impl IntoIterator<Item = &'r Record>) -> Self {
        let mut histories = Self::default();
        records.into_iter().for_each(|record| histories.fold(record));
        histories.check_all();
        histories
    }

    fn fold(&mut self, record: &Record) {
        if record.stream == conduit::log::ENGINE_STREAM {
            // The engine's own records (which messages finished) belong to no order.
            return;
        }
        self.records += 1;
        if !self.orders.contains_key(&record.stream) && (record.version > 1 || self.truncated.contains(&record.stream))
        {
            self.truncated.insert(record.stream);
            return;
        }
        self.orders.entry(record.stream).or_default().apply(record);
    }

    fn check_all(&mut self) {
        for history in self.orders.values_mut() {
            history.check();
        }
    }

    /// Reads the whole log (frames decoded in parallel) and folds every record.
    pub fn read(log: &Log) -> Result<Self, LogError> {
        let mut histories = Self::default();
        log.for_each_frame(|_, frame| {
            histories.frames += 1;
            frame.records.iter().for_each(|record| histories.fold(record));
            Ok(())
        })?;
        histories.check_all();
        Ok(histories)
    }

    /// Reads the histories of the orders `ids` only, through the log's index: what recovery
    /// needs, whatever the length of the history.
    pub fn read_orders(log: &Log, ids: &[u64]) -> Result<Self, LogError> {
        let mut histories = Self::default();
        let mut streams: Vec<(u64, Vec<Record>)> = log.streams(ids)?.into_iter().collect();
        streams.sort_unstable_by_key(|(id, _)| *id);
        for (_, records) in &streams {
            for record in records {
                histories.fold(record);
            }
        }
        histories.check_all();
        Ok(histories)
    }

    /// Checks the provider's books for the terminal orders among `ids` (see [`ProviderAudit`]).
    pub fn audit(&self, provider: &SimulatedGateway, ids: impl IntoIterator<Item = u64>) -> ProviderAudit {
        let mut audit = ProviderAudit { double_charges: provider.ledger().double_charges, ..ProviderAudit::default() };
        for id in ids {
            let Some(history) = self.orders.get(&id) else { continue };
            let Some(order) = history.order else { continue };
            let expected = match history.status() {
                OrderStatus::InFlight => continue,
                OrderStatus::Confirmed => order.amount_cents,
                OrderStatus::Cancelled | OrderStatus::DeadLettered => 0,
            };
            audit.orders += 1;
            let account = provider.account(id);
            if account.is_none() && expected > 0 && provider.forgot_any() {
                audit.outside_window += 1;
                continue;
            }
            let account = account.unwrap_or_default();
            audit.confirmed_total_cents += expected;
            audit.charged_cents += account.charged_cents;
            audit.refunded_cents += account.refunded_cents;
            if account.net_cents() != expected || account.double_charges > 0 {
                audit.wrong_count += 1;
                if audit.wrong.len() < 10 {
                    audit.wrong.push(format!(
                        "order {id} ({:?}) paid {} cents net ({} charges beyond the first), expected {expected}",
                        history.status(),
                        account.net_cents(),
                        account.double_charges
                    ));
                }
            }
        }
        audit
    }

    /// Counts by status and the ledger, as the log tells them.
    #[must_use]
    pub fn verify(&self) -> VerifyReport {
        let mut report = VerifyReport {
            frames: self.frames,
            records: self.records,
            truncated: self.truncated.len() as u64,
            ..VerifyReport::default()
        };
        let mut problems: BTreeMap<u64, String> = BTreeMap::new();
        for (&id, history) in &self.orders {
            report.orders += 1;
            let amount = history.order.map_or(0, |o| o.amount_cents);
            match history.status() {
                OrderStatus::Confirmed => {
                    report.confirmed += 1;
                    report.ledger.confirmed_total_cents += amount;
                }
                OrderStatus::Cancelled => report.cancelled += 1,
                OrderStatus::DeadLettered => report.dead_lettered += 1,
                OrderStatus::InFlight => {
                    report.in_flight += 1;
                    if !history.resume().is_empty() {
                        report.resumable += 1;
                    }
                }
            }
            if history.status() != OrderStatus::InFlight {
                let past = amount * u64::from(history.past_charges);
                report.ledger.charged_cents += past;
                report.ledger.refunded_cents += past;
                if history.charged() {
                    report.ledger.charged_cents += amount;
                    if history.compensated() {
                        report.ledger.refunded_cents += amount;
                    }
                }
            }
            if history.counts[usize::from(kinds::CHARGED)] > 1 {
                report.ledger.double_charges += 1;
            }
            if let Some(problem) = &history.problem {
                problems.insert(id, problem.clone());
            }
        }
        let ledger = &mut report.ledger;
        ledger.balanced = ledger.double_charges == 0
            && ledger.charged_cents.checked_sub(ledger.refunded_cents) == Some(ledger.confirmed_total_cents);
        report.problem_count = problems.len() as u64;
        report.problems = problems.into_iter().take(20).map(|(id, p)| format!("order {id}: {p}")).collect();
        if report.in_flight != report.resumable {
            report.problems.push(format!("{} in-flight orders cannot be resumed", report.in_flight - report.resumable));
        }
        if !report.ledger.balanced {
            report.problems.push(format!(
                "ledger unbalanced: charged {} - refunded {} != confirmed {} (double charges: {})",
                report.ledger.charged_cents,
                report.ledger.refunded_cents,
                report.ledger.confirmed_total_cents,
                report.ledger.double_charges
            ));
        }
        report.ok = report.problems.is_empty();
        report
    }
}

/// The payment provider's books against the log: what each terminal order paid, net of refunds,
/// must be its amount if it was confirmed and nothing otherwise, whatever key was used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProviderAudit {
    /// Terminal orders checked.
    pub orders: u64,
    /// Of those, confirmed orders whose charge has left the provider's window (not judged).
    pub outside_window: u64,
    /// What the provider charged the checked orders (latest generation, double charges included).
    pub charged_cents: u64,
    /// What it refunded them.
    pub refunded_cents: u64,
    /// What the confirmed ones among them cost.
    pub confirmed_total_cents: u64,
    /// Double charges anywhere in the provider's books (not only the checked orders).
    pub double_charges: u64,
    /// Orders whose net payment is not what their outcome says.
    pub wrong_count: u64,
    /// The first of them, described.
    pub wrong: Vec<String>,
}

impl ProviderAudit {
    /// No double charge and every checked order paid what its outcome says.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.double_charges == 0 && self.wrong_count == 0
    }

    /// The audit as a run report's ledger (`replays` and `timeouts` from the run).
    #[must_use]
    pub fn ledger(&self, idempotent_replays: u64, timeouts: u64) -> crate::LedgerReport {
        crate::LedgerReport {
            charged_cents: self.charged_cents,
            refunded_cents: self.refunded_cents,
            confirmed_total_cents: self.confirmed_total_cents,
            double_charges: self.double_charges,
            idempotent_replays,
            timeouts,
            balanced: self.ok(),
        }
    }
}

/// The ledger as the log tells it, over terminal orders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VerifiedLedger {
    /// Charges of terminal orders.
    pub charged_cents: u64,
    /// Of those, compensated (cancelled or dead-lettered).
    pub refunded_cents: u64,
    /// What confirmed orders cost.
    pub confirmed_total_cents: u64,
    /// Orders with more than one charge.
    pub double_charges: u64,
    /// `charged - refunded == confirmed_total` and no double charge.
    pub balanced: bool,
}

/// What `conduit log verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Whether every invariant holds.
    pub ok: bool,
    /// Frames read (every checksum and archive checked).
    pub frames: u64,
    /// Records read.
    pub records: u64,
    /// Orders whose early history retention removed (not judged).
    pub truncated: u64,
    /// Distinct orders.
    pub orders: u64,
    /// Shipped.
    pub confirmed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Not terminal.
    pub in_flight: u64,
    /// Of those, with a known next step.
    pub resumable: u64,
    /// The ledger over terminal orders.
    pub ledger: VerifiedLedger,
    /// Orders whose history breaks an invariant.
    pub problem_count: u64,
    /// The first problems found, described.
    pub problems: Vec<String>,
    /// The terminal orders against the payment provider's own books, when they were read.
    pub provider: Option<ProviderAudit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stream: u64, version: u32, kind: u16, payload: Vec<u8>) -> Record {
        Record { stream, version, kind, payload, id: u64::from(version), ..Record::default() }
    }

    fn placed(id: u64) -> Record {
        let mut payload = Vec::new();
        let order = Order { id, customer: 1, sku: 2, quantity: 1, amount_cents: 500 };
        OrderEvent::place(order).encode(&mut payload);
        Record { stage: STAGE_INGRESS, ..record(id, 1, kinds::PLACED, payload) }
    }

    fn fold(kinds: &[u16]) -> OrderHistory {
        let mut history = OrderHistory::default();
        history.apply(&placed(9));
        for (i, &kind) in kinds.iter().enumerate() {
            history.apply(&record(9, u32::try_from(i).unwrap_or(0) + 2, kind, Vec::new()));
        }
        history.check();
        history
    }

    #[test]
    fn each_stop_resumes_at_the_next_stage() {
        let next = |facts: &[u16]| fold(facts).resume().iter().map(|(s, _)| *s).collect::<Vec<_>>();
        assert_eq!(next(&[]), [names::ORDER]);
        assert_eq!(next(&[kinds::ACCEPTED]), [names::PAYMENT]);
        assert_eq!(next(&[kinds::ACCEPTED, kinds::CHARGED]), [names::INVENTORY]);
        assert_eq!(
            next(&[kinds::ACCEPTED, kinds::CHARGED, kinds::RESERVED]),
            [names::SHIPPING, names::EMAIL, names::SMS]
        );
        assert_eq!(
            next(&[kinds::ACCEPTED, kinds::CHARGED, kinds::RESERVED, kinds::TEXTED]),
            [names::SHIPPING, names::EMAIL]
        );
        assert_eq!(next(&[kinds::ACCEPTED, kinds::CHARGED, kinds::OUT_OF_STOCK]), [names::COMPENSATION]);
        assert_eq!(next(&[kinds::ACCEPTED, kinds::DECLINED]), [names::COMPENSATION]);
        let done =
            fold(&[kinds::ACCEPTED, kinds::CHARGED, kinds::RESERVED, kinds::SHIPPED, kinds::EMAILED, kinds::TEXTED]);
        assert_eq!((done.status(), done.resume().len(), done.problem.clone()), (OrderStatus::Confirmed, 0, None));
    }

    #[test]
    fn impossible_histories_are_reported() {
        assert!(fold(&[kinds::ACCEPTED, kinds::CHARGED, kinds::CHARGED])
            .problem
            .is_some_and(|p| p.contains("charged recorded 2 times")));
        assert!(fold(&[kinds::SHIPPED]).problem.is_some_and(|p| p.contains("shipped but never reserved")));
        let mut gap = OrderHistory::default();
        gap.apply(&placed(9));
        gap.apply(&record(9, 3, kinds::ACCEPTED, Vec::new()));
        assert!(gap.problem.is_some_and(|p| p.contains("version 3 follows version 1")));
    }

    /// A saga's history: placed, started, then `facts` as saga records and `kinds` as plain ones.
    fn saga(facts: &[Fact], then: &[u16]) -> OrderHistory {
        let mut history = OrderHistory::default();
        history.apply(&placed(9));
        history.apply(&record(9, 2, kinds::SAGA_STARTED, Vec::new()));
        let records = facts.iter().map(|&fact| (kinds::SAGA, saga::fact_payload(fact, 1).to_vec()));
        let records = records.chain(then.iter().map(|&kind| (kind, Vec::new())));
        for (version, (kind, payload)) in (3..).zip(records) {
            history.apply(&record(9, version, kind, payload));
        }
        history.check();
        history
    }

    #[test]
    fn a_saga_step_run_again_is_not_a_broken_history() {
        let step = |name| saga::shape().step(name).expect("a step");
        let (charge, reserve, ship) = (step("charge"), step("reserve"), step("ship"));
        let done = |step| Fact::Finished(step, StepOutcome::Succeeded);
        // Ship recorded before the charge that started it; the charge lost, run again, and the
        // shipment with it: the same facts and notifications twice.
        let replayed = saga(
            &[done(reserve), done(ship), done(charge), done(ship)],
            &[kinds::EMAILED, kinds::TEXTED, kinds::EMAILED, kinds::TEXTED],
        );
        assert_eq!((replayed.status(), replayed.problem), (OrderStatus::Confirmed, None));
        let torn = saga(&[done(charge), Fact::Finished(charge, StepOutcome::Failed)], &[]);
        assert!(torn.problem.is_some_and(|p| p.contains("recorded with another outcome")));
    }
}
