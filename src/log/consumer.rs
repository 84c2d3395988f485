//! Consumers of the log: Kafka's consumer groups, in process. A named consumer reads the log from
//! a position (its committed one, the earliest or latest frame, a position of its own, or the
//! first record at or after a time), follows the tail as new frames commit, and commits where it
//! got to, durably, in the log itself.
//!
//! - A **position** is a frame and a record's index in it: frames never change once committed
//!   (every commit closes its last frame), so a position names one record for as long as its
//!   frame is kept.
//! - `consumers` (one row per name): the committed position, when it was committed, and whether
//!   the consumer holds retention. Rows are written by the log's writer in its next commit, and
//!   [`LogConsumer::commit`] returns once that commit is durable.
//! - `frame_offsets` (one row per frame): how many records the log held before the frame, so a
//!   position's offset (and a consumer's lag in records) is known without reading history.
//! - **Retention** never removes a frame a consumer that holds retention has not committed past;
//!   a consumer that does not hold it may find its next frame removed, and then goes on from the
//!   oldest frame kept and counts what it skipped ([`LogConsumer::skipped`]).

use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;

use super::checkpoint::decode;
use super::error::storage;
use super::format::encode_sealed;
use super::open::contained;
use super::{decode_frame, decode_frame_owned, existing, Command, FrameError, Log, LogError, Record, FRAMES};

/// Each consumer's committed position, by name.
pub(crate) const CONSUMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("consumers");
/// The records the log held before each frame.
pub(crate) const FRAME_OFFSETS: TableDefinition<u64, u64> = TableDefinition::new("frame_offsets");

/// Longest consumer name, in bytes.
pub const CONSUMER_NAME_MAX: usize = 128;

/// A record's place in the log: its frame, and its index among the frame's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Position {
    /// The frame's sequence number.
    pub frame: u64,
    /// The record's index in the frame.
    pub index: u32,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.frame, self.index)
    }
}

/// A consumer's row: its committed position (the next record it will read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct ConsumerRow {
    pub(crate) frame: u64,
    pub(crate) index: u32,
    /// When it was committed: microseconds since the Unix epoch.
    pub(crate) committed_us: u64,
    pub(crate) holds_retention: bool,
    /// Records in the log before the position ([`UNKNOWN`] if it was not known).
    pub(crate) offset: u64,
}

/// An offset not known: a position in a frame written before frames had offsets.
const UNKNOWN: u64 = u64::MAX;

impl ConsumerRow {
    fn position(&self) -> Position {
        Position { frame: self.frame, index: self.index }
    }
}

/// Where a consumer starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// From its committed position; from the earliest frame kept if it never committed.
    #[default]
    Committed,
    /// From the earliest frame kept.
    Earliest,
    /// From the next frame to be committed: only what is appended from now on.
    Latest,
    /// From this position.
    At(Position),
    /// From the first record stamped at or after this time (microseconds since the Unix epoch).
    Timestamp(u64),
}

/// How a consumer reads and what it asks of retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// Where it starts.
    pub start: StartAt,
    /// Whether retention keeps every frame from its committed position on (the default). A
    /// consumer that does not hold retention may find frames it has not read removed.
    pub holds_retention: bool,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self { start: StartAt::Committed, holds_retention: true }
    }
}

/// A record read by a consumer, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Where the record is.
    pub position: Position,
    /// The record.
    pub record: Record,
}

/// A registered consumer as the log knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Its committed position: the next record it will read.
    pub position: Position,
    /// When it committed, in microseconds since the Unix epoch.
    pub committed_us: u64,
    /// Whether retention keeps the frames it has not committed past.
    pub holds_retention: bool,
    /// Records appended after its position; `None` when it cannot be known (its position is
    /// in a frame written before frames had offsets).
    pub lag_records: Option<u64>,
    /// How much older the record at its position is than the newest record (0 when it is
    /// caught up); `None` when retention removed its frame.
    pub lag_us: Option<u64>,
    /// Whether retention removed frames it had not committed past (a consumer that does not
    /// hold retention): it will skip their records and go on from the oldest frame kept.
    pub behind_retention: bool,
}

/// A named reader of the log: it reads in log order from its position, follows the tail, and
/// commits its position durably (see [`Log::consumer`]).
#[derive(Debug)]
pub struct LogConsumer<'a> {
    log: &'a Log,
    name: String,
    next: Position,
    /// Records in the log before `next`, when known.
    next_offset: Option<u64>,
    holds_retention: bool,
    skipped: u64,
    /// The frame being read, validated and decoded once: a poll of fewer records than a frame
    /// holds (thousands) takes the next ones from here instead of validating the frame again.
    current: Option<(u64, Vec<Record>)>,
}

fn refused(what: String) -> LogError {
    LogError::Options(what)
}

