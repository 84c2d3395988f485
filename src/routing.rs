//! A topic exchange with RabbitMQ's semantics, compiled so routing on the hot path is a table
//! look-up.
//!
//! Routing keys are words separated by `.` (a word may be empty: `a..b` has three words, `a.` two),
//! except the empty key, which has none: RabbitMQ's own topic exchange reads it so, and the test
//! against a real broker (`crates/bridge/tests/topic_exchange.rs`) found `*`, `#.` and `.#`
//! matching `""` here and not there. A binding pattern's words match literally, except `*`,
//! which matches exactly one word, and `#`, which matches zero or more words. A word like `a*` is
//! literal, as in RabbitMQ.
//!
//! Bindings are fixed when the exchange is built; so are the routing keys publishers will use
//! ([`ExchangeBuilder::key`]), each of which gets a [`RouteId`] whose destinations are computed
//! once. Publishing by `RouteId` then costs one slice look-up. [`Exchange::matching`] routes any
//! other key by matching every binding (the slow path, for keys met at run time).

use std::fmt;

use rustc_hash::FxHashMap;

/// Longest routing key or pattern, in bytes (RabbitMQ's limit).
pub const KEY_BYTES_MAX: usize = 255;

/// A routing key interned when the exchange was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(u32);

impl RouteId {
    /// Its index in the exchange's table.
    #[must_use]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A key or pattern that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoutingError {
    /// Longer than [`KEY_BYTES_MAX`].
    #[error("{what} {text:?} is {len} bytes; at most {KEY_BYTES_MAX} allowed")]
    TooLong {
        /// "routing key" or "binding pattern".
        what: &'static str,
        /// The start of it.
        text: String,
        /// Its length.
        len: usize,
    },
    /// More keys than a [`RouteId`] can number.
    #[error("too many routing keys")]
    TooManyKeys,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    One,
    Any,
    Literal(Box<str>),
}

/// A compiled binding pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    words: Vec<Word>,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

/// The words of a key or pattern: none for the empty one, as RabbitMQ splits them.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split('.').take(if text.is_empty() { 0 } else { usize::MAX })
}

fn check_len(what: &'static str, text: &str) -> Result<(), RoutingError> {
    if text.len() > KEY_BYTES_MAX {
        let cut = text.char_indices().nth(32).map_or(text.len(), |(i, _)| i);
        return Err(RoutingError::TooLong { what, text: text[..cut].to_owned(), len: text.len() });
    }
    Ok(())
}

impl Pattern {
    /// Compiles a binding pattern.
    pub fn new(text: &str) -> Result<Self, RoutingError> {
        check_len("binding pattern", text)?;
        let words = words(text)
            .map(|w| match w {
                "*" => Word::One,
                "#" => Word::Any,
                literal => Word::Literal(literal.into()),
            })
            .collect();
        Ok(Self { text: text.into(), words })
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `key` matches, with RabbitMQ's topic semantics.
    #[must_use]
    pub fn matches(&self, key: &str) -> bool {
        let key: Vec<&str> = words(key).collect();
        let k = key.len();
        // reach[j]: the first i pattern words can match the first j key words.
        let mut reach = vec![false; k + 1];
        reach[0] = true;
        for word in &self.words {
            let mut next = vec![false; k + 1];
            match word {
                Word::Any => {
                    let mut any = false;
                    for j in 0..=k {
                        any |= reach[j];
                        next[j] = any;
                    }
                }
                Word::One => next[1..=k].copy_from_slice(&reach[..k]),
                Word::Literal(literal) => {
                    for j in 0..k {
                        next[j + 1] = reach[j] && key[j] == &**literal;
                    }
                }
            }
            reach = next;
        }
        reach[k]
    }
}

/// Declares bindings and the routing keys publishers will use.
#[derive(Debug, Clone)]
#[must_use]
pub struct ExchangeBuilder<Q> {
    bindings: Vec<(Pattern, Q)>,
    keys: Vec<String>,
}

impl<Q> Default for ExchangeBuilder<Q> {
    fn default() -> Self {
        Self { bindings: Vec::new(), keys: Vec::new() }
    }
}

impl<Q: Copy + PartialEq> ExchangeBuilder<Q> {
    /// An exchange with no bindings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `queue` with `pattern`. Binding a queue twice with patterns that both match a key
    /// still delivers the event to it once.
    pub fn bind(&mut self, pattern: &str, queue: Q) -> Result<&mut Self, RoutingError> {
        self.bindings.push((Pattern::new(pattern)?, queue));
        Ok(self)
    }

