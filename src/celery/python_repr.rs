//! Celery's `saferepr` (Celery 5.7 `celery/utils/saferepr.py`) over JSON
//! values, for the `argsrepr` / `kwargsrepr` headers.
//!
//! Owns: the token stream that mirrors `reprstream`, the length budget and
//! level limit of `_saferepr`, and Python's `repr(float)` ([`float_repr`]),
//! which [`super::python_json`] shares.
//!
//! Invariants: for every JSON value (and the args tuple / list and kwargs
//! dict Celery wraps them in) the output is the string stock Celery 5.7
//! writes, including its quirks, which are deliberate here because workers,
//! Flower and logs show these strings next to ones Celery produced itself:
//! - strings are *not* Python `repr`: always single-quoted, only `'` is
//!   escaped (as `\'`), backslashes and control characters stay raw;
//! - `True` / `False` / `None`, integers as decimal, floats as `repr(float)`;
//! - containers deeper than `max_levels` print as `[...]` / `{...}`;
//! - lengths count code points, and once the budget is spent the output
//!   ends with `, ...` plus the closers of the containers still open.

use serde_json::{Map, Number, Value};

/// Celery's `AMQP.argsrepr_maxsize`.
pub const ARGSREPR_MAX_LEN: usize = 1024;
/// Celery's `AMQP.kwargsrepr_maxsize`.
pub const KWARGSREPR_MAX_LEN: usize = 1024;
/// Celery's default `task_repr_maxlevels`.
pub const REPR_MAX_LEVELS: usize = 3;

/// The Python object `saferepr` is applied to. JSON values map onto Python's
/// `json.loads` types; `Tuple` and `List` exist because Celery reprs the
/// positional arguments as a tuple when there are none (`args or ()`) and as
/// the caller's list otherwise.
#[derive(Debug, Clone, Copy)]
pub enum PyObject<'a> {
    Json(&'a Value),
    List(&'a [Value]),
    Tuple(&'a [Value]),
    Dict(&'a Map<String, Value>),
}

/// `argsrepr` exactly as `as_task_v2` computes it: `saferepr(args or (),
/// 1024, maxlevels=3)`. Empty args are the empty tuple `()`.
pub fn args_repr(args: &[Value]) -> String {
    if args.is_empty() {
        return "()".to_owned();
    }
    if let Some(text) = flat_repr(FlatContainer::List(args), ARGSREPR_MAX_LEN) {
        return text;
    }
    saferepr(PyObject::List(args), Some(ARGSREPR_MAX_LEN), REPR_MAX_LEVELS)
}

/// `kwargsrepr` exactly as `as_task_v2` computes it: `saferepr(kwargs or {},
/// 1024, maxlevels=3)`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    if let Some(text) = flat_repr(FlatContainer::Dict(kwargs), KWARGSREPR_MAX_LEN) {
        return text;
    }
    saferepr(PyObject::Dict(kwargs), Some(KWARGSREPR_MAX_LEN), REPR_MAX_LEVELS)
}

/// A list or dict whose values are all scalars: the common shape of task
/// arguments, which [`flat_repr`] writes without the token stream.
enum FlatContainer<'a> {
    List(&'a [Value]),
    Dict(&'a Map<String, Value>),
}

/// The repr of a flat container written directly, or `None` when the
/// general walk is needed (a nested container, or output that reaches the
/// length budget). Equal to [`saferepr`]'s output whenever it returns
/// `Some`: with fewer than `max_len` characters in all, the budget is still
/// positive before every token and larger than it, so `_saferepr` neither
/// truncates a token nor stops early, and one level is within any
/// `maxlevels`.
fn flat_repr(container: FlatContainer<'_>, max_len: usize) -> Option<String> {
    fn scalar(out: &mut String, value: &Value) -> Option<()> {
        match value {
            Value::Null => out.push_str("None"),
            Value::Bool(true) => out.push_str("True"),
            Value::Bool(false) => out.push_str("False"),
            Value::Number(number) => out.push_str(&number_repr(number)),
            Value::String(text) => quote_into(out, text),
            Value::Array(_) | Value::Object(_) => return None,
        }
        Some(())
    }
    let mut out = String::with_capacity(64);
    match container {
        FlatContainer::List(values) => {
            out.push('[');
            for (index, value) in values.iter().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                scalar(&mut out, value)?;
            }
            out.push(']');
        }
        FlatContainer::Dict(map) => {
            out.push('{');
            for (index, (key, value)) in map.iter().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                quote_into(&mut out, key);
                out.push_str(": ");
                scalar(&mut out, value)?;
            }
            out.push('}');
        }
    }
    // Bytes bound code points from above: a cheap check first.
    (out.len() < max_len || out.chars().count() < max_len).then_some(out)
}

