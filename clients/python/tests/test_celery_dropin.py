"""The Celery drop-in (taskgate_client.celery) against the real gateway, the
real RabbitMQ and a stock Celery 5.7 worker with the database result
backend (the gateway's tracking database, so GET /v1/tasks/{id} reads the
same results).

The web process is this test process: it imports tests/dropin_app.py, an
unmodified Celery app plus the one install line, with its broker URL at a
closed port, and any attempt to open a broker connection fails the test.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import json
import os
import re
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import AMQP_URL, CLOSED_PORT_URL, Gateway, delete_topology, remove_test_dir, require_rabbitmq, unique
from taskgate_client import GatewayUnavailable, TaskRejected
from taskgate_client.client import _HARMLESS, _REFUSED

HERE = Path(__file__).resolve().parent


class _BrokerForbidden(AssertionError):
    pass


@pytest.fixture(scope="module")
def platform(tmp_path_factory, closed_url):
    """(gateway, worker, the web process's dropin_app module, records path)."""
    from celery import Celery
    from celery.canvas import Signature  # noqa: F401 - imported before kombu is patched
    from kombu import Connection

    from test_worker import ConfiguredWorker

    require_rabbitmq()
    gateway = Gateway(AMQP_URL)
    worker = None
    records = tmp_path_factory.mktemp("dropin") / "records.jsonl"
    backend = "db+sqlite:///" + str(gateway.dir / "tracking.db")
    saved = {key: os.environ.get(key) for key in ("CELERY_BROKER_URL", "DROPIN_RESULT_BACKEND", "TASKGATE_URL", "DROPIN_RECORD")}
    establish = Connection._establish_connection

    def forbidden(self, *args, **kwargs):
        raise _BrokerForbidden(f"the web process opened a broker connection to {self.as_uri()}")

    try:
        gateway.wait_for(lambda health: health["async_available"], 30, "a broker connection")
        worker = ConfiguredWorker(
            gateway.url + "/v1/topology",
            module="dropin_app",
            extra_env={
                "DROPIN_RESULT_BACKEND": backend,
                # The worker steps aside: were it to send through taskgate,
                # this address would fail its scheduled tasks.
                "TASKGATE_URL": closed_url,
                "DROPIN_RECORD": str(records),
            },
        )
        os.environ.update(
            CELERY_BROKER_URL=CLOSED_PORT_URL,
            DROPIN_RESULT_BACKEND=backend,
            TASKGATE_URL=gateway.url,
            DROPIN_RECORD=str(records),
        )
        sys.modules.pop("dropin_app", None)
        Connection._establish_connection = forbidden
        web = importlib.import_module("dropin_app")
        assert isinstance(web.app, Celery)
        yield gateway, worker, web, records
    finally:
        Connection._establish_connection = establish
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if worker is not None:
            worker.stop()
        gateway.stop()
        delete_topology([gateway.queue], [gateway.exchange])
        remove_test_dir(gateway.dir)


@pytest.fixture(scope="module")
def closed_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def read_records(path: Path) -> list:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def wait_record(path: Path, predicate, worker, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in read_records(path):
            if predicate(record):
                return record
        time.sleep(0.2)
    pytest.fail(f"no such record in {read_records(path)}; worker log:\n{worker.log()}", pytrace=False)


def logs(gateway, worker) -> str:
    return f"worker log:\n{worker.log()}\ntaskgate log:\n{gateway.log()}"


def test_delay_returns_celerys_async_result_and_get_reads_the_database_backend(platform):
    gateway, worker, web, _ = platform
    from celery.result import AsyncResult

    result = web.add.delay(2, 3)
    assert isinstance(result, AsyncResult) and str(uuid.UUID(result.id)) == result.id
    assert result.get(timeout=60) == 5, logs(gateway, worker)
    assert result.state == "SUCCESS"
    task = gateway.client().get_task(result.id)
    assert task["task"] == "dropin.add" and task["result"]["result"] == 5
    assert web.app.send_task("dropin.add", (20, 22)).get(timeout=60) == 42


def test_a_chain_runs_in_order(platform):
    gateway, worker, web, _ = platform
    from celery import chain

    result = chain(web.add.s(2, 3), web.add.s(10)).delay()
    assert result.get(timeout=60) == 15, logs(gateway, worker)
    assert result.parent.get(timeout=5) == 5
    assert gateway.client().get_task(result.parent.id)["task"] == "dropin.add"


def test_a_group_is_sent_in_one_request_and_read_back_as_a_group_result(platform):
    gateway, worker, web, records = platform
    from celery import group
    from celery.result import GroupResult

    result = group(web.add.s(i, i) for i in range(5)).delay()
    assert isinstance(result, GroupResult)
    assert result.get(timeout=60) == [0, 2, 4, 6, 8], logs(gateway, worker)
    noted = group(web.note.s("member-0"), web.note.s("member-1")).apply_async()
    seen = noted.get(timeout=60)
    assert [entry["group"] for entry in seen] == [noted.id, noted.id]
    assert [entry["group_index"] for entry in seen] == [0, 1]


def test_a_group_member_refused_refuses_the_whole_group(platform):
    gateway, _, web, _ = platform
    from celery import group

    first = str(uuid.uuid4())
    with pytest.raises(TaskRejected) as refused:
        # An id that is not a UUID: the second member is refused, so neither is sent.
        group(web.add.s(1, 1).set(task_id=first), web.add.s(2, 2).set(task_id="not a uuid")).delay()
    assert refused.value.status == 422 and "tasks[1]" in (refused.value.field or ""), refused.value
    assert gateway.client().get_task(first) is None, "nothing of a refused group is enqueued"


def test_link_error_runs_the_errback_in_the_worker(platform):
    gateway, worker, web, records = platform
    result = web.fail.apply_async((7,), link_error=web.errback.s())
    wait_record(records, lambda record: record.get("errback_for") == result.id, worker)
    with pytest.raises(Exception, match="failed on purpose with 7"):
        result.get(timeout=30)
    assert result.state == "FAILURE"


def test_ignore_result_stores_no_result(platform):
    gateway, worker, web, records = platform
    result = web.note.apply_async(("ignored",), ignore_result=True)
    assert result.ignored is True
    wait_record(records, lambda record: record.get("id") == result.id, worker)
    time.sleep(1)  # the worker would store right after the task returns
    with sqlite3.connect(gateway.dir / "tracking.db") as db:
        rows = db.execute("SELECT count(*) FROM celery_taskmeta WHERE task_id = ?", (result.id,)).fetchone()[0]
    assert rows == 0


def test_shadow_headers_retries_and_expires_reach_the_worker(platform):
    gateway, worker, web, _ = platform
    result = web.note.apply_async(
        ("options",),
        shadow="export.shown-name",
        headers={"x_trace": "trace-1"},
        expires=dt.timedelta(minutes=5),
    )
    seen = result.get(timeout=60)
    assert seen["shadow"] == "export.shown-name", logs(gateway, worker)
    assert seen["x_trace"] == "trace-1"
    expires = dt.datetime.fromisoformat(seen["expires"])
    left = (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 200 < left <= 300, seen


def test_a_worker_schedules_through_its_own_broker(platform):
    gateway, worker, web, _ = platform
    child = web.schedule.delay(41).get(timeout=60)
    assert web.app.AsyncResult(child).get(timeout=60) == 42, logs(gateway, worker)


def test_a_django_view_enqueues_with_no_broker_at_all(platform):
    """The seed's failure: the web process could not start without its broker."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(SECRET_KEY="taskgate-client-tests", INSTALLED_APPS=[])
        django.setup()
    from django.http import JsonResponse
    from django.test import RequestFactory

    _, _, web, _ = platform
    assert web.app.conf.broker_url == CLOSED_PORT_URL

    def export(request):
        result = web.add.delay(1, 1)
        return JsonResponse({"task_id": result.id, "state": result.state})

    response = export(RequestFactory().post("/export"))
    body = json.loads(response.content)
    assert str(uuid.UUID(body["task_id"])) == body["task_id"]
    assert body["state"] in ("PENDING", "SUCCESS")


def test_a_chord_runs_its_body_with_the_headers_results(platform):
    _, _, web, _ = platform
    from celery import chain, chord, group

    result = chord(web.add.s(i, i) for i in range(3))(web.tsum.s())
    assert result.get(timeout=60) == 6, "0 + 2 + 4, summed by the body"
    assert [member.get(timeout=10) for member in result.parent.results] == [0, 2, 4]
    assert (group(web.add.s(1, 1), web.add.s(2, 2)) | web.tsum.s()).delay().get(timeout=60) == 6
    # A chord inside a chain is not one taskgate sends: refused, not dropped.
    with pytest.raises(TypeError, match="'chain\\[0\\]': chords are not supported"):
        chain(web.add.s(1, 1), group(web.add.s(1), web.add.s(2)), web.add.s(3)).delay()


def test_taskgate_unreachable_raises_or_falls_back_as_configured(platform, closed_url):
    _, _, web, _ = platform
    import taskgate_client.celery as dropin

    client = dropin.installed(web.app)
    try:
        dropin.install(web.app, url=closed_url, timeout=1)
        with pytest.raises(GatewayUnavailable):
            web.add.delay(1, 2)
        calls = []

        def fallback(error, name, args, kwargs, options):
            calls.append((name, args))
            return web.app.AsyncResult("fallback")

        dropin.install(web.app, url=closed_url, timeout=1, on_unavailable=fallback)
        assert web.add.delay(1, 2).id == "fallback"
        assert calls == [("dropin.add", (1, 2))]
    finally:
        dropin.install(web.app, client=client)


# -- every apply_async option: honoured or refused -----------------------------

def celery_apply_async_options() -> list:
    """The options Celery documents for Task.apply_async and the keywords of
    Task.apply_async and app.send_task, read from the installed Celery."""
    from celery import Celery
    from celery.app.task import Task

    doc = inspect.getdoc(Task.apply_async)
    arguments = doc.split("Arguments:", 1)[1].split("Returns:", 1)[0]
    names = set(re.findall(r"^    (\w+) \(", arguments, re.M))
    for function in (Task.apply_async, Celery.send_task):
        names |= {
            name
            for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        }
    return sorted(names - {"self", "name", "args", "kwargs"})


SAMPLES = {
    "countdown": 10,
    "eta": dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc),
    "expires": 60,
    "shadow": "alias",
    "time_limit": 30,
    "soft_time_limit": 20,
    "queue": "export",
    "exchange": "tasks",
    "routing_key": "export",
    "priority": 5,
    "serializer": "pickle",
    "compression": "zlib",
    "link": {"task": "dropin.add", "args": [1]},
    "link_error": {"task": "dropin.errback"},
    "chain": [{"task": "dropin.add", "args": [1]}],
    "headers": {"x_trace": "t"},
    "task_id": str(uuid.uuid4()),
    "group_id": "g",
    "group_index": 0,
    "retries": 1,
    "root_id": "r",
    "parent_id": "p",
    "ignore_result": True,
    "chord": {"task": "dropin.add"},
    "reply_to": "elsewhere",
    "replaced_task_nesting": 1,
    "route_name": "dropin.other",
}
# Consumed by the drop-in itself: what Celery's send_task does with them
# needs no message field (add_to_parent is honoured in a worker; result_cls
# and task_type pick the AsyncResult class and the task's defaults).
CONSUMED = {"add_to_parent", "result_cls", "task_type"}
FIELD = {"task_id": "id", "group_id": "group"}


@pytest.mark.parametrize("option", celery_apply_async_options())
def test_every_apply_async_option_is_honoured_or_refused(platform, option):
    _, _, web, _ = platform
    import taskgate_client.celery as dropin

    value = SAMPLES.get(option, object())
    options = {option: value}
    if option == "group_index":
        options["group_id"] = "g"
    if option in CONSUMED:
        request, *_ = dropin._active(web.app).request_for("dropin.add", [1, 2], {}, options)
        assert option not in request and option not in request.get("properties", {})
        return
    try:
        request, *_ = dropin._active(web.app).request_for("dropin.add", [1, 2], {}, options)
    except TypeError as refused:
        assert repr(option) in str(refused), refused
        assert option in _REFUSED, f"{option} refused but not listed as refused"
        return
    field = FIELD.get(option, option)
    assert field in request, f"{option} was silently dropped: {request}"
    assert option not in request.get("properties", {})
