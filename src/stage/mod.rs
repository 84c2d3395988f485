//! What a stage's handler sees: envelopes in, outcomes and emitted events out; and the rooms that
//! run a stage: [`decision`] (an outcome's disposition), [`parking`] (keyed parking, backoff and
//! expiry on one wheel), [`handling`] (one event through both, shared by the worker and the
//! simulator), [`worker`] (the threaded loop) and [`outbox`] (batches bound for linked stages).

pub(crate) mod decision;
pub(crate) mod handling;
pub(crate) mod outbox;
pub(crate) mod parking;
pub(crate) mod pool;
pub(crate) mod worker;

use std::borrow::Cow;
use std::sync::Arc;

use crate::routing::{Exchange, RouteId};

/// A message the engine can carry: owned, sendable, and keyed.
///
/// The key groups messages that belong together (an order id, say): dead letters and reports name
/// it, and later stages may partition by it.
pub trait Message: Send + 'static {
    /// The message's key, such as the order id it belongs to.
    fn key(&self) -> u64;

    /// Urgency in a stage with `priority_levels` above 1: higher overtakes lower (levels above
    /// the stage's highest count as its highest). Give all messages of one key the same priority
    /// (a customer tier, say): then a key's messages share one queue and keep their order.
    fn priority(&self) -> u8 {
        0
    }

    /// How long the message (and every event that descends from it) may live, from when it is
    /// submitted; `None`, the default, for no limit. An event past its time is dead-lettered as
    /// `expired` instead of handled. A stage's own `ttl_ms` limits the time spent in it.
    fn ttl(&self) -> Option<std::time::Duration> {
        None
    }
}

/// When an event expires, in microseconds on the engine's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Deadline(pub(crate) u64);

impl Deadline {
    /// No deadline.
    pub const NEVER: Self = Self(u64::MAX);

    /// The deadline `ttl` from now (on the process's monotonic clock).
    #[must_use]
    pub fn after(ttl: std::time::Duration) -> Self {
        Self::at(clock_us(), ttl)
    }

    /// The deadline `ttl` after `now_us`, a [`Clock::now_us`](crate::clock::Clock::now_us) reading.
    #[must_use]
    pub fn at(now_us: u64, ttl: std::time::Duration) -> Self {
        Self(now_us.saturating_add(u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX)))
    }

    /// The earlier of two deadlines.
    #[must_use]
    pub fn min(self, other: Self) -> Self {
        Self(self.0.min(other.0))
    }

    /// Whether the deadline has passed at `now` (a [`clock_us`] reading).
    pub(crate) fn passed(self, now_us: u64) -> bool {
        self.0 <= now_us
    }

    /// Time left until the deadline, from `now` (zero once passed; `None` for no deadline).
    pub(crate) fn left(self, now_us: u64) -> Option<std::time::Duration> {
        (self != Self::NEVER).then(|| std::time::Duration::from_micros(self.0.saturating_sub(now_us)))
    }
}

pub(crate) use crate::clock::monotonic_us as clock_us;

/// Identifies a stage of a [`Topology`](crate::Topology); handed out by
/// [`Topology::stage`](crate::Topology::stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageId(pub(crate) u16);

impl StageId {
    /// The stage's position in its topology (declaration order).
    #[must_use]
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A message in flight, with the engine's bookkeeping around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<M> {
    /// The message's key (see [`Message::key`]).
    pub key: u64,
    /// The ingress sequence number of the submitted message this one descends from: every event
    /// emitted while handling an envelope inherits its `seq`, so it works as a correlation id.
    pub seq: u64,
    /// Id of the journal record this message derives from (0 without a journal): the causation
    /// id of whatever its handler records.
    pub cause: u64,
    /// Attempts already made on this envelope in its current stage (0 on the first try).
    pub attempt: u32,
    /// The completion tracker's slot for the message this event descends from, and the event's
    /// token (see [`crate::completion`]): the engine sets both when the event enters; leave them
    /// 0 when building an envelope.
    pub slot: u32,
    /// See `slot`.
    pub token: u64,
    /// When the event expires ([`Deadline::NEVER`] unless its message has a
    /// [`ttl`](Message::ttl)); inherited by the events emitted while handling it.
    pub deadline: Deadline,
    /// The message itself.
    pub msg: M,
}

