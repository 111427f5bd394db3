//! Emulated RDMA WRITE: registered memory regions on the receiving side, descriptor rings on
//! the sending side.
//!
//! A receiver registers a region (an id and a buffer taken from a pool preallocated at start,
//! so no allocation happens per transfer). A sender posts [`Descriptor`]s — local bytes, a
//! destination region, an offset, a channel — on the per-peer [`DescriptorRing`]; the ring is
//! bounded and a full ring blocks the poster. An engine task drains the ring onto the link of
//! each descriptor's channel; on the receiver the bytes are copied straight into the region,
//! and the receiving application sees only a [`Completion`] (region and range), never a
//! message. Completions come out in ring order per channel on both sides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use tandem_types::{Channel, NodeId};
use tokio::sync::{mpsc, Semaphore};

use crate::{BoxFuture, TransportError};

pub type RegionId = u64;

/// The reply to a queued region write: empty on success.
pub type ReplyFuture = BoxFuture<'static, Result<Bytes, TransportError>>;

/// What a descriptor ring needs of the links under it (the mesh implements it): queue a
/// region write on the link of its channel, in order (writes queued one after another arrive
/// in that order), and wait for its reply later. Defined here so that the ring depends on no
/// link type and the link, which applies incoming region writes to the [`RegionRegistry`],
/// depends on the ring and not the other way round.
pub trait RegionWriteLink: Clone + Send + Sync + 'static {
    fn queue_region_write<'a>(
        &'a self,
        peer: NodeId,
        channel: Channel,
        region: RegionId,
        offset: u64,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<ReplyFuture, TransportError>>;
}

/// A write that landed in one of this node's regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub from: NodeId,
    pub channel: Channel,
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
    /// For a region registered with [`RegionRegistry::register_credited`]: fires when the
    /// application has taken the bytes out (explicitly, or when the last copy of this
    /// completion is dropped). Only then does the sender see its write complete, so it may
    /// reuse that part of the region, like a receive credit in RDMA.
    pub consumed: ConsumeSignal,
}

/// See [`Completion::consumed`].
#[derive(Clone, Default)]
pub struct ConsumeSignal(Option<Arc<ConsumeInner>>);

struct ConsumeInner(Mutex<Option<tokio::sync::oneshot::Sender<()>>>);

impl ConsumeInner {
    fn fire(&self) {
        if let Some(tx) = self.0.lock().expect("consume lock").take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for ConsumeInner {
    fn drop(&mut self) {
        self.fire();
    }
}

impl ConsumeSignal {
    /// Tells the sender the bytes have been taken out of the region.
    pub fn consume(&self) {
        if let Some(inner) = &self.0 {
            inner.fire();
        }
    }
}

/// Signals carry no state worth comparing.
impl PartialEq for ConsumeSignal {
    fn eq(&self, _: &ConsumeSignal) -> bool {
        true
    }
}

impl Eq for ConsumeSignal {}

impl std::fmt::Debug for ConsumeSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ConsumeSignal(credited)" } else { "ConsumeSignal" })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("region {0} is already registered")]
    Exists(RegionId),
    #[error("region {0} is not registered")]
    Unknown(RegionId),
    #[error("no free region buffer (all {0} are registered)")]
    PoolEmpty(usize),
    #[error("range {offset}+{len} is outside region {region} of {size} bytes")]
    OutOfRange { region: RegionId, offset: u64, len: u64, size: usize },
}

#[derive(Clone)]
struct Region {
    buf: Arc<Mutex<Vec<u8>>>,
    credited: bool,
}

/// The regions a node has registered for one-sided writes, and their completion queue.
pub struct RegionRegistry {
    region_bytes: usize,
    buffers_total: usize,
    pool: Mutex<Vec<Vec<u8>>>,
    regions: Mutex<HashMap<RegionId, Region>>,
    completions_tx: mpsc::Sender<Completion>,
    completions_rx: tokio::sync::Mutex<mpsc::Receiver<Completion>>,
}

impl RegionRegistry {
    /// Preallocates `buffers` region buffers of `region_bytes` each; at most `completions_max`
    /// completions wait unread (then writers wait: backpressure to the sender).
    pub fn new(buffers: usize, region_bytes: usize, completions_max: usize) -> Arc<RegionRegistry> {
        let (tx, rx) = mpsc::channel(completions_max.max(1));
        Arc::new(RegionRegistry {
            region_bytes,
            buffers_total: buffers,
            pool: Mutex::new((0..buffers).map(|_| vec![0u8; region_bytes]).collect()),
            regions: Mutex::new(HashMap::new()),
            completions_tx: tx,
            completions_rx: tokio::sync::Mutex::new(rx),
        })
    }

