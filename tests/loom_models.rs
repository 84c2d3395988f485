//! loom models of the engine's own synchronisation, explored over every interleaving loom finds.
//! Each model is the protocol as the code runs it, on loom's types (crossbeam and redb are not
//! loom-aware, so the queue and the store are modelled by a mutex-guarded slot and a vector):
//!
//! - `BatchSender::send` on a full queue, polling the poison flag a dying worker raises
//!   (`src/channel.rs`, `src/worker.rs`): the sender always returns, and its batch is delivered
//!   exactly once or handed back, never lost.
//! - batch buffer recycling (`src/channel.rs`): a drained buffer goes back on a bounded free
//!   list (dropped when it is full) and the next sender takes it or allocates; a buffer is never
//!   in two hands at once and every event sent arrives once.
//! - the log's acknowledgement (`src/log/writer.rs`): records are in the committed store before
//!   the ack is released, and after a failed commit no later append is acknowledged.
//! - a stage's queue-depth counters (`src/channel.rs`, `src/metrics.rs`): counted in after the
//!   batch is in, out after it is taken, read in-then-out; the raw difference passes the capacity
//!   by at most one batch (a sender woken by a take counts in before the taker counts out), which
//!   is why the snapshot caps it at the capacity.
//!
//! The retry wheel needs no model: each worker owns its wheel, nothing crosses threads.

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

#[test]
fn a_sender_blocked_on_a_full_queue_returns_when_the_worker_dies_and_loses_nothing() {
    loom::model(|| {
        // The queue holds one batch and is full; the worker either takes one batch or dies.
        let queue = Arc::new(Mutex::new(vec![1u64]));
        let poisoned = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(Mutex::new(Vec::new()));
        let sender = {
            let (queue, poisoned) = (Arc::clone(&queue), Arc::clone(&poisoned));
            thread::spawn(move || loop {
                {
                    let mut slots = queue.lock().expect("lock");
                    if slots.is_empty() {
                        slots.push(2);
                        return None;
                    }
                }
                if poisoned.load(Ordering::Acquire) {
                    return Some(2); // handed back: `SendFailure::Gone`
                }
                thread::yield_now();
            })
        };
        let worker = {
            let (queue, poisoned, taken) = (Arc::clone(&queue), Arc::clone(&poisoned), Arc::clone(&taken));
            thread::spawn(move || {
                let batch = queue.lock().expect("lock").pop();
                taken.lock().expect("lock").extend(batch);
                // Then it dies: the poison guard raises the flag.
                poisoned.store(true, Ordering::Release);
            })
        };
        let handed_back = sender.join().expect("joins");
        worker.join().expect("joins");
        let mut seen: Vec<u64> = taken.lock().expect("lock").clone();
        seen.extend(queue.lock().expect("lock").iter().copied());
        seen.extend(handed_back);
        seen.sort_unstable();
        assert_eq!(seen, [1, 2], "every batch is taken, still queued, or handed back: exactly once");
    });
}

#[test]
fn an_acknowledged_record_is_committed_and_nothing_is_acknowledged_after_a_failure() {
    loom::model(|| {
        let store = Arc::new(Mutex::new(Vec::new()));
        let committed = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<(u64, bool)>>> = Arc::new(Mutex::new(Vec::new()));
        // The writer commits record 1, then its commit of record 2 fails.
        let writer = {
            let (store, committed, failed, acks) =
                (Arc::clone(&store), Arc::clone(&committed), Arc::clone(&failed), Arc::clone(&acks));
            thread::spawn(move || {
                store.lock().expect("lock").push(1u64);
                committed.store(1, Ordering::Release);
                acks.lock().expect("lock").push((1, true));
                failed.store(true, Ordering::Release);
                acks.lock().expect("lock").push((2, false));
            })
        };
        // A submitter waits for its ack, then reads the store as a reader after a restart would.
        let submitter = {
            let (store, committed, acks) = (Arc::clone(&store), Arc::clone(&committed), Arc::clone(&acks));
            thread::spawn(move || loop {
                let ok = acks.lock().expect("lock").iter().any(|&(id, ok)| id == 1 && ok);
                if ok {
                    assert!(committed.load(Ordering::Acquire) >= 1);
                    assert!(store.lock().expect("lock").contains(&1), "acknowledged before it was committed");
                    return;
                }
                thread::yield_now();
            })
        };
        // A later append checks the failure flag before it could be acknowledged.
        let later = {
            let failed = Arc::clone(&failed);
            thread::spawn(move || failed.load(Ordering::Acquire))
        };
        writer.join().expect("joins");
        submitter.join().expect("joins");
        let refused = later.join().expect("joins");
        let acks = acks.lock().expect("lock");
        assert!(acks.iter().all(|&(id, ok)| ok == (id == 1)), "only the committed record is acknowledged");
        if refused {
            assert!(acks.iter().any(|&(id, ok)| id == 2 && !ok), "the failure was answered before the flag is seen");
        }
    });
}

