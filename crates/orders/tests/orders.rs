//! The reference order pipeline: every order ends in exactly one terminal state, the books
//! balance, and the outcome depends on the seed alone, whatever the pool and batch sizes.

use conduit::{EngineConfig, StageSettings, TrySubmitError};
use conduit_orders::{self as orders, Order, OrderPipeline, SimConfig};
use proptest::prelude::*;

fn engine(workers: usize, batch: usize, queue: usize) -> EngineConfig {
    EngineConfig::builder().workers(workers).batch_events_max(batch).queue_batches(queue).build().expect("valid")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random failure rates, stock and engine shapes: the run always balances.
    #[test]
    fn every_order_reaches_one_terminal_state(
        seed in any::<u64>(),
        payment_failure_rate in 0.0..0.9f64,
        payment_decline_rate in 0.0..0.2f64,
        inventory_failure_rate in 0.0..0.5f64,
        notify_failure_rate in 0.0..0.5f64,
        out_of_stock_rate in 0.0..0.5f64,
        stock_per_sku in 0u32..40,
        workers in 1usize..4,
        batch in 1usize..300,
        queue in 1usize..8,
    ) {
        let sim = SimConfig {
            seed,
            skus: 50,
            stock_per_sku,
            payment_failure_rate,
            payment_decline_rate,
            inventory_failure_rate,
            notify_failure_rate,
            out_of_stock_rate,
            ..SimConfig::default()
        };
        let report = orders::run(&engine(workers, batch, queue), &sim, 3_000, None, |_, _| {}).expect("runs");
        prop_assert!(report.violations().is_empty(), "seed {seed}: {:?}", report.violations());
        prop_assert_eq!(report.orders.submitted, 3_000);
        prop_assert_eq!(report.ledger.double_charges, 0);
        // Each confirmed order was notified on both channels, exactly once each.
        let notified = &report.notifications;
        let notify_dead = report.dead_letters.by_stage.get("email").copied().unwrap_or(0)
            + report.dead_letters.by_stage.get("sms").copied().unwrap_or(0);
        prop_assert_eq!(notified.email_sent + notified.sms_sent + notify_dead, 2 * report.orders.confirmed);
    }
}

#[test]
fn outcomes_depend_on_the_seed_not_on_the_engine_shape() {
    let sim = SimConfig {
        seed: 11,
        payment_failure_rate: 0.4,
        payment_decline_rate: 0.05,
        inventory_failure_rate: 0.2,
        out_of_stock_rate: 0.1,
        ..SimConfig::default()
    };
    let run = |config: &EngineConfig| orders::run(config, &sim, 20_000, None, |_, _| {}).expect("runs");
    let narrow = run(&engine(1, 1, 2));
    let wide = run(&engine(3, 512, 16));
    assert!(narrow.violations().is_empty() && wide.violations().is_empty());
    assert_eq!(narrow.orders, wide.orders);
    assert_eq!(narrow.ledger, wide.ledger);
    assert!(narrow.orders.confirmed > 0 && narrow.orders.cancelled_out_of_stock > 0);
    assert!(narrow.orders.cancelled_declined > 0 && narrow.orders.dead_lettered > 0);
    assert!(narrow.ledger.idempotent_replays > 0, "timeouts after charging were retried");
}

#[test]
fn failure_heavy_run_compensates_every_dead_lettered_order() {
    let sim = SimConfig { seed: 5, payment_failure_rate: 0.9, out_of_stock_rate: 0.3, ..SimConfig::default() };
    let config = EngineConfig::builder()
        .stage("payment", StageSettings { attempts_max: Some(2), ..StageSettings::default() })
        .build()
        .expect("valid");
    let report = orders::run(&config, &sim, 5_000, None, |_, _| {}).expect("runs");
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    assert!(report.orders.dead_lettered > 3_000, "most orders exhaust two attempts at 90% failure");
    assert!(report.ledger.refunded_cents > 0, "charges hidden by timeouts were refunded");
    assert_eq!(report.dead_letters.by_stage.get("payment").copied(), Some(report.orders.dead_lettered));
    assert_eq!(report.dead_letters.compensation_failures, 0);
}

#[test]
fn invalid_orders_are_dead_lettered_by_the_order_stage() {
    let pipeline = OrderPipeline::start(&EngineConfig::default(), &SimConfig::default()).expect("starts");
    let good = Order { id: 1, customer: 1, sku: 3, quantity: 1, amount_cents: 250 };
    pipeline.submit(good).expect("open");
    pipeline.submit(Order { id: 2, quantity: 0, ..good }).expect("open");
    let letters_before_finish = pipeline.dead_letters().len();
    let report = pipeline.finish();
    assert!(letters_before_finish <= 1);
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    assert_eq!((report.orders.confirmed, report.orders.dead_lettered), (1, 1));
    assert_eq!(report.dead_letters.by_stage.get("order").copied(), Some(1));
}

