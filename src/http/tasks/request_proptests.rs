//! Property tests of the HTTP request decoder (issue 14, "Decoders never
//! panic"): the body bytes of `POST /v1/tasks` and `POST /v1/tasks/batch`
//! and their `Idempotency-Key` header go through the handlers' own steps,
//! [`decode`], the batch size check, [`idempotency_key`],
//! [`request_fingerprint`] and [`intake::accept`] (field checks, registry
//! binding, routing), up to the outbox write. Any local process or web page
//! can send these bytes, so random bytes, valid requests mutated byte by byte
//! and JSON nested 100,000 deep must each end as accepted tasks or a 4xx
//! problem, never as a panic (which would drop the connection without an
//! answer). A request serde encodes decodes back to itself, and an accepted
//! task survives the outbox's JSON and Celery's encoder.

use super::*;
use crate::proptest_support::{config, json_value, mutated, mutation_without_overwrite, nested, DEEP};
use crate::task::registry::{RegisteredTaskSettings, Registry, RegistrySettings};
use crate::task::routing::{QueueBindingSettings, RoutingSettings, TopicRouter};
use crate::task::Task;
use chrono::{DateTime, TimeZone, Utc};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Map;

// ------------------------------------------------- the handlers' steps

type Route = SubmitRoute;

struct Gate {
    strict: Registry,
    lenient: Registry,
    router: TopicRouter,
}

fn gate() -> &'static Gate {
    static GATE: std::sync::OnceLock<Gate> = std::sync::OnceLock::new();
    GATE.get_or_init(|| {
        let tasks = vec![
            RegisteredTaskSettings {
                name: "export.project".into(),
                params: vec!["org_slug".into(), "project_slug".into(), "output_type?".into()],
                routing_key: None,
            },
            RegisteredTaskSettings {
                name: "rawa.add".into(),
                params: vec!["x".into(), "*rest".into(), "scale?".into(), "**options".into()],
                routing_key: Some("rawa".into()),
            },
            RegisteredTaskSettings {
                name: "mail.send".into(),
                params: vec!["to".into(), "*".into(), "subject".into()],
                routing_key: None,
            },
        ];
        let registry = |strict| {
            Registry::from_settings(&RegistrySettings {
                strict,
                tasks: tasks.clone(),
            })
            .expect("test registry is valid")
        };
        let router = TopicRouter::from_settings(&RoutingSettings {
            exchange: "task_exchange".into(),
            queues: vec![
                QueueBindingSettings {
                    name: "export".into(),
                    binding_key: "export".into(),
                },
                QueueBindingSettings {
                    name: "rawa".into(),
                    binding_key: "rawa.#".into(),
                },
                QueueBindingSettings {
                    name: "misc".into(),
                    binding_key: "*.misc".into(),
                },
            ],
        })
        .expect("test routing is valid");
        Gate {
            strict: registry(true),
            lenient: registry(false),
            router,
        }
    })
}

/// What `post_task` / `post_batch` do with a request before the outbox:
/// the handlers' own [`parse_submission`].
fn submit(route: Route, body: &[u8], headers: &HeaderMap, registry: &Registry) -> Result<Vec<Task>, Problem> {
    let body = Ok(Bytes::copy_from_slice(body));
    parse_submission(route, body, headers, registry, &gate().router, Utc::now()).map(|submission| submission.tasks)
}

/// Submits through both registries; every outcome must be a well-formed
/// answer: tasks the outbox and the Celery encoder take, or a 4xx problem.
fn check_submission(route: Route, body: &[u8], headers: &HeaderMap) -> Result<(), TestCaseError> {
    for registry in [&gate().strict, &gate().lenient] {
        match submit(route, body, headers, registry) {
            Ok(tasks) => {
                for task in tasks {
                    let stored = serde_json::to_vec(&task).expect("a task serializes");
                    let back: Task = serde_json::from_slice(&stored).expect("a stored task decodes");
                    prop_assert_eq!(&back, &task);
                    let _ = crate::celery::encode(&task, "gen1@host");
                }
            }
            Err(problem) => {
                let status = problem.details().status;
                prop_assert!((400..500).contains(&status), "{:?}", problem);
                prop_assert_eq!(problem.into_response().status().as_u16(), status);
            }
        }
    }
    Ok(())
}