#[test]
fn queue_depth_overshoots_its_capacity_by_at_most_one_batch_before_the_cap() {
    const CAPACITY: u64 = 2;
    const BATCH: u64 = 1;
    loom::model(|| {
        // Full queue of two one-event batches; a worker takes one, a waiting sender puts one in.
        let slots = Arc::new(Mutex::new(2u64));
        let enqueued = Arc::new(AtomicU64::new(2));
        let dequeued = Arc::new(AtomicU64::new(0));
        let worker = {
            let (slots, dequeued) = (Arc::clone(&slots), Arc::clone(&dequeued));
            thread::spawn(move || {
                *slots.lock().expect("lock") -= 1;
                dequeued.fetch_add(BATCH, Ordering::Relaxed);
            })
        };
        let sender = {
            let (slots, enqueued) = (Arc::clone(&slots), Arc::clone(&enqueued));
            thread::spawn(move || loop {
                {
                    let mut used = slots.lock().expect("lock");
                    if *used < CAPACITY {
                        *used += 1;
                        drop(used);
                        enqueued.fetch_add(BATCH, Ordering::Relaxed);
                        return;
                    }
                }
                thread::yield_now();
            })
        };
        // A snapshot, as `StageMetrics::snapshot` reads: in, then out.
        let raw = enqueued.load(Ordering::Relaxed).saturating_sub(dequeued.load(Ordering::Relaxed));
        assert!(raw <= CAPACITY + BATCH, "overshoot beyond one batch: {raw}");
        worker.join().expect("joins");
        sender.join().expect("joins");
        assert_eq!(enqueued.load(Ordering::Relaxed) - dequeued.load(Ordering::Relaxed), 2);
    });
}

/// A batch in the model: its buffer's number and its events.
type Numbered = (u32, Vec<u64>);

#[test]
fn a_recycled_buffer_is_never_in_two_hands_and_every_event_arrives_once() {
    loom::model(|| {
        // Buffers are numbered; the queue carries (buffer, events); the free list holds one.
        let queue: Arc<Mutex<Vec<Numbered>>> = Arc::new(Mutex::new(Vec::new()));
        let free: Arc<Mutex<Option<u32>>> = Arc::new(Mutex::new(None));
        let next_buffer = Arc::new(AtomicU64::new(0));
        let held: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let take_buffer = {
            let (free, next_buffer, held) = (Arc::clone(&free), Arc::clone(&next_buffer), Arc::clone(&held));
            move || {
                let id = free.lock().expect("lock").take().unwrap_or_else(|| {
                    u32::try_from(next_buffer.fetch_add(1, Ordering::Relaxed)).expect("few buffers")
                });
                let mut held = held.lock().expect("lock");
                assert!(!held.contains(&id), "buffer {id} is in two hands");
                held.push(id);
                id
            }
        };
        let sender = {
            let (queue, held) = (Arc::clone(&queue), Arc::clone(&held));
            thread::spawn(move || {
                for event in 0..2u64 {
                    let id = take_buffer();
                    held.lock().expect("lock").retain(|&b| b != id);
                    queue.lock().expect("lock").push((id, vec![event]));
                }
            })
        };
        let receiver = {
            let (queue, free, held, arrived) =
                (Arc::clone(&queue), Arc::clone(&free), Arc::clone(&held), Arc::clone(&arrived));
            thread::spawn(move || {
                let mut got = 0;
                while got < 2 {
                    let batch = queue.lock().expect("lock").pop();
                    let Some((id, events)) = batch else {
                        thread::yield_now();
                        continue;
                    };
                    {
                        let mut held = held.lock().expect("lock");
                        assert!(!held.contains(&id), "buffer {id} is in two hands");
                        held.push(id);
                    }
                    got += events.len();
                    arrived.lock().expect("lock").extend(events);
                    held.lock().expect("lock").retain(|&b| b != id);
                    let mut slot = free.lock().expect("lock");
                    if slot.is_none() {
                        *slot = Some(id); // else: the free list is full and the buffer is dropped
                    }
                }
            })
        };
        sender.join().expect("joins");
        receiver.join().expect("joins");
        let mut delivered = arrived.lock().expect("lock").clone();
        delivered.sort_unstable();
        assert_eq!(delivered, [0, 1], "every event arrives exactly once");
    });
}
