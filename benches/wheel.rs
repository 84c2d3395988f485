//! The timing wheel: scheduling retries and firing them as time passes, against a binary heap
//! (the usual alternative) on the same seeded deadlines.
//!
//! `cargo bench --bench wheel`; figures are entries scheduled and fired per second.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use conduit::wheel::{Insert, Wheel};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};

const ENTRIES: usize = 100_000;

fn deadlines() -> Vec<u64> {
    // Backoff-like delays: mostly short, some long (1 tick = 1 ms).
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    (0..ENTRIES).map(|_| 1 + (rng.random_range(1u64..1_000) << rng.random_range(0..6))).collect()
}

fn wheel(c: &mut Criterion) {
    let deadlines = deadlines();
    let end = deadlines.iter().max().copied().unwrap_or(0);
    let mut group = c.benchmark_group("timers");
    group.throughput(Throughput::Elements(ENTRIES as u64));
    group.bench_function("baseline_binary_heap", |b| {
        b.iter(|| {
            let mut heap = BinaryHeap::with_capacity(ENTRIES);
            for (i, &d) in deadlines.iter().enumerate() {
                heap.push(Reverse((d, i)));
            }
            let mut fired = 0;
            for now in (0..=end).step_by(16) {
                while heap.peek().is_some_and(|Reverse((d, _))| *d <= now) {
                    heap.pop();
                    fired += 1;
                }
            }
            black_box(fired)
        });
    });
    group.bench_function("wheel_insert_advance", |b| {
        b.iter(|| {
            let mut wheel = Wheel::new(0);
            for (i, &d) in deadlines.iter().enumerate() {
                assert!(matches!(wheel.insert(d, i), Insert::Scheduled));
            }
            let mut due = Vec::with_capacity(1_024);
            let mut fired = 0;
            for now in (0..=end).step_by(16) {
                wheel.advance(now, &mut due);
                fired += due.len();
                due.clear();
            }
            black_box(fired)
        });
    });
    group.finish();
}

criterion_group!(benches, wheel);
criterion_main!(benches);
