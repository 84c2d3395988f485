//! The order pipeline under deterministic simulation ([`conduit::sim`]): one seed chooses the
//! simulated world (failure, timeout, decline and poison rates, scarce stock, retry settings),
//! the interleaving of every event, and when the process "crashes". A crash loses whatever the
//! journal had not made durable and every in-memory queue and port of the shop; the restart
//! rebuilds its ports and outcomes from the durable journal and resumes every order in flight, as
//! `recover` does with a real log. The payment provider is not the shop's: it outlives every
//! crash with all its books, and the checks of money read them. Invariants are checked after
//! every step, and at the end every acknowledged order must have finished exactly once, paid
//! what its outcome says on the provider's books, with the books balanced.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::domain::{OrderCodec, OrderEvent, Workload};
use super::history::{Histories, OrderHistory};
use super::pipeline::restore_ports;
use super::ports::SimulatedGateway;
use super::stages::{OrderDeadLetters, Outcomes};
use super::wiring::{build, Built};
use crate::{OrderRouting, SimConfig};
use conduit::log::{Aggregate, Record};
use conduit::sim::Simulation;
use conduit::EngineConfig;

/// What one simulated run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SimulationReport {
    /// The seed: the same seed replays the same run.
    pub seed: u64,
    /// Events handled (and clock moves), over every incarnation.
    pub steps: u64,
    /// Crashes (each followed by a restart from the durable journal).
    pub crashes: u64,
    /// Orders submitted and made durable: acknowledged.
    pub acknowledged: u64,
    /// Orders submitted but lost to a crash before their commit (never acknowledged).
    pub lost_unacknowledged: u64,
    /// Of the acknowledged: how they ended.
    pub confirmed: u64,
    /// Cancelled (declined or out of stock).
    pub cancelled: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Records in the final journal.
    pub records: u64,
}

/// One incarnation of the pipeline: the simulation and the world its handlers act on.
struct Incarnation {
    sim: Simulation<OrderEvent>,
    outcomes: Arc<Outcomes>,
    dead_letters: Arc<OrderDeadLetters>,
}

fn start(
    config: &EngineConfig,
    world: &SimConfig,
    provider: &Arc<SimulatedGateway>,
    durable: &[Record],
    seed: u64,
) -> Result<Incarnation, String> {
    let Built { topology, ports, outcomes, dead_letters, .. } =
        build(config, world, &OrderRouting::default(), Some(Arc::clone(provider))).map_err(|e| e.to_string())?;
    let histories = Histories::from_records(durable);
    restore_ports(&histories, &ports, &outcomes);
    let mut sim = Simulation::new(topology, config, dead_letters.clone(), Arc::new(OrderCodec), durable, seed)
        .map_err(|e| e.to_string())?;
    let mut ids: Vec<&u64> = histories.orders.keys().collect();
    ids.sort_unstable();
    for id in ids {
        for (stage, envelope) in histories.orders[id].resume_envelopes(*id, provider) {
            let stage = sim.stage_id(stage).ok_or("a resumed stage exists")?;
            sim.inject(stage, envelope);
        }
    }
    Ok(Incarnation { sim, outcomes, dead_letters })
}

/// The simulated world and engine settings a seed picks.
fn world(seed: u64, rng: &mut SmallRng) -> Result<(SimConfig, EngineConfig), String> {
    let pick = |rng: &mut SmallRng, choices: &[f64]| choices[rng.random_range(0..choices.len())];
    let world = SimConfig {
        seed,
        skus: 6,
        stock_per_sku: rng.random_range(5..40),
        out_of_stock_rate: pick(rng, &[0.0, 0.2]),
        payment_failure_rate: pick(rng, &[0.0, 0.1, 0.3, 0.6]),
        payment_decline_rate: pick(rng, &[0.0, 0.05]),
        payment_timeout_rate: pick(rng, &[0.0, 0.1]),
        inventory_failure_rate: pick(rng, &[0.0, 0.2]),
        notify_failure_rate: pick(rng, &[0.0, 0.3]),
        poison_rate: pick(rng, &[0.0, 0.05]),
        ..SimConfig::default()
    };
    let config = EngineConfig::from_toml_str(&format!(
        "attempts_max = {}\nretry_backoff_ms_base = {}\nretry_backoff_ms_max = 50\n",
        rng.random_range(1..=5),
        rng.random_range(0..=5),
    ))
    .map_err(|e| e.to_string())?;
    Ok((world, config))
}

