//! A [`Snapshot`] in Prometheus's text exposition format (feature `prometheus`), built as the
//! `prometheus` crate's metric families and written by its text encoder (format 0.0.4).
//!
//! Names follow Prometheus's conventions: a `conduit_` prefix, units in the name (`_seconds`,
//! `_bytes`), `_total` on counters, a `stage` label per stage. Latency is a histogram
//! (`_bucket{le}`, `_sum`, `_count`) read from the engine's hdrhistograms at fixed bounds, so
//! `histogram_quantile` works across scrapes. The engine serves nothing itself: an embedder
//! renders on each scrape from a server of its choice (`conduit run --metrics-addr` does, on
//! loopback).

use hdrhistogram::Histogram;
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};

use crate::metrics::{LatencyHistograms, Snapshot, StageSnapshot};

pub use prometheus::TEXT_FORMAT as CONTENT_TYPE;

/// Upper bounds of the latency buckets, in seconds: 1 us to 60 s.
pub const LATENCY_BUCKETS_S: [f64; 17] =
    [1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0, 60.0];

/// The text exposition of `snapshot` (its latency histograms in `latency`).
///
/// # Errors
/// If the encoder refuses the families (it checks names and labels; conduit's are fixed).
pub fn render(snapshot: &Snapshot, latency: &LatencyHistograms) -> Result<String, prometheus::Error> {
    prometheus::TextEncoder::new().encode_to_string(&families(snapshot, latency))
}

/// A per-stage figure: its name after `conduit_stage_`, help, and how to read it.
type StageFigure = (&'static str, &'static str, fn(&StageSnapshot) -> f64);

#[allow(clippy::cast_precision_loss)]
const STAGE_COUNTERS: [StageFigure; 11] = [
    ("processed_total", "Events the stage finished (done, rejected or dead-lettered)", |s| s.processed as f64),
    ("emitted_total", "Events the stage sent on", |s| s.emitted as f64),
    ("retried_total", "Attempts that ended in a retry", |s| s.retried as f64),
    ("rejected_total", "Events the handler rejected", |s| s.rejected as f64),
    ("dead_lettered_total", "Events the stage dead-lettered", |s| s.dead_lettered as f64),
    ("panics_total", "Handler panics caught", |s| s.panics as f64),
    ("unroutable_total", "Events published with a routing key no queue is bound to", |s| s.unroutable as f64),
    ("expired_total", "Events dead-lettered past their time to live", |s| s.expired as f64),
    ("overflowed_total", "Events dead-lettered because the stage's queue was full", |s| s.overflowed as f64),
    ("pool_grown_total", "Workers an elastic pool added", |s| s.pool_grown as f64),
    ("pool_shrunk_total", "Workers an elastic pool retired", |s| s.pool_shrunk as f64),
];

#[allow(clippy::cast_precision_loss)]
const STAGE_GAUGES: [StageFigure; 8] = [
    ("queue_depth", "Events waiting in the stage's queues", |s| s.queue_depth as f64),
    ("queue_capacity", "Most events the stage's queues hold", |s| s.queue_capacity as f64),
    ("workers", "Workers in the stage's pool", |s| s.workers as f64),
    ("workers_min", "Fewest workers the stage's pool may have", |s| s.workers_min as f64),
    ("workers_max", "Most workers the stage's pool may have", |s| s.workers_max as f64),
    ("busy_workers", "Workers handling a batch now", |s| s.busy_workers as f64),
    ("retry_parked", "Events held for a retry by the stage's workers", |s| s.retry_parked as f64),
    ("lag_seconds", "How long the oldest event in the stage's queues has waited", |s| s.lag_us / 1e6),
];

