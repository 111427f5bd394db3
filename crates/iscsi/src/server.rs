//! The tokio driver: sockets in, [`crate::login`], [`crate::discovery`] and `tandem-scsi`
//! decide, the [`Volume`] does the I/O.
//!
//! One connection is one session (MaxConnections=1, ErrorRecoveryLevel 0) and three kinds of
//! task: the reader (this connection's loop: it decodes every PDU, keeps the CmdSN window,
//! gathers the data-out of writes with R2T and decides each command with
//! [`LogicalUnit::plan`]), one task per command running against the volume, and the writer,
//! which alone owns the socket's write half and the StatSN counter. Every PDU goes out whole
//! through the writer's bounded queue, so a command task cancelled by a task management
//! function can never leave half a PDU on the wire.
//!
//! Memory per connection is bounded by constants and by the negotiation: commands in flight by
//! the CmdSN window ([`TargetConfig::command_window`], MaxCmdSN only advances as commands
//! finish) plus [`IMMEDIATE_INFLIGHT_MAX`]; write data held at once by
//! [`WRITE_BUFFER_BYTES_MAX`] (taken before a command's data is asked for, so a full budget
//! stops the reader and TCP pushes back); reads stream through [`READ_CHUNK_BYTES`] pieces
//! drawn from the shared [`Budgets::read_buffers`], sent as Data-In PDUs of at most the
//! initiator's MaxRecvDataSegmentLength; the writer's queue by [`OUTGOING_QUEUE_PDUS`] PDUs.
//!
//! Authentication is CHAP ([`crate::chap`]) for the initiators [`Targets::chap`] has
//! credentials for, and for all when [`Targets::chap_required`]; others log in with
//! AuthMethod=None. Each login gets a fresh challenge from the system's random source. Once
//! authenticated, every initiator may use every target: access control comes with host
//! identities.
//!
//! What it does not do yet, and says so: several connections per session, and error recovery
//! above level 0 (a digest or sequence error ends the connection; the initiator logs in again).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ring::rand::{SecureRandom, SystemRandom};
use tandem_frontend::{Budgets, IoError, OpenError, Volume};
use tandem_reservations::Attention;
use tandem_scsi::lu::{
    absent_lun, compare, decode_lun, failure_for, Access, Direction, Failure, Io, LogicalUnit, Nexus, Plan, Reply,
    UnitAttention,
};
use tandem_scsi::sense::{asc, Sense, SenseKey, Status};
use thiserror::Error;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod copy;

use crate::chap::{Chap, ChapCredentials};
use crate::discovery::{DiscoveryResponder, DiscoveryTarget, SeqNumbers};
use crate::login::{LoginHooks, LoginMachine, LoginOutcome, SessionParams, SessionType, TargetConfig};
use crate::pdu::{
    decode, logout_response, parse_bhs, reject_reason, scsi_response, tmf_function, tmf_response, DataIn, DataOut,
    DecodeLimits, Digests, LogoutRequest, LogoutResponse, NopIn, NopOut, Pdu, PduError, R2t, Reject, Residual,
    ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, TextRequest, BHS_BYTES, RESERVED_TAG,
};

/// Largest piece of a read held in memory: longer reads are read and sent piece by piece.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Write data (and other data-out) one connection holds at once: two maximal transfers of
/// the logical unit's default limits (8 MiB each).
pub const WRITE_BUFFER_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Immediate commands (I bit: outside the CmdSN window) running at once per connection; the
/// reader waits for one to finish before taking the next.
pub const IMMEDIATE_INFLIGHT_MAX: usize = 8;
/// PDUs queued for the writer; a command task waits when it is full.
pub const OUTGOING_QUEUE_PDUS: usize = 32;
/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 128;
/// A login not finished by then is dropped, so stalled logins cannot hold connection slots.
pub const LOGIN_TIMEOUT_MS: u64 = 30_000;
/// After this long without a PDU from the initiator the target sends a NOP-In ping...
pub const NOP_INTERVAL_MS: u64 = 10_000;
/// ...and closes the connection when nothing has come this long after the ping.
pub const NOP_TIMEOUT_MS: u64 = 15_000;
/// Pause after a failed accept (for example, out of file descriptors) before the next one.
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;
/// Bytes of a NOP-Out's ping data echoed back (RFC 7143 §11.18: the target echoes it).
const NOP_ECHO_BYTES_MAX: usize = 4096;
/// Bytes of the random CHAP challenge of each login: 128 bits, as long as an MD5 response
/// (and [`crate::chap::CHALLENGE_BYTES_MIN`]).
pub const CHAP_CHALLENGE_BYTES: usize = 16;

/// Why a connection ended other than by a logout.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("initiator closed the connection in the middle of a PDU")]
    Truncated,
    #[error("login not finished within {LOGIN_TIMEOUT_MS} ms")]
    LoginTimeout,
    #[error("login failed with status {class:#04x}{detail:02x}")]
    LoginFailed { class: u8, detail: u8 },
    #[error("PDU: {0}")]
    Pdu(#[from] PduError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no PDU from the initiator for {0} ms, NOP-In ping unanswered")]
    NopTimeout(u64),
    #[error("target {0}: {1}")]
    Open(String, OpenError),
    #[error("access revoked: {0}")]
    Revoked(String),
}

/// One logical unit as a session sees it: the volume, what it answers as a SCSI disk, and the
/// ALUA state of this port for it. When the access state changes, the next command of every
/// session gets the ASYMMETRIC ACCESS STATE CHANGED unit attention.
pub struct Lun<V> {
    pub volume: V,
    pub unit: LogicalUnit,
    pub access: watch::Receiver<Access>,
}

/// What a portal serves: its targets, each with one logical unit (LUN 0).
pub trait Targets: Send + Sync + 'static {
    type Volume: Volume;

    /// The targets and their portals that SendTargets reports to `initiator`.
    fn discovery(&self, initiator: &str) -> Vec<DiscoveryTarget>;

    /// Whether `target` names a target of this portal (checked during login).
    fn exists(&self, target: &str) -> bool;

    /// The CHAP credentials of `initiator` (its InitiatorName), for its discovery and normal
    /// sessions alike: an initiator that has some must authenticate with CHAP, and mutual CHAP
    /// is open to it when they include the target's. Asked a few times during each login, on
    /// the connection's task: answer from memory. Credentials that fail
    /// [`ChapCredentials::validate`] fail the login. None by default: no initiator has any.
    fn chap(&self, initiator: &str) -> Option<ChapCredentials> {
        let _ = initiator;
        None
    }

    /// Whether an initiator without CHAP credentials is refused (login status 0x0201) rather
    /// than let in with AuthMethod=None. Asked once per login; `false` by default.
    fn chap_required(&self) -> bool {
        false
    }

    /// Whether `initiator` may log in to `target` (else the login fails with 0x0202
    /// "Authorization failure"). Asked once authentication has succeeded. Everyone, by default.
    fn allowed(&self, target: &str, initiator: &str) -> bool {
        let _ = (target, initiator);
        true
    }

    /// Opens the logical unit of `target` for a session of `initiator`, whose initiator port
    /// (the I_T nexus's initiator side, `name,i,0x<ISID>`) is `initiator_port`.
    fn open(
        &self,
        target: &str,
        initiator: &str,
        initiator_port: &str,
    ) -> impl Future<Output = Result<Lun<Self::Volume>, OpenError>> + Send;

    /// A LOGICAL UNIT RESET or TARGET WARM RESET of `target` came in through this portal, and
    /// its sessions here have been told: tell those through other portals of the same logical
    /// unit before the reset is answered ([`Sessions::report_reset`] there). Nothing by default.
    fn reset(&self, target: &str) -> impl Future<Output = ()> + Send {
        let _ = target;
        async {}
    }
}

/// What the sessions of one portal share: TSIHs, and every session's nexus state by target,
/// so that a reset through one session is reported to the others (and, through
/// [`Sessions::report_reset`], a reset through another node's portal).
#[derive(Default)]
pub struct Sessions {
    tsihs: AtomicU16,
    nexuses: StdMutex<HashMap<String, Vec<Weak<StdMutex<Nexus>>>>>,
}

impl Sessions {
    fn register(&self, target: &str, nexus: &Arc<StdMutex<Nexus>>) {
        let mut nexuses = lock(&self.nexuses);
        let list = nexuses.entry(target.to_string()).or_default();
        list.retain(|n| n.strong_count() > 0);
        list.push(Arc::downgrade(nexus));
    }

