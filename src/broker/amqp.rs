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
//! Publishing sends a whole window with `mandatory` and persistent delivery
//! before waiting for any confirm, then collects the confirms in order
//! against one deadline. An entry is `Ok` only on `basic.ack` without a
//! return; a returned message is permanent (dead-lettered by the relay).

use super::{BrokerStatus, PublishError, PublishResult, Publisher};
use crate::celery::{self, CeleryMessage};
use crate::config::{mask_url_password as mask_password, BrokerSettings};
use crate::outbox::{Lane, PendingEntry};
use crate::task::routing::Router;
use crate::task::Task;
use backoff::backoff::Backoff;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

struct LiveConnection {
    connection: Connection,
    channel: Channel,
}

pub struct AmqpPublisher {
    settings: BrokerSettings,
    router: Router,
    origin: String,
    live: Mutex<Option<Arc<LiveConnection>>>,
    status: watch::Sender<BrokerStatus>,
    /// Signalled when a publish finds the connection unusable.
    connection_lost: Notify,
    reconnect_now: Notify,
    stop: CancellationToken,
}

impl AmqpPublisher {
    /// Creates the publisher and starts its connection manager. Returns at
    /// once; the first connection attempt happens in the background.
    pub fn start(settings: BrokerSettings, router: Router) -> Arc<Self> {
        let endpoint = mask_password(&settings.url);
        let (status, _) = watch::channel(BrokerStatus::connecting(endpoint));
        let publisher = Arc::new(Self {
            settings,
            router,
            origin: celery::default_origin(),
            live: Mutex::new(None),
            status,
            connection_lost: Notify::new(),
            reconnect_now: Notify::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(publisher.clone().manage_connection());
        publisher
    }

    fn endpoint(&self) -> String {
        mask_password(&self.settings.url)
    }

    fn connection_url(&self) -> String {
        let url = &self.settings.url;
        if url.contains("heartbeat=") {
            return url.clone();
        }
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}heartbeat={}", self.settings.heartbeat_seconds)
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
                    changed_at: chrono::Utc::now(),
                };
            }
            changed
        });
    }

    async fn manage_connection(self: Arc<Self>) {
        let mut backoff = backoff::ExponentialBackoff {
            initial_interval: Duration::from_millis(self.settings.reconnect_min_ms),
            max_interval: Duration::from_millis(self.settings.reconnect_max_ms),
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        let connect_timeout = Duration::from_millis(self.settings.connect_timeout_ms);
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
                    let live = Arc::new(live);
                    let mut events = live.connection.events_listener();
                    *self.live.lock().expect("live lock") = Some(live.clone());
                    self.set_status(true, None);
                    tracing::info!(endpoint = %self.endpoint(), "connected to the AMQP broker");
                    let reason = loop {
                        tokio::select! {
                            event = events.next() => match event {
                                Some(lapin::Event::Error(error)) => break format!("connection error: {error}"),
                                Some(_) => continue,
                                None => break "connection closed".to_owned(),
                            },
                            _ = self.connection_lost.notified() => break "publish failed on the connection".to_owned(),
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
                    self.set_status(false, Some(error.to_string()));
                    tracing::debug!(%error, "AMQP connection attempt failed");
                }
                Err(_) => {
                    let error = format!("connecting timed out after {} ms", connect_timeout.as_millis());
                    self.set_status(false, Some(error));
                }
            }
            let delay = backoff
                .next_backoff()
                .unwrap_or(Duration::from_millis(self.settings.reconnect_max_ms));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.reconnect_now.notified() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn connect_and_declare(&self) -> Result<LiveConnection, lapin::Error> {
        let properties = ConnectionProperties::default().with_connection_name("taskgate".into());
        let connection = Connection::connect(&self.connection_url(), properties).await?;
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
        for binding in self.router.queues() {
            let mut arguments = FieldTable::default();
            if self.settings.quorum_queues {
                arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            }
            channel
                .queue_declare(
                    binding.queue().as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    arguments,
                )
                .await?;
            channel
                .queue_bind(
                    binding.queue().as_str().into(),
                    exchange.into(),
                    binding.binding_key().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(LiveConnection { connection, channel })
    }

    fn live(&self) -> Option<Arc<LiveConnection>> {
        self.live.lock().expect("live lock").clone()
    }

    async fn publish_window(&self, entries: &[PendingEntry]) -> Vec<PublishResult> {
        let Some(live) = self.live() else {
            let detail = self.status.borrow().last_error.clone();
            return entries
                .iter()
                .map(|_| Err(PublishError::not_connected(detail.as_deref())))
                .collect();
        };
        let timeout = Duration::from_millis(self.settings.publish_timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
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
        for (index, entry) in entries.iter().enumerate() {
            let message = celery::encode(&entry.task, &self.origin);
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
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(confirm)) => confirms.push((index, confirm)),
                Ok(Err(error)) => {
                    connection_broken = true;
                    results[index] = Some(Err(PublishError::from_amqp(&error)));
                }
                Err(_) => connection_broken = true,
            }
        }
        confirms.sort_by_key(|(index, _)| *index);
        for (index, confirm) in confirms {
            let entry = &entries[index];
            results[index] = Some(match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(returned)))) | Ok(Ok(Confirmation::Nack(Some(returned)))) => {
                    Err(PublishError::unroutable(
                        exchange,
                        &entry.task.routing_key,
                        &format!("{} {}", returned.reply_code, returned.reply_text),
                    ))
                }
                Ok(Ok(Confirmation::Nack(None))) => {
                    Err(PublishError::Transient("the broker nacked the message".into()))
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    connection_broken = true;
                    Err(PublishError::Transient(
                        "publisher confirms are not enabled on the channel".into(),
                    ))
                }
                Ok(Err(error)) => {
                    connection_broken = true;
                    Err(PublishError::from_amqp(&error))
                }
                Err(_) => {
                    connection_broken = true;
                    Err(PublishError::timed_out("waiting for the broker's confirm", timeout))
                }
            });
        }
        if connection_broken {
            // A timeout or channel error leaves the channel in an unknown
            // state: start over on a fresh connection.
            self.connection_lost.notify_one();
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(PublishError::timed_out("publishing", timeout))))
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
        Box::pin(self.publish_window(entries))
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