/// Every family of one scrape.
#[allow(clippy::cast_precision_loss)]
fn families(s: &Snapshot, latency: &LatencyHistograms) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let stage_label = |name: &str| vec![label("stage", name)];
    let mut all = vec![
        single("conduit_messages_submitted_total", "Messages accepted by the engine", COUNTER, s.submitted as f64),
        single("conduit_messages_completed_total", "Messages whose work has all finished", COUNTER, s.completed as f64),
        single("conduit_messages_in_flight", "Messages whose work has not finished", GAUGE, s.in_flight as f64),
        single("conduit_uptime_seconds", "Seconds since the engine started", GAUGE, s.uptime_s),
    ];
    for (kind, figures) in [(COUNTER, &STAGE_COUNTERS[..]), (GAUGE, &STAGE_GAUGES[..])] {
        for (name, help, read) in figures {
            let metrics = s.stages.iter().map(|stage| sample(kind, stage_label(&stage.name), read(stage))).collect();
            all.push(family(&format!("conduit_stage_{name}"), help, kind, metrics));
        }
    }
    let stage_latency =
        latency.stages.iter().map(|(name, histogram, sum_s)| histogram_metric(stage_label(name), histogram, *sum_s));
    all.push(family(
        "conduit_stage_latency_seconds",
        "Time from a batch's hand-off to the stage until it was handled, per event",
        HISTOGRAM,
        stage_latency.collect(),
    ));
    if let Some(histogram) = &latency.end_to_end {
        // Its sum from the mean: exact to the histogram's three significant digits.
        let sum_s = histogram.mean() * histogram.len() as f64 / 1e9;
        all.push(family(
            "conduit_end_to_end_latency_seconds",
            "Time from a message's acceptance (or its schedule slot) until all its work finished",
            HISTOGRAM,
            vec![histogram_metric(vec![], histogram, sum_s)],
        ));
    }
    let firing = s
        .alerts
        .firing
        .iter()
        .map(|a| sample(GAUGE, vec![label("rule", a.rule.name()), label("stage", &a.stage)], 1.0))
        .collect::<Vec<_>>();
    if !firing.is_empty() {
        all.push(family("conduit_alert_firing", "1 for each alert holding now, by rule and stage", GAUGE, firing));
    }
    all.push(single(
        "conduit_alerts_fired_total",
        "Alerts fired since the engine started",
        COUNTER,
        s.alerts.fired_total as f64,
    ));
    if let Some(log) = &s.log {
        all.extend([
            single(
                "conduit_log_events_appended_total",
                "Events appended to the log",
                COUNTER,
                log.events_appended as f64,
            ),
            single("conduit_log_commits_total", "Commits of the log", COUNTER, log.commits as f64),
            single(
                "conduit_log_durable_commits_total",
                "Commits made durable (fsynced)",
                COUNTER,
                log.durable_commits as f64,
            ),
            single("conduit_log_bytes", "Bytes the log's frames hold", GAUGE, log.bytes as f64),
            single("conduit_log_frames_removed_total", "Frames retention removed", COUNTER, log.frames_removed as f64),
            single(
                "conduit_log_frames_removed_unread_total",
                "Frames retention removed before a consumer that does not hold retention read them",
                COUNTER,
                log.frames_removed_unread as f64,
            ),
        ]);
    }
    all
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

/// A family of one unlabelled counter or gauge.
fn single(name: &str, help: &str, kind: MetricType, value: f64) -> MetricFamily {
    family(name, help, kind, vec![sample(kind, vec![], value)])
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

/// One sample of a counter (`kind` is `COUNTER`) or a gauge.
fn sample(kind: MetricType, labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut metric = Metric::from_label(labels);
    if kind == MetricType::COUNTER {
        let mut counter = proto::Counter::default();
        counter.set_value(value);
        metric.set_counter(counter);
    } else {
        let mut gauge = proto::Gauge::default();
        gauge.set_value(value);
        metric.set_gauge(gauge);
    }
    metric
}

fn histogram_metric(labels: Vec<LabelPair>, histogram: &Histogram<u64>, sum_s: f64) -> Metric {
    let mut proto = proto::Histogram::default();
    proto.set_sample_count(histogram.len());
    proto.set_sample_sum(sum_s);
    proto.set_bucket(
        buckets(histogram)
            .into_iter()
            .map(|(bound, cumulative)| {
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect(),
    );
    let mut metric = Metric::from_label(labels);
    metric.set_histogram(proto);
    metric
}

/// Events at or below each bound of [`LATENCY_BUCKETS_S`] (the encoder adds `+Inf`: all of them).
fn buckets(histogram: &Histogram<u64>) -> Vec<(f64, u64)> {
    LATENCY_BUCKETS_S
        .iter()
        .map(|&bound| {
            // Bounds are whole nanoseconds well inside u64.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let ns = (bound * 1e9) as u64;
            (bound, histogram.count_between(0, ns))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let mut histogram = crate::metrics::new_histogram();
        for ns in [500, 2_000, 2_000, 300_000, 90_000_000_000] {
            histogram.record(ns).expect("in range");
        }
        let buckets = buckets(&histogram);
        assert_eq!(buckets[0], (1e-6, 1), "500 ns");
        assert_eq!(buckets[1], (5e-6, 3), "and 2 us twice");
        assert_eq!(buckets[6], (5e-4, 4), "and 300 us");
        assert_eq!(buckets.last(), Some(&(60.0, 4)), "90 s is above every bound");
    }
}
