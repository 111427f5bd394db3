//! Tandem's vocabulary: identifiers, limits and the names every other crate shares.
//!
//! This crate does no I/O and depends on nothing but `serde` and `thiserror`. It is the bottom
//! of the crate graph: if a name is needed by two crates, it lives here.

use std::fmt;
use std::str::FromStr;

pub mod chaos_bugs;
mod ids;

pub use ids::{Epoch, NodeId, Seq, VolumeId};

/// Upper bound on one network frame (header + payload). Raft snapshot chunks, replication
/// writes and bulk copies are all sized below it; a peer announcing a larger frame is
/// misbehaving and its connection is dropped before anything is allocated.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Raft snapshots are shipped in chunks of this size, well below `FRAME_BYTES_MAX`.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// The largest metadata snapshot (encoded) a node installs. A snapshot is the whole cluster
/// map; 10,000 volumes and 1,000 hosts with their path maps take about 12 MiB.
pub const SNAPSHOT_BYTES_MAX: usize = 1024 * 1024 * 1024;
/// What decoding a snapshot may allocate, at most: its decoded form takes more memory than
/// its encoding (maps, vectors), by a bounded factor.
pub const SNAPSHOT_DECODE_BYTES_MAX: usize = 8 * SNAPSHOT_BYTES_MAX;

/// The longest setting value accepted by the metadata store. Metadata is small by design;
/// bulk data goes through the data plane.
pub const SETTING_VALUE_BYTES_MAX: usize = 4096;

/// The longest name (site, setting key, later dataset/volume/host names).
pub const NAME_BYTES_MAX: usize = 128;

/// The unit of allocation, checksumming and replication bookkeeping. Volume sizes are
/// multiples of it; hosts may still read and write at any byte offset.
pub const BLOCK_BYTES: u64 = 4096;

/// The largest volume the store accepts (64 TiB): the block map of a volume this size still
/// fits the metadata budget of one node.
pub const VOLUME_BYTES_MAX: u64 = 64 << 40;

/// The logical channels of a peer link. Each has its own queue so that bulk traffic never sits
/// in front of Raft heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Channel {
    /// Raft RPCs and metadata forwarding.
    Control,
    /// Synchronous replication of host writes.
    Replication,
    /// Resync and copies: large, throughput-bound.
    Bulk,
    /// Liveness and latency probes.
    Probe,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Control, Channel::Replication, Channel::Bulk, Channel::Probe];

    pub fn as_u8(self) -> u8 {
        match self {
            Channel::Control => 0,
            Channel::Replication => 1,
            Channel::Bulk => 2,
            Channel::Probe => 3,
        }
    }

    pub fn from_u8(v: u8) -> Option<Channel> {
        Channel::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Control => "control",
            Channel::Replication => "replication",
            Channel::Bulk => "bulk",
            Channel::Probe => "probe",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The network layer under a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Tcp,
    Quic,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Quic => "quic",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<TransportKind, String> {
        match s {
            "tcp" => Ok(TransportKind::Tcp),
            "quic" => Ok(TransportKind::Quic),
            other => Err(format!("unknown transport {other:?}: expected tcp or quic")),
        }
    }
}

/// Which traffic a transport setting governs: Raft (`control`) or everything else (`data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Control,
    Data,
}

