//! The configuration reference and the production example stay true to
//! the code:
//!
//! - `docs/configuration.md` lists every key of `Settings` (flattened as
//!   `section.key`, array-of-table fields as `section.array[].field`) with
//!   its built-in default and its `TASKGATE_<SECTION>__<KEY>` variable, and
//!   no key that does not exist. A key added to the code without a row here
//!   fails, and the failure prints the row to add;
//! - environment variables reach nested keys and arrays of tables as the
//!   document says;
//! - `deploy/taskgate.production.toml` loads as a valid production
//!   configuration, as written (RabbitMQ) and with its SQS `[broker]`
//!   alternative swapped in.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use taskgate::config::{self, BrokerKind, Environment, Settings};
use taskgate::task::registry::RegisteredTaskSettings;

const DOC: &str = "docs/configuration.md";
const PRODUCTION_EXAMPLE: &str = "deploy/taskgate.production.toml";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A key's default as the document spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Default {
    /// Rendered as an inline TOML value.
    Value(String),
    /// An `Option` that is `None` unless set.
    Unset,
    /// A field of an array-of-tables entry that has no default.
    Required,
}

impl std::fmt::Display for Default {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Default::Value(value) => write!(f, "`{value}`"),
            Default::Unset => f.write_str("unset"),
            Default::Required => f.write_str("required"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    default: Default,
    /// `None` for fields inside an array of tables: the variable sets the
    /// whole array.
    env: Option<String>,
}

/// A value as TOML writes it inline; the document uses the same spelling.
fn render(value: &Value) -> String {
    match value {
        Value::Null => "unset".into(),
        Value::String(text) => Value::String(text.clone()).to_string(),
        Value::Bool(_) | Value::Number(_) => value.to_string(),
        Value::Array(items) => format!("[{}]", items.iter().map(render).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{ {} }}",
            map.iter()
                .map(|(key, item)| format!("{key} = {}", render(item)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn default_of(value: &Value) -> Default {
    match value {
        Value::Null => Default::Unset,
        other => Default::Value(render(other)),
    }
}

fn env_var(path: &str) -> String {
    format!("TASKGATE_{}", path.replace('.', "__").to_uppercase())
}

/// The fields of one array-of-tables entry: required when deserialising
/// the sample without the field fails, else the default it then takes.
fn element_fields<T: Serialize + DeserializeOwned>(sample: &T) -> Vec<(String, Default)> {
    let full = serde_json::to_value(sample).unwrap();
    let map = full.as_object().expect("an array-of-tables entry is a table");
    map.keys()
        .map(|field| {
            let mut partial = map.clone();
            partial.remove(field);
            let default = match serde_json::from_value::<T>(Value::Object(partial)) {
                Err(_) => Default::Required,
                Ok(parsed) => default_of(&serde_json::to_value(parsed).unwrap()[field]),
            };
            (field.clone(), default)
        })
        .collect()
}

/// Arrays of tables and a sample entry of each (their defaults may be empty).
fn array_tables() -> BTreeMap<&'static str, Vec<(String, Default)>> {
    let defaults = Settings::default();
    // `..default()` so that a field added later still compiles here (and
    // then shows up as a key the document must list).
    #[allow(clippy::needless_update)]
    let task = RegisteredTaskSettings {
        name: "export.project".into(),
        params: vec!["org_slug".into()],
        routing_key: Some("export".into()),
        ..RegisteredTaskSettings::default()
    };
    BTreeMap::from([
        ("routing.queues", element_fields(&defaults.routing.queues[0])),
        ("registry.tasks", element_fields(&task)),
    ])
}

fn flatten(
    prefix: &str,
    value: &Value,
    arrays: &BTreeMap<&str, Vec<(String, Default)>>,
    out: &mut BTreeMap<String, Key>,
) {
    for (name, item) in value.as_object().unwrap() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match item {
            Value::Object(_) => flatten(&path, item, arrays, out),
            _ => {
                out.insert(
                    path.clone(),
                    Key {
                        default: default_of(item),
                        env: Some(env_var(&path)),
                    },
                );
                if let Some(fields) = arrays.get(path.as_str()) {
                    for (field, default) in fields {
                        out.insert(
                            format!("{path}[].{field}"),
                            Key {
                                default: default.clone(),
                                env: None,
                            },
                        );
                    }
                } else if let Value::Array(items) = item {
                    assert!(
                        !items.iter().any(Value::is_object),
                        "{path} is an array of tables: add a sample entry to array_tables() in {}",
                        file!()
                    );
                }
            }
        }
    }
}

/// Every key of the code, from `Settings::default()`.
fn code_keys() -> BTreeMap<String, Key> {
    let mut keys = BTreeMap::new();
    flatten(
        "",
        &serde_json::to_value(Settings::default()).unwrap(),
        &array_tables(),
        &mut keys,
    );
    keys
}

fn unticked(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

/// The rows of the reference tables (those headed `| key | default | …`):
/// `| `key` | default | `VARIABLE` or — | meaning |`.
fn doc_keys() -> BTreeMap<String, Key> {
    let text = std::fs::read_to_string(repo_file(DOC)).unwrap();
    let mut keys = BTreeMap::new();
    let mut in_key_table = false;
    let rows = text.lines().filter(|line| {
        if !line.starts_with('|') {
            in_key_table = false;
        } else if line.starts_with("| key | default |") {
            in_key_table = true;
        }
        in_key_table && line.starts_with("| `")
    });
    for line in rows {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(cells.len() >= 6, "{DOC}: a key row has 4 columns: {line}");
        let key = unticked(cells[1]).unwrap_or_else(|| panic!("{DOC}: key not in backticks: {line}"));
        let default = match cells[2] {
            "unset" => Default::Unset,
            "required" => Default::Required,
            cell => Default::Value(
                unticked(cell)
                    .unwrap_or_else(|| panic!("{DOC}: default of {key} is not `value`, unset or required: {line}"))
                    .to_owned(),
            ),
        };
        let env = match cells[3] {
            "—" => None,
            cell => Some(
                unticked(cell)
                    .unwrap_or_else(|| panic!("{DOC}: variable of {key} is not in backticks: {line}"))
                    .to_owned(),
            ),
        };
        assert!(!cells[4].is_empty(), "{DOC}: {key} has no description");
        let previous = keys.insert(key.to_owned(), Key { default, env });
        assert!(previous.is_none(), "{DOC}: {key} is listed twice");
    }
    keys
}

fn row(name: &str, key: &Key) -> String {
    let env = key.env.as_ref().map_or("—".to_owned(), |env| format!("`{env}`"));
    format!("| `{name}` | {} | {env} | … |", key.default)
}

#[test]
fn every_key_is_documented_with_its_default_and_variable() {
    let code = code_keys();
    let doc = doc_keys();
    // Not vacuous: the keys everyone relies on are found in the code.
    for known in [
        "environment",
        "http.listen",
        "broker.url",
        "routing.queues[].binding_key",
        "tracking.database_url",
    ] {
        assert!(code.contains_key(known), "flattening missed {known}: {code:#?}");
    }
    let mut problems = Vec::new();
    for (name, key) in &code {
        match doc.get(name) {
            None => problems.push(format!("missing from {DOC}; add:\n{}", row(name, key))),
            Some(documented) if documented != key => problems.push(format!(
                "{name} in {DOC} says {}, the code says:\n{}",
                row(name, documented),
                row(name, key)
            )),
            Some(_) => {}
        }
    }
    for name in doc.keys().filter(|name| !code.contains_key(*name)) {
        problems.push(format!("{DOC} lists {name}, which is not a configuration key"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
fn environment_variables_reach_nested_keys_and_arrays_of_tables() {
    figment::Jail::expect_with(|jail| {
        // The test runner's own TASKGATE_VENV would be read as a key.
        jail.clear_env();
        jail.set_env("TASKGATE_BREAKER__OPEN_MAX_MS", "12345");
        jail.set_env("TASKGATE_HTTP__LISTEN", "127.0.0.1:7500");
        jail.set_env(
            "TASKGATE_ROUTING__QUEUES",
            r##"[{name = "export", binding_key = "export"}, {name = "platform.fifo", binding_key = "#"}]"##,
        );
        jail.set_env("TASKGATE_TRACKING__SYNC_QUEUE", "platform.fifo");
        let settings = config::load(None).expect("settings from the environment");
        assert_eq!(settings.breaker.open_max_ms, 12345);
        assert_eq!(settings.http.listen.port(), 7500);
        let queues: Vec<_> = settings
            .routing
            .queues
            .iter()
            .map(|q| (q.name.as_str(), q.binding_key.as_str()))
            .collect();
        assert_eq!(queues, [("export", "export"), ("platform.fifo", "#")]);
        assert_eq!(settings.tracking.sync_queue.as_deref(), Some("platform.fifo"));
        Ok(())
    });
}

/// The production example with its SQS `[broker]` block swapped in for the
/// RabbitMQ one (the blocks are fenced by `## RabbitMQ` / `## end RabbitMQ`
/// and `## SQS` / `## end SQS` comment lines).
fn sqs_variant(text: &str) -> String {
    let mut out = Vec::new();
    let mut block = "";
    for line in text.lines() {
        match line.trim() {
            l if l.starts_with("## RabbitMQ") => block = "amqp",
            l if l.starts_with("## SQS") => block = "sqs",
            l if l.starts_with("## end") => block = "",
            _ if block == "amqp" => {}
            _ if block == "sqs" && line.starts_with("# ") => out.push(&line[2..]),
            _ if block == "sqs" && line == "#" => {}
            _ => out.push(line),
        }
    }
    out.join("\n")
}

#[test]
#[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
fn production_example_is_valid_for_rabbitmq_and_for_sqs() {
    let text = std::fs::read_to_string(repo_file(PRODUCTION_EXAMPLE)).unwrap();
    let sqs = sqs_variant(&text);
    assert_ne!(sqs, text, "{PRODUCTION_EXAMPLE} has no fenced SQS alternative");
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        // Secrets come from the unit's EnvironmentFile, as the example says.
        jail.set_env("TASKGATE_HTTP__ADMIN_TOKEN", "a-long-random-token-of-at-least-32-bytes");
        jail.create_file("amqp.toml", &text)?;
        jail.create_file("sqs.toml", &sqs)?;

        let amqp = config::load(Some(Path::new("amqp.toml")))
            .unwrap_or_else(|error| panic!("{PRODUCTION_EXAMPLE} as written: {error}"));
        assert_eq!(amqp.environment, Environment::Production);
        assert_eq!(amqp.broker.kind, BrokerKind::Amqp);
        assert!(amqp.tracking.is_postgres());
        assert!(amqp.outbox.path.is_absolute(), "the outbox lives in the StateDirectory");

        let sqs = config::load(Some(Path::new("sqs.toml")))
            .unwrap_or_else(|error| panic!("{PRODUCTION_EXAMPLE} with the SQS block: {error}\n{sqs}"));
        assert_eq!(sqs.broker.kind, BrokerKind::Sqs);
        assert!(!sqs.broker.creates_queues(sqs.environment));
        assert_eq!(sqs.routing, amqp.routing, "both brokers route the same way");
        Ok(())
    });
}
