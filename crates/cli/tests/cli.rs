//! The `conduit` binary as a user runs it: the JSON report's schema, and clear errors with exit
//! code 2 for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn conduit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conduit")).args(args).output().expect("the binary runs")
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conduit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

fn json_run(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["run", "--format", "json"];
    all.extend_from_slice(args);
    let output = conduit(&all);
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("stdout is exactly one JSON object")
}

fn u(value: &serde_json::Value, pointer: &str) -> u64 {
    value.pointer(pointer).and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("{pointer} missing"))
}

#[test]
fn json_report_has_the_documented_schema_and_balances() {
    let report = json_run(&["--orders", "20000", "--payment-failure-rate", "0.3", "--out-of-stock-rate", "0.1"]);
    let submitted = u(&report, "/orders/submitted");
    assert_eq!(submitted, 20_000);
    assert_eq!(
        submitted,
        u(&report, "/orders/confirmed") + u(&report, "/orders/cancelled") + u(&report, "/orders/dead_lettered")
    );
    assert_eq!(u(&report, "/orders/in_flight"), 0);
    assert_eq!(u(&report, "/ledger/double_charges"), 0);
    assert_eq!(
        u(&report, "/ledger/charged_cents") - u(&report, "/ledger/refunded_cents"),
        u(&report, "/ledger/confirmed_total_cents")
    );
    assert!(u(&report, "/events/total") > submitted);
    for pointer in ["/events/per_sec", "/orders_per_sec", "/elapsed_s"] {
        assert!(report.pointer(pointer).and_then(serde_json::Value::as_f64).is_some_and(|v| v > 0.0), "{pointer}");
    }
    let stages = report["stages"].as_array().expect("stages is an array");
    let names: Vec<_> = stages.iter().map(|s| s["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["order", "payment", "inventory", "email", "sms", "shipping", "compensation"]);
    for stage in stages {
        for field in ["processed", "retried", "dead_lettered"] {
            assert!(stage[field].is_u64(), "{field}");
        }
        for field in ["p50", "p99", "p999", "max"] {
            assert!(stage["latency_us"][field].is_f64(), "latency_us.{field}");
        }
    }
    assert!(u(&report, "/stages/1/retried") > 0, "payment failures were retried");
}

#[test]
fn a_run_for_a_duration_generates_orders_until_the_time_is_up() {
    let report = json_run(&["--duration", "2s", "--payment-failure-rate", "0.2"]);
    let submitted = u(&report, "/orders/submitted");
    assert!(submitted > 1_000, "a second of load: {submitted} orders");
    assert_eq!(u(&report, "/orders/in_flight"), 0);
    assert_eq!(report["ledger"]["balanced"], true);
    assert!(report["elapsed_s"].as_f64().is_some_and(|s| (2.0..30.0).contains(&s)), "{}", report["elapsed_s"]);
}

#[test]
fn config_file_shapes_the_engine() {
    let path = temp_file(
        "shape.toml",
        "[engine]\nworkers = 2\nbatch_events_max = 32\n[engine.stages.email]\nworkers = 1\n\n[simulation]\nseed = 9\n",
    );
    let report = json_run(&["--orders", "3000", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(u(&report, "/seed"), 9);
    assert_eq!(u(&report, "/stages/0/workers"), 2);
    assert_eq!(u(&report, "/stages/3/workers"), 1);
}

fn assert_refused(args: &[&str], needle: &str) {
    let output = conduit(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "args {args:?}: stderr {stderr}");
    assert!(stderr.contains(needle), "args {args:?}: stderr {stderr:?} should mention {needle:?}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
    assert!(output.stdout.is_empty(), "no report on bad input");
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code_2() {
    assert_refused(&["run", "--payment-failure-rate", "-0.1"], "payment_failure_rate");
    assert_refused(&["run", "--out-of-stock-rate", "1.5"], "out_of_stock_rate");
    assert_refused(&["run", "--payment-failure-rate", "NaN"], "payment_failure_rate");
    assert_refused(&["run", "--batch", "0"], "batch_events_max");
    assert_refused(&["run", "--workers", "0"], "workers");
    assert_refused(&["run", "--orders", "ten"], "invalid value");
    assert_refused(&["run", "--duration", "ten"], "--duration");
    assert_refused(&["run", "--duration", "0s"], "--duration must be longer than zero");
    assert_refused(&["run", "--duration", "1s", "--orders", "5"], "cannot be used with");
    assert_refused(&["run", "--metrics-addr", "0.0.0.0:9464"], "loopback address only");
    assert_refused(&["top", "--orders", "10"], "conduit top draws on a terminal");
    assert_refused(&["run", "--metrics-addr", "[::]:9464"], "loopback address only");
    assert_refused(&["run", "--metrics-addr", "localhost"], "--metrics-addr");
    assert_refused(&["run", "--metrics-linger", "1s"], "--metrics-addr");
    let no_window = temp_file("window.toml", "[simulation]\nidempotency_window_keys = 0\n");
    assert_refused(&["run", "--config", no_window.to_str().expect("utf-8")], "simulation.idempotency_window_keys");

    let unknown_key = temp_file("unknown.toml", "[engine]\nwrokers = 2\n");
    assert_refused(&["run", "--config", unknown_key.to_str().expect("utf-8")], "wrokers");
    let zero_queue = temp_file("zero.toml", "[engine.stages.payment]\nqueue_batches = 0\n");
    assert_refused(&["run", "--config", zero_queue.to_str().expect("utf-8")], "engine.stages.payment.queue_batches");
    let unknown_stage = temp_file("stage.toml", "[engine.stages.paymnet]\nworkers = 2\n");
    assert_refused(&["run", "--config", unknown_stage.to_str().expect("utf-8")], "paymnet");
    for (name, pool, named) in [
        ("inverted.toml", "{ min = 4, max = 2 }", "engine.stages.email.workers: min (4) is above max (2)"),
        ("above.toml", "{ min = 1, max = 300 }", "engine.stages.email.workers.max = 300"),
        ("zero_bound.toml", "{ min = 0, max = 3 }", "engine.stages.email.workers.min = 0"),
        ("unknown_bound.toml", "{ min = 1, mx = 3 }", "unknown field `mx`"),
    ] {
        let elastic = temp_file(name, &format!("[engine.stages.email]\nworkers = {pool}\n"));
        assert_refused(&["run", "--config", elastic.to_str().expect("utf-8")], named);
    }
    let negative = temp_file("negative.toml", "[simulation]\nnotify_failure_rate = -1.0\n");
    assert_refused(&["run", "--config", negative.to_str().expect("utf-8")], "notify_failure_rate");
    let garbage = temp_file("garbage.toml", "\u{0}\u{1}not toml at all [[[");
    assert_refused(&["run", "--config", garbage.to_str().expect("utf-8")], "cannot parse");
    assert_refused(&["run", "--config", "/nonexistent/conduit.toml"], "cannot read config file");
}

#[test]
fn a_durable_run_verifies_inspects_replays_and_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("orders.redb");
    let log_arg = log.to_str().expect("utf-8 path");
    let report =
        json_run(&["--orders", "3000", "--log", log_arg, "--durability", "immediate", "--payment-failure-rate", "0.2"]);
    assert_eq!(u(&report, "/log/events_appended") - u(&report, "/log/engine_records"), u(&report, "/events/total"));
    assert!(u(&report, "/log/engine_records") > 0, "the log says which orders finished");
    assert!(u(&report, "/log/commits") > 0 && u(&report, "/log/bytes") > 0);
    assert_eq!(report["log"]["durability"], "immediate");
    assert!(report["ack_latency_us"]["p99"].as_f64().is_some_and(|p| p > 0.0));

    let verify = conduit(&["log", "verify", log_arg, "--format", "json"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let verify: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("json");
    assert_eq!(verify["ok"], true);
    assert_eq!(u(&verify, "/orders"), 3000);
    assert_eq!(u(&verify, "/records"), u(&report, "/events/total"));
    // The payment provider kept its own books beside the log, and they agree with it.
    assert_eq!(u(&verify, "/provider/orders"), 3000, "{verify}");
    assert_eq!(u(&verify, "/provider/wrong_count") + u(&verify, "/provider/double_charges"), 0);
    assert_eq!(u(&verify, "/provider/confirmed_total_cents"), u(&report, "/ledger/confirmed_total_cents"));

    let inspect = conduit(&["log", "inspect", log_arg, "--order", "17", "--format", "json"]);
    assert!(inspect.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&inspect.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(lines.len() >= 3);
    assert_eq!(lines[0]["kind"], "placed");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["stream"], 17);
        assert_eq!(u(line, "/version"), i as u64 + 1);
    }

    let replay = conduit(&["replay", log_arg, "--order", "17", "--at-version", "2", "--format", "json"]);
    assert!(replay.status.success());
    let replay: serde_json::Value = serde_json::from_slice(&replay.stdout).expect("json");
    assert_eq!((u(&replay, "/version"), replay["status"].as_str()), (2, Some("in_flight")));
    assert_eq!(replay["next"][0], "payment");
    let first_time = lines[0]["timestamp_us"].as_u64().expect("timestamp");
    let as_of = conduit(&["replay", log_arg, "--order", "17", "--as-of", &first_time.to_string(), "--format", "json"]);
    let as_of: serde_json::Value = serde_json::from_slice(&as_of.stdout).expect("json");
    assert!(u(&as_of, "/version") >= 1);
    let bad_time = conduit(&["replay", log_arg, "--order", "17", "--as-of", "yesterday-ish"]);
    assert_eq!(bad_time.status.code(), Some(2));

    let recover = conduit(&["recover", log_arg, "--format", "json"]);
    assert!(recover.status.success(), "{}", String::from_utf8_lossy(&recover.stderr));
    let recover: serde_json::Value = serde_json::from_slice(&recover.stdout).expect("json");
    assert_eq!(u(&recover, "/orders_found"), 3000);
    assert_eq!(u(&recover, "/orders_in_flight"), 0, "a finished run leaves nothing to read or resume");
    assert_eq!(recover["verify"]["ok"], true);

    // The log holds orders now: `run` refuses to mix new ones in.
    assert_refused(&["run", "--orders", "10", "--log", log_arg], "already holds");
    // A new log where the provider's books of an earlier run remain: refused, nothing written.
    let books = dir.path().join("orders.redb.payments");
    let moved = dir.path().join("moved.redb");
    std::fs::rename(&log, &moved).expect("moves the log away");
    assert_refused(&["run", "--orders", "10", "--log", log_arg], "payment provider's books of an earlier run");
    assert!(!log.exists(), "the refused run created no log");
    std::fs::rename(&moved, &log).expect("moves the log back");
    // Books that are not the provider's: a clear error naming the file and the byte.
    let good = std::fs::read(&books).expect("the books");
    let mut bad = good.clone();
    bad[45] ^= 0x10;
    std::fs::write(&books, &bad).expect("writes");
    let refused = conduit(&["log", "verify", log_arg]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(refused.status.code() == Some(1) && stderr.contains("payments: entry at byte 40"), "{stderr}");
    std::fs::write(&books, &good).expect("writes");

    // Retention by hand: nothing is in flight, so the log can shrink to the bound.
    assert_refused(&["log", "compact", log_arg], "nothing to compact by");
    assert_refused(&["log", "compact", log_arg, "--max-bytes", "0"], "--max-bytes");
    assert_refused(&["log", "compact", log_arg, "--max-bytes", "lots"], "--max-bytes");
    let compact = conduit(&["log", "compact", log_arg, "--max-bytes", "200KiB", "--format", "json"]);
    assert!(compact.status.success(), "{}", String::from_utf8_lossy(&compact.stderr));
    let compact: serde_json::Value = serde_json::from_slice(&compact.stdout).expect("json");
    assert!(u(&compact, "/frames_removed") > 0 && u(&compact, "/bytes_after") <= 200 * 1024, "{compact}");
    let inspect = conduit(&["log", "inspect", log_arg, "--order", "17", "--format", "json"]);
    assert!(inspect.status.success());
    let first: Option<serde_json::Value> =
        String::from_utf8_lossy(&inspect.stdout).lines().next().map(|l| serde_json::from_str(l).expect("json"));
    assert!(first.as_ref().is_none_or(|line| u(line, "/version") > 1), "order 17's first frames are gone: {first:?}");
    let verify = conduit(&["log", "verify", log_arg, "--format", "json"]);
    let verify: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("json");
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn compacting_below_the_work_in_flight_is_refused_and_removes_nothing() {
    use conduit::log::{Log, LogOptions, Record, STAGE_INGRESS};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pinned.redb");
    {
        let log = Log::open(&path, LogOptions::default()).expect("new log");
        let id = log.reserve_ids(1);
        let message =
            Record { id, stream: 1, kind: 1, stage: STAGE_INGRESS, payload: vec![0; 64], ..Record::default() };
        log.append(vec![message]).expect("open").wait().expect("committed");
        for _ in 0..20 {
            let fact = Record { stream: 2, kind: 2, payload: vec![0; 512], ..Record::default() };
            log.append(vec![fact]).expect("open").wait().expect("committed");
        }
        log.close().expect("closes");
    }
    let arg = path.to_str().expect("utf-8");
    // 1 KiB keeps 896 bytes for frames, and one message is in flight.
    assert_refused(
        &["log", "compact", arg, "--max-bytes", "1KiB"],
        "would remove work in flight: the messages in flight (1) reach back",
    );
    assert_refused(&["log", "compact", arg, "--max-bytes", "1KiB"], "more than the 896 a log of 1024 bytes keeps");
    let log = Log::open(&path, LogOptions::default()).expect("reopens");
    assert_eq!((log.opened_with().frames, log.opened_with().first_frame), (21, 0), "nothing was removed");
    assert_eq!(log.in_flight_at_open().len(), 1);
}

#[test]
fn log_flags_are_checked() {
    assert_refused(&["run", "--durability", "immediate"], "needs --log");
    assert_refused(&["run", "--durability", "memory", "--log", "/tmp/x.redb"], "writes no log");
    assert_refused(&["run", "--retention-max-bytes", "1GiB"], "need --log");
    assert_refused(&["run", "--retention-max-bytes", "0", "--log", "/tmp/x.redb"], "must be above zero");
    assert_refused(&["run", "--retention-max-age", "soon", "--log", "/tmp/x.redb"], "--retention-max-age");
    let output = conduit(&["log", "verify", "/nonexistent/none.redb"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("none.redb"));
}

#[test]
fn the_example_topology_runs_and_balances() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/topology.toml");
    let report = json_run(&[
        "--orders",
        "20000",
        "--topology",
        example,
        "--payment-failure-rate",
        "0.3",
        "--out-of-stock-rate",
        "0.1",
    ]);
    let submitted = u(&report, "/orders/submitted");
    assert_eq!(
        submitted,
        u(&report, "/orders/confirmed") + u(&report, "/orders/cancelled") + u(&report, "/orders/dead_lettered")
    );
    assert_eq!(report["ledger"]["balanced"], true);
    assert_eq!(u(&report, "/stages/1/workers"), 2, "the file's [engine] table applies");

    let unknown_stage = temp_file("topology-typo.toml", "[bindings]\nshiping = [\"order.#\"]\n");
    assert_refused(&["run", "--topology", unknown_stage.to_str().expect("utf-8")], "shiping");
    let unreachable = temp_file("topology-unbound.toml", "[bindings]\nshipping = []\n");
    assert_refused(&["run", "--topology", unreachable.to_str().expect("utf-8")], "cannot be reached");
    let unknown_key = temp_file("topology-key.toml", "bindngs = {}\n");
    assert_refused(&["run", "--topology", unknown_key.to_str().expect("utf-8")], "bindngs");
}

#[test]
fn poisoned_orders_end_as_malformed_dead_letters_and_the_report_says_so() {
    let report = json_run(&[
        "--orders",
        "30000",
        "--payment-failure-rate",
        "0.3",
        "--payment-timeout-rate",
        "0.05",
        "--poison-rate",
        "0.001",
    ]);
    let poisoned = u(&report, "/orders/poisoned");
    assert!(poisoned > 0);
    assert_eq!(u(&report, "/dead_letters/by_reason/malformed"), poisoned);
    assert!(u(&report, "/retries/total") > 0 && u(&report, "/ledger/timeouts") > 0);
    assert_eq!(u(&report, "/ledger/double_charges"), 0);
    assert_eq!(
        u(&report, "/ledger/charged_cents") - u(&report, "/ledger/refunded_cents"),
        u(&report, "/ledger/confirmed_total_cents")
    );
}

#[test]
fn dead_letters_are_listed_shown_redriven_and_purged_from_the_command_line() {
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let log = scratch.path().join("orders.redb");
    let log = log.to_str().expect("utf-8 path");
    let run = conduit(&[
        "run",
        "--orders",
        "3000",
        "--payment-failure-rate",
        "0.6",
        "--poison-rate",
        "0.01",
        "--log",
        log,
        "--quiet",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let list = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["dlq", "list", log, "--format", "json"];
        all.extend_from_slice(args);
        let output = conduit(&all);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("a JSON array")
    };
    let malformed = list(&["--reason", "malformed"]);
    let payment = list(&["--stage", "payment"]);
    assert!(!malformed.is_empty() && !payment.is_empty());
    assert!(payment.iter().all(|l| l["reason"] == "retries_exhausted" && l["state"] == "open"));

    let id = malformed[0]["id"].as_u64().expect("an id").to_string();
    let show = conduit(&["dlq", "show", log, &id, "--format", "json"]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).expect("one JSON object");
    assert_eq!(shown["reason"], "malformed");
    assert!(shown["errors"].as_array().is_some_and(|e| e.len() == 1));

    assert_refused(&["dlq", "redrive", log], "say which dead letters");
    assert_refused(&["dlq", "list", log, "--reason", "bored"], "unknown reason");
    assert_refused(&["dlq", "purge", log, "--stage", "nowhere"], "unknown stage");
    assert_refused(&["dlq", "show", log, "999999999"], "no dead letter");
    assert_refused(&["dlq", "redrive", log, "--all", "--rate", "fast"], "per second");

    let redrive = conduit(&["dlq", "redrive", log, "--all", "--rate", "100000/s", "--format", "json"]);
    assert!(redrive.status.success(), "{}", String::from_utf8_lossy(&redrive.stderr));
    let report: serde_json::Value = serde_json::from_slice(&redrive.stdout).expect("one JSON object");
    assert_eq!(u(&report, "/dead_lettered_again"), malformed.len() as u64);
    assert_eq!(report["verify"]["ok"], true);
    let open = list(&[]);
    assert_eq!(open.len(), malformed.len(), "only the malformed came back");
    assert_eq!(list(&["--settled"]).len(), malformed.len() * 2 + payment.len());

    let purge = conduit(&["dlq", "purge", log, "--reason", "malformed", "--format", "json"]);
    assert!(purge.status.success(), "{}", String::from_utf8_lossy(&purge.stderr));
    assert!(list(&[]).is_empty());
    assert!(conduit(&["log", "verify", log]).status.success());
}

#[test]
fn an_offered_rate_is_reported_with_latency_from_the_schedule() {
    let report = json_run(&["--rate", "20000/s", "--duration", "1s"]);
    assert_eq!(report.pointer("/load/mode").and_then(serde_json::Value::as_str), Some("rate"), "{report}");
    let offered = report.pointer("/load/offered_per_s").and_then(serde_json::Value::as_f64);
    assert_eq!(offered, Some(20_000.0));
    let submitted = u(&report, "/orders/submitted");
    assert!(submitted <= 20_000, "a one-second schedule at 20000/s has 20000 slots: {submitted}");
    // Every order finished, and each has one end-to-end latency, counted from its slot.
    assert_eq!(u(&report, "/end_to_end_us/count"), submitted);
    assert!(report.pointer("/load/sustained").is_some_and(serde_json::Value::is_boolean));

    let closed = json_run(&["--orders", "1000"]);
    assert_eq!(closed.pointer("/load/mode").and_then(serde_json::Value::as_str), Some("saturated"));
    assert_eq!(u(&closed, "/end_to_end_us/count"), 1_000);

    let refused = conduit(&["run", "--rate", "0/s", "--orders", "10"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a rate"), "{refused:?}");
}

#[test]
fn alerts_are_configured_reported_and_logged() {
    // Queues fill by design in a saturated run: only the error rate is meant to fire here.
    let rules = temp_file(
        "alerts.toml",
        "[alerts]\nerror_rate_max = 0.02\nqueue_depth_max = 100000000\ndead_letters = false\n",
    );
    let output = conduit(&[
        "run",
        "--format",
        "json",
        "--log-format",
        "json",
        // Long enough for several of the run's samples (one per 100 ms) on a loaded machine: the
        // error rate is a rate between two samples.
        "--orders",
        "150000",
        "--payment-failure-rate",
        "0.3",
        "--config",
        rules.to_str().expect("utf-8"),
    ]);
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    let fired: Vec<(&str, &str)> = report["alerts"]["recent"]
        .as_array()
        .expect("recent transitions")
        .iter()
        .filter(|e| e["firing"] == true)
        .map(|e| (e["alert"]["rule"].as_str().expect("rule"), e["alert"]["stage"].as_str().expect("stage")))
        .collect();
    assert_eq!(fired, [("error_rate", "payment")], "{}", report["alerts"]);
    assert_eq!(u(&report, "/alerts/fired_total"), 1);
    assert!(u(&report, "/monitor/samples") >= 1, "{}", report["monitor"]);
    assert!(report.pointer("/monitor/lag_max_us/payment").is_some_and(serde_json::Value::is_f64));
    assert!(report.pointer("/stages/1/lag_us").is_some_and(serde_json::Value::is_f64));
    // The same alert, as a JSON log line on stderr.
    let logged: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}")))
        .filter(|line: &serde_json::Value| line["fields"]["message"] == "alert firing")
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["fields"]["rule"], "error_rate");
    assert_eq!(logged[0]["level"], "WARN");

    let off = temp_file("alerts-off.toml", "[alerts]\nenabled = false\n");
    let quiet =
        json_run(&["--orders", "5000", "--payment-failure-rate", "0.3", "--config", off.to_str().expect("utf-8")]);
    assert_eq!(u(&quiet, "/alerts/fired_total"), 0, "{}", quiet["alerts"]);

    let negative = temp_file("alerts-negative.toml", "[alerts]\nlag_s_max = -1.0\n");
    assert_refused(&["run", "--config", negative.to_str().expect("utf-8")], "alerts.lag_s_max");
    let unknown = temp_file("alerts-unknown.toml", "[alerts]\nlag_max = 3\n");
    assert_refused(&["run", "--config", unknown.to_str().expect("utf-8")], "lag_max");
    let output = Command::new(env!("CARGO_BIN_EXE_conduit"))
        .args(["run", "--orders", "10"])
        .env("RUST_LOG", "[[")
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a filter"), "{output:?}");
}

#[test]
fn the_snapshot_balances_with_the_ledger_and_the_log() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conduit-balance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("balance.log");
    let log = log.to_str().expect("utf-8");
    let report =
        json_run(&["--orders", "20000", "--payment-failure-rate", "0.3", "--out-of-stock-rate", "0.1", "--log", log]);
    let verify = conduit(&["log", "verify", log, "--format", "json"]);
    assert!(verify.status.success(), "{verify:?}");
    let verify: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("one JSON report");
    let stage = |name: &str, field: &str| {
        let stages = report["stages"].as_array().expect("stages");
        let stage = stages.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("stage {name}"));
        stage[field].as_u64().unwrap_or_else(|| panic!("{name}.{field}"))
    };
    // The engine's counts (snapshot) against the log's own records, read back by `log verify`.
    assert_eq!(u(&report, "/events/total"), u(&verify, "/records"));
    assert_eq!(stage("order", "processed"), u(&verify, "/orders"));
    assert_eq!(stage("payment", "dead_lettered"), u(&verify, "/dead_lettered"));
    assert_eq!(stage("compensation", "processed"), u(&verify, "/cancelled"));
    for notified in ["email", "sms", "shipping"] {
        assert_eq!(stage(notified, "processed"), u(&verify, "/confirmed"), "{notified}");
    }
    // The ledger: the provider's books (the run's report) against the log's confirmed orders.
    assert_eq!(u(&report, "/ledger/confirmed_total_cents"), u(&verify, "/ledger/confirmed_total_cents"));
    assert_eq!(u(&report, "/ledger/confirmed_total_cents"), u(&verify, "/provider/confirmed_total_cents"));
    assert_eq!(u(&report, "/orders/in_flight"), 0);
}

/// An `HdrHistogram` percentile-distribution file: its rows' `(value, percentile, total count)`.
fn hgrm_rows(text: &str) -> Vec<(f64, f64, u64)> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header, ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]);
    lines
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!((3..=4).contains(&fields.len()), "{line:?}");
            let number = |i: usize| fields[i].parse::<f64>().unwrap_or_else(|e| panic!("{line:?}: {e}"));
            (number(0), number(1), fields[2].parse().unwrap_or_else(|e| panic!("{line:?}: {e}")))
        })
        .collect()
}

#[test]
fn latency_files_parse_and_the_plot_has_a_curve_per_stage_and_end_to_end() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conduit-latency-{}", std::process::id()));
    let hdr = dir.join("hdr");
    let plot = dir.join("latency.svg");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let report = json_run(&[
        "--orders",
        "20000",
        "--payment-failure-rate",
        "0.1",
        "--hdr-out",
        hdr.to_str().expect("utf-8"),
        "--plot",
        plot.to_str().expect("utf-8"),
    ]);
    let mut names: Vec<(String, u64)> = report["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["name"].as_str().expect("name").to_owned(), s["latency_us"]["count"].as_u64().expect("count")))
        .filter(|(_, count)| *count > 0)
        .collect();
    names.push(("end_to_end".into(), u(&report, "/end_to_end_us/count")));
    for (name, count) in &names {
        let text = std::fs::read_to_string(hdr.join(format!("{name}.hgrm"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows = hgrm_rows(&text);
        assert!(rows.len() > 10, "{name}: {} rows", rows.len());
        assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1 && w[0].2 <= w[1].2), "{name}: sorted");
        let last = rows.last().expect("rows");
        assert_eq!((last.1, last.2), (1.0, *count), "{name}: ends at 100% with every event");
        assert!(text.contains(&format!("Total count    = {count:>12}")), "{name}: footer");
    }
    let svg = std::fs::read_to_string(&plot).expect("the plot");
    assert!(svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "an SVG document");
    for (name, _) in &names {
        assert!(svg.contains(&format!(">\n{name}\n</text>")), "the legend names {name}");
    }
    // A line per curve, and one per legend entry.
    assert!(svg.matches("<polyline").count() >= 2 * names.len(), "{} lines", svg.matches("<polyline").count());

    assert_refused(&["run", "--orders", "10", "--plot", "latency.png"], "name it *.svg");
    assert_refused(&["run", "--orders", "10", "--plot", "/nonexistent/latency.svg"], "is not a directory");
    assert_refused(&["run", "--orders", "10", "--hdr-out", "/proc/conduit-hdr"], "--hdr-out");
}

#[test]
fn a_running_conduit_serves_its_snapshot_for_top_to_attach() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let run = Command::new(env!("CARGO_BIN_EXE_conduit"))
        .args(["run", "--format", "json", "--quiet", "--rate", "5000/s", "--duration", "2s", "--metrics-linger", "3s"])
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("conduit runs");
    let url = format!("http://127.0.0.1:{port}/snapshot");
    let fetch = || -> conduit::Snapshot {
        let body = ureq::get(&url).call().expect("the snapshot is served").into_string().expect("text");
        serde_json::from_str(&body).expect("the JSON is a snapshot")
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    let running = fetch();
    assert!(running.submitted > 0 && running.stage("payment").is_some(), "{running:?}");
    // After the run, while it lingers: the final figures, as the report has them.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let last = fetch();
    let output = run.wait_with_output().expect("conduit finishes");
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    assert_eq!(last.submitted, u(&report, "/orders/submitted"));
    assert_eq!(last.in_flight, 0);
    assert_eq!(last.stage("payment").expect("payment").processed, u(&report, "/stages/1/processed"));

    assert_refused(&["top", "--attach", "127.0.0.1:1"], "conduit top draws on a terminal");
}

#[test]
fn tune_reports_every_point_and_writes_a_topology_that_runs_its_best() {
    let dir = temp_file("tune-marker", "").with_file_name("tune");
    std::fs::create_dir_all(&dir).expect("dir");
    let (out, plot) = (dir.join("tuned.toml"), dir.join("tune.svg"));
    let (out_arg, plot_arg) = (out.display().to_string(), plot.display().to_string());
    let output = conduit(&[
        "tune",
        "--orders",
        "3000",
        "--workers",
        "2,3",
        "--batches",
        "16,64",
        "--repeat",
        "1",
        "--format",
        "json",
        "--out",
        &out_arg,
        "--plot",
        &plot_arg,
    ]);
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON object");
    let points = report["points"].as_array().expect("points");
    // The grid (2 pool sizes by 2 batch sizes); each of the 7 stages at its other pool size and
    // its other batch size (both sizes again where a change was kept); the best again.
    let phase = |name: &str| points.iter().filter(|p| p["phase"] == name).count();
    assert_eq!((phase("grid"), phase("confirm")), (4, 1));
    assert!((7 * 2..=7 * 4).contains(&phase("stage")), "{} stage points", phase("stage"));
    let rate = |p: &serde_json::Value| p["orders_per_sec"].as_f64().expect("orders_per_sec");
    for point in points {
        assert!(rate(point) > 0.0 && point["end_to_end_p99_us"].as_f64().is_some_and(|v| v > 0.0), "{point}");
    }
    let best = usize::try_from(u(&report, "/best")).expect("small");
    assert_eq!((best, &points[best]["phase"]), (points.len() - 1, &serde_json::json!("confirm")));
    // The confirmed point is one of the search's, within noise of its fastest.
    let sizes = |p: &serde_json::Value| (p["workers"].clone(), p["batch_events_max"].clone());
    let searched = &points[..best];
    let fastest = searched.iter().map(rate).fold(0.0, f64::max);
    assert!(
        searched.iter().any(|p| sizes(p) == sizes(&points[best]) && rate(p) * 1.03 >= fastest),
        "the best is not the fastest point within noise: {report}"
    );
    assert!(points.iter().any(|p| p["frontier"] == true));
    // The written topology runs, with the best point's pools in every stage (none the default
    // of 1: pools of 2 and 3 were tried).
    let rerun = json_run(&["--orders", "3000", "--topology", &out_arg]);
    for stage in rerun["stages"].as_array().expect("stages") {
        let name = stage["name"].as_str().expect("name");
        assert_eq!(stage["workers"], points[best]["workers"][name], "{name}");
    }
    assert!(!dir.join("tuned.point.toml").exists(), "the scratch topology is removed");
    let svg = std::fs::read_to_string(&plot).expect("the plot is written");
    assert!(svg.contains("<svg") && svg.contains("frontier"), "the plot has its frontier");
    // Bad input names the flag.
    assert_refused(&["tune", "--workers", "0,2"], "--workers");
    assert_refused(&["tune", "--orders", "0"], "--orders");
    assert_refused(&["tune", "--repeat", "0"], "--repeat");
    assert_refused(&["tune", "--workers", "2,300"], "workers = 300");
    assert_refused(&["tune", "--batches", "100000"], "batch_events_max");
}

#[test]
fn bench_runs_only_the_cases_asked_for() {
    let output = conduit(&[
        "bench",
        "--orders",
        "2000",
        "--repeat",
        "6",
        "--cases",
        "engine_memory,engine_memory_untracked",
        "--format",
        "json",
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let names: Vec<&str> =
        report["cases"].as_array().expect("cases").iter().map(|c| c["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["engine_memory", "engine_memory_untracked"]);
    assert!(report["ratios"]["engine_memory / engine_memory_untracked"].as_f64().is_some_and(|r| r > 0.0), "{report}");
    for case in report["cases"].as_array().expect("cases") {
        assert!(case["cpu_ns_per_event"].as_f64().is_some_and(|ns| ns > 0.0), "{case}");
    }
    assert!(
        report["cpu_ratios"]["engine_memory / engine_memory_untracked"].as_f64().is_some_and(|r| r > 0.0),
        "{report}"
    );
    // Six rounds give each ratio round by round, with a 95% interval around its median.
    for paired in ["paired_ratios", "paired_cpu_ratios"] {
        let interval = &report[paired]["engine_memory / engine_memory_untracked"];
        let end = |name: &str| interval[name].as_f64().unwrap_or(f64::NAN);
        assert!(end("low") > 0.0 && end("low") <= end("median") && end("median") <= end("high"), "{report}");
        assert_eq!(interval["rounds"].as_u64(), Some(6), "{report}");
    }
    assert!(report["memory"].is_null(), "the overload measurement is not one of the cases asked for");
    assert_refused(&["bench", "--cases", "engine_memory,nope"], "no case is named \"nope\"");
    assert_refused(
        &["bench", "--cases", "redb_rows", "--durable-orders", "0"],
        "redb_rows does not run with these settings",
    );
}

#[test]
fn bench_paced_reads_the_engines_acknowledgements_against_the_disks_floor() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_str().expect("a UTF-8 path");
    let args = ["bench", "--paced", "20000/s", "--durable-orders", "2000", "--repeat", "2", "--dir", path];
    let output = conduit(&[&args[..], &["--format", "json"]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    for side in ["engine", "disk"] {
        let runs = report[side].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "{report}");
        assert!(runs.iter().all(|r| r["commits"].as_u64().is_some_and(|c| c > 0)), "{report}");
        let median = &report[format!("{side}_median")];
        assert!(median["ack_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{report}");
    }
    let human = conduit(&args);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success() && text.contains("disk floor") && text.contains("median ack p99"), "{text}");
    assert!(dir.path().read_dir().expect("the directory").next().is_none(), "the runs remove their files");
    assert_refused(&["bench", "--paced", "0/s"], "is not a rate");
    assert_refused(&["bench", "--paced", "1000/s", "--durable-orders", "0"], "--durable-orders");
    assert_refused(&["bench", "--paced", "1000/s", "--cases", "engine_memory"], "--cases");
}

#[test]
fn the_orchestrated_saga_runs_from_the_command_line_and_reports_its_sagas() {
    let report = json_run(&[
        "--orders",
        "20000",
        "--saga",
        "orchestrated",
        "--payment-decline-rate",
        "0.2",
        "--out-of-stock-rate",
        "0.2",
        "--shipping-failure-rate",
        "0.2",
    ]);
    assert_eq!(report["flow"], "orchestrated");
    let (completed, compensated) = (u(&report, "/sagas/completed"), u(&report, "/sagas/compensated"));
    assert_eq!(completed + compensated, 20_000);
    assert_eq!(u(&report, "/sagas/stuck"), 0);
    assert_eq!(completed, u(&report, "/orders/confirmed"));
    for step in ["charge", "reserve", "ship"] {
        assert!(u(&report, &format!("/sagas/compensations/{step}")) > 0, "{step} was undone at least once");
    }
    assert!(u(&report, "/orders/cancelled_unshipped") > 0);
    assert_eq!(u(&report, "/stock/shipped_units"), u(&report, "/stock/confirmed_units"));
    assert_eq!(report["stock"]["balanced"], true);
    assert!(report.pointer("/sagas/end_to_end_us/p999").and_then(serde_json::Value::as_f64).is_some_and(|v| v > 0.0));
    let human = conduit(&["run", "--orders", "2000", "--saga", "orchestrated", "--quiet"]);
    assert!(human.status.success());
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("sagas        completed 2000  compensated 0  stuck 0"), "{human}");

    let choreographed = json_run(&["--orders", "20000", "--saga", "choreography", "--shipping-failure-rate", "0.2"]);
    assert_eq!(choreographed["flow"], "choreography");
    assert_eq!(u(&choreographed, "/sagas/completed") + u(&choreographed, "/sagas/compensated"), 20_000);
    assert_eq!(u(&choreographed, "/sagas/stuck"), 0);
    assert_eq!(choreographed["stock"]["balanced"], true);
    assert_eq!(choreographed["ledger"]["balanced"], true);

    assert_refused(&["run", "--saga", "sideways"], "unknown flow \"sideways\"");
    assert_refused(&["run", "--shipping-failure-rate", "0.1"], "simulation.shipping_failure_rate needs flow");
}

/// `conduit saga show` tells one order's saga moment by moment from the log, `saga list` lists
/// the sagas by state; a chain's order, an order not in the log and nonsense are refused.
#[test]
fn saga_show_and_list_read_the_orchestrated_flows_log() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conduit-sagas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("sagas.redb");
    let log = log.to_str().expect("utf-8 path");
    let rates = ["--payment-failure-rate", "0.2", "--payment-decline-rate", "0.1", "--shipping-failure-rate", "0.2"];
    let mut args = vec!["--orders", "5000", "--saga", "orchestrated", "--log", log];
    args.extend_from_slice(&rates);
    let report = json_run(&args);
    let compensated = u(&report, "/sagas/compensated");
    assert!(compensated > 100, "{report}");
    assert!(conduit(&["log", "verify", log]).status.success());

    let listed = conduit(&["saga", "list", log, "--state", "compensated", "--format", "json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect();
    let dead = conduit(&["saga", "list", log, "--state", "dead_lettered", "--format", "json"]);
    let dead = String::from_utf8_lossy(&dead.stdout).lines().count() as u64;
    assert_eq!(listed.len() as u64 + dead, compensated, "every compensated saga is listed once");
    assert!(listed.iter().all(|saga| saga["state"] == "compensated"));
    let stuck = conduit(&["saga", "list", log, "--stuck-longer-than", "1s"]);
    assert_eq!(String::from_utf8_lossy(&stuck.stdout).trim(), "0 sagas", "nothing is left in flight");

    let order = listed[0]["order"].as_u64().expect("an order id").to_string();
    let shown = conduit(&["saga", "show", log, &order, "--format", "json"]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("one JSON object");
    assert_eq!(shown["state"], "compensated");
    let moments = shown["moments"].as_array().expect("moments");
    let whats: Vec<&str> = moments.iter().filter_map(|m| m["what"].as_str()).collect();
    assert_eq!(whats[..2], ["placed", "started"]);
    assert!(whats.contains(&"step") && whats.contains(&"compensation"), "{whats:?}");
    assert!(moments.iter().any(|m| m["outcome"] != "succeeded" && m["what"] == "step"), "a step failed: {moments:?}");
    let human = conduit(&["saga", "show", log, &order]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.starts_with(&format!("order {order}: saga order compensated after ")), "{human}");
    assert!(human.contains("compensation refund") || human.contains("compensation release"), "{human}");

    assert_refused(&["saga", "show", log, "987654321"], "order 987654321 is not in the log");
    assert_refused(&["saga", "list", log, "--state", "sideways"], "unknown saga state \"sideways\"");
    assert_refused(&["saga", "list", log, "--state", "completed", "--stuck-longer-than", "1s"], "sagas in flight");
    let chain = dir.join("chain.redb");
    let chain = chain.to_str().expect("utf-8 path");
    json_run(&["--orders", "100", "--log", chain]);
    assert_refused(&["saga", "show", chain, "1"], "order 1 ran no saga");

    // The choreography journals the same facts: its log lists the same sagas.
    let choreographed = dir.join("choreography.redb");
    let choreographed = choreographed.to_str().expect("utf-8 path");
    let mut args = vec!["--orders", "5000", "--saga", "choreography", "--log", choreographed];
    args.extend_from_slice(&rates);
    let report = json_run(&args);
    let completed = conduit(&["saga", "list", choreographed, "--state", "completed", "--format", "json"]);
    assert_eq!(String::from_utf8_lossy(&completed.stdout).lines().count() as u64, u(&report, "/sagas/completed"));
    assert!(conduit(&["log", "verify", choreographed]).status.success());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn log_consumers_lists_positions_and_lag() {
    use conduit::log::{ConsumerOptions, Log, LogOptions, Record};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("consumed.redb");
    let log_arg = path.to_str().expect("utf-8 path");
    {
        let log = Log::open(&path, LogOptions::default()).expect("new log");
        let records = (0..100).map(|n| Record { stream: n % 7, kind: 1, timestamp_us: 1_000 + n, ..Record::default() });
        log.append(records.collect()).expect("open").wait().expect("committed");
        let mut reader = log.consumer("projection", ConsumerOptions::default()).expect("registers");
        assert_eq!(reader.poll(40, std::time::Duration::ZERO).expect("reads").len(), 40);
        reader.commit().expect("commits");
        let loose = ConsumerOptions { holds_retention: false, ..ConsumerOptions::default() };
        log.consumer("audit", loose).expect("registers");
        log.close().expect("closes");
    }
    let listed = conduit(&["log", "consumers", log_arg, "--format", "json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    let consumers = listed["consumers"].as_array().expect("a list");
    assert_eq!(consumers.len(), 2, "{listed}");
    let projection = consumers.iter().find(|c| c["name"] == "projection").expect("listed");
    assert_eq!((u(projection, "/lag_records"), u(projection, "/lag_us")), (60, 59), "{projection}");
    assert_eq!(projection["holds_retention"], true);
    let audit = consumers.iter().find(|c| c["name"] == "audit").expect("listed");
    assert_eq!((u(audit, "/lag_records"), audit["holds_retention"].clone()), (100, serde_json::json!(false)));
    let human = conduit(&["log", "consumers", log_arg]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("projection: at 0:40") && human.contains("lag 60 records"), "{human}");
    let missing = conduit(&["log", "consumers", "/nonexistent/log.redb"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("cannot open the log"), "{stderr}");
}
