//! Request/reply between threads: correlation ids, timeouts, late replies counted.
//!
//! ```text
//!  caller (a handler)                       server pool (`conduit:rpc:<name>:<n>`)
//!  call(req, timeout) --(id, req)--> bounded queue --> handler(req) -> reply
//!     waits on its own slot  <---------- reply by id ----------'
//!     timeout: Err(Timeout), slot removed; a reply arriving later is dropped and counted
//! ```
//!
//! A call blocks its thread until the reply or the timeout; in a pipeline handler, a timeout is
//! an ordinary outcome (`Outcome::Retry` or `Outcome::Reject`), not a hang.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use serde::Serialize;

/// Why a call got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No reply within the timeout (the request may still be served; its reply will be dropped).
    #[error("no reply within the timeout")]
    Timeout,
    /// The server is shut down.
    #[error("the server is shut down")]
    Closed,
}

/// Counters of a server's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RpcStats {
    /// Requests sent.
    pub calls: u64,
    /// Replies delivered to a waiting caller.
    pub replies: u64,
    /// Calls that timed out.
    pub timeouts: u64,
    /// Replies that came after their caller had stopped waiting, dropped.
    pub late_replies: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    replies: AtomicU64,
    timeouts: AtomicU64,
    late_replies: AtomicU64,
}

struct Shared<Rep> {
    /// Callers waiting, by correlation id.
    waiting: Mutex<FxHashMap<u64, Sender<Rep>>>,
    next_id: AtomicU64,
    counters: Counters,
}

/// A pool of server threads answering requests; cheap to share (`Arc`) among callers.
pub struct RpcServer<Req, Rep> {
    requests: Option<Sender<(u64, Req)>>,
    shared: Arc<Shared<Rep>>,
    threads: Vec<JoinHandle<()>>,
}

impl<Req, Rep> fmt::Debug for RpcServer<Req, Rep> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcServer")
            .field("threads", &self.threads.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<Req: Send + 'static, Rep: Send + 'static> RpcServer<Req, Rep> {
    /// Starts `workers` threads serving up to `queue` waiting requests with `handler`.
    pub fn spawn<H>(name: &str, workers: usize, queue: usize, handler: H) -> std::io::Result<Self>
    where
        H: Fn(Req) -> Rep + Send + Sync + 'static,
    {
        let (requests, inbox) = crossbeam_channel::bounded::<(u64, Req)>(queue.max(1));
        let shared = Arc::new(Shared {
            waiting: Mutex::new(FxHashMap::default()),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
        });
        let handler = Arc::new(handler);
        let mut threads = Vec::new();
        for n in 0..workers.max(1) {
            let (inbox, shared, handler) = (inbox.clone(), Arc::clone(&shared), Arc::clone(&handler));
            threads.push(std::thread::Builder::new().name(format!("conduit:rpc:{name}:{n}")).spawn(move || {
                for (id, request) in inbox {
                    let reply = handler(request);
                    let slot = shared.waiting.lock().remove(&id);
                    match slot {
                        Some(slot) if slot.send(reply).is_ok() => {
                            shared.counters.replies.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            shared.counters.late_replies.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })?);
        }
        Ok(Self { requests: Some(requests), shared, threads })
    }

    /// Sends `request` and waits up to `timeout` for its reply (the wait for queue room counts).
    pub fn call(&self, request: Req, timeout: Duration) -> Result<Rep, RpcError> {
        let deadline = Instant::now() + timeout;
        let requests = self.requests.as_ref().ok_or(RpcError::Closed)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (slot, reply) = crossbeam_channel::bounded(1);
        self.shared.waiting.lock().insert(id, slot);
        self.shared.counters.calls.fetch_add(1, Ordering::Relaxed);
        let sent = requests.send_timeout((id, request), deadline.saturating_duration_since(Instant::now()));
        if let Err(error) = sent {
            self.shared.waiting.lock().remove(&id);
            return Err(match error {
                SendTimeoutError::Timeout(_) => {
                    self.shared.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                    RpcError::Timeout
                }
                SendTimeoutError::Disconnected(_) => RpcError::Closed,
            });
        }
        if let Ok(reply) = reply.recv_deadline(deadline) {
            return Ok(reply);
        }
        // Give up the slot; if the reply slipped in meanwhile, take it after all.
        let removed = self.shared.waiting.lock().remove(&id).is_some();
        if !removed {
            if let Ok(reply) = reply.try_recv() {
                return Ok(reply);
            }
        }
        self.shared.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        Err(RpcError::Timeout)
    }

    /// Serves what is queued, stops the threads, and returns the final counters.
    pub fn shutdown(mut self) -> RpcStats {
        self.stop();
        self.stats()
    }
}

impl<Req, Rep> RpcServer<Req, Rep> {
    /// Counters so far.
    pub fn stats(&self) -> RpcStats {
        let c = &self.shared.counters;
        RpcStats {
            calls: c.calls.load(Ordering::Relaxed),
            replies: c.replies.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            late_replies: c.late_replies.load(Ordering::Relaxed),
        }
    }

    fn stop(&mut self) {
        self.requests = None;
        for thread in self.threads.drain(..) {
            let name = thread.thread().name().unwrap_or("rpc worker").to_owned();
            // A worker that panicked has answered nothing more since; say so rather than drop it.
            if thread.join().is_err() {
                tracing::error!(worker = %name, "rpc worker panicked");
            }
        }
    }
}

impl<Req, Rep> Drop for RpcServer<Req, Rep> {
    fn drop(&mut self) {
        self.stop();
    }
}
