//! `conduit run` (a seeded workload through the order pipeline, optionally journaled) and
//! `conduit recover` (resume what a crashed run left in flight).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::ValueEnum;
use conduit::log::{Durability, Log, LogOptions, Retention};
use conduit_orders::{self as orders, RunError, RunReport};

use crate::metricsserve::MetricsServer;
use crate::topcmd::Live;
use crate::{human, read_config, read_topology, Failure, Format, UsageError};

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Orders to generate and submit [default: 100000].
    #[arg(long, conflicts_with = "duration")]
    orders: Option<u64>,
    /// Generate and submit orders for this long instead (for example `90s`, `10m`, `2h`): a
    /// soak run whose memory does not grow with its length.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Offer orders on a fixed schedule of this many a second (for example `200000/s`) instead
    /// of as fast as the pipeline takes them: end-to-end latency then counts from each order's
    /// slot in the schedule (open loop, no coordinated omission).
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Serve the engine's figures in Prometheus's text format at `http://ADDR/metrics` while the
    /// run lasts (a loopback address only, for example `127.0.0.1:9464`; port 0 picks one and
    /// says which on stderr).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// After the run, keep serving its final figures this long (for example `5s`), so a scraper
    /// sees them.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "metrics_addr")]
    metrics_linger: Option<std::time::Duration>,
    /// Write each stage's latency histogram and the end-to-end one as `HdrHistogram`
    /// percentile-distribution files, in microseconds (`DIR/<stage>.hgrm`, `DIR/end_to_end.hgrm`).
    #[arg(long, value_name = "DIR")]
    hdr_out: Option<PathBuf>,
    /// Draw the latency percentile curves (a curve per stage, and end to end) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Seed of the workload and of every simulated fault (overrides the file).
    #[arg(long)]
    seed: Option<u64>,
    /// TOML file with `[engine]` and `[simulation]` tables.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// TOML file with the stages' bindings to routing keys, stages ordered by key, and an
    /// optional `[engine]` table (see examples/topology.toml).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Probability that a charge attempt fails transiently, 0 to 1 (overrides the file).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    payment_failure_rate: Option<f64>,
    /// Fraction of orders with a malformed payload, 0 to 1: each is dead-lettered as
    /// `malformed` (overrides the file).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    poison_rate: Option<f64>,
    /// Probability that a charge attempt times out, 0 to 1 (overrides the file).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    payment_timeout_rate: Option<f64>,
    /// Fraction of SKUs out of stock, 0 to 1 (overrides the file).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    out_of_stock_rate: Option<f64>,
    /// Probability that a charge is declined for good, 0 to 1 (overrides the file).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    payment_decline_rate: Option<f64>,
    /// Probability that the carrier fails a shipment, 0 to 1 (with --saga orchestrated or choreography;
    /// overrides the file).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    shipping_failure_rate: Option<f64>,
    /// How the order flow is driven: `chain` (stage to stage through the topic exchange),
    /// `orchestrated` (the order's saga: payment and inventory in parallel, then shipping) or
    /// `choreography` (the same saga, each service reacting to the others' events); with --log
    /// both journal the saga's facts. Overrides the file's `simulation.flow`.
    #[arg(long, value_name = "FLOW", value_parser = parse_flow)]
    saga: Option<orders::Flow>,
    /// Worker threads per stage (overrides the file's default).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Events per batch (overrides the file's default).
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// No progress bar, even on a terminal.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DurabilityArg {
    /// fsync every group commit; `submit` returns after its orders are durable.
    Immediate,
    /// Commit without fsync; a durable commit at least every --sync-interval-ms.
    Eventual,
    /// No log at all.
    Memory,
}

#[derive(Debug, clap::Args)]
struct LogArgs {
    /// Journal every event to this log file (created if missing; must hold no events yet).
    #[arg(long, value_name = "PATH")]
    log: Option<PathBuf>,
    /// When commits are durable (default: immediate with --log, memory without).
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// With --durability eventual: most milliseconds between durable commits.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    sync_interval_ms: u64,
    /// Keep at most this much of the log (for example `2GiB`): the oldest frames no message in
    /// flight needs are removed at each checkpoint.
    #[arg(long, value_name = "SIZE", value_parser = crate::logcmd::parse_size)]
    retention_max_bytes: Option<u64>,
    /// Remove frames older than this (for example `1h`), unless a message in flight needs them.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    retention_max_age: Option<std::time::Duration>,
}

