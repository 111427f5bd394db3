//! The [`ClusterMap`] itself: the state every node agrees on, and what counts as equal state.
//! The commands that change it live with the records they change (`nodes.rs`, `datasets.rs`,
//! `volumes.rs`, `hosts.rs`); `apply.rs` dispatches to them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use tandem_reservations::Reservations;
use tandem_types::{Layer, NodeId, TransportKind, VolumeId};

use crate::key::ObjectKey;
use crate::{DatasetRecord, HostRecord, NodeRecord, TokenRecord, VolumeRecord};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "MapState")]
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
    /// The persistent reservations of the volumes that have any (`reservations.rs`).
    pub reservations: BTreeMap<VolumeId, Reservations>,
    /// Copy tokens by id (`copies.rs`).
    pub tokens: BTreeMap<VolumeId, TokenRecord>,
    /// Keys changed since the last [`ClusterMap::take_touched`]; not part of the state.
    #[serde(skip)]
    pub(crate) touched: Vec<ObjectKey>,
    /// Lookups derived from the state, kept up to date by every command; not part of the state.
    #[serde(skip)]
    pub(crate) index: Index,
}

/// What the map derives from its state so that no command has to scan every volume or host:
/// a volume by name, and the hosts that reach a volume.
#[derive(Clone, Debug, Default)]
pub(crate) struct Index {
    pub(crate) volume_by_name: HashMap<String, VolumeId>,
    pub(crate) hosts_of_volume: HashMap<VolumeId, BTreeSet<String>>,
}

impl Index {
    fn build(volumes: &BTreeMap<VolumeId, VolumeRecord>, hosts: &BTreeMap<String, HostRecord>) -> Index {
        let mut index = Index {
            volume_by_name: volumes.values().map(|v| (v.name.clone(), v.id)).collect(),
            hosts_of_volume: HashMap::new(),
        };
        for h in hosts.values() {
            for v in &h.volumes {
                index.hosts_of_volume.entry(*v).or_default().insert(h.name.clone());
            }
        }
        index
    }

    pub(crate) fn connect(&mut self, host: &str, volume: VolumeId) {
        self.hosts_of_volume.entry(volume).or_default().insert(host.to_string());
    }

    pub(crate) fn disconnect(&mut self, host: &str, volume: VolumeId) {
        if let Some(hosts) = self.hosts_of_volume.get_mut(&volume) {
            hosts.remove(host);
            if hosts.is_empty() {
                self.hosts_of_volume.remove(&volume);
            }
        }
    }
}

/// The state as it is encoded (snapshots): the map without what it derives.
#[derive(Deserialize)]
struct MapState {
    nodes: BTreeMap<NodeId, NodeRecord>,
    settings: BTreeMap<String, String>,
    transport: BTreeMap<Layer, TransportKind>,
    datasets: BTreeMap<String, DatasetRecord>,
    volumes: BTreeMap<VolumeId, VolumeRecord>,
    next_volume_id: VolumeId,
    hosts: BTreeMap<String, HostRecord>,
    reservations: BTreeMap<VolumeId, Reservations>,
    tokens: BTreeMap<VolumeId, TokenRecord>,
}

impl From<MapState> for ClusterMap {
    fn from(s: MapState) -> ClusterMap {
        let index = Index::build(&s.volumes, &s.hosts);
        ClusterMap {
            nodes: s.nodes,
            settings: s.settings,
            transport: s.transport,
            datasets: s.datasets,
            volumes: s.volumes,
            next_volume_id: s.next_volume_id,
            hosts: s.hosts,
            reservations: s.reservations,
            tokens: s.tokens,
            touched: Vec::new(),
            index,
        }
    }
}

impl ClusterMap {
    /// Rebuilds what the map derives from its state (after the state was loaded piecewise).
    pub(crate) fn reindex(&mut self) {
        self.index = Index::build(&self.volumes, &self.hosts);
    }

    /// The hosts connected to volume `id`, by name.
    pub fn hosts_of_volume(&self, id: VolumeId) -> impl Iterator<Item = &String> {
        self.index.hosts_of_volume.get(&id).into_iter().flatten()
    }
}

impl Default for ClusterMap {
    fn default() -> ClusterMap {
        ClusterMap {
            nodes: BTreeMap::new(),
            settings: BTreeMap::new(),
            transport: BTreeMap::new(),
            datasets: BTreeMap::new(),
            volumes: BTreeMap::new(),
            next_volume_id: VolumeId(1),
            hosts: BTreeMap::new(),
            reservations: BTreeMap::new(),
            tokens: BTreeMap::new(),
            touched: Vec::new(),
            index: Index::default(),
        }
    }
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
            && self.reservations == other.reservations
            && self.tokens == other.tokens
    }
}

impl Eq for ClusterMap {}