/// `_format_chars` of a string that fits its budget.
fn quote_into(out: &mut String, text: &str) {
    out.push('\'');
    for character in text.chars() {
        if character == '\'' {
            out.push('\\');
        }
        out.push(character);
    }
    out.push('\'');
}

/// Celery's `saferepr(o, maxlen, maxlevels)`. `max_len: None` is Python's
/// `maxlen=None` (no limit); `max_levels: 0` is "no level limit", as a falsy
/// `maxlevels` is in Python.
pub fn saferepr(object: PyObject<'_>, max_len: Option<usize>, max_levels: usize) -> String {
    let mut stream = TokenStream::new(object, max_levels);
    // Python's budget goes negative (a token longer than what is left is
    // still written whole, or truncated by `truncate`, then subtracted).
    let mut budget: Option<i64> = max_len.map(|len| i64::try_from(len).unwrap_or(i64::MAX));
    let mut out = String::new();

    while let Some(token) = stream.next_token() {
        if budget.is_some_and(|left| left <= 0) {
            // Closers are still written while the budget is spent, so that
            // `[[1, 2], 3]` cut inside the inner list still closes it.
            if let Token::Literal(literal) = &token {
                if literal.direction < 0 {
                    out.push_str(literal.text);
                    continue;
                }
            }
            out.push_str(", ...");
            write_dangling_closers(&mut out, token, stream.remaining_items());
            return out;
        }
        let piece = match token {
            Token::Literal(literal) => literal.text.to_owned(),
            // A key goes through a nested `saferepr` in Python; for a string
            // key that is exactly `_format_chars` with the same budget.
            Token::Key(text) | Token::Quoted(text) => format_chars(text, budget),
            Token::Plain(text) => truncate(&text, budget),
        };
        if let Some(left) = budget.as_mut() {
            *left -= char_count(&piece);
        }
        out.push_str(&piece);
    }
    out
}

/// Python's `repr(float)` / `str(float)`: the shortest digits that round
/// trip, in fixed notation with at least one fractional digit when the
/// decimal exponent is in `-4..16`, otherwise `d.ddde+XX`.
pub fn float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let sign = if value.is_sign_negative() { "-" } else { "" };
    if value == 0.0 {
        return format!("{sign}0.0");
    }
    let (digits, exponent) = shortest_digits(value.abs());

    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{first}{fraction}e{exponent_sign}{:02}", exponent.unsigned_abs());
    }

    // Position of the decimal point relative to the start of `digits`.
    let point = exponent + 1;
    let digit_count = digits.len() as i32;
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point >= digit_count {
        format!("{digits}{}.0", "0".repeat((point - digit_count) as usize))
    } else {
        let (whole, fraction) = digits.split_at(point as usize);
        format!("{whole}.{fraction}")
    };
    format!("{sign}{body}")
}

/// The digits and decimal exponent of `value` (positive, finite, non-zero)
/// as Python's repr picks them: the fewest significant digits that read back
/// as `value`, and among those the closest to it, ties to even.
fn shortest_digits(value: f64) -> (String, i32) {
    // Rust's `{:e}` gives the fewest round-tripping digits, but breaks an
    // exact tie between two candidates upwards (…205.125 -> "…205.13")
    // where Python's dtoa rounds half to even ("…205.12"). Exact formatting
    // with that many digits rounds half to even, so prefer it whenever it
    // still reads back as the same float.
    let shortest = format!("{value:e}");
    let digit_count = split_scientific(&shortest).0.len();
    let correctly_rounded = format!("{value:.*e}", digit_count.saturating_sub(1));
    let chosen = if correctly_rounded.parse::<f64>() == Ok(value) {
        correctly_rounded
    } else {
        shortest
    };
    let (mut digits, exponent) = split_scientific(&chosen);
    // A rounding carry could leave trailing zeros ("1.0e24"); repr never
    // shows them in the significand.
    while digits.len() > 1 && digits.ends_with('0') {
        digits.pop();
    }
    (digits, exponent)
}

