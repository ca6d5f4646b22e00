//! Reading Celery protocol v2 task messages back (for the tracking-queue
//! consumer and for tests), from the broker-neutral parts: headers, body
//! bytes, content type and encoding.
//!
//! Owns: [`DecodedTask`], [`DecodeError`] (also used by [`super::sqs`]) and
//! [`decode_task_message`].
//!
//! Invariants: only JSON bodies are ever parsed; any other content type
//! (pickle above all, which would mean executing attacker-chosen code in
//! Python and is meaningless here) is refused with
//! [`DecodeError::UnsupportedContentType`] before the body is looked at. A
//! message that decodes has the v2 shape: `task` and `id` headers, and a
//! body `[args (list), kwargs (dict), embed (dict or null)]`.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::{CONTENT_ENCODING_UTF8, CONTENT_TYPE_JSON};

/// Why a message could not be read as a Celery protocol v2 JSON task.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("content type {content_type:?} is not supported; only {CONTENT_TYPE_JSON} is")]
    UnsupportedContentType { content_type: String },
    #[error("content encoding {content_encoding:?} is not supported; only utf-8 is")]
    UnsupportedContentEncoding { content_encoding: String },
    #[error("header {name:?} is missing (not a Celery protocol v2 task message)")]
    MissingHeader { name: &'static str },
    #[error("header {name:?} is invalid: {reason}")]
    InvalidHeader { name: &'static str, reason: String },
    #[error("body is not valid JSON: {0}")]
    BodyNotJson(#[source] serde_json::Error),
    #[error("body is not a protocol v2 body [args, kwargs, embed]: {reason}")]
    BodyShape { reason: &'static str },
    #[error("{part} is not valid base64: {source}")]
    Base64 {
        part: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("SQS message envelope is not valid JSON: {0}")]
    EnvelopeNotJson(#[source] serde_json::Error),
    #[error("SQS message envelope field {field:?} is invalid: {reason}")]
    EnvelopeField { field: &'static str, reason: &'static str },
    #[error("SQS body encoding {0:?} is not supported; only base64 and utf-8 are")]
    UnsupportedBodyEncoding(String),
}

/// The task fields of a decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedTask {
    /// The task id as sent (Celery ids are UUIDs, but other producers may
    /// use any string).
    pub id: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// The body's third element (`callbacks`, `errbacks`, `chain`, `chord`).
    pub embed: Map<String, Value>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub shadow: Option<String>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub retries: u64,
    /// `timelimit[0]`, seconds.
    pub time_limit: Option<f64>,
    /// `timelimit[1]`, seconds.
    pub soft_time_limit: Option<f64>,
    pub origin: Option<String>,
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
}

/// Decodes a task from its parts, as an AMQP consumer receives them
/// (`content_encoding` may be absent in AMQP properties).
pub fn decode_task_message(
    headers: &Map<String, Value>,
    body: &[u8],
    content_type: &str,
    content_encoding: Option<&str>,
) -> Result<DecodedTask, DecodeError> {
    // kombu matches serializer names exactly; so do we.
    if content_type != CONTENT_TYPE_JSON {
        return Err(DecodeError::UnsupportedContentType {
            content_type: content_type.to_owned(),
        });
    }
    if let Some(encoding) = content_encoding {
        let utf8 = encoding.is_empty()
            || encoding.eq_ignore_ascii_case(CONTENT_ENCODING_UTF8)
            || encoding.eq_ignore_ascii_case("utf8");
        if !utf8 {
            return Err(DecodeError::UnsupportedContentEncoding {
                content_encoding: encoding.to_owned(),
            });
        }
    }

    let (args, kwargs, embed) = decode_body(body)?;
    let (time_limit, soft_time_limit) = time_limits(headers)?;
    Ok(DecodedTask {
        id: required_text(headers, "id")?,
        task: required_text(headers, "task")?,
        args,
        kwargs,
        embed,
        root_id: optional_text(headers, "root_id")?,
        parent_id: optional_text(headers, "parent_id")?,
        group: optional_text(headers, "group")?,
        shadow: optional_text(headers, "shadow")?,
        eta: optional_time(headers, "eta")?,
        expires: optional_time(headers, "expires")?,
        retries: retries(headers)?,
        time_limit,
        soft_time_limit,
        origin: optional_text(headers, "origin")?,
        argsrepr: optional_text(headers, "argsrepr")?,
        kwargsrepr: optional_text(headers, "kwargsrepr")?,
    })
}

type BodyParts = (Vec<Value>, Map<String, Value>, Map<String, Value>);

fn decode_body(body: &[u8]) -> Result<BodyParts, DecodeError> {
    let value: Value = serde_json::from_slice(body).map_err(DecodeError::BodyNotJson)?;
    let Value::Array(parts) = value else {
        return Err(DecodeError::BodyShape {
            reason: "not a JSON array",
        });
    };
    let Ok([args, kwargs, embed]) = <[Value; 3]>::try_from(parts) else {
        return Err(DecodeError::BodyShape {
            reason: "not exactly three elements",
        });
    };
    let Value::Array(args) = args else {
        return Err(DecodeError::BodyShape {
            reason: "args is not a list",
        });
    };
    let Value::Object(kwargs) = kwargs else {
        return Err(DecodeError::BodyShape {
            reason: "kwargs is not a dict",
        });
    };
    let embed = match embed {
        Value::Object(embed) => embed,
        Value::Null => Map::new(),
        _ => {
            return Err(DecodeError::BodyShape {
                reason: "embed is not a dict",
            })
        }
    };
    Ok((args, kwargs, embed))
}

fn required_text(headers: &Map<String, Value>, name: &'static str) -> Result<String, DecodeError> {
    optional_text(headers, name)?.ok_or(DecodeError::MissingHeader { name })
}

/// Absent and `null` both mean "not set", as in Celery's `headers.get()`.
fn optional_text(headers: &Map<String, Value>, name: &'static str) -> Result<Option<String>, DecodeError> {
    match headers.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(DecodeError::InvalidHeader {
            name,
            reason: format!("expected a string, got {other}"),
        }),
    }
}

fn optional_time(headers: &Map<String, Value>, name: &'static str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let Some(text) = optional_text(headers, name)? else {
        return Ok(None);
    };
    parse_python_isoformat(&text)
        .map(Some)
        .ok_or_else(|| DecodeError::InvalidHeader {
            name,
            reason: format!("{text:?} is not an ISO 8601 date-time"),
        })
}

/// Reads what `datetime.isoformat()` writes. Aware values (Celery's normal
/// case, `+00:00`) are RFC 3339; a naive one is taken as UTC, which is what
/// Celery assumes with `enable_utc` (its default).
pub fn parse_python_isoformat(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(aware) = DateTime::parse_from_rfc3339(text) {
        return Some(aware.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|naive| naive.and_utc())
}

fn retries(headers: &Map<String, Value>) -> Result<u64, DecodeError> {
    match headers.get("retries") {
        None | Some(Value::Null) => Ok(0),
        Some(value) => value.as_u64().ok_or_else(|| DecodeError::InvalidHeader {
            name: "retries",
            reason: format!("expected a non-negative integer, got {value}"),
        }),
    }
}

fn time_limits(headers: &Map<String, Value>) -> Result<(Option<f64>, Option<f64>), DecodeError> {
    let invalid = |value: &Value| DecodeError::InvalidHeader {
        name: "timelimit",
        reason: format!("expected [hard, soft] seconds or nulls, got {value}"),
    };
    let seconds = |value: &Value| match value {
        Value::Null => Ok(None),
        Value::Number(number) => number.as_f64().map(Some).ok_or_else(|| invalid(value)),
        other => Err(invalid(other)),
    };
    match headers.get("timelimit") {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Array(limits)) if limits.len() == 2 => Ok((seconds(&limits[0])?, seconds(&limits[1])?)),
        Some(other) => Err(invalid(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::celery::test_support::sample_task;
    use crate::celery::{encode, encode_at};
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn encoded_task_decodes_back() {
        let mut task = sample_task(
            vec![json!("acme"), json!(1.5)],
            json!({"text": "héllo ✓"}).as_object().unwrap().clone(),
        );
        task.eta = Some(Utc.with_ymd_and_hms(2030, 5, 6, 7, 8, 9).unwrap());
        task.expires = Some(task.eta.unwrap() + chrono::Duration::microseconds(250));
        task.parent_id = Some("p".into());
        task.group = Some("g".into());
        task.time_limit = Some(60.0);
        task.soft_time_limit = Some(45.5);
        let message = encode_at(&task, "gen7@box", task.eta.unwrap());

        let decoded = decode_task_message(
            &message.headers,
            &message.body,
            message.properties.content_type,
            Some(message.properties.content_encoding),
        )
        .expect("our own message decodes");
        assert_eq!(decoded.id, task.id.to_string());
        assert_eq!(decoded.task, "export.project");
        assert_eq!(decoded.args, task.args);
        assert_eq!(decoded.kwargs, task.kwargs);
        assert_eq!(
            Value::Object(decoded.embed.clone()),
            json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null})
        );
        assert_eq!(decoded.root_id.as_deref(), Some(decoded.id.as_str()));
        assert_eq!(decoded.parent_id.as_deref(), Some("p"));
        assert_eq!(decoded.group.as_deref(), Some("g"));
        assert_eq!(decoded.eta, task.eta);
        assert_eq!(decoded.expires, task.expires);
        assert_eq!(decoded.retries, 0);
        assert_eq!(decoded.time_limit, Some(60.0));
        assert_eq!(decoded.soft_time_limit, Some(45.5));
        assert_eq!(decoded.origin.as_deref(), Some("gen7@box"));
        assert_eq!(decoded.argsrepr.as_deref(), Some("['acme', 1.5]"));
        assert_eq!(decoded.kwargsrepr.as_deref(), Some("{'text': 'héllo ✓'}"));
        assert_eq!(decoded.shadow, None);
    }

    #[test]
    fn pickle_and_other_content_types_are_refused_before_parsing() {
        let message = encode(&sample_task(vec![], Map::new()), "o");
        for content_type in [
            "application/x-python-serialize",
            "application/x-yaml",
            "application/data",
            "application/json; charset=utf-8",
            "",
        ] {
            let error = decode_task_message(&message.headers, b"\x80\x04garbage", content_type, None).unwrap_err();
            assert!(
                matches!(&error, DecodeError::UnsupportedContentType { content_type: seen } if seen == content_type),
                "{content_type}: {error}"
            );
        }
    }

    #[test]
    fn content_encoding_must_be_utf8() {
        let message = encode(&sample_task(vec![], Map::new()), "o");
        let decode = |encoding| decode_task_message(&message.headers, &message.body, CONTENT_TYPE_JSON, encoding);
        assert!(decode(None).is_ok());
        assert!(decode(Some("UTF-8")).is_ok());
        assert!(matches!(
            decode(Some("binary")),
            Err(DecodeError::UnsupportedContentEncoding { .. })
        ));
    }

    #[test]
    fn v2_shape_is_enforced() {
        let message = encode(&sample_task(vec![], Map::new()), "o");
        let decode_body_text =
            |body: &str| decode_task_message(&message.headers, body.as_bytes(), CONTENT_TYPE_JSON, None);
        assert!(matches!(
            decode_body_text("{\"task\": \"x\"}"),
            Err(DecodeError::BodyShape { .. })
        ));
        assert!(matches!(
            decode_body_text("[[], {}]"),
            Err(DecodeError::BodyShape { .. })
        ));
        assert!(matches!(
            decode_body_text("[{}, {}, {}]"),
            Err(DecodeError::BodyShape { .. })
        ));
        assert!(matches!(
            decode_body_text("[[], [], {}]"),
            Err(DecodeError::BodyShape { .. })
        ));
        assert!(matches!(
            decode_body_text("[[1], {}, "),
            Err(DecodeError::BodyNotJson(_))
        ));
        assert!(decode_body_text("[[1], {\"a\": 2}, null]").is_ok());

        let mut headers = message.headers.clone();
        headers.remove("task");
        assert!(matches!(
            decode_task_message(&headers, &message.body, CONTENT_TYPE_JSON, None),
            Err(DecodeError::MissingHeader { name: "task" })
        ));
        let mut headers = message.headers.clone();
        headers.insert("eta".into(), "tomorrow".into());
        assert!(matches!(
            decode_task_message(&headers, &message.body, CONTENT_TYPE_JSON, None),
            Err(DecodeError::InvalidHeader { name: "eta", .. })
        ));
        let mut headers = message.headers.clone();
        headers.insert("timelimit".into(), json!([1]));
        assert!(matches!(
            decode_task_message(&headers, &message.body, CONTENT_TYPE_JSON, None),
            Err(DecodeError::InvalidHeader { name: "timelimit", .. })
        ));
    }

    #[test]
    fn python_isoformat_variants_parse() {
        let expected = Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(parse_python_isoformat("2024-01-02T03:04:05+00:00"), Some(expected));
        assert_eq!(parse_python_isoformat("2024-01-02T05:04:05+02:00"), Some(expected));
        assert_eq!(parse_python_isoformat("2024-01-02T03:04:05"), Some(expected));
        assert_eq!(
            parse_python_isoformat("2024-01-02T03:04:05.000001+00:00"),
            Some(expected + chrono::Duration::microseconds(1))
        );
        assert_eq!(parse_python_isoformat("2024-01-02"), None);
    }
}
