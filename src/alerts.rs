//! Alerts: rules over [`Snapshot`]s, with the usual production thresholds for a queue-fed
//! pipeline as defaults (queue depth above 1,000, lag above 30 s, error rate above 1%, mean
//! latency above 5 s, any dead letter).
//!
//! The engine evaluates its rules each time it takes a snapshot ([`crate::Engine::snapshot`]), so
//! alerts are as fresh as the snapshots someone takes: `conduit run` takes ten a second. A rule
//! that starts or stops holding is a transition: it goes to `tracing` at warn level and into the
//! snapshot's [`AlertsSnapshot`]. Rates (errors, mean latency, dead letters) are read over the last
//! [`AlertRules::window_s`] seconds of snapshots, levels (depth, lag) from the snapshot itself.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::metrics::{Snapshot, StageSnapshot};

/// Transitions kept in [`AlertsSnapshot::recent`].
pub const RECENT_MAX: usize = 64;

/// Attempts a window needs before its error rate is judged: one failure in three attempts is
/// not a 33% error rate worth waking anyone for.
pub const ERROR_RATE_ATTEMPTS_MIN: u64 = 100;

/// The thresholds, as the `[alerts]` table of a configuration file.
///
/// ```toml
/// [alerts]
/// queue_depth_max = 1000       # events waiting in one stage's queues
/// lag_s_max = 30.0             # age of the oldest waiting event
/// error_rate_max = 0.01        # failed attempts / attempts, over the window
/// mean_latency_s_max = 5.0     # hand-off to handled, mean over the window
/// dead_letters = true          # any dead letter within the window
/// window_s = 10.0
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertRules {
    /// Evaluate the rules at all.
    pub enabled: bool,
    /// A stage's queue depth above this fires `queue_depth`.
    pub queue_depth_max: u64,
    /// A stage's lag (age of its oldest waiting event) above this many seconds fires `lag`.
    pub lag_s_max: f64,
    /// A stage's failed attempts (retried or dead-lettered) over its attempts in the window above
    /// this fraction fires `error_rate` (judged from [`ERROR_RATE_ATTEMPTS_MIN`] attempts).
    pub error_rate_max: f64,
    /// A stage's mean latency (hand-off to handled) over the window above this many seconds fires
    /// `mean_latency`.
    pub mean_latency_s_max: f64,
    /// Any dead letter from a stage within the window fires `dead_letters`.
    pub dead_letters: bool,
    /// Seconds of snapshots that rates are read over; a `dead_letters` alert resolves after a
    /// window without one.
    pub window_s: f64,
}

impl Default for AlertRules {
    fn default() -> Self {
        Self {
            enabled: true,
            queue_depth_max: 1_000,
            lag_s_max: 30.0,
            error_rate_max: 0.01,
            mean_latency_s_max: 5.0,
            dead_letters: true,
            window_s: 10.0,
        }
    }
}

impl AlertRules {
    /// Checks every threshold (field names as in the `[alerts]` table).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let within = |field: &str, value: f64, min: f64, max: f64| {
            if value.is_finite() && (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    field: format!("alerts.{field}"),
                    value: value.to_string(),
                    min: min.to_string(),
                    max: max.to_string(),
                })
            }
        };
        if self.queue_depth_max == 0 {
            return Err(ConfigError::OutOfRange {
                field: "alerts.queue_depth_max".into(),
                value: "0".into(),
                min: "1".into(),
                max: u64::MAX.to_string(),
            });
        }
        within("lag_s_max", self.lag_s_max, 0.001, 86_400.0)?;
        within("error_rate_max", self.error_rate_max, 0.0, 1.0)?;
        within("mean_latency_s_max", self.mean_latency_s_max, 0.000_001, 86_400.0)?;
        within("window_s", self.window_s, 0.1, 86_400.0)
    }
}

/// What an alert watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertRule {
    /// Events waiting in a stage's queues ([`AlertRules::queue_depth_max`]).
    QueueDepth,
    /// Age of the oldest waiting event, seconds ([`AlertRules::lag_s_max`]).
    Lag,
    /// Failed attempts over attempts in the window ([`AlertRules::error_rate_max`]).
    ErrorRate,
    /// Mean hand-off-to-handled time in the window, seconds ([`AlertRules::mean_latency_s_max`]).
    MeanLatency,
    /// Dead letters in the window ([`AlertRules::dead_letters`]).
    DeadLetters,
}

impl AlertRule {
    /// The rule's name, as in reports and `tracing` fields.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::QueueDepth => "queue_depth",
            Self::Lag => "lag",
            Self::ErrorRate => "error_rate",
            Self::MeanLatency => "mean_latency",
            Self::DeadLetters => "dead_letters",
        }
    }
}

