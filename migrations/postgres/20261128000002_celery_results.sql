-- Celery's database result backend tables, exactly as SQLAlchemy creates
-- them (celery/backends/database/models.py, extended columns included), so
-- that workers need no CREATE privilege: they only write results (see
-- docs/operations.md, "Database roles and grants"). IF NOT EXISTS: a
-- platform whose workers already created them keeps its tables.
CREATE SEQUENCE IF NOT EXISTS task_id_sequence;
CREATE TABLE IF NOT EXISTS celery_taskmeta (
    id        INTEGER      NOT NULL DEFAULT nextval('task_id_sequence') PRIMARY KEY,
    task_id   VARCHAR(155) UNIQUE,
    status    VARCHAR(50),
    result    BYTEA,
    date_done TIMESTAMP WITHOUT TIME ZONE,
    traceback TEXT,
    children  BYTEA,
    name      VARCHAR(155),
    args      BYTEA,
    kwargs    BYTEA,
    worker    VARCHAR(155),
    retries   INTEGER,
    queue     VARCHAR(155),
    stamps    BYTEA
);
CREATE INDEX IF NOT EXISTS ix_celery_taskmeta_date_done ON celery_taskmeta (date_done);

CREATE SEQUENCE IF NOT EXISTS taskset_id_sequence;
CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
    id         INTEGER      NOT NULL DEFAULT nextval('taskset_id_sequence') PRIMARY KEY,
    taskset_id VARCHAR(155) UNIQUE,
    result     BYTEA,
    date_done  TIMESTAMP WITHOUT TIME ZONE
);
CREATE INDEX IF NOT EXISTS ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done);

-- background_tasks.status follows the worker's result row. SECURITY DEFINER:
-- the workers' role may write celery_taskmeta without any privilege on
-- background_tasks; the function runs as its owner (the gateway's role),
-- with the search_path fixed at creation so callers cannot redirect it.
CREATE OR REPLACE FUNCTION taskgate_follow_celery_status() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE background_tasks
       SET status = NEW.status, last_updated = now()
     WHERE task_id = NEW.task_id
       AND NEW.status IS NOT NULL
       AND status IS DISTINCT FROM NEW.status;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION taskgate_follow_celery_status() FROM PUBLIC;

DROP TRIGGER IF EXISTS taskgate_follow_celery_status ON celery_taskmeta;
CREATE TRIGGER taskgate_follow_celery_status
    AFTER INSERT OR UPDATE OF status ON celery_taskmeta
    FOR EACH ROW EXECUTE FUNCTION taskgate_follow_celery_status();
