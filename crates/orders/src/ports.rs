//! The outside world the order pipeline talks to, as traits, with seeded simulations.
//!
//! Every simulated decision (fail or not, before or after the effect) is a pure function of the
//! seed, the order, the attempt and the port, so a run is reproducible whatever the thread
//! schedule. Every effect is keyed by an [`IdempotencyKey`]: a repeated request returns the
//! first result and never repeats the effect.

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use conduit::dedup::{DedupWindow, WindowLimits};
use serde::Serialize;

pub use super::books::BooksError;
use super::books::{BooksFile, Entry};
use super::domain::{Effect, IdempotencyKey, Order};
use conduit::Reason;

/// `SplitMix64`'s finaliser: a fast, well-mixed hash of one word.
#[must_use]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform number in [0, 1) decided by its inputs alone.
pub(crate) fn chance(seed: u64, order: u64, attempt: u32, salt: u64) -> f64 {
    let h = mix64(seed ^ mix64(order ^ mix64(u64::from(attempt) ^ mix64(salt))));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn pause(latency: Duration) {
    if !latency.is_zero() {
        std::thread::sleep(latency);
    }
}

/// How a simulated port misbehaves; every rate is a probability per call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Decides the seeded coin flips.
    pub seed: u64,
    /// Probability of a transient failure.
    pub failure_rate: f64,
    /// Time every call takes.
    pub latency: Duration,
}

// ---------------------------------------------------------------------------------------------
// Payment

/// A payment gateway failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// Worth retrying with the same idempotency key (the charge may or may not have happened).
    #[error("transient payment failure: {0}")]
    Transient(Reason),
    /// The charge was refused for good.
    #[error("payment declined: {0}")]
    Declined(Reason),
    /// No answer in time: the charge may or may not have happened. Worth retrying with the same
    /// idempotency key, which settles it either way.
    #[error("payment timed out: {0}")]
    Timeout(Reason),
    /// The key's charge was made and has been refunded: the order was compensated (perhaps by a
    /// run that crashed before it recorded so). Not worth retrying; the order is over.
    #[error("payment already refunded: {0}")]
    Refunded(Reason),
}

/// Charges and refunds, each keyed for idempotency.
pub trait PaymentGateway: Send + Sync {
    /// Charges `order.amount_cents`; a repeated key returns the first charge's result.
    fn charge(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), PaymentError>;
    /// Refunds the order's charge, if there is one and it is not refunded yet.
    fn refund(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), PaymentError>;
}

/// An order's latest charge in the provider's books.
#[derive(Debug, Clone, Copy)]
struct ChargeRecord {
    key: IdempotencyKey,
    amount_cents: u64,
    refunded: bool,
    /// Charges under other keys while this one was live: each one a double charge.
    extra_charges: u32,
}

/// What the provider's books say one order paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Account {
    /// Charged for the order's latest generation, double charges included.
    pub charged_cents: u64,
    /// Refunded of that.
    pub refunded_cents: u64,
    /// Charges beyond the first while it was live.
    pub double_charges: u32,
    /// The redrive generation of the latest charge.
    pub generation: u32,
}

impl Account {
    /// What the customer is out of pocket for this order.
    pub fn net_cents(&self) -> u64 {
        self.charged_cents.saturating_sub(self.refunded_cents)
    }
}

/// The gateway's books, for the ledger invariant `charged - refunded = confirmed total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct LedgerFigures {
    /// Sum of every charge.
    pub charged_cents: u64,
    /// Sum of every refund.
    pub refunded_cents: u64,
    /// Orders charged more than once (under different idempotency keys).
    pub double_charges: u64,
    /// Repeated requests answered from the ledger instead of charging or refunding again.
    pub idempotent_replays: u64,
    /// Calls that timed out (the charge made or not).
    pub timeouts: u64,
}

impl LedgerFigures {
    /// What was added to the books since `before`.
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        Self {
            charged_cents: self.charged_cents - before.charged_cents,
            refunded_cents: self.refunded_cents - before.refunded_cents,
            double_charges: self.double_charges - before.double_charges,
            idempotent_replays: self.idempotent_replays - before.idempotent_replays,
            timeouts: self.timeouts - before.timeouts,
        }
    }
}

/// A simulated gateway keeping a ledger by order and idempotency key.
///
/// A failing call fails before the charge or, half the time, after it (a timeout that hides a
/// successful charge): exactly the case idempotency keys exist for.
#[derive(Debug)]
pub struct SimulatedGateway {
    faults: Faults,
    decline_rate: f64,
    /// Probability that a refund attempt fails (transiently: a retry may succeed).
    refund_failure_rate: f64,
    timeout_rate: f64,
    timeout: Duration,
    timeouts: AtomicU64,
    /// Each order's latest charge, for as long as the idempotency window holds it.
    ledger: DedupWindow<u64, ChargeRecord>,
    window: WindowLimits,
    charged_cents: AtomicU64,
    refunded_cents: AtomicU64,
    double_charges: AtomicU64,
    replays: AtomicU64,
    /// The provider's own books on disk, when it keeps them (see [`SimulatedGateway::with_books`]).
    books: Option<Mutex<BooksFile>>,
}

