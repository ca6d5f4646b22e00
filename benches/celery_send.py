"""Row (f-celery) of ``scripts/bench``: stock Celery sending, one task at a time.

Run by benches/gateway.rs with the test virtualenv's python (Celery as the
platform uses it, no taskgate involved)::

    python benches/celery_send.py --broker amqp://guest:guest@127.0.0.1:5672// \
        --queue Q --exchange X --routing-key K --count 2000 --warmup 200 \
        --request '{"task": "bench.export", "args": ["org-slug", "project-{n}"], "kwargs": {...}}'

What a Django view does with Celery directly: ``app.send_task(name, args,
kwargs)`` with ``broker_transport_options={"confirm_publish": True}``, so
each call returns only once RabbitMQ confirmed the persistent message. The
message goes through a durable topic exchange bound with ``#`` to a durable
queue, as taskgate's relay publishes. ``{n}`` in a string argument is
replaced with the request's number, as the Rust side varies its tasks.
``--warmup`` sends first, unmeasured (connection, channel, confirm mode).

Prints one JSON object on stdout: count, p50_ms, p99_ms, mean_ms,
in_queue (messages in the queue at the end, warm-up included: proof they
were routed, not just confirmed), the Celery and kombu versions. The queue and the exchange are deleted at the
end. ``--deadline`` seconds bound the whole run (SIGALRM): a broker that
stops answering fails the run rather than hanging it.
"""

import argparse
import json
import signal
import sys
import time

import celery
import kombu
from celery import Celery
from kombu import Exchange, Queue


def _timed_out(_signum, _frame):
    raise TimeoutError("celery_send.py: deadline reached")


def _fill(value, n):
    if isinstance(value, str):
        return value.replace("{n}", str(n))
    if isinstance(value, list):
        return [_fill(item, n) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, n) for key, item in value.items()}
    return value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--routing-key", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--request", required=True, help="the task as taskgate's POST body (task, args, kwargs)")
    parser.add_argument("--deadline", type=float, default=300.0)
    options = parser.parse_args()

    signal.signal(signal.SIGALRM, _timed_out)
    signal.setitimer(signal.ITIMER_REAL, options.deadline)

    request = json.loads(options.request)
    exchange = Exchange(options.exchange, type="topic", durable=True)
    queue = Queue(options.queue, exchange, routing_key="#", durable=True)
    app = Celery("bench", broker=options.broker)
    app.conf.update(
        broker_transport_options={"confirm_publish": True},
        task_queues=[queue],
        task_default_queue=options.queue,
        task_default_exchange=options.exchange,
        task_default_exchange_type="topic",
        task_serializer="json",
        accept_content=["json"],
    )

    latencies = []
    in_queue = None
    try:
        for n in range(options.warmup + options.count):
            args = _fill(request.get("args", []), n)
            kwargs = _fill(request.get("kwargs", {}), n)
            started = time.perf_counter()
            app.send_task(
                request["task"],
                args=args,
                kwargs=kwargs,
                exchange=exchange,
                routing_key=options.routing_key,
            )
            elapsed = time.perf_counter() - started
            if n >= options.warmup:
                latencies.append(elapsed)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            with app.connection_for_write() as connection:
                channel = connection.default_channel
                in_queue = channel.queue_declare(options.queue, passive=True).message_count
                channel.queue_delete(options.queue)
                channel.exchange_delete(options.exchange)
        except Exception as error:  # cleanup only: report, do not mask the result
            print(f"celery_send.py: cleanup failed: {error}", file=sys.stderr)

    latencies.sort()

    def percentile(p):
        return latencies[min(int(len(latencies) * p), len(latencies) - 1)] * 1000.0

    print(
        json.dumps(
            {
                "count": len(latencies),
                "p50_ms": percentile(0.50),
                "p99_ms": percentile(0.99),
                "mean_ms": sum(latencies) / len(latencies) * 1000.0,
                "in_queue": in_queue,
                "celery": celery.__version__,
                "kombu": kombu.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
