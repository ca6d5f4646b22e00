//! Property tests of salvage's decoders (issue 14, "Decoders never panic"):
//! `taskgate outbox salvage` exists to read stores that are damaged, so its
//! readers meet the worst bytes of all. The raw scan's byte-level parsers
//! ([`segment_lsn`], [`id_objects`], [`looks_like_task`]) and the raw scan
//! itself ([`raw_scan`]) run over random bytes and over a real sled log
//! mutated; [`salvage`] runs over sled stores whose records are damaged
//! (the damaged records of `record_proptests.rs`, written into a real sled
//! store). Each must report what it found, never panic.

use super::super::record_proptests::{damage, damaged, runtime, written_store, TOKENS};
use super::*;
use crate::proptest_support::{config, mutated, mutation};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::json;

/// Collects what salvage hands out.
#[derive(Default)]
struct Collected {
    pending: usize,
    dead: usize,
}

impl SalvageSink for Collected {
    fn pending(&mut self, record: OutboxRecord, lanes: Vec<Lane>) -> Result<(), SalvageError> {
        let _ = (record, lanes);
        self.pending += 1;
        Ok(())
    }

    fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), SalvageError> {
        let _ = letter;
        self.dead += 1;
        Ok(())
    }
}

fn exchange(_: &Task) -> Vec<Lane> {
    vec![Lane::new("task_exchange")]
}

/// The `db` log of a small real outbox (tasks pending, one published),
/// as sled wrote it.
fn real_log() -> &'static [u8] {
    static LOG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let settings = OutboxSettings::for_test(dir.path());
        {
            let outbox = Outbox::open(&settings).expect("a new outbox opens");
            runtime().block_on(async {
                for n in 0..8 {
                    let task = Task::for_test(
                        TaskId::generate(),
                        "export.project",
                        vec![json!(n), json!({"k": [n, "é"]})],
                        Default::default(),
                        "export",
                        &["export"],
                    );
                    outbox
                        .accept(vec![(task, vec![Lane::new("task_exchange")])], None)
                        .await
                        .expect("accepted");
                }
            });
            let head = outbox.head(&Lane::new("task_exchange"), 2).expect("head");
            outbox.complete(&head.iter().collect::<Vec<_>>()).expect("completed");
            runtime().block_on(outbox.flush()).expect("flushed");
        }
        std::fs::read(settings.path.join("db")).expect("sled's log")
    })
}

/// Writes `log` as the `db` of a directory and raw-scans it.
fn raw_scan_of(log: &[u8], segment: u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("db"), log).expect("written");
    let _ = raw_scan(dir.path(), segment, &HashSet::new(), &HashSet::new());
}

fn byte_parsers(bytes: &[u8]) {
    let _ = segment_lsn(bytes);
    for at in id_objects(bytes) {
        let _ = looks_like_task(bytes, at);
    }
    for at in 0..bytes.len().min(64) {
        let _ = looks_like_task(bytes, at);
    }
}

/// Parts of a stored task as the raw scan looks for them.
const TASK_PARTS: &[&str] = &[
    "{\"id\":\"",
    "0143a7c7-9b1d-4fdf-a533-96615c4d14f1",
    "\",\"task\":\"",
    "export.project",
    "\",\"args\":",
    "[1]",
    ",\"kwargs\":{}",
    "}",
    "{\"lanes\":[",
    "\"",
    "\0",
];

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn byte_parsers_never_panic(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..128),
            vec(proptest::sample::select(TASK_PARTS), 0..16).prop_map(|parts| parts.concat().into_bytes()),
        ],
    ) {
        byte_parsers(&bytes);
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn raw_scans_of_random_files_never_panic(
        log in prop_oneof![
            vec(any::<u8>(), 0..4096),
            vec(proptest::sample::select(TASK_PARTS), 0..200).prop_map(|parts| parts.concat().into_bytes()),
        ],
        segment in prop_oneof![Just(256u64), Just(4096), Just(DEFAULT_SEGMENT_BYTES)],
    ) {
        byte_parsers(&log);
        raw_scan_of(&log, segment);
    }

    #[test]
    fn raw_scans_of_a_damaged_log_never_panic(
        edits in vec(mutation(TOKENS), 1..12),
        segment_is_sleds in any::<bool>(),
    ) {
        let log = mutated(real_log(), &edits);
        let segment = if segment_is_sleds { DEFAULT_SEGMENT_BYTES } else { 4096 };
        raw_scan_of(&log, segment);
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn salvage_of_damaged_records_never_panics(damages in vec(damage(), 1..8)) {
        let records = damaged(written_store(), &damages);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let source = dir.path().join("outbox");
        {
            let db = sled::open(&source).expect("a new sled store");
            for (key, value) in records {
                db.insert(key, value).expect("inserted");
            }
            db.flush().expect("flushed");
        }
        let mut sink = Collected::default();
        let report = salvage(&source, &dir.path().join("work"), &exchange, true, &mut sink);
        prop_assert!(report.is_ok(), "{:?}", report.err());
        let _ = (sink.pending, sink.dead);
    }
}
