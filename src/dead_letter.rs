//! Dead letters: events a stage gave up on, with the story of why.

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::stage::{Envelope, Reason};

/// Why an event was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// The handler returned [`Outcome::Reject`](crate::Outcome::Reject).
    Rejected,
    /// The stage's `attempts_max` attempts all ended in a retry.
    RetriesExhausted,
    /// The stage's `attempts_max` attempts all ended, the last in a panic of the handler.
    Panicked,
    /// The handler found the event malformed ([`Outcome::Malformed`](crate::Outcome::Malformed)).
    Malformed,
    /// The event outlived its message's TTL or its stage's `ttl_ms`.
    Expired,
    /// Published with a routing key no queue is bound to (when the topology dead-letters those).
    Unroutable,
    /// The destination stage's queue was full and its overflow policy is `dead_letter`.
    Overflow,
    /// The handler misused its emitter (emitted to a stage not linked from its own, or recorded
    /// a reserved kind).
    HandlerMisuse,
}

impl fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl DeadLetterKind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 8] = [
        Self::Rejected,
        Self::RetriesExhausted,
        Self::Panicked,
        Self::Malformed,
        Self::Expired,
        Self::Unroutable,
        Self::Overflow,
        Self::HandlerMisuse,
    ];

    /// The kind's name in reports, logs and on the command line (`retries_exhausted`, ...).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Panicked => "panicked",
            Self::Malformed => "malformed",
            Self::Expired => "expired",
            Self::HandlerMisuse => "handler_misuse",
            Self::Unroutable => "unroutable",
            Self::Overflow => "overflow",
        }
    }

    /// The kind named `name`, if there is one.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// The failures an event met in a stage before its last one, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Failures {
    pub(crate) errors: Vec<Reason>,
    pub(crate) errors_dropped: u32,
    pub(crate) first_us: u64,
    pub(crate) last_us: u64,
    /// The last backoff chosen with decorrelated jitter (each depends on the one before).
    pub(crate) last_delay_ms: u64,
}

impl Failures {
    /// Earlier failures kept per dead letter: the first and the latest ones (with the last
    /// failure itself, a chain of at most eight).
    pub(crate) const KEPT: usize = 7;

    /// Adds a failure at `now_us` (Unix microseconds). Past [`Self::KEPT`], the oldest but the
    /// first are dropped and counted.
    pub(crate) fn push(&mut self, reason: Reason, now_us: u64) {
        if self.errors.is_empty() {
            self.first_us = now_us;
        }
        self.last_us = now_us;
        if self.errors.len() == Self::KEPT {
            self.errors.remove(1);
            self.errors_dropped += 1;
        }
        self.errors.push(reason);
    }
}

/// An event a stage gave up on.
#[derive(Debug, Clone)]
pub struct DeadLetter<M> {
    /// The stage that gave up (or, for an overflow, the stage whose queue was full).
    pub stage: Arc<str>,
    /// The class of failure.
    pub kind: DeadLetterKind,
    /// The last failure's reason, as the handler (or the panic) gave it.
    pub reason: Reason,
    /// The failures before the last one in the stage, oldest first (empty if the first failure
    /// was the last): with `reason`, the error chain ([`chain`](Self::chain)). At most seven are
    /// kept (the first and the latest six); `errors_dropped` counts the others.
    pub errors: Vec<Reason>,
    /// Failures between the first and the latest kept ones that were not kept.
    pub errors_dropped: u32,
    /// When the first failure happened, in microseconds since the Unix epoch.
    pub first_failure_us: u64,
    /// When the last failure happened (the dead-lettering), in microseconds since the Unix epoch.
    pub last_failure_us: u64,
    /// Attempts made in the stage.
    pub attempts: u32,
    /// The original event, untouched.
    pub envelope: Envelope<M>,
}

/// What a dead letter's log record says of it, as JSON in the record's `note`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterNote {
    /// The class of failure, by [name](DeadLetterKind::name); unknown to this build if `None`.
    pub kind: Option<DeadLetterKind>,
    /// The last failure's reason.
    pub reason: String,
    /// The error chain, oldest first, the last being `reason` (see [`DeadLetter::chain`]).
    #[serde(default)]
    pub errors: Vec<String>,
    /// Failures not kept in `errors`.
    #[serde(default)]
    pub errors_dropped: u32,
    /// First failure, Unix microseconds.
    #[serde(default)]
    pub first_failure_us: u64,
    /// Last failure, Unix microseconds.
    #[serde(default)]
    pub last_failure_us: u64,
}

