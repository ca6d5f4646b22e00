//! Task tracking in SQL: every task recorded in `background_tasks`, Celery
//! results read back from `celery_taskmeta`, and the tracking-queue consumer
//! that records tasks workers scheduled themselves (it replaces the
//! platform's `sync_tasks` daemon).
//!
//! Pieces:
//! - [`store`]: sqlx on SQLite or PostgreSQL (migrations in `migrations/`),
//!   upserts, lookups, the paged list, result rows.
//! - [`record`]: the row built from an accepted task or a queue message.
//! - [`writer`]: the journal writer: outbox journal (`j/` keys) to rows.
//! - [`consumer`]: the tracking-queue consumer on AMQP and SQS.
//! - [`result`]: decoding stored results (pickle or JSON) into JSON.
//! - [`progress`]: live task states (a worker's `update_state`) for the
//!   event streams, one poller for every follower.
//!
//! # Invariants
//!
//! 1. **Recording never blocks acceptance.** `POST /v1/tasks` only writes
//!    the outbox; its journal entry rides in the same atomic batch
//!    ([`crate::outbox::journal`]). The database is written in the
//!    background, in batches, and nothing here is awaited by a `POST`.
//! 2. **Nothing is lost while the database is away.** Journal entries
//!    leave the outbox only after their rows are committed; tracking-queue
//!    messages are acknowledged (AMQP `basic.ack`, SQS `DeleteMessage`)
//!    only after their rows are committed. Both retry with backoff.
//! 3. **Idempotent.** Every write is an upsert by `task_id`, so replays
//!    (after a crash, a redelivery, a duplicate publish) change nothing.
//! 4. **Start-up never waits on the database.** The pool connects lazily;
//!    migrations run in a background task that retries until they succeed;
//!    until then reads answer "unavailable" at once and writers wait.
//! 5. **Every database call is bounded** (`tracking.query_timeout_ms`), and
//!    reads fail fast while the database is known to be unreachable, so a
//!    `GET` never hangs on it.
//! 6. **A database outage is a warning**, never a failure of the gateway:
//!    health reports it as `warn` (`tracking:database`).

pub mod consumer;
pub mod progress;
pub mod record;
pub mod result;
pub mod store;
pub mod writer;

use crate::config::{Settings, TrackingSettings};
use crate::outbox::Outbox;
use crate::retry::RetryDelays;
use chrono::{DateTime, Utc};
use result::TaskResult;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{ListCursor, StoreError, TaskFilter, TaskPage, TrackedTask, TrackingStore};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the database is probed while it answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How often gauges are refreshed and an unreachable database re-probed.
const TICK: Duration = Duration::from_secs(1);

/// What tracking reports about its database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatabaseStatus {
    /// Migrations applied (or, with `migrate_on_start` off, the schema found).
    pub schema_ready: bool,
    /// The last call reached the database.
    pub reachable: bool,
    /// The first attempt (migrations or schema check) has finished, either
    /// way: until then, reads wait for it (bounded) instead of failing.
    pub first_attempt_done: bool,
    pub last_error: Option<String>,
    pub changed_at: DateTime<Utc>,
}

/// What the tracking-queue consumer reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsumerStatus {
    pub queue: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// Messages waiting in the queue at the last look (the consumer's lag).
    pub waiting: Option<u64>,
    pub changed_at: DateTime<Utc>,
}

/// Everything health needs to know about tracking, read without waiting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackingHealth {
    pub endpoint: String,
    pub database: DatabaseStatus,
    pub journal_depth: u64,
    pub journal_oldest_age_seconds: Option<f64>,
    /// The journal reached `outbox.max_journal_entries`: new tasks are not
    /// recorded until it drains.
    pub journal_full: bool,
    pub consumer: Option<ConsumerStatus>,
}

/// Why a tracking read could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TrackingError {
    #[error("the tracking database is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Shared state of the background pieces.
pub(crate) struct Shared {
    pub(crate) store: TrackingStore,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) settings: TrackingSettings,
    database: watch::Sender<DatabaseStatus>,
    consumer: watch::Sender<Option<ConsumerStatus>>,
    pub(crate) stop: CancellationToken,
}

impl Shared {
    /// Notes the outcome of a database call in the status.
    pub(crate) fn observe<T>(&self, outcome: &Result<T, StoreError>) {
        match outcome {
            Ok(_) => self.set_reachable(true, None),
            Err(StoreError::Unavailable(error)) => self.set_reachable(false, Some(error.clone())),
            // The database answered; the schema is what is wrong.
            Err(StoreError::Migration(error)) => self.set_reachable(true, Some(error.clone())),
            // The database answered; it refused a row or a setting.
            Err(StoreError::Rejected(_)) | Err(StoreError::Settings(_)) => self.set_reachable(true, None),
        }
    }

