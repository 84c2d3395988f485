//! Checkpoints: what opening and recovery need, persisted every so often so that neither ever
//! reads the whole history.
//!
//! - `checkpoint.v2` (one row): the first frame not covered, the next record id, running counts,
//!   and the messages in flight (ingress records with no completion record yet, each with the
//!   frame that holds it), packed: sorted by id, each as three varints of its differences from
//!   the one before, about 3 bytes a message instead of 24. A checkpoint is written every few
//!   hundred thousand records with tens of thousands of messages in flight, and its bytes are
//!   the writer's: packed (and visiting only the changed heads), checkpoints cost
//!   `engine_durable` 2-4% instead of 8% (BENCHMARKS.md).
//!   (`checkpoint`, unpacked, is an earlier build's: a log that has one is opened by a full
//!   scan, once, as when its checkpoint is unreadable.)
//! - `heads` (one row per bucket of 1,024 streams): each stream's last version, as of the
//!   checkpoint. The writer keeps a bounded cache of versions; a stream it does not hold is
//!   looked up in its bucket's row, so memory does not grow with the number of streams ever
//!   written.
//!
//! Both are written in the same transaction as the frames they cover, so a crash leaves either
//! the old checkpoint or the new one, each consistent with the frames. Opening reads the
//! checkpoint and scans only the frames after it.

use integer_encoding::VarInt;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use rkyv::rancor;
use rustc_hash::{FxHashMap, FxHashSet};

use super::error::storage;
use super::format::{check_header, encode_sealed, FrameError};
use super::{bucket_of, existing, LogError};

/// The latest checkpoint, under key 0.
pub(crate) const CHECKPOINT: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoint.v2");
/// An earlier build's checkpoint (messages in flight unpacked): dropped and rebuilt.
const CHECKPOINT_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoint");
/// Stream heads by bucket, as of the latest checkpoint.
pub(crate) const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("heads");

/// A message in flight: its ingress record and the frame that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InFlight {
    /// The ingress record's id (the message's `seq`).
    pub id: u64,
    /// The message's stream.
    pub stream: u64,
    /// The frame holding the ingress record.
    pub frame: u64,
}

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    /// Frames before this one are covered.
    pub(crate) next_frame: u64,
    /// Every record id in the covered frames is below this.
    pub(crate) next_id: u64,
    /// Frames, records and streams in the covered frames.
    pub(crate) frames: u64,
    pub(crate) records: u64,
    pub(crate) streams: u64,
    /// Bytes of the frames kept, and the oldest frame kept.
    pub(crate) bytes: u64,
    pub(crate) first_frame: u64,
    /// Messages in flight at the checkpoint, by id.
    pub(crate) in_flight: Vec<InFlight>,
}

/// A [`Checkpoint`] as stored: the messages in flight packed by [`pack`].
#[derive(Debug, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Stored {
    next_frame: u64,
    next_id: u64,
    frames: u64,
    records: u64,
    streams: u64,
    bytes: u64,
    first_frame: u64,
    in_flight_count: u64,
    in_flight: Vec<u8>,
}

/// Packs messages in flight, sorted by id, into `out`: for each, the id's difference from the
/// one before (unsigned), then the stream's and the frame's (zigzag: they may go down), each a
/// varint.
fn pack(in_flight: &[InFlight], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(in_flight.len() * 6);
    let mut previous = InFlight::default();
    let mut buffer = [0u8; 10];
    for message in in_flight {
        debug_assert!(message.id >= previous.id, "messages in flight are packed sorted by id");
        let n = message.id.wrapping_sub(previous.id).encode_var(&mut buffer);
        out.extend_from_slice(&buffer[..n]);
        // Two's complement: the wrapped difference read as signed is the step, up or down.
        #[allow(clippy::cast_possible_wrap)]
        for delta in [message.stream.wrapping_sub(previous.stream), message.frame.wrapping_sub(previous.frame)] {
            let n = (delta as i64).encode_var(&mut buffer);
            out.extend_from_slice(&buffer[..n]);
        }
        previous = *message;
    }
}

