//! Task routes: `POST /v1/tasks`, `POST /v1/tasks/batch`, `GET /v1/tasks/{id}`
//! and `GET /v1/tasks` (the tracked tasks, paged).
//!
//! The body is read as bytes and decoded here (not by axum's `Json`), so
//! that a syntax error is a 400, a type error a 422 naming the field, and
//! an oversized body a 413, each as problem+json; so is a task whose
//! message its broker could never take (over SQS's size limit). Nothing is
//! written unless every task of the request passed intake.
//!
//! The bodies these routes decode and send are the types below; their
//! `ToSchema` derives are what `GET /openapi.json` documents, so the
//! description cannot drift from the wire.

use super::problem::Problem;
use super::AppState;
use crate::outbox::{AcceptOutcome, Acceptance, IdempotencyKey, OutboxError, TaskState};
use crate::task::intake::{self, IntakeErrorKind};
use crate::task::registry::Registry;
use crate::task::routing::TopicRouter;
use crate::task::{CelerySignature, QueueName, SignatureRequest, Task, TaskId, TaskName, TaskRequest};
use crate::tracking::result::TaskResult;
use crate::tracking::store::{ListCursor, TaskFilter, TrackedTask, MAX_PAGE};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
// The property tests (`tasks/request_proptests.rs`) build requests and read
// responses with these through `use super::*`.
#[cfg(test)]
use {axum::http::HeaderValue, axum::response::IntoResponse};

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

/// A task's state could not be read from the outbox. After the store
/// failed a write, sled answers reads with that first error too, so an id
/// the outbox never hid (a task refused before its group was written) can
/// be neither found nor ruled out until taskgate restarts.
fn outbox_read_problem(error: OutboxError) -> Problem {
    tracing::error!(%error, "reading a task's state from the outbox failed");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "outbox-unavailable",
        "Outbox unavailable",
        format!("the task's state cannot be read from the outbox: {error}"),
    )
    .retry_after(1)
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

/// A task made durable in the outbox; it will be published to `queues`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedTask {
    #[schema(value_type = String, format = "uuid")]
    pub id: TaskId,
    #[schema(value_type = String)]
    pub task: TaskName,
    #[schema(inline)]
    pub status: AcceptedStatus,
    /// The routing key the task is published with.
    pub routing_key: String,
    /// Every queue whose binding matches the routing key.
    #[schema(value_type = Vec<String>)]
    pub queues: Vec<QueueName>,
}

/// Always `accepted`: an answer is only sent once the task is durable.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AcceptedStatus {
    Accepted,
}

impl From<Acceptance> for AcceptedTask {
    fn from(acceptance: Acceptance) -> Self {
        Self {
            id: acceptance.id,
            task: acceptance.task,
            status: AcceptedStatus::Accepted,
            routing_key: acceptance.routing_key,
            queues: acceptance.queues,
        }
    }
}

/// `POST /v1/tasks/batch` response, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedBatch {
    pub tasks: Vec<AcceptedTask>,
}

/// `POST /v1/groups`: a Celery group, all members accepted together or none.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    /// The group's id (Celery's `group_id`, a UUID); made when not given
    /// (from the `Idempotency-Key` when there is one, so a retry names the
    /// same group).
    #[serde(default)]
    pub group_id: Option<String>,
    /// The members, in order: each gets `group` = the group id and
    /// `group_index` = its position, as Celery's `group.apply_async` does.
    #[schema(min_items = 1, max_items = 1000)]
    pub tasks: Vec<TaskRequest>,
    /// A chord's body (`chord(header)(body)`): applied by the worker with
    /// the list of the members' results once they all succeeded, through
    /// Celery's `celery.chord_unlock` (the database backend has no native
    /// join). Checked like a callback.
    #[serde(default)]
    #[schema(inline)]
    pub chord: Option<SignatureRequest>,
}

/// `POST /v1/groups` response: the group id and the members, in order (what
/// Celery's `GroupResult(group_id, [AsyncResult(id), ...])` needs), and a
/// chord's body.
#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedGroup {
    pub group_id: String,
    pub tasks: Vec<AcceptedTask>,
    /// The chord's body: its result is the chord's (`AsyncResult(id)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chord: Option<AcceptedChord>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AcceptedChord {
    #[schema(format = "uuid")]
    pub id: String,
    pub task: String,
}

