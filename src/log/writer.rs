//! The log writer: drain the append queue, assign versions, pack frames, commit once, release
//! acknowledgements. After a failed commit it acknowledges nothing ever again.
//!
//! Two threads share the work of a group: the writer prepares it without a transaction
//! (versions, the running account, frames encoded), and once the group before it has committed,
//! writes it into a transaction (with a checkpoint when one is due) and hands it to the
//! committer, which commits (redb's page writes and fsync) and answers the group while the
//! writer prepares the next. Groups still commit one at a time and in order, so what a crash
//! leaves is what it left with one thread: every group up to some commit, nothing after it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redb::{ReadableTable, ReadableTableMetadata};
use rustc_hash::FxHashMap;

use super::checkpoint::{self, Checkpoint, Heads, HeadsTable, InFlight};
use super::consumer::{self, ConsumerRow, FRAME_OFFSETS};
use super::error::storage;
use super::format::{
    completed_ids, decode_frame, encode_frame, encoded_len, Frame, Record, FRAME_FIXED_BYTES, HEADER_LEN,
    KIND_COMPLETED, STAGE_INGRESS,
};
use super::snapshot::{self, SNAPSHOTS};
use super::{
    bucket_of, Command, Durability, ExpectedVersion, LogError, LogOptions, Shared, BUCKETS, ENGINE_STREAM, FRAMES,
};

/// The least slack a log file keeps under `retention.max_bytes` beside its frames: redb's own
/// tables, the heads and index, and pages freed but not yet reusable take several MiB whatever
/// the bound (a 64 MiB bound with an eighth of slack grew its file to 72 MiB in two runs of three).
const SLACK_MIN: u64 = 16 << 20;

pub(crate) struct WriterState {
    shared: Arc<Shared>,
    options: LogOptions,
    /// Last committed version of each stream: a bounded cache over the checkpointed heads.
    heads: Heads,
    /// What the next checkpoint says: the messages in flight, by ingress record id, and counts.
    book: Book,
    /// Records written since the last checkpoint.
    since_checkpoint: u64,
    /// Frame bytes past which the next commit checkpoints (and so applies retention) early,
    /// whatever the record count: without it, one checkpoint interval of frames larger than the
    /// file's slack would make redb grow the file past `retention.max_bytes`.
    retain_at: u64,
    /// The most frame bytes one group has written: the slack under `retention.max_bytes` is
    /// at least twice this.
    largest_group: u64,
    /// Frame bytes and records written since opening: the bytes a record takes, on average.
    written_bytes: u64,
    written_records: u64,
    scratch: Vec<u8>,
    next_frame: u64,
    /// Commits since the last durable one (Eventual mode).
    undurable: bool,
    last_durable: Instant,
    frame: Frame,
    frame_bytes: usize,
    buckets: Vec<u64>,
    /// Frame buffers written and free again.
    spare: Vec<PackedFrame>,
    /// Each consumer's committed position: retention keeps what those that hold it still need.
    pub(crate) consumers: FxHashMap<String, ConsumerRow>,
}

/// The log's running account: messages in flight and counts, kept by the writer (and rebuilt by
/// opening from the last checkpoint and the frames after it).
#[derive(Debug, Default)]
pub(crate) struct Book {
    pub(crate) in_flight: FxHashMap<u64, InFlight>,
    /// Frames and records ever written, streams ever started.
    pub(crate) frames: u64,
    pub(crate) records: u64,
    pub(crate) streams: u64,
    /// Bytes of the frames kept, and the oldest frame kept.
    pub(crate) bytes: u64,
    pub(crate) first_frame: u64,
}

impl Book {
    /// Starts from a checkpoint.
    pub(crate) fn from_checkpoint(checkpoint: Checkpoint) -> Self {
        Self {
            in_flight: checkpoint.in_flight.into_iter().map(|m| (m.id, m)).collect(),
            frames: checkpoint.frames,
            records: checkpoint.records,
            streams: checkpoint.streams,
            bytes: checkpoint.bytes,
            first_frame: checkpoint.first_frame,
        }
    }

    /// Accounts for `record`, written in frame `frame` with its version assigned.
    #[inline]
    pub(crate) fn account(&mut self, record: &Record, frame: u64) {
        self.records += 1;
        if record.stream == ENGINE_STREAM {
            if record.kind == KIND_COMPLETED {
                for id in completed_ids(&record.payload) {
                    self.in_flight.remove(&id);
                }
            }
            return;
        }
        if record.version == 1 {
            self.streams += 1;
        }
        if record.stage == STAGE_INGRESS {
            self.in_flight.insert(record.id, InFlight { id: record.id, stream: record.stream, frame });
        }
    }

