//! SCSI for Tandem's block targets: CDBs in, decisions and bytes out (SPC-4, SBC-3).
//!
//! - [`cdb`]: CDB bytes to a typed [`cdb::Command`]; malformed or unknown CDBs become the
//!   ILLEGAL REQUEST sense SPC-4 names, never a panic.
//! - [`lu`]: a volume as a thin-provisioned disk seen through one target port:
//!   [`lu::LogicalUnit::plan`] answers a command or says what I/O it needs, in SAM-5's order
//!   (unit attention, CDB, ALUA access state, medium).
//! - [`inquiry`], [`mode`], [`opcodes`], [`alua`]: the parameter data of INQUIRY and its VPD
//!   pages, MODE SENSE/SELECT, REPORT SUPPORTED OPERATION CODES and REPORT TARGET PORT GROUPS.
//! - [`sense`]: status codes and sense data in fixed and descriptor formats.
//! - [`tpc`]: third-party copy: EXTENDED COPY, POPULATE TOKEN, WRITE USING TOKEN, their
//!   results, and the third-party copy VPD page.
//!
//! Sans-IO: no sockets, no runtime, no clock. A transport (the iSCSI target in
//! `tandem-iscsi`) moves the bytes and carries out the [`lu::Io`] a plan asks for against a
//! `tandem_frontend::Volume`; this crate only decides. It depends on `tandem-frontend` for
//! the volume error kinds it maps to sense data, nothing else of Tandem.

pub mod alua;
pub mod cdb;
pub mod inquiry;
pub mod lu;
pub mod mode;
pub mod opcodes;
pub mod pr;
pub mod sense;
pub mod tpc;

pub use alua::{AccessState, PortGroup};
pub use cdb::Command;
pub use lu::{Access, Failure, Io, LogicalUnit, Nexus, Plan, Reply, UnitAttention};
pub use sense::{Sense, SenseKey, Status};
