//! iSCSI PDUs as bytes: the 48-byte Basic Header Segment (BHS), every PDU type of RFC 7143 §11
//! in both directions, and their framing (Additional Header Segments, digests, padding).
//! Sans-IO: no sockets, no tokio.
//!
//! Decoding takes two steps so that a driver reads exactly what it needs and never more than a
//! limit: [`parse_bhs`] looks at the first [`BHS_BYTES`] and says how many bytes follow (AHS,
//! digests, data segment and padding), refusing a DataSegmentLength above the negotiated
//! MaxRecvDataSegmentLength before anything is read or allocated; [`decode`] then takes the
//! header and those bytes, checks the digests and returns a [`Pdu`]. Encoding appends a whole
//! PDU to a `Vec<u8>` with [`Pdu::encode`].
//!
//! What this module is not: a session. Sequence numbers, task tags, whether a PDU is allowed in
//! the current phase and what it means for a task are checked above it. It checks what the
//! bytes alone can tell: lengths, digests, field values the RFC reserves. Reserved fields are
//! written as zero and ignored when read (RFC 7143 §11.2.1 asks receivers to ignore them), so
//! decoding then re-encoding may clear bits but never changes a decoded value.
//!
//! All integers are big-endian except the digests (see [`crate::digest`]). LUNs are kept as
//! the raw 8-byte field; their structure (SAM-5 addressing) is the SCSI layer's business.

use bytes::Bytes;
use thiserror::Error;

use crate::digest::{self, DIGEST_BYTES};

/// The Basic Header Segment: every PDU starts with exactly this many bytes.
pub const BHS_BYTES: usize = 48;
/// DataSegmentLength is a 24-bit field.
pub const DATA_SEGMENT_BYTES_MAX: u32 = (1 << 24) - 1;
/// TotalAHSLength counts 4-byte words in one byte.
pub const TOTAL_AHS_BYTES_MAX: usize = 255 * 4;
/// CDB bytes carried in the BHS; longer CDBs continue in an Extended CDB AHS.
pub const BHS_CDB_BYTES: usize = 16;
/// The longest CDB SCSI defines (a variable-length CDB, SPC-4 §4.2.3). The AHS could carry
/// about 1 KiB; nothing legitimate needs more than this, so longer is an invalid field.
pub const CDB_BYTES_MAX: usize = 260;
/// The "no tag" value of task tags, target transfer tags and SNACK tags.
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// The data segment and every AHS are padded to this many bytes.
pub const PAD_BYTES: usize = 4;

/// Bit 6 of byte 0 on initiator PDUs: deliver without regard to CmdSN order.
pub const IMMEDIATE_BIT: u8 = 0x40;
/// The opcode is the low six bits of byte 0.
pub const OPCODE_MASK: u8 = 0x3f;
/// Bit 7 of byte 1: F (final) on most PDUs, T (transit) on Login PDUs.
const FINAL_BIT: u8 = 0x80;
/// Bit 6 of byte 1 on Login and Text PDUs: C (continue).
const CONTINUE_BIT: u8 = 0x40;

/// PDU opcodes (RFC 7143 §11.2.1.2).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// AHS types (RFC 7143 §11.2.2.1).
pub mod ahs_type {
    pub const EXTENDED_CDB: u8 = 1;
    pub const BIDI_READ_EXPECTED_LENGTH: u8 = 2;
}

/// The Response byte of a SCSI Response (RFC 7143 §11.4.3).
pub mod scsi_response {
    pub const COMMAND_COMPLETED_AT_TARGET: u8 = 0x00;
    pub const TARGET_FAILURE: u8 = 0x01;
}

/// Task management functions (RFC 7143 §11.5.1).
pub mod tmf_function {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
}

/// Task management responses (RFC 7143 §11.6.1).
pub mod tmf_response {
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const FUNCTION_NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const FUNCTION_REJECTED: u8 = 255;
}

/// Logout reason codes (RFC 7143 §11.14.1).
pub mod logout_reason {
    pub const CLOSE_SESSION: u8 = 0;
    pub const CLOSE_CONNECTION: u8 = 1;
    pub const REMOVE_CONNECTION_FOR_RECOVERY: u8 = 2;
}

/// Logout responses (RFC 7143 §11.15.1).
pub mod logout_response {
    pub const CLOSED: u8 = 0;
    pub const CID_NOT_FOUND: u8 = 1;
    pub const RECOVERY_NOT_SUPPORTED: u8 = 2;
    pub const CLEANUP_FAILED: u8 = 3;
}

/// Asynchronous event codes (RFC 7143 §11.9.1).
pub mod async_event {
    pub const SCSI_EVENT: u8 = 0;
    pub const LOGOUT_REQUEST: u8 = 1;
    pub const CONNECTION_DROP: u8 = 2;
    pub const SESSION_DROP: u8 = 3;
    pub const NEGOTIATION_REQUEST: u8 = 4;
    pub const TASK_TERMINATION: u8 = 5;
    pub const VENDOR_SPECIFIC: u8 = 255;
}

/// Reject reasons (RFC 7143 §11.17.1). Note 0x04 is "Protocol Error" and 0x05 "Command not
/// supported", as in the RFC's table and Linux's `ISCSI_REASON_*`.
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OPERATION_REJECT: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// SNACK types (RFC 7143 §11.16.1).
pub mod snack_type {
    pub const DATA_R2T: u8 = 0;
    pub const STATUS: u8 = 1;
    pub const DATA_ACK: u8 = 2;
    pub const R_DATA: u8 = 3;
}

/// Which digests are in effect on a connection (RFC 7143 §13.1). Both are off during login
/// and until the login that negotiated them completes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// A CRC32C follows the BHS and AHS of every PDU.
    pub header: bool,
    /// A CRC32C follows every non-empty data segment (after its padding).
    pub data: bool,
}

impl Digests {
    pub const NONE: Digests = Digests { header: false, data: false };
    pub const BOTH: Digests = Digests { header: true, data: true };
}

/// What the receiver of a PDU accepts: the digests in effect and its MaxRecvDataSegmentLength.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    pub digests: Digests,
    /// The MaxRecvDataSegmentLength this side declared (or the default, 8192, during login).
    pub data_segment_bytes_max: u32,
}

impl DecodeLimits {
    /// Login phase: no digests, and the RFC 7143 §13.12 default MaxRecvDataSegmentLength,
    /// which applies until the login completes.
    pub const LOGIN: DecodeLimits = DecodeLimits { digests: Digests::NONE, data_segment_bytes_max: 8192 };
}

