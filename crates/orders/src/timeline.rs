//! One saga's story as the log tells it (`conduit saga show`), and the sagas of a log by state
//! (`conduit saga list`).

use std::time::Duration;

use conduit::log::{Aggregate, Record, KIND_DEAD_LETTER};
use conduit::saga::{Command, Fact, Outcome as StepOutcome, StepId};
use conduit::DeadLetterNote;
use rustc_hash::FxHashMap;
use serde::Serialize;

use super::domain::{kinds, OrderEvent, Step};
use super::history::{Histories, OrderHistory, OrderStatus};
use super::saga;
use super::stages::names;

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// In flight, its steps running.
    Running,
    /// In flight, undoing what it did.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and what had completed was undone.
    Compensated,
    /// A step's event was dead-lettered; what had completed was undone.
    DeadLettered,
}

impl SagaState {
    /// Every state, as `--state` takes it.
    pub const ALL: [Self; 5] =
        [Self::Running, Self::Compensating, Self::Completed, Self::Compensated, Self::DeadLettered];

    /// The state's name (`dead_lettered`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::DeadLettered => "dead_lettered",
        }
    }

    /// Whether the saga has not ended.
    #[must_use]
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Running | Self::Compensating)
    }

    /// Where the saga of `history` stands; `None` if the order ran no saga.
    #[must_use]
    pub fn of(history: &OrderHistory) -> Option<Self> {
        let run = history.saga_run()?;
        Some(match history.status() {
            OrderStatus::Confirmed => Self::Completed,
            OrderStatus::Cancelled => Self::Compensated,
            OrderStatus::DeadLettered => Self::DeadLettered,
            OrderStatus::InFlight if run.owed().iter().any(|c| matches!(c, Command::Compensate(_))) => {
                Self::Compensating
            }
            OrderStatus::InFlight => Self::Running,
        })
    }
}

impl std::str::FromStr for SagaState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|state| state.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|state| state.name()).collect();
            format!("unknown saga state {text:?}: expected one of {}", names.join(", "))
        })
    }
}

/// One moment of a saga's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moment {
    /// When it was recorded, Unix microseconds.
    pub timestamp_us: u64,
    /// Since the order was placed.
    pub since_placed_us: u64,
    /// What happened: `placed`, `started`, `step`, `compensation`, `dead_letter`, `notified`.
    pub what: &'static str,
    /// The stage that recorded it.
    pub stage: &'static str,
    /// The step, compensation or notification it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How a step ended (`succeeded`, `failed`, `timed out`); why an event was dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The attempt that answered, from 1 (0: run by the dead-letter sink; 4294967295: added by
    /// a recovery from the payment provider's books); a dead letter's attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// A step: from when it could start (the saga's start, or the last step it waited for) to
    /// its outcome. A compensation: from the decision to undo, or the compensation before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_us: Option<u64>,
}

/// One order's saga, moment by moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SagaTimeline {
    /// The order.
    pub order: u64,
    /// The saga's name.
    pub saga: String,
    /// Where it stands.
    pub state: SagaState,
    /// When the order was placed, Unix microseconds.
    pub placed_us: u64,
    /// From the placement to the last record.
    pub duration_us: u64,
    /// Each step and where it stands ([`conduit::saga::SagaRun::story`]).
    pub story: String,
    /// What the log recorded, in its order.
    pub moments: Vec<Moment>,
}

