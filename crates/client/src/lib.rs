//! `tandem-client`: how the `tandem` CLI and the benchmarks (`tandem-bench`) reach a cluster —
//! a client of a node's HTTP API, the layout of a local cluster's data dir, and sizes as the
//! command line writes them.
//!
//! It is not the API itself (that is `tandem-node`'s, with its request and view types) and
//! holds no command: what a command prints stays in the binary or the benchmark. Both of its
//! users depend on it, so the binary never has to lend code to the benchmarks.

mod api;
mod data_dir;
mod size;

pub use api::{Api, StatusError, PROBE_TIMEOUT};
pub use data_dir::{admin_token_path, config_path, read_admin_token, DEFAULT_DIR};
pub use size::{format_size, parse_size};
