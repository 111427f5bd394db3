//! The data plane's failpoints, compiled only in a `failpoints` build (the chaos suite's;
//! docs/ARCHITECTURE.md, "Failpoints", lists every failpoint of the node).

/// In a backup's acknowledgement sender (`driver/replica.rs`, `send_acks`), after a batch of
/// replicated writes was applied and made durable and before the `Acks` go to the primary.
/// `return` drops that batch's acknowledgements, as a lost reply would: the primary times the
/// member out and shrinks the ISR (I3).
pub const BACKUP_BEFORE_REPLY: &str = "backup-before-reply";

/// Before an attempt of a host write (`driver/host_io.rs`, `Inner::before_attempt`) that is
/// re-routed: the committed primary moved to another node since the last attempt, and not to
/// this one. `sleep(ms)` makes this node's re-route late, as on a node whose Raft apply lags
/// behind the leader's; `return` changes nothing (the write is re-routed at once).
pub const PROXY_BEFORE_REROUTE: &str = "proxy-before-reroute";

/// Evaluates failpoint `name` from async code without blocking an async worker: the
/// evaluation runs on the blocking pool, so `sleep(ms)`, `delay(ms)` and `pause` stall only
/// the task that awaits it (a stall of that step, as a slow disk or a descheduled thread
/// would cause). `Some(argument)` (empty without one) for a `return` action; `panic` ends the
/// process (abort), as a crash at that point would, rather than one tokio task. Every call
/// costs a trip to the blocking pool, so this is for `failpoints` builds only.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn return_gives_its_argument_and_sleep_does_not_hold_the_worker() {
        assert_eq!(eval("replication-test-unset").await, None);
        fail::cfg("replication-test-return", "1*return(lost)").expect("cfg");
        assert_eq!(eval("replication-test-return").await, Some("lost".to_string()));
        assert_eq!(eval("replication-test-return").await, None, "1* fires once");
        // On a current-thread runtime a sleep on the worker would stop the ticker below.
        fail::cfg("replication-test-sleep", "sleep(300)").expect("cfg");
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        assert_eq!(eval("replication-test-sleep").await, None);
        ticker.abort();
        assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) > 3, "the worker ran during the sleep");
        fail::remove("replication-test-return");
        fail::remove("replication-test-sleep");
    }
}
