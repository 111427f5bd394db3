//! The commands proposed through Raft and the replies their application gives: the map's whole
//! input and output vocabulary.

use serde::{Deserialize, Serialize};
use tandem_paths::VolumePaths;
use tandem_types::{Epoch, Layer, NodeId, TransportKind, VolumeId};

use tandem_reservations::{Nexus, Op, Outcome, Refusal};

use crate::access::{HostCredential, SealedChap};
use crate::{NodeRecord, TokenRecord};

/// A command proposed through Raft. Commands carry complete values (never "increment"), so
/// re-applying a command that a client retried after a lost reply leaves the same state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCmd {
    /// Adds a node's record, or replaces it (new addresses, new site).
    RegisterNode(NodeRecord),
    /// Drops a node's record; refused while a dataset or volume lists the node as a replica.
    RemoveNode {
        id: NodeId,
    },
    /// A cluster-wide setting: small, named, free-form text.
    PutSetting {
        key: String,
        value: String,
    },
    DeleteSetting {
        key: String,
    },
    /// Selects the network layer (QUIC or TCP) that node-to-node traffic of `layer` uses.
    SetTransport {
        layer: Layer,
        kind: TransportKind,
    },
    /// Creates a dataset on `replicas` nodes (`None`: every node), placed by
    /// [`ClusterMap::place`](crate::ClusterMap::place). Repeating it with the same parameters changes nothing.
    CreateDataset {
        name: String,
        replicas: Option<u32>,
        preferred_site: Option<String>,
    },
    /// Deletes an empty dataset.
    DeleteDataset {
        name: String,
    },
    /// Creates a volume in `dataset` (`None`: [`DEFAULT_DATASET`](crate::DEFAULT_DATASET), created on first use).
    /// Repeating it with the same parameters changes nothing and allocates no id.
    CreateVolume {
        name: String,
        dataset: Option<String>,
        size_bytes: u64,
    },
    DeleteVolume {
        name: String,
    },
    /// Compare-and-set of a volume's ISR by its primary (shrink when a backup fails, grow when
    /// one is level again): refused unless `epoch` is the volume's current epoch and
    /// `isr_version` its current ISR version (a retry of the change that made the current
    /// version is answered "unchanged"). The new ISR must contain the primary and lie within
    /// the replicas; nodes entering it lose their resync entries.
    SetVolumeIsr {
        volume: VolumeId,
        epoch: Epoch,
        isr_version: u64,
        isr: Vec<NodeId>,
    },
    /// A new primary for a volume whose primary was lost, chosen by the leader from the last
    /// committed ISR (invariant I4): refused unless `epoch` is the current epoch, `primary` is
    /// in the current ISR and `isr` is a subset of it containing `primary`. Bumps the epoch.
    Failover {
        volume: VolumeId,
        epoch: Epoch,
        primary: NodeId,
        isr: Vec<NodeId>,
    },
    /// Records the progress of a replica's resync (the replica must be outside the ISR).
    SetResyncProgress {
        volume: VolumeId,
        node: NodeId,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// Forgets a replica's resync progress (resync abandoned, or finished without an ISR change).
    ClearResync {
        volume: VolumeId,
        node: NodeId,
    },
    /// Adds a host, or moves it to another site.
    AddHost {
        name: String,
        site: String,
        /// The host's iSCSI initiator names; empty leaves them as they are.
        iqns: Vec<String>,
    },
    RemoveHost {
        name: String,
    },
    /// Lets `host` reach `volume` (a volume name).
    ConnectHost {
        host: String,
        volume: String,
    },
    DisconnectHost {
        host: String,
        volume: String,
    },
    /// The Raft leader publishes a host's new path map: refused unless `generation` is the
    /// host's current generation + 1, so two leaders racing cannot both publish a generation.
    PublishPaths {
        host: String,
        generation: u64,
        paths: Vec<VolumePaths>,
    },
    /// The primary claims its epoch before it serves, with a value new to this start of its
    /// primary (a nonce): refused unless `epoch` and `primary` are the volume's. An unclaimed
    /// epoch becomes the claimant's; a claim repeated with the same nonce changes nothing; an
    /// epoch claimed by another nonce (an earlier start of this primary, in this process or a
    /// previous one, whose ISR changes may still commit late) is replaced by the next epoch,
    /// claimed by this nonce, with the same primary and ISR.
    ClaimPrimary {
        volume: VolumeId,
        epoch: Epoch,
        primary: NodeId,
        nonce: u64,
    },
    /// Several commands in one log entry, applied in order. The leader batches concurrent
    /// client writes this way: openraft 0.9 flushes each entry before it takes the next, so
    /// one entry per write would cost one disk flush per write.
    Batch(Vec<MetaCmd>),
    /// Compare-and-set of a setting: sets `value` only if the setting holds `expect` now
    /// (`None`: the setting does not exist), else refused with [`MetaReply::Conflict`] naming
    /// what it holds. (Declared last: bincode numbers variants in order, and logs already
    /// written hold the earlier ones.)
    CasSetting {
        key: String,
        expect: Option<String>,
        value: String,
    },
    /// Records a host's newly issued credential (its certificate's fingerprint and its token's
    /// id), replacing the one before: the old certificate and token stop working.
    SetHostCredential {
        host: String,
        credential: HostCredential,
    },
    /// Sets (or with `None` removes) a host's CHAP settings, secrets sealed.
    SetHostChap {
        host: String,
        chap: Option<SealedChap>,
    },
    /// A persistent-reservation command made through `nexus`, proposed by the volume's primary
    /// in `epoch`: refused ([`MetaReply::Conflict`]) unless `epoch` is the volume's, so a
    /// deposed primary's command never applies after its successor began to enforce the state.
    /// `id` is the same in every attempt of one command: a retry is answered with the first
    /// attempt's result ([`Reservations::apply_once`](tandem_reservations::Reservations::apply_once)).
    Reserve {
        volume: VolumeId,
        epoch: Epoch,
        id: u64,
        nexus: Nexus,
        op: Op,
    },
    /// Records a copy token for `ranges` of `volume`, pending until its image is made
    /// ([`MetaCmd::TokenReady`]); its id (its image's store id) is allocated from the volume
    /// ids. `nonce` is random, chosen by the proposing node: a retry with the same nonce gets
    /// the same token. Times are carried, not read: `now_ms` is the proposer's clock.
    CreateToken {
        volume: VolumeId,
        ranges: Vec<(u64, u64)>,
        host: Option<String>,
        nonce: u128,
        now_ms: u64,
        lifetime_ms: u64,
        idle_ms: u64,
    },
    /// The token's image is made and held by `holders`.
    TokenReady {
        id: VolumeId,
        holders: Vec<NodeId>,
    },
    /// The token was used at `now_ms` (its inactivity timeout starts again); refused if it
    /// cannot be used then.
    TouchToken {
        id: VolumeId,
        now_ms: u64,
    },
    RevokeToken {
        id: VolumeId,
    },
    /// Drops what expired at `now_ms` (proposed by the Raft leader): tokens past their
    /// lifetime or inactivity timeout, and tokens, clones and snapshots never finished.
    Expire {
        now_ms: u64,
    },
    /// Creates volume `name` as a clone (or, `snapshot`, a read-only snapshot) of `source`:
    /// its replicas and size, pending until its image is made ([`MetaCmd::FinishClone`]).
    CloneVolume {
        name: String,
        source: String,
        snapshot: bool,
        now_ms: u64,
    },
    /// A pending clone's image is made and held by `holders`, which become its in-sync set.
    FinishClone {
        volume: VolumeId,
        holders: Vec<NodeId>,
    },
}

/// The outcome of applying one command. A refused command changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    /// Applied; `changed` is false when the map already held this value.
    Done {
        changed: bool,
    },
    NotFound(String),
    Invalid(String),
    /// The replies of a [`MetaCmd::Batch`], in order.
    Batch(Vec<MetaReply>),
    /// A compare-and-set found another value; nothing changed.
    Conflict(String),
    /// What a [`MetaCmd::Reserve`] did, or why the reservations refused it (nothing changed).
    Reservation(Result<Outcome, Refusal>),
    /// The token a token command made or changed.
    Token(Box<TokenRecord>),
}
