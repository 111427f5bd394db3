//! `tandem bench transport`: node-to-node messaging over the Mesh (mutual TLS) on TCP and on
//! QUIC, beside plaintext TCP between the same two processes, in the same run (see
//! ../../shared/design/BENCH.md).
//!
//! The benchmark process is node 1. It writes a throwaway CA and certificates for nodes 1 and 2
//! into a temporary dir and starts this binary again as `bench transport-peer` (node 2): a Mesh
//! whose handler echoes payloads of up to 4 KiB and answers larger ones with an empty reply
//! (so throughput is one-directional), and a plaintext TCP server with the same rule and
//! length-prefixed frames (u32 BE length + payload). The peer prints its two addresses as one
//! JSON line on stdout and runs until its stdin closes; a guard kills it if the benchmark ends
//! any other way.
//!
//! Node 1 has one Mesh. Before each Mesh run its data layer is switched to the kind measured,
//! and the run starts only once both data links (Bulk and Replication) have exactly one pipe,
//! of that kind, so the measured layer is the only one carrying traffic. Every system is
//! driven by the client loop of `load.rs`:
//! - throughput: 1 MiB messages, 8 senders (8 in flight) on the Bulk channel; plaintext uses
//!   one TCP connection per sender;
//! - round trip: 4 KiB request and 4 KiB reply, 1 in flight, on the Replication channel.
//!
//! Each repeat runs plaintext, tcp+tls, quic for throughput, then the same for the round trip;
//! figures are medians over the repeats and the ratios are of those medians. Each repeat then
//! runs the switch test: 4 KiB requests pipelined 32 deep on the Replication channel, once with
//! no switch and once flipping the data layer QUIC<->TCP every 300 ms; the figure is the longest
//! gap between two consecutive completions, the worst over the repeats.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tandem_transport::link::{Listeners, Mesh};
use tandem_transport::ring::RegionRegistry;
use tandem_transport::tls::{generate_ca, issue_node_cert, Identity};
use tandem_transport::{BoxFuture, Channel, Handler, Layer, Transport, TransportKind};
use tandem_types::NodeId;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::goal::{Goal, Op};
use crate::load::{self, KvClient, RunFigures, PUT_TIMEOUT};

const CLIENT_ID: NodeId = 1;
const PEER_ID: NodeId = 2;
const CLUSTER_NAME: &str = "bench-transport";
const LOOPBACK: &str = "127.0.0.1:0";

const MIB: usize = 1024 * 1024;
/// Throughput messages; the peer answers them with an empty reply.
const BULK_BYTES: usize = MIB;
const BULK_IN_FLIGHT: usize = 8;
/// Round-trip messages, request and reply.
const SMALL_BYTES: usize = 4 * 1024;
/// The peer echoes payloads up to this size and answers larger ones with an empty reply.
const ECHO_MAX: usize = SMALL_BYTES;
/// A plaintext frame longer than this is a protocol error, not an allocation.
const PLAIN_FRAME_MAX: usize = 16 * MIB;
/// Buffers of the plaintext connections, as the Mesh's pipes coalesce up to 64 KiB.
const PLAIN_BUF_BYTES: usize = 64 * 1024;

/// The switch test: requests in flight, how often the data layer flips.
const SWITCH_IN_FLIGHT: usize = 32;
const SWITCH_INTERVAL: Duration = Duration::from_millis(300);

/// The Mesh's region pool; this benchmark registers no region, so it is kept small.
const REGION_BUFFERS: usize = 4;
const REGION_BYTES: usize = MIB;
const REGION_COMPLETIONS_MAX: usize = 1024;

/// Starting the peer (certificates, listeners) on a loaded machine.
const PEER_START_WAIT: Duration = Duration::from_secs(30);
/// The peer exits on its own when its stdin closes; after this it is killed.
const PEER_STOP_WAIT: Duration = Duration::from_secs(10);
/// Until both data links run on the selected layer alone after a switch.
const SETTLE_WAIT: Duration = Duration::from_secs(15);
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Bounds on the flags, and so on the run time and on the latencies held in memory.
const REPEATS_MAX: i64 = 100;
const SECONDS_MAX: u64 = 600;

