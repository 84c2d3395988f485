//! The order domain: orders, the events that move them, idempotency keys, a seeded workload.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use conduit::Message;

/// A customer's order for some quantity of one SKU (in JSON as it travels over a broker:
/// `{"id":1,"customer":7,"sku":3,"quantity":2,"amount_cents":1998}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// Unique order id; the pipeline's key.
    pub id: u64,
    /// Who placed it.
    pub customer: u64,
    /// What was ordered.
    pub sku: u32,
    /// How many units.
    pub quantity: u32,
    /// What the customer pays, in cents.
    pub amount_cents: u64,
}

/// Why an order was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The payment gateway declined the charge.
    PaymentDeclined,
    /// The SKU had too few units left.
    OutOfStock,
}

impl CancelReason {
    /// The reason's byte in journal payloads.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Self::PaymentDeclined => 1,
            Self::OutOfStock => 2,
        }
    }

    /// The reason of a journal byte.
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::PaymentDeclined),
            2 => Some(Self::OutOfStock),
            _ => None,
        }
    }
}

/// Record kinds of the order pipeline's facts in the journal. Every message between stages is
/// one of these facts: the payment stage acts on `ACCEPTED`, the inventory stage on `CHARGED`.
pub mod kinds {
    /// An order was submitted (payload: the order).
    pub const PLACED: u16 = 1;
    /// The order stage validated it.
    pub const ACCEPTED: u16 = 2;
    /// The customer was charged.
    pub const CHARGED: u16 = 3;
    /// The charge was declined.
    pub const DECLINED: u16 = 4;
    /// Stock was reserved: the order is confirmed.
    pub const RESERVED: u16 = 5;
    /// The SKU was out of stock.
    pub const OUT_OF_STOCK: u16 = 6;
    /// The confirmation email went out.
    pub const EMAILED: u16 = 7;
    /// The confirmation SMS went out.
    pub const TEXTED: u16 = 8;
    /// The order shipped.
    pub const SHIPPED: u16 = 9;
    /// Compensation finished: the order is cancelled (payload: the reason's code).
    pub const CANCELLED: u16 = 10;
    /// A step of the order's saga failed: what it completed is undone (the orchestrated flow).
    pub const UNDOING: u16 = 11;
    /// A fact of the order's saga (payload: a `conduit::saga::Fact`): a step's outcome, or a
    /// compensation run (the orchestrated flow).
    pub const SAGA: u16 = 12;
    /// The order stage accepted the order and started its saga (the orchestrated flow's
    /// `accepted`): the order's later facts are the saga's.
    pub const SAGA_STARTED: u16 = 13;

    /// The name of a kind, for people.
    #[must_use]
    pub fn name(kind: u16) -> &'static str {
        match kind {
            PLACED => "placed",
            ACCEPTED => "accepted",
            CHARGED => "charged",
            DECLINED => "declined",
            RESERVED => "reserved",
            OUT_OF_STOCK => "out_of_stock",
            EMAILED => "emailed",
            TEXTED => "texted",
            SHIPPED => "shipped",
            CANCELLED => "cancelled",
            UNDOING => "undoing",
            SAGA => "saga",
            SAGA_STARTED => "saga_started",
            conduit::log::KIND_DEAD_LETTER => "dead_lettered",
            conduit::log::KIND_COMPLETED => "completed",
            _ => "unknown",
        }
    }
}

/// The step an event asks of the stage it is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A new order, to validate (order stage).
    Place,
    /// Charge the customer (payment stage).
    Charge,
    /// Reserve the units (inventory stage).
    Reserve,
    /// Tell the customer the order is confirmed (email and SMS stages).
    Notify,
    /// Ship it; the order is then confirmed (shipping stage).
    Ship,
    /// Undo what was done, in reverse, and cancel (compensation stage).
    Compensate(CancelReason),
    /// Run the compensations the order's saga owes, one at a time (compensation stage of the
    /// orchestrated flow: the saga's book says which).
    Undo,
    /// A service's answer, announced to whoever listens (the choreographed flow).
    Announce(Announced),
    /// Undo what the cancellation names, and cancel (compensation stage of the choreographed
    /// flow).
    Cancel(Cancellation),
}

