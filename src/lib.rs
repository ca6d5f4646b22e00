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
//! - [`http`]: the axum API, problem+json errors, probes, metrics.
//! - [`task`]: request and task types, newtypes, intake, registry binding,
//!   topic routing.
//! - [`outbox`]: the sled-backed durable outbox, group commit, dead letters.
//! - [`relay`]: the loop from outbox to publisher, and the circuit breaker.
//! - [`broker`]: the `Publisher` interface and the AMQP publisher.
//! - [`celery`]: the Celery protocol-v2 message and kombu's SQS envelope.
//! - [`health`]: the computed health report and its change stream.
//! - [`app`]: building the server, background tasks, shutdown order.
//! - [`cli`]: the command line.

pub mod app;
pub mod broker;
pub mod celery;
pub mod cli;
pub mod config;
pub mod health;
pub mod http;
pub mod outbox;
pub mod relay;
pub mod task;
