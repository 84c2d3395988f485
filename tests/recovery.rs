//! Recovery for any topology: after a crash, the messages the log had in flight are resumed from
//! its checkpoint and tail, finished, and journaled as finished.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conduit::log::{Log, LogOptions, STAGE_INGRESS};
use conduit::{Emitter, Engine, Envelope, Journal, JournalCodec, Message, Outcome, RecoverError, Topology};
use crossbeam_channel::Receiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job(u64);

impl Message for Job {
    fn key(&self) -> u64 {
        self.0
    }
}

/// Encodes a job as its id; decodes only while `readable`.
struct Codec {
    readable: AtomicBool,
}

impl JournalCodec<Job> for Codec {
    fn encode(&self, msg: &Job, payload: &mut Vec<u8>) -> u16 {
        payload.extend_from_slice(&msg.0.to_le_bytes());
        1
    }

    fn decode(&self, kind: u16, payload: &[u8]) -> Option<Job> {
        if !self.readable.load(Ordering::SeqCst) || kind != 1 {
            return None;
        }
        Some(Job(u64::from_le_bytes(payload.try_into().ok()?)))
    }
}

const JOBS: u64 = 30;
/// Jobs from here on wait at the gate in the first run.
const HELD_FROM: u64 = 20;
const FACT: u16 = 2;

/// parse -> apply; `apply` records a fact per job, and waits at `gate` for held jobs.
fn topology(gate: Option<Receiver<()>>) -> Topology<Job> {
    let mut topology = Topology::new();
    let parse = topology.stage("parse");
    let apply = topology.stage("apply");
    topology.entry(parse).link(parse, apply);
    topology.handler(parse, move |_| {
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            out.emit(apply, event.msg);
            Outcome::Done
        }
    });
    topology.handler(apply, move |_| {
        let gate = gate.clone();
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            if let Some(gate) = &gate {
                if event.msg.0 >= HELD_FROM {
                    // Bounded, so that a failing test still shuts down.
                    gate.recv_timeout(Duration::from_secs(20)).ok();
                }
            }
            out.record(FACT, &event.msg.0.to_le_bytes());
            Outcome::Done
        }
    });
    topology
}

fn engine(log: &Arc<Log>, codec: &Arc<Codec>, gate: Option<Receiver<()>>) -> Engine<Job> {
    let journal = Journal::new(Arc::clone(log), Arc::clone(codec) as Arc<dyn JournalCodec<Job>>);
    Engine::builder(topology(gate)).journal(journal).start().expect("valid")
}

fn codec(readable: bool) -> Arc<Codec> {
    Arc::new(Codec { readable: AtomicBool::new(readable) })
}

/// Runs until jobs from [`HELD_FROM`] on are held, then copies the synced file: what a crash
/// then would leave. Returns the copy's path.
fn crashed_log(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("log.redb");
    let log = Arc::new(Log::open(&path, LogOptions::default()).expect("new log"));
    let (open, gate) = crossbeam_channel::unbounded();
    let running = engine(&log, &codec(true), Some(gate));
    running.submit_many((0..JOBS).map(Job)).expect("accepted");
    for _ in 0..2_000 {
        if running.snapshot().stage("apply").expect("declared").busy_workers == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    log.sync().expect("durable");
    let cut = dir.join("cut.redb");
    std::fs::copy(&path, &cut).expect("copy");
    drop(open);
    running.shutdown();
    cut
}

/// Ingress ids, and the jobs with a fact, in a log.
fn contents(log: &Log) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (mut ingress, mut facts) = (BTreeSet::new(), BTreeSet::new());
    log.for_each(|record| {
        if record.stage == STAGE_INGRESS {
            ingress.insert(record.id);
        }
        if record.kind == FACT {
            facts.insert(u64::from_le_bytes(record.payload.as_slice().try_into().expect("eight bytes")));
        }
    })
    .expect("readable");
    (ingress, facts)
}

#[test]
fn messages_in_flight_at_a_crash_are_resumed_and_finish() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cut = crashed_log(dir.path());

    let log = Arc::new(Log::open(&cut, LogOptions::default()).expect("the cut file opens"));
    let in_flight: BTreeSet<u64> = log.in_flight_at_open().iter().map(|m| m.id).collect();
    let (ingress, facts_before) = contents(&log);
    assert_eq!(ingress.len() as u64, JOBS);
    assert!(in_flight.len() as u64 >= JOBS - HELD_FROM, "{in_flight:?}");
    assert!((HELD_FROM..JOBS).all(|job| !facts_before.contains(&job)), "held jobs had not been applied");

    let recovering = engine(&log, &codec(true), None);
    let resumed = recovering.resume_in_flight().expect("resumes");
    assert_eq!(resumed, in_flight.len() as u64);
    let report = recovering.shutdown();
    assert!(report.is_clean());
    assert_eq!((report.snapshot.completed, report.snapshot.in_flight), (resumed, 0));
    log.close().expect("closes");
    drop(log);

    let log = Log::open(&cut, LogOptions::default()).expect("reopens");
    assert!(log.in_flight_at_open().is_empty(), "every resumed message was journaled as finished");
    let (_, facts) = contents(&log);
    assert_eq!(facts, (0..JOBS).collect(), "every job applied at least once");
}

#[test]
fn an_undecodable_ingress_record_resumes_nothing_and_says_which() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cut = crashed_log(dir.path());
    let log = Arc::new(Log::open(&cut, LogOptions::default()).expect("opens"));
    let first = log.in_flight_at_open().first().expect("some in flight").id;
    let recovering = engine(&log, &codec(false), None);
    match recovering.resume_in_flight() {
        Err(RecoverError::Undecodable { id, kind: 1 }) => assert_eq!(id, first),
        other => panic!("{other:?}"),
    }
    let report = recovering.shutdown();
    assert_eq!(report.snapshot.submitted + report.snapshot.completed, 0, "nothing was resumed");
}
