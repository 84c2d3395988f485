//! The order pipeline's work through the engine and through its baselines: inline in one thread,
//! one thread per stage over crossbeam, the disruptor; and the sweep over batch and pool sizes.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::EngineConfig;
use conduit_orders::ports::{
    Channel, InventoryStore, Notifier, PaymentGateway, SimulatedCarrier, SimulatedGateway, SimulatedInventory,
    SimulatedNotifier,
};
use conduit_orders::{self as orders, Effect, IdempotencyKey, Order, SimConfig, Workload};

use super::{median, BenchConfig, SweepPoint, EVENTS_PER_ORDER};

/// The six steps against fresh simulated ports, as the pipeline's handlers do them.
pub(super) struct Work {
    gateway: SimulatedGateway,
    inventory: SimulatedInventory,
    notifier: SimulatedNotifier,
    carrier: SimulatedCarrier,
    confirmed: AtomicU64,
}

impl Work {
    fn new() -> Arc<Self> {
        let sim = SimConfig::default();
        let faults = conduit_orders::ports::Faults { seed: sim.seed, ..Default::default() };
        Arc::new(Self {
            gateway: SimulatedGateway::new(faults, 0.0),
            inventory: SimulatedInventory::new(faults, sim.skus, sim.stock_per_sku, 0),
            notifier: SimulatedNotifier::new(faults),
            carrier: SimulatedCarrier::default(),
            confirmed: AtomicU64::new(0),
        })
    }

    fn validate(order: &Order) -> bool {
        order.quantity > 0 && order.amount_cents > 0
    }

    fn charge(&self, order: &Order) -> bool {
        self.gateway.charge(IdempotencyKey::new(order.id, Effect::Charge), order, 0).is_ok()
    }

    fn reserve(&self, order: &Order) -> bool {
        self.inventory.reserve(IdempotencyKey::new(order.id, Effect::Reserve), order, 0).is_ok()
    }

    fn notify(&self, channel: Channel, order: &Order) {
        let _ = self.notifier.send(channel, IdempotencyKey::new(order.id, channel.effect()), order, 0);
    }

