//! The durable event log: rkyv frames in redb, appended by one group-committing writer thread.
//!
//! ```text
//!  producers (ingress, stage workers)            writer thread                     redb file
//!  append(Vec<Record>, ack?) --bounded queue--> drain up to GROUP_RECORDS_MAX  --> frames:  seq -> frame bytes
//!                                                assign versions per stream         buckets: (stream >> 10, seq) -> ()
//!                                                pack frames < 256 KiB              meta:    "format" -> 1
//!                                                one write transaction, commit
//!                                                release acks (after fsync in Immediate)
//! ```
//!
//! The layout, the frame bytes and the invariants are described in `docs/design.md`.

mod format;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use rayon::prelude::*;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use rustc_hash::FxHashMap;
use serde::Serialize;

pub use format::{
    check_header, decode_frame, decode_frame_owned, encode_frame, ArchivedFrame, ArchivedRecord, Frame, FrameError,
    Record, BODY_LEN_MAX, FORMAT_VERSION, HEADER_LEN, KIND_DEAD_LETTER, KIND_PURGED, KIND_REDRIVEN, KIND_RESERVED_MIN,
    MAGIC, STAGE_INGRESS,
};

/// Frames by sequence number.
pub(crate) const FRAMES: TableDefinition<u64, &[u8]> = TableDefinition::new("frames");
/// `(stream bucket, frame seq)`: which frames hold events of which 1,024 streams.
pub(crate) const BUCKETS: TableDefinition<(u64, u64), ()> = TableDefinition::new("buckets");
/// Format marker and other small facts.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The `META` key holding [`FORMAT_VERSION`].
pub(crate) const META_FORMAT: &str = "conduit.format";

/// Streams per index bucket: the index holds one row per bucket per frame, not one per event.
pub const BUCKET_STREAMS_LOG2: u32 = 10;

/// The bucket of a stream in the index.
#[must_use]
pub fn bucket_of(stream: u64) -> u64 {
    stream >> BUCKET_STREAMS_LOG2
}

/// When a commit is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every group commit is fsynced before its acknowledgements are released.
    Immediate,
    /// Group commits skip fsync; one durable commit follows at most `sync_interval_ms` later.
    Eventual {
        /// Most milliseconds between durable commits while there are undurable ones.
        sync_interval_ms: u64,
    },
}

/// How the log is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// When commits are durable.
    pub durability: Durability,
    /// Capacity of the append queue, in appends (each a batch of records): a slow disk slows
    /// producers instead of growing memory.
    pub queue_appends: usize,
    /// Most records per write transaction.
    pub group_records_max: usize,
    /// Frames are closed once their estimated size reaches this many bytes.
    pub frame_bytes_target: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Immediate,
            queue_appends: 256,
            group_records_max: 64 * 1024,
            // Just under 256 KiB with the header and rkyv's slack: values just over a power of two
            // waste 40-50% of a page run in redb (ARCHITECTURE section 4).
            frame_bytes_target: 250 * 1024,
        }
    }
}

impl LogOptions {
    fn validate(&self) -> Result<(), LogError> {
        let bad = |what: &str| Err(LogError::Options(what.to_owned()));
        if !(1..=65_536).contains(&self.queue_appends) {
            return bad("queue_appends must be within 1..=65536");
        }
        if !(1..=1 << 20).contains(&self.group_records_max) {
            return bad("group_records_max must be within 1..=1048576");
        }
        if !(1024..=16 << 20).contains(&self.frame_bytes_target) {
            return bad("frame_bytes_target must be within 1 KiB..=16 MiB");
        }
        if let Durability::Eventual { sync_interval_ms } = self.durability {
            if !(1..=60_000).contains(&sync_interval_ms) {
                return bad("sync_interval_ms must be within 1..=60000");
            }
        }
        Ok(())
    }
}

/// What an append expects of its stream, for optimistic concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this.
    Exact(u32),
}

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

