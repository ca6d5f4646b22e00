//! `--offline`: opening a stopped server's outbox directly, to read it or
//! move its tasks when the host (or its server) is dead.
//!
//! Invariants: a directory that holds no outbox is never created (a typo in
//! `outbox.path` must not look like an empty outbox); a directory a running
//! server holds is refused with [`OfflineError::InUse`], naming the way out,
//! never opened twice (sled's file lock guarantees the "never"); a damaged
//! one is [`OfflineError::Damaged`] (exit 65), never a panic.

use crate::config::Settings;
use crate::outbox::{Outbox, OutboxError, StorageError};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("there is no outbox at {path} (check outbox.path in the --config file, or TASKGATE_OUTBOX__PATH)")]
    Missing { path: PathBuf },
    #[error(
        "the outbox at {path} is in use by a running taskgate server, so --offline cannot open it; \
         run the command without --offline to go through the server's admin API, or stop the server first"
    )]
    InUse { path: PathBuf },
    /// The outbox is damaged: the message says what to do (exit 65).
    #[error("{0}")]
    Damaged(StorageError),
    #[error("cannot open the outbox at {path}: {source}")]
    Open { path: PathBuf, source: OutboxError },
    #[error("cannot start the runtime for the outbox: {0}")]
    Runtime(std::io::Error),
    #[error("outbox operation failed: {0}")]
    Operation(#[from] OutboxError),
}

/// An outbox opened without a server. Its flushes are awaited on a
/// private single-threaded runtime, driven by [`OfflineOutbox::flush`].
pub struct OfflineOutbox {
    runtime: tokio::runtime::Runtime,
    outbox: Arc<Outbox>,
}

impl OfflineOutbox {
    pub fn open(settings: &Settings) -> Result<Self, OfflineError> {
        let path = settings.outbox.path.clone();
        // sled keeps a `db` file (and `conf`) in its directory.
        if !path.join("db").is_file() {
            return Err(OfflineError::Missing { path });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OfflineError::Runtime)?;
        let outbox = {
            let _entered = runtime.enter();
            Outbox::open(&settings.outbox).map_err(|error| match error {
                OutboxError::Storage(StorageError::Locked { .. }) => OfflineError::InUse { path: path.clone() },
                OutboxError::Storage(damaged @ StorageError::Corrupt(_)) => OfflineError::Damaged(damaged),
                source => OfflineError::Open {
                    path: path.clone(),
                    source,
                },
            })?
        };
        Ok(Self { runtime, outbox })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Makes the changes so far durable.
    pub fn flush(&self) -> Result<(), OfflineError> {
        Ok(self.runtime.block_on(self.outbox.flush())?)
    }
}
