//! Reading a log: every record or frame in order, one stream through the bucket index, and
//! aggregates folded from a stream now or at a past version or time.

use redb::ReadableDatabase;
use rustc_hash::{FxHashMap, FxHashSet};

use super::error::storage;
use super::open::{contained, scan};
use super::snapshot::Snapshot;
use super::{bucket_of, decode_frame, Frame, FrameError, InFlight, Log, LogError, Record, BUCKETS, FRAMES};

/// State rebuilt from a stream's events.
pub trait Aggregate: Default {
    /// Folds one event in.
    fn apply(&mut self, record: &Record);
}

impl Log {
    /// Every record, in log order, validated frame by frame.
    pub fn for_each(&self, mut f: impl FnMut(&Record)) -> Result<(), LogError> {
        scan(&self.shared.db, 0, |_, frame| {
            frame.records.iter().for_each(&mut f);
            Ok(())
        })
    }

    /// Every frame in log order, decoded in parallel chunks; `f` sees them in order.
    pub fn for_each_frame(&self, f: impl FnMut(u64, &Frame) -> Result<(), LogError>) -> Result<(), LogError> {
        scan(&self.shared.db, 0, f)
    }

    /// The ingress records of messages in flight (as [`Log::in_flight_at_open`] lists them), in
    /// id order: each frame that holds one is read once.
    pub fn ingress_records(&self, in_flight: &[InFlight]) -> Result<Vec<Record>, LogError> {
        contained(|| {
            let txn = self.shared.db.begin_read().map_err(storage)?;
            let frames = txn.open_table(FRAMES).map_err(storage)?;
            let mut by_frame: Vec<&InFlight> = in_flight.iter().collect();
            by_frame.sort_unstable_by_key(|m| (m.frame, m.id));
            let mut records = Vec::with_capacity(in_flight.len());
            for group in by_frame.chunk_by(|a, b| a.frame == b.frame) {
                let seq = group[0].frame;
                let missing = || LogError::Corrupt {
                    frame: seq,
                    error: FrameError::Invalid("a checkpointed frame is missing".into()),
                };
                let bytes = frames.get(seq).map_err(storage)?.ok_or_else(missing)?;
                let archived = decode_frame(bytes.value()).map_err(|error| LogError::Corrupt { frame: seq, error })?;
                for wanted in group {
                    let record = archived.records.iter().find(|r| r.id.to_native() == wanted.id).ok_or_else(|| {
                        LogError::Corrupt {
                            frame: seq,
                            error: FrameError::Invalid(format!("ingress record {} is not in its frame", wanted.id)),
                        }
                    })?;
                    records
                        .push(rkyv::deserialize::<Record, rkyv::rancor::Error>(record).map_err(|e| {
                            LogError::Corrupt { frame: seq, error: FrameError::Invalid(e.to_string()) }
                        })?);
                }
            }
            records.sort_unstable_by_key(|r| r.id);
            Ok(records)
        })
    }

    /// The space the frames from `first` on take in the file: what retention can never remove
    /// while a message in flight reaches back to frame `first`.
    pub fn frame_bytes_from(&self, first: u64) -> Result<u64, LogError> {
        contained(|| {
            let txn = self.shared.db.begin_read().map_err(storage)?;
            let frames = txn.open_table(FRAMES).map_err(storage)?;
            let mut bytes = 0u64;
            for entry in frames.range(first..).map_err(storage)? {
                let (_, value) = entry.map_err(storage)?;
                bytes += super::writer::stored_bytes(value.value().len());
            }
            Ok(bytes)
        })
    }

    /// The records of one stream, in version order, found through the bucket index.
    pub fn stream(&self, stream: u64) -> Result<Vec<Record>, LogError> {
        contained(|| self.stream_unguarded(stream))
    }

    fn stream_unguarded(&self, stream: u64) -> Result<Vec<Record>, LogError> {
        Ok(self.streams_unguarded(&[stream])?.remove(&stream).unwrap_or_default())
    }

