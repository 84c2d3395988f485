//! Checkpoints: opening reads the last checkpoint and only the frames after it, and finds the same
//! streams, versions and messages in flight as reading the whole log would; stream versions
//! survive the writer's bounded cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use conduit::log::{ExpectedVersion, Log, LogOptions, Record, ENGINE_STREAM, KIND_COMPLETED, STAGE_INGRESS};

fn options(checkpoint_records: u64, stream_cache: usize) -> LogOptions {
    LogOptions { checkpoint_records, stream_cache, ..LogOptions::default() }
}

/// A submitted message: an ingress record on `stream` whose id is its `seq`.
fn ingress(log: &Log, stream: u64) -> Record {
    let id = log.reserve_ids(1);
    Record { id, stream, kind: 1, stage: STAGE_INGRESS, correlation: id, payload: vec![7; 16], ..Record::default() }
}

fn fact(stream: u64) -> Record {
    Record { stream, kind: 2, stage: 0, payload: vec![1; 8], ..Record::default() }
}

fn completion(ids: &[u64]) -> Record {
    let payload = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    Record { stream: ENGINE_STREAM, kind: KIND_COMPLETED, payload, ..Record::default() }
}

/// What reading every frame says: each stream's last version, and the ingress ids not completed.
fn full_scan(log: &Log) -> (BTreeMap<u64, u32>, BTreeSet<u64>) {
    let mut versions = BTreeMap::new();
    let mut open = BTreeSet::new();
    log.for_each(|record| {
        if record.stream == ENGINE_STREAM {
            for chunk in record.payload.chunks_exact(8) {
                open.remove(&u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
            }
            return;
        }
        versions.insert(record.stream, record.version);
        if record.stage == STAGE_INGRESS {
            open.insert(record.id);
        }
    })
    .expect("readable");
    (versions, open)
}

/// Appends a workload: 300 messages on 300 streams, each with a few facts; every message but
/// each seventh completes. Appends go one record at a time so checkpoints fall between them.
fn workload(log: &Log) {
    let mut finished = Vec::new();
    for n in 0..300u64 {
        let stream = n * 37 % 5_000;
        let message = ingress(log, stream);
        let id = message.id;
        log.append(vec![message]).expect("open").wait().expect("committed");
        for _ in 0..(n % 4) {
            log.append(vec![fact(stream)]).expect("open").wait().expect("committed");
        }
        if n % 7 != 0 {
            finished.push(id);
        }
        if finished.len() >= 10 {
            log.append(vec![completion(&finished)]).expect("open").wait().expect("committed");
            finished.clear();
        }
    }
    log.append(vec![completion(&finished)]).expect("open").wait().expect("committed");
}

fn in_flight_ids(log: &Log) -> BTreeSet<u64> {
    log.in_flight_at_open().iter().map(|m| m.id).collect()
}

/// Copies a log's file while it is open and synced: what a crash right now would leave.
fn cut(path: &Path, to: &Path) {
    std::fs::copy(path, to).expect("copy the file");
}

#[test]
fn a_closed_log_opens_from_its_checkpoint_without_reading_frames() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    let log = Log::open(&path, options(1 << 20, 1 << 20)).expect("new log");
    workload(&log);
    let expected = full_scan(&log);
    let written = log.stats();
    log.close().expect("closes");
    drop(log);

    let log = Log::open(&path, options(1 << 20, 1 << 20)).expect("reopens");
    let summary = log.opened_with().clone();
    assert!(summary.from_checkpoint, "close writes a checkpoint");
    assert_eq!(summary.frames_scanned, 0, "nothing after the checkpoint to read");
    assert_eq!(summary.records, written.events_appended);
    assert_eq!(summary.streams, expected.0.len() as u64);
    assert_eq!(in_flight_ids(&log), expected.1, "the messages in flight are the ones never completed");
    assert_eq!(summary.in_flight, 300 / 7 + 1);
}