/// Why bytes did not decode into a PDU. Each variant says what RFC 7143 has the receiver do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PduError {
    /// The header digest did not match. Nothing in the header can be trusted, its lengths
    /// included, so the stream cannot be resynchronised: discard the PDU and, at
    /// ErrorRecoveryLevel 0, drop the connection (RFC 7143 §7.8).
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest { computed: u32, received: u32 },
    /// The data digest did not match; the header is sound. Answer with Reject, reason
    /// [`reject_reason::DATA_DIGEST_ERROR`] (or recover a Data-Out with R2T), RFC 7143 §7.8.
    #[error("data digest mismatch on ITT {itt:#x}: computed {computed:#010x}, received {received:#010x}")]
    DataDigest { opcode: u8, itt: u32, computed: u32, received: u32 },
    /// DataSegmentLength exceeds the receiver's MaxRecvDataSegmentLength: a protocol error
    /// (Reject reason 0x04, as Linux's target answers), after which the connection is closed
    /// rather than the oversized segment read.
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max} (ITT {itt:#x})")]
    DataSegmentTooLong { opcode: u8, itt: u32, len: u32, max: u32 },
    /// An opcode RFC 7143 does not define for this direction, or at all: Reject, reason
    /// [`reject_reason::COMMAND_NOT_SUPPORTED`].
    #[error("unknown opcode {opcode:#04x} (ITT {itt:#x})")]
    UnknownOpcode { opcode: u8, itt: u32 },
    /// A field holds a value the RFC does not allow: Reject, reason
    /// [`reject_reason::INVALID_PDU_FIELD`].
    #[error("invalid field in PDU {opcode:#04x} (ITT {itt:#x}): {what}")]
    InvalidField { opcode: u8, itt: u32, what: &'static str },
    /// The bytes after the BHS are not as many as [`parse_bhs`] said: the driver's bug.
    #[error("{found} bytes follow the BHS, expected {expected}")]
    WrongLength { expected: usize, found: usize },
}

impl PduError {
    /// The Reject reason a target answers this error with, or `None` when it must not answer
    /// with a Reject (a header digest error: drop the PDU; a driver bug).
    pub fn reject_reason(&self) -> Option<u8> {
        match self {
            PduError::DataDigest { .. } => Some(reject_reason::DATA_DIGEST_ERROR),
            PduError::DataSegmentTooLong { .. } => Some(reject_reason::PROTOCOL_ERROR),
            PduError::UnknownOpcode { .. } => Some(reject_reason::COMMAND_NOT_SUPPORTED),
            PduError::InvalidField { .. } => Some(reject_reason::INVALID_PDU_FIELD),
            PduError::HeaderDigest { .. } | PduError::WrongLength { .. } => None,
        }
    }

    /// The Initiator Task Tag of the offending PDU, when the header could be trusted.
    pub fn itt(&self) -> Option<u32> {
        match self {
            PduError::DataDigest { itt, .. }
            | PduError::DataSegmentTooLong { itt, .. }
            | PduError::UnknownOpcode { itt, .. }
            | PduError::InvalidField { itt, .. } => Some(*itt),
            PduError::HeaderDigest { .. } | PduError::WrongLength { .. } => None,
        }
    }
}

/// What the BHS alone says about a PDU: enough to read the rest of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BhsInfo {
    /// The six-bit opcode (may be one this crate does not know: [`decode`] reports it).
    pub opcode: u8,
    /// The I bit (meaningful on initiator PDUs only).
    pub immediate: bool,
    /// Bytes of Additional Header Segments (TotalAHSLength × 4).
    pub total_ahs_bytes: usize,
    /// DataSegmentLength: payload bytes, without padding.
    pub data_segment_bytes: usize,
    pub itt: u32,
    /// Bytes that follow the BHS on the wire: AHS, header digest, data segment, padding and
    /// data digest, under the digests of the limits passed to [`parse_bhs`].
    pub rest_bytes: usize,
}

/// Reads the lengths from a BHS and checks DataSegmentLength against the receiver's limit, so
/// that the driver knows how much more to read before it reads or allocates any of it.
pub fn parse_bhs(bhs: &[u8; BHS_BYTES], limits: &DecodeLimits) -> Result<BhsInfo, PduError> {
    let opcode = bhs[0] & OPCODE_MASK;
    let itt = be32(bhs, 16);
    let total_ahs_bytes = usize::from(bhs[4]) * 4;
    let data_segment_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    if data_segment_len > limits.data_segment_bytes_max {
        return Err(PduError::DataSegmentTooLong {
            opcode,
            itt,
            len: data_segment_len,
            max: limits.data_segment_bytes_max,
        });
    }
    let data_segment_bytes = data_segment_len as usize;
    let mut rest_bytes = total_ahs_bytes + data_segment_bytes + digest::pad_bytes(data_segment_bytes);
    if limits.digests.header {
        rest_bytes += DIGEST_BYTES;
    }
    if limits.digests.data && data_segment_bytes > 0 {
        rest_bytes += DIGEST_BYTES;
    }
    Ok(BhsInfo { opcode, immediate: bhs[0] & IMMEDIATE_BIT != 0, total_ahs_bytes, data_segment_bytes, itt, rest_bytes })
}

/// Decodes one PDU from its BHS and the `rest` bytes that [`parse_bhs`] asked for. Checks the
/// header digest first (a bad header is reported before anything in it is believed), then the
/// data digest, then the fields. The data segment shares `rest`'s buffer.
pub fn decode(bhs: &[u8; BHS_BYTES], rest: Bytes, limits: &DecodeLimits) -> Result<Pdu, PduError> {
    let info = parse_bhs(bhs, limits)?;
    if rest.len() != info.rest_bytes {
        return Err(PduError::WrongLength { expected: info.rest_bytes, found: rest.len() });
    }
    let ahs = &rest[..info.total_ahs_bytes];
    let mut at = info.total_ahs_bytes;
    if limits.digests.header {
        let received = digest_at(&rest, at);
        let computed = digest::header_digest(bhs, ahs);
        if computed != received {
            return Err(PduError::HeaderDigest { computed, received });
        }
        at += DIGEST_BYTES;
    }
    let data = rest.slice(at..at + info.data_segment_bytes);
    at += info.data_segment_bytes;
    let padding = &rest[at..at + digest::pad_bytes(info.data_segment_bytes)];
    at += padding.len();
    if limits.digests.data && !data.is_empty() {
        let received = digest_at(&rest, at);
        let computed = digest::data_digest_with_padding(&data, padding);
        if computed != received {
            return Err(PduError::DataDigest { opcode: info.opcode, itt: info.itt, computed, received });
        }
    }
    decode_fields(bhs, &info, ahs, data)
}

fn digest_at(rest: &[u8], at: usize) -> u32 {
    digest::digest_from_wire([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]])
}

// ---------------------------------------------------------------------------------------------
// Field types shared by several PDUs

/// Login stages (CSG and NSG, RFC 7143 §11.12.3). Value 2 is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    SecurityNegotiation = 0,
    LoginOperationalNegotiation = 1,
    FullFeaturePhase = 3,
}

impl Stage {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Stage> {
        match code {
            0 => Some(Stage::SecurityNegotiation),
            1 => Some(Stage::LoginOperationalNegotiation),
            3 => Some(Stage::FullFeaturePhase),
            _ => None,
        }
    }
}

/// The Initiator Session ID: 6 bytes chosen by the initiator (RFC 7143 §11.12.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Isid(pub [u8; 6]);

/// Login Response status (RFC 7143 §11.13.5): class and detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: LoginStatus = LoginStatus { class: 0, detail: 0 };
    pub const TARGET_MOVED_TEMPORARILY: LoginStatus = LoginStatus { class: 1, detail: 1 };
    pub const TARGET_MOVED_PERMANENTLY: LoginStatus = LoginStatus { class: 1, detail: 2 };
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus { class: 2, detail: 0 };
    pub const AUTHENTICATION_FAILURE: LoginStatus = LoginStatus { class: 2, detail: 1 };
    pub const AUTHORIZATION_FAILURE: LoginStatus = LoginStatus { class: 2, detail: 2 };
    pub const NOT_FOUND: LoginStatus = LoginStatus { class: 2, detail: 3 };
    pub const TARGET_REMOVED: LoginStatus = LoginStatus { class: 2, detail: 4 };
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus { class: 2, detail: 5 };
    pub const TOO_MANY_CONNECTIONS: LoginStatus = LoginStatus { class: 2, detail: 6 };
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus { class: 2, detail: 7 };
    pub const CANT_INCLUDE_IN_SESSION: LoginStatus = LoginStatus { class: 2, detail: 8 };
    pub const SESSION_TYPE_NOT_SUPPORTED: LoginStatus = LoginStatus { class: 2, detail: 9 };
    pub const SESSION_DOES_NOT_EXIST: LoginStatus = LoginStatus { class: 2, detail: 0x0a };
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus { class: 2, detail: 0x0b };
    pub const TARGET_ERROR: LoginStatus = LoginStatus { class: 3, detail: 0 };
    pub const SERVICE_UNAVAILABLE: LoginStatus = LoginStatus { class: 3, detail: 1 };
    pub const OUT_OF_RESOURCES: LoginStatus = LoginStatus { class: 3, detail: 2 };

    pub fn is_success(self) -> bool {
        self.class == 0
    }
}

/// SCSI task attributes of a SCSI Command (RFC 7143 §11.3.1); values 5-7 are reserved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TaskAttribute {
    Untagged = 0,
    #[default]
    Simple = 1,
    Ordered = 2,
    HeadOfQueue = 3,
    Aca = 4,
}

impl TaskAttribute {
    fn from_code(code: u8) -> Option<TaskAttribute> {
        match code {
            0 => Some(TaskAttribute::Untagged),
            1 => Some(TaskAttribute::Simple),
            2 => Some(TaskAttribute::Ordered),
            3 => Some(TaskAttribute::HeadOfQueue),
            4 => Some(TaskAttribute::Aca),
            _ => None,
        }
    }
}

/// A residual count with its O/U flag (overflow: the target had more data than expected;
/// underflow: it transferred less). The count is meaningful only with a flag, so none means 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residual {
    #[default]
    None,
    Overflow(u32),
    Underflow(u32),
}

impl Residual {
    /// (overflow flag, underflow flag, count).
    fn parts(self) -> (bool, bool, u32) {
        match self {
            Residual::None => (false, false, 0),
            Residual::Overflow(count) => (true, false, count),
            Residual::Underflow(count) => (false, true, count),
        }
    }

    fn from_parts(overflow: bool, underflow: bool, count: u32) -> Result<Residual, &'static str> {
        match (overflow, underflow) {
            (false, false) => Ok(Residual::None),
            (true, false) => Ok(Residual::Overflow(count)),
            (false, true) => Ok(Residual::Underflow(count)),
            (true, true) => Err("both overflow and underflow flags set"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Initiator PDUs

/// NOP-Out (0x00, RFC 7143 §11.18): a ping, or the answer to a target's NOP-In.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    /// [`RESERVED_TAG`] unless answering a NOP-In.
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// Ping data, echoed in the NOP-In.
    pub data: Bytes,
}

/// SCSI Command (0x01, RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out PDUs follow.
    pub is_final: bool,
    /// R: the command reads data from the target.
    pub read: bool,
    /// W: the command writes data to the target.
    pub write: bool,
    pub attribute: TaskAttribute,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The whole CDB. Encoding puts the first 16 bytes in the BHS (zero-padded when shorter)
    /// and the rest in an Extended CDB AHS; decoding always yields at least 16 bytes, since
    /// the BHS does not say how long a short CDB is (its opcode does).
    pub cdb: Vec<u8>,
    /// The Bidirectional Read Expected Data Transfer Length AHS, for commands that both read
    /// and write.
    pub bidi_read_expected_data_transfer_length: Option<u32>,
    /// Immediate data.
    pub data: Bytes,
}

/// SCSI Task Management Function Request (0x02, RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    /// One of [`tmf_function`] (7 bits).
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request (0x03, RFC 7143 §11.12). Always immediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    /// T bit and NSG: `Some(stage)` when the initiator asks to move to `stage`.
    pub next_stage: Option<Stage>,
    /// C: the text continues in the next Login Request.
    pub continues: bool,
    /// CSG.
    pub current_stage: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: Isid,
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// Text: `key=value` pairs (see [`crate::text`]).
    pub data: Bytes,
}

