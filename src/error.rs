//! Error types, one per operation. A send that fails hands its value back.

use std::fmt;

/// A configuration could not be parsed or is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The text is not valid TOML, or names a key that does not exist.
    #[error("cannot parse configuration: {0}")]
    Parse(String),
    /// A value lies outside its inclusive bounds.
    #[error("{field} = {value} is out of range (allowed: {min} to {max})")]
    OutOfRange {
        /// Dotted path of the field, such as `engine.stages.payment.workers`.
        field: String,
        /// The value given.
        value: String,
        /// Smallest allowed value.
        min: String,
        /// Largest allowed value.
        max: String,
    },
    /// Any other inconsistency, described.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The topology or configuration cannot be turned into a running engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The configuration is invalid for this topology.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The topology is malformed (described).
    #[error("invalid topology: {0}")]
    Topology(String),
    /// The topology and configuration would drop events without a trace (described).
    #[error("refused: events would be lost silently: {0}")]
    SilentLoss(String),
    /// A worker thread could not be spawned.
    #[error("cannot spawn worker thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// [`Engine::set_workers`](crate::Engine::set_workers) could not resize a stage's pool; the pool
/// is as it was (or, for [`ResizeError::Spawn`], as far as it got).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// The stage's pool is fixed (its `workers` is a count, not `{ min, max }`).
    #[error("stage {stage} has a fixed pool: declare `workers = {{ min, max }}` to resize it")]
    Fixed {
        /// The stage's name.
        stage: String,
    },
    /// The size asked for lies outside the pool's bounds.
    #[error("stage {stage}: {workers} workers is outside the pool's bounds ({min} to {max})")]
    OutOfBounds {
        /// The stage's name.
        stage: String,
        /// The size asked for.
        workers: usize,
        /// The pool's `min`.
        min: usize,
        /// The pool's `max`.
        max: usize,
    },
    /// No such stage in the topology.
    #[error("no stage #{0} in the topology")]
    NoStage(usize),
    /// The engine is shutting down: pools no longer change.
    #[error("the engine is shutting down")]
    Stopped,
    /// A worker thread could not be spawned.
    #[error("cannot spawn worker thread {name}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Resuming the messages a log had in flight failed; nothing was resumed unless it says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The engine has no journal to recover from.
    #[error("the engine has no journal to recover from")]
    NoJournal,
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// An ingress record the journal's codec cannot turn back into a message.
    #[error("ingress record {id} (kind {kind}) cannot be decoded by the journal's codec; nothing was resumed")]
    Undecodable {
        /// The record's id.
        id: u64,
        /// Its kind.
        kind: u16,
    },
    /// The engine refused the resumed messages part way: `resumed` went in.
    #[error("the engine stopped taking resumed messages after {resumed}: {reason}")]
    Stopped {
        /// Messages resumed before it stopped.
        resumed: u64,
        /// Why it stopped.
        reason: String,
    },
}

/// A blocking submit failed; the message (or messages) come back.
#[derive(PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError<T> {
    /// The engine is shutting down or shut down and accepts nothing more.
    #[error("the engine is closed")]
    Closed(T),
    /// A worker died; the engine accepts nothing more (see [`Engine::poisoned`](crate::Engine::poisoned)).
    #[error("the engine is poisoned: a worker died")]
    Poisoned(T),
    /// The journal's log failed; nothing more can be acknowledged as durable.
    #[error("the log failed: nothing more can be made durable")]
    LogFailed(T),
}

impl<T> SubmitError<T> {
    /// The value that was not submitted.
    pub fn into_inner(self) -> T {
        match self {
            Self::Closed(value) | Self::Poisoned(value) | Self::LogFailed(value) => value,
        }
    }

    /// The same failure around another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> SubmitError<U> {
        match self {
            Self::Closed(value) => SubmitError::Closed(f(value)),
            Self::Poisoned(value) => SubmitError::Poisoned(f(value)),
            Self::LogFailed(value) => SubmitError::LogFailed(f(value)),
        }
    }
}

impl<T> fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed(_) => f.write_str("Closed(..)"),
            Self::Poisoned(_) => f.write_str("Poisoned(..)"),
            Self::LogFailed(_) => f.write_str("LogFailed(..)"),
        }
    }
}

/// A non-blocking submit failed; the message comes back.
#[derive(PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrySubmitError<T> {
    /// The entry queue is full: try again later, or use the blocking `submit`.
    #[error("the entry queue is full")]
    Full(T),
    /// The engine is closed.
    #[error("the engine is closed")]
    Closed(T),
    /// A worker died.
    #[error("the engine is poisoned: a worker died")]
    Poisoned(T),
    /// The journal's log failed.
    #[error("the log failed: nothing more can be made durable")]
    LogFailed(T),
}

impl<T> TrySubmitError<T> {
    /// The value that was not submitted.
    pub fn into_inner(self) -> T {
        match self {
            Self::Full(value) | Self::Closed(value) | Self::Poisoned(value) | Self::LogFailed(value) => value,
        }
    }

    /// The same failure around another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> TrySubmitError<U> {
        match self {
            Self::Full(value) => TrySubmitError::Full(f(value)),
            Self::Closed(value) => TrySubmitError::Closed(f(value)),
            Self::Poisoned(value) => TrySubmitError::Poisoned(f(value)),
            Self::LogFailed(value) => TrySubmitError::LogFailed(f(value)),
        }
    }

    /// Whether the failure is only a full queue.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }
}

impl<T> fmt::Debug for TrySubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full(_) => f.write_str("Full(..)"),
            Self::Closed(_) => f.write_str("Closed(..)"),
            Self::Poisoned(_) => f.write_str("Poisoned(..)"),
            Self::LogFailed(_) => f.write_str("LogFailed(..)"),
        }
    }
}
