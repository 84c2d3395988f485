//! A hierarchical timing wheel: pure tick arithmetic, no clock, no threads.
//!
//! Six levels of 64 slots; a slot at level `L` spans `64^L` ticks, so the wheel covers `2^36`
//! ticks ahead (with 1 ms ticks, over two years). An entry sits at the level of the highest
//! 6-bit group in which its deadline differs from the current tick; when its slot comes due it
//! either fires (level 0, or its deadline has passed) or cascades down a level. Each level keeps
//! a 64-bit occupancy bitmap, so finding the next due slot is a rotate and a trailing-zero count.
//!
//! Time becomes ticks by rounding **up** ([`Wheel::ticks_ceil`]): an entry never fires early.
//! A deadline at or before the current tick is refused as [`Insert::AlreadyDue`], handing the
//! value back, so the caller acts on it at once instead of waiting a tick.

// Every cast below is of a level (< 6), a slot (< 64) or a bit count (< 64).
#![allow(clippy::cast_possible_truncation)]

/// Slots per level.
pub const SLOTS: usize = 64;
/// Levels.
pub const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
/// Ticks the wheel can hold an entry ahead of its current tick: the top level's 64 slots less
/// one, so a deadline that wraps around the top level never lands in the slot being drained.
pub const HORIZON_TICKS: u64 = (1 << (SLOT_BITS * LEVELS as u32)) - (1 << (SLOT_BITS * (LEVELS as u32 - 1)));

const _: () = assert!(SLOTS == 1 << SLOT_BITS);
const _: () = assert!(SLOT_BITS * (LEVELS as u32) < 64);

/// The result of [`Wheel::insert`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Insert<T> {
    /// Stored; it fires when the wheel reaches its deadline.
    Scheduled,
    /// The deadline is not after the current tick: here is the value back, act on it now.
    AlreadyDue(T),
    /// The deadline is beyond [`HORIZON_TICKS`] from now: here is the value back.
    TooFar(T),
}

/// Entries keyed by a deadline in ticks.
#[derive(Debug, Clone)]
pub struct Wheel<T> {
    elapsed: u64,
    len: usize,
    occupied: [u64; LEVELS],
    slots: Vec<Vec<(u64, T)>>,
}

impl<T> Default for Wheel<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

/// The level at which `deadline` belongs when the wheel stands at `elapsed`: the highest 6-bit
/// group in which they differ, the top level taking everything above it (its slots wrap).
fn level_of(elapsed: u64, deadline: u64) -> usize {
    // The lowest six bits never choose a level above 0; or-ing them in keeps `significant` >= 5.
    let masked = (elapsed ^ deadline) | (SLOTS as u64 - 1);
    let significant = masked.ilog2();
    ((significant / SLOT_BITS) as usize).min(LEVELS - 1)
}

fn slot_of(deadline: u64, level: usize) -> usize {
    ((deadline >> (SLOT_BITS * level as u32)) & (SLOTS as u64 - 1)) as usize
}

impl<T> Wheel<T> {
    /// An empty wheel standing at tick `now`.
    #[must_use]
    pub fn new(now: u64) -> Self {
        Self { elapsed: now, len: 0, occupied: [0; LEVELS], slots: (0..SLOTS * LEVELS).map(|_| Vec::new()).collect() }
    }

    /// Whole ticks of `tick_ns` nanoseconds in `ns`, rounded up: a deadline never fires early.
    #[must_use]
    pub fn ticks_ceil(ns: u64, tick_ns: u64) -> u64 {
        ns.div_ceil(tick_ns.max(1))
    }

    /// The current tick.
    #[must_use]
    pub fn now(&self) -> u64 {
        self.elapsed
    }

    /// Entries waiting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `value` at tick `deadline`.
    pub fn insert(&mut self, deadline: u64, value: T) -> Insert<T> {
        if deadline <= self.elapsed {
            return Insert::AlreadyDue(value);
        }
        if deadline - self.elapsed >= HORIZON_TICKS {
            return Insert::TooFar(value);
        }
        let level = level_of(self.elapsed, deadline);
        debug_assert!(level < LEVELS, "deadline {deadline} from {} has level {level}", self.elapsed);
        let slot = slot_of(deadline, level);
        self.slots[level * SLOTS + slot].push((deadline, value));
        self.occupied[level] |= 1 << slot;
        self.len += 1;
        Insert::Scheduled
    }

