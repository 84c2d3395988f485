//! Consumers of the log: a named consumer reads every record in log order, follows the tail,
//! commits its position durably and is taken up again from it; retention keeps what a consumer
//! that holds it still needs; lag in records and in time.

use std::collections::BTreeSet;
use std::time::Duration;

use conduit::log::{ConsumerOptions, Log, LogError, LogOptions, Position, Record, Retention, StartAt};

const NO_WAIT: Duration = Duration::ZERO;

fn record(stream: u64, n: u64) -> Record {
    Record { stream, kind: 1, timestamp_us: 1_000_000 + n, payload: n.to_le_bytes().to_vec(), ..Record::default() }
}

/// Appends `count` records, `per_append` per commit, their payloads counting on from `from`.
fn append(log: &Log, from: u64, count: u64, per_append: u64) {
    let mut n = from;
    while n < from + count {
        let batch: Vec<Record> = (n..(n + per_append).min(from + count)).map(|n| record(n % 50, n)).collect();
        n += batch.len() as u64;
        log.append(batch).expect("open").wait().expect("committed");
    }
}

fn numbers(consumed: &[conduit::log::Consumed]) -> Vec<u64> {
    consumed.iter().map(|c| u64::from_le_bytes(c.record.payload[..8].try_into().expect("eight bytes"))).collect()
}

/// Reads everything there is now.
fn drain(consumer: &mut conduit::log::LogConsumer<'_>) -> Vec<u64> {
    let mut all = Vec::new();
    loop {
        let got = consumer.poll(97, NO_WAIT).expect("readable");
        if got.is_empty() {
            return all;
        }
        all.extend(numbers(&got));
    }
}

#[test]
fn a_consumer_reads_in_log_order_and_resumes_from_its_commit_after_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    {
        let log = Log::open(&path, LogOptions::default()).expect("new log");
        append(&log, 0, 1_000, 37);
        let mut consumer = log.consumer("projection", ConsumerOptions::default()).expect("registers");
        let first = consumer.poll(400, NO_WAIT).expect("readable");
        assert_eq!(numbers(&first), (0..400).collect::<Vec<_>>(), "log order from the start");
        assert!(first.windows(2).all(|w| w[0].position < w[1].position), "positions rise");
        consumer.commit().expect("commits");
        // Read on past the commit, then die without committing again.
        assert_eq!(consumer.poll(100, NO_WAIT).expect("readable").len(), 100);
    }
    let log = Log::open(&path, LogOptions::default()).expect("reopens");
    let mut again = log.consumer("projection", ConsumerOptions::default()).expect("taken up");
    let rest = drain(&mut again);
    assert_eq!(rest, (400..1_000).collect::<Vec<_>>(), "from the commit: nothing skipped, the uncommitted read again");
    // Another consumer is independent, and one starting at the latest frame sees only what comes.
    let mut other = log.consumer("audit", ConsumerOptions::default()).expect("registers");
    assert_eq!(drain(&mut other).len(), 1_000);
    let mut late = log
        .consumer("late", ConsumerOptions { start: StartAt::Latest, ..ConsumerOptions::default() })
        .expect("registers");
    append(&log, 1_000, 5, 5);
    assert_eq!(drain(&mut late), (1_000..1_005).collect::<Vec<_>>());
}

#[test]
fn a_consumer_follows_the_tail() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), LogOptions::default()).expect("new log");
    let mut consumer = log.consumer("tail", ConsumerOptions::default()).expect("registers");
    assert!(consumer.poll(10, Duration::from_millis(20)).expect("readable").is_empty(), "nothing yet");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for n in 0..20 {
                std::thread::sleep(Duration::from_millis(5));
                append(&log, n * 10, 10, 10);
            }
        });
        let mut seen = Vec::new();
        while seen.len() < 200 {
            // A commit wakes a waiting consumer: it does not sit out its wait.
            let asked = std::time::Instant::now();
            let got = consumer.poll(1_000, Duration::from_secs(60)).expect("readable");
            assert!(!got.is_empty() && asked.elapsed() < Duration::from_secs(30), "woken by a commit");
            seen.extend(numbers(&got));
        }
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
    });
}

#[test]
fn consumers_start_at_a_position_or_a_time_and_report_their_lag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), LogOptions::default()).expect("new log");
    append(&log, 0, 300, 100);
    let mut by_time = log
        .consumer("by-time", ConsumerOptions { start: StartAt::Timestamp(1_000_250), ..ConsumerOptions::default() })
        .expect("registers");
    assert_eq!(drain(&mut by_time), (250..300).collect::<Vec<_>>());
    let at = Position { frame: 1, index: 10 };
    let mut by_position = log
        .consumer("by-position", ConsumerOptions { start: StartAt::At(at), ..ConsumerOptions::default() })
        .expect("registers");
    assert_eq!(numbers(&by_position.poll(1, NO_WAIT).expect("readable")), [110]);

    let idle = log.consumer("idle", ConsumerOptions::default()).expect("registers");
    assert_eq!(idle.position(), Position { frame: 0, index: 0 });
    by_time.commit().expect("commits");
    let consumers = log.consumers().expect("listed");
    let names: BTreeSet<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["by-position", "by-time", "idle"]));
    let idle = consumers.iter().find(|c| c.name == "idle").expect("listed");
    assert_eq!(idle.lag_records, Some(300), "everything is ahead of it");
    assert_eq!(idle.lag_us, Some(299), "its next record is 299 us older than the newest");
    let caught_up = consumers.iter().find(|c| c.name == "by-time").expect("listed");
    assert_eq!((caught_up.lag_records, caught_up.lag_us), (Some(0), Some(0)));
    let by_position = consumers.iter().find(|c| c.name == "by-position").expect("listed");
    assert_eq!(by_position.lag_records, Some(190), "registered at 110, its read not committed");
}

