//! Live task state for `GET /v1/tasks/{id}/events`: what Celery's result
//! backend says about each followed task (`PENDING`, `STARTED`, a custom
//! `PROGRESS` with its meta, `SUCCESS`, ...), pushed to every subscriber as
//! it changes.
//!
//! Invariants:
//! - One poller for all subscribers: every [`POLL_INTERVAL`] it asks the
//!   result table for all followed tasks in one query, however many
//!   streams follow them (a page with a progress bar per row costs one
//!   query, not one per bar).
//! - A task is followed while some stream holds its receiver; the poller
//!   forgets it once the last one is dropped, and sleeps while nothing is
//!   followed.
//! - A subscriber sees each state the poller observed, in order; a state
//!   that came and went between two polls is not seen (polling cannot).

use super::result::TaskResult;
use super::Shared;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How often the followed tasks' states are read: well within the second
/// a progress bar may lag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A followed task's state: `None` until the poller has read it once, then
/// the task's `result` object as `GET /v1/tasks/{id}` shows it (`status`
/// `PENDING` while no worker has written a row).
pub type Observed = Option<Value>;

/// The states Celery never leaves: a stream ends after one of these.
pub fn is_final(status: &str) -> bool {
    matches!(status, "SUCCESS" | "FAILURE" | "REVOKED")
}

#[derive(Default)]
pub struct ProgressWatcher {
    followed: Mutex<HashMap<String, watch::Sender<Observed>>>,
    wake: Notify,
}

impl ProgressWatcher {
    /// Follows `task_id`: the receiver sees its state as the poller reads it.
    pub fn follow(&self, task_id: &str) -> watch::Receiver<Observed> {
        let mut followed = self.followed.lock().expect("followed lock poisoned");
        let receiver = match followed.get(task_id) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(None);
                followed.insert(task_id.to_owned(), sender);
                receiver
            }
        };
        self.wake.notify_one();
        receiver
    }

    /// Task ids some stream still follows; forgets the others.
    fn followed_ids(&self) -> Vec<String> {
        let mut followed = self.followed.lock().expect("followed lock poisoned");
        followed.retain(|_, sender| sender.receiver_count() > 0);
        followed.keys().cloned().collect()
    }

    fn publish(&self, states: HashMap<String, Value>) {
        let followed = self.followed.lock().expect("followed lock poisoned");
        for (id, sender) in followed.iter() {
            let state = states.get(id).cloned().unwrap_or_else(pending);
            sender.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&state);
                if changed {
                    *current = Some(state.clone());
                }
                changed
            });
        }
    }
}

/// What Celery itself answers for a task with no result row.
fn pending() -> Value {
    serde_json::to_value(TaskResult {
        status: "PENDING".into(),
        result: Value::Null,
        date_done: None,
        traceback: None,
        exception: None,
        result_error: None,
    })
    .expect("a task result serializes")
}

/// The poller: runs until tracking stops.
pub(super) async fn run(shared: Arc<Shared>, watcher: Arc<ProgressWatcher>) {
    loop {
        let ids = watcher.followed_ids();
        if ids.is_empty() {
            tokio::select! {
                _ = watcher.wake.notified() => continue,
                _ = shared.stop.cancelled() => return,
            }
        }
        let outcome = shared.store.results(&ids).await;
        shared.observe(&outcome);
        match outcome {
            Ok(rows) => watcher.publish(
                rows.into_iter()
                    .map(|(id, row)| {
                        let result = serde_json::to_value(row.into_task_result()).unwrap_or(Value::Null);
                        (id, result)
                    })
                    .collect(),
            ),
            // Streams keep their last state; health says the database is away.
            Err(error) => tracing::debug!(%error, "cannot read followed task results"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn followers_share_one_entry_and_are_forgotten_when_gone() {
        let watcher = ProgressWatcher::default();
        let first = watcher.follow("a");
        let second = watcher.follow("a");
        let other = watcher.follow("b");
        assert_eq!(watcher.followed_ids().len(), 2);
        drop(other);
        assert_eq!(watcher.followed_ids(), ["a"]);
        watcher.publish(HashMap::from([("a".to_owned(), json!({"status": "PROGRESS"}))]));
        assert_eq!(*first.borrow(), Some(json!({"status": "PROGRESS"})));
        assert_eq!(*second.borrow(), Some(json!({"status": "PROGRESS"})));
        drop((first, second));
        assert!(watcher.followed_ids().is_empty());
    }

    #[test]
    fn a_task_without_a_row_is_pending_and_only_changes_are_sent() {
        let watcher = ProgressWatcher::default();
        let mut receiver = watcher.follow("a");
        watcher.publish(HashMap::new());
        assert!(receiver.has_changed().unwrap());
        assert_eq!(receiver.borrow_and_update().as_ref().unwrap()["status"], "PENDING");
        watcher.publish(HashMap::new());
        assert!(!receiver.has_changed().unwrap(), "the same state is not sent twice");
        assert!(is_final("SUCCESS") && !is_final("PROGRESS"));
    }
}
