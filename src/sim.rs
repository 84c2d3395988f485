//! Deterministic simulation: a topology run on one thread, one event at a time, by a seeded
//! scheduler and a manual clock, with a journal that has a durable prefix: in memory
//! ([`Simulation::new`]), or the real log ([`Simulation::on_log`]), whose checkpoints, retention
//! and crash recovery then run under the simulation too (on a [`crate::log::MemoryDisk`], a crash
//! is a power cut of the disk).
//!
//! The threaded engine's interleavings are the operating system's to choose; here they are the
//! seed's. Each [`step`](Simulation::step) picks a stage with work (a queued event, or a parked
//! retry whose time has come) or, with none, moves the clock to the next wake-up, and runs the
//! event through the same code a worker runs (`StageCore`): admission with TTL and keyed
//! parking, the handler, the decision core's disposition (backoff with the stage's jitter, dead
//! letters with their error chain). Submitted messages are journaled and enter the pipeline only
//! when [`sync`](Simulation::sync) makes them durable, as the engine acknowledges them only at
//! the commit. A run that fails names its seed, and the same seed replays it exactly.
//!
//! What it leaves out, by design: threads and queue bounds (no backpressure, no overflow), and
//! more than one worker per stage.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::clock::{Clock, ManualClock};
use crate::completion::{Acks, Tokens, Tracker};
use crate::dead_letter::{DeadLetter, DeadLetterSink};
use crate::error::BuildError;
use crate::journal::{completion_record, dead_letter_record, JournalCodec};
use crate::log::{Log, LogError, Record, STAGE_INGRESS};
use crate::metrics::BatchTally;
use crate::stage::handling::{Effects, StageCore};
use crate::stage::{Deadline, Emitter, Envelope, Handler, Message, StageId};
use crate::topology::Compiled;
use crate::{EngineConfig, Topology};

/// A stage's handler as the topology built it, boxed.
struct Boxed<M>(Box<dyn Handler<M>>);

impl<M> Handler<M> for Boxed<M> {
    fn handle(&mut self, event: &Envelope<M>, out: &mut Emitter<M>) -> crate::Outcome {
        self.0.handle(event, out)
    }
}

struct SimStage<M> {
    core: StageCore<M, Boxed<M>>,
    /// Queued events, each with the clock reading when it was sent (the stage's TTL counts
    /// from then).
    queue: VecDeque<(Envelope<M>, u64)>,
}

/// The simulation's side of [`Effects`]: its journal, the events a step sent on, dead letters.
struct SimBooks<M> {
    dead_letters: Arc<dyn DeadLetterSink<M>>,
    codec: Arc<dyn JournalCodec<M>>,
    journal: Vec<Record>,
    /// The last version of each stream in the journal (for a stream not yet touched on a log,
    /// read from the log).
    versions: rustc_hash::FxHashMap<u64, u32>,
    /// Where synced records go, if not only to `journal`.
    log: Option<Arc<Log>>,
    next_id: u64,
    clock: Arc<ManualClock>,
    /// The stage whose event is being handled.
    stage: u16,
    /// Events the step sent on, by destination.
    outgoing: Vec<(StageId, Envelope<M>)>,
    /// Each stage's completion updates not yet applied (as each worker holds its unit's); the
    /// token source for what the simulation submits; the tracker; and the messages the updates
    /// applied last finished.
    acks: Vec<Acks>,
    tokens: Tokens,
    /// Updates applied to the tracker's words so far.
    #[cfg(test)]
    applied: usize,
    tracker: Tracker,
    finished: Vec<u64>,
}

impl<M> SimBooks<M> {
    fn record(&mut self, mut record: Record) -> u64 {
        // On a log, ids are the log's to give (its checkpoints remember how far they went).
        record.id = self.log.as_ref().map_or(self.next_id, |log| log.reserve_ids(1));
        self.next_id = record.id + 1;
        record.timestamp_us = self.clock.wall_us();
        let log = self.log.as_deref();
        // The writer gives each record the version after its stream's last one in the log:
        // the journal's versions are those.
        let version = self.versions.entry(record.stream).or_insert_with(|| {
            log.map_or(0, |log| {
                let stored = log.stream(record.stream).expect("the simulation's log reads");
                stored.last().map_or(0, |last| last.version)
            })
        });
        *version += 1;
        record.version = *version;
        let id = record.id;
        self.journal.push(record);
        id
    }
}

