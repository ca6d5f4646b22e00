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
//!
//! The probes answer with [`Probe`], health with
//! [`crate::health::HealthReport`]; their `ToSchema` derives are what
//! `GET /openapi.json` documents.

use super::problem::Problem;
use super::AppState;
use crate::health::{self, HealthReport, HealthStatus};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;

/// `GET /healthz` and `GET /readyz` bodies.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Probe {
    #[schema(inline)]
    pub status: ProbeStatus,
    /// Why the gateway is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `pass` (liveness), `ready` or `not ready` (readiness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum ProbeStatus {
    #[serde(rename = "pass")]
    Pass,
    #[serde(rename = "ready")]
    Ready,
    #[serde(rename = "not ready")]
    NotReady,
}

pub async fn healthz() -> Json<Probe> {
    Json(Probe {
        status: ProbeStatus::Pass,
        reason: None,
    })
}

/// Not ready is not a problem+json: a load balancer reads the probe's own
/// body, and Retry-After tells it when to look again.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, HeaderMap, Json<Probe>) {
    if state.outbox.has_room() {
        let ready = Probe {
            status: ProbeStatus::Ready,
            reason: None,
        };
        return (StatusCode::OK, HeaderMap::new(), Json(ready));
    }
    let reason = match state.outbox.storage_failure() {
        Some(failure) => format!("the outbox store failed: {}", failure.error),
        None => "the outbox is full".to_owned(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    let not_ready = Probe {
        status: ProbeStatus::NotReady,
        reason: Some(reason),
    };
    (StatusCode::SERVICE_UNAVAILABLE, headers, Json(not_ready))
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

pub const HEALTH_CONTENT_TYPE: &str = "application/health+json";

/// The headers are applied after `Json`'s, so the health media type
/// replaces `application/json`.
pub async fn health(
    State(state): State<AppState>,
) -> (StatusCode, [(HeaderName, &'static str); 2], Json<HealthReport>) {
    let report = current_report(&state);
    let status = if report.status == HealthStatus::Fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        [
            (header::CONTENT_TYPE, HEALTH_CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Json(report),
    )
}

/// Subscriber slots of `GET /v1/health/stream`; cheap to clone.
#[derive(Clone)]
pub struct EventSubscribers(Arc<Semaphore>);

impl EventSubscribers {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// A slot, or `None` when every one is taken.
    pub fn try_acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// Counted when a subscriber is refused because every slot is taken.
pub const REFUSED_SUBSCRIBERS_METRIC: &str = "taskgate_event_subscribers_refused_total";

/// The comment lines that keep an idle stream alive: often enough that
/// the server's stall bound (`http.idle_timeout_ms` without progress)
/// never closes a healthy subscriber, at most every 15 s.
pub(super) fn keep_alive_interval(idle_timeout_ms: u64) -> Duration {
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