impl<M: Message> Envelope<M> {
    /// A submitted message's envelope: its key, sequence number `seq`, and its deadline if the
    /// message has a [`ttl`](Message::ttl).
    #[must_use]
    pub fn submitted(seq: u64, msg: M) -> Self {
        let deadline = msg.ttl().map_or(Deadline::NEVER, Deadline::after);
        Self { key: msg.key(), seq, cause: 0, attempt: 0, slot: 0, token: 0, deadline, msg }
    }
}

/// Why an event was retried or rejected: a static text costs no allocation.
pub type Reason = Cow<'static, str>;

/// What a handler decided for one event. Each event of a batch has its own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Handled: the events emitted while handling it are sent on.
    Done,
    /// A transient failure: the emitted events are discarded and the event is tried again after
    /// an exponential backoff with jitter (the stage's `retry_*` settings), until the stage's
    /// `attempts_max` is spent; then it is dead-lettered. Its key's later events wait behind it.
    Retry(Reason),
    /// A permanent failure: the emitted events are discarded and the event is dead-lettered now.
    Reject(Reason),
    /// A conflict (the handler met a concurrent change and reloaded): the emitted events are
    /// discarded and the event is tried again at once, without backoff; the attempt counts.
    Conflict(Reason),
    /// The event itself is malformed (its payload does not decode or breaks the message's rules):
    /// no attempt can succeed, so it is dead-lettered now as `malformed`.
    Malformed(Reason),
    /// Not now (a circuit breaker is open, say): the emitted events are discarded and the event
    /// waits on the worker's timing wheel for the given time, then is tried again. The attempt
    /// does not count; its key's later events wait behind it.
    Defer(std::time::Duration),
}

/// The per-stage logic. One instance per worker thread, so `&mut self` needs no locking.
///
/// A handler must not block for long: while it runs, its worker takes no other event. A panic
/// inside [`handle`](Self::handle) is caught, counted and treated as [`Outcome::Retry`]; an event
/// whose every attempt panics is dead-lettered as `panicked` and the worker goes on.
pub trait Handler<M>: Send {
    /// Handles one event; events to send on go through `out`.
    fn handle(&mut self, event: &Envelope<M>, out: &mut Emitter<M>) -> Outcome;
}

impl<M, F> Handler<M> for F
where
    F: FnMut(&Envelope<M>, &mut Emitter<M>) -> Outcome + Send,
{
    fn handle(&mut self, event: &Envelope<M>, out: &mut Emitter<M>) -> Outcome {
        self(event, out)
    }
}

/// Collects the events a handler emits and the facts it records for one input event. They leave
/// only if the handler returns [`Outcome::Done`].
#[derive(Debug)]
pub struct Emitter<M> {
    pub(crate) staged: Vec<(StageId, Envelope<M>)>,
    /// `(kind, start, end)` of each recorded fact, its payload in `record_bytes[start..end]`.
    pub(crate) records: Vec<(u16, usize, usize)>,
    pub(crate) record_bytes: Vec<u8>,
    /// Whether records go anywhere (the engine has a journal).
    pub(crate) journaling: bool,
    /// Indexed by stage: whether it is linked from this stage.
    pub(crate) links: Vec<bool>,
    /// Set when the handler misused the emitter; the outcome becomes a dead letter with it.
    pub(crate) misuse: Option<Reason>,
    pub(crate) key: u64,
    pub(crate) seq: u64,
    pub(crate) slot: u32,
    /// The handled event's completion token, which its children split (zero when untracked),
    /// and where their fresh tokens come from.
    pub(crate) token: u64,
    pub(crate) tokens: crate::completion::Tokens,
    pub(crate) cause: u64,
    pub(crate) deadline: Deadline,
    /// The stage's clock: what `*_within` count from (read only when they are called).
    pub(crate) clock: Option<Arc<dyn crate::clock::Clock>>,
    /// The topology's exchange, the routes this stage may publish, and whether unroutable
    /// events are dead-lettered.
    pub(crate) exchange: Option<Arc<Exchange<StageId>>>,
    pub(crate) may_publish: Vec<bool>,
    pub(crate) dead_letter_unroutable: bool,
    /// Published events no queue was bound to, counted (and kept, to dead-letter them).
    pub(crate) unroutable_count: u64,
    pub(crate) unroutable: Vec<M>,
    /// The engine's completion tracker, when it tracks: it knows when each message in flight
    /// was accepted ([`Emitter::since_accepted`]).
    pub(crate) tracker: Option<Arc<crate::completion::Tracker>>,
}