    /// A logical unit reset of `target` happened elsewhere (through another node's portal):
    /// every session of it here learns of it from its next command.
    pub fn report_reset(&self, target: &str) {
        self.raise_all(target, UnitAttention::PowerOnReset);
    }

    /// Raises `ua` on every session's nexus of `target`.
    fn raise_all(&self, target: &str, ua: UnitAttention) {
        let nexuses = lock(&self.nexuses);
        for nexus in nexuses.get(target).into_iter().flatten().filter_map(Weak::upgrade) {
            lock(&nexus).raise(ua);
        }
    }
}

/// Accepts initiators on `listener` until `shutdown` completes, at most [`CONNECTIONS_MAX`] at
/// a time, each in its own task. Errors of a connection are logged, not returned.
pub async fn serve<T: Targets>(
    listener: TcpListener,
    targets: Arc<T>,
    config: Arc<TargetConfig>,
    budgets: Budgets,
    portal: Arc<Sessions>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(joined) = connections.join_next() => {
                if let Err(err) = joined {
                    if err.is_panic() {
                        tracing::error!(error = %err, "iSCSI connection task panicked");
                    }
                }
                continue;
            }
            // Waiting for a slot and then for a connection is one future, so that a shutdown
            // stops the wait for a connection too.
            accepted = accept_with_slot(&listener, &slots) => accepted,
        };
        let (stream, peer, slot) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "iSCSI accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        if let Err(err) = stream.set_nodelay(true) {
            warn!(%peer, error = %err, "could not set TCP_NODELAY");
        }
        let (targets, config, budgets, portal) =
            (Arc::clone(&targets), Arc::clone(&config), budgets.clone(), Arc::clone(&portal));
        connections.spawn(async move {
            let _slot = slot;
            debug!(%peer, "iSCSI initiator connected");
            match serve_connection(stream, targets, config, budgets, portal).await {
                Ok(()) => debug!(%peer, "iSCSI connection closed"),
                Err(err) => info!(%peer, error = %err, "iSCSI connection closed on error"),
            }
        });
    }
    info!(connections = connections.len(), "iSCSI server shutting down");
    connections.shutdown().await;
}

async fn accept_with_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> io::Result<(tokio::net::TcpStream, std::net::SocketAddr, OwnedSemaphorePermit)> {
    let slot = Arc::clone(slots).acquire_owned().await.expect("the slot semaphore is never closed");
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, slot))
}

/// The login's questions, answered from the portal's targets.
struct Hooks<'a, T> {
    targets: &'a T,
    tsihs: &'a AtomicU16,
}

impl<T: Targets> LoginHooks for Hooks<'_, T> {
    fn target_known(&self, target_name: &str) -> bool {
        self.targets.exists(target_name)
    }

    fn initiator_allowed(&self, initiator_name: &str, target_name: &str) -> bool {
        self.targets.allowed(target_name, initiator_name)
    }

    fn allocate_tsih(&mut self, _initiator_name: &str, _isid: crate::pdu::Isid) -> Option<NonZeroU16> {
        loop {
            let tsih = self.tsihs.fetch_add(1, Ordering::Relaxed);
            if let Some(tsih) = NonZeroU16::new(tsih) {
                return Some(tsih);
            }
        }
    }
}

/// Serves one initiator connection: login, then a discovery or a normal session until logout.
pub async fn serve_connection<S, T>(
    stream: S,
    targets: Arc<T>,
    config: Arc<TargetConfig>,
    budgets: Budgets,
    portal: Arc<Sessions>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: Targets,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(64 * 1024, read_half);
    let mut writer = BufWriter::with_capacity(64 * 1024, write_half);
    let login = login(&mut reader, &mut writer, &*targets, &config, &portal.tsihs);
    let params = match tokio::time::timeout(Duration::from_millis(LOGIN_TIMEOUT_MS), login).await {
        Err(_) => return Err(ConnectionError::LoginTimeout),
        Ok(Err(err)) => return Err(err),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(params))) => params,
    };
    let limits = DecodeLimits { digests: params.digests, data_segment_bytes_max: config.max_recv_data_segment_bytes };
    match params.session_type {
        SessionType::Discovery => {
            debug!(
                initiator = %params.initiator_name,
                authentication = %params.authentication,
                "iSCSI discovery session starts"
            );
            discovery_session(reader, writer, &*targets, &params, &config, limits).await
        }
        SessionType::Normal => {
            let target = params.target_name.clone().unwrap_or_default();
            let initiator_port = initiator_port_name(&params.initiator_name, params.isid);
            let lun = targets
                .open(&target, &params.initiator_name, &initiator_port)
                .await
                .map_err(|err| ConnectionError::Open(target.clone(), err))?;
            info!(
                initiator = %params.initiator_name,
                %target,
                tsih = params.tsih,
                authentication = %params.authentication,
                "iSCSI session starts"
            );
            normal_session(reader, writer, targets, lun, params, config, limits, budgets, portal).await
        }
    }
}

/// The iSCSI initiator port name of a session (RFC 7143 §4.2.7.1, as SPC-4's TransportID
/// format 01b carries it): the initiator name, `,i,0x` and the ISID in hex.
pub fn initiator_port_name(initiator: &str, isid: crate::pdu::Isid) -> String {
    let hex: String = isid.0.iter().map(|b| format!("{b:02x}")).collect();
    format!("{initiator},i,0x{hex}")
}

/// Reads one PDU; `None` when the initiator closed the connection between PDUs.
async fn read_pdu<R: AsyncRead + Unpin>(reader: &mut R, limits: &DecodeLimits) -> Result<Option<Pdu>, ConnectionError> {
    let mut bhs = [0u8; BHS_BYTES];
    match reader.read_exact(&mut bhs[..1]).await {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    reader.read_exact(&mut bhs[1..]).await.map_err(eof_is_truncated)?;
    let info = parse_bhs(&bhs, limits)?;
    let mut rest = BytesMut::zeroed(info.rest_bytes);
    reader.read_exact(&mut rest).await.map_err(eof_is_truncated)?;
    Ok(Some(decode(&bhs, rest.freeze(), limits)?))
}

fn eof_is_truncated(err: io::Error) -> ConnectionError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ConnectionError::Truncated
    } else {
        ConnectionError::Io(err)
    }
}

async fn send_now<W: AsyncWrite + Unpin>(writer: &mut W, pdu: &Pdu, digests: Digests) -> io::Result<()> {
    let mut wire = Vec::new();
    pdu.encode(digests, &mut wire);
    writer.write_all(&wire).await?;
    writer.flush().await
}

/// The login phase; `None` when the initiator went away before it completed.
async fn login<R, W, T>(
    reader: &mut R,
    writer: &mut W,
    targets: &T,
    config: &Arc<TargetConfig>,
    tsihs: &AtomicU16,
) -> Result<Option<SessionParams>, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    T: Targets,
{
    let (identifier, challenge) = chap_challenge()?;
    let chap = Chap::new(|initiator: &str| targets.chap(initiator), targets.chap_required(), identifier, challenge);
    let mut machine = LoginMachine::new(Arc::clone(config), chap, 1);
    let mut hooks = Hooks { targets, tsihs };
    loop {
        let response = match read_pdu(reader, &DecodeLimits::LOGIN).await {
            Ok(None) => return Ok(None),
            Ok(Some(Pdu::LoginRequest(request))) => machine.on_request(&request, &mut hooks),
            Ok(Some(other)) => machine.on_invalid_pdu(other.itt()),
            Err(ConnectionError::Pdu(err)) if err.itt().is_some() => machine.on_invalid_pdu(err.itt().unwrap_or(0)),
            Err(err) => return Err(err),
        };
        send_now(writer, &Pdu::LoginResponse(response), Digests::NONE).await?;
        match machine.outcome() {
            LoginOutcome::InProgress => {}
            LoginOutcome::Failed(status) => {
                return Err(ConnectionError::LoginFailed { class: status.class, detail: status.detail })
            }
            LoginOutcome::Complete(_) => return Ok(machine.into_session_params()),
        }
    }
}

/// A CHAP identifier and challenge for one login, from the system's random source: predictable
/// ones would let a recorded response be replayed.
fn chap_challenge() -> io::Result<(u8, Vec<u8>)> {
    let mut bytes = [0u8; 1 + CHAP_CHALLENGE_BYTES];
    SystemRandom::new().fill(&mut bytes).map_err(|_| io::Error::other("the system's random source failed"))?;
    Ok((bytes[0], bytes[1..].to_vec()))
}

