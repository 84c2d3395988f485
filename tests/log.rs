//! The event log on its own: group commit, versions, optimistic concurrency, event sourcing,
//! reopening, and files that are not logs.

use conduit::log::{Aggregate, Durability, ExpectedVersion, Log, LogError, LogOptions, Record};

fn event(stream: u64, kind: u16, timestamp_us: u64) -> Record {
    Record { stream, kind, timestamp_us, payload: vec![u8::try_from(kind % 256).unwrap_or(0); 3], ..Record::default() }
}

#[derive(Debug, Default)]
struct Counter {
    kinds: Vec<u16>,
}

impl Aggregate for Counter {
    fn apply(&mut self, record: &Record) {
        self.kinds.push(record.kind);
    }
}

#[test]
fn appends_get_contiguous_versions_and_survive_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    {
        let log = Log::open(&path, LogOptions::default()).expect("new log");
        let mut waiters = Vec::new();
        for round in 0..50u64 {
            // Interleave 100 streams, 50 events each, over many appends and frames.
            let records = (0..100).map(|s| event(s, u16::try_from(round).unwrap_or(0), round)).collect();
            waiters.push(log.append(records).expect("open"));
        }
        for waiter in waiters {
            waiter.wait().expect("committed");
        }
        let stats = log.stats();
        assert_eq!(stats.events_appended, 5_000);
        assert!(stats.commits >= 1 && stats.durable_commits == stats.commits);
        let commits = log.commit_latency().expect("durable commits were timed");
        assert_eq!(commits.count, stats.durable_commits, "every durable commit timed once");
        assert!(commits.p50 > 0.0 && commits.p50 <= commits.p99 && commits.p99 <= commits.max, "{commits:?}");
        log.close().expect("closes");
    }
    let log = Log::open(&path, LogOptions::default()).expect("reopens");
    assert_eq!(log.opened_with().records, 5_000);
    assert_eq!(log.opened_with().streams, 100);
    for stream in [0, 42, 99] {
        let records = log.stream(stream).expect("readable");
        assert_eq!(records.len(), 50);
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.version as usize, i + 1, "versions are contiguous from 1");
            assert_eq!(usize::from(record.kind), i, "and in append order");
        }
    }
    // New appends continue the versions.
    let version = log.append_expecting(7, ExpectedVersion::Exact(50), vec![event(7, 99, 99)]).expect("expected 50");
    assert_eq!(version, 51);
    let mut all = 0;
    log.for_each(|_| all += 1).expect("scan");
    assert_eq!(all, 5_001);
}

#[test]
fn streams_of_several_buckets_sharing_frames_read_each_record_once() {
    use conduit::log::BUCKET_STREAMS_LOG2;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log"), LogOptions::default()).expect("new log");
    // Four streams in four index buckets, every append holding an event of each: every frame
    // is indexed under all four buckets.
    let wanted: Vec<u64> = (0..4).map(|b| (b << BUCKET_STREAMS_LOG2) + 7).collect();
    for round in 0..20u16 {
        let records = wanted.iter().map(|&s| event(s, round, u64::from(round))).collect();
        log.append(records).expect("open").wait().expect("committed");
    }
    let found = log.streams(&wanted).expect("readable");
    assert_eq!(found.len(), 4);
    for stream in &wanted {
        let versions: Vec<u32> = found[stream].iter().map(|r| r.version).collect();
        assert_eq!(versions, (1..=20).collect::<Vec<u32>>(), "stream {stream}: each record once, in order");
    }
}

#[test]
fn optimistic_concurrency_refuses_a_stale_expected_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log"), LogOptions::default()).expect("new log");
    assert_eq!(log.append_expecting(1, ExpectedVersion::NoStream, vec![event(1, 1, 1)]), Ok(1));
    assert_eq!(
        log.append_expecting(1, ExpectedVersion::NoStream, vec![event(1, 2, 2)]),
        Err(LogError::VersionConflict { stream: 1, expected: ExpectedVersion::NoStream, actual: 1 })
    );
    assert_eq!(
        log.append_expecting(1, ExpectedVersion::Exact(0), vec![event(1, 2, 2)]),
        Err(LogError::VersionConflict { stream: 1, expected: ExpectedVersion::Exact(0), actual: 1 })
    );
    assert_eq!(log.append_expecting(1, ExpectedVersion::Exact(1), vec![event(1, 2, 2), event(1, 3, 3)]), Ok(3));
    assert_eq!(log.append_expecting(1, ExpectedVersion::Any, vec![event(1, 4, 4)]), Ok(4));
    let (now, version): (Counter, u32) = log.load(1).expect("load");
    assert_eq!((now.kinds, version), (vec![1, 2, 3, 4], 4));
    let (past, version): (Counter, u32) = log.load_at(1, 2).expect("load_at");
    assert_eq!((past.kinds, version), (vec![1, 2], 2));
    let (as_of, version): (Counter, u32) = log.load_as_of(1, 3).expect("load_as_of");
    assert_eq!((as_of.kinds, version), (vec![1, 2, 3], 3));
    let (none, version): (Counter, u32) = log.load(2).expect("an absent stream is empty");
    assert_eq!((none.kinds.len(), version), (0, 0));
}

