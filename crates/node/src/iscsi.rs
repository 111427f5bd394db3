//! The node's iSCSI portal: every volume of the cluster as a target (one target per volume,
//! LUN 0), named and identified the same on every node, with ALUA states from the cluster map.
//!
//! - Names: `iqn.2026-12.io.tandem:<cluster>:<volume>`. One target per volume rather than one
//!   target with a LUN per volume: a host logs in to exactly the volumes it uses (and, with
//!   access control, is allowed), a volume's sessions come and go with it, and REPORT LUNS
//!   never changes under a running session.
//! - Identity: NAA type 3 (locally assigned) from the cluster name and the volume id, and a
//!   serial made from it, so every node reports the same disk and multipath stacks (dm-multipath,
//!   ESXi, MPIO) see one device with one path per node. A deleted and re-created volume gets a
//!   new id, and so a new identity.
//! - Ports: the node's portal is target port group `node id` with one port, relative port
//!   `node id`; its target portal group tag is the node id too.
//! - ALUA: the state of each group comes from the host's published path map when the initiator
//!   is a known host (`tandem host add NAME --iqn IQN`) and the volume is connected to it; for
//!   any other initiator, from the volume record alone (the committed primary active-optimized,
//!   in-sync replicas active-non-optimized, replicas being resynced unavailable). A path the
//!   map names active-optimized that is not yet the claimed primary is `transitioning`: a
//!   failover is on its way. A node that holds no replica still proxies I/O to the primary
//!   (as for NBD): active-non-optimized. Every session follows the committed map; a change
//!   reaches it as ASYMMETRIC ACCESS STATE CHANGED on its next command.
//!
//! Access: an initiator name that belongs to a host (`tandem host add --iqn`) is that host, and
//! discovers and logs in to only the volumes connected to it (LUN masking, as for NBD: the same
//! rule, `ClusterMap::may_open`); any other initiator is anonymous, which the access policy
//! allows everything (`open`, `tls`) or nothing (`tls-required`). A host with CHAP settings
//! must authenticate with CHAP (mutual when it has a target secret); under `tls-required`
//! every initiator must. A session ends when its host loses access to the volume.

use std::sync::Arc;
use std::time::Duration;

use tandem_clustermap::{AccessPolicy, ClusterMap, HostRecord, VolumeRecord};
use tandem_frontend::{Exports, OpenError, Peer};
use tandem_iscsi::server::{Lun, Targets};
use tandem_iscsi::ChapCredentials;
use tandem_iscsi::DiscoveryTarget;
use tandem_meta::store::MetaStore;
use tandem_paths::PathState;
use tandem_scsi::alua::{AccessState, PortGroup};
use tandem_scsi::lu::{Access, Geometry, Identity, Limits, LogicalUnit, Port, Provisioning};
use tandem_transport::Transport;
use tandem_types::{NodeId, VolumeId};
use tandem_wire::data::{ProbeMsg, ProbeReply};
use tokio::sync::watch;

use crate::probe::probe_call;
use crate::security::ClusterSecret;
use crate::volumes::{ExportedVolume, VolumeExports};

/// The naming authority of every Tandem target name (RFC 3720 §3.2.6.3.1: `iqn.` + the month
/// and the reversed domain of the naming authority).
pub const IQN_PREFIX: &str = "iqn.2026-12.io.tandem";
/// REPORT TARGET PORT GROUPS' implicit transition time: how long a host should wait for a
/// `transitioning` group before it counts the path as failed (a failover takes a few seconds).
pub const TRANSITION_TIME_S: u8 = 30;

/// The target name of `volume` in `cluster`.
pub fn target_name(cluster: &str, volume: &str) -> String {
    format!("{IQN_PREFIX}:{cluster}:{volume}")
}

/// The volume a target name of `cluster` names, if it is one.
pub fn volume_of<'a>(cluster: &str, target: &'a str) -> Option<&'a str> {
    target.strip_prefix(IQN_PREFIX)?.strip_prefix(':')?.strip_prefix(cluster)?.strip_prefix(':')
}

/// The NAA identifier of a volume: type 3 (locally assigned) over 28 bits of the cluster
/// name's hash and the volume id's low 32 bits.
pub fn naa(cluster: &str, volume: VolumeId) -> u64 {
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0x3 << 60) | ((hash & 0x0FFF_FFFF) << 32) | (volume.0 & 0xFFFF_FFFF)
}

/// How long a reset waits for each other node to say its sessions will hear of it. A node that
/// does not answer in time is down or cut off; its sessions are then lost to the host anyway.
const RESET_NOTICE_WAIT: Duration = Duration::from_secs(2);