/// A discovery session: SendTargets, NOP and logout; anything else is rejected.
async fn discovery_session<R, W, T>(
    mut reader: R,
    mut writer: W,
    targets: &T,
    params: &SessionParams,
    config: &TargetConfig,
    limits: DecodeLimits,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    T: Targets,
{
    let mut responder = DiscoveryResponder::new(params.initiator_max_recv_data_segment_bytes);
    let mut stat_sn = params.stat_sn;
    let mut exp_cmd_sn = params.exp_cmd_sn;
    let window = config.command_window;
    let digests = params.digests;
    loop {
        let pdu = match tokio::time::timeout(
            Duration::from_millis(NOP_INTERVAL_MS + NOP_TIMEOUT_MS),
            read_pdu(&mut reader, &limits),
        )
        .await
        {
            Err(_) => return Err(ConnectionError::NopTimeout(NOP_INTERVAL_MS + NOP_TIMEOUT_MS)),
            Ok(pdu) => pdu,
        };
        let pdu = match pdu {
            Ok(None) => return Ok(()),
            Ok(Some(pdu)) => pdu,
            Err(ConnectionError::Pdu(err)) => match err.reject_reason() {
                Some(reason) if !matches!(err, PduError::DataSegmentTooLong { .. }) => {
                    let seq = SeqNumbers { stat_sn, exp_cmd_sn, max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1) };
                    send_now(&mut writer, &reject(reason, seq, Bytes::new()), digests).await?;
                    continue;
                }
                _ => return Err(err.into()),
            },
            Err(err) => return Err(err),
        };
        let immediate = match &pdu {
            Pdu::TextRequest(r) => r.immediate,
            Pdu::NopOut(r) => r.immediate,
            Pdu::LogoutRequest(r) => r.immediate,
            _ => true,
        };
        if !immediate {
            exp_cmd_sn = exp_cmd_sn.wrapping_add(1);
        }
        let seq = SeqNumbers { stat_sn, exp_cmd_sn, max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1) };
        let (response, last) = match pdu {
            Pdu::TextRequest(request) => {
                let listed = targets.discovery(&params.initiator_name);
                match responder.on_request(&request, &listed, seq) {
                    Ok(response) => (Pdu::TextResponse(response), false),
                    Err(err) => {
                        warn!(error = %err, "discovery text request refused");
                        (reject(err.reject_reason(), seq, Bytes::new()), false)
                    }
                }
            }
            Pdu::NopOut(nop) if nop.itt != RESERVED_TAG => (Pdu::NopIn(nop_echo(&nop, seq)), false),
            Pdu::NopOut(_) => continue,
            Pdu::LogoutRequest(request) => (Pdu::LogoutResponse(logout(&request, seq)), true),
            _ => (reject(reject_reason::PROTOCOL_ERROR, seq, Bytes::new()), false),
        };
        // Every answer here carries a status number of its own, a Reject too (as Linux's
        // target counts them).
        stat_sn = stat_sn.wrapping_add(1);
        send_now(&mut writer, &response, digests).await?;
        if last {
            let _ = writer.shutdown().await;
            return Ok(());
        }
    }
}

fn reject(reason: u8, seq: SeqNumbers, header: Bytes) -> Pdu {
    Pdu::Reject(Reject {
        reason,
        stat_sn: seq.stat_sn,
        exp_cmd_sn: seq.exp_cmd_sn,
        max_cmd_sn: seq.max_cmd_sn,
        data_sn_or_r2t_sn: 0,
        data: header,
    })
}

fn nop_echo(nop: &NopOut, seq: SeqNumbers) -> NopIn {
    let mut data = nop.data.clone();
    data.truncate(NOP_ECHO_BYTES_MAX);
    NopIn {
        lun: nop.lun,
        itt: nop.itt,
        ttt: RESERVED_TAG,
        stat_sn: seq.stat_sn,
        exp_cmd_sn: seq.exp_cmd_sn,
        max_cmd_sn: seq.max_cmd_sn,
        data,
    }
}

fn logout(request: &LogoutRequest, seq: SeqNumbers) -> LogoutResponse {
    LogoutResponse {
        response: logout_response::CLOSED,
        itt: request.itt,
        stat_sn: seq.stat_sn,
        exp_cmd_sn: seq.exp_cmd_sn,
        max_cmd_sn: seq.max_cmd_sn,
        time2wait_s: 0,
        time2retain_s: 0,
    }
}

/// The CmdSN window, shared by the reader (which advances ExpCmdSN) and the command tasks
/// (whose completion reopens it): MaxCmdSN = ExpCmdSN - 1 + (window - commands in flight), so
/// it never goes back and never lets the initiator queue more than the window.
struct Window {
    exp_cmd_sn: u32,
    inflight: u32,
    size: u32,
}

impl Window {
    fn seq(&self, stat_sn: u32) -> SeqNumbers {
        SeqNumbers {
            stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.exp_cmd_sn.wrapping_sub(1).wrapping_add(self.size - self.inflight),
        }
    }

    /// Whether `cmd_sn` is the next command in the window.
    fn admits(&self, cmd_sn: u32) -> bool {
        cmd_sn == self.exp_cmd_sn && self.inflight < self.size
    }
}

