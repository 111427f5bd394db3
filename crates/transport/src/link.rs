//! [`Mesh`]: the node's [`Transport`]. Per peer and channel it keeps a *link*: a sequenced,
//! windowed stream of requests that runs over a pipe of the selected network layer (QUIC or
//! TCP) and can move to the other layer while traffic flows.
//!
//! ## Sending
//! Every request of a (peer, channel) gets the next sequence number of the link's session and
//! stays in the link's pending map until its reply arrives. The window bounds what is pending:
//! at most [`WINDOW_SEQS`] sequence numbers past the oldest unanswered one, and at most
//! [`CHANNEL_BYTES_MAX`] payload bytes; when full, senders wait (backpressure).
//!
//! ## Switching, make-before-break
//! When the layer setting changes, the link's driver dials a pipe on the new layer first; only
//! once it is up does it become the pipe new requests go to. Requests already sent on the old
//! pipe get their replies there; the old pipe is closed when none is left. If a pipe dies with
//! requests unanswered, they are sent again, with the same numbers, on the current pipe.
//!
//! ## Receiving
//! The receiver keeps, per (peer, channel), the next sequence number it will deliver, a
//! reorder buffer and the replies of recent requests. A request is handed to the handler only
//! when every lower number has been; a duplicate (a resend after a pipe died) is not handed
//! again but answered from the kept reply. So across switches and pipe failures every request
//! is delivered exactly once, in order. Replies below the sender's `ack` are forgotten.
//!
//! When no pipe can be made on any layer, the link fails every pending request with
//! [`TransportError::Unreachable`] and starts a new session (the receiver resets on seeing it):
//! delivery is exactly-once while a peer is reachable, at-most-once when it is not.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tandem_types::{Channel, NodeId};
use tandem_wire::{Frame, FrameKind};
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::pipe::{read_frame, spawn_writer, BoxRead, PipeTx};
use crate::quic::QuicLayer;
use crate::ring::RegionRegistry;
use crate::tcp::{Incoming, TcpLayer};
use crate::tls::{Identity, TlsError};
use crate::{BoxFuture, Handler, Layer, Transport, TransportError, TransportKind};

/// Sequence numbers a link may have outstanding past its oldest unanswered request; also the
/// bound of the receiver's reorder buffer and reply cache.
pub const WINDOW_SEQS: u64 = 256;
/// Payload bytes a link may have outstanding (a single larger message still goes alone).
pub const CHANNEL_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Handler invocations running at once per (peer, channel) on the receiving side.
pub const DISPATCH_IN_FLIGHT_MAX: usize = 64;
/// Dial (TCP + TLS or QUIC handshake, plus hello).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First retry delay after a failed dial; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Short enough that a restarted peer is reached again well within a Raft election timeout.
pub const BACKOFF_MAX: Duration = Duration::from_millis(800);

type ReplyTx = oneshot::Sender<Result<Bytes, TransportError>>;

/// Bytes read from a pipe at a time when frames are small (large bodies bypass the buffer).
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The reply to a request that has been queued on a link. Dropping it before the reply came
/// withdraws the request: if it has not gone out it never will (an empty payload takes its
/// number), and if it has, a `Cancel` frame follows it, ahead of anything sent later on the
/// link, so the receiver does not start it or cancels it while it runs.
pub struct PendingReply {
    peer: NodeId,
    rx: oneshot::Receiver<Result<Bytes, TransportError>>,
    /// The request, to cancel if this is dropped unanswered (requests only).
    cancel: Option<(Weak<ChannelLink>, u64, u64)>,
}

impl PendingReply {
    pub async fn wait(mut self) -> Result<Bytes, TransportError> {
        let reply = (&mut self.rx).await;
        self.cancel = None;
        reply.unwrap_or(Err(TransportError::Unreachable { peer: self.peer, reason: "link closed".into() }))
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some((link, session, seq)) = self.cancel.take() {
            if let Some(link) = link.upgrade() {
                link.cancel(session, seq);
            }
        }
    }
}

/// One link's counters and state, for `tandem transport status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LinkStats {
    pub peer: NodeId,
    pub channel: Channel,
    /// The layer of the pipe new requests go to; `None` when not connected.
    pub transport: Option<TransportKind>,
    /// Pipes open: 2 while a switch drains the old one.
    pub pipes: usize,
    /// Requests sent or queued and not yet answered.
    pub pending: usize,
    /// Frames queued on the current pipe's writer.
    pub queue_depth: usize,
    pub bytes_sent: u64,
    pub messages_sent: u64,
    pub reconnects: u64,
    /// Completed moves from one layer to the other.
    pub switches: u64,
}