/// What a task route hands the outbox: the tasks (in request order), the
/// idempotency key, and for a group its id.
pub(crate) struct Submission {
    pub(crate) tasks: Vec<Task>,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) group_id: Option<String>,
    /// A chord's body; `tasks` then starts with its `celery.chord_unlock`.
    pub(crate) chord: Option<AcceptedChord>,
}

/// What a submission named besides its tasks (a group's id, a chord's body).
struct Submitted {
    group_id: Option<String>,
    chord: Option<AcceptedChord>,
}

/// Namespace of the group ids made from an `Idempotency-Key` (UUID v5).
const GROUP_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6f0f7c1e-6a0b-4c53-9d0e-2f6f1b0e7a41");

/// Which task route a submission came in on: its field names in problems
/// (`tasks[3].args`) and its part of the idempotency fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubmitRoute {
    /// `POST /v1/tasks`: one task.
    Single,
    /// `POST /v1/tasks/batch`: all or none.
    Batch,
    /// `POST /v1/groups`: all or none, members numbered in one group.
    Group,
}

impl SubmitRoute {
    fn fingerprint_name(self) -> &'static str {
        match self {
            SubmitRoute::Single => "task",
            SubmitRoute::Batch => "batch",
            SubmitRoute::Group => "group",
        }
    }

    fn field_prefix(self, index: usize) -> String {
        match self {
            SubmitRoute::Single => String::new(),
            SubmitRoute::Batch | SubmitRoute::Group => format!("tasks[{index}]."),
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
) -> Result<Submission, Problem> {
    let check_size = |tasks: &[TaskRequest], what: &str| {
        if tasks.is_empty() || tasks.len() > MAX_BATCH {
            return Err(Problem::invalid_field(
                Some("tasks".into()),
                format!("a {what} holds 1 to {MAX_BATCH} tasks, not {}", tasks.len()),
            ));
        }
        Ok(())
    };
    let (mut requests, group_id, chord) = match route {
        SubmitRoute::Single => (vec![decode::<TaskRequest>(body)?], None, None),
        SubmitRoute::Batch => {
            let batch: BatchRequest = decode(body)?;
            check_size(&batch.tasks, "batch")?;
            (batch.tasks, None, None)
        }
        SubmitRoute::Group => {
            let group: GroupRequest = decode(body)?;
            check_size(&group.tasks, "group")?;
            if let Some(id) = &group.group_id {
                validate_group_id(id)?;
            }
            (group.tasks, Some(group.group_id), group.chord)
        }
    };
    let idempotency = idempotency_key(headers)?;
    // The fingerprint is of the request as sent, before the group's numbers
    // are filled in: a retry of the same request matches it. Only a request
    // with a key needs one (it costs a serialisation and a hash).
    let fingerprint = idempotency.as_ref().map(|_| {
        request_fingerprint(route.fingerprint_name(), &requests)
            + &group_id
                .clone()
                .flatten()
                .map(|id| format!("/{id}"))
                .unwrap_or_default()
            + &chord
                .as_ref()
                .map(|body| format!("/chord:{}", serde_json::to_string(body).unwrap_or_default()))
                .unwrap_or_default()
    });
    let group_id = group_id.map(|given| {
        given.unwrap_or_else(|| match &idempotency {
            Some(key) => uuid::Uuid::new_v5(&GROUP_ID_NAMESPACE, key.as_bytes()).to_string(),
            None => uuid::Uuid::new_v4().to_string(),
        })
    });
    if let Some(group_id) = &group_id {
        for (index, request) in requests.iter_mut().enumerate() {
            if request.group.is_some() || request.group_index.is_some() {
                let field = if request.group.is_some() {
                    "group"
                } else {
                    "group_index"
                };
                return Err(Problem::invalid_field(
                    Some(format!("tasks[{index}].{field}")),
                    "a group's members are numbered by the group: leave group and group_index out",
                ));
            }
            request.group = Some(group_id.clone());
            request.group_index = Some(index as u32);
        }
    }
    let mut tasks = requests
        .into_iter()
        .enumerate()
        .map(|(index, request)| {
            intake::accept(request, registry, router, now)
                .map_err(|error| intake_problem(error, &route.field_prefix(index)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut accepted_chord = None;
    if let (Some(body), Some(group_id)) = (chord, &group_id) {
        let body_id = (!body.options.contains_key("task_id")).then(|| match &idempotency {
            Some(key) => uuid::Uuid::new_v5(&GROUP_ID_NAMESPACE, format!("{key}/chord").as_bytes()).to_string(),
            None => uuid::Uuid::new_v4().to_string(),
        });
        let mut body = intake::accept_chord_body(body, registry).map_err(|error| intake_problem(error, ""))?;
        if let Some(id) = body_id {
            body.options.insert("task_id".into(), id.into());
        }
        body.options.insert("group_id".into(), group_id.clone().into());
        let unlock = chord_unlock(group_id, &body, &tasks, router, registry, now)?;
        accepted_chord = Some(AcceptedChord {
            id: body.options["task_id"].as_str().unwrap_or_default().to_owned(),
            task: body.task.to_string(),
        });
        for member in &mut tasks {
            member.chord = Some(body.clone());
        }
        // Published before the members, as Celery's chord does.
        tasks.insert(0, unlock);
    }
    let key = idempotency
        .zip(fingerprint)
        .map(|(key, fingerprint)| IdempotencyKey::new(key, fingerprint));
    Ok(Submission {
        tasks,
        key,
        group_id,
        chord: accepted_chord,
    })
}

/// Celery's `celery.chord_unlock` for a chord on a backend without a native
/// join (the database backend): a worker polls the members' results (by
/// retrying itself every `result_chord_retry_interval`) and applies the
/// body with them once all are ready. Sent as Celery's
/// `fallback_chord_unlock` sends it: one second ahead, routed where the
/// body goes, its arguments the group id and the body, the members as
/// `result` tuples.
fn chord_unlock(
    group_id: &str,
    body: &CelerySignature,
    members: &[Task],
    router: &TopicRouter,
    registry: &Registry,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Task, Problem> {
    let results: Vec<Value> = members
        .iter()
        .map(|member| json!([[member.id.to_string(), null], null]))
        .collect();
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("interval".into(), Value::Null);
    kwargs.insert("max_retries".into(), Value::Null);
    kwargs.insert("result".into(), results.into());
    // The unlock keeps the exchange's type across its own retries.
    kwargs.insert("_chord_unlock_exchange_type".into(), "topic".into());
    let queue = body.options.get("queue").and_then(Value::as_str).map(str::to_owned);
    let routing_key = match &queue {
        Some(_) => None,
        None => Some(
            registry
                .routing_key_of(&body.task)
                .map(str::to_owned)
                .unwrap_or_else(|| crate::task::routing::default_routing_key(&body.task)),
        ),
    };
    let mut request = TaskRequest::named(UNLOCK_TASK);
    request.args = vec![group_id.into(), crate::celery::signature_value(body)];
    request.kwargs = kwargs;
    request.routing_key = routing_key;
    request.queue = queue;
    request.countdown = Some(1.0);
    request.ignore_result = Some(true);
    // A built-in: a strict registry need not list it.
    intake::accept(request, &Registry::lenient(), router, now).map_err(|error| intake_problem(error, "chord."))
}

/// Celery's own task that applies a chord's body once its header is done.
const UNLOCK_TASK: &str = "celery.chord_unlock";

/// A group id as Celery writes them (a UUID), or any short printable name.
fn validate_group_id(id: &str) -> Result<(), Problem> {
    if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
        return Err(Problem::invalid_field(
            Some("group_id".into()),
            "a group id is 1 to 255 printable characters (Celery uses a UUID)",
        ));
    }
    Ok(())
}

/// Parses a submission and makes its tasks durable, all or none.
async fn submit(
    state: &AppState,
    route: SubmitRoute,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Vec<Acceptance>, Submitted), Problem> {
    let request_bytes = body.as_ref().map_or(0, Bytes::len);
    let Submission {
        tasks,
        key,
        group_id,
        chord,
    } = parse_submission(route, body, headers, &state.registry, &state.router, chrono::Utc::now())?;
    // No task is larger than the request that carried it: encoding each
    // one as its broker would is only needed for large requests.
    if request_bytes >= UNDELIVERABLE_CHECK_BYTES {
        for (index, task) in tasks.iter().enumerate() {
            if let Some(why) = state.publisher.undeliverable(task) {
                return Err(Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "message-too-large",
                    "Task too large for the broker",
                    why,
                )
                .with_field(undeliverable_field(route, index, chord.is_some())));
            }
        }
    }
    let tasks: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let lanes = state.publisher.lanes_for(&task);
            (task, lanes)
        })
        .collect();
    let count = tasks.len() as u64;
    let outcome = state.outbox.accept(tasks, key).await.map_err(outbox_problem)?;
    let acceptances = match outcome {
        AcceptOutcome::Accepted(acceptances) => {
            metrics::counter!("taskgate_tasks_accepted_total").increment(count);
            acceptances
        }
        AcceptOutcome::Replayed(acceptances) => {
            metrics::counter!("taskgate_idempotent_replays_total").increment(1);
            acceptances
        }
    };
    Ok((acceptances, Submitted { group_id, chord }))
}

/// Requests at least this large have each task checked against its
/// broker's message size limit ([`crate::broker::Publisher::undeliverable`]).
/// SQS's 1 MiB holds any task of a smaller request: kombu's envelope is
/// base64 twice (16/9 of the JSON), and the JSON can be three times the
/// request's text (Python's `ensure_ascii` writes a 4-byte character as a
/// 12-byte surrogate pair), so at most 5.4 times this, headers aside.
pub(crate) const UNDELIVERABLE_CHECK_BYTES: usize = 160 * 1024;

/// The request field of the task at `index` of a submission (a chord's
/// unlock task comes first, before the members).
fn undeliverable_field(route: SubmitRoute, index: usize, chord: bool) -> Option<String> {
    let member = if chord { index.checked_sub(1)? } else { index };
    let prefix = route.field_prefix(member);
    let field = prefix.trim_end_matches('.');
    (!field.is_empty()).then(|| field.to_owned())
}

pub async fn post_task(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, [(header::HeaderName, String); 1], Json<AcceptedTask>), Problem> {
    let (acceptances, _) = submit(&state, SubmitRoute::Single, &headers, body).await?;
    let acceptance = acceptances.into_iter().next().expect("one acceptance per task");
    // A task id is a UUID, always a valid header value.
    let location = format!("/v1/tasks/{}", acceptance.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(AcceptedTask::from(acceptance)),
    ))
}

/// `POST /v1/tasks/batch`: all tasks are accepted together or none is.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    // Checked by `parse_submission` (a 422 naming `tasks`), not by serde.
    #[schema(min_items = 1, max_items = 1000)]
    pub tasks: Vec<TaskRequest>,
}

