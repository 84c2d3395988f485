//! The engine on its own: backpressure, draining shutdown, per-event failure, poisoning, and the
//! topology and configuration checks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::{
    BuildError, ConfigError, DeadLetter, DeadLetterKind, DeadLetterSink, Emitter, Engine, EngineConfig, Envelope,
    MemoryDeadLetters, Message, Outcome, StageSettings, SubmitError, Topology, TrySubmitError,
};
use crossbeam_channel::{Receiver, Sender};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job(u64);

impl Message for Job {
    fn key(&self) -> u64 {
        self.0
    }
}

fn done(_: &Envelope<Job>, _: &mut Emitter<Job>) -> Outcome {
    Outcome::Done
}

/// A single stage whose handler waits for one token from `gate` per event.
fn gated_engine(gate: Receiver<()>) -> Engine<Job> {
    let mut topology = Topology::new();
    let only = topology.stage("only");
    topology.entry(only);
    topology.handler(only, move |_| {
        let gate = gate.clone();
        move |_: &Envelope<Job>, _: &mut Emitter<Job>| {
            gate.recv().expect("the test holds the gate open");
            Outcome::Done
        }
    });
    let config = EngineConfig::builder().queue_batches(1).batch_events_max(1).build().expect("valid");
    Engine::start(topology, &config).expect("valid topology")
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..2_000 {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting until {what}");
}

#[test]
fn try_submit_hands_the_message_back_when_full_and_a_blocked_submit_resumes() {
    let (open, gate): (Sender<()>, Receiver<()>) = crossbeam_channel::unbounded();
    let engine = gated_engine(gate);
    let receipt = engine.try_submit(Job(1)).expect("the queue is empty");
    assert!(receipt.is_settled(), "without a journal a message is accepted at once");
    assert_eq!(receipt.wait().expect("accepted"), 1);
    // The worker takes job 1 and waits at the gate; job 2 then fills the one-batch queue.
    wait_until("the worker holds job 1", || engine.snapshot().stages[0].busy_workers == 1);
    let receipt = engine.try_submit(Job(2)).expect("the queue has room for one batch");
    assert_eq!(receipt.wait().expect("accepted"), 1);
    let refused = engine.try_submit(Job(3)).expect_err("the queue is full");
    assert!(refused.is_full());
    assert!(matches!(refused, TrySubmitError::Full(Job(3))), "the order comes back: {refused:?}");

    let returned = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            engine.submit(Job(3)).expect("submit waits for room");
            returned.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!returned.load(Ordering::SeqCst), "submit must block while the queue is full");
        for _ in 0..3 {
            open.send(()).expect("the worker holds the gate");
        }
    });
    assert!(returned.load(Ordering::SeqCst));
    let report = engine.shutdown();
    assert!(report.is_clean());
    assert_eq!(report.snapshot.stages[0].processed, 3);
    assert_eq!(report.snapshot.submitted, 3);
}

/// Three stages with jittery handlers; the last one sums what it sees.
fn summing_chain(sum: Arc<AtomicU64>, count: Arc<AtomicU64>) -> Topology<Job> {
    let mut topology = Topology::new();
    let a = topology.stage("a");
    let b = topology.stage("b");
    let c = topology.stage("c");
    topology.entry(a).link(a, b).link(b, c);
    let jitter = |next| {
        move |_| {
            move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
                if event.key % 997 == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                out.emit(next, event.msg);
                Outcome::Done
            }
        }
    };
    topology.handler(a, jitter(b));
    topology.handler(b, jitter(c));
    topology.handler(c, move |_| {
        let (sum, count) = (Arc::clone(&sum), Arc::clone(&count));
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            sum.fetch_add(event.msg.0, Ordering::Relaxed);
            count.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        }
    });
    topology
}

const PRODUCERS: u64 = 4;
const PER_PRODUCER: u64 = 25_000;

