//! The compiled binary: configuration errors, `check-config`, graceful
//! shutdown on SIGTERM, and no loss on `kill -9` under concurrent load.

mod support;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::app::{
    binary_path, consume, consume_ids, delete_queues, ready_messages, test_settings, unique, write_config,
    GatewayProcess, RABBITMQ_URL,
};
use support::fault_proxy::{FaultMode, FaultProxy};

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[http]\nmax_body_bytes = \"big\"\n").unwrap();
    let output = Command::new(binary_path())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("http.max_body_bytes"), "{stderr}");

    // --config works before the subcommand too, and the environment is read.
    let output = Command::new(binary_path())
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("TASKGATE_HTTP__MAX_BODY_BYTES", "not-a-number")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));

    let output = Command::new(binary_path())
        .arg("check-config")
        .env("TASKGATE_BROKER__URL", "amqp://user:s3cret@broker:5672/%2f")
        .env("TASKGATE_HTTP__ADMIN_TOKEN", "very-secret-token")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("amqp://user:****@broker:5672/%2f"), "{stdout}");
    assert!(
        !stdout.contains("s3cret") && !stdout.contains("very-secret-token"),
        "{stdout}"
    );

    let output = Command::new(binary_path())
        .args(["check-config", "--config", "/nonexistent/taskgate.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
}

fn post_blocking(client: &reqwest::blocking::Client, url: &str, body: &Value) -> Option<String> {
    let response = client.post(url).json(body).send().ok()?;
    if response.status().as_u16() != 202 {
        return None;
    }
    let body: Value = response.json().ok()?;
    Some(body["id"].as_str()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_accepted_task() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("kill9");
    // The broker is unreachable while we load and kill, so everything
    // accepted must come back from the outbox after the restart.
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&queue, "#")],
    );
    let config = dir.path().join("taskgate.toml");
    write_config(&settings, &config);
    let mut gateway = GatewayProcess::start(&config, &dir.path().join("first.log"));

    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let url = gateway.url("/v1/tasks");
    let writers: Vec<_> = (0..16)
        .map(|writer| {
            let accepted = accepted.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                for n in 0.. {
                    match post_blocking(&client, &url, &json!({"task": "load.test", "args": [writer, n]})) {
                        Some(id) => accepted.lock().unwrap().push(id),
                        None => break,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.signal("KILL");
    assert_eq!(
        gateway.wait(Duration::from_secs(5)),
        None,
        "killed by a signal, no exit code"
    );
    for writer in writers {
        writer.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "the load ran: {} tasks accepted", accepted.len());

    proxy.set_mode(FaultMode::Pass);
    let restarted = GatewayProcess::start(&config, &dir.path().join("second.log"));
    let messages = consume_ids(&queue, &accepted, Duration::from_secs(60)).await;
    let delivered: HashSet<String> = messages.iter().map(|m| m.task_id()).collect();
    let missing: Vec<&String> = accepted.iter().filter(|id| !delivered.contains(*id)).collect();
    if let Some(first) = missing.first() {
        let status = reqwest::get(restarted.url(&format!("/v1/tasks/{first}")))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        panic!(
            "{} of {} accepted tasks lost ({} messages, {} distinct); the gateway says of {first}: {status}",
            missing.len(),
            accepted.len(),
            messages.len(),
            delivered.len()
        );
    }
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_restart_resumes_from_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("sigterm");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    let mut settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&queue, "#")],
    );
    // The handshake over the slow link below takes about a second, more on
    // a loaded machine: the test's 1 s connect timeout then failed the
    // first attempt (and a failed attempt rightly counts for the breaker).
    settings.broker.connect_timeout_ms = 4_000;
    let config = dir.path().join("taskgate.toml");
    write_config(&settings, &config);
    let mut gateway = GatewayProcess::start(&config, &dir.path().join("first.log"));
    let client = reqwest::Client::new();
    // Tasks in flight while the broker is slow, then more spooled behind a refusal.
    proxy.set_mode(FaultMode::Slow(Duration::from_millis(200)));
    let mut ids = Vec::new();
    for n in 0..20 {
        let response = client
            .post(gateway.url("/v1/tasks"))
            .json(&json!({"task": "graceful.stop", "args": [n]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    gateway.signal("TERM");
    let code = tokio::task::spawn_blocking(move || {
        let code = gateway.wait(Duration::from_secs(20));
        (code, gateway)
    })
    .await
    .unwrap();
    let (code, gateway) = code;
    let log = std::fs::read_to_string(&gateway.log).unwrap_or_default();
    assert_eq!(code, Some(0), "clean exit on SIGTERM; log:\n{log}");
    assert!(log.contains("no longer accepting"), "{log}");
    drop(gateway);

    // Restart onto a slow link: the first connection takes several hundred
    // milliseconds, and the backlog must wait for it rather than count
    // publishes into a connection still opening as broker failures.
    proxy.set_mode(FaultMode::Slow(Duration::from_millis(40)));
    let restarted = GatewayProcess::start(&config, &dir.path().join("second.log"));
    let messages = consume(&queue, ids.len(), Duration::from_secs(30)).await;
    let mut delivered: Vec<String> = messages.iter().map(|m| m.task_id()).collect();
    delivered.dedup();
    assert_eq!(
        delivered, ids,
        "every task delivered once, in order, across the restart"
    );
    let log = std::fs::read_to_string(&restarted.log).unwrap_or_default();
    assert!(
        !log.contains("circuit breaker opened"),
        "a restart with a backlog does not trip the breaker while connecting; log:\n{log}"
    );
    delete_queues(&[&queue]).await;
    let _ = RABBITMQ_URL;
}

/// A message whose headers nest arrays thousands deep, published straight
/// to the tracking queue (anyone who may publish to the exchange can put
/// one there), must not take the gateway down: lapin parses and drops such
/// a header recursively, and on a 2 MiB thread stack it aborted the whole
/// process (issue 14, "decoders never panic").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_header_on_the_tracking_queue_does_not_abort_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let platform = unique("platform");
    let mut settings = test_settings(dir.path(), RABBITMQ_URL, &[(&platform, "#")]);
    settings.tracking.sync_queue = Some(platform.clone());
    let config = dir.path().join("taskgate.toml");
    write_config(&settings, &config);
    let mut gateway = GatewayProcess::start(&config, &dir.path().join("taskgate.log"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health_url = gateway.url("/v1/health");
    let consuming = |client: reqwest::Client, url: String| async move {
        let health: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
        Some(health["checks"]["tracking:syncQueue"][0]["status"] == "pass")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consuming(client.clone(), health_url.clone()).await != Some(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "the tracking consumer never connected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Published by py-amqp from the test virtualenv, on a thread with room
    // for its recursion: lapin in this test process would overflow its own
    // I/O thread serialising the header, the very fault under test.
    let script = r#"
import sys, threading, amqp
sys.setrecursionlimit(100000)
threading.stack_size(512 * 1024 * 1024)
def publish():
    nested = None
    for _ in range(5000):
        nested = [nested]
    connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    connection.connect()
    channel = connection.channel()
    message = amqp.Message(b"[[], {}, {}]", application_headers={"task": "rawa.add", "deep": nested})
    channel.basic_publish(message, exchange="", routing_key=sys.argv[1])
    connection.close()
thread = threading.Thread(target=publish)
thread.start()
thread.join()
"#;
    let output = support::celery::python_command()
        .args(["-c", script, &platform])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // Long enough for the consumer to have received and handled it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gateway.wait(Duration::ZERO), None, "the gateway died");
    assert_eq!(
        consuming(client.clone(), health_url.clone()).await,
        Some(true),
        "still consuming the tracking queue"
    );
    assert_eq!(
        ready_messages(&platform).await,
        0,
        "the message was taken off the queue"
    );
    gateway.signal("TERM");
    assert_eq!(gateway.wait(Duration::from_secs(20)), Some(0));
    delete_queues(&[&platform]).await;
}

/// Logs an operator can act on (issue 15): the first failed connection
/// attempt and each change of cause at warn with the cause, not every
/// retry; a message the broker returns as one readable line naming the
/// task, its queue and RabbitMQ's reply (not lapin's dump of the message
/// as bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_and_returned_messages_are_logged_once_and_readably() {
    let dir = tempfile::tempdir().unwrap();
    let doomed = unique("doomed");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&doomed, "doomed")],
    );
    let exchange = settings.routing.exchange.clone();
    let config = dir.path().join("taskgate.toml");
    write_config(&settings, &config);
    let log_path = dir.path().join("taskgate.log");
    let mut gateway = GatewayProcess::start(&config, &log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap();
    // Reconnects every 100-500 ms: several attempts fail meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refusals: Vec<String> = log()
        .lines()
        .filter(|line| line.contains("cannot connect to the AMQP broker"))
        .map(str::to_owned)
        .collect();
    assert_eq!(refusals.len(), 1, "one warning for one cause: {refusals:#?}");
    assert!(
        refusals[0].contains("WARN") && refusals[0].contains("Connection refused"),
        "{}",
        refusals[0]
    );
    // A new cause (the connection now accepted, then reset) is logged at
    // warn again, with that cause.
    proxy.set_mode(FaultMode::Drop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failures: Vec<String> = log()
        .lines()
        .filter(|line| line.contains("cannot connect to the AMQP broker"))
        .map(str::to_owned)
        .collect();
    assert!(
        failures.len() >= 2 && failures[1].contains("WARN") && !failures[1].contains("Connection refused"),
        "the change of cause is logged: {failures:#?}"
    );

    proxy.set_mode(FaultMode::Pass);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let health: Value = client
            .get(gateway.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["status"] == "pass" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never connected: {health:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The queue goes away under the gateway: RabbitMQ returns its message.
    delete_queues(&[&doomed]).await;
    let id = gateway
        .post_batch(&client, vec![json!({"task": "doomed.job"})])
        .await
        .remove(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let returned = loop {
        if let Some(line) = log()
            .lines()
            .find(|line| line.contains("the broker returned the message"))
        {
            break line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no returned-message line: {}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let queue_field = format!("queue={doomed}");
    for expected in [
        id.as_str(),
        "doomed.job",
        queue_field.as_str(),
        "312",
        "NO_ROUTE",
        exchange.as_str(),
    ] {
        assert!(returned.contains(expected), "{expected:?} in {returned}");
    }
    assert!(
        !log().contains("Server returned us a message"),
        "lapin's byte dump of the message is not logged"
    );
    gateway.signal("TERM");
    assert_eq!(gateway.wait(Duration::from_secs(20)), Some(0));
    support::celery::delete_amqp_entities(RABBITMQ_URL, &[&doomed], &[&exchange]);
}

/// Every request has an id: the caller's `X-Request-Id` when it is a plain
/// token, else a new UUID; it comes back in the response header, in a
/// problem's body, and in the log lines the request caused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_an_id_in_its_answer_its_problem_and_its_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("request-id");
    let settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, "#")]);
    let exchange = settings.routing.exchange.clone();
    let config = dir.path().join("taskgate.toml");
    write_config(&settings, &config);
    let log_path = dir.path().join("taskgate.log");
    let mut gateway = GatewayProcess::start(&config, &log_path);
    let client = reqwest::Client::new();

    // A caller's id is kept and names the log line the request caused.
    let paused = client
        .post(gateway.url("/v1/outbox/pause"))
        .header("X-Request-Id", "platform-req.42")
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    assert_eq!(paused.headers()["x-request-id"], "platform-req.42");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        if let Some(line) = log.lines().find(|line| line.contains("relay paused by an operator")) {
            break line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no pause line in {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(line.contains("request_id=platform-req.42"), "{line}");
    assert!(line.contains("path=/v1/outbox/pause"), "{line}");

    // Without one (or with one that is not a plain token) a UUID is made,
    // and a refusal's problem body names it.
    for supplied in [None, Some("two words\"")] {
        let mut request = client
            .post(gateway.url("/v1/tasks"))
            .header("Content-Type", "application/json")
            .body("{not json");
        if let Some(supplied) = supplied {
            request = request.header("X-Request-Id", supplied);
        }
        let refused = request.send().await.unwrap();
        assert_eq!(refused.status(), 400);
        let id = refused.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "a UUID, not {id:?}");
        let problem: Value = refused.json().await.unwrap();
        assert_eq!(problem["request_id"], id.as_str(), "{problem}");
    }
    gateway.signal("TERM");
    assert_eq!(gateway.wait(Duration::from_secs(20)), Some(0));
    support::celery::delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}
