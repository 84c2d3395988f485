//! The bodies of the fuzz targets in `fuzz/`: each takes arbitrary bytes and panics only when
//! the code under test breaks a promise (a panic inside the code, a wrong answer against a model,
//! a broken invariant). cargo-fuzz drives them on nightly; `tests/fuzz_corpus.rs` replays the
//! checked-in corpus and every crash ever found on stable, so CI needs no nightly.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::log::{check_header, decode_frame, decode_frame_owned, encode_frame, Log, LogOptions, HEADER_LEN};
use crate::orders::{self, Histories, Order, OrderPipeline, PipelineFile, SimConfig, TopologyFile, Workload};
use crate::routing::{ExchangeBuilder, Pattern, KEY_BYTES_MAX};
use crate::EngineConfig;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the file names under `fuzz/fuzz_targets` and `fuzz/corpus`).
pub const TARGETS: [(&str, Target); 5] = [
    ("frame_bytes", frame_bytes),
    ("frame_body", frame_body),
    ("routing", routing),
    ("config", config),
    ("operations", operations),
];

/// Raw bytes as a stored frame: a typed error or a frame that re-encodes to an equal frame.
pub fn frame_bytes(data: &[u8]) {
    let Ok(archived) = decode_frame(data) else { return };
    let seq = u64::from(archived.seq);
    let frame = decode_frame_owned(seq, data).expect("a frame that validates deserializes");
    let mut bytes = Vec::new();
    encode_frame(&frame, &mut bytes);
    let again = decode_frame_owned(seq, &bytes).expect("a frame re-encoded reads back");
    assert_eq!(frame, again, "a frame must survive a round trip");
}

/// Raw bytes as a frame *body* behind a valid header (magic, version, length and checksum all
/// right), so every input reaches rkyv's validation: it must refuse or accept, never crash.
pub fn frame_body(data: &[u8]) {
    let mut bytes = Vec::with_capacity(HEADER_LEN + data.len());
    bytes.extend_from_slice(&crate::log::MAGIC);
    bytes.extend_from_slice(&crate::log::FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    let Ok(len) = u32::try_from(data.len()) else { return };
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    bytes.extend_from_slice(data);
    assert!(check_header(&bytes).is_ok(), "the header built here is valid");
    frame_bytes(&bytes);
}

/// Lines of text as binding patterns (before a blank line) and routing keys (after it): each
/// pattern compiles or is refused for length, each key matches as a simple model says, and the
/// compiled exchange table agrees with matching pattern by pattern.
pub fn routing(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (patterns, keys) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut builder = ExchangeBuilder::new();
    let mut compiled = Vec::new();
    for (queue, line) in patterns.lines().take(32).enumerate() {
        match Pattern::new(line) {
            Ok(pattern) => {
                builder.bind(line, queue).expect("a pattern that compiles binds");
                compiled.push((pattern, queue));
            }
            Err(_) => assert!(line.len() > KEY_BYTES_MAX, "only an over-long pattern is refused: {line:?}"),
        }
    }
    let mut routes = Vec::new();
    for line in keys.lines().take(32) {
        match builder.key(line) {
            Ok(route) => routes.push((route, line)),
            Err(_) => assert!(line.len() > KEY_BYTES_MAX, "only an over-long key is refused: {line:?}"),
        }
    }
    let exchange = builder.build();
    for (route, key) in routes {
        let mut expected: Vec<usize> = compiled
            .iter()
            .filter(|(pattern, _)| {
                let matched = pattern.matches(key);
                assert_eq!(matched, model_matches(pattern.as_str(), key), "{:?} against {key:?}", pattern.as_str());
                matched
            })
            .map(|&(_, queue)| queue)
            .collect();
        expected.dedup();
        let mut table = exchange.destinations(route).to_vec();
        table.sort_unstable();
        expected.sort_unstable();
        assert_eq!(table, expected, "the table's destinations for {key:?}");
    }
}

/// RabbitMQ topic matching written the plain recursive way (memoized), as the model for
/// [`Pattern::matches`]: `*` is exactly one word, `#` zero or more, words split on `.`.
#[must_use]
pub fn model_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str], memo: &mut Vec<Option<bool>>, width: usize) -> bool {
        let slot = p.len() * width + k.len();
        if let Some(known) = memo[slot] {
            return known;
        }
        let result = match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => go(rest, k, memo, width) || (!k.is_empty() && go(p, &k[1..], memo, width)),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..], memo, width),
            Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..], memo, width),
        };
        memo[slot] = Some(result);
        result
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    let width = k.len() + 1;
    go(&p, &k, &mut vec![None; (p.len() + 1) * width], width)
}

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
            let _ = EngineConfig::from_settings(settings);
        }
        for pattern in topology.routing().bindings.values().flatten() {
            let _ = Pattern::new(pattern);
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
    let _ = std::fs::remove_file(&path);
    let engine = EngineConfig::from_toml_str(
        "attempts_max = 2\nretry_backoff_ms_base = 0\nbatch_events_max = 16\nqueue_batches = 4\n",
    )
    .expect("a valid configuration");
    let mut sim = SimConfig { seed: 7, ..SimConfig::default() };
    let log = Arc::new(Log::open(&path, LogOptions::default()).expect("a scratch log opens"));
    let pipeline = OrderPipeline::start_with(&engine, &sim, Some(Arc::clone(&log)), None).expect("starts");
    let mut running = Some((pipeline, log));
    let (mut next_id, mut malformed) = (1u64, 0u64);
    // Drains the pipeline, closes the log (its file stays locked until the last handle is gone),
    // runs `between` on the reopened log, and resumes every order it left in flight.
    let restart =
        |running: &mut Option<(OrderPipeline, Arc<Log>)>, sim: &SimConfig, between: &dyn Fn(&Arc<Log>, &SimConfig)| {
            if let Some((pipeline, log)) = running.take() {
                let _ = pipeline.finish();
                log.close().expect("the log closes");
            }
            let log = Arc::new(Log::open_existing(&path, LogOptions::default()).expect("the log reopens"));
            between(&log, sim);
            let histories = Histories::read(&log).expect("the log reads");
            let pipeline =
                OrderPipeline::start_with(&engine, sim, Some(Arc::clone(&log)), Some(&histories)).expect("starts");
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
                let plan = orders::RedrivePlan {
                    selection: crate::dlq::Selection { all: true, ..Default::default() },
                    ..Default::default()
                };
                let report = orders::redrive(&engine, sim, log, &plan).expect("a redrive runs");
                let run = report.run.expect("not a dry run");
                assert!(run.violations().is_empty(), "redrive run: {:?}", run.violations());
            }),
        }
    }
    let (pipeline, log) = running.take().expect("running at the end");
    let report = pipeline.finish();
    assert_eq!(report.ledger.double_charges, 0);
    log.close().expect("the log closes");
    let histories = Histories::read(&log).expect("the log reads");
    let verify = histories.verify();
    assert!(verify.ok, "{verify:?}");
    assert_eq!(verify.orders, next_id - 1, "every acknowledged order is in the log");
    assert_eq!(verify.in_flight, 0, "every order is terminal");
    assert!(verify.dead_lettered >= malformed, "malformed orders end dead-lettered");
    drop(log);
    let _ = std::fs::remove_file(&path);
}

fn order(id: u64) -> Order {
    let sku = u32::try_from(id % 10).unwrap_or(0);
    Order { id, customer: 1 + id % 3, sku, quantity: 1, amount_cents: Workload::unit_price_cents(sku) }
}
