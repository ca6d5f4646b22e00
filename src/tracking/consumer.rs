//! The tracking-queue consumer (what the platform's `sync_tasks` daemon
//! did): reads `tracking.sync_queue`, a queue bound `#` that receives a copy
//! of every task published to the exchange (tasks workers scheduled
//! themselves included), and upserts a `background_tasks` row for each.
//!
//! On AMQP it consumes with manual acknowledgements and a prefetch window
//! (`consumer_batch_size * consumer_concurrency`); on SQS it long-polls
//! with `consumer_concurrency` receivers and a short visibility timeout
//! (`consumer_visibility_timeout_seconds`).
//!
//! Invariants:
//! - **Acknowledged only after the row is committed** (AMQP `basic.ack`,
//!   SQS `DeleteMessageBatch`). While the database is away a batch is
//!   retried with backoff and its messages stay unacknowledged; at
//!   shutdown or on a lost connection they go back to the queue (AMQP
//!   requeues unacknowledged deliveries; SQS makes them visible again).
//! - **Refused messages do not loop.** A message that is not a Celery
//!   protocol v2 JSON task (a pickle above all: decoding it would mean
//!   running Python) is logged with the reason and acknowledged at once.
//! - **Concurrent, bounded batches.** At most `consumer_concurrency`
//!   batches of at most `consumer_batch_size` messages are being written
//!   at a time; the broker holds the rest (prefetch / visibility), so
//!   memory stays bounded whatever the backlog.
//! - Starts consuming only once the schema is ready, and never blocks
//!   start-up: connecting happens here, in the background, with timeouts
//!   and jittered backoff.

use super::record::{RecordSource, TaskRecord};
use super::Shared;
use crate::broker::sqs::sqs_queue_name;
use crate::celery::decode::{decode_task_message, DecodeError};
use crate::celery::sqs::decode_sqs_message_body;
use crate::config::{mask_url_password, BrokerKind, BrokerSettings};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How often the queue's backlog (the consumer's lag) is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// SQS long-poll wait per receive; short enough for a prompt shutdown.
const SQS_WAIT_SECONDS: i32 = 5;

pub(crate) fn spawn(shared: Arc<Shared>, broker: BrokerSettings, queue: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        if !shared.wait_for_schema().await {
            return;
        }
        match broker.kind {
            BrokerKind::Amqp => run_amqp(shared, broker, queue).await,
            BrokerKind::Sqs => run_sqs(shared, broker, queue).await,
        }
    })
}

/// Writes a batch, retrying with backoff until it is committed. Returns
/// false when `abandon` fires first (stop, or the AMQP connection the
/// messages came on is gone): nothing may then be acknowledged, and the
/// broker hands the messages out again.
async fn write_batch(shared: &Shared, records: &[TaskRecord], abandon: &CancellationToken) -> bool {
    if records.is_empty() {
        return true;
    }
    let mut backoff = shared.backoff();
    loop {
        let outcome = shared.store.upsert(records, RecordSource::TrackingQueue).await;
        shared.observe(&outcome);
        match outcome {
            Ok(written) => {
                metrics::counter!("taskgate_tracking_rows_written_total", "source" => RecordSource::TrackingQueue.as_str())
                    .increment(written.written as u64);
                return true;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::debug!(%error, rows = records.len(), ?delay, "tracking-queue batch not written; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = abandon.cancelled() => return false,
                }
            }
        }
    }
}

fn refused(queue: &str, message_id: &str, error: &DecodeError) {
    tracing::warn!(queue, message_id, reason = %error, "tracking-queue message refused and acknowledged (not a Celery protocol v2 JSON task)");
    metrics::counter!("taskgate_tracking_messages_refused_total").increment(1);
}

fn set_waiting(shared: &Shared, waiting: u64) {
    metrics::gauge!("taskgate_tracking_sync_queue_waiting").set(waiting as f64);
    shared.set_consumer(|status| status.waiting = Some(waiting));
}

