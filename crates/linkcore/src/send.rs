//! The sending half of a link's window: numbering requests within a session, the bound on what
//! is outstanding, which requests still have to go out (first sends, and resends with the same
//! numbers after the pipe they went out on died), and cancels of requests already sent.
//!
//! Pipes are named by a generation number the driver picks; whether a pipe is still alive is
//! asked of the driver through a plain function, so this code never sees a connection.

use std::collections::{BTreeMap, VecDeque};

use crate::{CHANNEL_BYTES_MAX, WINDOW_SEQS};

/// A request the window holds until its answer arrives.
struct Outstanding<R> {
    /// What the driver keeps with the request (payload, reply handle).
    request: R,
    /// Payload bytes counted against [`CHANNEL_BYTES_MAX`]; 0 once withdrawn.
    bytes: usize,
    /// The pipe (generation) this request was last written to.
    sent_on: Option<u64>,
}

/// What became of an answer that arrived for `(session, seq)`.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<R> {
    /// The answer belongs to a session this window has left: ignore it.
    StaleSession,
    /// No request of that number is outstanding (answered already, or failed).
    Unknown,
    /// The request it answers, now out of the window.
    Answered(R),
}

/// The sender's window of one link. `R` is what the driver keeps per request.
pub struct SendWindow<R> {
    session: u64,
    next_seq: u64,
    pending: BTreeMap<u64, Outstanding<R>>,
    /// Sum of the `bytes` of `pending`.
    bytes: usize,
    /// Requests sent and then given up on by their callers: a `Cancel` goes out for each, in
    /// this order, before any request still to send. Bounded by the window: only an outstanding
    /// request that went out is cancelled, once (its caller gives it up once).
    cancels: VecDeque<u64>,
}

impl<R> SendWindow<R> {
    /// An empty window of `session`; its first request gets number 1.
    pub fn new(session: u64) -> SendWindow<R> {
        SendWindow { session, next_seq: 1, pending: BTreeMap::new(), bytes: 0, cancels: VecDeque::new() }
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// The number the next request gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The oldest unanswered number (or the next one when nothing is outstanding). It travels
    /// with every frame: the receiver forgets the replies below it.
    pub fn ack(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next_seq)
    }

    /// Requests outstanding (queued, sent, or resent) and not yet answered.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether a request of `bytes` payload bytes may join the window now: its number is fewer
    /// than [`WINDOW_SEQS`] past the oldest unanswered one, and the bytes stay within
    /// [`CHANNEL_BYTES_MAX`] (a larger request goes when the window is empty, alone).
    pub fn fits(&self, bytes: usize) -> bool {
        self.next_seq < self.ack() + WINDOW_SEQS && (self.pending.is_empty() || self.bytes + bytes <= CHANNEL_BYTES_MAX)
    }

    /// Numbers a request and holds it until its answer; it is not sent yet. The caller checked
    /// [`SendWindow::fits`].
    pub fn push(&mut self, bytes: usize, request: R) -> u64 {
        assert!(self.fits(bytes), "a request was pushed into a full window");
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += bytes;
        self.pending.insert(seq, Outstanding { request, bytes, sent_on: None });
        self.assert_bounds();
        seq
    }

    /// Records that request `seq` was written to pipe `gen`.
    pub fn mark_sent(&mut self, seq: u64, gen: u64) {
        let p = self.pending.get_mut(&seq).expect("only an outstanding request is sent");
        p.sent_on = Some(gen);
    }

    /// The request `seq`, if outstanding.
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut R> {
        self.pending.get_mut(&seq).map(|p| &mut p.request)
    }

    /// An answer arrived: the request leaves the window and frees its place and bytes.
    pub fn complete(&mut self, session: u64, seq: u64) -> Answer<R> {
        if session != self.session {
            return Answer::StaleSession;
        }
        match self.pending.remove(&seq) {
            Some(p) => {
                self.bytes -= p.bytes;
                Answer::Answered(p.request)
            }
            None => Answer::Unknown,
        }
    }

    /// The caller of request `seq` of `session` gave up on it. If it has gone out and
    /// `cancellable` says it may be cancelled (only requests are, not region writes), a
    /// `Cancel` is queued and `true` returned; a request not sent yet is withdrawn instead when
    /// the driver comes to it.
    pub fn cancel(&mut self, session: u64, seq: u64, cancellable: impl FnOnce(&R) -> bool) -> bool {
        if session != self.session {
            return false;
        }
        let Some(p) = self.pending.get(&seq) else { return false };
        if p.sent_on.is_none() || !cancellable(&p.request) {
            return false;
        }
        self.cancels.push_back(seq);
        true
    }

