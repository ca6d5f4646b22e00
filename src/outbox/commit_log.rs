//! The commit log: what makes a write durable, in front of sled.
//!
//! Every write batch is appended here as one record before sled sees it,
//! and a flush is one `fdatasync` of the log's current segment. sled is
//! then only the index the outbox reads: it is made durable in the
//! background by a checkpoint ([`super::storage`]), and the log records it
//! has not made durable yet are applied again at the next open.
//!
//! Why: sled 0.34's own way to durability is its `flush()`, which hands
//! the buffer to one of its I/O threads, writes it, waits for the
//! write-back (`sync_file_range`) and still needs an `fdatasync` after it
//! ([`super::durable_files`]): two device writes and a thread hand-off per
//! group, 0.40-0.60 ms against 0.18 ms for one `fdatasync` on the
//! benchmark machine (docs/benchmarks.md, (f)). Its batches also seal and
//! hand over a buffer to its I/O pool on every `apply_batch`, waking every
//! pool thread. With the log in front, a group costs one `pwrite` and one
//! `fdatasync`, and sled's writes go out in full segments.
//!
//! # On-disk layout
//!
//! `commit-log/` inside the outbox directory holds segments named
//! `{first record number:020}.log`, each a sequence of records:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | payload length, u32 little-endian |
//! | 4 | CRC-32 (IEEE) of the payload |
//! | 8 | record number, u64 little-endian: one more than the record before |
//! | 4 | operation count, u32 |
//! | per operation: 4 + n | key length, key |
//! | 1 | 0 remove, 1 insert |
//! | 4 + n (insert only) | value length, value |
//!
//! sled's tree holds `m/log_applied` (u64, big-endian), written with every
//! record's operations: the number of the last record it holds.
//!
//! # Invariants
//!
//! - Records are appended and applied to sled in number order, under one
//!   lock, each appended *before* it is applied: sled never holds a write
//!   the log has not been handed. A record whose append fails is cut off
//!   again (`ftruncate`) and never applied: a write refused for a full
//!   disk leaves nothing behind.
//! - A segment is `fdatasync`'ed before the next one is created, and the
//!   directory is `fsync`'ed when a segment is created: a flush of the
//!   current segment covers every record appended before it.
//! - A segment is deleted only after a checkpoint that started after its
//!   last record was applied (sled's `flush()` and [`super::durable_files`]
//!   sync): sled then holds everything the segment held.
//! - Replay applies the records above sled's `m/log_applied`, in order,
//!   and stops at the first record that is cut short or fails its CRC in
//!   the last segment with nothing valid after it (an append the crash
//!   interrupted, never acknowledged). Damage with valid records after it
//!   is not a torn append: unless every record it covers is in sled
//!   already, it is a damaged store, like any gap, a damaged segment
//!   before the last, or a store older than the log. The open refuses a
//!   damaged store rather than serve it with acknowledged writes missing.

use super::storage::WriteOperation;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The directory of the log, inside the outbox directory.
pub const LOG_DIRECTORY: &str = "commit-log";
/// sled's record of the last log record it holds.
pub const APPLIED_KEY: &[u8] = b"m/log_applied";
/// A segment this large is closed and a new one started.
pub(super) const SEGMENT_BYTES: u64 = 8 << 20;
/// The length and the CRC before each payload.
const HEADER_BYTES: usize = 4 + 4;
/// A record larger than this is damage, not a record (a group is at most
/// a few MiB).
const RECORD_LIMIT: u32 = 1 << 30;

/// Encodes one record's payload (without the length and CRC header).
fn encode_payload(number: u64, operations: &[WriteOperation]) -> Vec<u8> {
    let size: usize = operations
        .iter()
        .map(|(key, value)| 9 + key.len() + value.as_ref().map_or(0, Vec::len))
        .sum();
    let mut payload = Vec::with_capacity(12 + size);
    payload.extend_from_slice(&number.to_le_bytes());
    payload.extend_from_slice(&(operations.len() as u32).to_le_bytes());
    for (key, value) in operations {
        payload.extend_from_slice(&(key.len() as u32).to_le_bytes());
        payload.extend_from_slice(key);
        match value {
            None => payload.push(0),
            Some(value) => {
                payload.push(1);
                payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
                payload.extend_from_slice(value);
            }
        }
    }
    payload
}