pub async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedBatch>), Problem> {
    let (acceptances, _) = submit(&state, SubmitRoute::Batch, &headers, body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(AcceptedBatch {
            tasks: acceptances.into_iter().map(AcceptedTask::from).collect(),
        }),
    ))
}

/// `POST /v1/groups`: a Celery group (`group(...).apply_async()`), its
/// members numbered and accepted together or not at all, in one flush.
pub async fn post_group(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedGroup>), Problem> {
    let (acceptances, submitted) = submit(&state, SubmitRoute::Group, &headers, body).await?;
    let mut members = acceptances.into_iter().map(AcceptedTask::from);
    if submitted.chord.is_some() {
        // The first is the chord's unlock, not a member.
        members.next();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(AcceptedGroup {
            group_id: submitted.group_id.expect("a group submission has a group id"),
            tasks: members.collect(),
            chord: submitted.chord,
        }),
    ))
}

/// What taskgate knows about one task.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskStatus {
    #[schema(format = "uuid")]
    pub id: String,
    pub task: String,
    #[schema(inline)]
    pub state: DeliveryState,
    /// Failed publish attempts (a round without a connection sends nothing
    /// and is not counted); null for a task known only from tracking (one
    /// a worker scheduled, or one published long ago).
    pub attempts: Option<u32>,
    /// Why the last attempt failed, or why the task was dead-lettered.
    pub last_error: Option<String>,
    // From a tracking row, whatever its `options` hold: the row is not
    // re-checked, and the answer passes it on as it is.
    #[schema(value_type = Option<String>)]
    pub routing_key: Option<Value>,
    #[schema(value_type = Option<Vec<String>>)]
    pub queues: Option<Value>,
    pub accepted_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    /// Celery's result (`status`, `result`, `date_done`, `traceback`), once a
    /// worker stored one in `celery_taskmeta`.
    #[schema(value_type = Option<Value>)]
    pub result: Option<TaskResult>,
    /// The task's `background_tasks` row (see `GET /v1/tasks`), once recorded.
    #[schema(value_type = Option<Value>)]
    pub tracking: Option<TrackedTask>,
    /// Why the tracking database could not be asked; the rest of the answer
    /// comes from the outbox alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_error: Option<String>,
}

