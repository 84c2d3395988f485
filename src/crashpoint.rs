//! Named crash points, for crash-torture tests (feature `crashpoints`): with
//! `CONDUIT_CRASH_AT=<point>:<n>` in its environment, the process aborts (no unwinding, no
//! destructors, as `kill -9` or a power cut would stop it) the n-th time it passes `<point>`.
//! Without the variable a pass costs one load; without the feature, nothing.
//!
//! The engine's own points are below; an application registers its own names with
//! [`register`] before it passes them, and [`check_armed`] tells a misspelt point from a real one.
//! Before aborting, a crash point prints `crash point <name>: pass <n>, aborting` on stderr, so a
//! test can tell the armed crash from any other way of dying.
//!
//! | point | where |
//! |---|---|
//! | `log.before_commit` | the log writer has written a group's frames, not yet committed them |
//! | `log.after_commit` | the group is committed (and synced), its acknowledgements not yet sent |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

/// The environment variable that arms a crash point.
pub const ENV: &str = "CONDUIT_CRASH_AT";

/// The engine's own crash points.
pub const ENGINE_POINTS: [&str; 4] = ["log.before_commit", "log.after_commit", "log.checkpoint", "log.retention"];

/// What stderr shows just before an armed point aborts: `{MARKER} <name>: pass <n>, aborting`.
pub const MARKER: &str = "crash point";

static REGISTERED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Adds an application's crash points to the known names (repeats are ignored).
pub fn register(points: &[&'static str]) {
    let mut registered = REGISTERED.lock();
    for point in points {
        if !registered.contains(point) {
            registered.push(point);
        }
    }
}

/// Every known crash point: the engine's, then those registered.
#[must_use]
pub fn points() -> Vec<&'static str> {
    let mut all = ENGINE_POINTS.to_vec();
    all.extend(REGISTERED.lock().iter().copied().filter(|p| !ENGINE_POINTS.contains(p)));
    all
}

/// The armed point and pass from the environment, if any.
fn plan() -> Option<(String, u64)> {
    let text = std::env::var(ENV).ok()?;
    let (point, n) = text.rsplit_once(':')?;
    let n = n.parse::<u64>().ok().filter(|&n| n > 0)?;
    Some((point.to_owned(), n))
}

/// Checks `CONDUIT_CRASH_AT`: `Ok(None)` when unset, the armed point when it names a known point
/// and a pass from 1; otherwise an error that lists the known points.
pub fn check_armed() -> Result<Option<(String, u64)>, String> {
    let Ok(text) = std::env::var(ENV) else { return Ok(None) };
    let known = points();
    match plan() {
        Some((point, n)) if known.contains(&point.as_str()) => Ok(Some((point, n))),
        _ => Err(format!("{ENV}={text:?}: expected <point>:<pass from 1>, with a point among {}", known.join(", "))),
    }
}

/// Passes the crash point `name`: aborts the process if this is the armed pass.
#[inline]
pub fn hit(name: &str) {
    let Some((point, n)) = PLAN.get_or_init(plan) else { return };
    if point == name && PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        eprintln!("{MARKER} {name}: pass {n}, aborting");
        std::process::abort();
    }
}
