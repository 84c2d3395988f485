//! Elastic pools: a stage declared `workers = { min, max }` grows and shrinks while events flow,
//! by hand ([`Engine::set_workers`]) and by its controller, losing nothing and, for a stage
//! ordered by key, keeping every key's order and never handling one key on two workers at once.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::{
    Emitter, Engine, EngineConfig, Envelope, Message, Outcome, ResizeError, StageSettings, Topology, Workers,
};

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

/// What one stage saw of each key.
struct Checks {
    last: Vec<AtomicI64>,
    busy: Vec<AtomicBool>,
    out_of_order: AtomicU64,
    concurrent: AtomicU64,
    retried: AtomicU64,
}

impl Checks {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            last: (0..KEYS).map(|_| AtomicI64::new(-1)).collect(),
            busy: (0..KEYS).map(|_| AtomicBool::new(false)).collect(),
            out_of_order: AtomicU64::new(0),
            concurrent: AtomicU64::new(0),
            retried: AtomicU64::new(0),
        })
    }

    /// Handles `event` as a check: exclusive per key, in order, a transient failure now and then
    /// (on the first attempt only) when `retries` is set.
    fn handle(&self, event: &Envelope<Event>, retries: bool) -> Outcome {
        let Event { key, n } = event.msg;
        let k = usize::try_from(key).unwrap_or(0);
        if self.busy[k].swap(true, Ordering::SeqCst) {
            self.concurrent.fetch_add(1, Ordering::Relaxed);
        }
        let roll = mix(key * 1_000 + u64::try_from(n).unwrap_or(0));
        (0..roll % 256).for_each(|_| std::hint::spin_loop());
        let outcome = if retries && event.attempt == 0 && roll % 41 == 0 {
            self.retried.fetch_add(1, Ordering::Relaxed);
            Outcome::Retry("transient".into())
        } else {
            if self.last[k].swap(n, Ordering::SeqCst) != n - 1 {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Done
        };
        self.busy[k].store(false, Ordering::SeqCst);
        outcome
    }

    fn assert_clean(&self, stage: &str) {
        assert_eq!(self.concurrent.load(Ordering::Relaxed), 0, "{stage}: a key was handled by two workers at once");
        assert_eq!(self.out_of_order.load(Ordering::Relaxed), 0, "{stage}: a key's events were handled out of order");
        assert!(
            self.last.iter().all(|l| l.load(Ordering::Relaxed) == PER_KEY - 1),
            "{stage}: every key's last event was handled"
        );
    }
}

fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB)
}

