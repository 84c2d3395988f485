//! The order domain: orders, the events that move them, idempotency keys, a seeded workload.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::Message;

/// A customer's order for some quantity of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
}

/// The message the order pipeline carries: an order and the step asked of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderEvent {
    /// The order.
    pub order: Order,
    /// What the receiving stage is asked to do.
    pub step: Step,
}

impl OrderEvent {
    /// The same order, asking for `step`.
    #[must_use]
    pub fn then(self, step: Step) -> Self {
        Self { order: self.order, step }
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
}

/// The stable key a port uses to recognise a repeated request for the same effect.
///
/// It depends only on the order and the effect, never on the attempt, so a retried or
/// redelivered request is recognised as the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey {
    /// The order.
    pub order: u64,
    /// The effect.
    pub effect: Effect,
}

impl IdempotencyKey {
    /// The key of `effect` for `order`.
    #[must_use]
    pub fn new(order: u64, effect: Effect) -> Self {
        Self { order, effect }
    }
}

/// A seeded, endless stream of orders with ids 1, 2, 3, ...
#[derive(Debug, Clone)]
pub struct Workload {
    rng: SmallRng,
    next_id: u64,
    skus: u32,
    customers: u64,
}

impl Workload {
    /// Orders spread uniformly over `skus` SKUs and `customers` customers.
    #[must_use]
    pub fn new(seed: u64, skus: u32, customers: u64) -> Self {
        Self { rng: SmallRng::seed_from_u64(seed), next_id: 1, skus: skus.max(1), customers: customers.max(1) }
    }

    /// The unit price of a SKU, in cents: fixed per SKU, between 1.00 and 100.00.
    #[must_use]
    pub fn unit_price_cents(sku: u32) -> u64 {
        100 + (crate::orders::ports::mix64(u64::from(sku)) % 9_901)
    }
}

impl Iterator for Workload {
    type Item = Order;

    fn next(&mut self) -> Option<Order> {
        let id = self.next_id;
        self.next_id += 1;
        let sku = self.rng.random_range(0..self.skus);
        let quantity = self.rng.random_range(1..=3);
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
    fn workload_is_reproducible_from_its_seed() {
        let a: Vec<_> = Workload::new(7, 100, 10).take(100).collect();
        let b: Vec<_> = Workload::new(7, 100, 10).take(100).collect();
        let c: Vec<_> = Workload::new(8, 100, 10).take(100).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().enumerate().all(|(i, o)| o.id == i as u64 + 1 && o.sku < 100 && o.amount_cents >= 100));
    }
}