#[test]
fn a_cut_after_checkpoints_opens_from_the_last_and_reads_only_the_tail() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    // A checkpoint every 50 records; versions cached for 8 streams only.
    let log = Log::open(&path, options(50, 8)).expect("new log");
    workload(&log);
    log.sync().expect("durable");
    assert!(log.stats().checkpoints >= 10, "{:?}", log.stats());
    let expected = full_scan(&log);
    let copy = dir.path().join("cut.redb");
    cut(&path, &copy);
    drop(log);

    let log = Log::open(&copy, options(50, 8)).expect("opens the cut file");
    let summary = log.opened_with().clone();
    assert!(summary.from_checkpoint);
    assert!(summary.frames_scanned > 0 && summary.frames_scanned < summary.frames / 2, "{summary:?}");
    assert_eq!(in_flight_ids(&log), expected.1);
    assert_eq!(summary.streams, expected.0.len() as u64);
    // Every stream goes on from its last version, cached or not.
    for (&stream, &version) in expected.0.iter().step_by(7) {
        let next = log.append_expecting(stream, ExpectedVersion::Exact(version), vec![fact(stream)]);
        assert_eq!(next, Ok(version + 1), "stream {stream}");
    }
    let fresh = log.append_expecting(999_999, ExpectedVersion::NoStream, vec![fact(0)]);
    assert_eq!(fresh, Ok(1));
}

#[test]
fn versions_survive_the_cache_letting_go() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    let log = Log::open(&path, options(10, 1)).expect("new log");
    for round in 1..=5u32 {
        for stream in 0..40u64 {
            let version = log.append_expecting(stream * 1_500, ExpectedVersion::Any, vec![fact(0)]).expect("appends");
            assert_eq!(version, round, "stream {stream} in round {round}");
        }
    }
    assert!(log.stats().cached_streams <= 40, "{:?}", log.stats());
    let (versions, _) = full_scan(&log);
    assert!(versions.values().all(|&v| v == 5), "contiguous versions in the frames too: {versions:?}");
}

/// Appends that never wait keep the writer preparing each group while the one before commits,
/// and with a cache of one stream and a checkpoint every ten records, nearly every group reads
/// heads the checkpoint before it has just written: each stream's versions still run 1, 2, 3...
#[test]
fn versions_stay_contiguous_while_the_next_group_is_prepared_behind_a_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), options(10, 1)).expect("new log");
    for _ in 0..30 {
        for stream in 0..300u64 {
            log.append_detached(vec![fact(stream * 1_500), fact(stream * 1_500)]).expect("open");
        }
    }
    log.sync().expect("durable");
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let mut out_of_turn = 0;
    log.for_each(|record| {
        let last = seen.entry(record.stream).or_default();
        out_of_turn += u32::from(record.version != *last + 1);
        *last = record.version;
    })
    .expect("readable");
    assert_eq!(out_of_turn, 0, "versions repeated or skipped");
    assert!(seen.values().all(|&v| v == 60), "every stream at version 60");
    assert!(log.stats().checkpoints > 20, "{:?}", log.stats());
}

#[test]
fn bad_checkpoint_options_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (options, field) in [(options(0, 10), "checkpoint_records"), (options(10, 0), "stream_cache")] {
        let error = Log::open(dir.path().join("log.redb"), options).expect_err("refused");
        assert!(error.to_string().contains(field), "{error}");
    }
}

/// A message that starts and finishes at once: its ingress record, then its completion.
fn finished_message(log: &Log, stream: u64) {
    let message = ingress(log, stream);
    let id = message.id;
    log.append(vec![message]).expect("open").wait().expect("committed");
    log.append(vec![completion(&[id])]).expect("open").wait().expect("committed");
}

#[derive(Default)]
struct Count(u32);

impl conduit::log::Aggregate for Count {
    fn apply(&mut self, _: &Record) {
        self.0 += 1;
    }
}

