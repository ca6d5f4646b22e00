//! Owns the real-Celery harness for interop tests: runs a stock Celery worker
//! (`tests/support/celery_app.py`) from the test virtualenv and reads back the
//! JSON lines its tasks record.
//!
//! ```ignore
//! let worker = CeleryWorker::start(
//!     CeleryWorkerOptions::new(support::celery::rabbitmq_url())
//!         .exchange(&exchange)
//!         .queue(&queue, &binding_key),
//! );
//! // ... make taskgate publish `rawa.add` to that queue ...
//! let records = worker.wait_for_records_async(1, Duration::from_secs(30)).await;
//! assert_eq!(records[0]["args"], serde_json::json!([2, 3]));
//! ```
//!
//! The virtualenv is `$TASKGATE_VENV` (default `/var/tmp/taskgate-venv`), made
//! by `scripts/test` from `tests/support/requirements.txt`. A missing venv is a
//! test failure with a hint, never a skip.
//!
//! Blocking: `start` and `wait_for_records` block the calling thread. In a
//! `#[tokio::test]` that also runs taskgate in the same runtime, use
//! `start_async` and `wait_for_records_async` so the server keeps running.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a worker may take to log `ready.`.
pub const WORKER_READY_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The virtualenv's Python: `$TASKGATE_VENV/bin/python`.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("TASKGATE_VENV")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/taskgate-venv"));
    venv.join("bin").join("python")
}

/// `tests/support`, where `celery_app.py` lives (the worker's cwd).
pub fn support_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("support")
}

