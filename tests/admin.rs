//! The admin API over HTTP: token rules (header, environment, loopback
//! without a token, production refusing to start without one), problem+json
//! refusals, paging, and the NDJSON export and import.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::app::{binary_path, test_settings, unique};
use support::operator::{refused_amqp_url, start_gateway};

const TOKEN: &str = "admin-secret-token-of-at-least-32-bytes";

/// Every admin route, as (method, path).
const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/outbox"),
    ("GET", "/v1/outbox/tasks"),
    ("DELETE", "/v1/outbox/tasks"),
    ("POST", "/v1/outbox/drain"),
    ("POST", "/v1/outbox/pause"),
    ("POST", "/v1/outbox/resume"),
    ("GET", "/v1/outbox/export"),
    ("POST", "/v1/outbox/import"),
    ("GET", "/v1/dead-letters"),
    ("DELETE", "/v1/dead-letters"),
    ("POST", "/v1/dead-letters/requeue"),
    ("POST", "/v1/dead-letters/7/requeue"),
    ("DELETE", "/v1/dead-letters/7"),
    ("GET", "/v1/breaker"),
    ("POST", "/v1/breaker/open"),
    ("POST", "/v1/breaker/close"),
    ("POST", "/v1/breaker/release"),
];

fn problem_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_admin_route_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path(), &refused_amqp_url(), &[("export", "#")]);
    settings.http.admin_token = TOKEN.into();
    let gateway = start_gateway(settings, dir.path()).await;
    let client = &gateway.client;
    for (method, path) in ADMIN_ROUTES {
        let method: reqwest::Method = method.parse().unwrap();
        let request = || client.request(method.clone(), gateway.url(path));

        let response = request().send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path} without a token");
        assert_eq!(problem_type(&response), "application/problem+json");
        assert!(response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], 401);
        assert!(body["detail"].as_str().unwrap().contains("Bearer"), "{body}");

        let response = request().basic_auth("admin", Some(TOKEN)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path} with Basic auth");

        let response = request().bearer_auth("not-the-token").send().await.unwrap();
        assert_eq!(response.status(), 403, "{method} {path} with a wrong token");
        assert_eq!(problem_type(&response), "application/problem+json");
        let response = request().bearer_auth(&TOKEN[..TOKEN.len() - 1]).send().await.unwrap();
        assert_eq!(response.status(), 403, "{method} {path} with a prefix of the token");
    }
    // Refused requests changed nothing.
    assert_eq!(gateway.state.breaker.snapshot().state.as_str(), "closed");
    assert!(!gateway.state.relay.is_paused());

    // The right token opens every route (answers are the routes' own).
    for (method, path) in ADMIN_ROUTES {
        let method: reqwest::Method = method.parse().unwrap();
        let response = client
            .request(method.clone(), gateway.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(
            status != 401 && status != 403,
            "{method} {path} with the token: {status}"
        );
        assert!(status < 500, "{method} {path}: {status}");
    }

    // Probes, health and the status page are public; unknown paths are 404.
    for path in ["/", "/healthz", "/v1/health", "/metrics"] {
        let response = client.get(gateway.url(path)).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
    }
    let response = client.get(gateway.url("/v1/outbox/nothing")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(problem_type(&response), "application/problem+json");
    gateway.stop().await;
}

#[tokio::test]
async fn without_a_token_development_admits_loopback_callers() {
    let dir = tempfile::tempdir().unwrap();
    let settings = test_settings(dir.path(), &refused_amqp_url(), &[("export", "#")]);
    assert!(settings.http.admin_token.is_empty());
    let gateway = start_gateway(settings, dir.path()).await;
    // The peer address reaches the check: a caller on 127.0.0.1 is let in.
    // (Refusing other callers is covered by `http::admin`'s unit tests: a
    // test here cannot connect from a non-loopback address.)
    let response = gateway.client.get(gateway.url("/v1/outbox")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = gateway
        .client
        .post(gateway.url("/v1/breaker/open"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["state"], "forced_open");
    gateway.stop().await;
}

/// Runs `taskgate serve` with `env`; returns the child, its address and
/// what it logged before it listened, or its exit status and stderr if it
/// stopped instead.
fn serve(
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> Result<(std::process::Child, String, String), (Option<i32>, String)> {
    let mut command = Command::new(binary_path());
    command
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("TASKGATE_HTTP__ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut text = String::new();
    while let Some(Ok(line)) = lines.next() {
        if let Some(address) = line.split("address=").nth(1) {
            let address = address.split_whitespace().next().unwrap().to_owned();
            // Keep reading its log, or its writes would fail.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((child, address, text));
        }
        text.push_str(&line);
        text.push('\n');
    }
    Err((child.wait().unwrap().code(), text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_to_start_without_a_token_and_reads_it_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("production.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"production\"\n[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nkind = \"amqp\"\nurl = \"{}\"\n\
             [outbox]\npath = \"{}\"\n[tracking]\ndatabase_url = \"postgres://taskgate@{}/taskgate\"\n",
            refused_amqp_url(),
            dir.path().join("outbox").display(),
            // Nothing listens there: start-up must not wait for the database.
            support::operator::closed_address(),
        ),
    )
    .unwrap();
    let (code, stderr) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || serve(&config, &[]).map(|_| ()).unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("http.admin_token"), "{stderr}");

    let (mut child, address, startup_log) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            serve(&config, &[("TASKGATE_HTTP__ADMIN_TOKEN", TOKEN)]).map_err(|(code, text)| format!("{code:?} {text}"))
        }
    })
    .await
    .unwrap()
    .expect("starts with the token from the environment");
    assert!(
        startup_log.contains("registry.strict is off in production"),
        "production warns when any task name is accepted: {startup_log}"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://{address}/v1/outbox");
    let refused = client.get(&url).send().await.unwrap();
    assert_eq!(
        refused.status(),
        401,
        "production does not admit loopback callers without the token"
    );
    let admitted = client.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(admitted.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// One refused request: method, path, body, expected status and field.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, u16, Option<&'a str>);

#[tokio::test]
async fn refusals_are_problems_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path(), &refused_amqp_url(), &[("export", "export")]);
    settings.http.admin_token = TOKEN.into();
    let gateway = start_gateway(settings, dir.path()).await;
    let send = |method: &str, path: &str, body: Option<&str>| {
        let mut request = gateway
            .client
            .request(method.parse().unwrap(), gateway.url(path))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/x-ndjson")
                .body(body.to_owned());
        }
        request.send()
    };
    let cases: Vec<Case> = vec![
        ("GET", "/v1/outbox/tasks?limit=0", None, 422, Some("limit")),
        ("GET", "/v1/outbox/tasks?limit=5000", None, 422, Some("limit")),
        ("GET", "/v1/outbox/tasks?limit=lots", None, 422, None),
        ("GET", "/v1/outbox/tasks?cursor=bm9wZQ", None, 422, Some("cursor")),
        ("GET", "/v1/outbox/tasks?colour=blue", None, 422, None),
        ("GET", "/v1/dead-letters?after=minus", None, 422, None),
        ("DELETE", "/v1/dead-letters/abc", None, 404, None),
        ("DELETE", "/v1/dead-letters/999", None, 404, None),
        ("POST", "/v1/dead-letters/999/requeue", None, 404, None),
        ("PUT", "/v1/breaker/open", None, 405, None),
        (
            "POST",
            "/v1/outbox/import",
            Some("{\"nope\": 1}\n"),
            422,
            Some("line 1"),
        ),
        (
            "POST",
            "/v1/outbox/import",
            Some(concat!(
                r#"{"id":"6c1c5d38-5d2e-4f5e-9a6e-0c9f8a3f0e11","task":"report.build","args":[],"kwargs":{},"#,
                r#""routing_key":"report","queues":["export"],"properties":{},"accepted_at":"2026-01-01T00:00:00Z"}"#
            )),
            422,
            Some("line 1"),
        ),
    ];
    for (method, path, body, status, field) in cases {
        let response = send(method, path, body).await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(problem_type(&response), "application/problem+json", "{method} {path}");
        let problem: Value = response.json().await.unwrap();
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()), "{problem}");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{method} {path}: {problem}");
        }
    }
    assert_eq!(gateway.report().await["depth"], 0, "refused imports wrote nothing");
    gateway.stop().await;
}

