//! A storage device that starts failing: after the first failed commit the log acknowledges
//! nothing more, every caller hears of it, and the engine's `submit` stops returning success.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use conduit::log::{Log, LogError, LogOptions, Record};
use conduit::{EngineConfig, SubmitError};
use conduit_orders::{Order, OrderPipeline, SimConfig};
use redb::backends::InMemoryBackend;
use redb::StorageBackend;

/// Memory storage whose writes and syncs fail once `broken` is set.
#[derive(Debug)]
struct Breakable {
    inner: InMemoryBackend,
    broken: Arc<AtomicBool>,
}

impl Breakable {
    fn check(&self) -> Result<(), std::io::Error> {
        if self.broken.load(Ordering::SeqCst) {
            Err(std::io::Error::other("the disk is gone"))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for Breakable {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

fn breakable_log() -> (Arc<Log>, Arc<AtomicBool>) {
    let broken = Arc::new(AtomicBool::new(false));
    let backend = Breakable { inner: InMemoryBackend::new(), broken: Arc::clone(&broken) };
    let log = Log::open_with_backend("breakable", backend, LogOptions::default()).expect("opens in memory");
    (Arc::new(log), broken)
}

#[test]
fn after_a_failed_commit_nothing_is_acknowledged() {
    let (log, broken) = breakable_log();
    let record = |stream| Record { stream, kind: 1, ..Record::default() };
    log.append(vec![record(1)]).expect("queued").wait().expect("committed while healthy");
    broken.store(true, Ordering::SeqCst);
    let failed = log.append(vec![record(2)]).expect("queued").wait();
    assert!(matches!(failed, Err(LogError::Failed(ref reason)) if reason.contains("disk is gone")), "{failed:?}");
    assert!(log.failure().is_some());
    // The disk comes back, but the log stays failed: what it acknowledged must stay true.
    broken.store(false, Ordering::SeqCst);
    assert!(matches!(log.append(vec![record(3)]), Err(LogError::Failed(_))));
    assert!(matches!(log.sync(), Err(LogError::Failed(_))));
    assert_eq!(log.stats().events_appended, 1);
}

#[test]
fn a_failing_log_makes_submit_fail_instead_of_acknowledging() {
    let (log, broken) = breakable_log();
    let pipeline =
        OrderPipeline::start_with(&EngineConfig::default(), &SimConfig::default(), Some(Arc::clone(&log)), None)
            .expect("starts");
    let order = |id| Order { id, customer: 1, sku: 1, quantity: 1, amount_cents: 100 };
    pipeline.submit(order(1)).expect("durable while healthy");
    broken.store(true, Ordering::SeqCst);
    let refused = pipeline.submit(order(2));
    assert!(matches!(refused, Err(SubmitError::LogFailed(o)) if o.id == 2), "{refused:?}");
    let refused_many = pipeline.submit_many((3..100).map(order));
    match refused_many {
        Err(SubmitError::LogFailed(events)) => assert_eq!(events.len(), 97, "every order comes back"),
        other => panic!("expected LogFailed, got {other:?}"),
    }
    let report = pipeline.finish();
    assert_eq!(report.orders.submitted, 1, "only the durable order entered the pipeline");
    assert!(report.log.is_some_and(|l| l.sync_error.is_some()));
}
