//! Engine configuration: raw settings (serde, TOML) validated once into a typed [`EngineConfig`].
//!
//! Every bound is checked here, at construction, so the engine never meets a zero capacity or an
//! unbounded retry count at run time. Units go last in names (`batch_events_max`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Inclusive bounds of every stage setting, checked by [`StageConfig::validate`].
pub mod limits {
    /// Most worker threads one stage may run.
    pub const WORKERS_MAX: usize = 256;
    /// Most batches one stage's input queue may hold.
    pub const QUEUE_BATCHES_MAX: usize = 1 << 16;
    /// Most events one batch may carry.
    pub const BATCH_EVENTS_MAX: usize = 1 << 16;
    /// Most attempts (first try included) an event may get in one stage.
    pub const ATTEMPTS_MAX: u32 = 100;
    /// Most priority levels one stage may have.
    pub const PRIORITY_LEVELS_MAX: u8 = 8;
    /// Longest retry delay, in milliseconds.
    pub const RETRY_BACKOFF_MS_MAX: u64 = 60_000;
    /// Most events one stage's queue may hold in all (`queue_batches * batch_events_max`).
    pub const QUEUE_EVENTS_MAX: usize = 1 << 26;
    /// Longest time to live, in milliseconds (one day).
    pub const TTL_MS_MAX: u64 = 86_400_000;
    /// Largest lag target of an elastic pool, in milliseconds.
    pub const SCALE_LAG_MS_MAX: u64 = 60_000;
    /// Longest cool-down of an elastic pool, in milliseconds.
    pub const SCALE_COOLDOWN_MS_MAX: u64 = 600_000;
}

/// What a sender does when a stage's input queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Wait for room: backpressure reaches every upstream stage and, in the end, `submit`.
    #[default]
    Block,
    /// Dead-letter the batch that does not fit (reason `overflow`), so a slow subscriber never
    /// holds back its publisher or the other subscribers. Nothing is lost: it waits for redrive.
    DeadLetter,
}

/// How retry delays are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Exactly the exponential delay.
    None,
    /// A uniform delay between zero and the exponential delay ("full jitter"): retries of many
    /// events spread out instead of arriving together.
    #[default]
    Full,
    /// "Decorrelated jitter": each delay is uniform between the base and three times the
    /// previous delay (capped), so delays grow like the exponential but never move in step.
    Decorrelated,
}

/// A stage's worker pool: a fixed size, or elastic between bounds.
///
/// In TOML, `workers = 4` is a fixed pool and `workers = { min = 1, max = 16 }` an elastic one:
/// the engine starts `min` workers and a controller grows the pool while the stage's lag age stays
/// above [`StageConfig::scale_lag_ms`], and shrinks it while workers sit idle (see
/// [`crate::Engine::set_workers`] and BENCHMARKS.md "Elastic pools").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workers {
    /// Workers the pool never goes below (and starts with).
    pub min: usize,
    /// Workers the pool never goes above.
    pub max: usize,
}

impl Workers {
    /// A pool of exactly `n` workers.
    #[must_use]
    pub const fn fixed(n: usize) -> Self {
        Self { min: n, max: n }
    }

    /// A pool between `min` and `max` workers (checked by [`StageConfig::validate`]).
    #[must_use]
    pub const fn elastic(min: usize, max: usize) -> Self {
        Self { min, max }
    }

    /// Whether the pool may change size.
    #[must_use]
    pub const fn is_elastic(self) -> bool {
        self.min != self.max
    }
}

