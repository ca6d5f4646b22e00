//! Intake: turns a caller's [`TaskRequest`] into an accepted [`Task`].
//!
//! Every check that can refuse a task happens here, before anything is
//! written: field values, the registry's parameter binding (of the task and
//! of every signature in `link`, `link_error` and `chain`), and routing (a
//! task no queue would receive is refused, since nobody would consume it;
//! `queue` and `exchange` must name the configured topology). Each refusal
//! names the field it is about, for the problem body. Nothing a request
//! asks for is silently dropped: what taskgate cannot honour is refused.

use super::registry::{BindError, Registry};
use super::routing::{self, TopicRouter};
use super::signature::NESTED_SIGNATURE_OPTIONS;
use super::{CelerySignature, ExpiresRequest, SignatureRequest, Task, TaskId, TaskName, TaskRequest};
use chrono::{DateTime, Utc};

/// Why a request was refused; always a client error (HTTP 422).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct IntakeError {
    /// JSON path of the offending field (`args`, `kwargs.output_type`).
    pub field: Option<String>,
    pub message: String,
    pub kind: IntakeErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeErrorKind {
    InvalidField,
    UnknownTask,
    Binding,
    Unroutable,
}

impl IntakeError {
    fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            message: message.into(),
            kind: IntakeErrorKind::InvalidField,
        }
    }
}

impl From<BindError> for IntakeError {
    fn from(error: BindError) -> Self {
        let (kind, field) = match &error {
            BindError::UnknownTask { .. } => (IntakeErrorKind::UnknownTask, Some("task".to_owned())),
            BindError::TooManyPositional { .. } => (IntakeErrorKind::Binding, Some("args".to_owned())),
            BindError::MissingArgument { parameter, .. } => {
                (IntakeErrorKind::Binding, Some(format!("kwargs.{parameter}")))
            }
            BindError::UnexpectedKeyword { parameter, .. } | BindError::MultipleValues { parameter, .. } => {
                (IntakeErrorKind::Binding, Some(format!("kwargs.{parameter}")))
            }
        };
        Self {
            field,
            message: error.to_string(),
            kind,
        }
    }
}

/// Header names Celery's protocol (`AMQP.as_task_v2`) sets, plus the two
/// RabbitMQ acts on. Celery's `send_task(headers=...)` would let a caller
/// overwrite them (`headers2.update(headers)`); taskgate refuses instead,
/// because each has its own request field (or is computed from the task)
/// and an overwritten `id`, `task` or `argsrepr` would make the message say
/// something other than what was accepted, tracked and answered. `CC` and
/// `BCC` are RabbitMQ's sender-selected distribution: they would copy the
/// message to queues routing never chose.
pub const RESERVED_HEADER_NAMES: &[&str] = &[
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
    "CC",
    "BCC",
];

