//! The login phase of one connection, target side (RFC 7143 §6 and §13): a sans-IO state
//! machine fed decoded Login Requests that returns the Login Response to send for each, and
//! ends with the negotiated [`SessionParams`] or a failure status.
//!
//! Driver loop, one connection:
//! 1. Create a [`LoginMachine`] with the target's [`TargetConfig`], an [`Authenticator`] and
//!    the first StatSN to use (the caller's choice; randomness is an argument).
//! 2. Read a PDU with [`DecodeLimits::LOGIN`] (no digests, 8192-byte segments). A Login
//!    Request goes to [`LoginMachine::on_request`]; anything else, or a PDU that did not
//!    decode, goes to [`LoginMachine::on_invalid_pdu`]. Either returns one Login Response: send
//!    it (login is lockstep, one response per request).
//! 3. Look at [`LoginMachine::outcome`]: [`LoginOutcome::InProgress`] → back to 2;
//!    [`LoginOutcome::Failed`] → close the connection after sending; [`LoginOutcome::Complete`]
//!    → the connection is in the Full Feature Phase with the [`SessionParams`] (digests and
//!    segment limits apply from the next PDU on).
//!
//! What it checks and decides: the stage sequence (SecurityNegotiation → optional
//! LoginOperationalNegotiation → FullFeaturePhase) and T/C bits; the version; the leading keys
//! (InitiatorName, SessionType, TargetName through [`LoginHooks`]); AuthMethod and, through the
//! [`Authenticator`], the authentication exchange; every operational key of RFC 7143 §13 with
//! its negotiation function; unknown keys (X- keys included) answered NotUnderstood; texts
//! continued over several PDUs in either direction. Any malformed or out-of-order request ends
//! in [`LoginOutcome::Failed`] with the status RFC 7143 §11.13.5 names; nothing panics.
//!
//! Authentication: the [`Authenticator`] names the methods it offers each initiator
//! ([`Authenticator::methods`], asked once the InitiatorName is known), so it can require a
//! method of one initiator and accept `AuthMethod=None` from another. The machine routes the
//! method's keys (those it [`Authenticator::owns_key`]) to it, holds the security stage until it
//! reports success, and fails the login with 0x0201 when it reports failure, or when the
//! initiator skips the security stage or asks for a method it was not offered. What the method
//! established ([`Authentication`]) ends up in the [`SessionParams`]. [`NoAuthentication`]
//! accepts only `AuthMethod=None`; [`crate::chap::Chap`] is CHAP.
//!
//! What it does not do: sessions with more than one connection (MaxConnections is 1, a login
//! with a non-zero TSIH is refused with 0x0208), error recovery above level 0, redirection
//! (0x0101/0x0102), and the login of an initiator (a client will get its own machine).

use std::num::NonZeroU16;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::pdu::{
    DecodeLimits, Digests, Isid, LoginRequest, LoginResponse, LoginStatus, Stage, DATA_SEGMENT_BYTES_MAX,
};
use crate::text::{
    bool_value, encode_text, list_items, parse_bool, parse_number, parse_text, TextAssembler, TextPair, IRRELEVANT,
    NOT_UNDERSTOOD, REJECT, VALUE_BYTES_MAX,
};

/// The only iSCSI version there is (RFC 7143 §11.12.4): Version-max/min/active are all 0.
pub const ISCSI_VERSION: u8 = 0x00;
/// Largest data segment of a Login Response: the default MaxRecvDataSegmentLength, which is
/// in force for the whole login (the declared value applies from the Full Feature Phase).
pub const LOGIN_DATA_SEGMENT_BYTES: usize = 8192;
/// Login Request PDUs one login may take, continuations included. A libiscsi login takes 2,
/// a CHAP login 4 or 5; the cap ends an initiator that never finishes.
pub const LOGIN_PDUS_MAX: usize = 256;
/// Distinct keys one login may carry over all its requests (RFC 7143 defines about 30).
pub const LOGIN_KEYS_MAX: usize = 256;
/// iSCSI names are at most 223 bytes (RFC 3722 §6, RFC 7143 §4.2.7.1).
pub const ISCSI_NAME_BYTES_MAX: usize = 223;
/// MaxRecvDataSegmentLength, MaxBurstLength and FirstBurstLength range (RFC 7143 §13).
pub const SEGMENT_BYTES_MIN: u32 = 512;
pub const SEGMENT_BYTES_MAX: u32 = DATA_SEGMENT_BYTES_MAX;
/// DefaultTime2Wait and DefaultTime2Retain range (RFC 7143 §13.15, §13.16).
pub const TIME2_S_MAX: u16 = 3600;
/// Largest command window (MaxCmdSN - ExpCmdSN + 1) a target may advertise here; deeper than
/// any initiator's queue, far below the 2^31 that serial-number arithmetic allows.
pub const COMMAND_WINDOW_MAX: u32 = 1 << 16;

/// RFC 7143 §13 defaults: the value of a key nobody negotiated.
pub mod defaults {
    pub const MAX_RECV_DATA_SEGMENT_BYTES: u32 = 8192;
    pub const MAX_BURST_BYTES: u32 = 262_144;
    pub const FIRST_BURST_BYTES: u32 = 65_536;
    pub const DEFAULT_TIME2WAIT_S: u16 = 2;
    pub const DEFAULT_TIME2RETAIN_S: u16 = 20;
    pub const MAX_OUTSTANDING_R2T: u16 = 1;
    pub const MAX_CONNECTIONS: u16 = 1;
    pub const ERROR_RECOVERY_LEVEL: u8 = 0;
    pub const INITIAL_R2T: bool = true;
    pub const IMMEDIATE_DATA: bool = true;
    pub const DATA_PDU_IN_ORDER: bool = true;
    pub const DATA_SEQUENCE_IN_ORDER: bool = true;
}

/// Keys the initiator must declare in its first Login Request.
const LEADING_KEYS: [&str; 3] = ["InitiatorName", "SessionType", "TargetName"];
/// Keys only a target sends; an initiator offering them gets Reject.
const TARGET_ONLY_KEYS: [&str; 3] = ["TargetAlias", "TargetAddress", "TargetPortalGroupTag"];
/// Keys of the Full Feature Phase only (RFC 7143 §13.3); offered during login they get Reject.
const FULL_FEATURE_ONLY_KEYS: [&str; 1] = ["SendTargets"];
/// Keys negotiated in the LoginOperationalNegotiation stage. OFMarker, IFMarker, OFMarkInt
/// and IFMarkInt are RFC 3720 keys RFC 7143 dropped; older initiators still send them.
const OPERATIONAL_KEYS: [&str; 18] = [
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "OFMarker",
    "IFMarker",
    "OFMarkInt",
    "IFMarkInt",
];
/// Session-wide keys RFC 7143 §13 marks "Irrelevant when: SessionType=Discovery".
const IRRELEVANT_IN_DISCOVERY: [&str; 8] = [
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
];

/// Whether RFC 7143 defines `key` (as opposed to a vendor or unknown key).
pub(crate) fn is_known_key(key: &str) -> bool {
    LEADING_KEYS.contains(&key)
        || TARGET_ONLY_KEYS.contains(&key)
        || FULL_FEATURE_ONLY_KEYS.contains(&key)
        || OPERATIONAL_KEYS.contains(&key)
        || matches!(key, "AuthMethod" | "InitiatorAlias")
}

/// Discovery sessions only answer SendTargets; Normal sessions carry SCSI traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Which values of HeaderDigest or DataDigest the target accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestSupport {
    pub none: bool,
    pub crc32c: bool,
}

impl DigestSupport {
    pub const EITHER: DigestSupport = DigestSupport { none: true, crc32c: true };
}

/// The target's own side of the negotiation: its limits and preferences. Shared by all
/// connections of a portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Our MaxRecvDataSegmentLength, declared to the initiator: the largest data segment we
    /// accept in the Full Feature Phase.
    pub max_recv_data_segment_bytes: u32,
    /// The most we accept for MaxBurstLength (min function: we answer with the smaller).
    pub max_burst_bytes_max: u32,
    /// The most we accept for FirstBurstLength; at most `max_burst_bytes_max`.
    pub first_burst_bytes_max: u32,
    /// The most we accept for MaxOutstandingR2T.
    pub max_outstanding_r2t_max: u16,
    /// Whether we accept immediate data (AND function).
    pub immediate_data: bool,
    /// Whether we insist on InitialR2T=Yes, i.e. no unsolicited Data-Out (OR function).
    pub initial_r2t: bool,
    pub header_digests: DigestSupport,
    pub data_digests: DigestSupport,
    /// Our DefaultTime2Wait (max function).
    pub default_time2wait_s: u16,
    /// Our DefaultTime2Retain (min function). 0 fits ErrorRecoveryLevel 0: task state is not
    /// kept for a reconnecting initiator.
    pub default_time2retain_s: u16,
    /// Sent in the first Login Response of every Normal session (RFC 7143 §13.9).
    pub target_portal_group_tag: u16,
    /// Sent with it when set.
    pub target_alias: Option<String>,
    /// Commands the initiator may have outstanding: MaxCmdSN = ExpCmdSN + window - 1.
    pub command_window: u32,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            max_recv_data_segment_bytes: 256 * 1024,
            max_burst_bytes_max: 1024 * 1024,
            first_burst_bytes_max: 256 * 1024,
            max_outstanding_r2t_max: 1,
            immediate_data: true,
            initial_r2t: false,
            header_digests: DigestSupport::EITHER,
            data_digests: DigestSupport::EITHER,
            default_time2wait_s: defaults::DEFAULT_TIME2WAIT_S,
            default_time2retain_s: 0,
            target_portal_group_tag: 1,
            target_alias: None,
            command_window: 128,
        }
    }
}

