//! The on-disk formats: sled keys and values, journal records, block addresses. Pure
//! functions, no I/O.
//!
//! The index lives in sled's default tree, so that the changes of one generation are one atomic
//! `sled::Batch`. Keys start with a one-byte tag; integers in keys are big-endian so that byte
//! order is numeric order (range scans), integers in values little-endian.
//!
//! | key                      | value                                                          |
//! |--------------------------|----------------------------------------------------------------|
//! | `V` vol:u64              | volume: size_bytes:u64, map:u64                                |
//! | `M` map:u64 chunk:u64    | chunk: runs of (start:u16 len:u16 extent:u64 first:u32), each followed by len × crc32c:u32 |
//! | `R` extent:u64           | reference count of each block of the extent: n × u32           |
//! | `G` map:u64              | empty: the map of a deleted volume, still to be released       |
//! | `Slsn`, `Snext_map`, `Snext_segment`, `Sjournal_next`, `Sjournal_seq` | u64 counters |
//!
//! A volume's blocks are grouped in chunks of [`CHUNK_BLOCKS`]; a chunk entry lists, per mapped
//! block, the extent holding it, the block within that extent and the block's crc32c. A volume
//! does not own its map directly: it names a map id, so deleting a volume is one key change and
//! its map is released in bounded steps afterwards.
//!
//! An extent's id is the physical address of its first block: segment number in the high 32
//! bits, block index within the segment file in the low 32. A block's physical address is
//! therefore `extent + block_in_extent`, and reading needs no lookup beyond the chunk.
//!
//! Segment files also hold the journal: one record per group commit, a header block
//! ([`JournalHeader`]) and a body ([`encode_body`]: the generation's sled changes and the
//! checksums of its new data blocks). Each header names the block reserved for the next one;
//! `Sjournal_next` names the first record sled does not have yet.

use tandem_types::{VolumeId, BLOCK_BYTES};

/// Blocks per chunk entry: one sled value maps 128 KiB of a volume. Larger chunks mean fewer
/// keys for sequential data but more bytes rewritten per random 4 KiB write: a fragmented chunk
/// of 32 blocks encodes in at most 640 bytes (256 blocks took 5 KiB, more than the data a
/// random 4 KiB write carries, and halved random-write throughput).
pub const CHUNK_BLOCKS: u64 = 32;

/// Blocks per extent, at most: a write larger than this is stored as several extents, so a
/// reference-count record stays at or below 1 KiB.
pub const EXTENT_BLOCKS_MAX: u64 = 256;

/// Blocks per segment file (256 MiB). A segment no extent uses any more is deleted whole.
pub const SEGMENT_BLOCKS_MAX: u64 = 65536;

const TAG_VOLUME: u8 = b'V';
const TAG_MAP: u8 = b'M';
const TAG_REFS: u8 = b'R';
const TAG_GRAVE: u8 = b'G';

pub const STATE_LSN: &[u8] = b"Slsn";
pub const STATE_NEXT_MAP: &[u8] = b"Snext_map";
pub const STATE_NEXT_SEGMENT: &[u8] = b"Snext_segment";
/// Where the header of the next journal record goes, and its sequence number.
pub const STATE_JOURNAL_NEXT: &[u8] = b"Sjournal_next";
pub const STATE_JOURNAL_SEQ: &[u8] = b"Sjournal_seq";

