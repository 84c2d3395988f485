//! Simulated power loss, on the log's in-memory disk (`conduit::log::MemoryDisk`), which keeps what
//! was synced apart from what was only written. At a chosen sync the power goes: that sync never completes, the writes since
//! the last completed one are dropped, or partly kept in any order with the last one torn, and
//! the disk answers nothing more. The log reopened from what survived must hold every order that
//! was acknowledged before the cut, with valid histories, and opening it must never panic.
//!
//! `CONDUIT_POWER_CUTS=N` runs N cuts instead of the CI tier's (the long tier, `scripts/torture`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::log::{Log, LogOptions, MemoryDisk, PowerCut};
use conduit::{EngineConfig, SubmitError};
use conduit_orders::{self as orders, Histories, Order, OrderPipeline, OrderRouting, SimConfig, Workload};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::retained_acknowledged;

/// The log checkpoints every 200 records and keeps 16 KiB: many syncs are a checkpoint's, and
/// many of those remove frames.
fn log_options() -> LogOptions {
    let retention = conduit::log::Retention { max_bytes: Some(16 << 10), max_age: None };
    LogOptions { checkpoint_records: 200, retention, ..LogOptions::default() }
}

fn engine() -> EngineConfig {
    EngineConfig::builder().batch_events_max(64).build().expect("valid")
}

/// One cut: run orders until the disk dies, then reopen what survived and check it. Returns the
/// orders acknowledged before the cut, and the checkpoints written and frames removed before it.
fn one_cut(seed: u64) -> (u64, u64, u64) {
    // The payment provider is not on the shop's power: it keeps all its books through the cut.
    let sim = SimConfig { payment_failure_rate: 0.2, seed, ..SimConfig::default() };
    let provider = Arc::new(sim.payment_gateway());
    let mut rng = SmallRng::seed_from_u64(seed);
    let cut = if rng.random_bool(0.5) { PowerCut::Drop } else { PowerCut::Tear { seed } };
    let cut_at = rng.random_range(1..160);
    let context = format!("seed {seed} ({cut:?} at sync {cut_at})");
    let disk = MemoryDisk::new().with_power_cut_at(cut_at, cut);
    let mut acked = 0u64;
    let mut before_cut = (0, 0);
    match Log::open_with_backend("power-cut", disk.clone(), log_options()) {
        // The power may go before the log is even created: nothing was acknowledged.
        Err(_) => assert!(disk.is_dark(), "{context}: a healthy disk must open"),
        Ok(log) => {
            let log = Arc::new(log);
            let pipeline = OrderPipeline::start_with_provider(
                &engine(),
                &sim,
                &OrderRouting::default(),
                Some(Arc::clone(&log)),
                None,
                Arc::clone(&provider),
            )
            .expect("starts");
            let mut orders = Workload::new(seed, 50, 500);
            let mut submitted = 0;
            for round in 1..=200 {
                let chunk: Vec<Order> = orders.by_ref().take(50).collect();
                let last = chunk.last().map_or(0, |o| o.id);
                match pipeline.submit_many(chunk) {
                    Ok(count) => (acked, submitted) = (last, submitted + count),
                    Err(SubmitError::LogFailed(_) | SubmitError::Poisoned(_)) => break,
                    Err(other) => panic!("{context}: {other:?}"),
                }
                if round % 4 == 0 && round <= 12 {
                    // Early on (most cuts come within 20 rounds) the shop goes quiet now and
                    // then, so that a checkpoint finds old frames with nothing in flight and
                    // retention removes them: a fast build would otherwise keep old orders in
                    // flight at every checkpoint before the cut.
                    let give_up = Instant::now() + Duration::from_secs(10);
                    while pipeline.terminal() < submitted && !disk.is_dark() && Instant::now() < give_up {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            // After the cut the run's own report and the close can only fail: what the disk kept
            // is checked below.
            drop(pipeline.finish());
            let stats = log.stats();
            before_cut = (stats.checkpoints, stats.frames_removed);
            log.close().expect_err("the disk is dead: closing cannot make anything durable");
        }
    }
    assert!(disk.is_dark(), "{context}: the run must outlast the cut");

    // Power back: a fresh disk holding only what reached the platter.
    let reopened = Log::open_with_backend("after-power-cut", disk.survivor(), LogOptions::default());
    let log = match reopened {
        Ok(log) => log,
        // Nothing durable yet (the cut came before the first commit): a typed error is right.
        Err(error) => {
            assert_eq!(acked, 0, "{context}: acknowledged orders but the log does not reopen: {error}");
            return (0, before_cut.0, before_cut.1);
        }
    };
    let histories = Histories::read(&log).unwrap_or_else(|e| panic!("{context}: unreadable after the cut: {e}"));
    let missing: Vec<u64> =
        retained_acknowledged(&histories, acked).filter(|id| !histories.orders.contains_key(id)).take(5).collect();
    assert!(missing.is_empty(), "{context}: acknowledged orders lost: {missing:?}");
    let report = histories.verify();
    assert_eq!(report.problem_count, 0, "{context}: {:?}", report.problems);
    assert_eq!(report.ledger.double_charges, 0, "{context}");
    assert_eq!(report.in_flight, report.resumable, "{context}");

    // Recovery finishes what was in flight, calling the provider that kept its books; every
    // terminal order must have paid on those books exactly what its outcome says.
    let log = Arc::new(log);
    let recovered = orders::recover_with_provider(&engine(), &sim, &log, Some(Arc::clone(&provider)))
        .unwrap_or_else(|e| panic!("{context}: recovery failed: {e}"));
    assert!(recovered.verify.ok, "{context}: {:?}", recovered.verify.problems);
    let everything = orders::verify_with_provider(&log, &provider).expect("verifies");
    let audit = everything.provider.as_ref().expect("audited");
    assert!(everything.ok, "{context}: the provider's books: {audit:?} {:?}", everything.problems);
    assert_eq!(everything.in_flight, 0, "{context}: recovery left orders in flight");
    (acked, before_cut.0, before_cut.1)
}

#[test]
fn acknowledged_orders_survive_a_power_cut_at_any_sync() {
    let cuts: u64 = std::env::var("CONDUIT_POWER_CUTS").ok().and_then(|n| n.parse().ok()).unwrap_or(24);
    let first: u64 = std::env::var("CONDUIT_POWER_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    let (mut with_acks, mut acked, mut checkpoints, mut removed) = (0, 0, 0, 0);
    for seed in first..first + cuts {
        let (n, c, r) = one_cut(seed);
        with_acks += u64::from(n > 0);
        acked += n;
        checkpoints += c;
        removed += r;
    }
    println!(
        "{cuts} power cuts from seed {first}: {acked} acknowledged orders survived ({with_acks} cuts after acks; \
         {checkpoints} checkpoints and {removed} frames removed before the cuts)"
    );
    assert!(removed > 0, "retention must have removed frames in some runs, or the cuts missed it");
    assert!(with_acks * 2 >= cuts, "most cuts must come after some acknowledgements, or they test little");
}