/// A whole record: header and payload.
pub(super) fn encode_record(number: u64, operations: &[WriteOperation]) -> Vec<u8> {
    let payload = encode_payload(number, operations);
    let mut record = Vec::with_capacity(HEADER_BYTES + payload.len());
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    record
}

/// One decoded record.
#[derive(Debug, PartialEq)]
pub struct LogRecord {
    pub number: u64,
    pub operations: Vec<WriteOperation>,
}

fn take<'a>(bytes: &mut &'a [u8], count: usize) -> Option<&'a [u8]> {
    if bytes.len() < count {
        return None;
    }
    let (taken, rest) = bytes.split_at(count);
    *bytes = rest;
    Some(taken)
}

fn take_u32(bytes: &mut &[u8]) -> Option<u32> {
    take(bytes, 4).map(|raw| u32::from_le_bytes(raw.try_into().expect("four bytes")))
}

fn decode_payload(mut payload: &[u8]) -> Option<LogRecord> {
    let number = u64::from_le_bytes(take(&mut payload, 8)?.try_into().ok()?);
    let count = take_u32(&mut payload)?;
    let mut operations = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let key_length = take_u32(&mut payload)? as usize;
        let key = take(&mut payload, key_length)?.to_vec();
        let value = match take(&mut payload, 1)?[0] {
            0 => None,
            1 => {
                let value_length = take_u32(&mut payload)? as usize;
                Some(take(&mut payload, value_length)?.to_vec())
            }
            _ => return None,
        };
        operations.push((key, value));
    }
    payload.is_empty().then_some(LogRecord { number, operations })
}

/// What reading one segment found.
pub struct SegmentReading {
    pub records: Vec<LogRecord>,
    /// Bytes of whole, valid records from the start.
    pub valid_bytes: u64,
    /// Whether anything followed the valid records (a torn or damaged
    /// record, or garbage).
    pub damaged_tail: bool,
}

/// Decodes the records of one segment, stopping at the first that is cut
/// short, fails its CRC, or does not decode.
pub fn read_segment(bytes: &[u8]) -> SegmentReading {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let mut rest = &bytes[at..];
        let Some(length) = take_u32(&mut rest) else { break };
        let Some(crc) = take_u32(&mut rest) else { break };
        if length == 0 || length > RECORD_LIMIT {
            break;
        }
        let Some(payload) = take(&mut rest, length as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(record) = decode_payload(payload) else { break };
        records.push(record);
        at += HEADER_BYTES + length as usize;
    }
    SegmentReading {
        records,
        valid_bytes: at as u64,
        damaged_tail: at < bytes.len(),
    }
}

/// Where the next whole, valid record after damage at `from` starts, and
/// its number, if there is one numbered above `after`. A crash mid-append leaves only a
/// partial record at the very end, so a valid record after bad bytes means
/// the segment was damaged, not torn. Only offsets whose length and number
/// fields are plausible are checked against their CRC, which keeps this
/// cheap even over a long damaged tail.
pub fn next_valid_record(bytes: &[u8], from: usize, after: u64) -> Option<(usize, u64)> {
    /// Records further ahead than this are not looked for.
    const NUMBER_HORIZON: u64 = 1 << 32;
    let mut at = from + 1;
    while at + HEADER_BYTES + 12 <= bytes.len() {
        let length = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes")) as usize;
        let number = u64::from_le_bytes(
            bytes[at + HEADER_BYTES..at + HEADER_BYTES + 8]
                .try_into()
                .expect("eight bytes"),
        );
        if length >= 12
            && at + HEADER_BYTES + length <= bytes.len()
            && number > after
            && number - after < NUMBER_HORIZON
        {
            let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("four bytes"));
            let payload = &bytes[at + HEADER_BYTES..at + HEADER_BYTES + length];
            if crc32fast::hash(payload) == crc && decode_payload(payload).is_some() {
                return Some((at, number));
            }
        }
        at += 1;
    }
    None
}

