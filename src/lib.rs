//! taskgate: a resilient broker gateway.
//!
//! A platform posts tasks over local HTTP; taskgate makes each one durable
//! in a local outbox, publishes it to the broker as a Celery protocol-v2
//! message, retries behind a circuit breaker while the broker is away, and
//! reports health so callers can tell whether async work is available.
//!
//! Crate map, in the order a task travels:
//!
//! - [`config`]: typed settings (defaults, TOML, environment) and validation.
//! - [`http`]: the axum API: the task routes (`POST /v1/tasks` bodies are
//!   decoded there, in `http/tasks.rs`), problem+json errors, probes,
//!   health and its event stream, metrics, the OpenAPI document, the
//!   token-guarded admin API and the operator status page; request ids,
//!   the edge guard (Host, Origin, Content-Type, submit token) and the
//!   bounded accept loop (connection cap, header, idle and request
//!   timeouts).
//! - [`task`]: request and task types, newtypes, intake (field checks,
//!   registry binding with Python's rules, topic routing).
//! - [`outbox`]: the sled-backed durable outbox, split by role: keys and
//!   records, counters and room, the write path (group commit and what
//!   makes a flush durable), what the relay reads and completes, the
//!   tracking journal, the operator operations (listing, export and import,
//!   purge, requeue) and salvage of a damaged store.
//! - [`relay`]: the loop from outbox to publisher (sliding window per
//!   lane), the circuit breaker, the operator's holds (a pause, a forced
//!   breaker state; the outbox keeps their record), and the publish-rate
//!   and re-send meter.
//! - [`broker`]: the `Publisher` interface, the AMQP publisher (lapin) and
//!   the SQS publisher (aws-sdk-sqs), each owning its connection handling
//!   (background connect, topology or queue lookup, reconnects, TLS for
//!   `amqps://`), and the one classification of publish errors as
//!   retryable or permanent.
//! - [`celery`]: the Celery protocol-v2 message (headers, properties, body,
//!   Python's `json.dumps` and `saferepr`), kombu's SQS envelope, and
//!   decoding both back.
//! - [`tracking`]: every task recorded in SQL (sqlx, SQLite or PostgreSQL)
//!   from the outbox's journal, Celery results read back, and the
//!   tracking-queue consumer on AMQP and SQS.
//! - [`health`]: the computed health report and its change stream.
//! - [`retry`]: the one retry policy (jittered exponential delays) behind
//!   the breaker's open interval, reconnects and tracking's retries.
//! - [`topology`]: what Celery workers must match (exchange, queues,
//!   bindings, tracking queue, routing, result backend), for
//!   `GET /v1/topology`, `taskgate topology` and `taskgate_client.worker`.
//! - [`verify`]: `taskgate verify-workers`: a probe task per queue proves
//!   that real workers consume it, store results, get their scheduled tasks
//!   tracked and match the topology.
//! - [`app`]: building the server, background tasks, shutdown order.
//! - [`systemd`]: `sd_notify` readiness, stopping and watchdog messages.
//! - [`cli`]: the command line: `serve`, `check-config`, `migrate`, and the
//!   operator commands with their admin client and `--offline` mode.
//! - `proptest_support` (tests only): what the property tests share.

#![forbid(unsafe_code)]

pub mod app;
pub mod broker;
pub mod celery;
pub mod cli;
pub mod config;
pub mod health;
pub mod http;
pub mod outbox;
#[cfg(test)]
pub(crate) mod proptest_support;
pub mod relay;
pub mod retry;
pub mod systemd;
pub mod task;
pub mod topology;
pub mod tracking;
pub mod verify;
