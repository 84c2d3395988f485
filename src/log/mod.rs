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

mod checkpoint;
mod consumer;
mod error;
mod format;
mod memory;
mod open;
mod read;
mod snapshot;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

pub use crate::journal::completion_record;
pub use checkpoint::InFlight;
pub use consumer::{Consumed, ConsumerInfo, ConsumerOptions, LogConsumer, Position, StartAt, CONSUMER_NAME_MAX};
pub use error::{LogError, StorageFailure, TryAppendError};
pub use format::{
    check_header, completed_ids, decode_frame, decode_frame_owned, encode_frame, ArchivedFrame, ArchivedRecord, Frame,
    FrameError, Record, BODY_LEN_MAX, ENGINE_STREAM, FORMAT_VERSION, HEADER_LEN, KIND_COMPLETED, KIND_DEAD_LETTER,
    KIND_PURGED, KIND_REDRIVEN, KIND_RESERVED_MIN, MAGIC, STAGE_INGRESS,
};
pub use memory::{MemoryDisk, PowerCut};
pub use read::Aggregate;
pub use snapshot::Snapshot;

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
    /// Most bytes of an encoded frame: a frame closes before a record would take it past this
    /// (a record larger than this alone gets a frame of its own).
    pub frame_bytes_target: usize,
    /// A checkpoint is written once this many records were appended since the last one (and at
    /// [`Log::close`]): opening reads the checkpoint and at most this many records after it.
    pub checkpoint_records: u64,
    /// Stream versions the writer keeps in memory after a checkpoint; the others are read from
    /// the checkpointed heads when a stream is appended to again. Small enough by default
    /// (65,536) for the versions of the streams written lately to stay in the CPU's cache.
    pub stream_cache: usize,
    /// What the log keeps (default: everything).
    pub retention: Retention,
    /// Every durable commit also saves redb's allocator state, so that opening after a crash
    /// reads it instead of walking the whole file to rebuild it (seconds per GiB). Costs each
    /// commit a write of that state; see BENCHMARKS.md for the measured price.
    pub quick_repair: bool,
    /// Commit on the thread that appends, with no writer thread: each append, sync or
    /// checkpoint is its own transaction, answered before the call returns, and callers take
    /// turns. For one thread driving everything (the deterministic simulation, fuzzing), where
    /// a writer thread costs a spawn per open and two thread switches per commit. With
    /// [`Durability::Eventual`] an unsynced commit becomes durable at the first append after
    /// the interval, or at [`Log::close`], since no thread watches the clock.
    pub inline_writer: bool,
}

/// How much history a log keeps. At every checkpoint the writer removes the oldest frames while
/// they take more than their share of `max_bytes` ([`LogStats::frame_budget`]), or while they are
/// older than `max_age`; it
/// never removes a frame at or after the oldest message still in flight (so in-flight work can
/// always be resumed), nor one after the checkpoint. Removed frames take their records with them
/// (dead letters included); a stream read afterwards starts at its first retained version, and a
/// stream none of whose records is left is forgotten (its head too, so the log does not grow
/// with the number of streams ever written: appended to again, it starts over at version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Retention {
    /// Most bytes of the log file: frames, heads and index together. The file's length never
    /// passes it (see [`LogStats::frame_budget`]), as long as the work in flight fits: frames
    /// of messages still in flight are never removed.
    pub max_bytes: Option<u64>,
    /// Frames whose newest record is older than this are removed.
    pub max_age: Option<std::time::Duration>,
}

impl Retention {
    /// The space frames may take under `max_bytes`: seven eighths of it. The rest is kept for the
    /// stream heads, the index, and pages freed but not yet reusable (redb reuses a page only
    /// once the transactions after the one that freed it have committed). A frame's space is
    /// what redb gives it: a run of whole pages rounded up to a power of two.
    #[must_use]
    pub fn frame_budget(&self) -> Option<u64> {
        self.max_bytes.map(|max| max - max / 8)
    }

    /// The longest the file can grow to from `file_len` without passing `max_bytes`: redb grows
    /// a file by doubling it up to one 4 GiB region, and by a region at a time after that, so
    /// under a 2 GiB bound a file of 1.2 GiB can grow no more. The writer keeps its frames to
    /// this less a slack, so the file's length, not only the space its frames take, stays under
    /// the bound. For a length not known (a storage backend) or already past the bound (opened
    /// with a smaller one), `max_bytes` itself.
    pub(crate) fn reach(&self, file_len: Option<u64>) -> Option<u64> {
        const REGION: u64 = 4 << 30;
        let max = self.max_bytes?;
        // What one growth of redb's can make of a file `len` long, with room for a region's
        // header pages.
        let grown =
            |len: u64| if len < REGION { len.saturating_mul(2) } else { len.saturating_add(REGION + (1 << 20)) };
        let mut reach = match file_len {
            Some(len) if len > 0 && len <= max => len,
            _ => return Some(max),
        };
        while grown(reach) <= max {
            reach = grown(reach);
        }
        Some(reach)
    }

