//! The manifest of the accept group being written, and undoing a group a
//! crash cut short.
//!
//! Why accept groups are not sled batches: sled 0.34 writes every batch
//! behind a manifest of its own, and to place it, it seals and writes its
//! I/O buffer before the batch and again after it (`PageCache::pin_log`).
//! That is a second write to its log per group, handed to its I/O pool,
//! whose queue wakes all seven of its threads: measured, about 0.07 ms of a
//! sequential producer's 0.42 ms `POST` (docs/benchmarks.md, (f)). So the
//! committer writes a small group (fewer than [`MAX_SINGLE_KEY_WRITES`]
//! writes: a producer sending one task at a time, or a few at once) as
//! single keys, in this order:
//!
//! 1. `m/accept_group`: this manifest, the group's number and every key the
//!    group is about to write (statuses, pending and journal entries,
//!    idempotency records);
//! 2. those keys, and `m/sequence_reserved`;
//! 3. `m/counters`, whose `finished_group` is the group's number: the
//!    group is finished once this record is written.
//!
//! Invariant: sled recovers a prefix of its log. Its log iterator stops at
//! the first torn or missing message (`LogIter::next` returns at the first
//! `Corrupted` read), and every write above is one message, appended in
//! this order by the committer thread. So after any crash, either the
//! group's counters record is there and so is every key before it, or it
//! is not and the manifest (the first write) is there with any subset of
//! the keys, or nothing of the group is. [`roll_back_unfinished`] runs
//! at open, before anything is read: a manifest whose number is above the
//! stored `finished_group` names a group that was never finished, so never
//! flushed, so never acknowledged, and its keys are removed.
//!
//! A larger group is one sled batch, whose counters record names it as
//! finished, with no manifest: there the batch's extra log write is shared
//! by many tasks, and single keys cost more. Measured side by side
//! ((c), 64 connections, groups of up to 512 requests): single keys for
//! every group took 11,320-11,858 accepts/s at 98-104 µs of CPU per task,
//! against 12,755-13,024/s at 89-93 µs as one batch.
//!
//! Other writers (the relay's completions, the journal, operators) write
//! sled batches or single keys and carry the counters as they are in
//! memory, which change only once a group is finished
//! ([`super::counters::apply_counted`] holds the counters lock), so a
//! counters record written in the middle of a group names the group before
//! it, as it should.

use super::journal;
use super::keys::{parse_pending_key, ACCEPT_GROUP, COUNTERS};
use super::storage::{OutboxStorage, StorageError, WriteOperation};
use serde::Deserialize;
use std::path::Path;

/// A group of this many writes or more is written as one sled batch.
pub(super) const MAX_SINGLE_KEY_WRITES: usize = 32;

/// The group being written: its number and the keys it writes.
#[derive(Debug, PartialEq)]
pub(super) struct GroupManifest {
    pub(super) number: u64,
    pub(super) keys: Vec<Vec<u8>>,
}

impl GroupManifest {
    /// `number` (8 bytes, big-endian), then each key as a 4-byte length
    /// and its bytes.
    pub(super) fn encode(number: u64, keys: impl Iterator<Item = impl AsRef<[u8]>>) -> Vec<u8> {
        let mut encoded = number.to_be_bytes().to_vec();
        for key in keys {
            let key = key.as_ref();
            encoded.extend_from_slice(&(key.len() as u32).to_be_bytes());
            encoded.extend_from_slice(key);
        }
        encoded
    }

    /// `None` for a record that is not a whole manifest.
    pub(super) fn decode(bytes: &[u8]) -> Option<Self> {
        let (number, mut rest) = bytes.split_first_chunk::<8>()?;
        let mut keys = Vec::new();
        while !rest.is_empty() {
            let (length, after) = rest.split_first_chunk::<4>()?;
            let length = u32::from_be_bytes(*length) as usize;
            if after.len() < length {
                return None;
            }
            let (key, after) = after.split_at(length);
            keys.push(key.to_vec());
            rest = after;
        }
        Some(Self {
            number: u64::from_be_bytes(*number),
            keys,
        })
    }
}

/// The one field of the stored counters this needs.
#[derive(Deserialize)]
struct FinishedGroup {
    #[serde(default)]
    finished_group: Option<u64>,
}

/// The last accept group as the store holds it.
#[derive(Debug, PartialEq)]
pub(super) enum GroupState {
    /// Finished, or nothing to tell (no manifest, or one or a counters
    /// record that cannot be read: whether it finished cannot be told, and
    /// keeping a task that may have been acknowledged is the side
    /// at-least-once errs on).
    Standing,
    /// Never finished, so never acknowledged: to be rolled back.
    Unfinished(GroupManifest),
    /// Not finished, yet the store's watermark says its tasks were
    /// acknowledged: the log was damaged after the fact (a cut tail), not
    /// cut short by a crash. Its keys are kept for salvage.
    DamagedAfterAcknowledged(GroupManifest),
}

pub(super) struct LastGroup {
    pub(super) last_number: u64,
    pub(super) state: GroupState,
}

impl GroupManifest {
    /// The lowest sequence of the pending and journal entries it writes.
    fn first_sequence(&self) -> Option<u64> {
        self.keys
            .iter()
            .filter_map(|key| {
                parse_pending_key(key)
                    .map(|(_, sequence)| sequence)
                    .or_else(|| journal::parse_journal_key(key))
            })
            .min()
    }
}

