//! The accepted-sequence watermark: a witness outside sled's log that the
//! store has not gone back in time.
//!
//! sled replays its log at open and stops at the first record it cannot
//! read, so a log damaged in the middle (a flipped byte, a lost sector)
//! opens without an error at an *earlier* state: every task accepted after
//! the damage is silently gone. The store itself cannot tell, so the
//! committer writes down, beside it, how far accepts have been made durable
//! (file `accepted-watermark` in the outbox directory: the sequence below
//! which everything was flushed), at most once a second and once more when
//! the outbox closes. Every batch that hands out sequences also stores the
//! next one (`m/sequence_reserved`), so an intact store always knows a next
//! sequence at or above the watermark; one that opens below it has lost
//! acknowledged tasks, and is refused as damaged (salvage recovers them
//! from the log's intact records, `--include-unmatched`).
//!
//! Format: 24 bytes, `TGWM` + version 1 (u32), the sequence (u64), and the
//! sequence XOR a constant (u64), big-endian. Written in place with one
//! `pwrite` and `fdatasync` (a 24-byte write at offset 0 lies in one disk
//! sector, so it is never torn); a file that does not check out is
//! ignored with a warning: it can only make taskgate refuse a store,
//! never accept a damaged one, so an unreadable witness is no witness.
//!
//! Invariant: the value written is never above the durable sequence
//! ([`super::group_commit::Visibility`]), so a false alarm needs the
//! watermark file itself to be from a later copy than the store (copy an
//! outbox only while taskgate is stopped).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const FILE_NAME: &str = "accepted-watermark";
/// How often the committer refreshes the watermark while accepting.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

const MAGIC: &[u8; 4] = b"TGWM";
const VERSION: u32 = 1;
const CHECK: u64 = 0x5a5a_a5a5_0f0f_f0f0;
const LENGTH: usize = 24;

fn encode(sequence: u64) -> [u8; LENGTH] {
    let mut bytes = [0u8; LENGTH];
    bytes[..4].copy_from_slice(MAGIC);
    bytes[4..8].copy_from_slice(&VERSION.to_be_bytes());
    bytes[8..16].copy_from_slice(&sequence.to_be_bytes());
    bytes[16..24].copy_from_slice(&(sequence ^ CHECK).to_be_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != LENGTH || &bytes[..4] != MAGIC || bytes[4..8] != VERSION.to_be_bytes() {
        return None;
    }
    let sequence = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
    let check = u64::from_be_bytes(bytes[16..24].try_into().ok()?);
    (check == sequence ^ CHECK).then_some(sequence)
}

/// What a store's directory says about its watermark.
#[derive(Debug, PartialEq, Eq)]
pub enum Reading {
    /// No file: a new outbox, or one written before the watermark existed.
    Absent,
    Valid(u64),
    /// A file that does not check out (see the module comment).
    Unreadable(String),
}

pub fn read(directory: &Path) -> Reading {
    let path = directory.join(FILE_NAME);
    let mut bytes = Vec::new();
    match File::open(&path).and_then(|mut file| file.read_to_end(&mut bytes)) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Reading::Absent,
        Err(error) => Reading::Unreadable(format!("{}: {error}", path.display())),
        Ok(_) => match decode(&bytes) {
            Some(sequence) => Reading::Valid(sequence),
            None => Reading::Unreadable(format!("{}: not a taskgate watermark", path.display())),
        },
    }
}

/// Keeps the watermark file of one open outbox up to date (the committer
/// thread owns it).
pub struct Watermark {
    path: PathBuf,
    file: Option<File>,
    written: Option<u64>,
    written_at: Option<Instant>,
}

impl Watermark {
    pub fn new(directory: &Path) -> Self {
        Self {
            path: directory.join(FILE_NAME),
            file: None,
            written: None,
            written_at: None,
        }
    }

    /// Writes `durable_below` if it moved and the last write is older than
    /// [`REFRESH_EVERY`] (or `now_anyway`, when the outbox closes). A
    /// failure is logged and costs only the witness.
    pub fn refresh(&mut self, durable_below: u64, now_anyway: bool) {
        if self.written == Some(durable_below) {
            return;
        }
        if !now_anyway && self.written_at.is_some_and(|at| at.elapsed() < REFRESH_EVERY) {
            return;
        }
        self.written_at = Some(Instant::now());
        match self.write(durable_below) {
            Ok(()) => self.written = Some(durable_below),
            Err(error) => {
                metrics::counter!("taskgate_outbox_storage_errors_total", "operation" => "watermark").increment(1);
                tracing::warn!(path = %self.path.display(), %error, "cannot update the outbox's accepted-sequence watermark");
            }
        }
    }

    fn write(&mut self, sequence: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.file.is_none() {
            let created = !self.path.exists();
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&self.path)?;
            // A new file, or one of another length (damaged): exactly one
            // record long from now on.
            if created || file.metadata()?.len() != LENGTH as u64 {
                file.set_len(LENGTH as u64)?;
                file.sync_all()?;
            }
            if created {
                // Its name must survive a power loss as well as its bytes.
                if let Some(directory) = self.path.parent() {
                    File::open(directory)?.sync_all()?;
                }
            }
            self.file = Some(file);
        }
        let file = self.file.as_ref().expect("opened above");
        file.write_all_at(&encode(sequence), 0)?;
        file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_watermark_reads_back_and_damage_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), Reading::Absent);
        let mut watermark = Watermark::new(dir.path());
        watermark.refresh(41, true);
        assert_eq!(read(dir.path()), Reading::Valid(41));
        // Within the refresh interval only a closing write goes through.
        watermark.refresh(50, false);
        assert_eq!(read(dir.path()), Reading::Valid(41));
        watermark.refresh(50, true);
        assert_eq!(read(dir.path()), Reading::Valid(50));

        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(dir.path()), Reading::Unreadable(_)));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(read(dir.path()), Reading::Unreadable(_)));
        // A damaged file of another length is rewritten to one record.
        std::fs::write(&path, vec![7u8; 100]).unwrap();
        let mut watermark = Watermark::new(dir.path());
        watermark.refresh(60, true);
        assert_eq!(read(dir.path()), Reading::Valid(60));
    }
}
