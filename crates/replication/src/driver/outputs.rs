//! Carrying out a primary core's outputs ([`PrimaryDriver::pump`]), one named step per kind of
//! [`Output`], and the chunk copy that `Output::Copy` starts.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tandem_storage::{Admission, BlockStore};
use tandem_types::Channel;
use tandem_types::{Epoch, NodeId, Seq, VolumeId, BLOCK_BYTES};
use tandem_wire::data::{encode_record, DataMsg, DataReply, RecordHeader, WriteId, WriteKind};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::applier::Apply;
use super::primary::{CoreState, PrimaryDriver};
use super::sender::SendItem;
#[cfg(doc)]
use super::OUTPUT_TASKS_MAX;
use super::{apply_change, Inner, IoFail, ProposeError, COPY_TIMEOUT, OPEN_TIMEOUT};
use tandem_replication_core::{Output, Phase, Token, CHUNK_BYTES, INFLIGHT_WRITES_MAX};

impl PrimaryDriver {
    /// Carries out the core's outputs, in order, one step per kind. Runs under the core lock,
    /// so the local applier gets writes in sequence order, and copies and reads at their place
    /// in that order. Nothing here waits for the store.
    pub(super) fn pump<S: BlockStore>(self: &Arc<Self>, inner: &Arc<Inner<S>>, st: &mut CoreState) {
        if !self.ready.load(Ordering::Acquire) {
            // `start_core` pumps once the earlier primaries' store accesses are done.
            return;
        }
        while let Some(out) = st.core.poll_output() {
            match out {
                Output::Write { token, seq, to } => self.send_write(inner, st, token, seq, to),
                Output::Complete { token } => self.complete(st, token),
                Output::Fail { token, reason } => self.fail(st, token, reason),
                Output::Open { to, start_seq } => self.open_member(inner, st, to, start_seq),
                Output::Copy { to, chunk } => self.copy_to_member(inner, st, to, chunk),
                Output::ProposeIsr { isr } => self.propose_isr(inner, isr),
                Output::Progress { node, done_chunks, total_chunks } => {
                    self.report_progress(inner, node, done_chunks, total_chunks)
                }
                Output::Serving => self.begin_serving(inner),
            }
        }
        self.fail_all_if_deposed(st);
    }

