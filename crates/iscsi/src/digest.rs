//! CRC32C header and data digests (RFC 7143 §13.1): the checksum, and its four bytes on the
//! wire. Pure functions; where a digest goes in a PDU is [`crate::pdu`]'s business.
//!
//! Byte order on the wire. RFC 7143 appendix B.4 (unchanged from RFC 3720) prints each example
//! CRC as the bytes transmitted: 32 zero bytes give `aa 36 91 8a`, which is the little-endian
//! encoding of the CRC-32C value 0x8A9136AA that every CRC-32C implementation (the `crc32c`
//! crate included) returns. So the digest is sent least significant byte first, the one
//! little-endian field in an otherwise big-endian protocol. Checked against:
//! - RFC 3720/7143 appendix B.4's five examples (unit tests below, all five);
//! - libiscsi `lib/pdu.c`, which writes `crc` into bytes 48..52 as `crc`, `crc >> 8`,
//!   `crc >> 16`, `crc >> 24` and reads a received digest back the same way;
//! - Linux's target (`drivers/target/iscsi/iscsi_target.c`), which stores the host-order `u32`
//!   straight into the PDU buffer (little-endian on the hosts it runs on; older kernels wrote
//!   it through the crypto API's little-endian `crc32c` output).

/// Bytes of one digest on the wire.
pub const DIGEST_BYTES: usize = 4;

/// Zero padding, up to three bytes, that ends a data segment (covered by the data digest).
const ZERO_PAD: [u8; 3] = [0; 3];

/// CRC32C (Castagnoli) of `bytes`, as RFC 7143 §13.1 defines it: register preset to all ones,
/// reflected, result complemented.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Header digest: over the Basic Header Segment and any Additional Header Segments, which the
/// caller passes as two slices so they need not be contiguous.
pub fn header_digest(bhs: &[u8], ahs: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(bhs), ahs)
}

/// Data digest of a data segment as sent: the data, then zero padding to a multiple of 4 bytes.
pub fn data_digest(data: &[u8]) -> u32 {
    let pad = pad_bytes(data.len());
    crc32c::crc32c_append(crc32c::crc32c(data), &ZERO_PAD[..pad])
}

/// Data digest of a data segment as received: the padding bytes are whatever the sender put
/// there (RFC 7143 only says they SHOULD be zero), and they are covered by the digest.
pub fn data_digest_with_padding(data: &[u8], padding: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(data), padding)
}

/// The four wire bytes of a digest value (little-endian; see the module header).
pub fn digest_to_wire(crc: u32) -> [u8; DIGEST_BYTES] {
    crc.to_le_bytes()
}

/// The digest value carried by four wire bytes.
pub fn digest_from_wire(bytes: [u8; DIGEST_BYTES]) -> u32 {
    u32::from_le_bytes(bytes)
}

/// Zero bytes that follow a segment of `len` bytes to reach a 4-byte boundary.
pub fn pad_bytes(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7143 appendix B.4, "CRC Examples": the inputs and the CRC bytes as transmitted.
    fn rfc_examples() -> Vec<(Vec<u8>, [u8; 4])> {
        let mut read10 = vec![0u8; 48];
        for (at, byte) in [(0, 0x01), (1, 0xc0), (16, 0x14), (22, 0x04), (27, 0x14), (31, 0x18), (32, 0x28), (40, 0x02)]
        {
            read10[at] = byte;
        }
        vec![
            (vec![0x00; 32], [0xaa, 0x36, 0x91, 0x8a]),
            (vec![0xff; 32], [0x43, 0xab, 0xa8, 0x62]),
            ((0u8..32).collect(), [0x4e, 0x79, 0xdd, 0x46]),
            ((0u8..32).rev().collect(), [0x5c, 0xdb, 0x3f, 0x11]),
            // "An iSCSI - SCSI Read (10) Command PDU".
            (read10, [0x56, 0x3a, 0x96, 0xd9]),
        ]
    }

    #[test]
    fn rfc_appendix_b4_examples_as_transmitted() {
        for (input, wire) in rfc_examples() {
            assert_eq!(digest_to_wire(crc32c(&input)), wire, "input {input:02x?}");
            assert_eq!(digest_from_wire(wire), crc32c(&input));
        }
    }

    #[test]
    fn known_values_as_numbers() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(&(0u8..32).collect::<Vec<_>>()), 0x46DD_794E);
        assert_eq!(crc32c(&(0u8..32).rev().collect::<Vec<_>>()), 0x113F_DB5C);
        // The CRC catalogue's check value for CRC-32/ISCSI.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn header_digest_spans_both_slices() {
        let (bhs, ahs) = ([7u8; 48], [9u8; 8]);
        let mut joined = bhs.to_vec();
        joined.extend_from_slice(&ahs);
        assert_eq!(header_digest(&bhs, &ahs), crc32c(&joined));
        assert_eq!(header_digest(&bhs, &[]), crc32c(&bhs));
    }

    #[test]
    fn data_digest_covers_zero_padding() {
        for len in 0..9usize {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut padded = data.clone();
            padded.resize(len + pad_bytes(len), 0);
            assert_eq!(padded.len() % 4, 0);
            assert_eq!(data_digest(&data), crc32c(&padded), "len {len}");
            assert_eq!(data_digest_with_padding(&data, &padded[len..]), crc32c(&padded));
        }
    }

    #[test]
    fn padding_reaches_the_next_word() {
        assert_eq!([0, 1, 2, 3, 4, 5].map(pad_bytes), [0, 3, 2, 1, 0, 3]);
    }
}
