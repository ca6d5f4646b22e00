use super::*;
use crate::task::{Task, TaskId};
use serde_json::json;

pub(super) fn task(name: &str, n: i64) -> Task {
    Task::for_test(
        TaskId::generate(),
        name,
        vec![json!(n)],
        Default::default(),
        "export",
        &["export"],
    )
}

pub(super) fn settings(dir: &std::path::Path) -> OutboxSettings {
    OutboxSettings::for_test(dir)
}

/// A key sent again with the same request (a client's retry).
pub(super) fn retried(key: &str) -> IdempotencyKey {
    IdempotencyKey::new(key, "the same request")
}

fn lane() -> Lane {
    Lane::new("task_exchange")
}

#[tokio::test]
async fn accepted_tasks_come_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let tasks: Vec<Task> = (0..50).map(|n| task("export.project", n)).collect();
    {
        let outbox = Outbox::open(&settings(dir.path())).unwrap();
        for task in &tasks {
            outbox.accept(vec![(task.clone(), vec![lane()])], None).await.unwrap();
        }
        assert_eq!(outbox.depth(), 50);
    }
    // Give sled's background threads a moment to release the lock.
    let outbox = loop {
        match Outbox::open(&settings(dir.path())) {
            Ok(outbox) => break outbox,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    assert_eq!(outbox.depth(), 50);
    let head = outbox.head(&lane(), 100).unwrap();
    let ids: Vec<TaskId> = head.iter().map(|e| e.task.id).collect();
    assert_eq!(ids, tasks.iter().map(|t| t.id).collect::<Vec<_>>());
    // New sequences continue after the old ones, never before them.
    let later = task("export.project", 99);
    outbox.accept(vec![(later.clone(), vec![lane()])], None).await.unwrap();
    let head = outbox.head(&lane(), 100).unwrap();
    assert_eq!(head.last().unwrap().task.id, later.id);
}

#[tokio::test]
async fn complete_removes_and_marks_published() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let first = task("a.b", 1);
    outbox.accept(vec![(first.clone(), vec![lane()])], None).await.unwrap();
    let head = outbox.head(&lane(), 10).unwrap();
    assert_eq!(outbox.status(&first.id).unwrap().unwrap().state, TaskState::Queued);
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(outbox.depth(), 0);
    assert_eq!(outbox.bytes(), 0);
    let status = outbox.status(&first.id).unwrap().unwrap();
    assert_eq!(status.state, TaskState::Published);
    assert!(status.published_at.is_some());
    assert!(outbox.lanes().is_empty());
}

#[tokio::test]
async fn fan_out_is_published_only_when_every_lane_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let fanned = task("a.b", 1);
    let lanes = vec![Lane::new("export"), Lane::new("platform.fifo")];
    outbox
        .accept(vec![(fanned.clone(), lanes.clone())], None)
        .await
        .unwrap();
    assert_eq!(outbox.depth(), 2);
    let first = outbox.head(&lanes[0], 10).unwrap();
    outbox.complete(&first.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(outbox.status(&fanned.id).unwrap().unwrap().state, TaskState::Queued);
    let second = outbox.head(&lanes[1], 10).unwrap();
    outbox.complete(&second.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(outbox.status(&fanned.id).unwrap().unwrap().state, TaskState::Published);
}

#[tokio::test]
async fn full_outbox_refuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&OutboxSettings {
        max_bytes: 2_000,
        ..settings(dir.path())
    })
    .unwrap();
    let mut accepted = 0;
    let refused = loop {
        match outbox.accept(vec![(task("a.b", accepted), vec![lane()])], None).await {
            Ok(_) => accepted += 1,
            Err(error) => break error,
        }
    };
    assert!(matches!(refused, OutboxError::Full { .. }), "{refused}");
    assert_eq!(outbox.depth(), accepted as u64);
    assert!(outbox.bytes() <= 2_000);
    let head = outbox.head(&lane(), 1000).unwrap();
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    outbox.accept(vec![(task("a.b", 0), vec![lane()])], None).await.unwrap();
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let first = outbox
        .accept(vec![(task("a.b", 1), vec![lane()])], Some(retried("key-1")))
        .await
        .unwrap();
    let again = outbox
        .accept(vec![(task("a.b", 2), vec![lane()])], Some(retried("key-1")))
        .await
        .unwrap();
    let (AcceptOutcome::Accepted(first), AcceptOutcome::Replayed(again)) = (first, again) else {
        panic!("expected accepted then replayed");
    };
    assert_eq!(first, again);
    assert_eq!(outbox.depth(), 1);
}