#[test]
fn retention_removes_old_frames_but_never_work_in_flight() {
    const MAX_BYTES: u64 = 40_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    let retention = conduit::log::Retention { max_bytes: Some(MAX_BYTES), max_age: None };
    let log = Log::open(&path, LogOptions { retention, ..options(50, 1 << 20) }).expect("new log");
    // Two early streams, and a message that never finishes, in the first frames.
    log.append(vec![fact(77), fact(77), fact(78)]).expect("open").wait().expect("committed");
    let pinned = ingress(&log, 5);
    let pinned_id = pinned.id;
    log.append(vec![pinned]).expect("open").wait().expect("committed");
    log.append(vec![fact(78)]).expect("open").wait().expect("committed");
    for n in 0..1_300 {
        finished_message(&log, 2_000 + n);
    }
    log.checkpoint().expect("checkpoints");
    let stats = log.stats();
    assert!(stats.frames_removed > 0, "{stats:?}");
    let (_, open) = full_scan(&log);
    assert_eq!(open, BTreeSet::from([pinned_id]), "only the unfinished message is in flight");
    let kept = log.ingress_records(&[conduit::log::InFlight {
        id: pinned_id,
        stream: 5,
        frame: pinned_frame(&log, pinned_id),
    }]);
    assert_eq!(kept.map(|r| r.len()), Ok(1), "the in-flight message's frame is kept");
    // The frames before the pinned message were removed; the ones after it stay (the pin holds
    // more than MAX_BYTES here, which retention accepts rather than lose work).
    let early = log.stream(77).expect("reads");
    assert!(early.is_empty(), "stream 77's frames were before the pin: {early:?}");
    // Stream 78 kept its second record: its early history is gone, and loading it says so.
    match log.load::<Count>(78) {
        Err(conduit::log::LogError::Truncated { stream: 78, first_retained: 2 }) => {}
        other => panic!("expected a truncated stream: {:?}", other.map(|(c, v)| (c.0, v))),
    }
    // Nothing of stream 77 is left: it is forgotten, head and all, and starts over.
    assert!(log.append_expecting(77, ExpectedVersion::Exact(2), vec![fact(77)]).is_err());
    let again = log.append_expecting(77, ExpectedVersion::NoStream, vec![fact(77)]);
    assert_eq!(again, Ok(1), "a stream none of whose records is left is forgotten");
    assert_eq!(log.load::<Count>(77).map(|(count, version)| (count.0, version)), Ok((1, 1)));

    // Once the pinned message finishes, retention catches up to the size bound.
    log.append(vec![completion(&[pinned_id])]).expect("open").wait().expect("committed");
    for n in 0..200 {
        finished_message(&log, 4_000 + n);
    }
    log.checkpoint().expect("checkpoints");
    let stats = log.stats();
    assert!(stats.retained_bytes <= MAX_BYTES, "{stats:?}");
    log.close().expect("closes");
    drop(log);
    let log = Log::open(&path, options(50, 1 << 20)).expect("reopens");
    assert!(log.in_flight_at_open().is_empty());
    assert!(log.opened_with().bytes <= MAX_BYTES, "{:?}", log.opened_with());
    assert!(log.opened_with().first_frame > 0);
    log.for_each(|_| {}).expect("what is left reads as a whole");
}

/// The frame holding record `id` (a full read: this is a test).
fn pinned_frame(log: &Log, id: u64) -> u64 {
    let mut found = None;
    log.for_each_frame(|seq, frame| {
        if frame.records.iter().any(|r| r.id == id) {
            found = Some(seq);
        }
        Ok(())
    })
    .expect("reads");
    found.expect("the record is in the log")
}

#[test]
fn a_retention_of_nothing_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (retention, field) in [
        (conduit::log::Retention { max_bytes: Some(0), max_age: None }, "retention.max_bytes"),
        (conduit::log::Retention { max_bytes: None, max_age: Some(std::time::Duration::ZERO) }, "retention.max_age"),
    ] {
        let error = Log::open(dir.path().join("log.redb"), LogOptions { retention, ..LogOptions::default() })
            .expect_err("refused");
        assert!(error.to_string().contains(field), "{error}");
    }
}

/// A log in a new directory holding the workload, closed (so checkpointed), with what a full
/// scan of it found.
fn closed_workload_log() -> (tempfile::TempDir, (BTreeMap<u64, u32>, BTreeSet<u64>)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), options(1 << 20, 4)).expect("new log");
    workload(&log);
    let expected = full_scan(&log);
    log.close().expect("closes");
    (dir, expected)
}

/// Writes `bytes` as the checkpoint in `table` of the closed log at `path`.
fn overwrite_checkpoint(path: &Path, table: &str, bytes: &[u8]) {
    let db = redb::Database::open(path).expect("a redb file");
    let txn = db.begin_write().expect("writable");
    {
        let checkpoint: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new(table);
        let mut table = txn.open_table(checkpoint).expect("the checkpoint table");
        table.insert(0, bytes).expect("insert");
    }
    txn.commit().expect("commit");
}

