//! Where the broker is and how to reach it: the `[bridge]` table of a node's configuration file.
//!
//! Connection settings come from the file or the environment, never from a command line (where
//! every user of the machine could read a password): the file's `url`, else [`URL_ENV`], else
//! [`DEFAULT_URL`] (loopback).

use std::path::PathBuf;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{BridgeError, DEFAULT_URL, URL_ENV};

/// How to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionSettings {
    /// The broker's URL (`amqp://user:password@host:port/vhost`, or `amqps://` for TLS); without
    /// it, [`URL_ENV`], then [`DEFAULT_URL`].
    pub url: Option<String>,
    /// TLS settings handed to the client as they are (for `amqps://` URLs).
    pub tls: TlsSettings,
    /// How long to wait before reconnecting after the broker went away, doubling per failed try.
    pub reconnect: Backoff,
}

/// TLS files for an `amqps://` connection, read when connecting and handed to the client.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the certificate authorities to trust beside the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM file of this client's certificate, for client-certificate authentication.
    pub cert_file: Option<PathBuf>,
    /// PEM file of its PKCS#8 private key (with `cert_file`).
    pub key_file: Option<PathBuf>,
}

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The first wait, in milliseconds.
    pub min_ms: u64,
    /// The longest wait, in milliseconds.
    pub max_ms: u64,
}

impl Default for Backoff {
    /// 100 ms, doubling to 5 s.
    fn default() -> Self {
        Self { min_ms: 100, max_ms: 5_000 }
    }
}

impl Backoff {
    /// The wait before try `attempt` (0 for the first reconnection): `min_ms` doubled per attempt,
    /// at most `max_ms`, then a random part of it taken off (up to half), so that nodes that lost
    /// the broker together do not all come back in the same instant.
    #[must_use]
    pub fn wait(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let full = self.min_ms.saturating_mul(1u64 << attempt.min(20)).min(self.max_ms);
        Duration::from_millis(full - rng.random_range(0..=full / 2))
    }
}

/// Reconnections paced by a [`Backoff`], shared by whatever keeps a connection to the broker (the
/// inbox, an outbox's runner): the wait doubles with each failed try, and a connection that got
/// work done starts it over.
#[derive(Debug)]
pub struct Reconnects {
    backoff: Backoff,
    failures: u32,
    rng: rand::rngs::SmallRng,
}

impl Reconnects {
    /// No failure yet.
    #[must_use]
    pub fn new(backoff: Backoff) -> Self {
        // Jitter only: the seed needs to differ between processes, not to be secret.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
        let seed = u64::from(nanos) << 32 | u64::from(std::process::id());
        Self { backoff, failures: 0, rng: rand::rngs::SmallRng::seed_from_u64(seed) }
    }

    /// The connection got work done: the next loss waits the shortest time again.
    pub fn progressed(&mut self) {
        self.failures = 0;
    }

    /// `who` lost the broker with `error`: says so, and waits out the backoff.
    pub fn wait_after(&mut self, error: &dyn std::fmt::Display, who: &str) {
        let wait = self.backoff.wait(self.failures, &mut self.rng);
        tracing::warn!(%error, wait_ms = wait.as_millis(), "{who} lost the broker; reconnecting");
        self.failures = self.failures.saturating_add(1);
        std::thread::sleep(wait);
    }
}

impl ConnectionSettings {
    /// The URL to connect to: the file's, the environment's, or loopback's.
    #[must_use]
    pub fn url(&self) -> String {
        self.url.clone().unwrap_or_else(|| std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned()))
    }

    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), BridgeError> {
        let url = self.url();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(BridgeError::Settings(format!(
                "bridge.url: {} is not an amqp:// or amqps:// URL",
                crate::redacted(&url)
            )));
        }
        if let Err(error) = url.parse::<lapin::uri::AMQPUri>() {
            return Err(BridgeError::Settings(format!("bridge.url: {}: {error}", crate::redacted(&url))));
        }
        if self.reconnect.min_ms == 0 || self.reconnect.max_ms < self.reconnect.min_ms {
            return Err(BridgeError::Settings(format!(
                "bridge.reconnect: min_ms must be at least 1 and at most max_ms (got {} and {})",
                self.reconnect.min_ms, self.reconnect.max_ms
            )));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(BridgeError::Settings(
                "bridge.tls: cert_file and key_file go together (a certificate and its key)".into(),
            ));
        }
        Ok(())
    }

    /// Connects as the settings say (the URL, the TLS files), naming the connection `name` (the
    /// broker's management tools show it). Run it on a [`Bridge`](crate::Bridge)'s runtime.
    pub async fn connect(&self, name: &str) -> Result<lapin::Connection, BridgeError> {
        let tls = self.tls_config()?;
        let properties = lapin::ConnectionProperties::default().with_connection_name(name.into());
        let runtime = lapin::runtime::default_runtime()?;
        Ok(lapin::Connection::connect_with_config(&self.url(), properties, tls, runtime).await?)
    }

    /// The TLS configuration for the client: the files read now.
    pub fn tls_config(&self) -> Result<OwnedTLSConfig, BridgeError> {
        let read = |field: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| BridgeError::Settings(format!("bridge.tls.{field}: cannot read {}: {e}", path.display())))
        };
        let cert_chain = match &self.tls.ca_file {
            Some(path) => Some(String::from_utf8(read("ca_file", path)?).map_err(|_| {
                BridgeError::Settings(format!("bridge.tls.ca_file: {} is not PEM text", path.display()))
            })?),
            None => None,
        };
        let identity = match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                Some(OwnedIdentity::PKCS8 { pem: read("cert_file", cert)?, key: read("key_file", key)? })
            }
            _ => None,
        };
        Ok(OwnedTLSConfig { identity, cert_chain })
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_and_takes_off_at_most_half() {
        let backoff = Backoff { min_ms: 100, max_ms: 5_000 };
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for (attempt, full) in [(0, 100), (1, 200), (2, 400), (5, 3_200), (6, 5_000), (40, 5_000)] {
            for _ in 0..200 {
                let wait = backoff.wait(attempt, &mut rng).as_millis();
                assert!(
                    (full / 2..=full).contains(&wait),
                    "attempt {attempt}: {wait} ms outside {}..={full}",
                    full / 2
                );
            }
        }
    }

    #[test]
    fn bad_settings_name_their_field() {
        let url = |url: &str| ConnectionSettings { url: Some(url.into()), ..ConnectionSettings::default() };
        let message = |settings: ConnectionSettings| settings.validate().expect_err("refused").to_string();
        assert!(message(url("http://127.0.0.1")).starts_with("bridge.url:"));
        assert!(message(url("amqp://u:secret@127.0.0.1:notaport/%2f")).contains("bridge.url"));
        assert!(!message(url("amqp://u:secret@127.0.0.1:notaport/%2f")).contains("secret"), "no password shown");
        let mut settings = url("amqp://127.0.0.1/%2f");
        settings.reconnect = Backoff { min_ms: 0, max_ms: 10 };
        assert!(message(settings.clone()).starts_with("bridge.reconnect"));
        settings.reconnect = Backoff::default();
        settings.tls.cert_file = Some("client.pem".into());
        assert!(message(settings.clone()).starts_with("bridge.tls"));
        settings.tls.key_file = Some("/nonexistent/key.pem".into());
        settings.validate().expect("a certificate and a key");
        let error = settings.tls_config().expect_err("the files are missing").to_string();
        assert!(error.starts_with("bridge.tls.cert_file: cannot read client.pem"), "{error}");
    }
}
