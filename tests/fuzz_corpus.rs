//! Replays every fuzz target over its checked-in corpus (`fuzz/corpus/<target>`) and every input
//! that ever crashed it (`fuzz/regressions/<target>`), on stable: the targets' bodies are library
//! functions (`conduit::fuzz` here, `conduit_orders::fuzz` for the order application's targets), so CI needs no nightly to keep them passing.

use std::path::Path;

#[test]
fn every_target_passes_its_corpus_and_regressions() {
    conduit::fuzz::replay(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"), &conduit::fuzz::TARGETS);
}

#[test]
fn the_routing_model_agrees_with_rabbitmq_on_the_classic_cases() {
    use conduit::fuzz::model_matches;
    let cases = [
        ("order.*", "order.paid", true),
        ("order.*", "order", false),
        ("order.#", "order", true),
        ("#", "", true),
        // The empty key has no words (the broker test found it: `crates/bridge/tests/topic_exchange.rs`).
        ("*", "", false),
        ("", "", true),
        ("#.b", "a.x.b", true),
        ("a.#.b", "a.b", true),
        ("*.*", "a", false),
    ];
    for (pattern, key, expected) in cases {
        assert_eq!(model_matches(pattern, key), expected, "{pattern:?} against {key:?}");
    }
}
