-- taskgate's record of every task: accepted over HTTP (from the outbox
-- journal) or seen on the tracking queue (tasks workers scheduled). Modelled
-- on the platform's BackgroundTask. Rows are upserted by task_id.
-- JSON columns are TEXT; timestamps are RFC 3339 TEXT in UTC, which sorts
-- in time order.
CREATE TABLE background_tasks (
    -- Random public id (24 lowercase letters and digits), not the Celery task id.
    id                   TEXT NOT NULL PRIMARY KEY,
    task_id              TEXT NOT NULL UNIQUE,
    type                 TEXT NOT NULL,
    input                TEXT NOT NULL,
    options              TEXT NOT NULL,
    creator_id           TEXT,
    related_content_type TEXT,
    related_object_id    TEXT,
    parent_id            TEXT,
    root_id              TEXT,
    status               TEXT NOT NULL DEFAULT 'PENDING',
    created_date         TEXT NOT NULL,
    last_updated         TEXT NOT NULL
);

CREATE INDEX background_tasks_newest ON background_tasks (created_date DESC, task_id DESC);
CREATE INDEX background_tasks_type_newest ON background_tasks (type, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_creator_newest ON background_tasks (creator_id, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_related_newest ON background_tasks (related_object_id, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_status_newest ON background_tasks (status, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_parent ON background_tasks (parent_id);
CREATE INDEX background_tasks_root ON background_tasks (root_id);