/// The node's portal: what it serves as [`Targets`].
pub struct Portal {
    pub me: NodeId,
    pub cluster: String,
    pub meta: Arc<MetaStore>,
    pub exports: Arc<VolumeExports>,
    /// The node-to-node transport: resets are told to the other nodes over it.
    pub transport: Arc<dyn Transport>,
    /// Opens the hosts' CHAP secrets, which Raft holds sealed.
    pub secret: Arc<ClusterSecret>,
}

fn peer_of(initiator: &str) -> Peer {
    Peer { initiator: Some(initiator.to_string()), ..Peer::default() }
}

/// This node's relative target port identifier (and target port group): its id.
pub(crate) fn port_of(node: NodeId) -> u16 {
    u16::try_from(node.0).unwrap_or(u16::MAX)
}

/// A host's CHAP settings with their secrets opened; `None` if it has none or they cannot be
/// opened (sealed with another cluster secret), which fails its logins.
pub fn chap_of(secret: &ClusterSecret, host: &HostRecord) -> Option<ChapCredentials> {
    let c = host.chap.as_ref()?;
    let opened = secret.open(&host.name, &c.secret);
    if opened.is_none() {
        tracing::warn!(host = %host.name, "the host's CHAP secret does not open with this node's cluster secret");
    }
    let mutual = match (&c.target_user, &c.target_secret) {
        (Some(u), Some(s)) => Some((u.clone(), secret.open(&host.name, s)?)),
        _ => None,
    };
    Some(ChapCredentials { user: c.user.clone(), secret: opened?, mutual })
}

/// The access state of each group of `volume` (by node), as the initiator `initiator` sees it.
pub fn access_for(map: &ClusterMap, me: NodeId, volume: &VolumeRecord, initiator: &str) -> Access {
    let host = map.host_by_iqn(initiator).filter(|h| h.volumes.contains(&volume.id));
    let published = host.and_then(|h| h.paths.iter().find(|p| p.volume == volume.name));
    let groups: Vec<PortGroup> = map
        .nodes
        .values()
        .filter(|n| n.iscsi_addr.is_some())
        .map(|n| {
            let state = match published {
                Some(paths) => {
                    // The best of the node's NBD ports: the portal reaches the same node.
                    let best = paths.paths.iter().filter(|p| p.node == n.id).map(|p| p.state).min();
                    match best {
                        Some(state) => group_state(state, n.id, volume),
                        None => AccessState::ActiveNonOptimized,
                    }
                }
                None => default_state(n.id, volume),
            };
            let id = port_of(n.id);
            PortGroup { id, state, ports: vec![id] }
        })
        .collect();
    let mine = port_of(me);
    let state = groups.iter().find(|g| g.id == mine).map_or(AccessState::ActiveNonOptimized, |g| g.state);
    Access { state, groups, transition_time_s: TRANSITION_TIME_S }
}

/// A path-map state as the ALUA state of a node's group.
fn group_state(state: PathState, node: NodeId, volume: &VolumeRecord) -> AccessState {
    match state {
        PathState::ActiveOptimized if node == volume.primary && volume.claim.is_some() => AccessState::ActiveOptimized,
        PathState::ActiveOptimized => AccessState::Transitioning,
        PathState::ActiveNonOptimized => AccessState::ActiveNonOptimized,
        PathState::Unavailable => AccessState::Unavailable,
    }
}

/// The state of a node's group from the volume record alone.
fn default_state(node: NodeId, volume: &VolumeRecord) -> AccessState {
    if node == volume.primary {
        if volume.claim.is_some() {
            AccessState::ActiveOptimized
        } else {
            AccessState::Transitioning
        }
    } else if volume.isr.contains(&node) || !volume.replicas.contains(&node) {
        AccessState::ActiveNonOptimized
    } else {
        AccessState::Unavailable
    }
}

impl Portal {
    /// The logical unit `volume` is through this node's port.
    fn unit(&self, volume: &VolumeRecord, target: &str) -> LogicalUnit {
        let naa = naa(&self.cluster, volume.id);
        let port_id = port_of(self.me);
        LogicalUnit {
            identity: Identity::tandem(naa, format!("{naa:016x}")),
            port: Port { relative_port: port_id, group: port_id, name: format!("{target},t,0x{port_id:04x}") },
            geometry: Geometry { blocks: volume.size_bytes / 512, ..Geometry::default() },
            limits: Limits::default(),
            // Unmapped blocks are written as zeroes on every replica.
            provisioning: Provisioning { thin: true, unmapped_reads_zero: true },
            read_only: volume.read_only(),
        }
    }

