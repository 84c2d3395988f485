//! Named crash points, for the crash-torture tests: with `CONDUIT_CRASH_AT=<point>:<n>` in its
//! environment, the process aborts (no unwinding, no destructors, as `kill -9` or a power cut
//! would stop it) the n-th time it passes `<point>`. Without the variable a pass costs one load.
//!
//! | point | where |
//! |---|---|
//! | `log.before_commit` | the log writer has written a group's frames, not yet committed them |
//! | `log.after_commit` | the group is committed (and synced), its acknowledgements not yet sent |
//! | `saga.after_charge` | the payment stage has charged, the fact not yet recorded or sent on |
//! | `recover.resumed` | a restarted pipeline has injected the orders it resumes, none finished |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const ENV: &str = "CONDUIT_CRASH_AT";

/// Every crash point.
pub const POINTS: [&str; 4] = ["log.before_commit", "log.after_commit", "saga.after_charge", "recover.resumed"];

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

fn plan() -> Option<(String, u64)> {
    let text = std::env::var(ENV).ok()?;
    let (point, n) = text.rsplit_once(':')?;
    let n = n.parse::<u64>().ok().filter(|&n| n > 0)?;
    POINTS.contains(&point).then(|| (point.to_owned(), n))
}

/// Passes the crash point `name`: aborts the process if this is the armed pass.
#[inline]
pub fn hit(name: &str) {
    let Some((point, n)) = PLAN.get_or_init(plan) else { return };
    if point == name && PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        eprintln!("crash point {name}: pass {n}, aborting");
        std::process::abort();
    }
}
