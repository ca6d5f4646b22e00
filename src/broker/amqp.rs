//! RabbitMQ publisher over AMQP 0-9-1 (lapin).
//!
//! A background connection manager owns the connection: it connects with a
//! timeout and heartbeats, declares the topology on every (re)connect
//! (durable topic exchange, durable queues, bindings), enables publisher
//! confirms, and reconnects with jittered exponential backoff (`backoff`)
//! whenever the connection fails or a publish times out. Start-up never
//! waits for it; publishing without a connection fails at once as
//! transient, so the breaker, not the caller, absorbs outages.
//!
//! Every AMQP connection taskgate opens (this publisher and the tracking
//! consumer) goes through [`open_connection`]: heartbeats on, and for
//! `amqps://` TLS through rustls with the broker's certificate and host
//! name verified against the system roots plus `broker.tls_ca_file`, and an
//! optional client certificate. lapin is built with its rustls feature, so
//! `amqps://` can never quietly become a plain stream; a failed handshake is
//! an error that names TLS, in the log and in `broker:connection`.
//!
//! Publishing sends a whole slice with `mandatory` and persistent delivery
//! before waiting for any confirm, tells the relay it was handed over (so
//! the next slice follows it on the channel while this one is confirmed:
//! the relay's sliding window), then collects the confirms in order
//! against one deadline. An entry is `Ok` only on `basic.ack` without a
//! return; a returned message is permanent (dead-lettered by the relay).

use super::{BrokerStatus, PublishError, PublishResult, Publisher};
use crate::celery::{self, CeleryMessage};
use crate::config::{mask_url_password as mask_password, BrokerSettings};
use crate::outbox::{Lane, PendingEntry};
use crate::task::routing::TopicRouter;
use crate::task::Task;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Why an AMQP connection could not be opened, worded for an operator.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A `broker.tls_*` file could not be read or parsed (check-config
    /// refuses these at start-up; this catches a file changed since).
    #[error("TLS settings: {0}")]
    TlsSettings(String),
    /// The TLS handshake of an `amqps://` URL failed (a certificate that
    /// does not verify, a host name it does not name, a listener that does
    /// not speak TLS, a client certificate the broker wants): never retried
    /// in plain text.
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    /// The TCP connection of an `amqps://` URL could not be made (refused,
    /// unreachable, no such host): TLS was not even tried.
    #[error("cannot reach {endpoint} (for TLS): {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
}

/// Opens a connection to `broker.url` with the configured heartbeat and,
/// for `amqps://`, verified TLS (see the module documentation).
pub async fn open_connection(broker: &BrokerSettings, name: &str) -> Result<Connection, ConnectError> {
    let url = with_heartbeat(broker);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    if !broker.url.starts_with("amqps://") {
        return Ok(Connection::connect(&url, properties).await?);
    }
    let tls = tls_config(broker)?;
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_with_config(&url, properties, tls, runtime)
        .await
        .map_err(|error| {
            // lapin reports the TCP and the handshake failure alike, as an
            // I/O error; an AMQP-level refusal (credentials, vhost) comes
            // after TLS.
            let endpoint = mask_password(&broker.url);
            match error.kind() {
                lapin::ErrorKind::IOError(io) if is_tcp_failure(io.kind()) => ConnectError::Unreachable {
                    endpoint,
                    reason: io.to_string(),
                },
                lapin::ErrorKind::IOError(io) => {
                    let mut reason = io.to_string();
                    // RabbitMQ resets a client without a certificate rather
                    // than sending an alert that names it.
                    let cut_off = matches!(
                        io.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    );
                    if cut_off && broker.tls_cert_file.is_none() {
                        reason.push_str(
                            " (a broker that requires a client certificate does this: set \
                             broker.tls_cert_file and broker.tls_key_file)",
                        );
                    }
                    ConnectError::Tls { endpoint, reason }
                }
                _ => ConnectError::Amqp(error),
            }
        })
}

/// I/O errors of the TCP connection itself, before any TLS byte: the rest
/// (corrupt records, alerts, an unknown issuer, a closed stream) are the
/// handshake's.
fn is_tcp_failure(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind;
    matches!(
        kind,
        ErrorKind::ConnectionRefused
            | ErrorKind::TimedOut
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::AddrNotAvailable
            | ErrorKind::NotFound
    )
}

