//! Helpers for the operator-tooling tests (admin API, CLI, status page):
//! the in-process gateway of [`super::app`] with its real address written
//! into a config file for the CLI, and a runner for the `taskgate` binary
//! that never hangs a test.

use super::app::{binary_path, spawn_app, write_config, TestApp};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use taskgate::config::Settings;
use tokio::io::AsyncWriteExt;

/// How long one CLI invocation may take before the test fails.
const CLI_DEADLINE: Duration = Duration::from_secs(90);

/// A [`TestApp`] whose real address is also in a config file for the CLI
/// (`config`, with `settings` as written there).
pub struct OperatorGateway {
    pub app: TestApp,
    pub config: PathBuf,
    pub settings: Settings,
}

impl std::ops::Deref for OperatorGateway {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// Builds and runs a gateway; `config_dir` receives `taskgate.toml`.
pub async fn start_gateway(settings: Settings, config_dir: &Path) -> OperatorGateway {
    let app = spawn_app(settings).await;
    let mut file_settings = app.settings.clone();
    file_settings.http.listen = app.address;
    let config = config_dir.join("taskgate.toml");
    write_config(&file_settings, &config);
    OperatorGateway {
        app,
        config,
        settings: file_settings,
    }
}

impl OperatorGateway {
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

    /// Graceful stop, which must succeed.
    pub async fn stop(self) {
        self.app.stop().await.expect("the gateway stops cleanly");
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
