//! Sagas: a distributed transaction as steps, each with an action and a compensation, that run in
//! parallel where they may and are undone in reverse when one fails.
//!
//! A [`Saga`] is the definition, checked once when it is built: steps, what each waits for,
//! and how each is undone. A [`SagaRun`] is one saga in progress: a deterministic state machine
//! told each step's outcome (in whatever order the steps finish) that answers with what to do
//! next ([`Command`]): start steps whose predecessors all succeeded, or, once a step has failed
//! and nothing is still running, compensate the steps that completed, one at a time, in reverse
//! order of completion. It does no I/O and keeps no clock: whoever runs the actions (a stage, a
//! test) reports the outcomes, timeouts included, so the same machine serves an orchestrator in
//! the engine and a property test.
//!
//! The rules:
//! - A step starts once every step it waits for has succeeded, and never after a failure.
//! - A step that fails (its retries spent) or times out stops the saga going forward. Steps
//!   still running are waited for; those that succeed are compensated too.
//! - A step that timed out may have taken effect (a charge whose answer was lost), so it is
//!   compensated like one that succeeded: compensations must be idempotent, and undoing what
//!   never happened must be a no-op on the other side's books.
//! - Compensations run one at a time, in reverse order of completion, each once.
//! - A step without a compensation is past the point of no return: it must wait, directly or
//!   not, for every step that has one, so that nothing which could still fail needs undoing once
//!   it runs. If such a step fails, the saga ends [`SagaEnd::Incomplete`]: nothing is undone,
//!   and whoever runs it dead-letters the saga with its story.
//!
//! In the engine, a [`SagaBook`] holds the runs in progress by key. The engine's links form a
//! directed acyclic graph (a cycle of bounded queues can deadlock under backpressure), so a saga
//! is not run by one stage that its steps answer: the stages that run the steps are laid out in
//! the saga's order, and whichever finishes a step reports it to the book, which answers with
//! what to do next ([`Turn`]): start the steps now ready, compensate, or finish. Workers of any
//! stage, in any number, may report steps of the same saga in any order. The reference order
//! application's orchestrated flow is the worked example.

mod book;

use std::collections::HashMap;
use std::time::Duration;

use thiserror::Error;

pub use book::{SagaBook, SagaReport, Turn};

/// A step as declared: its name, the steps it waits for, its compensation, its timeout and its
/// retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    name: String,
    after: Vec<String>,
    compensation: Option<String>,
    timeout: Option<Duration>,
    attempts: Option<u32>,
}

impl Step {
    /// A step named `name`, waiting for nothing but its group's predecessors, not undoable until
    /// given a compensation.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), after: Vec::new(), compensation: None, timeout: None, attempts: None }
    }

    /// Undone by the action named `compensation`.
    #[must_use]
    pub fn compensated_by(mut self, compensation: impl Into<String>) -> Self {
        self.compensation = Some(compensation.into());
        self
    }

    /// Waits for `step` too (besides the steps of the group before its own).
    #[must_use]
    pub fn after(mut self, step: impl Into<String>) -> Self {
        self.after.push(step.into());
        self
    }

    /// Fails if it has not finished within `timeout` of starting.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Tried at most `attempts` times (the first try and `attempts - 1` retries, with the
    /// backoff of the stage that runs it, and within that stage's own limit): a transient failure
    /// after the last fails the step, as a step that timed out (the failed tries may have taken
    /// effect), so that what it may have done is undone. Without it, the stage's limit alone.
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// Its name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A step of a built saga, by its position in the definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId(usize);

impl StepId {
    /// Its position among the saga's steps, in the order they were declared.
    #[must_use]
    pub fn index(self) -> usize {
        self.0
    }
}

