//! Property tests of the outbox record decoders (issue 14, "Decoders never
//! panic"): how stored sled keys and values come back as records. A disk, a
//! crash or an operator's copy can damage any of them, and the outbox must
//! then answer with an error, or move the record aside as a dead letter,
//! but never panic: a panic in the relay or at open takes every accepted
//! task's delivery down with it.
//!
//! Covered: the key parsers ([`parse_pending_key`], [`PendingCursor::decode`],
//! [`published_index_ids`], the journal's and the `u64` records' keys) and
//! every JSON record ([`Task`], [`TaskStatus`], [`DeadLetter`],
//! [`IdempotencyRecord`], [`PersistedCounters`] and the counters built from
//! it, [`OperatorHolds`], [`StoredQueues`], [`OutboxRecord`]) on random bytes
//! and round trips; then a whole store, written by a real [`Outbox`], whose
//! keys and values are mutated (bit flips, truncation, insertion, deletion,
//! duplicated spans, random replacements) before it is opened again and
//! every reader and the relay's writes are run over it.
//!
//! The generators and the damaged store are shared with the salvage
//! properties (`salvage/salvage_proptests.rs`).

use super::keys::*;
use super::operations::{OutboxRecord, PendingCursor};
use super::storage::{KeyValuePairs, WriteOperation};
use super::*;
use crate::proptest_support::{config, json_value, mutated, mutation, nested, task_of, Mutation, DEEP};
use crate::relay::holds::{BreakerOverride, OperatorHolds};
use crate::task::{QueueName, TaskName};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::TimeZone;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::ops::Bound;

// ------------------------------------------------------ in-memory store

