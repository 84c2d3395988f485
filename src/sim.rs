//! Deterministic simulation: a topology run on one thread, one event at a time, by a seeded
//! scheduler and a manual clock, with an in-memory journal that has a durable prefix.
//!
//! The threaded engine's interleavings are the operating system's to choose; here they are the
//! seed's. Each [`step`](Simulation::step) picks a stage with work (or, with none, moves the
//! clock to the next retry), handles one event with the stage's own handler, and applies its
//! outcome as a worker would: emitted events and recorded facts on `Done`, a retry after a
//! seeded backoff, a dead letter past `attempts_max` or on a rejection. A run that fails names its
//! seed, and the same seed replays it exactly. `orders::simulate` drives the order pipeline
//! through it with port faults, timeouts, crashes and restarts.
//!
//! What it leaves out, by design: threads and queue bounds (no backpressure, no overflow), TTL
//! (deadlines are on the real clock), per-key parking (a retried event lets its key's later
//! events pass: the order pipeline has one event per order per stage).

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::dead_letter::{DeadLetter, DeadLetterKind, DeadLetterSink};
use crate::engine::Compiled;
use crate::error::BuildError;
use crate::journal::{dead_letter_record, JournalCodec};
use crate::log::{Record, STAGE_INGRESS};
use crate::stage::{Deadline, Emitter, Envelope, Handler, Message, Outcome, Reason, StageId};
use crate::{EngineConfig, StageConfig, Topology};

struct SimStage<M> {
    name: Arc<str>,
    handler: Box<dyn Handler<M>>,
    emitter: Emitter<M>,
    queue: VecDeque<Envelope<M>>,
    config: StageConfig,
}

/// A topology run one event at a time on the calling thread. See the [module](self) docs.
pub struct Simulation<M: Message> {
    stages: Vec<SimStage<M>>,
    entry: StageId,
    /// Retries and deferrals by due time (ms), then by scheduling order.
    timers: BTreeMap<(u64, u64), (usize, Envelope<M>)>,
    timer_seq: u64,
    now_ms: u64,
    rng: SmallRng,
    dead_letters: Arc<dyn DeadLetterSink<M>>,
    codec: Arc<dyn JournalCodec<M>>,
    journal: Vec<Record>,
    /// The last version of each stream in the journal.
    versions: rustc_hash::FxHashMap<u64, u32>,
    next_id: u64,
    next_seq: u64,
    steps: u64,
}

impl<M: Message> std::fmt::Debug for Simulation<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("stages", &self.stages.iter().map(|s| &*s.name).collect::<Vec<_>>())
            .field("now_ms", &self.now_ms)
            .field("steps", &self.steps)
            .field("journal", &self.journal.len())
            .finish_non_exhaustive()
    }
}

impl<M: Message> Simulation<M> {
    /// Builds one handler per stage (worker 0) from `topology`, checked against `config` as
    /// the engine checks it. The journal continues `history` (a durable prefix from an earlier
    /// run: ids and versions go on from it); `seed` drives every choice.
    pub fn new(
        topology: Topology<M>,
        config: &EngineConfig,
        dead_letters: Arc<dyn DeadLetterSink<M>>,
        codec: Arc<dyn JournalCodec<M>>,
        history: &[Record],
        seed: u64,
    ) -> Result<Self, BuildError> {
        let Compiled { stages, links, entry, exchange, may_publish, dead_letter_unroutable, stage_configs, .. } =
            topology.compile(config)?;
        let count = stages.len();
        let stages = stages
            .into_iter()
            .enumerate()
            .map(|(index, decl)| {
                let make = decl.make.expect("compile checked every stage has a handler");
                let linked = (0..count).map(|to| links.iter().any(|&(f, t)| f.index() == index && t.index() == to));
                let mut emitter = Emitter::new(linked.collect(), true);
                emitter.set_routes(Arc::clone(&exchange), may_publish[index].clone(), dead_letter_unroutable);
                SimStage {
                    name: decl.name.as_str().into(),
                    handler: make(0),
                    emitter,
                    queue: VecDeque::new(),
                    config: stage_configs[index],
                }
            })
            .collect();
        Ok(Self {
            stages,
            entry,
            timers: BTreeMap::new(),
            timer_seq: 0,
            now_ms: 0,
            rng: SmallRng::seed_from_u64(seed),
            dead_letters,
            codec,
            journal: history.to_vec(),
            versions: history.iter().map(|r| (r.stream, r.version)).collect(),
            next_id: history.iter().map(|r| r.id).max().unwrap_or(0) + 1,
            next_seq: 0,
            steps: 0,
        })
    }

