//! Celery's per-call options (`shadow`, `headers`, `ignore_result`,
//! `retries`, `expires` in seconds, `group_index`, `link`, `link_error`,
//! `chain`, `queue`) go out exactly as stock Celery 5.7 sends them, and a
//! stock worker honours them; a group posted to `POST /v1/groups` is
//! accepted whole (or not at all) and read back with Celery's own
//! `GroupResult`.
//!
//! The comparison test makes Celery itself publish (`apply_async`,
//! `chain(...).apply_async()`, `send_task`) to a queue, reads its messages
//! off RabbitMQ, has taskgate publish the same calls over HTTP to the same
//! queue, and compares headers, properties and body field by field. What
//! may differ, and why, is spelled out at each exception.

mod support;

use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::Duration;
use support::app::{consume, spawn_app, test_settings, unique, ReceivedMessage, RABBITMQ_URL};
use support::celery::{delete_amqp_entities, python_command, CeleryWorker, CeleryWorkerOptions};
use support::postgres::TestDatabase;

/// The three calls, made by Celery: prints the task ids in order.
const CELERY_PUBLISHES: &str = r#"
import json, sys
from celery import chain, signature
from celery_app import app, add, echo
queue, expires_at = sys.argv[1], sys.argv[2]
ids = []
with app.connection_for_write() as connection:
    ids.append(add.apply_async(
        [2, 3], link=add.s(10), link_error=echo.si("failed"), shadow="sh",
        headers={"x-custom": "v", "n": 1}, ignore_result=True, retries=2,
        expires=60, group_id="g1", group_index=3, queue=queue,
        connection=connection).id)
    first = chain(add.s(2, 3), add.s(10), add.s(100).set(queue=queue)).apply_async(
        queue=queue, connection=connection)
    ids.append(first.parent.parent.id)
    ids.append(app.send_task(
        "rawa.add", [1, 2],
        link=[signature("rawa.echo", args=("x",), immutable=True), signature("rawa.add", kwargs={"y": 1})],
        expires=expires_at, queue=queue, connection=connection).id)
print(json.dumps(ids))
"#;

/// Runs `script` with the venv's Python in the worker's environment (the
/// same Celery app configuration) and returns what it printed, as JSON.
fn run_celery_script(options: &CeleryWorkerOptions, what: &str, script: &str, args: &[&str]) -> Value {
    let output = python_command()
        .arg("-c")
        .arg(script)
        .args(args)
        .envs(options.celery_env())
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| panic!("{what} printed no JSON: {error}"))
}

fn celery_publishes(options: &CeleryWorkerOptions, queue: &str, expires_at: &str) -> Vec<String> {
    let ids = run_celery_script(options, "celery publishing", CELERY_PUBLISHES, &[queue, expires_at]);
    serde_json::from_value(ids).expect("a JSON list of ids")
}

fn parse_time(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("a time string"))
        .expect("an ISO 8601 time")
        .with_timezone(&Utc)
}

/// Header by header. `id`, `root_id` (the id) and `origin` are per message;
/// `expires` is computed by each sender from its own clock, so it is compared
/// as a time within `tolerance`; `argsrepr` of a call Celery made with a
/// tuple (`add.s(2, 3)`) reads `(2, 3)` where taskgate, which takes a JSON
/// array, writes `[2, 3]`.
fn compare_headers(label: &str, celery: &ReceivedMessage, ours: &ReceivedMessage, tolerance: chrono::Duration) {
    let mut celery_names: Vec<&String> = celery.headers.keys().collect();
    let mut our_names: Vec<&String> = ours.headers.keys().collect();
    celery_names.sort();
    our_names.sort();
    assert_eq!(our_names, celery_names, "{label}: header names");
    for (name, expected) in &celery.headers {
        let actual = &ours.headers[name];
        match name.as_str() {
            "id" | "origin" => {}
            "root_id" => assert_eq!(actual, &ours.headers["id"], "{label}: root_id is the id"),
            "expires" if !expected.is_null() => {
                let gap = parse_time(actual) - parse_time(expected);
                assert!(
                    gap.abs() <= tolerance,
                    "{label}: expires {actual} vs Celery's {expected}"
                );
            }
            "argsrepr" if expected.as_str().is_some_and(|repr| repr.starts_with('(')) => {
                let as_list = format!(
                    "[{}]",
                    &expected.as_str().unwrap()[1..expected.as_str().unwrap().len() - 1]
                );
                assert_eq!(actual, &Value::String(as_list), "{label}: argsrepr");
            }
            _ => assert_eq!(actual, expected, "{label}: header {name}"),
        }
    }
}

