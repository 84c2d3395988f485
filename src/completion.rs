//! Completion tracking: when has all the work a submitted message caused finished?
//!
//! Apache Storm's acker, in process. Every event carries a random 64-bit `token`; each submitted
//! message (a *root*, keyed by its `seq`) has one word, the XOR of the tokens of its events still
//! unfinished. An event that ends by emitting others splits its token among them, so the word does
//! not change; an event that ends with nothing to pass on (its work's last step, or dead-lettered)
//! XORs its token into the word; a retried or parked event changes nothing. XOR is commutative, so
//! the ends of a message's branches may land in any order; the word is zero exactly when every
//! descendant has finished (a stray zero needs a 2^-64 coincidence). Memory: one entry per message
//! in flight, whatever the history.
//!
//! Tokens are split as a handler emits: an event's first child takes its token, each later one a
//! fresh token that the first's also takes in by XOR. An event that hands its work to one successor
//! (most of them) costs tracking nothing at all.
//!
//! Each message in flight holds a slot of the tracker (its events carry the slot's index), so an
//! update is one atomic XOR, no lock and no lookup. Workers collect their updates per unit of work
//! and apply them once per unit. With a journal a worker applies its updates only after handing
//! that unit's records to the log, so the completion record the applying worker then appends always
//! follows every record of the finished work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use crate::metrics::{new_growing_histogram, ns_since, record_growing_n, LATENCY_NS_MAX};
use crate::sync::{fence, AtomicU32, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

/// Most messages in flight at once: a submission waits for one of them to finish beyond this
/// (backpressure, like a full queue). Above what the queues and the ingress windows of any
/// configuration within [`crate::config::limits`] usually hold; a configuration that holds more
/// simply admits new messages as old ones finish.
#[cfg(not(loom))]
pub const ROOTS_MAX: usize = 1 << 18;
/// Under loom, a handful: each slot is a loom object in every explored execution.
#[cfg(loom)]
pub const ROOTS_MAX: usize = 2;

/// The slots, one `[word, seq, born]` a message: the XOR of its unfinished events' tokens, its
/// `seq`, and when it was accepted (nanoseconds since the tracker's epoch). Allocated zeroed in
/// one piece, which the allocator maps lazily: memory is touched only for slots ever used, and
/// freed slots are reused last in, first out. Finding a slot is an index (the chunked table it
/// replaced took 9 instructions a lookup, four lookups an order).
#[cfg(not(loom))]
type Slots = Box<[[AtomicU64; 3]; ROOTS_MAX]>;
/// Under loom, `born` is std's atomic: plain data published with the word, not part of the
/// protocol the models check.
#[cfg(loom)]
type Slots = Box<[(AtomicU64, AtomicU64, std::sync::atomic::AtomicU64); ROOTS_MAX]>;

#[cfg(not(loom))]
fn new_slots() -> Slots {
    bytemuck::allocation::zeroed_slice_box(ROOTS_MAX)
        .try_into()
        .unwrap_or_else(|_| unreachable!("a table of ROOTS_MAX slots"))
}

#[cfg(loom)]
#[allow(clippy::unnecessary_box_returns, reason = "the same type as the table's outside loom")]
fn new_slots() -> Slots {
    Box::new(std::array::from_fn(|_| Default::default()))
}

/// Called with the `seq` of each submitted message whose work has finished, on the thread that
/// saw it finish; keep it short. (With a journal, `seq` is the id of the message's ingress record.)
pub type OnComplete = Arc<dyn Fn(u64) + Send + Sync>;

/// One message in flight: its slot's word, `seq` and acceptance time.
#[derive(Clone, Copy)]
struct Slot<'t> {
    word: &'t AtomicU64,
    seq: &'t AtomicU64,
    born: &'t std::sync::atomic::AtomicU64,
}

impl Slot<'_> {
    /// Whether the slot holds message `seq`, in flight.
    fn holds(self, seq: u64) -> bool {
        self.word.load(Ordering::SeqCst) != 0 && self.seq.load(Ordering::Relaxed) == seq
    }
}

