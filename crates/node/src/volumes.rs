//! The node's side of the data plane: it feeds the committed volume configuration to the
//! replication driver, carries the driver's ISR proposals and progress reports to the
//! metadata store, and offers every volume to the host protocols through the frontend seam
//! (`tandem-frontend`), implemented here once for all of them.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tandem_clustermap::{AccessPolicy, ClusterMap, MetaCmd, MetaReply, ObjectKey, Principal, Refusal, VolumeRecord};
use tandem_frontend::{
    Budgets, CopyUnit, Exports, Extent, Identification, IoError, OpenError, Peer, Token, TokenFault, TokenRequest,
    Volume,
};
use tandem_meta::network::MetaError;
use tandem_meta::state_machine::Changed;
use tandem_meta::store::MetaStore;
use tandem_replication::driver::{Coordinator, DataPlane, IoFail, ProposeError, VolumeConfig};
use tandem_reservations::{
    Access as IoAccess, Attention, Conflict, Nexus, Op, Outcome, Refusal as ReservationRefusal, Reservations,
};
use tandem_storage::SledStore;
use tandem_transport::BoxFuture;
use tandem_types::{Epoch, NodeId, VolumeId};
use tandem_wire::data::Requester;

use crate::copies::{self, Asker, Copies, CopyError};
use crate::host_watch::HostWatches;
use crate::lease::Leases;

pub type Plane = DataPlane<SledStore>;

/// How long a primary waits for this node's map to apply its own epoch before it checks a host
/// request against the reservations (the claim committed; its apply here is a moment away).
const EPOCH_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Between attempts of an ISR change whose outcome is not known yet.
const PROPOSE_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const PROPOSE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// [`Coordinator`] over the metadata store and this node's lease.
pub struct MetaCoordinator {
    pub meta: Arc<MetaStore>,
    pub leases: Arc<Leases>,
    /// The access policy while the cluster map holds none (the config's).
    pub default_access: AccessPolicy,
}

/// The principal a proxied request names.
fn principal_of_requester(requester: &Requester) -> Principal {
    match &requester.host {
        None => Principal::Anonymous,
        Some(h) => Principal::Host(h.clone()),
    }
}

/// Why `who` may not use volume `id` under `map`, if so.
fn access_refused(map: &ClusterMap, default: AccessPolicy, id: VolumeId, who: &Principal) -> Option<String> {
    let Some(name) = map.volumes.get(&id).map(|v| v.name.clone()) else {
        // Deleted: the data plane refuses the request on its own.
        return None;
    };
    map.may_open(map.access_policy(default), who, &name).err().map(|r| r.to_string())
}

