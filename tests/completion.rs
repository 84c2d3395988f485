//! Completion tracking: the engine says a submitted message has finished exactly once, and only
//! when every event it caused has been handled or dead-lettered; with a journal the log says so
//! too, after every record of that work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::log::{completed_ids, Log, LogOptions, ENGINE_STREAM, KIND_COMPLETED, STAGE_INGRESS};
use conduit::{Emitter, Engine, EngineConfig, Envelope, Journal, JournalCodec, Message, Outcome, StageId, Topology};
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job(u64);

impl Message for Job {
    fn key(&self) -> u64 {
        self.0
    }
}

struct Codec;

impl JournalCodec<Job> for Codec {
    fn encode(&self, msg: &Job, payload: &mut Vec<u8>) -> u16 {
        payload.extend_from_slice(&msg.0.to_le_bytes());
        1
    }

    fn decode(&self, kind: u16, payload: &[u8]) -> Option<Job> {
        (kind == 1).then_some(Job(u64::from_le_bytes(payload.try_into().ok()?)))
    }
}

/// Jobs whose id ends in 7 are rejected at the first stage (their work ends there).
fn rejected(id: u64) -> bool {
    id % 10 == 7
}

/// How many events of job `id` reach the last stage.
fn arrivals(id: u64) -> u64 {
    if rejected(id) {
        0
    } else {
        2
    }
}

/// What the last stage saw, by the submitted message's `seq`, and the job each `seq` was.
#[derive(Default)]
struct Seen {
    arrived: Mutex<HashMap<u64, u64>>,
    job_of: Mutex<HashMap<u64, u64>>,
}

/// split (fans each job out in two, rejects some) -> slow (retries every third event once)
/// -> sink (counts arrivals by seq, records a fact); two workers per stage.
fn topology(seen: &Arc<Seen>) -> Topology<Job> {
    topology_from_split(seen).0
}

/// [`topology`], and its entry stage.
fn topology_from_split(seen: &Arc<Seen>) -> (Topology<Job>, StageId) {
    let mut topology = Topology::new();
    let split = topology.stage("split");
    let slow = topology.stage("slow");
    let sink = topology.stage("sink");
    topology.entry(split).link(split, slow).link(slow, sink);
    let seen_split = Arc::clone(seen);
    topology.handler(split, move |_| {
        let seen = Arc::clone(&seen_split);
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            seen.job_of.lock().insert(event.seq, event.msg.0);
            if rejected(event.msg.0) {
                return Outcome::Reject("ends in seven".into());
            }
            out.emit_keyed(slow, event.msg.0 * 2, event.msg);
            out.emit_keyed(slow, event.msg.0 * 2 + 1, event.msg);
            Outcome::Done
        }
    });
    topology.handler(slow, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            if event.key % 3 == 0 && event.attempt == 0 {
                return Outcome::Retry("once more".into());
            }
            out.emit(sink, event.msg);
            Outcome::Done
        }
    });
    let seen_sink = Arc::clone(seen);
    topology.handler(sink, move |_| {
        let seen = Arc::clone(&seen_sink);
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            // A little work, so that a premature completion has time to be seen.
            std::thread::sleep(Duration::from_micros(20));
            *seen.arrived.lock().entry(event.seq).or_default() += 1;
            out.record(2, &event.msg.0.to_le_bytes());
            Outcome::Done
        }
    });
    (topology, split)
}

fn config() -> EngineConfig {
    EngineConfig::builder().workers(2).batch_events_max(16).queue_batches(4).build().expect("valid")
}

/// Checks, at the moment `seq` is reported finished, that all of its work has arrived.
fn checker(seen: &Arc<Seen>, calls: &Arc<Mutex<Vec<u64>>>, early: &Arc<AtomicU64>) -> conduit::OnComplete {
    let (seen, calls, early) = (Arc::clone(seen), Arc::clone(calls), Arc::clone(early));
    Arc::new(move |seq| {
        let job = seen.job_of.lock().get(&seq).copied();
        let arrived = seen.arrived.lock().get(&seq).copied().unwrap_or(0);
        if job.is_none_or(|id| arrived != arrivals(id)) {
            early.fetch_add(1, Ordering::SeqCst);
        }
        calls.lock().push(seq);
    })
}

const JOBS: u64 = 3_000;

#[test]
fn every_message_completes_once_and_only_after_all_its_work() {
    let seen = Arc::new(Seen::default());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let early = Arc::new(AtomicU64::new(0));
    let engine = Engine::builder(topology(&seen))
        .config(&config())
        .on_complete(checker(&seen, &calls, &early))
        .start()
        .expect("valid");
    engine.submit_many((0..JOBS).map(Job)).expect("accepted");
    let report = engine.shutdown();
    assert!(report.is_clean());
    assert_eq!(early.load(Ordering::SeqCst), 0, "a message was reported finished before all its work arrived");
    let mut calls = calls.lock().clone();
    assert_eq!(calls.len() as u64, JOBS, "one report per message");
    calls.sort_unstable();
    calls.dedup();
    assert_eq!(calls.len() as u64, JOBS, "no message reported twice");
    let snapshot = report.snapshot;
    assert_eq!((snapshot.completed, snapshot.in_flight), (JOBS, 0));
}

