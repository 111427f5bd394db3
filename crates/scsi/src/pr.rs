//! PERSISTENT RESERVE IN and OUT (SPC-4 §6.15, §6.16): the parameter data in and out, and the
//! answers of a refused command. The reservations themselves are `tandem_reservations`'s: this
//! module only turns bytes into an [`Op`] and a [`Reservations`] into bytes.
//!
//! Tandem's range reservations through SCSI (a vendor extension, as SPC-2's extent scope once
//! was): scope code [`SCOPE_RANGE`] (1h) in RESERVE, RELEASE, PREEMPT, PREEMPT AND ABORT and
//! CLEAR, with a 40-byte parameter list: the usual 24 bytes, then the range's first logical
//! block (8 bytes) and its number of blocks (8 bytes). REGISTER AND MOVE with scope 1h moves
//! the sender's reservation of one range to another, with a 56-byte list: the reservation key
//! (8 bytes), 16 reserved bytes, the range held (16 bytes) and the new range (16 bytes).
//! docs/PROTOCOL.md lists the layouts.

use tandem_reservations::{Kind, Nexus, Op, Range, Refusal, Reservations};

use crate::lu::Reply;
use crate::sense::{asc, Asc, Sense, Status};

/// PERSISTENT RESERVE IN service actions.
pub mod prin {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// PERSISTENT RESERVE OUT service actions.
pub mod prout {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
}

/// The logical unit scope (the only one SPC-4 keeps).
pub const SCOPE_LU: u8 = 0x0;
/// Tandem's range scope (SPC-2's obsolete extent scope code).
pub const SCOPE_RANGE: u8 = 0x1;

/// INVALID RELEASE OF PERSISTENT RESERVATION.
const INVALID_RELEASE: Asc = Asc(0x26, 0x04);
/// INSUFFICIENT REGISTRATION RESOURCES.
const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);

/// The SCSI protocol identifier of iSCSI (SPC-4 table 362), in TransportIDs.
const PROTOCOL_ISCSI: u8 = 0x5;
/// The largest TransportID this target takes: an iSCSI name (223 bytes), `,i,0x` and an ISID,
/// its NUL and padding, and the 4-byte header.
const TRANSPORT_ID_BYTES_MAX: usize = 4 + 256;
/// The largest parameter list a PERSISTENT RESERVE OUT may carry: 24 bytes and a few
/// TransportIDs (SPEC_I_PT).
pub const PARAMETER_BYTES_MAX: u32 = 24 + 4 + 16 * TRANSPORT_ID_BYTES_MAX as u32;

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// The answer to PERSISTENT RESERVE IN `action`, before it is cut to the allocation length.
pub fn read(action: u8, state: &Reservations) -> Result<Vec<u8>, Sense> {
    let mut out = Vec::new();
    out.extend_from_slice(&state.generation.to_be_bytes());
    match action {
        prin::READ_KEYS => {
            let keys: Vec<u64> = state.registrations.iter().map(|r| r.key).collect();
            out.extend_from_slice(&((keys.len() * 8) as u32).to_be_bytes());
            for key in keys {
                out.extend_from_slice(&key.to_be_bytes());
            }
        }
        prin::READ_RESERVATION => match &state.reservation {
            None => out.extend_from_slice(&0u32.to_be_bytes()),
            Some(res) => {
                out.extend_from_slice(&16u32.to_be_bytes());
                out.extend_from_slice(&state.holder_key().unwrap_or(0).to_be_bytes());
                out.extend_from_slice(&[0; 4]); // Obsolete.
                out.push(0);
                out.push(SCOPE_LU << 4 | res.kind.code());
                out.extend_from_slice(&[0; 2]); // Obsolete.
            }
        },
        prin::REPORT_CAPABILITIES => {
            out.clear();
            out.extend_from_slice(&8u16.to_be_bytes());
            // SIP_C, ATP_C, PTPL_C: SPEC_I_PT, ALL_TG_PT and APTPL are supported.
            out.push(0x08 | 0x04 | 0x01);
            // TMV: the type mask is valid; ALLOW COMMANDS 0; PTPL_A.
            out.push(0x80 | u8::from(state.aptpl));
            // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; then EX_AC_AR.
            out.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            out.push(0x01);
            out.extend_from_slice(&[0; 2]);
        }
        prin::READ_FULL_STATUS => {
            let mut descriptors = Vec::new();
            for reg in &state.registrations {
                let holder = state.holds(&reg.nexus);
                descriptors.extend_from_slice(&reg.key.to_be_bytes());
                descriptors.extend_from_slice(&[0; 4]);
                descriptors.push(u8::from(holder)); // ALL_TG_PT 0: one descriptor per nexus.
                let kind =
                    state.reservation.as_ref().filter(|_| holder).map_or(0, |res| SCOPE_LU << 4 | res.kind.code());
                descriptors.push(kind);
                descriptors.extend_from_slice(&[0; 4]);
                descriptors.extend_from_slice(&reg.nexus.port.to_be_bytes());
                let id = transport_id(&reg.nexus.initiator);
                descriptors.extend_from_slice(&(id.len() as u32).to_be_bytes());
                descriptors.extend_from_slice(&id);
            }
            out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
            out.extend_from_slice(&descriptors);
        }
        _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
    }
    Ok(out)
}

