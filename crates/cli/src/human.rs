//! The human-readable form of a run report.

use std::io::{self, Write};

use conduit::AlertsSnapshot;
use conduit_cli::bench::{BenchReport, Interval, PacedReport, SweepPoint};
use conduit_orders::{LoadReport, RecoverReport, RunReport, VerifyReport};

fn millions(n: f64) -> String {
    format!("{:.2} M", n / 1e6)
}

pub(crate) fn write_report(out: &mut impl Write, report: &RunReport) -> io::Result<()> {
    let o = &report.orders;
    writeln!(out, "conduit run: {} orders (seed {}) in {:.3} s", o.submitted, report.seed, report.elapsed_s)?;
    writeln!(
        out,
        "  throughput   {}/s events ({} events), {}/s orders",
        millions(report.events.per_sec),
        report.events.total,
        millions(report.orders_per_sec)
    )?;
    let unshipped =
        if report.sagas.is_some() { format!(", unshipped {}", o.cancelled_unshipped) } else { String::new() };
    writeln!(
        out,
        "  orders       confirmed {}  cancelled {} (out of stock {}, declined {}{unshipped})  dead-lettered {}  in flight {}",
        o.confirmed, o.cancelled, o.cancelled_out_of_stock, o.cancelled_declined, o.dead_lettered, o.in_flight
    )?;
    let l = &report.ledger;
    writeln!(
        out,
        "  ledger       charged {}  refunded {}  confirmed {}  double charges {}  replays {}  {}",
        l.charged_cents,
        l.refunded_cents,
        l.confirmed_total_cents,
        l.double_charges,
        l.idempotent_replays,
        if l.balanced { "balanced" } else { "UNBALANCED" }
    )?;
    write_sagas(out, report)?;
    let n = &report.notifications;
    writeln!(
        out,
        "  notified     email {}  sms {}  repeats suppressed {}",
        n.email_sent, n.sms_sent, n.duplicates_suppressed
    )?;
    let by_reason: Vec<String> = report.dead_letters.by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
    writeln!(
        out,
        "  failures     retries {}  deferred {}  timeouts {}  dead letters {}{}{}",
        report.retries.total,
        report.retries.deferred,
        l.timeouts,
        report.dead_letters.total,
        if by_reason.is_empty() { String::new() } else { format!(" ({})", by_reason.join(", ")) },
        o.poisoned.filter(|&p| p > 0).map_or(String::new(), |p| format!("  poisoned orders {p}"))
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  {:<13} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>11}",
        "stage",
        "workers",
        "processed",
        "emitted",
        "retried",
        "dead",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "lag max ms"
    )?;
    for s in &report.stages {
        let lag_max = report.monitor.as_ref().and_then(|m| m.lag_max_us.get(&s.name));
        writeln!(
            out,
            "  {:<13} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>11}",
            s.name,
            pool_size(s),
            s.processed,
            s.emitted,
            s.retried,
            s.dead_lettered,
            s.latency_us.p50,
            s.latency_us.p99,
            s.latency_us.p999,
            s.latency_us.max,
            lag_max.map_or_else(|| "-".to_owned(), |us| format!("{:.1}", us / 1_000.0))
        )?;
    }
    write_log(out, report)?;
    write_ack_latency(out, report)?;
    write_load(out, report)?;
    write_alerts(out, &report.alerts)?;
    if let Some(reason) = &report.poisoned {
        writeln!(out, "\n  POISONED: {reason}")?;
    }
    Ok(())
}

/// The saga flows' sagas, and the stock against the carrier's books.
fn write_sagas(out: &mut impl Write, report: &RunReport) -> io::Result<()> {
    let Some(sagas) = &report.sagas else { return Ok(()) };
    let compensations: Vec<String> = sagas.compensations.iter().map(|(step, n)| format!("{step} {n}")).collect();
    let e = &sagas.end_to_end_us;
    writeln!(
        out,
        "  sagas        completed {}  compensated {}  stuck {}  incomplete {}  (undone: {})  start to end p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us",
        sagas.completed,
        sagas.compensated,
        sagas.stuck,
        sagas.incomplete,
        compensations.join(", "),
        e.p50,
        e.p99,
        e.p999
    )?;
    let st = &report.stock;
    writeln!(
        out,
        "  stock        reserved {}  released {}  shipped {}  {}",
        st.reserved_units,
        st.released_units,
        st.shipped_units,
        if st.balanced {
            "balanced, SKU by SKU".to_owned()
        } else {
            format!("UNBALANCED ({} SKUs)", st.skus_unbalanced)
        }
    )?;
    Ok(())
}

