//! What a run reports: orders, events, retries, dead letters, the ledger, stock, breakers, log.

use std::collections::BTreeMap;

use serde::Serialize;

use super::ports::{LedgerFigures, NotifyFigures, StockFigures};
use conduit::breaker::BreakerReport;
use conduit::log::{Durability, LogStats};
use conduit::rpc::RpcStats;
use conduit::LatencySummary;

/// Orders by where they ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OrderCounts {
    /// Accepted by the pipeline.
    pub submitted: u64,
    /// Charged, reserved and shipped.
    pub confirmed: u64,
    /// Cancelled, with compensation applied.
    pub cancelled: u64,
    /// Of the cancelled: for lack of stock.
    pub cancelled_out_of_stock: u64,
    /// Of the cancelled: payment declined.
    pub cancelled_declined: u64,
    /// Of the cancelled: the carrier failed the shipment (the saga flows).
    pub cancelled_unshipped: u64,
    /// Given up on, with compensation applied.
    pub dead_lettered: u64,
    /// Not yet terminal (0 after a drained run).
    pub in_flight: u64,
    /// Orders generated with a malformed payload (`simulation.poison_rate`), when this run
    /// generated the orders; each must end in the dead letters as `malformed`.
    pub poisoned: Option<u64>,
}

/// Retries over all stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryReport {
    /// Attempts that ended in a retry (transient failures, conflicts, panics).
    pub total: u64,
    /// Times work waited for an open circuit breaker (attempts not spent).
    pub deferred: u64,
    /// Retries per stage.
    pub by_stage: BTreeMap<String, u64>,
}

/// Events handled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EventCounts {
    /// Events finished by all stages together.
    pub total: u64,
    /// `total / elapsed_s`.
    pub per_sec: f64,
}

/// The payment ledger against the confirmed orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LedgerReport {
    /// Sum of every charge.
    pub charged_cents: u64,
    /// Sum of every refund.
    pub refunded_cents: u64,
    /// What the confirmed orders cost.
    pub confirmed_total_cents: u64,
    /// Orders charged more than once.
    pub double_charges: u64,
    /// Repeated requests answered without a second effect.
    pub idempotent_replays: u64,
    /// Charge attempts that timed out.
    pub timeouts: u64,
    /// `charged - refunded == confirmed_total` and no double charge.
    pub balanced: bool,
}

impl LedgerReport {
    pub(crate) fn new(ledger: LedgerFigures, confirmed_total_cents: u64) -> Self {
        let balanced = ledger.double_charges == 0
            && ledger.charged_cents.checked_sub(ledger.refunded_cents) == Some(confirmed_total_cents);
        Self {
            charged_cents: ledger.charged_cents,
            refunded_cents: ledger.refunded_cents,
            confirmed_total_cents,
            double_charges: ledger.double_charges,
            idempotent_replays: ledger.idempotent_replays,
            timeouts: ledger.timeouts,
            balanced,
        }
    }
}

/// Stock movements against the confirmed orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StockReport {
    /// Units reserved.
    pub reserved_units: u64,
    /// Units released by compensation.
    pub released_units: u64,
    /// Units in confirmed orders.
    pub confirmed_units: u64,
    /// Units the carrier shipped and was not asked to cancel, on its own books.
    pub shipped_units: u64,
    /// SKUs whose units taken from stock (reserved less released) differ from the units the
    /// carrier shipped of them.
    pub skus_unbalanced: u64,
    /// `reserved - released == confirmed == shipped`, and for every SKU the units taken from
    /// stock are the units shipped.
    pub balanced: bool,
}

impl StockReport {
    pub(crate) fn new(stock: StockFigures, confirmed_units: u64, shipped_units: u64, skus_unbalanced: u64) -> Self {
        let taken = stock.reserved_units.checked_sub(stock.released_units);
        Self {
            reserved_units: stock.reserved_units,
            released_units: stock.released_units,
            confirmed_units,
            shipped_units,
            skus_unbalanced,
            balanced: taken == Some(confirmed_units) && shipped_units == confirmed_units && skus_unbalanced == 0,
        }
    }
}

