//! `conduit bridge` against a real RabbitMQ broker, as a user runs it: nodes sharing the order
//! stream, one killed with kill -9 and started again, a broker restarted under a node, messages
//! that are not orders. Every check reads the nodes' own logs and the payment provider's books.
//!
//! Needs a broker ([`conduit_bridge::URL_ENV`], or RabbitMQ on 127.0.0.1:5672; `scripts/broker
//! start DIR` starts one from Debian's package). Without one a test says why and passes, unless
//! `CONDUIT_REQUIRE_BROKER=1` (as in CI), where a missing broker fails it.
#![cfg(feature = "bridge")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use conduit::log::{Log, LogOptions};
use conduit_bridge::lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use conduit_bridge::lapin::types::FieldTable;
use conduit_bridge::lapin::BasicProperties;
use conduit_bridge::{redacted, url_from_env, Bridge};

fn required() -> bool {
    std::env::var("CONDUIT_REQUIRE_BROKER").is_ok_and(|v| v == "1")
}

/// The broker's URL if one answers, or `None` after saying why `test` skips.
fn broker_or_skip(test: &str) -> Option<String> {
    let url = url_from_env();
    let bridge = Bridge::new().expect("a runtime");
    match bridge.connect(&url, test) {
        Ok(_) => Some(url),
        Err(error) if !required() => {
            eprintln!(
                "{test} skipped: no RabbitMQ broker at {} ({error}); start one with `scripts/broker start DIR`, \
                 or set CONDUIT_AMQP_URL (CONDUIT_REQUIRE_BROKER=1 makes a missing broker a failure)",
                redacted(&url)
            );
            None
        }
        Err(error) => panic!("CONDUIT_REQUIRE_BROKER=1 but no broker at {}: {error}", redacted(&url)),
    }
}

/// An exchange name no other test run uses (queues are named after it).
fn fresh_exchange(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_nanos();
    format!("test.{test}.{}.{nanos}", std::process::id())
}

/// A node's configuration file: the broker, the exchange, its partition of `partitions`.
fn node_config(dir: &Path, url: &str, exchange: &str, partition: u32, partitions: u32) -> PathBuf {
    let path = dir.join(format!("node{partition}.toml"));
    let text = format!(
        "[bridge]\nurl = \"{url}\"\nexchange = \"{exchange}\"\npartitions = {partitions}\npartition = {partition}\n\
         [bridge.reconnect]\nmin_ms = 50\nmax_ms = 1000\n"
    );
    std::fs::write(&path, text).expect("writes the config");
    path
}

fn conduit() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_conduit"));
    // The file names the broker; nothing from the test's environment overrides it.
    command.env_remove("CONDUIT_AMQP_URL");
    command
}

