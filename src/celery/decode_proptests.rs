//! Property tests of the tracking-queue message decoders (issue 14,
//! "Decoders never panic"): [`decode_task_message`] (an AMQP delivery's
//! headers, body, content type and encoding) and [`decode_sqs_message_body`]
//! (an SQS `MessageBody`), followed by [`TaskRecord::from_message`], which is
//! what the tracking consumer does with every message of its queue. Anyone
//! who can publish to the exchange controls those bytes, so random input,
//! Celery's own captured messages mutated byte by byte, and JSON nested
//! 100,000 deep must each give a record or a [`DecodeError`], never a panic.
//!
//! Also here, for the same reason: [`python_repr`] and [`python_json`]. They
//! parse nothing (they write Python's `repr` and `json.dumps` of values that
//! serde_json parsed, so at most 128 levels deep), but they run on every
//! caller-chosen value: they must not panic on any value, `saferepr` must
//! walk any depth without recursion, and their output must read back.
//!
//! Round trips: for generated tasks, `decode(encode(task))` gives back the
//! task's fields, over AMQP and through kombu's SQS envelope.

use super::decode::parse_python_isoformat;
use super::python_repr::{self, PyObject};
use super::test_support::load_fixture;
use super::*;
use crate::proptest_support::{config, json_leaf, mutated, mutation, nested, task_of, Mutation, DEEP, HEADER_NAMES};
use crate::task::{QueueName, TaskName};
use crate::tracking::record::TaskRecord;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::TimeZone;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::json;

// ------------------------------------------------------------ generators

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        select(HEADER_NAMES).prop_map(str::to_owned),
        ".{0,10}".prop_map(String::from)
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((json_key(), inner), 0..6).prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    vec((json_key(), json_value()), 0..8).prop_map(|entries| entries.into_iter().collect())
}

/// Bytes that steer a mutation into JSON's, base64's and ISO 8601's
/// interesting corners rather than only into invalid UTF-8.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "\\u",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-",
    "0",
    "9",
    ".",
    "e",
    "E+",
    "1e999",
    "-0",
    "18446744073709551616",
    "=",
    "==",
    "+",
    "/",
    "T",
    "Z",
    "+00:00",
    " ",
    "\u{0}",
    "\u{fffd}",
    "é",
    "\u{1F980}",
];

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    vec(mutation(TOKENS), 1..8)
}

/// A time as Python's `isoformat` keeps it (microseconds), years 1 to 9999.
fn python_time() -> impl Strategy<Value = DateTime<Utc>> {
    (-62_135_596_800i64..253_402_300_799, 0..1_000_000u32).prop_map(|(seconds, micros)| {
        Utc.timestamp_opt(seconds, micros * 1000)
            .single()
            .expect("in chrono's range")
    })
}

fn finite_seconds() -> impl Strategy<Value = f64> {
    prop_oneof![
        (0u32..100_000).prop_map(f64::from),
        0.0..1e6f64,
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
    ]
}

fn optional_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(".{0,20}")
}

/// Any task intake could have accepted (and some it would refuse: the
/// encoder and decoder must not care).
fn task() -> impl Strategy<Value = Task> {
    let identity = (
        any::<u128>(),
        "[a-z_]{1,10}(\\.[a-z_]{1,10}){0,2}|[^\\s\\p{Cc}]{1,30}",
        vec(json_value(), 0..4),
        json_object(),
        "[a-z0-9.*#_-]{0,20}",
        vec("[a-z0-9._:-]{1,20}", 0..3),
    );
    let options = (
        proptest::option::of(python_time()),
        proptest::option::of(python_time()),
        proptest::option::of(any::<u8>()),
        optional_text(),
        optional_text(),
        optional_text(),
        proptest::option::of(finite_seconds()),
        proptest::option::of(finite_seconds()),
        json_object(),
        python_time(),
    );
    (identity, options).prop_filter_map(
        "a valid task name",
        |((id, name, args, kwargs, routing_key, queues), options)| {
            let task = TaskName::parse(&name).ok()?;
            let queues = queues.iter().filter_map(|queue| QueueName::parse(queue).ok()).collect();
            Some(task_of(((id, task, args, kwargs, routing_key, queues), options)))
        },
    )
}

// --------------------------------------------------------------- helpers

/// What the tracking consumer does with one AMQP delivery.
fn consume_amqp(
    headers: &Map<String, Value>,
    body: &[u8],
    content_type: &str,
    content_encoding: Option<&str>,
) -> Result<TaskRecord, DecodeError> {
    let task = decode_task_message(headers, body, content_type, content_encoding)?;
    Ok(TaskRecord::from_message(
        &task,
        headers,
        &Map::new(),
        Some("routing.key"),
        Some(0),
        Utc::now(),
    ))
}

