//! `conduit bridge`: conduit nodes sharing an order stream through a RabbitMQ broker.
//!
//! - `conduit bridge node`: a node. It owns one partition of the order stream (a durable queue
//!   bound to the orders exchange under its partition's number), lands each batch of orders in
//!   its own log (fsynced) before acknowledging it to the broker, recognises repeats by message id
//!   (a bounded window, then its log), runs them through the order pipeline, and resumes what its
//!   log had in flight when it starts again after a crash.
//! - `conduit bridge publish`: the seeded workload's orders, as JSON, each under the message id
//!   `order-<id>`, persistent, with publisher confirms, to the partition its id hashes to.
//!
//! Connection settings come from the configuration file's `[bridge]` table or the environment
//! (`CONDUIT_AMQP_URL`), never from the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit::log::{Durability, Log, LogOptions, Retention};
use std::sync::atomic::{AtomicBool, Ordering};

use conduit_bridge::lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use conduit_bridge::lapin::types::FieldTable;
use conduit_bridge::lapin::{BasicProperties, ExchangeKind};
use conduit_bridge::{
    Backoff, Bridge, ConnectionSettings, Inbound, Inbox, InboxReport, InboxSettings, Landing, Reconnects, TlsSettings,
    Until, Verdict,
};
use conduit_orders::{self as orders, Order, OrderPipeline, PipelineFile, RunReport, Workload};
use serde::{Deserialize, Serialize};

use crate::{Failure, Format, UsageError};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BridgeCommand {
    /// Run a node: consume this node's partition of the orders from the broker, land each batch
    /// in the node's log before acknowledging it, and run the orders through the pipeline.
    Node(NodeArgs),
    /// Publish the seeded workload's orders to the broker, spread over the partitions by order id.
    Publish(PublishArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// TOML file with `[engine]`, `[simulation]` and `[bridge]` tables (see examples/node.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The node's own log (created if missing; a node started again on its log resumes the
    /// orders it had in flight). Always fsynced before the broker hears an acknowledgement.
    #[arg(long, value_name = "PATH")]
    log: PathBuf,
    /// Keep at most this much of the log (for example `2GiB`): the oldest frames no order in
    /// flight (and no consumer that holds retention, such as the outbox) needs are removed at
    /// each checkpoint. A repeat of an order whose frames are gone is no longer recognised by
    /// the log, only by the window.
    #[arg(long, value_name = "SIZE", value_parser = crate::logcmd::parse_size)]
    retention_max_bytes: Option<u64>,
    /// Remove frames older than this (for example `7d`), under the same terms.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    retention_max_age: Option<Duration>,
    /// Stop once no order came for this long while connected (for example `10s`); without it the
    /// node runs until it is stopped.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    until_idle: Option<Duration>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// TOML file with a `[bridge]` table (and `[simulation]`, for the workload's seed and sizes).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Orders to publish (ids 1 to N of the seeded workload).
    #[arg(long, default_value_t = 100_000)]
    orders: u64,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// The `[bridge]` table of a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BridgeTable {
    /// The broker's URL; without it `CONDUIT_AMQP_URL`, then RabbitMQ on loopback.
    url: Option<String>,
    /// TLS files for an `amqps://` URL.
    tls: TlsSettings,
    /// Waits between reconnections.
    reconnect: Backoff,
    /// The orders exchange (direct); partition `p`'s queue is `<exchange>.<p>`, bound under `p`,
    /// and refused messages go to `<exchange>.refused`.
    exchange: String,
    /// How many partitions the orders are spread over (by order id).
    partitions: u32,
    /// The partition this node consumes.
    partition: u32,
    /// Most orders delivered and not yet acknowledged.
    prefetch: u16,
    /// Most orders landed in one batch.
    batch: usize,
    /// Longest a batch waits for more orders after its first, in milliseconds.
    linger_ms: u64,
    /// Most message ids the node's repeat window holds (beyond it, its log answers).
    dedupe_keys: usize,
    /// Longest the window holds an id, in seconds.
    dedupe_secs: u64,
    /// Messages published between waits for the broker's confirms.
    publish_batch: usize,
    /// The node's outbox: its orders' chosen events, published from its log.
    outbox: OutboxTable,
}

/// The `[bridge.outbox]` table: a node publishes chosen events of its log to a topic exchange,
/// each under routing key `order.<kind>` and a stable message id, committing its position in the
/// log only after the broker confirmed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct OutboxTable {
    /// Publish at all.
    enabled: bool,
    /// The topic exchange (declared, durable).
    exchange: String,
    /// The kinds of events published (`shipped`, `cancelled`, `dead_lettered`, `charged`, ...,
    /// as `conduit log inspect` names them).
    kinds: Vec<String>,
    /// Most events read and published between two commits of its position.
    batch: usize,
}