/// A threshold or the value that crossed it: whole numbers as they are, fractions to four
/// significant digits.
fn figure(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.4}")
    }
}

/// Transitions printed at most; the JSON report has [`conduit::alerts::RECENT_MAX`].
const ALERTS_PRINTED: usize = 10;

fn write_alerts(out: &mut impl Write, alerts: &AlertsSnapshot) -> io::Result<()> {
    let firing: Vec<String> = alerts.firing.iter().map(|a| format!("{} on {}", a.rule.name(), a.stage)).collect();
    writeln!(
        out,
        "  alerts       {} fired, {} resolved, {}",
        alerts.fired_total,
        alerts.resolved_total,
        if firing.is_empty() { "none firing".to_owned() } else { format!("firing: {}", firing.join(", ")) }
    )?;
    let shown = alerts.recent.len().saturating_sub(ALERTS_PRINTED);
    for event in &alerts.recent[shown..] {
        let a = &event.alert;
        if event.firing {
            writeln!(
                out,
                "    {:>9.3} s  FIRING    {} on {}: {} over {}",
                event.at_s,
                a.rule.name(),
                a.stage,
                figure(a.value),
                figure(a.threshold)
            )?;
        } else {
            writeln!(out, "    {:>9.3} s  resolved  {} on {}", event.at_s, a.rule.name(), a.stage)?;
        }
    }
    Ok(())
}

pub(crate) fn write_verify(out: &mut impl Write, path: &str, v: &VerifyReport) -> io::Result<()> {
    writeln!(out, "{path}: {}", if v.ok { "ok" } else { "INVARIANTS BROKEN" })?;
    writeln!(out, "  {} frames, {} records, {} orders", v.frames, v.records, v.orders)?;
    writeln!(
        out,
        "  confirmed {}  cancelled {}  dead-lettered {}  in flight {} ({} resumable)",
        v.confirmed, v.cancelled, v.dead_lettered, v.in_flight, v.resumable
    )?;
    let l = &v.ledger;
    writeln!(
        out,
        "  ledger       charged {}  refunded {}  confirmed {}  double charges {}  {}",
        l.charged_cents,
        l.refunded_cents,
        l.confirmed_total_cents,
        l.double_charges,
        if l.balanced { "balanced" } else { "UNBALANCED" }
    )?;
    if let Some(a) = &v.provider {
        writeln!(
            out,
            "  provider     {} terminal orders on the payment provider's books: net {}  confirmed {}  double charges {}  wrong {}{}  {}",
            a.orders,
            a.charged_cents - a.refunded_cents,
            a.confirmed_total_cents,
            a.double_charges,
            a.wrong_count,
            if a.outside_window > 0 { format!("  ({} outside its window)", a.outside_window) } else { String::new() },
            if a.ok() { "agree" } else { "DISAGREE" }
        )?;
    }
    for problem in &v.problems {
        writeln!(out, "  problem: {problem}")?;
    }
    if v.problem_count > 20 {
        writeln!(out, "  ... {} orders with problems in all", v.problem_count)?;
    }
    Ok(())
}

pub(crate) fn write_recover(out: &mut impl Write, r: &RecoverReport) -> io::Result<()> {
    let resumed: Vec<String> = r.resumed.iter().map(|(stage, n)| format!("{stage} {n}")).collect();
    writeln!(
        out,
        "conduit recover: {} orders in the log, {} in flight; resumed: {}",
        r.orders_found,
        r.orders_in_flight,
        if resumed.is_empty() { "nothing".to_owned() } else { resumed.join(", ") }
    )?;
    write_report(out, &r.run)?;
    writeln!(out)?;
    write_verify(out, "the resumed orders, verified after recovery", &r.verify)
}

