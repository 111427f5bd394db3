//! Copies by reference (docs/PROTOCOL.md, "Copy by reference"): images, frozen copies of ranges
//! of a volume made on its primary and every in-sync member under the sequencing gate, and
//! copies of an image into a volume, by a replicated clone record where every in-sync replica
//! holds the image, streamed from a holder otherwise.

use std::sync::Arc;

use bytes::Bytes;
use tandem_reservations::Access;
use tandem_storage::{BlockStore, Lsn, StoreError};
use tandem_types::{Epoch, NodeId, VolumeId, BLOCK_BYTES};
use tandem_wire::data::{DataMsg, DataReply, Requester, WriteId, WriteKind};

use super::host_io::{fail_reply, reply_error, Route};
use super::primary::PrimaryDriver;
use super::{Inner, IoFail, PROXY_BYTES_MAX, PROXY_CHANNEL, WRITE_PIECE_BYTES_MAX};
use tandem_replication_core::MemberState;

/// Checks an image's ranges against a volume of `size_bytes`
/// ([`tandem_types::copy_ranges_len`]); returns the image's size.
pub fn image_size(ranges: &[(u64, u64)], size_bytes: u64) -> Result<u64, IoFail> {
    tandem_types::copy_ranges_len(ranges, size_bytes).map_err(IoFail::Invalid)
}

/// Makes `image` in this node's store from `ranges` of `volume`, one after the other. An image
/// made again (a retried request) is cloned again over itself.
fn make_image_here<S: BlockStore>(
    store: &S,
    volume: VolumeId,
    image: VolumeId,
    ranges: &[(u64, u64)],
) -> Result<Lsn, StoreError> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    store.create_volume(image, total)?;
    let mut at = 0;
    let mut lsn = store.last_lsn();
    for &(offset, len) in ranges {
        lsn = store.clone_range(volume, offset, image, at, len)?;
        at += len;
    }
    Ok(lsn)
}

impl PrimaryDriver {
    /// Makes `image` from `ranges` of this primary's volume on this node and every in-sync
    /// member, alone against every write and after the writes sequenced before it are
    /// acknowledged, so that every copy of the image holds the same bytes. Returns the nodes
    /// that hold it (this one first).
    pub(super) async fn make_image<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        requester: Option<&Requester>,
        image: VolumeId,
        ranges: Vec<(u64, u64)>,
    ) -> Result<Vec<NodeId>, IoFail> {
        let _alone = self.sequencing.write().await;
        for &(offset, len) in &ranges {
            self.check_reservations(inner, requester, Access::Read, offset, len).await?;
        }
        self.drain_writes(inner, "the image").await?;
        let members: Vec<NodeId> = {
            let st = self.st.lock().expect("core lock");
            st.core
                .committed_isr()
                .into_iter()
                .filter(|&n| n != inner.me && st.core.member_state(n) == Some(MemberState::InSync))
                .collect()
        };
        let msg = DataMsg::Image { volume: self.volume, epoch: self.epoch, image, ranges: ranges.clone() };
        let mut remote = tokio::task::JoinSet::new();
        for &n in &members {
            let (inner, msg) = (inner.clone(), msg.clone());
            remote.spawn(async move { (n, inner.call(n, PROXY_CHANNEL, &msg).await) });
        }
        let (store, volume) = (inner.store.clone(), self.volume);
        let local = async {
            let made = tokio::task::spawn_blocking(move || make_image_here(&*store, volume, image, &ranges))
                .await
                .map_err(|e| IoFail::Io(format!("image task: {e}")))?;
            let lsn = made.map_err(|e| IoFail::Io(format!("image {image} of volume {volume}: {e}")))?;
            inner.store.durable(lsn).await.map_err(|e| IoFail::Io(format!("image {image}: {e}")))
        };
        let local = local.await;
        if local.is_ok() {
            inner.made_images.lock().expect("images lock").insert(image);
        }
        let mut answers = remote.join_all().await;
        local?;
        answers.sort_by_key(|(n, _)| *n);
        let mut holders = vec![inner.me];
        for (n, answer) in answers {
            match answer {
                Ok(DataReply::Ok) => holders.push(n),
                other => {
                    tracing::info!(volume = %self.volume, %image, member = %n, answer = ?other, "member holds no copy of the image")
                }
            }
        }
        tracing::info!(volume = %self.volume, %image, ?holders, "image made");
        Ok(holders)
    }

    /// Writes `len` bytes of `image` from `image_offset` at `offset`: by a clone record when
    /// this node and every member that receives records hold the image and the ranges are whole
    /// blocks (`Ok(true)`), otherwise streamed from one of `holders` as ordinary writes
    /// (`Ok(false)`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn copy<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        requester: Option<&Requester>,
        write: WriteId,
        offset: u64,
        image: VolumeId,
        image_offset: u64,
        len: u64,
        holders: &[NodeId],
    ) -> Result<bool, IoFail> {
        let aligned = [offset, image_offset, len].iter().all(|v| v.is_multiple_of(BLOCK_BYTES));
        let held_here = holders.contains(&inner.me)
            && inner
                .store
                .volume_size(image)
                .is_some_and(|size| image_offset.checked_add(len).is_some_and(|end| end <= size));
        let replicas =
            inner.volume(self.volume).map(|v| v.cfg.lock().expect("cfg lock").replicas.clone()).unwrap_or_default();
        let members_hold = {
            let st = self.st.lock().expect("core lock");
            // Out members receive no records; every other one must hold the image.
            replicas
                .iter()
                .filter(|&&n| n != inner.me)
                .all(|n| matches!(st.core.member_state(*n), None | Some(MemberState::Out)) || holders.contains(n))
        };
        if aligned && held_here && members_hold {
            let kind = WriteKind::Clone { image, image_offset };
            self.write(inner, requester, write, kind, offset, len, Bytes::new()).await?;
            return Ok(true);
        }
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(WRITE_PIECE_BYTES_MAX);
            let data = inner.read_image(image, image_offset + done, piece, holders).await?;
            self.write(inner, requester, write, WriteKind::Data, offset + done, piece, Bytes::from(data)).await?;
            done += piece;
        }
        Ok(false)
    }
}

