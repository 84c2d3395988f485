//! `conduit dlq list|show|redrive|purge`: the dead letters of a log.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use conduit::dlq::{self, DeadLetterIndex, DeadLetterState, Selection, StoredDeadLetter};
use conduit::log::Log;
use conduit::DeadLetterKind;
use conduit_orders::{self as orders, kinds, names, OrderEvent, RedrivePlan, RunError};
use serde::Serialize;

use crate::logcmd::{io, rfc3339};
use crate::{read_config, Failure, Format, UsageError};

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List the open dead letters (oldest first).
    List {
        /// The log file.
        path: PathBuf,
        #[command(flatten)]
        filter: Filter,
        /// Also list dead letters already redriven or purged.
        #[arg(long)]
        settled: bool,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Show one dead letter: its event, error chain, failure times, and its order's earlier
    /// dead letters and redrives.
    Show {
        /// The log file.
        path: PathBuf,
        /// The dead letter's id (as `list` prints it).
        id: u64,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Send dead letters back through the pipeline (each redrive is logged first); orders the
    /// log left in flight are resumed on the way. One that fails again returns to the dead
    /// letters with its history.
    Redrive {
        /// The log file.
        path: PathBuf,
        #[command(flatten)]
        select: Select,
        /// At most this many redrives per second (`N` or `N/s`).
        #[arg(long, value_name = "N/s", value_parser = parse_rate)]
        rate: Option<u64>,
        /// TOML file with `[engine]` and `[simulation]` tables (as for `run`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Take dead letters off the list for good (they stay in the log, marked purged).
    Purge {
        /// The log file.
        path: PathBuf,
        #[command(flatten)]
        select: Select,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Filter {
    /// Only those of this stage.
    #[arg(long, value_name = "STAGE")]
    stage: Option<String>,
    /// Only those of this reason (`retries_exhausted`, `rejected`, `malformed`, `panicked`,
    /// `expired`, `unroutable`, `overflow`, `handler_misuse`).
    #[arg(long, value_name = "REASON")]
    reason: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Select {
    /// This dead letter (repeatable).
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<u64>,
    #[command(flatten)]
    filter: Filter,
    /// Every open dead letter (narrowed by --stage and --reason if given).
    #[arg(long)]
    all: bool,
    /// Say what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_rate(text: &str) -> Result<u64, String> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    match number.trim().parse::<u64>() {
        Ok(rate) if rate > 0 => Ok(rate),
        _ => Err(format!("expected a positive number of redrives per second, like 100 or 100/s; got {text:?}")),
    }
}

impl Filter {
    fn selection(&self) -> Result<Selection, UsageError> {
        let stage = match &self.stage {
            None => None,
            Some(name) => Some(names::index_of(name).ok_or_else(|| {
                UsageError(format!("unknown stage {name:?}; the stages are {}", names::ALL.join(", ")))
            })?),
        };
        let kind = match &self.reason {
            None => None,
            Some(name) => Some(DeadLetterKind::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = DeadLetterKind::ALL.iter().map(|k| k.name()).collect();
                UsageError(format!("unknown reason {name:?}; the reasons are {}", known.join(", ")))
            })?),
        };
        Ok(Selection { stage, kind, ..Selection::default() })
    }
}

impl Select {
    fn selection(&self) -> Result<Selection, UsageError> {
        let selection = Selection { ids: self.ids.clone(), all: self.all, ..self.filter.selection()? };
        if selection.is_empty() {
            return Err(UsageError("say which dead letters: --id ID, --stage S, --reason R, or --all".into()));
        }
        Ok(selection)
    }
}

fn open(path: &PathBuf) -> Result<Arc<Log>, Failure> {
    crate::logcmd::open(path).map(Arc::new)
}

fn read_index(log: &Log, path: &Path) -> Result<DeadLetterIndex, Failure> {
    DeadLetterIndex::read(log).map_err(|e| Failure::Run(format!("{}: {e}", path.display())))
}

pub(crate) fn run(command: &DlqCommand) -> Result<ExitCode, Failure> {
    match command {
        DlqCommand::List { path, filter, settled, format } => list(path, filter, *settled, *format),
        DlqCommand::Show { path, id, format } => show(path, *id, *format),
        DlqCommand::Redrive { path, select, rate, config, format } => {
            redrive(path, select, *rate, config.as_ref(), *format)
        }
        DlqCommand::Purge { path, select, format } => purge(path, select, *format),
    }
}

/// A dead letter as `list` and `show` print it.
#[derive(Debug, Serialize)]
struct Listed<'a> {
    id: u64,
    order: u64,
    stage: &'static str,
    reason: &'static str,
    message: &'a str,
    attempts: u32,
    event: &'static str,
    first_failure: String,
    last_failure: String,
    #[serde(flatten)]
    state: DeadLetterState,
}

impl<'a> Listed<'a> {
    fn of(letter: &'a StoredDeadLetter) -> Self {
        let at = |us: u64| rfc3339(if us == 0 { letter.timestamp_us } else { us });
        Self {
            id: letter.id,
            order: letter.stream,
            stage: names::of_index(letter.stage),
            reason: letter.kind_name(),
            message: &letter.note.reason,
            attempts: letter.attempts,
            event: kinds::name(letter.original_kind),
            first_failure: at(letter.note.first_failure_us),
            last_failure: at(letter.note.last_failure_us),
            state: letter.state,
        }
    }
}

fn state_word(state: DeadLetterState) -> String {
    match state {
        DeadLetterState::Open => "open".into(),
        DeadLetterState::Redriven { by, .. } => format!("redriven ({by})"),
        DeadLetterState::Purged { by, .. } => format!("purged ({by})"),
    }
}

fn list(path: &PathBuf, filter: &Filter, settled: bool, format: Format) -> Result<ExitCode, Failure> {
    let selection = Selection { all: true, ..filter.selection()? };
    let log = open(path)?;
    let index = read_index(&log, path)?;
    let letters = index.filter(&selection, settled);
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let listed: Vec<Listed> = letters.iter().map(|l| Listed::of(l)).collect();
            serde_json::to_writer(&mut out, &listed).map_err(io)?;
            writeln!(out).map_err(io)?;
        }
        Format::Human => {
            writeln!(out, "{} dead letters{}", letters.len(), if settled { "" } else { " open" }).map_err(io)?;
            if !letters.is_empty() {
                writeln!(
                    out,
                    "  {:>10} {:>10} {:<13} {:<18} {:>8} {:<14} {:<27} message",
                    "id", "order", "stage", "reason", "attempts", "state", "last failure"
                )
                .map_err(io)?;
            }
            for letter in letters {
                let l = Listed::of(letter);
                writeln!(
                    out,
                    "  {:>10} {:>10} {:<13} {:<18} {:>8} {:<14} {:<27} {}",
                    l.id,
                    l.order,
                    l.stage,
                    l.reason,
                    l.attempts,
                    state_word(l.state),
                    l.last_failure,
                    l.message
                )
                .map_err(io)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `show`'s JSON.
#[derive(Debug, Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    letter: Listed<'a>,
    errors: &'a [String],
    errors_dropped: u32,
    correlation: u64,
    payload_hex: String,
    decoded: Option<String>,
    history: Vec<Listed<'a>>,
}

fn show(path: &PathBuf, id: u64, format: Format) -> Result<ExitCode, Failure> {
    let log = open(path)?;
    let index = read_index(&log, path)?;
    let letter = index.get(id).ok_or_else(|| UsageError(format!("{} holds no dead letter {id}", path.display())))?;
    let shown = Shown {
        letter: Listed::of(letter),
        errors: &letter.note.errors,
        errors_dropped: letter.note.errors_dropped,
        correlation: letter.correlation,
        payload_hex: letter.payload.iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        }),
        decoded: OrderEvent::decode(&letter.payload).map(|e| format!("{e:?}")),
        history: index.history(letter.stream).into_iter().map(Listed::of).collect(),
    };
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer(&mut out, &shown).map_err(io)?;
            writeln!(out).map_err(io)?;
        }
        Format::Human => {
            let l = &shown.letter;
            writeln!(out, "dead letter {} of order {} ({})", l.id, l.order, state_word(l.state)).map_err(io)?;
            writeln!(out, "  stage        {}", l.stage).map_err(io)?;
            writeln!(out, "  reason       {}: {}", l.reason, l.message).map_err(io)?;
            writeln!(out, "  attempts     {}", l.attempts).map_err(io)?;
            writeln!(out, "  failures     first {}, last {}", l.first_failure, l.last_failure).map_err(io)?;
            writeln!(out, "  correlation  {}", shown.correlation).map_err(io)?;
            writeln!(out, "  event        {} {}", l.event, shown.decoded.as_deref().unwrap_or("(does not decode)"))
                .map_err(io)?;
            writeln!(out, "  payload      {}", shown.payload_hex).map_err(io)?;
            writeln!(out, "  error chain  ({} kept, {} dropped)", shown.errors.len(), shown.errors_dropped)
                .map_err(io)?;
            for (i, error) in shown.errors.iter().enumerate() {
                writeln!(out, "    {:>2}. {error}", i + 1).map_err(io)?;
            }
            writeln!(out, "  this order's dead letters, oldest first:").map_err(io)?;
            for h in &shown.history {
                writeln!(
                    out,
                    "    {:>10}  {:<13} {:<18} {:<14} {}",
                    h.id,
                    h.stage,
                    h.reason,
                    state_word(h.state),
                    h.last_failure
                )
                .map_err(io)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn redrive(
    path: &PathBuf,
    select: &Select,
    rate: Option<u64>,
    config: Option<&PathBuf>,
    format: Format,
) -> Result<ExitCode, Failure> {
    let selection = select.selection()?;
    let (engine, mut sim) =
        read_config(config.map(PathBuf::as_path))?.validate().map_err(|e| UsageError(e.to_string()))?;
    crate::payment_books(&mut sim, path);
    let log = open(path)?;
    let plan = RedrivePlan { selection, dry_run: select.dry_run, rate_per_sec: rate };
    let report = match orders::redrive(&engine, &sim, &log, &plan) {
        Ok(report) => report,
        Err(RunError::Build(error)) => return Err(Failure::Usage(UsageError(error.to_string()))),
        Err(error) => return Err(Failure::Run(error.to_string())),
    };
    log.close().map_err(|e| Failure::Run(format!("cannot close the log: {e}")))?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer(&mut out, &report).map_err(io)?;
            writeln!(out).map_err(io)?;
        }
        Format::Human => {
            let verb = if report.dry_run { "would redrive" } else { "redrove" };
            writeln!(out, "{verb} {} of {} selected dead letters", report.redriven.len(), report.selected)
                .map_err(io)?;
            for item in report.redriven.iter().take(20) {
                writeln!(
                    out,
                    "  {:>10}  order {:<10} {} ({}) -> {} generation {}",
                    item.id, item.order, item.from_stage, item.reason, item.to_stage, item.generation
                )
                .map_err(io)?;
            }
            if report.redriven.len() > 20 {
                writeln!(out, "  ... and {} more", report.redriven.len() - 20).map_err(io)?;
            }
            for skipped in &report.skipped {
                writeln!(out, "  skipped: {skipped}").map_err(io)?;
            }
            if let Some(run) = &report.run {
                writeln!(out, "  dead-lettered again: {}", report.dead_lettered_again).map_err(io)?;
                crate::human::write_report(&mut out, run).map_err(io)?;
            }
            if let Some(verify) = &report.verify {
                crate::human::write_verify(&mut out, &path.display().to_string(), verify).map_err(io)?;
            }
        }
    }
    let mut broken = report.run.as_ref().map(orders::RunReport::violations).unwrap_or_default();
    if let Some(verify) = &report.verify {
        broken.extend(verify.problems.iter().cloned());
    }
    for problem in &broken {
        eprintln!("invariant broken: {problem}");
    }
    Ok(if broken.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `purge`'s JSON.
#[derive(Debug, Serialize)]
struct PurgeReport {
    dry_run: bool,
    purged: u64,
    ids: Vec<u64>,
}

fn purge(path: &PathBuf, select: &Select, format: Format) -> Result<ExitCode, Failure> {
    let selection = select.selection()?;
    let log = open(path)?;
    let index = read_index(&log, path)?;
    let letters = index.select(&selection);
    let purged = if select.dry_run {
        0
    } else {
        dlq::purge(&log, &letters).map_err(|e| Failure::Run(format!("cannot purge: {e}")))?
    };
    log.close().map_err(|e| Failure::Run(format!("cannot close the log: {e}")))?;
    let report = PurgeReport { dry_run: select.dry_run, purged, ids: letters.iter().map(|l| l.id).collect() };
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => serde_json::to_writer(&mut out, &report).map_err(io)?,
        Format::Human if select.dry_run => write!(out, "would purge {} dead letters", report.ids.len()).map_err(io)?,
        Format::Human => write!(out, "purged {} dead letters", report.purged).map_err(io)?,
    }
    writeln!(out).map_err(io)?;
    Ok(ExitCode::SUCCESS)
}
