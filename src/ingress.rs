//! Ingress: submitted messages into the entry stage, numbered, and (with a journal) made durable
//! first.
//!
//! Without a journal a message enters the entry queue at once. With one, its ingress record is
//! appended first and the message enters only once that record is committed: the caller's window
//! of messages goes to the **forwarder** thread (`conduit:ingress`) with the commit's waiter, and
//! the forwarder sends it into the entry queue after the commit. So a caller never waits on a
//! commit unless it asks to: [`Engine::try_submit`](crate::Engine::try_submit) returns a
//! [`Receipt`] at once, and `submit_many` keeps several windows in flight and waits once, at the
//! end. Windows in flight are bounded by tokens ([`WINDOWS_IN_FLIGHT`]): a submit without a token
//! waits for one (backpressure), a `try_submit` without one is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use parking_lot::Mutex;

use crate::channel::{SendFailure, StageInput};
use crate::completion::{token_of, Tracker};
use crate::error::{BuildError, SubmitError, TrySubmitError};
use crate::journal::{ingress_records, Journal};
use crate::log::{AckWaiter, TryAppendError};
use crate::metrics::new_histogram;
use crate::stage::worker::Shared;
use crate::stage::{Envelope, Message};

/// Most messages journaled in one append (one commit acknowledgement) by `submit_many`.
pub const INGRESS_WINDOW_EVENTS: usize = 16_384;

/// Journaled windows waiting for their commit at once, across all callers.
pub const WINDOWS_IN_FLIGHT: usize = 8;

/// Batches, each with the partition of the entry stage's input it goes to.
pub(crate) type Window<M> = Vec<(usize, Vec<Envelope<M>>)>;

/// How a journaled window fared: accepted into the pipeline (how many), or refused with its
/// messages.
type Settled<M> = Result<u64, SubmitError<Vec<M>>>;

/// A window handed to the forwarder.
struct Forward<M> {
    window: Window<M>,
    commit: AckWaiter,
    journaled_at: Instant,
    settled: Sender<Settled<M>>,
}

/// What a submission became: accepted now, or waiting for the commit of its ingress record.
#[must_use = "a receipt says whether the message was accepted; wait on it or drop it knowingly"]
pub struct Receipt<M> {
    state: ReceiptState<M>,
    /// For one message: its `seq`, its tracker slot, and whether it is tracked.
    one: Option<(u64, u32, bool)>,
}

enum ReceiptState<M> {
    Accepted(u64),
    Pending(Receiver<Settled<M>>),
}

impl<M> Receipt<M> {
    fn of_one(mut self, (seq, slot, token): (u64, u32, u64)) -> Self {
        self.one = Some((seq, slot, token != 0));
        self
    }

    /// The submitted message's sequence number (a receipt of one message, from `try_submit`).
    /// With a journal it is the id of the message's ingress record.
    #[must_use]
    pub fn seq(&self) -> Option<u64> {
        self.one.map(|(seq, _, _)| seq)
    }

    /// The one message's `seq` and tracker slot, if the engine tracks it.
    pub(crate) fn tracked(&self) -> Option<(u64, u32)> {
        self.one.and_then(|(seq, slot, tracked)| tracked.then_some((seq, slot)))
    }
}

impl<M> std::fmt::Debug for Receipt<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            ReceiptState::Accepted(count) => f.debug_tuple("Accepted").field(count).finish(),
            ReceiptState::Pending(_) => f.write_str("Pending"),
        }
    }
}

impl<M> Receipt<M> {
    fn accepted(count: u64) -> Self {
        Self { state: ReceiptState::Accepted(count), one: None }
    }

    /// Whether the submission is settled (accepted or refused) and [`wait`](Self::wait) would not
    /// block.
    pub fn is_settled(&self) -> bool {
        match &self.state {
            ReceiptState::Accepted(_) => true,
            ReceiptState::Pending(settled) => !settled.is_empty(),
        }
    }

