//! The key-value storage under the outbox, behind a small trait.
//!
//! The outbox only needs ordered keys, atomic multi-key batches, prefix scans
//! and an explicit durable flush. Keeping sled behind [`OutboxStorage`] lets
//! tests inject faults (`FaultyStorage`, test builds only) where a real disk would be needed
//! to make them happen, and keeps sled's types out of the rest of the crate.

use std::ops::Bound;
use std::path::Path;

use super::durable_files::DurableFiles;

/// A storage failure. Always reported, never retried here: the caller knows
/// whether the operation can be repeated.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("outbox storage I/O error: {0}")]
    Io(String),
    #[error("the outbox directory {path} is in use by another process (is a taskgate server running?)")]
    Locked { path: String },
    /// The store is damaged (sled panicked or found corruption while
    /// recovering it): the message names the path and the way out.
    /// `serve` and `--offline` exit 65.
    #[error("{0}")]
    Corrupt(String),
    /// An earlier write or flush failed; the store refuses writes until
    /// taskgate restarts ([`super::failure`]).
    #[error("the outbox store failed earlier and refuses writes until taskgate is restarted: {0}")]
    Failed(String),
}

/// One write of an atomic batch: `Some(value)` inserts, `None` removes.
pub type WriteOperation = (Vec<u8>, Option<Vec<u8>>);

/// Key-value pairs in key order, as a scan returns them.
pub type KeyValuePairs = Vec<(Vec<u8>, Vec<u8>)>;

/// What the outbox needs from an ordered, durable key-value store.
pub trait OutboxStorage: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Applies every operation or none of them.
    fn apply(&self, operations: Vec<WriteOperation>) -> Result<(), StorageError>;
    /// Applies the operations one by one, in order, each atomic by itself
    /// and the whole not: after a failure or a crash any prefix of them
    /// may be there. The caller makes that recoverable (the accept
    /// groups' manifest, `super::group_manifest`); in return no batch is
    /// written (sled writes each behind a manifest of its own, an extra
    /// write to its log).
    fn apply_in_order(&self, operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        for operation in operations {
            self.apply(vec![operation])?;
        }
        Ok(())
    }
    /// Up to `limit` pairs whose key starts with `prefix`, in key order,
    /// strictly after `after` when given.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KeyValuePairs, StorageError>;
    /// Makes every write applied so far durable. Blocking: call it from
    /// `spawn_blocking`.
    fn flush(&self) -> Result<(), StorageError>;
    /// Bytes the store occupies on disk (approximate).
    fn size_on_disk(&self) -> Result<u64, StorageError>;
}

/// How long [`SledStorage::open`] waits for a lock held a moment too long.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The production store: one sled tree, made durable by [`DurableFiles`].
///
/// Invariant: once a write or flush failed, the sled handle is never
/// dropped. sled's `Drop` flushes, and after a failed write that flush
/// waits forever for the buffer that was never written: a `serve` stopped
/// with SIGTERM after its disk filled logged "taskgate stopped" and never
/// exited (measured on a full tmpfs; the committer thread sat in sled's
/// `make_stable`). Everything acknowledged was made durable before its
/// `202`, and nothing more can be, so the handle is left to the process's
/// end instead.
pub struct SledStorage {
    /// `None` only while dropping.
    db: Option<sled::Db>,
    files: DurableFiles,
    failed: std::sync::atomic::AtomicBool,
}

impl Drop for SledStorage {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!("the outbox store failed: its handle is not closed (sled would wait forever)");
                std::mem::forget(db);
            }
        }
    }
}

