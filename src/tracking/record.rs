//! What one `background_tasks` row holds, built from either source: a task
//! taskgate accepted ([`TaskRecord::from_accepted`]) or a Celery message
//! read from the tracking queue ([`TaskRecord::from_message`]).
//!
//! Invariants:
//! - **Both sources describe a task the same way**: `input` is
//!   `{"args", "kwargs"}`, `options` holds the scheduling options under the
//!   same keys, `root_id` is the task's own id when the producer set none
//!   (as Celery's `as_task_v2` does), and the platform's relations
//!   (`creator_id`, `related_content_type`, `related_object_id`) come from
//!   the request properties (or, for producers on AMQP, where custom
//!   properties do not travel, from message headers of the same names).
//! - **A record never makes a batch fail**: text has its NUL characters
//!   replaced (PostgreSQL refuses them in `text` and `jsonb`), and times are
//!   truncated to microseconds (both databases' precision), so a value read
//!   back compares equal to the one written (keyset cursors rely on it).

use crate::celery::decode::DecodedTask;
use crate::task::Task;
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{json, Map, Value};

/// Request properties that become columns of their own.
pub const CREATOR_PROPERTY: &str = "creator_id";
pub const RELATED_CONTENT_TYPE_PROPERTY: &str = "related_content_type";
pub const RELATED_OBJECT_PROPERTY: &str = "related_object_id";

/// Length of the random public id (`[a-z0-9]`, about 124 bits).
pub const PUBLIC_ID_LENGTH: usize = 24;

/// Where a record came from; decides what an upsert may overwrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordSource {
    /// taskgate accepted the task: its type, input and options are exactly
    /// what was accepted and overwrite a copy seen on the tracking queue.
    Gateway,
    /// Seen on the tracking queue: fills what the row does not know yet.
    TrackingQueue,
}

impl RecordSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordSource::Gateway => "gateway",
            RecordSource::TrackingQueue => "tracking_queue",
        }
    }
}

/// A row to upsert by `task_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task_id: String,
    pub task_type: String,
    pub input: Value,
    pub options: Value,
    pub creator_id: Option<String>,
    pub related_content_type: Option<String>,
    pub related_object_id: Option<String>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub created_date: DateTime<Utc>,
}

/// A new random public id: 24 characters from `[a-z0-9]`, drawn from a
/// v4 UUID's random bits.
pub fn new_public_id() -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bits = uuid::Uuid::new_v4().as_u128();
    (0..PUBLIC_ID_LENGTH)
        .map(|_| {
            let digit = (bits % 36) as usize;
            bits /= 36;
            ALPHABET[digit] as char
        })
        .collect()
}

impl TaskRecord {
    /// The record of a task taskgate accepted.
    pub fn from_accepted(task: &Task) -> Self {
        let id = task.id.to_string();
        let mut options = Map::new();
        options.insert("routing_key".into(), task.routing_key.clone().into());
        options.insert("queues".into(), json!(task.queues));
        options.insert("eta".into(), json!(task.eta));
        options.insert("expires".into(), json!(task.expires));
        options.insert("priority".into(), json!(task.priority));
        options.insert("retries".into(), 0.into());
        options.insert("time_limit".into(), json!(task.time_limit));
        options.insert("soft_time_limit".into(), json!(task.soft_time_limit));
        options.insert("group".into(), json!(task.group));
        Self {
            root_id: Some(task.root_id.clone().unwrap_or_else(|| id.clone())),
            parent_id: task.parent_id.clone(),
            creator_id: property_text(&task.properties, None, CREATOR_PROPERTY),
            related_content_type: property_text(&task.properties, None, RELATED_CONTENT_TYPE_PROPERTY),
            related_object_id: property_text(&task.properties, None, RELATED_OBJECT_PROPERTY),
            task_id: id,
            task_type: task.task.to_string(),
            input: json!({"args": task.args, "kwargs": task.kwargs}),
            options: Value::Object(options),
            created_date: task.accepted_at,
        }
        .sanitized()
    }

    /// The record of a task message read from the tracking queue, first
    /// seen at `observed_at`. `properties` are the message properties (the
    /// SQS envelope's, or none on AMQP); `routing_key` is the one the
    /// message was published with.
    pub fn from_message(
        task: &DecodedTask,
        headers: &Map<String, Value>,
        properties: &Map<String, Value>,
        routing_key: Option<&str>,
        priority: Option<u8>,
        observed_at: DateTime<Utc>,
    ) -> Self {
        let mut options = Map::new();
        options.insert("routing_key".into(), json!(routing_key));
        options.insert("eta".into(), json!(task.eta));
        options.insert("expires".into(), json!(task.expires));
        options.insert("priority".into(), json!(priority));
        options.insert("retries".into(), task.retries.into());
        options.insert("time_limit".into(), json!(task.time_limit));
        options.insert("soft_time_limit".into(), json!(task.soft_time_limit));
        options.insert("group".into(), json!(task.group));
        if let Some(origin) = &task.origin {
            options.insert("origin".into(), origin.clone().into());
        }
        Self {
            task_id: task.id.clone(),
            task_type: task.task.clone(),
            input: json!({"args": task.args, "kwargs": task.kwargs}),
            options: Value::Object(options),
            creator_id: property_text(properties, Some(headers), CREATOR_PROPERTY),
            related_content_type: property_text(properties, Some(headers), RELATED_CONTENT_TYPE_PROPERTY),
            related_object_id: property_text(properties, Some(headers), RELATED_OBJECT_PROPERTY),
            parent_id: task.parent_id.clone(),
            root_id: Some(task.root_id.clone().unwrap_or_else(|| task.id.clone())),
            created_date: observed_at,
        }
        .sanitized()
    }

