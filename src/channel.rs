//! Batched, bounded channels over crossbeam, with recycled batch buffers.
//!
//! Each stage has one input queue: a bounded crossbeam channel of [`Batch`]es, fed by every
//! upstream worker (or ingress) and drained by every worker of the stage (MPMC). A drained batch's
//! buffer goes back through a second channel to whoever sends next, so steady state allocates
//! nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError, TrySendError};

use crate::metrics::StageMetrics;
use crate::stage::Envelope;

/// How often a sender blocked on a full queue looks at the poison flag.
const POISON_POLL: Duration = Duration::from_millis(50);

/// Events moving together from one thread to the next: a transport unit, never a unit of failure.
#[derive(Debug)]
pub(crate) struct Batch<M> {
    pub(crate) events: Vec<Envelope<M>>,
    /// When the batch was handed to the queue: the start of the stage's latency.
    pub(crate) sent_at: Instant,
}

/// Why a send did not happen; the batch comes back.
#[derive(Debug)]
pub(crate) enum SendFailure<M> {
    /// The queue is full (only from `try_send`).
    Full(Batch<M>),
    /// No receiver is left, or the engine is poisoned.
    Gone(Batch<M>),
}

/// Creates one stage's input queue.
pub(crate) fn queue<M>(
    capacity_batches: usize,
    batch_events_max: usize,
    metrics: Arc<StageMetrics>,
    poisoned: Arc<AtomicBool>,
) -> (BatchSender<M>, BatchReceiver<M>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity_batches);
    // Room for every buffer that can be in flight: queued, being filled, being drained.
    let (free_tx, free_rx) = crossbeam_channel::bounded(capacity_batches * 2 + 8);
    metrics.batch_limit.fetch_min(batch_events_max, Ordering::Relaxed);
    let sender = BatchSender { tx, free_rx, batch_events_max, metrics: Arc::clone(&metrics), poisoned };
    let receiver = BatchReceiver { rx, free_tx, metrics };
    (sender, receiver)
}

/// The sending side of a stage's queue; cloned into every thread that feeds the stage.
#[derive(Debug)]
pub(crate) struct BatchSender<M> {
    tx: Sender<Batch<M>>,
    free_rx: Receiver<Vec<Envelope<M>>>,
    batch_events_max: usize,
    metrics: Arc<StageMetrics>,
    poisoned: Arc<AtomicBool>,
}

impl<M> Clone for BatchSender<M> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            free_rx: self.free_rx.clone(),
            batch_events_max: self.batch_events_max,
            metrics: Arc::clone(&self.metrics),
            poisoned: Arc::clone(&self.poisoned),
        }
    }
}

impl<M> BatchSender<M> {
    /// The stage's bound on a batch (what [`batch_limit`](Self::batch_limit) never passes).
    #[cfg(test)]
    pub(crate) fn batch_events_max(&self) -> usize {
        self.batch_events_max
    }

    /// The most events a batch may carry now (see `StageMetrics::batch_limit`).
    pub(crate) fn batch_limit(&self) -> usize {
        self.metrics.batch_limit.load(Ordering::Relaxed)
    }

    /// Whether the queue has no room for another batch now.
    pub(crate) fn is_full(&self) -> bool {
        self.tx.is_full()
    }

    /// An empty buffer: a recycled one when there is one.
    pub(crate) fn buffer(&self) -> Vec<Envelope<M>> {
        self.free_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(self.batch_events_max))
    }

    /// Sends, blocking while the queue is full; fails if the stage is gone or the engine poisoned.
    pub(crate) fn send(&self, events: Vec<Envelope<M>>) -> Result<(), SendFailure<M>> {
        debug_assert!(!events.is_empty(), "empty batches are never sent");
        debug_assert!(events.len() <= self.batch_events_max, "batch of {} over its bound", events.len());
        let count = events.len() as u64;
        let sent_at = Instant::now();
        let mut batch = Batch { events, sent_at };
        loop {
            match self.tx.send_timeout(batch, POISON_POLL) {
                // Counted once in the queue: a batch waiting for room is not in it.
                Ok(()) => {
                    self.metrics.count_in(count, sent_at);
                    return Ok(());
                }
                Err(SendTimeoutError::Timeout(back)) => {
                    if self.poisoned.load(Ordering::Acquire) {
                        return Err(SendFailure::Gone(back));
                    }
                    batch = back;
                }
                Err(SendTimeoutError::Disconnected(back)) => return Err(SendFailure::Gone(back)),
            }
        }
    }

    /// Sends if there is room now.
    pub(crate) fn try_send(&self, events: Vec<Envelope<M>>) -> Result<(), SendFailure<M>> {
        let count = events.len() as u64;
        let sent_at = Instant::now();
        match self.tx.try_send(Batch { events, sent_at }) {
            Ok(()) => {
                self.metrics.count_in(count, sent_at);
                Ok(())
            }
            Err(TrySendError::Full(back)) => Err(SendFailure::Full(back)),
            Err(TrySendError::Disconnected(back)) => Err(SendFailure::Gone(back)),
        }
    }
}