/// What a service of the choreographed flow announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// The payment service charged the order.
    Charged,
    /// The payment service declined it.
    Declined,
    /// The inventory reserved its units.
    Reserved,
    /// The inventory had too few units.
    OutOfStock,
}

impl Announced {
    fn code(self) -> u8 {
        match self {
            Self::Charged => 1,
            Self::Declined => 2,
            Self::Reserved => 3,
            Self::OutOfStock => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Charged),
            2 => Some(Self::Declined),
            3 => Some(Self::Reserved),
            4 => Some(Self::OutOfStock),
            _ => None,
        }
    }
}

/// Why an order of the choreographed flow is cancelled, and what is to be undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancellation {
    /// Refund the charge (made, or maybe made).
    pub refund: bool,
    /// Release the reservation.
    pub release: bool,
    /// Cancel the shipment (booked, or maybe booked).
    pub cancel_shipment: bool,
    /// Why.
    pub cause: CancelCause,
}

/// Why an order was cancelled, as the choreographed flow tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelCause {
    /// The charge was declined.
    Declined,
    /// The SKU ran out.
    OutOfStock,
    /// The carrier failed the shipment.
    Unshipped,
    /// A service's event was dead-lettered (its retries spent).
    DeadLettered,
}

impl Cancellation {
    /// The cancellation as one byte: the three undo bits, then the cause in bits 4 and 5.
    fn code(self) -> u8 {
        let cause = match self.cause {
            CancelCause::Declined => 0,
            CancelCause::OutOfStock => 1,
            CancelCause::Unshipped => 2,
            CancelCause::DeadLettered => 3,
        };
        u8::from(self.refund) | u8::from(self.release) << 1 | u8::from(self.cancel_shipment) << 2 | cause << 4
    }

    fn from_code(code: u8) -> Option<Self> {
        if code & 0b1100_1000 != 0 {
            return None;
        }
        let cause = match code >> 4 {
            0 => CancelCause::Declined,
            1 => CancelCause::OutOfStock,
            2 => CancelCause::Unshipped,
            _ => CancelCause::DeadLettered,
        };
        Some(Self { refund: code & 1 != 0, release: code & 2 != 0, cancel_shipment: code & 4 != 0, cause })
    }
}

/// The message the order pipeline carries: an order and the step asked of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderEvent {
    /// The order.
    pub order: Order,
    /// What the receiving stage is asked to do.
    pub step: Step,
    /// How many times the order was redriven from the dead letters (0 at first). Each redrive
    /// runs the order's saga again under fresh idempotency keys: the dead letter's compensation
    /// refunded and released what the earlier run did.
    pub generation: u32,
}

impl OrderEvent {
    /// A new order, to place.
    #[must_use]
    pub fn place(order: Order) -> Self {
        Self { order, step: Step::Place, generation: 0 }
    }

    /// The same order and generation, asking for `step`.
    #[must_use]
    pub fn then(self, step: Step) -> Self {
        Self { step, ..self }
    }

    /// The key of `effect` for this event's order and generation.
    #[must_use]
    pub fn key(&self, effect: Effect) -> IdempotencyKey {
        IdempotencyKey { order: self.order.id, effect, generation: self.generation }
    }

    /// Bytes of an encoded event of generation 0: the order's five fields, the step, the cancel
    /// reason. A later generation appends it (four more bytes).
    pub const ENCODED_LEN: usize = 34;
    /// Bytes of an encoded event of a later generation.
    pub const ENCODED_LEN_REDRIVEN: usize = Self::ENCODED_LEN + 4;

    /// The fact that asks for this step: the record kind of this message in the journal.
    #[must_use]
    pub fn kind(&self) -> u16 {
        match self.step {
            Step::Place => kinds::PLACED,
            Step::Charge => kinds::ACCEPTED,
            Step::Reserve | Step::Announce(Announced::Charged) => kinds::CHARGED,
            Step::Notify | Step::Ship | Step::Announce(Announced::Reserved) => kinds::RESERVED,
            Step::Compensate(CancelReason::PaymentDeclined) | Step::Announce(Announced::Declined) => kinds::DECLINED,
            Step::Compensate(CancelReason::OutOfStock) | Step::Announce(Announced::OutOfStock) => kinds::OUT_OF_STOCK,
            Step::Undo | Step::Cancel(_) => kinds::UNDOING,
        }
    }

