//! Self-describing block contents: every write of the NBD workloads fills its 4 KiB block with
//! a header (magic, volume, block, writer, value) and seeded filler, sealed by a CRC32C over
//! the whole block. A read tells which write it returned, or that it returned no write at all
//! (torn, corrupt, another block's): the checker can never explain such a read.

use crate::history::{INITIAL, UNRECOGNIZED};

pub const BLOCK_BYTES: usize = 4096;
const MAGIC: u64 = 0x5444_4d43_4841_4f53; // "TDMCHAOS"

/// What a block read back holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Zeros: never written.
    Initial,
    /// Write `value` by `writer` to this block.
    Write { value: u64, writer: u64 },
    /// Anything else; says what is wrong with it.
    Unrecognized(String),
}

impl Content {
    /// The register value a checker sees.
    pub fn value(&self) -> u64 {
        match self {
            Content::Initial => INITIAL,
            Content::Write { value, .. } => *value,
            Content::Unrecognized(_) => UNRECOGNIZED,
        }
    }
}

/// The content write `value` by `writer` puts in `block` of volume `volume`.
pub fn encode(volume: u64, block: u64, writer: u64, value: u64) -> Vec<u8> {
    let mut b = tandem_testkit::random_bytes(value ^ block.rotate_left(32), BLOCK_BYTES);
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&volume.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    b[24..32].copy_from_slice(&writer.to_le_bytes());
    b[32..40].copy_from_slice(&value.to_le_bytes());
    let crc = crc32c::crc32c(&b[..BLOCK_BYTES - 4]);
    b[BLOCK_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads back what `encode` wrote, checking that it belongs to `block` of `volume`.
pub fn decode(volume: u64, block: u64, b: &[u8]) -> Content {
    if b.len() != BLOCK_BYTES {
        return Content::Unrecognized(format!("{} bytes, not {BLOCK_BYTES}", b.len()));
    }
    if b.iter().all(|&x| x == 0) {
        return Content::Initial;
    }
    if u64_at(b, 0) != MAGIC {
        return Content::Unrecognized("no header (torn or foreign data)".into());
    }
    let crc = u32::from_le_bytes(b[BLOCK_BYTES - 4..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[..BLOCK_BYTES - 4]) != crc {
        return Content::Unrecognized(format!("checksum mismatch (write {} torn or corrupt)", u64_at(b, 32)));
    }
    let (v, blk) = (u64_at(b, 8), u64_at(b, 16));
    if v != volume || blk != block {
        return Content::Unrecognized(format!("holds block {blk} of volume {v}"));
    }
    let value = u64_at(b, 32);
    if value == INITIAL || value == UNRECOGNIZED {
        return Content::Unrecognized(format!("reserved value {value}"));
    }
    Content::Write { value, writer: u64_at(b, 24) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_tells_which_write_it_holds_and_rejects_damage() {
        let b = encode(3, 17, 2, 99);
        assert_eq!(decode(3, 17, &b), Content::Write { value: 99, writer: 2 });
        assert_eq!(decode(3, 17, &vec![0; BLOCK_BYTES]).value(), INITIAL);
        assert!(matches!(decode(3, 18, &b), Content::Unrecognized(_)));
        assert!(matches!(decode(4, 17, &b), Content::Unrecognized(_)));
        let mut torn = b.clone();
        torn[2000] ^= 1;
        assert!(matches!(decode(3, 17, &torn), Content::Unrecognized(_)));
        let mut half = encode(3, 17, 2, 100);
        half[2048..].copy_from_slice(&b[2048..]);
        assert_eq!(decode(3, 17, &half).value(), UNRECOGNIZED);
        assert_ne!(encode(3, 17, 2, 99), encode(3, 17, 2, 100));
    }
}
