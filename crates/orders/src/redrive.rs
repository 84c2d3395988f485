//! Redriving the order pipeline's dead letters from its log.
//!
//! A dead letter of the order path was compensated when it landed (its charge refunded, its
//! stock released), so a redrive cannot simply hand the original event back: it starts a new
//! *generation* of the order's saga, under fresh idempotency keys, from its first undone step
//! (payment if the order was accepted, the order stage otherwise). A notification's dead letter
//! left the order alone, so its redrive resends that notification under the same key. Either way
//! the redrive is a [`KIND_REDRIVEN`](conduit::log::KIND_REDRIVEN) record, committed before the
//! event is sent; a redriven event that fails again is a new dead letter, its earlier ones kept.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::domain::{kinds, OrderEvent, Step};
use super::history::{Histories, OrderHistory, OrderStatus, VerifyReport};
use super::stages::names;
use crate::ports::SimulatedGateway;
use crate::{OrderPipeline, RunError, RunReport, SimConfig};
use conduit::dlq::{self, DeadLetterIndex, Selection, StoredDeadLetter};
use conduit::log::Log;
use conduit::EngineConfig;

/// What to redrive, and how fast.
#[derive(Debug, Clone, Default)]
pub struct RedrivePlan {
    /// The dead letters (open ones only).
    pub selection: Selection,
    /// Only say what would be redriven.
    pub dry_run: bool,
    /// At most this many redrives per second (none: all at once).
    pub rate_per_sec: Option<u64>,
}

/// One dead letter's redrive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedriveItem {
    /// The dead letter's id.
    pub id: u64,
    /// The order.
    pub order: u64,
    /// The stage that gave up on it.
    pub from_stage: String,
    /// Why it had.
    pub reason: String,
    /// Where the redrive sends it (`email+sms` for a notification no notifier was bound to).
    pub to_stage: String,
    /// The order's saga generation the redrive runs.
    pub generation: u32,
}

/// What a redrive did.
#[derive(Debug, Clone, Serialize)]
pub struct RedriveReport {
    /// Nothing was written.
    pub dry_run: bool,
    /// Open dead letters the selection named.
    pub selected: u64,
    /// The redrives (planned, on a dry run).
    pub redriven: Vec<RedriveItem>,
    /// Dead letters that cannot be redriven, and why.
    pub skipped: Vec<String>,
    /// Redriven orders that landed in the dead letters again.
    pub dead_lettered_again: u64,
    /// The run that carried the redriven events (and any order the log left in flight).
    pub run: Option<RunReport>,
    /// The log verified afterwards.
    pub verify: Option<VerifyReport>,
}

/// Where one dead letter's redrive starts: the stage, its journal index, and the event.
struct Target {
    stage: &'static str,
    index: u16,
    event: OrderEvent,
}

/// Plans the redrive of `letter`, or says why it cannot be.
fn target(letter: &StoredDeadLetter, history: Option<&OrderHistory>) -> Result<Target, String> {
    let event = OrderEvent::decode(&letter.payload).ok_or("its payload is not an order event")?;
    let history = history.ok_or("its order is not in the log")?;
    if event.generation != history.generation {
        return Err(format!("superseded: the order runs generation {} now", history.generation));
    }
    if event.step == Step::Notify {
        let stage = names::of_index(letter.stage);
        let stage = if stage == names::EMAIL || stage == names::SMS { stage } else { "email+sms" };
        return Ok(Target { stage, index: letter.stage, event });
    }
    if history.saga.is_some() {
        // A saga's dead letter ended it, its completed steps undone: a new generation of a saga
        // is not something its flows know how to start.
        return Err(
            "its order ran a saga, which ended compensated: a saga is not redriven (place the order again)".into()
        );
    }
    if history.status() != OrderStatus::DeadLettered {
        return Err(format!("its order is {:?}, not dead-lettered", history.status()).to_lowercase());
    }
    let (stage, step) = if history.counts[usize::from(kinds::ACCEPTED)] > 0 {
        (names::PAYMENT, Step::Charge)
    } else {
        (names::ORDER, Step::Place)
    };
    let index = names::index_of(stage).ok_or("no such stage")?;
    Ok(Target { stage, index, event: OrderEvent { step, generation: history.generation + 1, ..event } })
}

