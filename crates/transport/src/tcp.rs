//! TCP + rustls implementation of [`Transport`].
//!
//! Design: one TLS connection per (peer, channel). TCP delivers a connection's bytes in order,
//! so any multiplexing of channels over one connection puts a bulk transfer's bytes in front of
//! a heartbeat; separate connections give each channel its own flow control and send buffer,
//! which is the isolation the channels exist for. Each connection carries many requests at
//! once, matched to responses by request id.
//!
//! A connection is a reader task and a writer task. The writer drains a bounded queue
//! ([`QUEUE_DEPTH_MAX`]): when it is full, callers wait (backpressure). When either side fails,
//! every request still waiting on that connection gets [`TransportError::Unreachable`], and the
//! next call reconnects after a capped exponential backoff.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tandem_types::{Channel, NodeId};
use tandem_wire::{Frame, FrameKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::tls::{cert_names_node, server_name, Identity, TlsError};
use crate::{BoxFuture, Handler, Transport, TransportError};

/// Frames waiting to be written on one connection. Full means the caller waits.
pub const QUEUE_DEPTH_MAX: usize = 256;
/// Requests one incoming connection may have in its handler at once.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// TCP connect plus TLS handshake plus hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First retry delay after a failed connect; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Short enough that a restarted peer is reached again well within a Raft election timeout.
pub const BACKOFF_MAX: Duration = Duration::from_millis(800);
/// The writer coalesces queued frames into one write up to this size.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;

type Reply = oneshot::Sender<Result<Bytes, TransportError>>;

/// Counters of one link (one peer, one channel), for `tandem transport status`.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub bytes_sent: AtomicU64,
    pub messages_sent: AtomicU64,
    pub reconnects: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct LinkStats {
    pub peer: NodeId,
    pub channel: Channel,
    pub connected: bool,
    pub queue_depth: usize,
    pub bytes_sent: u64,
    pub messages_sent: u64,
    pub reconnects: u64,
}

struct Conn {
    out: mpsc::Sender<Frame>,
    pending: Mutex<HashMap<u64, Reply>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl Conn {
    fn close(&self, peer: NodeId, reason: &str) {
        self.closed.store(true, Ordering::SeqCst);
        let pending: Vec<Reply> = {
            let mut map = self.pending.lock().expect("pending lock");
            map.drain().map(|(_, tx)| tx).collect()
        };
        for tx in pending {
            let _ = tx.send(Err(TransportError::Unreachable {
                peer,
                reason: reason.to_string(),
            }));
        }
    }

    fn complete(&self, id: u64, result: Result<Bytes, TransportError>) {
        let tx = self.pending.lock().expect("pending lock").remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
    }
}

/// Removes a request's slot if the caller gives up (timeout, cancellation) before the reply.
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.conn
            .pending
            .lock()
            .expect("pending lock")
            .remove(&self.id);
    }
}

