//! [`Mesh`]: the node's [`Transport`]. Per peer and channel it keeps a *link*: a sequenced,
//! windowed stream of requests that runs over a pipe of the selected network layer (QUIC or
//! TCP) and can move to the other layer while traffic flows.
//!
//! ## Sending
//! Every request of a (peer, channel) gets the next sequence number of the link's session and
//! stays in the link's pending map until its reply arrives. The window bounds what is pending:
//! at most [`WINDOW_SEQS`](tandem_linkcore::WINDOW_SEQS) sequence numbers past the oldest unanswered one, and at most
//! [`CHANNEL_BYTES_MAX`](tandem_linkcore::CHANNEL_BYTES_MAX) payload bytes; when full, senders wait (backpressure).
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
//!
//! ## Files
//! The numbering, window, reorder buffer, duplicate detection and reply cache are sans-IO
//! state machines in `tandem_linkcore`; this module drives them.
//! - this file: the [`Mesh`]: peers' addresses, the links, the layer setting, dialing, and
//!   forgetting a peer that left (its links are closed: waiting callers fail, tasks end);
//! - `link/send.rs`: one outgoing link and its driver task (dial, switch, send, resend), and
//!   [`PendingReply`], a caller's handle on one reply; it sees the mesh only through the
//!   `LinkHost` trait;
//! - `link/receive.rs`: what peers send to this node: frames, the receiving windows, the
//!   dispatchers, the handlers' replies and the region writes.
//!
//! Imports point one way: this file uses `send` and `receive`, which use neither it nor each
//! other.

mod receive;
mod send;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tandem_types::{Channel, NodeId};
use tandem_wire::FrameKind;
use tokio::net::TcpListener;

pub use receive::{request_received_at, DISPATCH_IN_FLIGHT_MAX};
pub use send::{PendingReply, BACKOFF_BASE, BACKOFF_MAX};

use crate::pipe::read_server_hello;
use crate::quic::QuicLayer;
use crate::ring::{RegionRegistry, RegionWriteLink, ReplyFuture};
use crate::tcp::{Incoming, TcpLayer};
use crate::tls::{Identity, TlsError};
use crate::{BoxFuture, Handler, Transport, TransportError};
use receive::{serve_pipe, Inbound};
use send::{ChannelLink, Dialed, LinkHost};
use tandem_types::{Layer, TransportKind};

/// Dial (TCP + TLS or QUIC handshake, plus hello).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