#[derive(Args)]
pub struct TransportArgs {
    /// How many times the runs are repeated; each figure is the median over the repeats.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=REPEATS_MAX))]
    repeats: u32,
    /// How long each run sends, in seconds (also the length of each switch-test run).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=SECONDS_MAX))]
    seconds: u64,
    /// Print the result as one JSON document, and nothing else on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PeerArgs {
    /// The dir holding ca.pem, node-2.pem and node-2.key.
    #[arg(long)]
    dir: PathBuf,
}

/// What the peer prints, as one JSON line, once it listens.
#[derive(Serialize, Deserialize)]
struct PeerAddrs {
    mesh: SocketAddr,
    plaintext: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum System {
    #[serde(rename = "plaintext")]
    Plaintext,
    #[serde(rename = "tcp+tls")]
    TcpTls,
    #[serde(rename = "quic")]
    Quic,
}

const SYSTEMS: [System; 3] = [System::Plaintext, System::TcpTls, System::Quic];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Plaintext => "plaintext",
            System::TcpTls => "tcp+tls",
            System::Quic => "quic",
        }
    }

    fn kind(self) -> Option<TransportKind> {
        match self {
            System::Plaintext => None,
            System::TcpTls => Some(TransportKind::Tcp),
            System::Quic => Some(TransportKind::Quic),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Test {
    Throughput,
    Rtt,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Throughput => "throughput",
            Test::Rtt => "round trip",
        }
    }
}

#[derive(Serialize)]
struct Run {
    repeat: u32,
    test: Test,
    system: System,
    messages: u64,
    elapsed_s: f64,
    messages_per_s: f64,
    mib_per_s: f64,
    /// Per-message latency (at 8 in flight for throughput runs).
    p50_us: f64,
    p99_us: f64,
}

impl Run {
    fn new(repeat: u32, test: Test, system: System, f: &RunFigures) -> Run {
        let bytes = match test {
            Test::Throughput => BULK_BYTES,
            Test::Rtt => SMALL_BYTES,
        };
        Run {
            repeat,
            test,
            system,
            messages: f.writes,
            elapsed_s: f.elapsed_s,
            messages_per_s: f.writes_per_s,
            mib_per_s: f.writes_per_s * bytes as f64 / MIB as f64,
            p50_us: f.p50_ms * 1000.0,
            p99_us: f.p99_ms * 1000.0,
        }
    }
}

/// One system's medians, and its ratios to plaintext's.
#[derive(Serialize)]
struct Row {
    system: System,
    throughput_mib_per_s: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    throughput_ratio: f64,
    rtt_p50_ratio: f64,
    rtt_p99_ratio: f64,
}

/// One run of the switch test.
#[derive(Serialize)]
struct StallRun {
    repeat: u32,
    switching: bool,
    /// The data layer the run started on.
    start: TransportKind,
    /// `set_kind` calls made during the run.
    flips: u64,
    /// Moves from one layer to the other that the Replication link completed.
    switches: u64,
    completed: u64,
    failed: u64,
    /// The first few failures, for the report.
    errors: Vec<String>,
    requests_per_s: f64,
    /// The longest gap between two consecutive completed requests.
    longest_stall_ms: f64,
}

#[derive(Serialize)]
struct SwitchSummary {
    interval_ms: u64,
    in_flight: usize,
    message_bytes: usize,
    /// Worst over the switching runs.
    longest_stall_ms: f64,
    /// Worst over the runs with the same load and no switch.
    baseline_longest_stall_ms: f64,
    /// Over all switching runs.
    failed_requests: u64,
    switches: u64,
    flips: u64,
    /// Median of the runs' ratios of requests/s, switching over not.
    requests_per_s_ratio: f64,
    runs: Vec<StallRun>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    throughput_message_bytes: usize,
    throughput_in_flight: usize,
    rtt_message_bytes: usize,
    seconds_per_run: u64,
    repeats: u32,
    cores: usize,
    /// Medians over the repeats.
    rows: Vec<Row>,
    switch: SwitchSummary,
    runs: Vec<Run>,
    goals: Vec<Goal>,
}

