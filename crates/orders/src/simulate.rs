//! The order pipeline under deterministic simulation ([`conduit::sim`]) on the real log: one seed
//! (or a fuzzer's bytes) chooses the simulated world (failure, timeout, decline and poison rates,
//! scarce stock, retry settings, the log's quick repair), the interleaving of every event, and
//! when the power goes. The log runs on an in-memory disk with a disk's crash semantics
//! ([`MemoryDisk`]), checkpointing every few dozen records and keeping only a few kilobytes
//! (retention), so checkpoints, frame removal and crash recovery all run under the simulation. A
//! power cut comes between commits or during one (its writes dropped, or partly kept and torn);
//! the restart reopens the log from what the disk kept, rebuilds the ports and outcomes from it,
//! and resumes every order in flight, as `recover` does. The payment provider is not the shop's:
//! it outlives every cut with all its books, and the checks of money read them. Invariants are
//! checked after every action, and at the end every acknowledged order must have finished
//! exactly once, paid what its outcome says on the provider's books, with the books balanced.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::domain::{OrderCodec, OrderEvent, Workload};
use super::history::{Histories, OrderHistory, OrderStatus};
use super::pipeline::{reconciled_record, restore_ports, take_up, SagaFlows};
use super::ports::SimulatedGateway;
use super::stages::{names, OrderDeadLetters};
use super::wiring::{build, Built};
use crate::{Flow, OrderRouting, SimConfig};
use conduit::log::{Aggregate, Log, LogOptions, MemoryDisk, PowerCut, Record, Retention};
use conduit::sim::Simulation;
use conduit::{EngineConfig, EngineSettings};

/// What one simulated run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SimulationReport {
    /// The seed: the same seed replays the same run.
    pub seed: u64,
    /// The order flow the seed chose (`chain` or `orchestrated`).
    pub flow: &'static str,
    /// Events handled (and clock moves), over every incarnation.
    pub steps: u64,
    /// Power cuts (each followed by a restart from what the disk kept).
    pub crashes: u64,
    /// Of those, cuts during a commit.
    pub cuts_in_commit: u64,
    /// Orders submitted and made durable: acknowledged.
    pub acknowledged: u64,
    /// Orders submitted but not acknowledged before a cut (a torn commit may still have kept
    /// them: then they finish like the others).
    pub lost_unacknowledged: u64,
    /// Orders the log ever held: the acknowledged, and any a torn commit kept unacknowledged.
    pub orders: u64,
    /// Of those: how they ended.
    pub confirmed: u64,
    /// Cancelled (declined or out of stock).
    pub cancelled: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Records appended, over every incarnation.
    pub records: u64,
    /// Checkpoints the log wrote, over every incarnation.
    pub checkpoints: u64,
    /// Frames retention removed, over every incarnation.
    pub frames_removed: u64,
}

/// One incarnation of the pipeline: the simulation and the world its handlers act on.
struct Incarnation {
    sim: Simulation<OrderEvent>,
    dead_letters: Arc<OrderDeadLetters>,
}

/// The simulated world and engine settings a seed picks.
fn world(seed: u64, rng: &mut SmallRng) -> Result<(SimConfig, EngineConfig, LogOptions), String> {
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
    // Half the seeds run sagas (orchestrated or choreographed), with a carrier that fails shipments and
    // steps that time out. Drawn from a generator of their own, so the rest of a seed's world is
    // what it was before sagas ran under the simulation.
    let mut sagas = SmallRng::seed_from_u64(seed ^ 0x5A6A_0F10_5A6A_0F10);
    let world = if sagas.random_bool(0.5) {
        SimConfig {
            flow: if sagas.random_bool(0.5) { Flow::Orchestrated } else { Flow::Choreography },
            shipping_failure_rate: pick(&mut sagas, &[0.0, 0.2]),
            saga_step_timeout_ms: [0, 0, 40][sagas.random_range(0..3)],
            ..world
        }
    } else {
        world
    };
    let config = EngineConfig::from_settings(&EngineSettings {
        attempts_max: Some(rng.random_range(1..=5)),
        retry_backoff_ms_base: Some(rng.random_range(0..=5)),
        retry_backoff_ms_max: Some(50),
        ..EngineSettings::default()
    })
    .map_err(|e| e.to_string())?;
    // A checkpoint every 64 records and 16 KiB kept: a run of a few hundred orders checkpoints
    // and removes frames many times.
    let options = LogOptions {
        checkpoint_records: 64,
        retention: Retention { max_bytes: Some(16 << 10), max_age: None },
        quick_repair: rng.random_bool(0.5),
        // One thread drives the run: commits on it, in step with the simulation.
        inline_writer: true,
        ..LogOptions::default()
    };
    Ok((world, config, options))
}

