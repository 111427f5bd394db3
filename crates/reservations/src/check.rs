//! [`Reservations::check`]: may this nexus read or write these bytes now (SPC-4 table 201,
//! "persistent reservation conflicts", for the data commands; the same rule for ranges).

use std::fmt;

use crate::model::*;

/// What a host request does to the bytes it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// READ, and the read half of COMPARE AND WRITE.
    Read,
    /// WRITE, WRITE ZEROES / WRITE SAME, UNMAP / TRIM, COMPARE AND WRITE.
    Write,
}

/// A request refused by a reservation, with the reason for the node's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub reason: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reservation conflict: {}", self.reason)
    }
}

impl std::error::Error for Conflict {}

/// Whether a reservation of `kind` lets a nexus that holds it (`holder`) or is registered
/// (`registered`) make an `access`.
fn permits(kind: Kind, holder: bool, registered: bool, access: Access) -> bool {
    if holder || (registered && kind.registrants_have_access()) {
        return true;
    }
    access == Access::Read && !kind.excludes_reads()
}

impl Reservations {
    /// Whether `nexus` may make `access` to the `len` bytes at `offset` (a `len` of 0, as a
    /// flush has, meets only the whole-volume reservation). Costs one pass over the
    /// registrations and range reservations, and nothing when there are none.
    pub fn check(&self, nexus: &Nexus, access: Access, offset: u64, len: u64) -> Result<(), Conflict> {
        if self.reservation.is_none() && self.ranges.is_empty() {
            return Ok(());
        }
        let registered = self.registration(nexus).is_some();
        if let Some(res) = &self.reservation {
            let holder = registered && (res.kind.all_registrants() || res.holder == *nexus);
            if !permits(res.kind, holder, registered, access) {
                return Err(Conflict {
                    reason: format!(
                        "{}'s {} reservation of the whole volume excludes {nexus}'s {}",
                        res.holder,
                        res.kind,
                        access_name(access)
                    ),
                });
            }
        }
        for r in self.ranges.iter().filter(|r| r.range.overlaps(offset, len)) {
            let holder = registered && (r.kind.all_registrants() || r.holder == *nexus);
            if !permits(r.kind, holder, registered, access) {
                return Err(Conflict {
                    reason: format!(
                        "{}'s {} reservation of range {} excludes {nexus}'s {} of {len} bytes at {offset}",
                        r.holder,
                        r.kind,
                        r.range,
                        access_name(access)
                    ),
                });
            }
        }
        Ok(())
    }
}

fn access_name(access: Access) -> &'static str {
    match access {
        Access::Read => "read",
        Access::Write => "write",
    }
}
