//! Option haggling as a state machine: options in, reply bytes and decisions out. Sans-IO; the
//! server feeds it what it reads and opens exports when told to (the only async step).
//!
//! Driver loop (see `server.rs`): send [`Handshake::greeting`]; feed the client flags to
//! [`Handshake::on_client_flags`]; then for each option header call
//! [`Handshake::on_option_header`], read (or drain) its data as told, call
//! [`Handshake::on_option`] and act on the [`Step`]: send bytes, list exports, or open an export
//! and pass the outcome to [`Handshake::on_opened`], until transmission, abort or disconnect.
//!
//! Structured replies (`NBD_OPT_STRUCTURED_REPLY`) and metadata contexts: once structured
//! replies are on, `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` offer exactly one
//! context, [`BASE_ALLOCATION`] (checked against the export, which is opened to answer them);
//! a selection counts for the export it named and is replaced by the next one. What was
//! negotiated reaches the transmission phase as [`Features`].
//!
//! TLS (`NBD_OPT_STARTTLS`), as the [`TlsMode`] says: not offered (the option is refused with
//! `NBD_REP_ERR_POLICY`), offered, or required (until the connection is TLS, every option but
//! STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME`, which has
//! no error reply, ends the session). On [`Step::StartTls`] the server sends the ACK, runs the
//! TLS handshake on the same socket and calls [`Handshake::on_tls_started`]; the negotiation
//! starts over inside TLS (the protocol says nothing from before it counts).

use tandem_frontend::OpenError;
use thiserror::Error;

use crate::codec::{
    client_flag, encode_export_name_reply, encode_greeting, encode_info_reply, encode_meta_context_reply,
    encode_option_error, encode_option_reply, encode_server_reply, handshake_flag, info, opt, rep, tx_flag,
    ClientOption, DecodeError, Info, InfoQuery, MetaContextQuery, OptionHeader, BASE_ALLOCATION, BLOCK_SIZE_MIN,
    BLOCK_SIZE_PREFERRED, NAME_BYTES_MAX, OPTION_DATA_BYTES_MAX, REQUEST_BYTES_MAX,
};

/// The server offers fixed newstyle and lets the client drop the 124 padding zeroes.
pub const SERVER_HANDSHAKE_FLAGS: u16 = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
/// Options one connection may send before transmission. Real clients send a handful (nbdinfo
/// --list sends two per export); the cap stops a client from keeping a connection slot busy
/// with an endless negotiation.
pub const HANDSHAKE_OPTIONS_MAX: u32 = 4096;
/// Option data longer than [`OPTION_DATA_BYTES_MAX`] but at most this is read and discarded in
/// small pieces, then answered with `NBD_REP_ERR_TOO_BIG`; longer data is not worth reading, so
/// the server answers and disconnects.
pub const OPTION_DRAIN_BYTES_MAX: u32 = 1024 * 1024;

/// The id the server gives [`BASE_ALLOCATION`] in `NBD_OPT_SET_META_CONTEXT` replies and
/// block status chunks (any number would do; the client learns it here).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the server tells a client about an opened export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub read_only: bool,
    pub multi_conn: bool,
}

impl ExportInfo {
    /// Every command is supported; read-only and multi-connection safety come from the volume,
    /// `NBD_CMD_FLAG_DF` from the negotiation (it only means something for structured replies).
    /// Fast zeroes are always offered: zeroing is a metadata change here, never a write of zeroes.
    pub fn transmission_flags(&self, features: Features) -> u16 {
        let mut flags = tx_flag::HAS_FLAGS
            | tx_flag::SEND_FLUSH
            | tx_flag::SEND_FUA
            | tx_flag::SEND_TRIM
            | tx_flag::SEND_WRITE_ZEROES
            | tx_flag::SEND_FAST_ZERO;
        if self.read_only {
            flags |= tx_flag::READ_ONLY;
        }
        if self.multi_conn {
            flags |= tx_flag::CAN_MULTI_CONN;
        }
        if features.structured_replies {
            flags |= tx_flag::SEND_DF;
        }
        flags
    }
}

/// What a connection negotiated for its transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: reads (and errors) are answered in chunks.
    pub structured_replies: bool,
    /// [`BASE_ALLOCATION`] was selected for the export being served: `NBD_CMD_BLOCK_STATUS`
    /// is answered.
    pub base_allocation: bool,
}

/// The metadata contexts `NBD_OPT_SET_META_CONTEXT` selected last, for the export it named.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSelection {
    export: String,
    base_allocation: bool,
}

