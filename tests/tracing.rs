//! tracing: each batch a worker handles is a `batch` span (stage, worker, events) at debug level,
//! each event handled inside it an `event` span (key, seq, attempt) at trace level; an elastic
//! pool's resizes are `pool resized` events at info level. The library
//! installs no subscriber: this test binary installs one, process-wide, to read them.

use std::io::Write;
use std::sync::Arc;

use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Topology};
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job(u64);

impl Message for Job {
    fn key(&self) -> u64 {
        self.0
    }
}

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn batches_and_events_are_spans_with_stage_key_and_attempt() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::NEW)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .expect("the only subscriber of this test binary");

    let mut topology = Topology::new();
    let check = topology.stage("check");
    topology.entry(check);
    // Job 7 fails its first attempt.
    topology.handler(check, |_| {
        |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            if event.msg.0 == 7 && event.attempt == 0 {
                Outcome::Retry("not yet".into())
            } else {
                Outcome::Done
            }
        }
    });
    let engine = Engine::start(topology, &EngineConfig::default()).expect("starts");
    engine.submit_many((0..10).map(Job)).expect("accepted");
    assert!(engine.shutdown().is_clean());

    let text = String::from_utf8(captured.0.lock().clone()).expect("utf-8");
    assert!(text.contains("batch{stage=\"check\" worker=0 events="), "{text}");
    assert!(text.contains("event{key=3 seq=3 attempt=0}"), "{text}");
    assert!(text.contains("event{key=7 seq=7 attempt=0}"), "{text}");
    assert!(text.contains("event{key=7 seq=7 attempt=1}"), "the retry is its own span: {text}");

    // An elastic pool's resizes are info events with the stage, the sizes and why.
    let mut topology = Topology::new();
    let elastic = topology.stage("elastic");
    topology.entry(elastic);
    topology.handler(elastic, |_| |_: &Envelope<Job>, _: &mut Emitter<Job>| Outcome::Done);
    let config = EngineConfig::from_toml_str("workers = { min = 1, max = 4 }\n").expect("valid");
    let engine = Engine::start(topology, &config).expect("starts");
    engine.set_workers(elastic, 3).expect("within the bounds");
    engine.set_workers(elastic, 1).expect("within the bounds");
    assert!(engine.shutdown().is_clean());
    let text = String::from_utf8(captured.0.lock().clone()).expect("utf-8");
    for resize in ["from=1 to=3 why=\"set by hand\"", "from=3 to=1 why=\"set by hand\""] {
        let line = text.lines().find(|l| l.contains("pool resized") && l.contains(resize));
        assert!(line.is_some_and(|l| l.contains("INFO") && l.contains("stage=\"elastic\"")), "{resize} in {text}");
    }
}