#[test]
fn an_ordered_stage_resized_up_and_down_while_events_flow_keeps_each_keys_order_on_one_worker() {
    let (first, after) = (Checks::new(), Checks::new());
    let mut topology = Topology::new();
    let stage = topology.stage("resized");
    let next = topology.stage("after");
    topology.entry(stage).link(stage, next).ordered_by_key(stage).ordered_by_key(next);
    let checks = Arc::clone(&first);
    topology.handler(stage, move |_| {
        let checks = Arc::clone(&checks);
        move |event: &Envelope<Event>, out: &mut Emitter<Event>| {
            let outcome = checks.handle(event, true);
            if outcome == Outcome::Done {
                out.emit(next, event.msg);
            }
            outcome
        }
    });
    let checks = Arc::clone(&after);
    topology.handler(next, move |_| {
        let checks = Arc::clone(&checks);
        move |event: &Envelope<Event>, _: &mut Emitter<Event>| checks.handle(event, false)
    });
    let config = EngineConfig::builder()
        .batch_events_max(32)
        .queue_batches(8)
        .stage("resized", StageSettings { workers: Some(Workers::elastic(1, 8)), ..StageSettings::default() })
        .build()
        .expect("valid");
    let engine = Engine::start(topology, &config).expect("valid topology");
    let done = AtomicBool::new(false);
    let resizes = std::thread::scope(|scope| {
        let resizer = scope.spawn(|| {
            let mut resizes = 0_u64;
            for size in [4, 1, 8, 2, 7, 3, 1, 6, 5, 8, 1].iter().cycle() {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                engine.set_workers(stage, *size).expect("within the bounds");
                resizes += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            resizes
        });
        let events = (0..PER_KEY).flat_map(|n| (0..KEYS).map(move |key| Event { key, n }));
        engine.submit_many(events).expect("healthy");
        // Keep resizing while the backlog drains.
        while engine.in_flight() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        done.store(true, Ordering::Relaxed);
        resizer.join().expect("the resizer does not panic")
    });
    let report = engine.shutdown();

    assert!(report.is_clean());
    let snapshot = &report.snapshot;
    let total = KEYS * u64::try_from(PER_KEY).unwrap_or(0);
    assert_eq!((snapshot.stages[0].processed, snapshot.stages[1].processed), (total, total));
    assert_eq!(snapshot.stages[0].dead_lettered + snapshot.stages[1].dead_lettered, 0);
    assert!(resizes >= 10, "the pool was resized while events flowed ({resizes} times)");
    let (grown, shrunk) = (snapshot.stages[0].pool_grown, snapshot.stages[0].pool_shrunk);
    assert!(grown >= 7 && shrunk >= 6, "resizes are counted: {grown} grown, {shrunk} shrunk");
    assert_eq!((snapshot.stages[0].workers_min, snapshot.stages[0].workers_max), (1, 8));
    assert!(first.retried.load(Ordering::Relaxed) > 1_000, "the run exercised retries");
    first.assert_clean("resized");
    after.assert_clean("after");
}

/// A slow stage (200 us an event) behind a burst grows, then goes back to its `min` once idle.
#[test]
fn an_elastic_pool_grows_under_a_backlog_and_returns_to_min_when_idle() {
    let handled = Arc::new(AtomicU64::new(0));
    let mut topology = Topology::new();
    let stage = topology.stage("slow");
    topology.entry(stage);
    let count = Arc::clone(&handled);
    topology.handler(stage, move |_| {
        let count = Arc::clone(&count);
        move |event: &Envelope<Event>, _: &mut Emitter<Event>| {
            std::thread::sleep(Duration::from_micros(200));
            count.fetch_add(1, Ordering::Relaxed);
            if event.attempt == 0 && event.msg.n % 10 == 0 {
                Outcome::Retry("transient".into())
            } else {
                Outcome::Done
            }
        }
    });
    let config = EngineConfig::from_toml_str(
        "batch_events_max = 16\n[stages.slow]\nworkers = { min = 1, max = 4 }\nscale_lag_ms = 5\nscale_cooldown_ms = 100\n",
    )
    .expect("valid");
    let engine = Engine::start(topology, &config).expect("valid topology");
    engine.submit_many((0..4_000).map(|n| Event { key: n % 97, n: i64::try_from(n).unwrap_or(0) })).expect("healthy");
    let mut most = 0;
    while engine.in_flight() > 0 {
        most = most.max(engine.snapshot().stages[0].workers);
        std::thread::sleep(Duration::from_millis(5));
    }
    let grown = engine.snapshot().stages[0].pool_grown;
    assert!(most > 1 && grown > 0, "the pool grew under the backlog (most {most} workers, {grown} growths)");
    assert!(most <= 4, "never above max: {most}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.snapshot().stages[0].workers > 1 {
        assert!(Instant::now() < deadline, "the idle pool went back to min: {:?}", engine.snapshot().stages[0]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = engine.shutdown();
    assert!(report.is_clean());
    let slow = &report.snapshot.stages[0];
    assert_eq!((slow.processed, slow.dead_lettered), (4_000, 0), "every event handled once, none lost");
    assert_eq!(handled.load(Ordering::Relaxed), 4_400, "each event once, and the 400 retried ones twice");
    assert!(slow.pool_shrunk > 0 && slow.workers == 1, "{slow:?}");
    assert_eq!(report.snapshot.in_flight, 0);
}

#[test]
fn set_workers_refuses_a_fixed_pool_and_sizes_outside_the_bounds() {
    let mut topology = Topology::new();
    let fixed = topology.stage("fixed");
    let elastic = topology.stage("elastic");
    topology.entry(fixed).link(fixed, elastic);
    topology.handler(fixed, |_| |_: &Envelope<Event>, _: &mut Emitter<Event>| Outcome::Done);
    topology.handler(elastic, |_| |_: &Envelope<Event>, _: &mut Emitter<Event>| Outcome::Done);
    let config = EngineConfig::from_toml_str("[stages.elastic]\nworkers = { min = 2, max = 3 }\n").expect("valid");
    let engine = Engine::start(topology, &config).expect("valid topology");
    assert_eq!(engine.snapshot().stages[1].workers, 2, "an elastic pool starts at its min");
    let refused = engine.set_workers(fixed, 2).expect_err("fixed");
    assert!(matches!(refused, ResizeError::Fixed { .. }), "{refused}");
    assert!(refused.to_string().contains("stage fixed has a fixed pool"), "{refused}");
    for outside in [1, 4] {
        let refused = engine.set_workers(elastic, outside).expect_err("outside");
        assert!(refused.to_string().contains("outside the pool's bounds (2 to 3)"), "{refused}");
    }
    engine.set_workers(elastic, 3).expect("within the bounds");
    assert_eq!(engine.snapshot().stages[1].workers, 3);
    let report = engine.shutdown();
    assert!(report.is_clean());
}

/// Adaptive batching: the batch size sent to a stage falls to its min while the stage idles,
/// rises to its max under a backlog, and falls back once the stage keeps up.
#[test]
fn an_adaptive_batch_size_rises_under_a_backlog_and_falls_back_when_light() {
    let mut topology = Topology::new();
    let fast = topology.stage("fast");
    let slow = topology.stage("slow");
    topology.entry(fast).link(fast, slow);
    topology.handler(fast, move |_| {
        move |event: &Envelope<Event>, out: &mut Emitter<Event>| {
            out.emit(slow, event.msg);
            Outcome::Done
        }
    });
    topology.handler(slow, |_| {
        |_: &Envelope<Event>, _: &mut Emitter<Event>| {
            std::thread::sleep(Duration::from_micros(20));
            Outcome::Done
        }
    });
    let config = EngineConfig::from_toml_str(
        "[stages.slow]\nbatch_events_min = 4\nbatch_events_max = 256\nqueue_batches = 4096\n",
    )
    .expect("valid");
    let engine = Engine::start(topology, &config).expect("valid topology");
    assert_eq!(engine.snapshot().stages[1].batch_limit, 256, "it starts at its max");
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.snapshot().stages[1].batch_limit > 4 {
        assert!(Instant::now() < deadline, "idle, the batch size fell to its min");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut most = 0;
    engine.submit_many((0..20_000).map(|n| Event { key: n, n: 0 })).expect("healthy");
    while engine.in_flight() > 0 {
        most = most.max(engine.snapshot().stages[1].batch_limit);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(most, 256, "under the backlog the batches are as big as allowed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.snapshot().stages[1].batch_limit > 4 {
        assert!(Instant::now() < deadline, "light again, the batch size fell back to its min");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(engine.snapshot().stages[0].batch_limit, 256, "a stage without a min keeps its max");
    let report = engine.shutdown();
    assert!(report.is_clean());
    assert_eq!(report.snapshot.stages[1].processed, 20_000);
}
