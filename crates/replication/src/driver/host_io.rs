//! Host I/O, served here or proxied: where a request goes ([`Route`]), one attempt of each
//! operation, and the hold-time clock ([`Hold`]) that retries a request that found no serving
//! primary until it is served or fails for a definite reason.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_reservations::{Access, Op, Outcome, Refusal};
use tandem_storage::BlockStore;
use tandem_types::chaos_bugs::{self, Bug};
use tandem_types::Channel;
use tandem_types::{NodeId, VolumeId, BLOCK_BYTES};
use tandem_wire::data::{DataMsg, DataReply, Requester, WriteId, WriteKind};
use tokio::sync::watch;

use super::primary::PrimaryDriver;
use super::{
    Inner, IoFail, VolumeConfig, PROXIED_WRITE_ADMIT_MAX, PROXY_CHANNEL, PROXY_FENCE_MARGIN, PROXY_READ_BYTES_MAX,
};
use tandem_replication_core::Phase;

pub(super) fn check_range(cfg: &VolumeConfig, offset: u64, len: u64) -> Result<(), IoFail> {
    match offset.checked_add(len) {
        Some(end) if end <= cfg.size_bytes => Ok(()),
        _ => Err(IoFail::Invalid(format!(
            "range {offset}+{len} is outside volume {:?} of {} bytes",
            cfg.name, cfg.size_bytes
        ))),
    }
}

/// Where a request for a volume goes right now.
pub(super) enum Route {
    Local(Arc<PrimaryDriver>),
    Remote(NodeId),
}

