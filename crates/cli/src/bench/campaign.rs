//! The campaign: a burst of ten times the normal rate for ten seconds in front of a slow email
//! stage (a 50 us wait per event, standing for the mail provider's latency), with the email
//! stage's pool fixed at one worker and then elastic (`{ min = 1, max = 16 }`), on the same load.
//!
//! Load is open-loop (sent on a schedule, whatever the engine does), so a slow stage shows as
//! lag, not as a slower sender. A sampler reads the email stage's lag age, queue and pool every
//! 10 ms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, StageId, StageSettings, Topology, Workers};
use hdrhistogram::Histogram;
use serde::Serialize;

/// The campaign's shape.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignConfig {
    /// Events a second outside the burst.
    pub normal_rate: u64,
    /// The burst's rate, as a multiple of the normal one.
    pub burst_factor: u64,
    /// Normal load before the burst.
    pub before: Duration,
    /// The burst.
    pub burst: Duration,
    /// Normal load after the burst, watched for the drain and the pool's return to `min`.
    pub after: Duration,
    /// What the email stage waits per event (a sleep: the thread is off the CPU, as in I/O).
    pub email_wait: Duration,
    /// The elastic pool's `max`.
    pub elastic_max: usize,
}

impl Default for CampaignConfig {
    fn default() -> Self {
        Self {
            normal_rate: 2_000,
            burst_factor: 10,
            before: Duration::from_secs(2),
            burst: Duration::from_secs(10),
            after: Duration::from_secs(30),
            email_wait: Duration::from_micros(50),
            elastic_max: 16,
        }
    }
}

/// A backlog counts as drained once the email stage's lag age is back under this.
pub const DRAINED_LAG: Duration = Duration::from_millis(50);

/// What one run of the campaign measured.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignRun {
    /// `fixed_1` or `elastic_1_16`.
    pub pool: String,
    /// Events sent (and handled: the run checks every one).
    pub events: u64,
    /// The email stage's lag age over the burst and the watch after it, from a sample every
    /// 10 ms, in milliseconds.
    pub lag_p50_ms: f64,
    /// See `lag_p50_ms`.
    pub lag_p99_ms: f64,
    /// See `lag_p50_ms`.
    pub lag_max_ms: f64,
    /// Seconds from the burst's end until the lag age was back under [`DRAINED_LAG`] (0 if it
    /// never passed it); `None` if it was still above when the watch ended.
    pub drained_after_burst_s: Option<f64>,
    /// Most workers the email pool had.
    pub workers_max: usize,
    /// Seconds from the burst's end until the pool was back at its `min` (0 for a fixed pool);
    /// `None` if it was not back when the watch ended.
    pub back_to_min_after_burst_s: Option<f64>,
    /// Workers added and retired by the controller.
    pub grown: u64,
    /// See `grown`.
    pub shrunk: u64,
    /// The email stage's handling time per event, measured (mean of its handler's waits).
    pub email_us_per_event: f64,
}

/// Both runs, fixed first, and what the elastic pool bought.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignReport {
    /// The campaign's shape.
    pub config: CampaignConfig,
    /// `fixed_1`, then `elastic_1_16`.
    pub runs: Vec<CampaignRun>,
    /// Fixed over elastic email lag p99: how many times lower the elastic pool keeps it (an
    /// elastic p99 under 1 ms counts as 1 ms).
    pub lag_p99_ratio: f64,
    /// Fixed over elastic drain time after the burst; an elastic drain of 0 (the lag never
    /// passed [`DRAINED_LAG`]) counts as one sample period (10 ms).
    pub drain_ratio: Option<f64>,
    /// Logical CPUs this process could use.
    pub cpus: usize,
}

#[derive(Debug, Clone, Copy)]
struct Mail {
    key: u64,
}

impl Message for Mail {
    fn key(&self) -> u64 {
        self.key
    }
}

const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Events sent by `at` since the start: the normal rate, then the burst, then the normal rate.
fn due(config: &CampaignConfig, at: Duration) -> u64 {
    let before = at.min(config.before).as_micros();
    let burst = at.saturating_sub(config.before).min(config.burst).as_micros();
    let after = at.saturating_sub(config.before + config.burst).as_micros();
    let normal_us = before + after + burst * u128::from(config.burst_factor);
    u64::try_from(normal_us * u128::from(config.normal_rate) / 1_000_000).unwrap_or(u64::MAX)
}

