//! Task routes: `POST /v1/tasks`, `POST /v1/tasks/batch`, `GET /v1/tasks/{id}`
//! and `GET /v1/tasks` (the tracked tasks, paged).
//!
//! The body is read as bytes and decoded here (not by axum's `Json`), so
//! that a syntax error is a 400, a type error a 422 naming the field, and
//! an oversized body a 413, each as problem+json. Nothing is written
//! unless every task of the request passed intake.

use super::problem::Problem;
use super::AppState;
use crate::outbox::{AcceptOutcome, Acceptance, IdempotencyKey, OutboxError, TaskState};
use crate::task::intake::{self, IntakeErrorKind};
use crate::task::registry::Registry;
use crate::task::routing::TopicRouter;
use crate::task::{Task, TaskId, TaskRequest};
use crate::tracking::store::{ListCursor, TaskFilter, MAX_PAGE};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

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

/// A fingerprint of what a request asks for: the decoded tasks with every
/// object's keys sorted (so key order and white space do not count), and
/// the route, hashed. Two requests with one `Idempotency-Key` must match.
fn request_fingerprint(route: &str, requests: &[TaskRequest]) -> String {
    use sha2::Digest;
    fn sort_keys(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.sort_keys();
                map.values_mut().for_each(sort_keys);
            }
            Value::Array(items) => items.iter_mut().for_each(sort_keys),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(requests).expect("task requests serialize");
    sort_keys(&mut value);
    let mut hasher = sha2::Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update([0]);
    hasher.update(value.to_string().as_bytes());
    hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
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
        OutboxError::IdempotencyKeyReused { key } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused for a different request",
            format!(
                "the Idempotency-Key {key:?} was already used within 24 h for a request with other content; \
                 nothing was accepted: send the same request to retry it, or use a new key for a new request"
            ),
        )
        .with_field(Some("Idempotency-Key".into())),
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

/// Which task route a submission came in on: its field names in problems
/// (`tasks[3].args`) and its part of the idempotency fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubmitRoute {
    /// `POST /v1/tasks`: one task.
    Single,
    /// `POST /v1/tasks/batch`: all or none.
    Batch,
}

impl SubmitRoute {
    fn fingerprint_name(self) -> &'static str {
        match self {
            SubmitRoute::Single => "task",
            SubmitRoute::Batch => "batch",
        }
    }

    fn field_prefix(self, index: usize) -> String {
        match self {
            SubmitRoute::Single => String::new(),
            SubmitRoute::Batch => format!("tasks[{index}]."),
        }
    }
}