impl SledStorage {
    /// Opens (creating) the store. `cache_bytes` bounds sled's page cache,
    /// which is what keeps memory flat however deep the outbox grows.
    ///
    /// A store that is locked is tried again for up to [`LOCK_WAIT`]: sled
    /// releases its lock from its background threads, a moment after the
    /// last handle is dropped, so a reopen right after a close in the same
    /// process (a restart, or tests) would otherwise fail at random.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StorageError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match Self::open_once(path, cache_bytes) {
                Err(StorageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                outcome => return outcome,
            }
        }
    }

    /// sled panics on some damaged stores (a log cut short: `segment.rs:556`,
    /// `serialization.rs:662`) and reports others as `Corruption` or
    /// `Unsupported`; all are [`StorageError::Corrupt`] here, never a panic
    /// ([`super::salvage`] has what sled does with each kind of damage).
    fn open_once(path: &Path, cache_bytes: u64) -> Result<Self, StorageError> {
        /// A log longer than this that holds no record at all is a damaged
        /// store (two of sled's default 512 KiB segments; a new store's log
        /// is one).
        const EMPTY_LOG_LIMIT: u64 = 2 * super::salvage::DEFAULT_SEGMENT_BYTES;
        /// The store at `path` cannot be used: what was found, and what to do.
        fn damaged(path: &Path, found: impl std::fmt::Display) -> StorageError {
            StorageError::Corrupt(format!(
                "the outbox at {} is damaged: {found}. taskgate cannot use it, and restarting will not help: \
                 stop the service, copy the directory aside, and recover its tasks into a new outbox with \
                 `taskgate outbox salvage --offline --to-outbox NEW_DIR` (docs/operations.md, \"A damaged outbox\")",
                path.display()
            ))
        }
        // How much log there was before sled's recovery touched it.
        let log_bytes = std::fs::metadata(path.join("db")).map_or(0, |metadata| metadata.len());
        let db = super::salvage::catch_sled_panic(|| {
            sled::Config::new()
                .path(path)
                .cache_capacity(cache_bytes)
                .mode(sled::Mode::HighThroughput)
                .flush_every_ms(Some(500))
                .open()
        })
        .map_err(|panic| damaged(path, format!("sled stopped while recovering it ({panic})")))?
        .map_err(|error| match error {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => StorageError::Locked {
                path: path.display().to_string(),
            },
            sled::Error::Corruption { .. } => damaged(path, format!("sled found it corrupt ({error})")),
            sled::Error::Unsupported(why) => damaged(path, format!("sled cannot read it ({why})")),
            other => StorageError::Io(other.to_string()),
        })?;
        // Every outbox holds its `m/` records once it was opened, and a new
        // store's log is one segment: more log than two segments and no
        // record at all means sled's recovery discarded everything (it
        // does so, silently, when segments in the middle are gone).
        if log_bytes > EMPTY_LOG_LIMIT {
            match super::salvage::catch_sled_panic(|| db.first()) {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => {
                    return Err(damaged(
                        path,
                        format!("sled recovered no record at all from its {log_bytes}-byte log"),
                    ))
                }
                Ok(Err(error @ sled::Error::Corruption { .. })) => {
                    return Err(damaged(path, format!("its first record is corrupt ({error})")))
                }
                Ok(Err(error)) => return Err(StorageError::Io(error.to_string())),
                Err(panic) => {
                    return Err(damaged(
                        path,
                        format!("sled stopped reading its first record ({panic})"),
                    ))
                }
            }
        }
        let files =
            DurableFiles::open(path).map_err(|error| StorageError::Io(format!("{}: {error}", path.display())))?;
        Ok(Self {
            db: Some(db),
            files,
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn db(&self) -> &sled::Db {
        self.db.as_ref().expect("the sled handle lives until drop")
    }

    /// A write or flush error: noted for [`Drop`], then reported.
    fn write_failed(&self, error: impl std::fmt::Display) -> StorageError {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        StorageError::Io(error.to_string())
    }
}

fn io_error(error: sled::Error) -> StorageError {
    StorageError::Io(error.to_string())
}

impl OutboxStorage for SledStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.db().get(key).map_err(io_error)?.map(|v| v.to_vec()))
    }

    fn apply(&self, mut operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        // One key is atomic by itself. sled writes every batch behind a
        // manifest of its own (an extra write to the log, handed to its I/O
        // thread pool, which wakes all seven of its threads), so a single
        // write skips the batch.
        if operations.len() == 1 {
            let (key, value) = operations.pop().expect("one operation");
            return match value {
                Some(value) => self.db().insert(key, value).map(drop),
                None => self.db().remove(key).map(drop),
            }
            .map_err(|error| self.write_failed(error));
        }
        let mut batch = sled::Batch::default();
        for (key, value) in operations {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.db().apply_batch(batch).map_err(|error| self.write_failed(error))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KeyValuePairs, StorageError> {
        let start = match after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let mut found = Vec::new();
        for item in self.db().range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (key, value) = item.map_err(io_error)?;
            if !key.starts_with(prefix) || found.len() >= limit {
                break;
            }
            found.push((key.to_vec(), value.to_vec()));
        }
        Ok(found)
    }

    fn flush(&self) -> Result<(), StorageError> {
        // sled's own flush writes its buffers out (pwrite) but ends in
        // sync_file_range, which is not durable; the sync that is follows.
        self.db().flush().map_err(|error| self.write_failed(error))?;
        self.files
            .sync()
            .map_err(|error| self.write_failed(format!("syncing the outbox files failed: {error}")))
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db().size_on_disk().map_err(io_error)
    }
}
