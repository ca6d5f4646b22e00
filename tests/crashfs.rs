//! The crash-simulating filesystem (tests/support/crashfs.rs) on its own:
//! unsynced data is gone after a power loss, synced data stays, namespace
//! changes apply at once, reads see backing content plus what was written,
//! and what sled 0.34 keeps when only its `flush()` ran.

mod support;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use support::crashfs::CrashFs;

fn mounted(dir: &Path) -> CrashFs {
    CrashFs::mount(&dir.join("backing"), &dir.join("mnt"))
}

fn read(path: &Path) -> Vec<u8> {
    let mut content = Vec::new();
    File::open(path).unwrap().read_to_end(&mut content).unwrap();
    content
}

#[test]
fn unsynced_writes_are_gone_after_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let path = fs.mountpoint().join("unsynced");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"accepted, not synced").unwrap();
    drop(file); // close(2) makes nothing durable either
    assert_eq!(read(&path), b"accepted, not synced", "the mount reads what was written");
    assert_eq!(fs::metadata(&path).unwrap().len(), 20, "and stat sees its size");
    assert_eq!(fs.unsynced_bytes(), 20);

    let lost = fs.lose_power();
    assert_eq!((lost.files, lost.bytes), (1, 20), "{lost:?}");
    let backing = dir.path().join("backing/unsynced");
    assert!(backing.exists(), "creating the file is durable at once");
    assert_eq!(read(&backing), b"", "the unsynced data are gone");
}

#[test]
fn synced_writes_survive_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let path = fs.mountpoint().join("synced");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"first half;").unwrap();
    file.sync_data().unwrap();
    assert_eq!(fs.fsync_count(), 1);
    assert_eq!(fs.unsynced_bytes(), 0);
    file.write_all(b" second half").unwrap();
    let mut other = File::create(fs.mountpoint().join("other")).unwrap();
    other.write_all(b"synced by all").unwrap();
    other.sync_all().unwrap();
    assert_eq!(fs.fsync_count(), 2);
    drop((file, other));

    let lost = fs.lose_power();
    assert_eq!((lost.files, lost.bytes), (1, 12), "{lost:?}");
    assert_eq!(read(&dir.path().join("backing/synced")), b"first half;");
    assert_eq!(read(&dir.path().join("backing/other")), b"synced by all");
}

#[test]
fn reads_see_backing_content_plus_writes_at_offsets_growth_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("backing")).unwrap();
    fs::write(dir.path().join("backing/existing"), b"0123456789").unwrap();
    let fs = mounted(dir.path());
    let path = fs.mountpoint().join("existing");
    let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    file.write_all_at(b"ab", 2).unwrap();
    file.write_all_at(b"cd", 4).unwrap(); // touches the first write
    file.write_all_at(b"XY", 14).unwrap(); // past the end: a hole of zeros
    assert_eq!(read(&path), b"01abcd6789\0\0\0\0XY");
    assert_eq!(file.metadata().unwrap().len(), 16);

    // Shrinking hides backing bytes past the cut even after growing again.
    file.set_len(3).unwrap();
    assert_eq!(read(&path), b"01a");
    file.set_len(6).unwrap();
    assert_eq!(read(&path), b"01a\0\0\0");
    file.write_all_at(b"Z", 4).unwrap();
    let mut buffer = [0xFF; 4];
    file.read_exact_at(&mut buffer, 2).unwrap();
    assert_eq!(&buffer, b"a\0Z\0");
    assert_eq!(
        read(&dir.path().join("backing/existing")),
        b"0123456789",
        "nothing synced yet"
    );

    // Big sequential appends (sled's segments) through the kernel's
    // request size, read back across request boundaries.
    let big: Vec<u8> = (0..3_000_000u32).map(|n| (n % 251) as u8).collect();
    let appended = fs.mountpoint().join("appended");
    let mut log = File::create(&appended).unwrap();
    for chunk in big.chunks(300_000) {
        log.write_all(chunk).unwrap();
    }
    assert_eq!(read(&appended), big);

    file.sync_data().unwrap();
    log.sync_data().unwrap();
    drop((file, log));
    let lost = fs.lose_power();
    assert_eq!(lost.bytes, 0, "{lost:?}");
    assert_eq!(read(&dir.path().join("backing/existing")), b"01a\0Z\0");
    assert_eq!(read(&dir.path().join("backing/appended")), big);
}

