//! What the property-test modules (`*_proptests.rs`, issue 14, "Decoders
//! never panic") share: their proptest configuration; the byte mutations
//! that damage captured or encoded input (bit flips, truncation,
//! insertion, deletion, duplicated spans, overwritten runs) and the
//! function that applies them; small random JSON values; the Celery
//! header names and the assembly of a generated [`Task`]; and the builder
//! of deeply nested input. Each module keeps its own tokens (the bytes its
//! mutations insert), since they steer into its own format.

use crate::task::{QueueName, Task, TaskId, TaskName};
use chrono::{DateTime, Utc};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::strategy::Union;
use serde_json::{Map, Number, Value};
use std::fmt::Debug;

/// `cases` cases, and no failure persistence: nothing is written into the
/// source tree; a failure prints its minimal input, which belongs in a
/// named regression test.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------- byte mutations

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    FlipBit(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// Copies `len` bytes from the first position to the second.
    Duplicate(Index, usize, Index),
    Overwrite(Index, Vec<u8>),
}

/// Any edit: bit flips, truncations, insertions, deletions, duplicated
/// spans and overwrites, weighted 3:1:3:2:1:2. Inserted and written bytes
/// are random or one of `tokens`.
pub(crate) fn mutation<T>(tokens: &'static [T]) -> impl Strategy<Value = Mutation>
where
    T: AsRef<[u8]> + Clone + Debug + 'static,
{
    edits(tokens, true)
}

/// The edits of [`mutation`] without overwrites, weighted 3:1:3:2:1.
pub(crate) fn mutation_without_overwrite<T>(tokens: &'static [T]) -> impl Strategy<Value = Mutation>
where
    T: AsRef<[u8]> + Clone + Debug + 'static,
{
    edits(tokens, false)
}

fn edits<T>(tokens: &'static [T], overwrite: bool) -> Union<BoxedStrategy<Mutation>>
where
    T: AsRef<[u8]> + Clone + Debug + 'static,
{
    let inserted = || {
        prop_oneof![
            vec(any::<u8>(), 1..6),
            select(tokens).prop_map(|token| token.as_ref().to_vec())
        ]
    };
    let flip_bit = (any::<Index>(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit));
    let truncate = any::<Index>().prop_map(Mutation::Truncate);
    let insert = (any::<Index>(), inserted()).prop_map(|(at, bytes)| Mutation::Insert(at, bytes));
    let delete = (any::<Index>(), 1..16usize).prop_map(|(at, len)| Mutation::Delete(at, len));
    let duplicate =
        (any::<Index>(), 1..64usize, any::<Index>()).prop_map(|(from, len, to)| Mutation::Duplicate(from, len, to));
    let mut edits = vec![
        (3, flip_bit.boxed()),
        (1, truncate.boxed()),
        (3, insert.boxed()),
        (2, delete.boxed()),
        (1, duplicate.boxed()),
    ];
    if overwrite {
        let overwrite = (any::<Index>(), inserted()).prop_map(|(at, bytes)| Mutation::Overwrite(at, bytes));
        edits.push((2, overwrite.boxed()));
    }
    // Draws as `prop_oneof!` over the same arms and weights does.
    Union::new_weighted(edits)
}

/// `original` with `mutations` applied in order.
pub(crate) fn mutated(original: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for mutation in mutations {
        apply(&mut bytes, mutation);
    }
    bytes
}

/// A position in `0..=len` (`Index` panics on an empty range).
fn position(index: &Index, len: usize) -> usize {
    index.index(len + 1)
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::FlipBit(at, bit) => {
            if !bytes.is_empty() {
                let at = at.index(bytes.len());
                bytes[at] ^= 1 << bit;
            }
        }
        Mutation::Truncate(at) => bytes.truncate(position(at, bytes.len())),
        Mutation::Insert(at, inserted) => {
            let at = position(at, bytes.len());
            bytes.splice(at..at, inserted.iter().copied());
        }
        Mutation::Delete(at, len) => {
            let at = position(at, bytes.len());
            let end = (at + len).min(bytes.len());
            bytes.drain(at..end);
        }
        Mutation::Duplicate(from, len, to) => {
            let from = position(from, bytes.len());
            let span = bytes[from..(from + len).min(bytes.len())].to_vec();
            let to = position(to, bytes.len());
            bytes.splice(to..to, span);
        }
        Mutation::Overwrite(at, replacement) => {
            let at = position(at, bytes.len());
            let end = (at + replacement.len()).min(bytes.len());
            bytes.splice(at..end, replacement.iter().copied());
        }
    }
}

// --------------------------------------------------------- JSON values

/// A JSON scalar: null, a boolean, an `i64`, a `u64`, a finite float or a
/// short string.
pub(crate) fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        ".{0,12}".prop_map(Value::from),
    ]
}

/// A small JSON value: [`json_leaf`]s in arrays and objects (keys of up to
/// 8 characters), 3 levels deep, up to 5 items a level.
pub(crate) fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((".{0,8}", inner), 0..5).prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

// ------------------------------------------------------ tasks, headers

/// Every Celery message header the decoder and the tracking record read.
pub(crate) const HEADER_NAMES: &[&str] = &[
    "id",
    "task",
    "root_id",
    "parent_id",
    "group",
    "shadow",
    "eta",
    "expires",
    "retries",
    "timelimit",
    "origin",
    "argsrepr",
    "kwargsrepr",
    "creator_id",
    "related_content_type",
    "related_object_id",
];

/// What a generated [`Task`] is made of: its id as a number, name, args,
/// kwargs, routing key and queues...
pub(crate) type TaskIdentity = (u128, TaskName, Vec<Value>, Map<String, Value>, String, Vec<QueueName>);

/// ...and its eta, expires, priority, parent, root and group ids, time
/// limits, properties and acceptance time.
pub(crate) type TaskOptions = (
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<u8>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<f64>,
    Map<String, Value>,
    DateTime<Utc>,
);

/// The task of generated parts.
pub(crate) fn task_of(
    (
        (id, task, args, kwargs, routing_key, queues),
        (eta, expires, priority, parent_id, root_id, group, time_limit, soft_time_limit, properties, accepted_at),
    ): (TaskIdentity, TaskOptions),
) -> Task {
    Task {
        id: TaskId::from_bytes(id.to_be_bytes()),
        task,
        args,
        kwargs,
        routing_key,
        queues,
        eta,
        expires,
        priority,
        parent_id,
        root_id,
        group,
        time_limit,
        soft_time_limit,
        properties,
        accepted_at,
        shadow: None,
        headers: Default::default(),
        ignore_result: None,
        retries: 0,
        group_index: None,
        link: None,
        link_error: None,
        chain: None,
        chord: None,
    }
}

// ------------------------------------------------------- deep nesting

/// How deep the deeply nested inputs go: far past any recursion a parser
/// could afford on a thread's stack.
pub(crate) const DEEP: usize = 100_000;

/// `open` `depth` times, then `middle`, then `close` `depth` times.
pub(crate) fn nested(depth: usize, open: &str, middle: &str, close: &str) -> String {
    format!("{}{middle}{}", open.repeat(depth), close.repeat(depth))
}
