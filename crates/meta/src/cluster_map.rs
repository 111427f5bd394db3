//! The cluster map moved to the pure crate `tandem-clustermap`; this module re-exports it at its
//! old path so that existing imports (`tandem_meta::cluster_map::...`) keep compiling.

pub use tandem_clustermap::{
    path_map_bytes, ClusterMap, DatasetRecord, HostRecord, MetaCmd, MetaReply, NodeRecord, Object, ObjectKey,
    ResyncProgress, VolumeRecord, DATASETS_MAX, DEFAULT_DATASET, EXTRA_TARGETS_MAX, HOSTS_MAX, HOST_VOLUMES_MAX,
    PATH_MAP_BYTES_MAX, PATH_REASON_BYTES_MAX, VOLUMES_MAX, VOLUME_PATHS_MAX,
};