#[test]
fn namespace_changes_apply_at_once_and_data_follows_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let root = fs.mountpoint().to_path_buf();
    fs::create_dir(root.join("blobs")).unwrap();
    fs::write(root.join("blobs/1"), b"blob").unwrap();
    fs::write(root.join("snap.generating"), b"snapshot").unwrap();
    File::open(root.join("snap.generating")).unwrap().sync_all().unwrap();
    fs::rename(root.join("snap.generating"), root.join("snap.1")).unwrap();
    // Unsynced data follow their file through a rename, into a directory.
    fs::write(root.join("moved"), b"unsynced").unwrap();
    fs::rename(root.join("moved"), root.join("blobs/2")).unwrap();
    assert_eq!(read(&root.join("blobs/2")), b"unsynced");
    fs::write(root.join("gone"), b"x").unwrap();
    fs::remove_file(root.join("gone")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    fs::remove_dir(root.join("empty")).unwrap();
    let mut names: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["blobs", "snap.1"]);
    File::open(&root).unwrap().sync_all().unwrap();
    assert_eq!(fs.directory_fsync_count(), 1);
    let statfs = statfs_blocks(&root);
    assert!(statfs > 0, "statfs reports the backing filesystem's size");

    fs.lose_power();
    let backing = dir.path().join("backing");
    assert_eq!(read(&backing.join("snap.1")), b"snapshot");
    assert!(!backing.join("snap.generating").exists());
    assert!(!backing.join("gone").exists() && !backing.join("empty").exists());
    assert_eq!(read(&backing.join("blobs/1")), b"", "created, never synced");
    assert_eq!(read(&backing.join("blobs/2")), b"", "renamed, never synced");
}

/// Total blocks of the filesystem at `path`, by statvfs(3).
fn statfs_blocks(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0);
    stat.f_blocks
}

#[test]
fn a_power_loss_refuses_every_later_write() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let mut file = File::create(fs.mountpoint().join("late")).unwrap();
    file.write_all(b"before").unwrap();
    let lost = fs.cut_power();
    assert_eq!(lost.bytes, 6);
    assert!(file.write_all(b"after").is_err(), "writes after the power cut fail");
    assert!(file.sync_data().is_err(), "and so do syncs");
    assert!(File::create(fs.mountpoint().join("new")).is_err(), "and new files");
    drop(file);
    fs.lose_power();
    assert_eq!(read(&dir.path().join("backing/late")), b"");
    assert!(!dir.path().join("backing/new").exists());
}

/// sled 0.34 as the outbox opens it, written through `flush()` only (the
/// gateway's durability before the fix), then a power loss: what comes
/// back is recorded, not asserted (sled's background flusher fsyncs every
/// 500 ms, so some of it usually survives, and sled may not even open).
#[test]
fn sled_after_flush_only_and_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let db = sled::Config::new()
        .path(fs.mountpoint().join("outbox"))
        .cache_capacity(16 * 1024 * 1024)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(Some(500))
        .open()
        .expect("sled opens on the crash-simulating filesystem");
    let fsyncs_at_open = fs.fsync_count();
    let mut flushed = 0u32;
    let started = Instant::now();
    let value = vec![b'v'; 300];
    // About what the gateway does: small batches, each followed by flush().
    while started.elapsed() < Duration::from_millis(1_200) {
        for _ in 0..8 {
            db.insert(flushed.to_be_bytes(), value.as_slice()).unwrap();
            flushed += 1;
        }
        db.flush().expect("flush");
    }
    let fsyncs = fs.fsync_count() - fsyncs_at_open;
    let unsynced = fs.unsynced_bytes();
    let lost = fs.cut_power();
    // The process dies here, as the gateway's does under `kill -9`. (sled's
    // drop would sync once more; when that fsync fails it panics, in
    // logger.rs, and its flusher thread logs and retries every 500 ms.)
    std::mem::forget(db);
    fs.lose_power();
    println!(
        "sled on crashfs: {flushed} keys inserted and flushed in {:?}; {fsyncs} fsyncs reached the \
         filesystem (sled's flusher); {unsynced} bytes unsynced at the power cut ({} files: {lost:?})",
        started.elapsed(),
        lost.files
    );
    assert!(flushed > 100, "the load ran");

    let backing = dir.path().join("backing/outbox");
    let mut files: Vec<String> = fs::read_dir(&backing)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            format!(
                "{} {} B",
                entry.file_name().to_string_lossy(),
                entry.metadata().unwrap().len()
            )
        })
        .collect();
    files.sort();
    // sled writes `conf` once and never syncs it: it comes back empty, and
    // sled takes an empty one for a new store's and writes it again.
    println!("the backing directory after the power loss: {}", files.join(", "));
    let reopened = std::panic::catch_unwind(|| sled::Config::new().path(&backing).open());
    match reopened {
        Ok(Ok(db)) => {
            let survived = (0..flushed)
                .filter(|key| db.contains_key(key.to_be_bytes()).unwrap())
                .count();
            let extra = db.len() - survived;
            println!(
                "sled reopened on the backing directory: {survived} of {flushed} flushed keys survived \
                 ({} lost; {extra} other keys)",
                flushed as usize - survived
            );
        }
        Ok(Err(error)) => println!("sled could not reopen the backing directory: {error}"),
        Err(_) => println!("sled panicked reopening the backing directory"),
    }
}
