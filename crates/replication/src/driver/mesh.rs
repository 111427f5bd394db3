//! The [`Network`] of a real node: `tandem_transport::link::Mesh`. Requests go over its links
//! on their channels; records are one-sided writes into the peer's region for this node
//! through a descriptor ring ([`MeshRecordLink`]), the region used as a circular buffer
//! ([`RegionSpace`]) and credited, so space comes back only once the peer took the bytes out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tandem_transport::link::{request_received_at, Mesh};
use tandem_transport::ring::{Descriptor, DescriptorRing};
use tandem_transport::{BoxFuture, Handler, Transport, TransportError};
use tandem_types::Channel;
use tandem_types::NodeId;
use tokio::sync::Notify;

use super::network::{Network, RecordLink};
use super::REGION_BYTES;

/// Descriptors in flight per peer ring.
const RING_SLOTS: usize = 256;

impl Network for Mesh {
    fn call(&self, peer: NodeId, channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        // Queued, then awaited: dropping the future drops the pending reply, which withdraws
        // the request.
        Transport::call(self, peer, channel, payload)
    }

    fn serve(&self, channel: Channel, handler: Arc<dyn Handler>) {
        self.set_handler(channel, handler);
    }

    fn request_received_at(&self) -> Option<Instant> {
        request_received_at()
    }

    fn accept_records_from(&self, peer: NodeId) -> Result<(), String> {
        let regions = self.regions();
        if regions.is_registered(peer.get()) {
            return Ok(());
        }
        regions.register_credited(peer.get()).map_err(|e| e.to_string())
    }

    fn next_record(&self) -> BoxFuture<'_, Option<(NodeId, Vec<u8>)>> {
        Box::pin(async move {
            let regions = self.regions();
            loop {
                let c = regions.next_completion().await?;
                if c.channel != Channel::Replication {
                    continue;
                }
                match regions.read(c.region, c.offset, c.len) {
                    Ok(bytes) => {
                        // The bytes are ours now: the sender may reuse the space.
                        c.consumed.consume();
                        return Some((c.from, bytes));
                    }
                    Err(e) => tracing::warn!(from = %c.from, error = %e, "unreadable record"),
                }
            }
        })
    }

    fn record_link(&self, peer: NodeId) -> Arc<dyn RecordLink> {
        Arc::new(MeshRecordLink {
            me: self.node_id(),
            ring: DescriptorRing::new(self, peer, RING_SLOTS),
            space: Mutex::new(RegionSpace { head: 0, used: VecDeque::new() }),
            freed: Notify::new(),
        })
    }
}

/// Places records in the peer's region for this node through a descriptor ring. The region is
/// used as a circular buffer; space comes back as descriptors complete, which (the region
/// being credited) means the peer took the bytes out.
struct MeshRecordLink {
    me: NodeId,
    ring: DescriptorRing,
    space: Mutex<RegionSpace>,
    freed: Notify,
}

impl RecordLink for MeshRecordLink {
    fn post(&self, record: Bytes) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let len = record.len() as u64;
            let offset = loop {
                let notified = self.freed.notified();
                if let Some(off) = self.space.lock().expect("space lock").alloc(len) {
                    break off;
                }
                notified.await;
            };
            {
                let mut s = self.space.lock().expect("space lock");
                s.head = offset + len;
                s.used.push_back((offset, len));
            }
            let d = Descriptor { data: record, region: self.me.get(), offset, channel: Channel::Replication };
            self.ring.post(d).await
        })
    }

    fn next_outcome(&self) -> BoxFuture<'_, Option<Result<(), TransportError>>> {
        Box::pin(async move {
            let c = self.ring.next_completion().await?;
            self.space.lock().expect("space lock").used.pop_front();
            self.freed.notify_one();
            Some(c.result)
        })
    }
}

struct RegionSpace {
    head: u64,
    /// Allocated extents, oldest first: (offset, len).
    used: VecDeque<(u64, u64)>,
}

impl RegionSpace {
    /// Finds room for `len` bytes after the newest allocation, wrapping to 0 if needed.
    /// `head` is where the newest allocation ends; with allocations outstanding, `head ==
    /// tail` means the region is full.
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let size = REGION_BYTES as u64;
        let Some(&(tail, _)) = self.used.front() else {
            return (len <= size).then_some(0);
        };
        if self.head > tail {
            if self.head + len <= size {
                return Some(self.head);
            }
            return (len <= tail).then_some(0);
        }
        (self.head + len <= tail).then_some(self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_space_wraps_and_waits_for_the_tail() {
        let size = REGION_BYTES as u64;
        let mut s = RegionSpace { head: 0, used: VecDeque::new() };
        let take = |s: &mut RegionSpace, len: u64| {
            let off = s.alloc(len)?;
            s.head = off + len;
            s.used.push_back((off, len));
            Some(off)
        };
        assert_eq!(take(&mut s, size / 2), Some(0));
        assert_eq!(take(&mut s, size / 4), Some(size / 2));
        assert_eq!(take(&mut s, size / 2), None, "no room until the oldest is freed");
        s.used.pop_front();
        assert_eq!(take(&mut s, size / 2), Some(0), "wraps to the start");
        assert_eq!(take(&mut s, 1), None, "head meets tail");
        s.used.pop_front();
        assert_eq!(take(&mut s, size / 4), Some(size / 2));
    }
}