#[test]
fn eventual_durability_still_commits_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log");
    {
        let options = LogOptions { durability: Durability::Eventual { sync_interval_ms: 5 }, ..LogOptions::default() };
        let log = Log::open(&path, options).expect("new log");
        for round in 0..20 {
            log.append_detached((0..500).map(|s| event(s, round, 0)).collect()).expect("open");
        }
        log.close().expect("closing syncs");
        let stats = log.stats();
        assert_eq!(stats.events_appended, 10_000);
        // Only the durable commits are timed: the disk's part of an acknowledgement.
        let timed = log.commit_latency().map_or(0, |commits| commits.count);
        assert_eq!(timed, stats.durable_commits, "{stats:?}");
    }
    let log = Log::open(&path, LogOptions::default()).expect("reopens");
    assert_eq!(log.opened_with().records, 10_000);
}

#[test]
fn files_that_are_not_logs_get_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello, this is not a database\n".repeat(200)).expect("write");
    let error = Log::open(&text, LogOptions::default()).expect_err("text is not a log");
    assert!(matches!(error, LogError::NotALog { .. }), "{error}");

    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 1 << 16]).expect("write");
    assert!(Log::open(&zeros, LogOptions::default()).is_err());

    let other_db = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&other_db).expect("plain redb");
        let txn = db.begin_write().expect("txn");
        {
            let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("frames");
            let mut table = txn.open_table(table).expect("table");
            table.insert(0, b"not a frame".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let error = Log::open(&other_db, LogOptions::default()).expect_err("a redb file without our marker");
    assert!(error.to_string().contains("not a conduit log"), "{error}");
}

/// Opening a log of this format with every table in place commits nothing of its own (it used
/// to commit an empty transaction on every open: two more syncs).
#[test]
fn a_log_open_elsewhere_is_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log");
    let first = Log::open(&path, LogOptions::default()).expect("new log");
    let second = Log::open(&path, LogOptions::default()).expect_err("the first holds the lock");
    assert_eq!(second, LogError::InUse { path: path.clone() });
    assert!(second.to_string().contains("in use"), "{second}");
    // The refused open took nothing from the log that holds the file.
    first.append(vec![event(1, 1, 1)]).expect("open").wait().expect("committed");
    first.close().expect("closes");
}

#[test]
fn opening_a_ready_log_commits_nothing() {
    let disk = conduit::log::MemoryDisk::new();
    let created = Log::open_with_backend("disk", disk.clone(), LogOptions::default()).expect("creates");
    created.close().expect("closes");
    drop(created);
    let before = disk.syncs();
    let log = Log::open_with_backend("disk", disk.clone(), LogOptions::default()).expect("reopens");
    // redb's open syncs its header once; a commit of the log's own would add one or two more.
    assert!(disk.syncs() <= before + 1, "opening committed: {} syncs after {before}", disk.syncs());
    log.append(vec![Record { stream: 1, kind: 1, ..Record::default() }]).expect("appends").wait().expect("commits");
    assert!(disk.syncs() > before, "a commit syncs");
}

#[test]
fn an_inline_writer_commits_before_each_call_returns() {
    let disk = conduit::log::MemoryDisk::new();
    let inline = LogOptions { inline_writer: true, ..LogOptions::default() };
    let log = Log::open_with_backend("disk", disk.clone(), inline).expect("creates");
    for round in 0..5u16 {
        let syncs = disk.syncs();
        let waiter = log.append((0..10).map(|s| event(s, round, 0)).collect()).expect("open");
        // Durable before the call returns: no thread commits it later.
        assert!(disk.syncs() > syncs, "append {round} returned before its commit");
        waiter.wait().expect("committed");
    }
    assert_eq!(log.append_expecting(3, ExpectedVersion::Exact(5), vec![event(3, 9, 9)]), Ok(6));
    assert_eq!(
        log.append_expecting(3, ExpectedVersion::Exact(5), vec![event(3, 9, 9)]),
        Err(LogError::VersionConflict { stream: 3, expected: ExpectedVersion::Exact(5), actual: 6 })
    );
    // The power goes with nothing synced since: everything acknowledged is there.
    let after = disk.cut_power(conduit::log::PowerCut::Drop);
    drop(log);
    let log = Log::open_with_backend("disk", after, inline).expect("reopens");
    assert_eq!(log.opened_with().records, 51);
    let (stream, version): (Counter, u32) = log.load(3).expect("load");
    assert_eq!((stream.kinds, version), (vec![0, 1, 2, 3, 4, 9], 6));
    log.close().expect("closes");
    assert_eq!(log.append(vec![event(1, 1, 1)]).err(), Some(LogError::Closed));
}