    /// Follows the committed map for one session: the access state of `volume` for
    /// `initiator`, sent whenever it changes, until the session ends.
    fn follow_access(&self, volume: VolumeId, initiator: String) -> watch::Receiver<Access> {
        let (me, meta) = (self.me, self.meta.clone());
        let compute = move |map: &ClusterMap| match map.volumes.get(&volume) {
            Some(v) => access_for(map, me, v, &initiator),
            // The volume was deleted: nothing may be served any more.
            None => {
                Access { state: AccessState::Unavailable, groups: Vec::new(), transition_time_s: TRANSITION_TIME_S }
            }
        };
        let (tx, rx) = watch::channel(meta.local_read(|st| compute(&st.map)));
        tokio::spawn(async move {
            let mut applied = meta.subscribe();
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    changed = applied.changed() => if changed.is_err() { return },
                }
                let access = meta.local_read(|st| compute(&st.map));
                tx.send_if_modified(|current| {
                    let modified = *current != access;
                    *current = access;
                    modified
                });
            }
        });
        rx
    }
}

impl Targets for Portal {
    type Volume = ExportedVolume;

    fn discovery(&self, initiator: &str) -> Vec<DiscoveryTarget> {
        let visible = self.exports.visible(&peer_of(initiator));
        let portals: Vec<String> = self.meta.local_read(|st| {
            st.map.nodes.values().filter_map(|n| n.iscsi_addr.map(|addr| format!("{addr},{}", n.id))).collect()
        });
        visible
            .iter()
            .map(|name| DiscoveryTarget { name: target_name(&self.cluster, name), addresses: portals.clone() })
            .collect()
    }

    fn chap(&self, initiator: &str) -> Option<ChapCredentials> {
        self.meta.local_read(|st| st.map.host_by_iqn(initiator).and_then(|h| chap_of(&self.secret, h)))
    }

    fn chap_required(&self) -> bool {
        self.exports.policy() == AccessPolicy::TlsRequired
    }

    fn allowed(&self, target: &str, initiator: &str) -> bool {
        let Some(name) = volume_of(&self.cluster, target) else { return false };
        match self.exports.decide(name, &peer_of(initiator)) {
            Ok(_) => true,
            Err(e) => {
                tracing::info!(%initiator, %target, error = %e, "iSCSI login refused");
                false
            }
        }
    }

    fn exists(&self, target: &str) -> bool {
        volume_of(&self.cluster, target)
            .is_some_and(|name| self.meta.local_read(|st| st.map.volume_by_name(name).is_some()))
    }

    async fn open(
        &self,
        target: &str,
        initiator: &str,
        initiator_port: &str,
    ) -> Result<Lun<ExportedVolume>, OpenError> {
        let name = volume_of(&self.cluster, target).ok_or_else(|| OpenError::NotFound(target.to_string()))?;
        let record = self
            .meta
            .local_read(|st| st.map.volume_by_name(name).cloned())
            .ok_or_else(|| OpenError::NotFound(format!("no volume named {name:?}")))?;
        // The session is one I_T nexus: its initiator port through this node's target port.
        // ALL_TG_PT registrations reach every node's port.
        let peer = Peer {
            initiator_port: Some(initiator_port.to_string()),
            target_port: port_of(self.me),
            ..peer_of(initiator)
        };
        let volume = self.exports.open(name, &peer).await?;
        let unit = self.unit(&record, target);
        let access = self.follow_access(record.id, initiator.to_string());
        Ok(Lun { volume, unit, access })
    }