/// Why a [`TargetConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{what} of {value} is outside {min}..={max}")]
    OutOfRange { what: &'static str, value: u64, min: u64, max: u64 },
    #[error("FirstBurstLength maximum exceeds the MaxBurstLength maximum")]
    FirstBurstAboveMaxBurst,
    #[error("no {0} value accepted")]
    NoDigest(&'static str),
    #[error("TargetAlias is longer than 255 bytes or contains a NUL")]
    InvalidAlias,
}

impl TargetConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |what, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { what, value, min, max })
            }
        };
        let (seg_min, seg_max) = (u64::from(SEGMENT_BYTES_MIN), u64::from(SEGMENT_BYTES_MAX));
        range("MaxRecvDataSegmentLength", self.max_recv_data_segment_bytes.into(), seg_min, seg_max)?;
        range("MaxBurstLength maximum", self.max_burst_bytes_max.into(), seg_min, seg_max)?;
        range("FirstBurstLength maximum", self.first_burst_bytes_max.into(), seg_min, seg_max)?;
        if self.first_burst_bytes_max > self.max_burst_bytes_max {
            return Err(ConfigError::FirstBurstAboveMaxBurst);
        }
        range("MaxOutstandingR2T maximum", self.max_outstanding_r2t_max.into(), 1, 65535)?;
        range("DefaultTime2Wait", self.default_time2wait_s.into(), 0, TIME2_S_MAX.into())?;
        range("DefaultTime2Retain", self.default_time2retain_s.into(), 0, TIME2_S_MAX.into())?;
        range("command window", self.command_window.into(), 1, COMMAND_WINDOW_MAX.into())?;
        if !self.header_digests.none && !self.header_digests.crc32c {
            return Err(ConfigError::NoDigest("HeaderDigest"));
        }
        if !self.data_digests.none && !self.data_digests.crc32c {
            return Err(ConfigError::NoDigest("DataDigest"));
        }
        if let Some(alias) = &self.target_alias {
            if alias.len() > VALUE_BYTES_MAX || alias.contains('\0') {
                return Err(ConfigError::InvalidAlias);
            }
        }
        Ok(())
    }
}

/// What the machine asks of the rest of the target during a login.
pub trait LoginHooks {
    /// Whether a Normal session may name this target (else 0x0203 "Not found").
    fn target_known(&self, target_name: &str) -> bool;
    /// Whether this initiator may use this target (else 0x0202 "Authorization failure").
    /// Asked once authentication has succeeded.
    fn initiator_allowed(&self, initiator_name: &str, target_name: &str) -> bool;
    /// A new, non-zero TSIH for the session, asked when the final Login Response is sent;
    /// `None` fails the login with 0x0302 "Out of resources".
    fn allocate_tsih(&mut self, initiator_name: &str, isid: Isid) -> Option<NonZeroU16>;
}

/// Who the initiator proved to be in the security stage, kept in [`SessionParams`] so that the
/// server can say who a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// `AuthMethod=None`, or no security stage: the initiator is whoever its name says.
    None,
    /// CHAP: the initiator proved it knows the secret of `user`; `mutual` when the target then
    /// proved it knows its own secret too.
    Chap { user: String, mutual: bool },
}

impl std::fmt::Display for Authentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authentication::None => f.write_str("none"),
            Authentication::Chap { user, mutual: false } => write!(f, "CHAP as {user}"),
            Authentication::Chap { user, mutual: true } => write!(f, "mutual CHAP as {user}"),
        }
    }
}

/// Where an authentication exchange stands after one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStatus {
    /// More Login Requests are needed; the security stage continues.
    InProgress,
    /// The initiator proved who it is.
    Succeeded(Authentication),
    /// Fails the login with 0x0201 "Authentication failure".
    Failed,
}

/// An authentication method, run in the SecurityNegotiation stage.
pub trait Authenticator {
    /// The AuthMethod values this target accepts from `initiator_name`, most preferred first.
    /// Asked once the initiator has named itself (its first complete text), when it offers
    /// AuthMethod or leaves the security stage without one. Listing "None" makes authentication
    /// optional for this initiator: it may then also skip the security stage; leaving "None"
    /// out fails both with 0x0201.
    fn methods(&self, initiator_name: &str) -> &[&'static str];
    /// Whether `key` belongs to a method's exchange (for CHAP: CHAP_A, CHAP_I, CHAP_C, CHAP_N,
    /// CHAP_R). Such keys go to [`Authenticator::on_keys`] instead of the negotiation.
    fn owns_key(&self, key: &str) -> bool;
    /// One step of `method` (never "None"): the method's keys from one Login Request (possibly
    /// none, on the request that chose the method) in, keys to answer appended to `reply`.
    fn on_keys(
        &mut self,
        method: &str,
        initiator_name: &str,
        target_name: Option<&str>,
        keys: &[TextPair],
        reply: &mut Vec<TextPair>,
    ) -> AuthStatus;
}

/// No authentication: offers and accepts only `AuthMethod=None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoAuthentication;

impl Authenticator for NoAuthentication {
    fn methods(&self, _initiator_name: &str) -> &[&'static str] {
        &["None"]
    }

    fn owns_key(&self, _key: &str) -> bool {
        false
    }

    fn on_keys(&mut self, _: &str, _: &str, _: Option<&str>, _: &[TextPair], _: &mut Vec<TextPair>) -> AuthStatus {
        // Never called: "None" is the only method and needs no exchange.
        AuthStatus::Failed
    }
}

/// What a completed login established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// `None` for a discovery session.
    pub target_name: Option<String>,
    pub isid: Isid,
    /// The TSIH [`LoginHooks::allocate_tsih`] gave.
    pub tsih: u16,
    pub cid: u16,
    pub digests: Digests,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment we may send.
    pub initiator_max_recv_data_segment_bytes: u32,
    /// Ours: the largest data segment the initiator may send us.
    pub target_max_recv_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub default_time2wait_s: u16,
    pub default_time2retain_s: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    /// How the initiator authenticated.
    pub authentication: Authentication,
    /// The session's first CmdSN: that of the Login Requests (they are immediate).
    pub exp_cmd_sn: u32,
    /// The StatSN of the connection's next response.
    pub stat_sn: u32,
}

impl SessionParams {
    /// What to decode the initiator's PDUs with from now on.
    pub fn receive_limits(&self) -> DecodeLimits {
        DecodeLimits { digests: self.digests, data_segment_bytes_max: self.target_max_recv_data_segment_bytes }
    }
}

/// Where a login stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    InProgress,
    /// The last response moved the connection to the Full Feature Phase.
    Complete(SessionParams),
    /// The last response carried this (non-success) status; close the connection.
    Failed(LoginStatus),
}

/// A key the target offered and awaits the initiator's answer to, because the RFC default
/// would not be acceptable and the initiator did not offer the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    HeaderDigest,
    DataDigest,
    ImmediateData,
    MaxBurstLength,
    FirstBurstLength,
}

impl Offer {
    fn key(self) -> &'static str {
        match self {
            Offer::HeaderDigest => "HeaderDigest",
            Offer::DataDigest => "DataDigest",
            Offer::ImmediateData => "ImmediateData",
            Offer::MaxBurstLength => "MaxBurstLength",
            Offer::FirstBurstLength => "FirstBurstLength",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod exchanged (yet).
    NotNegotiated,
    InProgress(String),
    Done(Authentication),
}

/// Negotiated values so far; `None` means not negotiated, so the RFC default.
#[derive(Debug)]
struct Negotiated {
    session_type: SessionType,
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    /// Every key the initiator has sent in this login, to refuse repeats (RFC 7143 §6.2).
    keys_seen: Vec<String>,
    auth: Auth,
    header_digest: Option<bool>,
    data_digest: Option<bool>,
    max_connections: Option<u16>,
    initial_r2t: Option<bool>,
    immediate_data: Option<bool>,
    initiator_mrdsl: Option<u32>,
    max_burst: Option<u32>,
    first_burst: Option<u32>,
    time2wait: Option<u16>,
    time2retain: Option<u16>,
    max_r2t: Option<u16>,
    data_pdu_in_order: Option<bool>,
    data_sequence_in_order: Option<bool>,
    error_recovery_level: Option<u8>,
    /// Whether our MaxRecvDataSegmentLength has been declared.
    declared_mrdsl: bool,
    offers: Vec<Offer>,
}

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: None,
            keys_seen: Vec::new(),
            auth: Auth::NotNegotiated,
            header_digest: None,
            data_digest: None,
            max_connections: None,
            initial_r2t: None,
            immediate_data: None,
            initiator_mrdsl: None,
            max_burst: None,
            first_burst: None,
            time2wait: None,
            time2retain: None,
            max_r2t: None,
            data_pdu_in_order: None,
            data_sequence_in_order: None,
            error_recovery_level: None,
            declared_mrdsl: false,
            offers: Vec::new(),
        }
    }
}

/// The rest of a response text longer than one Login Response, sent one piece per (empty)
/// Login Request, with the decision it ends with.
#[derive(Debug)]
struct PendingResponse {
    rest: Bytes,
    next_stage: Option<Stage>,
}

/// Login of one connection, target side. See the module documentation for the driver loop.
#[derive(Debug)]
pub struct LoginMachine<A: Authenticator = NoAuthentication> {
    config: Arc<TargetConfig>,
    auth: A,
    outcome: LoginOutcome,
    /// The stage the next request must be in (its CSG).
    stage: Stage,
    started: bool,
    /// Whether the first complete text (with the leading keys) has been handled.
    leading_done: bool,
    stat_sn: u32,
    cmd_sn: u32,
    isid: Isid,
    tsih: u16,
    cid: u16,
    pdus: usize,
    assembler: TextAssembler,
    pending: Option<PendingResponse>,
    n: Negotiated,
}

impl<A: Authenticator> LoginMachine<A> {
    /// A machine for a new connection. `first_stat_sn` is the StatSN of the first response.
    ///
    /// Panics if `config` does not [`TargetConfig::validate`]: the server validates its
    /// configuration once, at startup.
    pub fn new(config: Arc<TargetConfig>, auth: A, first_stat_sn: u32) -> Self {
        if let Err(err) = config.validate() {
            panic!("invalid iSCSI target configuration: {err}");
        }
        LoginMachine {
            config,
            auth,
            outcome: LoginOutcome::InProgress,
            stage: Stage::SecurityNegotiation,
            started: false,
            leading_done: false,
            stat_sn: first_stat_sn,
            cmd_sn: 0,
            isid: Isid::default(),
            tsih: 0,
            cid: 0,
            pdus: 0,
            assembler: TextAssembler::new(),
            pending: None,
            n: Negotiated::default(),
        }
    }