type SharedWindow = Arc<StdMutex<Window>>;

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the writer is asked to send. The writer fills in StatSN (for PDUs that carry a
/// status), ExpCmdSN and MaxCmdSN at the moment it sends.
enum Outgoing {
    Pdu {
        pdu: Pdu,
        takes_stat_sn: bool,
    },
    /// Closes the connection after everything queued before it.
    Close,
}

/// Sends every PDU the session produces, in queue order.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: BufWriter<W>,
    mut queue: mpsc::Receiver<Outgoing>,
    window: SharedWindow,
    mut stat_sn: u32,
    digests: Digests,
) -> io::Result<()> {
    let mut wire = Vec::with_capacity(64 * 1024);
    while let Some(outgoing) = queue.recv().await {
        let (mut pdu, takes_stat_sn) = match outgoing {
            Outgoing::Pdu { pdu, takes_stat_sn } => (pdu, takes_stat_sn),
            Outgoing::Close => break,
        };
        let seq = lock(&window).seq(stat_sn);
        stamp(&mut pdu, seq);
        if takes_stat_sn {
            stat_sn = stat_sn.wrapping_add(1);
        }
        wire.clear();
        pdu.encode(digests, &mut wire);
        writer.write_all(&wire).await?;
        if queue.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    writer.shutdown().await
}

fn stamp(pdu: &mut Pdu, seq: SeqNumbers) {
    let stat_sn = seq.stat_sn;
    let (s, e, m) = match pdu {
        Pdu::NopIn(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::ScsiResponse(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::TaskMgmtResponse(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::TextResponse(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::DataIn(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::LogoutResponse(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::R2t(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::AsyncMessage(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        Pdu::Reject(p) => (&mut p.stat_sn, &mut p.exp_cmd_sn, &mut p.max_cmd_sn),
        _ => return,
    };
    // A PDU without a status of its own carries the next StatSN (RFC 7143 §11.7.4, §11.8.3).
    *s = stat_sn;
    *e = seq.exp_cmd_sn;
    *m = seq.max_cmd_sn;
}

/// A handle on the writer for the tasks of a session.
#[derive(Clone)]
struct Out {
    queue: mpsc::Sender<Outgoing>,
    /// Commands whose status is queued: ABORT TASK answers "task does not exist" for them,
    /// since the initiator gets their status anyway.
    answered: Arc<StdMutex<HashSet<u32>>>,
}

impl Out {
    /// Queues a PDU; `false` when the writer is gone (the connection is closing).
    async fn send(&self, pdu: Pdu, takes_stat_sn: bool) -> bool {
        let status_of = match &pdu {
            Pdu::ScsiResponse(p) => Some(p.itt),
            Pdu::DataIn(p) if p.status.is_some() => Some(p.itt),
            _ => None,
        };
        let sent = self.queue.send(Outgoing::Pdu { pdu, takes_stat_sn }).await.is_ok();
        // No await between the send and this: a task aborted before its status was queued
        // is never marked.
        if let (true, Some(itt)) = (sent, status_of) {
            lock(&self.answered).insert(itt);
        }
        sent
    }
}

/// The session state command tasks share.
struct Session<V> {
    lun: LunState<V>,
    out: Out,
    window: SharedWindow,
    read_budget: Arc<tandem_frontend::BufferBudget>,
    /// The largest Data-In segment the initiator takes.
    data_in_segment_bytes: usize,
    /// Data-In PDUs of one sequence (MaxBurstLength), after which F is set.
    burst_bytes: usize,
}

struct LunState<V> {
    volume: V,
    unit: LogicalUnit,
    nexus: Arc<StdMutex<Nexus>>,
    /// The third-party copy operations this session (its I_T nexus) finished.
    copies: StdMutex<tandem_scsi::tpc::Operations>,
}

/// A command whose data-out is being gathered.
struct Transfer {
    command: ScsiCommand,
    io: Io,
    /// Bytes of data-out the command takes: what the CDB needs, cut to the EDTL.
    wanted: usize,
    data: BytesMut,
    /// Offsets below this are covered by unsolicited data or by R2Ts already sent.
    requested: usize,
    /// Unsolicited Data-Out still expected (the command's F bit was clear).
    unsolicited_open: bool,
    unsolicited_data_sn: u32,
    /// Outstanding R2Ts: TTT → (offset, length, next DataSN, bytes received).
    r2ts: HashMap<u32, R2tState>,
    r2t_sn: u32,
    /// Whether the command counts in the CmdSN window.
    windowed: bool,
    _budget: OwnedSemaphorePermit,
}

struct R2tState {
    offset: usize,
    len: usize,
    data_sn: u32,
    received: usize,
}

/// The normal session's reader loop and its tasks.
#[allow(clippy::too_many_arguments)]
async fn normal_session<R, W, T>(
    mut reader: R,
    writer: BufWriter<W>,
    targets: Arc<T>,
    lun: Lun<T::Volume>,
    params: SessionParams,
    config: Arc<TargetConfig>,
    limits: DecodeLimits,
    budgets: Budgets,
    portal: Arc<Sessions>,
) -> Result<(), ConnectionError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    T: Targets,
{
    let window: SharedWindow =
        Arc::new(StdMutex::new(Window { exp_cmd_sn: params.exp_cmd_sn, inflight: 0, size: config.command_window }));
    let (queue, outgoing) = mpsc::channel(OUTGOING_QUEUE_PDUS);
    let writer_task = tokio::spawn(write_loop(writer, outgoing, Arc::clone(&window), params.stat_sn, params.digests));
    let out = Out { queue, answered: Arc::default() };
    let Lun { volume, unit, access: mut access_rx } = lun;
    let nexus = Arc::new(StdMutex::new(Nexus::default()));
    let target = params.target_name.clone().unwrap_or_default();
    portal.register(&target, &nexus);
    let session = Arc::new(Session {
        lun: LunState { volume, unit, nexus, copies: StdMutex::default() },
        out: out.clone(),
        window: Arc::clone(&window),
        read_budget: Arc::clone(&budgets.read_buffers),
        data_in_segment_bytes: (params.initiator_max_recv_data_segment_bytes as usize).clamp(512, 16 * 1024 * 1024),
        burst_bytes: (params.max_burst_bytes as usize).max(512),
    });
    access_rx.mark_unchanged();
    let mut reader_state = Reader {
        session,
        portal,
        target,
        params,
        targets,
        access: access_rx,
        tasks: HashMap::new(),
        transfers: HashMap::new(),
        write_budget: Arc::new(Semaphore::new(WRITE_BUFFER_BYTES_MAX)),
        immediate: Arc::new(Semaphore::new(IMMEDIATE_INFLIGHT_MAX)),
        next_ttt: 1,
        text: None,
        last_heard: Instant::now(),
        ping_sent: false,
    };
    let revocable = Arc::clone(&reader_state.session);
    let result = tokio::select! {
        result = reader_state.run(&mut reader, &limits) => result,
        // The initiator lost access to the volume: the session ends, as if the connection
        // dropped (the initiator logs in again, and is refused).
        reason = revocable.lun.volume.revoked() => Err(ConnectionError::Revoked(reason)),
    };
    drop(revocable);
    // The initiator is gone or logged out: commands still running are cancelled (a write it
    // gave up on must not land later, after it wrote the same blocks through another path).
    for (_, task) in reader_state.tasks.drain() {
        task.abort();
        let _ = task.await;
    }
    let _ = out.queue.send(Outgoing::Close).await;
    drop(reader_state);
    drop(out);
    match writer_task.await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(err)) => debug!(error = %err, "iSCSI writer ended on a socket error"),
    }
    result
}

struct Reader<T: Targets> {
    session: Arc<Session<T::Volume>>,
    portal: Arc<Sessions>,
    target: String,
    params: SessionParams,
    targets: Arc<T>,
    access: watch::Receiver<Access>,
    /// Running commands by ITT.
    tasks: HashMap<u32, JoinHandle<()>>,
    transfers: HashMap<u32, Transfer>,
    write_budget: Arc<Semaphore>,
    immediate: Arc<Semaphore>,
    next_ttt: u32,
    text: Option<DiscoveryResponder>,
    last_heard: Instant,
    ping_sent: bool,
}

enum Next {
    Continue,
    Logout,
}

impl<T: Targets> Reader<T> {
    async fn run<R: AsyncBufRead + Unpin>(
        &mut self,
        reader: &mut R,
        limits: &DecodeLimits,
    ) -> Result<(), ConnectionError> {
        loop {
            let answered = &self.session.out.answered;
            self.tasks.retain(|itt, task| {
                let running = !task.is_finished();
                if !running {
                    lock(answered).remove(itt);
                }
                running
            });
            let deadline = self.last_heard
                + Duration::from_millis(if self.ping_sent {
                    NOP_INTERVAL_MS + NOP_TIMEOUT_MS
                } else {
                    NOP_INTERVAL_MS
                });
            // Wait for the first byte of a PDU (cancel-safe: nothing is consumed), then read the
            // whole PDU outside the select so a timer never cuts one in half.
            let ready = tokio::select! {
                filled = reader.fill_buf() => filled.map(|buf| !buf.is_empty()),
                () = tokio::time::sleep_until(deadline) => {
                    if self.ping_sent {
                        return Err(ConnectionError::NopTimeout(NOP_INTERVAL_MS + NOP_TIMEOUT_MS));
                    }
                    self.ping_sent = true;
                    let ping = NopIn { lun: 0, itt: RESERVED_TAG, ttt: self.ttt(), stat_sn: 0, exp_cmd_sn: 0, max_cmd_sn: 0, data: Bytes::new() };
                    if !self.session.out.send(Pdu::NopIn(ping), false).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let pdu = match ready {
                Ok(true) => read_pdu(reader, limits).await,
                Ok(false) => Ok(None),
                Err(err) => Err(err.into()),
            };
            self.last_heard = Instant::now();
            self.ping_sent = false;
            let pdu = match pdu {
                Ok(Some(pdu)) => pdu,
                Ok(None) => return Ok(()),
                Err(ConnectionError::Pdu(err)) => {
                    let fatal = matches!(
                        err,
                        PduError::HeaderDigest { .. }
                            | PduError::WrongLength { .. }
                            | PduError::DataSegmentTooLong { .. }
                    );
                    // A Data-Out with a bad digest lost data that ErrorRecoveryLevel 0 does not
                    // ask for again: its command fails (the initiator retries it), the
                    // connection, whose framing is sound, goes on.
                    if let PduError::DataDigest { opcode: crate::pdu::opcode::DATA_OUT, itt, .. } = err {
                        warn!(error = %err, "iSCSI Data-Out failed its digest");
                        self.fail_transfer(itt, asc::PROTOCOL_SERVICE_CRC_ERROR);
                        continue;
                    }
                    if let Some(reason) = err.reject_reason() {
                        let _ = self.session.out.send(reject(reason, SeqNumbers::default(), Bytes::new()), true).await;
                    }
                    if fatal {
                        return Err(err.into());
                    }
                    warn!(error = %err, "iSCSI PDU rejected");
                    continue;
                }
                Err(err) => return Err(err),
            };
            match self.on_pdu(pdu).await? {
                Next::Continue => {}
                Next::Logout => return Ok(()),
            }
        }
    }

    fn ttt(&mut self) -> u32 {
        next_tag(&mut self.next_ttt)
    }

    /// Checks a non-immediate PDU's CmdSN against the window and advances it. `false`: the
    /// PDU is outside the window and is silently ignored (RFC 7143 §4.2.2.1).
    fn admit(&self, cmd_sn: u32, immediate: bool, counts: bool) -> bool {
        if immediate {
            return true;
        }
        let mut window = lock(&self.session.window);
        if !window.admits(cmd_sn) {
            debug!(cmd_sn, exp_cmd_sn = window.exp_cmd_sn, "iSCSI PDU outside the CmdSN window ignored");
            return false;
        }
        window.exp_cmd_sn = window.exp_cmd_sn.wrapping_add(1);
        if counts {
            window.inflight += 1;
        }
        true
    }

    async fn on_pdu(&mut self, pdu: Pdu) -> Result<Next, ConnectionError> {
        match pdu {
            Pdu::ScsiCommand(command) => {
                if self.admit(command.cmd_sn, command.immediate, true) {
                    self.on_command(command).await?;
                }
            }
            Pdu::DataOut(data) => self.on_data_out(data).await?,
            Pdu::NopOut(nop) => {
                if !self.admit(nop.cmd_sn, nop.immediate, false) {
                    return Ok(Next::Continue);
                }
                if nop.itt != RESERVED_TAG {
                    let reply = nop_echo(&nop, SeqNumbers::default());
                    self.session.out.send(Pdu::NopIn(reply), true).await;
                }
            }
            Pdu::TaskMgmtRequest(request) => {
                if self.admit(request.cmd_sn, request.immediate, false) {
                    self.on_task_management(request).await;
                }
            }
            Pdu::TextRequest(request) => {
                if self.admit(request.cmd_sn, request.immediate, false) {
                    self.on_text(request).await;
                }
            }
            Pdu::LogoutRequest(request) => {
                if !self.admit(request.cmd_sn, request.immediate, false) {
                    return Ok(Next::Continue);
                }
                // Commands already accepted finish and are answered before the logout is.
                for (_, task) in self.tasks.drain() {
                    let _ = task.await;
                }
                self.session.out.send(Pdu::LogoutResponse(logout(&request, SeqNumbers::default())), true).await;
                return Ok(Next::Logout);
            }
            Pdu::SnackRequest(_) => {
                // ErrorRecoveryLevel 0: nothing is kept to send again.
                self.session
                    .out
                    .send(reject(reject_reason::SNACK_REJECT, SeqNumbers::default(), Bytes::new()), true)
                    .await;
            }
            other => {
                return Err(ConnectionError::Protocol(format!(
                    "PDU with opcode {:#04x} is not allowed in the Full Feature Phase",
                    other.opcode()
                )))
            }
        }
        Ok(Next::Continue)
    }

    async fn on_text(&mut self, request: TextRequest) {
        let listed = self.targets.discovery(&self.params.initiator_name);
        let responder =
            self.text.get_or_insert_with(|| DiscoveryResponder::new(self.params.initiator_max_recv_data_segment_bytes));
        let reply = match responder.on_request(&request, &listed, SeqNumbers::default()) {
            Ok(response) => Pdu::TextResponse(response),
            Err(err) => reject(err.reject_reason(), SeqNumbers::default(), Bytes::new()),
        };
        self.session.out.send(reply, true).await;
    }

    async fn on_task_management(&mut self, request: TaskMgmtRequest) {
        let response = match request.function {
            tmf_function::ABORT_TASK => {
                match self.tasks.remove(&request.referenced_task_tag) {
                    Some(task) => {
                        task.abort();
                        let _ = task.await;
                        if lock(&self.session.out.answered).remove(&request.referenced_task_tag) {
                            tmf_response::TASK_DOES_NOT_EXIST
                        } else {
                            tmf_response::FUNCTION_COMPLETE
                        }
                    }
                    None => match self.transfers.remove(&request.referenced_task_tag) {
                        Some(transfer) => {
                            self.finish_in_window(transfer.windowed);
                            tmf_response::FUNCTION_COMPLETE
                        }
                        // Already answered (or never received).
                        None => tmf_response::TASK_DOES_NOT_EXIST,
                    },
                }
            }
            tmf_function::ABORT_TASK_SET
            | tmf_function::CLEAR_TASK_SET
            | tmf_function::LOGICAL_UNIT_RESET
            | tmf_function::TARGET_WARM_RESET => {
                if request.function != tmf_function::TARGET_WARM_RESET
                    && decode_lun(request.lun.to_be_bytes()) != Some(0)
                {
                    tmf_response::LUN_DOES_NOT_EXIST
                } else {
                    self.abort_all().await;
                    if matches!(request.function, tmf_function::LOGICAL_UNIT_RESET | tmf_function::TARGET_WARM_RESET) {
                        lock(&self.session.lun.nexus).mode = Default::default();
                        // Every session, this one too, learns of the reset from its next
                        // command (SAM-5 6.3.1); those through other portals are told before
                        // the reset is answered.
                        self.portal.raise_all(&self.target, UnitAttention::PowerOnReset);
                        self.targets.reset(&self.target).await;
                    }
                    tmf_response::FUNCTION_COMPLETE
                }
            }
            tmf_function::CLEAR_ACA => tmf_response::FUNCTION_COMPLETE,
            _ => tmf_response::FUNCTION_NOT_SUPPORTED,
        };
        let pdu = TaskMgmtResponse { response, itt: request.itt, stat_sn: 0, exp_cmd_sn: 0, max_cmd_sn: 0 };
        self.session.out.send(Pdu::TaskMgmtResponse(pdu), true).await;
    }

    async fn abort_all(&mut self) {
        for (_, task) in self.tasks.drain() {
            task.abort();
            let _ = task.await;
        }
        for (_, transfer) in std::mem::take(&mut self.transfers) {
            self.finish_in_window(transfer.windowed);
        }
    }

    /// A command that counted in the window is done (answered or aborted): reopen a slot.
    fn finish_in_window(&self, windowed: bool) {
        release_slot(&self.session.window, windowed);
    }

    async fn on_command(&mut self, command: ScsiCommand) -> Result<(), ConnectionError> {
        let windowed = !command.immediate;
        let immediate_slot = if command.immediate {
            Some(Arc::clone(&self.immediate).acquire_owned().await.expect("never closed"))
        } else {
            None
        };
        if self.tasks.contains_key(&command.itt) || self.transfers.contains_key(&command.itt) {
            self.finish_in_window(windowed);
            return Err(ConnectionError::Protocol(format!("ITT {:#x} is already in use", command.itt)));
        }
        if self.access.has_changed().unwrap_or(false) {
            self.access.mark_unchanged();
            lock(&self.session.lun.nexus).raise(UnitAttention::AsymmetricAccessStateChanged);
        }
        for attention in self.session.lun.volume.take_attentions() {
            lock(&self.session.lun.nexus).raise(reservation_attention(attention));
        }
        let access = self.access.borrow().clone();
        let plan = match decode_lun(command.lun.to_be_bytes()) {
            Some(0) => {
                let mut nexus = lock(&self.session.lun.nexus);
                self.session.lun.unit.plan(&command.cdb, &mut nexus, &access, &[0])
            }
            _ => Plan::Reply(absent_lun(&command.cdb, &[0])),
        };
        let io = match plan {
            Plan::Reply(reply) => {
                let session = Arc::clone(&self.session);
                let edtl = command.expected_data_transfer_length;
                self.spawn(command.itt, windowed, immediate_slot, async move {
                    send_reply(&session, command.itt, command.lun, edtl, 0, reply).await;
                });
                return Ok(());
            }
            Plan::Io(io) => io,
        };
        let needed = io.data_out_bytes() as usize;
        if needed == 0 {
            let session = Arc::clone(&self.session);
            self.spawn(command.itt, windowed, immediate_slot, async move {
                execute(&session, &command, io, Bytes::new()).await;
            });
            return Ok(());
        }
        let edtl = command.expected_data_transfer_length as usize;
        if edtl != needed && matches!(io, Io::WriteSame { .. } | Io::CompareAndWrite { .. }) {
            // Their data-out has one valid size (a block; twice the range): any other EDTL is
            // refused before data is asked for, as Linux's target does.
            let reply = Reply::check(Sense::invalid_cdb_field(0, None), &lock(&self.session.lun.nexus));
            let session = Arc::clone(&self.session);
            self.spawn(command.itt, windowed, immediate_slot, async move {
                send_reply(&session, command.itt, command.lun, edtl as u32, needed as u64, reply).await;
            });
            return Ok(());
        }
        let wanted = needed.min(edtl);
        let budget = Arc::clone(&self.write_budget)
            .acquire_many_owned(wanted.min(WRITE_BUFFER_BYTES_MAX) as u32)
            .await
            .expect("never closed");
        let mut data = BytesMut::with_capacity(wanted);
        let immediate_data = &command.data[..command.data.len().min(wanted)];
        data.extend_from_slice(immediate_data);
        let unsolicited_end = if self.params.initial_r2t || command.is_final {
            command.data.len()
        } else {
            (self.params.first_burst_bytes as usize).min(edtl)
        };
        let transfer = Transfer {
            unsolicited_open: !command.is_final,
            command,
            io,
            wanted,
            data,
            requested: unsolicited_end.min(edtl),
            unsolicited_data_sn: 0,
            r2ts: HashMap::new(),
            r2t_sn: 0,
            windowed,
            _budget: budget,
        };
        let itt = transfer.command.itt;
        drop(immediate_slot);
        self.transfers.insert(itt, transfer);
        self.progress(itt).await;
        Ok(())
    }

    /// Ends a command whose data-out went wrong (a sequence or digest error) with ABORTED
    /// COMMAND; Data-Out still arriving for it is ignored. The connection goes on.
    fn fail_transfer(&mut self, itt: u32, asc: tandem_scsi::sense::Asc) {
        let Some(transfer) = self.transfers.remove(&itt) else { return };
        let reply = Reply::check(Sense::new(SenseKey::AbortedCommand, asc), &lock(&self.session.lun.nexus));
        let session = Arc::clone(&self.session);
        let (lun, edtl, needed) =
            (transfer.command.lun, transfer.command.expected_data_transfer_length, transfer.io.data_out_bytes());
        self.spawn(itt, transfer.windowed, None, async move {
            send_reply(&session, itt, lun, edtl, needed, reply).await;
        });
    }

    fn spawn(
        &mut self,
        itt: u32,
        windowed: bool,
        slot: Option<OwnedSemaphorePermit>,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        let window = Arc::clone(&self.session.window);
        let task = tokio::spawn(async move {
            let _slot = slot;
            // Reopens the window slot also when the task is aborted.
            let _done = WindowSlot { window, windowed };
            work.await;
        });
        self.tasks.insert(itt, task);
    }

    /// Sends the R2Ts a transfer needs, or starts its command once its data is in.
    async fn progress(&mut self, itt: u32) {
        let max_outstanding = usize::from(self.params.max_outstanding_r2t.max(1));
        let burst = self.params.max_burst_bytes.max(512) as usize;
        let Some(transfer) = self.transfers.get_mut(&itt) else { return };
        if transfer.data.len() >= transfer.wanted && !transfer.unsolicited_open && transfer.r2ts.is_empty() {
            let transfer = self.transfers.remove(&itt).expect("present");
            let Transfer { command, io, data, windowed, _budget, .. } = transfer;
            let session = Arc::clone(&self.session);
            self.spawn(itt, windowed, None, async move {
                let _budget = _budget;
                execute(&session, &command, io, data.freeze()).await;
            });
            return;
        }
        let mut r2ts = Vec::new();
        while transfer.r2ts.len() < max_outstanding && transfer.requested < transfer.wanted {
            let offset = transfer.requested;
            let len = burst.min(transfer.wanted - offset);
            // `self.ttt()` would borrow all of `self` while `transfer` is borrowed from it.
            let ttt = next_tag(&mut self.next_ttt);
            transfer.r2ts.insert(ttt, R2tState { offset, len, data_sn: 0, received: 0 });
            transfer.requested += len;
            r2ts.push(R2t {
                lun: transfer.command.lun,
                itt,
                ttt,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                r2t_sn: transfer.r2t_sn,
                buffer_offset: offset as u32,
                desired_data_transfer_length: len as u32,
            });
            transfer.r2t_sn = transfer.r2t_sn.wrapping_add(1);
        }
        for r2t in r2ts {
            self.session.out.send(Pdu::R2t(r2t), false).await;
        }
    }

    async fn on_data_out(&mut self, data: DataOut) -> Result<(), ConnectionError> {
        let Some(transfer) = self.transfers.get_mut(&data.itt) else {
            // Data for a command that was ignored (outside the window) or aborted.
            debug!(itt = data.itt, "Data-Out for no outstanding transfer ignored");
            return Ok(());
        };
        let offset = data.buffer_offset as usize;
        let end = offset + data.data.len();
        if data.ttt == RESERVED_TAG {
            // Unsolicited data: only while the first burst is open, in DataSN order.
            let first_burst =
                (self.params.first_burst_bytes as usize).min(transfer.command.expected_data_transfer_length as usize);
            if !transfer.unsolicited_open || data.data_sn != transfer.unsolicited_data_sn || end > first_burst {
                warn!(itt = data.itt, data_sn = data.data_sn, offset, "unsolicited Data-Out out of sequence");
                self.fail_transfer(data.itt, asc::DATA_PHASE_ERROR);
                return Ok(());
            }
            transfer.unsolicited_data_sn += 1;
            if data.is_final {
                transfer.unsolicited_open = false;
            }
        } else {
            let Some(r2t) = transfer.r2ts.get_mut(&data.ttt) else {
                warn!(itt = data.itt, ttt = data.ttt, "Data-Out with a TTT of no outstanding R2T");
                self.fail_transfer(data.itt, asc::DATA_PHASE_ERROR);
                return Ok(());
            };
            if data.data_sn != r2t.data_sn || offset != r2t.offset + r2t.received || end > r2t.offset + r2t.len {
                warn!(
                    itt = data.itt,
                    data_sn = data.data_sn,
                    expected = r2t.data_sn,
                    offset,
                    "Data-Out out of sequence"
                );
                let asc = if data.data_sn != r2t.data_sn { asc::DATA_PHASE_ERROR } else { asc::DATA_OFFSET_ERROR };
                self.fail_transfer(data.itt, asc);
                return Ok(());
            }
            r2t.data_sn += 1;
            r2t.received += data.data.len();
            if r2t.received == r2t.len {
                transfer.r2ts.remove(&data.ttt);
            } else if data.is_final {
                warn!(itt = data.itt, "Data-Out with the F bit before the end of its R2T");
                self.fail_transfer(data.itt, asc::DATA_PHASE_ERROR);
                return Ok(());
            }
        }
        // Keep what the command takes; data past it (the EDTL was larger) is dropped.
        if offset < transfer.wanted {
            if offset != transfer.data.len() {
                warn!(itt = data.itt, offset, "Data-Out leaves a gap");
                self.fail_transfer(data.itt, asc::DATA_OFFSET_ERROR);
                return Ok(());
            }
            let keep = (transfer.wanted - offset).min(data.data.len());
            transfer.data.extend_from_slice(&data.data[..keep]);
        }
        self.progress(data.itt).await;
        Ok(())
    }
}

/// Reopens a CmdSN window slot when a command task ends, however it ends.
struct WindowSlot {
    window: SharedWindow,
    windowed: bool,
}

impl Drop for WindowSlot {
    fn drop(&mut self) {
        release_slot(&self.window, self.windowed);
    }
}

/// A command that counted in the CmdSN window is done: MaxCmdSN may advance by one.
fn release_slot(window: &SharedWindow, windowed: bool) {
    if windowed {
        let mut window = lock(window);
        window.inflight = window.inflight.saturating_sub(1);
    }
}

/// The next target transfer tag from `next`, skipping the reserved 0xffffffff.
fn next_tag(next: &mut u32) -> u32 {
    let tag = *next;
    *next = match next.wrapping_add(1) {
        RESERVED_TAG => 1,
        n => n,
    };
    tag
}

/// The residual of a transfer of `needed` bytes against the initiator's EDTL.
fn residual(edtl: u32, needed: u64) -> Residual {
    let edtl = u64::from(edtl);
    match needed.cmp(&edtl) {
        std::cmp::Ordering::Equal => Residual::None,
        std::cmp::Ordering::Less => Residual::Underflow((edtl - needed) as u32),
        std::cmp::Ordering::Greater => Residual::Overflow((needed - edtl).min(u64::from(u32::MAX)) as u32),
    }
}

/// Sends a planned reply: its data (cut to the EDTL) as Data-In, then the status.
async fn send_reply<V>(session: &Session<V>, itt: u32, lun: u64, edtl: u32, data_out_needed: u64, reply: Reply) {
    let needed = if reply.data.is_empty() { data_out_needed } else { reply.data.len() as u64 };
    let residual = residual(edtl, needed);
    let status_in_data = reply.sense.is_none() && reply.status == Status::Good;
    let sense = reply.sense_bytes();
    let mut data = Bytes::from(reply.data);
    data.truncate(edtl as usize);
    let sent =
        send_data_in(session, itt, lun, data.clone(), 0, 0, true, status_in_data.then_some((reply.status, residual)))
            .await;
    if sent && (!status_in_data || data.is_empty()) {
        send_status(session, itt, reply.status.code(), residual, sense).await;
    }
}

async fn send_status<V>(session: &Session<V>, itt: u32, status: u8, residual: Residual, sense: Vec<u8>) {
    let data = if sense.is_empty() {
        Bytes::new()
    } else {
        let mut segment = Vec::with_capacity(2 + sense.len());
        segment.extend_from_slice(&(sense.len() as u16).to_be_bytes());
        segment.extend_from_slice(&sense);
        Bytes::from(segment)
    };
    let response = ScsiResponse {
        response: scsi_response::COMMAND_COMPLETED_AT_TARGET,
        status,
        bidi_read_residual: Residual::None,
        residual,
        itt,
        snack_tag: 0,
        stat_sn: 0,
        exp_cmd_sn: 0,
        max_cmd_sn: 0,
        exp_data_sn: 0,
        data,
    };
    session.out.send(Pdu::ScsiResponse(response), true).await;
}

/// Sends `data` (at `buffer_offset` of the command's data-in, DataSN from `data_sn`) as Data-In
/// PDUs of at most the initiator's segment size. With `last` and a status, the final PDU
/// carries it (phase collapse). Returns `false` when the connection is closing.
#[allow(clippy::too_many_arguments)]
async fn send_data_in<V>(
    session: &Session<V>,
    itt: u32,
    lun: u64,
    data: Bytes,
    buffer_offset: usize,
    data_sn: u32,
    last: bool,
    status: Option<(Status, Residual)>,
) -> bool {
    if data.is_empty() {
        return true;
    }
    let segment = session.data_in_segment_bytes;
    let mut at = 0;
    let mut data_sn = data_sn;
    while at < data.len() {
        let end = (at + segment).min(data.len());
        let offset = buffer_offset + at;
        let final_piece = last && end == data.len();
        // F closes each MaxBurstLength sequence and the whole transfer.
        let burst_end = (offset + (end - at)) % session.burst_bytes == 0;
        let (status, residual) = match (final_piece, status) {
            (true, Some((status, residual))) => (Some(status.code()), residual),
            _ => (None, Residual::None),
        };
        let pdu = DataIn {
            is_final: final_piece || burst_end,
            acknowledge: false,
            status,
            residual,
            lun,
            itt,
            ttt: RESERVED_TAG,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            data_sn,
            buffer_offset: offset as u32,
            data: data.slice(at..end),
        };
        if !session.out.send(Pdu::DataIn(pdu), status.is_some()).await {
            return false;
        }
        data_sn += 1;
        at = end;
    }
    true
}

/// Runs a command's work against the volume and answers it.
async fn execute<V: Volume>(session: &Session<V>, command: &ScsiCommand, io: Io, data: Bytes) {
    let edtl = command.expected_data_transfer_length;
    let unit = &session.lun.unit;
    let block = u64::from(unit.geometry.block_size);
    let needed_out = io.data_out_bytes();
    match io {
        Io::PersistentReserveIn { action, allocation } => {
            let reply = persistent_reserve_in(session, action, allocation).await;
            return send_reply(session, command.itt, command.lun, edtl, 0, reply).await;
        }
        Io::PersistentReserveOut { action, scope, kind, .. } => {
            let reply = persistent_reserve_out(session, action, scope, kind, &data).await;
            return send_reply(session, command.itt, command.lun, edtl, needed_out, reply).await;
        }
        Io::CopyOut { action, list_id, .. } => {
            let reply = copy::copy_out(session, action, list_id, &data).await;
            return send_reply(session, command.itt, command.lun, edtl, needed_out, reply).await;
        }
        Io::CopyIn { action, list_id, allocation } => {
            let reply = copy::copy_in(session, action, list_id, allocation);
            return send_reply(session, command.itt, command.lun, edtl, 0, reply).await;
        }
        _ => {}
    }
    let result: Result<(), Failure> = match io {
        Io::Read { offset, len } => {
            let send = len.min(u64::from(edtl));
            match stream_read(session, command, offset, send, len).await {
                // The status went with the last Data-In, or the connection is closing.
                Ok(ReadEnd::Answered) => return,
                Ok(ReadEnd::NothingSent) => Ok(()),
                Err(failure) => Err(failure),
            }
        }
        Io::Write { offset, len, fua, verify } => {
            let take = (data.len() as u64).min(len);
            if take % block != 0 {
                Err(Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)))
            } else if take == 0 {
                Ok(())
            } else {
                let data = data.slice(..take as usize);
                match session.lun.volume.write(offset, data.clone(), fua).await {
                    Err(err) => Err(failure_for(&err, Direction::Write)),
                    Ok(()) if verify => verify_against(session, offset, &data, 0).await,
                    Ok(()) => Ok(()),
                }
            }
        }
        Io::WriteSame { offset, len, unmap: _, ndob, block_bytes } => {
            if !ndob && (data.len() as u64) < u64::from(block_bytes) {
                Err(Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)))
            } else if ndob || data.iter().all(|&b| b == 0) {
                session.lun.volume.write_zeroes(offset, len, false).await.map_err(|e| failure_for(&e, Direction::Write))
            } else {
                write_same(session, offset, len, &data[..block_bytes as usize]).await
            }
        }
        Io::Unmap { .. } => match unit.unmap_ranges(&data) {
            Err(sense) => Err(Failure::Sense(sense)),
            Ok(ranges) => {
                let mut result = Ok(());
                for (offset, len) in ranges {
                    // An unmapped block reads as zeroes on every replica (LBPRZ).
                    if let Err(err) = session.lun.volume.write_zeroes(offset, len, false).await {
                        result = Err(failure_for(&err, Direction::Write));
                        break;
                    }
                }
                result
            }
        },
        Io::CompareAndWrite { offset, len, fua } => {
            if (data.len() as u64) < 2 * len {
                Err(Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)))
            } else {
                let expected = data.slice(..len as usize);
                let write = data.slice(len as usize..2 * len as usize);
                match session.lun.volume.compare_and_write(offset, expected, write, fua).await {
                    Ok(None) => Ok(()),
                    Ok(Some(at)) => Err(Failure::Sense(
                        Sense::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY_OPERATION).with_information(at),
                    )),
                    Err(IoError::NotSupported(_)) => Err(Failure::Sense(Sense::invalid_opcode())),
                    Err(err) => Err(failure_for(&err, Direction::Write)),
                }
            }
        }
        Io::OrWrite { offset, len, fua } => {
            if (data.len() as u64) < len {
                Err(Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)))
            } else {
                or_write(session, offset, data.slice(..len as usize), fua).await
            }
        }
        Io::Verify { offset, len, check, block_bytes } => {
            use tandem_scsi::cdb::ByteCheck;
            match check {
                ByteCheck::None => verify_readable(session, offset, len).await,
                ByteCheck::Compare => {
                    if (data.len() as u64) < len {
                        Err(Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)))
                    } else {
                        verify_against(session, offset, &data.slice(..len as usize), 0).await
                    }
                }
                ByteCheck::CompareOne => {
                    if data.len() < block_bytes as usize {
                        Err(Failure::Sense(Sense::illegal(asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)))
                    } else {
                        verify_same(session, offset, len, &data[..block_bytes as usize]).await
                    }
                }
            }
        }
        Io::Flush => session.lun.volume.flush().await.map_err(|e| failure_for(&e, Direction::Write)),
        Io::ModeSelect { ten, .. } => {
            let mut nexus = lock(&session.lun.nexus);
            unit.mode_select(ten, &data, &mut nexus).map_err(Failure::Sense)
        }
        Io::PersistentReserveIn { .. } | Io::PersistentReserveOut { .. } | Io::CopyOut { .. } | Io::CopyIn { .. } => {
            unreachable!("answered above")
        }
    };
    let reply = {
        let nexus = lock(&session.lun.nexus);
        unit.finish(result, &nexus)
    };
    let needed = if matches!(io, Io::Read { .. }) { io.data_in_bytes() } else { needed_out };
    let residual = residual(edtl, needed);
    send_status(session, command.itt, reply.status.code(), residual, reply.sense_bytes()).await;
}

