//! The OpenAPI 3.1 description of the HTTP API, served at `GET /openapi.json`.
//!
//! Built from code with utoipa: every body schema is derived from the type
//! the handler decodes or sends ([`TaskRequest`], [`BatchRequest`],
//! [`AcceptedTask`], [`TaskStatus`], [`HealthReport`], [`Probe`], the
//! problem details, the admin answers), so the document describes what is
//! on the wire and nothing else; the operations are assembled with
//! utoipa's builders here, so that the route files carry no documentation
//! macros. This file defines no body types of its own.
//!
//! Invariants, enforced by `tests/openapi.rs`: every `.route("…")`
//! registered under `src/http/` is documented here with the same methods and
//! nothing else is; each response schema has exactly the fields of the live
//! response it describes.

use super::admin::{BreakerView, DeadLetterPage, DrainStarted, Purged, RelayPause, TaskPage};
use super::health::{Probe, HEALTH_CONTENT_TYPE};
use super::problem::{ProblemDetails, PROBLEM_CONTENT_TYPE};
use super::tasks::{
    AcceptedBatch, AcceptedChord, AcceptedGroup, AcceptedTask, BatchRequest, GroupRequest, TaskStatus, TrackedTaskPage,
};
use crate::health::HealthReport;
use crate::outbox::operations::{DeadLetterEntry, ImportOutcome, OutboxReport, QueueReport, RequeueOutcome};
use crate::task::TaskRequest;
use crate::verify::{Check, CheckReport, QueueVerification, VerifyReport, VerifyRequest};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::OnceLock;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Ref, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::RefOr;
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HeaderBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Required,
    ResponseBuilder,
};
use utoipa::{PartialSchema, ToSchema};

pub const PATH: &str = "/openapi.json";
const JSON: &str = "application/json";
/// The answer when an operator's hold could not be saved (nothing changed).
const HOLD_NOT_SAVED: &str = "The hold could not be saved in the outbox; nothing changed";

/// A reference to `T`'s component: named by the type, so a renamed or
/// missing schema fails to compile rather than dangle.
fn content<T: ToSchema>() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(T::name())))
        .build()
}

fn text_content() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Schema::Object(
            ObjectBuilder::new().schema_type(Type::String).build(),
        )))
        .build()
}

fn json_response<T: ToSchema>(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(JSON, content::<T>())
        .build()
}

fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_CONTENT_TYPE, content::<ProblemDetails>())
        .build()
}

fn retry_after_problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_CONTENT_TYPE, content::<ProblemDetails>())
        .header(
            header::RETRY_AFTER.as_str(),
            HeaderBuilder::new()
                .schema(Some(Schema::Object(
                    ObjectBuilder::new().schema_type(Type::Integer).build(),
                )))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        )
        .build()
}

fn string_schema(format: Option<SchemaFormat>) -> Schema {
    Schema::Object(ObjectBuilder::new().schema_type(Type::String).format(format).build())
}

fn idempotency_key() -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "1 to 255 visible ASCII characters. A retry of the same request with the same key within \
             24 hours gets the first answer again instead of a second task; the key sent with a \
             different request is refused with 422.",
        ))
        .schema(Some(string_schema(None)))
        .build()
}

/// The errors every task-accepting route can answer with (the edge's are
/// added to every operation by [`add_edge_responses`]).
fn accept_errors(operation: OperationBuilder) -> OperationBuilder {
    operation
        // Open without http.submit_token; with it, the bearer token.
        .security(SecurityRequirement::default())
        .security(SecurityRequirement::new(SUBMIT_SECURITY, Vec::<String>::new()))
        .response("400", problem("Malformed JSON, or an invalid Idempotency-Key"))
        .response(
            "401",
            ResponseBuilder::new()
                .description(
                    "http.submit_token is set and the request has no `Authorization: Bearer` header with it \
                     (or with the admin token)",
                )
                .content(PROBLEM_CONTENT_TYPE, content::<ProblemDetails>())
                .header(
                    header::WWW_AUTHENTICATE.as_str(),
                    HeaderBuilder::new()
                        .schema(Some(string_schema(None)))
                        .description(Some("`Bearer realm=\"taskgate\"`"))
                        .build(),
                )
                .build(),
        )
        .response("409", problem("The client-chosen task id was already accepted"))
        .response(
            "413",
            problem("The body exceeds http.max_body_bytes, or (SQS) a task's message would exceed SQS's 1 MiB limit"),
        )
        .response(
            "422",
            problem(
                "Wrong types, unknown task, arguments that do not bind, unroutable, or an Idempotency-Key \
                 reused for a different request; `field` names the field (or the header)",
            ),
        )
        .response(
            "503",
            retry_after_problem(
                "Not accepted: the outbox is full, or its store failed (then nothing is accepted until a \
                 restart; health says so in outbox:storage); retry after Retry-After",
            ),
        )
}

