//! Dead letters in the log: listed with their story, redriven (each redrive logged first, a
//! failed redrive back in the dead letters with its history), purged; and duplicates of an
//! order's events never repeat an effect.

use std::sync::Arc;

use conduit::dlq::{DeadLetterIndex, DeadLetterState, Selection};
use conduit::log::{Log, LogOptions};
use conduit::{DeadLetterKind, EngineConfig, Envelope};
use conduit_orders::{self as orders, names, Histories, OrderEvent, OrderPipeline, RedrivePlan, SimConfig, Step};

fn engine() -> EngineConfig {
    EngineConfig::from_toml_str("attempts_max = 3\nretry_backoff_ms_base = 0\nbatch_events_max = 64\n").expect("valid")
}

fn open(path: &std::path::Path) -> Arc<Log> {
    Arc::new(Log::open(path, LogOptions::default()).expect("opens"))
}

/// Closes the log and opens it again, as each `conduit` command does.
fn reopen(log: Arc<Log>) -> Arc<Log> {
    log.close().expect("closes");
    let path = log.path().to_owned();
    drop(log);
    Arc::new(Log::open_existing(path, LogOptions::default()).expect("reopens"))
}

fn redrive_all(log: &Arc<Log>, sim: &SimConfig) -> orders::RedriveReport {
    let plan = RedrivePlan { selection: Selection { all: true, ..Selection::default() }, ..RedrivePlan::default() };
    let report = orders::redrive(&engine(), sim, log, &plan).expect("redrives");
    let run = report.run.as_ref().expect("not a dry run");
    assert!(run.violations().is_empty(), "{:?}", run.violations());
    assert!(report.verify.as_ref().is_some_and(|v| v.ok), "{:?}", report.verify);
    report
}

#[test]
fn redriven_orders_finish_and_a_failed_redrive_returns_with_its_history() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orders.redb");
    let log = open(&path);
    // Every payment fails: every order but the malformed ones dies at payment, compensated.
    let failing = SimConfig { payment_failure_rate: 1.0, poison_rate: 0.05, seed: 11, ..SimConfig::default() };
    let run = orders::run(&engine(), &failing, 400, Some(Arc::clone(&log)), |_, _| {}).expect("runs");
    assert!(run.violations().is_empty(), "{:?}", run.violations());
    let poisoned = run.orders.poisoned.expect("generated here");
    assert!(poisoned > 0 && run.orders.dead_lettered == 400);
    let log = reopen(log);

    let index = DeadLetterIndex::read(&log).expect("reads");
    assert_eq!(index.all().len(), 400);
    let by_kind = index.open_by_kind();
    assert_eq!(by_kind.get("malformed").copied(), Some(poisoned));
    assert_eq!(by_kind.get("retries_exhausted").copied(), Some(400 - poisoned));
    let payment = index.select(&Selection { kind: Some(DeadLetterKind::RetriesExhausted), ..Selection::default() });
    let letter = payment[0];
    assert_eq!((letter.attempts, letter.note.errors.len()), (3, 3), "the error chain of every attempt");
    assert!(letter.note.errors.iter().all(|e| e.contains("payment")), "{:?}", letter.note.errors);
    assert!(letter.note.first_failure_us > 0 && letter.note.first_failure_us <= letter.note.last_failure_us);

    // A dry run changes nothing.
    let dry = RedrivePlan {
        selection: Selection { all: true, ..Selection::default() },
        dry_run: true,
        ..RedrivePlan::default()
    };
    let planned = orders::redrive(&engine(), &SimConfig::default(), &log, &dry).expect("plans");
    assert_eq!((planned.redriven.len(), planned.run.is_none()), (400, true));
    assert_eq!(DeadLetterIndex::read(&log).expect("reads").select(&dry.selection).len(), 400);
    let log = reopen(log);

    // The gateway is back: the payment dead letters go through; the malformed fail again.
    let report = redrive_all(&log, &SimConfig { seed: 11, ..SimConfig::default() });
    assert_eq!((report.redriven.len(), report.dead_lettered_again), (400, poisoned));
    let run = report.run.as_ref().expect("ran");
    assert_eq!((run.orders.confirmed, run.orders.dead_lettered), (400 - poisoned, poisoned));
    assert_eq!(run.ledger.double_charges, 0);
    assert!(report.redriven.iter().all(|item| item.generation == 1));

    let index = DeadLetterIndex::read(&log).expect("reads");
    let open = index.select(&Selection { all: true, ..Selection::default() });
    assert_eq!(open.len() as u64, poisoned, "only the malformed are open again");
    let again = open[0];
    let history = index.history(again.stream);
    assert_eq!(history.len(), 2, "the first dead letter is kept, redriven");
    assert!(matches!(history[0].state, DeadLetterState::Redriven { .. }));
    assert_eq!(history[1].id, again.id);
    assert_eq!(OrderEvent::decode(&again.payload).map(|e| (e.step, e.generation)), Some((Step::Place, 1)));

    // Purge them: they leave the list and stay in the log.
    let purged = conduit::dlq::purge(&log, &open).expect("purges");
    assert_eq!(purged, poisoned);
    let index = DeadLetterIndex::read(&log).expect("reads");
    assert!(index.select(&Selection { all: true, ..Selection::default() }).is_empty());
    assert_eq!(index.all().len() as u64, 400 + poisoned);
    let verify = Histories::read(&log).expect("reads").verify();
    assert!(verify.ok, "{verify:?}");
    assert_eq!((verify.confirmed, verify.dead_lettered), (400 - poisoned, poisoned));
}

