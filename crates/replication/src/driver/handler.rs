//! Requests from peers on the replication and bulk channels: a primary's `Open`, `Checksums`,
//! `Chunk` and `Level` (replica side), members' `Acks` and `Nack`s (primary side), and proxied
//! host I/O and allocation maps (served only by the primary itself).

use std::sync::{Arc, Weak};

use bytes::Bytes;
use tandem_storage::BlockStore;
use tandem_transport::{BoxFuture, Handler};
use tandem_types::chaos_bugs::Bugs;
use tandem_types::Channel;
use tandem_types::{Epoch, NodeId, Seq, VolumeId};
use tandem_wire::data::{DataMsg, DataReply, Requester, WriteId, WriteKind};
use tokio::sync::oneshot;

use super::applier::Apply;
use super::host_io::fail_reply;
use super::primary::PrimaryDriver;
use super::{Inner, Vol, PROXY_BYTES_MAX, VOLUME_WAIT};

impl<S: BlockStore> Inner<S> {
    /// Waits briefly for a volume this node has not heard of yet (a peer's Raft apply can be
    /// ahead of ours).
    pub(super) async fn wait_volume(&self, id: VolumeId) -> Option<Arc<Vol>> {
        let mut version = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + VOLUME_WAIT;
        loop {
            if let Some(v) = self.volume(id) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Answers one request from a peer: one method per message.
    pub(super) async fn handle(self: Arc<Self>, from: NodeId, msg: DataMsg) -> DataReply {
        // A request proxied for a host: the primary decides whether that host may use the
        // volume (the proxying node did too, but its map may be behind, or the host's access
        // may have gone since its connection opened).
        if let Some((volume, requester)) = msg.requester() {
            if let Err(why) = self.coord.may_access(volume, requester).await {
                return DataReply::Denied(why);
            }
        }
        match msg {
            DataMsg::Open { volume, epoch, primary, start_seq } => {
                self.on_open(from, volume, epoch, primary, start_seq).await
            }
            DataMsg::Acks { volume, epoch, seqs } => self.on_acks(from, volume, epoch, seqs).await,
            DataMsg::Nack { volume, epoch, seq, reason } => self.on_nack(from, volume, epoch, seq, reason).await,
            DataMsg::Checksums { volume, epoch, offset, len } => {
                self.on_checksums(from, volume, epoch, offset, len).await
            }
            DataMsg::Chunk { volume, epoch, offset, data } => self.on_chunk(from, volume, epoch, offset, data).await,
            DataMsg::Level { volume, epoch } => self.on_level(from, volume, epoch).await,
            DataMsg::ProxyRead { volume, offset, len, requester } => {
                self.on_proxy_read(volume, requester, offset, len).await
            }
            DataMsg::ProxyWrite { volume, offset, data, write, requester, .. } => {
                self.on_proxy_write(volume, requester, offset, data, write).await
            }
            DataMsg::ProxyZeroes { volume, offset, len, write, requester, .. } => {
                self.on_proxy_zeroes(volume, requester, offset, len, write).await
            }
            DataMsg::ProxyFlush { volume, .. } => match self.local_primary(volume) {
                Some(_) => DataReply::Ok,
                None => DataReply::Refused("not the primary".into()),
            },
            DataMsg::ProxyCompareAndWrite { volume, offset, expected, data, write, requester } => {
                self.on_proxy_compare_and_write(volume, requester, offset, expected, data, write).await
            }
            DataMsg::Image { volume, epoch, image, ranges } => self.on_image(from, volume, epoch, image, ranges).await,
            DataMsg::ReadImage { image, offset, len } => {
                self.read_image_here(image, offset, len).await.unwrap_or_else(fail_reply)
            }
            msg @ (DataMsg::MakeImage { .. } | DataMsg::ProxyCopy { .. }) => self.on_image_request(msg).await,
            DataMsg::ProxyExtents { volume, offset, len, max, requester } => {
                self.on_proxy_extents(volume, requester, offset, len, max).await
            }
            DataMsg::ProxyReserve { volume, requester, id, op } => {
                let Some(p) = self.local_primary(volume) else {
                    return DataReply::Refused("not the primary".into());
                };
                match p.reserve(&self, &requester, id, op).await {
                    Ok(result) => DataReply::Reservation(result),
                    Err(e) => fail_reply(e),
                }
            }
        }
    }

    /// A primary opens a session with this replica: older primaries here step down and drain, the
    /// fence moves to its epoch, and the recent-write log goes back (durable first).
    async fn on_open(
        self: &Arc<Self>,
        from: NodeId,
        volume: VolumeId,
        epoch: Epoch,
        primary: NodeId,
        start_seq: Seq,
    ) -> DataReply {
        let Some(vol) = self.wait_volume(volume).await else {
            return DataReply::Refused(format!("no copy of volume {volume} here"));
        };
        if primary != from {
            return DataReply::Refused("an open must come from the primary itself".into());
        }
        // A primary of an older epoch on this node steps down first, and whatever it
        // queued for the local store is done or dropped: none of its writes may land
        // after the new primary's records.
        let older = vol.primary.lock().expect("primary lock").clone().filter(|p| p.epoch < epoch);
        if let Some(p) = older {
            p.depose(self, "a primary of a newer epoch opened this replica");
        }
        let (tx, rx) = oneshot::channel();
        if vol.apply.send(Apply::Barrier { reply: tx }).is_err() || rx.await.is_err() {
            return DataReply::Failed("the local applier stopped".into());
        }
        // Under the backup lock, which an applier holds across a check, its write and
        // its record: the log sent back shows every record applied before this open.
        // On a blocking thread: that lock may wait for a store write.
        let opened = tokio::task::spawn_blocking(move || {
            let mut backup = vol.backup.lock().expect("backup lock");
            backup.set_bugs(Bugs::current());
            backup.on_open(from, epoch, start_seq)?;
            let mut recent = vol.recent.lock().expect("recent lock");
            // The new session may overwrite what this copy applied (reconciliation, resync):
            // none of it may be taken as done by a later primary on this copy.
            recent.forget_applied();
            Ok(recent.ranges())
        })
        .await;
        // Durable before the answer: a resync skips blocks whose checksums match, so
        // it would never make durable what this copy applied and did not flush yet.
        if let Ok(Ok(_)) = &opened {
            if let Err(e) = self.store.durable(self.store.last_lsn()).await {
                return DataReply::Failed(format!("flush before open: {e}"));
            }
        }
        match opened {
            Ok(Ok(recent)) => DataReply::Opened { recent },
            Ok(Err(e)) => DataReply::Refused(tandem_replication_core::Refusal::to_string(&e)),
            Err(e) => DataReply::Failed(format!("open task: {e}")),
        }
    }

    /// A member has these records durable: fed to this node's primary of that epoch.
    async fn on_acks(self: &Arc<Self>, from: NodeId, volume: VolumeId, epoch: Epoch, seqs: Vec<Seq>) -> DataReply {
        let Some(p) = self.volume(volume).and_then(|v| v.primary.lock().expect("primary lock").clone()) else {
            return DataReply::Ok;
        };
        if p.epoch == epoch {
            let mut st = p.st.lock().expect("core lock");
            let base = st.seq_base;
            for s in seqs {
                if s > base {
                    st.core.on_ack(from, Seq(s - base));
                }
            }
            p.pump(self, &mut st);
        }
        DataReply::Ok
    }

    /// A member refused a record: this node's primary of that epoch fails it (unless the record
    /// belongs to an earlier session).
    async fn on_nack(
        self: &Arc<Self>,
        from: NodeId,
        volume: VolumeId,
        epoch: Epoch,
        seq: Seq,
        reason: String,
    ) -> DataReply {
        tracing::info!(%volume, %from, %seq, %reason, "member refused a record");
        let Some(p) = self.local_primary(volume) else { return DataReply::Ok };
        if p.epoch == epoch {
            let mut st = p.st.lock().expect("core lock");
            // Wire sequence numbers of this primary start above its base.
            if let Some(core_seq) = seq.get().checked_sub(st.seq_base.get()).map(Seq) {
                st.core.on_member_refused(from, core_seq);
                p.pump(self, &mut st);
            }
        }
        DataReply::Ok
    }

    /// The block checksums of a range, for a copy of the open session.
    async fn on_checksums(
        self: &Arc<Self>,
        from: NodeId,
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        len: u64,
    ) -> DataReply {
        let Some(vol) = self.volume(volume) else {
            return DataReply::Refused(format!("no copy of volume {volume}"));
        };
        let store = self.store.clone();
        let sums = tokio::task::spawn_blocking(move || {
            if let Err(e) = vol.backup.lock().expect("backup lock").check(from, epoch, None) {
                return DataReply::Refused(e.to_string());
            }
            match store.block_checksums(volume, offset, len) {
                Ok(s) => DataReply::Checksums(s),
                Err(e) => DataReply::Failed(e.to_string()),
            }
        })
        .await;
        sums.unwrap_or_else(|e| DataReply::Failed(format!("checksum task: {e}")))
    }

    /// Blocks copied by the primary of the open session, written and made durable.
    async fn on_chunk(
        self: &Arc<Self>,
        from: NodeId,
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        data: Vec<u8>,
    ) -> DataReply {
        let Some(vol) = self.volume(volume) else {
            return DataReply::Refused(format!("no copy of volume {volume}"));
        };
        // Room first: nothing may wait between the epoch check and the write.
        let admission = match self.store.admit(data.len() as u64).await {
            Ok(a) => a,
            Err(e) => return DataReply::Failed(e.to_string()),
        };
        // The check, the write and the record under the backup lock, as for a record;
        // on a blocking thread.
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut backup = vol.backup.lock().expect("backup lock");
            if let Err(e) = backup.check(from, epoch, None) {
                return Err(DataReply::Refused(e.to_string()));
            }
            let written = store.write_admitted(admission, volume, offset, &data);
            // A copy changes this replica like a write does: reconciliation must see it.
            vol.recent.lock().expect("recent lock").record_copy(offset, data.len() as u64);
            drop(backup);
            written.map_err(|e| DataReply::Failed(e.to_string()))
        })
        .await;
        let lsn = match written {
            Ok(Ok(lsn)) => lsn,
            Ok(Err(reply)) => return reply,
            Err(e) => return DataReply::Failed(format!("copy task: {e}")),
        };
        match self.store.durable(lsn).await {
            Ok(()) => DataReply::Ok,
            Err(e) => DataReply::Failed(e.to_string()),
        }
    }