    /// The local applier's item for write `seq`: carried out there, on a blocking thread, in
    /// sequence order (the applier knows nothing of primaries; the step is this primary's own).
    #[allow(clippy::too_many_arguments)]
    fn local_write<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        seq: Seq,
        write: WriteId,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
        admission: Admission,
    ) -> Apply {
        let p = self.clone();
        let inner = Arc::downgrade(inner);
        Apply::Write(Box::new(move || {
            let Some(inner) = inner.upgrade() else { return };
            if p.st.lock().expect("core lock").core.phase() == Phase::Deposed {
                // Never acknowledged (that needs this copy durable first), and recorded in
                // the recent-write log: a deposed core's queued writes are dropped, so
                // none lands after a newer primary's records (docs/PROTOCOL.md, "Taking
                // over").
                return;
            }
            let applied = apply_change(&*inner.store, admission, p.volume, kind, offset, len, &data);
            if applied.is_ok() {
                // In this copy now: a retry of it reaching a primary built on this copy
                // (this one, or a later one on this node) is not executed again.
                if let Some(v) = inner.volume(p.volume) {
                    v.recent.lock().expect("recent lock").note_applied(write, offset);
                }
            }
            match applied {
                Ok(lsn) => {
                    // Never full: each wait is a write of this primary that holds its
                    // in-flight permit until the core saw it durable here.
                    let sent = p.local.try_send((seq, lsn));
                    assert!(
                        !matches!(sent, Err(TrySendError::Full(_))),
                        "more local durability waits than writes in flight ({INFLIGHT_WRITES_MAX})"
                    );
                }
                Err(e) => {
                    tracing::error!(volume = %p.volume, error = %e, "local write failed; stepping down");
                    p.depose(&inner, &format!("local store failed: {e}"));
                }
            }
        }))
    }

    /// `Output::Write`: queues the write on the local applier, then its record to each member.
    fn send_write<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        st: &mut CoreState,
        token: Token,
        seq: Seq,
        to: Vec<NodeId>,
    ) {
        let Some(w) = st.waiters.get_mut(&token) else { return };
        // Admitted before the lock was taken: the applier never waits for budget.
        let admission = w.admission.take().unwrap_or_else(Admission::unlimited);
        // Recorded at sequencing, before it reaches any replica: a takeover on this
        // node sees it in the log whether or not the local copy has it yet.
        if let Some(v) = inner.volume(self.volume) {
            v.recent.lock().expect("recent lock").record(w.offset, w.len);
        }
        let item = self.local_write(inner, seq, w.write, w.kind, w.offset, w.len, w.data.clone(), admission);
        if self.apply.send(item).is_err() {
            st.core.depose("the local applier stopped");
            return;
        }
        let wire_seq = st.seq_base + seq.get();
        let crc = if w.kind.carries_data() { crc32c::crc32c(&w.data) } else { 0 };
        let header = RecordHeader {
            volume: self.volume,
            epoch: self.epoch,
            seq: wire_seq,
            kind: w.kind,
            offset: w.offset,
            len: w.len,
            crc,
            write: w.write,
        };
        match encode_record(&header, &w.data) {
            Ok(record) => {
                let record = Bytes::from(record);
                for n in to {
                    let item = SendItem { volume: self.volume, epoch: self.epoch, record: record.clone() };
                    if inner.sender(n).push(item).is_err() {
                        tracing::warn!(volume = %self.volume, member = %n, "the member's record queue is full");
                        st.core.on_member_failed(n);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a record");
                for n in to {
                    st.core.on_member_failed(n);
                }
            }
        }
    }

    /// `Output::Complete`: answers the host and the reads that waited for the write.
    fn complete(&self, st: &mut CoreState, token: Token) {
        if let Some(mut w) = st.waiters.remove(&token) {
            if let Some(tx) = w.reply.take() {
                let _ = tx.send(Ok(()));
            }
            for t in w.watchers.drain(..) {
                let _ = t.send(());
            }
        }
    }

    /// `Output::Fail`: fails the write to the host (it is retried: `Unavailable`).
    fn fail(&self, st: &mut CoreState, token: Token, reason: String) {
        if let Some(mut w) = st.waiters.remove(&token) {
            if let Some(tx) = w.reply.take() {
                let _ = tx.send(Err(IoFail::Unavailable(reason)));
            }
        }
    }

    /// `Output::Open`: sends `Open` to a member and feeds the answer to the core, unless the
    /// member was opened again meanwhile.
    fn open_member<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        st: &mut CoreState,
        to: NodeId,
        start_seq: Seq,
    ) {
        let Some(task) = self.task_permit() else {
            tracing::warn!(volume = %self.volume, member = %to, "too many output tasks; failing the member's open");
            st.core.on_member_failed(to);
            return;
        };
        let msg = DataMsg::Open {
            volume: self.volume,
            epoch: self.epoch,
            primary: inner.me,
            start_seq: st.seq_base + start_seq.get(),
        };
        let open = {
            let n = st.opens.entry(to).or_insert(0);
            *n += 1;
            *n
        };
        let (inner, p) = (inner.clone(), self.clone());
        tokio::spawn(async move {
            let result = match tokio::time::timeout(OPEN_TIMEOUT, inner.call(to, Channel::Replication, &msg)).await {
                Ok(r) => r,
                Err(_) => Err(IoFail::Unavailable(format!("no answer to open within {OPEN_TIMEOUT:?}"))),
            };
            let mut st = p.st.lock().expect("core lock");
            if st.opens.get(&to) != Some(&open) {
                return;
            }
            match result {
                Ok(DataReply::Opened { recent }) => {
                    tracing::info!(volume = %p.volume, member = %to, "member opened");
                    st.core.on_opened(to, recent)
                }
                Ok(other) => {
                    tracing::info!(volume = %p.volume, member = %to, reply = ?other, "open refused");
                    st.core.on_member_failed(to)
                }
                Err(e) => {
                    tracing::info!(volume = %p.volume, member = %to, error = %e, "open failed");
                    st.core.on_member_failed(to)
                }
            }
            p.pump(&inner, &mut st);
            drop(task);
        });
    }

    /// `Output::Copy`: reads the chunk at its place in the local order, copies it to the member
    /// and feeds the outcome to the core, unless the member was opened again meanwhile.
    fn copy_to_member<S: BlockStore>(
        self: &Arc<Self>,
        inner: &Arc<Inner<S>>,
        st: &mut CoreState,
        to: NodeId,
        chunk: u64,
    ) {
        let Some(task) = self.task_permit() else {
            tracing::warn!(
                volume = %self.volume,
                member = %to,
                chunk,
                "too many output tasks; failing the member's copy"
            );
            st.core.on_member_failed(to);
            return;
        };
        let size = inner.volume(self.volume).map(|v| v.cfg.lock().expect("cfg lock").size_bytes).unwrap_or(0);
        let offset = chunk * CHUNK_BYTES;
        let len = CHUNK_BYTES.min(size.saturating_sub(offset));
        // Read by the local applier at this point of the sequence: after every
        // earlier write to the chunk; the core holds back later ones until
        // `on_copied`.
        let (tx, rx) = oneshot::channel();
        let _ = self.apply.send(Apply::CopyRead { volume: self.volume, offset, len, reply: tx });
        let open = st.opens.get(&to).copied();
        let (inner, p) = (inner.clone(), self.clone());
        tokio::spawn(async move {
            let local = rx.await.unwrap_or_else(|_| Err("the local applier stopped".into()));
            let result = match local {
                Ok((data, sums)) => {
                    tokio::time::timeout(COPY_TIMEOUT, copy_chunk(&inner, p.volume, p.epoch, to, offset, data, sums))
                        .await
                        .unwrap_or_else(|_| Err(format!("chunk copy took over {COPY_TIMEOUT:?}")))
                }
                Err(e) => Err(format!("local read failed: {e}")),
            };
            let mut st = p.st.lock().expect("core lock");
            if st.opens.get(&to).copied() != open {
                // The member failed and was opened again meanwhile: this copy went
                // to its earlier session and says nothing about the current one.
                return;
            }
            match result {
                Ok(()) => st.core.on_copied(to, chunk),
                Err(e) => {
                    tracing::info!(volume = %p.volume, member = %to, chunk, error = %e, "chunk copy failed");
                    st.core.on_member_failed(to);
                }
            }
            p.pump(&inner, &mut st);
            drop(task);
        });
    }

    /// `Output::ProposeIsr`: carries the proposal to the metadata store and its outcome back.
    /// One task at most per primary: the core makes no proposal while one is in flight, and
    /// only this task tells it the outcome.
    fn propose_isr<S: BlockStore>(self: &Arc<Self>, inner: &Arc<Inner<S>>, isr: Vec<NodeId>) {
        let already = self.proposing.swap(true, Ordering::AcqRel);
        assert!(!already, "volume {}: a second ISR proposal while one is in flight", self.volume);
        let (inner, p) = (inner.clone(), self.clone());
        tokio::spawn(async move {
            let result = inner.coord.propose_isr(p.volume, p.epoch, isr.clone()).await;
            let mut st = p.st.lock().expect("core lock");
            // Under the core lock, before the core learns the outcome and may propose again.
            p.proposing.store(false, Ordering::Release);
            match result {
                Ok(()) => {
                    tracing::info!(volume = %p.volume, epoch = %p.epoch, ?isr, "ISR committed");
                    st.core.on_isr_committed(&isr)
                }
                Err(ProposeError::Refused(why)) => st.core.on_isr_refused(&why),
                Err(ProposeError::Unavailable(why)) => {
                    tracing::warn!(volume = %p.volume, error = %why, "ISR change not committed yet; will retry");
                    st.core.on_isr_unavailable()
                }
            }
            p.pump(&inner, &mut st);
        });
    }

    /// `Output::Progress`: publishes resync progress; with no chunks, tells the member it is
    /// level (its recent-write log can be trusted again).
    fn report_progress<S: BlockStore>(&self, inner: &Arc<Inner<S>>, node: NodeId, done_chunks: u64, total_chunks: u64) {
        let Some(task) = self.task_permit() else {
            tracing::warn!(volume = %self.volume, member = %node, "too many output tasks; progress report skipped");
            return;
        };
        let inner = inner.clone();
        let (volume, epoch) = (self.volume, self.epoch);
        tokio::spawn(async move {
            if total_chunks == 0 {
                // Back in sync: its recent-write log can be trusted again. If this
                // is lost, the member's log stays incomplete: only slower
                // reconciliation, never a wrong one.
                let _ = inner.call(node, Channel::Replication, &DataMsg::Level { volume, epoch }).await;
            }
            inner.coord.report_progress(volume, node, done_chunks * CHUNK_BYTES, total_chunks * CHUNK_BYTES).await;
            drop(task);
        });
    }

    /// A permit for one more output task, if fewer than [`OUTPUT_TASKS_MAX`] run.
    fn task_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.tasks.clone().try_acquire_owned().ok()
    }

    /// `Output::Serving`: reconciled; host I/O may be served.
    fn begin_serving<S: BlockStore>(&self, inner: &Arc<Inner<S>>) {
        tracing::info!(volume = %self.volume, epoch = %self.epoch, "serving");
        if let Some(v) = inner.volume(self.volume) {
            // Reconciled: every member now matches this copy.
            v.recent.lock().expect("recent lock").mark_complete();
        }
        self.phase.send_replace(Phase::Serving);
    }

    /// Once deposed: publishes the phase and fails every host write still waiting.
    fn fail_all_if_deposed(&self, st: &mut CoreState) {
        if st.core.phase() == Phase::Deposed {
            self.phase.send_replace(Phase::Deposed);
            for (_, mut w) in st.waiters.drain() {
                if let Some(tx) = w.reply.take() {
                    let _ = tx.send(Err(IoFail::Unavailable("the primary stepped down".into())));
                }
            }
        }
    }
}