/// How the order sagas ended (the saga flows; in the choreographed one, as its services counted:
/// no book sees a whole saga there).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagasReport {
    /// Sagas started.
    pub started: u64,
    /// Sagas whose every step succeeded.
    pub completed: u64,
    /// Sagas undone: a step failed and every completed step was compensated.
    pub compensated: u64,
    /// Sagas that failed past the point of no return.
    pub incomplete: u64,
    /// Sagas still in progress once the pipeline drained (choreographed: orders the carrier
    /// heard one answer for and not the other).
    pub stuck: u64,
    /// Compensations run, by the step undone (choreographed: undoings asked for, each a no-op on
    /// the provider's books if there was nothing to undo).
    pub compensations: BTreeMap<String, u64>,
    /// From the saga's start to its end, in microseconds (choreographed: accepted to confirmed
    /// or cancelled, one order in eight, as `terminal_us`).
    pub end_to_end_us: LatencySummary,
}

impl From<conduit::saga::SagaReport> for SagasReport {
    fn from(report: conduit::saga::SagaReport) -> Self {
        Self {
            started: report.started,
            completed: report.completed,
            compensated: report.compensated,
            incomplete: report.incomplete,
            stuck: report.running,
            compensations: report.compensations,
            end_to_end_us: report.end_to_end_us,
        }
    }
}

/// Dead letters by stage and by reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterReport {
    /// All dead letters, notifications included.
    pub total: u64,
    /// Count per stage.
    pub by_stage: BTreeMap<String, u64>,
    /// Count per reason (`retries_exhausted`, `malformed`, `expired`, ...).
    pub by_reason: BTreeMap<String, u64>,
    /// Dead-lettered orders whose compensation failed.
    pub compensation_failures: u64,
}

/// Everything `conduit run` reports; `--format json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The seed of the workload and faults.
    pub seed: u64,
    /// Orders by where they ended.
    pub orders: OrderCounts,
    /// Events handled.
    pub events: EventCounts,
    /// Retries.
    pub retries: RetryReport,
    /// Orders submitted per second of the whole run.
    pub orders_per_sec: f64,
    /// Seconds from start to fully drained.
    pub elapsed_s: f64,
    /// Per-stage figures.
    pub stages: Vec<conduit::StageSnapshot>,
    /// The payment ledger.
    pub ledger: LedgerReport,
    /// Stock movements.
    pub stock: StockReport,
    /// Notifications sent.
    pub notifications: NotifyFigures,
    /// Dead letters.
    pub dead_letters: DeadLetterReport,
    /// Set if a worker died.
    pub poisoned: Option<String>,
    /// The log, when the run was journaled.
    pub log: Option<LogReport>,
    /// With a log: time from journaling a submitted batch to its commit.
    pub ack_latency_us: Option<LatencySummary>,
    /// With `simulation.fraud_check`: the request/reply traffic to the fraud service.
    pub fraud_check: Option<RpcStats>,
    /// Each port's circuit breaker: state at the end and times it opened.
    pub breakers: BTreeMap<String, BreakerReport>,
    /// How the orders were offered: as fast as the pipeline took them, or on a schedule.
    pub load: LoadReport,
    /// Each order's time from acceptance (with an offered rate: from when the schedule meant to
    /// send it) until all its work had finished; `None` without completion tracking.
    pub end_to_end_us: Option<LatencySummary>,
    /// Alerts firing at the end, the last transitions, and how many fired and resolved.
    pub alerts: conduit::AlertsSnapshot,
    /// What the snapshots taken during the run saw ([`run_until`](crate::run_until) takes them).
    pub monitor: Option<crate::MonitorReport>,
    /// Each order's time from acceptance until it was confirmed or cancelled (its terminal
    /// state, before the notifications that follow), measured on one order in eight;
    /// dead-lettered orders are not included. `None` without completion tracking.
    pub terminal_us: Option<LatencySummary>,
    /// How the order flow was driven.
    pub flow: crate::Flow,
    /// How the order sagas ended (the saga flows).
    pub sagas: Option<SagasReport>,
}