impl Coordinator for MetaCoordinator {
    fn propose_isr(&self, volume: VolumeId, epoch: Epoch, isr: Vec<NodeId>) -> BoxFuture<'_, Result<(), ProposeError>> {
        Box::pin(async move {
            let mut proposed = isr.clone();
            proposed.sort_unstable();
            // The ISR version the change is computed on. The read is linearizable, so it shows
            // every earlier change of this primary (each was answered before this one began).
            let version = match self.meta.read(|st| st.map.volumes.get(&volume).map(|v| (v.epoch, v.isr_version))).await
            {
                Ok(Some((e, v))) if e == epoch => v,
                Ok(Some((e, _))) => return Err(ProposeError::Refused(format!("epoch is now {e}"))),
                Ok(None) => return Err(ProposeError::Refused("the volume was deleted".into())),
                // Nothing was proposed: the protocol may propose again later.
                Err(e) => return Err(ProposeError::Unavailable(e.to_string())),
            };
            #[cfg(feature = "failpoints")]
            if let Some(arg) = tandem_replication::failpoints::eval(crate::failpoints::ISR_BEFORE_PROPOSE).await {
                return Err(ProposeError::Unavailable(format!("failpoint isr-before-propose: {arg}")));
            }
            let cmd = MetaCmd::SetVolumeIsr { volume, epoch, isr_version: version, isr };
            let mut backoff = PROPOSE_BACKOFF_MIN;
            loop {
                let e = match self.meta.write(cmd.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(MetaError::Invalid(why) | MetaError::NotFound(why) | MetaError::Conflict(why)) => {
                        return Err(ProposeError::Refused(why));
                    }
                    Err(e) => e,
                };
                // The outcome is unknown: the change may still commit. It is never reported as
                // not committed; either the committed state shows it, or the very same change
                // is proposed again until one attempt is answered. A late copy of it finds the
                // version moved on and is refused, so it cannot undo a later change.
                let now = self
                    .meta
                    .read(|st| st.map.volumes.get(&volume).map(|v| (v.epoch, v.isr_version, v.isr.clone())))
                    .await;
                match now {
                    Ok(Some((e2, v2, isr2)))
                        if e2 == epoch && isr2 == proposed && (v2 == version + 1 || v2 == version) =>
                    {
                        return Ok(());
                    }
                    Ok(Some((e2, _, _))) if e2 != epoch => {
                        return Err(ProposeError::Refused(format!("epoch is now {e2}")));
                    }
                    Ok(Some((_, v2, _))) if v2 != version => {
                        return Err(ProposeError::Refused(format!("the ISR moved to version {v2} meanwhile")));
                    }
                    Ok(None) => return Err(ProposeError::Refused("the volume was deleted".into())),
                    _ => {}
                }
                tracing::warn!(%volume, %epoch, error = %e, "ISR change not confirmed yet; proposing it again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PROPOSE_BACKOFF_MAX);
            }
        })
    }

