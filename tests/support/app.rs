//! Spawning the real taskgate for tests, on port 0, against real services.
//!
//! Every test app gets its own data directory, exchange and queue names
//! (a random suffix), so tests run in parallel against one RabbitMQ.
//! [`spawn_app`] runs the application in-process; [`GatewayProcess`] runs
//! the compiled binary, for the tests that need signals or `kill -9`.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use taskgate::app::Application;
use taskgate::config::Settings;
use taskgate::http::AppState;
use taskgate::task::routing::QueueBindingSettings;

pub const RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Settings for one isolated test gateway: fast timeouts and breaker so
/// fault tests finish in seconds, unique topology names.
pub fn test_settings(data_dir: &Path, broker_url: &str, queues: &[(&str, &str)]) -> Settings {
    let mut settings = Settings::default();
    settings.http.listen = "127.0.0.1:0".parse().unwrap();
    settings.http.shutdown_grace_ms = 5_000;
    settings.outbox.path = data_dir.join("outbox");
    // Each test app tracks into its own SQLite file (not ./data).
    settings.tracking.database_url = format!("sqlite://{}", data_dir.join("tracking.db").display());
    settings.broker.url = broker_url.to_owned();
    settings.broker.connect_timeout_ms = 1_000;
    settings.broker.publish_timeout_ms = 1_000;
    settings.broker.heartbeat_seconds = 2;
    settings.broker.reconnect_min_ms = 100;
    settings.broker.reconnect_max_ms = 500;
    settings.breaker.open_min_ms = 200;
    settings.breaker.open_max_ms = 1_000;
    settings.routing.exchange = unique("tg-exchange");
    settings.routing.queues = queues
        .iter()
        .map(|(name, binding_key)| QueueBindingSettings {
            name: (*name).to_owned(),
            binding_key: (*binding_key).to_owned(),
        })
        .collect();
    settings
}

pub struct TestApp {
    pub address: SocketAddr,
    pub base_url: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    /// The running gateway's shared state (breaker, relay, outbox), for
    /// tests that drive or inspect it directly.
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    let application = Application::build(settings.clone()).await.expect("taskgate builds");
    let address = application.local_addr();
    let state = application.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        base_url: format!("http://{address}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap(),
        settings,
        state,
        stop: Some(stop),
        join: Some(join),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn post_task(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/tasks"))
            .json(body)
            .send()
            .await
            .expect("POST /v1/tasks")
    }

    /// `POST /v1/tasks`, which must answer 202; returns the task id.
    pub async fn post_accepted(&self, body: Value) -> String {
        let response = self.post_task(&body).await;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{answer:#}");
        answer["id"].as_str().unwrap().to_owned()
    }

    pub async fn health(&self) -> Value {
        self.get_json("/v1/health").await
    }

    /// `GET path`, its body as JSON (whatever the status).
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path}: {error}"))
            .json()
            .await
            .unwrap_or_else(|error| panic!("GET {path} is not JSON: {error}"))
    }

    /// Polls health until `predicate` holds, or panics after `timeout`.
    pub async fn wait_for_health(&self, timeout: Duration, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let health = self.health().await;
            if predicate(&health) {
                return health;
            }
            assert!(Instant::now() < deadline, "health never matched; last: {health:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /metrics`, the Prometheus text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics are text")
    }

    /// A counter's value summed over all its labels (0 before it counted).
    pub async fn counter(&self, name: &str) -> u64 {
        counter_sum(&self.metrics().await, name)
    }

    pub async fn outbox_depth(&self) -> u64 {
        self.health().await["checks"]["outbox:depth"][0]["observedValue"]
            .as_u64()
            .unwrap()
    }

    /// Graceful stop, in the shutdown order; returns the run's outcome.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join.take().unwrap().await.expect("app task")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// Set by RabbitMQ on a message an earlier test consumer received and
    /// left unacknowledged (it had prefetched it when it closed): not a
    /// second publish.
    pub redelivered: bool,
    pub routing_key: String,
    pub exchange: String,
    pub headers: HashMap<String, Value>,
    pub properties: lapin::BasicProperties,
    pub body: Vec<u8>,
}

impl ReceivedMessage {
    pub fn task_id(&self) -> String {
        self.headers["id"].as_str().unwrap().to_owned()
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn amqp_to_json(value: &lapin::types::AMQPValue) -> Value {
    use lapin::types::AMQPValue as V;
    match value {
        V::Boolean(b) => Value::Bool(*b),
        V::ShortShortInt(n) => (*n).into(),
        V::ShortShortUInt(n) => (*n).into(),
        V::ShortInt(n) => (*n).into(),
        V::ShortUInt(n) => (*n).into(),
        V::LongInt(n) => (*n).into(),
        V::LongUInt(n) => (*n).into(),
        V::LongLongInt(n) => (*n).into(),
        V::Float(n) => serde_json::json!(*n),
        V::Double(n) => serde_json::json!(*n),
        V::ShortString(s) => Value::String(s.as_str().to_owned()),
        V::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        V::FieldArray(items) => Value::Array(items.as_slice().iter().map(amqp_to_json).collect()),
        V::FieldTable(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_to_json(v)))
                .collect(),
        ),
        V::Void => Value::Null,
        other => Value::String(format!("{other:?}")),
    }
}

