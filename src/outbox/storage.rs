//! The key-value storage under the outbox, behind a small trait.
//!
//! The outbox only needs ordered keys, atomic multi-key batches, prefix scans
//! and an explicit durable flush. Keeping sled behind [`OutboxStorage`] lets
//! tests inject faults (`FaultyStorage`, test builds only) where a real disk would be needed
//! to make them happen, and keeps sled's types out of the rest of the crate.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Duration;

use super::commit_log;
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
/// How often sled is checkpointed while writes arrive.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// This much log since the last checkpoint starts one at once.
const CHECKPOINT_BYTES: u64 = 2 * commit_log::SEGMENT_BYTES;

/// The production store: sled's tree, with the [`commit_log`] in front of
/// it for durability.
///
/// A write is appended to the log, then applied to sled; a flush is an
/// `fdatasync` of the log. A checkpoint thread makes sled durable in the
/// background (sled's `flush()`, then [`DurableFiles`]) and deletes the
/// segments it covered. sled is opened without its own flusher, and its
/// writes are not batches: the log's records are the atomic unit after a
/// crash, and the order lock below keeps each record's writes from being
/// seen half done.
pub struct SledStorage {
    inner: Arc<StorageInner>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
}

struct StorageInner {
    /// Not dropped once the store failed: sled flushes on drop, and what
    /// it holds then may include writes the log refused.
    /// `None` only while dropping.
    db: Option<sled::Db>,
    files: DurableFiles,
    log_directory: PathBuf,
    /// The order lock: records are appended and applied under it (write),
    /// reads see whole records only (read).
    log: RwLock<LogWriter>,
    /// The first write, flush or checkpoint error: every later write and
    /// flush is refused with it.
    broken: OnceLock<String>,
    checkpoint_every: Duration,
    /// Set when the store closes; wakes the checkpoint thread.
    stop: Mutex<bool>,
    wake: Condvar,
}

struct LogWriter {
    segment: commit_log::Segment,
    /// Segments before the current one, oldest first.
    closed: Vec<u64>,
    /// The number the next record gets.
    next: u64,
    since_checkpoint: u64,
}