/// The unit attention of a reservation change.
fn reservation_attention(attention: Attention) -> UnitAttention {
    match attention {
        Attention::ReservationsPreempted => UnitAttention::ReservationsPreempted,
        Attention::ReservationsReleased => UnitAttention::ReservationsReleased,
        Attention::RegistrationsPreempted => UnitAttention::RegistrationsPreempted,
    }
}

/// PERSISTENT RESERVE IN: the committed reservations, as `action` lays them out.
async fn persistent_reserve_in<V: Volume>(session: &Session<V>, action: u8, allocation: u32) -> Reply {
    match session.lun.volume.reservations().await {
        Ok(state) => match tandem_scsi::pr::read(action, &state) {
            Ok(data) => Reply::data(data, allocation),
            Err(sense) => Reply::check(sense, &lock(&session.lun.nexus)),
        },
        Err(e) => session.lun.unit.finish(Err(failure_for(&e, Direction::Read)), &lock(&session.lun.nexus)),
    }
}

/// PERSISTENT RESERVE OUT: the command its parameter list makes, through this session's
/// nexus, carried out by the volume's primary.
async fn persistent_reserve_out<V: Volume>(
    session: &Session<V>,
    action: u8,
    scope: u8,
    kind: u8,
    params: &[u8],
) -> Reply {
    let nexus_state = || *lock(&session.lun.nexus);
    let Some(me) = session.lun.volume.nexus() else {
        return Reply::check(Sense::invalid_opcode(), &nexus_state());
    };
    let block = u64::from(session.lun.unit.geometry.block_size);
    let op = match tandem_scsi::pr::command(action, scope, kind, params, &me, block) {
        Ok(op) => op,
        Err(sense) => return Reply::check(sense, &nexus_state()),
    };
    match session.lun.volume.reserve(op).await {
        Ok(Ok(_)) => Reply::good(),
        Ok(Err(refusal)) => {
            debug!(initiator = %me.initiator, port = me.port, %refusal, "persistent reserve out refused");
            tandem_scsi::pr::refused(&refusal, nexus_state().mode.descriptor_sense)
        }
        Err(e) => session.lun.unit.finish(Err(failure_for(&e, Direction::Write)), &nexus_state()),
    }
}

