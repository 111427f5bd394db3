//! The [`ClusterMap`] itself: the state every node agrees on, and what counts as equal state.
//! The commands that change it live with the records they change (`nodes.rs`, `datasets.rs`,
//! `volumes.rs`, `hosts.rs`); `apply.rs` dispatches to them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tandem_types::{Layer, NodeId, TransportKind, VolumeId};

use crate::key::ObjectKey;
use crate::{DatasetRecord, HostRecord, NodeRecord, VolumeRecord};

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
    pub(crate) touched: Vec<ObjectKey>,
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
            touched: Vec::new(),
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
    }
}

impl Eq for ClusterMap {}