/// An [`OutboxStorage`] in a `BTreeMap`: sled's ordering and batches
/// without a disk, so a damaged store costs microseconds to build.
#[derive(Default)]
struct MemoryStorage(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

impl MemoryStorage {
    fn with(records: BTreeMap<Vec<u8>, Vec<u8>>) -> Self {
        Self(Mutex::new(records))
    }

    fn records(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.0.lock().expect("store poisoned").clone()
    }
}

impl OutboxStorage for MemoryStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.0.lock().expect("store poisoned").get(key).cloned())
    }

    fn apply(&self, operations: Vec<WriteOperation>) -> Result<(), StorageError> {
        let mut records = self.0.lock().expect("store poisoned");
        for (key, value) in operations {
            match value {
                Some(value) => records.insert(key, value),
                None => records.remove(&key),
            };
        }
        Ok(())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<KeyValuePairs, StorageError> {
        let start = match after {
            Some(after) => Bound::Excluded(after.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(self
            .0
            .lock()
            .expect("store poisoned")
            .range((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StorageError> {
        let records = self.0.lock().expect("store poisoned");
        Ok(records
            .iter()
            .map(|(key, value)| (key.len() + value.len()) as u64)
            .sum())
    }
}

pub(super) fn settings() -> OutboxSettings {
    OutboxSettings {
        max_journal_entries: 1000,
        ..OutboxSettings::for_test(std::path::Path::new("/nonexistent/record-proptests"))
    }
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

const EXCHANGE: &str = "task_exchange";
const QUEUE_LANES: [&str; 2] = ["q-export", "q-platform.fifo"];

fn stored_task(n: u32) -> Task {
    let mut task = Task::for_test(
        TaskId::generate(),
        "export.project",
        vec![json!(n), json!("org"), json!({"nested": [1.5, null, "é"]})],
        json!({"output_type": "csv"}).as_object().cloned().unwrap_or_default(),
        "export",
        &["export", "platform.fifo"],
    );
    task.eta = Some(Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap());
    task.priority = Some(3);
    task.time_limit = Some(30.5);
    task.properties.insert("creator_id".into(), json!(n));
    task
}

/// A store as a running gateway leaves it: pending tasks in the exchange
/// lane and fanned out over two queue lanes, published statuses and their
/// retention index, a failure noted, a dead letter, an idempotency record,
/// journal entries, send marks, operator holds and the counters record.
pub(super) fn written_store() -> &'static BTreeMap<Vec<u8>, Vec<u8>> {
    static STORE: std::sync::OnceLock<BTreeMap<Vec<u8>, Vec<u8>>> = std::sync::OnceLock::new();
    STORE.get_or_init(|| {
        let storage = Arc::new(MemoryStorage::default());
        let outbox = Outbox::with_storage(storage.clone(), settings()).expect("an empty store opens");
        let exchange = Lane::new(EXCHANGE);
        let queues: Vec<Lane> = QUEUE_LANES.into_iter().map(Lane::new).collect();
        runtime().block_on(async {
            for n in 0..6 {
                let key = (n % 2 == 0).then(|| IdempotencyKey::new(format!("key-{n}"), format!("fingerprint-{n}")));
                outbox
                    .accept(vec![(stored_task(n), vec![exchange.clone()])], key)
                    .await
                    .expect("accepted");
            }
            outbox
                .accept(
                    vec![(stored_task(10), queues.clone()), (stored_task(11), queues.clone())],
                    None,
                )
                .await
                .expect("accepted");
        });
        let head = outbox.head(&exchange, 10).expect("head");
        outbox.mark_sending(&exchange, &head[..3]).expect("marked");
        outbox.complete(&[&head[0], &head[1]]).expect("completed");
        outbox
            .record_failure(&[&head[2]], "connection reset", Attempt::Made)
            .expect("failure noted");
        outbox
            .dead_letter(&head[3], "poison", Attempt::Made)
            .expect("dead-lettered");
        let fanned = outbox.head(&queues[0], 10).expect("head");
        outbox.complete(&[&fanned[0]]).expect("completed");
        OperatorHolds {
            relay_paused: true,
            breaker: Some(BreakerOverride::Closed),
        }
        .save(&outbox)
        .expect("holds saved");
        drop(outbox);
        storage.records()
    })
}

/// Everything a gateway does that reads stored records, over `storage`.
/// Each call may fail; none may panic.
fn exercise(storage: Arc<MemoryStorage>) {
    let Ok(outbox) = Outbox::with_storage(storage.clone(), settings()) else {
        return;
    };
    let mut lanes = outbox.lanes();
    lanes.extend([EXCHANGE, QUEUE_LANES[0], QUEUE_LANES[1]].map(Lane::new));
    let mut ids: Vec<TaskId> = Vec::new();
    for lane in &lanes {
        if let Ok(entries) = outbox.head(lane, 16) {
            ids.extend(entries.iter().map(|entry| entry.task.id));
            let _ = outbox.mark_sending(lane, &entries);
            if let Some(first) = entries.first() {
                let _ = outbox.record_failure(&[first], "broker away", Attempt::Made);
                let _ = outbox.record_failure(&[first], "no connection", Attempt::NotMade);
            }
            if let Some(last) = entries.last() {
                let _ = outbox.dead_letter(last, "refused by the broker", Attempt::Made);
            }
            let done: Vec<&PendingEntry> = entries.iter().take(2).collect();
            let _ = outbox.complete(&done);
        }
        let _ = outbox.entries_after(lane, Some(1), 4);
    }
    for once_per_task in [false, true] {
        let mut cursor: Option<PendingCursor> = None;
        for _ in 0..8 {
            let page = if once_per_task {
                outbox.export_page(cursor.as_ref(), 2)
            } else {
                outbox.list_pending(cursor.as_ref(), 2)
            };
            let Ok(page) = page else { break };
            ids.extend(page.records.iter().map(|record| record.task.id));
            let Some(next) = page.next else { break };
            let _ = PendingCursor::decode(&next.encode());
            cursor = Some(next);
        }
    }
    for (key, _) in storage.records() {
        if let Some(id) = key.strip_prefix(STATUS).and_then(|id| <[u8; 16]>::try_from(id).ok()) {
            ids.push(TaskId::from_bytes(id));
        }
    }
    for id in &ids {
        let _ = outbox.status(id);
    }
    if let Ok(letters) = outbox.dead_letters(None, 100) {
        for letter in letters.iter().take(2) {
            let _ = outbox.dead_letter_entry(letter.sequence);
            let _ = outbox.requeue_dead_letter(letter.sequence);
        }
    }
    for (key, _) in storage.records() {
        if let Some(sequence) = key.strip_prefix(DEAD).and_then(|at| <[u8; 8]>::try_from(at).ok()) {
            let _ = outbox.dead_letter_entry(u64::from_be_bytes(sequence));
            let _ = outbox.requeue_dead_letter(u64::from_be_bytes(sequence));
        }
    }
    let _ = outbox.requeue_all_dead_letters();
    if let Ok(entries) = outbox.journal_head(100) {
        let sequences: Vec<u64> = entries.iter().map(|entry| entry.sequence).take(3).collect();
        let _ = outbox.remove_journal_entries(&sequences);
    }
    let _ = outbox.journal_oldest_accepted_at();
    let _ = outbox.journal_is_full();
    let _ = OperatorHolds::load(&outbox);
    let _ = outbox.stats();
    let _ = outbox.report(true);
    let _ = outbox.has_room();
    let _ = outbox.prune();
    let _ = (outbox.depth(), outbox.bytes(), outbox.journal_depth());
    // And a new accept on top, with a key the store may already hold.
    runtime().block_on(async {
        let key = IdempotencyKey::new("key-0", "fingerprint-0");
        let _ = outbox
            .accept(vec![(stored_task(99), vec![Lane::new(EXCHANGE)])], Some(key))
            .await;
        let _ = outbox
            .accept(vec![(stored_task(98), QUEUE_LANES.map(Lane::new).to_vec())], None)
            .await;
        let _ = outbox.flush().await;
    });
    let _ = outbox.purge_pending();
    let _ = outbox.purge_dead_letters();
}

// ------------------------------------------------------------ generators

/// Bytes that steer a mutation into JSON's corners and into key layout
/// (prefixes, the lane separator, big sequences).
pub(super) const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e999",
    b"4294967295",
    b"4294967296",
    b"18446744073709551615",
    b"18446744073709551616",
    b"\"queued\"",
    b"\"published\"",
    b"\"dead_letter\"",
    b"\"2030-01-01T00:00:00Z\"",
    b"\0",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"q/",
    b"t/",
    b"j/",
    b"d/",
    b"i/",
    b"p/",
    b"m/",
];

/// One change to a stored record, chosen by position in key order.
#[derive(Debug, Clone)]
pub(super) enum Damage {
    Value(Index, Vec<Mutation>),
    Key(Index, Vec<Mutation>),
    Replace(Index, Vec<u8>),
    Remove(Index),
    /// A record under one of the outbox's prefixes with arbitrary key
    /// suffix and value (a stray or half-written record).
    Stray(&'static [u8], Vec<u8>, Vec<u8>),
    /// A `u64` record set to an edge value (`m/sequence_reserved`,
    /// `m/sent/...`, or a sequence in a key).
    Edge(Index, u64),
    /// A counters record that decodes, with any counts.
    Counters(Vec<u8>),
    /// One number in a JSON record set to an edge value (a count or an
    /// attempt number at its type's limit).
    Number(Index, Index, Value),
}

pub(super) fn damage() -> impl Strategy<Value = Damage> {
    let prefixes: &[&[u8]] = &[
        PENDING,
        STATUS,
        DEAD,
        IDEMPOTENCY,
        PUBLISHED_INDEX,
        JOURNAL,
        SENT_MARK,
        b"m/",
    ];
    let edge = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(1u64 << 63),
        any::<u64>()
    ];
    prop_oneof![
        5 => (any::<Index>(), vec(mutation(TOKENS), 1..6)).prop_map(|(at, edits)| Damage::Value(at, edits)),
        2 => (any::<Index>(), vec(mutation(TOKENS), 1..4)).prop_map(|(at, edits)| Damage::Key(at, edits)),
        1 => (any::<Index>(), vec(any::<u8>(), 0..40)).prop_map(|(at, bytes)| Damage::Replace(at, bytes)),
        1 => any::<Index>().prop_map(Damage::Remove),
        1 => (select(prefixes), vec(any::<u8>(), 0..24), vec(any::<u8>(), 0..40))
            .prop_map(|(prefix, key, value)| Damage::Stray(prefix, key, value)),
        1 => (any::<Index>(), edge).prop_map(|(at, value)| Damage::Edge(at, value)),
        1 => counters_record().prop_map(|record| Damage::Counters(serde_json::to_vec(&record).expect("serializes"))),
        2 => (any::<Index>(), any::<Index>(), select(EDGE_NUMBERS).prop_map(|number| {
            serde_json::from_str::<Value>(number).expect("an edge number")
        }))
            .prop_map(|(record, number, value)| Damage::Number(record, number, value)),
    ]
}

pub(super) fn damaged(original: &BTreeMap<Vec<u8>, Vec<u8>>, damages: &[Damage]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut records = original.clone();
    let pick = |records: &BTreeMap<Vec<u8>, Vec<u8>>, at: &Index| -> Option<Vec<u8>> {
        (!records.is_empty()).then(|| records.keys().nth(at.index(records.len())).cloned())?
    };
    for damage in damages {
        match damage {
            Damage::Value(at, edits) => {
                if let Some(key) = pick(&records, at) {
                    let value = mutated(&records[&key], edits);
                    records.insert(key, value);
                }
            }
            Damage::Key(at, edits) => {
                if let Some(key) = pick(&records, at) {
                    let value = records.remove(&key).unwrap_or_default();
                    records.insert(mutated(&key, edits), value);
                }
            }
            Damage::Replace(at, bytes) => {
                if let Some(key) = pick(&records, at) {
                    records.insert(key, bytes.clone());
                }
            }
            Damage::Remove(at) => {
                if let Some(key) = pick(&records, at) {
                    records.remove(&key);
                }
            }
            Damage::Counters(record) => {
                records.insert(COUNTERS.to_vec(), record.clone());
            }
            Damage::Number(at, number, edge) => {
                if let Some(key) = pick(&records, at) {
                    if let Ok(mut value) = serde_json::from_slice::<Value>(&records[&key]) {
                        let mut numbers = Vec::new();
                        numbers_in(&mut value, &mut numbers);
                        if !numbers.is_empty() {
                            let count = numbers.len();
                            *numbers.swap_remove(number.index(count)) = edge.clone();
                            records.insert(key, serde_json::to_vec(&value).expect("serializes"));
                        }
                    }
                }
            }
            Damage::Stray(prefix, key, value) => {
                records.insert(prefixed(prefix, key), value.clone());
            }
            Damage::Edge(at, edge) => {
                if let Some(key) = pick(&records, at) {
                    if key.len() >= 8 && (key.starts_with(PENDING) || key.starts_with(JOURNAL) || key.starts_with(DEAD))
                    {
                        // The sequence at the end of the key.
                        let value = records.remove(&key).unwrap_or_default();
                        let mut key = key;
                        let at = key.len() - 8;
                        key[at..].copy_from_slice(&edge.to_be_bytes());
                        records.insert(key, value);
                    } else {
                        records.insert(key, edge.to_be_bytes().to_vec());
                    }
                }
            }
        }
    }
    records
}

/// Numbers at the limits of the types records hold.
const EDGE_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "255",
    "256",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "-9223372036854775808",
    "1e300",
    "0.5",
];

fn numbers_in<'a>(value: &'a mut Value, found: &mut Vec<&'a mut Value>) {
    match value {
        Value::Number(_) => found.push(value),
        Value::Array(items) => items.iter_mut().for_each(|item| numbers_in(item, found)),
        Value::Object(entries) => entries.values_mut().for_each(|item| numbers_in(item, found)),
        _ => {}
    }
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    vec((".{0,10}", json_value()), 0..5).prop_map(|entries| entries.into_iter().collect())
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // chrono's whole range: a stored time need not be one serde wrote today.
    (-8_210_266_876_800i64..8_210_298_412_799, 0..1_000_000_000u32)
        .prop_filter_map("in chrono's range", |(seconds, nanos)| {
            Utc.timestamp_opt(seconds, nanos).single()
        })
}

fn seconds() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

fn task_name() -> impl Strategy<Value = TaskName> {
    "[^\\s\\p{Cc}]{1,30}".prop_filter_map("a task name", |name| TaskName::parse(&name).ok())
}

fn queue_names() -> impl Strategy<Value = Vec<QueueName>> {
    vec(
        "[a-z0-9._:-]{1,20}".prop_filter_map("a queue name", |name| QueueName::parse(&name).ok()),
        0..3,
    )
}

fn lane() -> impl Strategy<Value = Lane> {
    "[^\0]{0,30}".prop_map(Lane::new)
}

fn task() -> impl Strategy<Value = Task> {
    let identity = (
        any::<u128>(),
        task_name(),
        vec(json_value(), 0..4),
        json_object(),
        ".{0,20}",
        queue_names(),
    );
    let options = (
        proptest::option::of(time()),
        proptest::option::of(time()),
        proptest::option::of(any::<u8>()),
        proptest::option::of(".{0,20}"),
        proptest::option::of(".{0,20}"),
        proptest::option::of(".{0,20}"),
        proptest::option::of(seconds()),
        proptest::option::of(seconds()),
        json_object(),
        time(),
    );
    (identity, options).prop_map(task_of)
}

fn task_state() -> impl Strategy<Value = TaskState> {
    select(&[TaskState::Queued, TaskState::Published, TaskState::DeadLetter][..])
}

fn task_status() -> impl Strategy<Value = TaskStatus> {
    (
        (any::<u128>(), task_name(), ".{0,20}", queue_names(), task_state()),
        (
            any::<u32>(),
            proptest::option::of(".{0,30}"),
            time(),
            proptest::option::of(time()),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                (id, task, routing_key, queues, state),
                (attempts, last_error, accepted_at, published_at, remaining_deliveries),
            )| TaskStatus {
                id: TaskId::from_bytes(id.to_be_bytes()),
                task,
                routing_key,
                queues,
                state,
                attempts,
                last_error,
                accepted_at,
                published_at,
                remaining_deliveries,
            },
        )
}

fn dead_letter() -> impl Strategy<Value = DeadLetter> {
    (
        any::<u64>(),
        lane(),
        proptest::option::of(task()),
        proptest::option::of(".{0,30}"),
        ".{0,30}",
        any::<u32>(),
        time(),
    )
        .prop_map(|(sequence, lane, task, raw, reason, attempts, dead_at)| DeadLetter {
            sequence,
            lane,
            task,
            raw,
            reason,
            attempts,
            dead_at,
        })
}

fn acceptance() -> impl Strategy<Value = Acceptance> {
    (any::<u128>(), task_name(), ".{0,20}", queue_names()).prop_map(|(id, task, routing_key, queues)| Acceptance {
        id: TaskId::from_bytes(id.to_be_bytes()),
        task,
        routing_key,
        queues,
    })
}

fn idempotency_record() -> impl Strategy<Value = IdempotencyRecord> {
    (vec(acceptance(), 0..3), time(), proptest::option::of("[0-9a-f]{64}")).prop_map(
        |(acceptances, created_at, fingerprint)| IdempotencyRecord {
            acceptances,
            created_at,
            fingerprint,
        },
    )
}

fn counters_record() -> impl Strategy<Value = PersistedCounters> {
    let count = prop_oneof![0..1000u64, any::<u64>(), Just(u64::MAX)];
    (
        vec((lane(), count.clone(), count.clone()), 0..4),
        vec(
            (
                "[a-z0-9._:-]{1,20}".prop_filter_map("a queue name", |name| QueueName::parse(&name).ok()),
                count.clone(),
            ),
            0..4,
        ),
        count.clone(),
        proptest::option::of(count.clone()),
        proptest::option::of(count),
    )
        .prop_map(
            |(lanes, queues, dead_letters, journal, finished_group)| PersistedCounters {
                lanes,
                queues,
                dead_letters,
                journal,
                finished_group,
            },
        )
}

fn holds() -> impl Strategy<Value = OperatorHolds> {
    (
        any::<bool>(),
        proptest::option::of(select(&[BreakerOverride::Open, BreakerOverride::Closed][..])),
    )
        .prop_map(|(relay_paused, breaker)| OperatorHolds { relay_paused, breaker })
}

/// Every way a stored value is decoded somewhere in the outbox.
fn decode_as_every_record(bytes: &[u8]) {
    let _ = serde_json::from_slice::<Task>(bytes);
    let _ = serde_json::from_slice::<TaskStatus>(bytes);
    let _ = serde_json::from_slice::<DeadLetter>(bytes).map(operations::DeadLetterEntry::from);
    let _ = serde_json::from_slice::<IdempotencyRecord>(bytes);
    let _ = serde_json::from_slice::<OperatorHolds>(bytes);
    let _ = serde_json::from_slice::<StoredQueues>(bytes);
    let _ = serde_json::from_slice::<OutboxRecord>(bytes);
    if let Ok(record) = serde_json::from_slice::<PersistedCounters>(bytes) {
        if record.is_plausible() {
            let _ = Counters::from_record(record).to_record();
        }
    }
    let _ = <[u8; 8]>::try_from(bytes).map(u64::from_be_bytes);
}

/// Every way a stored key is parsed.
fn parse_as_every_key(key: &[u8], value: &[u8]) {
    let _ = parse_pending_key(key);
    let _ = published_index_ids(key, value);
    let _ = PendingCursor::decode(&URL_SAFE_NO_PAD.encode(key));
}

// ------------------------------------------------------------ properties

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_damaged_store_opens_and_serves_without_panicking(damages in vec(damage(), 1..10)) {
        exercise(Arc::new(MemoryStorage::with(damaged(written_store(), &damages))));
    }

    #[test]
    fn stored_records_mutated_never_panic_their_decoders(
        which in any::<Index>(),
        edits in vec(mutation(TOKENS), 1..8),
    ) {
        let store = written_store();
        let (key, value) = store.iter().nth(which.index(store.len())).expect("a record");
        decode_as_every_record(&mutated(value, &edits));
        parse_as_every_key(&mutated(key, &edits), value);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn random_bytes_never_panic_the_decoders(
        key in vec(any::<u8>(), 0..40),
        value in prop_oneof![
            vec(any::<u8>(), 0..64),
            vec(select(TOKENS), 0..24).prop_map(|tokens| tokens.concat()),
        ],
        prefix in select(TOKENS),
    ) {
        decode_as_every_record(&value);
        parse_as_every_key(&key, &value);
        parse_as_every_key(&prefixed(prefix, &key), &value);
        let _ = PendingCursor::decode(&String::from_utf8_lossy(&key));
    }

    #[test]
    fn pending_keys_parse_back(lane in lane(), sequence in any::<u64>()) {
        let key = pending_key(&lane, sequence);
        prop_assert_eq!(parse_pending_key(&key), Some((lane, sequence)));
        let text = URL_SAFE_NO_PAD.encode(&key);
        prop_assert_eq!(PendingCursor::decode(&text).map(|cursor| cursor.encode()).ok(), Some(text));
    }

    #[test]
    fn cursors_decode_only_what_they_encode(text in prop_oneof!["[A-Za-z0-9_-]{0,40}", ".{0,40}"]) {
        if let Ok(cursor) = PendingCursor::decode(&text) {
            prop_assert_eq!(cursor.encode(), text.clone());
            let key = URL_SAFE_NO_PAD.decode(&text).expect("a cursor is base64");
            prop_assert!(parse_pending_key(&key).is_some());
        }
    }

    #[test]
    fn published_index_records_list_their_ids(at in time(), ids in vec(any::<u128>(), 1..6)) {
        let ids: Vec<TaskId> = ids.into_iter().map(|id| TaskId::from_bytes(id.to_be_bytes())).collect();
        let key = published_index_key(at, &ids[0]);
        let value: Vec<u8> = ids.iter().flat_map(|id| *id.as_bytes()).collect();
        prop_assert_eq!(published_index_ids(&key, &value), ids.clone());
        // Older outboxes: an empty value stands for the key's own id.
        prop_assert_eq!(published_index_ids(&key, &[]), vec![ids[0]]);
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tasks_round_trip(task in task()) {
        let stored = serde_json::to_vec(&task).expect("a task serializes");
        prop_assert_eq!(&serde_json::from_slice::<Task>(&stored).expect("decodes"), &task);
        let queues = serde_json::from_slice::<StoredQueues>(&stored).expect("decodes").queues;
        prop_assert_eq!(&queues, &task.queues);
        let record = OutboxRecord { task: task.clone(), lane: None, sequence: Some(7), attempts: 2, last_error: None };
        let exported = serde_json::to_vec(&record).expect("a record serializes");
        prop_assert_eq!(serde_json::from_slice::<OutboxRecord>(&exported).expect("decodes"), record);
    }

    #[test]
    fn statuses_and_dead_letters_round_trip(status in task_status(), letter in dead_letter()) {
        let stored = serde_json::to_vec(&status).expect("serializes");
        prop_assert_eq!(serde_json::from_slice::<TaskStatus>(&stored).expect("decodes"), status);
        let stored = serde_json::to_vec(&letter).expect("serializes");
        prop_assert_eq!(serde_json::from_slice::<DeadLetter>(&stored).expect("decodes"), letter);
    }

    #[test]
    fn small_records_round_trip(record in idempotency_record(), holds in holds(), counters in counters_record()) {
        let stored = serde_json::to_vec(&record).expect("serializes");
        let back: IdempotencyRecord = serde_json::from_slice(&stored).expect("decodes");
        prop_assert_eq!(serde_json::to_value(back).unwrap(), serde_json::to_value(record).unwrap());
        let stored = serde_json::to_vec(&holds).expect("serializes");
        prop_assert_eq!(serde_json::from_slice::<OperatorHolds>(&stored).expect("decodes"), holds);
        let stored = serde_json::to_vec(&counters).expect("serializes");
        let back: PersistedCounters = serde_json::from_slice(&stored).expect("decodes");
        prop_assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&counters).unwrap());
        // A record the outbox believes loads; one it does not is counted
        // again at open (`an_implausible_counters_record_is_counted_again`).
        if back.is_plausible() {
            let loaded = Counters::from_record(back).to_record();
            prop_assert_eq!(loaded.dead_letters, counters.dead_letters);
        }
    }
}

#[test]
fn an_implausible_counters_record_is_counted_again() {
    let mut records = written_store().clone();
    let honest: PersistedCounters = serde_json::from_slice(&records[COUNTERS]).expect("a counters record");
    let lanes = honest
        .lanes
        .iter()
        .map(|(lane, _, _)| (lane.clone(), u64::MAX, u64::MAX))
        .collect();
    let damaged = PersistedCounters {
        lanes,
        queues: Vec::new(),
        dead_letters: u64::MAX,
        journal: Some(u64::MAX),
        finished_group: honest.finished_group,
    };
    records.insert(COUNTERS.to_vec(), serde_json::to_vec(&damaged).expect("serializes"));
    let outbox = Outbox::with_storage(Arc::new(MemoryStorage::with(records)), settings()).expect("opens");
    let depth: u64 = honest.lanes.iter().map(|(_, depth, _)| depth).sum();
    assert_eq!(outbox.depth(), depth);
    assert_eq!(outbox.journal_depth(), honest.journal.expect("journal counted"));
    assert!(outbox.has_room());
}

// ------------------------------------------------------- deep nesting

#[test]
fn deeply_nested_records_are_refused_not_overflowed() {
    let stored = serde_json::to_vec(&stored_task(1)).expect("serializes");
    let text = String::from_utf8(stored).expect("UTF-8");
    for value in [
        nested(DEEP, "[", "", "]").into_bytes(),
        nested(DEEP, "{\"a\":", "", "}").into_bytes(),
        text.replacen("[", &"[".repeat(DEEP), 1).into_bytes(),
        text.replacen("{\"nested\":", &"{\"nested\":".repeat(DEEP), 1)
            .into_bytes(),
    ] {
        decode_as_every_record(&value);
        assert!(serde_json::from_slice::<Task>(&value).is_err());
    }
}