    /// Whether it removes anything at all.
    #[must_use]
    pub fn is_unbounded(&self) -> bool {
        self.max_bytes.is_none() && self.max_age.is_none()
    }

    fn validate(&self) -> Result<(), LogError> {
        if self.max_bytes == Some(0) {
            return Err(LogError::Options("retention.max_bytes must be above zero".into()));
        }
        if self.max_age.is_some_and(|age| age.is_zero()) {
            return Err(LogError::Options("retention.max_age must be longer than zero".into()));
        }
        Ok(())
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Immediate,
            queue_appends: 256,
            group_records_max: 64 * 1024,
            // A run of 64 pages less what redb adds to a value in its leaf: values just over a
            // power of two of pages waste 40-50% of a run (ARCHITECTURE section 4).
            frame_bytes_target: (256 << 10) - writer::LEAF_OVERHEAD,
            checkpoint_records: 1 << 18,
            stream_cache: 1 << 16,
            retention: Retention::default(),
            quick_repair: true,
            inline_writer: false,
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
        if !(1..=1 << 32).contains(&self.checkpoint_records) {
            return bad("checkpoint_records must be within 1..=4294967296");
        }
        if !(1..=1 << 28).contains(&self.stream_cache) {
            return bad("stream_cache must be within 1..=268435456");
        }
        self.retention.validate()?;
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
    Append {
        records: Vec<Record>,
        ack: Option<Sender<Result<(), LogError>>>,
    },
    Checked {
        stream: u64,
        expected: ExpectedVersion,
        records: Vec<Record>,
        reply: Sender<Result<u32, LogError>>,
    },
    Sync {
        reply: Sender<Result<(), LogError>>,
    },
    /// Saves a stream's snapshot (replacing an older one), in the next commit.
    Snapshot {
        stream: u64,
        version: u32,
        state: Vec<u8>,
        reply: Sender<Result<(), LogError>>,
    },
    /// A durable commit with a checkpoint, even if nothing is pending.
    Checkpoint {
        reply: Sender<Result<(), LogError>>,
    },
    /// Commits a consumer's position (`None`: forgets the consumer), durably.
    Consumer {
        name: String,
        row: Option<consumer::ConsumerRow>,
        reply: Sender<Result<(), LogError>>,
    },
}

/// `table` as `txn` sees it; `None` if the log never wrote to it.
pub(crate) fn existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, LogError> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(error::storage(e)),
    }
}

/// Counters of what the log has written.
#[derive(Debug, Default)]
pub(crate) struct LogCounters {
    pub(crate) events_appended: AtomicU64,
    pub(crate) engine_records: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    pub(crate) frames_removed: AtomicU64,
    pub(crate) frames_removed_unread: AtomicU64,
    pub(crate) retained_bytes: AtomicU64,
    /// `u64::MAX` for none.
    pub(crate) frame_budget: AtomicU64,
    pub(crate) cached_streams: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) durable_commits: AtomicU64,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// What the log has written since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// Records committed.
    pub events_appended: u64,
    /// Of those, the engine's own bookkeeping on [`ENGINE_STREAM`] (completion records).
    pub engine_records: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Frames removed by retention.
    pub frames_removed: u64,
    /// Of those, frames a registered consumer that does not hold retention had not committed
    /// past: it will skip their records ([`LogConsumer::skipped`], [`ConsumerInfo::behind_retention`]).
    #[serde(default)]
    pub frames_removed_unread: u64,
    /// The space the log's frames take in its file, as of the last checkpoint.
    pub retained_bytes: u64,
    /// The space retention lets frames take, as of the last checkpoint (`None` without
    /// `retention.max_bytes`): the longest the file can grow to under the bound (redb grows a
    /// file by doubling it) less a slack of an eighth of that, or, if more, 16 MiB and twice the
    /// largest commit group, up to half of it.
    #[serde(default)]
    pub frame_budget: Option<u64>,
    /// Stream versions the writer held in memory at the last checkpoint (bounded by
    /// [`LogOptions::stream_cache`] plus the streams written in one checkpoint interval).
    pub cached_streams: u64,
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
    /// Bytes of those frames.
    pub bytes: u64,
    /// The oldest frame kept (earlier ones were removed by retention).
    pub first_frame: u64,
    /// Records in the file.
    pub records: u64,
    /// Streams with at least one record.
    pub streams: u64,
    /// Whether opening started from a checkpoint.
    pub from_checkpoint: bool,
    /// Frames read while opening (those after the checkpoint).
    pub frames_scanned: u64,
    /// Messages in flight when the log was closed or cut: ingress records with no completion.
    pub in_flight: u64,
}

