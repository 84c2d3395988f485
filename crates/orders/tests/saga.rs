//! The saga flows, orchestrated and choreographed: every saga completes or is compensated, the
//! providers' books balance (the carrier's against the inventory's, SKU by SKU), payment and
//! inventory run in parallel, and what a failure leaves ambiguous is undone.

use conduit::{EngineConfig, StageSettings};
use conduit_orders::{self as orders, Flow, RunReport, SimConfig};
use proptest::prelude::*;

fn orchestrated(sim: SimConfig) -> SimConfig {
    SimConfig { flow: Flow::Orchestrated, ..sim }
}

/// Both saga flows, from the same world.
fn both(sim: SimConfig) -> [SimConfig; 2] {
    [SimConfig { flow: Flow::Orchestrated, ..sim.clone() }, SimConfig { flow: Flow::Choreography, ..sim }]
}

fn engine(workers: usize, batch: usize, queue: usize) -> EngineConfig {
    EngineConfig::builder().workers(workers).batch_events_max(batch).queue_batches(queue).build().expect("valid")
}

fn run(config: &EngineConfig, sim: &SimConfig, orders: u64) -> RunReport {
    orders::run(config, sim, orders, None, |_, _| {}).expect("runs")
}

/// Compensations the sagas ran of `step`.
fn undone(report: &RunReport, step: &str) -> u64 {
    report.sagas.as_ref().and_then(|sagas| sagas.compensations.get(step).copied()).unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random failures of every port, scarce stock and engine shapes: every saga ends, once,
    /// and every book balances.
    #[test]
    fn every_saga_completes_or_is_compensated(
        seed in any::<u64>(),
        payment_failure_rate in 0.0..0.9f64,
        payment_decline_rate in 0.0..0.3f64,
        inventory_failure_rate in 0.0..0.5f64,
        out_of_stock_rate in 0.0..0.5f64,
        shipping_failure_rate in 0.0..0.5f64,
        stock_per_sku in 0u32..40,
        workers in 1usize..4,
        batch in 1usize..300,
        queue in 1usize..8,
        choreographed in any::<bool>(),
    ) {
        let flow = if choreographed { Flow::Choreography } else { Flow::Orchestrated };
        let sim = SimConfig { flow, ..orchestrated(SimConfig {
            seed,
            skus: 50,
            stock_per_sku,
            payment_failure_rate,
            payment_decline_rate,
            inventory_failure_rate,
            out_of_stock_rate,
            shipping_failure_rate,
            ..SimConfig::default()
        }) };
        let report = run(&engine(workers, batch, queue), &sim, 2_000);
        prop_assert!(report.violations().is_empty(), "{flow:?} seed {seed}: {:?}", report.violations());
        let sagas = report.sagas.clone().expect("the orchestrated flow reports its sagas");
        prop_assert_eq!(sagas.started, 2_000);
        prop_assert_eq!(sagas.completed + sagas.compensated, 2_000);
        prop_assert_eq!(sagas.completed, report.orders.confirmed);
        prop_assert_eq!(report.ledger.double_charges, 0);
        prop_assert_eq!(report.notifications.email_sent + report.notifications.sms_sent, 2 * sagas.completed);
    }
}

#[test]
fn payment_and_inventory_run_in_parallel() {
    // Every charge is declined. In the chain no order would reach the inventory; here every
    // reservation is made beside its charge and then released.
    for sim in both(SimConfig { seed: 3, payment_decline_rate: 1.0, ..SimConfig::default() }) {
        let report = run(&EngineConfig::default(), &sim, 3_000);
        assert!(report.violations().is_empty(), "{:?}: {:?}", sim.flow, report.violations());
        assert_eq!(report.orders.cancelled_declined, 3_000);
        assert!(report.stock.reserved_units > 0);
        assert_eq!(report.stock.released_units, report.stock.reserved_units);
        assert_eq!(undone(&report, "reserve"), 3_000, "{:?}: every reservation undone, once", sim.flow);
        assert_eq!(undone(&report, "charge"), 0, "a declined charge has nothing to undo");
    }
}