/// Where events for one stage go: its one queue shared by every worker, or, for a stage ordered
/// by key, one queue per worker with each key always in the same one; and within each, one queue
/// per priority level. Queues are numbered `partition * levels + level`.
#[derive(Debug)]
pub(crate) struct StageInput<M> {
    partitions: Vec<BatchSender<M>>,
    levels: usize,
    /// The stage's name, for dead letters of events it could not take.
    pub(crate) stage: Arc<str>,
    pub(crate) overflow: crate::config::Overflow,
}

impl<M> Clone for StageInput<M> {
    fn clone(&self) -> Self {
        Self {
            partitions: self.partitions.clone(),
            levels: self.levels,
            stage: Arc::clone(&self.stage),
            overflow: self.overflow,
        }
    }
}

impl<M> StageInput<M> {
    pub(crate) fn new(
        partitions: Vec<BatchSender<M>>,
        levels: usize,
        stage: Arc<str>,
        overflow: crate::config::Overflow,
    ) -> Self {
        debug_assert!(levels > 0 && !partitions.is_empty() && partitions.len() % levels == 0);
        Self { partitions, levels, stage, overflow }
    }

    /// Counts events the stage refused for lack of room.
    pub(crate) fn count_overflow(&self, events: u64) {
        self.partitions[0].metrics.overflowed.fetch_add(events, Ordering::Relaxed);
    }

    /// Queues behind this input (1 unless the stage is ordered or has priorities).
    pub(crate) fn partitions(&self) -> usize {
        self.partitions.len()
    }

    /// The queue of a message: its key's partition (a multiplicative hash, so neighbouring keys
    /// spread evenly), then its priority's level.
    pub(crate) fn queue_of(&self, key: u64, priority: u8) -> usize {
        let partition = partition_of(key, self.partitions.len() / self.levels);
        partition * self.levels + usize::from(priority).min(self.levels - 1)
    }

    pub(crate) fn sender(&self, partition: usize) -> &BatchSender<M> {
        &self.partitions[partition]
    }

    #[cfg(test)]
    pub(crate) fn batch_events_max(&self) -> usize {
        self.partitions[0].batch_events_max()
    }

    /// The most events a batch to this stage may carry now.
    pub(crate) fn batch_limit(&self) -> usize {
        self.partitions[0].batch_limit()
    }
}

