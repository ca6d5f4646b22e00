//! A damaged outbox: opening one never panics, and `taskgate outbox
//! salvage` copies out every task that is still readable.
//!
//! # What sled 0.34.7 does with a damaged store
//!
//! Measured on outboxes of a few thousand tasks (docs/operations.md, "A
//! damaged outbox", has the table):
//!
//! - **A `db` log cut short** anywhere but in its last, partly written
//!   segment makes `sled::Config::open` *panic* (`segment.rs:556`, index out
//!   of bounds, when the snapshot points past the end; `serialization.rs:662`,
//!   "tried to serialize Uninitialized", when the log replay finds pages with
//!   no base), or return `Error::Corruption` (cut within the first
//!   segments, or to nothing). A cut inside the last segment opens
//!   *silently* with the state of an earlier flush.
//! - **Flipped bytes** in the log make the open panic the same way, or
//!   open *silently at an earlier state* (the replay stops at the bad
//!   message), or, in a page still live, open fine and fail every read of
//!   that page with `Error::Corruption`; in stale space they do nothing.
//! - **`conf`** removed or emptied: sled writes a new one (harmless);
//!   bytes flipped in it: `Error::Unsupported`.
//! - **`snap.*`** removed: sled replays the whole log (harmless); emptied
//!   or flipped: `Error::Corruption`.
//! - **Recovery writes to the store even when it then fails**: before the
//!   panic sled has already zeroed the tail of the segment it took as the
//!   tip; and with the snapshot gone and segments missing, it opens the
//!   store *empty* and overwrites every segment after the gap ("torn"), so
//!   the tasks are gone from the file too.
//!
//! # Opening without panics
//!
//! [`catch_sled_panic`] runs a sled call under `catch_unwind` with a panic
//! hook that, on that thread only, records the panic instead of printing
//! it. The hook is installed once and chains to the one before it; it also
//! turns a panic that starts in sled's source on any other thread (sled's
//! flusher and I/O threads) into one line that says what to do, instead of
//! Rust's panic text. [`super::SledStorage::open`] maps a caught panic, sled's
//! `Corruption` and `Unsupported`, and a store that sled recovered empty
//! from a log of more than two segments, to [`super::StorageError::Corrupt`]:
//! `serve` and every `--offline` command exit 65 with the path and the way
//! out.
//!
//! # Salvage
//!
//! [`salvage`] never writes to the damaged directory. It tries, each on a
//! fresh copy in a work directory, until sled opens one with records in it:
//! the store as found; without its snapshot (sled replays the log); without
//! snapshot and `conf`; and the log cut back to each of its last
//! [`TRUNCATION_ATTEMPTS`] segment boundaries (an earlier, consistent state).
//! Sled panics are caught at every step. What sled opened is read key range
//! by key range; a damaged node ends a range scan with an error, and the
//! scan resumes at the first key after it that reads (probed by doubling,
//! then bisecting, the key's fixed-width suffix), so one bad node costs the
//! records in it, not the rest. The counters record (`m/counters`) says how
//! many entries there should be. The entries of an accept group that was
//! never finished (never acknowledged; [`super::group_manifest`]) are left
//! out of what sled read, as opening the store would roll them back; the
//! raw scan reports their records as it does a torn sled batch's.
//!
//! When that was not the whole store (no copy opened, a damaged node, fewer
//! entries than counted, or a cut log), a raw scan of the original files
//! looks for stored [`Task`] records: sled stores values verbatim, and a
//! task's JSON starts `{"id":"…","task":"…","args":`. The log also holds
//! older versions of pages, so a raw scan finds tasks that were published
//! since: a task is left out when sled read it, or when any status record
//! found (by sled or by the scan) says it was published. The rest are
//! recovered and reported separately: some may have been published already
//! (their status was pruned or unreadable), and would be delivered again,
//! under the same Celery task id. Delivering twice is preferred to losing a
//! task that got a 202.
//!
//! Pending tasks are written in their global sequence order (so every
//! lane's order is kept), a task waiting in several lanes once with all of
//! them, through [`Outbox::import`] for a new outbox (counters, statuses
//! and journal entries as for any accept), or as `outbox export` lines.

use super::counters::{apply_counted, PersistedCounters};
use super::group_manifest::{last_group, GroupState};
use super::keys::{
    dead_key, parse_pending_key, pending_prefix, status_key, ACCEPT_GROUP, COUNTERS, DEAD, OPERATOR_HOLDS, PENDING,
    SEQUENCE_RESERVED, STATUS,
};
use super::operations::OutboxRecord;
use super::{DeadLetter, Lane, Outbox, OutboxError, OutboxSettings, TaskState, TaskStatus};
use crate::task::{QueueName, Task, TaskId};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

// ---------------------------------------------------------------------
// Catching sled's panics
// ---------------------------------------------------------------------

thread_local! {
    /// Set while this thread runs [`catch_sled_panic`].
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The first panic caught on this thread while guarded.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// "message (sled-0.34.7/src/…:line)".
fn describe_panic(info: &PanicHookInfo<'_>) -> String {
    let message = payload_text(info.payload());
    match info.location() {
        Some(location) => {
            let file = location.file();
            let short = file.find("sled-").map_or(file, |at| &file[at..]);
            format!("{message} ({short}:{})", location.line())
        }
        None => message,
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let text = describe_panic(info);
                CAUGHT.with(|caught| {
                    caught.borrow_mut().get_or_insert(text);
                });
                return;
            }
            if info
                .location()
                .is_some_and(|location| location.file().contains("sled-0."))
            {
                let thread = std::thread::current();
                eprintln!(
                    "taskgate: the outbox store failed in thread {:?}: sled stopped on {}; the outbox may be \
                     damaged: stop taskgate and follow \"A damaged outbox\" in docs/operations.md",
                    thread.name().unwrap_or("unnamed"),
                    describe_panic(info)
                );
                return;
            }
            previous(info)
        }));
    });
}

/// Runs `operation` (a call into sled), turning a panic into `Err` with
/// its message and location, printed nowhere.
pub(crate) fn catch_sled_panic<T>(operation: impl FnOnce() -> T) -> Result<T, String> {
    install_panic_hook();
    let was_guarded = GUARDED.with(|guarded| guarded.replace(true));
    let earlier = CAUGHT.with(|caught| caught.borrow_mut().take());
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(operation));
    GUARDED.with(|guarded| guarded.set(was_guarded));
    let caught = CAUGHT.with(|caught| std::mem::replace(&mut *caught.borrow_mut(), earlier));
    outcome.map_err(|payload| caught.unwrap_or_else(|| payload_text(&*payload)))
}

// ---------------------------------------------------------------------
// Salvage
// ---------------------------------------------------------------------

