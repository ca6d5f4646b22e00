//! Topic routing: which queues a task goes to, decided exactly as a RabbitMQ
//! topic exchange would decide it.
//!
//! Owns the `[routing]` settings, their validation into a [`TopicRouter`], the
//! default routing rule ([`default_routing_key`]) and topic matching
//! ([`topic_matches`]). On AMQP the broker routes by itself; taskgate still
//! computes the matching queues so that the outbox can keep FIFO order per
//! queue, the 202 response can say where a task goes, and an unroutable task
//! is refused up front. On SQS, which has no exchanges, this routing *is* the
//! routing: one copy per matching queue, as kombu does.
//!
//! Invariants of a built [`TopicRouter`]:
//! - the exchange name is one RabbitMQ will let taskgate declare (non-empty,
//!   at most 255 bytes, not in the reserved `amq.` namespace);
//! - there is at least one queue, queue names are valid [`QueueName`]s,
//!   unique, and not in the reserved `amq.` namespace;
//! - every binding key is a well-formed topic pattern (see
//!   [`validate_binding_key`]);
//! - queues keep their configuration order, which is the order [`TopicRouter::route`]
//!   reports matches in.

use super::{QueueName, TaskName};
use serde::{Deserialize, Serialize};

/// Exchange Celery deployments of the platform publish to.
pub const DEFAULT_EXCHANGE: &str = "task_exchange";
/// Queue a stock Celery worker consumes when given no queue settings.
pub const DEFAULT_QUEUE: &str = "celery";
/// AMQP 0-9-1 carries exchange names and routing keys as `shortstr`.
pub const MAX_KEY_BYTES: usize = 255;
/// Names RabbitMQ reserves: declaring one is refused with ACCESS_REFUSED,
/// which would otherwise surface only at the first connect.
const RESERVED_PREFIX: &str = "amq.";

fn default_exchange() -> String {
    DEFAULT_EXCHANGE.to_owned()
}

fn default_queues() -> Vec<QueueBindingSettings> {
    // `#` matches every routing key, so with no routing configured a stock
    // Celery worker (which consumes `celery`) gets every task.
    vec![QueueBindingSettings {
        name: DEFAULT_QUEUE.to_owned(),
        binding_key: "#".to_owned(),
    }]
}

/// The `[routing]` section as written in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutingSettings {
    #[serde(default = "default_exchange")]
    pub exchange: String,
    #[serde(default = "default_queues")]
    pub queues: Vec<QueueBindingSettings>,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            exchange: default_exchange(),
            queues: default_queues(),
        }
    }
}

/// One `[[routing.queues]]` entry: a queue bound to the exchange with a
/// topic pattern.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueBindingSettings {
    pub name: String,
    pub binding_key: String,
}

/// A `[routing]` section that cannot be used. Queue errors name the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingConfigError {
    #[error("routing.exchange {exchange:?} is invalid: {reason}")]
    InvalidExchange { exchange: String, reason: String },
    #[error(
        "routing.queues is empty: every task would be unroutable; \
         bind at least one queue (e.g. name = \"celery\", binding_key = \"#\")"
    )]
    NoQueues,
    #[error("routing.queues[{index}]: invalid queue name {queue:?}: {reason}")]
    InvalidQueueName {
        index: usize,
        queue: String,
        reason: String,
    },
    #[error("routing.queues: queue {queue:?} is listed more than once")]
    DuplicateQueue { queue: String },
    #[error("routing.queues: queue {queue:?} has an invalid binding_key {binding_key:?}: {reason}")]
    InvalidBindingKey {
        queue: String,
        binding_key: String,
        reason: String,
    },
}

/// A validated queue binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueBinding {
    queue: QueueName,
    binding_key: String,
}

impl QueueBinding {
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }

    pub fn binding_key(&self) -> &str {
        &self.binding_key
    }

    /// Whether a message with this routing key reaches this queue.
    pub fn matches(&self, routing_key: &str) -> bool {
        topic_matches(&self.binding_key, routing_key)
    }
}

/// The validated topology: one topic exchange and the queues bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRouter {
    exchange: String,
    queues: Vec<QueueBinding>,
}

impl Default for TopicRouter {
    /// The embedded default: `task_exchange` with `celery` bound `#`.
    fn default() -> Self {
        TopicRouter::from_settings(&RoutingSettings::default()).expect("the built-in routing defaults are valid")
    }
}

