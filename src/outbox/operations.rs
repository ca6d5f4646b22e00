//! Operator operations on the outbox: reports, paged listing, export and
//! import, purge, and dead-letter requeue and deletion. Both the admin API
//! and the CLI's `--offline` mode go through these, so they answer in the
//! same shapes ([`OutboxReport`], [`OutboxRecord`], [`DeadLetterEntry`]).
//!
//! They keep the invariants of the outbox (see the parent module):
//! - **Memory stays bounded.** Everything that walks the outbox does so in
//!   pages behind a cursor ([`PendingCursor`], a dead letter's sequence);
//!   nothing collects the whole outbox.
//! - **FIFO per lane.** A requeued dead letter gets a fresh sequence under
//!   the insert lock, so it goes to the *tail* of its lane and becomes
//!   visible only after every older entry, exactly like an accept. Imports
//!   go through [`Outbox::accept`] itself.
//! - **Counters match storage.** Every removal or insertion here updates the
//!   in-memory counters in the same step as its atomic storage batch.
//!   Removing pending entries races with the relay completing the same
//!   entries (a double count); callers must hold the relay's rounds while
//!   purging ([`crate::relay::Relay::hold_rounds`]), or own the outbox
//!   exclusively (offline).
//! - **Import is idempotent by task id.** A task whose status record exists
//!   is skipped, so importing the same file twice delivers each task once.
//!
//! Nothing here flushes: callers that changed something call
//! [`Outbox::flush`] before they report success.

use super::{
    apply_counted, dead_key, parse_pending_key, pending_key, pending_prefix, status_key, DeadLetter, Lane, Outbox,
    OutboxError, OutboxStats, StoredQueues, TaskState, TaskStatus, DEAD, PENDING,
};
use crate::task::{QueueName, Task, TaskId, TaskName};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// A pending record being removed, decoded as far as it goes.
struct RemovedEntry {
    key: Vec<u8>,
    task: Option<Task>,
    /// What the counters counted it under (empty if even that did not decode).
    queues: Vec<QueueName>,
    bytes: u64,
}

/// Pages read per storage scan when purging or requeueing everything.
const WORK_PAGE: usize = 512;

/// Outbox figures as operators see them (`GET /v1/outbox`, `outbox stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutboxReport {
    /// Tasks waiting to be published.
    pub depth: u64,
    /// Their size, counted against `max_bytes`.
    pub bytes: u64,
    /// `outbox.max_bytes`.
    pub max_bytes: u64,
    /// Age of the oldest waiting task.
    pub oldest_age_seconds: Option<f64>,
    /// Tasks in the dead-letter store.
    pub dead_letters: u64,
    /// Whether the relay is paused by an operator (offline: whether a
    /// server started on this outbox would start paused).
    pub paused: bool,
    /// Per queue: tasks waiting that will reach it, and the oldest's age.
    pub queues: BTreeMap<String, QueueReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueReport {
    pub depth: u64,
    pub oldest_age_seconds: Option<f64>,
}

