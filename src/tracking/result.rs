//! Celery task results as the database result backend stores them
//! (`celery_taskmeta`), turned into JSON for `GET /v1/tasks/{id}`.
//!
//! Owns: [`StoredResult`] (one row as read), [`TaskResult`] (what the API
//! shows) and [`decode_result_payload`].
//!
//! The `result` column holds bytes whose format depends on who wrote them:
//! - Celery before 5.7 (and any worker with `result_serializer = "pickle"`)
//!   stored a **pickle** (SQLAlchemy's `PickleType`, protocol 2 or higher,
//!   so the payload starts with the `PROTO` opcode `0x80`);
//! - Celery 5.7 stores the value encoded with the worker's
//!   `result_serializer`, which is JSON in every sane setup.
//!
//! Celery itself tells them apart the same way (`_decode_stored_result`):
//! a payload that starts with `0x80` is a pickle, anything else is JSON.
//!
//! Invariants: pickles are only *parsed* (serde-pickle builds plain values;
//! nothing is imported or called), so a hostile payload can at worst be
//! refused. A payload that cannot be decoded is reported in
//! [`TaskResult::result_error`] with the reason, never as an HTTP error: the
//! status, date and traceback are still worth showing. A failure always
//! names the exception type and message in [`TaskResult::exception`] when
//! the row says anything about them (result payload or traceback).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

/// The pickle `PROTO` opcode every binary pickle (protocol 2+) starts with.
const PICKLE_PROTO: u8 = 0x80;

/// One `celery_taskmeta` row, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub status: String,
    pub result: Option<Vec<u8>>,
    pub date_done: Option<DateTime<Utc>>,
    pub traceback: Option<String>,
}

/// The exception a failed (or retried) task raised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExceptionInfo {
    #[serde(rename = "type")]
    pub exception_type: String,
    pub module: Option<String>,
    pub message: String,
}

/// What `GET /v1/tasks/{id}` shows under `result`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskResult {
    pub status: String,
    pub result: Value,
    pub date_done: Option<DateTime<Utc>>,
    pub traceback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exception: Option<ExceptionInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_error: Option<String>,
}

/// Why a stored payload could not be turned into JSON.
#[derive(Debug, thiserror::Error)]
pub enum ResultDecodeError {
    #[error("pickled result could not be read: {0}")]
    Pickle(#[from] serde_pickle::Error),
    #[error("result is neither a pickle nor JSON (is the worker's result_serializer msgpack or yaml?): {0}")]
    NotJson(#[source] serde_json::Error),
}

impl StoredResult {
    /// Decodes the payload and extracts the exception of a failure.
    pub fn into_task_result(self) -> TaskResult {
        let (result, result_error) = match self.result.as_deref() {
            None => (Value::Null, None),
            Some(payload) => match decode_result_payload(payload) {
                Ok(value) => (value, None),
                Err(error) => (Value::Null, Some(error.to_string())),
            },
        };
        let exception = if matches!(self.status.as_str(), "FAILURE" | "RETRY") {
            exception_from_result(&result).or_else(|| self.traceback.as_deref().and_then(exception_from_traceback))
        } else {
            None
        };
        TaskResult {
            status: self.status,
            result,
            date_done: self.date_done,
            traceback: self.traceback,
            exception,
            result_error,
        }
    }
}

/// Decodes a `result` column payload (pickle or JSON) into JSON.
pub fn decode_result_payload(payload: &[u8]) -> Result<Value, ResultDecodeError> {
    if payload.first() == Some(&PICKLE_PROTO) {
        return decode_pickle(payload);
    }
    serde_json::from_slice(payload).map_err(ResultDecodeError::NotJson)
}

/// Decodes a pickle into JSON. Objects of classes serde-pickle does not
/// know (an exception pickled with `result_serializer = "pickle"`, a
/// `datetime`) are shown as `null` rather than refusing the whole value.
pub fn decode_pickle(payload: &[u8]) -> Result<Value, ResultDecodeError> {
    let value = match serde_pickle::value_from_slice(payload, serde_pickle::DeOptions::new()) {
        Ok(value) => value,
        Err(strict_error) => serde_pickle::value_from_slice(
            payload,
            serde_pickle::DeOptions::new()
                .replace_unresolved_globals()
                .replace_recursive_structures(),
        )
        .map_err(|_| strict_error)?,
    };
    Ok(pickle_to_json(value))
}

fn pickle_to_json(value: serde_pickle::Value) -> Value {
    use serde_pickle::Value as P;
    match value {
        P::None => Value::Null,
        P::Bool(flag) => Value::Bool(flag),
        P::I64(number) => number.into(),
        // JSON numbers beyond i64 lose precision in most clients: keep the digits.
        P::Int(big) => Value::String(big.to_string()),
        P::F64(number) => float_to_json(number),
        P::Bytes(bytes) => bytes_to_json(bytes),
        P::String(text) => Value::String(text),
        P::List(items) | P::Tuple(items) => Value::Array(items.into_iter().map(pickle_to_json).collect()),
        P::Set(items) | P::FrozenSet(items) => Value::Array(
            items
                .into_iter()
                .map(|item| pickle_to_json(item.into_value()))
                .collect(),
        ),
        P::Dict(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(key, value)| (dict_key(key), pickle_to_json(value)))
                .collect(),
        ),
    }
}

/// NaN and infinities have no JSON form; show them as Python prints them.
fn float_to_json(number: f64) -> Value {
    serde_json::Number::from_f64(number).map_or_else(
        || {
            Value::String(if number.is_nan() {
                "nan".into()
            } else if number > 0.0 {
                "inf".into()
            } else {
                "-inf".into()
            })
        },
        Value::Number,
    )
}

/// `bytes` that are UTF-8 read as text; anything else as base64.
fn bytes_to_json(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(text) => Value::String(text),
        Err(error) => json!({"base64": BASE64.encode(error.into_bytes())}),
    }
}

