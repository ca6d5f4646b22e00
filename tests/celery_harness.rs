//! Self-tests of the real-Celery harness (`tests/support/celery.rs` and
//! `celery_app.py`): tasks published by Celery itself to the local RabbitMQ
//! reach a harness worker, and the harness reads back what the tasks recorded.

mod support;

use std::time::Duration;

use serde_json::json;
use support::celery::{
    delete_amqp_entities, rabbitmq_url, send_task_with_celery, unique_name, CeleryWorker, CeleryWorkerOptions,
};

const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// A worker on its own exchange and queue, so tests can run in parallel.
struct Topology {
    exchange: String,
    queue: String,
    binding_key: String,
}

impl Topology {
    fn unique() -> Topology {
        Topology {
            exchange: unique_name("harness-exchange"),
            queue: unique_name("harness-queue"),
            binding_key: format!("{}.#", unique_name("harness")),
        }
    }

    fn options(&self) -> CeleryWorkerOptions {
        CeleryWorkerOptions::new(rabbitmq_url())
            .exchange(&self.exchange)
            .queue(&self.queue, &self.binding_key)
    }

    fn routing_key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.binding_key.trim_end_matches('#'))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        delete_amqp_entities(&rabbitmq_url(), &[&self.queue], &[&self.exchange]);
    }
}

#[test]
fn a_task_sent_by_celery_is_recorded_by_the_worker() {
    let topology = Topology::unique();
    let options = topology.options();
    let worker = CeleryWorker::start(options.clone());
    assert!(worker.records().is_empty());

    let routing_key = topology.routing_key("add");
    let task_id = send_task_with_celery(
        &options,
        "rawa.add",
        json!([2, 3]),
        json!({"scale": 10}),
        json!({"exchange": topology.exchange, "routing_key": routing_key}),
    );

    let records = worker.wait_for_records(1, RECORD_TIMEOUT);
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!(record["task"], "rawa.add");
    assert_eq!(record["id"], task_id.as_str());
    assert_eq!(record["args"], json!([2, 3]));
    assert_eq!(record["kwargs"], json!({"scale": 10}));
    assert_eq!(record["delivery_info"]["exchange"], topology.exchange.as_str());
    assert_eq!(record["delivery_info"]["routing_key"], routing_key.as_str());
    assert_eq!(record["request"]["root_id"], task_id.as_str());
}

#[tokio::test]
async fn every_test_task_records_its_call_in_order() {
    let topology = Topology::unique();
    let options = topology.options();
    let worker = CeleryWorker::start_async(options.clone()).await;

    let routing_key = topology.routing_key("any");
    let route = json!({"exchange": topology.exchange, "routing_key": routing_key});
    let calls = [
        ("rawa.echo", json!(["héllo ✓ 日本"]), json!({})),
        (
            "export.project",
            json!(["org-slug", "proj-slug"]),
            json!({"output_type": "csv"}),
        ),
        ("tests.record", json!([1, "two", null]), json!({"nested": {"a": [1]}})),
    ];
    let mut ids = Vec::new();
    for (task, args, kwargs) in &calls {
        let (options, task, args, kwargs, route) =
            (options.clone(), *task, args.clone(), kwargs.clone(), route.clone());
        let id = tokio::task::spawn_blocking(move || send_task_with_celery(&options, task, args, kwargs, route))
            .await
            .unwrap();
        ids.push(id);
    }

    let records = worker.wait_for_records_async(calls.len(), RECORD_TIMEOUT).await;
    assert_eq!(records.len(), calls.len(), "{records:#?}");
    for ((record, (task, args, kwargs)), id) in records.iter().zip(&calls).zip(&ids) {
        assert_eq!(record["task"], *task);
        assert_eq!(record["id"], id.as_str());
        assert_eq!(&record["args"], args);
        assert_eq!(&record["kwargs"], kwargs);
    }
    // The record file is UTF-8, not \u-escaped.
    let raw = std::fs::read_to_string(worker.record_path()).unwrap();
    assert!(raw.contains("héllo ✓ 日本"), "{raw}");
}

#[test]
fn a_message_for_another_routing_key_does_not_reach_the_worker() {
    let topology = Topology::unique();
    let options = topology.options();
    let worker = CeleryWorker::start(options.clone());

    // Not matched by the queue's binding: RabbitMQ drops it (no mandatory).
    send_task_with_celery(
        &options,
        "rawa.echo",
        json!(["lost"]),
        json!({}),
        json!({"exchange": topology.exchange, "routing_key": unique_name("elsewhere")}),
    );
    send_task_with_celery(
        &options,
        "rawa.echo",
        json!(["kept"]),
        json!({}),
        json!({"exchange": topology.exchange, "routing_key": topology.routing_key("x")}),
    );
    let records = worker.wait_for_records(1, RECORD_TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    let records_later = worker.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records_later.len(), 1, "{records_later:#?}");
    assert_eq!(records[0]["args"], json!(["kept"]));
}

#[test]
fn dropping_the_worker_stops_its_process_group() {
    let topology = Topology::unique();
    let worker = CeleryWorker::start(topology.options());
    let pid = worker.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(worker);
    // Reaped by `stop`, so the pid is gone (not even a zombie).
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