#[derive(Default)]
struct LinkState {
    conn: Option<Arc<Conn>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

struct Link {
    peer: NodeId,
    channel: Channel,
    state: tokio::sync::Mutex<LinkState>,
    counters: LinkCounters,
    /// A copy of the live connection's sender, for queue-depth readings without the lock.
    out: Mutex<Option<mpsc::Sender<Frame>>>,
}

struct Inner {
    identity: Identity,
    connector: TlsConnector,
    peers: RwLock<HashMap<NodeId, SocketAddr>>,
    links: Mutex<HashMap<(NodeId, Channel), Arc<Link>>>,
}

/// The client half of the TCP transport. Cheap to clone; all clones share links.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl TcpTransport {
    pub fn new(identity: Identity) -> Result<TcpTransport, TlsError> {
        let connector = TlsConnector::from(identity.client_config()?);
        Ok(TcpTransport {
            inner: Arc::new(Inner {
                identity,
                connector,
                peers: RwLock::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn link_stats(&self) -> Vec<LinkStats> {
        let links: Vec<Arc<Link>> = self
            .inner
            .links
            .lock()
            .expect("links lock")
            .values()
            .cloned()
            .collect();
        let mut out: Vec<LinkStats> = links
            .iter()
            .map(|l| {
                let sender = l.out.lock().expect("out lock").clone();
                let (connected, queue_depth) = match sender {
                    Some(tx) if !tx.is_closed() => (true, QUEUE_DEPTH_MAX - tx.capacity()),
                    _ => (false, 0),
                };
                LinkStats {
                    peer: l.peer,
                    channel: l.channel,
                    connected,
                    queue_depth,
                    bytes_sent: l.counters.bytes_sent.load(Ordering::Relaxed),
                    messages_sent: l.counters.messages_sent.load(Ordering::Relaxed),
                    reconnects: l.counters.reconnects.load(Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by_key(|s| (s.peer, s.channel));
        out
    }

    fn link(&self, peer: NodeId, channel: Channel) -> Arc<Link> {
        let mut links = self.inner.links.lock().expect("links lock");
        links
            .entry((peer, channel))
            .or_insert_with(|| {
                Arc::new(Link {
                    peer,
                    channel,
                    state: tokio::sync::Mutex::new(LinkState::default()),
                    counters: LinkCounters::default(),
                    out: Mutex::new(None),
                })
            })
            .clone()
    }

    async fn connection(&self, link: &Link) -> Result<Arc<Conn>, TransportError> {
        let mut st = link.state.lock().await;
        if let Some(c) = &st.conn {
            if !c.closed.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        if let Some(at) = st.retry_at {
            if Instant::now() < at {
                return Err(TransportError::Unreachable {
                    peer: link.peer,
                    reason: format!(
                        "backing off after {} failed connects: {}",
                        st.failures, st.last_error
                    ),
                });
            }
        }
        let addr = self
            .inner
            .peers
            .read()
            .expect("peers lock")
            .get(&link.peer)
            .copied()
            .ok_or(TransportError::UnknownPeer(link.peer))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(link, addr)).await {
            Ok(Ok(conn)) => {
                if st.conn.is_some() || st.failures > 0 {
                    link.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                st.failures = 0;
                st.retry_at = None;
                st.conn = Some(conn.clone());
                *link.out.lock().expect("out lock") = Some(conn.out.clone());
                Ok(conn)
            }
            Ok(Err(e)) => Err(self.connect_failed(&mut st, link, addr, e.to_string())),
            Err(_) => Err(self.connect_failed(&mut st, link, addr, "connect timed out".into())),
        }
    }

    fn connect_failed(
        &self,
        st: &mut LinkState,
        link: &Link,
        addr: SocketAddr,
        reason: String,
    ) -> TransportError {
        st.conn = None;
        st.failures = st.failures.saturating_add(1);
        let backoff = BACKOFF_BASE
            .saturating_mul(1u32 << st.failures.min(16))
            .min(BACKOFF_MAX);
        st.retry_at = Some(Instant::now() + backoff);
        st.last_error = format!("{addr}: {reason}");
        tracing::debug!(peer = link.peer, channel = %link.channel, %addr, %reason, "connect failed");
        TransportError::Unreachable {
            peer: link.peer,
            reason: st.last_error.clone(),
        }
    }

    async fn connect(&self, link: &Link, addr: SocketAddr) -> io::Result<Arc<Conn>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut tls = self
            .inner
            .connector
            .connect(server_name(link.peer), tcp)
            .await?;
        let hello = Frame::new(
            FrameKind::Hello,
            link.channel,
            0,
            self.inner.identity.node_id.to_be_bytes().to_vec(),
        );
        tls.write_all(&hello.encode()).await?;
        tls.flush().await?;
        let (r, w) = tokio::io::split(tls);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let conn = Arc::new(Conn {
            out: tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let peer = link.peer;
        let writer = tokio::spawn({
            let conn = conn.clone();
            async move {
                if let Err(e) = write_loop(w, rx).await {
                    conn.close(peer, &format!("write failed: {e}"));
                }
            }
        });
        tokio::spawn({
            let conn = conn.clone();
            async move {
                let reason = match client_read_loop(r, &conn).await {
                    Ok(()) => "connection closed by peer".to_string(),
                    Err(e) => format!("read failed: {e}"),
                };
                conn.close(peer, &reason);
                writer.abort();
            }
        });
        Ok(conn)
    }

    async fn call_inner(
        &self,
        peer: NodeId,
        channel: Channel,
        payload: Bytes,
    ) -> Result<Bytes, TransportError> {
        let link = self.link(peer, channel);
        let conn = self.connection(&link).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().expect("pending lock").insert(id, tx);
        let _guard = PendingGuard { conn: &conn, id };
        // The connection may have closed between lookup and insert; close() drains the map,
        // so check again now that the slot is visible to it.
        if conn.closed.load(Ordering::SeqCst) {
            return Err(TransportError::Unreachable {
                peer,
                reason: "connection closed".into(),
            });
        }
        let len = payload.len();
        conn.out
            .send(Frame::new(FrameKind::Request, channel, id, payload))
            .await
            .map_err(|_| TransportError::Unreachable {
                peer,
                reason: "connection closed".into(),
            })?;
        link.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
        link.counters
            .bytes_sent
            .fetch_add(len as u64, Ordering::Relaxed);
        match rx.await {
            Ok(Err(TransportError::Remote { reason, .. })) => {
                Err(TransportError::Remote { peer, reason })
            }
            Ok(result) => result,
            Err(_) => Err(TransportError::Unreachable {
                peer,
                reason: "connection closed".into(),
            }),
        }
    }
}

impl Transport for TcpTransport {
    fn call(
        &self,
        peer: NodeId,
        channel: Channel,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(self.call_inner(peer, channel, payload))
    }

    fn set_peer_addr(&self, peer: NodeId, addr: SocketAddr) {
        let old = self
            .inner
            .peers
            .write()
            .expect("peers lock")
            .insert(peer, addr);
        if old.is_some() && old != Some(addr) {
            // Drop links to the old address; the next call connects to the new one.
            self.inner
                .links
                .lock()
                .expect("links lock")
                .retain(|(p, _), _| *p != peer);
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = Frame::decode_len(prefix).map_err(invalid)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Frame::decode_body(body.into()).map(Some).map_err(invalid)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Frame>,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(frame) = rx.recv().await {
        buf.clear();
        frame.encode_into(&mut buf);
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(f) => f.encode_into(&mut buf),
                Err(_) => break,
            }
        }
        w.write_all(&buf).await?;
        w.flush().await?;
    }
    w.shutdown().await
}

async fn client_read_loop<R: AsyncRead + Unpin>(r: R, conn: &Conn) -> io::Result<()> {
    let mut r = BufReader::new(r);
    while let Some(frame) = read_frame(&mut r).await? {
        match frame.kind {
            FrameKind::Response => conn.complete(frame.request_id, Ok(frame.payload)),
            FrameKind::Error => {
                let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                // The peer id is not known here; the caller's error names it via the link.
                conn.complete(
                    frame.request_id,
                    Err(TransportError::Remote { peer: 0, reason }),
                );
            }
            other => return Err(invalid(format!("unexpected {other:?} frame from server"))),
        }
    }
    Ok(())
}

/// A running listener; dropping it stops accepting (connections in progress finish their
/// current requests and then fail).
pub struct TcpServer {
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpServer {
    /// Serves authenticated peers on `listener`, passing each request to `handler`.
    pub fn start(
        listener: TcpListener,
        identity: &Identity,
        handler: Arc<dyn Handler>,
    ) -> Result<TcpServer, TlsError> {
        let acceptor = TlsAcceptor::from(identity.server_config()?);
        let local_addr = listener
            .local_addr()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let task = tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_conn(tcp, acceptor, handler).await {
                        tracing::debug!(%remote, error = %e, "peer connection ended");
                    }
                });
            }
        });
        Ok(TcpServer { local_addr, task })
    }
}

async fn serve_conn(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    handler: Arc<dyn Handler>,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let (mut tls, from, channel) = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut tls = acceptor.accept(tcp).await?;
        let hello = read_frame(&mut tls)
            .await?
            .ok_or_else(|| invalid("closed before hello"))?;
        if hello.kind != FrameKind::Hello || hello.payload.len() != 8 {
            return Err(invalid("first frame is not a hello"));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&hello.payload);
        let from = NodeId::from_be_bytes(id);
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned();
        match cert {
            Some(cert) if cert_names_node(&cert, from) => Ok((tls, from, hello.channel)),
            _ => Err(invalid(format!(
                "peer claims to be node {from} but its certificate does not say so"
            ))),
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
    tls.flush().await?;
    let (r, w) = tokio::io::split(tls);
    let (tx, rx) = mpsc::channel::<Frame>(QUEUE_DEPTH_MAX);
    let writer = tokio::spawn(write_loop(w, rx));
    let permits = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let mut r = BufReader::new(r);
    let result = async {
        while let Some(frame) = read_frame(&mut r).await? {
            if frame.kind != FrameKind::Request || frame.channel != channel {
                return Err(invalid(format!(
                    "unexpected {:?} frame on {} from node {from}",
                    frame.kind, frame.channel
                )));
            }
            let permit = permits.clone().acquire_owned().await.map_err(invalid)?;
            let handler = handler.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let reply = match handler.handle(from, frame.channel, frame.payload).await {
                    Ok(bytes) => {
                        Frame::new(FrameKind::Response, frame.channel, frame.request_id, bytes)
                    }
                    Err(msg) => Frame::new(
                        FrameKind::Error,
                        frame.channel,
                        frame.request_id,
                        msg.into_bytes(),
                    ),
                };
                let _ = tx.send(reply).await;
                drop(permit);
            });
        }
        Ok(())
    }
    .await;
    drop(tx);
    // Let in-flight replies go out before the socket closes.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    result
}
