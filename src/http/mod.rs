//! The HTTP API (axum): routes, shared state, body limits and the
//! problem+json fallbacks.
//!
//! Handlers never wait on the broker or a database: accepting a task waits
//! only for the outbox's group commit. Reads of tracked tasks
//! (`GET /v1/tasks`, `GET /v1/tasks/{id}`) ask the tracking database with
//! a bound, and not at all while it is known to be unreachable.

pub mod admin;
pub mod health;
pub mod openapi;
pub mod problem;
pub mod status_page;
pub mod tasks;

use crate::broker::Publisher;
use crate::config::Settings;
use crate::health::HealthMonitor;
use crate::outbox::Outbox;
use crate::relay::breaker::Breaker;
use crate::relay::Relay;
use crate::task::registry::Registry;
use crate::task::routing::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use problem::Problem;
use std::sync::Arc;

/// Everything a handler may touch; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub router: Arc<Router>,
    pub outbox: Arc<Outbox>,
    pub publisher: Arc<dyn Publisher>,
    pub breaker: Arc<Breaker>,
    pub relay: Arc<Relay>,
    pub health: Arc<HealthMonitor>,
    pub metrics: PrometheusHandle,
    /// Task tracking in SQL (rows, results, the tracking-queue consumer).
    pub tracking: Arc<crate::tracking::Tracking>,
}

pub fn router(state: AppState) -> axum::Router {
    let max_body = state.settings.http.max_body_bytes;
    axum::Router::new()
        .route("/v1/tasks", post(tasks::post_task).get(tasks::list_tasks))
        .route("/v1/tasks/batch", post(tasks::post_batch))
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/health", get(health::health))
        .route("/v1/health/stream", get(health::health_stream))
        .route("/metrics", get(health::metrics))
        .route("/", get(status_page::status_page))
        .merge(admin::routes(&state))
        .route(openapi::PATH, get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
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
