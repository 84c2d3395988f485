//! `conduit run --metrics-addr`: the engine's snapshot in Prometheus's text format at `/metrics`,
//! and as JSON at `/snapshot` (what `conduit top --attach` reads), served over HTTP on a loopback
//! address only.
//!
//! A scrape is answered from the run's watcher thread (which holds the engine): the server thread
//! hands it a reply channel and waits, so figures are rendered only when someone asks. Once the
//! run's work has finished, the final figures are kept and served until the server stops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use conduit::{Engine, Snapshot};
use conduit_orders::OrderEvent;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::UsageError;

/// How long a scrape waits for the watcher (which looks every 100 ms).
const SCRAPE_WAIT: Duration = Duration::from_secs(2);

/// A running metrics endpoint.
pub(crate) struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    requests: Receiver<(Format, Sender<String>)>,
    /// The figures rendered last, in each format; served as they are once `finished`.
    last: Arc<Mutex<Rendered>>,
    finished: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `addr`, which must be a loopback address, and starts answering.
    pub(crate) fn start(addr: SocketAddr) -> Result<Self, UsageError> {
        if !addr.ip().is_loopback() {
            return Err(UsageError(format!(
                "--metrics-addr {addr}: metrics are served on a loopback address only (127.0.0.1 or [::1])"
            )));
        }
        let server = tiny_http::Server::http(addr)
            .map_err(|e| UsageError(format!("--metrics-addr {addr}: cannot listen there: {e}")))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let (to_watcher, requests) = crossbeam_channel::unbounded();
        let last = Arc::new(Mutex::new(Rendered::default()));
        let finished = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, last, finished) = (Arc::clone(&server), Arc::clone(&last), Arc::clone(&finished));
            std::thread::Builder::new()
                .name("conduit:metrics".into())
                .spawn(move || serve(&server, &to_watcher, &last, &finished))
                .map_err(|e| UsageError(format!("cannot start the metrics server: {e}")))?
        };
        Ok(Self { server, thread: Some(thread), requests, last, finished, addr })
    }

    /// Where it listens (the port the system chose, for port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers the scrapes waiting, from `snapshot` (and `engine`'s latency histograms); `last`
    /// says the run's work has finished, so these figures are final and are kept.
    pub(crate) fn answer(&self, engine: &Engine<OrderEvent>, snapshot: &Snapshot, last: bool) {
        let pending: Vec<(Format, Sender<String>)> = self.requests.try_iter().collect();
        if pending.is_empty() && !last {
            return;
        }
        let wants = |format: Format| last || pending.iter().any(|(f, _)| *f == format);
        let mut rendered = self.last.lock();
        if wants(Format::Prometheus) {
            rendered.prometheus = Some(match conduit::prometheus::render(snapshot, &engine.latency_histograms()) {
                Ok(text) => text,
                Err(error) => format!("# cannot render the figures: {error}\n"),
            });
        }
        if wants(Format::Json) {
            rendered.json = serde_json::to_string(snapshot).ok();
        }
        for (format, reply) in pending {
            if let Some(text) = rendered.get(format) {
                reply.send(text.clone()).ok();
            }
        }
        if last {
            self.finished.store(true, Ordering::Release);
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `/metrics`: Prometheus's text format.
    Prometheus,
    /// `/snapshot`: the snapshot as JSON.
    Json,
}

impl Format {
    fn of(path: &str) -> Option<Self> {
        match path {
            "/metrics" => Some(Self::Prometheus),
            "/snapshot" => Some(Self::Json),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => conduit::prometheus::CONTENT_TYPE,
            Self::Json => "application/json",
        }
    }
}

/// The figures rendered last.
#[derive(Debug, Default)]
struct Rendered {
    prometheus: Option<String>,
    json: Option<String>,
}

impl Rendered {
    fn get(&self, format: Format) -> Option<&String> {
        match format {
            Format::Prometheus => self.prometheus.as_ref(),
            Format::Json => self.json.as_ref(),
        }
    }
}

fn serve(
    server: &tiny_http::Server,
    to_watcher: &Sender<(Format, Sender<String>)>,
    last: &Mutex<Rendered>,
    finished: &AtomicBool,
) {
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let Some(format) = Format::of(path).filter(|_| *request.method() == tiny_http::Method::Get) else {
            let response = tiny_http::Response::from_string("not found: the figures are at /metrics and /snapshot\n")
                .with_status_code(404);
            request.respond(response).ok();
            continue;
        };
        let text = if finished.load(Ordering::Acquire) {
            last.lock().get(format).cloned()
        } else {
            let (reply, answer) = crossbeam_channel::bounded(1);
            to_watcher.send((format, reply)).ok();
            answer.recv_timeout(SCRAPE_WAIT).ok().or_else(|| last.lock().get(format).cloned())
        };
        let response = match text {
            Some(text) => {
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], format.content_type().as_bytes())
                    .expect("a constant header is valid");
                tiny_http::Response::from_string(text).with_header(header)
            }
            None => tiny_http::Response::from_string("no figures yet\n").with_status_code(503),
        };
        request.respond(response).ok();
    }
}
