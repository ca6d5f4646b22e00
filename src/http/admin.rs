//! The admin API: outbox figures, listing, drain, pause, export and import;
//! dead letters; forced breaker states; worker verification
//! (`POST /v1/verify-workers`, see [`crate::verify`]). Also the wire types the CLI's
//! admin client reads back, so server and client cannot drift apart.
//!
//! Authorization ([`authorize`]), checked before any handler runs:
//! - with `http.admin_token` set, every request needs
//!   `Authorization: Bearer <token>`: a missing or non-Bearer header is 401,
//!   a wrong token 403. Tokens are compared in constant time (`subtle`);
//! - with no token, `development` lets loopback callers in and refuses the
//!   rest (403); `production` refuses everything (configuration loading
//!   already refuses to start production without a token).
//!
//! Invariants: every refusal is problem+json; operations that scan the
//! outbox run on the blocking pool and page through it (memory stays
//! bounded, exports stream); anything that changes the outbox is flushed
//! before the answer; removing pending tasks holds the relay's rounds.

use super::problem::Problem;
use super::tasks::outbox_problem;
use super::AppState;
use crate::config::Environment;
use crate::outbox::operations::{
    DeadLetterEntry, DeadLetterError, ImportOutcome, OutboxRecord, PendingCursor, RequeueOutcome,
};
use crate::outbox::{Lane, Outbox, OutboxError};
use crate::relay::breaker::{BreakerSnapshot, BreakerState};
use crate::relay::holds::{BreakerOverride, OperatorHolds};
use crate::task::{routing, Task};
use crate::verify::{self, VerifyError, VerifyReport, VerifyRequest};
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Json;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

/// Pending tasks per page when none is asked for, and the most one page holds.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// Pending tasks read per step of an export stream.
const EXPORT_PAGE: usize = 256;
/// The smallest body limit of `POST /v1/outbox/import`; the CLI sends an
/// export in chunks below it.
pub const MIN_IMPORT_BODY_BYTES: usize = 16 << 20;
/// Header of an export response: pending entries when the export started
/// (what a progress bar counts towards).
pub const DEPTH_HEADER: &str = "x-taskgate-outbox-depth";
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// The largest import request the server takes: room for a chunk of many
/// tasks, or for one task as large as `POST /v1/tasks` allows.
pub fn import_body_limit(max_body_bytes: usize) -> usize {
    MIN_IMPORT_BODY_BYTES.max(max_body_bytes.saturating_mul(4))
}

// The schemas of these answers (`ToSchema`) are what `GET /openapi.json`
// documents. Fields of outbox and relay types, which carry no schema
// derives, are described by `value_type` and their doc comments.

/// One page of `GET /v1/outbox/tasks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    /// Accepted tasks with lane, sequence, attempts, last_error.
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<OutboxRecord>,
    /// Pass as cursor for the next page.
    pub next_cursor: Option<String>,
}

/// One page of `GET /v1/dead-letters`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    /// id, task_id, task_name, lane, reason, attempts, dead_at, task or raw.
    #[schema(value_type = Vec<Object>)]
    pub dead_letters: Vec<DeadLetterEntry>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next_after: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct Purged {
    /// Entries removed.
    pub purged: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct RelayPause {
    /// Whether publishing is paused.
    pub paused: bool,
}

/// The answer to `POST /v1/outbox/drain`: the probe is on its way.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrainStarted {
    /// Tasks waiting.
    pub depth: u64,
    /// The breaker's state.
    #[schema(value_type = String)]
    pub breaker: BreakerState,
    /// Always true.
    pub probe_requested: bool,
}

/// `GET /v1/breaker` and the answer to forcing or releasing it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BreakerView {
    /// `closed`, `open`, `half_open`, `forced_open` or `forced_closed`.
    #[schema(value_type = String)]
    pub state: BreakerState,
    /// True while an operator's forced state overrides the automatic one.
    pub forced: bool,
    pub changed_at: DateTime<Utc>,
    /// Times the breaker opened since start.
    pub opened_count: u64,
    /// When an open breaker lets the next probe through.
    pub next_probe_at: Option<DateTime<Utc>>,
}

