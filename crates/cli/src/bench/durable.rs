//! The durable cases: the engine with an immediate log against redb rows, the log alone and a
//! plain file with fsync. Each reports the durable commits (each ends in an fsync) and the disk
//! space it wrote; the redb and plain-file baselines run at the cadence the engine measured in the
//! same bench run (events per commit, bytes per event), so that they do the same work.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use conduit::log::{encode_frame, Frame, Log, LogOptions, Record, STAGE_INGRESS};
use conduit::EngineConfig;
use conduit_orders::{self as orders, Order, OrderEvent, SimConfig};

use super::{Run, EVENTS_PER_ORDER};

/// What the engine's durable run did per commit, measured: the baselines run at it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cadence {
    /// Events per durable commit.
    pub events_per_sync: u64,
    /// Disk space the log file took per event.
    pub bytes_per_event: usize,
}

impl Cadence {
    /// The cadence `run` measured over `events` events; `None` if it measured no commit.
    #[must_use]
    pub fn of(run: &Run, events: u64) -> Option<Self> {
        let syncs = run.syncs.filter(|&s| s > 0)?;
        let bytes = run.bytes_written?;
        Some(Self {
            events_per_sync: events.div_ceil(syncs).max(1),
            bytes_per_event: usize::try_from(bytes / events.max(1)).unwrap_or(usize::MAX).max(1),
        })
    }
}

