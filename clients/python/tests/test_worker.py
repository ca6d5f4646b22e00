"""A worker configured only through ``taskgate_client.worker.configure``
(from ``GET /v1/topology``) consumes taskgate's tasks, stores its results
where taskgate reads them, and the tasks it schedules itself (straight
through the broker) reach the tracking queue and the tracking table.
``taskgate topology --format celery`` prints the same settings for a worker
that reads a file."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

from conftest import AMQP_URL, Gateway, WorkerProcess, binary, delete_topology, remove_test_dir, require_rabbitmq, unique
from taskgate_client.worker import TopologyError, celery_settings, load_topology

HERE = Path(__file__).resolve().parent


def get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.loads(response.read().decode("utf-8"))


class ConfiguredWorker(WorkerProcess):
    """``celery -A configured_worker_app worker``: no -Q, no queues of its own."""

    def __init__(self, topology: str, module: str = "configured_worker_app", extra_env: Optional[dict] = None):
        env = {key: value for key, value in os.environ.items() if not key.startswith("CELERY_")}
        env.update({"CELERY_BROKER_URL": AMQP_URL, "TASKGATE_TOPOLOGY": topology, **(extra_env or {})})
        super().__init__(module, env, cwd=HERE, name="taskgate-pytest-configured")


def wait_for(read, done, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = read()
        if done(last):
            return last
        time.sleep(0.2)
    pytest.fail(f"never {what}; last: {last}\n{log()}", pytrace=False)


def test_a_worker_configured_from_the_topology_runs_tasks_and_its_scheduled_tasks_are_tracked():
    require_rabbitmq()
    tracking_queue = unique("tg-py-tracking")
    gateway = Gateway(AMQP_URL, sync_queue=tracking_queue)
    worker = None
    try:
        gateway.wait_for(lambda health: health["async_available"], 30, "a broker connection")
        topology = get_json(gateway.url + "/v1/topology")
        assert topology["exchange"] == {"name": gateway.exchange, "type": "topic", "durable": True}
        assert topology["queues"] == [{"name": gateway.queue, "binding_key": "#", "durable": True}]
        assert topology["tracking_queue"] == {"name": tracking_queue, "binding_key": "#", "durable": True}
        assert topology["result_backend"]["url"] == "db+sqlite:///" + str(gateway.dir / "tracking.db")
        assert "guest:guest" not in json.dumps(topology), "no secret in the topology"

        worker = ConfiguredWorker(gateway.url + "/v1/topology")
        client = gateway.client(timeout=5)
        logs = lambda: f"worker log:\n{worker.log()}\ntaskgate log:\n{gateway.log()}"  # noqa: E731

        def succeeded(task_id):
            return wait_for(
                lambda: client.get_task(task_id),
                lambda task: task is not None and (task.get("result") or {}).get("status") == "SUCCESS",
                60,
                f"a result for {task_id}",
                logs,
            )

        added = client.send_task("probe.add", args=[2, 3])
        assert succeeded(added)["result"]["result"] == 5, "the result reached taskgate's database"

        parent = client.send_task("probe.schedule", args=[41])
        child = succeeded(parent)["result"]["result"]
        scheduled = wait_for(
            lambda: client.get_task(child),
            lambda task: task is not None
            and task.get("tracking") is not None
            and (task.get("result") or {}).get("status") == "SUCCESS",
            60,
            f"the self-scheduled task {child} tracked and run",
            logs,
        )
        assert scheduled["result"]["result"] == 42
        assert scheduled["tracking"]["parent_id"] == parent, scheduled["tracking"]

        # The same settings for a worker that reads a file.
        config = gateway.dir / "taskgate.toml"
        printed = subprocess.run(
            [str(binary()), "topology", "--format", "celery", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env={key: value for key, value in os.environ.items() if not key.startswith("TASKGATE_")},
        )
        assert printed.returncode == 0, printed.stderr
        from_cli = json.loads(printed.stdout)
        assert from_cli == get_json(gateway.url + "/v1/topology?format=celery")
        assert celery_settings(load_topology(topology)) == from_cli
    finally:
        if worker is not None:
            worker.stop()
        gateway.stop()
        delete_topology([gateway.queue, tracking_queue], [gateway.exchange])
        remove_test_dir(gateway.dir)


def test_an_unreadable_topology_is_an_error_not_a_half_configured_worker(tmp_path):
    with pytest.raises(TopologyError):
        load_topology(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TopologyError):
        load_topology(broken)
    with pytest.raises(TopologyError):
        celery_settings({"queues": []})