/// Splits Rust's `{:e}` output (`d.ddde-5`) into significant digits and the
/// exponent of the first digit.
fn split_scientific(text: &str) -> (String, i32) {
    let (mantissa, exponent) = text.split_once('e').unwrap_or((text, "0"));
    let digits = mantissa.chars().filter(char::is_ascii_digit).collect();
    (digits, exponent.parse().unwrap_or(0))
}

/// Python's `str()` of a JSON number: integers as decimal, floats as repr.
pub fn number_repr(number: &Number) -> String {
    if let Some(integer) = number.as_i64() {
        integer.to_string()
    } else if let Some(integer) = number.as_u64() {
        integer.to_string()
    } else {
        float_repr(number.as_f64().unwrap_or(f64::NAN))
    }
}

/// Python `len()` of a `str`: code points, which Rust `char`s are for any
/// string serde_json can hold (it rejects lone surrogates).
fn char_count(text: &str) -> i64 {
    i64::try_from(text.chars().count()).unwrap_or(i64::MAX)
}

/// Celery's `truncate(s, maxlen)`: once `len(s) >= maxlen` (note: equal
/// counts too) keep `s[:maxlen]` up to its last space, then add `...`.
fn truncate(text: &str, max_len: Option<i64>) -> String {
    let Some(max_len) = max_len.filter(|len| *len != 0) else {
        return text.to_owned();
    };
    if char_count(text) < max_len {
        return text.to_owned();
    }
    // `_saferepr` only calls this with a positive budget.
    let keep = usize::try_from(max_len).unwrap_or(0);
    let head: String = text.chars().take(keep).collect();
    let head = match head.rsplit_once(' ') {
        Some((before_last_space, _)) => before_last_space,
        None => head.as_str(),
    };
    format!("{head}...")
}

/// Celery's `_format_chars` for `str`: single quotes, `'` escaped, nothing
/// else escaped.
fn format_chars(text: &str, max_len: Option<i64>) -> String {
    format!("'{}'", truncate(text, max_len).replace('\'', "\\'"))
}

/// After the budget ran out Python walks the rest of the stream (starting
/// with the token it refused) and writes the closer of every container that
/// was open, skipping containers that open and close inside the rest.
fn write_dangling_closers<'a>(out: &mut String, refused: Token<'a>, remaining: impl Iterator<Item = Item<'a>>) {
    let refused_literal = match refused {
        Token::Literal(literal) => Some(literal),
        _ => None,
    };
    let rest_literals = remaining.filter_map(|item| match item {
        Item::Literal(literal) => Some(literal),
        _ => None,
    });
    let mut depth: i32 = 0;
    for literal in refused_literal.into_iter().chain(rest_literals) {
        if literal.truncatable {
            continue;
        }
        depth += i32::from(literal.direction);
        if depth < 0 {
            depth = 0;
            out.push_str(literal.text);
        }
    }
}

/// Celery's `_literal(value, truncate, direction)`.
#[derive(Debug, Clone, Copy)]
struct Literal {
    text: &'static str,
    /// Separators may be dropped when the budget runs out; brackets may not.
    truncatable: bool,
    /// +1 opens a container, -1 closes one.
    direction: i8,
}

const fn literal(text: &'static str, truncatable: bool, direction: i8) -> Literal {
    Literal {
        text,
        truncatable,
        direction,
    }
}

const DICT_START: Literal = literal("{", false, 1);
const DICT_KEY_SEPARATOR: Literal = literal(": ", true, 0);
const DICT_END: Literal = literal("}", false, -1);
const LIST_START: Literal = literal("[", false, 1);
const LIST_END: Literal = literal("]", false, -1);
const ITEM_SEPARATOR: Literal = literal(", ", true, 0);
const TUPLE_START: Literal = literal("(", false, 1);
const TUPLE_END: Literal = literal(")", false, -1);
const SINGLE_TUPLE_END: Literal = literal(",)", false, -1);