/// Consumes up to `count` messages from `queue` (acknowledging them),
/// waiting at most `timeout` in all.
pub async fn consume(queue: &str, count: usize, timeout: Duration) -> Vec<ReceivedMessage> {
    consume_until(queue, timeout, |received| received.len() >= count).await
}

/// Consumes until every id in `expected` was seen (messages the gateway
/// wrote but never acknowledged to a client may come too), or `timeout`.
pub async fn consume_ids(queue: &str, expected: &[String], timeout: Duration) -> Vec<ReceivedMessage> {
    let mut waiting: std::collections::HashSet<String> = expected.iter().cloned().collect();
    let mut seen = 0;
    consume_until(queue, timeout, move |received| {
        for message in &received[seen..] {
            waiting.remove(&message.task_id());
        }
        seen = received.len();
        waiting.is_empty()
    })
    .await
}

async fn consume_until(
    queue: &str,
    timeout: Duration,
    mut done: impl FnMut(&[ReceivedMessage]) -> bool,
) -> Vec<ReceivedMessage> {
    let connection = Connection::connect(RABBITMQ_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (scripts/test starts it)");
    let deadline = tokio::time::Instant::now() + timeout;
    // The gateway declares its queues when it connects, which may be after
    // this call starts: retry until the queue exists.
    let mut consumer = loop {
        let channel = connection.create_channel().await.unwrap();
        match channel
            .basic_consume(
                queue.into(),
                "test-consumer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => break consumer,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "queue {queue} never appeared: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut received = Vec::new();
    while !done(&received) {
        let Ok(Some(delivery)) = tokio::time::timeout_at(deadline, consumer.next()).await else {
            break;
        };
        let delivery = delivery.expect("delivery");
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), amqp_to_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        received.push(ReceivedMessage {
            redelivered: delivery.redelivered,
            routing_key: delivery.routing_key.as_str().to_owned(),
            exchange: delivery.exchange.as_str().to_owned(),
            headers,
            properties: delivery.properties.clone(),
            body: delivery.data.clone(),
        });
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    close_quietly(connection).await;
    received
}

/// Ready messages in `queue` (unacknowledged ones are not counted); the
/// queue must exist.
pub async fn ready_messages(queue: &str) -> u32 {
    let connection = Connection::connect(RABBITMQ_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (scripts/test starts it)");
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    close_quietly(connection).await;
    declared.message_count()
}

/// Deletes test queues (best effort) so RabbitMQ does not fill up.
pub async fn delete_queues(queues: &[&str]) {
    if let Ok(connection) = Connection::connect(RABBITMQ_URL, ConnectionProperties::default()).await {
        if let Ok(channel) = connection.create_channel().await {
            for queue in queues {
                let _ = channel
                    .queue_delete((*queue).into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        close_quietly(connection).await;
    }
}

/// Closes a test's own AMQP connection, waiting at most a few seconds: a
/// close whose socket already went away can wait for its close-ok forever,
/// and a test's clean-up must not hang the suite.
pub async fn close_quietly(connection: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "done".into())).await;
}

/// The compiled taskgate binary, run as a child process.
pub struct GatewayProcess {
    pub child: Child,
    pub address: SocketAddr,
    pub base_url: String,
    pub log: PathBuf,
}

pub fn binary_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_taskgate"))
}

impl GatewayProcess {
    /// Starts `taskgate serve --config FILE` and waits until it listens.
    pub fn start(config: &Path, log: &Path) -> GatewayProcess {
        let log_file = std::fs::File::create(log).unwrap();
        let mut child = Command::new(binary_path())
            .args(["serve", "--config"])
            .arg(config)
            // The binary's own default filter (info, lapin's noise off),
            // whatever the developer's environment says.
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn taskgate");
        let stderr = child.stderr.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log_file = log_file;
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log_file, "{line}");
                if !sent {
                    if let Some(address) = line.split("address=").nth(1) {
                        let address = address.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = sender.send(address);
                        sent = true;
                    }
                }
            }
        });
        let address: SocketAddr = match receiver.recv_timeout(Duration::from_secs(20)) {
            Ok(address) => address.parse().unwrap(),
            Err(_) => {
                // Never leave a half-started gateway behind.
                let _ = child.kill();
                let _ = child.wait();
                panic!("taskgate did not print its listen address; log: {}", log.display());
            }
        };
        GatewayProcess {
            child,
            address,
            base_url: format!("http://{address}"),
            log: log.to_owned(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Posts `tasks` as one `POST /v1/tasks/batch`, which must be accepted;
    /// returns the ids in order.
    pub async fn post_batch(&self, client: &reqwest::Client, tasks: Vec<Value>) -> Vec<String> {
        let response = client
            .post(self.url("/v1/tasks/batch"))
            .json(&serde_json::json!({ "tasks": tasks }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["id"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes settings as a TOML config file for the binary.
pub fn write_config(settings: &Settings, path: &Path) {
    std::fs::write(path, settings.to_toml()).unwrap();
}

/// Runs `rabbitmqctl` on the local RabbitMQ (scripts/test starts it) and
/// returns its standard output; a failure fails the test.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/usr/local/sbin:/sbin",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("rabbitmqctl runs (scripts/test starts RabbitMQ)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The sum of a counter's samples in Prometheus text, over all its labels.
pub fn counter_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
