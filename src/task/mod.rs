//! The task domain: what a caller asks for and what taskgate accepts.
//!
//! Owns the newtypes parsed once at the HTTP edge ([`TaskId`], [`TaskName`],
//! [`QueueName`]), the wire shape of a request ([`TaskRequest`]) and the
//! accepted, normalised form ([`Task`]) that the outbox stores and the
//! Celery encoder turns into a message. Invariant: a [`Task`] has passed the
//! registry ([`registry`]) and routing ([`routing`]), so every field in it is
//! what will be published.

pub mod intake;
pub mod registry;
pub mod routing;
pub mod signature;

pub use signature::{CelerySignature, OneOrMany, SignatureRequest};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// A Celery task id. Clients may choose one (any UUID); otherwise taskgate
/// generates a v7 UUID: time-ordered, so the outbox's status index (keyed
/// by id) grows at its end instead of rewriting leaves all over the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(uuid::Uuid);

impl TaskId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(text: &str) -> Result<Self, uuid::Error> {
        uuid::Uuid::parse_str(text).map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hyphenated lower case, exactly as Celery's `uuid()` prints ids.
        self.0.hyphenated().fmt(f)
    }
}

/// A Celery task name such as `export.project`: non-empty, no whitespace or
/// control characters, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskName(String);