fn check_name(name: &str) -> Result<(), LogError> {
    if name.is_empty() || name.len() > CONSUMER_NAME_MAX || name.chars().any(char::is_control) {
        return Err(refused(format!(
            "a consumer's name must be 1 to {CONSUMER_NAME_MAX} bytes without control characters, not {name:?}"
        )));
    }
    Ok(())
}

impl Log {
    /// Registers (or takes up again) the consumer `name` and returns it, positioned as `options`
    /// say. Its start is committed at once, so retention holds from now on if it is to.
    pub fn consumer(&self, name: &str, options: ConsumerOptions) -> Result<LogConsumer<'_>, LogError> {
        check_name(name)?;
        let committed = self.committed(name)?;
        let mut next_offset = None;
        let next = match options.start {
            StartAt::Committed => match committed {
                Some(row) => {
                    next_offset = Some(row.offset).filter(|&offset| offset != UNKNOWN);
                    row.position()
                }
                None => Position { frame: self.frame_range()?.0, index: 0 },
            },
            StartAt::Earliest => Position { frame: self.frame_range()?.0, index: 0 },
            StartAt::Latest => Position { frame: self.frame_range()?.1, index: 0 },
            StartAt::At(position) => position,
            StartAt::Timestamp(us) => self.first_at_or_after(us)?,
        };
        if next_offset.is_none() {
            next_offset = contained(|| {
                let txn = self.shared.db.begin_read().map_err(storage)?;
                offset_of(&txn, next)
            })?;
        }
        let mut consumer = LogConsumer {
            log: self,
            name: name.to_owned(),
            next,
            next_offset,
            holds_retention: options.holds_retention,
            skipped: 0,
            current: None,
        };
        consumer.commit()?;
        Ok(consumer)
    }

    /// Every registered consumer, by name, with its position and lag.
    pub fn consumers(&self) -> Result<Vec<ConsumerInfo>, LogError> {
        contained(|| {
            let txn = self.shared.db.begin_read().map_err(storage)?;
            let Some(rows) = existing(&txn, CONSUMERS)? else {
                return Ok(Vec::new());
            };
            let head = head(&txn)?;
            let first_frame = match existing(&txn, FRAMES)? {
                Some(frames) => frames.first().map_err(storage)?.map(|(seq, _)| seq.value()),
                None => None,
            };
            let mut infos = Vec::new();
            for entry in rows.iter().map_err(storage)? {
                let (name, value) = entry.map_err(storage)?;
                let name = name.value().to_owned();
                let row: ConsumerRow = decode("consumers", 0, value.value())?;
                let (lag_records, lag_us) = lag(&txn, &row, head.as_ref())?;
                infos.push(ConsumerInfo {
                    name,
                    position: row.position(),
                    committed_us: row.committed_us,
                    holds_retention: row.holds_retention,
                    lag_records,
                    lag_us,
                    behind_retention: first_frame.is_some_and(|first| row.frame < first),
                });
            }
            Ok(infos)
        })
    }

    /// Forgets the consumer `name` (it no longer holds retention); false if there was none.
    pub fn remove_consumer(&self, name: &str) -> Result<bool, LogError> {
        check_name(name)?;
        let existed = self.committed(name)?.is_some();
        if existed {
            let (reply, answer) = crossbeam_channel::bounded(1);
            self.send(Command::Consumer { name: name.to_owned(), row: None, reply })?;
            answer.recv().unwrap_or(Err(LogError::Closed))?;
        }
        Ok(existed)
    }

    fn committed(&self, name: &str) -> Result<Option<ConsumerRow>, LogError> {
        contained(|| {
            let txn = self.shared.db.begin_read().map_err(storage)?;
            let Some(table) = existing(&txn, CONSUMERS)? else {
                return Ok(None);
            };
            let Some(value) = table.get(name).map_err(storage)? else { return Ok(None) };
            decode::<ConsumerRow>("consumers", 0, value.value()).map(Some)
        })
    }

    /// The first frame kept and the next frame to be committed.
    fn frame_range(&self) -> Result<(u64, u64), LogError> {
        contained(|| {
            let txn = self.shared.db.begin_read().map_err(storage)?;
            let Some(frames) = existing(&txn, FRAMES)? else {
                return Ok((0, 0));
            };
            let first = frames.first().map_err(storage)?.map(|(seq, _)| seq.value());
            let last = frames.last().map_err(storage)?.map(|(seq, _)| seq.value());
            if let (Some(first), Some(last)) = (first, last) {
                Ok((first, last + 1))
            } else {
                let next = *self.shared.tail.lock();
                Ok((next, next))
            }
        })
    }

    /// The position of the first record stamped at or after `us` (the end of the log if none):
    /// frames are read from the oldest kept until one holds such a record.
    fn first_at_or_after(&self, us: u64) -> Result<Position, LogError> {
        contained(|| {
            let txn = self.shared.db.begin_read().map_err(storage)?;
            let mut end = *self.shared.tail.lock();
            if let Some(frames) = existing(&txn, FRAMES)? {
                for entry in frames.iter().map_err(storage)? {
                    let (seq, value) = entry.map_err(storage)?;
                    let seq = seq.value();
                    let archived =
                        decode_frame(value.value()).map_err(|error| LogError::Corrupt { frame: seq, error })?;
                    if let Some(index) = archived.records.iter().position(|r| r.timestamp_us.to_native() >= us) {
                        return Ok(Position { frame: seq, index: u32::try_from(index).unwrap_or(u32::MAX) });
                    }
                    end = end.max(seq + 1);
                }
            }
            Ok(Position { frame: end, index: 0 })
        })
    }
}

