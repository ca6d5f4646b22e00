//! A crash-simulating filesystem for tests: a FUSE filesystem, served by
//! threads of the test binary itself (the `fuser` crate), that mirrors a
//! backing directory and keeps only what was synced, like LazyFS.
//!
//! # Model
//!
//! - **Namespace operations** (create, mkdir, unlink, rmdir, rename, chmod,
//!   chown, utimes) are applied to the backing directory at once, and so
//!   survive a power loss whether or not the directory was synced.
//! - **File data and size** (writes, writes past the end, truncate /
//!   `set_len`, `fallocate`) are kept in memory per file, as an overlay over
//!   the backing file's content. Reads, `stat` and `statfs` see backing
//!   content plus overlay.
//! - A file's overlay reaches its backing file only when that file is
//!   `fsync`'ed or `fdatasync`'ed (the FUSE `fsync` request, from any open
//!   handle of the file): then it is written into the backing file and the
//!   backing file is synced. `sync_file_range` never reaches a FUSE daemon,
//!   and `close` syncs nothing.
//! - [`CrashFs::lose_power`] (or [`CrashFs::cut_power`], then unmounting)
//!   forgets every overlay, refuses every later write, sync and namespace
//!   change with `EIO`, and unmounts: the backing directory then holds
//!   exactly what was synced. Dropping a [`CrashFs`] does the same. A mount
//!   with files still open on it is aborted (those files then fail with
//!   `ENOTCONN`, as on a dead disk) and detached.
//!
//! # What it leaves to the kernel
//!
//! Writes are write-through (no writeback cache is requested), so every
//! `write` reaches the daemon before it returns; attribute and entry TTLs
//! are zero, so `stat` always asks the daemon. Locks are the kernel's: the
//! daemon claims no POSIX or `flock` support, so sled's `flock` on `db`
//! works as on a local filesystem (one process only). There are no
//! symlinks or hard links, and `fallocate` supports mode 0 only (sled 0.34
//! never calls it; `std::fs::File::set_len` is `ftruncate`).
//!
//! The mount needs `/dev/fuse`; as root the filesystem is mounted with
//! `mount(2)`, otherwise through `fusermount3` from Debian's `fuse3`
//! (`scripts/test` installs it). Both are required: a machine without them
//! fails the test with a message saying so rather than skipping it.

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nothing is cached by the kernel beyond one request.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// A mounted crash-simulating filesystem; see the module comment.
pub struct CrashFs {
    shared: Arc<Shared>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    backing: PathBuf,
    /// `/sys/fs/fuse/connections/N/abort` for this mount.
    abort: PathBuf,
}

/// What a power loss took: the unsynced overlays it dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerLoss {
    pub files: usize,
    pub bytes: u64,
}

impl CrashFs {
    /// Mounts a crash-simulating view of `backing` at `mountpoint` (both
    /// are created if missing). Panics with the reason when FUSE is not
    /// available.
    pub fn mount(backing: &Path, mountpoint: &Path) -> CrashFs {
        require_fuse();
        fs::create_dir_all(backing).unwrap();
        fs::create_dir_all(mountpoint).unwrap();
        let backing = backing.canonicalize().unwrap();
        let mountpoint = mountpoint.canonicalize().unwrap();
        let shared = Arc::new(Shared {
            root: backing.clone(),
            state: Mutex::new(State::new()),
            fsyncs: AtomicU64::new(0),
            directory_fsyncs: AtomicU64::new(0),
        });
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("crashfs".into()),
            MountOption::Subtype("crashfs".into()),
            MountOption::DefaultPermissions,
        ];
        // The gateway's sled writes from several threads at once.
        config.n_threads = Some(4);
        let session =
            fuser::spawn_mount(Daemon { shared: shared.clone() }, &mountpoint, &config).unwrap_or_else(|error| {
                panic!(
                    "crashfs: mounting FUSE at {} failed: {error} (needs /dev/fuse, root or fusermount3 from fuse3)",
                    mountpoint.display()
                )
            });
        // The kernel names the connection by the mount's device number.
        let device = fs::metadata(&mountpoint).unwrap().dev();
        let connection = (u64::from(libc::major(device)) << 20) | u64::from(libc::minor(device));
        CrashFs {
            shared,
            session: Some(session),
            mountpoint,
            backing,
            abort: Path::new(FUSE_CONNECTIONS).join(connection.to_string()).join("abort"),
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// `fsync`/`fdatasync` requests seen on files (each one made that
    /// file's overlay durable).
    pub fn fsync_count(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::SeqCst)
    }

