//! TLS that is really TLS (issue 14), against the local RabbitMQ's amqps
//! listener (127.0.0.1:5671) and PostgreSQL with `ssl = on`, both set up by
//! scripts/test with a test CA whose server certificate names `localhost`
//! only:
//!
//! - taskgate publishes over `amqps://` with `broker.tls_ca_file`, and a
//!   stock Celery worker runs the task; the listener requires a client
//!   certificate (mutual TLS): the broker sees taskgate's, and without one
//!   taskgate is refused;
//! - the same URL against the plain listener, a certificate for another host
//!   name, and a CA taskgate was not given never connect, and
//!   `broker:connection` says it was the TLS handshake that failed; with
//!   nothing listening it says the broker is unreachable instead;
//! - `check-config` refuses a CA or key file it cannot read;
//! - tracking works over `sslmode=verify-full` (and the connection is TLS),
//!   and verify-full against a name the certificate does not carry fails.

mod support;

use serde_json::{json, Value};
use sqlx::Connection as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::app::{
    binary_path, close_quietly, rabbitmqctl, ready_messages, spawn_app, test_settings, unique, write_config,
    RABBITMQ_URL,
};
use support::celery::{delete_amqp_entities, CeleryWorker, CeleryWorkerOptions};
use support::postgres::{tls_dir, TestDatabase};
use taskgate::config::Settings;

const AMQPS_URL: &str = "amqps://guest:guest@localhost:5671/%2f";

fn ca_file() -> PathBuf {
    let ca = tls_dir().join("ca.pem");
    assert!(
        ca.exists(),
        "{} is missing: scripts/test makes the test certificates and the TLS listeners",
        ca.display()
    );
    ca
}

/// Settings for the amqps listener: the test CA, and the client
/// certificate the listener requires.
fn amqps_settings(dir: &std::path::Path, url: &str, queue: &str) -> Settings {
    let mut settings = test_settings(dir, url, &[(queue, queue)]);
    settings.broker.tls_ca_file = Some(ca_file());
    settings.broker.tls_cert_file = Some(tls_dir().join("client.pem"));
    settings.broker.tls_key_file = Some(tls_dir().join("client.key"));
    settings
}

