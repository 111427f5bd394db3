//! `bench transport`'s switch test: 4 KiB requests kept 32 deep on the Replication channel while
//! the data layer flips between QUIC and TCP (or, as the baseline, does not); the longest gap
//! between two completions, and every failure counted.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tandem_transport::link::Mesh;
use tandem_types::{Channel, Layer, TransportKind};
use tokio::time::Instant;

use super::clients::settle;
use super::{PEER_ID, POLL_INTERVAL, SMALL_BYTES, SWITCH_INTERVAL, SWITCH_IN_FLIGHT};
use crate::load::PUT_TIMEOUT;

/// One run of the switch test.
#[derive(Serialize)]
pub(super) struct StallRun {
    pub(super) repeat: u32,
    pub(super) switching: bool,
    /// The data layer the run started on.
    pub(super) start: TransportKind,
    /// `set_kind` calls made during the run.
    pub(super) flips: u64,
    /// Moves from one layer to the other that the Replication link completed.
    pub(super) switches: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    /// The first few failures, for the report.
    pub(super) errors: Vec<String>,
    pub(super) requests_per_s: f64,
    /// The longest gap between two consecutive completed requests.
    pub(super) longest_stall_ms: f64,
}

fn other(kind: TransportKind) -> TransportKind {
    match kind {
        TransportKind::Tcp => TransportKind::Quic,
        TransportKind::Quic => TransportKind::Tcp,
    }
}

fn replication_switches(mesh: &Mesh) -> u64 {
    mesh.link_stats()
        .iter()
        .find(|s| s.peer == PEER_ID && s.channel == Channel::Replication)
        .map(|s| s.switches)
        .unwrap_or(0)
}

/// The switch test's load: 4 KiB requests kept `SWITCH_IN_FLIGHT` deep on the Replication
/// channel for `duration`, flipping the data layer every `SWITCH_INTERVAL` when `switching`.
/// Failures are counted, not fatal: counting them is the point.
pub(super) async fn stall_run(
    mesh: &Mesh,
    repeat: u32,
    start: TransportKind,
    switching: bool,
    duration: Duration,
) -> anyhow::Result<StallRun> {
    const ERRORS_KEPT: usize = 5;
    settle(mesh, start).await?;
    let payload = Bytes::from(vec![0x5au8; SMALL_BYTES]);
    let switches_before = replication_switches(mesh);
    let t0 = Instant::now();
    let deadline = t0 + duration;

    let load = async {
        let mut in_flight = FuturesUnordered::new();
        let mut last: Option<Instant> = None;
        let mut longest = Duration::ZERO;
        let (mut completed, mut failed) = (0u64, 0u64);
        let mut errors: Vec<String> = Vec::new();
        let note = |errors: &mut Vec<String>, e: String| {
            if errors.len() < ERRORS_KEPT {
                errors.push(e);
            }
        };
        loop {
            let mut send_failed = false;
            while in_flight.len() < SWITCH_IN_FLIGHT && Instant::now() < deadline {
                match mesh.send(PEER_ID, Channel::Replication, payload.clone()).await {
                    Ok(reply) => in_flight.push(tokio::time::timeout(PUT_TIMEOUT, reply.wait())),
                    Err(e) => {
                        failed += 1;
                        note(&mut errors, format!("send: {e}"));
                        send_failed = true;
                        break;
                    }
                }
            }
            let Some(result) = in_flight.next().await else {
                if Instant::now() >= deadline {
                    break;
                }
                if send_failed {
                    // Nothing in flight and the link refuses: do not spin on it.
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                continue;
            };
            match result {
                Ok(Ok(reply)) if reply.len() == SMALL_BYTES => {
                    completed += 1;
                    let now = Instant::now();
                    if let Some(prev) = last.replace(now) {
                        longest = longest.max(now - prev);
                    }
                }
                Ok(Ok(reply)) => {
                    failed += 1;
                    note(&mut errors, format!("reply of {} bytes, expected {SMALL_BYTES}", reply.len()));
                }
                Ok(Err(e)) => {
                    failed += 1;
                    note(&mut errors, e.to_string());
                }
                Err(_) => {
                    failed += 1;
                    note(&mut errors, format!("no reply within {PUT_TIMEOUT:?}"));
                }
            }
        }
        let elapsed = last.map(|l| l - t0).unwrap_or(duration);
        (completed, failed, errors, longest, elapsed)
    };

    let flipper = async {
        let mut flips = 0u64;
        if switching {
            let mut kind = start;
            let mut at = t0 + SWITCH_INTERVAL;
            while at < deadline {
                tokio::time::sleep_until(at).await;
                kind = other(kind);
                mesh.set_kind(Layer::Data, kind);
                flips += 1;
                at += SWITCH_INTERVAL;
            }
        }
        flips
    };

    let ((completed, failed, errors, longest, elapsed), flips) = tokio::join!(load, flipper);
    let elapsed_s = elapsed.as_secs_f64();
    Ok(StallRun {
        repeat,
        switching,
        start,
        flips,
        switches: replication_switches(mesh).saturating_sub(switches_before),
        completed,
        failed,
        errors,
        requests_per_s: if elapsed_s > 0.0 { completed as f64 / elapsed_s } else { 0.0 },
        longest_stall_ms: longest.as_secs_f64() * 1e3,
    })
}