#[test]
fn a_notification_dead_letter_redrives_into_its_own_stage_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir.path().join("notify.redb"));
    let silent = SimConfig { notify_failure_rate: 1.0, seed: 5, ..SimConfig::default() };
    let run = orders::run(&engine(), &silent, 50, Some(Arc::clone(&log)), |_, _| {}).expect("runs");
    assert_eq!((run.orders.confirmed, run.dead_letters.total), (50, 100), "confirmed, neither notice sent");
    let log = reopen(log);

    let plan = RedrivePlan {
        selection: Selection { stage: names::index_of(names::EMAIL), ..Selection::default() },
        ..RedrivePlan::default()
    };
    let report = orders::redrive(&engine(), &SimConfig::default(), &log, &plan).expect("redrives");
    assert_eq!(report.redriven.len(), 50);
    let run = report.run.expect("ran");
    assert!(run.violations().is_empty(), "{:?}", run.violations());
    assert_eq!((run.notifications.email_sent, run.notifications.sms_sent), (50, 0));
    assert_eq!(run.ledger.charged_cents, run.ledger.confirmed_total_cents, "no order charged again");
    let index = DeadLetterIndex::read(&log).expect("reads");
    let open = index.select(&Selection { all: true, ..Selection::default() });
    assert!(open.len() == 50 && open.iter().all(|l| l.stage == names::index_of(names::SMS).unwrap_or(0)));
    // An already redriven letter is not open: naming it selects nothing.
    let redriven = Selection { ids: vec![report.redriven[0].id], ..Selection::default() };
    assert!(index.select(&redriven).is_empty());
}

#[test]
fn duplicate_deliveries_never_repeat_an_effect() {
    let pipeline = OrderPipeline::start(&engine(), &SimConfig::default()).expect("starts");
    let orders: Vec<_> = orders::Workload::new(3, 100, 100).take(200).collect();
    pipeline.submit_many(orders.iter().copied()).expect("open");
    // Every order's charge, reservation and notifications delivered twice more, as a broker
    // redelivering after a lost acknowledgement would.
    let engine = pipeline.engine();
    for (stage, step) in
        [(names::PAYMENT, Step::Charge), (names::INVENTORY, Step::Reserve), (names::EMAIL, Step::Notify)]
    {
        let id = engine.stage_id(stage).expect("declared");
        let duplicates = orders.iter().flat_map(|&order| {
            let event = OrderEvent { step, ..OrderEvent::place(order) };
            let envelope = Envelope {
                key: order.id,
                seq: 0,
                cause: 0,
                attempt: 0,
                slot: 0,
                token: 0,
                deadline: conduit::Deadline::NEVER,
                msg: event,
            };
            [envelope.clone(), envelope]
        });
        engine.inject_many(id, duplicates).expect("open");
    }
    let report = pipeline.finish();
    assert_eq!(report.orders.confirmed, 200, "each order confirmed once");
    assert_eq!(report.ledger.double_charges, 0);
    assert_eq!(report.ledger.charged_cents, report.ledger.confirmed_total_cents, "each order charged once");
    assert_eq!(report.stock.reserved_units, report.stock.confirmed_units, "each order reserved once");
    assert_eq!((report.notifications.email_sent, report.notifications.sms_sent), (200, 200), "one of each");
    assert!(report.notifications.duplicates_suppressed >= 400);
    assert!(report.ledger.idempotent_replays >= 400);
}

/// A saga's dead letter ended the saga, its completed steps undone: a redrive says so and leaves
/// it, and the log still verifies.
#[test]
fn a_sagas_dead_letter_is_not_redriven() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir.path().join("sagas.redb"));
    let sim = SimConfig { payment_failure_rate: 1.0, flow: orders::Flow::Orchestrated, ..SimConfig::default() };
    let report = orders::run(&engine(), &sim, 50, Some(Arc::clone(&log)), |_, _| {}).expect("runs");
    assert_eq!(report.orders.dead_lettered, 50, "every charge ran out of tries");
    let log = reopen(log);
    let redriven = redrive_all(&log, &sim);
    assert!(redriven.redriven.is_empty(), "{:?}", redriven.redriven);
    assert_eq!(redriven.skipped.len(), 50);
    assert!(redriven.skipped.iter().all(|why| why.contains("its order ran a saga")), "{:?}", redriven.skipped);
}