/// A key reused with other content is refused, and nothing of the second
/// request is written (it used to be answered 202 with the first task's
/// id while its own task was dropped).
#[tokio::test]
async fn a_key_reused_for_a_different_request_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let first = task("a.b", 1);
    outbox
        .accept(
            vec![(first, vec![lane()])],
            Some(IdempotencyKey::new("key-1", "export project 1")),
        )
        .await
        .unwrap();
    let other = task("a.b", 2);
    let error = outbox
        .accept(
            vec![(other.clone(), vec![lane()])],
            Some(IdempotencyKey::new("key-1", "export project 2")),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, OutboxError::IdempotencyKeyReused { key } if key == "key-1"),
        "{error}"
    );
    assert_eq!(outbox.depth(), 1);
    assert!(outbox.status(&other.id).unwrap().is_none());
}

#[tokio::test]
async fn batch_with_a_repeated_id_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let one = task("a.b", 1);
    let error = outbox
        .accept(vec![(one.clone(), vec![lane()]), (one.clone(), vec![lane()])], None)
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::DuplicateTaskId(_)));
    assert_eq!(outbox.depth(), 0);
    assert!(outbox.status(&one.id).unwrap().is_none());
}

/// A 503 means not accepted: a task whose group failed to flush is never
/// read by the relay or the tracking writer, never answered by its id, its
/// key is not replayed, and the store refuses everything after it (sled
/// keeps a write error until restart; see `failure`).
#[tokio::test]
async fn a_failed_flush_is_never_accepted_and_stops_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let sled = Arc::new(SledStorage::open(&dir.path().join("o"), 1 << 20).unwrap());
    let faulty = Arc::new(FaultyStorage::new(sled));
    let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
    let before = task("a.b", 0);
    outbox.accept(vec![(before, vec![lane()])], None).await.unwrap();
    faulty.fail_flushes(true);
    let refused = task("a.b", 1);
    let error = outbox
        .accept(vec![(refused.clone(), vec![lane()])], Some(retried("k")))
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::Storage(_)), "{error}");
    // sled applied the batch before the flush failed: it must stay unseen.
    assert!(faulty.get(&status_key(&refused.id)).unwrap().is_some());
    assert!(outbox.status(&refused.id).unwrap().is_none());
    let head = outbox.head(&lane(), 10).unwrap();
    assert_eq!(head.len(), 1, "only the task before the failure is published");
    assert!(outbox.journal_head(10).unwrap().len() == 1);
    assert!(outbox.storage_failure().is_some());
    assert!(!outbox.has_room());
    // The disk is back, but this process no longer writes: a restart does.
    faulty.fail_flushes(false);
    let error = outbox
        .accept(vec![(task("a.b", 2), vec![lane()])], Some(retried("k")))
        .await
        .unwrap_err();
    assert!(
        matches!(error, OutboxError::Storage(StorageError::Failed(_))),
        "{error}"
    );
    let error = outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap_err();
    assert!(
        matches!(error, OutboxError::Storage(StorageError::Failed(_))),
        "{error}"
    );
}