/// Why a saga definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[allow(missing_docs)] // the fields name what the messages say: the saga, its steps, a group
pub enum SagaError {
    /// Nothing to run.
    #[error("saga {saga} has no steps")]
    NoSteps { saga: String },
    /// A group of no steps (a mistake, most likely an empty list).
    #[error("saga {saga}: group {group} has no steps (groups count from 1)")]
    EmptyGroup { saga: String, group: usize },
    /// Two steps of one name.
    #[error("saga {saga}: two steps are named {step}")]
    DuplicateStep { saga: String, step: String },
    /// A step waits for a step the saga does not have.
    #[error("saga {saga}: step {step} waits for {after}, which is not one of its steps")]
    UnknownStep { saga: String, step: String, after: String },
    /// Steps that wait for each other (or for steps that do): they could never start.
    #[error("saga {saga}: steps {} wait for each other in a cycle", steps.join(", "))]
    Cycle { saga: String, steps: Vec<String> },
    /// A step without a compensation that something undoable may fail after.
    #[error(
        "saga {saga}: step {step} has no compensation, but {other} (which has one) may still fail after {step} \
         starts; give {step} a compensation, or make it wait for {other}"
    )]
    MissingCompensation { saga: String, step: String, other: String },
    /// A timeout that fires at once.
    #[error("saga {saga}: step {step} has a zero timeout")]
    ZeroTimeout { saga: String, step: String },
    /// A step that may never be tried.
    #[error("saga {saga}: step {step} has zero attempts (at least 1: the first try)")]
    ZeroAttempts { saga: String, step: String },
}

/// A checked saga definition.
#[derive(Debug, Clone)]
pub struct Saga {
    name: String,
    steps: Vec<Step>,
    /// The steps each step waits for.
    after: Vec<Vec<StepId>>,
}

/// Builds a [`Saga`]; see [`Saga::builder`].
#[derive(Debug, Clone)]
pub struct SagaBuilder {
    name: String,
    steps: Vec<Step>,
    /// Steps of the last group, which the next group waits for.
    previous_group: Vec<String>,
    empty_group: Option<usize>,
    groups: usize,
}

impl Saga {
    /// A saga named `name`, to be given steps in groups (each group runs in parallel, after the
    /// group before it) or one by one with their own [`Step::after`] lists.
    ///
    /// ```
    /// use conduit::saga::{Saga, Step};
    /// let order = Saga::builder("order")
    ///     .group([Step::new("charge").compensated_by("refund"), Step::new("reserve").compensated_by("release")])
    ///     .group([Step::new("ship").compensated_by("cancel_shipment")])
    ///     .group([Step::new("notify")])
    ///     .build()
    ///     .expect("a valid saga");
    /// assert_eq!(order.steps().count(), 4);
    /// ```
    #[must_use]
    pub fn builder(name: impl Into<String>) -> SagaBuilder {
        SagaBuilder { name: name.into(), steps: Vec::new(), previous_group: Vec::new(), empty_group: None, groups: 0 }
    }

    /// The saga's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its steps, in the order they were declared.
    pub fn steps(&self) -> impl Iterator<Item = (StepId, &Step)> {
        self.steps.iter().enumerate().map(|(i, step)| (StepId(i), step))
    }

    /// The step named `name`.
    #[must_use]
    pub fn step(&self, name: &str) -> Option<StepId> {
        self.steps.iter().position(|s| s.name == name).map(StepId)
    }

    /// Step `id`'s name.
    #[must_use]
    pub fn name_of(&self, id: StepId) -> &str {
        &self.steps[id.0].name
    }

    /// Step `id`'s compensation, if it has one.
    #[must_use]
    pub fn compensation_of(&self, id: StepId) -> Option<&str> {
        self.steps[id.0].compensation.as_deref()
    }

    /// Step `id`'s timeout, if it has one.
    #[must_use]
    pub fn timeout_of(&self, id: StepId) -> Option<Duration> {
        self.steps[id.0].timeout
    }

    /// The steps `id` waits for.
    #[must_use]
    pub fn after_of(&self, id: StepId) -> &[StepId] {
        &self.after[id.0]
    }

    /// Step `id`'s most attempts, if its definition limits them ([`Step::attempts`]).
    #[must_use]
    pub fn attempts_of(&self, id: StepId) -> Option<u32> {
        self.steps[id.0].attempts
    }

    /// Whether step `id` may be tried again after its try number `attempt` (from 0, as
    /// [`Envelope::attempt`](crate::Envelope::attempt) counts) failed transiently: its retry
    /// policy has tries left. Whoever runs the step retries it if so, and otherwise reports it
    /// [`Outcome::TimedOut`] (or dead-letters its event, which the order application reports so).
    #[must_use]
    pub fn may_retry(&self, id: StepId, attempt: u32) -> bool {
        self.attempts_of(id).is_none_or(|most| attempt.saturating_add(1) < most)
    }
}

