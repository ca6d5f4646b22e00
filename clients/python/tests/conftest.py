"""Fixtures: the real taskgate binary against the real RabbitMQ, and a stock
Celery worker from tests/support/celery_app.py.

* ``TASKGATE_BINARY``: the binary (default: ``$CARGO_TARGET_DIR/debug/taskgate``,
  else ``/var/tmp/taskgate-target/debug/taskgate``); ``cargo test`` builds it.
* ``TASKGATE_TEST_AMQP_URL``: RabbitMQ (default guest on 127.0.0.1:5672).

Every gateway gets its own data directory, exchange and queue names, so runs
do not see each other's messages. A missing binary or broker fails the
session with a hint; it never skips (``scripts/test`` starts RabbitMQ).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Optional

import pytest

from taskgate_client import Client

REPO = Path(__file__).resolve().parents[3]
SUPPORT = REPO / "tests" / "support"
AMQP_URL = os.environ.get("TASKGATE_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2f"
# Nothing listens here: a gateway pointed at it spools, and a client
# pointed at it cannot connect.
CLOSED_PORT_URL = "amqp://127.0.0.1:1/%2f"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def binary() -> Path:
    explicit = os.environ.get("TASKGATE_BINARY")
    if explicit:
        path = Path(explicit)
    else:
        target = os.environ.get("CARGO_TARGET_DIR") or "/var/tmp/taskgate-target"
        path = Path(target) / "debug" / "taskgate"
    if not os.access(path, os.X_OK):
        pytest.fail(f"taskgate binary {path} not found: run `cargo build` (or set TASKGATE_BINARY)", pytrace=False)
    return path


def require_rabbitmq() -> None:
    parsed = urllib.parse.urlparse(AMQP_URL)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 5672), timeout=2).close()
    except OSError as error:
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL} ({error}); scripts/test starts it", pytrace=False)


def toml_value(value) -> str:
    return json.dumps(value)  # strings, numbers and booleans spell the same in TOML


class Gateway:
    """A running ``taskgate serve`` on a free port."""

    def __init__(
        self,
        broker_url: str,
        *,
        max_bytes: int = 64 << 20,
        registry=(),
        strict: bool = False,
        submit_token: str = "",
        sync_queue: Optional[str] = None,
    ):
        self.dir = Path(tempfile.mkdtemp(prefix="taskgate-pytest-"))
        self.submit_token = submit_token
        self.exchange = unique("tg-py-exchange")
        self.queue = unique("tg-py")
        lines = [
            'environment = "development"',
            "[http]",
            'listen = "127.0.0.1:0"',
            "shutdown_grace_ms = 3000",
            f"submit_token = {toml_value(submit_token)}",
            "[broker]",
            f"url = {toml_value(broker_url)}",
            "connect_timeout_ms = 1000",
            "publish_timeout_ms = 2000",
            "reconnect_min_ms = 100",
            "reconnect_max_ms = 500",
            "[breaker]",
            "open_min_ms = 200",
            "open_max_ms = 1000",
            "[routing]",
            f"exchange = {toml_value(self.exchange)}",
            "[[routing.queues]]",
            f"name = {toml_value(self.queue)}",
            'binding_key = "#"',
            "[outbox]",
            f"path = {toml_value(str(self.dir / 'outbox'))}",
            f"max_bytes = {max_bytes}",
            "[tracking]",
            f"database_url = {toml_value('sqlite://' + str(self.dir / 'tracking.db'))}",
            *([f"sync_queue = {toml_value(sync_queue)}"] if sync_queue else []),
            "[registry]",
            f"strict = {'true' if strict else 'false'}",
        ]
        for name, params in registry:
            lines += ["[[registry.tasks]]", f"name = {toml_value(name)}", f"params = {json.dumps(list(params))}"]
        config = self.dir / "taskgate.toml"
        config.write_text("\n".join(lines) + "\n")
        # taskgate reads every TASKGATE_* variable as a setting: hand it none
        # of the test runner's (TASKGATE_VENV, TASKGATE_BINARY).
        env = {key: value for key, value in os.environ.items() if not key.startswith("TASKGATE_")}
        env["RUST_LOG"] = "info,lapin=warn"
        self.log_path = self.dir / "taskgate.log"
        self.process = subprocess.Popen(
            [str(binary()), "serve", "--config", str(config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        found = threading.Event()
        self.address = None

        def pump():
            with open(self.log_path, "w") as log:
                for line in self.process.stderr:
                    log.write(line)
                    log.flush()
                    match = re.search(r"address=(\S+)", line)
                    if match and not found.is_set():
                        self.address = match.group(1)
                        found.set()

        threading.Thread(target=pump, name="taskgate-log", daemon=True).start()
        if not found.wait(30):
            self.stop()
            pytest.fail(f"taskgate did not start listening; log:\n{self.log()}", pytrace=False)
        self.url = f"http://{self.address}"

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def client(self, **options) -> Client:
        return Client(self.url, **options)

    def wait_for(self, predicate, timeout: float, what: str):
        client = self.client(timeout=2)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = client.health()
            if predicate(last):
                return last
            time.sleep(0.1)
        pytest.fail(f"taskgate never got {what}; last health: {last}\nlog:\n{self.log()}", pytrace=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def delete_topology(queues, exchanges) -> None:
    """Best effort, with kombu from the test virtualenv."""
    try:
        from kombu import Connection

        with Connection(AMQP_URL, connect_timeout=3) as connection:
            channel = connection.default_channel
            for queue in queues:
                channel.queue_delete(queue)
            for exchange in exchanges:
                channel.exchange_delete(exchange)
    except Exception as error:  # noqa: BLE001 - cleanup must not mask the test's outcome
        print(f"cleanup of {queues} {exchanges} failed: {error}", file=sys.stderr)


def remove_test_dir(path: Path) -> None:
    """A stopped process's directory (outbox, logs) is removed: a failure
    already quoted the log it needed. KEEP_TEST_DIRS=1 keeps them."""
    if not os.environ.get("KEEP_TEST_DIRS"):
        shutil.rmtree(path, ignore_errors=True)


REGISTRY = [("export.project", ["org_slug", "project_slug", "output_type?"])]


@pytest.fixture(scope="session")
def gateway():
    """taskgate connected to RabbitMQ, with a registry entry for export.project."""
    require_rabbitmq()
    gateway = Gateway(AMQP_URL, registry=REGISTRY)
    try:
        gateway.wait_for(lambda health: health["async_available"], 30, "a broker connection")
        yield gateway
    finally:
        gateway.stop()
        delete_topology([gateway.queue], [gateway.exchange])
        remove_test_dir(gateway.dir)


@pytest.fixture(scope="session")
def spooling_gateway():
    """taskgate with no broker at all and a tiny outbox: it accepts until the
    outbox is full, and reports async work unavailable."""
    gateway = Gateway(CLOSED_PORT_URL, max_bytes=4096)
    try:
        yield gateway
    finally:
        gateway.stop()
        remove_test_dir(gateway.dir)


SUBMIT_TOKEN = "pytest-submit-token-0123456789abcdef"


@pytest.fixture(scope="session")
def token_gateway():
    """taskgate with no broker that accepts tasks only with SUBMIT_TOKEN."""
    gateway = Gateway(CLOSED_PORT_URL, submit_token=SUBMIT_TOKEN)
    try:
        yield gateway
    finally:
        gateway.stop()
        remove_test_dir(gateway.dir)


@pytest.fixture
def client(gateway) -> Client:
    return gateway.client(timeout=5)


@pytest.fixture
def closed_url() -> str:
    """An address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class WorkerProcess:
    """``python -m celery -A MODULE worker`` (solo pool, no gossip, mingle or
    heartbeat) in ``cwd``, ready before the constructor returns, or the test
    fails with its log. ``stop`` kills its whole process group and removes
    its directory (``self.dir``, where ``worker.log`` is)."""

    def __init__(self, module: str, env: dict, *, cwd: Path, args=(), name: str = "taskgate-pytest", directory=None):
        self.dir = directory or Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.log_path = self.dir / "worker.log"
        command = [sys.executable, "-m", "celery", "-A", module, "worker", "--pool=solo", "-n", f"{unique(name)}@%h"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info", *args]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env={**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not any(line.rstrip().endswith(" ready.") for line in self.log().splitlines()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log()  # stop() removes the directory
                self.stop()
                pytest.fail(f"celery worker {module} did not get ready; log:\n{log}", pytrace=False)
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            # The whole process group, at once: a solo worker only notices
            # SIGTERM between tasks, and acks_late redelivers anything unfinished.
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        remove_test_dir(self.dir)


class CeleryWorker(WorkerProcess):
    """``celery -A celery_app worker`` on the gateway's exchange and queue."""

    def __init__(self, gateway: Gateway):
        directory = Path(tempfile.mkdtemp(prefix="taskgate-pytest-celery-"))
        self.records_path = directory / "records.jsonl"
        env = dict(os.environ)
        env.update(
            {
                "CELERY_BROKER_URL": AMQP_URL,
                "CELERY_QUEUES": gateway.queue,
                "CELERY_BINDINGS": "#",
                "TASKGATE_TEST_EXCHANGE": gateway.exchange,
                "TASKGATE_TEST_RECORD": str(self.records_path),
                "TASKGATE_TEST_PARENT_PID": str(os.getpid()),
            }
        )
        super().__init__(
            "celery_app", env, cwd=SUPPORT, args=["--concurrency=1", "-Q", gateway.queue], directory=directory
        )

    def records(self) -> list:
        try:
            text = self.records_path.read_text()
        except FileNotFoundError:
            return []
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_for_ids(self, ids, timeout: float = 30) -> dict:
        """Waits until a record exists for every id; returns them by id."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            by_id = {record["id"]: record for record in self.records() if record["id"] in wanted}
            if len(by_id) == len(wanted):
                return by_id
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"celery ran {sorted(by_id)} of {sorted(wanted)}; worker log:\n{self.log()}", pytrace=False
                )
            time.sleep(0.1)

@pytest.fixture(scope="session")
def celery_worker(gateway):
    worker = CeleryWorker(gateway)
    try:
        yield worker
    finally:
        worker.stop()
        remove_test_dir(worker.dir)
