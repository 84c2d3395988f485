//! Replays every fuzz target over its checked-in corpus (`fuzz/corpus/<target>`) and every input
//! that ever crashed it (`fuzz/regressions/<target>`), on stable: the targets' bodies are library
//! functions (`conduit::fuzz` here, `conduit_orders::fuzz` for the order application's targets), so CI needs no nightly to keep them passing.

use std::path::Path;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut inputs: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.path().display().to_string(), std::fs::read(e.path()).expect("a corpus file reads")))
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn every_target_passes_its_corpus_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in conduit::fuzz::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "target {name} has no seed corpus");
        assert!(
            root.join("fuzz_targets").join(format!("{name}.rs")).is_file(),
            "target {name} has no fuzz_targets file"
        );
        let regressions = inputs(&root.join("regressions").join(name));
        for (path, bytes) in corpus.iter().chain(&regressions) {
            eprintln!("{name}: {path}");
            target(bytes);
        }
    }
}

#[test]
fn the_routing_model_agrees_with_rabbitmq_on_the_classic_cases() {
    use conduit::fuzz::model_matches;
    let cases = [
        ("order.*", "order.paid", true),
        ("order.*", "order", false),
        ("order.#", "order", true),
        ("#", "", true),
        ("*", "", true),
        ("#.b", "a.x.b", true),
        ("a.#.b", "a.b", true),
        ("*.*", "a", false),
    ];
    for (pattern, key, expected) in cases {
        assert_eq!(model_matches(pattern, key), expected, "{pattern:?} against {key:?}");
    }
}
