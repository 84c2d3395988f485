//! The inbox: commands in from a broker's queue, acknowledged only once they are durable.
//!
//! An [`Inbox`] consumes a queue with manual acknowledgements and a prefetch, gathers what
//! arrives into batches, and hands each batch to the application's [`Landing`], which makes the
//! new commands durable (in conduit's log) before it returns. Only then does the inbox
//! acknowledge them to the broker. A crash between the two leaves the messages unacknowledged:
//! the broker delivers them again, and they are recognised by their message ids:
//!
//! - in a bounded window of the ids this inbox landed (`dedupe`): a repeat within the window is
//!   acknowledged and dropped without reaching the landing;
//! - by the landing itself, which checks what outlived the window and the process (the orders
//!   node looks each order up in its log): a command it already holds is a
//!   [`Verdict::Duplicate`].
//!
//! A message the landing cannot take (not a command, no message id) is rejected without requeue,
//! so the broker dead-letters it (the queue's dead-letter exchange) and nothing is lost. When the
//! connection drops or the broker restarts, the inbox reconnects with backoff and jitter
//! ([`Backoff`](crate::Backoff)); what it had not acknowledged comes again and is recognised.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use conduit::dedup::{DedupWindow, WindowLimits};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use serde::{Deserialize, Serialize};

use crate::{Bridge, BridgeError, ConnectionSettings, Reconnects};

/// Where an inbox reads and how much it takes at once (the `[bridge]` table's inbox keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxSettings {
    /// The queue consumed.
    pub queue: String,
    /// Declare the queue (durable), the exchange, the binding and the dead-letter exchange and
    /// queue before consuming; off where the broker's owners declare the topology.
    pub declare: bool,
    /// The exchange the queue is bound to (direct, durable), when declaring.
    pub exchange: String,
    /// The routing key binding the queue to `exchange` (the partition this node owns).
    pub binding: String,
    /// Where refused messages go (a fanout exchange with a durable queue of the same name).
    pub dead_letter_exchange: String,
    /// Most messages delivered and not yet acknowledged (the broker's prefetch).
    pub prefetch: u16,
    /// Most messages landed in one batch.
    pub batch: usize,
    /// Longest a batch waits for more messages after its first, in milliseconds.
    pub linger_ms: u64,
    /// Most message ids the dedupe window holds.
    pub dedupe_keys: usize,
    /// Longest the dedupe window holds an id, in seconds.
    pub dedupe_secs: u64,
}

impl Default for InboxSettings {
    fn default() -> Self {
        Self {
            queue: "conduit.orders.0".into(),
            declare: true,
            exchange: "conduit.orders".into(),
            binding: "0".into(),
            dead_letter_exchange: "conduit.orders.refused".into(),
            prefetch: 2_048,
            batch: 1_024,
            linger_ms: 5,
            dedupe_keys: 1 << 20,
            dedupe_secs: 600,
        }
    }
}

impl InboxSettings {
    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let refuse = |field: &str, why: &str| Err(BridgeError::Settings(format!("bridge.{field}: {why}")));
        if self.queue.is_empty() {
            return refuse("queue", "name the queue to consume");
        }
        if self.declare && (self.exchange.is_empty() || self.dead_letter_exchange.is_empty()) {
            return refuse("exchange", "declaring the topology needs an exchange and a dead_letter_exchange");
        }
        if self.prefetch == 0 {
            return refuse("prefetch", "must be at least 1 (0 would let the broker send without limit)");
        }
        if self.batch == 0 {
            return refuse("batch", "must be at least 1");
        }
        if self.batch > usize::from(self.prefetch) {
            return refuse("batch", "must be at most prefetch (a batch waits for messages the broker holds back)");
        }
        self.dedupe().validate("bridge.dedupe_keys and dedupe_secs").map_err(BridgeError::Settings)
    }

    fn dedupe(&self) -> WindowLimits {
        WindowLimits { max_keys: self.dedupe_keys, max_age: Duration::from_secs(self.dedupe_secs) }
    }
}

/// A message as the inbox hands it to the landing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The publisher's message id (the inbox refuses messages without one).
    pub message_id: String,
    /// The body.
    pub body: Vec<u8>,
    /// Whether the broker delivered it before (to this node or another) without an ack.
    pub redelivered: bool,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Durable now: acknowledged.
    Landed,
    /// Already held (landed before): acknowledged, nothing done.
    Duplicate,
    /// Not a command this node can take: rejected, and the broker dead-letters it.
    Refused(String),
}

/// The application's side of an inbox: makes the new commands of a batch durable.
pub trait Landing {
    /// Lands `messages` (in delivery order, no two with the same id: a repeat within a batch waits
    /// for a later call, made once the first is settled) and says what became of
    /// each, in the same order. It returns only when every [`Verdict::Landed`] one is durable;
    /// an error acknowledges nothing and stops the inbox.
    fn land(&mut self, messages: &[Inbound]) -> Result<Vec<Verdict>, Box<dyn std::error::Error + Send + Sync>>;
}

