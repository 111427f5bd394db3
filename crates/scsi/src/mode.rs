//! Mode pages (SPC-4 7.5, SBC-3 6.4): MODE SENSE answers and MODE SELECT changes.
//!
//! The pages: read-write error recovery (0x01), caching (0x08), control (0x0A) and
//! informational exceptions control (0x1C), the set Linux, VMware and Windows read. The one
//! changeable field is the control page's D_SENSE (descriptor-format sense data), kept per
//! I_T nexus (SPC-4 allows mode parameters per nexus; one host's choice does not change what
//! another receives, and nothing needs to be told). The caching page says WCE = 0 because it is
//! true: a write is acknowledged only when it is durable on every in-sync replica (invariant I1);
//! SYNCHRONIZE CACHE is accepted and flushes anyway.

use crate::cdb::PageControl;
use crate::sense::{asc, Sense};

/// Mode parameters one I_T nexus can change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModeState {
    /// Control page D_SENSE: sense data in descriptor format.
    pub descriptor_sense: bool,
}

/// Page codes, in the order MODE SENSE returns them for "all pages" (0x3F).
pub const PAGES: [u8; 4] = [0x01, 0x08, 0x0A, 0x1C];
const ALL_PAGES: u8 = 0x3F;
/// Subpage code asking for every subpage: this target has none but subpage 0.
const ALL_SUBPAGES: u8 = 0xFF;

/// One page in the form `control` asks for.
fn page(code: u8, control: PageControl, state: ModeState) -> Vec<u8> {
    let (len, mut body): (u8, Vec<u8>) = match code {
        0x01 => (0x0A, vec![0; 0x0A]),
        0x08 => (0x12, vec![0; 0x12]),
        0x0A => {
            let mut b = vec![0; 0x0A];
            if control != PageControl::Changeable {
                // Queue algorithm modifier 1: commands may be reordered (the host orders what
                // it needs with its own waits, as with any SAN disk).
                b[1] = 0x10;
            }
            (0x0A, b)
        }
        _ => (0x0A, vec![0; 0x0A]),
    };
    if code == 0x0A {
        let d_sense = match control {
            PageControl::Changeable => true,
            PageControl::Default | PageControl::Saved => false,
            PageControl::Current => state.descriptor_sense,
        };
        if d_sense {
            body[0] |= 0x04;
        }
    }
    let mut out = vec![code, len];
    out.append(&mut body);
    out
}

/// Geometry the block descriptor reports.
#[derive(Debug, Clone, Copy)]
pub struct BlockDescriptor {
    pub blocks: u64,
    pub block_size: u32,
}

/// A MODE SENSE request.
#[derive(Debug, Clone, Copy)]
pub struct SenseRequest {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub control: PageControl,
    pub page: u8,
    pub subpage: u8,
}

/// The whole MODE SENSE parameter data (before truncation to the allocation length).
pub fn sense(
    req: SenseRequest,
    state: ModeState,
    read_only: bool,
    geometry: BlockDescriptor,
) -> Result<Vec<u8>, Sense> {
    if req.control == PageControl::Saved {
        return Err(Sense::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED));
    }
    let mut pages = Vec::new();
    match (req.page, req.subpage) {
        (ALL_PAGES, 0) | (ALL_PAGES, ALL_SUBPAGES) => {
            for code in PAGES {
                pages.extend_from_slice(&page(code, req.control, state));
            }
        }
        (code, 0) if PAGES.contains(&code) => pages.extend_from_slice(&page(code, req.control, state)),
        (code, _) if PAGES.contains(&code) || code == ALL_PAGES => return Err(Sense::invalid_cdb_field(3, None)),
        _ => return Err(Sense::invalid_cdb_field(2, Some(5))),
    }
    let descriptor = if req.dbd {
        Vec::new()
    } else if req.llbaa {
        let mut d = vec![0u8; 16];
        d[0..8].copy_from_slice(&geometry.blocks.to_be_bytes());
        d[12..16].copy_from_slice(&geometry.block_size.to_be_bytes());
        d
    } else {
        let mut d = vec![0u8; 8];
        let blocks = u32::try_from(geometry.blocks).unwrap_or(u32::MAX);
        d[0..4].copy_from_slice(&blocks.to_be_bytes());
        d[5..8].copy_from_slice(&geometry.block_size.to_be_bytes()[1..4]);
        d
    };
    // Device-specific parameter: WP, and DPOFUA (the target honours DPO and FUA).
    let device_specific = if read_only { 0x80 } else { 0 } | 0x10;
    let mut out = Vec::with_capacity(8 + descriptor.len() + pages.len());
    if req.ten {
        out.extend_from_slice(&[0, 0, 0, device_specific, u8::from(req.llbaa && !req.dbd), 0]);
        out.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[0, 0, device_specific, descriptor.len() as u8]);
    }
    out.extend_from_slice(&descriptor);
    out.extend_from_slice(&pages);
    let data_len = out.len() - if req.ten { 2 } else { 1 };
    if req.ten {
        out[..2].copy_from_slice(&(data_len as u16).to_be_bytes());
    } else {
        out[0] = data_len.min(255) as u8;
    }
    Ok(out)
}

