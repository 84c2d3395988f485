//! `conduit saga show|list`: the orchestrated flow's sagas as the log tells them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use conduit_orders::{self as orders, Histories, SagaState, SagaTimeline};

use crate::logcmd::{io, open, rfc3339};
use crate::{Failure, Format, UsageError};

#[derive(Debug, Subcommand)]
pub(crate) enum SagaCommand {
    /// Print one order's saga moment by moment: each step with its outcome, attempt and how
    /// long it took, each dead letter, each compensation, each notification.
    Show {
        /// The log file.
        path: PathBuf,
        /// The order.
        order: u64,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// List the sagas of a log (one line each, by order id), by state.
    List {
        /// The log file.
        path: PathBuf,
        /// Only sagas in this state: `running`, `compensating`, `completed`, `compensated` or
        /// `dead_lettered`.
        #[arg(long, value_name = "STATE", value_parser = parse_state)]
        state: Option<SagaState>,
        /// Only sagas in flight whose last record is older than this (for example `30s`, `5m`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        stuck_longer_than: Option<Duration>,
        /// Output format on stdout (JSON: one object per line).
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
}

fn parse_state(text: &str) -> Result<SagaState, String> {
    text.parse()
}

pub(crate) fn run(command: &SagaCommand) -> Result<ExitCode, Failure> {
    match command {
        SagaCommand::Show { path, order, format } => show(path, *order, *format),
        SagaCommand::List { path, state, stuck_longer_than, format } => {
            if let (Some(state), Some(_)) = (state, stuck_longer_than) {
                if !state.in_flight() {
                    return Err(Failure::Usage(UsageError(format!(
                        "--stuck-longer-than lists sagas in flight, and {} sagas have ended: drop one of them",
                        state.name()
                    ))));
                }
            }
            list(path, *state, *stuck_longer_than, *format)
        }
    }
}

fn millis(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1_000.0)
}

fn show(path: &PathBuf, order: u64, format: Format) -> Result<ExitCode, Failure> {
    let log = open(path)?;
    let records = log.stream(order).map_err(|e| Failure::Run(format!("cannot read order {order}: {e}")))?;
    if records.is_empty() {
        return Err(Failure::Usage(UsageError(format!("order {order} is not in the log"))));
    }
    let Some(timeline) = SagaTimeline::of(order, &records) else {
        return Err(Failure::Usage(UsageError(format!(
            "order {order} ran no saga (its log was written by the chain flow: see `conduit log inspect --order {order}`)"
        ))));
    };
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer(&mut out, &timeline).map_err(io)?;
            writeln!(out).map_err(io)?;
        }
        Format::Human => write_timeline(&mut out, &timeline).map_err(io)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn write_timeline(out: &mut impl Write, t: &SagaTimeline) -> std::io::Result<()> {
    writeln!(
        out,
        "order {}: saga {} {} after {} (placed {})",
        t.order,
        t.saga,
        t.state.name(),
        millis(t.duration_us),
        rfc3339(t.placed_us)
    )?;
    writeln!(out, "  {}", t.story)?;
    for m in &t.moments {
        let dead_letter = m.what == "dead_letter";
        let mut what = m.what.replace('_', " ");
        if let Some(name) = &m.name {
            what = format!("{what} {name}");
        }
        if let (Some(outcome), false) = (&m.outcome, dead_letter) {
            what = format!("{what} {outcome}");
        }
        let by = match (dead_letter, m.attempt) {
            (true, Some(n)) => format!(" after {n} attempts: {}", m.outcome.as_deref().unwrap_or_default()),
            (_, Some(0)) => " in the dead-letter sink".to_owned(),
            (_, Some(u32::MAX)) => " by recovery, from the provider's books".to_owned(),
            (_, Some(n)) => format!(" attempt {n}"),
            (_, None) => String::new(),
        };
        let took = m.took_us.map(|took| format!("  took {}", millis(took))).unwrap_or_default();
        let line = format!("  +{:>12}  {:<26} {:<12}{by}{took}", millis(m.since_placed_us), what, m.stage);
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn list(
    path: &PathBuf,
    state: Option<SagaState>,
    stuck: Option<Duration>,
    format: Format,
) -> Result<ExitCode, Failure> {
    let log = open(path)?;
    let histories = Histories::read(&log).map_err(|e| Failure::Run(format!("cannot read the log: {e}")))?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
    let listed = orders::list_sagas(&histories, state, stuck, now_us);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for saga in &listed {
        match format {
            Format::Json => {
                serde_json::to_writer(&mut out, saga).map_err(io)?;
                writeln!(out).map_err(io)?;
            }
            Format::Human => writeln!(
                out,
                "{:>10}  {:<13} last {}  {}",
                saga.order,
                saga.state.name(),
                rfc3339(saga.last_us),
                saga.story
            )
            .map_err(io)?,
        }
    }
    if format == Format::Human {
        writeln!(out, "{} sagas", listed.len()).map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(ExitCode::SUCCESS)
}
