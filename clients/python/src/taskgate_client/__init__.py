"""taskgate_client: send Celery tasks through taskgate from Python.

taskgate is the local gateway that makes each task durable before it
answers and publishes it to RabbitMQ or SQS in the background, so the
platform never waits on the broker::

    from taskgate_client import Client, TaskRejected, GatewayUnavailable

    taskgate = Client("http://127.0.0.1:7439", timeout=5)
    task_id = taskgate.send_task("export.project", args=["org", "proj"],
                                 kwargs={"output_type": "xls"}, creator_id="u1")
    taskgate.get_task(task_id)["state"]        # "queued", "published", "dead_letter"
    taskgate.is_async_available()              # cached; False (never raises) when taskgate is away

Django: see :mod:`taskgate_client.django`. Only the standard library is used.
"""

from .client import DEFAULT_URL, Client, build_request, signature_dict
from .errors import GatewayUnavailable, TaskgateError, TaskRejected

__all__ = [
    "DEFAULT_URL",
    "Client",
    "GatewayUnavailable",
    "TaskRejected",
    "TaskgateError",
    "build_request",
    "signature_dict",
]
__version__ = "0.1.0"