fn storage(error: impl std::error::Error + Send + Sync + 'static) -> LogError {
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

/// Released once the records of one append are committed (and fsynced, in `Immediate` mode).
#[derive(Debug)]
pub struct AckWaiter(Receiver<Result<(), LogError>>);

impl AckWaiter {
    /// Waits for the commit.
    pub fn wait(self) -> Result<(), LogError> {
        self.0.recv().unwrap_or(Err(LogError::Closed))
    }
}

pub(crate) enum Command {
    Append { records: Vec<Record>, ack: Option<Sender<Result<(), LogError>>> },
    Checked { stream: u64, expected: ExpectedVersion, records: Vec<Record>, reply: Sender<Result<u32, LogError>> },
    Sync { reply: Sender<Result<(), LogError>> },
}

/// Counters of what the log has written.
#[derive(Debug, Default)]
pub(crate) struct LogCounters {
    pub(crate) events_appended: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) durable_commits: AtomicU64,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// What the log has written since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LogStats {
    /// Records committed.
    pub events_appended: u64,
    /// Write transactions committed.
    pub commits: u64,
    /// Of those, fsynced.
    pub durable_commits: u64,
    /// Frames written.
    pub frames: u64,
    /// Frame bytes written (headers included).
    pub bytes: u64,
}

/// What opening found in the file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct OpenSummary {
    /// Frames in the file.
    pub frames: u64,
    /// Records in the file.
    pub records: u64,
    /// Streams with at least one record.
    pub streams: u64,
}

pub(crate) struct Shared {
    pub(crate) db: redb::Database,
    pub(crate) counters: LogCounters,
    pub(crate) failed: Mutex<Option<String>>,
    pub(crate) has_failed: AtomicBool,
    next_id: AtomicU64,
}

/// An open log. Appends go through one writer thread; reads run beside it.
pub struct Log {
    path: PathBuf,
    shared: Arc<Shared>,
    sender: Mutex<Option<Sender<Command>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    options: LogOptions,
    summary: OpenSummary,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("path", &self.path).field("options", &self.options).finish_non_exhaustive()
    }
}

/// Opens the redb file, mapping "not a database" to a clear error.
fn open_database(path: &Path, create: bool) -> Result<redb::Database, LogError> {
    let not_a_log = |reason: String| LogError::NotALog { path: path.to_owned(), reason };
    let opened =
        std::panic::catch_unwind(|| if create { redb::Database::create(path) } else { redb::Database::open(path) });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if !matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
        {
            Err(LogError::Storage(StorageFailure::new(Some(path.display().to_string()), e)))
        }
        Ok(Err(error)) => Err(not_a_log(error.to_string())),
        Err(_) => Err(not_a_log("the storage engine could not read it".into())),
    }
}

impl Log {
    /// Opens the log at `path`, creating it if it does not exist, and starts the writer.
    ///
    /// Every frame is read and validated first (in parallel) to learn each stream's last
    /// version: a corrupt frame is an error, never a panic.
    pub fn open(path: impl AsRef<Path>, options: LogOptions) -> Result<Self, LogError> {
        options.validate()?;
        let path = path.as_ref().to_owned();
        let db = open_database(&path, true)?;
        Self::start(path, db, options)
    }

