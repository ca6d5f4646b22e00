//! A store that failed a write stays failed until taskgate restarts.
//!
//! Why fatal rather than retried: sled 0.34 keeps the first I/O error of
//! its log (`ENOSPC`, `EIO`, `EFBIG`) and refuses every later write with it
//! until the store is reopened, and after a failed `fsync` nobody can say
//! which of the writes before it reached the disk. So once a write or a
//! flush fails, [`GuardedStorage`] refuses every later write and flush
//! itself, with the first error, without calling sled again. What that
//! gives the rest of taskgate:
//!
//! - a group whose flush failed is answered 503 and was never made visible
//!   (see [`super::group_commit`]); no later group is written, so no later
//!   write can make it durable by accident;
//! - the relay stops (it checks [`StorageFailure::error`] before each
//!   round) instead of publishing a head it can no longer complete, again
//!   and again;
//! - health fails with the error (`outbox:storage`), `/readyz` answers 503,
//!   and `taskgate_outbox_storage_errors_total` counts every error.
//!
//! After the cause is fixed (room on the disk again), a restart reopens
//! the store from what was durable: every task that got a 202 is there.
//! Reads are passed through: a failed read is reported and counted but
//! changes nothing on disk.

use super::storage::{KeyValuePairs, OutboxStorage, StorageError, WriteOperation};
use chrono::{DateTime, Utc};
use std::sync::{Arc, OnceLock};

/// The first write or flush error of this process's store, if any.
#[derive(Default)]
pub struct StorageFailure {
    first: OnceLock<RecordedFailure>,
}

#[derive(Debug, Clone)]
pub struct RecordedFailure {
    pub error: StorageError,
    pub at: DateTime<Utc>,
}

impl StorageFailure {
    /// The failure that stopped the store, if one did.
    pub fn error(&self) -> Option<&RecordedFailure> {
        self.first.get()
    }

    fn record(&self, operation: &str, error: &StorageError) {
        let mut first = false;
        self.first.get_or_init(|| {
            first = true;
            RecordedFailure {
                error: error.clone(),
                at: Utc::now(),
            }
        });
        if first {
            tracing::error!(
                %error,
                operation,
                "the outbox store failed: no task is accepted or published until taskgate is restarted \
                 (free disk space or fix the disk first; every task that got a 202 is kept)"
            );
        }
    }

    fn refused(&self) -> Option<StorageError> {
        self.first
            .get()
            .map(|failure| StorageError::Failed(failure.error.to_string()))
    }
}

fn count_error(operation: &'static str) {
    metrics::counter!("taskgate_outbox_storage_errors_total", "operation" => operation).increment(1);
}

/// Wraps the outbox's store so that the first failed write or flush stops
/// every later one (see the module comment).
pub(super) struct GuardedStorage {
    inner: Arc<dyn OutboxStorage>,
    failure: Arc<StorageFailure>,
}

impl GuardedStorage {
    pub(super) fn new(inner: Arc<dyn OutboxStorage>, failure: Arc<StorageFailure>) -> Self {
        Self { inner, failure }
    }

    fn write(
        &self,
        operation: &'static str,
        write: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        if let Some(refused) = self.failure.refused() {
            return Err(refused);
        }
        write().inspect_err(|error| {
            count_error(operation);
            self.failure.record(operation, error);
        })
    }
}

impl OutboxStorage for GuardedStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key).inspect_err(|_| count_error("read"))
    }

    fn apply(&self, operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        self.write("write", || self.inner.apply(operations))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KeyValuePairs, StorageError> {
        self.inner
            .scan(prefix, after, limit)
            .inspect_err(|_| count_error("read"))
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.write("flush", || self.inner.flush())
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.inner.size_on_disk()
    }
}
