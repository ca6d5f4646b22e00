//! Amazon SQS publisher (aws-sdk-sqs), sending exactly what kombu's SQS
//! transport sends, so a stock Celery worker on SQS consumes it.
//!
//! Invariants:
//! - **Start-up makes no SQS call.** [`SqsPublisher::start`] returns at
//!   once; a background manager loads the AWS configuration (standard
//!   credentials chain, region), builds the client, then resolves every
//!   configured queue URL (creating missing queues when
//!   `broker.create_queues` is on) and retries with jittered backoff while
//!   not connected. Publishing before the client exists fails at once as
//!   transient, so the breaker, not the caller, absorbs outages.
//! - **Every call is bounded**: the SDK's connect, attempt and operation
//!   timeouts come from `broker.connect_timeout_ms` / `publish_timeout_ms`,
//!   the SDK retries at most once (the relay does the real retrying), and a
//!   tokio timeout guards each call on top.
//! - **One lane per queue.** SQS has no exchanges: the task's routed queues
//!   (`Task::queues`, the configured topic bindings) each get their own
//!   outbox lane, named after the logical queue, so a copy is confirmed,
//!   retried or dead-lettered per queue and never re-sent to another.
//! - **Names as kombu spells them**: [`sqs_queue_name`] is kombu's
//!   `entity_name(prefix + name)`.
//! - **Order within a lane**: a window is sent as consecutive
//!   `SendMessageBatch` calls (at most [`MAX_BATCH_ENTRIES`] entries and
//!   [`MAX_BATCH_BYTES`] bytes each): one call at a time on a FIFO queue
//!   (SQS orders by arrival), up to [`BATCHES_IN_FLIGHT`] at once on a
//!   standard queue (whose order SQS only attempts), so a backlog drains
//!   at the API's pace. After a transient failure the rest of the window
//!   is not sent, since it would overtake the entries that will be
//!   retried; the relay completes nothing behind the first failure.
//! - **Poison messages go alone**: a message over [`MAX_MESSAGE_BYTES`] is
//!   dead-lettered without being sent; when SQS refuses a whole batch for
//!   its content, the batch is re-sent entry by entry so that only the
//!   culprit is dead-lettered.
//! - **Stable identity across retries**: on FIFO queues
//!   `MessageDeduplicationId` is derived from task id and queue, and the
//!   kombu `delivery_tag` too, so a retried message is byte-identical.
//! - **Status**: connected after a successful call (GetQueueUrl,
//!   CreateQueue, SendMessageBatch), disconnected with the error after a
//!   failed one, and disconnected while a configured queue is missing and
//!   may not be created.
//!
//! Error classification lives in [`super::error`].

use super::error::{SqsErrorClass, SqsFailure};
pub use super::sqs_naming::{
    is_fifo, is_valid_message_id, sqs_queue_name, validate_sqs_queue_name, MAX_MESSAGE_ID_CHARS, MAX_QUEUE_NAME_CHARS,
};
use super::{BrokerStatus, PublishError, PublishResult, Publisher};
use crate::celery;
use crate::config::{mask_url_password, BrokerSettings};
use crate::outbox::{Lane, PendingEntry};
use crate::task::routing::TopicRouter;
use crate::task::{Task, TaskId};
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Largest message SQS accepts (body plus attributes; we send no attributes).
pub const MAX_MESSAGE_BYTES: usize = 1_048_576;
/// Largest total payload of one `SendMessageBatch` call.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// Most entries one `SendMessageBatch` call may carry.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Region kombu falls back to when none is configured anywhere.
const DEFAULT_REGION: &str = "us-east-1";
/// kombu's `default_visibility_timeout`: a queue created by taskgate must
/// behave like one a Celery worker would have created, or long tasks would
/// be redelivered after SQS's default of 30 s.
const KOMBU_VISIBILITY_TIMEOUT_SECONDS: &str = "1800";
/// The request property that picks a task's FIFO message group.
pub const MESSAGE_GROUP_PROPERTY: &str = "message_group_id";
/// Counts `SendMessageBatch` calls, labelled with the SQS queue name.
pub const BATCH_CALLS_METRIC: &str = "taskgate_sqs_send_message_batch_calls_total";

/// `MessageDeduplicationId` for a task's copy on one queue: the same on
/// every retry (so SQS drops a duplicate sent within its 5-minute window),
/// and distinct per queue.
pub fn deduplication_id(task_id: &TaskId, sqs_name: &str) -> String {
    let mut id = format!("{task_id}:{sqs_name}");
    // Queue names are ASCII, so byte truncation stays on a char boundary.
    id.truncate(MAX_MESSAGE_ID_CHARS);
    id
}

