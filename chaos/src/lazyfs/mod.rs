//! A FUSE layer that loses unsynced writes on a power cut, in the spirit of Jepsen's lazyfs.
//!
//! A SIGKILL keeps every write that reached the page cache, so it cannot show a node that
//! acknowledges a write before it is durable. The chaos harness mounts one [`LazyFs`] per node
//! over a backing directory, runs the node's data dir on it, and on a power cut SIGKILLs the node,
//! calls [`LazyFs::power_cut`], restarts the node on the same mount and checks that no
//! acknowledged write was lost (`run.rs` mounts one per node through the test kit's
//! `before_nodes_start`; the `power-cut-*` nemeses cut). It goes on a node's data dir
//! (`<dir>/node-N`), not on the cluster dir: the test kit rewrites `cluster.toml` for the
//! namespaces, a harness step rather than the node's disk. (`tandem up` used to write
//! `cluster.toml` and the certificates without fsync, so a cut soon after `up` left them empty;
//! it now writes them durably.)
//!
//! # What survives a cut
//! - **Data writes** land in an in-memory cache of dirty 4 KiB pages per file (`cache.rs`). Reads
//!   see the cache laid over the backing file; a file's size is the larger of the backing size
//!   and the dirty extent, after truncates.
//! - **`fsync` / `fdatasync`** of a file (FUSE `fsync`) writes its dirty pages to the backing
//!   file and fsyncs it (`fdatasync` for a datasync). A write on a handle opened with `O_SYNC` or
//!   `O_DSYNC` is synced the same way before it is acknowledged. **`fsyncdir`** fsyncs the
//!   backing dir.
//! - **`close` is not a sync**: `flush` and `release` leave the pages dirty.
//! - **`sync_file_range` is invisible** to a FUSE filesystem (the kernel does not forward it), so
//!   pages it "writes back" stay dirty here and are lost on a cut; so are writes that only
//!   `msync` or `syncfs`/`sync` would cover (`syncfs` is not forwarded either). sled's own flush
//!   uses `sync_file_range` only, which is why Tandem fdatasyncs sled's file after it.
//! - **Metadata ops pass through at once** and survive a cut: create, mkdir, unlink, rmdir,
//!   rename, symlink, truncate (setattr size, `O_TRUNC`), fallocate (hole punches too), chmod,
//!   chown, utimes. The layer models lost data, not lost directory entries. A truncate also trims
//!   (or zeroes the tail of) the cache, a rename carries the file's cache, an unlink or a rename
//!   over a file drops its cache.
//! - **`power_cut`** drops every dirty page; [`LazyFs::power_cut_torn`] keeps a seeded random
//!   subset of them (written to the backing file, as a kernel's write-back could have done in any
//!   order before the power went), like a torn write.
//! - **Bounded memory**: past `dirty_bytes_max` (default [`DIRTY_BYTES_MAX`]) the oldest dirty
//!   file is written back to its backing file *without* fsync, as a kernel's write-back would.
//!   That data then survives a cut, which a real disk allows; only what is still dirty is lost.
//!
//! # How the kernel is kept out of the way
//! Every file is opened with `FOPEN_DIRECT_IO`, so the kernel keeps no page cache for it: each
//! read and write reaches this daemon. Attributes and entries are never cached (TTL zero), so
//! sizes are right after a cut. A shared writable `mmap` of a file on the layer is not supported
//! (Tandem's nodes and sled use `pread`/`pwrite`).
//!
//! # Mounting and unmounting
//! Mounting needs root and `/dev/fuse`, nothing else: fuser mounts with mount(2) itself (no
//! libfuse, no `fusermount3`). A process that enters a new mount namespace while a layer is
//! mounted (`ip netns exec`, `unshare -m`) gets a copy of the mount, served by the same daemon:
//! a node started that way works on the layer. Such a copy also keeps the FUSE session alive
//! after [`LazyFs::unmount`]; the unmount then waits `SESSION_END_WAIT`, aborts the connection
//! through fusectl if it is mounted (`/sys/fs/fuse/connections`), and otherwise returns and
//! leaves the session to end with the copy's last holder. `chaos/examples/lazyfs.rs` mounts a
//! layer by hand, for trying things.
//!
//! Inode numbers map paths stably (`inodes.rs`). Hard links, xattrs, locks and device nodes are
//! not supported. The layer is for tests only: one mutex per file, a global one for the path
//! table.

mod cache;
mod fs;
mod inodes;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use cache::FileCache;
use inodes::Inodes;

