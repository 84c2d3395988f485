//! The threaded worker and the deterministic simulation decide through the same code: fed the
//! same scripted outcomes, they try each key's events the same number of times in the same
//! order, park a key's later events behind its retry, dead-letter the same events with the same
//! kind, attempts and error chain, and wait out the same backoffs (the simulation exactly, on its
//! manual clock; the worker at least as long, on the system clock).
//!
//! The simulation used to re-implement the worker's outcome handling with its own backoff
//! formula and no error chain; this test compares the two runs, and the backoff each saw against
//! the stage's settings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::sim::Simulation;
use conduit::{
    DeadLetterKind, Emitter, Engine, EngineConfig, Envelope, JournalCodec, MemoryDeadLetters, Message, Outcome,
    Topology,
};
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    key: u64,
    /// The job's place among its key's jobs.
    n: u32,
}

impl Message for Job {
    fn key(&self) -> u64 {
        self.key
    }
}

struct Codec;

impl JournalCodec<Job> for Codec {
    fn encode(&self, msg: &Job, payload: &mut Vec<u8>) -> u16 {
        payload.extend_from_slice(&msg.key.to_le_bytes());
        payload.extend_from_slice(&msg.n.to_le_bytes());
        1
    }

    fn decode(&self, kind: u16, payload: &[u8]) -> Option<Job> {
        let key = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
        let n = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?);
        (kind == 1 && payload.len() == 12).then_some(Job { key, n })
    }
}

const BASE_MS: u64 = 20;
const ATTEMPTS_MAX: u32 = 4;
const DEFER_MS: u64 = 30;
const KEYS: u64 = 12;

fn config() -> EngineConfig {
    EngineConfig::from_toml_str(&format!(
        "attempts_max = {ATTEMPTS_MAX}\nretry_backoff_ms_base = {BASE_MS}\nretry_backoff_ms_max = 1000\nretry_jitter = \"none\"\n"
    ))
    .expect("a valid configuration")
}

/// The scripted outcome of attempt `attempt` of `job` (`call` counts the handler's calls for it,
/// as a deferral spends no attempt): each key's first job follows one of six stories; a key's
/// later jobs are done at once.
fn script(job: Job, attempt: u32, call: u32) -> Outcome {
    if job.n > 0 {
        return Outcome::Done;
    }
    match (job.key % 6, attempt) {
        (0, 0 | 1) => Outcome::Retry(format!("down {attempt}").into()),
        (1, _) => Outcome::Retry(format!("always down {attempt}").into()),
        (2, _) => Outcome::Reject("refused".into()),
        (3, 0) if call == 0 => Outcome::Defer(Duration::from_millis(DEFER_MS)),
        (4, 0) => Outcome::Conflict("raced".into()),
        (5, _) => Outcome::Malformed("garbled".into()),
        _ => Outcome::Done,
    }
}

/// What one run saw: per key, every handler call as (job, attempt, milliseconds since the start).
type Calls = Arc<Mutex<Vec<(Job, u32, u64)>>>;

fn topology(calls: &Calls, stamp: impl Fn() -> u64 + Send + Sync + Clone + 'static) -> Topology<Job> {
    let mut topology = Topology::<Job>::new();
    let work = topology.stage("work");
    let done = topology.stage("done");
    topology.link(work, done).entry(work);
    let calls = Arc::clone(calls);
    topology.handler(work, move |_| {
        let (calls, stamp) = (Arc::clone(&calls), stamp.clone());
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            let mut calls = calls.lock();
            let call = calls.iter().filter(|c| c.0 == event.msg).count();
            calls.push((event.msg, event.attempt, stamp()));
            let outcome = script(event.msg, event.attempt, u32::try_from(call).expect("a few calls"));
            if outcome == Outcome::Done {
                out.emit(done, event.msg);
            }
            outcome
        }
    });
    topology.handler(done, |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Done);
    topology
}

fn jobs() -> Vec<Job> {
    let mut jobs: Vec<Job> = (0..KEYS).map(|key| Job { key, n: 0 }).collect();
    jobs.extend((0..KEYS).map(|key| Job { key, n: 1 }));
    jobs
}

/// Per key: the calls (job, attempt, time).
fn by_key(calls: &[(Job, u32, u64)]) -> BTreeMap<u64, Vec<(Job, u32, u64)>> {
    let mut keys: BTreeMap<u64, Vec<(Job, u32, u64)>> = BTreeMap::new();
    for &call in calls {
        keys.entry(call.0.key).or_default().push(call);
    }
    keys
}

/// A dead letter as compared: job, kind, attempts and the error chain.
type Letter = (Job, DeadLetterKind, u32, Vec<String>);