/// `v` with `digits` decimals, or a dash when there is none.
fn or_dash(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

pub(crate) fn write_bench(out: &mut impl Write, report: &BenchReport) -> io::Result<()> {
    writeln!(
        out,
        "conduit bench: {} orders ({} events) per run, median of {} runs, {} CPUs",
        orders_per_run(report),
        report.cases.first().map_or(0, |c| c.events),
        report.repeat,
        report.cpus
    )?;
    writeln!(out, "  {:<31} {:>10} {:>9} {:>6}  runs (M events/s)", "case", "M events/s", "CPU ns/ev", "cores")?;
    for case in &report.cases {
        let runs: Vec<String> = case.runs_events_per_sec.iter().map(|r| format!("{:.2}", r / 1e6)).collect();
        write!(
            out,
            "  {:<31} {:>10.2} {:>9} {:>6}  {}",
            case.name,
            case.events_per_sec / 1e6,
            or_dash(case.cpu_ns_per_event, 0),
            or_dash(case.cores_busy, 2),
            runs.join(" ")
        )?;
        if let (Some(per_sync), Some(bytes), Some(mb)) = (case.events_per_sync, case.bytes_per_event, case.mb_per_sec) {
            write!(out, "  [{per_sync:.0} events/commit, {bytes:.1} B/event on disk")?;
            if let Some(framed) = case.frame_bytes_per_event {
                write!(out, " ({framed:.1} in frames)")?;
            }
            write!(out, ", {mb:.1} MB/s]")?;
        }
        writeln!(out)?;
    }
    writeln!(out)?;
    for (pair, ratio) in &report.ratios {
        write!(out, "  {pair:<48} {ratio:>6.2}x")?;
        if let Some(cpu) = report.cpu_ratios.get(pair) {
            write!(out, "  ({cpu:.2}x with every core busy: CPU per event)")?;
        }
        writeln!(out)?;
        if let Some(paired) = report.paired_ratios.get(pair) {
            write!(out, "  {:<48} {}", format!("  round by round, {} rounds", paired.rounds), interval(paired))?;
            if let Some(cpu) = report.paired_cpu_ratios.get(pair) {
                write!(out, "  (CPU per event {})", interval(cpu))?;
            }
            writeln!(out)?;
        }
    }
    if let Some(m) = &report.memory {
        writeln!(
            out,
            "\n  overload: {} orders, producer {:.0}x faster than the drain ({:.0} orders/s); \
             RSS steady {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB (queues hold at most {} events)",
            m.orders,
            m.overload_factor,
            m.drain_orders_per_sec,
            m.steady_rss_mib,
            m.peak_rss_mib,
            m.growth_mib,
            m.queue_capacity_events
        )?;
    }
    Ok(())
}

/// The bench report as Markdown tables: the cases (with what the durable ones wrote), then the
/// ratios. Generated, so that BENCHMARKS.md's figures are the bench's own.
pub(crate) fn write_bench_markdown(out: &mut impl Write, report: &BenchReport) -> io::Result<()> {
    let events = report.cases.first().map_or(0, |c| c.events);
    writeln!(
        out,
        "`conduit bench`: {} orders ({events} events) per run, median of {} runs, {} CPUs\n",
        orders_per_run(report),
        report.repeat,
        report.cpus
    )?;
    writeln!(
        out,
        "| case | M events/s | CPU ns per event | cores busy | runs | events per durable commit | bytes per event on disk | in frames | MB/s |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---|---:|---:|---:|---:|")?;
    for case in &report.cases {
        let runs: Vec<String> = case.runs_events_per_sec.iter().map(|r| format!("{:.2}", r / 1e6)).collect();
        writeln!(
            out,
            "| `{}` | {:.2} | {} | {} | {} | {} | {} | {} | {} |",
            case.name,
            case.events_per_sec / 1e6,
            or_dash(case.cpu_ns_per_event, 0),
            or_dash(case.cores_busy, 2),
            runs.join(" "),
            or_dash(case.events_per_sync, 0),
            or_dash(case.bytes_per_event, 1),
            or_dash(case.frame_bytes_per_event, 1),
            or_dash(case.mb_per_sec, 1)
        )?;
    }
    writeln!(
        out,
        "\n| ratio | value | with every core busy (CPU per event) | round by round: median (95% CI) | of CPU per event |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    let paired = |intervals: &std::collections::BTreeMap<String, Interval>, pair: &str| {
        intervals.get(pair).map_or_else(|| "-".to_owned(), interval)
    };
    for (pair, ratio) in &report.ratios {
        let cpu = report.cpu_ratios.get(pair).map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.2}x"));
        let (rounds, cpu_rounds) = (paired(&report.paired_ratios, pair), paired(&report.paired_cpu_ratios, pair));
        writeln!(out, "| `{pair}` | {ratio:.2}x | {cpu} | {rounds} | {cpu_rounds} |")?;
    }
    Ok(())
}

/// A per-round ratio's median and 95% interval: `0.96x (0.94-0.98)`.
fn interval(i: &Interval) -> String {
    format!("{:.2}x ({:.2}-{:.2})", i.median, i.low, i.high)
}