impl TopicRouter {
    /// Validates the settings and builds the router. The first problem found
    /// is returned, naming the queue.
    pub fn from_settings(settings: &RoutingSettings) -> Result<TopicRouter, RoutingConfigError> {
        validate_exchange_name(&settings.exchange).map_err(|reason| RoutingConfigError::InvalidExchange {
            exchange: settings.exchange.clone(),
            reason,
        })?;
        if settings.queues.is_empty() {
            return Err(RoutingConfigError::NoQueues);
        }

        let mut queues: Vec<QueueBinding> = Vec::with_capacity(settings.queues.len());
        for (index, entry) in settings.queues.iter().enumerate() {
            let invalid_name = |reason: String| RoutingConfigError::InvalidQueueName {
                index,
                queue: entry.name.clone(),
                reason,
            };
            let queue = QueueName::parse(&entry.name).map_err(invalid_name)?;
            if entry.name.starts_with(RESERVED_PREFIX) {
                return Err(invalid_name(format!(
                    "names starting with {RESERVED_PREFIX:?} are reserved by RabbitMQ"
                )));
            }
            // A handful of queues: a linear scan keeps configuration order
            // without a second structure.
            if queues.iter().any(|existing| existing.queue == queue) {
                return Err(RoutingConfigError::DuplicateQueue {
                    queue: entry.name.clone(),
                });
            }
            validate_binding_key(&entry.binding_key).map_err(|reason| RoutingConfigError::InvalidBindingKey {
                queue: entry.name.clone(),
                binding_key: entry.binding_key.clone(),
                reason,
            })?;
            queues.push(QueueBinding {
                queue,
                binding_key: entry.binding_key.clone(),
            });
        }
        Ok(TopicRouter {
            exchange: settings.exchange.clone(),
            queues,
        })
    }

    /// The topic exchange tasks are published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Every configured queue with its binding key, in configuration order.
    pub fn queues(&self) -> &[QueueBinding] {
        &self.queues
    }

    /// All queues whose binding key matches `routing_key`, in configuration
    /// order. Empty means the task is unroutable.
    pub fn route(&self, routing_key: &str) -> Vec<QueueName> {
        self.queues
            .iter()
            .filter(|binding| binding.matches(routing_key))
            .map(|binding| binding.queue.clone())
            .collect()
    }

    /// Same as the module-level [`default_routing_key`]; here so that code
    /// holding a router finds the rule next to [`TopicRouter::route`].
    pub fn default_routing_key(task: &TaskName) -> String {
        default_routing_key(task)
    }
}

/// The platform's convention for a task without a routing key: the task
/// name up to the first `.` (`export.project` → `export`), or the whole name
/// when it has no dot.
pub fn default_routing_key(task: &TaskName) -> String {
    let name = task.as_str();
    match name.split_once('.') {
        Some((first_word, _)) => first_word.to_owned(),
        None => name.to_owned(),
    }
}

/// Checks a routing key a message is published with: at most 255 bytes,
/// and no `*` or `#`. RabbitMQ would accept those characters literally, but
/// in a routing key they are always a pattern pasted by mistake, and they
/// would make SQS routing (done here) and AMQP routing look like they differ.
pub fn validate_routing_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "routing key is {} bytes; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        ));
    }
    if key.contains(['*', '#']) {
        return Err(format!(
            "routing key {key:?} contains '*' or '#'; those are only meaningful in binding keys"
        ));
    }
    Ok(())
}

/// Checks a binding key: at most 255 bytes, words separated by `.`, each
/// word `*`, `#` or non-empty text with no `*` or `#` in it.
///
/// RabbitMQ itself accepts empty words (`a..b`, or the empty key, which
/// matches only the empty routing key) and treats `a*` as a literal word;
/// in a configuration file each of those is a typo far more often than an
/// intent, so they are refused here.
pub fn validate_binding_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "binding key is {} bytes; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        ));
    }
    for (position, word) in key.split('.').enumerate() {
        let word_number = position + 1;
        if word.is_empty() {
            return Err(format!(
                "word {word_number} is empty; words are separated by single '.' \
                 (use \"#\" to match every routing key)"
            ));
        }
        if word != "*" && word != "#" && word.contains(['*', '#']) {
            return Err(format!(
                "word {word_number} ({word:?}) mixes text with '*' or '#'; \
                 a wildcard must be a whole word"
            ));
        }
    }
    Ok(())
}

