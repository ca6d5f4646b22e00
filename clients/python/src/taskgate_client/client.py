"""The taskgate HTTP client: enqueue tasks, read their state, ask for health.

Mirrors Celery's ``app.send_task`` so that the platform can swap it in:
``send_task(name, args, kwargs, **options)`` returns the task id. Celery's
``apply_async`` options are taken in Celery's spelling (see
:func:`build_request`); the ones taskgate cannot honour raise TypeError
naming the option; other keywords become message properties, as Celery's
do. :mod:`taskgate_client.celery` puts this under a Celery app.

Invariants:

* Every call is bounded by ``timeout``; nothing retries behind the caller's
  back (a retried POST could enqueue twice; pass ``idempotency_key`` and
  retry yourself).
* :meth:`Client.is_async_available` never raises and never waits longer
  than ``availability_timeout``; its answer is cached for
  ``availability_ttl`` seconds, failures included, so a page rendered while
  taskgate is down costs at most one short probe per TTL, not one per view.
* No option is silently dropped: each is sent, refused with a TypeError
  naming it, or (a value taskgate gives anyway, such as
  ``serializer="json"``) known to change nothing.
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

# Request fields taskgate takes besides task, args and kwargs (TaskRequest
# in src/task/mod.rs), spelled as Celery's apply_async spells them.
_REQUEST_FIELDS = frozenset(
    {
        "id",
        "routing_key",
        "queue",
        "exchange",
        "eta",
        "expires",
        "countdown",
        "priority",
        "parent_id",
        "root_id",
        "group",
        "group_index",
        "time_limit",
        "soft_time_limit",
        "shadow",
        "headers",
        "ignore_result",
        "retries",
        "link",
        "link_error",
        "chain",
    }
)
# Celery's spelling of the same options.
_CELERY_ALIASES = {"task_id": "id", "group_id": "group"}

_PUBLISHES_ITSELF = "taskgate publishes with its own broker connection and sets it itself"
# Options taskgate cannot honour, with the reason the TypeError gives. Each
# one would change how or where the message is published, or needs the
# caller to hold a broker connection; accepting it silently would send the
# task otherwise than the caller meant. A value of None counts as not given
# (Celery passes its defaults as None), and the values in _HARMLESS are what
# taskgate does anyway.
_REFUSED = {
    "serializer": "taskgate always sends JSON (Celery's json serializer); "
    "pickle, yaml and msgpack bodies cannot be sent",
    "compression": "taskgate does not compress message bodies",
    "connection": "the caller holds no broker connection: " + _PUBLISHES_ITSELF,
    "producer": "the caller holds no broker producer: " + _PUBLISHES_ITSELF,
    "publisher": "the caller holds no broker producer: " + _PUBLISHES_ITSELF,
    "retry": "taskgate retries publishing itself, with backoff, until the broker confirms "
    "or the task is dead-lettered (docs/coming-from-celery.md)",
    "retry_policy": "taskgate retries publishing itself, with backoff, until the broker confirms "
    "or the task is dead-lettered (docs/coming-from-celery.md)",
    "chord": "chords are not supported through taskgate yet",
    "add_to_parent": "only a task running in a worker has a parent; that worker publishes through its broker",
    "exchange_type": "taskgate's exchange is the topic exchange routing.exchange",
    "delivery_mode": "taskgate publishes every message persistent",
    "immediate": "RabbitMQ does not implement immediate",
    "mandatory": "taskgate publishes every message mandatory",
    "reply_to": "taskgate sends no reply_to: read results from the result backend (rpc:// cannot work)",
    "router": "taskgate routes by its own [routing] configuration: pass routing_key or queue",
    "route_name": "taskgate routes by its own [routing] configuration: pass routing_key or queue",
    "result_cls": "Client.send_task returns the task id; taskgate_client.celery returns AsyncResults",
    "task_type": "Client.send_task returns the task id; taskgate_client.celery returns AsyncResults",
    "stamped_headers": "canvas stamping is not supported through taskgate",
    "stamps": "canvas stamping is not supported through taskgate",
    "replaced_task_nesting": "Task.replace() runs in a worker, which publishes through its broker",
    "declare": _PUBLISHES_ITSELF + " (it declares its configured topology)",
    "timeout": _PUBLISHES_ITSELF + " (broker.publish_timeout_ms); Client(timeout=...) bounds the HTTP call",
    "confirm_timeout": _PUBLISHES_ITSELF + " (broker.publish_timeout_ms)",
    # Message properties the broker or kombu set: taskgate would drop them.
    "expiration": "use expires (taskgate derives the AMQP expiration from it)",
    "correlation_id": _PUBLISHES_ITSELF + " (the task id)",
    "content_type": _PUBLISHES_ITSELF + " (application/json)",
    "content_encoding": _PUBLISHES_ITSELF + " (utf-8)",
    "delivery_info": _PUBLISHES_ITSELF,
    "delivery_tag": _PUBLISHES_ITSELF,
    "body_encoding": _PUBLISHES_ITSELF,
}
_HARMLESS = {
    "serializer": ("json",),
    "delivery_mode": (2, "persistent"),
    "replaced_task_nesting": (0,),
}
# Kept for callers that imported it: the options refused whatever their value.
_UNSUPPORTED = frozenset(_REFUSED)

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
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def _rfc3339(value: _dt.datetime) -> str:
    # Naive datetimes are UTC, as Celery takes them with enable_utc (its
    # default); taskgate requires an explicit offset.
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.isoformat()


def _seconds(name: str, value: Any) -> Any:
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    return value


def _time_field(name: str, value: Any) -> Any:
    """eta and expires as taskgate takes them: an RFC 3339 time (from a
    datetime), or for expires (and countdown) a number of seconds, which
    taskgate counts from acceptance as Celery counts from the call."""
    if isinstance(value, _dt.datetime):
        return _rfc3339(value)
    if name in ("expires", "countdown"):
        return _seconds(name, value)
    return value


def _destination(name: str, value: Any) -> str:
    # A kombu Queue or Exchange (what Celery's task_queues hold) goes by its name.
    if isinstance(value, str):
        return value
    named = getattr(value, "name", None)
    if isinstance(named, str) and named:
        return named
    raise TypeError(f"{name!r} must be a name (or a kombu {name.title()}), not {value!r}")


_SIGNATURE_KEYS = ("task", "args", "kwargs", "options", "subtask_type", "immutable", "chord_size")


def signature_dict(value: Any, option: str = "link") -> dict:
    """A task signature in the JSON shape taskgate takes (Celery's own:
    ``{task, args, kwargs, options, subtask_type, immutable}``), from a
    ``celery.canvas.Signature`` (a dict subclass, so celery is never
    imported here) or a plain mapping.

    Raises TypeError naming ``option`` for anything that is not one task:
    taskgate publishes plain task signatures only (no group, chain or chord
    as a callback).
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{option!r} must be a task signature (task.s(...) or its dict), not {value!r}")
    unknown = sorted(set(value) - set(_SIGNATURE_KEYS))
    if unknown:
        raise TypeError(f"{option!r}: not a Celery signature (unknown keys {unknown})")
    task = value.get("task")
    if not isinstance(task, str) or not task:
        raise TypeError(f"{option!r}: a signature needs a task name, got {task!r}")
    subtask_type = value.get("subtask_type")
    if subtask_type == "chord":
        raise TypeError(f"{option!r}: chords are not supported through taskgate yet")
    if subtask_type is not None:
        raise TypeError(
            f"{option!r}: a {subtask_type} cannot be sent through taskgate there, only task signatures "
            "(a callback that is a chain: link the chain's first task and chain the rest)"
        )
    args = value.get("args") or ()
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"{option!r}: signature args must be a list or tuple, not {args!r}")
    options = {}
    for key, item in dict(value.get("options") or {}).items():
        if item is None:
            continue
        options[key] = _destination(f"{option}.options.{key}", item) if key in ("queue", "exchange") else item
    signature = {
        "task": task,
        "args": list(args),
        "kwargs": dict(value.get("kwargs") or {}),
        "options": options,
        "subtask_type": None,
        "immutable": bool(value.get("immutable", False)),
    }
    if value.get("chord_size") is not None:
        signature["chord_size"] = value["chord_size"]
    return signature


