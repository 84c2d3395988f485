//! `conduit bench`: the engine against its baselines, on the same workload, in one process.
//!
//! This machine is shared and noisy, so absolute figures drift; what a run shows is the ratios
//! between cases measured side by side. Runs of the cases are interleaved, forwards in one round
//! and backwards in the next (A B C, C B A, A B C, ...), so a noisy moment hurts every case alike,
//! no case always runs right after the same one, and each case reports its median run.
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
//! | `engine_memory_watched_10hz` | the same while another thread takes a snapshot every 100 ms (as `conduit run` does, alerts evaluated): `engine_memory_watched_10hz / engine_memory` is what watching costs |
//! | `engine_memory_elastic` | the same with every stage's pool elastic (`{ min = its size, max = 4 times it }`), steered by the controller: `engine_memory_elastic / engine_memory` is what elastic pools cost (or gain) under a steady saturating load |
//! | `engine_memory_adaptive_batches` | the same with every stage's batch size adaptive (`batch_events_min` a sixteenth of `batch_events_max`): `engine_memory_adaptive_batches / engine_memory` is whether a saturated pipeline keeps its throughput |
//! | `engine_memory_poison_1e-4` | the same, with 1 order in 10,000 malformed (dead-lettered by the order stage); its `events` counts 7 per order like `engine_memory`'s, so the ratio of the two is one of orders per second |
//!
//! The durable cases run on fewer orders (`durable_orders`) and write to files under `dir`:
//!
//! | case | what it writes, every commit fsynced |
//! |---|---|
//! | `redb_rows` | one redb row per event (the event's encoded size), as many rows per immediate transaction as `engine_durable` put events in a durable commit, measured in the same bench run |
//! | `log_writer` | conduit's log alone: the same records (with completions, as the engine journals them) appended from one thread, at `engine_durable`'s events per commit in the same bench run |
//! | `disk_seq_write_fsync` | a plain file, as many bytes per event as `engine_durable`'s log file took and an fdatasync as often, both measured in the same bench run: the physical limit at the same work |
//! | `engine_durable` | conduit's pipeline with an immediate log |
//! | `engine_durable_no_checkpoints` | the same with one checkpoint, at close: `engine_durable / engine_durable_no_checkpoints` is what checkpoints cost |
//! | `engine_durable_no_quick_repair` | the same without quick repair (commits do not save redb's allocator state): what fast opening after a crash costs |
//!
//! Each case also reports its CPU time per event (the process's CPU clock, all threads) and the
//! cores it kept busy. Where a machine has too few cores for a case's threads to run side by
//! side, its events per second are its CPU per event over the cores: beside each ratio of rates
//! the report gives the one the two cases' CPU times allow with every core busy.
//!
//! The two cases of a ratio run one right after the other in every round, so each round also
//! gives the ratio on its own: with at least six rounds the report gives the median of those
//! per-round ratios and a 95% confidence interval for it (distribution-free, from their order
//! statistics), of rates and of CPU per event. A noisy moment that slows both cases of a round
//! cancels out of that round's ratio; the interval says how far apart the cases could be and
//! still have given these rounds.
//!
//! [`paced`] measures durable acknowledgements at an offered rate instead (`--paced`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use conduit::EngineConfig;
use conduit_orders::{Order, Workload};
use serde::Serialize;

mod campaign;
mod durable;
mod overload;
mod paced;
mod pipeline;
mod synthetic;

use durable::{encoded_event_bytes, typical_records};
use pipeline::{DISRUPTOR_BATCH, DISRUPTOR_RING, PER_EVENT_CAPACITY};

