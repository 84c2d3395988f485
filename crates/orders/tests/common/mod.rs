//! Checks shared by the crash and power-cut tests.

use conduit_orders::Histories;

/// The acknowledged orders (ids `1..=acked`) the log must still hold. Orders are placed in id
/// order and retention removes the oldest frames, none a message in flight needs: every
/// placement below the lowest one left was removed with its frames, finished, and none above
/// it. Orders whose early records retention removed (`truncated`) are not judged.
pub(crate) fn retained_acknowledged(histories: &Histories, acked: u64) -> impl Iterator<Item = u64> + '_ {
    let lowest = histories.orders.keys().min().copied().unwrap_or(1);
    (lowest..=acked).filter(|id| !histories.truncated.contains(id))
}
