//! INQUIRY data: the standard page (SPC-4 6.6.2) and the vital product data pages a
//! thin-provisioned disk reports (0x00 supported pages, 0x80 unit serial number, 0x83 device
//! identification, 0xB0 block limits, 0xB1 block device characteristics, 0xB2 logical block
//! provisioning).
//!
//! What hosts key on: the NAA designator and the serial number identify the volume and are the
//! same through every node, so a multipath stack sees one disk with several paths; the relative
//! target port and target port group designators (association: target port) tell Linux's ALUA
//! handler which group the path it asked through belongs to; the TPGS bits of the standard
//! page say implicit ALUA.

use crate::lu::{Geometry, Identity, Limits, Port, Provisioning};

/// SPC-4 version descriptors in the standard page: SAM-5, SPC-4, SBC-3, iSCSI (no version
/// claimed).
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0460, 0x04C0, 0x0960];

/// Bytes of the standard page: the 36 every host reads plus the version descriptors (bytes
/// 58..74), padded to the 96 that Linux asks for.
pub const STANDARD_INQUIRY_BYTES: usize = 96;

/// The VPD pages this target has, in ascending order as page 0x00 must list them.
pub const SUPPORTED_VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

/// Longest unit serial number kept: VPD 0x80 fits it in one byte of length, and a multipath
/// stack compares it whole.
pub const SERIAL_BYTES_MAX: usize = 64;

/// Longest SCSI name string designator (SPC-4: 256 bytes, NUL-terminated, multiple of 4).
const SCSI_NAME_BYTES_MAX: usize = 256;