/// JSON object keys are strings: Python's `str()` of the key.
fn dict_key(key: serde_pickle::HashableValue) -> String {
    match pickle_to_json(key.into_value()) {
        Value::String(text) => text,
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

/// Celery's JSON-safe exception form: `{"exc_type", "exc_message", "exc_module"}`.
fn exception_from_result(result: &Value) -> Option<ExceptionInfo> {
    let object = result.as_object()?;
    let exception_type = object.get("exc_type")?.as_str()?.to_owned();
    let module = object.get("exc_module").and_then(Value::as_str).map(str::to_owned);
    let message = match object.get("exc_message") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        // `exc.args`: one string is the message, as `str(exc)` shows it.
        Some(Value::Array(args)) if args.len() == 1 && args[0].is_string() => args[0].as_str().unwrap_or("").to_owned(),
        Some(Value::Array(args)) if args.is_empty() => String::new(),
        Some(other) => other.to_string(),
    };
    Some(ExceptionInfo {
        exception_type,
        module,
        message,
    })
}

/// The last line of a Python traceback: `module.Type: message`.
fn exception_from_traceback(traceback: &str) -> Option<ExceptionInfo> {
    let last = traceback.lines().rev().find(|line| !line.trim().is_empty())?.trim();
    if last.starts_with("Traceback ") || last.starts_with("File ") {
        return None;
    }
    let (qualified, message) = match last.split_once(": ") {
        Some((name, message)) => (name, message.to_owned()),
        None => (last, String::new()),
    };
    if qualified.contains(char::is_whitespace) {
        return None;
    }
    let (module, exception_type) = match qualified.rsplit_once('.') {
        Some((module, name)) => (Some(module.to_owned()), name.to_owned()),
        None => (None, qualified.to_owned()),
    };
    Some(ExceptionInfo {
        exception_type,
        module,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps(value, protocol)` from CPython 3.11, as hex.
    fn fixture(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn pickled_integer_protocol_5() {
        // pickle.dumps(50, protocol=5)
        assert_eq!(decode_result_payload(&fixture("80054b322e")).unwrap(), json!(50));
    }

    #[test]
    fn pickled_dict_protocol_2() {
        // {"org": "acme", "n": [1, 2.5, None, True], "nested": {"k": (1, "two")}}
        let payload = fixture(
            "80027d71002858030000006f72677101580400000061636d65710258010000006e71035d7104284b014740040000000000004e886558060000006e657374656471057d710658010000006b71074b01580300000074776f710886710973752e",
        );
        assert_eq!(
            decode_result_payload(&payload).unwrap(),
            json!({"n": [1, 2.5, null, true], "nested": {"k": [1, "two"]}, "org": "acme"})
        );
    }

    #[test]
    fn pickled_big_int_bytes_set_and_unicode_protocol_5() {
        // [2**70, b"\x00\xffraw", {3, 1}, "héllo ✓"]
        let payload = fixture(
            "8005952d000000000000005d94288a09000000000000000040430500ff726177948f94284b014b03908c0a68c3a96c6c6f20e29c9394652e",
        );
        assert_eq!(
            decode_result_payload(&payload).unwrap(),
            json!(["1180591620717411303424", {"base64": "AP9yYXc="}, [1, 3], "héllo ✓"])
        );
    }

    #[test]
    fn pickled_failure_dict_names_the_exception() {
        // Celery's prepare_exception() for a JSON-safe result, pickled (Celery < 5.7).
        let stored = StoredResult {
            status: "FAILURE".into(),
            result: Some(fixture(
                "8004955f000000000000007d94288c086578635f74797065948c115a65726f4469766973696f6e4572726f72948c0b6578635f6d657373616765948c106469766973696f6e206279207a65726f9485948c0a6578635f6d6f64756c65948c086275696c74696e7394752e",
            )),
            date_done: None,
            traceback: Some("Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero\n".into()),
        };
        let shown = stored.into_task_result();
        assert_eq!(
            shown.result,
            json!({"exc_type": "ZeroDivisionError", "exc_message": ["division by zero"], "exc_module": "builtins"})
        );
        let exception = shown.exception.unwrap();
        assert_eq!(exception.exception_type, "ZeroDivisionError");
        assert_eq!(exception.module.as_deref(), Some("builtins"));
        assert_eq!(exception.message, "division by zero");
        assert_eq!(shown.result_error, None);
    }

    #[test]
    fn pickled_exception_object_falls_back_to_the_traceback() {
        // pickle.dumps(ValueError("boom", 3), protocol=4): a class serde-pickle
        // does not know, as result_serializer = "pickle" stores failures.
        let stored = StoredResult {
            status: "FAILURE".into(),
            result: Some(fixture(
                "80049528000000000000008c086275696c74696e73948c0a56616c75654572726f729493948c04626f6f6d944b03869452942e",
            )),
            date_done: None,
            traceback: Some("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: ('boom', 3)\n".into()),
        };
        let shown = stored.into_task_result();
        assert_eq!(
            shown.result_error, None,
            "unknown classes are shown as null, not refused"
        );
        let exception = shown.exception.unwrap();
        assert_eq!(exception.exception_type, "ValueError");
        assert_eq!(exception.message, "('boom', 3)");
    }

    #[test]
    fn json_payloads_as_celery_5_7_stores_them() {
        assert_eq!(decode_result_payload(b"50").unwrap(), json!(50));
        assert_eq!(decode_result_payload(b"{\"a\": [1]}").unwrap(), json!({"a": [1]}));
        let stored = StoredResult {
            status: "FAILURE".into(),
            result: Some(br#"{"exc_type": "KeyError", "exc_message": ["missing"], "exc_module": "builtins"}"#.to_vec()),
            date_done: None,
            traceback: None,
        };
        let exception = stored.into_task_result().exception.unwrap();
        assert_eq!(exception.exception_type, "KeyError");
        assert_eq!(exception.message, "missing");
    }

    #[test]
    fn undecodable_payload_is_reported_not_fatal() {
        let stored = StoredResult {
            status: "SUCCESS".into(),
            // msgpack for {"a": 1}
            result: Some(vec![0x81, 0xa1, b'a', 0x01]),
            date_done: None,
            traceback: None,
        };
        let shown = stored.into_task_result();
        assert_eq!(shown.status, "SUCCESS");
        assert_eq!(shown.result, Value::Null);
        assert!(shown.result_error.unwrap().contains("pickle"));
        // A truncated pickle is refused with the pickle error.
        assert!(matches!(
            decode_result_payload(&[0x80, 0x04, 0x95]),
            Err(ResultDecodeError::Pickle(_))
        ));
    }

    #[test]
    fn traceback_last_line_parses_qualified_names() {
        let info = exception_from_traceback("Traceback...\nmyapp.errors.ExportFailed: disk full\n").unwrap();
        assert_eq!(info.exception_type, "ExportFailed");
        assert_eq!(info.module.as_deref(), Some("myapp.errors"));
        assert_eq!(info.message, "disk full");
        assert_eq!(exception_from_traceback("KeyboardInterrupt").unwrap().message, "");
        assert!(exception_from_traceback("  File \"x\", line 2").is_none());
    }

    #[test]
    fn success_has_no_exception() {
        let stored = StoredResult {
            status: "SUCCESS".into(),
            result: Some(br#"{"exc_type": "X", "exc_message": ["y"]}"#.to_vec()),
            date_done: None,
            traceback: None,
        };
        assert!(stored.into_task_result().exception.is_none());
    }
}
