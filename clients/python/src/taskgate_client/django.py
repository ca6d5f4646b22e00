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

The default client is built once per process from the settings and rebuilt
when they change (``override_settings`` in tests). ``async_available`` is
lazy: a page that never reads it never asks taskgate, and one that does
costs at most one short probe per TTL (see ``Client.is_async_available``).
"""

from __future__ import annotations

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


def async_available(request: Any) -> dict:
    """Context processor: ``async_available``, true while taskgate reports a
    live broker. Evaluated only when a template reads it."""
    return {"async_available": SimpleLazyObject(is_async_available)}