/// Why the server ends a negotiation with a hard disconnect.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("client flags {0:#x} lack NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle(u32),
    #[error("client flags {0:#x} include unknown bits")]
    UnknownClientFlags(u32),
    #[error("more than {HANDSHAKE_OPTIONS_MAX} options")]
    TooManyOptions,
    #[error("option {option} claims {len} data bytes")]
    OptionTooLong { option: u32, len: u32 },
    #[error("bad option frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("NBD_OPT_EXPORT_NAME for an export that cannot be opened: {0}")]
    ExportNameFailed(String),
    #[error("NBD_OPT_EXPORT_NAME without TLS, which this server requires")]
    TlsRequired,
}

/// Whether a connection may, or must, move to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused.
    #[default]
    Off,
    /// TLS on request; plaintext is served too.
    Offered,
    /// Nothing but STARTTLS and ABORT until the connection is TLS.
    Required,
}

/// What to do with an option's data, decided from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionData {
    /// Read this many bytes and pass them to [`Handshake::on_option`].
    Read(usize),
    /// Read and discard this many bytes, then send [`Handshake::too_big_reply`].
    DrainThenTooBig(u32),
    /// Send [`Handshake::too_big_reply`] (if the option has replies) and disconnect.
    TooBigDisconnect(HandshakeError),
}

/// An export to open before the option can be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    pub name: String,
    kind: OpenKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OpenKind {
    ExportName,
    Info(InfoQuery),
    Go(InfoQuery),
    ListMetaContext(MetaContextQuery),
    SetMetaContext(MetaContextQuery),
}

/// The outcome of one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes and wait for the next option.
    Reply(Vec<u8>),
    /// Send [`Handshake::list_reply`] of the export names and wait for the next option.
    List,
    /// Open the export and pass the result to [`Handshake::on_opened`].
    Open(OpenRequest),
    /// Send these bytes (the ACK to `NBD_OPT_ABORT`) and close; the client asked for it.
    Abort(Vec<u8>),
    /// Send these bytes (the ACK to `NBD_OPT_STARTTLS`), run the TLS handshake as the server,
    /// then call [`Handshake::on_tls_started`].
    StartTls(Vec<u8>),
    /// Close without a reply.
    Disconnect(HandshakeError),
}

/// The outcome of opening an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Send these bytes and wait for the next option (`NBD_OPT_INFO`, or a failed `NBD_OPT_GO`).
    Reply(Vec<u8>),
    /// Send these bytes, then serve requests on the opened export with these features.
    Transmission(Vec<u8>, Features),
    /// Close without a reply.
    Disconnect(HandshakeError),
}

/// Negotiation state of one connection.
#[derive(Debug, Default)]
pub struct Handshake {
    no_zeroes: bool,
    options_seen: u32,
    tls_mode: TlsMode,
    /// The connection runs over TLS now.
    tls: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured_replies: bool,
    meta: Option<MetaSelection>,
}

