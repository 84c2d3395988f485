//! Deterministic simulation of the order pipeline on the real log (on an in-memory disk, with
//! checkpoints and retention): each seed picks a world (the chain, or sagas orchestrated or
//! choreographed with a failing carrier and step timeouts; failure, timeout, decline, poison rates,
//! scarce stock, retry settings), an interleaving and power cuts, between commits or torn inside
//! one; every invariant is checked after every action and at the end. A failing seed is printed and replays
//! exactly: `CONDUIT_SIM_SEED=N cargo test --test simulation` runs that one seed.
//! `CONDUIT_SIM_SEEDS=N` runs N seeds (the long tier runs 10,000).

use conduit_orders::simulate;

#[test]
fn two_hundred_seeds_keep_every_invariant() {
    let first: u64 = std::env::var("CONDUIT_SIM_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    let default = if std::env::var("CONDUIT_SIM_SEED").is_ok() { 1 } else { 200 };
    let seeds: u64 = std::env::var("CONDUIT_SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(default);
    let (mut acknowledged, mut crashes, mut lost, mut steps) = (0, 0, 0, 0);
    let (mut in_commit, mut checkpoints, mut removed, mut sagas) = (0, 0, 0, 0);
    for seed in first..first + seeds {
        let report = simulate(seed, 400).unwrap_or_else(|failure| panic!("{failure}\nreplay: CONDUIT_SIM_SEED={seed}"));
        assert_eq!(report.orders, report.confirmed + report.cancelled + report.dead_lettered, "seed {seed}");
        assert!(report.orders >= report.acknowledged, "seed {seed}: {report:?}");
        in_commit += report.cuts_in_commit;
        sagas += u64::from(report.flow != "chain");
        checkpoints += report.checkpoints;
        removed += report.frames_removed;
        acknowledged += report.acknowledged;
        crashes += report.crashes;
        lost += report.lost_unacknowledged;
        steps += report.steps;
    }
    println!(
        "{seeds} seeds from {first} ({sagas} running sagas, orchestrated or choreographed): {steps} steps, {crashes} \
         power cuts ({in_commit} during a commit), \
         {acknowledged} orders acknowledged, {lost} lost before their commit; the log wrote {checkpoints} \
         checkpoints and retention removed {removed} frames"
    );
    assert!(crashes > 0 && acknowledged > 0, "the seeds must crash and acknowledge something");
    if seeds >= 50 {
        assert!(in_commit > 0 && removed > 0, "cuts during commits and retention must happen in the seeds");
        assert!(sagas > seeds / 4 && sagas < seeds * 3 / 4, "about half the seeds run sagas: {sagas} of {seeds}");
    }
}

#[test]
fn a_seed_replays_exactly() {
    let a = simulate(42, 300).expect("seed 42 passes");
    let b = simulate(42, 300).expect("seed 42 passes");
    assert_eq!(a, b, "the same seed must give the same run");
    assert_ne!(simulate(43, 300).expect("seed 43 passes"), a);
}

/// Seed 13 loses power after a dead letter's refund reached the payment provider and before the
/// dead letter's record was durable: the resumed order asks for its charge again, and the
/// provider's books must make it end cancelled, not confirmed unpaid (replaying the refunded
/// charge as paid fails here with "order 20 (Confirmed) paid 0 cents net").
#[test]
fn a_refund_made_before_a_crash_is_not_forgotten() {
    let report = simulate(13, 400).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(report.crashes > 0 && report.dead_lettered + report.cancelled > 0, "{report:?}");
}

/// A power cut during a commit whose writes landed though it was never answered: the
/// simulation must count the commit's records as the log's (the log's next id tells it). Not
/// counting them judged order 9 "never finished" here. (An earlier version looked for the
/// commit's first record in the log, and missed commits whose checkpoint let retention remove
/// every frame, all the work having finished: random inputs found that.)
#[test]
fn a_commit_that_landed_unanswered_counts() {
    let input = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/regressions/operations/unanswered-commit-landed"),
    )
    .expect("the regression input reads");
    let report = conduit_orders::simulate_bytes(&input).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(report.cuts_in_commit > 0, "{report:?}");
}