    fn set_reachable(&self, reachable: bool, error: Option<String>) {
        metrics::gauge!("taskgate_tracking_database_up").set(if reachable { 1.0 } else { 0.0 });
        self.database.send_if_modified(|status| {
            let changed = status.reachable != reachable || status.last_error != error;
            if changed {
                if reachable && !status.reachable {
                    tracing::info!(endpoint = %self.store.endpoint(), "tracking database reachable");
                } else if !reachable && status.reachable {
                    tracing::warn!(endpoint = %self.store.endpoint(), error = ?error, "tracking database unreachable; tracking continues in the background");
                }
                status.reachable = reachable;
                status.last_error = error.clone();
                status.changed_at = Utc::now();
            }
            changed
        });
    }

    fn set_first_attempt_done(&self) {
        self.database.send_if_modified(|status| {
            let changed = !status.first_attempt_done;
            status.first_attempt_done = true;
            changed
        });
    }

    fn set_schema_ready(&self) {
        self.database.send_if_modified(|status| {
            let changed = !status.schema_ready;
            status.schema_ready = true;
            changed
        });
    }

    pub(crate) fn schema_ready(&self) -> bool {
        self.database.borrow().schema_ready
    }

    /// Resolves once the schema is ready, or returns false on stop.
    pub(crate) async fn wait_for_schema(&self) -> bool {
        let mut status = self.database.subscribe();
        tokio::select! {
            ready = status.wait_for(|status| status.schema_ready) => ready.is_ok(),
            _ = self.stop.cancelled() => false,
        }
    }

    pub(crate) fn set_consumer(&self, update: impl FnOnce(&mut ConsumerStatus)) {
        self.consumer.send_modify(|status| {
            if let Some(status) = status.as_mut() {
                update(status);
                status.changed_at = Utc::now();
            }
        });
    }

    /// Delays for retrying the database or a consumer, from the settings.
    pub(crate) fn backoff(&self) -> RetryDelays {
        self.settings.retry_policy().delays()
    }

    /// Sleeps `delay`; false when stopped meanwhile.
    pub(crate) async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.stop.cancelled() => false,
        }
    }
}

/// The tracking service: background writers and the read API.
pub struct Tracking {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Live task states for the event streams.
    progress: Arc<progress::ProgressWatcher>,
}

impl Tracking {
    /// Starts tracking in the background: migrations (when
    /// `migrate_on_start`), the database probe, the journal writer and, with
    /// `tracking.sync_queue` set, the tracking-queue consumer. Returns at
    /// once; nothing here touches the database.
    pub fn start(settings: &Settings, outbox: Arc<Outbox>) -> Result<Arc<Self>, StoreError> {
        let store = TrackingStore::connect_lazy(&settings.tracking)?;
        let (database, _) = watch::channel(DatabaseStatus {
            schema_ready: false,
            reachable: false,
            first_attempt_done: false,
            last_error: Some("connecting".into()),
            changed_at: Utc::now(),
        });
        let consumer_status = settings.tracking.sync_queue.as_ref().map(|queue| ConsumerStatus {
            queue: queue.clone(),
            connected: false,
            last_error: Some("waiting for the tracking database".into()),
            waiting: None,
            changed_at: Utc::now(),
        });
        let (consumer, _) = watch::channel(consumer_status);
        let shared = Arc::new(Shared {
            store,
            outbox,
            settings: settings.tracking.clone(),
            database,
            consumer,
            stop: CancellationToken::new(),
        });
        let mut tasks = vec![
            tokio::spawn(supervise_database(shared.clone())),
            tokio::spawn(writer::run(shared.clone())),
        ];
        if let Some(queue) = &settings.tracking.sync_queue {
            tasks.push(consumer::spawn(shared.clone(), settings.broker.clone(), queue.clone()));
        }
        let progress = Arc::new(progress::ProgressWatcher::default());
        tasks.push(tokio::spawn(progress::run(shared.clone(), progress.clone())));
        Ok(Arc::new(Self {
            shared,
            tasks: Mutex::new(tasks),
            progress,
        }))
    }

    /// The current health inputs (reads the outbox journal head: one key).
    pub fn health(&self) -> TrackingHealth {
        let outbox = &self.shared.outbox;
        let journal_oldest_age_seconds = outbox
            .journal_oldest_accepted_at()
            .ok()
            .flatten()
            .map(|at| ((Utc::now() - at).num_milliseconds().max(0) as f64) / 1000.0);
        TrackingHealth {
            endpoint: self.shared.store.endpoint().to_owned(),
            database: self.shared.database.borrow().clone(),
            journal_depth: outbox.journal_depth(),
            journal_oldest_age_seconds,
            journal_full: outbox.journal_is_full(),
            consumer: self.shared.consumer.borrow().clone(),
        }
    }

    /// Journal age after which health warns.
    pub fn warn_journal_age_seconds(&self) -> f64 {
        self.shared.settings.warn_journal_age_seconds
    }

