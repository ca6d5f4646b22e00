//! The gateway against a real RabbitMQ: wire format, bad input, the
//! outbox limit, idempotency, batches, and broker faults through the proxy.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::app::{consume, delete_queues, spawn_app, test_settings, unique, TestApp, RABBITMQ_URL};
use support::fault_proxy::{FaultMode, FaultProxy};
use taskgate::task::registry::RegisteredTaskSettings;

fn rabbitmq_address() -> SocketAddr {
    "127.0.0.1:5672".parse().unwrap()
}

fn proxied_url(proxy: &FaultProxy) -> String {
    format!("amqp://guest:guest@{}/%2f", proxy.addr())
}

/// An address where nothing listens: a broker that is simply not there.
fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("amqp://guest:guest@{address}/%2f")
}

fn strict_registry(settings: &mut taskgate::config::Settings) {
    settings.registry.strict = true;
    settings.registry.tasks = vec![RegisteredTaskSettings {
        name: "export.project".into(),
        params: vec!["org_slug".into(), "project_slug".into(), "output_type?".into()],
        routing_key: None,
    }];
}

/// A gateway whose broker connection runs through a fault proxy, with one
/// queue bound `#`, started and healthy.
async fn spawn_behind_proxy(dir: &std::path::Path, queue: &str) -> (FaultProxy, TestApp) {
    spawn_behind_proxy_with(dir, queue, |_| {}).await
}

/// [`spawn_behind_proxy`] with settings adjusted by `adjust` first.
async fn spawn_behind_proxy_with(
    dir: &std::path::Path,
    queue: &str,
    adjust: impl FnOnce(&mut taskgate::config::Settings),
) -> (FaultProxy, TestApp) {
    let proxy = FaultProxy::start(rabbitmq_address()).unwrap();
    let mut settings = test_settings(dir, &proxied_url(&proxy), &[(queue, "#")]);
    adjust(&mut settings);
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(10), |h| {
        h["status"] == "pass" && h["async_available"] == true
    })
    .await;
    (proxy, app)
}

