//! Staging accepts: turns a group of accept requests into one
//! all-or-nothing write, on the committer thread ([`super::group_commit`]).
//!
//! Why accepts are written by the committer rather than by each request:
//! sled 0.34 writes its I/O buffer (a `pwrite` plus `sync_file_range` on
//! its thread pool, waking every pool thread) on every flush, and twice
//! more for every `apply_batch`, so a write per request cost disk writes
//! per request whatever the group commit saved on flushes. One write per
//! group turns that into one or two log writes per group: a small group as
//! single keys behind its manifest, a large one as one batch
//! ([`super::group_manifest`] says why and where the line is).
//!
//! Invariants:
//! - Requests are staged in arrival order, under the outbox's insert lock,
//!   so sequence order within a lane is acceptance order, and a group's
//!   keys become visible together, after every smaller sequence.
//! - A request's checks (idempotency key, reused task id, room) see the
//!   store *and* the requests staged before it in the same group.
//! - The group is all or nothing: if a write fails, no request in it is
//!   answered as written, the counters are untouched, and what was written
//!   stays hidden for the life of the process and is rolled back at the
//!   next open ([`super::group_manifest`]).
//! - The expensive, request-local work (JSON encoding) is done by the
//!   caller in [`PreparedAccept::prepare`], off the committer thread.

use super::counters::{apply_counted, Counters};
use super::group_manifest::{self, GroupManifest};
use super::keys::{idempotency_key, pending_key, status_key, ACCEPT_GROUP, SEQUENCE_RESERVED};
use super::storage::{StorageError, WriteOperation};
use super::{
    journal, AcceptOutcome, Acceptance, IdempotencyKey, IdempotencyRecord, Lane, OutboxError, SequenceState, Shared,
    TaskState, TaskStatus, IDEMPOTENCY_WINDOW,
};
use crate::task::{Task, TaskId};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One task of an accept, encoded by the caller.
pub(super) struct PreparedTask {
    task: Task,
    lanes: Vec<Lane>,
    /// The task as stored in its lanes and in the tracking journal.
    encoded: Vec<u8>,
    /// Its initial [`TaskStatus`] record.
    status: Vec<u8>,
}

/// One accept request (a single task or a whole batch), ready to stage.
pub(super) struct PreparedAccept {
    tasks: Vec<PreparedTask>,
    idempotency: Option<IdempotencyKey>,
    acceptances: Vec<Acceptance>,
}

impl PreparedAccept {
    pub(super) fn prepare(
        tasks: Vec<(Task, Vec<Lane>)>,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Self, OutboxError> {
        let mut prepared = Vec::with_capacity(tasks.len());
        let mut acceptances = Vec::with_capacity(tasks.len());
        for (task, lanes) in tasks {
            let status = TaskStatus {
                id: task.id,
                task: task.task.clone(),
                routing_key: task.routing_key.clone(),
                queues: task.queues.clone(),
                state: TaskState::Queued,
                attempts: 0,
                last_error: None,
                accepted_at: task.accepted_at,
                published_at: None,
                remaining_deliveries: lanes.len() as u32,
            };
            acceptances.push(Acceptance {
                id: task.id,
                task: task.task.clone(),
                routing_key: task.routing_key.clone(),
                queues: task.queues.clone(),
            });
            prepared.push(PreparedTask {
                encoded: serde_json::to_vec(&task)?,
                status: serde_json::to_vec(&status)?,
                task,
                lanes,
            });
        }
        Ok(Self {
            tasks: prepared,
            idempotency,
            acceptances,
        })
    }

    fn pending_bytes(&self) -> u64 {
        self.tasks
            .iter()
            .map(|task| task.encoded.len() as u64 * task.lanes.len() as u64)
            .sum()
    }
}

/// What the committer thread writes accepts with: the outbox's shared
/// state and the limits.
pub(super) struct AcceptWriter {
    pub(super) shared: Arc<Shared>,
    pub(super) max_bytes: u64,
    /// Journal depth past which accepted tasks are not journaled.
    pub(super) max_journal_entries: u64,
    /// Whether the last accept found the journal full (to log the change
    /// once, not every task).
    pub(super) journal_skipping: AtomicBool,
}

/// A group this large means writers are queueing for the disk: the outbox
/// is under load ([`super::Outbox::is_busy`]).
const CROWDED_GROUP: usize = 8;

/// What staging decided for one request, before the group is written.
enum Staged {
    Accepted(Vec<Acceptance>),
    /// The key's answer was already stored.
    Replayed(Vec<Acceptance>),
    /// The key's first request is in this same group: the answer holds
    /// only if the group's batch is written.
    ReplayedInGroup(Vec<Acceptance>),
    Refused(OutboxError),
}

/// The group's pending writes and what they add to the counters.
#[derive(Default)]
struct GroupBatch<'a> {
    operations: Vec<WriteOperation>,
    additions: Vec<(&'a Lane, &'a Task, u64)>,
    added_bytes: u64,
    journaled: u64,
    /// Accepted without a journal entry: the journal was full.
    not_journaled: u64,
    ids: HashSet<TaskId>,
    /// Keys first used in this group: the request's fingerprint and answer.
    idempotency: HashMap<&'a str, (&'a str, &'a [Acceptance])>,
}

