//! The cluster map: the replicated state that every node agrees on, and the commands that
//! change it. This is pure logic: [`ClusterMap::apply`] takes a command and returns a reply; it
//! does no I/O, reads no clock and knows nothing of Raft. The openraft adapter
//! (`state_machine.rs`) calls it for every committed entry, on every node, in log order, so it
//! must be deterministic: the same commands give the same map everywhere.
//!
//! Objects: nodes (with their target ports), settings, the transport policy, datasets and
//! volumes (with their replica sets, in-sync sets, primaries and epochs), and hosts (with the
//! volumes they may reach and their published path maps). Later capabilities (reservations,
//! tokens) add theirs as new fields, new [`ObjectKey`] variants and new commands; the
//! persistence and snapshot code keys everything by `ObjectKey` and needs no change for that.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tandem_paths::VolumePaths;
use tandem_transport::{Layer, TransportKind};
use tandem_types::{validate_name, Epoch, NodeId, VolumeId, BLOCK_BYTES, SETTING_VALUE_BYTES_MAX, VOLUME_BYTES_MAX};

/// The dataset a volume joins when its creator names none. It is created on first use, with
/// every node of the cluster as a replica.
pub const DEFAULT_DATASET: &str = "default";
/// Datasets the map holds at most: metadata is small by design, and every node keeps all of it
/// in memory and in every snapshot.
pub const DATASETS_MAX: usize = 1024;
/// Volumes the map holds at most (a few hundred bytes each in memory and in snapshots).
pub const VOLUMES_MAX: usize = 16 * 1024;
/// Hosts the map holds at most; each carries its published path map.
pub const HOSTS_MAX: usize = 1024;
/// Volumes one host may be connected to: bounds the size of its path map (a few hundred bytes
/// per volume), which is rewritten whenever one of its paths changes state.
pub const HOST_VOLUMES_MAX: usize = 256;
/// Extra target ports (NBD addresses besides `nbd_addr`) a node may advertise.
pub const EXTRA_TARGETS_MAX: usize = 7;
/// Paths of one volume in a published map (replicas × target ports).
pub const VOLUME_PATHS_MAX: usize = 256;
/// The longest reason text of one path.
pub const PATH_REASON_BYTES_MAX: usize = 256;
/// The largest published path map of one host (estimated encoded bytes). It travels in one log
/// entry, and the metadata store keeps entries below its batch size so that an AppendEntries
/// request stays far below the frame limit. A few hundred bytes per volume in practice.
pub const PATH_MAP_BYTES_MAX: usize = 192 * 1024;

/// An upper estimate of a path map's encoded size.
pub fn path_map_bytes(paths: &[VolumePaths]) -> usize {
    paths
        .iter()
        .map(|v| 16 + v.volume.len() + v.paths.iter().map(|p| 48 + p.path.len() + p.reason.len()).sum::<usize>())
        .sum()
}

/// What the cluster knows of a node besides its Raft membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Failure domain (a room, a building, a city); paths and placement prefer the local site.
    pub site: String,
    /// Node-to-node traffic (Raft, replication) arrives here, over mutual TLS.
    pub raft_addr: SocketAddr,
    /// The admin HTTP API.
    pub api_addr: SocketAddr,
    /// Hosts attach volumes here over NBD (the node's first target port).
    pub nbd_addr: SocketAddr,
    /// More target ports the node serves NBD on (other networks, other NICs): each is one more
    /// path to every volume the node holds.
    #[serde(default)]
    pub extra_nbd_addrs: Vec<SocketAddr>,
}

impl NodeRecord {
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("node id must be at least 1".into());
        }
        validate_name(&self.site).map_err(|e| format!("site {:?} {e}", self.site))?;
        if self.extra_nbd_addrs.len() > EXTRA_TARGETS_MAX {
            return Err(format!(
                "node {} advertises {} extra NBD addresses; at most {EXTRA_TARGETS_MAX} are allowed",
                self.id,
                self.extra_nbd_addrs.len()
            ));
        }
        let targets = self.targets();
        let unique: BTreeSet<&SocketAddr> = targets.iter().collect();
        if unique.len() != targets.len() {
            return Err(format!("node {}: its NBD addresses {targets:?} name an address twice", self.id));
        }
        Ok(())
    }

    /// Every target port of the node, `nbd_addr` first: port `i` of the node is path `n{id}p{i}`.
    pub fn targets(&self) -> Vec<SocketAddr> {
        std::iter::once(self.nbd_addr).chain(self.extra_nbd_addrs.iter().copied()).collect()
    }
}

/// A host (an initiator: a hypervisor, a database server) and the volumes it may reach. The
/// Raft leader computes the host's path map and publishes it here, versioned by `generation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// The host's failure domain: paths to nodes in the same site are preferred.
    pub site: String,
    /// The volumes the host may reach (by id, so a deleted and re-created volume of the same
    /// name is not reached by accident).
    pub volumes: BTreeSet<VolumeId>,
    /// The generation of the published path map: 0 until the first one, then +1 with every
    /// change. Never goes back, also across leader changes (it is committed).
    pub generation: u64,
    /// The published path map, per connected volume.
    pub paths: Vec<VolumePaths>,
}

/// A dataset (a "pod"): a group of volumes replicated on the same set of nodes, which fail
/// over together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub name: String,
    /// The nodes holding a copy of every volume of the dataset; sorted, no duplicates. Fixed
    /// when the dataset is created.
    pub replicas: Vec<NodeId>,
    /// The site whose nodes serve the dataset's volumes (their primaries) when they can.
    pub preferred_site: Option<String>,
}

/// How far the resync of a returning replica has come (for display; the data plane drives it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A volume and its replication configuration. The data plane keeps the invariants I1–I5 of
/// docs/ARCHITECTURE.md on top of these fields; the map keeps their shape: `isr` is a sorted
/// subset of `replicas` that contains `primary`, and `epoch` grows with every primary change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub dataset: String,
    pub size_bytes: u64,
    /// The dataset's replica set when the volume was created; sorted.
    pub replicas: Vec<NodeId>,
    /// The node that serves the volume's I/O in this epoch.
    pub primary: NodeId,
    /// The in-sync set: sorted, contains `primary`, a subset of `replicas`.
    pub isr: Vec<NodeId>,
    /// Starts at 1; +1 on every primary change (a [`MetaCmd::Failover`]).
    pub epoch: Epoch,
    /// Starts at 1; +1 on every change of `isr`. ISR changes are compare-and-set on it, so a
    /// proposal that arrives late (its reply lost, its retry already applied, or overtaken by
    /// a later change) can never apply to an ISR it was not computed from.
    pub isr_version: u64,
    /// Replicas outside the ISR being brought level with the primary.
    pub resync: BTreeMap<NodeId, ResyncProgress>,
    /// Which start of the primary's process runs the volume in this epoch
    /// ([`MetaCmd::ClaimPrimary`]); `None` until the primary claims the epoch. One epoch has at
    /// most one running primary, so a late ISR change of an earlier one is refused by epoch.
    #[serde(default)]
    pub claim: Option<u64>,
}

impl VolumeRecord {
    /// Asserts the shape the map promises; a violation is a bug in [`ClusterMap::apply`].
    fn assert_shape(&self) {
        assert!(is_sorted_set(&self.replicas), "volume {}: replicas {:?} not a sorted set", self.id, self.replicas);
        assert!(is_sorted_set(&self.isr), "volume {}: isr {:?} not a sorted set", self.id, self.isr);
        assert!(self.isr.contains(&self.primary), "volume {}: primary {} not in isr", self.id, self.primary);
        assert!(self.isr.iter().all(|n| self.replicas.contains(n)), "volume {}: isr outside replicas", self.id);
        assert!(self.epoch >= 1, "volume {}: epoch 0", self.id);
    }
}

fn is_sorted_set(ids: &[NodeId]) -> bool {
    ids.windows(2).all(|w| w[0] < w[1])
}

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
    /// [`ClusterMap::place`]. Repeating it with the same parameters changes nothing.
    CreateDataset {
        name: String,
        replicas: Option<u32>,
        preferred_site: Option<String>,
    },
    /// Deletes an empty dataset.
    DeleteDataset {
        name: String,
    },
    /// Creates a volume in `dataset` (`None`: [`DEFAULT_DATASET`], created on first use).
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
}

/// The name of one persisted object of the map. The state machine stores each object under its
/// key, so an applied command rewrites only what it touched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Node(NodeId),
    Setting(String),
    Transport(Layer),
    Dataset(String),
    Volume(VolumeId),
    /// The counter [`ClusterMap::next_volume_id`].
    NextVolumeId,
    Host(String),
}

impl ObjectKey {
    const NODE: &'static str = "node/";
    const SETTING: &'static str = "setting/";
    const TRANSPORT: &'static str = "transport/";
    const DATASET: &'static str = "dataset/";
    const VOLUME: &'static str = "volume/";
    const NEXT_VOLUME_ID: &'static str = "counter/next_volume_id";
    const HOST: &'static str = "host/";

