//! Celery task protocol v2: turns an accepted [`Task`] into the message stock
//! Celery 5.7 (`app.send_task` -> `AMQP.as_task_v2` -> kombu
//! `Producer.publish`) would publish, and reads such messages back.
//!
//! Owns: the broker-neutral [`CeleryMessage`] (headers, properties, body
//! bytes) and [`encode`]; the `origin` header ([`default_origin`]); Python
//! formatting of datetimes. Submodules own Python's `json.dumps`
//! ([`python_json`]), Celery's `saferepr` ([`python_repr`]), kombu's SQS
//! envelope ([`sqs`]) and decoding ([`decode`]).
//!
//! Invariants:
//! - headers hold exactly Celery's keys, in Celery's order, with Celery's
//!   values (`argsrepr`/`kwargsrepr` included), so a stock worker, Flower and
//!   result tooling cannot tell taskgate from `send_task`;
//! - the body is byte-for-byte `json.dumps([args, kwargs, embed])` of the
//!   task as accepted;
//! - properties never carry a caller value under a name kombu or the AMQP
//!   publisher sets itself ([`is_reserved_property`]).
//!
//! The reference is the captured traffic in `tests/support/fixtures/`; the tests
//! compare against it field by field and byte by byte.

pub mod decode;
pub mod python_json;
pub mod python_repr;
pub mod sqs;

pub use decode::{decode_task_message, DecodeError, DecodedTask};
pub use sqs::{decode_sqs_message_body, sqs_message_body, DecodedMessage};

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::task::{CelerySignature, Task};

/// `content_type` of every message taskgate publishes (Celery's `json`
/// serializer); also the only one [`decode_task_message`] accepts.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `content_encoding` of the JSON serializer.
pub const CONTENT_ENCODING_UTF8: &str = "utf-8";
/// AMQP `delivery_mode` 2 = persistent, Celery's `task_default_delivery_mode`.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// Property names that Celery, kombu or the publishers set themselves. A
/// caller-supplied property under one of these names is dropped by
/// [`encode`]; the HTTP edge should reject it up front.
pub const RESERVED_PROPERTY_NAMES: &[&str] = &[
    "correlation_id",
    "reply_to",
    "delivery_mode",
    "priority",
    "expiration",
    "content_type",
    "content_encoding",
    "headers",
    "delivery_info",
    "body_encoding",
    "delivery_tag",
];

/// Whether `name` is one of [`RESERVED_PROPERTY_NAMES`].
pub fn is_reserved_property(name: &str) -> bool {
    RESERVED_PROPERTY_NAMES.contains(&name)
}

/// A Celery protocol v2 message, independent of the broker. The AMQP
/// publisher maps `headers` to a field table and `properties` to basic
/// properties; the SQS publisher wraps it with [`sqs_message_body`].
#[derive(Debug, Clone, PartialEq)]
pub struct CeleryMessage {
    /// Celery's task headers, in Celery's order.
    pub headers: Map<String, Value>,
    pub properties: MessageProperties,
    /// `json.dumps([args, kwargs, embed])`, UTF-8 (in fact ASCII).
    pub body: Vec<u8>,
}

/// The message properties Celery sets, in kombu's order. There is no
/// `message_id`: Celery does not set one (the captured traffic has none),
/// the task id travels as `correlation_id` and in the `id` header.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageProperties {
    /// Always [`CONTENT_TYPE_JSON`].
    pub content_type: &'static str,
    /// Always [`CONTENT_ENCODING_UTF8`].
    pub content_encoding: &'static str,
    /// The task id.
    pub correlation_id: String,
    /// Where results go for the `rpc://` backend. Celery writes `""` when
    /// there is none (`reply_to or ''`); taskgate has no result consumer.
    pub reply_to: Option<String>,
    /// Always [`DELIVERY_MODE_PERSISTENT`].
    pub delivery_mode: u8,
    /// `task.priority`, or 0 (kombu's `priority or default_priority`).
    pub priority: u8,
    /// Per-message TTL in milliseconds, as a decimal string, when the task
    /// `expires`: Celery computes it at send time (`send_task` sets
    /// `expiration = expires - now`, never negative, and kombu writes
    /// `str(int(expiration * 1000))`). On AMQP this is the message TTL.
    pub expiration: Option<String>,
    /// The caller-supplied `properties` of the task (reserved names removed),
    /// in request order; Celery's `send_task(**options)` puts them here.
    pub extra: Map<String, Value>,
}

