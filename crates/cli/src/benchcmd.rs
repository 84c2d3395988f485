//! `conduit bench`: the engine against its baselines, from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{human, Failure, Format, UsageError};

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
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
    /// Run the campaign instead of the cases: a 10 s burst of 10x the normal rate in front of a
    /// slow email stage (50 us a event), its pool fixed at 1 and then elastic (1 to 16).
    #[arg(long, conflicts_with = "sweep")]
    campaign: bool,
    /// Instead of the cases: durable acknowledgement latency at this offered rate (orders a
    /// second, for example 100000/s), the pipeline with an immediate log against the disk's own
    /// floor (one writer, a write and an fdatasync per group, the same bytes), --durable-orders
    /// orders a run, --repeat runs of each.
    #[arg(long, value_name = "N/s", value_parser = crate::runcmd::parse_rate, conflicts_with_all = ["sweep", "campaign"])]
    paced: Option<f64>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Print the report as Markdown tables (for BENCHMARKS.md) instead of --format.
    #[arg(long, conflicts_with_all = ["format", "sweep"])]
    markdown: bool,
    /// Run only these cases (comma-separated names, as the report prints them), for example
    /// `engine_memory,engine_memory_untracked` to measure one ratio over many rounds.
    #[arg(long, value_name = "NAMES", value_delimiter = ',', conflicts_with_all = ["sweep", "campaign", "paced"])]
    cases: Vec<String>,
}

pub(crate) fn bench(args: &BenchArgs) -> Result<ExitCode, Failure> {
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
        cases: args.cases.clone(),
        ..Default::default()
    };
    if let Some(dir) = &args.dir {
        config.dir.clone_from(dir);
    }
    for name in &args.cases {
        if !conduit_cli::bench::CASES.contains(&name.as_str()) {
            let cases = conduit_cli::bench::CASES.join(", ");
            return Err(UsageError(format!("--cases: no case is named {name:?}; the cases are {cases}")).into());
        }
        if !conduit_cli::bench::case_runs(&config, name) {
            return Err(UsageError(format!(
                "--cases: {name} does not run with these settings (the durable cases need --durable-orders above 0, \
                 the chain ones --stages, the fan-out ones --fanout-events above 0)"
            ))
            .into());
        }
    }
    let mut out = std::io::stdout().lock();
    let written = if let Some(rate) = args.paced {
        if config.durable_orders == 0 {
            return Err(UsageError("--paced runs --durable-orders orders: give it at least 1".into()).into());
        }
        let paced = conduit_cli::bench::PacedConfig {
            rate,
            orders: config.durable_orders,
            repeat: config.repeat,
            engine: config.engine.clone(),
            dir: config.dir.clone(),
        };
        let report =
            conduit_cli::bench::paced(&paced, |side, round| eprintln!("bench: paced {side} (run {})", round + 1))
                .map_err(Failure::Run)?;
        match args.format {
            _ if args.markdown => human::write_paced(&mut out, &report, true).map_err(|e| e.to_string()),
            Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
            Format::Human => human::write_paced(&mut out, &report, false).map_err(|e| e.to_string()),
        }
    } else if args.campaign {
        let campaign = conduit_cli::bench::CampaignConfig::default();
        let report = conduit_cli::bench::campaign(&campaign, |pool| eprintln!("campaign: email pool {pool}"))
            .map_err(Failure::Run)?;
        match args.format {
            _ if args.markdown => human::write_campaign(&mut out, &report, true).map_err(|e| e.to_string()),
            Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
            Format::Human => human::write_campaign(&mut out, &report, false).map_err(|e| e.to_string()),
        }
    } else if args.sweep {
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
            _ if args.markdown => human::write_bench_markdown(&mut out, &report).map_err(|e| e.to_string()),
            Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
            Format::Human => human::write_bench(&mut out, &report).map_err(|e| e.to_string()),
        }
    };
    written.and_then(|()| writeln!(out).map_err(|e| e.to_string())).map_err(Failure::Run)?;
    Ok(ExitCode::SUCCESS)
}