/// Largest AMQP frame taskgate accepts (RabbitMQ's default): a message's
/// headers travel in one frame, so this bounds how deeply a hostile header
/// can nest (see `THREAD_STACK_BYTES` in `crate::cli`).
const FRAME_MAX: u32 = 131_072;

/// The broker URL with the configured heartbeat (without heartbeats a
/// connection that went silent is never noticed) and [`FRAME_MAX`], unless
/// the URL sets them itself.
fn with_heartbeat(broker: &BrokerSettings) -> String {
    let mut url = broker.url.clone();
    for (key, value) in [
        ("heartbeat", broker.heartbeat_seconds.to_string()),
        ("frame_max", FRAME_MAX.to_string()),
    ] {
        if !url.contains(&format!("{key}=")) {
            let separator = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{separator}{key}={value}");
        }
    }
    url
}

/// Read at every connect, so renewed certificates are picked up without a
/// restart.
fn tls_config(broker: &BrokerSettings) -> Result<lapin::tcp::OwnedTLSConfig, ConnectError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|error| ConnectError::TlsSettings(format!("{key} {}: {error}", path.display())))
    };
    let cert_chain = match &broker.tls_ca_file {
        Some(path) => Some(String::from_utf8(read("broker.tls_ca_file", path)?).map_err(|_| {
            ConnectError::TlsSettings(format!("broker.tls_ca_file {} is not PEM text", path.display()))
        })?),
        None => None,
    };
    let identity = match (&broker.tls_cert_file, &broker.tls_key_file) {
        (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("broker.tls_cert_file", cert)?,
            key: read("broker.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(lapin::tcp::OwnedTLSConfig { identity, cert_chain })
}

struct LiveConnection {
    connection: Connection,
    channel: Channel,
    /// Signalled when a publish finds this connection unusable. One per
    /// connection: two slices failing on the same connection must not leave
    /// a signal behind that ends the next, healthy one.
    lost: Notify,
}

/// Why a configured queue is not declared as configured.
enum QueueDeclareError {
    /// It exists with other arguments; bound and used as it is.
    UsedAsItIs(String),
    /// It could not be declared (or bound) at all: the broker's reason.
    Undeclared(String),
}

/// While some configured queue could not be declared, declaring is tried
/// again this often on the live connection, so a queue an operator fixed
/// (permissions, a conflicting declaration deleted) is used without a
/// reconnect.
const REDECLARE_INTERVAL: Duration = Duration::from_secs(10);

pub struct AmqpPublisher {
    settings: BrokerSettings,
    router: TopicRouter,
    origin: String,
    live: Mutex<Option<Arc<LiveConnection>>>,
    /// Queues that could not be declared at all, with the broker's reason.
    undeclared: Mutex<HashMap<String, String>>,
    status: watch::Sender<BrokerStatus>,
    reconnect_now: Notify,
    stop: CancellationToken,
}

impl AmqpPublisher {
    /// Creates the publisher and starts its connection manager. Returns at
    /// once; the first connection attempt happens in the background.
    pub fn start(settings: BrokerSettings, router: TopicRouter) -> Arc<Self> {
        let endpoint = mask_password(&settings.url);
        let (status, _) = watch::channel(BrokerStatus::connecting(endpoint));
        let publisher = Arc::new(Self {
            settings,
            router,
            origin: celery::default_origin(),
            live: Mutex::new(None),
            undeclared: Mutex::new(HashMap::new()),
            status,
            reconnect_now: Notify::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(publisher.clone().manage_connection());
        publisher
    }

    fn endpoint(&self) -> String {
        mask_password(&self.settings.url)
    }

    fn set_status(&self, connected: bool, error: Option<String>) {
        metrics::gauge!("taskgate_broker_connected").set(if connected { 1.0 } else { 0.0 });
        self.status.send_if_modified(|status| {
            let changed = status.connected != connected || status.last_error != error;
            if changed {
                *status = BrokerStatus {
                    connected,
                    endpoint: self.endpoint(),
                    last_error: error.clone(),
                    // A new connection (or none) starts unblocked; the
                    // broker says again if its alarm is still on.
                    blocked: None,
                    queue_errors: status.queue_errors.clone(),
                    changed_at: chrono::Utc::now(),
                };
            }
            changed
        });
    }

    /// `connection.blocked` / `unblocked`: shown in health, and while
    /// blocked nothing new is sent and windows in flight wait for their
    /// confirms instead of timing out into a reconnect and a re-send.
    fn set_blocked(&self, reason: Option<String>) {
        match &reason {
            Some(reason) => tracing::warn!(
                endpoint = %self.endpoint(),
                reason,
                "the broker blocked the connection: nothing is published until it unblocks; tasks keep spooling"
            ),
            None => tracing::info!(endpoint = %self.endpoint(), "the broker unblocked the connection"),
        }
        metrics::gauge!("taskgate_broker_blocked").set(if reason.is_some() { 1.0 } else { 0.0 });
        self.status.send_if_modified(|status| {
            let changed = status.blocked != reason;
            if changed {
                status.blocked = reason.clone();
                status.changed_at = chrono::Utc::now();
            }
            changed
        });
    }

    /// The broker's reason while it blocks this connection.
    fn blocked_reason(&self) -> Option<String> {
        self.status.borrow().blocked.clone()
    }

    /// After a deadline passed: if the broker blocks the connection, waits
    /// until it unblocks (true: give the operation a new deadline) or the
    /// connection is gone (false). Not blocked: false, a real timeout.
    async fn outwait_block(&self) -> bool {
        if self.blocked_reason().is_none() {
            return false;
        }
        let mut status = self.status.subscribe();
        tokio::select! {
            unblocked = status.wait_for(|status| status.blocked.is_none() || !status.connected) => {
                unblocked.is_ok_and(|status| status.connected)
            }
            _ = self.stop.cancelled() => false,
        }
    }

    /// `future` within `deadline`, extended while the broker blocks the
    /// connection; `None` on a real timeout.
    async fn within_deadline<F: Future>(
        &self,
        future: F,
        deadline: &mut tokio::time::Instant,
        timeout: Duration,
    ) -> Option<F::Output> {
        let mut future = std::pin::pin!(future);
        loop {
            match tokio::time::timeout_at(*deadline, future.as_mut()).await {
                Ok(output) => return Some(output),
                Err(_) if self.outwait_block().await => {
                    *deadline = tokio::time::Instant::now() + timeout;
                }
                Err(_) => return None,
            }
        }
    }

    async fn manage_connection(self: Arc<Self>) {
        let mut backoff = self.settings.reconnect_policy().delays();
        let connect_timeout = Duration::from_millis(self.settings.connect_timeout_ms);
        // The cause last logged at warn: the first failed attempt and every
        // change of cause are logged, not each retry of the same one.
        let mut logged_cause: Option<String> = None;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let attempt = tokio::time::timeout(connect_timeout, self.connect_and_declare());
            let outcome = tokio::select! {
                outcome = attempt => outcome,
                _ = self.stop.cancelled() => return,
            };
            match outcome {
                Ok(Ok(live)) => {
                    backoff.reset();
                    logged_cause = None;
                    let live = Arc::new(live);
                    let mut events = live.connection.events_listener();
                    *self.live.lock().expect("live lock") = Some(live.clone());
                    self.set_status(true, None);
                    tracing::info!(endpoint = %self.endpoint(), "connected to the AMQP broker");
                    let mut redeclare = tokio::time::interval(REDECLARE_INTERVAL);
                    redeclare.reset();
                    let reason = loop {
                        tokio::select! {
                            _ = redeclare.tick(), if !self.status.borrow().queue_errors.is_empty() => {
                                self.declare_queues(&live.connection, self.router.exchange()).await;
                            }
                            event = events.next() => match event {
                                Some(lapin::Event::Error(error)) => break format!("connection error: {error}"),
                                Some(lapin::Event::ConnectionBlocked(reason)) => self.set_blocked(Some(reason)),
                                Some(lapin::Event::ConnectionUnblocked) => self.set_blocked(None),
                                Some(_) => continue,
                                None => break "connection closed".to_owned(),
                            },
                            _ = live.lost.notified() => break "publish failed on the connection".to_owned(),
                            _ = self.stop.cancelled() => return,
                        }
                    };
                    tracing::warn!(endpoint = %self.endpoint(), %reason, "lost the AMQP connection");
                    self.live.lock().expect("live lock").take();
                    self.set_status(false, Some(reason));
                    // Closing waits on the broker; never let it hold us up.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            live.connection.close(320, "reconnecting".into()),
                        )
                        .await;
                    });
                }
                Ok(Err(error)) => {
                    let cause = error.to_string();
                    self.log_connect_failure(&mut logged_cause, &cause);
                    self.set_status(false, Some(cause));
                }
                Err(_) => {
                    let cause = format!("connecting timed out after {} ms", connect_timeout.as_millis());
                    self.log_connect_failure(&mut logged_cause, &cause);
                    self.set_status(false, Some(cause));
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.reconnect_now.notified() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn connect_and_declare(&self) -> Result<LiveConnection, ConnectError> {
        let connection = open_connection(&self.settings, "taskgate").await?;
        self.declare(connection).await.map_err(ConnectError::Amqp)
    }

    async fn declare(&self, connection: Connection) -> Result<LiveConnection, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let exchange = self.router.exchange();
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.declare_queues(&connection, exchange).await;
        Ok(LiveConnection {
            connection,
            channel,
            lost: Notify::new(),
        })
    }

    /// Declares and binds every configured queue, each on a channel of its
    /// own: a queue that cannot be declared as configured
    /// (PRECONDITION_FAILED: it exists with other arguments; ACCESS_REFUSED)
    /// closes only that channel, so the other queues are still declared and
    /// keep receiving. The failures are named in health
    /// (`broker:topology`); a queue that could not be declared at all is
    /// remembered with the broker's reason, which its returned tasks are
    /// dead-lettered with.
    async fn declare_queues(&self, connection: &Connection, exchange: &str) {
        let mut queue_errors = Vec::new();
        let mut undeclared = HashMap::new();
        for binding in self.router.queues() {
            let queue = binding.queue().as_str();
            let problem = match self.declare_queue(connection, binding, exchange).await {
                Ok(()) => continue,
                Err(QueueDeclareError::UsedAsItIs(declare_error)) => format!(
                    "exists with other arguments than taskgate declares and is used as it is \
                     (make them match): {declare_error}"
                ),
                Err(QueueDeclareError::Undeclared(declare_error)) => {
                    undeclared.insert(queue.to_owned(), declare_error.clone());
                    format!("cannot be declared, so its tasks are dead-lettered as unroutable: {declare_error}")
                }
            };
            queue_errors.push(format!("queue {queue}: {problem}"));
        }
        *self.undeclared.lock().expect("undeclared lock") = undeclared;
        self.status.send_if_modified(|status| {
            let changed = status.queue_errors != queue_errors;
            // Logged when the problems change, not at every retry (every
            // REDECLARE_INTERVAL): a queue that stays broken is in health.
            if changed {
                for problem in &queue_errors {
                    tracing::warn!(%problem, "cannot declare a configured queue");
                }
                if queue_errors.is_empty() && !status.queue_errors.is_empty() {
                    tracing::info!("every configured queue is declared again");
                }
            }
            status.queue_errors = queue_errors;
            changed
        });
    }

    /// Declares and binds one queue on a channel of its own (closed after).
    /// A queue that exists with other arguments is still bound as it is,
    /// so its tasks reach it; the error says so.
    async fn declare_queue(
        &self,
        connection: &Connection,
        binding: &crate::task::routing::QueueBinding,
        exchange: &str,
    ) -> Result<(), QueueDeclareError> {
        let mut arguments = FieldTable::default();
        if self.settings.quorum_queues {
            arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        let queue = binding.queue().as_str();
        let bind = |channel: Channel| async move {
            let bound = channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    binding.binding_key().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await;
            let _ = channel.close(200, "declared".into()).await;
            bound
        };
        let undeclared = |error: lapin::Error| QueueDeclareError::Undeclared(error.to_string());
        let channel = connection.create_channel().await.map_err(undeclared)?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await;
        match declared {
            Ok(_) => bind(channel)
                .await
                .map_err(|error| QueueDeclareError::Undeclared(format!("binding failed: {error}"))),
            Err(declare_error) => {
                // The broker closed the channel; bind the queue as it is
                // on a fresh one if it exists at all.
                let channel = connection.create_channel().await.map_err(undeclared)?;
                match bind(channel).await {
                    Ok(()) => Err(QueueDeclareError::UsedAsItIs(declare_error.to_string())),
                    Err(_) => Err(QueueDeclareError::Undeclared(declare_error.to_string())),
                }
            }
        }
    }

    /// The broker's reason, if one of `task`'s queues could not be declared.
    fn undeclared_queue(&self, task: &Task) -> Option<(String, String)> {
        let undeclared = self.undeclared.lock().expect("undeclared lock");
        task.queues.iter().find_map(|queue| {
            undeclared
                .get(queue.as_str())
                .map(|reason| (queue.as_str().to_owned(), reason.clone()))
        })
    }

    fn log_connect_failure(&self, logged_cause: &mut Option<String>, cause: &str) {
        if logged_cause.as_deref() == Some(cause) {
            tracing::debug!(endpoint = %self.endpoint(), cause, "AMQP connection attempt failed again");
            return;
        }
        tracing::warn!(endpoint = %self.endpoint(), cause, "cannot connect to the AMQP broker");
        *logged_cause = Some(cause.to_owned());
    }

    fn live(&self) -> Option<Arc<LiveConnection>> {
        self.live.lock().expect("live lock").clone()
    }

    /// Publishes `entries` and collects their confirms; `handed_over` is
    /// resolved once every publish was handed to lapin (their order on
    /// the channel is then fixed), before any confirm is awaited.
    async fn publish_window(
        &self,
        entries: &[PendingEntry],
        handed_over: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Vec<PublishResult> {
        let Some(live) = self.live() else {
            let detail = self.status.borrow().last_error.clone();
            return entries
                .iter()
                .map(|_| Err(PublishError::not_connected(detail.as_deref())))
                .collect();
        };
        if let Some(reason) = self.blocked_reason() {
            return entries
                .iter()
                .map(|_| {
                    Err(PublishError::Unsent(format!(
                        "the broker blocked the connection: {reason}"
                    )))
                })
                .collect();
        }
        let timeout = Duration::from_millis(self.settings.publish_timeout_ms);
        let mut deadline = tokio::time::Instant::now() + timeout;
        let exchange = self.router.exchange();
        let mut results: Vec<Option<PublishResult>> = vec![None; entries.len()];
        let mut confirms = Vec::with_capacity(entries.len());
        let mut connection_broken = false;
        // Every publish is handed to lapin before any is awaited. Awaiting
        // each one in turn (until lapin's I/O thread wrote its frames) costs
        // a reschedule per message, and under HTTP load the relay's task
        // waits behind every connection's task each time: publishing then
        // slowed to a crawl while accepts went on. lapin 4 queues a
        // publish's frames (and numbers its confirm) in the synchronous
        // part of the first poll (`send_method_frame_with_body`), so polling
        // each future once, in order, keeps the window's order on the
        // wire; the FIFO tests through RabbitMQ hold it to that. Each
        // message is encoded just before it is handed over, so the broker
        // starts on the first one while the rest are encoded.
        let mut sending = Vec::with_capacity(entries.len());
        let mut body_sizes = vec![0; entries.len()];
        for (index, entry) in entries.iter().enumerate() {
            let now = chrono::Utc::now();
            if PublishError::has_expired(&entry.task, now) {
                results[index] = Some(Err(PublishError::Expired));
                continue;
            }
            let message = celery::encode_at(&entry.task, &self.origin, now);
            body_sizes[index] = message.body.len();
            let properties = basic_properties(&message);
            let channel = live.channel.clone();
            let routing_key = ShortString::from(entry.task.routing_key.as_str());
            let mut publish = Box::pin(async move {
                channel
                    .basic_publish(
                        exchange.into(),
                        routing_key,
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &message.body,
                        properties,
                    )
                    .await
            });
            let first_poll = std::future::poll_fn(|context| Poll::Ready(publish.as_mut().poll(context))).await;
            match first_poll {
                Poll::Ready(Ok(confirm)) => confirms.push((index, confirm)),
                Poll::Ready(Err(error)) => {
                    connection_broken = true;
                    results[index] = Some(Err(PublishError::from_amqp(&error)));
                    break;
                }
                Poll::Pending => sending.push((index, publish)),
            }
        }
        for (index, publish) in sending {
            if connection_broken {
                break;
            }
            results[index] = match self.within_deadline(publish, &mut deadline, timeout).await {
                Some(Ok(confirm)) => {
                    confirms.push((index, confirm));
                    continue;
                }
                Some(Err(error)) => Some(Err(PublishError::from_amqp(&error))),
                None => Some(Err(PublishError::timed_out(
                    "handing the message to the connection",
                    timeout,
                ))),
            };
            connection_broken = true;
        }
        if let Some(handed_over) = handed_over {
            let _ = handed_over.send(());
        }
        confirms.sort_by_key(|(index, _)| *index);
        for (index, confirm) in confirms {
            let entry = &entries[index];
            results[index] = Some(match self.within_deadline(confirm, &mut deadline, timeout).await {
                Some(Ok(Confirmation::Ack(None))) => Ok(()),
                Some(Ok(Confirmation::Ack(Some(returned)))) | Some(Ok(Confirmation::Nack(Some(returned)))) => {
                    let queues = entry
                        .task
                        .queues
                        .iter()
                        .map(|queue| queue.as_str())
                        .collect::<Vec<_>>()
                        .join(",");
                    // One readable line (lapin's own, which prints the whole
                    // message as bytes, is filtered out by the CLI's default
                    // log filter).
                    tracing::warn!(
                        task_id = %entry.task.id,
                        task = %entry.task.task,
                        queue = %if queues.is_empty() { "none" } else { queues.as_str() },
                        exchange,
                        routing_key = %entry.task.routing_key,
                        reply_code = returned.reply_code,
                        reply_text = %returned.reply_text,
                        "the broker returned the message: no queue is bound for its routing key"
                    );
                    let reply = format!("{} {}", returned.reply_code, returned.reply_text);
                    Err(match self.undeclared_queue(&entry.task) {
                        Some((queue, reason)) => PublishError::Permanent(format!(
                            "unroutable: queue {queue:?} could not be declared ({reason}); the broker returned the message ({reply})"
                        )),
                        None => PublishError::unroutable(exchange, &entry.task.routing_key, &reply),
                    })
                }
                Some(Ok(Confirmation::Nack(None))) => {
                    Err(PublishError::Transient("the broker nacked the message".into()))
                }
                Some(Ok(Confirmation::NotRequested)) => {
                    connection_broken = true;
                    Err(PublishError::Transient(
                        "publisher confirms are not enabled on the channel".into(),
                    ))
                }
                Some(Err(error)) => {
                    connection_broken = true;
                    Err(PublishError::from_amqp(&error))
                }
                None => {
                    connection_broken = true;
                    Err(PublishError::timed_out("waiting for the broker's confirm", timeout))
                }
            });
        }
        if connection_broken {
            // A timeout or channel error leaves the channel in an unknown
            // state: start over on a fresh connection.
            live.lost.notify_one();
        }
        // A message over the broker's size limit would be refused again on
        // every retry, and block its lane for good: it alone is refused for
        // good (dead-lettered); the others the close took are sent again.
        for (result, size) in results.iter_mut().zip(&body_sizes) {
            if let Some(Err(error)) = result {
                if let Some((refused, limit)) = error.broker_refused_size() {
                    if refused == *size {
                        *result = Some(Err(PublishError::too_large(refused, limit)));
                    }
                }
            }
        }
        // What is left was never handed to the connection: a message before
        // it failed, so it was not sent (and is no attempt on the task).
        let cause = results
            .iter()
            .flatten()
            .find_map(|result| result.as_ref().err().filter(|error| error.is_retryable()))
            .map(ToString::to_string)
            .unwrap_or_else(|| "the connection failed".to_owned());
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(PublishError::Unsent(format!(
                        "not sent: a message before it in the window failed ({cause})"
                    )))
                })
            })
            .collect()
    }
}

impl Publisher for AmqpPublisher {
    fn lanes_for(&self, _task: &Task) -> Vec<Lane> {
        // One publish to the exchange reaches every bound queue, so one lane
        // (in acceptance order) gives FIFO per queue.
        vec![Lane::new(self.router.exchange())]
    }

    fn publish<'a>(&'a self, _lane: &'a Lane, entries: &'a [PendingEntry]) -> BoxFuture<'a, Vec<PublishResult>> {
        Box::pin(self.publish_window(entries, None))
    }

    fn publish_pipelined<'a>(
        &'a self,
        _lane: &'a Lane,
        entries: &'a [PendingEntry],
        handed_over: tokio::sync::oneshot::Sender<()>,
    ) -> BoxFuture<'a, Vec<PublishResult>> {
        Box::pin(self.publish_window(entries, Some(handed_over)))
    }

    fn status(&self) -> watch::Receiver<BrokerStatus> {
        self.status.subscribe()
    }

    fn reconnect_now(&self) {
        self.reconnect_now.notify_one();
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop.cancel();
            let live = self.live.lock().expect("live lock").take();
            if let Some(live) = live {
                let close = async {
                    let _ = live.channel.close(200, "taskgate shutting down".into()).await;
                    let _ = live.connection.close(200, "taskgate shutting down".into()).await;
                };
                let _ = tokio::time::timeout(Duration::from_millis(self.settings.connect_timeout_ms), close).await;
            }
            self.set_status(false, Some("shut down".into()));
        })
    }
}