impl DeadLetterNote {
    /// The note of `letter`, for its log record.
    #[must_use]
    pub fn of<M>(letter: &DeadLetter<M>) -> Self {
        Self {
            kind: Some(letter.kind),
            reason: letter.reason.to_string(),
            errors: letter.chain().map(ToString::to_string).collect(),
            errors_dropped: letter.errors_dropped,
            first_failure_us: letter.first_failure_us,
            last_failure_us: letter.last_failure_us,
        }
    }

    /// The note as stored: one line of JSON.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a stored note. A note that is not this JSON (or names a kind this build does not
    /// know) is kept whole as the reason, so no stored text is ever lost or refused.
    #[must_use]
    pub fn parse(note: &str) -> Self {
        #[derive(Deserialize)]
        struct Raw {
            kind: String,
            reason: String,
            #[serde(default)]
            errors: Vec<String>,
            #[serde(default)]
            errors_dropped: u32,
            #[serde(default)]
            first_failure_us: u64,
            #[serde(default)]
            last_failure_us: u64,
        }
        if let Ok(raw) = serde_json::from_str::<Raw>(note) {
            return Self {
                kind: DeadLetterKind::from_name(&raw.kind),
                reason: raw.reason,
                errors: raw.errors,
                errors_dropped: raw.errors_dropped,
                first_failure_us: raw.first_failure_us,
                last_failure_us: raw.last_failure_us,
            };
        }
        // Older records: "kind: reason".
        let (kind, reason) = note.split_once(": ").unwrap_or(("", note));
        let kind = DeadLetterKind::from_name(kind);
        let reason = if kind.is_some() { reason } else { note };
        Self {
            kind,
            reason: reason.to_owned(),
            errors: vec![reason.to_owned()],
            errors_dropped: 0,
            first_failure_us: 0,
            last_failure_us: 0,
        }
    }
}

impl<M> DeadLetter<M> {
    /// The error chain, oldest first: the earlier failures kept, then `reason`.
    pub fn chain(&self) -> impl Iterator<Item = &Reason> {
        self.errors.iter().chain(std::iter::once(&self.reason))
    }
}

/// Receives dead letters, on the worker thread that produced them.
///
/// The application decides what a dead letter means for it: the order pipeline, for one,
/// compensates the order's side effects before counting it. Keep it short: the worker waits.
pub trait DeadLetterSink<M>: Send + Sync {
    /// Takes one dead letter.
    fn dead_letter(&self, letter: DeadLetter<M>);

    /// Takes one dead letter when the engine journals, and returns the facts to record about
    /// it, `(kind, payload)` on the letter's stream, right after the dead letter's own record:
    /// what the sink did about it (a saga's compensations, say), so that the log tells the whole
    /// story in order and a recovery knows it was done. The default takes the letter through
    /// [`dead_letter`](Self::dead_letter) and records nothing more.
    fn dead_letter_journaled(&self, letter: DeadLetter<M>) -> Vec<(u16, Vec<u8>)> {
        self.dead_letter(letter);
        Vec::new()
    }
}

/// The default sink: keeps every dead letter in memory, in arrival order.
pub struct MemoryDeadLetters<M> {
    letters: Mutex<Vec<DeadLetter<M>>>,
}

impl<M> Default for MemoryDeadLetters<M> {
    fn default() -> Self {
        Self { letters: Mutex::new(Vec::new()) }
    }
}

impl<M> fmt::Debug for MemoryDeadLetters<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDeadLetters").field("len", &self.len()).finish()
    }
}

impl<M> MemoryDeadLetters<M> {
    /// Dead letters held.
    pub fn len(&self) -> usize {
        self.letters.lock().len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every dead letter held, leaving none.
    pub fn drain(&self) -> Vec<DeadLetter<M>> {
        std::mem::take(&mut *self.letters.lock())
    }
}

impl<M: Send> DeadLetterSink<M> for MemoryDeadLetters<M> {
    fn dead_letter(&self, letter: DeadLetter<M>) {
        self.letters.lock().push(letter);
    }
}
