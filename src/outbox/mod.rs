//! The durable outbox: every accepted task is written here before `202`,
//! and leaves only once the broker confirmed it (or as a dead letter).
//!
//! # Invariants
//!
//! 1. **Accepted means durable.** [`Outbox::accept`] returns `Ok` only after a
//!    flush that started after the task's batch was applied has completed
//!    ([`group_commit`]). Concurrent accepts are written by one committer
//!    thread as one batch per group, covered by one flush.
//! 2. **FIFO per lane.** A lane is one delivery destination (the AMQP
//!    exchange, or one SQS queue). Sequence numbers are assigned under the
//!    insert lock, in the same critical section that applies the batch, so
//!    key order within a lane is acceptance order, and a key is visible only
//!    once every smaller key of the lane is. The relay always reads a lane
//!    from its head, so retries and restarts preserve order.
//! 3. **At least once.** Entries are removed only by [`Outbox::complete`]
//!    (broker confirmed) or [`Outbox::dead_letter`] (permanent failure).
//! 4. **Bounded.** Pending bytes are counted in memory; an accept that
//!    would pass `max_bytes` is refused with [`OutboxError::Full`]. Readers
//!    page through lanes (`head(limit)`), and sled's page cache is capped,
//!    so memory does not grow with depth.
//! 5. **All or nothing.** Every accept (one task or a batch, its status
//!    records, its tracking journal entries and its idempotency key) is
//!    written whole or not at all: as one atomic storage batch, or, for a
//!    small accept group, as single keys behind a manifest, which a crash
//!    cut short is rolled back at open ([`group_manifest`]).
//! 6. **Counters are stored with what they count.** Every batch that adds or
//!    removes pending entries or dead letters carries the new `m/counters`
//!    record ([`apply_counted`]), so the record always matches the entries
//!    after any crash, and opening a deep outbox reads one key instead of
//!    every pending record (sled 0.34 keeps what a full scan read resident
//!    past its cache cap: about 50 MB for 76,000 tasks, measured when this
//!    record was introduced, commit 0d803e9).
//!    A store without the record (older outboxes, stores written by tests)
//!    is scanned once at open, and the record written.
//!
//! # Where each part lives (split by role, as vector's disk buffer splits
//! its ledger, reader and writer)
//!
//! - this file: the settings, the errors, [`Outbox`] and the state its
//!   handle shares with the committer thread (`Shared`, one `Arc`), open,
//!   stats, pruning, flushes;
//! - [`keys`]: every key of the layout below, built and parsed;
//! - [`records`]: the stored records and the answers readers get;
//! - [`counters`]: counting what is pending, and the one room rule
//!   ([`within_limit`]);
//! - [`accept`] (on the committer thread), [`group_manifest`] and
//!   [`group_commit`]: the write path, one write and one flush per group;
//! - [`delivery`]: what the relay reads and writes (heads, completion,
//!   sent marks, failures, dead letters);
//! - [`operations`]: what operators do (list, drain, export, import,
//!   requeue, purge); [`salvage`]: recovering a damaged store;
//! - [`journal`]: the tracking journal; [`watermark`], [`durable_files`],
//!   [`failure`], [`storage`]: durability and the store underneath.
//!
//! # On-disk layout (one sled tree; big-endian integers so keys sort)
//!
//! | key | value |
//! |---|---|
//! | `q/{lane}\0{sequence:u64}` | pending [`Task`] (JSON) |
//! | `t/{task id:16 bytes}` | [`TaskStatus`] (JSON): state, attempts, last error |
//! | `d/{sequence:u64}` | [`DeadLetter`] (JSON): the task and the reason |
//! | `i/{idempotency key}` | [`IdempotencyRecord`] (JSON), honoured for 24 h |
//! | `p/{published at, ms:u64}{task id}` | the ids (16 bytes each) of the tasks one window published, the key's id first: retention index of published statuses (empty in older outboxes: the key's id alone) |
//! | `m/sequence_reserved` | u64: the next sequence (every sequence in use lies below it), written by every batch that hands out sequences |
//! | `m/counters` | [`PersistedCounters`] (JSON): pending depth and bytes per lane, depth per queue, dead letters, journal entries, the last finished accept group |
//! | `j/{sequence:u64}` | accepted [`Task`] (JSON) not yet recorded in the tracking database ([`journal`]) |
//! | `m/operator_holds` | [`crate::relay::holds::OperatorHolds`] (JSON): a pause or forced breaker state that outlives a restart; absent = none |
//! | `m/accept_group` | the last accept group's manifest ([`group_manifest`]): its number (u64), then each key it writes (u32 length, bytes); the group is finished once `m/counters` names its number as `finished_group` |
//! | `m/sent/{lane}` | u64: the highest sequence of the lane ever handed to the broker; a later send of an entry at or below it is a re-send ([`Outbox::mark_sending`]) |
//!
//! # What makes a batch durable
//!
//! sled's `flush()` alone is not (it ends in `sync_file_range`); a flush
//! here is sled's `flush()` followed by `fdatasync` of sled's log file, of
//! any new blob file, and `fsync` of the directories whose names changed
//! ([`durable_files`] says which and why that is enough). Nothing is
//! readable before the flush that covers it returned ([`group_commit`]),
//! and a failed write or flush stops the store ([`failure`]).
//!
//! Beside sled's files, `accepted-watermark` ([`watermark`]) records how
//! far accepts were made durable, so a log that sled opens at an earlier
//! state (damage in its middle) is refused as damaged instead of served
//! with acknowledged tasks missing.
//!
//! Lane names never contain `\0` (they are exchange or queue names).