/// Validates, binds and routes one request received at `now`.
pub fn accept(
    request: TaskRequest,
    registry: &Registry,
    router: &TopicRouter,
    now: DateTime<Utc>,
) -> Result<Task, IntakeError> {
    let name = TaskName::parse(&request.task).map_err(|message| IntakeError::field("task", message))?;
    let id = match &request.id {
        Some(text) => TaskId::parse(text).map_err(|_| IntakeError::field("id", format!("{text:?} is not a UUID")))?,
        None => TaskId::generate(),
    };
    let binding = registry.bind(&name, &request.args, &request.kwargs)?;
    if let Some(exchange) = &request.exchange {
        if exchange != router.exchange() {
            return Err(IntakeError::field(
                "exchange",
                format!(
                    "taskgate publishes only to the configured exchange {:?}, not {exchange:?}",
                    router.exchange()
                ),
            ));
        }
    }
    let routing_key = match (&request.queue, &request.routing_key, binding.routing_key) {
        (Some(_), Some(_), _) => {
            return Err(IntakeError::field(
                "queue",
                "give either queue or routing_key, not both",
            ))
        }
        (Some(queue), None, _) => routing_key_of_queue(queue, router)?,
        (None, Some(key), _) => {
            routing::validate_routing_key(key).map_err(|message| IntakeError::field("routing_key", message))?;
            key.clone()
        }
        (None, None, Some(registered)) => registered,
        (None, None, None) => routing::default_routing_key(&name),
    };
    let queues = router.route(&routing_key);
    if queues.is_empty() {
        return Err(IntakeError {
            field: Some("routing_key".into()),
            message: format!(
                "no configured queue is bound to routing key {routing_key:?} on exchange {:?}, so no worker would receive this task",
                router.exchange()
            ),
            kind: IntakeErrorKind::Unroutable,
        });
    }
    let eta = match (request.eta, request.countdown) {
        (Some(_), Some(_)) => {
            return Err(IntakeError::field(
                "countdown",
                "give either eta or countdown, not both",
            ))
        }
        (Some(eta), None) => Some(eta),
        (None, Some(countdown)) => Some(seconds_from(now, countdown, "countdown")?),
        (None, None) => None,
    };
    let expires = match request.expires {
        None => None,
        Some(ExpiresRequest::At(time)) => Some(time),
        // Celery's `expires=10`: counted from acceptance, the moment the
        // caller handed the task over (a spooled task keeps its deadline).
        Some(ExpiresRequest::AfterSeconds(seconds)) => Some(seconds_from(now, seconds, "expires")?),
    };
    for (field, value) in [
        ("time_limit", request.time_limit),
        ("soft_time_limit", request.soft_time_limit),
    ] {
        if let Some(value) = value {
            if !value.is_finite() || value <= 0.0 {
                return Err(IntakeError::field(field, "must be a positive number of seconds"));
            }
        }
    }
    for (field, value) in [
        ("parent_id", &request.parent_id),
        ("root_id", &request.root_id),
        ("group", &request.group),
        ("shadow", &request.shadow),
    ] {
        if let Some(value) = value {
            if value.is_empty() || value.len() > 255 {
                return Err(IntakeError::field(field, "must be 1 to 255 bytes"));
            }
        }
    }
    if request.group_index.is_some() && request.group.is_none() {
        return Err(IntakeError::field(
            "group_index",
            "is a position in a group: give group as well",
        ));
    }
    check_extra_headers(&request.headers)?;
    let link = request
        .link
        .map(|link| accept_signatures(link.into_items_with_paths("link"), StepKind::Callback, registry))
        .transpose()?;
    let link_error = request
        .link_error
        .map(|link_error| {
            accept_signatures(
                link_error.into_items_with_paths("link_error"),
                StepKind::Errback,
                registry,
            )
        })
        .transpose()?;
    let chain = request
        .chain
        .map(|chain| {
            let items = chain
                .into_iter()
                .enumerate()
                .map(|(index, step)| (format!("chain[{index}]"), step))
                .collect();
            accept_signatures(items, StepKind::ChainStep, registry)
        })
        .transpose()?;
    Ok(Task {
        id,
        task: name,
        args: request.args,
        kwargs: request.kwargs,
        routing_key,
        queues,
        eta,
        expires,
        priority: request.priority,
        parent_id: request.parent_id,
        root_id: request.root_id,
        group: request.group,
        time_limit: request.time_limit,
        soft_time_limit: request.soft_time_limit,
        properties: request.properties,
        accepted_at: now,
        shadow: request.shadow,
        headers: request.headers,
        ignore_result: request.ignore_result,
        retries: request.retries.unwrap_or(0),
        group_index: request.group_index,
        link,
        link_error,
        chain,
        chord: None,
    })
}

/// A chord's body (`chord(header)(body)`): checked like a callback (the
/// worker calls it with the list of the header's results first, unless
/// immutable) and frozen with a `task_id` when the caller gave none.
pub fn accept_chord_body(request: SignatureRequest, registry: &Registry) -> Result<CelerySignature, IntakeError> {
    accept_signature("chord", request, StepKind::ChainStep, registry)
}