#[test]
fn try_submit_hands_the_order_back_instead_of_dropping_it() {
    // Slow payment calls and a tiny queue make the entry queue fill up quickly.
    let sim = SimConfig { payment_latency_us: 2_000, ..SimConfig::default() };
    let pipeline = OrderPipeline::start(&engine(1, 1, 1), &sim).expect("starts");
    let mut workload = orders::Workload::new(1, 10, 10);
    let mut accepted = 0u64;
    let mut refused = None;
    for _ in 0..1_000 {
        let order = workload.next().expect("endless");
        match pipeline.try_submit(order) {
            Ok(_accepted_now) => accepted += 1,
            Err(error) => {
                refused = Some((order, error));
                break;
            }
        }
    }
    let (order, error) = refused.expect("a one-slot queue behind a slow stage fills up");
    assert!(matches!(error, TrySubmitError::Full(back) if back == order));
    let report = pipeline.finish();
    assert_eq!(report.orders.submitted, accepted);
    assert_eq!(report.orders.confirmed, accepted, "every accepted order was processed");
}

#[test]
fn rebound_and_ordered_stages_still_balance() {
    let routing = orders::TopologyFile::from_toml_str(
        "ordered_by_key = [\"payment\", \"inventory\"]\n[bindings]\nemail = [\"order.#.confirmed\"]\nsms = [\"#.notify.#\"]\n",
    )
    .expect("valid topology")
    .routing();
    let sim = SimConfig { payment_failure_rate: 0.3, out_of_stock_rate: 0.1, ..SimConfig::default() };
    let report = orders::run_routed(&engine(3, 64, 4), &sim, &routing, 20_000, None, |_, _| {}).expect("runs");
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    assert_eq!(report.notifications.email_sent, report.orders.confirmed);
    assert_eq!(report.notifications.sms_sent, report.orders.confirmed);
}

#[test]
fn the_fraud_check_runs_over_request_reply_and_its_timeouts_are_retries() {
    let sim = SimConfig { fraud_check: true, fraud_deny_rate: 0.1, seed: 9, ..SimConfig::default() };
    let report = orders::run(&engine(2, 64, 4), &sim, 5_000, None, |_, _| {}).expect("runs");
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    let denied = report.orders.cancelled_declined;
    assert!((350..650).contains(&denied), "about a tenth denied: {denied}");
    let fraud = report.fraud_check.expect("the fraud service ran");
    assert_eq!((fraud.calls, fraud.replies, fraud.timeouts), (5_000, 5_000, 0));

    // A fraud service slower than the payment stage waits: every call times out, is retried,
    // and the order ends dead-lettered (and compensated) instead of hanging the stage.
    let slow = SimConfig { fraud_check: true, fraud_latency_us: 3_000, fraud_timeout_us: 300, ..SimConfig::default() };
    let report = orders::run(&engine(1, 16, 4), &slow, 40, None, |_, _| {}).expect("runs");
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    // Nearly every call times out; one whose reply lands just as its caller gives up is still
    // taken (the reply did arrive), so only the totals are exact.
    assert!(report.orders.dead_lettered > 0, "orders whose every check timed out are dead-lettered");
    let fraud = report.fraud_check.expect("the fraud service ran");
    assert!(fraud.timeouts > 0);
    assert_eq!(fraud.calls, fraud.replies + fraud.timeouts, "every call ends in a reply or a timeout");
    assert!(fraud.late_replies > 0, "replies after the timeout are dropped and counted");
}

#[test]
fn circuit_breakers_open_under_failures_and_defer_work_without_spending_attempts() {
    let sim = SimConfig {
        payment_failure_rate: 0.6,
        notify_failure_rate: 0.5,
        breaker_failures: 3,
        breaker_open_ms: 2,
        seed: 4,
        ..SimConfig::default()
    };
    let report = orders::run(&engine(1, 64, 4), &sim, 1_500, None, |_, _| {}).expect("runs");
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    let payment = &report.breakers["payment"];
    assert!(payment.trips > 0, "the payment breaker opened");
    assert!(payment.trials > 0 && payment.recoveries > 0, "it let trials through and closed again: {payment:?}");
    assert!(payment.trials >= payment.recoveries && payment.trips >= payment.trials);
    let deferred = report.stages.iter().find(|s| s.name == "payment").map_or(0, |s| s.deferred);
    assert!(deferred > 0, "work waited while the breaker was open");
    assert!(report.breakers["email"].trips > 0 && report.breakers["sms"].trips > 0);
    let no_breakers =
        orders::run(&engine(1, 64, 4), &SimConfig { breaker_failures: 0, ..sim.clone() }, 1_500, None, |_, _| {})
            .expect("runs");
    assert!(no_breakers.breakers.is_empty());

    // The engine's own snapshot shows the breakers too, while the pipeline runs.
    let pipeline = orders::OrderPipeline::start(&engine(1, 64, 4), &sim).expect("starts");
    let watched = pipeline.engine().snapshot().breakers;
    assert_eq!(watched.keys().map(String::as_str).collect::<Vec<_>>(), ["email", "inventory", "payment", "sms"]);
    let finished = pipeline.finish();
    assert!(finished.violations().is_empty(), "{:?}", finished.violations());
}
