//! `conduit bench`: the engine against its baselines, on the same workload, in one process.
//!
//! This machine is shared and noisy, so absolute figures drift; what a run shows is the ratios
//! between cases measured side by side. Runs of the cases are interleaved (A B C, A B C, ...) so
//! a noisy moment hurts every case alike, and each case reports its median run.
//!
//! Every case does the same per-event work: the order pipeline's six steps (validate, charge,
//! reserve, email, SMS, ship) against the same simulated ports; with the placement itself,
//! `events = 7 x orders`.
//!
//! | case | what moves the events |
//! |---|---|
//! | `ceiling_one_thread` | nothing: all six steps inline, one thread |
//! | `crossbeam_per_event_chain` | one thread per stage, crossbeam bounded channels, one event per message |
//! | `disruptor_chain` | the `disruptor` crate: one ring, dependent consumers, batch publishing |
//! | `engine_memory` | conduit's engine, default configuration, no log |
//! | `engine_memory_untracked` | the same without the engine's completion tracking: `engine_memory / engine_memory_untracked` is what tracking costs |
//! | `engine_memory_poison_1e-4` | the same, with 1 order in 10,000 malformed (dead-lettered by the order stage); its `events` counts 7 per order like `engine_memory`'s, so the ratio of the two is one of orders per second |
//!
//! The durable cases run on fewer orders (`durable_orders`) and write to files under `dir`:
//!
//! | case | what it writes, every commit fsynced |
//! |---|---|
//! | `redb_rows_batch10k` | one redb row per event (the event's encoded size), 10,000 rows per transaction |
//! | `log_writer` | conduit's log alone: the same events appended from one thread, frames, one commit per group |
//! | `disk_seq_write_fsync` | the same bytes appended to a plain file, fdatasync per ~10,000 events: the physical limit |
//! | `engine_durable` | conduit's pipeline with an immediate log |
//! | `engine_durable_no_checkpoints` | the same with one checkpoint, at close: `engine_durable / engine_durable_no_checkpoints` is what checkpoints cost |
//! | `engine_durable_no_quick_repair` | the same without quick repair (commits do not save redb's allocator state): what fast opening after a crash costs |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use conduit::EngineConfig;
use conduit_orders::{Order, Workload};
use serde::Serialize;

mod durable;
mod overload;
mod pipeline;
mod synthetic;

use durable::{encoded_event_bytes, typical_records};
use pipeline::{DISRUPTOR_BATCH, DISRUPTOR_RING, PER_EVENT_CAPACITY};

pub use durable::{
    disk_seq_write_fsync, engine_durable, engine_durable_no_checkpoints, engine_durable_no_quick_repair, log_writer,
    redb_rows_batch10k,
};
pub use overload::{overload_memory, MemoryReport};
pub use pipeline::{
    ceiling_one_thread, crossbeam_per_event_chain, disruptor_chain, engine_memory, engine_memory_tracked, sweep,
};
pub use synthetic::{chain_ceiling, chain_crossbeam, chain_engine, chain_engine_tracked, fanout};

/// Events each order makes: its placement, then validate, charge, reserve, email, SMS, ship
/// (the engine's `events.total` counts the same seven).
pub const EVENTS_PER_ORDER: u64 = 7;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Orders per run of each case.
    pub orders: u64,
    /// Runs per case; the median is reported.
    pub repeat: u32,
    /// The engine's configuration for `engine_memory`.
    pub engine: EngineConfig,
    /// Workload seed.
    pub seed: u64,
    /// Orders per run of the durable cases (0 skips them).
    pub durable_orders: u64,
    /// Where the durable cases write their files (removed after each run).
    pub dir: PathBuf,
    /// Orders pushed through the overload memory measurement (0 skips it).
    pub overload_orders: u64,
    /// Events published per run of the fan-out cases (0 skips them).
    pub fanout_events: u64,
    /// With `Some(n)`: also run a synthetic chain of `n` pass-through stages (engine, per-event
    /// crossbeam, and the same work in one thread), to see the engine's own cost per hop.
    pub chain_stages: Option<usize>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            orders: 1_000_000,
            repeat: 3,
            engine: EngineConfig::default(),
            seed: 42,
            durable_orders: 300_000,
            dir: std::env::temp_dir(),
            overload_orders: 40_000,
            chain_stages: None,
            fanout_events: 200_000,
        }
    }
}

