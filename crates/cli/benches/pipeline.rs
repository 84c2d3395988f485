//! End to end: the order pipeline on the engine against the same work done inline in one thread
//! and over per-event crossbeam channels, on the same seeded workload.
//!
//! `cargo bench --bench pipeline`; figures are events per second (7 events per order: the placement and six steps).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::time::Duration;

use conduit::EngineConfig;
use conduit_cli::bench::{ceiling_one_thread, crossbeam_per_event_chain, engine_memory, workload, EVENTS_PER_ORDER};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ORDERS: u64 = 100_000;

fn pipeline(c: &mut Criterion) {
    let orders = workload(42, ORDERS);
    let engine = EngineConfig::default();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(ORDERS * EVENTS_PER_ORDER));
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    group.bench_function("ceiling_one_thread", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| ceiling_one_thread(&orders)).sum());
    });
    group.bench_function("crossbeam_per_event_chain", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| crossbeam_per_event_chain(&orders)).sum());
    });
    group.bench_function("engine_memory", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| engine_memory(&engine, &orders)).sum());
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