struct Pending {
    kind: FrameKind,
    payload: Bytes,
    reply: Option<ReplyTx>,
    /// The pipe (generation) this request was last written to.
    sent_on: Option<u64>,
}

struct OutPipe {
    gen: u64,
    kind: TransportKind,
    tx: PipeTx,
}

struct OutState {
    session: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    bytes: usize,
    /// Pipes, oldest first; the last alive one of the selected layer is current.
    pipes: Vec<OutPipe>,
    next_gen: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    ever_connected: bool,
    driver_started: bool,
    /// Requests sent and then given up on by their callers: a `Cancel` frame goes out for
    /// each, before any request sent after it.
    cancels: Vec<u64>,
}

impl OutState {
    fn current(&self, want: TransportKind) -> Option<&OutPipe> {
        self.pipes.iter().rev().find(|p| p.kind == want && p.tx.is_alive())
    }

    /// Where requests go: the current pipe, or while the selected layer cannot be reached,
    /// any pipe still alive (a failed switch must not fail traffic the old layer can carry).
    fn usable(&self, want: TransportKind) -> Option<&OutPipe> {
        self.current(want).or_else(|| self.pipes.iter().rev().find(|p| p.tx.is_alive()))
    }

    fn is_alive_gen(&self, gen: u64) -> bool {
        self.pipes.iter().any(|p| p.gen == gen && p.tx.is_alive())
    }

    fn ack(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next_seq)
    }

    fn has_unsent(&self) -> bool {
        !self.cancels.is_empty() || self.pending.values().any(|p| p.sent_on.is_none_or(|g| !self.is_alive_gen(g)))
    }
}

struct ChannelLink {
    peer: NodeId,
    channel: Channel,
    mesh: Weak<MeshInner>,
    st: Mutex<OutState>,
    space: Notify,
    wake: Notify,
    bytes_sent: AtomicU64,
    messages_sent: AtomicU64,
    reconnects: AtomicU64,
    switches: AtomicU64,
}

struct InState {
    session: u64,
    next_seq: u64,
    buffered: BTreeMap<u64, (FrameKind, Bytes, PipeTx, std::time::Instant)>,
    replies: BTreeMap<u64, ReplyState>,
}

enum ReplyState {
    Running(Vec<PipeTx>),
    Done(Frame),
}

struct Dispatch {
    session: u64,
    seq: u64,
    kind: FrameKind,
    payload: Bytes,
    /// When this node read the request off its pipe.
    received: std::time::Instant,
}

tokio::task_local! {
    static RECEIVED: std::time::Instant;
}

/// Inside a [`Handler`] call: when this node read the request off its pipe (before it waited
/// for a handler slot). `None` outside a handler.
pub fn request_received_at() -> Option<std::time::Instant> {
    RECEIVED.try_with(|t| *t).ok()
}

struct InboundChan {
    from: NodeId,
    channel: Channel,
    st: Mutex<InState>,
    dispatch: mpsc::Sender<Dispatch>,
    /// The sender's current session. A request of an older session (one the sender abandoned
    /// and failed to its callers) is never started, and one still running is cancelled.
    current: watch::Sender<u64>,
    /// Requests of the current session the sender cancelled (`Cancel` frames), from its
    /// oldest unanswered one on: bounded by the window.
    cancelled: watch::Sender<BTreeSet<u64>>,
}

struct MeshInner {
    me: NodeId,
    tcp: TcpLayer,
    quic: QuicLayer,
    kinds: [AtomicU8; 2],
    peers: RwLock<HashMap<NodeId, SocketAddr>>,
    links: Mutex<HashMap<(NodeId, Channel), Arc<ChannelLink>>>,
    inbound: Mutex<HashMap<(NodeId, Channel), Arc<InboundChan>>>,
    handlers: RwLock<HashMap<Channel, Arc<dyn Handler>>>,
    regions: Arc<RegionRegistry>,
    session_base: u64,
    session_counter: AtomicU64,
    servers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn kind_to_u8(k: TransportKind) -> u8 {
    match k {
        TransportKind::Tcp => 0,
        TransportKind::Quic => 1,
    }
}

fn kind_from_u8(v: u8) -> TransportKind {
    if v == 1 {
        TransportKind::Quic
    } else {
        TransportKind::Tcp
    }
}

fn layer_index(l: Layer) -> usize {
    match l {
        Layer::Control => 0,
        Layer::Data => 1,
    }
}

/// The node's transport: servers for both layers, and a link per (peer, channel).
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<MeshInner>,
}