    /// `fsync` requests seen on directories (nothing to do in this model:
    /// namespace changes are durable at once).
    pub fn directory_fsync_count(&self) -> u64 {
        self.shared.directory_fsyncs.load(Ordering::SeqCst)
    }

    /// Bytes written and not yet synced, over all files.
    pub fn unsynced_bytes(&self) -> u64 {
        self.shared
            .lock()
            .nodes
            .values()
            .filter_map(|node| node.overlay.as_ref())
            .map(Overlay::bytes)
            .sum()
    }

    /// The instant of a power loss: forgets every unsynced overlay, and
    /// from now on refuses writes, syncs and namespace changes with `EIO`
    /// (reads still see the backing directory). The filesystem stays
    /// mounted, so a process that still has files open on it can be
    /// stopped before [`CrashFs::lose_power`] unmounts. A second call
    /// drops nothing.
    pub fn cut_power(&self) -> PowerLoss {
        let mut state = self.shared.lock();
        let mut lost = PowerLoss::default();
        if !state.powered {
            return lost;
        }
        state.powered = false;
        for node in state.nodes.values_mut() {
            if let Some(overlay) = node.overlay.take() {
                lost.files += 1;
                lost.bytes += overlay.bytes();
            }
        }
        lost
    }

    /// [`CrashFs::cut_power`], then unmounts: the backing directory holds
    /// exactly what was synced.
    pub fn lose_power(mut self) -> PowerLoss {
        let lost = self.cut_power();
        self.unmount();
        lost
    }

