//! The data plane's messages: replication between a volume's primary and its backups, resync
//! and reconciliation, and host I/O proxied from a node that is not the primary.
//!
//! Which channel carries what (see docs/PROTOCOL.md for the sequences):
//! - `replication`: [`Record`]s from primary to backup, through the descriptor ring (a one-sided
//!   write into the backup's region for that primary); [`DataMsg::Open`], [`DataMsg::Acks`],
//!   [`DataMsg::Nack`] as ordinary requests.
//! - `bulk`: [`DataMsg::Checksums`] and [`DataMsg::Chunk`] of resync and reconciliation, and
//!   host I/O proxied to the primary.

use serde::{Deserialize, Serialize};
use tandem_reservations::{Nexus, Op, Outcome, Refusal};
use tandem_types::{Epoch, NodeId, Seq, VolumeId};

use crate::codec::{decode, encode, CodecError};

/// What a replicated write does to its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteKind {
    /// The record's payload is the new data.
    Data,
    /// The range reads as zeros afterwards (NBD WRITE_ZEROES and TRIM).
    Zeroes,
    /// The range comes to share the blocks of `image` from `image_offset` on (a copy by
    /// reference, `BlockStore::clone_range`; docs/PROTOCOL.md, "Copy by reference"). Every
    /// replica the record is sent to must hold the image; one that does not refuses the record.
    Clone { image: VolumeId, image_offset: u64 },
}

impl WriteKind {
    /// Whether the record carries the written bytes.
    pub fn carries_data(self) -> bool {
        self == WriteKind::Data
    }
}

/// The header of one replicated write. On the wire a record is this header (encoded by
/// [`encode_record`]) followed by the data bytes, written into the backup's region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordHeader {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub seq: Seq,
    pub kind: WriteKind,
    pub offset: u64,
    pub len: u64,
    /// crc32c of the data (0 for [`WriteKind::Zeroes`]); checked by the backup before it
    /// applies anything.
    pub crc: u32,
    /// The host request this record is a piece of ([`WriteId`]): a member notes it once
    /// applied, so that if it becomes primary it recognizes a retry of the same request.
    pub write: WriteId,
}

/// The identity of one host write request, chosen by the node the host sent it to and kept
/// across every retry of it, proxied or re-routed to a new primary (a nonce; 0: none). A
/// primary that holds a piece of it already (applied here as a member before a failover, or
/// sequenced by itself) does not execute the piece again: a retry whose earlier attempt took
/// effect must not land a second time, after writes acknowledged since (docs/PROTOCOL.md,
/// "Retries of a write that may have taken effect").
pub type WriteId = u64;

/// A record's header is at most this long; its length prefix is refused above it.
pub const RECORD_HEADER_BYTES_MAX: usize = 128;

/// Lays out a record: `u16 header length | header | data`.
pub fn encode_record(header: &RecordHeader, data: &[u8]) -> Result<Vec<u8>, CodecError> {
    let h = encode(header)?;
    if h.len() > RECORD_HEADER_BYTES_MAX {
        return Err(CodecError::Encode(format!("record header of {} bytes", h.len())));
    }
    let mut out = Vec::with_capacity(2 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u16).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    Ok(out)
}

/// Splits a record into its header and data, checking that the data length matches.
pub fn decode_record(bytes: &[u8]) -> Result<(RecordHeader, &[u8]), CodecError> {
    if bytes.len() < 2 {
        return Err(CodecError::Decode("record shorter than its length prefix".into()));
    }
    let hlen = u16::from_be_bytes([bytes[0], bytes[1]]) as usize;
    if hlen > RECORD_HEADER_BYTES_MAX || bytes.len() < 2 + hlen {
        return Err(CodecError::Decode(format!("record header length {hlen} is bad")));
    }
    let header: RecordHeader = decode(&bytes[2..2 + hlen])?;
    let data = &bytes[2 + hlen..];
    let expect = if header.kind.carries_data() { header.len } else { 0 };
    if data.len() as u64 != expect {
        return Err(CodecError::Decode(format!("record carries {} data bytes, header says {expect}", data.len())));
    }
    Ok((header, data))
}

