//! Alerts on a running engine: a stage made slow crosses the lag and depth thresholds, the alerts
//! fire and resolve once it catches up; failures fire the error-rate and dead-letter alerts, which
//! resolve after a quiet window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::{AlertRule, AlertRules, Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Snapshot, Topology};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job(u64);

impl Message for Job {
    fn key(&self) -> u64 {
        self.0
    }
}

/// gate (holds every event while `open` is false; rejects jobs whose id ends in 7 when
/// `reject_sevens`) -> sink.
fn engine(open: &Arc<AtomicBool>, reject_sevens: bool, rules: AlertRules) -> Engine<Job> {
    let mut topology = Topology::new();
    let gate = topology.stage("gate");
    let sink = topology.stage("sink");
    topology.entry(gate).link(gate, sink);
    let open = Arc::clone(open);
    topology.handler(gate, move |_| {
        let open = Arc::clone(&open);
        move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
            while !open.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if reject_sevens && event.msg.0 % 10 == 7 {
                return Outcome::Reject("ends in seven".into());
            }
            out.emit(sink, event.msg);
            Outcome::Done
        }
    });
    topology.handler(sink, |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Done);
    Engine::builder(topology).config(&EngineConfig::default()).alerts(rules).start().expect("the engine starts")
}

/// Snapshots every 10 ms until `until` holds for one (at most 10 s); that snapshot.
fn watch(engine: &Engine<Job>, until: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = engine.snapshot();
        if until(&snapshot) {
            return snapshot;
        }
        assert!(Instant::now() < deadline, "the awaited alert state never came: {:#?}", snapshot.alerts);
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Opener(Arc<AtomicBool>);

impl Drop for Opener {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn firing(snapshot: &Snapshot, rule: AlertRule, stage: &str) -> bool {
    snapshot.alerts.firing.iter().any(|a| a.rule == rule && a.stage == stage)
}

#[test]
fn a_stuck_stage_fires_lag_and_depth_alerts_that_resolve_when_it_catches_up() {
    let open = Arc::new(AtomicBool::new(false));
    let rules = AlertRules { lag_s_max: 0.2, queue_depth_max: 1_000, ..AlertRules::default() };
    let engine = engine(&open, false, rules);
    // Opens the gate if an assertion fails, so that dropping the engine can drain it.
    let _opener = Opener(Arc::clone(&open));
    // Idle first: lag counts from when the events were sent, not from when the engine started.
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    engine.submit_many((0..5_000).map(Job)).expect("accepted");

    let stuck = watch(&engine, |s| firing(s, AlertRule::Lag, "gate"));
    let lag = stuck.stage("gate").expect("gate").lag_us;
    let waited = sent.elapsed().as_secs_f64() * 1e6;
    assert!(lag > 200_000.0 && lag <= waited, "lag {lag} us fired the alert; the events waited at most {waited} us");
    assert!(firing(&stuck, AlertRule::QueueDepth, "gate"), "{:#?}", stuck.alerts);
    assert!(!firing(&stuck, AlertRule::Lag, "sink"), "the sink's queue is empty: {:#?}", stuck.alerts);

    open.store(true, Ordering::Release);
    let caught_up = watch(&engine, |s| !firing(s, AlertRule::Lag, "gate") && !firing(s, AlertRule::QueueDepth, "gate"));
    assert!(caught_up.stage("gate").expect("gate").lag_us < 200_000.0, "below the threshold once resolved");
    let lag_events: Vec<bool> = caught_up
        .alerts
        .recent
        .iter()
        .filter(|e| e.alert.rule == AlertRule::Lag && e.alert.stage == "gate")
        .map(|e| e.firing)
        .collect();
    assert_eq!(lag_events, [true, false], "fired once, then resolved");
    assert!(caught_up.alerts.resolved_total >= 2, "{:#?}", caught_up.alerts);
    assert!(engine.shutdown().is_clean());
}

#[test]
fn failures_fire_error_rate_and_dead_letter_alerts_that_resolve_after_a_quiet_window() {
    let open = Arc::new(AtomicBool::new(true));
    let rules = AlertRules { window_s: 0.5, ..AlertRules::default() };
    let engine = engine(&open, true, rules);
    let before = engine.snapshot();
    assert!(before.alerts.firing.is_empty(), "{:#?}", before.alerts);

    // One job in ten is rejected: a 10% error rate, and dead letters.
    engine.submit_many((0..1_000).map(Job)).expect("accepted");
    let failing = watch(&engine, |s| firing(s, AlertRule::ErrorRate, "gate"));
    assert!(firing(&failing, AlertRule::DeadLetters, "gate"), "{:#?}", failing.alerts);
    let rate = failing.alerts.firing.iter().find(|a| a.rule == AlertRule::ErrorRate).expect("fires").value;
    assert!((0.01..=0.1).contains(&rate), "error rate {rate}");
    assert!(!firing(&failing, AlertRule::ErrorRate, "sink"), "{:#?}", failing.alerts);

    // Healthy work after a window: both resolve.
    std::thread::sleep(Duration::from_millis(600));
    engine.submit_many((0..1_000).map(|n| Job(n * 10))).expect("accepted");
    let quiet = watch(&engine, |s| s.alerts.firing.is_empty());
    assert_eq!(quiet.alerts.fired_total, 2, "{:#?}", quiet.alerts);
    assert_eq!(quiet.alerts.resolved_total, 2, "{:#?}", quiet.alerts);
    assert!(engine.shutdown().is_clean());
}

#[test]
fn disabled_rules_never_fire() {
    let open = Arc::new(AtomicBool::new(true));
    let engine = engine(&open, true, AlertRules { enabled: false, ..AlertRules::default() });
    engine.submit_many((0..1_000).map(Job)).expect("accepted");
    let report = engine.shutdown();
    assert_eq!(report.snapshot.stage("gate").expect("gate").dead_lettered, 100);
    assert_eq!(report.snapshot.alerts.fired_total, 0, "{:#?}", report.snapshot.alerts);
}

#[test]
fn bad_rules_are_refused_when_the_engine_starts() {
    let mut topology: Topology<Job> = Topology::new();
    let gate = topology.stage("gate");
    topology.entry(gate);
    topology.handler(gate, |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Done);
    let error = Engine::builder(topology)
        .alerts(AlertRules { window_s: -1.0, ..AlertRules::default() })
        .start()
        .expect_err("a negative window is refused");
    assert!(error.to_string().contains("alerts.window_s"), "{error}");
}

#[test]
fn snapshots_carry_rates_over_the_window_and_the_retries_held() {
    let mut topology = Topology::new();
    let gate = topology.stage("gate");
    topology.entry(gate);
    // Every job fails its first attempt, then waits 300 ms for its retry.
    topology.handler(gate, |_| {
        |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            if event.attempt == 0 {
                Outcome::Retry("once".into())
            } else {
                Outcome::Done
            }
        }
    });
    let config = EngineConfig::from_toml_str("retry_backoff_ms_base = 300\nretry_jitter = \"none\"").expect("valid");
    let engine = Engine::start(topology, &config).expect("starts");
    let first = engine.snapshot();
    engine.submit_many((0..50).map(Job)).expect("accepted");
    // Every job waits for its retry: the wheel holds all 50 at once.
    let parked = watch(&engine, |s| s.stage("gate").is_some_and(|g| g.retry_parked == 50));
    assert_eq!(parked.stage("gate").expect("gate").processed, 0, "none retried yet");
    // A worker publishes its counts after each batch and the wheel's gauge when it next looks
    // for work: a snapshot between the two sees the retries done and still parked. Both settle.
    let done = watch(&engine, |s| s.stage("gate").is_some_and(|g| g.processed == 50 && g.retry_parked == 0));
    let gate_now = done.stage("gate").expect("gate");
    // The window reaches back to the first snapshot: the rates are the counts over that span.
    let seconds = done.uptime_s - first.uptime_s;
    assert!((gate_now.rates.processed * seconds - 50.0).abs() < 1e-6, "{:?} over {seconds} s", gate_now.rates);
    assert!((gate_now.rates.retried * seconds - 50.0).abs() < 1e-6, "{:?} over {seconds} s", gate_now.rates);
    assert!(engine.shutdown().is_clean());
}