#[test]
fn retention_keeps_what_a_holding_consumer_needs_and_skips_past_one_that_does_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A frame per append of 500 records of about 90 bytes; keep about 2 MiB of frames.
    let retention = Retention { max_bytes: Some(2 << 20), max_age: None };
    let options = LogOptions { retention, checkpoint_records: 2_000, ..LogOptions::default() };
    let log = Log::open(dir.path().join("log.redb"), options).expect("new log");
    append(&log, 0, 1_000, 500);
    let mut holding = log.consumer("holding", ConsumerOptions::default()).expect("registers");
    let loose_options = ConsumerOptions { holds_retention: false, ..ConsumerOptions::default() };
    let mut loose = log.consumer("loose", loose_options).expect("registers");
    assert_eq!(numbers(&holding.poll(10, NO_WAIT).expect("readable")), (0..10).collect::<Vec<_>>());
    holding.commit().expect("commits");
    append(&log, 1_000, 200_000, 500);
    log.checkpoint().expect("retention runs");
    // Held at frame 0: nothing removed, the log over its bound until the consumer moves on.
    assert_eq!(log.stats().frames_removed, 0, "{:?}", log.stats());
    assert!(log.stats().retained_bytes > 2 << 20);
    // Its frames are all there: it reads on from its commit, nothing missing.
    assert_eq!(drain(&mut holding), (10..201_000).collect::<Vec<_>>());
    holding.commit().expect("commits");
    log.checkpoint().expect("retention runs");
    assert!(log.stats().frames_removed > 0, "retention moved on: {:?}", log.stats());
    // The other one finds its frames gone, goes on from the oldest kept, and says how many it lost.
    let rest = drain(&mut loose);
    assert!(
        loose.skipped() > 0 && rest.len() as u64 + loose.skipped() == 201_000,
        "{} + {}",
        rest.len(),
        loose.skipped()
    );
    assert_eq!(rest.last(), Some(&200_999));
    let listed = log.consumers().expect("listed");
    let loose_listed = listed.iter().find(|c| c.name == "loose").expect("listed");
    assert_eq!(loose_listed.lag_records, Some(201_000), "committed at the start, never again");
    assert_eq!(loose_listed.lag_us, None, "the record at its position is gone");
    // The listing and the log's figures say that retention passed it.
    assert!(loose_listed.behind_retention, "{loose_listed:?}");
    let holding_listed = listed.iter().find(|c| c.name == "holding").expect("listed");
    assert!(!holding_listed.behind_retention, "{holding_listed:?}");
    let stats = log.stats();
    assert_eq!(stats.frames_removed_unread, stats.frames_removed, "every frame removed was unread by the loose one");
    assert!(log.remove_consumer("holding").expect("removed"));
    assert!(!log.remove_consumer("holding").expect("already gone"));
}

#[test]
fn bad_consumer_names_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), LogOptions::default()).expect("new log");
    for name in ["", "tab\there", &"x".repeat(129)] {
        let refused = log.consumer(name, ConsumerOptions::default()).expect_err("refused");
        assert!(matches!(&refused, LogError::Options(what) if what.contains("name")), "{refused}");
    }
    assert!(log.consumers().expect("listed").is_empty(), "nothing registered");
}

#[test]
fn lag_is_unknown_not_zero_when_the_newest_frame_has_no_offset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    {
        let log = Log::open(&path, LogOptions::default()).expect("new log");
        append(&log, 0, 1_000, 500);
        let earliest = ConsumerOptions { start: StartAt::Earliest, ..ConsumerOptions::default() };
        log.consumer("reader", earliest).expect("registers").commit().expect("commits");
        log.close().expect("closes");
    }
    // As an earlier build wrote it: no frame has its offset.
    {
        let db = redb::Database::open(&path).expect("opens the file");
        let txn = db.begin_write().expect("writes");
        txn.delete_table(redb::TableDefinition::<u64, u64>::new("frame_offsets")).expect("deletes");
        txn.commit().expect("commits");
    }
    let log = Log::open(&path, LogOptions::default()).expect("reopens");
    let listed = log.consumers().expect("listed");
    let reader = listed.iter().find(|c| c.name == "reader").expect("listed");
    assert_eq!(reader.lag_records, None, "1,000 records are ahead of it, but the log cannot count them: {reader:?}");
    assert!(!reader.behind_retention);
}
