//! One event through a stage: admission (expiry, keyed parking), the handler, the decision core,
//! and the disposition applied. The threaded worker and the deterministic simulation both run
//! events through a [`StageCore`]; only where results go (queues, journal, dead-letter sink)
//! differs, behind [`Effects`].

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::clock::Clock;
use crate::completion::Acks;
use crate::config::StageConfig;
use crate::dead_letter::{DeadLetter, DeadLetterKind, Failures};
use crate::metrics::BatchTally;
use crate::stage::decision::{decide, Disposition, Ending};
use crate::stage::parking::{Due, Parking};
use crate::stage::{Deadline, Emitter, Envelope, Handler, Outcome, Reason};

/// Where a stage's results go: the worker's outboxes and journal, or the simulation's queues
/// and in-memory journal.
pub(crate) trait Effects<M> {
    /// Why results could not go on (the worker stops; the simulation never fails).
    type Stop;

    /// `event` was handled: journal what the handler recorded and send what it emitted (both
    /// drained from `emitter`); returns the id the emitted events carry as their cause.
    fn forward(&mut self, event: &Envelope<M>, emitter: &mut Emitter<M>) -> Result<u64, Self::Stop>;

    /// Journals and hands over a dead letter.
    fn dead_letter(&mut self, letter: DeadLetter<M>);

    /// Where this unit's completion updates collect.
    fn acks(&mut self) -> &mut Acks;
}

/// A stage's handler with the state that decides for its events: one per worker thread, or one
/// per stage in the simulation.
pub(crate) struct StageCore<M, H> {
    pub(crate) name: Arc<str>,
    pub(crate) config: StageConfig,
    handler: H,
    pub(crate) emitter: Emitter<M>,
    pub(crate) parking: Parking<M>,
    clock: Arc<dyn Clock>,
    rng: SmallRng,
    /// The clock read once per unit of work (for expiry and backoff).
    now_us: u64,
    /// The wall clock read once per unit of work (for failure times).
    wall_us: u64,
    /// Scratch: events that expired behind a parked head.
    expired: Vec<Envelope<M>>,
}

impl<M: crate::Message, H: Handler<M>> StageCore<M, H> {
    /// A core for stage `name`; `seed` seeds its jitter.
    pub(crate) fn new(
        name: Arc<str>,
        config: StageConfig,
        handler: H,
        mut emitter: Emitter<M>,
        clock: Arc<dyn Clock>,
        seed: u64,
    ) -> Self {
        let now_us = clock.now_us();
        let wall_us = clock.wall_us();
        emitter.clock = Some(Arc::clone(&clock));
        Self {
            name,
            config,
            handler,
            emitter,
            parking: Parking::new(now_us),
            clock,
            rng: SmallRng::seed_from_u64(seed),
            now_us,
            wall_us,
            expired: Vec::new(),
        }
    }

    /// Reads the clocks for a unit of work; returns the monotonic reading.
    pub(crate) fn begin_unit(&mut self) -> u64 {
        self.now_us = self.clock.now_us();
        self.wall_us = self.clock.wall_us();
        self.now_us
    }

    /// The wall clock as read for this unit of work.
    pub(crate) fn wall_us(&self) -> u64 {
        self.wall_us
    }

    /// A fresh monotonic reading.
    pub(crate) fn now_us(&self) -> u64 {
        self.clock.now_us()
    }

    /// Handles an event from the queue, unless it has expired (then it is dead-lettered at
    /// once) or its key is parked (then it waits behind). `expires` is its deadline in this
    /// stage: its own, or the stage's TTL if that comes first.
    pub(crate) fn take<E: Effects<M>>(
        &mut self,
        event: Envelope<M>,
        expires: Deadline,
        tally: &mut BatchTally,
        fx: &mut E,
    ) -> Result<(), E::Stop> {
        // A fresh reading for events that can expire: a batch's later events may have waited
        // behind a slow handler since the batch started.
        if expires != Deadline::NEVER && expires.passed(self.clock.now_us()) {
            self.expire(event, Failures::default(), tally, fx);
            return Ok(());
        }
        if self.parking.holds(event.key) {
            self.parking.wait_behind(event, expires);
            return Ok(());
        }
        if let Some((event, delay_ms)) = self.handle(event, tally, fx)? {
            let now_us = self.clock.now_us();
            self.parking.park(event, expires, delay_ms, now_us);
        }
        Ok(())
    }