    pub fn encode(&self) -> Vec<u8> {
        match self {
            // Fixed width, so sled's byte order is numeric order.
            ObjectKey::Node(id) => format!("{}{id:020}", Self::NODE).into_bytes(),
            ObjectKey::Setting(k) => format!("{}{k}", Self::SETTING).into_bytes(),
            ObjectKey::Transport(l) => format!("{}{l}", Self::TRANSPORT).into_bytes(),
            ObjectKey::Dataset(name) => format!("{}{name}", Self::DATASET).into_bytes(),
            ObjectKey::Volume(id) => format!("{}{id:020}", Self::VOLUME).into_bytes(),
            ObjectKey::NextVolumeId => Self::NEXT_VOLUME_ID.as_bytes().to_vec(),
            ObjectKey::Host(name) => format!("{}{name}", Self::HOST).into_bytes(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<ObjectKey> {
        let s = std::str::from_utf8(bytes).ok()?;
        if let Some(id) = s.strip_prefix(Self::NODE) {
            return id.parse().ok().map(ObjectKey::Node);
        }
        if let Some(l) = s.strip_prefix(Self::TRANSPORT) {
            return l.parse().ok().map(ObjectKey::Transport);
        }
        if let Some(id) = s.strip_prefix(Self::VOLUME) {
            return id.parse().ok().map(ObjectKey::Volume);
        }
        if let Some(name) = s.strip_prefix(Self::DATASET) {
            return Some(ObjectKey::Dataset(name.to_string()));
        }
        if let Some(name) = s.strip_prefix(Self::HOST) {
            return Some(ObjectKey::Host(name.to_string()));
        }
        if s == Self::NEXT_VOLUME_ID {
            return Some(ObjectKey::NextVolumeId);
        }
        s.strip_prefix(Self::SETTING).map(|k| ObjectKey::Setting(k.to_string()))
    }
}

/// One object's value, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    Node(NodeRecord),
    Setting(String),
    Transport(TransportKind),
    Dataset(DatasetRecord),
    Volume(VolumeRecord),
    NextVolumeId(VolumeId),
    Host(HostRecord),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterMap {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub settings: BTreeMap<String, String>,
    /// The network layer per traffic layer; a layer not set here uses the config's default.
    pub transport: BTreeMap<Layer, TransportKind>,
    pub datasets: BTreeMap<String, DatasetRecord>,
    pub volumes: BTreeMap<VolumeId, VolumeRecord>,
    /// The id the next created volume gets; starts at 1, never reused.
    pub next_volume_id: VolumeId,
    pub hosts: BTreeMap<String, HostRecord>,
    /// Keys changed since the last [`ClusterMap::take_touched`]; not part of the state.
    #[serde(skip)]
    touched: Vec<ObjectKey>,
}

impl Default for ClusterMap {
    fn default() -> ClusterMap {
        ClusterMap {
            nodes: BTreeMap::new(),
            settings: BTreeMap::new(),
            transport: BTreeMap::new(),
            datasets: BTreeMap::new(),
            volumes: BTreeMap::new(),
            next_volume_id: 1,
            hosts: BTreeMap::new(),
            touched: Vec::new(),
        }
    }
}

/// Checks a list of node ids given in a command: no duplicates; returns it sorted.
fn node_set(ids: &[NodeId], what: &str) -> Result<Vec<NodeId>, String> {
    let set: BTreeSet<NodeId> = ids.iter().copied().collect();
    if set.len() != ids.len() {
        return Err(format!("the {what} {ids:?} names a node twice"));
    }
    Ok(set.into_iter().collect())
}

/// Equality of the state; the bookkeeping of touched keys is not state.
impl PartialEq for ClusterMap {
    fn eq(&self, other: &Self) -> bool {
        self.nodes == other.nodes
            && self.settings == other.settings
            && self.transport == other.transport
            && self.datasets == other.datasets
            && self.volumes == other.volumes
            && self.next_volume_id == other.next_volume_id
            && self.hosts == other.hosts
    }
}

impl Eq for ClusterMap {}

impl ClusterMap {
    pub fn apply(&mut self, cmd: MetaCmd) -> MetaReply {
        match cmd {
            MetaCmd::RegisterNode(rec) => {
                if let Err(e) = rec.validate() {
                    return MetaReply::Invalid(e);
                }
                if let Some(other) = self.nodes.values().find(|n| n.id != rec.id && n.raft_addr == rec.raft_addr) {
                    return MetaReply::Invalid(format!(
                        "raft address {} is already used by node {}",
                        rec.raft_addr, other.id
                    ));
                }
                let id = rec.id;
                let changed = self.nodes.get(&id) != Some(&rec);
                if changed {
                    self.nodes.insert(id, rec);
                    self.touched.push(ObjectKey::Node(id));
                }
                MetaReply::Done { changed }
            }
            MetaCmd::RemoveNode { id } => {
                if !self.nodes.contains_key(&id) {
                    return MetaReply::NotFound(format!("node {id} is not in the cluster map"));
                }
                if let Some(why) = self.node_in_use(id) {
                    return MetaReply::Invalid(why);
                }
                self.nodes.remove(&id);
                self.touched.push(ObjectKey::Node(id));
                MetaReply::Done { changed: true }
            }
            MetaCmd::PutSetting { key, value } => {
                if let Err(e) = validate_name(&key) {
                    return MetaReply::Invalid(format!("setting name {key:?} {e}"));
                }
                if value.len() > SETTING_VALUE_BYTES_MAX {
                    return MetaReply::Invalid(format!(
                        "setting value of {} bytes exceeds {SETTING_VALUE_BYTES_MAX} bytes",
                        value.len()
                    ));
                }
                let changed = self.settings.get(&key) != Some(&value);
                if changed {
                    self.touched.push(ObjectKey::Setting(key.clone()));
                    self.settings.insert(key, value);
                }
                MetaReply::Done { changed }
            }
            MetaCmd::DeleteSetting { key } => {
                if self.settings.remove(&key).is_none() {
                    return MetaReply::NotFound(format!("no setting named {key:?}"));
                }
                self.touched.push(ObjectKey::Setting(key));
                MetaReply::Done { changed: true }
            }
            MetaCmd::SetTransport { layer, kind } => {
                let changed = self.transport.insert(layer, kind) != Some(kind);
                if changed {
                    self.touched.push(ObjectKey::Transport(layer));
                }
                MetaReply::Done { changed }
            }
            MetaCmd::CreateDataset { name, replicas, preferred_site } => {
                self.create_dataset(name, replicas, preferred_site)
            }
            MetaCmd::DeleteDataset { name } => self.delete_dataset(&name),
            MetaCmd::CreateVolume { name, dataset, size_bytes } => self.create_volume(name, dataset, size_bytes),
            MetaCmd::DeleteVolume { name } => self.delete_volume(&name),
            MetaCmd::SetVolumeIsr { volume, epoch, isr_version, isr } => {
                self.set_volume_isr(volume, epoch, isr_version, isr)
            }
            MetaCmd::Failover { volume, epoch, primary, isr } => self.failover(volume, epoch, primary, isr),
            MetaCmd::ClaimPrimary { volume, epoch, primary, nonce } => {
                self.claim_primary(volume, epoch, primary, nonce)
            }
            MetaCmd::SetResyncProgress { volume, node, done_bytes, total_bytes } => {
                self.set_resync_progress(volume, node, ResyncProgress { done_bytes, total_bytes })
            }
            MetaCmd::ClearResync { volume, node } => self.clear_resync(volume, node),
            MetaCmd::AddHost { name, site } => self.add_host(name, site),
            MetaCmd::RemoveHost { name } => {
                if self.hosts.remove(&name).is_none() {
                    return MetaReply::NotFound(format!("no host named {name:?}"));
                }
                self.touched.push(ObjectKey::Host(name));
                MetaReply::Done { changed: true }
            }
            MetaCmd::ConnectHost { host, volume } => self.connect_host(&host, &volume, true),
            MetaCmd::DisconnectHost { host, volume } => self.connect_host(&host, &volume, false),
            MetaCmd::PublishPaths { host, generation, paths } => self.publish_paths(&host, generation, paths),
            MetaCmd::Batch(cmds) => MetaReply::Batch(
                cmds.into_iter()
                    .map(|c| match c {
                        MetaCmd::Batch(_) => MetaReply::Invalid("batches do not nest".into()),
                        c => self.apply(c),
                    })
                    .collect(),
            ),
        }
    }

    /// The volume called `name`, if any.
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// Why node `id` cannot leave the map now (a dataset or volume lists it), if it cannot.
    pub fn node_in_use(&self, id: NodeId) -> Option<String> {
        let volumes: Vec<&str> =
            self.volumes.values().filter(|v| v.replicas.contains(&id)).map(|v| v.name.as_str()).collect();
        let datasets: Vec<&str> =
            self.datasets.values().filter(|d| d.replicas.contains(&id)).map(|d| d.name.as_str()).collect();
        if volumes.is_empty() && datasets.is_empty() {
            return None;
        }
        Some(format!(
            "node {id} holds replicas of datasets [{}] and volumes [{}]; delete those volumes and datasets \
             before removing the node",
            datasets.join(", "),
            volumes.join(", ")
        ))
    }

    /// Chooses `count` nodes for a dataset's replicas, deterministically. Sites take turns, the
    /// preferred site first and then the others by name; within a site nodes go by id. So the
    /// preferred site gets the first copy (and, with enough copies, every other one), and the
    /// copies spread over as many failure domains as there are. Returns the ids sorted.
    pub fn place(&self, count: usize, preferred_site: Option<&str>) -> Vec<NodeId> {
        let mut by_site: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
        for n in self.nodes.values() {
            by_site.entry(n.site.as_str()).or_default().push(n.id);
        }
        let mut sites: Vec<Vec<NodeId>> = Vec::new();
        if let Some(first) = preferred_site.and_then(|p| by_site.remove(p)) {
            sites.push(first);
        }
        sites.extend(by_site.into_values());
        let mut chosen = Vec::with_capacity(count);
        let rounds = sites.iter().map(Vec::len).max().unwrap_or(0);
        'rounds: for round in 0..rounds {
            for site in &sites {
                if chosen.len() == count {
                    break 'rounds;
                }
                if let Some(id) = site.get(round) {
                    chosen.push(*id);
                }
            }
        }
        chosen.sort_unstable();
        chosen
    }

    fn create_dataset(&mut self, name: String, replicas: Option<u32>, preferred_site: Option<String>) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Invalid(format!("dataset name {name:?} {e}"));
        }
        if let Some(site) = &preferred_site {
            if let Err(e) = validate_name(site) {
                return MetaReply::Invalid(format!("preferred site {site:?} {e}"));
            }
        }
        let count = match replicas {
            None => self.nodes.len(),
            Some(n) => n as usize,
        };
        if let Some(existing) = self.datasets.get(&name) {
            if existing.replicas.len() == count && existing.preferred_site == preferred_site {
                return MetaReply::Done { changed: false };
            }
            return MetaReply::Invalid(format!(
                "dataset {name:?} already exists with {} replicas (nodes {:?}) and preferred site {}; \
                 delete it first to change it",
                existing.replicas.len(),
                existing.replicas,
                existing.preferred_site.as_deref().unwrap_or("none"),
            ));
        }
        match self.new_dataset(name, count, preferred_site) {
            Ok(()) => MetaReply::Done { changed: true },
            Err(e) => MetaReply::Invalid(e),
        }
    }