#[test]
fn shutdown_drains_every_stage_and_loses_nothing() {
    let (sum, count) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let config = EngineConfig::builder().workers(2).queue_batches(4).batch_events_max(64).build().expect("valid");
    let engine = Engine::start(summing_chain(Arc::clone(&sum), Arc::clone(&count)), &config).expect("valid");
    std::thread::scope(|scope| {
        for p in 0..PRODUCERS {
            let engine = &engine;
            scope.spawn(move || {
                let first = p * PER_PRODUCER + 1;
                // Mix the batched and the one-at-a-time paths.
                engine.submit_many((first..first + PER_PRODUCER / 2).map(Job)).expect("engine open");
                for id in first + PER_PRODUCER / 2..first + PER_PRODUCER {
                    engine.submit(Job(id)).expect("engine open");
                }
            });
        }
    });
    // Shut down at once: most events are still queued somewhere.
    let report = engine.shutdown();
    let n = PRODUCERS * PER_PRODUCER;
    assert!(report.is_clean());
    assert_eq!(count.load(Ordering::Relaxed), n);
    assert_eq!(sum.load(Ordering::Relaxed), n * (n + 1) / 2, "every id arrived exactly once");
    for stage in &report.snapshot.stages {
        assert_eq!(stage.processed, n, "stage {}", stage.name);
        assert_eq!(stage.queue_depth, 0, "stage {}", stage.name);
    }
    assert_eq!(report.snapshot.stage("a").map(|s| s.emitted), Some(n));
    assert!(report.snapshot.stage("c").is_some_and(|s| s.latency_us.count == n && s.latency_us.max > 0.0));
}

#[test]
fn a_panicking_handler_is_contained_and_its_batch_mates_are_unaffected() {
    let letters = Arc::new(MemoryDeadLetters::default());
    let delivered = Arc::new(AtomicU64::new(0));
    let mut topology = Topology::new();
    let flaky = topology.stage("flaky");
    let sink = topology.stage("sink");
    topology.entry(flaky).link(flaky, sink);
    topology.handler(flaky, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            // Every 10th job panics on its first attempt; job 7 panics every time.
            assert!(event.key != 7, "job 7 is poison");
            assert!(event.key % 10 != 0 || event.attempt > 0, "first attempt of {} fails", event.key);
            out.emit(sink, event.msg);
            Outcome::Done
        }
    });
    let seen = Arc::clone(&delivered);
    topology.handler(sink, move |_| {
        let seen = Arc::clone(&seen);
        move |_: &Envelope<Job>, _: &mut Emitter<Job>| {
            seen.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        }
    });
    let config = EngineConfig::builder().attempts_max(3).build().expect("valid");
    let engine = Engine::start_with(topology, &config, letters.clone()).expect("valid");
    engine.submit_many((1..=1_000).map(Job)).expect("open");
    let report = engine.shutdown();

    assert!(report.is_clean(), "a handler panic must not poison the engine");
    assert_eq!(delivered.load(Ordering::Relaxed), 999, "all but the poison job got through");
    let flaky = report.snapshot.stage("flaky").expect("declared");
    assert_eq!(flaky.panics, 100 + 3, "100 first attempts, and job 7's three");
    assert_eq!(flaky.retried, 103);
    assert_eq!(flaky.dead_lettered, 1);
    let letters = letters.drain();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!((letter.envelope.msg, letter.attempts), (Job(7), 3));
    assert_eq!(letter.kind, DeadLetterKind::Panicked, "every attempt, the last included, panicked");
    assert!(letter.reason.contains("panicked") && letter.reason.contains("poison"), "{}", letter.reason);
    assert_eq!(letter.chain().count(), 3, "the error chain holds each attempt's failure");
    assert!(letter.chain().all(|e| e.contains("job 7 is poison")), "{:?}", letter.errors);
    assert!(letter.first_failure_us > 0 && letter.first_failure_us <= letter.last_failure_us);
}

