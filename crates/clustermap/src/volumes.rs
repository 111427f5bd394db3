//! Volumes and their replication configuration: creation and deletion, the in-sync set (ISR)
//! changed by compare-and-set, failover to a new primary and epoch, the primary's claim of its
//! epoch, and the resync progress of replicas outside the ISR.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tandem_types::{validate_name, Epoch, NodeId, VolumeId, BLOCK_BYTES, VOLUME_BYTES_MAX};

use crate::copies::Origin;
use crate::datasets::DEFAULT_DATASET;
use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::MetaReply;

/// Volumes the map holds at most (a few hundred bytes each in memory and in snapshots).
pub const VOLUMES_MAX: usize = 16 * 1024;

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
    /// Starts at 1; +1 on every primary change (a [`MetaCmd::Failover`](crate::MetaCmd::Failover)).
    pub epoch: Epoch,
    /// Starts at 1; +1 on every change of `isr`. ISR changes are compare-and-set on it, so a
    /// proposal that arrives late (its reply lost, its retry already applied, or overtaken by
    /// a later change) can never apply to an ISR it was not computed from.
    pub isr_version: u64,
    /// Replicas outside the ISR being brought level with the primary.
    pub resync: BTreeMap<NodeId, ResyncProgress>,
    /// Which start of the primary's process runs the volume in this epoch
    /// ([`MetaCmd::ClaimPrimary`](crate::MetaCmd::ClaimPrimary)); `None` until the primary claims the epoch. One epoch has at
    /// most one running primary, so a late ISR change of an earlier one is refused by epoch.
    #[serde(default)]
    pub claim: Option<u64>,
    /// Made from another volume by reference (a clone or a snapshot; `copies.rs`).
    #[serde(default)]
    pub origin: Option<Origin>,
}

impl VolumeRecord {
    /// A clone or snapshot whose image is still being made: no node serves it.
    pub fn pending(&self) -> bool {
        self.origin.as_ref().is_some_and(|o| !o.made)
    }

    /// A snapshot: hosts may read it only.
    pub fn read_only(&self) -> bool {
        self.origin.as_ref().is_some_and(|o| o.snapshot)
    }

    /// Asserts the shape the map promises; a violation is a bug in [`ClusterMap::apply`].
    pub(crate) fn assert_shape(&self) {
        assert!(is_sorted_set(&self.replicas), "volume {}: replicas {:?} not a sorted set", self.id, self.replicas);
        assert!(is_sorted_set(&self.isr), "volume {}: isr {:?} not a sorted set", self.id, self.isr);
        assert!(self.isr.contains(&self.primary), "volume {}: primary {} not in isr", self.id, self.primary);
        assert!(self.isr.iter().all(|n| self.replicas.contains(n)), "volume {}: isr outside replicas", self.id);
        assert!(self.epoch >= Epoch(1), "volume {}: epoch 0", self.id);
    }
}

pub(crate) fn is_sorted_set(ids: &[NodeId]) -> bool {
    ids.windows(2).all(|w| w[0] < w[1])
}

/// Checks a list of node ids given in a command: no duplicates; returns it sorted.
fn node_set(ids: &[NodeId], what: &str) -> Result<Vec<NodeId>, String> {
    let set: BTreeSet<NodeId> = ids.iter().copied().collect();
    if set.len() != ids.len() {
        return Err(format!("the {what} {ids:?} names a node twice"));
    }
    Ok(set.into_iter().collect())
}