    fn report_progress(&self, volume: VolumeId, node: NodeId, done_bytes: u64, total_bytes: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let cmd = if total_bytes == 0 {
                MetaCmd::ClearResync { volume, node }
            } else {
                MetaCmd::SetResyncProgress { volume, node, done_bytes, total_bytes }
            };
            match self.meta.write(cmd).await {
                Ok(MetaReply::Done { .. }) | Ok(_) => {}
                Err(e) => tracing::debug!(%volume, %node, error = %e, "resync progress not recorded"),
            }
        })
    }

    fn lease_valid(&self) -> bool {
        self.leases.valid()
    }

    fn claim_primary(&self, volume: VolumeId, epoch: Epoch, nonce: u64) -> BoxFuture<'_, Result<(), ProposeError>> {
        Box::pin(async move {
            let cmd = MetaCmd::ClaimPrimary { volume, epoch, primary: self.leases.me(), nonce };
            match self.meta.write(cmd).await {
                Ok(_) => Ok(()),
                Err(MetaError::Invalid(why) | MetaError::NotFound(why) | MetaError::Conflict(why)) => {
                    Err(ProposeError::Refused(why))
                }
                // Unknown outcome: the driver proposes the same claim again on its next tick.
                Err(e) => Err(ProposeError::Unavailable(e.to_string())),
            }
        })
    }

    /// From this node's map; a refusal is confirmed by a linearizable read first, so a map
    /// that lags the proxying node's (a host connected a moment ago) never refuses a request
    /// the committed state allows.
    fn may_access(&self, volume: VolumeId, requester: &Requester) -> BoxFuture<'_, Result<(), String>> {
        let who = principal_of_requester(requester);
        Box::pin(async move {
            let default = self.default_access;
            if self.meta.local_read(|st| access_refused(&st.map, default, volume, &who)).is_none() {
                return Ok(());
            }
            match self.meta.read(|st| access_refused(&st.map, default, volume, &who)).await {
                Ok(None) => Ok(()),
                Ok(Some(why)) => {
                    tracing::info!(%volume, principal = %who, reason = %why, "proxied request refused");
                    Err(why)
                }
                // Unknown: the local map said no; it stands.
                Err(e) => Err(format!("the host's access could not be confirmed: {e}")),
            }
        })
    }

    fn check_reservations(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        nexus: &Nexus,
        access: IoAccess,
        offset: u64,
        len: u64,
    ) -> Option<Result<(), Conflict>> {
        self.meta.local_read(|st| {
            if st.map.volumes.get(&volume)?.epoch != epoch {
                return None;
            }
            Some(st.map.reservations_of(volume).map_or(Ok(()), |r| r.check(nexus, access, offset, len)))
        })
    }

    fn wait_epoch_applied(&self, volume: VolumeId, epoch: Epoch) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut applied = self.meta.subscribe();
            let wait = async {
                loop {
                    let at = self.meta.local_read(|st| st.map.volumes.get(&volume).map(|v| v.epoch));
                    if at.is_none_or(|e| e >= epoch) || applied.changed().await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(EPOCH_APPLY_WAIT, wait).await;
        })
    }

    fn reserve(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        id: u64,
        nexus: Nexus,
        op: Op,
    ) -> BoxFuture<'_, Result<Result<Outcome, ReservationRefusal>, ProposeError>> {
        Box::pin(async move {
            let reply = match self.meta.write(MetaCmd::Reserve { volume, epoch, id, nexus, op }).await {
                Ok(reply) => reply,
                // A stale epoch, or the volume is gone: nothing applied.
                Err(e @ (MetaError::Conflict(_) | MetaError::NotFound(_))) => {
                    return Err(ProposeError::Refused(e.to_string()))
                }
                Err(e) => return Err(ProposeError::Unavailable(e.to_string())),
            };
            let MetaReply::Reservation(result) = reply else {
                return Err(ProposeError::Refused(format!("unexpected reply {reply:?}")));
            };
            // Every later write is checked against this node's map: it must show the command.
            self.meta.read(|_| ()).await.map_err(|e| ProposeError::Unavailable(e.to_string()))?;
            Ok(result)
        })
    }

    fn confirm_primary(&self, volume: VolumeId, epoch: Epoch) -> BoxFuture<'_, Result<bool, ProposeError>> {
        Box::pin(async move {
            let me = self.leases.me();
            match self.meta.read(|st| st.map.volumes.get(&volume).map(|v| (v.epoch, v.primary))).await {
                Ok(Some((e, p))) => Ok(e == epoch && p == me),
                Ok(None) => Ok(false),
                Err(e) => Err(ProposeError::Unavailable(e.to_string())),
            }
        })
    }
}

/// Keeps the data plane in line with the committed cluster map.
pub fn follow_volumes(meta: Arc<MetaStore>, plane: Plane, leases: Arc<Leases>) {
    tokio::spawn(async move {
        // A node that restarts first catches up with the committed map (a linearizable read
        // waits for that), so that it does not act on the roles it held before it went down.
        while meta.read(|_| ()).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut applied = meta.subscribe();
        let mut changes = meta.changes();
        // First the whole map; then what each apply step changed.
        let mut changed = Changed::All;
        loop {
            // Read before the state and before the changes: both are at least this far (the
            // state machine updates its state, then publishes the changes, then the index).
            let index = *applied.borrow_and_update();
            if let Some(more) = changes.try_next() {
                changed = changed.union(more);
            }
            let work = meta.local_read(|st| volume_work(&st.map, &changed));
            changed = Changed::Keys(Default::default());
            if let Some(work) = work {
                // It creates and deletes local copies and takes the replicas' locks: a blocking
                // thread, never an async worker.
                let p = plane.clone();
                let done = tokio::task::spawn_blocking(move || match work {
                    VolumeWork::All { nodes, volumes } => {
                        p.set_peers(&nodes);
                        p.apply_config(volumes);
                    }
                    VolumeWork::Some { changed, deleted } => p.apply_changes(changed, deleted),
                })
                .await;
                if let Err(e) = done {
                    tracing::error!(error = %e, "applying the volume configuration failed");
                }
            }
            // Only now may a lease granted at this index count (docs/PROTOCOL.md, "Leases").
            leases.note_applied(index);
            if applied.changed().await.is_err() {
                return;
            }
        }
    });
}

