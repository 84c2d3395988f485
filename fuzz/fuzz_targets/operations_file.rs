//! Fuzz target `operations_file`: the body is `conduit_orders::fuzz::operations_file` (the
//! `operations` target on files: fsynced commits, slower, for the long tier), which
//! `crates/orders/tests/fuzz_corpus.rs` also replays over the checked-in corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conduit_orders::fuzz::operations_file(data));
