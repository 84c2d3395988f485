//! Publish/subscribe through the topology's topic exchange: one event fans out to every bound
//! stage; unroutable events are counted (and dead-lettered if asked); a slow subscriber whose
//! overflow policy is `dead_letter` never holds back its publisher or the other subscribers, and
//! loses nothing: what its queue cannot take is dead-lettered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::{
    DeadLetterKind, Emitter, Engine, EngineConfig, Envelope, MemoryDeadLetters, Message, Outcome, Overflow, Topology,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct User(u64);

impl Message for User {
    fn key(&self) -> u64 {
        self.0
    }
}

/// A subscriber's handler: counts what it handles, after an optional delay.
type Counting = Box<dyn FnMut(&Envelope<User>, &mut Emitter<User>) -> Outcome + Send>;

fn counting(counter: &Arc<AtomicU64>, delay: Duration) -> impl Fn(usize) -> Counting + Send + Sync + 'static {
    let counter = Arc::clone(counter);
    move |_| {
        let counter = Arc::clone(&counter);
        Box::new(move |_: &Envelope<User>, _: &mut Emitter<User>| {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            counter.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        })
    }
}

#[test]
fn one_event_reaches_every_bound_subscriber_once() {
    let mut topology = Topology::new();
    let users = topology.stage("users");
    let subscribers: Vec<_> =
        ["email", "sms", "analytics", "recommendations"].iter().map(|name| topology.stage(name)).collect();
    topology.entry(users).dead_letter_unroutable(true);
    topology.bind(subscribers[0], "user.registered").expect("valid");
    topology.bind(subscribers[1], "user.*").expect("valid");
    topology.bind(subscribers[2], "#").expect("valid");
    topology.bind(subscribers[3], "*.registered").expect("valid");
    topology.bind(subscribers[3], "user.#").expect("valid"); // twice bound: still one copy
    let registered = topology.publishes(users, "user.registered").expect("valid");
    let audit = topology.publishes(users, "audit.login").expect("valid");
    topology.handler(users, move |_| {
        move |event: &Envelope<User>, out: &mut Emitter<User>| {
            out.publish(registered, event.msg);
            if event.msg.0 % 10 == 0 {
                out.publish(audit, event.msg); // reaches only the `#` subscriber
            }
            Outcome::Done
        }
    });
    let counts: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for (stage, count) in subscribers.iter().zip(&counts) {
        topology.handler(*stage, counting(count, Duration::ZERO));
    }
    let engine = Engine::start(topology, &EngineConfig::default()).expect("valid");
    engine.submit_many((1..=1_000).map(User)).expect("healthy");
    let report = engine.shutdown();
    let got: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(got, [1_000, 1_000, 1_100, 1_000]);
    assert_eq!(report.snapshot.stage("users").map(|s| (s.emitted, s.unroutable)), Some((4_100, 0)));
}

/// A publisher sending even users to `order.placed` (bound to the `orders` stage, which counts
/// them in `count`) and odd ones to `refund.issued`, which no stage is bound to.
fn half_unroutable(dead_letter_unroutable: bool, count: &Arc<AtomicU64>) -> Topology<User> {
    let mut topology = Topology::new();
    let publisher = topology.stage("publisher");
    let orders = topology.stage("orders");
    topology.entry(publisher).dead_letter_unroutable(dead_letter_unroutable);
    topology.bind(orders, "order.#").expect("valid");
    let placed = topology.publishes(publisher, "order.placed").expect("valid");
    let lost = topology.publishes(publisher, "refund.issued").expect("valid");
    topology.handler(publisher, move |_| {
        move |event: &Envelope<User>, out: &mut Emitter<User>| {
            out.publish(if event.msg.0 % 2 == 0 { placed } else { lost }, event.msg);
            Outcome::Done
        }
    });
    topology.handler(orders, counting(count, Duration::ZERO));
    topology
}

