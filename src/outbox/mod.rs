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
//! 5. **All-or-nothing batches.** Every accept (one task or a batch, its
//!    status records, its tracking journal entries and its idempotency key)
//!    is one atomic storage batch.
//! 6. **Counters are stored with what they count.** Every batch that adds or
//!    removes pending entries or dead letters carries the new `m/counters`
//!    record ([`apply_counted`]), so the record always matches the entries
//!    after any crash, and opening a deep outbox reads one key instead of
//!    every pending record (sled 0.34 keeps what a full scan read resident
//!    past its cache cap: about 50 MB for 76,000 tasks; docs/benchmarks.md).
//!    A store without the record (older outboxes, stores written by tests)
//!    is scanned once at open, and the record written.
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
//! | `m/counters` | [`PersistedCounters`] (JSON): pending depth and bytes per lane, depth per queue, dead letters |
//! | `j/{sequence:u64}` | accepted [`Task`] (JSON) not yet recorded in the tracking database ([`journal`]) |
//! | `m/operator_holds` | [`OperatorHolds`] (JSON): a pause or forced breaker state that outlives a restart; absent = none |
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
mod durable_files;
pub mod failure;
#[cfg(test)]
mod faulty_storage;
pub mod group_commit;
pub mod journal;
pub mod operations;
pub mod salvage;
pub mod storage;
pub mod watermark;

use crate::task::{QueueName, Task, TaskId, TaskName};
use chrono::{DateTime, Utc};
#[cfg(test)]
pub use faulty_storage::FaultyStorage;
use group_commit::GroupCommitter;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
pub use storage::{OutboxStorage, SledStorage, StorageError};
use tokio::sync::Notify;

const PENDING: &[u8] = b"q/";
const STATUS: &[u8] = b"t/";
const DEAD: &[u8] = b"d/";
const IDEMPOTENCY: &[u8] = b"i/";
const PUBLISHED_INDEX: &[u8] = b"p/";
const SEQUENCE_RESERVED: &[u8] = b"m/sequence_reserved";
const COUNTERS: &[u8] = b"m/counters";
const JOURNAL: &[u8] = b"j/";
const OPERATOR_HOLDS: &[u8] = b"m/operator_holds";
const SENT_MARK: &[u8] = b"m/sent/";
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

/// An operator's override of the breaker's own decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerOverride {
    /// Nothing is published until it is released or closed.
    Open,
    /// Failures no longer open the breaker.
    Closed,
}

