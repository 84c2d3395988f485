//! The dead letters of a log: listing them, and recording their redrive or purge.
//!
//! The log is the dead-letter store. Every dead letter is a [`KIND_DEAD_LETTER`] record holding
//! the original event and its story (a [`DeadLetterNote`]); a redrive appends a
//! [`KIND_REDRIVEN`] record and a purge a [`KIND_PURGED`] record, each naming the dead letter by
//! its id in `causation`. Nothing is ever deleted: a dead letter with neither is *open*, and the
//! log keeps every earlier failure of an event, so a redriven event that fails again lands back
//! in the dead letters with its whole history one [`DeadLetterIndex::history`] away.
//!
//! What a redrive sends where is the application's call (the order pipeline restarts a
//! compensated order's saga under fresh idempotency keys: see `orders::redrive`); this module
//! only reads and records.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dead_letter::{DeadLetterKind, DeadLetterNote};
use crate::log::{Log, LogError, Record, KIND_DEAD_LETTER, KIND_PURGED, KIND_REDRIVEN};

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeadLetterState {
    /// Waiting for a redrive or a purge.
    Open,
    /// Redriven by the record `by`.
    Redriven {
        /// Id of the redrive record.
        by: u64,
        /// When, in Unix microseconds.
        at_us: u64,
    },
    /// Purged by the record `by`.
    Purged {
        /// Id of the purge record.
        by: u64,
        /// When, in Unix microseconds.
        at_us: u64,
    },
}

/// One dead letter as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredDeadLetter {
    /// The dead letter record's id: the id to show, redrive or purge it by.
    pub id: u64,
    /// Its stream (the key of the event, such as an order id).
    pub stream: u64,
    /// The correlation id of the submitted message it descends from.
    pub correlation: u64,
    /// Index of the stage that gave up.
    pub stage: u16,
    /// Attempts made in that stage.
    pub attempts: u32,
    /// When it was dead-lettered, in Unix microseconds.
    pub timestamp_us: u64,
    /// The record kind of the original event.
    pub original_kind: u16,
    /// The original event's payload.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Why, with the error chain and failure times.
    pub note: DeadLetterNote,
    /// Open, redriven or purged.
    pub state: DeadLetterState,
}

impl StoredDeadLetter {
    fn from_record(record: &Record) -> Self {
        Self {
            id: record.id,
            stream: record.stream,
            correlation: record.correlation,
            stage: record.stage,
            attempts: record.attempts,
            timestamp_us: record.timestamp_us,
            original_kind: record.cause_kind,
            payload: record.payload.clone(),
            note: DeadLetterNote::parse(&record.note),
            state: DeadLetterState::Open,
        }
    }

    /// Whether it waits for a redrive or a purge.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.state == DeadLetterState::Open
    }

    /// The reason class's name (`retries_exhausted`, ...; `unknown` for a kind this build lacks).
    #[must_use]
    pub fn kind_name(&self) -> &'static str {
        self.note.kind.map_or("unknown", DeadLetterKind::name)
    }
}

/// Which dead letters a command applies to. An empty filter selects nothing: a redrive or purge
/// of everything must say `all`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// These ids.
    pub ids: Vec<u64>,
    /// Those of this stage index.
    pub stage: Option<u16>,
    /// Those of this kind.
    pub kind: Option<DeadLetterKind>,
    /// Every open one (further narrowed by `stage` and `kind`).
    pub all: bool,
}

impl Selection {
    /// Whether it names anything at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.stage.is_none() && self.kind.is_none() && !self.all
    }

    fn matches(&self, letter: &StoredDeadLetter) -> bool {
        if self.is_empty() {
            return false;
        }
        (self.ids.is_empty() || self.ids.contains(&letter.id))
            && self.stage.is_none_or(|stage| stage == letter.stage)
            && self.kind.is_none_or(|kind| Some(kind) == letter.note.kind)
    }
}

/// Every dead letter of a log, in log order, with its state.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterIndex {
    letters: Vec<StoredDeadLetter>,
    by_id: BTreeMap<u64, usize>,
    /// Redrive and purge records whose dead letter is not in the log (a damaged log).
    pub dangling: Vec<u64>,
}

