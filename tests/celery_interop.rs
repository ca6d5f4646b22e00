//! A stock Celery 5.7 worker (from PyPI, in the test virtualenv) executes
//! what taskgate publishes to RabbitMQ: positional and keyword arguments and
//! non-ASCII text arrive intact, also after the broker was away.

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::app::{spawn_app, test_settings, unique, RABBITMQ_URL};
use support::celery::{delete_amqp_entities, CeleryWorker, CeleryWorkerOptions};
use support::fault_proxy::{FaultMode, FaultProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_celery_worker_executes_published_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("rawa");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    let settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&queue, "rawa")],
    );
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let worker = CeleryWorker::start_async(
        CeleryWorkerOptions::new(RABBITMQ_URL)
            .exchange(&exchange)
            .queue(&queue, "rawa"),
    )
    .await;

    let tasks = [
        json!({"task": "rawa.add", "args": [2, 3], "kwargs": {"scale": 10}}),
        json!({"task": "rawa.echo", "kwargs": {"text": "héllo ✓ 日本 🎉"}}),
        json!({"task": "rawa.add", "args": [1.5, 2], "kwargs": {}}),
    ];
    let mut ids = Vec::new();
    for task in &tasks {
        let response = app.post_task(task).await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    // One more while the broker refuses: spooled, then executed on return.
    proxy.set_mode(FaultMode::Refuse);
    app.wait_for_health(Duration::from_secs(10), |h| h["async_available"] == false)
        .await;
    let response = app
        .post_task(&json!({"task": "rawa.echo", "args": ["after the outage"]}))
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    ids.push(body["id"].as_str().unwrap().to_owned());
    proxy.set_mode(FaultMode::Pass);

    let records = worker.wait_for_records_async(4, Duration::from_secs(60)).await;
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("task {id} ran: {records:#?}"))
    };
    let add = by_id(&ids[0]);
    assert_eq!(add["task"], "rawa.add");
    assert_eq!(add["args"], json!([2, 3]));
    assert_eq!(add["kwargs"], json!({"scale": 10}));
    let echo = by_id(&ids[1]);
    assert_eq!(echo["kwargs"], json!({"text": "héllo ✓ 日本 🎉"}));
    let float_add = by_id(&ids[2]);
    assert_eq!(float_add["args"], json!([1.5, 2]));
    let late = by_id(&ids[3]);
    assert_eq!(late["args"], json!(["after the outage"]));
    drop(worker);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}