/// sled's segment size when `conf` does not say (taskgate never sets it).
pub const DEFAULT_SEGMENT_BYTES: u64 = 512 * 1024;
/// Segment boundaries, counted back from the end of the log, at which a
/// cut copy is tried.
pub const TRUNCATION_ATTEMPTS: usize = 8;
/// Pending tasks per import batch into a new outbox.
const IMPORT_CHUNK: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("there is no outbox at {0} (no `db` file)")]
    NoStore(PathBuf),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Destination(String),
    #[error("writing the salvaged tasks failed: {0}")]
    Outbox(#[from] OutboxError),
    #[error("writing the salvaged tasks failed: {0}")]
    Sink(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SalvageError {
    let context = context.into();
    move |source| SalvageError::Io { context, source }
}

/// Where salvaged records go.
pub trait SalvageSink {
    /// One pending task, with every lane it still waits in (the record's
    /// `lane` is the first; both are `None`/computed for a raw-scan task).
    fn pending(&mut self, record: OutboxRecord, lanes: Vec<Lane>) -> Result<(), SalvageError>;
    /// One dead letter (with `task: None` and `raw` for a record that
    /// could not be decoded).
    fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), SalvageError>;
    /// The operator's holds record as saved in the damaged store (its
    /// meaning is the relay's: [`crate::relay::holds`]).
    fn holds(&mut self, _record: Vec<u8>) -> Result<(), SalvageError> {
        Ok(())
    }
}

/// One copy tried, and what sled did with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SalvageAttempt {
    pub copy: String,
    pub outcome: String,
}

/// Sequences the watermark says were acknowledged, against what sled
/// recovered (see [`super::watermark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcknowledgedPastStore {
    /// Accepts were made durable below this sequence.
    pub accepted_below: u64,
    /// The store sled recovered hands out sequences from here.
    pub store_ends_below: u64,
}

/// What [`salvage`] found and wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SalvageReport {
    pub source: PathBuf,
    /// How the records were read: the copy sled opened, or "raw scan".
    pub method: String,
    pub attempts: Vec<SalvageAttempt>,
    /// Pending tasks written (a task waiting in several lanes counts once).
    pub pending_tasks: u64,
    /// Pending entries they stand for (one per task and lane).
    pub pending_entries: u64,
    /// Of `pending_tasks`, those found only by the raw scan of the log
    /// (some may have been published already).
    pub raw_scan_tasks: u64,
    /// Published tasks the raw scan found and left out.
    pub raw_scan_published_skipped: u64,
    /// When sled read the whole store: task records the raw scan found that
    /// sled did not return and no status marks as published (not written
    /// unless asked for; see the notes).
    pub raw_scan_unmatched: u64,
    pub dead_letters: u64,
    /// Records that could not be read: values that do not decode (written
    /// as dead letters with their raw bytes), entries the counters record
    /// counts but nothing recovered, and task records the raw scan found
    /// damaged.
    pub unreadable: u64,
    /// Damaged nodes the key scans had to skip.
    pub damaged_regions: u64,
    /// Pending entries and dead letters the store's counters record says
    /// it held (`None`: the record was not readable).
    pub expected_pending_entries: Option<u64>,
    pub expected_dead_letters: Option<u64>,
    /// The operator's holds record, carried over as it was (a pause, a
    /// forced breaker state; decoded by [`crate::relay::holds`]).
    #[serde(skip)]
    pub operator_holds: Option<Vec<u8>>,
    /// Set when the store's `accepted-watermark` says tasks were
    /// acknowledged past what sled recovered (a damaged blob or log makes
    /// sled open at an earlier state): those tasks are missing unless the
    /// raw scan found them, and how many there were is not known.
    pub acknowledged_past_store: Option<AcknowledgedPastStore>,
    /// Everything the store held was read: sled opened it (or it without
    /// its snapshot), no node was damaged, nothing failed to decode, the
    /// counts match its counters record, and it holds every sequence its
    /// watermark says was acknowledged.
    pub complete: bool,
    pub notes: Vec<String>,
}

/// The copies tried, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    AsFound,
    WithoutSnapshot,
    WithoutSnapshotAndConf,
    /// The log cut to this many bytes (a segment boundary), snapshot and
    /// `conf` left out.
    CutTo(u64),
}

impl Variant {
    fn describe(self) -> String {
        match self {
            Self::AsFound => "the store as found".into(),
            Self::WithoutSnapshot => "the store without its snapshot (sled replays the log)".into(),
            Self::WithoutSnapshotAndConf => "the store without its snapshot and conf".into(),
            Self::CutTo(length) => format!("the log cut back to {length} bytes, without snapshot"),
        }
    }

    /// Whether what sled reads from this copy is the store's latest state.
    fn is_whole(self) -> bool {
        !matches!(self, Self::CutTo(_))
    }
}

/// `segment_size: N` from sled's `conf` (text, then a CRC).
fn segment_bytes(source: &Path) -> u64 {
    std::fs::read(source.join("conf"))
        .ok()
        .and_then(|bytes| {
            String::from_utf8_lossy(&bytes).lines().find_map(|line| {
                line.strip_prefix("segment_size: ")
                    .and_then(|value| value.trim().parse::<u64>().ok())
            })
        })
        .filter(|size| size.is_power_of_two() && (256..=1 << 24).contains(size))
        .unwrap_or(DEFAULT_SEGMENT_BYTES)
}

