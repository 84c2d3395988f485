//! The bodies of the order application's fuzz targets in `fuzz/` (`config`, `operations`,
//! `operations_file`); the engine's own targets are in `conduit::fuzz`. `tests/fuzz_corpus.rs`
//! replays their corpus on stable.

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
pub const TARGETS: [(&str, Target); 3] =
    [("config", config), ("operations", operations), ("operations_file", operations_file)];

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

/// Bytes as a simulated run of the order pipeline on the real log, on an in-memory disk
/// ([`crate::simulate_bytes`]): the first eight bytes pick the world, each later byte an action
/// (submit orders, commit, cut the power between commits or during one, take steps). Every
/// invariant the simulation checks must hold: every acknowledged order finished exactly once, the
/// log verifies after checkpoints, retention and torn commits, and the payment provider's books,
/// which outlive every cut, show each order paid what its outcome says and none twice. One
/// thread, no files, no waiting on a clock: thousands of inputs a second.
///
/// # Panics
/// When an invariant breaks.
pub fn operations(data: &[u8]) {
    if let Err(failure) = crate::simulate_bytes(data) {
        panic!("{failure}");
    }
}

/// Bytes as operations on the threaded order pipeline with its log in a redb file (fsynced
/// commits) and the payment provider's books in a file beside it, in the temporary directory:
/// submit orders (some malformed), change the simulated failure rates, restart (drain, close,
/// reopen, recover), and redrive every open dead letter. After all of them, the log must hold
/// every acknowledged order, each terminal, no history broken, and the malformed ones
/// dead-lettered; the provider's books, which outlive every restart, must show every order
/// charged what its outcome says and none twice. Slow (files, threads): for the long tier.
///
/// # Panics
/// When an invariant breaks, or the scratch files cannot be created or removed.
pub fn operations_file(data: &[u8]) {
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
    let mut sim = SimConfig { seed: 7, ..SimConfig::default() };
    // The payment provider as `sim` configures it, reading the books every earlier one wrote.
    let provider =
        |sim: &SimConfig| Arc::new(sim.payment_gateway().with_books(&books).expect("the provider's books open"));
    let start = |sim: &SimConfig, log: &Arc<Log>, restore: Option<&Histories>| {
        OrderPipeline::start_with_provider(
            &engine,
            sim,
            &OrderRouting::default(),
            Some(Arc::clone(log)),
            restore,
            provider(sim),
        )
        .expect("starts")
    };
    let log = Arc::new(Log::open(&path, LogOptions::default()).expect("a scratch log opens"));
    let pipeline = start(&sim, &log, None);
    let mut running = Some((pipeline, log));
    let (mut next_id, mut malformed) = (1u64, 0u64);
    for &op in data.iter().take(48) {
        let arg = u64::from(op >> 3);
        let pipeline = &running.as_ref().expect("running between operations").0;
        match op & 7 {
            0..=2 => {
                let orders: Vec<Order> = (0..=arg % 8).map(|i| order(next_id + i)).collect();
                next_id += orders.len() as u64;
                pipeline.submit_many(orders).expect("the pipeline takes orders");
                continue;
            }
            3 => {
                let mut bad = order(next_id);
                (bad.quantity, bad.amount_cents) = (0, 0);
                next_id += 1;
                malformed += 1;
                pipeline.submit(bad).expect("the pipeline takes orders");
                continue;
            }
            4 => {
                let rate = f64::from(u8::try_from(arg).unwrap_or(0) % 5) / 4.0;
                sim.payment_failure_rate = rate;
                sim.notify_failure_rate = rate / 2.0;
                continue;
            }
            _ => {}
        }
        // Drain and close (the file stays locked until the last handle is gone), reopen,
        // redrive every open dead letter (6 and 7), resume what the log left in flight.
        let (pipeline, log) = running.take().expect("running");
        assert_eq!(pipeline.finish().ledger.double_charges, 0, "no double charge before a restart");
        log.close().expect("the log closes");
        drop(log);
        let log = Arc::new(Log::open_existing(&path, LogOptions::default()).expect("the log reopens"));
        if op & 7 >= 6 {
            let plan = crate::RedrivePlan {
                selection: conduit::dlq::Selection { all: true, ..Default::default() },
                ..Default::default()
            };
            let report = crate::redrive_with_provider(&engine, &sim, &log, &plan, Some(&provider(&sim)))
                .expect("a redrive runs");
            let run = report.run.expect("not a dry run");
            assert!(run.violations().is_empty(), "redrive run: {:?}", run.violations());
        }
        let histories = Histories::read(&log).expect("the log reads");
        let pipeline = start(&sim, &log, Some(&histories));
        pipeline.resume(&histories).expect("resumes");
        running = Some((pipeline, log));
    }
    let (pipeline, log) = running.take().expect("running at the end");
    let report = pipeline.finish();
    assert_eq!(report.ledger.double_charges, 0);
    log.close().expect("the log closes");
    let provider = provider(&sim);
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