pub async fn run(args: TransportArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("tandem-bench-transport-")
        .tempdir()
        .context("cannot make a temporary dir for the certificates")?;
    write_certificates(dir.path())?;
    eprintln!("starting the peer process (node {PEER_ID})");
    let mut peer = PeerProcess::start(dir.path()).await?;
    eprintln!("  mesh on {}, plaintext on {}", peer.addrs.mesh, peer.addrs.plaintext);
    let (mesh, _) = start_mesh(dir.path(), CLIENT_ID).await?;
    mesh.set_peer_addr(PEER_ID, peer.addrs.mesh);
    let measured = measure(&args, &mesh, peer.addrs.plaintext).await;
    mesh.shutdown();
    let stopped = peer.stop().await;
    let (runs, stall_runs) = measured?;
    stopped?;
    let report = report(&args, runs, stall_runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn cert_paths(dir: &Path, id: NodeId) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join(format!("node-{id}.pem")), dir.join(format!("node-{id}.key")))
}

fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    let ca = generate_ca(CLUSTER_NAME).context("cannot make the CA")?;
    let (ca_path, _, _) = cert_paths(dir, CLIENT_ID);
    std::fs::write(&ca_path, &ca.cert_pem).with_context(|| format!("cannot write {}", ca_path.display()))?;
    for id in [CLIENT_ID, PEER_ID] {
        let pair = issue_node_cert(CLUSTER_NAME, &ca.key_pem, id)
            .with_context(|| format!("cannot issue the certificate of node {id}"))?;
        let (_, cert, key) = cert_paths(dir, id);
        std::fs::write(&cert, &pair.cert_pem).with_context(|| format!("cannot write {}", cert.display()))?;
        std::fs::write(&key, &pair.key_pem).with_context(|| format!("cannot write {}", key.display()))?;
    }
    Ok(())
}

/// Node `id`'s Mesh on 127.0.0.1, and its address (TCP and UDP share the port).
async fn start_mesh(dir: &Path, id: NodeId) -> anyhow::Result<(Mesh, SocketAddr)> {
    let (ca, cert, key) = cert_paths(dir, id);
    let identity = Identity::load(id, &ca, &cert, &key).with_context(|| format!("cannot load node {id}'s identity"))?;
    let addr: SocketAddr = LOOPBACK.parse().context("bad loopback address")?;
    let listeners = Listeners::bind(addr).await.with_context(|| format!("node {id}: cannot bind {addr}"))?;
    let bound = listeners.tcp.local_addr().with_context(|| format!("node {id}: mesh listener address"))?;
    let regions = RegionRegistry::new(REGION_BUFFERS, REGION_BYTES, REGION_COMPLETIONS_MAX);
    // The layers start on TCP; each Mesh run selects its own.
    let mesh = Mesh::start(&identity, listeners, TransportKind::Tcp, TransportKind::Tcp, regions)
        .with_context(|| format!("node {id}: cannot start the mesh"))?;
    Ok((mesh, bound))
}

/// The peer process, killed when the guard goes unless it was stopped.
struct PeerProcess {
    child: tokio::process::Child,
    /// Closing it tells the peer to exit.
    stdin: Option<tokio::process::ChildStdin>,
    addrs: PeerAddrs,
}

impl PeerProcess {
    async fn start(dir: &Path) -> anyhow::Result<PeerProcess> {
        let exe = std::env::current_exe().context("cannot find the tandem executable")?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["bench", "transport-peer", "--dir"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The peer's logs and errors go where ours go.
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} bench transport-peer", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        // From here on the guard kills the peer, whatever happens.
        let mut peer = PeerProcess { child, stdin, addrs: PeerAddrs { mesh: unspecified(), plaintext: unspecified() } };
        let stdout = stdout.ok_or_else(|| anyhow!("the peer's stdout is not piped"))?;
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        let read = stdout.read_line(&mut line);
        let n = tokio::time::timeout(PEER_START_WAIT, read)
            .await
            .map_err(|_| anyhow!("the peer did not report its addresses within {PEER_START_WAIT:?}"))?
            .context("cannot read the peer's stdout")?;
        if n == 0 {
            let status = peer.child.try_wait().ok().flatten();
            bail!("the peer exited before reporting its addresses (status {status:?}; its errors are above)");
        }
        peer.addrs = serde_json::from_str(line.trim())
            .with_context(|| format!("the peer reported {:?}, not its addresses", line.trim()))?;
        Ok(peer)
    }