impl<M> Emitter<M> {
    pub(crate) fn new(links: Vec<bool>, journaling: bool) -> Self {
        Self {
            staged: Vec::new(),
            records: Vec::new(),
            record_bytes: Vec::new(),
            journaling,
            links,
            misuse: None,
            key: 0,
            seq: 0,
            slot: 0,
            token: 0,
            tokens: crate::completion::Tokens::default(),
            cause: 0,
            deadline: Deadline::NEVER,
            clock: None,
            exchange: None,
            may_publish: Vec::new(),
            dead_letter_unroutable: false,
            unroutable_count: 0,
            unroutable: Vec::new(),
            tracker: None,
        }
    }

    /// How long ago the message the event being handled descends from was accepted (submitted,
    /// or scheduled with [`Engine::submit_many_at`](crate::Engine::submit_many_at)): the time it
    /// has spent in the pipeline so far. A handler that ends a message's business (an order
    /// confirmed, say) measures the latency to that milestone with it. `None` when the engine
    /// does not track completion. One read of the message's slot; nothing when not called.
    #[must_use]
    pub fn since_accepted(&self) -> Option<std::time::Duration> {
        let tracker = self.tracker.as_ref()?;
        tracker.since_accepted(self.slot, self.seq)
    }

    pub(crate) fn set_routes(&mut self, exchange: Arc<Exchange<StageId>>, may_publish: Vec<bool>, dead_letter: bool) {
        self.exchange = Some(exchange);
        self.may_publish = may_publish;
        self.dead_letter_unroutable = dead_letter;
    }

    pub(crate) fn begin(&mut self, event: &Envelope<M>) {
        self.clear();
        self.misuse = None;
        self.key = event.key;
        self.seq = event.seq;
        self.slot = event.slot;
        self.token = event.token;
        self.cause = event.cause;
        self.deadline = event.deadline;
    }

    pub(crate) fn clear(&mut self) {
        self.staged.clear();
        self.records.clear();
        self.record_bytes.clear();
        self.unroutable.clear();
        self.unroutable_count = 0;
    }

    /// Sends `msg` to stage `to`, with the key and sequence of the event being handled.
    ///
    /// `to` must be linked from this stage ([`Topology::link`](crate::Topology::link)); an emit to
    /// an unlinked stage turns the handler's outcome into a dead letter naming it.
    pub fn emit(&mut self, to: StageId, msg: M) {
        let key = self.key;
        self.emit_keyed(to, key, msg);
    }

    /// Like [`emit`](Self::emit), due within `ttl` from now instead of by the deadline it would
    /// inherit from the handled event: an event that must be handled in time, as a saga step with
    /// a timeout, is dead-lettered as `expired` once its deadline passes, whether it waits in a
    /// queue or for a retry on the worker's timing wheel (which wakes for the deadline).
    /// `Duration::MAX` sends it with no deadline at all (a compensation, which must not expire
    /// because the step before it had to hurry).
    pub fn emit_within(&mut self, to: StageId, msg: M, ttl: std::time::Duration) {
        self.within(ttl, |emitter| emitter.emit(to, msg));
    }

    /// Like [`emit`](Self::emit), with another key.
    pub fn emit_keyed(&mut self, to: StageId, key: u64, msg: M) {
        if self.links.get(to.index()).copied().unwrap_or(false) {
            let first = self.staged.first_mut().map(|(_, first)| &mut first.token);
            let envelope = Envelope {
                key,
                seq: self.seq,
                cause: self.cause,
                attempt: 0,
                slot: self.slot,
                token: self.tokens.child(self.token, first),
                deadline: self.deadline,
                msg,
            };
            self.staged.push((to, envelope));
        } else if self.misuse.is_none() {
            self.misuse = Some(format!("emitted to stage #{}, which is not linked from this stage", to.index()).into());
        }
    }

