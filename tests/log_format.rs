//! The on-disk frame format is an API: this golden file was written by format version 1 and
//! every later build must read it to the same records, and write the same bytes for them. A
//! deliberate format change bumps `FORMAT_VERSION` and adds a new fixture beside this one
//! (`CONDUIT_BLESS=1 cargo test --test log_format` writes a missing one).

use conduit::log::{decode_frame_owned, encode_frame, Frame, Record, FORMAT_VERSION, KIND_DEAD_LETTER, STAGE_INGRESS};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/frame-v1.bin");

fn golden_frame() -> Frame {
    let order_payload: Vec<u8> = (0u8..34).collect();
    Frame {
        seq: 42,
        records: vec![
            Record {
                id: 1,
                stream: 1001,
                version: 1,
                kind: 1,
                stage: STAGE_INGRESS,
                attempts: 0,
                cause_kind: 0,
                timestamp_us: 1_795_000_000_000_000,
                correlation: 7,
                causation: 0,
                payload: order_payload.clone(),
                note: String::new(),
            },
            Record {
                id: 2,
                stream: 1001,
                version: 2,
                kind: 2,
                stage: 0,
                timestamp_us: 1_795_000_000_000_250,
                correlation: 7,
                causation: 1,
                ..Record::default()
            },
            Record {
                id: 3,
                stream: 1001,
                version: 3,
                kind: KIND_DEAD_LETTER,
                stage: 1,
                attempts: 5,
                cause_kind: 2,
                timestamp_us: 1_795_000_000_001_000,
                correlation: 7,
                causation: 2,
                payload: order_payload,
                note: "retries_exhausted: gateway unavailable".into(),
            },
        ],
    }
}

#[test]
fn the_version_1_golden_frame_reads_and_writes_identically() {
    assert_eq!(FORMAT_VERSION, 1, "a new format version needs its own fixture and this test extended");
    let mut encoded = Vec::new();
    encode_frame(&golden_frame(), &mut encoded);
    if std::env::var_os("CONDUIT_BLESS").is_some() && !std::path::Path::new(FIXTURE).exists() {
        std::fs::write(FIXTURE, &encoded).expect("write the fixture");
    }
    let golden = std::fs::read(FIXTURE).expect("tests/fixtures/frame-v1.bin is checked in");
    assert_eq!(&golden[..4], b"CDLF");
    assert_eq!(decode_frame_owned(42, &golden), Ok(golden_frame()), "the fixture decodes to the same records");
    assert_eq!(encoded, golden, "this build writes the same bytes as format version 1");
}