/// AMQP basic properties of a Celery message (protocol v2 puts the task
/// metadata in headers; the properties carry ids and content type).
pub fn basic_properties(message: &CeleryMessage) -> BasicProperties {
    let properties = &message.properties;
    let mut basic = BasicProperties::default()
        .with_content_type(ShortString::from(properties.content_type))
        .with_content_encoding(ShortString::from(properties.content_encoding))
        .with_headers(json_object_to_table(&message.headers))
        .with_delivery_mode(properties.delivery_mode)
        .with_priority(properties.priority)
        .with_correlation_id(ShortString::from(properties.correlation_id.as_str()))
        // DESIGN: message_id = task id, so brokers and consumers can drop
        // the duplicates at-least-once delivery allows.
        .with_message_id(ShortString::from(properties.correlation_id.as_str()));
    if let Some(reply_to) = &properties.reply_to {
        basic = basic.with_reply_to(ShortString::from(reply_to.as_str()));
    }
    // RabbitMQ refuses a per-message TTL above 2^32-1 ms (about 49 days)
    // with a channel error that would block the lane; the worker checks the
    // `expires` header itself, so such a far expiry needs no broker TTL.
    if let Some(expiration) = properties.expiration.as_deref().filter(|ttl| fits_rabbitmq_ttl(ttl)) {
        basic = basic.with_expiration(ShortString::from(expiration));
    }
    basic
}

