//! What the server needs from the storage behind it: a set of named exports, each a volume of
//! bytes. The node implements these traits on top of replicated volumes; tests implement them
//! on memory.

use std::future::Future;

use bytes::Bytes;
use thiserror::Error;

use crate::codec::errno;

/// The exports a server offers. Shared by every connection.
pub trait Exports: Send + Sync + 'static {
    type Volume: Volume;

    /// Export names for `NBD_OPT_LIST`. Names longer than [`crate::NAME_BYTES_MAX`] are skipped.
    fn list(&self) -> Vec<String>;

    /// Opens the export `name` for one connection (and briefly for `NBD_OPT_INFO`). The server
    /// keeps the volume in an `Arc` for the connection's lifetime and shares it with the tasks
    /// that serve its requests.
    fn open(&self, name: &str) -> impl Future<Output = Result<Self::Volume, OpenError>> + Send;
}

/// One export's bytes. Offsets and lengths the server passes are already checked against
/// [`Volume::size_bytes`] and [`crate::REQUEST_BYTES_MAX`]; calls for one connection may run
/// concurrently (up to [`crate::INFLIGHT_MAX`]).
///
/// A request's future may be dropped before it completes when the connection is torn down by
/// server shutdown; implementations must leave the volume consistent when that happens (a write
/// that was never acknowledged may or may not have happened, as on a power cut).
pub trait Volume: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;

    fn read_only(&self) -> bool {
        false
    }

    /// Whether several connections may share the export (`NBD_FLAG_CAN_MULTI_CONN`): a flush or
    /// FUA write acknowledged on one connection must be visible on every other.
    fn multi_conn(&self) -> bool;

    /// Fills `buf` from `offset`. Large reads arrive as several calls of at most
    /// [`crate::READ_CHUNK_BYTES`] each.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Writes `data` at `offset`; with `fua`, the data is durable when the future completes.
    /// `data` is `Bytes` (not `&[u8]`) so a replicated backend can hand the same buffer to
    /// several replicas and tasks without copying it.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Hints that `len` bytes from `offset` are no longer needed; reading them afterwards may
    /// return anything (zeroes, old data).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Writes `len` zero bytes from `offset` (`len` may exceed [`crate::REQUEST_BYTES_MAX`]).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;
}

/// A failed volume operation; the variant picks the errno the client sees, the message is logged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IoError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space: {0}")]
    NoSpace(String),
    /// Includes reservation conflicts: NBD has no errno of its own for them.
    #[error("not permitted: {0}")]
    NotPermitted(String),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("out of memory: {0}")]
    NoMemory(String),
    /// The volume is going away on this node (lost its lease, node stopping).
    #[error("shutting down: {0}")]
    Shutdown(String),
}

impl IoError {
    /// The `NBD_E*` value sent in the reply.
    pub fn errno(&self) -> u32 {
        match self {
            IoError::Io(_) => errno::EIO,
            IoError::Invalid(_) => errno::EINVAL,
            IoError::NoSpace(_) => errno::ENOSPC,
            IoError::NotPermitted(_) => errno::EPERM,
            IoError::NotSupported(_) => errno::ENOTSUP,
            IoError::NoMemory(_) => errno::ENOMEM,
            IoError::Shutdown(_) => errno::ESHUTDOWN,
        }
    }
}

/// Why an export could not be opened. Both are answered with `NBD_REP_ERR_UNKNOWN` ("the
/// requested export is not available") and the message; they differ in how they are logged.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error("no such export: {0}")]
    NotFound(String),
    /// It exists but cannot be served here now (e.g. this node is not a path for it).
    #[error("export unavailable: {0}")]
    Unavailable(String),
}