    /// Appends the event's journal payload (little-endian, [`Self::ENCODED_LEN`] bytes).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let o = &self.order;
        out.extend_from_slice(&o.id.to_le_bytes());
        out.extend_from_slice(&o.customer.to_le_bytes());
        out.extend_from_slice(&o.sku.to_le_bytes());
        out.extend_from_slice(&o.quantity.to_le_bytes());
        out.extend_from_slice(&o.amount_cents.to_le_bytes());
        let (step, reason) = match self.step {
            Step::Place => (0, 0),
            Step::Charge => (1, 0),
            Step::Reserve => (2, 0),
            Step::Notify => (3, 0),
            Step::Ship => (4, 0),
            Step::Compensate(reason) => (5, reason.code()),
            Step::Undo => (6, 0),
            Step::Announce(announced) => (7, announced.code()),
            Step::Cancel(cancellation) => (8, cancellation.code()),
        };
        out.extend_from_slice(&[step, reason]);
        if self.generation > 0 {
            out.extend_from_slice(&self.generation.to_le_bytes());
        }
    }

    /// Reads a journal payload; `None` if it is not one.
    #[must_use]
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let generation = match bytes.len() {
            Self::ENCODED_LEN => 0,
            Self::ENCODED_LEN_REDRIVEN => match bytes[Self::ENCODED_LEN..].try_into().map(u32::from_le_bytes) {
                Ok(0) | Err(_) => return None,
                Ok(generation) => generation,
            },
            _ => return None,
        };
        let u64_at = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let u32_at = |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        let order = Order {
            id: u64_at(0)?,
            customer: u64_at(8)?,
            sku: u32_at(16)?,
            quantity: u32_at(20)?,
            amount_cents: u64_at(24)?,
        };
        let step = match (bytes[32], bytes[33]) {
            (0, 0) => Step::Place,
            (1, 0) => Step::Charge,
            (2, 0) => Step::Reserve,
            (3, 0) => Step::Notify,
            (4, 0) => Step::Ship,
            (5, reason) => Step::Compensate(CancelReason::from_code(reason)?),
            (6, 0) => Step::Undo,
            (7, code) => Step::Announce(Announced::from_code(code)?),
            (8, code) => Step::Cancel(Cancellation::from_code(code)?),
            _ => return None,
        };
        Some(Self { order, step, generation })
    }
}

/// The order pipeline's journal codec: messages are recorded as the fact that asks for them.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderCodec;

impl conduit::JournalCodec<OrderEvent> for OrderCodec {
    fn encode(&self, msg: &OrderEvent, payload: &mut Vec<u8>) -> u16 {
        msg.encode(payload);
        msg.kind()
    }

    fn decode(&self, kind: u16, payload: &[u8]) -> Option<OrderEvent> {
        OrderEvent::decode(payload).filter(|event| event.kind() == kind)
    }
}

impl Message for OrderEvent {
    fn key(&self) -> u64 {
        self.order.id
    }
}

/// A side effect the pipeline performs at most once per order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// Charging the customer.
    Charge,
    /// Refunding the charge.
    Refund,
    /// Reserving units.
    Reserve,
    /// Releasing the reservation.
    Release,
    /// The confirmation email.
    Email,
    /// The confirmation SMS.
    Sms,
    /// The shipment.
    Ship,
}

/// The stable key a port uses to recognise a repeated request for the same effect.
///
/// It depends only on the order, the effect and the order's redrive generation, never on the
/// attempt, so a retried or redelivered request is recognised as the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey {
    /// The order.
    pub order: u64,
    /// The effect.
    pub effect: Effect,
    /// The order's redrive generation (see [`OrderEvent::generation`]).
    pub generation: u32,
}

impl IdempotencyKey {
    /// The key of `effect` for `order`'s first run (generation 0).
    #[must_use]
    pub fn new(order: u64, effect: Effect) -> Self {
        Self { order, effect, generation: 0 }
    }
}

