//! The bodies of the order application's fuzz targets in `fuzz/` (`config`, `operations`); the
//! engine's own targets are in `conduit::fuzz`. `tests/fuzz_corpus.rs` replays their corpus on
//! stable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use conduit::log::{Log, LogOptions};
use conduit::routing::{Pattern, KEY_BYTES_MAX};
use conduit::EngineConfig;

use crate::{Histories, Order, OrderPipeline, OrderRouting, PipelineFile, SimConfig, TopologyFile, Workload};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The order application's fuzz targets, by name.
pub const TARGETS: [(&str, Target); 2] = [("config", config), ("operations", operations)];

/// Text as configuration files: the pipeline file and the topology file each parse and validate
/// or give an error; what validates is within every limit and its bindings compile.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(file) = PipelineFile::from_toml_str(text) {
        if let Ok((engine, sim)) = file.validate() {
            for name in engine.overridden_stages() {
                engine.stage(name).validate(name).expect("a validated configuration is within its limits");
            }
            sim.validate().expect("validated once, valid again");
        }
    }
    if let Ok(topology) = TopologyFile::from_toml_str(text) {
        if let Some(settings) = &topology.engine {
            if let Ok(engine) = EngineConfig::from_settings(settings) {
                for name in engine.overridden_stages() {
                    engine.stage(name).validate(name).expect("settings that built a configuration are within limits");
                }
            }
        }
        for pattern in topology.routing().bindings.values().flatten() {
            // A pattern within the length limit always compiles; only length is a reason to refuse.
            match Pattern::new(pattern) {
                Ok(_) => assert!(pattern.len() <= KEY_BYTES_MAX, "{pattern:?} compiled past the limit"),
                Err(error) => assert!(pattern.len() > KEY_BYTES_MAX, "{pattern:?} refused: {error}"),
            }
        }
    }
}

/// Bytes as a sequence of operations on a journaled order pipeline: submit orders (some
/// malformed), change the simulated failure rates, restart (drain, close, reopen, recover), and
/// redrive every open dead letter. After all of them, the log must hold every acknowledged order,
/// each terminal, no history broken, no double charge, and the malformed ones dead-lettered.
///
/// # Panics
/// When an invariant breaks, or the scratch log cannot be created.
pub fn operations(data: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let path: PathBuf = std::env::temp_dir().join(format!(
        "conduit-fuzz-ops-{}-{}.redb",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let books = path.with_extension("payments");
    for stale in [&path, &books] {
        if stale.exists() {
            std::fs::remove_file(stale).expect("a stale scratch file is removed");
        }
    }
    let engine = EngineConfig::from_toml_str(
        "attempts_max = 2\nretry_backoff_ms_base = 0\nbatch_events_max = 16\nqueue_batches = 4\n",
    )
    .expect("a valid configuration");
    // The payment provider keeps its own books in a file beside the log: they outlive every
    // restart, and the final check reads them.
    let mut sim = SimConfig { seed: 7, payment_books: Some(books.clone()), ..SimConfig::default() };
    let start = |sim: &SimConfig, log: &Arc<Log>, restore: Option<&Histories>| {
        let provider = crate::open_provider(sim).expect("the provider's books open").expect("kept in a file");
        OrderPipeline::start_with_provider(
            &engine,
            sim,
            &OrderRouting::default(),
            Some(Arc::clone(log)),
            restore,
            provider,
        )
        .expect("starts")
    };
    let log = Arc::new(Log::open(&path, LogOptions::default()).expect("a scratch log opens"));
    let pipeline = start(&sim, &log, None);
    let mut running = Some((pipeline, log));
    let (mut next_id, mut malformed) = (1u64, 0u64);
    // Drains the pipeline, closes the log (its file stays locked until the last handle is gone),
    // runs `between` on the reopened log, and resumes every order it left in flight.
    let restart =
        |running: &mut Option<(OrderPipeline, Arc<Log>)>, sim: &SimConfig, between: &dyn Fn(&Arc<Log>, &SimConfig)| {
            if let Some((pipeline, log)) = running.take() {
                assert_eq!(pipeline.finish().ledger.double_charges, 0, "no double charge before a restart");
                log.close().expect("the log closes");
            }
            let log = Arc::new(Log::open_existing(&path, LogOptions::default()).expect("the log reopens"));
            between(&log, sim);
            let histories = Histories::read(&log).expect("the log reads");
            let pipeline = start(sim, &log, Some(&histories));
            pipeline.resume(&histories).expect("resumes");
            *running = Some((pipeline, log));
        };
    for &op in data.iter().take(48) {
        let arg = u64::from(op >> 3);
        let pipeline = &running.as_ref().expect("running between operations").0;
        match op & 7 {
            0..=2 => {
                let orders: Vec<Order> = (0..=arg % 8).map(|i| order(next_id + i)).collect();
                next_id += orders.len() as u64;
                pipeline.submit_many(orders).expect("the pipeline takes orders");
            }
            3 => {
                let mut bad = order(next_id);
                (bad.quantity, bad.amount_cents) = (0, 0);
                next_id += 1;
                malformed += 1;
                pipeline.submit(bad).expect("the pipeline takes orders");
            }
            4 => {
                let rate = f64::from(u8::try_from(arg).unwrap_or(0) % 5) / 4.0;
                sim.payment_failure_rate = rate;
                sim.notify_failure_rate = rate / 2.0;
            }
            5 => restart(&mut running, &sim, &|_, _| {}),
            _ => restart(&mut running, &sim, &|log, sim| {
                let plan = crate::RedrivePlan {
                    selection: conduit::dlq::Selection { all: true, ..Default::default() },
                    ..Default::default()
                };
                let report = crate::redrive(&engine, sim, log, &plan).expect("a redrive runs");
                let run = report.run.expect("not a dry run");
                assert!(run.violations().is_empty(), "redrive run: {:?}", run.violations());
            }),
        }
    }
    let (pipeline, log) = running.take().expect("running at the end");
    let report = pipeline.finish();
    assert_eq!(report.ledger.double_charges, 0);
    log.close().expect("the log closes");
    let provider = crate::open_provider(&sim).expect("the provider's books open").expect("kept in a file");
    let verify = crate::verify_with_provider(&log, &provider).expect("the log reads");
    assert!(verify.ok, "{verify:?}");
    assert_eq!(verify.orders, next_id - 1, "every acknowledged order is in the log");
    assert_eq!(verify.in_flight, 0, "every order is terminal");
    assert!(verify.dead_lettered >= malformed, "malformed orders end dead-lettered");
    drop((log, provider));
    for scratch in [&path, &books] {
        std::fs::remove_file(scratch).expect("the scratch files are removed");
    }
}

fn order(id: u64) -> Order {
    let sku = u32::try_from(id % 10).unwrap_or(0);
    Order { id, customer: 1 + id % 3, sku, quantity: 1, amount_cents: Workload::unit_price_cents(sku) }
}