#[test]
fn end_to_end_latency_counts_every_message_from_when_it_was_scheduled() {
    let seen = Arc::new(Seen::default());
    let engine = Engine::builder(topology(&seen)).config(&config()).start().expect("valid");
    // As an open-loop generator 300 ms behind its schedule would send them: every latency
    // includes those 300 ms.
    let late = std::time::Instant::now().checked_sub(Duration::from_millis(300)).expect("the clock is past 300 ms");
    engine.submit_many_at((0..JOBS).map(Job), late).expect("accepted");
    let report = engine.shutdown();
    let end_to_end = report.snapshot.end_to_end_us.expect("a tracking engine measures it");
    assert_eq!(end_to_end.count, JOBS, "one latency per finished message");
    assert!(end_to_end.p50 >= 300_000.0, "every job waited 300 ms before it was sent: {end_to_end:?}");
    assert!(end_to_end.p50 <= end_to_end.p90 && end_to_end.p90 <= end_to_end.p99, "{end_to_end:?}");
}

#[test]
fn a_ticket_settles_when_the_work_is_done() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let mut topology = Topology::new();
    let first = topology.stage("first");
    let second = topology.stage("second");
    topology.entry(first).link(first, second);
    topology.handler(first, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            out.emit(second, event.msg);
            Outcome::Done
        }
    });
    topology.handler(second, move |_| {
        let gate = gate.clone();
        move |_: &Envelope<Job>, _: &mut Emitter<Job>| {
            // Bounded, so that a failing test still shuts down.
            gate.recv_timeout(Duration::from_secs(5)).ok();
            Outcome::Done
        }
    });
    let engine = Engine::builder(topology).start().expect("valid");
    let receipt = engine.try_submit(Job(1)).expect("room");
    let ticket = engine.ticket(&receipt).expect("one tracked message");
    assert!(!ticket.wait_timeout(Duration::from_millis(50)), "the second stage has not handled it");
    assert_eq!(engine.in_flight(), 1);
    open.send(()).expect("the worker waits");
    assert!(ticket.wait_timeout(Duration::from_secs(10)), "done once the second stage handled it");
    assert!(ticket.is_done(), "and stays done");
    assert_eq!(engine.in_flight(), 0);
    assert!(engine.ticket(&receipt).expect("tracked").is_done(), "a finished message's ticket is done");
    engine.shutdown();
}

/// Work resumed in two stages at once (as recovery resumes an order with steps left in both):
/// the message finishes once, after its events in both, not when those in one have ended.
#[test]
fn a_message_injected_into_two_stages_finishes_after_both() {
    let (handled, quick_done) = crossbeam_channel::unbounded::<()>();
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let mut topology = Topology::new();
    let quick = topology.stage("quick");
    let held = topology.stage("held");
    // Linked so that the topology is whole; the quick stage emits nothing.
    topology.entry(quick).link(quick, held);
    topology.handler(quick, move |_| {
        let handled = handled.clone();
        move |_: &Envelope<Job>, _: &mut Emitter<Job>| {
            handled.send(()).ok();
            Outcome::Done
        }
    });
    topology.handler(held, move |_| {
        let gate = gate.clone();
        move |_: &Envelope<Job>, _: &mut Emitter<Job>| {
            // Bounded, so that a failing test still shuts down.
            gate.recv_timeout(Duration::from_secs(5)).ok();
            Outcome::Done
        }
    });
    let calls = Arc::new(Mutex::new(Vec::new()));
    let reported = Arc::clone(&calls);
    let engine =
        Engine::builder(topology).on_complete(Arc::new(move |seq| reported.lock().push(seq))).start().expect("valid");
    let counts = engine
        .inject_all(vec![(quick, vec![Envelope::submitted(5, Job(1))]), (held, vec![Envelope::submitted(5, Job(1))])])
        .expect("room");
    assert_eq!(counts, [1, 1]);
    quick_done.recv_timeout(Duration::from_secs(5)).expect("the quick stage handles its event");
    // Time for the quick stage's worker to settle its unit, which would report a message whose
    // events there were all its work.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(calls.lock().as_slice(), [] as [u64; 0], "finished while its event in the held stage waits");
    assert_eq!(engine.in_flight(), 1);
    open.send(()).expect("the held worker waits");
    let report = engine.shutdown();
    assert_eq!(calls.lock().as_slice(), [5], "finished once, after both");
    assert_eq!((report.snapshot.completed, report.snapshot.in_flight), (1, 0));
}