/// An iSCSI TransportID for an initiator port name: format 01b (`name,i,0x<ISID>`) when it
/// has an ISID, else format 00b (the name alone), NUL-terminated and padded to 4 bytes.
pub fn transport_id(initiator: &str) -> Vec<u8> {
    let format = if initiator.contains(",i,0x") { 0x40 } else { 0x00 };
    let mut name = initiator.as_bytes().to_vec();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 20 {
        name.push(0);
    }
    let mut id = vec![format | PROTOCOL_ISCSI, 0];
    id.extend_from_slice(&(name.len() as u16).to_be_bytes());
    id.extend_from_slice(&name);
    id
}

/// Parses one TransportID at the start of `bytes`: the initiator port name and the bytes it
/// took.
fn parse_transport_id(bytes: &[u8]) -> Result<(String, usize), Sense> {
    if bytes.len() < 4 {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    if bytes[0] & 0x0F != PROTOCOL_ISCSI {
        return Err(Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST));
    }
    let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if len > TRANSPORT_ID_BYTES_MAX || 4 + len > bytes.len() {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let name = &bytes[4..4 + len];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let text = std::str::from_utf8(&name[..end]).map_err(|_| Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST))?;
    let initiator = match bytes[0] >> 6 {
        0 => text.to_string(),
        // Format 01b: the name and the ISID; keep the ISID's hex in lower case, as sessions do.
        1 => match text.split_once(",i,0x").or_else(|| text.split_once(",I,0X")).or_else(|| text.split_once(",i,0X")) {
            Some((name, isid)) => format!("{name},i,0x{}", isid.to_ascii_lowercase()),
            None => return Err(Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST)),
        },
        _ => return Err(Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST)),
    };
    if initiator.is_empty() {
        return Err(Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST));
    }
    Ok((initiator, 4 + len))
}

/// The type of a command that needs one (byte 2 of the CDB).
fn kind_of(kind: u8) -> Result<Kind, Sense> {
    Kind::from_code(kind).ok_or(Sense::invalid_cdb_field(2, Some(3)))
}

/// A byte range from a first logical block and a number of blocks.
fn range_at(params: &[u8], block_bytes: u64) -> Result<Range, Sense> {
    let lba = be64(params);
    let blocks = be64(&params[8..]);
    let range = lba.checked_mul(block_bytes).zip(blocks.checked_mul(block_bytes)).map(|(o, l)| Range::new(o, l));
    match range {
        Some(r) if r.len > 0 && r.end().is_some() => Ok(r),
        _ => Err(Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST)),
    }
}