pub use campaign::{campaign, CampaignConfig, CampaignReport, CampaignRun, DRAINED_LAG};
pub use durable::{
    disk_seq_write_fsync, engine_durable, engine_durable_no_checkpoints, engine_durable_no_quick_repair, log_writer,
    redb_rows, Cadence,
};
pub use overload::{overload_memory, MemoryReport};
pub use paced::{disk_paced, paced, PacedConfig, PacedMedians, PacedReport, PacedRun};
pub use pipeline::{
    ceiling_one_thread, crossbeam_per_event_chain, disruptor_chain, engine_memory, engine_memory_tracked,
    engine_memory_watched, sweep,
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
    /// Orders pushed through the overload memory measurement (0 skips it; so does a choice of
    /// [`cases`](Self::cases)).
    pub overload_orders: u64,
    /// Events published per run of the fan-out cases (0 skips them).
    pub fanout_events: u64,
    /// With `Some(n)`: also run a synthetic chain of `n` pass-through stages (engine, per-event
    /// crossbeam, and the same work in one thread), to see the engine's own cost per hop.
    pub chain_stages: Option<usize>,
    /// Only these cases (names from [`CASES`]); empty runs every case the other settings ask for.
    pub cases: Vec<String>,
}

/// Whether case `name` runs with `config`'s other settings: the durable cases need
/// `durable_orders`, the chain ones `chain_stages`, the fan-out ones `fanout_events`.
#[must_use]
pub fn case_runs(config: &BenchConfig, name: &str) -> bool {
    if durable_cases_names().contains(&name) {
        config.durable_orders > 0
    } else if name.starts_with("chain_") {
        config.chain_stages.is_some()
    } else if name.starts_with("fanout_") {
        config.fanout_events > 0
    } else {
        CASES.contains(&name)
    }
}

/// The durable cases' names: the last six of [`CASES`].
fn durable_cases_names() -> &'static [&'static str] {
    &CASES[CASES.len() - 6..]
}

/// Every case's name, in the order they run (the six durable ones last).
pub const CASES: &[&str] = &[
    "ceiling_one_thread",
    "crossbeam_per_event_chain",
    "disruptor_chain",
    "engine_memory",
    "engine_memory_untracked",
    "engine_memory_watched_10hz",
    "engine_memory_elastic",
    "engine_memory_adaptive_batches",
    "engine_memory_poison_1e-4",
    "chain_ceiling_one_thread",
    "chain_crossbeam_per_event",
    "chain_engine",
    "chain_engine_untracked",
    "fanout_3_subscribers",
    "fanout_3_plus_slow_subscriber",
    "engine_durable",
    "redb_rows",
    "log_writer",
    "disk_seq_write_fsync",
    "engine_durable_no_checkpoints",
    "engine_durable_no_quick_repair",
];

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
            cases: Vec::new(),
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
    /// Every run's CPU time per event, in run order (empty where the CPU clock cannot be read).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs_cpu_ns_per_event: Vec<f64>,
    /// Events per durable commit, measured over every run (durable cases). A commit ends in
    /// one fsync, or two for the engine's log (redb's two-phase commit, which quick repair
    /// turns on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_per_sync: Option<f64>,
    /// Disk space the case's file took per event, measured from the file (durable cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_event: Option<f64>,
    /// Those bytes per second at the median rate, in MB/s (durable cases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mb_per_sec: Option<f64>,
    /// Bytes of the log's encoded frames per event (the cases that write the engine's log):
    /// `bytes_per_event` over this is what the file adds to the frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_bytes_per_event: Option<f64>,
    /// CPU time per event, all the process's threads, over every run: what the case costs a
    /// machine whose cores are all busy, where its events per second say what it does with this
    /// one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ns_per_event: Option<f64>,
    /// CPU time over wall time, over every run: how many cores the case kept busy on average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores_busy: Option<f64>,
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
    /// For the same pairs, `b`'s CPU time per event over `a`'s: the ratio `a / b` would be
    /// where both keep every core busy (this machine's when it has too few cores for either to
    /// run its threads side by side). A ratio beyond it needs the case to do less work per event.
    pub cpu_ratios: BTreeMap<String, f64>,
    /// For the same pairs, with at least [`PAIRED_ROUNDS_MIN`] rounds: the ratio of rates round
    /// by round, its median and a 95% confidence interval.
    pub paired_ratios: BTreeMap<String, Interval>,
    /// The same of CPU time per event (`b`'s over `a`'s, round by round).
    pub paired_cpu_ratios: BTreeMap<String, Interval>,
    /// Orders per run.
    pub orders: u64,
    /// Runs per case.
    pub repeat: u32,
    /// Logical CPUs this process could use.
    pub cpus: usize,
    /// Memory under overload (Linux only; `null` elsewhere or when skipped).
    pub memory: Option<MemoryReport>,
}