    /// Closes the peer's stdin and waits for it to exit; kills it if it does not.
    async fn stop(&mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(PEER_STOP_WAIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(anyhow!("the peer exited with {status}")),
            Ok(Err(e)) => Err(anyhow!("cannot wait for the peer: {e}")),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Err(anyhow!("the peer did not exit within {PEER_STOP_WAIT:?} of its stdin closing; killed it"))
            }
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        // Harmless when it has exited; tokio reaps a child that is not waited for.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

// ---------------------------------------------------------------------------------------------
// The peer process.

/// The peer's reply rule, the same on the Mesh and on plaintext TCP.
fn reply_to(payload: Bytes) -> Bytes {
    if payload.len() <= ECHO_MAX {
        payload
    } else {
        Bytes::new()
    }
}

struct EchoSmall;

impl Handler for EchoSmall {
    fn handle(&self, _from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move { Ok(reply_to(payload)) })
    }
}

/// `tandem bench transport-peer --dir DIR`: node 2 and the plaintext server, until stdin closes.
pub async fn peer(args: PeerArgs) -> anyhow::Result<()> {
    let (mesh, mesh_addr) = start_mesh(&args.dir, PEER_ID).await?;
    let handler: Arc<dyn Handler> = Arc::new(EchoSmall);
    for channel in [Channel::Bulk, Channel::Replication] {
        mesh.set_handler(channel, handler.clone());
    }
    let plain = TcpListener::bind(LOOPBACK).await.context("cannot bind the plaintext listener")?;
    let addrs = PeerAddrs { mesh: mesh_addr, plaintext: plain.local_addr().context("plaintext listener address")? };
    let server = tokio::spawn(serve_plaintext(plain));
    let addrs_line = serde_json::to_string(&addrs).context("cannot encode the addresses")?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{addrs_line}").and_then(|()| out.flush()).context("cannot write to stdout")?;
    }
    // The benchmark closes our stdin when it is done, or when it dies.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 256];
    while stdin.read(&mut sink).await.context("cannot read stdin")? > 0 {}
    server.abort();
    mesh.shutdown();
    Ok(())
}

async fn serve_plaintext(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = serve_plaintext_conn(stream).await {
                        tracing::debug!(error = %e, "plaintext connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "plaintext accept failed");
                // Out of descriptors or similar: do not spin on the error.
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }
}

async fn serve_plaintext_conn(stream: TcpStream) -> std::io::Result<()> {
    let mut conn = PlainConn::new(stream)?;
    while let Some(payload) = read_plain_frame(&mut conn.r).await? {
        write_plain_frame(&mut conn.w, &reply_to(payload)).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Plaintext framing, both sides.

struct PlainConn {
    r: BufReader<OwnedReadHalf>,
    w: BufWriter<OwnedWriteHalf>,
}

impl PlainConn {
    fn new(stream: TcpStream) -> std::io::Result<PlainConn> {
        // As the Mesh's TCP pipes: no Nagle delay on small frames.
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(PlainConn {
            r: BufReader::with_capacity(PLAIN_BUF_BYTES, r),
            w: BufWriter::with_capacity(PLAIN_BUF_BYTES, w),
        })
    }
}

/// Reads one frame into a fresh buffer, as the Mesh hands each payload on as its own `Bytes`;
/// `None` on a clean end of stream between frames.
async fn read_plain_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > PLAIN_FRAME_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes, more than {PLAIN_FRAME_MAX}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(payload.into()))
}

/// Writes one frame and flushes; a large payload goes straight from its buffer (`BufWriter`
/// passes writes larger than its capacity through), a small one in the same write as its length.
async fn write_plain_frame<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame longer than 4 GiB"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await?;
    w.flush().await
}

// ---------------------------------------------------------------------------------------------
// The clients, driven by `load::run`.

fn check_reply(got: usize, want: usize) -> anyhow::Result<()> {
    if got != want {
        bail!("reply of {got} bytes, expected {want}");
    }
    Ok(())
}

/// One plaintext connection, one request in flight.
struct PlainClient {
    conn: tokio::sync::Mutex<PlainConn>,
    reply_bytes: usize,
}