    /// The next `Cancel` to send, before any request still to send.
    pub fn pop_cancel(&mut self) -> Option<u64> {
        self.cancels.pop_front()
    }

    /// Whether anything waits to go out: a cancel, or a request never sent or last sent on a
    /// pipe that `alive` says is gone.
    pub fn has_unsent(&self, alive: impl Fn(u64) -> bool) -> bool {
        !self.cancels.is_empty() || self.pending.values().any(|p| p.sent_on.is_none_or(|g| !alive(g)))
    }

    /// The lowest-numbered request still to go out (never sent, or its pipe is gone).
    pub fn next_unsent(&self, alive: impl Fn(u64) -> bool) -> Option<u64> {
        self.pending.iter().find(|(_, p)| p.sent_on.is_none_or(|g| !alive(g))).map(|(seq, _)| *seq)
    }

    /// Request `seq` will go out without its payload (its caller gave up before it was sent):
    /// its bytes leave the window. Returns the bytes freed.
    pub fn withdraw(&mut self, seq: u64) -> usize {
        let p = self.pending.get_mut(&seq).expect("only an outstanding request is withdrawn");
        let freed = std::mem::take(&mut p.bytes);
        self.bytes -= freed;
        freed
    }

    /// Whether any outstanding request was last sent on pipe `gen` (so it may still answer).
    pub fn in_flight_on(&self, gen: u64) -> bool {
        self.pending.values().any(|p| p.sent_on == Some(gen))
    }

    /// The pipes outstanding requests were last sent on.
    pub fn busy_pipes(&self) -> Vec<u64> {
        self.pending.values().filter_map(|p| p.sent_on).collect()
    }

    /// The peer cannot be reached: every outstanding request leaves the window (returned, in
    /// number order, for the driver to fail) and numbering starts over in `session`, which the
    /// receiver takes as the end of the old one.
    pub fn restart(&mut self, session: u64) -> Vec<R> {
        let failed = std::mem::take(&mut self.pending).into_values().map(|p| p.request).collect();
        self.bytes = 0;
        self.cancels.clear();
        self.session = session;
        self.next_seq = 1;
        failed
    }

    /// The peer restarted while requests were outstanding (a new process answered a new pipe):
    /// the new process knows nothing of this session, and the old one may have answered
    /// requests above the oldest unanswered, so resending with the old numbers would leave gaps
    /// the new receiver waits on for ever. The outstanding requests that `keep` accepts move,
    /// in number order, into `session`, numbered from 1 and not sent yet; the others (nobody
    /// waits for them) leave the window and are returned. Cancels still to send are dropped:
    /// they named numbers of the old session.
    pub fn renumber(&mut self, session: u64, keep: impl Fn(&R) -> bool) -> Vec<R> {
        let old = std::mem::take(&mut self.pending);
        self.cancels.clear();
        self.session = session;
        self.next_seq = 1;
        self.bytes = 0;
        let mut dropped = Vec::new();
        for p in old.into_values() {
            if keep(&p.request) {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.bytes += p.bytes;
                self.pending.insert(seq, Outstanding { request: p.request, bytes: p.bytes, sent_on: None });
            } else {
                dropped.push(p.request);
            }
        }
        self.assert_bounds();
        dropped
    }

    /// The number of the outstanding request `is` picks, if any.
    pub fn find(&self, is: impl Fn(&R) -> bool) -> Option<u64> {
        self.pending.iter().find(|(_, p)| is(&p.request)).map(|(seq, _)| *seq)
    }

