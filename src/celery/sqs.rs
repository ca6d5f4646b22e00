//! kombu's SQS message envelope (kombu 5.7 `transport/virtual/base.py`
//! `prepare_message` / `_inplace_augment_message` and
//! `transport/SQS/__init__.py` `_put`), in both directions.
//!
//! Owns: [`sqs_message_body`] (what goes into `SendMessage`'s `MessageBody`)
//! and [`decode_sqs_message_body`].
//!
//! Invariants: the envelope is `base64(json.dumps(envelope))` with the
//! Celery body itself base64-encoded inside (`body_encoding: "base64"`), and
//! every key in kombu's order:
//! `{"body", "content-encoding", "content-type", "headers", "properties":
//! {"correlation_id", "reply_to", <caller properties>, "delivery_mode",
//! ["expiration"], "delivery_info": {"exchange", "routing_key"}, "priority",
//! "body_encoding", "delivery_tag"}}`. SQS has no exchanges, so
//! `delivery_info` only records what kombu would have used; a worker reads
//! `routing_key` from it.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::decode::{decode_task_message, DecodeError, DecodedTask};
use super::{python_json, CeleryMessage};

/// kombu's virtual transports encode bodies with this codec by default.
const BODY_ENCODING_BASE64: &str = "base64";

/// A message read from SQS: the envelope parts and the task inside.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedMessage {
    pub content_type: String,
    pub content_encoding: String,
    pub headers: Map<String, Value>,
    /// The envelope properties as sent (`delivery_info`, `delivery_tag`...).
    pub properties: Map<String, Value>,
    /// The Celery body bytes, after undoing `body_encoding`.
    pub body: Vec<u8>,
    pub task: DecodedTask,
}

/// The SQS `MessageBody` for `message`, as kombu's SQS transport writes it
/// with its default `sqs_base64_encoding=True`. `delivery_tag` is kombu's
/// per-publish `uuid()`; pass a fresh one for each queue the message is
/// copied to.
pub fn sqs_message_body(message: &CeleryMessage, exchange: &str, routing_key: &str, delivery_tag: &str) -> String {
    let envelope = envelope(message, exchange, routing_key, delivery_tag);
    // A JSON value with string keys always serializes.
    let json = python_json::to_string(&envelope).expect("an SQS envelope always serializes");
    BASE64.encode(json)
}

fn envelope(message: &CeleryMessage, exchange: &str, routing_key: &str, delivery_tag: &str) -> Value {
    let properties = &message.properties;
    let mut envelope_properties = Map::new();
    envelope_properties.insert("correlation_id".into(), properties.correlation_id.clone().into());
    // `as_task_v2` writes `reply_to or ''`.
    envelope_properties.insert(
        "reply_to".into(),
        properties.reply_to.clone().unwrap_or_default().into(),
    );
    // Celery's `properties.update(options)`: caller properties come next.
    // Reserved names were filtered by `encode`; insert() would overwrite in
    // place anyway, and the values set below win.
    for (name, value) in &properties.extra {
        envelope_properties.insert(name.clone(), value.clone());
    }
    envelope_properties.insert("delivery_mode".into(), properties.delivery_mode.into());
    if let Some(expiration) = &properties.expiration {
        envelope_properties.insert("expiration".into(), expiration.clone().into());
    }
    let mut delivery_info = Map::new();
    delivery_info.insert("exchange".into(), exchange.into());
    delivery_info.insert("routing_key".into(), routing_key.into());
    envelope_properties.insert("delivery_info".into(), Value::Object(delivery_info));
    envelope_properties.insert("priority".into(), properties.priority.into());
    envelope_properties.insert("body_encoding".into(), BODY_ENCODING_BASE64.into());
    envelope_properties.insert("delivery_tag".into(), delivery_tag.into());

    let mut envelope = Map::new();
    envelope.insert("body".into(), BASE64.encode(&message.body).into());
    envelope.insert("content-encoding".into(), properties.content_encoding.into());
    envelope.insert("content-type".into(), properties.content_type.into());
    envelope.insert("headers".into(), Value::Object(message.headers.clone()));
    envelope.insert("properties".into(), Value::Object(envelope_properties));
    Value::Object(envelope)
}

