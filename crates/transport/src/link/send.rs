//! The sending side of one link (a peer and channel): [`ChannelLink`] queues requests into its
//! [`SendWindow`] (the numbering and window logic, in `tandem_linkcore`), and its driver task
//! makes pipes with backoff, moves to the selected layer make-before-break, sends and resends
//! what waits, and closes drained pipes; a reader per pipe hands replies back to the window,
//! and from there to the caller's [`PendingReply`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tandem_linkcore::{Answer, SendWindow};
use tandem_types::{Channel, NodeId};
use tandem_wire::{Frame, FrameKind};
use tokio::io::BufReader;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::pipe::{clock_ms, read_frame, spawn_writer_task, BoxRead, BoxWrite, Heard, PipeTx, READ_BUFFER_BYTES};
use crate::{BoxFuture, TransportError};
use tandem_types::{Layer, TransportKind};

/// First retry delay after a failed dial; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Short enough that a restarted peer is reached again well within a Raft election timeout.
pub const BACKOFF_MAX: Duration = Duration::from_millis(800);

// Backoff doubles from its base and stops at its max: the base must be the smaller, and the
// doubling (capped at 2^16 times the base) must reach the max.
const _: () = assert!(BACKOFF_BASE.as_nanos() < BACKOFF_MAX.as_nanos());
const _: () = assert!(BACKOFF_BASE.as_nanos() << 16 >= BACKOFF_MAX.as_nanos());

/// A pipe with requests in flight that has carried nothing back for this long gets a `Ping`.
pub const SILENT_AFTER: Duration = Duration::from_millis(500);
/// Nothing back this long after the `Ping`: the pipe is stalled, and a new one is made
/// (docs/ARCHITECTURE.md, "A silent pipe"). Long enough for a round trip on a loaded node;
/// the cost of a false alarm is a resend, not an error.
pub const STALLED_AFTER: Duration = Duration::from_millis(1500);
/// How often the driver looks at its pipes while requests are in flight.
const WATCH_TICK: Duration = Duration::from_millis(250);

/// What a link needs of the mesh it belongs to: the layer selected for its channel, a fresh
/// session number, a new pipe to its peer, and word that a pipe stalled.
pub(super) trait LinkHost: Send + Sync + 'static {
    fn kind(&self, layer: Layer) -> TransportKind;
    fn new_session(&self) -> u64;
    fn dial(&self, kind: TransportKind, peer: NodeId, channel: Channel) -> BoxFuture<'_, Result<Dialed, String>>;
    /// A pipe on `path` (the layer's connection) carried nothing back for too long: the next
    /// dial must not reuse that connection.
    fn stalled(&self, kind: TransportKind, peer: NodeId, path: u64);
}

/// A new pipe to a peer, and which process of the peer answered it (its server hello).
pub(super) struct Dialed {
    pub(super) read: BoxRead,
    pub(super) write: BoxWrite,
    pub(super) incarnation: u64,
    /// The layer's connection the pipe rides on (QUIC: shared by the peer's channels).
    pub(super) path: u64,
}

type ReplyTx = oneshot::Sender<Result<Bytes, TransportError>>;

/// Counts a live task of a link (its driver, a pipe's writer or reader) in the mesh's count
/// while the task's future exists: it ends, or is aborted.
pub(super) struct LiveTask(Arc<AtomicUsize>);

