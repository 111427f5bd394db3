//! The host agent, `tandem host agent --host NAME`: runs on a host that attaches volumes, until
//! SIGINT or SIGTERM.
//!
//! - It follows the host's path map with the long-poll (the same [`PathFollower`] as
//!   `tandem paths --watch`), failing over between every node's API, and writes each new
//!   generation to the map file atomically (`FILE.tmp`, fsync, rename), for the host's
//!   multipath layer to read.
//! - Every interval it probes each distinct (node, target address) of the current map, whatever
//!   the path's state, and posts the round's results in one report to
//!   `POST /v1/hosts/{name}/probes`. A probe connects, reads the NBD newstyle greeting, then ends
//!   the negotiation with `NBD_OPT_ABORT`; its round trip is connect to greeting.
//!
//! Limits: rounds never overlap and start at most once per interval, each target is probed
//! once per round, with at most [`PROBES_IN_FLIGHT_MAX`] probes at once and at most
//! [`PROBES_PER_REPORT_MAX`] targets per round (the rest are not probed, with a warning). A
//! round with slow targets takes up to `ceil(targets / 32)` probe timeouts; the next one starts
//! when it ends. A report that fails (no leader, node down) is
//! dropped, not queued: the next round reports fresh results. Before the first map is published
//! (generation 0, or no node answers) there is nothing to probe; the agent keeps following. A
//! map file left by an earlier run stays until a newer generation replaces it.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde::Serialize;
use tandem_node::host_api::ProbeReport;
use tandem_node::hosts::PROBES_PER_REPORT_MAX;
use tandem_types::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::hosts::{held_back, is_refusal, stop_signal, Backoff, Endpoints, PathFollower, PathMapView, WarnLimiter};
use crate::Target;

/// Probes running at once, at most: a host with many paths must not open a burst of
/// connections to the nodes (or run out of file descriptors).
pub const PROBES_IN_FLIGHT_MAX: usize = 32;
/// Posting a round's report: it should not outlast the interval by much.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a refusal (the host is unknown, or removed) the map is asked for again this often.
const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// How long a probe waits for the server's answer to `NBD_OPT_ABORT` before it closes; not
/// part of the round trip.
const CLOSE_WAIT: Duration = Duration::from_millis(100);

/// The NBD newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, 16 bits of handshake flags.
const GREETING_BYTES: usize = 18;
const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const NBD_OPT_ABORT: u32 = 2;
/// The option reply to `NBD_OPT_ABORT`: magic, option, reply type, length.
const OPTION_REPLY_BYTES: usize = 20;

pub struct AgentOpts {
    pub host: String,
    pub interval: Duration,
    pub probe_timeout: Duration,
    /// Default: `tandem-paths-HOST.json` in the current dir.
    pub map_file: Option<PathBuf>,
}

pub async fn run(target: &Target, opts: AgentOpts) -> anyhow::Result<()> {
    let map_file = opts.map_file.clone().unwrap_or_else(|| PathBuf::from(format!("tandem-paths-{}.json", opts.host)));
    let mut endpoints = Endpoints::candidates(target)?;
    tracing::info!(
        "host agent for {} starting: probes every {} ms (timeout {} ms), map file {}",
        opts.host,
        opts.interval.as_millis(),
        opts.probe_timeout.as_millis(),
        map_file.display()
    );
    let work = async {
        learn_nodes(&mut endpoints).await;
        let (maps_tx, maps_rx) = watch::channel::<Option<Arc<PathMapView>>>(None);
        let follower = PathFollower::new(endpoints.clone(), &opts.host, None);
        let reports = endpoints.with_timeout(REPORT_TIMEOUT);
        tokio::select! {
            r = follow(follower, &map_file, maps_tx) => r,
            () = probe_rounds(reports, &opts, maps_rx) => Ok(()),
        }
    };
    tokio::select! {
        r = work => r,
        r = stop_signal() => {
            tracing::info!("host agent for {} stopping", opts.host);
            r
        }
    }
}