/// The messages in flight, each in a slot its events name, and who wants to hear when they
/// finish. Updating a message's word is one atomic XOR on its slot: no lock, no lookup.
pub(crate) struct Tracker {
    slots: Slots,
    /// Slots never used yet start here; freed ones wait in `free`.
    fresh: AtomicU32,
    free: Mutex<Vec<u32>>,
    freed: Condvar,
    in_flight: AtomicU64,
    completed: AtomicU64,
    tickets: Mutex<FxHashMap<u64, Sender<()>>>,
    /// Tickets outstanding: the map's lock is skipped while there are none.
    ticketed: AtomicUsize,
    on_complete: Option<OnComplete>,
    /// What `born` counts from: an hour before the tracker was made.
    epoch: Instant,
    /// Accepted (or scheduled, see [`crate::Engine::submit_many_at`]) to finished, in ns: locked
    /// once per unit that finishes a message. Not a loom object: no part of the protocol.
    end_to_end: parking_lot::Mutex<Histogram<u64>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").field("in_flight", &self.in_flight()).field("completed", &self.completed()).finish()
    }
}

impl Tracker {
    pub(crate) fn new(on_complete: Option<OnComplete>) -> Self {
        Self {
            slots: new_slots(),
            fresh: AtomicU32::new(0),
            free: Mutex::new(Vec::new()),
            freed: Condvar::new(),
            in_flight: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            tickets: Mutex::new(FxHashMap::default()),
            ticketed: AtomicUsize::new(0),
            on_complete,
            // An hour back, so that a message scheduled before the engine started (an open-loop
            // generator behind its schedule) still counts from its time.
            epoch: Instant::now().checked_sub(Duration::from_secs(3_600)).unwrap_or_else(Instant::now),
            end_to_end: parking_lot::Mutex::new(new_growing_histogram()),
        }
    }