fn broker_check(health: &Value) -> &Value {
    &health["checks"]["broker:connection"][0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_amqps_and_a_stock_celery_worker_runs_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls");
    let settings = amqps_settings(dir.path(), AMQPS_URL, &queue);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let health = app
        .wait_for_health(Duration::from_secs(15), |h| broker_check(h)["status"] == "pass")
        .await;
    assert_eq!(
        broker_check(&health)["endpoint"],
        "amqps://guest:****@localhost:5671/%2f",
        "health names the amqps endpoint, password masked"
    );
    // The worker consumes over the plain listener: the same broker, so what
    // it runs is what taskgate sent over TLS.
    let worker = CeleryWorker::start_async(
        CeleryWorkerOptions::new(RABBITMQ_URL)
            .exchange(&exchange)
            .queue(&queue, &queue),
    )
    .await;
    let id = app
        .post_accepted(json!({"task": "rawa.add", "args": [20, 22], "routing_key": queue}))
        .await;
    let records = worker.wait_for_records_async(1, Duration::from_secs(60)).await;
    assert_eq!(records[0]["id"], id.as_str());
    assert_eq!(records[0]["args"], json!([20, 22]));
    drop(worker);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

/// Waits until the broker check has failed with an output, and checks that
/// nothing reached the queue meanwhile.
/// Returns the check's output.
async fn assert_never_connects(settings: Settings, queue: &str, expected: &[&str]) -> String {
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let response = app
        .post_task(&json!({"task": "rawa.add", "args": [1, 2], "routing_key": queue}))
        .await;
    assert_eq!(response.status(), 202, "tasks are still accepted");
    let health = app
        .wait_for_health(Duration::from_secs(15), |h| {
            let check = broker_check(h);
            check["status"] == "warn"
                && check["observedValue"] == false
                && check["output"].as_str().is_some_and(|o| o != "connecting")
        })
        .await;
    // Several attempts later it is still not connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health_later = app.health().await;
    assert_eq!(broker_check(&health_later)["observedValue"], false, "{health_later:#}");
    let output = broker_check(&health)["output"].as_str().unwrap().to_owned();
    for word in expected {
        assert!(
            output.to_lowercase().contains(&word.to_lowercase()),
            "broker:connection output {output:?} should mention {word:?}"
        );
    }
    assert_eq!(app.outbox_depth().await, 1, "the task waits in the outbox");
    app.stop().await.unwrap();
    // taskgate never declared the topology (it never got past TLS).
    assert!(!queue_exists(queue).await, "queue {queue} must not exist");
    delete_amqp_entities(RABBITMQ_URL, &[queue], &[&exchange]);
    output
}

async fn queue_exists(queue: &str) -> bool {
    let connection = lapin::Connection::connect(RABBITMQ_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let exists = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .is_ok();
    close_quietly(connection).await;
    exists
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_a_plain_listener_never_connects_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-plain");
    // 5672 speaks plain AMQP: the handshake fails, and there is no fallback.
    let settings = amqps_settings(dir.path(), "amqps://guest:guest@localhost:5672/%2f", &queue);
    assert_never_connects(settings, &queue, &["TLS handshake"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_nothing_listening_says_the_broker_is_unreachable_not_a_tls_failure() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-refused");
    // A port nobody listens on (bound, then let go).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = amqps_settings(dir.path(), &format!("amqps://guest:guest@localhost:{port}/%2f"), &queue);
    let output = assert_never_connects(settings, &queue, &["cannot reach", "refused"]).await;
    assert!(!output.contains("TLS handshake"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-name");
    // The server certificate names `localhost`, not 127.0.0.1.
    let settings = amqps_settings(dir.path(), "amqps://guest:guest@127.0.0.1:5671/%2f", &queue);
    assert_never_connects(settings, &queue, &["TLS", "certificate", "127.0.0.1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_an_unknown_authority_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-ca");
    // No tls_ca_file: the system roots do not know the test CA.
    let mut settings = amqps_settings(dir.path(), AMQPS_URL, &queue);
    settings.broker.tls_ca_file = None;
    assert_never_connects(settings, &queue, &["TLS", "certificate"]).await;
}

/// Subjects of the client certificates RabbitMQ saw on open connections.
fn peer_certificate_subjects() -> String {
    rabbitmqctl(&["list_connections", "peer_cert_subject", "--quiet", "--no-table-headers"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-mutual");
    let settings = amqps_settings(dir.path(), AMQPS_URL, &queue);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(15), |h| broker_check(h)["status"] == "pass")
        .await;
    let response = app
        .post_task(&json!({"task": "rawa.add", "args": [1, 1], "routing_key": queue}))
        .await;
    assert_eq!(response.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready_messages(&queue).await < 1 {
        assert!(Instant::now() < deadline, "the task never reached {queue}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let subjects = peer_certificate_subjects();
    assert!(
        subjects.contains("CN=taskgate-client"),
        "RabbitMQ sees the client certificate on a connection: {subjects}"
    );
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_the_mutual_tls_listener_refuses_taskgate() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-no-client-cert");
    let mut settings = amqps_settings(dir.path(), AMQPS_URL, &queue);
    settings.broker.tls_cert_file = None;
    settings.broker.tls_key_file = None;
    assert_never_connects(settings, &queue, &["TLS handshake", "certificate"]).await;
}

#[test]
fn check_config_refuses_tls_files_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taskgate.toml");
    let cases: Vec<(Settings, &str)> = {
        let missing_ca = {
            let mut settings = test_settings(dir.path(), AMQPS_URL, &[("q", "#")]);
            settings.broker.tls_ca_file = Some(dir.path().join("no-such-ca.pem"));
            settings
        };
        let not_a_certificate = {
            let garbage = dir.path().join("garbage.pem");
            std::fs::write(&garbage, "not a certificate\n").unwrap();
            let mut settings = test_settings(dir.path(), AMQPS_URL, &[("q", "#")]);
            settings.broker.tls_ca_file = Some(garbage);
            settings
        };
        let missing_key = {
            let mut settings = test_settings(dir.path(), AMQPS_URL, &[("q", "#")]);
            settings.broker.tls_ca_file = Some(ca_file());
            settings.broker.tls_cert_file = Some(tls_dir().join("client.pem"));
            settings.broker.tls_key_file = Some(dir.path().join("no-such.key"));
            settings
        };
        let certificate_as_key = {
            let mut settings = test_settings(dir.path(), AMQPS_URL, &[("q", "#")]);
            settings.broker.tls_cert_file = Some(tls_dir().join("client.pem"));
            settings.broker.tls_key_file = Some(tls_dir().join("client.pem"));
            settings
        };
        let missing_postgres_root = {
            let mut settings = test_settings(dir.path(), RABBITMQ_URL, &[("q", "#")]);
            settings.tracking.database_url = format!(
                "postgres://postgres@localhost/db?sslmode=verify-full&sslrootcert={}",
                dir.path().join("no-such-root.pem").display()
            );
            settings
        };
        let unknown_sslmode = {
            let mut settings = test_settings(dir.path(), RABBITMQ_URL, &[("q", "#")]);
            settings.tracking.database_url = "postgres://postgres@localhost/db?sslmode=verify".into();
            settings
        };
        vec![
            (missing_postgres_root, "tracking.database_url"),
            (unknown_sslmode, "tracking.database_url"),
            (missing_ca, "broker.tls_ca_file"),
            (not_a_certificate, "broker.tls_ca_file"),
            (missing_key, "broker.tls_key_file"),
            (certificate_as_key, "broker.tls_key_file"),
        ]
    };
    for (settings, key) in cases {
        write_config(&settings, &config);
        let output = Command::new(binary_path())
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{key}: {stderr}");
        assert!(stderr.contains(key), "names {key}: {stderr}");
    }
    // And the real files pass.
    let mut settings = test_settings(dir.path(), AMQPS_URL, &[("q", "#")]);
    settings.broker.tls_ca_file = Some(ca_file());
    settings.broker.tls_cert_file = Some(tls_dir().join("client.pem"));
    settings.broker.tls_key_file = Some(tls_dir().join("client.key"));
    write_config(&settings, &config);
    let output = Command::new(binary_path())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Connections to `database` that PostgreSQL reports as TLS, seen from a
/// plain (`sslmode=disable`) connection so the probe does not count itself.
async fn tls_connections_to(database: &str) -> i64 {
    let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1 AND s.ssl",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    let _ = admin.close().await;
    count
}

fn verify_full_url(host: &str, database: &TestDatabase) -> String {
    format!(
        "postgres://postgres@{host}:5432/{}?sslmode=verify-full&sslrootcert={}",
        database.name,
        ca_file().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_works_over_verify_full() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-track");
    let mut settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, &queue)]);
    settings.tracking.database_url = verify_full_url("localhost", &database);
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    app.wait_for_health(Duration::from_secs(20), |h| {
        h["checks"]["tracking:database"][0]["status"] == "pass"
    })
    .await;
    let id = app
        .post_accepted(json!({"task": "rawa.add", "args": [3, 4], "routing_key": queue}))
        .await;
    let pool = database.pool().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM background_tasks WHERE task_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        if rows == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "task {id} was never recorded over TLS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pool.close().await;
    assert!(
        tls_connections_to(&database.name).await >= 1,
        "taskgate's tracking connections are TLS"
    );
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_host_name() {
    let database = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-track-name");
    let mut settings = test_settings(dir.path(), RABBITMQ_URL, &[(&queue, &queue)]);
    settings.tracking.database_url = verify_full_url("127.0.0.1", &database);
    settings.tracking.connect_timeout_ms = 1_000;
    settings.tracking.retry_min_ms = 100;
    settings.tracking.retry_max_ms = 500;
    let exchange = settings.routing.exchange.clone();
    let app = spawn_app(settings).await;
    let health = app
        .wait_for_health(Duration::from_secs(20), |h| {
            h["checks"]["tracking:database"][0]["output"]
                .as_str()
                .is_some_and(|output| output.contains("unreachable") && output.to_lowercase().contains("certificate"))
        })
        .await;
    let output = health["checks"]["tracking:database"][0]["output"].as_str().unwrap();
    assert!(output.to_lowercase().contains("certificate"), "{output}");
    assert_eq!(tls_connections_to(&database.name).await, 0);
    app.stop().await.unwrap();
    delete_amqp_entities(RABBITMQ_URL, &[&queue], &[&exchange]);
}

/// `sslmode` as libpq has it, against PostgreSQL with `ssl = on` and a
/// certificate naming `localhost`: `disable` is plain text; `prefer` and
/// `require` encrypt without checking the certificate (so 127.0.0.1, a name
/// it does not carry, connects); with `sslrootcert`, `require` checks the
/// chain (libpq: "if a root CA file exists, sslmode=require behaves as
/// verify-ca"), as `verify-ca` does, so a root that did not sign it is
/// refused. (sqlx 0.8.6 also checks the host name for `verify-ca`,
/// transact-rs/sqlx#3793, so those cases use `localhost`; see
/// docs/configuration.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_and_sslrootcert_work_as_libpqs() {
    use taskgate::tracking::store::TrackingStore;
    let database = TestDatabase::create().await;
    let ca = ca_file().display().to_string();
    // Real authorities, none of which signed the test certificate.
    let other_roots = "/etc/ssl/certs/ca-certificates.crt";
    assert!(std::path::Path::new(other_roots).exists(), "{other_roots} is missing");
    let cases = [
        ("127.0.0.1", "disable".to_owned(), true, false),
        ("127.0.0.1", "prefer".to_owned(), true, true),
        ("127.0.0.1", "require".to_owned(), true, true),
        ("localhost", format!("require&sslrootcert={ca}"), true, true),
        ("localhost", format!("require&sslrootcert={other_roots}"), false, false),
        ("localhost", format!("verify-ca&sslrootcert={ca}"), true, true),
        (
            "localhost",
            format!("verify-ca&sslrootcert={other_roots}"),
            false,
            false,
        ),
        (
            "localhost",
            format!("verify-full&sslrootcert={other_roots}"),
            false,
            false,
        ),
    ];
    for (host, mode, connects, encrypted) in cases {
        let mut settings = Settings::default().tracking;
        settings.database_url = format!("postgres://postgres@{host}:5432/{}?sslmode={mode}", database.name);
        settings.connect_timeout_ms = 2_000;
        let store = TrackingStore::connect_lazy(&settings).unwrap();
        let pinged = store.ping().await;
        assert_eq!(pinged.is_ok(), connects, "{host} sslmode={mode}: {pinged:?}");
        if connects {
            let tls = tls_connections_to(&database.name).await;
            assert_eq!(tls >= 1, encrypted, "{host} sslmode={mode}: {tls} TLS connections");
        }
        store.close().await;
    }
}