    /// Waits until the submission is durable (with a journal) and in the entry queue; returns how
    /// many messages it accepted. A refused submission hands its messages back.
    pub fn wait(self) -> Result<u64, SubmitError<Vec<M>>> {
        match self.state {
            ReceiptState::Accepted(count) => Ok(count),
            ReceiptState::Pending(settled) => settled.recv().unwrap_or_else(|_| Err(SubmitError::Closed(Vec::new()))),
        }
    }
}

/// The journal's side of ingress: the forwarder thread and the tokens that bound its windows.
struct Journaled<M> {
    journal: Journal<M>,
    tokens: (Sender<()>, Receiver<()>),
    forward: Option<Sender<Forward<M>>>,
    forwarder: Option<JoinHandle<()>>,
}

impl<M> Journaled<M> {
    /// Hands a journaled window to the forwarder (it holds a token); the receipt settles after
    /// the commit.
    fn forward(&self, window: Window<M>, commit: AckWaiter) -> Receipt<M> {
        let (settled, receipt) = crossbeam_channel::bounded(1);
        let forward = Forward { window, commit, journaled_at: Instant::now(), settled };
        let sender = self.forward.as_ref().expect("the forwarder runs until the ingress closes");
        if let Err(back) = sender.send(forward) {
            // The forwarder is gone: the engine is stopping; the window never entered.
            let Forward { window, settled, .. } = back.into_inner();
            settled.send(Err(SubmitError::Closed(messages(window)))).expect("the receipt is held here");
        }
        Receipt { state: ReceiptState::Pending(receipt), one: None }
    }
}

/// The way into an engine's entry stage.
pub(crate) struct Ingress<M> {
    input: StageInput<M>,
    next_seq: AtomicU64,
    submitted: Arc<AtomicU64>,
    shared: Arc<Shared>,
    journaled: Option<Journaled<M>>,
    /// Time from journaling a window to its commit.
    ack_latency: Arc<Mutex<Histogram<u64>>>,
    /// The completion tracker, when the engine tracks, and the counter of the ingress's tokens.
    tracker: Option<Arc<Tracker>>,
    next_token: AtomicU64,
}