#[test]
fn outcomes_are_per_event_and_dead_letters_keep_the_original() {
    let letters = Arc::new(MemoryDeadLetters::default());
    let mut topology = Topology::new();
    let judge = topology.stage("judge");
    let next = topology.stage("next");
    let elsewhere = topology.stage("elsewhere");
    topology.entry(judge).link(judge, next).link(next, elsewhere);
    topology.handler(judge, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            out.emit(next, event.msg);
            match event.key % 4 {
                0 => Outcome::Reject("multiple of four".into()),
                1 => Outcome::Retry("always transient".into()),
                2 => {
                    out.emit(elsewhere, event.msg); // not linked from `judge`
                    Outcome::Done
                }
                _ => Outcome::Done,
            }
        }
    });
    topology.handler(next, |_| done);
    topology.handler(elsewhere, |_| done);
    let config = EngineConfig::builder().attempts_max(4).build().expect("valid");
    let engine = Engine::start_with(topology, &config, letters.clone()).expect("valid");
    engine.submit_many((1..=400).map(Job)).expect("open");
    let report = engine.shutdown();

    let judge = report.snapshot.stage("judge").expect("declared");
    assert_eq!((judge.processed, judge.rejected, judge.dead_lettered, judge.retried), (400, 100, 300, 100 * 4));
    assert_eq!(report.snapshot.stage("next").map(|s| s.processed), Some(100), "only the `3 mod 4` jobs pass");
    let letters = letters.drain();
    let count = |kind: DeadLetterKind| letters.iter().filter(|l| l.kind == kind).count();
    assert_eq!(count(DeadLetterKind::Rejected), 100);
    assert_eq!(count(DeadLetterKind::RetriesExhausted), 100);
    assert_eq!(count(DeadLetterKind::HandlerMisuse), 100);
    for letter in &letters {
        assert_eq!(&*letter.stage, "judge");
        assert_eq!(letter.envelope.key, letter.envelope.msg.0);
        let expected_attempts = match letter.kind {
            DeadLetterKind::RetriesExhausted => 4,
            DeadLetterKind::Rejected => 1,
            _ => 0,
        };
        assert_eq!(letter.attempts, expected_attempts, "{letter:?}");
    }
}

/// A sink that panics: the panic escapes the handler's guard and kills the worker.
struct PanickingSink;

impl DeadLetterSink<Job> for PanickingSink {
    fn dead_letter(&self, _: DeadLetter<Job>) {
        panic!("the sink is broken");
    }
}

#[test]
fn a_dead_worker_poisons_the_engine_instead_of_hanging_callers() {
    let mut topology = Topology::new();
    let only = topology.stage("only");
    topology.entry(only);
    topology.handler(only, |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Reject("no".into()));
    let config = EngineConfig::builder().queue_batches(1).batch_events_max(1).build().expect("valid");
    let engine = Engine::start_with(topology, &config, Arc::new(PanickingSink)).expect("valid");
    let mut outcome = Ok(());
    for id in 0..10_000 {
        outcome = engine.submit(Job(id));
        if outcome.is_err() {
            break;
        }
    }
    assert!(matches!(outcome, Err(SubmitError::Poisoned(_))), "{outcome:?}");
    assert!(engine.poisoned().is_some_and(|reason| reason.contains("conduit:only:0")));
    assert!(matches!(engine.try_submit(Job(1)), Err(TrySubmitError::Poisoned(Job(1)))));
    assert!(!engine.shutdown().is_clean());
}

