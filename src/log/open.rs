//! Opening a log: the redb file, the scan that learns each stream's last version, the writer's
//! start; and the contained, parallel scan of every frame that opening and reads share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rayon::prelude::*;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use rustc_hash::FxHashMap;

use super::checkpoint::{self, Heads};
use super::error::storage;
use super::writer::Book;
use super::{
    decode_frame_owned, existing, writer, Frame, FrameError, Log, LogCounters, LogError, LogOptions, OpenSummary,
    Shared, StorageFailure, Writer, BUCKETS, ENGINE_STREAM, FORMAT_VERSION, FRAMES, META, META_FORMAT,
};

/// Opens the redb file, mapping "not a database" to a clear error.
fn open_database(path: &Path, create: bool) -> Result<redb::Database, LogError> {
    let not_a_log = |reason: String| LogError::NotALog { path: path.to_owned(), reason };
    let opened =
        std::panic::catch_unwind(|| if create { redb::Database::create(path) } else { redb::Database::open(path) });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(LogError::InUse { path: path.to_owned() }),
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
    /// Opening reads the last checkpoint and the frames written after it (validated: a
    /// corrupt frame is an error, never a panic), so its cost follows the checkpoint interval,
    /// not the history. A file another process has open is [`LogError::InUse`].
    pub fn open(path: impl AsRef<Path>, options: LogOptions) -> Result<Self, LogError> {
        options.validate()?;
        let path = path.as_ref().to_owned();
        if path.exists() {
            let db = open_database(&path, false)?;
            let file = std::fs::File::open(&path).ok();
            return Self::start(path, db, file, options);
        }
        // A new log is made beside its path and renamed into place once initialised: a crash
        // while creating it leaves no half-made file under the log's name.
        let mut creating = path.clone().into_os_string();
        creating.push(".creating");
        let creating = PathBuf::from(creating);
        // A leftover of a creation that crashed: never a log anyone acknowledged into.
        std::fs::remove_file(&creating).ok();
        let db = open_database(&creating, true)?;
        let file = std::fs::File::open(&creating).ok();
        let log = Self::start(path.clone(), db, file, options)?;
        std::fs::rename(&creating, &path)
            .map_err(|e| LogError::Storage(StorageFailure::new(Some(path.display().to_string()), e)))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once the directory is.
            if let Ok(dir) = std::fs::File::open(dir) {
                dir.sync_all().ok();
            }
        }
        Ok(log)
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
        Self::start(path, db, None, options)
    }

    /// Reads what the file holds and starts the writer. redb may panic on damaged pages (its
    /// B-tree code treats some page states as unreachable): that is contained here and reported
    /// as a file that is not a readable log.
    fn start(
        path: PathBuf,
        db: redb::Database,
        file: Option<std::fs::File>,
        options: LogOptions,
    ) -> Result<Self, LogError> {
        let label = path.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::start_unguarded(path, db, file, options)))
            .unwrap_or_else(|_| Err(LogError::NotALog { path: label, reason: DAMAGED_PAGES.into() }))
    }

    fn start_unguarded(
        path: PathBuf,
        db: redb::Database,
        file: Option<std::fs::File>,
        options: LogOptions,
    ) -> Result<Self, LogError> {
        // A log of this format with every table needs no write (and no commit) to open.
        if !is_ready(&db)? {
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
                txn.open_table(checkpoint::HEADS).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
        }
        let shared = Arc::new(Shared {
            db,
            counters: LogCounters::default(),
            failed: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            file,
            tail: Mutex::new(0),
            tail_changed: parking_lot::Condvar::new(),
            commit_ns: Mutex::new(crate::metrics::new_growing_histogram()),
        });
        // From the last checkpoint (if any), the frames after it: versions changed since,
        // messages started and finished since, the highest id.
        let checkpoint = read_checkpoint(&shared.db)?;
        let from_checkpoint = checkpoint.is_some();
        let (first_frame, next_id, mut book) = match checkpoint {
            Some(checkpoint) => (checkpoint.next_frame, checkpoint.next_id, Book::from_checkpoint(checkpoint)),
            None => (0, 1, Book::default()),
        };
        let mut changed: FxHashMap<u64, u32> = FxHashMap::default();
        let mut next_frame = first_frame;
        let mut max_id = next_id.saturating_sub(1);
        let mut scanned = 0;
        let mut first_seen = None;
        scan_sized(&shared.db, first_frame, |seq, frame, bytes| {
            next_frame = seq + 1;
            scanned += 1;
            first_seen.get_or_insert(seq);
            book.frames += 1;
            book.bytes += super::writer::stored_bytes(bytes);
            for record in &frame.records {
                if record.stream != ENGINE_STREAM {
                    changed.insert(record.stream, record.version);
                }
                book.account(record, seq);
                max_id = max_id.max(record.id);
            }
            Ok(())
        })?;
        if !from_checkpoint {
            book.first_frame = first_seen.unwrap_or(0);
        }
        let in_flight = book.in_flight();
        let summary = OpenSummary {
            frames: book.frames,
            bytes: book.bytes,
            first_frame: book.first_frame,
            records: book.records,
            streams: book.streams,
            from_checkpoint,
            frames_scanned: scanned,
            in_flight: in_flight.len() as u64,
        };
        shared.next_id.store(max_id + 1, Ordering::Relaxed);
        *shared.tail.lock() = next_frame;
        let consumers = contained(|| super::consumer::read_all(&shared.db))?;
        let heads = Heads::new(options.stream_cache, changed);
        let mut state = writer::WriterState::new(Arc::clone(&shared), options, heads, book, next_frame);
        state.consumers = consumers.into_iter().collect();
        let writer = if options.inline_writer {
            Writer::Inline(Box::new(state))
        } else {
            let (sender, receiver) = crossbeam_channel::bounded(options.queue_appends);
            let handle = std::thread::Builder::new()
                .name("conduit:log-writer".into())
                .spawn(move || writer::run(state, &receiver))
                .map_err(storage)?;
            Writer::Thread { sender, handle }
        };
        Ok(Self { path, shared, writer: Mutex::new(Some(writer)), options, summary, in_flight })
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
}