    /// Nanoseconds from the tracker's epoch to `at` (0 for an earlier instant).
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        ns_since(self.epoch, at)
    }

    /// Accepted-to-finished latencies of the messages finished so far, in ns.
    pub(crate) fn end_to_end(&self) -> Histogram<u64> {
        self.end_to_end.lock().clone()
    }

    /// The slot numbered `slot` (below [`ROOTS_MAX`]: every slot the tracker hands out is).
    #[inline]
    fn slot(&self, slot: u32) -> Slot<'_> {
        let slot = slot as usize;
        debug_assert!(slot < ROOTS_MAX, "slot {slot} was never handed out");
        #[cfg(not(loom))]
        let [word, seq, born] = &self.slots[slot % ROOTS_MAX];
        #[cfg(loom)]
        let (word, seq, born) = &self.slots[slot % ROOTS_MAX];
        Slot { word, seq, born }
    }

    /// Takes `n` free slots into `out` if there are that many now.
    pub(crate) fn try_acquire(&self, n: usize, out: &mut Vec<u32>) -> bool {
        let mut free = self.free.lock();
        let reused = free.len().min(n);
        let fresh_needed = u32::try_from(n - reused).unwrap_or(u32::MAX);
        if fresh_needed > 0 {
            let fresh = self.fresh.load(Ordering::Relaxed);
            let end = fresh.saturating_add(fresh_needed);
            if end as usize > ROOTS_MAX {
                return false;
            }
            // Under the lock: the only writer of `fresh`.
            self.fresh.store(end, Ordering::Relaxed);
            out.extend(fresh..end);
        }
        let keep = free.len() - reused;
        out.extend(free.drain(keep..));
        true
    }

    /// Takes `n` free slots into `out`, waiting while there are too few; gives up (false) once
    /// `refused` says so, checked every few milliseconds.
    pub(crate) fn acquire(&self, n: usize, out: &mut Vec<u32>, refused: &dyn Fn() -> bool) -> bool {
        loop {
            if self.try_acquire(n, out) {
                return true;
            }
            if refused() {
                return false;
            }
            let mut free = self.free.lock();
            if free.len() < n {
                self.freed.wait_for(&mut free, Duration::from_millis(5));
            }
        }
    }

    /// Gives back free slots (acquired but never registered, or whose message finished).
    pub(crate) fn give_back(&self, slots: &[u32]) {
        if !slots.is_empty() {
            self.free.lock().extend_from_slice(slots);
            self.freed.notify_all();
        }
    }

    /// Counts an event with `token` as unfinished work of message `seq` held in `slot`, before
    /// the event enters a queue. The first registration of a slot makes it a message in flight;
    /// later ones (work resumed in several events) add to it.
    pub(crate) fn register(&self, slot: u32, seq: u64, token: u64) {
        let held = self.slot(slot);
        held.seq.store(seq, Ordering::Relaxed);
        if held.word.load(Ordering::Relaxed) == 0 {
            held.born.store(self.ns_at(Instant::now()), std::sync::atomic::Ordering::Relaxed);
        }
        if held.word.fetch_xor(token, Ordering::AcqRel) == 0 {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Registers events each in a slot just acquired (so its word is zero and no other thread
    /// can touch it until the event enters a queue): plain stores, one count for them all. An
    /// atomic read-modify-write per event here cost the submitter a fifth of a pass-through
    /// chain's throughput. Their end-to-end latency counts from `born` ([`Self::ns_at`]).
    pub(crate) fn register_fresh(&self, events: impl Iterator<Item = (u32, u64, u64)>, born: u64) {
        let mut registered = 0;
        for (slot, seq, token) in events {
            let held = self.slot(slot);
            debug_assert_eq!(held.word.load(Ordering::Relaxed), 0, "a slot just acquired is free");
            held.seq.store(seq, Ordering::Relaxed);
            held.born.store(born, std::sync::atomic::Ordering::Relaxed);
            held.word.store(token, Ordering::Release);
            registered += 1;
        }
        self.in_flight.fetch_add(registered, Ordering::Relaxed);
    }

    /// Takes back a registration whose event never entered (its queue refused it). A zero token
    /// was never registered (the engine does not track): nothing to take back.
    pub(crate) fn unregister(&self, slot: u32, token: u64) {
        if token == 0 {
            return;
        }
        let held = self.slot(slot);
        if held.word.fetch_xor(token, Ordering::AcqRel) == token {
            // Nothing the caller submitted ran: no completion to announce.
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.give_back(&[slot]);
        }
    }

    /// Applies a unit's updates; the messages they finish are appended to `finished` (and
    /// counted, announced to the callback and to ticket holders) and their slots freed.
    pub(crate) fn apply(&self, acks: &mut Acks, finished: &mut Vec<u64>) {
        let start = finished.len();
        for &(slot, delta) in &acks.updates {
            let held = self.slot(slot);
            if held.word.fetch_xor(delta, Ordering::AcqRel) == delta {
                finished.push(held.seq.load(Ordering::Relaxed));
                acks.freed.push(slot);
                // Messages accepted together (one ingress batch) mostly finish together, and
                // finished in one unit they took the same time: one entry, and one histogram
                // record, per run of them (a record is a sixth of the instructions tracking
                // costs an order otherwise).
                let born = held.born.load(std::sync::atomic::Ordering::Relaxed);
                match acks.born.last_mut() {
                    Some((last, count)) if *last == born => *count += 1,
                    _ => acks.born.push((born, 1)),
                }
            }
        }
        acks.updates.clear();
        let done = &finished[start..];
        if done.is_empty() {
            return;
        }
        let now = self.ns_at(Instant::now());
        {
            let mut end_to_end = self.end_to_end.lock();
            for (born, count) in acks.born.drain(..) {
                record_growing_n(&mut end_to_end, now.saturating_sub(born).clamp(1, LATENCY_NS_MAX), count);
            }
        }
        self.in_flight.fetch_sub(done.len() as u64, Ordering::Relaxed);
        self.completed.fetch_add(done.len() as u64, Ordering::Relaxed);
        if let Some(callback) = &self.on_complete {
            for &seq in done {
                callback(seq);
            }
        }
        // With `ticket`'s count-then-read, this update-then-read is a store-buffering pair:
        // a fence on each side forbids the ticket reading the word before the update while this
        // reads no ticket (the loom model finds that interleaving without the fences).
        fence(Ordering::SeqCst);
        if self.ticketed.load(Ordering::SeqCst) > 0 {
            let mut tickets = self.tickets.lock();
            for seq in done {
                if let Some(waiter) = tickets.remove(seq) {
                    self.ticketed.fetch_sub(1, Ordering::SeqCst);
                    // A holder that dropped its ticket does not want to hear.
                    waiter.send(()).ok();
                }
            }
        }
        // Freed only now: a ticket asked for meanwhile still finds the slot naming its seq.
        self.give_back(&acks.freed);
        acks.freed.clear();
    }

    /// A ticket that settles when message `seq`, held in `slot`, finishes (at once if it has).
    pub(crate) fn ticket(&self, slot: u32, seq: u64) -> Ticket {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        let mut tickets = self.tickets.lock();
        // Counted before the slot is read: a worker that finishes the message after this reads
        // a nonzero count and looks for the ticket.
        self.ticketed.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.holds(slot, seq) {
            tickets.insert(seq, sender);
        } else {
            self.ticketed.fetch_sub(1, Ordering::SeqCst);
            sender.send(()).ok();
        }
        Ticket { seq, done: receiver, settled: std::cell::Cell::new(false) }
    }

    /// How long ago message `seq`, held in `slot`, was accepted; `None` if the slot does not
    /// hold it (it finished).
    pub(crate) fn since_accepted(&self, slot: u32, seq: u64) -> Option<Duration> {
        let held = self.slot(slot);
        if !held.holds(seq) {
            return None;
        }
        let born = held.born.load(std::sync::atomic::Ordering::Relaxed);
        Some(Duration::from_nanos(self.ns_at(Instant::now()).saturating_sub(born)))
    }

    /// Whether `slot` holds message `seq`, in flight.
    pub(crate) fn holds(&self, slot: u32, seq: u64) -> bool {
        self.slot(slot).holds(seq)
    }

    /// Messages whose work has not finished.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Messages whose work has finished.
    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }
}

/// Settles once all the work of one submitted message has finished.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    done: Receiver<()>,
    settled: std::cell::Cell<bool>,
}