    pub fn region_bytes(&self) -> usize {
        self.region_bytes
    }

    pub fn register(&self, id: RegionId) -> Result<(), RegionError> {
        self.register_region(id, false)
    }

    /// Registers a region whose writers see their write complete only once the application
    /// has consumed its [`Completion`] (see [`Completion::consumed`]).
    pub fn register_credited(&self, id: RegionId) -> Result<(), RegionError> {
        self.register_region(id, true)
    }

    fn register_region(&self, id: RegionId, credited: bool) -> Result<(), RegionError> {
        let mut regions = self.regions.lock().expect("regions lock");
        if regions.contains_key(&id) {
            return Err(RegionError::Exists(id));
        }
        let buf = self.pool.lock().expect("pool lock").pop().ok_or(RegionError::PoolEmpty(self.buffers_total))?;
        regions.insert(id, Region { buf: Arc::new(Mutex::new(buf)), credited });
        Ok(())
    }

    pub fn is_registered(&self, id: RegionId) -> bool {
        self.regions.lock().expect("regions lock").contains_key(&id)
    }

    /// Returns the region's buffer to the pool (zeroed, so no data leaks to the next user).
    pub fn deregister(&self, id: RegionId) -> Result<(), RegionError> {
        let region = self.regions.lock().expect("regions lock").remove(&id).ok_or(RegionError::Unknown(id))?;
        let mut buf = std::mem::take(&mut *region.buf.lock().expect("region lock"));
        buf.fill(0);
        self.pool.lock().expect("pool lock").push(buf);
        Ok(())
    }

    /// Copies bytes out of a region.
    pub fn read(&self, id: RegionId, offset: u64, len: u64) -> Result<Vec<u8>, RegionError> {
        let region = self.regions.lock().expect("regions lock").get(&id).cloned().ok_or(RegionError::Unknown(id))?;
        let buf = region.buf.lock().expect("region lock");
        let range = checked_range(id, offset, len, buf.len())?;
        Ok(buf[range].to_vec())
    }

    /// The next write that landed, in order per (peer, channel).
    pub async fn next_completion(&self) -> Option<Completion> {
        self.completions_rx.lock().await.recv().await
    }

    pub fn try_next_completion(&self) -> Option<Completion> {
        self.completions_rx.try_lock().ok()?.try_recv().ok()
    }

    /// Applies a region-write payload (`region | offset | bytes`) from a peer.
    pub(crate) async fn write(&self, from: NodeId, channel: Channel, payload: &[u8]) -> Result<Bytes, String> {
        if payload.len() < 16 {
            return Err("region write shorter than its 16-byte header".into());
        }
        let region = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
        let data = &payload[16..];
        let target = self.regions.lock().expect("regions lock").get(&region).cloned();
        let target = target.ok_or_else(|| RegionError::Unknown(region).to_string())?;
        {
            let mut buf = target.buf.lock().expect("region lock");
            let range = checked_range(region, offset, data.len() as u64, buf.len()).map_err(|e| e.to_string())?;
            buf[range].copy_from_slice(data);
        }
        let (consumed, taken) = if target.credited {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (ConsumeSignal(Some(Arc::new(ConsumeInner(Mutex::new(Some(tx)))))), Some(rx))
        } else {
            (ConsumeSignal::default(), None)
        };
        let completion = Completion { from, channel, region, offset, len: data.len() as u64, consumed };
        self.completions_tx.send(completion).await.map_err(|_| "completion queue closed".to_string())?;
        if let Some(rx) = taken {
            // Either fired or dropped unread: both mean the bytes are no longer needed.
            let _ = rx.await;
        }
        Ok(Bytes::new())
    }
}

fn checked_range(region: RegionId, offset: u64, len: u64, size: usize) -> Result<std::ops::Range<usize>, RegionError> {
    let end = offset.checked_add(len).filter(|e| *e <= size as u64);
    match end {
        Some(end) => Ok(offset as usize..end as usize),
        None => Err(RegionError::OutOfRange { region, offset, len, size }),
    }
}

/// One transfer: `data` goes to `region` of the ring's peer at `offset`, on `channel`.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub data: Bytes,
    pub region: RegionId,
    pub offset: u64,
    pub channel: Channel,
}