/// One case's figures.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Median events per second over the runs.
    pub events_per_sec: f64,
    /// Events per run.
    pub events: u64,
    /// Every run's events per second, in run order.
    pub runs_events_per_sec: Vec<f64>,
    /// Bytes per event the case writes (durable cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_bytes: Option<usize>,
    /// How the case is set up.
    pub setup: String,
}

/// A whole bench run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Every case, in run order.
    pub cases: Vec<CaseResult>,
    /// `a / b` for the pairs that matter.
    pub ratios: BTreeMap<String, f64>,
    /// Orders per run.
    pub orders: u64,
    /// Runs per case.
    pub repeat: u32,
    /// Logical CPUs this process could use.
    pub cpus: usize,
    /// Memory under overload (Linux only; `null` elsewhere or when skipped).
    pub memory: Option<MemoryReport>,
}

/// One sweep point: the engine at a batch size and pool size.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Events per batch.
    pub batch_events_max: usize,
    /// Workers per stage.
    pub workers: usize,
    /// Median events per second.
    pub events_per_sec: f64,
    /// Relative to the one-thread ceiling measured in the same sweep.
    pub ratio_to_ceiling: f64,
}

/// A case: name, setup, events per run, and the run itself (returns its duration).
type Case<'a> = (&'static str, String, u64, Box<dyn Fn() -> Duration + 'a>);

/// Runs every case `repeat` times, interleaved, and reports medians and ratios.
/// `progress` hears each case's name before each of its runs.
pub fn run(config: &BenchConfig, mut progress: impl FnMut(&str, u32)) -> Result<BenchReport, String> {
    let durable = workload(config.seed, config.durable_orders);
    let workload = workload(config.seed, config.orders);
    let poisoned = poisoned_workload(config.seed, config.orders, POISON_RATE);
    let events = config.orders * EVENTS_PER_ORDER;
    let durable_events = config.durable_orders * EVENTS_PER_ORDER;
    let engine = config.engine.clone();
    let records = typical_records(durable_events);
    let event_bytes = encoded_event_bytes(&records);
    let dir = config.dir.as_path();
    let mut cases: Vec<Case<'_>> = vec![
        ("ceiling_one_thread", "six steps inline in one thread".into(), events, Box::new(|| ceiling_one_thread(&workload))),
        (
            "crossbeam_per_event_chain",
            format!("one thread per stage, bounded({PER_EVENT_CAPACITY}) crossbeam channels, one event per message"),
            events,
            Box::new(|| crossbeam_per_event_chain(&workload)),
        ),
        (
            "disruptor_chain",
            format!(
                "disruptor 4: ring of {DISRUPTOR_RING}, batch_publish({DISRUPTOR_BATCH}), best of busy-spin-with-hint and sleep waits"
            ),
            events,
            Box::new(|| disruptor_chain(&workload)),
        ),
        (
            "engine_memory",
            format!("conduit engine, {:?}, memory only", config.engine.defaults()),
            events,
            Box::new(|| engine_memory(&engine, &workload)),
        ),
        (
            "engine_memory_untracked",
            "as engine_memory, without completion tracking".into(),
            events,
            Box::new(|| engine_memory_tracked(&engine, &workload, false)),
        ),
        (
            "engine_memory_poison_1e-4",
            format!(
                "as engine_memory, {} of {} orders malformed",
                poisoned.iter().filter(|o| o.quantity == 0).count(),
                poisoned.len()
            ),
            events,
            Box::new(|| engine_memory(&engine, &poisoned)),
        ),
    ];
    cases.extend(synthetic_cases(config, &engine));
    if config.durable_orders > 0 {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        cases.extend([
            (
                "redb_rows_batch10k",
                format!("redb, one {event_bytes}-byte row per event, 10,000 rows per immediate transaction"),
                durable_events,
                Box::new(|| redb_rows_batch10k(dir, &records, event_bytes)) as Box<dyn Fn() -> Duration>,
            ),
            (
                "log_writer",
                "conduit log alone, immediate, appends of 4,096 events from one thread".into(),
                durable_events,
                Box::new(|| log_writer(dir, &records)),
            ),
            (
                "disk_seq_write_fsync",
                format!("plain file, {event_bytes} bytes per event, write + fdatasync per 10,000 events"),
                durable_events,
                Box::new(|| disk_seq_write_fsync(dir, durable_events, event_bytes)),
            ),
            (
                "engine_durable",
                format!("conduit engine, {:?}, immediate log", config.engine.defaults()),
                durable_events,
                Box::new(|| engine_durable(&engine, &durable, dir)),
            ),
            (
                "engine_durable_no_checkpoints",
                "as engine_durable, one checkpoint at close instead of one per 262,144 records".into(),
                durable_events,
                Box::new(|| engine_durable_no_checkpoints(&engine, &durable, dir)),
            ),
            (
                "engine_durable_no_quick_repair",
                "as engine_durable, commits without redb's allocator state (a full repair after a crash)".into(),
                durable_events,
                Box::new(|| engine_durable_no_quick_repair(&engine, &durable, dir)),
            ),
        ]);
    }
    let results = measure(&cases, config.repeat, event_bytes, &mut progress);
    let mut report = report(results, config);
    if config.overload_orders > 0 {
        progress("overload_memory", 0);
        report.memory = overload_memory(&config.engine, config.overload_orders);
    }
    Ok(report)
}