impl Layer {
    pub fn of(channel: Channel) -> Layer {
        match channel {
            Channel::Control => Layer::Control,
            Channel::Replication | Channel::Bulk | Channel::Probe => Layer::Data,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layer::Control => "control",
            Layer::Data => "data",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layer {
    type Err = String;
    fn from_str(s: &str) -> Result<Layer, String> {
        match s {
            "control" => Ok(Layer::Control),
            "data" => Ok(Layer::Data),
            other => Err(format!("unknown layer {other:?}: expected data or control")),
        }
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {NAME_BYTES_MAX} bytes")]
    TooLong,
    #[error("may contain only a-z, A-Z, 0-9, '-', '_' and '.', and must start with a letter or digit")]
    BadCharacter,
}

/// Ranges one copy (a token, an image) is made of at most: SCSI's POPULATE TOKEN names a few.
pub const COPY_RANGES_MAX: usize = 64;

/// The granule of a copy token's ranges: a 512-byte sector, the smallest block a host
/// addresses. An image is made of whole store blocks ([`BLOCK_BYTES`]): those that cover a
/// token's ranges ([`covering_blocks`]).
pub const TOKEN_GRANULE_BYTES: u64 = 512;

/// Checks the ranges of an image against a volume of `size_bytes`: 1 to [`COPY_RANGES_MAX`]
/// of them, each whole blocks, not empty, inside the volume. Returns their total length (the
/// ranges are concatenated).
pub fn copy_ranges_len(ranges: &[(u64, u64)], size_bytes: u64) -> Result<u64, String> {
    copy_ranges_len_in(ranges, size_bytes, BLOCK_BYTES)
}

/// The range of whole store blocks that covers `range`.
pub fn covering_blocks((offset, len): (u64, u64)) -> (u64, u64) {
    let start = offset / BLOCK_BYTES * BLOCK_BYTES;
    let end = (offset + len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    (start, end - start)
}

/// [`copy_ranges_len`] for ranges of whole `granule`-byte pieces (a token's: sectors).
pub fn copy_ranges_len_in(ranges: &[(u64, u64)], size_bytes: u64, granule: u64) -> Result<u64, String> {
    if ranges.is_empty() || ranges.len() > COPY_RANGES_MAX {
        return Err(format!("a copy is made of 1 to {COPY_RANGES_MAX} ranges, not {}", ranges.len()));
    }
    let mut total = 0u64;
    for &(offset, len) in ranges {
        if len == 0 || !offset.is_multiple_of(granule) || !len.is_multiple_of(granule) {
            return Err(format!("range {offset}+{len}: a copy's ranges are whole {granule}-byte blocks, not empty"));
        }
        if offset.checked_add(len).is_none_or(|end| end > size_bytes) {
            return Err(format!("range {offset}+{len} is outside the volume of {size_bytes} bytes"));
        }
        total += len;
    }
    Ok(total)
}

/// Validates a user-chosen name (site, setting key, and later dataset, volume and host names).
/// Names end up in file paths, URLs and NBD export names, so the alphabet is kept small.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong);
    }
    let mut chars = name.chars();
    let first = chars.next().ok_or(NameError::Empty)?;
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadCharacter);
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

/// The DNS name carried by a node's certificate. Peers check it on both sides of every
/// connection, so a certificate issued for node 2 cannot be used to speak as node 3.
pub fn node_cert_name(id: NodeId) -> String {
    format!("node-{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_numbers_round_trip() {
        for c in Channel::ALL {
            assert_eq!(Channel::from_u8(c.as_u8()), Some(c));
        }
        assert_eq!(Channel::from_u8(4), None);
    }

    #[test]
    fn layers_and_transport_kinds_parse_their_names() {
        for kind in [TransportKind::Tcp, TransportKind::Quic] {
            assert_eq!(kind.name().parse::<TransportKind>(), Ok(kind));
        }
        for layer in [Layer::Control, Layer::Data] {
            assert_eq!(layer.name().parse::<Layer>(), Ok(layer));
        }
        assert!("udp".parse::<TransportKind>().is_err());
        assert_eq!(Layer::of(Channel::Control), Layer::Control);
        assert!(Channel::ALL[1..].iter().all(|c| Layer::of(*c) == Layer::Data));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("site-a").is_ok());
        assert!(validate_name("vol_1.x").is_ok());
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("-x"), Err(NameError::BadCharacter));
        assert_eq!(validate_name("a/b"), Err(NameError::BadCharacter));
        assert_eq!(validate_name(&"a".repeat(NAME_BYTES_MAX + 1)), Err(NameError::TooLong));
    }
}
