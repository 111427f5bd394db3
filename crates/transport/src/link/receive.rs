//! The receiving side, per (peer, channel): frames from authenticated pipes go through a
//! [`ReceiveWindow`] (reordering, duplicates and the reply cache, in `tandem_linkcore`), then a
//! dispatcher hands requests to the channel's [`Handler`] in order, a bounded number at once,
//! and sends each reply back on every pipe the request came on. Also cancels and abandoned
//! sessions: a request its sender gave up on never starts, or is cancelled while it runs.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use tandem_linkcore::{Arrival, ReceiveWindow, WINDOW_SEQS};
use tandem_types::{Channel, NodeId};
use tandem_wire::{Frame, FrameKind};
use tokio::io::BufReader;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::pipe::{read_frame, server_hello, spawn_writer, PipeTx, READ_BUFFER_BYTES};
use crate::ring::RegionRegistry;
use crate::tcp::Incoming;
use crate::Handler;

/// Handler invocations running at once per (peer, channel) on the receiving side.
pub const DISPATCH_IN_FLIGHT_MAX: usize = 64;

/// Requests delivered in order and waiting for the dispatcher, per (peer, channel). A sender
/// keeping its window has at most [`WINDOW_SEQS`] unanswered requests of its current session;
/// twice that leaves room for the rest of a session it has just abandoned (the dispatcher
/// drops those without running them). A sender that overflows it breaks the protocol: its
/// pipe is closed.
const DISPATCH_QUEUE_MAX: usize = 2 * WINDOW_SEQS as usize;

// More handler slots than a window can deliver would never fill.
const _: () = assert!(DISPATCH_IN_FLIGHT_MAX as u64 <= WINDOW_SEQS);
// The dispatch queue holds at least one full window of one session.
const _: () = assert!(DISPATCH_QUEUE_MAX as u64 >= WINDOW_SEQS);

/// The receiving side of a mesh: a window and a dispatcher per (peer, channel), the handlers
/// of the channels, and the regions that one-sided writes land in.
pub(super) struct Inbound {
    /// The receiving window per (peer, channel). An entry lives as long as its peer is in the
    /// cluster: [`Inbound::forget`] drops the entries of a peer that left, so the map is
    /// bounded by the cluster's nodes (times the four channels).
    chans: Mutex<HashMap<(NodeId, Channel), Arc<InboundChan>>>,
    handlers: RwLock<HashMap<Channel, Arc<dyn Handler>>>,
    regions: Arc<RegionRegistry>,
    /// The server's hello on every pipe peers make: this node and this process of it.
    hello: Frame,
}

/// A request as it waits in the reorder buffer.
struct Arrived {
    kind: FrameKind,
    payload: Bytes,
    /// When this node read the request off its pipe.
    received: std::time::Instant,
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
    /// Replies go back as whole frames on the pipes (routes) the request came on.
    st: Mutex<ReceiveWindow<Arrived, PipeTx, Frame>>,
    dispatch: mpsc::Sender<Dispatch>,
    /// The sender's current session. A request of an older session (one the sender abandoned
    /// and failed to its callers) is never started, and one still running is cancelled.
    current: watch::Sender<u64>,
    /// Requests of the current session the sender cancelled (`Cancel` frames), from its
    /// oldest unanswered one on: bounded by the window.
    cancelled: watch::Sender<BTreeSet<u64>>,
}

impl Inbound {
    /// The receiving side of node `me`, in the process `incarnation` names.
    pub(super) fn new(regions: Arc<RegionRegistry>, me: NodeId, incarnation: u64) -> Inbound {
        Inbound {
            chans: Mutex::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            regions,
            hello: server_hello(me, incarnation),
        }
    }

    pub(super) fn set_handler(&self, channel: Channel, handler: Arc<dyn Handler>) {
        self.handlers.write().expect("handlers lock").insert(channel, handler);
    }

    pub(super) fn regions(&self) -> &Arc<RegionRegistry> {
        &self.regions
    }

    /// Drops what this node keeps of `peer`'s requests (its peer left the cluster). Each
    /// channel's dispatcher ends once its running handlers have finished.
    pub(super) fn forget(&self, peer: NodeId) {
        self.chans.lock().expect("inbound lock").retain(|(p, _), _| *p != peer);
    }