/// The `count` messages [`pack`] packed into `bytes`; `None` unless they are exactly that.
fn unpack(bytes: &[u8], count: u64) -> Option<Vec<InFlight>> {
    fn next<T: VarInt>(rest: &mut &[u8]) -> Option<T> {
        let (value, n) = T::decode_var(rest)?;
        *rest = &rest[n..];
        Some(value)
    }
    let mut in_flight = Vec::with_capacity(usize::try_from(count).ok()?.min(bytes.len() / 3));
    let mut previous = InFlight::default();
    let mut rest = bytes;
    for _ in 0..count {
        let id = previous.id.checked_add(next::<u64>(&mut rest)?)?;
        // The wrapped step back to unsigned, as `pack` took it.
        #[allow(clippy::cast_sign_loss)]
        let stream = previous.stream.wrapping_add(next::<i64>(&mut rest)? as u64);
        #[allow(clippy::cast_sign_loss)]
        let frame = previous.frame.wrapping_add(next::<i64>(&mut rest)? as u64);
        previous = InFlight { id, stream, frame };
        in_flight.push(previous);
    }
    rest.is_empty().then_some(in_flight)
}

/// One bucket's stream heads, sorted by stream.
#[derive(Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct HeadsRow {
    heads: Vec<(u64, u32)>,
}

fn corrupt(table: &'static str, key: u64, error: FrameError) -> LogError {
    LogError::CorruptIndex { table, key, error }
}

pub(crate) fn decode<T>(table: &'static str, key: u64, bytes: &[u8]) -> Result<T, LogError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let body = check_header(bytes).map_err(|e| corrupt(table, key, e))?;
    rkyv::from_bytes::<T, rancor::Error>(body).map_err(|e| corrupt(table, key, FrameError::Invalid(e.to_string())))
}

/// Reads the latest checkpoint, if the log has one.
pub(crate) fn read(db: &redb::Database) -> Result<Option<Checkpoint>, LogError> {
    let txn = db.begin_read().map_err(storage)?;
    let Some(table) = existing(&txn, CHECKPOINT)? else { return Ok(None) };
    let Some(value) = table.get(0).map_err(storage)? else { return Ok(None) };
    let stored = decode::<Stored>("checkpoint", 0, value.value())?;
    let in_flight = unpack(&stored.in_flight, stored.in_flight_count).ok_or_else(|| {
        let reason = format!("its {} messages in flight do not unpack", stored.in_flight_count);
        corrupt("checkpoint", 0, FrameError::Invalid(reason))
    })?;
    Ok(Some(Checkpoint {
        next_frame: stored.next_frame,
        next_id: stored.next_id,
        frames: stored.frames,
        records: stored.records,
        streams: stored.streams,
        bytes: stored.bytes,
        first_frame: stored.first_frame,
        in_flight,
    }))
}

/// Whether the log holds an earlier build's checkpoint (to be dropped and rebuilt).
pub(crate) fn has_earlier(db: &redb::Database) -> Result<bool, LogError> {
    let txn = db.begin_read().map_err(storage)?;
    Ok(existing(&txn, CHECKPOINT_V1)?.is_some())
}

/// Drops the checkpoint and every heads row (they are rebuilt from the frames).
pub(crate) fn forget(db: &redb::Database) -> Result<(), LogError> {
    let txn = db.begin_write().map_err(storage)?;
    for table in [CHECKPOINT, HEADS] {
        txn.delete_table(table).map_err(storage)?;
        txn.open_table(table).map_err(storage)?;
    }
    txn.delete_table(CHECKPOINT_V1).map_err(storage)?;
    txn.commit().map_err(storage)
}

/// Writes `checkpoint` in `txn`, replacing the previous one.
pub(crate) fn write(
    txn: &redb::WriteTransaction,
    checkpoint: &Checkpoint,
    scratch: &mut Vec<u8>,
) -> Result<(), LogError> {
    let mut in_flight = Vec::new();
    pack(&checkpoint.in_flight, &mut in_flight);
    let stored = Stored {
        next_frame: checkpoint.next_frame,
        next_id: checkpoint.next_id,
        frames: checkpoint.frames,
        records: checkpoint.records,
        streams: checkpoint.streams,
        bytes: checkpoint.bytes,
        first_frame: checkpoint.first_frame,
        in_flight_count: checkpoint.in_flight.len() as u64,
        in_flight,
    };
    encode_sealed(&stored, scratch);
    let mut table = txn.open_table(CHECKPOINT).map_err(storage)?;
    table.insert(0, scratch.as_slice()).map_err(storage)?;
    Ok(())
}

/// The `heads` table as the last commit left it, opened (a read transaction) only when a head
/// missing from the cache must be read: most groups never need it.
pub(crate) struct HeadsTable<'db> {
    db: &'db redb::Database,
    table: Option<redb::ReadOnlyTable<u64, &'static [u8]>>,
}

