//! The outbox against a real broker: every record the application chooses is published once,
//! with its stable message id; a child process that dies between the broker's confirms and the
//! log commit (the crash point `outbox.before_commit`, an abort as kill -9 would stop it) leaves
//! only that batch to be published again after the restart, under the same ids.
//!
//! Needs a broker, as `topic_exchange.rs` says; the child is this test binary itself, started
//! with `CONDUIT_OUTBOX_CHILD` set.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use conduit::log::{Log, LogOptions, Record};
use conduit_bridge::lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use conduit_bridge::lapin::types::FieldTable;
use conduit_bridge::lapin::ExchangeKind;
use conduit_bridge::{message_id, url_from_env, Bridge, Outbox, OutboxSettings};

const CHILD_ENV: &str = "CONDUIT_OUTBOX_CHILD";
const EXCHANGE_ENV: &str = "CONDUIT_OUTBOX_EXCHANGE";
const TEST: &str = "an_outbox_publishes_each_chosen_record_and_a_crash_repeats_only_its_last_batch";
const RECORDS: u64 = 3_000;
const BATCH: usize = 500;
const PREFIX: &str = "test-log";

/// Odd records go out, under a key by stream; even ones stay in.
fn select(record: &Record) -> Option<String> {
    (record.kind == 1).then(|| format!("order.{}.placed", record.stream % 5))
}

fn number(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[..8].try_into().expect("eight bytes"))
}

/// The child: pump the outbox until the log has nothing more.
fn child(path: &str) {
    let exchange = std::env::var(EXCHANGE_ENV).expect("the parent names the exchange");
    let bridge = Bridge::new().expect("a runtime");
    let connection = bridge.connect(&url_from_env(), "outbox test child").expect("the broker");
    let log = Log::open(path, LogOptions::default()).expect("the log");
    let settings = OutboxSettings { consumer: "outbox".into(), exchange, id_prefix: PREFIX.into(), batch: BATCH };
    let mut outbox = Outbox::new(&bridge, &connection, &log, settings, Box::new(select)).expect("an outbox");
    while outbox.pump(Duration::ZERO).expect("pumps").read > 0 {}
    println!("done");
}

fn run_child(path: &std::path::Path, exchange: &str, crash_at: Option<&str>) -> (bool, String) {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command.args(["--exact", TEST, "--nocapture"]).env(CHILD_ENV, path).env(EXCHANGE_ENV, exchange);
    command.env_remove(conduit::crashpoint::ENV);
    if let Some(point) = crash_at {
        command.env(conduit::crashpoint::ENV, point);
    }
    let output = command.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("child runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success() && stdout.lines().any(|l| l == "done"), stderr)
}

#[test]
fn an_outbox_publishes_each_chosen_record_and_a_crash_repeats_only_its_last_batch() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    let Some((bridge, connection)) = common::connect_or_skip("the outbox test") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    let mut ids = BTreeMap::new();
    {
        let log = Log::open(&path, LogOptions::default()).expect("new log");
        let first = log.reserve_ids(RECORDS);
        let records: Vec<Record> = (0..RECORDS)
            .map(|n| Record {
                id: first + n,
                stream: n / 3,
                kind: if n % 2 == 1 { 1 } else { 2 },
                timestamp_us: 1_800_000_000_000_000 + n,
                payload: n.to_le_bytes().to_vec(),
                ..Record::default()
            })
            .collect();
        for record in records.iter().filter(|r| select(r).is_some()) {
            ids.insert(number(&record.payload), message_id(PREFIX, record));
        }
        log.append(records).expect("open").wait().expect("committed");
        log.close().expect("closes");
    }
    let exchange = format!("conduit.outbox.test.{}", std::process::id());
    let queue = bridge.block_on(async {
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declares");
        let exclusive = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
        let queue = format!("{exchange}.all");
        channel.queue_declare(queue.as_str().into(), exclusive, FieldTable::default()).await.expect("declares");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "order.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("binds");
        (channel, queue)
    });

    // The third batch is confirmed by the broker, then the child dies before committing it.
    let (finished, stderr) = run_child(&path, &exchange, Some("outbox.before_commit:3"));
    assert!(!finished && stderr.contains(conduit::crashpoint::MARKER), "the child died at its crash point: {stderr}");
    let (finished, stderr) = run_child(&path, &exchange, None);
    assert!(finished, "the restarted child publishes the rest: {stderr}");

    let (channel, queue) = queue;
    let delivered: Vec<(u64, String, String)> = bridge.block_on(async {
        let mut delivered = Vec::new();
        while let Some(message) =
            channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("gets")
        {
            let properties = &message.delivery.properties;
            let id = properties.message_id().as_ref().expect("every message has an id").to_string();
            assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
            delivered.push((number(&message.delivery.data), id, message.delivery.routing_key.to_string()));
        }
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("deletes the exchange");
        delivered
    });
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for (n, id, key) in &delivered {
        assert_eq!(ids.get(n), Some(id), "record {n}: chosen, and under its stable id");
        assert_eq!(key, &format!("order.{}.placed", n / 3 % 5), "record {n}'s routing key");
        *seen.entry(*n).or_default() += 1;
    }
    assert_eq!(seen.len(), ids.len(), "every chosen record published");
    // Only the batch the crash left uncommitted (records 1,000 to 1,499) went out twice.
    let twice: Vec<u64> = seen.iter().filter(|&(_, &count)| count > 1).map(|(&n, _)| n).collect();
    assert!(seen.values().all(|&count| count <= 2), "nothing published three times");
    assert_eq!(twice, (1_000..1_500).filter(|n| n % 2 == 1).collect::<Vec<_>>(), "repeats only since the commit");
}
