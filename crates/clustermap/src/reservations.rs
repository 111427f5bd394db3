//! The persistent reservations of volumes: one [`Reservations`] per volume that has any, changed
//! only by [`MetaCmd::Reserve`](crate::MetaCmd::Reserve) through the pure state machine of
//! `tandem_reservations`, so every node holds the same registrations and reservations.

use tandem_reservations::{Nexus, Op, Range, Refusal, Reservations};
use tandem_types::{Epoch, VolumeId};

use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::MetaReply;

impl ClusterMap {
    /// The reservations of volume `id` (empty for a volume that never had any).
    pub fn reservations_of(&self, id: VolumeId) -> Option<&Reservations> {
        self.reservations.get(&id)
    }

    pub(crate) fn reserve(&mut self, id: VolumeId, epoch: Epoch, command: u64, nexus: &Nexus, op: &Op) -> MetaReply {
        let Some(vol) = self.volumes.get(&id) else {
            return MetaReply::NotFound(format!("no volume with id {id}"));
        };
        if vol.epoch != epoch {
            return MetaReply::Conflict(format!(
                "volume {id} is at epoch {}, not {epoch}: the reservation command comes from a stale primary",
                vol.epoch
            ));
        }
        if let Some(range) = op_ranges(op).into_iter().find(|r| r.end().is_none_or(|end| end > vol.size_bytes)) {
            return MetaReply::Reservation(Err(Refusal::InvalidParameter(format!(
                "range {range} runs past the end of the volume ({} bytes)",
                vol.size_bytes
            ))));
        }
        let before = self.reservations.get(&id).cloned().unwrap_or_default();
        let mut state = before.clone();
        let result = state.apply_once(command, nexus, op);
        if state != before {
            if state.is_empty() {
                self.reservations.remove(&id);
            } else {
                self.reservations.insert(id, state);
            }
            self.touched.push(ObjectKey::Reservations(id));
        }
        MetaReply::Reservation(result)
    }
}

/// The byte ranges an operation names.
fn op_ranges(op: &Op) -> Vec<Range> {
    match op {
        Op::ReserveRange { range, .. }
        | Op::ReleaseRange { range, .. }
        | Op::PreemptRange { range, .. }
        | Op::ClearRange { range, .. } => vec![*range],
        Op::MoveRange { from, to, .. } => vec![*from, *to],
        _ => Vec::new(),
    }
}
