//! # conduit
//!
//! An embeddable, single-process event pipeline engine: staged worker pools linked by bounded
//! MPMC channels that carry *batches* of events, with per-event outcomes, dead letters, metrics
//! and a graceful, draining shutdown. No async runtime: plain named threads.
//!
//! ```text
//!  submit()/try_submit()/submit_many()
//!       |
//!       v
//!  [entry stage] --batch--> [stage] --batch--> [stage] ...     every queue bounded
//!       |  workers,            |                  |
//!       |  one handler each    `--Retry--> same worker, next attempt
//!       |                      `--Reject / attempts spent--> DeadLetterSink
//!       v
//!  Snapshot (per stage: processed, emitted, retried, dead-lettered, queue depth, latency)
//! ```
//!
//! The engine knows no application. The reference order application (crate `conduit-orders`)
//! and the `conduit` command-line tool with its benchmark harness (crate `conduit-cli`) live
//! beside it in the workspace and use only this crate's public API, as an embedder would.
//!
//! ## Quick start
//!
//! ```
//! use conduit::{Emitter, Engine, EngineConfig, Envelope, Message, Outcome, Topology};
//!
//! #[derive(Debug, Clone, Copy)]
//! struct Order { id: u64, cents: u64 }
//! impl Message for Order { fn key(&self) -> u64 { self.id } }
//!
//! let mut topology = Topology::<Order>::new();
//! let validate = topology.stage("validate");
//! let charge = topology.stage("charge");
//! topology.link(validate, charge).entry(validate);
//! topology.handler(validate, move |_worker| {
//!     move |event: &Envelope<Order>, out: &mut Emitter<Order>| {
//!         if event.msg.cents == 0 {
//!             return Outcome::Reject("empty order".into());
//!         }
//!         out.emit(charge, event.msg);
//!         Outcome::Done
//!     }
//! });
//! topology.handler(charge, |_worker| |_: &Envelope<Order>, _: &mut Emitter<Order>| Outcome::Done);
//!
//! let engine = Engine::start(topology, &EngineConfig::default())?;
//! engine.submit_many((1..=1000).map(|id| Order { id, cents: id % 10 }))?;
//! let report = engine.shutdown();
//! assert_eq!(report.snapshot.stage("validate").unwrap().processed, 1000);
//! assert_eq!(report.snapshot.stage("validate").unwrap().dead_lettered, 100);
//! assert_eq!(report.snapshot.stage("charge").unwrap().processed, 900);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## API themes
//!
//! - **Errors** are precise `#[non_exhaustive]` enums per operation; a send that fails hands its
//!   value back ([`TrySubmitError::Full`] holds the message).
//! - **`try_` names** never block; their plain siblings block while a bounded queue is full.
//!   Nothing is ever dropped silently: every queue is bounded, and backpressure reaches the caller.
//! - **Limits** live in [`config::limits`] and are checked once, when an [`EngineConfig`] is built.
//! - **Failures** are per event: a batch is a transport unit, never a unit of failure. A handler
//!   panic is caught and counted as a retry; a worker that dies poisons the engine, so no caller
//!   waits forever. Dead letters carry their story (kind, error chain, failure times) and, with a
//!   log, are records there that [`dlq`] lists, redrives and purges.
//!
//! ## Bounded by the work in flight
//!
//! [`completion`] tracks when all the work of each submitted message has finished (Storm's XOR
//! acker: one word per message in flight), for [`Ticket`]s, an [`OnComplete`] callback and the
//! journal. The [`log`] checkpoints what opening and recovery need (messages in flight, stream
//! versions) and applies a [`log::Retention`] policy, so opening, reading one stream and
//! [`Engine::resume_in_flight`] cost the work in flight, not the history. [`dedup`] windows
//! bound what idempotency remembers.
//!
//! ## Around the engine
//!
//! [`log`] is the durable event log (rkyv frames in redb); [`routing`] the topic exchange; [`rpc`]
//! request/reply; [`breaker`] circuit breakers; [`wheel`] the timing wheel retries wait on;
//! [`clock`] the injected time ([`SystemClock`], [`ManualClock`]) that backoff and expiry read.
//!
//! ## Inside a stage
//!
//! Each worker runs its events through one decision core (private module `stage`): `decision`
//! turns a handler's outcome, the event's attempts and failures so far and the stage's settings
//! into a disposition (forward, retry after a delay, dead-letter with kind and reason);
//! `parking` holds a retried key's later events behind it and owns the wheel its backoffs and
//! expiries wait on; `handling` runs one event through both; `worker` is the threaded loop and
//! `outbox` the batches bound for linked stages. The deterministic simulation runs the same
//! `handling` code on a manual clock, so what it checks is what runs in production.
//!
//! ## Features
//!
//! None is on by default, and none adds a dependency. They are test scaffolding:
//! - `sim`: `sim` runs a topology deterministically on one thread (seeded scheduler, manual
//!   clock) through the worker's own decision code;
//! - `fuzzing`: `fuzz` holds the bodies of the engine's fuzz targets;
//! - `crashpoints`: `crashpoint`, the named crash points the reliability suite arms (the engine
//!   names its own; an application registers more). See RELIABILITY.md.

/// Passes a named crash point (feature `crashpoints`; nothing without it).
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "crashpoints")]
        crate::crashpoint::hit($name);
    };
}

pub mod alerts;
pub mod breaker;
mod channel;
pub mod clock;
pub mod completion;
pub mod config;
#[cfg(feature = "crashpoints")]
pub mod crashpoint;
mod dead_letter;
pub mod dedup;
pub mod dlq;
mod engine;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod ingress;
mod journal;
pub mod log;
pub mod metrics;
#[cfg(feature = "prometheus")]
pub mod prometheus;
pub mod routing;
pub mod rpc;
pub mod saga;
#[cfg(feature = "sim")]
pub mod sim;
mod stage;
mod sync;
mod topology;
pub mod wheel;

pub use alerts::{Alert, AlertRule, AlertRules, AlertsSnapshot};
pub use clock::{Clock, ManualClock, SystemClock};
pub use completion::{OnComplete, Ticket};
pub use config::{
    EngineConfig, EngineConfigBuilder, EngineSettings, Jitter, Overflow, StageConfig, StageSettings, Workers,
};
pub use dead_letter::{DeadLetter, DeadLetterKind, DeadLetterNote, DeadLetterSink, MemoryDeadLetters};
pub use engine::{Engine, EngineBuilder, ShutdownReport, INJECTED_MESSAGES_AT_ONCE};
pub use error::{BuildError, ConfigError, RecoverError, ResizeError, SubmitError, TrySubmitError};
pub use ingress::{Receipt, INGRESS_WINDOW_EVENTS, WINDOWS_IN_FLIGHT};
pub use journal::{Journal, JournalCodec};
pub use metrics::{LatencyHistograms, LatencySummary, Snapshot, StageRates, StageSnapshot};
pub use stage::{Deadline, Emitter, Envelope, Handler, Message, Outcome, Reason, StageId};
pub use topology::Topology;
