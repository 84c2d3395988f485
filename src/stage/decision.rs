//! The decision core: what becomes of an event after its handler's outcome, as a pure function of
//! the outcome, the event's attempts and failures so far in the stage, and the stage's settings.
//! The threaded worker and the deterministic simulation both decide here, never on their own.

use rand::rngs::SmallRng;
use rand::Rng;

use crate::config::{limits, Jitter, StageConfig};
use crate::dead_letter::{DeadLetterKind, Failures};
use crate::stage::{Outcome, Reason};

/// What becomes of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Handled: what it emitted and recorded goes on.
    Forward,
    /// Tried again in the same stage after `delay_ms` (0: at once); its key's later events wait.
    Retry {
        /// How long it waits first.
        delay_ms: u64,
    },
    /// Given up on, for good.
    DeadLetter {
        /// The class of failure.
        kind: DeadLetterKind,
        /// The last failure's reason.
        reason: Reason,
    },
}

/// How a handler ended, as the decision core sees it.
#[derive(Debug)]
pub(crate) struct Ending {
    /// The outcome it returned (a caught panic is a [`Outcome::Retry`]).
    pub(crate) outcome: Outcome,
    /// Whether the handler panicked.
    pub(crate) panicked: bool,
    /// Set when the handler misused its emitter: that overrides the outcome.
    pub(crate) misuse: Option<Reason>,
}

/// Decides `ending` for an event that has made `attempt` attempts in this stage before this one;
/// `attempt` is updated to count this one where it counts (every outcome but a deferral and a
/// misuse), and a failure to be retried joins `failures` at `wall_us`. `rng` draws the jitter.
pub(crate) fn decide(
    ending: Ending,
    attempt: &mut u32,
    failures: &mut Failures,
    config: &StageConfig,
    rng: &mut SmallRng,
    wall_us: u64,
) -> Disposition {
    if let Some(reason) = ending.misuse {
        return Disposition::DeadLetter { kind: DeadLetterKind::HandlerMisuse, reason };
    }
    match ending.outcome {
        Outcome::Done => Disposition::Forward,
        Outcome::Retry(reason) | Outcome::Conflict(reason) if *attempt + 1 >= config.attempts_max => {
            *attempt += 1;
            let kind = if ending.panicked { DeadLetterKind::Panicked } else { DeadLetterKind::RetriesExhausted };
            Disposition::DeadLetter { kind, reason }
        }
        Outcome::Retry(reason) => {
            *attempt += 1;
            failures.push(reason, wall_us);
            Disposition::Retry { delay_ms: backoff_ms(config, *attempt, failures, rng) }
        }
        Outcome::Conflict(reason) => {
            *attempt += 1;
            failures.push(reason, wall_us);
            Disposition::Retry { delay_ms: 0 }
        }
        Outcome::Defer(wait) => Disposition::Retry {
            delay_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).min(limits::RETRY_BACKOFF_MS_MAX),
        },
        Outcome::Reject(reason) => {
            *attempt += 1;
            Disposition::DeadLetter { kind: DeadLetterKind::Rejected, reason }
        }
        Outcome::Malformed(reason) => {
            *attempt += 1;
            Disposition::DeadLetter { kind: DeadLetterKind::Malformed, reason }
        }
    }
}

