//! Durable acknowledgements at a fixed offered rate: the order pipeline with an immediate log,
//! and the disk's own floor at the same rate and bytes.
//!
//! The floor is a group commit that costs nothing but the disk: the orders due each millisecond
//! (as `conduit run --rate` offers them) are handed to one writer thread, which writes everything
//! handed to it since its last commit in one `write` and one `fdatasync`, then acknowledges it.
//! It writes as many bytes per order as the engine's log file took in the same round. No durable
//! design on this disk acknowledges sooner at this rate; the engine's figures are read against it.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::log::{Log, LogOptions};
use conduit::{EngineConfig, LatencySummary};
use conduit_orders::{self as orders, SimConfig};
use serde::Serialize;

use super::durable::{disk_bytes, scratch};
use super::{median, EVENTS_PER_ORDER};

/// What to run.
#[derive(Debug, Clone)]
pub struct PacedConfig {
    /// Orders offered a second.
    pub rate: f64,
    /// Orders per run.
    pub orders: u64,
    /// Runs of each side, alternated.
    pub repeat: u32,
    /// The engine's configuration.
    pub engine: EngineConfig,
    /// Where the runs write their files (removed after each run).
    pub dir: std::path::PathBuf,
}

/// One paced run: acknowledgement and commit latencies, and the commits' period.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PacedRun {
    /// Median time from a window's hand-over to its durable acknowledgement, in milliseconds.
    pub ack_p50_ms: f64,
    /// Its 99th percentile.
    pub ack_p99_ms: f64,
    /// Durable commits.
    pub commits: u64,
    /// The run's wall time over its commits: the group-commit period, in milliseconds.
    pub period_ms: f64,
    /// Median time a commit took (its writes and fsync), in milliseconds.
    pub commit_p50_ms: f64,
    /// Its 99th percentile.
    pub commit_p99_ms: f64,
    /// Disk space taken per event (the engine's log file, or the floor's file).
    pub bytes_per_event: f64,
}

impl PacedRun {
    /// A run's figures from its acknowledgement and commit latencies (in microseconds), its
    /// commits over `elapsed_s`, and the disk space it took for `events`.
    // Counts fit f64 exactly at any size a bench run reaches.
    #[allow(clippy::cast_precision_loss)]
    fn of(
        ack: &LatencySummary,
        commit: &LatencySummary,
        commits: u64,
        elapsed_s: f64,
        bytes: u64,
        events: u64,
    ) -> Self {
        Self {
            ack_p50_ms: ack.p50 / 1_000.0,
            ack_p99_ms: ack.p99 / 1_000.0,
            commits,
            period_ms: elapsed_s * 1_000.0 / commits.max(1) as f64,
            commit_p50_ms: commit.p50 / 1_000.0,
            commit_p99_ms: commit.p99 / 1_000.0,
            bytes_per_event: bytes as f64 / events.max(1) as f64,
        }
    }

    /// The acknowledgement p99 in group-commit periods.
    #[must_use]
    pub fn ack_p99_periods(&self) -> f64 {
        self.ack_p99_ms / self.period_ms.max(f64::MIN_POSITIVE)
    }
}

/// Both sides' runs, and their medians.
#[derive(Debug, Clone, Serialize)]
pub struct PacedReport {
    /// Orders offered a second.
    pub rate: f64,
    /// Orders per run.
    pub orders: u64,
    /// The engine's runs, in run order.
    pub engine: Vec<PacedRun>,
    /// The floor's runs, each at the bytes per event of the engine's run before it.
    pub disk: Vec<PacedRun>,
    /// Medians of the engine's acknowledgement p99 (ms), period (ms) and p99 in periods.
    pub engine_median: PacedMedians,
    /// The same for the floor.
    pub disk_median: PacedMedians,
}

/// Medians over one side's runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PacedMedians {
    /// Acknowledgement p50, ms.
    pub ack_p50_ms: f64,
    /// Acknowledgement p99, ms.
    pub ack_p99_ms: f64,
    /// Group-commit period, ms.
    pub period_ms: f64,
    /// Commit p99, ms.
    pub commit_p99_ms: f64,
    /// Acknowledgement p99 in periods.
    pub ack_p99_periods: f64,
}

impl PacedMedians {
    fn of(runs: &[PacedRun]) -> Self {
        let m = |f: fn(&PacedRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            ack_p50_ms: m(|r| r.ack_p50_ms),
            ack_p99_ms: m(|r| r.ack_p99_ms),
            period_ms: m(|r| r.period_ms),
            commit_p99_ms: m(|r| r.commit_p99_ms),
            ack_p99_periods: m(PacedRun::ack_p99_periods),
        }
    }
}

/// Runs the engine and the floor `repeat` times each, alternated (engine first in a round, so the
/// floor writes the bytes the engine just measured).
///
/// # Errors
/// When the engine's run fails or reports no acknowledgement.
pub fn paced(config: &PacedConfig, mut progress: impl FnMut(&str, u32)) -> Result<PacedReport, String> {
    std::fs::create_dir_all(&config.dir).map_err(|e| format!("cannot create {}: {e}", config.dir.display()))?;
    let (mut engine, mut disk) = (Vec::new(), Vec::new());
    for round in 0..config.repeat.max(1) {
        progress("engine", round);
        let run = engine_paced(config)?;
        progress("disk floor", round);
        disk.push(disk_paced(&config.dir, config.rate, config.orders, run.bytes_per_event));
        engine.push(run);
    }
    Ok(PacedReport {
        rate: config.rate,
        orders: config.orders,
        engine_median: PacedMedians::of(&engine),
        disk_median: PacedMedians::of(&disk),
        engine,
        disk,
    })
}