/// An object schema from `(name, type, description)` rows, for bodies whose
/// types live in files that carry no documentation derives. A type ending
/// in `?` may be null and is not required; `array` and `object` are untyped
/// inside.
fn object(description: &str, fields: &[(&str, &str, &str)]) -> Schema {
    let mut builder = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description));
    for (name, kind, text) in fields {
        let (kind, nullable) = match kind.strip_suffix('?') {
            Some(kind) => (kind, true),
            None => (*kind, false),
        };
        let kind = match kind {
            "integer" => Type::Integer,
            "number" => Type::Number,
            "boolean" => Type::Boolean,
            "array" => Type::Array,
            "object" => Type::Object,
            _ => Type::String,
        };
        let schema_type: SchemaType = if nullable {
            [kind, Type::Null].into_iter().collect()
        } else {
            SchemaType::Type(kind)
        };
        let property = ObjectBuilder::new().schema_type(schema_type).description(Some(*text));
        builder = builder.property(*name, property);
        if !nullable {
            builder = builder.required(*name);
        }
    }
    Schema::Object(builder.build())
}

fn inline_json(description: &str, schema: Schema) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(JSON, ContentBuilder::new().schema(Some(schema)).build())
        .build()
}

fn query(name: &str, kind: Type, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(Schema::Object(ObjectBuilder::new().schema_type(kind).build())))
        .build()
}

fn path_parameter(name: &str, kind: Type, description: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(Schema::Object(ObjectBuilder::new().schema_type(kind).build())))
        .build()
}

const ADMIN_SECURITY: &str = "admin_token";
const SUBMIT_SECURITY: &str = "submit_token";