/// The paced comparison: every run of each side, then the medians, as text or Markdown.
pub(crate) fn write_paced(out: &mut impl Write, report: &PacedReport, markdown: bool) -> io::Result<()> {
    let title = format!(
        "`conduit bench --paced`: {:.0} orders/s offered, {} orders a run, {} runs of each side, alternated",
        report.rate,
        report.orders,
        report.engine.len()
    );
    let header = [
        "side",
        "ack p50 ms",
        "ack p99 ms",
        "commits",
        "period ms",
        "commit p50 ms",
        "commit p99 ms",
        "ack p99 in periods",
        "B/event on disk",
    ];
    // As text: the side, then each figure right-aligned in its column.
    let text_row = |side: &str, cells: &[String]| {
        let cells: Vec<String> =
            cells.iter().zip([10, 10, 8, 9, 13, 13, 7, 9]).map(|(c, w)| format!("{c:>w$}")).collect();
        format!("  {side:<12} {}", cells.join(" "))
    };
    if markdown {
        writeln!(out, "{title}\n\n| {} |\n|---|{}", header.join(" | "), "---:|".repeat(header.len() - 1))?;
    } else {
        writeln!(out, "{}", title.replace('`', ""))?;
        let short = ["ack p50", "ack p99", "commits", "period", "commit p50", "commit p99", "periods", "B/event"];
        writeln!(out, "{}", text_row("side", &short.map(String::from)))?;
    }
    let sides = report.engine.iter().map(|r| ("engine", r)).chain(report.disk.iter().map(|r| ("disk floor", r)));
    for (side, r) in sides {
        let cells = [
            format!("{:.2}", r.ack_p50_ms),
            format!("{:.2}", r.ack_p99_ms),
            r.commits.to_string(),
            format!("{:.2}", r.period_ms),
            format!("{:.2}", r.commit_p50_ms),
            format!("{:.2}", r.commit_p99_ms),
            format!("{:.1}", r.ack_p99_periods()),
            format!("{:.1}", r.bytes_per_event),
        ];
        if markdown {
            writeln!(out, "| {side} | {} |", cells.join(" | "))?;
        } else {
            writeln!(out, "{}", text_row(side, &cells))?;
        }
    }
    let (e, d) = (&report.engine_median, &report.disk_median);
    let lines = [
        format!(
            "median ack p99: engine {:.2} ms, disk floor {:.2} ms ({:.2}x)",
            e.ack_p99_ms,
            d.ack_p99_ms,
            e.ack_p99_ms / d.ack_p99_ms.max(f64::MIN_POSITIVE)
        ),
        format!(
            "median ack p99 in group-commit periods: engine {:.1}, disk floor {:.1}",
            e.ack_p99_periods, d.ack_p99_periods
        ),
        format!(
            "median commit p99 over period: engine {:.1}, disk floor {:.1}",
            e.commit_p99_ms / e.period_ms.max(f64::MIN_POSITIVE),
            d.commit_p99_ms / d.period_ms.max(f64::MIN_POSITIVE)
        ),
    ];
    writeln!(out)?;
    for line in lines {
        writeln!(out, "{}{line}", if markdown { "- " } else { "  " })?;
    }
    Ok(())
}

pub(crate) fn write_sweep(out: &mut impl Write, points: &[SweepPoint]) -> io::Result<()> {
    writeln!(out, "  {:>8} {:>8} {:>14} {:>12}", "batch", "workers", "M events/s", "x ceiling")?;
    for p in points {
        writeln!(
            out,
            "  {:>8} {:>8} {:>14.2} {:>12.2}",
            p.batch_events_max,
            p.workers,
            p.events_per_sec / 1e6,
            p.ratio_to_ceiling
        )?;
    }
    Ok(())
}

/// The orders of one run of the report's first case (the durable cases run fewer).
fn orders_per_run(report: &BenchReport) -> u64 {
    report.cases.first().map_or(report.orders, |c| c.events / conduit_cli::bench::EVENTS_PER_ORDER)
}

/// With a log: what it wrote, and (under a size bound) what retention kept.
fn write_log(out: &mut impl Write, report: &RunReport) -> io::Result<()> {
    if let Some(log) = &report.log {
        let s = &log.stats;
        writeln!(
            out,
            "\n  log          {} ({:?}): {} events, {} commits ({} durable), {} frames, {:.1} MiB",
            log.path,
            log.durability,
            s.events_appended,
            s.commits,
            s.durable_commits,
            s.frames,
            s.bytes as f64 / f64::from(1 << 20)
        )?;
        if let Some(commit) = &log.commit_latency_us {
            writeln!(
                out,
                "  commits      a durable commit took p50 {:.1} us  p99 {:.1} us  max {:.1} us",
                commit.p50, commit.p99, commit.max
            )?;
        }
        if let Some(budget) = s.frame_budget {
            let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
            writeln!(
                out,
                "  retention    {} checkpoints, {} frames removed, {:.1} MiB of frames kept of {:.1} MiB allowed",
                s.checkpoints,
                s.frames_removed,
                mib(s.retained_bytes),
                mib(budget)
            )?;
        }
    }
    Ok(())
}