    fn sanitized(self) -> Self {
        Self {
            task_id: without_nul(self.task_id),
            task_type: without_nul(self.task_type),
            input: json_without_nul(self.input),
            options: json_without_nul(self.options),
            creator_id: self.creator_id.map(without_nul),
            related_content_type: self.related_content_type.map(without_nul),
            related_object_id: self.related_object_id.map(without_nul),
            parent_id: self.parent_id.map(without_nul),
            root_id: self.root_id.map(without_nul),
            created_date: self.created_date.trunc_subsecs(6),
        }
    }
}

/// A property as column text: strings as they are, numbers in decimal
/// (platform ids are often integers); `properties` first, then `headers`.
fn property_text(properties: &Map<String, Value>, headers: Option<&Map<String, Value>>, name: &str) -> Option<String> {
    let value = properties.get(name).filter(|value| !value.is_null()).or_else(|| {
        headers
            .and_then(|headers| headers.get(name))
            .filter(|value| !value.is_null())
    })?;
    Some(match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    })
}

fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

fn json_without_nul(value: Value) -> Value {
    match value {
        Value::String(text) => Value::String(without_nul(text)),
        Value::Array(items) => Value::Array(items.into_iter().map(json_without_nul).collect()),
        Value::Object(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(key, value)| (without_nul(key), json_without_nul(value)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::celery::decode::decode_task_message;
    use crate::celery::test_support::sample_task;
    use crate::celery::{encode, CONTENT_TYPE_JSON};

    #[test]
    fn public_ids_are_random_lowercase_alphanumerics() {
        let first = new_public_id();
        assert_eq!(first.len(), PUBLIC_ID_LENGTH);
        assert!(first.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(first, new_public_id());
    }

    #[test]
    fn accepted_task_and_its_message_describe_the_same_task() {
        let mut task = sample_task(
            vec![json!("org"), json!("proj\u{0}")],
            json!({"output_type": "xls"}).as_object().unwrap().clone(),
        );
        task.properties = json!({"creator_id": 42, "related_object_id": "p1", "related_content_type": "project"})
            .as_object()
            .unwrap()
            .clone();
        task.parent_id = Some("parent".into());
        let accepted = TaskRecord::from_accepted(&task);
        assert_eq!(accepted.task_id, task.id.to_string());
        assert_eq!(accepted.creator_id.as_deref(), Some("42"));
        assert_eq!(accepted.related_object_id.as_deref(), Some("p1"));
        assert_eq!(accepted.related_content_type.as_deref(), Some("project"));
        assert_eq!(accepted.root_id.as_deref(), Some(accepted.task_id.as_str()));
        assert_eq!(accepted.input["args"][1], "proj\u{FFFD}", "NUL replaced");
        assert_eq!(accepted.options["routing_key"], task.routing_key.as_str());

        let message = encode(&task, "origin@host");
        let decoded = decode_task_message(&message.headers, &message.body, CONTENT_TYPE_JSON, None).unwrap();
        let properties = Value::Object(task.properties.clone());
        let seen = TaskRecord::from_message(
            &decoded,
            &message.headers,
            properties.as_object().unwrap(),
            Some(&task.routing_key),
            None,
            Utc::now(),
        );
        assert_eq!(seen.task_id, accepted.task_id);
        assert_eq!(seen.task_type, accepted.task_type);
        assert_eq!(seen.input, accepted.input);
        assert_eq!(seen.parent_id, accepted.parent_id);
        assert_eq!(seen.root_id, accepted.root_id);
        assert_eq!(seen.creator_id, accepted.creator_id);
        assert_eq!(seen.options["routing_key"], accepted.options["routing_key"]);
        assert_eq!(seen.options["origin"], "origin@host");
    }

    #[test]
    fn headers_stand_in_for_properties_on_amqp() {
        let task = sample_task(vec![], Map::new());
        let mut message = encode(&task, "o");
        message.headers.insert("creator_id".into(), "u7".into());
        let decoded = decode_task_message(&message.headers, &message.body, CONTENT_TYPE_JSON, None).unwrap();
        let seen = TaskRecord::from_message(&decoded, &message.headers, &Map::new(), None, Some(3), Utc::now());
        assert_eq!(seen.creator_id.as_deref(), Some("u7"));
        assert_eq!(seen.options["priority"], 3);
        assert_eq!(seen.created_date.timestamp_subsec_nanos() % 1000, 0, "microseconds");
    }
}
