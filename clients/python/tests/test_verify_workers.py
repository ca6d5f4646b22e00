"""``taskgate verify-workers`` (``POST /v1/verify-workers``) against a real
gateway, RabbitMQ and stock Celery 5.7 workers: it passes for a worker
configured only through ``configure()``, and fails with the right line for
no worker on the queue, a worker without the result backend, and a worker
on Celery's default exchange (its scheduled tasks never reach the tracking
queue). The failing cases use short timeouts: the report is complete as
soon as what arrived rules the rest out."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import AMQP_URL, Gateway, WorkerProcess, binary, delete_topology, remove_test_dir, require_rabbitmq, unique
from taskgate_client.testing import WorkersNotVerified, assert_workers_verified, verify_workers

HERE = Path(__file__).resolve().parent


class Worker(WorkerProcess):
    """``celery -A <module> worker`` from this directory."""

    def __init__(self, module: str, env: dict, args=()):
        environment = {key: value for key, value in os.environ.items() if not key.startswith(("CELERY_", "TASKGATE_"))}
        environment.update({"CELERY_BROKER_URL": AMQP_URL, **env})
        super().__init__(module, environment, cwd=HERE, args=args, name="taskgate-pytest-verify")


@pytest.fixture
def gateway():
    require_rabbitmq()
    tracking_queue = unique("tg-py-tracking")
    gateway = Gateway(AMQP_URL, sync_queue=tracking_queue)
    gateway.tracking_queue = tracking_queue
    gateway.extra_queues = []
    gateway.extra_exchanges = []
    try:
        gateway.wait_for(lambda health: health["async_available"], 30, "a broker connection")
        # The tracking queue exists once a configured worker declared it;
        # taskgate's consumer waits for it.
        yield gateway
    finally:
        gateway.stop()
        delete_topology([gateway.queue, tracking_queue, *gateway.extra_queues], [gateway.exchange, *gateway.extra_exchanges])
        remove_test_dir(gateway.dir)


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TASKGATE_")}
    return subprocess.run(
        [str(binary()), "verify-workers", "--server", gateway.url, "--config", str(gateway.dir / "taskgate.toml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def checks_of(report: dict) -> dict:
    (queue,) = report["queues"]
    return {check["check"]: check for check in queue["checks"]}


def verdicts(report: dict) -> dict:
    return {name: check["passed"] for name, check in checks_of(report).items()}


def test_a_worker_configured_through_configure_passes(gateway):
    worker = Worker("configured_worker_app", {"TASKGATE_TOPOLOGY": gateway.url + "/v1/topology"})
    try:
        started = time.monotonic()
        printed = cli(gateway, "--timeout", "30")
        assert printed.returncode == 0, f"{printed.stdout}{printed.stderr}\nworker log:\n{worker.log()}\n{gateway.log()}"
        lines = printed.stdout.splitlines()
        assert lines[0].startswith(f"queue {gateway.queue} (probe "), printed.stdout
        for name in ("consumed", "result_stored", "scheduled_task_tracked", "topology_matches"):
            assert any(line.startswith(f"  PASS {name}: ") for line in lines), printed.stdout
        assert lines[-1] == "PASS: 4 checks on 1 queue(s)", printed.stdout
        assert time.monotonic() - started < 30, "a passing verification ends as soon as everything arrived"

        as_json = cli(gateway, "--json", "--timeout", "30")
        assert as_json.returncode == 0, as_json.stdout + as_json.stderr
        report = json.loads(as_json.stdout)
        assert report["passed"] is True and report["timeout_seconds"] == 30
        assert report["queues"][0]["queue"] == gateway.queue
        assert report["queues"][0]["routing_key"] == "taskgate-probe"

        # What a worker repository runs in its own CI.
        assert assert_workers_verified(gateway.url, timeout=30)["passed"] is True
    finally:
        worker.stop()


def test_no_worker_on_the_queue_fails_consumed(gateway):
    printed = cli(gateway, "--timeout", "3")
    assert printed.returncode == 1, printed.stdout + printed.stderr
    assert (
        f"  FAIL consumed: no worker consumed the probe on queue '{gateway.queue}' within 3 s: "
        f"is a worker consuming '{gateway.queue}'" in printed.stdout
    ), printed.stdout
    assert "  FAIL result_stored: not checked: no worker consumed the probe" in printed.stdout
    assert printed.stdout.splitlines()[-1] == "FAIL: 4 of 4 checks on 1 queue(s) failed", printed.stdout

    with pytest.raises(WorkersNotVerified) as failure:
        assert_workers_verified(gateway.url, timeout=2)
    assert "FAIL consumed: no worker consumed the probe" in str(failure.value)


def test_a_worker_without_the_result_backend_fails_result_stored(gateway):
    worker = Worker(
        "probe_worker_app",
        {"PROBE_WORKER_FAULT": "no_result_backend", "TASKGATE_TOPOLOGY": gateway.url + "/v1/topology"},
    )
    try:
        started = time.monotonic()
        report = verify_workers(gateway.url, timeout=10)
        elapsed = time.monotonic() - started
        logs = f"{report}\nworker log:\n{worker.log()}"
        assert report["passed"] is False, logs
        assert verdicts(report) == {
            "consumed": True,
            "result_stored": False,
            "scheduled_task_tracked": True,
            "topology_matches": True,
        }, logs
        detail = checks_of(report)["result_stored"]["detail"]
        assert detail.startswith("the worker stores no result: its result_backend is not set"), detail
        assert elapsed < 10, "the scheduled task said no result would come"
    finally:
        worker.stop()


def test_a_worker_on_the_default_exchange_fails_scheduled_task_tracked(gateway):
    topology = json.loads(
        subprocess.run(
            [str(binary()), "topology", "--config", str(gateway.dir / "taskgate.toml")],
            capture_output=True,
            text=True,
            timeout=30,
            env={key: value for key, value in os.environ.items() if not key.startswith("TASKGATE_")},
        ).stdout
    )
    default_queue = unique("tg-py-default")
    # -Q declares the gateway's queue on a direct exchange of its own name.
    gateway.extra_queues.append(default_queue)
    gateway.extra_exchanges += [gateway.queue, default_queue]
    worker = Worker(
        "probe_worker_app",
        {
            "PROBE_WORKER_FAULT": "default_exchange",
            "TASKGATE_RESULT_BACKEND": topology["result_backend"]["url"],
            "PROBE_WORKER_DEFAULT_QUEUE": default_queue,
        },
        args=["-Q", gateway.queue],
    )
    try:
        printed = cli(gateway, "--timeout", "10")
        logs = f"{printed.stdout}{printed.stderr}\nworker log:\n{worker.log()}"
        assert printed.returncode == 1, logs
        lines = printed.stdout.splitlines()
        assert any(line.startswith("  PASS consumed: ") for line in lines), logs
        assert any(line.startswith("  PASS result_stored: ") for line in lines), logs
        assert (
            "  FAIL scheduled_task_tracked: the task the probe scheduled" in printed.stdout
            and "never reached the tracking queue: the worker publishes to the default exchange '' (direct), "
            f"not the topic exchange '{gateway.exchange}' (topic)" in printed.stdout
        ), logs
        assert (
            f"  FAIL topology_matches: the worker publishes the tasks it schedules to the default exchange '' "
            f"(direct), not exchange '{gateway.exchange}' (topic); queue '{gateway.queue}' is declared on exchange "
            f"'{gateway.queue}' (direct), not exchange '{gateway.exchange}' (topic), with routing key "
            f"'{gateway.queue}', not '#'" in printed.stdout
        ), logs
    finally:
        worker.stop()
