//! Counters and room: pending depth and bytes per lane, depth per queue,
//! dead letters and journal entries, kept in memory and stored with what
//! they count (invariant 6 of [`super`]), and the one rule that says
//! whether more fits.
//!
//! Invariants: every batch that adds or removes what is counted goes
//! through [`apply_counted`], which writes the new `m/counters` record in
//! the same atomic batch; a record whose sums are implausible is not
//! believed ([`PersistedCounters::is_plausible`]) and the entries are
//! counted again ([`scan_counters`]).

use super::keys::{parse_pending_key, COUNTERS, DEAD, PENDING};
use super::storage::{self, OutboxStorage};
use super::{Lane, OutboxError};
use crate::task::QueueName;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default, Clone)]
pub(super) struct LaneCounter {
    pub(super) depth: u64,
    pub(super) bytes: u64,
}

#[derive(Default, Clone)]
pub(super) struct Counters {
    pub(super) lanes: HashMap<Lane, LaneCounter>,
    pub(super) queue_depths: HashMap<QueueName, u64>,
    pub(super) depth: u64,
    pub(super) bytes: u64,
    pub(super) dead_letters: u64,
    /// Tracking journal entries (mirrored in `Outbox::journal_depth` for
    /// lock-free reads).
    pub(super) journal: u64,
    /// The last accept group written whole ([`super::group_manifest`]).
    pub(super) finished_group: u64,
}

impl Counters {
    pub(super) fn add(&mut self, lane: &Lane, queues: &[QueueName], bytes: u64) {
        let counter = self.lanes.entry(lane.clone()).or_default();
        counter.depth += 1;
        counter.bytes += bytes;
        self.depth += 1;
        self.bytes += bytes;
        for queue in queues {
            *self.queue_depths.entry(queue.clone()).or_default() += 1;
        }
    }

    pub(super) fn remove(&mut self, lane: &Lane, queues: &[QueueName], bytes: u64) {
        if let Some(counter) = self.lanes.get_mut(lane) {
            counter.depth = counter.depth.saturating_sub(1);
            counter.bytes = counter.bytes.saturating_sub(bytes);
            if counter.depth == 0 {
                self.lanes.remove(lane);
            }
        }
        self.depth = self.depth.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
        self.remove_queues(queues);
    }

    pub(super) fn to_record(&self) -> PersistedCounters {
        PersistedCounters {
            lanes: self
                .lanes
                .iter()
                .map(|(lane, counter)| (lane.clone(), counter.depth, counter.bytes))
                .collect(),
            queues: self
                .queue_depths
                .iter()
                .map(|(queue, depth)| (queue.clone(), *depth))
                .collect(),
            dead_letters: self.dead_letters,
            journal: Some(self.journal),
            finished_group: Some(self.finished_group),
        }
    }

    pub(super) fn from_record(record: PersistedCounters) -> Self {
        let mut counters = Counters {
            dead_letters: record.dead_letters,
            journal: record.journal.unwrap_or_default(),
            finished_group: record.finished_group.unwrap_or_default(),
            ..Counters::default()
        };
        for (lane, depth, bytes) in record.lanes {
            counters.depth += depth;
            counters.bytes += bytes;
            counters.lanes.insert(lane, LaneCounter { depth, bytes });
        }
        counters.queue_depths = record.queues.into_iter().collect();
        counters
    }

    pub(super) fn remove_queues(&mut self, queues: &[QueueName]) {
        for queue in queues {
            if let Some(depth) = self.queue_depths.get_mut(queue) {
                *depth = depth.saturating_sub(1);
                if *depth == 0 {
                    self.queue_depths.remove(queue);
                }
            }
        }
    }
}

