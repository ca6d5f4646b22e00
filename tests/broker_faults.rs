//! Broker and operator faults told truthfully (issue 15), on the real
//! RabbitMQ (the blocked-connection test is in `tests/broker_blocked.rs`,
//! alone in its binary, because a disk alarm blocks every publisher):
//!
//! - a queue pre-declared with other arguments: the other queues keep
//!   receiving, and health names the queue;
//! - a task whose `expires` passes while the broker is away is a dead
//!   letter with the reason `expired`, counted, and never reaches the queue;
//! - a paused relay makes health `warn` with `async_available: false`;
//! - `breaker release` then `breaker close`, back to back, while a backlog
//!   fails: the forced state holds every time.

mod support;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::app::{consume_ids, ready_messages, spawn_app, test_settings, unique, TestApp, RABBITMQ_URL};
use support::celery::delete_amqp_entities;
use support::fault_proxy::{FaultMode, FaultProxy};

async fn task_status(app: &TestApp, id: &str) -> Value {
    app.get_json(&format!("/v1/tasks/{id}")).await
}

async fn admin_post(app: &TestApp, path: &str) -> reqwest::StatusCode {
    app.client.post(app.url(path)).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_other_arguments_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let odd = unique("odd");
    let fine = unique("fine");
    // Someone declared `odd` with a message TTL taskgate does not use.
    {
        let connection = lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(600_000));
        channel
            .queue_declare(
                odd.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .unwrap();
        let _ = connection.close(200, "done".into()).await;
    }
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&odd, "odd.#"), (&fine, "fine.#")]);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let health = app
        .wait_for_health(Duration::from_secs(15), |h| {
            h["checks"]["broker:connection"][0]["status"] == "pass" && h["checks"]["broker:topology"].is_array()
        })
        .await;
    let topology = health["checks"]["broker:topology"][0]["output"].as_str().unwrap();
    assert!(topology.contains(&odd), "health names the queue: {topology}");
    assert!(!topology.contains(&fine), "{topology}");
    assert_eq!(health["status"], "warn");

    let fine_ids = vec![
        app.post_accepted(json!({"task": "t.a", "routing_key": "fine.a"})).await,
        app.post_accepted(json!({"task": "t.b", "routing_key": "fine.b"})).await,
    ];
    let received = consume_ids(&fine, &fine_ids, Duration::from_secs(15)).await;
    assert_eq!(received.len(), 2, "the well-declared queue keeps receiving");
    // The odd queue exists and is bound as it is: its task reaches it.
    let odd_id = app.post_accepted(json!({"task": "t.c", "routing_key": "odd.c"})).await;
    let received = consume_ids(&odd, &[odd_id], Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&odd, &fine], &[&exchange]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_expires_while_spooled_is_a_dead_letter_expired() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("expiry");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&queue, "#")],
    );
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let expiring = app
        .post_accepted(json!({"task": "t.soon", "expires": expires.to_rfc3339(), "args": ["late"]}))
        .await;
    let lasting = app
        .post_accepted(json!({"task": "t.later", "expires": (expires + chrono::Duration::hours(1)).to_rfc3339()}))
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set_mode(FaultMode::Pass);

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = task_status(&app, &expiring).await;
        if status["state"] == "dead_letter" {
            break status;
        }
        assert!(Instant::now() < deadline, "never dead-lettered: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["last_error"], "expired");
    assert_eq!(status["attempts"], 0, "it never reached the broker");
    let received = consume_ids(&queue, std::slice::from_ref(&lasting), Duration::from_secs(15)).await;
    assert_eq!(received.len(), 1, "the task that had not expired is delivered");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ready_messages(&queue).await, 0, "the expired task is not in the queue");
    let letters = app.get_json("/v1/dead-letters").await;
    assert!(
        letters.to_string().contains(&expiring) && letters.to_string().contains("\"expired\""),
        "{letters:#}"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("taskgate_expired_total") && line.ends_with(" 1")),
        "{}",
        metrics
            .lines()
            .filter(|line| line.contains("expired"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_show_in_health() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("pause");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, "#")]);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(15), |h| h["status"] == "pass")
        .await;
    assert_eq!(admin_post(&app, "/v1/outbox/pause").await, 200);
    let health = app
        .wait_for_health(Duration::from_secs(2), |h| h["status"] == "warn")
        .await;
    assert_eq!(health["async_available"], false);
    let relay = &health["checks"]["relay:state"][0];
    assert_eq!(relay["observedValue"], "paused");
    assert!(
        relay["output"].as_str().unwrap().contains("paused by an operator"),
        "{relay}"
    );
    let id = app.post_accepted(json!({"task": "t.held"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ready_messages(&queue).await, 0, "nothing is published while paused");

    assert_eq!(admin_post(&app, "/v1/outbox/resume").await, 200);
    let health = app
        .wait_for_health(Duration::from_secs(5), |h| h["status"] == "pass")
        .await;
    assert_eq!(health["async_available"], true);
    assert_eq!(consume_ids(&queue, &[id], Duration::from_secs(15)).await.len(), 1);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_then_close_holds_while_a_backlog_fails() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("forced");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    let mut settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&queue, "#")],
    );
    settings.breaker.consecutive_failures = 1;
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(15), |h| h["status"] == "pass")
        .await;
    // Connected, but every window times out: failures keep arriving.
    proxy.set_mode(FaultMode::Blackhole);
    for n in 0..20 {
        app.post_accepted(json!({"task": "t.backlog", "args": [n]})).await;
    }
    for round in 0..20 {
        assert_eq!(admin_post(&app, "/v1/breaker/release").await, 200);
        assert_eq!(admin_post(&app, "/v1/breaker/close").await, 200);
        // Outcomes in flight land after the close; the forced state wins.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let breaker = app.get_json("/v1/breaker").await;
            assert_eq!(breaker["state"], "forced_closed", "round {round}: {breaker:#}");
        }
    }
    assert_eq!(admin_post(&app, "/v1/breaker/release").await, 200);
    proxy.set_mode(FaultMode::Pass);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}
