//! The FUSE operations: metadata passes through to the backing dir, data goes through the
//! per-file caches of `cache.rs`.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::cache::{read_at_full, FileCache};
use super::{lock, Handle, Shared};

/// Nothing is cached by the kernel: sizes change behind its back on a power cut.
const TTL: Duration = Duration::ZERO;

/// Largest read served at once (the kernel asks for at most `max_pages` pages anyway).
const READ_BYTES_MAX: u32 = 16 << 20;

pub(crate) struct Server(pub(crate) Arc<Shared>);

type OpResult<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

impl Shared {
    fn path_of(&self, ino: INodeNo) -> OpResult<PathBuf> {
        lock(&self.inodes).path(ino.0).map(Path::to_path_buf).ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> OpResult<PathBuf> {
        Ok(self.path_of(parent)?.join(name))
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }

    fn cache(&self, ino: u64) -> Option<Arc<Mutex<FileCache>>> {
        lock(&self.caches).get(&ino).cloned()
    }

    fn cache_or_new(&self, ino: u64) -> Arc<Mutex<FileCache>> {
        lock(&self.caches).entry(ino).or_default().clone()
    }

    /// Drops the dirty pages of an inode whose file is gone. The (empty) cache stays in the map:
    /// a handle still open on the unlinked file may write again, and a cut must see that.
    fn forget_cache(&self, ino: u64) {
        if let Some(cache) = self.cache(ino) {
            let bytes = lock(&cache).discard();
            self.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    fn handle(&self, fh: FileHandle) -> OpResult<Handle> {
        lock(&self.handles).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, handle);
        FileHandle(fh)
    }

    /// Attributes of `rel` as readers see them (the size includes dirty pages).
    fn attr(&self, ino: u64, meta: &fs::Metadata) -> FileAttr {
        let mut size = meta.len();
        if meta.is_file() {
            if let Some(cache) = self.cache(ino) {
                size = lock(&cache).size(size);
            }
        }
        let time = |secs: i64, nsecs: i64| {
            if secs >= 0 {
                UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
            } else {
                UNIX_EPOCH
            }
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512).max(meta.blocks()),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: time(meta.ctime(), meta.ctime_nsec()),
            kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: super::cache::PAGE_BYTES as u32,
            flags: 0,
        }
    }

    /// Looks `rel` up in the backing dir and gives it a number.
    fn entry(&self, rel: &Path) -> OpResult<FileAttr> {
        let meta = fs::symlink_metadata(self.full(rel)).map_err(errno)?;
        let ino = lock(&self.inodes).ino_of(rel);
        Ok(self.attr(ino, &meta))
    }

    fn getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> OpResult<FileAttr> {
        match self.path_of(ino) {
            Ok(rel) => match fs::symlink_metadata(self.full(&rel)) {
                Ok(meta) => return Ok(self.attr(ino.0, &meta)),
                Err(e) if fh.is_none() => return Err(errno(e)),
                Err(_) => {}
            },
            Err(e) if fh.is_none() => return Err(e),
            Err(_) => {}
        }
        // Unlinked but still open.
        let handle = self.handle(fh.expect("checked above"))?;
        let meta = handle.file.metadata().map_err(errno)?;
        Ok(self.attr(ino.0, &meta))
    }

    fn open_backing(&self, ino: INodeNo, flags: i32, create_mode: Option<(&Path, u32)>) -> OpResult<Handle> {
        let acc = flags & libc::O_ACCMODE;
        let mut options = OpenOptions::new();
        options.read(true);
        // Writable handles are opened read-write: a partial-page write reads the rest of the page.
        options.write(acc != libc::O_RDONLY);
        // O_APPEND would make our pwrite ignore its offset; O_DIRECT would want aligned buffers;
        // O_SYNC/O_DSYNC are honored by syncing after each write.
        let passed = flags
            & !(libc::O_ACCMODE
                | libc::O_APPEND
                | libc::O_DIRECT
                | libc::O_SYNC
                | libc::O_DSYNC
                | libc::O_CREAT
                | libc::O_EXCL
                | libc::O_TRUNC);
        options.custom_flags(passed);
        let path = match create_mode {
            Some((rel, mode)) => {
                options.create(true).mode(mode);
                if flags & libc::O_EXCL != 0 {
                    options.create_new(true);
                }
                self.full(rel)
            }
            None => self.full(&self.path_of(ino)?),
        };
        if flags & libc::O_TRUNC != 0 && acc != libc::O_RDONLY {
            options.truncate(true);
        }
        let file = options.open(path).map_err(errno)?;
        let sync_writes = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        Ok(Handle { ino: ino.0, file: Arc::new(file), sync_writes })
    }

    fn read(&self, fh: FileHandle, offset: u64, size: u32) -> OpResult<Vec<u8>> {
        let handle = self.handle(fh)?;
        let size = size.min(READ_BYTES_MAX) as u64;
        let cache = self.cache(handle.ino);
        let guard = cache.as_ref().map(|c| lock(c));
        let backing_size = handle.file.metadata().map_err(errno)?.len();
        let file_size = guard.as_ref().map_or(backing_size, |c| c.size(backing_size));
        let n = file_size.saturating_sub(offset).min(size) as usize;
        let mut buf = vec![0u8; n];
        read_at_full(&handle.file, &mut buf, offset).map_err(errno)?;
        if let Some(cache) = guard.as_ref() {
            cache.overlay(offset, &mut buf);
        }
        Ok(buf)
    }

    fn write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> OpResult<u32> {
        let handle = self.handle(fh)?;
        let cache = self.cache_or_new(handle.ino);
        {
            let mut c = lock(&cache);
            let seq = self.write_seq.fetch_add(1, Ordering::Relaxed);
            let added = c.write(&handle.file, offset, data, seq).map_err(errno)?;
            self.dirty_bytes.fetch_add(added, Ordering::Relaxed);
            if handle.sync_writes {
                self.sync_locked(&mut c, &handle.file, true)?;
            }
        }
        self.write_back_if_over();
        Ok(data.len() as u32)
    }

    /// Makes a file's dirty pages durable; the caller holds its cache.
    fn sync_locked(&self, cache: &mut FileCache, file: &File, datasync: bool) -> OpResult<()> {
        let bytes = cache.dirty_bytes();
        let (written, _) = cache.write_back(|_| true).map_err(errno)?;
        self.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if datasync { file.sync_data() } else { file.sync_all() }.map_err(errno)?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.synced_bytes.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    fn fsync(&self, ino: INodeNo, fh: FileHandle, datasync: bool) -> OpResult<()> {
        let handle = self.handle(fh)?;
        match self.cache(ino.0) {
            Some(cache) => self.sync_locked(&mut lock(&cache), &handle.file, datasync),
            None => self.sync_locked(&mut FileCache::default(), &handle.file, datasync),
        }
    }

    /// Over the memory limit: write back the oldest dirty files (no fsync) until under it.
    fn write_back_if_over(&self) {
        while self.dirty_bytes.load(Ordering::Relaxed) > self.dirty_bytes_max {
            let caches: Vec<Arc<Mutex<FileCache>>> = lock(&self.caches).values().cloned().collect();
            let oldest = caches
                .iter()
                .filter_map(|c| c.try_lock().ok().filter(|g| g.is_dirty()).map(|g| (g.dirty_since, c.clone())))
                .min_by_key(|(since, _)| *since);
            let Some((_, cache)) = oldest else {
                return; // every dirty file is busy: its owner will come by here again
            };
            let mut c = lock(&cache);
            let bytes = c.dirty_bytes();
            match c.write_back(|_| true) {
                Ok((written, _)) => {
                    self.written_back_bytes.fetch_add(written, Ordering::Relaxed);
                    self.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("lazyfs: write-back failed, dropping the pages: {e}");
                    self.dirty_bytes.fetch_sub(c.discard(), Ordering::Relaxed);
                }
            }
        }
    }

    fn set_size(&self, ino: INodeNo, fh: Option<FileHandle>, size: u64) -> OpResult<()> {
        let cache = self.cache(ino.0);
        let mut guard = cache.as_ref().map(|c| lock(c));
        match fh.and_then(|fh| self.handle(fh).ok()) {
            Some(handle) => handle.file.set_len(size),
            None => OpenOptions::new().write(true).open(self.full(&self.path_of(ino)?)).and_then(|f| f.set_len(size)),
        }
        .map_err(errno)?;
        if let Some(cache) = guard.as_mut() {
            let dropped = cache.truncate(size);
            self.dirty_bytes.fetch_sub(dropped, Ordering::Relaxed);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> OpResult<FileAttr> {
        let rel = self.path_of(ino)?;
        let full = self.full(&rel);
        if let Some(mode) = mode {
            fs::set_permissions(&full, fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&full, uid, gid).map_err(errno)?;
        }
        if let Some(size) = size {
            self.set_size(ino, fh, size)?;
        }
        if atime.is_some() || mtime.is_some() {
            let at = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut times = fs::FileTimes::new();
            if let Some(t) = atime {
                times = times.set_accessed(at(t));
            }
            if let Some(t) = mtime {
                times = times.set_modified(at(t));
            }
            File::open(&full).and_then(|f| f.set_times(times)).map_err(errno)?;
        }
        self.getattr(ino, fh)
    }

    fn fallocate(&self, ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32) -> OpResult<()> {
        let handle = self.handle(fh)?;
        let cache = self.cache(ino.0);
        let mut guard = cache.as_ref().map(|c| lock(c));
        let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
        nix::fcntl::fallocate(handle.file.as_raw_fd(), flags, offset as i64, length as i64)
            .map_err(|e| Errno::from_i32(e as i32))?;
        if let Some(cache) = guard.as_mut() {
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                cache.zero_range(offset, length);
            }
            cache.backing_grew(handle.file.metadata().map_err(errno)?.len());
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path, flags: RenameFlags) -> OpResult<()> {
        if !flags.is_empty() {
            return Err(Errno::EINVAL);
        }
        let mut inodes = lock(&self.inodes);
        fs::rename(self.full(from), self.full(to)).map_err(errno)?;
        if let Some(replaced) = inodes.rename(from, to) {
            drop(inodes);
            self.forget_cache(replaced);
        }
        Ok(())
    }

    fn remove(&self, rel: &Path, dir: bool) -> OpResult<()> {
        let mut inodes = lock(&self.inodes);
        let full = self.full(rel);
        if dir { fs::remove_dir(full) } else { fs::remove_file(full) }.map_err(errno)?;
        if let Some(ino) = inodes.remove(rel) {
            drop(inodes);
            self.forget_cache(ino);
        }
        Ok(())
    }

    fn readdir(&self, ino: INodeNo, offset: u64, reply: &mut ReplyDirectory) -> OpResult<()> {
        let rel = self.path_of(ino)?;
        let mut entries: Vec<(u64, FileType, std::ffi::OsString)> =
            vec![(ino.0, FileType::Directory, ".".into()), (ino.0, FileType::Directory, "..".into())];
        for entry in fs::read_dir(self.full(&rel)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let kind = entry.file_type().ok().and_then(FileType::from_std).unwrap_or(FileType::RegularFile);
            let child = lock(&self.inodes).ino_of(&rel.join(entry.file_name()));
            entries.push((child, kind, entry.file_name()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self) -> OpResult<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(&self.backing).map_err(|e| Errno::from_i32(e as i32))
    }
}

fn reply_entry(reply: ReplyEntry, r: OpResult<FileAttr>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, r: OpResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl fuser::Filesystem for Server {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.0.child(parent, name).and_then(|rel| self.0.entry(&rel)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
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
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.0.setattr(ino, mode, uid, gid, size, atime, mtime, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.path_of(ino).and_then(|rel| fs::read_link(self.0.full(&rel)).map_err(errno)) {
            Ok(target) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let r = self.0.child(parent, name).and_then(|rel| {
            fs::DirBuilder::new().mode(mode & !umask).create(self.0.full(&rel)).map_err(errno)?;
            self.0.entry(&rel)
        });
        reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.0.child(parent, name).and_then(|rel| self.0.remove(&rel, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.0.child(parent, name).and_then(|rel| self.0.remove(&rel, true)));
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let r = self.0.child(parent, link_name).and_then(|rel| {
            std::os::unix::fs::symlink(target, self.0.full(&rel)).map_err(errno)?;
            self.0.entry(&rel)
        });
        reply_entry(reply, r);
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
        let r = self
            .0
            .child(parent, name)
            .and_then(|from| Ok((from, self.0.child(newparent, newname)?)))
            .and_then(|(from, to)| self.0.rename(&from, &to, flags));
        reply_empty(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.0.open_backing(ino, flags.0, None).map(|handle| {
            if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                if let Some(cache) = self.0.cache(ino.0) {
                    let dropped = lock(&cache).truncate(0);
                    self.0.dirty_bytes.fetch_sub(dropped, Ordering::Relaxed);
                }
            }
            self.0.add_handle(handle)
        });
        match r {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
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
        let r = self.0.child(parent, name).and_then(|rel| {
            let mut handle = self.0.open_backing(INodeNo(0), flags, Some((&rel, mode & !umask)))?;
            let attr = self.0.entry(&rel)?;
            handle.ino = attr.ino.0;
            if flags & libc::O_TRUNC != 0 {
                if let Some(cache) = self.0.cache(handle.ino) {
                    let dropped = lock(&cache).truncate(0);
                    self.0.dirty_bytes.fetch_sub(dropped, Ordering::Relaxed);
                }
            }
            Ok((attr, self.0.add_handle(handle)))
        });
        match r {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    /// `close()` is not a sync: nothing to do.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.0.handles).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.0.fsync(ino, fh, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.path_of(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.0.readdir(ino, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let r =
            self.0.path_of(ino).and_then(|rel| File::open(self.0.full(&rel)).and_then(|d| d.sync_all()).map_err(errno));
        if r.is_ok() {
            self.0.fsyncdirs.fetch_add(1, Ordering::Relaxed);
        }
        reply_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.0.statfs() {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.0.path_of(ino).and_then(|rel| fs::symlink_metadata(self.0.full(&rel)).map(|_| ()).map_err(errno));
        reply_empty(reply, r);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.0.fallocate(ino, fh, offset, length, mode));
    }
}
