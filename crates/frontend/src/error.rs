//! The errors a volume answers a protocol server with. Kinds, not codes: each protocol maps
//! them to what its clients understand (NBD to an errno, SCSI to a status and sense data), and
//! the message is for the log.

use thiserror::Error;

/// A failed volume operation; the variant picks what the host sees, the message is logged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IoError {
    /// The operation failed on the way to or at the medium; the data may or may not be there.
    #[error("I/O error: {0}")]
    Io(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space: {0}")]
    NoSpace(String),
    /// The host may not do this (for example, a write to a read-only volume).
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// Another host holds a reservation that excludes this one from the range. Nothing raises
    /// it before range reservations land; a protocol without a code of its own for it answers
    /// as for [`IoError::NotPermitted`] (NBD: EPERM), SCSI answers RESERVATION CONFLICT.
    #[error("reservation conflict: {0}")]
    ReservationConflict(String),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("out of memory: {0}")]
    NoMemory(String),
    /// The volume is going away on this node (lost its lease, node stopping).
    #[error("shutting down: {0}")]
    Shutdown(String),
    /// A copy token could not be used; nothing was written.
    #[error("token refused: {1}")]
    Token(crate::copy::TokenFault, String),
    /// The other volume of a copy cannot be found or reached (not in this cluster, or not
    /// visible to this host).
    #[error("copy target unreachable: {0}")]
    CopyTarget(String),
}

/// Why an export could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error("no such export: {0}")]
    NotFound(String),
    /// It exists but cannot be served here now (e.g. this node is not a path for it).
    #[error("export unavailable: {0}")]
    Unavailable(String),
    /// The client may not open it (not connected to its host, or it did not identify).
    #[error("access denied: {0}")]
    Denied(String),
}