impl SagaBuilder {
    /// Steps that run in parallel, each after every step of the group before (if any).
    #[must_use]
    pub fn group(mut self, steps: impl IntoIterator<Item = Step>) -> Self {
        self.groups += 1;
        let mut names = Vec::new();
        for mut step in steps {
            step.after.extend(self.previous_group.iter().cloned());
            names.push(step.name.clone());
            self.steps.push(step);
        }
        if names.is_empty() {
            self.empty_group.get_or_insert(self.groups);
        }
        self.previous_group = names;
        self
    }

    /// One step that waits only for the steps its [`Step::after`] names; the next group still
    /// waits for the group before this step.
    #[must_use]
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Checks the definition: no empty group, unique names, known predecessors, no cycle, no zero
    /// timeout, and a compensation on every step that something which can still fail may follow.
    ///
    /// # Errors
    /// [`SagaError`], naming the saga and the step or group at fault.
    pub fn build(self) -> Result<Saga, SagaError> {
        let saga = self.name;
        if let Some(group) = self.empty_group {
            return Err(SagaError::EmptyGroup { saga, group });
        }
        if self.steps.is_empty() {
            return Err(SagaError::NoSteps { saga });
        }
        let mut index = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            if index.insert(step.name.as_str(), StepId(i)).is_some() {
                return Err(SagaError::DuplicateStep { saga, step: step.name.clone() });
            }
            if step.timeout.is_some_and(|t| t.is_zero()) {
                return Err(SagaError::ZeroTimeout { saga, step: step.name.clone() });
            }
            if step.attempts == Some(0) {
                return Err(SagaError::ZeroAttempts { saga, step: step.name.clone() });
            }
        }
        let mut after = Vec::with_capacity(self.steps.len());
        for step in &self.steps {
            let mut ids = Vec::new();
            for name in &step.after {
                let Some(&id) = index.get(name.as_str()) else {
                    return Err(SagaError::UnknownStep { saga, step: step.name.clone(), after: name.clone() });
                };
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            after.push(ids);
        }
        let ancestors = ancestors(&after).map_err(|cycle| SagaError::Cycle {
            saga: saga.clone(),
            steps: cycle.iter().map(|id| self.steps[id.0].name.clone()).collect(),
        })?;
        for (i, step) in self.steps.iter().enumerate() {
            if step.compensation.is_some() {
                continue;
            }
            let undoable_outside = self
                .steps
                .iter()
                .enumerate()
                .find(|&(j, other)| j != i && other.compensation.is_some() && !ancestors[i][j]);
            if let Some((_, other)) = undoable_outside {
                return Err(SagaError::MissingCompensation {
                    saga,
                    step: step.name.clone(),
                    other: other.name.clone(),
                });
            }
        }
        Ok(Saga { name: saga, steps: self.steps, after })
    }
}

/// For each step, which steps it waits for directly or not; or the steps left in (or behind) a
/// cycle, in declaration order.
fn ancestors(after: &[Vec<StepId>]) -> Result<Vec<Vec<bool>>, Vec<StepId>> {
    let n = after.len();
    // Kahn's algorithm: a topological order, or the steps it could not place.
    let mut waiting: Vec<usize> = after.iter().map(Vec::len).collect();
    let mut order = Vec::with_capacity(n);
    let mut ready: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    while let Some(i) = ready.pop() {
        order.push(i);
        for (j, deps) in after.iter().enumerate() {
            if deps.contains(&StepId(i)) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if order.len() < n {
        return Err((0..n).filter(|i| !order.contains(i)).map(StepId).collect());
    }
    let mut ancestors = vec![vec![false; n]; n];
    for &i in &order {
        for &StepId(d) in &after[i] {
            ancestors[i][d] = true;
            let inherited = ancestors[d].clone();
            for (k, &is) in inherited.iter().enumerate() {
                ancestors[i][k] |= is;
            }
        }
    }
    Ok(ancestors)
}

/// How a step's action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it was asked.
    Succeeded,
    /// Failed for good (its retries spent).
    Failed,
    /// No answer within its timeout: it may or may not have taken effect.
    TimedOut,
}

/// How a saga ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaEnd {
    /// Every step succeeded.
    Completed,
    /// A step failed; every step that had completed (or timed out) was compensated.
    Compensated,
    /// Steps past the point of no return (without compensations) failed: nothing was undone.
    Incomplete {
        /// The steps that failed or timed out.
        failed: Vec<StepId>,
    },
}

