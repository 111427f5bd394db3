//! [`Backup`]: a replica's acceptance rules for one volume (I2), and why it refuses
//! ([`Refusal`]).

use tandem_types::chaos_bugs::{Bug, Bugs};
use tandem_types::{Epoch, NodeId, Seq};

/// Why a replica refused a record or request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("epoch {got} is older than the epoch {known} this replica knows")]
    StaleEpoch { got: Epoch, known: Epoch },
    #[error("no replication session is open for epoch {epoch} from node {from}")]
    NoSession { from: NodeId, epoch: Epoch },
    #[error("sequence {got} does not follow {last}")]
    OutOfOrder { got: Seq, last: Seq },
}

/// A replica's acceptance rules for one volume: it follows exactly one primary session at a
/// time, opened with [`Backup::on_open`], and refuses anything from an older epoch (I2).
#[derive(Clone, Debug, Default)]
pub struct Backup {
    known_epoch: Epoch,
    /// The primary, epoch and last accepted sequence of the open session.
    session: Option<(NodeId, Epoch, Seq)>,
    /// Planted bugs (`chaos-bugs`; always empty without the feature).
    bugs: Bugs,
}

impl Backup {
    /// The epoch and primary that the committed cluster map shows.
    pub fn on_epoch(&mut self, epoch: Epoch) {
        if epoch > self.known_epoch {
            self.known_epoch = epoch;
        }
        if let Some((_, e, _)) = self.session {
            if self.stale(e) {
                self.session = None;
            }
        }
    }

    pub fn known_epoch(&self) -> Epoch {
        self.known_epoch
    }

    /// The planted bugs this replica runs with from now on.
    pub fn set_bugs(&mut self, bugs: Bugs) {
        self.bugs = bugs;
    }

    /// Whether `epoch` is older than the newest this replica knows, and so refused (I2).
    fn stale(&self, epoch: Epoch) -> bool {
        // Planted (chaos-bugs): an older epoch's primary is followed like the current one.
        epoch < self.known_epoch && !self.bugs.has(Bug::AcceptOlderEpoch)
    }

    pub fn on_open(&mut self, from: NodeId, epoch: Epoch, start_seq: Seq) -> Result<(), Refusal> {
        if self.stale(epoch) {
            return Err(Refusal::StaleEpoch { got: epoch, known: self.known_epoch });
        }
        self.known_epoch = self.known_epoch.max(epoch);
        self.session = Some((from, epoch, start_seq.prev()));
        Ok(())
    }

    /// Checks a record (or a chunk, with `seq` = None) against the open session.
    pub fn check(&mut self, from: NodeId, epoch: Epoch, seq: Option<Seq>) -> Result<(), Refusal> {
        if self.stale(epoch) {
            return Err(Refusal::StaleEpoch { got: epoch, known: self.known_epoch });
        }
        match &mut self.session {
            Some((p, e, last)) if *p == from && *e == epoch => {
                if let Some(s) = seq {
                    if s <= *last {
                        return Err(Refusal::OutOfOrder { got: s, last: *last });
                    }
                    *last = s;
                }
                Ok(())
            }
            _ => Err(Refusal::NoSession { from, epoch }),
        }
    }

    /// Forgets the session (the volume was deleted or the node is stopping).
    pub fn close(&mut self) {
        self.session = None;
    }
}