    /// Whether reads may go to the database. Right after start-up, waits
    /// (at most the connect timeout) for the first attempt to finish, so a
    /// gateway that just started answers from the database it can reach;
    /// after that, never waits: a known outage fails at once.
    async fn available(&self) -> Result<(), TrackingError> {
        let mut changes = self.shared.database.subscribe();
        let first_attempt = Duration::from_millis(self.shared.settings.connect_timeout_ms);
        let _ = tokio::time::timeout(first_attempt, changes.wait_for(|status| status.first_attempt_done)).await;
        let status = self.shared.database.borrow();
        if !status.schema_ready {
            return Err(TrackingError::Unavailable(
                status
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "migrations not applied yet".into()),
            ));
        }
        if !status.reachable {
            return Err(TrackingError::Unavailable(
                status.last_error.clone().unwrap_or_else(|| "unreachable".into()),
            ));
        }
        Ok(())
    }

    /// The row of a task, by Celery task id or public id.
    pub async fn find(&self, key: &str) -> Result<Option<TrackedTask>, TrackingError> {
        self.available().await?;
        let outcome = self.shared.store.find(key).await;
        self.shared.observe(&outcome);
        Ok(outcome?)
    }

    /// The Celery result of a task, decoded.
    pub async fn result(&self, task_id: &str) -> Result<Option<TaskResult>, TrackingError> {
        self.available().await?;
        let outcome = self.shared.store.result(task_id).await;
        self.shared.observe(&outcome);
        Ok(outcome?.map(result::StoredResult::into_task_result))
    }

    /// Follows a task's Celery state as the result backend shows it (one
    /// poller for every follower, see [`progress`]).
    pub fn follow_result(&self, task_id: &str) -> tokio::sync::watch::Receiver<progress::Observed> {
        self.progress.follow(task_id)
    }

    /// A page of tracked tasks, newest first.
    pub async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&ListCursor>,
        limit: u32,
    ) -> Result<TaskPage, TrackingError> {
        self.available().await?;
        let outcome = self.shared.store.list(filter, cursor, limit).await;
        self.shared.observe(&outcome);
        Ok(outcome?)
    }

    /// Stops the background pieces: a batch being written finishes (each
    /// call is bounded), unacknowledged messages go back to their queue,
    /// unrecorded journal entries stay in the outbox. Then closes the pool.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.stop.cancel();
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().expect("tracking tasks lock").drain(..).collect();
        let deadline = tokio::time::Instant::now() + grace;
        for task in tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("tracking did not stop within the grace period");
                break;
            }
        }
        self.shared.store.close().await;
    }
}

/// Applies migrations until they succeed, then probes the database so the
/// status (and fail-fast reads) follow outages; refreshes the gauges.
async fn supervise_database(shared: Arc<Shared>) {
    let mut backoff = shared.backoff();
    let mut last_probe: Option<Instant> = None;
    loop {
        if !shared.schema_ready() {
            let outcome = if shared.settings.migrate_on_start {
                shared.store.migrate().await
            } else {
                shared.store.schema_present().await
            };
            shared.observe(&outcome);
            if outcome.is_ok() {
                shared.set_schema_ready();
            }
            shared.set_first_attempt_done();
            match outcome {
                Ok(()) => {
                    tracing::info!(endpoint = %shared.store.endpoint(), "tracking database schema ready");
                    backoff.reset();
                }
                Err(error) => {
                    tracing::debug!(%error, "tracking schema not ready; retrying");
                    let delay = backoff.next_delay();
                    refresh_gauges(&shared);
                    if !shared.pause(delay).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let reachable = shared.database.borrow().reachable;
        let due = last_probe.is_none_or(|at| at.elapsed() >= PROBE_INTERVAL);
        if !reachable || due {
            let outcome = shared.store.ping().await;
            shared.observe(&outcome);
            last_probe = Some(Instant::now());
        }
        refresh_gauges(&shared);
        if !shared.pause(TICK).await {
            return;
        }
    }
}

fn refresh_gauges(shared: &Shared) {
    metrics::gauge!("taskgate_tracking_journal_depth").set(shared.outbox.journal_depth() as f64);
    let age = shared
        .outbox
        .journal_oldest_accepted_at()
        .ok()
        .flatten()
        .map(|at| ((Utc::now() - at).num_milliseconds().max(0) as f64) / 1000.0)
        .unwrap_or(0.0);
    metrics::gauge!("taskgate_tracking_journal_oldest_age_seconds").set(age);
}

/// `taskgate migrate`: applies the migrations and returns (bounded).
pub async fn migrate(settings: &TrackingSettings) -> Result<(), StoreError> {
    let store = TrackingStore::connect_lazy(settings)?;
    let outcome = store.migrate().await;
    store.close().await;
    outcome
}
