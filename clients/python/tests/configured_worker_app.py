"""A Celery app configured only through ``taskgate_client.worker.configure``:
no queue, exchange, route or result backend of its own. Started by
``test_worker.py`` as ``celery -A configured_worker_app worker`` (cwd this
directory); ``TASKGATE_TOPOLOGY`` names the topology (a URL or a file).
"""

import os

from celery import Celery

from taskgate_client.worker import configure

app = Celery("configured_worker_app")
app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=True,
    enable_utc=True,
)
configure(app, os.environ["TASKGATE_TOPOLOGY"])


@app.task(name="probe.add")
def add(x, y):
    return x + y


@app.task(name="probe.schedule")
def schedule(x):
    """Schedules a task from inside the worker, straight through the broker
    (as platform workers do): taskgate only learns of it from the tracking
    queue."""
    return add.delay(x, 1).id