    /// The window's bounds hold: numbers within [`WINDOW_SEQS`] of the oldest unanswered one,
    /// bytes within [`CHANNEL_BYTES_MAX`] unless one request is alone.
    fn assert_bounds(&self) {
        assert!(self.next_seq - self.ack() <= WINDOW_SEQS, "window past {WINDOW_SEQS} numbers");
        assert!(self.pending.len() <= 1 || self.bytes <= CHANNEL_BYTES_MAX, "window past {CHANNEL_BYTES_MAX} bytes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_start_at_one_and_the_ack_is_the_oldest_unanswered() {
        let mut w = SendWindow::new(7);
        assert_eq!(w.ack(), 1);
        assert_eq!(w.push(10, "a"), 1);
        assert_eq!(w.push(10, "b"), 2);
        assert_eq!(w.ack(), 1);
        assert_eq!(w.complete(7, 2), Answer::Answered("b"));
        assert_eq!(w.ack(), 1);
        assert_eq!(w.complete(7, 1), Answer::Answered("a"));
        assert_eq!(w.ack(), 3);
        assert_eq!(w.complete(7, 1), Answer::Unknown);
        assert_eq!(w.complete(6, 3), Answer::StaleSession);
    }

    #[test]
    fn after_a_peer_restart_the_outstanding_requests_are_numbered_again_without_gaps() {
        let mut w = SendWindow::new(3);
        for name in ["a", "b", "c", "d", "e"] {
            w.push(10, name);
        }
        for seq in 1..=5 {
            w.mark_sent(seq, 1);
        }
        // The old process answered b and d; a, c and e are outstanding, e given up on.
        assert_eq!(w.complete(3, 2), Answer::Answered("b"));
        assert_eq!(w.complete(3, 4), Answer::Answered("d"));
        assert!(w.cancel(3, 5, |_| true));
        let dropped = w.renumber(9, |r| *r != "e");
        assert_eq!(dropped, vec!["e"]);
        assert_eq!(w.session(), 9);
        assert_eq!(w.ack(), 1);
        assert_eq!(w.next_seq(), 3);
        assert_eq!(w.pop_cancel(), None, "cancels named the old numbers");
        // Both go out again, from 1, on any pipe.
        assert_eq!(w.next_unsent(|_| true), Some(1));
        assert_eq!(w.find(|r| *r == "c"), Some(2));
        assert_eq!(w.complete(3, 1), Answer::StaleSession);
        assert_eq!(w.complete(9, 1), Answer::Answered("a"));
        assert_eq!(w.complete(9, 2), Answer::Answered("c"));
        assert!(w.is_empty());
        assert!(w.fits(CHANNEL_BYTES_MAX), "the bytes went with the requests");
    }

    #[test]
    fn the_window_bounds_numbers_past_the_oldest_unanswered_and_bytes() {
        let mut w = SendWindow::new(1);
        for _ in 0..WINDOW_SEQS {
            assert!(w.fits(1));
            w.push(1, ());
        }
        assert!(!w.fits(1), "a full window of numbers");
        assert!(matches!(w.complete(1, 2), Answer::Answered(())));
        assert!(!w.fits(1), "the oldest unanswered still holds the window");
        assert!(matches!(w.complete(1, 1), Answer::Answered(())));
        assert!(w.fits(1));

        let mut w = SendWindow::new(1);
        assert!(w.fits(CHANNEL_BYTES_MAX + 1), "one large request goes alone");
        w.push(CHANNEL_BYTES_MAX + 1, ());
        assert!(!w.fits(1));
        let mut w = SendWindow::new(1);
        w.push(CHANNEL_BYTES_MAX - 1, ());
        assert!(w.fits(1));
        assert!(!w.fits(2));
        assert_eq!(w.withdraw(1), CHANNEL_BYTES_MAX - 1);
        assert!(w.fits(CHANNEL_BYTES_MAX));
    }

    #[test]
    fn requests_on_a_dead_pipe_are_sent_again_in_order() {
        let mut w = SendWindow::new(1);
        let a = w.push(1, ());
        let b = w.push(1, ());
        assert_eq!(w.next_unsent(|_| true), Some(a));
        w.mark_sent(a, 1);
        w.mark_sent(b, 1);
        assert!(!w.has_unsent(|_| true));
        assert!(w.in_flight_on(1));
        assert!(w.has_unsent(|g| g != 1));
        assert_eq!(w.next_unsent(|g| g != 1), Some(a));
        w.mark_sent(a, 2);
        assert_eq!(w.next_unsent(|g| g != 1), Some(b));
        assert_eq!(w.busy_pipes(), vec![2, 1]);
    }

    #[test]
    fn only_sent_cancellable_requests_of_the_session_are_cancelled() {
        let mut w = SendWindow::new(1);
        let a = w.push(1, true);
        let b = w.push(1, false);
        assert!(!w.cancel(1, a, |r| *r), "not sent yet: withdrawn when its turn comes");
        w.mark_sent(a, 1);
        w.mark_sent(b, 1);
        assert!(!w.cancel(2, a, |r| *r), "another session");
        assert!(!w.cancel(1, b, |r| *r), "not cancellable");
        assert!(w.cancel(1, a, |r| *r));
        assert!(w.has_unsent(|_| true));
        assert_eq!(w.pop_cancel(), Some(a));
        assert_eq!(w.pop_cancel(), None);
    }

    #[test]
    fn a_restart_fails_everything_and_numbers_anew() {
        let mut w = SendWindow::new(1);
        w.push(5, "a");
        w.push(5, "b");
        w.mark_sent(1, 1);
        assert!(w.cancel(1, 1, |_| true));
        assert_eq!(w.restart(9), vec!["a", "b"]);
        assert_eq!(w.session(), 9);
        assert!(w.is_empty());
        assert_eq!(w.pop_cancel(), None);
        assert_eq!(w.push(1, "c"), 1);
    }
}
