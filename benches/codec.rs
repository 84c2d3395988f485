//! The frame codec: encoding a frame of typical records, and reading it back through the checked
//! header and rkyv's validated access, against copying the same bytes (the floor).
//!
//! `cargo bench --bench codec`; figures are records per second.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use conduit::log::{decode_frame, decode_frame_owned, encode_frame, Frame, Record};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const RECORDS: usize = 3_400; // about one 250 KiB frame

fn frame() -> Frame {
    let records = (0..RECORDS as u64)
        .map(|i| Record {
            id: i + 1,
            stream: i / 7 + 1,
            version: u32::try_from(i % 7).unwrap_or(0) + 1,
            kind: u16::try_from(i % 7).unwrap_or(0) + 1,
            timestamp_us: 1_795_000_000_000_000 + i,
            correlation: i / 7,
            causation: i,
            payload: if i % 7 == 0 { vec![7; 34] } else { Vec::new() },
            ..Record::default()
        })
        .collect();
    Frame { seq: 1, records }
}

fn codec(c: &mut Criterion) {
    let frame = frame();
    let mut encoded = Vec::new();
    encode_frame(&frame, &mut encoded);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("baseline_copy_bytes", |b| {
        let mut copy = Vec::with_capacity(encoded.len());
        b.iter(|| {
            copy.clear();
            copy.extend_from_slice(black_box(&encoded));
            black_box(copy.len())
        });
    });
    group.bench_function("encode_frame", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            encode_frame(black_box(&frame), &mut out);
            black_box(out.len())
        });
    });
    group.bench_function("decode_frame_validated_access", |b| {
        b.iter(|| black_box(decode_frame(black_box(&encoded)).map(|f| f.records.len())));
    });
    group.bench_function("decode_frame_owned", |b| {
        b.iter(|| black_box(decode_frame_owned(1, black_box(&encoded)).map(|f| f.records.len())));
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
