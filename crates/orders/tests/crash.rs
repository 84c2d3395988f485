//! kill -9: a child process runs the order pipeline on an immediate log and prints every order it
//! has had acknowledged; the parent kills it at random moments, again and again on the same log.
//! Each new child first recovers what the last one left in flight (so some kills land during a
//! recovery), then takes new orders. At the end the parent recovers once more and checks that
//! every acknowledged order is in the log, every order reached exactly one terminal state, and
//! no order was charged twice.
//!
//! The child is this test binary itself, started with `CONDUIT_CRASH_CHILD` set.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::log::{Log, LogOptions};
use conduit::EngineConfig;
use conduit_orders::{self as orders, Flow, Histories, OrderPipeline, OrderRouting, OrderStatus, SimConfig, Workload};
use rand::{Rng, SeedableRng};

use common::retained_acknowledged;

/// The engine's crash points and the order application's.
fn all_points() -> Vec<&'static str> {
    conduit::crashpoint::ENGINE_POINTS.iter().chain(&conduit_orders::CRASH_POINTS).copied().collect()
}

const CHILD_ENV: &str = "CONDUIT_CRASH_CHILD";
/// The flow the child runs (`chain` unless set): the parent's test sets it.
const FLOW_ENV: &str = "CONDUIT_CRASH_FLOW";
/// Kill cycles; the CI tier of the reliability suite asks for at least 30. `CONDUIT_CRASH_CYCLES`
/// sets another count (the long tier runs 500).
/// Kill cycles on one log before the next starts.
const LOG_CYCLES: usize = 10;

fn cycles() -> usize {
    std::env::var("CONDUIT_CRASH_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(30)
}

/// The payment provider keeps its own books beside the log: a file the child writes before each
/// answer, which its death does not touch. Every check of money reads them.
/// The saga flows also meet a carrier that fails a fifth of the shipments (half
/// refused, half shipped with the answer lost) and declined cards.
fn sim(log: &std::path::Path, flow: Flow) -> SimConfig {
    let sagas = flow != Flow::Chain;
    SimConfig {
        payment_failure_rate: 0.2,
        out_of_stock_rate: 0.1,
        seed: 3,
        payment_books: Some(log.with_extension("payments")),
        flow,
        shipping_failure_rate: if sagas { 0.2 } else { 0.0 },
        payment_decline_rate: if sagas { 0.1 } else { 0.0 },
        ..SimConfig::default()
    }
}

/// The provider's books as they are now (the child is dead).
fn provider(log: &std::path::Path) -> Arc<conduit_orders::ports::SimulatedGateway> {
    orders::open_provider(&sim(log, Flow::Chain)).expect("the provider's books open").expect("the provider keeps books")
}

fn engine() -> EngineConfig {
    EngineConfig::builder().batch_events_max(64).build().expect("valid")
}

/// The child's log checkpoints every 20,000 records and keeps about 4 MiB of frames, so kills
/// land in checkpoints and in retention too.
fn child_log_options() -> LogOptions {
    let retention = conduit::log::Retention { max_bytes: Some(4 << 20), max_age: None };
    LogOptions { checkpoint_records: 20_000, retention, ..LogOptions::default() }
}

/// The child: recover, then place orders forever, printing `ack <highest id>` after each
/// acknowledged chunk.
fn child(path: &str) {
    let flow: Flow = std::env::var(FLOW_ENV).ok().and_then(|name| name.parse().ok()).unwrap_or(Flow::Chain);
    let log = Arc::new(Log::open(path, child_log_options()).expect("child opens the log"));
    let histories = Histories::read(&log).expect("child reads the log");
    let first_id = histories.orders.keys().max().copied().unwrap_or(0) + 1;
    let pipeline = OrderPipeline::start_with_provider(
        &engine(),
        &sim(path.as_ref(), flow),
        &OrderRouting::default(),
        Some(Arc::clone(&log)),
        Some(&histories),
        provider(path.as_ref()),
    )
    .expect("starts");
    pipeline.resume(&histories).expect("resumes");
    println!("ready {first_id}");
    // Over all the simulated SKUs, so out_of_stock_rate of them cancel and the rest confirm.
    let mut workload = Workload::new(first_id, sim(path.as_ref(), flow).skus, 1_000).map(|mut order| {
        order.id += first_id - 1;
        order
    });
    loop {
        let chunk: Vec<_> = workload.by_ref().take(200).collect();
        let last = chunk.last().map_or(0, |o| o.id);
        pipeline.submit_many(chunk).expect("the child's pipeline stays healthy until it is killed");
        println!("ack {last}");
    }
}

#[test]
fn acknowledged_orders_survive_kill_9_and_finish_exactly_once() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    kill_cycles("acknowledged_orders_survive_kill_9_and_finish_exactly_once", Flow::Chain, cycles());
}

/// The same over the orchestrated flow: every saga, its parallel steps and its compensations
/// journaled fact by fact, is taken up again after each kill and ends exactly once, completed
/// or compensated, on the provider's books. 20 cycles unless `CONDUIT_CRASH_CYCLES` says more.
#[test]
fn acknowledged_sagas_survive_kill_9_and_end_exactly_once() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    kill_cycles("acknowledged_sagas_survive_kill_9_and_end_exactly_once", Flow::Orchestrated, saga_cycles());
}