/// Learns every node's API, retrying until some node answers.
async fn learn_nodes(endpoints: &mut Endpoints) {
    let mut backoff = Backoff::default();
    let mut warned = WarnLimiter::default();
    while let Err(e) = endpoints.learn_nodes().await {
        if let Some(n) = warned.should_log(Instant::now()) {
            tracing::warn!("{e:#}; retrying{}", held_back(n));
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

/// Follows the map; each new generation goes to the map file and to the probe rounds.
async fn follow(
    mut follower: PathFollower,
    map_file: &Path,
    maps: watch::Sender<Option<Arc<PathMapView>>>,
) -> anyhow::Result<()> {
    let mut since = None;
    let mut warned = WarnLimiter::default();
    loop {
        let map = match follower.next(since).await {
            Ok(map) => map,
            Err(e) => {
                if let Some(n) = warned.should_log(Instant::now()) {
                    tracing::warn!("{e:#}; asking again every {} s{}", REFUSED_RETRY.as_secs(), held_back(n));
                }
                tokio::time::sleep(REFUSED_RETRY).await;
                continue;
            }
        };
        warned.clear();
        since = Some(map.generation);
        let newer = maps.borrow().as_ref().is_none_or(|m| map.generation > m.generation);
        if map.generation == 0 || !newer {
            continue;
        }
        let bytes = serde_json::to_vec_pretty(&map)?;
        let path = map_file.to_path_buf();
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &bytes)).await?;
        match written {
            Ok(()) => tracing::info!(
                "host {}: path map generation {} written to {}",
                map.host,
                map.generation,
                map_file.display()
            ),
            // The probes still follow the map; the file catches up with the next generation.
            Err(e) => tracing::error!(
                "host {}: writing generation {} to {}: {e}",
                map.host,
                map.generation,
                map_file.display()
            ),
        }
        maps.send_replace(Some(Arc::new(map)));
    }
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a part:
/// `PATH.tmp`, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[derive(Serialize)]
struct ProbesRequest<'a> {
    probes: &'a [ProbeReport],
}

/// Every distinct (node, address) of the map: the first [`PROBES_PER_REPORT_MAX`] of them, and
/// how many there are.
fn probe_targets(map: &PathMapView) -> (Vec<(NodeId, SocketAddr)>, usize) {
    let all: BTreeSet<(NodeId, SocketAddr)> =
        map.volumes.iter().flat_map(|v| v.paths.iter().map(|p| (p.node, p.address))).collect();
    let total = all.len();
    (all.into_iter().take(PROBES_PER_REPORT_MAX).collect(), total)
}

/// Every interval: probe every target of the current map, report the round.
async fn probe_rounds(mut endpoints: Endpoints, opts: &AgentOpts, maps: watch::Receiver<Option<Arc<PathMapView>>>) {
    let mut tick = tokio::time::interval(opts.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = WarnLimiter::default();
    let mut too_many = WarnLimiter::default();
    loop {
        tick.tick().await;
        endpoints.refresh_if_due().await;
        let Some(map) = maps.borrow().clone() else { continue };
        let (targets, total) = probe_targets(&map);
        if targets.is_empty() {
            continue;
        }
        if total > targets.len() && too_many.should_log(Instant::now()).is_some() {
            tracing::warn!("host {}: {total} distinct paths; probing the first {} only", map.host, targets.len());
        }
        let timeout = opts.probe_timeout;
        let results: Vec<ProbeReport> = futures::stream::iter(targets)
            .map(|(node, address)| async move {
                match probe(address, timeout).await {
                    ProbeOutcome::Ok { rtt_us } => {
                        ProbeReport { node, address, ok: true, rtt_us: Some(rtt_us), refused: false, error: None }
                    }
                    ProbeOutcome::Failed { refused, error } => {
                        ProbeReport { node, address, ok: false, rtt_us: None, refused, error: Some(error) }
                    }
                }
            })
            .buffer_unordered(PROBES_IN_FLIGHT_MAX)
            .collect()
            .await;
        let url = format!("/v1/hosts/{}/probes", opts.host);
        let body = ProbesRequest { probes: &results };
        match endpoints.current().request::<_, serde_json::Value>(Method::POST, &url, Some(&body)).await {
            Ok(_) => {
                warned.clear();
                tracing::debug!("host {}: reported {} probe results", opts.host, results.len());
            }
            Err(e) => {
                if !is_refusal(&e) {
                    endpoints.rotate();
                }
                if let Some(n) = warned.should_log(Instant::now()) {
                    tracing::warn!("host {}: probe report dropped: {e:#}{}", opts.host, held_back(n));
                }
            }
        }
    }
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The target sent a valid greeting, `rtt_us` after the connect started.
    Ok { rtt_us: u64 },
    /// `refused`: nothing listens there. `error` is short and stable (no measured numbers).
    Failed { refused: bool, error: String },
}

fn failed(error: impl Into<String>) -> ProbeOutcome {
    ProbeOutcome::Failed { refused: false, error: error.into() }
}

/// Probes one NBD target: connect, read and check the newstyle greeting (the round trip ends
/// here), then end the negotiation politely (`NBD_OPT_ABORT`) and close. The whole probe up to
/// the greeting is bounded by `timeout`; the close by [`CLOSE_WAIT`].
pub async fn probe(address: SocketAddr, timeout: Duration) -> ProbeOutcome {
    let start = Instant::now();
    let greeted = tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(address).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ProbeOutcome::Failed { refused: true, error: "connection refused".into() }
            } else {
                failed(format!("connect: {}", e.kind()))
            }
        })?;
        let mut greeting = [0u8; GREETING_BYTES];
        stream.read_exact(&mut greeting).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                failed("closed before the greeting")
            } else {
                failed(format!("reading the greeting: {}", e.kind()))
            }
        })?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
        let opts_magic = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
        if magic != NBD_MAGIC || opts_magic != NBD_OPTS_MAGIC {
            return Err(failed("bad greeting"));
        }
        Ok(stream)
    })
    .await;
    match greeted {
        Err(_) => failed(format!("timed out after {} ms", timeout.as_millis())),
        Ok(Err(outcome)) => outcome,
        Ok(Ok(stream)) => {
            let rtt_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            // The path answered; how the goodbye goes does not change that.
            let _ = tokio::time::timeout(CLOSE_WAIT, say_goodbye(stream)).await;
            ProbeOutcome::Ok { rtt_us }
        }
    }
}