/// Reads an SQS `MessageBody` written by kombu (or [`sqs_message_body`]).
/// Like kombu, accepts the envelope base64-encoded or as plain JSON
/// (`sqs_base64_encoding=False`). Non-JSON content types are refused.
pub fn decode_sqs_message_body(text: &str) -> Result<DecodedMessage, DecodeError> {
    let text = text.trim();
    let envelope_json = if text.starts_with('{') {
        text.as_bytes().to_vec()
    } else {
        BASE64.decode(text).map_err(|source| DecodeError::Base64 {
            part: "SQS message body",
            source,
        })?
    };
    let envelope: Map<String, Value> = serde_json::from_slice(&envelope_json).map_err(DecodeError::EnvelopeNotJson)?;

    let content_type = envelope_text(&envelope, "content-type")?;
    let content_encoding = envelope_text(&envelope, "content-encoding")?;
    let headers = match envelope.get("headers") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(headers)) => headers.clone(),
        Some(_) => return Err(field_error("headers", "not an object")),
    };
    let properties = match envelope.get("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(properties)) => properties.clone(),
        Some(_) => return Err(field_error("properties", "not an object")),
    };
    let body_text = envelope_text(&envelope, "body")?;
    // kombu's `decode_body`: no encoding or utf-8 means the text itself.
    let body = match properties.get("body_encoding") {
        None | Some(Value::Null) => body_text.into_bytes(),
        Some(Value::String(encoding)) if encoding.eq_ignore_ascii_case(BODY_ENCODING_BASE64) => {
            BASE64.decode(body_text.trim()).map_err(|source| DecodeError::Base64 {
                part: "envelope body",
                source,
            })?
        }
        Some(Value::String(encoding)) if encoding.eq_ignore_ascii_case("utf-8") => body_text.into_bytes(),
        Some(other) => {
            return Err(DecodeError::UnsupportedBodyEncoding(
                other.as_str().map_or_else(|| other.to_string(), str::to_owned),
            ))
        }
    };

    let task = decode_task_message(&headers, &body, &content_type, Some(&content_encoding))?;
    Ok(DecodedMessage {
        content_type,
        content_encoding,
        headers,
        properties,
        body,
        task,
    })
}

fn envelope_text(envelope: &Map<String, Value>, field: &'static str) -> Result<String, DecodeError> {
    match envelope.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        None => Err(field_error(field, "missing")),
        Some(_) => Err(field_error(field, "not a string")),
    }
}