    fn ship(&self, order: &Order) {
        if self.carrier.ship(IdempotencyKey::new(order.id, Effect::Ship), order) {
            self.confirmed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn check(&self, orders: &[Order]) {
        assert_eq!(
            self.confirmed.load(Ordering::Relaxed),
            orders.len() as u64,
            "a baseline must finish every order, or its figure means nothing"
        );
    }
}

/// All six steps inline in one thread: the ceiling a pipeline is measured against.
pub fn ceiling_one_thread(orders: &[Order]) -> Duration {
    let work = Work::new();
    let start = Instant::now();
    for order in orders {
        if Work::validate(order) && work.charge(order) && work.reserve(order) {
            work.notify(Channel::Email, order);
            work.notify(Channel::Sms, order);
            work.ship(order);
        }
    }
    let elapsed = start.elapsed();
    work.check(orders);
    elapsed
}

pub(super) const PER_EVENT_CAPACITY: usize = 1_024;

/// One thread per stage linked by crossbeam channels, one event per message.
pub fn crossbeam_per_event_chain(orders: &[Order]) -> Duration {
    use crossbeam_channel::bounded;
    let work = Work::new();
    let (to_payment, payment_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_inventory, inventory_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_email, email_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_sms, sms_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_shipping, shipping_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let (to_order, order_in) = bounded::<Order>(PER_EVENT_CAPACITY);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let w = &work;
        scope.spawn(move || {
            for order in order_in {
                if Work::validate(&order) && to_payment.send(order).is_err() {
                    return;
                }
            }
        });
        scope.spawn(move || {
            for order in payment_in {
                if w.charge(&order) && to_inventory.send(order).is_err() {
                    return;
                }
            }
        });
        scope.spawn(move || {
            for order in inventory_in {
                if w.reserve(&order)
                    && (to_email.send(order).is_err()
                        || to_sms.send(order).is_err()
                        || to_shipping.send(order).is_err())
                {
                    return;
                }
            }
        });
        scope.spawn(move || email_in.into_iter().for_each(|o| w.notify(Channel::Email, &o)));
        scope.spawn(move || sms_in.into_iter().for_each(|o| w.notify(Channel::Sms, &o)));
        scope.spawn(move || shipping_in.into_iter().for_each(|o| w.ship(&o)));
        for order in orders {
            if to_order.send(*order).is_err() {
                break;
            }
        }
        drop(to_order);
    });
    let elapsed = start.elapsed();
    work.check(orders);
    elapsed
}

pub(super) const DISRUPTOR_RING: usize = 1 << 16;
pub(super) const DISRUPTOR_BATCH: usize = 256;

/// A ring slot: the order, and what the steps decided (written by one, read by the next).
pub(super) struct Slot {
    order: Order,
    /// 0: nothing yet; 1: validated; 2: charged; 3: reserved. Each step advances it.
    progress: AtomicU8,
}

/// The stages as dependent consumers of one `disruptor` ring; the better of two wait strategies.
pub fn disruptor_chain(orders: &[Order]) -> Duration {
    let spin = disruptor_chain_with(orders, disruptor::BusySpinWithSpinLoopHint);
    let sleep = disruptor_chain_with(orders, disruptor::Sleep::new(Duration::from_micros(50)));
    spin.min(sleep)
}

pub(super) fn disruptor_chain_with<W: disruptor::wait_strategies::WaitStrategy + 'static>(
    orders: &[Order],
    wait: W,
) -> Duration {
    use disruptor::{build_single_producer, Producer, Sequence};
    let work = Work::new();
    let empty = Order { id: 0, customer: 0, sku: 0, quantity: 0, amount_cents: 0 };
    let factory = move || Slot { order: empty, progress: AtomicU8::new(0) };
    let step = |from: u8, to: u8, f: fn(&Work, &Order) -> bool| {
        let work = Arc::clone(&work);
        move |slot: &Slot, _: Sequence, _: bool| {
            if slot.progress.load(Ordering::Relaxed) == from && f(&work, &slot.order) {
                slot.progress.store(to, Ordering::Relaxed);
            }
        }
    };
    let leaf = |f: fn(&Work, &Order)| {
        let work = Arc::clone(&work);
        move |slot: &Slot, _: Sequence, _: bool| {
            if slot.progress.load(Ordering::Relaxed) == 3 {
                f(&work, &slot.order);
            }
        }
    };
    let start = Instant::now();
    {
        let mut producer = build_single_producer(DISRUPTOR_RING, factory, wait)
            .handle_events_with(step(0, 1, |_, o| Work::validate(o)))
            .and_then()
            .handle_events_with(step(1, 2, Work::charge))
            .and_then()
            .handle_events_with(step(2, 3, Work::reserve))
            .and_then()
            .handle_events_with(leaf(|w, o| w.notify(Channel::Email, o)))
            .handle_events_with(leaf(|w, o| w.notify(Channel::Sms, o)))
            .handle_events_with(leaf(Work::ship))
            .build();
        for chunk in orders.chunks(DISRUPTOR_BATCH) {
            producer.batch_publish(chunk.len(), |slots| {
                for (slot, order) in slots.zip(chunk) {
                    slot.order = *order;
                    *slot.progress.get_mut() = 0;
                }
            });
        }
        // Dropping the producer waits until every consumer has handled every event.
    }
    let elapsed = start.elapsed();
    work.check(orders);
    elapsed
}

/// The order pipeline on conduit's engine, no log.
///
/// # Panics
/// If the configuration does not start or the run breaks an invariant: a bench of a broken run
/// must not print a figure.
pub fn engine_memory(config: &EngineConfig, orders: &[Order]) -> Duration {
    engine_memory_tracked(config, orders, true)
}

/// [`engine_memory`] with the engine's completion tracking on or off.
///
/// # Panics
/// As [`engine_memory`].
pub fn engine_memory_tracked(config: &EngineConfig, orders: &[Order], track: bool) -> Duration {
    engine_memory_with(config, orders, track, None)
}