/// The refusals of the edge (`src/http/guard.rs`, `src/http/server.rs`),
/// added to every operation where they can happen, so that no route can be
/// documented without them.
fn add_edge_responses(document: &mut OpenApi) {
    use utoipa::openapi::path::Operation;
    fn add(operation: &mut Operation, status: &str, response: utoipa::openapi::Response) {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert(RefOr::T(response));
    }
    for (path, item) in document.paths.paths.iter_mut() {
        let is_stream = matches!(path.as_str(), "/v1/health/stream" | "/v1/tasks/{id}/events");
        let reads = [&mut item.get, &mut item.head, &mut item.options, &mut item.trace];
        for operation in reads.into_iter().flatten() {
            add(
                operation,
                "421",
                problem("The Host header is not a loopback name nor one of http.allowed_hosts"),
            );
            if !is_stream {
                add(
                    operation,
                    "408",
                    problem("No answer within http.request_timeout_ms of the request header"),
                );
            }
        }
        let media = match path.as_str() {
            "/v1/tasks" | "/v1/tasks/batch" | "/v1/groups" => {
                "The request is not sent as Content-Type: application/json"
            }
            "/v1/outbox/import" => "A body, or a Content-Type, other than application/x-ndjson",
            _ => "A body, or a Content-Type, other than application/json (a body-less request needs none)",
        };
        let writes = [&mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
        for operation in writes.into_iter().flatten() {
            add(
                operation,
                "421",
                problem("The Host header is not a loopback name nor one of http.allowed_hosts; nothing was changed"),
            );
            add(
                operation,
                "408",
                problem(
                    "The request body was not received within http.request_timeout_ms of the header; nothing \
                     was changed (a request received in full is always answered by its handler)",
                ),
            );
            add(operation, "415", problem(media));
            const CROSS_SITE: &str = "a cross-site request: Sec-Fetch-Site: cross-site, or an Origin that \
                                      is neither this gateway's own nor a host of http.allowed_hosts \
                                      (Origin: null included); nothing was changed";
            match operation.responses.responses.get_mut("403") {
                Some(RefOr::T(existing)) => existing.description = format!("{}; or {CROSS_SITE}", existing.description),
                _ => add(operation, "403", problem(&format!("Refused: {CROSS_SITE}"))),
            }
        }
    }
}

/// An admin operation: Bearer token, and the refusals of the admin guard.
fn admin(id: &str, summary: &str) -> OperationBuilder {
    operation(id, "admin", summary)
        .security(SecurityRequirement::new(ADMIN_SECURITY, Vec::<String>::new()))
        .response(
            "401",
            problem("No `Authorization: Bearer` header (with http.admin_token set)"),
        )
        .response(
            "403",
            problem("Wrong token, or no token configured and the caller is not on loopback"),
        )
}

fn admin_paths(paths: PathsBuilder) -> PathsBuilder {
    let page = [
        query("limit", Type::Integer, "Entries per page, 1 to 1000 (default 100)"),
        query("cursor", Type::String, "`next_cursor` of the previous page"),
    ];
    let paused = || json_response::<RelayPause>("The relay's state");
    let purged = |what: &str| json_response::<Purged>(what);
    let breaker = || json_response::<BreakerView>("The breaker");
    let requeued = || json_response::<RequeueOutcome>("Requeued at the tail of their lanes");
    paths
        .path(
            "/v1/outbox",
            PathItem::new(
                HttpMethod::Get,
                admin("outbox_report", "Outbox figures, per queue")
                    .response("200", json_response::<OutboxReport>("Depth, bytes and age")),
            ),
        )
        .path(
            "/v1/outbox/tasks",
            PathItem::new(
                HttpMethod::Get,
                admin("list_outbox_tasks", "Waiting tasks, in publish order, paged")
                    .parameters(Some(page.clone()))
                    .response("400", problem("Invalid query or cursor"))
                    .response("200", json_response::<TaskPage>("One page")),
            )
            .and(
                HttpMethod::Delete,
                admin("purge_outbox_tasks", "Remove every waiting task (they are lost)")
                    .response("200", purged("Removed")),
            ),
        )
        .path(
            "/v1/outbox/drain",
            PathItem::new(
                HttpMethod::Post,
                admin("drain", "Probe the broker now, even with the breaker open")
                    .response("202", json_response::<DrainStarted>("The probe is on its way"))
                    .response("409", problem("The relay is paused, or the breaker forced open")),
            ),
        )
        .path(
            "/v1/outbox/pause",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "pause",
                    "Pause publishing, also across restarts; tasks are still accepted",
                )
                .response("200", paused())
                .response("503", retry_after_problem(HOLD_NOT_SAVED)),
            ),
        )
        .path(
            "/v1/outbox/resume",
            PathItem::new(
                HttpMethod::Post,
                admin("resume", "Resume publishing")
                    .response("200", paused())
                    .response("503", retry_after_problem(HOLD_NOT_SAVED)),
            ),
        )
        .path(
            "/v1/outbox/export",
            PathItem::new(
                HttpMethod::Get,
                admin("export", "Every waiting task as NDJSON, streamed").response(
                    "200",
                    ResponseBuilder::new()
                        .description("One JSON task record per line; `x-taskgate-outbox-depth` gives the count")
                        .content("application/x-ndjson", text_content())
                        .build(),
                ),
            ),
        )
        .path(
            "/v1/outbox/import",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "import",
                    "Accept the NDJSON of an export, routed with this gateway's settings",
                )
                .request_body(Some(
                    RequestBodyBuilder::new()
                        .required(Some(Required::True))
                        .content("application/x-ndjson", text_content())
                        .build(),
                ))
                .response("200", json_response::<ImportOutcome>("Imported"))
                .response("400", problem("A line is not a task record; nothing was imported"))
                .response("422", problem("A task does not pass intake here; nothing was imported")),
            ),
        )
        .path(
            "/v1/dead-letters",
            PathItem::new(
                HttpMethod::Get,
                admin("list_dead_letters", "Dead letters with their reasons, paged")
                    .parameters(Some([
                        query("limit", Type::Integer, "Entries per page, 1 to 1000 (default 100)"),
                        query("after", Type::Integer, "`next_after` of the previous page"),
                    ]))
                    .response("200", json_response::<DeadLetterPage>("One page"))
                    .response("400", problem("Invalid query")),
            )
            .and(
                HttpMethod::Delete,
                admin("purge_dead_letters", "Delete every dead letter").response("200", purged("Deleted")),
            ),
        )
        .path(
            "/v1/dead-letters/requeue",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "requeue_all_dead_letters",
                    "Requeue every dead letter that can be decoded",
                )
                .response("200", requeued()),
            ),
        )
        .path(
            "/v1/dead-letters/{id}",
            PathItem::new(
                HttpMethod::Delete,
                admin("delete_dead_letter", "Delete one dead letter")
                    .parameter(path_parameter("id", Type::Integer, "The dead letter's id"))
                    .response("200", json_response::<DeadLetterEntry>("The deleted dead letter"))
                    .response("404", problem("No such dead letter")),
            ),
        )
        .path(
            "/v1/dead-letters/{id}/requeue",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "requeue_dead_letter",
                    "Put one dead letter back at the tail of its lane",
                )
                .parameter(path_parameter("id", Type::Integer, "The dead letter's id"))
                .response(
                    "200",
                    json_response::<DeadLetterEntry>("The dead letter, now back in the outbox"),
                )
                .response("404", problem("No such dead letter"))
                .response("409", problem("Its record cannot be decoded: it can only be deleted")),
            ),
        )
        .path(
            "/v1/breaker",
            PathItem::new(
                HttpMethod::Get,
                admin("breaker_status", "The circuit breaker's state").response("200", breaker()),
            ),
        )
        .path(
            "/v1/breaker/open",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "force_breaker_open",
                    "Force the breaker open (maintenance), also across restarts: tasks spool",
                )
                .response("200", breaker())
                .response("503", retry_after_problem(HOLD_NOT_SAVED)),
            ),
        )
        .path(
            "/v1/breaker/close",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "force_breaker_closed",
                    "Force the breaker closed, also across restarts: publish whatever happens",
                )
                .response("200", breaker())
                .response("503", retry_after_problem(HOLD_NOT_SAVED)),
            ),
        )
        .path(
            "/v1/breaker/release",
            PathItem::new(
                HttpMethod::Post,
                admin("release_breaker", "End a forced state; the breaker decides again")
                    .response("200", breaker())
                    .response("503", retry_after_problem(HOLD_NOT_SAVED)),
            ),
        )
        .path(
            "/v1/verify-workers",
            PathItem::new(
                HttpMethod::Post,
                admin(
                    "verify_workers",
                    "Send a probe task to each queue and check the workers that run it",
                )
                .description(Some(
                    "For each configured queue (or each of `queues`), accepts a `taskgate.probe` task                      (registered in the worker by taskgate_client.worker.register_probe) through the outbox                      and waits up to `timeout_seconds` (default 30) for four checks: a worker consumed it;                      its result reached celery_taskmeta; the task it scheduled itself reached the tracking                      queue and table; the worker's exchange and queue declarations match GET /v1/topology.                      Answers 200 with the report whether or not the checks pass (`passed`); the request                      timeout does not cut it. The body is optional.",
                ))
                .request_body(Some(
                    RequestBodyBuilder::new()
                        .required(Some(Required::False))
                        .content(JSON, content::<VerifyRequest>())
                        .build(),
                ))
                .response("200", json_response::<VerifyReport>("The report, one entry per queue"))
                .response("400", problem("Malformed JSON"))
                .response(
                    "422",
                    problem("timeout_seconds out of 1 to 300, or a queue that is not configured"),
                )
                .response("503", retry_after_problem("The outbox could not take the probes")),
            ),
        )
}

