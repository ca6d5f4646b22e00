//! The SQL side of tracking (sqlx), on SQLite or PostgreSQL: migrations,
//! batched idempotent upserts into `background_tasks`, lookups, the paged
//! list, and reading Celery's `celery_taskmeta`.
//!
//! Invariants:
//! - **Nothing connects at construction.** [`TrackingStore::connect_lazy`]
//!   builds a lazy pool; the first query connects, bounded by
//!   `tracking.connect_timeout_ms`.
//! - **Every call is bounded** by `tracking.query_timeout_ms` (a tokio
//!   timeout around the whole call, transaction included); a timed-out call
//!   is [`StoreError::Unavailable`].
//! - **Upserts are idempotent by `task_id`** and a batch is one
//!   transaction (multi-row statements of up to 200 rows): all rows or
//!   none. The public `id` is drawn once, at the first insert, and never
//!   changes. Rows are written in `task_id` order, so concurrent batches
//!   lock rows in the same order (no deadlocks), and a task id appearing
//!   twice in one batch is folded into one row first.
//! - **One bad row never blocks the rest**: when PostgreSQL or SQLite
//!   refuses a batch for its *data*, the rows are retried one transaction
//!   each and only the refused ones are skipped (logged and counted).
//!   Connection trouble is never mistaken for bad data: the caller retries.
//! - SQL is the same text on both databases wherever it can be (`$n`
//!   placeholders work in both; `ON CONFLICT ... DO UPDATE` too); the
//!   schemas differ only in column types (`migrations/sqlite`,
//!   `migrations/postgres`).

use super::record::{new_public_id, RecordSource, TaskRecord};
use super::result::StoredResult;
use crate::config::{mask_url_password, TrackingSettings};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64_URL;
use base64::Engine as _;
use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::Row;
use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

/// SQLite's page cache per tracking connection, in KiB.
const SQLITE_CACHE_KIB: u32 = 256;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Largest page `GET /v1/tasks` returns.
pub const MAX_PAGE: u32 = 500;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached, timed out, or failed in a way
    /// that retrying may fix.
    #[error("tracking database unavailable: {0}")]
    Unavailable(String),
    /// The database refused a row for its content.
    #[error("tracking database refused the data: {0}")]
    Rejected(String),
    #[error("tracking database settings: {0}")]
    Settings(String),
    #[error("tracking migrations failed: {0}")]
    Migration(String),
}

impl StoreError {
    fn from_sqlx(error: sqlx::Error) -> Self {
        if is_data_error(&error) {
            StoreError::Rejected(error.to_string())
        } else {
            StoreError::Unavailable(error.to_string())
        }
    }
}

/// Whether the database refused the statement for the data it carried
/// (so retrying the same row cannot help): PostgreSQL classes 22 (data
/// exception), 23 (integrity) and 54 (program limit exceeded: a value too
/// large for an index row), SQLite's constraint, too-big and mismatch
/// errors. Everything else (I/O, pool timeouts, a missing table during a
/// migration, lock timeouts) may pass on retry.
fn is_data_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(database) = error else {
        return false;
    };
    let Some(code) = database.code() else {
        return false;
    };
    if database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
        return code.starts_with("22") || code.starts_with("23") || code.starts_with("54");
    }
    // SQLite primary result codes (extended codes keep them in the low byte).
    code.parse::<i64>()
        .map(|code| matches!(code & 0xff, 18..=20))
        .unwrap_or(false)
}

enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same statement-building code against whichever pool is in use
/// (each arm is type-checked for its own database).
macro_rules! on_pool {
    ($backend:expr, $pool:ident => $body:expr) => {
        match $backend {
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// One tracked task as stored, for the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackedTask {
    /// The random public id.
    pub public_id: String,
    pub task_id: String,
    #[serde(rename = "type")]
    pub task_type: String,
    pub input: Value,
    pub options: Value,
    pub creator_id: Option<String>,
    pub related_content_type: Option<String>,
    pub related_object_id: Option<String>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub status: String,
    pub created_date: DateTime<Utc>,
    pub last_updated: DateTime<Utc>,
}

/// Filters of `GET /v1/tasks`; all given ones must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskFilter {
    pub task_type: Option<String>,
    pub creator_id: Option<String>,
    pub related_content_type: Option<String>,
    pub related_object_id: Option<String>,
    pub status: Option<String>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
}

/// Where a page starts: strictly older than this row (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub created_date: DateTime<Utc>,
    pub task_id: String,
}

impl ListCursor {
    /// Opaque to clients: base64url of `{created micros}:{task id}`.
    pub fn encode(&self) -> String {
        BASE64_URL.encode(format!("{}:{}", self.created_date.timestamp_micros(), self.task_id))
    }

