//! The allocation map of a range (NBD block status: thin provisioning a host can see). It is
//! answered by the volume's primary, which sequences the writes, so that it agrees with every
//! write acknowledged before it was asked; any other node proxies it there, like a read.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tandem_replication_core::Phase;
use tandem_reservations::Access;
use tandem_storage::{BlockStore, Extent};
use tandem_types::VolumeId;
use tandem_wire::data::{DataMsg, DataReply, Requester, EXTENTS_MAX};
use tokio::sync::oneshot;

use super::host_io::{check_range, fail_reply, reply_error, Hold, Route};
use super::primary::PrimaryDriver;
use super::{DataPlane, Inner, IoFail, VolumeConfig};

impl<S: BlockStore> DataPlane<S> {
    /// Which parts of `len` bytes from `offset` hold data, as the volume's primary sees them:
    /// consecutive extents from `offset`, at least one when `len > 0`, at most `max` (clamped
    /// to 1..=[`EXTENTS_MAX`]), so they may end before `offset + len`. Checked against the
    /// reservations like a read; retried through failovers like one.
    pub async fn extents(&self, cfg: &VolumeConfig, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, IoFail> {
        check_range(cfg, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let max = max.clamp(1, EXTENTS_MAX as usize) as u32;
        let mut hold = Hold::new(&self.inner);
        self.inner
            .retry(&mut hold, |inner| async move {
                inner.extents_once(cfg.id, cfg.requester.clone(), offset, len, max).await
            })
            .await
    }
}

impl PrimaryDriver {
    /// The map of the range in this node's store. Like a read, it waits for the writes in
    /// flight that overlap the range, so it reports no allocation a host could not also read.
    async fn extents<S: BlockStore>(
        &self,
        inner: &Arc<Inner<S>>,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>, IoFail> {
        // The reads' bound covers these too: each holds a blocking thread for a while.
        let _queued = self.reads.acquire().await.map_err(|_| IoFail::Unavailable("the primary stopped".into()))?;
        let overlapping: Vec<oneshot::Receiver<()>> = {
            let mut st = self.st.lock().expect("core lock");
            if st.core.phase() != Phase::Serving {
                return Err(IoFail::Unavailable("the primary stopped serving".into()));
            }
            let end = offset + len;
            st.waiters
                .values_mut()
                .filter(|w| w.offset < end && offset < w.offset + w.len)
                .map(|w| {
                    let (t, r) = oneshot::channel();
                    w.watchers.push(t);
                    r
                })
                .collect()
        };
        let (store, volume) = (inner.store.clone(), self.volume);
        let map = tokio::task::spawn_blocking(move || store.extents(volume, offset, len, max))
            .await
            .map_err(|e| IoFail::Io(format!("extents task: {e}")))?
            .map_err(|e| IoFail::Io(format!("node {}: allocation map: {e}", inner.me)))?;
        for w in overlapping {
            if w.await.is_err() {
                return Err(IoFail::Unavailable("a write the range overlaps was not acknowledged".into()));
            }
        }
        Ok(map)
    }
}

impl<S: BlockStore> Inner<S> {
    /// One attempt of [`DataPlane::extents`].
    pub(super) async fn extents_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        len: u64,
        max: u32,
    ) -> Result<Vec<Extent>, IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(p) => {
                p.check_reservations(&self, requester.as_ref(), Access::Read, offset, len).await?;
                let map = p.extents(&self, offset, len, max as usize).await?;
                // As for a read: current only if this node still held its lease and served
                // after the map was taken (docs/PROTOCOL.md, "Reads").
                let unleased = !self.coord.lease_valid() || p.paused.load(Ordering::Acquire);
                if unleased || *p.phase.borrow() != Phase::Serving {
                    return Err(IoFail::Unavailable("the primary lost its lease while mapping".into()));
                }
                Ok(map)
            }
            Route::Remote(node) => {
                let msg = DataMsg::ProxyExtents { volume: id, offset, len, max, requester };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Extents(map) => checked_map(&map, len, max)
                        .map_err(|why| IoFail::Io(format!("node {node} answered a bad allocation map: {why}"))),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    /// A proxied [`DataMsg::ProxyExtents`], served only by the primary.
    pub(super) async fn on_proxy_extents(
        self: &Arc<Self>,
        volume: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        len: u64,
        max: u32,
    ) -> DataReply {
        if len == 0 || max == 0 || max > EXTENTS_MAX {
            return DataReply::Failed(format!(
                "an allocation map of {len} bytes in 1 to {EXTENTS_MAX} extents, not {max}"
            ));
        }
        if self.local_primary(volume).is_none() {
            return DataReply::Refused("not the primary".into());
        }
        match self.clone().extents_once(volume, requester, offset, len, max).await {
            Ok(map) => DataReply::Extents(map.iter().map(|e| (e.len, e.allocated)).collect()),
            Err(e) => fail_reply(e),
        }
    }
}

/// A map from another node, checked before it is believed: one to `max` extents, none empty,
/// none past the range.
fn checked_map(map: &[(u64, bool)], len: u64, max: u32) -> Result<Vec<Extent>, String> {
    if map.is_empty() || map.len() > max as usize {
        return Err(format!("{} extents, asked for 1 to {max}", map.len()));
    }
    let mut total = 0u64;
    for &(extent_len, _) in map {
        total = total.checked_add(extent_len).filter(|t| extent_len > 0 && *t <= len).ok_or_else(|| {
            format!("an extent of {extent_len} bytes after {total}: empty, or past the {len} bytes asked")
        })?;
    }
    Ok(map.iter().map(|&(len, allocated)| Extent { len, allocated }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxied_maps_are_checked() {
        let extent = |len, allocated| Extent { len, allocated };
        assert_eq!(
            checked_map(&[(4096, true), (8192, false)], 16384, 2),
            Ok(vec![extent(4096, true), extent(8192, false)])
        );
        assert!(checked_map(&[], 4096, 4).is_err(), "no extent");
        assert!(checked_map(&[(1, true), (1, false), (1, true)], 4096, 2).is_err(), "more than asked");
        assert!(checked_map(&[(0, true)], 4096, 2).is_err(), "an empty extent");
        assert!(checked_map(&[(4096, true), (1, false)], 4096, 2).is_err(), "past the range");
        assert!(checked_map(&[(u64::MAX, true), (2, false)], 4096, 2).is_err(), "overflow");
    }
}