impl<M: Message> Effects<M> for SimBooks<M> {
    type Stop = std::convert::Infallible;

    fn forward(&mut self, event: &Envelope<M>, emitter: &mut Emitter<M>) -> Result<u64, Self::Stop> {
        let mut cause = event.cause;
        for (kind, payload) in emitter.recorded() {
            let record = Record {
                stream: event.key,
                kind,
                stage: self.stage,
                correlation: event.seq,
                causation: event.cause,
                payload: payload.to_vec(),
                ..Record::default()
            };
            cause = self.record(record);
        }
        let mut staged = emitter.take_staged();
        self.outgoing.extend(staged.drain(..).map(|(to, mut envelope)| {
            envelope.cause = cause;
            (to, envelope)
        }));
        emitter.restore_staged(staged);
        Ok(cause)
    }

    fn dead_letter(&mut self, letter: DeadLetter<M>) {
        let (stream, correlation) = (letter.envelope.key, letter.envelope.seq);
        let record = dead_letter_record(&letter, &*self.codec);
        let cause = self.record(Record { stage: self.stage, ..record });
        for (kind, payload) in self.dead_letters.dead_letter_journaled(letter) {
            let fact =
                Record { stream, kind, stage: self.stage, correlation, causation: cause, payload, ..Record::default() };
            self.record(fact);
        }
    }

    fn acks(&mut self) -> &mut Acks {
        &mut self.acks[usize::from(self.stage)]
    }
}

/// A topology run one event at a time on the calling thread. See the [module](self) docs.
pub struct Simulation<M: Message> {
    stages: Vec<SimStage<M>>,
    entry: StageId,
    clock: Arc<ManualClock>,
    rng: SmallRng,
    books: SimBooks<M>,
    /// Submitted messages journaled but not yet durable: they wait for [`Simulation::sync`].
    pending: Vec<Envelope<M>>,
    /// How much of the journal is durable.
    durable: usize,
    /// The tracker slot of each message it has tracked (stale once the message finished).
    slots: rustc_hash::FxHashMap<u64, u32>,
    steps: u64,
}

