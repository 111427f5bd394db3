//! Segment files: append-only files of 4 KiB blocks named `seg-<number, 8 hex digits>`.
//!
//! A segment has no header and no footer: where each extent lives, and its checksums, are in
//! the index. Space is given back by punching holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), and a
//! segment no extent uses any more is deleted whole.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

const PREFIX: &str = "seg-";

pub fn path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{PREFIX}{segment:08x}"))
}

/// Creates a new, empty segment file; fails if it exists (numbers are never reused).
pub fn create(dir: &Path, segment: u32) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).open(path(dir, segment))
}

/// The segment files in `dir`, opened for reading and writing, by number. Other files are
/// ignored.
pub fn open_all(dir: &Path) -> io::Result<Vec<(u32, File)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(no) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|h| u32::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        let file = OpenOptions::new().read(true).write(true).open(entry.path())?;
        out.push((no, file));
    }
    out.sort_by_key(|(no, _)| *no);
    Ok(out)
}

/// Gives the byte range back to the file system; it then reads as zeros.
pub fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (i64::try_from(offset).map_err(io::Error::other)?, i64::try_from(len).map_err(io::Error::other)?);
    fallocate(file.as_raw_fd(), FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off, len)
        .map_err(io::Error::from)
}

pub fn remove(dir: &Path, segment: u32) -> io::Result<()> {
    match std::fs::remove_file(path(dir, segment)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes the creation of new files in `dir` durable (an `fdatasync` of a file does not cover
/// its directory entry).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes the file occupies on disk (holes excluded).
pub fn disk_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}
