//! Property tests of the tracking consumer's AMQP decoding (issue 14,
//! "Decoders never panic"): a delivery's headers arrive as an AMQP field
//! table (bytes that lapin parses), become JSON in [`field_table_to_json`],
//! and are then decoded with the body by [`decode_task_message`] into a
//! [`TaskRecord`]. Anyone who can publish to the exchange chooses those
//! bytes: random tables, random bytes, the captured Celery headers encoded
//! and then mutated, must each give a record or a refusal, never a panic.
//! JSON headers written as py-amqp writes them read back unchanged.
//! (The body and the SQS path are covered in `celery/decode_proptests.rs`.)

use super::*;
use crate::celery::CONTENT_TYPE_JSON;
use crate::proptest_support::{config, mutated, mutation_without_overwrite, HEADER_NAMES};
use lapin::types::parsing::parse_field_table;
use lapin::types::{ByteArray, DecimalValue, FieldArray, LongString, ShortString};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Number;

// ---------------------------------------------- AMQP field-table bytes

/// An AMQP 0-9-1 field value as RabbitMQ and py-amqp write it.
fn put_value(out: &mut Vec<u8>, value: &AMQPValue) {
    let long = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    match value {
        AMQPValue::Boolean(flag) => out.extend([b't', u8::from(*flag)]),
        AMQPValue::ShortShortInt(n) => out.extend([b'b', *n as u8]),
        AMQPValue::ShortShortUInt(n) => out.extend([b'B', *n]),
        AMQPValue::ShortInt(n) => {
            out.push(b's');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::ShortUInt(n) => {
            out.push(b'u');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::LongInt(n) => {
            out.push(b'I');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::LongUInt(n) => {
            out.push(b'i');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::LongLongInt(n) => {
            out.push(b'l');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::Float(n) => {
            out.push(b'f');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::Double(n) => {
            out.push(b'd');
            out.extend(n.to_be_bytes());
        }
        AMQPValue::DecimalValue(decimal) => {
            out.extend([b'D', decimal.scale]);
            out.extend(decimal.value.to_be_bytes());
        }
        // Has no type tag on the wire; written as a long string.
        AMQPValue::ShortString(text) => {
            out.push(b'S');
            long(out, text.as_str().as_bytes());
        }
        AMQPValue::LongString(text) => {
            out.push(b'S');
            long(out, text.as_bytes());
        }
        AMQPValue::FieldArray(items) => {
            out.push(b'A');
            let mut inner = Vec::new();
            for item in items.as_slice() {
                put_value(&mut inner, item);
            }
            long(out, &inner);
        }
        AMQPValue::Timestamp(seconds) => {
            out.push(b'T');
            out.extend(seconds.to_be_bytes());
        }
        AMQPValue::FieldTable(table) => {
            out.push(b'F');
            put_table(out, table);
        }
        AMQPValue::ByteArray(bytes) => {
            out.push(b'x');
            long(out, bytes.as_slice());
        }
        AMQPValue::Void => out.push(b'V'),
    }
}

fn put_table(out: &mut Vec<u8>, table: &FieldTable) {
    let mut inner = Vec::new();
    for (key, value) in table.inner() {
        inner.push(key.as_str().len() as u8);
        inner.extend_from_slice(key.as_str().as_bytes());
        put_value(&mut inner, value);
    }
    out.extend_from_slice(&(inner.len() as u32).to_be_bytes());
    out.extend_from_slice(&inner);
}

fn table_bytes(table: &FieldTable) -> Vec<u8> {
    let mut out = Vec::new();
    put_table(&mut out, table);
    out
}

/// JSON headers as py-amqp encodes Celery's header dict.
fn json_to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => AMQPValue::LongLongInt(integer),
            None => AMQPValue::Double(number.as_f64().unwrap_or_default()),
        },
        Value::String(text) => AMQPValue::LongString(LongString::from(text.as_bytes().to_vec())),
        Value::Array(items) => {
            AMQPValue::FieldArray(FieldArray::from(items.iter().map(json_to_amqp).collect::<Vec<_>>()))
        }
        Value::Object(entries) => AMQPValue::FieldTable(json_to_table(entries)),
    }
}

fn json_to_table(entries: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key.clone()), json_to_amqp(value));
    }
    table
}

/// What the consumer does with one delivery's header bytes and body.
fn consume(header_bytes: &[u8], body: &[u8]) {
    let Ok((_, table)) = parse_field_table(header_bytes) else {
        return;
    };
    let headers = field_table_to_json(&table);
    if let Ok(task) = decode_task_message(&headers, body, CONTENT_TYPE_JSON, Some("utf-8")) {
        let _ = TaskRecord::from_message(&task, &headers, &Map::new(), Some("rawa"), Some(0), Utc::now());
    }
}

