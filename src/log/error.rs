//! What can go wrong with a log, with the storage engine's own error kept as the source.

use std::path::PathBuf;

use super::{ExpectedVersion, FrameError, Record};

/// A log operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The file exists but is not a conduit log.
    #[error("{path} is not a conduit log: {reason}")]
    NotALog {
        /// The file.
        path: PathBuf,
        /// What gave it away.
        reason: String,
    },
    /// Another process (or another `Log` in this one) has the file open: it holds the lock.
    #[error("{} is in use: another process has it open (stop that process first)", path.display())]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The storage engine failed (I/O, or a damaged file it detected).
    #[error("storage error: {0}")]
    Storage(#[source] StorageFailure),
    /// A stored frame failed validation.
    #[error("frame {frame} is corrupt: {error}")]
    Corrupt {
        /// The frame's key.
        frame: u64,
        /// What is wrong with it.
        error: FrameError,
    },
    /// A stored checkpoint or index row failed validation.
    #[error("the log's {table} row {key} is corrupt: {error}")]
    CorruptIndex {
        /// The table.
        table: &'static str,
        /// The row's key.
        key: u64,
        /// What is wrong with it.
        error: FrameError,
    },
    /// An earlier commit failed; the log accepts and acknowledges nothing more.
    #[error("the log failed earlier and accepts nothing more: {0}")]
    Failed(String),
    /// The log is closed.
    #[error("the log is closed")]
    Closed,
    /// The stream's version is not what the append expected.
    #[error("stream {stream}: expected version {expected:?}, found {actual}")]
    VersionConflict {
        /// The stream.
        stream: u64,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's last version (0: no stream).
        actual: u32,
    },
    /// The stream's early history was removed by retention.
    #[error("stream {stream}: versions before {first_retained} were removed by retention")]
    Truncated {
        /// The stream.
        stream: u64,
        /// Its first version still in the log.
        first_retained: u32,
    },
    /// A snapshot claimed a version its stream has not reached.
    #[error("stream {stream}: no snapshot at version {version}: the stream is at version {head}")]
    SnapshotAhead {
        /// The stream.
        stream: u64,
        /// The version the snapshot claimed (0 is never one).
        version: u32,
        /// The stream's last version.
        head: u32,
    },

    /// Invalid options.
    #[error("invalid log options: {0}")]
    Options(String),
}

/// What the storage engine (or the file system under it) reported, kept as the error's source;
/// `context` says what the log was doing, when that is not the source's own words.
#[derive(Debug, Clone)]
pub struct StorageFailure {
    context: Option<String>,
    source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl StorageFailure {
    /// `source`, reported while doing `context` (if given).
    pub fn new(context: Option<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { context, source: std::sync::Arc::new(source) }
    }
}

impl std::fmt::Display for StorageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.context {
            Some(context) => write!(f, "{context}: {}", self.source),
            None => write!(f, "{}", self.source),
        }
    }
}

impl std::error::Error for StorageFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Failures compare by what they say: two reports of the same failure are equal.
impl PartialEq for StorageFailure {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for StorageFailure {}

pub(super) fn storage(error: impl std::error::Error + Send + Sync + 'static) -> LogError {
    LogError::Storage(StorageFailure::new(None, error))
}

/// A non-blocking append failed; the records come back when the queue was only full.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TryAppendError {
    /// The append queue is full now; nothing was queued.
    #[error("the log's append queue is full")]
    Full(Vec<Record>),
    /// The log failed or is closed.
    #[error(transparent)]
    Log(#[from] LogError),
}