/// What a container frame still has to emit: the lazily expanded pieces of
/// `chain([lit_start], chainer(val), [lit_end], it)`.
#[derive(Debug, Clone, Copy)]
enum Item<'a> {
    Literal(Literal),
    Key(&'a str),
    Object(PyObject<'a>),
}

/// What `reprstream` yields to `_saferepr`.
#[derive(Debug)]
enum Token<'a> {
    Literal(Literal),
    Key(&'a str),
    /// A string value (`_quoted`).
    Quoted(&'a str),
    /// Text from `str()` / `repr()` of a scalar, truncatable.
    Plain(String),
}

struct Frame<'a> {
    items: Vec<Item<'a>>,
    next: usize,
}

/// `reprstream`: a depth-first walk that only expands a container when it is
/// reached, so the budget check sees tokens in output order.
struct TokenStream<'a> {
    /// Innermost container last; the chain of the Python iterators.
    frames: Vec<Frame<'a>>,
    level: i64,
    max_levels: usize,
}

impl<'a> TokenStream<'a> {
    fn new(root: PyObject<'a>, max_levels: usize) -> Self {
        Self {
            frames: vec![Frame {
                items: vec![Item::Object(root)],
                next: 0,
            }],
            level: 0,
            max_levels,
        }
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let frame = self.frames.last_mut()?;
            let Some(item) = frame.items.get(frame.next).copied() else {
                self.frames.pop();
                continue;
            };
            frame.next += 1;
            match item {
                Item::Literal(literal) => {
                    self.level += i64::from(literal.direction);
                    return Some(Token::Literal(literal));
                }
                Item::Key(key) => return Some(Token::Key(key)),
                Item::Object(object) => {
                    if let Some(token) = self.enter(object) {
                        return Some(token);
                    }
                }
            }
        }
    }

    /// Scalars become a token; a container either pushes a frame (and
    /// yields nothing yet) or, past `max_levels`, becomes `[...]`.
    fn enter(&mut self, object: PyObject<'a>) -> Option<Token<'a>> {
        let (start, end, items) = match object {
            PyObject::Json(Value::Null) => return Some(Token::Plain("None".to_owned())),
            PyObject::Json(Value::Bool(flag)) => {
                return Some(Token::Plain(if *flag { "True" } else { "False" }.to_owned()))
            }
            PyObject::Json(Value::Number(number)) => return Some(Token::Plain(number_repr(number))),
            PyObject::Json(Value::String(text)) => return Some(Token::Quoted(text)),
            PyObject::Json(Value::Array(values)) => (LIST_START, LIST_END, sequence_items(values)),
            PyObject::List(values) => (LIST_START, LIST_END, sequence_items(values)),
            PyObject::Tuple(values) => {
                let end = if values.len() == 1 { SINGLE_TUPLE_END } else { TUPLE_END };
                (TUPLE_START, end, sequence_items(values))
            }
            PyObject::Json(Value::Object(map)) | PyObject::Dict(map) => (DICT_START, DICT_END, dict_items(map)),
        };
        if self.max_levels != 0 && self.level >= self.max_levels as i64 {
            return Some(Token::Literal(literal(elided_container(start, end), false, 0)));
        }
        let mut frame_items = Vec::with_capacity(items.len() + 2);
        frame_items.push(Item::Literal(start));
        frame_items.extend(items);
        frame_items.push(Item::Literal(end));
        self.frames.push(Frame {
            items: frame_items,
            next: 0,
        });
        None
    }

    /// Everything not yet emitted, innermost container first, as the linked
    /// Python iterator chain would produce it.
    fn remaining_items(&self) -> impl Iterator<Item = Item<'a>> + '_ {
        self.frames
            .iter()
            .rev()
            .flat_map(|frame| frame.items[frame.next..].iter().copied())
    }
}

/// `f'{lit_start.value}...{lit_end.value}'` for the containers JSON has.
fn elided_container(start: Literal, end: Literal) -> &'static str {
    match (start.text, end.text) {
        ("{", _) => "{...}",
        ("(", ",)") => "(...,)",
        ("(", _) => "(...)",
        _ => "[...]",
    }
}

fn sequence_items(values: &[Value]) -> Vec<Item<'_>> {
    let mut items = Vec::with_capacity(values.len() * 2);
    for (index, value) in values.iter().enumerate() {
        if index > 0 {
            items.push(Item::Literal(ITEM_SEPARATOR));
        }
        items.push(Item::Object(PyObject::Json(value)));
    }
    items
}