/// What the data plane must be told after an apply step.
enum VolumeWork {
    /// Everything: the nodes and every volume.
    All { nodes: Vec<NodeId>, volumes: Vec<VolumeConfig> },
    /// Only these volumes changed (`deleted`: they no longer exist).
    Some { changed: Vec<VolumeConfig>, deleted: Vec<VolumeId> },
}

fn volume_config(v: &VolumeRecord) -> VolumeConfig {
    VolumeConfig {
        id: v.id,
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        replicas: v.replicas.clone(),
        primary: v.primary,
        isr: v.isr.clone(),
        epoch: v.epoch,
        claim: v.claim,
        requester: None,
        read_only: v.read_only(),
    }
}

/// The data plane's share of `changed`: every volume when a node changed (or anything may
/// have), the changed volumes only otherwise, nothing for settings, hosts and the rest.
fn volume_work(map: &ClusterMap, changed: &Changed) -> Option<VolumeWork> {
    let keys = match changed {
        Changed::Keys(keys) if !keys.iter().any(|k| matches!(k, ObjectKey::Node(_))) => keys,
        _ => {
            return Some(VolumeWork::All {
                nodes: map.nodes.keys().copied().collect(),
                // A clone or snapshot still being made is served by no node yet.
                volumes: map.volumes.values().filter(|v| !v.pending()).map(volume_config).collect(),
            });
        }
    };
    let mut changed = Vec::new();
    let mut deleted = Vec::new();
    for key in keys {
        if let ObjectKey::Volume(id) = key {
            match map.volumes.get(id) {
                Some(v) if v.pending() => {}
                Some(v) => changed.push(volume_config(v)),
                None => deleted.push(*id),
            }
        }
    }
    (!changed.is_empty() || !deleted.is_empty()).then_some(VolumeWork::Some { changed, deleted })
}

/// The exports every host protocol serves: every volume of the cluster, by name.
pub struct VolumeExports {
    pub plane: Plane,
    pub meta: Arc<MetaStore>,
    /// The access policy while the cluster map holds none (the config's).
    pub default_access: AccessPolicy,
    /// Wakes connections when their opener's access may have changed.
    pub watches: Arc<HostWatches>,
    /// Copy by reference (SCSI POPULATE TOKEN, WRITE USING TOKEN, EXTENDED COPY).
    pub copies: Arc<Copies>,
    /// The cluster's name: the volumes' SCSI identifiers derive from it.
    pub cluster: String,
}

/// Whether `peer` may open volume `name` under `map` (the policy in force, else `default`):
/// the principal it is, or why not. The one decision a node makes for every host path, when a
/// volume is opened and again whenever what it hangs on changes.
fn admit(map: &ClusterMap, default: AccessPolicy, name: &str, peer: &Peer) -> Result<Principal, OpenError> {
    let who = principal_of(map, peer).map_err(OpenError::Denied)?;
    match map.may_open(map.access_policy(default), &who, name) {
        Ok(_) => Ok(who),
        Err(Refusal::NotFound(m)) => Err(OpenError::NotFound(m)),
        Err(Refusal::IdentityRequired(m) | Refusal::NotConnected(m)) => Err(OpenError::Denied(m)),
    }
}