/// The partition of `key` among `partitions` (a multiplicative hash, so neighbouring keys spread
/// evenly).
#[inline]
pub(crate) fn partition_of(key: u64, partitions: usize) -> usize {
    if partitions <= 1 {
        0
    } else {
        usize::try_from((key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % partitions as u64).unwrap_or(0)
    }
}

/// What [`BatchReceiver::recv_any`] got.
#[derive(Debug)]
pub(crate) enum Received<M> {
    /// A batch from the receiver at this index.
    Batch(usize, Batch<M>),
    /// Nothing before the timeout.
    TimedOut,
    /// Every receiver is disconnected and drained.
    Closed,
}

/// The receiving side of a stage's queue; cloned into each of the stage's workers.
#[derive(Debug)]
pub(crate) struct BatchReceiver<M> {
    rx: Receiver<Batch<M>>,
    free_tx: Sender<Vec<Envelope<M>>>,
    metrics: Arc<StageMetrics>,
}

impl<M> Clone for BatchReceiver<M> {
    fn clone(&self) -> Self {
        Self { rx: self.rx.clone(), free_tx: self.free_tx.clone(), metrics: Arc::clone(&self.metrics) }
    }
}

impl<M> BatchReceiver<M> {
    /// A batch if one is queued now.
    pub(crate) fn try_recv(&self) -> Result<Batch<M>, TryRecvError> {
        let batch = self.rx.try_recv()?;
        self.count_out(&batch);
        Ok(batch)
    }

    /// Waits up to `timeout` (for ever without one) for a batch on any of `receivers`, skipping
    /// those marked gone.
    pub(crate) fn recv_any(receivers: &[Self], gone: &mut [bool], timeout: Option<Duration>) -> Received<M> {
        if let ([only], [false]) = (receivers, &*gone) {
            // One queue (no priorities): a plain receive, cheaper than a select.
            let received = match timeout {
                None => only.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(timeout) => only.rx.recv_timeout(timeout),
            };
            return match received {
                Ok(batch) => {
                    only.count_out(&batch);
                    Received::Batch(0, batch)
                }
                Err(RecvTimeoutError::Timeout) => Received::TimedOut,
                Err(RecvTimeoutError::Disconnected) => Received::Closed,
            };
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut select = crossbeam_channel::Select::new();
            let mut indices = Vec::with_capacity(receivers.len());
            for (i, receiver) in receivers.iter().enumerate().filter(|(i, _)| !gone[*i]) {
                select.recv(&receiver.rx);
                indices.push(i);
            }
            if indices.is_empty() {
                return Received::Closed;
            }
            let operation = match deadline {
                Some(deadline) => match select.select_deadline(deadline) {
                    Ok(operation) => operation,
                    Err(_) => return Received::TimedOut,
                },
                None => select.select(),
            };
            let i = indices[operation.index()];
            match operation.recv(&receivers[i].rx) {
                Ok(batch) => {
                    receivers[i].count_out(&batch);
                    return Received::Batch(i, batch);
                }
                Err(_) => gone[i] = true,
            }
        }
    }

    fn count_out(&self, batch: &Batch<M>) {
        self.metrics.count_out(batch.events.len() as u64, batch.sent_at);
    }

    /// Hands a drained buffer back to the senders.
    pub(crate) fn recycle(&self, mut buffer: Vec<Envelope<M>>) {
        buffer.clear();
        // A full free list means enough buffers circulate already: this one is simply dropped.
        let _ = self.free_tx.try_send(buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(seq: u64) -> Envelope<u64> {
        Envelope { key: seq, seq, cause: 0, attempt: 0, slot: 0, token: 0, deadline: crate::Deadline::NEVER, msg: seq }
    }

    fn test_queue(capacity: usize) -> (BatchSender<u64>, BatchReceiver<u64>) {
        let metrics = Arc::new(StageMetrics::new("t".into(), 1.into(), capacity * 4));
        queue(capacity, 4, metrics, Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn buffers_are_recycled() {
        let (tx, rx) = test_queue(2);
        // A capacity a fresh buffer never has (the queue makes them with room for 4), so the
        // allocator handing the same address to a new buffer cannot pass for a recycled one.
        let mut buffer = Vec::with_capacity(64);
        buffer.push(envelope(1));
        let pointer = buffer.as_ptr();
        tx.send(buffer).expect("room in queue");
        let batch = rx.try_recv().expect("one batch queued");
        assert_eq!(batch.events, vec![envelope(1)]);
        rx.recycle(batch.events);
        let again = tx.buffer();
        assert!(again.is_empty());
        assert_eq!((again.as_ptr(), again.capacity()), (pointer, 64), "the drained buffer comes back");
        assert_eq!(tx.buffer().capacity(), 4, "with none left, a new buffer of the batch bound");
    }

    #[test]
    fn the_free_list_keeps_every_buffer_that_can_be_in_flight() {
        // Queued (capacity), being filled by each sender and drained by each worker: the free
        // list holds `2 * capacity + 8` so steady state allocates nothing.
        let capacity = 16;
        let (tx, rx) = test_queue(capacity);
        let in_flight = 2 * capacity + 8;
        for _ in 0..in_flight {
            rx.recycle(Vec::with_capacity(64));
        }
        let recycled = (0..in_flight).filter(|_| tx.buffer().capacity() == 64).count();
        assert_eq!(recycled, in_flight, "every buffer handed back comes back");
    }

    #[test]
    fn a_sender_knows_its_bound_and_when_the_queue_is_full() {
        let (tx, rx) = test_queue(1);
        assert_eq!(tx.batch_events_max(), 4);
        assert!(!tx.is_full(), "an empty queue has room");
        tx.send(vec![envelope(1)]).expect("room for one");
        assert!(tx.is_full(), "one batch fills a queue of one");
        rx.try_recv().expect("queued");
        assert!(!tx.is_full(), "room again once a worker took it");
    }

    /// A stage ordered by key with priorities: `partitions` queues per key partition, `levels`
    /// per priority.
    fn test_input(partitions: usize, levels: usize) -> (StageInput<u64>, Vec<BatchReceiver<u64>>) {
        let metrics = Arc::new(StageMetrics::new("t".into(), partitions.into(), 64));
        let poisoned = Arc::new(AtomicBool::new(false));
        let (senders, receivers) =
            (0..partitions * levels).map(|_| queue(4, 4, Arc::clone(&metrics), Arc::clone(&poisoned))).unzip();
        (StageInput::new(senders, levels, "t".into(), crate::config::Overflow::Block), receivers)
    }

    #[test]
    fn a_key_keeps_its_partition_and_a_priority_picks_its_level() {
        let (input, _receivers) = test_input(4, 3);
        assert_eq!(input.partitions(), 12, "4 key partitions times 3 levels");
        assert_eq!(input.batch_events_max(), 4);
        let mut per_partition = [0usize; 4];
        for key in 0..1_000u64 {
            let queues: Vec<usize> = (0..6u8).map(|priority| input.queue_of(key, priority)).collect();
            assert!(queues.iter().all(|&q| q < 12), "key {key}: {queues:?} out of range");
            let partition = queues[0] / 3;
            assert!(queues.iter().all(|&q| q / 3 == partition), "key {key} changed partition: {queues:?}");
            // Levels 0, 1 and 2, and every priority above the top level on the top one.
            assert_eq!(queues.iter().map(|&q| q % 3).collect::<Vec<_>>(), [0, 1, 2, 2, 2, 2], "key {key}");
            per_partition[partition] += 1;
        }
        // Neighbouring keys spread: each partition takes about a quarter of 1,000 keys.
        assert!(per_partition.iter().all(|&n| (150..=350).contains(&n)), "uneven spread {per_partition:?}");
    }

    #[test]
    fn one_partition_queues_by_priority_alone() {
        let (input, _receivers) = test_input(1, 2);
        assert_eq!(input.partitions(), 2);
        for key in [0, 1, 7, u64::MAX] {
            assert_eq!([input.queue_of(key, 0), input.queue_of(key, 1), input.queue_of(key, 200)], [0, 1, 1]);
        }
        let (plain, _receivers) = test_input(1, 1);
        assert_eq!((plain.partitions(), plain.queue_of(42, 9)), (1, 0));
    }

    #[test]
    fn refused_events_are_counted_as_overflow() {
        let (input, receivers) = test_input(2, 1);
        input.count_overflow(3);
        input.count_overflow(4);
        assert_eq!(receivers[0].metrics.snapshot().overflowed, 7);
    }

    #[test]
    fn recv_any_waits_for_a_batch_on_a_queue_not_gone() {
        let (tx0, rx0) = test_queue(1);
        let (tx1, rx1) = test_queue(1);
        let receivers = [rx0, rx1];
        // The first is marked gone: a batch on it is not taken, and one sent later on the second
        // is, within the timeout.
        tx0.send(vec![envelope(0)]).expect("room");
        let mut gone = [true, false];
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx1.send(vec![envelope(1)]).expect("room");
            tx1
        });
        match BatchReceiver::recv_any(&receivers, &mut gone, Some(Duration::from_secs(10))) {
            Received::Batch(1, batch) => assert_eq!(batch.events, vec![envelope(1)]),
            other => panic!("expected the second queue's batch, got {other:?}"),
        }
        let tx1 = late.join().expect("sender");
        assert!(matches!(
            BatchReceiver::recv_any(&receivers, &mut gone, Some(Duration::from_millis(20))),
            Received::TimedOut
        ));
        drop((tx0, tx1));
        assert!(matches!(BatchReceiver::recv_any(&receivers, &mut gone, None), Received::Closed));
        assert_eq!(gone, [true, true]);
    }

    #[test]
    fn try_send_hands_the_batch_back_when_full() {
        let (tx, rx) = test_queue(1);
        tx.try_send(vec![envelope(1)]).expect("room for one");
        let failure = tx.try_send(vec![envelope(2)]).expect_err("queue full");
        assert!(matches!(failure, SendFailure::Full(ref b) if b.events == vec![envelope(2)]));
        assert_eq!(rx.metrics.snapshot().queue_depth, 1);
    }

    /// Found by the overload test: a sender blocked on a full queue had counted its batch as
    /// queued, so a stage's reported depth ran past its capacity for as long as the sender
    /// waited. A batch counts once it is in the queue.
    #[test]
    fn a_batch_waiting_for_room_is_not_counted_as_queued() {
        let (tx, rx) = test_queue(1);
        tx.send(vec![envelope(1), envelope(2)]).expect("room for one batch");
        let blocked = tx.clone();
        let sender = std::thread::spawn(move || blocked.send(vec![envelope(3)]).is_ok());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.metrics.snapshot().queue_depth, 2, "only the batch in the queue counts");
        let first = rx.try_recv().expect("queued");
        assert_eq!(first.events.len(), 2);
        assert!(sender.join().expect("sender"), "the waiting batch went in once there was room");
        assert_eq!(rx.metrics.snapshot().queue_depth, 1);
    }

    #[test]
    fn send_fails_once_receivers_are_gone() {
        let (tx, rx) = test_queue(1);
        drop(rx);
        assert!(matches!(tx.send(vec![envelope(1)]), Err(SendFailure::Gone(_))));
    }
}