/// A median and a 95% confidence interval for it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// The median.
    pub median: f64,
    /// The interval's ends.
    pub low: f64,
    /// See `low`.
    pub high: f64,
    /// The values it was computed from.
    pub rounds: usize,
}

/// Fewest rounds that give a 95% interval for a median: with five, even the smallest and the
/// largest bound it with only 94% confidence (1 - 2 / 2^5).
pub const PAIRED_ROUNDS_MIN: usize = 6;

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

/// What one run of a case measured: its time and, for a case that writes a file, its durable
/// commits and the disk space the file took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Wall time.
    pub elapsed: Duration,
    /// Durable commits (see [`CaseResult::events_per_sync`] for their fsyncs).
    pub syncs: Option<u64>,
    /// Disk space the file took at the end.
    pub bytes_written: Option<u64>,
    /// Bytes of the log's encoded frames, headers included (the engine's log only).
    pub frame_bytes: Option<u64>,
    /// CPU time the process spent over the run, all its threads. A case whose call does untimed
    /// work besides the run (building its input) measures its own; for the others the bench
    /// measures the whole call.
    pub cpu: Option<Duration>,
}

impl From<Duration> for Run {
    fn from(elapsed: Duration) -> Self {
        Self { elapsed, ..Self::default() }
    }
}

/// CPU time this process has used so far, all its threads together (`None` where the platform
/// does not say).
#[must_use]
pub fn process_cpu() -> Option<Duration> {
    #[cfg(unix)]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        Some(Duration::new(u64::try_from(now.tv_sec).ok()?, u32::try_from(now.tv_nsec).ok()?))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// CPU time this process has used since `before` (a [`process_cpu`] reading).
fn cpu_since(before: Option<Duration>) -> Option<Duration> {
    before.zip(process_cpu()).map(|(before, after)| after.saturating_sub(before))
}

/// A case: name, setup, events per run, and the run itself.
type Case<'a> = (&'static str, String, u64, Box<dyn Fn() -> Run + 'a>);

/// Runs every case `repeat` times, interleaved, and reports medians and ratios.
/// `progress` hears each case's name before each of its runs.
pub fn run(config: &BenchConfig, mut progress: impl FnMut(&str, u32)) -> Result<BenchReport, String> {
    let durable = workload(config.seed, config.durable_orders);
    let workload = workload(config.seed, config.orders);
    let poisoned = poisoned_workload(config.seed, config.orders, POISON_RATE);
    let events = config.orders * EVENTS_PER_ORDER;
    let durable_events = config.durable_orders * EVENTS_PER_ORDER;
    let engine = config.engine.clone();
    let elastic = elastic_config(&config.engine)?;
    let adaptive = adaptive_config(&config.engine)?;
    let records = typical_records(durable_events);
    let records = &records[..];
    let dir = config.dir.as_path();
    // engine_durable's cadence, which the durable baselines follow.
    let cadence = std::cell::Cell::new(Cadence { events_per_sync: 1, bytes_per_event: 1 });
    let mut cases: Vec<Case<'_>> = vec![
        ("ceiling_one_thread", "six steps inline in one thread".into(), events, Box::new(|| ceiling_one_thread(&workload).into())),
        (
            "crossbeam_per_event_chain",
            format!("one thread per stage, bounded({PER_EVENT_CAPACITY}) crossbeam channels, one event per message"),
            events,
            Box::new(|| crossbeam_per_event_chain(&workload).into()),
        ),
        (
            "disruptor_chain",
            format!(
                "disruptor 4: ring of {DISRUPTOR_RING}, batch_publish({DISRUPTOR_BATCH}), best of busy-spin-with-hint and sleep waits"
            ),
            events,
            Box::new(|| disruptor_chain(&workload).into()),
        ),
        (
            "engine_memory",
            format!("conduit engine, {:?}, memory only", config.engine.defaults()),
            events,
            Box::new(|| engine_memory(&engine, &workload).into()),
        ),
        (
            "engine_memory_untracked",
            "as engine_memory, without completion tracking".into(),
            events,
            Box::new(|| engine_memory_tracked(&engine, &workload, false).into()),
        ),
        (
            "engine_memory_watched_10hz",
            "as engine_memory, with a snapshot (alerts evaluated) taken every 100 ms by another thread".into(),
            events,
            Box::new(|| engine_memory_watched(&engine, &workload, std::time::Duration::from_millis(100)).into()),
        ),
        (
            "engine_memory_elastic",
            format!("as engine_memory, every stage's pool elastic: {}", elastic.defaults().workers),
            events,
            Box::new(|| engine_memory(&elastic, &workload).into()),
        ),
        (
            "engine_memory_adaptive_batches",
            format!(
                "as engine_memory, every stage's batch size adaptive from {} to {}",
                adaptive.defaults().batch_events_min,
                adaptive.defaults().batch_events_max
            ),
            events,
            Box::new(|| engine_memory(&adaptive, &workload).into()),
        ),
        (
            "engine_memory_poison_1e-4",
            format!(
                "as engine_memory, {} of {} orders malformed",
                poisoned.iter().filter(|o| o.quantity == 0).count(),
                poisoned.len()
            ),
            events,
            Box::new(|| engine_memory(&engine, &poisoned).into()),
        ),
    ];
    cases.extend(synthetic_cases(config, &engine));
    // The durable cases start with a calibration run: skipped when none of them is wanted.
    let wanted = |names: &[&str]| config.cases.is_empty() || config.cases.iter().any(|c| names.contains(&c.as_str()));
    if config.durable_orders > 0 && wanted(durable_cases_names()) {
        progress("engine_durable (cadence)", 0);
        cases.extend(durable_cases(config, &engine, &durable, records, dir, &cadence)?);
    }
    if !config.cases.is_empty() {
        cases.retain(|(name, ..)| config.cases.iter().any(|wanted| wanted == name));
        if cases.is_empty() {
            return Err(format!(
                "none of the cases {} runs with these settings (the durable ones need --durable-orders, the chain ones \
                 --stages, the fan-out ones --fanout-events)",
                config.cases.join(", ")
            ));
        }
    }
    let results = measure(&cases, config.repeat, &mut progress);
    let mut report = report(results, config);
    if config.overload_orders > 0 && config.cases.is_empty() {
        progress("overload_memory", 0);
        report.memory = overload_memory(&config.engine, config.overload_orders);
    }
    Ok(report)
}