/// Runs the campaign with a fixed email pool of one, then an elastic one.
///
/// # Errors
/// When the engine cannot start or refuses the load.
pub fn campaign(config: &CampaignConfig, mut progress: impl FnMut(&str)) -> Result<CampaignReport, String> {
    let mut runs = Vec::new();
    for (pool, workers) in [
        ("fixed_1".to_owned(), Workers::fixed(1)),
        (format!("elastic_1_{}", config.elastic_max), Workers::elastic(1, config.elastic_max)),
    ] {
        progress(&pool);
        runs.push(run(config, &pool, workers)?);
    }
    // A lag p99 under 1 ms counts as 1 ms.
    let lag_p99_ratio = runs[0].lag_p99_ms / runs[1].lag_p99_ms.max(1.0);
    let drain_ratio = match (runs[0].drained_after_burst_s, runs[1].drained_after_burst_s) {
        (Some(fixed), Some(elastic)) => Some(fixed / elastic.max(SAMPLE_EVERY.as_secs_f64())),
        _ => None,
    };
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Ok(CampaignReport { config: config.clone(), runs, lag_p99_ratio, drain_ratio, cpus })
}

/// One sample of the email stage.
struct Sample {
    at: Duration,
    lag: Duration,
    workers: usize,
}

/// Time the email handler spent, and on how many events.
type Waited = Arc<parking_lot::Mutex<(Duration, u64)>>;

/// The campaign's engine: an entry stage that hands every event to the email stage, whose pool
/// is `workers`.
fn start_engine(config: &CampaignConfig, workers: Workers) -> Result<(Engine<Mail>, StageId, Waited), String> {
    let mut topology = Topology::new();
    let order = topology.stage("order");
    let email = topology.stage("email");
    topology.entry(order).link(order, email);
    topology.handler(order, move |_| {
        move |event: &Envelope<Mail>, out: &mut Emitter<Mail>| {
            out.emit(email, event.msg);
            Outcome::Done
        }
    });
    let wait = config.email_wait;
    let waited = Arc::new(parking_lot::Mutex::new((Duration::ZERO, 0_u64)));
    let total = Arc::clone(&waited);
    topology.handler(email, move |_| {
        let total = Arc::clone(&total);
        move |_: &Envelope<Mail>, _: &mut Emitter<Mail>| {
            let started = Instant::now();
            std::thread::sleep(wait);
            let mut total = total.lock();
            total.0 += started.elapsed();
            total.1 += 1;
            Outcome::Done
        }
    });
    // Room in the email queue for the whole burst: the backlog waits there, measured.
    let email_settings = StageSettings {
        workers: Some(workers),
        batch_events_max: Some(32),
        queue_batches: Some(16_384),
        ..StageSettings::default()
    };
    let engine_config = EngineConfig::builder().stage("email", email_settings).build().map_err(|e| e.to_string())?;
    // The sampler's snapshots would evaluate the default alert rules, which the burst sets off.
    let quiet = conduit::AlertRules { enabled: false, ..conduit::AlertRules::default() };
    let engine = Engine::builder(topology).config(&engine_config).alerts(quiet).start().map_err(|e| e.to_string())?;
    Ok((engine, email, waited))
}

fn run(config: &CampaignConfig, pool: &str, workers: Workers) -> Result<CampaignRun, String> {
    let (engine, email, waited) = start_engine(config, workers)?;
    let load = config.before + config.burst + config.after;
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (samples, sent) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let snapshot = engine.snapshot();
                let stage = &snapshot.stages[email.index()];
                samples.push(Sample {
                    at: start.elapsed(),
                    lag: Duration::from_secs_f64(stage.lag_us / 1e6),
                    workers: stage.workers,
                });
                std::thread::sleep(SAMPLE_EVERY);
            }
            samples
        });
        let mut sent = 0_u64;
        let result = loop {
            let at = start.elapsed();
            if at >= load {
                break Ok(sent);
            }
            let target = due(config, at);
            if target > sent {
                if let Err(e) = engine.submit_many((sent..target).map(|key| Mail { key })) {
                    break Err(format!("the engine refused the load: {e}"));
                }
                sent = target;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        stop.store(true, Ordering::Release);
        (sampler.join().map_err(|_| "the sampler panicked".to_owned()), result)
    });
    let (samples, sent) = (samples?, sent?);
    let report = engine.shutdown();
    let handled = report.snapshot.stages[email.index()].processed;
    if handled != sent || !report.is_clean() {
        return Err(format!("{pool}: {sent} events sent, {handled} handled by email"));
    }
    let email_stage = &report.snapshot.stages[email.index()];
    let (waited, count) = *waited.lock();
    let mut run = summary(config, workers, &samples)?;
    pool.clone_into(&mut run.pool);
    run.events = sent;
    (run.grown, run.shrunk) = (email_stage.pool_grown, email_stage.pool_shrunk);
    run.email_us_per_event = waited.as_secs_f64() * 1e6 / count.max(1) as f64;
    Ok(run)
}

