//! iSCSI target protocol for Tandem volumes (RFC 7143), sans-IO: what initiators (the Linux
//! kernel's open-iscsi, libiscsi in qemu, Windows) speak to reach a volume as a SCSI disk.
//!
//! Layers, bytes up:
//! - [`digest`]: CRC32C header and data digests and their wire byte order.
//! - [`pdu`]: the 48-byte Basic Header Segment and every PDU type, both directions, with a
//!   two-step decoder ([`parse_bhs`] then [`decode`]) that never reads or allocates past the
//!   negotiated limits, and [`Pdu::encode`].
//! - [`text`]: the `key=value` text of Login and Text PDUs, bounded, and [`TextAssembler`]
//!   for texts continued over PDUs.
//! - [`login`]: the login phase of one connection, target side: a state machine from Login
//!   Requests to Login Responses, ending in the negotiated [`SessionParams`].
//! - [`chap`]: CHAP authentication (one-way and mutual) as a [`login::Authenticator`], with
//!   the policy of which initiators must use it.
//! - [`discovery`]: Text Requests of a discovery session (`SendTargets`).
//!
//! - [`server`]: the tokio driver: a portal serving [`server::Targets`] (discovery and normal
//!   sessions, the CmdSN window, R2T, Data-In in bounded pieces, task management, NOP
//!   keepalive), running each command through `tandem-scsi` against a `tandem-frontend`
//!   volume.
//!
//! Everything but [`server`] is sans-IO: no sockets, no tokio and no clock. The crate does not
//! decide SCSI commands (that is `tandem-scsi`'s job) or know volumes (the node's). It implements
//! ErrorRecoveryLevel 0, one connection per session, and AuthMethod CHAP (MD5 or SHA-256,
//! one-way or mutual) or None. Both directions encode and decode so that a client in this crate
//! can drive load and tests.

pub mod chap;
pub mod digest;
pub mod discovery;
pub mod login;
pub mod pdu;
pub mod server;
pub mod text;

pub use chap::{validate_chap_secret, Chap, ChapAlgorithm, ChapCredentials};
pub use discovery::{DiscoveryError, DiscoveryResponder, DiscoveryTarget, SeqNumbers, SEND_TARGETS_BYTES_MAX};
pub use login::{
    AuthStatus, Authentication, Authenticator, ConfigError, DigestSupport, LoginHooks, LoginMachine, LoginOutcome,
    NoAuthentication, SessionParams, SessionType, TargetConfig, LOGIN_DATA_SEGMENT_BYTES, LOGIN_KEYS_MAX,
    LOGIN_PDUS_MAX,
};
pub use pdu::{
    decode, parse_bhs, AsyncMessage, BhsInfo, DataIn, DataOut, DecodeLimits, Digests, Isid, LoginRequest,
    LoginResponse, LoginStatus, LogoutRequest, LogoutResponse, NopIn, NopOut, Pdu, PduError, R2t, Reject, Residual,
    ScsiCommand, ScsiResponse, SnackRequest, Stage, TaskAttribute, TaskMgmtRequest, TaskMgmtResponse, TextRequest,
    TextResponse, BHS_BYTES, DATA_SEGMENT_BYTES_MAX, RESERVED_TAG,
};
pub use text::{parse_text, TextAssembler, TextError, TextPair, TEXT_BYTES_MAX};
