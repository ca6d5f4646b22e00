"""The client against a real taskgate: ids, options, batches, refusals with
problem details, task state, health, and the unavailable cases (refused,
blackholed, spooling) where ``is_async_available`` must say False without
raising."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socket
import threading
import time
import uuid

import pytest

from taskgate_client import Client, GatewayUnavailable, TaskgateError, TaskRejected, build_request


def wait_for_state(client: Client, task_id: str, state: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = client.get_task(task_id)
        if task and task["state"] == state:
            return task
        assert time.monotonic() < deadline, f"task {task_id} never became {state}: {task}"
        time.sleep(0.1)


def test_send_task_returns_the_id_of_a_durable_task_that_gets_published(client):
    task_id = client.send_task("tests.record", args=[1, "two"], kwargs={"three": 3})
    assert str(uuid.UUID(task_id)) == task_id
    task = wait_for_state(client, task_id, "published")
    assert task["task"] == "tests.record"
    assert task["id"] == task_id


def test_celery_options_map_onto_the_request(client):
    chosen = uuid.uuid4()
    # Naive: UTC. (Within RabbitMQ's 2^32 ms limit on a message expiration.)
    expires = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(days=1)
    task_id = client.send_task(
        "tests.record",
        (1,),
        task_id=chosen,
        countdown=30,
        priority=3,
        expires=expires,
        creator_id="u1",
    )
    assert task_id == str(chosen)
    request = build_request("t.x", (1,), None, task_id=chosen, expires=dt.datetime(2099, 1, 1), creator_id="u1")
    assert request["id"] == str(chosen)
    assert request["expires"] == "2099-01-01T00:00:00+00:00"  # naive means UTC, as in Celery
    assert request["properties"] == {"creator_id": "u1"}
    assert request["args"] == [1]
    # A number of seconds, as Celery reads `expires=`: sent as seconds,
    # which taskgate counts from acceptance; a timedelta is the same.
    assert build_request("t.x", expires=60)["expires"] == 60
    assert build_request("t.x", expires=dt.timedelta(minutes=1))["expires"] == 60.0


def test_options_taskgate_cannot_honour_are_refused_before_sending():
    for option, value in [
        ("serializer", "pickle"),
        ("compression", "zlib"),
        ("connection", object()),
        ("producer", object()),
        ("retry", True),
        ("retry_policy", {"max_retries": 3}),
        ("chord", {"task": "t.body"}),
        ("add_to_parent", True),
        ("exchange_type", "direct"),
        ("reply_to", "somewhere"),
        ("correlation_id", "x"),
        ("expiration", 10),
    ]:
        with pytest.raises(TypeError, match=repr(option)):
            build_request("t.x", **{option: value})
    # What taskgate does anyway is no refusal.
    assert build_request("t.x", serializer="json", delivery_mode=2, retry=None) == {"task": "t.x", "args": [], "kwargs": {}}
    with pytest.raises(TypeError, match="property 'reply_to'"):
        build_request("t.x", properties={"reply_to": "q"})
    with pytest.raises(TypeError, match="'link'.*chain"):
        build_request("t.x", link={"task": "t.y", "subtask_type": "chain"})
    with pytest.raises(TypeError, match="args"):
        build_request("t.x", args="not a list")
    with pytest.raises(TypeError, match="not JSON serializable"):
        Client("http://127.0.0.1:9").send_task("t.x", args=[object()])


def test_unknown_options_are_message_properties_and_properties_stay_properties():
    request = build_request("t.x", creator_id="u1", properties={"queue": "not a field", "related_object_id": "p1"})
    assert "queue" not in request
    assert request["properties"] == {"creator_id": "u1", "queue": "not a field", "related_object_id": "p1"}


def test_signatures_and_the_other_celery_fields_are_sent_in_taskgates_shape():
    request = build_request(
        "t.x",
        link={"task": "t.done", "args": (1,)},
        link_error=[{"task": "t.failed", "immutable": True}],
        chain=[{"task": "t.second"}, {"task": "t.third", "options": {"queue": "q"}}],
        shadow="alias",
        headers={"x_trace": "abc"},
        ignore_result=True,
        retries=2,
        queue="export",
        exchange="tasks",
        group_id="g1",
        group_index=0,
        time_limit=dt.timedelta(seconds=30),
    )
    plain = {"args": [], "kwargs": {}, "options": {}, "subtask_type": None, "immutable": False}
    assert request["link"] == dict(plain, task="t.done", args=[1])
    assert request["link_error"] == [dict(plain, task="t.failed", immutable=True)]
    assert request["chain"] == [dict(plain, task="t.second"), dict(plain, task="t.third", options={"queue": "q"})]
    assert request["group"] == "g1" and request["group_index"] == 0
    assert request["time_limit"] == 30.0
    for field, value in [("shadow", "alias"), ("headers", {"x_trace": "abc"}), ("ignore_result", True),
                         ("retries", 2), ("queue", "export"), ("exchange", "tasks")]:
        assert request[field] == value, field


def test_a_group_is_enqueued_whole_with_its_id_and_positions(client):
    group_id, ids = client.send_group([("tests.record", [1]), {"name": "tests.record", "args": [2]}])
    assert str(uuid.UUID(group_id)) == group_id and len(ids) == 2
    for task_id in ids:
        assert client.get_task(task_id)["task"] == "tests.record"
    chosen = str(uuid.uuid4())
    assert client.send_group([("tests.record", [3])], group_id=chosen)[0] == chosen
    key = f"group-{uuid.uuid4()}"
    first = client.send_group([("tests.record", [4])], idempotency_key=key)
    assert client.send_group([("tests.record", [4])], idempotency_key=key) == first, "a retry names the same group"
    with pytest.raises(TypeError, match="group_index"):
        client.send_group([{"name": "tests.record", "group_index": 3}])
    with pytest.raises(TaskRejected) as refused:
        client.send_group([("tests.record", [5]), {"name": "tests.record", "task_id": "not a uuid"}])
    assert refused.value.status == 422 and refused.value.field.startswith("tasks[1]")


def test_idempotency_key_gives_the_first_answer_again(client):
    key = f"export-{uuid.uuid4()}"
    first = client.send_task("tests.record", args=[1], idempotency_key=key)
    again = client.send_task("tests.record", args=[1], idempotency_key=key)
    assert first == again


def test_send_tasks_is_all_or_nothing(client):
    ids = client.send_tasks(
        [
            {"name": "tests.record", "args": [1]},
            ("tests.record", [2], {"k": "v"}),
        ]
    )
    assert len(ids) == 2 and len(set(ids)) == 2
    assert client.send_tasks([]) == []

    survivor = str(uuid.uuid4())
    with pytest.raises(TaskRejected) as raised:
        client.send_tasks(
            [
                {"name": "tests.record", "task_id": survivor},
                {"name": "export.project", "args": ["only-the-org"]},
            ]
        )
    assert raised.value.status == 422
    assert raised.value.field.startswith("tasks[1]")
    assert client.get_task(survivor) is None, "a refused batch wrote nothing"


def test_refusals_carry_the_problem_details(client):
    with pytest.raises(TaskRejected) as raised:
        client.send_task("export.project", args=["org"], kwargs={"output_typ": "xls"})
    rejected = raised.value
    assert rejected.status == 422
    assert rejected.slug == "argument-binding"
    assert rejected.type == "urn:taskgate:problem:argument-binding"
    assert rejected.field and rejected.field.startswith("kwargs")
    assert "output_typ" in rejected.detail
    assert rejected.problem["title"] == rejected.title
    assert not rejected.retryable
    assert "output_typ" in str(rejected)

    reused = client.send_task("tests.record")
    with pytest.raises(TaskRejected) as raised:
        client.send_task("tests.record", task_id=reused)
    assert raised.value.status == 409 and raised.value.field == "id"


def test_a_gateway_with_a_submit_token_accepts_tasks_only_with_it(token_gateway):
    token = token_gateway.submit_token
    for client in (token_gateway.client(timeout=5), token_gateway.client(timeout=5, token="not-" + token)):
        with pytest.raises(TaskRejected) as raised:
            client.send_task("tests.record", args=["refused"])
        assert raised.value.status == 401
        assert raised.value.slug == "submit-token-required"
        with pytest.raises(TaskRejected) as raised:
            client.send_tasks([("tests.record", ["refused"])])
        assert raised.value.status == 401
        # Reads need no token.
        assert client.health()["status"] in ("pass", "warn", "fail")
    client = token_gateway.client(timeout=5, token=token)
    accepted = client.send_task("tests.record", args=["with the token"])
    assert client.get_task(accepted)["state"] == "queued"
    assert len(client.send_tasks([("tests.record", [1]), ("tests.record", [2])])) == 2
    with pytest.raises(ValueError):
        Client(token_gateway.url, token="two\nlines")


def test_get_task_of_an_unknown_id_is_none(client):
    assert client.get_task(uuid.uuid4()) is None
    assert client.get_task("not-a-uuid") is None


def test_health_and_availability_of_a_connected_gateway(client, gateway):
    health = client.health()
    assert health["status"] in ("pass", "warn")
    assert health["async_available"] is True, f"{health}\n{gateway.log()}"
    assert "broker:connection" in health["checks"]
    assert client.is_async_available() is True


def test_an_unreachable_gateway(closed_url):
    client = Client(closed_url, timeout=2)
    with pytest.raises(GatewayUnavailable) as raised:
        client.send_task("tests.record")
    assert closed_url in str(raised.value)
    with pytest.raises(GatewayUnavailable):
        client.health()
    with pytest.raises(GatewayUnavailable):
        client.get_task(uuid.uuid4())
    started = time.monotonic()
    assert client.is_async_available() is False
    assert time.monotonic() - started < 1


@pytest.fixture
def blackhole():
    """A port that accepts TCP connections (the kernel's backlog) and never
    answers: a hung gateway."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def test_a_gateway_that_never_answers_times_out(blackhole):
    client = Client(blackhole, timeout=0.5, availability_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(GatewayUnavailable, match="no answer within 0.5"):
        client.send_task("tests.record")
    assert time.monotonic() - started < 2
    started = time.monotonic()
    assert client.is_async_available() is False
    assert time.monotonic() - started < 1.5


def test_a_spooling_gateway_accepts_then_refuses_with_retry_after(spooling_gateway):
    """No broker: tasks are accepted (spooled) while the outbox has room, the
    UI is told async work is unavailable, and a full outbox is a retryable
    refusal, never a hang."""
    client = spooling_gateway.client(timeout=5)
    spooling_gateway.wait_for(lambda health: health["status"] == "warn", 20, "warn (spooling)")
    assert client.is_async_available() is False
    accepted = client.send_task("tests.record", args=["spooled"])
    assert client.get_task(accepted)["state"] == "queued"
    with pytest.raises(TaskRejected) as raised:
        for _ in range(100):
            client.send_task("tests.record", args=["x" * 500])
    assert raised.value.status == 503
    assert raised.value.slug == "outbox-full"
    assert raised.value.retryable
    assert raised.value.retry_after and raised.value.retry_after > 0


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    hits = 0
    body = b'{"status": "pass", "async_available": true, "checks": {}}'
    content_type = "application/health+json"

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def counting_server():
    handler = type("Handler", (_HealthHandler,), {"hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_availability_is_cached_for_the_ttl(counting_server):
    handler, url = counting_server
    client = Client(url, availability_ttl=0.3)
    assert [client.is_async_available() for _ in range(5)] == [True] * 5
    assert handler.hits == 1
    time.sleep(0.35)
    assert client.is_async_available() is True
    assert handler.hits == 2
    # Concurrent callers after expiry share one probe.
    time.sleep(0.35)
    threads = [threading.Thread(target=client.is_async_available) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert handler.hits == 3


def test_availability_is_false_for_anything_but_a_health_document_saying_so(counting_server):
    handler, url = counting_server
    handler.body = json.dumps({"status": "warn", "async_available": False, "checks": {}}).encode()
    assert Client(url).is_async_available() is False
    handler.body, handler.content_type = b"<html>proxy error</html>", "text/html"
    client = Client(url)
    assert client.is_async_available() is False
    with pytest.raises(TaskgateError):
        client.health()


def test_task_events_yield_the_state_as_it_is_known(client):
    events = client.task_events("no-worker-wrote-this-one", timeout=10)
    first = next(events)
    assert first["status"] == "PENDING" and first["result"] is None
    events.close()