/// What the saga asks of whoever runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run this step's action.
    Start(StepId),
    /// Run this step's compensation, then report it with [`SagaRun::compensated`].
    Compensate(StepId),
    /// The saga is over.
    Finish(SagaEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Compensating,
    Compensated,
}

/// What happened to a saga, as it is recorded: replaying its facts in order
/// ([`SagaRun::resume`]) rebuilds the run, so a saga journaled fact by fact resumes after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// A step's action ended so.
    Finished(StepId, Outcome),
    /// A step's compensation ran.
    Compensated(StepId),
}

impl Fact {
    /// Bytes of an encoded fact.
    pub const ENCODED_LEN: usize = 4;

    /// The fact as journal bytes: its tag (1 finished, 2 compensated), the outcome's code (1
    /// succeeded, 2 failed, 3 timed out; 0 for a compensation) and the step's index (u16, LE).
    #[must_use]
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let (tag, outcome, step) = match *self {
            Self::Finished(step, outcome) => (1, outcome.code(), step),
            Self::Compensated(step) => (2, 0, step),
        };
        let [low, high] = u16::try_from(step.0).unwrap_or(u16::MAX).to_le_bytes();
        [tag, outcome, low, high]
    }

    /// Reads a fact of `saga` from its journal bytes: `None` for bytes no fact encodes to, or a
    /// step the saga does not have.
    #[must_use]
    pub fn decode(saga: &Saga, bytes: &[u8]) -> Option<Self> {
        let &[tag, outcome, low, high] = bytes else { return None };
        let step = usize::from(u16::from_le_bytes([low, high]));
        if step >= saga.steps.len() {
            return None;
        }
        match (tag, outcome) {
            (1, code) => Outcome::from_code(code).map(|outcome| Self::Finished(StepId(step), outcome)),
            (2, 0) => Some(Self::Compensated(StepId(step))),
            _ => None,
        }
    }
}

impl Outcome {
    fn code(self) -> u8 {
        match self {
            Self::Succeeded => 1,
            Self::Failed => 2,
            Self::TimedOut => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Succeeded),
            2 => Some(Self::Failed),
            3 => Some(Self::TimedOut),
            _ => None,
        }
    }
}

/// One saga in progress (see the module's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRun {
    states: Vec<State>,
    /// Steps that succeeded or timed out, in the order they were reported.
    completed: Vec<StepId>,
    /// Set once a step with a compensation failed or timed out: nothing starts after it.
    undoing: bool,
    end: Option<SagaEnd>,
}

impl SagaRun {
    /// Starts `saga`: the steps that wait for nothing.
    #[must_use]
    pub fn start(saga: &Saga) -> (Self, Vec<Command>) {
        let mut run =
            Self { states: vec![State::Waiting; saga.steps.len()], completed: Vec::new(), undoing: false, end: None };
        let mut commands = Vec::new();
        run.start_ready(saga, &mut commands);
        (run, commands)
    }

    /// Rebuilds a run of `saga` from its `facts` and says what it still owes
    /// ([`owed`](Self::owed)).
    ///
    /// Facts apply in the order they were recorded, except that one that does not fit yet (an
    /// outcome for a step not running, a compensation not under way) waits until the others
    /// make it fit: steps that run in parallel are reported by different threads, so a step
    /// their outcomes started may be recorded before the outcome that started it. A fact that
    /// never fits (its cause was lost in a crash, or it repeats one) changes nothing, as it
    /// would not have live.
    #[must_use]
    pub fn resume(saga: &Saga, facts: &[Fact]) -> (Self, Vec<Command>) {
        let (mut run, _) = Self::start(saga);
        let mut waiting: Vec<Fact> = facts.to_vec();
        loop {
            let before = waiting.len();
            waiting.retain(|&fact| !run.apply(saga, fact));
            if waiting.len() == before {
                break;
            }
        }
        let owed = run.owed();
        (run, owed)
    }