/// Requests between nodes about volumes. Every variant names its volume and, where it matters,
/// the sender's epoch: a receiver that knows a newer epoch refuses the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataMsg {
    /// Primary → replica: from now on accept records of `epoch` from me, the first with a
    /// sequence number of at least `start_seq`. The reply is [`DataReply::Opened`].
    Open {
        volume: VolumeId,
        epoch: Epoch,
        primary: NodeId,
        start_seq: Seq,
    },
    /// Backup → primary: these records are durable here.
    Acks {
        volume: VolumeId,
        epoch: Epoch,
        seqs: Vec<Seq>,
    },
    /// Backup → primary: this record was refused, and will not be applied.
    Nack {
        volume: VolumeId,
        epoch: Epoch,
        seq: Seq,
        reason: String,
    },
    /// Primary → replica (bulk): the per-block checksums of a block-aligned range.
    Checksums {
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        len: u64,
    },
    /// Primary → replica (bulk): overwrite a block-aligned range with the primary's data, and
    /// make it durable before answering.
    Chunk {
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        data: Vec<u8>,
    },
    /// Primary → member: you are level with me and back in the ISR; from now on your log of
    /// recent writes is complete (reconciliation may trust it).
    Level {
        volume: VolumeId,
        epoch: Epoch,
    },
    /// Any node → primary: host I/O arriving at a node that does not serve the volume. Each
    /// proxied request names the host it runs for (`requester`), and the primary checks that
    /// host may use the volume before it executes (`None`: the proxying node's own request).
    ProxyRead {
        volume: VolumeId,
        offset: u64,
        len: u64,
        requester: Option<Requester>,
    },
    ProxyWrite {
        volume: VolumeId,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
        write: WriteId,
        requester: Option<Requester>,
    },
    ProxyZeroes {
        volume: VolumeId,
        offset: u64,
        len: u64,
        fua: bool,
        write: WriteId,
        requester: Option<Requester>,
    },
    ProxyFlush {
        volume: VolumeId,
        requester: Option<Requester>,
    },
    /// Any node → primary: SCSI COMPARE AND WRITE: write `data` at `offset` only if the range
    /// holds `expected` (as long), atomically against every other write. `write` identifies the
    /// request in every attempt, so a retry after a failover is not compared again against its
    /// own effect.
    ProxyCompareAndWrite {
        volume: VolumeId,
        offset: u64,
        expected: Vec<u8>,
        data: Vec<u8>,
        write: WriteId,
        requester: Option<Requester>,
    },
    /// Any node → primary: make `image`, a frozen copy by reference of `ranges` of the volume
    /// (block-aligned, concatenated), on the primary and every in-sync member, ordered with the
    /// writes. The reply is [`DataReply::Image`] with the nodes that hold it.
    MakeImage {
        volume: VolumeId,
        image: VolumeId,
        ranges: Vec<(u64, u64)>,
        requester: Option<Requester>,
    },
    /// Primary → in-sync member (bulk): make `image` from `ranges` of your copy, which is level
    /// with the primary's (no write is in flight), and make it durable before answering `Ok`.
    Image {
        volume: VolumeId,
        epoch: Epoch,
        image: VolumeId,
        ranges: Vec<(u64, u64)>,
    },
    /// Any node → a holder of `image` (bulk): its bytes (at most a proxied message's worth).
    ReadImage {
        image: VolumeId,
        offset: u64,
        len: u64,
    },
    /// Any node → primary of `volume`: write `len` bytes of `image` from `image_offset` at
    /// `offset`, by reference where every in-sync replica holds the image, streamed from one
    /// of `holders` otherwise. The reply is [`DataReply::Copied`].
    ProxyCopy {
        volume: VolumeId,
        offset: u64,
        image: VolumeId,
        image_offset: u64,
        len: u64,
        holders: Vec<NodeId>,
        write: WriteId,
        requester: Option<Requester>,
    },
    /// Any node → primary: a persistent-reservation command made through `requester`'s nexus.
    /// The primary orders it with the volume's writes and commits it in its epoch. `id` is the
    /// same in every attempt, so a retry is not applied twice.
    ProxyReserve {
        volume: VolumeId,
        requester: Requester,
        id: u64,
        op: Op,
    },
    /// Any node → primary: which parts of `len` bytes from `offset` hold data (NBD block
    /// status), at most `max` extents ([`EXTENTS_MAX`]). Answered by the primary, which
    /// sequences the writes, so the map agrees with every acknowledged write. The reply is
    /// [`DataReply::Extents`].
    ProxyExtents {
        volume: VolumeId,
        offset: u64,
        len: u64,
        max: u32,
        requester: Option<Requester>,
    },
}

/// The most extents one [`DataMsg::ProxyExtents`] asks for and one [`DataReply::Extents`]
/// carries (about 10 KiB encoded, far below a frame).
pub const EXTENTS_MAX: u32 = 1024;

/// On whose behalf a host request runs: the host (known by its certificate or initiator name at
/// the node it connected to), or nobody for a client that did not identify; and the I_T nexus
/// reservations know the requester by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Requester {
    pub host: Option<String>,
    /// The I_T nexus: its initiator port, and the relative target port the request came in
    /// through.
    pub nexus: Nexus,
}

impl Requester {
    /// The initiator port name of every anonymous client: no registration can be made for it.
    pub const ANONYMOUS: &'static str = "anonymous";

