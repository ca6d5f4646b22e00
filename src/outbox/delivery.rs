//! What the relay reads and writes: the lanes with work, a lane's entries
//! from its head, completion of confirmed entries, the sent marks that
//! count re-sends, failures on a task's status, and dead letters.
//!
//! Invariants: only what a flush covered is read ([`super::group_commit`]'s
//! visibility); an entry leaves its lane only by [`Outbox::complete`] or
//! [`Outbox::dead_letter`], each one atomic batch with the counters; a
//! record that cannot be decoded is dead-lettered where it is read, so it
//! never blocks its lane.

use super::counters::{apply_counted, StoredQueues};
use super::keys::{
    dead_key, parse_pending_key, pending_key, pending_prefix, published_index_key, sent_mark_key, status_key,
};
use super::records::{Attempt, DeadLetter, PendingEntry, SendMark, TaskState, TaskStatus};
use super::{Lane, Outbox, OutboxError};
use crate::task::{Task, TaskId};
use chrono::Utc;
use std::collections::HashMap;

impl Outbox {
    /// Lanes that hold pending work, in name order.
    pub fn lanes(&self) -> Vec<Lane> {
        let counters = self.shared.counters.lock().expect("counters poisoned");
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
            let page = self
                .shared
                .storage
                .scan(&prefix, after.as_deref(), limit - entries.len())?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, value) in page {
                let Some((lane, sequence)) = parse_pending_key(&key) else {
                    continue;
                };
                // Keys sort by sequence: everything after this one is
                // newer still, and not durable either (group_commit).
                if !self.shared.visibility.is_durable(sequence) {
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

    pub(super) fn dead_letter_undecodable(
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
        apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                // Counted by queue too if at least its queues decode.
                match serde_json::from_slice::<StoredQueues>(value) {
                    Ok(stored) => counters.remove(lane, &stored.queues, value.len() as u64),
                    Err(_) => counters.remove(lane, &[], value.len() as u64),
                }
                counters.dead_letters += 1;
            },
        )?;
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
        apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                for entry in entries {
                    counters.remove(&entry.lane, &entry.task.queues, entry.encoded_len as u64);
                }
            },
        )?;
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
                let key = sent_mark_key(lane);
                let stored = self.shared.storage.get(&key)?;
                stored.and_then(|bytes| bytes.try_into().ok().map(u64::from_be_bytes))
            }
        };
        let resent = mark.map_or(0, |mark| {
            entries.iter().filter(|entry| entry.sequence <= mark).count() as u64
        });
        let moved = mark.is_none_or(|mark| last > mark);
        if moved {
            let key = sent_mark_key(lane);
            self.shared
                .storage
                .apply(vec![(key, Some(last.to_be_bytes().to_vec()))])?;
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
        self.shared.storage.apply(operations)?;
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
        apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                counters.remove(&entry.lane, &entry.task.queues, entry.encoded_len as u64);
                counters.dead_letters += 1;
            },
        )?;
        metrics::counter!("taskgate_dead_letters_total").increment(1);
        tracing::warn!(task_id = %entry.task.id, lane = %entry.lane, reason, "task dead-lettered");
        Ok(())
    }
}