/// Where a mesh listens: TCP on `tcp`, QUIC on the UDP socket `udp` (conventionally the same
/// port number). Bound by the caller so that a taken port is reported before anything starts.
pub struct Listeners {
    pub tcp: TcpListener,
    pub udp: std::net::UdpSocket,
}

impl Listeners {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Listeners> {
        let tcp = TcpListener::bind(addr).await?;
        let port = tcp.local_addr()?.port();
        let udp = std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), port))?;
        Ok(Listeners { tcp, udp })
    }
}

impl Mesh {
    /// Starts serving both layers. Requests on a channel without a handler get an error reply
    /// until [`Mesh::set_handler`] is called for it.
    pub fn start(
        identity: &Identity,
        listeners: Listeners,
        control: TransportKind,
        data: TransportKind,
        regions: Arc<RegionRegistry>,
    ) -> Result<Mesh, TlsError> {
        let tcp = TcpLayer::new(identity)?;
        let quic = QuicLayer::new(identity, listeners.udp)?;
        let session_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            << 16;
        let inner = Arc::new(MeshInner {
            me: identity.node_id,
            tcp,
            quic,
            kinds: [AtomicU8::new(kind_to_u8(control)), AtomicU8::new(kind_to_u8(data))],
            peers: RwLock::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            regions,
            session_base,
            session_counter: AtomicU64::new(1),
            servers: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let on_pipe: crate::tcp::OnPipe = Arc::new(move |incoming: Incoming| {
            if let Some(mesh) = weak.upgrade() {
                serve_pipe(&mesh, incoming);
            }
        });
        let tcp_task = inner.tcp.serve(listeners.tcp, on_pipe.clone());
        let quic_task = inner.quic.serve(on_pipe);
        inner.servers.lock().expect("servers lock").extend([tcp_task, quic_task]);
        Ok(Mesh { inner })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    pub fn set_handler(&self, channel: Channel, handler: Arc<dyn Handler>) {
        self.inner.handlers.write().expect("handlers lock").insert(channel, handler);
    }

    pub fn regions(&self) -> &Arc<RegionRegistry> {
        &self.inner.regions
    }

    pub fn kind(&self, layer: Layer) -> TransportKind {
        self.inner.kind(layer)
    }

    /// Selects the network layer for `layer`'s channels; every link of that layer moves,
    /// make-before-break.
    pub fn set_kind(&self, layer: Layer, kind: TransportKind) {
        let old = self.inner.kinds[layer_index(layer)].swap(kind_to_u8(kind), Ordering::SeqCst);
        if old != kind_to_u8(kind) {
            tracing::info!(%layer, transport = %kind, "switching transport");
            let links: Vec<Arc<ChannelLink>> = self.inner.links.lock().expect("links lock").values().cloned().collect();
            for l in links.iter().filter(|l| Layer::of(l.channel) == layer) {
                l.kick();
            }
        }
    }

    /// Queues a request; returns once it has its place in the link (so requests queued one
    /// after another are delivered in that order), with a handle on its reply.
    pub async fn send(&self, peer: NodeId, channel: Channel, payload: Bytes) -> Result<PendingReply, TransportError> {
        self.inner.link(peer, channel).enqueue(FrameKind::Request, payload).await
    }

    /// Queues a one-sided write of `data` into region `region` of `peer`, at `offset`.
    pub async fn send_region_write(
        &self,
        peer: NodeId,
        channel: Channel,
        region: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<PendingReply, TransportError> {
        let mut payload = Vec::with_capacity(16 + data.len());
        payload.extend_from_slice(&region.to_be_bytes());
        payload.extend_from_slice(&offset.to_be_bytes());
        payload.extend_from_slice(data);
        self.inner.link(peer, channel).enqueue(FrameKind::RegionWrite, payload.into()).await
    }

    pub fn link_stats(&self) -> Vec<LinkStats> {
        let links: Vec<Arc<ChannelLink>> = self.inner.links.lock().expect("links lock").values().cloned().collect();
        let mut out: Vec<LinkStats> = links
            .iter()
            .map(|l| {
                let want = self.inner.kind(Layer::of(l.channel));
                let st = l.st.lock().expect("link lock");
                let current = st.usable(want);
                LinkStats {
                    peer: l.peer,
                    channel: l.channel,
                    transport: current.map(|p| p.kind),
                    pipes: st.pipes.iter().filter(|p| p.tx.is_alive()).count(),
                    pending: st.pending.len(),
                    queue_depth: current.map(|p| p.tx.queue_depth()).unwrap_or(0),
                    bytes_sent: l.bytes_sent.load(Ordering::Relaxed),
                    messages_sent: l.messages_sent.load(Ordering::Relaxed),
                    reconnects: l.reconnects.load(Ordering::Relaxed),
                    switches: l.switches.load(Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by_key(|s| (s.peer, s.channel));
        out
    }

    /// Stops accepting and closes the QUIC endpoint. Links fail from then on.
    pub fn shutdown(&self) {
        for t in self.inner.servers.lock().expect("servers lock").drain(..) {
            t.abort();
        }
        self.inner.quic.close();
    }
}

impl Transport for Mesh {
    fn call(&self, peer: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(async move { self.send(peer, channel, payload).await?.wait().await })
    }

    fn set_peer_addr(&self, peer: NodeId, addr: SocketAddr) {
        let old = self.inner.peers.write().expect("peers lock").insert(peer, addr);
        if old.is_some() && old != Some(addr) {
            // Links to the old address are dropped; the next request dials the new one.
            self.inner.links.lock().expect("links lock").retain(|(p, _), _| *p != peer);
        }
    }
}

impl MeshInner {
    fn kind(&self, layer: Layer) -> TransportKind {
        kind_from_u8(self.kinds[layer_index(layer)].load(Ordering::SeqCst))
    }

    fn new_session(&self) -> u64 {
        self.session_base + self.session_counter.fetch_add(1, Ordering::Relaxed)
    }

    fn link(self: &Arc<Self>, peer: NodeId, channel: Channel) -> Arc<ChannelLink> {
        let mut links = self.links.lock().expect("links lock");
        links
            .entry((peer, channel))
            .or_insert_with(|| {
                Arc::new(ChannelLink {
                    peer,
                    channel,
                    mesh: Arc::downgrade(self),
                    st: Mutex::new(OutState {
                        session: self.new_session(),
                        next_seq: 1,
                        pending: BTreeMap::new(),
                        bytes: 0,
                        pipes: Vec::new(),
                        next_gen: 1,
                        failures: 0,
                        retry_at: None,
                        last_error: String::new(),
                        ever_connected: false,
                        driver_started: false,
                        cancels: Vec::new(),
                    }),
                    space: Notify::new(),
                    wake: Notify::new(),
                    bytes_sent: AtomicU64::new(0),
                    messages_sent: AtomicU64::new(0),
                    reconnects: AtomicU64::new(0),
                    switches: AtomicU64::new(0),
                })
            })
            .clone()
    }

    async fn dial(
        &self,
        kind: TransportKind,
        peer: NodeId,
        channel: Channel,
    ) -> Result<(BoxRead, crate::pipe::BoxWrite), String> {
        let addr = self.peers.read().expect("peers lock").get(&peer).copied();
        let addr = addr.ok_or_else(|| format!("no address known for node {peer}"))?;
        let dialed = match kind {
            TransportKind::Tcp => tokio::time::timeout(CONNECT_TIMEOUT, self.tcp.dial(peer, addr, channel)).await,
            TransportKind::Quic => tokio::time::timeout(CONNECT_TIMEOUT, self.quic.dial(peer, addr, channel)).await,
        };
        match dialed {
            Ok(Ok(pipe)) => Ok(pipe),
            Ok(Err(e)) => Err(format!("{kind} {addr}: {e}")),
            Err(_) => Err(format!("{kind} {addr}: connect timed out")),
        }
    }

    fn inbound_chan(self: &Arc<Self>, from: NodeId, channel: Channel) -> Arc<InboundChan> {
        let mut map = self.inbound.lock().expect("inbound lock");
        map.entry((from, channel))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(2 * WINDOW_SEQS as usize);
                let chan = Arc::new(InboundChan {
                    from,
                    channel,
                    st: Mutex::new(InState {
                        session: 0,
                        next_seq: 1,
                        buffered: BTreeMap::new(),
                        replies: BTreeMap::new(),
                    }),
                    dispatch: tx,
                    current: watch::Sender::new(0),
                    cancelled: watch::Sender::new(BTreeSet::new()),
                });
                tokio::spawn(dispatcher(Arc::downgrade(self), chan.clone(), rx));
                chan
            })
            .clone()
    }

    /// Handles one request frame from an authenticated pipe. An `Err` is a protocol violation:
    /// the pipe is closed (the sender re-makes it and resends).
    fn on_frame(self: &Arc<Self>, from: NodeId, channel: Channel, frame: Frame, route: &PipeTx) -> Result<(), String> {
        if frame.channel != channel {
            return Err(format!("frame for {} on a {channel} pipe", frame.channel));
        }
        if !matches!(frame.kind, FrameKind::Request | FrameKind::RegionWrite | FrameKind::Cancel) {
            return Err(format!("unexpected {:?} frame from a client", frame.kind));
        }
        if frame.seq == 0 {
            return Err("sequence number 0".into());
        }
        let chan = self.inbound_chan(from, channel);
        let mut st = chan.st.lock().expect("inbound lock");
        if frame.session < st.session {
            return Ok(()); // A straggler of a session the sender has abandoned.
        }
        if frame.kind == FrameKind::Cancel {
            // Only for a request of this session within the window; it may still be on its
            // way on another pipe, buffered, queued, running, or answered already.
            if frame.session == st.session && frame.seq >= frame.ack && frame.seq < st.next_seq + WINDOW_SEQS {
                drop(st);
                chan.cancelled.send_modify(|c| {
                    c.insert(frame.seq);
                });
            }
            return Ok(());
        }
        if frame.session > st.session {
            // A new session, or a session this process has not seen because it restarted while
            // the sender kept its link: delivery starts at the oldest request the sender still
            // waits for (everything below it was answered, by this process or its predecessor).
            let next_seq = frame.ack.max(1);
            *st = InState { session: frame.session, next_seq, buffered: BTreeMap::new(), replies: BTreeMap::new() };
            chan.cancelled.send_replace(BTreeSet::new());
            chan.current.send_replace(frame.session);
        }
        st.replies = st.replies.split_off(&frame.ack);
        chan.cancelled.send_if_modified(|c| {
            if c.first().is_some_and(|&s| s < frame.ack) {
                *c = c.split_off(&frame.ack);
            }
            false
        });
        if frame.seq < st.next_seq {
            match st.replies.get_mut(&frame.seq) {
                Some(ReplyState::Done(reply)) => {
                    let reply = reply.clone();
                    let route = route.clone();
                    tokio::spawn(async move {
                        let _ = route.out.send(reply).await;
                    });
                }
                Some(ReplyState::Running(routes)) => routes.push(route.clone()),
                None => {}
            }
            return Ok(());
        }
        if frame.seq >= st.next_seq + WINDOW_SEQS {
            return Err(format!("sequence {} beyond the window (next {})", frame.seq, st.next_seq));
        }
        st.buffered.insert(frame.seq, (frame.kind, frame.payload, route.clone(), std::time::Instant::now()));
        loop {
            let seq = st.next_seq;
            let Some((kind, payload, route, received)) = st.buffered.remove(&seq) else { break };
            st.next_seq += 1;
            st.replies.insert(seq, ReplyState::Running(vec![route]));
            chan.dispatch
                .try_send(Dispatch { session: st.session, seq, kind, payload, received })
                .map_err(|_| "dispatch queue overflow".to_string())?;
        }
        Ok(())
    }
}

/// Hands requests of one (peer, channel) to the handler in sequence order. Region writes are
/// done right here, in order, so their completions come out in ring order.
///
/// A request whose session the sender has abandoned (it failed every request of that session
/// to its callers, who may have retried them on the new session) never starts, and one that
/// is still running when the new session begins is cancelled: a request its caller was told
/// failed must not take effect after the retry (docs/PROTOCOL.md, "Requests a host gave up
/// on").
async fn dispatcher(mesh: Weak<MeshInner>, chan: Arc<InboundChan>, mut rx: mpsc::Receiver<Dispatch>) {
    let permits = Arc::new(Semaphore::new(DISPATCH_IN_FLIGHT_MAX));
    while let Some(d) = rx.recv().await {
        if withdrawn(&chan, &d).await {
            continue;
        }
        let Some(m) = mesh.upgrade() else { return };
        if d.kind == FrameKind::RegionWrite {
            let result = m.regions.write(chan.from, chan.channel, &d.payload).await;
            finish(&chan, d.session, d.seq, result).await;
            continue;
        }
        let handler = m.handlers.read().expect("handlers lock").get(&chan.channel).cloned();
        drop(m);
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        if withdrawn(&chan, &d).await {
            continue;
        }
        let chan = chan.clone();
        tokio::spawn(async move {
            let mut current = chan.current.subscribe();
            let mut cancels = chan.cancelled.subscribe();
            let handle = RECEIVED.scope(d.received, async {
                match handler {
                    Some(h) => h.handle(chan.from, chan.channel, d.payload).await,
                    None => Err(format!("this node serves nothing on the {} channel", chan.channel)),
                }
            });
            let result = tokio::select! {
                result = handle => result,
                _ = current.wait_for(|s| *s != d.session) => {
                    tracing::debug!(from = chan.from, channel = %chan.channel, seq = d.seq, "request of an abandoned session cancelled");
                    return;
                }
                _ = cancels.wait_for(|c| c.contains(&d.seq)) => Err(CANCELLED.into()),
            };
            finish(&chan, d.session, d.seq, result).await;
            drop(permit);
        });
    }
}

const CANCELLED: &str = "cancelled by the sender";

/// Whether `d` must not start: its session was abandoned (nobody waits for an answer), or the
/// sender cancelled it (answered with an error, so the sender's window moves on).
async fn withdrawn(chan: &InboundChan, d: &Dispatch) -> bool {
    if *chan.current.borrow() != d.session {
        return true;
    }
    if chan.cancelled.borrow().contains(&d.seq) {
        finish(chan, d.session, d.seq, Err(CANCELLED.into())).await;
        return true;
    }
    false
}

async fn finish(chan: &InboundChan, session: u64, seq: u64, result: Result<Bytes, String>) {
    let (kind, payload) = match result {
        Ok(b) => (FrameKind::Response, b),
        Err(msg) => (FrameKind::Error, Bytes::from(msg.into_bytes())),
    };
    let frame = Frame::new(kind, chan.channel, session, seq, 0, payload);
    let routes = {
        let mut st = chan.st.lock().expect("inbound lock");
        if st.session != session {
            return;
        }
        match st.replies.get_mut(&seq) {
            Some(slot) => match std::mem::replace(slot, ReplyState::Done(frame.clone())) {
                ReplyState::Running(routes) => routes,
                ReplyState::Done(_) => Vec::new(),
            },
            // Already acknowledged by the sender: nobody waits.
            None => Vec::new(),
        }
    };
    for r in routes {
        if r.is_alive() {
            let _ = r.out.send(frame.clone()).await;
        }
    }
}

fn serve_pipe(mesh: &Arc<MeshInner>, incoming: Incoming) {
    let Incoming { from, channel, read, write } = incoming;
    let route = spawn_writer(write, || {});
    let mesh = Arc::downgrade(mesh);
    tokio::spawn(async move {
        let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, read);
        loop {
            match read_frame(&mut r).await {
                Ok(Some(frame)) => {
                    let Some(m) = mesh.upgrade() else { break };
                    if let Err(e) = m.on_frame(from, channel, frame, &route) {
                        tracing::warn!(from, %channel, error = %e, "closing a peer pipe after a protocol error");
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(from, %channel, error = %e, "peer pipe ended");
                    break;
                }
            }
        }
        route.mark_dead();
    });
}

impl ChannelLink {
    fn kick(self: &Arc<Self>) {
        let start = {
            let mut st = self.st.lock().expect("link lock");
            !std::mem::replace(&mut st.driver_started, true)
        };
        if start {
            tokio::spawn(self.clone().drive());
        }
        self.wake.notify_one();
    }

    async fn enqueue(self: &Arc<Self>, kind: FrameKind, payload: Bytes) -> Result<PendingReply, TransportError> {
        let mesh = self.mesh.upgrade().ok_or(TransportError::Closed)?;
        let want = mesh.kind(Layer::of(self.channel));
        drop(mesh);
        let len = payload.len();
        let mut payload = Some(payload);
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.st.lock().expect("link lock");
                if st.usable(want).is_none() && st.retry_at.is_some_and(|at| Instant::now() < at) {
                    return Err(TransportError::Unreachable {
                        peer: self.peer,
                        reason: format!("backing off after {} failed connects: {}", st.failures, st.last_error),
                    });
                }
                let fits = st.next_seq < st.ack() + WINDOW_SEQS
                    && (st.pending.is_empty() || st.bytes + len <= CHANNEL_BYTES_MAX);
                if fits {
                    let seq = st.next_seq;
                    let st_session = st.session;
                    st.next_seq += 1;
                    let (tx, rx) = oneshot::channel();
                    let payload = payload.take().expect("payload is taken once");
                    let mut p = Pending { kind, payload, reply: Some(tx), sent_on: None };
                    // Fast path: straight onto the current pipe when nothing older waits.
                    if !st.has_unsent() {
                        if let Some(pipe) = st.current(want) {
                            let frame = Frame::new(kind, self.channel, st.session, seq, st.ack(), p.payload.clone());
                            if pipe.tx.out.try_send(frame).is_ok() {
                                p.sent_on = Some(pipe.gen);
                                self.messages_sent.fetch_add(1, Ordering::Relaxed);
                                self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    let need_driver = p.sent_on.is_none();
                    st.bytes += len;
                    st.pending.insert(seq, p);
                    drop(st);
                    if need_driver {
                        self.kick();
                    }
                    let cancel = (kind == FrameKind::Request).then(|| (Arc::downgrade(self), st_session, seq));
                    return Ok(PendingReply { peer: self.peer, rx, cancel });
                }
            }
            notified.await;
        }
    }

    fn complete(&self, session: u64, seq: u64, result: Result<Bytes, TransportError>) {
        let draining = {
            let mut st = self.st.lock().expect("link lock");
            if st.session != session {
                return;
            }
            if let Some(mut p) = st.pending.remove(&seq) {
                st.bytes -= p.payload.len();
                if let Some(tx) = p.reply.take() {
                    let _ = tx.send(result);
                }
            }
            st.pipes.len() > 1
        };
        self.space.notify_waiters();
        if draining {
            self.wake.notify_one();
        }
    }

    /// The caller of request `seq` of `session` gave up on it. Not sent yet: the driver
    /// withdraws it when it comes to it. Sent: a `Cancel` frame goes out before anything sent
    /// later on this link.
    fn cancel(self: &Arc<Self>, session: u64, seq: u64) {
        {
            let mut st = self.st.lock().expect("link lock");
            if st.session != session {
                return;
            }
            let Some(p) = st.pending.get(&seq) else { return };
            if p.kind != FrameKind::Request || p.sent_on.is_none() {
                return;
            }
            st.cancels.push(seq);
        }
        self.kick();
    }

    /// A dial failed, or a pipe died before answering anything sent on it (a peer that
    /// accepts the handshake and then drops us, e.g. for a certificate it refuses): back off,
    /// and if no pipe is left, fail what waits rather than resend it forever.
    fn failed(&self, mesh: &MeshInner, reason: String) {
        let mut st = self.st.lock().expect("link lock");
        st.failures = st.failures.saturating_add(1);
        let backoff = BACKOFF_BASE.saturating_mul(1u32 << st.failures.min(16)).min(BACKOFF_MAX);
        st.retry_at = Some(Instant::now() + backoff);
        st.last_error = reason.clone();
        if !st.pipes.iter().any(|p| p.tx.is_alive()) {
            self.fail_all(&mut st, mesh, &reason);
        }
        drop(st);
        self.space.notify_waiters();
    }

    /// A pipe's reader ended. If requests were sent on it and it never answered one, that
    /// counts as a failed connect.
    fn pipe_ended(&self, gen: u64, answered: bool, reason: String) {
        let unanswered = {
            let st = self.st.lock().expect("link lock");
            st.pending.values().any(|p| p.sent_on == Some(gen))
        };
        if unanswered && !answered {
            if let Some(mesh) = self.mesh.upgrade() {
                self.failed(&mesh, reason);
            }
        }
        self.wake.notify_one();
    }

    fn progress(&self) {
        let mut st = self.st.lock().expect("link lock");
        st.failures = 0;
    }

    fn fail_all(&self, st: &mut OutState, mesh: &MeshInner, reason: &str) {
        for (_, mut p) in std::mem::take(&mut st.pending) {
            if let Some(tx) = p.reply.take() {
                let _ = tx.send(Err(TransportError::Unreachable { peer: self.peer, reason: reason.to_string() }));
            }
        }
        st.bytes = 0;
        st.pipes.clear();
        st.cancels.clear();
        st.session = mesh.new_session();
        st.next_seq = 1;
    }

    /// The link's driver: makes pipes (dial with backoff), moves to the selected layer, sends
    /// what the fast path could not, and closes drained old pipes.
    async fn drive(self: Arc<Self>) {
        loop {
            let Some(mesh) = self.mesh.upgrade() else { return };
            let want = mesh.kind(Layer::of(self.channel));

            // Make.
            let dial = {
                let mut st = self.st.lock().expect("link lock");
                let alive_or_needed: Vec<bool> = st
                    .pipes
                    .iter()
                    .map(|p| p.tx.is_alive() || st.pending.values().any(|q| q.sent_on == Some(p.gen)))
                    .collect();
                let mut i = 0;
                st.pipes.retain(|_| {
                    i += 1;
                    alive_or_needed[i - 1]
                });
                let backing_off = st.retry_at.is_some_and(|at| Instant::now() < at);
                let has_pipe = st.pipes.iter().any(|p| p.tx.is_alive());
                st.current(want).is_none() && !backing_off && (!st.pending.is_empty() || has_pipe)
            };
            if dial {
                match mesh.dial(want, self.peer, self.channel).await {
                    Ok((read, write)) => {
                        let link = Arc::downgrade(&self);
                        let tx = spawn_writer(write, {
                            let link = link.clone();
                            move || {
                                if let Some(l) = link.upgrade() {
                                    l.wake.notify_one();
                                }
                            }
                        });
                        let mut st = self.st.lock().expect("link lock");
                        let gen = st.next_gen;
                        st.next_gen += 1;
                        spawn_reply_reader(link, self.peer, gen, read, tx.clone());
                        let switching = st.pipes.iter().any(|p| p.tx.is_alive() && p.kind != want);
                        st.pipes.push(OutPipe { gen, kind: want, tx });
                        if switching {
                            self.switches.fetch_add(1, Ordering::Relaxed);
                        } else if st.ever_connected {
                            self.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        st.ever_connected = true;
                        st.retry_at = None;
                    }
                    Err(reason) => {
                        tracing::debug!(peer = self.peer, channel = %self.channel, %reason, "dial failed");
                        self.failed(&mesh, reason);
                    }
                }
            }

            // Send what waits, in sequence order, on the pipe requests go to now.
            loop {
                let target = {
                    let st = self.st.lock().expect("link lock");
                    if !st.has_unsent() {
                        None
                    } else {
                        st.usable(want).map(|p| (p.gen, p.tx.clone()))
                    }
                };
                let Some((gen, tx)) = target else { break };
                let Ok(permit) = tx.out.reserve().await else {
                    tx.mark_dead();
                    continue;
                };
                let mut st = self.st.lock().expect("link lock");
                let ack = st.ack();
                let session = st.session;
                if !st.cancels.is_empty() {
                    // Before any request still to send: the receiver sees the cancel first.
                    let seq = st.cancels.remove(0);
                    permit.send(Frame::new(FrameKind::Cancel, self.channel, session, seq, ack, Bytes::new()));
                    continue;
                }
                let alive: Vec<u64> = st.pipes.iter().filter(|p| p.tx.is_alive()).map(|p| p.gen).collect();
                let next = st.pending.iter_mut().find(|(_, p)| p.sent_on.is_none_or(|g| !alive.contains(&g)));
                let Some((seq, p)) = next else { break };
                let mut withdrawn = 0;
                if p.kind == FrameKind::Request
                    && p.reply.as_ref().is_some_and(|r| r.is_closed())
                    && !p.payload.is_empty()
                {
                    withdrawn = p.payload.len();
                    // The caller gave up on this request before it went out (it was queued, or
                    // its pipe died): it is withdrawn. Its number still travels, with an empty
                    // payload that every handler refuses, so the receiver's sequence has no gap
                    // and a request nobody waits for is never carried out late.
                    p.payload = Bytes::new();
                }
                permit.send(Frame::new(p.kind, self.channel, session, *seq, ack, p.payload.clone()));
                p.sent_on = Some(gen);
                self.messages_sent.fetch_add(1, Ordering::Relaxed);
                self.bytes_sent.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                if withdrawn > 0 {
                    st.bytes -= withdrawn;
                    self.space.notify_waiters();
                }
            }

            // Break: an old pipe with nothing left in flight is closed.
            let draining = {
                let mut st = self.st.lock().expect("link lock");
                let current = st.usable(want).map(|p| p.gen);
                let busy: Vec<u64> = st.pending.values().filter_map(|p| p.sent_on).collect();
                st.pipes.retain(|p| Some(p.gen) == current || busy.contains(&p.gen));
                st.pipes.len() > 1 || st.retry_at.is_some()
            };
            drop(mesh);
            let tick = if draining { Duration::from_millis(20) } else { Duration::from_secs(1) };
            let _ = tokio::time::timeout(tick, self.wake.notified()).await;
        }
    }
}

fn spawn_reply_reader(link: Weak<ChannelLink>, peer: NodeId, gen: u64, read: BoxRead, tx: PipeTx) {
    tokio::spawn(async move {
        let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, read);
        let mut answered = false;
        let reason = loop {
            let frame = match read_frame(&mut r).await {
                Ok(Some(f)) => f,
                Ok(None) => break "connection closed by the peer".to_string(),
                Err(e) => {
                    tracing::debug!(peer, error = %e, "link pipe read failed");
                    break format!("connection failed: {e}");
                }
            };
            let Some(l) = link.upgrade() else { return };
            if !answered {
                answered = true;
                l.progress();
            }
            match frame.kind {
                FrameKind::Response => l.complete(frame.session, frame.seq, Ok(frame.payload)),
                FrameKind::Error => {
                    let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                    l.complete(frame.session, frame.seq, Err(TransportError::Remote { peer, reason }));
                }
                other => {
                    tracing::warn!(peer, kind = ?other, "unexpected frame from a server; closing the pipe");
                    break format!("protocol error: unexpected {other:?} frame");
                }
            }
        };
        tx.mark_dead();
        if let Some(l) = link.upgrade() {
            l.pipe_ended(gen, answered, reason);
        }
    });
}