/// Splits a key into words as RabbitMQ does: on every `.`, keeping empty
/// words, except that the empty key has no words at all (so `#` matches it
/// and `*` does not).
fn topic_words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// AMQP topic matching: `*` matches exactly one word, `#` matches zero or
/// more words, any other word matches itself. Works for any pair of
/// strings, including patterns [`validate_binding_key`] would refuse, with
/// RabbitMQ's results.
pub fn topic_matches(binding_key: &str, routing_key: &str) -> bool {
    let pattern = topic_words(binding_key);
    let words = topic_words(routing_key);

    // Dynamic programming over suffixes, one pattern word at a time from the
    // end: `rest_matches[j]` says whether the pattern words after the current
    // one match `words[j..]`. O(pattern × words) time, no backtracking blowup
    // on patterns like `#.#.#.#.x`.
    let mut rest_matches = vec![false; words.len() + 1];
    rest_matches[words.len()] = true; // the empty pattern matches only nothing
    for pattern_word in pattern.iter().rev() {
        let mut here = vec![false; words.len() + 1];
        for j in (0..=words.len()).rev() {
            here[j] = match *pattern_word {
                // `#` either stops here (zero more words) or swallows one
                // word and may continue swallowing.
                "#" => rest_matches[j] || (j < words.len() && here[j + 1]),
                "*" => j < words.len() && rest_matches[j + 1],
                literal => j < words.len() && words[j] == literal && rest_matches[j + 1],
            };
        }
        rest_matches = here;
    }
    rest_matches[0]
}

