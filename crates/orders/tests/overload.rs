//! Overload: producers far faster than the pipeline, for a bounded time. Memory stays within the
//! queues' bound, `submit` blocks and `try_submit` refuses instead of buffering, and every order
//! accepted finishes: nothing accepted is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::{EngineConfig, TrySubmitError};
use conduit_orders::{Order, OrderPipeline, SimConfig, Workload};

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[test]
fn producers_faster_than_the_pipeline_are_held_back_and_lose_nothing() {
    // Payment calls sleep 50 us: the pipeline drains a few thousand orders a second, while each
    // producer could offer millions.
    let sim = SimConfig { payment_latency_us: 50, ..SimConfig::default() };
    let config = EngineConfig::builder().queue_batches(16).batch_events_max(64).build().expect("valid");
    let pipeline = Arc::new(OrderPipeline::start(&config, &sim).expect("starts"));
    let stop = Arc::new(AtomicBool::new(false));
    let (accepted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ids = Arc::new(AtomicU64::new(1));
    // Ids are handed out once; an order refused is offered again until it is taken.
    let order = |id: u64| {
        let mut order = Workload::new(id, 100, 1_000).next().expect("endless");
        order.id = id;
        order
    };
    let mut producers = Vec::new();
    // Two blocking producers: more senders waiting on the entry stage's full queue than it has
    // workers, so counting a waiting batch as queued would show past the one-batch-per-worker
    // overshoot allowed below.
    for blocking in [true, true, false] {
        let (pipeline, stop, accepted, refused, ids) =
            (Arc::clone(&pipeline), Arc::clone(&stop), Arc::clone(&accepted), Arc::clone(&refused), Arc::clone(&ids));
        producers.push(std::thread::spawn(move || {
            let mut pending: Option<Order> = None;
            while !stop.load(Ordering::Relaxed) {
                if blocking {
                    // Whole batches (the queues are bounded in batches of 64): the slow stage's
                    // queue then fills with full batches, and its depth in events shows it.
                    let first = ids.fetch_add(64, Ordering::Relaxed);
                    let taken = pipeline.submit_many((first..first + 64).map(order)).expect("healthy");
                    accepted.fetch_add(taken, Ordering::Relaxed);
                    continue;
                }
                let next = pending.take().unwrap_or_else(|| order(ids.fetch_add(1, Ordering::Relaxed)));
                match pipeline.try_submit(next) {
                    Ok(_accepted_now) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySubmitError::Full(back)) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        pending = Some(back);
                        std::thread::yield_now();
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
            // An order handed back and never accepted is not the pipeline's: it was refused.
        }));
    }
    let started = Instant::now();
    let rss_start = rss_bytes();
    let mut rss_peak = rss_start.unwrap_or(0);
    let mut deepest = std::collections::BTreeMap::new();
    while started.elapsed() < Duration::from_millis(1_500) {
        for stage in pipeline.engine().snapshot().stages {
            // The uncapped count: an overshoot past the queue's bound must be visible here.
            let counted = stage.queue_depth_counted;
            let overshoot = counted.saturating_sub(stage.queue_capacity as u64);
            assert!(
                overshoot <= stage.workers as u64 * 64,
                "stage {}: {counted} events counted in a queue of {}: more than one batch per worker over",
                stage.name,
                stage.queue_capacity
            );
            let deepest = deepest.entry(stage.name.clone()).or_insert((0, stage.queue_capacity));
            deepest.0 = deepest.0.max(counted);
        }
        rss_peak = rss_peak.max(rss_bytes().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.join().expect("producer");
    }
    let pipeline = Arc::into_inner(pipeline).expect("the producers are gone");
    let report = pipeline.finish();
    let accepted = accepted.load(Ordering::Relaxed);
    assert_eq!(report.orders.submitted, accepted, "every accepted order entered the pipeline");
    assert!(report.violations().is_empty(), "{:?}", report.violations());
    assert_eq!(report.orders.in_flight, 0);
    // The non-blocking producer alone offered over ten times what the pipeline took in all.
    let refused = refused.load(Ordering::Relaxed);
    println!("accepted {accepted}, refused {refused}; deepest queues (depth, capacity): {deepest:?}");
    let (payment_deepest, payment_capacity) = deepest["payment"];
    assert!(
        payment_deepest * 2 >= payment_capacity as u64,
        "the slow stage's queue filled up (backpressure, not buffering): {deepest:?}"
    );
    assert!(refused > 10 * accepted, "the producers were not 10x faster: {refused} refused, {accepted} accepted");
    if let Some(start) = rss_start {
        let growth_mib = rss_peak.saturating_sub(start) as f64 / f64::from(1 << 20);
        assert!(growth_mib < 64.0, "memory grew {growth_mib:.1} MiB under overload");
    }
}