/// A second method on a path: `PathItem::new(GET, …).and(DELETE, …)`.
trait AddOperation {
    fn and(self, method: HttpMethod, operation: OperationBuilder) -> PathItem;
}

impl AddOperation for PathItem {
    fn and(mut self, method: HttpMethod, operation: OperationBuilder) -> PathItem {
        self.merge_operations(PathItem::new(method, operation));
        self
    }
}

fn operation(id: &str, tag: &str, summary: &str) -> OperationBuilder {
    OperationBuilder::new()
        .operation_id(Some(id))
        .tag(tag)
        .summary(Some(summary))
}

fn paths() -> PathsBuilder {
    let accepted_headers = |response: ResponseBuilder| {
        response.header(
            header::LOCATION.as_str(),
            HeaderBuilder::new()
                .schema(Some(string_schema(None)))
                .description(Some("/v1/tasks/{id} of the accepted task"))
                .build(),
        )
    };
    PathsBuilder::new()
        .path(
            "/v1/tasks",
            PathItem::new(
                HttpMethod::Post,
                accept_errors(
                    operation("post_task", "tasks", "Enqueue one task")
                        .description(Some(
                            "Validates the task against the registry, routes it, and answers 202 once it is \
                             durable in the outbox. Never waits on the broker.",
                        ))
                        .parameter(idempotency_key())
                        .request_body(Some(
                            RequestBodyBuilder::new()
                                .required(Some(Required::True))
                                .content(JSON, content::<TaskRequest>())
                                .build(),
                        ))
                        .response(
                            "202",
                            accepted_headers(
                                ResponseBuilder::new()
                                    .description("Accepted: durable in the outbox")
                                    .content(JSON, content::<AcceptedTask>()),
                            )
                            .build(),
                        ),
                ),
            )
            .and(
                HttpMethod::Get,
                operation("list_tasks", "tasks", "Tracked tasks, newest first, filtered and paged")
                    .description(Some(
                        "Rows of `background_tasks`: every task taskgate accepted and, with \
                         tracking.sync_queue, every task workers scheduled. Empty filter values mean \
                         \"not given\".",
                    ))
                    .parameters(Some([
                        query("type", Type::String, "Task name"),
                        query("creator_id", Type::String, "properties.creator_id of the request"),
                        query("related_content_type", Type::String, "properties.related_content_type"),
                        query("related_object_id", Type::String, "properties.related_object_id"),
                        query(
                            "status",
                            Type::String,
                            "Tracking status, e.g. PENDING, SUCCESS, FAILURE",
                        ),
                        query("parent_id", Type::String, "Celery parent task id"),
                        query("root_id", Type::String, "Celery root task id"),
                        query("limit", Type::Integer, "Rows per page, 1 to the maximum (default 50)"),
                        query("cursor", Type::String, "`next_cursor` of the previous page"),
                    ]))
                    .response("200", json_response::<TrackedTaskPage>("One page"))
                    .response("400", problem("Invalid query or cursor"))
                    .response("422", problem("Invalid limit"))
                    .response("503", retry_after_problem("The tracking database cannot be asked")),
            ),
        )
        .path(
            "/v1/tasks/batch",
            PathItem::new(
                HttpMethod::Post,
                accept_errors(
                    operation("post_batch", "tasks", "Enqueue up to 1000 tasks, all or nothing")
                        .description(Some(
                            "Every task passes intake or none is written; all share one outbox flush.",
                        ))
                        .parameter(idempotency_key())
                        .request_body(Some(
                            RequestBodyBuilder::new()
                                .required(Some(Required::True))
                                .content(JSON, content::<BatchRequest>())
                                .build(),
                        ))
                        .response("202", json_response::<AcceptedBatch>("All tasks accepted")),
                ),
            ),
        )
        .path(
            "/v1/groups",
            PathItem::new(
                HttpMethod::Post,
                accept_errors(
                    operation("post_group", "tasks", "Enqueue a Celery group, all or nothing")
                        .description(Some(
                            "Each member gets `group` = the group id and `group_index` = its position, as \
                             Celery's group.apply_async does; every member passes intake or none is written, \
                             in one outbox flush. With `chord`, the body is applied with the members' results once all succeeded \
                             (Celery's chord_unlock, as on the database backend).",
                        ))
                        .parameter(idempotency_key())
                        .request_body(Some(
                            RequestBodyBuilder::new()
                                .required(Some(Required::True))
                                .content(JSON, content::<GroupRequest>())
                                .build(),
                        ))
                        .response(
                            "202",
                            json_response::<AcceptedGroup>("The group and its members accepted"),
                        ),
                ),
            ),
        )
        .path(
            "/v1/tasks/{id}",
            PathItem::new(
                HttpMethod::Get,
                operation("get_task", "tasks", "State of one task")
                    .parameter(
                        ParameterBuilder::new()
                            .name("id")
                            .parameter_in(ParameterIn::Path)
                            .required(Required::True)
                            .schema(Some(string_schema(Some(SchemaFormat::Custom("uuid".into())))))
                            .build(),
                    )
                    .response("200", json_response::<TaskStatus>("The task's state"))
                    .response("404", problem("No task with this id is known"))
                    .response(
                        "503",
                        retry_after_problem(
                            "The outbox does not know the task and the tracking database cannot be asked, or the outbox store has failed and cannot be read (until taskgate restarts)",
                        ),
                    ),
            ),
        )
        .path(
            "/healthz",
            PathItem::new(
                HttpMethod::Get,
                operation("healthz", "health", "Liveness: 200 while the process serves")
                    .response("200", json_response::<Probe>("Alive")),
            ),
        )
        .path(
            "/readyz",
            PathItem::new(
                HttpMethod::Get,
                operation("readyz", "health", "Readiness for a load balancer")
                    .description(Some(
                        "200 while tasks can be accepted (outbox writable and under its limit), else 503. \
                         Independent of the broker: a gateway that spools is still ready.",
                    ))
                    .response("200", json_response::<Probe>("Accepting tasks"))
                    .response(
                        "503",
                        ResponseBuilder::new()
                            .description("Not accepting tasks (outbox full); Retry-After is set")
                            .content(JSON, content::<Probe>())
                            .build(),
                    ),
            ),
        )
        .path(
            "/v1/health",
            PathItem::new(
                HttpMethod::Get,
                operation("health", "health", "Health of the async pipeline")
                    .response(
                        "200",
                        ResponseBuilder::new()
                            .description("`pass` or `warn`")
                            .content(HEALTH_CONTENT_TYPE, content::<HealthReport>())
                            .build(),
                    )
                    .response(
                        "503",
                        ResponseBuilder::new()
                            .description("`fail`: tasks cannot be accepted")
                            .content(HEALTH_CONTENT_TYPE, content::<HealthReport>())
                            .build(),
                    ),
            ),
        )
        .path(
            "/v1/tasks/{id}/events",
            PathItem::new(
                HttpMethod::Get,
                operation("task_events", "tasks", "A task's Celery state as server-sent events")
                    .description(Some(
                        "One `state` event at once, then one per change (a worker's `update_state`, e.g. \
                         `PROGRESS` with its meta as `result`), until `SUCCESS`, `FAILURE` or `REVOKED`, \
                         after which the stream ends; each event's data is the task's `result` object as \
                         `GET /v1/tasks/{id}` shows it (`PENDING` before a worker wrote one). A stream whose \
                         task has not changed for 10 minutes ends.",
                    ))
                    .parameter(path_parameter("id", Type::String, "Celery task id"))
                    .response(
                        "200",
                        ResponseBuilder::new()
                            .description("A text/event-stream that ends with the task")
                            .content("text/event-stream", text_content())
                            .build(),
                    )
                    .response(
                        "503",
                        retry_after_problem(
                            "http.max_event_subscribers clients already follow task streams; a slot frees when \
                             one goes away",
                        ),
                    ),
            ),
        )
        .path(
            "/v1/health/stream",
            PathItem::new(
                HttpMethod::Get,
                operation("health_stream", "health", "Health changes as server-sent events")
                    .description(Some(
                        "One `health` event at once, then one per change of status, availability, broker \
                         connection or breaker state; each event's data is a Health document.",
                    ))
                    .response(
                        "200",
                        ResponseBuilder::new()
                            .description("An endless text/event-stream")
                            .content("text/event-stream", text_content())
                            .build(),
                    )
                    .response(
                        "503",
                        retry_after_problem(
                            "http.max_event_subscribers clients already follow the stream; a slot frees when one \
                             goes away",
                        ),
                    ),
            ),
        )
        .path(
            "/metrics",
            PathItem::new(
                HttpMethod::Get,
                operation("metrics", "health", "Prometheus metrics").response(
                    "200",
                    ResponseBuilder::new()
                        .description("Prometheus text exposition format 0.0.4")
                        .content("text/plain", text_content())
                        .build(),
                ),
            ),
        )
        .path(
            "/v1/topology",
            PathItem::new(
                HttpMethod::Get,
                operation(
                    "topology",
                    "health",
                    "What Celery workers must match: exchange, queues, bindings, tracking queue, routing, result \
                     backend (no secrets)",
                )
                .parameter(query(
                    "format",
                    Type::String,
                    "`topology` (default): the document; `celery`: the Celery settings \
                     `taskgate_client.worker.configure` applies",
                ))
                .response(
                    "200",
                    inline_json(
                        "The topology",
                        object(
                            "Topology",
                            &[
                                (
                                    "broker",
                                    "object",
                                    "`kind` (`amqp` or `sqs`) and where it is, password masked",
                                ),
                                ("exchange", "object", "`name`, `type` (`topic`), `durable`"),
                                (
                                    "queues",
                                    "array",
                                    "`name`, `binding_key`, `durable` (and `sqs_name` on SQS)",
                                ),
                                (
                                    "tracking_queue",
                                    "object?",
                                    "The queue bound `#` that taskgate records from",
                                ),
                                (
                                    "routing",
                                    "object",
                                    "`default_rule` (`first_word`) and per-task routing keys",
                                ),
                                ("result_backend", "object", "Celery's `result_backend` URL, no password"),
                            ],
                        ),
                    ),
                )
                .response("422", problem("Unknown format")),
            ),
        )
        .path(
            "/",
            PathItem::new(
                HttpMethod::Get,
                operation("status_page", "health", "Operator status page").response(
                    "200",
                    ResponseBuilder::new()
                        .description("HTML: health, outbox, breaker and recent tasks at a glance")
                        .content("text/html", text_content())
                        .build(),
                ),
            ),
        )
        .path(
            PATH,
            PathItem::new(
                HttpMethod::Get,
                operation("openapi", "meta", "This document").response(
                    "200",
                    ResponseBuilder::new()
                        .description("OpenAPI 3.1")
                        .content(
                            JSON,
                            ContentBuilder::new()
                                .schema(Some(Schema::Object(
                                    ObjectBuilder::new().schema_type(Type::Object).build(),
                                )))
                                .build(),
                        )
                        .build(),
                ),
            ),
        )
}