    /// Receiving windows kept (one per peer and channel that spoke).
    pub(super) fn len(&self) -> usize {
        self.chans.lock().expect("inbound lock").len()
    }

    fn chan(self: &Arc<Self>, from: NodeId, channel: Channel) -> Arc<InboundChan> {
        let mut map = self.chans.lock().expect("inbound lock");
        map.entry((from, channel))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(DISPATCH_QUEUE_MAX);
                let chan = Arc::new(InboundChan {
                    from,
                    channel,
                    st: Mutex::new(ReceiveWindow::new()),
                    dispatch: tx,
                    current: watch::Sender::new(0),
                    cancelled: watch::Sender::new(BTreeSet::new()),
                });
                tokio::spawn(dispatcher(Arc::downgrade(self), Arc::downgrade(&chan), rx));
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
        if frame.kind == FrameKind::Ping {
            // At once, on this pipe, outside the sequence: the sender wants to know whether the
            // pipe carries anything. A full queue sends none; its bytes flowing say as much.
            let _ = route.out.try_send(Frame::new(FrameKind::Pong, channel, 0, 0, 0, Bytes::new()));
            return Ok(());
        }
        if !matches!(frame.kind, FrameKind::Request | FrameKind::RegionWrite | FrameKind::Cancel) {
            return Err(format!("unexpected {:?} frame from a client", frame.kind));
        }
        if frame.seq == 0 {
            return Err("sequence number 0".into());
        }
        let chan = self.chan(from, channel);
        let mut st = chan.st.lock().expect("inbound lock");
        if frame.kind == FrameKind::Cancel {
            // Only for a request of this session within the window; it may still be on its
            // way on another pipe, buffered, queued, running, or answered already.
            if st.accepts_cancel(frame.session, frame.seq, frame.ack) {
                drop(st);
                chan.cancelled.send_modify(|c| {
                    c.insert(frame.seq);
                });
            }
            return Ok(());
        }
        let session_before = st.session();
        let arrived = Arrived { kind: frame.kind, payload: frame.payload, received: std::time::Instant::now() };
        let arrival = st.on_request(frame.session, frame.seq, frame.ack, arrived, route.clone());
        if matches!(arrival, Ok(Arrival::Stale)) {
            return Ok(()); // A straggler of a session the sender has abandoned.
        }
        if st.session() != session_before {
            // A new session: what was cancelled or running belongs to the old one.
            chan.cancelled.send_replace(BTreeSet::new());
            chan.current.send_replace(frame.session);
        }
        chan.cancelled.send_if_modified(|c| {
            if c.first().is_some_and(|&s| s < frame.ack) {
                *c = c.split_off(&frame.ack);
            }
            false
        });
        match arrival.map_err(|e| e.to_string())? {
            Arrival::Answered(reply, route) => {
                tokio::spawn(async move {
                    let _ = route.out.send(reply).await;
                });
            }
            Arrival::Stale | Arrival::Duplicate => {}
            Arrival::Accepted => {
                let session = st.session();
                while let Some((seq, a)) = st.pop_ready() {
                    chan.dispatch
                        .try_send(Dispatch { session, seq, kind: a.kind, payload: a.payload, received: a.received })
                        .map_err(|_| "dispatch queue overflow".to_string())?;
                }
            }
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
///
/// Ends when the channel's entry is dropped ([`Inbound::forget`]) and its handlers have
/// finished: it holds the entry only while it handles a request.
async fn dispatcher(inbound: Weak<Inbound>, entry: Weak<InboundChan>, mut rx: mpsc::Receiver<Dispatch>) {
    let permits = Arc::new(Semaphore::new(DISPATCH_IN_FLIGHT_MAX));
    while let Some(d) = rx.recv().await {
        let Some(chan) = entry.upgrade() else { return };
        if withdrawn(&chan, &d) {
            continue;
        }
        let Some(m) = inbound.upgrade() else { return };
        if d.kind == FrameKind::RegionWrite {
            let result = m.regions.write(chan.from, chan.channel, &d.payload).await;
            finish(&chan, d.session, d.seq, result);
            continue;
        }
        let handler = m.handlers.read().expect("handlers lock").get(&chan.channel).cloned();
        drop(m);
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        if withdrawn(&chan, &d) {
            continue;
        }
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
                    tracing::debug!(from = %chan.from, channel = %chan.channel, seq = %d.seq, "request of an abandoned session cancelled");
                    return;
                }
                _ = cancels.wait_for(|c| c.contains(&d.seq)) => Err(CANCELLED.into()),
            };
            finish(&chan, d.session, d.seq, result);
            drop(permit);
        });
    }
}