impl LogArgs {
    /// The log to open, if any, with its options; bad combinations are usage errors.
    fn plan(&self) -> Result<Option<(PathBuf, LogOptions)>, UsageError> {
        if self.log.is_none() && (self.retention_max_bytes.is_some() || self.retention_max_age.is_some()) {
            return Err(UsageError("--retention-max-bytes and --retention-max-age need --log PATH".into()));
        }
        let durability = match (self.durability, &self.log) {
            (Some(DurabilityArg::Memory) | None, None) => return Ok(None),
            (Some(DurabilityArg::Memory), Some(_)) => {
                return Err(UsageError(
                    "--durability memory writes no log: drop --log, or choose immediate or eventual".into(),
                ))
            }
            (Some(_), None) => return Err(UsageError("--durability immediate|eventual needs --log PATH".into())),
            (Some(DurabilityArg::Immediate) | None, Some(_)) => Durability::Immediate,
            (Some(DurabilityArg::Eventual), Some(_)) => {
                Durability::Eventual { sync_interval_ms: self.sync_interval_ms }
            }
        };
        let path = self.log.clone().expect("every arm without a path returned");
        let retention = Retention { max_bytes: self.retention_max_bytes, max_age: self.retention_max_age };
        Ok(Some((path, LogOptions { durability, retention, ..LogOptions::default() })))
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct RecoverArgs {
    /// The log to recover.
    path: PathBuf,
    /// TOML file with `[engine]` and `[simulation]` tables (as for `run`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The flow to resume the log's orders with: `chain`, `orchestrated` or `choreography` (as
    /// for `run`; the chain's orders need the chain, sagas either saga flow). Overrides the
    /// file's `simulation.flow`.
    #[arg(long, value_name = "FLOW", value_parser = parse_flow)]
    saga: Option<orders::Flow>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// Reads the files (if any) and lays the flags over them.
/// What a run's configuration says: the engine, the simulated world, the routing, the alerts.
type Planned = (conduit::EngineConfig, orders::SimConfig, orders::OrderRouting, conduit::AlertRules);

fn plan(args: &RunArgs) -> Result<Planned, UsageError> {
    let mut file = read_config(args.config.as_deref())?;
    let mut routing = orders::OrderRouting::default();
    if let Some(path) = &args.topology {
        let topology = read_topology(path)?;
        if let Some(engine) = &topology.engine {
            file.engine.overlay(engine);
        }
        routing = topology.routing();
    }
    if let Some(seed) = args.seed {
        file.simulation.seed = seed;
    }
    if let Some(rate) = args.payment_failure_rate {
        file.simulation.payment_failure_rate = rate;
    }
    if let Some(rate) = args.poison_rate {
        file.simulation.poison_rate = rate;
    }
    if let Some(rate) = args.payment_timeout_rate {
        file.simulation.payment_timeout_rate = rate;
    }
    if let Some(rate) = args.out_of_stock_rate {
        file.simulation.out_of_stock_rate = rate;
    }
    if let Some(rate) = args.payment_decline_rate {
        file.simulation.payment_decline_rate = rate;
    }
    if let Some(rate) = args.shipping_failure_rate {
        file.simulation.shipping_failure_rate = rate;
    }
    if let Some(flow) = args.saga {
        file.simulation.flow = flow;
    }
    if let Some(workers) = args.workers {
        file.engine.workers = Some(workers.into());
    }
    if let Some(batch) = args.batch {
        file.engine.batch_events_max = Some(batch);
    }
    let (engine, sim) = file.validate().map_err(|e| UsageError(e.to_string()))?;
    Ok((engine, sim, routing, file.alerts))
}

fn parse_flow(text: &str) -> Result<orders::Flow, String> {
    text.parse()
}

/// `conduit run`, or with `live` `conduit top`: the same run under a live terminal view.
pub(crate) fn run(args: &RunArgs, live: bool) -> Result<ExitCode, Failure> {
    let live = live.then(Live::default);
    if live.is_some() && !std::io::stdout().is_terminal() {
        return Err(UsageError("conduit top draws on a terminal: run it in one, or use conduit run".into()).into());
    }
    let (engine, mut sim, routing, alerts) = plan(args)?;
    let log = open_log(args, &mut sim)?;
    let limit = match (args.orders, args.duration) {
        (_, Some(duration)) if duration.is_zero() => {
            return Err(UsageError("--duration must be longer than zero".into()).into())
        }
        (_, Some(duration)) => orders::Limit::For(duration),
        (orders, None) => orders::Limit::Orders(orders.unwrap_or(100_000)),
    };
    let metrics = args.metrics_addr.map(MetricsServer::start).transpose()?;
    if let Some(server) = &metrics {
        eprintln!("metrics: http://{}/metrics", server.addr());
    }
    check_latency_outputs(args)?;
    let want_latency = args.hdr_out.is_some() || args.plot.is_some();
    let latency = parking_lot::Mutex::new(None);
    let answer = |engine: &conduit::Engine<orders::OrderEvent>, snapshot: &conduit::Snapshot, last: bool| {
        if let Some(server) = &metrics {
            server.answer(engine, snapshot, last);
        }
        if let Some(live) = &live {
            live.push(snapshot.clone(), last);
        }
        if last && want_latency {
            *latency.lock() = Some(engine.latency_histograms());
        }
    };
    let run_plan = orders::RunPlan {
        pace: args.rate.map_or(orders::Pace::Saturate, orders::Pace::Rate),
        alerts,
        observe: (metrics.is_some() || want_latency || live.is_some()).then_some(&answer as &orders::Observer<'_>),
        stop: live.as_ref().map(|live| &live.stop),
        ..orders::RunPlan::new(limit)
    };
    let result = match &live {
        Some(live) => std::thread::scope(|scope| {
            let running = scope.spawn(|| orders::run_until(&engine, &sim, &routing, &run_plan, log.clone(), |_, _| {}));
            let shown = live.show(&|| running.is_finished());
            if shown.is_err() {
                live.stop.store(true, std::sync::atomic::Ordering::Release);
            }
            let result = running.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            shown.map_err(|e| Failure::Run(format!("the terminal failed: {e}"))).map(|()| result)
        })?,
        None => with_progress_bar(args, limit, |progress| {
            orders::run_until(&engine, &sim, &routing, &run_plan, log.clone(), progress)
        }),
    };
    let report = match result {
        Ok(report) => report,
        Err(RunError::Build(error)) => return Err(Failure::Usage(UsageError(error.to_string()))),
        Err(error @ (RunError::LogNotEmpty { .. } | RunError::BooksNotEmpty { .. })) => {
            return Err(Failure::Usage(UsageError(error.to_string())))
        }
        Err(RunError::Poisoned { unsent, report }) => {
            print_report(&report, args.format).map_err(Failure::Run)?;
            return Err(Failure::Run(format!("the engine was poisoned; {unsent} orders were not submitted")));
        }
        Err(other) => return Err(Failure::Run(other.to_string())),
    };
    if let Some(log) = log {
        log.close().map_err(|e| Failure::Run(format!("cannot close the log: {e}")))?;
    }
    print_report(&report, args.format).map_err(Failure::Run)?;
    if let Some(histograms) = latency.into_inner() {
        write_latency_outputs(args, &histograms)?;
    }
    if let (Some(_), Some(linger)) = (&metrics, args.metrics_linger) {
        std::io::stdout().flush().ok();
        std::thread::sleep(linger);
    }
    drop(metrics);
    let violations = report.violations();
    if violations.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for violation in &violations {
            eprintln!("invariant broken: {violation}");
        }
        Ok(ExitCode::from(1))
    }
}

/// The run's log, when `--log` names one.
fn open_log(args: &RunArgs, sim: &mut orders::SimConfig) -> Result<Option<Arc<Log>>, Failure> {
    let Some((path, options)) = args.log.plan()? else { return Ok(None) };
    let books = crate::payment_books(sim, &path);
    if books.exists() && !path.exists() {
        let error = RunError::BooksNotEmpty { path: books.display().to_string() };
        return Err(Failure::Usage(UsageError(error.to_string())));
    }
    let opened = Log::open(&path, options).map_err(|e| match e {
        conduit::log::LogError::Options(why) => Failure::Usage(UsageError(why)),
        other => Failure::Run(format!("cannot open the log: {other}")),
    })?;
    Ok(Some(Arc::new(opened)))
}

/// Runs `run` with a progress bar on stderr (when it is a terminal and not `--quiet`).
fn with_progress_bar<T>(args: &RunArgs, limit: orders::Limit, run: impl FnOnce(&mut dyn FnMut(u64, u64)) -> T) -> T {
    let bar = progress_bar(limit, args.quiet);
    let started = std::time::Instant::now();
    let result = run(&mut |submitted, finished| {
        if let Some(bar) = &bar {
            match limit {
                orders::Limit::Orders(_) => bar.set_position(submitted),
                orders::Limit::For(_) => bar.set_position(started.elapsed().as_secs()),
            }
            bar.set_message(format!("{submitted} submitted, {finished} finished"));
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

/// Refuses, before the run, latency outputs that could not be written after it.
fn check_latency_outputs(args: &RunArgs) -> Result<(), UsageError> {
    if let Some(dir) = &args.hdr_out {
        std::fs::create_dir_all(dir)
            .map_err(|e| UsageError(format!("--hdr-out {}: cannot make the directory: {e}", dir.display())))?;
    }
    if let Some(path) = &args.plot {
        if path.extension().is_none_or(|e| !e.eq_ignore_ascii_case("svg")) {
            return Err(UsageError(format!("--plot {}: the plot is an SVG file: name it *.svg", path.display())));
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() {
            return Err(UsageError(format!("--plot {}: {} is not a directory", path.display(), parent.display())));
        }
    }
    Ok(())
}

/// Writes the `--hdr-out` files and the `--plot` SVG, and says where on stderr.
fn write_latency_outputs(args: &RunArgs, histograms: &conduit::LatencyHistograms) -> Result<(), Failure> {
    if let Some(dir) = &args.hdr_out {
        let written = crate::latencyout::write_hdr_dir(dir, histograms)
            .map_err(|e| Failure::Run(format!("--hdr-out {}: {e}", dir.display())))?;
        eprintln!("latency: {} HdrHistogram files in {}", written.len(), dir.display());
    }
    if let Some(path) = &args.plot {
        crate::latencyout::plot_svg(path, histograms).map_err(Failure::Run)?;
        eprintln!("latency: percentile curves in {}", path.display());
    }
    Ok(())
}

fn print_report(report: &RunReport, format: Format) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let written = match format {
        Format::Json => serde_json::to_writer(&mut out, report)
            .map_err(|e| e.to_string())
            .and_then(|()| writeln!(out).map_err(|e| e.to_string())),
        Format::Human => human::write_report(&mut out, report).map_err(|e| e.to_string()),
    };
    written.map_err(|e| format!("cannot write the report: {e}"))
}

fn progress_bar(limit: orders::Limit, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let (total, template) = match limit {
        orders::Limit::Orders(orders) => (orders, "{bar:40} {pos}/{len} orders: {msg} ({per_sec})"),
        orders::Limit::For(duration) => (duration.as_secs().max(1), "{bar:40} {pos}/{len} s: {msg}"),
    };
    let bar = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

pub(crate) fn recover(args: &RecoverArgs) -> Result<ExitCode, Failure> {
    let mut file = read_config(args.config.as_deref())?;
    if let Some(flow) = args.saga {
        file.simulation.flow = flow;
    }
    let (engine, mut sim) = file.validate().map_err(|e| UsageError(e.to_string()))?;
    crate::payment_books(&mut sim, &args.path);
    let log = Arc::new(
        Log::open_existing(&args.path, LogOptions::default())
            .map_err(|e| Failure::Run(format!("cannot open the log: {e}")))?,
    );
    let report = match orders::recover(&engine, &sim, &log) {
        Ok(report) => report,
        Err(RunError::Build(error)) => return Err(Failure::Usage(UsageError(error.to_string()))),
        Err(error) => return Err(Failure::Run(error.to_string())),
    };
    log.close().map_err(|e| Failure::Run(format!("cannot close the log: {e}")))?;
    let mut out = std::io::stdout().lock();
    let written = match args.format {
        Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
        Format::Human => human::write_recover(&mut out, &report).map_err(|e| e.to_string()),
    };
    written.and_then(|()| writeln!(out).map_err(|e| e.to_string())).map_err(Failure::Run)?;
    let mut broken = report.run.violations();
    broken.extend(report.verify.problems.iter().cloned());
    for problem in &broken {
        eprintln!("invariant broken: {problem}");
    }
    Ok(if broken.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `--rate`: orders a second, written `N` or `N/s`, positive and finite.
pub(crate) fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    match number.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a rate: write orders a second, for example 200000/s")),
    }
}
