//! Replays the order application's fuzz targets (`config`, `operations`) over their checked-in
//! corpus (`fuzz/corpus/<target>`) and every input that ever crashed them
//! (`fuzz/regressions/<target>`), on stable.

use std::path::Path;

#[test]
fn every_target_passes_its_corpus_and_regressions() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    conduit::fuzz::replay(&fuzz_dir, &conduit_orders::fuzz::TARGETS);
}