/// kombu's envelope carries a `delivery_tag` (a UUID per publish; a worker
/// replaces it with the SQS receipt handle). Deriving it from task id and
/// queue keeps a retried message byte-identical to the first attempt.
fn delivery_tag(task_id: &TaskId, sqs_name: &str) -> String {
    // FNV-1a: small, stable across releases, good enough to spread queues.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sqs_name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut bytes = *task_id.as_bytes();
    for (index, byte) in hash.to_be_bytes().iter().enumerate() {
        bytes[index] ^= byte;
        bytes[index + 8] ^= byte.rotate_left(4);
    }
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// The FIFO `MessageGroupId`: the request property `message_group_id` when
/// given (a string, or a number in its decimal form), else the configured
/// default.
fn message_group_id(task: &Task, default: &str) -> Result<String, PublishError> {
    let group = match task.properties.get(MESSAGE_GROUP_PROPERTY) {
        None | Some(serde_json::Value::Null) => default.to_owned(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(serde_json::Value::Number(number)) => number.to_string(),
        Some(other) => {
            return Err(PublishError::Permanent(format!(
                "properties.{MESSAGE_GROUP_PROPERTY} must be a string, not {other}"
            )))
        }
    };
    if !is_valid_message_id(&group) {
        return Err(PublishError::Permanent(format!(
            "properties.{MESSAGE_GROUP_PROPERTY} {group:?} is not a valid SQS MessageGroupId \
             (1 to {MAX_MESSAGE_ID_CHARS} ASCII letters, digits or punctuation)"
        )));
    }
    Ok(group)
}

/// `SendMessageBatch` calls in flight per standard queue.
const BATCHES_IN_FLIGHT: usize = 4;

/// Whether a message of `size` bytes still fits a batch that holds
/// `entries` messages of `bytes` bytes in all. An empty batch takes any
/// message up to [`MAX_MESSAGE_BYTES`].
fn batch_has_room(entries: usize, bytes: usize, size: usize) -> bool {
    entries == 0 || (entries < MAX_BATCH_ENTRIES && bytes + size <= MAX_BATCH_BYTES)
}

/// One message ready to send: its place in the window and its SQS fields.
struct OutgoingMessage {
    index: usize,
    body: String,
    group_id: Option<String>,
    deduplication_id: Option<String>,
}

impl OutgoingMessage {
    fn request_entry(&self, position: usize) -> Result<SendMessageBatchRequestEntry, SqsFailure> {
        SendMessageBatchRequestEntry::builder()
            .id(position.to_string())
            .message_body(self.body.clone())
            .set_message_group_id(self.group_id.clone())
            .set_message_deduplication_id(self.deduplication_id.clone())
            .build()
            .map_err(|error| {
                SqsFailure::new(
                    SqsErrorClass::Unavailable,
                    format!("building a SendMessageBatch entry: {error}"),
                )
            })
    }
}

/// What the connection status is computed from.
#[derive(Default)]
struct ConnectionState {
    /// The error of the last SQS call, `None` after a success.
    last_call_error: Option<String>,
    /// Configured queues known not to exist while `create_queues` is off.
    missing_queues: BTreeSet<String>,
}

pub struct SqsPublisher {
    settings: BrokerSettings,
    create_queues: bool,
    prefix: String,
    router: TopicRouter,
    origin: String,
    /// Set once by the manager when the AWS configuration is loaded.
    client: OnceLock<Client>,
    /// SQS queue name to queue URL; resolved once, dropped when SQS says
    /// the queue is gone.
    queue_urls: Mutex<HashMap<String, String>>,
    connection: Mutex<ConnectionState>,
    status: watch::Sender<BrokerStatus>,
    /// Signalled when a call fails, so the manager starts probing.
    connection_lost: Notify,
    reconnect_now: Notify,
    stop: CancellationToken,
}

impl SqsPublisher {
    /// Creates the publisher and starts its manager. Returns at once; no
    /// SQS call (and no AWS configuration lookup) happens before it does.
    /// `create_queues` is the effective `broker.create_queues`.
    pub fn start(settings: BrokerSettings, router: TopicRouter, create_queues: bool) -> Arc<Self> {
        let endpoint = endpoint_description(&settings);
        let (status, _) = watch::channel(BrokerStatus::connecting(endpoint));
        let publisher = Arc::new(Self {
            prefix: settings.queue_name_prefix.clone().unwrap_or_default(),
            settings,
            create_queues,
            router,
            origin: celery::default_origin(),
            client: OnceLock::new(),
            queue_urls: Mutex::new(HashMap::new()),
            connection: Mutex::new(ConnectionState::default()),
            status,
            connection_lost: Notify::new(),
            reconnect_now: Notify::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(publisher.clone().manage_connection());
        publisher
    }

    /// The SQS queue name of a logical queue.
    pub fn queue_name(&self, queue: &str) -> String {
        sqs_queue_name(&self.prefix, queue)
    }

    fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.publish_timeout_ms)
    }

    /// The SDK's bound for one operation: room for its one retry.
    fn operation_timeout(&self) -> Duration {
        self.attempt_timeout() * 2
    }

    /// Our own bound on a call, over the SDK's: identity resolution and
    /// anything else the SDK's timers might not cover.
    fn call_limit(&self) -> Duration {
        self.operation_timeout() + Duration::from_millis(self.settings.connect_timeout_ms)
    }

    fn set_status(&self, connected: bool, error: Option<String>) {
        metrics::gauge!("taskgate_broker_connected").set(if connected { 1.0 } else { 0.0 });
        self.status.send_if_modified(|status| {
            let changed = status.connected != connected || status.last_error != error;
            if changed {
                *status = BrokerStatus {
                    connected,
                    endpoint: status.endpoint.clone(),
                    last_error: error.clone(),
                    blocked: None,
                    queue_errors: Vec::new(),
                    changed_at: chrono::Utc::now(),
                };
            }
            changed
        });
    }

    /// Recomputes the status from the last call and the missing queues.
    fn refresh_status(&self, connection: &ConnectionState) {
        let (connected, error) = match (&connection.last_call_error, connection.missing_queues.is_empty()) {
            (Some(error), _) => (false, Some(error.clone())),
            (None, false) => {
                let names: Vec<&str> = connection.missing_queues.iter().map(String::as_str).collect();
                (
                    false,
                    Some(format!(
                        "SQS queue(s) {} do not exist and broker.create_queues is off",
                        names.join(", ")
                    )),
                )
            }
            (None, true) => (true, None),
        };
        self.set_status(connected, error);
    }

    fn call_succeeded(&self) {
        let mut connection = self.connection.lock().expect("connection lock");
        connection.last_call_error = None;
        self.refresh_status(&connection);
    }

    /// Records a failed call in the status (when it is about reaching SQS)
    /// and wakes the manager to probe until SQS answers again.
    fn call_failed(&self, failure: &SqsFailure) {
        if !failure.affects_connection() {
            return;
        }
        {
            let mut connection = self.connection.lock().expect("connection lock");
            connection.last_call_error = Some(failure.detail.clone());
            self.refresh_status(&connection);
        }
        self.connection_lost.notify_one();
    }

    /// A queue SQS says does not exist while we may not create it: SQS
    /// answered (so this is no connection error), but the status reports
    /// the queue, and the manager keeps looking for it with backoff.
    fn report_missing_queue(&self, sqs_name: &str) {
        tracing::warn!(
            queue = sqs_name,
            "SQS queue does not exist and broker.create_queues is off"
        );
        {
            let mut connection = self.connection.lock().expect("connection lock");
            connection.last_call_error = None;
            connection.missing_queues.insert(sqs_name.to_owned());
            self.refresh_status(&connection);
        }
        self.connection_lost.notify_one();
    }

    fn set_queue_missing(&self, sqs_name: &str, missing: bool) {
        let mut connection = self.connection.lock().expect("connection lock");
        let changed = if missing {
            connection.missing_queues.insert(sqs_name.to_owned())
        } else {
            connection.missing_queues.remove(sqs_name)
        };
        if changed {
            self.refresh_status(&connection);
        }
    }

    /// Runs one SDK call under our own timeout. Successes mark the status
    /// connected; failures are returned for the caller to record, since
    /// only it knows whether a missing queue is about to be created.
    async fn call<T, E>(
        &self,
        operation: &str,
        request: impl Future<Output = Result<T, SdkError<E>>>,
    ) -> Result<T, SqsFailure>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match tokio::time::timeout(self.call_limit(), request).await {
            Ok(Ok(output)) => {
                self.call_succeeded();
                Ok(output)
            }
            Ok(Err(error)) => Err(SqsFailure::from_sdk(operation, &error)),
            Err(_) => Err(SqsFailure::new(
                SqsErrorClass::Unavailable,
                format!("{operation} timed out after {} ms", self.call_limit().as_millis()),
            )),
        }
    }

    async fn build_client(&self) -> Client {
        client(&self.settings, self.attempt_timeout()).await
    }

    async fn manage_connection(self: Arc<Self>) {
        let client = tokio::select! {
            client = self.build_client() => client,
            _ = self.stop.cancelled() => return,
        };
        let client = self.client.get_or_init(|| client).clone();
        let mut backoff = self.settings.reconnect_policy().delays();
        // Log transitions only (and the first outcome), not every probe.
        let mut logged_health: Option<bool> = None;
        loop {
            let healthy = tokio::select! {
                healthy = self.check_queues(&client) => healthy,
                _ = self.stop.cancelled() => return,
            };
            if logged_health != Some(healthy) {
                let endpoint = self.status.borrow().endpoint.clone();
                match (healthy, self.status.borrow().last_error.clone()) {
                    (true, _) => tracing::info!(%endpoint, "SQS reachable and queues resolved"),
                    (false, error) => {
                        tracing::warn!(%endpoint, ?error, "SQS not usable; retrying with backoff")
                    }
                }
                logged_health = Some(healthy);
            }
            if healthy {
                backoff.reset();
                tokio::select! {
                    _ = self.connection_lost.notified() => {}
                    _ = self.reconnect_now.notified() => {}
                    _ = self.stop.cancelled() => return,
                }
                continue;
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.reconnect_now.notified() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Resolves every configured queue that has no URL yet; when all have
    /// one, asks SQS for the first again, as a cheap sign of life. Returns
    /// whether SQS answered and every queue exists.
    async fn check_queues(&self, client: &Client) -> bool {
        let names: Vec<String> = self
            .router
            .queues()
            .iter()
            .map(|binding| self.queue_name(binding.queue().as_str()))
            .collect();
        let unresolved: Vec<&String> = {
            let urls = self.queue_urls.lock().expect("queue url lock");
            names.iter().filter(|name| !urls.contains_key(*name)).collect()
        };
        if unresolved.is_empty() {
            let Some(first) = names.first() else {
                return true;
            };
            return match self.get_queue_url(client, first).await {
                Ok(_) => true,
                Err(failure) if failure.class == SqsErrorClass::QueueMissing => {
                    // Deleted under us: forget it, so the next check resolves
                    // (or creates) it anew.
                    self.forget_queue_url(first);
                    if !self.create_queues {
                        self.report_missing_queue(first);
                    }
                    false
                }
                Err(failure) => {
                    self.call_failed(&failure);
                    false
                }
            };
        }
        for name in unresolved {
            match self.queue_url(client, name).await {
                Ok(_) => {}
                // One missing queue should not hide the others' state.
                Err(failure) if failure.class == SqsErrorClass::QueueMissing => {}
                Err(failure) => {
                    tracing::debug!(queue = %name, error = %failure.detail, "SQS not reachable");
                    return false;
                }
            }
        }
        self.connection
            .lock()
            .expect("connection lock")
            .missing_queues
            .is_empty()
    }

    fn forget_queue_url(&self, sqs_name: &str) {
        self.queue_urls.lock().expect("queue url lock").remove(sqs_name);
    }

    async fn get_queue_url(&self, client: &Client, sqs_name: &str) -> Result<String, SqsFailure> {
        let output = self
            .call("GetQueueUrl", client.get_queue_url().queue_name(sqs_name).send())
            .await?;
        let url = output
            .queue_url
            .ok_or_else(|| SqsFailure::new(SqsErrorClass::Unavailable, "GetQueueUrl answered without a QueueUrl"))?;
        Ok(self.remember_queue_url(sqs_name, url))
    }

    async fn create_queue(&self, client: &Client, sqs_name: &str) -> Result<String, SqsFailure> {
        let mut request = client
            .create_queue()
            .queue_name(sqs_name)
            .attributes(QueueAttributeName::VisibilityTimeout, KOMBU_VISIBILITY_TIMEOUT_SECONDS);
        if is_fifo(sqs_name) {
            // Deduplication uses the MessageDeduplicationId we derive, not a
            // hash of the body.
            request = request
                .attributes(QueueAttributeName::FifoQueue, "true")
                .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
        }
        let output = self.call("CreateQueue", request.send()).await?;
        let url = output
            .queue_url
            .ok_or_else(|| SqsFailure::new(SqsErrorClass::Unavailable, "CreateQueue answered without a QueueUrl"))?;
        tracing::info!(queue = sqs_name, "created SQS queue");
        Ok(self.remember_queue_url(sqs_name, url))
    }

    /// Caches a resolved URL and clears the queue's "missing" mark.
    fn remember_queue_url(&self, sqs_name: &str, url: String) -> String {
        self.queue_urls
            .lock()
            .expect("queue url lock")
            .insert(sqs_name.to_owned(), url.clone());
        self.set_queue_missing(sqs_name, false);
        url
    }

    /// The queue's URL: cached, else GetQueueUrl, else (when allowed)
    /// CreateQueue. Failures are recorded in the status.
    async fn queue_url(&self, client: &Client, sqs_name: &str) -> Result<String, SqsFailure> {
        if let Some(url) = self.queue_urls.lock().expect("queue url lock").get(sqs_name) {
            return Ok(url.clone());
        }
        let failure = match self.get_queue_url(client, sqs_name).await {
            Ok(url) => return Ok(url),
            Err(failure) => failure,
        };
        if failure.class != SqsErrorClass::QueueMissing {
            self.call_failed(&failure);
            return Err(failure);
        }
        if !self.create_queues {
            self.report_missing_queue(sqs_name);
            return Err(failure);
        }
        match self.create_queue(client, sqs_name).await {
            Ok(url) => Ok(url),
            Err(create_failure) => {
                // Someone else may have created it meanwhile (a worker, with
                // other attributes, which makes CreateQueue refuse).
                if let Ok(url) = self.get_queue_url(client, sqs_name).await {
                    return Ok(url);
                }
                self.call_failed(&create_failure);
                Err(create_failure)
            }
        }
    }

    /// Encodes an entry as kombu would send it to `sqs_name`.
    fn prepare(&self, index: usize, entry: &PendingEntry, sqs_name: &str) -> Result<OutgoingMessage, PublishError> {
        let now = chrono::Utc::now();
        if PublishError::has_expired(&entry.task, now) {
            return Err(PublishError::Expired);
        }
        let message = celery::encode_at(&entry.task, &self.origin, now);
        let body = celery::sqs_message_body(
            &message,
            self.router.exchange(),
            &entry.task.routing_key,
            &delivery_tag(&entry.task.id, sqs_name),
        );
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(PublishError::too_large(body.len(), MAX_MESSAGE_BYTES));
        }
        let (group_id, deduplication_id) = if is_fifo(sqs_name) {
            (
                Some(message_group_id(&entry.task, &self.settings.fifo_message_group_id)?),
                Some(deduplication_id(&entry.task.id, sqs_name)),
            )
        } else {
            (None, None)
        };
        Ok(OutgoingMessage {
            index,
            body,
            group_id,
            deduplication_id,
        })
    }

    /// One `SendMessageBatch` call; per-entry results in `batch` order.
    async fn send_message_batch(
        &self,
        client: &Client,
        sqs_name: &str,
        queue_url: &str,
        batch: &[&OutgoingMessage],
    ) -> Result<Vec<PublishResult>, SqsFailure> {
        let entries = batch
            .iter()
            .enumerate()
            .map(|(position, message)| message.request_entry(position))
            .collect::<Result<Vec<_>, _>>()?;
        metrics::counter!(BATCH_CALLS_METRIC, "queue" => sqs_name.to_owned()).increment(1);
        let request = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send();
        let output = self.call("SendMessageBatch", request).await?;
        let mut results: Vec<Option<PublishResult>> = vec![None; batch.len()];
        let position_of = |id: &str| id.parse::<usize>().ok().filter(|position| *position < batch.len());
        for success in output.successful() {
            if let Some(position) = position_of(success.id()) {
                results[position] = Some(Ok(()));
            }
        }
        for failed in output.failed() {
            if let Some(position) = position_of(failed.id()) {
                let failure = SqsFailure::new(
                    super::error::classify_sqs_code(failed.code(), failed.sender_fault()),
                    format!(
                        "SendMessageBatch entry: {}: {}",
                        failed.code(),
                        failed.message().unwrap_or("")
                    ),
                );
                results[position] = Some(Err(failure.to_publish_error(sqs_name, self.create_queues)));
            }
        }
        Ok(results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(PublishError::Transient(
                        "SendMessageBatch did not report on the entry".into(),
                    ))
                })
            })
            .collect())
    }

    /// Sends one planned batch. When SQS refuses the whole call for its
    /// content, the entries are re-sent one by one so only the culprit is
    /// dead-lettered.
    async fn send_batch(
        &self,
        client: &Client,
        sqs_name: &str,
        queue_url: &str,
        batch: &[&OutgoingMessage],
    ) -> Vec<PublishResult> {
        let failure = match self.send_message_batch(client, sqs_name, queue_url, batch).await {
            Ok(results) => return results,
            Err(failure) => failure,
        };
        if failure.class == SqsErrorClass::QueueMissing {
            // Deleted since we resolved it: resolve (or create) it anew.
            self.forget_queue_url(sqs_name);
        }
        if failure.class == SqsErrorClass::QueueMissing && !self.create_queues {
            self.report_missing_queue(sqs_name);
        } else {
            self.call_failed(&failure);
        }
        if failure.class != SqsErrorClass::Rejected || batch.len() == 1 {
            tracing::debug!(queue = sqs_name, error = %failure.detail, "SendMessageBatch failed");
            let error = failure.to_publish_error(sqs_name, self.create_queues);
            return vec![Err(error); batch.len()];
        }
        tracing::warn!(queue = sqs_name, error = %failure.detail, "SQS refused a batch; sending its entries one by one");
        let mut results = Vec::with_capacity(batch.len());
        for message in batch {
            let result = match self.send_message_batch(client, sqs_name, queue_url, &[*message]).await {
                Ok(mut single) => single
                    .pop()
                    .unwrap_or_else(|| Err(PublishError::Transient("no result".into()))),
                Err(failure) => {
                    self.call_failed(&failure);
                    Err(failure.to_publish_error(sqs_name, self.create_queues))
                }
            };
            results.push(result);
        }
        results
    }

    async fn publish_window(&self, lane: &Lane, entries: &[PendingEntry]) -> Vec<PublishResult> {
        let Some(client) = self.client.get() else {
            let detail = self.status.borrow().last_error.clone();
            return entries
                .iter()
                .map(|_| Err(PublishError::not_connected(detail.as_deref())))
                .collect();
        };
        let mut results: Vec<Option<PublishResult>> = vec![None; entries.len()];
        let sqs_name = self.queue_name(lane.as_str());
        // Encoded first, a window at a time (about 1.3 KiB a task).
        let mut batches: Vec<Vec<OutgoingMessage>> = Vec::new();
        let mut batch_bytes = 0;
        for (index, entry) in entries.iter().enumerate() {
            if !entry.task.queues.iter().any(|queue| queue.as_str() == lane.as_str()) {
                // Lanes are queues only under SQS; this entry was accepted
                // with another broker's lanes (e.g. the AMQP exchange).
                results[index] = Some(Err(PublishError::Permanent(format!(
                    "outbox lane {lane:?} is not one of the task's queues ({}); \
                     was it accepted with another broker kind? Requeue it to route it again",
                    entry
                        .task
                        .queues
                        .iter()
                        .map(|q| q.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))));
                continue;
            }
            match self.prepare(index, entry, &sqs_name) {
                Ok(message) => {
                    let size = message.body.len();
                    match batches.last_mut() {
                        Some(batch) if batch_has_room(batch.len(), batch_bytes, size) => {
                            batch_bytes += size;
                            batch.push(message);
                        }
                        _ => {
                            batch_bytes = size;
                            batches.push(vec![message]);
                        }
                    }
                }
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        if batches.is_empty() {
            return finish(results);
        }
        let queue_url = match self.queue_url(client, &sqs_name).await {
            Ok(url) => url,
            Err(failure) => {
                let error = failure.to_publish_error(&sqs_name, self.create_queues);
                for message in batches.iter().flatten() {
                    results[message.index] = Some(Err(error.clone()));
                }
                return finish(results);
            }
        };
        // Several batches in flight on a standard queue, so a backlog
        // drains at the API's pace rather than one round trip at a time;
        // one at a time on a FIFO queue, whose order is the order SQS
        // receives the calls in. After a retryable failure nothing more is
        // sent (the relay completes nothing behind the first failure).
        let in_flight = if is_fifo(&sqs_name) { 1 } else { BATCHES_IN_FLIGHT };
        let halted: Mutex<Option<PublishError>> = Mutex::new(None);
        let sent: Vec<(Vec<OutgoingMessage>, Vec<PublishResult>)> = futures_util::stream::iter(batches)
            .map(|batch| {
                let (halted, sqs_name, queue_url) = (&halted, &sqs_name, &queue_url);
                async move {
                    if let Some(error) = halted.lock().expect("halted lock").clone() {
                        let results = vec![Err(error); batch.len()];
                        return (batch, results);
                    }
                    let messages: Vec<&OutgoingMessage> = batch.iter().collect();
                    let results = self.send_batch(client, sqs_name, queue_url, &messages).await;
                    if let Some(error) = results.iter().find_map(|result| result.as_ref().err()) {
                        if error.is_retryable() {
                            // What follows in this queue is not sent (order),
                            // so it is not an attempt on those tasks.
                            halted.lock().expect("halted lock").get_or_insert_with(|| {
                                PublishError::Unsent(format!(
                                    "held back to keep queue order after an earlier failure: {error}"
                                ))
                            });
                        }
                    }
                    (batch, results)
                }
            })
            .buffered(in_flight)
            .collect()
            .await;
        for (batch, batch_results) in sent {
            for (message, result) in batch.iter().zip(batch_results) {
                results[message.index] = Some(result);
            }
        }
        finish(results)
    }
}

/// Every entry's result; one never reached is a transient failure.
fn finish(results: Vec<Option<PublishResult>>) -> Vec<PublishResult> {
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| Err(PublishError::Transient("not published".into()))))
        .collect()
}

