//! The library half of the `conduit` command-line tool: the benchmark harness that measures the
//! engine against its baselines (the one-thread ceiling, per-event crossbeam hand-off, the
//! disruptor, plain redb rows, a plain file with fsync) on the same work, in the same process.
//! The criterion benches of this crate use it too.

pub mod bench;
