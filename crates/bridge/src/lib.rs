//! conduit and a RabbitMQ broker, over AMQP 0.9.1 on [lapin](https://docs.rs/lapin).
//!
//! The engine has no async runtime and never will: everything here that speaks to the broker runs
//! on a [`Bridge`]'s own runtime, a single-threaded tokio runtime confined to the thread that
//! owns the bridge, so an embedder's threads never meet a future.
//!
//! - [`Outbox`]: a consumer of the log (`conduit::log::LogConsumer`) that publishes the records
//!   an application chooses to a topic exchange, persistent, each under a stable message id (the
//!   log's id for its record, under a prefix naming the log), waits for the broker's publisher
//!   confirms, and only then commits its position: a crash in between publishes that batch again
//!   after the restart, under the same ids, so a consumer downstream drops the repeats.
//!
//! - [`Inbox`]: commands in from a queue, with manual acknowledgements and a prefetch, each batch
//!   acknowledged only after the application's [`Landing`] made it durable; repeats recognised by
//!   message id (a bounded window, then the landing's own books); reconnection with backoff.
//!
//! Connection settings come from the environment ([`URL_ENV`]) or a configuration file, never
//! from a command line (where every user of the machine could read a password); without them the
//! bridge speaks to a broker on the loopback interface ([`DEFAULT_URL`]).

use std::future::Future;

pub use inbox::{declare, Inbound, Inbox, InboxReport, InboxSettings, Landing, Until, Verdict};
pub use lapin;
pub use outbox::{message_id, Outbox, OutboxSettings, Pumped, Select};
pub use settings::{Backoff, ConnectionSettings, Reconnects, TlsSettings};

mod inbox;
mod outbox;
mod settings;

/// The bridge's crash points (feature `crashpoints`, see `conduit::crashpoint`).
///
/// | point | where |
/// |---|---|
/// | `outbox.before_commit` | an outbox's batch is published and confirmed, its position not yet committed |
/// | `inbox.before_ack` | an inbox's batch is landed (durable), not yet acknowledged to the broker |
pub const CRASH_POINTS: [&str; 2] = ["outbox.before_commit", "inbox.before_ack"];

/// The broker a bridge speaks to unless told otherwise: RabbitMQ's default port on loopback,
/// its default user (which RabbitMQ lets in from loopback only).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The environment variable holding the broker's URL (`amqp://user:password@host:port/vhost`).
pub const URL_ENV: &str = "CONDUIT_AMQP_URL";

/// The broker's URL: [`URL_ENV`] if set, [`DEFAULT_URL`] otherwise.
#[must_use]
pub fn url_from_env() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `url` fit to print: its password, if any, replaced by `***` (`amqp://user:***@host/vhost`).
#[must_use]
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    // The user information ends at the last `@` before the host's path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Why the bridge could not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// The runtime could not start (the system refused a thread or a timer).
    #[error("the bridge's runtime could not start: {0}")]
    Runtime(#[source] std::io::Error),
    /// The broker refused or dropped the connection, or an operation on it.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused a message (a negative publisher confirm).
    #[error("the broker refused a message (nack); nothing was committed")]
    Refused,
    /// The log failed to read or to commit a position.
    #[error("log: {0}")]
    Log(#[from] conduit::log::LogError),
    /// A setting that cannot work.
    #[error("{0}")]
    Settings(String),
    /// The broker cancelled an inbox's consumer (its queue was deleted, or the broker is
    /// stopping): the inbox reconnects.
    #[error("the broker cancelled the consumer")]
    Cancelled,
    /// An inbox's landing failed to make a batch durable; nothing of it was acknowledged.
    #[error("the landing failed: {0}")]
    Landing(String),
}

/// The bridge's own runtime: what speaks to the broker runs here, on the calling thread.
#[derive(Debug)]
pub struct Bridge {
    runtime: tokio::runtime::Runtime,
}

impl Bridge {
    /// A bridge with its runtime (single-threaded: it runs only while [`block_on`](Self::block_on)
    /// does, on the caller's thread).
    pub fn new() -> Result<Self, BridgeError> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(BridgeError::Runtime)?;
        Ok(Self { runtime })
    }

    /// Runs `work` to its end on the bridge's runtime.
    pub fn block_on<T>(&self, work: impl Future<Output = T>) -> T {
        self.runtime.block_on(work)
    }

    /// Connects to the broker at `url`, naming the connection `name` (the broker's management
    /// tools show it). Print the URL only through [`redacted`].
    pub fn connect(&self, url: &str, name: &str) -> Result<lapin::Connection, BridgeError> {
        self.block_on(ConnectionSettings { url: Some(url.to_owned()), ..ConnectionSettings::default() }.connect(name))
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_printed_url_keeps_no_password() {
        assert_eq!(
            redacted("amqp://shop:s3cr%40t@broker.internal:5672/%2f"),
            "amqp://shop:***@broker.internal:5672/%2f"
        );
        assert_eq!(redacted("amqps://shop:p:w@host/vhost"), "amqps://shop:***@host/vhost");
        assert_eq!(redacted("amqp://shop@host/"), "amqp://shop@host/", "no password to hide");
        assert_eq!(redacted("amqp://127.0.0.1:5672/%2f"), "amqp://127.0.0.1:5672/%2f", "no user information");
        assert_eq!(redacted("not a url"), "not a url");
    }
}
