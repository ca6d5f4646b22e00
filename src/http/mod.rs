//! The HTTP API (axum): routes, shared state, body limits and the
//! problem+json fallbacks.
//!
//! Every request gets an id and a span first ([`request_id`], a
//! `tower-http` trace layer), then passes the edge guard ([`guard`]: Host, Content-Type,
//! Origin) before any handler, and the task-accepting routes the submit
//! token; the connection bounds (cap, timeouts) are the server's
//! ([`server`]).
//!
//! Handlers never wait on the broker or a database: accepting a task waits
//! only for the outbox's group commit. Reads of tracked tasks
//! (`GET /v1/tasks`, `GET /v1/tasks/{id}`) ask the tracking database with
//! a bound, and not at all while it is known to be unreachable.

pub mod admin;
pub mod guard;
pub mod health;
pub mod openapi;
pub mod problem;
pub mod request_id;
pub mod server;
pub mod status_page;
pub mod task_events;
pub mod tasks;
pub mod topology;

use crate::broker::Publisher;
use crate::config::Settings;
use crate::health::HealthMonitor;
use crate::outbox::Outbox;
use crate::relay::breaker::Breaker;
use crate::relay::Relay;
use crate::task::registry::Registry;
use crate::task::routing::TopicRouter;
use axum::extract::{DefaultBodyLimit, Extension};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use problem::Problem;
use std::sync::Arc;
use tower_http::trace::TraceLayer;

/// Everything a handler may touch. One `Arc`: axum clones the state for
/// every request, and eleven `Arc`s cloned and dropped per request showed
/// in the accept profile (docs/benchmarks.md).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Services {
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub router: Arc<TopicRouter>,
    pub outbox: Arc<Outbox>,
    pub publisher: Arc<dyn Publisher>,
    pub breaker: Arc<Breaker>,
    pub relay: Arc<Relay>,
    pub health: Arc<HealthMonitor>,
    pub metrics: PrometheusHandle,
    /// Task tracking in SQL (rows, results, the tracking-queue consumer).
    pub tracking: Arc<crate::tracking::Tracking>,
}

pub fn router(state: AppState) -> Router {
    let max_body = state.settings.http.max_body_bytes;
    let edge = Arc::new(guard::EdgePolicy::new(&state.settings.http.allowed_hosts));
    let subscribers = health::EventSubscribers::new(state.settings.http.max_event_subscribers);
    // Task streams have slots of their own: many progress bars must not
    // lock operators out of the health stream.
    let task_subscribers = health::EventSubscribers::new(state.settings.http.max_event_subscribers);
    // A route layer: checked before the body is read, on the POSTs only.
    let submit = axum::middleware::from_fn_with_state(state.clone(), guard::require_submitter);
    Router::new()
        .route(
            "/v1/tasks",
            get(tasks::list_tasks).merge(post(tasks::post_task).route_layer(submit.clone())),
        )
        .route("/v1/tasks/batch", post(tasks::post_batch).route_layer(submit.clone()))
        .route("/v1/groups", post(tasks::post_group).route_layer(submit))
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route(
            "/v1/tasks/{id}/events",
            get(task_events::task_events).layer(Extension(task_subscribers)),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/health", get(health::health))
        .route(
            "/v1/health/stream",
            get(health::health_stream).layer(Extension(subscribers)),
        )
        .route("/metrics", get(health::metrics))
        .route("/v1/topology", get(topology::topology))
        .route("/", get(status_page::status_page))
        .merge(admin::routes(&state))
        .route(openapi::PATH, get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        // Wraps everything above, fallbacks included.
        .layer(axum::middleware::from_fn_with_state(edge, guard::edge_guard))
        // Outside the guard, so its refusals have a span and an id too.
        .layer(TraceLayer::new_for_http().make_span_with(request_id::span_for))
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> impl IntoResponse {
    Problem::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> impl IntoResponse {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{method} is not supported on {}", uri.path()),
    )
}