def _signatures(option: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return signature_dict(value, option)
    if isinstance(value, (list, tuple)):
        return [signature_dict(item, f"{option}[{index}]") for index, item in enumerate(value)]
    raise TypeError(f"{option!r} must be a signature or a list of them, not {value!r}")


def build_request(
    name: str,
    args: Optional[Sequence[Any]] = None,
    kwargs: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> dict:
    """The JSON body of ``POST /v1/tasks`` for a Celery-style call.

    Celery's ``apply_async`` options, in Celery's spelling, become request
    fields: ``task_id``, ``countdown``, ``eta``, ``expires`` (seconds, a
    datetime or a timedelta), ``priority``, ``routing_key``, ``queue`` and
    ``exchange`` (names or kombu objects), ``group_id``, ``group_index``,
    ``parent_id``, ``root_id``, ``time_limit``, ``soft_time_limit``,
    ``shadow``, ``headers``, ``ignore_result``, ``retries``, ``link`` and
    ``link_error`` (signatures or their dicts), ``chain`` (signatures **in
    execution order**: the steps after this task).

    Options taskgate cannot honour (``serializer`` other than json,
    ``compression``, ``connection``, ``producer``, ``retry``,
    ``retry_policy``, ``chord``, ``add_to_parent``, ...) raise TypeError
    naming the option. A value of ``None`` is "not given", as in Celery.
    Any other keyword becomes a message property, as with Celery's
    ``send_task`` (``creator_id="u1"``), and so do the entries of
    ``properties={...}``; names the broker sets itself are refused, not
    dropped.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("the task name must be a non-empty string")
    if isinstance(args, (str, bytes)) or (args is not None and not isinstance(args, Sequence)):
        raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    request: dict = {"task": name, "args": list(args or ()), "kwargs": dict(kwargs or {})}
    explicit = options.pop("properties", None) or {}
    if not isinstance(explicit, Mapping):
        raise TypeError(f"'properties' must be a mapping, not {explicit!r}")
    properties: dict = {}
    for key, value in options.items():
        celery_key = key
        key = _CELERY_ALIASES.get(key, key)
        if value is None:
            continue
        if key in _REFUSED:
            if value in _HARMLESS.get(key, ()):
                continue
            raise TypeError(f"{celery_key!r} is not supported: {_REFUSED[key]}")
        if key in _REQUEST_FIELDS:
            request[key] = _field(key, value)
        else:
            properties[key] = value
    for key, value in explicit.items():
        # properties={...} are message properties whatever their names,
        # except the ones the broker sets (taskgate would drop those).
        if key in _REFUSED and key not in _HARMLESS:
            raise TypeError(f"property {key!r} is not supported: {_REFUSED[key]}")
        properties[key] = value
    if properties:
        request["properties"] = properties
    if isinstance(request.get("id"), uuid.UUID):
        request["id"] = str(request["id"])
    return request


def _field(key: str, value: Any) -> Any:
    if key in ("eta", "expires", "countdown"):
        return _time_field(key, value)
    if key in ("queue", "exchange"):
        return _destination(key, value)
    if key in ("link", "link_error"):
        return _signatures(key, value)
    if key == "chain":
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"'chain' must be a list of signatures in execution order, not {value!r}")
        return [signature_dict(item, f"chain[{index}]") for index, item in enumerate(value)]
    if key == "headers":
        if not isinstance(value, Mapping):
            raise TypeError(f"'headers' must be a mapping, not {value!r}")
        return dict(value)
    if key in ("time_limit", "soft_time_limit"):
        return _seconds(key, value)
    return value


class _Built(dict):
    """A request :func:`build_request` already made (taskgate_client.celery
    builds group members itself): sent as it is."""


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
        return self.send_request(build_request(name, args, kwargs, **options), idempotency_key=idempotency_key)

    def send_request(self, request: Mapping[str, Any], *, idempotency_key: Optional[str] = None) -> str:
        """Enqueues one task given as a ``POST /v1/tasks`` body (what
        :func:`build_request` returns); returns its id."""
        answer = self._call("POST", "/v1/tasks", body=dict(request), idempotency_key=idempotency_key, expect=(202,))
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

    def send_group(
        self,
        tasks: Iterable[TaskSpec],
        *,
        group_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> Tuple[str, list]:
        """Enqueues a Celery group, all its tasks or none (``POST
        /v1/groups``, one flush): each task gets ``group`` = the group id and
        ``group_index`` = its position. Returns ``(group_id, task ids)``.

        Without ``group_id`` taskgate makes one (derived from
        ``idempotency_key`` when given, so a retry names the same group); a
        task that sets its own ``group_id``/``group_index`` is refused
        (TypeError).
        A gateway older than ``/v1/groups`` (404 for the route) gets the same
        tasks as one ``/v1/tasks/batch`` with group and index set on each,
        which is just as all-or-nothing.
        """
        requests = [dict(spec) if isinstance(spec, _Built) else _spec_to_request(spec) for spec in tasks]
        for index, request in enumerate(requests):
            for field in ("group", "group_index"):
                if field in request:
                    raise TypeError(
                        f"tasks[{index}] sets {'group_id' if field == 'group' else field}: "
                        "a group gives every member its id and position"
                    )
        if not requests:
            return (str(group_id) if group_id is not None else str(uuid.uuid4())), []
        body: dict = {"tasks": requests}
        if group_id is not None:
            body["group_id"] = group_id = str(group_id)
        try:
            answer = self._call(
                "POST",
                "/v1/groups",
                body=body,
                idempotency_key=idempotency_key,
                expect=(202,),
            )
        except TaskRejected as rejected:
            if not (rejected.status == 404 and rejected.slug == "not-found"):
                raise
            if group_id is None:
                # The same key names the same group, so a retried batch is a replay.
                seed = "taskgate-group:" + idempotency_key if idempotency_key else None
                group_id = str(uuid.uuid5(uuid.NAMESPACE_URL, seed) if seed else uuid.uuid4())
            members = [dict(request, group=group_id, group_index=index) for index, request in enumerate(requests)]
            answer = self._call(
                "POST", "/v1/tasks/batch", body={"tasks": members}, idempotency_key=idempotency_key, expect=(202,)
            )
            return group_id, [str(item["id"]) for item in answer.body["tasks"]]
        return str(answer.body["group_id"]), [str(item["id"]) for item in answer.body["tasks"]]

    def send_chord(
        self,
        tasks: Iterable[TaskSpec],
        body: Any,
        *,
        group_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> Tuple[str, list, str]:
        """Enqueues a Celery chord (``chord(tasks)(body)``), all or nothing:
        the group as :meth:`send_group` does, and ``body`` (a Celery
        Signature or its dict), which a worker applies with the list of the
        tasks' results once all succeeded (taskgate sends Celery's own
        ``celery.chord_unlock`` for it). Returns ``(group_id, task ids, body
        id)``; the chord's result is the body's.
        """
        requests = [dict(spec) if isinstance(spec, _Built) else _spec_to_request(spec) for spec in tasks]
        if not requests:
            raise TypeError("a chord needs at least one task in its header")
        for index, request in enumerate(requests):
            for field in ("group", "group_index"):
                if field in request:
                    raise TypeError(
                        f"tasks[{index}] sets {'group_id' if field == 'group' else field}: "
                        "a group gives every member its id and position"
                    )
        payload: dict = {"tasks": requests, "chord": signature_dict(body, "chord")}
        if group_id is not None:
            payload["group_id"] = str(group_id)
        answer = self._call("POST", "/v1/groups", body=payload, idempotency_key=idempotency_key, expect=(202,))
        return (
            str(answer.body["group_id"]),
            [str(item["id"]) for item in answer.body["tasks"]],
            str(answer.body["chord"]["id"]),
        )

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