pub(super) fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The segments in `directory`, by first record number. Files that are
/// not segments are left alone.
pub fn list_segments(directory: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    match std::fs::read_dir(directory) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(first) = name.strip_suffix(".log").and_then(|stem| stem.parse::<u64>().ok()) {
                    segments.push((first, entry.path()));
                }
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    segments.sort();
    Ok(segments)
}

/// Why the log cannot be replayed onto the store.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the commit log failed: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Damaged(String),
}

/// The records the store still needs: every record above `applied` (the
/// store's `m/log_applied`), in order. Segments whose successor starts at
/// or below `applied + 1` are stale (all their records are in the store)
/// and are not read.
pub fn records_after(directory: &Path, applied: u64) -> Result<Vec<LogRecord>, ReplayError> {
    let segments = list_segments(directory)?;
    let mut needed = Vec::new();
    let live: Vec<&(u64, PathBuf)> = segments
        .iter()
        .enumerate()
        .filter(|(index, _)| segments.get(index + 1).is_none_or(|(next, _)| *next > applied + 1))
        .map(|(_, segment)| segment)
        .collect();
    let Some((first, _)) = live.first() else {
        return Ok(needed);
    };
    if *first > applied + 1 {
        return Err(ReplayError::Damaged(format!(
            "its commit log starts at record {first} but the store holds records only up to {applied}: \
             records the log had handed to the store are missing from it"
        )));
    }
    let mut expected = *first;
    for (index, (first, path)) in live.iter().enumerate() {
        let last_segment = index + 1 == live.len();
        if *first != expected {
            return Err(ReplayError::Damaged(format!(
                "its commit log segment {} starts at record {first}, but the one before it ends at record {}",
                path.display(),
                expected.saturating_sub(1)
            )));
        }
        let bytes = std::fs::read(path)?;
        let mut at = 0usize;
        loop {
            let reading = read_segment(&bytes[at..]);
            for record in reading.records {
                if record.number != expected {
                    return Err(ReplayError::Damaged(format!(
                        "its commit log segment {} holds record {} where record {expected} belongs",
                        path.display(),
                        record.number
                    )));
                }
                expected += 1;
                if record.number > applied {
                    needed.push(record);
                }
            }
            if !reading.damaged_tail {
                break;
            }
            let damaged_at = at + reading.valid_bytes as usize;
            match next_valid_record(&bytes, damaged_at, expected - 1) {
                // Damage over records the store holds already costs nothing.
                Some((next, number)) if number - 1 <= applied => {
                    expected = number;
                    at = next;
                }
                Some((next, _)) => {
                    return Err(ReplayError::Damaged(format!(
                        "its commit log segment {} is damaged after {damaged_at} bytes, and records follow the \
                         damage (at byte {next}): it was not cut short by a crash",
                        path.display(),
                    )));
                }
                None if last_segment => break,
                None => {
                    return Err(ReplayError::Damaged(format!(
                        "its commit log segment {} is damaged after {damaged_at} bytes, and later segments follow it",
                        path.display(),
                    )));
                }
            }
        }
    }
    Ok(needed)
}

/// What [`readable_records`] found.
#[derive(Default)]
pub struct Readable {
    /// Every record that reads, in number order.
    pub records: Vec<LogRecord>,
    /// Segments other than the last with damage after their valid
    /// records (the last one's is an append a crash cut short).
    pub damaged_segments: u64,
}

