//! Nodes, settings and the transport policy: the node records (addresses, site, target ports),
//! the commands that register and remove nodes, the cluster-wide settings, and which network
//! layer each traffic layer uses.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tandem_types::{validate_name, Layer, NodeId, TransportKind, SETTING_VALUE_BYTES_MAX};

use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::MetaReply;

/// Extra target ports (NBD addresses besides `nbd_addr`) a node may advertise.
pub const EXTRA_TARGETS_MAX: usize = 7;

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
    /// The node's iSCSI portal (RFC 7143 target address), when it serves iSCSI. Its target
    /// portal group tag is the node id.
    #[serde(default)]
    pub iscsi_addr: Option<SocketAddr>,
}

impl NodeRecord {
    pub fn validate(&self) -> Result<(), String> {
        if self.id == NodeId(0) {
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
        if let Some(portal) = self.iscsi_addr {
            if portal.port() == 0 || unique.contains(&portal) {
                return Err(format!("node {}: iSCSI address {portal} needs a port of its own", self.id));
            }
        }
        Ok(())
    }

    /// Every target port of the node, `nbd_addr` first: port `i` of the node is path `n{id}p{i}`.
    pub fn targets(&self) -> Vec<SocketAddr> {
        std::iter::once(self.nbd_addr).chain(self.extra_nbd_addrs.iter().copied()).collect()
    }
}

impl ClusterMap {
    pub(crate) fn register_node(&mut self, rec: NodeRecord) -> MetaReply {
        if let Err(e) = rec.validate() {
            return MetaReply::Invalid(e);
        }
        if let Some(other) = self.nodes.values().find(|n| n.id != rec.id && n.raft_addr == rec.raft_addr) {
            return MetaReply::Invalid(format!("raft address {} is already used by node {}", rec.raft_addr, other.id));
        }
        let id = rec.id;
        let changed = self.nodes.get(&id) != Some(&rec);
        if changed {
            self.nodes.insert(id, rec);
            self.touched.push(ObjectKey::Node(id));
        }
        MetaReply::Done { changed }
    }

    pub(crate) fn remove_node(&mut self, id: NodeId) -> MetaReply {
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

    pub(crate) fn put_setting(&mut self, key: String, value: String) -> MetaReply {
        if let Err(e) = validate_name(&key) {
            return MetaReply::Invalid(format!("setting name {key:?} {e}"));
        }
        if value.len() > SETTING_VALUE_BYTES_MAX {
            return MetaReply::Invalid(format!(
                "setting value of {} bytes exceeds {SETTING_VALUE_BYTES_MAX} bytes",
                value.len()
            ));
        }
        if key == crate::ACCESS_SETTING {
            if let Err(e) = value.parse::<crate::AccessPolicy>() {
                return MetaReply::Invalid(e);
            }
        }
        let changed = self.settings.get(&key) != Some(&value);
        if changed {
            self.touched.push(ObjectKey::Setting(key.clone()));
            self.settings.insert(key, value);
        }
        MetaReply::Done { changed }
    }

    pub(crate) fn cas_setting(&mut self, key: String, expect: Option<String>, value: String) -> MetaReply {
        let current = self.settings.get(&key);
        if current != expect.as_ref() {
            return MetaReply::Conflict(match current {
                Some(v) => format!("setting {key:?} holds {v:?}"),
                None => format!("no setting named {key:?}"),
            });
        }
        self.put_setting(key, value)
    }

    pub(crate) fn delete_setting(&mut self, key: String) -> MetaReply {
        if self.settings.remove(&key).is_none() {
            return MetaReply::NotFound(format!("no setting named {key:?}"));
        }
        self.touched.push(ObjectKey::Setting(key));
        MetaReply::Done { changed: true }
    }

    pub(crate) fn set_transport(&mut self, layer: Layer, kind: TransportKind) -> MetaReply {
        let changed = self.transport.insert(layer, kind) != Some(kind);
        if changed {
            self.touched.push(ObjectKey::Transport(layer));
        }
        MetaReply::Done { changed }
    }
}