#[test]
fn an_unreadable_checkpoint_is_rebuilt_from_the_frames() {
    let (dir, expected) = closed_workload_log();
    let path = dir.path().join("log.redb");
    // The messages in flight as the checkpoint packed them, streams and frames included.
    let packed = Log::open(&path, options(1 << 20, 4)).expect("opens").in_flight_at_open().to_vec();
    overwrite_checkpoint(&path, "checkpoint.v2", b"CDLF not a checkpoint");
    let log = Log::open(&path, options(1 << 20, 4)).expect("opens despite the damaged checkpoint");
    assert!(!log.opened_with().from_checkpoint);
    assert_eq!(in_flight_ids(&log), expected.1);
    assert_eq!(log.in_flight_at_open(), packed, "the checkpoint's messages in flight are the frames'");
    let (&stream, &version) = expected.0.iter().next().expect("streams");
    assert_eq!(log.append_expecting(stream, ExpectedVersion::Exact(version), vec![fact(stream)]), Ok(version + 1));
    log.close().expect("closes");
    drop(log);
    let log = Log::open(&path, options(1 << 20, 4)).expect("reopens");
    assert!(log.opened_with().from_checkpoint, "closing wrote a new checkpoint");
    assert_eq!(in_flight_ids(&log), expected.1);
}

/// The size bound holds for the file itself, not only for the frames in it: redb grows a file by
/// doubling it, so a bound read off the frames alone lets the file reach nearly twice the bound.
/// Frames of about 250 KiB go in as a shop's would, and the file's length is read after each
/// commit.
#[test]
fn the_file_never_grows_past_the_size_bound() {
    const MAX_BYTES: u64 = 64 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    let retention = conduit::log::Retention { max_bytes: Some(MAX_BYTES), max_age: None };
    let log = Log::open(&path, LogOptions { retention, ..options(4_096, 1 << 20) }).expect("new log");
    let mut longest = 0;
    for round in 0..800u64 {
        let records = (0..64)
            .map(|n| Record { stream: round * 64 + n, kind: 2, stage: 0, payload: vec![3; 2_000], ..Record::default() })
            .collect();
        log.append(records).expect("open").wait().expect("committed");
        longest = longest.max(std::fs::metadata(&path).expect("the log's file").len());
    }
    let stats = log.stats();
    assert!(stats.frames_removed > 0, "retention ran: {stats:?}");
    assert!(longest <= MAX_BYTES, "the file reached {longest} bytes against a bound of {MAX_BYTES}: {stats:?}");
    // The bound is not met by keeping the file tiny: it reached the last doubling under the
    // bound and holds a fair share of it in frames, within what it says frames may take (at most
    // seven eighths of the file: the rest is slack).
    let length = std::fs::metadata(&path).expect("the log's file").len();
    assert!(2 * length > MAX_BYTES, "{length}");
    assert!(stats.retained_bytes >= MAX_BYTES / 8, "{stats:?}");
    let budget = stats.frame_budget.expect("a size bound has a budget");
    assert!(stats.retained_bytes <= budget && budget <= length - length / 8, "{stats:?}");
    log.close().expect("closes");
}

/// A checkpoint an earlier build wrote (its messages in flight unpacked, under the old table's
/// name) is not read as this build's: the log opens by a full scan, once, and checkpoints anew.
#[test]
fn an_earlier_builds_checkpoint_is_rebuilt_from_the_frames() {
    let (dir, expected) = closed_workload_log();
    let path = dir.path().join("log.redb");
    overwrite_checkpoint(&path, "checkpoint", b"an earlier build's checkpoint");
    let log = Log::open(&path, options(1 << 20, 4)).expect("opens");
    assert!(!log.opened_with().from_checkpoint, "the earlier checkpoint is not trusted");
    assert_eq!(in_flight_ids(&log), expected.1);
    log.close().expect("closes");
    drop(log);
    let log = Log::open(&path, options(1 << 20, 4)).expect("reopens");
    assert!(log.opened_with().from_checkpoint, "closing wrote this build's checkpoint");
    assert_eq!(log.opened_with().frames_scanned, 0);
    assert_eq!(in_flight_ids(&log), expected.1);
}
