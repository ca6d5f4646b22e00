//! The journal writer: moves the outbox's tracking journal into
//! `background_tasks`.
//!
//! One task, one page at a time: read up to `tracking.batch_size` entries
//! from the journal head, upsert them in one transaction, then remove
//! exactly those entries.
//!
//! A page that is not full waits until its oldest entry is [`GATHER`] old
//! before it is written: a producer sending one task at a time would
//! otherwise cost one SQL transaction and one outbox batch (with its own
//! writes to disk) per task, on the same two cores as the accepts it
//! slows. Recording is at most that much later; a full page goes at once,
//! and `tracking.max_deferral_seconds = 0` (record at once) turns it off.
//!
//! Accepting and publishing come first. While the outbox is under load
//! (the relay publishing a backlog, or accepts queueing for the disk), the
//! writer leaves the journal alone until its oldest entry is
//! `tracking.max_deferral_seconds` old: recording costs about as much CPU
//! as publishing (SQLite with the platform's nine indexes, in this
//! process), and on two cores it would slow both. The lag is bounded
//! (under load that never ends the writer keeps pace, that far behind),
//! the journal is durable, and a burst shorter than the bound is recorded
//! once it is over. While the database is away the same page is
//! retried with backoff and the journal grows on disk only (memory holds
//! one page). Entries that do not decode, or rows the database refuses for
//! their data, are logged, counted and removed: they could never be
//! written, and must not hold back the tasks behind them.

use super::record::{RecordSource, TaskRecord};
use super::Shared;
use crate::outbox::Outbox;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

/// How long the writer sleeps with an empty journal when no accept wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long the oldest entry of a page that is not full waits for company.
const GATHER: Duration = Duration::from_millis(100);
/// How often a deferring writer looks again.
const DEFERRAL_POLL: Duration = Duration::from_millis(250);
/// The outbox counts as under load for this long after the last sign of it.
const BUSY_WITHIN: Duration = Duration::from_secs(1);