const SALT_CHARGE: u64 = 1;
const SALT_CHARGE_AFTER: u64 = 2;
const SALT_DECLINE: u64 = 3;
const SALT_RESERVE: u64 = 4;
const SALT_NOTIFY: u64 = 5;
const SALT_FRAUD: u64 = 6;
const SALT_TIMEOUT: u64 = 7;
const SALT_REFUND: u64 = 9;

/// The salt of a coin flip for `key`'s effect: each redrive generation flips anew.
fn salted(salt: u64, key: IdempotencyKey) -> u64 {
    salt ^ (u64::from(key.generation) << 32)
}

// ---------------------------------------------------------------------------------------------
// Fraud check (served over request/reply)

/// A fraud service's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FraudVerdict {
    /// Go ahead and charge.
    Approve,
    /// Do not charge: the order is cancelled.
    Deny,
}

/// A simulated fraud service: denies a seeded fraction of orders, taking `latency` per check.
#[derive(Debug, Clone, Copy)]
pub struct SimulatedFraudCheck {
    /// Decides the seeded verdicts.
    pub seed: u64,
    /// Fraction of orders denied.
    pub deny_rate: f64,
    /// Time each check takes.
    pub latency: Duration,
}

impl SimulatedFraudCheck {
    /// The verdict on `order` (the same every time it is asked).
    #[must_use]
    pub fn check(&self, order: &Order) -> FraudVerdict {
        pause(self.latency);
        if chance(self.seed, order.id, 0, SALT_FRAUD) < self.deny_rate {
            FraudVerdict::Deny
        } else {
            FraudVerdict::Approve
        }
    }
}

impl SimulatedGateway {
    /// A gateway failing transiently at `faults.failure_rate` and declining at `decline_rate`.
    #[must_use]
    pub fn new(faults: Faults, decline_rate: f64) -> Self {
        Self {
            faults,
            decline_rate,
            refund_failure_rate: 0.0,
            timeout_rate: 0.0,
            timeout: Duration::ZERO,
            timeouts: AtomicU64::new(0),
            ledger: DedupWindow::new(WindowLimits::default()),
            window: WindowLimits::default(),
            charged_cents: AtomicU64::new(0),
            refunded_cents: AtomicU64::new(0),
            double_charges: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            books: None,
        }
    }

    /// Fails refund attempts with probability `rate` (transiently: a retry may succeed).
    #[must_use]
    pub fn with_refund_failures(mut self, rate: f64) -> Self {
        self.refund_failure_rate = rate;
        self
    }

    /// Keeps the provider's books in a file of its own at `path` (created if missing), written
    /// before each answer, so they outlive any crash of the pipeline that calls it; a file left
    /// by an earlier run is read back, its charges and refunds into the idempotency window and
    /// its totals into the figures. Call after [`SimulatedGateway::with_window`]: the books keep
    /// about as many entries as the window keeps keys (two segments of `max_keys` each).
    pub fn with_books(mut self, path: &Path) -> Result<Self, BooksError> {
        let segment = self.window.max_keys as u64;
        let books = BooksFile::open(path, segment, |entry| {
            let order = match entry {
                Entry::Charge { order, .. } | Entry::DoubleCharge { order, .. } | Entry::Refund { order, .. } => order,
                Entry::Totals { .. } => return,
            };
            self.ledger.update(order, |held| ((), book(entry, held)));
        })?;
        let totals = books.totals();
        self.charged_cents = AtomicU64::new(totals.charged_cents);
        self.refunded_cents = AtomicU64::new(totals.refunded_cents);
        self.double_charges = AtomicU64::new(totals.double_charges);
        self.books = Some(Mutex::new(books));
        Ok(self)
    }

    /// Whether the idempotency window has let any order's charge go (so a missing account may
    /// be an old one rather than one never made).
    pub fn forgot_any(&self) -> bool {
        self.ledger.expired() > 0
    }

    /// What the books say `order` paid, if the idempotency window still holds its charge.
    pub fn account(&self, order: u64) -> Option<Account> {
        self.ledger.update(order, |held| {
            let account = held.map(|r| Account {
                charged_cents: r.amount_cents * (1 + u64::from(r.extra_charges)),
                refunded_cents: if r.refunded { r.amount_cents } else { 0 },
                double_charges: r.extra_charges,
                generation: r.key.generation,
            });
            (account, None)
        })
    }

    /// Writes `entry` to the books (if the provider keeps them on disk) and applies it to
    /// `held` and the figures; `Err` (nothing applied) if the books cannot be written.
    fn settle(&self, entry: Entry, held: Option<&mut ChargeRecord>) -> Result<Option<ChargeRecord>, PaymentError> {
        if let Some(books) = &self.books {
            books.lock().append(entry).map_err(|e| PaymentError::Transient(e.to_string().into()))?;
        }
        match entry {
            Entry::Charge { amount_cents, .. } => {
                self.charged_cents.fetch_add(amount_cents, Ordering::Relaxed);
            }
            Entry::DoubleCharge { amount_cents, .. } => {
                self.double_charges.fetch_add(1, Ordering::Relaxed);
                self.charged_cents.fetch_add(amount_cents, Ordering::Relaxed);
            }
            Entry::Refund { amount_cents, .. } => {
                self.refunded_cents.fetch_add(amount_cents, Ordering::Relaxed);
            }
            Entry::Totals { .. } => {}
        }
        Ok(book(entry, held))
    }

