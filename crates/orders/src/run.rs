//! Running a workload to the end, recovering a log after a crash, and verifying one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::domain::Workload;
use super::history::{Histories, VerifyReport};
use super::ports::{BooksError, LedgerFigures, SimulatedGateway};
use super::report::LoadReport;
use crate::{OrderEvent, OrderPipeline, OrderRouting, RunReport, SimConfig};
use conduit::log::{Log, LogError};
use conduit::{AlertRules, BuildError, Engine, EngineConfig, Snapshot};

/// Orders submitted in one go by [`run`]; bounds the memory of the generator's buffer.
const SUBMIT_CHUNK: usize = 4_096;

/// Generates `orders` seeded orders, pushes them through a new pipeline (journaled to `log` if
/// given), drains it and reports. `progress` is called after each chunk with the orders
/// submitted and finished so far.
pub fn run(
    config: &EngineConfig,
    sim: &SimConfig,
    orders: u64,
    log: Option<Arc<Log>>,
    progress: impl FnMut(u64, u64),
) -> Result<RunReport, RunError> {
    run_routed(config, sim, &OrderRouting::default(), orders, log, progress)
}

/// How long a run generates load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// This many orders.
    Orders(u64),
    /// Until this much time has passed since the pipeline started (a soak run: orders are
    /// generated as they are submitted, so memory does not grow with the duration).
    For(Duration),
}

/// How a run offers its orders.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as the pipeline takes them (closed loop).
    Saturate,
    /// This many orders a second on a fixed schedule (open loop): each order's end-to-end
    /// latency counts from its slot in the schedule, to within a millisecond (orders due in the
    /// same millisecond go in one submission, stamped with the first one's slot).
    Rate(f64),
}

/// Most the generator may fall behind its schedule and still have sustained the rate.
const BEHIND_SUSTAINED: Duration = Duration::from_secs(1);

/// [`run`] with the stages bound as `routing` says.
pub fn run_routed(
    config: &EngineConfig,
    sim: &SimConfig,
    routing: &OrderRouting,
    orders: u64,
    log: Option<Arc<Log>>,
    progress: impl FnMut(u64, u64),
) -> Result<RunReport, RunError> {
    run_until(config, sim, routing, &RunPlan::new(Limit::Orders(orders)), log, progress)
}

/// Called with the engine and each snapshot a run takes (`false`), and once more when its work
/// has all finished (`true`: the final figures). An exporter answers its scrapes from here.
pub type Observer<'a> = dyn Fn(&Engine<OrderEvent>, &Snapshot, bool) + Sync + 'a;

/// How [`run_until`] offers load and watches the pipeline.
#[derive(Clone)]
pub struct RunPlan<'a> {
    /// How long it generates load.
    pub limit: Limit,
    /// How fast.
    pub pace: Pace,
    /// The rules the engine's snapshots evaluate.
    pub alerts: AlertRules,
    /// How often a snapshot is taken while the run lasts (so alerts fire on time, and the
    /// report's [`MonitorReport`] has its maxima).
    pub sample_every: Duration,
    /// Shown the engine and each snapshot, and the final one when the run's work has finished.
    pub observe: Option<&'a Observer<'a>>,
    /// Set to end the run early: no more orders are offered; those offered finish.
    pub stop: Option<&'a AtomicBool>,
}

impl std::fmt::Debug for RunPlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunPlan")
            .field("limit", &self.limit)
            .field("pace", &self.pace)
            .field("alerts", &self.alerts)
            .field("sample_every", &self.sample_every)
            .field("observe", &self.observe.is_some())
            .field("stop", &self.stop)
            .finish()
    }
}

impl RunPlan<'_> {
    /// `limit` as fast as the pipeline takes it, the default alert rules, ten snapshots a second.
    #[must_use]
    pub fn new(limit: Limit) -> Self {
        Self {
            limit,
            pace: Pace::Saturate,
            alerts: AlertRules::default(),
            sample_every: Duration::from_millis(100),
            observe: None,
            stop: None,
        }
    }
}