impl Ticket {
    /// The message's sequence number.
    #[must_use]
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the work has finished.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.settled.get() || self.wait_timeout(Duration::ZERO)
    }

    /// Waits up to `timeout` for the work to finish; true if it has. False also when the engine
    /// stopped first (its work can no longer finish).
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        if !self.settled.get() && self.done.recv_timeout(timeout).is_ok() {
            self.settled.set(true);
        }
        self.settled.get()
    }
}

/// The `n`th token of a source: wyrand's output for state `n` times its increment (one 128-bit
/// multiply; splitmix64's finaliser took three), never zero (a zero token would vanish from the
/// XOR). Sources are told apart by their starting points. Not a bijection: two states give the
/// same token by a 2^-64 coincidence a pair, the odds the tracker already takes.
pub(crate) fn token_of(n: u64) -> u64 {
    let state = n.wrapping_mul(0xA076_1D64_78BD_642F);
    let product = u128::from(state) * u128::from(state ^ 0xE703_7ED1_A0B4_28DB);
    // The high and low halves of the product, folded.
    #[allow(clippy::cast_possible_truncation)]
    let token = (product >> 64) as u64 ^ product as u64;
    token.max(1)
}

/// splitmix64's finaliser: every bit of the result depends on every bit of `z` (the engine's
/// sharded maps pick a shard with it, so keys that agree on the bits a shard's map uses still
/// spread).
pub(crate) fn avalanche(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A thread's source of fresh tokens.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tokens {
    state: u64,
}

impl Tokens {
    /// A source starting at `seed` (distinct per thread: the seed's high bits).
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A fresh token.
    pub(crate) fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(1);
        token_of(self.state)
    }

    /// The token of the next child of an event with token `parent`, `first` being the token of
    /// its first child if it has one already. The first takes `parent`; each later child a
    /// fresh token, which the first's also takes in by XOR. The children's tokens then XOR to the
    /// event's, so as the event ends and they begin, its message's word does not change: no
    /// update, and none that the children's own could overtake. The word stays the XOR of the
    /// tokens of the events in flight, and that is zero only when none is: each fresh token
    /// appears in exactly two lines of descent (from the child that drew it, and from its first
    /// sibling, each through first children), and the events in flight are never ancestor and
    /// descendant, so no nonempty set of them XORs to zero but by a 2^-64 coincidence. A fresh
    /// token that would make the first's zero (the same coincidence; a zero would vanish from
    /// the XOR) is drawn again. Untracked events carry token zero, and so do their children.
    #[inline]
    pub(crate) fn child(&mut self, parent: u64, first: Option<&mut u64>) -> u64 {
        match first {
            None => parent,
            Some(first) if *first == 0 => 0,
            Some(first) => loop {
                let fresh = self.next();
                if fresh != *first {
                    *first ^= fresh;
                    return fresh;
                }
            },
        }
    }
}

