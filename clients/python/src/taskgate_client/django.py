"""Django integration: a default client from settings, and a context
processor that tells templates whether asynchronous work is available.

settings.py::

    TASKGATE_URL = "http://127.0.0.1:7439"     # the default
    TASKGATE_TIMEOUT = 5.0                     # seconds per call
    TASKGATE_AVAILABILITY_TTL = 5.0            # seconds an availability answer is reused
    TASKGATE_AVAILABILITY_TIMEOUT = 1.0        # seconds the availability probe may take
    TASKGATE_TOKEN = None                      # taskgate's http.submit_token, when it has one

    TEMPLATES = [{
        ...,
        "OPTIONS": {"context_processors": [
            ...,
            "taskgate_client.django.async_available",
        ]},
    }]

A template greys out a button with one ``{% if %}``::

    <button {% if not async_available %}disabled title="Exports are paused"{% endif %}>Export</button>

and views enqueue through the default client::

    from taskgate_client.django import send_task
    send_task("export.project", args=[org.slug, project.slug], creator_id=str(request.user.pk))

A task's progress (a worker's ``update_state(state="PROGRESS", meta={"done":
n, "total": m})``) is drawn by the ``taskgate_progress`` tag over the
:func:`task_events` view, which relays taskgate's event stream::

    {% load taskgate %}
    {% url "task-events" task_id as events_url %}
    {% taskgate_progress events_url %}

(``taskgate_client`` in ``INSTALLED_APPS`` for the tag library.)

The default client is built once per process from the settings and rebuilt
when they change (``override_settings`` in tests). ``async_available`` is
lazy: a page that never reads it never asks taskgate, and one that does
costs at most one short probe per TTL (see ``Client.is_async_available``).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Optional

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.functional import SimpleLazyObject

from .client import DEFAULT_URL, Client

_SETTINGS = (
    "TASKGATE_URL",
    "TASKGATE_TIMEOUT",
    "TASKGATE_AVAILABILITY_TTL",
    "TASKGATE_AVAILABILITY_TIMEOUT",
    "TASKGATE_TOKEN",
)

_lock = threading.Lock()
_client: Optional[Client] = None


def get_client() -> Client:
    """The process's client, built from the ``TASKGATE_*`` settings."""
    global _client
    with _lock:
        if _client is None:
            _client = Client(
                getattr(settings, "TASKGATE_URL", DEFAULT_URL),
                timeout=float(getattr(settings, "TASKGATE_TIMEOUT", 5.0)),
                availability_ttl=float(getattr(settings, "TASKGATE_AVAILABILITY_TTL", 5.0)),
                availability_timeout=float(getattr(settings, "TASKGATE_AVAILABILITY_TIMEOUT", 1.0)),
                token=getattr(settings, "TASKGATE_TOKEN", None) or None,
            )
        return _client


def _reset_client(*, setting: str, **_: Any) -> None:
    global _client
    if setting in _SETTINGS:
        with _lock:
            _client = None


setting_changed.connect(_reset_client, dispatch_uid="taskgate_client.django.reset_client")


def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> str:
    """``get_client().send_task(...)``: returns the task id."""
    return get_client().send_task(name, args, kwargs, **options)


def is_async_available() -> bool:
    """``get_client().is_async_available()``: never raises."""
    return get_client().is_async_available()


def task_events(request: Any, task_id: str):
    """A view that relays ``GET /v1/tasks/{id}/events`` to the browser (which
    cannot reach taskgate, a local sidecar): route it, then draw the bar with
    ``{% load taskgate %}{% taskgate_progress url %}``::

        path("tasks/<str:task_id>/events", taskgate_client.django.task_events)

    Check in your own view wrapper that the user may see the task.
    """
    from django.http import StreamingHttpResponse

    from .errors import TaskgateError

    def relay():
        try:
            for state in get_client().task_events(task_id, timeout=30):
                yield f"event: state\ndata: {json.dumps(state)}\n\n"
        except TaskgateError as error:
            yield f"event: unavailable\ndata: {json.dumps({'detail': str(error)})}\n\n"

    response = StreamingHttpResponse(relay(), content_type="text/event-stream")
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"
    return response


def async_available(request: Any) -> dict:
    """Context processor: ``async_available``, true while taskgate reports a
    live broker. Evaluated only when a template reads it."""
    return {"async_available": SimpleLazyObject(is_async_available)}