    /// Tries the heads of up to `max` due keys again.
    pub(crate) fn retry_due<E: Effects<M>>(
        &mut self,
        max: usize,
        tally: &mut BatchTally,
        fx: &mut E,
    ) -> Result<(), E::Stop> {
        for _ in 0..max {
            let Some((key, due)) = self.parking.next_retry(self.now_us, &mut self.expired) else { break };
            let mut behind = std::mem::take(&mut self.expired);
            for event in behind.drain(..) {
                self.expire(event, Failures::default(), tally, fx);
            }
            self.expired = behind;
            match due {
                Due::Nothing => {}
                Due::Expired(event, failures) => self.expire(event, failures, tally, fx),
                Due::Retry(event, expires) => {
                    let again = self.handle(event, tally, fx)?;
                    let now_us = self.clock.now_us();
                    self.parking.settle(key, again.map(|(event, delay_ms)| (event, expires, delay_ms)), now_us);
                }
            }
        }
        Ok(())
    }

    /// Moves keys whose backoff has passed into line.
    pub(crate) fn release_due(&mut self) {
        if self.parking.is_waiting() {
            let now_us = self.clock.now_us();
            self.parking.release_due(now_us);
        }
    }

    /// Dead-letters an event that outlived its deadline, with the failures it met before.
    fn expire<E: Effects<M>>(&mut self, event: Envelope<M>, failures: Failures, tally: &mut BatchTally, fx: &mut E) {
        tally.processed += 1;
        tally.expired += 1;
        tally.dead_lettered += 1;
        let letter = self.letter(event, DeadLetterKind::Expired, failures, "its time to live ran out".into());
        bury(letter, fx);
    }

    /// Runs the handler on `event` and applies the decision; returns the event and its delay if
    /// it is to be tried again.
    fn handle<E: Effects<M>>(
        &mut self,
        mut event: Envelope<M>,
        tally: &mut BatchTally,
        fx: &mut E,
    ) -> Result<Option<(Envelope<M>, u64)>, E::Stop> {
        // Inside the worker's `batch` span, which names the stage.
        let _event = tracing::trace_span!("event", key = event.key, seq = event.seq, attempt = event.attempt).entered();
        self.emitter.begin(&event);
        let (handler, emitter) = (&mut self.handler, &mut self.emitter);
        let mut panicked = false;
        let outcome = match catch_unwind(AssertUnwindSafe(|| handler.handle(&event, emitter))) {
            Ok(outcome) => outcome,
            Err(payload) => {
                tally.panics += 1;
                panicked = true;
                Outcome::Retry(panic_reason(payload.as_ref()))
            }
        };
        let counted = match &outcome {
            Outcome::Retry(_) | Outcome::Conflict(_) => Some(&mut tally.retried),
            Outcome::Defer(_) => Some(&mut tally.deferred),
            Outcome::Reject(_) | Outcome::Malformed(_) => Some(&mut tally.rejected),
            Outcome::Done => None,
        };
        let misuse = self.emitter.misuse.take();
        if misuse.is_none() {
            if let Some(counter) = counted {
                *counter += 1;
            }
        }
        if misuse.is_none() && outcome == Outcome::Done {
            // The common case, as `decide` has it (checked in debug builds), without building its
            // inputs: a handled event goes on, and the failures it met are forgotten.
            debug_assert_eq!(
                decide(
                    Ending { outcome: Outcome::Done, panicked, misuse: None },
                    &mut event.attempt.clone(),
                    &mut Failures::default(),
                    &self.config,
                    &mut self.rng.clone(),
                    self.wall_us
                ),
                Disposition::Forward
            );
            self.parking.forget_failures(event.key);
            self.forward(&event, tally, fx)?;
            return Ok(None);
        }
        // The failures so far leave parking while the decision is made; only a retry keeps them.
        let mut failures = self.parking.take_failures(event.key);
        let ending = Ending { outcome, panicked, misuse };
        match decide(ending, &mut event.attempt, &mut failures, &self.config, &mut self.rng, self.wall_us) {
            Disposition::Forward => {
                self.forward(&event, tally, fx)?;
                Ok(None)
            }
            Disposition::Retry { delay_ms } => {
                self.emitter.clear();
                if failures != Failures::default() {
                    self.parking.keep_failures(event.key, failures);
                }
                Ok(Some((event, delay_ms)))
            }
            Disposition::DeadLetter { kind, reason } => {
                self.emitter.clear();
                tally.processed += 1;
                tally.dead_lettered += 1;
                let letter = self.letter(event, kind, failures, reason);
                bury(letter, fx);
                Ok(None)
            }
        }
    }

