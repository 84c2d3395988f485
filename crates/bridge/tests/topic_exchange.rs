//! `conduit::routing` against the real thing: hundreds of random binding patterns (literal words,
//! `*`, `#`, empty words) bound to a RabbitMQ topic exchange, hundreds of random routing keys
//! published to it, and each queue's deliveries compared with the keys conduit's exchange routes
//! to that pattern.
//!
//! Needs a broker ([`conduit_bridge::URL_ENV`], or RabbitMQ on 127.0.0.1:5672; `scripts/broker
//! start DIR` starts one from Debian's package). Without one the test says why and passes,
//! unless `CONDUIT_REQUIRE_BROKER=1` (as in CI), where a missing broker fails it.

mod common;

use std::collections::BTreeSet;

use conduit::routing::Pattern;
use conduit_bridge::lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use conduit_bridge::lapin::types::FieldTable;
use conduit_bridge::lapin::{BasicProperties, Channel, ExchangeKind};
use rand::{Rng, SeedableRng};

/// Words patterns are made of, and words keys are made of: few, so that they meet often.
const PATTERN_WORDS: &[&str] = &["a", "b", "", "*", "#", "ab", "a*"];
const KEY_WORDS: &[&str] = &["a", "b", "", "ab", "a*"];

fn random_text(rng: &mut impl Rng, words: &[&str]) -> String {
    let count = rng.random_range(1..=5);
    (0..count).map(|_| words[rng.random_range(0..words.len())]).collect::<Vec<_>>().join(".")
}

/// A pattern where routing disagreed: the keys only the broker delivered, and those only
/// conduit routes.
struct Disagreement {
    pattern: String,
    broker_only: Vec<String>,
    conduit_only: Vec<String>,
}

/// One round: `patterns` random patterns, each bound to a queue of its own on a fresh topic
/// exchange, then `keys` random keys (and the empty key, `.` and `..`) published through it with
/// publisher confirms; each queue drained and compared with conduit's routing.
async fn round(channel: &Channel, seed: u64, patterns: usize, random_keys: usize) -> Vec<Disagreement> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let exchange = format!("conduit.differential.{seed}");
    let temporary = ExchangeDeclareOptions { auto_delete: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(exchange.as_str().into(), ExchangeKind::Topic, temporary, FieldTable::default())
        .await
        .expect("declares the exchange");
    let patterns: Vec<String> = (0..patterns).map(|_| random_text(&mut rng, PATTERN_WORDS)).collect();
    let mut keys: Vec<String> = vec![String::new(), ".".into(), "..".into()];
    keys.extend((0..random_keys).map(|_| random_text(&mut rng, KEY_WORDS)));
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    for (i, pattern) in patterns.iter().enumerate() {
        let queue = format!("{exchange}.{i}");
        channel.queue_declare(queue.as_str().into(), exclusive, FieldTable::default()).await.expect("declares");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("binds");
    }
    for (j, key) in keys.iter().enumerate() {
        channel
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                j.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publishes");
    }
    // Every message confirmed: routed to its queues (or dropped, unroutable) by the broker.
    assert!(channel.wait_for_confirms().await.expect("confirms").is_empty(), "nothing returned");
    let mut disagreements = Vec::new();
    for (i, text) in patterns.iter().enumerate() {
        let queue = format!("{exchange}.{i}");
        let mut delivered = BTreeSet::new();
        while let Some(message) =
            channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("gets")
        {
            let j: usize = std::str::from_utf8(&message.delivery.data).expect("utf-8").parse().expect("an index");
            assert!(delivered.insert(j), "key {:?} delivered twice to {text:?}", keys[j]);
        }
        let pattern = Pattern::new(text).expect("patterns this short are valid");
        let routed: BTreeSet<usize> = (0..keys.len()).filter(|&j| pattern.matches(&keys[j])).collect();
        if delivered != routed {
            let names = |set: BTreeSet<&usize>| set.into_iter().map(|&j| keys[j].clone()).collect();
            disagreements.push(Disagreement {
                pattern: text.clone(),
                broker_only: names(delivered.difference(&routed).collect()),
                conduit_only: names(routed.difference(&delivered).collect()),
            });
        }
    }
    disagreements
}

#[test]
fn conduits_topic_exchange_routes_as_rabbitmq_does() {
    let Some((bridge, connection)) = common::connect_or_skip("the topic exchange test") else { return };
    bridge.block_on(async {
        let channel = connection.create_channel().await.expect("a channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("publisher confirms");
        let mut disagreements = Vec::new();
        for seed in 1..=3 {
            disagreements.extend(round(&channel, seed, 300, 300).await);
        }
        let lines: Vec<String> = disagreements
            .iter()
            .map(|d| format!("{:?}: only the broker {:?}, only conduit {:?}", d.pattern, d.broker_only, d.conduit_only))
            .collect();
        assert!(lines.is_empty(), "{} patterns routed differently:\n{}", lines.len(), lines.join("\n"));
        connection.close(200, "done".into()).await.expect("closes");
    });
}
