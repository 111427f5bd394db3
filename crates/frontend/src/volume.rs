//! What a protocol server needs from the storage behind it: a set of named exports, each a
//! volume of bytes with the block operations every host protocol has (read, write with FUA,
//! write zeroes, unmap, flush).
//!
//! Who opens: [`Exports::list`] and [`Exports::open`] take the [`Peer`], what the protocol
//! learned of the client (its verified TLS certificate, its iSCSI initiator name). The node maps
//! it to a host and decides, once for every protocol, which volumes it may see and open (LUN
//! masking); a volume opened for a host ends its connection ([`Volume::revoked`]) when the
//! host loses access to it.
//!
//! Persistent reservations: the [`Volume`] of an opener is one I_T nexus (its initiator port
//! and target port, [`Volume::nexus`]); the backend checks every request against the
//! reservations and fails those they exclude with [`IoError::ReservationConflict`]; the
//! commands (register, reserve, release, preempt, clear, move) are [`Volume::reserve`], the
//! state [`Volume::reservations`], and what they raise for this nexus
//! [`Volume::take_attentions`].
//!
//! Copy by reference ([`crate::copy`]): [`Volume::populate_token`] makes a token for ranges of
//! this volume, [`Volume::write_using_token`] writes a token's data here, and
//! [`Volume::copy_between`] copies between two volumes named by their identifiers; the node
//! serves all three in metadata on every replica, with the opener's access checked on both
//! volumes.
//!
//! Each protocol translates its commands into these calls; the protocol's own codes (NBD
//! errnos, SCSI sense) are chosen from the [`IoError`] kind inside the protocol's crate.

use std::future::Future;

use bytes::Bytes;

use crate::copy::{CopyUnit, Token, TokenRequest};

use tandem_reservations::{Attention, Nexus, Op, Outcome, Refusal, Reservations};

use crate::error::{IoError, OpenError};

/// Who is at the other end of a host connection, as far as its protocol has proven it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client certificate (DER) the TLS handshake verified against the cluster's CA, if
    /// the client presented one.
    pub certificate: Option<Vec<u8>>,
    /// The iSCSI initiator name of the session (authenticated by CHAP when the host has a
    /// secret).
    pub initiator: Option<String>,
    /// The session's initiator port (iSCSI: `name,i,0x<ISID>`), the I_T nexus's initiator
    /// side for reservations; `None` for protocols without one (NBD: the host is the nexus).
    pub initiator_port: Option<String>,
    /// The relative target port the connection came in through (0 for protocols without
    /// SCSI target ports).
    pub target_port: u16,
}

impl Peer {
    /// A client that proved nothing (plaintext NBD, or TLS without a certificate).
    pub fn anonymous() -> Peer {
        Peer::default()
    }
}

/// The exports a server offers. Shared by every connection.
pub trait Exports: Send + Sync + 'static {
    type Volume: Volume;

    /// The export names `peer` may see, for protocols that list them (`NBD_OPT_LIST`, iSCSI
    /// discovery). A protocol skips names it cannot carry.
    fn list(&self, peer: &Peer) -> Vec<String>;

    /// Opens the export `name` for `peer`, for one connection (and briefly for queries such as
    /// `NBD_OPT_INFO`). The server keeps the volume in an `Arc` for the connection's lifetime
    /// and shares it with the tasks that serve its requests. A peer that may not open it gets
    /// [`OpenError::Denied`] (or, for a name it may not even see, [`OpenError::NotFound`]).
    fn open(&self, name: &str, peer: &Peer) -> impl Future<Output = Result<Self::Volume, OpenError>> + Send;

    /// Whether clients may, or must, prove who they are (NBD: whether TLS is not offered,
    /// offered, or required, when the server has a TLS configuration at all). Asked once per
    /// connection, at its start.
    fn identification(&self) -> Identification {
        Identification::Optional
    }
}