/// How a run offered its orders.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum LoadReport {
    /// Closed loop: each submission waited for room, so latencies measure a saturated
    /// pipeline's queueing, and the rate is whatever it sustained.
    Saturated,
    /// Open loop: orders offered on a fixed schedule; latencies count from each order's slot in
    /// the schedule, so waiting behind a slow pipeline is counted (no coordinated omission).
    Rate {
        /// Orders a second the schedule offered.
        offered_per_s: f64,
        /// Orders a second actually submitted, over the schedule's span.
        achieved_per_s: f64,
        /// Most the generator was ever behind its schedule, in milliseconds.
        behind_max_ms: f64,
        /// Whether it kept up: at least 99% of the offered rate and never a second behind.
        sustained: bool,
    },
}

/// The log's part of a run report.
#[derive(Debug, Clone, Serialize)]
pub struct LogReport {
    /// The file.
    pub path: String,
    /// When commits were durable.
    pub durability: Durability,
    /// What the log wrote.
    #[serde(flatten)]
    pub stats: LogStats,
    /// How long its durable commits took (redb's page writes and fsync), in microseconds.
    pub commit_latency_us: Option<conduit::LatencySummary>,
    /// Set when the final sync failed.
    pub sync_error: Option<String>,
    /// Records this run appended besides its events' (a redrive's records; the saga facts a
    /// recovery added from the provider's books).
    pub other_records: u64,
    /// Saga facts beyond one record per event handled (the orchestrated flow: a compensation
    /// stage's event records each compensation it ran, none when nothing was owed; a step's dead
    /// letter also records its timeout and the compensations its sink ran).
    pub saga_records_beyond_events: i64,
}

impl RunReport {
    /// Every invariant the run must keep; empty when all hold.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        let mut violations = Vec::new();
        let o = &self.orders;
        if o.submitted != o.confirmed + o.cancelled + o.dead_lettered {
            violations.push(format!(
                "submitted {} != confirmed {} + cancelled {} + dead_lettered {}",
                o.submitted, o.confirmed, o.cancelled, o.dead_lettered
            ));
        }
        if o.in_flight != 0 {
            violations.push(format!("{} orders still in flight", o.in_flight));
        }
        if !self.ledger.balanced {
            violations.push(format!(
                "ledger unbalanced: charged {} - refunded {} != confirmed {} (double charges: {})",
                self.ledger.charged_cents,
                self.ledger.refunded_cents,
                self.ledger.confirmed_total_cents,
                self.ledger.double_charges
            ));
        }
        if !self.stock.balanced {
            violations.push(format!(
                "stock unbalanced: reserved {} - released {} != confirmed {} != shipped {} (SKUs unbalanced: {})",
                self.stock.reserved_units,
                self.stock.released_units,
                self.stock.confirmed_units,
                self.stock.shipped_units,
                self.stock.skus_unbalanced
            ));
        }
        if let Some(sagas) = &self.sagas {
            if sagas.stuck + sagas.incomplete > 0 {
                violations.push(format!("{} sagas stuck, {} incomplete", sagas.stuck, sagas.incomplete));
            }
        }
        if let Some(reason) = &self.poisoned {
            violations.push(format!("engine poisoned: {reason}"));
        }
        let malformed = self.dead_letters.by_reason.get("malformed").copied().unwrap_or(0);
        if let Some(poisoned) = self.orders.poisoned {
            if malformed != poisoned {
                violations.push(format!("{malformed} orders dead-lettered as malformed, but {poisoned} were poisoned"));
            }
        }
        if let Some(log) = &self.log {
            let appended = i128::from(log.stats.events_appended - log.stats.engine_records);
            let expected = i128::from(self.events.total)
                + i128::from(log.other_records)
                + i128::from(log.saga_records_beyond_events);
            if appended != expected {
                violations.push(format!(
                    "log appended {appended} events but the pipeline handled {} (and {} other records were written, {} \
                     saga facts beyond one per event)",
                    self.events.total, log.other_records, log.saga_records_beyond_events
                ));
            }
            if let Some(error) = &log.sync_error {
                violations.push(format!("final log sync failed: {error}"));
            }
        }
        violations
    }
}