impl<M: Message> Ingress<M> {
    /// Ingress into `input`; with a journal, starts the forwarder thread.
    pub(crate) fn new(
        input: StageInput<M>,
        journal: Option<Journal<M>>,
        shared: Arc<Shared>,
        tracker: Option<Arc<Tracker>>,
    ) -> Result<Self, BuildError> {
        let submitted = Arc::new(AtomicU64::new(0));
        let ack_latency = Arc::new(Mutex::new(new_histogram()));
        let journaled = match journal {
            None => None,
            Some(journal) => {
                let tokens = crossbeam_channel::bounded(WINDOWS_IN_FLIGHT);
                for _ in 0..WINDOWS_IN_FLIGHT {
                    tokens.0.send(()).expect("the token channel has room for every token");
                }
                let (forward, windows) = crossbeam_channel::unbounded();
                let forwarder = Forwarder {
                    input: input.clone(),
                    submitted: Arc::clone(&submitted),
                    ack_latency: Arc::clone(&ack_latency),
                    tokens: tokens.0.clone(),
                };
                let name = "conduit:ingress".to_owned();
                let thread = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || forwarder.run(&windows))
                    .map_err(|source| BuildError::Spawn { name, source })?;
                Some(Journaled { journal, tokens, forward: Some(forward), forwarder: Some(thread) })
            }
        };
        Ok(Self {
            input,
            next_seq: AtomicU64::new(0),
            submitted,
            shared,
            journaled,
            ack_latency,
            tracker,
            // Half way up the counter: the workers' ranges start at `(stage + 1) << 48`.
            next_token: AtomicU64::new(u64::MAX / 2),
        })
    }

    /// Slots of the completion tracker for `n` messages (none when the engine does not track):
    /// waiting for messages in flight to finish if `wait`, otherwise `None` when there are too
    /// few now.
    fn slots(&self, n: usize, wait: bool) -> Option<Vec<u32>> {
        let Some(tracker) = &self.tracker else { return Some(Vec::new()) };
        let mut slots = Vec::with_capacity(n);
        let got = if wait {
            tracker.acquire(n, &mut slots, &|| self.refusal(()).is_err())
        } else {
            tracker.try_acquire(n, &mut slots)
        };
        got.then_some(slots)
    }

    /// Gives each event a token and a slot (from `slots`) and counts it as its message's
    /// unfinished work, before it can enter the pipeline; its end-to-end latency counts from
    /// `scheduled`, or from now.
    fn track(&self, events: &mut [Envelope<M>], slots: &mut Vec<u32>, scheduled: Option<Instant>) {
        if let Some(tracker) = &self.tracker {
            let first = self.next_token.fetch_add(events.len() as u64, Ordering::Relaxed);
            for (event, n) in events.iter_mut().zip(first..) {
                event.token = token_of(n);
                event.slot = slots.pop().expect("a slot was acquired for every event");
            }
            let born = tracker.ns_at(scheduled.unwrap_or_else(Instant::now));
            tracker.register_fresh(events.iter().map(|e| (e.slot, e.seq, e.token)), born);
        }
    }

    /// Takes back [`track`](Self::track) for events that never entered.
    fn untrack<'e>(&self, events: impl IntoIterator<Item = &'e Envelope<M>>)
    where
        M: 'e,
    {
        if let Some(tracker) = &self.tracker {
            for event in events {
                tracker.unregister(event.slot, event.token);
            }
        }
    }

    /// Gives back slots acquired for messages that were then refused.
    fn give_back(&self, slots: &[u32]) {
        if let Some(tracker) = &self.tracker {
            tracker.give_back(slots);
        }
    }

    /// Messages accepted into the entry queue so far.
    pub(crate) fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }

    /// The commit latency of journaled windows.
    pub(crate) fn ack_latency(&self) -> Option<&Mutex<Histogram<u64>>> {
        self.journaled.as_ref().map(|_| &*self.ack_latency)
    }

    /// Why nothing can be submitted now, if anything says so: a failed log (the precise reason,
    /// even when a worker noticed first and poisoned the engine) or a poisoned engine.
    fn refusal<T>(&self, value: T) -> Result<T, SubmitError<T>> {
        if self.journaled.as_ref().is_some_and(|j| j.journal.log.failure().is_some()) {
            return Err(SubmitError::LogFailed(value));
        }
        if self.shared.is_poisoned() {
            return Err(SubmitError::Poisoned(value));
        }
        Ok(value)
    }

    /// Submits one message if there is room now; never waits for a commit. See
    /// [`Engine::try_submit`](crate::Engine::try_submit).
    pub(crate) fn try_submit(&self, msg: M) -> Result<Receipt<M>, TrySubmitError<M>> {
        let msg = self.refusal(msg).map_err(|e| match e {
            SubmitError::LogFailed(m) => TrySubmitError::LogFailed(m),
            SubmitError::Poisoned(m) | SubmitError::Closed(m) => TrySubmitError::Poisoned(m),
        })?;
        let partition = self.input.queue_of(msg.key(), msg.priority());
        let sender = self.input.sender(partition);
        let Some(journaled) = &self.journaled else {
            let Some(mut slots) = self.slots(1, false) else { return Err(TrySubmitError::Full(msg)) };
            let mut buffer = sender.buffer();
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            buffer.push(Envelope::submitted(seq, msg));
            self.track(&mut buffer, &mut slots, None);
            let one = (seq, buffer[0].slot, buffer[0].token);
            return match sender.try_send(buffer) {
                Ok(()) => {
                    self.submitted.fetch_add(1, Ordering::Relaxed);
                    Ok(Receipt::accepted(1).of_one(one))
                }
                Err(SendFailure::Full(batch)) => {
                    self.untrack(&batch.events);
                    Err(TrySubmitError::Full(only(batch.events)))
                }
                Err(SendFailure::Gone(batch)) => {
                    self.untrack(&batch.events);
                    Err(TrySubmitError::Poisoned(only(batch.events)))
                }
            };
        };
        // Once journaled, a message must enter the pipeline: room (a token, a slot in the entry
        // queue now, a slot in the log's queue) is checked before anything is written.
        if sender.is_full() || journaled.tokens.1.try_recv().is_err() {
            return Err(TrySubmitError::Full(msg));
        }
        let Some(mut slots) = self.slots(1, false) else {
            journaled.tokens.0.send(()).expect("a token taken goes back");
            return Err(TrySubmitError::Full(msg));
        };
        let mut events = sender.buffer();
        events.push(Envelope::submitted(self.next_seq.fetch_add(1, Ordering::Relaxed), msg));
        let records = ingress_records(&journaled.journal, &mut events);
        let commit = match journaled.journal.log.try_append(records) {
            Ok(commit) => commit,
            Err(refused) => {
                journaled.tokens.0.send(()).expect("a token taken goes back");
                self.give_back(&slots);
                let msg = only(events);
                return Err(match refused {
                    TryAppendError::Full(_) => TrySubmitError::Full(msg),
                    _ => TrySubmitError::LogFailed(msg),
                });
            }
        };
        // Counted in flight once its record is on its way, before it can enter.
        self.track(&mut events, &mut slots, None);
        let one = (events[0].seq, events[0].slot, events[0].token);
        Ok(journaled.forward(vec![(partition, events)], commit).of_one(one))
    }

    /// Submits every message, blocking while the entry queue (or, with a journal, the windows
    /// in flight) is full; with a journal, returns once every window is committed and in the
    /// entry queue. See [`Engine::submit_many`](crate::Engine::submit_many).
    pub(crate) fn submit_many(
        &self,
        msgs: impl IntoIterator<Item = M>,
        scheduled: Option<Instant>,
    ) -> Result<u64, SubmitError<Vec<M>>> {
        let mut msgs = msgs.into_iter().peekable();
        let mut receipts = Vec::new();
        let mut accepted = 0u64;
        // Why submitting stopped early, with the window that did not go in.
        let mut stopped: Option<SubmitError<Vec<M>>> = None;
        while msgs.peek().is_some() {
            if let Err(refused) = self.refusal(Vec::new()) {
                stopped = Some(refused);
                break;
            }
            let mut window = self.next_window(&mut msgs);
            let Some(journaled) = &self.journaled else {
                match self.send_tracked(&mut window, scheduled) {
                    Ok(count) => accepted += count,
                    Err(refused) => {
                        stopped = Some(refused.map(|()| messages(window)));
                        break;
                    }
                }
                continue;
            };
            match self.journal_window(journaled, window, scheduled) {
                Ok(receipt) => receipts.push(receipt),
                Err(refused) => {
                    stopped = Some(refused);
                    break;
                }
            }
        }
        // Every window handed over settles; a refused one gives its messages back, in order.
        let mut unsent: Vec<M> = Vec::new();
        let mut reason: Option<SubmitError<()>> = None;
        for receipt in receipts {
            match receipt.wait() {
                Ok(count) => accepted += count,
                Err(refused) => {
                    let kind = refused.map(|msgs| unsent.extend(msgs));
                    reason.get_or_insert(kind);
                }
            }
        }
        if let Some(stopped) = stopped {
            let kind = stopped.map(|msgs| unsent.extend(msgs));
            reason.get_or_insert(kind);
        }
        match reason {
            None => Ok(accepted),
            Some(reason) => {
                unsent.extend(msgs);
                Err(reason.map(|()| unsent))
            }
        }
    }

    /// Hands one window to the log and the forwarder without waiting for its commit: takes a
    /// token (waiting while all are out), slots, appends its ingress records; the receipt settles
    /// once the commit is in and the window in the entry queue.
    fn journal_window(
        &self,
        journaled: &Journaled<M>,
        mut window: Window<M>,
        scheduled: Option<Instant>,
    ) -> Result<Receipt<M>, SubmitError<Vec<M>>> {
        if let Err(refused) = self.take_token(journaled) {
            return Err(refused.map(|()| messages(window)));
        }
        let count = window.iter().map(|(_, batch)| batch.len()).sum();
        let Some(mut slots) = self.slots(count, true) else {
            journaled.tokens.0.send(()).expect("a token taken goes back");
            return Err(self.refusal(()).err().unwrap_or(SubmitError::Closed(())).map(|()| messages(window)));
        };
        let mut records = Vec::new();
        for (_, batch) in &mut window {
            records.extend(ingress_records(&journaled.journal, batch));
        }
        if let Ok(commit) = journaled.journal.log.append(records) {
            for (_, batch) in &mut window {
                self.track(batch, &mut slots, scheduled);
            }
            Ok(journaled.forward(window, commit))
        } else {
            journaled.tokens.0.send(()).expect("a token taken goes back");
            self.give_back(&slots);
            Err(SubmitError::LogFailed(messages(window)))
        }
    }

    /// Submits up to [`INGRESS_WINDOW_EVENTS`] messages as one window and returns without
    /// waiting for its commit. See [`Engine::submit_window_at`](crate::Engine::submit_window_at).
    pub(crate) fn submit_window(
        &self,
        msgs: Vec<M>,
        scheduled: Option<Instant>,
    ) -> Result<Receipt<M>, SubmitError<Vec<M>>> {
        assert!(msgs.len() <= INGRESS_WINDOW_EVENTS, "a window holds at most INGRESS_WINDOW_EVENTS messages");
        let msgs = self.refusal(msgs)?;
        let mut window = self.next_window(&mut msgs.into_iter().peekable());
        match &self.journaled {
            Some(journaled) => self.journal_window(journaled, window, scheduled),
            None => match self.send_tracked(&mut window, scheduled) {
                Ok(count) => Ok(Receipt::accepted(count)),
                Err(refused) => Err(refused.map(|()| messages(window))),
            },
        }
    }

    /// Takes a token for a window, waiting while all are out; refused once the engine can no
    /// longer take anything (a failed log, a poisoned engine, a stopped forwarder).
    fn take_token(&self, journaled: &Journaled<M>) -> Result<(), SubmitError<()>> {
        loop {
            match journaled.tokens.1.recv_timeout(Duration::from_millis(10)) {
                Ok(()) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => self.refusal(())?,
                Err(RecvTimeoutError::Disconnected) => return Err(SubmitError::Closed(())),
            }
        }
    }

    /// Takes up to [`INGRESS_WINDOW_EVENTS`] messages, numbered, in batches by partition.
    fn next_window(&self, msgs: &mut std::iter::Peekable<impl Iterator<Item = M>>) -> Window<M> {
        let taken = msgs.by_ref().take(INGRESS_WINDOW_EVENTS).zip(0u64..).map(|(msg, i)| Envelope::submitted(i, msg));
        let mut window = fill_window(&self.input, taken);
        let count: usize = window.iter().map(|(_, b)| b.len()).sum();
        let first_seq = self.next_seq.fetch_add(count as u64, Ordering::Relaxed);
        for envelope in window.iter_mut().flat_map(|(_, b)| b.iter_mut()) {
            envelope.seq += first_seq;
        }
        window
    }

    /// Sends a window's batches in order (memory mode), each tracked just before it goes, so a
    /// caller never holds slots for batches it cannot send yet; on failure the unsent batches
    /// stay in `window`.
    fn send_tracked(&self, window: &mut Window<M>, scheduled: Option<Instant>) -> Result<u64, SubmitError<()>> {
        let mut sent = 0;
        let mut batches = std::mem::take(window).into_iter();
        while let Some((partition, mut batch)) = batches.next() {
            let Some(mut slots) = self.slots(batch.len(), true) else {
                window.push((partition, batch));
                window.extend(batches);
                self.submitted.fetch_add(sent, Ordering::Relaxed);
                return Err(self.refusal(()).err().unwrap_or(SubmitError::Closed(())));
            };
            self.track(&mut batch, &mut slots, scheduled);
            let count = batch.len() as u64;
            match self.input.sender(partition).send(batch) {
                Ok(()) => sent += count,
                Err(SendFailure::Full(back) | SendFailure::Gone(back)) => {
                    self.untrack(&back.events);
                    window.push((partition, back.events));
                    window.extend(batches);
                    self.submitted.fetch_add(sent, Ordering::Relaxed);
                    return Err(SubmitError::Poisoned(()));
                }
            }
        }
        self.submitted.fetch_add(sent, Ordering::Relaxed);
        Ok(sent)
    }
}