/// Who `peer` is in `map`: the host its certificate or initiator name belongs to, or nobody.
/// A certificate that belongs to no host (revoked by newer credentials, a host removed, or
/// not a host's at all) is refused outright rather than taken as anonymous, which could reach
/// more than its host did.
pub fn principal_of(map: &ClusterMap, peer: &Peer) -> Result<Principal, String> {
    if let Some(cert) = &peer.certificate {
        let fingerprint = crate::security::sha256_hex(cert);
        return match map.host_by_cert(&fingerprint) {
            Some(h) => Ok(Principal::Host(h.name.clone())),
            None => Err(format!(
                "the client certificate (sha256 {fingerprint}) is not a host's current certificate \
                 (replaced by newer credentials, or its host was removed)"
            )),
        };
    }
    if let Some(h) = peer.initiator.as_deref().and_then(|i| map.host_by_iqn(i)) {
        return Ok(Principal::Host(h.name.clone()));
    }
    Ok(Principal::Anonymous)
}

impl VolumeExports {
    /// The access policy in force on this node now.
    pub fn policy(&self) -> AccessPolicy {
        self.meta.local_read(|st| st.map.access_policy(self.default_access))
    }

    /// The volumes `peer` may see, by name (every volume of the map, whether this node holds
    /// it or proxies it).
    pub fn visible(&self, peer: &Peer) -> Vec<String> {
        self.meta.local_read(|st| {
            let policy = st.map.access_policy(self.default_access);
            principal_of(&st.map, peer).map(|who| st.map.visible_volumes(policy, &who)).unwrap_or_default()
        })
    }
    /// Who `peer` is and whether it may open `name`, as this node's map says now.
    pub(crate) fn decide(&self, name: &str, peer: &Peer) -> Result<Principal, OpenError> {
        self.meta.local_read(|st| admit(&st.map, self.default_access, name, peer))
    }
}

/// One volume as a host protocol sees it; every request goes through the data plane.
pub struct ExportedVolume {
    plane: Plane,
    cfg: VolumeConfig,
    /// Who opened it, and what its access hangs on.
    access: Access,
    /// The reservation unit attentions not yet taken by the opener.
    attentions: std::sync::Mutex<AttentionFeed>,
    meta: Arc<MetaStore>,
    copies: Arc<Copies>,
    /// The opener as copies check it (may it read a token's source, write here).
    asker: Asker,
    cluster: String,
}

/// Where an opener stands in its volume's numbered unit attentions.
struct AttentionFeed {
    /// Changes when the volume's reservations do.
    changed: tokio::sync::watch::Receiver<u64>,
    /// The number of the last attention the opener has seen (or that was raised before it
    /// opened: those were for the sessions of then).
    seen: u64,
}

/// What a volume opened by a host connection needs to tell when its opener loses access.
struct Access {
    /// The opener as its protocol proved it: checked again in full on every change, so a
    /// replaced certificate loses its connections as a disconnected host does.
    peer: Peer,
    meta: Arc<MetaStore>,
    default_access: AccessPolicy,
    /// Changes with the opener's host record (or, for an anonymous opener, the access setting).
    changed: tokio::sync::Mutex<tokio::sync::watch::Receiver<u64>>,
}

impl Access {
    /// Why the opener may no longer open `volume`, if so.
    fn refused(&self, volume: &str) -> Option<String> {
        self.meta.local_read(|st| admit(&st.map, self.default_access, volume, &self.peer).err().map(|e| e.to_string()))
    }
}

/// The error kind, and so the errno (NBD) a host sees, for each definite reason
/// (docs/PROTOCOL.md, "Errors a host can see").
fn io_error(e: IoFail) -> IoError {
    match e {
        IoFail::Invalid(m) => IoError::Invalid(m),
        IoFail::NoVolume(m) | IoFail::Stopping(m) => IoError::Shutdown(m),
        IoFail::Unavailable(m) | IoFail::CutOff(m) | IoFail::Io(m) => IoError::Io(m),
        IoFail::Denied(m) => IoError::NotPermitted(m),
        IoFail::Conflict(m) => IoError::ReservationConflict(m),
    }
}

impl Exports for VolumeExports {
    type Volume = ExportedVolume;