    pub fn outcome(&self) -> &LoginOutcome {
        &self.outcome
    }

    /// The negotiated parameters, once the login is complete.
    pub fn into_session_params(self) -> Option<SessionParams> {
        match self.outcome {
            LoginOutcome::Complete(params) => Some(params),
            LoginOutcome::InProgress | LoginOutcome::Failed(_) => None,
        }
    }

    /// Handles one Login Request and returns the response to send.
    pub fn on_request(&mut self, req: &LoginRequest, hooks: &mut dyn LoginHooks) -> LoginResponse {
        if self.outcome != LoginOutcome::InProgress {
            // The driver should have stopped; answer without forgetting how the login ended.
            return self.respond(req.itt, req.current_stage, None, false, Bytes::new(), LoginStatus::INITIATOR_ERROR);
        }
        let mut response = match self.step(req, hooks) {
            Ok(response) => response,
            Err(status) => self.fail(req.itt, req.current_stage, status),
        };
        // RFC 7143 §11.13: the response carries the request's ISID, also when the login fails
        // because the ISID changed between requests.
        response.isid = req.isid;
        response
    }

    /// Answers a PDU that is not a Login Request, or did not decode, during login: only Login
    /// Requests are allowed before the Full Feature Phase, so this is an initiator error that
    /// ends the login.
    pub fn on_invalid_pdu(&mut self, itt: u32) -> LoginResponse {
        self.fail(itt, self.stage, LoginStatus::INITIATOR_ERROR)
    }

    fn fail(&mut self, itt: u32, current_stage: Stage, status: LoginStatus) -> LoginResponse {
        if self.outcome == LoginOutcome::InProgress {
            self.outcome = LoginOutcome::Failed(status);
        }
        self.pending = None;
        self.respond(itt, current_stage, None, false, Bytes::new(), status)
    }

    fn respond(
        &mut self,
        itt: u32,
        current_stage: Stage,
        next_stage: Option<Stage>,
        continues: bool,
        data: Bytes,
        status: LoginStatus,
    ) -> LoginResponse {
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        LoginResponse {
            next_stage,
            continues,
            current_stage,
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            isid: self.isid,
            tsih: self.tsih,
            itt,
            stat_sn,
            exp_cmd_sn: self.cmd_sn,
            max_cmd_sn: self.cmd_sn.wrapping_add(self.config.command_window - 1),
            status,
            data,
        }
    }

