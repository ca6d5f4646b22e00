//! Celery signatures: the tasks a message asks the worker to apply after it,
//! as `link` (callbacks), `link_error` (errbacks) and the rest of a `chain`.
//!
//! Owns the request shape of one signature ([`SignatureRequest`], Celery's
//! own dict: `task`, `args`, `kwargs`, `options`, `subtask_type`,
//! `immutable`), "one signature or a list of them" ([`OneOrMany`], as
//! `apply_async(link=...)` takes either), and the accepted form
//! ([`CelerySignature`]) a [`super::Task`] stores. Checking a signature
//! against the registry is intake's job ([`super::intake`]); writing it into
//! the message body is the encoder's ([`crate::celery`]).
//!
//! Invariant of a [`CelerySignature`]: it is a plain task signature (no
//! group, chord or nested signatures), its task passed the registry, and
//! its `options` carry no signatures of their own, so everything the worker
//! will apply was checked here.

use super::TaskName;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::marker::PhantomData;

/// One signature as a caller sends it, in Celery's dict shape
/// (`celery.canvas.Signature`, what `add.s(10)` serializes to).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignatureRequest {
    pub task: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Celery's `apply_async` options for this step (`queue`, `countdown`,
    /// `task_id`, ...). The worker applies them when it sends the step.
    #[serde(default)]
    pub options: Map<String, Value>,
    /// `null` for a plain task; groups and chords are not accepted here.
    #[serde(default)]
    pub subtask_type: Option<String>,
    /// `true`: the previous task's result is not passed to this one (`add.si(...)`).
    #[serde(default)]
    pub immutable: bool,
    /// Written by some older Celery releases; only `null` is accepted, since
    /// a chord size belongs to chords, which taskgate does not publish.
    #[serde(default)]
    pub chord_size: Option<u64>,
}

/// A single value or a list of them, as Celery's `maybe_list` accepts.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The items, each with its JSON path below `field` (`link` for a single
    /// signature, `link[2]` for the third of a list), for problem reports.
    pub fn into_items_with_paths(self, field: &str) -> Vec<(String, T)> {
        match self {
            OneOrMany::One(item) => vec![(field.to_owned(), item)],
            OneOrMany::Many(items) => items
                .into_iter()
                .enumerate()
                .map(|(index, item)| (format!("{field}[{index}]"), item))
                .collect(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    // By hand rather than `untagged`: this visitor deserializes the items in
    // place, so an error inside one keeps its path (`link[1].task`) instead of
    // collapsing into "data did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OneOrManyVisitor<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a signature object or a list of signature objects")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<OneOrMany<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany<T>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor(PhantomData))
    }
}

/// An accepted signature: a plain task the worker will apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CelerySignature {
    pub task: TaskName,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// In request order; for a chain step taskgate adds `task_id` when the
    /// caller did not, as Celery's chain freezes every step before sending.
    pub options: Map<String, Value>,
    pub immutable: bool,
}

/// Option names that would carry signatures of their own. The worker would
/// apply them, but taskgate could not check their tasks against the
/// registry, so they are refused rather than passed through unchecked.
pub const NESTED_SIGNATURE_OPTIONS: &[&str] = &["link", "link_error", "chain", "chord"];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    struct Holder {
        link: OneOrMany<SignatureRequest>,
    }

    fn decode(value: Value) -> Result<Holder, String> {
        let text = value.to_string();
        let mut deserializer = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|error| format!("{}: {}", error.path(), error.inner()))
    }

    #[test]
    fn one_signature_or_a_list() {
        let one = decode(json!({"link": {"task": "rawa.add", "args": [10]}})).unwrap();
        assert!(matches!(one.link, OneOrMany::One(ref sig) if sig.task == "rawa.add" && sig.args == [json!(10)]));
        let many = decode(json!({"link": [{"task": "a"}, {"task": "b", "immutable": true}]})).unwrap();
        let items = many.link.into_items_with_paths("link");
        assert_eq!(items[1].0, "link[1]");
        assert!(items[1].1.immutable);
    }

    #[test]
    fn errors_keep_their_path() {
        let error = decode(json!({"link": [{"task": "a"}, {"task": "b", "bogus": 1}]})).unwrap_err();
        assert!(error.starts_with("link[1]"), "{error}");
        assert!(error.contains("bogus"), "{error}");
        let error = decode(json!({"link": {"task": 5}})).unwrap_err();
        assert!(error.starts_with("link.task"), "{error}");
        let error = decode(json!({"link": "rawa.add"})).unwrap_err();
        assert!(error.contains("a signature object or a list"), "{error}");
    }
}