/// What the snapshots taken during a run saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MonitorReport {
    /// Snapshots taken.
    pub samples: u64,
    /// Milliseconds between them.
    pub every_ms: f64,
    /// The largest lag (age of the oldest waiting event) each stage showed, in microseconds.
    pub lag_max_us: BTreeMap<String, f64>,
    /// The deepest each stage's queues were.
    pub queue_depth_max: BTreeMap<String, u64>,
}

impl MonitorReport {
    fn add(&mut self, snapshot: &conduit::Snapshot) {
        self.samples += 1;
        for stage in &snapshot.stages {
            let lag = self.lag_max_us.entry(stage.name.clone()).or_default();
            *lag = lag.max(stage.lag_us);
            let depth = self.queue_depth_max.entry(stage.name.clone()).or_default();
            *depth = (*depth).max(stage.queue_depth);
        }
    }
}

/// Takes a snapshot of `engine` every `every` until `stop`, shows `observe` each, and says what
/// they saw.
fn watch(
    engine: &Engine<OrderEvent>,
    every: Duration,
    observe: Option<&Observer<'_>>,
    stop: &AtomicBool,
) -> MonitorReport {
    let mut report = MonitorReport { every_ms: every.as_secs_f64() * 1_000.0, ..MonitorReport::default() };
    while !stop.load(Ordering::Acquire) {
        let snapshot = engine.snapshot();
        report.add(&snapshot);
        if let Some(observe) = observe {
            observe(engine, &snapshot, false);
        }
        std::thread::park_timeout(every);
    }
    report
}

/// Waits until every message `engine` accepted has finished, or it is poisoned.
fn drained(engine: &Engine<OrderEvent>) {
    while engine.in_flight() > 0 && engine.poisoned().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What the load generator did.
struct Offered {
    submitted: u64,
    behind_max: Duration,
    span: Duration,
    poisoned: u64,
    /// Orders not submitted because the engine was poisoned.
    unsent: Option<u64>,
    /// Whether `plan.stop` ended it before its limit.
    stopped: bool,
}

/// [`run_routed`] as `plan` says: a number of orders or a duration, offered at its pace, watched
/// by a snapshot every `plan.sample_every`.
pub fn run_until(
    config: &EngineConfig,
    sim: &SimConfig,
    routing: &OrderRouting,
    plan: &RunPlan<'_>,
    log: Option<Arc<Log>>,
    mut progress: impl FnMut(u64, u64),
) -> Result<RunReport, RunError> {
    if let Some(log) = &log {
        let held = log.opened_with().records;
        if held > 0 {
            return Err(RunError::LogNotEmpty { path: log.path().display().to_string(), records: held });
        }
    }
    plan.alerts.validate().map_err(BuildError::from)?;
    let provider = open_provider(sim)?;
    if let (Some(provider), Some(path)) = (&provider, &sim.payment_books) {
        if provider.ledger() != LedgerFigures::default() {
            return Err(RunError::BooksNotEmpty { path: path.display().to_string() });
        }
    }
    let pipeline = OrderPipeline::launch(config, sim, routing, log, None, provider, true)?;
    pipeline.engine().set_alert_rules(plan.alerts.clone()).map_err(BuildError::from)?;
    let stop = AtomicBool::new(false);
    let (offered, monitor) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| watch(pipeline.engine(), plan.sample_every, plan.observe, &stop));
        let offered = offer(&pipeline, sim, plan, &mut progress);
        if let Some(observe) = plan.observe {
            // The final figures, before the engine shuts down.
            drained(pipeline.engine());
            observe(pipeline.engine(), &pipeline.engine().snapshot(), true);
        }
        stop.store(true, Ordering::Release);
        watcher.thread().unpark();
        (offered, watcher.join().expect("the watcher only takes snapshots"))
    });
    let mut report = pipeline.finish();
    report.monitor = Some(monitor);
    if let Some(unsent) = offered.unsent {
        let unsent = usize::try_from(unsent).unwrap_or(usize::MAX);
        return Err(RunError::Poisoned { unsent, report: Box::new(report) });
    }
    report.orders.poisoned = Some(offered.poisoned);
    if let Pace::Rate(per_sec) = plan.pace {
        let scheduled_span = match plan.limit {
            // Stopped early: the schedule ran as long as the run did.
            _ if offered.stopped => offered.span,
            Limit::For(duration) => duration,
            Limit::Orders(orders) => Duration::from_secs_f64(orders as f64 / per_sec),
        };
        let achieved_per_s = offered.submitted as f64 / offered.span.max(scheduled_span).as_secs_f64().max(1e-9);
        report.load = LoadReport::Rate {
            offered_per_s: per_sec,
            achieved_per_s,
            behind_max_ms: offered.behind_max.as_secs_f64() * 1_000.0,
            sustained: achieved_per_s >= 0.99 * per_sec && offered.behind_max < BEHIND_SUSTAINED,
        };
    }
    Ok(report)
}

