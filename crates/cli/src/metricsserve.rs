//! `conduit run --metrics-addr`: the engine's snapshot in Prometheus's text format, served over
//! HTTP on a loopback address only.
//!
//! A scrape is answered from the run's watcher thread (which holds the engine): the server thread
//! hands it a reply channel and waits, so figures are rendered only when someone asks. Once the
//! run's work has finished, the final figures are kept and served until the server stops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use conduit::Engine;
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
    requests: Receiver<Sender<String>>,
    /// The figures rendered last; served as they are once `finished`.
    last: Arc<Mutex<Option<String>>>,
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
        let last = Arc::new(Mutex::new(None));
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

    /// Answers the scrapes waiting, from `engine`; `last` says the run's work has finished, so
    /// these figures are final and are kept.
    pub(crate) fn answer(&self, engine: &Engine<OrderEvent>, last: bool) {
        let pending: Vec<Sender<String>> = self.requests.try_iter().collect();
        if pending.is_empty() && !last {
            return;
        }
        let text = match conduit::prometheus::render(&engine.snapshot(), &engine.latency_histograms()) {
            Ok(text) => text,
            Err(error) => format!("# cannot render the figures: {error}\n"),
        };
        for reply in pending {
            reply.send(text.clone()).ok();
        }
        *self.last.lock() = Some(text);
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

fn serve(
    server: &tiny_http::Server,
    to_watcher: &Sender<Sender<String>>,
    last: &Mutex<Option<String>>,
    finished: &AtomicBool,
) {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], conduit::prometheus::CONTENT_TYPE.as_bytes())
        .expect("a constant header is valid");
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        if path != "/metrics" || *request.method() != tiny_http::Method::Get {
            let response =
                tiny_http::Response::from_string("not found: the figures are at /metrics\n").with_status_code(404);
            request.respond(response).ok();
            continue;
        }
        let text = if finished.load(Ordering::Acquire) {
            last.lock().clone()
        } else {
            let (reply, answer) = crossbeam_channel::bounded(1);
            to_watcher.send(reply).ok();
            answer.recv_timeout(SCRAPE_WAIT).ok().or_else(|| last.lock().clone())
        };
        let response = match text {
            Some(text) => tiny_http::Response::from_string(text).with_header(header.clone()),
            None => tiny_http::Response::from_string("no figures yet\n").with_status_code(503),
        };
        request.respond(response).ok();
    }
}