/// The optional synthetic cases: a chain of pass-through stages, publish/subscribe fan-out.
fn synthetic_cases<'a>(config: &BenchConfig, engine: &'a EngineConfig) -> Vec<Case<'a>> {
    let mut cases: Vec<Case<'a>> = Vec::new();
    if let Some(stages) = config.chain_stages {
        let chain_events = config.orders;
        cases.extend([
            (
                "chain_ceiling_one_thread",
                format!("{stages} pass-through steps inline in one thread"),
                chain_events,
                Box::new(move || chain_ceiling(stages, chain_events)) as Box<dyn Fn() -> Duration>,
            ),
            (
                "chain_crossbeam_per_event",
                format!("{stages} threads, bounded({PER_EVENT_CAPACITY}) crossbeam channels, one event per message"),
                chain_events,
                Box::new(move || chain_crossbeam(stages, chain_events)),
            ),
            (
                "chain_engine",
                format!("{stages} pass-through engine stages, {:?}", config.engine.defaults()),
                chain_events,
                Box::new(move || chain_engine(engine, stages, chain_events)),
            ),
            (
                "chain_engine_untracked",
                "as chain_engine, without completion tracking".into(),
                chain_events,
                Box::new(move || chain_engine_tracked(engine, stages, chain_events, false)),
            ),
        ]);
    }
    if config.fanout_events > 0 {
        let fanout_events = config.fanout_events;
        cases.extend([
            (
                "fanout_3_subscribers",
                "one publisher, three subscribers bound to one key".into(),
                fanout_events,
                Box::new(move || fanout(engine, fanout_events, false)) as Box<dyn Fn() -> Duration>,
            ),
            (
                "fanout_3_plus_slow_subscriber",
                "the same, plus a subscriber waiting 20 us per event with overflow = dead_letter (fast ones timed)"
                    .into(),
                fanout_events,
                Box::new(move || fanout(engine, fanout_events, true)),
            ),
        ]);
    }
    cases
}