async fn post(app: &TestApp, body: &Value) -> (u16, Value) {
    let response = app.post_task(body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn published_message_matches_celery_protocol_v2() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("export");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, "export")]);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(10), |h| h["status"] == "pass")
        .await;

    let response = app
        .post_task(&json!({
            "task": "export.project",
            "args": ["org-slug", "proj-slug"],
            "kwargs": {"output_type": "xls", "title": "héllo ✓"},
            "properties": {"creator_id": "u1"}
        }))
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["routing_key"], "export");
    assert_eq!(accepted["queues"], json!([queue]));
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/tasks/{id}"));

    let messages = consume(&queue, 1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1, "the task reached its queue");
    let message = &messages[0];
    assert_eq!(message.exchange, exchange);
    assert_eq!(message.routing_key, "export");
    let headers = &message.headers;
    assert_eq!(headers["lang"], "py");
    assert_eq!(headers["task"], "export.project");
    assert_eq!(headers["id"], id.as_str());
    assert_eq!(headers["root_id"], id.as_str());
    assert_eq!(headers["parent_id"], Value::Null);
    assert_eq!(headers["retries"], 0);
    assert_eq!(headers["timelimit"], json!([null, null]));
    assert_eq!(headers["argsrepr"], "['org-slug', 'proj-slug']");
    assert_eq!(headers["kwargsrepr"], "{'output_type': 'xls', 'title': 'héllo ✓'}");
    let properties = &message.properties;
    assert_eq!(properties.content_type().as_ref().unwrap().as_str(), "application/json");
    assert_eq!(properties.content_encoding().as_ref().unwrap().as_str(), "utf-8");
    assert_eq!(properties.correlation_id().as_ref().unwrap().as_str(), id);
    assert_eq!(properties.message_id().as_ref().unwrap().as_str(), id);
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        message.body_json(),
        json!([["org-slug", "proj-slug"], {"output_type": "xls", "title": "héllo ✓"},
               {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
    );

    // The outbox reports it published.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status: Value = app
            .client
            .get(app.url(&location))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["state"] == "published" {
            assert!(status["published_at"].is_string());
            break;
        }
        assert!(Instant::now() < deadline, "never published: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await.unwrap();
    delete_queues(&[&queue]).await;
}

#[tokio::test]
async fn bad_input_is_refused_with_problems_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // No broker: anything accepted would stay in the outbox and show.
    let mut settings = test_settings(dir.path(), &refused_url(), &[("export", "export")]);
    strict_registry(&mut settings);
    settings.http.max_body_bytes = 4096;
    let app = spawn_app(settings).await;

    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("malformed JSON", b"{\"task\": ".to_vec(), 400, None),
        ("not an object", b"[1, 2]".to_vec(), 422, None),
        (
            "args of the wrong type",
            br#"{"task": "export.project", "args": "x"}"#.to_vec(),
            422,
            Some("args"),
        ),
        (
            "eta not a date",
            br#"{"task": "export.project", "args": ["a","b"], "eta": "soon"}"#.to_vec(),
            422,
            Some("eta"),
        ),
        (
            "unknown field",
            br#"{"task": "export.project", "argz": []}"#.to_vec(),
            422,
            None,
        ),
        ("unknown task", br#"{"task": "nope.task"}"#.to_vec(), 422, Some("task")),
        (
            "missing argument",
            br#"{"task": "export.project", "args": ["a"]}"#.to_vec(),
            422,
            Some("kwargs.project_slug"),
        ),
        (
            "too many positional",
            br#"{"task": "export.project", "args": ["a","b","c","d"]}"#.to_vec(),
            422,
            Some("args"),
        ),
        (
            "unexpected keyword",
            br#"{"task": "export.project", "args": ["a","b"], "kwargs": {"colour": 1}}"#.to_vec(),
            422,
            Some("kwargs.colour"),
        ),
        (
            "given twice",
            br#"{"task": "export.project", "args": ["a","b"], "kwargs": {"org_slug": "x"}}"#.to_vec(),
            422,
            Some("kwargs.org_slug"),
        ),
        (
            "unroutable",
            br#"{"task": "export.project", "args": ["a","b"], "routing_key": "elsewhere"}"#.to_vec(),
            422,
            Some("routing_key"),
        ),
        (
            "not a uuid",
            br#"{"task": "export.project", "args": ["a","b"], "id": "x"}"#.to_vec(),
            422,
            Some("id"),
        ),
    ];
    for (name, body, status, field) in cases {
        let response = app
            .client
            .post(app.url("/v1/tasks"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{name}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], status, "{name}: {problem}");
        assert!(
            problem["type"].as_str().unwrap().starts_with("urn:taskgate:problem:"),
            "{name}"
        );
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{name}");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{name}: {problem}");
        }
    }
    let big = json!({"task": "export.project", "args": ["a", "x".repeat(8192)]});
    let response = app.post_task(&big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["content-type"], "application/problem+json");

    let bad_batch = json!({"tasks": [
        {"task": "export.project", "args": ["a", "b"]},
        {"task": "export.project", "args": ["a"]}
    ]});
    let response = app
        .client
        .post(app.url("/v1/tasks/batch"))
        .json(&bad_batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["field"], "tasks[1].kwargs.project_slug");

    let response = app
        .client
        .get(app.url("/v1/tasks/00000000-0000-0000-0000-000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/problem+json");

    assert_eq!(app.outbox_depth().await, 0, "no refused request wrote anything");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn idempotency_key_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(dir.path(), &refused_url(), &[("export", "export")]);
    let app = spawn_app(settings).await;
    let body = json!({"task": "export.project", "args": ["a", "b"]});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let response = app
            .client
            .post(app.url("/v1/tasks"))
            .header("Idempotency-Key", "order-42")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let accepted: Value = response.json().await.unwrap();
        ids.push(accepted["id"].as_str().unwrap().to_owned());
    }
    assert!(ids.iter().all(|id| id == &ids[0]), "same key, same id: {ids:?}");
    assert_eq!(app.outbox_depth().await, 1);

    // The same request with its keys in another order is the same request.
    let reordered: Value = serde_json::from_str(r#"{"args": ["a", "b"], "task": "export.project"}"#).unwrap();
    let response = app
        .client
        .post(app.url("/v1/tasks"))
        .header("Idempotency-Key", "order-42")
        .json(&reordered)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // The key reused for another request: refused, naming the header, and
    // nothing of it written (it used to answer 202 with the first task).
    let response = app
        .client
        .post(app.url("/v1/tasks"))
        .header("Idempotency-Key", "order-42")
        .json(&json!({"task": "export.project", "args": ["a", "other"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["field"], "Idempotency-Key", "{problem}");
    assert_eq!(app.outbox_depth().await, 1);

    let batch = json!({"tasks": [
        {"task": "export.project", "args": ["a", "1"]},
        {"task": "export.project", "args": ["a", "2"]},
        {"task": "export.project", "args": ["a", "3"]}
    ]});
    let response = app
        .client
        .post(app.url("/v1/tasks/batch"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(app.outbox_depth().await, 4);

    // A client-chosen id that is already taken is a conflict, not a second task.
    let id = accepted["tasks"][0]["id"].as_str().unwrap();
    let (status, problem) = post(&app, &json!({"task": "export.project", "args": ["a", "b"], "id": id})).await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(app.outbox_depth().await, 4);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn full_outbox_answers_503_then_accepts_again_once_drained() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("full");
    let proxy = FaultProxy::start(rabbitmq_address()).unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let mut settings = test_settings(dir.path(), &proxied_url(&proxy), &[(&queue, "export")]);
    settings.outbox.max_bytes = 8 * 1024;
    let app = spawn_app(settings).await;

    let mut accepted = Vec::new();
    let refusal = loop {
        let response = app
            .post_task(&json!({"task": "export.project", "args": [accepted.len()]}))
            .await;
        if response.status() != 202 {
            break response;
        }
        let body: Value = response.json().await.unwrap();
        accepted.push(body["id"].as_str().unwrap().to_owned());
        assert!(accepted.len() < 1000, "the limit never applied");
    };
    assert_eq!(refusal.status(), 503);
    assert!(refusal.headers().contains_key("retry-after"));
    assert_eq!(refusal.headers()["content-type"], "application/problem+json");
    let problem: Value = refusal.json().await.unwrap();
    assert_eq!(problem["type"], "urn:taskgate:problem:outbox-full");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let health = app.client.get(app.url("/v1/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "fail");

    proxy.set_mode(FaultMode::Pass);
    let messages = consume(&queue, accepted.len(), Duration::from_secs(20)).await;
    let delivered: Vec<String> = messages.iter().map(|m| m.task_id()).collect();
    assert_eq!(delivered, accepted, "every accepted task delivered, in order");
    app.wait_for_health(Duration::from_secs(10), |h| h["status"] == "pass")
        .await;
    let (status, _) = post(&app, &json!({"task": "export.project", "args": [1]})).await;
    assert_eq!(status, 202);
    app.stop().await.unwrap();
    delete_queues(&[&queue]).await;
}

#[tokio::test]
async fn refused_broker_spools_and_delivers_in_order_on_return() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("refuse");
    // A small window, so the backlog drains as several pipelined windows
    // (one published while the one before it is settled) and rounds.
    let (proxy, app) = spawn_behind_proxy_with(dir.path(), &queue, |settings| {
        settings.relay.publish_window = 7;
    })
    .await;

    proxy.set_mode(FaultMode::Refuse);
    let mut ids = Vec::new();
    for n in 0..40 {
        let started = Instant::now();
        let (status, body) = post(&app, &json!({"task": "report.build", "args": [n]})).await;
        assert_eq!(status, 202);
        assert!(started.elapsed() < Duration::from_millis(500));
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let health = app
        .wait_for_health(Duration::from_secs(10), |h| {
            h["status"] == "warn" && h["async_available"] == false
        })
        .await;
    assert_eq!(health["checks"]["broker:connection"][0]["observedValue"], false);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "still accepting while spooling");
    assert!(app.outbox_depth().await > 0);

    proxy.set_mode(FaultMode::Pass);
    let messages = consume(&queue, ids.len(), Duration::from_secs(30)).await;
    let delivered: Vec<String> = messages.iter().map(|m| m.task_id()).collect();
    let mut unique_delivered = delivered.clone();
    unique_delivered.dedup();
    assert_eq!(unique_delivered, ids, "every spooled task arrives, in acceptance order");
    // The last confirm may reach taskgate after the consumer got the
    // message: the outbox empties a moment later.
    app.wait_for_health(Duration::from_secs(10), |h| {
        h["status"] == "pass" && h["async_available"] == true && h["checks"]["outbox:depth"][0]["observedValue"] == 0
    })
    .await;
    app.stop().await.unwrap();
    delete_queues(&[&queue]).await;
}

#[tokio::test]
async fn blackholed_broker_never_slows_accepts_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("blackhole");
    let (proxy, app) = spawn_behind_proxy(dir.path(), &queue).await;

    proxy.set_mode(FaultMode::Blackhole);
    let blackholed_at = Instant::now();
    let mut ids = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut reported_after = None;
    for n in 0..60 {
        let started = Instant::now();
        let (status, body) = post(&app, &json!({"task": "report.build", "args": [n]})).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 202);
        ids.push(body["id"].as_str().unwrap().to_owned());
        if reported_after.is_none() && app.health().await["async_available"] == false {
            reported_after = Some(blackholed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slowest < Duration::from_millis(500), "a POST took {slowest:?}");
    let reported_after = reported_after.expect("health reported the blackhole");
    assert!(
        reported_after < Duration::from_secs(5),
        "reported after {reported_after:?}"
    );

    proxy.set_mode(FaultMode::Pass);
    let messages = consume(&queue, ids.len(), Duration::from_secs(30)).await;
    let mut delivered: Vec<String> = messages.iter().map(|m| m.task_id()).collect();
    delivered.dedup();
    for id in &ids {
        assert!(delivered.contains(id), "task {id} was delivered after recovery");
    }
    app.wait_for_health(Duration::from_secs(15), |h| h["status"] == "pass")
        .await;
    app.stop().await.unwrap();
    delete_queues(&[&queue]).await;
}

#[tokio::test]
async fn health_stream_announces_changes() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("stream");
    let (proxy, app) = spawn_behind_proxy(dir.path(), &queue).await;

    let mut stream = app.client.get(app.url("/v1/health/stream")).send().await.unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    let mut next_event = async || -> Value {
        loop {
            if let Some(end) = seen.find("\n\n") {
                let event: String = seen.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return serde_json::from_str(data).unwrap();
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .expect("stream open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let first = next_event().await;
    assert_eq!(first["status"], "pass");
    proxy.set_mode(FaultMode::Refuse);
    // Any traffic makes the relay notice quickly; the connection drop alone does too.
    let _ = post(&app, &json!({"task": "a.b"})).await;
    let changed = next_event().await;
    assert_eq!(changed["async_available"], false, "{changed}");
    proxy.set_mode(FaultMode::Pass);
    let mut recovered = next_event().await;
    while recovered["status"] != "pass" {
        recovered = next_event().await;
    }
    assert_eq!(recovered["async_available"], true);
    drop(app);
    delete_queues(&[&queue]).await;
}

#[tokio::test]
async fn probes_and_metrics_answer() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(dir.path(), &refused_url(), &[("export", "export")]);
    let app = spawn_app(settings).await;
    let live = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    let health = app.client.get(app.url("/v1/health")).send().await.unwrap();
    assert_eq!(health.headers()["content-type"], "application/health+json");
    let health: Value = health.json().await.unwrap();
    for check in ["broker:connection", "breaker:state", "outbox:depth", "outbox:oldestAge"] {
        assert!(health["checks"][check][0]["status"].is_string(), "{check}: {health}");
    }
    let (status, _) = post(&app, &json!({"task": "export.project", "args": [1]})).await;
    assert_eq!(status, 202);
    let metrics = app.metrics().await;
    assert!(metrics.contains("taskgate_outbox_depth"), "{metrics}");
    assert!(metrics.contains("taskgate_tasks_accepted_total"), "{metrics}");
    let missing = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["content-type"], "application/problem+json");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn unroutable_message_is_dead_lettered_and_the_rest_keeps_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let doomed = unique("doomed");
    let healthy = unique("healthy");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&doomed, "doomed"), (&healthy, "healthy")]);
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(10), |h| h["status"] == "pass")
        .await;
    // An operator deletes a queue under the running gateway: its messages
    // now have nowhere to go and RabbitMQ returns them (mandatory).
    delete_queues(&[&doomed]).await;

    let (status, poisoned) = post(&app, &json!({"task": "doomed.job", "args": [1]})).await;
    assert_eq!(status, 202);
    let (status, fine) = post(&app, &json!({"task": "healthy.job", "args": [2]})).await;
    assert_eq!(status, 202);

    let messages = consume(&healthy, 1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].task_id(), fine["id"].as_str().unwrap());

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status: Value = app
            .client
            .get(app.url(&format!("/v1/tasks/{}", poisoned["id"].as_str().unwrap())))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["state"] == "dead_letter" || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["state"], "dead_letter", "{status}");
    assert!(
        status["last_error"].as_str().unwrap().contains("unroutable"),
        "{status}"
    );
    let health = app.health().await;
    assert_eq!(
        health["status"], "pass",
        "a poison message does not open the breaker: {health}"
    );
    assert_eq!(health["checks"]["outbox:depth"][0]["observedValue"], 0);
    app.stop().await.unwrap();
    delete_queues(&[&healthy]).await;
}