fn letters(sink: &MemoryDeadLetters<Job>) -> Vec<Letter> {
    let mut letters: Vec<Letter> = sink
        .drain()
        .into_iter()
        .map(|l| (l.envelope.msg, l.kind, l.attempts, l.chain().map(ToString::to_string).collect()))
        .collect();
    letters.sort_by_key(|l| (l.0.key, l.0.n));
    letters
}

/// The wait before attempt `attempt` (counted from 0) of a key's first job, as the stage's
/// settings and the script make it; none for a first attempt.
fn expected_wait_ms(key: u64, attempt: u32, call: usize) -> Option<u64> {
    match (key % 6, attempt) {
        (3, 0) if call == 1 => Some(DEFER_MS),
        (_, 0) => None,
        (4, _) => Some(0),
        (_, n) => Some(BASE_MS << (n - 1)),
    }
}

#[test]
fn the_worker_and_the_simulation_dispose_of_the_same_outcomes_alike() {
    // The threaded engine, on the system clock.
    let engine_calls: Calls = Calls::default();
    let started = Instant::now();
    let stamp = move || u64::try_from(started.elapsed().as_millis()).expect("a short test");
    let engine_letters = Arc::new(MemoryDeadLetters::<Job>::default());
    let engine = Engine::builder(topology(&engine_calls, stamp))
        .config(&config())
        .dead_letters(engine_letters.clone())
        .start()
        .expect("starts");
    engine.submit_many(jobs()).expect("submits");
    let report = engine.shutdown();
    assert!(report.is_clean());

    // The simulation, on its manual clock: each new call is stamped with the clock of its step.
    let sim_calls: Calls = Calls::default();
    let sim_letters = Arc::new(MemoryDeadLetters::<Job>::default());
    let mut sim =
        Simulation::new(topology(&sim_calls, || u64::MAX), &config(), sim_letters.clone(), Arc::new(Codec), &[], 7)
            .expect("builds");
    for job in jobs() {
        sim.submit(job);
    }
    assert!(!sim.step(), "nothing enters before its commit");
    assert_eq!(sim.sync().expect("a journal in memory syncs"), jobs().len());
    let mut stamped = 0;
    while sim.step() {
        let mut calls = sim_calls.lock();
        for call in &mut calls[stamped..] {
            call.2 = sim.now_ms();
        }
        stamped = calls.len();
    }
    assert!(sim.is_idle());

    // Same dead letters, with the same story.
    let (engine_letters, sim_letters) = (letters(&engine_letters), letters(&sim_letters));
    assert_eq!(engine_letters, sim_letters);
    let kinds: Vec<DeadLetterKind> = sim_letters.iter().map(|l| l.1).collect();
    assert_eq!(kinds.iter().filter(|&&k| k == DeadLetterKind::RetriesExhausted).count(), 2);
    assert_eq!(kinds.iter().filter(|&&k| k == DeadLetterKind::Rejected).count(), 2);
    assert_eq!(kinds.iter().filter(|&&k| k == DeadLetterKind::Malformed).count(), 2);
    assert!(sim_letters
        .iter()
        .filter(|l| l.1 == DeadLetterKind::RetriesExhausted)
        .all(|l| l.2 == ATTEMPTS_MAX && l.3.len() == ATTEMPTS_MAX as usize));

    // Same attempts per key, in the same order: a key's second job only after its first is settled.
    let (engine_keys, sim_keys) = (by_key(&engine_calls.lock()), by_key(&sim_calls.lock()));
    let attempts = |keys: &BTreeMap<u64, Vec<(Job, u32, u64)>>| -> BTreeMap<u64, Vec<(u32, u32)>> {
        keys.iter().map(|(&key, calls)| (key, calls.iter().map(|c| (c.0.n, c.1)).collect())).collect()
    };
    assert_eq!(attempts(&engine_keys), attempts(&sim_keys));
    assert_eq!(sim_keys.len() as u64, KEYS);

    // The waits between attempts: exactly the backoff in the simulation (a delay of d ms is due at
    // the first tick at least d ms away, and a step may take a millisecond), at least that long in
    // the worker.
    for key in 0..KEYS {
        let (engine_calls, sim_calls) = (&engine_keys[&key], &sim_keys[&key]);
        for i in 1..sim_calls.len() {
            let Some(wait) = expected_wait_ms(key, sim_calls[i].1, i).filter(|_| sim_calls[i].0.n == 0) else {
                continue;
            };
            let sim_gap = sim_calls[i].2 - sim_calls[i - 1].2;
            let engine_gap = engine_calls[i].2 - engine_calls[i - 1].2;
            assert!(
                (wait..=wait + 2).contains(&sim_gap),
                "key {key} attempt {}: the simulation waited {sim_gap} ms, the settings say {wait} ms",
                sim_calls[i].1
            );
            assert!(
                engine_gap >= wait,
                "key {key} attempt {}: the worker waited {engine_gap} ms, less than the {wait} ms backoff",
                sim_calls[i].1
            );
        }
    }
}