/// Bytes of one run header in a chunk value.
const RUN_HEADER_BYTES: usize = 2 + 2 + 8 + 4;

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue(pub &'static str);

pub fn segment_of(pba: u64) -> u32 {
    (pba >> 32) as u32
}

pub fn block_in_segment(pba: u64) -> u64 {
    pba & 0xffff_ffff
}

pub fn pba(segment: u32, block: u64) -> u64 {
    debug_assert!(block < SEGMENT_BLOCKS_MAX);
    (u64::from(segment) << 32) | block
}

/// Byte offset of a physical block within its segment file.
pub fn segment_offset(pba: u64) -> u64 {
    block_in_segment(pba) * BLOCK_BYTES
}

pub fn volume_key(vol: VolumeId) -> [u8; 9] {
    tagged(TAG_VOLUME, vol.get())
}

pub fn volume_prefix() -> [u8; 1] {
    [TAG_VOLUME]
}

pub fn refs_key(extent: u64) -> [u8; 9] {
    tagged(TAG_REFS, extent)
}

pub fn refs_prefix() -> [u8; 1] {
    [TAG_REFS]
}

pub fn grave_key(map: u64) -> [u8; 9] {
    tagged(TAG_GRAVE, map)
}

pub fn grave_prefix() -> [u8; 1] {
    [TAG_GRAVE]
}

pub fn chunk_key(map: u64, chunk: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = TAG_MAP;
    k[1..9].copy_from_slice(&map.to_be_bytes());
    k[9..].copy_from_slice(&chunk.to_be_bytes());
    k
}

fn tagged(tag: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The id in a 9-byte tagged key (`V`, `R`, `G`).
pub fn key_id(key: &[u8]) -> Result<u64, BadValue> {
    let b: [u8; 8] = key.get(1..9).and_then(|s| s.try_into().ok()).ok_or(BadValue("short key"))?;
    if key.len() != 9 {
        return Err(BadValue("long key"));
    }
    Ok(u64::from_be_bytes(b))
}

/// The chunk number in a map key.
pub fn chunk_of_key(key: &[u8]) -> Result<u64, BadValue> {
    let b: [u8; 8] = key.get(9..17).and_then(|s| s.try_into().ok()).ok_or(BadValue("short map key"))?;
    if key.len() != 17 {
        return Err(BadValue("long map key"));
    }
    Ok(u64::from_be_bytes(b))
}

/// A volume as the index records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeRec {
    pub size_bytes: u64,
    /// The block map this volume uses; never shared, never reused.
    pub map: u64,
}

impl VolumeRec {
    pub fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.size_bytes.to_le_bytes());
        v[8..].copy_from_slice(&self.map.to_le_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Result<VolumeRec, BadValue> {
        if v.len() != 16 {
            return Err(BadValue("volume record length"));
        }
        Ok(VolumeRec { size_bytes: le_u64(&v[..8]), map: le_u64(&v[8..]) })
    }
}

pub fn encode_u64(x: u64) -> [u8; 8] {
    x.to_le_bytes()
}

pub fn decode_u64(v: &[u8]) -> Result<u64, BadValue> {
    if v.len() != 8 {
        return Err(BadValue("counter length"));
    }
    Ok(le_u64(v))
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// Where one volume block lives. `extent == 0` means unmapped (reads as zeros): segment numbers
/// start at 1, so no extent has id 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub extent: u64,
    pub block: u32,
    pub crc: u32,
}

impl Slot {
    pub fn is_mapped(&self) -> bool {
        self.extent != 0
    }

    pub fn pba(&self) -> u64 {
        self.extent + u64::from(self.block)
    }
}

/// The map of one chunk of a volume, decoded: one slot per block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub slots: [Slot; CHUNK_BLOCKS as usize],
}

impl Default for Chunk {
    fn default() -> Self {
        Chunk { slots: [Slot::default(); CHUNK_BLOCKS as usize] }
    }
}

impl Chunk {
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| !s.is_mapped())
    }

    /// Runs of consecutive blocks of one extent share a header; each block keeps its crc.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let n = self.slots.len();
        let mut i = 0;
        while i < n {
            let s = self.slots[i];
            if !s.is_mapped() {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n {
                let t = self.slots[j];
                if t.extent != s.extent || u64::from(t.block) != u64::from(s.block) + (j - i) as u64 {
                    break;
                }
                j += 1;
            }
            out.extend_from_slice(&(i as u16).to_le_bytes());
            out.extend_from_slice(&((j - i) as u16).to_le_bytes());
            out.extend_from_slice(&s.extent.to_le_bytes());
            out.extend_from_slice(&s.block.to_le_bytes());
            for t in &self.slots[i..j] {
                out.extend_from_slice(&t.crc.to_le_bytes());
            }
            i = j;
        }
        out
    }

    /// Decodes a chunk value, refusing anything a correct encoder would not have produced.
    pub fn decode(v: &[u8]) -> Result<Chunk, BadValue> {
        let mut c = Chunk::default();
        let mut at = 0usize;
        let mut next_free = 0u64;
        while at < v.len() {
            let h = v.get(at..at + RUN_HEADER_BYTES).ok_or(BadValue("truncated run header"))?;
            let start = u64::from(u16::from_le_bytes([h[0], h[1]]));
            let len = u64::from(u16::from_le_bytes([h[2], h[3]]));
            let extent = le_u64(&h[4..12]);
            let first = u64::from(le_u32(&h[12..16]));
            at += RUN_HEADER_BYTES;
            if len == 0 || start < next_free || start + len > CHUNK_BLOCKS {
                return Err(BadValue("run out of order or out of chunk"));
            }
            if extent == 0 || first + len > EXTENT_BLOCKS_MAX {
                return Err(BadValue("run outside its extent"));
            }
            if block_in_segment(extent) + first + len > SEGMENT_BLOCKS_MAX {
                return Err(BadValue("run outside its segment"));
            }
            let crcs = v.get(at..at + 4 * len as usize).ok_or(BadValue("truncated crcs"))?;
            at += 4 * len as usize;
            for k in 0..len {
                let o = 4 * k as usize;
                c.slots[(start + k) as usize] =
                    Slot { extent, block: (first + k) as u32, crc: le_u32(&crcs[o..o + 4]) };
            }
            next_free = start + len;
        }
        Ok(c)
    }
}