/// `engine`'s stage settings with every stage's pool elastic, from its size to four times that
/// (within the engine's limit), its controller at the default settings.
fn elastic_config(engine: &EngineConfig) -> Result<EngineConfig, String> {
    let d = engine.defaults();
    let max = (d.workers.max * 4).min(conduit::config::limits::WORKERS_MAX);
    varied(engine, |b| b.workers(conduit::Workers::elastic(d.workers.min, max)))
}

/// `engine`'s stage defaults (the settings the bench varies), with `change` laid over them.
fn varied(
    engine: &EngineConfig,
    change: impl FnOnce(conduit::EngineConfigBuilder) -> conduit::EngineConfigBuilder,
) -> Result<EngineConfig, String> {
    let d = engine.defaults();
    let same = EngineConfig::builder()
        .workers(d.workers)
        .batch_events_max(d.batch_events_max)
        .queue_batches(d.queue_batches)
        .attempts_max(d.attempts_max);
    change(same).build().map_err(|e| e.to_string())
}

/// `engine`'s stage settings with every stage's batch size adaptive, from a sixteenth of its
/// `batch_events_max` (at least 1) up to it.
fn adaptive_config(engine: &EngineConfig) -> Result<EngineConfig, String> {
    let floor = (engine.defaults().batch_events_max / 16).max(1);
    varied(engine, |b| b.batch_events_min(floor))
}