/// Text Request (0x04, RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub is_final: bool,
    pub continues: bool,
    pub lun: u64,
    pub itt: u32,
    /// [`RESERVED_TAG`] to start a negotiation; the target's tag to continue one.
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: Bytes,
}

/// SCSI Data-Out (0x05, RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub is_final: bool,
    pub lun: u64,
    pub itt: u32,
    /// The R2T's tag, or [`RESERVED_TAG`] for unsolicited data.
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Bytes,
}

/// Logout Request (0x06, RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// One of [`logout_reason`] (7 bits).
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (0x10, RFC 7143 §11.16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnackRequest {
    /// One of [`snack_type`] (4 bits).
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    /// TTT (DataACK) or SNACK Tag (R-Data), else [`RESERVED_TAG`].
    pub ttt_or_snack_tag: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

// ---------------------------------------------------------------------------------------------
// Target PDUs

/// NOP-In (0x20, RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    /// The NOP-Out's ITT, or [`RESERVED_TAG`] for a target-initiated ping.
    pub itt: u32,
    /// [`RESERVED_TAG`] unless the target wants an answer.
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

/// SCSI Response (0x21, RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    /// One of [`scsi_response`].
    pub response: u8,
    /// SCSI status (SAM), valid when `response` is "completed at target".
    pub status: u8,
    /// o/u flags and the Bidirectional Read Residual Count.
    pub bidi_read_residual: Residual,
    /// O/U flags and the Residual Count.
    pub residual: Residual,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    /// SenseLength (2 bytes), sense data, then response data; empty when there is none.
    pub data: Bytes,
}

/// Task Management Function Response (0x22, RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// One of [`tmf_response`].
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response (0x23, RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    /// T bit and NSG: `Some(stage)` when the target agrees to move to `stage`.
    pub next_stage: Option<Stage>,
    pub continues: bool,
    pub current_stage: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: Isid,
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status: LoginStatus,
    pub data: Bytes,
}

/// Text Response (0x24, RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub is_final: bool,
    pub continues: bool,
    pub lun: u64,
    pub itt: u32,
    /// The tag the initiator echoes to get the rest; [`RESERVED_TAG`] on the last response.
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data: Bytes,
}

/// SCSI Data-In (0x25, RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub is_final: bool,
    /// A: the target asks for a DataACK SNACK (ErrorRecoveryLevel > 0).
    pub acknowledge: bool,
    /// The S bit and the SCSI status: `Some` when this PDU also carries the command's status.
    pub status: Option<u8>,
    /// O/U flags and Residual Count (valid with the S bit).
    pub residual: Residual,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub data: Bytes,
}

/// Logout Response (0x26, RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    /// One of [`logout_response`].
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait_s: u16,
    pub time2retain_s: u16,
}

/// Ready To Transfer (0x31, RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

/// Asynchronous Message (0x32, RFC 7143 §11.9). Its ITT is always [`RESERVED_TAG`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// One of [`async_event`].
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
    /// SenseLength, sense data and iSCSI event data.
    pub data: Bytes,
}

/// Reject (0x3f, RFC 7143 §11.17). Its ITT is always [`RESERVED_TAG`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// One of [`reject_reason`].
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// DataSN/R2TSN, for a rejected SNACK; else 0.
    pub data_sn_or_r2t_sn: u32,
    /// The complete header of the rejected PDU.
    pub data: Bytes,
}

