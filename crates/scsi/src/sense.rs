//! Status codes and sense data (SPC-4 4.5): what a command's failure looks like to the host.
//!
//! A [`Sense`] is the kind of failure (sense key, additional sense code and qualifier) plus the
//! optional fields hosts act on: the INFORMATION field (the first miscompared byte of a COMPARE
//! AND WRITE, say) and the sense-key specific field pointer (which CDB or parameter byte was
//! wrong). It is encoded in the fixed format (response code 0x70) or the descriptor format
//! (0x72), as the host chose with the D_SENSE bit of the control mode page or REQUEST SENSE's
//! DESC bit.

use std::fmt;

/// SAM-5 status codes (the byte a SCSI response carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Good,
    CheckCondition,
    ConditionMet,
    Busy,
    ReservationConflict,
    TaskSetFull,
    TaskAborted,
}

impl Status {
    pub fn code(self) -> u8 {
        match self {
            Status::Good => 0x00,
            Status::CheckCondition => 0x02,
            Status::ConditionMet => 0x04,
            Status::Busy => 0x08,
            Status::ReservationConflict => 0x18,
            Status::TaskSetFull => 0x28,
            Status::TaskAborted => 0x40,
        }
    }
}

/// SPC-4 table 43 (the sense keys a block target uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseKey {
    NoSense,
    RecoveredError,
    NotReady,
    MediumError,
    HardwareError,
    IllegalRequest,
    UnitAttention,
    DataProtect,
    /// A third-party copy ended before it was done (EXTENDED COPY, WRITE USING TOKEN).
    CopyAborted,
    AbortedCommand,
    Miscompare,
}

impl SenseKey {
    pub fn code(self) -> u8 {
        match self {
            SenseKey::NoSense => 0x0,
            SenseKey::RecoveredError => 0x1,
            SenseKey::NotReady => 0x2,
            SenseKey::MediumError => 0x3,
            SenseKey::HardwareError => 0x4,
            SenseKey::IllegalRequest => 0x5,
            SenseKey::UnitAttention => 0x6,
            SenseKey::DataProtect => 0x7,
            SenseKey::CopyAborted => 0xA,
            SenseKey::AbortedCommand => 0xB,
            SenseKey::Miscompare => 0xE,
        }
    }

    pub fn from_code(code: u8) -> Option<SenseKey> {
        Some(match code {
            0x0 => SenseKey::NoSense,
            0x1 => SenseKey::RecoveredError,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0xA => SenseKey::CopyAborted,
            0xB => SenseKey::AbortedCommand,
            0xE => SenseKey::Miscompare,
            _ => return None,
        })
    }
}

/// An additional sense code and its qualifier (SPC-4 table D.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

impl fmt::Debug for Asc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Asc({:#04x}/{:#04x})", self.0, self.1)
    }
}

/// The additional sense codes this target reports, named as in SPC-4 annex D.
pub mod asc {
    use super::Asc;

    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const NOT_READY_INITIALIZING_COMMAND_REQUIRED: Asc = Asc(0x04, 0x02);
    pub const NOT_READY_ASYMMETRIC_ACCESS_STATE_TRANSITION: Asc = Asc(0x04, 0x0A);
    pub const NOT_READY_TARGET_PORT_IN_STANDBY_STATE: Asc = Asc(0x04, 0x0B);
    pub const NOT_READY_TARGET_PORT_IN_UNAVAILABLE_STATE: Asc = Asc(0x04, 0x0C);
    pub const WRITE_ERROR: Asc = Asc(0x0C, 0x00);
    pub const INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT: Asc = Asc(0x0E, 0x03);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1A, 0x00);
    pub const MISCOMPARE_DURING_VERIFY_OPERATION: Asc = Asc(0x1D, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED: Asc = Asc(0x29, 0x00);
    pub const BUS_DEVICE_RESET_FUNCTION_OCCURRED: Asc = Asc(0x29, 0x03);
    pub const I_T_NEXUS_LOSS_OCCURRED: Asc = Asc(0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2A, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2A, 0x05);
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Asc = Asc(0x2A, 0x06);
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc(0x2A, 0x09);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc(0x2F, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const REPORTED_LUNS_DATA_HAS_CHANGED: Asc = Asc(0x3F, 0x0E);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const INSUFFICIENT_RESOURCES: Asc = Asc(0x55, 0x03);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc(0x27, 0x07);
    pub const INVALID_MESSAGE_ERROR: Asc = Asc(0x49, 0x00);
    pub const PROTOCOL_SERVICE_CRC_ERROR: Asc = Asc(0x47, 0x05);
    pub const DATA_PHASE_ERROR: Asc = Asc(0x4B, 0x00);
    pub const DATA_OFFSET_ERROR: Asc = Asc(0x4B, 0x05);
    pub const INITIATOR_DETECTED_ERROR_MESSAGE_RECEIVED: Asc = Asc(0x48, 0x00);
    // Third-party copy (SPC-4 6.4, 6.6; SBC-4 5.7, 5.33).
    pub const UNREACHABLE_COPY_TARGET: Asc = Asc(0x08, 0x04);
    pub const THIRD_PARTY_DEVICE_FAILURE: Asc = Asc(0x0D, 0x01);
    pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Asc = Asc(0x0D, 0x02);
    pub const INVALID_TOKEN_OPERATION_CAUSE_NOT_REPORTABLE: Asc = Asc(0x23, 0x00);
    pub const INVALID_TOKEN_OPERATION_UNSUPPORTED_TOKEN_TYPE: Asc = Asc(0x23, 0x01);
    pub const INVALID_TOKEN_OPERATION_TOKEN_UNKNOWN: Asc = Asc(0x23, 0x04);
    pub const INVALID_TOKEN_OPERATION_TOKEN_CORRUPT: Asc = Asc(0x23, 0x05);
    pub const INVALID_TOKEN_OPERATION_INVALID_TOKEN_LENGTH: Asc = Asc(0x23, 0x0A);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Asc = Asc(0x26, 0x06);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: Asc = Asc(0x26, 0x07);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Asc = Asc(0x26, 0x08);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: Asc = Asc(0x26, 0x09);
    pub const INLINE_DATA_LENGTH_EXCEEDED: Asc = Asc(0x26, 0x0B);
    pub const OPERATION_IN_PROGRESS: Asc = Asc(0x00, 0x16);
    pub const INSUFFICIENT_RESOURCES_TO_CREATE_ROD_TOKEN: Asc = Asc(0x55, 0x0D);
}

/// Which byte (and optionally bit) of the CDB or parameter list was wrong: SPC-4's sense-key
/// specific field pointer, sent with ILLEGAL REQUEST so a host can tell which field it got
/// wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// True for a CDB byte, false for a byte of the parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// One command's failure as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// The INFORMATION field (SBC-3: the LBA or byte offset the error refers to).
    pub information: Option<u64>,
    pub field: Option<FieldPointer>,
}