/// Offers orders to `pipeline` as `plan` says, until its limit or until the engine is poisoned.
// Slots of a schedule: the rate is positive and finite (the CLI checks), counts fit f64 exactly.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
fn offer(
    pipeline: &OrderPipeline,
    sim: &SimConfig,
    plan: &RunPlan<'_>,
    progress: &mut impl FnMut(u64, u64),
) -> Offered {
    let mut workload = Workload::new(sim.seed, sim.skus, sim.customers).poisoned(sim.poison_rate);
    let mut chunk = Vec::with_capacity(SUBMIT_CHUNK);
    let mut submitted = 0u64;
    let mut behind_max = Duration::ZERO;
    let mut unsent = None;
    // Windows submitted on a schedule, with their sizes, waiting for their commits.
    let mut in_flight: std::collections::VecDeque<(u64, conduit::Receipt<OrderEvent>)> =
        std::collections::VecDeque::new();
    let is_stopped = || plan.stop.is_some_and(|stop| stop.load(Ordering::Acquire));
    let started = Instant::now();
    loop {
        let mut left = match plan.limit {
            _ if is_stopped() => 0,
            Limit::Orders(orders) => orders - submitted,
            Limit::For(duration) if started.elapsed() < duration => u64::MAX,
            Limit::For(_) => 0,
        };
        // With a rate: the orders due by now, within the next millisecond of the schedule.
        let mut scheduled = None;
        if let Pace::Rate(per_sec) = plan.pace {
            let slot = |n: u64| started + Duration::from_secs_f64(n as f64 / per_sec);
            let mut now = Instant::now();
            if let Limit::For(duration) = plan.limit {
                // No slot at or past the end of the run.
                let slots = (duration.as_secs_f64() * per_sec).ceil() as u64;
                left = left.min(slots.saturating_sub(submitted));
            }
            if left == 0 {
                break;
            }
            let first = slot(submitted);
            if first > now {
                std::thread::sleep(first - now);
                now = Instant::now();
            }
            behind_max = behind_max.max(now.saturating_duration_since(first));
            let due = (now.duration_since(started).as_secs_f64() * per_sec) as u64 + 1;
            let within_ms = ((per_sec / 1_000.0).ceil() as u64).max(1);
            left = left.min(due.saturating_sub(submitted).clamp(1, within_ms));
            scheduled = Some(first);
        }
        if left == 0 {
            break;
        }
        let take = usize::try_from(left).unwrap_or(usize::MAX).min(SUBMIT_CHUNK);
        chunk.extend(workload.by_ref().take(take));
        let sent = match scheduled {
            // On a schedule, windows go without waiting for their commits (a wait per window
            // would put the generator behind by a commit each time); their receipts are settled
            // as they come in.
            Some(at) => {
                let count = chunk.len() as u64;
                pipeline.submit_window_at(chunk.drain(..), at).map(|receipt| {
                    in_flight.push_back((count, receipt));
                    count
                })
            }
            None => pipeline.submit_many(chunk.drain(..)),
        };
        match sent {
            Ok(count) => submitted += count,
            Err(error) => {
                unsent = Some(error.into_inner().len() as u64);
                break;
            }
        }
        if let Some(refused) = settle(&mut in_flight, false) {
            submitted -= refused;
            unsent = Some(refused);
            break;
        }
        progress(submitted, pipeline.terminal());
    }
    // Every window handed over settles; a refused one gives back its orders.
    if let Some(refused) = settle(&mut in_flight, true) {
        submitted -= refused;
        *unsent.get_or_insert(0) += refused;
    }
    Offered {
        submitted,
        behind_max,
        span: started.elapsed(),
        poisoned: workload.poisoned_count(),
        unsent,
        stopped: is_stopped(),
    }
}

