//! Task routes: `POST /v1/tasks`, `POST /v1/tasks/batch`, `GET /v1/tasks/{id}`.
//!
//! The body is read as bytes and decoded here (not by axum's `Json`), so
//! that a syntax error is a 400, a type error a 422 naming the field, and
//! an oversized body a 413, each as problem+json. Nothing is written
//! unless every task of the request passed intake.

use super::problem::Problem;
use super::AppState;
use crate::outbox::{AcceptOutcome, Acceptance, OutboxError, TaskState};
use crate::task::intake::{self, IntakeErrorKind};
use crate::task::{TaskId, TaskRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

const MAX_BATCH: usize = 1000;
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

fn decode<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Problem> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                status,
                "body-too-large",
                "Request body too large",
                rejection.body_text(),
            )
        } else {
            Problem::new(
                status,
                "unreadable-body",
                "Unreadable request body",
                rejection.body_text(),
            )
        }
    })?;
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            Problem::malformed_json(format!("the body is not valid JSON: {inner}"))
        } else {
            let field = (path != ".").then_some(path);
            Problem::invalid_field(field, inner.to_string())
        }
    })?;
    deserializer
        .end()
        .map_err(|error| Problem::malformed_json(format!("trailing data after the JSON value: {error}")))?;
    Ok(value)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|text| !text.is_empty() && text.len() <= 255 && text.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "Invalid Idempotency-Key",
                "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(text.to_owned()))
}

fn intake_problem(error: intake::IntakeError, prefix: &str) -> Problem {
    let field = error.field.map(|field| format!("{prefix}{field}"));
    let (slug, title) = match error.kind {
        IntakeErrorKind::InvalidField => ("invalid-field", "Invalid field"),
        IntakeErrorKind::UnknownTask => ("unknown-task", "Unknown task"),
        IntakeErrorKind::Binding => ("argument-binding", "Arguments do not bind to the task's parameters"),
        IntakeErrorKind::Unroutable => ("unroutable", "No queue would receive this task"),
    };
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, slug, title, error.message).with_field(field)
}

pub(super) fn outbox_problem(error: OutboxError) -> Problem {
    match error {
        OutboxError::Full { used, limit } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbox-full",
            "Outbox full",
            format!("the outbox holds {used} of {limit} bytes while the broker catches up; retry later"),
        )
        .retry_after(5),
        OutboxError::DuplicateTaskId(id) => Problem::new(
            StatusCode::CONFLICT,
            "duplicate-task-id",
            "Duplicate task id",
            format!("task id {id} was already accepted; use an Idempotency-Key to retry safely"),
        )
        .with_field(Some("id".into())),
        other => {
            tracing::error!(error = %other, "outbox write failed");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbox-unavailable",
                "Outbox unavailable",
                format!("the task could not be made durable: {other}"),
            )
            .retry_after(1)
        }
    }
}

fn acceptance_body(acceptance: &Acceptance) -> serde_json::Value {
    json!({
        "id": acceptance.id.to_string(),
        "task": acceptance.task,
        "status": "accepted",
        "routing_key": acceptance.routing_key,
        "queues": acceptance.queues,
    })
}

async fn accept(
    state: &AppState,
    requests: Vec<TaskRequest>,
    headers: &HeaderMap,
    field_prefix: impl Fn(usize) -> String,
) -> Result<Vec<Acceptance>, Problem> {
    let key = idempotency_key(headers)?;
    let now = chrono::Utc::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for (index, request) in requests.into_iter().enumerate() {
        let task = intake::accept(request, &state.registry, &state.router, now)
            .map_err(|error| intake_problem(error, &field_prefix(index)))?;
        let lanes = state.publisher.lanes_for(&task);
        tasks.push((task, lanes));
    }
    let count = tasks.len() as u64;
    let outcome = state
        .outbox
        .accept(tasks, key.as_deref())
        .await
        .map_err(outbox_problem)?;
    Ok(match outcome {
        AcceptOutcome::Accepted(acceptances) => {
            metrics::counter!("taskgate_tasks_accepted_total").increment(count);
            acceptances
        }
        AcceptOutcome::Replayed(acceptances) => {
            metrics::counter!("taskgate_idempotent_replays_total").increment(1);
            acceptances
        }
    })
}

pub async fn post_task(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: TaskRequest = decode(body)?;
        let acceptances = accept(&state, vec![request], &headers, |_| String::new()).await?;
        Ok::<_, Problem>(acceptances.into_iter().next().expect("one acceptance per task"))
    }
    .await;
    match result {
        Ok(acceptance) => {
            let location = format!("/v1/tasks/{}", acceptance.id);
            let mut response = (StatusCode::ACCEPTED, Json(acceptance_body(&acceptance))).into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        Err(problem) => problem.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    tasks: Vec<TaskRequest>,
}

pub async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let batch: BatchRequest = decode(body)?;
        if batch.tasks.is_empty() || batch.tasks.len() > MAX_BATCH {
            return Err(Problem::invalid_field(
                Some("tasks".into()),
                format!("a batch holds 1 to {MAX_BATCH} tasks, not {}", batch.tasks.len()),
            ));
        }
        accept(&state, batch.tasks, &headers, |index| format!("tasks[{index}].")).await
    }
    .await;
    match result {
        Ok(acceptances) => (
            StatusCode::ACCEPTED,
            Json(json!({"tasks": acceptances.iter().map(acceptance_body).collect::<Vec<_>>()})),
        )
            .into_response(),
        Err(problem) => problem.into_response(),
    }
}

pub async fn get_task(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(id) = TaskId::parse(&id) else {
        return Problem::not_found(format!("{id:?} is not a task id")).into_response();
    };
    match state.outbox.status(&id) {
        Ok(Some(status)) => Json(json!({
            "id": status.id.to_string(),
            "task": status.task,
            "state": match status.state {
                TaskState::Queued => "queued",
                TaskState::Published => "published",
                TaskState::DeadLetter => "dead_letter",
            },
            "attempts": status.attempts,
            "last_error": status.last_error,
            "routing_key": status.routing_key,
            "queues": status.queues,
            "accepted_at": status.accepted_at,
            "published_at": status.published_at,
            "result": null,
        }))
        .into_response(),
        Ok(None) => Problem::not_found(format!("no task with id {id} is known")).into_response(),
        Err(error) => outbox_problem(error).into_response(),
    }
}
