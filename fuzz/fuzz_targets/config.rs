//! Fuzz target `config`: the body is `conduit_orders::fuzz::config`, which
//! `crates/orders/tests/fuzz_corpus.rs` also replays over the checked-in corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conduit_orders::fuzz::config(data));