impl From<usize> for Workers {
    fn from(n: usize) -> Self {
        Self::fixed(n)
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_elastic() {
            write!(f, "{{ min = {}, max = {} }}", self.min, self.max)
        } else {
            write!(f, "{}", self.min)
        }
    }
}

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        if self.is_elastic() {
            let mut table = serializer.serialize_struct("Workers", 2)?;
            table.serialize_field("min", &self.min)?;
            table.serialize_field("max", &self.max)?;
            table.end()
        } else {
            serializer.serialize_u64(self.min as u64)
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Workers;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a worker count, or a table `{ min = N, max = M }`")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Workers, E> {
                usize::try_from(n).map(Workers::fixed).map_err(|_| E::custom(format!("{n} workers is too many")))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Workers, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("a worker count cannot be negative ({n})")))
                    .and_then(|n| self.visit_u64(n))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Workers, A::Error> {
                let (mut min, mut max) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let bound = match key.as_str() {
                        "min" => &mut min,
                        "max" => &mut max,
                        other => return Err(serde::de::Error::unknown_field(other, &["min", "max"])),
                    };
                    if bound.is_some() {
                        return Err(serde::de::Error::custom(format!("workers.{key} is given twice")));
                    }
                    let value: i64 = map.next_value()?;
                    *bound = Some(usize::try_from(value).map_err(|_| {
                        serde::de::Error::custom(format!("workers.{key} cannot be negative ({value})"))
                    })?);
                }
                match (min, max) {
                    (Some(min), Some(max)) => Ok(Workers { min, max }),
                    (None, _) => Err(serde::de::Error::missing_field("min")),
                    (_, None) => Err(serde::de::Error::missing_field("max")),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Declares every stage setting once: its name, type, default and documentation. From that list
/// come [`StageConfig`] (validated values), [`StageSettings`] (one stage's optional raw values),
/// [`EngineSettings`] (the `[engine]` table: defaults for every stage, and overrides by stage),
/// and the code that lays one set of raw values over another. A new setting is one line here
/// and its bound in [`StageConfig::validate`].
macro_rules! stage_settings {
    ($( $(#[doc = $doc:expr])* $name:ident : $ty:ty = $default:expr, )*) => {
        /// The settings of one stage's worker pool and input queue, all bounds checked.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct StageConfig {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for StageConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Raw stage settings as written in a file: every field optional, falling back to the
        /// defaults.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct StageSettings {
            $( #[doc = concat!("See [`StageConfig::", stringify!($name), "`].")] pub $name: Option<$ty>, )*
        }

        impl StageSettings {
            /// Lays `other` over these settings: every value `other` sets wins.
            pub fn overlay(&mut self, other: &StageSettings) {
                $( if other.$name.is_some() { self.$name = other.$name; } )*
            }

            fn over(&self, base: StageConfig) -> StageConfig {
                StageConfig { $( $name: self.$name.unwrap_or(base.$name), )* }
            }
        }

        /// Raw engine settings as written in the `[engine]` table of a TOML file.
        ///
        /// ```toml
        /// [engine]
        /// workers = 1              # defaults for every stage
        /// batch_events_max = 256
        ///
        /// [engine.stages.payment]  # overrides for one stage
        /// workers = 2
        /// ```
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct EngineSettings {
            $( #[doc = concat!("Default for every stage: see [`StageConfig::", stringify!($name), "`].")] pub $name: Option<$ty>, )*
            /// Per-stage overrides, by stage name.
            #[serde(default)]
            pub stages: BTreeMap<String, StageSettings>,
        }

        impl EngineSettings {
            /// The defaults for every stage.
            fn defaults(&self) -> StageSettings {
                StageSettings { $( $name: self.$name, )* }
            }

            fn set_defaults(&mut self, defaults: &StageSettings) {
                $( self.$name = defaults.$name; )*
            }
        }
    };
}

stage_settings! {
    /// Worker threads in the stage's pool (1..=256): a count, or `{ min, max }` for an elastic
    /// pool (see [`Workers`]).
    workers: Workers = Workers::fixed(1),
    /// Capacity of the stage's input queue, in batches (1..=65536).
    queue_batches: usize = 64,
    /// Most events per batch sent to the stage (1..=65536).
    batch_events_max: usize = 256,
    /// Adaptive batching: with a value from 1 to `batch_events_max`, the engine's controller
    /// chooses the stage's batch size between the two, starting from `batch_events_max`: it
    /// doubles while the stage is busy (its workers at work more than half the time, or its
    /// queue holding more than two batches) and halves while it is light (at work under a fifth
    /// of the time, its queue under half a batch); 0 (the default) keeps every batch bound at
    /// `batch_events_max`.
    batch_events_min: usize = 0,
    /// Attempts an event gets in this stage before it is dead-lettered (1..=100).
    attempts_max: u32 = 5,
    /// What senders do when the stage's queue is full.
    overflow: Overflow = Overflow::Block,
    /// Priority levels of the stage's queue (1..=8; 1: no priorities). Each level is a queue of
    /// `queue_batches`; workers take from the highest non-empty one.
    priority_levels: u8 = 1,
    /// First retry delay in milliseconds (0: retry at once); each later attempt doubles it.
    retry_backoff_ms_base: u64 = 1,
    /// Longest retry delay in milliseconds (`retry_backoff_ms_base..=60000`).
    retry_backoff_ms_max: u64 = 1_000,
    /// How retry delays are spread.
    retry_jitter: Jitter = Jitter::Full,
    /// Time to live in the stage, in milliseconds (0: none, at most one day): an event that
    /// waited longer than this since it was sent to the stage is dead-lettered as `expired`
    /// instead of handled.
    ttl_ms: u64 = 0,
    /// Elastic pools: the lag age (how long the oldest queued event has waited) above which the
    /// controller grows the pool, in milliseconds (1..=60000); it shrinks the pool only while
    /// the lag stays under half of this and a worker sits idle.
    scale_lag_ms: u64 = 20,
    /// Elastic pools: the least time between two resizes that shrink the pool, and between a
    /// growth and the next shrink, in milliseconds (1..=600000).
    scale_cooldown_ms: u64 = 1_000,
}

impl StageConfig {
    /// Checks every field against [`limits`]; `scope` names the stage in the error.
    pub fn validate(&self, scope: &str) -> Result<(), ConfigError> {
        self.validate_workers(scope)?;
        check_range(scope, "queue_batches", self.queue_batches, 1, limits::QUEUE_BATCHES_MAX)?;
        check_range(scope, "batch_events_max", self.batch_events_max, 1, limits::BATCH_EVENTS_MAX)?;
        check_range(scope, "batch_events_min", self.batch_events_min, 0, self.batch_events_max)?;
        check_range(scope, "attempts_max", self.attempts_max as usize, 1, limits::ATTEMPTS_MAX as usize)?;
        check_range(
            scope,
            "priority_levels",
            usize::from(self.priority_levels),
            1,
            usize::from(limits::PRIORITY_LEVELS_MAX),
        )?;
        check_range(
            scope,
            "retry_backoff_ms_max",
            usize::try_from(self.retry_backoff_ms_max).unwrap_or(usize::MAX),
            usize::try_from(self.retry_backoff_ms_base).unwrap_or(usize::MAX),
            usize::try_from(limits::RETRY_BACKOFF_MS_MAX).unwrap_or(usize::MAX),
        )?;
        check_range(
            scope,
            "ttl_ms",
            usize::try_from(self.ttl_ms).unwrap_or(usize::MAX),
            0,
            usize::try_from(limits::TTL_MS_MAX).unwrap_or(usize::MAX),
        )?;
        if self.ttl_ms > 0 && self.attempts_max > 1 && self.retry_backoff_ms_base >= self.ttl_ms {
            return Err(ConfigError::Invalid(format!(
                "{scope}: retry_backoff_ms_base ({}) must be below ttl_ms ({}): every retry would expire before it ran",
                self.retry_backoff_ms_base, self.ttl_ms
            )));
        }
        let queue_events = self.queue_batches * self.batch_events_max;
        if queue_events > limits::QUEUE_EVENTS_MAX {
            return Err(ConfigError::OutOfRange {
                field: format!("{scope}.queue_batches * batch_events_max"),
                value: queue_events.to_string(),
                min: "1".into(),
                max: limits::QUEUE_EVENTS_MAX.to_string(),
            });
        }
        Ok(())
    }

    fn validate_workers(&self, scope: &str) -> Result<(), ConfigError> {
        let Workers { min, max } = self.workers;
        if self.workers.is_elastic() {
            check_range(scope, "workers.min", min, 1, limits::WORKERS_MAX)?;
            check_range(scope, "workers.max", max, 1, limits::WORKERS_MAX)?;
            if min > max {
                return Err(ConfigError::Invalid(format!("{scope}.workers: min ({min}) is above max ({max})")));
            }
        } else {
            check_range(scope, "workers", min, 1, limits::WORKERS_MAX)?;
        }
        let as_usize = |ms: u64| usize::try_from(ms).unwrap_or(usize::MAX);
        check_range(scope, "scale_lag_ms", as_usize(self.scale_lag_ms), 1, as_usize(limits::SCALE_LAG_MS_MAX))?;
        check_range(
            scope,
            "scale_cooldown_ms",
            as_usize(self.scale_cooldown_ms),
            1,
            as_usize(limits::SCALE_COOLDOWN_MS_MAX),
        )
    }

    /// The most events the stage's input queue holds.
    #[must_use]
    pub fn queue_events_max(&self) -> usize {
        self.queue_batches * self.batch_events_max
    }
}

fn check_range(scope: &str, field: &str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            field: format!("{scope}.{field}"),
            value: value.to_string(),
            min: min.to_string(),
            max: max.to_string(),
        })
    }
}

impl EngineSettings {
    /// Lays `other` over these settings: every value `other` sets wins, stage by stage.
    pub fn overlay(&mut self, other: &EngineSettings) {
        let mut defaults = self.defaults();
        defaults.overlay(&other.defaults());
        self.set_defaults(&defaults);
        for (name, theirs) in &other.stages {
            self.stages.entry(name.clone()).or_default().overlay(theirs);
        }
    }
}

/// The validated engine configuration: stage defaults and per-stage overrides.
///
/// Built by [`EngineConfig::builder`], [`EngineConfig::from_settings`] or
/// [`EngineConfig::from_toml_str`]; every value in it is within [`limits`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EngineConfig {
    defaults: StageConfig,
    stages: BTreeMap<String, StageConfig>,
}