/// The newest record's offset past it (the log's record count; `None` when its frame was written
/// before frames had offsets) and its timestamp.
struct Head {
    records: Option<u64>,
    newest_us: u64,
    next_frame: u64,
}

fn frame_offset(txn: &redb::ReadTransaction, frame: u64) -> Result<Option<u64>, LogError> {
    let Some(offsets) = existing(txn, FRAME_OFFSETS)? else {
        return Ok(None);
    };
    Ok(offsets.get(frame).map_err(storage)?.map(|v| v.value()))
}

fn head(txn: &redb::ReadTransaction) -> Result<Option<Head>, LogError> {
    let Some(frames) = existing(txn, FRAMES)? else {
        return Ok(None);
    };
    let Some((seq, value)) = frames.last().map_err(storage)? else { return Ok(None) };
    let seq = seq.value();
    let archived = decode_frame(value.value()).map_err(|error| LogError::Corrupt { frame: seq, error })?;
    let newest_us = archived.records.iter().map(|r| r.timestamp_us.to_native()).max().unwrap_or(0);
    let records = frame_offset(txn, seq)?.map(|offset| offset + archived.records.len() as u64);
    Ok(Some(Head { records, newest_us, next_frame: seq + 1 }))
}

/// Records in the log before `position`, if known: its frame's offset and its index, or the
/// whole log's count for a position past the last frame.
fn offset_of(txn: &redb::ReadTransaction, position: Position) -> Result<Option<u64>, LogError> {
    if let Some(offset) = frame_offset(txn, position.frame)? {
        return Ok(Some(offset + u64::from(position.index)));
    }
    Ok(match head(txn)? {
        Some(head) if position.frame >= head.next_frame => head.records,
        Some(_) => None,
        None => Some(0),
    })
}

/// Records after a consumer's position and the age of the one at it against the newest; `None`
/// when they cannot be known (the age when retention removed its frame; both for a position in
/// a frame written before frames had offsets).
fn lag(
    txn: &redb::ReadTransaction,
    row: &ConsumerRow,
    head: Option<&Head>,
) -> Result<(Option<u64>, Option<u64>), LogError> {
    let position = row.position();
    let Some(head) = head else { return Ok((Some(0), Some(0))) };
    if position.frame >= head.next_frame {
        return Ok((Some(0), Some(0)));
    }
    let by_row = Some(row.offset)
        .filter(|&offset| offset != UNKNOWN)
        .zip(head.records)
        .map(|(offset, records)| records.saturating_sub(offset));
    let frames = txn.open_table(FRAMES).map_err(storage)?;
    let Some(value) = frames.get(position.frame).map_err(storage)? else { return Ok((by_row, None)) };
    let archived = decode_frame(value.value()).map_err(|error| LogError::Corrupt { frame: position.frame, error })?;
    let at = archived.records.get(position.index as usize).map(|r| r.timestamp_us.to_native());
    let age = at.map_or(0, |at| head.newest_us.saturating_sub(at));
    let records = match (frame_offset(txn, position.frame)?, head.records) {
        (Some(offset), Some(total)) => Some(total.saturating_sub(offset + u64::from(position.index))),
        _ => by_row,
    };
    // At the newest record and past it, the lag is none; otherwise its age.
    Ok((records, Some(if records == Some(0) { 0 } else { age })))
}