    /// The records of several streams, each in version order: every frame indexed for their
    /// buckets is read once. Streams with no records are absent from the map.
    pub fn streams(&self, streams: &[u64]) -> Result<FxHashMap<u64, Vec<Record>>, LogError> {
        contained(|| self.streams_unguarded(streams))
    }

    fn streams_unguarded(&self, streams: &[u64]) -> Result<FxHashMap<u64, Vec<Record>>, LogError> {
        let txn = self.shared.db.begin_read().map_err(storage)?;
        let buckets = txn.open_table(BUCKETS).map_err(storage)?;
        let frames = txn.open_table(FRAMES).map_err(storage)?;
        let wanted: FxHashSet<u64> = streams.iter().copied().collect();
        let mut by_bucket: Vec<u64> = wanted.iter().map(|&s| bucket_of(s)).collect();
        by_bucket.sort_unstable();
        by_bucket.dedup();
        // Streams of neighbouring buckets share frames: each frame is read once.
        let mut seqs = Vec::new();
        for bucket in by_bucket {
            for entry in buckets.range((bucket, 0)..=(bucket, u64::MAX)).map_err(storage)? {
                seqs.push(entry.map_err(storage)?.0.value().1);
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        let mut found: FxHashMap<u64, Vec<Record>> = FxHashMap::default();
        for seq in seqs {
            let bytes = frames.get(seq).map_err(storage)?.ok_or_else(|| LogError::Corrupt {
                frame: seq,
                error: FrameError::Invalid("indexed frame is missing".into()),
            })?;
            let archived = decode_frame(bytes.value()).map_err(|error| LogError::Corrupt { frame: seq, error })?;
            for record in archived.records.iter() {
                let stream = record.stream.to_native();
                if !wanted.contains(&stream) {
                    continue;
                }
                let record = rkyv::deserialize::<Record, rkyv::rancor::Error>(record)
                    .map_err(|e| LogError::Corrupt { frame: seq, error: FrameError::Invalid(e.to_string()) })?;
                found.entry(stream).or_default().push(record);
            }
        }
        for records in found.values_mut() {
            records.sort_by_key(|r| r.version);
        }
        Ok(found)
    }

    /// Rebuilds an aggregate from every event of its stream; returns it with its version. A
    /// stream whose early history retention removed is [`LogError::Truncated`].
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

    /// Loads an aggregate from its stream's snapshot and the records after it (from the start
    /// if it has none): what [`load`](Self::load) gives, without reading what the snapshot
    /// covers, and still whole after retention removed that part. `Truncated` if records after
    /// the snapshot were removed; [`LogError::CorruptIndex`] if the snapshot's bytes do not
    /// decode.
    pub fn load_snapshot<A: Snapshot>(&self, stream: u64) -> Result<(A, u32), LogError> {
        let Some(row) = super::snapshot::read(&self.shared.db, stream)? else { return self.load(stream) };
        let mut aggregate = A::decode(&row.state).ok_or_else(|| LogError::CorruptIndex {
            table: "snapshots",
            key: stream,
            error: FrameError::Invalid(format!("the snapshot at version {} does not decode", row.version)),
        })?;
        let mut version = row.version;
        let records = self.stream(stream)?;
        let after = records.iter().skip_while(|r| r.version <= row.version);
        for record in after {
            if record.version != version + 1 {
                return Err(LogError::Truncated { stream, first_retained: record.version });
            }
            aggregate.apply(record);
            version = record.version;
        }
        Ok((aggregate, version))
    }

    fn load_until<A: Aggregate>(&self, stream: u64, keep: impl Fn(&Record) -> bool) -> Result<(A, u32), LogError> {
        let mut aggregate = A::default();
        let mut version = 0;
        let records = self.stream(stream)?;
        if let Some(first) = records.first().filter(|r| r.version > 1) {
            return Err(LogError::Truncated { stream, first_retained: first.version });
        }
        for record in records.iter().take_while(|r| keep(r)) {
            aggregate.apply(record);
            version = record.version;
        }
        Ok((aggregate, version))
    }
}
