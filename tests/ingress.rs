//! Ingress on a journaled engine: `try_submit` never waits for a commit (not when the disk is
//! slow, not when the queue is full); `submit_many` keeps several windows committing at once; a
//! submission reserves exactly the record ids it uses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::log::{Log, LogOptions};
use conduit::{
    Emitter, Engine, EngineConfig, Envelope, Journal, JournalCodec, Message, Outcome, Topology, TrySubmitError,
    INGRESS_WINDOW_EVENTS, WINDOWS_IN_FLIGHT,
};
use crossbeam_channel::{Receiver, Sender};
use redb::backends::InMemoryBackend;
use redb::StorageBackend;

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

/// Memory storage whose syncs take `SYNC` once `slow` is set: a slow disk.
#[derive(Debug)]
struct SlowDisk {
    inner: InMemoryBackend,
    slow: Arc<AtomicBool>,
}

const SYNC: Duration = Duration::from_millis(400);

impl StorageBackend for SlowDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.slow.load(Ordering::SeqCst) {
            std::thread::sleep(SYNC);
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.inner.write(offset, data)
    }
}

fn slow_log() -> (Arc<Log>, Arc<AtomicBool>) {
    let slow = Arc::new(AtomicBool::new(false));
    let backend = SlowDisk { inner: InMemoryBackend::new(), slow: Arc::clone(&slow) };
    let log = Log::open_with_backend("slow disk", backend, LogOptions::default()).expect("opens in memory");
    (Arc::new(log), slow)
}

/// One stage whose handler waits at `gate` for each job when `gated`, on a journaled engine with
/// a one-batch entry queue.
fn engine(log: &Arc<Log>, gate: Option<Receiver<()>>) -> Engine<Job> {
    let mut topology = Topology::<Job>::new();
    let work = topology.stage("work");
    topology.entry(work);
    topology.handler(work, move |_| {
        let gate = gate.clone();
        move |_: &Envelope<Job>, _: &mut Emitter<Job>| {
            if let Some(gate) = &gate {
                gate.recv().expect("the test holds the gate");
            }
            Outcome::Done
        }
    });
    let config = EngineConfig::from_toml_str("queue_batches = 1\nbatch_events_max = 1\n").expect("valid");
    Engine::builder(topology)
        .config(&config)
        .journal(Journal::new(Arc::clone(log), Arc::new(Codec)))
        .start()
        .expect("starts")
}

/// Calls `f`, returning what it returned and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let value = f();
    (value, started.elapsed())
}

#[test]
fn try_submit_never_waits_for_a_slow_commit() {
    let (log, slow) = slow_log();
    let engine = engine(&log, None);
    slow.store(true, Ordering::SeqCst);
    let mut receipts = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut refused = 0;
    for id in 0..40 {
        let (result, took) = timed(|| engine.try_submit(Job(id)));
        slowest = slowest.max(took);
        match result {
            Ok(receipt) => receipts.push(receipt),
            Err(TrySubmitError::Full(Job(back))) => {
                assert_eq!(back, id, "a refused job comes back");
                refused += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    // Each commit takes 400 ms; 40 calls returned long before one commit could finish.
    assert!(slowest < SYNC / 4, "try_submit waited {slowest:?} on a log whose commits take {SYNC:?}");
    assert!(!receipts.is_empty(), "some jobs were taken");
    assert!(refused > 0, "with {WINDOWS_IN_FLIGHT} windows in flight and 40 jobs, some were refused");
    assert!(!receipts[0].is_settled(), "the first job's commit cannot have finished yet");
    let taken = receipts.len() as u64;
    for receipt in receipts {
        assert_eq!(receipt.wait().expect("committed and accepted"), 1);
    }
    let report = engine.shutdown();
    assert!(report.is_clean());
    assert_eq!(report.snapshot.submitted, taken);
    assert_eq!(report.snapshot.stage("work").expect("declared").processed, taken);
}

#[test]
fn try_submit_refuses_at_once_when_the_queue_is_full() {
    let (log, _slow) = slow_log();
    let (open, gate): (Sender<()>, Receiver<()>) = crossbeam_channel::unbounded();
    let engine = engine(&log, Some(gate));
    // The worker holds one job at the gate, the queue holds one batch: the rest wait or are refused.
    engine.submit(Job(0)).expect("room");
    engine.submit(Job(1)).expect("room");
    let (result, took) = timed(|| engine.try_submit(Job(2)));
    assert!(matches!(result, Err(TrySubmitError::Full(Job(2)))), "{result:?}");
    assert!(took < Duration::from_millis(100), "a refusal took {took:?}");
    for _ in 0..2 {
        open.send(()).expect("the worker waits at the gate");
    }
    drop(open);
    assert!(engine.shutdown().is_clean());
}

#[test]
fn submit_many_commits_several_windows_at_once() {
    let (log, slow) = slow_log();
    let engine = engine(&log, None);
    slow.store(true, Ordering::SeqCst);
    let windows = 5;
    let jobs = (0..windows * INGRESS_WINDOW_EVENTS as u64).map(Job);
    let (submitted, took) = timed(|| engine.submit_many(jobs).expect("healthy"));
    assert_eq!(submitted, windows * INGRESS_WINDOW_EVENTS as u64);
    // One window at a time would be one 400 ms commit per window; with windows in flight the
    // writer groups the queued windows into fewer commits.
    let commits = log.stats().durable_commits;
    assert!(commits < windows, "{commits} durable commits for {windows} windows in {took:?}");
    assert!(engine.shutdown().is_clean());
}

#[test]
fn each_submission_reserves_exactly_the_ids_it_uses() {
    let (log, _slow) = slow_log();
    let engine = engine(&log, None);
    let before = log.reserve_ids(0);
    for id in 0..10 {
        engine.submit(Job(id)).expect("healthy");
    }
    // The one-batch queue may still be full: a refusal reserves nothing, so try until there is room.
    let mut job = Job(10);
    let receipt = loop {
        match engine.try_submit(job) {
            Ok(receipt) => break receipt,
            Err(TrySubmitError::Full(back)) => job = back,
            Err(other) => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    receipt.wait().expect("accepted");
    assert_eq!(log.reserve_ids(0) - before, 11, "one id per submitted job, none wasted, none for a refusal");
    assert!(engine.shutdown().is_clean());
}

#[test]
fn submit_window_returns_before_its_commit_and_the_receipt_settles_after_it() {
    let (log, slow) = slow_log();
    let engine = engine(&log, None);
    slow.store(true, Ordering::SeqCst);
    let windows = WINDOWS_IN_FLIGHT as u64 / 2;
    let (receipts, took) = timed(|| {
        (0..windows)
            .map(|w| engine.submit_window_at((w * 100..w * 100 + 100).map(Job).collect(), Instant::now()))
            .collect::<Result<Vec<_>, _>>()
            .expect("healthy")
    });
    // Each commit takes 400 ms; handing over the windows did not wait for one.
    assert!(took < SYNC / 4, "submit_window_at waited {took:?} on a log whose commits take {SYNC:?}");
    assert!(!receipts[0].is_settled(), "the first window's commit cannot have finished yet");
    for receipt in receipts {
        assert_eq!(receipt.wait().expect("committed and accepted"), 100);
    }
    let report = engine.shutdown();
    assert!(report.is_clean());
    assert_eq!(report.snapshot.submitted, windows * 100);
    assert_eq!(report.snapshot.stage("work").expect("declared").processed, windows * 100);
}
