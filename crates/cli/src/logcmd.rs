//! `conduit log verify|inspect` and `conduit replay`: reading a log, never changing what it says.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::Subcommand;
use conduit::log::{Aggregate, Log, LogOptions, Record, Retention, KIND_DEAD_LETTER};
use conduit_orders::{self as orders, kinds, names, OrderEvent, OrderHistory, OrderStatus};
use serde::Serialize;

use crate::{human, Failure, Format, UsageError};

#[derive(Debug, Subcommand)]
pub(crate) enum LogCommand {
    /// Check every invariant: frame checksums, contiguous versions, every order terminal or
    /// resumable, the ledger balanced. Exit 0 only if all hold.
    Verify {
        /// The log file.
        path: PathBuf,
        /// Report format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Apply a retention policy now: remove the oldest frames beyond `--max-bytes` or older than
    /// `--max-age`, never one a message in flight needs; the file's freed pages are reused by
    /// later appends.
    Compact {
        /// The log file.
        path: PathBuf,
        /// Keep at most this much (for example `2GiB`, `500MB`, or bytes).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_bytes: Option<u64>,
        /// Remove frames older than this (for example `7d`, `90m`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
        /// Report format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Print events decoded, with versions and timestamps (JSON: one object per line).
    Inspect {
        /// The log file.
        path: PathBuf,
        /// Only this order's events (found through the index, without a full scan).
        #[arg(long, value_name = "ID")]
        order: Option<u64>,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// List the log's consumers: each one's committed position, when it committed, whether it
    /// holds retention, and its lag in records and in time.
    Consumers {
        /// The log file.
        path: PathBuf,
        /// Output format on stdout.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReplayArgs {
    /// The log file.
    path: PathBuf,
    /// The order to rebuild.
    #[arg(long, value_name = "ID")]
    order: u64,
    /// The state after this version.
    #[arg(long, value_name = "V", conflicts_with = "as_of")]
    at_version: Option<u32>,
    /// The state at this time: RFC 3339 (`2026-11-27T04:00:00Z`) or microseconds since the epoch.
    #[arg(long, value_name = "TIME")]
    as_of: Option<String>,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

pub(crate) fn open(path: &PathBuf) -> Result<Log, Failure> {
    Log::open_existing(path, LogOptions::default()).map_err(|e| Failure::Run(format!("cannot open the log: {e}")))
}

pub(crate) fn io(e: impl std::fmt::Display) -> Failure {
    Failure::Run(format!("cannot write the output: {e}"))
}

pub(crate) fn run(command: &LogCommand) -> Result<ExitCode, Failure> {
    match command {
        LogCommand::Verify { path, format } => verify(path, *format),
        LogCommand::Inspect { path, order, limit, format } => inspect(path, *order, *limit, *format),
        LogCommand::Compact { path, max_bytes, max_age, format } => {
            compact(path, Retention { max_bytes: *max_bytes, max_age: *max_age }, *format)
        }
        LogCommand::Consumers { path, format } => consumers(path, *format),
    }
}

fn consumers(path: &PathBuf, format: Format) -> Result<ExitCode, Failure> {
    let log = open(path)?;
    let consumers = log.consumers().map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "consumers": consumers })).map_err(io)?;
            writeln!(out).map_err(io)?;
        }
        Format::Human => {
            if consumers.is_empty() {
                writeln!(out, "no consumers").map_err(io)?;
            }
            let unknown = || "unknown".to_owned();
            for c in &consumers {
                writeln!(
                    out,
                    "{}: at {}, committed {}, {}; lag {} records, {}{}",
                    c.name,
                    c.position,
                    rfc3339(c.committed_us),
                    if c.holds_retention { "holds retention" } else { "does not hold retention" },
                    c.lag_records.map_or_else(unknown, |n| n.to_string()),
                    c.lag_us.map_or_else(unknown, |us| format!("{:.3} s", us as f64 / 1e6)),
                    if c.behind_retention {
                        "; retention removed frames it had not read (they will be skipped)"
                    } else {
                        ""
                    },
                )
                .map_err(io)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A size: bytes, or with a unit (`2GiB`, `500 MB`).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = text.trim().parse().map_err(|e| format!("not a size ({e}): try 2GiB or 500MB"))?;
    match size.as_u64() {
        0 => Err("must be above zero".into()),
        bytes => Ok(bytes),
    }
}

#[derive(Debug, Serialize)]
struct Compacted {
    frames_removed: u64,
    bytes_before: u64,
    bytes_after: u64,
    first_frame: u64,
    in_flight: u64,
}

fn compact(path: &PathBuf, retention: Retention, format: Format) -> Result<ExitCode, Failure> {
    if retention.is_unbounded() {
        return Err(UsageError("nothing to compact by: give --max-bytes, --max-age, or both".into()).into());
    }
    // Read what must stay before anything is removed: a size below what the work in flight
    // needs is refused, with nothing deleted.
    let (before, in_flight) = {
        let log = open(path)?;
        let before = log.opened_with().bytes;
        if let (Some(max), Some(oldest)) = (retention.max_bytes, log.in_flight_at_open().iter().map(|m| m.frame).min())
        {
            let pinned = log.frame_bytes_from(oldest).map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
            if retention.frame_budget().is_some_and(|budget| pinned > budget) {
                return Err(UsageError(format!(
                    "--max-bytes {max} would remove work in flight: the messages in flight ({}) reach back to frame {oldest}, \
                     and the frames from there take {pinned} bytes, more than the {} a log of {max} bytes keeps for \
                     frames; nothing was removed",
                    log.in_flight_at_open().len(),
                    retention.frame_budget().unwrap_or(max),
                ))
                .into());
            }
        }
        (before, log.in_flight_at_open().len() as u64)
    };
    let options = LogOptions { retention, ..LogOptions::default() };
    let log = Log::open_existing(path, options).map_err(|e| Failure::Run(format!("cannot open the log: {e}")))?;
    log.checkpoint().map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    let stats = log.stats();
    log.close().map_err(|e| Failure::Run(format!("cannot close the log: {e}")))?;
    let report = Compacted {
        frames_removed: stats.frames_removed,
        bytes_before: before,
        bytes_after: stats.retained_bytes,
        first_frame: log.opened_with().first_frame + stats.frames_removed,
        in_flight,
    };
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => serde_json::to_writer(&mut out, &report).map_err(io)?,
        Format::Human => write!(
            out,
            "{}: removed {} frames; {} -> {} bytes of frames; {} messages in flight kept",
            path.display(),
            report.frames_removed,
            report.bytes_before,
            report.bytes_after,
            report.in_flight
        )
        .map_err(io)?,
    }
    writeln!(out).map_err(io)?;
    Ok(ExitCode::SUCCESS)
}

fn verify(path: &PathBuf, format: Format) -> Result<ExitCode, Failure> {
    let log = open(path)?;
    // The provider's books, when a run of this log kept them: the terminal orders are checked
    // on them too.
    let mut sim = orders::SimConfig::default();
    let books = crate::payment_books(&mut sim, path);
    let report = if books.exists() {
        let provider = orders::open_provider(&sim).map_err(|e| Failure::Run(e.to_string()))?.expect("books are set");
        orders::verify_with_provider(&log, &provider)
    } else {
        orders::verify(&log)
    }
    .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer(&mut out, &report).map_err(io).and_then(|()| writeln!(out).map_err(io))?;
        }
        Format::Human => human::write_verify(&mut out, &path.display().to_string(), &report).map_err(io)?,
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A record as `inspect` and `replay` show it.
#[derive(Debug, Serialize)]
struct RecordView<'a> {
    id: u64,
    stream: u64,
    version: u32,
    kind: &'static str,
    stage: &'static str,
    time: String,
    timestamp_us: u64,
    correlation: u64,
    causation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<conduit_orders::Order>,
    /// A saga record's fact, for people (`charge succeeded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    fact: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    note: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    attempts: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub(crate) fn rfc3339(timestamp_us: u64) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(timestamp_us)).to_string()
}

fn view(record: &Record) -> RecordView<'_> {
    RecordView {
        id: record.id,
        stream: record.stream,
        version: record.version,
        kind: kinds::name(if record.kind == KIND_DEAD_LETTER { KIND_DEAD_LETTER } else { record.kind }),
        stage: names::of_index(record.stage),
        time: rfc3339(record.timestamp_us),
        timestamp_us: record.timestamp_us,
        correlation: record.correlation,
        causation: record.causation,
        order: OrderEvent::decode(&record.payload).map(|e| e.order),
        fact: (record.kind == kinds::SAGA).then(|| conduit_orders::describe_fact(&record.payload)).flatten(),
        note: &record.note,
        attempts: record.attempts,
    }
}

