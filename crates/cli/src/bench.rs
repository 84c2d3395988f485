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

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use conduit::log::{encode_frame, Frame, Log, LogOptions, Record, STAGE_INGRESS};
use conduit::EngineConfig;
use conduit_orders::ports::{
    Channel, InventoryStore, Notifier, PaymentGateway, SimulatedCarrier, SimulatedGateway, SimulatedInventory,
    SimulatedNotifier,
};
use conduit_orders::{self as orders, Effect, IdempotencyKey, Order, OrderEvent, SimConfig, Workload};

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

/// Memory under overload: a producer far faster than the pipeline drains.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Orders pushed.
    pub orders: u64,
    /// How fast the producer hands orders to a pipeline running at full speed (orders/s).
    pub producer_orders_per_sec: f64,
    /// How fast the pipeline drained them (orders/s).
    pub drain_orders_per_sec: f64,
    /// `producer / drain`.
    pub overload_factor: f64,
    /// Resident memory once every queue had filled (MiB).
    pub steady_rss_mib: f64,
    /// Largest resident memory sampled after that (MiB).
    pub peak_rss_mib: f64,
    /// `peak - steady` (MiB); the goal is at most 64.
    pub growth_mib: f64,
    /// Events all stage queues hold at most together.
    pub queue_capacity_events: u64,
}

/// The resident set size of this process, from `/proc/self/status` (Linux only).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Pushes `orders` into a pipeline whose payment calls sleep 10 us (about 60 us in practice), from a producer
/// that never pauses, sampling resident memory every 10 ms. `None` where `/proc` is missing.
pub fn overload_memory(config: &EngineConfig, orders: u64) -> Option<MemoryReport> {
    rss_bytes()?;
    let sim = SimConfig { payment_latency_us: 10, ..SimConfig::default() };
    let workload = workload(42, orders);
    // What the producer can push: the same orders through the pipeline at full speed.
    let producer_rate = orders as f64 / engine_memory(config, &workload).as_secs_f64().max(1e-9);
    let pipeline = orders::OrderPipeline::start(config, &sim).expect("the bench's engine configuration was validated");
    let capacity: u64 = pipeline.engine().snapshot().stages.iter().map(|s| s.queue_capacity as u64).sum();
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let samples = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.push((start.elapsed(), rss_bytes().unwrap_or(0)));
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        });
        for chunk in workload.chunks(1_024) {
            pipeline.submit_many(chunk.iter().copied()).expect("the engine is healthy during a bench");
        }
        let report = pipeline.finish();
        done.store(true, Ordering::Relaxed);
        assert!(report.violations().is_empty(), "overload run broke an invariant: {:?}", report.violations());
        sampler.join().expect("sampler")
    });
    let elapsed = start.elapsed();
    // Steady state: once the first tenth of the run has passed, every queue is full.
    let settle = elapsed / 10;
    let steady = samples.iter().find(|(t, _)| *t >= settle).map_or(0, |(_, rss)| *rss);
    let peak = samples.iter().filter(|(t, _)| *t >= settle).map(|(_, rss)| *rss).max().unwrap_or(steady);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let drain_rate = orders as f64 / elapsed.as_secs_f64().max(1e-9);
    Some(MemoryReport {
        orders,
        producer_orders_per_sec: producer_rate,
        drain_orders_per_sec: drain_rate,
        overload_factor: producer_rate / drain_rate,
        steady_rss_mib: mib(steady),
        peak_rss_mib: mib(peak),
        growth_mib: mib(peak.saturating_sub(steady)),
        queue_capacity_events: capacity,
    })
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
    let durable_names = ["redb_rows_batch10k", "log_writer", "disk_seq_write_fsync", "engine_durable"];
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
        ("engine_durable", "redb_rows_batch10k"),
        ("engine_durable", "disk_seq_write_fsync"),
        ("log_writer", "redb_rows_batch10k"),
        ("log_writer", "disk_seq_write_fsync"),
        ("chain_engine", "chain_ceiling_one_thread"),
        ("fanout_3_plus_slow_subscriber", "fanout_3_subscribers"),
        ("chain_engine", "chain_crossbeam_per_event"),
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