/// For salvage: every record that reads in every segment, whatever the
/// gaps and damage (each segment is read up to its first bad record).
pub fn readable_records(directory: &Path) -> io::Result<Readable> {
    let mut readable = Readable::default();
    let segments = list_segments(directory)?;
    let count = segments.len();
    for (index, (_, path)) in segments.into_iter().enumerate() {
        let last = index + 1 == count;
        let Ok(bytes) = std::fs::read(&path) else {
            readable.damaged_segments += 1;
            continue;
        };
        // Past damage, reading goes on at the next valid record; damage
        // with nothing valid after it in the last segment is a torn append.
        let mut at = 0usize;
        let mut after = 0u64;
        let mut damaged = false;
        loop {
            let reading = read_segment(&bytes[at..]);
            if let Some(record) = reading.records.last() {
                after = record.number;
            }
            readable.records.extend(reading.records);
            if !reading.damaged_tail {
                break;
            }
            match next_valid_record(&bytes, at + reading.valid_bytes as usize, after) {
                Some((next, _)) => {
                    damaged = true;
                    at = next;
                }
                None => {
                    damaged |= !last;
                    break;
                }
            }
        }
        readable.damaged_segments += u64::from(damaged);
    }
    readable.records.sort_by_key(|record| record.number);
    readable.records.dedup_by_key(|record| record.number);
    Ok(readable)
}

/// The segment being appended to.
pub(super) struct Segment {
    pub(super) first: u64,
    pub(super) file: std::sync::Arc<File>,
    pub(super) length: u64,
}

impl Segment {
    /// Creates segment `first` and makes its name durable.
    pub(super) fn create(directory: &Path, first: u64) -> io::Result<Self> {
        let path = directory.join(segment_name(first));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        File::open(directory)?.sync_all()?;
        Ok(Self {
            first,
            file: std::sync::Arc::new(file),
            length: 0,
        })
    }