#[test]
fn a_shipment_whose_answer_was_lost_is_cancelled_on_the_carriers_books() {
    // Every shipment fails: half refused, half booked with the answer lost (the step times out).
    for sim in both(SimConfig { seed: 8, shipping_failure_rate: 1.0, ..SimConfig::default() }) {
        let report = run(&EngineConfig::default(), &sim, 4_000);
        assert!(report.violations().is_empty(), "{:?}: {:?}", sim.flow, report.violations());
        assert_eq!(report.orders.cancelled_unshipped, 4_000);
        let cancelled = undone(&report, "ship");
        assert!((1_000..3_000).contains(&cancelled), "{:?}: about half were booked: {cancelled}", sim.flow);
        assert_eq!(report.stock.shipped_units, 0, "each booked shipment was cancelled");
        assert_eq!(report.ledger.refunded_cents, report.ledger.charged_cents);
    }
}

#[test]
fn a_dead_lettered_step_may_have_acted_and_is_undone() {
    // Charges fail transiently (half of them after charging) and get two attempts: the orders
    // that run out are dead-lettered, and a charge made by a failed attempt is refunded.
    let config = EngineConfig::builder()
        .stage("payment", StageSettings { attempts_max: Some(2), ..StageSettings::default() })
        .build()
        .expect("valid");
    for sim in both(SimConfig { seed: 5, payment_failure_rate: 0.9, ..SimConfig::default() }) {
        let report = run(&config, &sim, 5_000);
        assert!(report.violations().is_empty(), "{:?}: {:?}", sim.flow, report.violations());
        assert!(report.orders.dead_lettered > 3_000, "most orders exhaust two attempts at 90% failure");
        assert_eq!(report.dead_letters.by_stage.get("payment").copied(), Some(report.orders.dead_lettered));
        assert!(undone(&report, "charge") > 0, "charges made by failed attempts were refunded");
        assert_eq!(report.dead_letters.compensation_failures, 0);
    }
}

/// Both saga flows journal every saga fact: the log verifies (each saga's facts rebuild its
/// end, every order terminal) and agrees with the provider's books.
#[test]
fn both_saga_flows_journal_their_sagas() {
    let world = SimConfig {
        payment_failure_rate: 0.2,
        payment_decline_rate: 0.1,
        out_of_stock_rate: 0.1,
        shipping_failure_rate: 0.2,
        ..SimConfig::default()
    };
    for sim in both(world) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = conduit::log::Log::open(dir.path().join("orders.redb"), conduit::log::LogOptions::default())
            .expect("a log opens");
        let log = std::sync::Arc::new(log);
        let report = orders::run(&engine(2, 64, 64), &sim, 20_000, Some(std::sync::Arc::clone(&log)), |_, _| {})
            .expect("the flow runs on a log");
        assert!(report.violations().is_empty(), "{:?}: {:?}", sim.flow, report.violations());
        let sagas = report.sagas.as_ref().expect("a saga report");
        assert!(sagas.compensated > 1_000 && sagas.completed > 1_000, "{sagas:?}");
        let verify = orders::verify(&log).expect("the log reads");
        assert!(verify.ok, "{:?}: {:?}", sim.flow, verify.problems);
        assert_eq!((verify.orders, verify.in_flight), (20_000, 0), "{:?}", sim.flow);
        assert_eq!(verify.confirmed, report.orders.confirmed);
        assert_eq!(verify.cancelled + verify.dead_lettered, sagas.compensated);
    }
}

#[test]
fn a_chain_cannot_fail_a_shipment() {
    let chain = SimConfig { shipping_failure_rate: 0.1, ..SimConfig::default() };
    let refused = chain.validate().expect_err("the chain cannot fail a shipment");
    assert!(refused.to_string().contains("simulation.shipping_failure_rate"), "{refused}");
}