/// The order pipeline with an immediate log, offered `config.rate` orders a second as `conduit
/// run --rate` offers them.
fn engine_paced(config: &PacedConfig) -> Result<PacedRun, String> {
    let path = scratch(&config.dir, "paced.redb");
    let log = Arc::new(Log::open(&path, LogOptions::default()).map_err(|e| format!("cannot open the log: {e}"))?);
    let plan = orders::RunPlan {
        pace: orders::Pace::Rate(config.rate),
        ..orders::RunPlan::new(orders::Limit::Orders(config.orders))
    };
    let report = orders::run_until(
        &config.engine,
        &SimConfig::default(),
        &orders::OrderRouting::default(),
        &plan,
        Some(Arc::clone(&log)),
        |_, _| {},
    )
    .map_err(|e| e.to_string())?;
    let violations = report.violations();
    if !violations.is_empty() {
        return Err(format!("the paced run broke an invariant: {violations:?}"));
    }
    let ack = report.ack_latency_us.ok_or("the paced run acknowledged nothing")?;
    let commit = log.commit_latency().unwrap_or_default();
    let commits = log.stats().durable_commits;
    drop(log);
    let bytes = disk_bytes(&path);
    std::fs::remove_file(&path).ok();
    Ok(PacedRun::of(&ack, &commit, commits, report.elapsed_s, bytes, report.orders.submitted * EVENTS_PER_ORDER))
}

/// The floor: `orders` offered at `rate` a second, in windows of those due each millisecond,
/// `bytes_per_event` times seven bytes an order, group-committed by one writer thread (write and
/// fdatasync of everything handed over since its last commit).
///
/// # Panics
/// If the file cannot be written: a bench of a broken disk prints no figure.
#[must_use]
// Slots of a schedule: the rate is positive and finite (the CLI checks), counts fit f64 exactly.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
pub fn disk_paced(dir: &Path, rate: f64, orders: u64, bytes_per_event: f64) -> PacedRun {
    let path = scratch(dir, "paced.bin");
    let mut file = std::fs::File::create(&path).expect("the bench directory is writable");
    let order_bytes = (bytes_per_event * EVENTS_PER_ORDER as f64).ceil().max(1.0) as usize;
    let (windows, handed) = crossbeam_channel::unbounded::<(Instant, u64)>();
    let writer = std::thread::spawn(move || {
        let (mut ack, mut commit) = (latency_histogram(), latency_histogram());
        let (mut commits, mut zeros) = (0u64, Vec::new());
        while let Ok(first) = handed.recv() {
            let group: Vec<(Instant, u64)> = std::iter::once(first).chain(handed.try_iter()).collect();
            let bytes = group.iter().map(|&(_, n)| n).sum::<u64>() as usize * order_bytes;
            zeros.resize(zeros.len().max(bytes), 0x5A);
            let started = Instant::now();
            file.write_all(&zeros[..bytes]).expect("write");
            file.sync_data().expect("fdatasync");
            let done = Instant::now();
            commit.saturating_record(duration_ns(done - started));
            commits += 1;
            for (sent, _) in group {
                ack.saturating_record(duration_ns(done - sent));
            }
        }
        (ack, commit, commits)
    });
    let started = Instant::now();
    let mut offered = 0u64;
    while offered < orders {
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(orders);
        let within_ms = ((rate / 1_000.0).ceil() as u64).max(1);
        let window = due.saturating_sub(offered).min(within_ms);
        if window > 0 {
            windows.send((Instant::now(), window)).expect("the writer runs until the windows end");
            offered += window;
        }
        let next = started + Duration::from_secs_f64(offered as f64 / rate);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    drop(windows);
    let (ack, commit, commits) = writer.join().expect("the writer only writes");
    let elapsed = started.elapsed();
    let bytes = disk_bytes(&path);
    std::fs::remove_file(&path).ok();
    let (ack, commit) = (LatencySummary::from_histogram(&ack), LatencySummary::from_histogram(&commit));
    PacedRun::of(&ack, &commit, commits, elapsed.as_secs_f64(), bytes, orders * EVENTS_PER_ORDER)
}

/// Nanoseconds from 1 to an hour, three significant figures.
fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("constant bounds are valid")
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_acknowledge_what_they_were_offered_and_the_floor_writes_the_engines_bytes() {
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let config = PacedConfig {
            rate: 20_000.0,
            orders: 2_000,
            repeat: 1,
            engine: EngineConfig::default(),
            dir: scratch.path().to_owned(),
        };
        let report = paced(&config, |_, _| {}).expect("runs");
        let (engine, disk) = (report.engine[0], report.disk[0]);
        for (side, run) in [("engine", engine), ("disk", disk)] {
            assert!(run.commits > 0 && run.period_ms > 0.0, "{side}: {run:?}");
            assert!(run.ack_p99_ms >= run.ack_p50_ms && run.ack_p50_ms > 0.0, "{side}: {run:?}");
            // A window is acknowledged after its commit, so no sooner than commits take.
            assert!(run.ack_p99_ms >= run.commit_p50_ms, "{side}: {run:?}");
        }
        // Offered over about 0.1 s in windows of a millisecond's orders: many groups, not one.
        assert!(disk.commits >= 10, "{disk:?}");
        // The floor's file holds the bytes per event the engine's log took (to a block of 4 KiB).
        let slack = 4_096.0 / (2_000.0 * EVENTS_PER_ORDER as f64);
        assert!((disk.bytes_per_event - engine.bytes_per_event).abs() <= slack + 1.0, "{engine:?} {disk:?}");
        assert!(scratch.path().read_dir().expect("the directory").next().is_none(), "the runs remove their files");
    }
}
