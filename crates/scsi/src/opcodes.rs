//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the commands this target supports, each with
//! its CDB usage map (the bits of the CDB the device server looks at), from one table so the
//! answer cannot drift from what [`crate::cdb::decode`] accepts.

use crate::cdb::{cdb_len, op, service_action as sa};
use crate::sense::Sense;

/// One supported command.
pub struct CommandInfo {
    pub opcode: u8,
    pub service_action: Option<u16>,
    /// The CDB usage data: its length is the CDB's; byte 0 is the operation code.
    pub usage: &'static [u8],
}

/// The last byte of every usage map: the CONTROL byte's NACA and LINK bits, which the decoder
/// checks.
const CONTROL: u8 = 0x05;

/// Every command [`crate::cdb::decode`] accepts, in operation-code order.
pub const SUPPORTED: &[CommandInfo] = &[
    CommandInfo {
        opcode: op::TEST_UNIT_READY,
        service_action: None,
        usage: &[op::TEST_UNIT_READY, 0, 0, 0, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::REQUEST_SENSE,
        service_action: None,
        usage: &[op::REQUEST_SENSE, 0x01, 0, 0, 0xFF, CONTROL],
    },
    CommandInfo { opcode: op::READ_6, service_action: None, usage: &[op::READ_6, 0x1F, 0xFF, 0xFF, 0xFF, CONTROL] },
    CommandInfo { opcode: op::WRITE_6, service_action: None, usage: &[op::WRITE_6, 0x1F, 0xFF, 0xFF, 0xFF, CONTROL] },
    CommandInfo { opcode: op::INQUIRY, service_action: None, usage: &[op::INQUIRY, 0x03, 0xFF, 0xFF, 0xFF, CONTROL] },
    CommandInfo {
        opcode: op::MODE_SELECT_6,
        service_action: None,
        usage: &[op::MODE_SELECT_6, 0x11, 0, 0, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::MODE_SENSE_6,
        service_action: None,
        usage: &[op::MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::START_STOP_UNIT,
        service_action: None,
        usage: &[op::START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, CONTROL],
    },
    CommandInfo {
        opcode: op::PREVENT_ALLOW_MEDIUM_REMOVAL,
        service_action: None,
        usage: &[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x03, CONTROL],
    },
    CommandInfo {
        opcode: op::READ_CAPACITY_10,
        service_action: None,
        usage: &[op::READ_CAPACITY_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, CONTROL],
    },
    CommandInfo {
        opcode: op::READ_10,
        service_action: None,
        usage: &[op::READ_10, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::WRITE_10,
        service_action: None,
        usage: &[op::WRITE_10, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::WRITE_AND_VERIFY_10,
        service_action: None,
        usage: &[op::WRITE_AND_VERIFY_10, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::VERIFY_10,
        service_action: None,
        usage: &[op::VERIFY_10, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::PRE_FETCH_10,
        service_action: None,
        usage: &[op::PRE_FETCH_10, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::SYNCHRONIZE_CACHE_10,
        service_action: None,
        usage: &[op::SYNCHRONIZE_CACHE_10, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::READ_DEFECT_DATA_10,
        service_action: None,
        usage: &[op::READ_DEFECT_DATA_10, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::WRITE_SAME_10,
        service_action: None,
        usage: &[op::WRITE_SAME_10, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::UNMAP,
        service_action: None,
        usage: &[op::UNMAP, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::MODE_SELECT_10,
        service_action: None,
        usage: &[op::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::MODE_SENSE_10,
        service_action: None,
        usage: &[op::MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::PERSISTENT_RESERVE_IN,
        service_action: None,
        usage: &[op::PERSISTENT_RESERVE_IN, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::PERSISTENT_RESERVE_OUT,
        service_action: None,
        usage: &[op::PERSISTENT_RESERVE_OUT, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, CONTROL],
    },
    CommandInfo {
        opcode: op::THIRD_PARTY_COPY_OUT,
        service_action: Some(0x00),
        usage: &[op::THIRD_PARTY_COPY_OUT, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::THIRD_PARTY_COPY_OUT,
        service_action: Some(0x10),
        usage: &[
            op::THIRD_PARTY_COPY_OUT,
            0x1F,
            0,
            0,
            0,
            0,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::THIRD_PARTY_COPY_OUT,
        service_action: Some(0x11),
        usage: &[
            op::THIRD_PARTY_COPY_OUT,
            0x1F,
            0,
            0,
            0,
            0,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::THIRD_PARTY_COPY_IN,
        service_action: Some(0x00),
        usage: &[op::THIRD_PARTY_COPY_IN, 0x1F, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::THIRD_PARTY_COPY_IN,
        service_action: Some(0x03),
        usage: &[op::THIRD_PARTY_COPY_IN, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::THIRD_PARTY_COPY_IN,
        service_action: Some(0x07),
        usage: &[op::THIRD_PARTY_COPY_IN, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::READ_16,
        service_action: None,
        usage: &[op::READ_16, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::COMPARE_AND_WRITE,
        service_action: None,
        usage: &[
            op::COMPARE_AND_WRITE,
            0xF8,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            0,
            0,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::WRITE_16,
        service_action: None,
        usage: &[
            op::WRITE_16,
            0xF8,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::ORWRITE_16,
        service_action: None,
        usage: &[
            op::ORWRITE_16,
            0xF8,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::WRITE_AND_VERIFY_16,
        service_action: None,
        usage: &[
            op::WRITE_AND_VERIFY_16,
            0xF6,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::VERIFY_16,
        service_action: None,
        usage: &[
            op::VERIFY_16,
            0xF6,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::PRE_FETCH_16,
        service_action: None,
        usage: &[
            op::PRE_FETCH_16,
            0x02,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::SYNCHRONIZE_CACHE_16,
        service_action: None,
        usage: &[
            op::SYNCHRONIZE_CACHE_16,
            0x02,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::WRITE_SAME_16,
        service_action: None,
        usage: &[
            op::WRITE_SAME_16,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::SERVICE_ACTION_IN_16,
        service_action: Some(sa::READ_CAPACITY_16),
        usage: &[op::SERVICE_ACTION_IN_16, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::SERVICE_ACTION_IN_16,
        service_action: Some(sa::GET_LBA_STATUS),
        usage: &[
            op::SERVICE_ACTION_IN_16,
            0x1F,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0,
            CONTROL,
        ],
    },
    CommandInfo {
        opcode: op::REPORT_LUNS,
        service_action: None,
        usage: &[op::REPORT_LUNS, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::MAINTENANCE_IN,
        service_action: Some(sa::REPORT_TARGET_PORT_GROUPS),
        usage: &[op::MAINTENANCE_IN, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::MAINTENANCE_IN,
        service_action: Some(sa::REPORT_SUPPORTED_OPERATION_CODES),
        usage: &[op::MAINTENANCE_IN, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::READ_12,
        service_action: None,
        usage: &[op::READ_12, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::WRITE_12,
        service_action: None,
        usage: &[op::WRITE_12, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::WRITE_AND_VERIFY_12,
        service_action: None,
        usage: &[op::WRITE_AND_VERIFY_12, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::VERIFY_12,
        service_action: None,
        usage: &[op::VERIFY_12, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
    CommandInfo {
        opcode: op::READ_DEFECT_DATA_12,
        service_action: None,
        usage: &[op::READ_DEFECT_DATA_12, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, CONTROL],
    },
];

/// Nominal and recommended command timeouts (seconds) reported with RCTD: a write can wait
/// for a failover, which takes a lease of a few seconds.
const TIMEOUT_NOMINAL_S: u32 = 5;
const TIMEOUT_RECOMMENDED_S: u32 = 60;

fn timeouts_descriptor(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0x00, 0x0A, 0, 0]);
    out.extend_from_slice(&TIMEOUT_NOMINAL_S.to_be_bytes());
    out.extend_from_slice(&TIMEOUT_RECOMMENDED_S.to_be_bytes());
}

/// The whole parameter data for a REPORT SUPPORTED OPERATION CODES request.
pub fn report(rctd: bool, options: u8, opcode: u8, service_action: u16) -> Result<Vec<u8>, Sense> {
    let has_actions = |code: u8| SUPPORTED.iter().any(|c| c.opcode == code && c.service_action.is_some());
    let find =
        |code: u8, action: Option<u16>| SUPPORTED.iter().find(|c| c.opcode == code && c.service_action == action);
    let one = match options {
        0 => {
            let mut out = vec![0u8; 4];
            for c in SUPPORTED {
                out.push(c.opcode);
                out.push(0);
                out.extend_from_slice(&c.service_action.unwrap_or(0).to_be_bytes());
                out.push(0);
                out.push(u8::from(rctd) << 1 | u8::from(c.service_action.is_some()));
                out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if rctd {
                    timeouts_descriptor(&mut out);
                }
            }
            let len = (out.len() - 4) as u32;
            out[..4].copy_from_slice(&len.to_be_bytes());
            return Ok(out);
        }
        1 => {
            if has_actions(opcode) {
                return Err(Sense::invalid_cdb_field(2, Some(2)));
            }
            find(opcode, None)
        }
        2 => {
            if !has_actions(opcode) && cdb_len(opcode).is_some() {
                return Err(Sense::invalid_cdb_field(2, Some(2)));
            }
            find(opcode, Some(service_action))
        }
        3 => find(opcode, has_actions(opcode).then_some(service_action)),
        _ => return Err(Sense::invalid_cdb_field(2, Some(2))),
    };
    let mut out = vec![0u8; 4];
    match one {
        Some(c) => {
            out[1] = u8::from(rctd) << 7 | 0x03; // supported, as the standard describes it
            out[2..4].copy_from_slice(&(c.usage.len() as u16).to_be_bytes());
            out.extend_from_slice(c.usage);
            if rctd {
                timeouts_descriptor(&mut out);
            }
        }
        None => out[1] = 0x01, // not supported
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdb::decode;

    #[test]
    fn every_usage_map_has_its_opcode_and_cdb_length() {
        for c in SUPPORTED {
            assert_eq!(c.usage[0], c.opcode);
            assert_eq!(Some(c.usage.len()), cdb_len(c.opcode), "opcode {:#x}", c.opcode);
        }
    }

    #[test]
    fn every_listed_command_decodes_with_only_its_used_bits() {
        // A CDB with all usage bits clear but the opcode and service action must decode or
        // fail only on a range, never as an unknown operation code.
        for c in SUPPORTED {
            let mut cdb = vec![0u8; c.usage.len()];
            cdb[0] = c.opcode;
            if let Some(sa) = c.service_action {
                cdb[1] = sa as u8;
            }
            if c.opcode == op::MAINTENANCE_IN || c.opcode == op::SERVICE_ACTION_IN_16 {
                assert!(decode(&cdb).is_ok(), "opcode {:#x} sa {:?}", c.opcode, c.service_action);
            } else if let Err(sense) = decode(&cdb) {
                assert_ne!(sense.asc, crate::sense::asc::INVALID_COMMAND_OPERATION_CODE, "opcode {:#x}", c.opcode);
            }
        }
    }

    #[test]
    fn all_commands_list_has_one_descriptor_each() {
        let b = report(false, 0, 0, 0).unwrap();
        assert_eq!(b.len(), 4 + 8 * SUPPORTED.len());
        let with_timeouts = report(true, 0, 0, 0).unwrap();
        assert_eq!(with_timeouts.len(), 4 + 20 * SUPPORTED.len());
        assert_eq!(with_timeouts[4 + 5] & 0x02, 0x02, "CTDP");
    }

    #[test]
    fn one_command_answers_follow_the_reporting_options() {
        let read10 = report(false, 1, op::READ_10, 0).unwrap();
        assert_eq!(read10[1] & 0x07, 0x03);
        assert_eq!(&read10[2..4], &[0, 10]);
        assert_eq!(read10[4], op::READ_10);
        assert_eq!(report(false, 1, 0xFF, 0).unwrap()[1] & 0x07, 0x01);
        // Option 1 for a command with service actions, option 2 without: invalid.
        assert!(report(false, 1, op::MAINTENANCE_IN, 0).is_err());
        assert!(report(false, 2, op::READ_10, 0).is_err());
        let rtpg = report(false, 2, op::MAINTENANCE_IN, sa::REPORT_TARGET_PORT_GROUPS).unwrap();
        assert_eq!(rtpg[1] & 0x07, 0x03);
        assert_eq!(report(false, 3, op::READ_10, 7).unwrap()[1] & 0x07, 0x03);
        assert!(report(false, 4, op::READ_10, 0).is_err());
    }
}
