//! CDB bytes to a typed [`Command`] (SPC-4, SBC-3). Decoding checks only what the bytes say
//! about themselves (lengths, reserved values, bits this target does not support); range checks
//! against the medium and the port's access state belong to [`crate::lu`].
//!
//! A CDB this target does not know is [`Sense::invalid_opcode`]; a known one with a field it
//! cannot honour is ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at that byte. Nothing here
//! panics or allocates, whatever the bytes.

use crate::sense::Sense;

/// Operation codes (SPC-4 annex E, SBC-3 table 13).
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const THIRD_PARTY_COPY_OUT: u8 = 0x83;
    pub const THIRD_PARTY_COPY_IN: u8 = 0x84;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_AND_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub mod service_action {
    pub const READ_CAPACITY_16: u16 = 0x10;
    pub const GET_LBA_STATUS: u16 = 0x12;
    pub const REPORT_TARGET_PORT_GROUPS: u16 = 0x0A;
    pub const REPORT_SUPPORTED_OPERATION_CODES: u16 = 0x0C;
}

/// The bytes of a CDB this target accepts: 16 is the largest command it supports, and iSCSI's
/// BHS carries 16 (longer CDBs come in an AHS and are refused as unknown).
pub const CDB_BYTES_MAX: usize = 16;

/// MODE SENSE page control: which values the host asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

/// The parts of READ, WRITE, VERIFY and friends that say where and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub lba: u64,
    pub blocks: u32,
}

/// VERIFY's and WRITE AND VERIFY's BYTCHK field (SBC-3 r35 table 86).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteCheck {
    /// Check the medium only: no data-out.
    None,
    /// Compare with `blocks` blocks of data-out.
    Compare,
    /// Compare each block with one block of data-out.
    CompareOne,
}

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        descriptor: bool,
        allocation: u32,
    },
    Inquiry {
        vpd: Option<u8>,
        allocation: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        control: PageControl,
        page: u8,
        subpage: u8,
        allocation: u32,
    },
    ModeSelect {
        ten: bool,
        page_format: bool,
        save: bool,
        parameter_bytes: u32,
    },
    StartStopUnit {
        immediate: bool,
        power_condition: u8,
        load_eject: bool,
        start: bool,
    },
    PreventAllowMediumRemoval {
        prevent: u8,
    },
    ReadCapacity10 {
        lba: u32,
        pmi: bool,
    },
    ReadCapacity16 {
        allocation: u32,
    },
    GetLbaStatus {
        lba: u64,
        allocation: u32,
    },
    Read {
        extent: Extent,
        fua: bool,
        cdb_len: u8,
    },
    Write {
        extent: Extent,
        fua: bool,
        cdb_len: u8,
    },
    Verify {
        extent: Extent,
        check: ByteCheck,
    },
    WriteAndVerify {
        extent: Extent,
        check: ByteCheck,
    },
    PreFetch {
        extent: Extent,
        immediate: bool,
    },
    SynchronizeCache {
        extent: Extent,
        immediate: bool,
    },
    WriteSame {
        extent: Extent,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        ten: bool,
    },
    Unmap {
        anchor: bool,
        parameter_bytes: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        fua: bool,
    },
    OrWrite {
        extent: Extent,
        fua: bool,
    },
    /// READ DEFECT DATA(10) or (12): which lists are asked for, in which format.
    ReadDefectData {
        twelve: bool,
        lists: u8,
        format: u8,
        allocation: u32,
    },
    ReportLuns {
        select: u8,
        allocation: u32,
    },
    ReportSupportedOperationCodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        service_action: u16,
        allocation: u32,
    },
    ReportTargetPortGroups {
        extended: bool,
        allocation: u32,
    },
    PersistentReserveIn {
        action: u8,
        allocation: u32,
    },
    PersistentReserveOut {
        action: u8,
        scope: u8,
        kind: u8,
        parameter_bytes: u32,
    },
    /// THIRD-PARTY COPY OUT: EXTENDED COPY (LID1), POPULATE TOKEN, WRITE USING TOKEN
    /// ([`crate::tpc::out_action`]). `list_id` is the CDB's (the tokens'); EXTENDED COPY's is
    /// in its parameter list.
    CopyOut {
        action: u8,
        list_id: u32,
        parameter_bytes: u32,
    },
    /// THIRD-PARTY COPY IN: RECEIVE COPY RESULTS' service actions and RECEIVE ROD TOKEN
    /// INFORMATION ([`crate::tpc::in_action`]).
    CopyIn {
        action: u8,
        list_id: u32,
        allocation: u32,
    },
}