pub(crate) struct Shared {
    pub(crate) db: redb::Database,
    pub(crate) counters: LogCounters,
    pub(crate) failed: Mutex<Option<String>>,
    pub(crate) has_failed: AtomicBool,
    next_id: AtomicU64,
    /// The log's file, read for its length (`None` on a storage backend).
    pub(crate) file: Option<std::fs::File>,
    /// The next frame to be committed, and the news of each commit, for consumers that follow
    /// the tail.
    pub(crate) tail: Mutex<u64>,
    pub(crate) tail_changed: parking_lot::Condvar,
    /// How long each durable commit took, in ns: redb's page writes and fsync.
    pub(crate) commit_ns: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Shared {
    /// The log file's length now, if it has a file.
    pub(crate) fn file_len(&self) -> Option<u64> {
        self.file.as_ref().and_then(|file| file.metadata().ok()).map(|meta| meta.len())
    }
}

/// Who commits: the writer thread, fed through a queue, or the appending thread itself.
pub(crate) enum Writer {
    Thread { sender: Sender<Command>, handle: JoinHandle<()> },
    Inline(Box<writer::WriterState>),
}

/// An open log. Appends go through one writer thread (or, with
/// [`LogOptions::inline_writer`], commit on the appending thread); reads run beside it.
pub struct Log {
    path: PathBuf,
    shared: Arc<Shared>,
    /// `None` once closed.
    writer: Mutex<Option<Writer>>,
    options: LogOptions,
    summary: OpenSummary,
    in_flight: Vec<InFlight>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("path", &self.path).field("options", &self.options).finish_non_exhaustive()
    }
}

impl Log {
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

    /// The messages in flight when the log was opened (ingress records without a completion
    /// record), by id: what recovery resumes.
    pub fn in_flight_at_open(&self) -> &[InFlight] {
        &self.in_flight
    }

    /// Reserves `count` consecutive record ids; returns the first.
    pub fn reserve_ids(&self, count: u64) -> u64 {
        self.shared.next_id.fetch_add(count, Ordering::Relaxed)
    }

    /// How long the durable commits since opening took (redb's page writes and fsync, from the
    /// call to its return), in microseconds; `None` before the first. Beside the commits per
    /// second, it tells whether an acknowledgement's latency is the disk's or the queue's.
    pub fn commit_latency(&self) -> Option<crate::LatencySummary> {
        let histogram = self.shared.commit_ns.lock();
        (!histogram.is_empty()).then(|| crate::LatencySummary::from_histogram(&histogram))
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
        match self.route(command)? {
            // Outside the lock: a full queue blocks only this caller.
            Some((sender, command)) => {
                sender.send(command).map_err(|_| self.failure().map_or(LogError::Closed, LogError::Failed))
            }
            None => Ok(()),
        }
    }

    /// Hands `command` to the writer: an inline writer commits it here (`None`); otherwise the
    /// writer thread's queue comes back with it, to be sent on outside the lock.
    fn route(&self, command: Command) -> Result<Option<(Sender<Command>, Command)>, LogError> {
        match self.writer.lock().as_mut().ok_or(LogError::Closed)? {
            Writer::Thread { sender, .. } => Ok(Some((sender.clone(), command))),
            Writer::Inline(state) => {
                state.commit_now(command);
                Ok(None)
            }
        }
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
        let (ack, waiter) = crossbeam_channel::bounded(1);
        let Some((sender, command)) = self.route(Command::Append { records, ack: Some(ack) })? else {
            return Ok(AckWaiter(waiter));
        };
        match sender.try_send(command) {
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
            engine_records: c.engine_records.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            frames_removed: c.frames_removed.load(Ordering::Relaxed),
            frames_removed_unread: c.frames_removed_unread.load(Ordering::Relaxed),
            retained_bytes: c.retained_bytes.load(Ordering::Relaxed),
            frame_budget: Some(c.frame_budget.load(Ordering::Relaxed)).filter(|&b| b != u64::MAX),
            cached_streams: c.cached_streams.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            durable_commits: c.durable_commits.load(Ordering::Relaxed),
            frames: c.frames.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
        }
    }

    /// Saves `state`, the aggregate of `stream` folded up to `version`, as the stream's snapshot:
    /// [`load_snapshot`](Self::load_snapshot) then reads only the records after it, and the
    /// stream keeps its version when retention removes all its records. Returns once committed.
    /// A version the stream has not reached, or version 0, is refused; a snapshot older than
    /// the one saved is ignored.
    pub fn save_snapshot<A: Snapshot>(&self, stream: u64, version: u32, state: &A) -> Result<(), LogError> {
        let mut bytes = Vec::new();
        state.encode(&mut bytes);
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(Command::Snapshot { stream, version, state: bytes, reply })?;
        answer.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Makes everything appended so far durable with a checkpoint, so that the next opening
    /// reads nothing after it.
    pub fn checkpoint(&self) -> Result<(), LogError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(Command::Checkpoint { reply })?;
        answer.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Makes everything durable with a checkpoint, stops the writer and closes the file.
    pub fn close(&self) -> Result<(), LogError> {
        let synced = if self.writer.lock().is_some() { self.checkpoint() } else { Ok(()) };
        let writer = self.writer.lock().take();
        match writer {
            Some(Writer::Thread { sender, handle }) => {
                // Its queue closed, the writer commits what is left and ends.
                drop(sender);
                let _ = handle.join();
            }
            Some(Writer::Inline(mut state)) => state.shut_down(),
            None => {}
        }
        synced
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