#[test]
fn a_step_past_its_timeout_is_undone_as_maybe_done() {
    // The payment provider only ever fails transiently (some attempts after charging) and the
    // stage has attempts to spare: only the steps' 30 ms timeout, on the engine's timing wheel,
    // ends each charge. Stock is reserved beside it and released.
    let config = EngineConfig::builder()
        .stage("payment", StageSettings { attempts_max: Some(100), ..StageSettings::default() })
        .build()
        .expect("valid");
    let world = SimConfig { seed: 9, payment_failure_rate: 1.0, saga_step_timeout_ms: 30, ..SimConfig::default() };
    for sim in both(world) {
        let report = run(&config, &sim, 500);
        assert!(report.violations().is_empty(), "{:?}: {:?}", sim.flow, report.violations());
        assert_eq!(report.dead_letters.by_reason.get("expired").copied(), Some(500), "{:?}", report.dead_letters);
        assert_eq!(report.orders.dead_lettered, 500);
        assert_eq!(undone(&report, "charge"), 500, "{:?}: each timed-out charge refunded (maybe made)", sim.flow);
        assert_eq!(undone(&report, "reserve"), 500);
        assert!(report.ledger.charged_cents > 0, "some attempts charged before failing");
        assert_eq!(report.ledger.refunded_cents, report.ledger.charged_cents);
    }
}

#[test]
fn a_step_gives_up_after_the_tries_its_retry_policy_allows() {
    // The payment provider only ever fails transiently (some tries after charging) and the stage
    // has tries to spare: the steps' retry policy (two tries) ends each charge, which then counts
    // as timed out and is undone like one.
    let config = EngineConfig::builder()
        .stage(
            "payment",
            StageSettings { attempts_max: Some(100), retry_backoff_ms_max: Some(1), ..StageSettings::default() },
        )
        .build()
        .expect("valid");
    let world = SimConfig { seed: 9, payment_failure_rate: 1.0, saga_step_attempts: 2, ..SimConfig::default() };
    for sim in both(world) {
        let report = run(&config, &sim, 300);
        assert!(report.violations().is_empty(), "{:?}: {:?}", sim.flow, report.violations());
        assert_eq!(report.retries.by_stage.get("payment").copied(), Some(300), "{:?}: one retry a charge", sim.flow);
        assert_eq!(report.dead_letters.by_reason.get("rejected").copied(), Some(300), "{:?}", report.dead_letters);
        assert_eq!(report.orders.dead_lettered, 300);
        assert_eq!(undone(&report, "charge"), 300, "{:?}: each given-up charge refunded (maybe made)", sim.flow);
        assert_eq!(report.ledger.refunded_cents, report.ledger.charged_cents);
    }
    let refused = SimConfig { saga_step_attempts: 1_000_000, ..orchestrated(SimConfig::default()) }.validate();
    assert!(refused.expect_err("too many").to_string().contains("saga_step_attempts"));
}

#[test]
fn a_saga_that_cannot_be_undone_is_dead_lettered_with_its_story() {
    // No stock anywhere and no refund ever goes through: every charge must be undone and none
    // can be. Each saga is left stuck, and its dead letter tells where each step stands.
    let sim =
        orchestrated(SimConfig { seed: 4, out_of_stock_rate: 1.0, refund_failure_rate: 1.0, ..SimConfig::default() });
    let config = EngineConfig::builder()
        .stage(
            "compensation",
            StageSettings { attempts_max: Some(2), retry_backoff_ms_max: Some(1), ..StageSettings::default() },
        )
        .build()
        .expect("valid");
    let pipeline = orders::OrderPipeline::start(&config, &sim).expect("starts");
    let workload = orders::Workload::new(sim.seed, sim.skus, sim.customers);
    pipeline.submit_many(workload.take(200)).expect("accepted");
    let (report, letters) = pipeline.finish_with_dead_letters();
    let sagas = report.sagas.clone().expect("sagas");
    assert_eq!((sagas.stuck, sagas.compensated, sagas.completed), (200, 0, 0));
    assert_eq!(report.dead_letters.compensation_failures, 200);
    assert!(report.violations().iter().any(|v| v.contains("200 sagas stuck")), "{:?}", report.violations());
    assert_eq!(letters.len(), 200);
    for letter in &letters {
        assert_eq!(letter.stage, "compensation");
        assert!(letter.reason.contains("compensating charge failed"), "{}", letter.reason);
        assert!(
            letter.reason.contains("saga order: charge being compensated, reserve failed, ship not started"),
            "{}",
            letter.reason
        );
    }
}