impl<S: BlockStore> Inner<S> {
    /// Runs `op` until it succeeds or fails for a definite reason ([`Hold::wait`]).
    pub(super) async fn retry<F, Fut, T>(self: &Arc<Self>, hold: &mut Hold, mut op: F) -> Result<T, IoFail>
    where
        F: FnMut(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = Result<T, IoFail>>,
    {
        loop {
            hold.last_attempt = Some(Instant::now());
            match op(self.clone()).await {
                Err(IoFail::Unavailable(why)) => hold.wait(self, why).await?,
                other => return other,
            }
        }
    }

    /// How long this node has been without a lease, if it has none now.
    pub(super) fn cut_off_for(&self, now: Instant) -> Option<Duration> {
        if self.coord.lease_valid() {
            return None;
        }
        let lost = *self.lease_lost_at.lock().expect("lease lock").get_or_insert(now);
        Some(now.saturating_duration_since(lost))
    }

    /// Resolves once the committed primary of `id` is no longer `node` (or the volume is
    /// gone), with the reason; never while `node` stays primary.
    pub(super) async fn primary_moved(&self, id: VolumeId, node: NodeId) -> String {
        let mut version = self.version.subscribe();
        loop {
            match self.configs.lock().expect("configs lock").get(&id) {
                None => return format!("volume {id} was deleted"),
                Some(c) if c.primary != node => {
                    return format!(
                        "node {} (epoch {}) replaced node {node} as primary; re-routing",
                        c.primary, c.epoch
                    )
                }
                Some(_) => {}
            }
            if version.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Sends a proxied request to `node`, the committed primary of `id`. The attempt has no
    /// time limit of its own (a slow primary is only slow), but it is abandoned as soon as the
    /// committed map names another primary: the request then goes to the new one. This is
    /// safe because the old primary is fenced by the epoch (docs/PROTOCOL.md, "Re-routing");
    /// dropping the call withdraws it if it has not gone out yet.
    pub(super) async fn call_primary(&self, id: VolumeId, node: NodeId, msg: &DataMsg) -> Result<DataReply, IoFail> {
        tokio::select! {
            biased;
            reply = self.call(node, PROXY_CHANNEL, msg) => reply,
            why = self.primary_moved(id, node) => Err(IoFail::Unavailable(why)),
        }
    }

    /// Before an attempt of a host write in a `failpoints` build: when the committed primary
    /// is another node than the one the last attempt went to (`last`, updated), and not this
    /// one, the write is being re-routed to a new primary elsewhere, and failpoint
    /// `proxy-before-reroute` is evaluated first (its `sleep` makes the re-route late, as on a
    /// node whose Raft apply lags behind the leader's).
    #[cfg(feature = "failpoints")]
    pub(super) fn before_attempt(
        self: &Arc<Self>,
        id: VolumeId,
        last: &mut Option<NodeId>,
    ) -> impl std::future::Future<Output = ()> + use<S> {
        let now = self.primary_of(id).ok();
        let rerouted = last.is_some() && now != *last && now != Some(self.me);
        *last = now;
        async move {
            if !rerouted {
                return;
            }
            if let Some(arg) = crate::failpoints::eval(crate::failpoints::PROXY_BEFORE_REROUTE).await {
                tracing::warn!(volume = %id, %arg, "failpoint proxy-before-reroute returned: re-routing now");
            }
        }
    }

    /// Without failpoints: nothing before an attempt.
    #[cfg(not(feature = "failpoints"))]
    pub(super) fn before_attempt(&self, _id: VolumeId, _last: &mut Option<NodeId>) -> std::future::Ready<()> {
        std::future::ready(())
    }

    /// The primary as this node sees it: a local serving primary (holding its lease, unless
    /// `lease` is false: a planted bug), or another node.
    pub(super) async fn route(&self, id: VolumeId, cfg_primary: NodeId, lease: bool) -> Result<Route, IoFail> {
        if cfg_primary == self.me {
            let vol = self.volume(id).ok_or_else(|| IoFail::Unavailable("the local copy is not ready".into()))?;
            let p = vol.primary.lock().expect("primary lock").clone();
            let Some(p) = p else { return Err(IoFail::Unavailable("this node is not serving the volume yet".into())) };
            // Reconciliation runs before serving; wait for it a little (no timer when serving).
            let mut serving = *p.phase.borrow() == Phase::Serving;
            if !serving {
                let mut phase = p.phase.subscribe();
                let ready =
                    tokio::time::timeout(Duration::from_millis(500), phase.wait_for(|ph| *ph != Phase::Reconciling));
                serving = matches!(ready.await, Ok(Ok(ph)) if *ph == Phase::Serving);
            }
            if !serving {
                return Err(IoFail::Unavailable("the primary is reconciling or deposed".into()));
            }
            if lease && !self.coord.lease_valid() {
                return Err(IoFail::Unavailable("this node has no lease (cut off from the metadata majority)".into()));
            }
            if lease && p.paused.load(Ordering::Acquire) {
                return Err(IoFail::Unavailable("the primary is confirming its epoch after a lease loss".into()));
            }
            return Ok(Route::Local(p));
        }
        Ok(Route::Remote(cfg_primary))
    }

    pub(super) fn primary_of(&self, id: VolumeId) -> Result<NodeId, IoFail> {
        let configs = self.configs.lock().expect("configs lock");
        let cfg = configs.get(&id).ok_or_else(|| IoFail::NoVolume(format!("volume {id} no longer exists")))?;
        Ok(cfg.primary)
    }

    pub(super) async fn read_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Option<Requester>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), IoFail> {
        let primary = self.primary_of(id)?;
        // Planted (chaos-bugs): a local primary serves reads whether it holds its lease or not.
        let lease = !chaos_bugs::on(Bug::ReadWithoutLease);
        match self.route(id, primary, lease).await? {
            Route::Local(p) => {
                p.check_reservations(&self, requester.as_ref(), Access::Read, offset, buf.len() as u64).await?;
                let data = p.read(&self, offset, buf.len() as u64).await?;
                // The data was current when this node last held its lease and served: a
                // failover waits for the lease to lapse first. Checked again after the read,
                // which may have waited (docs/PROTOCOL.md, "Reads").
                let unleased = !self.coord.lease_valid() || p.paused.load(Ordering::Acquire);
                if (lease && unleased) || *p.phase.borrow() != Phase::Serving {
                    return Err(IoFail::Unavailable("the primary lost its lease during the read".into()));
                }
                buf.copy_from_slice(&data);
                Ok(())
            }
            Route::Remote(node) => {
                let blocks = (buf.len() as u64).div_ceil(BLOCK_BYTES).min(PROXY_READ_BYTES_MAX / BLOCK_BYTES) as u32;
                let _budget = self
                    .proxy_read_budget
                    .acquire_many(blocks)
                    .await
                    .map_err(|_| IoFail::Stopping("the data plane is stopping".into()))?;
                let msg = DataMsg::ProxyRead { volume: id, offset, len: buf.len() as u64, requester };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Data(d) if d.len() == buf.len() => {
                        buf.copy_from_slice(&d);
                        Ok(())
                    }
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    // One attempt's whole description, as the proxied message carries it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Option<Requester>,
        write: WriteId,
        kind: WriteKind,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<(), IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(p) => p.write(&self, requester.as_ref(), write, kind, offset, len, data).await,
            Route::Remote(node) => {
                let msg = match kind {
                    WriteKind::Data => {
                        DataMsg::ProxyWrite { volume: id, offset, data: data.to_vec(), fua: false, write, requester }
                    }
                    WriteKind::Zeroes => DataMsg::ProxyZeroes { volume: id, offset, len, fua: false, write, requester },
                    WriteKind::Clone { .. } => {
                        return Err(IoFail::Invalid("a clone is proxied as a copy (ProxyCopy)".into()));
                    }
                };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Ok => Ok(()),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    /// One attempt of a compare and write ([`PrimaryDriver::compare_and_write`]).
    pub(super) async fn compare_and_write_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Option<Requester>,
        write: WriteId,
        offset: u64,
        expected: Bytes,
        data: Bytes,
    ) -> Result<Option<u64>, IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(p) => p.compare_and_write(&self, requester.as_ref(), write, offset, expected, data).await,
            Route::Remote(node) => {
                let msg = DataMsg::ProxyCompareAndWrite {
                    volume: id,
                    offset,
                    expected: expected.to_vec(),
                    data: data.to_vec(),
                    write,
                    requester,
                };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Ok => Ok(None),
                    DataReply::Miscompare { at } if at < data.len() as u64 => Ok(Some(at)),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    pub(super) async fn flush_once(self: Arc<Self>, id: VolumeId, requester: Option<Requester>) -> Result<(), IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(_) => Ok(()),
            Route::Remote(node) => {
                match self.call_primary(id, node, &DataMsg::ProxyFlush { volume: id, requester }).await? {
                    DataReply::Ok => Ok(()),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    /// One attempt of a reservation command ([`DataPlane::reserve`](super::DataPlane::reserve)).
    pub(super) async fn reserve_once(
        self: Arc<Self>,
        id: VolumeId,
        requester: Requester,
        command: u64,
        op: Op,
    ) -> Result<Result<Outcome, Refusal>, IoFail> {
        let primary = self.primary_of(id)?;
        match self.route(id, primary, true).await? {
            Route::Local(p) => p.reserve(&self, &requester, command, op).await,
            Route::Remote(node) => {
                let msg = DataMsg::ProxyReserve { volume: id, requester, id: command, op };
                match self.call_primary(id, node, &msg).await? {
                    DataReply::Reservation(result) => Ok(result),
                    other => Err(reply_error(node, other)),
                }
            }
        }
    }

    pub(super) async fn call(&self, node: NodeId, channel: Channel, msg: &DataMsg) -> Result<DataReply, IoFail> {
        let payload = msg.encode().map_err(|e| IoFail::Io(e.to_string()))?;
        match self.net.call(node, channel, Bytes::from(payload)).await {
            Ok(bytes) => DataReply::decode(&bytes).map_err(|e| IoFail::Io(format!("bad reply from node {node}: {e}"))),
            Err(e) => Err(IoFail::Unavailable(e.to_string())),
        }
    }
}

pub(super) fn reply_error(node: NodeId, reply: DataReply) -> IoFail {
    match reply {
        DataReply::Refused(why) => IoFail::Unavailable(format!("node {node}: {why}")),
        DataReply::Failed(why) => IoFail::Io(format!("node {node}: {why}")),
        DataReply::Denied(why) => IoFail::Denied(why),
        DataReply::Conflict(why) => IoFail::Conflict(why),
        other => IoFail::Io(format!("node {node} answered {other:?}")),
    }
}

/// A proxied request's outcome for the proxying node: `Refused` means "not served here, try
/// the primary again" (the proxy retries), `Failed` is definite.
pub(super) fn fail_reply(e: IoFail) -> DataReply {
    match e {
        IoFail::Unavailable(why) | IoFail::NoVolume(why) | IoFail::CutOff(why) | IoFail::Stopping(why) => {
            DataReply::Refused(why)
        }
        IoFail::Invalid(why) | IoFail::Io(why) => DataReply::Failed(why),
        IoFail::Denied(why) => DataReply::Denied(why),
        IoFail::Conflict(why) => DataReply::Conflict(why),
    }
}

/// The hold-time clock of one host request: it starts when the request first finds no serving
/// primary, and it fails the request only for a definite reason.
pub(super) struct Hold {
    pub(super) unserved_since: Option<Instant>,
    pub(super) backoff: Duration,
    pub(super) version: watch::Receiver<u64>,
    /// When the last attempt began: a failure is reported no sooner than
    /// [`PROXIED_WRITE_ADMIT_MAX`] + [`PROXY_FENCE_MARGIN`] after it, so that the attempt can
    /// no longer take effect at a primary once the host is told it failed.
    pub(super) last_attempt: Option<Instant>,
}

impl Hold {
    pub(super) fn new<S: BlockStore>(inner: &Arc<Inner<S>>) -> Hold {
        Hold {
            unserved_since: None,
            backoff: Duration::from_millis(20),
            version: inner.version.subscribe(),
            last_attempt: None,
        }
    }

    /// After an attempt found no serving primary (`why`): waits for the configuration to change
    /// or a short backoff, or fails the request when this node has been cut off from the
    /// metadata majority for the hold time, or the request went unserved for that long.
    pub(super) async fn wait<S: BlockStore>(&mut self, inner: &Arc<Inner<S>>, why: String) -> Result<(), IoFail> {
        let now = Instant::now();
        let hold = inner.config.hold_time;
        if let Some(cut) = inner.cut_off_for(now).filter(|d| *d >= hold) {
            self.fence().await;
            return Err(IoFail::CutOff(format!(
                "node {} has had no lease for {:.1} s (hold time {:.0} s); last attempt: {why}",
                inner.me,
                cut.as_secs_f64(),
                hold.as_secs_f64()
            )));
        }
        let since = *self.unserved_since.get_or_insert(now);
        let waited = now.duration_since(since);
        if waited >= hold {
            self.fence().await;
            return Err(IoFail::Unavailable(format!(
                "no primary served it for {:.1} s (hold time {:.0} s); last attempt: {why}",
                waited.as_secs_f64(),
                hold.as_secs_f64()
            )));
        }
        let wait = self.backoff.min(hold - waited);
        let _ = tokio::time::timeout(wait, self.version.changed()).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        Ok(())
    }

    /// Before a write is reported failed: waits until its last attempt can no longer be
    /// sequenced at any primary (it arrived there within [`PROXY_FENCE_MARGIN`], and a primary
    /// sequences a proxied write within [`PROXIED_WRITE_ADMIT_MAX`] of its arrival or refuses
    /// it), so it never takes effect after the host learns it failed.
    pub(super) async fn fence(&self) {
        if chaos_bugs::on(Bug::ParkAtStoppedPrimary) {
            return; // Planted (chaos-bugs): the host learns at once; the attempt may still run.
        }
        if let Some(at) = self.last_attempt {
            let until = at + PROXIED_WRITE_ADMIT_MAX + PROXY_FENCE_MARGIN;
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        }
    }
}
