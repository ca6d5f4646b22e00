"""The Celery drop-in: one line makes a Celery app enqueue through taskgate.

In the platform's Celery module, after the app is configured::

    import taskgate_client.celery
    taskgate_client.celery.install(app, url="http://127.0.0.1:7439")

From then on every ``task.delay()``, ``task.apply_async()``,
``app.send_task()``, ``signature.delay()``, ``chain(...).delay()`` and
``group(...).delay()`` of that app is a request to taskgate, which makes the
task durable before it answers and publishes it to RabbitMQ or SQS itself.
The caller gets Celery's own ``AsyncResult`` (``GroupResult`` for a group),
so ``result.id``, ``result.state`` and ``result.get()`` read the result
backend as before.

What this module owns, and its invariants:

* **No broker connection in the web process.** ``app.send_task`` is
  replaced (Celery's ``Task.apply_async`` and the canvas end in it), and
  ``group.apply_async`` is intercepted because Celery's own opens a producer
  before sending its members. ``broker_url`` may point at a broker that is
  down or absent: nothing here connects to it (unless
  ``on_unavailable="broker"`` and taskgate is unreachable).
* **A group is all or nothing.** Its members go in one ``POST /v1/groups``
  (one flush), each with the group id and its position, so a group is
  never half enqueued.
* **Nothing is silently dropped.** Every option Celery passes is sent to
  taskgate, is a value taskgate gives anyway (``serializer="json"``, the
  thread's ``reply_to`` Celery adds to every frozen signature), or raises
  TypeError naming it (:func:`taskgate_client.client.build_request`).
  Chords go in one ``POST /v1/groups`` with their body; taskgate sends
  Celery's ``celery.chord_unlock`` that applies it.
* **Routing is taskgate's.** Celery's ``task_routes`` and
  ``task_default_queue`` are not consulted in the web process: taskgate
  routes by its registry and ``[routing]`` (explicit ``queue=`` and
  ``routing_key=`` are sent). :func:`install` warns when ``task_routes`` is set.
* **Workers and beat keep their broker.** A process that starts a Celery
  worker or beat for this app (the ``worker_init`` and ``beat_init``
  signals) gets the app's own ``send_task`` back, so tasks scheduled from
  inside tasks go straight through the worker's broker connection, as
  before (``in_workers="taskgate"`` keeps the drop-in there too).
* **taskgate unreachable** (:class:`GatewayUnavailable`: refused, timed
  out) is the caller's to see: ``on_unavailable="raise"`` (the default)
  raises it; ``"broker"`` publishes with Celery's own ``send_task`` instead
  (needs the broker, and gives up taskgate's durability for that call); a
  callable ``f(error, name, args, kwargs, options)`` decides (return an
  AsyncResult or raise). A refusal (:class:`TaskRejected`: bad arguments,
  outbox full) is always raised: it is an answer, not an outage.
"""

from __future__ import annotations

import contextvars
import threading
import uuid
import warnings
import weakref
from typing import Any, Callable, Optional, Union

from .client import DEFAULT_URL, Client, _Built, build_request
from .errors import GatewayUnavailable

__all__ = ["install", "uninstall", "installed"]

OnUnavailable = Union[str, Callable[..., Any]]

_lock = threading.Lock()
_dropins: "weakref.WeakKeyDictionary[Any, _DropIn]" = weakref.WeakKeyDictionary()
# While a group is being sent, send_task collects its members here instead
# of posting each: the group goes in one request.
_collecting: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("taskgate_group", default=None)
_canvas_patched = False

_CHORD_REFUSAL = (
    "a chord as a group option is not supported through taskgate: call the chord itself "
    "(chord(header)(body) or chord(header, body).delay())"
)


def install(
    app: Any,
    url: str = DEFAULT_URL,
    *,
    client: Optional[Client] = None,
    timeout: float = 5.0,
    token: Optional[str] = None,
    on_unavailable: OnUnavailable = "raise",
    in_workers: str = "broker",
) -> Client:
    """Sends every task of ``app`` through taskgate; returns the client used.

    :param url: taskgate's address (ignored when ``client`` is given).
    :param on_unavailable: ``"raise"`` (GatewayUnavailable), ``"broker"``
        (publish with Celery's own send_task), or a callable
        ``f(error, name, args, kwargs, options)`` returning the result.
    :param in_workers: ``"broker"``: a worker or beat process of this app
        publishes through its broker as before; ``"taskgate"``: through
        taskgate too (it needs a taskgate next to it).

    Installing twice replaces the first installation.
    """
    if not (on_unavailable in ("raise", "broker") or callable(on_unavailable)):
        raise ValueError(f"on_unavailable must be 'raise', 'broker' or a callable, not {on_unavailable!r}")
    if in_workers not in ("broker", "taskgate"):
        raise ValueError(f"in_workers must be 'broker' or 'taskgate', not {in_workers!r}")
    client = client or Client(url, timeout=timeout, token=token)
    uninstall(app)
    dropin = _DropIn(app, client, on_unavailable)
    with _lock:
        _dropins[app] = dropin
    _patch_canvas()
    app.send_task = dropin.send_task
    if in_workers == "broker":
        _step_aside_in_workers(app)
    if app.conf.task_routes:
        warnings.warn(
            "taskgate_client.celery: task_routes are not consulted for tasks sent through taskgate; "
            "taskgate routes by its registry and [routing] configuration",
            stacklevel=2,
        )
    return client


