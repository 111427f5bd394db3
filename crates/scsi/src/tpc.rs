//! Third-party copy (SPC-4 6.4, 6.18, 6.19; SBC-4 5.7, 5.33): the parameter lists of EXTENDED
//! COPY (LID1), POPULATE TOKEN and WRITE USING TOKEN, the answers of RECEIVE COPY RESULTS and
//! RECEIVE ROD TOKEN INFORMATION, the third-party copy VPD page (0x8F), and the per-nexus
//! record of finished copy operations those answers read.
//!
//! The copies themselves are the transport's: it asks the volume (`tandem_frontend::Volume`'s
//! `populate_token`, `write_using_token`, `copy_between`), which copies by reference on every
//! replica. Every copy command completes before its status is sent (IMMED is honoured by
//! finishing first), so a RECEIVE command always finds its operation finished.
//!
//! Decoders check every length against the data actually received and bound every count; they
//! never panic and allocate at most what the bounds allow.

use std::collections::VecDeque;

use tandem_frontend::{CopyUnit, TOKEN_BYTES};

use crate::cdb::{be16, be32, be64};
use crate::inquiry;
use crate::sense::{asc, Sense, SenseKey};

/// Service actions of THIRD-PARTY COPY OUT (83h).
pub mod out_action {
    pub const EXTENDED_COPY_LID1: u8 = 0x00;
    pub const POPULATE_TOKEN: u8 = 0x10;
    pub const WRITE_USING_TOKEN: u8 = 0x11;
}

/// Service actions of THIRD-PARTY COPY IN (84h).
pub mod in_action {
    pub const COPY_STATUS: u8 = 0x00;
    pub const RECEIVE_DATA: u8 = 0x01;
    pub const OPERATING_PARAMETERS: u8 = 0x03;
    pub const FAILED_SEGMENT_DETAILS: u8 = 0x04;
    pub const RECEIVE_ROD_TOKEN_INFORMATION: u8 = 0x07;
}

/// Most CSCD (target) descriptors in one EXTENDED COPY.
pub const CSCD_DESCRIPTORS_MAX: u16 = 8;
/// Most segment descriptors in one EXTENDED COPY.
pub const SEGMENT_DESCRIPTORS_MAX: u16 = 64;
/// Most bytes of CSCD and segment descriptors in one EXTENDED COPY.
pub const DESCRIPTOR_LIST_BYTES_MAX: u32 = 32 * CSCD_DESCRIPTORS_MAX as u32 + 28 * SEGMENT_DESCRIPTORS_MAX as u32;
/// Most block device range descriptors in one POPULATE TOKEN or WRITE USING TOKEN.
pub const RANGE_DESCRIPTORS_MAX: u16 = 64;
/// The largest parameter list a copy command may send (the largest list the limits allow
/// is under 4 KiB; more is refused before it is received).
pub const PARAMETER_BYTES_MAX: u32 = 64 * 1024;
/// Finished copy operations remembered per nexus for RECEIVE COPY RESULTS and RECEIVE ROD
/// TOKEN INFORMATION; the oldest is forgotten first.
pub const OPERATIONS_REMEMBERED: usize = 32;
/// The ROD type of a point-in-time copy token (what POPULATE TOKEN makes), and of the block
/// device zero ROD token (SBC-4: "write zeroes", made by nobody, understood by WRITE USING TOKEN).
pub const ROD_TYPE_POINT_IN_TIME: u32 = 0x0080_0000;
pub const ROD_TYPE_BLOCK_ZERO: u32 = 0xFFFF_0001;

/// Descriptor type codes of EXTENDED COPY this target implements: block to block segments, and
/// identification CSCD descriptors.
pub const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
/// Block to block with byte offsets and a byte count.
pub const SEGMENT_BLOCK_TO_BLOCK_OFFSET: u8 = 0x0A;
pub const CSCD_IDENTIFICATION: u8 = 0xE4;
const SEGMENT_BLOCK_TO_BLOCK_BYTES: usize = 28;
const SEGMENT_BLOCK_TO_BLOCK_OFFSET_BYTES: usize = 32;
const CSCD_BYTES: usize = 32;
/// The EXTENDED COPY (LID1) parameter list header.
const XCOPY_HEADER_BYTES: usize = 16;
/// WRITE USING TOKEN's parameter list before its range descriptors.
const WUT_HEADER_BYTES: usize = 536;
const POPULATE_HEADER_BYTES: usize = 16;
const RANGE_BYTES: usize = 16;

/// What a copy manager status says (COPY STATUS, RECEIVE ROD TOKEN INFORMATION).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    Good,
    Failed,
}

impl OpStatus {
    fn code(self) -> u8 {
        match self {
            OpStatus::Good => 0x01,
            OpStatus::Failed => 0x02,
        }
    }
}

/// A finished copy operation, as the nexus that sent it may ask about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The list identifier it was sent with.
    pub list_id: u32,
    /// The service action it was (EXTENDED COPY, POPULATE TOKEN, WRITE USING TOKEN).
    pub action: u8,
    pub status: OpStatus,
    /// Logical blocks represented (POPULATE TOKEN) or written.
    pub blocks: u64,
    pub segments: u16,
    /// What the command ended with, if not GOOD.
    pub sense: Option<Sense>,
    /// The token POPULATE TOKEN made.
    pub token: Option<Vec<u8>>,
}

/// The finished copy operations of one I_T nexus, newest last; bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operations {
    done: VecDeque<Operation>,
}

