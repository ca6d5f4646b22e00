//! The syscalls that make sled's writes durable.
//!
//! sled 0.34's `flush()` writes its buffers with `pwrite` and then calls
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on the range. That
//! starts and waits for write-back of those pages, but it writes no file
//! metadata (a file that grew keeps its old size on disk) and issues no
//! cache flush to the drive, so a power loss can still take the data. sled
//! calls a real `fsync` only from its background flusher, every 500 ms.
//!
//! [`DurableFiles::sync`] runs right after sled's `flush()` returned, so
//! every byte sled has written for the batches applied so far is already in
//! the page cache. It then makes them durable with:
//!
//! 1. `fdatasync(db)`: sled's whole log lives in the one `db` file; this
//!    writes its dirty pages, the size change a `pwrite` past the end made,
//!    and flushes the drive's cache.
//! 2. For each file that appeared in `blobs/` since the last sync (sled
//!    writes values too large for its log as one file each, with no sync):
//!    `fdatasync(blob)`, then `fsync(blobs/)` so its name is durable too.
//! 3. When the set of names in the outbox directory changed (sled writes a
//!    snapshot as `snap.*.generating`, syncs it and renames it; it never
//!    syncs the directory): `fsync(directory)` so the rename is durable.
//!
//! Steps 2 and 3 list the two directories only when a name appeared in
//! them since the last look: an inotify watch on each (`IN_CREATE`,
//! `IN_MOVED_TO`) is drained, without blocking, before the listing. The
//! kernel queues the event inside the `open` or `rename` that made the
//! name, so every name sled made before its `flush()` returned is seen by
//! the sync that follows it; a name made during a listing is listed again
//! next time, which only repeats an `fdatasync`. Without the watch (no
//! inotify instance to be had, or the queue overflowed) every sync lists
//! both directories. Listing them on every flush cost a tenth of a single
//! producer's accept latency (11 syscalls on the path of every 202).
//!
//! A blob can be listed while it is still being written: sled writes it
//! from whichever thread changed the page (a relay settling a window as
//! well as the committer), and a sync running meanwhile would `fdatasync`
//! a partial file and then take it as known. So the watch on `blobs/` also
//! reports `IN_CLOSE_WRITE`, and a blob closed after writing is synced
//! again by the next sync. sled closes a blob before the log record that
//! points at it can be written (the record's buffer waits for its writer),
//! so every blob that a flushed record points at was closed before that
//! flush returned, and its close is seen by the sync after it. An
//! overflowed queue, which loses names, syncs every blob again.
//!
//! At open, every file already there is synced once, and the directory and
//! its parent, so a store created a moment before a power loss is found.
//!
//! That is enough because sled recovers from its newest snapshot plus the
//! log after it, and both are then on disk in full: a batch is durable once
//! the log bytes that hold it are, and step 1 makes them so. Removals (old
//! snapshots, collected blobs) need no sync: a removed file that comes back
//! after a crash is one sled no longer points at.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The outbox directory's files, and which of them are known to be synced.
pub(super) struct DurableFiles {
    directory: PathBuf,
    log: File,
    /// Names seen at the last sync, in the directory and in `blobs/`.
    known: Mutex<KnownNames>,
    /// Tells whether names appeared since the last listing; `None` lists
    /// on every sync.
    watch: Option<NameWatch>,
}

#[derive(Default)]
struct KnownNames {
    directory: BTreeSet<OsString>,
    blobs: BTreeSet<OsString>,
    /// Files opened and `fdatasync`ed by listings (tests read it).
    files_synced: u64,
}

const LOG_FILE: &str = "db";
const BLOB_DIRECTORY: &str = "blobs";