/// `callbacks` / `errbacks` / `chain` / `chord`, the third body element, in
/// Celery's order. `chord` is the body of the chord a header member
/// belongs to (`null` otherwise).
#[derive(Debug, Default, Serialize)]
struct EmbeddedSignatures {
    callbacks: Option<Vec<Value>>,
    errbacks: Option<Vec<Value>>,
    chain: Option<Vec<Value>>,
    chord: Option<Value>,
}

/// A signature as `celery.canvas.Signature` serializes: `task`, `args`,
/// `kwargs`, `options`, `subtask_type`, `immutable`, in that order (Celery
/// 5.7 writes no `chord_size`; the captured traffic has none).
pub fn signature_value(signature: &CelerySignature) -> Value {
    let mut dict = Map::new();
    dict.insert("task".into(), signature.task.as_str().into());
    dict.insert("args".into(), Value::Array(signature.args.clone()));
    dict.insert("kwargs".into(), Value::Object(signature.kwargs.clone()));
    dict.insert("options".into(), Value::Object(signature.options.clone()));
    dict.insert("subtask_type".into(), Value::Null);
    dict.insert("immutable".into(), signature.immutable.into());
    Value::Object(dict)
}

/// Celery's `origin` header for this process: `gen{pid}@{hostname}`
/// (`celery.utils.nodenames.anon_nodename`).
pub fn default_origin() -> String {
    format!(
        "gen{}@{}",
        std::process::id(),
        gethostname::gethostname().to_string_lossy()
    )
}

/// Encodes `task` as Celery 5.7's `send_task` would at this moment. `now`
/// only matters for the `expiration` property of a task that `expires`.
pub fn encode(task: &Task, origin: &str) -> CeleryMessage {
    encode_at(task, origin, Utc::now())
}

/// [`encode`] with an explicit send time (deterministic for tests, and lets
/// a publisher use the instant it actually publishes).
pub fn encode_at(task: &Task, origin: &str, now: DateTime<Utc>) -> CeleryMessage {
    let id = task.id.to_string();
    CeleryMessage {
        headers: task_headers(task, &id, origin),
        properties: MessageProperties {
            content_type: CONTENT_TYPE_JSON,
            content_encoding: CONTENT_ENCODING_UTF8,
            correlation_id: id,
            reply_to: None,
            delivery_mode: DELIVERY_MODE_PERSISTENT,
            priority: task.priority.unwrap_or(0),
            expiration: task.expires.map(|expires| expiration_millis(expires, now)),
            extra: task
                .properties
                .iter()
                .filter(|(name, _)| !is_reserved_property(name))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        },
        body: task_body(task),
    }
}

/// The headers of `as_task_v2`, same keys, same order, same values.
fn task_headers(task: &Task, id: &str, origin: &str) -> Map<String, Value> {
    let optional_text = |text: &Option<String>| text.clone().map_or(Value::Null, Value::String);
    let optional_time =
        |time: Option<DateTime<Utc>>| time.map_or(Value::Null, |time| Value::String(python_isoformat(time)));
    // `if not root_id: root_id = task_id`: an empty root id counts as absent.
    let root_id = task
        .root_id
        .clone()
        .filter(|root_id| !root_id.is_empty())
        .unwrap_or_else(|| id.to_owned());

    let mut headers = Map::new();
    headers.insert("lang".into(), "py".into());
    headers.insert("task".into(), task.task.as_str().into());
    headers.insert("id".into(), id.into());
    headers.insert("shadow".into(), optional_text(&task.shadow));
    headers.insert("eta".into(), optional_time(task.eta));
    headers.insert("expires".into(), optional_time(task.expires));
    headers.insert("group".into(), optional_text(&task.group));
    headers.insert("group_index".into(), task.group_index.map_or(Value::Null, Value::from));
    headers.insert("retries".into(), task.retries.into());
    headers.insert(
        "timelimit".into(),
        Value::Array(vec![
            seconds_value(task.time_limit),
            seconds_value(task.soft_time_limit),
        ]),
    );
    headers.insert("root_id".into(), root_id.into());
    headers.insert("parent_id".into(), optional_text(&task.parent_id));
    headers.insert("argsrepr".into(), python_repr::args_repr(&task.args).into());
    headers.insert("kwargsrepr".into(), python_repr::kwargs_repr(&task.kwargs).into());
    headers.insert("origin".into(), origin.into());
    // `send_task` pops `ignore_result` from the options with a `None`
    // default, so a plain send carries null (as captured), not false.
    headers.insert(
        "ignore_result".into(),
        task.ignore_result.map_or(Value::Null, Value::Bool),
    );
    headers.insert("replaced_task_nesting".into(), 0.into());
    headers.insert("stamped_headers".into(), Value::Null);
    headers.insert("stamps".into(), Value::Object(Map::new()));
    // `send_task_message` does `headers2.update(headers)`: the caller's
    // headers follow Celery's, in their order. Intake refused any name that
    // would overwrite one of Celery's, so none is replaced here.
    for (name, value) in &task.headers {
        headers.entry(name.clone()).or_insert_with(|| value.clone());
    }
    headers
}

