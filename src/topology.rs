//! What Celery workers must match for taskgate's tasks to reach them and
//! their results and scheduled tasks to reach the platform: the broker (its
//! kind and where it is, secrets left out), the topic exchange, the
//! configured queues and their bindings, the tracking queue, how routing
//! keys are chosen, and the result backend.
//!
//! Served as `GET /v1/topology` and printed by `taskgate topology`; its
//! [`Topology::celery_settings`] view is what `taskgate_client.worker.
//! configure(app, ...)` applies to a Celery app, so workers and the gateway
//! read one description instead of two hand-kept copies that drift.
//!
//! Invariants: built from the settings alone (no broker or database is
//! asked), so the CLI prints what the server serves for the same
//! configuration; no password or token ever appears in it.

use crate::broker::sqs_naming::sqs_queue_name;
use crate::config::{mask_url_password, BrokerKind, Settings};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The table Celery's database result backend writes task results to.
const CELERY_RESULT_TABLE: &str = "celery_taskmeta";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Topology {
    pub broker: BrokerTopology,
    pub exchange: ExchangeTopology,
    /// The queues taskgate routes to, in configuration order.
    pub queues: Vec<QueueTopology>,
    /// The queue bound `#` that receives a copy of every task published to
    /// the exchange (taskgate records the tasks workers schedule from it);
    /// `None` when `tracking.sync_queue` is not set.
    pub tracking_queue: Option<QueueTopology>,
    pub routing: RoutingTopology,
    pub result_backend: ResultBackendTopology,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BrokerTopology {
    Amqp {
        /// The broker URL with its password masked (`****`): a worker
        /// brings its own credentials.
        url: String,
        heartbeat_seconds: u16,
        /// Queues are quorum queues (`x-queue-type: quorum`).
        quorum_queues: bool,
    },
    Sqs {
        region: Option<String>,
        endpoint_url: Option<String>,
        /// kombu's `queue_name_prefix`.
        queue_name_prefix: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExchangeTopology {
    pub name: String,
    /// Always `topic`: bindings are topic patterns.
    #[serde(rename = "type")]
    pub exchange_type: &'static str,
    pub durable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueTopology {
    /// The queue's name as Celery knows it.
    pub name: String,
    /// The topic pattern it is bound to the exchange with.
    pub binding_key: String,
    pub durable: bool,
    /// On SQS, the queue's name there (kombu's prefix and spelling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqs_name: Option<String>,
}

/// How a task's routing key is chosen when the caller gives none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingTopology {
    /// `first_word`: the task name up to its first `.` (`export.project`
    /// is routed with `export`), or the whole name when it has no dot.
    pub default_rule: &'static str,
    /// Tasks the registry routes with a routing key of their own.
    pub tasks: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultBackendTopology {
    /// Celery's `result_backend` for the tracking database (`db+...`), the
    /// password left out: a worker supplies its own.
    pub url: String,
    pub table: &'static str,
}

impl Topology {
    pub fn from_settings(settings: &Settings) -> Self {
        let prefix = settings.broker.queue_name_prefix.clone().unwrap_or_default();
        let on_sqs = settings.broker.kind == BrokerKind::Sqs;
        let queue = |name: &str, binding_key: &str| QueueTopology {
            name: name.to_owned(),
            binding_key: binding_key.to_owned(),
            durable: true,
            sqs_name: on_sqs.then(|| sqs_queue_name(&prefix, name)),
        };
        let broker = match settings.broker.kind {
            BrokerKind::Amqp => BrokerTopology::Amqp {
                url: mask_url_password(&settings.broker.url),
                heartbeat_seconds: settings.broker.heartbeat_seconds,
                quorum_queues: settings.broker.quorum_queues,
            },
            BrokerKind::Sqs => BrokerTopology::Sqs {
                region: settings.broker.region.clone(),
                endpoint_url: settings.broker.endpoint_url.clone(),
                queue_name_prefix: settings.broker.queue_name_prefix.clone(),
            },
        };
        Topology {
            broker,
            exchange: ExchangeTopology {
                name: settings.routing.exchange.clone(),
                exchange_type: "topic",
                durable: true,
            },
            queues: settings
                .routing
                .queues
                .iter()
                .map(|binding| queue(&binding.name, &binding.binding_key))
                .collect(),
            tracking_queue: settings.tracking.sync_queue.as_deref().map(|name| queue(name, "#")),
            routing: RoutingTopology {
                default_rule: "first_word",
                tasks: settings
                    .registry
                    .tasks
                    .iter()
                    .filter_map(|task| Some((task.name.clone(), task.routing_key.clone()?)))
                    .collect(),
            },
            result_backend: ResultBackendTopology {
                url: celery_result_backend(&settings.tracking.database_url),
                table: CELERY_RESULT_TABLE,
            },
        }
    }

    /// The Celery settings a worker needs, as `taskgate_client.worker.
    /// configure` applies them (and `taskgate topology --format celery`
    /// prints them): `task_queues` (the configured queues; the tracking
    /// queue is declared and bound but not consumed, see
    /// `taskgate_declare_only`), the default exchange and its type,
    /// `broker_transport_options` on SQS, and `result_backend`. Routing
    /// keys are chosen by a router built from `taskgate_routing`.
    pub fn celery_settings(&self) -> Value {
        let queue_arguments = match &self.broker {
            BrokerTopology::Amqp {
                quorum_queues: true, ..
            } => json!({"x-queue-type": "quorum"}),
            _ => Value::Null,
        };
        let celery_queue = |queue: &QueueTopology| {
            json!({
                "name": queue.name,
                "exchange": self.exchange.name,
                "exchange_type": self.exchange.exchange_type,
                "routing_key": queue.binding_key,
                "durable": queue.durable,
                "queue_arguments": queue_arguments,
            })
        };
        let mut settings = Map::new();
        settings.insert(
            "task_queues".into(),
            self.queues.iter().map(celery_queue).collect::<Vec<_>>().into(),
        );
        settings.insert(
            "taskgate_declare_only".into(),
            self.tracking_queue.iter().map(celery_queue).collect::<Vec<_>>().into(),
        );
        settings.insert("task_default_exchange".into(), self.exchange.name.clone().into());
        settings.insert("task_default_exchange_type".into(), self.exchange.exchange_type.into());
        settings.insert(
            "taskgate_routing".into(),
            json!({"default_rule": self.routing.default_rule, "tasks": self.routing.tasks}),
        );
        if let BrokerTopology::Sqs {
            region,
            queue_name_prefix,
            ..
        } = &self.broker
        {
            let mut options = Map::new();
            if let Some(region) = region {
                options.insert("region".into(), region.clone().into());
            }
            if let Some(prefix) = queue_name_prefix {
                options.insert("queue_name_prefix".into(), prefix.clone().into());
            }
            settings.insert("broker_transport_options".into(), options.into());
        }
        settings.insert("result_backend".into(), self.result_backend.url.clone().into());
        Value::Object(settings)
    }
}

/// `tracking.database_url` as Celery's database backend spells it, without
/// the password: `postgres://user:secret@db/platform` becomes
/// `db+postgresql://user@db/platform`; a relative SQLite path is made
/// absolute (a worker runs elsewhere), `sqlite://data/t.db` becoming
/// `db+sqlite:////abs/data/t.db`.
fn celery_result_backend(database_url: &str) -> String {
    if let Some(path) = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
    {
        let path = path.split('?').next().unwrap_or_default();
        let path = std::path::Path::new(path);
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(path)
        };
        return format!("db+sqlite:///{}", absolute.display());
    }
    let rest = database_url
        .strip_prefix("postgresql://")
        .or_else(|| database_url.strip_prefix("postgres://"))
        .unwrap_or(database_url);
    // Userinfo ends at the last '@' before the host; drop ":password".
    let (authority_end, _) = rest
        .char_indices()
        .find(|(_, c)| *c == '/')
        .unwrap_or((rest.len(), '/'));
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{user}@{host}")
        }
        None => authority.to_owned(),
    };
    // libpq's TLS parameters are not SQLAlchemy's; the worker sets its own.
    let path = path.split('?').next().unwrap_or_default();
    format!("db+postgresql://{authority}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::registry::RegisteredTaskSettings;
    use crate::task::routing::QueueBindingSettings;

    fn settings() -> Settings {
        let mut settings = Settings::default();
        settings.broker.url = "amqp://worker:s3cret@rabbit.internal:5672/%2f".into();
        settings.routing.exchange = "task_exchange".into();
        settings.routing.queues = vec![
            QueueBindingSettings {
                name: "export".into(),
                binding_key: "export.#".into(),
            },
            QueueBindingSettings {
                name: "celery".into(),
                binding_key: "#".into(),
            },
        ];
        settings.tracking.sync_queue = Some("platform.fifo".into());
        settings.tracking.database_url = "postgres://platform:pa55@db.internal:5432/platform?sslmode=require".into();
        settings.registry.tasks = vec![RegisteredTaskSettings {
            name: "export.project".into(),
            routing_key: Some("export.slow".into()),
            ..RegisteredTaskSettings::default()
        }];
        settings
    }

    #[test]
    fn describes_what_workers_must_match_without_secrets() {
        let topology = Topology::from_settings(&settings());
        let text = serde_json::to_string(&topology).unwrap();
        assert!(!text.contains("s3cret") && !text.contains("pa55"), "{text}");
        assert_eq!(
            topology.broker,
            BrokerTopology::Amqp {
                url: "amqp://worker:****@rabbit.internal:5672/%2f".into(),
                heartbeat_seconds: settings().broker.heartbeat_seconds,
                quorum_queues: false,
            }
        );
        assert_eq!(topology.exchange.name, "task_exchange");
        let queues: Vec<_> = topology
            .queues
            .iter()
            .map(|queue| (queue.name.as_str(), queue.binding_key.as_str()))
            .collect();
        assert_eq!(queues, [("export", "export.#"), ("celery", "#")]);
        let tracking = topology.tracking_queue.as_ref().unwrap();
        assert_eq!(
            (tracking.name.as_str(), tracking.binding_key.as_str()),
            ("platform.fifo", "#")
        );
        assert_eq!(topology.routing.tasks["export.project"], "export.slow");
        assert_eq!(
            topology.result_backend.url,
            "db+postgresql://platform@db.internal:5432/platform"
        );
    }

    #[test]
    fn celery_settings_declare_the_tracking_queue_without_consuming_it() {
        let celery = Topology::from_settings(&settings()).celery_settings();
        let consumed: Vec<_> = celery["task_queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|queue| queue["name"].as_str().unwrap())
            .collect();
        assert_eq!(consumed, ["export", "celery"]);
        assert_eq!(celery["taskgate_declare_only"][0]["name"], "platform.fifo");
        assert_eq!(celery["taskgate_declare_only"][0]["routing_key"], "#");
        assert_eq!(celery["task_default_exchange_type"], "topic");
        assert_eq!(celery["task_queues"][0]["exchange"], "task_exchange");
        assert!(celery.get("broker_transport_options").is_none(), "AMQP needs none");
    }

    #[test]
    fn on_sqs_queues_carry_their_sqs_names_and_the_transport_options() {
        let mut settings = settings();
        settings.broker.kind = BrokerKind::Sqs;
        settings.broker.region = Some("eu-west-1".into());
        settings.broker.queue_name_prefix = Some("prod-".into());
        let topology = Topology::from_settings(&settings);
        assert_eq!(
            topology.queues[0].sqs_name.as_deref(),
            Some(sqs_queue_name("prod-", "export").as_str())
        );
        let celery = topology.celery_settings();
        assert_eq!(
            celery["broker_transport_options"],
            json!({"region": "eu-west-1", "queue_name_prefix": "prod-"})
        );
    }

    #[test]
    fn result_backend_urls_are_celerys_spelling() {
        assert_eq!(celery_result_backend("postgresql://u@h/db"), "db+postgresql://u@h/db");
        assert_eq!(celery_result_backend("postgres://h/db"), "db+postgresql://h/db");
        assert_eq!(
            celery_result_backend("sqlite:///var/lib/taskgate/tracking.db"),
            "db+sqlite:////var/lib/taskgate/tracking.db"
        );
        let relative = celery_result_backend("sqlite://data/tracking.db");
        assert!(
            relative.starts_with("db+sqlite:////") && relative.ends_with("/data/tracking.db"),
            "{relative}"
        );
    }
}