/// Dirty bytes the layer holds before it writes back the oldest dirty file (without fsync).
pub const DIRTY_BYTES_MAX: u64 = 1 << 30;

/// How long an unmount waits for the session to end before it aborts the connection.
const SESSION_END_WAIT: Duration = Duration::from_secs(2);

/// Where fusectl, when mounted, lists FUSE connections by device number.
const FUSECTL_DIR: &str = "/sys/fs/fuse/connections";

/// Threads serving FUSE requests: an fsync in one must not stall reads and writes of others.
const FUSE_THREADS: usize = 4;

/// What a power cut lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCut {
    /// Files that had dirty pages.
    pub files: u64,
    /// Their paths relative to the mount, sorted (none for a file unlinked while open).
    pub paths: Vec<PathBuf>,
    /// Bytes of dirty pages dropped (whole pages).
    pub bytes_lost: u64,
    /// Bytes of dirty pages kept by a torn cut (written to the backing file).
    pub bytes_kept: u64,
}

/// Counters since the mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of dirty pages now (whole pages).
    pub dirty_bytes: u64,
    /// `fsync`/`fdatasync` calls on files (and syncing writes on `O_SYNC`/`O_DSYNC` handles).
    pub fsyncs: u64,
    /// `fsync` calls on directories.
    pub fsyncdirs: u64,
    /// Bytes written to backing files by fsyncs (durable).
    pub synced_bytes: u64,
    /// Bytes written to backing files because the layer was over its memory limit (not synced).
    pub written_back_bytes: u64,
    /// Power cuts so far.
    pub cuts: u64,
}

/// A mounted layer; unmounted by [`LazyFs::unmount`] or on drop.
pub struct LazyFs {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    /// The connection's number under fusectl: the mount's device number, as the kernel packs it.
    connection: u64,
    session: Option<fuser::BackgroundSession>,
}

impl LazyFs {
    /// Mounts a layer at `mountpoint` over `backing` (both existing dirs) and serves it on
    /// background threads.
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<LazyFs> {
        LazyFs::mount_with_limit(backing, mountpoint, DIRTY_BYTES_MAX)
    }

    /// [`LazyFs::mount`] with a memory limit of `dirty_bytes_max` dirty bytes.
    pub fn mount_with_limit(backing: &Path, mountpoint: &Path, dirty_bytes_max: u64) -> anyhow::Result<LazyFs> {
        let backing = backing.canonicalize().with_context(|| format!("backing dir {}", backing.display()))?;
        anyhow::ensure!(backing.is_dir(), "backing {} is not a dir", backing.display());
        anyhow::ensure!(mountpoint.is_dir(), "mountpoint {} is not a dir", mountpoint.display());
        let shared = Arc::new(Shared::new(backing.clone(), dirty_bytes_max));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("lazyfs:{}", backing.display())),
            fuser::MountOption::Subtype("lazyfs".to_string()),
            fuser::MountOption::NoAtime,
        ];
        config.n_threads = Some(FUSE_THREADS);
        let session = fuser::spawn_mount(fs::Server(shared.clone()), mountpoint, &config)
            .with_context(|| format!("mount lazyfs at {}", mountpoint.display()))?;
        let mountpoint = mountpoint.canonicalize()?;
        let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&mountpoint)?);
        let connection = (libc::major(dev) as u64) << 20 | libc::minor(dev) as u64;
        Ok(LazyFs { shared, mountpoint, connection, session: Some(session) })
    }

    /// Where the layer is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Drops every write not yet fsynced. The caller has already SIGKILLed the processes using
    /// the layer (a write racing the cut may land on either side of it).
    pub fn power_cut(&self) -> PowerCut {
        self.shared.cut(|_, _| false)
    }

    /// Like [`LazyFs::power_cut`], but each dirty page survives with probability one half
    /// (seeded): it is written to the backing file, as a kernel's write-back could have done in
    /// any order before the power went.
    pub fn power_cut_torn(&self, seed: u64) -> PowerCut {
        let mut rng = SplitMix64(seed);
        self.shared.cut(move |_, _| rng.next() & 1 == 1)
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            dirty_bytes: s.dirty_bytes.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsyncdirs: s.fsyncdirs.load(Ordering::Relaxed),
            synced_bytes: s.synced_bytes.load(Ordering::Relaxed),
            written_back_bytes: s.written_back_bytes.load(Ordering::Relaxed),
            cuts: s.cuts.load(Ordering::Relaxed),
        }
    }

    /// Unmounts (lazily if the mount is still busy) and stops serving. Dirty data is dropped, as
    /// on a cut.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> anyhow::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                // Something still uses the mount: detach it now; the kernel ends the session once
                // the last user is gone.
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .with_context(|| format!("lazy unmount {}", self.mountpoint.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("unmount {}", self.mountpoint.display())),
        }
        // The session ends when the kernel lets go of the filesystem, which a copy of the mount
        // in another mount namespace (a process started by `ip netns exec` or `unshare -m` while
        // the layer was mounted) delays until that process exits. Then abort the connection
        // (when fusectl is mounted), and failing that leave the threads to end on their own.
        if !wait_finished(&session, SESSION_END_WAIT) {
            let abort = Path::new(FUSECTL_DIR).join(self.connection.to_string()).join("abort");
            if std::fs::write(&abort, "1").is_err() || !wait_finished(&session, SESSION_END_WAIT) {
                eprintln!(
                    "lazyfs: {} is unmounted here but still held elsewhere (another mount namespace?); \
                     its session ends when the last holder goes",
                    self.mountpoint.display()
                );
                // Not dropped: fuser would try to unmount the mountpoint again, and so perhaps a
                // newer mount there.
                std::mem::forget(session);
                return Ok(());
            }
        }
        session.join().context("lazyfs session thread")?;
        Ok(())
    }
}