#[test]
fn unroutable_events_are_counted_and_dead_lettered_when_asked() {
    let letters = Arc::new(MemoryDeadLetters::default());
    let count = Arc::new(AtomicU64::new(0));
    let topology = half_unroutable(true, &count);
    let engine = Engine::builder(topology).dead_letters(letters.clone()).start().expect("valid");
    engine.submit_many((0..100).map(User)).expect("healthy");
    let report = engine.shutdown();
    assert_eq!(count.load(Ordering::Relaxed), 50);
    assert_eq!(report.snapshot.stage("publisher").map(|s| s.unroutable), Some(50));
    let letters = letters.drain();
    assert_eq!(letters.len(), 50);
    assert!(letters.iter().all(|l| l.kind == DeadLetterKind::Unroutable && l.envelope.msg.0 % 2 == 1));
}

#[test]
fn a_slow_subscriber_overflows_into_dead_letters_and_holds_no_one_back() {
    const EVENTS: u64 = 20_000;
    let letters = Arc::new(MemoryDeadLetters::default());
    let mut topology = Topology::new();
    let publisher = topology.stage("publisher");
    let fast: Vec<_> = ["fast_a", "fast_b", "fast_c"].iter().map(|n| topology.stage(n)).collect();
    let slow = topology.stage("slow");
    topology.entry(publisher);
    for stage in fast.iter().chain([&slow]) {
        topology.bind(*stage, "user.registered").expect("valid");
    }
    let route = topology.publishes(publisher, "user.registered").expect("valid");
    topology.handler(publisher, move |_| {
        move |event: &Envelope<User>, out: &mut Emitter<User>| {
            out.publish(route, event.msg);
            Outcome::Done
        }
    });
    let fast_counts: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for (stage, count) in fast.iter().zip(&fast_counts) {
        topology.handler(*stage, counting(count, Duration::ZERO));
    }
    let slow_count = Arc::new(AtomicU64::new(0));
    topology.handler(slow, counting(&slow_count, Duration::from_micros(100)));
    let config = EngineConfig::from_toml_str(
        "batch_events_max = 64\n[stages.slow]\nqueue_batches = 2\noverflow = \"dead_letter\"\n",
    )
    .expect("valid");
    assert_eq!(config.stage("slow").overflow, Overflow::DeadLetter);
    assert_eq!(config.stage("fast_a").overflow, Overflow::Block);
    let engine = Engine::builder(topology).config(&config).dead_letters(letters.clone()).start().expect("valid");
    engine.submit_many((0..EVENTS).map(User)).expect("healthy");
    let report = engine.shutdown();

    assert!(fast_counts.iter().all(|c| c.load(Ordering::Relaxed) == EVENTS), "the fast subscribers got everything");
    let overflowed = report.snapshot.stage("slow").map_or(0, |s| s.overflowed);
    assert!(overflowed > 0, "the slow subscriber's queue overflowed");
    let letters = letters.drain();
    assert_eq!(letters.len() as u64, overflowed);
    assert!(letters.iter().all(|l| l.kind == DeadLetterKind::Overflow && &*l.stage == "slow"));
    assert_eq!(slow_count.load(Ordering::Relaxed) + overflowed, EVENTS, "nothing lost: handled or dead-lettered");
}

#[test]
fn a_key_bound_to_nothing_is_refused_at_startup_unless_unroutable_events_are_dead_lettered() {
    let count = Arc::new(AtomicU64::new(0));
    let build =
        |dead_letter: bool| Engine::start(half_unroutable(dead_letter, &count), &conduit::EngineConfig::default());
    let refused = build(false).expect_err("every event published with the key would vanish");
    let message = refused.to_string();
    assert!(message.contains("refund.issued") && message.contains("lost silently"), "{message}");
    let engine = build(true).expect("dead-lettered, nothing is lost");
    engine.submit_many((0..10).map(User)).expect("healthy");
    assert_eq!(engine.shutdown().snapshot.stage("publisher").map(|s| s.dead_lettered), Some(5));
}
