//! Typed settings: built-in defaults, then a TOML file, then
//! `TASKGATE_<SECTION>__<KEY>` environment variables, validated once.
//!
//! Invariant: a [`Settings`] value that [`load`] returned is valid; nothing
//! downstream re-validates it. A bad configuration is a [`ConfigError`] that
//! names the offending key; the binary exits with status 64 (`EX_USAGE`).

use crate::outbox::OutboxSettings;
use crate::retry::{RetryPolicy, RetryPolicyError};
use crate::task::registry::{Registry, RegistrySettings};
use crate::task::routing::{RoutingSettings, TopicRouter};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Exit status for a configuration error (sysexits.h `EX_USAGE`).
pub const CONFIG_ERROR_EXIT_CODE: i32 = 64;
/// Exit status when the outbox is damaged (sysexits.h `EX_DATAERR`):
/// `serve` and every `--offline` command, with the path and the way out
/// (`taskgate outbox salvage`). A service manager should not restart on it.
pub const DAMAGED_OUTBOX_EXIT_CODE: i32 = 65;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl ConfigError {
    fn key(key: &str, message: impl Into<String>) -> Self {
        Self::Key {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    #[default]
    Development,
    Production,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub environment: Environment,
    pub http: HttpSettings,
    pub broker: BrokerSettings,
    pub routing: RoutingSettings,
    pub registry: RegistrySettings,
    pub outbox: OutboxSettings,
    pub breaker: BreakerSettings,
    pub relay: RelaySettings,
    pub tracking: TrackingSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            environment: Environment::Development,
            http: HttpSettings::default(),
            broker: BrokerSettings::default(),
            routing: RoutingSettings::default(),
            registry: RegistrySettings::default(),
            outbox: OutboxSettings::default(),
            breaker: BreakerSettings::default(),
            relay: RelaySettings::default(),
            tracking: TrackingSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Bearer token for the admin API; empty means unset.
    #[serde(deserialize_with = "string_or_number")]
    pub admin_token: String,
    /// How long shutdown waits for in-flight publishes to be confirmed.
    pub shutdown_grace_ms: u64,
    /// Backlog age after which health turns `warn` even with the broker up.
    pub warn_backlog_age_seconds: f64,
    /// Host names (without port) accepted in the `Host` header besides the
    /// loopback names (`localhost`, `127.0.0.1`, `[::1]`); anything else is
    /// refused before a handler runs, so a DNS-rebinding page cannot reach
    /// the API through a browser on this machine.
    pub allowed_hosts: Vec<String>,
    /// Bearer token required on `POST /v1/tasks` and `/v1/tasks/batch`
    /// when set (empty means unset): for hosts where other local processes
    /// must not submit tasks.
    #[serde(deserialize_with = "string_or_number")]
    pub submit_token: String,
    /// A connection that has not sent a whole request header in this time
    /// is closed (slow or stalled clients).
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection idle this long between requests is closed.
    pub idle_timeout_ms: u64,
    /// Longest a request may take from its header to its response (event
    /// streams excepted); past it the client gets a 408 problem.
    pub request_timeout_ms: u64,
    /// Open client connections; past it a new connection is answered 503
    /// and closed at once.
    pub max_connections: usize,
    /// Concurrent `text/event-stream` subscribers (`/v1/health/stream`);
    /// past it a new one is answered 503.
    pub max_event_subscribers: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7439)),
            max_body_bytes: 1 << 20,
            admin_token: String::new(),
            shutdown_grace_ms: 10_000,
            warn_backlog_age_seconds: 60.0,
            allowed_hosts: Vec::new(),
            submit_token: String::new(),
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 30_000,
            max_connections: 1_024,
            max_event_subscribers: 64,
        }
    }
}