/// What an operator told the relay to do until told otherwise. Stored, so
/// a restart (a deploy, a crash) does not silently undo it: a pause taken
/// to inspect a poison task must not end with the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OperatorHolds {
    pub relay_paused: bool,
    pub breaker: Option<BreakerOverride>,
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

    fn check_same_request(&self, stored_fingerprint: &str) -> Result<(), OutboxError> {
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
    fn key(&self) -> Vec<u8> {
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

#[derive(Default, Clone)]
struct LaneCounter {
    depth: u64,
    bytes: u64,
}

#[derive(Default, Clone)]
struct Counters {
    lanes: HashMap<Lane, LaneCounter>,
    queue_depths: HashMap<QueueName, u64>,
    depth: u64,
    bytes: u64,
    dead_letters: u64,
    /// Tracking journal entries (mirrored in `Outbox::journal_depth` for
    /// lock-free reads).
    journal: u64,
}

impl Counters {
    fn add(&mut self, lane: &Lane, queues: &[QueueName], bytes: u64) {
        let counter = self.lanes.entry(lane.clone()).or_default();
        counter.depth += 1;
        counter.bytes += bytes;
        self.depth += 1;
        self.bytes += bytes;
        for queue in queues {
            *self.queue_depths.entry(queue.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, lane: &Lane, queues: &[QueueName], bytes: u64) {
        if let Some(counter) = self.lanes.get_mut(lane) {
            counter.depth = counter.depth.saturating_sub(1);
            counter.bytes = counter.bytes.saturating_sub(bytes);
            if counter.depth == 0 {
                self.lanes.remove(lane);
            }
        }
        self.depth = self.depth.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
        self.remove_queues(queues);
    }

    fn to_record(&self) -> PersistedCounters {
        PersistedCounters {
            lanes: self
                .lanes
                .iter()
                .map(|(lane, counter)| (lane.clone(), counter.depth, counter.bytes))
                .collect(),
            queues: self
                .queue_depths
                .iter()
                .map(|(queue, depth)| (queue.clone(), *depth))
                .collect(),
            dead_letters: self.dead_letters,
            journal: Some(self.journal),
        }
    }

    fn from_record(record: PersistedCounters) -> Self {
        let mut counters = Counters {
            dead_letters: record.dead_letters,
            journal: record.journal.unwrap_or_default(),
            ..Counters::default()
        };
        for (lane, depth, bytes) in record.lanes {
            counters.depth += depth;
            counters.bytes += bytes;
            counters.lanes.insert(lane, LaneCounter { depth, bytes });
        }
        counters.queue_depths = record.queues.into_iter().collect();
        counters
    }

    fn remove_queues(&mut self, queues: &[QueueName]) {
        for queue in queues {
            if let Some(depth) = self.queue_depths.get_mut(queue) {
                *depth = depth.saturating_sub(1);
                if *depth == 0 {
                    self.queue_depths.remove(queue);
                }
            }
        }
    }
}

/// The counters as stored under `m/counters` (invariant 6).
#[derive(Debug, Serialize, Deserialize)]
struct PersistedCounters {
    /// (lane, pending entries, pending bytes)
    lanes: Vec<(Lane, u64, u64)>,
    /// (queue, pending tasks that will reach it)
    queues: Vec<(QueueName, u64)>,
    dead_letters: u64,
    /// Tracking journal entries; absent in records written before it was
    /// kept here (the journal is then scanned once).
    #[serde(default)]
    journal: Option<u64>,
}

impl PersistedCounters {
    /// Whether the counts, summed, are ones a store could hold (below
    /// 2^48). A record that says more is damaged and is not believed: the
    /// entries are counted again instead, and arithmetic on the counters
    /// can never overflow.
    fn is_plausible(&self) -> bool {
        let counts = self.lanes.iter().flat_map(|(_, depth, bytes)| [*depth, *bytes]);
        let counts = counts.chain(self.queues.iter().map(|(_, depth)| *depth));
        counts
            .chain([self.dead_letters, self.journal.unwrap_or(0)])
            .try_fold(0u64, u64::checked_add)
            .is_some_and(|total| total < 1 << 48)
    }
}

/// Applies `operations` and the counters as `change` leaves them in one
/// atomic batch, then makes the new counters current. The counters lock is
/// held throughout, so records are written in the order the counters
/// changed.
fn apply_counted(
    storage: &dyn OutboxStorage,
    counters: &Mutex<Counters>,
    mut operations: Vec<storage::WriteOperation>,
    change: impl FnOnce(&mut Counters),
) -> Result<(), OutboxError> {
    let mut current = counters.lock().expect("counters poisoned");
    let mut updated = current.clone();
    change(&mut updated);
    operations.push((COUNTERS.to_vec(), Some(serde_json::to_vec(&updated.to_record())?)));
    storage.apply(operations)?;
    *current = updated;
    Ok(())
}

/// The one field of a stored [`Task`] the counters need. Decoding only this
/// at open (serde skips the rest without building it) is what keeps a
/// restart over a deep outbox quick.
#[derive(Deserialize)]
struct StoredQueues {
    queues: Vec<QueueName>,
}

/// The outbox's one limit rule, for its pending bytes (`outbox.max_bytes`)
/// and its tracking journal (`outbox.max_journal_entries`): `adding` more
/// fit while the total stays at or under `limit`; full means not even one
/// more fits. Every accept, import, requeue and room check asks it.
pub(crate) fn within_limit(used: u64, adding: u64, limit: u64) -> bool {
    used.saturating_add(adding) <= limit
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

pub struct Outbox {
    storage: Arc<dyn OutboxStorage>,
    committer: GroupCommitter,
    /// The first failed write or flush, after which the store refuses all.
    failure: Arc<failure::StorageFailure>,
    /// What may be read yet: only what a successful flush covered.
    visibility: Arc<group_commit::Visibility>,
    /// Held while sequences are assigned and the batch applied (invariant 2).
    insert_lock: Arc<Mutex<SequenceState>>,
    /// Serialises read-modify-write of status records.
    status_lock: Mutex<()>,
    counters: Arc<Mutex<Counters>>,
    settings: OutboxSettings,
    new_work: Notify,
    /// Set when an accept was refused for lack of room; cleared once the
    /// outbox drained below [`ROOM_AGAIN_FRACTION`] of its limit, so a load
    /// balancer does not flap on every confirmed task.
    refusing: Arc<AtomicBool>,
    /// Journal entries not yet recorded in the tracking database.
    journal_depth: Arc<AtomicU64>,
    /// Wakes the tracking writer after an accept.
    new_journal: Notify,
    /// When [`Outbox::complete`] last removed entries (`None` before it
    /// ever did): how the tracking writer tells that a backlog is being
    /// published.
    last_completion: Mutex<Option<std::time::Instant>>,
    /// When accepts last queued up for the disk (see [`accept`]).
    last_crowded_group: Arc<Mutex<Option<std::time::Instant>>>,
    /// Each lane's `m/sent/{lane}` as last written (read on first use).
    sent_marks: Mutex<HashMap<Lane, Option<u64>>>,
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

/// Readiness returns once pending bytes fall below this share of the limit.
const ROOM_AGAIN_FRACTION: f64 = 0.9;

fn pending_prefix(lane: &Lane) -> Vec<u8> {
    let mut key = Vec::with_capacity(PENDING.len() + lane.0.len() + 1);
    key.extend_from_slice(PENDING);
    key.extend_from_slice(lane.0.as_bytes());
    key.push(0);
    key
}

fn pending_key(lane: &Lane, sequence: u64) -> Vec<u8> {
    let mut key = pending_prefix(lane);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// Splits `q/{lane}\0{sequence}` back into its parts.
fn parse_pending_key(key: &[u8]) -> Option<(Lane, u64)> {
    let rest = key.strip_prefix(PENDING)?;
    if rest.len() < 9 || rest[rest.len() - 9] != 0 {
        return None;
    }
    let (lane, sequence) = rest.split_at(rest.len() - 9);
    // A damaged key may hold a `\0` in the lane part; no lane has one.
    let lane = std::str::from_utf8(lane).ok().filter(|lane| !lane.contains('\0'))?;
    let sequence = u64::from_be_bytes(sequence[1..].try_into().ok()?);
    Some((Lane::new(lane), sequence))
}

fn prefixed(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

fn status_key(id: &TaskId) -> Vec<u8> {
    prefixed(STATUS, id.as_bytes())
}

fn dead_key(sequence: u64) -> Vec<u8> {
    prefixed(DEAD, &sequence.to_be_bytes())
}

fn idempotency_key(key: &str) -> Vec<u8> {
    prefixed(IDEMPOTENCY, key.as_bytes())
}

fn published_index_key(at: DateTime<Utc>, id: &TaskId) -> Vec<u8> {
    let millis = at.timestamp_millis().max(0) as u64;
    let mut key = prefixed(PUBLISHED_INDEX, &millis.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// The tasks a retention index record stands for: the ids in its value
/// (one record per published window), or, for a record with an empty value
/// (outboxes written before 2026-11-28), the one id at the end of its key.
fn published_index_ids(key: &[u8], value: &[u8]) -> Vec<TaskId> {
    if value.is_empty() {
        let Some(id) = key
            .len()
            .checked_sub(16)
            .and_then(|at| <[u8; 16]>::try_from(&key[at..]).ok())
        else {
            return Vec::new();
        };
        return vec![TaskId::from_bytes(id)];
    }
    value
        .chunks_exact(16)
        .filter_map(|chunk| <[u8; 16]>::try_from(chunk).ok())
        .map(TaskId::from_bytes)
        .collect()
}

fn age_seconds(since: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    ((now - since).num_milliseconds().max(0) as f64) / 1000.0
}

/// Counts pending entries and dead letters by reading them all; used only
/// when the store has no `m/counters` record yet. Returns the counters and
/// the highest pending sequence.
fn scan_counters(storage: &dyn OutboxStorage) -> Result<(Counters, u64), OutboxError> {
    let mut counters = Counters::default();
    let mut highest_sequence = 0u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage.scan(PENDING, after.as_deref(), 4096)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, value) in &page {
            let Some((lane, sequence)) = parse_pending_key(key) else {
                continue;
            };
            highest_sequence = highest_sequence.max(sequence);
            match serde_json::from_slice::<StoredQueues>(value) {
                Ok(stored) => counters.add(&lane, &stored.queues, value.len() as u64),
                Err(_) => {
                    // Counted by lane only; the relay dead-letters it.
                    let counter = counters.lanes.entry(lane).or_default();
                    counter.depth += 1;
                    counter.bytes += value.len() as u64;
                    counters.depth += 1;
                    counters.bytes += value.len() as u64;
                }
            }
        }
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage.scan(DEAD, after.as_deref(), 4096)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        counters.dead_letters += page.len() as u64;
    }
    Ok((counters, highest_sequence))
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
        match watermark::read(&settings.path) {
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
        let insert_lock = Arc::new(Mutex::new(SequenceState { next, reserved: next }));
        let counters = Arc::new(Mutex::new(counters));
        let refusing = Arc::new(AtomicBool::new(false));
        let journal_depth = Arc::new(AtomicU64::new(journal_depth));
        let last_crowded_group = Arc::new(Mutex::new(None));
        let visibility = Arc::new(group_commit::Visibility::new(next));
        let writer = accept::AcceptWriter {
            storage: storage.clone(),
            insert_lock: insert_lock.clone(),
            counters: counters.clone(),
            refusing: refusing.clone(),
            journal_depth: journal_depth.clone(),
            max_bytes: settings.max_bytes,
            max_journal_entries: settings.max_journal_entries,
            journal_skipping: AtomicBool::new(false),
            last_crowded_group: last_crowded_group.clone(),
            visibility: visibility.clone(),
        };
        let committer = GroupCommitter::start(
            storage.clone(),
            writer,
            insert_lock.clone(),
            visibility.clone(),
            watermark::Watermark::new(&settings.path),
        )?;
        Ok(Arc::new(Self {
            storage,
            committer,
            failure,
            visibility,
            insert_lock,
            status_lock: Mutex::new(()),
            counters,
            settings,
            new_work: Notify::new(),
            refusing,
            journal_depth,
            new_journal: Notify::new(),
            last_completion: Mutex::new(None),
            last_crowded_group,
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
        (self.depth() > 0 && within(&self.last_completion)) || within(&self.last_crowded_group)
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

    /// Lanes that hold pending work, in name order.
    pub fn lanes(&self) -> Vec<Lane> {
        let counters = self.counters.lock().expect("counters poisoned");
        let mut lanes: Vec<Lane> = counters.lanes.keys().cloned().collect();
        lanes.sort();
        lanes
    }

    /// The first `limit` tasks of `lane` in order. A record that cannot be
    /// decoded is moved to the dead letters on the spot (it could never be
    /// published, and must not block the lane).
    pub fn head(&self, lane: &Lane, limit: usize) -> Result<Vec<PendingEntry>, OutboxError> {
        self.entries_after(lane, None, limit)
    }

    /// Like [`Outbox::head`], but starting after `sequence` (the entries
    /// up to it are already being published).
    pub fn entries_after(
        &self,
        lane: &Lane,
        sequence: Option<u64>,
        limit: usize,
    ) -> Result<Vec<PendingEntry>, OutboxError> {
        let prefix = pending_prefix(lane);
        let mut entries = Vec::with_capacity(limit.min(1024));
        let mut after: Option<Vec<u8>> = sequence.map(|sequence| pending_key(lane, sequence));
        while entries.len() < limit {
            let page = self.storage.scan(&prefix, after.as_deref(), limit - entries.len())?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in page {
                let Some((lane, sequence)) = parse_pending_key(&key) else {
                    continue;
                };
                // Keys sort by sequence: everything after this one is
                // newer still, and not durable either (group_commit).
                if !self.visibility.is_durable(sequence) {
                    return Ok(entries);
                }
                match serde_json::from_slice::<Task>(&value) {
                    Ok(task) => entries.push(PendingEntry {
                        lane,
                        sequence,
                        task,
                        encoded_len: value.len(),
                    }),
                    Err(error) => self.dead_letter_undecodable(&lane, sequence, &key, &value, &error)?,
                }
            }
        }
        Ok(entries)
    }

    fn dead_letter_undecodable(
        &self,
        lane: &Lane,
        sequence: u64,
        key: &[u8],
        value: &[u8],
        error: &serde_json::Error,
    ) -> Result<(), OutboxError> {
        tracing::error!(%lane, sequence, %error, "undecodable outbox record moved to dead letters");
        let letter = DeadLetter {
            sequence,
            lane: lane.clone(),
            task: None,
            raw: Some(String::from_utf8_lossy(value).into_owned()),
            reason: format!("outbox record could not be decoded: {error}"),
            attempts: 0,
            dead_at: Utc::now(),
        };
        let operations = vec![
            (key.to_vec(), None),
            (dead_key(sequence), Some(serde_json::to_vec(&letter)?)),
        ];
        apply_counted(self.storage.as_ref(), &self.counters, operations, |counters| {
            // Counted by queue too if at least its queues decode.
            match serde_json::from_slice::<StoredQueues>(value) {
                Ok(stored) => counters.remove(lane, &stored.queues, value.len() as u64),
                Err(_) => counters.remove(lane, &[], value.len() as u64),
            }
            counters.dead_letters += 1;
        })?;
        metrics::counter!("taskgate_dead_letters_total").increment(1);
        Ok(())
    }

    /// Removes confirmed entries; a task whose every lane confirmed becomes
    /// `published`. Not flushed here: the relay flushes before it sends the
    /// next window and when it ends a round, so a crash re-sends at most
    /// the window being settled and the one in flight (at-least-once).
    pub fn complete(&self, entries: &[&PendingEntry]) -> Result<(), OutboxError> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let _status_guard = self.status_lock.lock().expect("status lock poisoned");
        let mut operations = Vec::with_capacity(entries.len() * 3);
        let mut statuses: HashMap<TaskId, TaskStatus> = HashMap::new();
        for entry in entries {
            operations.push((entry.key(), None));
            let status = match statuses.remove(&entry.task.id) {
                Some(status) => Some(status),
                None => self.status(&entry.task.id)?,
            };
            if let Some(mut status) = status {
                status.remaining_deliveries = status.remaining_deliveries.saturating_sub(1);
                if status.remaining_deliveries == 0 {
                    status.state = TaskState::Published;
                    status.published_at = Some(now);
                    status.last_error = None;
                }
                statuses.insert(entry.task.id, status);
            }
        }
        // One retention index record for the whole window, listing the ids
        // it published: one sled write per window instead of one per task.
        let mut published_ids: Vec<u8> = Vec::new();
        let mut first_published: Option<TaskId> = None;
        for (id, status) in statuses {
            if status.state == TaskState::Published {
                first_published.get_or_insert(id);
                published_ids.extend_from_slice(id.as_bytes());
            }
            operations.push((status_key(&id), Some(serde_json::to_vec(&status)?)));
        }
        if let Some(first) = first_published {
            operations.push((published_index_key(now, &first), Some(published_ids)));
        }
        apply_counted(self.storage.as_ref(), &self.counters, operations, |counters| {
            for entry in entries {
                counters.remove(&entry.lane, &entry.task.queues, entry.encoded_len as u64);
            }
        })?;
        *self.last_completion.lock().expect("completion lock poisoned") = Some(std::time::Instant::now());
        Ok(())
    }

    /// Called before `entries` (a window of `lane`, in sequence order) are
    /// sent: counts those handed to the broker before (after a failed
    /// window, or by a process that crashed before their completion was
    /// durable) and moves the lane's mark past the window. The mark is
    /// written, not flushed: the caller flushes before sending when it
    /// moved. The caller counts the re-sends (`taskgate_republished_total`).
    pub fn mark_sending(&self, lane: &Lane, entries: &[PendingEntry]) -> Result<SendMark, OutboxError> {
        let Some(last) = entries.last().map(|entry| entry.sequence) else {
            return Ok(SendMark {
                resent: 0,
                moved: false,
            });
        };
        let mut marks = self.sent_marks.lock().expect("sent marks poisoned");
        let mark = match marks.get(lane) {
            Some(mark) => *mark,
            None => {
                let key = prefixed(SENT_MARK, lane.as_str().as_bytes());
                let stored = self.storage.get(&key)?;
                stored.and_then(|bytes| bytes.try_into().ok().map(u64::from_be_bytes))
            }
        };
        let resent = mark.map_or(0, |mark| {
            entries.iter().filter(|entry| entry.sequence <= mark).count() as u64
        });
        let moved = mark.is_none_or(|mark| last > mark);
        if moved {
            let key = prefixed(SENT_MARK, lane.as_str().as_bytes());
            self.storage.apply(vec![(key, Some(last.to_be_bytes().to_vec()))])?;
            marks.insert(lane.clone(), Some(last));
        } else {
            marks.insert(lane.clone(), mark);
        }
        Ok(SendMark { resent, moved })
    }

    /// Notes a failure on each task's status: the last error, and, when
    /// something was sent, one more attempt.
    pub fn record_failure(&self, entries: &[&PendingEntry], error: &str, attempt: Attempt) -> Result<(), OutboxError> {
        if entries.is_empty() {
            return Ok(());
        }
        let _status_guard = self.status_lock.lock().expect("status lock poisoned");
        let mut operations = Vec::with_capacity(entries.len());
        for entry in entries {
            if let Some(mut status) = self.status(&entry.task.id)? {
                if attempt == Attempt::Made {
                    status.attempts = status.attempts.saturating_add(1);
                }
                status.last_error = Some(error.to_owned());
                operations.push((status_key(&entry.task.id), Some(serde_json::to_vec(&status)?)));
            }
        }
        self.storage.apply(operations)?;
        Ok(())
    }

    /// Moves an entry to the dead letters with the reason; the lane goes on.
    /// `attempt` says whether the broker saw it (a task that expired while
    /// spooled never reached it).
    pub fn dead_letter(&self, entry: &PendingEntry, reason: &str, attempt: Attempt) -> Result<(), OutboxError> {
        let _status_guard = self.status_lock.lock().expect("status lock poisoned");
        let mut operations = vec![(entry.key(), None)];
        let mut attempts = 0;
        if let Some(mut status) = self.status(&entry.task.id)? {
            if attempt == Attempt::Made {
                status.attempts = status.attempts.saturating_add(1);
            }
            attempts = status.attempts;
            status.state = TaskState::DeadLetter;
            status.last_error = Some(reason.to_owned());
            operations.push((status_key(&entry.task.id), Some(serde_json::to_vec(&status)?)));
        }
        let letter = DeadLetter {
            sequence: entry.sequence,
            lane: entry.lane.clone(),
            task: Some(entry.task.clone()),
            raw: None,
            reason: reason.to_owned(),
            attempts,
            dead_at: Utc::now(),
        };
        operations.push((dead_key(entry.sequence), Some(serde_json::to_vec(&letter)?)));
        apply_counted(self.storage.as_ref(), &self.counters, operations, |counters| {
            counters.remove(&entry.lane, &entry.task.queues, entry.encoded_len as u64);
            counters.dead_letters += 1;
        })?;
        metrics::counter!("taskgate_dead_letters_total").increment(1);
        tracing::warn!(task_id = %entry.task.id, lane = %entry.lane, reason, "task dead-lettered");
        Ok(())
    }

    /// The task's status; `None` for an unknown id, and for one whose
    /// accept has not become durable (or never will: its flush failed).
    pub fn status(&self, id: &TaskId) -> Result<Option<TaskStatus>, OutboxError> {
        if self.visibility.hides(id) {
            return Ok(None);
        }
        match self.storage.get(&status_key(id))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Dead letters in sequence order, after `after` when given.
    pub fn dead_letters(&self, after: Option<u64>, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        let after_key = after.map(dead_key);
        self.storage
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
        self.counters.lock().expect("counters poisoned").depth
    }

    pub fn bytes(&self) -> u64 {
        self.counters.lock().expect("counters poisoned").bytes
    }

    /// False from the moment a task was refused for lack of room until the
    /// outbox drained below 90% of its limit.
    /// Always false once the store has failed ([`Outbox::storage_failure`]).
    pub fn has_room(&self) -> bool {
        if self.failure.error().is_some() {
            return false;
        }
        let bytes = self.bytes();
        if !within_limit(bytes, 1, self.settings.max_bytes) {
            return false;
        }
        if self.refusing.load(Ordering::SeqCst) {
            if (bytes as f64) < self.settings.max_bytes as f64 * ROOM_AGAIN_FRACTION {
                self.refusing.store(false, Ordering::SeqCst);
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
            let counters = self.counters.lock().expect("counters poisoned");
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
            let page = self.storage.scan(PUBLISHED_INDEX, None, 1024)?;
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
            self.storage.apply(operations)?;
        }
        let window = chrono::Duration::from_std(IDEMPOTENCY_WINDOW).unwrap_or_default();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.storage.scan(IDEMPOTENCY, after.as_deref(), 1024)?;
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
                self.storage.apply(stale)?;
            }
        }
        Ok(removed)
    }

    /// The operator's holds as last saved (none when never saved). A record
    /// that does not decode is reported, not ignored: guessing "no hold"
    /// could publish what an operator held back.
    pub fn operator_holds(&self) -> Result<OperatorHolds, OutboxError> {
        match self.storage.get(OPERATOR_HOLDS)? {
            Some(bytes) => Ok(serde_json::from_slice(&bytes)?),
            None => Ok(OperatorHolds::default()),
        }
    }

    /// Saves the operator's holds and flushes before returning, so an
    /// acknowledged pause survives a crash. Blocking.
    pub fn save_operator_holds(&self, holds: &OperatorHolds) -> Result<(), OutboxError> {
        let operation = if *holds == OperatorHolds::default() {
            (OPERATOR_HOLDS.to_vec(), None)
        } else {
            (OPERATOR_HOLDS.to_vec(), Some(serde_json::to_vec(holds)?))
        };
        self.storage.apply(vec![operation])?;
        self.storage.flush()?;
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
        self.failure.error()
    }
}

#[cfg(test)]
mod record_proptests;
#[cfg(test)]
mod tests;