/// Settles the windows at the front of `in_flight` whose commits are in (every one, waiting for
/// each, with `wait`); the orders of those refused, if any.
fn settle(in_flight: &mut std::collections::VecDeque<(u64, conduit::Receipt<OrderEvent>)>, wait: bool) -> Option<u64> {
    let mut refused = None;
    while let Some((_, receipt)) = in_flight.front() {
        if !wait && !receipt.is_settled() {
            break;
        }
        let (count, receipt) = in_flight.pop_front().expect("the front was there");
        if receipt.wait().is_err() {
            *refused.get_or_insert(0) += count;
        }
    }
    refused
}

/// What [`recover`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    /// Orders in the log.
    pub orders_found: u64,
    /// Orders the log had in flight (placed, not known to be finished): the ones read and resumed.
    pub orders_in_flight: u64,
    /// Events injected to resume in-flight orders, by stage.
    pub resumed: BTreeMap<String, u64>,
    /// The recovery run; its counts and ledger cover the orders that were in flight.
    pub run: RunReport,
    /// Those orders' histories verified after recovery, and (in `verify.provider`) checked on
    /// the payment provider's own books when it keeps them ([`SimConfig::payment_books`]).
    pub verify: VerifyReport,
}

/// The payment provider `sim` describes when it keeps its own books; None when it keeps them in
/// the pipeline's memory.
pub fn open_provider(sim: &SimConfig) -> Result<Option<Arc<SimulatedGateway>>, BooksError> {
    let Some(path) = &sim.payment_books else { return Ok(None) };
    Ok(Some(Arc::new(sim.payment_gateway().with_books(path)?)))
}

/// [`verify`], and the terminal orders of the log against the provider's books.
pub fn verify_with_provider(log: &Log, provider: &SimulatedGateway) -> Result<VerifyReport, LogError> {
    let histories = Histories::read(log)?;
    let mut report = histories.verify();
    let audit = histories.audit(provider, histories.orders.keys().copied());
    if !audit.ok() {
        report.problems.push(format!(
            "the payment provider's books disagree: {} double charges, {} orders paid the wrong amount: {:?}",
            audit.double_charges, audit.wrong_count, audit.wrong
        ));
        report.ok = false;
    }
    report.provider = Some(audit);
    Ok(report)
}

/// Resumes what a crashed run left in flight, reading only that: the log's last checkpoint and
/// the frames after it say which orders were in flight, their histories come through the log's
/// index, the ports' books are carried over for them, each resumes at its next step, and their
/// histories are verified again after the drain. Idempotency keys make a resumed step that
/// already happened a no-op, so no order is charged twice. Cost: the work in flight, not the
/// history (`conduit log verify` reads everything).
pub fn recover(config: &EngineConfig, sim: &SimConfig, log: &Arc<Log>) -> Result<RecoverReport, RunError> {
    recover_with_provider(config, sim, log, open_provider(sim)?)
}

/// [`recover`] calling `provider` for payments: a provider that outlived the crash with its
/// books (None: a gateway whose books are rebuilt from the log). The recovered orders are judged
/// on its books.
pub fn recover_with_provider(
    config: &EngineConfig,
    sim: &SimConfig,
    log: &Arc<Log>,
    provider: Option<Arc<SimulatedGateway>>,
) -> Result<RecoverReport, RunError> {
    let Reopened { pipeline, orders_in_flight: ids, resumed } = reopen(config, sim, log, provider.clone())?;
    let mut run = pipeline.finish();
    let after = Histories::read_orders(log, &ids)?;
    let mut verify = after.verify();
    // The provider's books hold charges made before the crash: the recovered orders are judged
    // one by one on its books, not by what this run added to them.
    verify.provider = provider.map(|provider| after.audit(&provider, ids.iter().copied()));
    if let Some(audit) = &verify.provider {
        run.ledger = audit.ledger(run.ledger.idempotent_replays, run.ledger.timeouts);
    }
    Ok(RecoverReport {
        orders_found: log.opened_with().streams,
        orders_in_flight: ids.len() as u64,
        resumed,
        run,
        verify,
    })
}