/// Tokens like `12345` arrive from the environment as numbers.
fn string_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Loose {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    Ok(match Loose::deserialize(deserializer)? {
        Loose::Text(text) => text,
        Loose::Integer(n) => n.to_string(),
        Loose::Float(n) => n.to_string(),
        Loose::Flag(b) => b.to_string(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    #[default]
    Amqp,
    Sqs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    pub kind: BrokerKind,
    pub url: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub queue_name_prefix: Option<String>,
    /// SQS: create missing queues. Unset means on in development and off
    /// in production, where queues are provisioned (a typo must not
    /// conjure a queue nobody consumes); see [`BrokerSettings::creates_queues`].
    pub create_queues: Option<bool>,
    /// SQS: `MessageGroupId` on FIFO queues for tasks whose request has no
    /// `message_group_id` property.
    pub fifo_message_group_id: String,
    /// TCP connect plus AMQP handshake.
    pub connect_timeout_ms: u64,
    /// Longest wait for a batch of publisher confirms.
    pub publish_timeout_ms: u64,
    pub heartbeat_seconds: u16,
    /// Declare queues as quorum queues (`x-queue-type = quorum`).
    pub quorum_queues: bool,
    /// Reconnect backoff bounds.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// `amqps://` only: PEM file of certificate authorities trusted for the
    /// broker's certificate, in addition to the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// `amqps://` only: client certificate chain (PEM) for mutual TLS;
    /// given together with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// `amqps://` only: the client certificate's private key (PEM, PKCS#8).
    pub tls_key_file: Option<PathBuf>,
}

impl BrokerSettings {
    /// Waits between reconnect attempts (publishers and tracking consumer).
    pub fn reconnect_policy(&self) -> RetryPolicy {
        RetryPolicy::from_millis(
            self.reconnect_min_ms,
            self.reconnect_max_ms,
            RetryPolicy::RECONNECT_JITTER,
        )
        .expect("broker.reconnect_* are checked when the settings are loaded")
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Amqp,
            url: "amqp://127.0.0.1:5672/%2f".into(),
            region: None,
            endpoint_url: None,
            queue_name_prefix: None,
            create_queues: None,
            fifo_message_group_id: "taskgate".into(),
            connect_timeout_ms: 5_000,
            publish_timeout_ms: 5_000,
            heartbeat_seconds: 10,
            quorum_queues: false,
            reconnect_min_ms: 200,
            reconnect_max_ms: 10_000,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl BrokerSettings {
    /// Whether the SQS publisher creates missing queues: `create_queues`
    /// when given, else only in development.
    pub fn creates_queues(&self, environment: Environment) -> bool {
        self.create_queues.unwrap_or(environment == Environment::Development)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive failed publish attempts that open the breaker.
    pub consecutive_failures: u32,
    /// Success rate below which the breaker opens, over `window_seconds`,
    /// once `minimum_requests` attempts were made in the window.
    pub required_success_rate: f64,
    pub minimum_requests: u32,
    pub window_seconds: u64,
    /// Open interval: jittered exponential backoff between these bounds.
    pub open_min_ms: u64,
    pub open_max_ms: u64,
}

impl BreakerSettings {
    /// How long the breaker stays open before it lets a probe through.
    pub fn open_interval(&self) -> RetryPolicy {
        RetryPolicy::from_millis(self.open_min_ms, self.open_max_ms, RetryPolicy::RETRY_JITTER)
            .expect("breaker.open_* are checked when the settings are loaded")
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            required_success_rate: 0.5,
            minimum_requests: 10,
            window_seconds: 30,
            open_min_ms: 1_000,
            open_max_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Most unconfirmed messages per lane: the relay's sliding window,
    /// topped up slice by slice as confirms arrive. 500 drains as fast as
    /// 1000 against a local RabbitMQ and holds 25 MiB less while doing it
    /// (measured with `scripts/bench` when the window was made to slide,
    /// commit 695a452); a remote broker may want more.
    pub publish_window: usize,
    /// How long the relay gathers a trickle before its next round: after a
    /// round that left less than a slice pending, it waits this long, so a
    /// producer sending one task at a time is published in batches instead
    /// of in a round of its own per task (a sent mark, a flush, a publish,
    /// a confirm and a completion), which on a host shared with the broker
    /// made each of its `POST`s about a third slower (docs/benchmarks.md,
    /// (f)). The first task after an idle spell goes at once, and a backlog
    /// is never held back. 0: every round at once.
    pub linger_ms: u64,
}

/// Longest `relay.linger_ms` accepted: the wait is added to the delivery
/// of tasks that trickle in.
pub const MAX_RELAY_LINGER_MS: u64 = 1_000;

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            publish_window: 500,
            linger_ms: 10,
        }
    }
}

/// Task tracking in SQL (`[tracking]`): see [`crate::tracking`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSettings {
    /// `sqlite://PATH` (created with its directory) or `postgres://...`
    /// (required in production).
    pub database_url: String,
    /// The queue (bound `#`) whose copies of every task the consumer
    /// records, tasks scheduled by workers included; unset: no consumer.
    pub sync_queue: Option<String>,
    /// Apply migrations at `serve` start-up (in the background). Off when a
    /// separate owner role runs `taskgate migrate`.
    pub migrate_on_start: bool,
    pub max_connections: u32,
    /// Longest wait for a pooled connection (connecting included).
    pub connect_timeout_ms: u64,
    /// Bound on every statement or transaction.
    pub query_timeout_ms: u64,
    /// Journal entries upserted per transaction.
    pub batch_size: usize,
    /// Tracking-queue messages per batch (the AMQP prefetch window is
    /// `consumer_batch_size * consumer_concurrency`; SQS receives at most 10
    /// per call).
    pub consumer_batch_size: usize,
    /// Batches the consumer writes at the same time.
    pub consumer_concurrency: usize,
    /// How long a batch waits to fill before it is written anyway.
    pub consumer_batch_wait_ms: u64,
    /// SQS: visibility timeout of received messages, so those not yet
    /// written (database down) come back in this time.
    pub consumer_visibility_timeout_seconds: u32,
    /// Backoff bounds while the database (or the sync queue) is away.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Journal age after which health warns even with the database up.
    pub warn_journal_age_seconds: f64,
    /// While the outbox is under load, the journal writer waits until its
    /// oldest entry is this old (0: never waits, not even the 100 ms a
    /// page that is not full waits otherwise), leaving the cores to
    /// accepting and publishing; see [`crate::tracking::writer`].
    pub max_deferral_seconds: f64,
}

impl TrackingSettings {
    /// Waits between attempts to reach the tracking database.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::from_millis(self.retry_min_ms, self.retry_max_ms, RetryPolicy::RETRY_JITTER)
            .expect("tracking.retry_* are checked when the settings are loaded")
    }
}

impl Default for TrackingSettings {
    fn default() -> Self {
        Self {
            database_url: "sqlite://data/tracking.db".into(),
            sync_queue: None,
            migrate_on_start: true,
            max_connections: 5,
            connect_timeout_ms: 3_000,
            query_timeout_ms: 5_000,
            batch_size: 500,
            consumer_batch_size: 100,
            consumer_concurrency: 4,
            consumer_batch_wait_ms: 50,
            consumer_visibility_timeout_seconds: 60,
            retry_min_ms: 200,
            retry_max_ms: 10_000,
            warn_journal_age_seconds: 60.0,
            max_deferral_seconds: 30.0,
        }
    }
}

impl TrackingSettings {
    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres://") || self.database_url.starts_with("postgresql://")
    }

    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }
}

