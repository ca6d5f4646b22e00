"""The taskgate HTTP client: enqueue tasks, read their state, ask for health.

Mirrors Celery's ``app.send_task`` so that the platform can swap it in:
``send_task(name, args, kwargs, **options)`` returns the task id, and extra
keyword options become message properties, as Celery's do.

Invariants:

* Every call is bounded by ``timeout``; nothing retries behind the caller's
  back (a retried POST could enqueue twice; pass ``idempotency_key`` and
  retry yourself).
* :meth:`Client.is_async_available` never raises and never waits longer
  than ``availability_timeout``; its answer is cached for
  ``availability_ttl`` seconds, failures included, so a page rendered while
  taskgate is down costs at most one short probe per TTL, not one per view.
* Proxies from the environment (``HTTP_PROXY``) are ignored: taskgate is a
  local sidecar, and routing it through a proxy would only add a way to fail.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

from .errors import GatewayUnavailable, TaskgateError, TaskRejected

DEFAULT_URL = "http://127.0.0.1:7439"

# Request fields taskgate takes besides task, args and kwargs.
_REQUEST_FIELDS = frozenset(
    {
        "id",
        "routing_key",
        "eta",
        "expires",
        "countdown",
        "priority",
        "parent_id",
        "root_id",
        "group",
        "time_limit",
        "soft_time_limit",
        "properties",
    }
)
# Celery's spelling of the same options.
_CELERY_ALIASES = {"task_id": "id", "group_id": "group"}
# Celery options that taskgate decides itself (routing, encoding) or that
# need a result backend connection in the caller; accepting them silently
# would send the task somewhere else than the caller meant.
_UNSUPPORTED = frozenset(
    {
        "queue",
        "exchange",
        "exchange_type",
        "serializer",
        "compression",
        "connection",
        "producer",
        "link",
        "link_error",
        "chain",
        "chord",
        "retry",
        "retry_policy",
        "result_cls",
        "add_to_parent",
    }
)

_PROBLEM_JSON = "application/problem+json"
_HEALTH_JSON = "application/health+json"


def _json_default(value: Any) -> Any:
    """What kombu's JSON encoder does for the types Celery callers pass."""
    if isinstance(value, _dt.datetime):
        return _rfc3339(value)
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def _rfc3339(value: _dt.datetime) -> str:
    # Naive datetimes are UTC, as Celery takes them with enable_utc (its
    # default); taskgate requires an explicit offset.
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.isoformat()


def _time_field(name: str, value: Any) -> Any:
    if isinstance(value, _dt.datetime):
        return _rfc3339(value)
    if name == "expires" and isinstance(value, (int, float)) and not isinstance(value, bool):
        # Celery reads a number of seconds from now.
        return _rfc3339(_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=value))
    return value


