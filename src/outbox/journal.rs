//! The tracking journal: the outbox's record of accepted tasks that the
//! tracking database has not stored yet (key prefix `j/`).
//!
//! Why here: recording a task in SQL must never delay or fail a `POST`. The
//! journal entry is written by [`Outbox::accept`] in the *same atomic batch*
//! as the task itself, so it is durable exactly when the task is (the same
//! group-commit flush covers both, no extra flush) and a crash can never
//! leave a task accepted but unrecorded. The tracking writer
//! ([`crate::tracking`]) reads the journal from its head in pages, upserts
//! a page in one SQL transaction, and only then removes those keys.
//!
//! Invariants:
//! 1. **One entry per accepted task**, keyed `j/{sequence:u64}` with a
//!    sequence from the outbox's allocator (taken under the insert lock), so
//!    key order is acceptance order. A replayed idempotent request writes
//!    nothing, so it journals nothing.
//! 2. **Removed only after the database has the rows.** A crash between the
//!    commit and the removal replays the entries; the writer's upserts are
//!    idempotent by task id, so that only repeats a write.
//! 3. **Bounded memory.** Readers page from the head; the depth is kept in
//!    the outbox's stored counters (`m/counters`, updated in the same
//!    batches as the entries), so opening reads no journal entry.
//! 4. **Never blocks the relay**: journal entries are not pending work, do
//!    not count against `outbox.max_bytes`, and leave with no regard to
//!    whether the task was published.
//! 5. **Bounded on disk.** While the journal holds `outbox.max_journal_entries`
//!    (the database away for long), an accept writes no journal entry: the
//!    task is accepted and published but not recorded (a request's tasks
//!    are journaled all or none; counted in
//!    `taskgate_tracking_journal_skipped_total`, and health says so). A
//!    tracking outage must not fill the disk the outbox needs.

use super::counters::apply_counted;
use super::keys::{prefixed, JOURNAL};
use super::storage::OutboxStorage;
use super::{Outbox, OutboxError};
use crate::task::Task;
use chrono::{DateTime, Utc};
use std::sync::atomic::Ordering;

/// One journal entry as read from the head.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub sequence: u64,
    /// The accepted task; `Err` with the reason when the stored JSON does
    /// not decode (the writer logs and drops such an entry: it could never
    /// be recorded, and must not block the journal).
    pub task: Result<Task, String>,
}

pub(super) fn journal_key(sequence: u64) -> Vec<u8> {
    prefixed(JOURNAL, &sequence.to_be_bytes())
}

pub(super) fn parse_journal_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.strip_prefix(JOURNAL)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Counts the journal at open: (entries, highest sequence in use).
pub(super) fn scan_depth(storage: &dyn OutboxStorage) -> Result<(u64, u64), OutboxError> {
    let mut depth = 0u64;
    let mut highest = 0u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage.scan(JOURNAL, after.as_deref(), 4096)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        depth += page.len() as u64;
        if let Some(sequence) = parse_journal_key(last) {
            highest = highest.max(sequence);
        }
    }
    Ok((depth, highest))
}

impl Outbox {
    /// The oldest `limit` journal entries, in acceptance order.
    pub fn journal_head(&self, limit: usize) -> Result<Vec<JournalEntry>, OutboxError> {
        let page = self.shared.storage.scan(JOURNAL, None, limit)?;
        Ok(page
            .into_iter()
            .filter_map(|(key, value)| {
                // An accept not yet durable is not recorded: it may still
                // be refused (see group_commit).
                let sequence =
                    parse_journal_key(&key).filter(|sequence| self.shared.visibility.is_durable(*sequence))?;
                let task = serde_json::from_slice::<Task>(&value).map_err(|error| error.to_string());
                Some(JournalEntry { sequence, task })
            })
            .collect())
    }