    fn unmount(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if let Err(error) = session.umount_and_join() {
            // Busy: a file is still open on it. Abort the connection, as a
            // dead disk: every request on those files now fails with
            // ENOTCONN. (Only detaching would leave them waiting on this
            // process's daemon threads, and a process that exits with a
            // file open on its own mount then hangs closing it.)
            eprintln!(
                "crashfs: {} is busy ({error}): aborting its FUSE connection",
                self.mountpoint.display()
            );
            if let Err(error) = fs::write(&self.abort, "1") {
                eprintln!("crashfs: could not abort through {}: {error}", self.abort.display());
            }
            let path = CString::new(self.mountpoint.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        self.cut_power();
        self.unmount();
    }
}

const FUSE_CONNECTIONS: &str = "/sys/fs/fuse/connections";

/// Fails (never skips) when this machine cannot mount FUSE; mounts the
/// FUSE control filesystem (to abort a busy mount) when it is not there.
fn require_fuse() {
    let hint = "install Debian's fuse3 (apt-get install -y fuse3; scripts/test does it in ensure_fuse) \
                on a machine with the FUSE kernel module";
    let ci = std::env::var("CI").map(|value| value == "true").unwrap_or(false);
    let whose = if ci { "CI's machine" } else { "this machine" };
    assert!(
        Path::new("/dev/fuse").exists(),
        "crashfs: /dev/fuse is missing on {whose}: the power-loss tests cannot run; {hint}"
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    let fusermount = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .any(|dir| dir.join("fusermount3").is_file() || dir.join("fusermount").is_file());
    assert!(
        fusermount,
        "crashfs: neither fusermount3 nor fusermount is on {whose}'s PATH; {hint}"
    );
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(FUSE_CONNECTIONS))
    {
        let fusectl = CString::new("fusectl").unwrap();
        let target = CString::new(FUSE_CONNECTIONS).unwrap();
        // SAFETY: valid NUL-terminated strings and no data. Two tests may
        // race here: the loser gets EBUSY, which is fine.
        let mounted = unsafe { libc::mount(fusectl.as_ptr(), target.as_ptr(), fusectl.as_ptr(), 0, std::ptr::null()) };
        let error = io::Error::last_os_error();
        assert!(
            mounted == 0 || error.raw_os_error() == Some(libc::EBUSY),
            "crashfs: mounting the FUSE control filesystem at {FUSE_CONNECTIONS} failed on {whose}: {error}"
        );
    }
}

struct Shared {
    root: PathBuf,
    state: Mutex<State>,
    fsyncs: AtomicU64,
    directory_fsyncs: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every operation runs under this one lock, the backing directory's
/// changes included, so a power cut falls between two operations.
struct State {
    powered: bool,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
}

struct Node {
    /// Relative to the backing root ("" for the root); `None` once
    /// unlinked or replaced (while it is still open).
    path: Option<PathBuf>,
    /// The backing file, opened while the file is open (or to sync it).
    file: Option<Arc<File>>,
    opens: u64,
    /// Unsynced data and size; `None` when the backing file is current.
    overlay: Option<Overlay>,
}

impl State {
    fn new() -> State {
        let mut state = State {
            powered: true,
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: ROOT + 1,
        };
        state.nodes.insert(
            ROOT,
            Node {
                path: Some(PathBuf::new()),
                file: None,
                opens: 0,
                overlay: None,
            },
        );
        state.by_path.insert(PathBuf::new(), ROOT);
        state
    }

    fn ino_for(&mut self, path: &Path) -> u64 {
        if let Some(ino) = self.by_path.get(path) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_path.insert(path.to_path_buf(), ino);
        self.nodes.insert(
            ino,
            Node {
                path: Some(path.to_path_buf()),
                file: None,
                opens: 0,
                overlay: None,
            },
        );
        ino
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino.0)
            .and_then(|node| node.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn node(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    fn check_powered(&self) -> Result<(), Errno> {
        if self.powered {
            Ok(())
        } else {
            Err(Errno::EIO)
        }
    }

    /// The name at `path` is gone (unlinked, or replaced by a rename).
    fn detach(&mut self, path: &Path) {
        if let Some(ino) = self.by_path.remove(path) {
            let node = self.nodes.get_mut(&ino).unwrap();
            node.path = None;
            if node.opens == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// `from` and everything under it now live at `to`.
    fn moved(&mut self, from: &Path, to: &Path) {
        let moving: Vec<PathBuf> = self
            .by_path
            .keys()
            .filter(|path| path.starts_with(from))
            .cloned()
            .collect();
        for old in moving {
            let ino = self.by_path.remove(&old).unwrap();
            // (joining an empty rest would add a trailing slash)
            let rest = old.strip_prefix(from).unwrap();
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.nodes.get_mut(&ino).unwrap().path = Some(new.clone());
            self.by_path.insert(new, ino);
        }
    }
}

impl Node {
    fn open_backing(&mut self, root: &Path) -> io::Result<Arc<File>> {
        if let Some(file) = &self.file {
            return Ok(file.clone());
        }
        let path = root.join(
            self.path
                .as_ref()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?,
        );
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(_) => File::open(&path)?,
        };
        let file = Arc::new(file);
        self.file = Some(file.clone());
        Ok(file)
    }

    fn metadata(&self, root: &Path) -> io::Result<fs::Metadata> {
        match (&self.path, &self.file) {
            (Some(path), _) => fs::symlink_metadata(root.join(path)),
            (None, Some(file)) => file.metadata(),
            (None, None) => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    /// The overlay, started from the backing file's current size.
    fn overlay(&mut self, root: &Path) -> io::Result<&mut Overlay> {
        if self.overlay.is_none() {
            let size = self.metadata(root)?.len();
            self.overlay = Some(Overlay {
                extents: BTreeMap::new(),
                size,
                keep: size,
                mtime: SystemTime::now(),
            });
        }
        Ok(self.overlay.as_mut().unwrap())
    }

    fn attr(&self, ino: u64, root: &Path) -> io::Result<FileAttr> {
        let metadata = self.metadata(root)?;
        let kind = FileType::from_std(metadata.file_type()).unwrap_or(FileType::RegularFile);
        let (size, blocks, mtime) = match &self.overlay {
            Some(overlay) => (overlay.size, overlay.size.div_ceil(512), overlay.mtime),
            None => (
                metadata.len(),
                metadata.blocks(),
                metadata.modified().unwrap_or(UNIX_EPOCH),
            ),
        };
        let ctime = UNIX_EPOCH + Duration::new(metadata.ctime().max(0) as u64, metadata.ctime_nsec() as u32);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: metadata.accessed().unwrap_or(UNIX_EPOCH),
            mtime,
            ctime,
            crtime: metadata.created().unwrap_or(UNIX_EPOCH),
            kind,
            perm: (metadata.mode() & 0o7777) as u16,
            nlink: metadata.nlink() as u32,
            uid: metadata.uid(),
            gid: metadata.gid(),
            rdev: metadata.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }
}

/// One file's unsynced writes and size.
struct Overlay {
    /// Written ranges, non-overlapping and not touching, by offset.
    extents: BTreeMap<u64, Vec<u8>>,
    /// The file's size as the mount shows it.
    size: u64,
    /// Backing bytes at or past this offset no longer count (the file was
    /// truncated to it and maybe grown again: they read as zeros).
    keep: u64,
    mtime: SystemTime,
}

impl Overlay {
    fn bytes(&self) -> u64 {
        self.extents.values().map(|extent| extent.len() as u64).sum()
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.mtime = SystemTime::now();
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        self.size = self.size.max(end);
        // Merge with every extent that overlaps or touches [offset, end),
        // reusing the first one's buffer so that appends stay cheap.
        let mut start = offset;
        if let Some((&before, extent)) = self.extents.range(..=offset).next_back() {
            if before + extent.len() as u64 >= offset {
                start = before;
            }
        }
        let keys: Vec<u64> = self.extents.range(start..=end).map(|(&key, _)| key).collect();
        let merged_end = keys
            .iter()
            .map(|key| key + self.extents[key].len() as u64)
            .fold(end, u64::max);
        let reuse = keys.first() == Some(&start);
        let mut buffer = if reuse {
            self.extents.remove(&start).unwrap()
        } else {
            Vec::new()
        };
        buffer.resize((merged_end - start) as usize, 0);
        for key in keys.iter().skip(usize::from(reuse)) {
            let extent = self.extents.remove(key).unwrap();
            let at = (key - start) as usize;
            buffer[at..at + extent.len()].copy_from_slice(&extent);
        }
        let at = (offset - start) as usize;
        buffer[at..at + data.len()].copy_from_slice(data);
        self.extents.insert(start, buffer);
    }

    fn set_size(&mut self, size: u64) {
        self.mtime = SystemTime::now();
        if size < self.size {
            let cut: Vec<u64> = self.extents.range(size..).map(|(&key, _)| key).collect();
            for key in cut {
                self.extents.remove(&key);
            }
            if let Some((&key, extent)) = self.extents.range_mut(..size).next_back() {
                if key + extent.len() as u64 > size {
                    extent.truncate((size - key) as usize);
                }
            }
            self.keep = self.keep.min(size);
        }
        self.size = size;
    }

    fn read(&self, backing: &File, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        let end = (offset + u64::from(length)).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buffer = vec![0; (end - offset) as usize];
        let from_backing = end.min(self.keep).saturating_sub(offset) as usize;
        read_at_most(backing, &mut buffer[..from_backing], offset)?;
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .map(|(&key, _)| key)
            .unwrap_or(offset);
        for (&key, extent) in self.extents.range(first..end) {
            let from = key.max(offset);
            let to = (key + extent.len() as u64).min(end);
            if from < to {
                buffer[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&extent[(from - key) as usize..(to - key) as usize]);
            }
        }
        Ok(buffer)
    }

    /// Writes the overlay into the backing file (not yet synced).
    fn apply(&self, backing: &File) -> io::Result<()> {
        if backing.metadata()?.len() > self.keep {
            backing.set_len(self.keep)?;
        }
        for (&offset, extent) in &self.extents {
            backing.write_all_at(extent, offset)?;
        }
        if backing.metadata()?.len() != self.size {
            backing.set_len(self.size)?;
        }
        Ok(())
    }
}

/// Reads into `buffer` from `offset` until it is full or the file ends
/// (the rest stays as it was); returns how many bytes were read.
fn read_at_most(file: &File, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(done)
}

fn errno(error: io::Error) -> Errno {
    Errno::from(error)
}

/// The FUSE side: every request is answered from [`Shared`].
struct Daemon {
    shared: Arc<Shared>,
}

impl Daemon {
    fn root(&self) -> &Path {
        &self.shared.root
    }

    fn entry(&self, state: &mut State, path: &Path) -> Result<FileAttr, Errno> {
        let ino = state.ino_for(path);
        state.nodes[&ino].attr(ino, self.root()).map_err(errno)
    }

    fn lookup_inner(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut state = self.shared.lock();
        let path = state.path_of(parent)?.join(name);
        fs::symlink_metadata(self.root().join(&path)).map_err(errno)?;
        self.entry(&mut state, &path)
    }

    fn read_inner(&self, ino: INodeNo, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let mut state = self.shared.lock();
        let root = self.shared.root.clone();
        let node = state.node(ino)?;
        let file = node.open_backing(&root).map_err(errno)?;
        match &node.overlay {
            Some(overlay) => overlay.read(&file, offset, size).map_err(errno),
            None => {
                let mut buffer = vec![0; size as usize];
                let done = read_at_most(&file, &mut buffer, offset).map_err(errno)?;
                buffer.truncate(done);
                Ok(buffer)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr_inner(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let mut state = self.shared.lock();
        let changes = mode.is_some() || uid.is_some() || gid.is_some() || size.is_some();
        if changes || atime.is_some() || mtime.is_some() {
            state.check_powered()?;
        }
        let root = self.shared.root.clone();
        let node = state.node(ino)?;
        if let Some(size) = size {
            node.overlay(&root).map_err(errno)?.set_size(size);
        }
        let backing = node.path.as_ref().map(|path| root.join(path));
        if let Some(mode) = mode {
            let permissions = fs::Permissions::from_mode(mode & 0o7777);
            match (&backing, &node.file) {
                (Some(path), _) => fs::set_permissions(path, permissions),
                (None, Some(file)) => file.set_permissions(permissions),
                (None, None) => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
            .map_err(errno)?;
        }
        if uid.is_some() || gid.is_some() {
            match (&backing, &node.file) {
                (Some(path), _) => std::os::unix::fs::lchown(path, uid, gid),
                (None, Some(file)) => std::os::unix::fs::fchown(file, uid, gid),
                (None, None) => Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
            .map_err(errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            let resolve = |time: TimeOrNow| match time {
                TimeOrNow::SpecificTime(time) => time,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut times = fs::FileTimes::new();
            if let Some(atime) = atime {
                times = times.set_accessed(resolve(atime));
            }
            if let Some(mtime) = mtime {
                let mtime = resolve(mtime);
                times = times.set_modified(mtime);
                if let Some(overlay) = &mut node.overlay {
                    overlay.mtime = mtime;
                }
            }
            let file = match (&backing, &node.file) {
                (_, Some(file)) => file.clone(),
                (Some(path), None) => Arc::new(File::open(path).map_err(errno)?),
                (None, None) => return Err(Errno::ENOENT),
            };
            file.set_times(times).map_err(errno)?;
        }
        node.attr(ino.0, &root).map_err(errno)
    }

    fn create_inner(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<FileAttr, Errno> {
        let mut state = self.shared.lock();
        state.check_powered()?;
        let path = state.path_of(parent)?.join(name);
        let mut options = OpenOptions::new();
        options.read(true).write(true).mode(mode & !umask & 0o7777);
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        } else {
            options.create(true);
        }
        let file = options.open(self.root().join(&path)).map_err(errno)?;
        let ino = state.ino_for(&path);
        let node = state.nodes.get_mut(&ino).unwrap();
        if node.file.is_none() {
            node.file = Some(Arc::new(file));
        }
        node.opens += 1;
        node.attr(ino, self.root()).map_err(errno)
    }

    fn mknod_inner(&self, parent: INodeNo, name: &OsStr, mode: u32, umask: u32) -> Result<FileAttr, Errno> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EPERM);
        }
        let mut state = self.shared.lock();
        state.check_powered()?;
        let path = state.path_of(parent)?.join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & !umask & 0o7777)
            .open(self.root().join(&path))
            .map_err(errno)?;
        self.entry(&mut state, &path)
    }

    fn mkdir_inner(&self, parent: INodeNo, name: &OsStr, mode: u32, umask: u32) -> Result<FileAttr, Errno> {
        let mut state = self.shared.lock();
        state.check_powered()?;
        let path = state.path_of(parent)?.join(name);
        fs::DirBuilder::new()
            .mode(mode & !umask & 0o7777)
            .create(self.root().join(&path))
            .map_err(errno)?;
        self.entry(&mut state, &path)
    }

    fn remove_inner(&self, parent: INodeNo, name: &OsStr, directory: bool) -> Result<(), Errno> {
        let mut state = self.shared.lock();
        state.check_powered()?;
        let path = state.path_of(parent)?.join(name);
        let backing = self.root().join(&path);
        if directory {
            fs::remove_dir(backing).map_err(errno)?;
        } else {
            fs::remove_file(backing).map_err(errno)?;
        }
        state.detach(&path);
        Ok(())
    }

    fn rename_inner(
        &self,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let mut state = self.shared.lock();
        state.check_powered()?;
        let from = state.path_of(parent)?.join(name);
        let to = state.path_of(new_parent)?.join(new_name);
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) && fs::symlink_metadata(self.root().join(&to)).is_ok() {
            return Err(Errno::EEXIST);
        }
        fs::rename(self.root().join(&from), self.root().join(&to)).map_err(errno)?;
        if from != to {
            state.detach(&to);
            state.moved(&from, &to);
        }
        Ok(())
    }

    fn open_inner(&self, ino: INodeNo) -> Result<(), Errno> {
        let mut state = self.shared.lock();
        let root = self.shared.root.clone();
        let node = state.node(ino)?;
        node.open_backing(&root).map_err(errno)?;
        node.opens += 1;
        Ok(())
    }

    fn write_inner(&self, ino: INodeNo, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let mut state = self.shared.lock();
        state.check_powered()?;
        let root = self.shared.root.clone();
        state.node(ino)?.overlay(&root).map_err(errno)?.write(offset, data);
        Ok(())
    }

    fn fsync_inner(&self, ino: INodeNo, datasync: bool) -> Result<(), Errno> {
        self.shared.fsyncs.fetch_add(1, Ordering::SeqCst);
        let file = {
            let mut state = self.shared.lock();
            state.check_powered()?;
            let root = self.shared.root.clone();
            let node = state.node(ino)?;
            let file = node.open_backing(&root).map_err(errno)?;
            if let Some(overlay) = &node.overlay {
                overlay.apply(&file).map_err(errno)?;
            }
            node.overlay = None;
            if node.opens == 0 {
                node.file = None;
            }
            file
        };
        // The data are in the backing file now (which does not lose
        // power); syncing it too keeps the test honest on a real crash.
        if datasync { file.sync_data() } else { file.sync_all() }.map_err(errno)
    }

    fn fsyncdir_inner(&self, ino: INodeNo) -> Result<(), Errno> {
        self.shared.directory_fsyncs.fetch_add(1, Ordering::SeqCst);
        let path = {
            let state = self.shared.lock();
            state.check_powered()?;
            self.root().join(state.path_of(ino)?)
        };
        File::open(path)
            .and_then(|directory| directory.sync_all())
            .map_err(errno)
    }

    fn fallocate_inner(&self, ino: INodeNo, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if mode != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut state = self.shared.lock();
        state.check_powered()?;
        let root = self.shared.root.clone();
        let overlay = state.node(ino)?.overlay(&root).map_err(errno)?;
        if offset + length > overlay.size {
            overlay.set_size(offset + length);
        }
        Ok(())
    }

    fn readdir_inner(&self, ino: INodeNo) -> Result<Vec<(u64, FileType, std::ffi::OsString)>, Errno> {
        let mut state = self.shared.lock();
        let path = state.path_of(ino)?;
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut entries = vec![
            (ino.0, FileType::Directory, ".".into()),
            (state.ino_for(&parent), FileType::Directory, "..".into()),
        ];
        let mut names = Vec::new();
        for entry in fs::read_dir(self.root().join(&path)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let kind = entry
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            names.push((entry.file_name(), kind));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            let child = state.ino_for(&path.join(&name));
            entries.push((child, kind, name));
        }
        Ok(entries)
    }

    fn statfs_inner(&self) -> Result<libc::statvfs, Errno> {
        let path = CString::new(self.root().as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
        // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        Ok(stat)
    }
}

impl Filesystem for Daemon {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_inner(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let state = self.shared.lock();
        match state.nodes.get(&ino.0) {
            Some(node) => match node.attr(ino.0, self.root()) {
                Ok(attr) => reply.attr(&TTL, &attr),
                Err(error) => reply.error(errno(error)),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.setattr_inner(ino, mode, uid, gid, size, atime, mtime) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let path = self.shared.lock().path_of(ino);
        match path.and_then(|path| fs::read_link(self.root().join(path)).map_err(errno)) {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(error) => reply.error(error),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.mknod_inner(parent, name, mode, umask) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.mkdir_inner(parent, name, mode, umask) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove_inner(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove_inner(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.rename_inner(parent, name, newparent, newname, flags) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_inner(ino) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(error) => reply.error(error),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_inner(ino, offset, size) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(error),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_inner(ino, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(error) => reply.error(error),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = self.shared.lock();
        if let Some(node) = state.nodes.get_mut(&ino.0) {
            node.opens = node.opens.saturating_sub(1);
            if node.opens == 0 {
                node.file = None;
                if node.path.is_none() {
                    state.nodes.remove(&ino.0);
                }
            }
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.fsync_inner(ino, datasync) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.readdir_inner(ino) {
            Ok(entries) => {
                for (index, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), (index + 1) as u64, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(error) => reply.error(error),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fsyncdir_inner(ino) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs_inner() {
            Ok(stat) => reply.statfs(
                stat.f_blocks,
                stat.f_bfree,
                stat.f_bavail,
                stat.f_files,
                stat.f_ffree,
                stat.f_bsize as u32,
                stat.f_namemax as u32,
                stat.f_frsize as u32,
            ),
            Err(error) => reply.error(error),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.shared.lock().path_of(ino) {
            Ok(_) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_inner(parent, name, mode, umask, flags) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(error) => reply.error(error),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fallocate_inner(ino, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }
}
