//! What every operator command shares: how to reach the server
//! ([`ServerArgs`]), why a command failed and the exit status that says so
//! ([`CommandError`], the `EXIT_*` statuses), and the one-line breaker
//! description. A leaf: the command modules (`operator`, `outbox`,
//! `dead_letters`) import it, it imports none of them.

use super::admin_client::{AdminClient, ClientError, DEFAULT_REQUEST_TIMEOUT};
use super::offline::OfflineError;
use crate::config::Settings;
use crate::http::admin::BreakerView;
use crate::relay::breaker::BreakerState;
use clap::Args;
use std::process::ExitCode;
use std::time::Duration;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_HEALTH_WARN: u8 = 1;
pub const EXIT_HEALTH_FAIL: u8 = 2;
pub const EXIT_DRAIN_TIMED_OUT: u8 = 3;
/// `outbox salvage` wrote what it could read, but some records of the
/// damaged store were unreadable (or its completeness could not be shown).
pub const EXIT_SALVAGE_INCOMPLETE: u8 = 4;

/// How to reach the server; shared by every command that talks to it.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Base URL of the server [default: http://<http.listen> from the
    /// configuration, loopback for 0.0.0.0].
    #[arg(long, global = true, env = "TASKGATE_SERVER", value_name = "URL")]
    pub server: Option<String>,

    /// Seconds to wait for the server to answer (and for each read of a
    /// streamed body).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout: u64,
}

impl ServerArgs {
    pub fn client(&self, settings: &Settings) -> Result<AdminClient, ClientError> {
        AdminClient::new(
            settings,
            self.server.as_deref(),
            Duration::from_secs(self.request_timeout.max(1)),
        )
    }

    /// A client for a call the server holds open for up to `held` (worker
    /// verification): `--request-timeout` plus that long, so the answer is
    /// never given up on while the server is still waiting as asked.
    pub fn client_for_held_call(&self, settings: &Settings, held: Duration) -> Result<AdminClient, ClientError> {
        AdminClient::new(
            settings,
            self.server.as_deref(),
            Duration::from_secs(self.request_timeout.max(1)) + held,
        )
    }
}

/// Why an operator command failed; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Offline(#[from] OfflineError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("aborted: nothing was {0}")]
    Aborted(&'static str),
    #[error("`{0}` needs the running server; --offline works for outbox stats, list, export and purge, and for dead-letters")]
    NeedsServer(&'static str),
    #[error("{message}")]
    DrainTimedOut { message: String },
    #[error("{message}")]
    SalvageIncomplete { message: String },
}

impl CommandError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::DrainTimedOut { .. } => ExitCode::from(EXIT_DRAIN_TIMED_OUT),
            Self::SalvageIncomplete { .. } => ExitCode::from(EXIT_SALVAGE_INCOMPLETE),
            Self::Offline(OfflineError::Damaged(_)) => ExitCode::from(crate::config::DAMAGED_OUTBOX_EXIT_CODE as u8),
            _ => ExitCode::from(EXIT_FAILED),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// One line: state, since when, how often it opened, next probe.
pub fn describe_breaker(view: &BreakerView) -> String {
    let now = chrono::Utc::now();
    let mut text = format!(
        "breaker {} since {} (opened {} times since start)",
        view.state.as_str(),
        view.changed_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        view.opened_count
    );
    if view.state == BreakerState::Open {
        match view.next_probe_at {
            Some(at) if at > now => text.push_str(&format!(
                "; next probe in {:.1} s",
                (at - now).num_milliseconds() as f64 / 1000.0
            )),
            _ => text.push_str("; next probe with the next task (or `taskgate outbox drain`)"),
        }
    }
    text
}
