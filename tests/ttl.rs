//! Time to live: per stage (time since the event was sent to the stage) and per message (time
//! since it was submitted, inherited by what it causes). An expired event is dead-lettered as
//! `expired` instead of handled, and does not wait behind its key's retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::{
    DeadLetterKind, Deadline, Emitter, Engine, EngineConfig, Envelope, MemoryDeadLetters, Message, Outcome,
    StageSettings, Topology,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    key: u64,
    ttl_ms: u64,
}

impl Message for Job {
    fn key(&self) -> u64 {
        self.key
    }

    fn ttl(&self) -> Option<Duration> {
        (self.ttl_ms > 0).then(|| Duration::from_millis(self.ttl_ms))
    }
}

#[test]
fn events_that_waited_past_the_stage_ttl_are_dead_lettered_as_expired() {
    let letters = Arc::new(MemoryDeadLetters::default());
    let handled = Arc::new(AtomicU64::new(0));
    let mut topology = Topology::new();
    let slow = topology.stage("slow");
    topology.entry(slow);
    let seen = Arc::clone(&handled);
    topology.handler(slow, move |_| {
        let seen = Arc::clone(&seen);
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            if event.key == 0 {
                std::thread::sleep(Duration::from_millis(400));
            }
            seen.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        }
    });
    let config = EngineConfig::builder()
        .stage("slow", StageSettings { ttl_ms: Some(100), batch_events_max: Some(8), ..StageSettings::default() })
        .build()
        .expect("valid");
    let engine = Engine::start_with(topology, &config, letters.clone()).expect("valid");
    engine.submit(Job { key: 0, ttl_ms: 0 }).expect("open");
    std::thread::sleep(Duration::from_millis(50)); // Job 0 is being handled: the rest queue behind it.
    engine.submit_many((1..=100).map(|key| Job { key, ttl_ms: 0 })).expect("open");
    let report = engine.shutdown();

    let letters = letters.drain();
    let expired = report.snapshot.stage("slow").map_or(0, |s| s.expired);
    // Job 0 itself is handled unless a loaded machine held it back past the TTL too.
    assert!(expired >= 100, "{expired} expired");
    assert_eq!(handled.load(Ordering::Relaxed) + expired, 101, "each job handled or expired, never both");
    assert_eq!(letters.len() as u64, expired);
    for letter in &letters {
        assert_eq!((letter.kind, &*letter.stage, letter.attempts), (DeadLetterKind::Expired, "slow", 0));
        assert!(letter.errors.is_empty(), "it never failed before expiring");
    }
}

#[test]
fn a_message_ttl_cuts_its_retries_short_and_its_key_does_not_wait_behind() {
    let letters = Arc::new(MemoryDeadLetters::default());
    let done = Arc::new(AtomicU64::new(0));
    let mut topology = Topology::new();
    let work = topology.stage("work");
    let next = topology.stage("next");
    topology.entry(work).link(work, next);
    topology.handler(work, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            // Key 1's first job (with a TTL) fails for good; everything else goes on.
            if event.key == 1 && event.msg.ttl_ms > 0 {
                return Outcome::Retry("port down".into());
            }
            out.emit(next, event.msg);
            Outcome::Done
        }
    });
    let finished = Arc::clone(&done);
    topology.handler(next, move |_| {
        let finished = Arc::clone(&finished);
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            // What a message causes inherits its deadline.
            assert_eq!(event.msg.ttl_ms > 0, event.deadline != Deadline::NEVER, "{:?}", event.msg);
            finished.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        }
    });
    // Without the TTL, 100 attempts 20 ms apart would take two seconds.
    let config = EngineConfig::from_toml_str(
        "attempts_max = 100\nretry_backoff_ms_base = 20\nretry_backoff_ms_max = 20\nretry_jitter = \"none\"\n",
    )
    .expect("valid");
    let engine = Engine::start_with(topology, &config, letters.clone()).expect("valid");
    let mut jobs = vec![Job { key: 1, ttl_ms: 150 }];
    // Key 1's later jobs: one that expires while parked behind the first, one that does not.
    jobs.push(Job { key: 1, ttl_ms: 100 });
    jobs.push(Job { key: 1, ttl_ms: 0 });
    jobs.extend((2..=50).map(|key| Job { key, ttl_ms: 60_000 }));
    engine.submit_many(jobs).expect("open");
    let report = engine.shutdown();

    let letters = letters.drain();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l.kind == DeadLetterKind::Expired && l.envelope.key == 1));
    let head = letters.iter().find(|l| l.envelope.msg.ttl_ms == 150).expect("the failing job expired");
    assert!(head.attempts > 0 && head.attempts < 100, "expired after {} attempts", head.attempts);
    assert!(!head.errors.is_empty() && head.errors.iter().all(|e| e.contains("port down")), "{:?}", head.errors);
    assert!(head.reason.contains("time to live") && head.chain().last() == Some(&head.reason));
    assert!(head.first_failure_us <= head.last_failure_us);
    assert_eq!(done.load(Ordering::Relaxed), 50, "key 1's TTL-free job and the 49 others went through");
    assert_eq!(report.snapshot.stage("work").map(|s| s.expired), Some(2));
}

#[test]
fn an_event_emitted_within_a_time_expires_then_and_the_rest_keep_no_deadline() {
    let letters = Arc::new(MemoryDeadLetters::default());
    let done = Arc::new(AtomicU64::new(0));
    let mut topology = Topology::new();
    let (start, step) = (topology.stage("start"), topology.stage("step"));
    topology.entry(start).link(start, step);
    topology.handler(start, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            // Odd keys: a step that must be done within 80 ms; even keys (whose message has a
            // time to live of its own): no time limit at all.
            if event.key % 2 == 1 {
                out.emit_within(step, event.msg, Duration::from_millis(80));
            } else {
                out.emit_within(step, event.msg, Duration::MAX);
            }
            Outcome::Done
        }
    });
    let finished = Arc::clone(&done);
    topology.handler(step, move |_| {
        let finished = Arc::clone(&finished);
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            // Key 1's step keeps failing; the others succeed.
            if event.key == 1 {
                return Outcome::Retry("carrier down".into());
            }
            assert_eq!(event.key % 2 == 1, event.deadline != Deadline::NEVER, "key {}", event.key);
            finished.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        }
    });
    // Without the deadline, 100 attempts 20 ms apart would take two seconds and end in
    // `retries_exhausted`.
    let config = EngineConfig::from_toml_str(
        "attempts_max = 100\nretry_backoff_ms_base = 20\nretry_backoff_ms_max = 20\nretry_jitter = \"none\"\n",
    )
    .expect("valid");
    let engine = Engine::start_with(topology, &config, letters.clone()).expect("valid");
    engine.submit_many((1..=20).map(|key| Job { key, ttl_ms: if key % 2 == 0 { 300 } else { 0 } })).expect("open");
    let report = engine.shutdown();
    let letters = letters.drain();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].kind, letters[0].envelope.key), (DeadLetterKind::Expired, 1));
    assert!(letters[0].attempts > 1 && letters[0].attempts < 20, "expired after {} attempts", letters[0].attempts);
    assert_eq!(done.load(Ordering::Relaxed), 19);
    assert_eq!(report.snapshot.stage("step").map(|s| s.expired), Some(1));
}
