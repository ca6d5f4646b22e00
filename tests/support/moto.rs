//! Owns the SQS side of the integration tests: one moto server per test
//! binary (`moto_server` from the test virtualenv, on a free loopback port),
//! the fake AWS credentials taskgate's default credentials chain picks up,
//! and a test-side SQS client for reading back what taskgate sent.
//!
//! ```ignore
//! let moto = support::moto::server();                // started on first use
//! let prefix = support::moto::unique_prefix();       // isolates this test's queues
//! let settings = support::moto::sqs_settings(dir, &moto.endpoint_url(), &prefix, &[("export", "export")]);
//! let client = support::moto::client(&moto.endpoint_url());
//! ```
//!
//! The server lives as long as the test process: it runs under a small
//! Python wrapper that exits when its parent (the test binary) is gone, so
//! an aborted run leaves nothing behind. A missing virtualenv or a server
//! that does not come up fails the test (never a skip).

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use base64::Engine;
use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};
use taskgate::config::{BrokerKind, Settings};

/// The region taskgate, the test client and Celery workers all use (moto
/// keeps queues per region).
pub const REGION: &str = "us-east-1";
/// Fake credentials: moto accepts any.
pub const ACCESS_KEY: &str = "testing";
pub const SECRET_KEY: &str = "testing";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 3;

/// Runs `moto.server.main` and exits as soon as its parent has gone.
const WRAPPER: &str = r#"
import os, sys, threading, time
parent, port = int(sys.argv[1]), sys.argv[2]
def watch_parent():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch_parent, daemon=True).start()
from moto.server import main
main(["-H", "127.0.0.1", "-p", port])
"#;

pub struct MotoServer {
    address: SocketAddr,
    /// Kept so the process is not reaped early; it exits with the test
    /// process (see the wrapper).
    _child: Mutex<Child>,
    log: std::path::PathBuf,
}

impl MotoServer {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// What the server logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A Celery `broker_url` for kombu's SQS transport pointed at this
    /// server (kombu builds `http://host:port` from it; credentials are the
    /// user and password).
    pub fn celery_broker_url(&self) -> String {
        format!("sqs://{ACCESS_KEY}:{SECRET_KEY}@{}", self.address)
    }
}

/// The moto server of this test binary, started on first use.
pub fn server() -> &'static MotoServer {
    static SERVER: OnceLock<MotoServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        use_fake_aws_credentials();
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match start_server() {
                Ok(server) => return server,
                // Another process may have taken the free port we picked.
                Err(failure) => failures.push(failure),
            }
        }
        panic!("moto_server did not start:\n{}", failures.join("\n---\n"));
    })
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

fn start_server() -> Result<MotoServer, String> {
    let port = free_port();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let log = std::env::temp_dir().join(format!("taskgate-moto-{port}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
    let mut command = super::celery::python_command();
    command
        .args(["-c", WRAPPER])
        .arg(std::process::id().to_string())
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err));
    let mut child = command.spawn().map_err(|e| format!("spawn moto_server: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(MotoServer {
                address,
                _child: Mutex::new(child),
                log,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("moto_server exited with {status}:\n{output}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "moto_server not listening on {address} after {START_TIMEOUT:?}:\n{output}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Puts fake credentials where the standard AWS chain looks first (the
/// environment), for taskgate in this process and for Celery workers it
/// spawns, and keeps the chain away from instance metadata.
pub fn use_fake_aws_credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Edition 2021: safe; std's environment lock orders it against
        // every other std::env access in the process.
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

/// A queue name prefix no other test (or run) uses: `tg` + 10 hex + `-`.
pub fn unique_prefix() -> String {
    format!("tg{}-", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Test settings (see `app::test_settings`) for taskgate on SQS at
/// `endpoint_url`, with this test's queue prefix and queues created.
pub fn sqs_settings(data_dir: &Path, endpoint_url: &str, prefix: &str, queues: &[(&str, &str)]) -> Settings {
    let mut settings = super::app::test_settings(data_dir, "", queues);
    settings.broker.kind = BrokerKind::Sqs;
    settings.broker.region = Some(REGION.into());
    settings.broker.endpoint_url = Some(endpoint_url.to_owned());
    settings.broker.queue_name_prefix = Some(prefix.to_owned());
    settings.broker.create_queues = Some(true);
    settings
}

/// A test-side SQS client with static fake credentials.
pub fn client(endpoint_url: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint_url)
        .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "taskgate-tests"))
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

pub async fn queue_url(client: &aws_sdk_sqs::Client, sqs_name: &str) -> String {
    client
        .get_queue_url()
        .queue_name(sqs_name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetQueueUrl {sqs_name}: {}", aws_sdk_sqs::error::DisplayErrorContext(e)))
        .queue_url
        .expect("a queue URL")
}

/// One message as read back from SQS, with kombu's envelope decoded.
#[derive(Debug, Clone)]
pub struct SqsMessage {
    pub envelope: Value,
    pub body: Value,
    pub message_group_id: Option<String>,
    pub deduplication_id: Option<String>,
}

impl SqsMessage {
    pub fn task_id(&self) -> String {
        self.envelope["headers"]["id"].as_str().unwrap_or_default().to_owned()
    }
}

fn decode_message(body: &str) -> (Value, Value) {
    let engine = base64::engine::general_purpose::STANDARD;
    let envelope: Value =
        serde_json::from_slice(&engine.decode(body).expect("MessageBody is base64")).expect("kombu envelope is JSON");
    let task_body: Value = serde_json::from_slice(
        &engine
            .decode(envelope["body"].as_str().expect("envelope body"))
            .expect("envelope body is base64"),
    )
    .expect("task body is JSON");
    (envelope, task_body)
}

/// Receives (and deletes) up to `count` messages from the queue, waiting
/// at most `timeout` in all.
pub async fn receive(client: &aws_sdk_sqs::Client, sqs_name: &str, count: usize, timeout: Duration) -> Vec<SqsMessage> {
    let url = queue_url(client, sqs_name).await;
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while received.len() < count && Instant::now() < deadline {
        let output = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_system_attribute_names(MessageSystemAttributeName::MessageDeduplicationId)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "ReceiveMessage {sqs_name}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(e)
                )
            });
        for message in output.messages() {
            let (envelope, body) = decode_message(message.body().expect("a body"));
            let attribute = |name| {
                message
                    .attributes()
                    .and_then(|attributes| attributes.get(&name))
                    .cloned()
            };
            received.push(SqsMessage {
                envelope,
                body,
                message_group_id: attribute(MessageSystemAttributeName::MessageGroupId),
                deduplication_id: attribute(MessageSystemAttributeName::MessageDeduplicationId),
            });
            if let Some(handle) = message.receipt_handle() {
                let _ = client
                    .delete_message()
                    .queue_url(&url)
                    .receipt_handle(handle)
                    .send()
                    .await;
            }
        }
    }
    received
}

/// A queue attribute (e.g. `FifoQueue`, `ApproximateNumberOfMessages`).
pub async fn queue_attribute(client: &aws_sdk_sqs::Client, sqs_name: &str, name: QueueAttributeName) -> Option<String> {
    let url = queue_url(client, sqs_name).await;
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .expect("GetQueueAttributes")
        .attributes()
        .and_then(|attributes| attributes.get(&name).cloned())
}