/// `json.dumps((args, kwargs, embed))`; Python writes the tuple as an array.
fn task_body(task: &Task) -> Vec<u8> {
    let signatures = |list: &Option<Vec<CelerySignature>>| {
        list.as_ref()
            .map(|list| list.iter().map(signature_value).collect::<Vec<_>>())
    };
    let embed = EmbeddedSignatures {
        callbacks: signatures(&task.link),
        errbacks: signatures(&task.link_error),
        // Celery's chain pops the next step off the end of this list, so it
        // carries the remaining steps last-to-run first (`_chain.run` sends
        // `tasks[:-1]` of the reversed steps; see the captured chain).
        chain: signatures(&task.chain).map(|mut steps| {
            steps.reverse();
            steps
        }),
        chord: task.chord.as_ref().map(signature_value),
    };
    let body = (&task.args, &task.kwargs, embed);
    // Serializing JSON values with string keys into a Vec cannot fail: there
    // is no I/O error and no non-string key.
    python_json::to_vec(&body).expect("a task body always serializes to JSON")
}

/// A time limit as a Python caller would have passed it: the HTTP API reads
/// seconds as f64, but `time_limit=30` is an int in Python and `30` on the
/// wire, so whole numbers go out as integers and the rest as floats.
fn seconds_value(seconds: Option<f64>) -> Value {
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    match seconds {
        None => Value::Null,
        Some(seconds) if seconds.fract() == 0.0 && seconds.abs() < EXACT_INTEGER_LIMIT => Value::from(seconds as i64),
        Some(seconds) => serde_json::Number::from_f64(seconds).map_or(Value::Null, Value::Number),
    }
}

/// Python's `datetime.isoformat()` of an aware UTC datetime:
/// `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`. Python keeps microseconds, so
/// nanoseconds are truncated, and the fraction is omitted when it is zero.
pub fn python_isoformat(time: DateTime<Utc>) -> String {
    let micros = time.timestamp_subsec_micros();
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}+00:00",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
    )
}