/// `now + seconds`, for `countdown` and `expires` given in seconds.
fn seconds_from(now: DateTime<Utc>, seconds: f64, field: &str) -> Result<DateTime<Utc>, IntakeError> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(IntakeError::field(field, "must be a non-negative number of seconds"));
    }
    // Seconds past chrono's calendar (about 262,000 years) are refused
    // rather than overflowing the clock (a panic).
    chrono::Duration::try_milliseconds((seconds * 1000.0) as i64)
        .and_then(|delay| now.checked_add_signed(delay))
        .ok_or_else(|| IntakeError::field(field, "is too far in the future"))
}

/// Celery's `apply_async(queue=...)` on a topic exchange: published to the
/// exchange with the queue's binding key as routing key. A binding that is
/// a pattern has no single key that means "this queue", so it is refused.
fn routing_key_of_queue(queue: &str, router: &TopicRouter) -> Result<String, IntakeError> {
    let Some(binding) = router.queues().iter().find(|binding| binding.queue().as_str() == queue) else {
        let configured: Vec<&str> = router.queues().iter().map(|binding| binding.queue().as_str()).collect();
        return Err(IntakeError::field(
            "queue",
            format!(
                "queue {queue:?} is not configured (routing.queues has {})",
                configured.join(", ")
            ),
        ));
    };
    routing::validate_routing_key(binding.binding_key()).map_err(|_| {
        IntakeError::field(
            "queue",
            format!(
                "queue {queue:?} is bound with the pattern {:?}, so no single routing key means this queue; \
                 give a routing_key that matches it instead",
                binding.binding_key()
            ),
        )
    })?;
    Ok(binding.binding_key().to_owned())
}

fn check_extra_headers(headers: &serde_json::Map<String, serde_json::Value>) -> Result<(), IntakeError> {
    for name in headers.keys() {
        let field = format!("headers.{name}");
        if RESERVED_HEADER_NAMES.contains(&name.as_str()) {
            return Err(IntakeError::field(
                &field,
                format!(
                    "{name:?} is a header taskgate sets itself (Celery's protocol or RabbitMQ routing); \
                     use the request field of that name where there is one"
                ),
            ));
        }
        // AMQP field-table keys are short strings.
        if name.is_empty() || name.len() > routing::MAX_KEY_BYTES {
            return Err(IntakeError::field(&field, "header names must be 1 to 255 bytes"));
        }
    }
    Ok(())
}

/// How the worker will call a signature, which decides how it must bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    /// `link`: called with the task's result first, unless immutable.
    Callback,
    /// `link_error`: called with the failed task's id first, unless
    /// immutable, or (a task taking three or more arguments) with
    /// `(request, exc, traceback)` in the worker itself.
    Errback,
    /// A chain step: like a callback, and frozen with a task id.
    ChainStep,
}

fn accept_signatures(
    items: Vec<(String, SignatureRequest)>,
    kind: StepKind,
    registry: &Registry,
) -> Result<Vec<CelerySignature>, IntakeError> {
    items
        .into_iter()
        .map(|(path, request)| accept_signature(&path, request, kind, registry))
        .collect()
}

fn accept_signature(
    path: &str,
    request: SignatureRequest,
    kind: StepKind,
    registry: &Registry,
) -> Result<CelerySignature, IntakeError> {
    let at = |field: &str| format!("{path}.{field}");
    let task = TaskName::parse(&request.task).map_err(|message| IntakeError::field(&at("task"), message))?;
    if let Some(subtask_type) = &request.subtask_type {
        return Err(IntakeError::field(
            &at("subtask_type"),
            format!("only plain task signatures (subtask_type null) are accepted, not {subtask_type:?}: groups and chords are not published by taskgate"),
        ));
    }
    if request.chord_size.is_some() {
        return Err(IntakeError::field(
            &at("chord_size"),
            "belongs to chords, which taskgate does not publish; leave it null",
        ));
    }
    for name in NESTED_SIGNATURE_OPTIONS {
        if request.options.contains_key(*name) {
            return Err(IntakeError::field(
                &at(&format!("options.{name}")),
                "nested signatures are not accepted (taskgate could not check their tasks); \
                 give them in the request's link, link_error or chain",
            ));
        }
    }
    if let Some(task_id) = request.options.get("task_id") {
        let valid = task_id.as_str().is_some_and(|text| TaskId::parse(text).is_ok());
        if !valid {
            return Err(IntakeError::field(&at("options.task_id"), "must be a UUID string"));
        }
    }
    bind_signature(path, &task, &request, kind, registry)?;
    let mut options = request.options;
    if kind == StepKind::ChainStep && !options.contains_key("task_id") {
        // Celery's chain freezes every step before sending the first, so each
        // step travels with its id (`options.task_id`), appended after the
        // caller's options as `freeze` does.
        options.insert("task_id".into(), TaskId::generate().to_string().into());
    }
    Ok(CelerySignature {
        task,
        args: request.args,
        kwargs: request.kwargs,
        options,
        immutable: request.immutable,
    })
}