impl DurableFiles {
    /// Opens the log file of the sled store at `directory` (which sled has
    /// just opened) and syncs everything already there once.
    pub(super) fn open(directory: &Path) -> io::Result<Self> {
        let log = File::open(directory.join(LOG_FILE))?;
        // Watching starts before the first listing, so nothing made in
        // between is missed.
        let watch = NameWatch::start(directory, &directory.join(BLOB_DIRECTORY));
        let files = Self {
            directory: directory.to_path_buf(),
            log,
            known: Mutex::new(KnownNames::default()),
            watch,
        };
        {
            let mut known = files.known.lock().expect("durable files lock poisoned");
            let known = &mut *known;
            known.directory = sync_new_files(&files.directory, &BTreeSet::new(), &mut known.files_synced)?;
            known.blobs = sync_new_files(&files.blob_directory(), &BTreeSet::new(), &mut known.files_synced)?;
        }
        sync_directory(&files.blob_directory())?;
        sync_directory(&files.directory)?;
        if let Some(parent) = files.directory.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            sync_directory(parent)?;
        }
        Ok(files)
    }

    fn blob_directory(&self) -> PathBuf {
        self.directory.join(BLOB_DIRECTORY)
    }

    /// Makes everything sled has written so far durable (see the module
    /// comment for the steps). Call it only after `sled::Db::flush`.
    pub(super) fn sync(&self) -> io::Result<()> {
        let mut guard = self.known.lock().expect("durable files lock poisoned");
        let known = &mut *guard;
        self.log.sync_data()?;
        if let Some(watch) = &self.watch {
            match watch.changes() {
                Changes::None => return Ok(()),
                Changes::Names { closed_blobs } => {
                    for name in &closed_blobs {
                        known.blobs.remove(name);
                    }
                }
                Changes::Unknown => known.blobs.clear(),
            }
        }
        let blob_directory = self.blob_directory();
        let blobs = sync_new_files(&blob_directory, &known.blobs, &mut known.files_synced)?;
        if blobs != known.blobs {
            sync_directory(&blob_directory)?;
            known.blobs = blobs;
        }
        let names = sync_new_files(&self.directory, &known.directory, &mut known.files_synced)?;
        if names != known.directory {
            sync_directory(&self.directory)?;
            known.directory = names;
        }
        Ok(())
    }
}

/// What the watch saw since the last look.
#[derive(Debug, PartialEq)]
enum Changes {
    /// No name appeared and no blob was closed: nothing to list.
    None,
    /// Names appeared, or these blobs were closed after writing (each is
    /// synced again).
    Names { closed_blobs: Vec<OsString> },
    /// Events were lost (the queue overflowed, a watch went away, a read
    /// failed): every blob is synced again.
    Unknown,
}

/// An inotify instance watching the outbox directory for names that
/// appear, and `blobs/` for names that appear and files closed after
/// writing.
struct NameWatch {
    events: std::os::fd::OwnedFd,
    blob_watch: i32,
}

impl NameWatch {
    /// Watches `directory` and `blob_directory` (which must exist); `None`
    /// when the kernel gives no inotify instance or watch (a per-user
    /// limit), and the caller then lists every time.
    fn start(directory: &Path, blob_directory: &Path) -> Option<Self> {
        use rustix::fs::inotify::{self, WatchFlags};
        let names = WatchFlags::CREATE | WatchFlags::MOVED_TO | WatchFlags::ONLYDIR;
        let start = || -> rustix::io::Result<Self> {
            let events = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
            inotify::add_watch(&events, directory, names)?;
            let blob_watch = inotify::add_watch(&events, blob_directory, names | WatchFlags::CLOSE_WRITE)?;
            Ok(Self { events, blob_watch })
        };
        start()
            .inspect_err(|error| {
                tracing::debug!(%error, "no inotify watch on the outbox directory: every flush lists it");
            })
            .ok()
    }

    /// Drains the queue (never blocks) and says what it held.
    fn changes(&self) -> Changes {
        use rustix::fs::inotify::{ReadFlags, Reader};
        use std::os::unix::ffi::OsStrExt;
        let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = Reader::new(&self.events, &mut buffer);
        let mut names_appeared = false;
        let mut closed_blobs = Vec::new();
        loop {
            match reader.next() {
                Ok(event) => {
                    let flags = event.events();
                    if flags.intersects(ReadFlags::QUEUE_OVERFLOW | ReadFlags::IGNORED | ReadFlags::UNMOUNT) {
                        return Changes::Unknown;
                    }
                    if flags.contains(ReadFlags::CLOSE_WRITE) && event.wd() == self.blob_watch {
                        if let Some(name) = event.file_name() {
                            closed_blobs.push(OsStr::from_bytes(name.to_bytes()).to_os_string());
                        }
                    } else {
                        names_appeared = true;
                    }
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return Changes::Unknown,
            }
        }
        if names_appeared || !closed_blobs.is_empty() {
            Changes::Names { closed_blobs }
        } else {
            Changes::None
        }
    }
}

/// Lists the regular files in `directory` and `fdatasync`s those not in
/// `known`. A missing directory has no files.
fn sync_new_files(
    directory: &Path,
    known: &BTreeSet<OsString>,
    files_synced: &mut u64,
) -> io::Result<BTreeSet<OsString>> {
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(error) => return Err(error),
    };
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        if !known.contains(&name) {
            match File::open(entry.path()) {
                Ok(file) => {
                    file.sync_data()?;
                    *files_synced += 1;
                }
                // Removed between the listing and the open (sled cleaning up
                // an old snapshot): nothing to make durable.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            }
        }
        names.insert(name);
    }
    Ok(names)
}