impl AcceptWriter {
    /// Stages `requests` in order and writes them as one group.
    /// Returns each request's outcome and the ids of the tasks written,
    /// which stay hidden until the group's flush returns; a storage
    /// failure fails every request that would have written something.
    pub(super) fn write_group(
        &self,
        requests: &[&PreparedAccept],
    ) -> (Vec<Result<AcceptOutcome, OutboxError>>, Vec<TaskId>) {
        if requests.len() >= CROWDED_GROUP {
            *self
                .shared
                .last_crowded_group
                .lock()
                .expect("crowded group lock poisoned") = Some(Instant::now());
        }
        let now = Utc::now();
        let mut sequences = self.shared.insert_lock.lock().expect("insert lock poisoned");
        let before = *sequences;
        let mut group = GroupBatch::default();
        let mut staged = Vec::with_capacity(requests.len());
        for request in requests {
            staged.push(match self.stage(request, now, &mut sequences, &mut group) {
                Ok(outcome) => outcome,
                Err(error) => Staged::Refused(error),
            });
        }
        let staged_ids: Vec<TaskId> = group.ids.iter().copied().collect();
        let written = if group.operations.is_empty() {
            Ok(())
        } else {
            self.shared.visibility.hide(&staged_ids);
            // Saturating: only a damaged record holds a number this high, and
            // a group stuck at it is kept after a crash, never rolled back.
            sequences.group = sequences.group.saturating_add(1);
            let number = sequences.group;
            let mut operations = std::mem::take(&mut group.operations);
            let count = |counters: &mut Counters| {
                for (lane, task, bytes) in &group.additions {
                    counters.add(lane, &task.queues, *bytes);
                }
                counters.journal += group.journaled;
                counters.finished_group = number;
            };
            let storage = self.shared.storage.as_ref();
            let applied = if operations.len() < group_manifest::MAX_SINGLE_KEY_WRITES {
                // The manifest first, the counters record last: see
                // `group_manifest` for why that makes the group all or
                // nothing.
                let created = operations
                    .iter()
                    .map(|(key, _)| key)
                    .filter(|key| key.as_slice() != SEQUENCE_RESERVED);
                let manifest = (ACCEPT_GROUP.to_vec(), Some(GroupManifest::encode(number, created)));
                operations.insert(0, manifest);
                storage
                    .apply_in_order(operations)
                    .map_err(OutboxError::from)
                    .and_then(|()| apply_counted(storage, &self.shared.counters, Vec::new(), count))
            } else {
                apply_counted(storage, &self.shared.counters, operations, count)
            };
            applied.map_err(|error| match error {
                OutboxError::Storage(error) => error,
                other => StorageError::Io(other.to_string()),
            })
        };
        match written {
            Ok(()) => {
                self.shared.journal_depth.fetch_add(group.journaled, Ordering::SeqCst);
                if group.not_journaled > 0 {
                    metrics::counter!("taskgate_tracking_journal_skipped_total").increment(group.not_journaled);
                }
            }
            Err(ref error) => {
                *sequences = before;
                tracing::error!(%error, requests = requests.len(), "outbox batch failed");
            }
        }
        drop(sequences);
        let outcomes = staged
            .into_iter()
            .map(|outcome| match (outcome, &written) {
                (Staged::Refused(error), _) => Err(error),
                (Staged::Replayed(acceptances), _) => Ok(AcceptOutcome::Replayed(acceptances)),
                (Staged::ReplayedInGroup(acceptances), Ok(())) => Ok(AcceptOutcome::Replayed(acceptances)),
                (Staged::Accepted(acceptances), Ok(())) => Ok(AcceptOutcome::Accepted(acceptances)),
                (Staged::Accepted(_) | Staged::ReplayedInGroup(_), Err(error)) => {
                    Err(OutboxError::Storage(error.clone()))
                }
            })
            .collect();
        (outcomes, staged_ids)
    }