impl Default for OutboxTable {
    fn default() -> Self {
        Self {
            enabled: false,
            exchange: "conduit.events".into(),
            kinds: vec!["shipped".into(), "cancelled".into(), "dead_lettered".into()],
            batch: 1_000,
        }
    }
}

/// Every kind of event an order's log holds, by name.
fn event_kinds() -> Vec<(u16, &'static str)> {
    (1..=64u16)
        .chain([conduit::log::KIND_DEAD_LETTER])
        .map(|kind| (kind, orders::kinds::name(kind)))
        .filter(|(_, name)| *name != "unknown" && *name != "completed")
        .collect()
}

impl OutboxTable {
    fn validate(&self) -> Result<(), UsageError> {
        if !self.enabled {
            return Ok(());
        }
        if self.exchange.is_empty() {
            return Err(UsageError("bridge.outbox.exchange: name the exchange to publish to".into()));
        }
        if self.batch == 0 {
            return Err(UsageError("bridge.outbox.batch: must be at least 1".into()));
        }
        if self.kinds.is_empty() {
            return Err(UsageError("bridge.outbox.kinds: name at least one kind of event".into()));
        }
        let known = event_kinds();
        for kind in &self.kinds {
            if !known.iter().any(|(_, name)| name == kind) {
                let names: Vec<&str> = known.iter().map(|(_, name)| *name).collect();
                return Err(UsageError(format!("bridge.outbox.kinds: {kind:?} is not one of {}", names.join(", "))));
            }
        }
        Ok(())
    }
}

impl Default for BridgeTable {
    fn default() -> Self {
        let inbox = InboxSettings::default();
        Self {
            url: None,
            tls: TlsSettings::default(),
            reconnect: Backoff::default(),
            exchange: inbox.exchange,
            partitions: 1,
            partition: 0,
            prefetch: inbox.prefetch,
            batch: inbox.batch,
            linger_ms: inbox.linger_ms,
            dedupe_keys: inbox.dedupe_keys,
            dedupe_secs: inbox.dedupe_secs,
            publish_batch: 1_000,
            outbox: OutboxTable::default(),
        }
    }
}

impl BridgeTable {
    fn connection(&self) -> ConnectionSettings {
        ConnectionSettings { url: self.url.clone(), tls: self.tls.clone(), reconnect: self.reconnect }
    }

    /// The inbox of `partition`.
    fn inbox(&self, partition: u32) -> InboxSettings {
        InboxSettings {
            queue: format!("{}.{partition}", self.exchange),
            declare: true,
            exchange: self.exchange.clone(),
            binding: partition.to_string(),
            dead_letter_exchange: format!("{}.refused", self.exchange),
            prefetch: self.prefetch,
            batch: self.batch,
            linger_ms: self.linger_ms,
            dedupe_keys: self.dedupe_keys,
            dedupe_secs: self.dedupe_secs,
        }
    }