fn no_headers() -> HeaderMap {
    HeaderMap::new()
}

// ------------------------------------------------------------ generators

fn kwargs() -> impl Strategy<Value = Map<String, Value>> {
    let names = prop_oneof![
        select(
            &[
                "org_slug",
                "project_slug",
                "output_type",
                "x",
                "scale",
                "to",
                "subject",
                "rest"
            ][..]
        )
        .prop_map(str::to_owned),
        ".{0,10}",
    ];
    vec((names, json_value()), 0..4).prop_map(|entries| entries.into_iter().collect())
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..253_402_300_799, 0..1_000_000_000u32)
        .prop_map(|(seconds, nanos)| Utc.timestamp_opt(seconds, nanos).single().expect("in range"))
}

fn seconds() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0..1e5f64,
        -10.0..0.0f64,
        // Far beyond any date: must be refused, not overflow the clock.
        1e9..1e300f64,
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
    ]
}

fn text(pattern: &'static str) -> impl Strategy<Value = Option<String>> {
    proptest::option::of(pattern)
}

/// Requests as a client could write them, valid or not for intake.
fn task_request() -> impl Strategy<Value = TaskRequest> {
    let call = (
        prop_oneof![
            select(&["export.project", "rawa.add", "mail.send", "other.misc", "unrouted"][..]).prop_map(str::to_owned),
            ".{0,20}",
        ],
        vec(json_value(), 0..5),
        kwargs(),
        proptest::option::of(prop_oneof![
            any::<u128>().prop_map(|id| uuid::Uuid::from_u128(id).to_string()),
            ".{0,40}",
        ]),
        proptest::option::of(prop_oneof![
            select(&["export", "rawa", "rawa.x.y", "a.misc", "nowhere", ""][..]).prop_map(str::to_owned),
            ".{0,20}",
        ]),
    );
    let options = (
        proptest::option::of(time()),
        proptest::option::of(time()),
        proptest::option::of(seconds()),
        proptest::option::of(any::<u8>()),
        text(".{0,8}|a{250,260}"),
        text(".{0,8}"),
        text(".{0,8}"),
        proptest::option::of(seconds()),
        proptest::option::of(seconds()),
        kwargs(),
    );
    (call, options).prop_map(
        |(
            (task, args, kwargs, id, routing_key),
            (eta, expires, countdown, priority, parent_id, root_id, group, time_limit, soft_time_limit, properties),
        )| TaskRequest {
            task,
            args,
            kwargs,
            id,
            routing_key,
            eta,
            expires: expires.map(crate::task::ExpiresRequest::At),
            countdown,
            priority,
            parent_id,
            root_id,
            group,
            time_limit,
            soft_time_limit,
            properties,
            shadow: None,
            headers: Default::default(),
            ignore_result: None,
            retries: None,
            group_index: None,
            link: None,
            link_error: None,
            chain: None,
            queue: None,
            exchange: None,
        },
    )
}

fn batch_body(requests: &[TaskRequest]) -> Vec<u8> {
    serde_json::to_vec(&json!({"tasks": requests})).expect("requests serialize")
}

/// Pieces of request JSON, for bodies that are almost requests.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"task\"",
    "\"args\"",
    "\"kwargs\"",
    "\"id\"",
    "\"eta\"",
    "\"countdown\"",
    "\"priority\"",
    "\"tasks\"",
    "\"properties\"",
    "\"routing_key\"",
    "\"export.project\"",
    "\"rawa.add\"",
    "\"2030-01-01T00:00:00Z\"",
    "\"x\"",
    "null",
    "true",
    "1",
    "-1",
    "256",
    "1e308",
    "1e400",
    "0.5",
    "\"\\u0000\"",
    "\"\\ud800\"",
    " ",
];

fn idempotency_headers() -> impl Strategy<Value = HeaderMap> {
    let value = prop_oneof![
        "[!-~]{1,255}".prop_map(String::into_bytes),
        "[!-~]{256,300}".prop_map(String::into_bytes),
        vec(any::<u8>(), 0..64),
        Just(Vec::new()),
    ];
    proptest::option::of(value).prop_map(|value| {
        let mut headers = HeaderMap::new();
        // Bytes `http` cannot hold never reach a handler.
        if let Some(value) = value.and_then(|bytes| HeaderValue::from_bytes(&bytes).ok()) {
            headers.insert(IDEMPOTENCY_HEADER, value);
        }
        headers
    })
}

