//! Datasets ("pods") and placement: which nodes hold a dataset's replicas, chosen once when the
//! dataset is created, and the commands that create and delete datasets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tandem_types::{validate_name, NodeId};

use crate::key::ObjectKey;
use crate::map::ClusterMap;
use crate::MetaReply;

/// The dataset a volume joins when its creator names none. It is created on first use, with
/// every node of the cluster as a replica.
pub const DEFAULT_DATASET: &str = "default";
/// Datasets the map holds at most: metadata is small by design, and every node keeps all of it
/// in memory and in every snapshot.
pub const DATASETS_MAX: usize = 1024;

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

impl ClusterMap {
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

    pub(crate) fn create_dataset(
        &mut self,
        name: String,
        replicas: Option<u32>,
        preferred_site: Option<String>,
    ) -> MetaReply {
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
    pub(crate) fn new_dataset(
        &mut self,
        name: String,
        count: usize,
        preferred_site: Option<String>,
    ) -> Result<(), String> {
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

    pub(crate) fn delete_dataset(&mut self, name: &str) -> MetaReply {
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
}