/// What the samples say: the lag's percentiles, the drain and the pool's return to `min`.
fn summary(config: &CampaignConfig, workers: Workers, samples: &[Sample]) -> Result<CampaignRun, String> {
    let burst_end = config.before + config.burst;
    let mut lag = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?;
    for sample in samples.iter().filter(|s| s.at >= config.before) {
        lag.saturating_record(u64::try_from(sample.lag.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    let after_burst: Vec<&Sample> = samples.iter().filter(|s| s.at >= burst_end).collect();
    let since_burst = |s: &Sample| s.at.saturating_sub(burst_end).as_secs_f64();
    let ever_lagged = samples.iter().any(|s| s.at >= config.before && s.lag > DRAINED_LAG);
    let drained = if ever_lagged {
        let last_high = after_burst.iter().rposition(|s| s.lag > DRAINED_LAG);
        match last_high {
            None => Some(0.0),
            Some(i) => after_burst.get(i + 1).map(|s| since_burst(s)),
        }
    } else {
        Some(0.0)
    };
    let back_to_min = if workers.is_elastic() {
        let last_above = after_burst.iter().rposition(|s| s.workers > workers.min);
        match last_above {
            None => Some(0.0),
            Some(i) => after_burst.get(i + 1).map(|s| since_burst(s)),
        }
    } else {
        Some(0.0)
    };
    let ms = |us: u64| us as f64 / 1e3;
    Ok(CampaignRun {
        pool: String::new(),
        events: 0,
        lag_p50_ms: ms(lag.value_at_quantile(0.5)),
        lag_p99_ms: ms(lag.value_at_quantile(0.99)),
        lag_max_ms: ms(lag.max()),
        drained_after_burst_s: drained,
        workers_max: samples.iter().map(|s| s.workers).max().unwrap_or(0),
        back_to_min_after_burst_s: back_to_min,
        grown: 0,
        shrunk: 0,
        email_us_per_event: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_follows_the_schedule() {
        let config = CampaignConfig::default();
        assert_eq!(due(&config, Duration::ZERO), 0);
        assert_eq!(due(&config, Duration::from_secs(1)), 2_000);
        assert_eq!(due(&config, Duration::from_secs(2)), 4_000);
        assert_eq!(due(&config, Duration::from_secs(3)), 24_000, "ten times the rate in the burst");
        assert_eq!(due(&config, Duration::from_secs(12)), 204_000);
        assert_eq!(due(&config, Duration::from_secs(13)), 206_000, "the normal rate again after it");
    }

    /// Samples every 10 ms over 2 s of burst (from 1 s) and 3 s after, with `lag` and `workers`
    /// by time since the start.
    fn samples(lag: impl Fn(f64) -> f64, workers: impl Fn(f64) -> usize) -> Vec<Sample> {
        (0..600)
            .map(|i| {
                let at = Duration::from_millis(i * 10);
                let t = at.as_secs_f64();
                Sample { at, lag: Duration::from_secs_f64(lag(t)), workers: workers(t) }
            })
            .collect()
    }

    #[test]
    fn the_summary_reads_the_drain_and_the_return_to_min_from_the_samples() {
        let config = CampaignConfig {
            before: Duration::from_secs(1),
            burst: Duration::from_secs(2),
            after: Duration::from_secs(3),
            ..CampaignConfig::default()
        };
        // A backlog that drains 1.5 s after the burst ends (at 3 s), a pool back at 1 at 4 s.
        let lagging = samples(|t| if (1.0..4.5).contains(&t) { 2.0 } else { 0.0 }, |t| if t < 4.0 { 4 } else { 1 });
        let run = summary(&config, Workers::elastic(1, 4), &lagging).expect("summary");
        let drained = run.drained_after_burst_s.expect("drained within the watch");
        assert!((drained - 1.5).abs() < 0.011, "{drained}");
        let back = run.back_to_min_after_burst_s.expect("back within the watch");
        assert!((back - 1.0).abs() < 0.011, "{back}");
        assert!((run.lag_p99_ms - 2_000.0).abs() < 2.0 && run.workers_max == 4, "{run:?}");
        // Never lagging: drained at once; still lagging at the end: not within the watch.
        let calm = summary(&config, Workers::fixed(1), &samples(|_| 0.001, |_| 1)).expect("summary");
        assert_eq!((calm.drained_after_burst_s, calm.back_to_min_after_burst_s), (Some(0.0), Some(0.0)));
        let stuck = summary(&config, Workers::elastic(1, 4), &samples(|t| t, |_| 4)).expect("summary");
        assert_eq!((stuck.drained_after_burst_s, stuck.back_to_min_after_burst_s), (None, None));
    }
}