/// Loads settings: defaults, then `file` (which must exist when given), then
/// the environment. Validates everything before returning.
pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    load_with_env(file, settings_env())
}

/// `TASKGATE_<SECTION>__<KEY>` variables. A `TASKGATE_` variable without
/// `__` (other than `TASKGATE_ENVIRONMENT`) belongs to other tools
/// (`TASKGATE_CONFIG` is the CLI's, `TASKGATE_VENV` the tests'), so it is
/// not read as a setting; a misspelt section (`TASKGATE_HTTTP__LISTEN`)
/// still fails validation by name.
fn settings_env() -> Env {
    Env::prefixed("TASKGATE_")
        .filter(|key| key.as_str().contains("__") || key.as_str().eq_ignore_ascii_case("environment"))
        .split("__")
}

fn load_with_env(file: Option<&Path>, env: Env) -> Result<Settings, ConfigError> {
    let mut explicit = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile { path: path.to_owned() });
        }
        explicit = explicit.merge(Toml::file(path));
    }
    let explicit = explicit.merge(env);
    let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
        .merge(explicit.clone())
        .extract()
        .map_err(|error| ConfigError::Invalid(describe_figment_error(error)))?;
    validate(&settings, &explicit)?;
    Ok(settings)
}

fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            if key.is_empty() {
                e.to_string()
            } else {
                format!("key `{key}`: {}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn validate(settings: &Settings, explicit: &Figment) -> Result<(), ConfigError> {
    // Their messages already name the key (`routing.queues[1]: ...`).
    TopicRouter::from_settings(&settings.routing).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Registry::from_settings(&settings.registry).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    if settings.http.max_body_bytes < 1024 {
        return Err(ConfigError::key("http.max_body_bytes", "must be at least 1024"));
    }
    validate_http_limits(&settings.http)?;
    if settings.outbox.max_bytes < 4096 {
        return Err(ConfigError::key("outbox.max_bytes", "must be at least 4096"));
    }
    if settings.outbox.max_journal_entries == 0 {
        return Err(ConfigError::key("outbox.max_journal_entries", "must be at least 1"));
    }
    let breaker = &settings.breaker;
    check_retry_policy(
        ("breaker.open_min_ms", breaker.open_min_ms),
        ("breaker.open_max_ms", breaker.open_max_ms),
        RetryPolicy::RETRY_JITTER,
    )?;
    if breaker.consecutive_failures == 0 {
        return Err(ConfigError::key("breaker.consecutive_failures", "must be at least 1"));
    }
    if !(0.0..=1.0).contains(&breaker.required_success_rate) {
        return Err(ConfigError::key(
            "breaker.required_success_rate",
            "must be between 0 and 1",
        ));
    }
    if breaker.window_seconds == 0 {
        return Err(ConfigError::key("breaker.window_seconds", "must be at least 1"));
    }
    if settings.relay.publish_window == 0 {
        return Err(ConfigError::key("relay.publish_window", "must be at least 1"));
    }
    if settings.relay.linger_ms > MAX_RELAY_LINGER_MS {
        return Err(ConfigError::key(
            "relay.linger_ms",
            format!("must be at most {MAX_RELAY_LINGER_MS} (it delays every task that trickles in)"),
        ));
    }
    let broker = &settings.broker;
    for (key, value) in [
        ("broker.connect_timeout_ms", broker.connect_timeout_ms),
        ("broker.publish_timeout_ms", broker.publish_timeout_ms),
    ] {
        if value == 0 {
            return Err(ConfigError::key(key, "must be positive"));
        }
    }
    check_retry_policy(
        ("broker.reconnect_min_ms", broker.reconnect_min_ms),
        ("broker.reconnect_max_ms", broker.reconnect_max_ms),
        RetryPolicy::RECONNECT_JITTER,
    )?;
    if broker.kind == BrokerKind::Amqp && !(broker.url.starts_with("amqp://") || broker.url.starts_with("amqps://")) {
        return Err(ConfigError::key(
            "broker.url",
            "an AMQP broker URL must start with amqp:// or amqps://",
        ));
    }
    if broker.kind == BrokerKind::Amqp {
        validate_amqp_tls(broker)?;
    }
    if broker.kind == BrokerKind::Sqs {
        validate_sqs(broker, &settings.routing)?;
    }
    if settings.environment == Environment::Production {
        let given = |key: &str| explicit.find_value(key).is_ok();
        if settings.http.admin_token.trim().is_empty() {
            return Err(ConfigError::key(
                "http.admin_token",
                "production requires an admin token (or TASKGATE_HTTP__ADMIN_TOKEN)",
            ));
        }
        if settings.http.admin_token.len() < MIN_PRODUCTION_TOKEN_BYTES {
            return Err(ConfigError::key(
                "http.admin_token",
                format!(
                    "is {} bytes; production requires at least {MIN_PRODUCTION_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
                    settings.http.admin_token.len()
                ),
            ));
        }
        if !settings.http.submit_token.is_empty() && settings.http.submit_token.len() < MIN_PRODUCTION_TOKEN_BYTES {
            return Err(ConfigError::key(
                "http.submit_token",
                format!(
                    "is {} bytes; production requires at least {MIN_PRODUCTION_TOKEN_BYTES} when it is set",
                    settings.http.submit_token.len()
                ),
            ));
        }
        if !given("broker.kind") {
            return Err(ConfigError::key(
                "broker.kind",
                "production requires the broker kind to be set explicitly",
            ));
        }
        match broker.kind {
            BrokerKind::Amqp if !given("broker.url") => {
                return Err(ConfigError::key(
                    "broker.url",
                    "production requires the broker URL to be set explicitly",
                ));
            }
            BrokerKind::Sqs => {
                if broker.queue_name_prefix.is_none() {
                    return Err(ConfigError::key(
                        "broker.queue_name_prefix",
                        "production requires an explicit SQS queue name prefix",
                    ));
                }
                if broker.region.is_none() {
                    return Err(ConfigError::key(
                        "broker.region",
                        "production requires an explicit SQS region",
                    ));
                }
            }
            _ => {}
        }
    }
    // Last, so the broker and token keys are named first in production.
    validate_tracking(&settings.tracking, settings.environment)?;
    Ok(())
}

/// Shortest admin (and submit) token accepted in production: 32 bytes, so
/// a token cannot be guessed in any number of local attempts.
pub const MIN_PRODUCTION_TOKEN_BYTES: usize = 32;

/// The settings of one [`RetryPolicy`], refused with the key at fault.
fn check_retry_policy(first: (&str, u64), longest: (&str, u64), jitter: f64) -> Result<(), ConfigError> {
    match RetryPolicy::from_millis(first.1, longest.1, jitter) {
        Ok(_) => Ok(()),
        Err(RetryPolicyError::FirstNotPositive) => Err(ConfigError::key(first.0, "must be positive")),
        Err(RetryPolicyError::LongestBelowFirst) => {
            Err(ConfigError::key(longest.0, format!("must be at least {}", first.0)))
        }
        Err(error @ RetryPolicyError::JitterOutOfRange) => Err(ConfigError::key(first.0, error.to_string())),
    }
}

fn validate_http_limits(http: &HttpSettings) -> Result<(), ConfigError> {
    for (key, value) in [
        ("http.header_read_timeout_ms", http.header_read_timeout_ms),
        ("http.idle_timeout_ms", http.idle_timeout_ms),
        ("http.request_timeout_ms", http.request_timeout_ms),
        ("http.max_connections", http.max_connections as u64),
        ("http.max_event_subscribers", http.max_event_subscribers as u64),
    ] {
        if value == 0 {
            return Err(ConfigError::key(key, "must be positive"));
        }
    }
    for (index, host) in http.allowed_hosts.iter().enumerate() {
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
        if !valid || host.contains("://") {
            return Err(ConfigError::key(
                &format!("http.allowed_hosts[{index}]"),
                format!("{host:?} is not a host name (give the name as in the Host header, without scheme or path)"),
            ));
        }
    }
    Ok(())
}

/// A `postgres://` URL's query parameter `name` (libpq's spelling), if set.
pub fn postgres_url_parameter(database_url: &str, name: &str) -> Option<String> {
    let url = url::Url::parse(database_url).ok()?;
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The TLS files a `postgres://` URL names (`sslrootcert`, `sslcert`,
/// `sslkey`) must be readable, and `sslmode` one libpq knows, so a wrong
/// path is a start-up error rather than a tracking writer that never
/// connects.
fn validate_postgres_tls(database_url: &str) -> Result<(), ConfigError> {
    const KEY: &str = "tracking.database_url";
    if url::Url::parse(database_url).is_err() {
        return Err(ConfigError::key(KEY, "is not a valid postgres:// URL"));
    }
    if let Some(mode) = postgres_url_parameter(database_url, "sslmode") {
        const MODES: [&str; 6] = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];
        if !MODES.contains(&mode.as_str()) {
            return Err(ConfigError::key(
                KEY,
                format!("sslmode={mode} is not one of {}", MODES.join(", ")),
            ));
        }
    }
    for parameter in ["sslrootcert", "sslcert", "sslkey"] {
        if let Some(path) = postgres_url_parameter(database_url, parameter) {
            std::fs::read(&path)
                .map_err(|error| ConfigError::key(KEY, format!("{parameter}={path}: cannot read it: {error}")))?;
        }
    }
    Ok(())
}

/// TLS files for `amqps://`: readable, and holding what they claim, so a
/// wrong path is a start-up error rather than a background connect loop.
fn validate_amqp_tls(broker: &BrokerSettings) -> Result<(), ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let files = [
        ("broker.tls_ca_file", &broker.tls_ca_file),
        ("broker.tls_cert_file", &broker.tls_cert_file),
        ("broker.tls_key_file", &broker.tls_key_file),
    ];
    if !broker.url.starts_with("amqps://") {
        if let Some((key, _)) = files.iter().find(|(_, file)| file.is_some()) {
            return Err(ConfigError::key(
                key,
                "is set but broker.url is a plain amqp:// URL; use amqps:// for TLS",
            ));
        }
        return Ok(());
    }
    if broker.tls_cert_file.is_some() != broker.tls_key_file.is_some() {
        return Err(ConfigError::key(
            if broker.tls_cert_file.is_some() {
                "broker.tls_key_file"
            } else {
                "broker.tls_cert_file"
            },
            "mutual TLS needs both broker.tls_cert_file and broker.tls_key_file",
        ));
    }
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|error| ConfigError::key(key, format!("cannot read {}: {error}", path.display())))
    };
    for (key, file) in [
        ("broker.tls_ca_file", &broker.tls_ca_file),
        ("broker.tls_cert_file", &broker.tls_cert_file),
    ] {
        if let Some(path) = file {
            let pem = read(key, path)?;
            let certificates = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| ConfigError::key(key, format!("{}: {error}", path.display())))?;
            if certificates.is_empty() {
                return Err(ConfigError::key(
                    key,
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
        }
    }
    if let Some(path) = &broker.tls_key_file {
        let pem = read("broker.tls_key_file", path)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
            ConfigError::key(
                "broker.tls_key_file",
                format!("{} holds no usable PEM private key: {error}", path.display()),
            )
        })?;
    }
    Ok(())
}