    /// Records a fact about the event's key in the engine's journal (the durable log), if it has
    /// one: `kind` is the application's (below [`crate::log::KIND_RESERVED_MIN`]), `payload`
    /// its bytes. Emitted events carry the record's id as their `cause`.
    pub fn record(&mut self, kind: u16, payload: &[u8]) {
        if kind >= crate::log::KIND_RESERVED_MIN {
            self.misuse.get_or_insert_with(|| format!("record kind {kind:#x} is reserved for the engine").into());
            return;
        }
        if self.journaling {
            let start = self.record_bytes.len();
            self.record_bytes.extend_from_slice(payload);
            self.records.push((kind, start, self.record_bytes.len()));
        }
    }

    /// Like [`publish`](Self::publish), each copy due within `ttl` from now instead of by the
    /// inherited deadline (see [`emit_within`](Self::emit_within)).
    pub fn publish_within(&mut self, route: RouteId, msg: M, ttl: std::time::Duration)
    where
        M: Clone,
    {
        self.within(ttl, |emitter| emitter.publish(route, msg));
    }

    /// Runs `send` with the deadline `ttl` from now on the stage's clock (none for
    /// `Duration::MAX`) in place of the inherited one, which it then gets back.
    fn within(&mut self, ttl: std::time::Duration, send: impl FnOnce(&mut Self)) {
        let due = if ttl == std::time::Duration::MAX {
            Deadline::NEVER
        } else {
            Deadline::at(self.clock.as_ref().map_or_else(clock_us, |clock| clock.now_us()), ttl)
        };
        let inherited = std::mem::replace(&mut self.deadline, due);
        send(self);
        self.deadline = inherited;
    }

    /// Publishes `msg` through the topology's exchange: a copy goes to every stage bound to the
    /// route's key (see [`Topology::bind`](crate::Topology::bind)). The stage must have declared
    /// the key with [`Topology::publishes`](crate::Topology::publishes). A key no stage is bound
    /// to is counted as unroutable, and dead-lettered if the topology says so.
    pub fn publish(&mut self, route: RouteId, msg: M)
    where
        M: Clone,
    {
        if !self.may_publish.get(route.index()).copied().unwrap_or(false) {
            self.misuse.get_or_insert_with(|| "published a routing key this stage did not declare".into());
            return;
        }
        // Taken out and put back rather than cloned: an `Arc` clone per event would bounce its
        // counter between the cores of every publishing worker.
        let Some(exchange) = self.exchange.take() else { return };
        match exchange.destinations(route) {
            [] => {
                self.unroutable_count += 1;
                if self.dead_letter_unroutable {
                    self.unroutable.push(msg);
                }
            }
            [rest @ .., last] => {
                for &to in rest {
                    self.emit(to, msg.clone());
                }
                self.emit(*last, msg);
            }
        }
        self.exchange = Some(exchange);
    }

    /// The facts recorded for the current input event: kind and payload.
    pub(crate) fn recorded(&self) -> impl Iterator<Item = (u16, &[u8])> {
        self.records.iter().map(|&(kind, start, end)| (kind, &self.record_bytes[start..end]))
    }

    /// Takes the events staged for the current input event, by destination; hand the emptied
    /// vector back with [`restore_staged`](Self::restore_staged) to keep its allocation.
    pub(crate) fn take_staged(&mut self) -> Vec<(StageId, Envelope<M>)> {
        std::mem::take(&mut self.staged)
    }

    /// Gives back the (drained) vector [`take_staged`](Self::take_staged) returned.
    pub(crate) fn restore_staged(&mut self, staged: Vec<(StageId, Envelope<M>)>) {
        debug_assert!(staged.is_empty(), "staged events are drained before the vector comes back");
        self.staged = staged;
    }

    /// Events emitted so far for the current input event.
    #[must_use]
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// Whether nothing has been emitted for the current input event.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }
}
