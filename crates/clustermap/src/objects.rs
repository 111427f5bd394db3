//! The map as persisted objects: one [`ObjectKey`] and [`Object`] per record, the keys an applied
//! command touched, and the rebuild of a map from stored objects (snapshot install, restart).

use serde::{Deserialize, Serialize};
use tandem_types::{TransportKind, VolumeId};

use crate::key::ObjectKey;
use crate::map::ClusterMap;
use tandem_reservations::Reservations;

use crate::{DatasetRecord, HostRecord, NodeRecord, TokenRecord, VolumeRecord};

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
    Reservations(Reservations),
    Token(TokenRecord),
}

impl ClusterMap {
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
            ObjectKey::Reservations(id) => self.reservations.get(id).cloned().map(Object::Reservations),
            ObjectKey::Token(id) => self.tokens.get(id).cloned().map(Object::Token),
        }
    }

    /// How many objects the map holds (what [`ClusterMap::objects`] would list), without listing them.
    pub fn object_count(&self) -> usize {
        self.nodes.len()
            + self.settings.len()
            + self.transport.len()
            + self.datasets.len()
            + self.volumes.len()
            + 1
            + self.hosts.len()
            + self.reservations.len()
            + self.tokens.len()
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
        let reservations =
            self.reservations.iter().map(|(id, r)| (ObjectKey::Reservations(*id), Object::Reservations(r.clone())));
        let tokens = self.tokens.iter().map(|(id, t)| (ObjectKey::Token(*id), Object::Token(t.clone())));
        nodes
            .chain(settings)
            .chain(transport)
            .chain(datasets)
            .chain(volumes)
            .chain(counter)
            .chain(hosts)
            .chain(reservations)
            .chain(tokens)
            .collect()
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
                (ObjectKey::Reservations(id), Object::Reservations(r)) => {
                    map.reservations.insert(id, r);
                }
                (ObjectKey::Token(id), Object::Token(t)) if t.id == id => {
                    map.tokens.insert(id, t);
                }
                (key, _) => return Err(format!("object stored under {key:?} has the wrong kind or id")),
            }
        }
        map.reindex();
        Ok(map)
    }
}