/// The delay before attempt `attempt + 1`: exponential from the stage's base (doubling per
/// attempt), capped, jittered. Decorrelated jitter draws from the previous delay, kept in
/// `failures`.
pub(crate) fn backoff_ms(config: &StageConfig, attempt: u32, failures: &mut Failures, rng: &mut SmallRng) -> u64 {
    let (base, cap) = (config.retry_backoff_ms_base, config.retry_backoff_ms_max);
    if base == 0 {
        return 0;
    }
    let doublings = attempt.saturating_sub(1).min(32);
    let delay = base.saturating_mul(1 << doublings).min(cap);
    match config.retry_jitter {
        Jitter::None => delay,
        Jitter::Full => rng.random_range(0..=delay),
        Jitter::Decorrelated => {
            let previous = failures.last_delay_ms.max(base);
            let delay = rng.random_range(base..=previous.saturating_mul(3)).min(cap);
            failures.last_delay_ms = delay;
            delay
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn config(attempts_max: u32) -> StageConfig {
        StageConfig {
            attempts_max,
            retry_backoff_ms_base: 10,
            retry_backoff_ms_max: 60,
            retry_jitter: Jitter::None,
            ..StageConfig::default()
        }
    }

    fn ending(outcome: Outcome) -> Ending {
        Ending { outcome, panicked: false, misuse: None }
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap_then_dead_letter() {
        let (config, mut rng) = (config(5), SmallRng::seed_from_u64(1));
        let (mut attempt, mut failures) = (0, Failures::default());
        let mut delays = Vec::new();
        loop {
            match decide(ending(Outcome::Retry("down".into())), &mut attempt, &mut failures, &config, &mut rng, 7) {
                Disposition::Retry { delay_ms } => delays.push(delay_ms),
                Disposition::DeadLetter { kind, .. } => {
                    assert_eq!(kind, DeadLetterKind::RetriesExhausted);
                    break;
                }
                Disposition::Forward => unreachable!("a retry is never forwarded"),
            }
        }
        assert_eq!(delays, [10, 20, 40, 60]);
        assert_eq!(attempt, 5, "every attempt counted");
        assert_eq!(failures.errors.len(), 4, "the last failure is the dead letter's reason, not in the chain");
    }

    #[test]
    fn each_outcome_has_its_disposition() {
        let (config, mut rng) = (config(3), SmallRng::seed_from_u64(1));
        let mut decide_one = |outcome, attempt: u32| {
            let (mut attempt, mut failures) = (attempt, Failures::default());
            let disposition = decide(ending(outcome), &mut attempt, &mut failures, &config, &mut rng, 0);
            (disposition, attempt)
        };
        assert_eq!(decide_one(Outcome::Done, 0), (Disposition::Forward, 0));
        assert_eq!(decide_one(Outcome::Conflict("again".into()), 0), (Disposition::Retry { delay_ms: 0 }, 1));
        assert_eq!(
            decide_one(Outcome::Defer(std::time::Duration::from_millis(25)), 2),
            (Disposition::Retry { delay_ms: 25 }, 2),
            "a deferral spends no attempt"
        );
        let rejected = Disposition::DeadLetter { kind: DeadLetterKind::Rejected, reason: "no".into() };
        assert_eq!(decide_one(Outcome::Reject("no".into()), 0), (rejected, 1));
        let malformed = Disposition::DeadLetter { kind: DeadLetterKind::Malformed, reason: "bad".into() };
        assert_eq!(decide_one(Outcome::Malformed("bad".into()), 1), (malformed, 2));
        let spent = Disposition::DeadLetter { kind: DeadLetterKind::RetriesExhausted, reason: "x".into() };
        assert_eq!(decide_one(Outcome::Conflict("x".into()), 2), (spent, 3));
    }

    #[test]
    fn a_panic_on_the_last_attempt_and_a_misuse_are_their_own_kinds() {
        let (config, mut rng) = (config(1), SmallRng::seed_from_u64(1));
        let (mut attempt, mut failures) = (0, Failures::default());
        let panicked = Ending { outcome: Outcome::Retry("boom".into()), panicked: true, misuse: None };
        assert!(matches!(
            decide(panicked, &mut attempt, &mut failures, &config, &mut rng, 0),
            Disposition::DeadLetter { kind: DeadLetterKind::Panicked, .. }
        ));
        let misuse = Ending { outcome: Outcome::Done, panicked: false, misuse: Some("unlinked".into()) };
        assert!(matches!(
            decide(misuse, &mut attempt, &mut failures, &config, &mut rng, 0),
            Disposition::DeadLetter { kind: DeadLetterKind::HandlerMisuse, .. }
        ));
    }
}
