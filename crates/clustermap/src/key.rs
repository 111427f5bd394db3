//! The name of each persisted object of the map, and its byte encoding as a store key.

use tandem_types::{Layer, NodeId, VolumeId};

/// The name of one persisted object of the map. The state machine stores each object under its
/// key, so an applied command rewrites only what it touched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Node(NodeId),
    Setting(String),
    Transport(Layer),
    Dataset(String),
    Volume(VolumeId),
    /// The counter of the next volume id (`ClusterMap::next_volume_id`).
    NextVolumeId,
    Host(String),
    /// A volume's persistent reservations (absent while it has none).
    Reservations(VolumeId),
    /// A copy token (`copies.rs`), by id.
    Token(VolumeId),
}

impl ObjectKey {
    const NODE: &'static str = "node/";
    const SETTING: &'static str = "setting/";
    const TRANSPORT: &'static str = "transport/";
    const DATASET: &'static str = "dataset/";
    const VOLUME: &'static str = "volume/";
    const NEXT_VOLUME_ID: &'static str = "counter/next_volume_id";
    const HOST: &'static str = "host/";
    const RESERVATIONS: &'static str = "reservations/";
    const TOKEN: &'static str = "token/";

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
            ObjectKey::Reservations(id) => format!("{}{id:020}", Self::RESERVATIONS).into_bytes(),
            ObjectKey::Token(id) => format!("{}{id:020}", Self::TOKEN).into_bytes(),
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
        if let Some(id) = s.strip_prefix(Self::RESERVATIONS) {
            return id.parse().ok().map(ObjectKey::Reservations);
        }
        if let Some(id) = s.strip_prefix(Self::TOKEN) {
            return id.parse().ok().map(ObjectKey::Token);
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