fn validate_tracking(tracking: &TrackingSettings, environment: Environment) -> Result<(), ConfigError> {
    if !tracking.is_postgres() && !tracking.is_sqlite() {
        return Err(ConfigError::key(
            "tracking.database_url",
            "must start with sqlite:, postgres:// or postgresql://",
        ));
    }
    if environment == Environment::Production && !tracking.is_postgres() {
        return Err(ConfigError::key(
            "tracking.database_url",
            "production requires a postgres:// database URL (SQLite is for development)",
        ));
    }
    if tracking.is_postgres() {
        validate_postgres_tls(&tracking.database_url)?;
    }
    if let Some(queue) = &tracking.sync_queue {
        crate::task::QueueName::parse(queue).map_err(|reason| ConfigError::key("tracking.sync_queue", reason))?;
    }
    for (key, value) in [
        ("tracking.max_connections", u64::from(tracking.max_connections)),
        ("tracking.connect_timeout_ms", tracking.connect_timeout_ms),
        ("tracking.query_timeout_ms", tracking.query_timeout_ms),
        ("tracking.batch_size", tracking.batch_size as u64),
        ("tracking.consumer_batch_size", tracking.consumer_batch_size as u64),
        ("tracking.consumer_concurrency", tracking.consumer_concurrency as u64),
    ] {
        if value == 0 {
            return Err(ConfigError::key(key, "must be positive"));
        }
    }
    check_retry_policy(
        ("tracking.retry_min_ms", tracking.retry_min_ms),
        ("tracking.retry_max_ms", tracking.retry_max_ms),
        RetryPolicy::RETRY_JITTER,
    )?;
    if !(tracking.max_deferral_seconds.is_finite() && tracking.max_deferral_seconds >= 0.0) {
        return Err(ConfigError::key(
            "tracking.max_deferral_seconds",
            "must be a number of seconds, 0 or more",
        ));
    }
    // SQS caps the visibility timeout at 12 hours.
    if !(1..=43_200).contains(&tracking.consumer_visibility_timeout_seconds) {
        return Err(ConfigError::key(
            "tracking.consumer_visibility_timeout_seconds",
            "must be between 1 and 43200",
        ));
    }
    Ok(())
}

