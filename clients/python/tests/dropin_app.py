"""A platform's Celery app as the platform writes it, plus the one line of
the drop-in (``taskgate_client.celery.install``). The tests import it as the
web process (broker URL at a closed port: it must never be needed) and run
it as the worker (``celery -A dropin_app worker``, configured from the
gateway's topology), where the drop-in steps aside and tasks scheduled from
tasks go through the worker's broker.

Environment: ``CELERY_BROKER_URL``, ``DROPIN_RESULT_BACKEND`` (shared by
both and by taskgate's tracking), ``TASKGATE_URL``, ``TASKGATE_TOPOLOGY``
(the worker only), ``DROPIN_RECORD`` (a JSON-lines file tasks append to).
"""

import json
import os

from celery import Celery

import taskgate_client.celery

app = Celery("dropin_app")
app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    broker_connection_retry_on_startup=True,
    result_backend=os.environ["DROPIN_RESULT_BACKEND"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=True,
    enable_utc=True,
)
if os.environ.get("TASKGATE_TOPOLOGY"):
    from taskgate_client.worker import configure

    configure(app, os.environ["TASKGATE_TOPOLOGY"], result_backend=os.environ["DROPIN_RESULT_BACKEND"])

taskgate_client.celery.install(app, url=os.environ["TASKGATE_URL"])  # the drop-in


def record(**fields):
    with open(os.environ["DROPIN_RECORD"], "a") as out:
        out.write(json.dumps(fields) + "\n")


@app.task(name="dropin.add")
def add(x, y):
    return x + y


@app.task(name="dropin.tsum")
def tsum(numbers):
    """A chord's body: the sum of its header's results."""
    return sum(numbers)


@app.task(name="dropin.fail")
def fail(x):
    raise ValueError(f"failed on purpose with {x}")


@app.task(name="dropin.errback")
def errback(task_id):
    record(errback_for=task_id)


@app.task(name="dropin.note", bind=True)
def note(self, label):
    """Records what the worker saw of the message's options."""
    seen = {
        "label": label,
        "id": self.request.id,
        "shadow": getattr(self.request, "shadow", None),
        "x_trace": getattr(self.request, "x_trace", None),
        "expires": self.request.expires,
        "retries": self.request.retries,
        "group": self.request.group,
        "group_index": self.request.group_index,
    }
    record(**seen)
    return seen


@app.task(name="dropin.schedule")
def schedule(x):
    """Schedules from inside the worker: through its broker, not taskgate
    (the worker's TASKGATE_URL points nowhere)."""
    return add.delay(x, 1).id
