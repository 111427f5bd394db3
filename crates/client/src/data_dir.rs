//! Where a local cluster made by `tandem up` keeps its config inside its data dir.

use std::path::{Path, PathBuf};

/// The data dir `tandem up` and the admin commands use when none is given.
pub const DEFAULT_DIR: &str = "tandem-data";

/// The cluster config inside a data dir.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("cluster.toml")
}

/// The admin's API token `tandem up` writes into its data dir (mode 0600).
pub fn admin_token_path(dir: &Path) -> PathBuf {
    dir.join("admin.token")
}

/// The admin token of a local cluster's data dir, if it has one.
pub fn read_admin_token(dir: &Path) -> Option<String> {
    std::fs::read_to_string(admin_token_path(dir)).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}