impl ClusterMap {
    /// The volume called `name`, if any.
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        let id = self.index.volume_by_name.get(name)?;
        self.volumes.get(id).filter(|v| v.name == name)
    }

    pub(crate) fn create_volume(&mut self, name: String, dataset: Option<String>, size_bytes: u64) -> MetaReply {
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
        let pick = |from: &[NodeId]| from[(id.get() % from.len() as u64) as usize];
        let primary = if candidates.is_empty() { pick(&ds.replicas) } else { pick(&candidates) };
        let vol = VolumeRecord {
            id,
            name,
            dataset: dataset_name,
            size_bytes,
            replicas: ds.replicas.clone(),
            primary,
            isr: ds.replicas.clone(),
            epoch: Epoch(1),
            isr_version: 1,
            claim: None,
            resync: BTreeMap::new(),
            origin: None,
        };
        self.insert_new_volume(vol)
    }

    /// Adds a volume that takes the next volume id (`vol.id`), and allocates it.
    pub(crate) fn insert_new_volume(&mut self, vol: VolumeRecord) -> MetaReply {
        let id = vol.id;
        assert_eq!(id, self.next_volume_id, "a new volume takes the next id");
        vol.assert_shape();
        self.index.volume_by_name.insert(vol.name.clone(), id);
        self.volumes.insert(id, vol);
        self.next_volume_id = id.checked_next().expect("volume ids exhausted");
        self.touched.push(ObjectKey::Volume(id));
        self.touched.push(ObjectKey::NextVolumeId);
        MetaReply::Done { changed: true }
    }

    pub(crate) fn delete_volume(&mut self, name: &str) -> MetaReply {
        let Some(id) = self.volume_by_name(name).map(|v| v.id) else {
            return MetaReply::NotFound(format!("no volume named {name:?}"));
        };
        self.volumes.remove(&id);
        self.index.volume_by_name.remove(name);
        self.touched.push(ObjectKey::Volume(id));
        if self.reservations.remove(&id).is_some() {
            self.touched.push(ObjectKey::Reservations(id));
        }
        self.drop_tokens_of(id);
        for name in self.index.hosts_of_volume.remove(&id).unwrap_or_default() {
            if let Some(host) = self.hosts.get_mut(&name) {
                host.volumes.remove(&id);
                self.touched.push(ObjectKey::Host(name));
            }
        }
        MetaReply::Done { changed: true }
    }

    fn volume_mut(&mut self, id: VolumeId) -> Result<&mut VolumeRecord, MetaReply> {
        self.volumes.get_mut(&id).ok_or_else(|| MetaReply::NotFound(format!("no volume with id {id}")))
    }

    pub(crate) fn set_volume_isr(
        &mut self,
        id: VolumeId,
        epoch: Epoch,
        isr_version: u64,
        isr: Vec<NodeId>,
    ) -> MetaReply {
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

    pub(crate) fn failover(&mut self, id: VolumeId, epoch: Epoch, primary: NodeId, isr: Vec<NodeId>) -> MetaReply {
        let vol = match self.volume_mut(id) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let isr = match node_set(&isr, "ISR") {
            Ok(s) => s,
            Err(e) => return MetaReply::Invalid(format!("volume {id}: {e}")),
        };
        // A retry of the failover that moved the volume to this very configuration.
        if Some(vol.epoch) == epoch.checked_next() && vol.primary == primary && vol.isr == isr {
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
        vol.epoch = epoch.checked_next().expect("epochs exhausted");
        vol.isr_version = vol.isr_version.checked_add(1).expect("ISR versions exhausted");
        vol.claim = None;
        vol.assert_shape();
        self.touched.push(ObjectKey::Volume(id));
        MetaReply::Done { changed: true }
    }

    pub(crate) fn claim_primary(&mut self, id: VolumeId, epoch: Epoch, primary: NodeId, nonce: u64) -> MetaReply {
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
            vol.epoch = epoch.checked_next().expect("epochs exhausted");
            vol.isr_version = vol.isr_version.checked_add(1).expect("ISR versions exhausted");
        }
        vol.claim = Some(nonce);
        vol.assert_shape();
        self.touched.push(ObjectKey::Volume(id));
        MetaReply::Done { changed: true }
    }

    pub(crate) fn set_resync_progress(&mut self, id: VolumeId, node: NodeId, progress: ResyncProgress) -> MetaReply {
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

    pub(crate) fn clear_resync(&mut self, id: VolumeId, node: NodeId) -> MetaReply {
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
}
