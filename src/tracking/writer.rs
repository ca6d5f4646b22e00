//! The journal writer: moves the outbox's tracking journal into
//! `background_tasks`.
//!
//! One task, one page at a time: read up to `tracking.batch_size` entries
//! from the journal head, upsert them in one transaction, then remove
//! exactly those entries. While the database is away the same page is
//! retried with backoff and the journal grows on disk only (memory holds
//! one page). Entries that do not decode, or rows the database refuses for
//! their data, are logged, counted and removed: they could never be
//! written, and must not hold back the tasks behind them.

use super::record::{RecordSource, TaskRecord};
use super::Shared;
use backoff::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;

/// How long the writer sleeps with an empty journal when no accept wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(1);

pub(crate) async fn run(shared: Arc<Shared>) {
    if !shared.wait_for_schema().await {
        return;
    }
    let mut backoff = shared.backoff();
    loop {
        if shared.stop.is_cancelled() {
            return;
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
                let delay = backoff
                    .next_backoff()
                    .unwrap_or(Duration::from_millis(shared.settings.retry_max_ms));
                tracing::debug!(%error, pending = shared.outbox.journal_depth(), ?delay, "tracking journal not written; retrying");
                if !shared.pause(delay).await {
                    return;
                }
            }
        }
    }
}
