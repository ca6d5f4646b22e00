-- Celery's database result backend tables as SQLAlchemy creates them on
-- SQLite (sqlite_autoincrement), so workers using `db+sqlite:///...` on the
-- same file find them, and reads never fail for a missing table.
CREATE TABLE IF NOT EXISTS celery_taskmeta (
    id        INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    task_id   VARCHAR(155) UNIQUE,
    status    VARCHAR(50),
    result    BLOB,
    date_done DATETIME,
    traceback TEXT,
    children  BLOB,
    name      VARCHAR(155),
    args      BLOB,
    kwargs    BLOB,
    worker    VARCHAR(155),
    retries   INTEGER,
    queue     VARCHAR(155),
    stamps    BLOB
);
CREATE INDEX IF NOT EXISTS ix_celery_taskmeta_date_done ON celery_taskmeta (date_done);

CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    taskset_id VARCHAR(155) UNIQUE,
    result     BLOB,
    date_done  DATETIME
);
CREATE INDEX IF NOT EXISTS ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done);

-- background_tasks.status follows the worker's result row.
CREATE TRIGGER IF NOT EXISTS taskgate_follow_celery_status_insert
AFTER INSERT ON celery_taskmeta
WHEN NEW.status IS NOT NULL
BEGIN
    UPDATE background_tasks
       SET status = NEW.status, last_updated = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')
     WHERE task_id = NEW.task_id AND status IS NOT NEW.status;
END;

CREATE TRIGGER IF NOT EXISTS taskgate_follow_celery_status_update
AFTER UPDATE OF status ON celery_taskmeta
WHEN NEW.status IS NOT NULL
BEGIN
    UPDATE background_tasks
       SET status = NEW.status, last_updated = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')
     WHERE task_id = NEW.task_id AND status IS NOT NEW.status;
END;
