//! The outbox: a consumer of the log that publishes chosen records to a topic exchange.
//!
//! Each [`Outbox::pump`] reads the records after the consumer's position, publishes those the
//! application's choice gives a routing key to (persistent, with publisher confirms), waits for
//! the broker to confirm every one, and only then commits the consumer's position in the log. A
//! crash between the broker's confirms and the commit publishes those records again after the
//! restart: at least once, and every message carries the same id each time (the log's id for
//! its record, under a prefix naming the log), so a consumer downstream drops the repeats.

use std::time::Duration;

use conduit::log::{ConsumerOptions, Log, LogConsumer, Record};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::{Bridge, BridgeError};

/// Which records go out, and under which routing key: `None` keeps a record in.
pub type Select = Box<dyn Fn(&Record) -> Option<String> + Send>;

/// Where an outbox publishes, and how its messages are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSettings {
    /// The log consumer's name (its committed position is the outbox's).
    pub consumer: String,
    /// The exchange published to (declared by whoever runs the broker's topology).
    pub exchange: String,
    /// What every message id starts with: a name for this log, so that ids from two logs differ.
    pub id_prefix: String,
    /// Most records read (and published) between two commits.
    pub batch: usize,
}

/// What one [`Outbox::pump`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pumped {
    /// Records read from the log.
    pub read: usize,
    /// Messages published and confirmed.
    pub published: usize,
}

/// A log consumer that publishes chosen records to a broker, committing its position only after
/// the broker confirmed them (see [`Outbox::pump`]).
pub struct Outbox<'a> {
    bridge: &'a Bridge,
    channel: lapin::Channel,
    consumer: LogConsumer<'a>,
    settings: OutboxSettings,
    select: Select,
}

impl std::fmt::Debug for Outbox<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("settings", &self.settings).field("position", &self.consumer.position()).finish()
    }
}

/// A record's message id: `prefix` and the record's id in the log.
#[must_use]
pub fn message_id(prefix: &str, record: &Record) -> String {
    format!("{prefix}-{}", record.id)
}

impl<'a> Outbox<'a> {
    /// An outbox publishing `log`'s records chosen by `select` over `connection` (a channel of its
    /// own, in confirm mode), from its consumer's committed position.
    pub fn new(
        bridge: &'a Bridge,
        connection: &lapin::Connection,
        log: &'a Log,
        settings: OutboxSettings,
        select: Select,
    ) -> Result<Self, BridgeError> {
        if settings.batch == 0 {
            return Err(BridgeError::Settings("an outbox's batch must be at least one record".into()));
        }
        let consumer = log.consumer(&settings.consumer, ConsumerOptions::default())?;
        let channel = bridge.block_on(async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(channel)
        })?;
        Ok(Self { bridge, channel, consumer, settings, select })
    }

    /// The next record the outbox will read.
    #[must_use]
    pub fn position(&self) -> conduit::log::Position {
        self.consumer.position()
    }

    /// Publishes up to a batch of the records after its position (waiting up to `wait` for new
    /// ones), waits for the broker to confirm each message, then commits its position. A
    /// message the broker refuses (a nack) is an error, and nothing is committed.
    pub fn pump(&mut self, wait: Duration) -> Result<Pumped, BridgeError> {
        let records = self.consumer.poll(self.settings.batch, wait)?;
        if records.is_empty() {
            return Ok(Pumped::default());
        }
        let messages: Vec<(String, &Record)> =
            records.iter().filter_map(|c| (self.select)(&c.record).map(|key| (key, &c.record))).collect();
        let published = messages.len();
        let (exchange, prefix) = (self.settings.exchange.as_str(), self.settings.id_prefix.as_str());
        let channel = &self.channel;
        self.bridge.block_on(async {
            let mut confirms = Vec::with_capacity(messages.len());
            for (key, record) in &messages {
                let properties = properties(prefix, record);
                let confirm = channel
                    .basic_publish(
                        exchange.into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &record.payload,
                        properties,
                    )
                    .await?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                if !confirm.await?.is_ack() {
                    return Err(BridgeError::Refused);
                }
            }
            Ok(())
        })?;
        #[cfg(feature = "crashpoints")]
        conduit::crashpoint::hit("outbox.before_commit");
        self.consumer.commit()?;
        Ok(Pumped { read: records.len(), published })
    }
}

/// A record's message: persistent, its stable id, its time, and where it came from in headers.
fn properties(prefix: &str, record: &Record) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("conduit-stream".into(), AMQPValue::LongLongInt(i64::from_ne_bytes(record.stream.to_ne_bytes())));
    headers.insert("conduit-version".into(), AMQPValue::LongUInt(record.version));
    headers.insert("conduit-kind".into(), AMQPValue::ShortUInt(record.kind));
    BasicProperties::default()
        .with_message_id(message_id(prefix, record).into())
        .with_delivery_mode(2)
        .with_timestamp(record.timestamp_us / 1_000_000)
        .with_headers(headers)
}