fn set_connected(shared: &Shared, connected: bool, error: Option<String>) {
    metrics::gauge!("taskgate_tracking_consumer_connected").set(if connected { 1.0 } else { 0.0 });
    shared.set_consumer(|status| {
        status.connected = connected;
        status.last_error = error;
    });
}

// ---------------------------------------------------------------- AMQP

async fn run_amqp(shared: Arc<Shared>, broker: BrokerSettings, queue: String) {
    let mut backoff = shared.backoff();
    let connect_timeout = Duration::from_millis(broker.connect_timeout_ms);
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let connection = tokio::select! {
            connected = tokio::time::timeout(connect_timeout, connect_amqp(&broker, &queue, &shared)) => connected,
            _ = shared.stop.cancelled() => return,
        };
        let failure = match connection {
            Ok(Ok((connection, consumer))) => {
                backoff.reset();
                set_connected(&shared, true, None);
                tracing::info!(queue, endpoint = %mask_url_password(&broker.url), "consuming the tracking queue");
                let reason = consume_amqp(&shared, &connection, consumer, &queue).await;
                let _ = tokio::time::timeout(
                    connect_timeout,
                    connection.close(200, "taskgate tracking consumer".into()),
                )
                .await;
                match reason {
                    None => return,
                    Some(reason) => reason,
                }
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("connecting timed out after {} ms", connect_timeout.as_millis()),
        };
        tracing::warn!(queue, reason = %failure, "tracking-queue consumer disconnected; reconnecting");
        set_connected(&shared, false, Some(failure));
        let delay = backoff.next_delay();
        if !shared.pause(delay).await {
            return;
        }
    }
}

async fn connect_amqp(
    broker: &BrokerSettings,
    queue: &str,
    shared: &Shared,
) -> Result<(Connection, lapin::Consumer), crate::broker::amqp::ConnectError> {
    let connection = crate::broker::amqp::open_connection(broker, "taskgate-tracking").await?;
    let channel = connection.create_channel().await?;
    let window = shared.settings.consumer_batch_size * shared.settings.consumer_concurrency;
    channel
        .basic_qos(window.min(u16::MAX as usize) as u16, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "taskgate-tracking".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, consumer))
}

/// Consumes until stopped (`None`) or the connection fails (`Some(reason)`).
async fn consume_amqp(
    shared: &Arc<Shared>,
    connection: &Connection,
    mut consumer: lapin::Consumer,
    queue: &str,
) -> Option<String> {
    let lag = tokio::spawn(poll_amqp_lag(
        shared.clone(),
        connection.create_channel().await.ok(),
        queue.to_owned(),
    ));
    let permits = Arc::new(Semaphore::new(shared.settings.consumer_concurrency));
    // Batches of this connection stop retrying when it ends: their acks
    // could no longer reach the broker, which redelivers the messages.
    let connection_gone = shared.stop.child_token();
    let mut in_flight = JoinSet::new();
    let batch_size = shared.settings.consumer_batch_size;
    let batch_wait = Duration::from_millis(shared.settings.consumer_batch_wait_ms);
    let outcome = loop {
        // Backpressure: a new batch is gathered only when a writer is free.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = shared.stop.cancelled() => break None,
        };
        let first = tokio::select! {
            delivery = consumer.next() => delivery,
            _ = shared.stop.cancelled() => break None,
        };
        let mut batch = match first {
            Some(Ok(delivery)) => vec![delivery],
            Some(Err(error)) => break Some(format!("consumer error: {error}")),
            None => break Some("the broker closed the consumer".to_owned()),
        };
        let deadline = tokio::time::Instant::now() + batch_wait;
        let mut ended: Option<String> = None;
        while batch.len() < batch_size {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(delivery))) => batch.push(delivery),
                Ok(Some(Err(error))) => {
                    ended = Some(format!("consumer error: {error}"));
                    break;
                }
                Ok(None) => {
                    ended = Some("the broker closed the consumer".to_owned());
                    break;
                }
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        let queue_name = queue.to_owned();
        let abandon = connection_gone.clone();
        in_flight.spawn(async move {
            process_amqp_batch(&shared, &queue_name, batch, &abandon).await;
            drop(permit);
        });
        // Reap finished batches so the set does not grow.
        while in_flight.try_join_next().is_some() {}
        if let Some(reason) = ended {
            break Some(reason);
        }
    };
    // A lost connection abandons the batches in flight; on stop they give
    // up too. Anything not acknowledged is requeued by the broker.
    if outcome.is_some() {
        connection_gone.cancel();
    }
    while in_flight.join_next().await.is_some() {}
    lag.abort();
    outcome
}