#[tokio::test]
async fn undecodable_record_is_dead_lettered_and_the_lane_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let sled: Arc<dyn OutboxStorage> = Arc::new(SledStorage::open(&dir.path().join("o"), 1 << 20).unwrap());
    sled.apply(vec![(pending_key(&lane(), 1), Some(b"{not json".to_vec()))])
        .unwrap();
    let outbox = Outbox::with_storage(sled, settings(dir.path())).unwrap();
    assert_eq!(outbox.depth(), 1);
    let good = task("a.b", 1);
    outbox.accept(vec![(good.clone(), vec![lane()])], None).await.unwrap();
    let head = outbox.head(&lane(), 10).unwrap();
    assert_eq!(head.len(), 1);
    assert_eq!(head[0].task.id, good.id);
    let letters = outbox.dead_letters(None, 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].reason.contains("could not be decoded"));
    assert_eq!(outbox.stats().unwrap().dead_letters, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_accepts_share_flushes_and_keep_sequence_order() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let mut handles = Vec::new();
    for writer in 0..32 {
        let outbox = outbox.clone();
        handles.push(tokio::spawn(async move {
            for n in 0..20 {
                outbox
                    .accept(vec![(task("a.b", writer * 100 + n), vec![lane()])], None)
                    .await
                    .unwrap();
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let head = outbox.head(&lane(), 10_000).unwrap();
    assert_eq!(head.len(), 640);
    assert!(head.windows(2).all(|pair| pair[0].sequence < pair[1].sequence));
    // Each writer's own tasks stay in the order it sent them.
    for writer in 0..32i64 {
        let mine: Vec<i64> = head
            .iter()
            .map(|e| e.task.args[0].as_i64().unwrap())
            .filter(|n| n / 100 == writer)
            .collect();
        assert!(mine.windows(2).all(|pair| pair[0] < pair[1]));
    }
}

/// Many clients retrying one request at the same moment land in one
/// group: the key and the id must still hold across requests of a group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_of_a_key_or_an_id_write_one_task() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let one = task("a.b", 1);
    let mut keyed = Vec::new();
    let mut same_id = Vec::new();
    for n in 0..16 {
        let outbox_for_key = outbox.clone();
        keyed.push(tokio::spawn(async move {
            outbox_for_key
                .accept(vec![(task("a.b", 100 + n), vec![lane()])], Some(retried("retry-me")))
                .await
                .unwrap()
        }));
        let (outbox, one) = (outbox.clone(), one.clone());
        same_id.push(tokio::spawn(async move {
            outbox.accept(vec![(one, vec![lane()])], None).await
        }));
    }
    let mut accepted_ids = std::collections::HashSet::new();
    let mut first_answers = 0;
    for handle in keyed {
        match handle.await.unwrap() {
            AcceptOutcome::Accepted(acceptances) => {
                first_answers += 1;
                accepted_ids.insert(acceptances[0].id);
            }
            AcceptOutcome::Replayed(acceptances) => {
                accepted_ids.insert(acceptances[0].id);
            }
        }
    }
    assert_eq!(first_answers, 1, "exactly one request with the key writes");
    assert_eq!(accepted_ids.len(), 1, "every repeat answers the same id");
    let mut written = 0;
    for handle in same_id {
        match handle.await.unwrap() {
            Ok(_) => written += 1,
            Err(OutboxError::DuplicateTaskId(id)) => assert_eq!(id, one.id),
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(written, 1, "a task id is accepted once");
    assert_eq!(outbox.depth(), 2);
    assert_eq!(outbox.head(&lane(), 10).unwrap().len(), 2);
}

/// A failed group write leaves nothing behind: no entry, no count, and
/// after a restart the same ids and key are accepted normally.
#[tokio::test]
async fn a_failed_group_write_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sled = Arc::new(SledStorage::open(&dir.path().join("o"), 1 << 20).unwrap());
    let faulty = Arc::new(FaultyStorage::new(sled));
    let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
    let one = task("a.b", 1);
    faulty.fail_writes(true);
    let error = outbox
        .accept(vec![(one.clone(), vec![lane()])], Some(retried("k")))
        .await
        .unwrap_err();
    assert!(matches!(error, OutboxError::Storage(_)), "{error}");
    assert_eq!((outbox.depth(), outbox.bytes(), outbox.journal_depth()), (0, 0, 0));
    assert!(outbox.status(&one.id).unwrap().is_none());
    drop(outbox);
    faulty.fail_writes(false);
    let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
    let outcome = outbox
        .accept(vec![(one.clone(), vec![lane()])], Some(retried("k")))
        .await
        .unwrap();
    assert!(matches!(outcome, AcceptOutcome::Accepted(_)), "{outcome:?}");
    assert_eq!(outbox.depth(), 1);
}

/// A small accept group is written as single keys (`group_manifest`),
/// after a large one written as a sled batch: cut short after any one of
/// its writes, as a crash or a full disk would, the
/// store opened again holds nothing of it (no entry, no status, no journal
/// entry, no idempotency record, counters equal to a scan) and everything
/// accepted before it, and the same ids and key are accepted anew.
#[tokio::test]
async fn a_group_cut_short_after_any_write_is_rolled_back_at_open() {
    let mut cut_at = 0;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledStorage::open(&dir.path().join("o"), 1 << 20).unwrap());
        let faulty = Arc::new(FaultyStorage::new(sled));
        let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
        let before = task("a.b", 0);
        outbox.accept(vec![(before.clone(), vec![lane()])], None).await.unwrap();
        // A group large enough to be written as one sled batch.
        let batch: Vec<(Task, Vec<Lane>)> = (10..30).map(|n| (task("a.b", n), vec![lane()])).collect();
        outbox.accept(batch, None).await.unwrap();
        // Two tasks fanned out to two lanes, with a key: every kind of write.
        let cut: Vec<Task> = (1..3).map(|n| task("a.b", n)).collect();
        let lanes = vec![lane(), Lane::new("other_exchange")];
        let request = || cut.iter().map(|task| (task.clone(), lanes.clone())).collect::<Vec<_>>();
        faulty.fail_writes_after(cut_at);
        let outcome = outbox.accept(request(), Some(retried("k"))).await;
        drop(outbox);
        faulty.fail_writes(false);
        if outcome.is_ok() {
            // Every write of the group got through: it was written whole.
            assert!(cut_at > 5, "the group was written in {cut_at} writes");
            break;
        }
        let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
        let context = format!("cut after {cut_at} writes");
        assert_eq!(outbox.depth(), 21, "{context}");
        assert_eq!(outbox.journal_depth(), 21, "{context}");
        assert_eq!(outbox.head(&lane(), 10).unwrap()[0].task.id, before.id, "{context}");
        for task in &cut {
            assert!(faulty.get(&status_key(&task.id)).unwrap().is_none(), "{context}");
        }
        assert_eq!(
            faulty.scan(&pending_prefix(&lanes[0]), None, 100).unwrap().len(),
            21,
            "{context}"
        );
        assert!(
            faulty.scan(&pending_prefix(&lanes[1]), None, 100).unwrap().is_empty(),
            "{context}"
        );
        assert!(faulty.get(b"i/k").unwrap().is_none(), "{context}");
        assert_counters_match_a_scan(&outbox);
        let outcome = outbox.accept(request(), Some(retried("k"))).await.unwrap();
        assert!(matches!(outcome, AcceptOutcome::Accepted(_)), "{context}: {outcome:?}");
        assert_eq!(outbox.depth(), 25, "{context}");
        drop(outbox);
        // And that group, finished, is kept by the next open.
        let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
        assert_eq!(outbox.depth(), 25, "{context}");
        assert!(outbox.status(&cut[1].id).unwrap().is_some(), "{context}");
        cut_at += 1;
    }
}

#[tokio::test]
async fn prune_forgets_old_published_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&OutboxSettings {
        published_retention_seconds: 0,
        ..settings(dir.path())
    })
    .unwrap();
    let one = task("a.b", 1);
    outbox.accept(vec![(one.clone(), vec![lane()])], None).await.unwrap();
    let head = outbox.head(&lane(), 10).unwrap();
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(outbox.prune().unwrap() >= 1);
    assert!(outbox.status(&one.id).unwrap().is_none());
}

#[tokio::test]
async fn prune_forgets_every_status_a_window_published_and_old_index_records() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&OutboxSettings {
        published_retention_seconds: 0,
        ..settings(dir.path())
    })
    .unwrap();
    let window: Vec<Task> = (0..3).map(|n| task("a.b", n)).collect();
    let batch = window.iter().map(|task| (task.clone(), vec![lane()])).collect();
    outbox.accept(batch, None).await.unwrap();
    let head = outbox.head(&lane(), 10).unwrap();
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    // A published status indexed the way outboxes before 2026-11-28 did:
    // one empty record per task, the id in its key.
    let older = task("a.b", 9);
    outbox.accept(vec![(older.clone(), vec![lane()])], None).await.unwrap();
    let head = outbox.head(&lane(), 10).unwrap();
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    let index = outbox.shared.storage.scan(PUBLISHED_INDEX, None, 10).unwrap();
    assert_eq!(index.len(), 2, "one index record per published window");
    let (older_key, _) = index
        .iter()
        .find(|(key, _)| key.ends_with(older.id.as_bytes()))
        .unwrap();
    outbox
        .shared
        .storage
        .apply(vec![(older_key.clone(), Some(Vec::new()))])
        .unwrap();
    for task in window.iter().chain([&older]) {
        assert_eq!(outbox.status(&task.id).unwrap().unwrap().state, TaskState::Published);
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(outbox.prune().unwrap(), 4);
    for task in window.iter().chain([&older]) {
        assert!(outbox.status(&task.id).unwrap().is_none());
    }
    assert!(outbox
        .shared
        .storage
        .scan(PUBLISHED_INDEX, None, 10)
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn room_returns_only_after_draining_below_ninety_percent() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&OutboxSettings {
        max_bytes: 40_000,
        ..settings(dir.path())
    })
    .unwrap();
    let mut accepted = 0;
    while outbox
        .accept(vec![(task("a.b", accepted), vec![lane()])], None)
        .await
        .is_ok()
    {
        accepted += 1;
    }
    assert!(!outbox.has_room(), "a refusal makes the outbox report no room");
    let head = outbox.head(&lane(), 1).unwrap();
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    assert!(!outbox.has_room(), "one confirmed task is not enough room to flap back");
    let head = outbox.head(&lane(), 1000).unwrap();
    outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
    assert!(outbox.has_room());
}