    /// Appends one encoded record. On failure the segment is cut back to
    /// where it was, so a partial record is never left for a later append
    /// to follow (and a later flush to make durable).
    pub(super) fn append(&mut self, record: &[u8]) -> io::Result<()> {
        match self.file.write_all_at(record, self.length) {
            Ok(()) => {
                self.length += record.len() as u64;
                Ok(())
            }
            Err(error) => {
                if let Err(cut) = self.file.set_len(self.length) {
                    tracing::error!(%cut, "cutting a failed commit log append back failed");
                }
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operations(tag: u8) -> Vec<WriteOperation> {
        vec![
            (vec![b'q', tag], Some(vec![tag; 100])),
            (b"t/gone".to_vec(), None),
            (vec![], Some(vec![])),
        ]
    }

    fn write_segment(directory: &Path, first: u64, numbers: std::ops::Range<u64>) -> PathBuf {
        let mut bytes = Vec::new();
        for number in numbers {
            bytes.extend(encode_record(number, &operations(number as u8)));
        }
        let path = directory.join(segment_name(first));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_record_decodes_to_what_was_encoded() {
        let reading = read_segment(&encode_record(7, &operations(3)));
        assert_eq!(
            reading.records,
            vec![LogRecord {
                number: 7,
                operations: operations(3)
            }]
        );
        assert!(!reading.damaged_tail);
    }

    #[test]
    fn reading_stops_at_a_cut_or_flipped_record() {
        let mut bytes = encode_record(1, &operations(1));
        let first = bytes.len();
        bytes.extend(encode_record(2, &operations(2)));
        for cut in [first + 1, first + 8, bytes.len() - 1] {
            let reading = read_segment(&bytes[..cut]);
            assert_eq!(reading.records.len(), 1, "cut at {cut}");
            assert_eq!(reading.valid_bytes, first as u64);
            assert!(reading.damaged_tail);
        }
        let mut flipped = bytes.clone();
        flipped[first + 20] ^= 0x40;
        let reading = read_segment(&flipped);
        assert_eq!(reading.records.len(), 1);
        assert!(reading.damaged_tail);
    }

    #[test]
    fn replay_returns_the_records_above_the_store_and_skips_stale_segments() {
        let directory = tempfile::tempdir().unwrap();
        write_segment(directory.path(), 1, 1..5);
        write_segment(directory.path(), 5, 5..9);
        write_segment(directory.path(), 9, 9..11);
        let numbers = |applied| -> Vec<u64> {
            records_after(directory.path(), applied)
                .unwrap()
                .iter()
                .map(|record| record.number)
                .collect()
        };
        assert_eq!(numbers(0), (1..11).collect::<Vec<_>>());
        assert_eq!(numbers(6), vec![7, 8, 9, 10]);
        assert_eq!(numbers(10), Vec::<u64>::new());
        // The first segment is stale once the store holds record 4: it is
        // not even read.
        std::fs::write(directory.path().join(segment_name(1)), b"garbage").unwrap();
        assert_eq!(numbers(4), (5..11).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_last_segment_ends_the_replay_but_damage_before_it_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        write_segment(directory.path(), 1, 1..5);
        let last = write_segment(directory.path(), 5, 5..9);
        let length = std::fs::metadata(&last).unwrap().len();
        File::options()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(length - 3)
            .unwrap();
        let numbers: Vec<u64> = records_after(directory.path(), 0)
            .unwrap()
            .iter()
            .map(|record| record.number)
            .collect();
        assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6, 7]);
        let middle = directory.path().join(segment_name(1));
        let length = std::fs::metadata(&middle).unwrap().len();
        File::options()
            .write(true)
            .open(&middle)
            .unwrap()
            .set_len(length - 3)
            .unwrap();
        assert!(matches!(
            records_after(directory.path(), 0),
            Err(ReplayError::Damaged(_))
        ));
    }

    /// Bad bytes in the middle of the last segment are damage, not a torn
    /// append: the records after them were acknowledged. Salvage reads on
    /// past the damage.
    #[test]
    fn damage_with_records_after_it_is_refused_and_salvage_reads_past_it() {
        let directory = tempfile::tempdir().unwrap();
        let path = write_segment(directory.path(), 1, 1..6);
        let mut bytes = std::fs::read(&path).unwrap();
        let record = bytes.len() / 5;
        bytes[record + 30] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let error = records_after(directory.path(), 0).unwrap_err().to_string();
        assert!(error.contains("records follow the damage"), "{error}");
        // The same damage over a record the store holds already is harmless.
        let numbers_after = |applied| -> Vec<u64> {
            records_after(directory.path(), applied)
                .unwrap()
                .iter()
                .map(|record| record.number)
                .collect()
        };
        assert_eq!(numbers_after(2), vec![3, 4, 5]);
        let readable = readable_records(directory.path()).unwrap();
        let numbers: Vec<u64> = readable.records.iter().map(|record| record.number).collect();
        assert_eq!(numbers, vec![1, 3, 4, 5]);
        assert_eq!(readable.damaged_segments, 1);
        // The same damage in the last record is a torn append.
        let mut torn = std::fs::read(&path).unwrap();
        torn[record + 30] ^= 0x01;
        let length = torn.len();
        torn[length - 5] ^= 0x01;
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(records_after(directory.path(), 0).unwrap().len(), 4);
        assert_eq!(readable_records(directory.path()).unwrap().damaged_segments, 0);
    }

    #[test]
    fn a_store_older_than_its_log_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        write_segment(directory.path(), 20, 20..25);
        assert_eq!(records_after(directory.path(), 19).unwrap().len(), 5);
        let error = records_after(directory.path(), 10).unwrap_err().to_string();
        assert!(error.contains("starts at record 20"), "{error}");
        // A gap between segments.
        write_segment(directory.path(), 30, 30..31);
        assert!(matches!(
            records_after(directory.path(), 19),
            Err(ReplayError::Damaged(_))
        ));
    }

    #[test]
    fn a_failed_append_leaves_no_partial_record() {
        let directory = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(directory.path(), 1).unwrap();
        segment.append(&encode_record(1, &operations(1))).unwrap();
        let length = segment.length;
        // A read-only handle makes the next write fail.
        segment.file = std::sync::Arc::new(File::open(directory.path().join(segment_name(1))).unwrap());
        assert!(segment.append(&encode_record(2, &operations(2))).is_err());
        assert_eq!(segment.length, length);
        let bytes = std::fs::read(directory.path().join(segment_name(1))).unwrap();
        assert_eq!(bytes.len() as u64, length);
        assert_eq!(read_segment(&bytes).records.len(), 1);
    }
}