/// `fsync` of a directory, which makes the names created or renamed in it
/// durable. A missing directory has nothing to sync.
fn sync_directory(directory: &Path) -> io::Result<()> {
    match File::open(directory) {
        Ok(handle) => handle.sync_all(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New blobs and renamed snapshots are picked up (and synced) by the
    /// next sync; files already known are not opened again.
    #[test]
    fn a_sync_picks_up_files_created_since_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOG_FILE), b"log").unwrap();
        let files = DurableFiles::open(dir.path()).unwrap();
        assert_eq!(files.known.lock().unwrap().directory.len(), 1);
        std::fs::create_dir(dir.path().join(BLOB_DIRECTORY)).unwrap();
        std::fs::write(dir.path().join(BLOB_DIRECTORY).join("17"), b"blob").unwrap();
        std::fs::write(dir.path().join("snap.0000000000000010"), b"snapshot").unwrap();
        files.sync().unwrap();
        let known = files.known.lock().unwrap();
        assert!(known.blobs.contains(&OsString::from("17")));
        assert!(known.directory.contains(&OsString::from("snap.0000000000000010")));
    }

    /// With the watch, a sync after which no name appeared lists nothing,
    /// and a name made or renamed into either directory is picked up by
    /// the next sync (as it is without the watch).
    #[test]
    fn the_watch_lists_only_after_a_name_appeared() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOG_FILE), b"log").unwrap();
        std::fs::create_dir(dir.path().join(BLOB_DIRECTORY)).unwrap();
        let files = DurableFiles::open(dir.path()).unwrap();
        let watch = files.watch.as_ref().expect("an inotify watch on this machine");
        assert_eq!(watch.changes(), Changes::None, "nothing was made since open");

        std::fs::write(dir.path().join(BLOB_DIRECTORY).join("18"), b"blob").unwrap();
        files.sync().unwrap();
        assert!(files.known.lock().unwrap().blobs.contains(&OsString::from("18")));

        // A file made outside, then renamed in, as sled writes a snapshot.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("snap.generating"), b"snapshot").unwrap();
        files.sync().unwrap();
        std::fs::rename(
            dir.path().join("snap.generating"),
            dir.path().join("snap.0000000000000020"),
        )
        .unwrap();
        std::fs::write(outside.path().join("unrelated"), b"x").unwrap();
        files.sync().unwrap();
        let known = files.known.lock().unwrap();
        assert!(known.directory.contains(&OsString::from("snap.0000000000000020")));
        assert!(!known.directory.contains(&OsString::from("snap.generating")));
        drop(known);

        // Writing into a known file makes no name: no listing is needed.
        std::fs::write(dir.path().join(LOG_FILE), b"more log").unwrap();
        assert_eq!(watch.changes(), Changes::None);
    }

    /// A blob listed while it was still being written (another thread of
    /// sled's) is synced again once it is closed, and only then taken as
    /// done; closing a blob that was only read changes nothing.
    #[test]
    fn a_blob_synced_while_partial_is_synced_again_when_closed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOG_FILE), b"log").unwrap();
        std::fs::create_dir(dir.path().join(BLOB_DIRECTORY)).unwrap();
        let files = DurableFiles::open(dir.path()).unwrap();
        assert!(files.watch.is_some(), "an inotify watch on this machine");
        let synced = || files.known.lock().unwrap().files_synced;
        let before = synced();

        let blob_path = dir.path().join(BLOB_DIRECTORY).join("19");
        let mut blob = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&blob_path)
            .unwrap();
        blob.write_all(b"first half").unwrap();
        files.sync().unwrap();
        assert_eq!(synced(), before + 1, "the new blob is synced as it stands");
        blob.write_all(b", second half").unwrap();
        files.sync().unwrap();
        assert_eq!(synced(), before + 1, "still open: nothing new to sync yet");
        drop(blob);
        files.sync().unwrap();
        assert_eq!(synced(), before + 2, "closed after writing: synced again, whole");
        files.sync().unwrap();
        assert_eq!(synced(), before + 2, "synced whole once: not again");

        let _read = std::fs::read(&blob_path).unwrap();
        files.sync().unwrap();
        assert_eq!(synced(), before + 2, "a read is no write");
    }
}