const SALT_POISON: u64 = 0x9015_0000;

/// A seeded, endless stream of orders with ids 1, 2, 3, ...
#[derive(Debug, Clone)]
pub struct Workload {
    rng: SmallRng,
    seed: u64,
    next_id: u64,
    skus: u32,
    customers: u64,
    poison_rate: f64,
    poisoned: u64,
}

impl Workload {
    /// Orders spread uniformly over `skus` SKUs and `customers` customers.
    #[must_use]
    pub fn new(seed: u64, skus: u32, customers: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            seed,
            next_id: 1,
            skus: skus.max(1),
            customers: customers.max(1),
            poison_rate: 0.0,
            poisoned: 0,
        }
    }

    /// Makes about `rate` of the orders malformed: their payload arrives zeroed past the id (no
    /// SKU, quantity or amount), as from a broken producer. Which orders is a function of the seed
    /// and the id alone.
    #[must_use]
    pub fn poisoned(mut self, rate: f64) -> Self {
        self.poison_rate = rate;
        self
    }

    /// Malformed orders generated so far.
    #[must_use]
    pub fn poisoned_count(&self) -> u64 {
        self.poisoned
    }

    /// The unit price of a SKU, in cents: fixed per SKU, between 1.00 and 100.00.
    #[must_use]
    pub fn unit_price_cents(sku: u32) -> u64 {
        100 + (crate::ports::mix64(u64::from(sku)) % 9_901)
    }
}

impl Iterator for Workload {
    type Item = Order;

    fn next(&mut self) -> Option<Order> {
        let id = self.next_id;
        self.next_id += 1;
        let sku = self.rng.random_range(0..self.skus);
        let quantity = self.rng.random_range(1..=3);
        if self.poison_rate > 0.0 && crate::ports::chance(self.seed, id, 0, SALT_POISON) < self.poison_rate {
            self.poisoned += 1;
            return Some(Order { id, customer: 0, sku: 0, quantity: 0, amount_cents: 0 });
        }
        Some(Order {
            id,
            customer: self.rng.random_range(1..=self.customers),
            sku,
            quantity,
            amount_cents: Self::unit_price_cents(sku) * u64::from(quantity),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_round_trips_through_its_payload() {
        let order = Order { id: u64::MAX, customer: 3, sku: u32::MAX, quantity: 2, amount_cents: 12_345 };
        let steps = [
            Step::Place,
            Step::Charge,
            Step::Reserve,
            Step::Notify,
            Step::Ship,
            Step::Compensate(CancelReason::OutOfStock),
            Step::Compensate(CancelReason::PaymentDeclined),
        ];
        for step in steps {
            for generation in [0, 1, u32::MAX] {
                let event = OrderEvent { order, step, generation };
                let mut bytes = Vec::new();
                event.encode(&mut bytes);
                let len = if generation == 0 { OrderEvent::ENCODED_LEN } else { OrderEvent::ENCODED_LEN_REDRIVEN };
                assert_eq!(bytes.len(), len);
                assert_eq!(OrderEvent::decode(&bytes), Some(event));
            }
        }
        // Generation 0 has one encoding only: the short one.
        let mut long = vec![0; OrderEvent::ENCODED_LEN_REDRIVEN];
        long[24] = 1;
        long[20] = 1;
        assert_eq!(OrderEvent::decode(&long), None);
        assert_eq!(OrderEvent::decode(&[0; 33]), None);
        let mut bad = vec![0; OrderEvent::ENCODED_LEN];
        bad[32] = 9;
        assert_eq!(OrderEvent::decode(&bad), None);
    }

    #[test]
    fn workload_is_reproducible_from_its_seed() {
        let a: Vec<_> = Workload::new(7, 100, 10).take(100).collect();
        let b: Vec<_> = Workload::new(7, 100, 10).take(100).collect();
        let c: Vec<_> = Workload::new(8, 100, 10).take(100).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().enumerate().all(|(i, o)| o.id == i as u64 + 1 && o.sku < 100 && o.amount_cents >= 100));
    }
}
