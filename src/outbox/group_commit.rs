//! Group commit: many writers, one flush.
//!
//! A writer applies its batch to the store, then calls [`GroupCommitter::commit`]
//! and waits. One committer task collects every request that arrived while
//! the previous flush ran and covers them all with a single blocking
//! `flush()` on the blocking pool. Invariant: a request is answered only by a
//! flush that *started after* the request was queued, so the writer's batch
//! (applied before queueing) is on disk when it is answered `Ok`.
//!
//! Why not `sled::Db::flush_async` from each writer: with 8 or more concurrent
//! callers it was measured never to complete (see DESIGN.md).

use super::storage::{OutboxStorage, StorageError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), StorageError>>;

#[derive(Clone)]
pub struct GroupCommitter {
    requests: mpsc::UnboundedSender<Waiter>,
}

impl GroupCommitter {
    /// Starts the committer task. It ends when every handle is dropped.
    pub fn start(storage: Arc<dyn OutboxStorage>) -> Self {
        let (requests, mut receiver) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            let mut waiters = Vec::new();
            while let Some(first) = receiver.recv().await {
                waiters.push(first);
                while let Ok(next) = receiver.try_recv() {
                    waiters.push(next);
                }
                let storage = storage.clone();
                let outcome = tokio::task::spawn_blocking(move || storage.flush())
                    .await
                    .unwrap_or_else(|join| Err(StorageError::Io(format!("flush task failed: {join}"))));
                metrics::counter!("taskgate_outbox_flushes_total").increment(1);
                metrics::histogram!("taskgate_outbox_flush_group_size").record(waiters.len() as f64);
                for waiter in waiters.drain(..) {
                    let _ = waiter.send(outcome.clone());
                }
            }
        });
        Self { requests }
    }

    /// Waits until everything applied before this call is durable.
    pub async fn commit(&self) -> Result<(), StorageError> {
        let (sender, receiver) = oneshot::channel();
        self.requests
            .send(sender)
            .map_err(|_| StorageError::Io("the outbox committer has stopped".into()))?;
        receiver
            .await
            .map_err(|_| StorageError::Io("the outbox committer has stopped".into()))?
    }
}