    fn validate(&self) -> Result<(), UsageError> {
        let usage = |e: conduit_bridge::BridgeError| UsageError(e.to_string());
        if self.partitions == 0 {
            return Err(UsageError("bridge.partitions: must be at least 1".into()));
        }
        if self.partition >= self.partitions {
            return Err(UsageError(format!(
                "bridge.partition: {} is not one of the {} partitions (0 to {})",
                self.partition,
                self.partitions,
                self.partitions - 1
            )));
        }
        if self.publish_batch == 0 {
            return Err(UsageError("bridge.publish_batch: must be at least 1".into()));
        }
        self.outbox.validate()?;
        self.connection().validate().map_err(usage)?;
        self.inbox(self.partition).validate().map_err(usage)
    }
}

/// The partition an order belongs to: its id, mixed (so that ids in a row spread evenly),
/// modulo the partitions.
fn partition_of(order: u64, partitions: u32) -> u32 {
    u32::try_from(orders::ports::mix64(order) % u64::from(partitions)).expect("below a u32")
}

/// An order's message id: the same order always travels under the same id.
fn message_id(order: u64) -> String {
    format!("order-{order}")
}

/// Reads a configuration file with a `[bridge]` table beside the pipeline's tables.
fn read_node_config(path: Option<&Path>) -> Result<(PipelineFile, BridgeTable), UsageError> {
    let Some(path) = path else { return Ok((PipelineFile::default(), BridgeTable::default())) };
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| UsageError(format!("cannot read config file {shown}: {e}")))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| UsageError(format!("{shown}: {e}")))?;
    let bridge = match table.remove("bridge") {
        Some(value) => BridgeTable::deserialize(value).map_err(|e| UsageError(format!("{shown}: in [bridge]: {e}")))?,
        None => BridgeTable::default(),
    };
    let rest = toml::to_string(&table).map_err(|e| UsageError(format!("{shown}: {e}")))?;
    let pipeline = PipelineFile::from_toml_str(&rest).map_err(|e| UsageError(format!("{shown}: {e}")))?;
    bridge.validate().map_err(|UsageError(e)| UsageError(format!("{shown}: {e}")))?;
    Ok((pipeline, bridge))
}

pub(crate) fn run(command: &BridgeCommand) -> Result<ExitCode, Failure> {
    match command {
        BridgeCommand::Node(args) => node(args),
        BridgeCommand::Publish(args) => publish(args),
    }
}

/// The orders node's landing: orders new to its log go into the pipeline, durable when
/// `submit_many` returns; orders its log already holds are repeats.
struct OrderLanding<'a> {
    pipeline: &'a OrderPipeline,
    log: &'a Log,
}

impl Landing for OrderLanding<'_> {
    fn land(&mut self, messages: &[Inbound]) -> Result<Vec<Verdict>, Box<dyn std::error::Error + Send + Sync>> {
        let mut verdicts = Vec::with_capacity(messages.len());
        let mut orders = Vec::with_capacity(messages.len());
        for message in messages {
            match serde_json::from_slice::<Order>(&message.body) {
                Err(error) => verdicts.push(Verdict::Refused(format!("not an order: {error}"))),
                Ok(order) if message.message_id != message_id(order.id) => verdicts.push(Verdict::Refused(format!(
                    "message id {:?} is not order {}'s ({:?})",
                    message.message_id,
                    order.id,
                    message_id(order.id)
                ))),
                Ok(order) => {
                    verdicts.push(Verdict::Landed);
                    orders.push(order);
                }
            }
        }
        // An order is a stream of the log: one the log holds was landed before (and acknowledged
        // or not); the window missed it (a restart, or older than the window).
        let ids: Vec<u64> = orders.iter().map(|o| o.id).collect();
        let held = self.log.streams(&ids)?;
        let mut new = Vec::with_capacity(orders.len());
        let mut orders = orders.into_iter();
        for verdict in &mut verdicts {
            if *verdict == Verdict::Landed {
                let order = orders.next().expect("one order per Landed verdict");
                if held.contains_key(&order.id) {
                    *verdict = Verdict::Duplicate;
                } else {
                    new.push(order);
                }
            }
        }
        if !new.is_empty() {
            self.pipeline.submit_many(new).map_err(|e| format!("the pipeline refused orders: {e}"))?;
        }
        Ok(verdicts)
    }
}