/// A new, empty log's disk image, made once per process: opening a copy costs a fraction of
/// creating a log (redb's create alone takes about 200 µs).
fn empty_log_image() -> Result<Vec<u8>, String> {
    static IMAGE: std::sync::OnceLock<Result<Vec<u8>, String>> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let disk = MemoryDisk::new();
            let log = Log::open_with_backend("simulated disk", disk.clone(), LogOptions::default());
            log.and_then(|log| log.close()).map_err(|e| e.to_string())?;
            Ok(disk.image())
        })
        .clone()
}

/// A run in progress: its world, the provider, the disk and log, the incarnation, what was
/// acknowledged, and what the log ever held.
struct Run {
    seed: u64,
    config: EngineConfig,
    world: SimConfig,
    options: LogOptions,
    rng: SmallRng,
    workload: Workload,
    /// The payment provider is another company's system: a power cut of the shop loses none of
    /// its books, so every check of money reads them.
    provider: Arc<SimulatedGateway>,
    disk: MemoryDisk,
    log: Arc<Log>,
    now: Incarnation,
    report: SimulationReport,
    acked: Vec<u64>,
    pending: Vec<u64>,
    /// Every order as far as the log ever durably held it, what retention removed since
    /// included: the judge of orders the log has forgotten.
    kept: Histories,
    /// How much of this incarnation's journal is folded into `kept`.
    kept_upto: usize,
    /// This incarnation's view, durable or not, checked after every action.
    folded: Histories,
    checked: usize,
}

/// Folds `records` into `histories`, order by order (the engine's own records belong to none).
fn fold<'r>(histories: &mut Histories, records: impl IntoIterator<Item = &'r Record>) {
    for record in records.into_iter().filter(|r| r.stream != conduit::log::ENGINE_STREAM) {
        histories.orders.entry(record.stream).or_default().apply(record);
    }
}

