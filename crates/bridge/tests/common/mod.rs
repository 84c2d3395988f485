//! What the bridge's tests share: a broker, or a clear word on why a test skips without one.

use conduit_bridge::{redacted, url_from_env, Bridge};

/// A bridge connected to the broker ([`conduit_bridge::URL_ENV`], or RabbitMQ on loopback), or
/// `None` after saying on stderr why `test` skips. With `CONDUIT_REQUIRE_BROKER=1` (as in CI) a
/// missing broker fails the test instead.
pub(crate) fn connect_or_skip(test: &str) -> Option<(Bridge, conduit_bridge::lapin::Connection)> {
    let required = std::env::var("CONDUIT_REQUIRE_BROKER").is_ok_and(|v| v == "1");
    let url = url_from_env();
    let shown = redacted(&url);
    let bridge = Bridge::new().expect("a runtime");
    match bridge.connect(&url, test) {
        Ok(connection) => Some((bridge, connection)),
        Err(error) if !required => {
            eprintln!(
                "{test} skipped: no RabbitMQ broker at {shown} ({error}); start one with `scripts/broker start DIR`, \
                 or set CONDUIT_AMQP_URL (CONDUIT_REQUIRE_BROKER=1 makes a missing broker a failure)"
            );
            None
        }
        Err(error) => panic!("CONDUIT_REQUIRE_BROKER=1 but no broker at {shown}: {error}"),
    }
}