/// Decodes one CDB. `cdb` may be longer than the command needs (iSCSI pads to 16 bytes).
pub fn decode(cdb: &[u8]) -> Result<Command, Sense> {
    let opcode = *cdb.first().ok_or_else(Sense::invalid_opcode)?;
    let len = cdb_len(opcode).ok_or_else(Sense::invalid_opcode)?;
    if cdb.len() < len {
        return Err(Sense::illegal(crate::sense::asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT));
    }
    let cdb = &cdb[..len];
    check_control(cdb)?;
    use op::*;
    Ok(match opcode {
        TEST_UNIT_READY => {
            reserved(cdb, &[1, 2, 3, 4])?;
            Command::TestUnitReady
        }
        REQUEST_SENSE => {
            reserved_bits(cdb, 1, 0xFE)?;
            Command::RequestSense { descriptor: cdb[1] & 0x01 != 0, allocation: u32::from(cdb[4]) }
        }
        INQUIRY => {
            // CMDDT (bit 1) is obsolete: SPC-4 says a target that sees it set fails the command.
            reserved_bits(cdb, 1, 0xFE)?;
            let evpd = cdb[1] & 0x01 != 0;
            if !evpd && cdb[2] != 0 {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            Command::Inquiry { vpd: evpd.then_some(cdb[2]), allocation: u32::from(be16(&cdb[3..5])) }
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten = opcode == MODE_SENSE_10;
            let control = match cdb[2] >> 6 {
                0 => PageControl::Current,
                1 => PageControl::Changeable,
                2 => PageControl::Default,
                _ => PageControl::Saved,
            };
            let allocation = if ten { u32::from(be16(&cdb[7..9])) } else { u32::from(cdb[4]) };
            Command::ModeSense {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                llbaa: ten && cdb[1] & 0x10 != 0,
                control,
                page: cdb[2] & 0x3F,
                subpage: cdb[3],
                allocation,
            }
        }
        MODE_SELECT_6 | MODE_SELECT_10 => {
            let ten = opcode == MODE_SELECT_10;
            let parameter_bytes = if ten { u32::from(be16(&cdb[7..9])) } else { u32::from(cdb[4]) };
            Command::ModeSelect { ten, page_format: cdb[1] & 0x10 != 0, save: cdb[1] & 0x01 != 0, parameter_bytes }
        }
        START_STOP_UNIT => Command::StartStopUnit {
            immediate: cdb[1] & 0x01 != 0,
            power_condition: cdb[4] >> 4,
            load_eject: cdb[4] & 0x02 != 0,
            start: cdb[4] & 0x01 != 0,
        },
        PREVENT_ALLOW_MEDIUM_REMOVAL => Command::PreventAllowMediumRemoval { prevent: cdb[4] & 0x03 },
        READ_CAPACITY_10 => {
            let pmi = cdb[8] & 0x01 != 0;
            let lba = be32(&cdb[2..6]);
            // SBC-3: with PMI zero the LBA field must be zero.
            if !pmi && lba != 0 {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            Command::ReadCapacity10 { lba, pmi }
        }
        SERVICE_ACTION_IN_16 => match u16::from(cdb[1] & 0x1F) {
            service_action::READ_CAPACITY_16 => Command::ReadCapacity16 { allocation: be32(&cdb[10..14]) },
            service_action::GET_LBA_STATUS => {
                Command::GetLbaStatus { lba: be64(&cdb[2..10]), allocation: be32(&cdb[10..14]) }
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
        },
        READ_6 | WRITE_6 => {
            // SBC-3: a transfer length of 0 in a 6-byte READ/WRITE means 256 blocks.
            let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1F, cdb[2], cdb[3]]));
            let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            let extent = Extent { lba, blocks };
            if opcode == READ_6 {
                Command::Read { extent, fua: false, cdb_len: 6 }
            } else {
                Command::Write { extent, fua: false, cdb_len: 6 }
            }
        }
        READ_10 | READ_12 | READ_16 | WRITE_10 | WRITE_12 | WRITE_16 => {
            // RDPROTECT/WRPROTECT: this target has no protection information.
            if cdb[1] & 0xE0 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            let extent = extent(cdb);
            let fua = cdb[1] & 0x08 != 0;
            let cdb_len = len as u8;
            if matches!(opcode, READ_10 | READ_12 | READ_16) {
                Command::Read { extent, fua, cdb_len }
            } else {
                Command::Write { extent, fua, cdb_len }
            }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            if cdb[1] & 0xE0 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            let check = match (cdb[1] >> 1) & 0x03 {
                0 => ByteCheck::None,
                1 => ByteCheck::Compare,
                3 => ByteCheck::CompareOne,
                _ => return Err(Sense::invalid_cdb_field(1, Some(2))),
            };
            Command::Verify { extent: extent(cdb), check }
        }
        WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12 | WRITE_AND_VERIFY_16 => {
            if cdb[1] & 0xE0 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            let check = match (cdb[1] >> 1) & 0x03 {
                0 => ByteCheck::None,
                1 => ByteCheck::Compare,
                _ => return Err(Sense::invalid_cdb_field(1, Some(2))),
            };
            Command::WriteAndVerify { extent: extent(cdb), check }
        }
        PRE_FETCH_10 | PRE_FETCH_16 => Command::PreFetch { extent: extent(cdb), immediate: cdb[1] & 0x02 != 0 },
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => {
            Command::SynchronizeCache { extent: extent(cdb), immediate: cdb[1] & 0x02 != 0 }
        }
        WRITE_SAME_10 | WRITE_SAME_16 => {
            if cdb[1] & 0xE0 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            let ten = opcode == WRITE_SAME_10;
            // PBDATA and LBDATA (bits 2 and 1) ask for protection data or the LBA in each
            // block: this target has neither.
            if cdb[1] & 0x06 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(2)));
            }
            Command::WriteSame {
                extent: extent(cdb),
                unmap: cdb[1] & 0x08 != 0,
                anchor: cdb[1] & 0x10 != 0,
                ndob: !ten && cdb[1] & 0x01 != 0,
                ten,
            }
        }
        UNMAP => Command::Unmap { anchor: cdb[1] & 0x01 != 0, parameter_bytes: u32::from(be16(&cdb[7..9])) },
        COMPARE_AND_WRITE => {
            if cdb[1] & 0xE0 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            Command::CompareAndWrite { lba: be64(&cdb[2..10]), blocks: cdb[13], fua: cdb[1] & 0x08 != 0 }
        }
        ORWRITE_16 => {
            // ORPROTECT asks for protection information: this target has none.
            if cdb[1] & 0xE0 != 0 {
                return Err(Sense::invalid_cdb_field(1, Some(7)));
            }
            Command::OrWrite { extent: extent(cdb), fua: cdb[1] & 0x08 != 0 }
        }
        READ_DEFECT_DATA_10 => Command::ReadDefectData {
            twelve: false,
            lists: cdb[2] & 0x18,
            format: cdb[2] & 0x07,
            allocation: u32::from(be16(&cdb[7..9])),
        },
        READ_DEFECT_DATA_12 => Command::ReadDefectData {
            twelve: true,
            lists: cdb[1] & 0x18,
            format: cdb[1] & 0x07,
            allocation: be32(&cdb[6..10]),
        },
        PERSISTENT_RESERVE_IN => {
            let action = cdb[1] & 0x1F;
            if action > 0x03 {
                return Err(Sense::invalid_cdb_field(1, Some(4)));
            }
            Command::PersistentReserveIn { action, allocation: u32::from(be16(&cdb[7..9])) }
        }
        PERSISTENT_RESERVE_OUT => {
            let action = cdb[1] & 0x1F;
            if action > 0x07 {
                return Err(Sense::invalid_cdb_field(1, Some(4)));
            }
            Command::PersistentReserveOut {
                action,
                scope: cdb[2] >> 4,
                kind: cdb[2] & 0x0F,
                parameter_bytes: be32(&cdb[5..9]),
            }
        }
        THIRD_PARTY_COPY_OUT => {
            use crate::tpc::out_action::*;
            let action = cdb[1] & 0x1F;
            let parameter_bytes = be32(&cdb[10..14]);
            match action {
                EXTENDED_COPY_LID1 => {
                    reserved(cdb, &[2, 3, 4, 5, 6, 7, 8, 9])?;
                    Command::CopyOut { action, list_id: 0, parameter_bytes }
                }
                POPULATE_TOKEN | WRITE_USING_TOKEN => {
                    Command::CopyOut { action, list_id: be32(&cdb[6..10]), parameter_bytes }
                }
                _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
            }
        }
        THIRD_PARTY_COPY_IN => {
            use crate::tpc::in_action::*;
            let action = cdb[1] & 0x1F;
            let allocation = be32(&cdb[10..14]);
            match action {
                COPY_STATUS | OPERATING_PARAMETERS => {
                    Command::CopyIn { action, list_id: u32::from(cdb[2]), allocation }
                }
                RECEIVE_ROD_TOKEN_INFORMATION => Command::CopyIn { action, list_id: be32(&cdb[2..6]), allocation },
                _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
            }
        }
        REPORT_LUNS => {
            let allocation = be32(&cdb[6..10]);
            Command::ReportLuns { select: cdb[2], allocation }
        }
        MAINTENANCE_IN => match u16::from(cdb[1] & 0x1F) {
            service_action::REPORT_TARGET_PORT_GROUPS => {
                let extended = match cdb[1] >> 5 {
                    0 => false,
                    1 => true,
                    _ => return Err(Sense::invalid_cdb_field(1, Some(7))),
                };
                Command::ReportTargetPortGroups { extended, allocation: be32(&cdb[6..10]) }
            }
            service_action::REPORT_SUPPORTED_OPERATION_CODES => Command::ReportSupportedOperationCodes {
                rctd: cdb[2] & 0x80 != 0,
                options: cdb[2] & 0x07,
                opcode: cdb[3],
                service_action: be16(&cdb[4..6]),
                allocation: be32(&cdb[6..10]),
            },
            _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
        },
        _ => return Err(Sense::invalid_opcode()),
    })
}

