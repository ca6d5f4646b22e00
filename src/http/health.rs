//! Probes and health: `/healthz`, `/readyz`, `/v1/health`,
//! `/v1/health/stream` and `/metrics`.
//!
//! None of them waits on the broker or a database: they read state that
//! background tasks keep current.
//!
//! The event stream is capped at `http.max_event_subscribers` concurrent
//! subscribers ([`EventSubscribers`]): past it a new one gets 503 at once.
//! A slot is held by the stream itself, so it is freed as soon as the
//! server drops the response body: when the client goes away (hyper sees
//! the connection close) or the server closes the connection.

use super::problem::Problem;
use super::AppState;
use crate::health::{self, HealthReport, HealthStatus};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;

pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "pass"}))).into_response()
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.outbox.has_room() {
        (StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response()
    } else {
        let reason = match state.outbox.storage_failure() {
            Some(failure) => format!("the outbox store failed: {}", failure.error),
            None => "the outbox is full".to_owned(),
        };
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        response
    }
}

/// Health as of now, also handed to the monitor: the monitor otherwise
/// notices some changes (tracking's) only at its next tick, and an event
/// stream opened right after a `GET /v1/health` must not start from an
/// older state than that answer.
pub(super) fn current_report(state: &AppState) -> HealthReport {
    let mut report = health::compute(
        &state.publisher.status().borrow(),
        &state.breaker.snapshot(),
        &state.outbox,
        state.settings.http.warn_backlog_age_seconds,
    );
    health::apply_tracking(
        &mut report,
        &state.tracking.health(),
        state.tracking.warn_journal_age_seconds(),
    );
    state.health.publish(report.clone());
    report
}

pub async fn health(State(state): State<AppState>) -> Response {
    let report = current_report(&state);
    let status = if report.status == HealthStatus::Fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut response = (status, axum::Json(report)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/health+json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Subscriber slots of `GET /v1/health/stream`; cheap to clone.
#[derive(Clone)]
pub struct EventSubscribers(Arc<Semaphore>);

impl EventSubscribers {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }
}

/// Counted when a subscriber is refused because every slot is taken.
pub const REFUSED_SUBSCRIBERS_METRIC: &str = "taskgate_event_subscribers_refused_total";

/// The comment lines that keep an idle stream alive: often enough that
/// the server's stall bound (`http.idle_timeout_ms` without progress)
/// never closes a healthy subscriber, at most every 15 s.
fn keep_alive_interval(idle_timeout_ms: u64) -> Duration {
    Duration::from_millis((idle_timeout_ms / 3).clamp(100, 15_000))
}

/// One `health` event now, then one per health change.
pub async fn health_stream(
    State(state): State<AppState>,
    Extension(subscribers): Extension<EventSubscribers>,
) -> Response {
    let Ok(slot) = subscribers.0.clone().try_acquire_owned() else {
        metrics::counter!(REFUSED_SUBSCRIBERS_METRIC).increment(1);
        let max = state.settings.http.max_event_subscribers;
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-subscribers",
            "Too many event-stream subscribers",
            format!(
                "{max} clients already follow /v1/health/stream (http.max_event_subscribers); poll /v1/health \
                 or retry later"
            ),
        )
        .retry_after(5)
        .into_response();
    };
    current_report(&state);
    let stream = WatchStream::new(state.health.subscribe()).map(move |report| {
        // The slot lives as long as the stream, which is the response body.
        let _slot = &slot;
        let data = serde_json::to_string(&report).unwrap_or_default();
        Ok::<_, Infallible>(Event::default().event("health").data(data))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keep_alive_interval(state.settings.http.idle_timeout_ms)))
        .into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    // Gauges that are cheapest to read at scrape time.
    metrics::gauge!("taskgate_outbox_depth").set(state.outbox.depth() as f64);
    metrics::gauge!("taskgate_outbox_bytes").set(state.outbox.bytes() as f64);
    if let Ok(stats) = state.outbox.stats() {
        metrics::gauge!("taskgate_outbox_oldest_age_seconds").set(stats.oldest_age_seconds.unwrap_or(0.0));
        metrics::gauge!("taskgate_dead_letters").set(stats.dead_letters as f64);
    }
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