    pub fn decode(text: &str) -> Option<Self> {
        let bytes = BASE64_URL.decode(text).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (micros, task_id) = text.split_once(':')?;
        let created_date = DateTime::<Utc>::from_timestamp_micros(micros.parse().ok()?)?;
        Some(Self {
            created_date,
            task_id: task_id.to_owned(),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskPage {
    pub tasks: Vec<TrackedTask>,
    /// Set when more rows may follow.
    pub next: Option<ListCursor>,
}

/// What an upsert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpsertOutcome {
    pub written: usize,
    /// Rows the database refused for their data, with the reason.
    pub rejected: Vec<(String, String)>,
}

pub struct TrackingStore {
    backend: Backend,
    timeout: Duration,
    endpoint: String,
}

const COLUMNS: &str = "id, task_id, type, input, options, creator_id, related_content_type, related_object_id, \
                       parent_id, root_id, status, created_date, last_updated";

/// Insert, or update what a later record may change. The status comes from
/// Celery's result row when the worker finished before we recorded the
/// task; afterwards a trigger keeps it current.
const UPSERT_INSERT: &str = "INSERT INTO background_tasks (id, task_id, type, input, options, creator_id, \
     related_content_type, related_object_id, parent_id, root_id, status, created_date, last_updated) VALUES ";
const UPSERT_CONFLICT: &str = " ON CONFLICT (task_id) DO UPDATE SET ";
/// Parameters per row of a multi-row upsert.
const UPSERT_PARAMETERS: usize = 12;
/// Rows per multi-row `INSERT` on PostgreSQL: 2,400 parameters, far below
/// its 65,535, and few round trips per batch.
const UPSERT_ROWS_PER_STATEMENT_POSTGRES: usize = 200;
/// Rows per multi-row `INSERT` on SQLite. Kept small because binding is
/// quadratic in the statement's parameter count there (sqlx looks each
/// parameter's name up with `sqlite3_bind_parameter_name`, a linear scan):
/// at 200 rows (2,400 parameters) binding alone took a fifth of taskgate's
/// CPU under load, and SQLite has no round trip to save.
const UPSERT_ROWS_PER_STATEMENT_SQLITE: usize = 16;

/// `($1, ..., $12), ($13, ...)` for `rows` rows.
fn upsert_values(rows: usize) -> String {
    (0..rows)
        .map(|row| {
            let p = |n: usize| format!("${}", row * UPSERT_PARAMETERS + n);
            format!(
                "({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, \
                 COALESCE((SELECT m.status FROM celery_taskmeta m WHERE m.task_id = {}), 'PENDING'), {}, {})",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
                p(6),
                p(7),
                p(8),
                p(9),
                p(10),
                p(2),
                p(11),
                p(12)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One record per task id, in `task_id` order: a statement may not touch a
/// row twice (PostgreSQL refuses), so duplicates within a batch are folded
/// the way consecutive upserts from `source` would have merged them.
fn fold_duplicates(records: &[TaskRecord], source: RecordSource) -> Vec<TaskRecord> {
    let mut folded: std::collections::BTreeMap<&str, TaskRecord> = std::collections::BTreeMap::new();
    for record in records {
        match folded.get_mut(record.task_id.as_str()) {
            None => {
                folded.insert(&record.task_id, record.clone());
            }
            Some(known) => {
                let newer = record.clone();
                let merged = match source {
                    RecordSource::Gateway => TaskRecord {
                        creator_id: newer.creator_id.or(known.creator_id.take()),
                        related_content_type: newer.related_content_type.or(known.related_content_type.take()),
                        related_object_id: newer.related_object_id.or(known.related_object_id.take()),
                        parent_id: newer.parent_id.or(known.parent_id.take()),
                        root_id: newer.root_id.or(known.root_id.take()),
                        created_date: newer.created_date.min(known.created_date),
                        ..newer
                    },
                    RecordSource::TrackingQueue => TaskRecord {
                        creator_id: known.creator_id.take().or(newer.creator_id),
                        related_content_type: known.related_content_type.take().or(newer.related_content_type),
                        related_object_id: known.related_object_id.take().or(newer.related_object_id),
                        parent_id: known.parent_id.take().or(newer.parent_id),
                        root_id: known.root_id.take().or(newer.root_id),
                        created_date: newer.created_date.min(known.created_date),
                        ..known.clone()
                    },
                };
                *known = merged;
            }
        }
    }
    folded.into_values().collect()
}

/// The gateway's record is authoritative for what it accepted.
const UPSERT_GATEWAY: &str = "type = excluded.type, input = excluded.input, options = excluded.options, \
     creator_id = COALESCE(excluded.creator_id, background_tasks.creator_id), \
     related_content_type = COALESCE(excluded.related_content_type, background_tasks.related_content_type), \
     related_object_id = COALESCE(excluded.related_object_id, background_tasks.related_object_id), \
     parent_id = COALESCE(excluded.parent_id, background_tasks.parent_id), \
     root_id = COALESCE(excluded.root_id, background_tasks.root_id), \
     created_date = CASE WHEN excluded.created_date < background_tasks.created_date \
         THEN excluded.created_date ELSE background_tasks.created_date END, \
     last_updated = excluded.last_updated";

/// A copy seen on the tracking queue only fills gaps.
const UPSERT_TRACKING_QUEUE: &str = "creator_id = COALESCE(background_tasks.creator_id, excluded.creator_id), \
     related_content_type = COALESCE(background_tasks.related_content_type, excluded.related_content_type), \
     related_object_id = COALESCE(background_tasks.related_object_id, excluded.related_object_id), \
     parent_id = COALESCE(background_tasks.parent_id, excluded.parent_id), \
     root_id = COALESCE(background_tasks.root_id, excluded.root_id), \
     created_date = CASE WHEN excluded.created_date < background_tasks.created_date \
         THEN excluded.created_date ELSE background_tasks.created_date END, \
     last_updated = excluded.last_updated";

macro_rules! tracked_from_row {
    ($row:expr) => {{
        let row = $row;
        let input: Json<Value> = row.try_get("input")?;
        let options: Json<Value> = row.try_get("options")?;
        Ok::<_, sqlx::Error>(TrackedTask {
            public_id: row.try_get("id")?,
            task_id: row.try_get("task_id")?,
            task_type: row.try_get("type")?,
            input: input.0,
            options: options.0,
            creator_id: row.try_get("creator_id")?,
            related_content_type: row.try_get("related_content_type")?,
            related_object_id: row.try_get("related_object_id")?,
            parent_id: row.try_get("parent_id")?,
            root_id: row.try_get("root_id")?,
            status: row.try_get("status")?,
            created_date: row.try_get("created_date")?,
            last_updated: row.try_get("last_updated")?,
        })
    }};
}

macro_rules! stored_result_from_row {
    ($row:expr) => {{
        let row = $row;
        let date_done: Option<NaiveDateTime> = row.try_get("date_done")?;
        Ok::<_, sqlx::Error>(StoredResult {
            status: row
                .try_get::<Option<String>, _>("status")?
                .unwrap_or_else(|| "PENDING".into()),
            result: row.try_get("result")?,
            date_done: date_done.map(|naive| naive.and_utc()),
            traceback: row.try_get("traceback")?,
        })
    }};
}

impl TrackingStore {
    /// Builds the pool without connecting. For SQLite, the database file
    /// (and its directory) is created at the first connection.
    pub fn connect_lazy(settings: &TrackingSettings) -> Result<Self, StoreError> {
        let acquire = Duration::from_millis(settings.connect_timeout_ms);
        let timeout = Duration::from_millis(settings.query_timeout_ms);
        let backend = if settings.is_postgres() {
            let mut options = PgConnectOptions::from_str(&settings.database_url)
                .map_err(|error| StoreError::Settings(format!("tracking.database_url: {error}")))?
                .application_name("taskgate");
            // libpq: "if a root CA file exists, sslmode=require behaves as
            // verify-ca". sqlx's `require` never verifies; a CA file given
            // for it is meant to be used.
            let mode = crate::config::postgres_url_parameter(&settings.database_url, "sslmode");
            if mode.as_deref() == Some("require")
                && crate::config::postgres_url_parameter(&settings.database_url, "sslrootcert").is_some()
            {
                options = options.ssl_mode(sqlx::postgres::PgSslMode::VerifyCa);
            }
            Backend::Postgres(
                PgPoolOptions::new()
                    .max_connections(settings.max_connections)
                    .acquire_timeout(acquire)
                    // A connection that died with the database is found out
                    // before use, not by the statement.
                    .test_before_acquire(true)
                    .idle_timeout(Duration::from_secs(300))
                    .connect_lazy_with(options),
            )
        } else {
            let options = SqliteConnectOptions::from_str(&settings.database_url)
                .map_err(|error| StoreError::Settings(format!("tracking.database_url: {error}")))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                // SQLite's default page cache is 2 MB per connection, and
                // a drain fills it on every connection the writer used:
                // taskgate's memory is bounded by its own settings, so
                // the page cache stays small (the OS caches the file).
                .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"))
                .busy_timeout(timeout)
                .thread_name(|id| format!("{SQLITE_THREAD_PREFIX}-{id}"));
            if let Some(directory) = options.get_filename().parent() {
                if !directory.as_os_str().is_empty() {
                    std::fs::create_dir_all(directory).map_err(|error| {
                        StoreError::Settings(format!(
                            "tracking.database_url: cannot create {}: {error}",
                            directory.display()
                        ))
                    })?;
                }
            }
            Backend::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(settings.max_connections)
                    .acquire_timeout(acquire)
                    // sqlx runs each SQLite connection on a thread of its
                    // own, started by the connect this follows.
                    .after_connect(|_, _| {
                        Box::pin(async {
                            lower_sqlite_thread_priority();
                            Ok(())
                        })
                    })
                    .connect_lazy_with(options),
            )
        };
        Ok(Self {
            backend,
            timeout,
            endpoint: mask_url_password(&settings.database_url),
        })
    }

    /// The database URL with any password masked.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    async fn bounded<T>(&self, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Applies pending migrations (idempotent; PostgreSQL serialises
    /// concurrent runs with an advisory lock). Bounded by a generous
    /// multiple of the query timeout: a migration may build indexes.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let run = async {
            match &self.backend {
                Backend::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await,
                Backend::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
            }
            .map_err(|error| match error {
                sqlx::migrate::MigrateError::Execute(inner) => StoreError::from_sqlx(inner),
                other => StoreError::Migration(other.to_string()),
            })
        };
        match tokio::time::timeout(self.timeout * 12, run).await {
            Ok(outcome) => outcome,
            Err(_) => Err(StoreError::Unavailable(format!(
                "migrations did not finish within {} ms",
                (self.timeout * 12).as_millis()
            ))),
        }
    }

    /// With `migrate_on_start` off: whether someone (`taskgate migrate`)
    /// applied every migration this build knows.
    pub async fn schema_present(&self) -> Result<(), StoreError> {
        let migrator = match &self.backend {
            Backend::Sqlite(_) => &SQLITE_MIGRATIONS,
            Backend::Postgres(_) => &POSTGRES_MIGRATIONS,
        };
        let needed = migrator.iter().map(|migration| migration.version).max().unwrap_or(0);
        let applied: Option<i64> = self
            .bounded(async {
                on_pool!(&self.backend, pool => {
                    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
                        .fetch_one(pool)
                        .await
                        .map_err(|error| match error {
                            // No migrations table: the database answered.
                            sqlx::Error::Database(_) => StoreError::Migration(format!(
                                "no taskgate migrations found ({error}): run `taskgate migrate`"
                            )),
                            other => StoreError::from_sqlx(other),
                        })
                })
            })
            .await?;
        match applied {
            Some(version) if version >= needed => Ok(()),
            other => Err(StoreError::Migration(format!(
                "the tracking schema is at version {}, this taskgate needs {needed}: run `taskgate migrate`",
                other.map_or_else(|| "none".to_owned(), |v| v.to_string())
            ))),
        }
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            on_pool!(&self.backend, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
                .map_err(StoreError::from_sqlx)
        })
        .await
    }

    /// Upserts `records` in one transaction. When the database refuses the
    /// batch for its data, falls back to one transaction per row and skips
    /// only the refused rows (reported in the outcome).
    pub async fn upsert(&self, records: &[TaskRecord], source: RecordSource) -> Result<UpsertOutcome, StoreError> {
        if records.is_empty() {
            return Ok(UpsertOutcome::default());
        }
        let folded = fold_duplicates(records, source);
        let ordered: Vec<&TaskRecord> = folded.iter().collect();
        match self.bounded(self.upsert_transaction(&ordered, source)).await {
            Ok(()) => Ok(UpsertOutcome {
                written: ordered.len(),
                rejected: Vec::new(),
            }),
            Err(StoreError::Rejected(batch_error)) => {
                tracing::warn!(error = %batch_error, rows = ordered.len(), "tracking batch refused; writing its rows one by one");
                let mut outcome = UpsertOutcome::default();
                for record in ordered {
                    match self.bounded(self.upsert_transaction(&[record], source)).await {
                        Ok(()) => outcome.written += 1,
                        Err(StoreError::Rejected(reason)) => {
                            tracing::error!(task_id = %record.task_id, %reason, "tracking row refused by the database; skipped");
                            metrics::counter!("taskgate_tracking_rows_rejected_total").increment(1);
                            outcome.rejected.push((record.task_id.clone(), reason));
                        }
                        Err(other) => return Err(other),
                    }
                }
                Ok(outcome)
            }
            Err(other) => Err(other),
        }
    }

    async fn upsert_transaction(&self, records: &[&TaskRecord], source: RecordSource) -> Result<(), StoreError> {
        let update = match source {
            RecordSource::Gateway => UPSERT_GATEWAY,
            RecordSource::TrackingQueue => UPSERT_TRACKING_QUEUE,
        };
        // Microseconds: what both databases keep.
        let now = Utc::now().trunc_subsecs(6);
        let rows_per_statement = match self.backend {
            Backend::Sqlite(_) => UPSERT_ROWS_PER_STATEMENT_SQLITE,
            Backend::Postgres(_) => UPSERT_ROWS_PER_STATEMENT_POSTGRES,
        };
        on_pool!(&self.backend, pool => {
            let mut transaction = pool.begin().await.map_err(StoreError::from_sqlx)?;
            for chunk in records.chunks(rows_per_statement) {
                let sql = format!("{UPSERT_INSERT}{}{UPSERT_CONFLICT}{update}", upsert_values(chunk.len()));
                let mut query = sqlx::query(&sql);
                for record in chunk {
                    query = query
                        .bind(new_public_id())
                        .bind(&record.task_id)
                        .bind(&record.task_type)
                        .bind(Json(&record.input))
                        .bind(Json(&record.options))
                        .bind(&record.creator_id)
                        .bind(&record.related_content_type)
                        .bind(&record.related_object_id)
                        .bind(&record.parent_id)
                        .bind(&record.root_id)
                        .bind(record.created_date)
                        .bind(now);
                }
                query.execute(&mut *transaction).await.map_err(StoreError::from_sqlx)?;
            }
            transaction.commit().await.map_err(StoreError::from_sqlx)
        })
    }

    /// The row whose `task_id` (or, failing that, public id) is `key`.
    pub async fn find(&self, key: &str) -> Result<Option<TrackedTask>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM background_tasks WHERE task_id = $1 OR id = $1 \
             ORDER BY CASE WHEN task_id = $1 THEN 0 ELSE 1 END LIMIT 1"
        );
        self.bounded(async {
            on_pool!(&self.backend, pool => {
                let row = sqlx::query(&sql).bind(key).fetch_optional(pool).await.map_err(StoreError::from_sqlx)?;
                row.map(|row| tracked_from_row!(&row)).transpose().map_err(StoreError::from_sqlx)
            })
        })
        .await
    }

    /// Celery's result row for `task_id`, if a worker wrote one.
    pub async fn result(&self, task_id: &str) -> Result<Option<StoredResult>, StoreError> {
        self.bounded(async {
            match &self.backend {
                // `date_done` is a naive UTC time (Celery writes UTC); the
                // cast also reads a table someone made `timestamptz`
                // (sqlx sessions run in UTC).
                Backend::Postgres(pool) => {
                    let row = sqlx::query(
                        "SELECT status, result, CAST(date_done AS TIMESTAMP) AS date_done, traceback \
                         FROM celery_taskmeta WHERE task_id = $1",
                    )
                    .bind(task_id)
                    .fetch_optional(pool)
                    .await
                    .map_err(StoreError::from_sqlx)?;
                    row.map(|row| stored_result_from_row!(&row))
                        .transpose()
                        .map_err(StoreError::from_sqlx)
                }
                Backend::Sqlite(pool) => {
                    let row = sqlx::query(
                        "SELECT status, result, date_done, traceback FROM celery_taskmeta WHERE task_id = $1",
                    )
                    .bind(task_id)
                    .fetch_optional(pool)
                    .await
                    .map_err(StoreError::from_sqlx)?;
                    row.map(|row| stored_result_from_row!(&row))
                        .transpose()
                        .map_err(StoreError::from_sqlx)
                }
            }
        })
        .await
    }

    /// Celery's result rows for `task_ids`, by task id, in one query (the
    /// progress watcher asks for every followed task at once). Ids without
    /// a row are absent.
    pub async fn results(&self, task_ids: &[String]) -> Result<HashMap<String, StoredResult>, StoreError> {
        if task_ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.bounded(async {
            let rows = match &self.backend {
                Backend::Postgres(pool) => {
                    let rows = sqlx::query(
                        "SELECT task_id, status, result, CAST(date_done AS TIMESTAMP) AS date_done, traceback \
                         FROM celery_taskmeta WHERE task_id = ANY($1)",
                    )
                    .bind(task_ids)
                    .fetch_all(pool)
                    .await
                    .map_err(StoreError::from_sqlx)?;
                    rows.iter()
                        .map(|row| {
                            let id: String = row.try_get("task_id")?;
                            Ok::<_, sqlx::Error>((id, stored_result_from_row!(row)?))
                        })
                        .collect::<Result<HashMap<_, _>, _>>()
                }
                Backend::Sqlite(pool) => {
                    let placeholders = vec!["?"; task_ids.len()].join(", ");
                    let sql = format!(
                        "SELECT task_id, status, result, date_done, traceback FROM celery_taskmeta \
                         WHERE task_id IN ({placeholders})"
                    );
                    let mut query = sqlx::query(&sql);
                    for id in task_ids {
                        query = query.bind(id);
                    }
                    let rows = query.fetch_all(pool).await.map_err(StoreError::from_sqlx)?;
                    rows.iter()
                        .map(|row| {
                            let id: String = row.try_get("task_id")?;
                            Ok::<_, sqlx::Error>((id, stored_result_from_row!(row)?))
                        })
                        .collect::<Result<HashMap<_, _>, _>>()
                }
            };
            rows.map_err(StoreError::from_sqlx)
        })
        .await
    }

    /// A page of tasks, newest first (`created_date`, then `task_id`, both
    /// descending), after `cursor` when given.
    pub async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&ListCursor>,
        limit: u32,
    ) -> Result<TaskPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut conditions: Vec<String> = Vec::new();
        let mut texts: Vec<&str> = Vec::new();
        for (column, value) in [
            ("type", &filter.task_type),
            ("creator_id", &filter.creator_id),
            ("related_content_type", &filter.related_content_type),
            ("related_object_id", &filter.related_object_id),
            ("status", &filter.status),
            ("parent_id", &filter.parent_id),
            ("root_id", &filter.root_id),
        ] {
            if let Some(value) = value {
                texts.push(value);
                conditions.push(format!("{column} = ${}", texts.len()));
            }
        }
        if cursor.is_some() {
            let at = texts.len() + 1;
            conditions.push(format!(
                "(created_date < ${at} OR (created_date = ${at} AND task_id < ${}))",
                at + 1
            ));
        }
        let filter_sql = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        // One more than asked: whether another page exists.
        let sql = format!(
            "SELECT {COLUMNS} FROM background_tasks {filter_sql} \
             ORDER BY created_date DESC, task_id DESC LIMIT {}",
            limit + 1
        );
        let mut tasks = self
            .bounded(async {
                on_pool!(&self.backend, pool => {
                    let mut query = sqlx::query(&sql);
                    for text in &texts {
                        query = query.bind(*text);
                    }
                    if let Some(cursor) = cursor {
                        query = query.bind(cursor.created_date).bind(cursor.task_id.as_str());
                    }
                    let rows = query.fetch_all(pool).await.map_err(StoreError::from_sqlx)?;
                    rows.iter()
                        .map(|row| tracked_from_row!(row))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(StoreError::from_sqlx)
                })
            })
            .await?;
        let next = if tasks.len() > limit as usize {
            tasks.truncate(limit as usize);
            tasks.last().map(|last| ListCursor {
                created_date: last.created_date,
                task_id: last.task_id.clone(),
            })
        } else {
            None
        };
        Ok(TaskPage { tasks, next })
    }

    /// Closes the pool (bounded: waits for connections to be returned).
    pub async fn close(&self) {
        let close = async { on_pool!(&self.backend, pool => pool.close().await) };
        if tokio::time::timeout(self.timeout, close).await.is_err() {
            tracing::warn!("tracking database connections still busy at shutdown; dropping them");
        }
    }
}