const CANCELLED: &str = "cancelled by the sender";

/// Whether `d` must not start: its session was abandoned (nobody waits for an answer), or the
/// sender cancelled it (answered with an error, so the sender's window moves on).
fn withdrawn(chan: &InboundChan, d: &Dispatch) -> bool {
    if *chan.current.borrow() != d.session {
        return true;
    }
    if chan.cancelled.borrow().contains(&d.seq) {
        finish(chan, d.session, d.seq, Err(CANCELLED.into()));
        return true;
    }
    false
}

fn finish(chan: &InboundChan, session: u64, seq: u64, result: Result<Bytes, String>) {
    let (kind, payload) = match result {
        Ok(b) => (FrameKind::Response, b),
        Err(msg) => (FrameKind::Error, Bytes::from(msg.into_bytes())),
    };
    let frame = Frame::new(kind, chan.channel, session, seq, 0, payload);
    // No routes when the session has ended or the sender acknowledged the request already:
    // nobody waits.
    let routes = chan.st.lock().expect("inbound lock").answer(session, seq, frame.clone());
    // On every route at once: a pipe that stalled (its sender has made a new one and resent
    // the request there) must not hold up the reply on the new one.
    for r in routes.into_iter().filter(|r| r.is_alive()) {
        match r.out.try_send(frame.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                tokio::spawn(async move {
                    let _ = r.out.send(frame).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Reads the frames of one pipe a peer made to this node, until it ends or breaks the
/// protocol.
pub(super) fn serve_pipe(inbound: &Arc<Inbound>, incoming: Incoming) {
    let Incoming { from, channel, read, write } = incoming;
    let route = spawn_writer(write, || {});
    // The server's hello first: nothing else can be queued on a route before it is returned.
    if route.out.try_send(inbound.hello.clone()).is_err() {
        return;
    }
    let inbound = Arc::downgrade(inbound);
    tokio::spawn(async move {
        let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, read);
        loop {
            match read_frame(&mut r).await {
                Ok(Some(frame)) => {
                    let Some(m) = inbound.upgrade() else { break };
                    if let Err(e) = m.on_frame(from, channel, frame, &route) {
                        tracing::warn!(%from, %channel, error = %e, "closing a peer pipe after a protocol error");
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%from, %channel, error = %e, "peer pipe ended");
                    break;
                }
            }
        }
        route.mark_dead();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxFuture;

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, _from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
            Box::pin(async move { Ok(payload) })
        }
    }

    #[tokio::test]
    async fn a_forgotten_peer_leaves_nothing_behind_and_may_speak_again() {
        let inbound = Arc::new(Inbound::new(RegionRegistry::new(1, 16, 4), NodeId(9), 1));
        inbound.set_handler(Channel::Control, Arc::new(Echo));
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let route = spawn_writer(Box::new(ours), || {});
        let request =
            |session, seq| Frame::new(FrameKind::Request, Channel::Control, session, seq, 1, Bytes::from("x"));
        inbound.on_frame(NodeId(7), Channel::Control, request(5, 1), &route).expect("accepted");
        let reply = read_frame(&mut theirs).await.expect("read").expect("a reply");
        assert_eq!((reply.kind, reply.seq), (FrameKind::Response, 1));
        let entry = Arc::downgrade(&inbound.chans.lock().expect("inbound lock")[&(NodeId(7), Channel::Control)]);

        inbound.forget(NodeId(7));
        assert!(inbound.chans.lock().expect("inbound lock").is_empty());
        for _ in 0..100 {
            if entry.upgrade().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(entry.upgrade().is_none(), "the forgotten window (and its dispatcher's queue) is dropped");

        // Back again, as after a restart: a fresh window, which takes the sender's session.
        inbound.on_frame(NodeId(7), Channel::Control, request(5, 1), &route).expect("accepted");
        let reply = read_frame(&mut theirs).await.expect("read").expect("a reply");
        assert_eq!((reply.kind, reply.seq), (FrameKind::Response, 1));
    }
}
