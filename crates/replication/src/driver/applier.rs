//! A volume's local applier: every store access of this node's primaries of the volume
//! (writes, host reads, reads of chunks to copy, barriers), in the order they were queued, in
//! batches on a blocking thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use tandem_storage::BlockStore;
use tandem_types::VolumeId;
use tokio::sync::{mpsc, oneshot};

#[cfg(doc)]
use super::READS_QUEUED_MAX;
use super::{Inner, APPLY_BATCH_MAX, APPLY_QUEUED_MAX};

/// A store access of a volume's primary, carried out by the volume's local applier in the
/// order the primary queued it (under its core lock, so in sequence order).
///
/// Bound: a primary queues at most [`tandem_replication_core::INFLIGHT_WRITES_MAX`] writes (each holds
/// an in-flight permit until the core is done with it), [`READS_QUEUED_MAX`] reads, one chunk
/// read per member and a barrier; a new primary on this node waits for its barrier before it
/// queues anything, so the queue holds the items of at most two primaries.
pub(super) enum Apply {
    /// A write of the primary that queued it, with everything it needs: the primary's own step
    /// ([`super::outputs`], `PrimaryDriver::local_write`), carried out here in sequence order.
    Write(Box<dyn FnOnce() + Send>),
    Read {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// A chunk to copy to a member, with its block checksums.
    CopyRead {
        volume: VolumeId,
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<ChunkCopy, String>>,
    },
    /// Answered once every item queued before it is done.
    Barrier {
        reply: oneshot::Sender<()>,
    },
}

/// A volume's local applier queue. Unbounded in type: its senders enqueue under a core lock or
/// on a blocking thread and cannot wait. Bounded by what a primary may queue (see [`Apply`]),
/// and that bound, [`APPLY_QUEUED_MAX`], is asserted at every enqueue.
#[derive(Clone)]
pub(super) struct ApplyQueue {
    tx: mpsc::UnboundedSender<Apply>,
    /// Items sent and not yet taken by the applier.
    queued: Arc<AtomicUsize>,
}

/// The applier's end of an [`ApplyQueue`].
pub(super) struct ApplyReceiver {
    rx: mpsc::UnboundedReceiver<Apply>,
    queued: Arc<AtomicUsize>,
}

impl ApplyQueue {
    pub(super) fn new() -> (ApplyQueue, ApplyReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (ApplyQueue { tx, queued: queued.clone() }, ApplyReceiver { rx, queued })
    }

    /// Queues `item`; gives it back if the applier stopped.
    pub(super) fn send(&self, item: Apply) -> Result<(), Apply> {
        let queued = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        assert!(queued <= APPLY_QUEUED_MAX, "{queued} items queued for a local applier (bound {APPLY_QUEUED_MAX})");
        self.tx.send(item).map_err(|rejected| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            rejected.0
        })
    }
}

/// A chunk's data and its block checksums, read to be copied to a member.
pub(super) type ChunkCopy = (Vec<u8>, Vec<u32>);

/// Carries out a volume's store accesses in the order its primaries queued them, in batches,
/// each on a blocking thread: never on an async worker, never under a core lock.
pub(super) async fn run_applier<S: BlockStore>(inner: Weak<Inner<S>>, rx: ApplyReceiver) {
    let ApplyReceiver { mut rx, queued } = rx;
    let mut batch = Vec::with_capacity(APPLY_BATCH_MAX);
    while rx.recv_many(&mut batch, APPLY_BATCH_MAX).await > 0 {
        queued.fetch_sub(batch.len(), Ordering::AcqRel);
        let Some(inner) = inner.upgrade() else { return };
        if !apply_batch(inner, std::mem::take(&mut batch), Inner::apply_local, "local applier").await {
            return;
        }
    }
}

/// Runs `apply` on every item of `batch`, in order, on one blocking thread; false if that
/// thread failed.
pub(super) async fn apply_batch<S: BlockStore, T: Send + 'static>(
    inner: Arc<Inner<S>>,
    batch: Vec<T>,
    apply: fn(&Arc<Inner<S>>, T),
    what: &str,
) -> bool {
    match tokio::task::spawn_blocking(move || batch.into_iter().for_each(|item| apply(&inner, item))).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "{what} task failed");
            false
        }
    }
}

impl<S: BlockStore> Inner<S> {
    /// One item of a local applier (on a blocking thread).
    pub(super) fn apply_local(self: &Arc<Self>, item: Apply) {
        match item {
            Apply::Write(write) => write(),
            Apply::Read { volume, offset, len, reply } => {
                if reply.is_closed() {
                    return;
                }
                let mut data = vec![0u8; len as usize];
                let read = self.store.read(volume, offset, &mut data).map(|()| data).map_err(|e| e.to_string());
                let _ = reply.send(read);
            }
            Apply::CopyRead { volume, offset, len, reply } => {
                let read = (|| {
                    let mut data = vec![0u8; len as usize];
                    self.store.read(volume, offset, &mut data)?;
                    let sums = self.store.block_checksums(volume, offset, len)?;
                    Ok::<_, tandem_storage::StoreError>((data, sums))
                })()
                .map_err(|e| e.to_string());
                let _ = reply.send(read);
            }
            Apply::Barrier { reply } => {
                let _ = reply.send(());
            }
        }
    }
}