impl OutboxReport {
    pub fn new(stats: OutboxStats, paused: bool) -> Self {
        Self {
            depth: stats.depth,
            bytes: stats.bytes,
            max_bytes: stats.max_bytes,
            oldest_age_seconds: stats.oldest_age_seconds,
            dead_letters: stats.dead_letters,
            paused,
            queues: stats
                .queues
                .into_iter()
                .map(|(name, queue)| {
                    (
                        name,
                        QueueReport {
                            depth: queue.depth,
                            oldest_age_seconds: queue.oldest_age_seconds,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// One pending task as listed and exported: the task itself (every field a
/// publisher needs, so an import elsewhere publishes the same message) and
/// where it waits. One line of an NDJSON export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRecord {
    #[serde(flatten)]
    pub task: Task,
    /// The lane it waits in on the exporting gateway (informational; an
    /// import routes with the importing gateway's own settings).
    #[serde(default)]
    pub lane: Option<Lane>,
    #[serde(default)]
    pub sequence: Option<u64>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Where a listing or export continues: just after this pending key.
/// Opaque to clients (URL-safe base64 of the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCursor(Vec<u8>);

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0:?} is not a cursor this gateway handed out")]
pub struct InvalidCursor(pub String);

impl PendingCursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.0)
    }

    pub fn decode(text: &str) -> Result<Self, InvalidCursor> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .filter(|key| parse_pending_key(key).is_some())
            .map(Self)
            .ok_or_else(|| InvalidCursor(text.to_owned()))
    }
}

/// A page of pending tasks; `next` is `None` once the end was reached.
#[derive(Debug, Clone)]
pub struct PendingPage {
    pub records: Vec<OutboxRecord>,
    pub next: Option<PendingCursor>,
}

/// A dead letter as operators see it. `id` is what requeue and delete take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetterEntry {
    /// The dead letter's id.
    pub id: u64,
    /// The task's id, when its record could be decoded.
    #[schema(value_type = Option<String>, format = "uuid")]
    pub task_id: Option<TaskId>,
    /// The task's name, when its record could be decoded.
    #[schema(value_type = Option<String>)]
    pub task_name: Option<TaskName>,
    /// The lane (exchange or queue) it was to be published on.
    #[schema(value_type = String)]
    pub lane: Lane,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Failed publish attempts.
    pub attempts: u32,
    pub dead_at: DateTime<Utc>,
    /// The whole task, when the record could be decoded.
    #[schema(value_type = Option<Object>)]
    pub task: Option<Task>,
    /// The stored bytes (lossily as text) when it could not.
    pub raw: Option<String>,
}

impl From<DeadLetter> for DeadLetterEntry {
    fn from(letter: DeadLetter) -> Self {
        Self {
            id: letter.sequence,
            task_id: letter.task.as_ref().map(|task| task.id),
            task_name: letter.task.as_ref().map(|task| task.task.clone()),
            lane: letter.lane,
            reason: letter.reason,
            attempts: letter.attempts,
            dead_at: letter.dead_at,
            task: letter.task,
            raw: letter.raw,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportOutcome {
    /// Tasks accepted.
    pub imported: u64,
    /// Tasks whose id this outbox already knows (or repeated in the input).
    pub skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequeueOutcome {
    /// Dead letters put back in the outbox.
    pub requeued: u64,
    /// Dead letters whose record could not be decoded: they can only be
    /// deleted.
    pub undecodable: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("there is no dead letter {0}")]
    NotFound(u64),
    #[error("dead letter {0} holds a record that could not be decoded; it can only be deleted")]
    Undecodable(u64),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Just the id of a stored task, to compare records without decoding them.
#[derive(Deserialize)]
struct IdOnly {
    id: TaskId,
}

impl Outbox {
    /// Depth, bytes, ages and dead letters, with the relay's pause state.
    pub fn report(&self, paused: bool) -> Result<OutboxReport, OutboxError> {
        Ok(OutboxReport::new(self.stats()?, paused))
    }

    /// Up to `limit` pending entries after `after`, lane by lane, each lane
    /// in FIFO order. A record that cannot be decoded is dead-lettered on
    /// the spot, as [`Outbox::head`] does.
    pub fn list_pending(&self, after: Option<&PendingCursor>, limit: usize) -> Result<PendingPage, OutboxError> {
        self.pending_page(after, limit, false)
    }

    /// Like [`Outbox::list_pending`], but each task once: a task waiting in
    /// several lanes (one per SQS queue) is exported at its first pending
    /// entry only. A page may hold fewer than `limit` records (even none)
    /// while `next` is still set.
    pub fn export_page(&self, after: Option<&PendingCursor>, limit: usize) -> Result<PendingPage, OutboxError> {
        self.pending_page(after, limit, true)
    }

    fn pending_page(
        &self,
        after: Option<&PendingCursor>,
        limit: usize,
        once_per_task: bool,
    ) -> Result<PendingPage, OutboxError> {
        let limit = limit.max(1);
        let page = self
            .shared
            .storage
            .scan(PENDING, after.map(|cursor| cursor.0.as_slice()), limit)?;
        let next = (page.len() == limit).then(|| PendingCursor(page.last().expect("a full page").0.clone()));
        let lanes = if once_per_task { self.lanes() } else { Vec::new() };
        let mut records = Vec::with_capacity(page.len());
        for (key, value) in page {
            let Some((lane, sequence)) = parse_pending_key(&key) else {
                continue;
            };
            let task = match serde_json::from_slice::<Task>(&value) {
                Ok(task) => task,
                Err(error) => {
                    self.dead_letter_undecodable(&lane, sequence, &key, &value, &error)?;
                    continue;
                }
            };
            if once_per_task && self.has_earlier_sibling(&lanes, sequence, &task)? {
                continue;
            }
            let status = self.status(&task.id)?;
            records.push(OutboxRecord {
                attempts: status.as_ref().map_or(0, |status| status.attempts),
                last_error: status.and_then(|status| status.last_error),
                task,
                lane: Some(lane),
                sequence: Some(sequence),
            });
        }
        Ok(PendingPage { records, next })
    }

    /// Whether `task` still waits in some lane under a smaller sequence.
    /// One accept gives a task's lanes consecutive sequences (one lane per
    /// queue at most), so its other entries lie within `queues.len() - 1`
    /// sequences before this one: a few point reads, no memory of what was
    /// already exported. (A requeued dead letter breaks the adjacency; then
    /// the task may be exported twice, which an import skips by id.)
    fn has_earlier_sibling(&self, lanes: &[Lane], sequence: u64, task: &Task) -> Result<bool, OutboxError> {
        let span = task.queues.len().max(1) as u64;
        for distance in 1..span {
            let Some(earlier) = sequence.checked_sub(distance) else {
                break;
            };
            for lane in lanes {
                if let Some(value) = self.shared.storage.get(&pending_key(lane, earlier))? {
                    if serde_json::from_slice::<IdOnly>(&value).is_ok_and(|other| other.id == task.id) {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Accepts tasks moved from another outbox, each into `lanes`, skipping
    /// ids this outbox already knows. Durable when it returns, like any
    /// accept; `accepted_at` is kept, so ages and order carry over.
    pub async fn import(&self, tasks: Vec<(Task, Vec<Lane>)>) -> Result<ImportOutcome, OutboxError> {
        let total = tasks.len() as u64;
        let mut seen = HashSet::with_capacity(tasks.len());
        let mut fresh = Vec::with_capacity(tasks.len());
        for (task, lanes) in tasks {
            if seen.insert(task.id) && self.status(&task.id)?.is_none() {
                fresh.push((task, lanes));
            }
        }
        // A client may accept one of these ids between the check and the
        // write; the accept then refuses the whole batch, so check again.
        loop {
            let imported = fresh.len() as u64;
            match self.accept(fresh.clone(), None).await {
                Ok(_) => {
                    return Ok(ImportOutcome {
                        imported,
                        skipped: total - imported,
                    })
                }
                Err(OutboxError::DuplicateTaskId(id)) => {
                    let mut kept = Vec::with_capacity(fresh.len());
                    for (task, lanes) in fresh {
                        if task.id != id && self.status(&task.id)?.is_none() {
                            kept.push((task, lanes));
                        }
                    }
                    fresh = kept;
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Removes every task that was pending when the purge started and
    /// forgets their statuses. Tasks accepted meanwhile stay. Returns the
    /// number of entries removed. The relay must not be mid-round (see the
    /// module docs).
    pub fn purge_pending(&self) -> Result<u64, OutboxError> {
        let watermark = self.shared.insert_lock.lock().expect("insert lock poisoned").next;
        let mut removed = 0;
        for lane in self.lanes() {
            let prefix = pending_prefix(&lane);
            loop {
                let page = self.shared.storage.scan(&prefix, None, WORK_PAGE)?;
                let batch: Vec<_> = page
                    .into_iter()
                    .filter(|(key, _)| parse_pending_key(key).is_some_and(|(_, sequence)| sequence < watermark))
                    .collect();
                if batch.is_empty() {
                    break;
                }
                removed += self.remove_pending(&lane, batch)?;
            }
        }
        Ok(removed)
    }

    /// Removes `entries` of `lane` in one atomic batch, with the statuses
    /// of their tasks where nothing else refers to them.
    fn remove_pending(&self, lane: &Lane, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<u64, OutboxError> {
        let _status_guard = self.status_lock.lock().expect("status lock poisoned");
        let decoded: Vec<RemovedEntry> = entries
            .into_iter()
            .map(|(key, value)| {
                let task = serde_json::from_slice::<Task>(&value).ok();
                // An undecodable record was counted by queue only if its
                // queues decode (as at open).
                let queues = match &task {
                    Some(task) => task.queues.clone(),
                    None => serde_json::from_slice::<StoredQueues>(&value)
                        .map(|stored| stored.queues)
                        .unwrap_or_default(),
                };
                RemovedEntry {
                    key,
                    task,
                    queues,
                    bytes: value.len() as u64,
                }
            })
            .collect();
        let mut operations = Vec::with_capacity(decoded.len() * 2);
        let mut forgotten = HashSet::new();
        for entry in &decoded {
            operations.push((entry.key.clone(), None));
            if let Some(task) = &entry.task {
                // A task that is also a dead letter keeps its status.
                let queued = self
                    .status(&task.id)?
                    .is_some_and(|status| status.state == TaskState::Queued);
                if queued && forgotten.insert(task.id) {
                    operations.push((status_key(&task.id), None));
                }
            }
        }
        apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                for entry in &decoded {
                    counters.remove(lane, &entry.queues, entry.bytes);
                }
            },
        )?;
        Ok(decoded.len() as u64)
    }

    /// The dead letter with this id (its sequence), if any.
    pub fn dead_letter_entry(&self, id: u64) -> Result<Option<DeadLetterEntry>, OutboxError> {
        match self.shared.storage.get(&dead_key(id))? {
            Some(bytes) => {
                let mut letter: DeadLetter = serde_json::from_slice(&bytes)?;
                letter.sequence = id;
                Ok(Some(letter.into()))
            }
            None => Ok(None),
        }
    }

    /// Puts a dead letter back at the tail of its lane, queued again.
    /// Refused with [`OutboxError::Full`] when the outbox has no room.
    pub fn requeue_dead_letter(&self, id: u64) -> Result<DeadLetterEntry, DeadLetterError> {
        let _status_guard = self.status_lock.lock().expect("status lock poisoned");
        let bytes = self
            .shared
            .storage
            .get(&dead_key(id))
            .map_err(OutboxError::from)?
            .ok_or(DeadLetterError::NotFound(id))?;
        let letter: DeadLetter = serde_json::from_slice(&bytes).map_err(OutboxError::from)?;
        let task = letter.task.clone().ok_or(DeadLetterError::Undecodable(id))?;
        let encoded = serde_json::to_vec(&task).map_err(OutboxError::from)?;
        let status = match self.status(&task.id)? {
            Some(mut status) => {
                status.state = TaskState::Queued;
                status
            }
            // Statuses can be forgotten; recreate one so the task is
            // answerable again while it waits.
            None => TaskStatus {
                id: task.id,
                task: task.task.clone(),
                routing_key: task.routing_key.clone(),
                queues: task.queues.clone(),
                state: TaskState::Queued,
                attempts: letter.attempts,
                last_error: Some(letter.reason.clone()),
                accepted_at: task.accepted_at,
                published_at: None,
                remaining_deliveries: 1,
            },
        };
        // Sequence assignment and the write happen under the insert lock,
        // like an accept, so the lane's key order stays acceptance order.
        let mut sequences = self.shared.insert_lock.lock().expect("insert lock poisoned");
        {
            let counters = self.shared.counters.lock().expect("counters poisoned");
            if !super::within_limit(counters.bytes, encoded.len() as u64, self.settings.max_bytes) {
                return Err(OutboxError::Full {
                    used: counters.bytes,
                    limit: self.settings.max_bytes,
                }
                .into());
            }
        }
        let before = *sequences;
        let mut operations = Vec::with_capacity(4);
        let sequence = sequences.allocate(1, &mut operations);
        operations.extend([
            (dead_key(id), None),
            (pending_key(&letter.lane, sequence), Some(encoded.clone())),
            (
                status_key(&task.id),
                Some(serde_json::to_vec(&status).map_err(OutboxError::from)?),
            ),
        ]);
        let written = apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                counters.add(&letter.lane, &task.queues, encoded.len() as u64);
                counters.dead_letters = counters.dead_letters.saturating_sub(1);
            },
        );
        if let Err(error) = written {
            *sequences = before;
            return Err(error.into());
        }
        drop(sequences);
        self.notify_work();
        tracing::info!(dead_letter = id, task_id = %task.id, lane = %letter.lane, "dead letter requeued");
        Ok(letter.into())
    }

    /// Requeues every dead letter that existed when the call started, in
    /// order; undecodable ones are counted and left in place.
    pub fn requeue_all_dead_letters(&self) -> Result<RequeueOutcome, OutboxError> {
        let watermark = self.shared.insert_lock.lock().expect("insert lock poisoned").next;
        let mut outcome = RequeueOutcome::default();
        let mut after = None;
        loop {
            let page = self.dead_letters(after, WORK_PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.sequence);
            for letter in page {
                // Letters re-dead-lettered meanwhile carry new sequences.
                if letter.sequence >= watermark {
                    return Ok(outcome);
                }
                match self.requeue_dead_letter(letter.sequence) {
                    Ok(_) => outcome.requeued += 1,
                    Err(DeadLetterError::Undecodable(_)) => outcome.undecodable += 1,
                    Err(DeadLetterError::NotFound(_)) => {}
                    Err(DeadLetterError::Outbox(error)) => return Err(error),
                }
            }
        }
        Ok(outcome)
    }

    /// Deletes one dead letter (and its task's status, when this letter was
    /// all that was left of the task). Returns it, or `None` if unknown.
    pub fn delete_dead_letter(&self, id: u64) -> Result<Option<DeadLetterEntry>, OutboxError> {
        let _status_guard = self.status_lock.lock().expect("status lock poisoned");
        let Some(bytes) = self.shared.storage.get(&dead_key(id))? else {
            return Ok(None);
        };
        let letter: Option<DeadLetter> = serde_json::from_slice(&bytes).ok();
        let mut operations = vec![(dead_key(id), None)];
        if let Some(task) = letter.as_ref().and_then(|letter| letter.task.as_ref()) {
            let orphaned = self
                .status(&task.id)?
                .is_some_and(|status| status.state == TaskState::DeadLetter && status.remaining_deliveries <= 1);
            if orphaned {
                operations.push((status_key(&task.id), None));
            }
        }
        apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                counters.dead_letters = counters.dead_letters.saturating_sub(1);
            },
        )?;
        Ok(Some(match letter {
            Some(letter) => letter.into(),
            None => DeadLetterEntry {
                id,
                task_id: None,
                task_name: None,
                lane: Lane::new(""),
                reason: "unreadable dead-letter record".into(),
                attempts: 0,
                dead_at: Utc::now(),
                task: None,
                raw: Some(String::from_utf8_lossy(&bytes).into_owned()),
            },
        }))
    }

    /// Deletes every dead letter. Returns how many.
    pub fn purge_dead_letters(&self) -> Result<u64, OutboxError> {
        let mut removed = 0;
        loop {
            let page = self.shared.storage.scan(DEAD, None, WORK_PAGE)?;
            if page.is_empty() {
                return Ok(removed);
            }
            for (key, _) in page {
                let Ok(id) = <[u8; 8]>::try_from(&key[DEAD.len()..]) else {
                    // Not a dead letter's key (a damaged record): removed
                    // as it is, or the purge would find it again forever.
                    apply_counted(
                        self.shared.storage.as_ref(),
                        &self.shared.counters,
                        vec![(key, None)],
                        |counters| {
                            counters.dead_letters = counters.dead_letters.saturating_sub(1);
                        },
                    )?;
                    removed += 1;
                    continue;
                };
                if self.delete_dead_letter(u64::from_be_bytes(id))?.is_some() {
                    removed += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxSettings;
    use serde_json::json;

    fn task(n: i64, queues: &[&str]) -> Task {
        let mut task = Task::for_test(
            TaskId::generate(),
            "export.project",
            vec![json!(n)],
            Default::default(),
            "export",
            queues,
        );
        task.priority = Some(3);
        task.time_limit = Some(30.0);
        task
    }

    fn open(dir: &std::path::Path) -> std::sync::Arc<Outbox> {
        Outbox::open(&OutboxSettings::for_test(dir)).unwrap()
    }

    fn exchange() -> Lane {
        Lane::new("task_exchange")
    }

    async fn accept_each(outbox: &Outbox, tasks: &[Task], lanes: impl Fn(&Task) -> Vec<Lane>) {
        for task in tasks {
            outbox.accept(vec![(task.clone(), lanes(task))], None).await.unwrap();
        }
    }

    fn export_all(outbox: &Outbox, page_size: usize) -> Vec<OutboxRecord> {
        let mut records = Vec::new();
        let mut cursor = None;
        loop {
            let page = outbox.export_page(cursor.as_ref(), page_size).unwrap();
            records.extend(page.records);
            match page.next {
                Some(next) => cursor = Some(next),
                None => return records,
            }
        }
    }

    #[tokio::test]
    async fn listing_pages_through_every_entry_in_lane_order() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(dir.path());
        let tasks: Vec<Task> = (0..7).map(|n| task(n, &["export"])).collect();
        accept_each(&outbox, &tasks, |_| vec![exchange()]).await;
        let first = outbox.list_pending(None, 3).unwrap();
        assert_eq!(first.records.len(), 3);
        let cursor = PendingCursor::decode(&first.next.unwrap().encode()).unwrap();
        let second = outbox.list_pending(Some(&cursor), 10).unwrap();
        assert_eq!(second.records.len(), 4);
        assert!(second.next.is_none());
        let listed: Vec<TaskId> = first
            .records
            .iter()
            .chain(&second.records)
            .map(|record| record.task.id)
            .collect();
        assert_eq!(listed, tasks.iter().map(|t| t.id).collect::<Vec<_>>());
        assert!(PendingCursor::decode("not-a-cursor").is_err());
        assert!(PendingCursor::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"t/x")).is_err());
    }

    #[tokio::test]
    async fn export_lists_a_task_of_several_lanes_once_and_import_is_idempotent() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = open(source_dir.path());
        // SQS style: one lane per queue.
        let tasks: Vec<Task> = (0..5).map(|n| task(n, &["a", "b"])).collect();
        let per_queue = |task: &Task| task.queues.iter().map(|q| Lane::new(q.as_str())).collect();
        accept_each(&source, &tasks, per_queue).await;
        assert_eq!(source.depth(), 10);
        let records = export_all(&source, 3);
        let exported: Vec<TaskId> = records.iter().map(|r| r.task.id).collect();
        assert_eq!(exported, tasks.iter().map(|t| t.id).collect::<Vec<_>>());
        assert_eq!(records[0].task, tasks[0], "the whole task survives export");

        // The NDJSON line round-trips into the same task.
        let line = serde_json::to_string(&records[1]).unwrap();
        let parsed: OutboxRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed.task, tasks[1]);

        let target_dir = tempfile::tempdir().unwrap();
        let target = open(target_dir.path());
        let batch: Vec<(Task, Vec<Lane>)> = records.iter().map(|r| (r.task.clone(), per_queue(&r.task))).collect();
        let outcome = target.import(batch.clone()).await.unwrap();
        assert_eq!(
            outcome,
            ImportOutcome {
                imported: 5,
                skipped: 0
            }
        );
        let again = target.import(batch).await.unwrap();
        assert_eq!(
            again,
            ImportOutcome {
                imported: 0,
                skipped: 5
            }
        );
        assert_eq!(target.depth(), 10);
        let head: Vec<TaskId> = target
            .head(&Lane::new("a"), 10)
            .unwrap()
            .iter()
            .map(|e| e.task.id)
            .collect();
        assert_eq!(head, exported, "order carries over");
        assert_eq!(
            target.status(&tasks[0].id).unwrap().unwrap().accepted_at,
            tasks[0].accepted_at
        );
    }

    #[tokio::test]
    async fn purge_removes_pending_tasks_and_their_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(dir.path());
        let tasks: Vec<Task> = (0..1200).map(|n| task(n, &["export"])).collect();
        let batch: Vec<_> = tasks.iter().map(|t| (t.clone(), vec![exchange()])).collect();
        outbox.accept(batch, None).await.unwrap();
        assert_eq!(outbox.purge_pending().unwrap(), 1200);
        assert_eq!((outbox.depth(), outbox.bytes()), (0, 0));
        assert!(outbox.lanes().is_empty());
        assert!(outbox.status(&tasks[0].id).unwrap().is_none());
        assert!(outbox.report(false).unwrap().queues.is_empty());
        // The outbox works on afterwards, in order.
        let later = task(1, &["export"]);
        accept_each(&outbox, std::slice::from_ref(&later), |_| vec![exchange()]).await;
        assert_eq!(outbox.head(&exchange(), 5).unwrap()[0].task.id, later.id);
    }

    #[tokio::test]
    async fn requeued_dead_letter_goes_to_the_tail_of_its_lane() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(dir.path());
        let tasks: Vec<Task> = (0..3).map(|n| task(n, &["export"])).collect();
        accept_each(&outbox, &tasks, |_| vec![exchange()]).await;
        let head = outbox.head(&exchange(), 1).unwrap();
        outbox
            .dead_letter(&head[0], "returned: NO_ROUTE", crate::outbox::Attempt::Made)
            .unwrap();
        assert_eq!(outbox.report(false).unwrap().dead_letters, 1);
        let letters = outbox.dead_letters(None, 10).unwrap();
        let id = letters[0].sequence;
        assert_eq!(
            outbox.status(&tasks[0].id).unwrap().unwrap().state,
            TaskState::DeadLetter
        );

        let requeued = outbox.requeue_dead_letter(id).unwrap();
        // Read once durable, as the admin API and the CLI flush first.
        outbox.flush().await.unwrap();
        assert_eq!(requeued.task_id, Some(tasks[0].id));
        assert!(matches!(
            outbox.requeue_dead_letter(id),
            Err(DeadLetterError::NotFound(_))
        ));
        let order: Vec<TaskId> = outbox
            .head(&exchange(), 10)
            .unwrap()
            .iter()
            .map(|e| e.task.id)
            .collect();
        assert_eq!(order, vec![tasks[1].id, tasks[2].id, tasks[0].id]);
        assert_eq!(outbox.report(false).unwrap().dead_letters, 0);
        assert_eq!(outbox.depth(), 3);
        assert_eq!(outbox.status(&tasks[0].id).unwrap().unwrap().state, TaskState::Queued);

        // Publishing the requeued task marks it published as usual.
        let all = outbox.head(&exchange(), 10).unwrap();
        outbox.complete(&all.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(
            outbox.status(&tasks[0].id).unwrap().unwrap().state,
            TaskState::Published
        );
    }

    #[tokio::test]
    async fn dead_letters_are_deleted_one_by_one_or_all_and_requeued_all() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(dir.path());
        let tasks: Vec<Task> = (0..4).map(|n| task(n, &["export"])).collect();
        accept_each(&outbox, &tasks, |_| vec![exchange()]).await;
        for entry in outbox.head(&exchange(), 10).unwrap() {
            outbox
                .dead_letter(&entry, "too large", crate::outbox::Attempt::Made)
                .unwrap();
        }
        let ids: Vec<u64> = outbox
            .dead_letters(None, 10)
            .unwrap()
            .iter()
            .map(|d| d.sequence)
            .collect();
        assert_eq!(ids.len(), 4);
        let deleted = outbox.delete_dead_letter(ids[0]).unwrap().unwrap();
        assert_eq!(deleted.task_id, Some(tasks[0].id));
        assert!(outbox.status(&tasks[0].id).unwrap().is_none());
        assert!(outbox.delete_dead_letter(ids[0]).unwrap().is_none());

        let outcome = outbox.requeue_all_dead_letters().unwrap();
        outbox.flush().await.unwrap();
        assert_eq!(
            outcome,
            RequeueOutcome {
                requeued: 3,
                undecodable: 0
            }
        );
        assert_eq!(outbox.depth(), 3);
        for entry in outbox.head(&exchange(), 10).unwrap() {
            outbox
                .dead_letter(&entry, "still too large", crate::outbox::Attempt::Made)
                .unwrap();
        }
        assert_eq!(outbox.purge_dead_letters().unwrap(), 3);
        let report = outbox.report(false).unwrap();
        assert_eq!((report.dead_letters, report.depth), (0, 0));
        assert!(outbox.dead_letters(None, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn requeue_respects_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&OutboxSettings {
            max_bytes: 4096,
            ..OutboxSettings::for_test(dir.path())
        })
        .unwrap();
        let first = task(0, &["export"]);
        accept_each(&outbox, std::slice::from_ref(&first), |_| vec![exchange()]).await;
        let entry = outbox.head(&exchange(), 1).unwrap().remove(0);
        outbox
            .dead_letter(&entry, "poison", crate::outbox::Attempt::Made)
            .unwrap();
        let mut filler = task(1, &["export"]);
        // Room for the filler, and not for the first task beside it.
        let first_bytes = serde_json::to_vec(&first).unwrap().len();
        filler.kwargs.insert("blob".into(), json!(""));
        let bare_bytes = serde_json::to_vec(&filler).unwrap().len();
        filler
            .kwargs
            .insert("blob".into(), json!("x".repeat(4096 + 1 - first_bytes - bare_bytes)));
        accept_each(&outbox, std::slice::from_ref(&filler), |_| vec![exchange()]).await;
        let id = outbox.dead_letters(None, 1).unwrap()[0].sequence;
        assert!(matches!(
            outbox.requeue_dead_letter(id),
            Err(DeadLetterError::Outbox(OutboxError::Full { .. }))
        ));
        assert_eq!(outbox.report(false).unwrap().dead_letters, 1, "nothing changed");
    }
}
