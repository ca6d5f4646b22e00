//! Keys and codecs of the outbox's one sled tree: every key is built and
//! parsed here and nowhere else (the layout table is in [`super`]'s module
//! documentation).
//!
//! Invariants: integers are big-endian, so keys sort by sequence and by
//! time; a lane name never holds `\0`, which ends it in a pending key.

use super::Lane;
use crate::task::TaskId;
use chrono::{DateTime, Utc};

pub(super) const PENDING: &[u8] = b"q/";
pub(super) const STATUS: &[u8] = b"t/";
pub(super) const DEAD: &[u8] = b"d/";
pub(super) const IDEMPOTENCY: &[u8] = b"i/";
pub(super) const PUBLISHED_INDEX: &[u8] = b"p/";
pub(super) const SEQUENCE_RESERVED: &[u8] = b"m/sequence_reserved";
pub(super) const COUNTERS: &[u8] = b"m/counters";
pub(super) const JOURNAL: &[u8] = b"j/";
pub(super) const OPERATOR_HOLDS: &[u8] = b"m/operator_holds";
pub(super) const SENT_MARK: &[u8] = b"m/sent/";
pub(super) const ACCEPT_GROUP: &[u8] = b"m/accept_group";

pub(super) fn pending_prefix(lane: &Lane) -> Vec<u8> {
    let mut key = Vec::with_capacity(PENDING.len() + lane.as_str().len() + 1);
    key.extend_from_slice(PENDING);
    key.extend_from_slice(lane.as_str().as_bytes());
    key.push(0);
    key
}

pub(super) fn pending_key(lane: &Lane, sequence: u64) -> Vec<u8> {
    let mut key = pending_prefix(lane);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// Splits `q/{lane}\0{sequence}` back into its parts.
pub(super) fn parse_pending_key(key: &[u8]) -> Option<(Lane, u64)> {
    let rest = key.strip_prefix(PENDING)?;
    if rest.len() < 9 || rest[rest.len() - 9] != 0 {
        return None;
    }
    let (lane, sequence) = rest.split_at(rest.len() - 9);
    // A damaged key may hold a `\0` in the lane part; no lane has one.
    let lane = std::str::from_utf8(lane).ok().filter(|lane| !lane.contains('\0'))?;
    let sequence = u64::from_be_bytes(sequence[1..].try_into().ok()?);
    Some((Lane::new(lane), sequence))
}

pub(super) fn prefixed(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

pub(super) fn status_key(id: &TaskId) -> Vec<u8> {
    prefixed(STATUS, id.as_bytes())
}

pub(super) fn dead_key(sequence: u64) -> Vec<u8> {
    prefixed(DEAD, &sequence.to_be_bytes())
}

pub(super) fn idempotency_key(key: &str) -> Vec<u8> {
    prefixed(IDEMPOTENCY, key.as_bytes())
}

pub(super) fn published_index_key(at: DateTime<Utc>, id: &TaskId) -> Vec<u8> {
    let millis = at.timestamp_millis().max(0) as u64;
    let mut key = prefixed(PUBLISHED_INDEX, &millis.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// The tasks a retention index record stands for: the ids in its value
/// (one record per published window), or, for a record with an empty value
/// (outboxes written before 2026-11-28), the one id at the end of its key.
pub(super) fn published_index_ids(key: &[u8], value: &[u8]) -> Vec<TaskId> {
    if value.is_empty() {
        let Some(id) = key
            .len()
            .checked_sub(16)
            .and_then(|at| <[u8; 16]>::try_from(&key[at..]).ok())
        else {
            return Vec::new();
        };
        return vec![TaskId::from_bytes(id)];
    }
    value
        .chunks_exact(16)
        .filter_map(|chunk| <[u8; 16]>::try_from(chunk).ok())
        .map(TaskId::from_bytes)
        .collect()
}

/// `m/sent/{lane}`: the highest sequence of the lane handed to the broker.
pub(super) fn sent_mark_key(lane: &Lane) -> Vec<u8> {
    prefixed(SENT_MARK, lane.as_str().as_bytes())
}
