//! NBD frames as bytes: constants, decoders and encoders. Sans-IO: no sockets, no tokio.
//!
//! Every decoder takes a byte slice and returns the value, [`DecodeError::Incomplete`] when
//! the slice is a strict prefix of a valid frame, or another [`DecodeError`] for bytes that can
//! never become a valid frame. No decoder panics, and none allocates more than a named `*_MAX`
//! constant whatever a length field claims. Encoders append to a `Vec<u8>`.
//!
//! Numbers and layouts follow the NBD protocol document (`doc/proto.md` in
//! github.com/NetworkBlockDevice/nbd); constant names drop the `NBD_` prefix and live in one
//! module per namespace (`opt::GO` is `NBD_OPT_GO`). All integers are big-endian.

use thiserror::Error;

/// First 8 bytes the server sends: "NBDMAGIC".
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second 8 bytes of the newstyle greeting, and the first 8 of every client option: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First 8 bytes of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First 4 bytes of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// First 4 bytes of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// First 4 bytes of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server greeting: magic, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Client flags, sent once after the greeting.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// IHAVEOPT, option, data length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Magic, flags, type, cookie, offset, length.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Magic, error, cookie.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Magic, flags, type, cookie, payload length.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// One `NBD_REPLY_TYPE_BLOCK_STATUS` descriptor: extent length, status flags.
pub const BLOCK_DESCRIPTOR_BYTES: usize = 8;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless the client set `NO_ZEROES`.
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;

/// The protocol caps strings (export names, descriptions) at 4 KiB.
pub const NAME_BYTES_MAX: usize = 4096;
/// Largest option payload the server reads into memory: an `NBD_OPT_GO` with a name of
/// [`NAME_BYTES_MAX`] bytes plus room for information requests. A longer option is answered
/// with `NBD_REP_ERR_TOO_BIG`.
pub const OPTION_DATA_BYTES_MAX: usize = 8192;
/// Largest payload of one read or write: the protocol's default maximum (2^25), which every
/// client honours without negotiation and which the server advertises in `NBD_INFO_BLOCK_SIZE`.
pub const REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// Smallest I/O unit advertised in `NBD_INFO_BLOCK_SIZE`: any byte alignment is accepted.
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Preferred I/O unit advertised in `NBD_INFO_BLOCK_SIZE`.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// The one metadata context this server offers: which ranges hold data (`NBD_STATE_*` in
/// [`state`]).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Largest structured reply chunk payload [`StructuredChunk::decode`] accepts: a read's
/// largest data plus its offset. A server sends no longer chunk.
pub const CHUNK_PAYLOAD_BYTES_MAX: u32 = REQUEST_BYTES_MAX + 8;

/// Handshake flags (sent by the server in the greeting).
pub mod handshake_flag {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (sent by the client after the greeting).
pub mod client_flag {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`). Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;

    /// Whether `reply_type` is an error reply.
    pub fn is_error(reply_type: u32) -> bool {
        reply_type & (1 << 31) != 0
    }
}

/// Information types in `NBD_OPT_INFO` / `NBD_OPT_GO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`, sent with the export size).
pub mod tx_flag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk flags (`NBD_REPLY_FLAG_*`).
pub mod reply_flag {
    /// The last chunk of its reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`). Errors have bit 15 set.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;

    /// Whether `reply_type` is an error chunk.
    pub fn is_error(reply_type: u16) -> bool {
        reply_type & (1 << 15) != 0
    }
}

/// Status flags of the `base:allocation` context (`NBD_STATE_*`).
pub mod state {
    /// Not allocated: holds no space.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Error numbers in simple replies (`NBD_E*`).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The bytes so far are a valid prefix; at least `needed_bytes` more are required.
    #[error("incomplete frame: at least {needed_bytes} more bytes needed")]
    Incomplete { needed_bytes: usize },
    /// A frame did not start with its magic number.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    /// A length field exceeds the limit for it.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { what: &'static str, len: u64, max: u64 },
    /// The frame is complete but its contents are invalid.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Reads big-endian integers from a slice, reporting how many bytes were missing.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(DecodeError::Incomplete { needed_bytes: n - rest.len() });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }
}

/// Complete option data: missing bytes mean the client lied about the length.
fn malformed_if_short(err: DecodeError, what: &'static str) -> DecodeError {
    match err {
        DecodeError::Incomplete { .. } => DecodeError::Malformed(what),
        other => other,
    }
}

fn decode_name(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
    if bytes.len() > NAME_BYTES_MAX {
        return Err(DecodeError::TooLong { what, len: bytes.len() as u64, max: NAME_BYTES_MAX as u64 });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Malformed(what))
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("NBD length fields are 32 bits; callers bound their payloads")
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Server greeting for fixed newstyle negotiation with the given handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// The handshake flags of a newstyle greeting (a client's view).
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != NBD_MAGIC {
        return Err(DecodeError::BadMagic { expected: NBD_MAGIC, found: magic });
    }
    let second = r.u64()?;
    if second != IHAVEOPT {
        return Err(DecodeError::BadMagic { expected: IHAVEOPT, found: second });
    }
    r.u16()
}

/// The 32-bit client flags. Whether they are acceptable is the handshake's business.
pub fn decode_client_flags(buf: &[u8]) -> Result<u32, DecodeError> {
    Reader::new(buf).u32()
}