impl SagaTimeline {
    /// The timeline of order `order` from its records (its stream, in order); `None` if the
    /// order ran no saga.
    #[must_use]
    pub fn of(order: u64, records: &[Record]) -> Option<Self> {
        let mut history = OrderHistory::default();
        for record in records {
            history.apply(record);
        }
        let state = SagaState::of(&history)?;
        let run = history.saga_run()?;
        let shape = saga::shape();
        let placed_us = records.first().map_or(0, |r| r.timestamp_us);
        let mut started_us = placed_us;
        let mut finished: FxHashMap<StepId, u64> = FxHashMap::default();
        let mut undo_from: Option<u64> = None;
        let mut moments = Vec::with_capacity(records.len());
        for record in records {
            let at = record.timestamp_us;
            let mut moment = Moment {
                timestamp_us: at,
                since_placed_us: at.saturating_sub(placed_us),
                what: kinds::name(record.kind),
                stage: names::of_index(record.stage),
                name: None,
                outcome: None,
                attempt: None,
                took_us: None,
            };
            match record.kind {
                kinds::SAGA_STARTED => {
                    moment.what = "started";
                    started_us = at;
                }
                kinds::SAGA => match saga::read_fact(&record.payload) {
                    Some((Fact::Finished(step, outcome), attempt)) => {
                        let waited = shape.after_of(step).iter().filter_map(|before| finished.get(before)).max();
                        moment.what = "step";
                        moment.name = Some(shape.name_of(step).to_owned());
                        moment.outcome = Some(saga::outcome_name(outcome).to_owned());
                        moment.attempt = attempt;
                        moment.took_us = Some(at.saturating_sub(waited.copied().unwrap_or(started_us)));
                        finished.insert(step, at);
                        if outcome != StepOutcome::Succeeded {
                            undo_from.get_or_insert(at);
                        }
                    }
                    Some((Fact::Compensated(step), attempt)) => {
                        moment.what = "compensation";
                        moment.name = shape.compensation_of(step).map(str::to_owned);
                        moment.attempt = attempt;
                        moment.took_us = undo_from.map(|from| at.saturating_sub(from));
                        undo_from = Some(at);
                    }
                    None => moment.what = "unreadable saga fact",
                },
                KIND_DEAD_LETTER => {
                    let note = DeadLetterNote::parse(&record.note);
                    moment.what = "dead_letter";
                    moment.name = OrderEvent::decode(&record.payload).map(|event| step_name(event.step));
                    moment.outcome = Some(match note.kind {
                        Some(kind) => format!("{}: {}", kind.name(), note.reason),
                        None => note.reason,
                    });
                    moment.attempt = Some(record.attempts);
                }
                kinds::EMAILED | kinds::TEXTED => {
                    moment.what = "notified";
                    moment.name = Some(if record.kind == kinds::EMAILED { "email" } else { "sms" }.to_owned());
                }
                _ => {}
            }
            moments.push(moment);
        }
        let last_us = records.last().map_or(placed_us, |r| r.timestamp_us);
        Some(Self {
            order,
            saga: shape.name().to_owned(),
            state,
            placed_us,
            duration_us: last_us.saturating_sub(placed_us),
            story: run.story(shape),
            moments,
        })
    }
}

/// An order event's step, for people.
fn step_name(step: Step) -> String {
    match step {
        Step::Charge => "charge".into(),
        Step::Reserve => "reserve".into(),
        Step::Ship => "ship".into(),
        Step::Undo => "compensation".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One saga of a log, in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SagaListing {
    /// The order.
    pub order: u64,
    /// Where its saga stands.
    pub state: SagaState,
    /// When its last record was written, Unix microseconds.
    pub last_us: u64,
    /// Each step and where it stands.
    pub story: String,
}

/// The sagas of `histories` in `state` (any, if `None`), by order id; with `stuck_longer_than`,
/// only those in flight whose last record is older than that at `now_us`.
#[must_use]
pub fn list_sagas(
    histories: &Histories,
    state: Option<SagaState>,
    stuck_longer_than: Option<Duration>,
    now_us: u64,
) -> Vec<SagaListing> {
    let stuck_us = stuck_longer_than.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let mut listed: Vec<SagaListing> = histories
        .orders
        .iter()
        .filter_map(|(&order, history)| {
            let found = SagaState::of(history)?;
            let idle_us = now_us.saturating_sub(history.last_timestamp_us);
            let wanted =
                state.is_none_or(|s| s == found) && stuck_us.is_none_or(|stuck| found.in_flight() && idle_us > stuck);
            let run = history.saga_run()?;
            wanted.then(|| SagaListing {
                order,
                state: found,
                last_us: history.last_timestamp_us,
                story: run.story(saga::shape()),
            })
        })
        .collect();
    listed.sort_unstable_by_key(|listing| listing.order);
    listed
}