/// An injection refused halfway (its second stage's worker died): every message not sent comes
/// back; one of whose events went stays in flight, never reported finished (recovery resumes it),
/// and one none of whose events went is taken back.
#[test]
fn an_injection_refused_halfway_never_reports_a_message_half_sent_as_finished() {
    let (handled, fine_done) = crossbeam_channel::unbounded::<u64>();
    let mut topology = Topology::new();
    let fine = topology.stage("fine");
    let broken = topology.stage("broken");
    // Linked so that the topology is whole; the fine stage emits nothing.
    topology.entry(fine).link(fine, broken);
    topology.handler(fine, move |_| {
        let handled = handled.clone();
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            handled.send(event.seq).ok();
            Outcome::Done
        }
    });
    // Its dead letters go to a sink that panics: its worker dies.
    topology.handler(broken, |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Reject("no".into()));
    let calls = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let reported = Arc::clone(&calls);
    let config = EngineConfig::builder().queue_batches(1).batch_events_max(1).build().expect("valid");
    let engine = Engine::builder(topology)
        .config(&config)
        .dead_letters(Arc::new(PanickingSink))
        .on_complete(Arc::new(move |seq| reported.lock().push(seq)))
        .start()
        .expect("valid");
    // The first kills the broken stage's worker (and stays in flight: its unit never ended).
    engine.inject_many(broken, [Envelope::submitted(100, Job(100))]).expect("sent");
    let poisoned = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        engine.poisoned().is_some()
    });
    assert!(poisoned, "the broken worker died");
    // Then the broken stage takes nothing more: its queue is gone with its worker, or, while
    // the engine still holds it, this fills it for good.
    let second = engine.inject_many(broken, [Envelope::submitted(101, Job(101))]);
    let filled = match second {
        Ok(sent) => sent == 1,
        Err(SubmitError::Poisoned(back)) if back == [Job(101)] => false,
        other => panic!("sent whole or refused whole: {other:?}"),
    };
    // Message 7 has an event in each stage, message 8 one in the broken stage only.
    let refused = engine.inject_all(vec![
        (fine, vec![Envelope::submitted(7, Job(7))]),
        (broken, vec![Envelope::submitted(7, Job(7)), Envelope::submitted(8, Job(8))]),
    ]);
    assert!(matches!(&refused, Err(SubmitError::Poisoned(unsent)) if unsent == &[Job(7), Job(8)]), "{refused:?}");
    assert_eq!(fine_done.recv_timeout(Duration::from_secs(5)), Ok(7), "message 7's first event went");
    // Time for the fine stage's worker to settle its unit, which would report message 7 had its
    // unsent event been taken back.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(calls.lock().as_slice(), [] as [u64; 0], "nothing finished");
    let in_the_dead_stage = 1 + u64::from(filled);
    assert_eq!(engine.in_flight(), in_the_dead_stage + 1, "what the dead stage holds, and 7; not 8");
    engine.shutdown();
}

#[test]
fn malformed_topologies_are_refused_with_the_reason() {
    let config = EngineConfig::default();
    let check = |topology: Topology<Job>, needle: &str| {
        let error = Engine::start(topology, &config).expect_err("must be refused");
        assert!(matches!(error, BuildError::Topology(_)), "{error}");
        assert!(error.to_string().contains(needle), "{error} should mention {needle:?}");
    };

    check(Topology::new(), "no stages");

    let mut t = Topology::new();
    let a = t.stage("a");
    t.handler(a, |_| done);
    check(t, "no entry");

    let mut t = Topology::new();
    let a = t.stage("a");
    let b = t.stage("b");
    t.entry(a).link(a, b).link(b, a);
    t.handler(a, |_| done).handler(b, |_| done);
    check(t, "cycle");

    let mut t = Topology::new();
    let a = t.stage("a");
    t.stage("a");
    t.entry(a);
    check(t, "declared twice");

    let mut t = Topology::new();
    let a = t.stage("a");
    let b = t.stage("b");
    t.entry(a).handler(a, |_| done).handler(b, |_| done);
    check(t, "cannot be reached");

    let mut t = Topology::new();
    let a = t.stage("a");
    t.stage("b");
    t.entry(a).handler(a, |_| done);
    check(t, "has no handler");
}

#[test]
fn configuration_naming_a_missing_stage_is_refused() {
    let mut t = Topology::new();
    let a = t.stage("a");
    t.entry(a).handler(a, |_| done);
    let config = EngineConfig::builder().stage("paymnet", StageSettings::default()).build().expect("valid alone");
    let error = Engine::start(t, &config).expect_err("unknown stage");
    assert!(matches!(error, BuildError::Config(ConfigError::Invalid(_))));
    assert!(error.to_string().contains("paymnet"), "{error}");
}
