//! Retries wait out an exponential backoff (never less), a conflict retries at once, and while
//! one key waits, its later events wait behind it and every other key keeps flowing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Topology};
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    key: u64,
    n: u64,
}

impl Message for Job {
    fn key(&self) -> u64 {
        self.key
    }
}

/// (job, attempt, when) of every attempt.
type Attempts = Arc<Mutex<Vec<(Job, u32, Instant, bool)>>>;

fn run(
    config: &EngineConfig,
    jobs: Vec<Job>,
    fail: impl Fn(&Envelope<Job>) -> Option<Outcome> + Send + Sync + Clone + 'static,
) -> Attempts {
    let attempts: Attempts = Arc::new(Mutex::new(Vec::new()));
    let mut topology = Topology::new();
    let stage = topology.stage("work");
    topology.entry(stage);
    let seen = Arc::clone(&attempts);
    topology.handler(stage, move |_| {
        let (seen, fail) = (Arc::clone(&seen), fail.clone());
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            let outcome = fail(event).unwrap_or(Outcome::Done);
            seen.lock().push((event.msg, event.attempt, Instant::now(), outcome == Outcome::Done));
            outcome
        }
    });
    let engine = Engine::start(topology, config).expect("valid");
    engine.submit_many(jobs).expect("healthy");
    let report = engine.shutdown();
    assert!(report.is_clean());
    attempts
}

#[test]
fn retries_wait_out_an_exponential_backoff() {
    let config = EngineConfig::from_toml_str(
        "retry_backoff_ms_base = 20\nretry_backoff_ms_max = 1000\nretry_jitter = \"none\"\n",
    )
    .expect("valid");
    let attempts = run(&config, vec![Job { key: 1, n: 0 }], |e| (e.attempt < 3).then(|| Outcome::Retry("down".into())));
    let attempts = attempts.lock();
    assert_eq!(attempts.len(), 4);
    for (i, expected_ms) in [20u64, 40, 80].into_iter().enumerate() {
        let gap = attempts[i + 1].2 - attempts[i].2;
        assert!(
            gap >= Duration::from_millis(expected_ms),
            "attempt {} came after {gap:?}, before its {expected_ms} ms backoff",
            i + 1
        );
    }
    assert!(attempts[3].3, "the fourth attempt succeeded");
}

#[test]
fn a_conflict_retries_at_once_and_counts_an_attempt() {
    let config =
        EngineConfig::from_toml_str("retry_backoff_ms_base = 5000\nretry_backoff_ms_max = 5000\nattempts_max = 3\n")
            .expect("valid");
    let started = Instant::now();
    let attempts = run(&config, vec![Job { key: 1, n: 0 }], |e| {
        (e.attempt < 2).then(|| Outcome::Conflict("stale version".into()))
    });
    assert_eq!(attempts.lock().len(), 3, "two conflicts, then success within attempts_max");
    assert!(started.elapsed() < Duration::from_secs(5), "no 5 s backoff was waited for a conflict");
}

#[test]
fn a_waiting_key_holds_back_only_its_own_later_events() {
    let config = EngineConfig::from_toml_str("retry_backoff_ms_base = 50\nretry_jitter = \"none\"\n").expect("valid");
    let jobs: Vec<Job> = (0..3).flat_map(|n| (0..100).map(move |key| Job { key, n })).collect();
    let attempts =
        run(&config, jobs, |e| (e.msg == Job { key: 0, n: 0 } && e.attempt < 2).then(|| Outcome::Retry("down".into())));
    let done: Vec<Job> = attempts.lock().iter().filter(|a| a.3).map(|a| a.0).collect();
    assert_eq!(done.len(), 300);
    let key0: Vec<u64> = done.iter().filter(|j| j.key == 0).map(|j| j.n).collect();
    assert_eq!(key0, [0, 1, 2], "key 0's later events waited behind its retry");
    let first_key0 = done.iter().position(|j| j.key == 0).expect("key 0 finished");
    assert_eq!(first_key0, 297, "every other key flowed while key 0 waited out 150 ms of backoff");
}

#[test]
fn decorrelated_jitter_never_waits_less_than_the_base() {
    let config = EngineConfig::from_toml_str(
        "retry_backoff_ms_base = 10\nretry_backoff_ms_max = 200\nretry_jitter = \"decorrelated\"\nattempts_max = 8\n",
    )
    .expect("valid");
    let attempts = run(&config, vec![Job { key: 1, n: 0 }], |e| (e.attempt < 6).then(|| Outcome::Retry("down".into())));
    let attempts = attempts.lock();
    assert_eq!(attempts.len(), 7, "six failures, then done");
    for pair in attempts.windows(2) {
        let gap = pair[1].2 - pair[0].2;
        assert!(gap >= Duration::from_millis(10), "a decorrelated delay is at least the base: {gap:?}");
    }
    assert!(attempts[6].3, "the last attempt succeeded");
}