    /// The primary of the open session declares this replica level: its log is complete again.
    async fn on_level(self: &Arc<Self>, from: NodeId, volume: VolumeId, epoch: Epoch) -> DataReply {
        let Some(vol) = self.volume(volume) else {
            return DataReply::Refused(format!("no copy of volume {volume}"));
        };
        let levelled = tokio::task::spawn_blocking(move || {
            let mut backup = vol.backup.lock().expect("backup lock");
            backup.check(from, epoch, None)?;
            vol.recent.lock().expect("recent lock").mark_complete();
            Ok(())
        })
        .await;
        match levelled {
            Ok(Ok(())) => DataReply::Ok,
            Ok(Err(e)) => DataReply::Refused(tandem_replication_core::Refusal::to_string(&e)),
            Err(e) => DataReply::Failed(format!("level task: {e}")),
        }
    }

    /// A read proxied by another node, served only if this node is the primary.
    async fn on_proxy_read(
        self: &Arc<Self>,
        volume: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        len: u64,
    ) -> DataReply {
        if len > PROXY_BYTES_MAX {
            return DataReply::Refused(format!("proxied read of {len} bytes is over {PROXY_BYTES_MAX}"));
        }
        if self.local_primary(volume).is_none() {
            return DataReply::Refused("not the primary".into());
        }
        let mut buf = vec![0u8; len as usize];
        match self.clone().read_once(volume, requester, offset, &mut buf).await {
            Ok(()) => DataReply::Data(buf),
            Err(e) => fail_reply(e),
        }
    }