/// The same over the choreography: its services' facts, journaled as each answers, rebuild the
/// carrier's table of half-answered orders and what each saga owes.
#[test]
fn acknowledged_choreographed_sagas_survive_kill_9_and_end_exactly_once() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    let test = "acknowledged_choreographed_sagas_survive_kill_9_and_end_exactly_once";
    kill_cycles(test, Flow::Choreography, saga_cycles());
}

/// Kill cycles over a saga flow: 20 unless `CONDUIT_CRASH_CYCLES` says more.
fn saga_cycles() -> usize {
    std::env::var("CONDUIT_CRASH_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(20)
}

/// Kills a child running `test` (the `flow`) `cycles` times at random moments, checking the log
/// after each kill and once recovered at the end of each log.
fn kill_cycles(test: &str, flow: Flow, cycles: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut path = dir.path().join("crash-0.redb");
    let seed: u64 = std::env::var("CONDUIT_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    println!("kill -9 cycles with seed {seed} (set CONDUIT_CRASH_SEED to replay)");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut acked_max = 0u64;
    let mut acked_total = 0u64;
    for cycle in 0..cycles {
        // A fresh log every LOG_CYCLES cycles, the last one finished and checked: the long tier's
        // hundreds of cycles would otherwise grow one log (and each cycle's full read) without end.
        if cycle > 0 && cycle % LOG_CYCLES == 0 {
            finish_and_check(&path, flow, acked_max, &format!("log ending at cycle {cycle} (seed {seed})"));
            acked_total += acked_max;
            acked_max = 0;
            path = dir.path().join(format!("crash-{cycle}.redb"));
        }
        // Acknowledgements are read on a thread while the parent waits a random time, then kills.
        let (mut child, output) = spawn_child(test, &path, flow, None);
        let wait = Duration::from_millis(rng.random_range(30..400));
        let started = Instant::now();
        while started.elapsed() < wait {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("cycle {cycle}: the child exited by itself with {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
        let acked = output.acked.join().expect("reader");
        acked_max = acked_max.max(acked);

        check_after_crash(&path, acked_max, &format!("cycle {cycle} (seed {seed})"));
    }
    finish_and_check(&path, flow, acked_max, &format!("seed {seed}"));
    acked_total += acked_max;
    assert!(acked_total > 0, "some orders were acknowledged over {cycles} cycles");
    println!("{acked_total} orders acknowledged over {cycles} kill -9 cycles, none lost, none charged twice");
}

/// What a child left behind: the highest order id it acknowledged, and the crash-point lines it
/// printed on stderr (`crash point <name>: pass <n>, aborting`).
struct ChildOutput {
    acked: std::thread::JoinHandle<u64>,
    crash_lines: std::thread::JoinHandle<Vec<String>>,
}

/// Starts this test binary as a child running `test` on the log at `path` (with a crash point
/// armed, if given), with threads that read what it prints.
fn spawn_child(
    test: &str,
    path: &std::path::Path,
    flow: Flow,
    crash_at: Option<&str>,
) -> (std::process::Child, ChildOutput) {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", test, "--nocapture"])
        .env(CHILD_ENV, path)
        .env(FLOW_ENV, flow.name())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(point) = crash_at {
        command.env(conduit::crashpoint::ENV, point);
    }
    let mut child = command.spawn().expect("child starts");
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let acked = std::thread::spawn(move || {
        let mut acked = 0u64;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(id) = line.strip_prefix("ack ").and_then(|n| n.parse::<u64>().ok()) {
                acked = acked.max(id);
            }
        }
        acked
    });
    let crash_lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|line| line.starts_with(conduit::crashpoint::MARKER))
            .collect()
    });
    (child, ChildOutput { acked, crash_lines })
}

/// Every acknowledged order must be in the log after a crash, whatever it interrupted; no
/// history broken, no double charge, everything in flight resumable.
fn check_after_crash(path: &std::path::Path, acked_max: u64, context: &str) {
    let log = Log::open(path, LogOptions::default()).expect("reopens after the crash");
    let histories = Histories::read(&log).expect("readable after the crash");
    let missing: Vec<u64> =
        retained_acknowledged(&histories, acked_max).filter(|id| !histories.orders.contains_key(id)).take(5).collect();
    assert!(missing.is_empty(), "{context}: acknowledged orders missing: {missing:?}");
    let report = histories.verify();
    assert_eq!(report.ledger.double_charges, 0, "{context}");
    assert_eq!(report.problem_count, 0, "{context}: {:?}", report.problems);
    assert_eq!(report.in_flight, report.resumable, "{context}: everything in flight can resume");
    let audit = histories.audit(&provider(path), histories.orders.keys().copied());
    assert!(audit.ok(), "{context}: the provider's books: {audit:?}");
}