/// A pipeline going on with a log that may hold earlier runs' orders (see [`reopen`]).
#[derive(Debug)]
pub struct Reopened {
    /// The pipeline, journaling to the log, taking new orders.
    pub pipeline: OrderPipeline,
    /// The orders the log had in flight, resumed, by id.
    pub orders_in_flight: Vec<u64>,
    /// Events injected to resume them, by stage.
    pub resumed: BTreeMap<String, u64>,
}

/// Starts a pipeline on `log` that goes on where the log's last run stopped: the orders it had
/// in flight resume at their next step (as [`recover`] does, reading only them), and the pipeline
/// then takes new orders, for a node that runs for as long as its orders keep coming. New orders
/// need ids the log has not seen: an id it holds is the same order again.
pub fn reopen(
    config: &EngineConfig,
    sim: &SimConfig,
    log: &Arc<Log>,
    provider: Option<Arc<SimulatedGateway>>,
) -> Result<Reopened, RunError> {
    let mut ids: Vec<u64> = log.in_flight_at_open().iter().map(|m| m.stream).collect();
    ids.sort_unstable();
    ids.dedup();
    let histories = Histories::read_orders(log, &ids)?;
    // Orders whose work had finished before the crash, though their completion was not yet
    // journaled: nothing to resume; the log stops listing them.
    let finished: Vec<u64> = log
        .in_flight_at_open()
        .iter()
        .filter(|m| histories.orders.get(&m.stream).is_none_or(|history| history.resume().is_empty()))
        .map(|m| m.id)
        .collect();
    if !finished.is_empty() {
        log.append(vec![conduit::log::completion_record(&finished)])?.wait()?;
    }
    // What the provider's books hold for the resumed orders from before: the report's ledger
    // counts it with what this run adds, as their outcomes count in this run.
    let earlier = provider.as_ref().map(|provider| {
        ids.iter().filter_map(|&id| provider.account(id)).fold((0, 0), |(charged, refunded), account| {
            (charged + account.charged_cents, refunded + account.refunded_cents)
        })
    });
    let mut pipeline = OrderPipeline::launch(
        config,
        sim,
        &OrderRouting::default(),
        Some(Arc::clone(log)),
        Some(&histories),
        provider,
        true,
    )?;
    if let Some((charged_cents, refunded_cents)) = earlier {
        pipeline.count_earlier_payments(charged_cents, refunded_cents);
    }
    let resumed = match pipeline.resume(&histories) {
        Ok(resumed) => resumed,
        Err(error) => {
            let unsent = error.into_inner().len();
            return Err(RunError::Poisoned { unsent, report: Box::new(pipeline.finish()) });
        }
    };
    Ok(Reopened { pipeline, orders_in_flight: ids, resumed })
}

/// Reads and checks a log: frame checksums and archives, contiguous versions, every order's
/// history, every order terminal or resumable, the ledger.
pub fn verify(log: &Log) -> Result<VerifyReport, LogError> {
    Ok(Histories::read(log)?.verify())
}

/// A run that could not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The pipeline could not start.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// `run` refuses a log that already holds orders: their ids would collide.
    #[error("{path} already holds {records} events; use `conduit recover` on it, or a new path")]
    LogNotEmpty {
        /// The log.
        path: String,
        /// Records in it.
        records: u64,
    },
    /// The payment provider's books could not be opened.
    #[error(transparent)]
    Books(#[from] BooksError),
    /// `run` with a new log refuses provider books that already hold charges: the new run's
    /// order ids would meet an earlier run's.
    #[error("{path} holds the payment provider's books of an earlier run; remove it, or use another log path")]
    BooksNotEmpty {
        /// The books.
        path: String,
    },
    /// A worker died mid-run; the report shows what was done.
    #[error("the engine was poisoned with {unsent} orders not submitted: {}", report.poisoned.as_deref().unwrap_or("unknown cause"))]
    Poisoned {
        /// Orders not submitted.
        unsent: usize,
        /// What the pipeline did before it stopped.
        report: Box<RunReport>,
    },
}