/// What the tracking consumer does with one SQS message.
fn consume_sqs(text: &str) -> Result<TaskRecord, DecodeError> {
    let decoded = decode_sqs_message_body(text)?;
    let routing_key = decoded
        .properties
        .get("delivery_info")
        .and_then(|info| info.get("routing_key"))
        .and_then(Value::as_str);
    let priority = decoded
        .properties
        .get("priority")
        .and_then(Value::as_u64)
        .and_then(|priority| u8::try_from(priority).ok());
    Ok(TaskRecord::from_message(
        &decoded.task,
        &decoded.headers,
        &decoded.properties,
        routing_key,
        priority,
        Utc::now(),
    ))
}

/// A captured AMQP message: headers, body, content type and encoding.
struct Captured {
    headers: Map<String, Value>,
    body: Vec<u8>,
    content_type: String,
    content_encoding: Option<String>,
}

fn amqp_captures() -> Vec<Captured> {
    let fixture = load_fixture("celery-5.7-amqp-messages.json");
    fixture["messages"]
        .as_array()
        .expect("captured messages")
        .iter()
        .map(|message| {
            let properties = &message["properties"];
            Captured {
                headers: properties["headers"].as_object().expect("captured headers").clone(),
                body: message["body"].as_str().expect("captured body").as_bytes().to_vec(),
                content_type: properties["content_type"].as_str().unwrap_or_default().to_owned(),
                content_encoding: properties["content_encoding"].as_str().map(str::to_owned),
            }
        })
        .collect()
}

/// Captured SQS `MessageBody` strings (base64 envelopes).
fn sqs_captures() -> Vec<String> {
    let fixture = load_fixture("celery-5.7-sqs-messages.json");
    fixture["messages"]
        .as_array()
        .expect("captured messages")
        .iter()
        .map(|message| message["MessageBody"].as_str().expect("captured body").to_owned())
        .collect()
}

fn captured_amqp() -> &'static [Captured] {
    static CAPTURES: std::sync::OnceLock<Vec<Captured>> = std::sync::OnceLock::new();
    CAPTURES.get_or_init(amqp_captures)
}

fn captured_sqs() -> &'static [String] {
    static CAPTURES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    CAPTURES.get_or_init(sqs_captures)
}

/// `depth` nested arrays around `inner`, built and dropped without
/// recursion (serde_json's `Drop` of a `Value` recurses).
fn deep_array(depth: usize, inner: Value) -> Value {
    let mut value = inner;
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    value
}

fn drop_iteratively(value: Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(entries) => stack.extend(entries.into_iter().map(|(_, value)| value)),
            _ => {}
        }
    }
}

/// The decoded task carries what `task` was encoded with.
fn assert_same_task(decoded: &DecodedTask, task: &Task, origin: &str) -> Result<(), TestCaseError> {
    let id = task.id.to_string();
    prop_assert_eq!(&decoded.id, &id);
    prop_assert_eq!(decoded.task.as_str(), task.task.as_str());
    prop_assert_eq!(&decoded.args, &task.args);
    prop_assert_eq!(&decoded.kwargs, &task.kwargs);
    prop_assert_eq!(decoded.eta, task.eta);
    prop_assert_eq!(decoded.expires, task.expires);
    prop_assert_eq!(&decoded.parent_id, &task.parent_id);
    let root_id = task.root_id.clone().filter(|root| !root.is_empty()).unwrap_or(id);
    prop_assert_eq!(decoded.root_id.as_ref(), Some(&root_id));
    prop_assert_eq!(&decoded.group, &task.group);
    prop_assert_eq!(decoded.time_limit, task.time_limit);
    prop_assert_eq!(decoded.soft_time_limit, task.soft_time_limit);
    prop_assert_eq!(decoded.retries, 0);
    prop_assert_eq!(decoded.origin.as_deref(), Some(origin));
    prop_assert_eq!(decoded.argsrepr.clone(), Some(python_repr::args_repr(&task.args)));
    prop_assert_eq!(decoded.kwargsrepr.clone(), Some(python_repr::kwargs_repr(&task.kwargs)));
    Ok(())
}