/// Makes one chunk of `to` equal to `data` (the primary's copy): compares checksums first
/// and sends only the runs of blocks that differ.
pub(super) async fn copy_chunk<S: BlockStore>(
    inner: &Arc<Inner<S>>,
    volume: VolumeId,
    epoch: Epoch,
    to: NodeId,
    offset: u64,
    data: Vec<u8>,
    local_sums: Vec<u32>,
) -> Result<(), String> {
    let len = data.len() as u64;
    let theirs = match inner.call(to, Channel::Bulk, &DataMsg::Checksums { volume, epoch, offset, len }).await {
        Ok(DataReply::Checksums(s)) => s,
        Ok(other) => return Err(format!("{other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    if let Some(v) = inner.volume(volume) {
        v.resync_bytes_compared.fetch_add(len, Ordering::Relaxed);
    }
    let blocks = local_sums.len();
    let mut i = 0;
    while i < blocks {
        if theirs.get(i) == Some(&local_sums[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < blocks && theirs.get(i) != Some(&local_sums[i]) {
            i += 1;
        }
        let (a, b) = (start * BLOCK_BYTES as usize, (i * BLOCK_BYTES as usize).min(data.len()));
        let msg = DataMsg::Chunk { volume, epoch, offset: offset + a as u64, data: data[a..b].to_vec() };
        match inner.call(to, Channel::Bulk, &msg).await {
            Ok(DataReply::Ok) => {}
            Ok(other) => return Err(format!("{other:?}")),
            Err(e) => return Err(e.to_string()),
        }
        if let Some(v) = inner.volume(volume) {
            v.resync_bytes_sent.fetch_add((b - a) as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}