pub fn encode_client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// The fixed part of a client option: which option, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub data_len: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte header. The data length is returned as claimed: the caller decides
    /// whether to read it (see [`OPTION_DATA_BYTES_MAX`]).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic { expected: IHAVEOPT, found: magic });
        }
        Ok(OptionHeader { option: r.u32()?, data_len: r.u32()? })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.data_len.to_be_bytes());
    }
}

/// The export and information requested by `NBD_OPT_INFO` or `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoQuery {
    pub name: String,
    /// `NBD_INFO_*` types, in the client's order; unknown types are kept (the server ignores them).
    pub info_requests: Vec<u16>,
}

/// The export and queries of `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextQuery {
    pub name: String,
    /// In the client's order. Their number is bounded by the option's data
    /// ([`OPTION_DATA_BYTES_MAX`]): each takes at least 4 bytes.
    pub queries: Vec<String>,
}

/// A client option with its data parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName {
        name: String,
    },
    Abort,
    List,
    Info(InfoQuery),
    Go(InfoQuery),
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`: which metadata contexts the queries match.
    ListMetaContext(MetaContextQuery),
    /// `NBD_OPT_SET_META_CONTEXT`: select the contexts the queries name, for block status.
    SetMetaContext(MetaContextQuery),
    /// `NBD_OPT_STARTTLS`: the client wants to continue over TLS.
    StartTls,
    /// Any other option number; its data is not interpreted.
    Other {
        option: u32,
        data: Vec<u8>,
    },
}

impl ClientOption {
    /// Parses the data of `option`. `data` is complete (its length came from the header and
    /// is at most [`OPTION_DATA_BYTES_MAX`] when it came from the server's reader), so a short
    /// or inconsistent payload is [`DecodeError::Malformed`], never `Incomplete`.
    pub fn parse(option: u32, data: &[u8]) -> Result<Self, DecodeError> {
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName { name: decode_name(data, "export name")? }),
            // The protocol says to ignore data sent with ABORT.
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST if data.is_empty() => Ok(ClientOption::List),
            opt::LIST => Err(DecodeError::Malformed("NBD_OPT_LIST with data")),
            opt::INFO => Ok(ClientOption::Info(parse_info_query(data)?)),
            opt::GO => Ok(ClientOption::Go(parse_info_query(data)?)),
            opt::STRUCTURED_REPLY if data.is_empty() => Ok(ClientOption::StructuredReply),
            opt::STRUCTURED_REPLY => Err(DecodeError::Malformed("NBD_OPT_STRUCTURED_REPLY with data")),
            opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_context_query(data)?)),
            opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_context_query(data)?)),
            opt::STARTTLS if data.is_empty() => Ok(ClientOption::StartTls),
            opt::STARTTLS => Err(DecodeError::Malformed("NBD_OPT_STARTTLS with data")),
            option => Ok(ClientOption::Other { option, data: data.to_vec() }),
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName { .. } => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::Info(_) => opt::INFO,
            ClientOption::Go(_) => opt::GO,
            ClientOption::StructuredReply => opt::STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => opt::LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => opt::SET_META_CONTEXT,
            ClientOption::StartTls => opt::STARTTLS,
            ClientOption::Other { option, .. } => *option,
        }
    }

    /// Encodes header and data, as a client sends them.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName { name } => data.extend_from_slice(name.as_bytes()),
            ClientOption::Abort | ClientOption::List | ClientOption::StructuredReply | ClientOption::StartTls => {}
            ClientOption::Info(query) | ClientOption::Go(query) => {
                data.extend_from_slice(&len_u32(query.name.len()).to_be_bytes());
                data.extend_from_slice(query.name.as_bytes());
                let count = u16::try_from(query.info_requests.len()).expect("at most 65535 info requests");
                data.extend_from_slice(&count.to_be_bytes());
                for request in &query.info_requests {
                    data.extend_from_slice(&request.to_be_bytes());
                }
            }
            ClientOption::ListMetaContext(query) | ClientOption::SetMetaContext(query) => {
                data.extend_from_slice(&len_u32(query.name.len()).to_be_bytes());
                data.extend_from_slice(query.name.as_bytes());
                data.extend_from_slice(&len_u32(query.queries.len()).to_be_bytes());
                for q in &query.queries {
                    data.extend_from_slice(&len_u32(q.len()).to_be_bytes());
                    data.extend_from_slice(q.as_bytes());
                }
            }
            ClientOption::Other { data: other, .. } => data.extend_from_slice(other),
        }
        OptionHeader { option: self.code(), data_len: len_u32(data.len()) }.encode(out);
        out.extend_from_slice(&data);
    }
}

/// A length-prefixed string of at most [`NAME_BYTES_MAX`] bytes.
fn read_string(
    r: &mut Reader<'_>,
    what: &'static str,
    short: &dyn Fn(DecodeError) -> DecodeError,
) -> Result<String, DecodeError> {
    let len = r.u32().map_err(short)?;
    if len as usize > NAME_BYTES_MAX {
        return Err(DecodeError::TooLong { what, len: u64::from(len), max: NAME_BYTES_MAX as u64 });
    }
    decode_name(r.take(len as usize).map_err(short)?, what)
}

fn parse_meta_context_query(data: &[u8]) -> Result<MetaContextQuery, DecodeError> {
    let mut r = Reader::new(data);
    let short = |e| malformed_if_short(e, "NBD_OPT_*_META_CONTEXT data");
    let name = read_string(&mut r, "export name", &short)?;
    let count = r.u32().map_err(short)?;
    // Each query takes at least its 4-byte length: a count the data cannot hold is refused
    // before anything is reserved for it.
    if count as usize > (data.len() - r.pos) / 4 {
        return Err(DecodeError::Malformed("NBD_OPT_*_META_CONTEXT query count"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(read_string(&mut r, "metadata context query", &short)?);
    }
    if !r.rest().is_empty() {
        return Err(DecodeError::Malformed("NBD_OPT_*_META_CONTEXT data length"));
    }
    Ok(MetaContextQuery { name, queries })
}

fn parse_info_query(data: &[u8]) -> Result<InfoQuery, DecodeError> {
    let mut r = Reader::new(data);
    let short = |e| malformed_if_short(e, "NBD_OPT_INFO/GO data");
    let name_len = r.u32().map_err(short)?;
    if name_len as usize > NAME_BYTES_MAX {
        return Err(DecodeError::TooLong { what: "export name", len: u64::from(name_len), max: NAME_BYTES_MAX as u64 });
    }
    let name = decode_name(r.take(name_len as usize).map_err(short)?, "export name")?;
    let count = r.u16().map_err(short)?;
    let rest = r.rest();
    // Exact length: the count must describe every remaining byte.
    if rest.len() != usize::from(count) * 2 {
        return Err(DecodeError::Malformed("NBD_OPT_INFO/GO information request count"));
    }
    let info_requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoQuery { name, info_requests })
}

/// Decodes one whole option (header and data) from the start of `buf`, returning it and the
/// number of bytes used. Data longer than [`OPTION_DATA_BYTES_MAX`] is [`DecodeError::TooLong`]
/// before any of it is awaited.
pub fn decode_option(buf: &[u8]) -> Result<(ClientOption, usize), DecodeError> {
    let header = OptionHeader::decode(buf)?;
    let data_len = header.data_len as usize;
    if data_len > OPTION_DATA_BYTES_MAX {
        return Err(DecodeError::TooLong {
            what: "option data",
            len: u64::from(header.data_len),
            max: OPTION_DATA_BYTES_MAX as u64,
        });
    }
    let mut r = Reader::new(&buf[OPTION_HEADER_BYTES..]);
    let data = r.take(data_len)?;
    Ok((ClientOption::parse(header.option, data)?, OPTION_HEADER_BYTES + data_len))
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub data_len: u32,
}

impl OptionReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(DecodeError::BadMagic { expected: OPTION_REPLY_MAGIC, found: magic });
        }
        Ok(OptionReplyHeader { option: r.u32()?, reply_type: r.u32()?, data_len: r.u32()? })
    }
}

/// Appends an option reply: header and `data`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply whose data is a human-readable message (cut to [`NAME_BYTES_MAX`]).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    assert!(rep::is_error(reply_type), "{reply_type:#x} is not an error reply");
    let mut end = message.len().min(NAME_BYTES_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    encode_option_reply(out, option, reply_type, &message.as_bytes()[..end]);
}

/// Appends an `NBD_REP_SERVER` reply naming one export (for `NBD_OPT_LIST`).
pub fn encode_server_reply(out: &mut Vec<u8>, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, opt::LIST, rep::SERVER, &data);
}

/// The export name in an `NBD_REP_SERVER` reply's data.
pub fn decode_server_reply(data: &[u8]) -> Result<String, DecodeError> {
    let mut r = Reader::new(data);
    let short = |e| malformed_if_short(e, "NBD_REP_SERVER data");
    let len = r.u32().map_err(short)?;
    if len as usize > NAME_BYTES_MAX {
        return Err(DecodeError::TooLong { what: "export name", len: u64::from(len), max: NAME_BYTES_MAX as u64 });
    }
    decode_name(r.take(len as usize).map_err(short)?, "export name")
}

/// Appends an `NBD_REP_META_CONTEXT` reply to `option`: a context's id and name.
pub fn encode_meta_context_reply(out: &mut Vec<u8>, option: u32, context_id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&context_id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, rep::META_CONTEXT, &data);
}

/// The context id and name in an `NBD_REP_META_CONTEXT` reply's data.
pub fn decode_meta_context_reply(data: &[u8]) -> Result<(u32, String), DecodeError> {
    let mut r = Reader::new(data);
    let id = r.u32().map_err(|e| malformed_if_short(e, "NBD_REP_META_CONTEXT data"))?;
    Ok((id, decode_name(r.rest(), "metadata context name")?))
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size_bytes: u64, transmission_flags: u16 },
    Name(String),
    Description(String),
    BlockSize { min: u32, preferred: u32, max: u32 },
}

impl Info {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Info::Export { size_bytes, transmission_flags } => {
                out.extend_from_slice(&info::EXPORT.to_be_bytes());
                out.extend_from_slice(&size_bytes.to_be_bytes());
                out.extend_from_slice(&transmission_flags.to_be_bytes());
            }
            Info::Name(name) => {
                out.extend_from_slice(&info::NAME.to_be_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            Info::Description(text) => {
                out.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            Info::BlockSize { min, preferred, max } => {
                out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&min.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&max.to_be_bytes());
            }
        }
    }

    /// Decodes an `NBD_REP_INFO` reply's data. Unknown information types are `Ok(None)`.
    pub fn decode(data: &[u8]) -> Result<Option<Self>, DecodeError> {
        let mut r = Reader::new(data);
        let short = |e| malformed_if_short(e, "NBD_REP_INFO data");
        let kind = r.u16().map_err(short)?;
        let info = match kind {
            info::EXPORT => {
                Info::Export { size_bytes: r.u64().map_err(short)?, transmission_flags: r.u16().map_err(short)? }
            }
            info::NAME => Info::Name(decode_name(r.rest(), "export name")?),
            info::DESCRIPTION => Info::Description(decode_name(r.rest(), "export description")?),
            info::BLOCK_SIZE => Info::BlockSize {
                min: r.u32().map_err(short)?,
                preferred: r.u32().map_err(short)?,
                max: r.u32().map_err(short)?,
            },
            _ => return Ok(None),
        };
        if !r.rest().is_empty() {
            return Err(DecodeError::Malformed("NBD_REP_INFO data length"));
        }
        Ok(Some(info))
    }
}

/// Appends an `NBD_REP_INFO` reply to `option` (`NBD_OPT_INFO` or `NBD_OPT_GO`).
pub fn encode_info_reply(out: &mut Vec<u8>, option: u32, info: &Info) {
    let mut data = Vec::new();
    info.encode(&mut data);
    encode_option_reply(out, option, rep::INFO, &data);
}

/// Appends the reply that ends `NBD_OPT_EXPORT_NAME`: size, flags and, unless the client
/// negotiated `NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, transmission_flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES]);
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A transmission request header. A write's payload (`length` bytes) follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Decodes the 28-byte header. A bad magic means the stream is out of sync: disconnect.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic { expected: u64::from(REQUEST_MAGIC), found: u64::from(magic) });
        }
        Ok(RequestHeader { flags: r.u16()?, command: r.u16()?, cookie: r.u64()?, offset: r.u64()?, length: r.u32()? })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A simple reply header. A successful read's data follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 for success, else an [`errno`] value.
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(DecodeError::BadMagic { expected: u64::from(SIMPLE_REPLY_MAGIC), found: u64::from(magic) });
        }
        Ok(SimpleReply { error: r.u32()?, cookie: r.u64()? })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
    }

    /// The 16 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; SIMPLE_REPLY_BYTES] {
        let mut out = [0u8; SIMPLE_REPLY_BYTES];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }
}