impl From<BreakerSnapshot> for BreakerView {
    fn from(snapshot: BreakerSnapshot) -> Self {
        Self {
            state: snapshot.state,
            forced: matches!(snapshot.state, BreakerState::ForcedOpen | BreakerState::ForcedClosed),
            changed_at: snapshot.changed_at,
            opened_count: snapshot.opened_count,
            next_probe_at: snapshot.next_probe_at,
        }
    }
}

/// The admin routes, behind [`require_admin`].
pub fn routes(state: &AppState) -> Router<AppState> {
    let import_limit = import_body_limit(state.settings.http.max_body_bytes);
    Router::new()
        .route("/v1/outbox", get(outbox_report))
        .route("/v1/outbox/tasks", get(list_tasks).delete(purge_tasks))
        .route("/v1/outbox/drain", post(drain))
        .route("/v1/outbox/pause", post(pause))
        .route("/v1/outbox/resume", post(resume))
        .route("/v1/outbox/export", get(export))
        .route(
            "/v1/outbox/import",
            post(import).layer(DefaultBodyLimit::max(import_limit)),
        )
        .route("/v1/dead-letters", get(list_dead_letters).delete(purge_dead_letters))
        .route("/v1/dead-letters/requeue", post(requeue_all_dead_letters))
        .route("/v1/dead-letters/{id}", delete(delete_dead_letter))
        .route("/v1/dead-letters/{id}/requeue", post(requeue_dead_letter))
        .route("/v1/breaker", get(breaker_status))
        .route("/v1/breaker/open", post(force_breaker_open))
        .route("/v1/breaker/close", post(force_breaker_closed))
        .route("/v1/breaker/release", post(release_breaker))
        .route("/v1/verify-workers", post(verify_workers))
        // A route layer: unknown paths stay 404 rather than 401.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_admin))
}

/// Why a caller was refused, before any problem body is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingToken,
    NotBearer,
    WrongToken,
    /// No token configured: only loopback callers in development.
    NotLoopback,
    /// No token configured in production (configuration refuses this; kept
    /// as a second line of defence).
    NoTokenConfigured,
}

/// The authorization rules of the module docs, as a pure function.
pub fn authorize(
    configured_token: &str,
    environment: Environment,
    authorization: Option<&HeaderValue>,
    peer: Option<SocketAddr>,
) -> Result<(), Refusal> {
    if configured_token.is_empty() {
        return match environment {
            Environment::Production => Err(Refusal::NoTokenConfigured),
            // Without the peer address (no connect info), assume the worst.
            Environment::Development if peer.is_some_and(|peer| peer.ip().is_loopback()) => Ok(()),
            Environment::Development => Err(Refusal::NotLoopback),
        };
    }
    let header = authorization.ok_or(Refusal::MissingToken)?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(Refusal::NotBearer)?;
    // `ct_eq` on slices of different lengths answers at once; only the
    // length can leak, never a prefix.
    if bool::from(presented.as_bytes().ct_eq(configured_token.as_bytes())) {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

fn refusal_response(refusal: Refusal) -> Response {
    let (status, slug, title, detail) = match refusal {
        Refusal::MissingToken => (
            StatusCode::UNAUTHORIZED,
            "admin-token-missing",
            "Admin token required",
            "send the admin token as `Authorization: Bearer <http.admin_token>`",
        ),
        Refusal::NotBearer => (
            StatusCode::UNAUTHORIZED,
            "admin-token-missing",
            "Admin token required",
            "the Authorization header must use the Bearer scheme: `Authorization: Bearer <http.admin_token>`",
        ),
        Refusal::WrongToken => (
            StatusCode::FORBIDDEN,
            "admin-token-wrong",
            "Wrong admin token",
            "the bearer token does not match http.admin_token",
        ),
        Refusal::NotLoopback => (
            StatusCode::FORBIDDEN,
            "admin-loopback-only",
            "Admin API limited to loopback",
            "no admin token is configured, so only callers on this host (loopback) may use the admin API; \
             set http.admin_token (or TASKGATE_HTTP__ADMIN_TOKEN) to allow others",
        ),
        Refusal::NoTokenConfigured => (
            StatusCode::FORBIDDEN,
            "admin-token-unset",
            "Admin API disabled",
            "production requires http.admin_token; the admin API is closed without it",
        ),
    };
    let mut response = Problem::new(status, slug, title, detail).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"taskgate admin\""),
        );
    }
    response
}