impl LogConsumer<'_> {
    /// The consumer's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next record it will read.
    #[must_use]
    pub fn position(&self) -> Position {
        self.next
    }

    /// Records it skipped because retention removed their frames before it read them (only a
    /// consumer that does not hold retention).
    #[must_use]
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Reads up to `max` records from its position on, waiting up to `wait` for new frames to
    /// commit when it has read everything. An empty result means nothing new within `wait`.
    pub fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Consumed>, LogError> {
        let deadline = Instant::now() + wait;
        loop {
            let read = self.read(max)?;
            if !read.is_empty() || max == 0 {
                return Ok(read);
            }
            let mut tail = self.log.shared.tail.lock();
            if *tail <= self.next.frame && self.log.shared.tail_changed.wait_until(&mut tail, deadline).timed_out() {
                drop(tail);
                return self.read(max);
            }
        }
    }

    /// Commits its position durably: a consumer taken up again with [`StartAt::Committed`]
    /// starts there. Returns once the commit is durable.
    pub fn commit(&mut self) -> Result<(), LogError> {
        let row = ConsumerRow {
            frame: self.next.frame,
            index: self.next.index,
            committed_us: crate::clock::unix_micros(),
            holds_retention: self.holds_retention,
            offset: self.next_offset.unwrap_or(UNKNOWN),
        };
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.log.send(Command::Consumer { name: self.name.clone(), row: Some(row), reply })?;
        answer.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Moves its position (to read again, or to skip ahead); nothing is committed.
    pub fn seek(&mut self, position: Position) {
        self.next = position;
        self.next_offset = None;
        self.current = None;
    }

    fn read(&mut self, max: usize) -> Result<Vec<Consumed>, LogError> {
        contained(|| {
            let txn = self.log.shared.db.begin_read().map_err(storage)?;
            let Some(frames) = existing(&txn, FRAMES)? else {
                return Ok(Vec::new());
            };
            if self.next_offset.is_none() {
                self.next_offset = offset_of(&txn, self.next)?;
            }
            if let Some((first, _)) = frames.first().map_err(storage)? {
                let first = first.value();
                if self.next.frame < first {
                    // Retention removed frames this consumer had not read.
                    let to = frame_offset(&txn, first)?;
                    if let (Some(from), Some(to)) = (self.next_offset, to) {
                        self.skipped += to.saturating_sub(from);
                    }
                    self.next_offset = to;
                    tracing::warn!(consumer = %self.name, from = %self.next, to = first, "frames removed before this consumer read them");
                    self.next = Position { frame: first, index: 0 };
                }
            }
            let mut read = Vec::new();
            for entry in frames.range(self.next.frame..).map_err(storage)? {
                if read.len() >= max {
                    break;
                }
                let (seq, value) = entry.map_err(storage)?;
                let seq = seq.value();
                if seq != self.next.frame {
                    return Err(LogError::Corrupt {
                        frame: seq,
                        error: FrameError::Invalid(format!(
                            "frame {seq} follows frame {}: frames are missing",
                            self.next.frame
                        )),
                    });
                }
                if self.current.as_ref().is_none_or(|(frame, _)| *frame != seq) {
                    let frame = decode_frame_owned(seq, value.value())
                        .map_err(|error| LogError::Corrupt { frame: seq, error })?;
                    self.current = Some((seq, frame.records));
                }
                let frame = &mut self.current.as_mut().expect("just set").1;
                let records = frame.len();
                let mut index = self.next.index as usize;
                while index < records && read.len() < max {
                    // Positions only move on (a seek drops the frame), so each record is taken once.
                    let record = std::mem::take(&mut frame[index]);
                    let position = Position { frame: seq, index: u32::try_from(index).unwrap_or(u32::MAX) };
                    read.push(Consumed { position, record });
                    index += 1;
                    self.next_offset = self.next_offset.map(|offset| offset + 1);
                }
                self.next = if index >= records {
                    self.current = None;
                    Position { frame: seq + 1, index: 0 }
                } else {
                    Position { frame: seq, index: u32::try_from(index).unwrap_or(u32::MAX) }
                };
            }
            Ok(read)
        })
    }
}

/// Every consumer's row, for the writer (retention holds for some of them).
pub(crate) fn read_all(db: &redb::Database) -> Result<Vec<(String, ConsumerRow)>, LogError> {
    let txn = db.begin_read().map_err(storage)?;
    let Some(table) = existing(&txn, CONSUMERS)? else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (name, value) = entry.map_err(storage)?;
        rows.push((name.value().to_owned(), decode::<ConsumerRow>("consumers", 0, value.value())?));
    }
    Ok(rows)
}

/// Writes (or, with `None`, removes) `name`'s row in `txn`.
pub(crate) fn write(
    txn: &redb::WriteTransaction,
    name: &str,
    row: Option<&ConsumerRow>,
    scratch: &mut Vec<u8>,
) -> Result<(), LogError> {
    let mut table = txn.open_table(CONSUMERS).map_err(storage)?;
    match row {
        Some(row) => {
            encode_sealed(row, scratch);
            table.insert(name, scratch.as_slice()).map_err(storage)?;
        }
        None => {
            table.remove(name).map_err(storage)?;
        }
    }
    Ok(())
}