    /// A write proxied by another node, served only if this node is the primary.
    async fn on_proxy_write(
        self: &Arc<Self>,
        volume: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        data: Vec<u8>,
        write: WriteId,
    ) -> DataReply {
        if self.local_primary(volume).is_none() {
            return DataReply::Refused("not the primary".into());
        }
        let len = data.len() as u64;
        match self.clone().write_once(volume, requester, write, WriteKind::Data, offset, len, Bytes::from(data)).await {
            Ok(()) => DataReply::Ok,
            Err(e) => fail_reply(e),
        }
    }

    /// A zeroing proxied by another node, served only if this node is the primary.
    async fn on_proxy_zeroes(
        self: &Arc<Self>,
        volume: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        len: u64,
        write: WriteId,
    ) -> DataReply {
        if self.local_primary(volume).is_none() {
            return DataReply::Refused("not the primary".into());
        }
        match self.clone().write_once(volume, requester, write, WriteKind::Zeroes, offset, len, Bytes::new()).await {
            Ok(()) => DataReply::Ok,
            Err(e) => fail_reply(e),
        }
    }

    /// A compare and write proxied by another node, served only if this node is the primary.
    async fn on_proxy_compare_and_write(
        self: &Arc<Self>,
        volume: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        expected: Vec<u8>,
        data: Vec<u8>,
        write: WriteId,
    ) -> DataReply {
        if self.local_primary(volume).is_none() {
            return DataReply::Refused("not the primary".into());
        }
        let (expected, data) = (Bytes::from(expected), Bytes::from(data));
        match self.clone().compare_and_write_once(volume, requester, write, offset, expected, data).await {
            Ok(None) => DataReply::Ok,
            Ok(Some(at)) => DataReply::Miscompare { at },
            Err(e) => fail_reply(e),
        }
    }

    /// Proxied requests are served only by the primary itself: no chains of proxies.
    pub(super) fn local_primary(&self, volume: VolumeId) -> Option<Arc<PrimaryDriver>> {
        self.volume(volume).and_then(|v| v.primary.lock().expect("primary lock").clone())
    }
}

pub(super) struct DataHandler<S: BlockStore> {
    pub(super) inner: Weak<Inner<S>>,
}

impl<S: BlockStore> Handler for DataHandler<S> {
    fn handle(&self, from: NodeId, _channel: Channel, payload: Bytes) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            let inner = self.inner.upgrade().ok_or("data plane stopped")?;
            let msg = DataMsg::decode(&payload).map_err(|e| e.to_string())?;
            let reply = inner.handle(from, msg).await;
            reply.encode().map(Bytes::from).map_err(|e| e.to_string())
        })
    }
}