/// One thread's completion updates for a unit of work.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    /// `(slot, delta)`: a message's word changes by `delta`.
    updates: Vec<(u32, u64)>,
    /// Scratch: slots a unit's updates freed, and when their messages were accepted (with how
    /// many in a row were accepted then).
    freed: Vec<u32>,
    born: Vec<(u64, u64)>,
}

impl Acks {
    /// The word of the message in `slot` changes by `delta` (an event with token `delta`
    /// ended with nothing to pass on). A zero token is an untracked event's: nothing to update.
    #[inline]
    pub(crate) fn update(&mut self, slot: u32, delta: u64) {
        if delta != 0 {
            self.updates.push((slot, delta));
        }
    }

    /// Whether there is anything to apply.
    pub(crate) fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Updates waiting to be applied.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.updates.len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Messages that finish in one unit are recorded together, a run of equal acceptance times
    /// at once: each keeps its own latency, and each is counted.
    #[test]
    fn messages_finished_together_keep_their_own_latencies() {
        let tracker = Tracker::new(None);
        let mut slots = Vec::new();
        assert!(tracker.try_acquire(4, &mut slots));
        let now = tracker.ns_at(Instant::now());
        let (second_ago, milli_ago) = (now - 1_000_000_000, now - 1_000_000);
        let (mut acks, mut tokens) = (Acks::default(), Tokens::new(1 << 40));
        for (seq, (&slot, born)) in slots.iter().zip([second_ago, second_ago, milli_ago, second_ago]).enumerate() {
            let token = tokens.next();
            tracker.register_fresh(std::iter::once((slot, seq as u64, token)), born);
            acks.update(slot, token);
        }
        let mut finished = Vec::new();
        tracker.apply(&mut acks, &mut finished);
        assert_eq!(finished, [0, 1, 2, 3]);
        let end_to_end = tracker.end_to_end();
        assert_eq!(end_to_end.len(), 4, "one latency per message");
        assert_eq!(end_to_end.count_between(1_000_000_000, 1_100_000_000), 3, "three accepted a second before");
        assert_eq!(end_to_end.count_between(1_000_000, 100_000_000), 1, "one accepted a millisecond before");
    }

    proptest! {
        /// A message's events split and end in any order the choices say: the tracker reports
        /// the message finished exactly when its last event ends, never before. Each choice
        /// picks an event in flight and ends it (`0`) or has it emit 1 to 3 children.
        #[test]
        fn a_message_finishes_when_its_last_event_ends(choices in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..4), 1..200)) {
            let tracker = Tracker::new(None);
            let mut slots = Vec::new();
            prop_assert!(tracker.try_acquire(1, &mut slots));
            let slot = slots[0];
            let (mut acks, mut tokens) = (Acks::default(), Tokens::new(1 << 40));
            let mut live = vec![tokens.next()];
            tracker.register_fresh(std::iter::once((slot, 9, live[0])), 0);
            let mut finished = Vec::new();
            let mut choices = choices.into_iter();
            while !live.is_empty() {
                // Past the choices, or with too many in flight, events only end.
                let (pick, children) = choices.next().map_or((0, 0), |(i, n)| (i.index(live.len()), n));
                let token = live.swap_remove(pick);
                if children == 0 || live.len() > 64 {
                    acks.update(slot, token);
                } else {
                    // As an emitter does: each child's token drawn as it is emitted.
                    let mut emitted: Vec<u64> = Vec::new();
                    for _ in 0..children {
                        let child = tokens.child(token, emitted.first_mut());
                        emitted.push(child);
                    }
                    live.extend(emitted);
                }
                tracker.apply(&mut acks, &mut finished);
                prop_assert_eq!(finished.len(), usize::from(live.is_empty()), "finished with {} in flight", live.len());
            }
            prop_assert_eq!(finished, vec![9]);
            prop_assert_eq!((tracker.in_flight(), tracker.completed()), (0, 1));
        }
    }
}