impl<M: Message> std::fmt::Debug for Simulation<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("stages", &self.stages.iter().map(|s| &*s.core.name).collect::<Vec<_>>())
            .field("now_ms", &self.now_ms())
            .field("steps", &self.steps)
            .field("journal", &self.books.journal.len())
            .field("durable", &self.durable)
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
        Self::build(topology, config, dead_letters, codec, history, None, seed)
    }

    /// As [`Simulation::new`], with the journal going to `log` at each [`sync`](Self::sync):
    /// ids are the log's, versions go on from what the log holds, and
    /// [`journal`](Self::journal) holds only this run's records. Nothing else may append to
    /// `log` meanwhile.
    pub fn on_log(
        topology: Topology<M>,
        config: &EngineConfig,
        dead_letters: Arc<dyn DeadLetterSink<M>>,
        codec: Arc<dyn JournalCodec<M>>,
        log: Arc<Log>,
        seed: u64,
    ) -> Result<Self, BuildError> {
        Self::build(topology, config, dead_letters, codec, &[], Some(log), seed)
    }

    fn build(
        topology: Topology<M>,
        config: &EngineConfig,
        dead_letters: Arc<dyn DeadLetterSink<M>>,
        codec: Arc<dyn JournalCodec<M>>,
        history: &[Record],
        log: Option<Arc<Log>>,
        seed: u64,
    ) -> Result<Self, BuildError> {
        let Compiled { stages, links, entry, exchange, may_publish, dead_letter_unroutable, stage_configs, .. } =
            topology.compile(config)?;
        let clock = Arc::new(ManualClock::default());
        let count = stages.len();
        let stages = stages
            .into_iter()
            .enumerate()
            .map(|(index, decl)| {
                let make = decl.make.expect("compile checked every stage has a handler");
                let linked = (0..count).map(|to| links.iter().any(|&(f, t)| f.index() == index && t.index() == to));
                let mut emitter = Emitter::new(linked.collect(), true);
                emitter.set_routes(Arc::clone(&exchange), may_publish[index].clone(), dead_letter_unroutable);
                emitter.tokens = Tokens::new((index as u64 + 1) << 48);
                let shared: Arc<dyn Clock> = Arc::clone(&clock) as Arc<dyn Clock>;
                let stage_seed = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let core = StageCore::new(
                    decl.name.as_str().into(),
                    stage_configs[index],
                    Boxed(make(0)),
                    emitter,
                    shared,
                    stage_seed,
                );
                SimStage { core, queue: VecDeque::new() }
            })
            .collect();
        let books = SimBooks {
            dead_letters,
            codec,
            journal: history.to_vec(),
            versions: history.iter().map(|r| (r.stream, r.version)).collect(),
            next_id: history.iter().map(|r| r.id).max().unwrap_or(0) + 1,
            log,
            clock: Arc::clone(&clock),
            stage: 0,
            outgoing: Vec::new(),
            acks: (0..count).map(|_| Acks::default()).collect(),
            tokens: Tokens::new((count as u64 + 1) << 48),
            #[cfg(test)]
            applied: 0,
            tracker: Tracker::new(None),
            finished: Vec::new(),
        };
        Ok(Self {
            stages,
            entry,
            clock,
            rng: SmallRng::seed_from_u64(seed),
            books,
            pending: Vec::new(),
            durable: history.len(),
            slots: rustc_hash::FxHashMap::default(),
            steps: 0,
        })
    }

    /// The journal so far: every record, in order (durable or not); on a log, this run's only.
    #[must_use]
    pub fn journal(&self) -> &[Record] {
        &self.books.journal
    }

    /// The durable prefix of [`journal`](Self::journal): what a crash keeps.
    #[must_use]
    pub fn durable(&self) -> &[Record] {
        &self.books.journal[..self.durable]
    }

    /// The manual clock, in milliseconds.
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        self.clock.now_us() / 1_000
    }

    /// Steps taken.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Submitted (and resumed) messages whose work has not finished.
    #[must_use]
    pub fn in_flight(&self) -> u64 {
        self.books.tracker.in_flight()
    }

    /// Submitted messages whose work has finished.
    #[must_use]
    pub fn completed(&self) -> u64 {
        self.books.tracker.completed()
    }

    /// Whether nothing is queued, parked or waiting for its commit.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.stages.iter().all(|s| s.queue.is_empty() && s.core.parking.is_empty())
    }

    /// The stage named `name`.
    #[must_use]
    pub fn stage_id(&self, name: &str) -> Option<StageId> {
        let index = self.stages.iter().position(|s| &*s.core.name == name)?;
        u16::try_from(index).ok().map(StageId)
    }

    /// Submits `msg`: its ingress record is journaled now, and it enters the entry stage once a
    /// [`sync`](Self::sync) has made that record durable (the engine acknowledges a submission
    /// only at its commit, and only then lets it in).
    pub fn submit(&mut self, msg: M) {
        let mut payload = Vec::new();
        let kind = self.books.codec.encode(&msg, &mut payload);
        let deadline = msg.ttl().map_or(Deadline::NEVER, |ttl| Deadline::at(self.clock.now_us(), ttl));
        let mut envelope = Envelope { key: msg.key(), seq: 0, cause: 0, attempt: 0, slot: 0, token: 0, deadline, msg };
        let record = Record { stream: envelope.key, kind, stage: STAGE_INGRESS, payload, ..Record::default() };
        // As the engine's journal does: the message's seq is its ingress record's id.
        let id = self.books.record(record);
        self.books.journal.last_mut().expect("just recorded").correlation = id;
        envelope.seq = id;
        envelope.cause = id;
        self.track(&mut envelope);
        self.pending.push(envelope);
    }

    /// Counts `envelope` as unfinished work of its message, as the engine's ingress does: in
    /// the slot its `seq` holds if it is in flight, otherwise in a new one.
    fn track(&mut self, envelope: &mut Envelope<M>) {
        let tracker = &self.books.tracker;
        let slot = match self.slots.get(&envelope.seq) {
            Some(&slot) if tracker.holds(slot, envelope.seq) => slot,
            _ => {
                let mut one = Vec::with_capacity(1);
                assert!(
                    tracker.try_acquire(1, &mut one),
                    "a simulation holds at most {} messages in flight",
                    crate::completion::ROOTS_MAX
                );
                self.slots.insert(envelope.seq, one[0]);
                one[0]
            }
        };
        envelope.slot = slot;
        envelope.token = self.books.tokens.next();
        tracker.register(slot, envelope.seq, envelope.token);
    }

    /// Makes the whole journal durable (a group commit: on a log, one append waited for) and
    /// lets the submissions it acknowledges into the entry stage; returns how many were
    /// acknowledged. Fails only on a log, when its commit does: nothing is acknowledged then.
    pub fn sync(&mut self) -> Result<usize, LogError> {
        if let Some(log) = &self.books.log {
            let records = self.books.journal[self.durable..].to_vec();
            if !records.is_empty() {
                log.append(records)?.wait()?;
            }
        }
        self.durable = self.books.journal.len();
        let now_us = self.clock.now_us();
        let acknowledged = self.pending.len();
        let entry = self.entry.index();
        self.stages[entry].queue.extend(self.pending.drain(..).map(|envelope| (envelope, now_us)));
        Ok(acknowledged)
    }

    /// Journals `record` as stage `stage`'s (its id, version and timestamp given here; durable
    /// at the next [`sync`](Self::sync)): a fact the application adds outside any handler, as a
    /// recovery does. Returns its id.
    pub fn record(&mut self, stage: StageId, record: Record) -> u64 {
        let stage = u16::try_from(stage.index()).unwrap_or(u16::MAX);
        self.books.record(Record { stage, ..record })
    }

    /// Puts `envelope` in `stage`'s queue, not journaled (a resumed step).
    pub fn inject(&mut self, stage: StageId, mut envelope: Envelope<M>) {
        self.track(&mut envelope);
        let now_us = self.clock.now_us();
        self.stages[stage.index()].queue.push_back((envelope, now_us));
    }

    /// Handles one event (or one due retry), or moves the clock to the next wake-up. False when
    /// nothing is left to do but messages waiting for a [`sync`](Self::sync).
    pub fn step(&mut self) -> bool {
        for stage in &mut self.stages {
            stage.core.release_due();
        }
        let mut ready = self.ready();
        if ready.is_empty() {
            let Some(next) = self.stages.iter().filter_map(|s| s.core.parking.next_due_us()).min() else {
                self.settle_all();
                return false;
            };
            self.clock.advance_to(next);
            for stage in &mut self.stages {
                stage.core.release_due();
            }
            ready = self.ready();
            if ready.is_empty() {
                return true;
            }
        }
        let (index, retry) = ready[self.rng.random_range(0..ready.len())];
        self.steps += 1;
        // Each step takes a little simulated time.
        if self.rng.random_ratio(1, 4) {
            self.clock.advance(std::time::Duration::from_millis(1));
        }
        self.books.stage = u16::try_from(index).unwrap_or(u16::MAX);
        let mut tally = BatchTally::default();
        let stage = &mut self.stages[index];
        let now_us = stage.core.begin_unit();
        let result = if retry {
            stage.core.retry_due(1, &mut tally, &mut self.books)
        } else {
            let (event, sent_us) = stage.queue.pop_front().expect("a ready stage has a queued event");
            let stage_deadline = match stage.core.config.ttl_ms {
                0 => Deadline::NEVER,
                ttl_ms => Deadline(sent_us.saturating_add(ttl_ms * 1_000)),
            };
            let expires = event.deadline.min(stage_deadline);
            stage.core.take(event, expires, &mut tally, &mut self.books)
        };
        match result {
            Ok(()) => {}
            Err(never) => match never {},
        }
        for (to, envelope) in self.books.outgoing.drain(..) {
            self.stages[to.index()].queue.push_back((envelope, now_us));
        }
        // A worker applies its updates once per unit, after its outboxes may have gone: the
        // events it sent on can finish downstream, and their updates be applied by another
        // worker, first. Holding each stage's updates back at random lets that happen here too.
        for stage in 0..self.stages.len() {
            if self.rng.random_ratio(1, 2) {
                self.settle(stage);
            }
        }
        true
    }

    /// Applies every stage's completion updates held back.
    fn settle_all(&mut self) {
        for stage in 0..self.stages.len() {
            self.settle(stage);
        }
    }

    /// Applies `stage`'s completion updates held back; the messages they finish are journaled
    /// after the records of their work, as a worker journals them after its unit's records.
    fn settle(&mut self, stage: usize) {
        let books = &mut self.books;
        #[cfg(test)]
        {
            books.applied += books.acks[stage].len();
        }
        books.tracker.apply(&mut books.acks[stage], &mut books.finished);
        for seq in &books.finished {
            self.slots.remove(seq);
        }
        if !books.finished.is_empty() {
            let record = completion_record(&books.finished);
            books.finished.clear();
            let stage = u16::try_from(stage).unwrap_or(u16::MAX);
            books.record(Record { stage, ..record });
        }
    }

    /// Stages with work now: `(index, true)` for a due retry, `(index, false)` for a queued event.
    fn ready(&self) -> Vec<(usize, bool)> {
        let mut ready = Vec::new();
        for (index, stage) in self.stages.iter().enumerate() {
            if stage.core.parking.has_due() {
                ready.push((index, true));
            }
            if !stage.queue.is_empty() {
                ready.push((index, false));
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryDeadLetters, Outcome};

    #[derive(Debug, Clone, Copy)]
    struct Job(u64);

    impl Message for Job {
        fn key(&self) -> u64 {
            self.0
        }
    }

    struct Codec;

    impl JournalCodec<Job> for Codec {
        fn encode(&self, msg: &Job, payload: &mut Vec<u8>) -> u16 {
            payload.extend_from_slice(&msg.0.to_le_bytes());
            1
        }

        fn decode(&self, _: u16, payload: &[u8]) -> Option<Job> {
            Some(Job(u64::from_le_bytes(payload.try_into().ok()?)))
        }
    }

    /// A stage that passes each event on touches no tracker word: the child carries on its
    /// parent's token. Through four stages each message costs the tracker one update, at its
    /// end, and still finishes exactly once.
    #[test]
    fn a_pass_through_chain_updates_the_tracker_once_per_message() {
        let mut topology = Topology::new();
        let stages: Vec<StageId> = (0..4).map(|n| topology.stage(&format!("s{n}"))).collect();
        topology.entry(stages[0]);
        for pair in stages.windows(2) {
            topology.link(pair[0], pair[1]);
            let next = pair[1];
            topology.handler(pair[0], move |_| {
                move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
                    out.emit(next, event.msg);
                    Outcome::Done
                }
            });
        }
        topology.handler(stages[3], |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Done);
        let config = EngineConfig::default();
        let mut sim =
            Simulation::new(topology, &config, Arc::new(MemoryDeadLetters::default()), Arc::new(Codec), &[], 7)
                .expect("a valid topology");
        for n in 0..100 {
            sim.submit(Job(n));
        }
        sim.sync().expect("a journal in memory syncs");
        while sim.step() {}
        assert!(sim.is_idle());
        assert_eq!((sim.completed(), sim.in_flight()), (100, 0));
        assert_eq!(sim.books.applied, 100, "one update per message, where its work ends");
    }

    /// A message fanned out in three is journaled finished only once all three of its events
    /// have reached the sink, whatever the order of the steps and of the updates' application
    /// (one of the three children carrying on its parent's token would let that child's end
    /// cancel it while the update holding its siblings' tokens waits: too soon).
    #[test]
    fn a_fanned_out_message_finishes_only_after_all_its_children() {
        use parking_lot::Mutex;
        use std::collections::HashMap;
        for seed in 0..50 {
            let arrived: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
            let mut topology = Topology::new();
            let (split, sink) = (topology.stage("split"), topology.stage("sink"));
            topology.entry(split).link(split, sink);
            topology.handler(split, move |_| {
                move |event: &Envelope<Job>, out: &mut Emitter<Job>| {
                    for n in 0..3 {
                        out.emit_keyed(sink, event.msg.0 * 3 + n, event.msg);
                    }
                    Outcome::Done
                }
            });
            let seen = Arc::clone(&arrived);
            topology.handler(sink, move |_| {
                let seen = Arc::clone(&seen);
                move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
                    *seen.lock().entry(event.seq).or_default() += 1;
                    Outcome::Done
                }
            });
            let config = EngineConfig::default();
            let mut sim =
                Simulation::new(topology, &config, Arc::new(MemoryDeadLetters::default()), Arc::new(Codec), &[], seed)
                    .expect("a valid topology");
            for n in 0..20 {
                sim.submit(Job(n));
            }
            sim.sync().expect("a journal in memory syncs");
            let mut checked = 0;
            loop {
                let more = sim.step();
                for record in &sim.journal()[checked..] {
                    if record.kind == crate::log::KIND_COMPLETED {
                        for seq in crate::log::completed_ids(&record.payload) {
                            let count = arrived.lock().get(&seq).copied().unwrap_or(0);
                            assert_eq!(count, 3, "seed {seed}: message {seq} finished with {count} of 3 arrived");
                        }
                    }
                }
                checked = sim.journal().len();
                if !more {
                    break;
                }
            }
            assert_eq!((sim.completed(), sim.in_flight()), (20, 0), "seed {seed}");
        }
    }
}