/// Polls until the session's threads have ended, for at most `wait`.
fn wait_finished(session: &fuser::BackgroundSession, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while !session.guard.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            eprintln!("lazyfs: {e:#}");
        }
    }
}

/// The layer's state, shared by the FUSE threads and the [`LazyFs`] handle.
pub(crate) struct Shared {
    backing: PathBuf,
    dirty_bytes_max: u64,
    inodes: Mutex<Inodes>,
    /// Per inode. Lock order: `inodes`, `caches`, one `FileCache`; `inodes` is only held for
    /// path-table updates and the backing-dir op they mirror.
    caches: Mutex<HashMap<u64, Arc<Mutex<FileCache>>>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    write_seq: AtomicU64,
    dirty_bytes: AtomicU64,
    fsyncs: AtomicU64,
    fsyncdirs: AtomicU64,
    synced_bytes: AtomicU64,
    written_back_bytes: AtomicU64,
    cuts: AtomicU64,
}

/// An open file: the backing descriptor (read-write when the open allowed writing).
#[derive(Clone)]
pub(crate) struct Handle {
    ino: u64,
    file: Arc<File>,
    /// Opened with `O_SYNC` or `O_DSYNC`: each write is synced before it is acknowledged.
    sync_writes: bool,
}

impl Shared {
    fn new(backing: PathBuf, dirty_bytes_max: u64) -> Shared {
        Shared {
            backing,
            dirty_bytes_max,
            inodes: Mutex::new(Inodes::new()),
            caches: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            write_seq: AtomicU64::new(1),
            dirty_bytes: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsyncdirs: AtomicU64::new(0),
            synced_bytes: AtomicU64::new(0),
            written_back_bytes: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
        }
    }

    fn cut(&self, mut keep: impl FnMut(u64, u64) -> bool) -> PowerCut {
        let caches: Vec<(u64, Arc<Mutex<FileCache>>)> =
            lock(&self.caches).iter().map(|(&ino, c)| (ino, c.clone())).collect();
        let mut cut = PowerCut::default();
        for (ino, cache) in caches {
            let path = lock(&self.inodes).path(ino).map(Path::to_path_buf);
            let mut cache = lock(&cache);
            if !cache.is_dirty() {
                continue;
            }
            cut.files += 1;
            cut.paths.extend(path);
            let bytes = cache.dirty_bytes();
            match cache.write_back(|page| keep(ino, page)) {
                Ok((written, dropped)) => {
                    cut.bytes_kept += written;
                    cut.bytes_lost += dropped;
                }
                Err(e) => {
                    eprintln!("lazyfs: torn write-back of inode {ino}: {e}");
                    cut.bytes_lost += cache.discard();
                }
            }
            self.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        self.cuts.fetch_add(1, Ordering::Relaxed);
        cut.paths.sort();
        cut
    }
}

/// A poisoned lock means a FUSE thread panicked mid-op: a bug, so crash loudly.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("lazyfs lock poisoned")
}

/// A small seeded generator for torn cuts (no dependency for one coin per page).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
