//! Aggregate snapshots: a stream loaded from its snapshot is the stream loaded whole, reads only
//! what follows the snapshot, and survives retention removing the history the snapshot covers.

use conduit::log::{Aggregate, ExpectedVersion, Log, LogError, LogOptions, Record, Retention, Snapshot};

/// The sum of the first payload byte of every record, and how many were folded in.
#[derive(Debug, Default, PartialEq, Eq)]
struct Total {
    sum: u64,
    folded: u32,
}

impl Aggregate for Total {
    fn apply(&mut self, record: &Record) {
        self.sum += u64::from(record.payload.first().copied().unwrap_or(0));
        self.folded += 1;
    }
}

impl Snapshot for Total {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sum.to_le_bytes());
        out.extend_from_slice(&self.folded.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let sum = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let folded = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
        (bytes.len() == 12).then_some(Self { sum, folded })
    }
}

/// A state whose bytes never decode.
#[derive(Debug, Default)]
struct Garbled;

impl Aggregate for Garbled {
    fn apply(&mut self, _: &Record) {}
}

impl Snapshot for Garbled {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(0xEE);
    }

    fn decode(_: &[u8]) -> Option<Self> {
        None
    }
}

fn fact(stream: u64, value: u8) -> Record {
    Record { stream, kind: 2, payload: vec![value; 8], ..Record::default() }
}

fn append(log: &Log, records: Vec<Record>) {
    log.append(records).expect("open").wait().expect("committed");
}

#[test]
fn a_stream_loads_the_same_from_its_snapshot_and_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), LogOptions::default()).expect("new log");
    append(&log, (1..=6).map(|n| fact(9, n)).collect());
    let (at_six, six) = log.load::<Total>(9).expect("loads");
    assert_eq!((at_six.sum, six), (21, 6));
    log.save_snapshot(9, six, &at_six).expect("saved");
    append(&log, (7..=10).map(|n| fact(9, n)).collect());
    let whole = log.load::<Total>(9).expect("loads");
    let from_snapshot = log.load_snapshot::<Total>(9).expect("loads");
    assert_eq!(from_snapshot, whole);
    assert_eq!(from_snapshot, (Total { sum: 55, folded: 10 }, 10));
    // A stream with no snapshot loads whole.
    append(&log, vec![fact(10, 3)]);
    assert_eq!(log.load_snapshot::<Total>(10), Ok((Total { sum: 3, folded: 1 }, 1)));
}

#[test]
fn a_snapshot_the_stream_has_not_reached_is_refused_and_an_older_one_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path().join("log.redb"), LogOptions::default()).expect("new log");
    append(&log, (1..=3).map(|n| fact(4, n)).collect());
    let state = Total { sum: 6, folded: 3 };
    assert_eq!(log.save_snapshot(4, 4, &state), Err(LogError::SnapshotAhead { stream: 4, version: 4, head: 3 }));
    assert_eq!(log.save_snapshot(4, 0, &state), Err(LogError::SnapshotAhead { stream: 4, version: 0, head: 3 }));
    assert_eq!(log.save_snapshot(5, 1, &state), Err(LogError::SnapshotAhead { stream: 5, version: 1, head: 0 }));
    log.save_snapshot(4, 3, &state).expect("saved");
    // An older snapshot does not replace the newer one.
    log.save_snapshot(4, 1, &Total { sum: 1, folded: 1 }).expect("accepted, and ignored");
    assert_eq!(log.load_snapshot::<Total>(4), Ok((state, 3)));
    // Bytes that do not decode are a typed error, not a wrong state.
    log.save_snapshot(4, 3, &Garbled).expect("saved");
    assert!(matches!(log.load_snapshot::<Garbled>(4), Err(LogError::CorruptIndex { table: "snapshots", key: 4, .. })));
}

#[test]
fn a_snapshot_outlives_the_history_retention_removes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let retention = Retention { max_bytes: Some(40_000), max_age: None };
    let options = LogOptions { checkpoint_records: 50, retention, ..LogOptions::default() };
    let log = Log::open(dir.path().join("log.redb"), options).expect("new log");
    append(&log, (1..=5).map(|n| fact(1, n)).collect());
    append(&log, (1..=5).map(|n| fact(2, n)).collect());
    let (state, version) = log.load::<Total>(1).expect("loads");
    log.save_snapshot(1, version, &state).expect("saved");
    // Enough other traffic that retention removes the first frames.
    for n in 0..2_000 {
        append(&log, vec![fact(1_000 + n, 1)]);
    }
    log.checkpoint().expect("checkpoints");
    assert!(log.stats().frames_removed > 0);
    assert!(log.stream(1).expect("reads").is_empty(), "stream 1's records are gone");
    // Stream 2 had no snapshot: it is forgotten. Stream 1 lives on in its snapshot, and its
    // versions go on from where they were.
    assert_eq!(log.load::<Total>(2), Ok((Total::default(), 0)));
    assert_eq!(log.load_snapshot::<Total>(1), Ok((Total { sum: 15, folded: 5 }, 5)));
    assert_eq!(log.append_expecting(1, ExpectedVersion::Exact(5), vec![fact(1, 6)]), Ok(6));
    assert_eq!(log.load_snapshot::<Total>(1), Ok((Total { sum: 21, folded: 6 }, 6)));
}