/// The header of one structured reply chunk; `length` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    /// [`reply_flag`] bits.
    pub flags: u16,
    /// A [`reply_type`] value.
    pub reply_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl StructuredReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(DecodeError::BadMagic { expected: u64::from(STRUCTURED_REPLY_MAGIC), found: u64::from(magic) });
        }
        Ok(StructuredReplyHeader { flags: r.u16()?, reply_type: r.u16()?, cookie: r.u64()?, length: r.u32()? })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.reply_type.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    pub fn is_done(&self) -> bool {
        self.flags & reply_flag::DONE != 0
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        reply_flag::DONE
    } else {
        0
    }
}

/// One extent of a block status reply: its length and its status flags (for `base:allocation`,
/// [`state`] bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// Appends an `NBD_REPLY_TYPE_NONE` chunk: the end of a reply that has nothing (more) to say.
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    StructuredReplyHeader { flags: reply_flag::DONE, reply_type: reply_type::NONE, cookie, length: 0 }.encode(out);
}

/// Appends the header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: `data_len` bytes
/// (1 to [`REQUEST_BYTES_MAX`]) of data read at `offset` must follow.
pub fn encode_offset_data_header(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, data_len: u32) {
    assert!(data_len > 0 && data_len <= REQUEST_BYTES_MAX, "a data chunk carries 1 to {REQUEST_BYTES_MAX} bytes");
    let header = StructuredReplyHeader {
        flags: done_flag(done),
        reply_type: reply_type::OFFSET_DATA,
        cookie,
        length: 8 + data_len,
    };
    header.encode(out);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes (at least 1) at `offset`
/// read as zeroes.
pub fn encode_offset_hole_chunk(out: &mut Vec<u8>, cookie: u64, done: bool, offset: u64, hole_len: u32) {
    assert!(hole_len > 0, "a hole chunk covers at least one byte");
    let header =
        StructuredReplyHeader { flags: done_flag(done), reply_type: reply_type::OFFSET_HOLE, cookie, length: 12 };
    header.encode(out);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context: at least one
/// descriptor, each of a non-zero length.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    done: bool,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) {
    assert!(!descriptors.is_empty(), "a block status chunk has at least one descriptor");
    assert!(descriptors.iter().all(|d| d.length > 0), "block status descriptors are never empty");
    let header = StructuredReplyHeader {
        flags: done_flag(done),
        reply_type: reply_type::BLOCK_STATUS,
        cookie,
        length: len_u32(4 + descriptors.len() * BLOCK_DESCRIPTOR_BYTES),
    };
    header.encode(out);
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// Appends the final chunk of a failed reply: `NBD_REPLY_TYPE_ERROR`, or
/// `NBD_REPLY_TYPE_ERROR_OFFSET` when the failure is at a known `offset` of a read. The
/// message is cut to [`NAME_BYTES_MAX`] bytes on a character boundary.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32, message: &str, offset: Option<u64>) {
    assert!(errno != 0, "an error chunk carries an error");
    let mut end = message.len().min(NAME_BYTES_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let (kind, extra) = match offset {
        Some(_) => (reply_type::ERROR_OFFSET, 8),
        None => (reply_type::ERROR, 0),
    };
    let header = StructuredReplyHeader {
        flags: reply_flag::DONE,
        reply_type: kind,
        cookie,
        length: len_u32(6 + message.len() + extra),
    };
    header.encode(out);
    out.extend_from_slice(&errno.to_be_bytes());
    let message_len = u16::try_from(message.len()).expect("NAME_BYTES_MAX fits 16 bits");
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message);
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

/// A structured reply chunk's payload, decoded (a client's view, and the tests').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StructuredChunk {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<BlockDescriptor>,
    },
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
    /// A type this decoder does not know; its payload is skipped.
    Other {
        reply_type: u16,
    },
}