/// The local RabbitMQ (`$TASKGATE_TEST_AMQP_URL`, default guest on 127.0.0.1:5672).
pub fn rabbitmq_url() -> String {
    std::env::var("TASKGATE_TEST_AMQP_URL")
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A name no other test (or earlier run) uses: `prefix` + `-` + 32 hex digits.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A `Command` running the venv's Python with cwd `tests/support`, so
/// `import celery_app` works. Panics with a hint if the venv is missing.
pub fn python_command() -> Command {
    let python = venv_python();
    assert!(
        python.exists(),
        "{} not found: run scripts/test once (it creates the test virtualenv), \
         or point TASKGATE_VENV at one made from tests/support/requirements.txt",
        python.display()
    );
    let mut command = Command::new(python);
    command
        .current_dir(support_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    command
}

/// How to configure the worker; becomes `celery_app.py`'s environment.
#[derive(Debug, Clone, Default)]
pub struct CeleryWorkerOptions {
    /// `CELERY_BROKER_URL`.
    pub broker_url: String,
    /// Queues to declare and consume, with their binding keys. Empty: Celery's
    /// default `celery` queue.
    pub queues: Vec<(String, String)>,
    /// The topic exchange the queues are bound to (default `task_exchange`).
    pub exchange: Option<String>,
    /// `CELERY_BROKER_TRANSPORT_OPTIONS` (e.g. SQS region and prefix).
    pub transport_options: Option<Value>,
    /// `CELERY_RESULT_BACKEND`, e.g. `db+postgresql://...`.
    pub result_backend: Option<String>,
    /// Declare quorum queues instead of classic ones.
    pub quorum_queues: bool,
    /// Extra environment variables for the worker.
    pub env: Vec<(String, String)>,
}

impl CeleryWorkerOptions {
    pub fn new(broker_url: impl Into<String>) -> Self {
        CeleryWorkerOptions {
            broker_url: broker_url.into(),
            ..Default::default()
        }
    }

    /// Adds a queue bound to the exchange with `binding_key`.
    pub fn queue(mut self, name: impl Into<String>, binding_key: impl Into<String>) -> Self {
        self.queues.push((name.into(), binding_key.into()));
        self
    }

    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    pub fn transport_options(mut self, options: Value) -> Self {
        self.transport_options = Some(options);
        self
    }

    pub fn result_backend(mut self, url: impl Into<String>) -> Self {
        self.result_backend = Some(url.into());
        self
    }

    pub fn quorum_queues(mut self) -> Self {
        self.quorum_queues = true;
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The environment `celery_app.py` reads, for the worker or for a
    /// Python publisher that imports the same app.
    pub fn celery_env(&self) -> Vec<(String, String)> {
        let names: Vec<&str> = self.queues.iter().map(|(name, _)| name.as_str()).collect();
        let bindings: Vec<&str> = self.queues.iter().map(|(_, key)| key.as_str()).collect();
        let mut env = vec![
            ("CELERY_BROKER_URL".to_string(), self.broker_url.clone()),
            ("CELERY_QUEUES".to_string(), names.join(",")),
            ("CELERY_BINDINGS".to_string(), bindings.join(",")),
            (
                "TASKGATE_TEST_EXCHANGE".to_string(),
                self.exchange.clone().unwrap_or_default(),
            ),
            (
                "CELERY_BROKER_TRANSPORT_OPTIONS".to_string(),
                self.transport_options
                    .as_ref()
                    .map(Value::to_string)
                    .unwrap_or_default(),
            ),
            (
                "CELERY_RESULT_BACKEND".to_string(),
                self.result_backend.clone().unwrap_or_default(),
            ),
            (
                "CELERY_QUEUE_TYPE".to_string(),
                if self.quorum_queues { "quorum" } else { "" }.to_string(),
            ),
        ];
        env.extend(self.env.iter().cloned());
        env
    }
}

/// A running `celery worker` process; killed (whole process group) on drop.
pub struct CeleryWorker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    record_path: PathBuf,
    options: CeleryWorkerOptions,
}

impl CeleryWorker {
    /// Spawns the worker and waits (up to 60 s) until it logs `ready.`.
    /// Panics with the worker's log if it exits or does not get ready.
    pub fn start(options: CeleryWorkerOptions) -> CeleryWorker {
        let dir = tempfile::Builder::new()
            .prefix("taskgate-celery-")
            .tempdir()
            .expect("create a temp dir for the celery worker");
        let log_path = dir.path().join("worker.log");
        let record_path = dir.path().join("records.jsonl");
        let log = File::create(&log_path).expect("create the worker log");
        let log_err = log.try_clone().expect("clone the worker log handle");

        let node_name = format!("{}@%h", unique_name("taskgate-test"));
        let mut command = python_command();
        command.args(["-m", "celery", "-A", "celery_app", "worker"]);
        command.args(["--pool=solo", "--concurrency=1", "-n", node_name.as_str()]);
        if !options.queues.is_empty() {
            let names: Vec<&str> = options.queues.iter().map(|(name, _)| name.as_str()).collect();
            command.args(["-Q", &names.join(",")]);
        }
        command.args(["--without-gossip", "--without-mingle", "--without-heartbeat"]);
        command.args(["-l", "info"]);
        command
            .envs(options.celery_env())
            .env("TASKGATE_TEST_RECORD", &record_path)
            .env("TASKGATE_TEST_PARENT_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("spawn the celery worker ({command:?}): {err}"));

        let mut worker = CeleryWorker {
            child: Some(child),
            dir,
            log_path,
            record_path,
            options,
        };
        worker.wait_until_ready(WORKER_READY_TIMEOUT);
        worker
    }

    /// `start` on the blocking pool, for async tests.
    pub async fn start_async(options: CeleryWorkerOptions) -> CeleryWorker {
        match tokio::task::spawn_blocking(move || CeleryWorker::start(options)).await {
            Ok(worker) => worker,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    fn wait_until_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.lines().any(|line| line.trim_end().ends_with(" ready.")) {
                return;
            }
            if let Some(status) = self.exited() {
                panic!("celery worker exited with {status} before it was ready; log:\n{log}");
            }
            if Instant::now() >= deadline {
                panic!("celery worker not ready after {timeout:?}; log:\n{log}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// The options the worker was started with.
    pub fn options(&self) -> &CeleryWorkerOptions {
        &self.options
    }

    /// The worker's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Everything the worker logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The file the tasks append their JSON lines to.
    pub fn record_path(&self) -> &Path {
        &self.record_path
    }

    /// A scratch directory that lives as long as the worker.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The records written so far (complete lines only), in execution order.
    pub fn records(&self) -> Vec<Value> {
        let mut text = String::new();
        match File::open(&self.record_path) {
            Ok(mut file) => {
                file.read_to_string(&mut text).expect("read the celery record file");
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(err) => panic!("open {}: {err}", self.record_path.display()),
        }
        // A line without its newline is still being written.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("bad record line {line:?}: {err}")))
            .collect()
    }

    /// Polls until at least `count` distinct tasks were recorded and returns
    /// every record. Panics with the worker's log on timeout or if the worker died.
    /// Blocks the thread: in async tests use `wait_for_records_async`.
    pub fn wait_for_records(&self, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(records) = self.poll_records(count, deadline, timeout) {
                return records;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `wait_for_records` that sleeps with tokio, so the runtime keeps running.
    pub async fn wait_for_records_async(&self, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(records) = self.poll_records(count, deadline, timeout) {
                return records;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn poll_records(&self, count: usize, deadline: Instant, timeout: Duration) -> Option<Vec<Value>> {
        let records = self.records();
        // Delivery is at least once: a task redelivered after a dropped
        // connection is recorded again, so count distinct tasks.
        let distinct: std::collections::HashSet<String> =
            records.iter().map(|record| record["id"].to_string()).collect();
        if distinct.len() >= count {
            return Some(records);
        }
        let died = self
            .child
            .as_ref()
            .map(|child| process_is_gone(child.id()))
            .unwrap_or(true);
        if died || Instant::now() >= deadline {
            panic!(
                "expected {count} celery record(s) within {timeout:?}, got {} ({}); records: {records:#?}\nworker log:\n{}",
                records.len(),
                if died { "worker died" } else { "timed out" },
                self.log()
            );
        }
        None
    }

    /// Kills the worker's whole process group (SIGKILL) and reaps it; also
    /// done on drop. Not a warm shutdown: a solo-pool worker only notices
    /// SIGTERM after ~10 s, and with `task_acks_late` the broker redelivers
    /// anything unacknowledged anyway.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal_group("KILL", child.id());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal_group(signal: &str, group_id: u32) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".to_string(), format!("-{group_id}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// True when `pid` has exited (a zombie counts as gone).
fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Publishes one task with Celery's own `app.send_task` (from the venv), using
/// the same `celery_app` configuration as a worker started with `options`.
/// `send_options` are passed as keyword arguments to `send_task`
/// (e.g. `{"exchange": "...", "routing_key": "...", "task_id": "..."}`).
/// Returns the task id Celery used.
pub fn send_task_with_celery(
    options: &CeleryWorkerOptions,
    task: &str,
    args: Value,
    kwargs: Value,
    send_options: Value,
) -> String {
    const SCRIPT: &str = r#"
import json, sys
from celery_app import app
task, args, kwargs, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
with app.connection_for_write() as connection:
    result = app.send_task(task, args=args, kwargs=kwargs, connection=connection, **options)
print(result.id)
"#;
    let output = python_command()
        .args(["-c", SCRIPT, task])
        .arg(args.to_string())
        .arg(kwargs.to_string())
        .arg(send_options.to_string())
        .envs(options.celery_env())
        .env_remove("TASKGATE_TEST_PARENT_PID")
        .stdin(Stdio::null())
        .output()
        .expect("run python to send a task");
    assert!(
        output.status.success(),
        "python send_task failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Deletes AMQP queues and exchanges a test declared (best effort), using
/// kombu from the venv. For cleanup at the end of a test.
pub fn delete_amqp_entities(broker_url: &str, queues: &[&str], exchanges: &[&str]) {
    const SCRIPT: &str = r#"
import json, sys
from kombu import Connection
queues, exchanges = json.loads(sys.argv[2]), json.loads(sys.argv[3])
with Connection(sys.argv[1]) as connection:
    channel = connection.default_channel
    for queue in queues:
        channel.queue_delete(queue)
    for exchange in exchanges:
        channel.exchange_delete(exchange)
"#;
    let _ = python_command()
        .args(["-c", SCRIPT, broker_url])
        .arg(serde_json::json!(queues).to_string())
        .arg(serde_json::json!(exchanges).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