/// The standard INQUIRY data (SPC-4 table 142).
pub fn standard(identity: &Identity) -> Vec<u8> {
    let mut b = vec![0u8; STANDARD_INQUIRY_BYTES];
    b[0] = 0x00; // peripheral qualifier 000b (connected), device type 00h (direct access block)
    b[1] = 0x00; // not removable
    b[2] = 0x06; // SPC-4
    b[3] = 0x10 | 0x02; // HISUP, response data format 2
    b[4] = (STANDARD_INQUIRY_BYTES - 5) as u8;
    b[5] = 0x10 | 0x08; // TPGS = 01b: implicit ALUA only; 3PC: third-party copy (VPD 0x8F)
    b[6] = 0x10; // MULTIP: the unit has more than one port (one per node)
    b[7] = 0x02; // CMDQUE: full task management model
    b[8..16].copy_from_slice(&identity.vendor);
    b[16..32].copy_from_slice(&identity.product);
    b[32..36].copy_from_slice(&identity.revision);
    for (i, d) in VERSION_DESCRIPTORS.iter().enumerate() {
        b[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    b
}

/// The INQUIRY answer for a VPD page, or `None` if this target has no such page.
pub fn vpd(
    page: u8,
    identity: &Identity,
    port: &Port,
    geometry: &Geometry,
    limits: &Limits,
    provisioning: &Provisioning,
) -> Option<Vec<u8>> {
    let body = match page {
        0x00 => SUPPORTED_VPD_PAGES.to_vec(),
        0x80 => serial(identity),
        0x83 => device_identification(identity, port),
        0x8F => crate::tpc::vpd_third_party_copy(&crate::tpc::CopyLimits::for_geometry(geometry)),
        0xB0 => block_limits(limits),
        0xB1 => block_device_characteristics(),
        0xB2 => logical_block_provisioning(provisioning, geometry),
        _ => return None,
    };
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&[0x00, page]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

fn serial(identity: &Identity) -> Vec<u8> {
    let s = identity.serial.as_bytes();
    s[..s.len().min(SERIAL_BYTES_MAX)].to_vec()
}

/// Designator header bytes (SPC-4 table 459).
fn designator(out: &mut Vec<u8>, protocol: Option<u8>, code_set: u8, association: u8, kind: u8, body: &[u8]) {
    let (piv, proto) = match protocol {
        Some(p) => (0x80, p << 4),
        None => (0, 0),
    };
    out.push(proto | code_set);
    out.push(piv | (association << 4) | kind);
    out.push(0);
    out.push(body.len() as u8);
    out.extend_from_slice(body);
}

/// iSCSI's protocol identifier (SPC-4 table 362).
const PROTOCOL_ISCSI: u8 = 0x5;
const CODE_SET_BINARY: u8 = 0x1;
const CODE_SET_ASCII: u8 = 0x2;
const CODE_SET_UTF8: u8 = 0x3;
const ASSOCIATION_LU: u8 = 0x0;
const ASSOCIATION_TARGET_PORT: u8 = 0x1;
const TYPE_T10_VENDOR: u8 = 0x1;
const TYPE_NAA: u8 = 0x3;
const TYPE_RELATIVE_TARGET_PORT: u8 = 0x4;
const TYPE_TARGET_PORT_GROUP: u8 = 0x5;
const TYPE_SCSI_NAME: u8 = 0x8;

/// VPD 0x83: the logical unit's NAA and T10 vendor identifiers (the same through every port),
/// then this port's relative target port, target port group and SCSI name.
fn device_identification(identity: &Identity, port: &Port) -> Vec<u8> {
    let mut out = Vec::new();
    designator(&mut out, None, CODE_SET_BINARY, ASSOCIATION_LU, TYPE_NAA, &naa_locally_assigned(identity.naa));
    let mut t10 = identity.vendor.to_vec();
    t10.extend_from_slice(serial(identity).as_slice());
    designator(&mut out, None, CODE_SET_ASCII, ASSOCIATION_LU, TYPE_T10_VENDOR, &t10);
    let mut rel = [0u8; 4];
    rel[2..].copy_from_slice(&port.relative_port.to_be_bytes());
    designator(
        &mut out,
        Some(PROTOCOL_ISCSI),
        CODE_SET_BINARY,
        ASSOCIATION_TARGET_PORT,
        TYPE_RELATIVE_TARGET_PORT,
        &rel,
    );
    let mut group = [0u8; 4];
    group[2..].copy_from_slice(&port.group.to_be_bytes());
    designator(
        &mut out,
        Some(PROTOCOL_ISCSI),
        CODE_SET_BINARY,
        ASSOCIATION_TARGET_PORT,
        TYPE_TARGET_PORT_GROUP,
        &group,
    );
    if !port.name.is_empty() {
        designator(
            &mut out,
            Some(PROTOCOL_ISCSI),
            CODE_SET_UTF8,
            ASSOCIATION_TARGET_PORT,
            TYPE_SCSI_NAME,
            &scsi_name(&port.name),
        );
    }
    out
}

/// NAA 3 (locally assigned, SPC-4 7.8.6.6.3): 4 bits of type and 60 bits the cluster assigns.
/// Tandem holds no IEEE company identifier, which NAA 5 and 6 require.
pub fn naa_locally_assigned(id: u64) -> [u8; 8] {
    ((0x3u64 << 60) | (id & ((1 << 60) - 1))).to_be_bytes()
}

/// A SCSI name string: UTF-8, NUL-terminated, padded with NULs to a multiple of 4 bytes.
fn scsi_name(name: &str) -> Vec<u8> {
    let bytes = name.as_bytes();
    let take = bytes.len().min(SCSI_NAME_BYTES_MAX - 4);
    let mut out = bytes[..take].to_vec();
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out
}

/// VPD 0xB0 (SBC-3 6.5.3), page length 0x3C.
fn block_limits(limits: &Limits) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    // Byte 0 (page byte 4): WSNZ. A WRITE SAME of zero blocks would mean "to the end of the
    // medium": refused, so one command cannot rewrite a whole volume.
    b[0] = 0x01;
    b[1] = limits.compare_and_write_blocks_max;
    b[2..4].copy_from_slice(&limits.transfer_granularity_blocks.to_be_bytes());
    b[4..8].copy_from_slice(&limits.transfer_blocks_max.to_be_bytes());
    b[8..12].copy_from_slice(&limits.transfer_blocks_optimal.to_be_bytes());
    b[12..16].copy_from_slice(&limits.transfer_blocks_max.to_be_bytes()); // maximum prefetch length
    b[16..20].copy_from_slice(&limits.unmap_blocks_max.to_be_bytes());
    b[20..24].copy_from_slice(&limits.unmap_descriptors_max.to_be_bytes());
    b[24..28].copy_from_slice(&limits.unmap_granularity_blocks.to_be_bytes());
    b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    b[32..40].copy_from_slice(&limits.write_same_blocks_max.to_be_bytes());
    b
}

/// VPD 0xB1 (SBC-3 6.5.2): a non-rotating medium, no form factor.
fn block_device_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b
}

/// VPD 0xB2 (SBC-3 6.5.4): UNMAP and WRITE SAME with UNMAP supported, thin provisioning, and
/// whether unmapped blocks read as zeroes.
fn logical_block_provisioning(provisioning: &Provisioning, _geometry: &Geometry) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if provisioning.thin {
        b[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
        if provisioning.unmapped_reads_zero {
            b[1] |= 0x04; // LBPRZ
        }
        b[2] = 0x02; // provisioning type: thin
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lu::tests::{identity, port};

    #[test]
    fn standard_page_says_implicit_alua_and_names_the_product() {
        let b = standard(&identity());
        assert_eq!(b.len(), 96);
        assert_eq!(b[0], 0);
        assert_eq!(b[2], 6);
        assert_eq!(b[3] & 0x0F, 2);
        assert_eq!(usize::from(b[4]) + 5, 96);
        assert_eq!((b[5] >> 4) & 0x3, 0b01, "TPGS");
        assert_eq!(&b[8..16], b"TANDEM  ");
        assert_eq!(&b[58..60], &[0x00, 0xA0]);
    }

    #[test]
    fn device_identification_matches_spc4_byte_for_byte() {
        let id = identity();
        let b = vpd(0x83, &id, &port(2, 2), &Default::default(), &Default::default(), &Default::default()).unwrap();
        assert_eq!(&b[..2], &[0x00, 0x83]);
        assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), b.len() - 4);
        // NAA designator: binary, LU association, type 3, 8 bytes, NAA 3 in the high nibble.
        assert_eq!(&b[4..8], &[0x01, 0x03, 0x00, 0x08]);
        assert_eq!(b[8] >> 4, 0x3);
        assert_eq!(&b[8..16], &naa_locally_assigned(id.naa));
        // T10 vendor designator: ASCII, LU association, type 1.
        let t10_len = usize::from(b[19]);
        assert_eq!(&b[16..19], &[0x02, 0x01, 0x00]);
        assert_eq!(&b[20..28], b"TANDEM  ");
        let at = 20 + t10_len;
        // Relative target port: iSCSI, PIV, target-port association, type 4, port 2.
        assert_eq!(&b[at..at + 8], &[0x51, 0x94, 0x00, 0x04, 0, 0, 0, 2]);
        // Target port group: type 5, group 2.
        assert_eq!(&b[at + 8..at + 16], &[0x51, 0x95, 0x00, 0x04, 0, 0, 0, 2]);
        // SCSI name string: UTF-8, type 8, length a multiple of 4, NUL-terminated.
        let name = &b[at + 16..];
        assert_eq!(&name[..2], &[0x53, 0x98]);
        assert_eq!(usize::from(name[3]) % 4, 0);
        assert!(name[4..].starts_with(b"iqn.2026-12.io.tandem:cluster,t,0x0002\0"));
    }

    #[test]
    fn the_same_volume_has_the_same_logical_unit_designators_on_every_port() {
        let id = identity();
        let a = vpd(0x83, &id, &port(1, 1), &Default::default(), &Default::default(), &Default::default()).unwrap();
        let b = vpd(0x83, &id, &port(3, 3), &Default::default(), &Default::default(), &Default::default()).unwrap();
        let lu_part = 4 + 12 + 4 + 8 + id.serial.len();
        assert_eq!(a[..lu_part], b[..lu_part]);
        assert_ne!(a, b);
    }

    #[test]
    fn naa_keeps_sixty_bits_of_the_id() {
        assert_eq!(naa_locally_assigned(u64::MAX), [0x3F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(naa_locally_assigned(5), [0x30, 0, 0, 0, 0, 0, 0, 5]);
    }
}