impl StructuredChunk {
    /// Decodes one whole chunk (header and payload) from the start of `buf`, returning its
    /// header, its payload and the bytes used. A payload over [`CHUNK_PAYLOAD_BYTES_MAX`] is
    /// [`DecodeError::TooLong`] before any of it is awaited.
    pub fn decode(buf: &[u8]) -> Result<(StructuredReplyHeader, StructuredChunk, usize), DecodeError> {
        let header = StructuredReplyHeader::decode(buf)?;
        if header.length > CHUNK_PAYLOAD_BYTES_MAX {
            return Err(DecodeError::TooLong {
                what: "structured reply chunk",
                len: u64::from(header.length),
                max: u64::from(CHUNK_PAYLOAD_BYTES_MAX),
            });
        }
        let payload = Reader::new(&buf[STRUCTURED_REPLY_HEADER_BYTES..]).take(header.length as usize)?;
        let mut r = Reader::new(payload);
        let short = |e| malformed_if_short(e, "structured reply chunk");
        let chunk = match header.reply_type {
            reply_type::NONE => StructuredChunk::None,
            reply_type::OFFSET_DATA => {
                let offset = r.u64().map_err(short)?;
                StructuredChunk::OffsetData { offset, data: r.rest().to_vec() }
            }
            reply_type::OFFSET_HOLE => {
                StructuredChunk::OffsetHole { offset: r.u64().map_err(short)?, length: r.u32().map_err(short)? }
            }
            reply_type::BLOCK_STATUS => {
                let context_id = r.u32().map_err(short)?;
                let rest = r.rest();
                if rest.len() % BLOCK_DESCRIPTOR_BYTES != 0 {
                    return Err(DecodeError::Malformed("block status descriptors"));
                }
                let descriptors = rest
                    .chunks_exact(BLOCK_DESCRIPTOR_BYTES)
                    .map(|d| BlockDescriptor {
                        length: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                        flags: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                    })
                    .collect();
                StructuredChunk::BlockStatus { context_id, descriptors }
            }
            reply_type::ERROR | reply_type::ERROR_OFFSET => {
                let errno = r.u32().map_err(short)?;
                let message_len = r.u16().map_err(short)?;
                let message = decode_name(r.take(usize::from(message_len)).map_err(short)?, "error message")?;
                let offset = match header.reply_type {
                    reply_type::ERROR_OFFSET => Some(r.u64().map_err(short)?),
                    _ => None,
                };
                StructuredChunk::Error { errno, message, offset }
            }
            other => {
                r.rest();
                StructuredChunk::Other { reply_type: other }
            }
        };
        if !r.rest().is_empty() {
            return Err(DecodeError::Malformed("structured reply chunk length"));
        }
        Ok((header, chunk, STRUCTURED_REPLY_HEADER_BYTES + header.length as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9_./é-]{0,64}").expect("valid regex")
    }

    fn info_query() -> impl Strategy<Value = InfoQuery> {
        (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, info_requests)| InfoQuery { name, info_requests })
    }