/// The length of a supported command's CDB, by its operation code (SPC-4 4.2.5.1 groups).
pub fn cdb_len(opcode: u8) -> Option<usize> {
    use op::*;
    Some(match opcode {
        TEST_UNIT_READY
        | REQUEST_SENSE
        | READ_6
        | WRITE_6
        | INQUIRY
        | MODE_SELECT_6
        | MODE_SENSE_6
        | START_STOP_UNIT
        | PREVENT_ALLOW_MEDIUM_REMOVAL => 6,
        READ_CAPACITY_10
        | READ_10
        | WRITE_10
        | WRITE_AND_VERIFY_10
        | VERIFY_10
        | PRE_FETCH_10
        | SYNCHRONIZE_CACHE_10
        | WRITE_SAME_10
        | UNMAP
        | MODE_SELECT_10
        | MODE_SENSE_10
        | READ_DEFECT_DATA_10
        | PERSISTENT_RESERVE_IN
        | PERSISTENT_RESERVE_OUT => 10,
        REPORT_LUNS | MAINTENANCE_IN | READ_12 | WRITE_12 | WRITE_AND_VERIFY_12 | VERIFY_12 | READ_DEFECT_DATA_12 => 12,
        READ_16 | COMPARE_AND_WRITE | WRITE_16 | ORWRITE_16 | WRITE_AND_VERIFY_16 | VERIFY_16 | PRE_FETCH_16
        | SYNCHRONIZE_CACHE_16 | WRITE_SAME_16 | SERVICE_ACTION_IN_16 | THIRD_PARTY_COPY_OUT | THIRD_PARTY_COPY_IN => {
            16
        }
        _ => return None,
    })
}