/// SQS settings that SQS would otherwise refuse only at the first call, in
/// the background: queue names, the FIFO group id, the endpoint.
fn validate_sqs(broker: &BrokerSettings, routing: &RoutingSettings) -> Result<(), ConfigError> {
    use crate::broker::sqs_naming as sqs;
    if broker.region.as_deref().is_some_and(|region| region.trim().is_empty()) {
        return Err(ConfigError::key(
            "broker.region",
            "must not be empty (leave it out to use the AWS configuration)",
        ));
    }
    if let Some(url) = &broker.endpoint_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::key(
                "broker.endpoint_url",
                "must be an http:// or https:// URL",
            ));
        }
    }
    if !sqs::is_valid_message_id(&broker.fifo_message_group_id) {
        return Err(ConfigError::key(
            "broker.fifo_message_group_id",
            format!(
                "must be 1 to {} ASCII letters, digits or punctuation (an SQS MessageGroupId)",
                sqs::MAX_MESSAGE_ID_CHARS
            ),
        ));
    }
    let prefix = broker.queue_name_prefix.as_deref().unwrap_or("");
    if let Some(bad) = sqs::sqs_queue_name(prefix, "")
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(ConfigError::key(
            "broker.queue_name_prefix",
            format!(
                "contains {bad:?}; SQS queue names allow only ASCII letters, digits, '-' and '_' ('.' becomes '-')"
            ),
        ));
    }
    for (index, queue) in routing.queues.iter().enumerate() {
        sqs::validate_sqs_queue_name(&sqs::sqs_queue_name(prefix, &queue.name))
            .map_err(|reason| ConfigError::key(&format!("routing.queues[{index}].name"), reason))?;
    }
    Ok(())
}

