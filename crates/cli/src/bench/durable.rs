//! The durable cases: the engine with an immediate log against redb rows, the log alone and a
//! plain file with fsync, on the same bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::log::{encode_frame, Frame, Log, LogOptions, Record, STAGE_INGRESS};
use conduit::EngineConfig;
use conduit_orders::{self as orders, Order, OrderEvent, SimConfig};

use super::EVENTS_PER_ORDER;

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
    engine_durable_with(config, orders, dir, LogOptions::default())
}

/// [`engine_durable`] with a checkpoint only when the log closes: what checkpoints cost.
pub fn engine_durable_no_checkpoints(config: &EngineConfig, orders: &[Order], dir: &Path) -> Duration {
    engine_durable_with(config, orders, dir, LogOptions { checkpoint_records: 1 << 32, ..LogOptions::default() })
}

/// [`engine_durable`] without quick repair: commits do not save redb's allocator state, so an
/// open after a crash walks the whole file. What quick repair costs.
pub fn engine_durable_no_quick_repair(config: &EngineConfig, orders: &[Order], dir: &Path) -> Duration {
    engine_durable_with(config, orders, dir, LogOptions { quick_repair: false, ..LogOptions::default() })
}

fn engine_durable_with(config: &EngineConfig, orders: &[Order], dir: &Path, options: LogOptions) -> Duration {
    let path = scratch(dir, "engine.redb");
    let start = Instant::now();
    let log = Arc::new(Log::open(&path, options).expect("the bench directory is writable"));
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
