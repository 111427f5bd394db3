//! `bench failover`'s write load: random 4 KiB blocks, one at a time, through one node, on a
//! thread of its own; when each write was acknowledged, and the longest gap between them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tandem_testkit::{NbdClient, NbdError};

use super::{BLOCK_BYTES, VOLUME_NAME, WRITE_RANGE_BYTES};

/// One NBD request's socket timeout: above the node's own retry deadline for a proxied write
/// (15 s), so the node, not this client, decides when a write has failed.
const NBD_IO_TIMEOUT: Duration = Duration::from_secs(30);
const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed connection attempt, the load retries after this long.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Error messages kept per kill (the count of failed writes is kept in full).
const ERRORS_KEPT_MAX: usize = 5;

/// The longest gap between consecutive completions, counting the time from the last one to
/// `end` (so writes that never resumed show as a stall up to the end).
pub(super) fn longest_gap(completions: &[Instant], end: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    for pair in completions.windows(2) {
        longest = longest.max(pair[1].duration_since(pair[0]));
    }
    if let Some(&last) = completions.last() {
        longest = longest.max(end.saturating_duration_since(last));
    }
    longest
}

/// What the write load saw.
pub(super) struct Load {
    /// When each acknowledged write completed, in order.
    pub(super) completions: Vec<Instant>,
    pub(super) failed: u64,
    pub(super) errors: Vec<String>,
}

/// Writes random 4 KiB blocks, one at a time, through `addr` until `stop`, reconnecting (to the
/// same node) when the connection breaks. A write answered with an error, or whose connection
/// broke before its answer, counts as failed.
pub(super) fn write_load(addr: SocketAddr, seed: u64, stop: &AtomicBool, acked: &AtomicU64) -> Load {
    fn note(load: &mut Load, e: String) {
        if load.errors.len() < ERRORS_KEPT_MAX {
            load.errors.push(e);
        }
    }
    let mut load = Load { completions: Vec::new(), failed: 0, errors: Vec::new() };
    let blocks = WRITE_RANGE_BYTES / BLOCK_BYTES as u64;
    let mut x = seed | 1;
    let mut data = vec![0xa5u8; BLOCK_BYTES];
    let mut client: Option<NbdClient> = None;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            match NbdClient::connect_with(addr, VOLUME_NAME, NBD_CONNECT_TIMEOUT, NBD_IO_TIMEOUT) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    note(&mut load, format!("connect: {e}"));
                    std::thread::sleep(RECONNECT_PAUSE);
                }
            }
            continue;
        };
        // xorshift64: a different block each time, the same sequence for the same seed.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        n += 1;
        data[..8].copy_from_slice(&n.to_be_bytes());
        match c.write((x % blocks) * BLOCK_BYTES as u64, &data) {
            Ok(()) => {
                load.completions.push(Instant::now());
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(NbdError::Refused(e)) => {
                load.failed += 1;
                note(&mut load, format!("write: server error {e}"));
            }
            Err(NbdError::Io(e)) => {
                load.failed += 1;
                note(&mut load, format!("write: {e}"));
                client = None;
            }
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_counts_the_tail() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(longest_gap(&[at(0), at(10), at(400), at(410)], at(420)), Duration::from_millis(390));
        assert_eq!(longest_gap(&[at(0), at(10)], at(1000)), Duration::from_millis(990));
        assert_eq!(longest_gap(&[], at(5)), Duration::ZERO);
    }
}
