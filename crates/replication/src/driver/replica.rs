//! The replica side: records from primaries, received in arrival order, checked against the
//! volume's [`Backup`] fencing, applied in batches by one record applier, acknowledged once
//! durable (or refused).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tandem_storage::{Admission, BlockStore, Lsn};
use tandem_types::chaos_bugs::{self, Bug};
use tandem_types::Channel;
use tandem_types::{Epoch, NodeId, Seq, VolumeId};
use tandem_wire::data::{decode_record, DataMsg, RecordHeader, WriteKind};
use tokio::sync::{mpsc, Semaphore};

use super::applier::apply_batch;
use super::network::Network;
use super::{apply_change, Inner, ACK_CALLS_IN_FLIGHT_MAX, APPLY_BATCH_MAX};
#[cfg(doc)]
use tandem_replication_core::Backup;

/// A record from a primary, checked for its checksum and admitted by the store's budget,
/// waiting for the record applier.
pub(super) struct RecordWork {
    pub(super) from: NodeId,
    pub(super) header: RecordHeader,
    /// The record's encoding; the data is at `data_at..`.
    pub(super) bytes: Vec<u8>,
    pub(super) data_at: usize,
    pub(super) admission: Admission,
}

/// Sends `Acks` for records this replica applied, once they are durable, in groups.
pub(super) async fn send_acks<S: BlockStore>(
    inner: Weak<Inner<S>>,
    volume: VolumeId,
    mut rx: mpsc::Receiver<(NodeId, Epoch, Seq, Lsn)>,
) {
    let calls = Arc::new(Semaphore::new(ACK_CALLS_IN_FLIGHT_MAX));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let Some(inner) = inner.upgrade() else { return };
        let last = batch.iter().map(|b| b.3).max().expect("non-empty batch");
        // Planted (chaos-bugs): acknowledge what is applied, durable or not.
        if !chaos_bugs::on(Bug::BackupAckBeforeFsync) {
            if let Err(e) = inner.store.durable(last).await {
                tracing::error!(%volume, error = %e, "flush failed; these records stay unacknowledged");
                continue;
            }
        }
        #[cfg(feature = "failpoints")]
        if let Some(arg) = crate::failpoints::eval(crate::failpoints::BACKUP_BEFORE_REPLY).await {
            tracing::warn!(%volume, %arg, "failpoint backup-before-reply: these acknowledgements are dropped");
            continue;
        }
        let mut groups: HashMap<(NodeId, Epoch), Vec<Seq>> = HashMap::new();
        for (primary, epoch, seq, _) in batch {
            groups.entry((primary, epoch)).or_default().push(seq);
        }
        for ((primary, epoch), seqs) in groups {
            let msg = DataMsg::Acks { volume, epoch, seqs };
            let inner = inner.clone();
            let Ok(call) = calls.clone().acquire_owned().await else { return };
            // The primary times the member out if the acks never arrive.
            tokio::spawn(async move {
                let _ = inner.call(primary, Channel::Replication, &msg).await;
                drop(call);
            });
        }
    }
}

/// Applies records from every primary, strictly in arrival order.
pub(super) async fn read_records<S: BlockStore>(inner: Weak<Inner<S>>, net: Arc<dyn Network>) {
    while let Some((from, bytes)) = net.next_record().await {
        let Some(inner) = inner.upgrade() else { return };
        let (header, data_at, data_len) = match decode_record(&bytes) {
            Ok((h, data)) => (h, bytes.len() - data.len(), data.len()),
            Err(e) => {
                tracing::warn!(%from, error = %e, "malformed record");
                continue;
            }
        };
        // Room in the store first, awaited: the applier then never waits for budget.
        let cost = if header.kind == WriteKind::Data { data_len as u64 } else { 0 };
        match inner.store.admit(cost).await {
            Ok(admission) => {
                let work = RecordWork { from, header, bytes, data_at, admission };
                if inner.records.send(work).await.is_err() {
                    return;
                }
            }
            Err(e) => inner.refuse_record(from, &header, format!("local store: {e}")),
        }
    }
}

/// Applies records in arrival order, in batches, each on a blocking thread.
pub(super) async fn apply_records<S: BlockStore>(inner: Weak<Inner<S>>, mut rx: mpsc::Receiver<RecordWork>) {
    let mut batch = Vec::with_capacity(APPLY_BATCH_MAX);
    while rx.recv_many(&mut batch, APPLY_BATCH_MAX).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        if !apply_batch(inner, std::mem::take(&mut batch), Inner::apply_record_work, "record applier").await {
            return;
        }
    }
}

impl<S: BlockStore> Inner<S> {
    /// Checks, applies and records one record (on a blocking thread). The check, the write and
    /// the record in the recent-write log happen under the volume's backup lock, so a takeover
    /// or an `Open` (which fence the epoch and snapshot the log under the same lock) sees
    /// either none of them or all of them.
    pub(super) fn apply_record(
        &self,
        from: NodeId,
        h: &RecordHeader,
        data: &[u8],
        admission: Admission,
    ) -> Result<(), String> {
        let vol = self.volume(h.volume).ok_or_else(|| format!("no copy of volume {} here", h.volume))?;
        if h.kind == WriteKind::Data && crc32c::crc32c(data) != h.crc {
            return Err("record checksum mismatch".into());
        }
        let mut backup = vol.backup.lock().expect("backup lock");
        backup.check(from, h.epoch, Some(h.seq)).map_err(|e| e.to_string())?;
        let applied = apply_change(&*self.store, admission, h.volume, h.kind, h.offset, h.len, data);
        // Recorded even if the write failed part way: the range may have changed. Taken as
        // done (for a retry of the same host write) only if it did not fail.
        let mut recent = vol.recent.lock().expect("recent lock");
        recent.record(h.offset, h.len);
        if applied.is_ok() {
            recent.note_applied(h.write, h.offset);
        }
        drop(recent);
        drop(backup);
        let lsn = applied.map_err(|e| e.to_string())?;
        // On a blocking thread: when the queue is full, the record applier waits.
        let _ = vol.acks.blocking_send((from, h.epoch, h.seq, lsn));
        Ok(())
    }

    /// One record of the record applier (on a blocking thread); a refusal is sent back.
    pub(super) fn apply_record_work(self: &Arc<Self>, w: RecordWork) {
        let data = &w.bytes[w.data_at..];
        if let Err(reason) = self.apply_record(w.from, &w.header, data, w.admission) {
            self.refuse_record(w.from, &w.header, reason);
        }
    }

    /// Tells the primary that a record was refused (it fails this member).
    pub(super) fn refuse_record(self: &Arc<Self>, from: NodeId, h: &RecordHeader, reason: String) {
        tracing::info!(%from, volume = %h.volume, seq = %h.seq, %reason, "record refused");
        let Ok(permit) = self.nacks.clone().try_acquire_owned() else {
            tracing::warn!(%from, volume = %h.volume, "too many refusals in flight; the primary times this member out");
            return;
        };
        let msg = DataMsg::Nack { volume: h.volume, epoch: h.epoch, seq: h.seq, reason };
        let inner = self.clone();
        tokio::spawn(async move {
            let _ = inner.call(from, Channel::Replication, &msg).await;
            drop(permit);
        });
    }
}
