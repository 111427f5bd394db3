//! The cluster map: the replicated state that every node agrees on, and the commands that
//! change it. This is pure logic: [`ClusterMap::apply`] takes a command and returns a reply; it
//! does no I/O, reads no clock and knows nothing of Raft. The openraft adapter
//! (`state_machine.rs`) calls it for every committed entry, on every node, in log order, so it
//! must be deterministic: the same commands give the same map everywhere.
//!
//! Later capabilities add their objects (datasets, volumes, hosts, reservations, tokens) as new
//! fields, new [`ObjectKey`] variants and new commands; the persistence and snapshot code keys
//! everything by `ObjectKey` and needs no change for that.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tandem_transport::{Layer, TransportKind};
use tandem_types::{validate_name, NodeId, SETTING_VALUE_BYTES_MAX};

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
    /// Hosts attach volumes here over NBD.
    pub nbd_addr: SocketAddr,
}

impl NodeRecord {
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("node id must be at least 1".into());
        }
        validate_name(&self.site).map_err(|e| format!("site {:?} {e}", self.site))
    }
}

/// A command proposed through Raft. Commands carry complete values (never "increment"), so
/// re-applying a command that a client retried after a lost reply leaves the same state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCmd {
    /// Adds a node's record, or replaces it (new addresses, new site).
    RegisterNode(NodeRecord),
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
}

impl ObjectKey {
    const NODE: &'static str = "node/";
    const SETTING: &'static str = "setting/";
    const TRANSPORT: &'static str = "transport/";

    pub fn encode(&self) -> Vec<u8> {
        match self {
            // Fixed width, so sled's byte order is numeric order.
            ObjectKey::Node(id) => format!("{}{id:020}", Self::NODE).into_bytes(),
            ObjectKey::Setting(k) => format!("{}{k}", Self::SETTING).into_bytes(),
            ObjectKey::Transport(l) => format!("{}{l}", Self::TRANSPORT).into_bytes(),
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
        s.strip_prefix(Self::SETTING).map(|k| ObjectKey::Setting(k.to_string()))
    }
}

/// One object's value, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    Node(NodeRecord),
    Setting(String),
    Transport(TransportKind),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterMap {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub settings: BTreeMap<String, String>,
    /// The network layer per traffic layer; a layer not set here uses the config's default.
    pub transport: BTreeMap<Layer, TransportKind>,
    /// Keys changed since the last [`ClusterMap::take_touched`]; not part of the state.
    #[serde(skip)]
    touched: Vec<ObjectKey>,
}

/// Equality of the state; the bookkeeping of touched keys is not state.
impl PartialEq for ClusterMap {
    fn eq(&self, other: &Self) -> bool {
        self.nodes == other.nodes && self.settings == other.settings && self.transport == other.transport
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
                if self.nodes.remove(&id).is_none() {
                    return MetaReply::NotFound(format!("node {id} is not in the cluster map"));
                }
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
        }
    }

    /// Every object, for a full rewrite (snapshot install).
    pub fn objects(&self) -> Vec<(ObjectKey, Object)> {
        let nodes = self.nodes.iter().map(|(id, n)| (ObjectKey::Node(*id), Object::Node(n.clone())));
        let settings = self.settings.iter().map(|(k, v)| (ObjectKey::Setting(k.clone()), Object::Setting(v.clone())));
        let transport = self.transport.iter().map(|(l, k)| (ObjectKey::Transport(*l), Object::Transport(*k)));
        nodes.chain(settings).chain(transport).collect()
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
        ] {
            assert_eq!(ObjectKey::decode(&key.encode()), Some(key));
        }
        assert!(ObjectKey::Node(2).encode() < ObjectKey::Node(10).encode());
        assert_eq!(ObjectKey::decode(b"junk"), None);
        assert_eq!(ObjectKey::decode(b"node/x"), None);
    }

    fn cmd() -> impl Strategy<Value = MetaCmd> {
        prop_oneof![
            (1u64..6, 0u16..4, "[ab]").prop_map(|(id, p, site)| {
                let mut n = node(id, 7000 + 10 * p);
                n.site = site;
                MetaCmd::RegisterNode(n)
            }),
            (1u64..6).prop_map(|id| MetaCmd::RemoveNode { id }),
            ("[a-d]", "[a-z]{0,8}").prop_map(|(key, value)| MetaCmd::PutSetting { key, value }),
            "[a-d]".prop_map(|key| MetaCmd::DeleteSetting { key }),
            (any::<bool>(), any::<bool>()).prop_map(|(data, quic)| MetaCmd::SetTransport {
                layer: if data { Layer::Data } else { Layer::Control },
                kind: if quic { TransportKind::Quic } else { TransportKind::Tcp },
            }),
        ]
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