async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| *address);
    match authorize(
        &state.settings.http.admin_token,
        state.settings.environment,
        request.headers().get(header::AUTHORIZATION),
        peer,
    ) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::warn!(?refusal, ?peer, path = %request.uri().path(), "admin request refused");
            refusal_response(refusal)
        }
    }
}

/// Runs `work` on the blocking pool (it walks sled).
async fn blocking<T: Send + 'static>(
    outbox: &Arc<Outbox>,
    work: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, Problem> {
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || work(&outbox))
        .await
        .map_err(|error| internal(format!("outbox operation failed: {error}")))?
        .map_err(outbox_problem)
}

/// Makes the operation's changes durable before it is reported done.
async fn flushed(outbox: &Outbox) -> Result<(), Problem> {
    outbox.flush().await.map_err(outbox_problem)
}

fn internal(detail: String) -> Problem {
    tracing::error!(%detail, "admin operation failed");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", detail)
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Problem> {
    query
        .map(|Query(value)| value)
        .map_err(|rejection| Problem::invalid_field(None, rejection.body_text()))
}

fn page_limit(limit: Option<usize>) -> Result<usize, Problem> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
        Some(limit) => Err(Problem::invalid_field(
            Some("limit".into()),
            format!("limit must be 1 to {MAX_PAGE}, not {limit}"),
        )),
    }
}

async fn outbox_report(
    State(state): State<AppState>,
) -> Result<Json<crate::outbox::operations::OutboxReport>, Problem> {
    let paused = state.relay.is_paused();
    blocking(&state.outbox, move |outbox| outbox.report(paused))
        .await
        .map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list_tasks(
    State(state): State<AppState>,
    params: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<TaskPage>, Problem> {
    let params = query(params)?;
    let limit = page_limit(params.limit)?;
    let cursor = params
        .cursor
        .as_deref()
        .map(PendingCursor::decode)
        .transpose()
        .map_err(|error| Problem::invalid_field(Some("cursor".into()), error.to_string()))?;
    let page = blocking(&state.outbox, move |outbox| outbox.list_pending(cursor.as_ref(), limit)).await?;
    Ok(Json(TaskPage {
        tasks: page.records,
        next_cursor: page.next.map(|cursor| cursor.encode()),
    }))
}

async fn purge_tasks(State(state): State<AppState>) -> Result<Json<Purged>, Problem> {
    // The relay must not complete entries removed under it.
    let _rounds = state.relay.hold_rounds().await;
    let purged = blocking(&state.outbox, |outbox| outbox.purge_pending()).await?;
    flushed(&state.outbox).await?;
    tracing::warn!(purged, "outbox purged by an operator");
    Ok(Json(Purged { purged }))
}

async fn drain(State(state): State<AppState>) -> Result<(StatusCode, Json<DrainStarted>), Problem> {
    if state.relay.is_paused() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "relay-paused",
            "Relay paused",
            "the relay is paused; resume it (POST /v1/outbox/resume) before draining",
        ));
    }
    let breaker = state.breaker.snapshot().state;
    if breaker == BreakerState::ForcedOpen {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "breaker-forced-open",
            "Breaker forced open",
            "the breaker is forced open; close or release it (POST /v1/breaker/release) before draining",
        ));
    }
    state.relay.probe_now();
    tracing::info!(
        depth = state.outbox.depth(),
        breaker = breaker.as_str(),
        "drain requested"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(DrainStarted {
            depth: state.outbox.depth(),
            breaker,
            probe_requested: true,
        }),
    ))
}

