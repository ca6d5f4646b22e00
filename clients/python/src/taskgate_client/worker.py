"""Configures a Celery worker from taskgate's own topology.

A worker must declare the topic exchange and bind its queues exactly as the
gateway routes, bind the tracking queue so the tasks it schedules are
recorded, route the tasks it schedules with the gateway's routing keys, and
store results where the platform reads them. Forget one and tasks still run,
but copies never reach the tracking queue or results never reach the
platform, and nobody notices. :func:`configure` takes all of it from the
gateway (``GET /v1/topology``) or from the file ``taskgate topology --format
celery`` wrote, so the two cannot drift::

    from celery import Celery
    from taskgate_client.worker import configure

    app = Celery("platform")
    configure(app, "http://127.0.0.1:7439/v1/topology",
              result_backend_password=os.environ["DB_PASSWORD"])

``configure`` also registers taskgate's probe (:func:`register_probe`), the
built-in ``taskgate.probe`` task ``taskgate verify-workers`` sends to every
queue; a worker configured by hand calls ``register_probe(app)`` itself.

Invariants:

* Only what the topology names is set: the broker URL and credentials stay
  the worker's own (the topology leaves secrets out).
* The tracking queue is declared and bound (so every task published to the
  exchange is copied to it) but never consumed by the worker.
* A topology that cannot be read raises :class:`TopologyError`; a worker is
  never started half-configured.
* The probe describes the worker as it really routes and consumes (Celery's
  own router and queue selection), never as the topology says it should:
  the gateway compares the two.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from typing import Any, Mapping, Optional, Union

__all__ = [
    "PROBE_TASK",
    "PROBE_SCHEDULED_TASK",
    "TopologyError",
    "celery_settings",
    "configure",
    "describe_worker",
    "load_topology",
    "register_probe",
]

#: The task ``taskgate verify-workers`` sends to each queue.
PROBE_TASK = "taskgate.probe"
#: The task the probe schedules from inside the worker, routed by the
#: worker's own routing: taskgate sees it only through the tracking queue.
PROBE_SCHEDULED_TASK = "taskgate.probe.scheduled"


class TopologyError(Exception):
    """The topology could not be read or is not one taskgate wrote."""


def load_topology(source: Union[str, os.PathLike, Mapping[str, Any]], timeout: float = 5.0) -> dict:
    """Reads a topology: a URL (``GET /v1/topology``), a file, or a mapping.

    Either form taskgate writes is accepted: the topology document, or its
    Celery settings (``taskgate topology --format celery``).
    """
    if isinstance(source, Mapping):
        return dict(source)
    text = os.fspath(source)
    try:
        if urllib.parse.urlparse(text).scheme in ("http", "https"):
            request = urllib.request.Request(text, headers={"Accept": "application/json"})
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(request, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        with open(text, encoding="utf-8") as document:
            return json.load(document)
    except (OSError, ValueError) as error:
        raise TopologyError(f"cannot read the taskgate topology from {text}: {error}") from error


def celery_settings(topology: Mapping[str, Any]) -> dict:
    """The Celery settings of a topology document (or the settings as given)."""
    if "task_queues" in topology:
        return dict(topology)
    try:
        exchange = topology["exchange"]
        queues = topology["queues"]
        routing = topology["routing"]
    except (KeyError, TypeError) as error:
        raise TopologyError(f"not a taskgate topology: missing {error}") from error
    broker = topology.get("broker") or {}
    arguments = {"x-queue-type": "quorum"} if broker.get("quorum_queues") else None

    def queue(entry: Mapping[str, Any]) -> dict:
        return {
            "name": entry["name"],
            "exchange": exchange["name"],
            "exchange_type": exchange.get("type", "topic"),
            "routing_key": entry["binding_key"],
            "durable": entry.get("durable", True),
            "queue_arguments": arguments,
        }

    settings = {
        "task_queues": [queue(entry) for entry in queues],
        "taskgate_declare_only": [queue(topology["tracking_queue"])] if topology.get("tracking_queue") else [],
        "task_default_exchange": exchange["name"],
        "task_default_exchange_type": exchange.get("type", "topic"),
        "taskgate_routing": routing,
        "result_backend": (topology.get("result_backend") or {}).get("url"),
    }
    if broker.get("kind") == "sqs":
        options = {}
        if broker.get("region"):
            options["region"] = broker["region"]
        if broker.get("queue_name_prefix"):
            options["queue_name_prefix"] = broker["queue_name_prefix"]
        settings["broker_transport_options"] = options
    return settings


def _with_password(url: str, password: Optional[str]) -> str:
    if not password or not url:
        return url
    scheme, rest = url.split("://", 1)
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    user, host = authority.rsplit("@", 1)
    user = user.split(":", 1)[0]
    return f"{scheme}://{user}:{urllib.parse.quote(password, safe='')}@{host}{slash}{path}"


def _router(exchange: str, exchange_type: str, routing: Mapping[str, Any]):
    """Celery router giving the routing key taskgate would give."""
    tasks = dict(routing.get("tasks") or {})
    rule = routing.get("default_rule", "first_word")
    if rule != "first_word":
        raise TopologyError(f"unknown taskgate routing rule {rule!r}: update taskgate_client")

    def route(name, args, kwargs, options, task=None, **_):
        if options.get("routing_key") or options.get("queue"):
            return None  # the caller chose; Celery routes as asked
        key = tasks.get(name) or name.split(".", 1)[0]
        return {"exchange": exchange, "exchange_type": exchange_type, "routing_key": key}

    return route


def configure(
    app,
    source: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    result_backend: Optional[str] = None,
    result_backend_password: Optional[str] = None,
    timeout: float = 5.0,
) -> dict:
    """Sets ``app``'s queues, exchange, routing, transport options and result
    backend from taskgate's topology; returns the settings applied.

    ``result_backend`` replaces the topology's (which carries no password);
    or ``result_backend_password`` is put into the topology's URL.
    """
    from kombu import Exchange, Queue

    settings = celery_settings(load_topology(source, timeout=timeout))
    exchange_name = settings["task_default_exchange"]
    exchange_type = settings.get("task_default_exchange_type", "topic")
    exchange = Exchange(exchange_name, type=exchange_type, durable=True)

    def queue(entry: Mapping[str, Any]):
        return Queue(
            entry["name"],
            exchange,
            routing_key=entry["routing_key"],
            durable=entry.get("durable", True),
            queue_arguments=entry.get("queue_arguments") or None,
        )

    consumed = [queue(entry) for entry in settings["task_queues"]]
    declare_only = [queue(entry) for entry in settings.get("taskgate_declare_only") or []]
    backend = result_backend or _with_password(settings.get("result_backend") or "", result_backend_password)
    app.conf.update(
        task_queues=consumed,
        task_default_exchange=exchange_name,
        task_default_exchange_type=exchange_type,
        task_routes=(_router(exchange_name, exchange_type, settings.get("taskgate_routing") or {}),),
        # Declared with the others when the worker starts and whenever it
        # publishes, so the binding exists even before taskgate's consumer
        # declared it; never consumed (not in task_queues).
        task_create_missing_queues=True,
    )
    if backend:
        app.conf.result_backend = backend
    if "broker_transport_options" in settings:
        options = dict(app.conf.broker_transport_options or {})
        options.update(settings["broker_transport_options"])
        app.conf.broker_transport_options = options
    if declare_only:
        _declare_when_ready(app, declare_only)
    register_probe(app)
    return settings


def _declare_when_ready(app, queues) -> None:
    """Declares (and binds) ``queues`` once the worker is up, without
    consuming them."""
    from celery import signals

    def declare(sender=None, **_):
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in queues:
                queue.bind(channel).declare()

    signals.worker_ready.connect(declare, weak=False)
    app.conf.taskgate_declare_only = [queue.name for queue in queues]


# The queues each app's worker consumes, noted once the worker has selected
# them (-Q applied) and before a prefork pool forks, so every process
# reports what the consumer really reads.
_consumed_at_start: dict = {}


def register_probe(app) -> None:
    """Registers ``taskgate.probe`` and ``taskgate.probe.scheduled`` in
    ``app`` (idempotent). ``configure`` calls it; a worker configured by
    hand calls it to be verifiable by ``taskgate verify-workers``.

    The probe schedules ``taskgate.probe.scheduled`` with ``apply_async``
    from inside the worker, routed as the worker routes everything it
    schedules, and returns :func:`describe_worker`'s description with the
    child's id. The child carries the same description as its argument, so
    the gateway learns it from the tracking queue even when the worker
    stores no result.
    """
    if getattr(app, "_taskgate_probe_registered", False):
        return
    app._taskgate_probe_registered = True
    from celery import signals

    def note_consumed(sender=None, instance=None, **_):
        if instance is not None and getattr(instance, "app", None) is app:
            _consumed_at_start[id(app)] = list(app.amqp.queues.consume_from.values())

    signals.celeryd_after_setup.connect(note_consumed, weak=False)

    @app.task(name=PROBE_SCHEDULED_TASK, shared=False, ignore_result=True)
    def probe_scheduled(description=None):
        """Does nothing: its copy in the tracking queue is the point."""
        return None

    @app.task(name=PROBE_TASK, bind=True, shared=False)
    def probe(self, queue=None):
        description = describe_worker(app, self.request, probed_queue=queue)
        child = probe_scheduled.apply_async(args=[description])
        return dict(description, scheduled_id=child.id)


def describe_worker(app, request=None, probed_queue: Optional[str] = None) -> dict:
    """What the gateway compares with its topology: the worker's hostname,
    where it publishes ``taskgate.probe.scheduled`` (exchange, type, routing
    key, found by Celery's own router), the queues it consumes with their
    exchange, type and routing key, and its result backend (password left
    out)."""
    queues = _consumed_at_start.get(id(app))
    if queues is None:
        queues = list(app.amqp.queues.consume_from.values())
    backend = app.conf.result_backend
    return {
        "hostname": getattr(request, "hostname", None),
        "probed_queue": probed_queue,
        "delivery_routing_key": ((getattr(request, "delivery_info", None) or {}).get("routing_key")),
        "publishes_to": _publish_destination(app, PROBE_SCHEDULED_TASK),
        "queues": [_describe_queue(queue) for queue in queues],
        "result_backend": _without_password(str(backend)) if backend else None,
    }


def _describe_queue(queue) -> dict:
    exchange = queue.exchange
    return {
        "name": queue.name,
        "exchange": exchange.name if exchange is not None else "",
        "type": exchange.type if exchange is not None else "direct",
        "routing_key": queue.routing_key,
        "durable": bool(queue.durable),
        "queue_arguments": dict(queue.queue_arguments or {}),
    }


def _publish_destination(app, name: str) -> dict:
    """Where Celery publishes task ``name``: its router, then
    ``send_task_message``'s own defaults (a direct exchange without a
    routing key becomes the default exchange ``''``)."""
    from kombu import Exchange

    options = app.amqp.router.route({}, name, (), {})
    queue = options.get("queue")
    exchange = options.get("exchange")
    exchange_type = options.get("exchange_type")
    routing_key = options.get("routing_key")
    if isinstance(queue, str):
        queue = app.amqp.queues[queue]
    if isinstance(exchange, Exchange):
        exchange_type = exchange_type or exchange.type
        exchange = exchange.name
    if exchange_type is None:
        exchange_type = queue.exchange.type if queue is not None and queue.exchange is not None else "direct"
    if (not exchange or not routing_key) and exchange_type == "direct":
        exchange, routing_key = "", queue.name if queue is not None else routing_key
    elif exchange is None:
        exchange = (queue.exchange.name if queue is not None else None) or app.conf.task_default_exchange
        routing_key = routing_key or (queue.routing_key if queue is not None else None)
        routing_key = routing_key or app.conf.task_default_routing_key
    return {"exchange": exchange, "type": exchange_type, "routing_key": routing_key}


def _without_password(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    user, host = authority.rsplit("@", 1)
    return f"{scheme}://{user.split(':', 1)[0]}@{host}{slash}{path}"
