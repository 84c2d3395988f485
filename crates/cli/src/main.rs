//! `conduit`: run the reference order pipeline and experiment with its settings.
//!
//! Data goes to stdout (`--format human|json`), progress and logs to stderr. Exit codes:
//! 0 success, 1 the run broke an invariant or failed, 2 bad input (arguments or configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use conduit_orders::PipelineFile;

mod benchcmd;
#[cfg(feature = "bridge")]
mod bridgecmd;
mod dlqcmd;
mod human;
mod latencyout;
mod logcmd;
mod metricsserve;
mod runcmd;
mod sagacmd;
mod topcmd;
mod tunecmd;

/// An embeddable event pipeline engine, driven from the command line.
#[derive(Debug, Parser)]
#[command(name = "conduit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines (alerts, warnings; more with `RUST_LOG`, for example `RUST_LOG=conduit=debug`)
    /// are written to stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Log lines to stderr, filtered by `RUST_LOG` (`warn` without it): the library never installs
/// a subscriber, the command line does.
fn init_logging(format: LogFormat) -> Result<(), UsageError> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(text) => {
            EnvFilter::try_new(&text).map_err(|e| UsageError(format!("RUST_LOG={text:?} is not a filter: {e}")))?
        }
        // The AMQP client logs a dropped connection as an error; the bridge reports it itself (a
        // warning, and a reconnection), so the client's own lines wait for RUST_LOG.
        Err(_) => EnvFilter::new("warn,lapin=off"),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Human => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| UsageError(format!("cannot install the log subscriber: {e}")))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Push a seeded workload of orders through the pipeline and report.
    Run(Box<runcmd::RunArgs>),
    /// The same run under a live terminal view: stages, rates, queue depths, lag, latency,
    /// alerts; q stops it and prints the report.
    Top(Box<topcmd::TopArgs>),
    /// Measure the engine against its baselines on the same workload, side by side.
    Bench(benchcmd::BenchArgs),
    /// Find the pool and batch sizes that move the most orders: runs the pipeline over a grid
    /// and then stage by stage, reports throughput and end-to-end p99 of every point, and
    /// writes the best as a topology file.
    Tune(tunecmd::TuneArgs),
    /// Read and check an event log.
    #[command(subcommand)]
    Log(logcmd::LogCommand),
    /// Rebuild one order from its events, now or at a past point.
    Replay(logcmd::ReplayArgs),
    /// Resume every in-flight order of a log after a crash, then verify the log.
    Recover(runcmd::RecoverArgs),
    /// List, show, redrive or purge the dead letters of a log.
    #[command(subcommand)]
    Dlq(dlqcmd::DlqCommand),
    /// Show one order's saga moment by moment, or list a log's sagas by state (the orchestrated
    /// flow's logs).
    #[command(subcommand)]
    Saga(sagacmd::SagaCommand),
    /// Nodes sharing the order stream through a RabbitMQ broker: run a node, or publish orders.
    #[cfg(feature = "bridge")]
    #[command(subcommand)]
    Bridge(bridgecmd::BridgeCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Human,
    Json,
}

/// Bad input: reported with exit code 2.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

fn main() -> ExitCode {
    quiet_storage_panics();
    let cli = Cli::parse();
    // `top` shows alerts in its view: log lines on its terminal would tear it.
    if !matches!(cli.command, Command::Top(_)) {
        if let Err(UsageError(message)) = init_logging(cli.log_format) {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.command {
        Command::Run(args) => runcmd::run(&args, false),
        Command::Top(args) => match args.attach {
            Some(addr) => topcmd::attach(addr),
            None => runcmd::run(&args.run, true),
        },
        Command::Bench(args) => benchcmd::bench(&args),
        Command::Tune(args) => tunecmd::tune(&args),
        Command::Log(command) => logcmd::run(&command),
        Command::Replay(args) => logcmd::replay(&args),
        Command::Recover(args) => runcmd::recover(&args),
        Command::Dlq(command) => dlqcmd::run(&command),
        Command::Saga(command) => sagacmd::run(&command),
        #[cfg(feature = "bridge")]
        Command::Bridge(command) => bridgecmd::run(&command),
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

/// Where the simulated payment provider keeps its books for the log at `log`: the configured
/// `simulation.payment_books`, or `LOG.payments` beside the log. The provider is another
/// company's system: its books outlive any crash of the pipeline, and `recover`, `log verify`
/// and `dlq redrive` read them.
pub(crate) fn payment_books(sim: &mut conduit_orders::SimConfig, log: &Path) -> PathBuf {
    sim.payment_books
        .get_or_insert_with(|| {
            let mut name = log.as_os_str().to_owned();
            name.push(".payments");
            PathBuf::from(name)
        })
        .clone()
}

/// Reads a configuration file, or the defaults without one.
/// Reads a topology file (bindings, stages ordered by key, an optional `[engine]` table).
pub(crate) fn read_topology(path: &Path) -> Result<conduit_orders::TopologyFile, UsageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read topology file {}: {e}", path.display())))?;
    conduit_orders::TopologyFile::from_toml_str(&text).map_err(|e| UsageError(format!("{}: {e}", path.display())))
}

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