    /// The earliest tick at which some slot comes due, if any entry waits. Entries fire at or
    /// after it, never before.
    #[must_use]
    pub fn next_due(&self) -> Option<u64> {
        (0..LEVELS).filter_map(|level| self.next_slot(level).map(|(_, start)| start)).min()
    }

    /// The next occupied slot of `level` and the tick at which it starts.
    fn next_slot(&self, level: usize) -> Option<(usize, u64)> {
        let occupied = self.occupied[level];
        if occupied == 0 {
            return None;
        }
        let shift = SLOT_BITS * level as u32;
        let slot_span = 1u64 << shift;
        let level_span = slot_span << SLOT_BITS;
        let current = slot_of(self.elapsed, level);
        let distance = occupied.rotate_right(current as u32).trailing_zeros() as usize;
        let slot = (current + distance) % SLOTS;
        let level_start = self.elapsed & !(level_span - 1);
        let mut start = level_start + slot as u64 * slot_span;
        if slot < current {
            start += level_span;
        }
        Some((slot, start.max(self.elapsed)))
    }

    /// Moves the wheel to tick `now` (never backwards) and appends every entry whose deadline is
    /// at or before it to `due`, earliest slots first.
    pub fn advance(&mut self, now: u64, due: &mut Vec<T>) {
        while let Some((level, slot, start)) = self.earliest_slot().filter(|&(_, _, start)| start <= now) {
            self.elapsed = self.elapsed.max(start);
            self.occupied[level] &= !(1 << slot);
            let entries = std::mem::take(&mut self.slots[level * SLOTS + slot]);
            self.len -= entries.len();
            for (deadline, value) in entries {
                match self.insert(deadline, value) {
                    Insert::Scheduled => {}
                    Insert::AlreadyDue(value) => due.push(value),
                    Insert::TooFar(_) => unreachable!("a cascading entry only gets nearer"),
                }
            }
        }
        self.elapsed = self.elapsed.max(now);
    }

