//! A stage with two priority levels: queued high-priority events overtake queued low-priority
//! ones, and each key's events keep their order (a key's events share its priority).

use std::sync::Arc;

use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, StageSettings, Topology};
use crossbeam_channel::Receiver;
use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    key: u64,
    n: u64,
}

impl Message for Job {
    fn key(&self) -> u64 {
        self.key
    }

    fn priority(&self) -> u8 {
        u8::from(self.key % 10 == 0) // every tenth customer is a premium one
    }
}

#[test]
fn high_priority_overtakes_and_each_key_keeps_its_order() {
    let (open, gate): (_, Receiver<()>) = crossbeam_channel::bounded(1);
    let handled: Arc<Mutex<Vec<Job>>> = Arc::new(Mutex::new(Vec::new()));
    let mut topology = Topology::new();
    let stage = topology.stage("work");
    topology.entry(stage);
    let seen = Arc::clone(&handled);
    topology.handler(stage, move |_| {
        let (seen, gate) = (Arc::clone(&seen), gate.clone());
        move |event: &Envelope<Job>, _: &mut Emitter<Job>| {
            let first = {
                let mut seen = seen.lock();
                seen.push(event.msg);
                seen.len() == 1
            };
            if first {
                gate.recv().expect("the test opens the gate"); // hold the worker until all is queued
            }
            Outcome::Done
        }
    });
    // One event per batch, and room for all of them, so everything is queued before the gate opens.
    let settings = StageSettings { priority_levels: Some(2), ..StageSettings::default() };
    let config = EngineConfig::builder()
        .batch_events_max(1)
        .queue_batches(2_000)
        .stage("work", settings)
        .build()
        .expect("valid");
    let engine = Engine::start(topology, &config).expect("valid");
    let jobs: Vec<Job> = (0..20).flat_map(|n| (0..50).map(move |key| Job { key, n })).collect();
    engine.submit_many(jobs.iter().copied()).expect("healthy");
    open.send(()).expect("the worker waits at the gate");
    let report = engine.shutdown();
    assert_eq!(report.snapshot.stages[0].processed, 1_000);

    let handled = handled.lock();
    let after_gate = &handled[1..];
    let first_low = after_gate.iter().position(|j| j.priority() == 0).expect("low-priority jobs ran");
    assert!(
        after_gate[first_low..].iter().all(|j| j.priority() == 0),
        "a high-priority job waited behind a low-priority one"
    );
    assert_eq!(first_low, 5 * 20 - 1, "every queued high-priority job ran first");
    for key in 0..50 {
        let ns: Vec<u64> = handled.iter().filter(|j| j.key == key).map(|j| j.n).collect();
        assert_eq!(ns, (0..20).collect::<Vec<_>>(), "key {key} out of order");
    }
}

#[test]
fn priority_levels_are_bounded() {
    let settings = StageSettings { priority_levels: Some(9), ..StageSettings::default() };
    let error = EngineConfig::builder().stage("work", settings).build().expect_err("too many levels");
    assert!(error.to_string().contains("priority_levels"), "{error}");
}