#[tokio::test]
async fn listing_pages_with_a_cursor_and_export_streams_what_import_reads() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("admin-page");
    let mut settings = test_settings(dir.path(), &refused_amqp_url(), &[(&queue, "#")]);
    settings.http.admin_token = TOKEN.into();
    let gateway = start_gateway(settings, dir.path()).await;
    let mut ids = Vec::new();
    for n in 0..25 {
        ids.push(
            gateway
                .post_accepted(json!({"task": "export.project", "args": [n]}))
                .await,
        );
    }
    let mut listed = Vec::new();
    let mut path = "/v1/outbox/tasks?limit=10".to_owned();
    loop {
        let page: Value = gateway.admin_get(&path).await.json().await.unwrap();
        for task in page["tasks"].as_array().unwrap() {
            listed.push(task["id"].as_str().unwrap().to_owned());
            assert_eq!(task["queues"], json!([queue]));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/outbox/tasks?limit=10&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(listed, ids, "every task once, in order");

    let response = gateway.admin_get("/v1/outbox/export").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    assert_eq!(response.headers()["x-taskgate-outbox-depth"], "25");
    let body = response.text().await.unwrap();
    let exported: Vec<String> = body
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(exported, ids);

    let response = gateway
        .client
        .post(gateway.url("/v1/outbox/import"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"imported": 0, "skipped": 25})
    );

    let response = gateway
        .client
        .delete(gateway.url("/v1/outbox/tasks"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"purged": 25}));
    let report = gateway.report().await;
    assert_eq!((report["depth"].clone(), report["bytes"].clone()), (json!(0), json!(0)));
    gateway.stop().await;
}