    /// Applies `fact` if it fits the run now; whether it did.
    fn apply(&mut self, saga: &Saga, fact: Fact) -> bool {
        match fact {
            Fact::Finished(step, outcome) if self.states.get(step.0) == Some(&State::Running) => {
                self.step_finished(saga, step, outcome);
                true
            }
            Fact::Compensated(step) if self.states.get(step.0) == Some(&State::Compensating) => {
                self.compensated(saga, step);
                true
            }
            _ => false,
        }
    }

    /// What was asked and is not yet answered: each step started and not finished (to start
    /// again: actions are idempotent), and the compensation under way (to run again). Nothing
    /// once the saga has ended.
    #[must_use]
    pub fn owed(&self) -> Vec<Command> {
        if self.end.is_some() {
            return Vec::new();
        }
        let owed = |(i, state): (usize, &State)| match state {
            State::Running => Some(Command::Start(StepId(i))),
            State::Compensating => Some(Command::Compensate(StepId(i))),
            _ => None,
        };
        self.states.iter().enumerate().filter_map(owed).collect()
    }

    /// How it ended, once it has.
    #[must_use]
    pub fn end(&self) -> Option<&SagaEnd> {
        self.end.as_ref()
    }

    /// The steps that succeeded or timed out, in the order they were reported.
    #[must_use]
    pub fn completed(&self) -> &[StepId] {
        &self.completed
    }

    /// The saga's story so far, for people (a dead letter of a saga that could not be undone
    /// carries it): each step and where it stands, in declaration order, then the order in
    /// which steps completed. For example `saga order: charge being compensated, reserve failed,
    /// ship not started; completed: charge`.
    #[must_use]
    pub fn story(&self, saga: &Saga) -> String {
        let steps: Vec<String> = self
            .states
            .iter()
            .zip(&saga.steps)
            .map(|(state, step)| {
                let state = match state {
                    State::Waiting => "not started",
                    State::Running => "running",
                    State::Succeeded => "succeeded",
                    State::Failed => "failed",
                    State::TimedOut => "timed out",
                    State::Compensating => "being compensated",
                    State::Compensated => "compensated",
                };
                format!("{} {state}", step.name)
            })
            .collect();
        let completed: Vec<&str> = self.completed.iter().map(|&step| saga.name_of(step)).collect();
        let completed = if completed.is_empty() { "none".to_owned() } else { completed.join(", ") };
        format!("saga {}: {}; completed: {completed}", saga.name, steps.join(", "))
    }

    /// The steps whose compensation has run, in the order they were declared.
    #[must_use]
    pub fn undone(&self) -> Vec<StepId> {
        let undone = |(i, state): (usize, &State)| (*state == State::Compensated).then_some(StepId(i));
        self.states.iter().enumerate().filter_map(undone).collect()
    }

    /// The steps whose action failed or timed out, in the order they were declared.
    #[must_use]
    pub fn failed(&self) -> Vec<StepId> {
        let failed =
            |(i, state): (usize, &State)| matches!(state, State::Failed | State::TimedOut).then_some(StepId(i));
        self.states.iter().enumerate().filter_map(failed).collect()
    }

    /// Step `step`'s action ended with `outcome`. An outcome for a step that is not running (a
    /// duplicate, say, after a redelivery) changes nothing.
    pub fn step_finished(&mut self, saga: &Saga, step: StepId, outcome: Outcome) -> Vec<Command> {
        let mut commands = Vec::new();
        if self.states.get(step.0) != Some(&State::Running) {
            return commands;
        }
        let undoable = saga.steps[step.0].compensation.is_some();
        self.states[step.0] = match outcome {
            Outcome::Succeeded => State::Succeeded,
            Outcome::Failed => State::Failed,
            Outcome::TimedOut => State::TimedOut,
        };
        if outcome != Outcome::Failed {
            self.completed.push(step);
        }
        if outcome != Outcome::Succeeded && undoable {
            self.undoing = true;
        }
        if !self.undoing {
            self.start_ready(saga, &mut commands);
        }
        self.settle(saga, &mut commands);
        commands
    }

