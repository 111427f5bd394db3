//! One NBD client for tests and benchmarks, written from the protocol document independently
//! of the server's codec: fixed newstyle handshake with `NBD_OPT_GO`, then simple requests one
//! at a time. Errors are returned, never panicked on, so callers can count failed requests;
//! an error the server answered ([`NbdError::Refused`]) leaves the connection usable.
//!
//! The wire builders ([`option_bytes`], [`go_bytes`], [`request_bytes`]) are public for tests
//! that speak the protocol byte by byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Client flags: fixed newstyle (1) and no zeroes (2).
pub const CLIENT_FLAGS: u32 = 3;
pub const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERROR_BIT: u32 = 0x8000_0000;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// An option reply longer than this is a broken server, not data.
const OPT_REPLY_BYTES_MAX: usize = 64 * 1024;

/// An option request: `IHAVEOPT`, the option, and its data.
pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_OPT_GO` for `export`, asking for no particular information.
pub fn go_bytes(export: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(6 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    option_bytes(OPT_GO, &data)
}

/// A transmission request header (the payload of a write follows it).
pub fn request_bytes(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

fn u16_at(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// How a request failed.
#[derive(Debug)]
pub enum NbdError {
    /// The server answered with this NBD error; the connection is still usable.
    Refused(u32),
    /// The connection broke or timed out, or the answer made no sense.
    Io(std::io::Error),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Refused(e) => write!(f, "server error {e}"),
            NbdError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for NbdError {}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> NbdError {
        NbdError::Io(e)
    }
}

fn protocol_error(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

pub struct NbdClient {
    sock: TcpStream,
    /// The export's size, from `NBD_INFO_EXPORT`.
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `export` at `addr`; `timeout` bounds the connect and every later request.
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> std::io::Result<NbdClient> {
        Self::connect_with(addr, export, timeout, timeout)
    }

    /// As [`NbdClient::connect`], with separate bounds for the connect and for each request.
    pub fn connect_with(
        addr: SocketAddr,
        export: &str,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> std::io::Result<NbdClient> {
        let sock = TcpStream::connect_timeout(&addr, connect_timeout)?;
        sock.set_read_timeout(Some(io_timeout))?;
        sock.set_write_timeout(Some(io_timeout))?;
        sock.set_nodelay(true)?;
        let mut c = NbdClient { sock, size: 0, cookie: 0 };
        let mut hello = [0u8; 18];
        c.sock.read_exact(&mut hello)?;
        if u64_at(&hello) != NBDMAGIC || u64_at(&hello[8..]) != IHAVEOPT {
            return Err(protocol_error("not an NBD newstyle server"));
        }
        c.sock.write_all(&CLIENT_FLAGS.to_be_bytes())?;
        c.sock.write_all(&go_bytes(export))?;
        loop {
            let mut h = [0u8; 20];
            c.sock.read_exact(&mut h)?;
            if u64_at(&h) != OPT_REPLY_MAGIC {
                return Err(protocol_error("bad option reply magic"));
            }
            let kind = u32_at(&h[12..]);
            let len = u32_at(&h[16..]) as usize;
            if len > OPT_REPLY_BYTES_MAX {
                return Err(protocol_error(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len];
            c.sock.read_exact(&mut data)?;
            match kind {
                REP_ACK => return Ok(c),
                REP_INFO if len >= 12 && u16_at(&data) == INFO_EXPORT => c.size = u64_at(&data[2..]),
                k if k & REP_ERROR_BIT != 0 => {
                    return Err(protocol_error(format!(
                        "export {export:?} refused ({k:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                _ => {}
            }
        }
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<u64> {
        self.cookie += 1;
        let mut r = request_bytes(cmd, 0, self.cookie, offset, len);
        r.extend_from_slice(payload);
        self.sock.write_all(&r)?;
        Ok(self.cookie)
    }

    fn reply(&mut self, cookie: u64) -> Result<(), NbdError> {
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if u32_at(&h) != SIMPLE_REPLY_MAGIC || u64_at(&h[8..]) != cookie {
            return Err(NbdError::Io(protocol_error("bad reply header")));
        }
        match u32_at(&h[4..]) {
            0 => Ok(()),
            e => Err(NbdError::Refused(e)),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let cookie = self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.reply(cookie)
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, NbdError> {
        let cookie = self.request(CMD_READ, offset, len as u32, &[])?;
        self.reply(cookie)?;
        let mut buf = vec![0u8; len];
        self.sock.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        let cookie = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply(cookie)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}

/// After a failed connection attempt, the next one waits this long.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// A client that connects on demand and again after its connection broke, to its addresses
/// in turn (a host that fails over between paths).
pub struct Reconnecting {
    addrs: Vec<SocketAddr>,
    export: String,
    timeout: Duration,
    next: usize,
    client: Option<NbdClient>,
}

impl Reconnecting {
    /// Connects to `addrs` in turn; `timeout` bounds each connect and request.
    pub fn new(addrs: Vec<SocketAddr>, export: &str, timeout: Duration) -> Reconnecting {
        assert!(!addrs.is_empty(), "a client needs an address");
        Reconnecting { addrs, export: export.to_string(), timeout, next: 0, client: None }
    }

    /// Starts with a connection already made to `addr`.
    pub fn starting_with(first: NbdClient, addr: SocketAddr, export: &str, timeout: Duration) -> Reconnecting {
        Reconnecting { client: Some(first), ..Reconnecting::new(vec![addr], export, timeout) }
    }

    /// The connection, made first if there is none; a failed attempt waits
    /// [`RECONNECT_PAUSE`] before it returns its error.
    pub fn get(&mut self) -> std::io::Result<&mut NbdClient> {
        if self.client.is_none() {
            let addr = self.addrs[self.next % self.addrs.len()];
            self.next += 1;
            match NbdClient::connect(addr, &self.export, self.timeout) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    std::thread::sleep(RECONNECT_PAUSE);
                    return Err(e);
                }
            }
        }
        Ok(self.client.as_mut().expect("connected"))
    }

    /// Drops the connection after a failed request: the next [`Reconnecting::get`] makes a
    /// new one.
    pub fn broken(&mut self) {
        self.client = None;
    }
}