/// Descriptions of [`TaskRequest`]'s fields, kept here so that the task
/// domain stays free of documentation attributes. A field missing from this
/// table fails `tests/openapi.rs`.
pub const TASK_REQUEST_FIELDS: &[(&str, &str)] = &[
    ("task", "Celery task name, e.g. `export.project`."),
    ("args", "Positional arguments, as the worker receives them."),
    ("kwargs", "Keyword arguments, as the worker receives them."),
    (
        "id",
        "Client-chosen task id (a UUID); a new v4 UUID when absent. Reusing an accepted id is a 409.",
    ),
    (
        "routing_key",
        "Overrides the routing key (default: the registry's, else the task name up to the first `.`).",
    ),
    ("eta", "RFC 3339 time before which the worker does not run the task."),
    (
        "expires",
        "RFC 3339 time, or seconds from acceptance (Celery's `expires=10`), after which the task is not run.",
    ),
    (
        "countdown",
        "Seconds from now; turned into `eta`. Cannot be combined with `eta`.",
    ),
    ("priority", "Message priority, 0 to 255 (AMQP)."),
    ("parent_id", "Celery parent task id."),
    ("root_id", "Celery root task id (defaults to the task's own id)."),
    ("group", "Celery group id."),
    ("time_limit", "Hard time limit in seconds."),
    ("soft_time_limit", "Soft time limit in seconds."),
    (
        "properties",
        "Extra message properties (e.g. `creator_id`), copied into the message as Celery's \
         `send_task(**options)` does; `message_group_id` selects the SQS FIFO group.",
    ),
    (
        "shadow",
        "Celery's `shadow`: the name logs and monitoring show for the task.",
    ),
    (
        "headers",
        "Extra message headers, after Celery's own; a Celery protocol header name, `CC` or `BCC` is refused.",
    ),
    (
        "ignore_result",
        "Celery's `ignore_result`: the worker stores no result.",
    ),
    ("retries", "Celery's `retries` header (default 0)."),
    ("group_index", "Position of the task in its `group`; needs `group`."),
    (
        "link",
        "Celery signature(s) applied with the result on success (`callbacks`); each task passes the registry.",
    ),
    (
        "link_error",
        "Celery signature(s) applied on failure (`errbacks`); each task passes the registry.",
    ),
    (
        "chain",
        "The rest of a chain, in execution order (sent reversed, as Celery does); each step gets a `task_id`.",
    ),
    (
        "queue",
        "A configured queue: published with its binding key as routing key. Not with `routing_key`.",
    ),
    ("exchange", "Must be the configured exchange; any other is refused."),
];