/// The first captured Celery message: its headers and body.
fn captured() -> &'static (Map<String, Value>, Vec<u8>) {
    static CAPTURED: std::sync::OnceLock<(Map<String, Value>, Vec<u8>)> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let fixture = crate::celery::test_support::load_fixture("celery-5.7-amqp-messages.json");
        let message = &fixture["messages"][0];
        (
            message["properties"]["headers"]
                .as_object()
                .expect("captured headers")
                .clone(),
            message["body"].as_str().expect("captured body").as_bytes().to_vec(),
        )
    })
}

// ------------------------------------------------------------ generators

fn key() -> impl Strategy<Value = String> {
    prop_oneof![select(HEADER_NAMES).prop_map(str::to_owned), ".{0,12}"]
}

fn amqp_leaf() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>()
            .prop_filter("comparable", |n| !n.is_nan())
            .prop_map(AMQPValue::Float),
        any::<f64>()
            .prop_filter("comparable", |n| !n.is_nan())
            .prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        vec(any::<u8>(), 0..12).prop_map(|bytes| AMQPValue::LongString(LongString::from(bytes))),
        ".{0,12}".prop_map(|text: String| AMQPValue::LongString(LongString::from(text.into_bytes()))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        vec(any::<u8>(), 0..12).prop_map(|bytes| AMQPValue::ByteArray(ByteArray::from(bytes))),
        Just(AMQPValue::Void),
    ]
}

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    amqp_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|items| AMQPValue::FieldArray(FieldArray::from(items))),
            vec((key(), inner), 0..6).prop_map(|entries| AMQPValue::FieldTable(table_of(entries))),
        ]
    })
}

fn table_of(entries: Vec<(String, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key), value);
    }
    table
}

fn amqp_table() -> impl Strategy<Value = FieldTable> {
    vec((key(), amqp_value()), 0..10).prop_map(table_of)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key(), inner), 0..6).prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

fn json_headers() -> impl Strategy<Value = Map<String, Value>> {
    vec((key(), json_value()), 0..10).prop_map(|entries| entries.into_iter().collect())
}

/// Bytes that steer a mutation into the field table's type tags and
/// length prefixes.
const TOKENS: &[&[u8]] = &[
    b"S",
    b"A",
    b"F",
    b"x",
    b"V",
    b"T",
    b"D",
    b"l",
    b"d",
    b"t",
    b"\0\0\0\0",
    b"\xff\xff\xff\xff",
    b"\0\0\x01\0",
    b"\x7f\xff\xff\xff",
];

// ------------------------------------------------------------ properties

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn random_header_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        consume(&bytes, &captured().1);
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        consume(&framed, &captured().1);
    }

    #[test]
    fn random_header_tables_never_panic(table in amqp_table(), overlay in any::<bool>()) {
        let table = if overlay {
            // The captured headers with random values over some of them.
            let mut headers = json_to_table(&captured().0);
            for (key, value) in table.inner() {
                headers.insert(key.clone(), value.clone());
            }
            headers
        } else {
            table
        };
        let bytes = table_bytes(&table);
        let parsed = parse_field_table(bytes.as_slice()).map(|(_, parsed)| parsed);
        prop_assert!(parsed.as_ref().is_ok_and(|parsed| *parsed == table), "{:?}", parsed);
        consume(&bytes, &captured().1);
    }

    #[test]
    fn captured_headers_mutated_never_panic(
        edits in vec(mutation_without_overwrite(TOKENS), 1..8),
        body_edits in vec(mutation_without_overwrite(TOKENS), 0..3),
    ) {
        let bytes = mutated(&table_bytes(&json_to_table(&captured().0)), &edits);
        consume(&bytes, &mutated(&captured().1, &body_edits));
    }

    #[test]
    fn json_headers_read_back_unchanged(headers in json_headers()) {
        let bytes = table_bytes(&json_to_table(&headers));
        let (rest, table) = parse_field_table(bytes.as_slice()).expect("py-amqp's encoding parses");
        prop_assert!(rest.is_empty());
        prop_assert_eq!(field_table_to_json(&table), headers);
    }
}

#[test]
fn captured_headers_read_back_and_decode() {
    let (headers, body) = captured();
    let bytes = table_bytes(&json_to_table(headers));
    let (_, table) = parse_field_table(bytes.as_slice()).expect("parses");
    let read = field_table_to_json(&table);
    assert_eq!(&read, headers);
    let task = decode_task_message(&read, body, CONTENT_TYPE_JSON, Some("utf-8")).expect("decodes");
    assert_eq!(task.task, "rawa.add");
}
