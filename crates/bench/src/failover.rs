//! `tandem bench failover`: `kill -9` of a volume's primary under a write load, repeated (see
//! ../../shared/design/BENCH.md). There is no reference: the figure is absolute, judged against
//! the failure-detection timeout the cluster is configured with ([`FAILURE_TIMEOUT`]).
//!
//! Each kill: a minimal NBD client (below) writes 4 KiB blocks, one at a time, through a node
//! that is not the primary, so its connection survives the kill (that node proxies to the
//! primary and retries across the failover); the primary is killed; the longest gap between two
//! consecutive acknowledged writes is the stall. The killed node is then restarted and the
//! benchmark waits until it is back in the volume's ISR before the next kill, whose victim is
//! the new primary.
//!
//! A host (`bench-host`) is connected to the volume and watches its path map with the
//! long-poll (`GET /v1/hosts/bench-host/paths?since=G`) through the same surviving node, as a
//! host's agent does: the path-map time is from the kill to the first map in which every path
//! of the killed node is `unavailable` and another node's path is `active-optimized`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Serialize;
use tandem_node::api::ClusterView;
use tandem_node::host_api::PathMapView;
use tandem_node::lease::FAILURE_TIMEOUT;
use tandem_paths::PathState;
use tandem_types::NodeId;

use crate::load;
use crate::local_cluster::LocalCluster;
use crate::{Goal, Op};
use tandem_client::{format_size, Api};

const NODES: u32 = 3;
const VOLUME_NAME: &str = "bench-failover";
/// Small, because a returning node is compared with the new primary chunk by chunk over the
/// whole volume (the new primary does not know what it missed).
const VOLUME_BYTES: u64 = 256 << 20;
/// The load writes random 4 KiB blocks within this range.
const WRITE_RANGE_BYTES: u64 = 64 << 20;
const BLOCK_BYTES: usize = 4096;
/// Writes before the kill, so the stall is measured against a steady load.
const STEADY_BEFORE_KILL: Duration = Duration::from_secs(2);
/// Writes after they resumed, so a second stall right after the first would be seen too.
const STEADY_AFTER_RESUME: Duration = Duration::from_secs(2);
/// Writes that have not resumed this long after the kill: the stall is reported as at least
/// this, and the benchmark goes on.
const RESUME_WAIT: Duration = Duration::from_secs(60);
/// One NBD request's socket timeout: above the node's own retry deadline for a proxied write
/// (15 s), so the node, not this client, decides when a write has failed.
const NBD_IO_TIMEOUT: Duration = Duration::from_secs(30);
const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connection attempt, the load retries after this long.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// The restarted node must be back in the ISR within this long (restart, resync, ISR grow).
const REJOIN_WAIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);
/// Error messages kept per kill (the count of failed writes is kept in full).
const ERRORS_KEPT_MAX: usize = 5;
const KILLS_MAX: i64 = 50;
const HOST_NAME: &str = "bench-host";
/// One long-poll's wait; the watcher polls again right after.
const WATCH_WAIT_MS: u64 = 5_000;
/// The goal of BENCH.md: a watching host has the new path map within this long of the kill.
const PATH_MAP_TARGET: Duration = Duration::from_secs(1);

