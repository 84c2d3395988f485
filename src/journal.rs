//! The engine's journal: what it writes to the durable log, and when.
//!
//! - **Ingress**: every submitted message, encoded by the application's [`JournalCodec`];
//!   `submit` returns once those records are committed, and only then do the messages enter the
//!   pipeline.
//! - **Stages**: the facts a handler records with [`Emitter::record`](crate::Emitter::record)
//!   for an event it finished, and a [`KIND_DEAD_LETTER`] record for every dead letter.
//!
//! A worker appends its batch's records *before* it sends the batch's emitted events on, so a
//! stream's records are always in causal order in the log. Records are built (and their payloads
//! copied) on the producing thread; the writer thread only assigns versions and packs frames.

use std::ops::Range;
use std::sync::Arc;

use crate::dead_letter::{DeadLetter, DeadLetterNote};
use crate::log::{Log, LogError, Record, ENGINE_STREAM, KIND_COMPLETED, KIND_DEAD_LETTER, STAGE_INGRESS};
use crate::stage::{Emitter, Envelope};

/// A dead letter's record, without the id, stage and timestamp its writer gives it: the
/// original event (`cause_kind` and `payload`), attempts, and the story as JSON in the note.
pub(crate) fn dead_letter_record<M>(letter: &DeadLetter<M>, codec: &dyn JournalCodec<M>) -> Record {
    let event = &letter.envelope;
    let mut payload = Vec::new();
    let cause_kind = codec.encode(&event.msg, &mut payload);
    Record {
        stream: event.key,
        kind: KIND_DEAD_LETTER,
        attempts: letter.attempts,
        cause_kind,
        correlation: event.seq,
        causation: event.cause,
        payload,
        note: DeadLetterNote::of(letter).to_json(),
        ..Record::default()
    }
}

/// Turns the application's messages into log records (for ingress and dead letters), and back
/// (for recovery).
pub trait JournalCodec<M>: Send + Sync {
    /// Appends `msg`'s payload to `payload` and returns its record kind (below
    /// [`KIND_RESERVED_MIN`](crate::log::KIND_RESERVED_MIN)).
    fn encode(&self, msg: &M, payload: &mut Vec<u8>) -> u16;

    /// The message `encode` turned into `kind` and `payload`; `None` for bytes it did not write.
    fn decode(&self, kind: u16, payload: &[u8]) -> Option<M>;
}

/// A log and the codec for the engine's messages.
pub struct Journal<M> {
    pub(crate) log: Arc<Log>,
    pub(crate) codec: Arc<dyn JournalCodec<M>>,
}

impl<M> Clone for Journal<M> {
    fn clone(&self) -> Self {
        Self { log: Arc::clone(&self.log), codec: Arc::clone(&self.codec) }
    }
}

impl<M> std::fmt::Debug for Journal<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("log", &self.log).finish_non_exhaustive()
    }
}

impl<M> Journal<M> {
    /// Journals to `log`, encoding messages with `codec`.
    pub fn new(log: Arc<Log>, codec: Arc<dyn JournalCodec<M>>) -> Self {
        Self { log, codec }
    }

    /// The log.
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }
}

pub(crate) use crate::clock::unix_micros;

/// Ids reserved per trip to the log's shared counter.
const ID_BLOCK: u64 = 4_096;

/// One thread's journal: records pile up here and leave in one append.
pub(crate) struct JournalWriter<M> {
    journal: Journal<M>,
    stage: u16,
    pending: Vec<Record>,
    ids: Range<u64>,
    timestamp_us: u64,
}

impl<M> JournalWriter<M> {
    pub(crate) fn new(journal: Journal<M>, stage: u16) -> Self {
        Self { journal, stage, pending: Vec::new(), ids: 0..0, timestamp_us: unix_micros() }
    }

    fn next_id(&mut self) -> u64 {
        if self.ids.is_empty() {
            let first = self.journal.log.reserve_ids(ID_BLOCK);
            self.ids = first..first + ID_BLOCK;
        }
        let id = self.ids.start;
        self.ids.start += 1;
        id
    }