/// Redrives the dead letters `plan` selects from `log`: resumes any order the log left in flight,
/// commits a redrive record per dead letter and sends its event on (`plan.rate_per_sec` at a
/// time, each second), drains, and verifies the log. The payment provider keeps its books where
/// `sim.payment_books` says, if it says.
pub fn redrive(
    config: &EngineConfig,
    sim: &SimConfig,
    log: &Arc<Log>,
    plan: &RedrivePlan,
) -> Result<RedriveReport, RunError> {
    // A dry run opens (and so creates) no books.
    let provider = if plan.dry_run { None } else { crate::open_provider(sim)? };
    redrive_with_provider(config, sim, log, plan, provider.as_ref())
}

/// [`redrive`] calling `provider` (one that keeps its books, judged on them at the end), or a
/// fresh simulated provider when `None`.
pub fn redrive_with_provider(
    config: &EngineConfig,
    sim: &SimConfig,
    log: &Arc<Log>,
    plan: &RedrivePlan,
    provider: Option<&Arc<SimulatedGateway>>,
) -> Result<RedriveReport, RunError> {
    let index = DeadLetterIndex::read(log)?;
    let selected = index.select(&plan.selection);
    let mut histories = Histories::read(log)?;
    let mut report = RedriveReport {
        dry_run: plan.dry_run,
        selected: selected.len() as u64,
        redriven: Vec::new(),
        skipped: Vec::new(),
        dead_lettered_again: 0,
        run: None,
        verify: None,
    };
    let mut targets = Vec::new();
    for letter in selected {
        match target(letter, histories.orders.get(&letter.stream)) {
            Ok(target) => {
                report.redriven.push(RedriveItem {
                    id: letter.id,
                    order: letter.stream,
                    from_stage: names::of_index(letter.stage).to_owned(),
                    reason: letter.kind_name().to_owned(),
                    to_stage: target.stage.to_owned(),
                    generation: target.event.generation,
                });
                targets.push((letter, target));
            }
            Err(why) => report.skipped.push(format!("dead letter {} (order {}): {why}", letter.id, letter.stream)),
        }
    }
    if plan.dry_run {
        return Ok(report);
    }
    let pipeline = OrderPipeline::launch(
        config,
        sim,
        &crate::OrderRouting::default(),
        Some(Arc::clone(log)),
        Some(&histories),
        provider.cloned(),
        true,
    )?;
    let poisoned = |error: conduit::SubmitError<Vec<OrderEvent>>, pipeline: OrderPipeline| RunError::Poisoned {
        unsent: error.into_inner().len(),
        report: Box::new(pipeline.finish()),
    };
    if let Err(error) = pipeline.resume(&histories) {
        return Err(poisoned(error, pipeline));
    }
    let chunk = plan.rate_per_sec.map_or(usize::MAX, |rate| usize::try_from(rate.max(1)).unwrap_or(usize::MAX));
    let mut redriven_orders = std::collections::BTreeSet::new();
    for (round, batch) in targets.chunks(chunk).enumerate() {
        let started = Instant::now();
        let records: Vec<_> = batch
            .iter()
            .map(|(letter, target)| {
                let mut payload = Vec::new();
                target.event.encode(&mut payload);
                dlq::redrive_record(log, letter, target.index, target.event.kind(), payload)
            })
            .collect();
        log.append(records.clone())?.wait()?;
        let mut reopened: BTreeMap<u64, OrderHistory> = BTreeMap::new();
        for ((letter, target), record) in batch.iter().zip(&records) {
            let Some(history) = histories.orders.get_mut(&letter.stream) else { continue };
            if target.event.step != Step::Notify {
                pipeline.reopen_dead_lettered();
            }
            history.apply_redrive(record);
            reopened.insert(letter.stream, history.clone());
            redriven_orders.insert(letter.stream);
        }
        if let Err(error) = pipeline.resume_each(reopened.iter().map(|(id, history)| (*id, history))) {
            return Err(poisoned(error, pipeline));
        }
        if plan.rate_per_sec.is_some() && (round + 1) * chunk < targets.len() {
            std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
        }
    }
    let (mut run, letters) = pipeline.finish_with_dead_letters();
    report.dead_lettered_again =
        letters.iter().filter(|letter| redriven_orders.contains(&letter.order.id)).count() as u64;
    if let Some(log) = &mut run.log {
        log.other_records = targets.len() as u64;
    }
    let verify = match provider {
        // The provider's books hold every earlier charge: the log's orders are judged on them.
        Some(provider) => {
            let verify = crate::verify_with_provider(log, provider)?;
            if let Some(audit) = &verify.provider {
                run.ledger = audit.ledger(run.ledger.idempotent_replays, run.ledger.timeouts);
            }
            verify
        }
        None => Histories::read(log)?.verify(),
    };
    report.run = Some(run);
    report.verify = Some(verify);
    Ok(report)
}