/// The durable cases, `engine_durable` first: the baselines follow the cadence of its latest run
/// (`cadence`, first set by a run of its own here; in a round run backwards, the previous round's).
fn durable_cases<'a>(
    config: &BenchConfig,
    engine: &'a EngineConfig,
    durable: &'a [Order],
    records: &'a [conduit::log::Record],
    dir: &'a std::path::Path,
    cadence: &'a std::cell::Cell<Cadence>,
) -> Result<Vec<Case<'a>>, String> {
    let durable_events = config.durable_orders * EVENTS_PER_ORDER;
    let event_bytes = encoded_event_bytes(records);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The baselines run at the engine's cadence, measured in this run: first by a run of its
    // own, then by engine_durable's latest run (in the same round, or the round before when a
    // round runs backwards).
    let first = Cadence::of(&engine_durable(engine, durable, dir), durable_events)
        .ok_or("the durable engine made no durable commit")?;
    cadence.set(first);
    let Cadence { events_per_sync, bytes_per_event } = first;
    Ok(vec![
        (
            "engine_durable",
            format!("conduit engine, {:?}, immediate log", config.engine.defaults()),
            durable_events,
            Box::new(move || {
                let run = engine_durable(engine, durable, dir);
                if let Some(measured) = Cadence::of(&run, durable_events) {
                    cadence.set(measured);
                }
                run
            }) as Box<dyn Fn() -> Run>,
        ),
        (
            "redb_rows",
            format!(
                "redb, one {event_bytes}-byte row per event, as many rows per immediate transaction as \
                 engine_durable's run in the same round put events in a durable commit (first: {events_per_sync})"
            ),
            durable_events,
            Box::new(move || redb_rows(dir, records, event_bytes, cadence.get().events_per_sync)),
        ),
        (
            "log_writer",
            format!(
                "conduit log alone, immediate, appends of 4,096 events from one thread, as many events per \
                 commit as engine_durable's run in the same round (first: {events_per_sync})"
            ),
            durable_events,
            Box::new(move || log_writer(dir, records, cadence.get().events_per_sync)),
        ),
        (
            "disk_seq_write_fsync",
            format!(
                "plain file, write + fdatasync at engine_durable's bytes per event on disk and events per durable \
                 commit in the same round (first: {bytes_per_event} bytes, {events_per_sync} events)"
            ),
            durable_events,
            Box::new(move || {
                let Cadence { events_per_sync, bytes_per_event } = cadence.get();
                disk_seq_write_fsync(dir, durable_events, bytes_per_event, events_per_sync)
            }),
        ),
        (
            "engine_durable_no_checkpoints",
            "as engine_durable, one checkpoint at close instead of one per 262,144 records".into(),
            durable_events,
            Box::new(move || engine_durable_no_checkpoints(engine, durable, dir)),
        ),
        (
            "engine_durable_no_quick_repair",
            "as engine_durable, commits without redb's allocator state (a full repair after a crash)".into(),
            durable_events,
            Box::new(move || engine_durable_no_quick_repair(engine, durable, dir)),
        ),
    ])
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
                Box::new(move || chain_ceiling(stages, chain_events).into()) as Box<dyn Fn() -> Run>,
            ),
            (
                "chain_crossbeam_per_event",
                format!("{stages} threads, bounded({PER_EVENT_CAPACITY}) crossbeam channels, one event per message"),
                chain_events,
                Box::new(move || chain_crossbeam(stages, chain_events).into()),
            ),
            (
                "chain_engine",
                format!("{stages} pass-through engine stages, {:?}", config.engine.defaults()),
                chain_events,
                Box::new(move || chain_engine(engine, stages, chain_events).into()),
            ),
            (
                "chain_engine_untracked",
                "as chain_engine, without completion tracking".into(),
                chain_events,
                Box::new(move || chain_engine_tracked(engine, stages, chain_events, false).into()),
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
                Box::new(move || fanout(engine, fanout_events, false).into()) as Box<dyn Fn() -> Run>,
            ),
            (
                "fanout_3_plus_slow_subscriber",
                "the same, plus a subscriber waiting 20 us per event with overflow = dead_letter (fast ones timed)"
                    .into(),
                fanout_events,
                Box::new(move || fanout(engine, fanout_events, true).into()),
            ),
        ]);
    }
    cases
}