/// [`engine_memory`] while another thread takes a snapshot of the engine (alerts evaluated)
/// every `every`, as `conduit run` does.
///
/// # Panics
/// As [`engine_memory`].
pub fn engine_memory_watched(config: &EngineConfig, orders: &[Order], every: Duration) -> Duration {
    engine_memory_with(config, orders, true, Some(every))
}

fn engine_memory_with(config: &EngineConfig, orders: &[Order], track: bool, watch: Option<Duration>) -> Duration {
    let start = Instant::now();
    let pipeline = if track {
        orders::OrderPipeline::start(config, &SimConfig::default())
    } else {
        orders::OrderPipeline::start_untracked(config, &SimConfig::default())
    }
    .expect("the bench's engine configuration was validated");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (engine, stopped) = (pipeline.engine(), &stop);
    let snapshots = std::thread::scope(|scope| {
        let watcher = watch.map(|every| {
            scope.spawn(move || {
                let mut taken = 0u64;
                while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                    std::hint::black_box(engine.snapshot());
                    taken += 1;
                    std::thread::park_timeout(every);
                }
                taken
            })
        });
        // One ingress window per call, in every engine case: with a log, a call returns once its
        // windows are committed, so calls of 4,096 orders (before 2026-12-01) left the bench's
        // one submitting thread waiting on a commit per 4,096 orders, and the durable cases
        // measured that thread more than the engine (25% fewer events/s).
        for chunk in orders.chunks(conduit::INGRESS_WINDOW_EVENTS) {
            pipeline.submit_many(chunk.iter().copied()).expect("the engine is healthy during a bench");
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        watcher.map(|w| {
            w.thread().unpark();
            w.join().expect("the watcher only takes snapshots")
        })
    });
    let report = pipeline.finish();
    let elapsed = start.elapsed();
    assert!(report.violations().is_empty(), "engine run broke an invariant: {:?}", report.violations());
    if let Some(every) = watch {
        // The watcher took about one snapshot per `every` (it was not starved or stopped early).
        let expected = elapsed.as_secs_f64() / every.as_secs_f64();
        let taken = snapshots.unwrap_or(0) as f64;
        assert!(taken >= expected * 0.5 - 1.0, "{taken} snapshots in {elapsed:?}, one every {every:?}");
    }
    // A malformed order is two events: its submission, and the order stage dead-lettering it.
    let poisoned = orders.iter().filter(|o| o.quantity == 0).count() as u64;
    assert_eq!(report.dead_letters.by_reason.get("malformed").copied().unwrap_or(0), poisoned);
    assert_eq!(report.events.total, (orders.len() as u64 - poisoned) * EVENTS_PER_ORDER + 2 * poisoned);
    elapsed
}

/// Runs `engine_memory` at each batch size and pool size, against a ceiling measured alongside.
pub fn sweep(
    config: &BenchConfig,
    batches: &[usize],
    workers: &[usize],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<SweepPoint>, conduit::ConfigError> {
    let workload: Vec<Order> =
        Workload::new(config.seed, 1_000, 100_000).take(usize::try_from(config.orders).unwrap_or(usize::MAX)).collect();
    let events = (config.orders * EVENTS_PER_ORDER) as f64;
    let mut points = Vec::new();
    for &w in workers {
        for &b in batches {
            progress(b, w);
            let engine = EngineConfig::builder().workers(w).batch_events_max(b).build()?;
            let mut engine_runs = Vec::new();
            let mut ceiling_runs = Vec::new();
            for _ in 0..config.repeat.max(1) {
                ceiling_runs.push(events / ceiling_one_thread(&workload).as_secs_f64().max(1e-9));
                engine_runs.push(events / engine_memory(&engine, &workload).as_secs_f64().max(1e-9));
            }
            let events_per_sec = median(&engine_runs);
            points.push(SweepPoint {
                batch_events_max: b,
                workers: w,
                events_per_sec,
                ratio_to_ceiling: events_per_sec / median(&ceiling_runs),
            });
        }
    }
    Ok(points)
}
