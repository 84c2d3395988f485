//! A stage ordered by key: with 4 workers, random delays and transient failures, every key's
//! events are handled in order and never two at once, over 100,000 events and 1,000 keys.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Topology};

const KEYS: u64 = 1_000;
const PER_KEY: i64 = 100;

#[derive(Debug, Clone, Copy)]
struct Event {
    key: u64,
    n: i64,
}

impl Message for Event {
    fn key(&self) -> u64 {
        self.key
    }
}

struct Checks {
    last: Vec<AtomicI64>,
    busy: Vec<AtomicBool>,
    out_of_order: AtomicU64,
    concurrent: AtomicU64,
    retried: AtomicU64,
}

fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB)
}

#[test]
fn an_ordered_stage_keeps_each_keys_order_under_delays_and_retries() {
    let checks = Arc::new(Checks {
        last: (0..KEYS).map(|_| AtomicI64::new(-1)).collect(),
        busy: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
        out_of_order: AtomicU64::new(0),
        concurrent: AtomicU64::new(0),
        retried: AtomicU64::new(0),
    });
    let mut topology = Topology::new();
    let stage = topology.stage("ordered");
    topology.entry(stage).ordered_by_key(stage);
    let shared = Arc::clone(&checks);
    topology.handler(stage, move |_| {
        let checks = Arc::clone(&shared);
        move |event: &Envelope<Event>, _: &mut Emitter<Event>| {
            let Event { key, n } = event.msg;
            let k = usize::try_from(key).unwrap_or(0);
            if checks.busy[k].swap(true, Ordering::SeqCst) {
                checks.concurrent.fetch_add(1, Ordering::Relaxed);
            }
            let roll = mix(key * 1_000 + u64::try_from(n).unwrap_or(0) + u64::from(event.attempt) * 7);
            if roll % 500 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                (0..roll % 64).for_each(|_| std::hint::spin_loop());
            }
            let outcome = if event.attempt == 0 && roll % 53 == 0 {
                checks.retried.fetch_add(1, Ordering::Relaxed);
                Outcome::Retry("transient".into())
            } else {
                if checks.last[k].swap(n, Ordering::SeqCst) != n - 1 {
                    checks.out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Done
            };
            checks.busy[k].store(false, Ordering::SeqCst);
            outcome
        }
    });
    let config = EngineConfig::builder().workers(4).batch_events_max(64).queue_batches(8).build().expect("valid");
    let engine = Engine::start(topology, &config).expect("valid topology");
    let events = (0..PER_KEY).flat_map(|n| (0..KEYS).map(move |key| Event { key, n }));
    engine.submit_many(events).expect("healthy");
    let report = engine.shutdown();

    assert!(report.is_clean());
    assert_eq!(report.snapshot.stages[0].processed, KEYS * u64::try_from(PER_KEY).unwrap_or(0));
    assert_eq!(report.snapshot.stages[0].dead_lettered, 0);
    assert!(checks.retried.load(Ordering::Relaxed) > 1_000, "the run exercised retries");
    assert_eq!(checks.concurrent.load(Ordering::Relaxed), 0, "a key was handled by two workers at once");
    assert_eq!(checks.out_of_order.load(Ordering::Relaxed), 0, "a key's events were handled out of order");
    assert!(checks.last.iter().all(|l| l.load(Ordering::Relaxed) == PER_KEY - 1));
}