/// A rule that holds for a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// What it watches.
    pub rule: AlertRule,
    /// The stage it holds for.
    pub stage: String,
    /// The value that crossed the threshold (when it fired, or when it resolved).
    pub value: f64,
    /// The threshold.
    pub threshold: f64,
    /// Engine uptime, seconds, when it fired.
    pub since_s: f64,
}

/// An alert that started or stopped holding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// True when it fired, false when it resolved.
    pub firing: bool,
    /// Engine uptime, seconds, of the transition.
    pub at_s: f64,
    /// The alert.
    pub alert: Alert,
}

/// The alerts part of a [`Snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertsSnapshot {
    /// Alerts holding now.
    pub firing: Vec<Alert>,
    /// The last [`RECENT_MAX`] transitions, oldest first.
    pub recent: Vec<AlertEvent>,
    /// Alerts fired since the engine started.
    pub fired_total: u64,
    /// Alerts resolved since the engine started.
    pub resolved_total: u64,
}

/// One stage's running totals, as rates need them.
#[derive(Debug, Clone, Copy)]
struct Totals {
    processed: u64,
    emitted: u64,
    retried: u64,
    latency_s: f64,
    latency_events: u64,
    dead_lettered: u64,
}

impl Totals {
    fn of(stage: &StageSnapshot) -> Self {
        Self {
            processed: stage.processed,
            emitted: stage.emitted,
            retried: stage.retried,
            latency_s: stage.latency_total_s,
            latency_events: stage.latency_us.count,
            dead_lettered: stage.dead_lettered,
        }
    }

    /// Attempts: each finished event's last one, and every one that ended in a retry.
    fn attempts(&self) -> u64 {
        self.processed + self.retried
    }

    /// Failed attempts: retried or dead-lettered.
    fn failures(&self) -> u64 {
        self.retried + self.dead_lettered
    }
}

/// The engine's alert state: rules, the window of totals, what fires.
#[derive(Debug)]
pub(crate) struct Alerting {
    rules: AlertRules,
    /// `(uptime, totals per stage)`, oldest first, spanning about one window.
    window: VecDeque<(f64, Vec<Totals>)>,
    /// Uptime of each stage's latest dead letter seen.
    dead_letter_at: Vec<Option<f64>>,
    firing: BTreeMap<(AlertRule, usize), Alert>,
    recent: VecDeque<AlertEvent>,
    fired_total: u64,
    resolved_total: u64,
}

impl Alerting {
    pub(crate) fn new(rules: AlertRules) -> Self {
        Self {
            rules,
            window: VecDeque::new(),
            dead_letter_at: Vec::new(),
            firing: BTreeMap::new(),
            recent: VecDeque::new(),
            fired_total: 0,
            resolved_total: 0,
        }
    }

    /// Evaluates with `rules` from the next snapshot on; what fires now resolves then if the new
    /// rules no longer hold.
    pub(crate) fn set_rules(&mut self, rules: AlertRules) {
        self.rules = rules;
    }

    /// Evaluates the rules over `snapshot` and what came before, and fills in its stages' rates
    /// over the window; returns the alerts part.
    pub(crate) fn observe(&mut self, snapshot: &mut Snapshot) -> AlertsSnapshot {
        let now = snapshot.uptime_s;
        let totals: Vec<Totals> = snapshot.stages.iter().map(Totals::of).collect();
        // The window's base: the newest sample at least a window old (else the oldest).
        while self.window.len() > 1 && now - self.window[1].0 >= self.rules.window_s {
            self.window.pop_front();
        }
        // Rates need a base older than this snapshot (the first has none: its rates stay zero).
        if let Some((then, base)) = self.window.front().filter(|(then, _)| now > *then) {
            let seconds = now - then;
            // Counts to rates: exact below 2^53 events.
            #[allow(clippy::cast_precision_loss)]
            let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
            for ((stage, now), before) in snapshot.stages.iter_mut().zip(&totals).zip(base) {
                stage.rates = crate::metrics::StageRates {
                    processed: rate(now.processed, before.processed),
                    emitted: rate(now.emitted, before.emitted),
                    retried: rate(now.retried, before.retried),
                    dead_lettered: rate(now.dead_lettered, before.dead_lettered),
                };
            }
        }
        let holding = self.holding(snapshot, &totals);
        self.window.push_back((now, totals));
        let transitions: Vec<(bool, (AlertRule, usize), f64, f64)> = {
            let started = holding
                .iter()
                .filter(|(key, _)| !self.firing.contains_key(key))
                .map(|(key, &(value, threshold))| (true, *key, value, threshold));
            let stopped = self
                .firing
                .iter()
                .filter(|(key, _)| !holding.contains_key(key))
                .map(|(key, alert)| (false, *key, alert.value, alert.threshold));
            started.chain(stopped).collect()
        };
        for (firing, key, value, threshold) in transitions {
            let stage = snapshot.stages[key.1].name.clone();
            let alert = if firing {
                let alert = Alert { rule: key.0, stage, value, threshold, since_s: now };
                self.firing.insert(key, alert.clone());
                self.fired_total += 1;
                tracing::warn!(rule = key.0.name(), stage = %alert.stage, value, threshold, "alert firing");
                alert
            } else {
                let alert = self.firing.remove(&key).expect("a resolved alert was firing");
                self.resolved_total += 1;
                tracing::warn!(rule = key.0.name(), stage = %alert.stage, "alert resolved");
                alert
            };
            if self.recent.len() == RECENT_MAX {
                self.recent.pop_front();
            }
            self.recent.push_back(AlertEvent { firing, at_s: now, alert });
        }
        // A firing alert reports its latest value.
        for (key, alert) in &mut self.firing {
            if let Some(&(value, _)) = holding.get(key) {
                alert.value = value;
            }
        }
        AlertsSnapshot {
            firing: self.firing.values().cloned().collect(),
            recent: self.recent.iter().cloned().collect(),
            fired_total: self.fired_total,
            resolved_total: self.resolved_total,
        }
    }

