"""A stock Celery worker (tests/support/celery_app.py, no taskgate code in
it) executes tasks sent with the client, with the arguments as sent."""

from __future__ import annotations


def test_a_stock_celery_worker_runs_a_task_sent_with_the_client(client, celery_worker):
    task_id = client.send_task(
        "tests.record",
        args=[1, "two", [3.5, None]],
        kwargs={"flag": True, "nested": {"k": "v"}},
        creator_id="u1",
    )
    record = celery_worker.wait_for_ids([task_id])[task_id]
    assert record["task"] == "tests.record"
    assert record["args"] == [1, "two", [3.5, None]]
    assert record["kwargs"] == {"flag": True, "nested": {"k": "v"}}
    assert record["request"]["root_id"] == task_id
    assert client.get_task(task_id)["state"] == "published"


def test_a_batch_runs_in_order_with_bound_arguments(client, celery_worker):
    ids = client.send_tasks(
        [
            ("export.project", ["org", "proj"], {"output_type": "csv"}),
            {"name": "rawa.add", "args": [2, 3], "kwargs": {"scale": 10}},
        ]
    )
    records = celery_worker.wait_for_ids(ids)
    export, add = records[ids[0]], records[ids[1]]
    assert export["task"] == "export.project"
    assert export["args"] == ["org", "proj"] and export["kwargs"] == {"output_type": "csv"}
    assert add["args"] == [2, 3] and add["kwargs"] == {"scale": 10}