/// When an inbox stops.
#[derive(Debug, Default)]
pub struct Until<'a> {
    /// Set by another thread (a signal handler) to stop after the batch in hand.
    pub stop: Option<&'a AtomicBool>,
    /// Stop once no message came for this long while consuming (time spent reconnecting does
    /// not count).
    pub idle: Option<Duration>,
}

/// What an inbox did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InboxReport {
    /// Messages delivered (repeats included).
    pub delivered: u64,
    /// Landed and acknowledged.
    pub landed: u64,
    /// Recognised by the inbox's window and acknowledged without landing.
    pub duplicates_in_window: u64,
    /// Recognised by the landing (held from before) and acknowledged.
    pub duplicates_landed_before: u64,
    /// Delivered again by the broker (the `redelivered` flag).
    pub redelivered: u64,
    /// Rejected to the dead-letter exchange.
    pub refused: u64,
    /// Batches landed.
    pub batches: u64,
    /// Times the connection was lost and made again.
    pub reconnects: u64,
    /// The last connection failure, if any.
    pub last_failure: Option<String>,
}

/// A consumer of a broker's queue that acknowledges only what its [`Landing`] made durable, and
/// recognises repeats by message id: in a bounded window of the ids it landed, then by asking the
/// landing (which holds what outlived the window and the process).
pub struct Inbox<'a> {
    bridge: &'a Bridge,
    connection: ConnectionSettings,
    settings: InboxSettings,
    /// Ids landed or recognised lately, by a 128-bit digest of the message id.
    window: DedupWindow<u128, ()>,
    report: InboxReport,
    name: String,
}

impl std::fmt::Debug for Inbox<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("settings", &self.settings).field("report", &self.report).finish_non_exhaustive()
    }
}

/// How a connection ended.
enum Ended {
    /// As asked (stop or idle).
    Asked,
    /// The landing failed: the inbox stops.
    Landing(Box<dyn std::error::Error + Send + Sync>),
}

impl<'a> Inbox<'a> {
    /// An inbox on `bridge`'s runtime; `name` names its connections on the broker.
    pub fn new(
        bridge: &'a Bridge,
        connection: ConnectionSettings,
        settings: InboxSettings,
        name: &str,
    ) -> Result<Self, BridgeError> {
        connection.validate()?;
        settings.validate()?;
        #[cfg(feature = "crashpoints")]
        conduit::crashpoint::register(&crate::CRASH_POINTS);
        let window = DedupWindow::new(settings.dedupe());
        Ok(Self { bridge, connection, settings, window, report: InboxReport::default(), name: name.to_owned() })
    }

    /// Consumes until `until` says stop, landing each batch with `landing` and reconnecting
    /// whenever the connection is lost. Returns what it did; an error only when the landing
    /// failed (the batch in hand is not acknowledged: the broker delivers it again).
    pub fn run(&mut self, landing: &mut dyn Landing, until: &Until<'_>) -> Result<InboxReport, BridgeError> {
        let mut reconnects = Reconnects::new(self.connection.reconnect);
        loop {
            let landed_before = self.report.landed + self.report.duplicates_in_window;
            match self.bridge.block_on(self.session(landing, until)) {
                Ok(Ended::Asked) => return Ok(self.report.clone()),
                Ok(Ended::Landing(error)) => return Err(BridgeError::Landing(error.to_string())),
                Err(error) => {
                    if until.stop.is_some_and(|stop| stop.load(Ordering::Acquire)) {
                        return Ok(self.report.clone());
                    }
                    if self.report.landed + self.report.duplicates_in_window > landed_before {
                        reconnects.progressed();
                    }
                    reconnects.wait_after(&error, "the inbox");
                    self.report.last_failure = Some(error.to_string());
                    self.report.reconnects += 1;
                }
            }
        }
    }

    /// What the inbox did so far.
    #[must_use]
    pub fn report(&self) -> &InboxReport {
        &self.report
    }