impl<M> Ingress<M> {
    /// Stops the forwarder once it has settled every window handed to it.
    pub(crate) fn close(&mut self) {
        if let Some(journaled) = &mut self.journaled {
            journaled.forward = None;
            if let Some(thread) = journaled.forwarder.take() {
                if thread.join().is_err() {
                    self.shared.poison("the ingress forwarder panicked".into());
                }
            }
        }
    }
}

impl<M> Drop for Ingress<M> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The `conduit:ingress` thread: sends each journaled window into the entry queue once it is
/// committed, in the order the windows were handed over.
struct Forwarder<M> {
    input: StageInput<M>,
    submitted: Arc<AtomicU64>,
    ack_latency: Arc<Mutex<Histogram<u64>>>,
    tokens: Sender<()>,
}

impl<M: Message> Forwarder<M> {
    fn run(self, windows: &Receiver<Forward<M>>) {
        for Forward { mut window, commit, journaled_at, settled } in windows {
            let outcome = if commit.wait().is_ok() {
                let ns = u64::try_from(journaled_at.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
                self.ack_latency.lock().saturating_record(ns);
                if let Ok(count) = send_window(&self.input, &mut window) {
                    self.submitted.fetch_add(count, Ordering::Relaxed);
                    Ok(count)
                } else {
                    Err(SubmitError::Poisoned(messages(window)))
                }
            } else {
                Err(SubmitError::LogFailed(messages(window)))
            };
            // The token goes back before the receipt settles, so a caller that waited on its
            // receipt finds the token free again.
            self.tokens.send(()).expect("the ingress holds the token receiver while the forwarder runs");
            // A caller that dropped its receipt does not want to hear.
            drop(settled.send(outcome));
        }
    }
}

/// The entry queue's workers are gone (the engine is poisoned or stopping): nothing more enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueGone;

/// Sends a window's batches in order; on failure the unsent batches stay in `window`.
pub(crate) fn send_window<M: Message>(input: &StageInput<M>, window: &mut Window<M>) -> Result<u64, QueueGone> {
    let mut sent = 0;
    let mut batches = std::mem::take(window).into_iter();
    while let Some((partition, batch)) = batches.next() {
        let count = batch.len() as u64;
        match input.sender(partition).send(batch) {
            Ok(()) => sent += count,
            Err(SendFailure::Full(back) | SendFailure::Gone(back)) => {
                window.push((partition, back.events));
                window.extend(batches);
                return Err(QueueGone);
            }
        }
    }
    Ok(sent)
}

/// Splits events into batches of at most the stage's batch limit, by the partition of their key.
pub(crate) fn fill_window<M: Message>(input: &StageInput<M>, events: impl Iterator<Item = Envelope<M>>) -> Window<M> {
    let batch_events_max = input.batch_limit();
    let mut open: Vec<Vec<Envelope<M>>> = (0..input.partitions()).map(|_| Vec::new()).collect();
    let mut window = Vec::new();
    for event in events {
        let partition = input.queue_of(event.key, event.msg.priority());
        let buffer = &mut open[partition];
        if buffer.capacity() == 0 {
            *buffer = input.sender(partition).buffer();
        }
        buffer.push(event);
        if buffer.len() >= batch_events_max {
            window.push((partition, std::mem::take(buffer)));
        }
    }
    window.extend(open.into_iter().enumerate().filter(|(_, b)| !b.is_empty()));
    window
}

/// The messages of a window, in order.
pub(crate) fn messages<M>(window: Window<M>) -> Vec<M> {
    window.into_iter().flat_map(|(_, batch)| batch).map(|e| e.msg).collect()
}

/// The one message of a one-event batch.
fn only<M>(events: Vec<Envelope<M>>) -> M {
    events.into_iter().next().expect("the batch held the one message").msg
}
