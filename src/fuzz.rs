//! The bodies of the fuzz targets in `fuzz/`: each takes arbitrary bytes and panics only when
//! the code under test breaks a promise (a panic inside the code, a wrong answer against a model,
//! a broken invariant). The order application's targets (`config`, `operations`) live in its
//! own crate. cargo-fuzz drives them on nightly; `tests/fuzz_corpus.rs` replays the
//! checked-in corpus and every crash ever found on stable, so CI needs no nightly.

use crate::log::{check_header, decode_frame, decode_frame_owned, encode_frame, HEADER_LEN};
use crate::routing::{ExchangeBuilder, Pattern, KEY_BYTES_MAX};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Runs each target over its checked-in corpus (`<fuzz_dir>/corpus/<target>`, which must not be
/// empty) and every input that ever crashed it (`<fuzz_dir>/regressions/<target>`), checking that
/// each target has its cargo-fuzz file (`<fuzz_dir>/fuzz_targets/<target>.rs`). A failing input
/// panics the target; its path is printed first.
///
/// # Panics
/// When a target breaks a promise on an input, or a target has no corpus or no fuzz file.
pub fn replay(fuzz_dir: &std::path::Path, targets: &[(&str, Target)]) {
    fn inputs(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut inputs: Vec<(String, Vec<u8>)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| (e.path().display().to_string(), std::fs::read(e.path()).expect("a corpus file reads")))
            .collect();
        inputs.sort();
        inputs
    }
    for &(name, target) in targets {
        let corpus = inputs(&fuzz_dir.join("corpus").join(name));
        assert!(!corpus.is_empty(), "target {name} has no seed corpus");
        assert!(
            fuzz_dir.join("fuzz_targets").join(format!("{name}.rs")).is_file(),
            "target {name} has no fuzz_targets file"
        );
        let regressions = inputs(&fuzz_dir.join("regressions").join(name));
        for (path, bytes) in corpus.iter().chain(&regressions) {
            eprintln!("{name}: {path}");
            target(bytes);
        }
    }
}

/// The fuzz targets, by name (the file names under `fuzz/fuzz_targets` and `fuzz/corpus`).
pub const TARGETS: [(&str, Target); 3] =
    [("frame_bytes", frame_bytes), ("frame_body", frame_body), ("routing", routing)];

/// Raw bytes as a stored frame: a typed error or a frame that re-encodes to an equal frame.
pub fn frame_bytes(data: &[u8]) {
    let Ok(archived) = decode_frame(data) else { return };
    let seq = u64::from(archived.seq);
    let frame = decode_frame_owned(seq, data).expect("a frame that validates deserializes");
    let mut bytes = Vec::new();
    encode_frame(&frame, &mut bytes);
    let again = decode_frame_owned(seq, &bytes).expect("a frame re-encoded reads back");
    assert_eq!(frame, again, "a frame must survive a round trip");
}

/// Raw bytes as a frame *body* behind a valid header (magic, version, length and checksum all
/// right), so every input reaches rkyv's validation: it must refuse or accept, never crash.
pub fn frame_body(data: &[u8]) {
    let mut bytes = Vec::with_capacity(HEADER_LEN + data.len());
    bytes.extend_from_slice(&crate::log::MAGIC);
    bytes.extend_from_slice(&crate::log::FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    let Ok(len) = u32::try_from(data.len()) else { return };
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    bytes.extend_from_slice(data);
    assert!(check_header(&bytes).is_ok(), "the header built here is valid");
    frame_bytes(&bytes);
}

/// Lines of text as binding patterns (before a blank line) and routing keys (after it): each
/// pattern compiles or is refused for length, each key matches as a simple model says, and the
/// compiled exchange table agrees with matching pattern by pattern.
pub fn routing(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (patterns, keys) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut builder = ExchangeBuilder::new();
    let mut compiled = Vec::new();
    for (queue, line) in patterns.lines().take(32).enumerate() {
        match Pattern::new(line) {
            Ok(pattern) => {
                builder.bind(line, queue).expect("a pattern that compiles binds");
                compiled.push((pattern, queue));
            }
            Err(_) => assert!(line.len() > KEY_BYTES_MAX, "only an over-long pattern is refused: {line:?}"),
        }
    }
    let mut routes = Vec::new();
    for line in keys.lines().take(32) {
        match builder.key(line) {
            Ok(route) => routes.push((route, line)),
            Err(_) => assert!(line.len() > KEY_BYTES_MAX, "only an over-long key is refused: {line:?}"),
        }
    }
    let exchange = builder.build();
    for (route, key) in routes {
        let mut expected: Vec<usize> = compiled
            .iter()
            .filter(|(pattern, _)| {
                let matched = pattern.matches(key);
                assert_eq!(matched, model_matches(pattern.as_str(), key), "{:?} against {key:?}", pattern.as_str());
                matched
            })
            .map(|&(_, queue)| queue)
            .collect();
        expected.dedup();
        let mut table = exchange.destinations(route).to_vec();
        table.sort_unstable();
        expected.sort_unstable();
        assert_eq!(table, expected, "the table's destinations for {key:?}");
    }
}

/// RabbitMQ topic matching written the plain recursive way (memoized), as the model for
/// [`Pattern::matches`]: `*` is exactly one word, `#` zero or more, words split on `.` (the empty
/// key or pattern has none).
#[must_use]
pub fn model_matches<'a>(pattern: &'a str, key: &'a str) -> bool {
    fn go(p: &[&str], k: &[&str], memo: &mut Vec<Option<bool>>, width: usize) -> bool {
        let slot = p.len() * width + k.len();
        if let Some(known) = memo[slot] {
            return known;
        }
        let result = match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => go(rest, k, memo, width) || (!k.is_empty() && go(p, &k[1..], memo, width)),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..], memo, width),
            Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..], memo, width),
        };
        memo[slot] = Some(result);
        result
    }
    // RabbitMQ splits the empty key (or pattern) into no words, and any other into its words.
    let words = |text: &'a str| -> Vec<&'a str> {
        if text.is_empty() {
            Vec::new()
        } else {
            text.split('.').collect()
        }
    };
    let (p, k) = (words(pattern), words(key));
    let width = k.len() + 1;
    go(&p, &k, &mut vec![None; (p.len() + 1) * width], width)
}