/// Saves and applies an operator's hold ([`crate::relay::Relay::change_holds`]); a hold
/// that could not be saved is a problem and changes nothing.
async fn change_holds(
    state: &AppState,
    change: impl FnOnce(&mut OperatorHolds) + Send + 'static,
) -> Result<OperatorHolds, Problem> {
    let relay = state.relay.clone();
    tokio::task::spawn_blocking(move || relay.change_holds(change))
        .await
        .map_err(|error| internal(format!("saving the operator's hold failed: {error}")))?
        .map_err(|error| {
            tracing::error!(%error, "an operator's hold could not be saved");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbox-unavailable",
                "Outbox unavailable",
                format!("the hold could not be saved in the outbox, so nothing changed: {error}"),
            )
            .retry_after(1)
        })
}

async fn pause(State(state): State<AppState>) -> Result<Json<RelayPause>, Problem> {
    let holds = change_holds(&state, |holds| holds.relay_paused = true).await?;
    tracing::warn!("relay paused by an operator: tasks spool in the outbox, also across restarts, until resumed");
    Ok(Json(RelayPause {
        paused: holds.relay_paused,
    }))
}

async fn resume(State(state): State<AppState>) -> Result<Json<RelayPause>, Problem> {
    let holds = change_holds(&state, |holds| holds.relay_paused = false).await?;
    tracing::info!("relay resumed by an operator");
    Ok(Json(RelayPause {
        paused: holds.relay_paused,
    }))
}

/// NDJSON, one task per line, streamed page by page: the response holds at
/// most one page in memory however deep the outbox is.
async fn export(State(state): State<AppState>) -> Response {
    let depth = state.outbox.depth();
    let outbox = state.outbox.clone();
    // State: the cursor to continue from, or `None` once finished.
    let pages = futures_util::stream::try_unfold(Some(None::<PendingCursor>), move |position| {
        let outbox = outbox.clone();
        async move {
            let Some(cursor) = position else {
                return Ok(None);
            };
            let page = tokio::task::spawn_blocking(move || outbox.export_page(cursor.as_ref(), EXPORT_PAGE))
                .await
                .map_err(std::io::Error::other)?
                .map_err(|error| {
                    // The client sees a truncated stream, never a short
                    // file that looks complete.
                    tracing::error!(%error, "outbox export failed");
                    std::io::Error::other(error)
                })?;
            let mut chunk = Vec::with_capacity(page.records.len() * 512);
            for record in &page.records {
                serde_json::to_writer(&mut chunk, record).map_err(std::io::Error::other)?;
                chunk.push(b'\n');
            }
            Ok::<_, std::io::Error>(Some((Bytes::from(chunk), page.next.map(Some))))
        }
    });
    let mut response = Body::from_stream(pages).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON_CONTENT_TYPE));
    headers.insert(DEPTH_HEADER, HeaderValue::from(depth));
    response
}