impl Run {
    fn new(seed: u64) -> Result<Self, String> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (world, config, options) = world(seed, &mut rng)?;
        let flow = world.flow.name();
        let workload = Workload::new(seed, world.skus, 50).poisoned(world.poison_rate);
        let provider = Arc::new(world.payment_gateway());
        let disk = MemoryDisk::from_image(empty_log_image()?);
        let log = Arc::new(Log::open_with_backend("simulated disk", disk.clone(), options).map_err(|e| e.to_string())?);
        let now = start(&config, &world, &provider, &log, &Histories::default(), rng.random())?;
        Ok(Self {
            seed,
            config,
            world,
            options,
            rng,
            workload,
            provider,
            disk,
            log,
            now,
            report: SimulationReport { seed, flow, ..SimulationReport::default() },
            acked: Vec::new(),
            pending: Vec::new(),
            kept: Histories::default(),
            kept_upto: 0,
            folded: Histories::default(),
            checked: 0,
        })
    }

    fn fail<T>(&self, what: impl std::fmt::Display) -> Result<T, String> {
        let step = self.report.steps + self.now.sim.steps();
        Err(format!("simulation seed {} failed at step {step}: {what}", self.seed))
    }

    fn submit(&mut self, count: usize) {
        for order in self.workload.by_ref().take(count) {
            self.pending.push(order.id);
            self.now.sim.submit(OrderEvent::place(order));
        }
    }

    /// A group commit: everything journaled so far becomes durable, its submissions are
    /// acknowledged, and only now do they enter the pipeline. If the power goes during it, the
    /// shop restarts from what the disk kept.
    fn sync(&mut self) -> Result<(), String> {
        match self.now.sim.sync() {
            Ok(acknowledged) => {
                if acknowledged != self.pending.len() {
                    return self.fail(format!("{acknowledged} acknowledged, {} pending", self.pending.len()));
                }
                self.acked.append(&mut self.pending);
                let durable = self.now.sim.durable().len();
                fold(&mut self.kept, &self.now.sim.journal()[self.kept_upto..durable]);
                self.kept_upto = durable;
                Ok(())
            }
            Err(_) if self.disk.is_dark() => {
                self.report.cuts_in_commit += 1;
                self.restart()
            }
            Err(error) => self.fail(format!("a commit failed with the power on: {error}")),
        }
    }

    /// The power goes now, between commits: nothing unsynced survives.
    fn cut_power(&mut self) -> Result<(), String> {
        self.restart()
    }

    /// Arms a cut during the `n`th commit from now; its writes are partly kept and torn.
    fn cut_power_in_commit(&mut self, n: u64) {
        let seed = self.rng.random();
        // Clones share the platter: arming the clone arms the disk the log writes to.
        drop(self.disk.clone().with_power_cut_at(self.disk.syncs() + n, PowerCut::Tear { seed }));
    }

    /// The shop's power goes (if it has not yet) and comes back: the log reopens from what the
    /// disk kept, the ports and outcomes are rebuilt from it, and every order in flight resumes.
    fn restart(&mut self) -> Result<(), String> {
        self.report.crashes += 1;
        self.report.steps += self.now.sim.steps();
        self.report.lost_unacknowledged += self.pending.len() as u64;
        self.pending.clear();
        self.count_log();
        self.disk = self.disk.cut_power(PowerCut::Drop);
        let log = Log::open_with_backend("simulated disk", self.disk.clone(), self.options)
            .map_err(|e| format!("the log does not reopen after the cut: {e}"))?;
        self.log = Arc::new(log);
        // A commit the cut interrupted is all there or not at all. Each answered commit left
        // the log's next id just past its records (the simulation takes ids from the log and
        // commits all it took), so ids beyond the unanswered one's first mean it landed (its
        // records may already be gone: retention removes finished work in the same commit).
        let unanswered = &self.now.sim.journal()[self.now.sim.durable().len()..];
        if unanswered.first().is_some_and(|first| self.log.reserve_ids(0) > first.id) {
            fold(&mut self.kept, unanswered);
        }
        let histories = Histories::read(&self.log).map_err(|e| format!("unreadable after the cut: {e}"))?;
        // What the log holds whole is the truth (a landed commit may hold orders never
        // acknowledged); an order it holds only in part keeps what was folded before.
        for (id, history) in &histories.orders {
            self.kept.orders.insert(*id, history.clone());
        }
        self.now = start(&self.config, &self.world, &self.provider, &self.log, &histories, self.rng.random())?;
        self.kept_upto = 0;
        self.folded = self.kept.clone();
        self.checked = 0;
        Ok(())
    }

    fn count_log(&mut self) {
        let stats = self.log.stats();
        self.report.records += stats.events_appended;
        self.report.checkpoints += stats.checkpoints;
        self.report.frames_removed += stats.frames_removed;
    }

    /// Invariants after every action: no double charge, no history broken so far.
    fn check(&mut self, action: u32) -> Result<(), String> {
        let ledger = self.provider.ledger();
        if ledger.double_charges > 0 {
            return self.fail(format!("action {action}: {} double charges", ledger.double_charges));
        }
        let journal = self.now.sim.journal();
        for record in journal[self.checked..].iter().filter(|r| r.stream != conduit::log::ENGINE_STREAM) {
            let history = self.folded.orders.entry(record.stream).or_default();
            history.apply(record);
            let mut probe: OrderHistory = history.clone();
            probe.check();
            if let Some(problem) = probe.problem {
                return self.fail(format!("order {}: {problem}", record.stream));
            }
        }
        self.checked = journal.len();
        Ok(())
    }

    /// Commits, drains and commits again until a drain's records are durable (a cut during
    /// either commit restarts and drains again), then checks everything.
    fn finish(mut self) -> Result<SimulationReport, String> {
        let mut restarts = 0;
        loop {
            let crashes = self.report.crashes;
            self.sync()?;
            let mut settle = 0u32;
            while self.now.sim.step() {
                settle += 1;
                if settle > 1_000_000 {
                    return self.fail("the pipeline never settled");
                }
            }
            self.sync()?;
            if self.report.crashes == crashes {
                break;
            }
            restarts += 1;
            if restarts > 3 {
                return self.fail("the power kept going at the end");
            }
        }
        self.report.steps += self.now.sim.steps();
        self.count_log();
        self.judge()?;
        let verify = self.kept.verify();
        self.report.acknowledged = self.acked.len() as u64;
        self.report.orders = verify.orders;
        self.report.confirmed = verify.confirmed;
        self.report.cancelled = verify.cancelled;
        self.report.dead_lettered = verify.dead_lettered;
        // The run ends with the power going rather than a clean close: everything is judged
        // already, and a close (a checkpoint, redb's own shutdown) costs more than the rest of a
        // short run.
        drop(self.disk.cut_power(PowerCut::Drop));
        Ok(self.report)
    }

    fn judge(&self) -> Result<(), String> {
        // The log as it stands: what retention kept verifies, nothing is in flight, and it
        // still holds every acknowledged order retention had no right to remove.
        let histories = Histories::read(&self.log).map_err(|e| e.to_string())?;
        let verify = histories.verify();
        if !verify.ok || verify.in_flight > 0 {
            return self
                .fail(format!("the log does not verify: {} in flight, {:?}", verify.in_flight, verify.problems));
        }
        let lowest = histories.orders.keys().min().copied().unwrap_or(u64::MAX);
        if let Some(id) = self
            .acked
            .iter()
            .find(|&&id| id >= lowest && !histories.orders.contains_key(&id) && !histories.truncated.contains(&id))
        {
            return self.fail(format!("acknowledged order {id} is not in the log"));
        }
        // Every order the log ever held, as it last held it: each acknowledged one finished,
        // none broken.
        let everything = self.kept.verify();
        if !everything.ok {
            return self.fail(format!("the orders the log held do not verify: {:?}", everything.problems));
        }
        for id in &self.acked {
            match self.kept.orders.get(id).map(OrderHistory::status) {
                None => return self.fail(format!("acknowledged order {id} was never durable")),
                Some(OrderStatus::InFlight) => return self.fail(format!("acknowledged order {id} never finished")),
                Some(_) => {}
            }
        }
        // The money, on the provider's books: every order paid what its outcome says, and the
        // books balance against the confirmed orders; every dead letter was compensated.
        let audit = self.kept.audit(&self.provider, self.kept.orders.keys().copied());
        if !audit.ok() || audit.orders != self.kept.orders.len() as u64 {
            return self.fail(format!("the provider's books disagree with the orders: {audit:?}"));
        }
        let ledger = self.provider.ledger();
        if ledger.double_charges != 0
            || ledger.charged_cents.checked_sub(ledger.refunded_cents) != Some(audit.confirmed_total_cents)
        {
            return self.fail(format!("the books do not balance: {ledger:?} against {audit:?}"));
        }
        if self.now.dead_letters.compensation_failures.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return self.fail("a dead-lettered order could not be compensated");
        }
        Ok(())
    }
}