/// Bytes of fixed-format sense data this target sends: the 18 bytes every host reads.
pub const FIXED_SENSE_BYTES: usize = 18;
/// Largest descriptor-format sense data this target sends: the 8-byte header, an information
/// descriptor (12) and a sense-key specific descriptor (8).
pub const DESCRIPTOR_SENSE_BYTES_MAX: usize = 8 + 12 + 8;

impl Sense {
    pub fn new(key: SenseKey, asc: Asc) -> Sense {
        Sense { key, asc, information: None, field: None }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB, pointing at `byte` of the CDB.
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            key: SenseKey::IllegalRequest,
            asc: asc::INVALID_FIELD_IN_CDB,
            information: None,
            field: Some(FieldPointer { in_cdb: true, byte, bit }),
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST, pointing at `byte` of the data.
    pub fn invalid_parameter_field(byte: u16) -> Sense {
        Sense {
            key: SenseKey::IllegalRequest,
            asc: asc::INVALID_FIELD_IN_PARAMETER_LIST,
            information: None,
            field: Some(FieldPointer { in_cdb: false, byte, bit: None }),
        }
    }

    pub fn illegal(asc: Asc) -> Sense {
        Sense::new(SenseKey::IllegalRequest, asc)
    }

    pub fn invalid_opcode() -> Sense {
        Sense::invalid_cdb_field(0, None).with_asc(asc::INVALID_COMMAND_OPERATION_CODE)
    }

    pub fn lba_out_of_range() -> Sense {
        Sense::illegal(asc::LBA_OUT_OF_RANGE)
    }

    pub fn unit_attention(asc: Asc) -> Sense {
        Sense::new(SenseKey::UnitAttention, asc)
    }

    pub fn not_ready(asc: Asc) -> Sense {
        Sense::new(SenseKey::NotReady, asc)
    }

    pub fn with_asc(mut self, asc: Asc) -> Sense {
        self.asc = asc;
        self
    }

    pub fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    /// Appends the sense data in the format the host asked for.
    pub fn encode(&self, descriptor: bool, out: &mut Vec<u8>) {
        if descriptor {
            self.encode_descriptor(out)
        } else {
            self.encode_fixed(out)
        }
    }

    pub fn to_bytes(&self, descriptor: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(DESCRIPTOR_SENSE_BYTES_MAX);
        self.encode(descriptor, &mut out);
        out
    }

    /// SPC-4 4.5.3: response code 0x70 (current error), 18 bytes.
    pub fn encode_fixed(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; FIXED_SENSE_BYTES];
        b[0] = 0x70;
        b[2] = self.key.code();
        if let Some(info) = self.information {
            // The fixed format has room for 32 bits; a larger value is sent without VALID.
            if let Ok(info) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&info.to_be_bytes());
            }
        }
        b[7] = (FIXED_SENSE_BYTES - 8) as u8;
        b[12] = self.asc.0;
        b[13] = self.asc.1;
        if let Some(field) = self.field {
            b[15..18].copy_from_slice(&field_pointer_bytes(field));
        }
        out.extend_from_slice(&b);
    }

    /// SPC-4 4.5.2: response code 0x72 (current error), with an information descriptor and a
    /// sense-key specific descriptor when those fields are set.
    pub fn encode_descriptor(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0x72, self.key.code(), self.asc.0, self.asc.1, 0, 0, 0, 0]);
        if let Some(info) = self.information {
            out.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            out.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(field) = self.field {
            out.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            out.extend_from_slice(&field_pointer_bytes(field));
            out.push(0);
        }
        out[start + 7] = (out.len() - start - 8) as u8;
    }

    /// Reads sense data back (either format); for tests and for a client.
    pub fn decode(bytes: &[u8]) -> Option<Sense> {
        let code = bytes.first()? & 0x7F;
        match code {
            0x70 | 0x71 => {
                if bytes.len() < 14 {
                    return None;
                }
                let key = SenseKey::from_code(bytes[2] & 0x0F)?;
                let information = (bytes[0] & 0x80 != 0)
                    .then(|| u64::from(u32::from_be_bytes([bytes[3], bytes[4], bytes[5], bytes[6]])));
                let field = bytes.get(15..18).and_then(decode_field_pointer);
                Some(Sense { key, asc: Asc(bytes[12], bytes[13]), information, field })
            }
            0x72 | 0x73 => {
                if bytes.len() < 8 {
                    return None;
                }
                let key = SenseKey::from_code(bytes[1] & 0x0F)?;
                let mut sense = Sense::new(key, Asc(bytes[2], bytes[3]));
                let end = (8 + usize::from(bytes[7])).min(bytes.len());
                let mut at = 8;
                while at + 2 <= end {
                    let kind = bytes[at];
                    let len = usize::from(bytes[at + 1]);
                    let body = bytes.get(at + 2..at + 2 + len)?;
                    match kind {
                        0x00 if len == 0x0A => {
                            let mut info = [0u8; 8];
                            info.copy_from_slice(&body[2..10]);
                            sense.information = Some(u64::from_be_bytes(info));
                        }
                        0x02 if len == 0x06 => sense.field = decode_field_pointer(&body[2..5]),
                        _ => {}
                    }
                    at += 2 + len;
                }
                Some(sense)
            }
            _ => None,
        }
    }
}

