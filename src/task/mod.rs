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
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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
    pub expires: Option<DateTime<Utc>>,
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
}

/// An accepted task: validated, bound, routed, with its id fixed. This is the
/// record the outbox makes durable and every publisher encodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub task: TaskName,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub routing_key: String,
    /// Every configured queue whose binding matches `routing_key`.
    pub queues: Vec<QueueName>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub priority: Option<u8>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub group: Option<String>,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    /// Caller-supplied message properties (e.g. `creator_id`), copied into
    /// the message properties as Celery's `send_task(**options)` does.
    pub properties: Map<String, Value>,
    pub accepted_at: DateTime<Utc>,
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
        }
    }
}