def build_request(
    name: str,
    args: Optional[Sequence[Any]] = None,
    kwargs: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> dict:
    """The JSON body of ``POST /v1/tasks`` for a Celery-style call.

    Known options (``task_id``, ``countdown``, ``eta``, ``expires``,
    ``priority``, ``routing_key``, ...) become request fields; any other
    keyword becomes a message property, as with Celery's ``send_task``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("the task name must be a non-empty string")
    if isinstance(args, (str, bytes)) or (args is not None and not isinstance(args, Sequence)):
        raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    request: dict = {"task": name, "args": list(args or ()), "kwargs": dict(kwargs or {})}
    properties = dict(options.pop("properties", None) or {})
    for key, value in options.items():
        key = _CELERY_ALIASES.get(key, key)
        if key in _UNSUPPORTED:
            raise TypeError(
                f"{key!r} is not supported: taskgate routes by routing key (set routing_key, "
                "or configure [[routing.queues]]) and always sends JSON"
            )
        if value is None:
            continue
        if key in _REQUEST_FIELDS:
            request[key] = _time_field(key, value)
        else:
            properties[key] = value
    if properties:
        request["properties"] = properties
    if isinstance(request.get("id"), uuid.UUID):
        request["id"] = str(request["id"])
    return request


TaskSpec = Union[Mapping[str, Any], Tuple[Any, ...]]


def _spec_to_request(spec: TaskSpec) -> dict:
    """One entry of :meth:`Client.send_tasks`: a mapping with ``name`` (or
    ``task``), ``args``, ``kwargs`` and options, or a tuple ``(name, args,
    kwargs)``."""
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None) or options.pop("task", None)
        return build_request(name, options.pop("args", None), options.pop("kwargs", None), **options)
    if isinstance(spec, tuple) and 1 <= len(spec) <= 3:
        return build_request(*spec)
    raise TypeError(f"a task is a mapping or a (name, args, kwargs) tuple, not {spec!r}")


class _Answer:
    __slots__ = ("status", "content_type", "headers", "body")

    def __init__(self, status: int, content_type: str, headers: Mapping[str, str], body: Any) -> None:
        self.status = status
        self.content_type = content_type
        self.headers = headers
        self.body = body


class Client:
    """A taskgate client. Thread-safe; keep one per process.

    :param base_url: taskgate's address, ``http://127.0.0.1:7439`` by default.
    :param timeout: seconds any call may take (connect plus answer).
    :param availability_ttl: seconds :meth:`is_async_available` reuses an answer.
    :param availability_timeout: seconds its probe may take; short, because
        it runs while a page renders.
    :param token: taskgate's ``http.submit_token``, for a gateway that
        accepts tasks only with it; sent as ``Authorization: Bearer``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float = 5.0,
        *,
        availability_ttl: float = 5.0,
        availability_timeout: float = 1.0,
        token: Optional[str] = None,
    ) -> None:
        if token is not None and (not isinstance(token, str) or not token or any(c in token for c in "\r\n")):
            raise ValueError("token must be a non-empty string on one line")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.availability_ttl = availability_ttl
        self.availability_timeout = min(availability_timeout, timeout)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._state_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._available: Optional[bool] = None
        self._available_until = 0.0

    def __repr__(self) -> str:
        return f"Client({self.base_url!r}, timeout={self.timeout})"

    # -- tasks -------------------------------------------------------------

    def send_task(
        self,
        name: str,
        args: Optional[Sequence[Any]] = None,
        kwargs: Optional[Mapping[str, Any]] = None,
        *,
        idempotency_key: Optional[str] = None,
        **options: Any,
    ) -> str:
        """Enqueues one task and returns its id once taskgate made it durable.

        Raises :class:`TaskRejected` when taskgate refuses it and
        :class:`GatewayUnavailable` when taskgate cannot be reached (then
        retry with the same ``idempotency_key`` to enqueue it exactly once).
        """
        body = build_request(name, args, kwargs, **options)
        answer = self._call("POST", "/v1/tasks", body=body, idempotency_key=idempotency_key, expect=(202,))
        return str(answer.body["id"])

    def send_tasks(self, tasks: Iterable[TaskSpec], *, idempotency_key: Optional[str] = None) -> list:
        """Enqueues tasks all together or none (one request, one flush) and
        returns their ids in order. Each task is a mapping such as
        ``{"name": "export.project", "args": [...], "kwargs": {...},
        "countdown": 10}`` or a tuple ``(name, args, kwargs)``."""
        requests = [_spec_to_request(spec) for spec in tasks]
        if not requests:
            return []
        answer = self._call(
            "POST", "/v1/tasks/batch", body={"tasks": requests}, idempotency_key=idempotency_key, expect=(202,)
        )
        return [str(item["id"]) for item in answer.body["tasks"]]

    def get_task(self, task_id: Union[str, uuid.UUID]) -> Optional[dict]:
        """What taskgate knows about a task (``state``: ``queued``,
        ``published`` or ``dead_letter``, attempts, result, ...), or ``None``
        when it knows no task with that id."""
        path = "/v1/tasks/" + urllib.parse.quote(str(task_id), safe="")
        try:
            return self._call("GET", path, expect=(200,)).body
        except TaskRejected as rejected:
            if rejected.status == 404 and rejected.slug == "not-found":
                return None
            raise

    def task_events(self, task_id: Union[str, uuid.UUID], *, timeout: Optional[float] = None) -> Iterator[dict]:
        """The task's Celery state as it changes (``GET /v1/tasks/{id}/events``):
        yields each ``result`` object (``status``: ``PENDING``, ``PROGRESS``
        with its meta in ``result``, ... ``SUCCESS``) and ends with the task.

        ``timeout`` bounds the wait for each event (keep-alives count), not
        the whole stream. Raises :class:`TaskRejected` (503 when every
        stream slot is taken) and :class:`GatewayUnavailable`.
        """
        path = "/v1/tasks/" + urllib.parse.quote(str(task_id), safe="") + "/events"
        url = self.base_url + path
        headers = {"Accept": "text/event-stream"}
        if self._token is not None:
            headers["Authorization"] = "Bearer " + self._token
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            response = self._opener.open(request, timeout=self.timeout if timeout is None else timeout)
        except urllib.error.HTTPError as error:
            with error:
                answer = self._read(error, error.code)
            if answer.content_type == _PROBLEM_JSON and isinstance(answer.body, dict):
                raise TaskRejected(answer.body, retry_after=_retry_after(answer.headers)) from None
            raise TaskgateError(f"GET {url}: unexpected HTTP {answer.status}") from None
        except (urllib.error.URLError, OSError) as error:
            raise GatewayUnavailable(url, str(getattr(error, "reason", None) or error)) from error
        with response:
            data: list = []
            try:
                for raw in response:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data = []
            except (OSError, ValueError) as error:
                raise GatewayUnavailable(url, f"event stream cut off: {error}") from error

    # -- health ------------------------------------------------------------

    def health(self, *, timeout: Optional[float] = None) -> dict:
        """The ``application/health+json`` document: ``status`` (``pass``,
        ``warn``, ``fail``), ``async_available`` and the checks. A ``fail``
        (HTTP 503) is returned too: it is an answer, not an error."""
        answer = self._call("GET", "/v1/health", expect=(200, 503), timeout=timeout)
        if not isinstance(answer.body, dict) or "status" not in answer.body:
            raise TaskgateError(f"{self.base_url}/v1/health did not answer a health document")
        return answer.body

    def is_async_available(self) -> bool:
        """Whether work that needs a live broker can be offered now (what a UI
        uses to grey out a button). Cached for ``availability_ttl`` seconds;
        ``False``, never an exception, when taskgate cannot be reached."""
        now = time.monotonic()
        with self._state_lock:
            cached, fresh = self._available, now < self._available_until
        if cached is not None and fresh:
            return cached
        # One probe at a time: while one is out, others reuse the last
        # answer instead of piling up behind a slow or dead gateway.
        if not self._probe_lock.acquire(blocking=cached is None):
            return bool(cached)
        try:
            with self._state_lock:
                if self._available is not None and time.monotonic() < self._available_until:
                    return self._available
            try:
                available = self.health(timeout=self.availability_timeout).get("async_available") is True
            except Exception:  # noqa: BLE001 - a UI hint must never break the page
                available = False
            with self._state_lock:
                self._available = available
                self._available_until = time.monotonic() + self.availability_ttl
            return available
        finally:
            self._probe_lock.release()

    # -- transport ---------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        idempotency_key: Optional[str] = None,
        expect: Tuple[int, ...],
        timeout: Optional[float] = None,
    ) -> _Answer:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = "Bearer " + self._token
        data = None
        if body is not None:
            # Serialise before connecting: a bad argument is the caller's
            # TypeError, not a network error.
            data = json.dumps(body, default=_json_default, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = str(idempotency_key)
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout if timeout is None else timeout) as response:
                answer = self._read(response, response.status)
        except urllib.error.HTTPError as error:
            with error:
                answer = self._read(error, error.code)
        except (urllib.error.URLError, OSError) as error:
            # URLError wraps refused connections and DNS failures; timeouts
            # and resets surface as OSError (socket.timeout is one).
            reason = getattr(error, "reason", None) or error
            if isinstance(reason, socket.timeout) or isinstance(error, socket.timeout):
                reason = f"no answer within {self.timeout if timeout is None else timeout} s"
            raise GatewayUnavailable(url, str(reason)) from error
        if answer.status in expect and answer.body is not None:
            return answer
        if answer.content_type == _PROBLEM_JSON and isinstance(answer.body, dict):
            raise TaskRejected(answer.body, retry_after=_retry_after(answer.headers))
        if answer.status >= 500:
            # Not taskgate's own answer (it always sends problem details):
            # a proxy or load balancer in front of it says it is away.
            raise GatewayUnavailable(url, f"HTTP {answer.status} without problem details")
        raise TaskgateError(f"{method} {url}: unexpected HTTP {answer.status} ({answer.content_type or 'no body'})")

    def _read(self, response: Any, status: int) -> _Answer:
        content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            raw = response.read()
        except (OSError, ValueError) as error:
            raise GatewayUnavailable(self.base_url, f"answer cut off: {error}") from error
        body = None
        if content_type in ("application/json", _PROBLEM_JSON, _HEALTH_JSON):
            try:
                body = json.loads(raw.decode("utf-8"))
            except ValueError as error:
                raise TaskgateError(f"{self.base_url}: invalid JSON in a {status} answer: {error}") from error
        return _Answer(status, content_type, response.headers, body)


def _retry_after(headers: Mapping[str, str]) -> Optional[int]:
    value = headers.get("Retry-After")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