/// The stored `m/counters` record, the in-memory counters and a full scan
/// of the store agree.
fn assert_counters_match_a_scan(outbox: &Outbox) {
    let (scanned, _) = scan_counters(outbox.shared.storage.as_ref()).unwrap();
    let stored: PersistedCounters =
        serde_json::from_slice(&outbox.shared.storage.get(COUNTERS).unwrap().expect("m/counters")).unwrap();
    let normalise = |mut record: PersistedCounters| {
        record.lanes.sort();
        record.queues.sort();
        serde_json::to_value(record).unwrap()
    };
    let mut scanned = scanned;
    // Not a count: the group number the scan cannot know.
    scanned.finished_group = outbox.shared.counters.lock().unwrap().finished_group;
    scanned.journal = journal::scan_depth(outbox.shared.storage.as_ref()).unwrap().0;
    assert_eq!(outbox.journal_depth(), scanned.journal, "journal depth vs scan");
    let in_memory = outbox.shared.counters.lock().unwrap().to_record();
    assert_eq!(
        normalise(stored),
        normalise(scanned.to_record()),
        "stored record vs scan"
    );
    assert_eq!(normalise(in_memory), normalise(scanned.to_record()), "memory vs scan");
}

/// Every kind of change (accept with fan-out, confirm, dead letter,
/// requeue, delete, purge) keeps the stored counters equal to what a scan
/// finds, and a reopened outbox starts from them.
#[tokio::test]
async fn stored_counters_follow_every_change_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let second = Lane::new("second");
    {
        let outbox = Outbox::open(&settings(dir.path())).unwrap();
        for n in 0..6 {
            let lanes = if n % 2 == 0 {
                vec![lane()]
            } else {
                vec![lane(), second.clone()]
            };
            outbox.accept(vec![(task("a.b", n), lanes)], None).await.unwrap();
        }
        assert_counters_match_a_scan(&outbox);
        let head = outbox.head(&lane(), 2).unwrap();
        outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
        assert_counters_match_a_scan(&outbox);
        let next = outbox.head(&lane(), 2).unwrap();
        outbox.dead_letter(&next[0], "refused", Attempt::Made).unwrap();
        outbox.dead_letter(&next[1], "refused", Attempt::Made).unwrap();
        assert_counters_match_a_scan(&outbox);
        outbox.requeue_dead_letter(next[0].sequence).unwrap();
        outbox.delete_dead_letter(next[1].sequence).unwrap();
        assert_counters_match_a_scan(&outbox);
        let recorded: Vec<u64> = outbox
            .journal_head(4)
            .unwrap()
            .iter()
            .map(|entry| entry.sequence)
            .collect();
        outbox.remove_journal_entries(&recorded).unwrap();
        assert_counters_match_a_scan(&outbox);
        outbox.flush().await.unwrap();
    }
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    assert_counters_match_a_scan(&outbox);
    let depth = outbox.depth();
    assert_eq!(
        depth,
        6 + 3 - 2 - 2 + 1,
        "6 accepted (3 fanned out), 2 confirmed, 2 dead, 1 requeued"
    );
    assert_eq!(outbox.purge_pending().unwrap(), depth);
    assert_counters_match_a_scan(&outbox);
    assert_eq!((outbox.depth(), outbox.bytes()), (0, 0));
}