/// The command a PERSISTENT RESERVE OUT with `action`, `scope` and `kind` (CDB byte 2) and
/// parameter list `params` makes through `me`, on a logical unit of `block_bytes` blocks.
pub fn command(action: u8, scope: u8, kind: u8, params: &[u8], me: &Nexus, block_bytes: u64) -> Result<Op, Sense> {
    let ranged = scope == SCOPE_RANGE;
    let uses_scope = matches!(action, prout::RESERVE | prout::RELEASE | prout::PREEMPT | prout::PREEMPT_AND_ABORT)
        || (ranged && matches!(action, prout::CLEAR | prout::REGISTER_AND_MOVE));
    if uses_scope && scope != SCOPE_LU && !ranged {
        return Err(Sense::invalid_cdb_field(2, Some(7)));
    }
    if action == prout::REGISTER_AND_MOVE {
        return if ranged { move_range(params, block_bytes) } else { register_and_move(params) };
    }
    if action > prout::REGISTER_AND_MOVE {
        return Err(Sense::invalid_cdb_field(1, Some(4)));
    }
    if params.len() < 24 {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let key = be64(params);
    let sa_key = be64(&params[8..]);
    let flags = params[20];
    let spec_i_pt = flags & 0x08 != 0;
    let all_tg_pt = flags & 0x04 != 0;
    let aptpl = flags & 0x01 != 0;
    let is_register = matches!(action, prout::REGISTER | prout::REGISTER_AND_IGNORE_EXISTING_KEY);
    // SPEC_I_PT and ALL_TG_PT belong to REGISTER only (SPC-4 table 221 notes).
    if !is_register && (spec_i_pt || all_tg_pt) {
        return Err(Sense::invalid_parameter_field(20));
    }
    let expected = if ranged && uses_scope { 40 } else { 24 };
    if !spec_i_pt && params.len() != expected {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let range = || range_at(&params[24..], block_bytes);
    let op = match action {
        prout::REGISTER | prout::REGISTER_AND_IGNORE_EXISTING_KEY => {
            let ignore_existing = action == prout::REGISTER_AND_IGNORE_EXISTING_KEY;
            let mut also = Vec::new();
            if spec_i_pt {
                if ignore_existing {
                    return Err(Sense::invalid_parameter_field(20));
                }
                if params.len() < 28 {
                    return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
                }
                let len = be32(&params[24..]) as usize;
                if 28 + len != params.len() {
                    return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
                }
                let mut at = 28;
                while at < params.len() {
                    let (initiator, took) = parse_transport_id(&params[at..])?;
                    also.push(initiator);
                    at += took;
                }
            }
            let all_ports = if all_tg_pt { vec![me.port] } else { Vec::new() };
            Op::Register { key, new_key: sa_key, ignore_existing, all_ports, aptpl, also }
        }
        prout::RESERVE if ranged => Op::ReserveRange { key, range: range()?, kind: kind_of(kind)? },
        prout::RESERVE => Op::Reserve { key, kind: kind_of(kind)? },
        prout::RELEASE if ranged => Op::ReleaseRange { key, range: range()? },
        prout::RELEASE => Op::Release { key, kind: kind_of(kind)? },
        prout::CLEAR if ranged => Op::ClearRange { key, range: range()? },
        prout::CLEAR => Op::Clear { key },
        prout::PREEMPT | prout::PREEMPT_AND_ABORT if ranged => {
            Op::PreemptRange { key, victim: sa_key, range: range()?, kind: kind_of(kind)? }
        }
        prout::PREEMPT | prout::PREEMPT_AND_ABORT => {
            Op::Preempt { key, victim: sa_key, kind: kind_of(kind)?, abort: action == prout::PREEMPT_AND_ABORT }
        }
        _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
    };
    Ok(op)
}

/// REGISTER AND MOVE's parameter list (SPC-4 table 225).
fn register_and_move(params: &[u8]) -> Result<Op, Sense> {
    if params.len() < 24 {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let len = be32(&params[20..]) as usize;
    if len < 24 || 24 + len != params.len() {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let (initiator, _) = parse_transport_id(&params[24..])?;
    let port = u16::from_be_bytes([params[18], params[19]]);
    Ok(Op::RegisterAndMove {
        key: be64(params),
        new_key: be64(&params[8..]),
        to: Nexus::new(initiator, port),
        unregister: params[17] & 0x02 != 0,
        aptpl: params[17] & 0x01 != 0,
    })
}

/// Tandem's MOVE of a range reservation (REGISTER AND MOVE with the range scope).
fn move_range(params: &[u8], block_bytes: u64) -> Result<Op, Sense> {
    if params.len() != 56 {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    Ok(Op::MoveRange {
        key: be64(params),
        from: range_at(&params[24..], block_bytes)?,
        to: range_at(&params[40..], block_bytes)?,
    })
}

/// The answer to a command the reservations refused.
pub fn refused(refusal: &Refusal, descriptor_sense: bool) -> Reply {
    let sense = match refusal {
        Refusal::Conflict(_) => return Reply::status(Status::ReservationConflict),
        Refusal::InvalidParameter(_) => Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST),
        Refusal::InvalidRelease(_) => Sense::illegal(INVALID_RELEASE),
        Refusal::NoResources(_) => Sense::illegal(INSUFFICIENT_REGISTRATION_RESOURCES),
    };
    Reply { status: Status::CheckCondition, data: Vec::new(), sense: Some(sense), descriptor_sense }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&key.to_be_bytes());
        p.extend_from_slice(&sa_key.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&[flags, 0, 0, 0]);
        p
    }

    fn me() -> Nexus {
        Nexus::new("iqn.2026-12.test:a,i,0x23d000000001", 2)
    }

    #[test]
    fn parameter_lists_become_commands() {
        let op = command(prout::REGISTER, 0, 0, &params(0, 7, 0x01), &me(), 512).unwrap();
        assert_eq!(
            op,
            Op::Register { key: 0, new_key: 7, ignore_existing: false, all_ports: vec![], aptpl: true, also: vec![] }
        );
        let op = command(prout::REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, &params(3, 7, 0x04), &me(), 512).unwrap();
        assert!(matches!(op, Op::Register { ignore_existing: true, ref all_ports, .. } if *all_ports == vec![2]));
        let op = command(prout::PREEMPT_AND_ABORT, 0, 5, &params(1, 2, 0), &me(), 512).unwrap();
        assert_eq!(op, Op::Preempt { key: 1, victim: 2, kind: Kind::WriteExclusiveRegistrantsOnly, abort: true });
        // SPEC_I_PT with one TransportID.
        let mut p = params(0, 9, 0x08);
        let id = transport_id("iqn.2026-12.test:b,i,0x23d000000002");
        p.extend_from_slice(&(id.len() as u32).to_be_bytes());
        p.extend_from_slice(&id);
        let op = command(prout::REGISTER, 0, 0, &p, &me(), 512).unwrap();
        assert!(
            matches!(op, Op::Register { ref also, .. } if *also == vec!["iqn.2026-12.test:b,i,0x23d000000002".to_string()])
        );
        // The range scope: LBA 8, 16 blocks of 512 bytes.
        let mut p = params(1, 0, 0);
        p.extend_from_slice(&8u64.to_be_bytes());
        p.extend_from_slice(&16u64.to_be_bytes());
        let op = command(prout::RESERVE, SCOPE_RANGE, 1, &p, &me(), 512).unwrap();
        assert_eq!(op, Op::ReserveRange { key: 1, range: Range::new(4096, 8192), kind: Kind::WriteExclusive });
        // REGISTER AND MOVE to another initiator through port 3.
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_be_bytes());
        p.extend_from_slice(&5u64.to_be_bytes());
        p.extend_from_slice(&[0, 0x02, 0, 3]);
        let id = transport_id("iqn.2026-12.test:c,i,0x23d000000003");
        p.extend_from_slice(&(id.len() as u32).to_be_bytes());
        p.extend_from_slice(&id);
        let op = command(prout::REGISTER_AND_MOVE, 0, 1, &p, &me(), 512).unwrap();
        assert_eq!(
            op,
            Op::RegisterAndMove {
                key: 1,
                new_key: 5,
                to: Nexus::new("iqn.2026-12.test:c,i,0x23d000000003", 3),
                unregister: true,
                aptpl: false
            }
        );
    }

    #[test]
    fn bad_parameter_lists_are_refused_with_the_right_sense() {
        let sense_of = |r: Result<Op, Sense>| r.expect_err("refused").asc;
        assert_eq!(
            sense_of(command(prout::REGISTER, 0, 0, &params(0, 1, 0)[..20], &me(), 512)),
            asc::PARAMETER_LIST_LENGTH_ERROR
        );
        let mut long = params(0, 1, 0);
        long.push(0);
        assert_eq!(sense_of(command(prout::REGISTER, 0, 0, &long, &me(), 512)), asc::PARAMETER_LIST_LENGTH_ERROR);
        assert_eq!(sense_of(command(prout::RESERVE, 0, 2, &params(1, 0, 0), &me(), 512)), asc::INVALID_FIELD_IN_CDB);
        assert_eq!(sense_of(command(prout::RESERVE, 2, 1, &params(1, 0, 0), &me(), 512)), asc::INVALID_FIELD_IN_CDB);
        assert_eq!(
            sense_of(command(prout::RESERVE, 0, 1, &params(1, 0, 0x04), &me(), 512)),
            asc::INVALID_FIELD_IN_PARAMETER_LIST
        );
        assert_eq!(sense_of(command(0x08, 0, 1, &params(1, 0, 0), &me(), 512)), asc::INVALID_FIELD_IN_CDB);
        // A TransportID longer than the list.
        let mut p = params(0, 9, 0x08);
        p.extend_from_slice(&8u32.to_be_bytes());
        p.extend_from_slice(&[0x45, 0, 0x01, 0x00, b'x', 0, 0, 0]);
        assert_eq!(sense_of(command(prout::REGISTER, 0, 0, &p, &me(), 512)), asc::PARAMETER_LIST_LENGTH_ERROR);
    }

    #[test]
    fn reservation_data_reads_back_as_spc_lays_it_out() {
        let mut state = Reservations::default();
        let a = Nexus::new("iqn.a,i,0x000000000001", 1);
        let register = |new_key| Op::Register {
            key: 0,
            new_key,
            ignore_existing: false,
            all_ports: vec![],
            aptpl: false,
            also: vec![],
        };
        state.apply(&a, &register(0xaa)).unwrap();
        state.apply(&a, &Op::Reserve { key: 0xaa, kind: Kind::ExclusiveAccess }).unwrap();
        let keys = read(prin::READ_KEYS, &state).unwrap();
        assert_eq!(&keys[4..8], &8u32.to_be_bytes());
        assert_eq!(be64(&keys[8..]), 0xaa);
        let res = read(prin::READ_RESERVATION, &state).unwrap();
        assert_eq!((&res[4..8], be64(&res[8..]), res[21]), (&16u32.to_be_bytes()[..], 0xaa, 0x03));
        let full = read(prin::READ_FULL_STATUS, &state).unwrap();
        assert_eq!((be64(&full[8..]), full[20], full[21]), (0xaa, 1, 0x03));
        assert_eq!(u16::from_be_bytes([full[26], full[27]]), 1);
        let (back, _) = parse_transport_id(&full[32..]).unwrap();
        assert_eq!(back, a.initiator);
        assert_eq!(read(prin::REPORT_CAPABILITIES, &state).unwrap().len(), 8);
        assert!(read(0x04, &state).is_err());
    }
}
