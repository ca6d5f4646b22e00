"""Owns the stock Celery app that taskgate's interop tests run as a real worker.

Started by tests/support/celery.rs as
``python -m celery -A celery_app worker ...`` with cwd tests/support.
Every task appends one JSON line describing the call it received to the
file named by ``TASKGATE_TEST_RECORD``, so a Rust test can check what a real
Celery worker decoded from the messages taskgate published.

Configuration (environment):

* ``CELERY_BROKER_URL``: broker URL (``amqp://...`` or ``sqs://...``).
* ``CELERY_QUEUES``: comma list of queues to declare and consume; empty means
  Celery's default ``celery`` queue.
* ``CELERY_BINDINGS``: comma list of binding keys, one per queue (default: the
  queue name), on the topic exchange ``TASKGATE_TEST_EXCHANGE``
  (default ``task_exchange``), so the worker matches a gateway's topology.
* ``CELERY_QUEUE_TYPE``: optional ``quorum`` for quorum queues (AMQP).
* ``CELERY_BROKER_TRANSPORT_OPTIONS``: JSON object (SQS: region,
  queue_name_prefix, ...).
* ``CELERY_RESULT_BACKEND``: optional result backend URL.
* ``CELERY_RESULT_EXTENDED``: ``1`` to store name/args with results.
* ``TASKGATE_TEST_PARENT_PID``: exit when that process is gone (so a killed
  test run leaves no worker behind).
"""

import json
import os
import sys
import threading
import time

from celery import Celery
from kombu import Exchange, Queue


def _env_list(name):
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _build_queues():
    names = _env_list("CELERY_QUEUES")
    if not names:
        return None
    bindings = _env_list("CELERY_BINDINGS") or list(names)
    if len(bindings) != len(names):
        raise SystemExit(
            f"CELERY_BINDINGS has {len(bindings)} entries for {len(names)} CELERY_QUEUES"
        )
    exchange = Exchange(
        os.environ.get("TASKGATE_TEST_EXCHANGE") or "task_exchange",
        type="topic",
        durable=True,
    )
    queue_arguments = None
    if os.environ.get("CELERY_QUEUE_TYPE", "") == "quorum":
        queue_arguments = {"x-queue-type": "quorum"}
    return [
        Queue(name, exchange, routing_key=binding, durable=True, queue_arguments=queue_arguments)
        for name, binding in zip(names, bindings)
    ]


app = Celery("celery_app")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    broker_connection_retry_on_startup=True,
    broker_transport_options=json.loads(
        os.environ.get("CELERY_BROKER_TRANSPORT_OPTIONS") or "{}"
    ),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=True,
    enable_utc=True,
)
_queues = _build_queues()
if _queues:
    app.conf.task_queues = _queues
if os.environ.get("CELERY_RESULT_BACKEND"):
    app.conf.result_backend = os.environ["CELERY_RESULT_BACKEND"]
    app.conf.result_extended = os.environ.get("CELERY_RESULT_EXTENDED", "") == "1"


def _record(task):
    """Appends one JSON line for the call being executed, with the args and
    kwargs exactly as the message carried them; flushed and fsynced."""
    path = os.environ.get("TASKGATE_TEST_RECORD")
    if not path:
        return
    request = task.request
    line = {
        "task": task.name,
        "id": request.id,
        "args": list(request.args or []),
        "kwargs": dict(request.kwargs or {}),
        "delivery_info": dict(request.delivery_info or {}),
        "request": {
            "root_id": request.root_id,
            "parent_id": request.parent_id,
            "group": request.group,
            "group_index": getattr(request, "group_index", None),
            "retries": request.retries,
            "eta": request.eta,
            "expires": request.expires,
            "timelimit": request.timelimit,
            "correlation_id": request.correlation_id,
            "reply_to": request.reply_to,
            "origin": getattr(request, "origin", None),
            "shadow": getattr(request, "shadow", None),
            "ignore_result": getattr(request, "ignore_result", None),
            "hostname": request.hostname,
        },
    }
    text = json.dumps(line, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as record_file:
        record_file.write(text)
        record_file.flush()
        os.fsync(record_file.fileno())


@app.task(name="rawa.add", bind=True)
def add(self, x, y, scale=1):
    _record(self)
    return (x + y) * scale


@app.task(name="rawa.echo", bind=True)
def echo(self, text):
    _record(self)
    return text


@app.task(name="export.project", bind=True)
def export_project(self, org_slug, project_slug, output_type="xls"):
    _record(self)
    return {"org_slug": org_slug, "project_slug": project_slug, "output_type": output_type}


@app.task(name="rawa.tsum", bind=True)
def tsum(self, numbers):
    """A chord's body: the sum of its header's results."""
    _record(self)
    return sum(numbers)


@app.task(name="tests.record", bind=True)
def record(self, *args, **kwargs):
    _record(self)
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="tests.progress", bind=True)
def progress(self, steps, pause=0.8):
    """Reports PROGRESS with {"done": n, "total": steps} after each step, as
    a platform export would for its progress bar."""
    _record(self)
    for done in range(1, steps + 1):
        time.sleep(pause)
        self.update_state(state="PROGRESS", meta={"done": done, "total": steps})
    time.sleep(pause)
    return {"done": steps, "total": steps}


def _exit_with_parent(parent_pid):
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(1)


_parent_pid = os.environ.get("TASKGATE_TEST_PARENT_PID")
if _parent_pid and "worker" in sys.argv:
    threading.Thread(
        target=_exit_with_parent, args=(int(_parent_pid),), name="parent-watchdog", daemon=True
    ).start()