/// With a log: how long journaled submissions waited for their commit.
fn write_ack_latency(out: &mut impl Write, report: &RunReport) -> io::Result<()> {
    if let Some(ack) = &report.ack_latency_us {
        writeln!(
            out,
            "  ack latency  p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us",
            ack.p50, ack.p99, ack.p999, ack.max
        )?;
    }
    Ok(())
}

/// How the orders were offered, and their end-to-end latency.
fn write_load(out: &mut impl Write, report: &RunReport) -> io::Result<()> {
    match report.load {
        LoadReport::Saturated => writeln!(out, "  load         saturated (closed loop: latencies include queueing)")?,
        LoadReport::Rate { offered_per_s, achieved_per_s, behind_max_ms, sustained } => writeln!(
            out,
            "  load         open loop: offered {offered_per_s:.0}/s  achieved {achieved_per_s:.0}/s  at most {behind_max_ms:.1} ms behind  {}",
            if sustained { "sustained" } else { "NOT sustained" }
        )?,
    }
    if let Some(e2e) = &report.end_to_end_us {
        writeln!(
            out,
            "  end to end   p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us",
            e2e.p50, e2e.p90, e2e.p99, e2e.p999, e2e.max
        )?;
    }
    Ok(())
}

/// A stage's pool in a report: its size, and for an elastic pool its bounds.
fn pool_size(stage: &conduit::StageSnapshot) -> String {
    if stage.workers_min == stage.workers_max {
        stage.workers.to_string()
    } else {
        format!("{} ({}-{})", stage.workers, stage.workers_min, stage.workers_max)
    }
}

/// The campaign's two runs, as a table (Markdown with `markdown`), and the ratios.
pub(crate) fn write_campaign(
    out: &mut impl Write,
    report: &conduit_cli::bench::CampaignReport,
    markdown: bool,
) -> io::Result<()> {
    let c = &report.config;
    writeln!(
        out,
        "campaign: {} events/s, then {}x for {} s, then {} s watched; email waits {} us an event; {} CPUs",
        c.normal_rate,
        c.burst_factor,
        c.burst.as_secs(),
        c.after.as_secs(),
        c.email_wait.as_micros(),
        report.cpus
    )?;
    let seconds = |s: Option<f64>| s.map_or_else(|| "not within the watch".to_owned(), |s| format!("{s:.2}"));
    let header = [
        "email pool",
        "events",
        "lag p50 ms",
        "lag p99 ms",
        "lag max ms",
        "drained after burst s",
        "most workers",
        "back to min s",
        "grown",
        "shrunk",
        "us per email",
    ];
    let rows: Vec<Vec<String>> = report
        .runs
        .iter()
        .map(|r| {
            vec![
                r.pool.clone(),
                r.events.to_string(),
                format!("{:.1}", r.lag_p50_ms),
                format!("{:.1}", r.lag_p99_ms),
                format!("{:.1}", r.lag_max_ms),
                seconds(r.drained_after_burst_s),
                r.workers_max.to_string(),
                seconds(r.back_to_min_after_burst_s),
                r.grown.to_string(),
                r.shrunk.to_string(),
                format!("{:.1}", r.email_us_per_event),
            ]
        })
        .collect();
    if markdown {
        writeln!(out, "\n| {} |", header.join(" | "))?;
        writeln!(out, "|---|{}", "---:|".repeat(header.len() - 1))?;
        for row in &rows {
            writeln!(out, "| `{}` | {} |", row[0], row[1..].join(" | "))?;
        }
        writeln!(out)?;
    } else {
        for row in std::iter::once(header.map(str::to_owned).to_vec()).chain(rows) {
            writeln!(
                out,
                "  {:<14} {}",
                row[0],
                row[1..].iter().map(|c| format!("{c:>12}")).collect::<Vec<_>>().join(" ")
            )?;
        }
    }
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}x"));
    writeln!(out, "  email lag p99, fixed / elastic: {}", ratio(Some(report.lag_p99_ratio)))?;
    write!(out, "  drain after the burst, fixed / elastic: {}", ratio(report.drain_ratio))
}