/// The records a pipeline run journals for `events` events: one placement (with its 34-byte
/// payload) then six facts without payload, per order.
fn typical_records(events: u64) -> Vec<Record> {
    (0..events)
        .map(|i| {
            let order = i / EVENTS_PER_ORDER + 1;
            let mut payload = Vec::new();
            let kind = u16::try_from(i % EVENTS_PER_ORDER).unwrap_or(0) + 1;
            if kind == 1 {
                let event = OrderEvent::place(Order { id: order, customer: 7, sku: 3, quantity: 1, amount_cents: 990 });
                event.encode(&mut payload);
            }
            Record {
                id: i + 1,
                stream: order,
                kind,
                stage: if kind == 1 { STAGE_INGRESS } else { 0 },
                timestamp_us: 1_795_000_000_000_000 + i,
                correlation: order,
                causation: i,
                payload,
                ..Record::default()
            }
        })
        .collect()
}

/// Bytes per event in a full frame of typical records.
fn encoded_event_bytes(records: &[Record]) -> usize {
    let sample: Vec<Record> = records.iter().take(4_096).cloned().collect();
    let count = sample.len().max(1);
    let mut bytes = Vec::new();
    encode_frame(&Frame { seq: 0, records: sample }, &mut bytes);
    bytes.len().div_ceil(count)
}