mod accept;
mod counters;
mod delivery;
mod durable_files;
pub mod failure;
#[cfg(test)]
mod faulty_storage;
pub mod group_commit;
mod group_manifest;
pub mod journal;
mod keys;
pub mod operations;
mod records;
pub mod salvage;
pub mod storage;
pub mod watermark;

use crate::task::{QueueName, Task, TaskId};
use chrono::{DateTime, Utc};
pub(crate) use counters::within_limit;
use counters::{apply_counted, scan_counters, Counters, PersistedCounters, StoredQueues, ROOM_AGAIN_FRACTION};
#[cfg(test)]
pub use faulty_storage::FaultyStorage;
use group_commit::GroupCommitter;
use keys::{
    dead_key, parse_pending_key, pending_key, pending_prefix, published_index_ids, published_index_key, status_key,
    COUNTERS, DEAD, IDEMPOTENCY, OPERATOR_HOLDS, PENDING, PUBLISHED_INDEX, SEQUENCE_RESERVED,
};
pub use records::{
    AcceptOutcome, Acceptance, Attempt, DeadLetter, IdempotencyKey, IdempotencyRecord, OutboxStats, PendingEntry,
    QueueStats, SendMark, TaskState, TaskStatus,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use storage::{OutboxStorage, SledStorage, StorageError};
use tokio::sync::Notify;

pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Outbox settings (`[outbox]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSettings {
    pub path: PathBuf,
    /// Pending bytes at which new tasks are refused with 503.
    pub max_bytes: u64,
    /// sled page cache; bounds memory whatever the depth. sled's resident
    /// memory runs well above this figure, so the default is small; the
    /// measured RSS is in docs/benchmarks.md.
    pub cache_bytes: u64,
    /// How long the status of a published task stays answerable by
    /// `GET /v1/tasks/{id}` from the outbox alone.
    pub published_retention_seconds: u64,
    /// Tasks the tracking journal holds at most while the tracking database
    /// is away; past it, new tasks are still accepted and published but not
    /// journaled (so not recorded), rather than filling the disk.
    pub max_journal_entries: u64,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/outbox"),
            max_bytes: 1 << 30,
            cache_bytes: 8 << 20,
            published_retention_seconds: 3600,
            max_journal_entries: 1_000_000,
        }
    }
}

#[cfg(test)]
impl OutboxSettings {
    /// Defaults, with the store in `dir/outbox`, for tests across the crate.
    pub(crate) fn for_test(dir: &std::path::Path) -> Self {
        Self {
            path: dir.join("outbox"),
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the outbox is full ({used} of {limit} bytes used)")]
    Full { used: u64, limit: u64 },
    #[error("task id {0} was already accepted")]
    DuplicateTaskId(TaskId),
    #[error("the Idempotency-Key {key:?} was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("outbox record could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A delivery destination with its own FIFO order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lane(String);

impl Lane {
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        debug_assert!(!name.contains('\0'));
        Self(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sequence allocator, behind the insert lock. Invariant: every
/// sequence ever written lies below the *stored* `m/sequence_reserved`,
/// which is exactly the next sequence: an open with stored counters starts
/// from it without reading the lanes, and a store whose log went back in
/// time shows it against the [`watermark`].
#[derive(Clone, Copy)]
struct SequenceState {
    next: u64,
    reserved: u64,
    /// The number of the last accept group written (finished or not):
    /// the next group takes the one after it ([`group_manifest`]).
    group: u64,
}

impl SequenceState {
    /// Hands out `count` consecutive sequences and returns the first; the
    /// new next sequence joins `operations`, to be written in the same
    /// batch (one 8-byte key per batch). If that batch fails, the caller
    /// puts back the state it had before: a sequence advanced in memory
    /// only would let later writes use sequences the store never recorded.
    fn allocate(&mut self, count: u64, operations: &mut Vec<storage::WriteOperation>) -> u64 {
        let first = self.next;
        self.next = first + count;
        if self.next > self.reserved {
            self.reserved = self.next;
            operations.push((SEQUENCE_RESERVED.to_vec(), Some(self.reserved.to_be_bytes().to_vec())));
        }
        first
    }
}

/// What the outbox's handle and the committer thread that writes accepts
/// ([`accept::AcceptWriter`]) share, behind one `Arc`: one store, one
/// sequence allocator, one set of counters, one view of what is durable.
struct Shared {
    storage: Arc<dyn OutboxStorage>,
    /// The first failed write or flush, after which the store refuses all.
    failure: Arc<failure::StorageFailure>,
    /// What may be read yet: only what a successful flush covered.
    visibility: group_commit::Visibility,
    /// Held while sequences are assigned and the batch applied (invariant 2).
    insert_lock: Mutex<SequenceState>,
    counters: Mutex<Counters>,
    /// Set when an accept was refused for lack of room; cleared once the
    /// outbox drained below [`ROOM_AGAIN_FRACTION`] of its limit, so a load
    /// balancer does not flap on every confirmed task.
    refusing: AtomicBool,
    /// Journal entries not yet recorded in the tracking database.
    journal_depth: AtomicU64,
    /// When accepts last queued up for the disk (see [`accept`]).
    last_crowded_group: Mutex<Option<std::time::Instant>>,
}

pub struct Outbox {
    shared: Arc<Shared>,
    committer: GroupCommitter,
    /// Serialises read-modify-write of status records.
    status_lock: Mutex<()>,
    settings: OutboxSettings,
    new_work: Notify,
    /// Wakes the tracking writer after an accept.
    new_journal: Notify,
    /// When [`Outbox::complete`] last removed entries (`None` before it
    /// ever did): how the tracking writer tells that a backlog is being
    /// published.
    last_completion: Mutex<Option<std::time::Instant>>,
    /// Each lane's `m/sent/{lane}` as last written (read on first use).
    sent_marks: Mutex<HashMap<Lane, Option<u64>>>,
}

fn age_seconds(since: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    ((now - since).num_milliseconds().max(0) as f64) / 1000.0
}

impl Outbox {
    /// Opens the outbox at `settings.path` and rebuilds its counters.
    pub fn open(settings: &OutboxSettings) -> Result<Arc<Self>, OutboxError> {
        std::fs::create_dir_all(&settings.path)
            .map_err(|error| StorageError::Io(format!("{}: {error}", settings.path.display())))?;
        let storage = SledStorage::open(&settings.path, settings.cache_bytes)?;
        Self::with_storage(Arc::new(storage), settings.clone())
    }

    /// Opens an outbox over any storage (tests inject faults this way).
    pub fn with_storage(storage: Arc<dyn OutboxStorage>, settings: OutboxSettings) -> Result<Arc<Self>, OutboxError> {
        let failure = Arc::new(failure::StorageFailure::default());
        let storage: Arc<dyn OutboxStorage> = Arc::new(failure::GuardedStorage::new(storage, failure.clone()));
        // Before anything is read or counted: a group a crash cut short
        // was never acknowledged, and none of it may be seen.
        let watermark_reading = watermark::read(&settings.path);
        let accepted_below = match watermark_reading {
            watermark::Reading::Valid(accepted_below) => Some(accepted_below),
            _ => None,
        };
        let last_group = group_manifest::roll_back_unfinished(storage.as_ref(), &settings.path, accepted_below)?;
        let stored = storage
            .get(COUNTERS)?
            .and_then(|bytes| serde_json::from_slice::<PersistedCounters>(&bytes).ok())
            .filter(PersistedCounters::is_plausible);
        let stored_journal = stored.as_ref().and_then(|record| record.journal);
        let complete_record = stored_journal.is_some();
        let (mut counters, highest_pending) = match stored {
            // Every sequence in use lies below the stored reservation, so
            // the pending keys need not be read for it either.
            Some(record) => (Counters::from_record(record), 0),
            None => scan_counters(storage.as_ref())?,
        };
        let (journal_depth, highest_journal_sequence) = match stored_journal {
            Some(depth) => (depth, 0),
            None => journal::scan_depth(storage.as_ref())?,
        };
        counters.journal = journal_depth;
        if !complete_record {
            storage.apply(vec![(
                COUNTERS.to_vec(),
                Some(serde_json::to_vec(&counters.to_record())?),
            )])?;
        }
        let highest_sequence = highest_pending.max(highest_journal_sequence);
        let reserved = storage
            .get(SEQUENCE_RESERVED)?
            .and_then(|bytes| bytes.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let next = reserved.max(highest_sequence.saturating_add(1));
        // Sequences are handed out one by one from 0: one this large comes
        // from a damaged record or key, and allocating past it would
        // overflow (or, wrapped, overwrite pending tasks).
        if next >= 1 << 62 {
            return Err(StorageError::Corrupt(format!(
                "the outbox at {} is damaged: its sequence record or a key holds sequence {next}, far past any \
                 ever handed out. taskgate cannot use it: recover its tasks into a new outbox with \
                 `taskgate outbox salvage --offline --to-outbox NEW_DIR` (docs/operations.md, \"A damaged outbox\")",
                settings.path.display()
            ))
            .into());
        }
        match watermark_reading {
            watermark::Reading::Valid(accepted_below) if accepted_below > next => {
                return Err(StorageError::Corrupt(format!(
                    "the outbox at {} is damaged: it opened at an earlier state than it had acknowledged (tasks \
                     up to sequence {accepted_below} were accepted, the store now ends below {next}), so accepted \
                     tasks are missing from it. taskgate will not serve it: recover its tasks into a new outbox \
                     with `taskgate outbox salvage --offline --include-unmatched --to-outbox NEW_DIR` \
                     (docs/operations.md, \"A damaged outbox\")",
                    settings.path.display()
                ))
                .into());
            }
            watermark::Reading::Unreadable(why) => {
                tracing::warn!(%why, "the outbox's accepted-sequence watermark is unreadable; it is rewritten");
            }
            _ => {}
        }
        let shared = Arc::new(Shared {
            storage,
            failure,
            visibility: group_commit::Visibility::new(next),
            insert_lock: Mutex::new(SequenceState {
                next,
                reserved: next,
                group: last_group,
            }),
            counters: Mutex::new(counters),
            refusing: AtomicBool::new(false),
            journal_depth: AtomicU64::new(journal_depth),
            last_crowded_group: Mutex::new(None),
        });
        let writer = accept::AcceptWriter {
            shared: shared.clone(),
            max_bytes: settings.max_bytes,
            max_journal_entries: settings.max_journal_entries,
            journal_skipping: AtomicBool::new(false),
        };
        let committer = GroupCommitter::start(writer, watermark::Watermark::new(&settings.path))?;
        Ok(Arc::new(Self {
            shared,
            committer,
            status_lock: Mutex::new(()),
            settings,
            new_work: Notify::new(),
            new_journal: Notify::new(),
            last_completion: Mutex::new(None),
            sent_marks: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether the outbox is under load right now (within `recent`): a
    /// backlog is being published (tasks pending, and the broker confirmed
    /// some), or accepts are queueing up for the disk in large groups.
    pub fn is_busy(&self, recent: Duration) -> bool {
        let within = |at: &Mutex<Option<std::time::Instant>>| {
            at.lock()
                .expect("outbox load lock poisoned")
                .is_some_and(|at| at.elapsed() < recent)
        };
        (self.depth() > 0 && within(&self.last_completion)) || within(&self.shared.last_crowded_group)
    }

    pub fn settings(&self) -> &OutboxSettings {
        &self.settings
    }

    /// Makes `tasks` durable, each in the given lanes, atomically, and
    /// returns once they are on disk. The request is encoded here and
    /// written by the committer with every other accept of its group (one
    /// batch, one flush).
    pub async fn accept(
        &self,
        tasks: Vec<(Task, Vec<Lane>)>,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<AcceptOutcome, OutboxError> {
        let prepared = accept::PreparedAccept::prepare(tasks, idempotency)?;
        let outcome = self.committer.accept(prepared).await?;
        if matches!(outcome, AcceptOutcome::Accepted(_)) {
            self.new_work.notify_one();
            self.new_journal.notify_one();
        }
        Ok(outcome)
    }

    /// Resolves when new work may be waiting (a permit is kept if nobody
    /// was waiting, so a wake-up is never lost).
    pub async fn wait_for_work(&self) {
        self.new_work.notified().await
    }

    /// Wakes the relay, e.g. after a requeue or an operator's drain.
    pub fn notify_work(&self) {
        self.new_work.notify_one();
    }

    /// The task's status; `None` for an unknown id, and for one whose
    /// accept has not become durable (or never will: its flush failed).
    pub fn status(&self, id: &TaskId) -> Result<Option<TaskStatus>, OutboxError> {
        if self.shared.visibility.hides(id) {
            return Ok(None);
        }
        match self.shared.storage.get(&status_key(id))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Dead letters in sequence order, after `after` when given.
    pub fn dead_letters(&self, after: Option<u64>, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        let after_key = after.map(dead_key);
        self.shared
            .storage
            .scan(DEAD, after_key.as_deref(), limit)?
            .into_iter()
            // The key says which letter a record is, whatever a damaged
            // record claims: callers page and requeue by it.
            .filter_map(|(key, value)| Some((<[u8; 8]>::try_from(key.strip_prefix(DEAD)?).ok()?, value)))
            .map(|(sequence, value)| {
                let mut letter: DeadLetter = serde_json::from_slice(&value)?;
                letter.sequence = u64::from_be_bytes(sequence);
                Ok(letter)
            })
            .collect()
    }

    pub fn depth(&self) -> u64 {
        self.shared.counters.lock().expect("counters poisoned").depth
    }

    pub fn bytes(&self) -> u64 {
        self.shared.counters.lock().expect("counters poisoned").bytes
    }

    /// False from the moment a task was refused for lack of room until the
    /// outbox drained below 90% of its limit.
    /// Always false once the store has failed ([`Outbox::storage_failure`]).
    pub fn has_room(&self) -> bool {
        if self.shared.failure.error().is_some() {
            return false;
        }
        let bytes = self.bytes();
        if !within_limit(bytes, 1, self.settings.max_bytes) {
            return false;
        }
        if self.shared.refusing.load(Ordering::SeqCst) {
            if (bytes as f64) < self.settings.max_bytes as f64 * ROOM_AGAIN_FRACTION {
                self.shared.refusing.store(false, Ordering::SeqCst);
            } else {
                return false;
            }
        }
        true
    }

    /// Depth, bytes and ages. Ages read the head of each lane (one key each).
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let now = Utc::now();
        let (depth, bytes, dead_letters, queue_depths, lanes) = {
            let counters = self.shared.counters.lock().expect("counters poisoned");
            (
                counters.depth,
                counters.bytes,
                counters.dead_letters,
                counters.queue_depths.clone(),
                counters.lanes.keys().cloned().collect::<Vec<_>>(),
            )
        };
        let mut oldest: Option<DateTime<Utc>> = None;
        let mut queue_oldest: HashMap<QueueName, DateTime<Utc>> = HashMap::new();
        for lane in lanes {
            if let Some(head) = self.head(&lane, 1)?.into_iter().next() {
                let accepted = head.task.accepted_at;
                oldest = Some(oldest.map_or(accepted, |o| o.min(accepted)));
                for queue in head.task.queues {
                    let entry = queue_oldest.entry(queue).or_insert(accepted);
                    *entry = (*entry).min(accepted);
                }
            }
        }
        let queues = queue_depths
            .into_iter()
            .map(|(queue, depth)| {
                let oldest = queue_oldest.get(&queue).map(|at| age_seconds(*at, now));
                (
                    queue.to_string(),
                    QueueStats {
                        depth,
                        oldest_age_seconds: oldest,
                    },
                )
            })
            .collect();
        Ok(OutboxStats {
            depth,
            bytes,
            max_bytes: self.settings.max_bytes,
            oldest_age_seconds: oldest.map(|at| age_seconds(at, now)),
            dead_letters,
            queues,
        })
    }

    /// Forgets published statuses past their retention and idempotency keys
    /// past their window. Runs in pages so it never holds much in memory.
    pub fn prune(&self) -> Result<u64, OutboxError> {
        let now = Utc::now();
        let retention = chrono::Duration::seconds(self.settings.published_retention_seconds as i64);
        let cutoff = published_index_key(now - retention, &TaskId::from_bytes([0; 16]));
        let mut removed = 0;
        loop {
            let page = self.shared.storage.scan(PUBLISHED_INDEX, None, 1024)?;
            let expired: Vec<_> = page.into_iter().filter(|(key, _)| key < &cutoff).collect();
            if expired.is_empty() {
                break;
            }
            let _status_guard = self.status_lock.lock().expect("status lock poisoned");
            let mut operations = Vec::with_capacity(expired.len() * 2);
            for (key, value) in &expired {
                let ids = published_index_ids(key, value);
                removed += ids.len() as u64;
                operations.extend(ids.into_iter().map(|id| (status_key(&id), None)));
                operations.push((key.clone(), None));
            }
            self.shared.storage.apply(operations)?;
        }
        let window = chrono::Duration::from_std(IDEMPOTENCY_WINDOW).unwrap_or_default();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.shared.storage.scan(IDEMPOTENCY, after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let stale: Vec<_> = page
                .into_iter()
                .filter(|(_, value)| {
                    serde_json::from_slice::<IdempotencyRecord>(value)
                        .map(|record| now - record.created_at >= window)
                        .unwrap_or(true)
                })
                .map(|(key, _)| (key, None))
                .collect();
            removed += stale.len() as u64;
            if !stale.is_empty() {
                self.shared.storage.apply(stale)?;
            }
        }
        Ok(removed)
    }

    /// The operator's holds record as last saved (`None` when none is
    /// held); its meaning is the relay's ([`crate::relay::holds`]).
    pub fn operator_holds_record(&self) -> Result<Option<Vec<u8>>, OutboxError> {
        Ok(self.shared.storage.get(OPERATOR_HOLDS)?)
    }

    /// Saves the operator's holds record (`None`: no holds) and flushes
    /// before returning, so an acknowledged hold survives a crash. Blocking.
    pub fn save_operator_holds_record(&self, record: Option<Vec<u8>>) -> Result<(), OutboxError> {
        self.shared.storage.apply(vec![(OPERATOR_HOLDS.to_vec(), record)])?;
        self.shared.storage.flush()?;
        Ok(())
    }

    /// Makes every write so far durable (and visible: a requeued entry is
    /// published only once it is durable, so the relay is woken).
    pub async fn flush(&self) -> Result<(), OutboxError> {
        self.committer.commit().await?;
        self.new_work.notify_one();
        Ok(())
    }

    /// [`Outbox::flush`] for the relay's own writes (sent marks and
    /// completions): shares the next accept's flush when accepts are
    /// arriving, so a producer never waits behind a flush of the relay's.
    /// Unlike [`Outbox::flush`] it does not wake the relay, its caller:
    /// accepts made durable by the same flush wake it themselves.
    pub async fn flush_soon(&self) -> Result<(), OutboxError> {
        self.committer.commit_soon().await
    }

    /// The write or flush failure that stopped the store, if one did: the
    /// outbox then accepts and publishes nothing until taskgate restarts.
    pub fn storage_failure(&self) -> Option<&failure::RecordedFailure> {
        self.shared.failure.error()
    }
}

#[cfg(test)]
mod record_proptests;
#[cfg(test)]
mod tests;
