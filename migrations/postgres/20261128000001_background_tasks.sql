-- taskgate's record of every task: accepted over HTTP (from the outbox
-- journal) or seen on the tracking queue (tasks workers scheduled). Modelled
-- on the platform's BackgroundTask. Rows are upserted by task_id.
--
-- Text columns carry no length limits on purpose: a batch upsert must not
-- fail because another producer chose a long id or name.
CREATE TABLE background_tasks (
    -- Random public id (24 lowercase letters and digits), not the Celery
    -- task id: safe to show in URLs without leaking internal ids.
    id                   TEXT        PRIMARY KEY,
    task_id              TEXT        NOT NULL UNIQUE,
    -- The Celery task name.
    type                 TEXT        NOT NULL,
    -- {"args": [...], "kwargs": {...}}
    input                JSONB       NOT NULL,
    -- eta, expires, retries, time_limit, soft_time_limit, routing_key, ...
    options              JSONB       NOT NULL,
    creator_id           TEXT,
    related_content_type TEXT,
    related_object_id    TEXT,
    parent_id            TEXT,
    root_id              TEXT,
    -- The Celery state; kept current from celery_taskmeta by a trigger.
    status               TEXT        NOT NULL DEFAULT 'PENDING',
    created_date         TIMESTAMPTZ NOT NULL,
    last_updated         TIMESTAMPTZ NOT NULL
);

-- GET /v1/tasks: newest first, keyset-paged on (created_date, task_id),
-- optionally filtered by one of these columns.
CREATE INDEX background_tasks_newest ON background_tasks (created_date DESC, task_id DESC);
CREATE INDEX background_tasks_type_newest ON background_tasks (type, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_creator_newest ON background_tasks (creator_id, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_related_newest ON background_tasks (related_object_id, created_date DESC, task_id DESC);
CREATE INDEX background_tasks_status_newest ON background_tasks (status, created_date DESC, task_id DESC);
-- Task trees: children of a task, every task of a workflow.
CREATE INDEX background_tasks_parent ON background_tasks (parent_id);
CREATE INDEX background_tasks_root ON background_tasks (root_id);
