//! Request/reply: under concurrency every reply reaches the caller whose correlation id it
//! carries; a slow reply times its caller out, and is then dropped and counted as late.

use std::time::Duration;

use conduit::rpc::{RpcError, RpcServer};

#[test]
fn replies_are_matched_to_their_callers_under_concurrency() {
    let server = RpcServer::spawn("echo", 4, 64, |(caller, n): (u64, u64)| {
        if (caller * 7 + n) % 13 == 0 {
            std::thread::sleep(Duration::from_micros(50)); // shuffle the order replies leave in
        }
        (caller, n, n * n + caller)
    })
    .expect("threads start");
    std::thread::scope(|scope| {
        for caller in 0..8u64 {
            let server = &server;
            scope.spawn(move || {
                for n in 0..500u64 {
                    let reply = server.call((caller, n), Duration::from_secs(10)).expect("answered in time");
                    assert_eq!(reply, (caller, n, n * n + caller), "caller {caller} got someone else's reply");
                }
            });
        }
    });
    let stats = server.shutdown();
    assert_eq!((stats.calls, stats.replies, stats.timeouts, stats.late_replies), (4_000, 4_000, 0, 0));
}

#[test]
fn timeouts_fire_and_late_replies_are_dropped_and_counted() {
    let server = RpcServer::spawn("slow", 2, 16, |slow: bool| {
        if slow {
            std::thread::sleep(Duration::from_millis(60));
        }
        slow
    })
    .expect("threads start");
    for _ in 0..3 {
        assert_eq!(server.call(true, Duration::from_millis(5)), Err(RpcError::Timeout));
        assert_eq!(server.call(false, Duration::from_secs(10)), Ok(false), "fast calls still get their reply");
    }
    let stats = server.shutdown(); // serves the queue first: every slow reply arrives, late
    assert_eq!(stats.calls, 6);
    assert_eq!(stats.timeouts, 3);
    assert_eq!(stats.late_replies, 3);
    assert_eq!(stats.replies, 3);
}
