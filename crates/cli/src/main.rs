//! `conduit`: run the reference order pipeline and experiment with its settings.
//!
//! Data goes to stdout (`--format human|json`), progress and logs to stderr. Exit codes:
//! 0 success, 1 the run broke an invariant or failed, 2 bad input (arguments or configuration).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use conduit::log::{Durability, Log, LogOptions};
use conduit_orders::{self as orders, PipelineFile, RunError, RunReport};

mod dlqcmd;
mod human;
mod logcmd;

/// An embeddable event pipeline engine, driven from the command line.
#[derive(Debug, Parser)]
#[command(name = "conduit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Push a seeded workload of orders through the pipeline and report.
    Run(RunArgs),
    /// Measure the engine against its baselines on the same workload, side by side.
    Bench(BenchArgs),
    /// Read and check an event log.
    #[command(subcommand)]
    Log(logcmd::LogCommand),
    /// Rebuild one order from its events, now or at a past point.
    Replay(logcmd::ReplayArgs),
    /// Resume every in-flight order of a log after a crash, then verify the log.
    Recover(RecoverArgs),
    /// List, show, redrive or purge the dead letters of a log.
    #[command(subcommand)]
    Dlq(dlqcmd::DlqCommand),
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
}

impl LogArgs {
    /// The log to open, if any, with its options; bad combinations are usage errors.
    fn plan(&self) -> Result<Option<(PathBuf, LogOptions)>, UsageError> {
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
        Ok(Some((path, LogOptions { durability, ..LogOptions::default() })))
    }
}

#[derive(Debug, clap::Args)]
struct RecoverArgs {
    /// The log to recover.
    path: PathBuf,
    /// TOML file with `[engine]` and `[simulation]` tables (as for `run`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Orders per run of each case (each order is 7 events: its placement and six steps).
    #[arg(long, default_value_t = 1_000_000, conflicts_with = "events")]
    orders: u64,
    /// Events per run of each case, instead of --orders (rounded up to whole orders).
    #[arg(long)]
    events: Option<u64>,
    /// Runs per case; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Worker threads per engine stage.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Events per engine batch.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Also run a synthetic chain of N pass-through stages (engine, per-event crossbeam, one
    /// thread), --orders events per run.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    stages: Option<u16>,
    /// Orders per run of the durable cases (0 skips them).
    #[arg(long, default_value_t = 300_000)]
    durable_orders: u64,
    /// Events per run of the publish/subscribe fan-out cases (0 skips them).
    #[arg(long, default_value_t = 200_000)]
    fanout_events: u64,
    /// Orders for the overload memory measurement (0 skips it).
    #[arg(long, default_value_t = 40_000)]
    overload_orders: u64,
    /// Directory for the durable cases' files.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Sweep the engine over batch sizes and pool sizes instead of running the cases.
    #[arg(long)]
    sweep: bool,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Human,
    Json,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Orders to generate and submit.
    #[arg(long, default_value_t = 100_000)]
    orders: u64,
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

/// Bad input: reported with exit code 2.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

fn main() -> ExitCode {
    quiet_storage_panics();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Bench(args) => bench(&args),
        Command::Log(command) => logcmd::run(&command),
        Command::Replay(args) => logcmd::replay(&args),
        Command::Recover(args) => recover(&args),
        Command::Dlq(command) => dlqcmd::run(&command),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(UsageError(message))) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Run(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// redb may panic on a damaged file's pages; the log contains that panic and reports the file as
/// damaged, so the storage engine's own panic message would only alarm: it is not printed. Every
/// other panic still is.
fn quiet_storage_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_storage = info.location().is_some_and(|l| l.file().contains("/redb-"));
        if !in_storage {
            default(info);
        }
    }));
}

pub(crate) enum Failure {
    Usage(UsageError),
    Run(String),
}

impl From<UsageError> for Failure {
    fn from(error: UsageError) -> Self {
        Self::Usage(error)
    }
}

/// Reads a configuration file, or the defaults without one.
pub(crate) fn read_config(path: Option<&Path>) -> Result<PipelineFile, UsageError> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot read config file {}: {e}", path.display())))?;
            PipelineFile::from_toml_str(&text).map_err(|e| UsageError(format!("{}: {e}", path.display())))
        }
        None => Ok(PipelineFile::default()),
    }
}

