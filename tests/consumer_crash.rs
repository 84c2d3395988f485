//! kill -9 a log consumer: a child process reads the log with a named consumer, hands every
//! record to its sink (a line on stdout, read by the parent: the sink's books live outside the
//! child), and commits its position every few reads. The parent kills it at random moments,
//! appends more records, and starts it again, cycle after cycle. Over every cycle: no record is
//! skipped, each child starts at its predecessor's last commit (so it repeats only what came after
//! that commit), and a record repeated carries the same id.
//!
//! The child is this test binary itself, started with `CONDUIT_CONSUMER_CHILD` set.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use conduit::log::{ConsumerOptions, Log, LogOptions, Record};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "CONDUIT_CONSUMER_CHILD";
const TEST: &str = "a_consumer_killed_with_kill_9_resumes_from_its_commit";

/// Appends records `from..from + count`, each with its number as payload and a fresh id.
fn append(path: &std::path::Path, from: u64, count: u64) {
    let log = Log::open(path, LogOptions::default()).expect("opens");
    for chunk in (from..from + count).collect::<Vec<_>>().chunks(250) {
        let first_id = log.reserve_ids(chunk.len() as u64);
        let records = chunk
            .iter()
            .zip(first_id..)
            .map(|(&n, id)| Record {
                id,
                stream: n % 31,
                kind: 1,
                payload: n.to_le_bytes().to_vec(),
                ..Record::default()
            })
            .collect();
        log.append(records).expect("open").wait().expect("committed");
    }
    log.close().expect("closes");
}

/// The child: read, deliver (`got N ID`), commit every fifth poll (`committed N`, the next
/// number it would read), until there is nothing more; then say `done` and wait to be stopped.
fn child(path: &str) {
    let log = Log::open(path, LogOptions::default()).expect("child opens the log");
    let mut consumer = log.consumer("sink", ConsumerOptions::default()).expect("child's consumer");
    let mut next = None;
    for poll in 1.. {
        let got = consumer.poll(37, Duration::ZERO).expect("reads");
        if got.is_empty() {
            consumer.commit().expect("commits");
            println!("done");
            std::thread::sleep(Duration::from_secs(600));
            return;
        }
        for consumed in &got {
            let n = u64::from_le_bytes(consumed.record.payload[..8].try_into().expect("eight bytes"));
            println!("got {n} {}", consumed.record.id);
            next = Some(n + 1);
        }
        if poll % 5 == 0 {
            consumer.commit().expect("commits");
            println!("committed {}", next.unwrap_or(0));
        }
    }
}

struct Run {
    /// Numbers delivered, in order, with their ids.
    got: Vec<(u64, u64)>,
    /// Every commit the child saw return, in order.
    committed: Vec<u64>,
    done: bool,
}

/// Runs a child until it says `done` (or, with `kill_after`, kills it after that long).
fn run_child(path: &std::path::Path, kill_after: Option<Duration>) -> Run {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", TEST, "--nocapture"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut run = Run { got: Vec::new(), committed: Vec::new(), done: false };
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["got", n, id] => run.got.push((n.parse().expect("number"), id.parse().expect("id"))),
                ["committed", n] => run.committed.push(n.parse().expect("number")),
                ["done"] => {
                    run.done = true;
                    break;
                }
                _ => {}
            }
        }
        run
    });
    match kill_after {
        Some(after) => std::thread::sleep(after),
        None => {
            while !reader.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    reader.join().expect("reader")
}

#[test]
fn a_consumer_killed_with_kill_9_resumes_from_its_commit() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.redb");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut total = 20_000;
    append(&path, 0, total);
    let mut ids: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_commit_seen = 0;
    let mut last_delivered: Option<u64> = None;
    let mut killed_mid_read = 0;
    for cycle in 0..16 {
        let last = cycle == 15;
        let run = run_child(&path, (!last).then(|| Duration::from_millis(rng.random_range(5..60))));
        if let Some(&(first, _)) = run.got.first() {
            // It starts at a commit of its predecessor's: at or after the last one that returned
            // (one in progress may have become durable), never past what was delivered.
            let delivered_next = last_delivered.map_or(0, |n| n + 1);
            assert!(
                first >= last_commit_seen && first <= delivered_next,
                "cycle {cycle}: started at {first}, last commit seen {last_commit_seen}, next undelivered {delivered_next}"
            );
        }
        for window in run.got.windows(2) {
            assert_eq!(window[1].0, window[0].0 + 1, "cycle {cycle}: delivered in log order without a gap");
        }
        for &(n, id) in &run.got {
            assert_eq!(*ids.entry(n).or_insert(id), id, "record {n} delivered again with another id");
        }
        if let Some(&(n, _)) = run.got.last() {
            last_delivered = Some(last_delivered.map_or(n, |d| d.max(n)));
        }
        last_commit_seen = run.committed.last().copied().unwrap_or(last_commit_seen).max(last_commit_seen);
        if last {
            assert!(run.done, "the last child reads to the end");
        } else {
            killed_mid_read += u64::from(!run.done);
            append(&path, total, 2_000);
            total += 2_000;
        }
    }
    assert_eq!(ids.len() as u64, total, "every record delivered");
    assert_eq!(ids.keys().next_back(), Some(&(total - 1)));
    assert!(killed_mid_read >= 5, "most kills land while the child reads ({killed_mid_read} of 15)");
}
