//! [`Coordinator`]: what the data plane needs from the metadata store (Raft, in the node), and
//! how a proposal fails ([`ProposeError`]).

use tandem_reservations::{Access, Conflict, Nexus, Op, Outcome, Refusal};
use tandem_transport::BoxFuture;
use tandem_types::{Epoch, NodeId, VolumeId};
use tandem_wire::data::Requester;

/// What the data plane needs from the metadata store. The node implements it over Raft.
pub trait Coordinator: Send + Sync + 'static {
    /// Commits `isr` as the in-sync set of `volume` if its epoch is still `epoch`.
    fn propose_isr(&self, volume: VolumeId, epoch: Epoch, isr: Vec<NodeId>) -> BoxFuture<'_, Result<(), ProposeError>>;
    /// Publishes resync progress (for `tandem volume list`); `total_bytes == 0` clears it.
    fn report_progress(&self, volume: VolumeId, node: NodeId, done_bytes: u64, total_bytes: u64) -> BoxFuture<'_, ()>;
    /// Whether this node holds its lease: it heard from the Raft majority recently enough
    /// that no other node can have been made primary of its volumes.
    fn lease_valid(&self) -> bool;
    /// Whether this node is still the committed primary of `volume` in `epoch`, by a
    /// linearizable read. A primary that lost its lease and got it back asks this before it
    /// serves again: the lease says no *new* failover can begin, not that none happened
    /// while it was away (its copy of the map may not show that yet).
    fn confirm_primary(&self, volume: VolumeId, epoch: Epoch) -> BoxFuture<'_, Result<bool, ProposeError>>;
    /// Claims `epoch` of `volume` for a new start of this node's primary, identified by
    /// `nonce` (`MetaCmd::ClaimPrimary`): the committed map then names this claim, in this
    /// epoch if no earlier start claimed it, else in the next one. A primary is built only in
    /// an epoch its own claim holds, so no two starts ever share an epoch (docs/PROTOCOL.md,
    /// "One primary per epoch").
    fn claim_primary(&self, volume: VolumeId, epoch: Epoch, nonce: u64) -> BoxFuture<'_, Result<(), ProposeError>>;
    /// Whether `requester` may use `volume` now, as the cluster map says (LUN masking): the
    /// primary asks before it executes a request another node proxied for a host. `Err` names
    /// the reason. Everyone may, by default.
    fn may_access(&self, volume: VolumeId, requester: &Requester) -> BoxFuture<'_, Result<(), String>> {
        let _ = (volume, requester);
        Box::pin(async { Ok(()) })
    }
    /// Whether the committed reservations of `volume` let `nexus` make `access` to `len` bytes
    /// at `offset`, as this node's map holds them, if that map has applied `epoch` (the
    /// primary's own claim: every reservation command committed before it, and none of a
    /// deposed primary's after it). `None` while the map is behind or past `epoch`. Called for
    /// every host request a primary executes, so it must be cheap. No reservations, by default.
    fn check_reservations(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        nexus: &Nexus,
        access: Access,
        offset: u64,
        len: u64,
    ) -> Option<Result<(), Conflict>> {
        let _ = (volume, epoch, nexus, access, offset, len);
        Some(Ok(()))
    }
    /// Waits (briefly) until this node's map has applied `epoch` of `volume`.
    fn wait_epoch_applied(&self, volume: VolumeId, epoch: Epoch) -> BoxFuture<'_, ()> {
        let _ = (volume, epoch);
        Box::pin(async {})
    }
    /// Commits the reservation command `op` (identified by `id` in every attempt) made through
    /// `nexus`, in `epoch`, and returns once this node's map has applied it, with what it did.
    /// `Refused`: the epoch moved on (nothing applied). `Unavailable`: the outcome is unknown;
    /// a retry with the same `id` is answered as the first attempt was.
    fn reserve(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        id: u64,
        nexus: Nexus,
        op: Op,
    ) -> BoxFuture<'_, Result<Result<Outcome, Refusal>, ProposeError>> {
        let _ = (volume, epoch, id, nexus, op);
        Box::pin(async { Ok(Err(Refusal::InvalidParameter("this cluster keeps no reservations".into()))) })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// The configuration moved on (another epoch): the proposer is deposed.
    #[error("refused: {0}")]
    Refused(String),
    /// No leader could be reached; try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}