impl<'db> HeadsTable<'db> {
    pub(crate) fn new(db: &'db redb::Database) -> Self {
        Self { db, table: None }
    }

    fn table(&mut self) -> Result<&redb::ReadOnlyTable<u64, &'static [u8]>, LogError> {
        if self.table.is_none() {
            let txn = self.db.begin_read().map_err(storage)?;
            self.table = Some(txn.open_table(HEADS).map_err(storage)?);
        }
        Ok(self.table.as_ref().expect("opened just now"))
    }
}

/// The writer's stream versions: a bounded cache over the `heads` table, plus every version
/// changed since the last checkpoint (those stay until the checkpoint has written them).
#[derive(Debug, Default)]
pub(crate) struct Heads {
    /// Stream -> (last version, changed since the last checkpoint).
    versions: FxHashMap<u64, (u32, bool)>,
    /// The streams changed since the last checkpoint, each once: a checkpoint visits these, not
    /// the whole cache (a walk of a million cached streams cost the writer 3-14 ms a checkpoint).
    dirty: Vec<u64>,
    /// Buckets whose `heads` row has been read into `versions` since the cache was last cleared.
    loaded: FxHashSet<u64>,
    /// Most streams the cache keeps after a checkpoint.
    cap: usize,
}

impl Heads {
    /// A cache of up to `cap` streams, starting from versions found after the last checkpoint
    /// (all of them changed since).
    pub(crate) fn new(cap: usize, changed: FxHashMap<u64, u32>) -> Self {
        let dirty = changed.keys().copied().collect();
        let versions = changed.into_iter().map(|(stream, version)| (stream, (version, true))).collect();
        Self { versions, dirty, loaded: FxHashSet::default(), cap }
    }

    /// Streams held in memory now.
    pub(crate) fn cached(&self) -> usize {
        self.versions.len()
    }

    /// The last version of `stream` (0: none), reading its bucket's row on a miss.
    pub(crate) fn version(&mut self, stream: u64, heads: &mut HeadsTable<'_>) -> Result<u32, LogError> {
        if let Some(&(version, _)) = self.versions.get(&stream) {
            return Ok(version);
        }
        let bucket = bucket_of(stream);
        if self.loaded.insert(bucket) {
            if let Some(row) = heads.table()?.get(bucket).map_err(storage)? {
                let row: HeadsRow = decode("heads", bucket, row.value())?;
                for (s, version) in row.heads {
                    // Versions changed since the checkpoint are newer than the row's.
                    self.versions.entry(s).or_insert((version, false));
                }
            }
        }
        Ok(self.versions.get(&stream).map_or(0, |&(version, _)| version))
    }

    /// Gives `stream` its next version and returns it.
    #[inline]
    pub(crate) fn bump(&mut self, stream: u64, heads: &mut HeadsTable<'_>) -> Result<u32, LogError> {
        if let Some((version, dirty)) = self.versions.get_mut(&stream) {
            *version += 1;
            if !std::mem::replace(dirty, true) {
                self.dirty.push(stream);
            }
            return Ok(*version);
        }
        let version = self.version(stream, heads)? + 1;
        // Not cached before, or cached clean just now from its bucket's row: not yet listed.
        self.versions.insert(stream, (version, true));
        self.dirty.push(stream);
        Ok(version)
    }

    /// Writes every changed version into its bucket's row, then lets the cache go if it holds
    /// more than its cap (everything in it is now in the table).
    pub(crate) fn checkpoint(&mut self, txn: &redb::WriteTransaction, scratch: &mut Vec<u8>) -> Result<(), LogError> {
        let mut changed: FxHashMap<u64, Vec<(u64, u32)>> = FxHashMap::default();
        for stream in self.dirty.drain(..) {
            if let Some((version, dirty)) = self.versions.get_mut(&stream) {
                *dirty = false;
                changed.entry(bucket_of(stream)).or_default().push((stream, *version));
            }
        }
        let mut table = txn.open_table(HEADS).map_err(storage)?;
        let mut buckets: Vec<_> = changed.into_iter().collect();
        buckets.sort_unstable_by_key(|(bucket, _)| *bucket);
        for (bucket, mut heads) in buckets {
            let mut row: HeadsRow = match table.get(bucket).map_err(storage)? {
                Some(row) => decode("heads", bucket, row.value())?,
                None => HeadsRow::default(),
            };
            heads.sort_unstable();
            row.heads = merge(&row.heads, &heads);
            encode_sealed(&row, scratch);
            table.insert(bucket, scratch.as_slice()).map_err(storage)?;
        }
        if self.versions.len() > self.cap {
            self.versions = FxHashMap::default();
            self.loaded = FxHashSet::default();
        }
        Ok(())
    }