impl Settings {
    /// A copy with secrets masked (admin token, URL passwords), for output.
    pub fn masked(&self) -> Settings {
        let mut masked = self.clone();
        if !masked.http.admin_token.is_empty() {
            masked.http.admin_token = "********".into();
        }
        if !masked.http.submit_token.is_empty() {
            masked.http.submit_token = "********".into();
        }
        masked.broker.url = mask_url_password(&masked.broker.url);
        masked.tracking.database_url = mask_url_password(&masked.tracking.database_url);
        masked
    }

    /// The settings as a TOML document that [`load`] reads back.
    pub fn to_toml(&self) -> String {
        toml_string(self)
    }

    /// The effective settings as TOML with secrets masked, for `check-config`.
    pub fn to_masked_toml(&self) -> String {
        toml_string(&self.masked())
    }
}

fn toml_string(settings: &Settings) -> String {
    let value = figment::value::Value::serialize(settings).expect("settings serialize");
    let json = serde_json::to_value(&value).expect("settings to json");
    let mut out = String::new();
    write_toml_table(&mut out, "", &json);
    out
}

/// A small TOML writer for the settings tree (tables, arrays of tables,
/// scalars); figment does not serialise TOML itself.
fn write_toml_table(out: &mut String, path: &str, value: &serde_json::Value) {
    let serde_json::Value::Object(map) = value else { return };
    for (key, item) in map {
        match item {
            serde_json::Value::Object(_) => {}
            serde_json::Value::Array(items) if items.iter().all(|i| i.is_object()) && !items.is_empty() => {}
            serde_json::Value::Null => {}
            scalar => out.push_str(&format!("{key} = {scalar}\n")),
        }
    }
    for (key, item) in map {
        let child = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match item {
            serde_json::Value::Object(_) => {
                out.push_str(&format!("\n[{child}]\n"));
                write_toml_table(out, &child, item);
            }
            serde_json::Value::Array(items) if items.iter().all(|i| i.is_object()) && !items.is_empty() => {
                for element in items {
                    out.push_str(&format!("\n[[{child}]]\n"));
                    write_toml_table(out, &child, element);
                }
            }
            _ => {}
        }
    }
}

