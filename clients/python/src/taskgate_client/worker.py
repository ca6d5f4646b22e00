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

Invariants:

* Only what the topology names is set: the broker URL and credentials stay
  the worker's own (the topology leaves secrets out).
* The tracking queue is declared and bound (so every task published to the
  exchange is copied to it) but never consumed by the worker.
* A topology that cannot be read raises :class:`TopologyError`; a worker is
  never started half-configured.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from typing import Any, Mapping, Optional, Union

__all__ = ["TopologyError", "configure", "load_topology", "celery_settings"]


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