fn variants(log_bytes: u64, segment: u64) -> Vec<Variant> {
    let mut variants = vec![
        Variant::AsFound,
        Variant::WithoutSnapshot,
        Variant::WithoutSnapshotAndConf,
    ];
    if log_bytes > segment {
        // The largest boundary below the end, then each one before it.
        let mut boundary = (log_bytes - 1) / segment * segment;
        while boundary >= segment && variants.len() < 3 + TRUNCATION_ATTEMPTS {
            variants.push(Variant::CutTo(boundary));
            boundary -= segment;
        }
    }
    variants
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), SalvageError> {
    std::fs::create_dir_all(to).map_err(io_error(format!("cannot create {}", to.display())))?;
    for entry in std::fs::read_dir(from).map_err(io_error(format!("cannot read {}", from.display())))? {
        let entry = entry.map_err(io_error(format!("cannot read {}", from.display())))?;
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .map_err(io_error(format!("cannot copy {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// Copies the store at `source` into `target` as `variant` says.
fn prepare_copy(source: &Path, target: &Path, variant: Variant) -> Result<(), SalvageError> {
    std::fs::create_dir_all(target).map_err(io_error(format!("cannot create {}", target.display())))?;
    for entry in std::fs::read_dir(source).map_err(io_error(format!("cannot read {}", source.display())))? {
        let entry = entry.map_err(io_error(format!("cannot read {}", source.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let destination = target.join(&name);
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            if name == "blobs" {
                copy_dir(&path, &destination)?;
            }
            continue;
        }
        let keep = match name.as_str() {
            "db" => true,
            "conf" => matches!(variant, Variant::AsFound | Variant::WithoutSnapshot),
            _ if name.starts_with("snap.") => variant == Variant::AsFound,
            _ => false,
        };
        if !keep {
            continue;
        }
        match (name.as_str(), variant) {
            ("db", Variant::CutTo(length)) => {
                let mut input =
                    std::fs::File::open(&path).map_err(io_error(format!("cannot read {}", path.display())))?;
                let mut output = std::fs::File::create(&destination)
                    .map_err(io_error(format!("cannot create {}", destination.display())))?;
                std::io::copy(&mut (&mut input).take(length), &mut output)
                    .map_err(io_error(format!("cannot copy {}", path.display())))?;
            }
            _ => {
                std::fs::copy(&path, &destination).map_err(io_error(format!("cannot copy {}", path.display())))?;
            }
        }
    }
    Ok(())
}

/// The work directory, removed however [`salvage`] ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_copy(path: &Path) -> Result<sled::Db, String> {
    match catch_sled_panic(|| {
        sled::Config::new()
            .path(path)
            .cache_capacity(16 << 20)
            .mode(sled::Mode::HighThroughput)
            // No background flusher: nothing is written but what recovery writes.
            .flush_every_ms(None)
            .open()
    }) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(error)) => Err(format!("sled refused it: {error}")),
        Err(panic) => Err(format!("sled panicked: {panic}")),
    }
}

/// Visits every readable `prefix + suffix` key (suffix: `width` bytes,
/// big-endian) in order, skipping damaged nodes. Returns how many damaged
/// regions were skipped.
fn scan_fixed(db: &sled::Db, prefix: &[u8], width: usize, mut visit: impl FnMut(&[u8], &[u8])) -> u64 {
    debug_assert!((1..=16).contains(&width));
    let max: u128 = if width == 16 {
        u128::MAX
    } else {
        (1u128 << (8 * width)) - 1
    };
    let key_at = |n: u128| -> Vec<u8> {
        let mut key = prefix.to_vec();
        key.extend_from_slice(&n.to_be_bytes()[16 - width..]);
        key
    };
    // Whether a range scan starting at `n` reads its first item.
    let readable = |n: u128| -> bool {
        match catch_sled_panic(|| db.range(key_at(n)..).next()) {
            Ok(None) | Ok(Some(Ok(_))) => true,
            Ok(Some(Err(_))) | Err(_) => false,
        }
    };
    let mut start: u128 = 0;
    let mut damaged = 0;
    loop {
        let mut failed = false;
        let mut finished = false;
        let scanned = catch_sled_panic(|| {
            for item in db.range(key_at(start)..) {
                match item {
                    Ok((key, value)) => {
                        if !key.starts_with(prefix) {
                            finished = true;
                            return;
                        }
                        if key.len() == prefix.len() + width {
                            let mut bytes = [0u8; 16];
                            bytes[16 - width..].copy_from_slice(&key[prefix.len()..]);
                            let n = u128::from_be_bytes(bytes);
                            visit(&key, &value);
                            if n == max {
                                finished = true;
                                return;
                            }
                            start = n + 1;
                        }
                    }
                    Err(_) => {
                        failed = true;
                        return;
                    }
                }
            }
            finished = true;
        });
        if scanned.is_err() {
            failed = true;
        }
        if finished && !failed {
            return damaged;
        }
        damaged += 1;
        // The node holding `start` is damaged: find the first start past it.
        let mut low = start;
        let mut step: u128 = 1;
        let high = loop {
            let probe = low.saturating_add(step).min(max);
            if readable(probe) {
                break probe;
            }
            if probe == max {
                return damaged;
            }
            low = probe;
            step = step.saturating_mul(2);
        };
        let (mut low, mut high) = (low, high);
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if readable(middle) {
                high = middle;
            } else {
                low = middle;
            }
        }
        start = high;
    }
}

/// Just what the first pass needs of a pending record.
#[derive(Deserialize)]
struct PendingProbe {
    id: TaskId,
    queues: Vec<QueueName>,
}

/// Just what the published filter needs of a status record.
#[derive(Deserialize)]
struct StatusProbe {
    id: TaskId,
    state: TaskState,
}

/// What the first pass over a store sled opened found (keys only, plus
/// the ids the raw scan must not bring back).
#[derive(Default)]
struct Inventory {
    lanes: Vec<Lane>,
    /// (sequence, lane index) of every decodable pending entry.
    pending: Vec<(u64, usize)>,
    /// Lanes of each task that has more than one queue.
    multi: HashMap<TaskId, Vec<usize>>,
    undecodable_pending: Vec<(usize, u64)>,
    dead: Vec<u64>,
    undecodable_dead: Vec<u64>,
    /// Ids sled read as pending or as a dead letter's task.
    known: HashSet<TaskId>,
    /// Ids whose status says published.
    published: HashSet<TaskId>,
    counters: Option<PersistedCounters>,
    holds: Option<Vec<u8>>,
    damaged_regions: u64,
}

fn get(db: &sled::Db, key: &[u8]) -> Option<Vec<u8>> {
    match catch_sled_panic(|| db.get(key)) {
        Ok(Ok(Some(value))) => Some(value.to_vec()),
        _ => None,
    }
}

/// Lanes named by the counters record, and by the first and last keys of
/// each lane reachable from either end of the pending keys.
fn discover_lanes(db: &sled::Db, counters: Option<&PersistedCounters>) -> Vec<Lane> {
    let mut lanes: Vec<Lane> = counters
        .map(|record| record.lanes.iter().map(|(lane, _, _)| lane.clone()).collect())
        .unwrap_or_default();
    let mut from = PENDING.to_vec();
    while let Ok(Some(Ok((key, _)))) = catch_sled_panic(|| db.range(from.clone()..).next()) {
        let Some((lane, _)) = parse_pending_key(&key) else {
            break;
        };
        let mut next = pending_prefix(&lane);
        *next.last_mut().expect("a prefix ends with \\0") = 1;
        lanes.push(lane);
        from = next;
    }
    let mut to = b"q0".to_vec(); // just past every "q/" key
    while let Ok(Some(Ok((key, _)))) = catch_sled_panic(|| db.range(..to.clone()).next_back()) {
        let Some((lane, _)) = parse_pending_key(&key) else {
            break;
        };
        to = pending_prefix(&lane);
        lanes.push(lane);
    }
    lanes.sort();
    lanes.dedup();
    lanes
}

fn take_inventory(db: &sled::Db, accepted_below: Option<u64>) -> Inventory {
    let mut inventory = Inventory {
        counters: get(db, COUNTERS)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .filter(PersistedCounters::is_plausible),
        holds: get(db, OPERATOR_HOLDS),
        ..Inventory::default()
    };
    inventory.lanes = discover_lanes(db, inventory.counters.as_ref());
    // What open would roll back was never acknowledged: it is left out.
    // Its records in the log are reported by the raw scan, as those of a
    // torn sled batch are (sled itself drops those at recovery).
    let unfinished: HashSet<Vec<u8>> = match last_group(
        get(db, COUNTERS).as_deref(),
        get(db, ACCEPT_GROUP).as_deref(),
        accepted_below,
    )
    .state
    {
        GroupState::Unfinished(group) => group.keys.into_iter().collect(),
        GroupState::Standing | GroupState::DamagedAfterAcknowledged(_) => HashSet::new(),
    };
    for (index, lane) in inventory.lanes.clone().iter().enumerate() {
        let prefix = pending_prefix(lane);
        let Inventory {
            pending,
            multi,
            undecodable_pending,
            known,
            ..
        } = &mut inventory;
        let damaged = scan_fixed(db, &prefix, 8, |key, value| {
            let Some((_, sequence)) = parse_pending_key(key) else {
                return;
            };
            match serde_json::from_slice::<PendingProbe>(value) {
                Ok(_) if unfinished.contains(key) => {}
                Ok(probe) => {
                    pending.push((sequence, index));
                    known.insert(probe.id);
                    if probe.queues.len() > 1 {
                        multi.entry(probe.id).or_default().push(index);
                    }
                }
                Err(_) => undecodable_pending.push((index, sequence)),
            }
        });
        inventory.damaged_regions += damaged;
    }
    let Inventory {
        dead,
        undecodable_dead,
        known,
        published,
        ..
    } = &mut inventory;
    let mut damaged = scan_fixed(db, DEAD, 8, |key, value| {
        let sequence = u64::from_be_bytes(key[DEAD.len()..].try_into().expect("an 8-byte suffix"));
        match serde_json::from_slice::<DeadLetter>(value) {
            Ok(letter) => {
                if let Some(task) = &letter.task {
                    known.insert(task.id);
                }
                dead.push(sequence);
            }
            Err(_) => undecodable_dead.push(sequence),
        }
    });
    damaged += scan_fixed(db, STATUS, 16, |_, value| {
        if let Ok(status) = serde_json::from_slice::<StatusProbe>(value) {
            if status.state == TaskState::Published {
                published.insert(status.id);
            }
        }
    });
    inventory.damaged_regions += damaged;
    inventory.pending.sort_unstable();
    inventory
}

fn unreadable_letter(sequence: u64, lane: Lane, value: Option<&[u8]>, what: &str) -> DeadLetter {
    DeadLetter {
        sequence,
        lane,
        task: None,
        raw: value.map(|bytes| String::from_utf8_lossy(bytes).into_owned()),
        reason: format!("salvage: {what}"),
        attempts: 0,
        dead_at: Utc::now(),
    }
}

/// Counts from writing what the inventory lists.
#[derive(Default)]
struct Written {
    pending_tasks: u64,
    pending_entries: u64,
    dead_letters: u64,
    unreadable: u64,
}

fn write_inventory(db: &sled::Db, inventory: &Inventory, sink: &mut dyn SalvageSink) -> Result<Written, SalvageError> {
    let mut written = Written::default();
    let mut emitted_multi: HashSet<TaskId> = HashSet::new();
    for &(sequence, index) in &inventory.pending {
        let lane = &inventory.lanes[index];
        let key = super::pending_key(lane, sequence);
        let value = get(db, &key);
        let Some(task) = value
            .as_deref()
            .and_then(|bytes| serde_json::from_slice::<Task>(bytes).ok())
        else {
            // Read in the first pass, not now (a page evicted and found bad).
            written.unreadable += 1;
            sink.dead_letter(unreadable_letter(
                sequence,
                lane.clone(),
                value.as_deref(),
                "the pending record could not be read back",
            ))?;
            continue;
        };
        written.pending_entries += 1;
        let lanes = match inventory.multi.get(&task.id) {
            Some(indexes) => {
                if !emitted_multi.insert(task.id) {
                    continue;
                }
                indexes.iter().map(|index| inventory.lanes[*index].clone()).collect()
            }
            None => vec![lane.clone()],
        };
        let status = get(db, &status_key(&task.id)).and_then(|bytes| serde_json::from_slice::<TaskStatus>(&bytes).ok());
        let record = OutboxRecord {
            attempts: status.as_ref().map_or(0, |status| status.attempts),
            last_error: status.and_then(|status| status.last_error),
            task,
            lane: Some(lane.clone()),
            sequence: Some(sequence),
        };
        sink.pending(record, lanes)?;
        written.pending_tasks += 1;
    }
    for &(index, sequence) in &inventory.undecodable_pending {
        let lane = inventory.lanes[index].clone();
        let value = get(db, &super::pending_key(&lane, sequence));
        written.unreadable += 1;
        sink.dead_letter(unreadable_letter(
            sequence,
            lane,
            value.as_deref(),
            "the pending record could not be decoded",
        ))?;
    }
    for &sequence in &inventory.dead {
        match get(db, &dead_key(sequence)).and_then(|bytes| serde_json::from_slice::<DeadLetter>(&bytes).ok()) {
            Some(letter) => {
                sink.dead_letter(letter)?;
                written.dead_letters += 1;
            }
            None => written.unreadable += 1,
        }
    }
    for &sequence in &inventory.undecodable_dead {
        let value = get(db, &dead_key(sequence));
        written.unreadable += 1;
        sink.dead_letter(unreadable_letter(
            sequence,
            Lane::new(""),
            value.as_deref(),
            "the dead-letter record could not be decoded",
        ))?;
    }
    Ok(written)
}

/// What the raw scan found beyond what sled read.
#[derive(Default)]
struct RawFindings {
    tasks: Vec<Task>,
    published_skipped: u64,
    damaged: u64,
    /// The newest counters record in the log (by segment LSN, then offset).
    counters: Option<PersistedCounters>,
}

/// CRC-32 (IEEE), as sled checks its segment headers with.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The LSN in a sled segment header (20 bytes: CRC, LSN, max stable LSN,
/// little-endian, the CRC and LSNs xor-masked), when its CRC checks out.
fn segment_lsn(segment: &[u8]) -> Option<i64> {
    let header = segment.get(..20)?;
    let stored = u32::from_le_bytes(header[..4].try_into().ok()?) ^ 0xFFFF_FFFF;
    (crc32(&header[4..20]) == stored)
        .then(|| i64::from_le_bytes(header[4..12].try_into().expect("8 bytes")) ^ 0x7FFF_FFFF_FFFF_FFFF)
}

/// Positions of `needle` in `bytes`.
fn find_all<'a>(bytes: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    bytes
        .windows(needle.len())
        .enumerate()
        .filter(move |(_, window)| *window == needle)
        .map(|(at, _)| at)
}

/// Positions of `{"id":"` in `bytes`: where a task or status record may start.
fn id_objects(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    find_all(bytes, b"{\"id\":\"")
}

/// `{"id":"<uuid>","task":"<name>","args":` at `at`: the start of a
/// stored task (a status record has `"routing_key"` where a task has
/// `"args"`). Returns the id.
fn looks_like_task(bytes: &[u8], at: usize) -> Option<TaskId> {
    let rest = bytes.get(at + 7..)?;
    let id = TaskId::parse(std::str::from_utf8(rest.get(..36)?).ok()?).ok()?;
    let rest = rest.get(36..)?.strip_prefix(b"\",\"task\":\"")?;
    let name_end = rest.iter().take(256).position(|byte| *byte == b'"')?;
    rest[name_end + 1..].starts_with(b",\"args\":").then_some(id)
}

/// Calls `chunk` with every readable piece of the store's files: the log
/// segment by segment (a record never spans segments) with the segment's
/// LSN when its header is sound, each blob whole.
fn for_each_chunk(source: &Path, segment: u64, mut chunk: impl FnMut(&[u8], Option<i64>)) -> Result<(), SalvageError> {
    let log = source.join("db");
    let mut file = std::fs::File::open(&log).map_err(io_error(format!("cannot read {}", log.display())))?;
    let mut buffer = vec![0u8; segment as usize];
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(io_error(format!("cannot read {}", log.display()))(error)),
            }
        }
        if filled == 0 {
            break;
        }
        chunk(&buffer[..filled], segment_lsn(&buffer[..filled]));
        if filled < buffer.len() {
            break;
        }
    }
    if let Ok(blobs) = std::fs::read_dir(source.join("blobs")) {
        for entry in blobs.flatten() {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                chunk(&bytes, None);
            }
        }
    }
    Ok(())
}