    fn earliest_slot(&self) -> Option<(usize, usize, u64)> {
        (0..LEVELS)
            .filter_map(|level| self.next_slot(level).map(|(slot, start)| (level, slot, start)))
            .min_by_key(|&(level, _, start)| (start, level))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn level_arithmetic_is_exhaustively_right_near_every_boundary() {
        // For every level boundary, and offsets around it, the chosen level is the one whose
        // slot span separates elapsed from the deadline.
        for elapsed in [0u64, 1, 63, 64, 65, 4_095, 4_096, 262_143, 262_144, (1 << 30) - 1, 1 << 30] {
            for level in 0..LEVELS {
                let span = 1u64 << (SLOT_BITS * level as u32);
                for delta in [1, span.saturating_sub(1).max(1), span, span + 1, span * 63, span * 64 - 1] {
                    if delta >= HORIZON_TICKS {
                        continue;
                    }
                    let deadline = elapsed + delta;
                    let chosen = level_of(elapsed, deadline);
                    if chosen == LEVELS - 1 {
                        continue; // the top level takes everything above it
                    }
                    let shared_above = |l: usize| {
                        (elapsed >> (SLOT_BITS * (l as u32 + 1))) == (deadline >> (SLOT_BITS * (l as u32 + 1)))
                    };
                    assert!(shared_above(chosen), "elapsed {elapsed} deadline {deadline}: level {chosen} too low");
                    assert!(
                        chosen == 0 || !shared_above(chosen - 1),
                        "elapsed {elapsed} deadline {deadline}: level {chosen} too high"
                    );
                }
            }
        }
    }

    #[test]
    fn every_delta_up_to_two_levels_fires_exactly_on_time() {
        for start in [0u64, 5, 63, 64, 100, 4_000] {
            for delta in 1..(64 * 64 + 70) {
                let mut wheel = Wheel::new(start);
                assert_eq!(wheel.insert(start + delta, delta), Insert::Scheduled);
                let mut due = Vec::new();
                wheel.advance(start + delta - 1, &mut due);
                assert!(due.is_empty(), "start {start} delta {delta} fired early");
                assert!(wheel.next_due().is_some_and(|t| t <= start + delta));
                wheel.advance(start + delta, &mut due);
                assert_eq!(due, vec![delta], "start {start} delta {delta}");
                assert!(wheel.is_empty());
            }
        }
    }

    #[test]
    fn already_due_and_too_far_hand_the_value_back() {
        let mut wheel = Wheel::new(100);
        assert_eq!(wheel.insert(100, 'a'), Insert::AlreadyDue('a'));
        assert_eq!(wheel.insert(3, 'b'), Insert::AlreadyDue('b'));
        assert_eq!(wheel.insert(100 + HORIZON_TICKS, 'c'), Insert::TooFar('c'));
        assert_eq!(wheel.insert(100 + HORIZON_TICKS - 1, 'd'), Insert::Scheduled);
        // Across the top level's wrap: a deadline just past a 2^36 boundary is near, not far.
        let mut wrap = Wheel::new((1 << 36) - 3);
        assert_eq!(wrap.insert((1 << 36) + 5, 'e'), Insert::Scheduled);
        let mut due = Vec::new();
        wrap.advance((1 << 36) + 4, &mut due);
        assert!(due.is_empty());
        wrap.advance((1 << 36) + 5, &mut due);
        assert_eq!(due, vec!['e']);
        let mut far = Wheel::new(7 << 30);
        assert_eq!(far.insert((7 << 30) + HORIZON_TICKS - 1, 'f'), Insert::Scheduled);
        far.advance((7 << 30) + HORIZON_TICKS - 2, &mut due);
        assert_eq!(due, vec!['e']);
        far.advance((7 << 30) + HORIZON_TICKS - 1, &mut due);
        assert_eq!(due, vec!['e', 'f']);
        // 63 of the top level's 64 slots of 2^30 ticks: with 1 ms ticks, 783 days ahead.
        assert_eq!(HORIZON_TICKS, 63 << 30);
        assert_eq!(Wheel::<()>::ticks_ceil(1_000_001, 1_000_000), 2);
        assert_eq!(Wheel::<()>::ticks_ceil(1_000_000, 1_000_000), 1);
    }

    #[test]
    fn the_wheel_tells_its_tick_and_whether_anything_waits() {
        let mut wheel = Wheel::new(7);
        assert_eq!((wheel.now(), wheel.len(), wheel.is_empty()), (7, 0, true));
        assert_eq!(wheel.insert(10, 'a'), Insert::Scheduled);
        assert_eq!((wheel.now(), wheel.len(), wheel.is_empty()), (7, 1, false));
        let mut due = Vec::new();
        wheel.advance(9, &mut due);
        assert_eq!((wheel.now(), wheel.is_empty()), (9, false));
        wheel.advance(500, &mut due);
        assert_eq!((wheel.now(), wheel.is_empty(), due), (500, true, vec!['a']));
    }

    proptest! {
        /// Against a reference model: whatever the inserts and advances, each value fires once,
        /// exactly when the wheel reaches its deadline, never before.
        #[test]
        fn matches_a_sorted_map(
            start in prop_oneof![0u64..1 << 20, (1u64..8).prop_map(|k| (k << 36) - 2_000)],
            scale in prop_oneof![Just(1u64), Just(1 << 14)],
            ops in prop::collection::vec((any::<bool>(), 1u64..300_000), 1..200),
        ) {
            let mut wheel = Wheel::new(start);
            let mut model: BTreeSet<(u64, usize)> = BTreeSet::new();
            let mut now = start;
            for (id, (is_insert, amount)) in ops.into_iter().enumerate() {
                let amount = (amount * scale).min(HORIZON_TICKS - 1);
                if is_insert {
                    let deadline = now + amount;
                    prop_assert_eq!(wheel.insert(deadline, (deadline, id)), Insert::Scheduled);
                    model.insert((deadline, id));
                } else {
                    now += amount / 8;
                    let mut due = Vec::new();
                    wheel.advance(now, &mut due);
                    due.sort_unstable();
                    let expected: Vec<(u64, usize)> = model.range(..=(now, usize::MAX)).copied().collect();
                    for key in &expected {
                        model.remove(key);
                    }
                    prop_assert_eq!(due, expected);
                }
                prop_assert_eq!(wheel.len(), model.len());
                if let Some((earliest, _)) = model.first() {
                    prop_assert!(wheel.next_due().is_some_and(|t| t <= *earliest && t > now));
                }
            }
        }
    }
}
