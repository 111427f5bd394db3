//! The block store's failpoints, compiled only in a `failpoints` build (the chaos suite's;
//! docs/ARCHITECTURE.md, "Failpoints", lists every failpoint of the node).
//!
//! The journal's two sit in the commit thread, a plain thread of its own: `sleep(ms)` and
//! `delay(ms)` stall group commit (every write waiting for durability waits with it), never an
//! async worker. The clone's sits in the thread that called `clone_range` (the data plane runs
//! it on the blocking pool), with the store's lock released.

/// In `commit` (the commit thread), after a generation's journal record is written and
/// before the `fdatasync` that makes it and its data durable. `return` fails that flush as a
/// failed `fdatasync` would: the store is poisoned until reopened, and every write waiting
/// for that flush gets [`StoreError::Failed`](crate::StoreError::Failed).
pub const JOURNAL_BEFORE_FSYNC: &str = "journal-before-fsync";

/// In `commit`, after the `fdatasync` returned and before the new durable position is
/// published. `return` fails the flush although the data reached the disk: a write that was
/// durable is reported failed, never the other way round.
pub const JOURNAL_AFTER_FSYNC: &str = "journal-after-fsync";

/// In `clone_range`, between two of its steps (a range over 16 MiB is cloned 16 MiB at a
/// time, each step one change of its own): the steps before it are applied and may become durable
/// on their own, the rest are not. `return` fails the clone there with an I/O error, the steps
/// done staying done (as a volume deleted meanwhile would); `panic` is a crash in the middle of
/// a clone, which the crash test (`tests/clone_crash.rs`) recovers from.
pub const CLONE_BETWEEN_STEPS: &str = "clone-between-steps";

/// Evaluates failpoint `name` on this thread: `Some(argument)` (empty without one) for a
/// `return` action. `sleep` and `delay` block the calling thread; `panic` ends the process
/// (abort), as a crash at that point would: a panic confined to the commit thread would leave
/// a store that hangs, which models nothing real.
pub(crate) fn eval(name: &str) -> Option<String> {
    match std::panic::catch_unwind(|| fail::eval(name, Option::unwrap_or_default)) {
        Ok(returned) => returned,
        Err(_) => {
            tracing::error!(failpoint = name, "failpoint panicked; aborting the process");
            std::process::abort()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_failpoint_does_nothing_and_return_gives_its_argument() {
        assert_eq!(eval("storage-test-unset"), None);
        fail::cfg("storage-test-return", "return(disk on fire)").expect("cfg");
        assert_eq!(eval("storage-test-return"), Some("disk on fire".to_string()));
        fail::cfg("storage-test-return", "return").expect("cfg");
        assert_eq!(eval("storage-test-return"), Some(String::new()));
        fail::remove("storage-test-return");
        assert_eq!(eval("storage-test-return"), None);
    }
}