fn write_view(out: &mut impl Write, record: &Record, format: Format) -> std::io::Result<()> {
    let v = view(record);
    match format {
        Format::Json => {
            serde_json::to_writer(&mut *out, &v)?;
            writeln!(out)
        }
        Format::Human => {
            write!(out, "{} order {:>8} v{:<3} {:<13} {:<12}", v.time, v.stream, v.version, v.kind, v.stage)?;
            if let Some(order) = v.order {
                write!(out, " sku {} x{} {} cents", order.sku, order.quantity, order.amount_cents)?;
            }
            if let Some(fact) = &v.fact {
                write!(out, " {fact}")?;
            }
            if !v.note.is_empty() {
                write!(out, " after {} attempts: {}", v.attempts, v.note)?;
            }
            writeln!(out)
        }
    }
}

fn inspect(path: &PathBuf, order: Option<u64>, limit: Option<u64>, format: Format) -> Result<ExitCode, Failure> {
    let log = open(path)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let limit = limit.unwrap_or(u64::MAX);
    let mut shown = 0;
    let mut failed = None;
    let result = match order {
        Some(id) => log.stream(id).map(|records| {
            for record in records.iter().take(usize::try_from(limit).unwrap_or(usize::MAX)) {
                if let Err(e) = write_view(&mut out, record, format) {
                    failed.get_or_insert(e);
                }
            }
        }),
        None => log.for_each(|record| {
            if shown < limit && failed.is_none() {
                shown += 1;
                if let Err(e) = write_view(&mut out, record, format) {
                    failed = Some(e);
                }
            }
        }),
    };
    out.flush().map_err(io)?;
    if let Some(e) = failed {
        // A closed pipe (`| head`) is a normal way to stop reading.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(io(e));
        }
    }
    result.map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct Replay<'a> {
    order_id: u64,
    order: Option<conduit_orders::Order>,
    version: u32,
    status: OrderStatus,
    next: Vec<&'static str>,
    problem: Option<String>,
    events: Vec<RecordView<'a>>,
}

