//! One file's dirty pages: what was written through the layer and not yet written to the backing
//! file. Full page images, so a partial write reads the rest of its page from the backing file
//! first (a read-modify-write, as a kernel page cache does).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The unit of caching, of write-back and of a torn cut.
pub(crate) const PAGE_BYTES: u64 = 4096;

/// Bytes one write-back call gathers into a single `pwrite`.
const WRITEBACK_RUN_BYTES_MAX: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct FileCache {
    /// A read-write descriptor of the backing file, kept while pages are dirty so that write-back
    /// works after the writer closed its handle (or the file was renamed or unlinked).
    file: Option<Arc<File>>,
    /// Page index -> a `PAGE_BYTES` image. Bytes past `size` are zeros.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The file's size as readers see it while pages are dirty (at least the backing size);
    /// `None` when clean (the backing size is the size).
    size: Option<u64>,
    /// The write sequence number at which the file went from clean to dirty: the oldest dirty
    /// file is written back first when the layer is over its memory limit.
    pub(crate) dirty_since: u64,
}

impl FileCache {
    pub(crate) fn is_dirty(&self) -> bool {
        !self.pages.is_empty()
    }

    pub(crate) fn dirty_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE_BYTES
    }

    /// The size readers see, given the backing file's size.
    pub(crate) fn size(&self, backing_size: u64) -> u64 {
        self.size.unwrap_or(backing_size)
    }

    /// Caches `data` at `offset`. `file` is the writer's read-write descriptor. Returns the bytes
    /// of pages that became dirty.
    pub(crate) fn write(&mut self, file: &Arc<File>, offset: u64, data: &[u8], seq: u64) -> io::Result<u64> {
        if self.file.is_none() {
            self.file = Some(file.clone());
        }
        let backing = self.file.clone().expect("set above");
        if self.size.is_none() {
            self.size = Some(backing.metadata()?.len());
        }
        if self.pages.is_empty() {
            self.dirty_since = seq;
        }
        let size_before = self.size.expect("set above");
        let end = offset + data.len() as u64;
        let mut added = 0;
        let mut at = offset;
        while at < end {
            let index = at / PAGE_BYTES;
            let page_start = index * PAGE_BYTES;
            let in_page = (at - page_start) as usize;
            let n = ((PAGE_BYTES as usize) - in_page).min((end - at) as usize);
            let page = match self.pages.entry(index) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let mut image = vec![0u8; PAGE_BYTES as usize].into_boxed_slice();
                    let whole = in_page == 0 && n == PAGE_BYTES as usize;
                    if !whole && page_start < size_before {
                        // Only what lies below the old size is real; the rest stays zero.
                        let valid = (size_before - page_start).min(PAGE_BYTES) as usize;
                        read_at_full(&backing, &mut image[..valid], page_start)?;
                    }
                    added += PAGE_BYTES;
                    e.insert(image)
                }
            };
            let from = (at - offset) as usize;
            page[in_page..in_page + n].copy_from_slice(&data[from..from + n]);
            at += n as u64;
        }
        self.size = Some(size_before.max(end));
        Ok(added)
    }

    /// Lays the dirty pages over `buf`, which holds the backing file's bytes from `offset`.
    pub(crate) fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        if buf.is_empty() {
            return;
        }
        for (&index, page) in self.pages.range(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES) {
            let page_start = index * PAGE_BYTES;
            let from = page_start.max(offset);
            let to = (page_start + PAGE_BYTES).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
    }

    /// The file was truncated (or extended) to `size` in the backing dir; returns the bytes of
    /// pages dropped.
    pub(crate) fn truncate(&mut self, size: u64) -> u64 {
        if self.pages.is_empty() {
            return 0;
        }
        let first_gone = size.div_ceil(PAGE_BYTES);
        let gone = self.pages.split_off(&first_gone);
        if size % PAGE_BYTES != 0 {
            if let Some(page) = self.pages.get_mut(&(size / PAGE_BYTES)) {
                page[(size % PAGE_BYTES) as usize..].fill(0);
            }
        }
        self.size = Some(size);
        gone.len() as u64 * PAGE_BYTES
    }

    /// A hole was punched (or a range zeroed) in the backing file: zero the same bytes here.
    pub(crate) fn zero_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if len == 0 || self.pages.is_empty() {
            return;
        }
        for (&index, page) in self.pages.range_mut(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES) {
            let page_start = index * PAGE_BYTES;
            let from = page_start.max(offset);
            let to = (page_start + PAGE_BYTES).min(end);
            page[(from - page_start) as usize..(to - page_start) as usize].fill(0);
        }
    }

    /// The backing file grew to `backing_size` by a metadata op (fallocate).
    pub(crate) fn backing_grew(&mut self, backing_size: u64) {
        if let Some(size) = self.size.as_mut() {
            *size = (*size).max(backing_size);
        }
    }

    /// Writes the dirty pages for which `keep` says yes to the backing file (no fsync), drops the
    /// others, and leaves the cache clean. Returns (bytes written, bytes dropped).
    pub(crate) fn write_back(&mut self, mut keep: impl FnMut(u64) -> bool) -> io::Result<(u64, u64)> {
        let Some(file) = self.file.clone() else {
            return Ok((0, 0));
        };
        let size = self.size.expect("a dirty cache knows its size");
        let pages = std::mem::take(&mut self.pages);
        let (mut written, mut dropped) = (0, 0);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        for (index, page) in pages {
            if !keep(index) {
                dropped += PAGE_BYTES;
                continue;
            }
            let page_start = index * PAGE_BYTES;
            if page_start >= size {
                continue;
            }
            let contiguous = !run.is_empty() && run_start + run.len() as u64 == page_start;
            if !contiguous || run.len() >= WRITEBACK_RUN_BYTES_MAX {
                file.write_all_at(&run, run_start)?;
                written += run.len() as u64;
                run.clear();
                run_start = page_start;
            }
            let n = (size - page_start).min(PAGE_BYTES) as usize;
            run.extend_from_slice(&page[..n]);
        }
        file.write_all_at(&run, run_start)?;
        written += run.len() as u64;
        if dropped == 0 && file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        self.size = None;
        self.file = None;
        Ok((written, dropped))
    }

    /// The power went out: every dirty page is gone. Returns the bytes dropped.
    pub(crate) fn discard(&mut self) -> u64 {
        let bytes = self.dirty_bytes();
        self.pages.clear();
        self.size = None;
        self.file = None;
        bytes
    }
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of the file.
pub(crate) fn read_at_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