impl Publisher for SqsPublisher {
    fn lanes_for(&self, task: &Task) -> Vec<Lane> {
        // One copy per routed queue, each with its own FIFO order.
        task.queues.iter().map(|queue| Lane::new(queue.as_str())).collect()
    }

    fn publish<'a>(&'a self, lane: &'a Lane, entries: &'a [PendingEntry]) -> BoxFuture<'a, Vec<PublishResult>> {
        Box::pin(self.publish_window(lane, entries))
    }

    /// A message over [`MAX_MESSAGE_BYTES`] as [`SqsPublisher::prepare`]
    /// would encode it for any of the task's queues (kombu's envelope holds
    /// the body base64-encoded and is base64-encoded itself: 16/9 of it).
    fn undeliverable(&self, task: &Task) -> Option<String> {
        let message = celery::encode_at(task, &self.origin, chrono::Utc::now());
        task.queues.iter().find_map(|queue| {
            let sqs_name = self.queue_name(queue.as_str());
            let body = celery::sqs_message_body(
                &message,
                self.router.exchange(),
                &task.routing_key,
                &delivery_tag(&task.id, &sqs_name),
            );
            (body.len() > MAX_MESSAGE_BYTES).then(|| {
                format!(
                    "the task's SQS message for queue {sqs_name} would be {} bytes, over SQS's limit of \
                     {MAX_MESSAGE_BYTES} bytes (kombu base64-encodes the body and its envelope); send less data with the task",
                    body.len()
                )
            })
        })
    }

    fn status(&self) -> watch::Receiver<BrokerStatus> {
        self.status.subscribe()
    }

    fn reconnect_now(&self) {
        self.reconnect_now.notify_one();
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // SQS is plain HTTPS: no session to close; stop the manager.
            self.stop.cancel();
            self.set_status(false, Some("shut down".into()));
        })
    }
}