/// The sender's view of a finished transfer. It holds its ring slot until the application
/// takes it from the completion queue, as an RDMA completion queue entry does: a poster that
/// never reads completions fills the ring and then waits.
#[derive(Debug)]
pub struct LocalCompletion {
    pub channel: Channel,
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
    pub result: Result<(), TransportError>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A bounded ring of descriptors to one peer, drained by an engine task per channel.
pub struct DescriptorRing {
    slots: Arc<Semaphore>,
    queues: HashMap<Channel, mpsc::Sender<(Descriptor, tokio::sync::OwnedSemaphorePermit)>>,
    completions: tokio::sync::Mutex<mpsc::Receiver<LocalCompletion>>,
}

impl DescriptorRing {
    /// A ring of `capacity` descriptors to `peer`. A descriptor holds its slot from `post`
    /// until its completion is reported, so `capacity` bounds everything in flight.
    pub fn new<L: RegionWriteLink>(links: &L, peer: NodeId, capacity: usize) -> DescriptorRing {
        let slots = Arc::new(Semaphore::new(capacity));
        // Every queued descriptor and every unread completion holds one of the `capacity` slot
        // permits, so neither queue can hold more than `capacity`: sized so, they are never
        // full, and a send that finds one full is a bug (it panics). (`max(1)`: a channel needs
        // room for one; a ring of no slots admits nothing anyway.)
        let queue_max = capacity.max(1);
        let (done_tx, done_rx) = mpsc::channel(queue_max);
        let mut queues = HashMap::new();
        for channel in Channel::ALL {
            let (tx, rx) = mpsc::channel(queue_max);
            tokio::spawn(engine(links.clone(), peer, rx, done_tx.clone()));
            queues.insert(channel, tx);
        }
        DescriptorRing { slots, queues, completions: tokio::sync::Mutex::new(done_rx) }
    }

    /// Posts a descriptor; waits while the ring is full.
    pub async fn post(&self, d: Descriptor) -> Result<(), TransportError> {
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| TransportError::Closed)?;
        self.queue(d, permit).map_err(|_| TransportError::Closed)
    }

    /// Posts without waiting; gives the descriptor back when the ring is full.
    pub fn try_post(&self, d: Descriptor) -> Result<(), Descriptor> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => self.queue(d, permit),
            Err(_) => Err(d),
        }
    }

    /// Hands a descriptor to its channel's engine; gives it back if the engine has stopped.
    fn queue(&self, d: Descriptor, permit: tokio::sync::OwnedSemaphorePermit) -> Result<(), Descriptor> {
        match self.queues[&d.channel].try_send((d, permit)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed((d, _))) => Err(d),
            Err(mpsc::error::TrySendError::Full(_)) => panic!("a ring queue is full although each entry holds a slot"),
        }
    }

    /// The next finished transfer, in ring order per channel. Taking it frees its slot.
    pub async fn next_completion(&self) -> Option<LocalCompletion> {
        let mut c = self.completions.lock().await.recv().await?;
        c._slot = None;
        Some(c)
    }

    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }
}

type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = LocalCompletion> + Send>>;

/// Drains one channel's descriptors in order, keeping many in flight, and reports their
/// completions in the same order.
async fn engine<L: RegionWriteLink>(
    links: L,
    peer: NodeId,
    mut rx: mpsc::Receiver<(Descriptor, tokio::sync::OwnedSemaphorePermit)>,
    done: mpsc::Sender<LocalCompletion>,
) {
    let mut in_flight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            next = rx.recv(), if open => match next {
                Some((d, permit)) => {
                    let queued = links.queue_region_write(peer, d.channel, d.region, d.offset, &d.data).await;
                    let len = d.data.len() as u64;
                    in_flight.push_back(Box::pin(async move {
                        let result = match queued {
                            Ok(reply) => reply.await.map(|_| ()),
                            Err(e) => Err(e),
                        };
                        LocalCompletion { channel: d.channel, region: d.region, offset: d.offset, len, result, _slot: Some(permit) }
                    }));
                }
                None => open = false,
            },
            Some(c) = in_flight.next(), if !in_flight.is_empty() => {
                match done.try_send(c) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        panic!("the ring's completion queue is full although each completion holds a slot")
                    }
                }
            }
        }
    }
}