// ------------------------------------------------------------ properties

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn amqp_messages_of_random_parts_never_panic(
        headers in json_object(),
        body in prop_oneof![vec(any::<u8>(), 0..256), json_value().prop_map(|value| value.to_string().into_bytes())],
        content_type in prop_oneof![Just(CONTENT_TYPE_JSON.to_owned()), ".{0,20}"],
        content_encoding in proptest::option::of(prop_oneof![Just("utf-8".to_owned()), ".{0,8}"]),
    ) {
        let _ = consume_amqp(&headers, &body, &content_type, content_encoding.as_deref());
    }

    #[test]
    fn captured_amqp_messages_mutated_never_panic(
        which in any::<Index>(),
        body_edits in vec(mutation(TOKENS), 0..8),
        header_edits in vec((select(HEADER_NAMES), proptest::option::of(json_value())), 0..4),
        time_edits in vec((prop_oneof![Just("eta"), Just("expires")], python_time(), mutations()), 0..2),
    ) {
        let captured = &captured_amqp()[which.index(captured_amqp().len())];
        let body = mutated(&captured.body, &body_edits);
        let mut headers = captured.headers.clone();
        for (name, value) in header_edits {
            match value {
                Some(value) => headers.insert(name.to_owned(), value),
                None => headers.remove(name),
            };
        }
        for (name, time, edits) in time_edits {
            let text = mutated(python_isoformat(time).as_bytes(), &edits);
            headers.insert(name.to_owned(), String::from_utf8_lossy(&text).into_owned().into());
        }
        let _ = consume_amqp(&headers, &body, &captured.content_type, captured.content_encoding.as_deref());
    }

    #[test]
    fn sqs_bodies_of_random_text_never_panic(
        text in prop_oneof![
            ".{0,200}",
            vec(any::<u8>(), 0..200).prop_map(|bytes| BASE64.encode(bytes)),
            json_value().prop_map(|value| value.to_string()),
            json_object().prop_map(|envelope| BASE64.encode(Value::Object(envelope).to_string())),
        ],
    ) {
        let _ = consume_sqs(&text);
    }

    #[test]
    fn captured_sqs_messages_mutated_never_panic(
        which in any::<Index>(),
        layer in 0..4u8,
        edits in mutations(),
    ) {
        let captured = &captured_sqs()[which.index(captured_sqs().len())];
        let envelope = BASE64.decode(captured).expect("captured envelope is base64");
        let text = match layer {
            // The base64 text itself.
            0 => String::from_utf8_lossy(&mutated(captured.as_bytes(), &edits)).into_owned(),
            // The envelope JSON, sent plain (sqs_base64_encoding=False)...
            1 => String::from_utf8_lossy(&mutated(&envelope, &edits)).into_owned(),
            // ...or base64-encoded again.
            2 => BASE64.encode(mutated(&envelope, &edits)),
            // The Celery body inside the envelope.
            _ => {
                let mut envelope: Map<String, Value> = serde_json::from_slice(&envelope).expect("captured envelope");
                let body = BASE64
                    .decode(envelope["body"].as_str().expect("envelope body"))
                    .expect("captured body is base64");
                envelope.insert("body".into(), BASE64.encode(mutated(&body, &edits)).into());
                BASE64.encode(Value::Object(envelope).to_string())
            }
        };
        let _ = consume_sqs(&text);
    }

    #[test]
    fn isoformat_parser_never_panics(
        text in prop_oneof![
            ".{0,40}",
            (python_time(), mutations()).prop_map(|(time, edits)| {
                String::from_utf8_lossy(&mutated(python_isoformat(time).as_bytes(), &edits)).into_owned()
            }),
        ],
    ) {
        let _ = parse_python_isoformat(&text);
    }

    #[test]
    fn isoformat_round_trips(time in python_time()) {
        prop_assert_eq!(parse_python_isoformat(&python_isoformat(time)), Some(time));
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn encoded_tasks_decode_back_over_amqp(task in task(), now in python_time()) {
        let message = encode_at(&task, "gen1@host", now);
        let decoded = decode_task_message(
            &message.headers,
            &message.body,
            message.properties.content_type,
            Some(message.properties.content_encoding),
        );
        prop_assert!(decoded.is_ok(), "{:?}", decoded);
        assert_same_task(&decoded.unwrap(), &task, "gen1@host")?;
        prop_assert!(consume_amqp(
            &message.headers,
            &message.body,
            message.properties.content_type,
            None
        )
        .is_ok());
    }

    #[test]
    fn encoded_tasks_decode_back_through_the_sqs_envelope(
        task in task(),
        now in python_time(),
        routing_key in "[a-z.]{0,12}",
        plain in any::<bool>(),
    ) {
        let message = encode_at(&task, "gen2@host", now);
        let mut text = sqs_message_body(&message, "task_exchange", &routing_key, "tag");
        if plain {
            text = String::from_utf8(BASE64.decode(&text).expect("base64")).expect("ASCII JSON");
        }
        let decoded = decode_sqs_message_body(&text);
        prop_assert!(decoded.is_ok(), "{:?}", decoded);
        let decoded = decoded.unwrap();
        assert_same_task(&decoded.task, &task, "gen2@host")?;
        prop_assert_eq!(&decoded.headers, &message.headers);
        prop_assert_eq!(&decoded.body, &message.body);
        prop_assert_eq!(
            decoded.properties["delivery_info"]["routing_key"].as_str(),
            Some(routing_key.as_str())
        );
        prop_assert!(consume_sqs(&text).is_ok());
    }

    #[test]
    fn python_reprs_never_panic(
        value in json_value(),
        args in vec(json_value(), 0..6),
        kwargs in json_object(),
        max_len in proptest::option::of(0..2048usize),
        max_levels in 0..6usize,
    ) {
        let _ = python_repr::args_repr(&args);
        let _ = python_repr::kwargs_repr(&kwargs);
        let _ = python_repr::saferepr(PyObject::Json(&value), max_len, max_levels);
        let _ = python_repr::saferepr(PyObject::Tuple(&args), max_len, max_levels);
        let _ = python_repr::saferepr(PyObject::Dict(&kwargs), max_len, max_levels);
    }

    #[test]
    fn python_json_reads_back_as_the_same_value(value in json_value()) {
        let bytes = python_json::to_vec(&value).expect("a JSON value serializes");
        prop_assert!(bytes.is_ascii());
        let back: Value = serde_json::from_slice(&bytes).expect("json.dumps output is JSON");
        prop_assert_eq!(back, value);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn float_repr_reads_back_as_the_same_float(bits in any::<u64>()) {
        let value = f64::from_bits(bits);
        let text = python_repr::float_repr(value);
        let back: f64 = text.parse().expect("Python's float repr parses");
        if value.is_nan() {
            prop_assert!(back.is_nan());
        } else {
            prop_assert_eq!(back.to_bits(), value.to_bits(), "{}", text);
        }
    }
}

// ------------------------------------------------------- deep nesting

#[test]
fn deeply_nested_amqp_bodies_are_refused_not_overflowed() {
    let captured = &captured_amqp()[0];
    for body in [
        nested(DEEP, "[", "", "]").into_bytes(),
        nested(DEEP, "[", "", "").into_bytes(),
        nested(DEEP, "{\"a\":", "1", "}").into_bytes(),
        [b"[[".as_slice(), nested(DEEP, "[", "", "]").as_bytes(), b"], {}, null]"].concat(),
        [
            b"[[], ".as_slice(),
            nested(DEEP, "{\"k\": ", "null", "}").as_bytes(),
            b", null]",
        ]
        .concat(),
    ] {
        let error = consume_amqp(&captured.headers, &body, CONTENT_TYPE_JSON, None).unwrap_err();
        assert!(matches!(error, DecodeError::BodyNotJson(_)), "{error}");
    }
}

#[test]
fn deeply_nested_sqs_envelopes_are_refused_not_overflowed() {
    let deep_headers = [
        b"{\"body\": \"\", \"content-type\": \"application/json\", \"content-encoding\": \"utf-8\", \"headers\": "
            .as_slice(),
        nested(DEEP, "{\"h\": ", "[]", "}").as_bytes(),
        b"}",
    ]
    .concat();
    let deep_body = format!(
        "{{\"body\": \"{}\", \"content-type\": \"application/json\", \"content-encoding\": \"utf-8\", \
         \"properties\": {{\"body_encoding\": \"base64\"}}, \"headers\": {{\"id\": \"x\", \"task\": \"t\"}}}}",
        BASE64.encode(nested(DEEP, "[", "", "]"))
    );
    for envelope in [
        nested(DEEP, "[", "", "]").into_bytes(),
        deep_headers,
        deep_body.into_bytes(),
    ] {
        let plain = String::from_utf8(envelope).expect("ASCII");
        assert!(consume_sqs(&plain).is_err());
        assert!(consume_sqs(&BASE64.encode(&plain)).is_err());
    }
}

#[test]
fn saferepr_walks_any_depth_without_recursion() {
    let deep = deep_array(DEEP, Value::from(1));
    let whole = python_repr::saferepr(PyObject::Json(&deep), None, 0);
    let limited = python_repr::saferepr(PyObject::Json(&deep), Some(python_repr::ARGSREPR_MAX_LEN), 3);
    let args = vec![deep];
    let args_repr = python_repr::args_repr(&args);
    // Dropped before any assertion: unwinding would drop it recursively.
    args.into_iter().for_each(drop_iteratively);
    assert!(whole == format!("{}1{}", "[".repeat(DEEP), "]".repeat(DEEP)));
    assert_eq!(limited, "[[[[...]]]]");
    assert_eq!(args_repr, "[[[[...]]]]");
}

#[test]
fn python_json_writes_the_deepest_value_serde_json_reads() {
    // serde_json refuses more than 128 levels, so no deeper value reaches
    // the writer from a request, a stored task or a message.
    let deepest = deep_array(125, json!({"a": [1.5, "é"]}));
    let text = python_json::to_vec(&deepest).expect("serializes");
    let back: Value = serde_json::from_slice(&text).expect("reads back");
    assert_eq!(back, deepest);
    assert!(serde_json::from_slice::<Value>(nested(129, "[", "", "]").as_bytes()).is_err());
}
