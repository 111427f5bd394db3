//! Polling with a deadline: tests wait for a condition, never for a fixed time to "let things
//! settle". One poll interval for all of them.

use std::time::{Duration, Instant};

use crate::Error;

/// How long a poll waits before asking again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `f` until it returns `Some`, or fails after `timeout` naming `what`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error(format!("timed out after {timeout:?} waiting for {what}")));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(what, timeout, f).unwrap_or_else(|e| panic!("{e}"))
}

/// The async form for tests inside a tokio runtime: polls `condition` until it holds, or
/// panics after `timeout`. It yields between polls, so tasks of the same runtime progress.
pub async fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