async fn process_amqp_batch(
    shared: &Shared,
    queue: &str,
    batch: Vec<lapin::message::Delivery>,
    abandon: &CancellationToken,
) {
    let observed_at = Utc::now();
    let mut records = Vec::with_capacity(batch.len());
    let mut accepted = Vec::with_capacity(batch.len());
    for delivery in batch {
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(field_table_to_json)
            .unwrap_or_default();
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default();
        let content_encoding = delivery
            .properties
            .content_encoding()
            .as_ref()
            .map(|value| value.as_str().to_owned());
        match decode_task_message(&headers, &delivery.data, &content_type, content_encoding.as_deref()) {
            Ok(task) => {
                records.push(TaskRecord::from_message(
                    &task,
                    &headers,
                    &Map::new(),
                    Some(delivery.routing_key.as_str()),
                    *delivery.properties.priority(),
                    observed_at,
                ));
                accepted.push(delivery);
            }
            Err(error) => {
                let message_id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_else(|| format!("delivery {}", delivery.delivery_tag));
                refused(queue, &message_id, &error);
                if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::debug!(%error, "acknowledging a refused message failed; it comes back and is refused again");
                }
            }
        }
    }
    if !write_batch(shared, &records, abandon).await {
        return;
    }
    for delivery in accepted {
        if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
            // The row is written: a redelivery only upserts it again.
            tracing::debug!(%error, "acknowledging a recorded message failed");
        }
    }
    metrics::counter!("taskgate_tracking_messages_recorded_total").increment(records.len() as u64);
}

/// Measures the queue's backlog with a passive declare on its own channel
/// (a missing queue closes only that channel).
async fn poll_amqp_lag(shared: Arc<Shared>, channel: Option<lapin::Channel>, queue: String) {
    let Some(channel) = channel else { return };
    loop {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(declared) => set_waiting(&shared, u64::from(declared.message_count())),
            Err(_) => return,
        }
        if !shared.pause(LAG_INTERVAL).await {
            return;
        }
    }
}

fn field_table_to_json(table: &FieldTable) -> Map<String, Value> {
    field_table_at(table, 0)
}

/// Deeper header values than this become a string saying so: Celery's
/// headers nest two levels, and a hostile message must not exhaust the
/// stack of the thread converting it.
const MAX_HEADER_DEPTH: usize = 32;

fn field_table_at(table: &FieldTable, depth: usize) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), amqp_to_json(value, depth + 1)))
        .collect()
}

