//! Damaged log files: truncation, flipped bits, zeroed pages, appended garbage. Each must give a
//! typed error or a clean recovery of what is intact — never a panic, never a hang — and
//! `conduit log verify` must exit non-zero with a message, or 0 with a consistent log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use conduit::log::{Log, LogOptions};
use conduit::EngineConfig;
use conduit_orders::{self as orders, Histories, SimConfig};
use rand::{Rng, SeedableRng};

/// A small, closed log of a finished run.
fn pristine(dir: &Path) -> Vec<u8> {
    let path = dir.join("pristine.redb");
    let log = Arc::new(Log::open(&path, LogOptions::default()).expect("new log"));
    let sim = SimConfig { payment_failure_rate: 0.2, out_of_stock_rate: 0.1, ..SimConfig::default() };
    let report = orders::run(&EngineConfig::default(), &sim, 3_000, Some(Arc::clone(&log)), |_, _| {}).expect("runs");
    assert!(report.violations().is_empty());
    log.close().expect("closes");
    drop(log);
    std::fs::read(&path).expect("read back")
}

/// Opens and reads a damaged copy on another thread; panics if that panics or takes too long.
fn survives(dir: &Path, name: &str, bytes: &[u8]) -> Result<u64, String> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write damaged copy");
    let (done, result) = mpsc::channel();
    let reader_path = path.clone();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| {
            let log = Log::open_existing(&reader_path, LogOptions::default()).map_err(|e| e.to_string())?;
            let histories = Histories::read(&log).map_err(|e| e.to_string())?;
            Ok::<u64, String>(histories.records)
        });
        // The test may have given up waiting (a hang): then nobody hears this, which is fine.
        done.send(outcome).ok();
    });
    match result.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => panic!("{name}: reading the damaged log panicked"),
        Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{name}: reading the damaged log hung")
        }
    }
}

fn verify_cli(path: &PathBuf) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_conduit")).args(["log", "verify"]).arg(path).output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (output.status.code(), stderr)
}

#[test]
fn damaged_logs_give_errors_or_clean_recoveries_never_panics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = pristine(dir.path());
    let full = survives(dir.path(), "copy", &bytes).expect("the pristine copy reads");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut outcomes = (0, 0);
    let mut tally = |result: Result<u64, String>| match result {
        Ok(records) => {
            assert!(records <= full, "a damaged log cannot hold more than the original");
            outcomes.0 += 1;
        }
        Err(message) => {
            assert!(!message.is_empty());
            outcomes.1 += 1;
        }
    };

    // `CONDUIT_CORRUPTION_ROUNDS=N` multiplies the random damage (the long tier).
    let rounds: usize = std::env::var("CONDUIT_CORRUPTION_ROUNDS").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
    // Truncation at every frame boundary (each stored frame starts with its magic) and inside
    // each frame's header, at every 4 KiB page boundary through the first 64 KiB, then at random
    // offsets.
    let frame_starts: Vec<usize> = bytes.windows(4).enumerate().filter(|(_, w)| w == b"CDLF").map(|(i, _)| i).collect();
    assert!(frame_starts.len() > 1, "the pristine log holds several frames");
    let mut cuts: Vec<usize> = frame_starts.iter().flat_map(|&at| [at, at + 8, at + 16]).collect();
    cuts.extend((0..16).map(|page| page * 4096));
    cuts.extend((0..24 * rounds).map(|_| rng.random_range(0..bytes.len())));
    for cut in cuts {
        tally(survives(dir.path(), "truncated", &bytes[..cut]));
    }
    // Single bit flips anywhere.
    for _ in 0..48 * rounds {
        let mut damaged = bytes.clone();
        let at = rng.random_range(0..damaged.len());
        damaged[at] ^= 1 << rng.random_range(0..8);
        tally(survives(dir.path(), "flipped", &damaged));
    }
    // Zeroed 4 KiB pages.
    for _ in 0..24 * rounds {
        let mut damaged = bytes.clone();
        let page = rng.random_range(0..damaged.len() / 4096);
        damaged[page * 4096..(page + 1) * 4096].fill(0);
        tally(survives(dir.path(), "zeroed", &damaged));
    }
    // Garbage appended.
    for len in [1, 100, 4096, 65_537] {
        let mut damaged = bytes.clone();
        damaged.extend((0..len).map(|_| rng.random::<u8>()));
        tally(survives(dir.path(), "appended", &damaged));
    }
    println!("damaged copies: {} read cleanly, {} refused with an error", outcomes.0, outcomes.1);
    assert!(outcomes.1 > 0, "some damage must be detected");
}

#[test]
fn log_verify_reports_damage_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = pristine(dir.path());
    let good = dir.path().join("good.redb");
    std::fs::write(&good, &bytes).expect("write");
    assert_eq!(verify_cli(&good).0, Some(0));

    let text = dir.path().join("text.redb");
    std::fs::write(&text, "definitely not a log\n").expect("write");
    let (code, stderr) = verify_cli(&text);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not a conduit log"), "{stderr}");

    let truncated = dir.path().join("truncated.redb");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");
    let (code, stderr) = verify_cli(&truncated);
    assert_eq!(code, Some(1), "a log cut to a third must not verify: {stderr}");
    assert!(stderr.starts_with("error:") && stderr.contains("truncated"), "{stderr}");

    let missing = dir.path().join("missing.redb");
    let (code, stderr) = verify_cli(&missing);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("missing.redb"), "{stderr}");
}

/// Found by the long tier's corruption rounds: redb panics ("entered unreachable code" in its
/// B-tree cursor) on some zeroed pages, and that panic reached the reader. The log now contains
/// it and reports the file as damaged. Zeroing each page of a small log in turn must give a
/// typed error or a clean read, and `conduit log verify` must say so without a panic message.
#[test]
fn zeroing_any_single_page_never_panics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = pristine(dir.path());
    let pages = bytes.len() / 4096;
    // A contained panic of the storage engine reads as one of these, depending on whether it
    // struck while opening the file or while reading its frames.
    let contained = |message: &str| message.contains("pages are damaged") || message.contains("could not read it");
    let mut engine_panicked = None;
    for page in 0..pages {
        let mut damaged = bytes.clone();
        damaged[page * 4096..(page + 1) * 4096].fill(0);
        if let Err(message) = survives(dir.path(), "zeroed-page", &damaged) {
            assert!(!message.is_empty());
            if contained(&message) && engine_panicked.is_none() {
                engine_panicked = Some(damaged);
            }
        }
    }
    println!("{pages} pages zeroed one at a time");
    // The regression is only checked if some zeroed page made the storage engine panic; on this
    // log many do (18 of 577 pages when written), so none at all means the containment changed.
    let damaged = engine_panicked.expect("no zeroed page made the storage engine panic: the regression went unchecked");
    let path = dir.path().join("engine-panics.redb");
    std::fs::write(&path, damaged).expect("write");
    let (code, stderr) = verify_cli(&path);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(contained(&stderr), "{stderr}");
}
