//! An in-memory [`Network`]: every node of a test on one [`Hub`], requests answered by calling
//! the peer's handler directly, records handed over through a bounded queue per receiving node.
//! No sockets, no regions: what the driver relies on (ordered records per sender, an outcome
//! per record once the peer took it, withdrawn requests when the caller drops them) holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tandem_replication::driver::{Network, RecordLink};
use tandem_transport::{BoxFuture, Handler, TransportError};
use tandem_types::Channel;
use tandem_types::NodeId;
use tokio::sync::{mpsc, oneshot};

/// Records a node has received and not taken yet (then senders wait).
const RECORDS_QUEUED_MAX: usize = 256;
/// Records a link has posted without an outcome yet (then it waits), like a ring's slots.
const RECORDS_IN_FLIGHT_MAX: usize = 256;

tokio::task_local! {
    static RECEIVED: Instant;
}

/// A record on its way, and the signal that the receiver took it.
type Delivery = (NodeId, Vec<u8>, oneshot::Sender<()>);

/// The nodes of one test.
#[derive(Default)]
pub struct Hub {
    nodes: Mutex<HashMap<NodeId, Arc<NodeEnd>>>,
}

struct NodeEnd {
    handlers: Mutex<HashMap<Channel, Arc<dyn Handler>>>,
    records_tx: mpsc::Sender<Delivery>,
    records_rx: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
}

impl Hub {
    /// The network as node `me` sees it.
    pub fn join(self: &Arc<Hub>, me: NodeId) -> MemNet {
        let (records_tx, records_rx) = mpsc::channel(RECORDS_QUEUED_MAX);
        let end = NodeEnd {
            handlers: Mutex::new(HashMap::new()),
            records_tx,
            records_rx: tokio::sync::Mutex::new(records_rx),
        };
        self.nodes.lock().expect("hub lock").insert(me, Arc::new(end));
        MemNet { me, hub: self.clone() }
    }

    fn node(&self, id: NodeId) -> Option<Arc<NodeEnd>> {
        self.nodes.lock().expect("hub lock").get(&id).cloned()
    }
}

pub struct MemNet {
    me: NodeId,
    hub: Arc<Hub>,
}

impl Network for MemNet {
    fn call(&self, peer: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(async move {
            let end = self.hub.node(peer).ok_or(TransportError::UnknownPeer(peer))?;
            let handler = end.handlers.lock().expect("handlers lock").get(&channel).cloned();
            let handler = handler
                .ok_or_else(|| TransportError::Unreachable { peer, reason: format!("no handler for {channel:?}") })?;
            // Runs in the caller's future: dropping the call withdraws the request.
            let reply = RECEIVED.scope(Instant::now(), handler.handle(self.me, channel, payload)).await;
            reply.map_err(|reason| TransportError::Remote { peer, reason })
        })
    }

    fn serve(&self, channel: Channel, handler: Arc<dyn Handler>) {
        let end = self.hub.node(self.me).expect("joined");
        end.handlers.lock().expect("handlers lock").insert(channel, handler);
    }

    fn request_received_at(&self) -> Option<Instant> {
        RECEIVED.try_with(|t| *t).ok()
    }

    fn accept_records_from(&self, _peer: NodeId) -> Result<(), String> {
        Ok(())
    }

    fn next_record(&self) -> BoxFuture<'_, Option<(NodeId, Vec<u8>)>> {
        Box::pin(async move {
            let end = self.hub.node(self.me)?;
            let (from, bytes, taken) = end.records_rx.lock().await.recv().await?;
            let _ = taken.send(());
            Some((from, bytes))
        })
    }

    fn record_link(&self, peer: NodeId) -> Arc<dyn RecordLink> {
        let (posted_tx, posted_rx) = mpsc::channel(RECORDS_IN_FLIGHT_MAX);
        Arc::new(MemRecordLink {
            from: self.me,
            peer,
            to: self.hub.node(peer),
            posted_tx,
            outcomes: tokio::sync::Mutex::new(Outcomes { posted_rx, head: None }),
        })
    }
}

struct MemRecordLink {
    from: NodeId,
    peer: NodeId,
    to: Option<Arc<NodeEnd>>,
    /// The "taken" signal of each posted record, in posting order.
    posted_tx: mpsc::Sender<oneshot::Receiver<()>>,
    outcomes: tokio::sync::Mutex<Outcomes>,
}

struct Outcomes {
    posted_rx: mpsc::Receiver<oneshot::Receiver<()>>,
    /// The oldest record's signal while it is awaited: kept if the wait is cancelled.
    head: Option<oneshot::Receiver<()>>,
}

impl RecordLink for MemRecordLink {
    fn post(&self, record: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let (taken_tx, taken_rx) = oneshot::channel();
            self.posted_tx.send(taken_rx).await.map_err(|_| TransportError::Closed)?;
            // An unknown peer never takes it: its outcome is an error.
            if let Some(to) = &self.to {
                let _ = to.records_tx.send((self.from, record.to_vec(), taken_tx)).await;
            }
            Ok(())
        })
    }

    fn next_outcome(&self) -> BoxFuture<'_, Option<Result<(), TransportError>>> {
        Box::pin(async move {
            let mut o = self.outcomes.lock().await;
            if o.head.is_none() {
                o.head = Some(o.posted_rx.recv().await?);
            }
            let taken = o.head.as_mut().expect("set above").await;
            o.head = None;
            Some(taken.map_err(|_| TransportError::Unreachable { peer: self.peer, reason: "record not taken".into() }))
        })
    }
}