    /// Declares a routing key publishers will use; returns its id (the same id for the same key).
    pub fn key(&mut self, key: &str) -> Result<RouteId, RoutingError> {
        check_len("routing key", key)?;
        if let Some(index) = self.keys.iter().position(|k| k == key) {
            return Ok(RouteId(u32::try_from(index).map_err(|_| RoutingError::TooManyKeys)?));
        }
        let id = RouteId(u32::try_from(self.keys.len()).map_err(|_| RoutingError::TooManyKeys)?);
        self.keys.push(key.to_owned());
        Ok(id)
    }

    /// Compiles every declared key's destinations.
    #[must_use]
    pub fn build(self) -> Exchange<Q> {
        let table = self.keys.iter().map(|key| destinations(&self.bindings, key)).collect();
        let ids = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), RouteId(u32::try_from(i).unwrap_or(u32::MAX))))
            .collect();
        Exchange { bindings: self.bindings, keys: self.keys, ids, table }
    }
}

fn destinations<Q: Copy + PartialEq>(bindings: &[(Pattern, Q)], key: &str) -> Box<[Q]> {
    let mut queues: Vec<Q> = Vec::new();
    for (pattern, queue) in bindings {
        if !queues.contains(queue) && pattern.matches(key) {
            queues.push(*queue);
        }
    }
    queues.into_boxed_slice()
}

/// A built exchange: routing a declared key is a table look-up.
#[derive(Debug, Clone)]
pub struct Exchange<Q> {
    bindings: Vec<(Pattern, Q)>,
    keys: Vec<String>,
    ids: FxHashMap<String, RouteId>,
    table: Vec<Box<[Q]>>,
}

impl<Q: Copy + PartialEq> Exchange<Q> {
    /// The queues bound to a declared key, in binding order: the hot path.
    #[must_use]
    pub fn destinations(&self, route: RouteId) -> &[Q] {
        self.table.get(route.index()).map_or(&[], |q| q)
    }

    /// The id of a declared key.
    #[must_use]
    pub fn route_id(&self, key: &str) -> Option<RouteId> {
        self.ids.get(key).copied()
    }

    /// The key of a route.
    #[must_use]
    pub fn key(&self, route: RouteId) -> Option<&str> {
        self.keys.get(route.index()).map(String::as_str)
    }

    /// Routes any key by matching every binding (the slow path).
    #[must_use]
    pub fn matching(&self, key: &str) -> Vec<Q> {
        destinations(&self.bindings, key).into_vec()
    }

