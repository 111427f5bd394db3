//! The receiving half of a link's window: per (peer, channel), the session being delivered, the
//! next number to deliver, a reorder buffer of requests that arrived early, and the replies of
//! delivered requests, kept until the sender's `ack` passes them so that a resent duplicate is
//! answered again rather than run again.
//!
//! Generic over what it carries: `M` is a request as the driver hands it to the handler, `R` a
//! route a reply goes back on (a pipe), `A` a reply.

use std::collections::BTreeMap;

use crate::WINDOW_SEQS;

/// A request that breaks the protocol; the driver closes the pipe it came on (the sender makes
/// a new one and resends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowError {
    /// The number is [`WINDOW_SEQS`] or more past the next one to deliver.
    BeyondWindow { seq: u64, next: u64 },
}

impl std::fmt::Display for WindowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowError::BeyondWindow { seq, next } => write!(f, "sequence {seq} beyond the window (next {next})"),
        }
    }
}

/// The reply to a delivered request.
pub enum ReplySlot<R, A> {
    /// The handler runs; the reply goes to every route the request (and its duplicates) came on.
    Running(Vec<R>),
    /// The reply, kept for duplicates.
    Done(A),
}

/// What became of an arriving request.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival<R, A> {
    /// Of a session the sender has abandoned: a straggler, dropped.
    Stale,
    /// A duplicate of a delivered request whose reply is kept: send it again on the route.
    Answered(A, R),
    /// A duplicate of a delivered request: its reply, when done, also goes to this route; or
    /// it was answered and the sender has acknowledged that. Nothing to do.
    Duplicate,
    /// New: buffered until its turn. Take what became deliverable with
    /// [`ReceiveWindow::pop_ready`].
    Accepted,
}

/// The receiver's window of one (peer, channel).
///
/// Bounds: the reorder buffer holds numbers below `next + WINDOW_SEQS` only (checked on every
/// arrival); the reply cache holds the numbers from the sender's `ack` to `next`, which a
/// sender keeping its window (at most [`WINDOW_SEQS`] past its oldest unanswered request)
/// keeps below [`WINDOW_SEQS`].
pub struct ReceiveWindow<M, R, A> {
    session: u64,
    next_seq: u64,
    buffered: BTreeMap<u64, (M, R)>,
    replies: BTreeMap<u64, ReplySlot<R, A>>,
}

impl<M, R, A: Clone> Default for ReceiveWindow<M, R, A> {
    fn default() -> Self {
        ReceiveWindow::new()
    }
}

impl<M, R, A: Clone> ReceiveWindow<M, R, A> {
    /// Before the first request: session 0, which every sender's sessions are above.
    pub fn new() -> ReceiveWindow<M, R, A> {
        ReceiveWindow { session: 0, next_seq: 1, buffered: BTreeMap::new(), replies: BTreeMap::new() }
    }

    /// The session being delivered.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The next number to deliver.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether a `Cancel` of `seq` may be recorded: it belongs to the current session and to
    /// the window (it may still be on its way on another pipe, buffered, running or answered).
    pub fn accepts_cancel(&self, session: u64, seq: u64, ack: u64) -> bool {
        session == self.session && seq >= ack && seq < self.next_seq + WINDOW_SEQS
    }

    /// Request `seq` (at least 1) of `session` arrived on `route`; the sender's oldest
    /// unanswered request is `ack`.
    ///
    /// A newer session (a new one, or one this process has not seen because it restarted while
    /// the sender kept its link) replaces the current one: delivery starts at `ack`, since
    /// everything below it was answered, by this process or its predecessor. Replies below
    /// `ack` are forgotten.
    pub fn on_request(
        &mut self,
        session: u64,
        seq: u64,
        ack: u64,
        msg: M,
        route: R,
    ) -> Result<Arrival<R, A>, WindowError> {
        assert!(seq >= 1, "sequence number 0 reached the window");
        if session < self.session {
            return Ok(Arrival::Stale);
        }
        if session > self.session {
            *self =
                ReceiveWindow { session, next_seq: ack.max(1), buffered: BTreeMap::new(), replies: BTreeMap::new() };
        }
        self.replies = self.replies.split_off(&ack);
        if seq < self.next_seq {
            return Ok(match self.replies.get_mut(&seq) {
                Some(ReplySlot::Done(reply)) => Arrival::Answered(reply.clone(), route),
                Some(ReplySlot::Running(routes)) => {
                    routes.push(route);
                    Arrival::Duplicate
                }
                None => Arrival::Duplicate,
            });
        }
        if seq >= self.next_seq + WINDOW_SEQS {
            return Err(WindowError::BeyondWindow { seq, next: self.next_seq });
        }
        // A copy of a request still buffered replaces the earlier one and its route, as the
        // link did before this core was split out. So if a straggler from a dead pipe arrives
        // after the resend, the reply goes to the dead pipe only and the sender waits until
        // its live pipe dies too (the property test does not model that order).
        self.buffered.insert(seq, (msg, route));
        assert!(self.buffered.len() as u64 <= WINDOW_SEQS, "reorder buffer past the window");
        Ok(Arrival::Accepted)
    }