    fn list(&self, peer: &Peer) -> Vec<String> {
        let visible = self.visible(peer);
        // Only what this node serves now.
        let served: std::collections::HashSet<String> = self.plane.volume_names().into_iter().collect();
        visible.into_iter().filter(|v| served.contains(v)).collect()
    }

    async fn open(&self, name: &str, peer: &Peer) -> Result<ExportedVolume, OpenError> {
        // The signal is taken before the decision, so no change falls between the two.
        let who = self.meta.local_read(|st| principal_of(&st.map, peer)).map_err(OpenError::Denied)?;
        let key = match &who {
            Principal::Host(h) => ObjectKey::Host(h.clone()),
            _ => ObjectKey::Setting(tandem_clustermap::ACCESS_SETTING.to_string()),
        };
        let changed = self.watches.watch_key(key);
        let who = self.decide(name, peer)?;
        let Some(mut cfg) = self.plane.volume_by_name(name) else {
            return Err(OpenError::NotFound(format!("no volume named {name:?}")));
        };
        // Requests proxied to the primary name the host, which checks it too, and the I_T
        // nexus the reservations know the connection by: the session's initiator port through
        // this node's target port (iSCSI), or the host itself (NBD: the same nexus through
        // every node).
        let mut requester = match &who {
            Principal::Host(h) => Requester::host(h),
            _ => Requester::anonymous(),
        };
        if let Some(initiator_port) = &peer.initiator_port {
            requester.nexus = Nexus::new(initiator_port.clone(), peer.target_port);
        }
        cfg.requester = Some(requester);
        let attentions = {
            let key = ObjectKey::Reservations(cfg.id);
            let seen = self.meta.local_read(|st| st.map.reservations_of(cfg.id).map_or(0, |r| r.attention_seq));
            std::sync::Mutex::new(AttentionFeed { changed: self.watches.watch_key(key), seen })
        };
        let access = Access {
            peer: peer.clone(),
            meta: self.meta.clone(),
            default_access: self.default_access,
            changed: tokio::sync::Mutex::new(changed),
        };
        let asker = Asker { principal: who, requester: cfg.requester.clone() };
        Ok(ExportedVolume {
            plane: self.plane.clone(),
            cfg,
            access,
            attentions,
            meta: self.meta.clone(),
            copies: self.copies.clone(),
            asker,
            cluster: self.cluster.clone(),
        })
    }

    fn identification(&self) -> Identification {
        match self.policy() {
            AccessPolicy::Open => Identification::Off,
            AccessPolicy::Tls => Identification::Optional,
            AccessPolicy::TlsRequired => Identification::Required,
        }
    }
}

impl Volume for ExportedVolume {
    fn size_bytes(&self) -> u64 {
        self.cfg.size_bytes
    }

    /// A snapshot is exported read-only (its data plane refuses writes too).
    fn read_only(&self) -> bool {
        self.cfg.read_only
    }

    /// Every node sends every request to the volume's one primary, and a write is acknowledged
    /// only once durable on every in-sync replica: all connections see one volume.
    fn multi_conn(&self) -> bool {
        true
    }