/// Reads the original files (never written) for task records sled did not
/// give back. `exclude`: ids already recovered; `published`: ids sled
/// read as published.
fn raw_scan(
    source: &Path,
    segment: u64,
    exclude: &HashSet<TaskId>,
    published: &HashSet<TaskId>,
) -> Result<RawFindings, SalvageError> {
    // First pass: every status record that says published, and the
    // newest counters record.
    let mut published = published.clone();
    let mut newest_counters: Option<((i64, usize), PersistedCounters)> = None;
    for_each_chunk(source, segment, |bytes, lsn| {
        for at in id_objects(bytes) {
            let mut reader = serde_json::Deserializer::from_slice(&bytes[at..]);
            if let Ok(status) = StatusProbe::deserialize(&mut reader) {
                if status.state == TaskState::Published {
                    published.insert(status.id);
                }
            }
        }
        let Some(lsn) = lsn else { return };
        for at in find_all(bytes, b"{\"lanes\":[") {
            let mut reader = serde_json::Deserializer::from_slice(&bytes[at..]);
            if let Some(record) = PersistedCounters::deserialize(&mut reader)
                .ok()
                .filter(PersistedCounters::is_plausible)
            {
                if newest_counters.as_ref().is_none_or(|(newest, _)| (lsn, at) > *newest) {
                    newest_counters = Some(((lsn, at), record));
                }
            }
        }
    })?;
    // Second pass: the tasks.
    let mut findings = RawFindings {
        counters: newest_counters.map(|(_, record)| record),
        ..RawFindings::default()
    };
    let mut seen: HashSet<TaskId> = HashSet::new();
    let mut skipped: HashSet<TaskId> = HashSet::new();
    let mut damaged: HashSet<TaskId> = HashSet::new();
    for_each_chunk(source, segment, |bytes, _| {
        for at in id_objects(bytes) {
            let Some(id) = looks_like_task(bytes, at) else { continue };
            if exclude.contains(&id) || seen.contains(&id) {
                continue;
            }
            if published.contains(&id) {
                skipped.insert(id);
                continue;
            }
            let mut reader = serde_json::Deserializer::from_slice(&bytes[at..]);
            match Task::deserialize(&mut reader) {
                Ok(task) if task.id == id => {
                    seen.insert(id);
                    findings.tasks.push(task);
                }
                _ => {
                    damaged.insert(id);
                }
            }
        }
    })?;
    findings.published_skipped = skipped.len() as u64;
    findings.damaged = damaged.iter().filter(|id| !seen.contains(id)).count() as u64;
    // Acceptance order (the lanes' order, as far as it can be told).
    findings.tasks.sort_by_key(|task| task.accepted_at);
    Ok(findings)
}