impl Operations {
    /// Records a finished operation, replacing one with the same list identifier.
    pub fn finish(&mut self, op: Operation) {
        self.done.retain(|o| o.list_id != op.list_id);
        if self.done.len() == OPERATIONS_REMEMBERED {
            self.done.pop_front();
        }
        self.done.push_back(op);
    }

    pub fn get(&self, list_id: u32) -> Option<&Operation> {
        self.done.iter().find(|o| o.list_id == list_id)
    }

    /// Forgets everything (an I_T nexus loss, a reset).
    pub fn clear(&mut self) {
        self.done.clear();
    }
}

/// POPULATE TOKEN's parameter list, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopulateToken {
    pub immediate: bool,
    /// Seconds the token may go unused (0: the default).
    pub inactivity_timeout_s: u32,
    /// Logical block ranges: (lba, blocks).
    pub ranges: Vec<(u64, u32)>,
}

/// WRITE USING TOKEN's parameter list, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteUsingToken {
    pub immediate: bool,
    /// Where in the token's data to start, in the destination's logical blocks.
    pub offset_blocks: u64,
    pub token: Vec<u8>,
    pub ranges: Vec<(u64, u32)>,
}

impl WriteUsingToken {
    pub fn rod_type(&self) -> u32 {
        be32(&self.token[0..4])
    }
}

/// One segment of an EXTENDED COPY, in bytes of the units named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub source: CopyUnit,
    pub source_offset: u64,
    pub destination: CopyUnit,
    pub destination_offset: u64,
    pub len: u64,
}