impl<S: BlockStore> Inner<S> {
    /// `len` bytes of `image` at `offset`, from this node's copy or a holder's.
    pub(super) async fn read_image(
        self: &Arc<Self>,
        image: VolumeId,
        offset: u64,
        len: u64,
        holders: &[NodeId],
    ) -> Result<Vec<u8>, IoFail> {
        if len > PROXY_BYTES_MAX {
            return Err(IoFail::Invalid(format!("an image is read {PROXY_BYTES_MAX} bytes at a time, not {len}")));
        }
        let mut why = format!("image {image} has no holder");
        for &n in holders {
            let answer = if n == self.me {
                self.read_image_here(image, offset, len).await
            } else {
                self.call(n, PROXY_CHANNEL, &DataMsg::ReadImage { image, offset, len }).await
            };
            match answer {
                Ok(DataReply::Data(d)) if d.len() as u64 == len => return Ok(d),
                Ok(other) => why = format!("node {n}: {}", reply_error(n, other)),
                Err(e) => why = format!("node {n}: {e}"),
            }
        }
        Err(IoFail::Unavailable(format!("no holder of image {image} answered: {why}")))
    }

    /// A read of an image held here. A volume the node serves is not an image: its copy here
    /// may lag its primary, so it is refused.
    pub(super) async fn read_image_here(&self, image: VolumeId, offset: u64, len: u64) -> Result<DataReply, IoFail> {
        if len > PROXY_BYTES_MAX {
            return Ok(DataReply::Failed(format!("image read of {len} bytes is over {PROXY_BYTES_MAX}")));
        }
        if self.configs.lock().expect("configs lock").contains_key(&image) {
            return Ok(DataReply::Failed(format!("{image} is a volume, not an image")));
        }
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            store.read(image, offset, &mut buf).map(|()| buf)
        })
        .await
        .map_err(|e| IoFail::Io(format!("image read task: {e}")))?;
        Ok(match read {
            Ok(buf) => DataReply::Data(buf),
            Err(e) => DataReply::Failed(e.to_string()),
        })
    }

    /// A primary asks this in-sync member for its copy of an image (see
    /// [`PrimaryDriver::make_image`]): made and durable before the answer, refused if the
    /// member knows a newer epoch or another primary.
    pub(super) async fn on_image(
        self: &Arc<Self>,
        from: NodeId,
        volume: VolumeId,
        epoch: Epoch,
        image: VolumeId,
        ranges: Vec<(u64, u64)>,
    ) -> DataReply {
        let Some(vol) = self.volume(volume) else {
            return DataReply::Refused(format!("no copy of volume {volume}"));
        };
        let size = vol.cfg.lock().expect("cfg lock").size_bytes;
        if let Err(e) = image_size(&ranges, size) {
            return DataReply::Failed(e.to_string());
        }
        if self.configs.lock().expect("configs lock").contains_key(&image) {
            return DataReply::Failed(format!("{image} is a volume, not an image"));
        }
        let store = self.store.clone();
        let made = tokio::task::spawn_blocking(move || {
            let mut backup = vol.backup.lock().expect("backup lock");
            if let Err(e) = backup.check(from, epoch, None) {
                return Err(DataReply::Refused(e.to_string()));
            }
            let made = make_image_here(&*store, volume, image, &ranges);
            drop(backup);
            made.map_err(|e| DataReply::Failed(e.to_string()))
        })
        .await;
        let lsn = match made {
            Ok(Ok(lsn)) => lsn,
            Ok(Err(reply)) => return reply,
            Err(e) => return DataReply::Failed(format!("image task: {e}")),
        };
        match self.store.durable(lsn).await {
            Ok(()) => {
                self.made_images.lock().expect("images lock").insert(image);
                DataReply::Ok
            }
            Err(e) => DataReply::Failed(e.to_string()),
        }
    }

    /// One attempt of [`DataPlane::make_image`](super::DataPlane::make_image).
    pub(super) async fn make_image_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Option<Requester>,
        image: VolumeId,
        ranges: Vec<(u64, u64)>,
    ) -> Result<Vec<NodeId>, IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(p) => p.make_image(&self, requester.as_ref(), image, ranges).await,
            Route::Remote(node) => {
                let msg = DataMsg::MakeImage { volume: id, image, ranges, requester };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Image { holders } => Ok(holders),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    /// One attempt of [`DataPlane::copy`](super::DataPlane::copy).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn copy_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Option<Requester>,
        write: WriteId,
        offset: u64,
        image: VolumeId,
        image_offset: u64,
        len: u64,
        holders: Vec<NodeId>,
    ) -> Result<bool, IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(p) => {
                p.copy(&self, requester.as_ref(), write, offset, image, image_offset, len, &holders).await
            }
            Route::Remote(node) => {
                let msg =
                    DataMsg::ProxyCopy { volume: id, offset, image, image_offset, len, holders, write, requester };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Copied { by_reference } => Ok(by_reference),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    /// A proxied `MakeImage` or `ProxyCopy`, served only by the primary.
    pub(super) async fn on_image_request(self: &Arc<Self>, msg: DataMsg) -> DataReply {
        match msg {
            DataMsg::MakeImage { volume, image, ranges, requester } => {
                let Some(p) = self.local_primary(volume) else {
                    return DataReply::Refused("not the primary".into());
                };
                let size = match self.configs.lock().expect("configs lock").get(&volume) {
                    Some(cfg) => cfg.size_bytes,
                    None => return DataReply::Refused(format!("volume {volume} is not known here")),
                };
                if let Err(e) = image_size(&ranges, size) {
                    return fail_reply(e);
                }
                match p.make_image(self, requester.as_ref(), image, ranges).await {
                    Ok(holders) => DataReply::Image { holders },
                    Err(e) => fail_reply(e),
                }
            }
            DataMsg::ProxyCopy { volume, offset, image, image_offset, len, holders, write, requester } => {
                let Some(p) = self.local_primary(volume) else {
                    return DataReply::Refused("not the primary".into());
                };
                match p.copy(self, requester.as_ref(), write, offset, image, image_offset, len, &holders).await {
                    Ok(by_reference) => DataReply::Copied { by_reference },
                    Err(e) => fail_reply(e),
                }
            }
            other => DataReply::Failed(format!("not an image request: {other:?}")),
        }
    }
}