/// Runs the cases `repeat` times, interleaved; the median of each.
fn measure(
    cases: &[Case<'_>],
    repeat: u32,
    event_bytes: usize,
    progress: &mut impl FnMut(&str, u32),
) -> Vec<CaseResult> {
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    debug_assert!(!cases.is_empty());
    for round in 0..repeat.max(1) {
        for (i, (name, _, events, case)) in cases.iter().enumerate() {
            progress(name, round);
            let elapsed = case();
            runs[i].push(*events as f64 / elapsed.as_secs_f64().max(1e-9));
        }
    }
    let durable_names = [
        "redb_rows_batch10k",
        "log_writer",
        "disk_seq_write_fsync",
        "engine_durable",
        "engine_durable_no_checkpoints",
        "engine_durable_no_quick_repair",
    ];
    cases
        .iter()
        .zip(runs)
        .map(|((name, setup, events, _), runs)| CaseResult {
            name: (*name).to_owned(),
            events_per_sec: median(&runs),
            events: *events,
            runs_events_per_sec: runs,
            event_bytes: durable_names.contains(name).then_some(event_bytes),
            setup: setup.clone(),
        })
        .collect()
}

/// The cases' medians and the ratios that matter.
fn report(results: Vec<CaseResult>, config: &BenchConfig) -> BenchReport {
    let rate = |name: &str| results.iter().find(|c| c.name == name).map_or(0.0, |c| c.events_per_sec);
    let mut ratios = BTreeMap::new();
    for (a, b) in [
        ("engine_memory", "ceiling_one_thread"),
        ("engine_memory", "disruptor_chain"),
        ("engine_memory", "crossbeam_per_event_chain"),
        ("engine_memory_poison_1e-4", "engine_memory"),
        ("engine_memory", "engine_memory_untracked"),
        ("engine_durable", "redb_rows_batch10k"),
        ("engine_durable", "disk_seq_write_fsync"),
        ("engine_durable", "engine_durable_no_checkpoints"),
        ("engine_durable", "engine_durable_no_quick_repair"),
        ("log_writer", "redb_rows_batch10k"),
        ("log_writer", "disk_seq_write_fsync"),
        ("chain_engine", "chain_ceiling_one_thread"),
        ("fanout_3_plus_slow_subscriber", "fanout_3_subscribers"),
        ("chain_engine", "chain_crossbeam_per_event"),
        ("chain_engine", "chain_engine_untracked"),
    ] {
        let denominator = rate(b);
        if denominator > 0.0 && rate(a) > 0.0 {
            ratios.insert(format!("{a} / {b}"), rate(a) / denominator);
        }
    }
    BenchReport {
        cases: results,
        ratios,
        orders: config.orders,
        repeat: config.repeat,
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        memory: None,
    }
}

/// The bench workload: `orders` seeded orders over 1,000 SKUs and 100,000 customers.
#[must_use]
pub fn workload(seed: u64, orders: u64) -> Vec<Order> {
    poisoned_workload(seed, orders, 0.0)
}

/// Poison rate of `engine_memory_poison_1e-4`.
const POISON_RATE: f64 = 1e-4;

/// [`workload`] with about `rate` of the orders malformed.
#[must_use]
pub fn poisoned_workload(seed: u64, orders: u64, rate: f64) -> Vec<Order> {
    Workload::new(seed, 1_000, 100_000).poisoned(rate).take(usize::try_from(orders).unwrap_or(usize::MAX)).collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_finishes_every_order_and_ratios_are_computed() {
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let dir = scratch.path().to_owned();
        let config = BenchConfig {
            orders: 5_000,
            durable_orders: 2_000,
            overload_orders: 200,
            fanout_events: 20_000,
            repeat: 1,
            dir,
            ..BenchConfig::default()
        };
        let report = run(&config, |_, _| {}).expect("runs");
        assert_eq!(report.cases.len(), 14);
        assert!(report.cases[..6].iter().all(|c| c.events == 35_000 && c.events_per_sec > 0.0));
        assert!(report.cases[6..8].iter().all(|c| c.events == 20_000 && c.event_bytes.is_none()));
        assert!(report.cases[8..].iter().all(|c| c.events == 14_000 && c.event_bytes.is_some_and(|b| b > 40)));
        assert_eq!(report.ratios.len(), 12);
        if let Some(memory) = report.memory {
            assert_eq!(memory.orders, 200);
            assert!(memory.peak_rss_mib >= memory.steady_rss_mib && memory.steady_rss_mib > 0.0);
        }
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < f64::EPSILON);
    }
}