/// Per-block reference counts of one extent. A count saturates at `u32::MAX` (the block is
/// then never freed: a leak, never a loss).
pub fn encode_refs(refs: &[u32]) -> Vec<u8> {
    refs.iter().flat_map(|r| r.to_le_bytes()).collect()
}

pub fn decode_refs(v: &[u8]) -> Result<Vec<u32>, BadValue> {
    if v.is_empty() || !v.len().is_multiple_of(4) || v.len() / 4 > EXTENT_BLOCKS_MAX as usize {
        return Err(BadValue("reference record length"));
    }
    Ok(v.chunks_exact(4).map(le_u32).collect())
}

/// One index change: a sled insert (`Some`) or remove (`None`).
pub type Op = (Vec<u8>, Option<Vec<u8>>);

const JOURNAL_MAGIC: &[u8; 8] = b"TNDMJRNL";
const JOURNAL_VERSION: u32 = 1;
const HEADER_FIXED_BYTES: usize = 52;
/// Body pieces one header block can list.
pub const JOURNAL_PIECES_MAX: usize = (BLOCK_BYTES as usize - HEADER_FIXED_BYTES - 4) / 12;

/// The first block of a journal record. Its position was reserved by the previous record (or at
/// open), never handed to a writer, so a guest cannot plant a fake one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    pub seq: u64,
    pub lsn: u64,
    /// Where the next record's header goes.
    pub next: u64,
    pub body_len: u64,
    pub body_crc: u32,
    /// The body's blocks: (first physical block, count).
    pub pieces: Vec<(u64, u32)>,
}

impl JournalHeader {
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.pieces.len() <= JOURNAL_PIECES_MAX, "journal body in too many pieces");
        let mut b = vec![0u8; BLOCK_BYTES as usize];
        b[..8].copy_from_slice(JOURNAL_MAGIC);
        b[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.lsn.to_le_bytes());
        b[28..36].copy_from_slice(&self.next.to_le_bytes());
        b[36..44].copy_from_slice(&self.body_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.body_crc.to_le_bytes());
        b[48..52].copy_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for (i, (pba, n)) in self.pieces.iter().enumerate() {
            let at = HEADER_FIXED_BYTES + 12 * i;
            b[at..at + 8].copy_from_slice(&pba.to_le_bytes());
            b[at + 8..at + 12].copy_from_slice(&n.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..BLOCK_BYTES as usize - 4]);
        b[BLOCK_BYTES as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<JournalHeader, BadValue> {
        let end = BLOCK_BYTES as usize;
        if b.len() != end || &b[..8] != JOURNAL_MAGIC {
            return Err(BadValue("not a journal header"));
        }
        if crc32c::crc32c(&b[..end - 4]) != le_u32(&b[end - 4..]) {
            return Err(BadValue("journal header checksum"));
        }
        if le_u32(&b[8..12]) != JOURNAL_VERSION {
            return Err(BadValue("journal version"));
        }
        let count = le_u32(&b[48..52]) as usize;
        if count > JOURNAL_PIECES_MAX {
            return Err(BadValue("journal piece count"));
        }
        let pieces = (0..count)
            .map(|i| {
                let at = HEADER_FIXED_BYTES + 12 * i;
                (le_u64(&b[at..at + 8]), le_u32(&b[at + 8..at + 12]))
            })
            .collect();
        Ok(JournalHeader {
            seq: le_u64(&b[12..20]),
            lsn: le_u64(&b[20..28]),
            next: le_u64(&b[28..36]),
            body_len: le_u64(&b[36..44]),
            body_crc: le_u32(&b[44..48]),
            pieces,
        })
    }
}