    fn stage<'a>(
        &self,
        request: &'a PreparedAccept,
        now: DateTime<Utc>,
        sequences: &mut SequenceState,
        group: &mut GroupBatch<'a>,
    ) -> Result<Staged, OutboxError> {
        if let Some(idempotency) = &request.idempotency {
            let key = idempotency.key.as_str();
            if let Some((fingerprint, acceptances)) = group.idempotency.get(key) {
                idempotency.check_same_request(fingerprint)?;
                return Ok(Staged::ReplayedInGroup(acceptances.to_vec()));
            }
            if let Some(record) = self.stored_idempotency(key, now)? {
                if let Some(fingerprint) = &record.fingerprint {
                    idempotency.check_same_request(fingerprint)?;
                }
                return Ok(Staged::Replayed(record.acceptances));
            }
        }
        let added_bytes = request.pending_bytes();
        let used = self.shared.counters.lock().expect("counters poisoned").bytes + group.added_bytes;
        if !super::within_limit(used, added_bytes, self.max_bytes) {
            self.shared.refusing.store(true, Ordering::SeqCst);
            return Err(OutboxError::Full {
                used,
                limit: self.max_bytes,
            });
        }
        let mut seen = HashSet::with_capacity(request.tasks.len());
        for prepared in &request.tasks {
            let id = prepared.task.id;
            if !seen.insert(id) || group.ids.contains(&id) || self.shared.storage.get(&status_key(&id))?.is_some() {
                return Err(OutboxError::DuplicateTaskId(id));
            }
        }
        let lane_entries: u64 = request.tasks.iter().map(|task| task.lanes.len() as u64).sum();
        let journaled = self.journal_room(request.tasks.len() as u64, group.journaled);
        let count = lane_entries + if journaled { request.tasks.len() as u64 } else { 0 };
        let first = sequences.allocate(count, &mut group.operations);
        let first_journal = first + lane_entries;
        let mut sequence = first;
        for (offset, prepared) in request.tasks.iter().enumerate() {
            group
                .operations
                .push((status_key(&prepared.task.id), Some(prepared.status.clone())));
            for lane in &prepared.lanes {
                group
                    .operations
                    .push((pending_key(lane, sequence), Some(prepared.encoded.clone())));
                group
                    .additions
                    .push((lane, &prepared.task, prepared.encoded.len() as u64));
                sequence += 1;
            }
            // One tracking journal entry per task, in this same batch.
            if journaled {
                group.operations.push((
                    journal::journal_key(first_journal + offset as u64),
                    Some(prepared.encoded.clone()),
                ));
            }
            group.ids.insert(prepared.task.id);
        }
        if let Some(idempotency) = &request.idempotency {
            let record = IdempotencyRecord {
                acceptances: request.acceptances.clone(),
                created_at: now,
                fingerprint: Some(idempotency.fingerprint.clone()),
            };
            group
                .operations
                .push((idempotency_key(&idempotency.key), Some(serde_json::to_vec(&record)?)));
            group
                .idempotency
                .insert(&idempotency.key, (&idempotency.fingerprint, &request.acceptances));
        }
        group.added_bytes += added_bytes;
        if journaled {
            group.journaled += request.tasks.len() as u64;
        } else {
            group.not_journaled += request.tasks.len() as u64;
        }
        Ok(Staged::Accepted(request.acceptances.clone()))
    }

    /// Whether `tasks` more fit in the tracking journal (with `staged` of
    /// this group already in it). A batch is journaled whole or not at all.
    /// Logs when the journal fills up and when it has room again.
    fn journal_room(&self, tasks: u64, staged: u64) -> bool {
        let depth = self.shared.counters.lock().expect("counters poisoned").journal + staged;
        let room = super::within_limit(depth, tasks, self.max_journal_entries);
        let was_skipping = self.journal_skipping.swap(!room, Ordering::SeqCst);
        if !room && !was_skipping {
            tracing::error!(
                depth,
                limit = self.max_journal_entries,
                "the tracking journal is full (is the tracking database down?): new tasks are accepted and \
                 published but not recorded in it until it drains"
            );
        } else if room && was_skipping {
            tracing::warn!(depth, "the tracking journal has room again: new tasks are recorded");
        }
        room
    }

    /// The record stored for `key`, if it is still within its window.
    fn stored_idempotency(&self, key: &str, now: DateTime<Utc>) -> Result<Option<IdempotencyRecord>, StorageError> {
        let Some(bytes) = self.shared.storage.get(&idempotency_key(key))? else {
            return Ok(None);
        };
        let window = chrono::Duration::from_std(IDEMPOTENCY_WINDOW).unwrap_or_default();
        Ok(serde_json::from_slice::<IdempotencyRecord>(&bytes)
            .ok()
            .filter(|record| now - record.created_at < window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::counters::Counters;
    use crate::outbox::group_commit::Visibility;
    use crate::outbox::storage::{OutboxStorage, SledStorage};
    use crate::outbox::tests::task;
    use crate::outbox::FaultyStorage;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    fn writer(storage: Arc<dyn OutboxStorage>) -> AcceptWriter {
        AcceptWriter {
            shared: Arc::new(Shared {
                storage,
                failure: Arc::default(),
                visibility: Visibility::new(1),
                insert_lock: Mutex::new(SequenceState {
                    next: 1,
                    reserved: 1,
                    group: 0,
                }),
                counters: Mutex::new(Counters::default()),
                refusing: AtomicBool::new(false),
                journal_depth: AtomicU64::new(0),
                last_crowded_group: Mutex::new(None),
            }),
            max_bytes: 1 << 30,
            max_journal_entries: 1_000_000,
            journal_skipping: AtomicBool::new(false),
        }
    }

    fn request(n: i64, key: &str) -> PreparedAccept {
        let idempotency = IdempotencyKey::new(key, "same request");
        PreparedAccept::prepare(
            vec![(task("a.b", n), vec![Lane::new("task_exchange")])],
            Some(idempotency),
        )
        .unwrap()
    }

    #[test]
    fn a_repeat_within_the_group_replays_the_first_answer() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(SledStorage::open(&dir.path().join("o"), 1 << 20).unwrap());
        let writer = writer(storage);
        let (first, repeat) = (request(1, "k"), request(2, "k"));
        let (outcomes, _) = writer.write_group(&[&first, &repeat]);
        let [Ok(AcceptOutcome::Accepted(accepted)), Ok(AcceptOutcome::Replayed(replayed))] = &outcomes[..] else {
            panic!("expected accepted then replayed: {outcomes:?}");
        };
        assert_eq!(accepted, replayed);
        assert_eq!(writer.shared.counters.lock().unwrap().depth, 1);
    }

    /// A repeat must not be told "accepted" about a first request whose
    /// batch never reached the store.
    #[test]
    fn a_repeat_within_a_failed_group_fails_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledStorage::open(&dir.path().join("o"), 1 << 20).unwrap());
        let faulty = Arc::new(FaultyStorage::new(sled));
        faulty.fail_writes(true);
        let writer = writer(faulty);
        let (first, repeat) = (request(1, "k"), request(2, "k"));
        let (outcomes, _) = writer.write_group(&[&first, &repeat]);
        assert!(
            outcomes
                .iter()
                .all(|outcome| matches!(outcome, Err(OutboxError::Storage(_)))),
            "{outcomes:?}"
        );
        assert_eq!(writer.shared.counters.lock().unwrap().depth, 0);
    }
}
