//! The order flow as RabbitMQ users build it: separate services exchanging messages through a
//! broker, the baseline of the head-to-head (`scripts/head-to-head` runs it beside `conduit run`).
//!
//! ```text
//! driver --order.placed--> order --order.accepted--> payment --payment.charged--> inventory
//!                                                       |                           |  stock.reserved
//!                            order.cancel <-------------+---------------------------+  --> email, sms, shipping
//!                            (payment refunds, inventory releases)                        --> done.* --> driver
//! ```
//!
//! Every queue is durable with a dead-letter exchange, every message persistent and published
//! with publisher confirms; a service acknowledges a batch of its input only after the broker
//! confirmed everything the batch caused (at least once, as it must be), and its simulated port
//! (the same code as conduit's order pipeline calls, seeded alike) recognises a repeat by its
//! idempotency key. The driver publishes the seeded workload (the same orders as `conduit run`),
//! closed loop or at a fixed rate, and counts an order done when every branch reported: email,
//! SMS and shipping for a confirmed one, refund and release for a cancelled one.
//!
//! ```sh
//! rabbitmq_services setup --prefix h2h
//! rabbitmq_services service --prefix h2h --name payment      # one process per service
//! rabbitmq_services drive --prefix h2h --orders 100000 [--rate 2000]   # JSON on stdout
//! rabbitmq_services table conduit.json rabbitmq.json ...     # the Markdown table
//! ```
//!
//! The broker: `CONDUIT_AMQP_URL`, or RabbitMQ on loopback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use conduit_bridge::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use conduit_bridge::lapin::types::{AMQPValue, FieldTable};
use conduit_bridge::lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use conduit_bridge::{url_from_env, Bridge};
use conduit_orders::ports::{
    Channel as NotifyChannel, InventoryStore, Notifier, PaymentError, PaymentGateway, SimulatedCarrier,
    SimulatedInventory, SimulatedNotifier,
};
use conduit_orders::{Effect, IdempotencyKey, Order, SimConfig, Workload};
use futures_lite::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
enum Role {
    /// Declare the exchange, the queues (durable, dead-lettered) and their bindings; empty them.
    Setup {
        #[arg(long, default_value = "h2h")]
        prefix: String,
    },
    /// Run one service until it is killed.
    Service {
        #[arg(long, default_value = "h2h")]
        prefix: String,
        #[arg(long, value_enum)]
        name: Service,
        /// Messages delivered and not yet acknowledged.
        #[arg(long, default_value_t = 1_000)]
        prefetch: u16,
    },
    /// Publish the workload and wait until every order is done; a JSON report on stdout.
    Drive {
        #[arg(long, default_value = "h2h")]
        prefix: String,
        #[arg(long, default_value_t = 100_000)]
        orders: u64,
        /// Orders a second on a fixed schedule (open loop); without it, as fast as confirms allow.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Print the Markdown table of the reports (this example's and `conduit run --format json`'s).
    Table { reports: Vec<PathBuf> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Service {
    Order,
    Payment,
    Inventory,
    Email,
    Sms,
    Shipping,
}

impl Service {
    const ALL: [Self; 6] = [Self::Order, Self::Payment, Self::Inventory, Self::Email, Self::Sms, Self::Shipping];

    fn name(self) -> &'static str {
        match self {
            Self::Order => "order",
            Self::Payment => "payment",
            Self::Inventory => "inventory",
            Self::Email => "email",
            Self::Sms => "sms",
            Self::Shipping => "shipping",
        }
    }

    /// The routing keys its queue is bound to.
    fn bindings(self) -> &'static [&'static str] {
        match self {
            Self::Order => &["order.placed"],
            Self::Payment => &["order.accepted", "order.cancel"],
            Self::Inventory => &["payment.charged", "order.cancel"],
            Self::Email | Self::Sms | Self::Shipping => &["stock.reserved"],
        }
    }
}

/// What travels between the services: the order, when it was due (microseconds since the
/// epoch), and the attempt (a transient failure publishes the message again, one attempt on).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Message {
    order: Order,
    due_us: u64,
    attempt: u32,
}

fn now_us() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_micros()).expect("fits")
}

fn exchange(prefix: &str) -> String {
    format!("{prefix}.events")
}

async fn connect(name: &str) -> Connection {
    let properties = conduit_bridge::lapin::ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&url_from_env(), properties).await.expect("connects to the broker")
}