/// Name prefix of the threads sqlx runs SQLite connections on (Linux keeps
/// the first 15 bytes of a thread name, which this fits in).
const SQLITE_THREAD_PREFIX: &str = "tracking-sqlite";
/// Nice value of those threads. With SQLite the tracking database is
/// written inside taskgate's own process, and its upserts (the platform's
/// schema has nine indexes) cost about a fifth of taskgate's CPU under
/// load. Rows may lag; accepting and publishing must not: while the cores
/// are busy these threads get about a tenth of a normal thread's share,
/// the journal absorbs the difference (it is durable, and its age is a
/// health warning), and they catch up at full speed once the load drops.
const SQLITE_THREAD_NICENESS: i32 = 10;

/// Lowers the scheduling priority of every SQLite connection thread. A
/// thread already lowered is set to the same value again. Failure only
/// costs speed, so it is logged, never returned.
fn lower_sqlite_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        let Ok(threads) = std::fs::read_dir("/proc/self/task") else {
            return;
        };
        for thread in threads.flatten() {
            let is_sqlite = std::fs::read_to_string(thread.path().join("comm"))
                .is_ok_and(|name| name.trim_end().starts_with(SQLITE_THREAD_PREFIX));
            let thread_id = thread.file_name().to_str().and_then(|id| id.parse::<i32>().ok());
            let Some(thread_id) = thread_id.filter(|_| is_sqlite) else {
                continue;
            };
            // On Linux, PRIO_PROCESS with a thread id applies to that thread.
            let pid = rustix::process::Pid::from_raw(thread_id);
            if let Err(error) = rustix::process::setpriority_process(pid, SQLITE_THREAD_NICENESS) {
                tracing::debug!(thread_id, %error, "cannot lower the priority of a tracking SQLite thread");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn sqlite_store(dir: &std::path::Path) -> TrackingStore {
        let settings = TrackingSettings {
            database_url: format!("sqlite://{}", dir.join("nested/tracking.db").display()),
            ..TrackingSettings::default()
        };
        let store = TrackingStore::connect_lazy(&settings).unwrap();
        store.migrate().await.unwrap();
        store.schema_present().await.unwrap();
        store
    }

    fn record(task_id: &str, creator: Option<&str>, micros: i64) -> TaskRecord {
        TaskRecord {
            task_id: task_id.into(),
            task_type: "export.project".into(),
            input: json!({"args": [1], "kwargs": {}}),
            options: json!({"routing_key": "export"}),
            creator_id: creator.map(str::to_owned),
            related_content_type: None,
            related_object_id: Some("p1".into()),
            parent_id: None,
            root_id: Some(task_id.into()),
            created_date: DateTime::<Utc>::from_timestamp_micros(micros).unwrap(),
        }
    }

    /// The nice value of each thread of this process whose name starts
    /// with `prefix` (field 19 of `/proc/self/task/{id}/stat`).
    #[cfg(target_os = "linux")]
    fn niceness_of_threads(prefix: &str) -> Vec<i32> {
        let mut values = Vec::new();
        for thread in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let name = std::fs::read_to_string(thread.path().join("comm")).unwrap_or_default();
            if !name.starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(thread.path().join("stat")).unwrap();
            // The name (field 2) may hold spaces; count from after its `)`.
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            values.push(after_name.split(' ').nth(16).unwrap().parse().unwrap());
        }
        values
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sqlite_runs_below_the_priority_of_accepting_and_publishing() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        store
            .upsert(&[record("t1", None, 1_000_000)], RecordSource::Gateway)
            .await
            .unwrap();
        // Other tests in this process open SQLite stores too, and a thread
        // of theirs is lowered by its own connect a moment after it starts:
        // look again a few times before calling a thread not lowered.
        let mut niceness = Vec::new();
        for _ in 0..20 {
            niceness = niceness_of_threads(SQLITE_THREAD_PREFIX);
            if niceness.iter().all(|value| *value >= SQLITE_THREAD_NICENESS) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!niceness.is_empty(), "no SQLite connection thread found");
        let this_thread = niceness_of_threads("tracking::store");
        assert!(!this_thread.is_empty());
        for value in &niceness {
            assert!(*value >= SQLITE_THREAD_NICENESS, "{niceness:?}");
            assert!(
                this_thread.iter().all(|own| own < value),
                "only SQLite threads are lowered: {this_thread:?}"
            );
        }
    }

    #[tokio::test]
    async fn upserts_are_idempotent_and_sources_merge() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        // Seen on the tracking queue first (later time, no creator).
        let mut seen = record("t1", None, 2_000_000);
        seen.options = json!({"routing_key": "export", "retries": 0, "origin": "w@h"});
        store
            .upsert(&[seen.clone()], RecordSource::TrackingQueue)
            .await
            .unwrap();
        let first = store.find("t1").await.unwrap().unwrap();
        // Then the gateway's record: authoritative options, earlier time, creator.
        store
            .upsert(&[record("t1", Some("u1"), 1_000_000)], RecordSource::Gateway)
            .await
            .unwrap();
        // And the queue copy again (a redelivery): changes nothing it knows.
        store.upsert(&[seen], RecordSource::TrackingQueue).await.unwrap();
        let row = store.find("t1").await.unwrap().unwrap();
        assert_eq!(row.public_id, first.public_id, "the public id never changes");
        assert_eq!(row.creator_id.as_deref(), Some("u1"));
        assert_eq!(row.options, json!({"routing_key": "export"}));
        assert_eq!(row.created_date.timestamp_micros(), 1_000_000);
        assert_eq!(row.status, "PENDING");
        // Found by public id too.
        assert_eq!(store.find(&row.public_id).await.unwrap().unwrap().task_id, "t1");
        assert_eq!(store.find("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn large_batches_with_repeated_task_ids_are_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let mut records: Vec<TaskRecord> = (0..450).map(|n| record(&format!("big{n:03}"), None, n)).collect();
        // A retried task seen twice in one batch: folded, newest data kept.
        records.push(record("big007", Some("later"), 10_000));
        let outcome = store.upsert(&records, RecordSource::TrackingQueue).await.unwrap();
        assert_eq!(outcome.written, 450);
        let page = store.list(&TaskFilter::default(), None, MAX_PAGE).await.unwrap();
        assert_eq!(page.tasks.len(), 450);
        let repeated = store.find("big007").await.unwrap().unwrap();
        assert_eq!(
            repeated.creator_id.as_deref(),
            Some("later"),
            "gap filled by the later copy"
        );
        assert_eq!(repeated.created_date.timestamp_micros(), 7, "earliest sighting kept");
    }

    /// SQLite's page cache per connection is capped (its default, 2 MB a
    /// connection, showed in the drain's peak RSS).
    #[tokio::test]
    async fn sqlite_connections_keep_a_small_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let Backend::Sqlite(pool) = &store.backend else {
            unreachable!()
        };
        let cache_size: i64 = sqlx::query_scalar("PRAGMA cache_size").fetch_one(pool).await.unwrap();
        assert_eq!(cache_size, -i64::from(SQLITE_CACHE_KIB));
    }

    #[tokio::test]
    async fn results_follow_celery_rows_and_decode() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        let Backend::Sqlite(pool) = &store.backend else {
            unreachable!()
        };
        // A result written before the task was recorded...
        sqlx::query(
            "INSERT INTO celery_taskmeta (task_id, status, result, date_done, traceback) \
             VALUES ('early', 'SUCCESS', x'80054b322e', '2026-11-28 08:00:01.250000', NULL)",
        )
        .execute(pool)
        .await
        .unwrap();
        store
            .upsert(
                &[record("early", None, 1), record("late", None, 2)],
                RecordSource::Gateway,
            )
            .await
            .unwrap();
        assert_eq!(store.find("early").await.unwrap().unwrap().status, "SUCCESS");
        // ...and one written after: the trigger follows it.
        sqlx::query("INSERT INTO celery_taskmeta (task_id, status, result) VALUES ('late', 'STARTED', NULL)")
            .execute(pool)
            .await
            .unwrap();
        assert_eq!(store.find("late").await.unwrap().unwrap().status, "STARTED");
        sqlx::query(
            "UPDATE celery_taskmeta SET status = 'FAILURE', \
             result = CAST('{\"exc_type\": \"KeyError\", \"exc_message\": [\"k\"], \"exc_module\": \"builtins\"}' AS BLOB) \
             WHERE task_id = 'late'",
        )
        .execute(pool)
        .await
        .unwrap();
        assert_eq!(store.find("late").await.unwrap().unwrap().status, "FAILURE");
        let early = store.result("early").await.unwrap().unwrap().into_task_result();
        assert_eq!(early.result, json!(50));
        assert_eq!(
            early
                .date_done
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "2026-11-28T08:00:01.250Z"
        );
        let late = store.result("late").await.unwrap().unwrap().into_task_result();
        assert_eq!(late.exception.unwrap().exception_type, "KeyError");
        assert_eq!(store.result("none").await.unwrap(), None);
    }

    #[tokio::test]
    async fn list_pages_newest_first_with_ties_broken_by_task_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path()).await;
        // Same timestamp for three rows: the cursor must still not skip any.
        let records: Vec<TaskRecord> = (0..7)
            .map(|n| {
                record(
                    &format!("t{n}"),
                    Some(if n % 2 == 0 { "even" } else { "odd" }),
                    1_000 + n.min(3),
                )
            })
            .collect();
        store.upsert(&records, RecordSource::Gateway).await.unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.list(&TaskFilter::default(), cursor.as_ref(), 2).await.unwrap();
            assert!(page.tasks.len() <= 2);
            seen.extend(page.tasks.iter().map(|task| task.task_id.clone()));
            match page.next {
                Some(next) => cursor = Some(ListCursor::decode(&next.encode()).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen, ["t6", "t5", "t4", "t3", "t2", "t1", "t0"]);
        let filter = TaskFilter {
            creator_id: Some("odd".into()),
            related_object_id: Some("p1".into()),
            ..TaskFilter::default()
        };
        let odd = store.list(&filter, None, 10).await.unwrap();
        let odd: Vec<&str> = odd.tasks.iter().map(|task| task.task_id.as_str()).collect();
        assert_eq!(odd, ["t5", "t3", "t1"]);
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let cursor = ListCursor {
            created_date: DateTime::<Utc>::from_timestamp_micros(1_764_316_800_123_456).unwrap(),
            task_id: "a:b-c".into(),
        };
        assert_eq!(ListCursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(ListCursor::decode("not base64 !"), None);
        assert_eq!(ListCursor::decode(&BASE64_URL.encode("12x:id")), None);
    }
}