/// Runs the cases `repeat` times, interleaved; the median of each.
fn measure(cases: &[Case<'_>], repeat: u32, progress: &mut impl FnMut(&str, u32)) -> Vec<CaseResult> {
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); cases.len()];
    debug_assert!(!cases.is_empty());
    for round in 0..repeat.max(1) {
        for i in round_order(cases.len(), round) {
            let (name, _, _, case) = &cases[i];
            progress(name, round);
            let before = process_cpu();
            let mut run = case();
            if run.cpu.is_none() {
                run.cpu = cpu_since(before);
            }
            runs[i].push(run);
        }
    }
    cases
        .iter()
        .zip(runs)
        .map(|((name, setup, events, _), runs)| {
            let rates: Vec<f64> = runs.iter().map(|r| *events as f64 / r.elapsed.as_secs_f64().max(1e-9)).collect();
            let runs_cpu: Option<Vec<f64>> =
                runs.iter().map(|r| r.cpu.map(|c| c.as_secs_f64() * 1e9 / (*events as f64).max(1.0))).collect();
            let events_per_sec = median(&rates);
            // Over every run: what the case wrote and how often it synced.
            let total_events = *events as f64 * runs.len() as f64;
            let syncs: Option<u64> = runs.iter().map(|r| r.syncs).sum();
            let bytes: Option<u64> = runs.iter().map(|r| r.bytes_written).sum();
            let bytes_per_event = bytes.map(|b| b as f64 / total_events.max(1.0));
            let frame_bytes: Option<u64> = runs.iter().map(|r| r.frame_bytes).sum();
            let cpu: Option<Duration> = runs.iter().map(|r| r.cpu).sum();
            let wall: Duration = runs.iter().map(|r| r.elapsed).sum();
            CaseResult {
                name: (*name).to_owned(),
                events_per_sec,
                events: *events,
                runs_events_per_sec: rates,
                runs_cpu_ns_per_event: runs_cpu.unwrap_or_default(),
                events_per_sync: syncs.filter(|&s| s > 0).map(|s| total_events / s as f64),
                bytes_per_event,
                mb_per_sec: bytes_per_event.map(|b| b * events_per_sec / 1e6),
                frame_bytes_per_event: frame_bytes.map(|b| b as f64 / total_events.max(1.0)),
                cpu_ns_per_event: cpu.map(|c| c.as_secs_f64() * 1e9 / total_events.max(1.0)),
                cores_busy: cpu.map(|c| c.as_secs_f64() / wall.as_secs_f64().max(1e-9)),
                setup: setup.clone(),
            }
        })
        .collect()
}

/// The order of the cases in `round`: forwards in even rounds, backwards in odd ones, so each
/// pair of cases is measured in both orders (what runs just before a case, a machine still busy
/// with it or a heap it left warm, then favours neither).
fn round_order(cases: usize, round: u32) -> Box<dyn Iterator<Item = usize>> {
    if round % 2 == 0 {
        Box::new(0..cases)
    } else {
        Box::new((0..cases).rev())
    }
}