async fn setup(prefix: &str) {
    let connection = connect("h2h setup").await;
    let channel = connection.create_channel().await.expect("a channel");
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let dead = format!("{prefix}.dead");
    channel
        .exchange_declare(dead.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .expect("dlx");
    declare_queue(&channel, &dead, None).await;
    channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("binds");
    let events = exchange(prefix);
    channel
        .exchange_declare(events.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .expect("exchange");
    let mut queues: Vec<(String, Vec<&str>)> =
        Service::ALL.iter().map(|s| (format!("{prefix}.{}", s.name()), s.bindings().to_vec())).collect();
    queues.push((format!("{prefix}.results"), vec!["done.*"]));
    for (queue, keys) in queues {
        declare_queue(&channel, &queue, Some(&dead)).await;
        for key in keys {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    events.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("binds");
        }
        channel.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.expect("purges");
    }
    connection.close(200, "set up".into()).await.expect("closes");
}

async fn declare_queue(channel: &Channel, queue: &str, dead_letter: Option<&str>) {
    let mut arguments = FieldTable::default();
    if let Some(dead) = dead_letter {
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dead.into()));
    }
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments).await.expect("declares");
}

/// A publisher channel in confirm mode: publishes persistent JSON and waits for confirms.
struct Publisher {
    channel: Channel,
    exchange: String,
    pending: Vec<conduit_bridge::lapin::PublisherConfirm>,
}

impl Publisher {
    async fn new(connection: &Connection, prefix: &str) -> Self {
        let channel = connection.create_channel().await.expect("a channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        Self { channel, exchange: exchange(prefix), pending: Vec::new() }
    }

    async fn publish(&mut self, key: &str, message: &Message) {
        let body = serde_json::to_vec(message).expect("serializes");
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{key}-{}-{}", message.order.id, message.attempt).into());
        let confirm = self
            .channel
            .basic_publish(self.exchange.as_str().into(), key.into(), BasicPublishOptions::default(), &body, properties)
            .await
            .expect("publishes");
        self.pending.push(confirm);
    }

    /// Waits until the broker confirmed everything published so far.
    async fn confirmed(&mut self) {
        for confirm in self.pending.drain(..) {
            assert!(confirm.await.expect("a confirm").is_ack(), "the broker refused a message");
        }
    }
}

/// The simulated ports of the order flow, seeded as `conduit run` seeds them.
struct Ports {
    gateway: conduit_orders::ports::SimulatedGateway,
    inventory: SimulatedInventory,
    notifier: SimulatedNotifier,
    carrier: SimulatedCarrier,
}

impl Ports {
    fn new(sim: &SimConfig) -> Self {
        Self {
            gateway: sim.payment_gateway(),
            inventory: sim.inventory(),
            notifier: sim.notifier(),
            carrier: sim.carrier(),
        }
    }
}

/// What one message makes a service publish: `(routing key, message)`.
fn handle(service: Service, ports: &Ports, key: &str, message: Message) -> Vec<(&'static str, Message)> {
    let order = &message.order;
    let again = Message { attempt: message.attempt + 1, ..message };
    let idempotency = |effect| IdempotencyKey::new(order.id, effect);
    match (service, key) {
        (Service::Order, _) => {
            if order.quantity == 0 || order.amount_cents == 0 {
                vec![("done.rejected", message)]
            } else {
                vec![("order.accepted", message)]
            }
        }
        (Service::Payment, "order.cancel") => {
            match ports.gateway.refund(idempotency(Effect::Refund), order, message.attempt) {
                Ok(()) => vec![("done.refunded", message)],
                Err(_) => vec![("order.cancel", again)],
            }
        }
        (Service::Payment, _) => match ports.gateway.charge(idempotency(Effect::Charge), order, message.attempt) {
            Ok(()) => vec![("payment.charged", message)],
            Err(PaymentError::Declined(_) | PaymentError::Refunded(_)) => vec![("order.cancel", message)],
            Err(_) => vec![("order.accepted", again)],
        },
        (Service::Inventory, "order.cancel") => {
            // Releasing what was never reserved changes nothing.
            match ports.inventory.release(idempotency(Effect::Release), order, message.attempt) {
                Ok(()) => vec![("done.released", message)],
                Err(_) => vec![("order.cancel", again)],
            }
        }
        (Service::Inventory, _) => {
            match ports.inventory.reserve(idempotency(Effect::Reserve), order, message.attempt) {
                Ok(()) => vec![("stock.reserved", message)],
                Err(conduit_orders::ports::InventoryError::OutOfStock { .. }) => vec![("order.cancel", message)],
                Err(_) => vec![("payment.charged", again)],
            }
        }
        (Service::Email | Service::Sms, _) => {
            let (channel, effect, done) = match service {
                Service::Email => (NotifyChannel::Email, Effect::Email, "done.emailed"),
                _ => (NotifyChannel::Sms, Effect::Sms, "done.texted"),
            };
            match ports.notifier.send(channel, idempotency(effect), order, message.attempt) {
                Ok(()) => vec![(done, message)],
                Err(_) => vec![("stock.reserved", again)],
            }
        }
        (Service::Shipping, _) => {
            ports.carrier.ship(idempotency(Effect::Ship), order);
            vec![("done.shipped", message)]
        }
    }
}

/// A service: consume its queue in batches, handle each message, publish what it causes, wait
/// for the confirms, then acknowledge the batch.
async fn serve(prefix: &str, service: Service, prefetch: u16) {
    let ports = Ports::new(&SimConfig::default());
    let connection = connect(&format!("h2h {}", service.name())).await;
    let mut publisher = Publisher::new(&connection, prefix).await;
    let channel = connection.create_channel().await.expect("a channel");
    channel.basic_qos(prefetch, BasicQosOptions::default()).await.expect("qos");
    let queue = format!("{prefix}.{}", service.name());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            service.name().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consumes");
    let batch_max = usize::from(prefetch / 2).max(1);
    loop {
        let Some(first) = consumer.next().await else { return };
        let mut batch = vec![first.expect("a delivery")];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1);
        while batch.len() < batch_max {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(delivery)) => batch.push(delivery.expect("a delivery")),
                _ => break,
            }
        }
        for delivery in &batch {
            let message: Message = serde_json::from_slice(&delivery.data).expect("a message of the flow");
            for (key, out) in handle(service, &ports, delivery.routing_key.as_str(), message) {
                publisher.publish(key, &out).await;
            }
        }
        publisher.confirmed().await;
        let last = batch.last().expect("one at least");
        last.acker.ack(BasicAckOptions { multiple: true }).await.expect("acks");
    }
}

