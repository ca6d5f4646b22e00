//! A store that fails on demand, for the unit tests of what the outbox
//! promises when the disk does not cooperate. Test builds only: a release
//! binary cannot be told to fail its writes.

use super::storage::{KeyValuePairs, OutboxStorage, StorageError, WriteOperation};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A store that fails on demand, for tests of what the outbox promises when
/// the disk does not cooperate (a failed flush must never produce a 202).
pub struct FaultyStorage {
    inner: Arc<dyn OutboxStorage>,
    fail_writes: AtomicBool,
    fail_flushes: AtomicBool,
    /// Writes still let through before `fail_writes` turns on by itself.
    writes_before_failing: AtomicUsize,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn OutboxStorage>) -> Self {
        Self {
            inner,
            fail_writes: AtomicBool::new(false),
            fail_flushes: AtomicBool::new(false),
            writes_before_failing: AtomicUsize::new(usize::MAX),
        }
    }

    pub fn fail_writes(&self, fail: bool) {
        if !fail {
            self.writes_before_failing.store(usize::MAX, Ordering::SeqCst);
        }
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Lets `writes` more writes through, then fails every later one, as a
    /// disk that fills in the middle of a group would.
    pub fn fail_writes_after(&self, writes: usize) {
        self.writes_before_failing.store(writes, Ordering::SeqCst);
    }

    pub fn fail_flushes(&self, fail: bool) {
        self.fail_flushes.store(fail, Ordering::SeqCst);
    }
}

impl OutboxStorage for FaultyStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(key)
    }

    fn apply(&self, operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        let let_through = self
            .writes_before_failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                (left != usize::MAX).then(|| left.saturating_sub(1))
            })
            .unwrap_or(usize::MAX);
        if let_through == 0 {
            self.fail_writes.store(true, Ordering::SeqCst);
        }
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StorageError::Io("injected write failure".into()));
        }
        self.inner.apply(operations)
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KeyValuePairs, StorageError> {
        self.inner.scan(prefix, after, limit)
    }

    fn flush(&self) -> Result<(), StorageError> {
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(StorageError::Io("injected flush failure".into()));
        }
        self.inner.flush()
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.inner.size_on_disk()
    }
}