/// Where the publisher sends, for health and logs.
/// Loads the AWS configuration (credentials chain, region chain) and
/// builds a client with taskgate's timeouts and retry policy: the SDK's
/// connect timeout from `broker.connect_timeout_ms`, `attempt_timeout` per
/// attempt and twice that per operation, and one SDK retry at most (the
/// relay and the tracking consumer do the real retrying). The publisher
/// and the tracking consumer both build theirs here.
pub async fn client(settings: &BrokerSettings, attempt_timeout: Duration) -> Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .operation_attempt_timeout(attempt_timeout)
        .operation_timeout(attempt_timeout * 2)
        .build();
    let retries = RetryConfig::standard()
        .with_max_attempts(2)
        .with_initial_backoff(settings.reconnect_policy().first());
    let region = RegionProviderChain::first_try(settings.region.clone().map(Region::new))
        .or_default_provider()
        .or_else(Region::from_static(DEFAULT_REGION));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .timeout_config(timeouts)
        .retry_config(retries);
    if let Some(endpoint_url) = &settings.endpoint_url {
        loader = loader.endpoint_url(endpoint_url);
    }
    Client::new(&loader.load().await)
}

fn endpoint_description(settings: &BrokerSettings) -> String {
    match (&settings.endpoint_url, &settings.region) {
        (Some(url), _) => mask_url_password(url),
        (None, Some(region)) => format!("https://sqs.{region}.amazonaws.com"),
        (None, None) => "SQS (region from the AWS configuration)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine;
    use serde_json::{json, Value};

    fn task(queues: &[&str], properties: Value) -> Task {
        let mut task = Task::for_test(
            TaskId::parse("4ba38ac2-870f-47c4-b7aa-d6c87c715358").unwrap(),
            "rawq.echo",
            vec![],
            json!({"text": "héllo ✓"}).as_object().unwrap().clone(),
            "rawq",
            queues,
        );
        task.properties = properties.as_object().cloned().unwrap_or_default();
        task
    }

    /// Intake encodes a task as SQS would only for requests of at least
    /// `UNDELIVERABLE_CHECK_BYTES`: a smaller request must never make a
    /// message over the limit, even of the characters that grow most
    /// (4-byte ones, written as 12-byte surrogate pairs, then base64 twice).
    #[test]
    fn no_request_below_the_intake_check_makes_a_message_over_the_limit() {
        let limit = crate::http::tasks::UNDELIVERABLE_CHECK_BYTES;
        let half: String = std::iter::repeat_n('😀', (limit - 64) / 2 / '😀'.len_utf8()).collect();
        let request = json!({"task": "rawq.echo", "args": [half.clone()], "kwargs": {"text": half.clone()}});
        let request_bytes = serde_json::to_vec(&request).unwrap().len();
        assert!(
            request_bytes < limit && request_bytes > limit - 100,
            "the worst case fills the budget: {request_bytes}"
        );
        let mut worst = task(&["rawq"], json!({}));
        worst.args = vec![Value::String(half.clone())];
        worst.kwargs = json!({ "text": half }).as_object().unwrap().clone();
        let message = celery::encode_at(&worst, "gen1@host", chrono::Utc::now());
        let body = celery::sqs_message_body(&message, "celery", "rawq", "tag");
        assert!(
            body.len() < MAX_MESSAGE_BYTES,
            "{} bytes of SQS message from a request of {request_bytes} bytes",
            body.len(),
        );
    }

    #[test]
    fn queue_names_follow_kombu_entity_name() {
        assert_eq!(sqs_queue_name("", "celery"), "celery");
        assert_eq!(sqs_queue_name("dev-", "export"), "dev-export");
        assert_eq!(sqs_queue_name("dev-", "export.project"), "dev-export-project");
        assert_eq!(sqs_queue_name("dev-", "platform.fifo"), "dev-platform.fifo");
        assert_eq!(sqs_queue_name("dev-", "a.b.fifo"), "dev-a-b.fifo");
        // The prefix is translated too, as kombu does with prefix + name.
        assert_eq!(sqs_queue_name("dev.", "x:y"), "dev-x_y");
        assert_eq!(sqs_queue_name("p_", "under_score-dash"), "p_under_score-dash");
        assert!(is_fifo("dev-platform.fifo"));
        assert!(!is_fifo("dev-platform-fifo"));
    }

    #[test]
    fn queue_names_are_checked_against_sqs_rules() {
        assert!(validate_sqs_queue_name("dev-platform.fifo").is_ok());
        assert!(validate_sqs_queue_name("dev_export-1").is_ok());
        assert!(validate_sqs_queue_name(".fifo").is_err());
        assert!(validate_sqs_queue_name(&"q".repeat(81)).is_err());
        assert!(validate_sqs_queue_name(&"q".repeat(80)).is_ok());
        assert!(validate_sqs_queue_name("has space").is_err());
        assert!(validate_sqs_queue_name("ünïcode").is_err());
    }

    /// Packs messages of the given sizes in order, as `publish_window`
    /// does, and returns the batches as index ranges.
    fn plan_batches(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
        let mut batches = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (index, &size) in sizes.iter().enumerate() {
            if !batch_has_room(index - start, bytes, size) {
                batches.push(start..index);
                (start, bytes) = (index, 0);
            }
            bytes += size;
        }
        if start < sizes.len() {
            batches.push(start..sizes.len());
        }
        batches
    }

    #[test]
    fn batches_hold_at_most_ten_entries_and_one_mebibyte() {
        let small = vec![100; 1000];
        let batches = plan_batches(&small);
        assert_eq!(batches.len(), 100);
        assert!(batches.iter().all(|b| b.len() == 10));
        assert!(plan_batches(&[]).is_empty());
        assert_eq!(plan_batches(&[5; 11]), vec![0..10, 10..11]);
        // Bytes split before the count does.
        let half = MAX_BATCH_BYTES / 2;
        assert_eq!(plan_batches(&[half, half, 1, 10]), vec![0..2, 2..4]);
        assert_eq!(plan_batches(&[half + 1, half]), vec![0..1, 1..2]);
        assert_eq!(
            plan_batches(&[MAX_MESSAGE_BYTES, 1, MAX_MESSAGE_BYTES]),
            vec![0..1, 1..2, 2..3]
        );
        // Order and coverage are preserved.
        let sizes: Vec<usize> = (0..57).map(|i| (i * 7919) % 400_000).collect();
        let flat: Vec<usize> = plan_batches(&sizes).into_iter().flatten().collect();
        assert_eq!(flat, (0..57).collect::<Vec<_>>());
        for batch in plan_batches(&sizes) {
            assert!(batch.len() <= MAX_BATCH_ENTRIES);
            assert!(sizes[batch].iter().sum::<usize>() <= MAX_BATCH_BYTES);
        }
    }

    #[test]
    fn fifo_ids_are_stable_and_per_queue() {
        let id = TaskId::parse("4ba38ac2-870f-47c4-b7aa-d6c87c715358").unwrap();
        let dedup = deduplication_id(&id, "tg-platform.fifo");
        assert_eq!(dedup, "4ba38ac2-870f-47c4-b7aa-d6c87c715358:tg-platform.fifo");
        assert!(is_valid_message_id(&dedup));
        assert_ne!(dedup, deduplication_id(&id, "tg-other.fifo"));
        assert_eq!(deduplication_id(&id, &"q".repeat(120)).len(), MAX_MESSAGE_ID_CHARS);
        assert_eq!(delivery_tag(&id, "a"), delivery_tag(&id, "a"));
        assert_ne!(delivery_tag(&id, "a"), delivery_tag(&id, "b"));
        assert!(uuid::Uuid::parse_str(&delivery_tag(&id, "a")).is_ok());
    }

    #[test]
    fn message_group_comes_from_the_request_or_the_default() {
        assert_eq!(
            message_group_id(&task(&["q"], json!({})), "taskgate").unwrap(),
            "taskgate"
        );
        let grouped = task(&["q"], json!({"message_group_id": "org-7"}));
        assert_eq!(message_group_id(&grouped, "taskgate").unwrap(), "org-7");
        let numeric = task(&["q"], json!({"message_group_id": 42}));
        assert_eq!(message_group_id(&numeric, "taskgate").unwrap(), "42");
        let invalid = task(&["q"], json!({"message_group_id": "has space"}));
        assert!(!message_group_id(&invalid, "taskgate").unwrap_err().is_retryable());
        let object = task(&["q"], json!({"message_group_id": {"a": 1}}));
        assert!(!message_group_id(&object, "taskgate").unwrap_err().is_retryable());
    }

    fn publisher(prefix: &str) -> SqsPublisher {
        let settings = BrokerSettings {
            queue_name_prefix: Some(prefix.into()),
            ..BrokerSettings::default()
        };
        let (status, _) = watch::channel(BrokerStatus::disconnected("test".into(), None));
        SqsPublisher {
            prefix: prefix.into(),
            settings,
            create_queues: true,
            router: TopicRouter::default(),
            origin: "gen1@test".into(),
            client: OnceLock::new(),
            queue_urls: Mutex::new(HashMap::new()),
            connection: Mutex::new(ConnectionState::default()),
            status,
            connection_lost: Notify::new(),
            reconnect_now: Notify::new(),
            stop: CancellationToken::new(),
        }
    }

    fn entry(task: Task, lane: &str) -> PendingEntry {
        PendingEntry {
            lane: Lane::new(lane),
            sequence: 1,
            encoded_len: 100,
            task,
        }
    }

    #[test]
    fn every_routed_queue_is_its_own_lane() {
        let lanes = publisher("tg-").lanes_for(&task(&["export", "platform.fifo"], json!({})));
        assert_eq!(lanes, vec![Lane::new("export"), Lane::new("platform.fifo")]);
    }

    #[test]
    fn messages_carry_kombus_envelope_and_fifo_fields() {
        // From tests/support/fixtures/celery-5.7-sqs-messages.json (kombu 5.7.0),
        // the same task as `task()` builds.
        let reference = json!({
            "body": "W1tdLCB7InRleHQiOiAiaFx1MDBlOWxsbyBcdTI3MTMifSwgeyJjYWxsYmFja3MiOiBudWxsLCAiZXJyYmFja3MiOiBudWxsLCAiY2hhaW4iOiBudWxsLCAiY2hvcmQiOiBudWxsfV0=",
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "correlation_id": "4ba38ac2-870f-47c4-b7aa-d6c87c715358",
                "reply_to": "2d864225-14fc-3e14-b9ac-f0c69e98c15c",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "task_exchange", "routing_key": "rawq"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": "4c7acfcd-d208-49bb-9fa1-31848c6b18cf"
            }
        });
        let reference_body =
            json!([[], {"text": "héllo ✓"}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
        let publisher = publisher("tg-");
        let sqs_name = publisher.queue_name("platform.fifo");
        let message = publisher
            .prepare(
                3,
                &entry(task(&["platform.fifo"], json!({})), "platform.fifo"),
                &sqs_name,
            )
            .unwrap();
        assert_eq!(message.index, 3);
        assert_eq!(message.group_id.as_deref(), Some("taskgate"));
        assert_eq!(
            message.deduplication_id.as_deref(),
            Some("4ba38ac2-870f-47c4-b7aa-d6c87c715358:tg-platform.fifo")
        );
        let envelope: Value =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(&message.body).unwrap()).unwrap();
        let keys = |value: &Value| value.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&envelope), keys(&reference));
        assert_eq!(keys(&envelope["properties"]), keys(&reference["properties"]));
        assert_eq!(envelope["content-type"], reference["content-type"]);
        assert_eq!(envelope["headers"]["id"], "4ba38ac2-870f-47c4-b7aa-d6c87c715358");
        assert_eq!(
            envelope["properties"]["delivery_info"],
            json!({"exchange": "task_exchange", "routing_key": "rawq"})
        );
        assert_eq!(envelope["properties"]["body_encoding"], "base64");
        let body = base64::engine::general_purpose::STANDARD
            .decode(envelope["body"].as_str().unwrap())
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, reference_body);
        // A standard queue gets neither FIFO field.
        let standard = publisher
            .prepare(
                0,
                &entry(task(&["export"], json!({})), "export"),
                &publisher.queue_name("export"),
            )
            .unwrap();
        assert!(standard.group_id.is_none() && standard.deduplication_id.is_none());
    }

    #[test]
    fn a_message_over_one_mebibyte_is_permanent_without_sending() {
        let mut big = task(&["export"], json!({}));
        big.args = vec![json!("x".repeat(800_000))];
        let publisher = publisher("tg-");
        let error = publisher
            .prepare(0, &entry(big, "export"), &publisher.queue_name("export"))
            .err()
            .unwrap();
        assert!(!error.is_retryable(), "{error}");
        assert!(error.to_string().contains("1048576"), "{error}");
    }

    #[tokio::test]
    async fn publishing_before_the_client_exists_is_transient() {
        let publisher = publisher("tg-");
        let entries = vec![entry(task(&["export"], json!({})), "export")];
        let results = publisher.publish(&Lane::new("export"), &entries).await;
        assert!(results[0].as_ref().unwrap_err().is_retryable());
    }

    #[tokio::test]
    async fn an_entry_from_another_brokers_lane_is_dead_lettered() {
        let publisher = publisher("tg-");
        let _ = publisher.client.set(Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::from_static("us-east-1"))
                .build(),
        ));
        let entries = vec![entry(task(&["export"], json!({})), "task_exchange")];
        let results = publisher.publish(&Lane::new("task_exchange"), &entries).await;
        assert!(!results[0].as_ref().unwrap_err().is_retryable());
    }

    #[test]
    fn status_reports_missing_queues_until_they_exist() {
        let publisher = publisher("tg-");
        publisher.call_succeeded();
        assert!(publisher.status.borrow().connected);
        publisher.set_queue_missing("tg-export", true);
        let status = publisher.status.borrow().clone();
        assert!(!status.connected);
        assert!(status.last_error.unwrap().contains("tg-export"));
        publisher.call_succeeded();
        assert!(!publisher.status.borrow().connected);
        publisher.set_queue_missing("tg-export", false);
        assert!(publisher.status.borrow().connected);
        publisher.call_failed(&SqsFailure::new(SqsErrorClass::Unavailable, "refused"));
        assert_eq!(publisher.status.borrow().last_error.as_deref(), Some("refused"));
        // A refused message says SQS is there: the status stays as it was.
        publisher.call_succeeded();
        publisher.call_failed(&SqsFailure::new(SqsErrorClass::Rejected, "bad message"));
        assert!(publisher.status.borrow().connected);
    }
}
