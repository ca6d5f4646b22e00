//! The outbox's records and answers: what a task's status, a dead letter,
//! an acceptance and an idempotency record hold (stored as JSON under the
//! keys of [`super::keys`]), and what readers are given.
//!
//! Invariant: a stored record keeps decoding across versions: fields added
//! later are optional (`#[serde(default)]`), never renamed.

use super::keys::pending_key;
use super::{Lane, OutboxError};
use crate::task::{QueueName, Task, TaskId, TaskName};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Published,
    DeadLetter,
}

/// Whether a failed publish reached the broker: only then does it count in
/// a task's `attempts` (a round without a connection sends nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Made,
    NotMade,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub id: TaskId,
    pub task: TaskName,
    pub routing_key: String,
    pub queues: Vec<QueueName>,
    pub state: TaskState,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub accepted_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    /// Lanes still to confirm before the task counts as published.
    pub remaining_deliveries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub sequence: u64,
    pub lane: Lane,
    /// `None` when the pending record itself could not be decoded; `raw`
    /// then keeps its bytes (lossily as text) for an operator.
    pub task: Option<Task>,
    pub raw: Option<String>,
    pub reason: String,
    pub attempts: u32,
    pub dead_at: DateTime<Utc>,
}

/// What a caller is told about an accepted task; stored with an
/// idempotency key so a repeated request gets the same answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acceptance {
    pub id: TaskId,
    pub task: TaskName,
    pub routing_key: String,
    pub queues: Vec<QueueName>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub acceptances: Vec<Acceptance>,
    pub created_at: DateTime<Utc>,
    /// What the first request was ([`IdempotencyKey::fingerprint`]);
    /// absent in records written before it was kept (never compared).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// A client's `Idempotency-Key` with a fingerprint of the request it came
/// with: a repeat with the same key must be the same request, or it is
/// refused ([`OutboxError::IdempotencyKeyReused`]) rather than answered
/// with the first request's tasks while its own are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    pub fingerprint: String,
}

impl IdempotencyKey {
    pub fn new(key: impl Into<String>, fingerprint: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            fingerprint: fingerprint.into(),
        }
    }

    pub(super) fn check_same_request(&self, stored_fingerprint: &str) -> Result<(), OutboxError> {
        if self.fingerprint == stored_fingerprint {
            Ok(())
        } else {
            Err(OutboxError::IdempotencyKeyReused { key: self.key.clone() })
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AcceptOutcome {
    Accepted(Vec<Acceptance>),
    /// The idempotency key was seen within the window: nothing was written.
    Replayed(Vec<Acceptance>),
}

/// A task waiting in a lane, as the relay sees it.
#[derive(Debug, Clone)]
pub struct PendingEntry {
    pub lane: Lane,
    pub sequence: u64,
    pub task: Task,
    pub encoded_len: usize,
}

impl PendingEntry {
    pub(super) fn key(&self) -> Vec<u8> {
        pending_key(&self.lane, self.sequence)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueStats {
    pub depth: u64,
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutboxStats {
    pub depth: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub dead_letters: u64,
    pub queues: BTreeMap<String, QueueStats>,
}

/// What [`Outbox::mark_sending`] found about a window about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendMark {
    /// Entries of the window that were handed to the broker before.
    pub resent: u64,
    /// The lane's mark moved: flush before sending, so that a crash during
    /// the send still finds it.
    pub moved: bool,
}