/// An outbox written without the record (an older one) is counted by a
/// scan at open, and the record is written for the next open.
#[tokio::test]
async fn an_outbox_without_stored_counters_is_scanned_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    {
        let sled: Arc<dyn OutboxStorage> = Arc::new(SledStorage::open(&path, 1 << 20).unwrap());
        let encoded = serde_json::to_vec(&task("a.b", 1)).unwrap();
        sled.apply(vec![(pending_key(&lane(), 7), Some(encoded))]).unwrap();
        sled.flush().unwrap();
    }
    let sled: Arc<dyn OutboxStorage> = Arc::new(SledStorage::open(&path, 1 << 20).unwrap());
    let outbox = Outbox::with_storage(sled, settings(dir.path())).unwrap();
    assert_eq!(outbox.depth(), 1);
    assert_counters_match_a_scan(&outbox);
    // New sequences start above the scanned ones.
    outbox.accept(vec![(task("a.b", 2), vec![lane()])], None).await.unwrap();
    let head = outbox.head(&lane(), 10).unwrap();
    assert_eq!(head[0].sequence, 7);
    assert!(head[1].sequence > 7);
}

/// A write that fails must not leave the sequence reservation ahead in
/// memory only: later writes would then use sequences the store never
/// reserved, and a restart (which trusts the stored reservation) would hand
/// them out again, overwriting pending tasks.
#[tokio::test]
async fn a_failed_write_never_lets_a_restart_reuse_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let accepted = {
        let sled = Arc::new(SledStorage::open(&path, 1 << 20).unwrap());
        let faulty = Arc::new(FaultyStorage::new(sled));
        let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
        faulty.fail_writes(true);
        outbox
            .accept(vec![(task("a.b", 0), vec![lane()])], None)
            .await
            .unwrap_err();
        drop(outbox);
        faulty.fail_writes(false);
        // Opened again over the same store, as a restart would.
        let outbox = Outbox::with_storage(faulty.clone(), settings(dir.path())).unwrap();
        let mut accepted = Vec::new();
        for n in 1..4 {
            let task = task("a.b", n);
            accepted.push(task.id);
            outbox.accept(vec![(task, vec![lane()])], None).await.unwrap();
        }
        accepted
    };
    let sled: Arc<dyn OutboxStorage> = Arc::new(SledStorage::open(&path, 1 << 20).unwrap());
    let outbox = Outbox::with_storage(sled, settings(dir.path())).unwrap();
    let mut expected = accepted;
    for n in 4..8 {
        let task = task("a.b", n);
        expected.push(task.id);
        outbox.accept(vec![(task, vec![lane()])], None).await.unwrap();
    }
    let ids: Vec<TaskId> = outbox
        .head(&lane(), 100)
        .unwrap()
        .iter()
        .map(|entry| entry.task.id)
        .collect();
    assert_eq!(ids, expected, "every accepted task pending, in order");
}

