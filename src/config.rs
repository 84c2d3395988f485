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
    /// Worker threads in the stage's pool (1..=256).
    workers: usize = 1,
    /// Capacity of the stage's input queue, in batches (1..=65536).
    queue_batches: usize = 64,
    /// Most events per batch sent to the stage (1..=65536).
    batch_events_max: usize = 256,
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
}

impl StageConfig {
    /// Checks every field against [`limits`]; `scope` names the stage in the error.
    pub fn validate(&self, scope: &str) -> Result<(), ConfigError> {
        check_range(scope, "workers", self.workers, 1, limits::WORKERS_MAX)?;
        check_range(scope, "queue_batches", self.queue_batches, 1, limits::QUEUE_BATCHES_MAX)?;
        check_range(scope, "batch_events_max", self.batch_events_max, 1, limits::BATCH_EVENTS_MAX)?;
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
    /// Default worker count for every stage.
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.settings.workers = Some(workers);
        self
    }

    /// Default input queue capacity, in batches.
    #[must_use]
    pub fn queue_batches(mut self, batches: usize) -> Self {
        self.settings.queue_batches = Some(batches);
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
        assert_eq!(payment.workers, 2);
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
        let mut base = EngineSettings { workers: Some(1), batch_events_max: Some(64), ..EngineSettings::default() };
        base.stages.insert("payment".into(), StageSettings { workers: Some(3), ..StageSettings::default() });
        let mut top = EngineSettings { batch_events_max: Some(512), ..EngineSettings::default() };
        top.stages.insert("payment".into(), StageSettings { attempts_max: Some(9), ..StageSettings::default() });
        base.overlay(&top);
        let config = EngineConfig::from_settings(&base).expect("valid");
        assert_eq!((config.defaults().workers, config.defaults().batch_events_max), (1, 512));
        let payment = config.stage("payment");
        assert_eq!((payment.workers, payment.attempts_max, payment.batch_events_max), (3, 9, 512));
    }

    #[test]
    fn oversized_queue_is_refused() {
        let err = EngineConfig::builder().queue_batches(65536).batch_events_max(65536).build();
        assert!(matches!(err, Err(ConfigError::OutOfRange { .. })));
    }
}