def uninstall(app: Any) -> None:
    """Gives ``app`` its own ``send_task`` back (no-op when not installed)."""
    with _lock:
        dropin = _dropins.pop(app, None)
    if dropin is not None and app.__dict__.get("send_task") == dropin.send_task:
        del app.send_task


def installed(app: Any) -> Optional[Client]:
    """The client ``app`` sends through, or None."""
    with _lock:
        dropin = _dropins.get(app)
    return dropin.client if dropin is not None else None


def _active(app: Any) -> Optional["_DropIn"]:
    with _lock:
        return _dropins.get(app)


def _step_aside_in_workers(app: Any) -> None:
    from celery import signals

    def step_aside(sender=None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            uninstall(app)

    # weak=False: the handler is a closure nobody else holds; one per app,
    # however often install() runs.
    uid = f"taskgate_client.celery.step_aside.{id(app)}"
    signals.worker_init.connect(step_aside, weak=False, dispatch_uid=uid)
    signals.beat_init.connect(step_aside, weak=False, dispatch_uid=uid)


class _DropIn:
    def __init__(self, app: Any, client: Client, on_unavailable: OnUnavailable) -> None:
        self.app = app
        self.client = client
        self.on_unavailable = on_unavailable
        # The class's method, bound to app: Celery's own send_task, for the
        # "broker" fallback.
        self.celery_send_task = type(app).send_task.__get__(app)

    # -- one task ------------------------------------------------------------

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Celery's ``app.send_task``, through taskgate."""
        original = dict(options)
        request, result_cls, add_to_parent = self.request_for(name, args, kwargs, options)
        collector = _collecting.get()
        if collector is not None:
            # A member of a group being sent: its id was frozen by Celery.
            collector.append(request)
            return self.result(request["id"], result_cls, request.get("ignore_result"), add_to_parent=False)
        try:
            task_id = self.client.send_request(request)
        except GatewayUnavailable as error:
            return self.unavailable(error, name, args, kwargs, original)
        return self.result(task_id, result_cls, request.get("ignore_result"), add_to_parent)

    def request_for(self, name: str, args: Any, kwargs: Any, options: dict) -> tuple:
        app = self.app
        result_cls = options.pop("result_cls", None)
        task_type = options.pop("task_type", None)
        add_to_parent = options.pop("add_to_parent", True)
        if options.get("reply_to") == app.thread_oid:
            # Celery's own default (freeze() writes it into every signature);
            # it only matters to the rpc:// backend, which taskgate cannot serve.
            del options["reply_to"]
        if task_type is None:
            # Celery's send_task applies a registered task's execution
            # options (queue, expires, time limits, ...) under the caller's.
            task_type = app._tasks.get(name)
            if task_type is not None and hasattr(task_type, "_get_exec_options"):
                defaults = {k: v for k, v in task_type._get_exec_options().items() if v is not None}
                options = dict(defaults, **options)
        chain = options.pop("chain", None)
        if chain:
            # Celery carries the rest of a chain reversed (the worker pops
            # the next step off the end); taskgate takes execution order.
            options["chain"] = list(reversed(list(chain)))
        parent = app.current_worker_task
        if parent is not None:
            # Only with in_workers="taskgate": the ids Celery would inherit.
            options.setdefault("root_id", parent.request.root_id or parent.request.id)
            options.setdefault("parent_id", parent.request.id)
        request = build_request(name, args, kwargs, **options)
        if _collecting.get() is not None and "id" not in request:
            raise TypeError(f"group member {name!r} has no frozen task id")
        return request, result_cls, add_to_parent

    def result(self, task_id: str, result_cls: Any, ignore_result: Any, add_to_parent: bool) -> Any:
        result = (result_cls or self.app.AsyncResult)(task_id)
        result.ignored = ignore_result
        parent = self.app.current_worker_task
        if add_to_parent and parent is not None:
            parent.add_trail(result)
        return result

    def unavailable(self, error: GatewayUnavailable, name: str, args: Any, kwargs: Any, options: dict) -> Any:
        if self.on_unavailable == "raise":
            raise error
        if self.on_unavailable == "broker":
            return self.celery_send_task(name, args, kwargs, **options)
        return self.on_unavailable(error, name, args, kwargs, options)

    # -- a group -------------------------------------------------------------

    def collect_group(self, group: Any, args: Any, kwargs: Any, options: dict) -> tuple:
        """Celery's own freezing and option merge for a group's members,
        through send_task, which collects the requests instead of sending:
        ``(group_id, results, members)``."""
        app = self.app
        options, group_id, root_id = group._freeze_gid(options)
        prepared = list(group._prepared(group.tasks, [], group_id, root_id, app))
        collected: list = []
        token = _collecting.set(collected)
        try:
            results = []
            for signature, result, _ in prepared:
                signature.apply_async(args=args, kwargs=kwargs, add_to_parent=False, **options)
                results.append(result)
        finally:
            _collecting.reset(token)
        members = []
        for request in collected:
            member_group = request.pop("group", group_id)
            request.pop("group_index", None)
            if member_group != group_id:
                raise TypeError(f"group member {request['task']!r} belongs to group {member_group!r}, not {group_id!r}")
            members.append(_Built(request))
        return group_id, results, members

    def apply_group(self, group: Any, args: Any, kwargs: Any, add_to_parent: bool, options: dict) -> Any:
        """``group.apply_async`` as Celery's, but the members go in one
        ``POST /v1/groups`` instead of one publish each."""
        app = self.app
        if options.get("chord") is not None:
            raise NotImplementedError(_CHORD_REFUSAL)
        if not group.tasks:
            return group.freeze()
        original = dict(options)
        group_id, results, members = self.collect_group(group, args, kwargs, options)
        try:
            self.client.send_group(members, group_id=group_id)
        except GatewayUnavailable as error:
            if self.on_unavailable == "raise":
                raise
            if self.on_unavailable == "broker":
                return _celery_group_apply_async(group, args, kwargs, add_to_parent=add_to_parent, **original)
            return self.on_unavailable(error, "celery.group", args, kwargs, dict(original, group=group))
        result = app.GroupResult(group_id, results)
        parent = app.current_worker_task
        if add_to_parent and parent is not None:
            parent.add_trail(result)
        return result

    def apply_chord(self, chord: Any, args: Any, kwargs: Any, task_id: Any, options: dict) -> Any:
        """``chord(header)(body)`` in one ``POST /v1/groups`` with the body:
        taskgate sends the members, carries the body in each, and sends
        Celery's ``celery.chord_unlock`` that applies it once all succeeded.
        Returns the body's ``AsyncResult``, its parent the header's
        ``GroupResult``, as Celery's chord does."""
        from celery import group as celery_group

        app = self.app
        header = chord.tasks if isinstance(chord.tasks, celery_group) else celery_group(chord.tasks, app=app)
        # chord(header)(body) hands the body over in kwargs, as Celery's own
        # chord.apply_async takes it.
        kwargs = dict(kwargs or {})
        body = kwargs.pop("body", None) or chord.body
        if body is None:
            raise TypeError("a chord needs a body: chord(header)(body)")
        body = body.clone()
        if not header.tasks:
            raise TypeError("a chord needs at least one task in its header")
        body_id = task_id or body.options.get("task_id") or str(uuid.uuid4())
        body.options["task_id"] = body_id
        group_id, results, members = self.collect_group(header, args, kwargs, dict(options))
        self.client.send_chord(members, body, group_id=group_id)
        result = app.AsyncResult(body_id)
        result.parent = app.GroupResult(group_id, results)
        return result


_celery_group_apply_async: Any = None
_celery_chord_apply_async: Any = None


def _patch_canvas() -> None:
    """Intercepts ``group.apply_async`` and ``chord.apply_async`` for apps
    with the drop-in; other apps (and eager mode) get Celery's own."""
    global _canvas_patched, _celery_group_apply_async, _celery_chord_apply_async
    with _lock:
        if _canvas_patched:
            return
        from celery import canvas

        _celery_group_apply_async = canvas.group.apply_async
        _celery_chord_apply_async = canvas._chord.apply_async

        def group_apply_async(self, args=None, kwargs=None, add_to_parent=True, producer=None, link=None, link_error=None, **options):
            app = self.app
            dropin = _active(app)
            if dropin is None or app.conf.task_always_eager:
                return _celery_group_apply_async(
                    self, args, kwargs, add_to_parent=add_to_parent, producer=producer,
                    link=link, link_error=link_error, **options,
                )
            # Celery's own refusals, with its messages.
            if link is not None:
                raise TypeError("Cannot add link to group: use a chord")
            if link_error is not None:
                raise TypeError("Cannot add link to group: do that on individual tasks")
            if producer is not None:
                raise TypeError("'producer' is not supported: taskgate publishes with its own broker connection")
            return dropin.apply_group(self, args or (), kwargs, add_to_parent, options)

        def chord_apply_async(self, args=None, kwargs=None, task_id=None, producer=None, publisher=None,
                              connection=None, router=None, result_cls=None, **options):
            app = self._get_app()
            dropin = _active(app)
            if dropin is None or app.conf.task_always_eager:
                return _celery_chord_apply_async(
                    self, args, kwargs, task_id=task_id, producer=producer, publisher=publisher,
                    connection=connection, router=router, result_cls=result_cls, **options,
                )
            if producer is not None or publisher is not None or connection is not None:
                raise TypeError("'producer' is not supported: taskgate publishes with its own broker connection")
            return dropin.apply_chord(self, args or (), kwargs, task_id, options)

        group_apply_async.__doc__ = _celery_group_apply_async.__doc__
        canvas.group.apply_async = group_apply_async
        canvas._chord.apply_async = chord_apply_async
        _canvas_patched = True