/// How much a server asks of its clients' identities, as [`Exports::identification`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identification {
    /// Clients cannot prove who they are (NBD offers no TLS): all are anonymous.
    Off,
    /// Clients may prove who they are; those that do not are anonymous.
    Optional,
    /// Clients must prove who they are before anything else (NBD answers every option but
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` with `NBD_REP_ERR_TLS_REQD` until it is TLS).
    Required,
}

/// One export's bytes. Offsets and lengths the server passes are already checked against
/// [`Volume::size_bytes`] and the protocol's largest request; calls for one connection may
/// run concurrently (up to a limit the server sets).
///
/// A request's future may be dropped before it completes when the connection is torn down
/// (server shutdown, or the client went away); implementations must leave the volume
/// consistent when that happens (a write that was never acknowledged may or may not have
/// happened, as on a power cut).
pub trait Volume: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;

    fn read_only(&self) -> bool {
        false
    }

    /// Whether several connections may share the export (NBD's `NBD_FLAG_CAN_MULTI_CONN`, and
    /// what several iSCSI sessions assume): a flush or FUA write acknowledged on one
    /// connection must be visible on every other.
    fn multi_conn(&self) -> bool;

    /// Fills `buf` from `offset`. Large reads arrive as several calls, each of at most the
    /// server's read chunk, so the buffer a read takes does not grow with its length.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Writes `data` at `offset`; with `fua`, the data is durable when the future completes.
    /// `data` is `Bytes` (not `&[u8]`) so a replicated backend can hand the same buffer to
    /// several replicas and tasks without copying it.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Writes `len` zero bytes from `offset` (`len` may exceed the largest write request); with
    /// `fua`, they are durable when the future completes.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Hints that `len` bytes from `offset` are no longer needed (NBD TRIM, SCSI UNMAP); reading
    /// them afterwards may return anything (zeroes, old data).
    fn unmap(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Completes, with the reason, when the opener may no longer use this volume (its host was
    /// disconnected from it or removed, the access policy changed): the server then ends the
    /// connection. Never, by default.
    fn revoked(&self) -> impl Future<Output = String> + Send {
        std::future::pending()
    }

    /// The I_T nexus this volume was opened as, for reservations; `None` if it keeps none.
    fn nexus(&self) -> Option<Nexus> {
        None
    }

    /// The volume's persistent reservations, as committed (PERSISTENT RESERVE IN).
    fn reservations(&self) -> impl Future<Output = Result<Reservations, IoError>> + Send {
        async { Err(IoError::NotSupported("this volume keeps no reservations".into())) }
    }

    /// A reservation command made through this opener's nexus (PERSISTENT RESERVE OUT, and
    /// the range commands). `Ok(Err(_))`: the reservations refused it and nothing changed.
    fn reserve(&self, op: Op) -> impl Future<Output = Result<Result<Outcome, Refusal>, IoError>> + Send {
        let _ = op;
        async { Err(IoError::NotSupported("this volume keeps no reservations".into())) }
    }

    /// The unit attentions reservation commands raised for this opener's nexus since it last
    /// asked, oldest first. Asked before every command, so it must be cheap when nothing
    /// changed. None, by default.
    fn take_attentions(&self) -> Vec<Attention> {
        Vec::new()
    }

    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;

    /// Compares the `expected.len()` bytes at `offset` with `expected` and, only if they are
    /// equal, writes `data` (as long) there, atomically against every other write to the range
    /// on every path (SCSI COMPARE AND WRITE, which VMware's locking relies on). `Ok(None)`: it
    /// matched and `data` is written (durable with `fua`); `Ok(Some(i))`: byte `i` differs and
    /// nothing was written. A volume that cannot make it atomic answers
    /// [`IoError::NotSupported`], and the command is refused as not implemented.
    fn compare_and_write(
        &self,
        offset: u64,
        expected: Bytes,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<Option<u64>, IoError>> + Send {
        let _ = (offset, expected, data, fua);
        async { Err(IoError::NotSupported("compare and write is not atomic on this volume".into())) }
    }

    /// Makes a token standing for `ranges` (offset, length; concatenated in that order) of this
    /// volume as they are now: later writes do not change what it copies. The opener must be
    /// allowed to read the volume.
    fn populate_token(
        &self,
        ranges: Vec<(u64, u64)>,
        request: TokenRequest,
    ) -> impl Future<Output = Result<Token, IoError>> + Send {
        let _ = (ranges, request);
        async { Err(IoError::NotSupported("this volume makes no copy tokens".into())) }
    }

    /// Writes the token's data, from byte `token_offset` of it onward, over `ranges` (offset,
    /// length) of this volume in order. Nothing is written for a token that cannot be used
    /// ([`IoError::Token`]); otherwise ranges are written in order, each whole, and the error
    /// of the first that failed is returned with the bytes written before it.
    fn write_using_token(
        &self,
        token: Bytes,
        token_offset: u64,
        ranges: Vec<(u64, u64)>,
    ) -> impl Future<Output = Result<u64, (u64, IoError)>> + Send {
        let _ = (token, token_offset, ranges);
        async { Err((0, IoError::NotSupported("this volume takes no copy tokens".into()))) }
    }

    /// Copies `len` bytes from `source_offset` of `source` to `destination_offset` of
    /// `destination` (SCSI EXTENDED COPY, where this volume is the copy manager): by
    /// reference where the replicas allow, streamed otherwise. The opener must be allowed to
    /// read the source and write the destination.
    fn copy_between(
        &self,
        source: CopyUnit,
        source_offset: u64,
        destination: CopyUnit,
        destination_offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), IoError>> + Send {
        let _ = (source, source_offset, destination, destination_offset, len);
        async { Err(IoError::NotSupported("this volume copies nothing by reference".into())) }
    }

    /// Which parts of `len` bytes from `offset` hold data (thin provisioning a host can see:
    /// NBD's `base:allocation`, SCSI GET LBA STATUS): consecutive [`Extent`]s from `offset`, at
    /// least one when `len > 0` and at most `max` (at least 1), so they may end before
    /// `offset + len`, never after it. An unallocated extent reads as zeroes. As of a moment
    /// after every write completed before the call. A volume that cannot tell answers
    /// [`IoError::NotSupported`] (a protocol then reports the range as allocated).
    fn extents(&self, offset: u64, len: u64, max: usize) -> impl Future<Output = Result<Vec<Extent>, IoError>> + Send {
        let _ = (offset, len, max);
        async { Err(IoError::NotSupported("this volume keeps no allocation map".into())) }
    }
}

/// A piece of a volume's range, as [`Volume::extents`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Holds data; else it reads as zeroes and takes no space.
    pub allocated: bool,
}
