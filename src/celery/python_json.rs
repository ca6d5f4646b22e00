//! JSON bytes exactly as Python's `json.dumps(obj)` with default arguments
//! writes them (what kombu's JSON serializer and its SQS envelope use).
//!
//! Owns: [`PythonJsonFormatter`], a serde_json [`Formatter`], and the
//! [`to_vec`] / [`to_string`] helpers built on it.
//!
//! Invariants: separators are `", "` and `": "`; `ensure_ascii=True`, so the
//! output is pure ASCII: every character outside `' '..='~'` is escaped,
//! lower-case `\uXXXX` (UTF-16 surrogate pairs above the BMP) except the
//! short forms `\n \r \t \b \f \" \\`; `/` is not escaped; floats are
//! Python's `repr(float)`. Key order is the map's order (the crate enables
//! serde_json's `preserve_order`, so that is insertion / parse order).

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use std::io;

use super::python_repr::float_repr;

/// serde_json formatter reproducing Python's `json.dumps` defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct PythonJsonFormatter;

impl Formatter for PythonJsonFormatter {
    fn write_f64<W>(&mut self, writer: &mut W, value: f64) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // serde_json only calls this for finite values (it writes `null` for
        // NaN and infinities, where Python would write `NaN` / `Infinity`,
        // but a `serde_json::Value` can never hold those).
        writer.write_all(float_repr(value).as_bytes())
    }

    fn write_f32<W>(&mut self, writer: &mut W, value: f32) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // Python has no f32: the value is widened, as `float(x)` would be.
        self.write_f64(writer, f64::from(value))
    }

    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // Fragments are the runs serde_json did not escape itself: printable
        // ASCII plus everything from DEL upwards, which `ensure_ascii`
        // escapes (Python's ESCAPE_ASCII is `[^\ -~]`).
        let mut plain_start = 0;
        for (index, character) in fragment.char_indices() {
            if (' '..='~').contains(&character) {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[plain_start..index])?;
            write_utf16_escapes(writer, character)?;
            plain_start = index + character.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[plain_start..])
    }

    fn write_char_escape<W>(&mut self, writer: &mut W, char_escape: CharEscape) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        // Spelled out rather than inherited so the Python-compatible forms
        // do not depend on serde_json's defaults.
        let escaped: &[u8] = match char_escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            // Python never escapes `/` (and serde_json never asks to).
            CharEscape::Solidus => b"/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => {
                return write_utf16_escapes(writer, char::from(byte));
            }
        };
        writer.write_all(escaped)
    }

    fn begin_array_value<W>(&mut self, writer: &mut W, first: bool) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W>(&mut self, writer: &mut W, first: bool) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W>(&mut self, writer: &mut W) -> io::Result<()>
    where
        W: ?Sized + io::Write,
    {
        writer.write_all(b": ")
    }
}

/// `\uXXXX` per UTF-16 code unit, lower-case hex, as Python writes them.
fn write_utf16_escapes<W>(writer: &mut W, character: char) -> io::Result<()>
where
    W: ?Sized + io::Write,
{
    let mut units = [0u16; 2];
    for unit in character.encode_utf16(&mut units) {
        write!(writer, "\\u{unit:04x}")?;
    }
    Ok(())
}

/// `json.dumps(value).encode()` for any serializable value.
pub fn to_vec<T>(value: &T) -> Result<Vec<u8>, serde_json::Error>
where
    T: ?Sized + Serialize,
{
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonJsonFormatter);
    value.serialize(&mut serializer)?;
    Ok(out)
}

/// `json.dumps(value)`.
pub fn to_string<T>(value: &T) -> Result<String, serde_json::Error>
where
    T: ?Sized + Serialize,
{
    let bytes = to_vec(value)?;
    // The formatter only ever writes ASCII (ensure_ascii), so this cannot
    // fail; map it to a serde error rather than panic all the same.
    String::from_utf8(bytes).map_err(|error| serde_json::Error::io(io::Error::new(io::ErrorKind::InvalidData, error)))
}

#[cfg(test)]
mod tests {
    //! Expected bytes are Python 3's `json.dumps` of the same values.

    use super::*;
    use serde_json::{json, Value};

    fn dumps(value: Value) -> String {
        to_string(&value).expect("values serialize")
    }

    #[test]
    fn separators_and_order_are_pythons() {
        assert_eq!(
            dumps(json!({"b": 1, "a": [1, 2, {}], "c": {"x": null, "y": true}})),
            r#"{"b": 1, "a": [1, 2, {}], "c": {"x": null, "y": true}}"#
        );
        assert_eq!(dumps(json!([])), "[]");
        assert_eq!(dumps(json!([[], {}, [[]]])), "[[], {}, [[]]]");
    }

    #[test]
    fn strings_are_escaped_like_ensure_ascii() {
        assert_eq!(dumps(json!("héllo ✓")), r#""h\u00e9llo \u2713""#);
        assert_eq!(dumps(json!("😀")), r#""\ud83d\ude00""#);
        assert_eq!(dumps(json!("\u{10ffff}")), r#""\udbff\udfff""#);
        assert_eq!(
            dumps(json!(
                "q\" b\\ / n\n r\r t\t b\u{8} f\u{c} nul\u{0} us\u{1f} del\u{7f} ls\u{2028}"
            )),
            r#""q\" b\\ / n\n r\r t\t b\b f\f nul\u0000 us\u001f del\u007f ls\u2028""#
        );
        assert_eq!(dumps(json!({"ключ": 1})), r#"{"\u043a\u043b\u044e\u0447": 1}"#);
        assert!(dumps(json!(["ünïcödé", "中文", "🦀"])).is_ascii());
    }

    #[test]
    fn numbers_are_pythons() {
        assert_eq!(
            dumps(json!([
                1.0,
                1e16,
                1e-5,
                0.5,
                -0.0,
                12345678901234567890_u64,
                -9,
                2.5e-7
            ])),
            "[1.0, 1e+16, 1e-05, 0.5, -0.0, 12345678901234567890, -9, 2.5e-07]"
        );
        assert_eq!(dumps(json!(253216811626205.0 + 0.125)), "253216811626205.12");
    }

    #[test]
    fn nested_values_round_trip() {
        let value = json!({"a": [1, {"b": ["c", 2.5, null, false]}], "é": {"😀": []}});
        let text = dumps(value.clone());
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }
}