enum ReadEnd {
    Answered,
    /// The EDTL was 0: the status is still to send.
    NothingSent,
}

/// Streams `len` bytes from `offset` as Data-In, piece by piece through the read budget; the
/// last PDU carries GOOD status and the residual against `full`, the length the CDB asked
/// for. A failure before the first byte is sent becomes the status.
async fn stream_read<V: Volume>(
    session: &Session<V>,
    command: &ScsiCommand,
    offset: u64,
    len: u64,
    full: u64,
) -> Result<ReadEnd, Failure> {
    if len == 0 {
        return Ok(ReadEnd::NothingSent);
    }
    let edtl = command.expected_data_transfer_length;
    let mut sent: u64 = 0;
    let mut data_sn = 0;
    while sent < len {
        let piece = (len - sent).min(READ_CHUNK_BYTES as u64) as usize;
        let reservation = session.read_budget.reserve(piece as u64).await;
        let mut buf = vec![0u8; piece];
        if let Err(err) = session.lun.volume.read(offset + sent, &mut buf).await {
            drop(reservation);
            let failure = failure_for(&err, Direction::Read);
            if sent == 0 {
                return Err(failure);
            }
            // Data already went out: the status says the command failed.
            let reply = {
                let nexus = lock(&session.lun.nexus);
                session.lun.unit.finish(Err(failure), &nexus)
            };
            send_status(session, command.itt, reply.status.code(), residual(edtl, full), reply.sense_bytes()).await;
            return Ok(ReadEnd::Answered);
        }
        let last = sent + piece as u64 == len;
        let status = last.then_some((Status::Good, residual(edtl, full)));
        let pieces = piece.div_ceil(session.data_in_segment_bytes) as u32;
        if !send_data_in(session, command.itt, command.lun, Bytes::from(buf), sent as usize, data_sn, last, status)
            .await
        {
            return Ok(ReadEnd::Answered);
        }
        drop(reservation);
        data_sn += pieces;
        sent += piece as u64;
    }
    Ok(ReadEnd::Answered)
}