/// Any PDU, initiator's or target's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        match self {
            Pdu::NopOut(_) => opcode::NOP_OUT,
            Pdu::ScsiCommand(_) => opcode::SCSI_COMMAND,
            Pdu::TaskMgmtRequest(_) => opcode::TASK_MGMT_REQUEST,
            Pdu::LoginRequest(_) => opcode::LOGIN_REQUEST,
            Pdu::TextRequest(_) => opcode::TEXT_REQUEST,
            Pdu::DataOut(_) => opcode::DATA_OUT,
            Pdu::LogoutRequest(_) => opcode::LOGOUT_REQUEST,
            Pdu::SnackRequest(_) => opcode::SNACK_REQUEST,
            Pdu::NopIn(_) => opcode::NOP_IN,
            Pdu::ScsiResponse(_) => opcode::SCSI_RESPONSE,
            Pdu::TaskMgmtResponse(_) => opcode::TASK_MGMT_RESPONSE,
            Pdu::LoginResponse(_) => opcode::LOGIN_RESPONSE,
            Pdu::TextResponse(_) => opcode::TEXT_RESPONSE,
            Pdu::DataIn(_) => opcode::DATA_IN,
            Pdu::LogoutResponse(_) => opcode::LOGOUT_RESPONSE,
            Pdu::R2t(_) => opcode::R2T,
            Pdu::AsyncMessage(_) => opcode::ASYNC_MESSAGE,
            Pdu::Reject(_) => opcode::REJECT,
        }
    }

    /// The Initiator Task Tag ([`RESERVED_TAG`] for Asynchronous Message and Reject).
    pub fn itt(&self) -> u32 {
        match self {
            Pdu::NopOut(p) => p.itt,
            Pdu::ScsiCommand(p) => p.itt,
            Pdu::TaskMgmtRequest(p) => p.itt,
            Pdu::LoginRequest(p) => p.itt,
            Pdu::TextRequest(p) => p.itt,
            Pdu::DataOut(p) => p.itt,
            Pdu::LogoutRequest(p) => p.itt,
            Pdu::SnackRequest(p) => p.itt,
            Pdu::NopIn(p) => p.itt,
            Pdu::ScsiResponse(p) => p.itt,
            Pdu::TaskMgmtResponse(p) => p.itt,
            Pdu::LoginResponse(p) => p.itt,
            Pdu::TextResponse(p) => p.itt,
            Pdu::DataIn(p) => p.itt,
            Pdu::LogoutResponse(p) => p.itt,
            Pdu::R2t(p) => p.itt,
            Pdu::AsyncMessage(_) | Pdu::Reject(_) => RESERVED_TAG,
        }
    }

    /// The data segment (empty for PDUs that carry none).
    pub fn data(&self) -> Bytes {
        match self {
            Pdu::NopOut(p) => p.data.clone(),
            Pdu::ScsiCommand(p) => p.data.clone(),
            Pdu::LoginRequest(p) => p.data.clone(),
            Pdu::TextRequest(p) => p.data.clone(),
            Pdu::DataOut(p) => p.data.clone(),
            Pdu::NopIn(p) => p.data.clone(),
            Pdu::ScsiResponse(p) => p.data.clone(),
            Pdu::LoginResponse(p) => p.data.clone(),
            Pdu::TextResponse(p) => p.data.clone(),
            Pdu::DataIn(p) => p.data.clone(),
            Pdu::AsyncMessage(p) => p.data.clone(),
            Pdu::Reject(p) => p.data.clone(),
            Pdu::TaskMgmtRequest(_)
            | Pdu::LogoutRequest(_)
            | Pdu::SnackRequest(_)
            | Pdu::TaskMgmtResponse(_)
            | Pdu::LogoutResponse(_)
            | Pdu::R2t(_) => Bytes::new(),
        }
    }

    /// Appends the whole PDU: BHS, AHS, header digest, data segment, padding to 4 bytes, and
    /// data digest (only after a non-empty data segment), under `digests`.
    ///
    /// Panics if the PDU cannot be represented (a data segment over 2^24 - 1 bytes, a CDB
    /// over [`CDB_BYTES_MAX`] or empty): the caller builds PDUs within the negotiated limits.
    pub fn encode(&self, digests: Digests, out: &mut Vec<u8>) {
        let mut ahs = Vec::new();
        let bhs = self.header(&mut ahs);
        let data = self.data();
        assert!(data.len() <= DATA_SEGMENT_BYTES_MAX as usize, "data segment of {} bytes", data.len());
        assert!(ahs.len() <= TOTAL_AHS_BYTES_MAX && ahs.len() % PAD_BYTES == 0);
        let mut bhs = bhs.0;
        bhs[4] = (ahs.len() / PAD_BYTES) as u8;
        bhs[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&ahs);
        if digests.header {
            out.extend_from_slice(&digest::digest_to_wire(digest::header_digest(&bhs, &ahs)));
        }
        out.extend_from_slice(&data);
        out.resize(out.len() + digest::pad_bytes(data.len()), 0);
        if digests.data && !data.is_empty() {
            out.extend_from_slice(&digest::digest_to_wire(digest::data_digest(&data)));
        }
    }

    /// The BHS without its lengths (bytes 4-7), appending any AHS to `ahs`.
    fn header(&self, ahs: &mut Vec<u8>) -> Header {
        let mut h = Header([0; BHS_BYTES]);
        match self {
            Pdu::NopOut(p) => {
                h.opcode(opcode::NOP_OUT, p.immediate);
                h.0[1] = FINAL_BIT;
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.u32(24, p.cmd_sn);
                h.u32(28, p.exp_stat_sn);
            }
            Pdu::ScsiCommand(p) => {
                h.opcode(opcode::SCSI_COMMAND, p.immediate);
                h.0[1] = flag(p.is_final, FINAL_BIT) | flag(p.read, 0x40) | flag(p.write, 0x20) | p.attribute as u8;
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.expected_data_transfer_length);
                h.u32(24, p.cmd_sn);
                h.u32(28, p.exp_stat_sn);
                assert!(!p.cdb.is_empty() && p.cdb.len() <= CDB_BYTES_MAX, "CDB of {} bytes", p.cdb.len());
                let in_bhs = p.cdb.len().min(BHS_CDB_BYTES);
                h.0[32..32 + in_bhs].copy_from_slice(&p.cdb[..in_bhs]);
                if p.cdb.len() > BHS_CDB_BYTES {
                    let extension = &p.cdb[BHS_CDB_BYTES..];
                    // AHSLength counts the reserved byte and the CDB bytes beyond the 16th.
                    ahs.extend_from_slice(&(extension.len() as u16 + 1).to_be_bytes());
                    ahs.push(ahs_type::EXTENDED_CDB);
                    ahs.push(0);
                    ahs.extend_from_slice(extension);
                    ahs.resize(ahs.len() + digest::pad_bytes(ahs.len()), 0);
                }
                if let Some(length) = p.bidi_read_expected_data_transfer_length {
                    ahs.extend_from_slice(&5u16.to_be_bytes());
                    ahs.push(ahs_type::BIDI_READ_EXPECTED_LENGTH);
                    ahs.push(0);
                    ahs.extend_from_slice(&length.to_be_bytes());
                }
            }
            Pdu::TaskMgmtRequest(p) => {
                h.opcode(opcode::TASK_MGMT_REQUEST, p.immediate);
                assert!(p.function < 0x80, "TMF function {:#x} has 7 bits", p.function);
                h.0[1] = FINAL_BIT | p.function;
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.referenced_task_tag);
                h.u32(24, p.cmd_sn);
                h.u32(28, p.exp_stat_sn);
                h.u32(32, p.ref_cmd_sn);
                h.u32(36, p.exp_data_sn);
            }
            Pdu::LoginRequest(p) => {
                h.opcode(opcode::LOGIN_REQUEST, true);
                h.0[1] = stage_byte(p.next_stage, p.continues, p.current_stage);
                h.0[2] = p.version_max;
                h.0[3] = p.version_min;
                h.0[8..14].copy_from_slice(&p.isid.0);
                h.u16(14, p.tsih);
                h.u32(16, p.itt);
                h.u16(20, p.cid);
                h.u32(24, p.cmd_sn);
                h.u32(28, p.exp_stat_sn);
            }
            Pdu::TextRequest(p) => {
                h.opcode(opcode::TEXT_REQUEST, p.immediate);
                h.0[1] = flag(p.is_final, FINAL_BIT) | flag(p.continues, CONTINUE_BIT);
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.u32(24, p.cmd_sn);
                h.u32(28, p.exp_stat_sn);
            }
            Pdu::DataOut(p) => {
                h.opcode(opcode::DATA_OUT, false);
                h.0[1] = flag(p.is_final, FINAL_BIT);
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.u32(28, p.exp_stat_sn);
                h.u32(36, p.data_sn);
                h.u32(40, p.buffer_offset);
            }
            Pdu::LogoutRequest(p) => {
                h.opcode(opcode::LOGOUT_REQUEST, p.immediate);
                assert!(p.reason < 0x80, "logout reason {:#x} has 7 bits", p.reason);
                h.0[1] = FINAL_BIT | p.reason;
                h.u32(16, p.itt);
                h.u16(20, p.cid);
                h.u32(24, p.cmd_sn);
                h.u32(28, p.exp_stat_sn);
            }
            Pdu::SnackRequest(p) => {
                h.opcode(opcode::SNACK_REQUEST, false);
                assert!(p.snack_type < 0x10, "SNACK type {:#x} has 4 bits", p.snack_type);
                h.0[1] = FINAL_BIT | p.snack_type;
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt_or_snack_tag);
                h.u32(28, p.exp_stat_sn);
                h.u32(40, p.beg_run);
                h.u32(44, p.run_length);
            }
            Pdu::NopIn(p) => {
                h.opcode(opcode::NOP_IN, false);
                h.0[1] = FINAL_BIT;
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            }
            Pdu::ScsiResponse(p) => {
                h.opcode(opcode::SCSI_RESPONSE, false);
                let (bidi_o, bidi_u, bidi_count) = p.bidi_read_residual.parts();
                let (o, u, count) = p.residual.parts();
                h.0[1] = FINAL_BIT | flag(bidi_o, 0x10) | flag(bidi_u, 0x08) | flag(o, 0x04) | flag(u, 0x02);
                h.0[2] = p.response;
                h.0[3] = p.status;
                h.u32(16, p.itt);
                h.u32(20, p.snack_tag);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.u32(36, p.exp_data_sn);
                h.u32(40, bidi_count);
                h.u32(44, count);
            }
            Pdu::TaskMgmtResponse(p) => {
                h.opcode(opcode::TASK_MGMT_RESPONSE, false);
                h.0[1] = FINAL_BIT;
                h.0[2] = p.response;
                h.u32(16, p.itt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            }
            Pdu::LoginResponse(p) => {
                h.opcode(opcode::LOGIN_RESPONSE, false);
                h.0[1] = stage_byte(p.next_stage, p.continues, p.current_stage);
                h.0[2] = p.version_max;
                h.0[3] = p.version_active;
                h.0[8..14].copy_from_slice(&p.isid.0);
                h.u16(14, p.tsih);
                h.u32(16, p.itt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.0[36] = p.status.class;
                h.0[37] = p.status.detail;
            }
            Pdu::TextResponse(p) => {
                h.opcode(opcode::TEXT_RESPONSE, false);
                h.0[1] = flag(p.is_final, FINAL_BIT) | flag(p.continues, CONTINUE_BIT);
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            }
            Pdu::DataIn(p) => {
                h.opcode(opcode::DATA_IN, false);
                let (o, u, count) = p.residual.parts();
                h.0[1] = flag(p.is_final, FINAL_BIT)
                    | flag(p.acknowledge, 0x40)
                    | flag(o, 0x04)
                    | flag(u, 0x02)
                    | flag(p.status.is_some(), 0x01);
                h.0[3] = p.status.unwrap_or(0);
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.u32(36, p.data_sn);
                h.u32(40, p.buffer_offset);
                h.u32(44, count);
            }
            Pdu::LogoutResponse(p) => {
                h.opcode(opcode::LOGOUT_RESPONSE, false);
                h.0[1] = FINAL_BIT;
                h.0[2] = p.response;
                h.u32(16, p.itt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.u16(40, p.time2wait_s);
                h.u16(42, p.time2retain_s);
            }
            Pdu::R2t(p) => {
                h.opcode(opcode::R2T, false);
                h.0[1] = FINAL_BIT;
                h.u64(8, p.lun);
                h.u32(16, p.itt);
                h.u32(20, p.ttt);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.u32(36, p.r2t_sn);
                h.u32(40, p.buffer_offset);
                h.u32(44, p.desired_data_transfer_length);
            }
            Pdu::AsyncMessage(p) => {
                h.opcode(opcode::ASYNC_MESSAGE, false);
                h.0[1] = FINAL_BIT;
                h.u64(8, p.lun);
                h.u32(16, RESERVED_TAG);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.0[36] = p.async_event;
                h.0[37] = p.async_vcode;
                h.u16(38, p.parameter1);
                h.u16(40, p.parameter2);
                h.u16(42, p.parameter3);
            }
            Pdu::Reject(p) => {
                h.opcode(opcode::REJECT, false);
                h.0[1] = FINAL_BIT;
                h.0[2] = p.reason;
                h.u32(16, RESERVED_TAG);
                h.sequence(p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
                h.u32(36, p.data_sn_or_r2t_sn);
            }
        }
        h
    }
}

/// A BHS being written.
struct Header([u8; BHS_BYTES]);

impl Header {
    fn opcode(&mut self, opcode: u8, immediate: bool) {
        self.0[0] = opcode | flag(immediate, IMMEDIATE_BIT);
    }

    fn u16(&mut self, at: usize, value: u16) {
        self.0[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    fn u32(&mut self, at: usize, value: u32) {
        self.0[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    fn u64(&mut self, at: usize, value: u64) {
        self.0[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }

    /// StatSN, ExpCmdSN, MaxCmdSN: at the same offsets in every target PDU that has them.
    fn sequence(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
        self.u32(24, stat_sn);
        self.u32(28, exp_cmd_sn);
        self.u32(32, max_cmd_sn);
    }
}

fn flag(set: bool, bit: u8) -> u8 {
    if set {
        bit
    } else {
        0
    }
}

/// Byte 1 of Login PDUs: T, C, CSG (bits 3-2), NSG (bits 1-0, zero when T is clear).
fn stage_byte(next_stage: Option<Stage>, continues: bool, current_stage: Stage) -> u8 {
    flag(next_stage.is_some(), FINAL_BIT)
        | flag(continues, CONTINUE_BIT)
        | current_stage.code() << 2
        | next_stage.map_or(0, Stage::code)
}

fn be16(b: &[u8; BHS_BYTES], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8; BHS_BYTES], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8; BHS_BYTES], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(bytes)
}

fn bit(b: &[u8; BHS_BYTES], at: usize, mask: u8) -> bool {
    b[at] & mask != 0
}

// ---------------------------------------------------------------------------------------------
// Decoding the fields

fn decode_fields(b: &[u8; BHS_BYTES], info: &BhsInfo, ahs: &[u8], data: Bytes) -> Result<Pdu, PduError> {
    let invalid = |what| PduError::InvalidField { opcode: info.opcode, itt: info.itt, what };
    if info.opcode != opcode::SCSI_COMMAND && !ahs.is_empty() {
        return Err(invalid("AHS on a PDU that defines none"));
    }
    let no_data =
        |pdu: Pdu| if data.is_empty() { Ok(pdu) } else { Err(invalid("data segment on a PDU that carries none")) };
    let immediate = info.immediate;
    let itt = info.itt;
    let final_bit = bit(b, 1, FINAL_BIT);
    match info.opcode {
        opcode::NOP_OUT => Ok(Pdu::NopOut(NopOut {
            immediate,
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            data,
        })),
        opcode::SCSI_COMMAND => {
            let attribute = TaskAttribute::from_code(b[1] & 0x07).ok_or_else(|| invalid("reserved task attribute"))?;
            let (extension, bidi) = parse_command_ahs(ahs).map_err(invalid)?;
            let mut cdb = Vec::with_capacity(BHS_CDB_BYTES + extension.len());
            cdb.extend_from_slice(&b[32..48]);
            cdb.extend_from_slice(extension);
            Ok(Pdu::ScsiCommand(ScsiCommand {
                immediate,
                is_final: final_bit,
                read: bit(b, 1, 0x40),
                write: bit(b, 1, 0x20),
                attribute,
                lun: be64(b, 8),
                itt,
                expected_data_transfer_length: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                cdb,
                bidi_read_expected_data_transfer_length: bidi,
                data,
            }))
        }
        opcode::TASK_MGMT_REQUEST => no_data(Pdu::TaskMgmtRequest(TaskMgmtRequest {
            immediate,
            function: b[1] & 0x7f,
            lun: be64(b, 8),
            itt,
            referenced_task_tag: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            ref_cmd_sn: be32(b, 32),
            exp_data_sn: be32(b, 36),
        })),
        opcode::LOGIN_REQUEST => {
            let (next_stage, continues, current_stage) = parse_stage_byte(b[1]).map_err(invalid)?;
            Ok(Pdu::LoginRequest(LoginRequest {
                next_stage,
                continues,
                current_stage,
                version_max: b[2],
                version_min: b[3],
                isid: isid(b),
                tsih: be16(b, 14),
                itt,
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                data,
            }))
        }
        opcode::TEXT_REQUEST => Ok(Pdu::TextRequest(TextRequest {
            immediate,
            is_final: final_bit,
            continues: bit(b, 1, CONTINUE_BIT),
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            data,
        })),
        opcode::DATA_OUT => Ok(Pdu::DataOut(DataOut {
            is_final: final_bit,
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            exp_stat_sn: be32(b, 28),
            data_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
            data,
        })),
        opcode::LOGOUT_REQUEST => no_data(Pdu::LogoutRequest(LogoutRequest {
            immediate,
            reason: b[1] & 0x7f,
            itt,
            cid: be16(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        })),
        opcode::SNACK_REQUEST => no_data(Pdu::SnackRequest(SnackRequest {
            snack_type: b[1] & 0x0f,
            lun: be64(b, 8),
            itt,
            ttt_or_snack_tag: be32(b, 20),
            exp_stat_sn: be32(b, 28),
            beg_run: be32(b, 40),
            run_length: be32(b, 44),
        })),
        opcode::NOP_IN => Ok(Pdu::NopIn(NopIn {
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            data,
        })),
        opcode::SCSI_RESPONSE => Ok(Pdu::ScsiResponse(ScsiResponse {
            response: b[2],
            status: b[3],
            bidi_read_residual: Residual::from_parts(bit(b, 1, 0x10), bit(b, 1, 0x08), be32(b, 40)).map_err(invalid)?,
            residual: Residual::from_parts(bit(b, 1, 0x04), bit(b, 1, 0x02), be32(b, 44)).map_err(invalid)?,
            itt,
            snack_tag: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            exp_data_sn: be32(b, 36),
            data,
        })),
        opcode::TASK_MGMT_RESPONSE => no_data(Pdu::TaskMgmtResponse(TaskMgmtResponse {
            response: b[2],
            itt,
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
        })),
        opcode::LOGIN_RESPONSE => {
            let (next_stage, continues, current_stage) = parse_stage_byte(b[1]).map_err(invalid)?;
            Ok(Pdu::LoginResponse(LoginResponse {
                next_stage,
                continues,
                current_stage,
                version_max: b[2],
                version_active: b[3],
                isid: isid(b),
                tsih: be16(b, 14),
                itt,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                status: LoginStatus { class: b[36], detail: b[37] },
                data,
            }))
        }
        opcode::TEXT_RESPONSE => Ok(Pdu::TextResponse(TextResponse {
            is_final: final_bit,
            continues: bit(b, 1, CONTINUE_BIT),
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            data,
        })),
        opcode::DATA_IN => Ok(Pdu::DataIn(DataIn {
            is_final: final_bit,
            acknowledge: bit(b, 1, 0x40),
            status: bit(b, 1, 0x01).then_some(b[3]),
            residual: Residual::from_parts(bit(b, 1, 0x04), bit(b, 1, 0x02), be32(b, 44)).map_err(invalid)?,
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            data_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
            data,
        })),
        opcode::LOGOUT_RESPONSE => no_data(Pdu::LogoutResponse(LogoutResponse {
            response: b[2],
            itt,
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            time2wait_s: be16(b, 40),
            time2retain_s: be16(b, 42),
        })),
        opcode::R2T => no_data(Pdu::R2t(R2t {
            lun: be64(b, 8),
            itt,
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            r2t_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
            desired_data_transfer_length: be32(b, 44),
        })),
        opcode::ASYNC_MESSAGE => Ok(Pdu::AsyncMessage(AsyncMessage {
            lun: be64(b, 8),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            async_event: b[36],
            async_vcode: b[37],
            parameter1: be16(b, 38),
            parameter2: be16(b, 40),
            parameter3: be16(b, 42),
            data,
        })),
        opcode::REJECT => Ok(Pdu::Reject(Reject {
            reason: b[2],
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            data_sn_or_r2t_sn: be32(b, 36),
            data,
        })),
        opcode => Err(PduError::UnknownOpcode { opcode, itt }),
    }
}

fn isid(b: &[u8; BHS_BYTES]) -> Isid {
    let mut isid = [0u8; 6];
    isid.copy_from_slice(&b[8..14]);
    Isid(isid)
}

/// (NSG when T is set, C, CSG) from byte 1 of a Login PDU.
fn parse_stage_byte(byte: u8) -> Result<(Option<Stage>, bool, Stage), &'static str> {
    let current = Stage::from_code((byte >> 2) & 0x03).ok_or("reserved current stage")?;
    // NSG is reserved, hence ignored, when T is clear.
    let next =
        if byte & FINAL_BIT != 0 { Some(Stage::from_code(byte & 0x03).ok_or("reserved next stage")?) } else { None };
    Ok((next, byte & CONTINUE_BIT != 0, current))
}

/// The AHS of a SCSI Command: the CDB bytes beyond the 16th, and the bidirectional read
/// length. Anything else, or either twice, is an invalid field.
fn parse_command_ahs(ahs: &[u8]) -> Result<(&[u8], Option<u32>), &'static str> {
    let mut extension: Option<&[u8]> = None;
    let mut bidi = None;
    let mut rest = ahs;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err("truncated AHS");
        }
        let ahs_len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        // AHSLength excludes the length and type fields (3 bytes); each AHS is padded to 4.
        let total = 3 + ahs_len + digest::pad_bytes(3 + ahs_len);
        if total > rest.len() {
            return Err("AHS longer than TotalAHSLength");
        }
        match rest[2] {
            ahs_type::EXTENDED_CDB => {
                if extension.is_some() {
                    return Err("two Extended CDB AHS");
                }
                // The reserved byte, then at least one CDB byte beyond the BHS's 16.
                if ahs_len < 2 {
                    return Err("empty Extended CDB AHS");
                }
                if BHS_CDB_BYTES + ahs_len - 1 > CDB_BYTES_MAX {
                    return Err("CDB longer than 260 bytes");
                }
                extension = Some(&rest[4..3 + ahs_len]);
            }
            ahs_type::BIDI_READ_EXPECTED_LENGTH => {
                if bidi.is_some() {
                    return Err("two Bidirectional Read Expected Data Transfer Length AHS");
                }
                if ahs_len != 5 {
                    return Err("Bidirectional Read Expected Data Transfer Length AHS length is not 5");
                }
                bidi = Some(u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]));
            }
            _ => return Err("unsupported AHS type"),
        }
        rest = &rest[total..];
    }
    Ok((extension.unwrap_or(&[]), bidi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(pdu: &Pdu, digests: Digests) -> Result<Pdu, PduError> {
        let mut wire = Vec::new();
        pdu.encode(digests, &mut wire);
        let limits = DecodeLimits { digests, data_segment_bytes_max: DATA_SEGMENT_BYTES_MAX };
        let bhs: [u8; BHS_BYTES] = wire[..BHS_BYTES].try_into().expect("a whole BHS");
        let info = parse_bhs(&bhs, &limits)?;
        assert_eq!(info.rest_bytes, wire.len() - BHS_BYTES, "parse_bhs predicts the encoded length");
        decode(&bhs, Bytes::copy_from_slice(&wire[BHS_BYTES..]), &limits)
    }

    fn split(wire: &[u8]) -> ([u8; BHS_BYTES], Bytes) {
        (wire[..BHS_BYTES].try_into().expect("a whole BHS"), Bytes::copy_from_slice(&wire[BHS_BYTES..]))
    }

    // --- Byte-exact checks against the RFC 7143 §11 layouts, assembled by hand.

    #[test]
    fn rfc_read10_command_from_appendix_b4() {
        // The PDU of RFC 7143 appendix B.4, read through the SCSI Command layout: byte 1 0xc0
        // (F, R, untagged), ITT 0x14000000, EDTL 0x400, CmdSN 0x14, ExpStatSN 0x18, and a
        // READ(10) CDB for 2 blocks at LBA 0.
        let mut wire = [0u8; BHS_BYTES];
        for (at, byte) in [(0, 0x01), (1, 0xc0), (16, 0x14), (22, 0x04), (27, 0x14), (31, 0x18), (32, 0x28), (40, 0x02)]
        {
            wire[at] = byte;
        }
        let mut cdb = vec![0u8; 16];
        cdb[0] = 0x28;
        cdb[8] = 0x02;
        let expected = Pdu::ScsiCommand(ScsiCommand {
            immediate: false,
            is_final: true,
            read: true,
            write: false,
            attribute: TaskAttribute::Untagged,
            lun: 0,
            itt: 0x1400_0000,
            expected_data_transfer_length: 0x400,
            cmd_sn: 0x14,
            exp_stat_sn: 0x18,
            cdb,
            bidi_read_expected_data_transfer_length: None,
            data: Bytes::new(),
        });
        assert_eq!(decode(&wire, Bytes::new(), &DecodeLimits::LOGIN), Ok(expected.clone()));
        let mut encoded = Vec::new();
        expected.encode(Digests::NONE, &mut encoded);
        assert_eq!(encoded, wire);
        // With a header digest: the RFC's CRC, as transmitted, follows the BHS.
        let mut with_digest = Vec::new();
        expected.encode(Digests { header: true, data: false }, &mut with_digest);
        assert_eq!(&with_digest[BHS_BYTES..], &[0x56, 0x3a, 0x96, 0xd9]);
    }

    #[test]
    fn login_request_layout() {
        let pdu = Pdu::LoginRequest(LoginRequest {
            next_stage: Some(Stage::LoginOperationalNegotiation),
            continues: false,
            current_stage: Stage::SecurityNegotiation,
            version_max: 0,
            version_min: 0,
            isid: Isid([0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]),
            tsih: 0,
            itt: 0x0102_0304,
            cid: 7,
            cmd_sn: 0x11,
            exp_stat_sn: 0x22,
            data: Bytes::from_static(b"AuthMethod=None\0"),
        });
        let mut expected = vec![0u8; BHS_BYTES];
        expected[0] = 0x43; // I bit + 0x03
        expected[1] = 0x81; // T, CSG 0, NSG 1
        expected[7] = 16; // DataSegmentLength
        expected[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        expected[16..20].copy_from_slice(&[1, 2, 3, 4]);
        expected[21] = 7;
        expected[27] = 0x11;
        expected[31] = 0x22;
        expected.extend_from_slice(b"AuthMethod=None\0");
        let mut encoded = Vec::new();
        pdu.encode(Digests::NONE, &mut encoded);
        assert_eq!(encoded, expected);
        let (bhs, rest) = split(&expected);
        assert_eq!(decode(&bhs, rest, &DecodeLimits::LOGIN), Ok(pdu));
    }

    #[test]
    fn login_response_layout() {
        let pdu = Pdu::LoginResponse(LoginResponse {
            next_stage: Some(Stage::FullFeaturePhase),
            continues: false,
            current_stage: Stage::LoginOperationalNegotiation,
            version_max: 0,
            version_active: 0,
            isid: Isid([1, 2, 3, 4, 5, 6]),
            tsih: 0x0abc,
            itt: 9,
            stat_sn: 0x100,
            exp_cmd_sn: 0x200,
            max_cmd_sn: 0x300,
            status: LoginStatus::NOT_FOUND,
            data: Bytes::from_static(b"a=b\0\0"),
        });
        let mut expected = vec![0u8; BHS_BYTES];
        expected[0] = 0x23;
        expected[1] = 0x87; // T, CSG 1, NSG 3
        expected[7] = 5;
        expected[8..14].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
        expected[14..16].copy_from_slice(&[0x0a, 0xbc]);
        expected[19] = 9;
        expected[26] = 0x01;
        expected[30] = 0x02;
        expected[34] = 0x03;
        expected[36] = 2;
        expected[37] = 3;
        expected.extend_from_slice(b"a=b\0\0\0\0\0"); // 5 bytes, padded to 8
        let mut encoded = Vec::new();
        pdu.encode(Digests::NONE, &mut encoded);
        assert_eq!(encoded, expected);
    }

    #[test]
    fn data_in_with_status_layout_and_digests() {
        let pdu = Pdu::DataIn(DataIn {
            is_final: true,
            acknowledge: false,
            status: Some(0x02),
            residual: Residual::Underflow(0x10),
            lun: 0x0001_0000_0000_0000,
            itt: 0x55,
            ttt: RESERVED_TAG,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 3,
            data_sn: 4,
            buffer_offset: 0x1000,
            data: Bytes::from_static(b"xyz"),
        });
        let mut expected = vec![0u8; BHS_BYTES];
        expected[0] = 0x25;
        expected[1] = 0x83; // F, U, S
        expected[3] = 0x02;
        expected[7] = 3;
        expected[9] = 0x01;
        expected[19] = 0x55;
        expected[20..24].copy_from_slice(&[0xff; 4]);
        expected[27] = 1;
        expected[31] = 2;
        expected[35] = 3;
        expected[39] = 4;
        expected[42] = 0x10;
        expected[47] = 0x10;
        let header_crc = digest::crc32c(&expected);
        expected.extend_from_slice(&header_crc.to_le_bytes());
        expected.extend_from_slice(b"xyz\0");
        expected.extend_from_slice(&digest::crc32c(b"xyz\0").to_le_bytes());
        let mut encoded = Vec::new();
        pdu.encode(Digests::BOTH, &mut encoded);
        assert_eq!(encoded, expected);
        let limits = DecodeLimits { digests: Digests::BOTH, data_segment_bytes_max: 8192 };
        let (bhs, rest) = split(&expected);
        assert_eq!(decode(&bhs, rest, &limits), Ok(pdu));
    }

    #[test]
    fn r2t_layout() {
        let pdu = Pdu::R2t(R2t {
            lun: 0,
            itt: 1,
            ttt: 2,
            stat_sn: 3,
            exp_cmd_sn: 4,
            max_cmd_sn: 5,
            r2t_sn: 6,
            buffer_offset: 7,
            desired_data_transfer_length: 8,
        });
        let mut expected = vec![0u8; BHS_BYTES];
        expected[0] = 0x31;
        expected[1] = 0x80;
        for (i, at) in [19, 23, 27, 31, 35, 39, 43, 47].into_iter().enumerate() {
            expected[at] = i as u8 + 1;
        }
        let mut encoded = Vec::new();
        pdu.encode(Digests::NONE, &mut encoded);
        assert_eq!(encoded, expected);
    }

    #[test]
    fn extended_cdb_and_bidi_ahs_layout() {
        let cdb: Vec<u8> = (1..=32).collect();
        let pdu = Pdu::ScsiCommand(ScsiCommand {
            immediate: false,
            is_final: true,
            read: true,
            write: true,
            attribute: TaskAttribute::Simple,
            lun: 0,
            itt: 1,
            expected_data_transfer_length: 512,
            cmd_sn: 1,
            exp_stat_sn: 1,
            cdb: cdb.clone(),
            bidi_read_expected_data_transfer_length: Some(4096),
            data: Bytes::new(),
        });
        let mut encoded = Vec::new();
        pdu.encode(Digests::NONE, &mut encoded);
        assert_eq!(encoded[4], 7, "TotalAHSLength: 20 bytes of extended CDB + 8 of bidi, in words");
        assert_eq!(&encoded[32..48], &cdb[..16]);
        // AHSLength 17 (= CDB length - 15), type 1, reserved, CDB bytes 16..32.
        assert_eq!(&encoded[48..52], &[0, 17, 1, 0]);
        assert_eq!(&encoded[52..68], &cdb[16..]);
        assert_eq!(&encoded[68..76], &[0, 5, 2, 0, 0, 0, 0x10, 0]);
        assert_eq!(roundtrip(&pdu, Digests::BOTH), Ok(pdu));
    }

    // --- Error paths.

    #[test]
    fn oversized_data_segment_is_refused_from_the_bhs_alone() {
        let mut bhs = [0u8; BHS_BYTES];
        bhs[0] = opcode::SCSI_COMMAND;
        bhs[5..8].copy_from_slice(&[0x00, 0x20, 0x01]); // 8193
        bhs[16..20].copy_from_slice(&[0, 0, 0, 42]);
        let err = parse_bhs(&bhs, &DecodeLimits::LOGIN).unwrap_err();
        assert_eq!(err, PduError::DataSegmentTooLong { opcode: 1, itt: 42, len: 8193, max: 8192 });
        assert_eq!(err.reject_reason(), Some(reject_reason::PROTOCOL_ERROR));
        assert_eq!(decode(&bhs, Bytes::new(), &DecodeLimits::LOGIN), Err(err));
    }

    #[test]
    fn unknown_opcode_keeps_the_itt() {
        let mut bhs = [0u8; BHS_BYTES];
        bhs[0] = 0x1c;
        bhs[16..20].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        let err = decode(&bhs, Bytes::new(), &DecodeLimits::LOGIN).unwrap_err();
        assert_eq!(err, PduError::UnknownOpcode { opcode: 0x1c, itt: 0xdead_beef });
        assert_eq!(err.itt(), Some(0xdead_beef));
        assert_eq!(err.reject_reason(), Some(reject_reason::COMMAND_NOT_SUPPORTED));
    }

    #[test]
    fn digest_errors_name_which_digest() {
        let pdu = Pdu::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 77,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            exp_stat_sn: 1,
            data: Bytes::from_static(b"ping"),
        });
        let limits = DecodeLimits { digests: Digests::BOTH, data_segment_bytes_max: 8192 };
        let mut wire = Vec::new();
        pdu.encode(Digests::BOTH, &mut wire);

        let mut bad_header = wire.clone();
        bad_header[BHS_BYTES] ^= 1; // the header digest itself
        let (bhs, rest) = split(&bad_header);
        let err = decode(&bhs, rest, &limits).unwrap_err();
        assert!(matches!(err, PduError::HeaderDigest { .. }), "{err}");
        assert_eq!(err.reject_reason(), None);

        let mut bad_data = wire.clone();
        bad_data[BHS_BYTES + 4] ^= 1; // first data byte
        let (bhs, rest) = split(&bad_data);
        let err = decode(&bhs, rest, &limits).unwrap_err();
        assert!(matches!(err, PduError::DataDigest { itt: 77, .. }), "{err}");
        assert_eq!(err.reject_reason(), Some(reject_reason::DATA_DIGEST_ERROR));

        let (bhs, rest) = split(&wire);
        assert_eq!(decode(&bhs, rest, &limits), Ok(pdu));
    }

    #[test]
    fn invalid_fields_are_reported() {
        let with = |opcode: u8, byte1: u8| {
            let mut bhs = [0u8; BHS_BYTES];
            bhs[0] = opcode;
            bhs[1] = byte1;
            decode(&bhs, Bytes::new(), &DecodeLimits::LOGIN)
        };
        let invalid = |r: Result<Pdu, PduError>| matches!(r, Err(PduError::InvalidField { .. }));
        assert!(invalid(with(opcode::SCSI_COMMAND, 0x85)), "reserved task attribute 5");
        assert!(invalid(with(opcode::LOGIN_REQUEST, 0x08)), "CSG 2");
        assert!(invalid(with(opcode::LOGIN_REQUEST, 0x82)), "T with NSG 2");
        assert!(!invalid(with(opcode::LOGIN_REQUEST, 0x02)), "NSG ignored without T");
        assert!(invalid(with(opcode::SCSI_RESPONSE, 0x86)), "both O and U");
        assert!(invalid(with(opcode::DATA_IN, 0x86)), "both O and U");

        // Data on a PDU that carries none.
        let mut bhs = [0u8; BHS_BYTES];
        bhs[0] = opcode::R2T;
        bhs[7] = 4;
        let err = decode(&bhs, Bytes::from_static(b"abcd"), &DecodeLimits::LOGIN).unwrap_err();
        assert!(matches!(err, PduError::InvalidField { .. }), "{err}");

        // An AHS on a PDU that defines none, and an unknown AHS type on a command.
        let mut bhs = [0u8; BHS_BYTES];
        bhs[0] = opcode::NOP_OUT;
        bhs[4] = 1;
        let ahs = Bytes::from_static(&[0, 1, 2, 0]);
        assert!(matches!(decode(&bhs, ahs.clone(), &DecodeLimits::LOGIN), Err(PduError::InvalidField { .. })));
        bhs[0] = opcode::SCSI_COMMAND;
        let unknown = Bytes::from_static(&[0, 1, 9, 0]);
        assert!(matches!(decode(&bhs, unknown, &DecodeLimits::LOGIN), Err(PduError::InvalidField { .. })));
        let truncated = Bytes::from_static(&[0, 9, 1, 0]);
        assert!(matches!(decode(&bhs, truncated, &DecodeLimits::LOGIN), Err(PduError::InvalidField { .. })));
    }

    #[test]
    fn wrong_rest_length_is_a_driver_error() {
        let bhs = [0u8; BHS_BYTES];
        let err = decode(&bhs, Bytes::from_static(b"xx"), &DecodeLimits::LOGIN).unwrap_err();
        assert_eq!(err, PduError::WrongLength { expected: 0, found: 2 });
    }

    // --- Property tests: every PDU type round-trips; arbitrary bytes never panic.

    fn data() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }

    fn stage() -> impl Strategy<Value = Stage> {
        prop_oneof![
            Just(Stage::SecurityNegotiation),
            Just(Stage::LoginOperationalNegotiation),
            Just(Stage::FullFeaturePhase)
        ]
    }

    fn residual() -> impl Strategy<Value = Residual> {
        prop_oneof![
            Just(Residual::None),
            any::<u32>().prop_map(Residual::Overflow),
            any::<u32>().prop_map(Residual::Underflow)
        ]
    }

    fn attribute() -> impl Strategy<Value = TaskAttribute> {
        prop_oneof![
            Just(TaskAttribute::Untagged),
            Just(TaskAttribute::Simple),
            Just(TaskAttribute::Ordered),
            Just(TaskAttribute::HeadOfQueue),
            Just(TaskAttribute::Aca)
        ]
    }

    /// CDBs as a decoder returns them: at least 16 bytes.
    fn cdb() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), BHS_CDB_BYTES..=CDB_BYTES_MAX)
    }

    fn sequence() -> impl Strategy<Value = (u32, u32, u32)> {
        (any::<u32>(), any::<u32>(), any::<u32>())
    }

    fn initiator_pdu() -> impl Strategy<Value = Pdu> {
        prop_oneof![
            (any::<bool>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), data()).prop_map(
                |(immediate, lun, itt, ttt, cmd_sn, exp_stat_sn, data)| Pdu::NopOut(NopOut {
                    immediate,
                    lun,
                    itt,
                    ttt,
                    cmd_sn,
                    exp_stat_sn,
                    data
                })
            ),
            (
                (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), attribute()),
                (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
                cdb(),
                any::<Option<u32>>(),
                data()
            )
                .prop_map(
                    |(
                        (immediate, is_final, read, write, attribute),
                        (lun, itt, expected_data_transfer_length, cmd_sn, exp_stat_sn),
                        cdb,
                        bidi,
                        data,
                    )| Pdu::ScsiCommand(ScsiCommand {
                        immediate,
                        is_final,
                        read,
                        write,
                        attribute,
                        lun,
                        itt,
                        expected_data_transfer_length,
                        cmd_sn,
                        exp_stat_sn,
                        cdb,
                        bidi_read_expected_data_transfer_length: bidi,
                        data
                    })
                ),
            (any::<bool>(), 0u8..0x80, any::<u64>(), any::<[u32; 6]>()).prop_map(|(immediate, function, lun, n)| {
                Pdu::TaskMgmtRequest(TaskMgmtRequest {
                    immediate,
                    function,
                    lun,
                    itt: n[0],
                    referenced_task_tag: n[1],
                    cmd_sn: n[2],
                    exp_stat_sn: n[3],
                    ref_cmd_sn: n[4],
                    exp_data_sn: n[5],
                })
            }),
            (
                (proptest::option::of(stage()), any::<bool>(), stage(), any::<u8>(), any::<u8>()),
                (any::<[u8; 6]>(), any::<u16>(), any::<u32>(), any::<u16>(), any::<u32>(), any::<u32>()),
                data()
            )
                .prop_map(
                    |(
                        (next_stage, continues, current_stage, version_max, version_min),
                        (isid, tsih, itt, cid, cmd_sn, exp_stat_sn),
                        data,
                    )| Pdu::LoginRequest(LoginRequest {
                        next_stage,
                        continues,
                        current_stage,
                        version_max,
                        version_min,
                        isid: Isid(isid),
                        tsih,
                        itt,
                        cid,
                        cmd_sn,
                        exp_stat_sn,
                        data
                    })
                ),
            (any::<[bool; 3]>(), any::<u64>(), any::<[u32; 4]>(), data()).prop_map(|(f, lun, n, data)| {
                Pdu::TextRequest(TextRequest {
                    immediate: f[0],
                    is_final: f[1],
                    continues: f[2],
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    cmd_sn: n[2],
                    exp_stat_sn: n[3],
                    data,
                })
            }),
            (any::<bool>(), any::<u64>(), any::<[u32; 5]>(), data()).prop_map(|(is_final, lun, n, data)| {
                Pdu::DataOut(DataOut {
                    is_final,
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    exp_stat_sn: n[2],
                    data_sn: n[3],
                    buffer_offset: n[4],
                    data,
                })
            }),
            (any::<bool>(), 0u8..0x80, any::<u16>(), any::<[u32; 3]>()).prop_map(|(immediate, reason, cid, n)| {
                Pdu::LogoutRequest(LogoutRequest { immediate, reason, itt: n[0], cid, cmd_sn: n[1], exp_stat_sn: n[2] })
            }),
            (0u8..0x10, any::<u64>(), any::<[u32; 5]>()).prop_map(|(snack_type, lun, n)| {
                Pdu::SnackRequest(SnackRequest {
                    snack_type,
                    lun,
                    itt: n[0],
                    ttt_or_snack_tag: n[1],
                    exp_stat_sn: n[2],
                    beg_run: n[3],
                    run_length: n[4],
                })
            }),
        ]
    }

    fn target_pdu() -> impl Strategy<Value = Pdu> {
        prop_oneof![
            (any::<u64>(), any::<[u32; 2]>(), sequence(), data()).prop_map(|(lun, n, (s, e, m), data)| {
                Pdu::NopIn(NopIn { lun, itt: n[0], ttt: n[1], stat_sn: s, exp_cmd_sn: e, max_cmd_sn: m, data })
            }),
            (any::<[u8; 2]>(), residual(), residual(), any::<[u32; 3]>(), sequence(), data()).prop_map(
                |(rs, bidi_read_residual, residual, n, (s, e, m), data)| Pdu::ScsiResponse(ScsiResponse {
                    response: rs[0],
                    status: rs[1],
                    bidi_read_residual,
                    residual,
                    itt: n[0],
                    snack_tag: n[1],
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                    exp_data_sn: n[2],
                    data
                })
            ),
            (any::<u8>(), any::<u32>(), sequence()).prop_map(|(response, itt, (s, e, m))| {
                Pdu::TaskMgmtResponse(TaskMgmtResponse { response, itt, stat_sn: s, exp_cmd_sn: e, max_cmd_sn: m })
            }),
            (
                (proptest::option::of(stage()), any::<bool>(), stage(), any::<u8>(), any::<u8>()),
                (any::<[u8; 6]>(), any::<u16>(), any::<u32>(), sequence(), any::<[u8; 2]>()),
                data()
            )
                .prop_map(
                    |(
                        (next_stage, continues, current_stage, version_max, version_active),
                        (isid, tsih, itt, (s, e, m), status),
                        data,
                    )| Pdu::LoginResponse(LoginResponse {
                        next_stage,
                        continues,
                        current_stage,
                        version_max,
                        version_active,
                        isid: Isid(isid),
                        tsih,
                        itt,
                        stat_sn: s,
                        exp_cmd_sn: e,
                        max_cmd_sn: m,
                        status: LoginStatus { class: status[0], detail: status[1] },
                        data
                    })
                ),
            (any::<[bool; 2]>(), any::<u64>(), any::<[u32; 2]>(), sequence(), data()).prop_map(
                |(f, lun, n, (s, e, m), data)| Pdu::TextResponse(TextResponse {
                    is_final: f[0],
                    continues: f[1],
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                    data
                })
            ),
            (
                (any::<[bool; 2]>(), any::<Option<u8>>(), residual(), any::<u64>()),
                any::<[u32; 4]>(),
                sequence(),
                data()
            )
                .prop_map(|((f, status, residual, lun), n, (s, e, m), data)| Pdu::DataIn(DataIn {
                    is_final: f[0],
                    acknowledge: f[1],
                    status,
                    residual,
                    lun,
                    itt: n[0],
                    ttt: n[1],
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                    data_sn: n[2],
                    buffer_offset: n[3],
                    data
                })),
            (any::<u8>(), any::<u32>(), sequence(), any::<[u16; 2]>()).prop_map(|(response, itt, (s, e, m), t)| {
                Pdu::LogoutResponse(LogoutResponse {
                    response,
                    itt,
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                    time2wait_s: t[0],
                    time2retain_s: t[1],
                })
            }),
            (any::<u64>(), any::<[u32; 5]>(), sequence()).prop_map(|(lun, n, (s, e, m))| Pdu::R2t(R2t {
                lun,
                itt: n[0],
                ttt: n[1],
                stat_sn: s,
                exp_cmd_sn: e,
                max_cmd_sn: m,
                r2t_sn: n[2],
                buffer_offset: n[3],
                desired_data_transfer_length: n[4],
            })),
            (any::<u64>(), sequence(), any::<[u8; 2]>(), any::<[u16; 3]>(), data()).prop_map(
                |(lun, (s, e, m), ev, p, data)| Pdu::AsyncMessage(AsyncMessage {
                    lun,
                    stat_sn: s,
                    exp_cmd_sn: e,
                    max_cmd_sn: m,
                    async_event: ev[0],
                    async_vcode: ev[1],
                    parameter1: p[0],
                    parameter2: p[1],
                    parameter3: p[2],
                    data
                })
            ),
            (any::<u8>(), sequence(), any::<u32>(), data()).prop_map(|(reason, (s, e, m), sn, data)| {
                Pdu::Reject(Reject { reason, stat_sn: s, exp_cmd_sn: e, max_cmd_sn: m, data_sn_or_r2t_sn: sn, data })
            }),
        ]
    }

    fn digests() -> impl Strategy<Value = Digests> {
        (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
    }

    proptest! {
        #[test]
        fn initiator_pdus_round_trip(pdu in initiator_pdu(), digests in digests()) {
            prop_assert_eq!(roundtrip(&pdu, digests), Ok(pdu));
        }

        #[test]
        fn target_pdus_round_trip(pdu in target_pdu(), digests in digests()) {
            prop_assert_eq!(roundtrip(&pdu, digests), Ok(pdu));
        }

        /// Whatever the bytes, decoding returns a value or an error; what decodes re-encodes
        /// to bytes that decode to the same value.
        #[test]
        fn arbitrary_bytes_never_panic(
            bhs in any::<[u8; BHS_BYTES]>(),
            rest in prop::collection::vec(any::<u8>(), 0..600),
            digests in digests(),
            max in 0u32..1024,
        ) {
            let limits = DecodeLimits { digests, data_segment_bytes_max: max };
            // As the driver would: read exactly what parse_bhs asks for, when there is enough.
            if let Ok(info) = parse_bhs(&bhs, &limits) {
                prop_assert!(info.data_segment_bytes <= max as usize);
                if info.rest_bytes <= rest.len() {
                    let rest = Bytes::copy_from_slice(&rest[..info.rest_bytes]);
                    if let Ok(pdu) = decode(&bhs, rest, &limits) {
                        let mut again = Vec::new();
                        pdu.encode(digests, &mut again);
                        let (bhs2, rest2) = split(&again);
                        prop_assert_eq!(decode(&bhs2, rest2, &limits), Ok(pdu));
                    }
                }
            }
            let _ = decode(&bhs, Bytes::from(rest), &limits);
        }
    }
}
