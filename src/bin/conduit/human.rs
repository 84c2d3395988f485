//! The human-readable form of a run report.

use std::io::{self, Write};

use conduit::orders::RunReport;

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
    writeln!(
        out,
        "  orders       confirmed {}  cancelled {} (out of stock {}, declined {})  dead-lettered {}  in flight {}",
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
    let n = &report.notifications;
    writeln!(
        out,
        "  notified     email {}  sms {}  repeats suppressed {}  dead letters {}",
        n.email_sent, n.sms_sent, n.duplicates_suppressed, report.dead_letters.total
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  {:<13} {:>7} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "stage", "workers", "processed", "emitted", "retried", "dead", "p50 us", "p99 us", "p99.9 us", "max us"
    )?;
    for s in &report.stages {
        writeln!(
            out,
            "  {:<13} {:>7} {:>11} {:>11} {:>9} {:>9} {:>9.1} {:>9.1} {:>10.1} {:>10.1}",
            s.name,
            s.workers,
            s.processed,
            s.emitted,
            s.retried,
            s.dead_lettered,
            s.latency_us.p50,
            s.latency_us.p99,
            s.latency_us.p999,
            s.latency_us.max
        )?;
    }
    if let Some(reason) = &report.poisoned {
        writeln!(out, "\n  POISONED: {reason}")?;
    }
    Ok(())
}