    /// Tells every other node (in parallel, each within [`RESET_NOTICE_WAIT`]), so that the
    /// host's sessions through them get the reset's unit attention too, as SAM-5 asks of every
    /// I_T nexus of the logical unit.
    async fn reset(&self, target: &str) {
        let others: Vec<NodeId> =
            self.meta.local_read(|st| st.map.nodes.keys().copied().filter(|&n| n != self.me).collect());
        let msg = ProbeMsg::LunReset { target: target.to_string() };
        let calls = others.into_iter().map(|node| {
            let msg = &msg;
            async move {
                match probe_call(&*self.transport, node, msg, RESET_NOTICE_WAIT).await {
                    Ok(ProbeReply::Accepted) => {}
                    Ok(other) => {
                        tracing::warn!(%node, %target, answer = ?other, "a node did not take the reset notice")
                    }
                    Err(e) => tracing::warn!(%node, %target, error = %e, "a node did not hear of the reset"),
                }
            }
        });
        futures::future::join_all(calls).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use tandem_clustermap::{HostRecord, NodeRecord};
    use tandem_paths::{PathEntry, VolumePaths};
    use tandem_types::Epoch;

    use super::*;

    fn map() -> (ClusterMap, VolumeRecord) {
        let mut map = ClusterMap::default();
        for id in 1..=4u64 {
            map.nodes.insert(
                NodeId(id),
                NodeRecord {
                    id: NodeId(id),
                    site: "a".into(),
                    raft_addr: format!("127.0.0.1:{}", 7000 + id).parse().unwrap(),
                    api_addr: format!("127.0.0.1:{}", 7100 + id).parse().unwrap(),
                    nbd_addr: format!("127.0.0.1:{}", 7200 + id).parse().unwrap(),
                    extra_nbd_addrs: Vec::new(),
                    iscsi_addr: Some(format!("127.0.0.1:{}", 7300 + id).parse().unwrap()),
                },
            );
        }
        let volume = VolumeRecord {
            id: VolumeId(7),
            name: "v".into(),
            dataset: "default".into(),
            size_bytes: 1 << 30,
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            primary: NodeId(1),
            isr: vec![NodeId(1), NodeId(2)],
            epoch: Epoch(1),
            isr_version: 1,
            resync: BTreeMap::new(),
            claim: Some(9),
            origin: None,
        };
        map.volumes.insert(volume.id, volume.clone());
        (map, volume)
    }

    fn states(access: &Access) -> Vec<(u16, AccessState)> {
        access.groups.iter().map(|g| (g.id, g.state)).collect()
    }

    #[test]
    fn unknown_initiators_get_states_from_the_volume_record() {
        let (map, mut volume) = map();
        let access = access_for(&map, NodeId(2), &volume, "iqn.2026-12.test:stranger");
        use AccessState::*;
        assert_eq!(
            states(&access),
            [(1, ActiveOptimized), (2, ActiveNonOptimized), (3, Unavailable), (4, ActiveNonOptimized)]
        );
        assert_eq!(access.state, ActiveNonOptimized);
        // A primary that has not claimed its epoch yet is on its way: transitioning.
        volume.claim = None;
        let access = access_for(&map, NodeId(1), &volume, "iqn.2026-12.test:stranger");
        assert_eq!(access.state, Transitioning);
    }

    #[test]
    fn a_known_host_gets_its_published_path_map() {
        let (mut map, volume) = map();
        let iqn = "iqn.2026-12.test:h1";
        let entry = |node: u64, state: PathState| PathEntry {
            path: format!("n{node}p0"),
            node: NodeId(node),
            address: format!("127.0.0.1:{}", 7200 + node).parse().unwrap(),
            state,
            reason: String::new(),
        };
        map.hosts.insert(
            "h1".into(),
            HostRecord {
                name: "h1".into(),
                site: "a".into(),
                volumes: BTreeSet::from([volume.id]),
                iqns: BTreeSet::from([iqn.to_string()]),
                generation: 3,
                // The leader sees node 1 down: node 2 is to take over.
                paths: vec![VolumePaths {
                    volume: "v".into(),
                    paths: vec![
                        entry(2, PathState::ActiveOptimized),
                        entry(1, PathState::Unavailable),
                        entry(3, PathState::Unavailable),
                    ],
                }],
                credential: None,
                chap: None,
            },
        );
        use AccessState::*;
        let access = access_for(&map, NodeId(2), &volume, iqn);
        assert_eq!(states(&access), [(1, Unavailable), (2, Transitioning), (3, Unavailable), (4, ActiveNonOptimized)]);
        assert_eq!(access.state, Transitioning);
        // Another initiator on the same node still gets the record's states.
        let other = access_for(&map, NodeId(2), &volume, "iqn.2026-12.test:h2");
        assert_eq!(other.groups[0].state, ActiveOptimized);
    }

    #[test]
    fn names_and_identities_are_the_same_on_every_node() {
        assert_eq!(target_name("local", "vol-1"), "iqn.2026-12.io.tandem:local:vol-1");
        assert_eq!(volume_of("local", "iqn.2026-12.io.tandem:local:vol-1"), Some("vol-1"));
        assert_eq!(volume_of("other", "iqn.2026-12.io.tandem:local:vol-1"), None);
        assert_eq!(volume_of("local", "iqn.2026-12.io.tandem:localx:vol-1"), None);
        let a = naa("local", VolumeId(5));
        assert_eq!(a >> 60, 3);
        assert_eq!(a, naa("local", VolumeId(5)));
        assert_ne!(a, naa("local", VolumeId(6)));
        assert_ne!(a, naa("prod", VolumeId(5)));
    }
}