    /// The messages in flight, by id.
    pub(crate) fn in_flight(&self) -> Vec<InFlight> {
        let mut in_flight: Vec<InFlight> = self.in_flight.values().copied().collect();
        in_flight.sort_unstable_by_key(|m| m.id);
        in_flight
    }
}

impl WriterState {
    pub(crate) fn new(shared: Arc<Shared>, options: LogOptions, heads: Heads, book: Book, next_frame: u64) -> Self {
        let mut state = Self {
            shared,
            options,
            heads,
            book,
            since_checkpoint: 0,
            retain_at: u64::MAX,
            largest_group: 0,
            written_bytes: 0,
            written_records: 0,
            scratch: Vec::new(),
            next_frame,
            undurable: false,
            last_durable: Instant::now(),
            frame: Frame::default(),
            frame_bytes: FRAME_FIXED_BYTES,
            buckets: Vec::new(),
            spare: Vec::new(),
            consumers: FxHashMap::default(),
        };
        state.plan_retention();
        state
    }

    /// The space frames may take now, and the slack kept beside them, under `retention.max_bytes`:
    /// from the longest the file can grow to ([`Retention::reach`](super::Retention)), an eighth
    /// for heads, index and pages not yet reusable; or, if more, [`SLACK_MIN`] and twice the
    /// largest group of frames seen (a whole group lands before the checkpoint after it frees
    /// anything, and at startup one group can be megabytes), up to half the file. On a storage
    /// backend (no file, so no length to keep), an eighth of `max_bytes`.
    fn budget(&self) -> Option<(u64, u64)> {
        self.options.retention.max_bytes?;
        let file_len = self.shared.file_len();
        let reach = self.options.retention.reach(file_len)?;
        let extra =
            if file_len.is_some() { self.largest_group.saturating_mul(2).max(SLACK_MIN).min(reach / 2) } else { 0 };
        let slack = (reach / 8).max(extra);
        Some((reach - slack, slack))
    }

    /// Records one group may take: `group_records_max`, or under `retention.max_bytes` no more
    /// than half the file's eighth of slack holds (at the frame bytes per record seen so far), so
    /// that one group never outgrows the room the file keeps for it. On a storage backend (no
    /// file whose length to keep), `group_records_max`.
    fn group_limit(&self) -> usize {
        /// A guess of the frame bytes of a record before any is written.
        const FIRST_GUESS: u64 = 128;
        let max = self.options.group_records_max;
        if self.options.retention.max_bytes.is_none() {
            // No size bound: no file length to read on every group.
            return max;
        }
        let file_len = self.shared.file_len();
        let Some(reach) = self.options.retention.reach(file_len).filter(|_| file_len.is_some()) else { return max };
        let per_record = self.written_bytes.checked_div(self.written_records).unwrap_or(FIRST_GUESS);
        usize::try_from(reach / 16 / per_record.max(1)).unwrap_or(usize::MAX).clamp(1, max)
    }

    /// Sets when retention must run next, from the file's length now: once the frames pass
    /// their budget (or, when work in flight holds more than that, once they grow by half the
    /// slack).
    fn plan_retention(&mut self) {
        let (retain_at, budget) = match self.budget() {
            // Frames held above the budget by work in flight: the next look once half the slack
            // more has come.
            Some((budget, slack)) if self.book.bytes > budget => (self.book.bytes.saturating_add(slack / 2), budget),
            Some((budget, _)) => (budget, budget),
            None => (u64::MAX, u64::MAX),
        };
        self.retain_at = retain_at;
        self.shared.counters.frame_budget.store(budget, Ordering::Relaxed);
    }
}

/// Replies owed once the group's transaction is settled.
#[derive(Default)]
struct Group {
    commands: Vec<Command>,
    records: usize,
    wants_sync: bool,
    wants_checkpoint: bool,
}