    fn meta_query() -> impl Strategy<Value = MetaContextQuery> {
        (name(), proptest::collection::vec(name(), 0..6)).prop_map(|(name, queries)| MetaContextQuery { name, queries })
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
            meta_query().prop_map(ClientOption::ListMetaContext),
            meta_query().prop_map(ClientOption::SetMetaContext),
            name().prop_map(|name| ClientOption::ExportName { name }),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StructuredReply),
            info_query().prop_map(ClientOption::Info),
            info_query().prop_map(ClientOption::Go),
            (12u32.., proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(option, data)| ClientOption::Other { option, data }),
        ]
    }

    fn request() -> impl Strategy<Value = RequestHeader> {
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(flags, command, cookie, offset, length)| RequestHeader { flags, command, cookie, offset, length },
        )
    }

    /// Every strict prefix of a valid frame is `Incomplete`, and asks for at most the rest.
    fn assert_prefixes_incomplete<T: std::fmt::Debug>(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<T, DecodeError>) {
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut]) {
                Err(DecodeError::Incomplete { needed_bytes }) => {
                    assert!(needed_bytes >= 1 && needed_bytes <= bytes.len() - cut, "cut {cut}: needed {needed_bytes}");
                }
                other => panic!("prefix of {cut}/{} bytes decoded to {other:?}", bytes.len()),
            }
        }
    }

    proptest! {
        #[test]
        fn request_round_trips(header in request()) {
            let mut bytes = Vec::new();
            header.encode(&mut bytes);
            prop_assert_eq!(bytes.len(), REQUEST_HEADER_BYTES);
            prop_assert_eq!(RequestHeader::decode(&bytes), Ok(header));
            assert_prefixes_incomplete(&bytes, RequestHeader::decode);
        }

        #[test]
        fn simple_reply_round_trips(error in any::<u32>(), cookie in any::<u64>()) {
            let reply = SimpleReply { error, cookie };
            let mut bytes = Vec::new();
            reply.encode(&mut bytes);
            prop_assert_eq!(&bytes[..], &reply.to_bytes()[..]);
            prop_assert_eq!(SimpleReply::decode(&bytes), Ok(reply));
            assert_prefixes_incomplete(&bytes, SimpleReply::decode);
        }

        #[test]
        fn option_round_trips(option in client_option()) {
            let mut bytes = Vec::new();
            option.encode(&mut bytes);
            prop_assert_eq!(decode_option(&bytes), Ok((option.clone(), bytes.len())));
            assert_prefixes_incomplete(&bytes, decode_option);
            // Trailing bytes belong to the next frame.
            bytes.extend_from_slice(b"next");
            prop_assert_eq!(decode_option(&bytes), Ok((option, bytes.len() - 4)));
        }

        #[test]
        fn info_round_trips(size_bytes in any::<u64>(), transmission_flags in any::<u16>(), text in name(),
                            min in any::<u32>(), preferred in any::<u32>(), max in any::<u32>()) {
            for info in [
                Info::Export { size_bytes, transmission_flags },
                Info::Name(text.clone()),
                Info::Description(text.clone()),
                Info::BlockSize { min, preferred, max },
            ] {
                let mut bytes = Vec::new();
                encode_info_reply(&mut bytes, opt::GO, &info);
                let header = OptionReplyHeader::decode(&bytes).expect("reply header");
                prop_assert_eq!(header, OptionReplyHeader { option: opt::GO, reply_type: rep::INFO, data_len: (bytes.len() - OPTION_REPLY_HEADER_BYTES) as u32 });
                prop_assert_eq!(Info::decode(&bytes[OPTION_REPLY_HEADER_BYTES..]), Ok(Some(info)));
                assert_prefixes_incomplete(&bytes[..OPTION_REPLY_HEADER_BYTES], OptionReplyHeader::decode);
            }
        }

        #[test]
        fn server_reply_round_trips(export in name()) {
            let mut bytes = Vec::new();
            encode_server_reply(&mut bytes, &export);
            prop_assert_eq!(decode_server_reply(&bytes[OPTION_REPLY_HEADER_BYTES..]), Ok(export));
        }

        #[test]
        fn greeting_round_trips(flags in any::<u16>()) {
            let mut bytes = Vec::new();
            encode_greeting(&mut bytes, flags);
            prop_assert_eq!(bytes.len(), GREETING_BYTES);
            prop_assert_eq!(decode_greeting(&bytes), Ok(flags));
            assert_prefixes_incomplete(&bytes, decode_greeting);
        }

        /// Arbitrary bytes: no panic, and anything that decodes re-encodes to the same bytes.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(header) = RequestHeader::decode(&bytes) {
                let mut again = Vec::new();
                header.encode(&mut again);
                prop_assert_eq!(&again[..], &bytes[..REQUEST_HEADER_BYTES]);
            }
            if let Ok((option, used)) = decode_option(&bytes) {
                prop_assert!(used <= bytes.len());
                let mut again = Vec::new();
                option.encode(&mut again);
                prop_assert_eq!(decode_option(&again), Ok((option, again.len())));
            }
            for option in [opt::EXPORT_NAME, opt::ABORT, opt::LIST, opt::INFO, opt::GO, opt::STRUCTURED_REPLY,
                           opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT, 99] {
                let _ = ClientOption::parse(option, &bytes);
            }
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionReplyHeader::decode(&bytes);
            let _ = Info::decode(&bytes);
            let _ = decode_server_reply(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = decode_meta_context_reply(&bytes);
            if let Ok((header, _, used)) = StructuredChunk::decode(&bytes) {
                prop_assert_eq!(used, STRUCTURED_REPLY_HEADER_BYTES + header.length as usize);
            }
            let _ = decode_greeting(&bytes);
            let _ = decode_client_flags(&bytes);
        }

        /// Random bytes after a valid magic reach the field checks instead of stopping at the magic.
        #[test]
        fn random_option_bodies_never_panic(option in prop_oneof![Just(opt::INFO), Just(opt::GO), Just(opt::EXPORT_NAME),
                                                                  Just(opt::LIST_META_CONTEXT), Just(opt::SET_META_CONTEXT), any::<u32>()],
                                            data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut bytes = Vec::new();
            OptionHeader { option, data_len: data.len() as u32 }.encode(&mut bytes);
            bytes.extend_from_slice(&data);
            if let Ok((parsed, used)) = decode_option(&bytes) {
                prop_assert_eq!(used, bytes.len());
                prop_assert_eq!(parsed.code(), option);
            }
        }
    }

    fn chunk_of(bytes: &[u8]) -> (StructuredReplyHeader, StructuredChunk) {
        let (header, chunk, used) = StructuredChunk::decode(bytes).expect("a whole chunk");
        assert_eq!(used, bytes.len());
        (header, chunk)
    }

    proptest! {
        /// Every chunk the server sends decodes to what was encoded, its header says how long it
        /// is, and every prefix of it is `Incomplete`.
        #[test]
        fn structured_chunks_round_trip(cookie in any::<u64>(), offset in any::<u64>(), done in any::<bool>(),
                                        data in proptest::collection::vec(any::<u8>(), 1..64), hole in 1u32..,
                                        context_id in any::<u32>(),
                                        descriptors in proptest::collection::vec((1u32.., any::<u32>()), 1..16),
                                        errno in 1u32.., message in name()) {
            let flags = if done { reply_flag::DONE } else { 0 };
            let mut bytes = Vec::new();
            encode_offset_data_header(&mut bytes, cookie, done, offset, data.len() as u32);
            bytes.extend_from_slice(&data);
            let (header, chunk) = chunk_of(&bytes);
            prop_assert_eq!(header, StructuredReplyHeader { flags, reply_type: reply_type::OFFSET_DATA, cookie, length: 8 + data.len() as u32 });
            prop_assert_eq!(chunk, StructuredChunk::OffsetData { offset, data: data.clone() });
            assert_prefixes_incomplete(&bytes, StructuredChunk::decode);

            let mut bytes = Vec::new();
            encode_offset_hole_chunk(&mut bytes, cookie, done, offset, hole);
            prop_assert_eq!(chunk_of(&bytes), (StructuredReplyHeader { flags, reply_type: reply_type::OFFSET_HOLE, cookie, length: 12 },
                                               StructuredChunk::OffsetHole { offset, length: hole }));
            assert_prefixes_incomplete(&bytes, StructuredChunk::decode);

            let descriptors: Vec<BlockDescriptor> = descriptors.into_iter().map(|(length, flags)| BlockDescriptor { length, flags }).collect();
            let mut bytes = Vec::new();
            encode_block_status_chunk(&mut bytes, cookie, done, context_id, &descriptors);
            prop_assert_eq!(bytes.len(), STRUCTURED_REPLY_HEADER_BYTES + 4 + BLOCK_DESCRIPTOR_BYTES * descriptors.len());
            prop_assert_eq!(chunk_of(&bytes).1, StructuredChunk::BlockStatus { context_id, descriptors });

            for at in [None, Some(offset)] {
                let mut bytes = Vec::new();
                encode_error_chunk(&mut bytes, cookie, errno, &message, at);
                let (header, chunk) = chunk_of(&bytes);
                prop_assert!(header.is_done() && reply_type::is_error(header.reply_type));
                prop_assert_eq!(chunk, StructuredChunk::Error { errno, message: message.clone(), offset: at });
                assert_prefixes_incomplete(&bytes, StructuredChunk::decode);
            }

            let mut bytes = Vec::new();
            encode_none_chunk(&mut bytes, cookie);
            prop_assert_eq!(chunk_of(&bytes), (StructuredReplyHeader { flags: reply_flag::DONE, reply_type: reply_type::NONE, cookie, length: 0 },
                                               StructuredChunk::None));
        }

        #[test]
        fn meta_context_replies_round_trip(context_id in any::<u32>(), context in name()) {
            let mut bytes = Vec::new();
            encode_meta_context_reply(&mut bytes, opt::SET_META_CONTEXT, context_id, &context);
            let header = OptionReplyHeader::decode(&bytes).expect("header");
            prop_assert_eq!((header.option, header.reply_type), (opt::SET_META_CONTEXT, rep::META_CONTEXT));
            prop_assert_eq!(decode_meta_context_reply(&bytes[OPTION_REPLY_HEADER_BYTES..]), Ok((context_id, context)));
        }
    }

    #[test]
    fn oversized_and_inconsistent_chunks_are_refused() {
        let mut bytes = Vec::new();
        StructuredReplyHeader { flags: 0, reply_type: reply_type::OFFSET_DATA, cookie: 1, length: u32::MAX }
            .encode(&mut bytes);
        assert!(matches!(StructuredChunk::decode(&bytes), Err(DecodeError::TooLong { .. })));
        // A block status payload that is not a whole number of descriptors.
        let mut bytes = Vec::new();
        StructuredReplyHeader { flags: 0, reply_type: reply_type::BLOCK_STATUS, cookie: 1, length: 7 }
            .encode(&mut bytes);
        bytes.extend_from_slice(&[0; 7]);
        assert_eq!(StructuredChunk::decode(&bytes), Err(DecodeError::Malformed("block status descriptors")));
        // An error message longer than the payload.
        let mut bytes = Vec::new();
        StructuredReplyHeader { flags: 1, reply_type: reply_type::ERROR, cookie: 1, length: 6 }.encode(&mut bytes);
        bytes.extend_from_slice(&[0, 0, 0, 5, 0, 9]);
        assert!(matches!(StructuredChunk::decode(&bytes), Err(DecodeError::Malformed(_))));
        // Error messages are cut to the protocol's string limit, on a character boundary.
        let mut bytes = Vec::new();
        encode_error_chunk(&mut bytes, 1, errno::EIO, &"é".repeat(NAME_BYTES_MAX), Some(0));
        let (header, StructuredChunk::Error { message, .. }) = chunk_of(&bytes) else { panic!("an error chunk") };
        assert!(message.len() <= NAME_BYTES_MAX && header.length as usize == 6 + message.len() + 8);
    }

    #[test]
    fn meta_context_queries_are_bounded_and_exact() {
        let query = |name: &str, queries: &[&str]| {
            let option = ClientOption::SetMetaContext(MetaContextQuery {
                name: name.into(),
                queries: queries.iter().map(|q| q.to_string()).collect(),
            });
            let mut bytes = Vec::new();
            option.encode(&mut bytes);
            bytes[OPTION_HEADER_BYTES..].to_vec()
        };
        let data = query("vol", &["base:allocation", "qemu:dirty-bitmap:x"]);
        assert_eq!(
            ClientOption::parse(opt::SET_META_CONTEXT, &data),
            Ok(ClientOption::SetMetaContext(MetaContextQuery {
                name: "vol".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            }))
        );
        // A count that the remaining bytes cannot hold: refused, nothing reserved for it.
        let mut lying = query("vol", &[]);
        let at = lying.len() - 4;
        lying[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            ClientOption::parse(opt::LIST_META_CONTEXT, &lying),
            Err(DecodeError::Malformed("NBD_OPT_*_META_CONTEXT query count"))
        );
        // Trailing bytes, a short query, and a query over the string limit.
        let mut trailing = query("vol", &["base:allocation"]);
        trailing.push(0);
        assert!(matches!(ClientOption::parse(opt::SET_META_CONTEXT, &trailing), Err(DecodeError::Malformed(_))));
        let short = query("vol", &["base:allocation"]);
        assert!(matches!(
            ClientOption::parse(opt::SET_META_CONTEXT, &short[..short.len() - 1]),
            Err(DecodeError::Malformed(_))
        ));
        let mut long = query("vol", &[]);
        let at = long.len() - 4;
        long[at..].copy_from_slice(&1u32.to_be_bytes());
        long.extend_from_slice(&(NAME_BYTES_MAX as u32 + 1).to_be_bytes());
        assert!(matches!(ClientOption::parse(opt::SET_META_CONTEXT, &long), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn bad_magics_are_rejected() {
        let mut bytes = Vec::new();
        RequestHeader { flags: 0, command: cmd::READ, cookie: 1, offset: 0, length: 512 }.encode(&mut bytes);
        bytes[0] ^= 0xff;
        assert!(matches!(RequestHeader::decode(&bytes), Err(DecodeError::BadMagic { .. })));
        // A wrong magic is reported as soon as its bytes are in, not after the whole header.
        assert!(matches!(RequestHeader::decode(&bytes[..4]), Err(DecodeError::BadMagic { .. })));

        let mut bytes = Vec::new();
        ClientOption::List.encode(&mut bytes);
        bytes[7] ^= 1;
        assert!(matches!(decode_option(&bytes), Err(DecodeError::BadMagic { .. })));
    }

    #[test]
    fn oversized_option_data_is_refused_before_it_arrives() {
        let mut bytes = Vec::new();
        OptionHeader { option: opt::GO, data_len: u32::MAX }.encode(&mut bytes);
        assert_eq!(
            decode_option(&bytes),
            Err(DecodeError::TooLong {
                what: "option data",
                len: u64::from(u32::MAX),
                max: OPTION_DATA_BYTES_MAX as u64
            })
        );
    }

    #[test]
    fn inconsistent_info_queries_are_malformed() {
        // Name length beyond the data.
        let mut data = Vec::new();
        data.extend_from_slice(&100u32.to_be_bytes());
        data.extend_from_slice(b"abc");
        assert!(matches!(ClientOption::parse(opt::GO, &data), Err(DecodeError::Malformed(_))));
        // Name length beyond the protocol's string limit.
        let mut data = Vec::new();
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(ClientOption::parse(opt::GO, &data), Err(DecodeError::TooLong { .. })));
        // Count claims more requests than there are bytes.
        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes());
        data.extend_from_slice(&info::NAME.to_be_bytes());
        assert!(matches!(ClientOption::parse(opt::INFO, &data), Err(DecodeError::Malformed(_))));
        // Not UTF-8.
        assert!(matches!(ClientOption::parse(opt::EXPORT_NAME, &[0xff, 0xfe]), Err(DecodeError::Malformed(_))));
        assert!(matches!(ClientOption::parse(opt::LIST, b"x"), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let mut with = Vec::new();
        encode_export_name_reply(&mut with, 1 << 20, tx_flag::HAS_FLAGS, false);
        assert_eq!(with.len(), 8 + 2 + EXPORT_NAME_REPLY_ZEROES);
        let mut without = Vec::new();
        encode_export_name_reply(&mut without, 1 << 20, tx_flag::HAS_FLAGS, true);
        assert_eq!(without, with[..10]);
    }

    #[test]
    fn error_messages_are_cut_on_a_char_boundary() {
        let message = "é".repeat(NAME_BYTES_MAX);
        let mut bytes = Vec::new();
        encode_option_error(&mut bytes, opt::GO, rep::ERR_UNKNOWN, &message);
        let header = OptionReplyHeader::decode(&bytes).expect("header");
        assert!(header.data_len as usize <= NAME_BYTES_MAX);
        assert!(std::str::from_utf8(&bytes[OPTION_REPLY_HEADER_BYTES..]).is_ok());
    }
}
