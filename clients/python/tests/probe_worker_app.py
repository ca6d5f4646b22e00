"""A Celery app wired by hand, for ``test_verify_workers.py``: the probe
registered with ``register_probe`` and one thing wrong, chosen by
``PROBE_WORKER_FAULT``:

* ``no_result_backend``: configured from the topology, then its result
  backend removed;
* ``default_exchange``: Celery's defaults (``-Q`` declares the queue on a
  direct exchange of its own name, tasks it schedules go to the default
  exchange), with the right result backend (``TASKGATE_RESULT_BACKEND``).
"""

import os

from celery import Celery

from taskgate_client.worker import configure, register_probe

app = Celery("probe_worker_app")
app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    enable_utc=True,
)
fault = os.environ["PROBE_WORKER_FAULT"]
if fault == "no_result_backend":
    configure(app, os.environ["TASKGATE_TOPOLOGY"])
    app.conf.result_backend = None
elif fault == "default_exchange":
    app.conf.result_backend = os.environ["TASKGATE_RESULT_BACKEND"]
    # A queue of the test's own instead of the shared broker's "celery".
    app.conf.task_default_queue = os.environ["PROBE_WORKER_DEFAULT_QUEUE"]
    register_probe(app)
else:
    raise SystemExit(f"unknown PROBE_WORKER_FAULT {fault!r}")