    /// Forgets the streams whose last record retention removed (`ended`: each stream's last
    /// version in the removed frames, so a stream is gone when that is its head): nothing of
    /// them is left to read, and keeping their heads would grow the log with every stream ever
    /// written. A stream appended to again after that starts over at version 1. Call after
    /// [`checkpoint`](Self::checkpoint), when no cached version is unwritten.
    pub(crate) fn forget(
        &mut self,
        txn: &redb::WriteTransaction,
        ended: &FxHashMap<u64, u32>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), LogError> {
        if ended.is_empty() {
            return Ok(());
        }
        let gone = |stream: u64, version: u32| ended.get(&stream) == Some(&version);
        self.versions.retain(|&stream, &mut (version, dirty)| dirty || !gone(stream, version));
        let mut buckets: Vec<u64> = ended.keys().map(|&stream| bucket_of(stream)).collect();
        buckets.sort_unstable();
        buckets.dedup();
        let mut table = txn.open_table(HEADS).map_err(storage)?;
        for bucket in buckets {
            let mut row: HeadsRow = match table.get(bucket).map_err(storage)? {
                Some(row) => decode("heads", bucket, row.value())?,
                None => continue,
            };
            let before = row.heads.len();
            row.heads.retain(|&(stream, version)| !gone(stream, version));
            if row.heads.len() == before {
                continue;
            }
            if row.heads.is_empty() {
                table.remove(bucket).map_err(storage)?;
            } else {
                encode_sealed(&row, scratch);
                table.insert(bucket, scratch.as_slice()).map_err(storage)?;
            }
        }
        Ok(())
    }
}

/// Two lists sorted by stream, merged; `newer` wins for a stream in both.
fn merge(older: &[(u64, u32)], newer: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let mut out = Vec::with_capacity(older.len() + newer.len());
    let (mut i, mut j) = (0, 0);
    while i < older.len() && j < newer.len() {
        match older[i].0.cmp(&newer[j].0) {
            std::cmp::Ordering::Less => {
                out.push(older[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(newer[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(newer[j]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&older[i..]);
    out.extend_from_slice(&newer[j..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_in_flight_pack_and_unpack_whatever_their_steps() {
        let mut in_flight = vec![
            InFlight { id: 1, stream: u64::MAX - 1, frame: 9 },
            InFlight { id: 2, stream: 3, frame: 2 },
            InFlight { id: 2, stream: u64::MAX, frame: u64::MAX },
            InFlight { id: 700, stream: 0, frame: 0 },
        ];
        let mut state = 0x5EED_u64;
        for _ in 0..1_000 {
            state = crate::completion::avalanche(state.wrapping_add(1));
            let last = *in_flight.last().expect("some");
            let stream = if state % 3 == 0 { state } else { last.stream.wrapping_add(state % 64).wrapping_sub(32) };
            in_flight.push(InFlight { id: last.id + state % 1_000, stream, frame: last.frame + state % 2 });
        }
        let mut packed = Vec::new();
        pack(&in_flight, &mut packed);
        assert!(packed.len() < in_flight.len() * 8, "{} bytes for {} messages", packed.len(), in_flight.len());
        assert_eq!(unpack(&packed, in_flight.len() as u64), Some(in_flight.clone()));
        assert_eq!(unpack(&packed, in_flight.len() as u64 - 1), None, "bytes left over");
        assert_eq!(unpack(&packed, in_flight.len() as u64 + 1), None, "too few bytes");
        assert_eq!(unpack(&packed[..packed.len() - 1], in_flight.len() as u64), None, "torn");
        assert_eq!(unpack(&[0xFF; 11], 1), None, "a varint past 64 bits");
        assert_eq!(unpack(&[], 0), Some(Vec::new()));
    }

    #[test]
    fn merging_keeps_order_and_the_newer_version() {
        assert_eq!(
            merge(&[(1, 1), (3, 3), (5, 1)], &[(2, 1), (3, 4), (6, 2)]),
            [(1, 1), (2, 1), (3, 4), (5, 1), (6, 2)]
        );
        assert_eq!(merge(&[], &[(1, 1)]), [(1, 1)]);
        assert_eq!(merge(&[(1, 1)], &[]), [(1, 1)]);
    }
}
