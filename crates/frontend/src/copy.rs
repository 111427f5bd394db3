//! Copy by reference as every protocol asks for it: a token made for ranges of a volume, "write
//! the data of token T here", and a copy between two volumes named by their identifiers (SCSI
//! EXTENDED COPY). The node serves them in metadata on every replica (docs/PROTOCOL.md, "Copy by
//! reference"); a protocol only translates its commands into these calls.

use std::time::Duration;

/// A token's value: SPC-4's ROD token size.
pub const TOKEN_BYTES: usize = 512;

/// A token made for ranges of a volume (POPULATE TOKEN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The opaque value the host hands back to write it ([`TOKEN_BYTES`] bytes).
    pub value: Vec<u8>,
    /// The bytes it stands for: the ranges, concatenated.
    pub bytes: u64,
    /// How long it lives at most, and how long it lives unused.
    pub lifetime: Duration,
    pub idle: Duration,
}

/// What a token maker may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRequest {
    /// How long the token may go unused; `None`: the volume's default.
    pub idle: Option<Duration>,
}

/// Why a token could not be used: SBC-4's INVALID TOKEN OPERATION reasons, as far as a host
/// can act on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFault {
    /// Not a value this cluster made (or altered on the way).
    Corrupt,
    /// Made here, but no longer known: it expired, was revoked or its source was deleted.
    Unknown,
    /// It has fewer bytes than asked for from the offset given.
    TooShort,
}

/// One end of a copy between volumes: the volume the command came to, or another volume of
/// the cluster by its NAA identifier (SCSI designator type 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyUnit {
    This,
    Naa(u64),
}

/// Limits of copy by reference a protocol advertises (SCSI VPD 0x8F). A token's ranges are
/// whole sectors; those that are whole store blocks (4 KiB) copy by reference, the rest are
/// streamed.
pub const TOKEN_GRANULARITY_BYTES: u64 = 512;
pub const TOKEN_IDLE_DEFAULT: Duration = Duration::from_secs(600);
pub const TOKEN_IDLE_MAX: Duration = Duration::from_secs(3600);
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