    /// Validates and inserts a new dataset of `count` replicas.
    fn new_dataset(&mut self, name: String, count: usize, preferred_site: Option<String>) -> Result<(), String> {
        if self.datasets.len() >= DATASETS_MAX {
            return Err(format!("the cluster already holds the maximum of {DATASETS_MAX} datasets"));
        }
        let nodes = self.nodes.len();
        if count == 0 || count > nodes {
            return Err(format!(
                "dataset {name:?} cannot have {count} replicas: the number must be between 1 and the \
                 number of nodes ({nodes})"
            ));
        }
        if let Some(site) = &preferred_site {
            if !self.nodes.values().any(|n| &n.site == site) {
                let sites: BTreeSet<&str> = self.nodes.values().map(|n| n.site.as_str()).collect();
                return Err(format!(
                    "no node is in site {site:?} (sites: {})",
                    sites.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        let replicas = self.place(count, preferred_site.as_deref());
        assert_eq!(replicas.len(), count, "placement found fewer nodes than the map holds");
        self.touched.push(ObjectKey::Dataset(name.clone()));
        self.datasets.insert(name.clone(), DatasetRecord { name, replicas, preferred_site });
        Ok(())
    }

    fn delete_dataset(&mut self, name: &str) -> MetaReply {
        if !self.datasets.contains_key(name) {
            return MetaReply::NotFound(format!("no dataset named {name:?}"));
        }
        let volumes: Vec<&str> = self.volumes.values().filter(|v| v.dataset == name).map(|v| v.name.as_str()).collect();
        if !volumes.is_empty() {
            return MetaReply::Invalid(format!(
                "dataset {name:?} still has volumes [{}]; delete them first",
                volumes.join(", ")
            ));
        }
        self.datasets.remove(name);
        self.touched.push(ObjectKey::Dataset(name.to_string()));
        MetaReply::Done { changed: true }
    }

    fn create_volume(&mut self, name: String, dataset: Option<String>, size_bytes: u64) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Invalid(format!("volume name {name:?} {e}"));
        }
        let dataset_name = dataset.unwrap_or_else(|| DEFAULT_DATASET.to_string());
        if let Some(existing) = self.volume_by_name(&name) {
            if existing.dataset == dataset_name && existing.size_bytes == size_bytes {
                return MetaReply::Done { changed: false };
            }
            return MetaReply::Invalid(format!(
                "volume {name:?} already exists (id {}, {} bytes, dataset {:?}); delete it first to change it",
                existing.id, existing.size_bytes, existing.dataset
            ));
        }
        if size_bytes == 0 {
            return MetaReply::Invalid("volume size must be more than 0 bytes".into());
        }
        if !size_bytes.is_multiple_of(BLOCK_BYTES) {
            return MetaReply::Invalid(format!(
                "volume size {size_bytes} bytes is not a multiple of the block size ({BLOCK_BYTES} bytes)"
            ));
        }
        if size_bytes > VOLUME_BYTES_MAX {
            return MetaReply::Invalid(format!(
                "volume size {size_bytes} bytes exceeds the maximum of {VOLUME_BYTES_MAX} bytes (64 TiB)"
            ));
        }
        if self.volumes.len() >= VOLUMES_MAX {
            return MetaReply::Invalid(format!("the cluster already holds the maximum of {VOLUMES_MAX} volumes"));
        }
        if !self.datasets.contains_key(&dataset_name) {
            if dataset_name != DEFAULT_DATASET {
                return MetaReply::Invalid(format!("no dataset named {dataset_name:?}; create it first"));
            }
            if let Err(e) = self.new_dataset(dataset_name.clone(), self.nodes.len(), None) {
                return MetaReply::Invalid(format!("cannot create the default dataset: {e}"));
            }
        }
        let ds = &self.datasets[&dataset_name];
        let id = self.next_volume_id;
        let candidates: Vec<NodeId> = match &ds.preferred_site {
            Some(site) => {
                ds.replicas.iter().copied().filter(|r| self.nodes.get(r).is_some_and(|n| &n.site == site)).collect()
            }
            None => Vec::new(),
        };
        // Spread primaries: consecutive volumes of a dataset land on different nodes.
        let pick = |from: &[NodeId]| from[(id % from.len() as u64) as usize];
        let primary = if candidates.is_empty() { pick(&ds.replicas) } else { pick(&candidates) };
        let vol = VolumeRecord {
            id,
            name,
            dataset: dataset_name,
            size_bytes,
            replicas: ds.replicas.clone(),
            primary,
            isr: ds.replicas.clone(),
            epoch: 1,
            isr_version: 1,
            claim: None,
            resync: BTreeMap::new(),
        };
        vol.assert_shape();
        self.volumes.insert(id, vol);
        self.next_volume_id = id.checked_add(1).expect("volume ids exhausted");
        self.touched.push(ObjectKey::Volume(id));
        self.touched.push(ObjectKey::NextVolumeId);
        MetaReply::Done { changed: true }
    }

    fn delete_volume(&mut self, name: &str) -> MetaReply {
        let Some(id) = self.volume_by_name(name).map(|v| v.id) else {
            return MetaReply::NotFound(format!("no volume named {name:?}"));
        };
        self.volumes.remove(&id);
        self.touched.push(ObjectKey::Volume(id));
        for host in self.hosts.values_mut() {
            if host.volumes.remove(&id) {
                self.touched.push(ObjectKey::Host(host.name.clone()));
            }
        }
        MetaReply::Done { changed: true }
    }

    fn add_host(&mut self, name: String, site: String) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Invalid(format!("host name {name:?} {e}"));
        }
        if let Err(e) = validate_name(&site) {
            return MetaReply::Invalid(format!("site {site:?} {e}"));
        }
        if let Some(host) = self.hosts.get_mut(&name) {
            let changed = host.site != site;
            if changed {
                host.site = site;
                self.touched.push(ObjectKey::Host(name));
            }
            return MetaReply::Done { changed };
        }
        if self.hosts.len() >= HOSTS_MAX {
            return MetaReply::Invalid(format!("the cluster already holds the maximum of {HOSTS_MAX} hosts"));
        }
        self.touched.push(ObjectKey::Host(name.clone()));
        self.hosts.insert(
            name.clone(),
            HostRecord { name, site, volumes: BTreeSet::new(), generation: 0, paths: Vec::new() },
        );
        MetaReply::Done { changed: true }
    }

    fn connect_host(&mut self, host: &str, volume: &str, connect: bool) -> MetaReply {
        let Some(id) = self.volume_by_name(volume).map(|v| v.id) else {
            return MetaReply::NotFound(format!("no volume named {volume:?}"));
        };
        let Some(rec) = self.hosts.get_mut(host) else {
            return MetaReply::NotFound(format!("no host named {host:?}"));
        };
        if connect && !rec.volumes.contains(&id) && rec.volumes.len() >= HOST_VOLUMES_MAX {
            return MetaReply::Invalid(format!(
                "host {host:?} already reaches the maximum of {HOST_VOLUMES_MAX} volumes"
            ));
        }
        let changed = if connect { rec.volumes.insert(id) } else { rec.volumes.remove(&id) };
        if changed {
            self.touched.push(ObjectKey::Host(host.to_string()));
        }
        MetaReply::Done { changed }
    }

    fn publish_paths(&mut self, host: &str, generation: u64, paths: Vec<VolumePaths>) -> MetaReply {
        let Some(rec) = self.hosts.get_mut(host) else {
            return MetaReply::NotFound(format!("no host named {host:?}"));
        };
        // A retry of the publication that made the current generation.
        if generation == rec.generation && paths == rec.paths {
            return MetaReply::Done { changed: false };
        }
        if Some(generation) != rec.generation.checked_add(1) {
            return MetaReply::Invalid(format!(
                "host {host:?} is at path-map generation {}, not {}: the map was computed on stale state",
                rec.generation,
                generation.saturating_sub(1)
            ));
        }
        if paths.len() > HOST_VOLUMES_MAX {
            return MetaReply::Invalid(format!("a path map of {} volumes exceeds {HOST_VOLUMES_MAX}", paths.len()));
        }
        for v in &paths {
            if v.paths.len() > VOLUME_PATHS_MAX {
                return MetaReply::Invalid(format!(
                    "volume {:?} has {} paths, more than {VOLUME_PATHS_MAX}",
                    v.volume,
                    v.paths.len()
                ));
            }
            if let Some(p) = v.paths.iter().find(|p| p.reason.len() > PATH_REASON_BYTES_MAX) {
                return MetaReply::Invalid(format!(
                    "path {} has a reason longer than {PATH_REASON_BYTES_MAX} bytes",
                    p.path
                ));
            }
        }
        let bytes = path_map_bytes(&paths);
        if bytes > PATH_MAP_BYTES_MAX {
            return MetaReply::Invalid(format!(
                "the path map of host {host:?} would take about {bytes} bytes, more than {PATH_MAP_BYTES_MAX}; \
                 connect the host to fewer volumes"
            ));
        }
        rec.generation = generation;
        rec.paths = paths;
        self.touched.push(ObjectKey::Host(host.to_string()));
        MetaReply::Done { changed: true }
    }

