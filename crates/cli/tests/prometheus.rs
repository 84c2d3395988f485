//! A real Prometheus server (Debian's `prometheus` package) scrapes `conduit run --metrics-addr`;
//! its HTTP API then holds conduit's series with the values of the run's report, and `promtool
//! check metrics` accepts the exposition. Both listen on 127.0.0.1 only; the server is stopped by
//! its pid. Without the package the test says so and passes, unless `CONDUIT_REQUIRE_PROMETHEUS`
//! is set (as `.ci/run` sets it, after installing the package).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A program on the PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.is_file())
}

/// A port free on 127.0.0.1 now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().expect("address").port()
}

/// `GET path` from 127.0.0.1:port: the status code and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Percent-encodes a query value.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The Prometheus server, killed by its pid when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// The value of an instant query's only sample, as Prometheus writes it.
fn query(port: u16, promql: &str) -> String {
    let (status, body) =
        get(port, &format!("/api/v1/query?query={}", encode(promql))).expect("the Prometheus API answers");
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let result = answer["data"]["result"].as_array().expect("a vector");
    assert_eq!(result.len(), 1, "{promql}: {body}");
    result[0]["value"][1].as_str().expect("a sample value").to_owned()
}

#[test]
fn a_real_prometheus_scrapes_the_run_and_finds_its_report() {
    let (Some(prometheus), Some(promtool)) = (which("prometheus"), which("promtool")) else {
        assert!(
            std::env::var_os("CONDUIT_REQUIRE_PROMETHEUS").is_none(),
            "CONDUIT_REQUIRE_PROMETHEUS is set but prometheus or promtool is not on the PATH"
        );
        eprintln!("skipped: Debian's prometheus package is not installed (.ci/run installs it)");
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conduit-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (metrics_port, server_port) = (free_port(), free_port());
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: conduit\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .expect("write the config");
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
    let _server = Server(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{server_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(server_port, "/-/ready").is_none_or(|(status, _)| status != 200) {
        assert!(Instant::now() < deadline, "prometheus was not ready in 60 s: see {}", dir.display());
        std::thread::sleep(Duration::from_millis(200));
    }

    let run = Command::new(env!("CARGO_BIN_EXE_conduit"))
        .args(["run", "--format", "json", "--quiet", "--rate", "5000/s", "--duration", "4s"])
        .args(["--payment-failure-rate", "0.1", "--metrics-linger", "4s"])
        .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("conduit runs");
    // Mid-run, the exposition passes promtool's checks.
    std::thread::sleep(Duration::from_secs(2));
    let (status, text) = get(metrics_port, "/metrics").expect("conduit serves its figures");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("conduit_stage_processed_total{stage=\"payment\"}"), "{text}");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let checked = check.wait_with_output().expect("promtool finishes");
    assert!(checked.status.success(), "promtool: {checked:?}");
    let (status, _) = get(metrics_port, "/other").expect("answers");
    assert_eq!(status, 404);

    let output = run.wait_with_output().expect("conduit finishes");
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    let submitted = report["orders"]["submitted"].as_u64().expect("submitted");
    let payment = &report["stages"][1];
    assert_eq!(payment["name"], "payment");
    // The server scraped the final figures while conduit lingered.
    let expected = [
        ("conduit_messages_submitted_total", submitted),
        ("conduit_stage_processed_total{stage=\"payment\"}", payment["processed"].as_u64().expect("processed")),
        ("conduit_stage_retried_total{stage=\"payment\"}", payment["retried"].as_u64().expect("retried")),
        (
            "conduit_stage_latency_seconds_count{stage=\"payment\"}",
            payment["latency_us"]["count"].as_u64().expect("count"),
        ),
    ];
    assert!(expected[2].1 > 0, "payment failures were retried");
    // The last sample scraped: once conduit has exited, the next scrape fails and Prometheus
    // marks the series stale, and an instant query of a stale series finds nothing (on a slow
    // machine that scrape could land between two of these queries).
    for (series, value) in expected {
        assert_eq!(query(server_port, &format!("last_over_time({series}[1m])")), value.to_string(), "{series}");
    }
}