/// Writes `pattern` (one block) over `len` bytes from `offset`, a bounded piece at a time.
async fn write_same<V: Volume>(session: &Session<V>, offset: u64, len: u64, pattern: &[u8]) -> Result<(), Failure> {
    let blocks_per_piece = (READ_CHUNK_BYTES / pattern.len()).max(1);
    let piece: Bytes = pattern.repeat(blocks_per_piece).into();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(piece.len() as u64) as usize;
        session
            .lun
            .volume
            .write(offset + at, piece.slice(..n), false)
            .await
            .map_err(|e| failure_for(&e, Direction::Write))?;
        at += n as u64;
    }
    Ok(())
}

/// Reads `expected.len()` bytes at `offset` and compares them; a difference is MISCOMPARE with
/// its offset in the data-out (plus `data_out_offset`).
async fn verify_against<V: Volume>(
    session: &Session<V>,
    offset: u64,
    expected: &[u8],
    data_out_offset: u64,
) -> Result<(), Failure> {
    let mut at = 0;
    while at < expected.len() {
        let n = (expected.len() - at).min(READ_CHUNK_BYTES);
        let mut buf = vec![0u8; n];
        session.lun.volume.read(offset + at as u64, &mut buf).await.map_err(|e| failure_for(&e, Direction::Read))?;
        compare(&expected[at..at + n], &buf, data_out_offset + at as u64).map_err(Failure::Sense)?;
        at += n;
    }
    Ok(())
}