impl EngineConfig {
    /// A builder starting from the defaults.
    #[must_use]
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder { settings: EngineSettings::default() }
    }

    /// Validates raw settings.
    pub fn from_settings(settings: &EngineSettings) -> Result<Self, ConfigError> {
        let defaults = settings.defaults().over(StageConfig::default());
        defaults.validate("engine")?;
        let mut stages = BTreeMap::new();
        for (name, stage) in &settings.stages {
            if name.is_empty() {
                return Err(ConfigError::Invalid("engine.stages: a stage name is empty".into()));
            }
            let config = stage.over(defaults);
            config.validate(&format!("engine.stages.{name}"))?;
            stages.insert(name.clone(), config);
        }
        Ok(Self { defaults, stages })
    }

    /// Parses and validates the `[engine]`-less form: the table's contents at top level.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let settings: EngineSettings = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Self::from_settings(&settings)
    }

    /// The configuration of the stage named `name` (its override, or the defaults).
    #[must_use]
    pub fn stage(&self, name: &str) -> StageConfig {
        self.stages.get(name).copied().unwrap_or(self.defaults)
    }

    /// The defaults every stage without an override gets.
    #[must_use]
    pub fn defaults(&self) -> StageConfig {
        self.defaults
    }

    /// Names of the stages with overrides.
    pub fn overridden_stages(&self) -> impl Iterator<Item = &str> {
        self.stages.keys().map(String::as_str)
    }
}

