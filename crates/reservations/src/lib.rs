//! Persistent reservations of one volume, as a pure state machine: SCSI-3 persistent
//! reservations (SPC-4 §5.13: registrations by I_T nexus, one reservation of six types,
//! REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT AND ABORT, REGISTER AND MOVE, the
//! generation, APTPL and the unit attentions they raise), and Tandem's *range reservations*:
//! the same registrants reserving byte ranges of the volume, with the same types, released,
//! preempted, cleared or moved to another range in one step.
//!
//! What it is not: it keeps no time, does no I/O and knows nothing of Raft, SCSI bytes or NBD.
//! The cluster map holds one [`Reservations`] per volume and applies each [`Op`] in log order
//! ([`Reservations::apply`]); the volume's primary asks [`Reservations::check`] before it
//! executes each host request; the iSCSI target turns [`Refusal`]s into sense data and
//! [`Reservations`]'s contents into PERSISTENT RESERVE IN data.
//!
//! Every applied operation is all-or-nothing: a refusal changes nothing. Every collection is
//! bounded ([`REGISTRATIONS_MAX`], [`RANGES_MAX`], [`ATTENTIONS_MAX`]), so an apply costs at
//! most a bounded amount of work whatever a host sends.

mod apply;
mod check;
mod model;

pub use check::{Access, Conflict};
pub use model::{
    Attention, Kind, Nexus, Op, Outcome, PendingAttention, Range, RangeReservation, Refusal, Registration, Reservation,
    Reservations, ATTENTIONS_MAX, INITIATOR_BYTES_MAX, PORTS_MAX, RANGES_MAX, RECENT_MAX, REGISTRATIONS_MAX,
    SPEC_I_PT_MAX,
};

#[cfg(test)]
mod tests;
