//! The reference order application of the conduit engine, built only on the engine's public
//! API, as an embedding application would build it.
//!
//! ```text
//! order --> payment --> inventory --+--> email
//!              |            |       +--> sms
//!              |            |       `--> shipping            (confirmed)
//!              `------------+----------> compensation        (cancelled: release, refund)
//! ```
//!
//! Every order ends in exactly one terminal state: confirmed (shipped), cancelled (compensations
//! applied) or dead-lettered (compensations applied). The simulated ports are seeded, keep their
//! books by idempotency key, and never charge an order twice; [`RunReport::violations`] checks
//! the books balance.
//!
//! ```
//! use conduit_orders::SimConfig;
//! use conduit::EngineConfig;
//!
//! let sim = SimConfig { payment_failure_rate: 0.3, out_of_stock_rate: 0.1, ..SimConfig::default() };
//! let report = conduit_orders::run(&EngineConfig::default(), &sim, 10_000, None, |_, _| {})?;
//! assert!(report.violations().is_empty(), "{:?}", report.violations());
//! assert_eq!(report.orders.submitted, 10_000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod books;
mod choreography;
mod config;
mod domain;
pub mod fuzz;
mod history;
mod pipeline;
pub mod ports;
mod redrive;
mod report;
mod run;
mod saga;
mod simulate;
mod stages;
mod timeline;
mod wiring;

pub use config::{keys, Flow, OrderRouting, PipelineFile, SimConfig, TopologyFile};
pub use domain::{
    kinds, Announced, CancelCause, CancelReason, Cancellation, Effect, IdempotencyKey, Order, OrderCodec, OrderEvent,
    Step, Workload,
};
pub use history::{Histories, OrderHistory, OrderStatus, ProviderAudit, VerifiedLedger, VerifyReport};
pub use pipeline::OrderPipeline;
pub use redrive::{redrive, redrive_with_provider, RedriveItem, RedrivePlan, RedriveReport};
pub use report::{
    DeadLetterReport, EventCounts, LedgerReport, LoadReport, LogReport, OrderCounts, RunReport, SagasReport,
    StockReport,
};
pub use run::{
    open_provider, recover, recover_with_provider, reopen, run, run_routed, run_until, verify, verify_with_provider,
    Limit, MonitorReport, Observer, Pace, RecoverReport, Reopened, RunError, RunPlan,
};
pub use saga::describe_fact;
pub use simulate::{simulate, simulate_bytes, SimulationReport};
pub use stages::{names, OrderDeadLetter, OutcomeFigures, Outcomes};
pub use timeline::{list_sagas, Moment, SagaListing, SagaState, SagaTimeline};

/// The application's crash points (see `conduit::crashpoint`), registered when a pipeline starts.
///
/// | point | where |
/// |---|---|
/// | `saga.after_charge` | the payment stage has charged, the fact not yet recorded or sent on |
/// | `recover.resumed` | a restarted pipeline has injected the orders it resumes, none finished |
/// | `orchestrated.after_refund` | the orchestrated flow has refunded a charge to compensate it, the fact not yet recorded |
pub const CRASH_POINTS: [&str; 3] = ["saga.after_charge", "recover.resumed", "orchestrated.after_refund"];
