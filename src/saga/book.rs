//! The sagas in progress of one definition, by key, shared by the stages that run their steps.
//!
//! The engine's links form a directed acyclic graph (a cycle of bounded queues can deadlock
//! under backpressure), so a saga is not run by one orchestrating stage that its steps answer:
//! the stages that run the steps are laid out in the saga's order, and whichever stage finishes a
//! step tells the [`SagaBook`], which answers with what to do next ([`Command`]): start the steps
//! now ready, compensate, or finish. The book is the orchestrator's state: one [`SagaRun`] per
//! saga in progress, in shards behind short locks, so workers of any stage (and any number of
//! them, as pools grow and shrink) may report steps of the same saga in any order.
//!
//! Memory is one entry per saga in progress: a saga leaves the book when it ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::{Command, Fact, Outcome, Saga, SagaEnd, SagaRun, StepId};
use crate::metrics::{new_growing_histogram, LatencySummary, LATENCY_NS_MAX};

/// Shards of a book (a power of two).
const SHARDS: usize = 64;

/// One saga in progress and when it started.
#[derive(Debug)]
struct Entry {
    run: SagaRun,
    started: Instant,
}

/// What a report to the book asks for next.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Turn {
    /// What to do now, in order.
    pub commands: Vec<Command>,
    /// When this report ended the saga: the steps that failed or timed out (none if it completed).
    pub failed: Vec<StepId>,
}

impl Turn {
    /// How the saga ended, if this report ended it.
    #[must_use]
    pub fn end(&self) -> Option<&SagaEnd> {
        self.commands.iter().find_map(|command| match command {
            Command::Finish(end) => Some(end),
            _ => None,
        })
    }
}

/// The sagas of one definition in progress, by key: the orchestrator's state for stages laid out
/// in the saga's order (see [`crate::saga`]). One entry per saga in progress; it leaves when it ends.
pub struct SagaBook {
    saga: Saga,
    shards: Box<[Mutex<FxHashMap<u64, Entry>>]>,
    started: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    incomplete: AtomicU64,
    /// Compensations run, by step.
    compensations: Box<[AtomicU64]>,
    /// Started to ended, in ns.
    end_to_end: Mutex<Histogram<u64>>,
}

impl std::fmt::Debug for SagaBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaBook")
            .field("saga", &self.saga.name())
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

/// A book's counts: how its sagas ended, and how long they took.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SagaReport {
    /// Sagas started.
    pub started: u64,
    /// Sagas whose every step succeeded.
    pub completed: u64,
    /// Sagas undone: a step failed and every completed step was compensated.
    pub compensated: u64,
    /// Sagas that failed past the point of no return (nothing undone).
    pub incomplete: u64,
    /// Sagas still in progress.
    pub running: u64,
    /// Compensations run, by the name of the step undone.
    pub compensations: BTreeMap<String, u64>,
    /// Started to ended, in microseconds.
    pub end_to_end_us: LatencySummary,
}

impl SagaBook {
    /// An empty book for `saga`.
    #[must_use]
    pub fn new(saga: Saga) -> Self {
        let steps = saga.steps().count();
        Self {
            saga,
            shards: (0..SHARDS).map(|_| Mutex::new(FxHashMap::default())).collect(),
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            compensated: AtomicU64::new(0),
            incomplete: AtomicU64::new(0),
            compensations: (0..steps).map(|_| AtomicU64::new(0)).collect(),
            end_to_end: Mutex::new(new_growing_histogram()),
        }
    }

    /// The definition.
    #[must_use]
    pub fn saga(&self) -> &Saga {
        &self.saga
    }

    fn shard(&self, key: u64) -> &Mutex<FxHashMap<u64, Entry>> {
        // Keys that agree on low bits still spread.
        let z = crate::completion::avalanche(key);
        &self.shards[usize::try_from(z % SHARDS as u64).unwrap_or(0)]
    }

    /// Starts the saga of `key`: the steps that wait for nothing. A key whose saga is already in
    /// progress (a redelivered start) gets what that saga still owes instead.
    pub fn start(&self, key: u64) -> Turn {
        let mut shard = self.shard(key).lock();
        if let Some(entry) = shard.get(&key) {
            return Turn { commands: entry.run.owed(), failed: Vec::new() };
        }
        let (run, commands) = SagaRun::start(&self.saga);
        self.started.fetch_add(1, Ordering::Relaxed);
        shard.insert(key, Entry { run, started: Instant::now() });
        Turn { commands, failed: Vec::new() }
    }

    /// Step `step` of `key`'s saga ended with `outcome`. A key with no saga in progress, or a
    /// step not running (a duplicate report), gets nothing to do.
    pub fn finished(&self, key: u64, step: StepId, outcome: Outcome) -> Turn {
        self.report(key, |run, saga| run.step_finished(saga, step, outcome))
    }