fn dict_items(map: &Map<String, Value>) -> Vec<Item<'_>> {
    let mut items = Vec::with_capacity(map.len() * 4);
    for (index, (key, value)) in map.iter().enumerate() {
        if index > 0 {
            items.push(Item::Literal(ITEM_SEPARATOR));
        }
        items.push(Item::Key(key));
        items.push(Item::Literal(DICT_KEY_SEPARATOR));
        items.push(Item::Object(PyObject::Json(value)));
    }
    items
}

#[cfg(test)]
mod tests {
    //! Expected strings were produced by Celery 5.7.0's own
    //! `saferepr(args or (), 1024, maxlevels=3)` on the same values.

    use super::*;
    use serde_json::json;

    fn args(value: Value) -> String {
        args_repr(value.as_array().expect("args are a JSON array"))
    }

    fn kwargs(value: Value) -> String {
        kwargs_repr(value.as_object().expect("kwargs are a JSON object"))
    }

    /// The direct writer must be indistinguishable from the token stream,
    /// including right at the length budget, where it has to give way.
    #[test]
    fn flat_arguments_match_the_general_walk() {
        let mut cases: Vec<Value> = vec![
            json!([
                1,
                -2,
                3.5,
                1e22,
                true,
                false,
                null,
                "it's",
                "back\\slash",
                "héllo ✓",
                ""
            ]),
            json!({"a": 1, "it's": "x'y", "ünï": [1]}),
            json!({"nested": {"a": 1}}),
            json!([[1, 2], 3]),
        ];
        for length in 1015..1030 {
            cases.push(json!(["x".repeat(length)]));
            cases.push(json!(["é".repeat(length / 2), "a b c".repeat(length / 10)]));
            cases.push(json!({"key": "y".repeat(length)}));
            cases.push(json!(["'".repeat(length / 2)]));
        }
        for value in cases {
            let (flat, general) = match &value {
                Value::Array(values) => (
                    args_repr(values),
                    saferepr(PyObject::List(values), Some(ARGSREPR_MAX_LEN), REPR_MAX_LEVELS),
                ),
                Value::Object(map) => (
                    kwargs_repr(map),
                    saferepr(PyObject::Dict(map), Some(KWARGSREPR_MAX_LEN), REPR_MAX_LEVELS),
                ),
                _ => unreachable!(),
            };
            assert_eq!(flat, general, "{value}");
        }
        assert_eq!(
            args_repr(&[]),
            saferepr(PyObject::Tuple(&[]), Some(ARGSREPR_MAX_LEN), REPR_MAX_LEVELS)
        );
    }

    #[test]
    fn captured_examples() {
        assert_eq!(args(json!([2, 3])), "[2, 3]");
        assert_eq!(args(json!([])), "()");
        assert_eq!(kwargs(json!({"text": "héllo ✓"})), "{'text': 'héllo ✓'}");
        assert_eq!(kwargs(json!({})), "{}");
    }

    #[test]
    fn scalars_print_as_python_str() {
        assert_eq!(
            args(json!([
                true,
                false,
                null,
                1.0,
                1e16,
                1e-5,
                0.1,
                -0.0,
                123456789012345678_u64,
                2.5e-7,
                1e22,
                100.0
            ])),
            "[True, False, None, 1.0, 1e+16, 1e-05, 0.1, -0.0, 123456789012345678, 2.5e-07, 1e+22, 100.0]"
        );
        assert_eq!(args(json!([-7, u64::MAX])), "[-7, 18446744073709551615]");
    }

    #[test]
    fn strings_are_single_quoted_with_only_quotes_escaped() {
        // Not Python's repr: `'` is escaped even when `"` is absent, and
        // backslashes and control characters are left as they are.
        assert_eq!(
            args(json!([
                "it's",
                "say \"hi\"",
                "both ' and \"",
                "back\\slash",
                "line\nbreak\ttab\u{0}"
            ])),
            "['it\\'s', 'say \"hi\"', 'both \\' and \"', 'back\\slash', 'line\nbreak\ttab\u{0}']"
        );
        assert_eq!(
            kwargs(json!({"it's": "😀", "nested": {"a": [1, {"b": [2, [3]]}]}})),
            "{'it\\'s': '😀', 'nested': {'a': [1, {...}]}}"
        );
    }

