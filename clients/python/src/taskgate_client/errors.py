"""The exceptions the client raises.

Two outcomes matter to a caller, and each has its own class:

* :class:`TaskRejected`: taskgate answered and refused (bad arguments, an
  unknown task, a full outbox). It carries the RFC 9457 problem details, so
  the caller can show ``detail`` or check ``field`` and ``type``.
* :class:`GatewayUnavailable`: taskgate could not be asked (connection
  refused, timed out, reset, or a proxy in front of it answered 5xx without
  problem details). Nothing is known about the task: retry it with the same
  ``idempotency_key`` to be sure it is enqueued once.

Both derive from :class:`TaskgateError`, as does any other unexpected answer.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

PROBLEM_TYPE_PREFIX = "urn:taskgate:problem:"


class TaskgateError(Exception):
    """Base class of everything this client raises."""


class GatewayUnavailable(TaskgateError):
    """taskgate could not be reached or did not answer in time."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"taskgate at {url} is unavailable: {reason}")
        self.url = url
        self.reason = reason


class TaskRejected(TaskgateError):
    """taskgate refused the request; ``problem`` holds the problem details."""

    def __init__(self, problem: Mapping[str, Any], retry_after: Optional[int] = None) -> None:
        self.problem = dict(problem)
        self.status: int = int(self.problem.get("status") or 0)
        self.type: str = str(self.problem.get("type") or "about:blank")
        self.title: str = str(self.problem.get("title") or "Rejected")
        self.detail: str = str(self.problem.get("detail") or "")
        self.field: Optional[str] = self.problem.get("field")
        self.errors: list = list(self.problem.get("errors") or [])
        self.retry_after = retry_after
        message = f"{self.title} ({self.status}): {self.detail}"
        if self.field:
            message += f" [field {self.field}]"
        super().__init__(message)

    @property
    def slug(self) -> str:
        """The problem type without its URN prefix: ``argument-binding``, ``outbox-full``, ..."""
        return self.type[len(PROBLEM_TYPE_PREFIX) :] if self.type.startswith(PROBLEM_TYPE_PREFIX) else self.type

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later (503, 429): the
        outbox was full or could not be written."""
        return self.status in (429, 503)