impl Handshake {
    /// A negotiation without TLS.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_tls(tls_mode: TlsMode) -> Self {
        Handshake { tls_mode, ..Self::default() }
    }

    /// The TLS handshake after [`Step::StartTls`] succeeded: options go on inside TLS.
    pub fn on_tls_started(&mut self) {
        self.tls = true;
        // Nothing negotiated before TLS counts inside it.
        self.structured_replies = false;
        self.meta = None;
    }

    /// The features transmission on `export` would have, as negotiated so far.
    pub fn features(&self, export: &str) -> Features {
        Features {
            structured_replies: self.structured_replies,
            base_allocation: self.meta.as_ref().is_some_and(|m| m.base_allocation && m.export == export),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn greeting() -> Vec<u8> {
        let mut out = Vec::new();
        encode_greeting(&mut out, SERVER_HANDSHAKE_FLAGS);
        out
    }

    /// Fixed newstyle is required (every current client sets it); unknown bits end the session
    /// as the protocol says.
    pub fn on_client_flags(&mut self, flags: u32) -> Result<(), HandshakeError> {
        if flags & !(client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES) != 0 {
            return Err(HandshakeError::UnknownClientFlags(flags));
        }
        if flags & client_flag::FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle(flags));
        }
        self.no_zeroes = flags & client_flag::NO_ZEROES != 0;
        Ok(())
    }

    pub fn on_option_header(&mut self, header: OptionHeader) -> OptionData {
        self.options_seen += 1;
        if self.options_seen > HANDSHAKE_OPTIONS_MAX {
            return OptionData::TooBigDisconnect(HandshakeError::TooManyOptions);
        }
        let too_long = HandshakeError::OptionTooLong { option: header.option, len: header.data_len };
        if header.data_len as usize <= OPTION_DATA_BYTES_MAX {
            OptionData::Read(header.data_len as usize)
        } else if header.option == opt::EXPORT_NAME || header.data_len > OPTION_DRAIN_BYTES_MAX {
            // EXPORT_NAME has no error reply: a name that long can only end the session.
            OptionData::TooBigDisconnect(too_long)
        } else {
            OptionData::DrainThenTooBig(header.data_len)
        }
    }

    /// `NBD_REP_ERR_TOO_BIG` for an option whose data was too long; empty for
    /// `NBD_OPT_EXPORT_NAME`, which has no replies.
    pub fn too_big_reply(option: u32) -> Vec<u8> {
        let mut out = Vec::new();
        if option != opt::EXPORT_NAME {
            let message = format!("option data is limited to {OPTION_DATA_BYTES_MAX} bytes");
            encode_option_error(&mut out, option, rep::ERR_TOO_BIG, &message);
        }
        out
    }

    /// `data` is the option's complete data, as announced by its header.
    pub fn on_option(&mut self, option: u32, data: &[u8]) -> Step {
        let parsed = match ClientOption::parse(option, data) {
            Ok(parsed) => parsed,
            Err(err) if option == opt::EXPORT_NAME => return Step::Disconnect(HandshakeError::Decode(err)),
            Err(err) => {
                let mut out = Vec::new();
                encode_option_error(&mut out, option, rep::ERR_INVALID, &err.to_string());
                return Step::Reply(out);
            }
        };
        let reply_error = |code: u32, message: &str| {
            let mut out = Vec::new();
            encode_option_error(&mut out, option, code, message);
            Step::Reply(out)
        };
        if self.tls_mode == TlsMode::Required && !self.tls {
            match parsed {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName { .. } => return Step::Disconnect(HandshakeError::TlsRequired),
                _ => {
                    return reply_error(
                        rep::ERR_TLS_REQD,
                        "this server requires TLS (NBD_OPT_STARTTLS) with a host certificate first",
                    )
                }
            }
        }
        match parsed {
            ClientOption::StartTls if self.tls => reply_error(rep::ERR_INVALID, "the connection is TLS already"),
            ClientOption::StartTls if self.tls_mode == TlsMode::Off => {
                reply_error(rep::ERR_POLICY, "this server does not offer TLS")
            }
            ClientOption::StartTls => {
                let mut out = Vec::new();
                encode_option_reply(&mut out, opt::STARTTLS, rep::ACK, &[]);
                Step::StartTls(out)
            }
            ClientOption::ExportName { name } => Step::Open(OpenRequest { name, kind: OpenKind::ExportName }),
            ClientOption::Info(query) => {
                Step::Open(OpenRequest { name: query.name.clone(), kind: OpenKind::Info(query) })
            }
            ClientOption::Go(query) => Step::Open(OpenRequest { name: query.name.clone(), kind: OpenKind::Go(query) }),
            ClientOption::List => Step::List,
            ClientOption::Abort => {
                let mut out = Vec::new();
                encode_option_reply(&mut out, opt::ABORT, rep::ACK, &[]);
                Step::Abort(out)
            }
            ClientOption::StructuredReply => {
                self.structured_replies = true;
                let mut out = Vec::new();
                encode_option_reply(&mut out, opt::STRUCTURED_REPLY, rep::ACK, &[]);
                Step::Reply(out)
            }
            ClientOption::ListMetaContext(query) | ClientOption::SetMetaContext(query) => {
                if !self.structured_replies {
                    return reply_error(
                        rep::ERR_INVALID,
                        "metadata contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first",
                    );
                }
                if let Some(bad) = query.queries.iter().find(|q| !q.contains(':')) {
                    return reply_error(
                        rep::ERR_INVALID,
                        &format!("metadata context query {bad:?} does not start with a namespace (\"base:\")"),
                    );
                }
                let name = query.name.clone();
                let kind = if option == opt::SET_META_CONTEXT {
                    OpenKind::SetMetaContext(query)
                } else {
                    OpenKind::ListMetaContext(query)
                };
                Step::Open(OpenRequest { name, kind })
            }
            ClientOption::Other { option, .. } => {
                let mut out = Vec::new();
                encode_option_error(&mut out, option, rep::ERR_UNSUP, &format!("option {option} is not supported"));
                Step::Reply(out)
            }
        }
    }

    /// One `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
    pub fn list_reply(names: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for name in names.iter().filter(|name| name.len() <= NAME_BYTES_MAX) {
            encode_server_reply(&mut out, name);
        }
        encode_option_reply(&mut out, opt::LIST, rep::ACK, &[]);
        out
    }

    /// [`OpenError::NotFound`] and [`OpenError::Unavailable`] are answered with
    /// `NBD_REP_ERR_UNKNOWN` ("the requested export is not available"), [`OpenError::Denied`]
    /// with `NBD_REP_ERR_POLICY`, each with its message (after `NBD_OPT_EXPORT_NAME`, which
    /// has no error reply, by closing the connection).
    pub fn on_opened(&mut self, request: OpenRequest, result: Result<ExportInfo, OpenError>) -> Opened {
        let features = self.features(&request.name);
        let (option, query) = match request.kind {
            OpenKind::ExportName => {
                return match result {
                    Ok(export) => {
                        let mut out = Vec::new();
                        encode_export_name_reply(
                            &mut out,
                            export.size_bytes,
                            export.transmission_flags(features),
                            self.no_zeroes,
                        );
                        Opened::Transmission(out, features)
                    }
                    Err(err) => Opened::Disconnect(HandshakeError::ExportNameFailed(err.to_string())),
                };
            }
            OpenKind::Info(query) => (opt::INFO, query),
            OpenKind::Go(query) => (opt::GO, query),
            OpenKind::ListMetaContext(query) => return self.on_meta_context(opt::LIST_META_CONTEXT, query, result),
            OpenKind::SetMetaContext(query) => return self.on_meta_context(opt::SET_META_CONTEXT, query, result),
        };
        let mut out = Vec::new();
        let export = match result {
            Ok(export) => export,
            Err(err) => {
                let code = if matches!(err, OpenError::Denied(_)) { rep::ERR_POLICY } else { rep::ERR_UNKNOWN };
                encode_option_error(&mut out, option, code, &err.to_string());
                return Opened::Reply(out);
            }
        };
        encode_info_reply(
            &mut out,
            option,
            &Info::Export { size_bytes: export.size_bytes, transmission_flags: export.transmission_flags(features) },
        );
        if query.info_requests.contains(&info::NAME) {
            encode_info_reply(&mut out, option, &Info::Name(query.name.clone()));
        }
        // Sent even when not requested (the protocol allows it): these are the default
        // constraints, so a client that ignores them is still served correctly.
        encode_info_reply(
            &mut out,
            option,
            &Info::BlockSize { min: BLOCK_SIZE_MIN, preferred: BLOCK_SIZE_PREFERRED, max: REQUEST_BYTES_MAX },
        );
        encode_option_reply(&mut out, option, rep::ACK, &[]);
        if option == opt::GO {
            Opened::Transmission(out, features)
        } else {
            Opened::Reply(out)
        }
    }

    /// The contexts `query` matches on an export that opened (or the open's error). LIST
    /// names them with id 0 (the protocol reserves it there); an empty query list and the
    /// namespace alone (`base:`) match every context. SET selects the exact names it was given
    /// (a namespace alone selects nothing), replacing the previous selection, and names each
    /// with its id. Queries matching nothing are not errors: they get no reply of their own.
    fn on_meta_context(
        &mut self,
        option: u32,
        query: MetaContextQuery,
        result: Result<ExportInfo, OpenError>,
    ) -> Opened {
        let mut out = Vec::new();
        if let Err(err) = result {
            let code = if matches!(err, OpenError::Denied(_)) { rep::ERR_POLICY } else { rep::ERR_UNKNOWN };
            encode_option_error(&mut out, option, code, &err.to_string());
            return Opened::Reply(out);
        }
        if option == opt::LIST_META_CONTEXT {
            let all = query.queries.is_empty();
            if all || query.queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION) {
                encode_meta_context_reply(&mut out, option, 0, BASE_ALLOCATION);
            }
        } else {
            let base_allocation = query.queries.iter().any(|q| q == BASE_ALLOCATION);
            self.meta = Some(MetaSelection { export: query.name, base_allocation });
            if base_allocation {
                encode_meta_context_reply(&mut out, option, BASE_ALLOCATION_ID, BASE_ALLOCATION);
            }
        }
        encode_option_reply(&mut out, option, rep::ACK, &[]);
        Opened::Reply(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_meta_context_reply, decode_server_reply, OptionReplyHeader, OPTION_REPLY_HEADER_BYTES};

    const EXPORT: ExportInfo = ExportInfo { size_bytes: 1 << 30, read_only: false, multi_conn: true };

    /// Splits a byte string of option replies into (header, data) pairs.
    fn replies(mut bytes: &[u8]) -> Vec<(OptionReplyHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let header = OptionReplyHeader::decode(bytes).expect("reply header");
            let end = OPTION_REPLY_HEADER_BYTES + header.data_len as usize;
            out.push((header, bytes[OPTION_REPLY_HEADER_BYTES..end].to_vec()));
            bytes = &bytes[end..];
        }
        out
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        ClientOption::Go(InfoQuery { name: name.into(), info_requests: requests.to_vec() }).encode(&mut bytes);
        bytes[16..].to_vec()
    }

    #[test]
    fn client_flags_require_fixed_newstyle_and_no_unknown_bits() {
        let mut hs = Handshake::new();
        assert_eq!(hs.on_client_flags(0), Err(HandshakeError::NotFixedNewstyle(0)));
        assert_eq!(hs.on_client_flags(1 << 5 | 1), Err(HandshakeError::UnknownClientFlags(0x21)));
        assert_eq!(hs.on_client_flags(client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES), Ok(()));
        assert!(hs.no_zeroes);
    }

    #[test]
    fn go_answers_export_name_block_size_then_ack() {
        let mut hs = Handshake::new();
        let Step::Open(request) = hs.on_option(opt::GO, &go_data("vol", &[info::NAME, info::BLOCK_SIZE, 77])) else {
            panic!("GO must open the export");
        };
        assert_eq!(request.name, "vol");
        let Opened::Transmission(bytes, features) = hs.on_opened(request, Ok(EXPORT)) else {
            panic!("GO enters transmission")
        };
        assert_eq!(features, Features::default(), "simple replies unless negotiated");
        let got = replies(&bytes);
        let kinds: Vec<u32> = got.iter().map(|(h, _)| h.reply_type).collect();
        assert_eq!(kinds, [rep::INFO, rep::INFO, rep::INFO, rep::ACK]);
        assert!(got.iter().all(|(h, _)| h.option == opt::GO));
        assert_eq!(
            Info::decode(&got[0].1),
            Ok(Some(Info::Export {
                size_bytes: 1 << 30,
                transmission_flags: EXPORT.transmission_flags(Features::default())
            }))
        );
        assert_eq!(Info::decode(&got[1].1), Ok(Some(Info::Name("vol".into()))));
        assert_eq!(Info::decode(&got[2].1), Ok(Some(Info::BlockSize { min: 1, preferred: 4096, max: 32 << 20 })));
    }

    #[test]
    fn info_stays_in_negotiation_and_unknown_exports_get_err_unknown() {
        let mut hs = Handshake::new();
        let Step::Open(request) = hs.on_option(opt::INFO, &go_data("x", &[])) else { panic!("INFO opens") };
        assert!(matches!(hs.on_opened(request.clone(), Ok(EXPORT)), Opened::Reply(_)));
        let Opened::Reply(bytes) = hs.on_opened(request, Err(OpenError::NotFound("x".into()))) else {
            panic!("a failed INFO is an error reply")
        };
        let got = replies(&bytes);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.reply_type, rep::ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&got[0].1).contains("no such export"));
    }

    #[test]
    fn export_name_failure_disconnects_and_success_honours_no_zeroes() {
        let mut hs = Handshake::new();
        hs.on_client_flags(client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES).expect("flags");
        let Step::Open(request) = hs.on_option(opt::EXPORT_NAME, b"vol") else { panic!("opens") };
        assert!(matches!(
            hs.on_opened(request.clone(), Err(OpenError::Unavailable("no".into()))),
            Opened::Disconnect(_)
        ));
        assert_eq!(
            hs.on_opened(request, Ok(EXPORT)),
            Opened::Transmission(
                {
                    let mut out = Vec::new();
                    let flags = EXPORT.transmission_flags(Features::default());
                    encode_export_name_reply(&mut out, EXPORT.size_bytes, flags, true);
                    out
                },
                Features::default()
            )
        );
        assert!(matches!(hs.on_option(opt::EXPORT_NAME, &[0xff]), Step::Disconnect(_)));
    }

    #[test]
    fn other_options_are_answered_without_ending_negotiation() {
        let mut hs = Handshake::new();
        for (option, data, expected) in [
            (opt::STRUCTURED_REPLY, &b"x"[..], rep::ERR_INVALID),
            (opt::STARTTLS, b"", rep::ERR_POLICY),
            (12345, b"junk", rep::ERR_UNSUP),
            (opt::LIST, b"junk", rep::ERR_INVALID),
            (opt::GO, b"\0\0", rep::ERR_INVALID),
        ] {
            let Step::Reply(bytes) = hs.on_option(option, data) else { panic!("option {option} must be answered") };
            let got = replies(&bytes);
            assert_eq!((got.len(), got[0].0.option, got[0].0.reply_type), (1, option, expected));
        }
        assert_eq!(hs.on_option(opt::LIST, b""), Step::List);
        assert!(matches!(hs.on_option(opt::ABORT, b"ignored"), Step::Abort(_)));
    }

    #[test]
    fn list_reply_names_every_export() {
        let names = vec!["a".to_string(), "b".repeat(NAME_BYTES_MAX + 1), "c".to_string()];
        let got = replies(&Handshake::list_reply(&names));
        let listed: Vec<String> = got
            .iter()
            .filter(|(h, _)| h.reply_type == rep::SERVER)
            .map(|(_, data)| decode_server_reply(data).expect("server reply"))
            .collect();
        assert_eq!(listed, ["a", "c"]);
        assert_eq!(got.last().map(|(h, _)| h.reply_type), Some(rep::ACK));
    }

    #[test]
    fn option_lengths_are_bounded() {
        let mut hs = Handshake::new();
        let header = |option, data_len| OptionHeader { option, data_len };
        assert_eq!(hs.on_option_header(header(opt::GO, 12)), OptionData::Read(12));
        assert_eq!(hs.on_option_header(header(opt::GO, 10_000)), OptionData::DrainThenTooBig(10_000));
        assert!(matches!(hs.on_option_header(header(opt::GO, u32::MAX)), OptionData::TooBigDisconnect(_)));
        assert!(matches!(hs.on_option_header(header(opt::EXPORT_NAME, 10_000)), OptionData::TooBigDisconnect(_)));
        assert!(Handshake::too_big_reply(opt::EXPORT_NAME).is_empty());
        let got = replies(&Handshake::too_big_reply(opt::GO));
        assert_eq!(got[0].0.reply_type, rep::ERR_TOO_BIG);
        for _ in 4..HANDSHAKE_OPTIONS_MAX {
            assert_eq!(hs.on_option_header(header(opt::LIST, 0)), OptionData::Read(0));
        }
        assert_eq!(
            hs.on_option_header(header(opt::LIST, 0)),
            OptionData::TooBigDisconnect(HandshakeError::TooManyOptions)
        );
    }

    #[test]
    fn transmission_flags_follow_the_export() {
        let simple = Features::default();
        let base = ExportInfo { size_bytes: 0, read_only: false, multi_conn: false }.transmission_flags(simple);
        assert_eq!(base & tx_flag::READ_ONLY, 0);
        assert_eq!(base & tx_flag::CAN_MULTI_CONN, 0);
        assert_eq!(base & tx_flag::SEND_DF, 0, "DF only with structured replies");
        for flag in [
            tx_flag::HAS_FLAGS,
            tx_flag::SEND_FLUSH,
            tx_flag::SEND_FUA,
            tx_flag::SEND_TRIM,
            tx_flag::SEND_WRITE_ZEROES,
            tx_flag::SEND_FAST_ZERO,
        ] {
            assert_ne!(base & flag, 0);
        }
        let ro = ExportInfo { size_bytes: 0, read_only: true, multi_conn: true }.transmission_flags(simple);
        assert_eq!(ro, base | tx_flag::READ_ONLY | tx_flag::CAN_MULTI_CONN);
        let structured = Features { structured_replies: true, base_allocation: false };
        let export = ExportInfo { size_bytes: 0, read_only: false, multi_conn: false };
        assert_eq!(export.transmission_flags(structured), base | tx_flag::SEND_DF);
    }

    fn reply_type(step: &Step) -> u32 {
        let Step::Reply(bytes) = step else { panic!("a reply, not {step:?}") };
        replies(bytes)[0].0.reply_type
    }

    #[test]
    fn starttls_as_each_mode_says() {
        let list = || ClientOption::List;
        let mut off = Handshake::with_tls(TlsMode::Off);
        assert_eq!(reply_type(&off.on_option(opt::STARTTLS, &[])), rep::ERR_POLICY);
        assert_eq!(off.on_option(list().code(), &[]), Step::List);

        let mut offered = Handshake::with_tls(TlsMode::Offered);
        assert_eq!(offered.on_option(opt::LIST, &[]), Step::List, "plaintext is served");
        let Step::StartTls(ack) = offered.on_option(opt::STARTTLS, &[]) else { panic!("STARTTLS is offered") };
        assert_eq!(replies(&ack)[0].0.reply_type, rep::ACK);
        assert_eq!(replies(&ack)[0].0.option, opt::STARTTLS);
        offered.on_tls_started();
        assert!(offered.is_tls());
        assert_eq!(reply_type(&offered.on_option(opt::STARTTLS, &[])), rep::ERR_INVALID, "TLS twice");
        assert_eq!(reply_type(&offered.on_option(opt::STARTTLS, &[1])), rep::ERR_INVALID, "data with it");

        let mut required = Handshake::with_tls(TlsMode::Required);
        for option in [opt::LIST, opt::GO, opt::INFO, opt::STRUCTURED_REPLY, 77] {
            let data = if option == opt::GO || option == opt::INFO { go_data("vol", &[]) } else { Vec::new() };
            assert_eq!(reply_type(&required.on_option(option, &data)), rep::ERR_TLS_REQD, "option {option}");
        }
        assert_eq!(
            required.on_option(opt::EXPORT_NAME, b"vol"),
            Step::Disconnect(HandshakeError::TlsRequired),
            "EXPORT_NAME has no error reply"
        );
        assert!(matches!(required.on_option(opt::ABORT, &[]), Step::Abort(_)));
        assert!(matches!(required.on_option(opt::STARTTLS, &[]), Step::StartTls(_)));
        required.on_tls_started();
        assert_eq!(required.on_option(opt::LIST, &[]), Step::List, "inside TLS");
        assert!(matches!(required.on_option(opt::GO, &go_data("vol", &[])), Step::Open(_)));
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let query = MetaContextQuery { name: name.into(), queries: queries.iter().map(|q| q.to_string()).collect() };
        let mut bytes = Vec::new();
        ClientOption::SetMetaContext(query).encode(&mut bytes);
        bytes[16..].to_vec()
    }

    /// Runs a LIST or SET of `queries` on an export that opens: the contexts named, then ACK.
    fn meta_context(hs: &mut Handshake, option: u32, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let Step::Open(request) = hs.on_option(option, &meta_data(name, queries)) else {
            panic!("a metadata context option on {name} opens it")
        };
        assert_eq!(request.name, name);
        let Opened::Reply(bytes) = hs.on_opened(request, Ok(EXPORT)) else { panic!("answered in negotiation") };
        let got = replies(&bytes);
        assert_eq!(got.last().map(|(h, _)| h.reply_type), Some(rep::ACK));
        assert!(got.iter().all(|(h, _)| h.option == option));
        got[..got.len() - 1]
            .iter()
            .map(|(h, data)| {
                assert_eq!(h.reply_type, rep::META_CONTEXT);
                decode_meta_context_reply(data).expect("context reply")
            })
            .collect()
    }

    fn go(hs: &mut Handshake, name: &str) -> Features {
        let Step::Open(request) = hs.on_option(opt::GO, &go_data(name, &[])) else { panic!("GO opens") };
        match hs.on_opened(request, Ok(EXPORT)) {
            Opened::Transmission(bytes, features) => {
                let export = replies(&bytes)[0].1.clone();
                let flags = EXPORT.transmission_flags(features);
                assert_eq!(
                    Info::decode(&export),
                    Ok(Some(Info::Export { size_bytes: EXPORT.size_bytes, transmission_flags: flags }))
                );
                features
            }
            other => panic!("GO enters transmission, not {other:?}"),
        }
    }

    #[test]
    fn structured_replies_are_acknowledged_and_reset_by_tls() {
        let mut hs = Handshake::with_tls(TlsMode::Offered);
        assert_eq!(reply_type(&hs.on_option(opt::STRUCTURED_REPLY, &[])), rep::ACK);
        assert_eq!(reply_type(&hs.on_option(opt::STRUCTURED_REPLY, &[])), rep::ACK, "again: still on");
        assert!(hs.features("vol").structured_replies);
        meta_context(&mut hs, opt::SET_META_CONTEXT, "vol", &[BASE_ALLOCATION]);
        assert!(hs.features("vol").base_allocation);
        assert!(matches!(hs.on_option(opt::STARTTLS, &[]), Step::StartTls(_)));
        hs.on_tls_started();
        assert_eq!(hs.features("vol"), Features::default(), "nothing from before TLS counts");
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_namespaces() {
        let mut hs = Handshake::new();
        for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
            assert_eq!(reply_type(&hs.on_option(option, &meta_data("vol", &[BASE_ALLOCATION]))), rep::ERR_INVALID);
        }
        assert_eq!(reply_type(&hs.on_option(opt::STRUCTURED_REPLY, &[])), rep::ACK);
        for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
            // A query without a namespace; data that does not parse.
            assert_eq!(reply_type(&hs.on_option(option, &meta_data("vol", &["allocation"]))), rep::ERR_INVALID);
            assert_eq!(reply_type(&hs.on_option(option, &[0, 0, 0, 9, b'v'])), rep::ERR_INVALID);
        }
        assert_eq!(hs.features("vol"), Features { structured_replies: true, base_allocation: false });
    }

    #[test]
    fn list_meta_context_offers_base_allocation_only() {
        let mut hs = Handshake::new();
        hs.on_option(opt::STRUCTURED_REPLY, &[]);
        let base = vec![(0, BASE_ALLOCATION.to_string())];
        assert_eq!(meta_context(&mut hs, opt::LIST_META_CONTEXT, "vol", &[]), base, "no query: everything");
        assert_eq!(meta_context(&mut hs, opt::LIST_META_CONTEXT, "vol", &["base:"]), base, "the namespace");
        assert_eq!(meta_context(&mut hs, opt::LIST_META_CONTEXT, "vol", &["qemu:", BASE_ALLOCATION, "base:"]), base);
        for nothing in [&["base:allocations"][..], &["qemu:allocation-depth"], &["x-foo:bar"], &["Base:allocation"]] {
            assert_eq!(meta_context(&mut hs, opt::LIST_META_CONTEXT, "vol", nothing), vec![], "{nothing:?}");
        }
        assert!(!hs.features("vol").base_allocation, "listing selects nothing");
    }

    #[test]
    fn set_meta_context_selects_for_its_export_and_replaces() {
        let mut hs = Handshake::new();
        hs.on_option(opt::STRUCTURED_REPLY, &[]);
        let selected = vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.to_string())];
        assert_eq!(
            meta_context(&mut hs, opt::SET_META_CONTEXT, "vol", &["qemu:dirty-bitmap:b", BASE_ALLOCATION]),
            selected
        );
        // Selected for "vol" only: GO to another export gets no context.
        assert_eq!(hs.features("other"), Features { structured_replies: true, base_allocation: false });
        // A later SET replaces it; the namespace alone selects nothing.
        assert_eq!(meta_context(&mut hs, opt::SET_META_CONTEXT, "vol", &["base:"]), vec![]);
        assert!(!hs.features("vol").base_allocation);
        assert_eq!(meta_context(&mut hs, opt::SET_META_CONTEXT, "vol", &[BASE_ALLOCATION]), selected);
        assert_eq!(go(&mut hs, "vol"), Features { structured_replies: true, base_allocation: true });
    }

    #[test]
    fn meta_contexts_of_an_unknown_or_denied_export_are_errors() {
        let mut hs = Handshake::new();
        hs.on_option(opt::STRUCTURED_REPLY, &[]);
        for (option, err, code) in [
            (opt::SET_META_CONTEXT, OpenError::NotFound("no such export \"x\"".into()), rep::ERR_UNKNOWN),
            (opt::LIST_META_CONTEXT, OpenError::Unavailable("later".into()), rep::ERR_UNKNOWN),
            (opt::SET_META_CONTEXT, OpenError::Denied("not yours".into()), rep::ERR_POLICY),
        ] {
            let Step::Open(request) = hs.on_option(option, &meta_data("x", &[BASE_ALLOCATION])) else {
                panic!("opens")
            };
            let Opened::Reply(bytes) = hs.on_opened(request, Err(err)) else { panic!("answered") };
            let got = replies(&bytes);
            assert_eq!((got.len(), got[0].0.reply_type), (1, code));
        }
        assert!(!hs.features("x").base_allocation, "a failed SET selects nothing");
    }

    #[test]
    fn export_name_carries_the_negotiated_features() {
        let mut hs = Handshake::new();
        hs.on_option(opt::STRUCTURED_REPLY, &[]);
        meta_context(&mut hs, opt::SET_META_CONTEXT, "vol", &[BASE_ALLOCATION]);
        let Step::Open(request) = hs.on_option(opt::EXPORT_NAME, b"vol") else { panic!("opens") };
        let Opened::Transmission(bytes, features) = hs.on_opened(request, Ok(EXPORT)) else { panic!("transmission") };
        assert_eq!(features, Features { structured_replies: true, base_allocation: true });
        let flags = u16::from_be_bytes([bytes[8], bytes[9]]);
        assert_ne!(flags & tx_flag::SEND_DF, 0);
    }

    #[test]
    fn a_denied_export_is_a_policy_error() {
        let mut hs = Handshake::new();
        let Step::Open(request) = hs.on_option(opt::GO, &go_data("vol", &[])) else { panic!("GO opens") };
        let Opened::Reply(bytes) = hs.on_opened(request, Err(OpenError::Denied("not yours".into()))) else {
            panic!("a refused GO is answered")
        };
        let got = replies(&bytes);
        assert_eq!(got[0].0.reply_type, rep::ERR_POLICY);
        assert!(String::from_utf8_lossy(&got[0].1).contains("not yours"));
    }

    proptest::proptest! {
        /// Any sequence of options, with STARTTLS anywhere in it, in any mode: the machine
        /// answers each without panicking, and before TLS a `Required` machine lets nothing
        /// through but STARTTLS and ABORT.
        #[test]
        fn option_sequences_with_starttls_never_panic_or_leak(
            mode in 0u8..3,
            options in proptest::collection::vec((0u32..12, proptest::collection::vec(proptest::num::u8::ANY, 0..40)), 0..30),
        ) {
            let mode = [TlsMode::Off, TlsMode::Offered, TlsMode::Required][mode as usize];
            let mut hs = Handshake::with_tls(mode);
            for (option, data) in options {
                let tls_before = hs.is_tls();
                let step = hs.on_option(option, &data);
                if mode == TlsMode::Required && !tls_before {
                    proptest::prop_assert!(
                        !matches!(step, Step::List | Step::Open(_)),
                        "option {} got {:?} before TLS", option, step
                    );
                }
                if matches!(step, Step::StartTls(_)) {
                    proptest::prop_assert!(mode != TlsMode::Off && !tls_before);
                    hs.on_tls_started();
                }
            }
        }
    }
}
