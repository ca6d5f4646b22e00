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
//! - [`http`]: the axum API, problem+json errors, probes, metrics, the
//!   token-guarded admin API and the operator status page; the edge guard
//!   (Host, Origin, Content-Type, submit token) and the bounded accept loop
//!   (connection cap, header, idle and request timeouts).
//! - [`task`]: request and task types, newtypes, intake, registry binding,
//!   topic routing.
//! - [`outbox`]: the sled-backed durable outbox, group commit, dead letters,
//!   and the operator operations (listing, export and import, requeue).
//! - [`relay`]: the loop from outbox to publisher, and the circuit breaker.
//! - [`broker`]: the `Publisher` interface and the AMQP publisher.
//! - [`celery`]: the Celery protocol-v2 message and kombu's SQS envelope.
//! - [`tracking`]: every task recorded in SQL (sqlx, SQLite or PostgreSQL),
//!   Celery results read back, the tracking-queue consumer.
//! - [`health`]: the computed health report and its change stream.
//! - [`app`]: building the server, background tasks, shutdown order.
//! - [`systemd`]: `sd_notify` readiness, stopping and watchdog messages.
//! - [`cli`]: the command line: `serve`, `check-config`, and the operator
//!   commands with their admin client and `--offline` mode.
//! - `proptest_support` (tests only): what the property tests share.

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
pub mod systemd;
pub mod task;
pub mod tracking;