    fn volume_mut(&mut self, id: VolumeId) -> Result<&mut VolumeRecord, MetaReply> {
        self.volumes.get_mut(&id).ok_or_else(|| MetaReply::NotFound(format!("no volume with id {id}")))
    }

    fn set_volume_isr(&mut self, id: VolumeId, epoch: Epoch, isr_version: u64, isr: Vec<NodeId>) -> MetaReply {
        let vol = match self.volume_mut(id) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if vol.epoch != epoch {
            return MetaReply::Invalid(format!(
                "volume {id} is at epoch {}, not {epoch}: the ISR change comes from a stale primary",
                vol.epoch
            ));
        }
        let isr = match node_set(&isr, "ISR") {
            Ok(s) => s,
            Err(e) => return MetaReply::Invalid(format!("volume {id}: {e}")),
        };
        if !isr.contains(&vol.primary) {
            return MetaReply::Invalid(format!(
                "volume {id}: the ISR {isr:?} must contain the primary {}",
                vol.primary
            ));
        }
        if let Some(n) = isr.iter().find(|n| !vol.replicas.contains(n)) {
            return MetaReply::Invalid(format!("volume {id}: node {n} is not a replica (replicas {:?})", vol.replicas));
        }
        // A retry of the change that made the current version.
        if vol.isr == isr && Some(vol.isr_version) == isr_version.checked_add(1) {
            return MetaReply::Done { changed: false };
        }
        if vol.isr_version != isr_version {
            return MetaReply::Invalid(format!(
                "volume {id} has ISR version {}, not {isr_version}: the ISR change was computed on a stale ISR",
                vol.isr_version
            ));
        }
        if vol.isr != isr {
            vol.isr_version = vol.isr_version.checked_add(1).expect("ISR versions exhausted");
        }
        let before = vol.resync.len();
        vol.resync.retain(|n, _| !isr.contains(n));
        let changed = vol.isr != isr || vol.resync.len() != before;
        vol.isr = isr;
        vol.assert_shape();
        if changed {
            self.touched.push(ObjectKey::Volume(id));
        }
        MetaReply::Done { changed }
    }

    fn failover(&mut self, id: VolumeId, epoch: Epoch, primary: NodeId, isr: Vec<NodeId>) -> MetaReply {
        let vol = match self.volume_mut(id) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let isr = match node_set(&isr, "ISR") {
            Ok(s) => s,
            Err(e) => return MetaReply::Invalid(format!("volume {id}: {e}")),
        };
        // A retry of the failover that moved the volume to this very configuration.
        if Some(vol.epoch) == epoch.checked_add(1) && vol.primary == primary && vol.isr == isr {
            return MetaReply::Done { changed: false };
        }
        if vol.epoch != epoch {
            return MetaReply::Invalid(format!(
                "volume {id} is at epoch {}, not {epoch}: the failover was decided on stale state",
                vol.epoch
            ));
        }
        if !vol.isr.contains(&primary) {
            return MetaReply::Invalid(format!(
                "volume {id}: the new primary {primary} is not in the last committed ISR {:?}",
                vol.isr
            ));
        }
        if !isr.contains(&primary) {
            return MetaReply::Invalid(format!(
                "volume {id}: the new ISR {isr:?} must contain the new primary {primary}"
            ));
        }
        if let Some(n) = isr.iter().find(|n| !vol.isr.contains(n)) {
            return MetaReply::Invalid(format!(
                "volume {id}: node {n} is not in the last committed ISR {:?}; a failover can only shrink it",
                vol.isr
            ));
        }
        vol.primary = primary;
        vol.isr = isr;
        vol.epoch = epoch.checked_add(1).expect("epochs exhausted");
        vol.isr_version = vol.isr_version.checked_add(1).expect("ISR versions exhausted");
        vol.claim = None;
        vol.assert_shape();
        self.touched.push(ObjectKey::Volume(id));
        MetaReply::Done { changed: true }
    }

    fn claim_primary(&mut self, id: VolumeId, epoch: Epoch, primary: NodeId, nonce: u64) -> MetaReply {
        let vol = match self.volume_mut(id) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if vol.claim == Some(nonce) && vol.primary == primary {
            // A retry of the claim that made the current epoch (or claimed it).
            return MetaReply::Done { changed: false };
        }
        if vol.epoch != epoch || vol.primary != primary {
            return MetaReply::Invalid(format!(
                "volume {id} is at epoch {} with primary {}, not epoch {epoch} with primary {primary}: the claim is stale",
                vol.epoch, vol.primary
            ));
        }
        if vol.claim.is_some() {
            vol.epoch = epoch.checked_add(1).expect("epochs exhausted");
            vol.isr_version = vol.isr_version.checked_add(1).expect("ISR versions exhausted");
        }
        vol.claim = Some(nonce);
        vol.assert_shape();
        self.touched.push(ObjectKey::Volume(id));
        MetaReply::Done { changed: true }
    }

    fn set_resync_progress(&mut self, id: VolumeId, node: NodeId, progress: ResyncProgress) -> MetaReply {
        let vol = match self.volume_mut(id) {
            Ok(v) => v,
            Err(r) => return r,
        };
        if !vol.replicas.contains(&node) {
            return MetaReply::Invalid(format!(
                "volume {id}: node {node} is not a replica (replicas {:?})",
                vol.replicas
            ));
        }
        if vol.isr.contains(&node) {
            return MetaReply::Invalid(format!(
                "volume {id}: node {node} is in the ISR; only a replica outside it resyncs"
            ));
        }
        if progress.done_bytes > progress.total_bytes {
            return MetaReply::Invalid(format!(
                "volume {id}: resync progress {} of {} bytes is past the end",
                progress.done_bytes, progress.total_bytes
            ));
        }
        let changed = vol.resync.insert(node, progress) != Some(progress);
        if changed {
            self.touched.push(ObjectKey::Volume(id));
        }
        MetaReply::Done { changed }
    }

    fn clear_resync(&mut self, id: VolumeId, node: NodeId) -> MetaReply {
        let vol = match self.volume_mut(id) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let changed = vol.resync.remove(&node).is_some();
        if changed {
            self.touched.push(ObjectKey::Volume(id));
        }
        MetaReply::Done { changed }
    }

    /// The keys changed since the last call, each once, in key order.
    pub fn take_touched(&mut self) -> Vec<ObjectKey> {
        let mut keys = std::mem::take(&mut self.touched);
        keys.sort();
        keys.dedup();
        keys
    }

    /// The current value of an object; `None` if it does not exist (was deleted).
    pub fn object(&self, key: &ObjectKey) -> Option<Object> {
        match key {
            ObjectKey::Node(id) => self.nodes.get(id).cloned().map(Object::Node),
            ObjectKey::Setting(k) => self.settings.get(k).cloned().map(Object::Setting),
            ObjectKey::Transport(l) => self.transport.get(l).copied().map(Object::Transport),
            ObjectKey::Dataset(name) => self.datasets.get(name).cloned().map(Object::Dataset),
            ObjectKey::Volume(id) => self.volumes.get(id).cloned().map(Object::Volume),
            ObjectKey::NextVolumeId => Some(Object::NextVolumeId(self.next_volume_id)),
            ObjectKey::Host(name) => self.hosts.get(name).cloned().map(Object::Host),
        }
    }

    /// Every object, for a full rewrite (snapshot install).
    pub fn objects(&self) -> Vec<(ObjectKey, Object)> {
        let nodes = self.nodes.iter().map(|(id, n)| (ObjectKey::Node(*id), Object::Node(n.clone())));
        let settings = self.settings.iter().map(|(k, v)| (ObjectKey::Setting(k.clone()), Object::Setting(v.clone())));
        let transport = self.transport.iter().map(|(l, k)| (ObjectKey::Transport(*l), Object::Transport(*k)));
        let datasets =
            self.datasets.iter().map(|(name, d)| (ObjectKey::Dataset(name.clone()), Object::Dataset(d.clone())));
        let volumes = self.volumes.iter().map(|(id, v)| (ObjectKey::Volume(*id), Object::Volume(v.clone())));
        let counter = std::iter::once((ObjectKey::NextVolumeId, Object::NextVolumeId(self.next_volume_id)));
        let hosts = self.hosts.iter().map(|(name, h)| (ObjectKey::Host(name.clone()), Object::Host(h.clone())));
        nodes.chain(settings).chain(transport).chain(datasets).chain(volumes).chain(counter).chain(hosts).collect()
    }