fn describe(schema: &mut RefOr<Schema>, text: &str) {
    let description = Some(text.to_owned());
    match schema {
        RefOr::T(Schema::Object(object)) => object.description = description,
        RefOr::T(Schema::Array(array)) => array.description = description,
        RefOr::T(Schema::OneOf(one_of)) => one_of.description = description,
        RefOr::T(Schema::AnyOf(any_of)) => any_of.description = description,
        RefOr::T(Schema::AllOf(all_of)) => all_of.description = description,
        RefOr::Ref(reference) => reference.description = text.to_owned(),
        _ => {}
    }
}

fn task_request_schema() -> RefOr<Schema> {
    let mut schema = TaskRequest::schema();
    if let RefOr::T(Schema::Object(object)) = &mut schema {
        for (field, text) in TASK_REQUEST_FIELDS {
            if let Some(property) = object.properties.get_mut(*field) {
                describe(property, text);
            }
        }
        object.example = Some(serde_json::json!({
            "task": "export.project",
            "args": ["org-slug", "proj-slug"],
            "kwargs": {"output_type": "xls"},
            "properties": {"creator_id": "u1", "related_object_id": "p1"}
        }));
    }
    schema
}

/// Builds the document.
pub fn document() -> OpenApi {
    let components = ComponentsBuilder::new()
        .schema_from::<BatchRequest>()
        .schema_from::<AcceptedTask>()
        .schema_from::<AcceptedBatch>()
        .schema_from::<GroupRequest>()
        .schema_from::<AcceptedGroup>()
        .schema_from::<AcceptedChord>()
        .schema_from::<TaskStatus>()
        .schema_from::<TrackedTaskPage>()
        .schema_from::<ProblemDetails>()
        .schema_from::<HealthReport>()
        .schema_from::<Probe>()
        .schema_from::<TaskPage>()
        .schema_from::<DeadLetterPage>()
        .schema_from::<Purged>()
        .schema_from::<RelayPause>()
        .schema_from::<DrainStarted>()
        .schema_from::<BreakerView>()
        .schema_from::<OutboxReport>()
        .schema_from::<QueueReport>()
        .schema_from::<ImportOutcome>()
        .schema_from::<RequeueOutcome>()
        .schema_from::<DeadLetterEntry>()
        .schema_from::<VerifyRequest>()
        .schema_from::<VerifyReport>()
        .schema_from::<QueueVerification>()
        .schema_from::<CheckReport>()
        .schema_from::<Check>()
        // After the derived ones: BatchRequest brought TaskRequest along
        // without the descriptions.
        .schema("TaskRequest", task_request_schema())
        .security_scheme(
            SUBMIT_SECURITY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "http.submit_token (the admin token is accepted too), required by the task-accepting \
                         routes only when it is set.",
                    ))
                    .build(),
            ),
        )
        .security_scheme(
            ADMIN_SECURITY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "http.admin_token. Without one, development admits loopback callers only and \
                         production refuses every admin call.",
                    ))
                    .build(),
            ),
        )
        .build();
    let mut document = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("taskgate")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A resilient broker gateway: tasks posted here are made durable in a local outbox and \
                     published to RabbitMQ or SQS as Celery protocol-v2 messages. Errors are RFC 9457 \
                     application/problem+json. Every request needs a loopback Host (or one of \
                     http.allowed_hosts), else 421; state-changing requests are refused cross-site (403) and \
                     take JSON only (415). A connection past http.max_connections is answered 503 and closed \
                     without running any handler.",
                ))
                .build(),
        )
        .paths(admin_paths(paths()))
        .components(Some(components))
        .tags(Some([
            TagBuilder::new()
                .name("tasks")
                .description(Some("Enqueue and inspect tasks"))
                .build(),
            TagBuilder::new()
                .name("health")
                .description(Some("Probes, health and metrics; none waits on the broker"))
                .build(),
            TagBuilder::new()
                .name("meta")
                .description(Some("This description"))
                .build(),
        ]))
        .build();
    add_edge_responses(&mut document);
    document
}

/// `GET /openapi.json`. The document is rendered once and reused.
pub async fn openapi_json() -> Response {
    static RENDERED: OnceLock<String> = OnceLock::new();
    let body = RENDERED.get_or_init(|| document().to_json().expect("the OpenAPI document serialises"));
    let mut response = (StatusCode::OK, body.clone()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}