    fn step(&mut self, req: &LoginRequest, hooks: &mut dyn LoginHooks) -> Result<LoginResponse, LoginStatus> {
        self.pdus += 1;
        if self.pdus > LOGIN_PDUS_MAX {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        if !self.started {
            self.started = true;
            self.isid = req.isid;
            self.tsih = req.tsih;
            self.cid = req.cid;
            self.cmd_sn = req.cmd_sn;
            self.stage = req.current_stage;
            // Version 0 (RFC 7143) is the only one: a range that leaves it out starts above it.
            if req.version_min > ISCSI_VERSION {
                return Err(LoginStatus::UNSUPPORTED_VERSION);
            }
            if req.tsih != 0 {
                // Adding a connection to a session: MaxConnections is 1.
                return Err(LoginStatus::CANT_INCLUDE_IN_SESSION);
            }
            if req.current_stage == Stage::FullFeaturePhase {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
        } else if req.isid != self.isid
            || req.tsih != self.tsih
            || req.cid != self.cid
            || req.current_stage != self.stage
        {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        self.cmd_sn = req.cmd_sn;
        // RFC 7143 §11.12.2: T and C are never both set, and a transit goes forward.
        if req.next_stage.is_some() && req.continues {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        if req.next_stage.is_some_and(|next| next <= req.current_stage) {
            return Err(LoginStatus::INITIATOR_ERROR);
        }

        if let Some(pending) = self.pending.take() {
            // The initiator acknowledges a partial response with an empty request.
            if !req.data.is_empty() || req.continues {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            return self.send(req, pending.next_stage, pending.rest, hooks);
        }

        let text = match self.assembler.push(&req.data, req.continues) {
            Err(_) => return Err(LoginStatus::INITIATOR_ERROR),
            // Part of a text: acknowledge with an empty response, stay in the stage.
            Ok(None) => {
                return Ok(self.respond(req.itt, req.current_stage, None, false, Bytes::new(), LoginStatus::SUCCESS))
            }
            Ok(Some(text)) => text,
        };
        let pairs = parse_text(&text).map_err(|_| LoginStatus::INITIATOR_ERROR)?;
        let first_text = !self.leading_done;
        if first_text {
            self.leading_done = true;
            self.check_leading_keys(&pairs, hooks)?;
            if self.stage == Stage::LoginOperationalNegotiation {
                // The initiator skipped the security stage.
                self.security_done(hooks)?;
            }
        }
        let mut reply = Vec::new();
        let next_stage = match self.stage {
            Stage::SecurityNegotiation => {
                self.negotiate_security(&pairs, req.next_stage, first_text, &mut reply, hooks)?
            }
            Stage::LoginOperationalNegotiation => {
                self.negotiate_operational(&pairs, req.next_stage, first_text, &mut reply)?
            }
            Stage::FullFeaturePhase => return Err(LoginStatus::INITIATOR_ERROR),
        };
        if first_text && self.n.session_type == SessionType::Normal {
            reply.push(TextPair::new("TargetPortalGroupTag", self.config.target_portal_group_tag.to_string()));
            if let Some(alias) = &self.config.target_alias {
                reply.push(TextPair::new("TargetAlias", alias.clone()));
            }
        }
        if next_stage == Some(Stage::FullFeaturePhase) {
            self.check_final_values()?;
        }
        self.send(req, next_stage, Bytes::from(encode_text(&reply)), hooks)
    }

    /// Sends `text`, in pieces when it exceeds [`LOGIN_DATA_SEGMENT_BYTES`]: every piece but
    /// the last has C set and no transit.
    fn send(
        &mut self,
        req: &LoginRequest,
        next_stage: Option<Stage>,
        text: Bytes,
        hooks: &mut dyn LoginHooks,
    ) -> Result<LoginResponse, LoginStatus> {
        if text.len() > LOGIN_DATA_SEGMENT_BYTES {
            let piece = text.slice(..LOGIN_DATA_SEGMENT_BYTES);
            self.pending = Some(PendingResponse { rest: text.slice(LOGIN_DATA_SEGMENT_BYTES..), next_stage });
            return Ok(self.respond(req.itt, req.current_stage, None, true, piece, LoginStatus::SUCCESS));
        }
        let mut params = None;
        if next_stage == Some(Stage::FullFeaturePhase) {
            let tsih = hooks.allocate_tsih(&self.n.initiator_name, self.isid).ok_or(LoginStatus::OUT_OF_RESOURCES)?;
            self.tsih = tsih.get();
            params = Some(self.session_params());
        }
        if let Some(stage) = next_stage {
            self.stage = stage;
        }
        let response = self.respond(req.itt, req.current_stage, next_stage, false, text, LoginStatus::SUCCESS);
        if let Some(mut params) = params {
            params.exp_cmd_sn = self.cmd_sn;
            params.stat_sn = self.stat_sn;
            self.outcome = LoginOutcome::Complete(params);
        }
        Ok(response)
    }

    /// InitiatorName, SessionType and TargetName, which RFC 7143 §6.3 requires in the first
    /// Login Request (here: its first complete text).
    fn check_leading_keys(&mut self, pairs: &[TextPair], hooks: &dyn LoginHooks) -> Result<(), LoginStatus> {
        let get = |key: &str| pairs.iter().find(|pair| pair.key == key).map(|pair| pair.value.as_str());
        self.n.session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED),
        };
        let initiator = get("InitiatorName").ok_or(LoginStatus::MISSING_PARAMETER)?;
        if !is_valid_name(initiator) {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        self.n.initiator_name = initiator.to_string();
        if self.n.session_type == SessionType::Normal {
            let target = get("TargetName").ok_or(LoginStatus::MISSING_PARAMETER)?;
            if !is_valid_name(target) || !hooks.target_known(target) {
                return Err(LoginStatus::NOT_FOUND);
            }
            self.n.target_name = Some(target.to_string());
        }
        for key in LEADING_KEYS {
            if get(key).is_some() {
                self.note_key(key)?;
            }
        }
        Ok(())
    }

    /// Authentication is over (or was skipped): authorize before leaving the security stage.
    fn security_done(&mut self, hooks: &dyn LoginHooks) -> Result<(), LoginStatus> {
        if self.n.auth == Auth::NotNegotiated {
            if !self.auth.methods(&self.n.initiator_name).contains(&NONE) {
                return Err(LoginStatus::AUTHENTICATION_FAILURE);
            }
            self.n.auth = Auth::Done(Authentication::None);
        }
        if let Some(target) = &self.n.target_name {
            if !hooks.initiator_allowed(&self.n.initiator_name, target) {
                return Err(LoginStatus::AUTHORIZATION_FAILURE);
            }
        }
        Ok(())
    }

    fn note_key(&mut self, key: &str) -> Result<(), LoginStatus> {
        if self.n.keys_seen.len() >= LOGIN_KEYS_MAX || self.n.keys_seen.iter().any(|seen| seen == key) {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        self.n.keys_seen.push(key.to_string());
        Ok(())
    }

    fn negotiate_security(
        &mut self,
        pairs: &[TextPair],
        next_stage: Option<Stage>,
        first_text: bool,
        reply: &mut Vec<TextPair>,
        hooks: &dyn LoginHooks,
    ) -> Result<Option<Stage>, LoginStatus> {
        let mut auth_keys = Vec::new();
        for pair in pairs {
            let (key, value) = (pair.key.as_str(), pair.value.as_str());
            if first_text && LEADING_KEYS.contains(&key) {
                continue;
            }
            if self.auth.owns_key(key) {
                auth_keys.push(pair.clone());
                continue;
            }
            self.note_key(key)?;
            match key {
                "AuthMethod" => {
                    let methods = self.auth.methods(&self.n.initiator_name);
                    let chosen = list_items(value).find(|method| methods.contains(method));
                    let Some(chosen) = chosen else { return Err(LoginStatus::AUTHENTICATION_FAILURE) };
                    self.n.auth = if chosen == NONE {
                        Auth::Done(Authentication::None)
                    } else {
                        Auth::InProgress(chosen.to_string())
                    };
                    reply.push(TextPair::new(key, chosen));
                }
                "InitiatorAlias" => self.n.initiator_alias = Some(value.to_string()),
                _ if TARGET_ONLY_KEYS.contains(&key) || FULL_FEATURE_ONLY_KEYS.contains(&key) => {
                    reply.push(TextPair::new(key, REJECT))
                }
                // Operational keys belong to the next stage (RFC 7143 §6.3).
                _ if OPERATIONAL_KEYS.contains(&key) || LEADING_KEYS.contains(&key) => {
                    return Err(LoginStatus::INITIATOR_ERROR)
                }
                _ => reply.push(TextPair::new(key, NOT_UNDERSTOOD)),
            }
        }
        if let Auth::InProgress(method) = &self.n.auth {
            let target = self.n.target_name.as_deref();
            match self.auth.on_keys(method, &self.n.initiator_name, target, &auth_keys, reply) {
                AuthStatus::InProgress => {}
                AuthStatus::Succeeded(authentication) => self.n.auth = Auth::Done(authentication),
                AuthStatus::Failed => return Err(LoginStatus::AUTHENTICATION_FAILURE),
            }
        } else if !auth_keys.is_empty() {
            // A method's keys before the method was chosen.
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        let Some(next) = next_stage else { return Ok(None) };
        if matches!(self.n.auth, Auth::InProgress(_)) {
            // Not done authenticating: hold the stage (the target may always answer T=0).
            return Ok(None);
        }
        self.security_done(hooks)?;
        // Skipping the operational stage leaves every key at its default; if a default is
        // not acceptable to us, stop in the operational stage to offer it.
        if next == Stage::FullFeaturePhase && !self.offers_needed().is_empty() {
            return Ok(Some(Stage::LoginOperationalNegotiation));
        }
        Ok(Some(next))
    }

    fn negotiate_operational(
        &mut self,
        pairs: &[TextPair],
        next_stage: Option<Stage>,
        first_text: bool,
        reply: &mut Vec<TextPair>,
    ) -> Result<Option<Stage>, LoginStatus> {
        for pair in pairs {
            let (key, value) = (pair.key.as_str(), pair.value.as_str());
            if first_text && LEADING_KEYS.contains(&key) {
                continue;
            }
            if let Some(at) = self.n.offers.iter().position(|offer| offer.key() == key) {
                let offer = self.n.offers.remove(at);
                self.take_answer(offer, value)?;
                continue;
            }
            if key == "AuthMethod" || self.auth.owns_key(key) {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
            self.note_key(key)?;
            if let Some(answer) = self.answer(key, value)? {
                reply.push(TextPair::new(key, answer));
            }
        }
        if !self.n.declared_mrdsl {
            self.n.declared_mrdsl = true;
            reply.push(TextPair::new("MaxRecvDataSegmentLength", self.config.max_recv_data_segment_bytes.to_string()));
        }
        if next_stage.is_none() {
            return Ok(None);
        }
        if !self.n.offers.is_empty() {
            // Asked to leave without answering what we offered.
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        let offers = self.offers_needed();
        if !offers.is_empty() {
            for offer in offers {
                reply.push(TextPair::new(offer.key(), self.offer_value(offer)));
                self.n.offers.push(offer);
            }
            return Ok(None);
        }
        Ok(Some(Stage::FullFeaturePhase))
    }

    /// Our answer to an operational key the initiator offered, applying the key's result
    /// function (RFC 7143 §6.2, §13); `None` for declarations, which get no answer. An
    /// unacceptable value is answered Reject and leaves the key at its default.
    fn answer(&mut self, key: &str, value: &str) -> Result<Option<String>, LoginStatus> {
        let config = Arc::clone(&self.config);
        if self.n.session_type == SessionType::Discovery && IRRELEVANT_IN_DISCOVERY.contains(&key) {
            return Ok(Some(IRRELEVANT.to_string()));
        }
        let n = &mut self.n;
        let answer = match key {
            "HeaderDigest" => answer_digest(value, config.header_digests, &mut n.header_digest),
            "DataDigest" => answer_digest(value, config.data_digests, &mut n.data_digest),
            "MaxConnections" => answer_number(
                value,
                1,
                65535,
                |v| v.min(u64::from(defaults::MAX_CONNECTIONS)),
                |r| n.max_connections = Some(r as u16),
            ),
            "InitialR2T" => answer_bool(value, |v| v || config.initial_r2t, |r| n.initial_r2t = Some(r)),
            "ImmediateData" => answer_bool(value, |v| v && config.immediate_data, |r| n.immediate_data = Some(r)),
            "MaxRecvDataSegmentLength" => {
                // A declaration: nothing to answer, but a value we cannot honour is fatal.
                let v = number_in(value, SEGMENT_BYTES_MIN.into(), SEGMENT_BYTES_MAX.into())
                    .ok_or(LoginStatus::INITIATOR_ERROR)?;
                n.initiator_mrdsl = Some(v as u32);
                return Ok(None);
            }
            "MaxBurstLength" => answer_number(
                value,
                SEGMENT_BYTES_MIN.into(),
                SEGMENT_BYTES_MAX.into(),
                |v| v.min(config.max_burst_bytes_max.into()),
                |r| n.max_burst = Some(r as u32),
            ),
            "FirstBurstLength" => answer_number(
                value,
                SEGMENT_BYTES_MIN.into(),
                SEGMENT_BYTES_MAX.into(),
                |v| v.min(config.first_burst_bytes_max.into()),
                |r| n.first_burst = Some(r as u32),
            ),
            "DefaultTime2Wait" => answer_number(
                value,
                0,
                TIME2_S_MAX.into(),
                |v| v.max(config.default_time2wait_s.into()),
                |r| n.time2wait = Some(r as u16),
            ),
            "DefaultTime2Retain" => answer_number(
                value,
                0,
                TIME2_S_MAX.into(),
                |v| v.min(config.default_time2retain_s.into()),
                |r| n.time2retain = Some(r as u16),
            ),
            "MaxOutstandingR2T" => answer_number(
                value,
                1,
                65535,
                |v| v.min(config.max_outstanding_r2t_max.into()),
                |r| n.max_r2t = Some(r as u16),
            ),
            // We need data in order: OR with our Yes.
            "DataPDUInOrder" => answer_bool(value, |_| true, |r| n.data_pdu_in_order = Some(r)),
            "DataSequenceInOrder" => answer_bool(value, |_| true, |r| n.data_sequence_in_order = Some(r)),
            // Level 0 only: min with our 0.
            "ErrorRecoveryLevel" => answer_number(value, 0, 2, |_| 0, |r| n.error_recovery_level = Some(r as u8)),
            // RFC 3720 markers: AND with our No, and their intervals are then irrelevant.
            "OFMarker" | "IFMarker" => answer_bool(value, |_| false, |_| {}),
            "OFMarkInt" | "IFMarkInt" => IRRELEVANT.to_string(),
            "InitiatorAlias" => {
                n.initiator_alias = Some(value.to_string());
                return Ok(None);
            }
            _ if TARGET_ONLY_KEYS.contains(&key) || FULL_FEATURE_ONLY_KEYS.contains(&key) => REJECT.to_string(),
            _ if LEADING_KEYS.contains(&key) => return Err(LoginStatus::INITIATOR_ERROR),
            _ => NOT_UNDERSTOOD.to_string(),
        };
        Ok(Some(answer))
    }

    fn effective_max_burst(&self) -> u32 {
        self.n.max_burst.unwrap_or(defaults::MAX_BURST_BYTES)
    }

    /// Keys nobody negotiated whose default we cannot accept: we offer them ourselves.
    fn offers_needed(&self) -> Vec<Offer> {
        let (config, n) = (&self.config, &self.n);
        let mut offers = Vec::new();
        if n.header_digest.is_none() && !config.header_digests.none {
            offers.push(Offer::HeaderDigest);
        }
        if n.data_digest.is_none() && !config.data_digests.none {
            offers.push(Offer::DataDigest);
        }
        if n.session_type == SessionType::Normal {
            if n.immediate_data.is_none() && !config.immediate_data {
                offers.push(Offer::ImmediateData);
            }
            if n.max_burst.is_none() && defaults::MAX_BURST_BYTES > config.max_burst_bytes_max {
                offers.push(Offer::MaxBurstLength);
            }
            let max_burst = n.max_burst.unwrap_or(defaults::MAX_BURST_BYTES.min(config.max_burst_bytes_max));
            if n.first_burst.is_none() && defaults::FIRST_BURST_BYTES > config.first_burst_bytes_max.min(max_burst) {
                offers.push(Offer::FirstBurstLength);
            }
        }
        offers
    }

    fn offer_value(&self, offer: Offer) -> String {
        match offer {
            Offer::HeaderDigest | Offer::DataDigest => CRC32C.to_string(),
            Offer::ImmediateData => bool_value(false).to_string(),
            Offer::MaxBurstLength => self.config.max_burst_bytes_max.to_string(),
            Offer::FirstBurstLength => self.first_burst_offer().to_string(),
        }
    }

    fn first_burst_offer(&self) -> u32 {
        let max_burst = self.n.max_burst.unwrap_or(self.config.max_burst_bytes_max);
        self.config.first_burst_bytes_max.min(max_burst)
    }

    /// The initiator's answer to one of our offers must be the offer's result, or the login
    /// cannot go on: we offered only because the default is unacceptable.
    fn take_answer(&mut self, offer: Offer, value: &str) -> Result<(), LoginStatus> {
        let fail = Err(LoginStatus::INITIATOR_ERROR);
        match offer {
            Offer::HeaderDigest | Offer::DataDigest if value == CRC32C => {
                let slot =
                    if offer == Offer::HeaderDigest { &mut self.n.header_digest } else { &mut self.n.data_digest };
                *slot = Some(true);
            }
            Offer::ImmediateData if value == bool_value(false) => self.n.immediate_data = Some(false),
            Offer::MaxBurstLength => {
                match number_in(value, SEGMENT_BYTES_MIN.into(), self.config.max_burst_bytes_max.into()) {
                    Some(v) => self.n.max_burst = Some(v as u32),
                    None => return fail,
                }
            }
            Offer::FirstBurstLength => {
                match number_in(value, SEGMENT_BYTES_MIN.into(), self.first_burst_offer().into()) {
                    Some(v) => self.n.first_burst = Some(v as u32),
                    None => return fail,
                }
            }
            _ => return fail,
        }
        Ok(())
    }

    /// Values that only make sense together, checked before the final response.
    fn check_final_values(&self) -> Result<(), LoginStatus> {
        let n = &self.n;
        if n.session_type == SessionType::Normal {
            let first_burst = n.first_burst.unwrap_or(defaults::FIRST_BURST_BYTES);
            // RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
            if first_burst > self.effective_max_burst() {
                return Err(LoginStatus::INITIATOR_ERROR);
            }
        }
        Ok(())
    }

    fn session_params(&self) -> SessionParams {
        let n = &self.n;
        SessionParams {
            session_type: n.session_type,
            initiator_name: n.initiator_name.clone(),
            initiator_alias: n.initiator_alias.clone(),
            target_name: n.target_name.clone(),
            isid: self.isid,
            tsih: self.tsih,
            cid: self.cid,
            digests: Digests { header: n.header_digest.unwrap_or(false), data: n.data_digest.unwrap_or(false) },
            max_connections: n.max_connections.unwrap_or(defaults::MAX_CONNECTIONS),
            initial_r2t: n.initial_r2t.unwrap_or(defaults::INITIAL_R2T),
            immediate_data: n.immediate_data.unwrap_or(defaults::IMMEDIATE_DATA),
            initiator_max_recv_data_segment_bytes: n.initiator_mrdsl.unwrap_or(defaults::MAX_RECV_DATA_SEGMENT_BYTES),
            target_max_recv_data_segment_bytes: if n.declared_mrdsl {
                self.config.max_recv_data_segment_bytes
            } else {
                defaults::MAX_RECV_DATA_SEGMENT_BYTES
            },
            max_burst_bytes: self.effective_max_burst(),
            first_burst_bytes: n.first_burst.unwrap_or(defaults::FIRST_BURST_BYTES),
            default_time2wait_s: n.time2wait.unwrap_or(defaults::DEFAULT_TIME2WAIT_S),
            default_time2retain_s: n.time2retain.unwrap_or(defaults::DEFAULT_TIME2RETAIN_S),
            max_outstanding_r2t: n.max_r2t.unwrap_or(defaults::MAX_OUTSTANDING_R2T),
            data_pdu_in_order: n.data_pdu_in_order.unwrap_or(defaults::DATA_PDU_IN_ORDER),
            data_sequence_in_order: n.data_sequence_in_order.unwrap_or(defaults::DATA_SEQUENCE_IN_ORDER),
            error_recovery_level: n.error_recovery_level.unwrap_or(defaults::ERROR_RECOVERY_LEVEL),
            authentication: match &n.auth {
                Auth::Done(authentication) => authentication.clone(),
                Auth::NotNegotiated | Auth::InProgress(_) => {
                    unreachable!("the security stage is left only through security_done")
                }
            },
            exp_cmd_sn: self.cmd_sn,
            stat_sn: self.stat_sn,
        }
    }
}

const CRC32C: &str = "CRC32C";
const NONE: &str = "None";

fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= ISCSI_NAME_BYTES_MAX
}

fn number_in(value: &str, min: u64, max: u64) -> Option<u64> {
    parse_number(value).ok().filter(|v| (min..=max).contains(v))
}

/// List negotiation: the first of the initiator's values that we support, else Reject.
fn answer_digest(value: &str, support: DigestSupport, slot: &mut Option<bool>) -> String {
    let chosen = list_items(value).find_map(|item| match item {
        CRC32C if support.crc32c => Some(true),
        NONE if support.none => Some(false),
        _ => None,
    });
    match chosen {
        Some(crc) => {
            *slot = Some(crc);
            if crc { CRC32C } else { NONE }.to_string()
        }
        None => REJECT.to_string(),
    }
}

fn answer_number(value: &str, min: u64, max: u64, result: impl FnOnce(u64) -> u64, store: impl FnOnce(u64)) -> String {
    match number_in(value, min, max) {
        Some(v) => {
            let r = result(v);
            store(r);
            r.to_string()
        }
        None => REJECT.to_string(),
    }
}

fn answer_bool(value: &str, result: impl FnOnce(bool) -> bool, store: impl FnOnce(bool)) -> String {
    match parse_bool(value) {
        Ok(v) => {
            let r = result(v);
            store(r);
            bool_value(r).to_string()
        }
        Err(_) => REJECT.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{Pdu, BHS_BYTES};
    use crate::text::encode_pair;
    use proptest::prelude::*;

    const INITIATOR: &str = "iqn.2005-03.org.open-iscsi:initiator";
    const TARGET: &str = "iqn.2024-01.io.tandem:vol1";
    const ISID: Isid = Isid([0x80, 0, 0x02, 0x3d, 0, 0]);

    struct Hooks {
        allowed: bool,
        tsih: Option<NonZeroU16>,
    }

    impl Default for Hooks {
        fn default() -> Self {
            Hooks { allowed: true, tsih: NonZeroU16::new(7) }
        }
    }

    impl LoginHooks for Hooks {
        fn target_known(&self, target_name: &str) -> bool {
            target_name == TARGET
        }

        fn initiator_allowed(&self, initiator_name: &str, target_name: &str) -> bool {
            assert_eq!((initiator_name, target_name), (INITIATOR, TARGET));
            self.allowed
        }

        fn allocate_tsih(&mut self, initiator_name: &str, isid: Isid) -> Option<NonZeroU16> {
            assert_eq!((initiator_name, isid), (INITIATOR, ISID));
            self.tsih
        }
    }

    fn machine() -> LoginMachine {
        machine_with(TargetConfig::default())
    }

    fn machine_with(config: TargetConfig) -> LoginMachine {
        LoginMachine::new(Arc::new(config), NoAuthentication, 1000)
    }

    fn text(pairs: &[(&str, &str)]) -> Bytes {
        let mut out = Vec::new();
        for (key, value) in pairs {
            encode_pair(&mut out, key, value);
        }
        Bytes::from(out)
    }

    fn request(current: Stage, next: Option<Stage>, pairs: &[(&str, &str)]) -> LoginRequest {
        LoginRequest {
            next_stage: next,
            continues: false,
            current_stage: current,
            version_max: 0,
            version_min: 0,
            isid: ISID,
            tsih: 0,
            itt: 0x10,
            cid: 1,
            cmd_sn: 0x20,
            exp_stat_sn: 0,
            data: text(pairs),
        }
    }

    /// Sends a request and checks what every response must satisfy: it encodes and decodes
    /// under the login limits, echoes the request, and fits one login data segment.
    fn exchange<A: Authenticator>(m: &mut LoginMachine<A>, req: &LoginRequest, hooks: &mut Hooks) -> LoginResponse {
        let response = m.on_request(req, hooks);
        assert!(response.data.len() <= LOGIN_DATA_SEGMENT_BYTES);
        assert_eq!((response.itt, response.isid), (req.itt, req.isid));
        assert!(!(response.continues && response.next_stage.is_some()), "T and C both set");
        let mut wire = Vec::new();
        Pdu::LoginResponse(response.clone()).encode(Digests::NONE, &mut wire);
        let bhs: [u8; BHS_BYTES] = wire[..BHS_BYTES].try_into().unwrap();
        let decoded = crate::pdu::decode(&bhs, Bytes::copy_from_slice(&wire[BHS_BYTES..]), &DecodeLimits::LOGIN);
        assert_eq!(decoded, Ok(Pdu::LoginResponse(response.clone())));
        response
    }

    fn answers(response: &LoginResponse) -> Vec<(String, String)> {
        parse_text(&response.data).unwrap().into_iter().map(|p| (p.key, p.value)).collect()
    }

    fn answer(response: &LoginResponse, key: &str) -> Option<String> {
        answers(response).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn failed_with<A: Authenticator>(m: &LoginMachine<A>, response: &LoginResponse, status: LoginStatus) {
        assert_eq!(response.status, status);
        assert_eq!(response.next_stage, None);
        assert!(response.data.is_empty());
        assert_eq!(m.outcome(), &LoginOutcome::Failed(status));
    }

    const LEADING: [(&str, &str); 3] =
        [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")];

    /// What libiscsi sends in the operational stage.
    const LIBISCSI_OPERATIONAL: [(&str, &str); 14] = [
        ("HeaderDigest", "None,CRC32C"),
        ("DataDigest", "None"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "262144"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("ErrorRecoveryLevel", "0"),
        ("MaxConnections", "1"),
        ("MaxOutstandingR2T", "1"),
    ];

    #[test]
    fn libiscsi_like_login_through_both_stages() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut first = LEADING.to_vec();
        first.push(("AuthMethod", "None"));
        let req = request(Stage::SecurityNegotiation, Some(Stage::LoginOperationalNegotiation), &first);
        let r = exchange(&mut m, &req, &mut hooks);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert_eq!(
            (r.current_stage, r.next_stage),
            (Stage::SecurityNegotiation, Some(Stage::LoginOperationalNegotiation))
        );
        assert_eq!((r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn), (1000, 0x20, 0x20 + 127));
        assert_eq!((r.tsih, r.version_max, r.version_active), (0, 0, 0));
        assert_eq!(
            answers(&r),
            [("AuthMethod".to_string(), "None".to_string()), ("TargetPortalGroupTag".into(), "1".into())]
        );
        assert_eq!(m.outcome(), &LoginOutcome::InProgress);

        let mut req = request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &LIBISCSI_OPERATIONAL);
        req.exp_stat_sn = 1001;
        let r = exchange(&mut m, &req, &mut hooks);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
        assert_eq!((r.stat_sn, r.tsih), (1001, 7));
        let expected: Vec<(String, String)> = [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
            ("MaxOutstandingR2T", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(answers(&r), expected);

        let params = m.into_session_params().expect("complete");
        assert_eq!(
            params,
            SessionParams {
                session_type: SessionType::Normal,
                initiator_name: INITIATOR.into(),
                initiator_alias: None,
                target_name: Some(TARGET.into()),
                isid: ISID,
                tsih: 7,
                cid: 1,
                digests: Digests::NONE,
                max_connections: 1,
                initial_r2t: false,
                immediate_data: true,
                initiator_max_recv_data_segment_bytes: 262_144,
                target_max_recv_data_segment_bytes: 262_144,
                max_burst_bytes: 262_144,
                first_burst_bytes: 262_144,
                default_time2wait_s: 2,
                default_time2retain_s: 0,
                max_outstanding_r2t: 1,
                data_pdu_in_order: true,
                data_sequence_in_order: true,
                error_recovery_level: 0,
                authentication: Authentication::None,
                exp_cmd_sn: 0x20,
                stat_sn: 1002,
            }
        );
        assert_eq!(params.receive_limits(), DecodeLimits { digests: Digests::NONE, data_segment_bytes_max: 262_144 });
    }

    #[test]
    fn open_iscsi_like_login_straight_to_operational_stage() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let req = request(
            Stage::LoginOperationalNegotiation,
            Some(Stage::FullFeaturePhase),
            &[
                ("InitiatorName", INITIATOR),
                ("InitiatorAlias", "host1"),
                ("TargetName", TARGET),
                ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "CRC32C,None"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "0"),
                ("IFMarker", "No"),
                ("OFMarker", "No"),
                ("ErrorRecoveryLevel", "0"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"),
                ("MaxConnections", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("MaxOutstandingR2T", "1"),
                ("MaxRecvDataSegmentLength", "262144"),
            ],
        );
        let r = exchange(&mut m, &req, &mut hooks);
        assert_eq!(r.status, LoginStatus::SUCCESS);
        assert_eq!(
            (r.current_stage, r.next_stage, r.tsih),
            (Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), 7)
        );
        assert_eq!(answer(&r, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(answer(&r, "DataDigest").as_deref(), Some("CRC32C"));
        assert_eq!(answer(&r, "MaxBurstLength").as_deref(), Some("1048576"));
        assert_eq!(answer(&r, "IFMarker").as_deref(), Some("No"));
        assert_eq!(answer(&r, "OFMarker").as_deref(), Some("No"));
        assert_eq!(answer(&r, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(answer(&r, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        assert_eq!(answer(&r, "InitiatorAlias"), None, "declarations get no answer");
        let params = m.into_session_params().expect("complete");
        assert_eq!(params.digests, Digests::BOTH);
        assert_eq!(params.max_burst_bytes, 1_048_576);
        assert_eq!(params.initiator_alias.as_deref(), Some("host1"));
        assert_eq!(params.stat_sn, 1001);
    }

    #[test]
    fn security_straight_to_full_feature_keeps_defaults() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys = LEADING.to_vec();
        keys.push(("AuthMethod", "None"));
        let r =
            exchange(&mut m, &request(Stage::SecurityNegotiation, Some(Stage::FullFeaturePhase), &keys), &mut hooks);
        assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
        let params = m.into_session_params().expect("complete");
        assert_eq!(params.target_max_recv_data_segment_bytes, defaults::MAX_RECV_DATA_SEGMENT_BYTES);
        assert_eq!(params.initiator_max_recv_data_segment_bytes, defaults::MAX_RECV_DATA_SEGMENT_BYTES);
        assert_eq!((params.max_burst_bytes, params.first_burst_bytes), (262_144, 65_536));
        assert!(params.initial_r2t && params.immediate_data);
        assert_eq!(params.default_time2retain_s, 20);
    }

    #[test]
    fn security_stage_held_until_the_initiator_asks_to_transit() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys = LEADING.to_vec();
        keys.push(("AuthMethod", "CHAP,None"));
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, None, &keys), &mut hooks);
        assert_eq!((r.next_stage, answer(&r, "AuthMethod").as_deref()), (None, Some("None")));
        let r = exchange(
            &mut m,
            &request(Stage::SecurityNegotiation, Some(Stage::LoginOperationalNegotiation), &[]),
            &mut hooks,
        );
        assert_eq!(r.next_stage, Some(Stage::LoginOperationalNegotiation));
        assert_eq!(answer(&r, "TargetPortalGroupTag"), None, "only in the first response");
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, None, &[("MaxConnections", "4")]),
            &mut hooks,
        );
        assert_eq!(answer(&r, "MaxConnections").as_deref(), Some("1"));
        assert_eq!(answer(&r, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]),
            &mut hooks,
        );
        assert_eq!(answer(&r, "MaxRecvDataSegmentLength"), None, "declared once");
        assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
        assert_eq!(r.stat_sn, 1003);
        assert!(matches!(m.outcome(), LoginOutcome::Complete(p) if p.stat_sn == 1004));
    }

    #[test]
    fn unknown_target_only_and_marker_keys() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys = LEADING.to_vec();
        keys.extend([
            ("X-com.example.Foo", "1"),
            ("X#vendor", "2"),
            ("TaskReporting", "ResponseFence"),
            ("TargetAlias", "mine"),
            ("OFMarkInt", "2048~8192"),
            ("SendTargets", "All"),
        ]);
        let r = exchange(&mut m, &request(Stage::LoginOperationalNegotiation, None, &keys), &mut hooks);
        assert_eq!(r.status, LoginStatus::SUCCESS, "{:?}", answers(&r));
        assert_eq!(answer(&r, "X-com.example.Foo").as_deref(), Some(NOT_UNDERSTOOD));
        assert_eq!(answer(&r, "X#vendor").as_deref(), Some(NOT_UNDERSTOOD));
        assert_eq!(answer(&r, "TaskReporting").as_deref(), Some(NOT_UNDERSTOOD));
        assert_eq!(answer(&r, "TargetAlias").as_deref(), Some(REJECT));
        assert_eq!(answer(&r, "OFMarkInt").as_deref(), Some(IRRELEVANT));
        assert_eq!(answer(&r, "SendTargets").as_deref(), Some(REJECT));
    }

    #[test]
    fn invalid_values_are_rejected_and_leave_defaults() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys = LEADING.to_vec();
        keys.extend([
            ("MaxBurstLength", "100"),
            ("InitialR2T", "maybe"),
            ("HeaderDigest", "MD5"),
            ("ErrorRecoveryLevel", "3"),
        ]);
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &keys),
            &mut hooks,
        );
        for key in ["MaxBurstLength", "InitialR2T", "HeaderDigest", "ErrorRecoveryLevel"] {
            assert_eq!(answer(&r, key).as_deref(), Some(REJECT), "{key}");
        }
        let params = m.into_session_params().expect("complete");
        assert_eq!((params.max_burst_bytes, params.initial_r2t, params.digests), (262_144, true, Digests::NONE));
    }

    #[test]
    fn target_offers_keys_whose_defaults_it_cannot_accept() {
        let config = TargetConfig {
            immediate_data: false,
            max_burst_bytes_max: 65_536,
            first_burst_bytes_max: 16_384,
            header_digests: DigestSupport { none: false, crc32c: true },
            ..TargetConfig::default()
        };
        let (mut m, mut hooks) = (machine_with(config.clone()), Hooks::default());
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &LEADING),
            &mut hooks,
        );
        assert_eq!(r.next_stage, None, "offers need answers first");
        assert_eq!(answer(&r, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(answer(&r, "ImmediateData").as_deref(), Some("No"));
        assert_eq!(answer(&r, "MaxBurstLength").as_deref(), Some("65536"));
        assert_eq!(answer(&r, "FirstBurstLength").as_deref(), Some("16384"));
        let answers_ok = [
            ("HeaderDigest", "CRC32C"),
            ("ImmediateData", "No"),
            ("MaxBurstLength", "32768"),
            ("FirstBurstLength", "16384"),
        ];
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &answers_ok),
            &mut hooks,
        );
        assert!(answers(&r).is_empty(), "answers to our offers get no reply: {:?}", answers(&r));
        assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
        let params = m.into_session_params().expect("complete");
        assert_eq!(params.digests, Digests { header: true, data: false });
        assert!(!params.immediate_data);
        assert_eq!((params.max_burst_bytes, params.first_burst_bytes), (32_768, 16_384));

        // A wrong answer, or leaving without answering, ends the login.
        let (mut m, mut hooks) = (machine_with(config.clone()), Hooks::default());
        exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &LEADING),
            &mut hooks,
        );
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, None, &[("HeaderDigest", "Reject")]),
            &mut hooks,
        );
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);
        let (mut m, mut hooks) = (machine_with(config.clone()), Hooks::default());
        exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &LEADING),
            &mut hooks,
        );
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]),
            &mut hooks,
        );
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);

        // Skipping the operational stage is turned into a stop there.
        let (mut m, mut hooks) = (machine_with(config), Hooks::default());
        let mut keys = LEADING.to_vec();
        keys.push(("AuthMethod", "None"));
        let r =
            exchange(&mut m, &request(Stage::SecurityNegotiation, Some(Stage::FullFeaturePhase), &keys), &mut hooks);
        assert_eq!(r.next_stage, Some(Stage::LoginOperationalNegotiation));
    }

    #[test]
    fn continued_request_and_response() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys: Vec<(String, String)> = LEADING.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        // 150 vendor keys: ~12 KiB of request, ~14 KiB of NotUnderstood answers.
        for i in 0..150 {
            keys.push((format!("X-com.example.{i:03}.{}", "k".repeat(40)), "v".repeat(20)));
        }
        let refs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let whole = request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &refs).data;
        assert!(whole.len() > LOGIN_DATA_SEGMENT_BYTES);

        let mut piece = request(Stage::LoginOperationalNegotiation, None, &[]);
        piece.continues = true;
        piece.data = whole.slice(..LOGIN_DATA_SEGMENT_BYTES);
        let r = exchange(&mut m, &piece, &mut hooks);
        assert_eq!((r.status, r.continues, r.next_stage, r.data.len()), (LoginStatus::SUCCESS, false, None, 0));
        let mut last = request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]);
        last.data = whole.slice(LOGIN_DATA_SEGMENT_BYTES..);
        let r = exchange(&mut m, &last, &mut hooks);
        assert!(r.continues && r.next_stage.is_none());
        assert_eq!(r.data.len(), LOGIN_DATA_SEGMENT_BYTES);
        let mut text = r.data.to_vec();
        let mut responses = 1;
        loop {
            let ack = request(Stage::LoginOperationalNegotiation, None, &[]);
            let r = exchange(&mut m, &ack, &mut hooks);
            responses += 1;
            text.extend_from_slice(&r.data);
            if !r.continues {
                assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
                assert_eq!(r.tsih, 7);
                break;
            }
            assert!(responses < 10);
        }
        let pairs = parse_text(&text).unwrap();
        assert_eq!(pairs.iter().filter(|p| p.value == NOT_UNDERSTOOD).count(), 150);
        assert!(matches!(m.outcome(), LoginOutcome::Complete(_)));
    }

    #[test]
    fn an_acknowledgement_with_data_is_an_error() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys: Vec<(String, String)> = LEADING.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for i in 0..120 {
            keys.push((format!("X-{i:03}.{}", "k".repeat(50)), "v".repeat(10)));
        }
        let refs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut req = request(Stage::LoginOperationalNegotiation, None, &refs);
        req.continues = true;
        let full = req.data.clone();
        req.data = full.slice(..8000);
        exchange(&mut m, &req, &mut hooks);
        req.continues = false;
        req.data = full.slice(8000..);
        let r = exchange(&mut m, &req, &mut hooks);
        assert!(r.continues);
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, None, &[("MaxConnections", "1")]),
            &mut hooks,
        );
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);
    }

    /// A CHAP-shaped authenticator, to exercise the seam: it wants CHAP_A, then CHAP_N and a
    /// CHAP_R equal to "0xgood". It requires CHAP of every initiator but `optional_for`, which
    /// it also offers None.
    #[derive(Default)]
    struct FakeChap {
        steps: usize,
        optional_for: Option<&'static str>,
        asked: std::cell::RefCell<Vec<String>>,
    }

    impl Authenticator for FakeChap {
        fn methods(&self, initiator_name: &str) -> &[&'static str] {
            self.asked.borrow_mut().push(initiator_name.to_string());
            if self.optional_for == Some(initiator_name) {
                &["CHAP", "None"]
            } else {
                &["CHAP"]
            }
        }

        fn owns_key(&self, key: &str) -> bool {
            key.starts_with("CHAP_")
        }

        fn on_keys(
            &mut self,
            method: &str,
            initiator_name: &str,
            target_name: Option<&str>,
            keys: &[TextPair],
            reply: &mut Vec<TextPair>,
        ) -> AuthStatus {
            assert_eq!((method, initiator_name, target_name), ("CHAP", INITIATOR, Some(TARGET)));
            self.steps += 1;
            let get = |k: &str| keys.iter().find(|p| p.key == k).map(|p| p.value.as_str());
            match self.steps {
                1 => AuthStatus::InProgress,
                2 if get("CHAP_A") == Some("5") => {
                    reply.push(TextPair::new("CHAP_A", "5"));
                    reply.push(TextPair::new("CHAP_I", "1"));
                    reply.push(TextPair::new("CHAP_C", "0x0102"));
                    AuthStatus::InProgress
                }
                3 if get("CHAP_R") == Some("0xgood") => {
                    AuthStatus::Succeeded(Authentication::Chap { user: INITIATOR.into(), mutual: false })
                }
                _ => AuthStatus::Failed,
            }
        }
    }

    fn chap_machine() -> LoginMachine<FakeChap> {
        LoginMachine::new(Arc::new(TargetConfig::default()), FakeChap::default(), 1)
    }

    #[test]
    fn authenticator_seam_runs_a_chap_shaped_exchange() {
        let (mut m, mut hooks) = (chap_machine(), Hooks::default());
        let to_op = Some(Stage::LoginOperationalNegotiation);
        let mut keys = LEADING.to_vec();
        keys.push(("AuthMethod", "CHAP,None"));
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, to_op, &keys), &mut hooks);
        assert_eq!((r.next_stage, answer(&r, "AuthMethod").as_deref()), (None, Some("CHAP")));
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, None, &[("CHAP_A", "5")]), &mut hooks);
        assert_eq!(answer(&r, "CHAP_C").as_deref(), Some("0x0102"));
        let r = exchange(
            &mut m,
            &request(Stage::SecurityNegotiation, to_op, &[("CHAP_N", INITIATOR), ("CHAP_R", "0xgood")]),
            &mut hooks,
        );
        assert_eq!((r.status, r.next_stage), (LoginStatus::SUCCESS, to_op));
        assert_eq!(*m.auth.asked.borrow(), [INITIATOR], "methods asked with the initiator's name");
        let r = exchange(
            &mut m,
            &request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]),
            &mut hooks,
        );
        assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
        let params = m.into_session_params().expect("complete");
        assert_eq!(params.authentication, Authentication::Chap { user: INITIATOR.into(), mutual: false });
        assert_eq!(params.authentication.to_string(), format!("CHAP as {INITIATOR}"));

        // A wrong response fails with "authentication failure".
        let (mut m, mut hooks) = (chap_machine(), Hooks::default());
        exchange(&mut m, &request(Stage::SecurityNegotiation, to_op, &keys), &mut hooks);
        exchange(&mut m, &request(Stage::SecurityNegotiation, None, &[("CHAP_A", "5")]), &mut hooks);
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, to_op, &[("CHAP_R", "0xbad")]), &mut hooks);
        failed_with(&m, &r, LoginStatus::AUTHENTICATION_FAILURE);

        // Authentication is required: skipping the security stage, or AuthMethod=None, fails.
        let (mut m, mut hooks) = (chap_machine(), Hooks::default());
        let r = exchange(&mut m, &request(Stage::LoginOperationalNegotiation, None, &LEADING), &mut hooks);
        failed_with(&m, &r, LoginStatus::AUTHENTICATION_FAILURE);
        let (mut m, mut hooks) = (chap_machine(), Hooks::default());
        let mut none = LEADING.to_vec();
        none.push(("AuthMethod", "None"));
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, to_op, &none), &mut hooks);
        failed_with(&m, &r, LoginStatus::AUTHENTICATION_FAILURE);
        let (mut m, mut hooks) = (chap_machine(), Hooks::default());
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, to_op, &LEADING), &mut hooks);
        failed_with(&m, &r, LoginStatus::AUTHENTICATION_FAILURE);
        // CHAP keys before AuthMethod chose CHAP.
        let (mut m, mut hooks) = (chap_machine(), Hooks::default());
        let mut early = LEADING.to_vec();
        early.push(("CHAP_A", "5"));
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, None, &early), &mut hooks);
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);
    }

    /// The authenticator decides per initiator whether None is allowed: the same login that
    /// fails for an initiator that must use CHAP completes, unauthenticated, for one that may
    /// skip it.
    #[test]
    fn methods_are_chosen_per_initiator() {
        let to_op = Some(Stage::LoginOperationalNegotiation);
        let mut none = LEADING.to_vec();
        none.push(("AuthMethod", "None"));
        let optional = || FakeChap { optional_for: Some(INITIATOR), ..FakeChap::default() };
        let required = || FakeChap { optional_for: Some("iqn.2005-03.org.open-iscsi:other"), ..FakeChap::default() };

        let mut m = LoginMachine::new(Arc::new(TargetConfig::default()), required(), 1);
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, to_op, &none), &mut Hooks::default());
        failed_with(&m, &r, LoginStatus::AUTHENTICATION_FAILURE);
        assert_eq!(*m.auth.asked.borrow(), [INITIATOR]);
        let mut m = LoginMachine::new(Arc::new(TargetConfig::default()), required(), 1);
        let r = exchange(&mut m, &request(Stage::LoginOperationalNegotiation, None, &LEADING), &mut Hooks::default());
        failed_with(&m, &r, LoginStatus::AUTHENTICATION_FAILURE);

        for first in [
            request(Stage::SecurityNegotiation, to_op, &none),
            request(Stage::LoginOperationalNegotiation, None, &LEADING),
        ] {
            let (mut m, mut hooks) =
                (LoginMachine::new(Arc::new(TargetConfig::default()), optional(), 1), Hooks::default());
            let r = exchange(&mut m, &first, &mut hooks);
            assert_eq!(r.status, LoginStatus::SUCCESS);
            let last = request(Stage::LoginOperationalNegotiation, Some(Stage::FullFeaturePhase), &[]);
            let r = exchange(&mut m, &last, &mut hooks);
            assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
            assert_eq!(m.auth.asked.borrow().as_slice(), [INITIATOR]);
            let params = m.into_session_params().expect("complete");
            assert_eq!(params.authentication, Authentication::None);
        }
    }

    /// Runs a one-request login and returns the machine and its response.
    fn first_request(req: LoginRequest, hooks: &mut Hooks) -> (LoginMachine, LoginResponse) {
        let mut m = machine();
        let r = exchange(&mut m, &req, hooks);
        (m, r)
    }

    #[test]
    fn error_statuses_of_the_first_request() {
        let op = Stage::LoginOperationalNegotiation;
        let ffp = Some(Stage::FullFeaturePhase);
        let cases: Vec<(LoginRequest, LoginStatus)> = vec![
            (
                LoginRequest { version_min: 1, version_max: 2, ..request(op, ffp, &LEADING) },
                LoginStatus::UNSUPPORTED_VERSION,
            ),
            (request(op, ffp, &[("TargetName", TARGET)]), LoginStatus::MISSING_PARAMETER),
            (request(op, ffp, &[("InitiatorName", INITIATOR)]), LoginStatus::MISSING_PARAMETER),
            (request(op, ffp, &[("InitiatorName", INITIATOR), ("TargetName", "iqn.other")]), LoginStatus::NOT_FOUND),
            (
                request(op, ffp, &[("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Bogus")]),
                LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
            ),
            (request(op, ffp, &[("InitiatorName", ""), ("TargetName", TARGET)]), LoginStatus::INITIATOR_ERROR),
            (LoginRequest { tsih: 5, ..request(op, ffp, &LEADING) }, LoginStatus::CANT_INCLUDE_IN_SESSION),
            (request(Stage::FullFeaturePhase, None, &LEADING), LoginStatus::INITIATOR_ERROR),
            (LoginRequest { continues: true, ..request(op, ffp, &LEADING) }, LoginStatus::INITIATOR_ERROR),
            (request(op, Some(op), &LEADING), LoginStatus::INITIATOR_ERROR),
            (
                request(Stage::SecurityNegotiation, None, &[LEADING[0], LEADING[1], ("AuthMethod", "CHAP")]),
                LoginStatus::AUTHENTICATION_FAILURE,
            ),
            (
                request(Stage::SecurityNegotiation, None, &[LEADING[0], LEADING[1], ("MaxBurstLength", "512")]),
                LoginStatus::INITIATOR_ERROR,
            ),
            (
                request(op, ffp, &[LEADING[0], LEADING[1], ("MaxRecvDataSegmentLength", "100")]),
                LoginStatus::INITIATOR_ERROR,
            ),
            (
                request(op, ffp, &[LEADING[0], LEADING[1], ("MaxBurstLength", "4096"), ("FirstBurstLength", "8192")]),
                LoginStatus::INITIATOR_ERROR,
            ),
            (
                LoginRequest { data: Bytes::from_static(b"InitiatorName"), ..request(op, ffp, &[]) },
                LoginStatus::INITIATOR_ERROR,
            ),
            (
                LoginRequest { data: Bytes::from_static(b"a=1\0a=2\0"), ..request(op, ffp, &[]) },
                LoginStatus::INITIATOR_ERROR,
            ),
        ];
        for (req, status) in cases {
            let (m, r) = first_request(req.clone(), &mut Hooks::default());
            assert_eq!(r.status, status, "{req:?}");
            failed_with(&m, &r, status);
        }

        let (m, r) = first_request(request(op, ffp, &LEADING), &mut Hooks { allowed: false, ..Hooks::default() });
        failed_with(&m, &r, LoginStatus::AUTHORIZATION_FAILURE);
        let (m, r) = first_request(request(op, ffp, &LEADING), &mut Hooks { tsih: None, ..Hooks::default() });
        failed_with(&m, &r, LoginStatus::OUT_OF_RESOURCES);
    }

    #[test]
    fn out_of_order_requests_fail() {
        let sec = Stage::SecurityNegotiation;
        let op = Stage::LoginOperationalNegotiation;
        let mut keys = LEADING.to_vec();
        keys.push(("AuthMethod", "None"));
        let start = || {
            let (mut m, mut hooks) = (machine(), Hooks::default());
            exchange(&mut m, &request(sec, Some(op), &keys), &mut hooks);
            (m, hooks)
        };
        let cases = [
            request(sec, None, &[]),                                       // stage went back
            LoginRequest { isid: Isid([1; 6]), ..request(op, None, &[]) }, // ISID changed
            LoginRequest { cid: 9, ..request(op, None, &[]) },             // CID changed
            request(op, None, &[("InitiatorName", INITIATOR)]),            // leading key repeated
            request(op, None, &[("AuthMethod", "None")]),                  // security key late
        ];
        for req in cases {
            let (mut m, mut hooks) = start();
            let r = exchange(&mut m, &req, &mut hooks);
            failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);
        }

        // A key repeated across requests of the same stage.
        let (mut m, mut hooks) = start();
        exchange(&mut m, &request(op, None, &[("MaxConnections", "1")]), &mut hooks);
        let r = exchange(&mut m, &request(op, None, &[("MaxConnections", "1")]), &mut hooks);
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);

        // A PDU that is not a Login Request, then anything after the failure.
        let (mut m, mut hooks) = start();
        let r = m.on_invalid_pdu(0x99);
        assert_eq!((r.itt, r.current_stage), (0x99, op));
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);
        let r = exchange(&mut m, &request(op, Some(Stage::FullFeaturePhase), &[]), &mut hooks);
        assert_eq!(r.status, LoginStatus::INITIATOR_ERROR);
        assert_eq!(m.outcome(), &LoginOutcome::Failed(LoginStatus::INITIATOR_ERROR));
    }

    #[test]
    fn a_login_that_never_ends_is_cut_off() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let mut keys = LEADING.to_vec();
        keys.push(("AuthMethod", "None"));
        exchange(&mut m, &request(Stage::SecurityNegotiation, None, &keys), &mut hooks);
        for _ in 1..LOGIN_PDUS_MAX {
            let r = exchange(&mut m, &request(Stage::SecurityNegotiation, None, &[]), &mut hooks);
            assert_eq!(r.status, LoginStatus::SUCCESS);
        }
        let r = exchange(&mut m, &request(Stage::SecurityNegotiation, None, &[]), &mut hooks);
        failed_with(&m, &r, LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn discovery_session_login() {
        let (mut m, mut hooks) = (machine(), Hooks::default());
        let req = request(
            Stage::LoginOperationalNegotiation,
            Some(Stage::FullFeaturePhase),
            &[
                ("InitiatorName", INITIATOR),
                ("SessionType", "Discovery"),
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxBurstLength", "262144"),
                ("ImmediateData", "Yes"),
                ("DefaultTime2Wait", "2"),
                ("MaxRecvDataSegmentLength", "32768"),
            ],
        );
        let r = exchange(&mut m, &req, &mut hooks);
        assert_eq!(r.next_stage, Some(Stage::FullFeaturePhase));
        assert_eq!(answer(&r, "MaxBurstLength").as_deref(), Some(IRRELEVANT));
        assert_eq!(answer(&r, "ImmediateData").as_deref(), Some(IRRELEVANT));
        assert_eq!(answer(&r, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(answer(&r, "TargetPortalGroupTag"), None);
        let params = m.into_session_params().expect("complete");
        assert_eq!((params.session_type, params.target_name), (SessionType::Discovery, None));
        assert_eq!(params.initiator_max_recv_data_segment_bytes, 32_768);
    }

    #[test]
    fn config_validation() {
        assert_eq!(TargetConfig::default().validate(), Ok(()));
        let bad = [
            TargetConfig { max_recv_data_segment_bytes: 511, ..TargetConfig::default() },
            TargetConfig { first_burst_bytes_max: 2 << 20, ..TargetConfig::default() },
            TargetConfig { max_outstanding_r2t_max: 0, ..TargetConfig::default() },
            TargetConfig { command_window: 0, ..TargetConfig::default() },
            TargetConfig { default_time2wait_s: 3601, ..TargetConfig::default() },
            TargetConfig { data_digests: DigestSupport { none: false, crc32c: false }, ..TargetConfig::default() },
            TargetConfig { target_alias: Some("a\0b".into()), ..TargetConfig::default() },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }

    #[test]
    fn target_alias_is_declared_with_the_group_tag() {
        let config = TargetConfig {
            target_alias: Some("tandem vol1".into()),
            target_portal_group_tag: 9,
            ..TargetConfig::default()
        };
        let (mut m, mut hooks) = (machine_with(config), Hooks::default());
        let r = exchange(&mut m, &request(Stage::LoginOperationalNegotiation, None, &LEADING), &mut hooks);
        assert_eq!(answer(&r, "TargetAlias").as_deref(), Some("tandem vol1"));
        assert_eq!(answer(&r, "TargetPortalGroupTag").as_deref(), Some("9"));
    }

    fn any_stage() -> impl Strategy<Value = Stage> {
        prop_oneof![
            Just(Stage::SecurityNegotiation),
            Just(Stage::LoginOperationalNegotiation),
            Just(Stage::FullFeaturePhase)
        ]
    }

    fn any_key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(OPERATIONAL_KEYS.to_vec()).prop_map(String::from),
            proptest::sample::select(vec![
                "InitiatorName",
                "TargetName",
                "SessionType",
                "AuthMethod",
                "X-a",
                "TargetAlias"
            ])
            .prop_map(String::from),
        ]
    }

    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                INITIATOR,
                TARGET,
                "Normal",
                "Discovery",
                "None",
                "CRC32C",
                "CRC32C,None",
                "Yes",
                "No",
                "0",
                "1",
                "512",
                "262144",
                "0x10000",
                "Reject",
                ""
            ])
            .prop_map(String::from),
            "[ -~]{0,12}",
        ]
    }

    fn any_request() -> impl Strategy<Value = LoginRequest> {
        (
            proptest::option::of(any_stage()),
            any::<bool>(),
            any_stage(),
            prop::collection::vec((any_key(), any_value()), 0..6),
            any::<u8>(),
        )
            .prop_map(|(next, continues, current, keys, tweak)| {
                let mut out = Vec::new();
                for (k, v) in &keys {
                    encode_pair(&mut out, k, v);
                }
                if tweak == 0 {
                    out.pop(); // unterminated
                }
                LoginRequest {
                    next_stage: next,
                    continues,
                    current_stage: current,
                    version_max: 0,
                    version_min: u8::from(tweak == 1),
                    isid: ISID,
                    tsih: u16::from(tweak == 2),
                    itt: u32::from(tweak),
                    cid: 1,
                    cmd_sn: 5,
                    exp_stat_sn: 0,
                    data: Bytes::from(out),
                }
            })
    }

    proptest! {
        /// Whatever the initiator sends, every response is well-formed, and once the login
        /// has failed or completed it stays so.
        #[test]
        fn arbitrary_login_sequences_never_panic(requests in prop::collection::vec(any_request(), 1..8)) {
            let (mut m, mut hooks) = (machine(), Hooks::default());
            let mut ended = None;
            for req in &requests {
                let r = exchange(&mut m, req, &mut hooks);
                if let Some(outcome) = &ended {
                    prop_assert_eq!(m.outcome(), outcome);
                    prop_assert!(!r.status.is_success() || matches!(outcome, LoginOutcome::Complete(_)));
                } else if m.outcome() != &LoginOutcome::InProgress {
                    ended = Some(m.outcome().clone());
                }
                if let LoginOutcome::Failed(status) = m.outcome() {
                    prop_assert!(!status.is_success());
                }
            }
        }
    }
}