    /// A host on Tandem's own paths (NBD), one nexus through every node.
    pub fn host(name: &str) -> Requester {
        Requester { host: Some(name.to_string()), nexus: Nexus::host(name) }
    }

    /// A client that proved no identity.
    pub fn anonymous() -> Requester {
        Requester { host: None, nexus: Nexus::new(Requester::ANONYMOUS, Nexus::NATIVE_PORT) }
    }
}

impl DataMsg {
    /// The host a proxied request runs for, if it is one that names it.
    pub fn requester(&self) -> Option<(VolumeId, &Requester)> {
        match self {
            DataMsg::ProxyRead { volume, requester, .. }
            | DataMsg::ProxyWrite { volume, requester, .. }
            | DataMsg::ProxyZeroes { volume, requester, .. }
            | DataMsg::ProxyFlush { volume, requester }
            | DataMsg::ProxyCompareAndWrite { volume, requester, .. }
            | DataMsg::ProxyCopy { volume, requester, .. }
            | DataMsg::MakeImage { volume, requester, .. }
            | DataMsg::ProxyExtents { volume, requester, .. } => requester.as_ref().map(|r| (*volume, r)),
            DataMsg::ProxyReserve { volume, requester, .. } => Some((*volume, requester)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataReply {
    Ok,
    /// The replica's recent writes, as block-aligned ranges, for reconciliation; `None` when it
    /// cannot tell (it restarted since it last opened), so every block must be compared.
    Opened {
        recent: Option<Vec<(u64, u64)>>,
    },
    Checksums(Vec<u32>),
    Data(Vec<u8>),
    /// Refused: a newer epoch, not the primary, no such volume, bad range. The text says which.
    Refused(String),
    /// The I/O failed on the serving node; the text says why.
    Failed(String),
    /// A compare and write found byte `at` (from the start of the range) different and wrote
    /// nothing.
    Miscompare {
        at: u64,
    },
    /// The primary refused a proxied request: its host may not use the volume (LUN masking).
    Denied(String),
    /// A reservation excludes the request (it was not executed).
    Conflict(String),
    /// What a proxied reservation command did, or why the reservations refused it.
    Reservation(Result<Outcome, Refusal>),
    /// An image was made; these nodes hold it (the primary first).
    Image {
        holders: Vec<NodeId>,
    },
    /// A copy was made: by reference (a clone record on every in-sync replica), or streamed.
    Copied {
        by_reference: bool,
    },
    /// The allocation map of a range, from its start: `(len, allocated)` per extent, at most
    /// [`EXTENTS_MAX`] of them (the receiver checks them against what it asked).
    Extents(Vec<(u64, bool)>),
}

/// Requests on the `probe` channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeMsg {
    /// Node → Raft leader: "I am alive; confirm you still lead." A granted request renews the
    /// sender's lease, and tells the leader's failure detector the sender is alive.
    LeaseRequest,
    /// Round-trip measurement; answered at once.
    Ping,
    /// Any node → Raft leader: probe results a host's agent reported (`POST
    /// /v1/hosts/{name}/probes`). The leader's path manager keeps them; they are not committed.
    HostProbes { host: String, probes: Vec<PathProbe> },
    /// Any node → every other node: a logical unit reset of iSCSI target `target` came in
    /// through the sender's portal; sessions of it through the receiver's portal must hear of
    /// it (unit attention). Answered `Accepted` once they will.
    LunReset { target: String },
}

/// One probe of one path (a node's target port) by a host's agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathProbe {
    pub node: NodeId,
    pub address: std::net::SocketAddr,
    /// The round trip, when the probe succeeded.
    pub rtt_us: Option<u64>,
    /// The target refused the connection (nothing listens there: the node is gone).
    pub refused: bool,
    /// Why the probe failed (empty when it succeeded).
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeReply {
    /// This node is not the leader (it names the leader it knows, if any).
    NotLeader(Option<NodeId>),
    Pong,
    /// The leader took the probe results.
    Accepted,
    /// The probe results were refused (unknown host, or too many at once).
    Refused(String),
    /// A lease, granted after the leader confirmed its leadership at this commit index: it
    /// counts only once the node has applied the log up to `index` (so a node never holds a
    /// lease while its map lags a committed failover).
    GrantedAt {
        index: u64,
    },
}

impl ProbeMsg {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<ProbeMsg, CodecError> {
        decode(bytes)
    }
}

impl ProbeReply {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<ProbeReply, CodecError> {
        decode(bytes)
    }
}

impl DataMsg {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<DataMsg, CodecError> {
        decode(bytes)
    }
}

impl DataReply {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<DataReply, CodecError> {
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_round_trip() {
        let h = RecordHeader {
            volume: VolumeId(7),
            epoch: Epoch(3),
            seq: Seq(99),
            kind: WriteKind::Data,
            offset: 4096,
            len: 5,
            crc: 1,
            write: u64::MAX,
        };
        let bytes = encode_record(&h, b"hello").expect("encodes");
        let (back, data) = decode_record(&bytes).expect("decodes");
        assert_eq!(back, h);
        assert_eq!(data, b"hello");
        let z = RecordHeader { kind: WriteKind::Zeroes, len: 1 << 20, crc: 0, ..h.clone() };
        let bytes = encode_record(&z, b"").expect("encodes");
        assert_eq!(decode_record(&bytes).expect("decodes").0, z);
        // A clone record carries no data, and its largest header fits the bound.
        let kind = WriteKind::Clone { image: VolumeId(u64::MAX), image_offset: u64::MAX };
        let c = RecordHeader { kind, len: u64::MAX, crc: u32::MAX, seq: Seq(u64::MAX), epoch: Epoch(u64::MAX), ..h };
        let bytes = encode_record(&c, b"").expect("encodes");
        assert_eq!(decode_record(&bytes).expect("decodes").0, c);
        assert!(decode_record(&encode_record(&c, b"x").expect("encodes")).is_err(), "a clone record with data");
    }

    #[test]
    fn a_record_whose_data_does_not_match_its_header_is_refused() {
        let h = RecordHeader {
            volume: VolumeId(1),
            epoch: Epoch(1),
            seq: Seq(1),
            kind: WriteKind::Data,
            offset: 0,
            len: 10,
            crc: 0,
            write: 0,
        };
        let bytes = encode_record(&h, b"short").expect("encodes");
        assert!(decode_record(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn garbage_records_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_record(&bytes);
            let _ = DataMsg::decode(&bytes);
            let _ = DataReply::decode(&bytes);
            let _ = ProbeMsg::decode(&bytes);
            let _ = ProbeReply::decode(&bytes);
        }
    }

    fn requester() -> impl Strategy<Value = Option<Requester>> {
        prop_oneof![
            Just(None),
            "[a-z]{1,12}".prop_map(|h| Some(Requester::host(&h))),
            Just(Some(Requester::anonymous()))
        ]
    }

    proptest! {
        /// Block status, proxied to the primary: the request and its map survive the trip, and
        /// a map cut short anywhere is an error, never a shorter map.
        #[test]
        fn extents_round_trip(volume in any::<u64>(), offset in any::<u64>(), len in any::<u64>(), max in any::<u32>(),
                              requester in requester(),
                              map in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..EXTENTS_MAX as usize)) {
            let msg = DataMsg::ProxyExtents { volume: VolumeId(volume), offset, len, max, requester: requester.clone() };
            prop_assert_eq!(DataMsg::decode(&msg.encode().expect("encodes")).expect("decodes"), msg.clone());
            prop_assert_eq!(msg.requester(), requester.as_ref().map(|r| (VolumeId(volume), r)));
            let reply = DataReply::Extents(map);
            let bytes = reply.encode().expect("encodes");
            prop_assert_eq!(DataReply::decode(&bytes).expect("decodes"), reply);
            for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
                prop_assert!(DataReply::decode(&bytes[..cut]).is_err());
            }
        }
    }

    /// The largest map a primary sends is far below a frame, and a map whose count claims more
    /// than its bytes hold is refused without reserving room for the claim.
    #[test]
    fn extent_maps_are_bounded() {
        let full = DataReply::Extents(vec![(u64::MAX, true); EXTENTS_MAX as usize]);
        let bytes = full.encode().expect("encodes");
        assert!(bytes.len() < 16 * 1024, "{} bytes", bytes.len());
        // The variant's tag, then a varint count of u64::MAX (0xfd: 8-byte varint follows).
        let mut huge = bytes[..1].to_vec();
        huge.push(0xfd);
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0u8; 9]);
        assert!(DataReply::decode(&huge).is_err());
    }

    #[test]
    fn host_probe_reports_round_trip() {
        let msg = ProbeMsg::HostProbes {
            host: "esx1".into(),
            probes: vec![
                PathProbe {
                    node: NodeId(2),
                    address: "127.0.0.1:10809".parse().expect("addr"),
                    rtt_us: Some(210),
                    refused: false,
                    error: String::new(),
                },
                PathProbe {
                    node: NodeId(3),
                    address: "[::1]:10810".parse().expect("addr"),
                    rtt_us: None,
                    refused: true,
                    error: "connection refused".into(),
                },
            ],
        };
        let bytes = msg.encode().expect("encodes");
        assert_eq!(ProbeMsg::decode(&bytes).expect("decodes"), msg);
        for reply in [ProbeReply::Accepted, ProbeReply::Refused("no host named \"x\"".into())] {
            assert_eq!(ProbeReply::decode(&reply.encode().expect("encodes")).expect("decodes"), reply);
        }
        // A report cut short is an error, not a panic or a partial report.
        assert!(ProbeMsg::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
