//! Where a local cluster made by `tandem up` keeps its config inside its data dir.

use std::path::{Path, PathBuf};

/// The data dir `tandem up` and the admin commands use when none is given.
pub const DEFAULT_DIR: &str = "tandem-data";

/// The cluster config inside a data dir.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("cluster.toml")
}
