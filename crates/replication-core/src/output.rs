//! What the core asks of its driver ([`Output`], in order) and the primary's life cycle
//! ([`Phase`]).

use tandem_types::{NodeId, Seq};

#[cfg(doc)]
use crate::RecentLog;
use crate::Token;

/// The primary's life cycle in one epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Making the surviving ISR members identical before serving (I4).
    Reconciling,
    Serving,
    /// A newer epoch exists or the local store failed: it serves nothing more.
    Deposed,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Apply host write `token` locally as sequence `seq` (before handling any later output),
    /// then send it to `to`. Report local durability with `on_local_durable(seq)`.
    Write { token: Token, seq: Seq, to: Vec<NodeId> },
    /// Every member that gates it has the write durable: acknowledge the host.
    Complete { token: Token },
    /// The write will not complete here (the primary was deposed): fail it to the host.
    Fail { token: Token, reason: String },
    /// Send `Open` to a member; answer with `on_opened` or `on_member_failed`.
    Open { to: NodeId, start_seq: Seq },
    /// Make chunk `chunk` of `to` identical to the local copy (compare checksums, send what
    /// differs, wait until durable there). Every earlier write to the chunk has been output
    /// already and later ones are held back until `on_copied`, so the driver may read the
    /// local data at any time before it answers. The member records the chunk with [`RecentLog::record_copy`] before it
    /// answers. Answer with `on_copied` or `on_member_failed`.
    Copy { to: NodeId, chunk: u64 },
    /// Propose the ISR `isr` for this epoch through Raft; answer with `on_isr_committed`,
    /// `on_isr_refused` (a newer epoch: deposed) or `on_isr_unavailable` (try again).
    ProposeIsr { isr: Vec<NodeId> },
    /// Report resync progress of `node` (chunks done of total) for display.
    Progress { node: NodeId, done_chunks: u64, total_chunks: u64 },
    /// Reconciliation is done: host I/O may be served.
    Serving,
}