/// Frames decoded per parallel chunk while scanning.
const SCAN_CHUNK_FRAMES: usize = 64;
/// A chunk of fewer bytes is decoded on the scanning thread.
const SCAN_PARALLEL_BYTES_MIN: usize = 256 << 10;

/// Reads every frame in order, validating and decoding them in parallel chunks.
/// What a panic of the storage engine on damaged pages is reported as.
const DAMAGED_PAGES: &str = "its pages are damaged: the storage engine failed reading them";

/// Runs a read of the store, turning a panic of the storage engine (redb may panic on damaged
/// pages) into an error: no file content may crash the caller.
pub(super) fn contained<T>(read: impl FnOnce() -> Result<T, LogError>) -> Result<T, LogError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|_| {
        let damaged = std::io::Error::new(std::io::ErrorKind::InvalidData, format!("the log {DAMAGED_PAGES}"));
        Err(LogError::Storage(StorageFailure::new(None, damaged)))
    })
}

/// Every frame from `first` on, in order (see [`scan_unguarded`]), a storage engine panic
/// contained.
pub(super) fn scan(
    db: &redb::Database,
    first: u64,
    mut f: impl FnMut(u64, &Frame) -> Result<(), LogError>,
) -> Result<(), LogError> {
    contained(|| scan_unguarded(db, first, |seq, frame, _| f(seq, frame)))
}

/// [`scan`], telling `f` each frame's stored size too.
pub(super) fn scan_sized(
    db: &redb::Database,
    first: u64,
    f: impl FnMut(u64, &Frame, usize) -> Result<(), LogError>,
) -> Result<(), LogError> {
    contained(|| scan_unguarded(db, first, f))
}

fn scan_unguarded(
    db: &redb::Database,
    first: u64,
    mut f: impl FnMut(u64, &Frame, usize) -> Result<(), LogError>,
) -> Result<(), LogError> {
    let txn = db.begin_read().map_err(storage)?;
    let Some(frames) = existing(&txn, FRAMES)? else { return Ok(()) };
    let mut iter = frames.range(first..).map_err(storage)?;
    // After a checkpoint the first frame must be the one it names.
    let mut previous: Option<u64> = first.checked_sub(1);
    loop {
        let mut chunk = Vec::with_capacity(SCAN_CHUNK_FRAMES);
        for entry in iter.by_ref().take(SCAN_CHUNK_FRAMES) {
            let (key, value) = entry.map_err(storage)?;
            chunk.push((key.value(), value));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let decode = |(seq, value): &(u64, redb::AccessGuard<'_, &[u8]>)| {
            decode_frame_owned(*seq, value.value()).map_err(|error| LogError::Corrupt { frame: *seq, error })
        };
        // Handing a few small frames to the pool costs more than decoding them here (a small
        // log, or the frames after a checkpoint): the caller sleeps while a worker wakes.
        let bytes: usize = chunk.iter().map(|(_, value)| value.value().len()).sum();
        let decoded: Vec<Result<Frame, LogError>> = if bytes < SCAN_PARALLEL_BYTES_MIN {
            chunk.iter().map(decode).collect()
        } else {
            chunk.par_iter().map(decode).collect()
        };
        for ((seq, value), frame) in chunk.iter().zip(decoded) {
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
            f(*seq, &frame, value.value().len())?;
        }
    }
}

/// The log's last checkpoint, if it has one this build can trust. Checkpoints and heads are
/// derived from the frames: an unreadable checkpoint, or one an earlier build wrote, is dropped
/// with the heads, and opening rebuilds them from a full scan (written again at the next
/// checkpoint).
fn read_checkpoint(db: &redb::Database) -> Result<Option<checkpoint::Checkpoint>, LogError> {
    match contained(|| checkpoint::read(db)) {
        Ok(_) if contained(|| checkpoint::has_earlier(db))? => {
            tracing::warn!("a checkpoint written by an earlier build: rebuilding it from every frame");
        }
        Ok(checkpoint) => return Ok(checkpoint),
        Err(LogError::CorruptIndex { table, key, error }) => {
            tracing::warn!(table, key, %error, "unreadable checkpoint: rebuilding it from every frame");
        }
        Err(other) => return Err(other),
    }
    contained(|| checkpoint::forget(db))?;
    Ok(None)
}

/// Whether `db` is a log of this build's format with every table in place: opening it then
/// writes nothing.
fn is_ready(db: &redb::Database) -> Result<bool, LogError> {
    fn present<T>(result: Result<T, redb::TableError>) -> Result<bool, LogError> {
        match result {
            Ok(_) => Ok(true),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(error) => Err(storage(error)),
        }
    }
    let txn = db.begin_read().map_err(storage)?;
    let Ok(meta) = txn.open_table(META) else { return Ok(false) };
    let format = meta.get(META_FORMAT).map_err(storage)?.map(|v| v.value());
    Ok(format == Some(u64::from(FORMAT_VERSION))
        && present(txn.open_table(FRAMES))?
        && present(txn.open_table(BUCKETS))?
        && present(txn.open_table(checkpoint::HEADS))?)
}
