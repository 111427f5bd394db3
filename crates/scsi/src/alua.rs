//! Asymmetric logical unit access (SPC-4 5.15): target port groups, their access states, and
//! the REPORT TARGET PORT GROUPS answer hosts poll to pick their paths.
//!
//! Tandem has implicit ALUA only: the cluster decides each port's state from the host's path
//! map, and SET TARGET PORT GROUPS is not supported (standard INQUIRY says TPGS = 01b). This
//! module only encodes states it is given; choosing them is the node's business.

/// SPC-4 table 149: asymmetric access states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Offline,
    Transitioning,
}

impl AccessState {
    pub fn code(self) -> u8 {
        match self {
            AccessState::ActiveOptimized => 0x0,
            AccessState::ActiveNonOptimized => 0x1,
            AccessState::Standby => 0x2,
            AccessState::Unavailable => 0x3,
            AccessState::Offline => 0xE,
            AccessState::Transitioning => 0xF,
        }
    }

    pub fn from_code(code: u8) -> Option<AccessState> {
        Some(match code & 0x0F {
            0x0 => AccessState::ActiveOptimized,
            0x1 => AccessState::ActiveNonOptimized,
            0x2 => AccessState::Standby,
            0x3 => AccessState::Unavailable,
            0xE => AccessState::Offline,
            0xF => AccessState::Transitioning,
            _ => return None,
        })
    }

    /// Whether a port in this state serves reads and writes (SPC-4 5.15.2.4).
    pub fn serves_io(self) -> bool {
        matches!(self, AccessState::ActiveOptimized | AccessState::ActiveNonOptimized)
    }

    /// The name `tandem paths` uses for it.
    pub fn name(self) -> &'static str {
        match self {
            AccessState::ActiveOptimized => "active-optimized",
            AccessState::ActiveNonOptimized => "active-non-optimized",
            AccessState::Standby => "standby",
            AccessState::Unavailable => "unavailable",
            AccessState::Offline => "offline",
            AccessState::Transitioning => "transitioning",
        }
    }
}

/// The supported-states bits this target reports for every group: T_SUP, U_SUP, AN_SUP, AO_SUP
/// (transitioning, unavailable, active/non-optimized, active/optimized). Standby and offline
/// are never used: a Tandem node either serves a volume (optimized at the primary,
/// non-optimized elsewhere, proxying), is failing over, or cannot serve it.
const SUPPORTED_STATES: u8 = 0x80 | 0x08 | 0x02 | 0x01;

/// One target port group: Tandem has one per node, holding that node's iSCSI target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    pub id: u16,
    pub state: AccessState,
    /// Relative target port identifiers of the group's ports (SPC-4: 1 to 65535).
    pub ports: Vec<u16>,
}

/// The largest number of groups and ports a report holds: a cluster has at most this many
/// nodes with a port each (the answer stays within a few KiB).
pub const PORT_GROUPS_MAX: usize = 256;

/// The REPORT TARGET PORT GROUPS parameter data (SPC-4 6.36), with the extended header
/// (format 001b) when `extended`: that one carries the implicit transition time, which hosts
/// use to bound how long they wait out `transitioning`.
pub fn report_target_port_groups(groups: &[PortGroup], extended: bool, transition_time_s: u8) -> Vec<u8> {
    let mut out = vec![0u8; if extended { 8 } else { 4 }];
    if extended {
        out[4] = 0x10; // FORMAT TYPE 001b
        out[5] = transition_time_s;
    }
    for group in groups.iter().take(PORT_GROUPS_MAX) {
        // PREF bit left clear: the optimized state already says which port to prefer.
        out.push(group.state.code());
        out.push(SUPPORTED_STATES);
        out.extend_from_slice(&group.id.to_be_bytes());
        out.push(0);
        out.push(0); // STATUS CODE: no status available
        out.push(0); // vendor specific
        let ports = &group.ports[..group.ports.len().min(usize::from(u8::MAX))];
        out.push(ports.len() as u8);
        for &port in ports {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// A decoded group descriptor of a REPORT TARGET PORT GROUPS answer (for tests and clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedGroup {
    pub id: u16,
    pub state: Option<AccessState>,
    pub ports: Vec<u16>,
}

/// Reads a REPORT TARGET PORT GROUPS answer back; `None` if it is cut short.
pub fn parse_report(data: &[u8], extended: bool) -> Option<Vec<ReportedGroup>> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    let mut at = if extended { 8 } else { 4 };
    let mut groups = Vec::new();
    while at < end {
        let head = data.get(at..at + 8)?;
        let count = usize::from(head[7]);
        let mut ports = Vec::with_capacity(count);
        for i in 0..count {
            let p = data.get(at + 8 + 4 * i..at + 12 + 4 * i)?;
            ports.push(u16::from_be_bytes([p[2], p[3]]));
        }
        groups.push(ReportedGroup {
            id: u16::from_be_bytes([head[2], head[3]]),
            state: AccessState::from_code(head[0]),
            ports,
        });
        at += 8 + 4 * count;
    }
    Some(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_layout_follows_spc4_table_161() {
        let groups = [
            PortGroup { id: 1, state: AccessState::ActiveOptimized, ports: vec![1] },
            PortGroup { id: 2, state: AccessState::Transitioning, ports: vec![2] },
        ];
        let b = report_target_port_groups(&groups, false, 0);
        assert_eq!(b.len(), 4 + 2 * 12);
        assert_eq!(&b[..4], &24u32.to_be_bytes());
        assert_eq!(&b[4..16], &[0x00, 0x8B, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(&b[16..28], &[0x0F, 0x8B, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]);
        let parsed = parse_report(&b, false).unwrap();
        assert_eq!(parsed[1].state, Some(AccessState::Transitioning));
        assert_eq!(parsed[1].ports, vec![2]);
    }

    #[test]
    fn extended_header_carries_the_transition_time() {
        let groups = [PortGroup { id: 7, state: AccessState::Unavailable, ports: vec![7, 8] }];
        let b = report_target_port_groups(&groups, true, 30);
        assert_eq!(&b[..4], &(4u32 + 8 + 8).to_be_bytes());
        assert_eq!((b[4], b[5]), (0x10, 30));
        let parsed = parse_report(&b, true).unwrap();
        assert_eq!(parsed, vec![ReportedGroup { id: 7, state: Some(AccessState::Unavailable), ports: vec![7, 8] }]);
        assert_eq!(parse_report(&b[..b.len() - 1], true), None);
    }
}