/// Binds the call the worker will make. A mutable callback or chain step
/// gets the previous result as its first argument; a mutable errback gets
/// the failed task's id, or three arguments when the worker calls it in
/// process, so either binding is accepted for it.
fn bind_signature(
    path: &str,
    task: &TaskName,
    request: &SignatureRequest,
    kind: StepKind,
    registry: &Registry,
) -> Result<(), IntakeError> {
    let with_leading = |count: usize| {
        let mut args = vec![serde_json::Value::Null; count];
        args.extend(request.args.iter().cloned());
        registry.bind(task, &args, &request.kwargs)
    };
    let outcome = match (request.immutable, kind) {
        (true, _) => registry.bind(task, &request.args, &request.kwargs),
        (false, StepKind::Callback | StepKind::ChainStep) => with_leading(1),
        (false, StepKind::Errback) => with_leading(1).or_else(|first| with_leading(3).map_err(|_| first)),
    };
    outcome.map(|_| ()).map_err(|error| {
        let mut error = IntakeError::from(error);
        error.field = error.field.map(|field| format!("{path}.{field}"));
        if !request.immutable && error.kind == IntakeErrorKind::Binding {
            error.message.push_str(match kind {
                StepKind::Errback => {
                    " (counting the failed task's id, which the worker passes first; set immutable to pass none)"
                }
                _ => {
                    " (counting the previous task's result, which the worker passes first; set immutable to pass none)"
                }
            });
        }
        error
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::registry::{RegisteredTaskSettings, RegistrySettings};
    use crate::task::routing::{QueueBindingSettings, RoutingSettings};
    use crate::task::QueueName;
    use serde_json::{json, Map, Value};

    fn router() -> TopicRouter {
        TopicRouter::from_settings(&RoutingSettings {
            exchange: "task_exchange".into(),
            queues: vec![QueueBindingSettings {
                name: "export".into(),
                binding_key: "export".into(),
            }],
        })
        .unwrap()
    }

    fn registry() -> Registry {
        Registry::from_settings(&RegistrySettings {
            strict: true,
            tasks: vec![RegisteredTaskSettings {
                name: "export.project".into(),
                params: vec!["org_slug".into(), "project_slug".into(), "output_type?".into()],
                routing_key: None,
            }],
        })
        .unwrap()
    }

    fn request(value: serde_json::Value) -> TaskRequest {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn routes_by_task_name_prefix() {
        let task = accept(
            request(json!({"task": "export.project", "args": ["o", "p"]})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(task.routing_key, "export");
        assert_eq!(task.queues.len(), 1);
    }

    #[test]
    fn binding_errors_name_the_parameter() {
        let error = accept(
            request(json!({"task": "export.project", "args": ["o"]})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.field.as_deref(), Some("kwargs.project_slug"));
        assert_eq!(error.kind, IntakeErrorKind::Binding);
    }

    #[test]
    fn unroutable_and_unknown_are_refused() {
        let error = accept(
            request(json!({"task": "export.project", "args": ["o", "p"], "routing_key": "nowhere"})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.kind, IntakeErrorKind::Unroutable);
        let error = accept(
            request(json!({"task": "other.task"})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.kind, IntakeErrorKind::UnknownTask);
    }

    #[test]
    fn countdown_becomes_eta_and_conflicts_with_eta() {
        let now = Utc::now();
        let task = accept(
            request(json!({"task": "export.project", "args": ["o", "p"], "countdown": 10})),
            &registry(),
            &router(),
            now,
        )
        .unwrap();
        assert_eq!(task.eta, Some(now + chrono::Duration::seconds(10)));
        let error = accept(
            request(
                json!({"task": "export.project", "args": ["o", "p"], "countdown": 1, "eta": "2030-01-01T00:00:00Z"}),
            ),
            &registry(),
            &router(),
            now,
        )
        .unwrap_err();
        assert_eq!(error.field.as_deref(), Some("countdown"));
    }

    #[test]
    fn bad_client_id_is_refused() {
        let error = accept(
            request(json!({"task": "export.project", "args": ["o", "p"], "id": "nope"})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.field.as_deref(), Some("id"));
    }

    /// A registry and router for the Celery option tests: `rawa.add(x, y)`,
    /// an errback taking `(request, exc, traceback)`, and two queues, one
    /// bound with a pattern.
    fn option_registry() -> Registry {
        let entry = |name: &str, params: &[&str]| RegisteredTaskSettings {
            name: name.into(),
            params: params.iter().map(|param| (*param).to_owned()).collect(),
            routing_key: None,
        };
        Registry::from_settings(&RegistrySettings {
            strict: true,
            tasks: vec![
                entry("rawa.add", &["x", "y"]),
                entry("rawa.on_error", &["request", "exc", "traceback"]),
                entry("rawa.note", &["text"]),
            ],
        })
        .unwrap()
    }

    fn option_router() -> TopicRouter {
        TopicRouter::from_settings(&RoutingSettings {
            exchange: "task_exchange".into(),
            queues: vec![
                QueueBindingSettings {
                    name: "rawa-q".into(),
                    binding_key: "rawa".into(),
                },
                QueueBindingSettings {
                    name: "audit".into(),
                    binding_key: "audit.#".into(),
                },
            ],
        })
        .unwrap()
    }

    fn accept_options(extra: serde_json::Value) -> Result<Task, IntakeError> {
        let mut body = json!({"task": "rawa.add", "args": [2, 3]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        accept(request(body), &option_registry(), &option_router(), Utc::now())
    }

    fn refused_field(extra: serde_json::Value) -> String {
        accept_options(extra.clone())
            .map(|_| ())
            .expect_err(&format!("{extra} should be refused"))
            .field
            .unwrap_or_default()
    }

    /// Decodes a body as the HTTP edge does, returning the JSON path a
    /// decoding error is about (type errors are refused before intake).
    fn decode_error_path(body: serde_json::Value) -> String {
        let text = body.to_string();
        let mut deserializer = serde_json::Deserializer::from_str(&text);
        let error = serde_path_to_error::deserialize::<_, TaskRequest>(&mut deserializer)
            .expect_err(&format!("{body} should not decode"));
        error.path().to_string()
    }

    #[test]
    fn celery_options_are_stored_as_given() {
        let task = accept_options(json!({
            "shadow": "add-shadow", "headers": {"x-custom": "v", "n": 1},
            "ignore_result": true, "retries": 2, "group": "g1", "group_index": 3
        }))
        .unwrap();
        assert_eq!(task.shadow.as_deref(), Some("add-shadow"));
        assert_eq!(Value::Object(task.headers.clone()), json!({"x-custom": "v", "n": 1}));
        assert_eq!(task.ignore_result, Some(true));
        assert_eq!(task.retries, 2);
        assert_eq!(task.group_index, Some(3));
    }

    #[test]
    fn expires_takes_seconds_or_a_time() {
        let now = Utc::now();
        let in_seconds = accept(
            request(json!({"task": "rawa.add", "args": [1, 2], "expires": 10})),
            &option_registry(),
            &option_router(),
            now,
        )
        .unwrap();
        assert_eq!(in_seconds.expires, Some(now + chrono::Duration::seconds(10)));
        let fractional = accept(
            request(json!({"task": "rawa.add", "args": [1, 2], "expires": 1.5})),
            &option_registry(),
            &option_router(),
            now,
        )
        .unwrap();
        assert_eq!(fractional.expires, Some(now + chrono::Duration::milliseconds(1500)));
        let at = accept_options(json!({"expires": "2030-01-01T00:00:00Z"})).unwrap();
        assert_eq!(at.expires.unwrap().to_rfc3339(), "2030-01-01T00:00:00+00:00");
        assert_eq!(refused_field(json!({"expires": -1})), "expires");
        assert_eq!(refused_field(json!({"expires": 1e300})), "expires");
        assert_eq!(
            decode_error_path(json!({"task": "t", "expires": "tomorrow"})),
            "expires"
        );
        assert_eq!(decode_error_path(json!({"task": "t", "expires": true})), "expires");
    }

    #[test]
    fn bad_celery_options_are_refused_naming_the_field() {
        assert_eq!(refused_field(json!({"shadow": ""})), "shadow");
        assert_eq!(refused_field(json!({"shadow": "s".repeat(256)})), "shadow");
        assert_eq!(refused_field(json!({"group_index": 1})), "group_index");
        assert_eq!(decode_error_path(json!({"task": "t", "retries": -1})), "retries");
        assert_eq!(decode_error_path(json!({"task": "t", "retries": "2"})), "retries");
        assert_eq!(
            decode_error_path(json!({"task": "t", "ignore_result": "yes"})),
            "ignore_result"
        );
        assert_eq!(
            decode_error_path(json!({"task": "t", "group_index": -2})),
            "group_index"
        );
        assert_eq!(decode_error_path(json!({"task": "t", "headers": ["x"]})), "headers");
        assert_eq!(decode_error_path(json!({"task": "t", "link": "rawa.add"})), "link");
        assert_eq!(decode_error_path(json!({"task": "t", "chain": {"task": "a"}})), "chain");
        assert_eq!(decode_error_path(json!({"task": "t", "queue": 1})), "queue");
        assert_eq!(
            decode_error_path(json!({"task": "t", "exchange": null, "bogus": 1})),
            "bogus"
        );
    }

    #[test]
    fn protocol_headers_cannot_be_overwritten() {
        for name in RESERVED_HEADER_NAMES {
            let field = refused_field(json!({"headers": {"ok": 1, (*name): "x"}}));
            assert_eq!(field, format!("headers.{name}"));
        }
        assert_eq!(refused_field(json!({"headers": {"": 1}})), "headers.");
        assert_eq!(
            refused_field(json!({"headers": {"h".repeat(256): 1}})),
            format!("headers.{}", "h".repeat(256))
        );
    }

    #[test]
    fn queue_routes_with_its_binding_key() {
        let task = accept_options(json!({"task": "rawa.note", "args": ["t"], "queue": "rawa-q"})).unwrap();
        assert_eq!(task.routing_key, "rawa");
        assert_eq!(task.queues, vec![QueueName::parse("rawa-q").unwrap()]);
        assert!(accept_options(json!({"exchange": "task_exchange"})).is_ok());

        let unknown = accept_options(json!({"queue": "nowhere"})).unwrap_err();
        assert_eq!(unknown.field.as_deref(), Some("queue"));
        assert!(unknown.message.contains("rawa-q, audit"), "{}", unknown.message);
        let pattern = accept_options(json!({"queue": "audit"})).unwrap_err();
        assert_eq!(pattern.field.as_deref(), Some("queue"));
        assert!(pattern.message.contains("audit.#"), "{}", pattern.message);
        assert_eq!(
            refused_field(json!({"queue": "rawa-q", "routing_key": "rawa"})),
            "queue"
        );
        assert_eq!(refused_field(json!({"exchange": "other"})), "exchange");
        assert_eq!(refused_field(json!({"exchange": ""})), "exchange");
    }

    #[test]
    fn signatures_are_checked_like_tasks() {
        let task = accept_options(json!({
            "link": {"task": "rawa.add", "args": [10]},
            "link_error": [{"task": "rawa.note", "args": ["failed"], "immutable": true}, {"task": "rawa.on_error"}],
            "chain": [{"task": "rawa.add", "args": [10]}, {"task": "rawa.add", "args": [1], "options": {"queue": "rawa-q"}}]
        }))
        .unwrap();
        assert_eq!(task.link.as_ref().unwrap().len(), 1);
        assert_eq!(task.link.as_ref().unwrap()[0].options, Map::new());
        assert_eq!(task.link_error.as_ref().unwrap().len(), 2);
        let chain = task.chain.as_ref().unwrap();
        // Stored in execution order; every step frozen with a task id after
        // the caller's own options.
        assert_eq!(chain[0].args, vec![json!(10)]);
        let keys: Vec<&String> = chain[1].options.keys().collect();
        assert_eq!(keys, ["queue", "task_id"]);
        assert!(TaskId::parse(chain[0].options["task_id"].as_str().unwrap()).is_ok());

        let given = "0192f3c4-6a1e-7cc2-9d1b-3f5e8a7b6c5d";
        let kept = accept_options(json!({"chain": [{"task": "rawa.add", "args": [1], "options": {"task_id": given}}]}))
            .unwrap();
        assert_eq!(kept.chain.unwrap()[0].options["task_id"], given);
    }

    #[test]
    fn bad_signatures_are_refused_naming_the_field() {
        let unknown = accept_options(json!({"link": {"task": "rawa.missing"}})).unwrap_err();
        assert_eq!(unknown.kind, IntakeErrorKind::UnknownTask);
        assert_eq!(unknown.field.as_deref(), Some("link.task"));
        let unknown =
            accept_options(json!({"chain": [{"task": "rawa.add", "args": [1]}, {"task": "nope"}]})).unwrap_err();
        assert_eq!(unknown.field.as_deref(), Some("chain[1].task"));
        assert_eq!(
            refused_field(json!({"link_error": [{"task": "bad name"}]})),
            "link_error[0].task"
        );

        // The previous result counts as the first argument unless immutable.
        let binding = accept_options(json!({"link": {"task": "rawa.add", "args": [1, 2]}})).unwrap_err();
        assert_eq!(binding.kind, IntakeErrorKind::Binding);
        assert_eq!(binding.field.as_deref(), Some("link.args"));
        assert!(
            binding.message.contains("previous task's result"),
            "{}",
            binding.message
        );
        assert!(accept_options(json!({"link": {"task": "rawa.add", "args": [1, 2], "immutable": true}})).is_ok());
        let missing = accept_options(json!({"chain": [{"task": "rawa.add", "immutable": true}]})).unwrap_err();
        assert_eq!(missing.field.as_deref(), Some("chain[0].kwargs.x"));
        let errback = accept_options(json!({"link_error": {"task": "rawa.note", "args": ["x"]}})).unwrap_err();
        assert_eq!(errback.field.as_deref(), Some("link_error.args"));

        assert_eq!(
            refused_field(json!({"link": {"task": "rawa.add", "args": [1], "subtask_type": "chord"}})),
            "link.subtask_type"
        );
        assert_eq!(
            refused_field(json!({"link": {"task": "rawa.add", "args": [1], "chord_size": 2}})),
            "link.chord_size"
        );
        assert!(accept_options(json!({"link": {"task": "rawa.add", "args": [1], "chord_size": null}})).is_ok());
        for nested in NESTED_SIGNATURE_OPTIONS {
            assert_eq!(
                refused_field(
                    json!({"chain": [{"task": "rawa.add", "args": [1], "options": {(*nested): {"task": "rawa.add"}}}]})
                ),
                format!("chain[0].options.{nested}")
            );
        }
        assert_eq!(
            refused_field(json!({"link": {"task": "rawa.add", "args": [1], "options": {"task_id": "x"}}})),
            "link.options.task_id"
        );
        assert_eq!(
            decode_error_path(json!({"task": "t", "link": [{"task": "a"}, {"task": "b", "bogus": 1}]})),
            "link[1].bogus"
        );
    }
}