    /// Sets the timestamp of the records that follow (one clock read per batch).
    pub(crate) fn stamp(&mut self) {
        self.timestamp_us = unix_micros();
    }

    fn record(&mut self, stream: u64, kind: u16, correlation: u64, causation: u64, payload: Vec<u8>) -> &mut Record {
        self.push(Record { stream, kind, correlation, causation, payload, ..Record::default() })
    }

    /// Queues `record` with its id, this writer's stage and the batch's timestamp.
    fn push(&mut self, record: Record) -> &mut Record {
        let id = self.next_id();
        self.pending.push(Record { id, stage: self.stage, timestamp_us: self.timestamp_us, ..record });
        self.pending.last_mut().expect("just pushed")
    }

    /// Journals the facts a handler recorded for `event`; returns the id its emitted events
    /// carry as their cause (the last record's, or the event's own cause if it recorded none).
    pub(crate) fn commit(&mut self, event: &Envelope<M>, emitter: &Emitter<M>) -> u64 {
        let mut cause = event.cause;
        for (kind, payload) in emitter.recorded() {
            cause = self.record(event.key, kind, event.seq, event.cause, payload.to_vec()).id;
        }
        cause
    }

    /// Journals a dead letter with the original event; its story goes in the note as JSON.
    /// Returns the record's id.
    pub(crate) fn dead_letter(&mut self, letter: &DeadLetter<M>) -> u64 {
        let record = dead_letter_record(letter, &*self.journal.codec);
        self.push(record).id
    }

    /// Journals what the dead-letter sink recorded about a dead letter (record `cause`) on
    /// `stream` ([`DeadLetterSink::dead_letter_journaled`](crate::DeadLetterSink::dead_letter_journaled)).
    pub(crate) fn facts(&mut self, stream: u64, correlation: u64, cause: u64, facts: Vec<(u16, Vec<u8>)>) {
        for (kind, payload) in facts {
            self.record(stream, kind, correlation, cause, payload);
        }
    }

    /// Journals that the submitted messages `seqs` (their ingress records' ids) have finished.
    /// The record takes no id: it is the engine's bookkeeping, the cause of nothing.
    pub(crate) fn completed(&mut self, seqs: &[u64]) {
        if !seqs.is_empty() {
            let record = completion_record(seqs);
            self.pending.push(Record { stage: self.stage, timestamp_us: self.timestamp_us, ..record });
        }
    }

    /// Hands the pending records to the log writer without waiting for the commit.
    pub(crate) fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let capacity = self.pending.len();
        self.journal.log.append_detached(std::mem::replace(&mut self.pending, Vec::with_capacity(capacity)))
    }
}

/// A [`KIND_COMPLETED`] record on the engine's stream: the ids of the ingress records whose work
/// has finished, little-endian `u64`s. The engine journals these itself; an application appends
/// one when recovery finds a message in flight whose work had in fact finished (it has nothing
/// to resume), so that the log stops listing it.
#[must_use]
pub fn completion_record(seqs: &[u64]) -> Record {
    let payload = seqs.iter().flat_map(|seq| seq.to_le_bytes()).collect();
    Record { stream: ENGINE_STREAM, kind: KIND_COMPLETED, payload, ..Record::default() }
}

/// The ingress records of submitted messages, with exactly as many ids reserved; each envelope's
/// `seq` and `cause` become its record's id.
pub(crate) fn ingress_records<M>(journal: &Journal<M>, events: &mut [Envelope<M>]) -> Vec<Record> {
    let first_id = journal.log.reserve_ids(events.len() as u64);
    let timestamp_us = unix_micros();
    events
        .iter_mut()
        .zip(first_id..)
        .map(|(event, id)| {
            let mut payload = Vec::new();
            let kind = journal.codec.encode(&event.msg, &mut payload);
            event.seq = id;
            event.cause = id;
            Record {
                id,
                stream: event.key,
                kind,
                stage: STAGE_INGRESS,
                correlation: id,
                timestamp_us,
                payload,
                ..Record::default()
            }
        })
        .collect()
}