/// Applies MODE SELECT parameter data to `state`: every page must be one this target has, of
/// its length, and change only changeable bits (SPC-4 7.5.1). On error `state` is unchanged.
pub fn select(ten: bool, data: &[u8], block_size: u32, state: &mut ModeState) -> Result<(), Sense> {
    let header = if ten { 8 } else { 4 };
    if data.is_empty() {
        return Ok(());
    }
    if data.len() < header {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let descriptors = if ten { usize::from(u16::from_be_bytes([data[6], data[7]])) } else { usize::from(data[3]) };
    let mut at = header;
    let pages_at = at.checked_add(descriptors).filter(|&end| end <= data.len());
    let Some(pages_at) = pages_at else {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    };
    // A block descriptor may repeat the block length; it cannot change it.
    let descriptor_len = if ten && data[4] & 0x01 != 0 { 16 } else { 8 };
    while at + descriptor_len <= pages_at {
        let d = &data[at..at + descriptor_len];
        let len = if descriptor_len == 16 {
            u32::from_be_bytes([d[12], d[13], d[14], d[15]])
        } else {
            u32::from_be_bytes([0, d[5], d[6], d[7]])
        };
        if len != 0 && len != block_size {
            return Err(Sense::invalid_parameter_field((at + descriptor_len - 3) as u16));
        }
        at += descriptor_len;
    }
    let mut next = *state;
    at = pages_at;
    while at < data.len() {
        let code = data[at] & 0x3F;
        if data[at] & 0x40 != 0 || !PAGES.contains(&code) {
            return Err(Sense::invalid_parameter_field(at as u16));
        }
        let len = usize::from(*data.get(at + 1).ok_or(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR))?);
        let body = data.get(at + 2..at + 2 + len).ok_or(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR))?;
        let current = page(code, PageControl::Current, next);
        let changeable = page(code, PageControl::Changeable, next);
        if len != current.len() - 2 {
            return Err(Sense::invalid_parameter_field(at as u16 + 1));
        }
        for (i, &byte) in body.iter().enumerate() {
            if (byte ^ current[2 + i]) & !changeable[2 + i] != 0 {
                return Err(Sense::invalid_parameter_field((at + 2 + i) as u16));
            }
        }
        if code == 0x0A {
            next.descriptor_sense = body[0] & 0x04 != 0;
        }
        at += 2 + len;
    }
    *state = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEOMETRY: BlockDescriptor = BlockDescriptor { blocks: 1 << 21, block_size: 512 };

    fn req(page: u8) -> SenseRequest {
        SenseRequest { ten: false, dbd: false, llbaa: false, control: PageControl::Current, page, subpage: 0 }
    }

    #[test]
    fn mode_sense_6_all_pages_has_header_descriptor_and_every_page() {
        let b = sense(req(0x3F), ModeState::default(), false, GEOMETRY).unwrap();
        assert_eq!(usize::from(b[0]) + 1, b.len());
        assert_eq!(b[2], 0x10, "DPOFUA, not write-protected");
        assert_eq!(b[3], 8);
        assert_eq!(&b[4..8], &(1u32 << 21).to_be_bytes());
        assert_eq!(&b[9..12], &[0, 2, 0]);
        let mut at = 12;
        let mut seen = Vec::new();
        while at < b.len() {
            seen.push(b[at]);
            at += 2 + usize::from(b[at + 1]);
        }
        assert_eq!(seen, PAGES);
        assert_eq!(at, b.len());
    }

    #[test]
    fn caching_page_says_no_write_cache() {
        let b = sense(SenseRequest { dbd: true, ..req(0x08) }, ModeState::default(), false, GEOMETRY).unwrap();
        assert_eq!(b[3], 0, "no block descriptor");
        assert_eq!(&b[4..6], &[0x08, 0x12]);
        assert_eq!(b[6] & 0x04, 0, "WCE");
    }

    #[test]
    fn mode_sense_10_with_long_lba_descriptor() {
        let b =
            sense(SenseRequest { ten: true, llbaa: true, ..req(0x0A) }, ModeState::default(), true, GEOMETRY).unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([b[0], b[1]])) + 2, b.len());
        assert_eq!(b[3] & 0x80, 0x80, "write-protected");
        assert_eq!(b[4] & 1, 1, "LONGLBA");
        assert_eq!(&b[6..8], &[0, 16]);
        assert_eq!(&b[24..26], &[0x0A, 0x0A]);
    }

    #[test]
    fn saved_values_and_unknown_pages_are_refused() {
        let saved = SenseRequest { control: PageControl::Saved, ..req(0x08) };
        assert_eq!(
            sense(saved, ModeState::default(), false, GEOMETRY).unwrap_err().asc,
            asc::SAVING_PARAMETERS_NOT_SUPPORTED
        );
        assert_eq!(sense(req(0x19), ModeState::default(), false, GEOMETRY).unwrap_err().asc, asc::INVALID_FIELD_IN_CDB);
        let sub = SenseRequest { subpage: 1, ..req(0x0A) };
        assert_eq!(sense(sub, ModeState::default(), false, GEOMETRY).unwrap_err().field.map(|f| f.byte), Some(3));
    }

    #[test]
    fn select_turns_descriptor_sense_on_and_refuses_other_changes() {
        let mut state = ModeState::default();
        let current = sense(SenseRequest { dbd: true, ..req(0x0A) }, state, false, GEOMETRY).unwrap();
        let mut data = vec![0, 0, 0, 0];
        data.extend_from_slice(&current[4..]);
        data[6] |= 0x04;
        select(false, &data, 512, &mut state).unwrap();
        assert!(state.descriptor_sense);
        // Turning the write cache on is not allowed.
        let caching = sense(SenseRequest { dbd: true, ..req(0x08) }, state, false, GEOMETRY).unwrap();
        let mut data = vec![0, 0, 0, 0];
        data.extend_from_slice(&caching[4..]);
        data[6] |= 0x04;
        let before = state;
        assert_eq!(select(false, &data, 512, &mut state).unwrap_err().asc, asc::INVALID_FIELD_IN_PARAMETER_LIST);
        assert_eq!(state, before);
        // A page cut short, and a header alone.
        assert_eq!(
            select(false, &[0, 0, 0, 0, 0x0A, 0x0A, 0], 512, &mut state).unwrap_err().asc,
            asc::PARAMETER_LIST_LENGTH_ERROR
        );
        assert_eq!(select(false, &[0, 0, 0, 0], 512, &mut state), Ok(()));
    }

    #[test]
    fn select_refuses_a_block_descriptor_that_changes_the_block_size() {
        let mut state = ModeState::default();
        let mut data = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
        assert!(select(false, &data, 512, &mut state).is_err());
        data[10] = 0x02;
        assert_eq!(select(false, &data, 512, &mut state), Ok(()));
    }

    proptest::proptest! {
        #[test]
        fn select_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), ten: bool) {
            let mut state = ModeState::default();
            let _ = select(ten, &data, 512, &mut state);
        }
    }
}
