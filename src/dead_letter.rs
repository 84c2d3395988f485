//! Dead letters: events a stage gave up on, with the story of why.

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::stage::{Envelope, Reason};

/// Why an event was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterKind {
    /// The handler returned [`Outcome::Reject`](crate::Outcome::Reject).
    Rejected,
    /// The stage's `attempts_max` attempts all ended in a retry (or a panic).
    RetriesExhausted,
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
        f.write_str(match self {
            Self::Rejected => "rejected",
            Self::RetriesExhausted => "retries_exhausted",
            Self::HandlerMisuse => "handler_misuse",
            Self::Unroutable => "unroutable",
            Self::Overflow => "overflow",
        })
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
    /// Attempts made in the stage.
    pub attempts: u32,
    /// The original event, untouched.
    pub envelope: Envelope<M>,
}

/// Receives dead letters, on the worker thread that produced them.
///
/// The application decides what a dead letter means for it: the order pipeline, for one,
/// compensates the order's side effects before counting it. Keep it short: the worker waits.
pub trait DeadLetterSink<M>: Send + Sync {
    /// Takes one dead letter.
    fn dead_letter(&self, letter: DeadLetter<M>);
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