/// Re-sends are known: a window sent again (after a failure, or by the
/// next process after a crash) counts its entries as re-sent; new entries
/// behind it do not count.
#[tokio::test]
async fn a_window_sent_again_counts_as_resent_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let window = {
        let outbox = Outbox::open(&settings(dir.path())).unwrap();
        for n in 0..5 {
            outbox.accept(vec![(task("a.b", n), vec![lane()])], None).await.unwrap();
        }
        let window = outbox.head(&lane(), 3).unwrap();
        let first = outbox.mark_sending(&lane(), &window).unwrap();
        assert_eq!(first, SendMark { resent: 0, moved: true });
        // The window failed and goes again.
        let again = outbox.mark_sending(&lane(), &window).unwrap();
        assert_eq!(
            again,
            SendMark {
                resent: 3,
                moved: false
            }
        );
        outbox.flush().await.unwrap();
        window
    };
    let outbox = Outbox::open(&settings(dir.path())).unwrap();
    let head = outbox.head(&lane(), 5).unwrap();
    assert_eq!(head[0].sequence, window[0].sequence);
    let after_restart = outbox.mark_sending(&lane(), &head).unwrap();
    assert_eq!(after_restart, SendMark { resent: 3, moved: true });
}

/// Opens the outbox at `dir`, retrying while sled's threads of an outbox
/// just dropped still hold its lock.
async fn reopen(dir: &std::path::Path) -> Result<Arc<Outbox>, OutboxError> {
    for _ in 0..100 {
        match Outbox::open(&settings(dir)) {
            Err(OutboxError::Storage(StorageError::Locked { .. })) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
    Outbox::open(&settings(dir))
}

fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_store(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A store that went back in time (what sled does with a log damaged in
/// its middle: it replays up to the damage and stops) is refused as
/// damaged, naming salvage, while an intact store, and the earlier store
/// with its own watermark, open as usual.
#[tokio::test]
async fn a_store_older_than_its_watermark_is_refused_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let current = dir.path().join("current");
    let earlier = dir.path().join("earlier");
    {
        let outbox = Outbox::open(&settings(&current)).unwrap();
        for n in 0..20 {
            outbox
                .accept(vec![(task("export.project", n), vec![lane()])], None)
                .await
                .unwrap();
        }
    }
    // The committer wrote the watermark as it closed.
    // (Each task takes two sequences: its entry and its journal entry.)
    let watermark::Reading::Valid(after_20) = watermark::read(&settings(&current).path) else {
        panic!("no watermark written at close");
    };
    assert!(after_20 >= 20);
    reopen(&current).await.unwrap();
    copy_store(&current, &earlier);
    {
        let outbox = reopen(&current).await.unwrap();
        for n in 20..50 {
            outbox
                .accept(vec![(task("export.project", n), vec![lane()])], None)
                .await
                .unwrap();
        }
        // Published and completed tasks leave the store; the watermark
        // and the stored next sequence still agree.
        let head = outbox.head(&lane(), 10).unwrap();
        outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
        outbox.flush().await.unwrap();
    }
    let watermark::Reading::Valid(after_50) = watermark::read(&settings(&current).path) else {
        panic!("no watermark written at close");
    };
    assert!(after_50 >= after_20 + 30, "{after_20} then {after_50}");
    assert_eq!(reopen(&current).await.unwrap().depth(), 40);
    // The earlier store with its own witness is fine.
    assert_eq!(reopen(&earlier).await.unwrap().depth(), 20);

    // The earlier store under the later witness: 30 acknowledged tasks
    // are not in it.
    std::fs::copy(
        settings(&current).path.join(watermark::FILE_NAME),
        settings(&earlier).path.join(watermark::FILE_NAME),
    )
    .unwrap();
    let refused = reopen(&earlier).await.err().expect("an earlier state is refused");
    let message = refused.to_string();
    assert!(
        matches!(refused, OutboxError::Storage(StorageError::Corrupt(_))),
        "{message}"
    );
    assert!(message.contains("earlier state"), "{message}");
    assert!(message.contains("outbox salvage"), "{message}");
    assert!(
        message.contains(&settings(&earlier).path.display().to_string()),
        "{message}"
    );
}