/// `scheme://user:secret@host` → `scheme://user:****@host`, for logs and output.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    let credentials = &rest[..at];
    match credentials.find(':') {
        Some(colon) => format!("{}://{}:****{}", &url[..scheme_end], &credentials[..colon], &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn no_env() -> Env {
        Env::prefixed("TASKGATE_TEST_UNUSED_PREFIX_").split("__")
    }

    fn write(toml: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_are_valid() {
        let settings = load_with_env(None, no_env()).unwrap();
        assert_eq!(settings.http.listen.port(), 7439);
        assert_eq!(settings.broker.url, "amqp://127.0.0.1:5672/%2f");
        assert_eq!(settings.routing.exchange, "task_exchange");
    }

    #[test]
    fn design_example_loads_as_written() {
        let file = write(include_str!("../tests/support/design-example.toml"));
        let settings = load_with_env(Some(file.path()), no_env()).unwrap();
        assert!(settings.registry.strict);
        assert_eq!(settings.routing.queues.len(), 2);
        assert_eq!(settings.breaker.open_max_ms, 30_000);
        assert_eq!(settings.tracking.sync_queue.as_deref(), Some("platform.fifo"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let file = write("[http]\nmax_body_bytes = \"lots\"\n");
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("http.max_body_bytes"), "{error}");
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let file = write("[broker]\nurll = \"amqp://x\"\n");
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("urll"), "{error}");
    }

    #[test]
    fn a_relay_linger_over_a_second_is_refused_by_name() {
        let file = write("[relay]\nlinger_ms = 5000\n");
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("relay.linger_ms"), "{error}");
        let file = write("[relay]\nlinger_ms = 0\n");
        let settings = load_with_env(Some(file.path()), no_env()).unwrap();
        assert_eq!(settings.relay.linger_ms, 0, "0 turns the gathering off");
    }

    #[test]
    fn missing_file_is_an_error() {
        let error = load_with_env(Some(Path::new("/nonexistent/taskgate.toml")), no_env()).unwrap_err();
        assert!(matches!(error, ConfigError::MissingFile { .. }));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[http]\nadmin_token = \"from-file\"\n")?;
            jail.set_env("TASKGATE_HTTP__ADMIN_TOKEN", "12345");
            jail.set_env("TASKGATE_BROKER__URL", "amqp://other:5672/%2f");
            let settings = load(Some(Path::new("t.toml"))).unwrap();
            assert_eq!(settings.http.admin_token, "12345");
            assert_eq!(settings.broker.url, "amqp://other:5672/%2f");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
    fn other_tools_variables_are_not_settings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TASKGATE_VENV", "/var/tmp/venv");
            jail.set_env("TASKGATE_CONFIG", "x.toml");
            jail.set_env("TASKGATE_ENVIRONMENT", "development");
            load(None).unwrap();
            jail.set_env("TASKGATE_HTTTP__LISTEN", "127.0.0.1:1");
            let error = load(None).unwrap_err().to_string();
            assert!(error.contains("htttp"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn production_requires_explicit_settings() {
        let file = write("environment = \"production\"\n[http]\nadmin_token = \"0123456789abcdef0123456789abcdef\"\n[broker]\nkind = \"amqp\"\n");
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("broker.url"), "{error}");
        let file = write("environment = \"production\"\n[broker]\nkind = \"amqp\"\nurl = \"amqp://h/%2f\"\n");
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("http.admin_token"), "{error}");
        let file = write("environment = \"production\"\n[http]\nadmin_token = \"0123456789abcdef0123456789abcdef\"\n[broker]\nkind = \"sqs\"\nregion = \"us-west-2\"\n");
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("broker.queue_name_prefix"), "{error}");
    }

    #[test]
    fn production_sqs_requires_prefix_and_region() {
        let base = "environment = \"production\"\n[http]\nadmin_token = \"0123456789abcdef0123456789abcdef\"\n[broker]\nkind = \"sqs\"\n";
        let file = write(&format!("{base}queue_name_prefix = \"prod-\"\n"));
        let error = load_with_env(Some(file.path()), no_env()).unwrap_err().to_string();
        assert!(error.contains("broker.region"), "{error}");
        let file = write(&format!(
            "{base}queue_name_prefix = \"prod-\"\nregion = \"eu-west-1\"\n[tracking]\ndatabase_url = \"postgres://db/p\"\n"
        ));
        let settings = load_with_env(Some(file.path()), no_env()).unwrap();
        assert!(!settings.broker.creates_queues(settings.environment));
    }

    #[test]
    fn sqs_queues_are_created_by_default_in_development_only() {
        let file = write("[broker]\nkind = \"sqs\"\n");
        let settings = load_with_env(Some(file.path()), no_env()).unwrap();
        assert!(settings.broker.creates_queues(settings.environment));
        assert_eq!(settings.broker.fifo_message_group_id, "taskgate");
        assert!(!settings.broker.creates_queues(Environment::Production));
        let file = write("[broker]\nkind = \"sqs\"\ncreate_queues = false\n");
        let settings = load_with_env(Some(file.path()), no_env()).unwrap();
        assert!(!settings.broker.creates_queues(settings.environment));
    }

    #[test]
    fn sqs_names_and_group_ids_sqs_would_refuse_are_config_errors() {
        let cases = [
            (
                "[broker]\nkind = \"sqs\"\nqueue_name_prefix = \"has space-\"\n",
                "broker.queue_name_prefix",
            ),
            (
                "[broker]\nkind = \"sqs\"\nfifo_message_group_id = \"\"\n",
                "broker.fifo_message_group_id",
            ),
            (
                "[broker]\nkind = \"sqs\"\nendpoint_url = \"127.0.0.1:4566\"\n",
                "broker.endpoint_url",
            ),
            ("[broker]\nkind = \"sqs\"\nregion = \"\"\n", "broker.region"),
        ];
        for (toml, key) in cases {
            let error = load_with_env(Some(write(toml).path()), no_env())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
        let long = format!(
            "[broker]\nkind = \"sqs\"\nqueue_name_prefix = \"{}\"\n[[routing.queues]]\nname = \"export\"\nbinding_key = \"#\"\n",
            "p".repeat(76)
        );
        let error = load_with_env(Some(write(&long).path()), no_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains("routing.queues[0].name"), "{error}");
        // Dots in prefix and names are what kombu turns into dashes: fine.
        let dotted = "[broker]\nkind = \"sqs\"\nqueue_name_prefix = \"dev.\"\n[[routing.queues]]\nname = \"platform.fifo\"\nbinding_key = \"#\"\n";
        load_with_env(Some(write(dotted).path()), no_env()).unwrap();
    }

    #[test]
    fn production_requires_a_postgres_tracking_database() {
        let base = "environment = \"production\"\n[http]\nadmin_token = \"0123456789abcdef0123456789abcdef\"\n[broker]\nkind = \"amqp\"\nurl = \"amqp://h/%2f\"\n";
        let error = load_with_env(Some(write(base).path()), no_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains("tracking.database_url"), "{error}");
        let sqlite = format!("{base}[tracking]\ndatabase_url = \"sqlite://data/t.db\"\n");
        let error = load_with_env(Some(write(&sqlite).path()), no_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains("tracking.database_url"), "{error}");
        let postgres = format!("{base}[tracking]\ndatabase_url = \"postgres://taskgate@db/platform\"\n");
        let settings = load_with_env(Some(write(&postgres).path()), no_env()).unwrap();
        assert!(settings.tracking.is_postgres());
    }

    #[test]
    fn production_admin_and_submit_tokens_must_be_at_least_32_bytes() {
        let settings = |token: &str, submit: &str| {
            format!(
                "environment = \"production\"\n[http]\nadmin_token = \"{token}\"\nsubmit_token = \"{submit}\"\n\
                 [broker]\nkind = \"amqp\"\nurl = \"amqp://h/%2f\"\n[tracking]\ndatabase_url = \"postgres://db/p\"\n"
            )
        };
        let long = "0123456789abcdef0123456789abcdef";
        let error = load_with_env(Some(write(&settings(&long[..31], "")).path()), no_env())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("http.admin_token") && error.contains("31 bytes"),
            "{error}"
        );
        let error = load_with_env(Some(write(&settings(long, "short")).path()), no_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains("http.submit_token"), "{error}");
        load_with_env(Some(write(&settings(long, "")).path()), no_env()).unwrap();
        load_with_env(Some(write(&settings(long, long)).path()), no_env()).unwrap();
        // Development accepts a short token.
        load_with_env(Some(write("[http]\nadmin_token = \"t\"\n").path()), no_env()).unwrap();
    }

    #[test]
    fn http_limits_and_allowed_hosts_are_validated_by_key() {
        for (toml, key) in [
            ("[http]\nheader_read_timeout_ms = 0\n", "http.header_read_timeout_ms"),
            ("[http]\nidle_timeout_ms = 0\n", "http.idle_timeout_ms"),
            ("[http]\nrequest_timeout_ms = 0\n", "http.request_timeout_ms"),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
            ("[http]\nmax_event_subscribers = 0\n", "http.max_event_subscribers"),
            (
                "[http]\nallowed_hosts = [\"http://x.example\"]\n",
                "http.allowed_hosts[0]",
            ),
            (
                "[http]\nallowed_hosts = [\"ok.example\", \"a b\"]\n",
                "http.allowed_hosts[1]",
            ),
        ] {
            let error = load_with_env(Some(write(toml).path()), no_env())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
        let settings = load_with_env(
            Some(write("[http]\nallowed_hosts = [\"taskgate.internal\", \"10.0.0.5\"]\n").path()),
            no_env(),
        )
        .unwrap();
        assert_eq!(settings.http.allowed_hosts, ["taskgate.internal", "10.0.0.5"]);
    }

    #[test]
    fn amqp_tls_files_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let amqps = "[broker]\nurl = \"amqps://h/%2f\"\n";
        for (extra, key) in [
            (
                format!("tls_ca_file = {:?}\n", missing.display().to_string()),
                "broker.tls_ca_file",
            ),
            (
                format!("tls_ca_file = {:?}\n", garbage.display().to_string()),
                "broker.tls_ca_file",
            ),
            (
                format!("tls_cert_file = {:?}\n", garbage.display().to_string()),
                "broker.tls_key_file",
            ),
            (
                format!(
                    "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
                    garbage.display().to_string(),
                    missing.display().to_string()
                ),
                "broker.tls_cert_file",
            ),
        ] {
            let error = load_with_env(Some(write(&format!("{amqps}{extra}")).path()), no_env())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{extra}: {error}");
        }
        // TLS files with a plain amqp:// URL are a mistake worth naming.
        let plain = format!(
            "[broker]\nurl = \"amqp://h/%2f\"\ntls_ca_file = {:?}\n",
            missing.display().to_string()
        );
        let error = load_with_env(Some(write(&plain).path()), no_env())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("broker.tls_ca_file") && error.contains("amqps://"),
            "{error}"
        );
    }

    #[test]
    fn tracking_settings_are_validated_by_key() {
        let cases = [
            ("[tracking]\ndatabase_url = \"mysql://x\"\n", "tracking.database_url"),
            ("[tracking]\nsync_queue = \"bad queue\"\n", "tracking.sync_queue"),
            ("[tracking]\nbatch_size = 0\n", "tracking.batch_size"),
            ("[tracking]\nquery_timeout_ms = 0\n", "tracking.query_timeout_ms"),
            (
                "[tracking]\nretry_min_ms = 500\nretry_max_ms = 100\n",
                "tracking.retry_max_ms",
            ),
            (
                "[tracking]\nconsumer_visibility_timeout_seconds = 0\n",
                "tracking.consumer_visibility_timeout_seconds",
            ),
            ("[outbox]\nmax_journal_entries = 0\n", "outbox.max_journal_entries"),
        ];
        for (toml, key) in cases {
            let error = load_with_env(Some(write(toml).path()), no_env())
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{toml}: {error}");
        }
        let defaults = load_with_env(None, no_env()).unwrap();
        assert!(defaults.tracking.is_sqlite() && defaults.tracking.migrate_on_start);
    }

    #[test]
    fn masked_output_hides_secrets_and_round_trips() {
        let mut settings = Settings::default();
        settings.http.admin_token = "secret-token".into();
        settings.broker.url = "amqp://user:hunter2@host:5672/%2f".into();
        let text = settings.to_masked_toml();
        assert!(!text.contains("secret-token") && !text.contains("hunter2"), "{text}");
        assert!(text.contains("[[routing.queues]]"), "{text}");
        assert_eq!(mask_url_password("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        let reparsed: Settings = Figment::from(Toml::string(&text)).extract().unwrap();
        assert_eq!(reparsed.routing, settings.routing);
    }
}