fn start(
    config: &EngineConfig,
    world: &SimConfig,
    provider: &Arc<SimulatedGateway>,
    log: &Arc<Log>,
    histories: &Histories,
    seed: u64,
) -> Result<Incarnation, String> {
    let Built { topology, ports, outcomes, dead_letters, saga, choreography, .. } =
        build(config, world, &OrderRouting::default(), Some(Arc::clone(provider))).map_err(|e| e.to_string())?;
    restore_ports(histories, &ports, &outcomes);
    let mut sim =
        Simulation::on_log(topology, config, dead_letters.clone(), Arc::new(OrderCodec), Arc::clone(log), seed)
            .map_err(|e| e.to_string())?;
    let mut ids: Vec<&u64> = histories.orders.keys().collect();
    ids.sort_unstable();
    let mut resumed = Vec::new();
    let mut reconciled = Vec::new();
    let flows = SagaFlows { orchestrated: saga.as_deref(), choreography: choreography.as_deref() };
    for &id in ids {
        resumed.extend(take_up(flows, id, &histories.orders[&id], provider, &mut reconciled));
    }
    // Journaled before anything resumed records a later fact, as `recover` does.
    let compensation = sim.stage_id(names::COMPENSATION).ok_or("the compensation stage exists")?;
    for fact in reconciled {
        sim.record(compensation, reconciled_record(fact));
    }
    for (stage, envelope) in resumed {
        let stage = sim.stage_id(stage).ok_or("a resumed stage exists")?;
        sim.inject(stage, envelope);
    }
    Ok(Incarnation { sim, dead_letters })
}

/// Runs one seeded simulation of `actions` actions (submissions, commits, power cuts, steps)
/// and drains it. `Err` describes the first broken invariant, with the seed and step.
pub fn simulate(seed: u64, actions: u32) -> Result<SimulationReport, String> {
    let mut run = Run::new(seed)?;
    for action in 0..actions {
        match run.rng.random_range(0..100) {
            0..=24 => {
                let count = run.rng.random_range(1..=4);
                run.submit(count);
            }
            25..=31 => run.sync()?,
            32 => run.cut_power()?,
            33 => {
                let n = run.rng.random_range(1..=3);
                run.cut_power_in_commit(n);
            }
            _ => {
                run.now.sim.step();
            }
        }
        run.check(action)?;
    }
    run.finish()
}

/// A simulation driven by bytes (the `operations` fuzz target): the first eight seed the world;
/// then each byte is an action, its low three bits the kind and the rest its size: submit 1-4
/// orders (0-2), commit (3), cut the power now (4) or during one of the next three commits (5),
/// or take up to 32 steps (6, 7). At most 512 actions.
pub fn simulate_bytes(data: &[u8]) -> Result<SimulationReport, String> {
    let (seed, actions) = data.split_at(data.len().min(8));
    let mut seed_bytes = [0u8; 8];
    seed_bytes[..seed.len()].copy_from_slice(seed);
    let mut run = Run::new(u64::from_le_bytes(seed_bytes))?;
    for (action, &byte) in (0u32..).zip(actions.iter().take(512)) {
        let size = usize::from(byte >> 3);
        match byte & 7 {
            0..=2 => run.submit(1 + size % 4),
            3 => run.sync()?,
            4 => run.cut_power()?,
            5 => run.cut_power_in_commit(1 + (size % 3) as u64),
            _ => {
                for _ in 0..=size {
                    if !run.now.sim.step() {
                        break;
                    }
                }
            }
        }
        run.check(action)?;
    }
    run.finish()
}
