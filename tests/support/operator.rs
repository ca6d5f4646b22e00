//! Helpers for the operator-tooling tests (admin API, CLI, status page):
//! an in-process gateway whose state a test can reach (breaker, relay) and
//! whose real address is written into a config file for the CLI, and a
//! runner for the `taskgate` binary that never hangs a test.

use super::app::{binary_path, write_config};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use taskgate::app::Application;
use taskgate::config::Settings;
use taskgate::http::AppState;
use tokio::io::AsyncWriteExt;

/// How long one CLI invocation may take before the test fails.
const CLI_DEADLINE: Duration = Duration::from_secs(90);

pub struct OperatorGateway {
    pub state: AppState,
    pub base_url: String,
    /// A config file the CLI reads: the gateway's settings, with its real
    /// listen address.
    pub config: PathBuf,
    pub settings: Settings,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Builds and runs a gateway; `config_dir` receives `taskgate.toml`.
pub async fn start_gateway(settings: Settings, config_dir: &Path) -> OperatorGateway {
    let application = Application::build(settings.clone()).await.expect("taskgate builds");
    let address = application.local_addr();
    let state = application.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let mut file_settings = settings.clone();
    file_settings.http.listen = address;
    let config = config_dir.join("taskgate.toml");
    write_config(&file_settings, &config);
    OperatorGateway {
        state,
        base_url: format!("http://{address}"),
        config,
        settings: file_settings,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap(),
        stop: Some(stop),
        join: Some(join),
    }
}

impl OperatorGateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.settings.http.admin_token.as_str() {
            "" => request,
            token => request.bearer_auth(token),
        }
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.authorized(self.client.get(self.url(path))).send().await.unwrap()
    }

    pub async fn admin_post(&self, path: &str) -> reqwest::Response {
        self.authorized(self.client.post(self.url(path))).send().await.unwrap()
    }

    /// `GET /v1/outbox` as JSON.
    pub async fn report(&self) -> Value {
        let response = self.admin_get("/v1/outbox").await;
        assert_eq!(response.status(), 200, "GET /v1/outbox");
        response.json().await.unwrap()
    }

    /// Posts a task and returns its id.
    pub async fn post_task(&self, body: &Value) -> String {
        let response = self.client.post(self.url("/v1/tasks")).json(body).send().await.unwrap();
        assert_eq!(response.status(), 202, "POST /v1/tasks {body}");
        let accepted: Value = response.json().await.unwrap();
        accepted["id"].as_str().unwrap().to_owned()
    }

    /// Polls the outbox report until `predicate` holds.
    pub async fn wait_for_report(&self, timeout: Duration, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let report = self.report().await;
            if predicate(&report) {
                return report;
            }
            assert!(Instant::now() < deadline, "outbox never matched; last: {report:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `/v1/health` until `predicate` holds.
    pub async fn wait_for_health(&self, timeout: Duration, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let health: Value = self
                .client
                .get(self.url("/v1/health"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if predicate(&health) {
                return health;
            }
            assert!(Instant::now() < deadline, "health never matched; last: {health:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for OperatorGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What one CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| panic!("stdout is not JSON ({error}): {self:#?}"))
    }

    pub fn assert_success(&self) -> &Self {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        self
    }
}

/// Runs `taskgate --config CONFIG ARGS...` with no stdin.
pub async fn taskgate(config: &Path, args: &[&str]) -> CliRun {
    taskgate_with(config, args, None, &[]).await
}

/// Runs the CLI with `stdin` (closed when `None`) and extra environment.
pub async fn taskgate_with(config: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> CliRun {
    let mut command = tokio::process::Command::new(binary_path());
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("TASKGATE_SERVER")
        .env_remove("TASKGATE_CONFIG")
        .env_remove("TASKGATE_HTTP__ADMIN_TOKEN")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn taskgate");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let output = tokio::time::timeout(CLI_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("taskgate {args:?} did not finish within {CLI_DEADLINE:?}"))
        .unwrap();
    CliRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// An `amqp://` URL where nothing listens.
pub fn refused_amqp_url() -> String {
    format!("amqp://guest:guest@{}/%2f", closed_address())
}

/// A local address where nothing listens.
pub fn closed_address() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    address
}
