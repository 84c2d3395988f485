//! The synthetic cases: a chain of pass-through stages and publish/subscribe fan-out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::EngineConfig;

use super::pipeline::PER_EVENT_CAPACITY;

/// The per-event work of one synthetic stage: a few multiply-xorshift rounds.
pub(super) fn chain_step(x: u64) -> u64 {
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
pub(super) struct ChainEvent(u64);

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
    chain_engine_tracked(config, stages, events, true)
}

/// [`chain_engine`] with the engine's completion tracking on or off.
///
/// # Panics
/// As [`chain_engine`].
pub fn chain_engine_tracked(config: &EngineConfig, stages: usize, events: u64, track: bool) -> Duration {
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
    let engine = Engine::builder(topology)
        .config(config)
        .track_completion(track)
        .start()
        .expect("the bench's engine configuration was validated");
    for chunk in 0..events.div_ceil(4_096) {
        let first = chunk * 4_096;
        engine.submit_many((first..(first + 4_096).min(events)).map(ChainEvent)).expect("healthy engine");
    }
    let report = engine.shutdown();
    assert!(report.snapshot.stages.iter().all(|s| s.processed == events), "every event passed every stage");
    start.elapsed()
}

/// A subscriber's work: `rounds` multiply-xorshift steps.
pub(super) fn subscriber_work(x: u64, rounds: u32) -> u64 {
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