    /// Step `step`'s compensation has run for `key`'s saga.
    pub fn compensated(&self, key: u64, step: StepId) -> Turn {
        let turn = self.report(key, |run, saga| run.compensated(saga, step));
        // A compensation reported while one was under way always leads somewhere (the next
        // one, or the end); a duplicate report leads nowhere and is not counted.
        if !turn.commands.is_empty() {
            if let Some(count) = self.compensations.get(step.index()) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        turn
    }

    /// Rebuilds `key`'s saga from its recorded `facts` (after a crash) and returns what it still
    /// owes; a saga that the facts end is counted and leaves the book.
    pub fn resume(&self, key: u64, facts: &[Fact]) -> Turn {
        let (run, commands) = SagaRun::resume(&self.saga, facts);
        if let Some(end) = run.end() {
            let end = end.clone();
            let failed = run.failed();
            self.started.fetch_add(1, Ordering::Relaxed);
            self.count_end(&end, Duration::ZERO);
            return Turn { commands: vec![Command::Finish(end)], failed };
        }
        let mut shard = self.shard(key).lock();
        if !shard.contains_key(&key) {
            self.started.fetch_add(1, Ordering::Relaxed);
        }
        shard.insert(key, Entry { run, started: Instant::now() });
        Turn { commands, failed: Vec::new() }
    }

    /// What `key`'s saga still owes: the steps started and not finished, the compensation under
    /// way. Nothing if it is not in progress.
    #[must_use]
    pub fn owed(&self, key: u64) -> Vec<Command> {
        self.shard(key).lock().get(&key).map(|entry| entry.run.owed()).unwrap_or_default()
    }

    /// The story of `key`'s saga if it is in progress ([`SagaRun::story`]).
    #[must_use]
    pub fn story(&self, key: u64) -> Option<String> {
        self.shard(key).lock().get(&key).map(|entry| entry.run.story(&self.saga))
    }

    fn report(&self, key: u64, change: impl FnOnce(&mut SagaRun, &Saga) -> Vec<Command>) -> Turn {
        let mut shard = self.shard(key).lock();
        let Some(entry) = shard.get_mut(&key) else { return Turn::default() };
        let commands = change(&mut entry.run, &self.saga);
        let Some(end) = entry.run.end().cloned() else { return Turn { commands, failed: Vec::new() } };
        let Some(entry) = shard.remove(&key) else { return Turn { commands, failed: Vec::new() } };
        drop(shard);
        self.count_end(&end, entry.started.elapsed());
        Turn { commands, failed: entry.run.failed() }
    }

    fn count_end(&self, end: &SagaEnd, took: Duration) {
        let counter = match end {
            SagaEnd::Completed => &self.completed,
            SagaEnd::Compensated => &self.compensated,
            SagaEnd::Incomplete { .. } => &self.incomplete,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).clamp(1, LATENCY_NS_MAX);
        crate::metrics::record_growing(&mut self.end_to_end.lock(), ns);
    }

    /// Sagas in progress.
    #[must_use]
    pub fn running(&self) -> u64 {
        self.shards.iter().map(|shard| shard.lock().len() as u64).sum()
    }

    /// Keys of the sagas in progress for longer than `age`, oldest first.
    #[must_use]
    pub fn stuck(&self, age: Duration) -> Vec<u64> {
        let mut stuck: Vec<(Instant, u64)> = Vec::new();
        for shard in &*self.shards {
            let shard = shard.lock();
            stuck.extend(shard.iter().filter(|(_, e)| e.started.elapsed() > age).map(|(&key, e)| (e.started, key)));
        }
        stuck.sort_unstable();
        stuck.into_iter().map(|(_, key)| key).collect()
    }

    /// The counts now.
    #[must_use]
    pub fn report_now(&self) -> SagaReport {
        let compensations = self
            .saga
            .steps()
            .filter(|(id, _)| self.saga.compensation_of(*id).is_some())
            .map(|(id, step)| {
                let count = self.compensations.get(id.index()).map_or(0, |c| c.load(Ordering::Relaxed));
                (step.name().to_owned(), count)
            })
            .collect();
        SagaReport {
            started: self.started.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            compensated: self.compensated.load(Ordering::Relaxed),
            incomplete: self.incomplete.load(Ordering::Relaxed),
            running: self.running(),
            compensations,
            end_to_end_us: LatencySummary::from_histogram(&self.end_to_end.lock()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::saga::Step;

    fn order_saga() -> Saga {
        Saga::builder("order")
            .group([Step::new("charge").compensated_by("refund"), Step::new("reserve").compensated_by("release")])
            .group([Step::new("ship").compensated_by("cancel")])
            .build()
            .expect("valid")
    }

    #[test]
    fn a_saga_runs_through_the_book_and_leaves_it() {
        let book = SagaBook::new(order_saga());
        let id = |name| book.saga().step(name).expect("a step");
        let (charge, reserve, ship) = (id("charge"), id("reserve"), id("ship"));
        assert_eq!(book.start(7).commands, [Command::Start(charge), Command::Start(reserve)]);
        assert_eq!(book.start(7).commands, [Command::Start(charge), Command::Start(reserve)], "a redelivered start");
        assert!(book.finished(7, reserve, Outcome::Succeeded).commands.is_empty());
        assert_eq!(book.finished(7, charge, Outcome::Succeeded).commands, [Command::Start(ship)]);
        let turn = book.finished(7, ship, Outcome::Failed);
        assert_eq!(turn.commands, [Command::Compensate(charge)]);
        assert_eq!(book.owed(7), [Command::Compensate(charge)]);
        assert_eq!(
            book.story(7).as_deref(),
            Some("saga order: charge being compensated, reserve succeeded, ship failed; completed: reserve, charge")
        );
        assert_eq!(book.compensated(7, charge).commands, [Command::Compensate(reserve)]);
        let turn = book.compensated(7, reserve);
        assert_eq!(turn.end(), Some(&SagaEnd::Compensated));
        assert_eq!(turn.failed, [ship]);
        assert_eq!(book.running(), 0, "an ended saga leaves the book");
        assert_eq!(book.story(7), None);
        assert!(book.finished(7, ship, Outcome::Succeeded).commands.is_empty(), "a late report changes nothing");
        assert!(book.compensated(7, charge).commands.is_empty(), "so does a repeated compensation");
        let report = book.report_now();
        assert_eq!((report.started, report.compensated, report.completed, report.running), (1, 1, 0, 0));
        assert_eq!(report.compensations.get("charge"), Some(&1));
        assert_eq!(report.compensations.get("ship"), Some(&0));
        assert_eq!(report.end_to_end_us.count, 1);
    }

    #[test]
    fn steps_reported_from_many_threads_end_each_saga_once() {
        let book = Arc::new(SagaBook::new(order_saga()));
        let id = |name| book.saga().step(name).expect("a step");
        let (charge, reserve, ship) = (id("charge"), id("reserve"), id("ship"));
        let sagas = 20_000u64;
        for key in 0..sagas {
            book.start(key);
        }
        // Two threads report the two parallel steps of every saga; whoever finishes second
        // starts shipping, which a third thread runs: it fails for every third key.
        let (ships, to_ship) = crossbeam_channel::unbounded();
        let threads: Vec<_> = [charge, reserve]
            .into_iter()
            .map(|step| {
                let (book, ships) = (Arc::clone(&book), ships.clone());
                std::thread::spawn(move || {
                    for key in 0..sagas {
                        for command in book.finished(key, step, Outcome::Succeeded).commands {
                            ships.send((key, command)).expect("the shipper listens");
                        }
                    }
                })
            })
            .collect();
        drop(ships);
        let shipper = {
            let book = Arc::clone(&book);
            std::thread::spawn(move || {
                let mut compensations = 0;
                for (key, command) in to_ship {
                    assert_eq!(command, Command::Start(ship), "only shipping is started");
                    let outcome = if key % 3 == 0 { Outcome::Failed } else { Outcome::Succeeded };
                    let mut pending = book.finished(key, ship, outcome).commands;
                    while let Some(command) = pending.pop() {
                        if let Command::Compensate(step) = command {
                            compensations += 1;
                            pending.extend(book.compensated(key, step).commands);
                        }
                    }
                }
                compensations
            })
        };
        for thread in threads {
            thread.join().expect("a reporter");
        }
        let compensations = shipper.join().expect("the shipper");
        let report = book.report_now();
        let failed = sagas.div_ceil(3);
        assert_eq!(report.completed, sagas - failed);
        assert_eq!(report.compensated, failed);
        assert_eq!(compensations, 2 * failed, "charge and reserve undone once each");
        assert_eq!(report.compensations.get("charge"), Some(&failed));
        assert_eq!(report.compensations.get("reserve"), Some(&failed));
        assert_eq!(book.running(), 0);
    }

    #[test]
    fn facts_round_trip_and_nonsense_is_refused() {
        let saga = order_saga();
        let ship = saga.step("ship").expect("a step");
        for fact in [
            Fact::Finished(ship, Outcome::Succeeded),
            Fact::Finished(ship, Outcome::Failed),
            Fact::Finished(ship, Outcome::TimedOut),
            Fact::Compensated(ship),
        ] {
            assert_eq!(Fact::decode(&saga, &fact.encode()), Some(fact));
        }
        for bytes in [&[1, 1, 3, 0][..], &[1, 4, 0, 0], &[2, 1, 0, 0], &[3, 0, 0, 0], &[1, 1, 0], &[]] {
            assert_eq!(Fact::decode(&saga, bytes), None, "{bytes:?}");
        }
    }

    #[test]
    fn a_resumed_saga_owes_what_its_facts_leave_open() {
        let book = SagaBook::new(order_saga());
        let id = |name| book.saga().step(name).expect("a step");
        let facts = [Fact::Finished(id("charge"), Outcome::Succeeded)];
        assert_eq!(book.resume(3, &facts).commands, [Command::Start(id("reserve"))]);
        assert_eq!(book.finished(3, id("reserve"), Outcome::Succeeded).commands, [Command::Start(id("ship"))]);
        let over = [Fact::Finished(id("charge"), Outcome::Failed), Fact::Finished(id("reserve"), Outcome::Failed)];
        let turn = book.resume(4, &over);
        assert_eq!(turn.end(), Some(&SagaEnd::Compensated));
        assert_eq!(book.running(), 1, "saga 4 ended in its facts; saga 3 runs");
    }
}