/// Copies every readable pending task and dead letter of the store at
/// `source` into `sink`, trying copies in `work` (created, and removed
/// afterwards; it must not exist). `lanes_for` gives the lanes of a task
/// found by the raw scan (its lane is not known). When sled read the whole
/// store, the raw scan only counts the task records sled did not return
/// ([`SalvageReport::raw_scan_unmatched`]), unless `include_unmatched`.
pub fn salvage(
    source: &Path,
    work: &Path,
    lanes_for: &dyn Fn(&Task) -> Vec<Lane>,
    include_unmatched: bool,
    sink: &mut dyn SalvageSink,
) -> Result<SalvageReport, SalvageError> {
    let log = source.join("db");
    let log_bytes = match std::fs::metadata(&log) {
        Ok(metadata) if metadata.is_file() => metadata.len(),
        _ => return Err(SalvageError::NoStore(source.to_owned())),
    };
    if work.exists() {
        return Err(SalvageError::Destination(format!(
            "the work directory {} already exists; remove it or choose another with --work-dir",
            work.display()
        )));
    }
    std::fs::create_dir_all(work).map_err(io_error(format!("cannot create {}", work.display())))?;
    let _work = WorkDir(work.to_owned());
    let segment = segment_bytes(source);
    let mut report = SalvageReport {
        source: source.to_owned(),
        method: "raw scan".into(),
        attempts: Vec::new(),
        pending_tasks: 0,
        pending_entries: 0,
        raw_scan_tasks: 0,
        raw_scan_published_skipped: 0,
        raw_scan_unmatched: 0,
        dead_letters: 0,
        unreadable: 0,
        damaged_regions: 0,
        expected_pending_entries: None,
        expected_dead_letters: None,
        operator_holds: None,
        acknowledged_past_store: None,
        complete: false,
        notes: Vec::new(),
    };
    let accepted_below = match super::watermark::read(source) {
        super::watermark::Reading::Valid(accepted_below) => Some(accepted_below),
        _ => None,
    };
    let mut known: HashSet<TaskId> = HashSet::new();
    let mut published: HashSet<TaskId> = HashSet::new();
    for (number, variant) in variants(log_bytes, segment).into_iter().enumerate() {
        let copy = work.join(format!("attempt-{number}"));
        prepare_copy(source, &copy, variant)?;
        let outcome = match open_copy(&copy) {
            Err(why) => Err(why),
            Ok(db) => match catch_sled_panic(|| db.first()) {
                Ok(Ok(None)) => Err("sled opened it but recovered no record at all".into()),
                _ => Ok(db),
            },
        };
        let db = match outcome {
            Err(why) => {
                report.attempts.push(SalvageAttempt {
                    copy: variant.describe(),
                    outcome: why,
                });
                let _ = std::fs::remove_dir_all(&copy);
                continue;
            }
            Ok(db) => db,
        };
        let inventory = take_inventory(&db, accepted_below);
        let written = write_inventory(&db, &inventory, sink)?;
        let store_ends_below = get(&db, SEQUENCE_RESERVED)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map_or(0, u64::from_be_bytes)
            .max(
                inventory
                    .pending
                    .iter()
                    .map(|(sequence, _)| sequence.saturating_add(1))
                    .max()
                    .unwrap_or(0),
            );
        report.acknowledged_past_store = accepted_below
            .filter(|accepted_below| *accepted_below > store_ends_below)
            .map(|accepted_below| AcknowledgedPastStore {
                accepted_below,
                store_ends_below,
            });
        if let Some(record) = inventory.holds {
            report.operator_holds = Some(record.clone());
            sink.holds(record)?;
        }
        let expected_entries = inventory
            .counters
            .as_ref()
            .map(|record| record.lanes.iter().map(|(_, depth, _)| *depth).sum::<u64>());
        let expected_dead = inventory.counters.as_ref().map(|record| record.dead_letters);
        let read_entries = (inventory.pending.len() + inventory.undecodable_pending.len()) as u64;
        let read_dead = (inventory.dead.len() + inventory.undecodable_dead.len()) as u64;
        let short = expected_entries.map_or(0, |expected| expected.saturating_sub(read_entries))
            + expected_dead.map_or(0, |expected| expected.saturating_sub(read_dead));
        report.attempts.push(SalvageAttempt {
            copy: variant.describe(),
            outcome: format!(
                "opened: {read_entries} pending entries and {read_dead} dead letters read{}{}",
                match (expected_entries, expected_dead) {
                    (Some(entries), Some(dead)) => format!(" (its counters record: {entries} and {dead})"),
                    _ => " (no readable counters record)".into(),
                },
                match inventory.damaged_regions {
                    0 => String::new(),
                    regions => format!(", {regions} damaged regions skipped"),
                }
            ),
        });
        report.method = format!("sled, {}", variant.describe());
        report.pending_tasks = written.pending_tasks;
        report.pending_entries = written.pending_entries;
        report.dead_letters = written.dead_letters;
        report.unreadable = written.unreadable;
        report.damaged_regions = inventory.damaged_regions;
        report.expected_pending_entries = expected_entries;
        report.expected_dead_letters = expected_dead;
        if let Variant::CutTo(length) = variant {
            report.notes.push(format!(
                "sled could open the store only with its log cut back to {length} of {log_bytes} bytes: that is \
                 an earlier state, so tasks published since may be pending again, and tasks accepted in the \
                 last {} bytes are recovered only if the raw scan found them",
                log_bytes - length
            ));
        }
        known = inventory.known;
        published = inventory.published;
        if variant.is_whole() && inventory.damaged_regions == 0 && written.unreadable == 0 && short == 0 {
            report.complete = true;
        } else {
            // Entries counted but not read, unless the raw scan finds them.
            report.unreadable += if variant.is_whole() { short } else { 0 };
        }
        drop(db);
        break;
    }
    let raw = raw_scan(source, segment, &known, &published)?;
    report.raw_scan_published_skipped = raw.published_skipped;
    if report.complete && !include_unmatched {
        // sled read the whole store: task records in the log it did not
        // return are older pages of published tasks whose status was
        // pruned, or tasks sled's recovery dropped (it opens some damaged
        // logs silently at an earlier state). Which, only the operator can
        // tell.
        report.raw_scan_unmatched = raw.tasks.len() as u64;
        if !raw.tasks.is_empty() {
            report.notes.push(format!(
                "the log holds {} more task records that sled did not return and no status marks as \
                 published: tasks published longer ago than outbox.published_retention_seconds (their status \
                 was pruned), or tasks sled's recovery dropped; `--include-unmatched` recovers them too \
                 (those already published are then delivered again)",
                raw.tasks.len()
            ));
        }
        note_acknowledged_past_store(&mut report);
        return Ok(report);
    }
    let mut raw_entries = 0;
    for task in raw.tasks {
        let lanes = lanes_for(&task);
        raw_entries += lanes.len() as u64;
        let record = OutboxRecord {
            lane: lanes.first().cloned(),
            sequence: None,
            attempts: 0,
            last_error: None,
            task,
        };
        sink.pending(record, lanes)?;
        report.raw_scan_tasks += 1;
    }
    report.pending_tasks += report.raw_scan_tasks;
    report.pending_entries += raw_entries;
    let sled_read_nothing = report.method == "raw scan";
    if sled_read_nothing {
        // Only the log's newest counters record can say what there was.
        if let Some(record) = &raw.counters {
            let entries = record.lanes.iter().map(|(_, depth, _)| *depth).sum::<u64>();
            report.expected_pending_entries = Some(entries);
            report.expected_dead_letters = Some(record.dead_letters);
            report.unreadable = (entries + record.dead_letters).saturating_sub(raw_entries);
            report.notes.push(format!(
                "the newest counters record found in the log says {entries} pending entries and {} dead \
                 letters (the log may have held a newer one)",
                record.dead_letters
            ));
        }
    } else {
        // What the raw scan found stands for entries counted but not read.
        report.unreadable = report.unreadable.saturating_sub(raw_entries);
    }
    report.unreadable += raw.damaged;
    if report.raw_scan_tasks > 0 {
        report.notes.push(format!(
            "{} tasks were found only by a raw scan of the log: they were accepted and no record says they \
             were published, but some may have been (their status was pruned or unreadable) and will be \
             delivered again under the same Celery task id",
            report.raw_scan_tasks
        ));
    }
    if sled_read_nothing {
        report.notes.push(
            "sled could not open any copy of the store: dead letters, attempts and the operator's holds \
             could not be read"
                .into(),
        );
    }
    note_acknowledged_past_store(&mut report);
    Ok(report)
}