/// The branches of an order the driver hears of, as bits: an order is done when every branch of
/// its outcome reported.
const EMAILED: u8 = 1;
const TEXTED: u8 = 1 << 1;
const SHIPPED: u8 = 1 << 2;
const REFUNDED: u8 = 1 << 3;
const RELEASED: u8 = 1 << 4;
const REJECTED: u8 = 1 << 5;
const CONFIRMED: u8 = EMAILED | TEXTED | SHIPPED;
const CANCELLED: u8 = REFUNDED | RELEASED;

/// The driver's report (the same fields as `conduit run`'s where they mean the same).
#[derive(Debug, Serialize, Deserialize)]
struct DriveReport {
    design: String,
    orders: u64,
    confirmed: u64,
    cancelled: u64,
    rejected: u64,
    offered_per_s: Option<f64>,
    orders_per_sec: f64,
    elapsed_s: f64,
    end_to_end_ms: Percentiles,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Counts the orders done as the results come in, until all `orders` are: confirmed, cancelled
/// and rejected, and their end-to-end latencies in microseconds.
async fn count(
    mut consumer: conduit_bridge::lapin::Consumer,
    orders: u64,
) -> (u64, u64, u64, hdrhistogram::Histogram<u64>) {
    // Per order: which branches reported (bits), until every branch of its outcome did.
    let mut branches: HashMap<u64, u8> = HashMap::new();
    // Microseconds, up to an hour.
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("a histogram");
    let (mut confirmed, mut cancelled, mut rejected, mut delivered) = (0u64, 0u64, 0u64, 0u64);
    while confirmed + cancelled + rejected < orders {
        let delivery = consumer.next().await.expect("the results go on").expect("a delivery");
        delivered += 1;
        let message: Message = serde_json::from_slice(&delivery.data).expect("a message of the flow");
        let bit = match delivery.routing_key.as_str() {
            "done.emailed" => EMAILED,
            "done.texted" => TEXTED,
            "done.shipped" => SHIPPED,
            "done.refunded" => REFUNDED,
            "done.released" => RELEASED,
            _ => REJECTED,
        };
        let seen = branches.entry(message.order.id).or_default();
        let before = *seen;
        *seen |= bit;
        let reached = |outcome: u8| *seen & outcome == outcome && before & outcome != outcome;
        let done = if reached(CONFIRMED) {
            Some(&mut confirmed)
        } else if reached(CANCELLED) {
            Some(&mut cancelled)
        } else if reached(REJECTED) {
            Some(&mut rejected)
        } else {
            None
        };
        if let Some(count) = done {
            *count += 1;
            latency.saturating_record(now_us().saturating_sub(message.due_us));
            branches.remove(&message.order.id);
        }
        if delivered % 500 == 0 {
            delivery.acker.ack(BasicAckOptions { multiple: true }).await.expect("acks");
        }
    }
    (confirmed, cancelled, rejected, latency)
}

// Slots of a schedule: the rate is positive and finite, counts fit f64 exactly.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
async fn drive(prefix: &str, orders: u64, rate: Option<f64>) -> DriveReport {
    let sim = SimConfig::default();
    let connection = connect("h2h driver").await;
    let results = connection.create_channel().await.expect("a channel");
    results.basic_qos(2_000, BasicQosOptions::default()).await.expect("qos");
    let consumer = results
        .basic_consume(
            format!("{prefix}.results").as_str().into(),
            "driver".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consumes the results");
    let started = Instant::now();
    let counting = tokio::spawn(count(consumer, orders));
    let mut publisher = Publisher::new(&connection, prefix).await;
    let mut workload = Workload::new(sim.seed, sim.skus, sim.customers);
    let epoch_started = now_us();
    let mut sent = 0u64;
    while sent < orders {
        let chunk = match rate {
            // Orders due by now, at least one: the first waits for its slot.
            Some(rate) => {
                let slot = Duration::from_secs_f64(sent as f64 / rate);
                if let Some(wait) = slot.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                due.saturating_sub(sent).clamp(1, orders - sent)
            }
            None => 1_000.min(orders - sent),
        };
        for order in workload.by_ref().take(chunk as usize) {
            let due_us = match rate {
                Some(rate) => epoch_started + ((order.id - 1) as f64 / rate * 1e6) as u64,
                None => now_us(),
            };
            publisher.publish("order.placed", &Message { order, due_us, attempt: 0 }).await;
        }
        publisher.confirmed().await;
        sent += chunk;
    }
    let (confirmed, cancelled, rejected, latency) = counting.await.expect("the count ends");
    let elapsed_s = started.elapsed().as_secs_f64();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1_000.0;
    DriveReport {
        design: "RabbitMQ services".into(),
        orders,
        confirmed,
        cancelled,
        rejected,
        offered_per_s: rate,
        orders_per_sec: orders as f64 / elapsed_s,
        elapsed_s,
        end_to_end_ms: Percentiles {
            p50: ms(0.5),
            p99: ms(0.99),
            p999: ms(0.999),
            max: latency.max() as f64 / 1_000.0,
        },
    }
}

/// A row of the table from either report.
fn row(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let f = |pointer: &str| json.pointer(pointer).and_then(serde_json::Value::as_f64);
    let (design, offered, per_s, p50, p99, p999) = if json.get("design").is_some() {
        (
            json["design"].as_str().unwrap_or("?").to_owned(),
            f("/offered_per_s"),
            f("/orders_per_sec"),
            f("/end_to_end_ms/p50"),
            f("/end_to_end_ms/p99"),
            f("/end_to_end_ms/p999"),
        )
    } else {
        let us = |pointer: &str| f(pointer).map(|v| v / 1_000.0);
        let achieved = f("/load/achieved_per_s");
        (
            "conduit (one process, durable log)".to_owned(),
            f("/load/offered_per_s"),
            // Closed loop: orders over the run's time; open loop: the rate sustained.
            achieved.or_else(|| f("/orders_per_sec")),
            us("/end_to_end_us/p50"),
            us("/end_to_end_us/p99"),
            us("/end_to_end_us/p999"),
        )
    };
    let show = |v: Option<f64>, digits: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"));
    format!(
        "| {design} | {} | {} | {} | {} | {} |",
        offered.map_or_else(|| "closed loop".into(), |v| format!("{v:.0}/s")),
        show(per_s, 0),
        show(p50, 2),
        show(p99, 2),
        show(p999, 2)
    )
}

fn main() {
    let bridge = Bridge::new().expect("a runtime");
    match Role::parse() {
        Role::Setup { prefix } => bridge.block_on(setup(&prefix)),
        Role::Service { prefix, name, prefetch } => bridge.block_on(serve(&prefix, name, prefetch)),
        Role::Drive { prefix, orders, rate } => {
            let report = bridge.block_on(drive(&prefix, orders, rate));
            println!("{}", serde_json::to_string(&report).expect("serializes"));
        }
        Role::Table { reports } => {
            println!("| design | offered | orders/s | end-to-end p50 ms | p99 ms | p99.9 ms |");
            println!("|---|---|---|---|---|---|");
            for path in &reports {
                println!("{}", row(path));
            }
        }
    }
}