/// The CONTROL byte (the last): NACA (bit 2) asks for ACA handling, which this target does not
/// support (standard INQUIRY says NORMACA=0), and the obsolete LINK bit (bit 0) is refused too.
fn check_control(cdb: &[u8]) -> Result<(), Sense> {
    let last = cdb.len() - 1;
    if cdb[last] & 0x05 != 0 {
        return Err(Sense::invalid_cdb_field(last as u16, Some(2)));
    }
    Ok(())
}

fn reserved(cdb: &[u8], bytes: &[usize]) -> Result<(), Sense> {
    match bytes.iter().find(|&&i| cdb[i] != 0) {
        Some(&i) => Err(Sense::invalid_cdb_field(i as u16, None)),
        None => Ok(()),
    }
}

fn reserved_bits(cdb: &[u8], byte: usize, mask: u8) -> Result<(), Sense> {
    let set = cdb[byte] & mask;
    if set == 0 {
        return Ok(());
    }
    Err(Sense::invalid_cdb_field(byte as u16, Some(7 - set.leading_zeros() as u8)))
}

/// LBA and transfer length of a 10-, 12- or 16-byte block command.
fn extent(cdb: &[u8]) -> Extent {
    match cdb.len() {
        10 => Extent { lba: u64::from(be32(&cdb[2..6])), blocks: u32::from(be16(&cdb[7..9])) },
        12 => Extent { lba: u64::from(be32(&cdb[2..6])), blocks: be32(&cdb[6..10]) },
        _ => Extent { lba: be64(&cdb[2..10]), blocks: be32(&cdb[10..14]) },
    }
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::{asc, SenseKey};

    #[test]
    fn read_and_write_of_every_size_give_their_extent_and_fua() {
        let r10 = [op::READ_10, 0x08, 0, 0, 1, 0, 0, 0, 8, 0];
        assert_eq!(decode(&r10), Ok(Command::Read { extent: Extent { lba: 256, blocks: 8 }, fua: true, cdb_len: 10 }));
        let w12 = [op::WRITE_12, 0, 0, 0, 0, 7, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            decode(&w12),
            Ok(Command::Write { extent: Extent { lba: 7, blocks: 65536 }, fua: false, cdb_len: 12 })
        );
        let mut w16 = [0u8; 16];
        w16[0] = op::WRITE_16;
        w16[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
        w16[10..14].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            decode(&w16),
            Ok(Command::Write { extent: Extent { lba: 1 << 40, blocks: 3 }, fua: false, cdb_len: 16 })
        );
        let r6 = [op::READ_6, 0x1F, 0xFF, 0xFF, 0, 0];
        assert_eq!(
            decode(&r6),
            Ok(Command::Read { extent: Extent { lba: 0x1F_FFFF, blocks: 256 }, fua: false, cdb_len: 6 })
        );
    }

    #[test]
    fn unknown_opcodes_and_protection_bits_are_illegal_requests() {
        let sense = decode(&[0xFF; 16]).unwrap_err();
        assert_eq!((sense.key, sense.asc), (SenseKey::IllegalRequest, asc::INVALID_COMMAND_OPERATION_CODE));
        let sense = decode(&[op::READ_10, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap_err();
        assert_eq!(sense.asc, asc::INVALID_FIELD_IN_CDB);
        assert_eq!(sense.field.map(|f| f.byte), Some(1));
        assert_eq!(decode(&[]).unwrap_err().asc, asc::INVALID_COMMAND_OPERATION_CODE);
    }

    #[test]
    fn naca_in_the_control_byte_is_refused() {
        let sense = decode(&[op::TEST_UNIT_READY, 0, 0, 0, 0, 0x04]).unwrap_err();
        assert_eq!(sense.asc, asc::INVALID_FIELD_IN_CDB);
        assert_eq!(sense.field.map(|f| f.byte), Some(5));
    }

    #[test]
    fn a_cdb_shorter_than_its_opcode_needs_is_refused() {
        let sense = decode(&[op::READ_16, 0, 0]).unwrap_err();
        assert_eq!(sense.asc, asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT);
    }

    #[test]
    fn inquiry_page_code_without_evpd_is_refused() {
        assert_eq!(decode(&[op::INQUIRY, 0, 0x80, 0, 96, 0]).unwrap_err().field.map(|f| f.byte), Some(2));
        assert_eq!(decode(&[op::INQUIRY, 1, 0x80, 0, 96, 0]), Ok(Command::Inquiry { vpd: Some(0x80), allocation: 96 }));
        assert_eq!(decode(&[op::INQUIRY, 0x02, 0, 0, 96, 0]).unwrap_err().field.map(|f| f.byte), Some(1));
    }

    #[test]
    fn service_actions_pick_the_command() {
        let mut rc16 = [0u8; 16];
        rc16[0] = op::SERVICE_ACTION_IN_16;
        rc16[1] = 0x10;
        rc16[13] = 32;
        assert_eq!(decode(&rc16), Ok(Command::ReadCapacity16 { allocation: 32 }));
        rc16[1] = 0x11;
        assert_eq!(decode(&rc16).unwrap_err().asc, asc::INVALID_FIELD_IN_CDB);
        let rtpg = [op::MAINTENANCE_IN, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(decode(&rtpg), Ok(Command::ReportTargetPortGroups { extended: true, allocation: 256 }));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)) {
            let _ = decode(&bytes);
        }
    }
}