fn parse_time(text: &str) -> Result<u64, UsageError> {
    if let Ok(micros) = text.parse::<u64>() {
        return Ok(micros);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| {
        UsageError(format!(
            "--as-of {text:?}: {e} (give RFC 3339, such as 2026-11-27T04:00:00Z, or epoch microseconds)"
        ))
    })?;
    let since = time.duration_since(UNIX_EPOCH).map_err(|_| UsageError(format!("--as-of {text:?} is before 1970")))?;
    Ok(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
}

pub(crate) fn replay(args: &ReplayArgs) -> Result<ExitCode, Failure> {
    let as_of = args.as_of.as_deref().map(parse_time).transpose()?;
    let log = open(&args.path)?;
    let records = log.stream(args.order).map_err(|e| Failure::Run(format!("{}: {e}", args.path.display())))?;
    let kept: Vec<&Record> = records
        .iter()
        .take_while(|r| args.at_version.is_none_or(|v| r.version <= v) && as_of.is_none_or(|t| r.timestamp_us <= t))
        .collect();
    if kept.is_empty() && records.is_empty() {
        return Err(Failure::Run(format!("order {} has no events in {}", args.order, args.path.display())));
    }
    let mut history = OrderHistory::default();
    for record in &kept {
        history.apply(record);
    }
    let replay = Replay {
        order_id: args.order,
        order: history.order,
        version: history.version,
        status: history.status(),
        next: history.resume().into_iter().map(|(stage, _)| stage).collect(),
        problem: history.problem.clone(),
        events: kept.iter().map(|r| view(r)).collect(),
    };
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => {
            serde_json::to_writer(&mut out, &replay).map_err(io).and_then(|()| writeln!(out).map_err(io))?;
        }
        Format::Human => {
            writeln!(
                out,
                "order {} at version {} of {}: {:?}{}",
                replay.order_id,
                replay.version,
                records.last().map_or(0, |r| r.version),
                replay.status,
                if replay.next.is_empty() { String::new() } else { format!(", next: {}", replay.next.join(", ")) }
            )
            .map_err(io)?;
            for record in &kept {
                write_view(&mut out, record, Format::Human).map_err(io)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