/// loom models of the tracker itself (`RUSTFLAGS="--cfg loom" cargo test --lib loom_`): every
/// interleaving of its atomics and locks (`crate::sync`) that loom finds.
#[cfg(all(test, loom))]
mod loom_models {
    use std::sync::Arc;

    use loom::thread;

    use super::*;

    /// A worker's unit: the updates of one finished event, applied at once.
    fn finish(tracker: &Tracker, slot: u32, delta: u64) -> Vec<u64> {
        let mut acks = Acks::default();
        acks.update(slot, delta);
        let mut finished = Vec::new();
        tracker.apply(&mut acks, &mut finished);
        finished
    }

    /// A message fanned out in three: its event's token split among its children as a handler
    /// emits them (the event itself ends with no update), and each child's end racing on three
    /// threads, in any order, while its submitter asks for a ticket. The message finishes
    /// exactly once, only after all three, and the ticket settles whenever it was asked for.
    #[test]
    fn loom_a_fanned_out_message_finishes_once_and_its_ticket_always_settles() {
        // Three preemptions cover the races here (the fence-less ticket fails with two); all of
        // them take minutes.
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let tracker = Arc::new(Tracker::new(None));
            let mut slots = Vec::new();
            assert!(tracker.try_acquire(1, &mut slots));
            let slot = slots[0];
            let parent = token_of(1);
            tracker.register_fresh(std::iter::once((slot, 7, parent)), 0);
            let mut tokens = Tokens::new(1 << 48);
            let mut children = vec![tokens.child(parent, None)];
            for _ in 0..2 {
                let (first, _) = children.split_first_mut().expect("a first child");
                let token = tokens.child(parent, Some(first));
                children.push(token);
            }
            let workers: Vec<_> = children
                .into_iter()
                .map(|delta| {
                    let tracker = Arc::clone(&tracker);
                    thread::spawn(move || finish(&tracker, slot, delta))
                })
                .collect();
            let ticket = tracker.ticket(slot, 7);
            let finished: Vec<u64> = workers.into_iter().flat_map(|w| w.join().expect("joins")).collect();
            assert_eq!(finished, [7], "finished exactly once");
            assert!(ticket.is_done(), "a ticket asked for while the message finished never settled");
            assert_eq!((tracker.in_flight(), tracker.completed()), (0, 1));
        });
    }

    /// With every slot held, a submitter waits for one: it gets the slot of the message that
    /// finishes, and a ticket for that finished message, asked for while the slot changes
    /// hands, settles and is never taken for the new message.
    #[test]
    fn loom_a_reused_slot_never_carries_a_stale_ticket() {
        loom::model(|| {
            let tracker = Arc::new(Tracker::new(None));
            let mut slots = Vec::new();
            assert!(tracker.try_acquire(ROOTS_MAX, &mut slots), "every slot taken");
            let slot = slots[0];
            tracker
                .register_fresh(slots.iter().enumerate().map(|(n, &s)| (s, n as u64 + 1, token_of(n as u64 + 1))), 0);
            let worker = {
                let tracker = Arc::clone(&tracker);
                thread::spawn(move || finish(&tracker, slot, token_of(1)))
            };
            let submitter = {
                let tracker = Arc::clone(&tracker);
                thread::spawn(move || {
                    let mut free = Vec::new();
                    assert!(tracker.acquire(1, &mut free, &|| false), "waits until a slot is free");
                    tracker.register_fresh(std::iter::once((free[0], 100, token_of(100))), 0);
                    free[0]
                })
            };
            let ticket = tracker.ticket(slot, 1);
            assert_eq!(worker.join().expect("joins"), [1]);
            let reused = submitter.join().expect("joins");
            assert_eq!(reused, slot, "the only free slot is the finished message's");
            assert!(ticket.is_done(), "the finished message's ticket never settled");
            assert!(tracker.holds(slot, 100) && !tracker.holds(slot, 1));
            assert_eq!(tracker.in_flight(), ROOTS_MAX as u64, "the new message and the untouched one");
        });
    }
}