// ------------------------------------------------------------ properties

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn random_bodies_never_panic(
        body in prop_oneof![
            vec(any::<u8>(), 0..256),
            vec(select(FRAGMENTS), 0..40).prop_map(|fragments| fragments.concat().into_bytes()),
            json_value().prop_map(|value| value.to_string().into_bytes()),
        ],
        headers in idempotency_headers(),
    ) {
        check_submission(SubmitRoute::Single, &body, &headers)?;
        check_submission(SubmitRoute::Batch, &body, &headers)?;
    }

    #[test]
    fn mutated_requests_never_panic(
        request in task_request(),
        more in vec(task_request(), 0..3),
        edits in vec(mutation_without_overwrite(FRAGMENTS), 1..8),
        headers in idempotency_headers(),
    ) {
        let single = serde_json::to_vec(&request).expect("a request serializes");
        check_submission(SubmitRoute::Single, &mutated(&single, &edits), &headers)?;
        let mut batch = vec![request];
        batch.extend(more);
        check_submission(SubmitRoute::Batch, &mutated(&batch_body(&batch), &edits), &headers)?;
    }

    #[test]
    fn idempotency_keys_are_checked_not_trusted(headers in idempotency_headers()) {
        match idempotency_key(&headers) {
            Ok(Some(key)) => {
                prop_assert!((1..=255).contains(&key.len()));
                prop_assert!(key.chars().all(|c| c.is_ascii_graphic()));
            }
            Ok(None) => prop_assert!(headers.get(IDEMPOTENCY_HEADER).is_none()),
            Err(problem) => prop_assert_eq!(problem.details().status, 400),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn requests_decode_back_to_themselves(request in task_request(), more in vec(task_request(), 0..3)) {
        let decoded: TaskRequest = decode(Ok(Bytes::from(serde_json::to_vec(&request).unwrap()))).unwrap();
        prop_assert_eq!(serde_json::to_value(&decoded).unwrap(), serde_json::to_value(&request).unwrap());
        let mut batch = vec![request];
        batch.extend(more);
        let decoded: BatchRequest = decode(Ok(Bytes::from(batch_body(&batch)))).unwrap();
        prop_assert_eq!(serde_json::to_value(&decoded.tasks).unwrap(), serde_json::to_value(&batch).unwrap());
        check_submission(SubmitRoute::Batch, &batch_body(&batch), &no_headers())?;
    }
}

// ------------------------------------------------------- deep nesting

#[test]
fn deeply_nested_bodies_are_refused_not_overflowed() {
    let bodies = [
        nested(DEEP, "[", "", "]"),
        nested(DEEP, "[", "", ""),
        nested(DEEP, "{\"a\":", "1", "}"),
        format!(
            "{{\"task\": \"export.project\", \"args\": {}}}",
            nested(DEEP, "[", "", "]")
        ),
        format!(
            "{{\"task\": \"rawa.add\", \"kwargs\": {{\"x\": {}}}}}",
            nested(DEEP, "{\"k\": ", "null", "}")
        ),
        format!("{{\"tasks\": {}}}", nested(DEEP, "[", "{\"task\": \"x\"}", "]")),
        format!(
            "{{\"tasks\": [{{\"task\": \"x\", \"properties\": {}}}]}}",
            nested(DEEP, "{\"p\":", "0", "}")
        ),
    ];
    for body in &bodies {
        for route in [SubmitRoute::Single, SubmitRoute::Batch] {
            let problem = submit(route, body.as_bytes(), &no_headers(), &gate().lenient).unwrap_err();
            assert!(
                [400, 422].contains(&problem.details().status),
                "{route:?}: {:?}",
                problem.details()
            );
        }
    }
}

#[test]
fn a_countdown_past_the_calendar_is_refused() {
    for countdown in ["1e13", "1e300", "1.7976931348623157e308"] {
        let body = format!("{{\"task\": \"other.misc\", \"routing_key\": \"a.misc\", \"countdown\": {countdown}}}");
        let problem = submit(SubmitRoute::Single, body.as_bytes(), &no_headers(), &gate().lenient).unwrap_err();
        assert_eq!(problem.details().status, 422);
        assert_eq!(problem.details().field.as_deref(), Some("countdown"));
    }
}