    /// The journal so far: every record, in order.
    #[must_use]
    pub fn journal(&self) -> &[Record] {
        &self.journal
    }

    /// The manual clock, in milliseconds.
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Steps taken.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether nothing is queued and no retry waits.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.timers.is_empty() && self.stages.iter().all(|s| s.queue.is_empty())
    }

    /// The stage named `name`.
    #[must_use]
    pub fn stage_id(&self, name: &str) -> Option<StageId> {
        let index = self.stages.iter().position(|s| &*s.name == name)?;
        u16::try_from(index).ok().map(StageId)
    }

    fn record(&mut self, mut record: Record) -> u64 {
        record.id = self.next_id;
        self.next_id += 1;
        record.timestamp_us = self.now_ms * 1_000;
        let version = self.versions.entry(record.stream).or_insert(0);
        *version += 1;
        record.version = *version;
        let id = record.id;
        self.journal.push(record);
        id
    }

    /// Submits `msg` at the entry stage: its ingress record is journaled first.
    pub fn submit(&mut self, msg: M) {
        let mut payload = Vec::new();
        let kind = self.codec.encode(&msg, &mut payload);
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut envelope = Envelope::submitted(seq, msg);
        envelope.deadline = Deadline::NEVER;
        let record =
            Record { stream: envelope.key, kind, stage: STAGE_INGRESS, correlation: seq, payload, ..Record::default() };
        envelope.cause = self.record(record);
        let entry = self.entry.index();
        self.stages[entry].queue.push_back(envelope);
    }

    /// Puts `envelope` in `stage`'s queue, not journaled (a resumed step).
    pub fn inject(&mut self, stage: StageId, envelope: Envelope<M>) {
        self.stages[stage.index()].queue.push_back(envelope);
    }

    /// Handles one event, or moves the clock to the next due retry. False when idle.
    pub fn step(&mut self) -> bool {
        let busy: Vec<usize> = (0..self.stages.len()).filter(|&i| !self.stages[i].queue.is_empty()).collect();
        let due = self.timers.keys().next().map(|&(due, _)| due);
        // A due retry competes with the queues; with nothing queued, time moves to it.
        let take_timer = match due {
            Some(due) if due <= self.now_ms => busy.is_empty() || self.rng.random_bool(0.5),
            Some(due) if busy.is_empty() => {
                self.now_ms = due;
                true
            }
            _ => false,
        };
        let (stage, event) = if take_timer {
            let (_, (stage, event)) = self.timers.pop_first().expect("a timer is due");
            (stage, event)
        } else if busy.is_empty() {
            return false;
        } else {
            let stage = busy[self.rng.random_range(0..busy.len())];
            let event = self.stages[stage].queue.pop_front().expect("the stage has work");
            (stage, event)
        };
        self.steps += 1;
        // Each step takes a little simulated time.
        self.now_ms += u64::from(self.rng.random_ratio(1, 4));
        self.handle(stage, event);
        true
    }

    fn handle(&mut self, index: usize, mut event: Envelope<M>) {
        let stage = &mut self.stages[index];
        stage.emitter.begin(&event);
        let (handler, emitter) = (&mut stage.handler, &mut stage.emitter);
        let mut panicked = false;
        let outcome = catch_unwind(AssertUnwindSafe(|| handler.handle(&event, emitter))).unwrap_or_else(|_| {
            panicked = true;
            Outcome::Retry("handler panicked".into())
        });
        if let Some(reason) = stage.emitter.misuse.take() {
            stage.emitter.clear();
            return self.dead_letter(index, event, DeadLetterKind::HandlerMisuse, reason);
        }
        match outcome {
            Outcome::Done => {
                let stage_index = u16::try_from(index).unwrap_or(u16::MAX);
                let mut cause = event.cause;
                let records = std::mem::take(&mut self.stages[index].emitter.records);
                let bytes = std::mem::take(&mut self.stages[index].emitter.record_bytes);
                for &(kind, start, end) in &records {
                    let record = Record {
                        stream: event.key,
                        kind,
                        stage: stage_index,
                        correlation: event.seq,
                        causation: event.cause,
                        payload: bytes[start..end].to_vec(),
                        ..Record::default()
                    };
                    cause = self.record(record);
                }
                let staged = std::mem::take(&mut self.stages[index].emitter.staged);
                for (to, mut emitted) in staged {
                    emitted.cause = cause;
                    self.stages[to.index()].queue.push_back(emitted);
                }
                let unroutable = std::mem::take(&mut self.stages[index].emitter.unroutable);
                for msg in unroutable {
                    let envelope =
                        Envelope { key: event.key, seq: event.seq, cause, attempt: 0, deadline: Deadline::NEVER, msg };
                    let reason = "no queue is bound to its routing key".into();
                    self.dead_letter(index, envelope, DeadLetterKind::Unroutable, reason);
                }
                self.stages[index].emitter.clear();
            }
            Outcome::Retry(reason) | Outcome::Conflict(reason) => {
                self.stages[index].emitter.clear();
                event.attempt += 1;
                if event.attempt >= self.stages[index].config.attempts_max {
                    let kind = if panicked { DeadLetterKind::Panicked } else { DeadLetterKind::RetriesExhausted };
                    self.dead_letter(index, event, kind, reason);
                } else {
                    let config = &self.stages[index].config;
                    let cap = config.retry_backoff_ms_base.saturating_mul(1 << event.attempt.min(20));
                    let delay = self.rng.random_range(0..=cap.min(config.retry_backoff_ms_max));
                    self.schedule(index, event, delay);
                }
            }
            Outcome::Defer(wait) => {
                self.stages[index].emitter.clear();
                self.schedule(index, event, u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1));
            }
            Outcome::Reject(reason) => {
                self.stages[index].emitter.clear();
                event.attempt += 1;
                self.dead_letter(index, event, DeadLetterKind::Rejected, reason);
            }
            Outcome::Malformed(reason) => {
                self.stages[index].emitter.clear();
                event.attempt += 1;
                self.dead_letter(index, event, DeadLetterKind::Malformed, reason);
            }
        }
    }

    fn schedule(&mut self, stage: usize, event: Envelope<M>, delay_ms: u64) {
        self.timer_seq += 1;
        self.timers.insert((self.now_ms.saturating_add(delay_ms), self.timer_seq), (stage, event));
    }

    fn dead_letter(&mut self, index: usize, envelope: Envelope<M>, kind: DeadLetterKind, reason: Reason) {
        let letter = DeadLetter {
            stage: Arc::clone(&self.stages[index].name),
            kind,
            reason,
            errors: Vec::new(),
            errors_dropped: 0,
            first_failure_us: self.now_ms * 1_000,
            last_failure_us: self.now_ms * 1_000,
            attempts: envelope.attempt,
            envelope,
        };
        let record = dead_letter_record(&letter, &*self.codec);
        self.record(Record { stage: u16::try_from(index).unwrap_or(u16::MAX), ..record });
        self.dead_letters.dead_letter(letter);
    }
}
