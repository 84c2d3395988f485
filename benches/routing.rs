//! Routing one event: the exchange's compiled table against a plain array index (the floor), and
//! against matching every binding pattern (what the table saves).
//!
//! `cargo bench --bench routing`; figures are events routed per second.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use conduit::routing::{ExchangeBuilder, RouteId};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};

const EVENTS: usize = 4_096;

fn routing(c: &mut Criterion) {
    let mut builder = ExchangeBuilder::new();
    let patterns = ["order.*.process", "order.#", "#.email.#", "*.sms.send", "order.payment.*", "#.shipped", "audit.#"];
    for (queue, pattern) in patterns.iter().enumerate() {
        builder.bind(pattern, u16::try_from(queue).unwrap_or(0)).expect("valid pattern");
    }
    let keys = [
        "order.payment.process",
        "order.inventory.reserve",
        "order.email.send",
        "order.sms.send",
        "order.shipping.shipped",
        "audit.login",
        "user.created",
        "order.payment.refund",
    ];
    let ids: Vec<RouteId> = keys.iter().map(|k| builder.key(k).expect("valid key")).collect();
    let exchange = builder.build();
    let plain: Vec<Vec<u16>> = ids.iter().map(|id| exchange.destinations(*id).to_vec()).collect();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let events: Vec<usize> = (0..EVENTS).map(|_| rng.random_range(0..keys.len())).collect();
    let routes: Vec<RouteId> = events.iter().map(|&i| ids[i]).collect();

    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("baseline_array_index", |b| {
        b.iter(|| events.iter().map(|&i| plain[black_box(i)].len()).sum::<usize>());
    });
    group.bench_function("exchange_table", |b| {
        b.iter(|| routes.iter().map(|&r| exchange.destinations(black_box(r)).len()).sum::<usize>());
    });
    group.bench_function("pattern_match_every_binding", |b| {
        b.iter(|| events.iter().map(|&i| exchange.matching(black_box(keys[i])).len()).sum::<usize>());
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