/// What a node did, on stdout.
#[derive(Debug, Serialize)]
struct NodeReport {
    /// The partition it consumed.
    partition: u32,
    /// Orders its log had in flight when it started, resumed.
    resumed: u64,
    /// What the inbox did.
    inbox: InboxReport,
    /// What the outbox did, if the node runs one.
    outbox: Option<OutboxReport>,
    /// The pipeline's report for this run of the node.
    run: RunReport,
}

fn node(args: &NodeArgs) -> Result<ExitCode, Failure> {
    let (file, bridge_table) = read_node_config(args.config.as_deref())?;
    let (engine, mut sim) = file.validate().map_err(|e| UsageError(e.to_string()))?;
    crate::payment_books(&mut sim, &args.log);
    let retention = Retention { max_bytes: args.retention_max_bytes, max_age: args.retention_max_age };
    let options = LogOptions { durability: Durability::Immediate, retention, ..LogOptions::default() };
    let log = Arc::new(Log::open(&args.log, options).map_err(|e| Failure::Run(format!("cannot open the log: {e}")))?);
    let provider = orders::open_provider(&sim).map_err(|e| Failure::Run(e.to_string()))?;
    let reopened = orders::reopen(&engine, &sim, &log, provider).map_err(|e| match e {
        orders::RunError::Build(error) => Failure::Usage(UsageError(error.to_string())),
        error => Failure::Run(error.to_string()),
    })?;
    let bridge = Bridge::new().map_err(|e| Failure::Run(e.to_string()))?;
    let name = format!("conduit node {} ({})", bridge_table.partition, std::process::id());
    let settings = bridge_table.inbox(bridge_table.partition);
    tracing::info!(
        queue = settings.queue,
        url = conduit_bridge::redacted(&bridge_table.connection().url()),
        "node starting"
    );
    let mut inbox = Inbox::new(&bridge, bridge_table.connection(), settings, &name)
        .map_err(|e| Failure::Usage(UsageError(e.to_string())))?;
    let resumed = reopened.orders_in_flight.len() as u64;
    let stop_outbox = AtomicBool::new(false);
    let (inboxed, outbox, run) = std::thread::scope(|scope| {
        let outbox = bridge_table.outbox.enabled.then(|| {
            let thread = std::thread::Builder::new().name("conduit:outbox".into());
            thread.spawn_scoped(scope, || run_outbox(&log, &bridge_table, &stop_outbox)).expect("a thread")
        });
        let mut landing = OrderLanding { pipeline: &reopened.pipeline, log: &log };
        let inboxed = inbox.run(&mut landing, &Until { stop: None, idle: args.until_idle });
        let run = reopened.pipeline.finish();
        // The outbox publishes what the pipeline's last events added, then stops.
        stop_outbox.store(true, Ordering::Release);
        let outbox = outbox.map(|thread| thread.join().expect("the outbox thread does not panic"));
        (inboxed, outbox, run)
    });
    log.close().map_err(|e| Failure::Run(format!("cannot close the log: {e}")))?;
    let inbox = inboxed.map_err(|e| Failure::Run(e.to_string()))?;
    let report = NodeReport { partition: bridge_table.partition, resumed, inbox, outbox, run };
    let mut out = std::io::stdout().lock();
    let written = match args.format {
        Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
        Format::Human => write_node(&mut out, &report).map_err(|e| e.to_string()),
    };
    written.and_then(|()| writeln!(out).map_err(|e| e.to_string())).map_err(Failure::Run)?;
    let broken = report.run.violations();
    for problem in &broken {
        eprintln!("invariant broken: {problem}");
    }
    Ok(if broken.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// What a node's outbox did.
#[derive(Debug, Default, Serialize)]
struct OutboxReport {
    /// Events read from the log.
    read: u64,
    /// Of those, published and confirmed (the chosen kinds).
    published: u64,
    /// Times the connection was lost and made again.
    reconnects: u64,
    /// Why it stopped with events left to publish (the broker was away when the node stopped):
    /// they go out when the node starts again.
    left_unpublished: Option<String>,
}

/// Publishes the node's chosen events until `stop`, then what is left; reconnects with backoff
/// when the broker goes away. Its position lives in the log (consumer `outbox`), so a node
/// started again goes on from its last commit.
fn run_outbox(log: &Log, table: &BridgeTable, stop: &AtomicBool) -> OutboxReport {
    let mut report = OutboxReport::default();
    let bridge = match Bridge::new() {
        Ok(bridge) => bridge,
        Err(error) => {
            report.left_unpublished = Some(error.to_string());
            return report;
        }
    };
    let settings = table.connection();
    let kinds: Vec<u16> = event_kinds()
        .into_iter()
        .filter(|(_, name)| table.outbox.kinds.iter().any(|k| k == name))
        .map(|(kind, _)| kind)
        .collect();
    let name = format!("conduit outbox {} ({})", table.partition, std::process::id());
    let mut reconnects = Reconnects::new(settings.reconnect);
    loop {
        let mut session = || -> Result<(), conduit_bridge::BridgeError> {
            let amqp = bridge.block_on(settings.connect(&name))?;
            bridge.block_on(declare_events(&amqp, &table.outbox.exchange))?;
            let kinds = kinds.clone();
            let select: conduit_bridge::Select = Box::new(move |record| {
                (record.stream != conduit::log::ENGINE_STREAM && kinds.contains(&record.kind))
                    .then(|| format!("order.{}", orders::kinds::name(record.kind)))
            });
            let outbox_settings = conduit_bridge::OutboxSettings {
                consumer: "outbox".into(),
                exchange: table.outbox.exchange.clone(),
                id_prefix: format!("{}.{}", table.exchange, table.partition),
                batch: table.outbox.batch,
            };
            let mut outbox = conduit_bridge::Outbox::new(&bridge, &amqp, log, outbox_settings, select)?;
            loop {
                let stopping = stop.load(Ordering::Acquire);
                let pumped = outbox.pump(Duration::from_millis(100))?;
                report.read += pumped.read as u64;
                report.published += pumped.published as u64;
                reconnects.progressed();
                if stopping && pumped.read == 0 {
                    return Ok(());
                }
            }
        };
        match session() {
            Ok(()) => return report,
            Err(error) if stop.load(Ordering::Acquire) => {
                report.left_unpublished = Some(error.to_string());
                return report;
            }
            Err(error) => {
                reconnects.wait_after(&error, "the outbox");
                report.reconnects += 1;
            }
        }
    }
}

/// Declares the outbox's topic exchange, durable.
async fn declare_events(
    amqp: &conduit_bridge::lapin::Connection,
    exchange: &str,
) -> Result<(), conduit_bridge::BridgeError> {
    let channel = amqp.create_channel().await?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(exchange.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    channel.close(200, "declared".into()).await?;
    Ok(())
}

fn write_node(out: &mut impl Write, report: &NodeReport) -> std::io::Result<()> {
    let inbox = &report.inbox;
    let orders = &report.run.orders;
    writeln!(out, "node of partition {}: {} orders resumed from its log", report.partition, report.resumed)?;
    writeln!(
        out,
        "inbox: {} delivered ({} redelivered), {} landed, {} repeats dropped ({} by the window, {} held in the log), {} refused, {} batches, {} reconnects",
        inbox.delivered,
        inbox.redelivered,
        inbox.landed,
        inbox.duplicates_in_window + inbox.duplicates_landed_before,
        inbox.duplicates_in_window,
        inbox.duplicates_landed_before,
        inbox.refused,
        inbox.batches,
        inbox.reconnects
    )?;
    if let Some(outbox) = &report.outbox {
        writeln!(
            out,
            "outbox: {} events read, {} published and confirmed, {} reconnects{}",
            outbox.read,
            outbox.published,
            outbox.reconnects,
            outbox
                .left_unpublished
                .as_ref()
                .map_or_else(String::new, |why| format!("; events left for the next start ({why})"))
        )?;
    }
    write!(
        out,
        "orders: {} confirmed, {} cancelled, {} dead-lettered, {} in flight",
        orders.confirmed, orders.cancelled, orders.dead_lettered, orders.in_flight
    )
}

/// What a publish did, on stdout.
#[derive(Debug, Serialize)]
struct PublishReport {
    /// Orders published and confirmed.
    published: u64,
    /// Per partition.
    by_partition: Vec<u64>,
    /// Seconds it took.
    elapsed_s: f64,
    /// Orders a second.
    per_sec: f64,
}

fn publish(args: &PublishArgs) -> Result<ExitCode, Failure> {
    let (file, table) = read_node_config(args.config.as_deref())?;
    let (_, sim) = file.validate().map_err(|e| UsageError(e.to_string()))?;
    let bridge = Bridge::new().map_err(|e| Failure::Run(e.to_string()))?;
    let connection = table.connection();
    let url = connection.url();
    let shown = conduit_bridge::redacted(&url);
    let broker = |e: conduit_bridge::lapin::Error| Failure::Run(format!("broker at {shown}: {e}"));
    let started = Instant::now();
    let mut by_partition = vec![0u64; table.partitions as usize];
    connection.tls_config().map_err(|e| Failure::Usage(UsageError(e.to_string())))?;
    bridge.block_on(async {
        let name = format!("conduit publish ({})", std::process::id());
        let amqp = connection.connect(&name).await.map_err(|e| Failure::Run(format!("broker at {shown}: {e}")))?;
        let channel = amqp.create_channel().await.map_err(broker)?;
        // Every partition's queue exists before the first order: none is published to nowhere.
        for partition in 0..table.partitions {
            conduit_bridge::declare(&channel, &table.inbox(partition)).await.map_err(broker)?;
        }
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker)?;
        let mut workload = Workload::new(sim.seed, sim.skus, sim.customers).poisoned(sim.poison_rate);
        let mut left = args.orders;
        while left > 0 {
            let take = usize::try_from(left).map_or(table.publish_batch, |left| left.min(table.publish_batch));
            let mut confirms = Vec::with_capacity(take);
            for order in workload.by_ref().take(take) {
                let partition = partition_of(order.id, table.partitions);
                let body = serde_json::to_vec(&order).expect("an order serializes");
                let properties = BasicProperties::default()
                    .with_message_id(message_id(order.id).into())
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into());
                let confirm = channel
                    .basic_publish(
                        table.exchange.as_str().into(),
                        partition.to_string().as_str().into(),
                        BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                        &body,
                        properties,
                    )
                    .await
                    .map_err(broker)?;
                confirms.push(confirm);
                by_partition[partition as usize] += 1;
            }
            for confirm in confirms {
                let confirmation = confirm.await.map_err(broker)?;
                let acked = confirmation.is_ack();
                if !acked || confirmation.take_message().is_some() {
                    return Err(Failure::Run("the broker refused or could not route an order".into()));
                }
            }
            left -= take as u64;
        }
        amqp.close(200, "published".into()).await.map_err(broker)?;
        Ok(())
    })?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let report =
        PublishReport { published: args.orders, by_partition, elapsed_s, per_sec: args.orders as f64 / elapsed_s };
    let mut out = std::io::stdout().lock();
    let written = match args.format {
        Format::Json => serde_json::to_writer(&mut out, &report).map_err(|e| e.to_string()),
        Format::Human => write!(
            out,
            "published {} orders to {} partitions {:?} in {:.2} s ({:.0} orders/s), each confirmed",
            report.published, table.partitions, report.by_partition, report.elapsed_s, report.per_sec
        )
        .map_err(|e| e.to_string()),
    };
    written.and_then(|()| writeln!(out).map_err(|e| e.to_string())).map_err(Failure::Run)?;
    Ok(ExitCode::SUCCESS)
}
