//! Hosts and their path maps: the initiators, the volumes each may reach, and the path map the
//! Raft leader publishes for each host (versioned by generation), with the limits that keep a
//! published map small enough for one log entry.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tandem_paths::VolumePaths;
use tandem_types::{validate_name, VolumeId};

use crate::access::{HostCredential, SealedChap};
use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::MetaReply;

/// Hosts the map holds at most; each carries its published path map.
pub const HOSTS_MAX: usize = 1024;
/// Volumes one host may be connected to: bounds the size of its path map (a few hundred bytes
/// per volume), which is rewritten whenever one of its paths changes state.
pub const HOST_VOLUMES_MAX: usize = 256;
/// Paths of one volume in a published map (replicas × target ports).
pub const VOLUME_PATHS_MAX: usize = 256;
/// The longest reason text of one path.
pub const PATH_REASON_BYTES_MAX: usize = 256;
/// The largest published path map of one host (estimated encoded bytes). It travels in one log
/// entry, and the metadata store keeps entries below its batch size so that an AppendEntries
/// request stays far below the frame limit. A few hundred bytes per volume in practice.
pub const PATH_MAP_BYTES_MAX: usize = 192 * 1024;

/// iSCSI initiator names one host may have (one per HBA or software initiator).
pub const HOST_IQNS_MAX: usize = 8;
/// RFC 7143 §4.2.7.1: an iSCSI name is at most 223 bytes.
pub const ISCSI_NAME_BYTES_MAX: usize = 223;

/// Checks an initiator name as a host's identity: the `iqn.`, `eui.` or `naa.` form of RFC
/// 3720 §3.2.6.3, in lower case (names compare byte for byte, and initiators send them
/// normalised), of printable ASCII without spaces.
pub fn validate_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > ISCSI_NAME_BYTES_MAX {
        return Err(format!("must be 1 to {ISCSI_NAME_BYTES_MAX} bytes"));
    }
    if !(name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa.")) {
        return Err("must start with iqn., eui. or naa.".into());
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':')) {
        return Err("may hold only lower-case letters, digits, '.', '-' and ':'".into());
    }
    Ok(())
}

/// An upper estimate of a path map's encoded size.
pub fn path_map_bytes(paths: &[VolumePaths]) -> usize {
    paths
        .iter()
        .map(|v| 16 + v.volume.len() + v.paths.iter().map(|p| 48 + p.path.len() + p.reason.len()).sum::<usize>())
        .sum()
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
    /// The iSCSI initiator names that are this host: a session from one of them gets this
    /// host's path states. No two hosts share a name.
    #[serde(default)]
    pub iqns: BTreeSet<String>,
    /// The generation of the published path map: 0 until the first one, then +1 with every
    /// change. Never goes back, also across leader changes (it is committed).
    pub generation: u64,
    /// The published path map, per connected volume.
    pub paths: Vec<VolumePaths>,
    /// The host's certificate and API token, once issued (`tandem host credentials`).
    #[serde(default)]
    pub credential: Option<HostCredential>,
    /// The host's CHAP settings for iSCSI, secrets sealed.
    #[serde(default)]
    pub chap: Option<SealedChap>,
}

impl ClusterMap {
    /// The host an iSCSI initiator name belongs to.
    pub fn host_by_iqn(&self, iqn: &str) -> Option<&HostRecord> {
        self.hosts.values().find(|h| h.iqns.contains(iqn))
    }

    /// Adds a host, or moves it to another site; `iqns`, when not empty, become its initiator
    /// names (all of them: a name left out is no longer the host's).
    pub(crate) fn add_host(&mut self, name: String, site: String, iqns: Vec<String>) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Invalid(format!("host name {name:?} {e}"));
        }
        if let Err(e) = validate_name(&site) {
            return MetaReply::Invalid(format!("site {site:?} {e}"));
        }
        if iqns.len() > HOST_IQNS_MAX {
            return MetaReply::Invalid(format!("a host has at most {HOST_IQNS_MAX} iSCSI names, not {}", iqns.len()));
        }
        for iqn in &iqns {
            if let Err(e) = validate_iscsi_name(iqn) {
                return MetaReply::Invalid(format!("iSCSI name {iqn:?} {e}"));
            }
            if let Some(other) = self.host_by_iqn(iqn).filter(|h| h.name != name) {
                return MetaReply::Invalid(format!("iSCSI name {iqn:?} already belongs to host {:?}", other.name));
            }
        }
        let iqns: BTreeSet<String> = iqns.into_iter().collect();
        if let Some(host) = self.hosts.get_mut(&name) {
            let mut changed = host.site != site;
            host.site = site;
            if !iqns.is_empty() && host.iqns != iqns {
                host.iqns = iqns;
                changed = true;
            }
            if changed {
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
            HostRecord {
                name,
                site,
                volumes: BTreeSet::new(),
                iqns,
                generation: 0,
                paths: Vec::new(),
                credential: None,
                chap: None,
            },
        );
        MetaReply::Done { changed: true }
    }

    pub(crate) fn remove_host(&mut self, name: String) -> MetaReply {
        let Some(rec) = self.hosts.remove(&name) else {
            return MetaReply::NotFound(format!("no host named {name:?}"));
        };
        for v in rec.volumes {
            self.index.disconnect(&name, v);
        }
        self.touched.push(ObjectKey::Host(name));
        MetaReply::Done { changed: true }
    }

    pub(crate) fn connect_host(&mut self, host: &str, volume: &str, connect: bool) -> MetaReply {
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
            if connect {
                self.index.connect(host, id);
            } else {
                self.index.disconnect(host, id);
            }
            self.touched.push(ObjectKey::Host(host.to_string()));
        }
        MetaReply::Done { changed }
    }

    pub(crate) fn publish_paths(&mut self, host: &str, generation: u64, paths: Vec<VolumePaths>) -> MetaReply {
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
}
