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
            ClientOption::Other { data: other, .. } => data.extend_from_slice(other),
        }
        OptionHeader { option: self.code(), data_len: len_u32(data.len()) }.encode(out);
        out.extend_from_slice(&data);
    }
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

    fn client_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
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
            for option in [opt::EXPORT_NAME, opt::ABORT, opt::LIST, opt::INFO, opt::GO, opt::STRUCTURED_REPLY, 99] {
                let _ = ClientOption::parse(option, &bytes);
            }
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionReplyHeader::decode(&bytes);
            let _ = Info::decode(&bytes);
            let _ = decode_server_reply(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = decode_greeting(&bytes);
            let _ = decode_client_flags(&bytes);
        }

        /// Random bytes after a valid magic reach the field checks instead of stopping at the magic.
        #[test]
        fn random_option_bodies_never_panic(option in prop_oneof![Just(opt::INFO), Just(opt::GO), Just(opt::EXPORT_NAME), any::<u32>()],
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