/// SPC-4 table 48: SKSV, C/D, BPV and the bit and byte pointers.
fn field_pointer_bytes(field: FieldPointer) -> [u8; 3] {
    let mut first = 0x80;
    if field.in_cdb {
        first |= 0x40;
    }
    if let Some(bit) = field.bit {
        first |= 0x08 | (bit & 0x07);
    }
    let [hi, lo] = field.byte.to_be_bytes();
    [first, hi, lo]
}

fn decode_field_pointer(b: &[u8]) -> Option<FieldPointer> {
    if b.len() < 3 || b[0] & 0x80 == 0 {
        return None;
    }
    Some(FieldPointer {
        in_cdb: b[0] & 0x40 != 0,
        byte: u16::from_be_bytes([b[1], b[2]]),
        bit: (b[0] & 0x08 != 0).then_some(b[0] & 0x07),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_places_key_asc_and_field_pointer_as_spc4_says() {
        let sense = Sense::invalid_cdb_field(2, Some(5));
        let b = sense.to_bytes(false);
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(&b[15..18], &[0x80 | 0x40 | 0x08 | 5, 0, 2]);
        assert_eq!(Sense::decode(&b), Some(sense));
    }

    #[test]
    fn fixed_format_sets_valid_only_for_an_information_that_fits() {
        let small = Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY_OPERATION).with_information(513);
        let b = small.to_bytes(false);
        assert_eq!(b[0], 0xF0);
        assert_eq!(&b[3..7], &513u32.to_be_bytes());
        let large = small.with_information(1 << 40);
        assert_eq!(large.to_bytes(false)[0], 0x70);
    }

    #[test]
    fn descriptor_format_round_trips_with_both_descriptors() {
        let sense = Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY_OPERATION).with_information(1 << 40);
        let sense = Sense { field: Some(FieldPointer { in_cdb: false, byte: 9, bit: None }), ..sense };
        let b = sense.to_bytes(true);
        assert_eq!(b[0], 0x72);
        assert_eq!(b[1], 0x0E);
        assert_eq!(usize::from(b[7]), b.len() - 8);
        assert_eq!(b.len(), DESCRIPTOR_SENSE_BYTES_MAX);
        assert_eq!(Sense::decode(&b), Some(sense));
    }

    #[test]
    fn decode_refuses_short_or_unknown_data() {
        assert_eq!(Sense::decode(&[]), None);
        assert_eq!(Sense::decode(&[0x70, 0, 5]), None);
        assert_eq!(Sense::decode(&[0x7F; 18]), None);
        // A descriptor that claims more bytes than there are.
        assert_eq!(Sense::decode(&[0x72, 5, 0x24, 0, 0, 0, 0, 4, 0x00, 0x0A, 0]), None);
    }
}