/// Everything a task route does before the outbox, and nothing it writes:
/// the body decoded, the batch size checked, the `Idempotency-Key` read,
/// and every task through intake, in request order. The handlers and the
/// property tests (`request_proptests`) go through this one function.
pub(crate) fn parse_submission(
    route: SubmitRoute,
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
    registry: &Registry,
    router: &TopicRouter,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Vec<Task>, Option<IdempotencyKey>), Problem> {
    let requests = match route {
        SubmitRoute::Single => vec![decode::<TaskRequest>(body)?],
        SubmitRoute::Batch => {
            let batch: BatchRequest = decode(body)?;
            if batch.tasks.is_empty() || batch.tasks.len() > MAX_BATCH {
                return Err(Problem::invalid_field(
                    Some("tasks".into()),
                    format!("a batch holds 1 to {MAX_BATCH} tasks, not {}", batch.tasks.len()),
                ));
            }
            batch.tasks
        }
    };
    let key = idempotency_key(headers)?
        .map(|key| IdempotencyKey::new(key, request_fingerprint(route.fingerprint_name(), &requests)));
    let tasks = requests
        .into_iter()
        .enumerate()
        .map(|(index, request)| {
            intake::accept(request, registry, router, now)
                .map_err(|error| intake_problem(error, &route.field_prefix(index)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((tasks, key))
}

/// Parses a submission and makes its tasks durable, all or none.
async fn submit(
    state: &AppState,
    route: SubmitRoute,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<Acceptance>, Problem> {
    let (tasks, key) = parse_submission(route, body, headers, &state.registry, &state.router, chrono::Utc::now())?;
    let tasks: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let lanes = state.publisher.lanes_for(&task);
            (task, lanes)
        })
        .collect();
    let count = tasks.len() as u64;
    let outcome = state.outbox.accept(tasks, key).await.map_err(outbox_problem)?;
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
    match submit(&state, SubmitRoute::Single, &headers, body).await {
        Ok(acceptances) => {
            let acceptance = acceptances.into_iter().next().expect("one acceptance per task");
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
    match submit(&state, SubmitRoute::Batch, &headers, body).await {
        Ok(acceptances) => (
            StatusCode::ACCEPTED,
            Json(json!({"tasks": acceptances.iter().map(acceptance_body).collect::<Vec<_>>()})),
        )
            .into_response(),
        Err(problem) => problem.into_response(),
    }
}

/// `GET /v1/tasks/{id}`: the outbox's state, the tracking row and the
/// Celery result, merged. `{id}` is a Celery task id or a tracking row's
/// public id. A task known only from the tracking table (scheduled by a
/// worker, or published long enough ago that the outbox forgot it) is
/// answered from the row: it reached the broker, so it is `published`.
/// The database is asked with a bound, and not at all while it is known
/// to be unreachable; then the outbox's answer comes with `tracking_error`.
pub async fn get_task(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if id.is_empty() || id.len() > 255 {
        return Problem::not_found(format!("{id:?} is not a task id")).into_response();
    }
    let outbox_status = match TaskId::parse(&id) {
        Ok(task_id) => match state.outbox.status(&task_id) {
            Ok(status) => status,
            Err(error) => return outbox_problem(error).into_response(),
        },
        Err(_) => None,
    };
    let mut tracking_error: Option<String> = None;
    let row = match state.tracking.find(&id).await {
        Ok(row) => row,
        Err(error) => {
            tracking_error = Some(error.to_string());
            None
        }
    };
    // Asked by public id: the outbox knows the task by its Celery id.
    let outbox_status = match (outbox_status, &row) {
        (None, Some(row)) => match TaskId::parse(&row.task_id) {
            Ok(task_id) => match state.outbox.status(&task_id) {
                Ok(status) => status,
                Err(error) => return outbox_problem(error).into_response(),
            },
            Err(_) => None,
        },
        (known, _) => known,
    };
    let task_id = outbox_status
        .as_ref()
        .map(|status| status.id.to_string())
        .or_else(|| row.as_ref().map(|row| row.task_id.clone()));
    let result = match (&task_id, &tracking_error) {
        (Some(task_id), None) => match state.tracking.result(task_id).await {
            Ok(result) => result,
            Err(error) => {
                tracking_error = Some(error.to_string());
                None
            }
        },
        _ => None,
    };
    let mut body = match (outbox_status, &row) {
        (Some(status), _) => json!({
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
        }),
        (None, Some(row)) => json!({
            "id": row.task_id,
            "task": row.task_type,
            "state": "published",
            "attempts": null,
            "last_error": null,
            "routing_key": row.options.get("routing_key").cloned().unwrap_or(Value::Null),
            "queues": row.options.get("queues").cloned().unwrap_or(Value::Null),
            "accepted_at": row.created_date,
            "published_at": null,
        }),
        (None, None) => {
            return match tracking_error {
                Some(error) => Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tracking-unavailable",
                    "Tracking database unavailable",
                    format!(
                        "the outbox does not know task {id}, and the tracking database could not be asked: {error}"
                    ),
                )
                .retry_after(5)
                .into_response(),
                None => Problem::not_found(format!("no task with id {id} is known")).into_response(),
            };
        }
    };
    body["result"] = json!(result);
    body["tracking"] = json!(row);
    if let Some(error) = tracking_error {
        body["tracking_error"] = json!(error);
    }
    Json(body).into_response()
}

/// Query of `GET /v1/tasks`. Empty values mean "not given", so a template
/// like `?type=&creator_id=u1` filters by creator only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(rename = "type")]
    task_type: Option<String>,
    creator_id: Option<String>,
    related_content_type: Option<String>,
    related_object_id: Option<String>,
    status: Option<String>,
    parent_id: Option<String>,
    root_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

const DEFAULT_PAGE: u32 = 50;

fn given(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.is_empty())
}

/// `GET /v1/tasks`: tracked tasks, newest first, paged with an opaque
/// `cursor` (`next_cursor` of the previous page), filtered by `type`,
/// `creator_id`, `related_content_type`, `related_object_id`, `status`,
/// `parent_id` and `root_id`.
pub async fn list_tasks(State(state): State<AppState>, query: Result<Query<ListQuery>, QueryRejection>) -> Response {
    let result = async {
        let Query(query) = query.map_err(|rejection| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-query",
                "Invalid query",
                rejection.body_text(),
            )
        })?;
        let limit = match given(query.limit) {
            None => DEFAULT_PAGE,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|limit| (1..=MAX_PAGE).contains(limit))
                .ok_or_else(|| {
                    Problem::invalid_field(
                        Some("limit".into()),
                        format!("limit must be a whole number from 1 to {MAX_PAGE}, not {text:?}"),
                    )
                })?,
        };
        let cursor = match given(query.cursor) {
            None => None,
            Some(text) => Some(ListCursor::decode(&text).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-cursor",
                    "Invalid cursor",
                    "cursor must be the next_cursor of a previous page",
                )
                .with_field(Some("cursor".into()))
            })?),
        };
        let filter = TaskFilter {
            task_type: given(query.task_type),
            creator_id: given(query.creator_id),
            related_content_type: given(query.related_content_type),
            related_object_id: given(query.related_object_id),
            status: given(query.status),
            parent_id: given(query.parent_id),
            root_id: given(query.root_id),
        };
        let page = state
            .tracking
            .list(&filter, cursor.as_ref(), limit)
            .await
            .map_err(|error| {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tracking-unavailable",
                    "Tracking database unavailable",
                    error.to_string(),
                )
                .retry_after(5)
            })?;
        Ok::<_, Problem>(json!({
            "tasks": page.tasks,
            "next_cursor": page.next.as_ref().map(ListCursor::encode),
        }))
    }
    .await;
    match result {
        Ok(body) => Json(body).into_response(),
        Err(problem) => problem.into_response(),
    }
}
#[cfg(test)]
mod request_proptests;