    #[test]
    fn deep_containers_are_elided_past_three_levels() {
        assert_eq!(
            args(json!([[[[1]]], {"a": {"b": {"c": 1}}}])),
            "[[[[...]]], {'a': {'b': {...}}}]"
        );
        let nested = json!([[[1, [2]]]]);
        let nested = nested.as_array().unwrap();
        assert_eq!(saferepr(PyObject::List(nested), None, 0), "[[[1, [2]]]]");
        assert_eq!(saferepr(PyObject::List(nested), None, 1), "[[...]]");
        assert_eq!(saferepr(PyObject::Tuple(&nested[..1]), None, 1), "([...],)");
        assert_eq!(saferepr(PyObject::Tuple(&[]), None, 0), "()");
    }

    #[test]
    fn long_strings_are_cut_at_the_budget() {
        let long = "x".repeat(2000);
        assert_eq!(args(json!([long])), format!("['{}...']", "x".repeat(1023)));
        // Cut back to the last space inside the budget.
        let words = "word ".repeat(300);
        let expected = format!("['{}word...']", "word ".repeat(203));
        assert_eq!(args(json!([words])), expected);
        assert_eq!(expected.chars().count(), 1026);
        // Code points, not bytes, count.
        let accents = args(json!(["é".repeat(2000)]));
        assert_eq!(accents, format!("['{}...']", "é".repeat(1023)));
    }

    #[test]
    fn long_containers_end_with_ellipsis_and_closers() {
        let numbers: Vec<Value> = (0..400).map(Value::from).collect();
        let repr = args_repr(&numbers);
        assert_eq!(repr.chars().count(), 1033);
        assert!(repr.ends_with(", 225, 226..., ...]"), "{repr}");

        let many: Map<String, Value> = (0..50)
            .map(|index| (format!("k{index}"), Value::from("v".repeat(30))))
            .collect();
        let repr = kwargs_repr(&many);
        assert_eq!(repr.chars().count(), 1035);
        assert!(repr.ends_with("'k25': 'v...', ...}"), "{repr}");

        let alphabet = "a b c d e f g h i j k l m n o p q r s t u v w x y z".repeat(30);
        let repr = args(json!([[1, 2, [3, 4, alphabet], 5], 6]));
        assert_eq!(repr.chars().count(), 1036);
        assert!(repr.ends_with(" q r s t...'], ...]]"), "{repr}");
    }

    #[test]
    fn tiny_budgets_match_celery() {
        let value = json!([[1, 2], "abc def", {"k": [3, 4]}]);
        let value = value.as_array().unwrap();
        let cut = |max_len| saferepr(PyObject::List(value), Some(max_len), 3);
        assert_eq!(cut(1), "[, ...]");
        assert_eq!(cut(5), "[[1, , ...]]");
        assert_eq!(cut(10), "[[1, 2], 'a...', ...]");
        assert_eq!(cut(12), "[[1, 2], 'abc...', ...]");
        assert_eq!(cut(20), "[[1, 2], 'abc def', , ...]");
        assert_eq!(cut(100), "[[1, 2], 'abc def', {'k': [3, 4]}]");
    }

    #[test]
    fn float_repr_matches_python() {
        let cases: [(f64, &str); 18] = [
            (1.0, "1.0"),
            (-1.5, "-1.5"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (123456789.0, "123456789.0"),
            (1e15, "1000000000000000.0"),
            (9999999999999998.0, "9999999999999998.0"),
            (1e16, "1e+16"),
            (1e22, "1e+22"),
            (0.0001, "0.0001"),
            (0.00005, "5e-05"),
            (0.1 + 0.2, "0.30000000000000004"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            // Exact ties between two shortest candidates go to even, as
            // Python's dtoa does (Rust's shortest formatting rounds up).
            (253216811626205.0 + 0.125, "253216811626205.12"),
            (1906292562772882.0 + 0.25, "1906292562772882.2"),
            (f64::INFINITY, "inf"),
        ];
        for (value, expected) in cases {
            assert_eq!(float_repr(value), expected, "{value:e}");
        }
        assert_eq!(float_repr(f64::NEG_INFINITY), "-inf");
        assert_eq!(float_repr(f64::NAN), "nan");
    }
}