    /// As soon as this node has applied the change that took the opener's access away (its
    /// host disconnected from the volume or removed, its certificate replaced, the policy
    /// tightened): docs/OPERATIONS.md, "Security".
    async fn revoked(&self) -> String {
        let access = &self.access;
        let mut changed = access.changed.lock().await;
        loop {
            if let Some(why) = access.refused(&self.cfg.name) {
                return why;
            }
            if changed.changed().await.is_err() {
                // The store stopped: the node is going down, and the connection with it.
                return std::future::pending().await;
            }
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.plane.read(&self.cfg, offset, buf).await.map_err(io_error)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        // Every acknowledged write is durable already, so FUA needs nothing more.
        self.plane.write(&self.cfg, offset, data).await.map_err(io_error)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
        self.plane.write_zeroes(&self.cfg, offset, len).await.map_err(io_error)
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.plane.write_zeroes(&self.cfg, offset, len).await.map_err(io_error)
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.plane.flush(&self.cfg).await.map_err(io_error)
    }

    fn nexus(&self) -> Option<Nexus> {
        self.cfg.requester.as_ref().map(|r| r.nexus.clone())
    }

    /// As committed: a registration made through another node a moment ago is there.
    async fn reservations(&self) -> Result<Reservations, IoError> {
        let id = self.cfg.id;
        self.meta
            .read(|st| st.map.reservations_of(id).cloned().unwrap_or_default())
            .await
            .map_err(|e| IoError::Io(format!("the reservations could not be read: {e}")))
    }

    async fn reserve(&self, op: Op) -> Result<Result<Outcome, ReservationRefusal>, IoError> {
        // ALL_TG_PT: through every node's target port (each node is one port).
        let op = match op {
            Op::Register { key, new_key, ignore_existing, all_ports, aptpl, also } if !all_ports.is_empty() => {
                let ports = self
                    .meta
                    .local_read(|st| st.map.nodes.keys().map(|n| crate::iscsi::port_of(*n)).collect::<Vec<u16>>());
                Op::Register { key, new_key, ignore_existing, all_ports: ports, aptpl, also }
            }
            op => op,
        };
        self.plane.reserve(&self.cfg, op).await.map_err(io_error)
    }

    fn take_attentions(&self) -> Vec<Attention> {
        let mut feed = self.attentions.lock().expect("attention lock");
        if !feed.changed.has_changed().unwrap_or(false) {
            return Vec::new();
        }
        feed.changed.mark_unchanged();
        let Some(nexus) = self.nexus() else {
            return Vec::new();
        };
        let seen = feed.seen;
        let (taken, last) = self.meta.local_read(|st| match st.map.reservations_of(self.cfg.id) {
            Some(r) => (r.attentions_for(&nexus, seen).map(|a| a.attention).collect(), r.attention_seq),
            None => (Vec::new(), seen),
        });
        feed.seen = feed.seen.max(last);
        taken
    }

    async fn compare_and_write(
        &self,
        offset: u64,
        expected: Bytes,
        data: Bytes,
        _fua: bool,
    ) -> Result<Option<u64>, IoError> {
        // Acknowledged only once durable on every in-sync replica: FUA needs nothing more.
        self.plane.compare_and_write(&self.cfg, offset, expected, data).await.map_err(io_error)
    }

    async fn populate_token(&self, ranges: Vec<(u64, u64)>, request: TokenRequest) -> Result<Token, IoError> {
        let idle = request.idle.unwrap_or(copies::IDLE_DEFAULT);
        if idle > tandem_frontend::copy::TOKEN_IDLE_MAX {
            return Err(IoError::Invalid(format!(
                "an inactivity timeout of {idle:?} is past the most a token may have"
            )));
        }
        let lifetime = copies::LIFETIME_DEFAULT;
        let (record, value) =
            self.copies.create_token(&self.asker, &self.cfg.name, ranges, lifetime, idle).await.map_err(copy_error)?;
        Ok(Token { value: value.to_vec(), bytes: record.len(), lifetime, idle })
    }

    async fn write_using_token(
        &self,
        token: Bytes,
        token_offset: u64,
        ranges: Vec<(u64, u64)>,
    ) -> Result<u64, (u64, IoError)> {
        // Checked whole before anything is written: the token, both volumes' access, and
        // that it holds every byte asked for.
        let record = self.copies.resolve(&self.asker, &token, &self.cfg.name).await.map_err(|e| (0, copy_error(e)))?;
        let wanted: u64 = ranges.iter().map(|(_, len)| len).sum();
        if token_offset.checked_add(wanted).is_none_or(|end| end > record.len()) {
            let why = format!("{wanted} bytes from byte {token_offset} of a token of {} bytes", record.len());
            return Err((0, IoError::Token(TokenFault::TooShort, why)));
        }
        let mut done = 0;
        for (offset, len) in ranges {
            self.copies
                .copy_resolved(&self.asker, &record, &self.cfg.name, offset, token_offset + done, Some(len))
                .await
                .map_err(|e| (done, copy_error(e)))?;
            done += len;
        }
        Ok(done)
    }

    async fn copy_between(
        &self,
        source: CopyUnit,
        source_offset: u64,
        destination: CopyUnit,
        destination_offset: u64,
        len: u64,
    ) -> Result<(), IoError> {
        let source = self.unit_name(source)?;
        let destination = self.unit_name(destination)?;
        // A token for the source range, used once and revoked: the same image, clone record
        // and access checks as any copy by token.
        let (record, value) = self
            .copies
            .create_token(&self.asker, &source, vec![(source_offset, len)], XCOPY_TOKEN_LIFETIME, XCOPY_TOKEN_LIFETIME)
            .await
            .map_err(copy_error)?;
        let copied = self.copies.copy(&self.asker, &value, &destination, destination_offset, 0, Some(len)).await;
        if let Err(e) = self.copies.revoke(&self.asker, &source, record.id).await {
            // Its image goes at the token's expiry instead.
            tracing::warn!(token = %record.id, error = %e, "an EXTENDED COPY token was not revoked");
        }
        copied.map(|_| ()).map_err(copy_error)
    }

    /// From the volume's primary, which sequences its writes (proxied there from this node).
    async fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, IoError> {
        let map = self.plane.extents(&self.cfg, offset, len, max).await.map_err(io_error)?;
        Ok(map.into_iter().map(|e| Extent { len: e.len, allocated: e.allocated }).collect())
    }
}

/// How long the token behind one EXTENDED COPY segment may live if it is not revoked at once.
const XCOPY_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

impl ExportedVolume {
    /// The name of the volume a copy names: this one, or the one whose NAA identifier it
    /// gives (and which this opener may see).
    fn unit_name(&self, unit: CopyUnit) -> Result<String, IoError> {
        match unit {
            CopyUnit::This => Ok(self.cfg.name.clone()),
            CopyUnit::Naa(naa) => self
                .meta
                .local_read(|st| {
                    st.map
                        .volumes
                        .values()
                        .find(|v| crate::iscsi::naa(&self.cluster, v.id) == naa)
                        .map(|v| v.name.clone())
                })
                .ok_or_else(|| IoError::CopyTarget(format!("no volume of this cluster has NAA identifier {naa:016x}"))),
        }
    }
}

/// The error kind a host sees for a copy that failed.
fn copy_error(e: CopyError) -> IoError {
    match e {
        CopyError::Token(fault, m) => IoError::Token(fault, m),
        CopyError::Invalid(m) => IoError::Invalid(m),
        CopyError::NotFound(m) => IoError::CopyTarget(m),
        CopyError::Denied(m) => IoError::NotPermitted(m),
        CopyError::Conflict(m) => IoError::ReservationConflict(m),
        CopyError::Unavailable(m) | CopyError::Io(m) => IoError::Io(m),
    }
}

/// The frontend budgets as `GET /v1/local/volumes` shows them (field `frontend`): the read
/// buffers all host connections of this node share, and the most they ever held at once.
#[derive(Clone, Debug, Serialize)]
pub struct FrontendStats {
    pub read_buffer_bytes_max: u64,
    pub read_buffer_bytes_reserved: u64,
    pub read_buffer_bytes_high_water: u64,
}

impl FrontendStats {
    pub fn of(budgets: &Budgets) -> FrontendStats {
        let read = &budgets.read_buffers;
        FrontendStats {
            read_buffer_bytes_max: read.bytes_max(),
            read_buffer_bytes_reserved: read.reserved_bytes(),
            read_buffer_bytes_high_water: read.high_water_bytes(),
        }
    }
}