fn field_error(field: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::EnvelopeField { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::celery::test_support::{load_fixture, sample_task, task_like_capture};
    use crate::celery::{default_origin, encode, CONTENT_TYPE_JSON};
    use serde_json::json;

    fn decode_base64_json(text: &str) -> Value {
        let bytes = BASE64.decode(text).expect("base64");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    fn without_per_message_fields(mut envelope: Value) -> Value {
        let properties = envelope["properties"].as_object_mut().unwrap();
        properties.remove("delivery_tag");
        properties.remove("reply_to");
        envelope["headers"].as_object_mut().unwrap().remove("origin");
        envelope
    }

    #[test]
    fn sqs_capture_matches_field_by_field_and_byte_for_byte() {
        let capture = load_fixture("celery-5.7-sqs-messages.json");
        let messages = capture["messages"].as_array().expect("messages array");
        assert!(!messages.is_empty(), "the SQS capture holds no messages");

        for captured in messages {
            let message_body = captured["MessageBody"].as_str().expect("MessageBody");
            let captured_envelope = decode_base64_json(message_body);
            assert_eq!(captured_envelope, captured["decoded_envelope"]);

            // Our decoder reads the captured message.
            let decoded = decode_sqs_message_body(message_body).expect("capture decodes");
            assert_eq!(decoded.content_type, CONTENT_TYPE_JSON);
            assert_eq!(decoded.content_encoding, "utf-8");
            assert_eq!(Value::Object(decoded.headers.clone()), captured_envelope["headers"]);
            assert_eq!(
                Value::Object(decoded.properties.clone()),
                captured_envelope["properties"]
            );
            let captured_body: Value = serde_json::from_slice(&decoded.body).unwrap();
            assert_eq!(captured_body, captured["decoded_body"]);
            assert_eq!(Value::Array(decoded.task.args.clone()), captured_body[0]);
            assert_eq!(Value::Object(decoded.task.kwargs.clone()), captured_body[1]);
            assert_eq!(decoded.task.id, captured_envelope["headers"]["id"]);

            // The same task encoded by us gives the same envelope.
            let delivery_info = &captured_envelope["properties"]["delivery_info"];
            let exchange = delivery_info["exchange"].as_str().unwrap();
            let routing_key = delivery_info["routing_key"].as_str().unwrap();
            let task = task_like_capture(&decoded.headers, &decoded.task.args, &decoded.task.kwargs, routing_key);
            let mut message = encode(&task, &default_origin());
            let ours = sqs_message_body(&message, exchange, routing_key, "our-delivery-tag");
            let our_envelope = decode_base64_json(&ours);
            assert_eq!(
                without_per_message_fields(our_envelope.clone()),
                without_per_message_fields(captured_envelope.clone())
            );
            // Key order too (Value equality ignores it).
            assert_eq!(
                python_json::to_string(&without_per_message_fields(our_envelope.clone())).unwrap(),
                python_json::to_string(&without_per_message_fields(captured_envelope.clone())).unwrap()
            );
            // The body round-trips and is the captured body byte for byte.
            let our_body = BASE64.decode(our_envelope["body"].as_str().unwrap()).unwrap();
            assert_eq!(our_body, message.body);
            assert_eq!(our_body, decoded.body);

            // With the per-message values put back, the MessageBody is the
            // captured one exactly.
            message.properties.reply_to = captured_envelope["properties"]["reply_to"].as_str().map(str::to_owned);
            message
                .headers
                .insert("origin".into(), captured_envelope["headers"]["origin"].clone());
            let delivery_tag = captured_envelope["properties"]["delivery_tag"].as_str().unwrap();
            assert_eq!(
                sqs_message_body(&message, exchange, routing_key, delivery_tag),
                message_body
            );
        }
    }

    #[test]
    fn caller_properties_and_expiration_sit_where_kombu_puts_them() {
        let mut task = sample_task(vec![], Map::new());
        task.properties = json!({"creator_id": 42}).as_object().unwrap().clone();
        task.priority = Some(3);
        let mut message = encode(&task, "o");
        message.properties.expiration = Some("5000".into());
        let envelope = decode_base64_json(&sqs_message_body(&message, "ex", "rk", "tag"));
        let keys: Vec<&String> = envelope["properties"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "correlation_id",
                "reply_to",
                "creator_id",
                "delivery_mode",
                "expiration",
                "delivery_info",
                "priority",
                "body_encoding",
                "delivery_tag"
            ]
        );
        assert_eq!(envelope["properties"]["reply_to"], "");
        assert_eq!(envelope["properties"]["priority"], 3);
        assert_eq!(
            envelope["properties"]["delivery_info"],
            json!({"exchange": "ex", "routing_key": "rk"})
        );
    }

    #[test]
    fn round_trip_preserves_unicode_body() {
        let task = sample_task(
            vec![json!("emoji 😀"), json!({"k": [1.0, 1e16, null]})],
            json!({"quote": "it's \"x\""}).as_object().unwrap().clone(),
        );
        let message = encode(&task, "o");
        let text = sqs_message_body(&message, "ex", "rk", "tag");
        assert!(text.is_ascii());
        let decoded = decode_sqs_message_body(&text).unwrap();
        assert_eq!(decoded.body, message.body);
        assert_eq!(decoded.headers, message.headers);
        assert_eq!(decoded.task.args, task.args);
        assert_eq!(decoded.task.kwargs, task.kwargs);
    }

    #[test]
    fn plain_json_envelope_is_accepted() {
        let message = encode(&sample_task(vec![json!(1)], Map::new()), "o");
        let envelope = envelope(&message, "ex", "rk", "tag");
        let decoded = decode_sqs_message_body(&envelope.to_string()).unwrap();
        assert_eq!(decoded.task.args, vec![json!(1)]);
    }

    #[test]
    fn malformed_envelopes_are_typed_errors() {
        assert!(matches!(
            decode_sqs_message_body("not base64 !!"),
            Err(DecodeError::Base64 { .. })
        ));
        assert!(matches!(
            decode_sqs_message_body(&BASE64.encode("[1, 2]")),
            Err(DecodeError::EnvelopeNotJson(_))
        ));
        assert!(matches!(
            decode_sqs_message_body(r#"{"content-type": "application/json"}"#),
            Err(DecodeError::EnvelopeField {
                field: "content-encoding",
                ..
            })
        ));

        let message = encode(&sample_task(vec![], Map::new()), "o");
        let mut pickled = envelope(&message, "ex", "rk", "tag");
        pickled["content-type"] = "application/x-python-serialize".into();
        assert!(matches!(
            decode_sqs_message_body(&BASE64.encode(pickled.to_string())),
            Err(DecodeError::UnsupportedContentType { .. })
        ));

        let mut odd = envelope(&message, "ex", "rk", "tag");
        odd["properties"]["body_encoding"] = "rot13".into();
        assert!(matches!(
            decode_sqs_message_body(&odd.to_string()),
            Err(DecodeError::UnsupportedBodyEncoding(encoding)) if encoding == "rot13"
        ));
    }
}