impl TaskName {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("task name must not be empty".into());
        }
        if text.len() > 255 {
            return Err("task name must be at most 255 bytes".into());
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("task name must not contain whitespace or control characters".into());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<TaskName> for String {
    fn from(value: TaskName) -> Self {
        value.0
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A logical queue name as configured (`export`, `platform.fifo`). Broker
/// specific spellings (SQS prefixes, `.` to `-`) are derived from it by the
/// publisher, never stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

impl QueueName {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.len() > 200 {
            return Err("queue name must be 1 to 200 bytes".into());
        }
        if !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(format!(
                "queue name {text:?} may only contain ASCII letters, digits, '.', '-', '_' and ':'"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QueueName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<QueueName> for String {
    fn from(value: QueueName) -> Self {
        value.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The JSON body of `POST /v1/tasks` (and each element of a batch), as sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub routing_key: Option<String>,
    #[serde(default)]
    pub eta: Option<DateTime<Utc>>,
    #[serde(default)]
    // Inline: the OpenAPI document then needs no component for it.
    #[schema(inline)]
    pub expires: Option<ExpiresRequest>,
    /// Seconds from now; Celery turns it into `eta`. Cannot be combined with `eta`.
    #[serde(default)]
    pub countdown: Option<f64>,
    #[serde(default)]
    pub priority: Option<u8>,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub root_id: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub time_limit: Option<f64>,
    #[serde(default)]
    pub soft_time_limit: Option<f64>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    /// Celery's `shadow`: the name logs and monitoring show instead of `task`.
    #[serde(default)]
    pub shadow: Option<String>,
    /// Extra message headers, added after Celery's own as `send_task(headers=...)`
    /// does; a name Celery's protocol uses is refused (see [`intake`]).
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// Celery's `ignore_result`: the worker stores no result.
    #[serde(default)]
    pub ignore_result: Option<bool>,
    /// Celery's `retries` header: how many times this task was retried already.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Position of this task in its `group`; only together with `group`.
    #[serde(default)]
    pub group_index: Option<u32>,
    /// Signatures the worker applies with this task's result when it succeeds.
    #[serde(default)]
    // Inline: the OpenAPI document then needs no component for it.
    #[schema(inline)]
    pub link: Option<OneOrMany<SignatureRequest>>,
    /// Signatures the worker applies when this task fails.
    #[serde(default)]
    // Inline: the OpenAPI document then needs no component for it.
    #[schema(inline)]
    pub link_error: Option<OneOrMany<SignatureRequest>>,
    /// The rest of a chain, in execution order: the worker applies the first
    /// with this task's result, that one the next, and so on.
    #[serde(default)]
    // Inline: the OpenAPI document then needs no component for it.
    #[schema(inline)]
    pub chain: Option<Vec<SignatureRequest>>,
    /// A configured queue: the task is published with that queue's binding
    /// key as its routing key. Not together with `routing_key`.
    #[serde(default)]
    pub queue: Option<String>,
    /// Must name the configured exchange (taskgate publishes to no other).
    #[serde(default)]
    pub exchange: Option<String>,
}

/// `expires` as Celery's `apply_async` takes it: a time, or a number of
/// seconds from when the request is accepted (`expires=10`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ExpiresRequest {
    /// An RFC 3339 time.
    At(DateTime<Utc>),
    /// Seconds from acceptance, `>= 0`.
    AfterSeconds(f64),
}

impl<'de> Deserialize<'de> for ExpiresRequest {
    // By hand rather than `untagged`, so a wrong value says what is expected
    // instead of "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpiresVisitor;
        impl serde::de::Visitor<'_> for ExpiresVisitor {
            type Value = ExpiresRequest;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an RFC 3339 time or a number of seconds")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ExpiresRequest, E> {
                // The same parser chrono's own `DateTime<Utc>` deserializer uses,
                // so the time form accepts exactly what it accepted before.
                text.parse::<DateTime<chrono::FixedOffset>>()
                    .map(|time| ExpiresRequest::At(time.with_timezone(&Utc)))
                    .map_err(|error| E::custom(format!("{text:?} is not an RFC 3339 time: {error}")))
            }
            fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<ExpiresRequest, E> {
                Ok(ExpiresRequest::AfterSeconds(seconds as f64))
            }
            fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<ExpiresRequest, E> {
                Ok(ExpiresRequest::AfterSeconds(seconds as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, seconds: f64) -> Result<ExpiresRequest, E> {
                Ok(ExpiresRequest::AfterSeconds(seconds))
            }
        }
        deserializer.deserialize_any(ExpiresVisitor)
    }
}

impl TaskRequest {
    /// A request for `task` with every option left out.
    pub fn named(task: &str) -> TaskRequest {
        TaskRequest {
            task: task.to_owned(),
            ..TaskRequest::default()
        }
    }
}

/// An accepted task: validated, bound, routed, with its id fixed. This is the
/// record the outbox makes durable and every publisher encodes.
///
/// Options left unset are not written (every one defaults when absent, so
/// records written with them as `null`, before, still decode). The record
/// is stored twice per task (pending entry and tracking journal), and sled
/// copies and rewrites whole leaves of 16 records: the 17 unset options of
/// a plain task were about 260 of its 660 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub task: TaskName,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub routing_key: String,
    /// Every configured queue whose binding matches `routing_key`.
    pub queues: Vec<QueueName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit: Option<f64>,
    /// Caller-supplied message properties (e.g. `creator_id`), copied into
    /// the message properties as Celery's `send_task(**options)` does.
    pub properties: Map<String, Value>,
    pub accepted_at: DateTime<Utc>,
    // The Celery options below were added after the first release: each
    // defaults when absent, so outbox records written before still decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// Extra headers, in request order, none of them a protocol header.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub headers: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_result: Option<bool>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_index: Option<u32>,
    /// `None` when the request had no `link` (Celery's `callbacks: null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Vec<CelerySignature>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_error: Option<Vec<CelerySignature>>,
    /// The rest of the chain in execution order (the message carries it
    /// reversed, as Celery does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<CelerySignature>>,
    /// A chord header member's body (frozen with its `task_id` and the
    /// group's `group_id`), carried in the message as Celery does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chord: Option<CelerySignature>,
}

fn is_zero(number: &u32) -> bool {
    *number == 0
}

#[cfg(test)]
impl Task {
    /// A task with only its identity, call and routing set (every Celery
    /// option left unset), for unit tests across the crate.
    pub(crate) fn for_test(
        id: TaskId,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        routing_key: &str,
        queues: &[&str],
    ) -> Task {
        Task {
            id,
            task: TaskName::parse(name).expect("test task name is valid"),
            args,
            kwargs,
            routing_key: routing_key.to_owned(),
            queues: queues
                .iter()
                .map(|q| QueueName::parse(q).expect("test queue name is valid"))
                .collect(),
            eta: None,
            expires: None,
            priority: None,
            parent_id: None,
            root_id: None,
            group: None,
            time_limit: None,
            soft_time_limit: None,
            properties: Map::new(),
            accepted_at: Utc::now(),
            shadow: None,
            headers: Map::new(),
            ignore_result: None,
            retries: 0,
            group_index: None,
            link: None,
            link_error: None,
            chain: None,
            chord: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unset options are left out of the record, and such a record decodes
    /// (as do records of builds from before an option existed); a record
    /// that spells them out as `null` (as builds before did) decodes to the
    /// same task; set ones (an empty `link` included) survive the round
    /// trip.
    #[test]
    fn unset_options_are_not_stored_and_nulls_still_decode() {
        let mut task = Task::for_test(
            TaskId::generate(),
            "export.project",
            vec![],
            Map::new(),
            "export",
            &["export"],
        );
        let record = serde_json::to_value(&task).unwrap();
        let stored: Vec<&str> = record.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            stored,
            [
                "id",
                "task",
                "args",
                "kwargs",
                "routing_key",
                "queues",
                "properties",
                "accepted_at"
            ]
        );
        assert_eq!(serde_json::from_value::<Task>(record.clone()).unwrap(), task);
        let mut spelled_out = record.clone();
        for unset in [
            "eta",
            "expires",
            "priority",
            "parent_id",
            "root_id",
            "group",
            "time_limit",
            "soft_time_limit",
            "shadow",
            "ignore_result",
            "group_index",
            "link",
            "link_error",
            "chain",
            "chord",
        ] {
            spelled_out[unset] = Value::Null;
        }
        spelled_out["headers"] = serde_json::json!({});
        spelled_out["retries"] = serde_json::json!(0);
        assert_eq!(serde_json::from_value::<Task>(spelled_out).unwrap(), task);

        task.link = Some(vec![]);
        task.retries = 2;
        task.priority = Some(0);
        let round_trip: Task = serde_json::from_slice(&serde_json::to_vec(&task).unwrap()).unwrap();
        assert_eq!(round_trip, task);
    }
}
