//! Per peer, one task that sends this node's records to that peer, in order, over the
//! network's one-sided [`RecordLink`]; a record that is not delivered fails its member.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tandem_storage::BlockStore;
use tandem_types::{Epoch, NodeId, VolumeId};
use tokio::sync::{mpsc, oneshot, Notify};

#[cfg(doc)]
use super::network::RecordLink;
use super::{Inner, SEND_QUEUED_PER_VOLUME_MAX};

/// One record on its way to a member.
pub(super) struct SendItem {
    pub(super) volume: VolumeId,
    pub(super) epoch: Epoch,
    pub(super) record: Bytes,
}

/// Fires when a [`PeerSender`]'s task is done (every record it posted has its outcome).
pub(super) type SenderEnd = oneshot::Receiver<()>;

/// Per peer: the queue of this node's records to that peer, drained by one task onto the
/// network's [`RecordLink`] to it. Dropped (with the driver's last handle on it) when the peer
/// leaves the configuration: its task then sends what is queued, waits for the outcomes and
/// ends, and a later sender to the same peer starts only after that ([`PeerSender::start`]).
pub(super) struct PeerSender {
    /// Unbounded in type: it is filled under a core lock, which cannot wait. Bounded per
    /// volume by [`SEND_QUEUED_PER_VOLUME_MAX`], counted in `queued` and checked by
    /// [`PeerSender::push`].
    queue: mpsc::UnboundedSender<SendItem>,
    /// Records queued per volume and not yet taken by the task (an entry goes at zero).
    queued: Arc<Mutex<HashMap<VolumeId, usize>>>,
}

/// The record queue to a peer is full for this volume: the member cannot keep up.
#[derive(Debug)]
pub(super) struct QueueFull;

impl PeerSender {
    /// Starts the sender's task. `after` is the end of an earlier sender to the same peer: the
    /// new one posts nothing until that one's records are all out of the peer's region (the
    /// two would otherwise place records in the same region independently). Returns the
    /// sender and the signal of its own end (fired when its task is done).
    pub(super) fn start<S: BlockStore>(
        inner: Weak<Inner<S>>,
        peer: NodeId,
        after: Option<SenderEnd>,
    ) -> (Arc<PeerSender>, SenderEnd) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        let queued: Arc<Mutex<HashMap<VolumeId, usize>>> = Arc::default();
        let taken = queued.clone();
        tokio::spawn(async move {
            if let Some(after) = after {
                let _ = after.await;
            }
            run_sender(inner, peer, rx, taken).await;
            let _ = ended_tx.send(());
        });
        (Arc::new(PeerSender { queue: tx, queued }), ended_rx)
    }

    /// Queues a record, unless [`SEND_QUEUED_PER_VOLUME_MAX`] records of its volume wait
    /// already: then the caller fails the member.
    pub(super) fn push(&self, item: SendItem) -> Result<(), QueueFull> {
        {
            let mut queued = self.queued.lock().expect("queued lock");
            let n = queued.entry(item.volume).or_insert(0);
            if *n >= SEND_QUEUED_PER_VOLUME_MAX {
                return Err(QueueFull);
            }
            *n += 1;
        }
        // Closed only once the task ended: the driver is stopping.
        let _ = self.queue.send(item);
        Ok(())
    }
}

/// Posts the queued records to `peer` in order; a second task reports their outcomes and fails
/// the member of a record that was not delivered. Ends once the queue is closed and every
/// posted record has its outcome.
async fn run_sender<S: BlockStore>(
    inner: Weak<Inner<S>>,
    peer: NodeId,
    mut rx: mpsc::UnboundedReceiver<SendItem>,
    queued: Arc<Mutex<HashMap<VolumeId, usize>>>,
) {
    let link = match inner.upgrade() {
        Some(i) => i.net.record_link(peer),
        None => return,
    };
    // The volume and epoch of each posted record without an outcome yet, oldest first: the
    // link reports outcomes in posting order.
    let posted: Arc<Mutex<VecDeque<(VolumeId, Epoch)>>> = Arc::default();
    let closed = Arc::new(Notify::new());
    let sending = Arc::new(AtomicBool::new(true));
    let outcomes = {
        let (link, posted, closed, sending, inner) =
            (link.clone(), posted.clone(), closed.clone(), sending.clone(), inner.clone());
        tokio::spawn(async move {
            loop {
                if !sending.load(Ordering::Acquire) && posted.lock().expect("posted lock").is_empty() {
                    return;
                }
                let result = tokio::select! {
                    outcome = link.next_outcome() => match outcome {
                        Some(result) => result,
                        None => return,
                    },
                    () = closed.notified() => continue,
                };
                let front = posted.lock().expect("posted lock").pop_front();
                if let (Err(e), Some((volume, epoch))) = (&result, front) {
                    tracing::info!(%peer, %volume, error = %e, "record not delivered");
                    if let Some(inner) = inner.upgrade() {
                        inner.member_failed(volume, epoch, peer);
                    }
                }
            }
        })
    };
    while let Some(item) = rx.recv().await {
        {
            let mut queued = queued.lock().expect("queued lock");
            if let Some(n) = queued.get_mut(&item.volume) {
                *n -= 1;
                if *n == 0 {
                    queued.remove(&item.volume);
                }
            }
        }
        posted.lock().expect("posted lock").push_back((item.volume, item.epoch));
        if link.post(item.record).await.is_err() {
            // Closed for good: this record gets no outcome.
            posted.lock().expect("posted lock").pop_back();
            break;
        }
    }
    sending.store(false, Ordering::Release);
    closed.notify_one();
    let _ = outcomes.await;
}

impl<S: BlockStore> Inner<S> {
    pub(super) fn sender(self: &Arc<Self>, peer: NodeId) -> Arc<PeerSender> {
        let mut senders = self.senders.lock().expect("senders lock");
        let sender = senders.entry(peer).or_insert_with(|| {
            let after = self.senders_ending.lock().expect("senders lock").remove(&peer);
            PeerSender::start(Arc::downgrade(self), peer, after)
        });
        sender.0.clone()
    }

    /// Drops the senders to peers that hold no copy of any volume any more (they left the
    /// configuration); their tasks end once what they queued is delivered or failed.
    pub(super) fn retire_senders(&self, peers: &BTreeSet<NodeId>) {
        let mut senders = self.senders.lock().expect("senders lock");
        let mut ending = self.senders_ending.lock().expect("senders lock");
        // Ends of senders that finished are no longer needed.
        ending.retain(|_, end| matches!(end.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        let gone: Vec<NodeId> = senders.keys().filter(|p| !peers.contains(p)).copied().collect();
        for p in gone {
            if let Some((_, end)) = senders.remove(&p) {
                ending.insert(p, end);
            }
        }
    }
}