/// Recovers once more and checks every acknowledged order finished exactly once.
fn finish_and_check(path: &std::path::Path, flow: Flow, acked_max: u64, context: &str) {
    let log = Arc::new(Log::open(path, LogOptions::default()).expect("reopens"));
    let recovered = orders::recover(&engine(), &sim(path, flow), &log).expect("final recovery");
    let verify = &recovered.verify;
    assert!(verify.ok, "{context}: {:?}", verify.problems);
    let audit = recovered.verify.provider.as_ref().expect("recovery audits the provider's books");
    assert!(audit.ok(), "{context}: the recovered orders on the provider's books: {audit:?}");
    assert_eq!(verify.in_flight, 0);
    assert_eq!(verify.orders, verify.confirmed + verify.cancelled + verify.dead_lettered);
    assert_eq!(verify.ledger.double_charges, 0);
    assert!(recovered.run.violations().is_empty(), "{:?}", recovered.run.violations());
    let histories = Histories::read(&log).expect("readable");
    let everything = orders::verify_with_provider(&log, &provider(path)).expect("verifies");
    let audit = everything.provider.as_ref().expect("audited");
    assert!(everything.ok, "{context}: every terminal order on the provider's books: {audit:?}");
    assert!(
        everything.confirmed > 0 && everything.cancelled > 0 && audit.confirmed_total_cents > 0,
        "{context}: the orders both confirm and cancel: {everything:?}"
    );
    log.close().expect("closes");
    drop(log);
    let reopened = Log::open(path, LogOptions::default()).expect("reopens");
    assert!(reopened.in_flight_at_open().is_empty(), "{context}: the log still lists work in flight after recovery");
    for id in retained_acknowledged(&histories, acked_max) {
        let status = histories.orders.get(&id).map(conduit_orders::OrderHistory::status);
        assert!(
            matches!(status, Some(OrderStatus::Confirmed | OrderStatus::Cancelled | OrderStatus::DeadLettered)),
            "acknowledged order {id} ended as {status:?}"
        );
    }
}

/// Each named crash point (`conduit::crashpoint`) once, on one log: a child armed with the point
/// aborts by itself there; the log must still hold every order it had acknowledged. The
/// `recover.resumed` child dies in the middle of a recovery, and the next child recovers that.
#[test]
fn every_crash_point_keeps_every_acknowledged_order() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("points.redb");
    let plan = [
        ("log.before_commit", 6),
        ("saga.after_charge", 400),
        ("log.after_commit", 6),
        ("recover.resumed", 1),
        ("log.after_commit", 3),
        ("log.checkpoint", 2),
        ("recover.resumed", 1),
        ("log.retention", 2),
    ];
    let armed = |p: &&str| plan.iter().chain(&SAGA_PLAN).any(|(q, _)| q == p);
    assert!(all_points().iter().all(armed), "every point is armed");
    crash_at_points(&path, Flow::Chain, &plan);
}

/// The orchestrated flow's crash points, with the passes to crash on.
const SAGA_PLAN: [(&str, u32); 4] = [
    ("orchestrated.after_refund", 5),
    ("orchestrated.after_refund", 40),
    ("recover.resumed", 1),
    ("orchestrated.after_refund", 200),
];

/// A saga killed just after it refunded a charge, before the fact was journaled: the provider's
/// books know of the refund, the log does not. Recovery must take the saga up as the compensation
/// it was (not ship it again and confirm a refunded order).
#[test]
fn a_saga_killed_between_a_refund_and_its_record_ends_compensated() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    crash_at_points(&dir.path().join("saga-points.redb"), Flow::Orchestrated, &SAGA_PLAN);
}

/// Runs a child of `flow` armed with each `(point, pass)` of `plan` in turn on the log at
/// `path`, checks that it died there and that the log holds what it acknowledged, and at the
/// end recovers and checks every order ended once.
fn crash_at_points(path: &std::path::Path, flow: Flow, plan: &[(&str, u32)]) {
    let test = if flow == Flow::Chain {
        "every_crash_point_keeps_every_acknowledged_order"
    } else {
        "a_saga_killed_between_a_refund_and_its_record_ends_compensated"
    };
    let mut acked_max = 0u64;
    for &(point, pass) in plan {
        let armed = format!("{point}:{pass}");
        let (mut child, output) = spawn_child(test, path, flow, Some(&armed));
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                child.kill().expect("kill");
                panic!("crash point {point}:{pass} was never reached");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(!status.success(), "the child armed with {point}:{pass} must abort, not exit: {status}");
        // Dying is not enough: it must have died at the armed point, on the armed pass.
        let crash_lines = output.crash_lines.join().expect("stderr reader");
        let expected = format!("{} {point}: pass {pass}, aborting", conduit::crashpoint::MARKER);
        assert_eq!(crash_lines, [expected], "the child armed with {armed} crashed elsewhere ({status})");
        acked_max = acked_max.max(output.acked.join().expect("reader"));
        check_after_crash(path, acked_max, &format!("after crash point {point}:{pass}"));
    }
    assert!(acked_max > 0);
    finish_and_check(path, flow, acked_max, "crash points");
    println!("{flow:?} crash points: {} crashes, {acked_max} orders acknowledged, none lost", plan.len());
}