    /// Step `step`'s compensation has run (a compensation that cannot succeed is retried, and
    /// dead-lettered by whoever runs it, never reported here).
    pub fn compensated(&mut self, saga: &Saga, step: StepId) -> Vec<Command> {
        let mut commands = Vec::new();
        if self.states.get(step.0) == Some(&State::Compensating) {
            self.states[step.0] = State::Compensated;
            self.settle(saga, &mut commands);
        }
        commands
    }

    fn start_ready(&mut self, saga: &Saga, commands: &mut Vec<Command>) {
        for (i, deps) in saga.after.iter().enumerate() {
            if self.states[i] == State::Waiting && deps.iter().all(|d| self.states[d.0] == State::Succeeded) {
                self.states[i] = State::Running;
                commands.push(Command::Start(StepId(i)));
            }
        }
    }

    /// Once nothing runs: the next compensation, or the end.
    fn settle(&mut self, saga: &Saga, commands: &mut Vec<Command>) {
        if self.end.is_some() || self.states.iter().any(|s| matches!(s, State::Running | State::Compensating)) {
            return;
        }
        let end = if self.undoing {
            let next = self.completed.iter().rev().copied().find(|s| {
                saga.steps[s.0].compensation.is_some() && matches!(self.states[s.0], State::Succeeded | State::TimedOut)
            });
            if let Some(step) = next {
                self.states[step.0] = State::Compensating;
                commands.push(Command::Compensate(step));
                return;
            }
            SagaEnd::Compensated
        } else {
            let failed: Vec<StepId> = (0..self.states.len())
                .filter(|&i| matches!(self.states[i], State::Failed | State::TimedOut))
                .map(StepId)
                .collect();
            if !failed.is_empty() {
                SagaEnd::Incomplete { failed }
            } else if self.states.iter().all(|s| *s == State::Succeeded) {
                SagaEnd::Completed
            } else {
                return;
            }
        };
        self.end = Some(end.clone());
        commands.push(Command::Finish(end));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn undoable(name: &str) -> Step {
        Step::new(name).compensated_by(format!("undo_{name}"))
    }

    #[test]
    fn bad_definitions_are_refused_by_name() {
        let refused = |builder: SagaBuilder| builder.build().expect_err("refused").to_string();
        let cycle = Saga::builder("s").step(undoable("a").after("b")).step(undoable("b").after("a"));
        assert_eq!(refused(cycle), "saga s: steps a, b wait for each other in a cycle");
        let empty = Saga::builder("s").group([undoable("a")]).group([]);
        assert_eq!(refused(empty), "saga s: group 2 has no steps (groups count from 1)");
        let missing = Saga::builder("s").group([Step::new("notify"), undoable("charge")]);
        let message = refused(missing);
        assert!(message.contains("step notify has no compensation, but charge"), "{message}");
        assert_eq!(refused(Saga::builder("s")), "saga s has no steps");
        let twice = Saga::builder("s").group([undoable("a"), undoable("a")]);
        assert_eq!(refused(twice), "saga s: two steps are named a");
        let unknown = Saga::builder("s").step(undoable("a").after("nope"));
        assert!(refused(unknown).contains("step a waits for nope, which is not one of its steps"));
        let zero = Saga::builder("s").step(undoable("a").timeout(Duration::ZERO));
        assert_eq!(refused(zero), "saga s: step a has a zero timeout");
        let never = Saga::builder("s").step(undoable("a").attempts(0));
        assert_eq!(refused(never), "saga s: step a has zero attempts (at least 1: the first try)");
        // The point of no return is fine once it follows every undoable step.
        let ok = Saga::builder("s").group([undoable("a"), undoable("b")]).group([Step::new("notify")]).build();
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn a_steps_retry_policy_says_when_to_give_up() {
        let saga =
            Saga::builder("s").group([undoable("once").attempts(1), undoable("thrice").attempts(3), undoable("free")]);
        let saga = saga.build().expect("valid");
        let id = |name| saga.step(name).expect("a step");
        assert!(!saga.may_retry(id("once"), 0), "one attempt: the first try is the last");
        assert_eq!((saga.may_retry(id("thrice"), 1), saga.may_retry(id("thrice"), 2)), (true, false));
        assert!(saga.may_retry(id("free"), 1_000), "no policy: the stage's limit alone");
        assert_eq!(saga.attempts_of(id("thrice")), Some(3));
    }

    /// Parallel steps are reported by different threads, whose records reach the journal in
    /// either order: a step recorded before the outcome that started it still counts.
    #[test]
    fn facts_recorded_out_of_causal_order_rebuild_the_run() {
        let saga = Saga::builder("order")
            .group([undoable("charge"), undoable("reserve")])
            .group([undoable("ship")])
            .build()
            .expect("valid");
        let id = |name| saga.step(name).expect("a step");
        let shipped = [
            Fact::Finished(id("reserve"), Outcome::Succeeded),
            Fact::Finished(id("ship"), Outcome::Succeeded),
            Fact::Finished(id("charge"), Outcome::Succeeded),
        ];
        let (run, owed) = SagaRun::resume(&saga, &shipped);
        assert_eq!((run.end(), owed), (Some(&SagaEnd::Completed), vec![]));
        let undone = [
            Fact::Compensated(id("charge")),
            Fact::Finished(id("charge"), Outcome::Succeeded),
            Fact::Finished(id("reserve"), Outcome::Failed),
        ];
        let (run, owed) = SagaRun::resume(&saga, &undone);
        assert_eq!((run.end(), owed), (Some(&SagaEnd::Compensated), vec![]));
        // A fact whose cause never made it (a crash) changes nothing: the step runs again.
        let (run, owed) = SagaRun::resume(&saga, &shipped[..2]);
        assert_eq!((run.end(), owed), (None, vec![Command::Start(id("charge"))]));
    }

    #[test]
    fn the_order_saga_charges_and_reserves_in_parallel_then_ships() {
        let saga = Saga::builder("order")
            .group([undoable("charge"), undoable("reserve")])
            .group([undoable("ship")])
            .group([Step::new("notify")])
            .build()
            .expect("valid");
        let id = |name| saga.step(name).expect("a step");
        let (mut run, commands) = SagaRun::start(&saga);
        assert_eq!(commands, [Command::Start(id("charge")), Command::Start(id("reserve"))]);
        assert!(run.step_finished(&saga, id("reserve"), Outcome::Succeeded).is_empty(), "ship waits for both");
        assert_eq!(run.step_finished(&saga, id("charge"), Outcome::Succeeded), [Command::Start(id("ship"))]);
        // Shipping fails: reserve and charge are undone, the last completed first.
        assert_eq!(run.step_finished(&saga, id("ship"), Outcome::Failed), [Command::Compensate(id("charge"))]);
        // A crash here: resumed from its facts, the saga owes the compensation under way.
        let facts = [
            Fact::Finished(id("reserve"), Outcome::Succeeded),
            Fact::Finished(id("charge"), Outcome::Succeeded),
            Fact::Finished(id("ship"), Outcome::Failed),
        ];
        assert_eq!(SagaRun::resume(&saga, &facts), (run.clone(), vec![Command::Compensate(id("charge"))]));
        assert_eq!(run.compensated(&saga, id("charge")), [Command::Compensate(id("reserve"))]);
        assert_eq!(run.compensated(&saga, id("reserve")), [Command::Finish(SagaEnd::Compensated)]);
    }

    /// A saga of `groups` (each a count of undoable steps) and a last group of steps without
    /// compensations.
    fn saga_of(groups: &[usize], finals: usize) -> Saga {
        let mut builder = Saga::builder("generated");
        let mut n = 0;
        for &size in groups {
            builder = builder.group((0..size).map(|_| {
                n += 1;
                undoable(&format!("s{n}"))
            }));
        }
        if finals > 0 {
            builder = builder.group((0..finals).map(|i| Step::new(format!("final{i}"))));
        }
        builder.build().expect("generated sagas are valid")
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![6 => Just(Outcome::Succeeded), 2 => Just(Outcome::Failed), 1 => Just(Outcome::TimedOut)]
    }

    proptest! {
        /// Any outcomes, delivered in any order the running steps allow: the saga ends; without
        /// a failure of an undoable step every step ran once after its predecessors and nothing
        /// was undone; with one, the compensations are exactly the undoable steps that succeeded
        /// or timed out (including those that finished after the failure), in reverse order of
        /// completion, each once, none while a step still ran, and nothing started after it.
        #[test]
        fn compensations_are_exactly_the_completed_steps_in_reverse(
            groups in prop::collection::vec(1usize..=3, 1..=4),
            finals in 0usize..=2,
            outcomes in prop::collection::vec(outcome(), 16),
            picks in prop::collection::vec(any::<u16>(), 64),
        ) {
            let saga = saga_of(&groups, finals);
            let (mut run, mut pending) = SagaRun::start(&saga);
            let mut running: Vec<StepId> = Vec::new();
            let mut started = Vec::new();
            let mut delivered: Vec<(StepId, Outcome)> = Vec::new();
            let mut compensations = Vec::new();
            let mut end = None;
            let mut picks = picks.into_iter().cycle();
            let mut failed_undoable = false;
            let mut facts = Vec::new();
            loop {
                while let Some(command) = (!pending.is_empty()).then(|| pending.remove(0)) {
                    match command {
                        Command::Start(step) => {
                            prop_assert!(!failed_undoable, "{step:?} started after a failure");
                            prop_assert!(!started.contains(&step), "{step:?} started twice");
                            for dep in saga.after_of(step) {
                                prop_assert!(
                                    delivered.contains(&(*dep, Outcome::Succeeded)),
                                    "{step:?} started before {dep:?} succeeded"
                                );
                            }
                            started.push(step);
                            running.push(step);
                        }
                        Command::Compensate(step) => {
                            prop_assert!(running.is_empty(), "compensating while {running:?} run");
                            compensations.push(step);
                            facts.push(Fact::Compensated(step));
                            pending.extend(run.compensated(&saga, step));
                        }
                        Command::Finish(how) => {
                            prop_assert!(end.is_none(), "finished twice");
                            end = Some(how);
                        }
                    }
                }
                // Resumed from what was recorded so far, the run is the live one and owes the
                // steps still running.
                let (resumed, owed) = SagaRun::resume(&saga, &facts);
                prop_assert_eq!(&resumed, &run);
                let mut starts: Vec<Command> = running.iter().map(|&s| Command::Start(s)).collect();
                starts.sort_by_key(|c| match c { Command::Start(s) => *s, _ => unreachable!() });
                prop_assert_eq!(owed, starts);
                if running.is_empty() {
                    break;
                }
                let step = running.remove(usize::from(picks.next().expect("cycled")) % running.len());
                let outcome = outcomes[step.index() % outcomes.len()];
                if outcome != Outcome::Succeeded && saga.compensation_of(step).is_some() {
                    failed_undoable = true;
                }
                delivered.push((step, outcome));
                facts.push(Fact::Finished(step, outcome));
                pending.extend(run.step_finished(&saga, step, outcome));
                // A duplicate report changes nothing.
                prop_assert!(run.step_finished(&saga, step, outcome).is_empty());
            }
            let end = end.expect("the saga ended");
            prop_assert_eq!(Some(&end), run.end());
            if failed_undoable {
                let expected: Vec<StepId> = delivered
                    .iter()
                    .filter(|(s, o)| *o != Outcome::Failed && saga.compensation_of(*s).is_some())
                    .map(|(s, _)| *s)
                    .rev()
                    .collect();
                prop_assert_eq!(end, SagaEnd::Compensated);
                prop_assert_eq!(compensations, expected);
            } else {
                prop_assert!(compensations.is_empty());
                prop_assert_eq!(started.len(), saga.steps().count(), "every step ran");
                let mut failed: Vec<StepId> =
                    delivered.iter().filter(|(_, o)| *o != Outcome::Succeeded).map(|(s, _)| *s).collect();
                failed.sort();
                if failed.is_empty() {
                    prop_assert_eq!(end, SagaEnd::Completed);
                } else {
                    prop_assert_eq!(end, SagaEnd::Incomplete { failed });
                }
            }
        }
    }
}