fn validate_exchange_name(exchange: &str) -> Result<(), String> {
    if exchange.is_empty() {
        // The nameless default exchange is direct, not topic: binding keys
        // would silently mean nothing.
        return Err("the exchange name must not be empty".to_owned());
    }
    if exchange.len() > MAX_KEY_BYTES {
        return Err(format!(
            "the exchange name is {} bytes; at most {MAX_KEY_BYTES} are allowed",
            exchange.len()
        ));
    }
    if exchange.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the exchange name must not contain whitespace or control characters".into());
    }
    if exchange.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "names starting with {RESERVED_PREFIX:?} are reserved by RabbitMQ"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queue(name: &str, binding_key: &str) -> QueueBindingSettings {
        QueueBindingSettings {
            name: name.to_owned(),
            binding_key: binding_key.to_owned(),
        }
    }

    fn router(queues: &[(&str, &str)]) -> Result<TopicRouter, RoutingConfigError> {
        TopicRouter::from_settings(&RoutingSettings {
            exchange: DEFAULT_EXCHANGE.to_owned(),
            queues: queues.iter().map(|(n, k)| queue(n, k)).collect(),
        })
    }

    fn names(queues: &[QueueName]) -> Vec<&str> {
        queues.iter().map(QueueName::as_str).collect()
    }

    // ---- topic matching ----

    #[test]
    fn wildcard_semantics_from_the_brief() {
        let cases = [
            ("#", "", true),
            ("#", "a.b", true),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("*.b", "b", false),
            ("a.*.c", "a.x.c", true),
            ("a.*.c", "a.c", false),
            ("#.c", "c", true),
            ("#.c", "a.b.c", true),
        ];
        for (binding, routing, expected) in cases {
            assert_eq!(topic_matches(binding, routing), expected, "{binding:?} vs {routing:?}");
        }
    }

    #[test]
    fn more_edge_cases() {
        let cases = [
            ("a", "a", true),
            ("a", "b", false),
            ("a", "a.b", false),
            ("a.b", "a", false),
            ("*", "", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("#.#", "", true),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y.c", false),
            ("#.a.#", "x.a", true),
            ("#.a.#", "x.y", false),
            ("*.#", "", false),
            ("#.*", "a", true),
            ("#.*.#.*", "a", false),
            ("#.*.#.*", "a.b", true),
            // Empty words, as RabbitMQ splits them.
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            ("a.", "a.", true),
            ("a.#", "a.", true),
            ("*", ".", false),
            ("*.*", ".", true),
            ("", "", true),
            ("", "a", false),
            // Case-sensitive, byte-exact words.
            ("Export", "export", false),
            ("экспорт.#", "экспорт.проект", true),
        ];
        for (binding, routing, expected) in cases {
            assert_eq!(topic_matches(binding, routing), expected, "{binding:?} vs {routing:?}");
        }
    }

    #[test]
    fn many_hashes_stay_fast_and_correct() {
        let pattern = vec!["#"; 60].join(".") + ".z";
        let key = vec!["a"; 120].join(".");
        assert!(!topic_matches(&pattern, &key));
        assert!(topic_matches(&pattern, &(key + ".z")));
    }

    /// RabbitMQ's own table, from `test_topic_matching` in
    /// rabbitmq-server's unit tests: bindings t1..t26 and, for each routing
    /// key, the exact set of bindings that must match.
    #[test]
    fn rabbitmq_topic_matching_table() {
        let bindings: &[(&str, &str)] = &[
            ("t1", "a.b.c"),
            ("t2", "a.*.c"),
            ("t3", "a.#.b"),
            ("t4", "a.b.b.c"),
            ("t5", "#"),
            ("t6", "#.#"),
            ("t7", "#.b"),
            ("t8", "*.*"),
            ("t9", "a.*"),
            ("t10", "*.b.c"),
            ("t11", "a.#"),
            ("t12", "a.#.#"),
            ("t13", "b.b.c"),
            ("t14", "a.b.b"),
            ("t15", "a.b"),
            ("t16", "b.c"),
            ("t17", ""),
            ("t18", "*.*.*"),
            ("t19", "vodka.martini"),
            ("t20", "a.b.c"),
            ("t21", "*.#"),
            ("t22", "#.*.#"),
            ("t23", "*.#.#"),
            ("t24", "#.#.#"),
            ("t25", "*"),
            ("t26", "#.b.#"),
        ];
        let expectations: &[(&str, &[&str])] = &[
            (
                "a.b.c",
                &[
                    "t1", "t2", "t5", "t6", "t10", "t11", "t12", "t18", "t20", "t21", "t22", "t23", "t24", "t26",
                ],
            ),
            (
                "a.b",
                &[
                    "t3", "t5", "t6", "t7", "t8", "t9", "t11", "t12", "t15", "t21", "t22", "t23", "t24", "t26",
                ],
            ),
            (
                "a.b.b",
                &[
                    "t3", "t5", "t6", "t7", "t11", "t12", "t14", "t18", "t21", "t22", "t23", "t24", "t26",
                ],
            ),
            ("", &["t5", "t6", "t17", "t24"]),
            ("b.c.c", &["t5", "t6", "t18", "t21", "t22", "t23", "t24", "t26"]),
            ("a.a.a.a.a", &["t5", "t6", "t11", "t12", "t21", "t22", "t23", "t24"]),
            ("vodka.gin", &["t5", "t6", "t8", "t21", "t22", "t23", "t24"]),
            ("vodka.martini", &["t5", "t6", "t8", "t19", "t21", "t22", "t23", "t24"]),
            (
                "b.b.c",
                &["t5", "t6", "t10", "t13", "t18", "t21", "t22", "t23", "t24", "t26"],
            ),
            ("nothing.here.at.all", &["t5", "t6", "t21", "t22", "t23", "t24"]),
            ("oneword", &["t5", "t6", "t21", "t22", "t23", "t24", "t25"]),
        ];
        for (routing_key, expected) in expectations {
            let matched: Vec<&str> = bindings
                .iter()
                .filter(|(_, binding_key)| topic_matches(binding_key, routing_key))
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(&matched, expected, "routing key {routing_key:?}");
        }
    }

    // ---- key validation ----

    #[test]
    fn binding_keys_are_validated() {
        for good in [
            "#",
            "*",
            "export",
            "a.b.c",
            "a.*.c",
            "a.#",
            "#.a",
            "*.#",
            "plat-form_1:x",
        ] {
            assert!(validate_binding_key(good).is_ok(), "{good:?}");
        }
        for bad in ["", ".", "a.", ".a", "a..b", "a*", "*a", "a#", "a.b#.c", "**", "##"] {
            assert!(validate_binding_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_binding_key(&"a".repeat(255)).is_ok());
        assert!(validate_binding_key(&"a".repeat(256)).is_err());
    }

    #[test]
    fn routing_keys_are_validated() {
        for good in ["", "export", "a.b.c", "a..b", &"x".repeat(255)] {
            assert!(validate_routing_key(good).is_ok(), "{good:?}");
        }
        for bad in ["a.*", "#", "a.#.b", &"x".repeat(256)] {
            assert!(validate_routing_key(bad).is_err(), "{bad:?}");
        }
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        assert!(validate_routing_key(&"é".repeat(128)).is_err());
    }

    // ---- default routing rule ----

    #[test]
    fn default_routing_key_is_the_first_word_of_the_task_name() {
        let key = |name: &str| default_routing_key(&TaskName::parse(name).unwrap());
        assert_eq!(key("export.project"), "export");
        assert_eq!(key("platform.tasks.sync.run"), "platform");
        assert_eq!(key("cleanup"), "cleanup");
        assert_eq!(key(".hidden"), "");
        let name = TaskName::parse("export.project").unwrap();
        assert_eq!(TopicRouter::default_routing_key(&name), "export");
    }

    // ---- settings and router ----

    #[test]
    fn defaults_route_everything_to_celery() {
        let settings: RoutingSettings = serde_json::from_value(json!({})).unwrap();
        assert_eq!(settings, RoutingSettings::default());
        let router = TopicRouter::from_settings(&settings).unwrap();
        assert_eq!(router, TopicRouter::default());
        assert_eq!(router.exchange(), "task_exchange");
        assert_eq!(router.queues().len(), 1);
        assert_eq!(router.queues()[0].queue().as_str(), "celery");
        assert_eq!(router.queues()[0].binding_key(), "#");
        for key in ["", "export", "a.b.c"] {
            assert_eq!(names(&router.route(key)), ["celery"]);
        }
    }

    #[test]
    fn design_example_routes_export_to_two_queues_in_order() {
        let toml = r##"
            exchange = "task_exchange"

            [[queues]]
            name = "export"
            binding_key = "export"

            [[queues]]
            name = "platform.fifo"
            binding_key = "#"
        "##;
        let settings: RoutingSettings =
            figment::Figment::from(<figment::providers::Toml as figment::providers::Format>::string(toml))
                .extract()
                .unwrap();
        let router = TopicRouter::from_settings(&settings).unwrap();
        let task = TaskName::parse("export.project").unwrap();
        assert_eq!(
            names(&router.route(&default_routing_key(&task))),
            ["export", "platform.fifo"]
        );
        assert_eq!(names(&router.route("reports")), ["platform.fifo"]);
    }

    #[test]
    fn route_reports_every_match_in_configuration_order() {
        let router = router(&[("zeta", "a.#"), ("alpha", "*.b"), ("mid", "c"), ("all", "#")]).unwrap();
        assert_eq!(names(&router.route("a.b")), ["zeta", "alpha", "all"]);
        assert_eq!(names(&router.route("c")), ["mid", "all"]);
        let only_exact = self::router(&[("export", "export")]).unwrap();
        assert!(only_exact.route("reports").is_empty());
    }

    #[test]
    fn settings_reject_unknown_keys_and_need_a_binding_key() {
        assert!(serde_json::from_value::<RoutingSettings>(json!({"exchnage": "x"})).is_err());
        assert!(serde_json::from_value::<QueueBindingSettings>(
            json!({"name": "q", "binding_key": "#", "durable": true})
        )
        .is_err());
        assert!(serde_json::from_value::<QueueBindingSettings>(json!({"name": "q"})).is_err());
    }

    #[test]
    fn exchange_must_be_usable() {
        for bad in ["", "amq.topic", "task exchange", "x\n", &"x".repeat(256)] {
            let error = TopicRouter::from_settings(&RoutingSettings {
                exchange: bad.to_owned(),
                queues: default_queues(),
            })
            .unwrap_err();
            assert!(
                matches!(&error, RoutingConfigError::InvalidExchange { exchange, .. } if exchange == bad),
                "{bad:?} gave {error:?}"
            );
        }
    }

    #[test]
    fn queues_must_not_be_empty() {
        assert_eq!(router(&[]).unwrap_err(), RoutingConfigError::NoQueues);
    }

    #[test]
    fn invalid_queue_names_are_rejected_with_their_index() {
        let error = router(&[("ok", "#"), ("bad queue", "#")]).unwrap_err();
        assert!(matches!(
            &error,
            RoutingConfigError::InvalidQueueName { index: 1, queue, .. } if queue == "bad queue"
        ));
        assert!(error.to_string().contains("routing.queues[1]"));
        assert!(matches!(
            router(&[("", "#")]),
            Err(RoutingConfigError::InvalidQueueName { index: 0, .. })
        ));
        assert!(matches!(
            router(&[("amq.gen-1", "#")]),
            Err(RoutingConfigError::InvalidQueueName { .. })
        ));
    }

    #[test]
    fn duplicate_queues_are_rejected() {
        assert_eq!(
            router(&[("export", "export"), ("export", "#")]).unwrap_err(),
            RoutingConfigError::DuplicateQueue {
                queue: "export".to_owned()
            }
        );
    }

    #[test]
    fn invalid_binding_keys_name_the_queue() {
        let error = router(&[("export", "export.*x")]).unwrap_err();
        assert!(matches!(
            &error,
            RoutingConfigError::InvalidBindingKey { queue, binding_key, .. }
                if queue == "export" && binding_key == "export.*x"
        ));
        let message = error.to_string();
        assert!(message.contains("\"export\"") && message.contains("word 2"));
        assert!(matches!(
            router(&[("export", "")]),
            Err(RoutingConfigError::InvalidBindingKey { .. })
        ));
    }
}