/// The counters as stored under `m/counters` (invariant 6).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedCounters {
    /// (lane, pending entries, pending bytes)
    pub(super) lanes: Vec<(Lane, u64, u64)>,
    /// (queue, pending tasks that will reach it)
    pub(super) queues: Vec<(QueueName, u64)>,
    pub(super) dead_letters: u64,
    /// Tracking journal entries; absent in records written before it was
    /// kept here (the journal is then scanned once).
    #[serde(default)]
    pub(super) journal: Option<u64>,
    /// The last accept group written whole; absent in records written
    /// before groups had numbers ([`super::group_manifest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) finished_group: Option<u64>,
}

impl PersistedCounters {
    /// Whether the counts, summed, are ones a store could hold (below
    /// 2^48). A record that says more is damaged and is not believed: the
    /// entries are counted again instead, and arithmetic on the counters
    /// can never overflow.
    pub(super) fn is_plausible(&self) -> bool {
        let counts = self.lanes.iter().flat_map(|(_, depth, bytes)| [*depth, *bytes]);
        let counts = counts.chain(self.queues.iter().map(|(_, depth)| *depth));
        counts
            .chain([self.dead_letters, self.journal.unwrap_or(0)])
            .try_fold(0u64, u64::checked_add)
            .is_some_and(|total| total < 1 << 48)
    }
}

/// Applies `operations` and the counters as `change` leaves them in one
/// atomic batch, then makes the new counters current. The counters lock is
/// held throughout, so records are written in the order the counters
/// changed.
pub(super) fn apply_counted(
    storage: &dyn OutboxStorage,
    counters: &Mutex<Counters>,
    mut operations: Vec<storage::WriteOperation>,
    change: impl FnOnce(&mut Counters),
) -> Result<(), OutboxError> {
    let mut current = counters.lock().expect("counters poisoned");
    let mut updated = current.clone();
    change(&mut updated);
    operations.push((COUNTERS.to_vec(), Some(serde_json::to_vec(&updated.to_record())?)));
    storage.apply(operations)?;
    *current = updated;
    Ok(())
}

/// The one field of a stored [`Task`] the counters need. Decoding only this
/// at open (serde skips the rest without building it) is what keeps a
/// restart over a deep outbox quick.
#[derive(Deserialize)]
pub(super) struct StoredQueues {
    pub(super) queues: Vec<QueueName>,
}

/// The outbox's one limit rule, for its pending bytes (`outbox.max_bytes`)
/// and its tracking journal (`outbox.max_journal_entries`): `adding` more
/// fit while the total stays at or under `limit`; full means not even one
/// more fits. Every accept, import, requeue and room check asks it.
pub(crate) fn within_limit(used: u64, adding: u64, limit: u64) -> bool {
    used.saturating_add(adding) <= limit
}

/// Readiness returns once pending bytes fall below this share of the limit.
pub(super) const ROOM_AGAIN_FRACTION: f64 = 0.9;

/// Counts pending entries and dead letters by reading them all; used only
/// when the store has no `m/counters` record yet. Returns the counters and
/// the highest pending sequence.
pub(super) fn scan_counters(storage: &dyn OutboxStorage) -> Result<(Counters, u64), OutboxError> {
    let mut counters = Counters::default();
    let mut highest_sequence = 0u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage.scan(PENDING, after.as_deref(), 4096)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, value) in &page {
            let Some((lane, sequence)) = parse_pending_key(key) else {
                continue;
            };
            highest_sequence = highest_sequence.max(sequence);
            match serde_json::from_slice::<StoredQueues>(value) {
                Ok(stored) => counters.add(&lane, &stored.queues, value.len() as u64),
                Err(_) => {
                    // Counted by lane only; the relay dead-letters it.
                    let counter = counters.lanes.entry(lane).or_default();
                    counter.depth += 1;
                    counter.bytes += value.len() as u64;
                    counters.depth += 1;
                    counters.bytes += value.len() as u64;
                }
            }
        }
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage.scan(DEAD, after.as_deref(), 4096)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        counters.dead_letters += page.len() as u64;
    }
    Ok((counters, highest_sequence))
}
