//! One hop between threads: an engine stage that forwards to a sink stage (batched channels,
//! natural batching) against a crossbeam bounded channel carrying one event per message.
//!
//! `cargo bench --bench channel`; figures are events per second.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Topology};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const EVENTS: u64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Event(u64);

impl Message for Event {
    fn key(&self) -> u64 {
        self.0
    }
}

fn engine_hop() -> Duration {
    let mut topology = Topology::new();
    let first = topology.stage("first");
    let second = topology.stage("second");
    topology.entry(first).link(first, second);
    topology.handler(first, move |_| {
        move |event: &Envelope<Event>, out: &mut Emitter<Event>| {
            out.emit(second, event.msg);
            Outcome::Done
        }
    });
    topology.handler(second, |_| |_: &Envelope<Event>, _: &mut Emitter<Event>| Outcome::Done);
    let start = Instant::now();
    let engine = Engine::start(topology, &EngineConfig::default()).expect("valid");
    engine.submit_many((0..EVENTS).map(Event)).expect("open");
    let report = engine.shutdown();
    assert_eq!(report.snapshot.stages[1].processed, EVENTS);
    start.elapsed()
}

fn crossbeam_per_event_hop() -> Duration {
    let (to_first, first_in) = crossbeam_channel::bounded::<Event>(1_024);
    let (to_second, second_in) = crossbeam_channel::bounded::<Event>(1_024);
    let start = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(move || first_in.into_iter().for_each(|e| to_second.send(e).expect("open")));
        let sink = scope.spawn(move || second_in.into_iter().count());
        (0..EVENTS).for_each(|i| to_first.send(Event(i)).expect("open"));
        drop(to_first);
        assert_eq!(sink.join().expect("sink") as u64, EVENTS);
    });
    start.elapsed()
}

fn channel(c: &mut Criterion) {
    let mut group = c.benchmark_group("channel_hop");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    group.bench_function("crossbeam_per_event", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| crossbeam_per_event_hop()).sum());
    });
    group.bench_function("engine_batched", |b| b.iter_custom(|iters| (0..iters).map(|_| engine_hop()).sum()));
    group.finish();
}

criterion_group!(benches, channel);
criterion_main!(benches);