fn fits_rabbitmq_ttl(milliseconds: &str) -> bool {
    milliseconds.parse::<u64>().is_ok_and(|ms| ms <= u64::from(u32::MAX))
}

fn json_object_to_table(object: &serde_json::Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in object {
        table.insert(ShortString::from(key.as_str()), json_to_amqp(value));
    }
    table
}

/// JSON to AMQP field values the way py-amqp encodes Python values, so a
/// Celery worker reads back exactly what Celery itself would have sent.
fn json_to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => AMQPValue::LongLongInt(integer),
            None => AMQPValue::Double(number.as_f64().unwrap_or(0.0)),
        },
        Value::String(text) => AMQPValue::LongString(LongString::from(text.as_str())),
        Value::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(json_to_amqp).collect::<Vec<_>>()))
        }
        Value::Object(object) => AMQPValue::FieldTable(json_object_to_table(object)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn far_expiry_gets_no_broker_ttl() {
        assert!(fits_rabbitmq_ttl("1000"));
        assert!(fits_rabbitmq_ttl("4294967295"));
        assert!(!fits_rabbitmq_ttl("4294967296"));
        assert!(!fits_rabbitmq_ttl("not a number"));
    }

    #[test]
    fn json_values_map_to_amqp_field_types() {
        assert_eq!(json_to_amqp(&json!(null)), AMQPValue::Void);
        assert_eq!(json_to_amqp(&json!(3)), AMQPValue::LongLongInt(3));
        assert_eq!(json_to_amqp(&json!(1.5)), AMQPValue::Double(1.5));
        assert_eq!(
            json_to_amqp(&json!([null, "a"])),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::LongString("a".into())
            ]))
        );
    }
}