/// A store that holds less than its watermark says was acknowledged is
/// never a complete salvage, whatever sled read of it: the tasks accepted
/// after the state sled recovered are gone from it (a damaged blob or log
/// record), and only the raw scan can have found some of them.
fn note_acknowledged_past_store(report: &mut SalvageReport) {
    let Some(gap) = report.acknowledged_past_store else {
        return;
    };
    report.complete = false;
    let found = if report.raw_scan_tasks > 0 {
        format!("it recovered {}", report.raw_scan_tasks)
    } else if report.raw_scan_unmatched > 0 {
        format!(
            "it found {} task records sled did not return: run the salvage again with --include-unmatched to \
             recover them",
            report.raw_scan_unmatched
        )
    } else {
        "it found none".into()
    };
    report.notes.push(format!(
        "the store's accepted-watermark says tasks up to sequence {} were acknowledged, but what sled \
         recovered ends below {}: tasks accepted after that state are missing from it (a damaged blob or log \
         record), except those the raw scan of the files found ({found})",
        gap.accepted_below, gap.store_ends_below,
    ));
}

// ---------------------------------------------------------------------
// Into a new outbox
// ---------------------------------------------------------------------

/// Writes salvaged records into a new outbox through its normal import
/// path (so its counters, statuses and journal are those of an accept);
/// dead letters keep their record, under fresh ids.
pub struct OutboxSink {
    runtime: tokio::runtime::Runtime,
    outbox: Arc<Outbox>,
    chunk: Vec<(Task, Vec<Lane>)>,
    letters: Vec<DeadLetter>,
    holds: Option<Vec<u8>>,
    /// Tasks the new outbox already knew (a raw-scan duplicate).
    pub skipped: u64,
}