/// Judges the stored `m/counters` and `m/accept_group` records, and the
/// watermark's `accepted_below` when it is readable.
pub(super) fn last_group(counters: Option<&[u8]>, manifest: Option<&[u8]>, accepted_below: Option<u64>) -> LastGroup {
    let finished = match counters {
        None => Some(0),
        Some(bytes) => serde_json::from_slice::<FinishedGroup>(bytes)
            .ok()
            .map(|record| record.finished_group.unwrap_or(0)),
    };
    let standing = |last_number| LastGroup {
        last_number,
        state: GroupState::Standing,
    };
    let Some(stored) = manifest else {
        return standing(finished.unwrap_or(0));
    };
    let Some(manifest) = GroupManifest::decode(stored) else {
        // Written first and whole, or not at all: a manifest that does not
        // decode is damage, and its keys cannot be known.
        tracing::warn!("the outbox's accept group manifest is unreadable; it is left in place");
        return standing(finished.unwrap_or(0));
    };
    let last_number = manifest.number.max(finished.unwrap_or(0));
    match finished {
        Some(finished) if manifest.number > finished => {
            let acknowledged = matches!(
                (manifest.first_sequence(), accepted_below),
                (Some(first), Some(below)) if first < below
            );
            LastGroup {
                last_number,
                state: if acknowledged {
                    GroupState::DamagedAfterAcknowledged(manifest)
                } else {
                    GroupState::Unfinished(manifest)
                },
            }
        }
        Some(_) => standing(last_number),
        None => {
            tracing::warn!("the outbox's counters record is unreadable; the last accept group is kept as it is");
            standing(last_number)
        }
    }
}

/// Removes the keys of an accept group that was never finished (see the
/// module comment and [`last_group`]), and returns the highest group
/// number the store has seen: the next group takes the one after it. A group the watermark says was
/// acknowledged is not removed: the store is damaged, and nothing is
/// written to it.
pub(super) fn roll_back_unfinished(
    storage: &dyn OutboxStorage,
    path: &Path,
    accepted_below: Option<u64>,
) -> Result<u64, StorageError> {
    let counters = storage.get(COUNTERS)?;
    let manifest = storage.get(ACCEPT_GROUP)?;
    let LastGroup { last_number, state } = last_group(counters.as_deref(), manifest.as_deref(), accepted_below);
    let unfinished = match state {
        GroupState::Standing => return Ok(last_number),
        GroupState::DamagedAfterAcknowledged(group) => {
            return Err(StorageError::Corrupt(format!(
                "the outbox at {} is damaged: its last accept group (number {}) is incomplete, yet its tasks \
                 were acknowledged (the watermark says tasks up to sequence {} were). taskgate will not serve \
                 it: recover its tasks into a new outbox with `taskgate outbox salvage --offline \
                 --include-unmatched --to-outbox NEW_DIR` (docs/operations.md, \"A damaged outbox\")",
                path.display(),
                group.number,
                accepted_below.unwrap_or_default(),
            )))
        }
        GroupState::Unfinished(group) => group,
    };
    let removed = unfinished.keys.len();
    let mut operations: Vec<WriteOperation> = unfinished.keys.into_iter().map(|key| (key, None)).collect();
    operations.push((ACCEPT_GROUP.to_vec(), None));
    storage.apply(operations)?;
    tracing::warn!(
        group = unfinished.number,
        keys = removed,
        "an accept group that a crash interrupted was rolled back: its tasks were never acknowledged"
    );
    Ok(last_number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_decodes_to_what_was_encoded_and_a_cut_one_does_not() {
        let keys: Vec<Vec<u8>> = vec![b"t/abc".to_vec(), Vec::new(), b"q/lane\0\0\0\0\0\0\0\0\x07".to_vec()];
        let encoded = GroupManifest::encode(42, keys.iter());
        assert_eq!(
            GroupManifest::decode(&encoded),
            Some(GroupManifest { number: 42, keys })
        );
        for cut in [0, 7, 9, encoded.len() - 1] {
            assert_eq!(GroupManifest::decode(&encoded[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn a_group_is_unfinished_only_when_the_counters_name_an_earlier_one() {
        let pending = super::super::keys::pending_key(&super::super::Lane::new("l"), 40);
        let keys = [b"t/x".to_vec(), pending, journal::journal_key(41)];
        let manifest = GroupManifest::encode(7, keys.iter());
        let judge = |counters: Option<&[u8]>, accepted_below: Option<u64>| {
            let judged = last_group(counters, Some(&manifest), accepted_below);
            let state = match judged.state {
                GroupState::Standing => "standing",
                GroupState::Unfinished(group) => {
                    assert_eq!(group.keys, keys);
                    "unfinished"
                }
                GroupState::DamagedAfterAcknowledged(_) => "damaged",
            };
            (judged.last_number, state)
        };
        assert_eq!(judge(None, None), (7, "unfinished"), "no counters record yet");
        assert_eq!(judge(Some(br#"{"finished_group":6}"#), None), (7, "unfinished"));
        assert_eq!(
            judge(Some(br#"{"finished_group":6}"#), Some(40)),
            (7, "unfinished"),
            "above the watermark"
        );
        assert_eq!(
            judge(Some(br#"{"finished_group":6}"#), Some(41)),
            (7, "damaged"),
            "acknowledged"
        );
        assert_eq!(
            judge(Some(br#"{"lanes":[]}"#), None),
            (7, "unfinished"),
            "a record from before numbers"
        );
        assert_eq!(judge(Some(br#"{"finished_group":7}"#), Some(99)), (7, "standing"));
        assert_eq!(judge(Some(br#"{"finished_group":9}"#), None), (9, "standing"));
        assert_eq!(
            judge(Some(b"{damaged"), None),
            (7, "standing"),
            "unreadable counters keep the group"
        );
        let no_manifest = last_group(Some(br#"{"finished_group":3}"#), None, None);
        assert_eq!((no_manifest.last_number, no_manifest.state), (3, GroupState::Standing));
    }
}
