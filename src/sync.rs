//! The synchronisation primitives of the engine's own lock-free code (the completion tracker):
//! std's atomics and `parking_lot`'s lock in a normal build, loom's under `cfg(loom)`, so that the
//! loom models in that code explore every interleaving of the code itself, not of a copy.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test --lib --target-dir target/loom loom_
//! ```

#[cfg(not(loom))]
pub(crate) use parking_lot::{Condvar, Mutex};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use model::{Condvar, Mutex};

/// `parking_lot`'s `Mutex` and `Condvar` API on loom's mutex. A timed wait may end at any moment,
/// so under loom it lets go of the lock, yields to the other threads and takes it again: every
/// wake-up a real timed wait can have (notified, timed out, spurious), no more.
#[cfg(loom)]
#[allow(clippy::unused_self)] // the API of the lock it stands in for
mod model {
    use std::ops::{Deref, DerefMut};
    use std::time::Duration;

    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard { lock: &self.0, guard: Some(self.0.lock().expect("no thread panics holding it")) }
        }
    }

    pub(crate) struct MutexGuard<'a, T> {
        lock: &'a loom::sync::Mutex<T>,
        guard: Option<loom::sync::MutexGuard<'a, T>>,
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.guard.as_ref().expect("held")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.guard.as_mut().expect("held")
        }
    }

    #[derive(Debug, Default)]
    pub(crate) struct Condvar;

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self
        }

        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, _timeout: Duration) {
            drop(guard.guard.take());
            loom::thread::yield_now();
            guard.guard = Some(guard.lock.lock().expect("no thread panics holding it"));
        }

        pub(crate) fn notify_all(&self) {}
    }
}