    /// Removes entries the tracking database has stored. Not flushed: a
    /// crash before sled's periodic flush only replays idempotent upserts.
    pub fn remove_journal_entries(&self, sequences: &[u64]) -> Result<(), OutboxError> {
        if sequences.is_empty() {
            return Ok(());
        }
        let operations = sequences
            .iter()
            .map(|sequence| (journal_key(*sequence), None))
            .collect();
        let removed = sequences.len() as u64;
        apply_counted(
            self.shared.storage.as_ref(),
            &self.shared.counters,
            operations,
            |counters| {
                counters.journal = counters.journal.saturating_sub(removed);
            },
        )?;
        let _ = self
            .shared
            .journal_depth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |depth| {
                Some(depth.saturating_sub(removed))
            });
        Ok(())
    }

    /// Entries waiting to be recorded.
    pub fn journal_depth(&self) -> u64 {
        self.shared.journal_depth.load(Ordering::SeqCst)
    }

    /// Whether the journal holds `outbox.max_journal_entries`: new tasks are
    /// then accepted without an entry (invariant 5).
    pub fn journal_is_full(&self) -> bool {
        !super::within_limit(self.journal_depth(), 1, self.settings.max_journal_entries)
    }

    /// When the oldest unrecorded task was accepted (one key read).
    pub fn journal_oldest_accepted_at(&self) -> Result<Option<DateTime<Utc>>, OutboxError> {
        Ok(self
            .journal_head(1)?
            .into_iter()
            .next()
            .and_then(|entry| entry.task.ok())
            .map(|task| task.accepted_at))
    }

    /// Resolves when an accept may have added journal entries (a permit is
    /// kept if nobody was waiting, so a wake-up is never lost).
    pub async fn wait_for_journal(&self) {
        self.new_journal.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::super::storage::SledStorage;
    use super::super::FaultyStorage;
    use super::super::{AcceptOutcome, Lane, OutboxSettings};
    use super::*;
    use crate::task::TaskId;
    use std::sync::Arc;

    use super::super::tests::settings;

    fn task(n: i64) -> Task {
        super::super::tests::task("export.project", n)
    }

    fn ids(entries: &[JournalEntry]) -> Vec<TaskId> {
        entries.iter().map(|entry| entry.task.as_ref().unwrap().id).collect()
    }

    #[tokio::test]
    async fn every_accepted_task_is_journaled_once_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tasks: Vec<Task> = (0..5).map(task).collect();
        {
            let outbox = Outbox::open(&settings(dir.path())).unwrap();
            // Two lanes for one task: still one journal entry.
            outbox
                .accept(vec![(tasks[0].clone(), vec![Lane::new("a"), Lane::new("b")])], None)
                .await
                .unwrap();
            let batch = tasks[1..].iter().map(|t| (t.clone(), vec![Lane::new("a")])).collect();
            outbox
                .accept(batch, Some(crate::outbox::tests::retried("key-1")))
                .await
                .unwrap();
            // A replay writes nothing, so journals nothing.
            let replay = vec![(task(99), vec![Lane::new("a")])];
            assert!(matches!(
                outbox
                    .accept(replay, Some(crate::outbox::tests::retried("key-1")))
                    .await
                    .unwrap(),
                AcceptOutcome::Replayed(_)
            ));
            assert_eq!(outbox.journal_depth(), 5);
            assert_eq!(
                ids(&outbox.journal_head(100).unwrap()),
                tasks.iter().map(|t| t.id).collect::<Vec<_>>()
            );
        }
        let outbox = loop {
            match Outbox::open(&settings(dir.path())) {
                Ok(outbox) => break outbox,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        assert_eq!(outbox.journal_depth(), 5, "depth is rebuilt at open");
        let head = outbox.journal_head(2).unwrap();
        assert_eq!(ids(&head), vec![tasks[0].id, tasks[1].id]);
        assert_eq!(outbox.journal_oldest_accepted_at().unwrap(), Some(tasks[0].accepted_at));
        outbox
            .remove_journal_entries(&head.iter().map(|e| e.sequence).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(outbox.journal_depth(), 3);
        assert_eq!(
            ids(&outbox.journal_head(100).unwrap()),
            vec![tasks[2].id, tasks[3].id, tasks[4].id]
        );
        // New sequences come after the journal's, never before them.
        let later = task(7);
        outbox
            .accept(vec![(later.clone(), vec![Lane::new("a")])], None)
            .await
            .unwrap();
        assert_eq!(
            outbox
                .journal_head(100)
                .unwrap()
                .last()
                .unwrap()
                .task
                .as_ref()
                .unwrap()
                .id,
            later.id
        );
        // Removing the journal never touches pending work.
        assert_eq!(outbox.depth(), 7);
    }

    #[tokio::test]
    async fn a_refused_accept_journals_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledStorage::open(&dir.path().join("outbox"), 1 << 20).unwrap());
        let faulty = Arc::new(FaultyStorage::new(sled));
        let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
        faulty.fail_writes(true);
        assert!(outbox
            .accept(vec![(task(1), vec![Lane::new("a")])], None)
            .await
            .is_err());
        faulty.fail_writes(false);
        assert_eq!(outbox.journal_depth(), 0);
        assert!(outbox.journal_head(10).unwrap().is_empty());
        // Undecodable entries are reported, not fatal (written below the
        // first sequence, so durable by the outbox's reckoning).
        faulty
            .apply(vec![(journal_key(0), Some(b"{not json".to_vec()))])
            .unwrap();
        let head = outbox.journal_head(10).unwrap();
        assert_eq!(head.len(), 1);
        assert!(head[0].task.is_err());
    }

    #[tokio::test]
    async fn wait_for_journal_wakes_after_an_accept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&settings(dir.path())).unwrap();
        outbox
            .accept(vec![(task(1), vec![Lane::new("a")])], None)
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.wait_for_journal())
            .await
            .expect("the permit of the accept wakes the writer");
    }

    /// Past `max_journal_entries`, tasks are accepted and pending but not
    /// journaled (a batch all or none); once the writer drained some, new
    /// tasks are journaled again.
    #[tokio::test]
    async fn a_full_journal_skips_new_tasks_and_resumes_once_drained() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            max_journal_entries: 3,
            ..settings(dir.path())
        };
        let outbox = Outbox::open(&settings).unwrap();
        let lane = || vec![Lane::new("task_exchange")];
        let tasks: Vec<Task> = (0..4).map(task).collect();
        for task in &tasks {
            outbox.accept(vec![(task.clone(), lane())], None).await.unwrap();
        }
        assert_eq!((outbox.depth(), outbox.journal_depth()), (4, 3));
        let journaled: Vec<TaskId> = outbox
            .journal_head(10)
            .unwrap()
            .into_iter()
            .map(|entry| entry.task.unwrap().id)
            .collect();
        assert_eq!(journaled, tasks[..3].iter().map(|t| t.id).collect::<Vec<_>>());
        assert!(
            outbox.status(&tasks[3].id).unwrap().is_some(),
            "the skipped task is still accepted"
        );

        // One place free: a batch of two does not fit, a single task does.
        let head: Vec<u64> = outbox.journal_head(1).unwrap().iter().map(|e| e.sequence).collect();
        outbox.remove_journal_entries(&head).unwrap();
        let batch = vec![(task(10), lane()), (task(11), lane())];
        outbox.accept(batch, None).await.unwrap();
        assert_eq!(outbox.journal_depth(), 2);
        let single = task(12);
        outbox.accept(vec![(single.clone(), lane())], None).await.unwrap();
        assert_eq!(outbox.journal_depth(), 3);
        let last = outbox.journal_head(10).unwrap().pop().unwrap();
        assert_eq!(last.task.unwrap().id, single.id);
        assert_eq!(outbox.depth(), 7);
    }
}