/// kombu's `str(int(expiration * 1000))` with Celery's `expiration =
/// max(0, (expires - now).total_seconds())`, reproduced in the same float
/// arithmetic (so 1.001 s gives "1000", exactly as Python does).
fn expiration_millis(expires: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let micros = |time: DateTime<Utc>| time.timestamp_micros();
    let delta_micros = micros(expires).saturating_sub(micros(now));
    let seconds = (delta_micros as f64 / 1_000_000.0).max(0.0);
    ((seconds * 1000.0) as i64).to_string()
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Loading the captured Celery 5.7 traffic and turning a captured message
    //! back into the [`Task`] that would have produced it.

    use crate::task::{Task, TaskId};

    use serde_json::{Map, Value};
    use std::path::PathBuf;

    /// Reads `tests/support/fixtures/{name}` (copied from the workspace's
    /// `shared/fixtures/`, so a clone anywhere has them). A missing fixture
    /// fails the test: the wire-format checks must never silently skip.
    pub fn load_fixture(name: &str) -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/support/fixtures")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "reference capture {} is missing or unreadable ({error}); \
                 the Celery wire-format tests need it and must not be skipped",
                path.display()
            )
        });
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()))
    }

    /// A task with the captured id, name, arguments and routing key, and
    /// everything else as a plain `send_task` leaves it.
    pub fn task_like_capture(
        headers: &Map<String, Value>,
        args: &[Value],
        kwargs: &Map<String, Value>,
        routing_key: &str,
    ) -> Task {
        let header = |name: &str| {
            headers[name]
                .as_str()
                .unwrap_or_else(|| panic!("captured header {name} is not a string"))
        };
        Task::for_test(
            TaskId::parse(header("id")).expect("captured id is a UUID"),
            header("task"),
            args.to_vec(),
            kwargs.clone(),
            routing_key,
            &[routing_key],
        )
    }

    /// A fresh task with the given arguments, for unit tests.
    pub fn sample_task(args: Vec<Value>, kwargs: Map<String, Value>) -> Task {
        let mut headers = Map::new();
        headers.insert("id".into(), "0143a7c7-9b1d-4fdf-a533-96615c4d14f1".into());
        headers.insert("task".into(), "export.project".into());
        task_like_capture(&headers, &args, &kwargs, "export")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{load_fixture, sample_task, task_like_capture};
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("expected a JSON object, got {other}"),
        }
    }

    /// Our properties as the AMQP basic properties kombu would send.
    fn amqp_property_view(properties: &MessageProperties) -> Map<String, Value> {
        let mut view = Map::new();
        view.insert("content_type".into(), properties.content_type.into());
        view.insert("content_encoding".into(), properties.content_encoding.into());
        view.insert("delivery_mode".into(), properties.delivery_mode.into());
        view.insert("priority".into(), properties.priority.into());
        view.insert("correlation_id".into(), properties.correlation_id.clone().into());
        if let Some(expiration) = &properties.expiration {
            view.insert("expiration".into(), expiration.clone().into());
        }
        view.extend(properties.extra.clone());
        view
    }

    #[test]
    fn amqp_capture_matches_field_by_field() {
        let capture = load_fixture("celery-5.7-amqp-messages.json");
        let messages = capture["messages"].as_array().expect("messages array");
        assert!(!messages.is_empty(), "the AMQP capture holds no messages");

        for captured in messages {
            let captured_properties = object(captured["properties"].clone());
            let captured_headers = object(captured_properties["headers"].clone());
            let captured_body = captured["body"].as_str().expect("body text");
            let body: Vec<Value> = serde_json::from_str(captured_body).expect("body is JSON");
            let args = body[0].as_array().expect("args array");
            let kwargs = body[1].as_object().expect("kwargs object");
            let routing_key = captured["routing_key"].as_str().expect("routing key");
            let task = task_like_capture(&captured_headers, args, kwargs, routing_key);

            let origin = default_origin();
            let message = encode(&task, &origin);

            // Same keys in the same order, same values except `origin`.
            let our_keys: Vec<&String> = message.headers.keys().collect();
            let captured_keys: Vec<&String> = captured_headers.keys().collect();
            assert_eq!(our_keys, captured_keys, "header names or order differ");
            for (name, captured_value) in &captured_headers {
                if name == "origin" {
                    assert_eq!(message.headers[name], Value::String(origin.clone()));
                } else {
                    assert_eq!(&message.headers[name], captured_value, "header {name}");
                }
            }

            let mut expected_properties = captured_properties.clone();
            expected_properties.remove("headers");
            expected_properties.remove("reply_to");
            let ours = amqp_property_view(&message.properties);
            assert_eq!(
                ours.keys().collect::<std::collections::BTreeSet<_>>(),
                expected_properties.keys().collect::<std::collections::BTreeSet<_>>(),
                "property names differ"
            );
            for (name, captured_value) in &expected_properties {
                assert_eq!(&ours[name], captured_value, "property {name}");
            }

            assert_eq!(
                String::from_utf8_lossy(&message.body),
                captured_body,
                "body bytes differ"
            );
            assert_eq!(message.body, captured_body.as_bytes());
        }
    }

    #[test]
    fn default_origin_is_gen_pid_at_host() {
        let origin = default_origin();
        let (name, host) = origin.split_once('@').expect("an @ separator");
        assert_eq!(name, format!("gen{}", std::process::id()));
        assert!(!host.is_empty());
    }

    #[test]
    fn plain_task_headers_and_body() {
        let task = sample_task(vec![json!(2), json!(3)], object(json!({"scale": 10})));
        let message = encode(&task, "gen1@host");
        assert_eq!(
            Value::Object(message.headers.clone()),
            json!({
                "lang": "py", "task": "export.project",
                "id": "0143a7c7-9b1d-4fdf-a533-96615c4d14f1", "shadow": null,
                "eta": null, "expires": null, "group": null, "group_index": null,
                "retries": 0, "timelimit": [null, null],
                "root_id": "0143a7c7-9b1d-4fdf-a533-96615c4d14f1", "parent_id": null,
                "argsrepr": "[2, 3]", "kwargsrepr": "{'scale': 10}", "origin": "gen1@host",
                "ignore_result": null, "replaced_task_nesting": 0,
                "stamped_headers": null, "stamps": {}
            })
        );
        assert_eq!(
            message.body,
            br#"[[2, 3], {"scale": 10}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        assert_eq!(message.properties.priority, 0);
        assert_eq!(message.properties.delivery_mode, 2);
        assert_eq!(message.properties.reply_to, None);
        assert_eq!(message.properties.expiration, None);
    }

    #[test]
    fn optional_fields_follow_celery() {
        let mut task = sample_task(vec![], Map::new());
        task.eta = Some(Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap());
        task.expires =
            Some(Utc.with_ymd_and_hms(2024, 1, 2, 4, 0, 0).unwrap() + chrono::Duration::nanoseconds(123_456_789));
        task.group = Some("g-1".into());
        task.parent_id = Some("parent".into());
        task.root_id = Some("root".into());
        task.time_limit = Some(30.0);
        task.soft_time_limit = Some(12.5);
        task.priority = Some(7);
        let now = Utc.with_ymd_and_hms(2024, 1, 2, 3, 59, 0).unwrap();
        let message = encode_at(&task, "o", now);

        let headers = &message.headers;
        assert_eq!(headers["eta"], "2024-01-02T03:04:05+00:00");
        // Python keeps microseconds only.
        assert_eq!(headers["expires"], "2024-01-02T04:00:00.123456+00:00");
        assert_eq!(headers["group"], "g-1");
        assert_eq!(headers["parent_id"], "parent");
        assert_eq!(headers["root_id"], "root");
        assert_eq!(headers["timelimit"], json!([30, 12.5]));
        assert_eq!(headers["argsrepr"], "()");
        assert_eq!(headers["kwargsrepr"], "{}");
        assert_eq!(message.properties.priority, 7);
        assert_eq!(message.properties.expiration.as_deref(), Some("60123"));
        assert_eq!(
            message.body,
            br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
    }

    fn signature(task: &str, args: Value, options: Value, immutable: bool) -> CelerySignature {
        CelerySignature {
            task: crate::task::TaskName::parse(task).unwrap(),
            args: args.as_array().unwrap().clone(),
            kwargs: Map::new(),
            options: object(options),
            immutable,
        }
    }

    /// Against a message stock Celery 5.7 published for
    /// `add.apply_async((2, 3), link=add.s(10), link_error=echo.si("failed"),
    /// shadow="sh", headers={"x-custom": "v", "n": 1}, ignore_result=True,
    /// retries=2, group_id="g1", group_index=3)`, captured off RabbitMQ.
    #[test]
    fn celery_options_encode_like_apply_async() {
        let mut task = sample_task(vec![json!(2), json!(3)], Map::new());
        task.task = crate::task::TaskName::parse("rawa.add").unwrap();
        task.shadow = Some("sh".into());
        task.headers = object(json!({"x-custom": "v", "n": 1}));
        task.ignore_result = Some(true);
        task.retries = 2;
        task.group = Some("g1".into());
        task.group_index = Some(3);
        task.link = Some(vec![signature("rawa.add", json!([10]), json!({}), false)]);
        task.link_error = Some(vec![signature("rawa.echo", json!(["failed"]), json!({}), true)]);
        let message = encode(&task, "o");
        let keys: Vec<&str> = message.headers.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
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
                "x-custom",
                "n"
            ]
        );
        assert_eq!(message.headers["shadow"], "sh");
        assert_eq!(message.headers["group"], "g1");
        assert_eq!(message.headers["group_index"], 3);
        assert_eq!(message.headers["retries"], 2);
        assert_eq!(message.headers["ignore_result"], true);
        assert_eq!(message.headers["x-custom"], "v");
        assert_eq!(message.headers["n"], 1);
        assert_eq!(
            String::from_utf8(message.body).unwrap(),
            r#"[[2, 3], {}, {"callbacks": [{"task": "rawa.add", "args": [10], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}], "errbacks": [{"task": "rawa.echo", "args": ["failed"], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": true}], "chain": null, "chord": null}]"#
        );
    }

    /// `chain(add.s(2, 3), add.s(10), add.s(100).set(queue="q"))`: Celery's
    /// first message carries the other two last-to-run first, each with its
    /// frozen `task_id` after the caller's options.
    #[test]
    fn chain_is_carried_in_reverse() {
        let mut task = sample_task(vec![json!(2), json!(3)], Map::new());
        task.chain = Some(vec![
            signature("rawa.add", json!([10]), json!({"task_id": "b"}), false),
            signature("rawa.add", json!([100]), json!({"queue": "q", "task_id": "c"}), false),
        ]);
        let body: Value = serde_json::from_slice(&encode(&task, "o").body).unwrap();
        assert_eq!(
            body[2],
            json!({"callbacks": null, "errbacks": null, "chain": [
                {"task": "rawa.add", "args": [100], "kwargs": {}, "options": {"queue": "q", "task_id": "c"}, "subtask_type": null, "immutable": false},
                {"task": "rawa.add", "args": [10], "kwargs": {}, "options": {"task_id": "b"}, "subtask_type": null, "immutable": false}
            ], "chord": null})
        );
    }

    #[test]
    fn empty_root_id_defaults_to_task_id() {
        let mut task = sample_task(vec![], Map::new());
        task.root_id = Some(String::new());
        let message = encode(&task, "o");
        assert_eq!(message.headers["root_id"], message.headers["id"]);
    }

    #[test]
    fn expiration_uses_python_float_arithmetic() {
        let now = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
        let later = |millis: i64| now + chrono::Duration::milliseconds(millis);
        // int(timedelta(milliseconds=1001).total_seconds() * 1000) == 1000
        assert_eq!(expiration_millis(later(1001), now), "1000");
        assert_eq!(expiration_millis(later(90_500), now), "90500");
        // Already expired: Celery clamps to 0 rather than refusing.
        assert_eq!(expiration_millis(later(-5_000), now), "0");
    }

    #[test]
    fn caller_properties_are_kept_in_order_without_reserved_names() {
        let mut task = sample_task(vec![], Map::new());
        task.properties = object(json!({
            "creator_id": 42, "priority": 9, "reply_to": "x", "MessageGroupId": "org-1"
        }));
        let message = encode(&task, "o");
        assert_eq!(
            Value::Object(message.properties.extra),
            json!({"creator_id": 42, "MessageGroupId": "org-1"})
        );
        assert_eq!(message.properties.priority, 0);
    }

    #[test]
    fn isoformat_matches_python() {
        let at = |micros: u32| {
            Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 59).unwrap() + chrono::Duration::microseconds(i64::from(micros))
        };
        assert_eq!(python_isoformat(at(0)), "2024-02-29T23:59:59+00:00");
        assert_eq!(python_isoformat(at(5)), "2024-02-29T23:59:59.000005+00:00");
        let early = Utc.with_ymd_and_hms(5, 1, 2, 0, 0, 0).unwrap();
        assert_eq!(python_isoformat(early), "0005-01-02T00:00:00+00:00");
    }

    #[test]
    fn seconds_keep_python_int_or_float_spelling() {
        assert_eq!(seconds_value(None), Value::Null);
        assert_eq!(seconds_value(Some(300.0)).to_string(), "300");
        assert_eq!(seconds_value(Some(0.5)).to_string(), "0.5");
    }
}
#[cfg(test)]
mod decode_proptests;