struct MeshInner {
    me: NodeId,
    tcp: TcpLayer,
    quic: QuicLayer,
    kinds: [AtomicU8; 2],
    peers: RwLock<HashMap<NodeId, SocketAddr>>,
    links: Mutex<HashMap<(NodeId, Channel), Arc<ChannelLink>>>,
    /// Windows, dispatchers and handlers of what peers send to this node.
    inbound: Arc<Inbound>,
    session_base: u64,
    session_counter: AtomicU64,
    servers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Tasks of the links (drivers, pipes' writers and readers) still alive.
    link_tasks: Arc<AtomicUsize>,
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
            // The session base is new at every start: it names this process too.
            inbound: Arc::new(Inbound::new(regions, identity.node_id, session_base)),
            session_base,
            session_counter: AtomicU64::new(1),
            servers: Mutex::new(Vec::new()),
            link_tasks: Arc::new(AtomicUsize::new(0)),
        });
        let weak = Arc::downgrade(&inner);
        let on_pipe: crate::tcp::OnPipe = Arc::new(move |incoming: Incoming| {
            if let Some(mesh) = weak.upgrade() {
                serve_pipe(&mesh.inbound, incoming);
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
        self.inner.inbound.set_handler(channel, handler);
    }

    pub fn regions(&self) -> &Arc<RegionRegistry> {
        self.inner.inbound.regions()
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
                    pending: st.win.len(),
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

    /// Node `peer` has left the cluster: its address, its links and what this node keeps of
    /// its requests (the receiving windows, whose dispatchers end once their handlers have
    /// finished) are dropped. Its links are closed: callers still waiting on a reply from it
    /// get [`TransportError::Unreachable`], and the links' tasks and pipes end. Should it speak
    /// again, it starts afresh, as after a restart.
    pub fn forget_peer(&self, peer: NodeId) {
        self.inner.peers.write().expect("peers lock").remove(&peer);
        self.inner.close_links(peer, &format!("node {peer} was forgotten"));
        self.inner.inbound.forget(peer);
    }

    /// Tasks of this mesh's links (drivers, pipes' writers and readers) still alive: none is
    /// left of a link that was closed.
    pub fn live_link_tasks(&self) -> usize {
        self.inner.link_tasks.load(Ordering::SeqCst)
    }

    /// Windows of what peers send to this node (one per peer and channel that spoke).
    pub fn inbound_windows(&self) -> usize {
        self.inner.inbound.len()
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
            // Links to the old address are closed (their callers fail); the next request dials
            // the new one.
            self.inner.close_links(peer, &format!("node {peer} moved to {addr}"));
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

    /// Drops `peer`'s links from the map and closes them.
    fn close_links(&self, peer: NodeId, reason: &str) {
        let mut gone = Vec::new();
        self.links.lock().expect("links lock").retain(|(p, _), l| {
            if *p == peer {
                gone.push(l.clone());
            }
            *p != peer
        });
        for l in gone {
            l.close(reason);
        }
    }

    fn link(self: &Arc<Self>, peer: NodeId, channel: Channel) -> Arc<ChannelLink> {
        let mut links = self.links.lock().expect("links lock");
        links
            .entry((peer, channel))
            .or_insert_with(|| {
                let host: Weak<dyn LinkHost> = Arc::downgrade(self) as Weak<MeshInner>;
                Arc::new(ChannelLink::new(peer, channel, host, self.new_session(), self.link_tasks.clone()))
            })
            .clone()
    }

    async fn dial_pipe(&self, kind: TransportKind, peer: NodeId, channel: Channel) -> Result<Dialed, String> {
        let addr = self.peers.read().expect("peers lock").get(&peer).copied();
        let addr = addr.ok_or_else(|| format!("no address known for node {peer}"))?;
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let opened = tokio::time::timeout_at(deadline, async {
            match kind {
                TransportKind::Tcp => self.tcp.dial(peer, addr, channel).await.map(|(r, w)| (r, w, 0)),
                TransportKind::Quic => self.quic.dial(peer, addr, channel).await,
            }
        })
        .await;
        let (mut read, write, path) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(format!("{kind} {addr}: {e}")),
            Err(_) => return Err(format!("{kind} {addr}: connect timed out")),
        };
        let answer = match tokio::time::timeout_at(deadline, read_server_hello(&mut read)).await {
            Ok(answer) => answer.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no server hello within {CONNECT_TIMEOUT:?}")),
        };
        match answer {
            Ok((node, incarnation)) if node == peer => Ok(Dialed { read, write, incarnation, path }),
            Ok((node, _)) => Err(format!("{kind} {addr}: node {node} answered instead of node {peer}")),
            Err(e) => {
                // A stream on a shared QUIC connection that gets no hello back: the connection
                // carries nothing, and the next dial makes a new one.
                self.stalled(kind, peer, path);
                Err(format!("{kind} {addr}: {e}"))
            }
        }
    }
}

/// The links' view of the mesh.
impl LinkHost for MeshInner {
    fn kind(&self, layer: Layer) -> TransportKind {
        MeshInner::kind(self, layer)
    }

    fn new_session(&self) -> u64 {
        MeshInner::new_session(self)
    }

    fn dial(&self, kind: TransportKind, peer: NodeId, channel: Channel) -> BoxFuture<'_, Result<Dialed, String>> {
        Box::pin(self.dial_pipe(kind, peer, channel))
    }

    fn stalled(&self, kind: TransportKind, peer: NodeId, path: u64) {
        // A TCP pipe is a connection of its own: the next dial makes a new one anyway.
        if kind == TransportKind::Quic {
            self.quic.stalled(peer, path);
        }
    }
}

/// The descriptor rings' view of the mesh: a region write is queued in order on the link of
/// its channel, and its reply awaited later.
impl RegionWriteLink for Mesh {
    fn queue_region_write<'a>(
        &'a self,
        peer: NodeId,
        channel: Channel,
        region: u64,
        offset: u64,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<ReplyFuture, TransportError>> {
        Box::pin(async move {
            let pending = self.send_region_write(peer, channel, region, offset, data).await?;
            Ok(Box::pin(pending.wait()) as ReplyFuture)
        })
    }
}