/// The body with what is per message taken out: each chain step's frozen
/// `task_id` (checked to be there, in the same place) and Celery's
/// `reply_to` (the sender's result queue for the `rpc://` backend; taskgate
/// has no result consumer and sends none, as for the task itself).
fn normalised_body(label: &str, message: &ReceivedMessage) -> String {
    let mut body: Value = serde_json::from_slice(&message.body).expect("the body is JSON");
    if let Some(steps) = body[2]["chain"].as_array_mut() {
        for step in steps {
            let options = step["options"].as_object_mut().expect("options");
            options.remove("reply_to");
            let task_id = options
                .get_mut("task_id")
                .unwrap_or_else(|| panic!("{label}: a frozen task_id"));
            assert!(
                uuid::Uuid::parse_str(task_id.as_str().unwrap()).is_ok(),
                "{label}: {task_id}"
            );
            *task_id = Value::String("<frozen id>".into());
        }
    }
    // serde_json keeps key order, so this compares order as well.
    body.to_string()
}

/// `expiration` is milliseconds left at publish time: both senders count
/// from their own clocks.
fn compare_properties(label: &str, celery: &ReceivedMessage, ours: &ReceivedMessage, tolerance: chrono::Duration) {
    let (theirs, mine) = (&celery.properties, &ours.properties);
    assert_eq!(mine.content_type(), theirs.content_type(), "{label}: content_type");
    assert_eq!(
        mine.content_encoding(),
        theirs.content_encoding(),
        "{label}: content_encoding"
    );
    assert_eq!(mine.delivery_mode(), theirs.delivery_mode(), "{label}: delivery_mode");
    assert_eq!(
        mine.correlation_id().as_ref().map(|id| id.as_str().to_owned()),
        Some(ours.task_id()),
        "{label}: correlation_id"
    );
    let millis = |properties: &lapin::BasicProperties| {
        properties
            .expiration()
            .as_ref()
            .map(|value| value.as_str().parse::<i64>().expect("expiration is a number"))
    };
    match (millis(theirs), millis(mine)) {
        (None, None) => {}
        (Some(expected), Some(actual)) => assert!(
            (expected - actual).abs() <= tolerance.num_milliseconds(),
            "{label}: expiration {actual} vs Celery's {expected}"
        ),
        other => panic!("{label}: expiration present on one side only: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_options_are_published_as_celery_publishes_them() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("rawa-opts");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, "rawa")]);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(20), |health| health["async_available"] == true)
        .await;
    let celery = CeleryWorkerOptions::new(RABBITMQ_URL)
        .exchange(&exchange)
        .queue(&queue, "rawa");

    // Whole seconds: Celery keeps a string `expires` as given, taskgate
    // writes Python's isoformat of the parsed time, the same for these.
    let expires_at = (Utc::now() + chrono::Duration::seconds(120))
        .with_nanosecond(0)
        .expect("0 ns is a valid time");
    let expires_text = expires_at.format("%Y-%m-%dT%H:%M:%S+00:00").to_string();
    let started = std::time::Instant::now();
    let celery_ids = {
        let (celery, queue, expires_text) = (celery.clone(), queue.clone(), expires_text.clone());
        tokio::task::spawn_blocking(move || celery_publishes(&celery, &queue, &expires_text))
            .await
            .unwrap()
    };
    let from_celery = consume(&queue, 3, Duration::from_secs(20)).await;
    assert_eq!(from_celery.len(), 3, "Celery's three messages");
    let celery_order: Vec<String> = from_celery.iter().map(ReceivedMessage::task_id).collect();
    assert_eq!(celery_order, celery_ids);

    let requests = [
        json!({"task": "rawa.add", "args": [2, 3],
               "link": {"task": "rawa.add", "args": [10]},
               "link_error": {"task": "rawa.echo", "args": ["failed"], "immutable": true},
               "shadow": "sh", "headers": {"x-custom": "v", "n": 1}, "ignore_result": true,
               "retries": 2, "expires": 60, "group": "g1", "group_index": 3, "queue": queue}),
        // `apply_async` sends the task's own `ignore_result` (False), where
        // a bare `send_task` sends None: the request says which.
        json!({"task": "rawa.add", "args": [2, 3], "ignore_result": false, "queue": queue,
               "chain": [{"task": "rawa.add", "args": [10]},
                         {"task": "rawa.add", "args": [100], "options": {"queue": queue}}]}),
        json!({"task": "rawa.add", "args": [1, 2], "expires": expires_text, "queue": queue,
               "link": [{"task": "rawa.echo", "args": ["x"], "immutable": true},
                        {"task": "rawa.add", "kwargs": {"y": 1}}]}),
    ];
    let mut our_ids = Vec::new();
    for request in &requests {
        our_ids.push(app.post_accepted(request.clone()).await);
    }
    let from_taskgate = consume(&queue, 3, Duration::from_secs(20)).await;
    assert_eq!(from_taskgate.len(), 3, "taskgate's three messages");
    // Both sides' clocks ran from before Celery's first send to now.
    let tolerance = chrono::Duration::from_std(started.elapsed()).unwrap() + chrono::Duration::seconds(1);

    for (index, (celery, ours)) in from_celery.iter().zip(&from_taskgate).enumerate() {
        let label = format!("message {index} ({})", requests[index]);
        assert_eq!(ours.task_id(), our_ids[index], "{label}: publish order");
        assert_eq!(ours.exchange, celery.exchange, "{label}: exchange");
        assert_eq!(
            ours.routing_key, celery.routing_key,
            "{label}: routing key (the queue's binding)"
        );
        compare_headers(&label, celery, ours, tolerance);
        compare_properties(&label, celery, ours, tolerance);
        assert_eq!(
            normalised_body(&label, ours),
            normalised_body(&label, celery),
            "{label}: body"
        );
    }
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

/// Celery's result row for `task_id` (`celery_taskmeta`, JSON results).
async fn stored_result(pool: &sqlx::PgPool, task_id: &str) -> Option<(String, Value)> {
    let row: Option<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT status, result FROM celery_taskmeta WHERE task_id = $1")
            .bind(task_id)
            .fetch_optional(pool)
            .await
            .unwrap_or_default();
    row.map(|(status, result)| {
        let result = result
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(Value::Null);
        (status, result)
    })
}

async fn wait_for_result(pool: &sqlx::PgPool, task_id: &str) -> (String, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = stored_result(pool, task_id).await {
            if found.0 == "SUCCESS" || found.0 == "FAILURE" {
                return found;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no result for {task_id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn record_where(records: &[Value], predicate: impl Fn(&Value) -> bool) -> &Value {
    records
        .iter()
        .find(|record| predicate(record))
        .unwrap_or_else(|| panic!("no such record in {records:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_worker_runs_chains_errbacks_and_ignores_results() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("rawa-flow");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, "rawa")]);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let worker = CeleryWorker::start_async(
        CeleryWorkerOptions::new(RABBITMQ_URL)
            .exchange(&exchange)
            .queue(&queue, "rawa")
            .result_backend(database.celery_result_backend()),
    )
    .await;
    let pool = database.pool().await;

    // The worker sends the next step and the errback itself, routed by its
    // own configuration: `options.queue` keeps them on the test's queue.
    let second_id = uuid::Uuid::new_v4().to_string();
    let first_id = app
        .post_accepted(json!({"task": "rawa.add", "args": [2, 3],
            "chain": [{"task": "rawa.add", "args": [10], "options": {"queue": queue, "task_id": second_id}}]}))
        .await;
    // str + int: TypeError in the worker, so the errback runs.
    let failing_id = app
        .post_accepted(json!({"task": "rawa.add", "args": ["a", 1],
            "link_error": {"task": "rawa.echo", "args": ["errback ran"], "immutable": true, "options": {"queue": queue}}}))
        .await;
    let ignored_id = app
        .post_accepted(json!({"task": "rawa.add", "args": [4, 4], "ignore_result": true}))
        .await;

    let records = worker.wait_for_records_async(5, Duration::from_secs(60)).await;
    assert_eq!(wait_for_result(&pool, &first_id).await, ("SUCCESS".into(), json!(5)));
    assert_eq!(wait_for_result(&pool, &second_id).await, ("SUCCESS".into(), json!(15)));
    let second = record_where(&records, |record| record["id"] == second_id.as_str());
    assert_eq!(second["args"], json!([5, 10]), "the chain passed 5 on");
    assert_eq!(second["request"]["root_id"], first_id.as_str());
    assert_eq!(second["request"]["parent_id"], first_id.as_str());

    let (status, _) = wait_for_result(&pool, &failing_id).await;
    assert_eq!(status, "FAILURE");
    let errback = record_where(&records, |record| record["task"] == "rawa.echo");
    assert_eq!(errback["args"], json!(["errback ran"]));

    let ignored = record_where(&records, |record| record["id"] == ignored_id.as_str());
    assert_eq!(ignored["request"]["ignore_result"], true);
    // Every other task's result is stored by now; this one's never is.
    assert_eq!(
        stored_result(&pool, &ignored_id).await,
        None,
        "ignore_result stored nothing"
    );

    drop(worker);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

/// Reads a group's results the way the platform does: Celery's own
/// `GroupResult(group_id, [AsyncResult(id), ...]).get()` on the database
/// backend; prints the results as JSON.
const GROUP_RESULT: &str = r#"
import json, sys
from celery.result import AsyncResult, GroupResult
from celery_app import app
group_id, ids = sys.argv[1], json.loads(sys.argv[2])
group = GroupResult(group_id, [AsyncResult(task_id, app=app) for task_id in ids], app=app)
print(json.dumps(group.get(timeout=60)))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_accepted_whole_and_read_back_with_celerys_group_result() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("rawa-group");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, "rawa")]);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;

    // All or nothing: one member that numbers itself refuses the group.
    let refused = app
        .client
        .post(app.url("/v1/groups"))
        .json(&json!({"tasks": [{"task": "rawa.add", "args": [1, 1]}, {"task": "rawa.add", "args": [2, 2], "group_index": 7}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["field"], "tasks[1].group_index", "{problem}");
    assert_eq!(app.outbox_depth().await, 0, "nothing of a refused group is written");

    let options = CeleryWorkerOptions::new(RABBITMQ_URL)
        .exchange(&exchange)
        .queue(&queue, "rawa")
        .result_backend(database.celery_result_backend());
    let worker = CeleryWorker::start_async(options.clone()).await;
    let members: Vec<Value> = (0..5).map(|n| json!({"task": "rawa.add", "args": [n, n]})).collect();
    let accepted = app
        .client
        .post(app.url("/v1/groups"))
        .json(&json!({"tasks": members}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    let group_id = accepted["group_id"].as_str().unwrap().to_owned();
    assert!(
        uuid::Uuid::parse_str(&group_id).is_ok(),
        "a Celery-style group id: {group_id}"
    );
    let ids: Vec<String> = accepted["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 5);

    let records = worker.wait_for_records_async(5, Duration::from_secs(60)).await;
    for (index, id) in ids.iter().enumerate() {
        let record = record_where(&records, |record| record["id"] == id.as_str());
        assert_eq!(record["request"]["group"], group_id.as_str(), "{record}");
        assert_eq!(record["request"]["group_index"], index, "{record}");
    }
    let ids_json = serde_json::to_string(&ids).unwrap();
    let results = run_celery_script(&options, "GroupResult.get", GROUP_RESULT, &[&group_id, &ids_json]);
    assert_eq!(
        results,
        json!([0, 2, 4, 6, 8]),
        "Celery's GroupResult reads the group back"
    );

    // A retry with the same Idempotency-Key names the same group and tasks.
    let post_with_key = || {
        app.client
            .post(app.url("/v1/groups"))
            .header("Idempotency-Key", "group-retry-1")
            .json(&json!({"tasks": [{"task": "rawa.add", "args": [1, 2]}]}))
            .send()
    };
    let first: Value = post_with_key().await.unwrap().json().await.unwrap();
    let again: Value = post_with_key().await.unwrap().json().await.unwrap();
    assert_eq!(first, again, "the replay answers the first group");

    // A chord: the body gets the members' results once all succeeded,
    // through Celery's own chord_unlock on the database backend. The worker
    // sends the body itself, routed by its own configuration: `options.queue`
    // keeps it on the test's queue (the unlock goes there too).
    let chord: Value = app
        .client
        .post(app.url("/v1/groups"))
        .json(&json!({
            "tasks": (0..3).map(|n| json!({"task": "rawa.add", "args": [n, n]})).collect::<Vec<_>>(),
            "chord": {"task": "rawa.tsum", "options": {"queue": queue}},
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(chord["tasks"].as_array().map(Vec::len), Some(3), "{chord}");
    assert_eq!(chord["chord"]["task"], "rawa.tsum", "{chord}");
    let body_id = chord["chord"]["id"].as_str().unwrap().to_owned();
    let pool = database.pool().await;
    assert_eq!(
        wait_for_result(&pool, &body_id).await,
        ("SUCCESS".into(), json!(6)),
        "the chord's body summed 0 + 2 + 4"
    );

    drop(worker);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}