pub(crate) fn run(mut state: WriterState, receiver: &Receiver<Command>) {
    let mut committer = Committer::start(Arc::clone(&state.shared))
        .map_err(|error| {
            // No second thread: every group commits here, one after another.
            tracing::warn!(%error, "the log's commit thread did not start; the writer commits itself");
        })
        .ok();
    let mut group = Group::default();
    loop {
        let first = match state.options.durability {
            Durability::Eventual { sync_interval_ms } if state.undurable => {
                let wait = Duration::from_millis(sync_interval_ms).saturating_sub(state.last_durable.elapsed());
                match receiver.recv_timeout(wait) {
                    Ok(command) => command,
                    Err(RecvTimeoutError::Timeout) => {
                        // Quiet for a whole interval: make the earlier commits durable now.
                        let mut sync = Group { wants_sync: true, ..Group::default() };
                        state.next_group(&mut sync, receiver, committer.as_mut());
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match receiver.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
        };
        group.push(first);
        group.take_waiting(receiver, state.group_limit());
        state.next_group(&mut group, receiver, committer.as_mut());
    }
    if let Some(committer) = committer {
        state.settle(committer.finish());
    }
    state.shut_down();
}

/// The thread that commits sealed groups while the writer packs the next one: redb's page
/// writes and fsync on one side, versions, accounts and encoding on the other.
struct Committer {
    shared: Arc<Shared>,
    sealed: Sender<Sealed>,
    done: Receiver<Committed>,
    handle: std::thread::JoinHandle<()>,
    /// The group committing now, and whether it wrote a checkpoint (which rewrote rows of the
    /// heads table that the next group may read).
    outstanding: Option<bool>,
}

/// How a group's commit ended: whether it was durable, if it succeeded.
#[derive(Debug, Clone, Copy)]
struct Committed(Option<bool>);

impl Committer {
    fn start(shared: Arc<Shared>) -> std::io::Result<Self> {
        let (sealed, incoming) = crossbeam_channel::bounded::<Sealed>(1);
        let (report, done) = crossbeam_channel::bounded(1);
        let committing = Arc::clone(&shared);
        let handle = std::thread::Builder::new().name("conduit:log-commit".into()).spawn(move || {
            for group in incoming {
                if report.send(group.commit(&committing)).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self { shared, sealed, done, handle, outstanding: None })
    }

    /// Waits for the group committing now, if any.
    fn wait(&mut self) -> Option<Committed> {
        self.outstanding?;
        // A committer that died (a panic in redb) reports nothing.
        let report = self.done.recv().ok();
        Some(self.received(report))
    }

    /// Takes in the report of the group committing now, received by the caller (`None`: the
    /// committer died, and the log has failed).
    fn received(&mut self, report: Option<Committed>) -> Committed {
        self.outstanding = None;
        report.unwrap_or_else(|| {
            fail_shared(&self.shared, "the log's commit thread stopped".to_owned());
            Committed(None)
        })
    }

    /// Waits for the group committing now if it checkpointed.
    fn wait_for_checkpoint(&mut self) -> Option<Committed> {
        if self.outstanding == Some(true) {
            self.wait()
        } else {
            None
        }
    }

    fn hand(&mut self, group: Sealed) {
        self.outstanding = Some(group.checkpointed);
        if let Err(crossbeam_channel::SendError(group)) = self.sealed.send(group) {
            // Only a committer that died drops its end.
            self.outstanding = None;
            let reason = "the log's commit thread stopped".to_owned();
            fail_shared(&self.shared, reason.clone());
            answer(group.commands, &Err(LogError::Failed(reason)));
        }
    }

    /// Waits for the last group and stops the thread.
    fn finish(mut self) -> Option<Committed> {
        let last = self.wait();
        let Self { sealed, handle, .. } = self;
        drop(sealed);
        handle.join().ok();
        last
    }
}

/// A group whose frames are in its transaction, ready to commit, and what its commit owes.
struct Sealed {
    txn: redb::WriteTransaction,
    commands: Vec<Command>,
    checked: FxHashMap<usize, Result<u32, LogError>>,
    appended: u64,
    engine_records: u64,
    durable: bool,
    checkpointed: bool,
    /// The frame after the group's last.
    tail: u64,
}

impl Sealed {
    /// Commits, then answers everyone in the group; a failure fails the log for good.
    fn commit(self, shared: &Shared) -> Committed {
        let Self { txn, commands, mut checked, appended, engine_records, durable, tail, .. } = self;
        crash_point!("log.before_commit");
        let started = Instant::now();
        let result = txn.commit().map_err(storage);
        if durable && result.is_ok() {
            let ns = crate::metrics::ns_since(started, Instant::now()).max(1);
            crate::metrics::record_growing(&mut shared.commit_ns.lock(), ns);
        }
        crash_point!("log.after_commit");
        match result {
            Ok(()) => {
                let counters = &shared.counters;
                counters.engine_records.fetch_add(engine_records, Ordering::Relaxed);
                counters.events_appended.fetch_add(appended, Ordering::Relaxed);
                counters.commits.fetch_add(1, Ordering::Relaxed);
                if durable {
                    counters.durable_commits.fetch_add(1, Ordering::Relaxed);
                }
                answer_each(commands, &mut checked);
                *shared.tail.lock() = tail;
                shared.tail_changed.notify_all();
                Committed(Some(durable))
            }
            Err(error) => {
                fail_shared(shared, error.to_string());
                answer(commands, &Err(LogError::Failed(error.to_string())));
                Committed(None)
            }
        }
    }
}

impl WriterState {
    /// Commits `command` now, on the calling thread: a group of one (the inline writer). A
    /// failure is answered to the command and kept as the log's failure.
    pub(crate) fn commit_now(&mut self, command: Command) {
        let mut group = Group::default();
        group.push(command);
        let _ = self.commit_group(&mut group);
    }

    /// Every producer is gone: whatever was committed without fsync becomes durable now.
    pub(crate) fn shut_down(&mut self) {
        if self.undurable {
            let _ = self.commit_group(&mut Group { wants_sync: true, ..Group::default() });
        }
    }
}

impl Group {
    /// Adds what is already waiting in the queue, up to `limit` records.
    fn take_waiting(&mut self, receiver: &Receiver<Command>, limit: usize) {
        while self.records < limit {
            match receiver.try_recv() {
                Ok(command) => self.push(command),
                Err(_) => break,
            }
        }
    }

    fn push(&mut self, command: Command) {
        match &command {
            Command::Append { records, .. } | Command::Checked { records, .. } => self.records += records.len(),
            Command::Sync { .. } | Command::Snapshot { .. } | Command::Consumer { .. } => self.wants_sync = true,
            Command::Checkpoint { .. } => {
                self.wants_sync = true;
                self.wants_checkpoint = true;
            }
        }
        self.commands.push(command);
    }
}

impl WriterState {
    fn failure(&self) -> Option<String> {
        self.shared.has_failed.load(Ordering::Acquire).then(|| self.shared.failed.lock().clone()).flatten()
    }

    fn fail(&self, reason: String) {
        fail_shared(&self.shared, reason);
    }

    /// Writes one group in one transaction, commits it and answers everyone in it, all on this
    /// thread.
    fn commit_group(&mut self, group: &mut Group) -> Result<(), LogError> {
        let mut prepared = Prepared::after(self.book.bytes);
        // A failure is answered by `seal`, to every command of the group.
        self.prepare(&mut prepared, group).ok();
        let sealed = self.seal(prepared)?;
        let committed = sealed.commit(&self.shared);
        self.settle(Some(committed));
        if self.failure().is_some() {
            return Err(LogError::Closed);
        }
        Ok(())
    }

    /// Commits `group`: through the commit thread if there is one, otherwise here.
    fn next_group(&mut self, group: &mut Group, receiver: &Receiver<Command>, committer: Option<&mut Committer>) {
        match committer {
            Some(committer) => self.pipeline_group(group, receiver, committer),
            None => {
                // A failure is answered to the group and kept as the log's failure.
                self.commit_group(group).ok();
            }
        }
    }

    /// Prepares `group` while the group before it commits, and whatever else arrives until that
    /// commit is done (so a group waiting on a commit grows as it would in the queue, already
    /// prepared); then seals it and hands it to the committer.
    fn pipeline_group(&mut self, group: &mut Group, receiver: &Receiver<Command>, committer: &mut Committer) {
        // A checkpoint rewrote heads rows the preparation may read: those must be on disk.
        let checkpoint = committer.wait_for_checkpoint();
        self.settle(checkpoint);
        let mut prepared = Prepared::after(self.book.bytes);
        let limit = self.group_limit();
        let mut ok = self.prepare(&mut prepared, group).is_ok();
        while ok && committer.outstanding.is_some() && prepared.records < limit {
            crossbeam_channel::select! {
                recv(receiver) -> command => {
                    let Ok(command) = command else { break };
                    group.push(command);
                    group.take_waiting(receiver, limit - prepared.records);
                    ok = self.prepare(&mut prepared, group).is_ok();
                }
                recv(committer.done) -> report => {
                    let report = committer.received(report.ok());
                    self.settle(Some(report));
                }
            }
        }
        let before = committer.wait();
        self.settle(before);
        if let Ok(sealed) = self.seal(prepared) {
            committer.hand(sealed);
        }
    }

    /// Takes in how a commit ended.
    fn settle(&mut self, committed: Option<Committed>) {
        match committed {
            Some(Committed(Some(true))) => {
                self.undurable = false;
                self.last_durable = Instant::now();
            }
            Some(Committed(Some(false))) => self.undurable = true,
            Some(Committed(None)) | None => {}
        }
    }

    /// Adds `group` to `prepared`, doing all that needs no write transaction: versions (reading
    /// cold heads through a read transaction), expected versions checked, the running account,
    /// and the records packed into encoded frames (the last frame stays open until the group is
    /// sealed). Versions are assigned in place: if the commit fails, the log fails for good, so
    /// the map never needs rolling back. A failure fails the log; `seal` answers it.
    fn prepare(&mut self, prepared: &mut Prepared, group: &mut Group) -> Result<(), LogError> {
        let first = prepared.commands.len();
        prepared.commands.append(&mut group.commands);
        prepared.wants_sync |= std::mem::take(&mut group.wants_sync);
        prepared.wants_checkpoint |= std::mem::take(&mut group.wants_checkpoint);
        prepared.records += std::mem::take(&mut group.records);
        if self.failure().is_some() {
            return Err(LogError::Closed);
        }
        let Prepared { commands, checked, frames, .. } = prepared;
        match self.pack(&mut commands[first..], first, checked, frames) {
            Ok((appended, engine_records)) => {
                prepared.appended += appended;
                prepared.engine_records += engine_records;
                Ok(())
            }
            Err(error) => {
                self.fail(error.to_string());
                Err(error)
            }
        }
    }

    fn pack(
        &mut self,
        commands: &mut [Command],
        first: usize,
        checked: &mut FxHashMap<usize, Result<u32, LogError>>,
        frames: &mut Vec<PackedFrame>,
    ) -> Result<(u64, u64), LogError> {
        let shared = Arc::clone(&self.shared);
        let mut heads = HeadsTable::new(&shared.db);
        let mut appended = 0u64;
        let mut engine_records = 0u64;
        for (index, command) in (first..).zip(commands.iter_mut()) {
            let records = match command {
                Command::Append { records, .. } => records,
                Command::Checked { stream, expected, records, .. } => {
                    let actual = self.heads.version(*stream, &mut heads)?;
                    let ok = match *expected {
                        ExpectedVersion::Any => true,
                        ExpectedVersion::NoStream => actual == 0,
                        ExpectedVersion::Exact(v) => actual == v,
                    };
                    if !ok {
                        let conflict = LogError::VersionConflict { stream: *stream, expected: *expected, actual };
                        checked.insert(index, Err(conflict));
                        continue;
                    }
                    let added = u32::try_from(records.len()).unwrap_or(u32::MAX);
                    checked.insert(index, Ok(actual.saturating_add(added)));
                    records
                }
                Command::Snapshot { stream, version, .. } => {
                    // Written when the group is sealed; checked against the head here.
                    let head = self.heads.version(*stream, &mut heads)?;
                    let verdict = if *version == 0 || *version > head {
                        Err(LogError::SnapshotAhead { stream: *stream, version: *version, head })
                    } else {
                        Ok(head)
                    };
                    checked.insert(index, verdict);
                    continue;
                }
                Command::Consumer { .. } | Command::Sync { .. } | Command::Checkpoint { .. } => continue,
            };
            for mut record in std::mem::take(records) {
                if record.stream == ENGINE_STREAM {
                    // The engine's bookkeeping has no versions.
                    engine_records += 1;
                } else {
                    record.version = self.heads.bump(record.stream, &mut heads)?;
                }
                // A frame closes before a record would take it past its bound, so that it
                // fills its run of redb pages without spilling into a run twice the size.
                let bytes = encoded_len(&record);
                if self.frame_bytes + bytes > self.options.frame_bytes_target {
                    self.pack_frame(frames);
                }
                self.book.account(&record, self.next_frame);
                self.frame_bytes += bytes;
                self.buckets.push(bucket_of(record.stream));
                self.frame.records.push(record);
                appended += 1;
            }
        }
        Ok((appended, engine_records))
    }

    /// Opens the group's write transaction (once the one before has committed) and writes its
    /// frames, snapshots and consumer positions, and a checkpoint when one is due.
    fn seal(&mut self, mut prepared: Prepared) -> Result<Sealed, LogError> {
        if let Some(reason) = self.failure() {
            answer(prepared.commands, &Err(LogError::Failed(reason)));
            return Err(LogError::Closed);
        }
        self.pack_frame(&mut prepared.frames);
        let durable = match self.options.durability {
            Durability::Immediate => true,
            Durability::Eventual { sync_interval_ms } => {
                prepared.wants_sync || self.last_durable.elapsed() >= Duration::from_millis(sync_interval_ms)
            }
        };
        match self.write(&mut prepared, durable) {
            Ok((txn, checkpointed)) => Ok(Sealed {
                txn,
                commands: prepared.commands,
                checked: prepared.checked,
                appended: prepared.appended,
                engine_records: prepared.engine_records,
                durable,
                checkpointed,
                tail: self.next_frame,
            }),
            Err(error) => {
                self.fail(error.to_string());
                answer(prepared.commands, &Err(LogError::Failed(error.to_string())));
                Err(error)
            }
        }
    }

    fn write(&mut self, prepared: &mut Prepared, durable: bool) -> Result<(redb::WriteTransaction, bool), LogError> {
        let Prepared { commands, checked, frames: packed, appended, bytes_before, wants_checkpoint, .. } = prepared;
        let (appended, group_bytes) = (*appended, self.book.bytes - *bytes_before);
        let mut txn = self.shared.db.begin_write().map_err(storage)?;
        txn.set_durability(if durable { redb::Durability::Immediate } else { redb::Durability::None })
            .map_err(storage)?;
        txn.set_quick_repair(durable && self.options.quick_repair);
        {
            let mut frames = txn.open_table(FRAMES).map_err(storage)?;
            let mut buckets = txn.open_table(BUCKETS).map_err(storage)?;
            let mut offsets = txn.open_table(FRAME_OFFSETS).map_err(storage)?;
            for frame in packed.drain(..) {
                frames.insert(frame.seq, frame.bytes.as_slice()).map_err(storage)?;
                offsets.insert(frame.seq, frame.first_offset).map_err(storage)?;
                for &bucket in &frame.buckets {
                    buckets.insert((bucket, frame.seq), ()).map_err(storage)?;
                }
                self.spare.push(frame);
            }
        }
        for (index, command) in commands.iter_mut().enumerate() {
            match command {
                Command::Snapshot { stream, version, state, .. } => {
                    if matches!(checked.get(&index), Some(Ok(_))) {
                        let saved = snapshot::write(&txn, *stream, *version, std::mem::take(state), &mut self.scratch);
                        if let Err(error) = saved {
                            checked.insert(index, Err(error));
                        }
                    }
                }
                Command::Consumer { name, row, .. } => {
                    consumer::write(&txn, name, row.as_ref(), &mut self.scratch)?;
                    match row {
                        Some(row) => self.consumers.insert(name.clone(), *row),
                        None => self.consumers.remove(name.as_str()),
                    };
                }
                _ => {}
            }
        }
        self.since_checkpoint += appended;
        self.written_bytes += group_bytes;
        self.written_records += appended;
        if group_bytes > self.largest_group && !self.options.retention.is_unbounded() {
            self.largest_group = group_bytes;
            self.plan_retention();
        }
        let checkpointed = *wants_checkpoint
            || self.since_checkpoint >= self.options.checkpoint_records
            || self.book.bytes > self.retain_at;
        if checkpointed {
            self.checkpoint(&txn)?;
        }
        Ok((txn, checkpointed))
    }

    /// Writes the heads changed since the last checkpoint and a new checkpoint, in `txn`.
    fn checkpoint(&mut self, txn: &redb::WriteTransaction) -> Result<(), LogError> {
        crash_point!("log.checkpoint");
        self.heads.checkpoint(txn, &mut self.scratch)?;
        self.retain(txn)?;
        let checkpoint = Checkpoint {
            next_frame: self.next_frame,
            next_id: self.shared.next_id.load(Ordering::Relaxed),
            frames: self.book.frames,
            records: self.book.records,
            streams: self.book.streams,
            bytes: self.book.bytes,
            first_frame: self.book.first_frame,
            in_flight: self.book.in_flight(),
        };
        checkpoint::write(txn, &checkpoint, &mut self.scratch)?;
        self.since_checkpoint = 0;
        self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.cached_streams.store(self.heads.cached() as u64, Ordering::Relaxed);
        self.shared.counters.retained_bytes.store(self.book.bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Removes the oldest frames the retention policy lets go, in `txn`: never one holding (or
    /// following) the ingress record of a message in flight.
    fn retain(&mut self, txn: &redb::WriteTransaction) -> Result<(), LogError> {
        let policy = self.options.retention;
        if policy.is_unbounded() {
            return Ok(());
        }
        crash_point!("log.retention");
        let in_flight = self.book.in_flight.values().map(|m| m.frame);
        let consumers = self.consumers.values().filter(|c| c.holds_retention).map(|c| c.frame);
        let keep_from = in_flight.chain(consumers).min().unwrap_or(self.next_frame);
        // Consumers that let retention pass them lose the frames from theirs on, unread.
        let unread_from = self.consumers.values().filter(|c| !c.holds_retention).map(|c| c.frame).min();
        let mut removed_unread = 0u64;
        let horizon_us = policy.max_age.map(|age| {
            let age_us = u64::try_from(age.as_micros()).unwrap_or(u64::MAX);
            crate::clock::unix_micros().saturating_sub(age_us)
        });
        // Once over its budget, retention removes down to half the slack below it, so that the
        // next early checkpoint is a while off.
        let frame_budget = self.budget().map(|(budget, slack)| budget.saturating_sub(slack / 2));
        let mut frames = txn.open_table(FRAMES).map_err(storage)?;
        let mut buckets = txn.open_table(BUCKETS).map_err(storage)?;
        let mut offsets = txn.open_table(FRAME_OFFSETS).map_err(storage)?;
        let mut removed = 0u64;
        // The last version each stream had in the frames removed: a stream whose head is among
        // them has nothing left, and its head goes too.
        let mut ended: FxHashMap<u64, u32> = FxHashMap::default();
        while self.book.first_frame < keep_from {
            let seq = self.book.first_frame;
            let over_size = frame_budget.is_some_and(|budget| self.book.bytes > budget);
            if !over_size && horizon_us.is_none() {
                break;
            }
            let (bytes, mut indexed) = {
                let Some(value) = frames.get(seq).map_err(storage)? else {
                    self.book.first_frame += 1;
                    continue;
                };
                let archived = decode_frame(value.value()).map_err(|error| LogError::Corrupt { frame: seq, error })?;
                let newest_us = archived.records.iter().map(|r| r.timestamp_us.to_native()).max().unwrap_or(0);
                let too_old = horizon_us.is_some_and(|horizon| newest_us < horizon);
                if !over_size && !too_old {
                    break;
                }
                let mut indexed = Vec::with_capacity(archived.records.len());
                for record in archived.records.iter() {
                    ended.insert(record.stream.to_native(), record.version.to_native());
                    indexed.push(bucket_of(record.stream.to_native()));
                }
                (stored_bytes(value.value().len()), indexed)
            };
            frames.remove(seq).map_err(storage)?;
            offsets.remove(seq).map_err(storage)?;
            indexed.sort_unstable();
            indexed.dedup();
            for bucket in indexed {
                buckets.remove((bucket, seq)).map_err(storage)?;
            }
            self.book.bytes = self.book.bytes.saturating_sub(bytes);
            self.book.first_frame += 1;
            removed += 1;
            removed_unread += u64::from(unread_from.is_some_and(|from| seq >= from));
        }
        ended.remove(&ENGINE_STREAM);
        let snapshots = txn.open_table(SNAPSHOTS).map_err(storage)?;
        if !snapshots.is_empty().map_err(storage)? {
            // A stream with a snapshot lives on in it: it keeps its head, and its versions go on.
            let mut kept = Vec::new();
            for &stream in ended.keys() {
                if snapshots.get(stream).map_err(storage)?.is_some() {
                    kept.push(stream);
                }
            }
            for stream in kept {
                ended.remove(&stream);
            }
        }
        drop(snapshots);
        self.heads.forget(txn, &ended, &mut self.scratch)?;
        self.shared.counters.frames_removed.fetch_add(removed, Ordering::Relaxed);
        if removed_unread > 0 {
            self.shared.counters.frames_removed_unread.fetch_add(removed_unread, Ordering::Relaxed);
            tracing::warn!(
                frames = removed_unread,
                "retention removed frames a consumer had not read (it does not hold retention)"
            );
        }
        self.plan_retention();
        Ok(())
    }

    /// Closes the frame being filled: encoded into a buffer of the group's, its buckets listed.
    fn pack_frame(&mut self, out: &mut Vec<PackedFrame>) {
        if self.frame.records.is_empty() {
            return;
        }
        let seq = self.next_frame;
        self.frame.seq = seq;
        let mut packed = self.spare.pop().unwrap_or_default();
        encode_frame(&self.frame, &mut packed.bytes);
        debug_assert!(packed.bytes.len() > HEADER_LEN);
        debug_assert!(packed.bytes.len() <= self.frame_bytes, "{} > {}", packed.bytes.len(), self.frame_bytes);
        packed.seq = seq;
        packed.first_offset = self.book.records - self.frame.records.len() as u64;
        packed.buckets.clear();
        packed.buckets.append(&mut self.buckets);
        packed.buckets.sort_unstable();
        packed.buckets.dedup();
        let counters = &self.shared.counters;
        counters.frames.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(packed.bytes.len() as u64, Ordering::Relaxed);
        self.next_frame += 1;
        self.book.frames += 1;
        self.book.bytes += stored_bytes(packed.bytes.len());
        self.frame.records.clear();
        self.frame_bytes = FRAME_FIXED_BYTES;
        out.push(packed);
    }
}

/// A group made ready outside any transaction.
#[derive(Default)]
struct Prepared {
    commands: Vec<Command>,
    checked: FxHashMap<usize, Result<u32, LogError>>,
    frames: Vec<PackedFrame>,
    /// Records the commands carry, and those appended (less any whose expected version failed).
    records: usize,
    appended: u64,
    engine_records: u64,
    /// The frames' bytes before the group.
    bytes_before: u64,
    wants_sync: bool,
    wants_checkpoint: bool,
}

impl Prepared {
    fn after(bytes_before: u64) -> Self {
        Self { bytes_before, ..Self::default() }
    }
}

/// One encoded frame, the offset of its first record and the buckets its records index.
#[derive(Default)]
struct PackedFrame {
    seq: u64,
    bytes: Vec<u8>,
    first_offset: u64,
    buckets: Vec<u64>,
}

fn fail_shared(shared: &Shared, reason: String) {
    tracing::error!(%reason, "log commit failed; the log accepts nothing more");
    shared.failed.lock().get_or_insert(reason);
    shared.has_failed.store(true, Ordering::Release);
}

fn answer(commands: Vec<Command>, result: &Result<(), LogError>) {
    for command in commands {
        match command {
            Command::Append { ack: Some(ack), .. }
            | Command::Sync { reply: ack }
            | Command::Checkpoint { reply: ack }
            | Command::Consumer { reply: ack, .. } => {
                send(&ack, result.clone());
            }
            Command::Append { ack: None, .. } => {}
            Command::Checked { reply, .. } => send(&reply, result.clone().map(|()| 0)),
            Command::Snapshot { reply, .. } => send(&reply, result.clone()),
        }
    }
}

fn answer_each(commands: Vec<Command>, checked: &mut FxHashMap<usize, Result<u32, LogError>>) {
    for (index, command) in commands.into_iter().enumerate() {
        match command {
            Command::Append { ack: Some(ack), .. }
            | Command::Sync { reply: ack }
            | Command::Checkpoint { reply: ack }
            | Command::Consumer { reply: ack, .. } => {
                send(&ack, Ok(()));
            }
            Command::Append { ack: None, .. } => {}
            Command::Checked { reply, .. } => {
                let result = checked.remove(&index).unwrap_or(Err(LogError::Closed));
                send(&reply, result);
            }
            Command::Snapshot { reply, .. } => {
                let result = checked.remove(&index).unwrap_or(Err(LogError::Closed));
                send(&reply, result.map(|_| ()));
            }
        }
    }
}

fn send<T>(reply: &Sender<T>, value: T) {
    // The asker may have stopped waiting; that is its business.
    let _ = reply.send(value);
}

/// Bytes redb adds to a value in its leaf (its header and offsets, the key), rounded up.
pub(crate) const LEAF_OVERHEAD: usize = 64;

/// The space a frame of `len` bytes takes in the file: redb gives a value larger than a page a
/// run of pages rounded up to a power of two (with its leaf's few bytes of overhead); smaller
/// ones share pages.
pub(crate) fn stored_bytes(len: usize) -> u64 {
    const PAGE: u64 = 4096;
    let len = (len + LEAF_OVERHEAD) as u64;
    if len <= PAGE {
        len
    } else {
        len.div_ceil(PAGE).next_power_of_two() * PAGE
    }
}