impl OutboxSink {
    /// Creates the outbox at `settings.path`, which must be a new or empty
    /// directory. Its size limit is lifted for the import (a server
    /// started on it refuses new tasks until it drained below the limit).
    pub fn create(settings: &OutboxSettings) -> Result<Self, SalvageError> {
        let path = &settings.path;
        if path.exists() {
            let empty = std::fs::read_dir(path)
                .map_err(io_error(format!("cannot read {}", path.display())))?
                .next()
                .is_none();
            if !empty {
                return Err(SalvageError::Destination(format!(
                    "{} is not empty: salvage writes into a new outbox directory",
                    path.display()
                )));
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_error("cannot start the runtime for the new outbox"))?;
        let outbox = {
            let _entered = runtime.enter();
            Outbox::open(&OutboxSettings {
                max_bytes: u64::MAX,
                ..settings.clone()
            })?
        };
        Ok(Self {
            runtime,
            outbox,
            chunk: Vec::new(),
            letters: Vec::new(),
            holds: None,
            skipped: 0,
        })
    }

    fn import_chunk(&mut self) -> Result<(), SalvageError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        let outcome = self.runtime.block_on(self.outbox.import(chunk))?;
        self.skipped += outcome.skipped;
        Ok(())
    }

    /// Writes what is left, the dead letters and the holds, and flushes.
    pub fn finish(mut self) -> Result<u64, SalvageError> {
        self.import_chunk()?;
        add_dead_letters(&self.outbox, std::mem::take(&mut self.letters))?;
        if let Some(holds) = self.holds.take() {
            self.outbox.save_operator_holds_record(Some(holds))?;
        }
        self.runtime.block_on(self.outbox.flush())?;
        Ok(self.skipped)
    }
}

impl SalvageSink for OutboxSink {
    fn pending(&mut self, record: OutboxRecord, lanes: Vec<Lane>) -> Result<(), SalvageError> {
        self.chunk.push((record.task, lanes));
        if self.chunk.len() >= IMPORT_CHUNK {
            self.import_chunk()?;
        }
        Ok(())
    }

    fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), SalvageError> {
        self.letters.push(letter);
        Ok(())
    }

    fn holds(&mut self, record: Vec<u8>) -> Result<(), SalvageError> {
        self.holds = Some(record);
        Ok(())
    }
}