/// A journal record's body: the generation's index changes, and the new data blocks with their
/// checksums (recovery checks them before trusting the record).
pub fn encode_body(ops: &[Op], new_blocks: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for (k, v) in ops {
        out.push(u8::from(v.is_some()));
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k);
        if let Some(v) = v {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
    out.extend_from_slice(&(new_blocks.len() as u32).to_le_bytes());
    for (pba, crc) in new_blocks {
        out.extend_from_slice(&pba.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

#[allow(clippy::type_complexity)]
pub fn decode_body(b: &[u8]) -> Result<(Vec<Op>, Vec<(u64, u32)>), BadValue> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], BadValue> {
        let s = b
            .get(at..at.checked_add(n).ok_or(BadValue("journal body length"))?)
            .ok_or(BadValue("truncated journal body"))?;
        at += n;
        Ok(s)
    };
    let count = le_u32(take(4)?) as usize;
    let mut ops = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let kind = take(1)?[0];
        let klen = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let key = take(klen)?.to_vec();
        let val = match kind {
            0 => None,
            1 => {
                let vlen = le_u32(take(4)?) as usize;
                Some(take(vlen)?.to_vec())
            }
            _ => return Err(BadValue("journal op kind")),
        };
        ops.push((key, val));
    }
    let count = le_u32(take(4)?) as usize;
    let mut blocks = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let pba = le_u64(take(8)?);
        let crc = le_u32(take(4)?);
        blocks.push((pba, crc));
    }
    if at != b.len() {
        return Err(BadValue("trailing bytes in journal body"));
    }
    Ok((ops, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn addresses_split_into_segment_and_block() {
        let p = pba(7, 1234);
        assert_eq!(segment_of(p), 7);
        assert_eq!(block_in_segment(p), 1234);
        assert_eq!(segment_offset(p), 1234 * BLOCK_BYTES);
    }

    #[test]
    fn keys_sort_numerically() {
        assert!(chunk_key(1, 255) < chunk_key(1, 256));
        assert!(chunk_key(1, u64::MAX) < chunk_key(2, 0));
        assert_eq!(chunk_of_key(&chunk_key(3, 99)), Ok(99));
        assert_eq!(key_id(&refs_key(42)), Ok(42));
    }

    #[test]
    fn volume_records_round_trip() {
        let v = VolumeRec { size_bytes: 1 << 30, map: 9 };
        assert_eq!(VolumeRec::decode(&v.encode()), Ok(v));
        assert!(VolumeRec::decode(&[0; 15]).is_err());
    }

    #[test]
    fn bad_chunks_are_refused() {
        let mut c = Chunk::default();
        c.slots[3] = Slot { extent: pba(1, 0), block: 0, crc: 5 };
        let good = c.encode();
        assert_eq!(Chunk::decode(&good), Ok(c));
        assert!(Chunk::decode(&good[..good.len() - 1]).is_err());
        let mut zero_len = good.clone();
        zero_len[2] = 0;
        assert!(Chunk::decode(&zero_len).is_err());
        let mut past_end = good.clone();
        past_end[0] = 255;
        past_end[1] = 0;
        past_end[2] = 2;
        assert!(Chunk::decode(&past_end).is_err());
        assert!(decode_refs(&[1, 2, 3]).is_err());
        assert!(decode_refs(&[]).is_err());
    }

    fn arb_chunk() -> impl Strategy<Value = Chunk> {
        proptest::collection::vec((0u64..4, 0u32..4, any::<u32>()), CHUNK_BLOCKS as usize).prop_map(|v| {
            let mut c = Chunk::default();
            for (i, (e, b, crc)) in v.into_iter().enumerate() {
                if e > 0 {
                    c.slots[i] = Slot { extent: pba(e as u32, 16 * e), block: b + (i as u32 % 8), crc };
                }
            }
            c
        })
    }

    #[test]
    fn journal_records_round_trip() {
        let h = JournalHeader {
            seq: 3,
            lsn: 99,
            next: pba(2, 7),
            body_len: 5000,
            body_crc: 42,
            pieces: vec![(pba(2, 5), 2)],
        };
        let b = h.encode();
        assert_eq!(JournalHeader::decode(&b), Ok(h));
        let mut bad = b.clone();
        bad[30] ^= 1;
        assert!(JournalHeader::decode(&bad).is_err());
        assert!(JournalHeader::decode(&[0u8; 4096]).is_err());
        let ops: Vec<Op> = vec![(b"Ma".to_vec(), Some(vec![1, 2, 3])), (b"Rb".to_vec(), None)];
        let blocks = vec![(pba(1, 0), 7u32)];
        let body = encode_body(&ops, &blocks);
        assert_eq!(decode_body(&body), Ok((ops, blocks)));
        assert!(decode_body(&body[..body.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn chunks_round_trip(c in arb_chunk()) {
            prop_assert_eq!(Chunk::decode(&c.encode()), Ok(c));
        }

        #[test]
        fn decoding_garbage_never_panics(v in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Chunk::decode(&v);
            let _ = decode_refs(&v);
            let _ = VolumeRec::decode(&v);
            let _ = decode_body(&v);
            let mut block = v.clone();
            block.resize(BLOCK_BYTES as usize, 0);
            let _ = JournalHeader::decode(&block);
        }
    }
}