/// AMQP field values as JSON, the way py-amqp decodes them for Celery.
fn amqp_to_json(value: &AMQPValue, depth: usize) -> Value {
    if depth > MAX_HEADER_DEPTH && matches!(value, AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_)) {
        return Value::String(format!("<nested deeper than {MAX_HEADER_DEPTH} levels>"));
    }
    match value {
        AMQPValue::Boolean(flag) => Value::Bool(*flag),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(n) => serde_json::Number::from_f64(f64::from(*n)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(n) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
        AMQPValue::ShortString(text) => Value::String(text.as_str().to_owned()),
        AMQPValue::LongString(text) => Value::String(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::FieldArray(items) => Value::Array(
            items
                .as_slice()
                .iter()
                .map(|item| amqp_to_json(item, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(table) => Value::Object(field_table_at(table, depth)),
        AMQPValue::Timestamp(seconds) => (*seconds).into(),
        AMQPValue::Void => Value::Null,
        other => Value::String(format!("{other:?}")),
    }
}

// ----------------------------------------------------------------- SQS

/// The tracking consumer's client: the publisher's set-up, with room in
/// each attempt for a long poll.
async fn sqs_client(broker: &BrokerSettings) -> aws_sdk_sqs::Client {
    let attempt = Duration::from_millis(broker.publish_timeout_ms) + Duration::from_secs(SQS_WAIT_SECONDS as u64);
    crate::broker::sqs::client(broker, attempt).await
}

fn sqs_error(operation: &str, error: impl std::error::Error) -> String {
    format!("{operation}: {}", aws_sdk_sqs::error::DisplayErrorContext(error))
}

async fn run_sqs(shared: Arc<Shared>, broker: BrokerSettings, queue: String) {
    let client = tokio::select! {
        client = sqs_client(&broker) => client,
        _ = shared.stop.cancelled() => return,
    };
    let sqs_name = sqs_queue_name(broker.queue_name_prefix.as_deref().unwrap_or(""), &queue);
    let call_limit = Duration::from_millis(broker.publish_timeout_ms * 2 + broker.connect_timeout_ms)
        + Duration::from_secs(SQS_WAIT_SECONDS as u64);
    let mut backoff = shared.backoff();
    let queue_url = loop {
        let lookup = tokio::time::timeout(call_limit, client.get_queue_url().queue_name(&sqs_name).send());
        let outcome = tokio::select! {
            outcome = lookup => outcome,
            _ = shared.stop.cancelled() => return,
        };
        let failure = match outcome {
            Ok(Ok(output)) => match output.queue_url {
                Some(url) => break url,
                None => "GetQueueUrl answered without a QueueUrl".to_owned(),
            },
            Ok(Err(error)) => sqs_error("GetQueueUrl", error),
            Err(_) => format!("GetQueueUrl timed out after {} ms", call_limit.as_millis()),
        };
        tracing::debug!(queue = %sqs_name, %failure, "tracking queue not reachable");
        set_connected(&shared, false, Some(failure));
        let delay = backoff.next_delay();
        if !shared.pause(delay).await {
            return;
        }
    };
    set_connected(&shared, true, None);
    tracing::info!(queue = %sqs_name, "consuming the tracking queue");
    let lag = tokio::spawn(poll_sqs_lag(
        shared.clone(),
        client.clone(),
        queue_url.clone(),
        call_limit,
    ));
    let mut receivers = JoinSet::new();
    for _ in 0..shared.settings.consumer_concurrency {
        receivers.spawn(receive_sqs(
            shared.clone(),
            client.clone(),
            queue_url.clone(),
            sqs_name.clone(),
            call_limit,
        ));
    }
    while receivers.join_next().await.is_some() {}
    lag.abort();
}

async fn receive_sqs(
    shared: Arc<Shared>,
    client: aws_sdk_sqs::Client,
    queue_url: String,
    sqs_name: String,
    call_limit: Duration,
) {
    let mut backoff = shared.backoff();
    let per_receive = shared.settings.consumer_batch_size.clamp(1, 10) as i32;
    let visibility = shared.settings.consumer_visibility_timeout_seconds as i32;
    loop {
        let receive = client
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(per_receive)
            .wait_time_seconds(SQS_WAIT_SECONDS)
            .visibility_timeout(visibility)
            .send();
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(call_limit, receive) => outcome,
            _ = shared.stop.cancelled() => return,
        };
        let messages = match outcome {
            Ok(Ok(output)) => {
                backoff.reset();
                set_connected(&shared, true, None);
                output.messages.unwrap_or_default()
            }
            failed => {
                let failure = match failed {
                    Ok(Err(error)) => sqs_error("ReceiveMessage", error),
                    _ => format!("ReceiveMessage timed out after {} ms", call_limit.as_millis()),
                };
                tracing::debug!(queue = %sqs_name, %failure, "tracking-queue receive failed");
                set_connected(&shared, false, Some(failure));
                let delay = backoff.next_delay();
                if !shared.pause(delay).await {
                    return;
                }
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let observed_at = Utc::now();
        let mut records = Vec::with_capacity(messages.len());
        let mut recorded_handles = Vec::with_capacity(messages.len());
        let mut refused_handles = Vec::new();
        for message in &messages {
            let Some(handle) = message.receipt_handle() else {
                continue;
            };
            let message_id = message.message_id().unwrap_or("?");
            match decode_sqs_message_body(message.body().unwrap_or("")) {
                Ok(decoded) => {
                    let delivery_info = decoded.properties.get("delivery_info");
                    let routing_key = delivery_info
                        .and_then(|info| info.get("routing_key"))
                        .and_then(Value::as_str);
                    let priority = decoded
                        .properties
                        .get("priority")
                        .and_then(Value::as_u64)
                        .and_then(|priority| u8::try_from(priority).ok());
                    records.push(TaskRecord::from_message(
                        &decoded.task,
                        &decoded.headers,
                        &decoded.properties,
                        routing_key,
                        priority,
                        observed_at,
                    ));
                    recorded_handles.push(handle.to_owned());
                }
                Err(error) => {
                    refused(&sqs_name, message_id, &error);
                    refused_handles.push(handle.to_owned());
                }
            }
        }
        delete_sqs(&client, &queue_url, refused_handles, call_limit).await;
        if !write_batch(&shared, &records, &shared.stop).await {
            // Stopped: the messages become visible again after the timeout.
            return;
        }
        metrics::counter!("taskgate_tracking_messages_recorded_total").increment(records.len() as u64);
        delete_sqs(&client, &queue_url, recorded_handles, call_limit).await;
    }
}

/// Deletes handled messages; a failure only means they come back and are
/// upserted (or refused) again.
async fn delete_sqs(client: &aws_sdk_sqs::Client, queue_url: &str, handles: Vec<String>, call_limit: Duration) {
    for chunk in handles.chunks(10) {
        let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
            .iter()
            .enumerate()
            .filter_map(|(index, handle)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(index.to_string())
                    .receipt_handle(handle)
                    .build()
                    .ok()
            })
            .collect();
        let request = client
            .delete_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send();
        match tokio::time::timeout(call_limit, request).await {
            Ok(Ok(output)) if output.failed().is_empty() => {}
            Ok(Ok(output)) => {
                tracing::debug!(
                    failed = output.failed().len(),
                    "some tracking-queue messages were not deleted"
                )
            }
            Ok(Err(error)) => tracing::debug!(error = %sqs_error("DeleteMessageBatch", error), "delete failed"),
            Err(_) => tracing::debug!("DeleteMessageBatch timed out"),
        }
    }
}

async fn poll_sqs_lag(shared: Arc<Shared>, client: aws_sdk_sqs::Client, queue_url: String, call_limit: Duration) {
    loop {
        let request = client
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send();
        if let Ok(Ok(output)) = tokio::time::timeout(call_limit, request).await {
            if let Some(waiting) = output
                .attributes()
                .and_then(|attributes| attributes.get(&QueueAttributeName::ApproximateNumberOfMessages))
                .and_then(|value| value.parse::<u64>().ok())
            {
                set_waiting(&shared, waiting);
            }
        }
        if !shared.pause(LAG_INTERVAL).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    #[test]
    fn amqp_headers_read_back_as_celery_sees_them() {
        let mut table = FieldTable::default();
        table.insert("id".into(), AMQPValue::LongString(LongString::from("abc")));
        table.insert("retries".into(), AMQPValue::LongLongInt(2));
        table.insert(
            "timelimit".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Double(1.5)])),
        );
        let json = field_table_to_json(&table);
        assert_eq!(json["id"], "abc");
        assert_eq!(json["retries"], 2);
        assert_eq!(json["timelimit"], serde_json::json!([null, 1.5]));
    }
}
#[cfg(test)]
mod consumer_proptests;