/// The cases' medians and the ratios that matter.
fn report(results: Vec<CaseResult>, config: &BenchConfig) -> BenchReport {
    let case = |name: &str| results.iter().find(|c| c.name == name);
    let (mut ratios, mut cpu_ratios) = (BTreeMap::new(), BTreeMap::new());
    let (mut paired_ratios, mut paired_cpu_ratios) = (BTreeMap::new(), BTreeMap::new());
    for (a, b) in [
        ("engine_memory", "ceiling_one_thread"),
        ("engine_memory", "disruptor_chain"),
        ("engine_memory", "crossbeam_per_event_chain"),
        ("engine_memory_poison_1e-4", "engine_memory"),
        ("engine_memory", "engine_memory_untracked"),
        ("engine_memory_watched_10hz", "engine_memory"),
        ("engine_memory_elastic", "engine_memory"),
        ("engine_memory_adaptive_batches", "engine_memory"),
        ("engine_durable", "engine_memory"),
        // The durable baselines, log_writer among them, follow engine_durable's cadence.
        ("engine_durable", "redb_rows"),
        ("log_writer", "disk_seq_write_fsync"),
        ("engine_durable", "disk_seq_write_fsync"),
        ("engine_durable", "engine_durable_no_checkpoints"),
        ("engine_durable", "engine_durable_no_quick_repair"),
        ("chain_engine", "chain_ceiling_one_thread"),
        ("fanout_3_plus_slow_subscriber", "fanout_3_subscribers"),
        ("chain_engine", "chain_crossbeam_per_event"),
        ("chain_engine", "chain_engine_untracked"),
    ] {
        let (Some(a), Some(b)) = (case(a), case(b)) else { continue };
        let pair = format!("{} / {}", a.name, b.name);
        if a.events_per_sec > 0.0 && b.events_per_sec > 0.0 {
            ratios.insert(pair.clone(), a.events_per_sec / b.events_per_sec);
        }
        if let (Some(a_cpu), Some(b_cpu)) = (a.cpu_ns_per_event, b.cpu_ns_per_event) {
            if a_cpu > 0.0 {
                cpu_ratios.insert(pair.clone(), b_cpu / a_cpu);
            }
        }
        if let Some(interval) = paired(&a.runs_events_per_sec, &b.runs_events_per_sec) {
            paired_ratios.insert(pair.clone(), interval);
        }
        if let Some(interval) = paired(&b.runs_cpu_ns_per_event, &a.runs_cpu_ns_per_event) {
            paired_cpu_ratios.insert(pair, interval);
        }
    }
    BenchReport {
        cases: results,
        ratios,
        cpu_ratios,
        paired_ratios,
        paired_cpu_ratios,
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

/// `top[i] / bottom[i]` round by round, their median and its 95% interval; `None` with fewer
/// than [`PAIRED_ROUNDS_MIN`] rounds, or a round with nothing to divide by.
fn paired(top: &[f64], bottom: &[f64]) -> Option<Interval> {
    if top.len() != bottom.len() || top.len() < PAIRED_ROUNDS_MIN || bottom.iter().any(|&b| b <= 0.0) {
        return None;
    }
    let ratios: Vec<f64> = top.iter().zip(bottom).map(|(t, b)| t / b).collect();
    median_interval(&ratios)
}

/// The median of `values` and a 95% confidence interval for it that assumes nothing of their
/// distribution: the `k`th smallest and `k`th largest, with the largest `k` for which fewer
/// than `k` values on one side of the true median has probability at most 2.5% (each value
/// falls on either side with probability 1/2: a binomial tail). `None` with fewer than
/// [`PAIRED_ROUNDS_MIN`] values.
fn median_interval(values: &[f64]) -> Option<Interval> {
    let n = values.len();
    if n < PAIRED_ROUNDS_MIN {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    // P(B <= j) for B ~ Binomial(n, 1/2), summed in logarithms (2^-n underflows past 1,074).
    let ln_half_n = n as f64 * 0.5f64.ln();
    let (mut ln_choose, mut tail, mut k) = (0.0f64, 0.0f64, 0);
    for j in 0..n {
        if j > 0 {
            ln_choose += ((n - j + 1) as f64).ln() - (j as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
        if tail > 0.025 {
            break;
        }
        // Fewer than j + 1 values below the median has probability `tail` <= 2.5%.
        k = j + 1;
    }
    // k >= 1: with n >= PAIRED_ROUNDS_MIN, P(B = 0) = 2^-n <= 1/64.
    Some(Interval { median: median(&sorted), low: sorted[k - 1], high: sorted[n - k], rounds: n })
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
    #[test]
    fn rounds_run_the_cases_forwards_then_backwards() {
        let rounds: Vec<Vec<usize>> = (0..3).map(|round| super::round_order(3, round).collect()).collect();
        assert_eq!(rounds, [[0, 1, 2], [2, 1, 0], [0, 1, 2]]);
    }

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
        assert_eq!(report.cases.len(), 17);
        assert!(report.cases[..9].iter().all(|c| c.events == 35_000 && c.events_per_sec > 0.0));
        assert!(report.cases[9..11].iter().all(|c| c.events == 20_000 && c.bytes_per_event.is_none()));
        let durable = &report.cases[11..];
        assert!(durable.iter().all(|c| c.events == 14_000 && c.bytes_per_event.is_some_and(|b| b > 40.0)));
        // The baselines run at the engine's measured cadence: within 10% of its events per sync.
        let cadence = |name: &str| durable.iter().find(|c| c.name == name).and_then(|c| c.events_per_sync);
        let engine = cadence("engine_durable").expect("the engine syncs");
        for baseline in ["redb_rows", "disk_seq_write_fsync"] {
            let measured = cadence(baseline).expect("the baseline syncs");
            assert!((measured / engine - 1.0).abs() <= 0.1, "{baseline}: {measured} events per sync, engine {engine}");
        }
        // The log alone groups at most as many records as the engine committed at once (fewer
        // if its one appending thread falls behind its writer).
        let alone = cadence("log_writer").expect("the log syncs");
        assert!(alone <= engine * 1.1, "log_writer: {alone} events per sync, engine {engine}");
        assert_eq!(report.ratios.len(), 15);
        assert!(report.ratios.contains_key("log_writer / disk_seq_write_fsync"), "{:?}", report.ratios.keys());
        // Every case's CPU time (the process's: other tests add theirs), and for every ratio the
        // one its CPU times allow.
        for case in &report.cases {
            let (cpu, cores) = (case.cpu_ns_per_event.unwrap_or(0.0), case.cores_busy.unwrap_or(0.0));
            assert!(cpu > 0.0 && cores > 0.0, "{}: {cpu} ns, {cores} cores", case.name);
        }
        assert_eq!(report.cpu_ratios.keys().collect::<Vec<_>>(), report.ratios.keys().collect::<Vec<_>>());
        if let Some(memory) = report.memory {
            assert_eq!(memory.orders, 200);
            assert!(memory.peak_rss_mib >= memory.steady_rss_mib && memory.steady_rss_mib > 0.0);
        }
    }

    #[test]
    fn the_process_cpu_clock_counts_work() {
        // The whole process's clock (other tests' threads add to it): it never goes back, and
        // 50 ms of spinning on this thread adds at least most of that.
        let before = process_cpu().expect("a CPU clock on this platform");
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = process_cpu().expect("a CPU clock");
        assert!(
            after >= before + Duration::from_millis(30),
            "{:?} of CPU while spinning 50 ms",
            after.saturating_sub(before)
        );
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < f64::EPSILON);
    }

    /// The interval's ends are the order statistics the binomial tables give for a median's
    /// 95% interval: the extremes of 6, the 4th from each end of 16, the 40th of 100.
    #[test]
    fn a_medians_interval_takes_the_order_statistics_of_the_binomial_tables() {
        let values = |n: usize| -> Vec<f64> { (1..=n).rev().map(|v| v as f64).collect() };
        assert_eq!(super::median_interval(&values(5)), None, "five values give no 95% interval");
        let six = super::median_interval(&values(6)).expect("six values give one");
        assert_eq!((six.low, six.median, six.high, six.rounds), (1.0, 3.5, 6.0, 6));
        let sixteen = super::median_interval(&values(16)).expect("sixteen");
        assert_eq!((sixteen.low, sixteen.high), (4.0, 13.0));
        let hundred = super::median_interval(&values(100)).expect("a hundred");
        assert_eq!((hundred.low, hundred.high), (40.0, 61.0));
        // Past 1,074 values 2^-n underflows: the tail is summed in logarithms.
        let many = super::median_interval(&values(2_000)).expect("two thousand");
        assert_eq!((many.low, many.high), (956.0, 1045.0));
    }

    /// A slowdown that hits both cases of a round cancels out of its ratio: rounds at wildly
    /// different speeds, the same ratio in each, give that ratio and an interval of width zero.
    #[test]
    fn round_by_round_ratios_cancel_what_slows_both_cases_of_a_round() {
        let noise = [1.0, 0.5, 1.5, 0.7, 1.2, 0.9, 1.1, 0.6];
        let fast: Vec<f64> = noise.iter().map(|n| 4.0 * n).collect();
        let slow: Vec<f64> = noise.iter().map(|n| 5.0 * n).collect();
        let paired = super::paired(&fast, &slow).expect("eight rounds");
        for end in [paired.median, paired.low, paired.high] {
            assert!((end - 0.8).abs() < 1e-12, "{paired:?}");
        }
        assert_eq!(paired.rounds, 8);
        assert_eq!(super::paired(&fast[..5], &slow[..5]), None, "too few rounds");
        assert_eq!(super::paired(&fast, &slow[..7]), None, "rounds missing on one side");
    }
}