    /// Opens a log on any redb storage backend: in memory, or one that fails or tears writes
    /// on purpose in tests. `label` names it in errors and reports.
    pub fn open_with_backend(
        label: impl Into<PathBuf>,
        backend: impl redb::StorageBackend,
        options: LogOptions,
    ) -> Result<Self, LogError> {
        options.validate()?;
        let path = label.into();
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            redb::Database::builder().create_with_backend(backend)
        }));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(error)) => return Err(LogError::NotALog { path, reason: error.to_string() }),
            Err(_) => return Err(LogError::NotALog { path, reason: "the storage engine could not read it".into() }),
        };
        Self::start(path, db, options)
    }

    /// Reads what the file holds and starts the writer. redb may panic on damaged pages (its
    /// B-tree code treats some page states as unreachable): that is contained here and reported
    /// as a file that is not a readable log.
    fn start(path: PathBuf, db: redb::Database, options: LogOptions) -> Result<Self, LogError> {
        let label = path.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::start_unguarded(path, db, options)))
            .unwrap_or_else(|_| Err(LogError::NotALog { path: label, reason: DAMAGED_PAGES.into() }))
    }

    fn start_unguarded(path: PathBuf, db: redb::Database, options: LogOptions) -> Result<Self, LogError> {
        {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                let format = meta.get(META_FORMAT).map_err(storage)?.map(|v| v.value());
                match format {
                    Some(v) if v == u64::from(FORMAT_VERSION) => {}
                    Some(v) => {
                        return Err(LogError::NotALog {
                            path,
                            reason: format!("log format {v}, this build reads {FORMAT_VERSION}"),
                        })
                    }
                    None => {
                        let frames = txn.open_table(FRAMES).map_err(storage)?;
                        if !frames.is_empty().map_err(storage)? {
                            return Err(LogError::NotALog { path, reason: "frames without a format marker".into() });
                        }
                        drop(frames);
                        meta.insert(META_FORMAT, u64::from(FORMAT_VERSION)).map_err(storage)?;
                    }
                }
                txn.open_table(BUCKETS).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
        }
        let shared = Arc::new(Shared {
            db,
            counters: LogCounters::default(),
            failed: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        let mut versions: FxHashMap<u64, u32> = FxHashMap::default();
        let mut summary = OpenSummary::default();
        let mut next_frame = 0;
        let mut max_id = 0;
        scan(&shared.db, |seq, frame| {
            next_frame = seq + 1;
            summary.frames += 1;
            for record in &frame.records {
                let version = versions.entry(record.stream).or_insert(0);
                *version = record.version;
                max_id = max_id.max(record.id);
            }
            summary.records += frame.records.len() as u64;
            Ok(())
        })?;
        summary.streams = versions.len() as u64;
        shared.next_id.store(max_id + 1, Ordering::Relaxed);
        let (sender, receiver) = crossbeam_channel::bounded(options.queue_appends);
        let state = writer::WriterState::new(Arc::clone(&shared), options, versions, next_frame);
        let writer = std::thread::Builder::new()
            .name("conduit:log-writer".into())
            .spawn(move || writer::run(state, &receiver))
            .map_err(storage)?;
        Ok(Self { path, shared, sender: Mutex::new(Some(sender)), writer: Mutex::new(Some(writer)), options, summary })
    }

    /// Opens an existing log (see [`Log::open`]); a missing file is an error, not a new log.
    pub fn open_existing(path: impl AsRef<Path>, options: LogOptions) -> Result<Self, LogError> {
        let path = path.as_ref();
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => Self::open(path, options),
            Ok(_) => Err(LogError::NotALog { path: path.to_owned(), reason: "not a regular file".into() }),
            Err(e) => Err(LogError::Storage(StorageFailure::new(Some(path.display().to_string()), e))),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> LogOptions {
        self.options
    }

    /// What the file held when it was opened.
    pub fn opened_with(&self) -> &OpenSummary {
        &self.summary
    }

    /// Reserves `count` consecutive record ids; returns the first.
    pub fn reserve_ids(&self, count: u64) -> u64 {
        self.shared.next_id.fetch_add(count, Ordering::Relaxed)
    }

    /// Why the log failed, if it did.
    pub fn failure(&self) -> Option<String> {
        if self.shared.has_failed.load(Ordering::Acquire) {
            self.shared.failed.lock().clone()
        } else {
            None
        }
    }

    fn send(&self, command: Command) -> Result<(), LogError> {
        if let Some(reason) = self.failure() {
            return Err(LogError::Failed(reason));
        }
        let sender = self.sender.lock().clone().ok_or(LogError::Closed)?;
        sender.send(command).map_err(|_| self.failure().map_or(LogError::Closed, LogError::Failed))
    }

    /// Queues records (blocking while the append queue is full). Versions are assigned by the
    /// writer; the returned waiter is released once they are committed.
    pub fn append(&self, records: Vec<Record>) -> Result<AckWaiter, LogError> {
        let (ack, waiter) = crossbeam_channel::bounded(1);
        self.send(Command::Append { records, ack: Some(ack) })?;
        Ok(AckWaiter(waiter))
    }

    /// Queues records if the append queue has room now, never blocking; the waiter is released
    /// once they are committed.
    pub fn try_append(&self, records: Vec<Record>) -> Result<AckWaiter, TryAppendError> {
        if let Some(reason) = self.failure() {
            return Err(LogError::Failed(reason).into());
        }
        let sender = self.sender.lock().clone().ok_or(LogError::Closed)?;
        let (ack, waiter) = crossbeam_channel::bounded(1);
        match sender.try_send(Command::Append { records, ack: Some(ack) }) {
            Ok(()) => Ok(AckWaiter(waiter)),
            Err(crossbeam_channel::TrySendError::Full(Command::Append { records, .. })) => {
                Err(TryAppendError::Full(records))
            }
            Err(_) => Err(self.failure().map_or(LogError::Closed, LogError::Failed).into()),
        }
    }

    /// Queues records without waiting for, or hearing of, their commit.
    pub fn append_detached(&self, records: Vec<Record>) -> Result<(), LogError> {
        self.send(Command::Append { records, ack: None })
    }

    /// Appends records to one stream if its version is as expected; returns the stream's new
    /// last version once committed. Every record's `stream` is set to `stream`.
    pub fn append_expecting(
        &self,
        stream: u64,
        expected: ExpectedVersion,
        mut records: Vec<Record>,
    ) -> Result<u32, LogError> {
        for record in &mut records {
            record.stream = stream;
        }
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(Command::Checked { stream, expected, records, reply })?;
        answer.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Makes everything appended so far durable.
    pub fn sync(&self) -> Result<(), LogError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(Command::Sync { reply })?;
        answer.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Counters since opening.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            events_appended: c.events_appended.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            durable_commits: c.durable_commits.load(Ordering::Relaxed),
            frames: c.frames.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }

    /// Makes everything durable, stops the writer and closes the file.
    pub fn close(&self) -> Result<(), LogError> {
        let synced = if self.sender.lock().is_some() { self.sync() } else { Ok(()) };
        self.sender.lock().take();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
        synced
    }

    /// Every record, in log order, validated frame by frame.
    pub fn for_each(&self, mut f: impl FnMut(&Record)) -> Result<(), LogError> {
        scan(&self.shared.db, |_, frame| {
            frame.records.iter().for_each(&mut f);
            Ok(())
        })
    }

    /// Every frame in log order, decoded in parallel chunks; `f` sees them in order.
    pub fn for_each_frame(&self, f: impl FnMut(u64, &Frame) -> Result<(), LogError>) -> Result<(), LogError> {
        scan(&self.shared.db, f)
    }

    /// The records of one stream, in version order, found through the bucket index.
    pub fn stream(&self, stream: u64) -> Result<Vec<Record>, LogError> {
        contained(|| self.stream_unguarded(stream))
    }

    fn stream_unguarded(&self, stream: u64) -> Result<Vec<Record>, LogError> {
        let txn = self.shared.db.begin_read().map_err(storage)?;
        let buckets = txn.open_table(BUCKETS).map_err(storage)?;
        let frames = txn.open_table(FRAMES).map_err(storage)?;
        let bucket = bucket_of(stream);
        let mut records = Vec::new();
        for entry in buckets.range((bucket, 0)..=(bucket, u64::MAX)).map_err(storage)? {
            let (key, ()) = entry.map_err(storage).map(|(k, v)| (k.value(), v.value()))?;
            let seq = key.1;
            let bytes = frames.get(seq).map_err(storage)?.ok_or_else(|| LogError::Corrupt {
                frame: seq,
                error: FrameError::Invalid("indexed frame is missing".into()),
            })?;
            let archived = decode_frame(bytes.value()).map_err(|error| LogError::Corrupt { frame: seq, error })?;
            for record in archived.records.iter().filter(|r| r.stream.to_native() == stream) {
                records.push(
                    rkyv::deserialize::<Record, rkyv::rancor::Error>(record)
                        .map_err(|e| LogError::Corrupt { frame: seq, error: FrameError::Invalid(e.to_string()) })?,
                );
            }
        }
        records.sort_by_key(|r| r.version);
        Ok(records)
    }

    /// Rebuilds an aggregate from every event of its stream; returns it with its version.
    pub fn load<A: Aggregate>(&self, stream: u64) -> Result<(A, u32), LogError> {
        self.load_until(stream, |_| true)
    }

    /// The aggregate as it was at `version` (or its last version, if lower).
    pub fn load_at<A: Aggregate>(&self, stream: u64, version: u32) -> Result<(A, u32), LogError> {
        self.load_until(stream, |r| r.version <= version)
    }

    /// The aggregate as it was at `timestamp_us` (microseconds since the Unix epoch).
    pub fn load_as_of<A: Aggregate>(&self, stream: u64, timestamp_us: u64) -> Result<(A, u32), LogError> {
        self.load_until(stream, |r| r.timestamp_us <= timestamp_us)
    }

    fn load_until<A: Aggregate>(&self, stream: u64, keep: impl Fn(&Record) -> bool) -> Result<(A, u32), LogError> {
        let mut aggregate = A::default();
        let mut version = 0;
        for record in self.stream(stream)?.iter().take_while(|r| keep(r)) {
            aggregate.apply(record);
            version = record.version;
        }
        Ok((aggregate, version))
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// State rebuilt from a stream's events.
pub trait Aggregate: Default {
    /// Folds one event in.
    fn apply(&mut self, record: &Record);
}

/// Frames decoded per parallel chunk while scanning.
const SCAN_CHUNK_FRAMES: usize = 64;

/// Reads every frame in order, validating and decoding them in parallel chunks.
/// What a panic of the storage engine on damaged pages is reported as.
const DAMAGED_PAGES: &str = "its pages are damaged: the storage engine failed reading them";

/// Runs a read of the store, turning a panic of the storage engine (redb may panic on damaged
/// pages) into an error: no file content may crash the caller.
fn contained<T>(read: impl FnOnce() -> Result<T, LogError>) -> Result<T, LogError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|_| {
        let damaged = std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the log {DAMAGED_PAGES}"));
        Err(LogError::Storage(StorageFailure::new(None, damaged)))
    })
}

/// Every frame in order (see [`scan_unguarded`]), a storage engine panic contained.
fn scan(db: &redb::Database, f: impl FnMut(u64, &Frame) -> Result<(), LogError>) -> Result<(), LogError> {
    contained(|| scan_unguarded(db, f))
}

fn scan_unguarded(db: &redb::Database, mut f: impl FnMut(u64, &Frame) -> Result<(), LogError>) -> Result<(), LogError> {
    let txn = db.begin_read().map_err(storage)?;
    let frames = match txn.open_table(FRAMES) {
        Ok(frames) => frames,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(storage(e)),
    };
    let mut iter = frames.iter().map_err(storage)?;
    let mut previous: Option<u64> = None;
    loop {
        let mut chunk = Vec::with_capacity(SCAN_CHUNK_FRAMES);
        for entry in iter.by_ref().take(SCAN_CHUNK_FRAMES) {
            let (key, value) = entry.map_err(storage)?;
            chunk.push((key.value(), value));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let decoded: Vec<Result<Frame, LogError>> = chunk
            .par_iter()
            .map(|(seq, value)| {
                decode_frame_owned(*seq, value.value()).map_err(|error| LogError::Corrupt { frame: *seq, error })
            })
            .collect();
        for ((seq, _), frame) in chunk.iter().zip(decoded) {
            let frame = frame?;
            if let Some(before) = previous {
                if *seq != before + 1 {
                    return Err(LogError::Corrupt {
                        frame: *seq,
                        error: FrameError::Invalid(format!("frame {seq} follows frame {before}: frames are missing")),
                    });
                }
            }
            previous = Some(*seq);
            f(*seq, &frame)?;
        }
    }
}