    /// Declared keys that reach no queue: events published with them would be unroutable.
    pub fn unroutable_keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().zip(&self.table).filter(|(_, q)| q.is_empty()).map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ topic semantics, case by case (pattern, key, matches).
    const CASES: &[(&str, &str, bool)] = &[
        ("#", "", true),
        ("#", "a", true),
        ("#", "a.b.c", true),
        ("#", ".", true),
        ("*", "", false),
        ("*", "a", true),
        ("*", "a.b", false),
        ("*", ".", false),
        ("", "", true),
        ("", "a", false),
        ("a.#", "a", true),
        ("a.#", "a.b", true),
        ("a.#", "a.b.c", true),
        ("a.#", "b.a", false),
        ("a.#", "ab", false),
        ("#.a", "a", true),
        ("#.a", "b.a", true),
        ("#.a", "b.c.a", true),
        ("#.a", "a.b", false),
        ("#.#", "", true),
        ("#.#", "a.b.c", true),
        ("#.#.#", "a", true),
        ("a.#.b", "a.b", true),
        ("a.#.b", "a.x.b", true),
        ("a.#.b", "a.x.y.b", true),
        ("a.#.b", "a.b.c", false),
        ("a.#.b", "a", false),
        ("a.#.#.b", "a.b", true),
        ("*.b.*", "a.b.c", true),
        ("*.b.*", "b.c", false),
        ("*.b.*", "a.b", false),
        ("a.*.c", "a..c", true),
        ("a..c", "a..c", true),
        ("a..c", "a.b.c", false),
        ("*.#", "", false),
        ("*.#", "a.b", true),
        ("#.*", "", false),
        ("#.", "", false),
        (".#", "", false),
        ("#.", ".", true),
        ("", ".", false),
        ("#.*.#", "a", true),
        ("#.*", "a.b", true),
        ("a.b", "a.b.", false),
        ("a.b.*", "a.b.", true),
        ("*.*", "a", false),
        ("*.*", "a.b", true),
        ("*.*", ".", true),
        ("a*", "ab", false),
        ("a*", "a*", true),
        ("order.payment.process", "order.payment.process", true),
        ("order.*.process", "order.payment.process", true),
        ("order.#", "order.payment.process", true),
        ("*.payment.*", "order.payment.process", true),
        ("#.process", "order.payment.process", true),
        ("order.payment", "order.payment.process", false),
        ("order.*", "order.payment.process", false),
        ("order.#.process.#", "order.payment.process", true),
    ];

    #[test]
    fn topic_semantics_match_rabbitmq_case_by_case() {
        for &(pattern, key, expected) in CASES {
            let compiled = Pattern::new(pattern).expect("valid pattern");
            assert_eq!(compiled.matches(key), expected, "pattern {pattern:?} key {key:?}");
        }
    }

    #[test]
    fn declared_keys_route_through_the_table_like_the_slow_path() {
        let mut builder = ExchangeBuilder::new();
        builder.bind("order.*.process", 1u16).expect("valid");
        builder.bind("order.#", 2).expect("valid");
        builder.bind("#.email.#", 3).expect("valid");
        builder.bind("order.payment.*", 1).expect("valid"); // queue 1 again: delivered once
        let payment = builder.key("order.payment.process").expect("valid");
        let email = builder.key("order.email.send").expect("valid");
        let lost = builder.key("user.deleted").expect("valid");
        assert_eq!(builder.key("order.email.send"), Ok(email), "the same key, the same id");
        let exchange = builder.build();
        assert_eq!(exchange.destinations(payment), &[1, 2]);
        assert_eq!(exchange.destinations(email), &[2, 3]);
        assert!(exchange.destinations(lost).is_empty());
        assert_eq!(exchange.unroutable_keys().collect::<Vec<_>>(), ["user.deleted"]);
        for route in [payment, email, lost] {
            let key = exchange.key(route).expect("declared");
            assert_eq!(exchange.matching(key), exchange.destinations(route));
            assert_eq!(exchange.route_id(key), Some(route));
        }
        assert_eq!(exchange.matching("order.refund"), vec![2]);
    }

    #[test]
    fn overlong_keys_and_patterns_are_refused() {
        let long = "a.".repeat(200);
        assert!(matches!(Pattern::new(&long), Err(RoutingError::TooLong { .. })));
        assert!(matches!(ExchangeBuilder::<u8>::new().key(&long), Err(RoutingError::TooLong { .. })));
    }

    #[test]
    fn a_key_of_exactly_the_limit_is_taken_and_one_byte_more_is_not() {
        let at_limit = "k".repeat(KEY_BYTES_MAX);
        assert!(Pattern::new(&at_limit).is_ok());
        assert!(ExchangeBuilder::<u8>::new().key(&at_limit).is_ok());
        let over = "k".repeat(KEY_BYTES_MAX + 1);
        assert!(matches!(Pattern::new(&over), Err(RoutingError::TooLong { len, .. }) if len == KEY_BYTES_MAX + 1));
    }

    #[test]
    fn a_pattern_shows_itself_as_written() {
        let pattern = Pattern::new("order.*.#").expect("a valid pattern");
        assert_eq!(pattern.as_str(), "order.*.#");
        assert_eq!(format!("{pattern:?}"), "Pattern(\"order.*.#\")");
    }
}