    /// The rules that hold now, with their values and thresholds.
    // Counts to ratios: exact below 2^53 events.
    #[allow(clippy::cast_precision_loss)]
    fn holding(&mut self, snapshot: &Snapshot, totals: &[Totals]) -> BTreeMap<(AlertRule, usize), (f64, f64)> {
        let rules = &self.rules;
        let mut holding = BTreeMap::new();
        if !rules.enabled {
            return holding;
        }
        self.dead_letter_at.resize(totals.len(), None);
        let base = self.window.front().map(|(_, base)| base);
        let last = self.window.back().map(|(_, last)| last);
        for (i, (stage, now)) in snapshot.stages.iter().zip(totals).enumerate() {
            if stage.queue_depth > rules.queue_depth_max {
                holding.insert((AlertRule::QueueDepth, i), (stage.queue_depth as f64, rules.queue_depth_max as f64));
            }
            let lag_s = stage.lag_us / 1e6;
            if lag_s > rules.lag_s_max {
                holding.insert((AlertRule::Lag, i), (lag_s, rules.lag_s_max));
            }
            if let Some(before) = base.and_then(|b| b.get(i)) {
                let attempts = now.attempts().saturating_sub(before.attempts());
                let failures = now.failures().saturating_sub(before.failures());
                let rate = failures as f64 / attempts.max(1) as f64;
                if attempts >= ERROR_RATE_ATTEMPTS_MIN && rate > rules.error_rate_max {
                    holding.insert((AlertRule::ErrorRate, i), (rate, rules.error_rate_max));
                }
                let events = now.latency_events.saturating_sub(before.latency_events);
                let mean = (now.latency_s - before.latency_s) / events.max(1) as f64;
                if events > 0 && mean > rules.mean_latency_s_max {
                    holding.insert((AlertRule::MeanLatency, i), (mean, rules.mean_latency_s_max));
                }
            }
            // Dead letters: since the last snapshot (or since the start, for the first).
            let seen = last.and_then(|l| l.get(i)).map_or(0, |l| l.dead_lettered);
            if now.dead_lettered > seen {
                self.dead_letter_at[i] = Some(snapshot.uptime_s);
            }
            if rules.dead_letters {
                if let Some(at) = self.dead_letter_at[i] {
                    if snapshot.uptime_s - at < rules.window_s {
                        let recent = base
                            .and_then(|b| b.get(i))
                            .map_or(now.dead_lettered, |b| now.dead_lettered.saturating_sub(b.dead_lettered));
                        holding.insert((AlertRule::DeadLetters, i), (recent.max(1) as f64, 0.0));
                    }
                }
            }
        }
        holding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_thresholds_are_refused_by_name() {
        let cases = [
            (AlertRules { queue_depth_max: 0, ..AlertRules::default() }, "alerts.queue_depth_max"),
            (AlertRules { lag_s_max: -1.0, ..AlertRules::default() }, "alerts.lag_s_max"),
            (AlertRules { error_rate_max: 1.5, ..AlertRules::default() }, "alerts.error_rate_max"),
            (AlertRules { mean_latency_s_max: f64::NAN, ..AlertRules::default() }, "alerts.mean_latency_s_max"),
            (AlertRules { window_s: 0.0, ..AlertRules::default() }, "alerts.window_s"),
        ];
        for (rules, field) in cases {
            let error = rules.validate().expect_err(field).to_string();
            assert!(error.contains(field), "{error}");
        }
        AlertRules::default().validate().expect("the defaults are valid");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let error = toml::from_str::<AlertRules>("lag_max = 3").expect_err("unknown key").to_string();
        assert!(error.contains("lag_max"), "{error}");
    }
}