/// The disk space `path` occupies (allocated blocks), 0 if it cannot be read.
pub(super) fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// The records a pipeline run journals for `events` events: one placement (with its 34-byte
/// payload) then six facts without payload, per order.
pub(super) fn typical_records(events: u64) -> Vec<Record> {
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

/// `records` in appends of `append` records, with what the engine's workers journal besides:
/// the messages' completions, in records of [`COMPLETIONS_PER_RECORD`] ids, each a block behind
/// the placements it lists (so that, as in the engine, a few thousand messages are in flight at a
/// checkpoint, not every message ever placed). Also returns how many records that is in all.
fn appends_with_completions(records: &[Record], append: usize) -> (Vec<Vec<Record>>, u64) {
    let mut batches = Vec::new();
    let mut batch = Vec::with_capacity(append);
    let (mut placed, mut finished) = (Vec::new(), Vec::new());
    let mut total = 0u64;
    for record in records {
        if record.stage == STAGE_INGRESS {
            placed.push(record.id);
        }
        batch.push(record.clone());
        if placed.len() == COMPLETIONS_PER_RECORD {
            if !finished.is_empty() {
                batch.push(conduit::log::completion_record(&finished));
            }
            finished = std::mem::take(&mut placed);
        }
        if batch.len() >= append {
            total += batch.len() as u64;
            batches.push(std::mem::replace(&mut batch, Vec::with_capacity(append)));
        }
    }
    for ids in [finished, placed] {
        if !ids.is_empty() {
            batch.push(conduit::log::completion_record(&ids));
        }
    }
    if !batch.is_empty() {
        total += batch.len() as u64;
        batches.push(batch);
    }
    (batches, total)
}

/// Message ids a worker's completion record lists at most (the engine's own bound).
const COMPLETIONS_PER_RECORD: usize = 4_096;

/// Bytes per event in a full frame of typical records.
pub(super) fn encoded_event_bytes(records: &[Record]) -> usize {
    let sample: Vec<Record> = records.iter().take(4_096).cloned().collect();
    let count = sample.len().max(1);
    let mut bytes = Vec::new();
    encode_frame(&Frame { seq: 0, records: sample }, &mut bytes);
    bytes.len().div_ceil(count)
}

/// A file path for one run of a case; any leftover from an earlier run is removed.
pub(super) fn scratch(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("conduit-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// One redb row of `event_bytes` per event, `per_txn` rows per durable transaction: what a
/// naive event store does.
pub fn redb_rows(dir: &Path, records: &[Record], event_bytes: usize, per_txn: u64) -> Run {
    const ROWS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("rows");
    let path = scratch(dir, "rows.redb");
    let db = redb::Database::create(&path).expect("the bench directory is writable");
    let row = vec![0x5Au8; event_bytes];
    let per_txn = usize::try_from(per_txn.max(1)).unwrap_or(usize::MAX);
    let start = Instant::now();
    let mut syncs = 0;
    for (chunk_index, chunk) in records.chunks(per_txn).enumerate() {
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(ROWS).expect("table");
            for (i, _) in chunk.iter().enumerate() {
                table.insert((chunk_index * per_txn + i) as u64, row.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
        syncs += 1;
    }
    let elapsed = start.elapsed();
    drop(db);
    let bytes = disk_bytes(&path);
    let _ = std::fs::remove_file(&path);
    Run { elapsed, syncs: Some(syncs), bytes_written: Some(bytes), frame_bytes: None, cpu: None }
}

/// conduit's log alone: `records` and their messages' completions appended from one thread in
/// appends of 4,096 (fewer if `per_commit` is less), at most `per_commit` records a group (the
/// engine's cadence) but for the last append taken in.
pub fn log_writer(dir: &Path, records: &[Record], per_commit: u64) -> Run {
    let path = scratch(dir, "log.redb");
    let group_records_max = usize::try_from(per_commit).unwrap_or(usize::MAX).clamp(1, 1 << 20);
    let options = LogOptions { group_records_max, ..LogOptions::default() };
    let log = Log::open(&path, options).expect("the bench directory is writable");
    let (batches, total) = appends_with_completions(records, group_records_max.min(4_096));
    // Its own CPU clock: building the appends above is not the log's work.
    let cpu_before = super::process_cpu();
    let start = Instant::now();
    for batch in batches {
        log.append_detached(batch).expect("healthy log");
    }
    log.sync().expect("healthy log");
    let elapsed = start.elapsed();
    let cpu = super::cpu_since(cpu_before);
    let stats = log.stats();
    assert_eq!(stats.events_appended, total);
    drop(log);
    let bytes = disk_bytes(&path);
    let _ = std::fs::remove_file(&path);
    Run { elapsed, syncs: Some(stats.durable_commits), bytes_written: Some(bytes), frame_bytes: Some(stats.bytes), cpu }
}

/// `event_bytes` per event to a plain file: one write and fdatasync per `per_sync` events.
pub fn disk_seq_write_fsync(dir: &Path, events: u64, event_bytes: usize, per_sync: u64) -> Run {
    let path = scratch(dir, "seq.bin");
    let mut file = std::fs::File::create(&path).expect("the bench directory is writable");
    let per_sync = per_sync.max(1);
    let chunk = vec![0xA5u8; event_bytes * usize::try_from(per_sync).unwrap_or(usize::MAX)];
    let start = Instant::now();
    let mut left = events;
    let mut syncs = 0;
    while left > 0 {
        let n = left.min(per_sync);
        let len = usize::try_from(n).unwrap_or(usize::MAX) * event_bytes;
        file.write_all(&chunk[..len]).expect("write");
        file.sync_data().expect("fdatasync");
        syncs += 1;
        left -= n;
    }
    let elapsed = start.elapsed();
    drop(file);
    let bytes = disk_bytes(&path);
    let _ = std::fs::remove_file(&path);
    Run { elapsed, syncs: Some(syncs), bytes_written: Some(bytes), frame_bytes: None, cpu: None }
}

/// The order pipeline with an immediate log.
pub fn engine_durable(config: &EngineConfig, orders: &[Order], dir: &Path) -> Run {
    engine_durable_with(config, orders, dir, LogOptions::default())
}

/// [`engine_durable`] with a checkpoint only when the log closes: what checkpoints cost.
pub fn engine_durable_no_checkpoints(config: &EngineConfig, orders: &[Order], dir: &Path) -> Run {
    engine_durable_with(config, orders, dir, LogOptions { checkpoint_records: 1 << 32, ..LogOptions::default() })
}

/// [`engine_durable`] without quick repair: commits do not save redb's allocator state, so an
/// open after a crash walks the whole file. What quick repair costs.
pub fn engine_durable_no_quick_repair(config: &EngineConfig, orders: &[Order], dir: &Path) -> Run {
    engine_durable_with(config, orders, dir, LogOptions { quick_repair: false, ..LogOptions::default() })
}

fn engine_durable_with(config: &EngineConfig, orders: &[Order], dir: &Path, options: LogOptions) -> Run {
    let path = scratch(dir, "engine.redb");
    let start = Instant::now();
    let log = Arc::new(Log::open(&path, options).expect("the bench directory is writable"));
    let pipeline = orders::OrderPipeline::start_with(config, &SimConfig::default(), Some(Arc::clone(&log)), None)
        .expect("the bench's engine configuration was validated");
    // One ingress window per call (see engine_memory's).
    for chunk in orders.chunks(conduit::INGRESS_WINDOW_EVENTS) {
        pipeline.submit_many(chunk.iter().copied()).expect("the engine is healthy during a bench");
    }
    let report = pipeline.finish();
    log.close().expect("healthy log");
    let elapsed = start.elapsed();
    assert!(report.violations().is_empty(), "durable run broke an invariant: {:?}", report.violations());
    let stats = log.stats();
    drop(log);
    let bytes = disk_bytes(&path);
    let _ = std::fs::remove_file(&path);
    Run {
        elapsed,
        syncs: Some(stats.durable_commits),
        bytes_written: Some(bytes),
        frame_bytes: Some(stats.bytes),
        cpu: None,
    }
}