/// Stores `letters` as dead letters of `outbox` under fresh sequences (so
/// they never collide with ids it hands out), with a `dead_letter` status
/// for a task it does not know otherwise; one counted batch.
fn add_dead_letters(outbox: &Outbox, letters: Vec<DeadLetter>) -> Result<(), OutboxError> {
    if letters.is_empty() {
        return Ok(());
    }
    let _status_guard = outbox.status_lock.lock().expect("status lock poisoned");
    let mut sequences = outbox.shared.insert_lock.lock().expect("insert lock poisoned");
    let before = *sequences;
    let count = letters.len() as u64;
    let mut operations = Vec::with_capacity(letters.len() * 2 + 1);
    let first = sequences.allocate(count, &mut operations);
    for (offset, mut letter) in letters.into_iter().enumerate() {
        letter.sequence = first + offset as u64;
        if let Some(task) = &letter.task {
            if outbox.status(&task.id)?.is_none() {
                let status = TaskStatus {
                    id: task.id,
                    task: task.task.clone(),
                    routing_key: task.routing_key.clone(),
                    queues: task.queues.clone(),
                    state: TaskState::DeadLetter,
                    attempts: letter.attempts,
                    last_error: Some(letter.reason.clone()),
                    accepted_at: task.accepted_at,
                    published_at: None,
                    remaining_deliveries: 1,
                };
                operations.push((status_key(&task.id), Some(serde_json::to_vec(&status)?)));
            }
        }
        operations.push((dead_key(letter.sequence), Some(serde_json::to_vec(&letter)?)));
    }
    let written = apply_counted(
        outbox.shared.storage.as_ref(),
        &outbox.shared.counters,
        operations,
        |counters| {
            counters.dead_letters += count;
        },
    );
    if written.is_err() {
        *sequences = before;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(n: i64, queues: &[&str]) -> Task {
        let mut task = Task::for_test(
            TaskId::generate(),
            "export.project",
            vec![json!(n)],
            Default::default(),
            "export",
            queues,
        );
        task.accepted_at = Utc::now();
        task
    }

    #[derive(Default)]
    struct Collected {
        pending: Vec<(OutboxRecord, Vec<Lane>)>,
        dead: Vec<DeadLetter>,
    }

    impl SalvageSink for Collected {
        fn pending(&mut self, record: OutboxRecord, lanes: Vec<Lane>) -> Result<(), SalvageError> {
            self.pending.push((record, lanes));
            Ok(())
        }
        fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), SalvageError> {
            self.dead.push(letter);
            Ok(())
        }
    }

    fn exchange(_: &Task) -> Vec<Lane> {
        vec![Lane::new("task_exchange")]
    }

    #[test]
    fn a_panic_is_caught_and_not_printed_and_other_threads_are_untouched() {
        let caught = catch_sled_panic(|| -> u32 { panic!("boom {}", 7) });
        let message = caught.unwrap_err();
        assert!(message.starts_with("boom 7 ("), "{message}");
        assert!(message.contains("salvage.rs"), "{message}");
        assert_eq!(catch_sled_panic(|| 5), Ok(5));
        // A panic elsewhere still reaches the previous hook and unwinds.
        let other = std::thread::spawn(|| panic!("not guarded")).join();
        assert!(other.is_err());
    }

    #[test]
    fn scan_fixed_skips_nothing_on_a_sound_tree() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        for n in [0u64, 5, 1 << 40, u64::MAX] {
            let mut key = b"x/".to_vec();
            key.extend_from_slice(&n.to_be_bytes());
            db.insert(key, b"v".to_vec()).unwrap();
        }
        db.insert(b"y/1", b"other").unwrap();
        let mut seen = Vec::new();
        let damaged = scan_fixed(&db, b"x/", 8, |key, _| {
            seen.push(u64::from_be_bytes(key[2..].try_into().unwrap()))
        });
        assert_eq!(damaged, 0);
        assert_eq!(seen, vec![0, 5, 1 << 40, u64::MAX]);
    }

    #[tokio::test]
    async fn an_intact_store_is_salvaged_whole_with_lanes_order_and_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings::for_test(dir.path());
        let single: Vec<Task> = (0..30).map(|n| task(n, &["a"])).collect();
        let both = task(100, &["a", "b"]);
        {
            let outbox = Outbox::open(&settings).unwrap();
            for task in &single[..10] {
                outbox
                    .accept(vec![(task.clone(), vec![Lane::new("a")])], None)
                    .await
                    .unwrap();
            }
            outbox
                .accept(vec![(both.clone(), vec![Lane::new("a"), Lane::new("b")])], None)
                .await
                .unwrap();
            for task in &single[10..] {
                outbox
                    .accept(vec![(task.clone(), vec![Lane::new("a")])], None)
                    .await
                    .unwrap();
            }
            let head = outbox.head(&Lane::new("a"), 1).unwrap();
            outbox
                .dead_letter(&head[0], "poison", crate::outbox::Attempt::Made)
                .unwrap();
            crate::relay::holds::OperatorHolds {
                relay_paused: true,
                breaker: None,
            }
            .save(&outbox)
            .unwrap();
            outbox.flush().await.unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut sink = Collected::default();
        let report = salvage(&settings.path, &dir.path().join("work"), &exchange, false, &mut sink).unwrap();
        assert!(report.complete, "{report:#?}");
        let holds = crate::relay::holds::OperatorHolds::decode(report.operator_holds.as_deref().unwrap()).unwrap();
        assert!(holds.relay_paused);
        assert_eq!(report.unreadable, 0);
        assert_eq!((report.pending_tasks, report.pending_entries), (30, 31));
        assert_eq!(report.dead_letters, 1);
        assert_eq!(sink.dead[0].task.as_ref().unwrap().id, single[0].id);
        let ids: Vec<TaskId> = sink.pending.iter().map(|(record, _)| record.task.id).collect();
        let mut expected: Vec<TaskId> = single[1..10].iter().map(|t| t.id).collect();
        expected.push(both.id);
        expected.extend(single[10..].iter().map(|t| t.id));
        assert_eq!(ids, expected, "acceptance order");
        let (_, lanes) = &sink.pending[9];
        assert_eq!(lanes, &vec![Lane::new("a"), Lane::new("b")]);
        assert!(!dir.path().join("work").exists(), "the work directory is removed");
    }

    /// A group a crash cut short was never acknowledged: salvage leaves it
    /// out, as opening the store would roll it back, and the store counts
    /// as read whole.
    #[tokio::test]
    async fn an_accept_group_cut_short_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings::for_test(dir.path());
        let tasks: Vec<Task> = (0..3).map(|n| task(n, &["a"])).collect();
        let cut = task(3, &["a"]);
        {
            use crate::outbox::OutboxStorage;
            let sled = Arc::new(crate::outbox::SledStorage::open(&settings.path, 1 << 20).unwrap());
            let faulty = Arc::new(crate::outbox::FaultyStorage::new(sled.clone()));
            let outbox = Outbox::with_storage(faulty.clone(), settings.clone()).unwrap();
            for task in &tasks {
                outbox
                    .accept(vec![(task.clone(), vec![Lane::new("a")])], None)
                    .await
                    .unwrap();
            }
            // The manifest, the sequence reserved, the status and the
            // pending entry; not the journal entry, nor the counters.
            faulty.fail_writes_after(4);
            outbox
                .accept(vec![(cut.clone(), vec![Lane::new("a")])], None)
                .await
                .unwrap_err();
            drop(outbox);
            assert!(
                sled.scan(b"q/", None, 10).unwrap().len() == 4,
                "the cut group's entry is in the store"
            );
            sled.flush().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut sink = Collected::default();
        let report = salvage(&settings.path, &dir.path().join("work"), &exchange, false, &mut sink).unwrap();
        assert!(report.complete, "{report:#?}");
        let ids: Vec<TaskId> = sink.pending.iter().map(|(record, _)| record.task.id).collect();
        assert_eq!(ids, tasks.iter().map(|task| task.id).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_store_sled_cannot_open_is_raw_scanned_without_published_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings::for_test(dir.path());
        let tasks: Vec<Task> = (0..40).map(|n| task(n, &["a"])).collect();
        {
            let outbox = Outbox::open(&settings).unwrap();
            for task in &tasks {
                outbox
                    .accept(vec![(task.clone(), vec![Lane::new("a")])], None)
                    .await
                    .unwrap();
            }
            let head = outbox.head(&Lane::new("a"), 10).unwrap();
            outbox.complete(&head.iter().collect::<Vec<_>>()).unwrap();
            outbox.flush().await.unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        // The first segment's header and first record flipped: no copy
        // opens with its records, so the raw scan reads the log.
        let log = settings.path.join("db");
        let mut bytes = std::fs::read(&log).unwrap();
        for byte in &mut bytes[..64] {
            *byte ^= 0xff;
        }
        std::fs::write(&log, &bytes).unwrap();
        let mut sink = Collected::default();
        let report = salvage(&settings.path, &dir.path().join("work"), &exchange, false, &mut sink).unwrap();
        assert!(!report.complete, "{report:#?}");
        let recovered: HashSet<TaskId> = sink.pending.iter().map(|(record, _)| record.task.id).collect();
        for task in &tasks[10..] {
            assert!(
                recovered.contains(&task.id),
                "pending task {} recovered: {report:#?}",
                task.id
            );
        }
        for task in &tasks[..10] {
            assert!(!recovered.contains(&task.id), "published task {} left out", task.id);
        }
        assert_eq!(
            std::fs::read(&log).unwrap(),
            bytes,
            "the damaged store is never written"
        );
    }
}
#[cfg(test)]
mod salvage_proptests;