    /// Sends on what the handler of `event` emitted and recorded; dead-letters what it published
    /// to no queue (when the topology says so).
    // Once per handled event: inlined, the worker's hot path costs what it did before the decision
    // core was shared (callgrind, `conduit run --orders 20000`: 90.9 M instructions against 91.0 M).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn forward<E: Effects<M>>(
        &mut self,
        event: &Envelope<M>,
        tally: &mut BatchTally,
        fx: &mut E,
    ) -> Result<(), E::Stop> {
        tally.processed += 1;
        tally.emitted += self.emitter.staged.len() as u64;
        // The event ends as its children begin: its token was split among them as they were
        // emitted (their tokens XOR to it), so its root's word does not change and the tracker's
        // shared memory is touched only where the work ends, by events that emit nothing.
        if self.emitter.staged.is_empty() {
            fx.acks().update(event.slot, event.token);
        }
        let cause = fx.forward(event, &mut self.emitter)?;
        tally.unroutable += self.emitter.unroutable_count;
        if !self.emitter.unroutable.is_empty() {
            let unroutable = std::mem::take(&mut self.emitter.unroutable);
            for msg in unroutable {
                let (key, seq, deadline) = (event.key, event.seq, event.deadline);
                let envelope = Envelope { key, seq, cause, attempt: 0, slot: event.slot, token: 0, deadline, msg };
                tally.dead_lettered += 1;
                let reason = "no queue is bound to its routing key".into();
                let letter = self.letter(envelope, DeadLetterKind::Unroutable, Failures::default(), reason);
                bury(letter, fx);
            }
        }
        self.emitter.clear();
        Ok(())
    }

    /// A dead letter of this stage's: `failures` are those the event met before, `reason` the
    /// last one.
    pub(crate) fn letter(
        &self,
        envelope: Envelope<M>,
        kind: DeadLetterKind,
        failures: Failures,
        reason: Reason,
    ) -> DeadLetter<M> {
        dead_letter(&self.name, envelope, kind, failures, reason, self.wall_us)
    }
}

/// Hands over a dead letter: its event is finished.
pub(crate) fn bury<M, E: Effects<M>>(letter: DeadLetter<M>, fx: &mut E) {
    fx.acks().update(letter.envelope.slot, letter.envelope.token);
    fx.dead_letter(letter);
}

/// A dead letter on behalf of `stage`, at `wall_us`: `failures` are those the event met before,
/// `reason` the last one.
pub(crate) fn dead_letter<M>(
    stage: &Arc<str>,
    envelope: Envelope<M>,
    kind: DeadLetterKind,
    failures: Failures,
    reason: Reason,
    wall_us: u64,
) -> DeadLetter<M> {
    tracing::debug!(%stage, key = envelope.key, %kind, %reason, "dead letter");
    let first_failure_us = if failures.errors.is_empty() { wall_us } else { failures.first_us };
    DeadLetter {
        stage: Arc::clone(stage),
        kind,
        reason,
        errors: failures.errors,
        errors_dropped: failures.errors_dropped,
        first_failure_us,
        last_failure_us: wall_us,
        attempts: envelope.attempt,
        envelope,
    }
}

fn panic_reason(payload: &(dyn Any + Send)) -> Reason {
    let text = payload
        .downcast_ref::<&'static str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text payload".to_owned());
    format!("handler panicked: {text}").into()
}
