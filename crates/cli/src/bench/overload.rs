//! Memory under overload: a producer far faster than the pipeline drains.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use conduit::EngineConfig;
use conduit_orders::{self as orders, SimConfig};
use serde::Serialize;

use super::{engine_memory, workload};

/// Memory under overload: a producer far faster than the pipeline drains.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Orders pushed.
    pub orders: u64,
    /// How fast the producer hands orders to a pipeline running at full speed (orders/s).
    pub producer_orders_per_sec: f64,
    /// How fast the pipeline drained them (orders/s).
    pub drain_orders_per_sec: f64,
    /// `producer / drain`.
    pub overload_factor: f64,
    /// Resident memory once every queue had filled (MiB).
    pub steady_rss_mib: f64,
    /// Largest resident memory sampled after that (MiB).
    pub peak_rss_mib: f64,
    /// `peak - steady` (MiB); the goal is at most 64.
    pub growth_mib: f64,
    /// Events all stage queues hold at most together.
    pub queue_capacity_events: u64,
}

/// The resident set size of this process, from `/proc/self/status` (Linux only).
pub(super) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Pushes `orders` into a pipeline whose payment calls sleep 10 us (about 60 us in practice), from a producer
/// that never pauses, sampling resident memory every 10 ms. `None` where `/proc` is missing.
pub fn overload_memory(config: &EngineConfig, orders: u64) -> Option<MemoryReport> {
    rss_bytes()?;
    let sim = SimConfig { payment_latency_us: 10, ..SimConfig::default() };
    let workload = workload(42, orders);
    // What the producer can push: the same orders through the pipeline at full speed.
    let producer_rate = orders as f64 / engine_memory(config, &workload).as_secs_f64().max(1e-9);
    let pipeline = orders::OrderPipeline::start(config, &sim).expect("the bench's engine configuration was validated");
    let capacity: u64 = pipeline.engine().snapshot().stages.iter().map(|s| s.queue_capacity as u64).sum();
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let samples = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.push((start.elapsed(), rss_bytes().unwrap_or(0)));
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        });
        for chunk in workload.chunks(1_024) {
            pipeline.submit_many(chunk.iter().copied()).expect("the engine is healthy during a bench");
        }
        let report = pipeline.finish();
        done.store(true, Ordering::Relaxed);
        assert!(report.violations().is_empty(), "overload run broke an invariant: {:?}", report.violations());
        sampler.join().expect("sampler")
    });
    let elapsed = start.elapsed();
    // Steady state: once the first tenth of the run has passed, every queue is full.
    let settle = elapsed / 10;
    let steady = samples.iter().find(|(t, _)| *t >= settle).map_or(0, |(_, rss)| *rss);
    let peak = samples.iter().filter(|(t, _)| *t >= settle).map(|(_, rss)| *rss).max().unwrap_or(steady);
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let drain_rate = orders as f64 / elapsed.as_secs_f64().max(1e-9);
    Some(MemoryReport {
        orders,
        producer_orders_per_sec: producer_rate,
        drain_orders_per_sec: drain_rate,
        overload_factor: producer_rate / drain_rate,
        steady_rss_mib: mib(steady),
        peak_rss_mib: mib(peak),
        growth_mib: mib(peak.saturating_sub(steady)),
        queue_capacity_events: capacity,
    })
}
