//! The `taskgate` operator commands, run as the real binary against a
//! running gateway and a real RabbitMQ: every command with and without
//! `--json`, exit statuses, drain with the breaker open, moving an outbox
//! between gateways with export and import, dead letters, purge
//! confirmation, and `--offline` with the server stopped and running.

mod support;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use support::app::{
    close_quietly, consume, delete_queues, test_settings, unique, write_config, GatewayProcess, RABBITMQ_URL,
};
use support::fault_proxy::{FaultMode, FaultProxy};
use support::operator::{closed_address, start_gateway, taskgate, taskgate_with, OperatorGateway};
use taskgate::relay::breaker::BreakerState;

const TOKEN: &str = "cli-test-token";

fn rabbitmq_address() -> std::net::SocketAddr {
    "127.0.0.1:5672".parse().unwrap()
}

/// Settings whose breaker, once open, stays open for a minute: a test that
/// sees tasks move knows something other than the open interval moved them.
fn settings(dir: &Path, broker_url: &str, queues: &[(&str, &str)]) -> taskgate::config::Settings {
    let mut settings = test_settings(dir, broker_url, queues);
    settings.http.admin_token = TOKEN.into();
    settings.breaker.open_min_ms = 60_000;
    settings.breaker.open_max_ms = 60_000;
    settings
}

async fn connected_gateway(dir: &Path, queue: &str) -> OperatorGateway {
    let gateway = start_gateway(settings(dir, RABBITMQ_URL, &[(queue, "#")]), dir).await;
    gateway
        .wait_for_health(Duration::from_secs(15), |health| health["status"] == "pass")
        .await;
    gateway
}

fn ids_of(messages: &[support::app::ReceivedMessage]) -> Vec<String> {
    messages.iter().map(|message| message.task_id()).collect()
}

