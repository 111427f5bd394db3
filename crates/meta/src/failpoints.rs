//! The metadata store's failpoints, compiled only in a `failpoints` build (the chaos suite's;
//! docs/ARCHITECTURE.md, "Failpoints", lists every failpoint of the node).

/// In the state machine's `install_snapshot`, before a snapshot received from the leader is
/// decoded and installed. `return` fails the installation with a `StorageError` (a snapshot
/// write error), as a disk error while writing it would; openraft treats a storage error as
/// fatal and stops this node's Raft, which the node then serves without (no lease, no I/O)
/// until it is restarted.
pub const SNAPSHOT_BEFORE_INSTALL: &str = "snapshot-before-install";

/// Evaluates failpoint `name` from async code without blocking an async worker (on the
/// blocking pool: `sleep(ms)`, `delay(ms)` and `pause` stall only the awaiting task).
/// `Some(argument)` (empty without one) for a `return` action; `panic` ends the process
/// (abort), as a crash would, rather than one task. The same helper as
/// `tandem_replication::failpoints::eval`: this crate does not depend on that one.
pub async fn eval(name: &'static str) -> Option<String> {
    match tokio::task::spawn_blocking(move || fail::eval(name, Option::unwrap_or_default)).await {
        Ok(returned) => returned,
        Err(e) if e.is_panic() => {
            tracing::error!(failpoint = name, "failpoint panicked; aborting the process");
            std::process::abort()
        }
        // The runtime is shutting down: nothing is left to fail.
        Err(_) => None,
    }
}