impl SledStorage {
    /// Opens (creating) the store and applies the log records sled does
    /// not hold yet. `cache_bytes` bounds sled's page cache, which is what
    /// keeps memory flat however deep the outbox grows.
    ///
    /// A store that is locked is tried again for up to [`LOCK_WAIT`]: sled
    /// releases its lock from its background threads, a moment after the
    /// last handle is dropped, so a reopen right after a close in the same
    /// process (a restart, or tests) would otherwise fail at random.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StorageError> {
        Self::open_checkpointing_every(path, cache_bytes, CHECKPOINT_EVERY)
    }

    /// [`SledStorage::open`] with another checkpoint interval (tests hold
    /// checkpoints off to see the log replayed).
    fn open_checkpointing_every(path: &Path, cache_bytes: u64, every: Duration) -> Result<Self, StorageError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match Self::open_once(path, cache_bytes, every) {
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
    fn open_once(path: &Path, cache_bytes: u64, checkpoint_every: Duration) -> Result<Self, StorageError> {
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
                // Durability is the commit log's; sled is checkpointed.
                .flush_every_ms(None)
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
        let log_directory = path.join(commit_log::LOG_DIRECTORY);
        let log_error = |error: std::io::Error| StorageError::Io(format!("{}: {error}", log_directory.display()));
        let applied = applied_record(&db)?;
        let records = commit_log::records_after(&log_directory, applied).map_err(|error| match error {
            commit_log::ReplayError::Damaged(found) => damaged(path, found),
            commit_log::ReplayError::Io(error) => log_error(error),
        })?;
        let last = records.last().map_or(applied, |record| record.number);
        if !records.is_empty() {
            tracing::info!(
                records = records.len(),
                from = applied + 1,
                to = last,
                "applying the commit log records the store did not hold yet"
            );
        }
        for record in records {
            apply_to_sled(&db, record.operations).map_err(io_error)?;
        }
        // What was replayed is made durable in sled before the segments
        // that held it go; the log starts again after it.
        db.flush().map_err(io_error)?;
        files.sync().map_err(log_error)?;
        let stale = commit_log::list_segments(&log_directory).map_err(log_error)?;
        std::fs::create_dir_all(&log_directory).map_err(log_error)?;
        std::fs::File::open(path)
            .and_then(|directory| directory.sync_all())
            .map_err(log_error)?;
        let segment = commit_log::Segment::create(&log_directory, last + 1).map_err(log_error)?;
        for (first, stale) in stale {
            if first != last + 1 {
                std::fs::remove_file(&stale).map_err(log_error)?;
            }
        }
        let inner = Arc::new(StorageInner {
            db: Some(db),
            files,
            log_directory,
            log: RwLock::new(LogWriter {
                segment,
                closed: Vec::new(),
                next: last + 1,
                since_checkpoint: 0,
            }),
            broken: OnceLock::new(),
            checkpoint_every,
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let checkpointer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("outbox-checkpoint".into())
                .spawn(move || inner.checkpoint_until_stopped())
                .map_err(|error| StorageError::Io(format!("cannot start the outbox checkpoint thread: {error}")))?
        };
        Ok(Self {
            inner,
            checkpointer: Some(checkpointer),
        })
    }
}

/// The last log record sled holds (0: none, a new or older store).
fn applied_record(db: &sled::Db) -> Result<u64, StorageError> {
    match db.get(commit_log::APPLIED_KEY).map_err(io_error)? {
        None => Ok(0),
        Some(value) => <[u8; 8]>::try_from(value.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StorageError::Corrupt(format!("the outbox's {:?} record is damaged", "m/log_applied"))),
    }
}

/// One record's writes, one by one: the log, not a sled batch, makes them
/// atomic after a crash (and a sled batch would seal and hand over sled's
/// buffer to its I/O threads every time).
pub(super) fn apply_to_sled(db: &sled::Db, operations: Vec<WriteOperation>) -> Result<(), sled::Error> {
    for (key, value) in operations {
        match value {
            Some(value) => db.insert(key, value)?,
            None => db.remove(key)?,
        };
    }
    Ok(())
}

fn io_error(error: sled::Error) -> StorageError {
    StorageError::Io(error.to_string())
}

impl StorageInner {
    fn db(&self) -> &sled::Db {
        self.db.as_ref().expect("the store is open")
    }

    fn refuse_if_broken(&self) -> Result<(), StorageError> {
        match self.broken.get() {
            Some(first) => Err(StorageError::Failed(first.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, error: StorageError) -> StorageError {
        let _ = self.broken.set(error.to_string());
        error
    }

    fn read_order(&self) -> std::sync::RwLockReadGuard<'_, LogWriter> {
        self.log.read().expect("outbox order lock poisoned")
    }

    fn append_and_apply(&self, mut operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        self.refuse_if_broken()?;
        let mut log = self.log.write().expect("outbox order lock poisoned");
        let number = log.next;
        operations.push((commit_log::APPLIED_KEY.to_vec(), Some(number.to_be_bytes().to_vec())));
        let record = commit_log::encode_record(number, &operations);
        let log_error = |error: std::io::Error| StorageError::Io(format!("{}: {error}", self.log_directory.display()));
        if log.segment.length >= commit_log::SEGMENT_BYTES {
            // The old segment is synced before the new one exists, so a
            // flush of the current segment covers every earlier record.
            log.segment
                .file
                .sync_data()
                .map_err(|error| self.fail(log_error(error)))?;
            let segment = commit_log::Segment::create(&self.log_directory, number)
                .map_err(|error| self.fail(log_error(error)))?;
            let old = std::mem::replace(&mut log.segment, segment);
            log.closed.push(old.first);
        }
        log.segment
            .append(&record)
            .map_err(|error| self.fail(log_error(error)))?;
        if let Err(error) = apply_to_sled(self.db(), operations) {
            // Not applied in full: the record is cut off again, so no later
            // flush or replay makes the refused write durable.
            let length = log.segment.length - record.len() as u64;
            if log.segment.file.set_len(length).is_ok() {
                log.segment.length = length;
            }
            return Err(self.fail(io_error(error)));
        }
        log.next = number + 1;
        log.since_checkpoint += record.len() as u64;
        if log.since_checkpoint >= CHECKPOINT_BYTES {
            self.wake.notify_one();
        }
        Ok(())
    }

    fn sync_log(&self) -> Result<(), StorageError> {
        self.refuse_if_broken()?;
        let file = self.read_order().segment.file.clone();
        file.sync_data().map_err(|error| {
            self.fail(StorageError::Io(format!(
                "syncing the outbox commit log ({}) failed: {error}",
                self.log_directory.display()
            )))
        })
    }

    /// Makes sled durable up to the last record applied, then deletes the
    /// segments that held only records up to it.
    fn checkpoint(&self) -> Result<(), StorageError> {
        let (covered, closed, current_first) = {
            let mut log = self.log.write().expect("outbox order lock poisoned");
            log.since_checkpoint = 0;
            (log.next - 1, log.closed.clone(), log.segment.first)
        };
        self.db().flush().map_err(io_error)?;
        self.files
            .sync()
            .map_err(|error| StorageError::Io(format!("syncing the outbox files failed: {error}")))?;
        // A closed segment is covered when the one after it starts at or
        // below `covered + 1`.
        let mut deletable = Vec::new();
        for (index, first) in closed.iter().enumerate() {
            let successor = closed.get(index + 1).copied().unwrap_or(current_first);
            if successor <= covered + 1 {
                deletable.push(*first);
            }
        }
        if !deletable.is_empty() {
            self.log
                .write()
                .expect("outbox order lock poisoned")
                .closed
                .retain(|first| !deletable.contains(first));
            for first in deletable {
                let path = self.log_directory.join(commit_log::segment_name(first));
                if let Err(error) = std::fs::remove_file(&path) {
                    tracing::warn!(%error, path = %path.display(), "removing a checkpointed commit log segment failed");
                }
            }
        }
        metrics::counter!("taskgate_outbox_checkpoints_total").increment(1);
        Ok(())
    }

    fn checkpoint_until_stopped(&self) {
        loop {
            {
                let stopped = self.stop.lock().expect("checkpoint lock poisoned");
                if *stopped {
                    return;
                }
                let (stopped, _) = self
                    .wake
                    .wait_timeout(stopped, self.checkpoint_every)
                    .expect("checkpoint lock poisoned");
                if *stopped {
                    return;
                }
            }
            if self.broken.get().is_some() || self.read_order().since_checkpoint == 0 {
                continue;
            }
            if let Err(error) = self.checkpoint() {
                tracing::error!(%error, "checkpointing the outbox store failed: it refuses writes until taskgate is restarted");
                self.fail(error);
            }
        }
    }
}

impl Drop for SledStorage {
    /// Stops the checkpoint thread, then checkpoints once more, so a clean
    /// close leaves nothing to replay.
    fn drop(&mut self) {
        *self.inner.stop.lock().expect("checkpoint lock poisoned") = true;
        self.inner.wake.notify_all();
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
        if self.inner.broken.get().is_none() {
            if let Err(error) = self.inner.checkpoint() {
                tracing::error!(%error, "the last checkpoint of the outbox store failed; the next open replays its log");
                self.inner.fail(error);
            }
        }
    }
}

impl Drop for StorageInner {
    fn drop(&mut self) {
        if self.broken.get().is_some() {
            if let Some(db) = self.db.take() {
                std::mem::forget(db);
            }
        }
    }
}

impl OutboxStorage for SledStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let _order = self.inner.read_order();
        Ok(self.inner.db().get(key).map_err(io_error)?.map(|v| v.to_vec()))
    }

    fn apply(&self, operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        self.inner.append_and_apply(operations)
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KeyValuePairs, StorageError> {
        let start = match after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let mut found = Vec::new();
        let mut range = self.inner.db().range::<Vec<u8>, _>((start, Bound::Unbounded));
        while found.len() < limit {
            // Each step sees whole records, as sled's batches were seen.
            let item = {
                let _order = self.inner.read_order();
                range.next()
            };
            let Some(item) = item else { break };
            let (key, value) = item.map_err(io_error)?;
            if !key.starts_with(prefix) {
                break;
            }
            found.push((key.to_vec(), value.to_vec()));
        }
        Ok(found)
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.inner.sync_log()
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        let log_bytes: u64 = commit_log::list_segments(&self.inner.log_directory)
            .map(|segments| {
                segments
                    .iter()
                    .filter_map(|(_, path)| std::fs::metadata(path).ok())
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0);
        Ok(self.inner.db().size_on_disk().map_err(io_error)? + log_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_directory(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                copy_directory(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    fn key(number: u32) -> Vec<u8> {
        format!("q/lane\0{number:08}").into_bytes()
    }

    /// What a crash leaves (the files as they are, sled never flushed
    /// since the writes) opens with every flushed write: the log's records
    /// are applied to sled at open, removals included.
    #[test]
    fn a_store_copied_before_any_checkpoint_opens_with_every_flushed_write() {
        let directory = tempfile::tempdir().unwrap();
        let original = directory.path().join("original");
        let storage = SledStorage::open_checkpointing_every(&original, 1 << 20, Duration::from_secs(3600)).unwrap();
        for number in 0..200 {
            storage
                .apply(vec![
                    (key(number), Some(vec![number as u8; 300])),
                    (key(number + 1_000), Some(vec![1])),
                ])
                .unwrap();
        }
        storage
            .apply((0..50).map(|number| (key(number), None)).collect())
            .unwrap();
        storage.flush().unwrap();
        let crashed = directory.path().join("crashed");
        copy_directory(&original, &crashed);
        drop(storage);

        // The copy's sled alone holds none of it: the log has it all.
        {
            let db = sled::Config::new().path(&crashed).flush_every_ms(None).open().unwrap();
            assert_eq!(applied_record(&db).unwrap(), 0);
            let records = commit_log::records_after(&crashed.join(commit_log::LOG_DIRECTORY), 0).unwrap();
            assert_eq!(records.len(), 201);
        }
        let reopened = SledStorage::open(&crashed, 1 << 20).unwrap();
        assert_eq!(reopened.get(&key(10)).unwrap(), None);
        assert_eq!(reopened.get(&key(120)).unwrap(), Some(vec![120; 300]));
        assert_eq!(reopened.scan(b"q/", None, 1000).unwrap().len(), 150 + 200);
        assert_eq!(applied_record(reopened.inner.db()).unwrap(), 201);
        // Replayed, checkpointed, and the log started again after it.
        let segments = commit_log::list_segments(&crashed.join(commit_log::LOG_DIRECTORY)).unwrap();
        assert_eq!(segments.iter().map(|(first, _)| *first).collect::<Vec<_>>(), vec![202]);
        reopened.apply(vec![(key(5), Some(vec![5]))]).unwrap();
        drop(reopened);
        let again = SledStorage::open(&crashed, 1 << 20).unwrap();
        assert_eq!(again.get(&key(5)).unwrap(), Some(vec![5]));
    }

    /// The log does not grow without bound: a checkpoint deletes the
    /// segments it covered.
    #[test]
    fn a_checkpoint_deletes_the_segments_it_covered() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("outbox");
        let storage = SledStorage::open_checkpointing_every(&path, 1 << 20, Duration::from_secs(3600)).unwrap();
        let value = vec![7u8; 64 << 10];
        // One and a half segments: less than a checkpoint's worth of log.
        let writes = (3 * commit_log::SEGMENT_BYTES / 2 / value.len() as u64) as u32;
        for number in 0..writes {
            storage.apply(vec![(key(number % 8), Some(value.clone()))]).unwrap();
        }
        storage.flush().unwrap();
        let log = path.join(commit_log::LOG_DIRECTORY);
        assert_eq!(commit_log::list_segments(&log).unwrap().len(), 2);
        storage.inner.checkpoint().unwrap();
        let left = commit_log::list_segments(&log).unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(storage.get(&key(3)).unwrap(), Some(value.clone()));
        drop(storage);
        let reopened = SledStorage::open(&path, 1 << 20).unwrap();
        assert_eq!(reopened.get(&key(3)).unwrap(), Some(value));
    }
}