/// How much longer a page of `len` entries (of at most `limit`) waits for
/// company, given when its oldest task was accepted: `None` to write it now.
fn gather_wait(len: usize, limit: usize, oldest: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Duration> {
    if len >= limit {
        return None;
    }
    let age = (now - oldest?).to_std().unwrap_or_default();
    GATHER.checked_sub(age).filter(|wait| !wait.is_zero())
}

/// Whether the journal may wait: the outbox is under load and the oldest
/// unrecorded task is younger than the bound.
fn should_defer(outbox: &Outbox, bound_seconds: f64) -> bool {
    if bound_seconds <= 0.0 || !outbox.is_busy(BUSY_WITHIN) {
        return false;
    }
    match outbox.journal_oldest_accepted_at() {
        Ok(Some(oldest)) => {
            let age = (chrono::Utc::now() - oldest).to_std().unwrap_or_default();
            age.as_secs_f64() < bound_seconds
        }
        Ok(None) | Err(_) => false,
    }
}

pub(crate) async fn run(shared: Arc<Shared>) {
    if !shared.wait_for_schema().await {
        return;
    }
    let mut backoff = shared.backoff();
    // Whether the page about to be read has had its wait for company: one
    // wait per page at most, whatever the wall clock (which dates the
    // entries) does.
    let mut gathered = false;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        if should_defer(&shared.outbox, shared.settings.max_deferral_seconds) {
            if !shared.pause(DEFERRAL_POLL).await {
                return;
            }
            continue;
        }
        let outbox = shared.outbox.clone();
        let limit = shared.settings.batch_size;
        let page = match tokio::task::spawn_blocking(move || outbox.journal_head(limit)).await {
            Ok(Ok(page)) => page,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading the tracking journal failed");
                if !shared.pause(Duration::from_millis(shared.settings.retry_max_ms)).await {
                    return;
                }
                continue;
            }
            Err(join) => {
                tracing::error!(%join, "journal read task failed");
                return;
            }
        };
        if page.is_empty() {
            tokio::select! {
                _ = shared.outbox.wait_for_journal() => {}
                _ = tokio::time::sleep(IDLE_WAIT) => {}
                _ = shared.stop.cancelled() => return,
            }
            continue;
        }
        let oldest = page[0].task.as_ref().ok().map(|task| task.accepted_at);
        let may_wait = !gathered && shared.settings.max_deferral_seconds > 0.0;
        if let Some(wait) = gather_wait(page.len(), limit, oldest, Utc::now()).filter(|_| may_wait) {
            gathered = true;
            if !shared.pause(wait).await {
                return;
            }
            continue;
        }
        gathered = false;
        let sequences: Vec<u64> = page.iter().map(|entry| entry.sequence).collect();
        let mut records = Vec::with_capacity(page.len());
        for entry in &page {
            match &entry.task {
                Ok(task) => records.push(TaskRecord::from_accepted(task)),
                Err(reason) => {
                    tracing::error!(sequence = entry.sequence, %reason, "undecodable tracking journal entry dropped");
                    metrics::counter!("taskgate_tracking_rows_rejected_total").increment(1);
                }
            }
        }
        let outcome = shared.store.upsert(&records, RecordSource::Gateway).await;
        shared.observe(&outcome);
        match outcome {
            Ok(written) => {
                backoff.reset();
                metrics::counter!("taskgate_tracking_rows_written_total", "source" => RecordSource::Gateway.as_str())
                    .increment(written.written as u64);
                let outbox = shared.outbox.clone();
                match tokio::task::spawn_blocking(move || outbox.remove_journal_entries(&sequences)).await {
                    Ok(Ok(())) => {}
                    // The rows are written; the entries come back and are
                    // upserted again, which changes nothing.
                    Ok(Err(error)) => tracing::error!(%error, "removing recorded journal entries failed"),
                    Err(join) => tracing::error!(%join, "journal removal task failed"),
                }
                metrics::gauge!("taskgate_tracking_journal_depth").set(shared.outbox.journal_depth() as f64);
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::debug!(%error, pending = shared.outbox.journal_depth(), ?delay, "tracking journal not written; retrying");
                if !shared.pause(delay).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Lane, OutboxSettings};
    use crate::task::{Task, TaskId};
    use serde_json::Map;

    /// A page that is not full waits until its oldest task is GATHER old,
    /// and no longer; a full page, or one whose age is unknown, goes now.
    #[test]
    fn a_page_that_is_not_full_waits_for_company_only_so_long() {
        let now = Utc::now();
        let accepted = |ago_ms: i64| Some(now - chrono::Duration::milliseconds(ago_ms));
        assert_eq!(gather_wait(1, 500, accepted(0), now), Some(GATHER));
        assert_eq!(
            gather_wait(1, 500, accepted(40), now),
            Some(GATHER - Duration::from_millis(40))
        );
        assert_eq!(gather_wait(1, 500, accepted(100), now), None);
        assert_eq!(gather_wait(1, 500, accepted(5_000), now), None);
        assert_eq!(gather_wait(500, 500, accepted(0), now), None);
        assert_eq!(gather_wait(1, 500, None, now), None);
        // A clock that stepped back makes the task look new: it waits GATHER
        // (once: the writer waits at most once per page).
        assert_eq!(gather_wait(1, 500, accepted(-1_000), now), Some(GATHER));
    }

    /// Wired up: a task accepted alone is recorded, but only once its page
    /// waited GATHER for company.
    #[tokio::test]
    async fn a_lone_task_is_recorded_once_its_page_waited_for_company() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&OutboxSettings::for_test(&dir.path().join("outbox"))).unwrap();
        let mut settings = crate::config::Settings::default();
        settings.tracking.database_url = format!("sqlite://{}", dir.path().join("tracking.db").display());
        let tracking = super::super::Tracking::start(&settings, outbox.clone()).unwrap();
        // Taken before the task is made, so the task's accepted_at (which
        // the writer dates the page by) is no earlier.
        let started = std::time::Instant::now();
        let task = Task::for_test(TaskId::generate(), "app.work", vec![], Map::new(), "app", &["q"]);
        outbox
            .accept(vec![(task, vec![Lane::new("exchange")])], None)
            .await
            .unwrap();
        assert_eq!(outbox.journal_depth(), 1);
        while outbox.journal_depth() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the lone task was never recorded"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let recorded_after = started.elapsed();
        assert!(
            recorded_after >= GATHER,
            "recorded after {recorded_after:?}, before its page waited {GATHER:?}"
        );
        tracking.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn the_journal_waits_only_while_the_outbox_is_under_load_and_only_so_long() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&OutboxSettings::for_test(dir.path())).unwrap();
        let lane = Lane::new("exchange");
        let task = || Task::for_test(TaskId::generate(), "app.work", vec![], Map::new(), "app", &["q"]);
        for _ in 0..3 {
            outbox.accept(vec![(task(), vec![lane.clone()])], None).await.unwrap();
        }
        // Spooled one by one, nothing published yet: record at once.
        assert!(!should_defer(&outbox, 30.0));

        let head = outbox.head(&lane, 1).unwrap();
        outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
        // Publishing, with more to go: wait, unless waiting is switched off
        // or the oldest unrecorded task is already older than the bound.
        assert!(should_defer(&outbox, 30.0));
        assert!(!should_defer(&outbox, 0.0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!should_defer(&outbox, 0.01));

        // Drained: record at once.
        let rest = outbox.head(&lane, 10).unwrap();
        outbox.complete(&rest.iter().collect::<Vec<_>>()).unwrap();
        assert!(!should_defer(&outbox, 30.0));

        // Many writers at once queue up behind the disk: wait.
        let lanes = vec![lane.clone()];
        let crowd = (0..64).map(|_| outbox.accept(vec![(task(), lanes.clone())], None));
        for outcome in futures_util::future::join_all(crowd).await {
            outcome.unwrap();
        }
        assert!(should_defer(&outbox, 30.0));
    }
}