fn publish(config: &Path, orders: u64) {
    let output = conduit()
        .args(["bridge", "publish", "--format", "json", "--orders", &orders.to_string(), "--config"])
        .arg(config)
        .output()
        .expect("runs");
    assert!(output.status.success(), "publish failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn start_node(config: &Path, log: &Path, idle: &str) -> Child {
    conduit()
        .args(["bridge", "node", "--format", "json", "--until-idle", idle, "--config"])
        .arg(config)
        .arg("--log")
        .arg(log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts a node")
}

/// A node's JSON report, after it stopped by itself (exit 0).
fn report(child: Child) -> serde_json::Value {
    let output = child.wait_with_output().expect("the node ends");
    assert!(
        output.status.success(),
        "the node failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON report")
}

fn u(value: &serde_json::Value, pointer: &str) -> u64 {
    value.pointer(pointer).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("{pointer} missing in {value}"))
}

/// The orders a node's log holds, each once: a second placement of an order fails the test.
fn orders_in(log: &Path) -> BTreeSet<u64> {
    let opened = Log::open_existing(log, LogOptions::default()).expect("opens the node's log");
    let histories = conduit_orders::Histories::read(&opened).expect("reads the log");
    let verified = histories.verify();
    assert!(verified.ok, "{}: {:?}", log.display(), verified.problems);
    histories.orders.keys().copied().collect()
}

/// `conduit log verify` on a node's log: histories, terminal states, and the payment provider's
/// own books beside the log (no order charged twice, each paid what it owes).
fn verify(log: &Path) -> Output {
    let output = conduit().args(["log", "verify", "--format", "json"]).arg(log).output().expect("runs");
    assert!(output.status.success(), "{} does not verify: {}", log.display(), String::from_utf8_lossy(&output.stdout));
    output
}

/// Orders the two-node test publishes.
const ORDERS: u64 = 100_000;

#[test]
fn two_nodes_take_every_order_once_though_one_is_killed_mid_run() {
    let Some(url) = broker_or_skip("two_nodes_take_every_order_once_though_one_is_killed_mid_run") else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let exchange = fresh_exchange("nodes");
    let configs = [node_config(dir.path(), &url, &exchange, 0, 2), node_config(dir.path(), &url, &exchange, 1, 2)];
    let logs = [dir.path().join("node0.log"), dir.path().join("node1.log")];
    publish(&configs[0], ORDERS);
    let survivor = start_node(&configs[1], &logs[1], "5s");
    // Node 0 is killed with kill -9 mid-run: it has landed orders (its log grew past its first
    // commits) and has more to take from its queue.
    let mut victim = start_node(&configs[0], &logs[0], "5s");
    let began = Instant::now();
    while std::fs::metadata(&logs[0]).map_or(0, |m| m.len()) < 4 << 20 {
        assert!(began.elapsed() < Duration::from_secs(120), "node 0 landed nothing in two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.kill().expect("kill -9");
    victim.wait().expect("reaped");
    // Started again, it dies at the worst moment: its fifth batch landed in its log, not yet
    // acknowledged. The broker delivers that batch again; the next start finds it in the log.
    let crashed = conduit()
        .env("CONDUIT_CRASH_AT", "inbox.before_ack:5")
        .args(["bridge", "node", "--format", "json", "--until-idle", "5s", "--config"])
        .arg(&configs[0])
        .arg("--log")
        .arg(&logs[0])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&crashed.stderr);
    assert!(stderr.contains("crash point inbox.before_ack: pass 5"), "node 0 did not crash as armed: {stderr}");
    let restarted = report(start_node(&configs[0], &logs[0], "5s"));
    let other = report(survivor);
    assert!(u(&restarted, "/inbox/delivered") > 0, "node 0 had taken everything before the crash: {restarted}");
    assert!(u(&restarted, "/inbox/redelivered") > 0, "nothing was redelivered after the crash: {restarted}");
    assert!(u(&restarted, "/inbox/duplicates_landed_before") > 0, "the landed batch was not recognised: {restarted}");
    assert_eq!(u(&restarted, "/inbox/refused") + u(&other, "/inbox/refused"), 0);
    let (zero, one) = (orders_in(&logs[0]), orders_in(&logs[1]));
    assert!(zero.is_disjoint(&one), "orders in both nodes: {:?}", zero.intersection(&one).take(5).collect::<Vec<_>>());
    let all: BTreeSet<u64> = zero.union(&one).copied().collect();
    assert_eq!(all, (1..=ORDERS).collect(), "every order published is in exactly one node's log");
    for log in &logs {
        verify(log);
    }
}

#[test]
fn what_is_not_an_order_is_dead_lettered_and_the_rest_lands() {
    let Some(url) = broker_or_skip("what_is_not_an_order_is_dead_lettered_and_the_rest_lands") else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let exchange = fresh_exchange("refused");
    let config = node_config(dir.path(), &url, &exchange, 0, 1);
    publish(&config, 100);
    let bridge = Bridge::new().expect("a runtime");
    let connection = bridge.connect(&url, "refused test").expect("connects");
    // Ids none of the good orders has: a message id is its message's identity, so a repeated
    // id would be dropped as a repeat whatever its body.
    let bad: [(Option<&str>, &[u8]); 5] = [
        (Some("order-1007"), b"not json"),
        (Some("order-1001"), br#"{"id":1002,"customer":1,"sku":1,"quantity":1,"amount_cents":100}"#),
        (None, br#"{"id":1003,"customer":1,"sku":1,"quantity":1,"amount_cents":100}"#),
        (Some("order-1009"), br#"{"id":1009,"customer":1,"sku":1,"quantity":1,"amount_cents":100,"extra":1}"#),
        (Some("order-1011"), br#"{"id":1011,"cust"#),
    ];
    // A publisher's retry of the last one, right behind it in the same batch: the refused first
    // copy does not make the good second one a repeat.
    let retried: &[u8] = br#"{"id":1011,"customer":1,"sku":1,"quantity":1,"amount_cents":100}"#;
    bridge.block_on(async {
        let channel = connection.create_channel().await.expect("a channel");
        for (id, body) in bad.into_iter().chain([(Some("order-1011"), retried)]) {
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(id) = id {
                properties = properties.with_message_id(id.into());
            }
            channel
                .basic_publish(exchange.as_str().into(), "0".into(), BasicPublishOptions::default(), body, properties)
                .await
                .expect("publishes")
                .await
                .expect("sent");
        }
    });
    let node = report(start_node(&config, &dir.path().join("node.log"), "2s"));
    assert_eq!(u(&node, "/inbox/refused"), 5, "{node}");
    assert_eq!(u(&node, "/inbox/landed"), 101, "{node}");
    assert_eq!(orders_in(&dir.path().join("node.log")), (1..=100).chain([1011]).collect());
    // The refused messages wait in the dead-letter queue, bodies intact.
    let refused = format!("{exchange}.refused");
    let bodies: Vec<Vec<u8>> = bridge.block_on(async {
        let channel = connection.create_channel().await.expect("a channel");
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        channel.queue_declare(refused.as_str().into(), passive, FieldTable::default()).await.expect("it exists");
        let mut bodies = Vec::new();
        while let Some(message) =
            channel.basic_get(refused.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("gets")
        {
            bodies.push(message.delivery.data);
        }
        bodies
    });
    let expected: Vec<Vec<u8>> = bad.iter().map(|(_, body)| body.to_vec()).collect();
    assert_eq!(bodies, expected);
}

#[test]
fn a_bad_bridge_table_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let cases = [
        ("[bridge]\npartition = 2\npartitions = 2\n", "bridge.partition: 2 is not one of the 2 partitions"),
        ("[bridge]\nprefetch = 0\n", "bridge.prefetch"),
        ("[bridge]\nbatch = 4096\nprefetch = 1024\n", "bridge.batch"),
        ("[bridge]\nurl = \"http://x\"\n", "bridge.url"),
        ("[bridge]\nqueue = \"q\"\n", "unknown field `queue`"),
        ("[bridge]\ndedupe_keys = 0\n", "bridge.dedupe_keys"),
        ("[bridge.tls]\ncert_file = \"c.pem\"\n", "bridge.tls"),
        ("[engine]\nworkers = 0\n[bridge]\n", "workers"),
        ("[bridge.outbox]\nenabled = true\nkinds = [\"shiped\"]\n", "bridge.outbox.kinds: \"shiped\" is not one of"),
        ("[bridge.outbox]\nenabled = true\nbatch = 0\n", "bridge.outbox.batch"),
    ];
    for (i, (text, expected)) in cases.into_iter().enumerate() {
        let config = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&config, text).expect("writes");
        let log = dir.path().join(format!("bad{i}.log"));
        let output =
            conduit().args(["bridge", "node", "--config"]).arg(&config).arg("--log").arg(&log).output().expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: expected {expected:?} in {stderr}");
        assert!(!log.exists(), "{text}: a log was created for a configuration that cannot run");
    }
}

/// A broker of the test's own (`scripts/broker`, Debian's rabbitmq-server), stopped when dropped.
struct OwnBroker {
    dir: PathBuf,
    port: u16,
}

impl OwnBroker {
    const SCRIPT: &'static str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/broker");

    /// Starts one in `dir` on a port of this process's own, or says why `test` skips.
    fn start_or_skip(test: &str, dir: PathBuf) -> Option<Self> {
        if !Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
            assert!(!required(), "CONDUIT_REQUIRE_BROKER=1 but rabbitmq-server is not installed");
            eprintln!("{test} skipped: rabbitmq-server is not installed (apt-get install rabbitmq-server)");
            return None;
        }
        let port = 5_680 + u16::try_from(std::process::id() % 200).expect("below 200");
        let broker = Self { dir, port };
        broker.start();
        Some(broker)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn start(&self) {
        let output = Command::new(Self::SCRIPT)
            .arg("start")
            .arg(&self.dir)
            .arg(self.port.to_string())
            .output()
            .expect("runs scripts/broker");
        assert!(output.status.success(), "the broker did not start: {}", String::from_utf8_lossy(&output.stderr));
    }

    fn stop(&self) {
        let output = Command::new(Self::SCRIPT).arg("stop").arg(&self.dir).output().expect("runs scripts/broker");
        assert!(output.status.success(), "the broker did not stop: {}", String::from_utf8_lossy(&output.stderr));
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        drop(Command::new(Self::SCRIPT).arg("stop").arg(&self.dir).output());
    }
}

#[test]
fn a_node_rides_out_a_broker_restart() {
    const ORDERS: u64 = 30_000;
    let dir = tempfile::tempdir().expect("a temp dir");
    let Some(broker) = OwnBroker::start_or_skip("a_node_rides_out_a_broker_restart", dir.path().join("broker")) else {
        return;
    };
    let config = node_config(dir.path(), &broker.url(), &fresh_exchange("restart"), 0, 1);
    let log = dir.path().join("node.log");
    publish(&config, ORDERS);
    let node = start_node(&config, &log, "5s");
    let began = Instant::now();
    while std::fs::metadata(&log).map_or(0, |m| m.len()) < 2 << 20 {
        assert!(began.elapsed() < Duration::from_secs(120), "the node landed nothing in two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.stop();
    std::thread::sleep(Duration::from_secs(1));
    broker.start();
    let node = report(node);
    assert!(u(&node, "/inbox/reconnects") >= 1, "the node never lost its broker: {node}");
    // Mid-run: the broker took back what the node held unacknowledged, and sent it again.
    assert!(u(&node, "/inbox/redelivered") > 0, "the broker went away with nothing in hand: {node}");
    assert_eq!(
        u(&node, "/inbox/delivered"),
        ORDERS + u(&node, "/inbox/duplicates_in_window") + u(&node, "/inbox/duplicates_landed_before"),
        "every delivery beyond the orders was recognised as a repeat: {node}"
    );
    assert_eq!(orders_in(&log), (1..=ORDERS).collect(), "every order published is in the log, once");
    verify(&log);
}

#[test]
fn a_nodes_outbox_publishes_each_outcome_once_under_a_stable_id() {
    let Some(url) = broker_or_skip("a_nodes_outbox_publishes_each_outcome_once_under_a_stable_id") else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let exchange = fresh_exchange("outbox");
    let events = format!("{exchange}.events");
    let config = node_config(dir.path(), &url, &exchange, 0, 1);
    let outbox =
        format!("[bridge.outbox]\nenabled = true\nexchange = \"{events}\"\nkinds = [\"shipped\", \"cancelled\"]\n");
    let text = std::fs::read_to_string(&config).expect("reads") + &outbox;
    std::fs::write(&config, text).expect("writes");
    // A queue of the test's own on the node's events, bound before anything is published.
    let bridge = Bridge::new().expect("a runtime");
    let connection = bridge.connect(&url, "outbox test").expect("connects");
    let queue = format!("{events}.seen");
    bridge.block_on(async {
        let channel = connection.create_channel().await.expect("a channel");
        let durable = conduit_bridge::lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..conduit_bridge::lapin::options::ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                events.as_str().into(),
                conduit_bridge::lapin::ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .expect("declares the exchange");
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .expect("declares");
        channel
            .queue_bind(
                queue.as_str().into(),
                events.as_str().into(),
                "order.#".into(),
                conduit_bridge::lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("binds");
    });
    publish(&config, 2_000);
    let node = report(start_node(&config, &dir.path().join("node.log"), "2s"));
    assert_eq!(u(&node, "/outbox/published"), 2_000, "one outcome per order: {}", node["outbox"]);
    assert!(node["outbox"]["left_unpublished"].is_null(), "{}", node["outbox"]);
    let seen: Vec<(String, String)> = bridge.block_on(async {
        let channel = connection.create_channel().await.expect("a channel");
        let mut seen = Vec::new();
        while let Some(message) =
            channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("gets")
        {
            let id = message.delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
            seen.push((message.delivery.routing_key.as_str().to_owned(), id.expect("every message has an id")));
        }
        seen
    });
    assert_eq!(seen.len(), 2_000);
    assert!(seen.iter().all(|(key, _)| key == "order.shipped"), "every order of the default run ships");
    let ids: BTreeSet<&String> = seen.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 2_000, "each event under an id of its own");
}