/// (Re)declares `queue` and binds it to `exchange` with `#`, as the gateway
/// does on connect, for tests that removed it to make tasks unroutable.
async fn declare_bound_queue(exchange: &str, queue: &str) {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let connection = lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (scripts/test starts it)");
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    close_quietly(connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_health_stats_list_pause_and_breaker_with_and_without_json() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cli-basic");
    let gateway = connected_gateway(dir.path(), &queue).await;
    let config = gateway.config.clone();

    let health = taskgate(&config, &["health"]).await;
    health.assert_success();
    assert!(health.stdout.starts_with("pass"), "{health:#?}");
    assert!(health.stdout.contains("breaker:state"), "{health:#?}");
    let health = taskgate(&config, &["health", "--json"]).await;
    assert_eq!(health.code, Some(0));
    assert_eq!(health.json()["status"], "pass");

    let sent = taskgate(
        &config,
        &[
            "send",
            "export.project",
            "--args",
            r#"["org","proj"]"#,
            "--kwargs",
            r#"{"output_type":"xls"}"#,
        ],
    )
    .await;
    sent.assert_success();
    assert!(sent.stdout.starts_with("accepted "), "{sent:#?}");
    let first_id = sent.stdout.split_whitespace().nth(1).unwrap().to_owned();
    let sent = taskgate(
        &config,
        &[
            "send",
            "export.project",
            "--args",
            "[1]",
            "--property",
            "creator_id=u1",
            "--json",
        ],
    )
    .await;
    sent.assert_success();
    let accepted = sent.json();
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["queues"], json!([queue]));
    let second_id = accepted["id"].as_str().unwrap().to_owned();
    let messages = consume(&queue, 2, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&messages), vec![first_id, second_id]);
    assert_eq!(
        messages[0].body_json()[0],
        json!(["org", "proj"]),
        "arguments reach the broker as given"
    );

    let refused = taskgate(&config, &["send", "export.project", "--args", r#"{"a":1}"#]).await;
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("--args must be a JSON array"), "{refused:#?}");
    let refused = taskgate(&config, &["send", "bad name"]).await;
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("task"),
        "the server's problem is shown: {refused:#?}"
    );

    // Forced open for maintenance: health warns, tasks spool.
    let opened = taskgate(&config, &["breaker", "open"]).await;
    opened.assert_success();
    assert!(opened.stdout.contains("forced_open"), "{opened:#?}");
    let status = taskgate(&config, &["breaker", "status", "--json"]).await;
    status.assert_success();
    assert_eq!(status.json()["state"], "forced_open");
    assert_eq!(status.json()["forced"], true);
    let health = taskgate(&config, &["health"]).await;
    assert_eq!(health.code, Some(1), "warn exits 1: {health:#?}");
    let health = taskgate(&config, &["health", "--json"]).await;
    assert_eq!((health.code, health.json()["status"].clone()), (Some(1), json!("warn")));

    let mut spooled = Vec::new();
    for n in 0..5 {
        spooled.push(
            gateway
                .post_accepted(json!({"task": "export.project", "args": [n]}))
                .await,
        );
    }
    let stats = taskgate(&config, &["outbox", "stats"]).await;
    stats.assert_success();
    assert!(stats.stdout.contains("outbox: 5 tasks"), "{stats:#?}");
    assert!(stats.stdout.contains(&queue), "{stats:#?}");
    let stats = taskgate(&config, &["outbox", "stats", "--json"]).await;
    stats.assert_success();
    let report = stats.json();
    for key in [
        "depth",
        "bytes",
        "oldest_age_seconds",
        "dead_letters",
        "paused",
        "queues",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {report:#}");
    }
    assert_eq!(report["depth"], 5);
    assert!(report["bytes"].as_u64().unwrap() > 0);
    assert!(report["oldest_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(report["dead_letters"], 0);
    assert_eq!(report["paused"], false);
    assert_eq!(report["queues"][&queue]["depth"], 5);
    assert!(report["queues"][&queue]["oldest_age_seconds"].is_number());

    let list = taskgate(&config, &["outbox", "list"]).await;
    list.assert_success();
    for id in &spooled {
        assert!(list.stdout.contains(id.as_str()), "{id} not listed: {list:#?}");
    }
    let list = taskgate(&config, &["outbox", "list", "--json"]).await;
    list.assert_success();
    let listed: Vec<Value> = serde_json::from_value(list.json()).unwrap();
    let listed_ids: Vec<&str> = listed.iter().map(|task| task["id"].as_str().unwrap()).collect();
    assert_eq!(listed_ids, spooled.iter().map(String::as_str).collect::<Vec<_>>());
    for key in [
        "task",
        "args",
        "kwargs",
        "routing_key",
        "queues",
        "accepted_at",
        "attempts",
    ] {
        assert!(listed[0].get(key).is_some(), "{key} missing from {:#}", listed[0]);
    }
    let limited = taskgate(&config, &["outbox", "list", "--limit", "2", "--json"]).await;
    assert_eq!(limited.json().as_array().unwrap().len(), 2);

    let drain = taskgate(&config, &["outbox", "drain", "--timeout", "5"]).await;
    assert_eq!(drain.code, Some(1), "{drain:#?}");
    assert!(drain.stderr.contains("forced open"), "{drain:#?}");

    let paused = taskgate(&config, &["outbox", "pause"]).await;
    paused.assert_success();
    assert!(paused.stdout.contains("paused"), "{paused:#?}");
    let paused = taskgate(&config, &["outbox", "pause", "--json"]).await;
    assert_eq!(paused.json(), json!({"paused": true}));
    assert_eq!(
        taskgate(&config, &["outbox", "stats", "--json"]).await.json()["paused"],
        true
    );
    let drain = taskgate(&config, &["outbox", "drain"]).await;
    assert_eq!(drain.code, Some(1));
    assert!(drain.stderr.contains("paused"), "{drain:#?}");

    // Paused and forced closed: still nothing moves.
    let closed = taskgate(&config, &["breaker", "close", "--json"]).await;
    closed.assert_success();
    assert_eq!(closed.json()["state"], "forced_closed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gateway.report().await["depth"], 5, "a paused relay publishes nothing");
    let resumed = taskgate(&config, &["outbox", "resume", "--json"]).await;
    assert_eq!(resumed.json(), json!({"paused": false}));
    let messages = consume(&queue, 5, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&messages), spooled, "spooled tasks go out in order");
    let released = taskgate(&config, &["breaker", "release"]).await;
    released.assert_success();
    assert!(released.stdout.contains("breaker closed"), "{released:#?}");
    let resumed = taskgate(&config, &["outbox", "resume"]).await;
    assert!(resumed.stdout.contains("relay running"), "{resumed:#?}");

    gateway.stop().await;
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_readable_with_non_zero_exits() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cli-errors");
    let gateway = connected_gateway(dir.path(), &queue).await;
    let config = gateway.config.clone();

    // The token comes from the same config and environment as the server's.
    let wrong = taskgate_with(
        &config,
        &["outbox", "stats"],
        None,
        &[("TASKGATE_HTTP__ADMIN_TOKEN", "wrong")],
    )
    .await;
    assert_eq!(wrong.code, Some(1));
    assert!(wrong.stderr.contains("403"), "{wrong:#?}");
    let right = taskgate_with(
        &config,
        &["outbox", "stats", "--json"],
        None,
        &[("TASKGATE_HTTP__ADMIN_TOKEN", TOKEN)],
    )
    .await;
    right.assert_success();
    let mut tokenless = gateway.settings.clone();
    tokenless.http.admin_token.clear();
    let tokenless_config = dir.path().join("tokenless.toml");
    write_config(&tokenless, &tokenless_config);
    let missing = taskgate(&tokenless_config, &["breaker", "status"]).await;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("401") && missing.stderr.contains("TASKGATE_HTTP__ADMIN_TOKEN"),
        "{missing:#?}"
    );
    let from_env = taskgate_with(
        &tokenless_config,
        &["breaker", "status", "--json"],
        None,
        &[("TASKGATE_HTTP__ADMIN_TOKEN", TOKEN)],
    )
    .await;
    from_env.assert_success();
    assert_eq!(from_env.json()["state"], "closed");

    let nowhere = format!("http://{}", closed_address());
    for args in [
        vec!["outbox", "stats"],
        vec!["dead-letters", "list", "--json"],
        vec!["breaker", "status"],
        vec!["send", "export.project"],
    ] {
        let mut args = args.clone();
        args.extend(["--server", nowhere.as_str()]);
        let run = taskgate(&config, &args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert!(
            run.stderr.contains("cannot reach the taskgate server"),
            "{args:?}: {run:#?}"
        );
        assert!(run.stdout.is_empty(), "{args:?}: {run:#?}");
    }
    let health = taskgate(&config, &["health", "--server", &nowhere]).await;
    assert_eq!(
        health.code,
        Some(2),
        "an unreachable server is a failing one: {health:#?}"
    );
    let health = taskgate(&config, &["health", "--json", "--server", &nowhere]).await;
    assert_eq!(health.code, Some(2));
    assert_eq!(health.json()["status"], "fail");

    let offline_drain = taskgate(&config, &["outbox", "drain", "--offline"]).await;
    assert_eq!(offline_drain.code, Some(1));
    assert!(
        offline_drain.stderr.contains("needs the running server"),
        "{offline_drain:#?}"
    );

    gateway.stop().await;
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_probes_at_once_with_the_breaker_open() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cli-drain");
    let gateway = connected_gateway(dir.path(), &queue).await;
    let config = gateway.config.clone();

    // A burst of failed rounds opened the breaker; the broker is fine again
    // but the breaker waits out its open interval (a minute here).
    for _ in 0..gateway.settings.breaker.consecutive_failures {
        gateway.state.breaker.on_failure();
    }
    assert_eq!(gateway.state.breaker.snapshot().state, BreakerState::Open);
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            gateway
                .post_accepted(json!({"task": "export.project", "args": [n]}))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gateway.report().await["depth"], 20, "the open breaker holds the tasks");
    let breaker = taskgate(&config, &["breaker", "status"]).await;
    breaker.assert_success();
    assert!(
        breaker.stdout.contains("breaker open") && breaker.stdout.contains("next probe in"),
        "{breaker:#?}"
    );

    let drain = taskgate(&config, &["outbox", "drain", "--timeout", "30", "--json"]).await;
    drain.assert_success();
    let summary = drain.json();
    assert_eq!(summary["drained"], true, "{summary:#}");
    assert_eq!(summary["depth"], 0);
    assert_eq!(summary["published"], 20);
    assert!(summary["elapsed_seconds"].as_f64().unwrap() < 30.0);
    assert_eq!(gateway.state.breaker.snapshot().state, BreakerState::Closed);
    let messages = consume(&queue, 20, Duration::from_secs(10)).await;
    assert_eq!(ids_of(&messages), ids, "drained in order, each once");

    // Human output; an empty outbox drains at once.
    let drain = taskgate(&config, &["outbox", "drain"]).await;
    drain.assert_success();
    assert!(drain.stdout.contains("outbox drained"), "{drain:#?}");

    gateway.stop().await;
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_times_out_while_the_broker_is_down_with_a_progress_bar_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cli-drain-down");
    let proxy = FaultProxy::start(rabbitmq_address()).unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let broker_url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let gateway = start_gateway(settings(dir.path(), &broker_url, &[(&queue, "#")]), dir.path()).await;
    let config = gateway.config.clone();
    for n in 0..3 {
        gateway
            .post_accepted(json!({"task": "export.project", "args": [n]}))
            .await;
    }
    let drain = taskgate(&config, &["outbox", "drain", "--timeout", "2"]).await;
    assert_eq!(drain.code, Some(3), "{drain:#?}");
    assert!(
        drain.stderr.contains("3 tasks still waiting") && drain.stderr.contains("breaker"),
        "{drain:#?}"
    );
    assert!(
        !drain.stderr.contains("ETA"),
        "no progress bar without a terminal: {drain:#?}"
    );
    let drain = taskgate(&config, &["outbox", "drain", "--timeout", "1", "--json"]).await;
    assert_eq!(drain.code, Some(3));
    assert_eq!(drain.json()["drained"], false);
    assert_eq!(drain.json()["depth"], 3);

    // On a terminal (script(1) gives it one) the bar shows rate and ETA.
    let command = format!(
        "{} --config {} outbox drain --timeout 2",
        support::app::binary_path().display(),
        config.display()
    );
    let terminal = tokio::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("script(1) from util-linux runs the CLI on a terminal");
    let screen = String::from_utf8_lossy(&terminal.stdout);
    assert_eq!(terminal.status.code(), Some(3), "{screen}");
    assert!(screen.contains("ETA") && screen.contains("tasks"), "{screen}");

    gateway.stop().await;
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_moves_between_gateways_with_export_and_import_and_offline_mode() {
    let dir = tempfile::tempdir().unwrap();
    let all = unique("cli-move-all");
    let exports = unique("cli-move-export");
    let queues = [(all.as_str(), "#"), (exports.as_str(), "export")];
    // Gateway A never reaches its broker: everything it accepts spools.
    let proxy = FaultProxy::start(rabbitmq_address()).unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let a_settings = settings(&a_dir, &format!("amqp://guest:guest@{}/%2f", proxy.addr()), &queues);
    let a_config = a_dir.join("taskgate.toml");
    write_config(&a_settings, &a_config);
    let mut gateway_a = GatewayProcess::start(&a_config, &a_dir.join("a.log"));
    let mut a_file_settings = a_settings.clone();
    a_file_settings.http.listen = gateway_a.address;
    write_config(&a_file_settings, &a_config);

    let client = reqwest::Client::new();
    let mut accepted = Vec::new();
    let mut export_ids = Vec::new();
    for n in 0..30 {
        let task = if n % 3 == 0 { "export.project" } else { "report.build" };
        let response = client
            .post(gateway_a.url("/v1/tasks"))
            .json(&json!({"task": task, "args": [n], "kwargs": {"n": n}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        if task == "export.project" {
            export_ids.push(id.clone());
        }
        accepted.push(id);
    }

    // While A runs, --offline says so instead of failing obscurely.
    let out = dir.path().join("refused.ndjson");
    for args in [
        vec!["outbox", "stats", "--offline"],
        vec!["dead-letters", "list", "--offline"],
        vec!["outbox", "export", "--offline", "--out", out.to_str().unwrap()],
    ] {
        let run = taskgate(&a_config, &args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert!(
            run.stderr.contains("in use by a running taskgate server") && run.stderr.contains("without --offline"),
            "{args:?}: {run:#?}"
        );
    }
    assert!(!out.exists() && !dir.path().join("refused.ndjson.partial").exists());
    // Online export, from the running server.
    let online_file = dir.path().join("online.ndjson");
    let online = taskgate(
        &a_config,
        &["outbox", "export", "--out", online_file.to_str().unwrap(), "--json"],
    )
    .await;
    online.assert_success();
    assert_eq!(online.json()["exported"], 30);
    assert_eq!(std::fs::read_to_string(&online_file).unwrap().lines().count(), 30);

    // The host dies.
    gateway_a.signal("KILL");
    assert_eq!(gateway_a.wait(Duration::from_secs(10)), None);
    drop(gateway_a);

    let stats = taskgate(&a_config, &["outbox", "stats", "--offline", "--json"]).await;
    stats.assert_success();
    let report = stats.json();
    assert_eq!(report["depth"], 30, "{report:#}");
    assert_eq!(report["paused"], false);
    assert_eq!(report["queues"][&all]["depth"], 30);
    assert_eq!(report["queues"][&exports]["depth"], 10);
    let stats = taskgate(&a_config, &["outbox", "stats", "--offline"]).await;
    stats.assert_success();
    assert!(stats.stdout.contains("not running (offline)"), "{stats:#?}");
    let list = taskgate(&a_config, &["outbox", "list", "--offline", "--json"]).await;
    list.assert_success();
    assert_eq!(list.json().as_array().unwrap().len(), 30);
    let list = taskgate(&a_config, &["outbox", "list", "--offline", "--limit", "3"]).await;
    list.assert_success();
    assert!(
        list.stdout.contains(&accepted[2]) && !list.stdout.contains(&accepted[3]),
        "{list:#?}"
    );
    let letters = taskgate(&a_config, &["dead-letters", "list", "--offline", "--json"]).await;
    letters.assert_success();
    assert_eq!(letters.json(), json!([]));
    let letters = taskgate(&a_config, &["dead-letters", "list", "--offline"]).await;
    assert!(letters.stdout.contains("no dead letters"), "{letters:#?}");

    let moved = dir.path().join("moved.ndjson");
    let export = taskgate(
        &a_config,
        &["outbox", "export", "--offline", "--out", moved.to_str().unwrap()],
    )
    .await;
    export.assert_success();
    assert!(export.stdout.contains("exported 30 tasks"), "{export:#?}");
    let text = std::fs::read_to_string(&moved).unwrap();
    let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let exported: Vec<&str> = lines.iter().map(|line| line["id"].as_str().unwrap()).collect();
    assert_eq!(
        exported,
        accepted.iter().map(String::as_str).collect::<Vec<_>>(),
        "in acceptance order"
    );
    for key in ["id", "task", "args", "kwargs", "routing_key", "queues", "accepted_at"] {
        assert!(lines[0].get(key).is_some(), "{key} missing from {}", lines[0]);
    }
    // Standard output works too (the summary goes to stderr).
    let to_stdout = taskgate(&a_config, &["outbox", "export", "--offline"]).await;
    to_stdout.assert_success();
    assert_eq!(to_stdout.stdout, text);

    // Gateway B, alive, on the real broker, imports it.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut b_settings = settings(&b_dir, RABBITMQ_URL, &queues);
    b_settings.routing.exchange = a_settings.routing.exchange.clone();
    b_settings.http.admin_token = "another-token".into();
    let gateway_b = start_gateway(b_settings, &b_dir).await;
    let import = taskgate(
        &gateway_b.config,
        &["outbox", "import", moved.to_str().unwrap(), "--json"],
    )
    .await;
    import.assert_success();
    assert_eq!(import.json(), json!({"imported": 30, "skipped": 0}));
    let again = taskgate(&gateway_b.config, &["outbox", "import", online_file.to_str().unwrap()]).await;
    again.assert_success();
    assert!(
        again.stdout.contains("imported 0 tasks") && again.stdout.contains("30 skipped"),
        "{again:#?}"
    );

    let delivered = consume(&all, 30, Duration::from_secs(20)).await;
    assert_eq!(
        ids_of(&delivered),
        accepted,
        "each task once, in order, on the catch-all queue"
    );
    let delivered = consume(&exports, 10, Duration::from_secs(20)).await;
    assert_eq!(ids_of(&delivered), export_ids, "each export task once on its queue");
    assert!(
        consume(&all, 1, Duration::from_secs(2)).await.is_empty(),
        "nothing is delivered twice"
    );
    assert!(consume(&exports, 1, Duration::from_secs(1)).await.is_empty());

    // A bad line is named by its place in the file; nothing of its chunk is written.
    let bad = dir.path().join("bad.ndjson");
    std::fs::write(&bad, format!("{}\n\n{{\"id\": 1}}\n", text.lines().next().unwrap())).unwrap();
    let refused = taskgate(&gateway_b.config, &["outbox", "import", bad.to_str().unwrap()]).await;
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.contains("bad.ndjson:3:"), "{refused:#?}");

    gateway_b.stop().await;
    delete_queues(&[&all, &exports]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_requeued_and_purged_and_purge_asks_first() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cli-dead");
    let gateway = connected_gateway(dir.path(), &queue).await;
    let config = gateway.config.clone();
    let exchange = gateway.settings.routing.exchange.clone();

    // With its queue gone, the broker returns every task as unroutable.
    delete_queues(&[&queue]).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            gateway
                .post_accepted(json!({"task": "export.project", "args": [n]}))
                .await,
        );
    }
    gateway
        .wait_for_report(Duration::from_secs(15), |report| report["dead_letters"] == 3)
        .await;
    let list = taskgate(&config, &["dead-letters", "list"]).await;
    list.assert_success();
    assert!(
        list.stdout.contains("unroutable") && list.stdout.contains(&ids[0]),
        "{list:#?}"
    );
    let list = taskgate(&config, &["dead-letters", "list", "--json"]).await;
    list.assert_success();
    let letters = list.json();
    let letters = letters.as_array().expect("a JSON array");
    assert_eq!(letters.len(), 3);
    let dead_ids: Vec<&str> = letters
        .iter()
        .map(|letter| letter["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(dead_ids, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(letters[0]["reason"].as_str().unwrap().contains("unroutable"));
    let letter_ids: Vec<String> = letters.iter().map(|letter| letter["id"].to_string()).collect();

    declare_bound_queue(&exchange, &queue).await;
    let one = taskgate(&config, &["dead-letters", "requeue", &letter_ids[1], "--json"]).await;
    one.assert_success();
    assert_eq!(one.json()[0]["task_id"], json!(ids[1]));
    assert_eq!(
        ids_of(&consume(&queue, 1, Duration::from_secs(10)).await),
        vec![ids[1].clone()]
    );
    let missing = taskgate(&config, &["dead-letters", "requeue", &letter_ids[1]]).await;
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("no dead letter"), "{missing:#?}");
    let rest = taskgate(&config, &["dead-letters", "requeue", "--all"]).await;
    rest.assert_success();
    assert!(rest.stdout.contains("requeued 2 dead letters"), "{rest:#?}");
    assert_eq!(
        ids_of(&consume(&queue, 2, Duration::from_secs(10)).await),
        vec![ids[0].clone(), ids[2].clone()]
    );
    let all_again = taskgate(&config, &["dead-letters", "requeue", "--all", "--json"]).await;
    assert_eq!(all_again.json(), json!({"requeued": 0, "undecodable": 0}));

    delete_queues(&[&queue]).await;
    for n in 0..2 {
        gateway
            .post_accepted(json!({"task": "export.project", "args": [n]}))
            .await;
    }
    gateway
        .wait_for_report(Duration::from_secs(15), |report| report["dead_letters"] == 2)
        .await;
    let declined = taskgate(&config, &["dead-letters", "purge"]).await;
    assert_eq!(declined.code, Some(1), "no answer is a no: {declined:#?}");
    assert!(declined.stderr.contains("aborted"), "{declined:#?}");
    let letters = taskgate(&config, &["dead-letters", "list", "--json"]).await.json();
    assert_eq!(
        letters.as_array().unwrap().len(),
        2,
        "nothing purged without confirmation"
    );
    let first = letters[0]["id"].to_string();
    let one = taskgate(&config, &["dead-letters", "purge", &first, "--yes"]).await;
    one.assert_success();
    assert!(one.stdout.contains("purged 1 dead letters"), "{one:#?}");
    let rest = taskgate_with(&config, &["dead-letters", "purge", "--json"], Some("y\n"), &[]).await;
    rest.assert_success();
    assert_eq!(rest.json(), json!({"purged": 1}));
    assert_eq!(
        taskgate(&config, &["dead-letters", "list", "--json"]).await.json(),
        json!([])
    );

    // Outbox purge asks too.
    taskgate(&config, &["breaker", "open"]).await.assert_success();
    for n in 0..4 {
        gateway
            .post_accepted(json!({"task": "export.project", "args": [n]}))
            .await;
    }
    let declined = taskgate_with(&config, &["outbox", "purge"], Some("n\n"), &[]).await;
    assert_eq!(declined.code, Some(1), "{declined:#?}");
    assert!(declined.stderr.contains("Delete all 4 pending tasks"), "{declined:#?}");
    assert_eq!(gateway.report().await["depth"], 4);
    let purged = taskgate_with(&config, &["outbox", "purge"], Some("yes\n"), &[]).await;
    purged.assert_success();
    assert!(purged.stdout.contains("purged 4 pending tasks"), "{purged:#?}");
    assert_eq!(gateway.report().await["depth"], 0);
    for n in 0..2 {
        gateway
            .post_accepted(json!({"task": "export.project", "args": [n]}))
            .await;
    }
    let purged = taskgate(&config, &["outbox", "purge", "--yes", "--json"]).await;
    purged.assert_success();
    assert_eq!(purged.json(), json!({"purged": 2}));
    let report = gateway.report().await;
    assert_eq!((report["depth"].clone(), report["bytes"].clone()), (json!(0), json!(0)));

    gateway.stop().await;
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_dead_letters_and_purge_work_on_a_stopped_server() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("cli-offline-dead");
    let gateway = connected_gateway(dir.path(), &queue).await;
    let config = gateway.config.clone();
    let exchange = gateway.settings.routing.exchange.clone();
    delete_queues(&[&queue]).await;
    let mut ids = Vec::new();
    for n in 0..2 {
        ids.push(
            gateway
                .post_accepted(json!({"task": "export.project", "args": [n]}))
                .await,
        );
    }
    gateway
        .wait_for_report(Duration::from_secs(15), |report| report["dead_letters"] == 2)
        .await;
    taskgate(&config, &["breaker", "open"]).await.assert_success();
    taskgate(&config, &["outbox", "pause"]).await.assert_success();
    gateway
        .post_accepted(json!({"task": "export.project", "args": ["pending"]}))
        .await;
    gateway.stop().await;

    let letters = taskgate(&config, &["dead-letters", "list", "--offline", "--json"]).await;
    letters.assert_success();
    let letters = letters.json();
    assert_eq!(letters.as_array().unwrap().len(), 2);
    let first = letters[0]["id"].to_string();
    let requeued = taskgate(&config, &["dead-letters", "requeue", "--offline", &first]).await;
    requeued.assert_success();
    let purged = taskgate(&config, &["dead-letters", "purge", "--offline", "--yes", "--json"]).await;
    purged.assert_success();
    assert_eq!(purged.json(), json!({"purged": 1}));
    let stats = taskgate(&config, &["outbox", "stats", "--offline", "--json"])
        .await
        .json();
    assert_eq!(
        (
            stats["depth"].clone(),
            stats["dead_letters"].clone(),
            stats["paused"].clone()
        ),
        (json!(2), json!(0), json!(true))
    );

    // The requeued task is published once a server runs again.
    declare_bound_queue(&exchange, &queue).await;
    let restarted = start_gateway(settings(dir.path(), RABBITMQ_URL, &[(&queue, "#")]), dir.path()).await;
    // The breaker forced open before the stop is still forced open.
    let status = taskgate(&config, &["breaker", "status", "--json"]).await.json();
    assert_eq!(status["state"], "forced_open", "{status}");
    taskgate(&config, &["breaker", "release"]).await.assert_success();
    taskgate(&config, &["outbox", "resume"]).await.assert_success();
    let delivered: HashSet<String> = ids_of(&consume(&queue, 2, Duration::from_secs(15)).await)
        .into_iter()
        .collect();
    assert!(delivered.contains(&ids[0]), "{delivered:?}");
    restarted
        .wait_for_report(Duration::from_secs(10), |report| report["depth"] == 0)
        .await;
    restarted.stop().await;

    let purge = taskgate(&config, &["outbox", "purge", "--offline", "--yes", "--json"]).await;
    purge.assert_success();
    assert_eq!(purge.json(), json!({"purged": 0}));
    let missing_dir = dir.path().join("nothing-here.toml");
    let mut elsewhere = restarted_settings(&config);
    elsewhere.outbox.path = dir.path().join("no-such-outbox");
    write_config(&elsewhere, &missing_dir);
    let missing = taskgate(&missing_dir, &["outbox", "stats", "--offline"]).await;
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("there is no outbox at"), "{missing:#?}");
    assert!(
        !dir.path().join("no-such-outbox").exists(),
        "--offline never creates an outbox"
    );
    delete_queues(&[&queue]).await;
}

fn restarted_settings(config: &Path) -> taskgate::config::Settings {
    taskgate::config::load(Some(config)).unwrap()
}

/// Production hygiene (issue 14), as `serve` meets it: an admin or submit
/// token shorter than 32 bytes is a configuration error (exit 64, naming
/// the key) before anything listens; a long one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_in_production_refuses_a_short_token() {
    let dir = tempfile::tempdir().unwrap();
    let production = |admin: &str, submit: &str| {
        let mut settings = settings(dir.path(), RABBITMQ_URL, &[(&unique("prod"), "#")]);
        settings.environment = taskgate::config::Environment::Production;
        settings.tracking.database_url = "postgres://postgres@127.0.0.1:5432/postgres".into();
        settings.http.admin_token = admin.into();
        settings.http.submit_token = submit.into();
        settings
    };
    let long = "a-production-token-of-32-bytes-x";
    assert_eq!(long.len(), 32);
    let config = dir.path().join("production.toml");
    for (settings, key) in [
        (production("short-admin-token", long), "http.admin_token"),
        (production(long, "short-submit"), "http.submit_token"),
    ] {
        write_config(&settings, &config);
        let run = taskgate(&config, &["serve"]).await;
        assert_eq!(run.code, Some(64), "{key}: {run:#?}");
        assert!(
            run.stderr.contains(key) && run.stderr.contains("32"),
            "names {key} and the rule: {run:#?}"
        );
    }
    write_config(&production(long, long), &config);
    taskgate(&config, &["check-config"]).await.assert_success();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_takes_celery_timing_queue_and_link_options() {
    let dir = tempfile::tempdir().unwrap();
    let (export_queue, other_queue) = (unique("cli-export"), unique("cli-other"));
    let gateway = start_gateway(
        settings(
            dir.path(),
            RABBITMQ_URL,
            &[(&export_queue, "export"), (&other_queue, "other")],
        ),
        dir.path(),
    )
    .await;
    gateway
        .wait_for_health(Duration::from_secs(15), |health| health["status"] == "pass")
        .await;
    let config = gateway.config.clone();

    // To the other queue by name, with a countdown, expiry in seconds and two callbacks.
    let sent = taskgate(
        &config,
        &[
            "send",
            "export.project",
            "--args",
            "[1]",
            "--queue",
            &other_queue,
            "--countdown",
            "30",
            "--expires",
            "600",
            "--link",
            "rawa.echo",
            "--link",
            "rawa.add",
            "--json",
        ],
    )
    .await;
    sent.assert_success();
    assert_eq!(sent.json()["routing_key"], "other");
    assert_eq!(sent.json()["queues"], json!([other_queue]));
    // An eta and an expiry as times.
    let sent = taskgate(
        &config,
        &[
            "send",
            "export.project",
            "--queue",
            &other_queue,
            "--eta",
            "2030-01-01T00:00:00Z",
            "--expires",
            "2030-01-02T00:00:00Z",
        ],
    )
    .await;
    sent.assert_success();

    let messages = consume(&other_queue, 2, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 2);
    let first = &messages[0];
    let now = chrono::Utc::now();
    let header_time = |message: &support::app::ReceivedMessage, name: &str| {
        chrono::DateTime::parse_from_rfc3339(message.headers[name].as_str().unwrap()).unwrap()
    };
    let eta = header_time(first, "eta");
    let expires = header_time(first, "expires");
    assert!((eta.timestamp() - now.timestamp() - 30).abs() <= 10, "eta {eta}");
    assert!(
        (expires.timestamp() - now.timestamp() - 600).abs() <= 10,
        "expires {expires}"
    );
    assert_eq!(
        first.body_json()[2]["callbacks"],
        json!([
            {"task": "rawa.echo", "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false},
            {"task": "rawa.add", "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}
        ])
    );
    let second = &messages[1];
    assert_eq!(second.headers["eta"], "2030-01-01T00:00:00+00:00");
    assert_eq!(second.headers["expires"], "2030-01-02T00:00:00+00:00");

    // Refusals name the option's field, and --countdown with --eta never reaches the server.
    let refused = taskgate(&config, &["send", "export.project", "--queue", "nowhere"]).await;
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    assert!(refused.stderr.contains("queue"), "{refused:#?}");
    let refused = taskgate(&config, &["send", "export.project", "--expires", "soon"]).await;
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    assert!(refused.stderr.contains("expires"), "{refused:#?}");
    let refused = taskgate(
        &config,
        &[
            "send",
            "export.project",
            "--countdown",
            "1",
            "--eta",
            "2030-01-01T00:00:00Z",
        ],
    )
    .await;
    assert_ne!(refused.code, Some(0), "{refused:#?}");
    delete_queues(&[&export_queue, &other_queue]).await;
}