/// The money at the end: every acknowledged order paid what its outcome says on the provider's
/// books, the books balance against the confirmed orders, every dead letter was compensated.
fn check_money(
    provider: &SimulatedGateway,
    histories: &Histories,
    acked: &[u64],
    now: &Incarnation,
) -> Result<(), String> {
    let audit = histories.audit(provider, acked.iter().copied());
    if !audit.ok() || audit.orders != acked.len() as u64 {
        return Err(format!("the provider's books disagree with the journal: {audit:?}"));
    }
    let ledger = provider.ledger();
    let outcomes = now.outcomes.figures();
    if ledger.double_charges != 0
        || ledger.charged_cents.checked_sub(ledger.refunded_cents) != Some(outcomes.confirmed_total_cents)
    {
        return Err(format!("the books do not balance: {ledger:?} against {outcomes:?}"));
    }
    if now.dead_letters.compensation_failures.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        return Err("a dead-lettered order could not be compensated".into());
    }
    Ok(())
}

/// Runs one seeded simulation of `actions` actions (submissions, commits, crashes, steps) and
/// drains it. `Err` describes the first broken invariant, with the seed and step.
pub fn simulate(seed: u64, actions: u32) -> Result<SimulationReport, String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (world, config) = world(seed, &mut rng)?;
    let fail = |step: u64, what: String| Err(format!("simulation seed {seed} failed at step {step}: {what}"));

    let mut workload = Workload::new(seed, world.skus, 50).poisoned(world.poison_rate);
    let mut durable: Vec<Record> = Vec::new();
    // The payment provider is another company's system: a crash of the pipeline loses none of
    // its books, so every check of money reads them, not the pipeline's journal.
    let provider = Arc::new(world.payment_gateway());
    let mut now = start(&config, &world, &provider, &durable, rng.random())?;
    let mut report = SimulationReport { seed, ..SimulationReport::default() };
    let (mut acked, mut pending): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    let mut folded = Histories::default();
    let mut checked = 0usize;
    for action in 0..actions {
        match rng.random_range(0..100) {
            0..=24 => {
                for order in workload.by_ref().take(rng.random_range(1..=4)) {
                    pending.push(order.id);
                    now.sim.submit(OrderEvent::place(order));
                }
            }
            25..=31 => {
                // A group commit: everything journaled so far is durable, its submissions are
                // acknowledged, and only now do they enter the pipeline.
                let acknowledged = now.sim.sync();
                if acknowledged != pending.len() {
                    return fail(now.sim.steps(), format!("{acknowledged} acknowledged, {} pending", pending.len()));
                }
                durable = now.sim.durable().to_vec();
                acked.append(&mut pending);
            }
            32..=33 => {
                report.crashes += 1;
                report.steps += now.sim.steps();
                report.lost_unacknowledged += pending.len() as u64;
                pending.clear();
                now = start(&config, &world, &provider, &durable, rng.random())?;
                folded = Histories::default();
                checked = 0;
            }
            _ => {
                now.sim.step();
            }
        }
        // Invariants after every action: no double charge, no history broken so far.
        let step = report.steps + now.sim.steps();
        let ledger = provider.ledger();
        if ledger.double_charges > 0 {
            return fail(step, format!("action {action}: {} double charges", ledger.double_charges));
        }
        for record in now.sim.journal()[checked..].iter().filter(|r| r.stream != conduit::log::ENGINE_STREAM) {
            let history = folded.orders.entry(record.stream).or_default();
            history.apply(record);
            let mut probe: OrderHistory = history.clone();
            probe.check();
            if let Some(problem) = probe.problem {
                return fail(step, format!("order {}: {problem}", record.stream));
            }
        }
        checked = now.sim.journal().len();
    }
    // The end: commit, drain, check everything.
    now.sim.sync();
    acked.append(&mut pending);
    let mut settle = 0u32;
    while now.sim.step() {
        settle += 1;
        if settle > 1_000_000 {
            return fail(report.steps + now.sim.steps(), "the pipeline never settled".into());
        }
    }
    report.steps += now.sim.steps();
    let histories = Histories::from_records(now.sim.journal());
    let verify = histories.verify();
    if !verify.ok {
        return fail(report.steps, format!("the journal does not verify: {:?}", verify.problems));
    }
    if verify.orders != acked.len() as u64 {
        return fail(report.steps, format!("{} orders in the journal, {} acknowledged", verify.orders, acked.len()));
    }
    for id in &acked {
        let Some(history) = histories.orders.get(id) else {
            return fail(report.steps, format!("acknowledged order {id} is not in the journal"));
        };
        if history.status() == super::history::OrderStatus::InFlight {
            return fail(report.steps, format!("acknowledged order {id} never finished"));
        }
    }
    if let Err(what) = check_money(&provider, &histories, &acked, &now) {
        return fail(report.steps, what);
    }
    report.acknowledged = acked.len() as u64;
    report.confirmed = verify.confirmed;
    report.cancelled = verify.cancelled;
    report.dead_lettered = verify.dead_lettered;
    report.records = now.sim.journal().len() as u64;
    Ok(report)
}
