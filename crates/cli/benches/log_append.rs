//! Appending to the log: conduit's writer (frames, one commit per group) against one redb row per
//! event, both at 10,000 events per fsynced transaction, on the same records.
//!
//! `cargo bench --bench log_append`; figures are events per second.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::time::Duration;

use conduit::log::Record;
use conduit_cli::bench::{log_writer, redb_rows};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const EVENTS: u64 = 200_000;

fn log_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let records: Vec<Record> = (0..EVENTS)
        .map(|i| Record { id: i + 1, stream: i / 7 + 1, kind: 1, timestamp_us: i, ..Record::default() })
        .collect();
    let mut group = c.benchmark_group("log_append");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    group.bench_function("redb_rows_batch10k", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| redb_rows(dir.path(), &records, 75, 10_000).elapsed).sum());
    });
    group.bench_function("log_writer", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| log_writer(dir.path(), &records, 10_000).elapsed).sum());
    });
    group.finish();
}

criterion_group!(benches, log_append);
criterion_main!(benches);
