//! Tandem's test kit: what every test against real processes needs, once.
//!
//! - [`binary`]: the `tandem` executable under test, built from the current sources.
//! - [`cluster`] and [`queries`]: one launcher of local clusters (loopback, or one network
//!   namespace per node) with one-line fault verbs (`kill`, `pause`, `resume`, `restart`,
//!   and, in namespaces, `isolate`, `cut`, `heal`), and what tests ask a running cluster.
//! - [`netns`] and [`firewall`]: the namespaces, bridge and veths, and the nftables rules.
//! - [`nbd`]: one NBD client written from the protocol document, and its wire bytes.
//! - [`qemu`]: running external clients (qemu-io and others) with explicit failure rules.
//! - [`cunit`]: the per-test verdicts of a CUnit suite's output (libiscsi's iscsi-test-cu).
//! - [`wait`], [`random`], [`tools`], [`process`]: polling with deadlines, seeded data,
//!   installing the clients a test drives, and guards that stop processes on drop.
//!
//! The benchmarks (`tandem bench`) run on it too: their clusters are
//! `Cluster::builder().exe(current_exe).prefix("tandem-bench-").without_turn()
//! .log_level_from_env().start()?`, the `try_*` forms (`try_sigkill` among them) and
//! [`Cluster::stop`] return errors instead of panicking, and [`NbdClient::connect_with`]
//! carries the failover load. A [`Cluster`] is not `Send` (it may hold the
//! turn), so an async caller runs its blocking verbs with `tokio::task::block_in_place`.
//!
//! It depends on no Tandem crate: it speaks to `tandem` through its CLI, HTTP API and NBD
//! ports only. Everything it starts is stopped when its guard drops, also when a test fails.

pub mod binary;
pub mod cluster;
pub mod cunit;
pub mod firewall;
pub mod http;
pub mod nbd;
pub mod netns;
pub mod process;
pub mod qemu;
pub mod queries;
pub mod random;
pub mod tools;
pub mod wait;

pub use binary::{tandem_bin, tandem_chaos_bin};
pub use cluster::{take_turn, Cluster, ClusterBuilder, Paused, Turn};
pub use http::{bearer_headers, http_as, http_as_within};
pub use nbd::{NbdClient, NbdError, Reconnecting};
pub use process::{run_tandem, run_tandem_ok, Reap};
pub use qemu::{qemu_io, qemu_io_ok, run_ok};
pub use queries::{create_served_volume, digest, http, ids, local_copy, volume, wait_identical};
pub use random::{block_version, random_bytes, seed, Rng};
pub use tools::{require_qemu_iscsi, require_tools};
pub use wait::{poll, wait_for};

/// What went wrong in a fallible step of the kit (for callers that must not panic, such as
/// the benchmarks); tests use the panicking forms.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error(msg.into())
    }
}
