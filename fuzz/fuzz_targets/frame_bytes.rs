//! Fuzz target `frame_bytes`: the body is `conduit::fuzz::frame_bytes`, which `tests/fuzz_corpus.rs` also
//! replays over the checked-in corpus on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conduit::fuzz::frame_bytes(data));