/// Reads the files (if any) and lays the flags over them.
fn plan(args: &RunArgs) -> Result<(conduit::EngineConfig, orders::SimConfig, orders::OrderRouting), UsageError> {
    let mut file = read_config(args.config.as_deref())?;
    let mut routing = orders::OrderRouting::default();
    if let Some(path) = &args.topology {
        let text = std::fs::read_to_string(path)
            .map_err(|e| UsageError(format!("cannot read topology file {}: {e}", path.display())))?;
        let topology =
            orders::TopologyFile::from_toml_str(&text).map_err(|e| UsageError(format!("{}: {e}", path.display())))?;
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
    if let Some(workers) = args.workers {
        file.engine.workers = Some(workers);
    }
    if let Some(batch) = args.batch {
        file.engine.batch_events_max = Some(batch);
    }
    let (engine, sim) = file.validate().map_err(|e| UsageError(e.to_string()))?;
    Ok((engine, sim, routing))
}

fn run(args: &RunArgs) -> Result<ExitCode, Failure> {
    let (engine, sim, routing) = plan(args)?;
    let log = match args.log.plan()? {
        Some((path, options)) => {
            Some(Arc::new(Log::open(&path, options).map_err(|e| Failure::Run(format!("cannot open the log: {e}")))?))
        }
        None => None,
    };
    let bar = progress_bar(args.orders, args.quiet);
    let result = orders::run_routed(&engine, &sim, &routing, args.orders, log.clone(), |submitted, finished| {
        if let Some(bar) = &bar {
            bar.set_position(submitted);
            bar.set_message(format!("{finished} finished"));
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = match result {
        Ok(report) => report,
        Err(RunError::Build(error)) => return Err(Failure::Usage(UsageError(error.to_string()))),
        Err(error @ RunError::LogNotEmpty { .. }) => return Err(Failure::Usage(UsageError(error.to_string()))),
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

fn progress_bar(total: u64, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} orders submitted, {msg} ({per_sec})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

fn bench(args: &BenchArgs) -> Result<ExitCode, Failure> {
    let orders = args.events.map_or(args.orders, |events| events.div_ceil(conduit_cli::bench::EVENTS_PER_ORDER));
    if orders == 0 || args.repeat == 0 {
        return Err(UsageError("--orders, --events and --repeat must be at least 1".into()).into());
    }
    let mut builder = conduit::EngineConfig::builder();
    if let Some(threads) = args.threads {
        builder = builder.workers(threads);
    }
    if let Some(batch) = args.batch {
        builder = builder.batch_events_max(batch);
    }
    let engine = builder.build().map_err(|e| UsageError(e.to_string()))?;
    let mut config = conduit_cli::bench::BenchConfig {
        orders,
        repeat: args.repeat,
        engine,
        durable_orders: args.durable_orders,
        overload_orders: args.overload_orders,
        chain_stages: args.stages.map(usize::from),
        fanout_events: args.fanout_events,
        ..Default::default()
    };
    if let Some(dir) = &args.dir {
        config.dir.clone_from(dir);
    }
    let mut out = std::io::stdout().lock();
    let written = if args.sweep {
        let batches = [16, 64, 256, 1_024, 4_096];
        let workers = [1, 2, 4];
        let points = conduit_cli::bench::sweep(&config, &batches, &workers, |batch, workers| {
            eprintln!("sweep: batch {batch}, workers {workers}");
        })
        .map_err(|e| UsageError(e.to_string()))?;
        match args.format {
            Format::Json => serde_json::to_writer(&mut out, &points).map_err(|e| e.to_string()),
            Format::Human => human::write_sweep(&mut out, &points).map_err(|e| e.to_string()),
        }
    } else {
        let report = conduit_cli::bench::run(&config, |case, round| eprintln!("bench: {case} (run {})", round + 1))
            .map_err(Failure::Run)?;
        match args.format {
            Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
            Format::Human => human::write_bench(&mut out, &report).map_err(|e| e.to_string()),
        }
    };
    written.and_then(|()| writeln!(out).map_err(|e| e.to_string())).map_err(Failure::Run)?;
    Ok(ExitCode::SUCCESS)
}

fn recover(args: &RecoverArgs) -> Result<ExitCode, Failure> {
    let (engine, sim) = read_config(args.config.as_deref())?.validate().map_err(|e| UsageError(e.to_string()))?;
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