#[derive(Args)]
pub struct FailoverArgs {
    /// How many times the primary is killed (each time the current one).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=KILLS_MAX))]
    kills: u32,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

/// What happened around one kill.
#[derive(Serialize)]
struct Kill {
    kill: u32,
    killed_node: NodeId,
    /// Whether the killed primary was also the Raft leader, so a leader election came first.
    killed_raft_leader: bool,
    /// The node the write load was connected to.
    client_node: NodeId,
    new_primary: Option<NodeId>,
    new_epoch: Option<u64>,
    /// The longest gap between two consecutive acknowledged writes over the load's window.
    stall_ms: f64,
    /// From the kill to the first write acknowledged after it.
    resume_ms: Option<f64>,
    /// From the kill to when a survivor's API first showed the new primary (polled every 50 ms).
    failover_seen_ms: Option<f64>,
    /// From the kill to the first path map, at a host watching it, without the killed node and
    /// with another node's path active-optimized.
    path_map_ms: Option<f64>,
    /// From the kill to the first new generation of the watched map, whatever it showed.
    path_map_first_change_ms: Option<f64>,
    writes_acked: u64,
    writes_failed: u64,
    errors: Vec<String>,
    /// From starting the killed node again until the volume's ISR held every node.
    rejoin_s: f64,
}

#[derive(Serialize)]
struct Summary {
    stall_ms_median: f64,
    stall_ms_max: f64,
    resume_ms_median: f64,
    rejoin_s_median: f64,
    path_map_ms_median: f64,
    path_map_ms_max: f64,
    writes_failed: u64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    tandem_nodes: u32,
    volume_bytes: u64,
    write_range_bytes: u64,
    block_bytes: usize,
    failure_timeout_ms: f64,
    stall_target_ms: f64,
    cores: usize,
    kills: Vec<Kill>,
    summary: Summary,
    goals: Vec<Goal>,
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    eprintln!("starting a {NODES}-node Tandem cluster (tandem up --detach)");
    let tandem = LocalCluster::start(NODES).await?;
    eprintln!("  in {}", tandem.dir().display());
    let measured = async {
        let v = tandem.create_volume(VOLUME_NAME, VOLUME_BYTES).await?;
        eprintln!("volume {VOLUME_NAME} ({}): primary node {}, ISR {:?}", format_size(VOLUME_BYTES), v.primary, v.isr);
        let api = Api::new(&tandem.leader_api().await?.to_string());
        let site = tandem.config()?.nodes.first().map(|n| n.site.clone()).unwrap_or_else(|| "local".into());
        let host = serde_json::json!({ "name": HOST_NAME, "site": site });
        api.request::<_, serde_json::Value>(reqwest::Method::POST, "/v1/hosts", Some(&host)).await?;
        let connect = serde_json::json!({ "volume": VOLUME_NAME });
        api.request::<_, serde_json::Value>(reqwest::Method::POST, &format!("/v1/hosts/{HOST_NAME}/volumes"), Some(&connect))
            .await?;
        let mut kills = Vec::new();
        for kill in 1..=args.kills {
            let k = one_kill(&tandem, kill).await.with_context(|| format!("kill {kill}/{}", args.kills))?;
            eprintln!(
                "kill {kill}/{}: node {} (raft leader: {}), stall {:.0} ms, path map {} ms, {} failed writes, new primary {}, back in the ISR {:.1} s after its restart",
                args.kills,
                k.killed_node,
                k.killed_raft_leader,
                k.stall_ms,
                k.path_map_ms.map_or("-".to_string(), |v| format!("{v:.0}")),
                k.writes_failed,
                k.new_primary.map_or("none".to_string(), |p| p.to_string()),
                k.rejoin_s
            );
            kills.push(k);
        }
        anyhow::Ok(kills)
    }
    .await;
    eprintln!("stopping the Tandem cluster");
    let stopped = tandem.stop().await;
    let kills = measured?;
    stopped?;
    let report = report(kills);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn one_kill(tandem: &LocalCluster, kill: u32) -> anyhow::Result<Kill> {
    let all: Vec<NodeId> = tandem.node_apis()?.into_iter().map(|(id, _)| id).collect();
    let before = tandem.volume(VOLUME_NAME, None).await?;
    if sorted(&before.isr) != sorted(&all) {
        bail!("the ISR is {:?}, not every node, before the kill", before.isr);
    }
    let victim = before.primary;
    let killed_raft_leader = raft_leader(tandem).await? == Some(victim);
    let cfg = tandem.config()?;
    let client = cfg
        .nodes
        .iter()
        .find(|n| n.id != victim)
        .ok_or_else(|| anyhow!("the cluster has no node besides the primary"))?;
    let client_node = client.id;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let seed = 0x5eed_0000 + u64::from(kill);
    let writer = {
        let (stop, acked, addr) = (stop.clone(), acked.clone(), client.nbd_addr);
        std::thread::spawn(move || write_load(addr, seed, &stop, &acked))
    };
    let watch_api = Api::new(&client.api_addr.to_string()).with_timeout(Duration::from_millis(WATCH_WAIT_MS + 5_000));
    let first: PathMapView = watch_api.get(&format!("/v1/hosts/{HOST_NAME}/paths")).await?;
    let watcher = tokio::spawn(watch_paths(watch_api, first.generation, victim));
    let measured = async {
        wait_until("the write load to start", Duration::from_secs(60), || acked.load(Ordering::Relaxed) > 0).await?;
        tokio::time::sleep(STEADY_BEFORE_KILL).await;
        tandem.kill9(victim)?;
        let killed_at = Instant::now();
        let acked_at_kill = acked.load(Ordering::Relaxed);
        eprintln!("kill {kill}: killed node {victim} (the primary) under load; writes through node {client_node}");
        // Until writes have resumed for a while and a survivor shows the new primary.
        let mut resumed_at = None;
        let mut failover: Option<(Instant, NodeId, u64)> = None;
        loop {
            let now = Instant::now();
            if resumed_at.is_none() && acked.load(Ordering::Relaxed) > acked_at_kill + 1 {
                resumed_at = Some(now);
            }
            if failover.is_none() {
                if let Ok(v) = tandem.volume(VOLUME_NAME, Some(victim)).await {
                    if v.epoch > before.epoch && v.primary != victim {
                        failover = Some((Instant::now(), v.primary, v.epoch));
                    }
                }
            }
            let settled = resumed_at.is_some_and(|t| now.duration_since(t) >= STEADY_AFTER_RESUME);
            if (settled && failover.is_some()) || now.duration_since(killed_at) >= RESUME_WAIT {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        anyhow::Ok((killed_at, failover))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::time::timeout(RESUME_WAIT, watcher).await.ok().and_then(Result::ok).unwrap_or_default();
    let load = tokio::task::spawn_blocking(move || writer.join())
        .await
        .context("cannot join the write load")?
        .map_err(|_| anyhow!("the write load crashed"))?;
    let (killed_at, failover) = measured?;

    let end = Instant::now();
    let stall = longest_gap(&load.completions, end);
    let resume = load.completions.iter().find(|&&t| t > killed_at).map(|&t| ms(t - killed_at));

    eprintln!("kill {kill}: restarting node {victim} (tandem up --detach)");
    let restarted_at = Instant::now();
    tandem.restart_missing().await?;
    let deadline = restarted_at + REJOIN_WAIT;
    loop {
        if let Ok(v) = tandem.volume(VOLUME_NAME, None).await {
            if sorted(&v.isr) == sorted(&all) {
                break;
            }
        }
        if Instant::now() >= deadline {
            bail!("node {victim} is not back in the ISR within {REJOIN_WAIT:?} of its restart");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(Kill {
        kill,
        killed_node: victim,
        killed_raft_leader,
        client_node,
        new_primary: failover.map(|f| f.1),
        new_epoch: failover.map(|f| f.2),
        stall_ms: ms(stall),
        resume_ms: resume,
        failover_seen_ms: failover.map(|f| ms(f.0 - killed_at)),
        path_map_ms: seen.without_victim.map(|t| ms(t.saturating_duration_since(killed_at))),
        path_map_first_change_ms: seen.first_change.map(|t| ms(t.saturating_duration_since(killed_at))),
        writes_acked: load.completions.len() as u64,
        writes_failed: load.failed,
        errors: load.errors,
        rejoin_s: restarted_at.elapsed().as_secs_f64(),
    })
}

/// When the watching host saw what.
#[derive(Default)]
struct Seen {
    first_change: Option<Instant>,
    without_victim: Option<Instant>,
}

/// Follows the host's path map with the long-poll, as a host agent does, until a map shows
/// every path of `victim` unavailable and another node's path active-optimized.
async fn watch_paths(api: Api, mut generation: u64, victim: NodeId) -> Seen {
    let mut seen = Seen::default();
    let deadline = Instant::now() + RESUME_WAIT;
    while Instant::now() < deadline {
        let path = format!("/v1/hosts/{HOST_NAME}/paths?since={generation}&wait_ms={WATCH_WAIT_MS}");
        let map: PathMapView = match api.get(&path).await {
            Ok(m) => m,
            Err(_) => {
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let now = Instant::now();
        if map.generation <= generation {
            continue;
        }
        generation = map.generation;
        seen.first_change.get_or_insert(now);
        let paths = map.volumes.iter().flat_map(|v| v.paths.iter());
        let victim_gone = paths.clone().filter(|p| p.node == victim).all(|p| p.state == PathState::Unavailable);
        let other_optimized = paths.clone().any(|p| p.node != victim && p.state == PathState::ActiveOptimized);
        if victim_gone && other_optimized {
            seen.without_victim = Some(now);
            return seen;
        }
    }
    seen
}

/// The Raft leader's id, as the first node that knows it says.
async fn raft_leader(tandem: &LocalCluster) -> anyhow::Result<Option<NodeId>> {
    for (_, addr) in tandem.node_apis()? {
        let api = Api::new(&addr.to_string()).with_timeout(Duration::from_secs(2));
        if let Ok(view) = api.get::<ClusterView>("/v1/cluster").await {
            if view.raft.leader.is_some() {
                return Ok(view.raft.leader);
            }
        }
    }
    Ok(None)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            bail!("no {what} within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

fn sorted(ids: &[NodeId]) -> Vec<NodeId> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The longest gap between consecutive completions, counting the time from the last one to
/// `end` (so writes that never resumed show as a stall up to the end).
fn longest_gap(completions: &[Instant], end: Instant) -> Duration {
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
struct Load {
    /// When each acknowledged write completed, in order.
    completions: Vec<Instant>,
    failed: u64,
    errors: Vec<String>,
}

/// Writes random 4 KiB blocks, one at a time, through `addr` until `stop`, reconnecting (to the
/// same node) when the connection breaks. A write answered with an error, or whose connection
/// broke before its answer, counts as failed.
fn write_load(addr: SocketAddr, seed: u64, stop: &AtomicBool, acked: &AtomicU64) -> Load {
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
            match NbdClient::connect(addr, VOLUME_NAME) {
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
            Err(WriteError::Refused(e)) => {
                load.failed += 1;
                note(&mut load, format!("write: server error {e}"));
            }
            Err(WriteError::Io(e)) => {
                load.failed += 1;
                note(&mut load, format!("write: {e}"));
                client = None;
            }
        }
    }
    load
}

fn report(kills: Vec<Kill>) -> Report {
    let stalls: Vec<f64> = kills.iter().map(|k| k.stall_ms).collect();
    let resumes: Vec<f64> = kills.iter().filter_map(|k| k.resume_ms).collect();
    let rejoins: Vec<f64> = kills.iter().map(|k| k.rejoin_s).collect();
    // A kill whose map never came counts as the longest possible wait.
    let maps: Vec<f64> = kills.iter().map(|k| k.path_map_ms.unwrap_or(ms(RESUME_WAIT))).collect();
    let summary = Summary {
        stall_ms_median: load::median(&stalls),
        stall_ms_max: stalls.iter().copied().fold(0.0, f64::max),
        resume_ms_median: load::median(&resumes),
        rejoin_s_median: load::median(&rejoins),
        path_map_ms_median: load::median(&maps),
        path_map_ms_max: maps.iter().copied().fold(0.0, f64::max),
        writes_failed: kills.iter().map(|k| k.writes_failed).sum(),
    };
    let failure_timeout_ms = ms(FAILURE_TIMEOUT);
    let stall_target_ms = 1.5 * failure_timeout_ms;
    let goals = vec![
        Goal::absolute_in("failover-write-stall", summary.stall_ms_max, 0, "ms", Op::AtMost, stall_target_ms),
        Goal::absolute_in(
            "failover-path-map-p50",
            summary.path_map_ms_median,
            0,
            "ms",
            Op::AtMost,
            ms(PATH_MAP_TARGET),
        ),
    ];
    Report {
        benchmark: "failover",
        tandem_nodes: NODES,
        volume_bytes: VOLUME_BYTES,
        write_range_bytes: WRITE_RANGE_BYTES,
        block_bytes: BLOCK_BYTES,
        failure_timeout_ms,
        stall_target_ms,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        kills,
        summary,
        goals,
    }
}

fn print_table(r: &Report) {
    println!(
        "bench failover: kill -9 of the primary under 4 KiB writes (qd 1) through another node; {} kills; {} cores",
        r.kills.len(),
        r.cores
    );
    println!(
        "tandem: {} nodes (this binary), a {} volume replicated {} ways, writes to random blocks of its first {}; FAILURE_TIMEOUT {:.0} ms",
        r.tandem_nodes,
        format_size(r.volume_bytes),
        r.tandem_nodes,
        format_size(r.write_range_bytes),
        r.failure_timeout_ms
    );
    println!("stall: the longest gap between two acknowledged writes; rejoin: from the restart until the ISR is full");
    println!("path map: from the kill until a host watching its map (long-poll via the client node) had one without the killed node");
    println!();
    println!(
        "{:>4} {:>6} {:>7} {:>6} {:>8} {:>9} {:>10} {:>11} {:>11} {:>7} {:>6} {:>9}",
        "kill",
        "killed",
        "leader?",
        "client",
        "new prim",
        "stall ms",
        "resume ms",
        "failover ms",
        "path map ms",
        "writes",
        "failed",
        "rejoin s"
    );
    for k in &r.kills {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:>4} {:>6} {:>7} {:>6} {:>8} {:>9.0} {:>10} {:>11} {:>11} {:>7} {:>6} {:>9.1}",
            k.kill,
            k.killed_node,
            if k.killed_raft_leader { "yes" } else { "no" },
            k.client_node,
            k.new_primary.map_or("-".to_string(), |p| p.to_string()),
            k.stall_ms,
            opt(k.resume_ms),
            opt(k.failover_seen_ms),
            opt(k.path_map_ms),
            k.writes_acked,
            k.writes_failed,
            k.rejoin_s
        );
    }
    let s = &r.summary;
    println!();
    println!(
        "stall ms: median {:.0}, max {:.0}; resume ms median {:.0}; rejoin s median {:.1}; failed writes {}",
        s.stall_ms_median, s.stall_ms_max, s.resume_ms_median, s.rejoin_s_median, s.writes_failed
    );
    println!(
        "path map at a watching host (kill -> map without the killed node): median {:.0} ms, max {:.0} ms",
        s.path_map_ms_median, s.path_map_ms_max
    );
    for e in r.kills.iter().flat_map(|k| k.errors.iter().map(move |e| (k.kill, e))) {
        println!("kill {}: {}", e.0, e.1);
    }
    println!();
    for g in &r.goals {
        println!("{}", g.line);
    }
}

// A minimal NBD client, written from the protocol document: fixed newstyle handshake with
// NBD_OPT_GO, then NBD_CMD_WRITE requests one at a time with simple replies.

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERROR_BIT: u32 = 0x8000_0000;
const CMD_WRITE: u16 = 1;
/// An option reply longer than this is a broken server, not data.
const OPT_REPLY_BYTES_MAX: usize = 64 * 1024;

enum WriteError {
    /// The server answered with this NBD error; the connection is still usable.
    Refused(u32),
    /// The connection broke, or the answer made no sense.
    Io(std::io::Error),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> WriteError {
        WriteError::Io(e)
    }
}

struct NbdClient {
    sock: TcpStream,
    cookie: u64,
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn protocol_error(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

impl NbdClient {
    fn connect(addr: SocketAddr, export: &str) -> std::io::Result<NbdClient> {
        let sock = TcpStream::connect_timeout(&addr, NBD_CONNECT_TIMEOUT)?;
        sock.set_read_timeout(Some(NBD_IO_TIMEOUT))?;
        sock.set_write_timeout(Some(NBD_IO_TIMEOUT))?;
        sock.set_nodelay(true)?;
        let mut c = NbdClient { sock, cookie: 0 };
        let mut hello = [0u8; 18];
        c.sock.read_exact(&mut hello)?;
        if be_u64(&hello) != NBDMAGIC || be_u64(&hello[8..]) != IHAVEOPT {
            return Err(protocol_error("not an NBD newstyle server".into()));
        }
        c.sock.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let name = export.as_bytes();
        let mut opt = Vec::with_capacity(16 + 4 + name.len() + 2);
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        // No information requests: the server sends NBD_INFO_EXPORT anyway.
        opt.extend_from_slice(&0u16.to_be_bytes());
        c.sock.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            c.sock.read_exact(&mut h)?;
            if be_u64(&h) != OPT_REPLY_MAGIC {
                return Err(protocol_error("bad option reply magic".into()));
            }
            let kind = be_u32(&h[12..]);
            let len = be_u32(&h[16..]) as usize;
            if len > OPT_REPLY_BYTES_MAX {
                return Err(protocol_error(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len];
            c.sock.read_exact(&mut data)?;
            if kind == REP_ACK {
                return Ok(c);
            }
            if kind & REP_ERROR_BIT != 0 {
                return Err(protocol_error(format!(
                    "export {export:?} refused ({kind:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            // NBD_REP_INFO and anything else before the ACK: nothing the load needs.
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&CMD_WRITE.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        self.sock.write_all(&r)?;
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if be_u32(&h) != SIMPLE_REPLY_MAGIC || be_u64(&h[8..]) != self.cookie {
            return Err(WriteError::Io(protocol_error("bad reply header".into())));
        }
        match be_u32(&h[4..]) {
            0 => Ok(()),
            e => Err(WriteError::Refused(e)),
        }
    }
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
