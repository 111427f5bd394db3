//! The host-facing seam of a Tandem node: what a block protocol server (NBD today, iSCSI next)
//! needs from the volumes behind it, the errors it gets back, and the budgets it is given.
//!
//! - [`volume`]: the [`Exports`] and [`Volume`] traits. The node implements them once, on its
//!   replicated volumes; protocol tests implement them on memory.
//! - [`error`]: [`IoError`] and [`OpenError`], neutral kinds that each protocol maps to its own
//!   codes (NBD errnos in `tandem-nbd`, SCSI sense in the iSCSI target).
//! - [`budget`]: [`Budgets`], the limits shared by all connections (of every protocol), passed
//!   to each server by whoever starts it rather than held in process globals.
//!
//! This crate speaks no protocol, opens no socket and depends on no async runtime (std futures
//! only): a rule written here (access, reservations, copy) holds for every protocol alike.

pub mod budget;
pub mod copy;
pub mod error;
pub mod volume;

pub use budget::{Budgets, BufferBudget, BufferReservation, BUFFER_UNIT_BYTES};
pub use copy::{CopyUnit, Token, TokenFault, TokenRequest, TOKEN_BYTES};
pub use error::{IoError, OpenError};
pub use volume::{Exports, Extent, Identification, Peer, Volume};