    /// Makes about `rate` of the charge calls time out after `wait` (the charge made half the
    /// time, as when the answer is lost on its way back).
    #[must_use]
    pub fn with_timeouts(mut self, rate: f64, wait: Duration) -> Self {
        self.timeout_rate = rate;
        self.timeout = wait;
        self
    }

    /// Keeps idempotency keys within `limits` (default: [`WindowLimits::default`]).
    #[must_use]
    pub fn with_window(mut self, limits: WindowLimits) -> Self {
        self.ledger = DedupWindow::new(limits);
        self.window = limits;
        self
    }

    /// The books now.
    pub fn ledger(&self) -> LedgerFigures {
        LedgerFigures {
            charged_cents: self.charged_cents.load(Ordering::Relaxed),
            refunded_cents: self.refunded_cents.load(Ordering::Relaxed),
            double_charges: self.double_charges.load(Ordering::Relaxed),
            idempotent_replays: self.replays.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Restores charges of earlier generations of an order, all refunded (a redriven order's
    /// dead letter was compensated before its redrive).
    pub fn restore_refunded_charges(&self, order: &Order, count: u32) {
        let cents = order.amount_cents * u64::from(count);
        self.charged_cents.fetch_add(cents, Ordering::Relaxed);
        self.refunded_cents.fetch_add(cents, Ordering::Relaxed);
    }

    /// Restores a charge made by an earlier run (recovery from the log) under `generation`'s key.
    pub fn restore_charge(&self, order: &Order, generation: u32, refunded: bool) {
        let record = ChargeRecord {
            key: IdempotencyKey { order: order.id, effect: Effect::Charge, generation },
            amount_cents: order.amount_cents,
            refunded,
            extra_charges: 0,
        };
        self.ledger.update(order.id, |_| ((), Some(record)));
        self.charged_cents.fetch_add(order.amount_cents, Ordering::Relaxed);
        if refunded {
            self.refunded_cents.fetch_add(order.amount_cents, Ordering::Relaxed);
        }
    }

    /// Whether the order has a charge that is not refunded.
    pub fn is_charged(&self, order: u64) -> bool {
        self.ledger.update(order, |held| (held.is_some_and(|r| !r.refunded), None))
    }
}

impl PaymentGateway for SimulatedGateway {
    fn charge(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), PaymentError> {
        pause(self.faults.latency);
        let seed = self.faults.seed;
        let times_out =
            self.timeout_rate > 0.0 && chance(seed, order.id, attempt, salted(SALT_TIMEOUT, key)) < self.timeout_rate;
        let fails = times_out || chance(seed, order.id, attempt, salted(SALT_CHARGE, key)) < self.faults.failure_rate;
        let fails_after_charging = fails && chance(seed, order.id, attempt, salted(SALT_CHARGE_AFTER, key)) < 0.5;
        if times_out {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
            pause(self.timeout);
        }
        if fails && !fails_after_charging {
            return Err(if times_out {
                PaymentError::Timeout("no answer from the gateway".into())
            } else {
                PaymentError::Transient("gateway unavailable".into())
            });
        }
        let (generation, amount_cents) = (key.generation, order.amount_cents);
        self.ledger.update(order.id, |held| {
            let entry = match held.as_deref() {
                Some(record) if record.key == key => {
                    self.replays.fetch_add(1, Ordering::Relaxed);
                    if record.refunded {
                        return (Err(PaymentError::Refunded("the order's charge was refunded".into())), None);
                    }
                    return (Ok(()), None);
                }
                // A later generation of a refunded order: the redrive charges anew.
                Some(record) if record.refunded && record.key.generation < key.generation => {
                    Entry::Charge { order: order.id, generation, amount_cents }
                }
                // Another key for the same order: a real gateway charges again. Counted, so the
                // audit of the books catches a pipeline that derives keys wrongly.
                Some(_) => Entry::DoubleCharge { order: order.id, generation, amount_cents },
                None => {
                    if self.decline_rate > 0.0 && chance(seed, order.id, 0, SALT_DECLINE) < self.decline_rate {
                        return (Err(PaymentError::Declined("card declined".into())), None);
                    }
                    Entry::Charge { order: order.id, generation, amount_cents }
                }
            };
            match self.settle(entry, held) {
                Ok(write) => (Ok(()), write),
                Err(error) => (Err(error), None),
            }
        })?;
        if fails_after_charging {
            return Err(if times_out {
                PaymentError::Timeout("no answer from the gateway (it charged)".into())
            } else {
                PaymentError::Transient("gateway failed after charging".into())
            });
        }
        Ok(())
    }

    fn refund(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), PaymentError> {
        debug_assert_eq!(key.effect, Effect::Refund);
        pause(self.faults.latency);
        if self.refund_failure_rate > 0.0
            && chance(self.faults.seed, order.id, attempt, salted(SALT_REFUND, key)) < self.refund_failure_rate
        {
            return Err(PaymentError::Transient("refund failed: provider unavailable".into()));
        }
        self.ledger.update(order.id, |held| match held {
            // Only the charge of the refund's own generation: an older one is refunded already.
            Some(record) if !record.refunded && record.key.generation == key.generation => {
                let entry =
                    Entry::Refund { order: order.id, generation: key.generation, amount_cents: record.amount_cents };
                (self.settle(entry, Some(record)).map(drop), None)
            }
            Some(_) => {
                self.replays.fetch_add(1, Ordering::Relaxed);
                (Ok(()), None)
            }
            None => (Ok(()), None), // Never charged (or charged before the window): nothing to refund.
        })
    }
}

/// Applies one fact of the books to the order's record; returns a record to store in its place.
fn book(entry: Entry, held: Option<&mut ChargeRecord>) -> Option<ChargeRecord> {
    let fresh = |order, generation, amount_cents| ChargeRecord {
        key: IdempotencyKey { order, effect: Effect::Charge, generation },
        amount_cents,
        refunded: false,
        extra_charges: 0,
    };
    match (entry, held) {
        (Entry::Charge { order, generation, amount_cents }, _) => Some(fresh(order, generation, amount_cents)),
        (Entry::DoubleCharge { .. }, Some(record)) => {
            record.extra_charges += 1;
            None
        }
        (Entry::DoubleCharge { order, generation, amount_cents }, None) => {
            Some(ChargeRecord { extra_charges: 1, ..fresh(order, generation, amount_cents) })
        }
        (Entry::Refund { generation, .. }, Some(record)) if record.key.generation == generation => {
            record.refunded = true;
            None
        }
        (Entry::Refund { .. } | Entry::Totals { .. }, _) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Inventory

/// An inventory store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// Worth retrying.
    #[error("transient inventory failure: {0}")]
    Transient(Reason),
    /// Too few units left: a business outcome, not a fault.
    #[error("sku {sku} is out of stock")]
    OutOfStock {
        /// The SKU.
        sku: u32,
    },
}

/// Reservations of stock, keyed for idempotency.
pub trait InventoryStore: Send + Sync {
    /// Reserves `order.quantity` units of `order.sku`; a repeated key changes nothing.
    fn reserve(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), InventoryError>;
    /// Returns the order's reserved units to stock, if it holds a reservation.
    fn release(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), InventoryError>;
}

/// A simulated store with real per-SKU stock counters.
#[derive(Debug)]
pub struct SimulatedInventory {
    faults: Faults,
    stock: Box<[AtomicU32]>,
    /// Order id to its latest reservation, for as long as the idempotency window holds it.
    reservations: DedupWindow<u64, Reservation>,
    reserved_units: AtomicU64,
    released_units: AtomicU64,
}

/// An order's latest reservation: the generation that made it, and whether it was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    generation: u32,
    released: bool,
}

/// Stock movements, for the invariant `reserved - released = units of confirmed orders`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StockFigures {
    /// Units reserved.
    pub reserved_units: u64,
    /// Units returned by compensation.
    pub released_units: u64,
}

impl SimulatedInventory {
    /// `skus` SKUs holding `stock_per_sku` units each, except the first `empty_skus`, which hold none.
    #[must_use]
    pub fn new(faults: Faults, skus: u32, stock_per_sku: u32, empty_skus: u32) -> Self {
        let stock = (0..skus).map(|sku| AtomicU32::new(if sku < empty_skus { 0 } else { stock_per_sku })).collect();
        Self {
            faults,
            stock,
            reservations: DedupWindow::new(WindowLimits::default()),
            reserved_units: AtomicU64::new(0),
            released_units: AtomicU64::new(0),
        }
    }

    /// Keeps idempotency keys within `limits` (default: [`WindowLimits::default`]).
    #[must_use]
    pub fn with_window(mut self, limits: WindowLimits) -> Self {
        self.reservations = DedupWindow::new(limits);
        self
    }

    /// Restores reservations of earlier generations of an order, all released.
    pub fn restore_released_reservations(&self, order: &Order, count: u32) {
        let units = u64::from(order.quantity) * u64::from(count);
        self.reserved_units.fetch_add(units, Ordering::Relaxed);
        self.released_units.fetch_add(units, Ordering::Relaxed);
    }

    /// Restores a reservation made by an earlier run (recovery from the log).
    pub fn restore_reservation(&self, order: &Order, generation: u32, released: bool) {
        self.reservations.update(order.id, |_| ((), Some(Reservation { generation, released })));
        self.reserved_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
        if released {
            self.released_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
        } else if let Some(stock) = self.stock.get(order.sku as usize) {
            let _ = stock.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(order.quantity)));
        }
    }

