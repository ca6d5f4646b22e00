//! Publishers: the one interface the relay uses to reach a broker.
//!
//! A [`Publisher`] owns its connection (established in the background:
//! start-up never waits on a broker), knows how a task maps onto its
//! delivery lanes, and publishes a window of pending entries, answering one
//! [`PublishResult`] per entry, in order. It never retries: the relay does,
//! behind the circuit breaker. Every broker call it makes has a timeout.
//!
//! What is retryable and what is permanent is decided in one place,
//! [`error`].

pub mod amqp;
pub mod error;
pub mod sqs;
pub mod sqs_naming;

use crate::outbox::{Lane, PendingEntry};
use crate::task::Task;
use chrono::{DateTime, Utc};
pub use error::PublishError;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::watch;

pub type PublishResult = Result<(), PublishError>;

/// What health and the status page show about the broker connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerStatus {
    pub connected: bool,
    /// Where we connect, with any password masked.
    pub endpoint: String,
    pub last_error: Option<String>,
    /// AMQP `connection.blocked`: the broker's reason (a memory or disk
    /// alarm). Connected, but it takes no messages until it unblocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// Configured queues the broker would not declare as configured (one
    /// line each, naming the queue); the other queues are unaffected.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queue_errors: Vec<String>,
    pub changed_at: DateTime<Utc>,
}

/// `last_error` of a publisher whose first connection attempt is running.
const FIRST_ATTEMPT: &str = "connecting";

impl BrokerStatus {
    /// Before the first connection attempt has ended either way.
    pub fn connecting(endpoint: String) -> Self {
        Self::disconnected(endpoint, Some(FIRST_ATTEMPT.into()))
    }

    pub fn is_first_attempt_running(&self) -> bool {
        !self.connected && self.last_error.as_deref() == Some(FIRST_ATTEMPT)
    }

    pub fn disconnected(endpoint: String, error: Option<String>) -> Self {
        Self {
            connected: false,
            endpoint,
            last_error: error,
            blocked: None,
            queue_errors: Vec::new(),
            changed_at: Utc::now(),
        }
    }
}

pub trait Publisher: Send + Sync + 'static {
    /// The lanes a task is delivered through; one outbox entry each.
    fn lanes_for(&self, task: &Task) -> Vec<Lane>;

    /// Publishes `entries` (all from `lane`, in order) and waits for the
    /// broker's confirmation of each, within the configured timeout.
    fn publish<'a>(&'a self, lane: &'a Lane, entries: &'a [PendingEntry]) -> BoxFuture<'a, Vec<PublishResult>>;

    /// [`Publisher::publish`] for a sliding window: resolves `handed_over`
    /// as soon as every entry was handed to the broker connection, in
    /// order, so the relay may send the next slice of the lane before this
    /// one is confirmed. The default hands over only once the broker
    /// answered for every entry (no overlap: for publishers whose requests
    /// could overtake each other).
    fn publish_pipelined<'a>(
        &'a self,
        lane: &'a Lane,
        entries: &'a [PendingEntry],
        handed_over: tokio::sync::oneshot::Sender<()>,
    ) -> BoxFuture<'a, Vec<PublishResult>> {
        Box::pin(async move {
            let results = self.publish(lane, entries).await;
            let _ = handed_over.send(());
            results
        })
    }

    /// Why `task` could never be delivered, whatever the broker's state
    /// (a message over the broker's size limit), so that intake refuses it
    /// instead of answering `202` for a task that can only become a dead
    /// letter. `None` when it can be.
    fn undeliverable(&self, _task: &Task) -> Option<String> {
        None
    }

    /// Connection state, updated by the background connection manager.
    fn status(&self) -> watch::Receiver<BrokerStatus>;

    /// Asks the connection manager to reconnect now rather than after its
    /// backoff (an operator's drain, a half-open probe).
    fn reconnect_now(&self);

    /// Closes the connection (bounded by the connect timeout).
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
