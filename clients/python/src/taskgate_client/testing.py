"""Worker verification for a worker repository's own CI: a pytest plugin.

Runs ``POST /v1/verify-workers`` on a running gateway (the same as
``taskgate verify-workers``): a probe task per queue proves that a worker
consumes it, that its result reaches ``celery_taskmeta``, that a task it
schedules itself reaches the tracking queue and table, and that its
exchange and queue declarations match the topology. The worker must
register the probe (``taskgate_client.worker.configure`` does, or
``register_probe(app)``)::

    # conftest.py
    pytest_plugins = ["taskgate_client.testing"]

    # test_worker_wiring.py
    def test_workers_match_taskgate(taskgate_verify_workers):
        taskgate_verify_workers()  # fails with the report's FAIL lines

The fixture reads ``--taskgate-url`` (or ``TASKGATE_URL``, default
``http://127.0.0.1:7439``) and ``TASKGATE_ADMIN_TOKEN``.
:func:`verify_workers` and :func:`assert_workers_verified` work without
pytest.

Invariant: a failed check always fails the test with every check's line;
an unreachable gateway or a refused request fails it too, never skips.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Optional, Sequence

from .client import DEFAULT_URL

__all__ = ["WorkersNotVerified", "assert_workers_verified", "render_report", "verify_workers"]


class WorkersNotVerified(AssertionError):
    """A check failed, or the verification could not run; ``report`` holds
    the gateway's report when there is one."""

    def __init__(self, message: str, report: Optional[dict] = None):
        super().__init__(message)
        self.report = report


def verify_workers(
    url: str = DEFAULT_URL,
    token: Optional[str] = None,
    timeout: float = 30,
    queues: Optional[Sequence[str]] = None,
) -> dict:
    """The gateway's report (``{"passed": ..., "queues": [...]}``), passed
    or not. Raises :class:`WorkersNotVerified` when no report came back."""
    body = {"timeout_seconds": int(timeout)}
    if queues:
        body["queues"] = list(queues)
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/verify-workers",
        data=json.dumps(body).encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        # The gateway holds the request for up to `timeout` seconds.
        with opener.open(request, timeout=timeout + 30) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")
        raise WorkersNotVerified(f"taskgate refused the verification ({error.code}): {detail}") from None
    except (OSError, ValueError) as error:
        raise WorkersNotVerified(f"cannot verify the workers through taskgate at {url}: {error}") from None


def render_report(report: dict) -> str:
    """One line per check, as ``taskgate verify-workers`` prints them."""
    lines = []
    for queue in report.get("queues", []):
        lines.append(f"queue {queue['queue']} (probe {queue['probe_id']}, routing key '{queue['routing_key']}')")
        for check in queue.get("checks", []):
            verdict = "PASS" if check["passed"] else "FAIL"
            lines.append(f"  {verdict} {check['check']}: {check['detail']}")
    return "\n".join(lines)


def assert_workers_verified(
    url: str = DEFAULT_URL,
    token: Optional[str] = None,
    timeout: float = 30,
    queues: Optional[Sequence[str]] = None,
) -> dict:
    """:func:`verify_workers`, raising :class:`WorkersNotVerified` with the
    report's lines unless every check passed; returns the report."""
    report = verify_workers(url, token=token, timeout=timeout, queues=queues)
    if not report.get("passed"):
        raise WorkersNotVerified("taskgate verify-workers failed:\n" + render_report(report), report)
    return report


def pytest_addoption(parser):
    parser.addoption(
        "--taskgate-url",
        default=None,
        help="taskgate's base URL for taskgate_verify_workers (default: $TASKGATE_URL or " + DEFAULT_URL + ")",
    )


try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def taskgate_verify_workers(request):
        """A function running the verification against the configured
        gateway; it fails the test with the report's lines (keyword
        arguments as :func:`assert_workers_verified`)."""
        url = request.config.getoption("--taskgate-url", default=None) or os.environ.get("TASKGATE_URL") or DEFAULT_URL
        token = os.environ.get("TASKGATE_ADMIN_TOKEN") or None

        def run(timeout: float = 30, queues: Optional[Sequence[str]] = None, **overrides) -> dict:
            options = {"url": url, "token": token, **overrides}
            try:
                return assert_workers_verified(timeout=timeout, queues=queues, **options)
            except WorkersNotVerified as failure:
                pytest.fail(str(failure), pytrace=False)

        return run