    /// The next request in order, if it has arrived: it is delivered (handed out once) and its
    /// reply will go to the route it came on.
    pub fn pop_ready(&mut self) -> Option<(u64, M)> {
        let seq = self.next_seq;
        let (msg, route) = self.buffered.remove(&seq)?;
        self.next_seq += 1;
        self.replies.insert(seq, ReplySlot::Running(vec![route]));
        Some((seq, msg))
    }

    /// The handler answered request `seq` of `session`: the reply is kept for duplicates and
    /// the routes waiting for it are returned. None if the session has ended or the sender has
    /// acknowledged the request already (nobody waits).
    pub fn answer(&mut self, session: u64, seq: u64, reply: A) -> Vec<R> {
        if self.session != session {
            return Vec::new();
        }
        match self.replies.get_mut(&seq) {
            Some(slot) => match std::mem::replace(slot, ReplySlot::Done(reply)) {
                ReplySlot::Running(routes) => routes,
                ReplySlot::Done(_) => Vec::new(),
            },
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type W = ReceiveWindow<&'static str, u8, &'static str>;

    fn drain(w: &mut W) -> Vec<(u64, &'static str)> {
        std::iter::from_fn(|| w.pop_ready()).collect()
    }

    #[test]
    fn early_requests_wait_for_their_turn() {
        let mut w = W::new();
        assert_eq!(w.on_request(5, 2, 1, "b", 0), Ok(Arrival::Accepted));
        assert!(drain(&mut w).is_empty());
        assert_eq!(w.on_request(5, 1, 1, "a", 0), Ok(Arrival::Accepted));
        assert_eq!(drain(&mut w), vec![(1, "a"), (2, "b")]);
        assert_eq!(w.next_seq(), 3);
    }

    #[test]
    fn duplicates_are_answered_from_the_kept_reply_or_join_the_running_one() {
        let mut w = W::new();
        w.on_request(5, 1, 1, "a", 0).expect("accepted");
        drain(&mut w);
        assert_eq!(w.on_request(5, 1, 1, "a", 1), Ok(Arrival::Duplicate));
        assert_eq!(w.answer(5, 1, "ok"), vec![0, 1], "both routes get the reply");
        assert_eq!(w.on_request(5, 1, 1, "a", 2), Ok(Arrival::Answered("ok", 2)));
        // The sender acknowledged it: forgotten, and never delivered again.
        assert_eq!(w.on_request(5, 1, 2, "a", 3), Ok(Arrival::Duplicate));
        assert_eq!(w.answer(5, 1, "late"), Vec::<u8>::new());
        assert!(drain(&mut w).is_empty());
    }

    #[test]
    fn a_newer_session_starts_at_the_ack_and_older_ones_are_stale() {
        let mut w = W::new();
        w.on_request(5, 1, 1, "a", 0).expect("accepted");
        drain(&mut w);
        assert_eq!(w.on_request(6, 4, 4, "d", 0), Ok(Arrival::Accepted));
        assert_eq!(w.session(), 6);
        assert_eq!(drain(&mut w), vec![(4, "d")]);
        assert_eq!(w.on_request(5, 2, 1, "b", 0), Ok(Arrival::Stale));
        assert_eq!(w.answer(5, 1, "old"), Vec::<u8>::new(), "a reply of the old session goes nowhere");
    }

    #[test]
    fn a_later_copy_of_a_buffered_request_takes_its_route() {
        let mut w = W::new();
        assert_eq!(w.on_request(5, 2, 1, "b", 7), Ok(Arrival::Accepted));
        assert_eq!(w.on_request(5, 2, 1, "b", 8), Ok(Arrival::Accepted));
        w.on_request(5, 1, 1, "a", 7).expect("accepted");
        assert_eq!(drain(&mut w), vec![(1, "a"), (2, "b")]);
        assert_eq!(w.answer(5, 2, "ok"), vec![8]);
    }

    #[test]
    fn numbers_past_the_window_break_the_protocol() {
        let mut w = W::new();
        assert_eq!(
            w.on_request(5, 1 + WINDOW_SEQS, 1, "x", 0),
            Err(WindowError::BeyondWindow { seq: 1 + WINDOW_SEQS, next: 1 })
        );
        assert_eq!(w.on_request(5, WINDOW_SEQS, 1, "x", 0), Ok(Arrival::Accepted));
    }

    #[test]
    fn cancels_count_only_within_the_current_session_and_window() {
        let mut w = W::new();
        w.on_request(5, 1, 1, "a", 0).expect("accepted");
        assert!(w.accepts_cancel(5, 3, 1));
        assert!(!w.accepts_cancel(4, 3, 1), "old session");
        assert!(!w.accepts_cancel(6, 3, 1), "a session not begun");
        assert!(!w.accepts_cancel(5, 3, 4), "below the ack");
        assert!(!w.accepts_cancel(5, 1 + WINDOW_SEQS, 1), "past the window");
    }
}