/// How many times ORWRITE reads and swaps in its result before it gives up (each retry means
/// another write to the range came between its read and its swap).
const OR_WRITE_TRIES: usize = 64;

/// ORWRITE: what is at `offset` OR `bits`, swapped in by a compare and write of what was read,
/// so the update is atomic against every other write on every path; read again and retried when
/// another write came between.
async fn or_write<V: Volume>(session: &Session<V>, offset: u64, bits: Bytes, fua: bool) -> Result<(), Failure> {
    for _ in 0..OR_WRITE_TRIES {
        let mut current = vec![0u8; bits.len()];
        session.lun.volume.read(offset, &mut current).await.map_err(|e| failure_for(&e, Direction::Read))?;
        let merged: Vec<u8> = current.iter().zip(bits.iter()).map(|(a, b)| a | b).collect();
        match session.lun.volume.compare_and_write(offset, Bytes::from(current), Bytes::from(merged), fua).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => continue,
            Err(IoError::NotSupported(_)) => return Err(Failure::Sense(Sense::invalid_opcode())),
            Err(err) => return Err(failure_for(&err, Direction::Write)),
        }
    }
    // Other writes kept changing the range: the command is aborted, and the host retries it.
    Err(Failure::Sense(Sense::new(SenseKey::AbortedCommand, asc::NO_ADDITIONAL_SENSE)))
}

async fn verify_readable<V: Volume>(session: &Session<V>, offset: u64, len: u64) -> Result<(), Failure> {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(READ_CHUNK_BYTES as u64) as usize;
        let mut buf = vec![0u8; n];
        session.lun.volume.read(offset + at, &mut buf).await.map_err(|e| failure_for(&e, Direction::Read))?;
        at += n as u64;
    }
    Ok(())
}

/// VERIFY with BYTCHK=11b: every block of the range must equal the one block sent.
async fn verify_same<V: Volume>(session: &Session<V>, offset: u64, len: u64, block: &[u8]) -> Result<(), Failure> {
    let mut at = 0;
    while at < len {
        let mut buf = vec![0u8; block.len()];
        session.lun.volume.read(offset + at, &mut buf).await.map_err(|e| failure_for(&e, Direction::Read))?;
        compare(block, &buf, 0).map_err(Failure::Sense)?;
        at += block.len() as u64;
    }
    Ok(())
}