/// An operator's pause and forced-open breaker outlive a restart (a deploy
/// during maintenance must not start publishing into it); resuming and
/// releasing after the restart publishes what spooled meanwhile.
#[tokio::test]
async fn a_pause_and_a_forced_breaker_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tg-held");
    let settings = test_settings(dir.path(), support::app::RABBITMQ_URL, &[(queue.as_str(), "#")]);
    let gateway = start_gateway(settings.clone(), dir.path()).await;
    for path in ["/v1/outbox/pause", "/v1/breaker/open"] {
        let response = gateway.admin_post(path).await;
        assert_eq!(response.status(), 200, "POST {path}");
    }
    gateway.stop().await;

    let gateway = start_gateway(settings, dir.path()).await;
    assert_eq!(gateway.report().await["paused"], true);
    let breaker: Value = gateway.admin_get("/v1/breaker").await.json().await.unwrap();
    assert_eq!(
        (breaker["state"].as_str(), breaker["forced"].as_bool()),
        (Some("forced_open"), Some(true))
    );
    let held = gateway.post_accepted(json!({"task": "export.held", "args": [1]})).await;
    // The broker is up: only the holds keep the task in the outbox.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(gateway.report().await["depth"], 1, "a held relay publishes nothing");

    let resumed: Value = gateway.admin_post("/v1/outbox/resume").await.json().await.unwrap();
    assert_eq!(resumed, json!({"paused": false}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gateway.report().await["depth"], 1, "the breaker is still forced open");
    let released: Value = gateway.admin_post("/v1/breaker/release").await.json().await.unwrap();
    assert_eq!(released["state"], "closed");
    let received = support::app::consume_ids(&queue, std::slice::from_ref(&held), Duration::from_secs(20)).await;
    assert!(
        received.iter().any(|message| message.task_id() == held),
        "the held task arrived"
    );
    gateway
        .wait_for_report(Duration::from_secs(10), |report| report["depth"] == 0)
        .await;
    gateway.stop().await;
    support::app::delete_queues(&[&queue]).await;
}