/// Builds an [`EngineConfig`]; [`build`](Self::build) validates.
#[derive(Debug, Clone)]
pub struct EngineConfigBuilder {
    settings: EngineSettings,
}

impl EngineConfigBuilder {
    /// Default worker pool of every stage: a count, or [`Workers::elastic`].
    #[must_use]
    pub fn workers(mut self, workers: impl Into<Workers>) -> Self {
        self.settings.workers = Some(workers.into());
        self
    }

    /// Default input queue capacity, in batches.
    #[must_use]
    pub fn queue_batches(mut self, batches: usize) -> Self {
        self.settings.queue_batches = Some(batches);
        self
    }

    /// Default adaptive batching floor (see [`StageConfig::batch_events_min`]; 0: off).
    #[must_use]
    pub fn batch_events_min(mut self, events: usize) -> Self {
        self.settings.batch_events_min = Some(events);
        self
    }

    /// Default batch size in events.
    #[must_use]
    pub fn batch_events_max(mut self, events: usize) -> Self {
        self.settings.batch_events_max = Some(events);
        self
    }

    /// Default attempts per event per stage.
    #[must_use]
    pub fn attempts_max(mut self, attempts: u32) -> Self {
        self.settings.attempts_max = Some(attempts);
        self
    }

    /// Overrides for one stage.
    #[must_use]
    pub fn stage(mut self, name: &str, settings: StageSettings) -> Self {
        self.settings.stages.insert(name.to_owned(), settings);
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<EngineConfig, ConfigError> {
        EngineConfig::from_settings(&self.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_no_retry_can_fit_in_is_refused() {
        let refused =
            EngineConfig::from_toml_str("ttl_ms = 50\nretry_backoff_ms_base = 50\n").expect_err("no retry fits");
        assert!(refused.to_string().contains("retry_backoff_ms_base"), "{refused}");
        EngineConfig::from_toml_str("ttl_ms = 50\nretry_backoff_ms_base = 50\nattempts_max = 1\n").expect("no retries");
        EngineConfig::from_toml_str("ttl_ms = 50\nretry_backoff_ms_base = 10\n").expect("room for retries");
        let too_long = EngineConfig::from_toml_str("ttl_ms = 86400001\n").expect_err("over a day");
        assert!(too_long.to_string().contains("ttl_ms"), "{too_long}");
    }

    #[test]
    fn defaults_validate() {
        let config = EngineConfig::builder().build().expect("defaults are valid");
        assert_eq!(config.stage("anything"), StageConfig::default());
    }

    #[test]
    fn stage_override_inherits_unset_fields() {
        let config = EngineConfig::from_toml_str("workers = 2\n[stages.payment]\nbatch_events_max = 64\n")
            .expect("valid config");
        let payment = config.stage("payment");
        assert_eq!(payment.workers, Workers::fixed(2));
        assert_eq!(payment.batch_events_max, 64);
        assert_eq!(config.stage("order").batch_events_max, 256);
    }

    #[test]
    fn zero_capacity_is_refused_with_the_field_named() {
        let err = EngineConfig::builder().queue_batches(0).build().expect_err("zero capacity");
        assert!(err.to_string().contains("engine.queue_batches"), "{err}");
        let err = EngineConfig::from_toml_str("[stages.sms]\nworkers = 0\n").expect_err("zero workers");
        assert!(err.to_string().contains("engine.stages.sms.workers"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = EngineConfig::from_toml_str("wrokers = 2\n").expect_err("typo");
        assert!(matches!(err, ConfigError::Parse(_)));
        assert!(err.to_string().contains("wrokers"), "{err}");
    }

    #[test]
    fn backoff_bounds_are_checked() {
        let err = EngineConfig::from_toml_str("retry_backoff_ms_base = 500\nretry_backoff_ms_max = 100\n")
            .expect_err("max < base");
        assert!(err.to_string().contains("retry_backoff_ms_max"), "{err}");
        let err = EngineConfig::from_toml_str("retry_backoff_ms_max = 600000\n").expect_err("too long");
        assert!(err.to_string().contains("retry_backoff_ms_max"), "{err}");
        let config =
            EngineConfig::from_toml_str("retry_jitter = \"none\"\nretry_backoff_ms_base = 0\n").expect("valid");
        assert_eq!((config.defaults().retry_jitter, config.defaults().retry_backoff_ms_base), (Jitter::None, 0));
    }

    #[test]
    fn overlay_takes_every_value_the_other_side_sets() {
        let mut base =
            EngineSettings { workers: Some(1.into()), batch_events_max: Some(64), ..EngineSettings::default() };
        base.stages.insert("payment".into(), StageSettings { workers: Some(3.into()), ..StageSettings::default() });
        let mut top = EngineSettings { batch_events_max: Some(512), ..EngineSettings::default() };
        top.stages.insert("payment".into(), StageSettings { attempts_max: Some(9), ..StageSettings::default() });
        base.overlay(&top);
        let config = EngineConfig::from_settings(&base).expect("valid");
        assert_eq!((config.defaults().workers, config.defaults().batch_events_max), (Workers::fixed(1), 512));
        let payment = config.stage("payment");
        assert_eq!((payment.workers, payment.attempts_max, payment.batch_events_max), (Workers::fixed(3), 9, 512));
    }

    #[test]
    fn an_elastic_pool_is_read_and_its_bad_bounds_are_refused_by_name() {
        let config = EngineConfig::from_toml_str("[stages.email]\nworkers = { min = 1, max = 16 }\n").expect("valid");
        assert_eq!(config.stage("email").workers, Workers::elastic(1, 16));
        assert!(config.stage("email").workers.is_elastic());
        assert_eq!(config.stage("order").workers, Workers::fixed(1));
        let refused = |text: &str, named: &str| {
            let err = EngineConfig::from_toml_str(text).expect_err(text);
            assert!(err.to_string().contains(named), "{text}: {err}");
        };
        refused(
            "[stages.email]\nworkers = { min = 4, max = 2 }\n",
            "engine.stages.email.workers: min (4) is above max (2)",
        );
        refused("[stages.email]\nworkers = { min = 1, max = 300 }\n", "engine.stages.email.workers.max = 300");
        refused("[stages.email]\nworkers = { min = 0, max = 4 }\n", "engine.stages.email.workers.min = 0");
        refused("workers = { min = 1, maximum = 4 }\n", "unknown field `maximum`");
        refused("workers = { min = 1 }\n", "missing field `max`");
        refused("workers = { min = -1, max = 4 }\n", "workers.min cannot be negative");
        refused("workers = -2\n", "cannot be negative");
        refused("workers = { min = 1, max = 4 }\nscale_lag_ms = 0\n", "engine.scale_lag_ms = 0");
        refused("workers = { min = 1, max = 4 }\nscale_cooldown_ms = 0\n", "engine.scale_cooldown_ms = 0");
        let text =
            toml::to_string(&StageSettings { workers: Some(Workers::elastic(2, 8)), ..StageSettings::default() })
                .expect("serializes");
        let back: StageSettings = toml::from_str(&text).expect("reads back");
        assert_eq!(back.workers, Some(Workers::elastic(2, 8)), "{text}");
    }

    #[test]
    fn an_adaptive_batch_needs_its_min_within_its_max() {
        let config = EngineConfig::from_toml_str("batch_events_min = 16\nbatch_events_max = 1024\n").expect("valid");
        assert_eq!((config.defaults().batch_events_min, config.defaults().batch_events_max), (16, 1024));
        let err =
            EngineConfig::from_toml_str("batch_events_min = 512\nbatch_events_max = 64\n").expect_err("min > max");
        assert!(err.to_string().contains("engine.batch_events_min = 512 is out of range (allowed: 0 to 64)"), "{err}");
    }

    #[test]
    fn oversized_queue_is_refused() {
        let err = EngineConfig::builder().queue_batches(65536).batch_events_max(65536).build();
        assert!(matches!(err, Err(ConfigError::OutOfRange { .. })));
    }
}