    /// One connection: declare, consume, land and acknowledge batch after batch.
    async fn session(&mut self, landing: &mut dyn Landing, until: &Until<'_>) -> Result<Ended, BridgeError> {
        let connection = self.connection.connect(&self.name).await?;
        let channel = connection.create_channel().await?;
        if self.settings.declare {
            declare(&channel, &self.settings).await?;
        }
        channel.basic_qos(self.settings.prefetch, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                self.settings.queue.as_str().into(),
                self.name.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let linger = Duration::from_millis(self.settings.linger_ms);
        let mut last_delivery = Instant::now();
        let mut batch: Vec<Delivery> = Vec::with_capacity(self.settings.batch);
        loop {
            if until.stop.is_some_and(|stop| stop.load(Ordering::Acquire))
                || until.idle.is_some_and(|idle| last_delivery.elapsed() >= idle)
            {
                // Unacknowledged deliveries go back to the queue when the connection closes.
                connection.close(200, "conduit inbox stopping".into()).await?;
                return Ok(Ended::Asked);
            }
            match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
                Err(_) => continue,
                Ok(None) => return Err(BridgeError::Cancelled),
                Ok(Some(delivery)) => batch.push(delivery?),
            }
            let deadline = tokio::time::Instant::now() + linger;
            while batch.len() < self.settings.batch {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => batch.push(delivery),
                    // The batch in hand is landed; the error comes back at the next read.
                    Ok(Some(Err(_)) | None) | Err(_) => break,
                }
            }
            last_delivery = Instant::now();
            if let Some(ended) = self.settle(landing, &mut batch).await? {
                return Ok(ended);
            }
        }
    }

    /// Lands a batch and acknowledges (or rejects) each of its messages.
    async fn settle(
        &mut self,
        landing: &mut dyn Landing,
        batch: &mut Vec<Delivery>,
    ) -> Result<Option<Ended>, BridgeError> {
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.len()];
        for delivery in batch.iter() {
            self.report.delivered += 1;
            self.report.redelivered += u64::from(delivery.redelivered);
        }
        // Rounds: a message whose id an earlier one of the batch holds waits for the next round,
        // where it is a repeat if that one landed, and lands itself if that one was refused.
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        while !pending.is_empty() {
            let mut round = std::collections::HashSet::with_capacity(pending.len());
            let (mut inbound, mut landing_index, mut later) = (Vec::new(), Vec::new(), Vec::new());
            for i in pending {
                let delivery = &mut batch[i];
                let Some(id) = delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned()) else {
                    verdicts[i] = Some(Verdict::Refused("no message id: it could not be told from a repeat".into()));
                    continue;
                };
                let key = digest(&hasher, &id);
                if self.window.contains(&key) {
                    verdicts[i] = Some(Verdict::Duplicate);
                    self.report.duplicates_in_window += 1;
                } else if round.insert(key) {
                    landing_index.push(i);
                    let body = std::mem::take(&mut delivery.data);
                    inbound.push(Inbound { message_id: id, body, redelivered: delivery.redelivered });
                } else {
                    later.push(i);
                }
            }
            pending = later;
            if inbound.is_empty() {
                continue;
            }
            let landed = match landing.land(&inbound) {
                Ok(landed) => landed,
                Err(error) => return Ok(Some(Ended::Landing(error))),
            };
            if landed.len() != inbound.len() {
                let error = format!("the landing answered {} verdicts for {} messages", landed.len(), inbound.len());
                return Ok(Some(Ended::Landing(error.into())));
            }
            for ((i, message), verdict) in landing_index.into_iter().zip(&inbound).zip(landed) {
                match verdict {
                    Verdict::Landed => self.report.landed += 1,
                    Verdict::Duplicate => self.report.duplicates_landed_before += 1,
                    Verdict::Refused(_) => {}
                }
                if !matches!(verdict, Verdict::Refused(_)) {
                    // Remembered before the ack: a redelivery after a lost ack is caught here.
                    self.window.insert(digest(&hasher, &message.message_id), ());
                }
                verdicts[i] = Some(verdict);
            }
        }
        self.report.batches += 1;
        #[cfg(feature = "crashpoints")]
        conduit::crashpoint::hit("inbox.before_ack");
        let all_acked = verdicts.iter().all(|v| !matches!(v, Some(Verdict::Refused(_))));
        if all_acked {
            let last = batch.last().expect("a batch holds at least its first delivery");
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        } else {
            for (delivery, verdict) in batch.iter().zip(&verdicts) {
                match verdict {
                    Some(Verdict::Refused(why)) => {
                        tracing::warn!(why, "a message was refused and dead-lettered");
                        self.report.refused += 1;
                        delivery.acker.reject(BasicRejectOptions { requeue: false }).await?;
                    }
                    _ => {
                        delivery.acker.ack(BasicAckOptions::default()).await?;
                    }
                }
            }
        }
        batch.clear();
        Ok(None)
    }
}

/// A 128-bit digest of a message id: two `SipHash` passes with different keys.
fn digest(hasher: &BuildHasherDefault<DefaultHasher>, id: &str) -> u128 {
    let low = hasher.hash_one(id);
    let high = hasher.hash_one((id, 0x9e37_79b9_7f4a_7c15_u64));
    (u128::from(high) << 64) | u128::from(low)
}

/// Declares an inbox's topology: the exchange, the queue bound to it under the inbox's key, and
/// the dead-letter exchange with its queue, all durable. An inbox with `declare` does this itself;
/// a publisher does it for every inbox before its first message, so that none goes nowhere.
pub async fn declare(channel: &lapin::Channel, settings: &InboxSettings) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let dead = settings.dead_letter_exchange.as_str();
    channel.exchange_declare(dead.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    channel.queue_declare(dead.into(), QueueDeclareOptions::durable(), FieldTable::default()).await?;
    channel.queue_bind(dead.into(), dead.into(), "".into(), QueueBindOptions::default(), FieldTable::default()).await?;
    let exchange = settings.exchange.as_str();
    channel.exchange_declare(exchange.into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dead.into()));
    let queue = settings.queue.as_str();
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments).await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            settings.binding.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}