    /// Rebuilds a map from stored objects (the inverse of [`ClusterMap::objects`]).
    pub fn from_objects(objects: impl IntoIterator<Item = (ObjectKey, Object)>) -> Result<ClusterMap, String> {
        let mut map = ClusterMap::default();
        for (key, obj) in objects {
            match (key, obj) {
                (ObjectKey::Node(id), Object::Node(n)) if n.id == id => {
                    map.nodes.insert(id, n);
                }
                (ObjectKey::Setting(k), Object::Setting(v)) => {
                    map.settings.insert(k, v);
                }
                (ObjectKey::Transport(l), Object::Transport(k)) => {
                    map.transport.insert(l, k);
                }
                (ObjectKey::Dataset(name), Object::Dataset(d)) if d.name == name => {
                    map.datasets.insert(name, d);
                }
                (ObjectKey::Volume(id), Object::Volume(v)) if v.id == id => {
                    map.volumes.insert(id, v);
                }
                (ObjectKey::NextVolumeId, Object::NextVolumeId(n)) => {
                    map.next_volume_id = n;
                }
                (ObjectKey::Host(name), Object::Host(h)) if h.name == name => {
                    map.hosts.insert(name, h);
                }
                (key, _) => return Err(format!("object stored under {key:?} has the wrong kind or id")),
            }
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: NodeId, port: u16) -> NodeRecord {
        NodeRecord {
            id,
            site: "a".into(),
            raft_addr: format!("127.0.0.1:{port}").parse().expect("addr"),
            api_addr: format!("127.0.0.1:{}", port + 1).parse().expect("addr"),
            nbd_addr: format!("127.0.0.1:{}", port + 2).parse().expect("addr"),
            extra_nbd_addrs: Vec::new(),
        }
    }

    #[test]
    fn register_update_and_remove_nodes() {
        let mut m = ClusterMap::default();
        assert_eq!(m.apply(MetaCmd::RegisterNode(node(1, 7000))), MetaReply::Done { changed: true });
        assert_eq!(m.apply(MetaCmd::RegisterNode(node(1, 7000))), MetaReply::Done { changed: false });
        let mut moved = node(1, 7000);
        moved.site = "b".into();
        assert_eq!(m.apply(MetaCmd::RegisterNode(moved.clone())), MetaReply::Done { changed: true });
        assert_eq!(m.nodes[&1], moved);
        assert_eq!(m.take_touched(), vec![ObjectKey::Node(1)]);
        assert!(matches!(m.apply(MetaCmd::RemoveNode { id: 9 }), MetaReply::NotFound(_)));
        assert_eq!(m.apply(MetaCmd::RemoveNode { id: 1 }), MetaReply::Done { changed: true });
        assert!(m.nodes.is_empty());
        assert_eq!(m.take_touched(), vec![ObjectKey::Node(1)]);
    }

    #[test]
    fn invalid_commands_change_nothing() {
        let mut m = ClusterMap::default();
        m.apply(MetaCmd::RegisterNode(node(1, 7000)));
        m.take_touched();
        let before = m.clone();
        assert!(matches!(m.apply(MetaCmd::RegisterNode(node(0, 7100))), MetaReply::Invalid(_)));
        let mut bad_site = node(2, 7200);
        bad_site.site = "a b".into();
        assert!(matches!(m.apply(MetaCmd::RegisterNode(bad_site)), MetaReply::Invalid(_)));
        // Another node on node 1's raft address.
        assert!(matches!(m.apply(MetaCmd::RegisterNode(node(3, 7000))), MetaReply::Invalid(_)));
        assert!(matches!(
            m.apply(MetaCmd::PutSetting { key: "../x".into(), value: "v".into() }),
            MetaReply::Invalid(_)
        ));
        assert!(matches!(
            m.apply(MetaCmd::PutSetting { key: "k".into(), value: "v".repeat(SETTING_VALUE_BYTES_MAX + 1) }),
            MetaReply::Invalid(_)
        ));
        assert!(matches!(m.apply(MetaCmd::DeleteSetting { key: "nope".into() }), MetaReply::NotFound(_)));
        assert_eq!(m, before);
        assert!(m.take_touched().is_empty());
    }

    #[test]
    fn settings_put_overwrite_delete() {
        let mut m = ClusterMap::default();
        assert_eq!(
            m.apply(MetaCmd::PutSetting { key: "k".into(), value: "1".into() }),
            MetaReply::Done { changed: true }
        );
        assert_eq!(
            m.apply(MetaCmd::PutSetting { key: "k".into(), value: "1".into() }),
            MetaReply::Done { changed: false }
        );
        assert_eq!(
            m.apply(MetaCmd::PutSetting { key: "k".into(), value: "2".into() }),
            MetaReply::Done { changed: true }
        );
        assert_eq!(m.settings["k"], "2");
        assert_eq!(m.apply(MetaCmd::DeleteSetting { key: "k".into() }), MetaReply::Done { changed: true });
        assert!(m.settings.is_empty());
    }

    #[test]
    fn a_batch_applies_each_command_in_order_and_does_not_nest() {
        let mut m = ClusterMap::default();
        let reply = m.apply(MetaCmd::Batch(vec![
            MetaCmd::PutSetting { key: "a".into(), value: "1".into() },
            MetaCmd::DeleteSetting { key: "missing".into() },
            MetaCmd::Batch(vec![]),
            MetaCmd::PutSetting { key: "a".into(), value: "2".into() },
        ]));
        let MetaReply::Batch(replies) = reply else { panic!("not a batch reply: {reply:?}") };
        assert_eq!(replies.len(), 4);
        assert_eq!(replies[0], MetaReply::Done { changed: true });
        assert!(matches!(replies[1], MetaReply::NotFound(_)));
        assert!(matches!(replies[2], MetaReply::Invalid(_)));
        assert_eq!(replies[3], MetaReply::Done { changed: true });
        assert_eq!(m.settings["a"], "2");
    }

    #[test]
    fn object_keys_round_trip_and_sort_numerically() {
        for key in [
            ObjectKey::Node(1),
            ObjectKey::Node(u64::MAX),
            ObjectKey::Setting("a.b-c".into()),
            ObjectKey::Transport(Layer::Data),
            ObjectKey::Transport(Layer::Control),
            ObjectKey::Dataset("pod-1".into()),
            ObjectKey::Volume(7),
            ObjectKey::Volume(u64::MAX),
            ObjectKey::NextVolumeId,
        ] {
            assert_eq!(ObjectKey::decode(&key.encode()), Some(key));
        }
        assert!(ObjectKey::Node(2).encode() < ObjectKey::Node(10).encode());
        assert!(ObjectKey::Volume(9).encode() < ObjectKey::Volume(10).encode());
        assert_eq!(ObjectKey::decode(b"volume/x"), None);
        assert_eq!(ObjectKey::decode(b"counter/other"), None);
        assert_eq!(ObjectKey::decode(b"junk"), None);
        assert_eq!(ObjectKey::decode(b"node/x"), None);
    }

    fn node_at(id: NodeId, site: &str) -> NodeRecord {
        let mut n = node(id, 7000 + 10 * id as u16);
        n.site = site.into();
        n
    }

    /// A map with nodes 1..=5: 1, 2, 3 in site `a`, 4, 5 in site `b`.
    fn two_sites() -> ClusterMap {
        let mut m = ClusterMap::default();
        for (id, site) in [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b")] {
            assert_eq!(m.apply(MetaCmd::RegisterNode(node_at(id, site))), MetaReply::Done { changed: true });
        }
        m.take_touched();
        m
    }

    fn create_dataset(name: &str, replicas: Option<u32>, site: Option<&str>) -> MetaCmd {
        MetaCmd::CreateDataset { name: name.into(), replicas, preferred_site: site.map(str::to_string) }
    }

    fn create_volume(name: &str, dataset: Option<&str>, size_bytes: u64) -> MetaCmd {
        MetaCmd::CreateVolume { name: name.into(), dataset: dataset.map(str::to_string), size_bytes }
    }

    const DONE: MetaReply = MetaReply::Done { changed: true };
    const SAME: MetaReply = MetaReply::Done { changed: false };
    const MIB: u64 = 1 << 20;

    fn invalid(reply: MetaReply, needle: &str) {
        match reply {
            MetaReply::Invalid(m) => assert!(m.contains(needle), "{m:?} does not mention {needle:?}"),
            other => panic!("expected Invalid mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn placement_spreads_over_sites_with_the_preferred_site_first() {
        let m = two_sites();
        // Sites take turns: preferred first, then the others by name; nodes by id.
        assert_eq!(m.place(1, Some("b")), vec![4]);
        assert_eq!(m.place(2, Some("b")), vec![1, 4]);
        assert_eq!(m.place(3, Some("b")), vec![1, 4, 5]);
        assert_eq!(m.place(4, Some("b")), vec![1, 2, 4, 5]);
        assert_eq!(m.place(5, Some("b")), vec![1, 2, 3, 4, 5]);
        assert_eq!(m.place(2, Some("a")), vec![1, 4]);
        assert_eq!(m.place(3, Some("a")), vec![1, 2, 4]);
        assert_eq!(m.place(2, None), vec![1, 4]);
        assert_eq!(m.place(1, None), vec![1]);
        assert_eq!(ClusterMap::default().place(2, None), Vec::<NodeId>::new());
    }

    #[test]
    fn datasets_create_idempotently_and_refuse_bad_parameters() {
        let mut m = two_sites();
        assert_eq!(m.apply(create_dataset("pod", Some(2), Some("b"))), DONE);
        assert_eq!(
            m.datasets["pod"],
            DatasetRecord { name: "pod".into(), replicas: vec![1, 4], preferred_site: Some("b".into()) }
        );
        assert_eq!(m.take_touched(), vec![ObjectKey::Dataset("pod".into())]);
        // The same again: nothing changes.
        assert_eq!(m.apply(create_dataset("pod", Some(2), Some("b"))), SAME);
        assert!(m.take_touched().is_empty());
        // Every node when no count is given.
        assert_eq!(m.apply(create_dataset("all", None, None)), DONE);
        assert_eq!(m.datasets["all"].replicas, vec![1, 2, 3, 4, 5]);
        assert_eq!(m.apply(create_dataset("all", None, None)), SAME);
        m.take_touched();

        let before = m.clone();
        invalid(m.apply(create_dataset("pod", Some(3), Some("b"))), "already exists");
        invalid(m.apply(create_dataset("pod", Some(2), None)), "already exists");
        invalid(m.apply(create_dataset("bad name", None, None)), "dataset name");
        invalid(m.apply(create_dataset("", None, None)), "dataset name");
        invalid(m.apply(create_dataset("p2", Some(0), None)), "between 1 and");
        invalid(m.apply(create_dataset("p2", Some(6), None)), "between 1 and the number of nodes (5)");
        invalid(m.apply(create_dataset("p2", None, Some("a/b"))), "preferred site");
        invalid(m.apply(create_dataset("p2", None, Some("mars"))), "no node is in site \"mars\"");
        assert_eq!(m, before);
        assert!(m.take_touched().is_empty());
        // No nodes at all: no dataset.
        invalid(ClusterMap::default().apply(create_dataset("p", None, None)), "between 1 and");

        assert_eq!(m.apply(MetaCmd::DeleteDataset { name: "all".into() }), DONE);
        assert_eq!(m.take_touched(), vec![ObjectKey::Dataset("all".into())]);
        assert!(matches!(m.apply(MetaCmd::DeleteDataset { name: "all".into() }), MetaReply::NotFound(_)));
    }

    #[test]
    fn volumes_are_placed_in_their_dataset_and_get_fresh_ids() {
        let mut m = two_sites();
        m.apply(create_dataset("pod", Some(3), Some("b")));
        m.take_touched();
        assert_eq!(m.apply(create_volume("v1", Some("pod"), 64 * MIB)), DONE);
        let v1 = m.volume_by_name("v1").expect("v1").clone();
        assert_eq!(v1.id, 1);
        assert_eq!(v1.dataset, "pod");
        assert_eq!(v1.replicas, vec![1, 4, 5]);
        assert_eq!(v1.isr, v1.replicas);
        assert_eq!(v1.epoch, 1);
        assert!(v1.resync.is_empty());
        // Primaries go to the preferred site, spread by id: candidates [4, 5], id 1 -> 5.
        assert_eq!(v1.primary, 5);
        assert_eq!(m.take_touched(), vec![ObjectKey::Volume(1), ObjectKey::NextVolumeId]);
        // An identical create changes nothing and allocates no id.
        assert_eq!(m.apply(create_volume("v1", Some("pod"), 64 * MIB)), SAME);
        assert!(m.take_touched().is_empty());
        assert_eq!(m.next_volume_id, 2);
        assert_eq!(m.apply(create_volume("v2", Some("pod"), 4096)), DONE);
        assert_eq!(m.volume_by_name("v2").expect("v2").primary, 4);

        // No dataset named: the default one, made on first use with every node.
        assert_eq!(m.apply(create_volume("v3", None, MIB)), DONE);
        assert_eq!(m.datasets[DEFAULT_DATASET].replicas, vec![1, 2, 3, 4, 5]);
        assert_eq!(m.datasets[DEFAULT_DATASET].preferred_site, None);
        let v3 = m.volume_by_name("v3").expect("v3");
        assert_eq!((v3.id, v3.primary), (3, 4)); // replicas[3 % 5]
        assert_eq!(
            m.take_touched(),
            vec![
                ObjectKey::Dataset(DEFAULT_DATASET.into()),
                ObjectKey::Volume(2),
                ObjectKey::Volume(3),
                ObjectKey::NextVolumeId
            ]
        );
        // Naming the default dataset is the same as naming none.
        assert_eq!(m.apply(create_volume("v3", Some(DEFAULT_DATASET), MIB)), SAME);

        // Ids are never reused, names are.
        assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v1".into() }), DONE);
        assert_eq!(m.take_touched(), vec![ObjectKey::Volume(1)]);
        assert!(matches!(m.apply(MetaCmd::DeleteVolume { name: "v1".into() }), MetaReply::NotFound(_)));
        assert_eq!(m.apply(create_volume("v1", Some("pod"), 64 * MIB)), DONE);
        assert_eq!(m.volume_by_name("v1").expect("v1").id, 4);
    }

    #[test]
    fn a_volume_whose_preferred_site_has_no_replica_left_takes_any_replica() {
        let mut m = two_sites();
        m.apply(create_dataset("pod", Some(2), Some("b")));
        // Node 4 moves to site a: the dataset's replicas [1, 4] no longer include site b.
        m.apply(MetaCmd::RegisterNode(node_at(4, "a")));
        assert_eq!(m.apply(create_volume("v", Some("pod"), MIB)), DONE);
        assert_eq!(m.volume_by_name("v").expect("v").primary, 4); // replicas[1 % 2]
    }

    #[test]
    fn bad_volumes_are_refused_and_change_nothing() {
        let mut m = two_sites();
        m.apply(create_dataset("pod", Some(2), None));
        m.apply(create_volume("v", Some("pod"), MIB));
        m.take_touched();
        let before = m.clone();
        invalid(m.apply(create_volume("bad name", None, MIB)), "volume name");
        invalid(m.apply(create_volume("x", None, 0)), "more than 0");
        invalid(m.apply(create_volume("x", None, 5000)), "not a multiple of the block size");
        invalid(m.apply(create_volume("x", None, VOLUME_BYTES_MAX + BLOCK_BYTES)), "exceeds the maximum");
        invalid(m.apply(create_volume("x", Some("nope"), MIB)), "no dataset named \"nope\"");
        invalid(m.apply(create_volume("v", Some("pod"), 2 * MIB)), "already exists");
        invalid(m.apply(create_volume("v", None, MIB)), "already exists");
        // A dataset with volumes stays, and so do the nodes holding them.
        invalid(m.apply(MetaCmd::DeleteDataset { name: "pod".into() }), "still has volumes [v]");
        invalid(m.apply(MetaCmd::RemoveNode { id: 4 }), "node 4 holds replicas of datasets [pod] and volumes [v]");
        assert_eq!(m, before);
        assert!(m.take_touched().is_empty());
        // The default dataset is not made by a create that fails.
        assert!(!m.datasets.contains_key(DEFAULT_DATASET));
        // No nodes: no default dataset, no volume.
        let mut empty = ClusterMap::default();
        invalid(empty.apply(create_volume("v", None, MIB)), "default dataset");
        assert_eq!(empty, ClusterMap::default());

        // Once they are gone, the node can leave; a node in no dataset always could.
        assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), DONE);
        invalid(m.apply(MetaCmd::RemoveNode { id: 4 }), "datasets [pod]");
        assert_eq!(m.apply(MetaCmd::RemoveNode { id: 2 }), DONE);
        assert_eq!(m.apply(MetaCmd::DeleteDataset { name: "pod".into() }), DONE);
        assert_eq!(m.apply(MetaCmd::RemoveNode { id: 4 }), DONE);
    }

    /// A map with volume 1 on replicas [1, 2, 3], primary 2 (replicas[1 % 3]).
    fn one_volume() -> ClusterMap {
        let mut m = ClusterMap::default();
        for id in 1..=4 {
            m.apply(MetaCmd::RegisterNode(node_at(id, "a")));
        }
        assert_eq!(m.apply(create_dataset("pod", Some(3), None)), DONE);
        assert_eq!(m.apply(create_volume("v", Some("pod"), MIB)), DONE);
        let v = &m.volumes[&1];
        assert_eq!((v.replicas.clone(), v.primary), (vec![1, 2, 3], 2));
        m.take_touched();
        m
    }

    /// An ISR change computed on the map's current ISR version.
    fn isr(m: &ClusterMap, volume: VolumeId, epoch: Epoch, isr: &[NodeId]) -> MetaCmd {
        let isr_version = m.volumes.get(&volume).map_or(1, |v| v.isr_version);
        MetaCmd::SetVolumeIsr { volume, epoch, isr_version, isr: isr.to_vec() }
    }

    #[test]
    fn the_primary_shrinks_and_grows_its_isr_by_compare_and_set() {
        let mut m = one_volume();
        // Shrink: given in any order, stored sorted.
        assert_eq!(m.apply(isr(&m, 1, 1, &[2, 1])), DONE);
        assert_eq!(m.volumes[&1].isr, vec![1, 2]);
        assert_eq!(m.take_touched(), vec![ObjectKey::Volume(1)]);
        assert_eq!(m.apply(isr(&m, 1, 1, &[1, 2])), SAME);
        assert!(m.take_touched().is_empty());

        let before = m.clone();
        invalid(m.apply(isr(&m, 1, 2, &[1, 2, 3])), "stale primary");
        invalid(m.apply(isr(&m, 1, 1, &[1, 3])), "must contain the primary 2");
        invalid(m.apply(isr(&m, 1, 1, &[2, 4])), "node 4 is not a replica");
        invalid(m.apply(isr(&m, 1, 1, &[2, 2])), "names a node twice");
        assert!(matches!(m.apply(isr(&m, 9, 1, &[2])), MetaReply::NotFound(_)));
        assert_eq!(m, before);
        assert!(m.take_touched().is_empty());

        // Node 3 resyncs, then rejoins: its progress entry goes with the grow.
        let progress = |done| MetaCmd::SetResyncProgress { volume: 1, node: 3, done_bytes: done, total_bytes: MIB };
        assert_eq!(m.apply(progress(4096)), DONE);
        assert_eq!(m.apply(progress(4096)), SAME);
        assert_eq!(m.apply(progress(MIB)), DONE);
        assert_eq!(m.volumes[&1].resync[&3], ResyncProgress { done_bytes: MIB, total_bytes: MIB });
        assert_eq!(m.apply(isr(&m, 1, 1, &[1, 2, 3])), DONE);
        assert_eq!(m.volumes[&1].isr, vec![1, 2, 3]);
        assert!(m.volumes[&1].resync.is_empty());
        assert_eq!(m.volumes[&1].epoch, 1, "an ISR change does not change the epoch");
    }

    #[test]
    fn an_isr_change_computed_on_a_stale_isr_is_refused_and_a_retry_is_a_no_op() {
        let mut m = one_volume();
        assert_eq!(m.volumes[&1].isr_version, 1);
        let shrink = isr(&m, 1, 1, &[1, 2]);
        assert_eq!(m.apply(shrink.clone()), DONE);
        assert_eq!(m.volumes[&1].isr_version, 2);
        // The same proposal again (its first reply was lost): unchanged, no new version.
        assert_eq!(m.apply(shrink.clone()), SAME);
        assert_eq!(m.volumes[&1].isr_version, 2);
        let grow = isr(&m, 1, 1, &[1, 2, 3]);
        assert_eq!(m.apply(grow), DONE);
        assert_eq!(m.volumes[&1].isr_version, 3);
        // The shrink arrives once more, late: it was computed on version 1 and must not undo
        // the grow.
        let before = m.clone();
        invalid(m.apply(shrink), "stale ISR");
        assert_eq!(m, before);
        // A failover moves the version on too.
        let failover = MetaCmd::Failover { volume: 1, epoch: 1, primary: 3, isr: vec![1, 3] };
        assert_eq!(m.apply(failover), DONE);
        assert_eq!(m.volumes[&1].isr_version, 4);
    }

    #[test]
    fn resync_progress_is_only_for_replicas_outside_the_isr() {
        let mut m = one_volume();
        m.apply(isr(&m, 1, 1, &[1, 2]));
        m.take_touched();
        let before = m.clone();
        let progress =
            |node, done, total| MetaCmd::SetResyncProgress { volume: 1, node, done_bytes: done, total_bytes: total };
        invalid(m.apply(progress(1, 0, MIB)), "is in the ISR");
        invalid(m.apply(progress(4, 0, MIB)), "not a replica");
        invalid(m.apply(progress(3, MIB + 1, MIB)), "past the end");
        assert!(matches!(
            m.apply(MetaCmd::SetResyncProgress { volume: 7, node: 3, done_bytes: 0, total_bytes: 0 }),
            MetaReply::NotFound(_)
        ));
        assert_eq!(m, before);
        assert_eq!(m.apply(progress(3, 10, MIB)), DONE);
        assert_eq!(m.apply(MetaCmd::ClearResync { volume: 1, node: 3 }), DONE);
        assert_eq!(m.apply(MetaCmd::ClearResync { volume: 1, node: 3 }), SAME);
        assert!(matches!(m.apply(MetaCmd::ClearResync { volume: 7, node: 3 }), MetaReply::NotFound(_)));
        assert!(m.volumes[&1].resync.is_empty());
    }

    #[test]
    fn a_claim_takes_an_unclaimed_epoch_and_a_second_start_moves_to_the_next() {
        let mut m = one_volume();
        let claim = |epoch, primary, nonce| MetaCmd::ClaimPrimary { volume: 1, epoch, primary, nonce };
        let p = m.volumes[&1].primary;
        let other = if p == 1 { 2 } else { 1 };
        let before = m.clone();
        invalid(m.apply(claim(1, other, 7)), "the claim is stale");
        invalid(m.apply(claim(2, p, 7)), "the claim is stale");
        assert!(matches!(
            m.apply(MetaCmd::ClaimPrimary { volume: 9, epoch: 1, primary: p, nonce: 7 }),
            MetaReply::NotFound(_)
        ));
        assert_eq!(m, before);
        assert!(m.take_touched().is_empty());

        // A new volume's first primary claims epoch 1 as it is.
        assert_eq!(m.apply(claim(1, p, 7)), DONE);
        assert_eq!((m.volumes[&1].epoch, m.volumes[&1].claim), (1, Some(7)));
        assert_eq!(m.take_touched(), vec![ObjectKey::Volume(1)]);
        assert_eq!(m.apply(claim(1, p, 7)), SAME, "a retry changes nothing");

        // The primary grows its ISR at epoch 1; the change is pending when the primary is
        // started again (a lease blip that outlasted the hold time, or a restart): the new
        // start claims with a new nonce and gets epoch 2, same primary, same ISR.
        assert_eq!(m.apply(isr(&m, 1, 1, &[1, 2])), DONE);
        let grow_at_1 = isr(&m, 1, 1, &[1, 2, 3]);
        let isr_before = m.volumes[&1].isr.clone();
        assert_eq!(m.apply(claim(1, p, 8)), DONE);
        let v = &m.volumes[&1];
        assert_eq!((v.epoch, v.primary, v.isr.clone(), v.claim), (2, p, isr_before, Some(8)));
        // The earlier start's change commits late: refused by the epoch (finding 1 of issue 13).
        invalid(m.apply(grow_at_1), "stale primary");
        // The earlier start's claim arrives late too: refused.
        invalid(m.apply(claim(1, p, 7)), "the claim is stale");
        assert_eq!(m.volumes[&1].epoch, 2);

        // A failover leaves the new epoch unclaimed for the new primary.
        let q = *m.volumes[&1].isr.iter().find(|&&n| n != p).expect("another member");
        assert_eq!(m.apply(MetaCmd::Failover { volume: 1, epoch: 2, primary: q, isr: vec![p.min(q), p.max(q)] }), DONE);
        assert_eq!((m.volumes[&1].epoch, m.volumes[&1].claim), (3, None));
        assert_eq!(m.apply(claim(3, q, 9)), DONE);
        assert_eq!((m.volumes[&1].epoch, m.volumes[&1].claim), (3, Some(9)));
    }

    #[test]
    fn failover_picks_from_the_last_committed_isr_and_bumps_the_epoch() {
        let mut m = one_volume();
        let failover =
            |epoch, primary, isr: &[NodeId]| MetaCmd::Failover { volume: 1, epoch, primary, isr: isr.to_vec() };
        m.apply(isr(&m, 1, 1, &[2, 3]));
        m.take_touched();
        let before = m.clone();
        invalid(m.apply(failover(1, 1, &[1])), "not in the last committed ISR");
        invalid(m.apply(failover(1, 3, &[1, 3])), "node 1 is not in the last committed ISR");
        invalid(m.apply(failover(1, 3, &[2])), "must contain the new primary 3");
        invalid(m.apply(failover(2, 3, &[3])), "stale state");
        invalid(m.apply(failover(1, 3, &[3, 3])), "names a node twice");
        assert!(matches!(
            m.apply(MetaCmd::Failover { volume: 5, epoch: 1, primary: 3, isr: vec![3] }),
            MetaReply::NotFound(_)
        ));
        assert_eq!(m, before);
        assert!(m.take_touched().is_empty());

        assert_eq!(m.apply(failover(1, 3, &[3])), DONE);
        let v = &m.volumes[&1];
        assert_eq!((v.primary, v.isr.clone(), v.epoch), (3, vec![3], 2));
        assert_eq!(m.take_touched(), vec![ObjectKey::Volume(1)]);
        // A retry of the same failover changes nothing.
        assert_eq!(m.apply(failover(1, 3, &[3])), SAME);
        assert!(m.take_touched().is_empty());
        // The deposed primary's ISR change carries the old epoch and is refused.
        invalid(m.apply(isr(&m, 1, 1, &[1, 2, 3])), "stale primary");
        // The new primary grows its ISR at the new epoch.
        assert_eq!(m.apply(isr(&m, 1, 2, &[1, 2, 3])), DONE);
        assert_eq!(m.volumes[&1].epoch, 2);
    }

    #[test]
    fn objects_of_datasets_and_volumes_round_trip() {
        let mut m = one_volume();
        m.apply(isr(&m, 1, 1, &[1, 2]));
        m.apply(MetaCmd::SetResyncProgress { volume: 1, node: 3, done_bytes: 1, total_bytes: 2 });
        m.apply(create_volume("w", None, MIB));
        let rebuilt = ClusterMap::from_objects(m.objects()).expect("rebuild");
        assert_eq!(rebuilt, m);
        assert_eq!(rebuilt.next_volume_id, 3);
        // A record stored under another record's key is refused.
        let wrong = vec![(ObjectKey::Volume(9), Object::Volume(m.volumes[&1].clone()))];
        assert!(ClusterMap::from_objects(wrong).is_err());
        let wrong = vec![(ObjectKey::Dataset("x".into()), Object::Dataset(m.datasets["pod"].clone()))];
        assert!(ClusterMap::from_objects(wrong).is_err());
    }

    fn cmd() -> impl Strategy<Value = MetaCmd> {
        let nodes = proptest::collection::vec(1u64..6, 0..4);
        prop_oneof![
            (1u64..6, 0u16..4, "[ab]").prop_map(|(id, p, site)| {
                let mut n = node(id, 7000 + 10 * p);
                n.site = site;
                MetaCmd::RegisterNode(n)
            }),
            ("[pq]|default", proptest::option::of(0u32..6), proptest::option::of("[abc]"))
                .prop_map(|(name, replicas, preferred_site)| MetaCmd::CreateDataset { name, replicas, preferred_site }),
            "[pq]|default".prop_map(|name| MetaCmd::DeleteDataset { name }),
            ("[vw]", proptest::option::of("[pq]|default"), prop_oneof![Just(4096u64), Just(8192), Just(5000)])
                .prop_map(|(name, dataset, size_bytes)| MetaCmd::CreateVolume { name, dataset, size_bytes }),
            "[vw]".prop_map(|name| MetaCmd::DeleteVolume { name }),
            (1u64..4, 1u64..4, 1u64..4, nodes.clone()).prop_map(|(volume, epoch, isr_version, isr)| {
                MetaCmd::SetVolumeIsr { volume, epoch, isr_version, isr }
            }),
            (1u64..4, 1u64..4, 1u64..6, nodes).prop_map(|(volume, epoch, primary, isr)| MetaCmd::Failover {
                volume,
                epoch,
                primary,
                isr
            }),
            (1u64..4, 1u64..6, 0u64..3, 0u64..3).prop_map(|(volume, node, done_bytes, total_bytes)| {
                MetaCmd::SetResyncProgress { volume, node, done_bytes, total_bytes }
            }),
            (1u64..4, 1u64..6).prop_map(|(volume, node)| MetaCmd::ClearResync { volume, node }),
            (1u64..6).prop_map(|id| MetaCmd::RemoveNode { id }),
            ("[a-d]", "[a-z]{0,8}").prop_map(|(key, value)| MetaCmd::PutSetting { key, value }),
            "[a-d]".prop_map(|key| MetaCmd::DeleteSetting { key }),
            (any::<bool>(), any::<bool>()).prop_map(|(data, quic)| MetaCmd::SetTransport {
                layer: if data { Layer::Data } else { Layer::Control },
                kind: if quic { TransportKind::Quic } else { TransportKind::Tcp },
            }),
            ("[hk]", "[ab]").prop_map(|(name, site)| MetaCmd::AddHost { name, site }),
            "[hk]".prop_map(|name| MetaCmd::RemoveHost { name }),
            ("[hk]", "[vw]", any::<bool>()).prop_map(|(host, volume, connect)| if connect {
                MetaCmd::ConnectHost { host, volume }
            } else {
                MetaCmd::DisconnectHost { host, volume }
            }),
            ("[hk]", 0u64..4, "[vw]", 1u64..4).prop_map(|(host, generation, volume, node)| MetaCmd::PublishPaths {
                host,
                generation,
                paths: vec![paths_of(&volume, node)],
            }),
        ]
    }

    fn paths_of(volume: &str, node: NodeId) -> VolumePaths {
        VolumePaths {
            volume: volume.to_string(),
            paths: vec![tandem_paths::PathEntry {
                path: format!("n{node}p0"),
                node,
                address: format!("127.0.0.1:{}", 9000 + node).parse().expect("addr"),
                state: tandem_paths::PathState::ActiveOptimized,
                reason: "primary".into(),
            }],
        }
    }

    #[test]
    fn hosts_connect_to_volumes_and_path_maps_publish_by_generation() {
        let mut m = two_sites();
        m.apply(create_volume("v", None, 4096));
        let add = |name: &str, site: &str| MetaCmd::AddHost { name: name.into(), site: site.into() };
        assert_eq!(m.apply(add("h1", "a")), MetaReply::Done { changed: true });
        assert_eq!(m.apply(add("h1", "a")), MetaReply::Done { changed: false });
        assert_eq!(m.apply(add("h1", "b")), MetaReply::Done { changed: true });
        invalid(m.apply(add("bad name", "a")), "host name");
        let connect = |host: &str, volume: &str| MetaCmd::ConnectHost { host: host.into(), volume: volume.into() };
        assert!(matches!(m.apply(connect("h1", "nope")), MetaReply::NotFound(e) if e.contains("no volume named")));
        assert!(matches!(m.apply(connect("h9", "v")), MetaReply::NotFound(e) if e.contains("no host named")));
        assert_eq!(m.apply(connect("h1", "v")), MetaReply::Done { changed: true });
        assert_eq!(m.apply(connect("h1", "v")), MetaReply::Done { changed: false });
        let id = m.volume_by_name("v").expect("v").id;
        assert!(m.hosts["h1"].volumes.contains(&id));

        // Generations go up by one, never skip, never repeat with other content.
        let publish = |generation: u64, node: NodeId| MetaCmd::PublishPaths {
            host: "h1".into(),
            generation,
            paths: vec![paths_of("v", node)],
        };
        invalid(m.apply(publish(2, 1)), "generation 0");
        assert_eq!(m.apply(publish(1, 1)), MetaReply::Done { changed: true });
        assert_eq!(m.apply(publish(1, 1)), MetaReply::Done { changed: false }, "a retry");
        invalid(m.apply(publish(1, 2)), "stale");
        assert_eq!(m.apply(publish(2, 2)), MetaReply::Done { changed: true });
        assert_eq!(m.hosts["h1"].generation, 2);
        let huge = MetaCmd::PublishPaths {
            host: "h1".into(),
            generation: 3,
            paths: (0..HOST_VOLUMES_MAX + 1).map(|i| paths_of(&format!("v{i}"), 1)).collect(),
        };
        invalid(m.apply(huge), "exceeds");
        assert_eq!(m.hosts["h1"].generation, 2, "a refused publication changes nothing");

        // Deleting the volume disconnects it; removing the host forgets it.
        assert_eq!(m.apply(MetaCmd::DeleteVolume { name: "v".into() }), MetaReply::Done { changed: true });
        assert!(m.hosts["h1"].volumes.is_empty());
        assert_eq!(m.apply(MetaCmd::RemoveHost { name: "h1".into() }), MetaReply::Done { changed: true });
        assert!(matches!(m.apply(MetaCmd::RemoveHost { name: "h1".into() }), MetaReply::NotFound(_)));
    }

    #[test]
    fn a_node_advertises_its_target_ports_once_each() {
        let mut m = ClusterMap::default();
        let mut n = node(1, 7000);
        n.extra_nbd_addrs = vec!["127.0.0.1:7100".parse().expect("addr")];
        assert_eq!(n.targets().len(), 2);
        assert_eq!(m.apply(MetaCmd::RegisterNode(n.clone())), MetaReply::Done { changed: true });
        n.extra_nbd_addrs.push(n.nbd_addr);
        invalid(m.apply(MetaCmd::RegisterNode(n.clone())), "twice");
        n.extra_nbd_addrs = (0..EXTRA_TARGETS_MAX as u16 + 1)
            .map(|i| format!("127.0.0.1:{}", 8000 + i).parse().expect("addr"))
            .collect();
        invalid(m.apply(MetaCmd::RegisterNode(n)), "extra NBD addresses");
    }

    proptest! {
        /// Replaying the same commands gives the same map (determinism), and rebuilding a map
        /// from its objects — what a snapshot install and a restart do — reproduces it exactly.
        #[test]
        fn objects_reproduce_the_map(cmds in proptest::collection::vec(cmd(), 0..60)) {
            let mut a = ClusterMap::default();
            let mut b = ClusterMap::default();
            for c in &cmds {
                prop_assert_eq!(a.apply(c.clone()), b.apply(c.clone()));
            }
            prop_assert_eq!(&a, &b);
            let rebuilt = ClusterMap::from_objects(a.objects()).expect("rebuild");
            prop_assert_eq!(&rebuilt, &a);
        }

        /// Persisting only the touched keys after each command keeps a stored copy equal to the
        /// map: what the state machine does between snapshots.
        /// Whatever the commands, every volume keeps its shape (ISR a sorted subset of the
        /// replicas holding the primary, epoch ≥ 1), every volume's dataset exists, every
        /// replica is a node in the map, and a refused command changes nothing.
        #[test]
        fn random_commands_keep_the_volume_invariants(cmds in proptest::collection::vec(cmd(), 0..80)) {
            let mut m = ClusterMap::default();
            for c in cmds {
                let before = m.clone();
                let reply = m.apply(c.clone());
                if matches!(reply, MetaReply::Invalid(_) | MetaReply::NotFound(_)) {
                    prop_assert_eq!(&m, &before, "refused {:?} changed the map", c);
                }
                if reply == (MetaReply::Done { changed: false }) {
                    prop_assert_eq!(&m, &before, "{:?} claimed no change", c);
                }
                for v in m.volumes.values() {
                    v.assert_shape();
                    prop_assert!(m.datasets.contains_key(&v.dataset));
                    prop_assert!(v.replicas.iter().all(|r| m.nodes.contains_key(r)));
                    prop_assert!(v.id < m.next_volume_id);
                }
                for d in m.datasets.values() {
                    prop_assert!(is_sorted_set(&d.replicas) && !d.replicas.is_empty());
                    prop_assert!(d.replicas.iter().all(|r| m.nodes.contains_key(r)));
                }
                let names: BTreeSet<&str> = m.volumes.values().map(|v| v.name.as_str()).collect();
                prop_assert_eq!(names.len(), m.volumes.len());
            }
        }

        #[test]
        fn touched_keys_keep_a_store_in_step(cmds in proptest::collection::vec(cmd(), 0..60)) {
            let mut m = ClusterMap::default();
            let mut store: BTreeMap<ObjectKey, Object> = BTreeMap::new();
            for c in cmds {
                m.apply(c);
                for key in m.take_touched() {
                    match m.object(&key) {
                        Some(obj) => { store.insert(key, obj); }
                        None => { store.remove(&key); }
                    }
                }
                let rebuilt = ClusterMap::from_objects(store.clone()).expect("rebuild");
                prop_assert_eq!(&rebuilt, &m);
            }
        }
    }
}