/// A range descriptor list (POPULATE TOKEN, WRITE USING TOKEN) at `at` of `data`, `declared`
/// bytes long: (lba, blocks), checked against the medium's `blocks`.
fn ranges(data: &[u8], at: usize, declared: usize, medium_blocks: u64) -> Result<Vec<(u64, u32)>, Sense> {
    if declared % RANGE_BYTES != 0 || declared == 0 {
        return Err(Sense::invalid_parameter_field(at as u16 - 2));
    }
    if declared / RANGE_BYTES > usize::from(RANGE_DESCRIPTORS_MAX) {
        // SBC-4: TOO MANY SEGMENT DESCRIPTORS for too many range descriptors.
        return Err(Sense::illegal(asc::TOO_MANY_SEGMENT_DESCRIPTORS));
    }
    if data.len() < at + declared {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let mut out = Vec::with_capacity(declared / RANGE_BYTES);
    for i in 0..declared / RANGE_BYTES {
        let d = &data[at + RANGE_BYTES * i..at + RANGE_BYTES * (i + 1)];
        let lba = be64(&d[0..8]);
        let blocks = be32(&d[8..12]);
        match lba.checked_add(u64::from(blocks)) {
            Some(end) if end <= medium_blocks => {}
            _ => return Err(Sense::lba_out_of_range()),
        }
        if blocks > 0 {
            out.push((lba, blocks));
        }
    }
    Ok(out)
}

/// Checks the data length field (bytes 0..2, counting the bytes after it) against what came.
fn data_length(data: &[u8], header: usize) -> Result<usize, Sense> {
    if data.len() < header {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let declared = usize::from(be16(&data[0..2])) + 2;
    if declared > data.len() {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    Ok(declared)
}

/// Reads POPULATE TOKEN's parameter list (SBC-4 5.7.3) for a medium of `medium_blocks`.
pub fn populate_token(data: &[u8], medium_blocks: u64) -> Result<PopulateToken, Sense> {
    let len = data_length(data, POPULATE_HEADER_BYTES)?;
    let rtv = data[2] & 0x02 != 0;
    if rtv && be32(&data[8..12]) != ROD_TYPE_POINT_IN_TIME {
        return Err(Sense::illegal(asc::INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE));
    }
    let declared = usize::from(be16(&data[14..16]));
    if POPULATE_HEADER_BYTES + declared > len {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    Ok(PopulateToken {
        immediate: data[2] & 0x01 != 0,
        inactivity_timeout_s: be32(&data[4..8]),
        ranges: ranges(data, POPULATE_HEADER_BYTES, declared, medium_blocks)?,
    })
}

/// Reads WRITE USING TOKEN's parameter list (SBC-4 5.33.3) for a medium of `medium_blocks`.
pub fn write_using_token(data: &[u8], medium_blocks: u64) -> Result<WriteUsingToken, Sense> {
    let len = data_length(data, WUT_HEADER_BYTES)?;
    let token = data[16..16 + TOKEN_BYTES].to_vec();
    // The ROD token's own length field (bytes 6..8) counts what follows it.
    if usize::from(be16(&token[6..8])) + 8 != TOKEN_BYTES {
        return Err(Sense::illegal(asc::INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH));
    }
    let declared = usize::from(be16(&data[534..536]));
    if WUT_HEADER_BYTES + declared > len {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let parsed = WriteUsingToken {
        immediate: data[2] & 0x01 != 0,
        offset_blocks: be64(&data[8..16]),
        token,
        ranges: ranges(data, WUT_HEADER_BYTES, declared, medium_blocks)?,
    };
    match parsed.rod_type() {
        ROD_TYPE_POINT_IN_TIME | ROD_TYPE_BLOCK_ZERO => Ok(parsed),
        _ => Err(Sense::illegal(asc::INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE)),
    }
}

/// EXTENDED COPY (LID1)'s parameter list, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendedCopy {
    pub list_id: u8,
    /// LIST ID USAGE 00b: the initiator may ask for the copy's status (RECEIVE COPY RESULTS),
    /// so it is kept under its list identifier; otherwise nothing is kept.
    pub hold: bool,
    pub segments: Vec<Segment>,
}

/// Reads EXTENDED COPY (LID1)'s parameter list (SPC-4 6.4.3): which volumes its CSCD
/// descriptors name (`this_naa` is this unit's 60-bit NAA identifier) and its segments, in
/// the order libiscsi's conformance tests hold a copy manager to: the list's length against
/// the limit, then against the data, then the descriptor counts, then each descriptor. Every
/// CSCD must give `block_size` as its disk block length. A segment that names a CSCD the list
/// lacks is COPY ABORTED (SPC-4 6.4.6), not an illegal request.
pub fn extended_copy(data: &[u8], this_naa: u64, block_size: u32) -> Result<ExtendedCopy, Sense> {
    let length_error = || Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR);
    if data.len() < XCOPY_HEADER_BYTES {
        return Err(length_error());
    }
    let list_id = data[0];
    let hold = (data[1] >> 3) & 0x03 == 0;
    let cscd_bytes = usize::from(be16(&data[2..4]));
    let segment_bytes = be32(&data[8..12]) as usize;
    let inline_bytes = be32(&data[12..16]) as usize;
    if cscd_bytes + segment_bytes > DESCRIPTOR_LIST_BYTES_MAX as usize {
        return Err(length_error());
    }
    if data.len() < XCOPY_HEADER_BYTES + cscd_bytes + segment_bytes + inline_bytes {
        return Err(length_error());
    }
    if inline_bytes != 0 {
        return Err(Sense::illegal(asc::INLINE_DATA_LENGTH_EXCEEDED));
    }
    if cscd_bytes % CSCD_BYTES != 0 {
        return Err(Sense::invalid_parameter_field(2));
    }
    if cscd_bytes / CSCD_BYTES > usize::from(CSCD_DESCRIPTORS_MAX) {
        return Err(Sense::illegal(asc::TOO_MANY_TARGET_DESCRIPTORS));
    }
    let mut units = Vec::with_capacity(cscd_bytes / CSCD_BYTES);
    for i in 0..cscd_bytes / CSCD_BYTES {
        let at = XCOPY_HEADER_BYTES + CSCD_BYTES * i;
        units.push(cscd(&data[at..at + CSCD_BYTES], at, this_naa, block_size));
    }
    let mut segments = Vec::new();
    let mut at = XCOPY_HEADER_BYTES + cscd_bytes;
    let end = at + segment_bytes;
    while at < end {
        if segments.len() == usize::from(SEGMENT_DESCRIPTORS_MAX) {
            return Err(Sense::illegal(asc::TOO_MANY_SEGMENT_DESCRIPTORS));
        }
        if end - at < 4 {
            return Err(length_error());
        }
        let kind = data[at];
        let expected = match kind {
            SEGMENT_BLOCK_TO_BLOCK => SEGMENT_BLOCK_TO_BLOCK_BYTES,
            SEGMENT_BLOCK_TO_BLOCK_OFFSET => SEGMENT_BLOCK_TO_BLOCK_OFFSET_BYTES,
            _ => return Err(Sense::illegal(asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)),
        };
        if usize::from(be16(&data[at + 2..at + 4])) + 4 != expected {
            return Err(Sense::invalid_parameter_field(at as u16 + 2));
        }
        if end - at < expected {
            return Err(length_error());
        }
        let d = &data[at..at + expected];
        // CAT (byte 1 bit 0) only matters for held data, which block to block copies have none
        // of; DC (bit 1) says whose block size NUMBER OF BLOCKS counts, and both are ours.
        let unit = |index: u16| match units.get(usize::from(index)) {
            Some(Ok(unit)) => Ok(*unit),
            Some(Err(sense)) => Err(*sense),
            None => Err(unreachable()),
        };
        let source = unit(be16(&d[4..6]))?;
        let destination = unit(be16(&d[6..8]))?;
        let bs = u64::from(block_size);
        let (len, source_skip, destination_skip) = if kind == SEGMENT_BLOCK_TO_BLOCK {
            (u64::from(be16(&d[10..12])) * bs, 0, 0)
        } else {
            (u64::from(be32(&d[8..12])), u64::from(be16(&d[28..30])), u64::from(be16(&d[30..32])))
        };
        if len > u64::from(segment_bytes_max(block_size)) {
            return Err(Sense::invalid_parameter_field(at as u16 + 8));
        }
        segments.push(Segment {
            source,
            source_offset: be64(&d[12..20]).saturating_mul(bs).saturating_add(source_skip),
            destination,
            destination_offset: be64(&d[20..28]).saturating_mul(bs).saturating_add(destination_skip),
            len,
        });
        at += expected;
    }
    Ok(ExtendedCopy { list_id, hold, segments })
}

/// One identification CSCD descriptor (SPC-4 6.4.5.4) at byte `at` of the list: this unit, or
/// another by its NAA designator. A descriptor of another type is refused outright; one that
/// names nothing this copy manager can reach fails only the segments that use it.
fn cscd(d: &[u8], at: usize, this_naa: u64, block_size: u32) -> Result<CopyUnit, Sense> {
    if d[0] != CSCD_IDENTIFICATION {
        return Err(Sense::illegal(asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE));
    }
    // Byte 1: LU ID TYPE (bits 7..6; SPC-4 ignores it for identification descriptors), NUL
    // (bit 5: a null device, which block copies cannot use), the peripheral device type (bits
    // 4..0: a block device).
    if d[1] & 0x20 != 0 {
        return Err(unreachable());
    }
    if d[1] & 0x1F != 0 {
        return Err(Sense::invalid_parameter_field(at as u16 + 1));
    }
    let disk_block = u32::from_be_bytes([0, d[29], d[30], d[31]]);
    if disk_block != block_size {
        return Err(Sense::invalid_parameter_field(at as u16 + 29));
    }
    // Only NAA designators (binary, 8 bytes) name volumes, whatever association the initiator
    // copied from VPD 0x83; anything else is no unit we can reach.
    let code_set = d[4] & 0x0F;
    let kind = d[5] & 0x0F;
    if code_set != 0x1 || kind != 0x3 || d[7] != 8 {
        return Err(unreachable());
    }
    let naa = be64(&d[8..16]);
    if naa == u64::from_be_bytes(inquiry::naa_locally_assigned(this_naa)) {
        Ok(CopyUnit::This)
    } else {
        Ok(CopyUnit::Naa(naa))
    }
}

/// COPY ABORTED / UNREACHABLE COPY TARGET: a CSCD that names no unit this copy manager reaches.
pub fn unreachable() -> Sense {
    Sense::new(SenseKey::CopyAborted, asc::UNREACHABLE_COPY_TARGET)
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.4): the limits of EXTENDED COPY
/// (LID1) here, for a unit of `block_size`.
pub fn operating_parameters(block_size: u32) -> Vec<u8> {
    let implemented = [SEGMENT_BLOCK_TO_BLOCK, SEGMENT_BLOCK_TO_BLOCK_OFFSET, CSCD_IDENTIFICATION];
    let mut b = vec![0u8; 44];
    b[0..4].copy_from_slice(&((44 + implemented.len() - 4) as u32).to_be_bytes());
    b[4] = 0x01; // SNLID: list identifiers are kept per nexus
    b[8..10].copy_from_slice(&CSCD_DESCRIPTORS_MAX.to_be_bytes());
    b[10..12].copy_from_slice(&SEGMENT_DESCRIPTORS_MAX.to_be_bytes());
    b[12..16].copy_from_slice(&DESCRIPTOR_LIST_BYTES_MAX.to_be_bytes());
    b[16..20].copy_from_slice(&segment_bytes_max(block_size).to_be_bytes());
    // Maximum inline data, held data limit, maximum stream transfer: none.
    b[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
    b[36] = 1; // maximum concurrent copies
    b[37] = block_size.trailing_zeros() as u8; // data segment granularity (log2 bytes)
    b[43] = implemented.len() as u8;
    b.extend_from_slice(&implemented);
    b
}

/// The most bytes one block to block segment copies: 65535 blocks.
fn segment_bytes_max(block_size: u32) -> u32 {
    u32::from(u16::MAX).saturating_mul(block_size)
}

/// RECEIVE COPY RESULTS, COPY STATUS (SPC-4 6.18.3) of an EXTENDED COPY (LID1).
pub fn copy_status(op: &Operation, block_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 12];
    b[0..4].copy_from_slice(&8u32.to_be_bytes());
    b[4] = op.status.code();
    b[5..7].copy_from_slice(&op.segments.to_be_bytes());
    // Transfer count in bytes when it fits, else in KiB (TRANSFER COUNT UNITS 1).
    let bytes = op.blocks.saturating_mul(u64::from(block_size));
    match u32::try_from(bytes) {
        Ok(n) => b[8..12].copy_from_slice(&n.to_be_bytes()),
        Err(_) => {
            b[7] = 0x01;
            b[8..12].copy_from_slice(&u32::try_from(bytes >> 10).unwrap_or(u32::MAX).to_be_bytes());
        }
    }
    b
}

/// RECEIVE ROD TOKEN INFORMATION (SPC-4 6.19.4, SBC-4 5.7.4, 5.33.4) of a POPULATE TOKEN or
/// WRITE USING TOKEN: its status, the blocks it did, its sense data, and the token it made.
pub fn rod_token_information(op: &Operation, descriptor_sense: bool) -> Vec<u8> {
    let sense = op.sense.map(|s| s.to_bytes(descriptor_sense)).unwrap_or_default();
    let mut b = vec![0u8; 32];
    b[4] = op.action & 0x1F;
    b[5] = op.status.code();
    // Bytes 6..8 operation counter, 8..12 estimated status update delay: 0.
    b[12] = if op.sense.is_some() { 0x02 } else { 0x00 }; // completion status: CHECK CONDITION or GOOD
    b[13] = sense.len() as u8;
    b[14] = sense.len() as u8;
    b[15] = 0xF1; // transfer count units: logical blocks
    b[16..24].copy_from_slice(&op.blocks.to_be_bytes());
    b[24..26].copy_from_slice(&op.segments.to_be_bytes());
    b.extend_from_slice(&sense);
    match &op.token {
        Some(token) => {
            // One ROD token descriptor: two reserved bytes, then the token.
            b.extend_from_slice(&((token.len() + 2) as u32).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(token);
        }
        None => b.extend_from_slice(&0u32.to_be_bytes()),
    }
    let available = (b.len() - 4) as u32;
    b[0..4].copy_from_slice(&available.to_be_bytes());
    b
}

/// What the third-party copy VPD page advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyLimits {
    pub block_size: u32,
    /// Seconds a token may go unused: the most a host may ask for, and the default.
    pub inactivity_max_s: u32,
    pub inactivity_default_s: u32,
    /// Seconds a token lives at most.
    pub lifetime_s: u32,
    /// Blocks one token may stand for.
    pub token_blocks_max: u64,
    /// A token's ranges start and end on multiples of this many blocks.
    pub granularity_blocks: u16,
}

impl CopyLimits {
    /// Tandem's token limits (those of `tandem_frontend::copy`) for a unit of `geometry`: a
    /// token may stand for the whole medium.
    pub fn for_geometry(geometry: &crate::lu::Geometry) -> CopyLimits {
        use tandem_frontend::copy::{TOKEN_IDLE_DEFAULT, TOKEN_IDLE_MAX, TOKEN_LIFETIME};
        CopyLimits {
            block_size: geometry.block_size,
            inactivity_max_s: TOKEN_IDLE_MAX.as_secs() as u32,
            inactivity_default_s: TOKEN_IDLE_DEFAULT.as_secs() as u32,
            lifetime_s: TOKEN_LIFETIME.as_secs() as u32,
            token_blocks_max: geometry.blocks,
            granularity_blocks: (tandem_frontend::copy::TOKEN_GRANULARITY_BYTES / u64::from(geometry.block_size.max(1)))
                .clamp(1, u64::from(u16::MAX)) as u16,
        }
    }
}

/// The third-party copy VPD page's body (SPC-4 7.8.17): supported commands, parameter data,
/// supported descriptors, general copy operations, the block device ROD token limits
/// (SBC-4 6.6.7), the ROD token features and the supported ROD types.
pub fn vpd_third_party_copy(limits: &CopyLimits) -> Vec<u8> {
    let mut out = Vec::new();
    // Block device ROD token limits (0000h).
    let mut d = vec![0u8; 36];
    d[10..12].copy_from_slice(&RANGE_DESCRIPTORS_MAX.to_be_bytes());
    d[12..16].copy_from_slice(&limits.inactivity_max_s.to_be_bytes());
    d[16..20].copy_from_slice(&limits.inactivity_default_s.to_be_bytes());
    d[20..28].copy_from_slice(&limits.token_blocks_max.to_be_bytes());
    d[28..36].copy_from_slice(&limits.token_blocks_max.to_be_bytes()); // optimal transfer count
    descriptor(&mut out, 0x0000, &d);
    // Supported commands (0001h): 83h with its three actions, 84h with its five.
    let mut list =
        vec![0x83, 3, out_action::EXTENDED_COPY_LID1, out_action::POPULATE_TOKEN, out_action::WRITE_USING_TOKEN];
    list.extend_from_slice(&[
        0x84,
        3,
        in_action::COPY_STATUS,
        in_action::OPERATING_PARAMETERS,
        in_action::RECEIVE_ROD_TOKEN_INFORMATION,
    ]);
    let mut d = vec![list.len() as u8];
    d.extend_from_slice(&list);
    descriptor(&mut out, 0x0001, &d);
    // Parameter data (0004h).
    let mut d = vec![0u8; 28];
    d[4..6].copy_from_slice(&CSCD_DESCRIPTORS_MAX.to_be_bytes());
    d[6..8].copy_from_slice(&SEGMENT_DESCRIPTORS_MAX.to_be_bytes());
    d[8..12].copy_from_slice(&DESCRIPTOR_LIST_BYTES_MAX.to_be_bytes());
    descriptor(&mut out, 0x0004, &d);
    // Supported descriptors (0008h).
    descriptor(&mut out, 0x0008, &[3, SEGMENT_BLOCK_TO_BLOCK, SEGMENT_BLOCK_TO_BLOCK_OFFSET, CSCD_IDENTIFICATION]);
    // Supported CSCD descriptor IDs (000Ch): none beyond the descriptors themselves.
    descriptor(&mut out, 0x000C, &[0, 0]);
    // ROD token features (0106h): local tokens only (remote tokens 0), the lifetimes, and one
    // block device features descriptor.
    let mut d = vec![0u8; 44];
    d[12..16].copy_from_slice(&1u32.to_be_bytes()); // minimum token lifetime
    d[16..20].copy_from_slice(&limits.lifetime_s.to_be_bytes());
    d[20..24].copy_from_slice(&limits.inactivity_max_s.to_be_bytes());
    d[42..44].copy_from_slice(&48u16.to_be_bytes());
    let mut block = vec![0u8; 48];
    // Byte 0: peripheral device type 00h (block); bytes 2..4: descriptor length.
    block[2..4].copy_from_slice(&44u16.to_be_bytes());
    block[6..8].copy_from_slice(&limits.granularity_blocks.to_be_bytes()); // optimal block ROD length granularity
    let bytes_max = limits.token_blocks_max.saturating_mul(u64::from(limits.block_size));
    block[8..16].copy_from_slice(&bytes_max.to_be_bytes()); // maximum bytes in block ROD
    block[16..24].copy_from_slice(&bytes_max.to_be_bytes()); // optimal bytes in block ROD transfer
    block[24..32].copy_from_slice(&bytes_max.to_be_bytes()); // optimal bytes to token per segment
    block[32..40].copy_from_slice(&bytes_max.to_be_bytes()); // optimal bytes from token per segment
    d.extend_from_slice(&block);
    descriptor(&mut out, 0x0106, &d);
    // Supported ROD types (0108h): the point-in-time token in and out, and the zero token in.
    let mut d = vec![0u8; 4];
    d[2..4].copy_from_slice(&16u16.to_be_bytes());
    for (rod, flags) in [(ROD_TYPE_POINT_IN_TIME, 0x03u8), (ROD_TYPE_BLOCK_ZERO, 0x02)] {
        let mut t = [0u8; 8];
        t[0..4].copy_from_slice(&rod.to_be_bytes());
        t[4] = flags; // TOKEN_IN (bit 1), TOKEN_OUT (bit 0)
        d.extend_from_slice(&t);
    }
    descriptor(&mut out, 0x0108, &d);
    // General copy operations (8001h).
    let mut d = vec![0u8; 32];
    d[0..4].copy_from_slice(&1u32.to_be_bytes()); // total concurrent copies
    d[4..8].copy_from_slice(&1u32.to_be_bytes()); // maximum identified concurrent copies
    d[8..12].copy_from_slice(&segment_bytes_max(limits.block_size).to_be_bytes());
    d[12] = limits.block_size.trailing_zeros() as u8; // data segment granularity (log2)
    descriptor(&mut out, 0x8001, &d);
    out
}

/// Appends a third-party copy descriptor: its type, its length, its body padded to 4 bytes.
fn descriptor(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    let padded = body.len().div_ceil(4) * 4;
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(padded as u16).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + padded - body.len(), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cscd_naa(naa: [u8; 8], block: u32) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[0] = CSCD_IDENTIFICATION;
        d[4] = 0x01;
        d[5] = 0x03;
        d[7] = 8;
        d[8..16].copy_from_slice(&naa);
        d[29..32].copy_from_slice(&block.to_be_bytes()[1..]);
        d
    }

    fn b2b(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> [u8; 28] {
        let mut d = [0u8; 28];
        d[0] = SEGMENT_BLOCK_TO_BLOCK;
        d[2..4].copy_from_slice(&24u16.to_be_bytes());
        d[4..6].copy_from_slice(&src.to_be_bytes());
        d[6..8].copy_from_slice(&dst.to_be_bytes());
        d[10..12].copy_from_slice(&blocks.to_be_bytes());
        d[12..20].copy_from_slice(&src_lba.to_be_bytes());
        d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
        d
    }

    fn xcopy(cscds: &[[u8; 32]], segments: &[[u8; 28]]) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[0] = 7;
        b[2..4].copy_from_slice(&((32 * cscds.len()) as u16).to_be_bytes());
        b[8..12].copy_from_slice(&((28 * segments.len()) as u32).to_be_bytes());
        for c in cscds {
            b.extend_from_slice(c);
        }
        for s in segments {
            b.extend_from_slice(s);
        }
        b
    }

    #[test]
    fn an_extended_copy_names_this_unit_and_others_by_naa() {
        let this = inquiry::naa_locally_assigned(0x123);
        let other = inquiry::naa_locally_assigned(0x456);
        let mut offset_segment = [0u8; 32];
        offset_segment[0] = SEGMENT_BLOCK_TO_BLOCK_OFFSET;
        offset_segment[2..4].copy_from_slice(&28u16.to_be_bytes());
        offset_segment[8..12].copy_from_slice(&4096u32.to_be_bytes());
        offset_segment[12..20].copy_from_slice(&2u64.to_be_bytes());
        offset_segment[20..28].copy_from_slice(&3u64.to_be_bytes());
        offset_segment[28..30].copy_from_slice(&100u16.to_be_bytes());
        let mut data =
            xcopy(&[cscd_naa(this, 512), cscd_naa(other, 512)], &[b2b(0, 1, 16, 10, 20), b2b(1, 0, 1, 5, 6)]);
        data.extend_from_slice(&offset_segment);
        data[11] += 32;
        let x = extended_copy(&data, 0x123, 512).unwrap();
        assert_eq!(x.list_id, 7);
        assert!(x.hold);
        let other = CopyUnit::Naa(u64::from_be_bytes(other));
        let seg = |source, source_offset, destination, destination_offset, len| Segment {
            source,
            source_offset,
            destination,
            destination_offset,
            len,
        };
        assert_eq!(
            x.segments,
            vec![
                seg(CopyUnit::This, 10 * 512, other, 20 * 512, 16 * 512),
                seg(other, 5 * 512, CopyUnit::This, 6 * 512, 512),
                seg(CopyUnit::This, 2 * 512 + 100, CopyUnit::This, 3 * 512, 4096),
            ]
        );
        // LIST ID USAGE 10b: nothing kept.
        data[1] = 0x10;
        assert!(!extended_copy(&data, 0x123, 512).unwrap().hold);
    }

    #[test]
    fn bad_extended_copy_lists_get_the_sense_libiscsi_expects() {
        let this = inquiry::naa_locally_assigned(1);
        let ok = xcopy(&[cscd_naa(this, 512)], &[b2b(0, 0, 1, 0, 1)]);
        assert!(extended_copy(&ok, 1, 512).is_ok());
        // Truncated anywhere: a parameter list length error, never a panic.
        for cut in 0..ok.len() {
            let e = extended_copy(&ok[..cut], 1, 512).unwrap_err();
            assert_eq!(e.asc, asc::PARAMETER_LIST_LENGTH_ERROR, "cut at {cut}");
        }
        let mut bad = ok.clone();
        bad[16] = 0xE0;
        assert_eq!(extended_copy(&bad, 1, 512).unwrap_err().asc, asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE);
        let mut bad = ok.clone();
        bad[48] = 0x03;
        assert_eq!(extended_copy(&bad, 1, 512).unwrap_err().asc, asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE);
        // A segment naming CSCD 1 of 1, or a null CSCD: COPY ABORTED.
        let mut bad = ok.clone();
        bad[48 + 7] = 1;
        assert_eq!(extended_copy(&bad, 1, 512).unwrap_err(), unreachable());
        let mut null = ok.clone();
        null[17] = 0x20;
        assert_eq!(extended_copy(&null, 1, 512).unwrap_err(), unreachable());
        // A reserved LU ID TYPE is ignored (SPC-4).
        let mut luid = ok.clone();
        luid[17] = 0x80;
        assert!(extended_copy(&luid, 1, 512).is_ok());
        let nine = xcopy(&[cscd_naa(this, 512); 9], &[b2b(0, 0, 1, 0, 1)]);
        assert_eq!(extended_copy(&nine, 1, 512).unwrap_err().asc, asc::TOO_MANY_TARGET_DESCRIPTORS);
        let many = xcopy(&[cscd_naa(this, 512)], &[b2b(0, 0, 1, 0, 1); 65]);
        assert_eq!(extended_copy(&many, 1, 512).unwrap_err().asc, asc::TOO_MANY_SEGMENT_DESCRIPTORS);
        // Over the descriptor list limit: a length error, before the counts.
        let both = xcopy(&[cscd_naa(this, 512); 9], &[b2b(0, 0, 1, 0, 1); 65]);
        assert_eq!(extended_copy(&both, 1, 512).unwrap_err().asc, asc::PARAMETER_LIST_LENGTH_ERROR);
        let wrong_block = xcopy(&[cscd_naa(this, 4096)], &[b2b(0, 0, 1, 0, 1)]);
        assert_eq!(extended_copy(&wrong_block, 1, 512).unwrap_err().asc, asc::INVALID_FIELD_IN_PARAMETER_LIST);
        let mut t10 = cscd_naa(this, 512);
        t10[5] = 0x01;
        let unreachable_unit = xcopy(&[t10], &[b2b(0, 0, 1, 0, 1)]);
        assert_eq!(extended_copy(&unreachable_unit, 1, 512).unwrap_err(), unreachable());
        let mut inline = ok.clone();
        inline[15] = 4;
        inline.extend_from_slice(&[0; 4]);
        assert_eq!(extended_copy(&inline, 1, 512).unwrap_err().asc, asc::INLINE_DATA_LENGTH_EXCEEDED);
    }

    /// A parameter list `header` followed by block device range descriptors, its data length
    /// (bytes 0..2) set.
    fn with_ranges(mut b: Vec<u8>, ranges: &[(u64, u32)]) -> Vec<u8> {
        for (lba, blocks) in ranges {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&lba.to_be_bytes());
            d[8..12].copy_from_slice(&blocks.to_be_bytes());
            b.extend_from_slice(&d);
        }
        let len = (b.len() - 2) as u16;
        b[0..2].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn populate(ranges: &[(u64, u32)], timeout: u32) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[4..8].copy_from_slice(&timeout.to_be_bytes());
        b[14..16].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
        with_ranges(b, ranges)
    }

    #[test]
    fn populate_token_reads_ranges_within_the_medium() {
        let p = populate_token(&populate(&[(0, 8), (100, 0), (1000, 24)], 30), 2048).unwrap();
        assert_eq!(p.ranges, vec![(0, 8), (1000, 24)]);
        assert_eq!(p.inactivity_timeout_s, 30);
        assert_eq!(populate_token(&populate(&[(2040, 9)], 0), 2048).unwrap_err(), Sense::lba_out_of_range());
        assert_eq!(populate_token(&populate(&[(u64::MAX, 9)], 0), 2048).unwrap_err(), Sense::lba_out_of_range());
        let many: Vec<(u64, u32)> = (0..65).map(|i| (i, 1)).collect();
        assert_eq!(populate_token(&populate(&many, 0), 2048).unwrap_err().asc, asc::TOO_MANY_SEGMENT_DESCRIPTORS);
        let mut rtv = populate(&[(0, 8)], 0);
        rtv[2] = 0x02;
        rtv[8..12].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        assert_eq!(populate_token(&rtv, 2048).unwrap_err().asc, asc::INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE);
        let whole = populate(&[(0, 8), (16, 8)], 0);
        for cut in 0..whole.len() {
            assert!(populate_token(&whole[..cut], 2048).is_err(), "cut at {cut}");
        }
    }

    fn wut(token: &[u8; 512], offset: u64, ranges: &[(u64, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 536];
        b[8..16].copy_from_slice(&offset.to_be_bytes());
        b[16..528].copy_from_slice(token);
        b[534..536].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
        with_ranges(b, ranges)
    }

    fn token_of(rod: u32) -> [u8; 512] {
        let mut t = [0u8; 512];
        t[0..4].copy_from_slice(&rod.to_be_bytes());
        t[6..8].copy_from_slice(&0x1F8u16.to_be_bytes());
        t[100] = 0xAB;
        t
    }

    #[test]
    fn write_using_token_reads_the_token_and_ranges() {
        let token = token_of(ROD_TYPE_POINT_IN_TIME);
        let w = write_using_token(&wut(&token, 5, &[(64, 8)]), 2048).unwrap();
        assert_eq!(w.token, token.to_vec());
        assert_eq!(w.offset_blocks, 5);
        assert_eq!(w.ranges, vec![(64, 8)]);
        assert_eq!(
            write_using_token(&wut(&token_of(ROD_TYPE_BLOCK_ZERO), 0, &[(0, 1)]), 2048).unwrap().rod_type(),
            ROD_TYPE_BLOCK_ZERO
        );
        assert_eq!(
            write_using_token(&wut(&token_of(0x1234), 0, &[(0, 1)]), 2048).unwrap_err().asc,
            asc::INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE
        );
        let mut short = token;
        short[7] = 0x10;
        assert_eq!(
            write_using_token(&wut(&short, 0, &[(0, 1)]), 2048).unwrap_err().asc,
            asc::INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH
        );
        assert_eq!(write_using_token(&wut(&token, 0, &[(2048, 1)]), 2048).unwrap_err(), Sense::lba_out_of_range());
        let whole = wut(&token, 0, &[(0, 1)]);
        for cut in 0..whole.len() {
            assert!(write_using_token(&whole[..cut], 2048).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn rod_token_information_carries_the_token_after_two_reserved_bytes() {
        let token = token_of(ROD_TYPE_POINT_IN_TIME).to_vec();
        let op = Operation {
            list_id: 9,
            action: out_action::POPULATE_TOKEN,
            status: OpStatus::Good,
            blocks: 2048,
            segments: 1,
            sense: None,
            token: Some(token.clone()),
        };
        let b = rod_token_information(&op, false);
        assert_eq!(be32(&b[0..4]) as usize, b.len() - 4);
        assert_eq!(b[4], 0x10);
        assert_eq!(b[5], 0x01);
        assert_eq!(b[12], 0);
        assert_eq!((b[13], b[14], b[15]), (0, 0, 0xF1));
        assert_eq!(be64(&b[16..24]), 2048);
        assert_eq!(be32(&b[32..36]), 514);
        assert_eq!(&b[38..38 + 512], token.as_slice());

        let failed = Operation {
            action: out_action::WRITE_USING_TOKEN,
            status: OpStatus::Failed,
            blocks: 0,
            sense: Some(Sense::illegal(asc::INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN)),
            token: None,
            ..op
        };
        let b = rod_token_information(&failed, false);
        assert_eq!((b[4], b[5], b[12]), (0x11, 0x02, 0x02));
        let sense_len = usize::from(b[13]);
        assert_eq!(sense_len, 18);
        assert_eq!(Sense::decode(&b[32..32 + sense_len]).unwrap().asc, asc::INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN);
        assert_eq!(be32(&b[32 + sense_len..36 + sense_len]), 0);
    }

    #[test]
    fn operations_are_kept_per_list_id_and_bounded() {
        let mut ops = Operations::default();
        let op = |id| Operation {
            list_id: id,
            action: 0,
            status: OpStatus::Good,
            blocks: u64::from(id),
            segments: 0,
            sense: None,
            token: None,
        };
        for id in 0..100 {
            ops.finish(op(id));
        }
        assert!(ops.get(0).is_none());
        assert_eq!(ops.get(99).unwrap().blocks, 99);
        assert_eq!(ops.done.len(), OPERATIONS_REMEMBERED);
        ops.finish(Operation { blocks: 7, ..op(99) });
        assert_eq!(ops.get(99).unwrap().blocks, 7);
        assert_eq!(ops.done.len(), OPERATIONS_REMEMBERED);
    }

    #[test]
    fn the_vpd_page_lists_descriptors_with_their_lengths() {
        let limits = CopyLimits {
            block_size: 512,
            inactivity_max_s: 3600,
            inactivity_default_s: 600,
            lifetime_s: 3600,
            token_blocks_max: 1 << 21,
            granularity_blocks: 8,
        };
        let b = vpd_third_party_copy(&limits);
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < b.len() {
            let kind = be16(&b[at..at + 2]);
            let len = usize::from(be16(&b[at + 2..at + 4]));
            assert_eq!(len % 4, 0, "descriptor {kind:#x} is padded");
            if kind == 0 {
                assert_eq!(be16(&b[at + 14..at + 16]), RANGE_DESCRIPTORS_MAX);
                assert_eq!(be32(&b[at + 16..at + 20]), 3600);
                assert_eq!(be32(&b[at + 20..at + 24]), 600);
                assert_eq!(be64(&b[at + 24..at + 32]), 1 << 21);
            }
            if kind == 1 {
                let list = &b[at + 5..at + 5 + usize::from(b[at + 4])];
                assert_eq!(list, &[0x83, 3, 0x00, 0x10, 0x11, 0x84, 3, 0x00, 0x03, 0x07]);
            }
            kinds.push(kind);
            at += 4 + len;
        }
        assert_eq!(at, b.len());
        assert_eq!(kinds, vec![0x0000, 0x0001, 0x0004, 0x0008, 0x000C, 0x0106, 0x0108, 0x8001]);
    }

    #[test]
    fn operating_parameters_and_copy_status_lay_out_as_spc4_says() {
        let b = operating_parameters(512);
        assert_eq!(be32(&b[0..4]) as usize, b.len() - 4);
        assert_eq!(be16(&b[8..10]), CSCD_DESCRIPTORS_MAX);
        assert_eq!(be16(&b[10..12]), SEGMENT_DESCRIPTORS_MAX);
        assert_eq!(b[37], 9);
        assert_eq!(&b[44..], &[0x02, 0x0A, 0xE4]);
        let op = Operation {
            list_id: 1,
            action: 0,
            status: OpStatus::Good,
            blocks: 16,
            segments: 2,
            sense: None,
            token: None,
        };
        let s = copy_status(&op, 512);
        assert_eq!(s, vec![0, 0, 0, 8, 0x01, 0, 2, 0, 0, 0, 0x20, 0]);
        let big = copy_status(&Operation { blocks: 1 << 30, ..op }, 512);
        assert_eq!(big[7], 1);
        assert_eq!(be32(&big[8..12]), 1 << 29);
    }
}