/// Client flags, then `NBD_OPT_ABORT`; waits for the server's reply (or its close) so that the
/// server sees a clean end rather than a reset.
async fn say_goodbye(mut stream: TcpStream) -> std::io::Result<()> {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    out[4..12].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    out[12..16].copy_from_slice(&NBD_OPT_ABORT.to_be_bytes());
    // out[16..20]: option data length 0.
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    let mut reply = [0u8; OPTION_REPLY_BYTES];
    let mut got = 0;
    while got < reply.len() {
        match stream.read(&mut reply[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn greeting() -> [u8; GREETING_BYTES] {
        let mut g = [0u8; GREETING_BYTES];
        g[0..8].copy_from_slice(b"NBDMAGIC");
        g[8..16].copy_from_slice(b"IHAVEOPT");
        g[16..18].copy_from_slice(&3u16.to_be_bytes());
        g
    }

    /// A listener that answers one connection with `greeting` and returns what the client sent.
    async fn one_shot_target(greeting: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&greeting).await.unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            got
        });
        (addr, served)
    }

    #[tokio::test]
    async fn a_target_with_a_greeting_answers_and_is_left_with_an_abort() {
        let (addr, served) = one_shot_target(greeting().to_vec()).await;
        let outcome = probe(addr, Duration::from_secs(5)).await;
        assert!(matches!(outcome, ProbeOutcome::Ok { rtt_us } if rtt_us < 5_000_000), "{outcome:?}");
        let sent = served.await.unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(b"IHAVEOPT");
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(sent, expected);
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let outcome = probe(addr, Duration::from_secs(5)).await;
        assert_eq!(outcome, ProbeOutcome::Failed { refused: true, error: "connection refused".into() });
    }

    #[tokio::test]
    async fn a_wrong_greeting_is_not_a_path() {
        let mut bad = greeting();
        bad[8..16].copy_from_slice(b"NOTNBD!!");
        let (addr, _served) = one_shot_target(bad.to_vec()).await;
        assert_eq!(probe(addr, Duration::from_secs(5)).await, failed("bad greeting"));
        let (addr, _served) = one_shot_target(b"NBDMAG".to_vec()).await;
        // The listener keeps the connection open after 6 bytes: the probe times out.
        assert_eq!(probe(addr, Duration::from_millis(200)).await, failed("timed out after 200 ms"));
    }

    #[tokio::test]
    async fn a_silent_target_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel (backlog), never answered.
        let outcome = probe(addr, Duration::from_millis(100)).await;
        assert_eq!(outcome, failed("timed out after 100 ms"));
        drop(listener);
    }

    #[test]
    fn the_map_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem-paths-h1.json");
        write_atomically(&path, b"{\"generation\": 1}").unwrap();
        write_atomically(&path, b"{\"generation\": 2}").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"generation\": 2}\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("tandem-paths-h1.json")], "no temporary file is left");
    }
}