    /// Units reserved and released so far.
    pub fn figures(&self) -> StockFigures {
        StockFigures {
            reserved_units: self.reserved_units.load(Ordering::Relaxed),
            released_units: self.released_units.load(Ordering::Relaxed),
        }
    }

    /// Units of `sku` in stock now.
    pub fn stock(&self, sku: u32) -> Option<u32> {
        self.stock.get(sku as usize).map(|s| s.load(Ordering::Relaxed))
    }
}

impl InventoryStore for SimulatedInventory {
    fn reserve(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), InventoryError> {
        debug_assert_eq!(key.effect, Effect::Reserve);
        pause(self.faults.latency);
        if chance(self.faults.seed, order.id, attempt, salted(SALT_RESERVE, key)) < self.faults.failure_rate {
            return Err(InventoryError::Transient("inventory store unavailable".into()));
        }
        let Some(stock) = self.stock.get(order.sku as usize) else {
            return Err(InventoryError::OutOfStock { sku: order.sku });
        };
        self.reservations.update(order.id, |held| {
            match held {
                // A later generation of a released reservation reserves anew.
                Some(held) if held.released && held.generation < key.generation => {}
                Some(_) => return (Ok(()), None),
                None => {}
            }
            if stock
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |units| units.checked_sub(order.quantity))
                .is_err()
            {
                return (Err(InventoryError::OutOfStock { sku: order.sku }), None);
            }
            self.reserved_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
            (Ok(()), Some(Reservation { generation: key.generation, released: false }))
        })
    }

    fn release(&self, key: IdempotencyKey, order: &Order, _attempt: u32) -> Result<(), InventoryError> {
        debug_assert_eq!(key.effect, Effect::Release);
        pause(self.faults.latency);
        self.reservations.update(order.id, |held| {
            if let Some(held) = held {
                if !held.released && held.generation == key.generation {
                    held.released = true;
                    if let Some(stock) = self.stock.get(order.sku as usize) {
                        stock.fetch_add(order.quantity, Ordering::AcqRel);
                    }
                    self.released_units.fetch_add(u64::from(order.quantity), Ordering::Relaxed);
                }
            }
            ((), None)
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Notification

/// Which channel a notification goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Email.
    Email,
    /// SMS.
    Sms,
}

impl Channel {
    /// The idempotency effect of a message on this channel.
    #[must_use]
    pub fn effect(self) -> Effect {
        match self {
            Self::Email => Effect::Email,
            Self::Sms => Effect::Sms,
        }
    }
}

/// A notification failure (always worth retrying).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("notification failed: {0}")]
pub struct NotifyError(pub Reason);

/// Sends customer notifications, at most one per key.
pub trait Notifier: Send + Sync {
    /// Sends the confirmation for `order` on `channel`.
    fn send(&self, channel: Channel, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), NotifyError>;
}

/// A simulated notifier counting what it sent and what it suppressed as a repeat.
#[derive(Debug)]
pub struct SimulatedNotifier {
    faults: Faults,
    /// What was sent, for as long as the idempotency window holds it.
    sent: DedupWindow<IdempotencyKey, ()>,
    emails: AtomicU64,
    sms: AtomicU64,
    suppressed: AtomicU64,
}

/// What the notifier did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct NotifyFigures {
    /// Emails sent.
    pub email_sent: u64,
    /// Text messages sent.
    pub sms_sent: u64,
    /// Repeated requests not sent again.
    pub duplicates_suppressed: u64,
}

impl SimulatedNotifier {
    /// A notifier failing transiently at `faults.failure_rate`.
    #[must_use]
    pub fn new(faults: Faults) -> Self {
        Self {
            faults,
            sent: DedupWindow::new(WindowLimits::default()),
            emails: AtomicU64::new(0),
            sms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Keeps idempotency keys within `limits` (default: [`WindowLimits::default`]).
    #[must_use]
    pub fn with_window(mut self, limits: WindowLimits) -> Self {
        self.sent = DedupWindow::new(limits);
        self
    }

    /// Restores a notification sent by an earlier run (recovery from the log).
    pub fn restore_sent(&self, channel: Channel, order: u64, generation: u32) {
        let key = IdempotencyKey { order, effect: channel.effect(), generation };
        if self.sent.insert(key, ()) {
            match channel {
                Channel::Email => self.emails.fetch_add(1, Ordering::Relaxed),
                Channel::Sms => self.sms.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    /// What was sent so far.
    pub fn figures(&self) -> NotifyFigures {
        NotifyFigures {
            email_sent: self.emails.load(Ordering::Relaxed),
            sms_sent: self.sms.load(Ordering::Relaxed),
            duplicates_suppressed: self.suppressed.load(Ordering::Relaxed),
        }
    }
}

impl Notifier for SimulatedNotifier {
    fn send(&self, channel: Channel, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<(), NotifyError> {
        pause(self.faults.latency);
        if chance(self.faults.seed, order.id ^ ((key.effect as u64) << 56), attempt, salted(SALT_NOTIFY, key))
            < self.faults.failure_rate
        {
            return Err(NotifyError("provider unavailable".into()));
        }
        if !self.sent.insert(key, ()) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        match channel {
            Channel::Email => self.emails.fetch_add(1, Ordering::Relaxed),
            Channel::Sms => self.sms.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Shipping

/// A simulated carrier: ships each order at most once per key, and keeps its own books of the
/// units shipped per SKU, net of the shipments it was asked to cancel.
#[derive(Debug)]
pub struct SimulatedCarrier {
    /// Seeded refusals and lost answers of [`book`](Self::book) (the chain's [`ship`](Self::ship)
    /// never fails), and the time each call takes.
    faults: Faults,
    /// What was shipped (and whether it was cancelled since), for as long as the idempotency
    /// window holds it.
    shipped: DedupWindow<IdempotencyKey, bool>,
    shipments: AtomicU64,
    repeats: AtomicU64,
    cancellations: AtomicU64,
    /// Units shipped less units cancelled, per SKU (SKUs past the end are counted in the last).
    net_units: Box<[AtomicU64]>,
}

/// Why the carrier did not confirm a shipment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShipError {
    /// Refused: nothing was booked (no carrier serves the address, say).
    #[error("the carrier refused the shipment")]
    Refused,
    /// Booked, but the confirmation never came back: as far as the caller can tell, the call
    /// timed out, and the shipment may or may not exist.
    #[error("the carrier's answer was lost")]
    Lost,
}

impl Default for SimulatedCarrier {
    fn default() -> Self {
        Self::new(WindowLimits::default())
    }
}

const SALT_SHIP: u64 = 8;

impl SimulatedCarrier {
    /// A carrier keeping idempotency keys within `limits`, never failing, with books for one SKU.
    #[must_use]
    pub fn new(limits: WindowLimits) -> Self {
        Self::with_faults(limits, Faults::default(), 1)
    }

    /// A carrier whose [`book`](Self::book) fails with `faults.failure_rate` (half refused,
    /// half booked with the answer lost), keeping books for `skus` SKUs.
    #[must_use]
    pub fn with_faults(limits: WindowLimits, faults: Faults, skus: u32) -> Self {
        Self {
            faults,
            shipped: DedupWindow::new(limits),
            shipments: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            cancellations: AtomicU64::new(0),
            net_units: (0..skus.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn units_of(&self, sku: u32) -> &AtomicU64 {
        let last = self.net_units.len() - 1;
        &self.net_units[(sku as usize).min(last)]
    }

    /// Ships `order`; true for the key's first shipment, false for a repeat (nothing shipped).
    pub fn ship(&self, key: IdempotencyKey, order: &Order) -> bool {
        pause(self.faults.latency);
        self.record_shipment(key, order)
    }

    fn record_shipment(&self, key: IdempotencyKey, order: &Order) -> bool {
        debug_assert_eq!((key.effect, key.order), (Effect::Ship, order.id));
        if self.shipped.insert(key, false) {
            self.shipments.fetch_add(1, Ordering::Relaxed);
            self.units_of(order.sku).fetch_add(u64::from(order.quantity), Ordering::Relaxed);
            true
        } else {
            self.repeats.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Books `order`'s shipment, failing as the faults say: `Ok(true)` for the key's first
    /// shipment, `Ok(false)` for a repeat (already booked, nothing booked again).
    pub fn book(&self, key: IdempotencyKey, order: &Order, attempt: u32) -> Result<bool, ShipError> {
        pause(self.faults.latency);
        let roll = chance(self.faults.seed, order.id, attempt, salted(SALT_SHIP, key));
        if roll < self.faults.failure_rate / 2.0 {
            return Err(ShipError::Refused);
        }
        let first = self.record_shipment(key, order);
        if roll < self.faults.failure_rate {
            return Err(ShipError::Lost);
        }
        Ok(first)
    }

    /// Cancels the shipment booked under `key`, if there is one not cancelled yet; true if this
    /// call cancelled it. Cancelling what was never booked, or twice, changes nothing.
    pub fn cancel(&self, key: IdempotencyKey, order: &Order) -> bool {
        pause(self.faults.latency);
        self.shipped.update(key, |held| match held {
            Some(cancelled) if !*cancelled => {
                *cancelled = true;
                self.cancellations.fetch_add(1, Ordering::Relaxed);
                self.units_of(order.sku).fetch_sub(u64::from(order.quantity), Ordering::Relaxed);
                (true, None)
            }
            _ => (false, None),
        })
    }

    /// Restores a shipment made by an earlier run (recovery from the log).
    pub fn restore_shipped(&self, order: &Order, generation: u32) {
        let key = IdempotencyKey { order: order.id, effect: Effect::Ship, generation };
        if self.shipped.insert(key, false) {
            self.shipments.fetch_add(1, Ordering::Relaxed);
            self.units_of(order.sku).fetch_add(u64::from(order.quantity), Ordering::Relaxed);
        }
    }

    /// Shipments made, and repeated requests not shipped again.
    pub fn figures(&self) -> (u64, u64) {
        (self.shipments.load(Ordering::Relaxed), self.repeats.load(Ordering::Relaxed))
    }

    /// Shipments cancelled.
    pub fn cancellations(&self) -> u64 {
        self.cancellations.load(Ordering::Relaxed)
    }

    /// Units of `sku` shipped and not cancelled.
    pub fn net_units(&self, sku: u32) -> u64 {
        self.units_of(sku).load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: u64) -> Order {
        Order { id, customer: 1, sku: 0, quantity: 2, amount_cents: 500 }
    }

    #[test]
    fn chance_is_uniform_enough_and_deterministic() {
        let hits = (0..100_000).filter(|&i| chance(9, i, 0, 1) < 0.3).count();
        assert!((29_000..31_000).contains(&hits), "{hits}");
        assert_eq!(chance(1, 2, 3, 4).to_bits(), chance(1, 2, 3, 4).to_bits());
    }

    #[test]
    fn a_repeated_charge_key_never_charges_twice() {
        let gateway = SimulatedGateway::new(Faults::default(), 0.0);
        let key = IdempotencyKey::new(1, Effect::Charge);
        gateway.charge(key, &order(1), 0).expect("no faults");
        gateway.charge(key, &order(1), 1).expect("replay");
        let ledger = gateway.ledger();
        assert_eq!((ledger.charged_cents, ledger.double_charges, ledger.idempotent_replays), (500, 0, 1));
    }

    #[test]
    fn a_second_key_for_one_order_is_counted_as_a_double_charge() {
        let gateway = SimulatedGateway::new(Faults::default(), 0.0);
        gateway.charge(IdempotencyKey::new(1, Effect::Charge), &order(1), 0).expect("no faults");
        gateway.charge(IdempotencyKey::new(1, Effect::Refund), &order(1), 0).expect("a wrong key charges");
        assert_eq!(gateway.ledger().double_charges, 1);
        assert_eq!(gateway.ledger().charged_cents, 1000);
    }

    #[test]
    fn failures_after_charging_are_recovered_by_the_retry() {
        let faults = Faults { seed: 3, failure_rate: 1.0, latency: Duration::ZERO };
        let gateway = SimulatedGateway::new(faults, 0.0);
        let key = IdempotencyKey::new(1, Effect::Charge);
        let mut charged_while_failing = false;
        for attempt in 0..64 {
            assert!(gateway.charge(key, &order(1), attempt).is_err());
            charged_while_failing |= gateway.is_charged(1);
        }
        assert!(charged_while_failing, "half the failures happen after the charge");
        assert_eq!(gateway.ledger().charged_cents, 500, "but only once");
    }

    #[test]
    fn books_on_disk_remember_every_charge_across_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("payments");
        let open = || SimulatedGateway::new(Faults::default(), 0.0).with_books(&path).expect("books open");
        let key = |order, effect, generation| IdempotencyKey { order, effect, generation };
        let gateway = open();
        gateway.charge(key(1, Effect::Charge, 0), &order(1), 0).expect("charges");
        gateway.charge(key(2, Effect::Charge, 0), &order(2), 0).expect("charges");
        gateway.refund(key(2, Effect::Refund, 0), &order(2), 0).expect("refunds");
        drop(gateway);

        // The pipeline that called it is gone; the provider's books are not.
        let gateway = open();
        assert_eq!((gateway.ledger().charged_cents, gateway.ledger().refunded_cents), (1000, 500));
        gateway.charge(key(1, Effect::Charge, 0), &order(1), 1).expect("the same key replays");
        assert_eq!(gateway.ledger().double_charges, 0);
        gateway.charge(key(1, Effect::Charge, 7), &order(1), 0).expect("another key charges again");
        drop(gateway);

        let gateway = open();
        let ledger = gateway.ledger();
        assert_eq!((ledger.charged_cents, ledger.double_charges), (1500, 1));
        let account = gateway.account(1).expect("in the window");
        assert_eq!((account.net_cents(), account.double_charges), (1000, 1));
        assert_eq!(gateway.account(2).map(|a| a.net_cents()), Some(0));
        assert_eq!(gateway.account(3), None);
    }

    #[test]
    fn a_refunded_charge_is_not_replayed_as_paid() {
        let gateway = SimulatedGateway::new(Faults::default(), 0.0);
        let key = IdempotencyKey::new(1, Effect::Charge);
        gateway.charge(key, &order(1), 0).expect("charges");
        gateway.refund(IdempotencyKey::new(1, Effect::Refund), &order(1), 0).expect("refunds");
        // A restarted pipeline that lost the record of the refund asks again with the same key.
        assert!(matches!(gateway.charge(key, &order(1), 0), Err(PaymentError::Refunded(_))));
        assert_eq!(gateway.account(1).map(|a| a.net_cents()), Some(0));
    }

    #[test]
    fn refunds_are_idempotent_and_only_for_charges() {
        let gateway = SimulatedGateway::new(Faults::default(), 0.0);
        let refund = IdempotencyKey::new(1, Effect::Refund);
        gateway.refund(refund, &order(1), 0).expect("nothing to refund");
        assert_eq!(gateway.ledger().refunded_cents, 0);
        gateway.charge(IdempotencyKey::new(1, Effect::Charge), &order(1), 0).expect("no faults");
        gateway.refund(refund, &order(1), 0).expect("refund");
        gateway.refund(refund, &order(1), 1).expect("replay");
        assert_eq!(gateway.ledger().refunded_cents, 500);
        assert!(!gateway.is_charged(1));
    }

    #[test]
    fn stock_runs_out_and_comes_back_on_release() {
        let inventory = SimulatedInventory::new(Faults::default(), 2, 3, 1);
        let reserve =
            |id| inventory.reserve(IdempotencyKey::new(id, Effect::Reserve), &Order { sku: 1, ..order(id) }, 0);
        reserve(1).expect("3 units left");
        reserve(1).expect("a repeat changes nothing");
        assert_eq!(inventory.stock(1), Some(1));
        assert_eq!(reserve(2), Err(InventoryError::OutOfStock { sku: 1 }));
        let release = IdempotencyKey::new(1, Effect::Release);
        inventory.release(release, &Order { sku: 1, ..order(1) }, 0).expect("release");
        inventory.release(release, &Order { sku: 1, ..order(1) }, 0).expect("repeat");
        assert_eq!(inventory.stock(1), Some(3));
        let empty = inventory.reserve(IdempotencyKey::new(3, Effect::Reserve), &order(3), 0);
        assert_eq!(empty, Err(InventoryError::OutOfStock { sku: 0 }), "sku 0 starts empty");
    }

    #[test]
    fn a_redriven_generation_charges_again_only_after_the_refund() {
        let gateway = SimulatedGateway::new(Faults::default(), 0.0);
        let key = |effect, generation| IdempotencyKey { order: 1, effect, generation };
        gateway.charge(key(Effect::Charge, 0), &order(1), 0).expect("no faults");
        gateway.charge(key(Effect::Charge, 1), &order(1), 0).expect("a second key charges");
        assert_eq!(gateway.ledger().double_charges, 1, "generation 1 before generation 0's refund");

        let gateway = SimulatedGateway::new(Faults::default(), 0.0);
        gateway.charge(key(Effect::Charge, 0), &order(1), 0).expect("no faults");
        gateway.refund(key(Effect::Refund, 0), &order(1), 0).expect("refund");
        gateway.charge(key(Effect::Charge, 1), &order(1), 0).expect("redrive");
        gateway.charge(key(Effect::Charge, 1), &order(1), 1).expect("replay");
        gateway.refund(key(Effect::Refund, 0), &order(1), 1).expect("a stale refund");
        let ledger = gateway.ledger();
        assert_eq!((ledger.charged_cents, ledger.refunded_cents, ledger.double_charges), (1000, 500, 0));
        assert!(gateway.is_charged(1), "the stale refund left generation 1's charge alone");
    }

    #[test]
    fn timeouts_leave_the_charge_to_the_retry_to_settle() {
        let gateway =
            SimulatedGateway::new(Faults { seed: 5, ..Faults::default() }, 0.0).with_timeouts(1.0, Duration::ZERO);
        let key = IdempotencyKey::new(1, Effect::Charge);
        for attempt in 0..32 {
            assert!(matches!(gateway.charge(key, &order(1), attempt), Err(PaymentError::Timeout(_))));
        }
        let ledger = gateway.ledger();
        assert_eq!((ledger.timeouts, ledger.charged_cents, ledger.double_charges), (32, 500, 0));
    }

    #[test]
    fn a_redriven_generation_reserves_again_only_after_the_release() {
        let inventory = SimulatedInventory::new(Faults::default(), 1, 10, 0);
        let key = |effect, generation| IdempotencyKey { order: 1, effect, generation };
        inventory.reserve(key(Effect::Reserve, 0), &order(1), 0).expect("stock");
        inventory.reserve(key(Effect::Reserve, 1), &order(1), 0).expect("held: no change");
        assert_eq!(inventory.stock(0), Some(8));
        inventory.release(key(Effect::Release, 0), &order(1), 0).expect("release");
        inventory.reserve(key(Effect::Reserve, 1), &order(1), 0).expect("redrive");
        inventory.release(key(Effect::Release, 0), &order(1), 1).expect("a stale release");
        assert_eq!(inventory.stock(0), Some(8));
        assert_eq!(inventory.figures(), StockFigures { reserved_units: 4, released_units: 2 });
    }

    #[test]
    fn a_notification_goes_out_once_per_key() {
        let notifier = SimulatedNotifier::new(Faults::default());
        for _ in 0..3 {
            notifier.send(Channel::Email, IdempotencyKey::new(1, Effect::Email), &order(1), 0).expect("no faults");
        }
        notifier.send(Channel::Sms, IdempotencyKey::new(1, Effect::Sms), &order(1), 0).expect("no faults");
        let figures = notifier.figures();
        assert_eq!((figures.email_sent, figures.sms_sent, figures.duplicates_suppressed), (1, 1, 2));
    }
}
