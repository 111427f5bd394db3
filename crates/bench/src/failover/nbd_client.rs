//! A minimal NBD client for `bench failover`'s write load, written from the protocol document:
//! fixed newstyle handshake with NBD_OPT_GO, then NBD_CMD_WRITE requests one at a time with
//! simple replies, on a blocking socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One NBD request's socket timeout: above the node's own retry deadline for a proxied write
/// (15 s), so the node, not this client, decides when a write has failed.
const NBD_IO_TIMEOUT: Duration = Duration::from_secs(30);
const NBD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERROR_BIT: u32 = 0x8000_0000;
const CMD_WRITE: u16 = 1;
/// An option reply longer than this is a broken server, not data.
const OPT_REPLY_BYTES_MAX: usize = 64 * 1024;

pub(super) enum WriteError {
    /// The server answered with this NBD error; the connection is still usable.
    Refused(u32),
    /// The connection broke, or the answer made no sense.
    Io(std::io::Error),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> WriteError {
        WriteError::Io(e)
    }
}

pub(super) struct NbdClient {
    sock: TcpStream,
    cookie: u64,
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn protocol_error(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

impl NbdClient {
    pub(super) fn connect(addr: SocketAddr, export: &str) -> std::io::Result<NbdClient> {
        let sock = TcpStream::connect_timeout(&addr, NBD_CONNECT_TIMEOUT)?;
        sock.set_read_timeout(Some(NBD_IO_TIMEOUT))?;
        sock.set_write_timeout(Some(NBD_IO_TIMEOUT))?;
        sock.set_nodelay(true)?;
        let mut c = NbdClient { sock, cookie: 0 };
        let mut hello = [0u8; 18];
        c.sock.read_exact(&mut hello)?;
        if be_u64(&hello) != NBDMAGIC || be_u64(&hello[8..]) != IHAVEOPT {
            return Err(protocol_error("not an NBD newstyle server".into()));
        }
        c.sock.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let name = export.as_bytes();
        let mut opt = Vec::with_capacity(16 + 4 + name.len() + 2);
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        // No information requests: the server sends NBD_INFO_EXPORT anyway.
        opt.extend_from_slice(&0u16.to_be_bytes());
        c.sock.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            c.sock.read_exact(&mut h)?;
            if be_u64(&h) != OPT_REPLY_MAGIC {
                return Err(protocol_error("bad option reply magic".into()));
            }
            let kind = be_u32(&h[12..]);
            let len = be_u32(&h[16..]) as usize;
            if len > OPT_REPLY_BYTES_MAX {
                return Err(protocol_error(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len];
            c.sock.read_exact(&mut data)?;
            if kind == REP_ACK {
                return Ok(c);
            }
            if kind & REP_ERROR_BIT != 0 {
                return Err(protocol_error(format!(
                    "export {export:?} refused ({kind:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            // NBD_REP_INFO and anything else before the ACK: nothing the load needs.
        }
    }

    pub(super) fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&CMD_WRITE.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        self.sock.write_all(&r)?;
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if be_u32(&h) != SIMPLE_REPLY_MAGIC || be_u64(&h[8..]) != self.cookie {
            return Err(WriteError::Io(protocol_error("bad reply header".into())));
        }
        match be_u32(&h[4..]) {
            0 => Ok(()),
            e => Err(WriteError::Refused(e)),
        }
    }
}