impl PlainClient {
    async fn connect(addr: SocketAddr, reply_bytes: usize) -> anyhow::Result<PlainClient> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        let conn = PlainConn::new(stream).context("cannot set up the plaintext connection")?;
        Ok(PlainClient { conn: tokio::sync::Mutex::new(conn), reply_bytes })
    }
}

impl KvClient for PlainClient {
    async fn put(&self, _key: &str, value: &Bytes) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().await;
        let conn = &mut *conn;
        write_plain_frame(&mut conn.w, value).await.context("plaintext send")?;
        let reply = read_plain_frame(&mut conn.r)
            .await
            .context("plaintext reply")?
            .ok_or_else(|| anyhow!("the peer closed the plaintext connection"))?;
        check_reply(reply.len(), self.reply_bytes)
    }
}

/// A caller of the Mesh; all callers of a channel share its one link.
struct MeshClient {
    mesh: Mesh,
    channel: Channel,
    reply_bytes: usize,
}

impl KvClient for MeshClient {
    async fn put(&self, _key: &str, value: &Bytes) -> anyhow::Result<()> {
        let reply = self.mesh.call(PEER_ID, self.channel, value.clone()).await?;
        check_reply(reply.len(), self.reply_bytes)
    }
}

/// Selects `kind` for the data layer and waits until both data links run on it alone: one pipe,
/// of that kind (make-before-break keeps the old one until its requests are answered).
async fn settle(mesh: &Mesh, kind: TransportKind) -> anyhow::Result<()> {
    mesh.set_kind(Layer::Data, kind);
    let probe = Bytes::from_static(b"settle");
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        for channel in [Channel::Bulk, Channel::Replication] {
            tokio::time::timeout(PUT_TIMEOUT, mesh.call(PEER_ID, channel, probe.clone()))
                .await
                .map_err(|_| anyhow!("{channel}: no reply within {PUT_TIMEOUT:?} after switching to {kind}"))?
                .with_context(|| format!("{channel}: request after switching to {kind}"))?;
        }
        let stats = mesh.link_stats();
        let settled = [Channel::Bulk, Channel::Replication].iter().all(|&channel| {
            stats.iter().any(|s| s.peer == PEER_ID && s.channel == channel && s.transport == Some(kind) && s.pipes == 1)
        });
        if settled {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the data links did not move to {kind} alone within {SETTLE_WAIT:?}: {stats:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn measure_run(
    test: Test,
    system: System,
    duration: Duration,
    mesh: &Mesh,
    plaintext: SocketAddr,
) -> anyhow::Result<RunFigures> {
    let (channel, bytes, senders, reply_bytes) = match test {
        Test::Throughput => (Channel::Bulk, BULK_BYTES, BULK_IN_FLIGHT, 0),
        Test::Rtt => (Channel::Replication, SMALL_BYTES, 1, SMALL_BYTES),
    };
    let payload = Bytes::from((0..bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let prefix = format!("{}.{}", test.name(), system.name());
    match system.kind() {
        None => {
            let clients =
                futures::future::try_join_all((0..senders).map(|_| PlainClient::connect(plaintext, reply_bytes)))
                    .await?;
            load::run(clients, duration, &prefix, payload).await
        }
        Some(kind) => {
            settle(mesh, kind).await?;
            let clients = (0..senders).map(|_| MeshClient { mesh: mesh.clone(), channel, reply_bytes }).collect();
            load::run(clients, duration, &prefix, payload).await
        }
    }
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
async fn stall_run(
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

async fn measure(
    args: &TransportArgs,
    mesh: &Mesh,
    plaintext: SocketAddr,
) -> anyhow::Result<(Vec<Run>, Vec<StallRun>)> {
    let duration = Duration::from_secs(args.seconds);
    let mut runs = Vec::new();
    let mut stall_runs = Vec::new();
    for repeat in 1..=args.repeats {
        for test in [Test::Throughput, Test::Rtt] {
            for system in SYSTEMS {
                let what = format!("repeat {repeat}/{}: {} {}", args.repeats, system.name(), test.name());
                let figures =
                    measure_run(test, system, duration, mesh, plaintext).await.with_context(|| what.clone())?;
                let run = Run::new(repeat, test, system, &figures);
                match test {
                    Test::Throughput => eprintln!("{what}: {:.0} MiB/s", run.mib_per_s),
                    Test::Rtt => eprintln!("{what}: p50 {:.1} µs, p99 {:.1} µs", run.p50_us, run.p99_us),
                }
                runs.push(run);
            }
        }
        // Alternate the starting layer, so that both layers' baselines are seen.
        let start = if repeat % 2 == 1 { TransportKind::Tcp } else { TransportKind::Quic };
        for switching in [false, true] {
            let what = format!(
                "repeat {repeat}/{}: {SWITCH_IN_FLIGHT} x 4 KiB in flight from {start}, {}",
                args.repeats,
                if switching {
                    format!("switching every {} ms", SWITCH_INTERVAL.as_millis())
                } else {
                    "no switch".into()
                }
            );
            let r = stall_run(mesh, repeat, start, switching, duration).await.with_context(|| what.clone())?;
            eprintln!(
                "{what}: longest stall {:.1} ms, {:.0} requests/s, {} switches, {} failed{}",
                r.longest_stall_ms,
                r.requests_per_s,
                r.switches,
                r.failed,
                r.errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
            );
            stall_runs.push(r);
        }
    }
    Ok((runs, stall_runs))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn report(args: &TransportArgs, runs: Vec<Run>, stall_runs: Vec<StallRun>) -> Report {
    let median = |test: Test, system: System, f: fn(&Run) -> f64| {
        let v: Vec<f64> = runs.iter().filter(|r| r.test == test && r.system == system).map(f).collect();
        load::median(&v)
    };
    let plain_mib = median(Test::Throughput, System::Plaintext, |r| r.mib_per_s);
    let plain_p50 = median(Test::Rtt, System::Plaintext, |r| r.p50_us);
    let plain_p99 = median(Test::Rtt, System::Plaintext, |r| r.p99_us);
    let rows: Vec<Row> = SYSTEMS
        .iter()
        .map(|&system| {
            let mib = median(Test::Throughput, system, |r| r.mib_per_s);
            let p50 = median(Test::Rtt, system, |r| r.p50_us);
            let p99 = median(Test::Rtt, system, |r| r.p99_us);
            Row {
                system,
                throughput_mib_per_s: mib,
                rtt_p50_us: p50,
                rtt_p99_us: p99,
                throughput_ratio: ratio(mib, plain_mib),
                rtt_p50_ratio: ratio(p50, plain_p50),
                rtt_p99_ratio: ratio(p99, plain_p99),
            }
        })
        .collect();

    let worst = |switching: bool| {
        stall_runs.iter().filter(|r| r.switching == switching).map(|r| r.longest_stall_ms).fold(0.0, f64::max)
    };
    let switching_runs = || stall_runs.iter().filter(|r| r.switching);
    let rps_ratios: Vec<f64> = (1..=args.repeats)
        .filter_map(|repeat| {
            let of = |switching: bool| {
                stall_runs.iter().find(|r| r.repeat == repeat && r.switching == switching).map(|r| r.requests_per_s)
            };
            Some(ratio(of(true)?, of(false)?))
        })
        .collect();
    let switch = SwitchSummary {
        interval_ms: SWITCH_INTERVAL.as_millis() as u64,
        in_flight: SWITCH_IN_FLIGHT,
        message_bytes: SMALL_BYTES,
        longest_stall_ms: worst(true),
        baseline_longest_stall_ms: worst(false),
        failed_requests: switching_runs().map(|r| r.failed).sum(),
        switches: switching_runs().map(|r| r.switches).sum(),
        flips: switching_runs().map(|r| r.flips).sum(),
        requests_per_s_ratio: load::median(&rps_ratios),
        runs: stall_runs,
    };

    let row = |system: System| rows.iter().find(|r| r.system == system);
    let figure = |system: System, f: fn(&Row) -> f64| row(system).map(f).unwrap_or(f64::NAN);
    let goals = vec![
        Goal::ratio(
            "transport-tls-throughput",
            figure(System::TcpTls, |r| r.throughput_ratio),
            "plaintext",
            Op::AtLeast,
            0.5,
        ),
        Goal::ratio(
            "transport-quic-throughput",
            figure(System::Quic, |r| r.throughput_ratio),
            "plaintext",
            Op::AtLeast,
            0.25,
        ),
        Goal::ratio("transport-tls-rtt", figure(System::TcpTls, |r| r.rtt_p50_ratio), "plaintext", Op::AtMost, 2.0),
        Goal::ratio("transport-quic-rtt", figure(System::Quic, |r| r.rtt_p50_ratio), "plaintext", Op::AtMost, 3.0),
        Goal::absolute("transport-switch-failed-requests", switch.failed_requests as f64, 0, Op::AtMost, 0.0),
    ];
    Report {
        benchmark: "transport",
        throughput_message_bytes: BULK_BYTES,
        throughput_in_flight: BULK_IN_FLIGHT,
        rtt_message_bytes: SMALL_BYTES,
        seconds_per_run: args.seconds,
        repeats: args.repeats,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        rows,
        switch,
        runs,
        goals,
    }
}

fn print_table(r: &Report) {
    println!(
        "bench transport: node 1 (this process) to node 2 (a child process) on 127.0.0.1; {} s per run, median of {} interleaved repeats; {} cores",
        r.seconds_per_run, r.repeats, r.cores
    );
    println!(
        "throughput: 1 MiB messages, {} in flight, empty replies (Bulk channel); round trip: 4 KiB request and reply, 1 in flight (Replication channel)",
        r.throughput_in_flight
    );
    println!(
        "tcp+tls, quic: the Mesh with mutual TLS on the data layer; plaintext: the same framing on bare TCP, one connection per sender"
    );
    println!();
    println!(
        "{:<10} {:>9} {:>7} {:>12} {:>7} {:>12} {:>7}",
        "system", "MiB/s", "ratio", "rtt p50 µs", "ratio", "rtt p99 µs", "ratio"
    );
    for row in &r.rows {
        println!(
            "{:<10} {:>9.0} {:>6.2}x {:>12.1} {:>6.2}x {:>12.1} {:>6.2}x",
            row.system.name(),
            row.throughput_mib_per_s,
            row.throughput_ratio,
            row.rtt_p50_us,
            row.rtt_p50_ratio,
            row.rtt_p99_us,
            row.rtt_p99_ratio
        );
    }
    println!();
    let s = &r.switch;
    println!(
        "switch: longest stall {:.1} ms (no-switch baseline {:.1} ms), {} failed; {} switches completed ({} flips, every {} ms) with {} x 4 KiB requests in flight, worst of {} runs; requests/s {:.2}x no-switch",
        s.longest_stall_ms,
        s.baseline_longest_stall_ms,
        s.failed_requests,
        s.switches,
        s.flips,
        s.interval_ms,
        s.in_flight,
        s.runs.iter().filter(|x| x.switching).count(),
        s.requests_per_s_ratio
    );
    for g in &r.goals {
        println!("{}", g.line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_echoes_small_payloads_only() {
        assert_eq!(reply_to(Bytes::from(vec![1u8; SMALL_BYTES])).len(), SMALL_BYTES);
        assert!(reply_to(Bytes::from(vec![1u8; SMALL_BYTES + 1])).is_empty());
    }

    #[tokio::test]
    async fn plaintext_frames_round_trip_and_refuse_oversized_lengths() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut w = BufWriter::new(a);
        let mut r = BufReader::new(b);
        let writer = async {
            write_plain_frame(&mut w, b"hello").await?;
            write_plain_frame(&mut w, b"").await?;
            w.write_all(&((PLAIN_FRAME_MAX + 1) as u32).to_be_bytes()).await?;
            w.flush().await
        };
        let reader = async {
            let first = read_plain_frame(&mut r).await?;
            let second = read_plain_frame(&mut r).await?;
            let third = read_plain_frame(&mut r).await;
            std::io::Result::Ok((first, second, third))
        };
        let (written, read) = tokio::join!(writer, reader);
        written.expect("write");
        let (first, second, third) = read.expect("read");
        assert_eq!(first.as_deref(), Some(&b"hello"[..]));
        assert_eq!(second.as_deref(), Some(&b""[..]));
        assert_eq!(third.expect_err("oversized").kind(), std::io::ErrorKind::InvalidData);
    }
}