/// `queued`: in the outbox; `published`: confirmed by the broker;
/// `dead_letter`: failed permanently, see `last_error`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Queued,
    Published,
    DeadLetter,
}

impl From<TaskState> for DeliveryState {
    fn from(state: TaskState) -> Self {
        match state {
            TaskState::Queued => DeliveryState::Queued,
            TaskState::Published => DeliveryState::Published,
            TaskState::DeadLetter => DeliveryState::DeadLetter,
        }
    }
}

/// `GET /v1/tasks/{id}`: the outbox's state, the tracking row and the
/// Celery result, merged. `{id}` is a Celery task id or a tracking row's
/// public id. A task known only from the tracking table (scheduled by a
/// worker, or published long enough ago that the outbox forgot it) is
/// answered from the row: it reached the broker, so it is `published`.
/// The database is asked with a bound, and not at all while it is known
/// to be unreachable; then the outbox's answer comes with `tracking_error`.
pub async fn get_task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TaskStatus>, Problem> {
    if id.is_empty() || id.len() > 255 {
        return Err(Problem::not_found(format!("{id:?} is not a task id")));
    }
    let outbox_status = match TaskId::parse(&id) {
        Ok(task_id) => state.outbox.status(&task_id).map_err(outbox_read_problem)?,
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
            Ok(task_id) => state.outbox.status(&task_id).map_err(outbox_read_problem)?,
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
    let mut answer = match (outbox_status, &row) {
        (Some(status), _) => TaskStatus {
            id: status.id.to_string(),
            task: status.task.to_string(),
            state: status.state.into(),
            attempts: Some(status.attempts),
            last_error: status.last_error,
            routing_key: Some(Value::String(status.routing_key)),
            queues: Some(Value::Array(
                status
                    .queues
                    .iter()
                    .map(|queue| Value::String(queue.to_string()))
                    .collect(),
            )),
            accepted_at: status.accepted_at,
            published_at: status.published_at,
            result: None,
            tracking: None,
            tracking_error: None,
        },
        (None, Some(row)) => TaskStatus {
            id: row.task_id.clone(),
            task: row.task_type.clone(),
            // Only a task that reached the broker has a row without an outbox entry.
            state: DeliveryState::Published,
            attempts: None,
            last_error: None,
            routing_key: row.options.get("routing_key").cloned(),
            queues: row.options.get("queues").cloned(),
            accepted_at: row.created_date,
            published_at: None,
            result: None,
            tracking: None,
            tracking_error: None,
        },
        (None, None) => {
            return Err(match tracking_error {
                Some(error) => Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tracking-unavailable",
                    "Tracking database unavailable",
                    format!(
                        "the outbox does not know task {id}, and the tracking database could not be asked: {error}"
                    ),
                )
                .retry_after(5),
                None => Problem::not_found(format!("no task with id {id} is known")),
            });
        }
    };
    answer.result = result;
    answer.tracking = row;
    answer.tracking_error = tracking_error;
    Ok(Json(answer))
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
pub async fn list_tasks(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<TrackedTaskPage>, Problem> {
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
    Ok(Json(TrackedTaskPage {
        tasks: page.tasks,
        next_cursor: page.next.as_ref().map(ListCursor::encode),
    }))
}

/// One page of `GET /v1/tasks`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackedTaskPage {
    /// Rows: public_id, task_id, type, input, options, creator_id,
    /// related_content_type, related_object_id, parent_id, root_id, status,
    /// created_date, last_updated.
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<TrackedTask>,
    /// Pass as cursor for the next page.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod request_proptests;