/// NDJSON in the export's shape. The whole request is validated before
/// anything is written, and written as one atomic accept: a bad line
/// changes nothing. Tasks whose id this gateway knows are skipped.
async fn import(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ImportOutcome>, Problem> {
    let body = body.map_err(|rejection| {
        Problem::new(
            rejection.status(),
            "unreadable-body",
            "Unreadable import body",
            format!(
                "{} (send an export in chunks; `taskgate outbox import` does)",
                rejection.body_text()
            ),
        )
    })?;
    let tasks = parse_import(&state, &body)?;
    let count = tasks.len();
    let outcome: ImportOutcome = state.outbox.import(tasks).await.map_err(outbox_problem)?;
    tracing::info!(
        lines = count,
        imported = outcome.imported,
        skipped = outcome.skipped,
        "outbox import"
    );
    Ok(Json(outcome))
}

fn parse_import(state: &AppState, body: &[u8]) -> Result<Vec<(Task, Vec<Lane>)>, Problem> {
    let mut tasks = Vec::new();
    for (index, line) in body.split(|byte| *byte == b'\n').enumerate() {
        let line_number = index + 1;
        let field = || Some(format!("line {line_number}"));
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: OutboxRecord = serde_json::from_slice(line).map_err(|error| {
            Problem::invalid_field(field(), format!("line {line_number}: not an exported task: {error}"))
        })?;
        let mut task = record.task;
        routing::validate_routing_key(&task.routing_key)
            .map_err(|message| Problem::invalid_field(field(), format!("line {line_number}: {message}")))?;
        state
            .registry
            .bind(&task.task, &task.args, &task.kwargs)
            .map_err(|error| Problem::invalid_field(field(), format!("line {line_number}: {error}")))?;
        // This gateway's routing decides where the task goes now.
        task.queues = state.router.route(&task.routing_key);
        if task.queues.is_empty() {
            return Err(Problem::invalid_field(
                field(),
                format!(
                    "line {line_number}: no queue of this gateway is bound to routing key {:?}",
                    task.routing_key
                ),
            ));
        }
        let lanes = state.publisher.lanes_for(&task);
        tasks.push((task, lanes));
    }
    Ok(tasks)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    limit: Option<usize>,
    after: Option<u64>,
}

async fn list_dead_letters(
    State(state): State<AppState>,
    params: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Json<DeadLetterPage>, Problem> {
    let params = query(params)?;
    let limit = page_limit(params.limit)?;
    let after = params.after;
    let letters = blocking(&state.outbox, move |outbox| outbox.dead_letters(after, limit)).await?;
    let next_after = (letters.len() == limit)
        .then(|| letters.last().map(|letter| letter.sequence))
        .flatten();
    Ok(Json(DeadLetterPage {
        dead_letters: letters.into_iter().map(DeadLetterEntry::from).collect(),
        next_after,
    }))
}

fn dead_letter_id(text: &str) -> Result<u64, Problem> {
    text.parse()
        .map_err(|_| Problem::not_found(format!("{text:?} is not a dead-letter id (a number, as listed)")))
}

fn dead_letter_problem(error: DeadLetterError) -> Problem {
    match error {
        DeadLetterError::NotFound(id) => Problem::not_found(format!("there is no dead letter {id}")),
        DeadLetterError::Undecodable(_) => Problem::new(
            StatusCode::CONFLICT,
            "dead-letter-undecodable",
            "Dead letter cannot be requeued",
            error.to_string(),
        ),
        DeadLetterError::Outbox(error) => outbox_problem(error),
    }
}

async fn requeue_dead_letter(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterEntry>, Problem> {
    let id = dead_letter_id(&id)?;
    let outbox = state.outbox.clone();
    let entry = tokio::task::spawn_blocking(move || outbox.requeue_dead_letter(id))
        .await
        .map_err(|error| internal(format!("requeue failed: {error}")))?
        .map_err(dead_letter_problem)?;
    flushed(&state.outbox).await?;
    Ok(Json(entry))
}

async fn requeue_all_dead_letters(State(state): State<AppState>) -> Result<Json<RequeueOutcome>, Problem> {
    let outcome: RequeueOutcome = blocking(&state.outbox, |outbox| outbox.requeue_all_dead_letters()).await?;
    flushed(&state.outbox).await?;
    Ok(Json(outcome))
}

async fn delete_dead_letter(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterEntry>, Problem> {
    let id = dead_letter_id(&id)?;
    let entry = blocking(&state.outbox, move |outbox| outbox.delete_dead_letter(id))
        .await?
        .ok_or_else(|| Problem::not_found(format!("there is no dead letter {id}")))?;
    flushed(&state.outbox).await?;
    Ok(Json(entry))
}

async fn purge_dead_letters(State(state): State<AppState>) -> Result<Json<Purged>, Problem> {
    let purged = blocking(&state.outbox, |outbox| outbox.purge_dead_letters()).await?;
    flushed(&state.outbox).await?;
    tracing::warn!(purged, "dead letters purged by an operator");
    Ok(Json(Purged { purged }))
}

async fn breaker_status(State(state): State<AppState>) -> Json<BreakerView> {
    Json(BreakerView::from(state.breaker.snapshot()))
}

async fn force_breaker_open(State(state): State<AppState>) -> Result<Json<BreakerView>, Problem> {
    set_breaker_override(&state, Some(BreakerOverride::Open)).await
}

async fn force_breaker_closed(State(state): State<AppState>) -> Result<Json<BreakerView>, Problem> {
    set_breaker_override(&state, Some(BreakerOverride::Closed)).await
}

async fn release_breaker(State(state): State<AppState>) -> Result<Json<BreakerView>, Problem> {
    set_breaker_override(&state, None).await
}

async fn set_breaker_override(state: &AppState, wanted: Option<BreakerOverride>) -> Result<Json<BreakerView>, Problem> {
    change_holds(state, move |holds| holds.breaker = wanted).await?;
    match wanted {
        Some(BreakerOverride::Open) => {
            tracing::warn!("breaker forced open by an operator: nothing is published until it is closed or released")
        }
        Some(BreakerOverride::Closed) => {
            state.relay.probe_now();
            tracing::warn!("breaker forced closed by an operator: failures no longer open it until released");
        }
        None => {
            state.relay.probe_now();
            tracing::info!("breaker released to automatic operation");
        }
    }
    Ok(Json(BreakerView::from(state.breaker.snapshot())))
}

/// Probes every (or every asked) queue and waits for the workers' traces,
/// bounded by the request's `timeout_seconds`. The body is read before
/// anything is sent, so the request timeout never cuts it (a probe was
/// accepted: the report is the whole truth; see `http/server.rs`).
async fn verify_workers(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VerifyReport>, Problem> {
    let body = body.map_err(|rejection| {
        Problem::new(
            rejection.status(),
            "unreadable-body",
            "Unreadable body",
            rejection.body_text(),
        )
    })?;
    let request: VerifyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        VerifyRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| Problem::malformed_json(error.to_string()))?
    };
    let gateway = verify::Gateway {
        settings: &state.settings,
        router: &state.router,
        outbox: &state.outbox,
        publisher: state.publisher.as_ref(),
        tracking: &state.tracking,
    };
    verify::verify_workers(gateway, request)
        .await
        .map(Json)
        .map_err(|error| match error {
            VerifyError::Timeout(_) => Problem::invalid_field(Some("timeout_seconds".into()), error.to_string()),
            VerifyError::UnknownQueue { .. } => Problem::invalid_field(Some("queues".into()), error.to_string()),
            VerifyError::Unroutable { .. } | VerifyError::Intake { .. } => {
                Problem::invalid_field(Some("queues".into()), error.to_string())
            }
            VerifyError::Outbox(error) => outbox_problem(error),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn token_rules() {
        let remote: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let dev = Environment::Development;
        assert_eq!(authorize("s3cret", dev, Some(&bearer("s3cret")), Some(remote)), Ok(()));
        assert_eq!(
            authorize("s3cret", dev, Some(&HeaderValue::from_static("bearer s3cret")), None),
            Ok(()),
            "the scheme is case-insensitive"
        );
        assert_eq!(authorize("s3cret", dev, None, Some(local)), Err(Refusal::MissingToken));
        assert_eq!(
            authorize(
                "s3cret",
                dev,
                Some(&HeaderValue::from_static("Basic czNjcmV0")),
                Some(local)
            ),
            Err(Refusal::NotBearer)
        );
        assert_eq!(
            authorize("s3cret", dev, Some(&bearer("s3cre")), Some(local)),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            authorize("s3cret", dev, Some(&bearer("s3cretX")), Some(local)),
            Err(Refusal::WrongToken)
        );
        // No token: loopback only, in development only.
        assert_eq!(authorize("", dev, None, Some(local)), Ok(()));
        assert_eq!(authorize("", dev, None, Some("[::1]:9".parse().unwrap())), Ok(()));
        assert_eq!(authorize("", dev, None, Some(remote)), Err(Refusal::NotLoopback));
        assert_eq!(authorize("", dev, None, None), Err(Refusal::NotLoopback));
        assert_eq!(
            authorize("", Environment::Production, None, Some(local)),
            Err(Refusal::NoTokenConfigured)
        );
    }

    #[test]
    fn refusals_are_problems_and_401_asks_for_bearer() {
        let response = refusal_response(Refusal::MissingToken);
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/problem+json");
        assert!(response.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(refusal_response(Refusal::WrongToken).status(), StatusCode::FORBIDDEN);
    }
}
