//! Probes and health: `/healthz`, `/readyz`, `/v1/health`,
//! `/v1/health/stream` and `/metrics`.
//!
//! None of them waits on the broker or a database: they read state that
//! background tasks keep current.

use super::AppState;
use crate::health::{self, HealthReport, HealthStatus};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde_json::json;
use std::convert::Infallible;
use std::time::Duration;
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

/// One `health` event now, then one per health change.
pub async fn health_stream(State(state): State<AppState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    current_report(&state);
    let stream = WatchStream::new(state.health.subscribe()).map(|report| {
        let data = serde_json::to_string(&report).unwrap_or_default();
        Ok(Event::default().event("health").data(data))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
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