impl DeadLetterIndex {
    /// Reads the log once (every frame validated).
    pub fn read(log: &Log) -> Result<Self, LogError> {
        let mut index = Self::default();
        let mut settled: Vec<(u64, DeadLetterState)> = Vec::new();
        log.for_each(|record| {
            let state = match record.kind {
                KIND_DEAD_LETTER => {
                    index.by_id.insert(record.id, index.letters.len());
                    index.letters.push(StoredDeadLetter::from_record(record));
                    return;
                }
                KIND_REDRIVEN => DeadLetterState::Redriven { by: record.id, at_us: record.timestamp_us },
                KIND_PURGED => DeadLetterState::Purged { by: record.id, at_us: record.timestamp_us },
                _ => return,
            };
            settled.push((record.causation, state));
        })?;
        for (letter, state) in settled {
            match index.by_id.get(&letter) {
                // The first settlement wins; a later one of the same letter is a repeat.
                Some(&at) if index.letters[at].is_open() => index.letters[at].state = state,
                Some(_) => {}
                None => index.dangling.push(letter),
            }
        }
        Ok(index)
    }

    /// Every dead letter, open or not, in log order.
    #[must_use]
    pub fn all(&self) -> &[StoredDeadLetter] {
        &self.letters
    }

    /// The open dead letters that `selection` names, in log order.
    #[must_use]
    pub fn select(&self, selection: &Selection) -> Vec<&StoredDeadLetter> {
        self.filter(selection, false)
    }

    /// The dead letters `selection` names, in log order; redriven and purged ones too if
    /// `settled_too`.
    #[must_use]
    pub fn filter(&self, selection: &Selection, settled_too: bool) -> Vec<&StoredDeadLetter> {
        self.letters.iter().filter(|l| (settled_too || l.is_open()) && selection.matches(l)).collect()
    }

    /// The dead letter with record id `id`.
    #[must_use]
    pub fn get(&self, id: u64) -> Option<&StoredDeadLetter> {
        self.by_id.get(&id).map(|&at| &self.letters[at])
    }

    /// Every dead letter of `stream`, oldest first: an event's failures across redrives.
    #[must_use]
    pub fn history(&self, stream: u64) -> Vec<&StoredDeadLetter> {
        self.letters.iter().filter(|l| l.stream == stream).collect()
    }

    /// Open dead letters per reason class.
    #[must_use]
    pub fn open_by_kind(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for letter in self.letters.iter().filter(|l| l.is_open()) {
            *counts.entry(letter.kind_name()).or_insert(0) += 1;
        }
        counts
    }
}

/// The record that settles `letter` as redriven into stage `stage` with the event `payload` of
/// kind `kind`; its id is what the redriven event's records descend from.
#[must_use]
pub fn redrive_record(log: &Log, letter: &StoredDeadLetter, stage: u16, kind: u16, payload: Vec<u8>) -> Record {
    Record {
        id: log.reserve_ids(1),
        stream: letter.stream,
        kind: KIND_REDRIVEN,
        stage,
        cause_kind: kind,
        timestamp_us: crate::journal::unix_micros(),
        correlation: letter.correlation,
        causation: letter.id,
        payload,
        ..Record::default()
    }
}

/// Purges `letters`: appends a purge record for each and waits for the commit. They stay in the
/// log, out of the open list. Returns how many were purged.
pub fn purge(log: &Log, letters: &[&StoredDeadLetter]) -> Result<u64, LogError> {
    if letters.is_empty() {
        return Ok(0);
    }
    let first = log.reserve_ids(letters.len() as u64);
    let now = crate::journal::unix_micros();
    let records = letters
        .iter()
        .zip(first..)
        .map(|(letter, id)| Record {
            id,
            stream: letter.stream,
            kind: KIND_PURGED,
            stage: letter.stage,
            timestamp_us: now,
            correlation: letter.correlation,
            causation: letter.id,
            ..Record::default()
        })
        .collect();
    log.append(records)?.wait()?;
    Ok(letters.len() as u64)
}