/// A file path for one run of a case; any leftover from an earlier run is removed.
fn scratch(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("conduit-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// One redb row per event, 10,000 per durable transaction: what a naive event store does.
pub fn redb_rows_batch10k(dir: &Path, records: &[Record], event_bytes: usize) -> Duration {
    const ROWS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("rows");
    let path = scratch(dir, "rows.redb");
    let db = redb::Database::create(&path).expect("the bench directory is writable");
    let row = vec![0x5Au8; event_bytes];
    let start = Instant::now();
    for (chunk_index, chunk) in records.chunks(10_000).enumerate() {
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(ROWS).expect("table");
            for (i, _) in chunk.iter().enumerate() {
                table.insert((chunk_index * 10_000 + i) as u64, row.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let elapsed = start.elapsed();
    drop(db);
    let _ = std::fs::remove_file(&path);
    elapsed
}

/// conduit's log alone: appends of 4,096 records from one thread, immediate durability.
pub fn log_writer(dir: &Path, records: &[Record]) -> Duration {
    let path = scratch(dir, "log.redb");
    let log = Log::open(&path, LogOptions::default()).expect("the bench directory is writable");
    let batches: Vec<Vec<Record>> = records.chunks(4_096).map(<[Record]>::to_vec).collect();
    let start = Instant::now();
    for batch in batches {
        log.append_detached(batch).expect("healthy log");
    }
    log.sync().expect("healthy log");
    let elapsed = start.elapsed();
    assert_eq!(log.stats().events_appended, records.len() as u64);
    drop(log);
    let _ = std::fs::remove_file(&path);
    elapsed
}

/// The same bytes to a plain file: 10,000 events per write and fdatasync.
pub fn disk_seq_write_fsync(dir: &Path, events: u64, event_bytes: usize) -> Duration {
    let path = scratch(dir, "seq.bin");
    let mut file = std::fs::File::create(&path).expect("the bench directory is writable");
    let chunk = vec![0xA5u8; event_bytes * 10_000];
    let start = Instant::now();
    let mut left = events;
    while left > 0 {
        let n = left.min(10_000);
        let len = usize::try_from(n).unwrap_or(10_000) * event_bytes;
        file.write_all(&chunk[..len]).expect("write");
        file.sync_data().expect("fdatasync");
        left -= n;
    }
    let elapsed = start.elapsed();
    drop(file);
    let _ = std::fs::remove_file(&path);
    elapsed
}

/// The order pipeline with an immediate log.
pub fn engine_durable(config: &EngineConfig, orders: &[Order], dir: &Path) -> Duration {
    let path = scratch(dir, "engine.redb");
    let start = Instant::now();
    let log = Arc::new(Log::open(&path, LogOptions::default()).expect("the bench directory is writable"));
    let pipeline = orders::OrderPipeline::start_with(config, &SimConfig::default(), Some(Arc::clone(&log)), None)
        .expect("the bench's engine configuration was validated");
    for chunk in orders.chunks(4_096) {
        pipeline.submit_many(chunk.iter().copied()).expect("the engine is healthy during a bench");
    }
    let report = pipeline.finish();
    log.close().expect("healthy log");
    let elapsed = start.elapsed();
    assert!(report.violations().is_empty(), "durable run broke an invariant: {:?}", report.violations());
    drop(log);
    let _ = std::fs::remove_file(&path);
    elapsed
}

/// Runs `engine_memory` at each batch size and pool size, against a ceiling measured alongside.
pub fn sweep(
    config: &BenchConfig,
    batches: &[usize],
    workers: &[usize],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<SweepPoint>, conduit::ConfigError> {
    let workload: Vec<Order> =
        Workload::new(config.seed, 1_000, 100_000).take(usize::try_from(config.orders).unwrap_or(usize::MAX)).collect();
    let events = (config.orders * EVENTS_PER_ORDER) as f64;
    let mut points = Vec::new();
    for &w in workers {
        for &b in batches {
            progress(b, w);
            let engine = EngineConfig::builder().workers(w).batch_events_max(b).build()?;
            let mut engine_runs = Vec::new();
            let mut ceiling_runs = Vec::new();
            for _ in 0..config.repeat.max(1) {
                ceiling_runs.push(events / ceiling_one_thread(&workload).as_secs_f64().max(1e-9));
                engine_runs.push(events / engine_memory(&engine, &workload).as_secs_f64().max(1e-9));
            }
            let events_per_sec = median(&engine_runs);
            points.push(SweepPoint {
                batch_events_max: b,
                workers: w,
                events_per_sec,
                ratio_to_ceiling: events_per_sec / median(&ceiling_runs),
            });
        }
    }
    Ok(points)
}

/// The per-event work of one synthetic stage: a few multiply-xorshift rounds.
fn chain_step(x: u64) -> u64 {
    let mut h = x;
    for _ in 0..4 {
        h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    h
}

/// A chain's work done inline.
pub fn chain_ceiling(stages: usize, events: u64) -> Duration {
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..events {
        let mut x = i;
        for _ in 0..stages {
            x = chain_step(x);
        }
        sum = sum.wrapping_add(x);
    }
    std::hint::black_box(sum);
    start.elapsed()
}

/// A chain of threads linked by crossbeam channels, one event per message.
pub fn chain_crossbeam(stages: usize, events: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (first, mut input) = crossbeam_channel::bounded::<u64>(PER_EVENT_CAPACITY);
        for _ in 0..stages.saturating_sub(1) {
            let (tx, rx) = crossbeam_channel::bounded::<u64>(PER_EVENT_CAPACITY);
            let from = std::mem::replace(&mut input, rx);
            scope.spawn(move || from.into_iter().for_each(|x| tx.send(chain_step(x)).expect("open")));
        }
        let sink = scope.spawn(move || input.into_iter().fold(0u64, |s, x| s.wrapping_add(chain_step(x))));
        (0..events).for_each(|i| first.send(i).expect("open"));
        drop(first);
        std::hint::black_box(sink.join().expect("sink"));
    });
    start.elapsed()
}

#[derive(Debug, Clone, Copy)]
struct ChainEvent(u64);

impl conduit::Message for ChainEvent {
    fn key(&self) -> u64 {
        self.0
    }
}

/// A chain of pass-through engine stages.
///
/// # Panics
/// If the configuration does not start the engine or an event goes missing.
pub fn chain_engine(config: &EngineConfig, stages: usize, events: u64) -> Duration {
    use conduit::{Emitter, Engine, Envelope, Outcome, Topology};
    let mut topology = Topology::new();
    let ids: Vec<_> = (0..stages.max(1)).map(|i| topology.stage(&format!("s{i}"))).collect();
    topology.entry(ids[0]);
    for pair in ids.windows(2) {
        topology.link(pair[0], pair[1]);
    }
    for (i, &id) in ids.iter().enumerate() {
        let next = ids.get(i + 1).copied();
        topology.handler(id, move |_| {
            move |event: &Envelope<ChainEvent>, out: &mut Emitter<ChainEvent>| {
                let x = chain_step(event.msg.0);
                if let Some(next) = next {
                    out.emit(next, ChainEvent(x));
                }
                std::hint::black_box(x);
                Outcome::Done
            }
        });
    }
    let start = Instant::now();
    let engine = Engine::start(topology, config).expect("the bench's engine configuration was validated");
    for chunk in 0..events.div_ceil(4_096) {
        let first = chunk * 4_096;
        engine.submit_many((first..(first + 4_096).min(events)).map(ChainEvent)).expect("healthy engine");
    }
    let report = engine.shutdown();
    assert!(report.snapshot.stages.iter().all(|s| s.processed == events), "every event passed every stage");
    start.elapsed()
}

/// A subscriber's work: `rounds` multiply-xorshift steps.
fn subscriber_work(x: u64, rounds: u32) -> u64 {
    (0..rounds).fold(x, |h, _| chain_step(h))
}

/// Publish/subscribe fan-out: one publisher, three subscribers doing the same light work, and
/// with `slow`, a fourth that waits on a slow provider (a 20 us sleep per event, over 100 times
/// a fast subscriber's time per event) whose overflow policy is `dead_letter`. Times how long the
/// three fast subscribers take to handle every event.
///
/// # Panics
/// If the engine does not start or a fast subscriber misses an event.
pub fn fanout(config: &EngineConfig, events: u64, slow: bool) -> Duration {
    use conduit::{Emitter, Engine, Envelope, Outcome, Overflow, StageSettings, Topology};
    const FAST_ROUNDS: u32 = 8;
    let mut topology = Topology::new();
    let publisher = topology.stage("publisher");
    topology.entry(publisher);
    let mut subscribers: Vec<_> = ["fast_a", "fast_b", "fast_c"].iter().map(|n| topology.stage(n)).collect();
    if slow {
        subscribers.push(topology.stage("slow"));
    }
    for &stage in &subscribers {
        topology.bind(stage, "user.#").expect("a valid pattern");
    }
    let route = topology.publishes(publisher, "user.registered").expect("a valid key");
    topology.handler(publisher, move |_| {
        move |event: &Envelope<ChainEvent>, out: &mut Emitter<ChainEvent>| {
            out.publish(route, event.msg);
            Outcome::Done
        }
    });
    let done: Arc<AtomicU64> = Arc::new(AtomicU64::new(0));
    for (i, &stage) in subscribers.iter().enumerate() {
        let done = (i < 3).then(|| Arc::clone(&done));
        topology.handler(stage, move |_| {
            let done = done.clone();
            move |event: &Envelope<ChainEvent>, _: &mut Emitter<ChainEvent>| {
                std::hint::black_box(subscriber_work(event.msg.0, FAST_ROUNDS));
                match &done {
                    Some(done) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    None => std::thread::sleep(Duration::from_micros(20)),
                }
                Outcome::Done
            }
        });
    }
    let mut config = config.clone();
    if slow {
        let settings = StageSettings { overflow: Some(Overflow::DeadLetter), ..StageSettings::default() };
        config = EngineConfig::builder()
            .workers(config.defaults().workers)
            .batch_events_max(config.defaults().batch_events_max)
            .queue_batches(config.defaults().queue_batches)
            .stage("slow", settings)
            .build()
            .expect("the bench's engine configuration was validated");
    }
    let engine = Engine::start(topology, &config).expect("the bench's engine configuration was validated");
    let start = Instant::now();
    for chunk in 0..events.div_ceil(4_096) {
        let first = chunk * 4_096;
        engine.submit_many((first..(first + 4_096).min(events)).map(ChainEvent)).expect("healthy engine");
    }
    while done.load(Ordering::Relaxed) < 3 * events {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    let report = engine.shutdown();
    if slow {
        let slow = report.snapshot.stage("slow").expect("declared");
        assert_eq!(slow.processed + slow.overflowed, events, "the slow subscriber lost nothing");
    }
    elapsed
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

/// The six steps against fresh simulated ports, as the pipeline's handlers do them.
struct Work {
    gateway: SimulatedGateway,
    inventory: SimulatedInventory,
    notifier: SimulatedNotifier,
    carrier: SimulatedCarrier,
    confirmed: AtomicU64,
}

impl Work {
    fn new() -> Arc<Self> {
        let sim = SimConfig::default();
        let faults = conduit_orders::ports::Faults { seed: sim.seed, ..Default::default() };
        Arc::new(Self {
            gateway: SimulatedGateway::new(faults, 0.0),
            inventory: SimulatedInventory::new(faults, sim.skus, sim.stock_per_sku, 0),
            notifier: SimulatedNotifier::new(faults),
            carrier: SimulatedCarrier::default(),
            confirmed: AtomicU64::new(0),
        })
    }

    fn validate(order: &Order) -> bool {
        order.quantity > 0 && order.amount_cents > 0
    }

    fn charge(&self, order: &Order) -> bool {
        self.gateway.charge(IdempotencyKey::new(order.id, Effect::Charge), order, 0).is_ok()
    }

    fn reserve(&self, order: &Order) -> bool {
        self.inventory.reserve(IdempotencyKey::new(order.id, Effect::Reserve), order, 0).is_ok()
    }

    fn notify(&self, channel: Channel, order: &Order) {
        let _ = self.notifier.send(channel, IdempotencyKey::new(order.id, channel.effect()), order, 0);
    }

    fn ship(&self, order: &Order) {
        if self.carrier.ship(IdempotencyKey::new(order.id, Effect::Ship), order) {
            self.confirmed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn check(&self, orders: &[Order]) {
        assert_eq!(
            self.confirmed.load(Ordering::Relaxed),
            orders.len() as u64,
            "a baseline must finish every order, or its figure means nothing"
        );
    }
}

/// All six steps inline in one thread: the ceiling a pipeline is measured against.
pub fn ceiling_one_thread(orders: &[Order]) -> Duration {
    let work = Work::new();
    let start = Instant::now();
    for order in orders {
        if Work::validate(order) && work.charge(order) && work.reserve(order) {
            work.notify(Channel::Email, order);
            work.notify(Channel::Sms, order);
            work.ship(order);
        }
    }
    let elapsed = start.elapsed();
    work.check(orders);
    elapsed
}

const PER_EVENT_CAPACITY: usize = 1_024;

/// One thread per stage linked by crossbeam channels, one event per message.
pub fn crossbeam_per_event_chain(orders: &[Order]) -> Duration {
    use crossbeam_channel::bounded;
    let work = Work::new();
    let (to_payment, payment_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_inventory, inventory_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_email, email_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_sms, sms_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_shipping, shipping_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_order, order_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let w = &work;
        scope.spawn(move || {
            for order in order_in {
                if Work::validate(&order) && to_payment.send(order).is_err() {
                    return;
                }
            }
        });
        scope.spawn(move || {
            for order in payment_in {
                if w.charge(&order) && to_inventory.send(order).is_err() {
                    return;
                }
            }
        });
        scope.spawn(move || {
            for order in inventory_in {
                if w.reserve(&order)
                    && (to_email.send(order).is_err()
                        || to_sms.send(order).is_err()
                        || to_shipping.send(order).is_err())
                {
                    return;
                }
            }
        });
        scope.spawn(move || email_in.into_iter().for_each(|o| w.notify(Channel::Email, &o)));
        scope.spawn(move || sms_in.into_iter().for_each(|o| w.notify(Channel::Sms, &o)));
        scope.spawn(move || shipping_in.into_iter().for_each(|o| w.ship(&o)));
        for order in orders {
            if to_order.send(*order).is_err() {
                break;
            }
        }
        drop(to_order);
    });
    let elapsed = start.elapsed();
    work.check(orders);
    elapsed
}

const DISRUPTOR_RING: usize = 1 << 16;
const DISRUPTOR_BATCH: usize = 256;

/// A ring slot: the order, and what the steps decided (written by one, read by the next).
struct Slot {
    order: Order,
    /// 0: nothing yet; 1: validated; 2: charged; 3: reserved. Each step advances it.
    progress: AtomicU8,
}

/// The stages as dependent consumers of one `disruptor` ring; the better of two wait strategies.
pub fn disruptor_chain(orders: &[Order]) -> Duration {
    let spin = disruptor_chain_with(orders, disruptor::BusySpinWithSpinLoopHint);
    let sleep = disruptor_chain_with(orders, disruptor::Sleep::new(Duration::from_micros(50)));
    spin.min(sleep)
}

fn disruptor_chain_with<W: disruptor::wait_strategies::WaitStrategy + 'static>(orders: &[Order], wait: W) -> Duration {
    use disruptor::{build_single_producer, Producer, Sequence};
    let work = Work::new();
    let empty = Order { id: 0, customer: 0, sku: 0, quantity: 0, amount_cents: 0 };
    let factory = move || Slot { order: empty, progress: AtomicU8::new(0) };
    let step = |from: u8, to: u8, f: fn(&Work, &Order) -> bool| {
        let work = Arc::clone(&work);
        move |slot: &Slot, _: Sequence, _: bool| {
            if slot.progress.load(Ordering::Relaxed) == from && f(&work, &slot.order) {
                slot.progress.store(to, Ordering::Relaxed);
            }
        }
    };
    let leaf = |f: fn(&Work, &Order)| {
        let work = Arc::clone(&work);
        move |slot: &Slot, _: Sequence, _: bool| {
            if slot.progress.load(Ordering::Relaxed) == 3 {
                f(&work, &slot.order);
            }
        }
    };
    let start = Instant::now();
    {
        let mut producer = build_single_producer(DISRUPTOR_RING, factory, wait)
            .handle_events_with(step(0, 1, |_, o| Work::validate(o)))
            .and_then()
            .handle_events_with(step(1, 2, Work::charge))
            .and_then()
            .handle_events_with(step(2, 3, Work::reserve))
            .and_then()
            .handle_events_with(leaf(|w, o| w.notify(Channel::Email, o)))
            .handle_events_with(leaf(|w, o| w.notify(Channel::Sms, o)))
            .handle_events_with(leaf(Work::ship))
            .build();
        for chunk in orders.chunks(DISRUPTOR_BATCH) {
            producer.batch_publish(chunk.len(), |slots| {
                for (slot, order) in slots.zip(chunk) {
                    slot.order = *order;
                    *slot.progress.get_mut() = 0;
                }
            });
        }
        // Dropping the producer waits until every consumer has handled every event.
    }
    let elapsed = start.elapsed();
    work.check(orders);
    elapsed
}

/// The order pipeline on conduit's engine, no log.
///
/// # Panics
/// If the configuration does not start or the run breaks an invariant: a bench of a broken run
/// must not print a figure.
pub fn engine_memory(config: &EngineConfig, orders: &[Order]) -> Duration {
    let start = Instant::now();
    let pipeline = orders::OrderPipeline::start(config, &SimConfig::default())
        .expect("the bench's engine configuration was validated");
    for chunk in orders.chunks(4_096) {
        pipeline.submit_many(chunk.iter().copied()).expect("the engine is healthy during a bench");
    }
    let report = pipeline.finish();
    let elapsed = start.elapsed();
    assert!(report.violations().is_empty(), "engine run broke an invariant: {:?}", report.violations());
    // A malformed order is two events: its submission, and the order stage dead-lettering it.
    let poisoned = orders.iter().filter(|o| o.quantity == 0).count() as u64;
    assert_eq!(report.dead_letters.by_reason.get("malformed").copied().unwrap_or(0), poisoned);
    assert_eq!(report.events.total, (orders.len() as u64 - poisoned) * EVENTS_PER_ORDER + 2 * poisoned);
    elapsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_finishes_every_order_and_ratios_are_computed() {
        let dir = std::env::temp_dir().join(format!("conduit-bench-test-{}", std::process::id()));
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
        assert_eq!(report.cases.len(), 11);
        assert!(report.cases[..5].iter().all(|c| c.events == 35_000 && c.events_per_sec > 0.0));
        assert!(report.cases[5..7].iter().all(|c| c.events == 20_000 && c.event_bytes.is_none()));
        assert!(report.cases[7..].iter().all(|c| c.events == 14_000 && c.event_bytes.is_some_and(|b| b > 40)));
        assert_eq!(report.ratios.len(), 9);
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