impl LiveTask {
    fn new(count: &Arc<AtomicUsize>) -> LiveTask {
        count.fetch_add(1, Ordering::SeqCst);
        LiveTask(count.clone())
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The reply to a request that has been queued on a link. Dropping it before the reply came
/// withdraws the request: if it has not gone out it never will (an empty payload takes its
/// number), and if it has, a `Cancel` frame follows it, ahead of anything sent later on the
/// link, so the receiver does not start it or cancels it while it runs.
pub struct PendingReply {
    peer: NodeId,
    rx: oneshot::Receiver<Result<Bytes, TransportError>>,
    /// The request (by its id on the link), to cancel if this is dropped unanswered (requests
    /// only).
    cancel: Option<(Weak<ChannelLink>, u64)>,
}

impl PendingReply {
    pub async fn wait(mut self) -> Result<Bytes, TransportError> {
        let reply = (&mut self.rx).await;
        self.cancel = None;
        reply.unwrap_or(Err(TransportError::Unreachable { peer: self.peer, reason: "link closed".into() }))
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some((link, id)) = self.cancel.take() {
            if let Some(link) = link.upgrade() {
                link.cancel(id);
            }
        }
    }
}

/// What the link keeps of a request while the window holds it.
pub(super) struct Pending {
    /// The request's id on the link: its number changes if the peer restarts (see
    /// [`SendWindow::renumber`]), this does not.
    id: u64,
    kind: FrameKind,
    payload: Bytes,
    reply: Option<ReplyTx>,
}

impl Pending {
    /// A request whose caller gave up on it (dropped its [`PendingReply`]).
    fn given_up(&self) -> bool {
        self.kind == FrameKind::Request && self.reply.as_ref().is_some_and(|r| r.is_closed())
    }
}

pub(super) struct OutPipe {
    gen: u64,
    pub(super) kind: TransportKind,
    pub(super) tx: PipeTx,
    /// The layer's connection under it.
    path: u64,
    /// When a `Ping` was queued on it that nothing has been heard since ([`clock_ms`]).
    ping: Option<u64>,
    /// Found silent (docs/ARCHITECTURE.md, "A silent pipe"): a new pipe is being made. Until
    /// it is up, this one still carries requests (it may only be slow); then it is closed and
    /// what was in flight on it is resent on the new one.
    stalled: bool,
    /// Its writer and reader tasks, aborted when a new pipe replaces it.
    tasks: [tokio::task::AbortHandle; 2],
}

impl OutPipe {
    /// Watches the pipe while requests are in flight on it: a `Ping` once nothing has come in
    /// for [`SILENT_AFTER`]; stalled when nothing has come in for [`STALLED_AFTER`] since the
    /// `Ping` went out, or since the writer got stuck (a full socket or stream: the `Ping`
    /// cannot even go out). Anything heard clears both. Returns true when it just stalled.
    fn watch(&mut self, channel: Channel, in_flight: bool, now: u64) -> bool {
        let clock = &self.tx.clock;
        let heard = clock.heard();
        if self.ping.is_some_and(|queued| heard >= queued) {
            self.ping = None;
            self.stalled = false;
        }
        if !in_flight || self.stalled {
            return false;
        }
        let silent = |since: u64| now.saturating_sub(since.max(heard)) >= STALLED_AFTER.as_millis() as u64;
        match self.ping {
            None if now.saturating_sub(heard) >= SILENT_AFTER.as_millis() as u64 => {
                // A full queue takes no `Ping`: it is tried again at the next look.
                if self.tx.out.try_send(Frame::new(FrameKind::Ping, channel, 0, 0, 0, Bytes::new())).is_ok() {
                    self.ping = Some(now);
                }
                self.stalled = clock.blocked_since().is_some_and(silent);
            }
            Some(queued) => {
                let pinged = clock.pinged();
                self.stalled = (pinged >= queued && silent(pinged)) || clock.blocked_since().is_some_and(silent);
            }
            None => {}
        }
        self.stalled
    }

    /// Closes the pipe: its tasks end, and what was in flight on it counts as unsent.
    fn retire(&self) {
        self.tx.mark_dead();
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(super) struct OutState {
    /// Numbering, the window, resends and cancels.
    pub(super) win: SendWindow<Pending>,
    /// Pipes, oldest first; the last alive one of the selected layer is current.
    pub(super) pipes: Vec<OutPipe>,
    next_gen: u64,
    /// The id the next request gets.
    next_id: u64,
    /// The process of the peer this session's requests went to (its server hello), once a
    /// pipe was made.
    incarnation: Option<u64>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    ever_connected: bool,
    driver_started: bool,
    /// Set by [`ChannelLink::close`]: nothing is queued, dialed or spawned any more.
    closed: Option<String>,
    /// The link's tasks (driver, pipes' writers and readers), for `close` to abort.
    tasks: Vec<tokio::task::AbortHandle>,
}

impl OutState {
    /// Keeps `task` to abort on close (and forgets the handles of tasks that have ended).
    fn track(&mut self, task: tokio::task::AbortHandle) {
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(task);
    }

    /// The newest live pipe of the selected layer that has not stalled.
    fn current(&self, want: TransportKind) -> Option<&OutPipe> {
        self.pipes.iter().rev().find(|p| p.kind == want && p.tx.is_alive() && !p.stalled)
    }

    /// Where requests go: the current pipe, or while the selected layer cannot be reached,
    /// any pipe still alive (a failed switch must not fail traffic the old layer can carry,
    /// nor a failed redial traffic a stalled pipe may yet carry).
    pub(super) fn usable(&self, want: TransportKind) -> Option<&OutPipe> {
        self.current(want).or_else(|| self.pipes.iter().rev().find(|p| p.tx.is_alive()))
    }

    fn is_alive_gen(&self, gen: u64) -> bool {
        self.pipes.iter().any(|p| p.gen == gen && p.tx.is_alive())
    }

    fn has_unsent(&self) -> bool {
        self.win.has_unsent(|g| self.is_alive_gen(g))
    }
}

pub(crate) struct ChannelLink {
    pub(super) peer: NodeId,
    pub(super) channel: Channel,
    mesh: Weak<dyn LinkHost>,
    pub(super) st: Mutex<OutState>,
    space: Notify,
    wake: Notify,
    pub(super) bytes_sent: AtomicU64,
    pub(super) messages_sent: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) switches: AtomicU64,
    /// The mesh's count of live link tasks.
    live: Arc<AtomicUsize>,
}

impl ChannelLink {
    pub(super) fn new(
        peer: NodeId,
        channel: Channel,
        mesh: Weak<dyn LinkHost>,
        session: u64,
        live: Arc<AtomicUsize>,
    ) -> ChannelLink {
        ChannelLink {
            peer,
            channel,
            mesh,
            st: Mutex::new(OutState {
                win: SendWindow::new(session),
                pipes: Vec::new(),
                next_gen: 1,
                next_id: 1,
                incarnation: None,
                failures: 0,
                retry_at: None,
                last_error: String::new(),
                ever_connected: false,
                driver_started: false,
                closed: None,
                tasks: Vec::new(),
            }),
            space: Notify::new(),
            wake: Notify::new(),
            bytes_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            switches: AtomicU64::new(0),
            live,
        }
    }

    pub(super) fn kick(self: &Arc<Self>) {
        {
            let mut st = self.st.lock().expect("link lock");
            if st.closed.is_none() && !std::mem::replace(&mut st.driver_started, true) {
                let live = LiveTask::new(&self.live);
                let driver = tokio::spawn(self.clone().drive(live));
                st.track(driver.abort_handle());
            }
        }
        self.wake.notify_one();
    }

    /// Ends the link (its peer left, or moved to another address): every caller waiting on a
    /// reply, or for room in the window, gets [`TransportError::Unreachable`] with `reason`,
    /// later requests get it at once, and the link's tasks are aborted, closing its pipes.
    pub(super) fn close(&self, reason: &str) {
        let tasks = {
            let mut st = self.st.lock().expect("link lock");
            st.closed = Some(reason.to_string());
            let session = st.win.session();
            for mut p in st.win.restart(session) {
                if let Some(tx) = p.reply.take() {
                    let _ = tx.send(Err(TransportError::Unreachable { peer: self.peer, reason: reason.to_string() }));
                }
            }
            st.pipes.clear();
            std::mem::take(&mut st.tasks)
        };
        for t in tasks {
            t.abort();
        }
        self.space.notify_waiters();
    }

    pub(super) async fn enqueue(
        self: &Arc<Self>,
        kind: FrameKind,
        payload: Bytes,
    ) -> Result<PendingReply, TransportError> {
        let mesh = self.mesh.upgrade().ok_or(TransportError::Closed)?;
        let want = mesh.kind(Layer::of(self.channel));
        drop(mesh);
        let len = payload.len();
        let mut payload = Some(payload);
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.st.lock().expect("link lock");
                if let Some(reason) = &st.closed {
                    return Err(TransportError::Unreachable { peer: self.peer, reason: reason.clone() });
                }
                if st.usable(want).is_none() && st.retry_at.is_some_and(|at| Instant::now() < at) {
                    return Err(TransportError::Unreachable {
                        peer: self.peer,
                        reason: format!("backing off after {} failed connects: {}", st.failures, st.last_error),
                    });
                }
                if st.win.fits(len) {
                    let session = st.win.session();
                    let seq = st.win.next_seq();
                    // The oldest unanswered request, this one when it is alone. (One past it when
                    // alone told a receiver that takes up the session there, a restarted
                    // peer's new process, to skip this request.)
                    let ack = st.win.ack();
                    let (tx, rx) = oneshot::channel();
                    let payload = payload.take().expect("payload is taken once");
                    // Fast path: straight onto the current pipe when nothing older waits.
                    let mut sent_on = None;
                    if !st.has_unsent() {
                        if let Some(pipe) = st.current(want) {
                            let frame = Frame::new(kind, self.channel, session, seq, ack, payload.clone());
                            if pipe.tx.out.try_send(frame).is_ok() {
                                sent_on = Some(pipe.gen);
                                self.messages_sent.fetch_add(1, Ordering::Relaxed);
                                self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                            }
                        }
                    }
                    let id = st.next_id;
                    st.next_id += 1;
                    let pushed = st.win.push(len, Pending { id, kind, payload, reply: Some(tx) });
                    assert_eq!(pushed, seq, "the window numbers requests in order");
                    if let Some(gen) = sent_on {
                        st.win.mark_sent(seq, gen);
                    }
                    drop(st);
                    if sent_on.is_none() {
                        self.kick();
                    }
                    let cancel = (kind == FrameKind::Request).then(|| (Arc::downgrade(self), id));
                    return Ok(PendingReply { peer: self.peer, rx, cancel });
                }
            }
            notified.await;
        }
    }

    fn complete(&self, session: u64, seq: u64, result: Result<Bytes, TransportError>) {
        let draining = {
            let mut st = self.st.lock().expect("link lock");
            match st.win.complete(session, seq) {
                Answer::StaleSession => return,
                Answer::Answered(mut p) => {
                    if let Some(tx) = p.reply.take() {
                        let _ = tx.send(result);
                    }
                }
                Answer::Unknown => {}
            }
            st.pipes.len() > 1
        };
        self.space.notify_waiters();
        if draining {
            self.wake.notify_one();
        }
    }

    /// The caller of request `id` gave up on it. Not sent yet: the driver withdraws it when it
    /// comes to it. Sent: a `Cancel` frame goes out before anything sent later on this link.
    fn cancel(self: &Arc<Self>, id: u64) {
        {
            let mut st = self.st.lock().expect("link lock");
            let session = st.win.session();
            let Some(seq) = st.win.find(|p| p.id == id) else { return };
            if !st.win.cancel(session, seq, |p| p.kind == FrameKind::Request) {
                return;
            }
        }
        self.kick();
    }

    /// A new pipe reached process `incarnation` of the peer. If the session's requests went to
    /// another process, the peer restarted: the pipes to the dead process are dropped, and what
    /// is outstanding moves into a new session numbered from 1, which the new process can
    /// follow from its start (requests nobody waits for any more are dropped). What the dead
    /// process had received and not answered is so delivered again: at-least-once across a
    /// receiver crash.
    fn on_incarnation(&self, st: &mut OutState, mesh: &dyn LinkHost, incarnation: u64) {
        let previous = st.incarnation.replace(incarnation);
        if previous.is_none_or(|p| p == incarnation) {
            return;
        }
        for p in &st.pipes {
            p.tx.mark_dead();
        }
        st.pipes.clear();
        let dropped = st.win.renumber(mesh.new_session(), |p| !p.given_up());
        tracing::debug!(
            peer = %self.peer,
            channel = %self.channel,
            resent = st.win.len(),
            dropped = dropped.len(),
            "the peer restarted; outstanding requests go to its new process in a new session"
        );
        self.space.notify_waiters();
    }

    /// A dial failed, or a pipe died before answering anything sent on it (a peer that
    /// accepts the handshake and then drops us, e.g. for a certificate it refuses): back off,
    /// and if no pipe is left, fail what waits rather than resend it forever.
    fn failed(&self, mesh: &dyn LinkHost, reason: String) {
        let mut st = self.st.lock().expect("link lock");
        st.failures = st.failures.saturating_add(1);
        let backoff = BACKOFF_BASE.saturating_mul(1u32 << st.failures.min(16)).min(BACKOFF_MAX);
        st.retry_at = Some(Instant::now() + backoff);
        st.last_error = reason.clone();
        if !st.pipes.iter().any(|p| p.tx.is_alive()) {
            self.fail_all(&mut st, mesh, &reason);
        }
        drop(st);
        self.space.notify_waiters();
    }

    /// A pipe's reader ended. If requests were sent on it and it never answered one (and it
    /// was not stalled), that counts as a failed connect.
    fn pipe_ended(&self, gen: u64, answered: bool, reason: String) {
        let unanswered = {
            let st = self.st.lock().expect("link lock");
            // A stalled pipe is being replaced: its end is no failed connect.
            let stalled = st.pipes.iter().any(|p| p.gen == gen && p.stalled);
            !stalled && st.win.in_flight_on(gen)
        };
        if unanswered && !answered {
            if let Some(mesh) = self.mesh.upgrade() {
                self.failed(&*mesh, reason);
            }
        }
        self.wake.notify_one();
    }

    fn progress(&self) {
        let mut st = self.st.lock().expect("link lock");
        st.failures = 0;
    }

    /// No pipe can be made: every waiting caller is failed and the link starts a new session.
    fn fail_all(&self, st: &mut OutState, mesh: &dyn LinkHost, reason: &str) {
        for mut p in st.win.restart(mesh.new_session()) {
            if let Some(tx) = p.reply.take() {
                let _ = tx.send(Err(TransportError::Unreachable { peer: self.peer, reason: reason.to_string() }));
            }
        }
        st.pipes.clear();
    }

    /// Looks at the live pipes with requests in flight: a silent one gets a `Ping`, and one
    /// that stays silent is marked stalled (the layer is told, so that the next dial does not
    /// reuse its connection), which makes the driver dial a new pipe.
    fn watch(&self, mesh: &dyn LinkHost) {
        let now = clock_ms();
        let mut st = self.st.lock().expect("link lock");
        let busy = st.win.busy_pipes();
        for p in st.pipes.iter_mut().filter(|p| p.tx.is_alive()) {
            if p.watch(self.channel, busy.contains(&p.gen), now) {
                tracing::info!(
                    peer = %self.peer,
                    channel = %self.channel,
                    transport = %p.kind,
                    silent_ms = now.saturating_sub(p.tx.clock.heard()),
                    "a pipe with requests in flight carries nothing back; making a new one"
                );
                mesh.stalled(p.kind, self.peer, p.path);
            }
        }
    }

    /// The link's driver: makes pipes (dial with backoff), moves to the selected layer, sends
    /// what the fast path could not, and closes drained old pipes.
    async fn drive(self: Arc<Self>, _live: LiveTask) {
        loop {
            let Some(mesh) = self.mesh.upgrade() else { return };
            let want = mesh.kind(Layer::of(self.channel));

            // Watch: a pipe that carries nothing back is found out.
            self.watch(&*mesh);

            // Make.
            let dial = {
                let mut st = self.st.lock().expect("link lock");
                if st.closed.is_some() {
                    return;
                }
                let alive_or_needed: Vec<bool> =
                    st.pipes.iter().map(|p| p.tx.is_alive() || st.win.in_flight_on(p.gen)).collect();
                let mut i = 0;
                st.pipes.retain(|_| {
                    i += 1;
                    alive_or_needed[i - 1]
                });
                let backing_off = st.retry_at.is_some_and(|at| Instant::now() < at);
                let has_pipe = st.pipes.iter().any(|p| p.tx.is_alive());
                st.current(want).is_none() && !backing_off && (!st.win.is_empty() || has_pipe)
            };
            if dial {
                match mesh.dial(want, self.peer, self.channel).await {
                    Ok(Dialed { read, write, incarnation, path }) => {
                        let link = Arc::downgrade(&self);
                        // Under the lock, so that a concurrent close either sees these tasks or
                        // is seen here.
                        let mut st = self.st.lock().expect("link lock");
                        if st.closed.is_some() {
                            return;
                        }
                        self.on_incarnation(&mut st, &*mesh, incarnation);
                        // A stalled pipe is replaced: what was in flight on it goes out again
                        // on the new one (the receiver answers a request it has seen from its
                        // reply cache, or when it finishes).
                        for p in st.pipes.iter().filter(|p| p.stalled) {
                            tracing::info!(peer = %self.peer, channel = %self.channel, transport = %p.kind, "a new pipe replaces a stalled one");
                            p.retire();
                        }
                        let (tx, writer) = spawn_writer_task(write, {
                            let link = link.clone();
                            let live = LiveTask::new(&self.live);
                            move || {
                                drop(live);
                                if let Some(l) = link.upgrade() {
                                    l.wake.notify_one();
                                }
                            }
                        });
                        st.track(writer.clone());
                        let gen = st.next_gen;
                        st.next_gen += 1;
                        let read: BoxRead = Box::new(Heard::new(read, tx.clock.clone()));
                        let reader =
                            spawn_reply_reader(link, self.peer, gen, read, tx.clone(), LiveTask::new(&self.live));
                        st.track(reader.clone());
                        let switching = st.pipes.iter().any(|p| p.tx.is_alive() && p.kind != want);
                        st.pipes.push(OutPipe {
                            gen,
                            kind: want,
                            tx,
                            path,
                            ping: None,
                            stalled: false,
                            tasks: [writer, reader],
                        });
                        if switching {
                            self.switches.fetch_add(1, Ordering::Relaxed);
                        } else if st.ever_connected {
                            self.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        st.ever_connected = true;
                        st.retry_at = None;
                    }
                    Err(reason) => {
                        tracing::debug!(peer = %self.peer, channel = %self.channel, %reason, "dial failed");
                        self.failed(&*mesh, reason);
                    }
                }
            }

            // Send what waits, in sequence order, on the pipe requests go to now.
            loop {
                let target = {
                    let st = self.st.lock().expect("link lock");
                    if !st.has_unsent() {
                        None
                    } else {
                        st.usable(want).map(|p| (p.gen, p.tx.clone()))
                    }
                };
                let Some((gen, tx)) = target else { break };
                let Ok(permit) = tx.out.reserve().await else {
                    tx.mark_dead();
                    continue;
                };
                let mut st = self.st.lock().expect("link lock");
                let ack = st.win.ack();
                let session = st.win.session();
                if let Some(seq) = st.win.pop_cancel() {
                    // Before any request still to send: the receiver sees the cancel first.
                    permit.send(Frame::new(FrameKind::Cancel, self.channel, session, seq, ack, Bytes::new()));
                    continue;
                }
                let alive: Vec<u64> = st.pipes.iter().filter(|p| p.tx.is_alive()).map(|p| p.gen).collect();
                let Some(seq) = st.win.next_unsent(|g| alive.contains(&g)) else { break };
                let p = st.win.get_mut(seq).expect("an unsent request is outstanding");
                let withdraw = p.given_up() && !p.payload.is_empty();
                if withdraw {
                    // The caller gave up on this request before it went out (it was queued, or
                    // its pipe died): it is withdrawn. Its number still travels, with an empty
                    // payload that every handler refuses, so the receiver's sequence has no gap
                    // and a request nobody waits for is never carried out late.
                    p.payload = Bytes::new();
                }
                permit.send(Frame::new(p.kind, self.channel, session, seq, ack, p.payload.clone()));
                let sent_bytes = p.payload.len() as u64;
                st.win.mark_sent(seq, gen);
                self.messages_sent.fetch_add(1, Ordering::Relaxed);
                self.bytes_sent.fetch_add(sent_bytes, Ordering::Relaxed);
                if withdraw {
                    st.win.withdraw(seq);
                    self.space.notify_waiters();
                }
            }

            // Break: an old pipe with nothing left in flight is closed.
            let (draining, watching) = {
                let mut st = self.st.lock().expect("link lock");
                let current = st.usable(want).map(|p| p.gen);
                let busy = st.win.busy_pipes();
                st.pipes.retain(|p| Some(p.gen) == current || busy.contains(&p.gen));
                (st.pipes.len() > 1 || st.retry_at.is_some(), !busy.is_empty())
            };
            drop(mesh);
            let tick = if draining {
                Duration::from_millis(20)
            } else if watching {
                WATCH_TICK
            } else {
                Duration::from_secs(1)
            };
            let _ = tokio::time::timeout(tick, self.wake.notified()).await;
        }
    }
}

fn spawn_reply_reader(
    link: Weak<ChannelLink>,
    peer: NodeId,
    gen: u64,
    read: BoxRead,
    tx: PipeTx,
    live: LiveTask,
) -> tokio::task::AbortHandle {
    let task = tokio::spawn(async move {
        let _live = live;
        let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, read);
        let mut answered = false;
        let reason = loop {
            let frame = match read_frame(&mut r).await {
                Ok(Some(f)) => f,
                Ok(None) => break "connection closed by the peer".to_string(),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "link pipe read failed");
                    break format!("connection failed: {e}");
                }
            };
            let Some(l) = link.upgrade() else { return };
            if !answered {
                answered = true;
                l.progress();
            }
            match frame.kind {
                // Its bytes were heard; that is all it is for.
                FrameKind::Pong => {}
                FrameKind::Response => l.complete(frame.session, frame.seq, Ok(frame.payload)),
                FrameKind::Error => {
                    let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                    l.complete(frame.session, frame.seq, Err(TransportError::Remote { peer, reason }));
                }
                other => {
                    tracing::warn!(%peer, kind = ?other, "unexpected frame from a server; closing the pipe");
                    break format!("protocol error: unexpected {other:?} frame");
                }
            }
        };
        tx.mark_dead();
        if let Some(l) = link.upgrade() {
            l.pipe_ended(gen, answered, reason);
        }
    });
    task.abort_handle()
}