#[test]
fn without_tracking_nothing_is_counted() {
    let seen = Arc::new(Seen::default());
    let engine = Engine::builder(topology(&seen)).config(&config()).track_completion(false).start().expect("valid");
    engine.submit_many((0..100).map(Job)).expect("accepted");
    let snapshot = engine.shutdown().snapshot;
    assert_eq!((snapshot.completed, snapshot.in_flight), (0, 0));
    assert_eq!(snapshot.end_to_end_us, None, "nothing measured without tracking");
}

/// Envelopes injected into an engine that does not track are untracked whatever tokens their
/// builder left in them: their children and their ends touch no slot of the tracker.
#[test]
fn without_tracking_an_injected_token_is_ignored() {
    let seen = Arc::new(Seen::default());
    let (topology, split) = topology_from_split(&seen);
    let engine = Engine::builder(topology).config(&config()).track_completion(false).start().expect("valid");
    let events = (0..100).map(|id| Envelope { slot: 0, token: 7, ..Envelope::submitted(id, Job(id * 10)) });
    assert_eq!(engine.inject_many(split, events).expect("injected"), 100);
    let snapshot = engine.shutdown().snapshot;
    assert_eq!((snapshot.completed, snapshot.in_flight), (0, 0), "a slot that was never taken was updated");
}

#[test]
fn the_log_records_each_completion_once_after_all_its_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Arc::new(Log::open(dir.path().join("log.redb"), LogOptions::default()).expect("new log"));
    let seen = Arc::new(Seen::default());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let early = Arc::new(AtomicU64::new(0));
    let engine = Engine::builder(topology(&seen))
        .config(&config())
        .journal(Journal::new(Arc::clone(&log), Arc::new(Codec)))
        .on_complete(checker(&seen, &calls, &early))
        .start()
        .expect("valid");
    engine.submit_many((0..JOBS).map(Job)).expect("accepted");
    assert!(engine.shutdown().is_clean());
    assert_eq!(early.load(Ordering::SeqCst), 0);

    // Position in the log of every record, by correlation; and where each message completed.
    let mut position = 0u64;
    let mut last_record: HashMap<u64, u64> = HashMap::new();
    let mut completed_at: HashMap<u64, u64> = HashMap::new();
    let mut ingress = 0u64;
    let mut twice = 0u64;
    let mut out_of_order = 0u64;
    log.for_each(|record| {
        position += 1;
        if record.stream == ENGINE_STREAM {
            assert_eq!(record.kind, KIND_COMPLETED);
            for id in completed_ids(&record.payload) {
                if completed_at.insert(id, position).is_some() {
                    twice += 1;
                }
            }
            return;
        }
        if record.stage == STAGE_INGRESS {
            ingress += 1;
            assert_eq!(record.correlation, record.id, "a message's seq is its ingress record's id");
        }
        if completed_at.contains_key(&record.correlation) {
            out_of_order += 1;
        }
        last_record.insert(record.correlation, position);
    })
    .expect("readable");
    assert_eq!(ingress, JOBS);
    assert_eq!(twice, 0, "no message completes twice");
    assert_eq!(out_of_order, 0, "a completion follows every record of its work");
    assert_eq!(completed_at.len() as u64, JOBS, "every message completed in the log");
    for correlation in last_record.keys() {
        assert!(completed_at.contains_key(correlation), "message {correlation} never completed");
    }
}

/// A two-stage topology whose second stage notes how long each job has been in the pipeline.
fn timed(ages: &Arc<Mutex<Vec<Option<Duration>>>>) -> Topology<Job> {
    let mut topology = Topology::new();
    let (first, second) = (topology.stage("first"), topology.stage("second"));
    topology.link(first, second).entry(first);
    topology.handler(first, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            std::thread::sleep(Duration::from_millis(2));
            out.emit(second, event.msg);
            Outcome::Done
        }
    });
    let ages = Arc::clone(ages);
    topology.handler(second, move |_| {
        let ages = Arc::clone(&ages);
        move |_: &Envelope<Job>, out: &mut Emitter<Job>| {
            ages.lock().push(out.since_accepted());
            Outcome::Done
        }
    });
    topology
}

#[test]
fn a_handler_knows_how_long_its_message_has_been_in_the_pipeline() {
    for track in [true, false] {
        let ages = Arc::new(Mutex::new(Vec::new()));
        let engine = Engine::builder(timed(&ages)).track_completion(track).start().expect("starts");
        engine.submit_many((0..20).map(Job)).expect("accepted");
        let report = engine.shutdown();
        assert!(report.is_clean());
        let ages = ages.lock();
        assert_eq!(ages.len(), 20);
        if track {
            // Each job slept 2 ms in the first stage before the second saw it.
            assert!(ages.iter().all(|age| age.is_some_and(|age| age >= Duration::from_millis(2))), "{ages:?}");
            assert!(ages.iter().all(|age| age.is_some_and(|age| age < Duration::from_secs(10))), "{ages:?}");
        } else {
            assert!(ages.iter().all(Option::is_none), "no tracking, no age: {ages:?}");
        }
    }
}
